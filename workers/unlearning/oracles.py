"""Retrained models as a yardstick. `evaluate.oracles: K` trains K originals (the original recipe, new seeds), unlearns
each, and trains 2K oracles on the retain set: KLoM compares the K unlearned models with K oracles, beside the
oracle-vs-oracle floor (the other K oracles against the same K) — the KLoM a perfect unlearner would get at this K."""
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from workers.unlearning import klom
from workers.unlearning.ensemble import Order, Shared, Trained, train_many
from workers.unlearning.privacy import loss_mia_auc, row_losses

# Seed ranges per role, so no oracle, original, matching oracle or subset model ever shares a seed with another.
SEED_BASE = {"original": 1_000_000, "oracle": 2_000_000, "matching_oracle": 3_000_000, "subset": 4_000_000}


def seed_for(role: str, job_seed: int, index: int) -> int:
    return SEED_BASE[role] + job_seed * 10_000 + index


def groups(shared: Shared, forget_class: int | None) -> dict[str, tuple[str, np.ndarray]]:
    """Where KLoM is read: name → (training or test rows, row indices). For class forgetting the test rows of the
    forgotten class are a group of their own: the held-out points the forget set should now look like."""
    out = {"forget": ("train", np.flatnonzero(shared.forget)), "retain": ("train", np.flatnonzero(~shared.forget)),
           "test": ("test", np.arange(len(shared.test)))}
    if forget_class is not None:
        out["test_forget_class"] = ("test", np.flatnonzero(shared.test.y == forget_class))
    return out


def matching_shift(shared: Shared, pairs: int, job_seed: int, watch: Callable[[int], None]) -> np.ndarray:
    """oracle_matching's shift on the matched rows: the mean of (oracle − original) logits over `pairs` seed-paired
    models, each pair one seed, the oracle trained on the retain set and the original on every training row. Sharing
    the seed (initialisation and batch order) makes the pair's difference far less noisy than either model: on
    digits the pair's margin difference varied 0.19 across seeds against 0.25 for one model, and 8 pairs came within
    0.055 (mean absolute, per row) of the shift 32 oracles and 32 originals measure, 16 unpaired oracles within 0.075.
    The seeds are apart from the evaluation's, so KLoM is
    not measured against what was matched."""
    orders = [Order(role, seed_for("matching_oracle", job_seed, i)) for i in range(pairs)
              for role in ("original", "oracle")]
    trained = train_many(orders, replace(shared, algorithm=None), watch)
    logits = {role: np.stack([t.train_logits[shared.match] for t in trained if t.role == role])
              for role in ("original", "oracle")}
    return (logits["oracle"] - logits["original"]).mean(axis=0)


def evaluate_with_oracles(shared: Shared, k: int, job_seed: int, forget_class: int | None,
                          watch: Callable[[int], None]) -> dict:
    """The `evaluate.oracles: K` section of the report."""
    # Interleaved, so originals (and their unlearning) and oracles meet the same machine load and their timings
    # compare.
    orders = [order for i in range(k) for order in (Order("original", seed_for("original", job_seed, i)),
                                                    Order("oracle", seed_for("oracle", job_seed, 2 * i)),
                                                    Order("oracle", seed_for("oracle", job_seed, 2 * i + 1)))]
    trained = train_many(orders, shared, watch)
    return klom_report(shared, k, [t for t in trained if t.role == "original"],
                       [t for t in trained if t.role == "oracle"], forget_class)


def klom_report(shared: Shared, k: int, originals: list[Trained], oracles: list[Trained],
                forget_class: int | None) -> dict:
    """KLoM of the K unlearned originals against every other oracle, beside the floor (the remaining oracles)."""
    reference, others = oracles[0::2], oracles[1::2]
    table, bins = {}, klom.bins_for(k)
    for name, (part, rows) in groups(shared, forget_class).items():
        labels = (shared.train.y if part == "train" else shared.test.y)[rows]
        against = _margins(reference, part, rows, labels)
        table[name] = {"unlearned": klom.percentile(klom.klom(_margins(originals, part, rows, labels, True), against,
                                                              bins)),
                       "floor": klom.percentile(klom.klom(_margins(others, part, rows, labels), against, bins)),
                       "original": klom.percentile(klom.klom(_margins(originals, part, rows, labels), against, bins)),
                       "count": len(rows)}
    return {"k": k, "klom95": table,
            "estimator": {"statistic": f"{klom.PERCENTILE}th percentile over rows", "bins": bins,
                          "smoothing": klom.SMOOTHING},
            "models": _model_summary(shared, originals, reference, forget_class)}


def _margins(models: list[Trained], part: str, rows: np.ndarray, labels: np.ndarray,
             unlearned: bool = False) -> np.ndarray:
    """[K, rows] margins of `models` (their unlearned copies' when `unlearned`) on training or test rows."""
    key = f"{'unlearned_' if unlearned else ''}{part}_logits"
    return klom.margins(np.stack([getattr(t, key)[rows] for t in models]), labels)


def _model_summary(shared: Shared, originals: list[Trained], oracles: list[Trained], forget_class: int | None) -> dict:
    """Mean accuracies, MIA AUC and single-thread seconds of the K unlearned, original and oracle models."""
    def scores(models: list[Trained], unlearned: bool) -> dict:
        prefix = "unlearned_" if unlearned else ""
        rows = [model_scores(shared, getattr(t, f"{prefix}train_logits"), getattr(t, f"{prefix}test_logits"),
                             forget_class) for t in models]
        return {key: round(float(np.mean([r[key] for r in rows if r[key] is not None])), 4)
                for key in rows[0] if any(r[key] is not None for r in rows)}

    summary = {"unlearned": scores(originals, True), "original": scores(originals, False),
               "oracle": scores(oracles, False)}
    summary["oracle"]["seconds"] = round(float(np.mean([t.seconds for t in oracles])), 3)
    summary["original"]["seconds"] = round(float(np.mean([t.seconds for t in originals])), 3)
    if originals[0].unlearn_seconds is not None:
        summary["unlearned"]["seconds"] = round(float(np.mean([t.unlearn_seconds for t in originals])), 3)
    return summary


def model_scores(shared: Shared, train_logits: np.ndarray, test_logits: np.ndarray,
                 forget_class: int | None) -> dict[str, float | None]:
    """Forget / retain / test accuracy and loss-threshold MIA AUC (forget rows vs test rows; for class forgetting,
    vs the test rows of that class) from one model's logits."""
    forget, train, test = shared.forget, shared.train, shared.test
    correct = train_logits.argmax(1) == train.y
    test_correct = test_logits.argmax(1) == test.y
    scores: dict[str, float | None] = {
        "forget_accuracy": _mean(correct[forget]), "retain_accuracy": _mean(correct[~forget]),
        "test_accuracy": _mean(test_correct)}
    unseen = np.ones(len(test), dtype=bool) if forget_class is None else test.y == forget_class
    if forget_class is not None:
        scores["test_accuracy_forget_class"] = _mean(test_correct[unseen])
        scores["test_accuracy_other_classes"] = _mean(test_correct[~unseen])
    scores["mia_auc"] = loss_mia_auc(row_losses(train_logits[forget], train.y[forget]),
                                     row_losses(test_logits[unseen], test.y[unseen]))
    return scores


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 4) if len(values) else None
