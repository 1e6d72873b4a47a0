"""model.json: everything besides the weights needed to rebuild a model and feed it data."""
from collections.abc import Sequence

from workers.errors import JobFailure
from workers.models.classifier import Classifier
from workers.models.measure import count_params
from workers.models.registry import parse_args, widths_of

CARD_FORMAT = "refinery.model/v1"
PREPROCESSING = {"standardize": True, "mean_std_in_weights": True, "input": "as stored in the dataset file, float32"}
REQUIRED_FIELDS = ("arch", "args", "input_shape", "num_classes")


def model_card(model: Classifier, arch: str, args: dict | None, input_shape: Sequence[int], num_classes: int,
               classes: Sequence[str], kind: str, extra: dict | None = None) -> dict:
    """The model.json content. The card's `args` hold the module's real widths (read off its layers), so a pruned
    model rebuilds from its card and model.safetensors alone."""
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} classes")
    widths = widths_of(model)
    rebuild_args = parse_args(arch, {**(args or {}), **widths}).model_dump(mode="json")
    card = {
        "format": CARD_FORMAT,
        "arch": arch,
        "args": rebuild_args,
        "input_shape": [int(size) for size in input_shape],
        "num_classes": int(num_classes),
        "classes": [str(name) for name in classes],
        "kind": kind,
        "preprocessing": dict(PREPROCESSING),
        "params": count_params(model),
        "widths": widths,
    }
    clashes = sorted(set(card) & set(extra or {}))
    if clashes:
        raise ValueError(f"extra card fields would overwrite {clashes}")
    return {**card, **(extra or {})}


def checked_card(card: dict) -> dict:
    """A card read from a user's model.json, refused with a message if it cannot describe a Refinery model."""
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise JobFailure("invalid_model_card", f"model.json must have format {CARD_FORMAT!r}, found {found!r}")
    missing = [field for field in REQUIRED_FIELDS if field not in card]
    if missing:
        raise JobFailure("invalid_model_card", f"model.json is missing {', '.join(missing)}")
    if not isinstance(card["input_shape"], list) or not isinstance(card["args"], dict):
        raise JobFailure("invalid_model_card", "model.json needs `input_shape` as a list and `args` as an object")
    return card
