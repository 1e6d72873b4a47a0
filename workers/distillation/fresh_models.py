"""How good a training set is: fresh models trained on it under one fixed protocol and scored on the validation
data. The synthetic set is compared with random real subsets of the same size and with the full training data."""
import math
import statistics
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workers.data import Dataset
from workers.inputs import input_stats
from workers.models import Classifier, build_model

LR = 1e-3
WEIGHT_DECAY = 5e-4
BATCH = 256


def fresh_model(data: Dataset, arch: str, args: dict, steps: int, seed: int, device: torch.device) -> Classifier:
    """A new `arch` model trained for `steps` AdamW steps (cosine schedule) on batches of up to 256 rows of `data`;
    its standardisation comes from `data` itself, as a `train` job on that file would compute it."""
    mean, std = input_stats(data)
    torch.manual_seed(seed)
    model = build_model(arch, args, tuple(data.x.shape[1:]), len(data.classes), mean, std).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    x, y = torch.from_numpy(data.x).float().to(device), torch.from_numpy(data.y).long().to(device)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = torch.randperm(len(y), generator=generator)[:BATCH].to(device)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def random_subset(train: Dataset, ipc: int, seed: int) -> Dataset:
    """`ipc` random real rows per class."""
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(train.y == label), ipc, replace=False) for label in range(len(train.classes))]
    return train.subset(np.concatenate(rows))


def compare_training_sets(train: Dataset, candidates: dict[str, Dataset], val_x: torch.Tensor, val_y: torch.Tensor,
                          ipc: int, arch: str, args: dict, steps: int, repeats: int, seed: int,
                          device: torch.device) -> tuple[dict[str, Any], str, Classifier]:
    """Accuracy of fresh models on each candidate synthetic set (`repeats` seeds each), on `repeats` random real
    subsets of the same size, and on the full training data (one run). The candidate whose fresh models score best
    is kept (the first listed wins ties): returns the table, its name and its first fresh model."""
    scores: dict[str, list[float]] = {}
    first: dict[str, Classifier] = {}
    for name, candidate in candidates.items():
        models = [fresh_model(candidate, arch, args, steps, seed + repeat, device) for repeat in range(repeats)]
        first[name] = models[0]
        scores[name] = [accuracy(model, val_x, val_y) for model in models]
    random_scores = [accuracy(fresh_model(random_subset(train, ipc, seed + 1000 + repeat), arch, args, steps,
                                          seed + repeat, device), val_x, val_y) for repeat in range(repeats)]
    full = accuracy(fresh_model(train, arch, args, steps, seed, device), val_x, val_y)
    kept = max(candidates, key=lambda name: statistics.fmean(scores[name]))
    rows = len(candidates[kept].y)
    table = {"synthetic": _summary(scores[kept], rows),
             "candidates": {name: _summary(values, rows) for name, values in scores.items()}, "kept": kept,
             "random_real_subset": _summary(random_scores, rows),
             "full_data": _summary([full], len(train.y)),
             "protocol": {"arch": arch, "args": args, "steps": steps, "batch": BATCH, "optimizer": "adamw",
                          "lr": LR, "weight_decay": WEIGHT_DECAY, "schedule": "cosine", "repeats": repeats}}
    return table, kept, first[kept]


def _summary(scores: list[float], rows: int) -> dict[str, Any]:
    return {"accuracy": round(statistics.fmean(scores), 5),
            "accuracy_std": round(statistics.pstdev(scores), 5) if len(scores) > 1 else 0.0,
            "runs": [round(score, 5) for score in scores], "rows": rows}


def synthetic_dataset(train: Dataset, x: np.ndarray, y: np.ndarray) -> Dataset:
    return replace(train, x=x.astype(np.float32), y=y.astype(np.int64), uri="synthetic.npz")


def summarize(table: dict[str, Any], train: Dataset, synthetic: Dataset) -> tuple[dict[str, Any], list[dict]]:
    """The job's headline numbers, and the report's comparison rows (full data first, so the page shows every set's
    rows and bytes as ratios of the real data's)."""
    summary = {"synthetic_accuracy": table["synthetic"]["accuracy"],
               "random_real_accuracy": table["random_real_subset"]["accuracy"],
               "full_data_accuracy": table["full_data"]["accuracy"],
               "gain_over_random_real": round(table["synthetic"]["accuracy"]
                                              - table["random_real_subset"]["accuracy"], 5),
               "kept": table["kept"], **{f"{name}_accuracy": entry["accuracy"]
                                         for name, entry in table["candidates"].items()},
               "rows_compression": round(len(train.y) / len(synthetic.y), 2),
               "bytes_compression": round(train.x.nbytes / synthetic.x.nbytes, 2)}
    row_bytes = int(np.prod(synthetic.x.shape[1:])) * 4
    entries = {"full data": table["full_data"], "random real subset": table["random_real_subset"],
               **{f"synthetic, {name}": entry for name, entry in table["candidates"].items()}}
    rows = [{"name": name, "accuracy": entry["accuracy"], "rows": entry["rows"],
             "input_bytes": entry["rows"] * row_bytes, "published": name == f"synthetic, {table['kept']}"}
            for name, entry in entries.items()]
    return summary, rows
