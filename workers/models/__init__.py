"""Refinery's models: the architecture registry, model.json cards, safetensors weights, ONNX export, measurement."""
from workers.models.card import CARD_FORMAT, model_card
from workers.models.classifier import Classifier
from workers.models.measure import count_flops, count_params, measure
from workers.models.onnx_export import export_onnx, onnx_session
from workers.models.registry import ARCHITECTURES, build_model, default_arch, parse_args, widths_of
from workers.models.weights import load_model, load_weights_into, save_model

__all__ = [
    "ARCHITECTURES", "CARD_FORMAT", "Classifier", "build_model", "count_flops", "count_params", "default_arch",
    "export_onnx", "load_model", "load_weights_into", "measure", "model_card", "onnx_session", "parse_args", "save_model", "widths_of",
]
