"""model.safetensors: saving and loading weights, safetensors only (a pickle runs code when loaded)."""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workers.errors import JobFailure
from workers.models.card import checked_card
from workers.models.classifier import Classifier
from workers.models.registry import build_model

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
SHOWN_OFFENDERS = 3


def save_model(model: Classifier, card: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write model.safetensors and model.json into `out_dir`; returns their paths in that order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path, card_path = out_dir / WEIGHTS_FILE, out_dir / CARD_FILE
    # Pruned tensors can be views; safetensors wants contiguous CPU tensors.
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, weights_path, metadata={"format": card.get("format", ""), "arch": card.get("arch", "")})
    card_path.write_text(json.dumps(card, indent=2))
    return weights_path, card_path


def load_model(card: dict, weights_path: Path) -> Classifier:
    """Rebuild the card's architecture and load its weights; names and shapes must match exactly. Returns eval mode."""
    card = checked_card(card)
    model = build_model(card["arch"], card["args"], tuple(card["input_shape"]), card["num_classes"])
    tensors = _read_safetensors(Path(weights_path))
    _check_matches(model.state_dict(), tensors, card["arch"])
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _unsafe(path)
    try:
        with path.open("rb") as file:
            head = file.read(9)
    except OSError as error:
        raise JobFailure("weights_unreadable", f"cannot read weights file {path.name}: {error.strerror}") from None
    if _looks_like_pickle(head):
        raise _unsafe(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise JobFailure("weights_unreadable", f"{path.name} is not a readable safetensors file: {error}") from None


def _looks_like_pickle(head: bytes) -> bool:
    """A pickle stream (protocol 2+) or torch.save's zip container; checked from the bytes, never by unpickling."""
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04")


def _unsafe(path: Path) -> JobFailure:
    return JobFailure("unsafe_format", f"{path.name} looks like a pickle (torch.save) file, which can run code when "
                                       "loaded; save with safetensors (safetensors.torch.save_file) instead")


def _check_matches(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], arch: str) -> None:
    wrong_shape = [f"{name}: expected {list(tensor.shape)}, got {list(got[name].shape)}"
                   for name, tensor in expected.items() if name in got and got[name].shape != tensor.shape]
    missing = [name for name in expected if name not in got]
    unexpected = [name for name in got if name not in expected]
    problems = []
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensors with other shapes ({'; '.join(wrong_shape[:SHOWN_OFFENDERS])})")
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:SHOWN_OFFENDERS])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:SHOWN_OFFENDERS])})")
    if problems:
        raise JobFailure("weights_mismatch", f"weights do not fit architecture {arch!r} with the card's args: "
                                             + "; ".join(problems))


def load_weights_into(model: Classifier, weights_path: Path, arch: str) -> Classifier:
    """Load bare weights (not a Refinery model) into a freshly built model. Such files may lack the `mean`/`std`
    standardisation buffers; the model keeps the ones computed from the job's data then."""
    tensors = _read_safetensors(Path(weights_path))
    for buffer in ("mean", "std"):
        tensors.setdefault(buffer, getattr(model, buffer))
    _check_matches(model.state_dict(), tensors, arch)
    model.load_state_dict(tensors, strict=True)
    return model
