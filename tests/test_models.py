"""The model registry: building, safetensors round trips and refusals, ONNX export, measurement, pruning rebuilds."""
import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp
from sklearn.datasets import load_digits

from workers.errors import JobFailure
from workers.models import (
    ARCHITECTURES,
    CARD_FORMAT,
    build_model,
    count_params,
    default_arch,
    export_onnx,
    load_model,
    measure,
    model_card,
    onnx_session,
    save_model,
    widths_of,
)

torch.set_num_threads(1)

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
DIGITS_SHAPE = (1, 8, 8)
CLASSES = [str(digit) for digit in range(10)]


def digits_like_model(arch: str, args: dict | None = None, input_shape=DIGITS_SHAPE) -> torch.nn.Module:
    """A model standardising raw 0..16 pixel values, as one trained on sklearn's digits would."""
    torch.manual_seed(0)
    return build_model(arch, args, input_shape, 10, mean=np.array([4.9]), std=np.array([6.0]))


def raw_digits_pixels(batch: int, input_shape=DIGITS_SHAPE) -> torch.Tensor:
    return torch.randint(0, 17, (batch, *input_shape), generator=torch.Generator().manual_seed(1)).float()


def with_batch_norm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Fill BatchNorm running statistics from data, as training would; fresh ones (mean 0, var 1) let a deep
    untrained ResNet's logits grow to thousands, which says nothing about a real export."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(raw_digits_pixels(64))
    return model


def card_for(model, arch, args=None, input_shape=DIGITS_SHAPE) -> dict:
    return model_card(model, arch, args, input_shape, 10, CLASSES, "image")


def failure_code(call) -> JobFailure:
    with pytest.raises(JobFailure) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet20", "resnet56"])
@pytest.mark.parametrize("input_shape", IMAGE_SHAPES)
def test_every_arch_builds_for_small_images(arch, input_shape):
    model = build_model(arch, {}, input_shape, 10).eval()
    logits = model(torch.randn(3, *input_shape))
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()


def test_mlp_builds_for_tabular_rows():
    model = build_model("mlp", {"hidden": [32]}, (13,), 3, mean=np.arange(13.0), std=np.ones(13))
    assert model.mean.shape == (1, 13)
    assert model(torch.randn(5, 13)).shape == (5, 3)


def test_image_archs_refuse_tabular_inputs():
    error = failure_code(lambda: build_model("cnn", {}, (13,), 3))
    assert error.code == "invalid_model_args"
    assert "(C, H, W)" in error.message and "mlp" in error.message


def test_unknown_arch_lists_the_choices():
    error = failure_code(lambda: build_model("vgg", {}, DIGITS_SHAPE, 10))
    assert error.code == "unknown_arch"
    assert all(name in error.message for name in ARCHITECTURES)


@pytest.mark.parametrize(("arch", "args", "mentions"), [
    ("cnn", {"channles": [8]}, "channles"),
    ("cnn", {"channels": ["32"]}, "channels.0"),
    ("mlp", {"hidden": [True]}, "hidden.0"),
    ("mlp", {"dropout": 0.95}, "dropout"),
    ("resnet20", {"widths": [16, 32]}, "widths"),
    ("resnet20", {"inner_widths": [8] * 27}, "one width per block"),
])
def test_bad_args_say_what_is_wrong(arch, args, mentions):
    error = failure_code(lambda: build_model(arch, args, DIGITS_SHAPE, 10))
    assert error.code == "invalid_model_args"
    assert mentions in error.message


def test_standardisation_needs_one_value_per_channel():
    error = failure_code(lambda: build_model("cnn", {}, (3, 32, 32), 10, mean=np.zeros(5), std=np.ones(3)))
    assert error.code == "invalid_model_args"


def test_constant_features_do_not_divide_by_zero():
    model = build_model("mlp", {}, (3,), 2, mean=np.zeros(3), std=np.array([1.0, 0.0, 2.0])).eval()
    assert torch.isfinite(model(torch.ones(2, 3))).all()


def test_default_arch_per_dataset_kind():
    assert default_arch("image") == "cnn"
    assert default_arch("tabular") == "mlp"


def test_card_records_what_rebuilds_the_model():
    model = digits_like_model("cnn", {"channels": [8, 16], "hidden": 32})
    card = card_for(model, "cnn", {"channels": [8, 16], "hidden": 32})
    assert card["format"] == CARD_FORMAT
    assert card["args"] == {"channels": [8, 16], "hidden": 32, "dropout": 0.1}
    assert card["widths"] == {"channels": [8, 16], "hidden": 32}
    assert card["input_shape"] == [1, 8, 8] and card["num_classes"] == 10 and card["classes"] == CLASSES
    assert card["preprocessing"]["mean_std_in_weights"] is True
    assert card["params"] == count_params(model)
    json.dumps(card)
    with pytest.raises(ValueError):
        model_card(model, "cnn", {}, DIGITS_SHAPE, 10, CLASSES, "image", extra={"arch": "mlp"})


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet20", "resnet56"])
def test_save_load_round_trip_gives_identical_outputs(arch, tmp_path):
    model = digits_like_model(arch).eval()
    weights, card_path = save_model(model, card_for(model, arch), tmp_path)
    assert (weights.name, card_path.name) == ("model.safetensors", "model.json")
    loaded = load_model(json.loads(card_path.read_text()), weights)
    pixels = raw_digits_pixels(6)
    assert torch.equal(model(pixels), loaded(pixels))
    assert torch.equal(loaded.mean, model.mean) and torch.equal(loaded.std, model.std)


def test_wrong_shaped_weights_name_the_tensor_and_shapes(tmp_path):
    narrow = digits_like_model("cnn", {"channels": [16, 64, 64]})
    weights, _ = save_model(narrow, card_for(narrow, "cnn"), tmp_path)
    default_card = card_for(digits_like_model("cnn"), "cnn")
    error = failure_code(lambda: load_model(default_card, weights))
    assert error.code == "weights_mismatch"
    assert "body.features.0.weight: expected [32, 1, 3, 3], got [16, 1, 3, 3]" in error.message


def test_weights_of_another_arch_are_missing_and_unexpected(tmp_path):
    mlp = digits_like_model("mlp")
    weights, _ = save_model(mlp, card_for(mlp, "mlp"), tmp_path)
    error = failure_code(lambda: load_model(card_for(digits_like_model("cnn"), "cnn"), weights))
    assert error.code == "weights_mismatch"
    assert "missing" in error.message and "unexpected" in error.message


def test_unreadable_weights(tmp_path):
    card = card_for(digits_like_model("cnn"), "cnn")
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    assert failure_code(lambda: load_model(card, garbage)).code == "weights_unreadable"
    assert failure_code(lambda: load_model(card, tmp_path / "absent.safetensors")).code == "weights_unreadable"


def test_foreign_card_is_refused():
    error = failure_code(lambda: load_model({"arch": "cnn"}, Path("model.safetensors")))
    assert error.code == "invalid_model_card"


class LeavesAMarker:
    """Unpickling this touches a file: proof that a payload ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("name", ["weights.pt", "model.safetensors", "weights.bin"])
def test_pickles_are_refused_without_running_them(tmp_path, name):
    marker = tmp_path / "payload-ran"
    payload = tmp_path / name
    payload.write_bytes(pickle.dumps(LeavesAMarker(marker), protocol=4))
    error = failure_code(lambda: load_model(card_for(digits_like_model("cnn"), "cnn"), payload))
    assert error.code == "unsafe_format"
    assert "safetensors" in error.message
    assert not marker.exists()


def test_torch_save_archives_are_refused(tmp_path):
    model = digits_like_model("cnn")
    archive = tmp_path / "model.safetensors"
    torch.save(model.state_dict(), archive)
    assert failure_code(lambda: load_model(card_for(model, "cnn"), archive)).code == "unsafe_format"


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet20", "resnet56"])
def test_onnx_export_matches_torch_on_raw_inputs(arch, tmp_path):
    model = with_batch_norm_statistics(digits_like_model(arch))
    path = tmp_path / "model.onnx"
    export_onnx(model, DIGITS_SHAPE, path)
    assert model.training, "export must not switch the caller's model to eval"
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["input"] and [o.name for o in graph.graph.output] == ["logits"]
    assert max(opset.version for opset in graph.opset_import if opset.domain in ("", "ai.onnx")) >= 17
    session = onnx_session(path)
    model.eval()
    for batch in (1, 7):
        pixels = raw_digits_pixels(batch)
        (logits,) = session.run(["logits"], {"input": pixels.numpy()})
        with torch.inference_mode():
            expected = model(pixels).numpy()
        assert logits.shape == (batch, 10)
        assert np.abs(logits - expected).max() < 1e-4


def test_measure_reports_positive_costs(tmp_path):
    model = digits_like_model("cnn")
    weights, _ = save_model(model, card_for(model, "cnn"), tmp_path)
    export_onnx(model, DIGITS_SHAPE, tmp_path / "model.onnx")
    costs = measure(model, DIGITS_SHAPE, tmp_path / "model.onnx", weights)
    assert costs["params"] == count_params(model) > 0
    assert costs["size_bytes"]["safetensors"] == weights.stat().st_size
    assert costs["size_bytes"]["onnx"] > 0
    latency = costs["latency_ms"]
    assert all(latency[name] > 0 for name in ("torch_cpu_b1", "onnxruntime_b1", "onnxruntime_b64"))
    assert latency["runs"] >= 5


def test_cnn_flops_match_a_hand_count():
    # Multiply-accumulates of the default cnn on 8x8: convs at 8x8, 4x4, 2x2 (pooling between), then the two linears.
    macs = 8 * 8 * 32 * 1 * 9 + 4 * 4 * 64 * 32 * 9 + 2 * 2 * 64 * 64 * 9 + 64 * 128 + 128 * 10
    flops = measure(digits_like_model("cnn"), DIGITS_SHAPE, None, None)["flops"]
    assert flops == pytest.approx(2 * macs, rel=0.1)


def test_resnet56_costs_about_three_resnet20s():
    shape = (3, 32, 32)
    flops20 = measure(build_model("resnet20", {}, shape, 10), shape, None, None)["flops"]
    flops56 = measure(build_model("resnet56", {}, shape, 10), shape, None, None)["flops"]
    # "Deep Residual Learning for Image Recognition": ~41M and ~125M multiply-adds on CIFAR-10.
    assert 2.8 < flops56 / flops20 < 3.2
    assert flops20 == pytest.approx(2 * 41e6, rel=0.05)


def test_cnn_learns_digits():
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    held_out, train = order[:300], order[300:]
    model = build_model("cnn", {}, DIGITS_SHAPE, 10, mean=x[train].mean().numpy(), std=x[train].std().numpy())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(15):
        model.train()
        for batch in torch.randperm(len(train)).split(64):
            rows = train[batch]
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        accuracy = (model(x[held_out]).argmax(1) == y[held_out]).float().mean().item()
    assert accuracy >= 0.95


@pytest.mark.parametrize(("arch", "input_shape"), [("resnet20", (3, 32, 32)), ("cnn", DIGITS_SHAPE)])
def test_pruned_model_rebuilds_from_its_card(arch, input_shape, tmp_path):
    model = digits_like_model(arch, input_shape=input_shape)
    before = count_params(model)
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, *input_shape), importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[model.head])
    pruner.step()
    assert count_params(model) < 0.4 * before
    card = card_for(model, arch, {}, input_shape)
    assert card["args"] | widths_of(model) == card["args"]
    weights, card_path = save_model(model, card, tmp_path)
    loaded = load_model(json.loads(card_path.read_text()), weights)
    pixels = raw_digits_pixels(4, input_shape)
    model.eval()
    assert torch.equal(model(pixels), loaded(pixels))
    export_onnx(loaded, input_shape, tmp_path / "model.onnx")
