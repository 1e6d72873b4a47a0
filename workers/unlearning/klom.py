"""KLoM ("KL divergence of margins", Georgiev et al., Attribute-to-Delete): per example, the KL divergence between
the margins K unlearned models give it and the margins K models retrained without the forget set give it."""
import numpy as np

# Histogram estimator: equal-width bins shared by both samples of an example, spanning both; a small count added to
# every bin so an empty oracle bin is finite. With 20 bins digits' oracle-vs-oracle floor (95th percentile) is ≈3.3
# at K=32 and ≈0.8 at K=100, close to the reference estimator (3.0 and 0.71). Fewer models than bins leave
# most bins empty and every KLoM near its ceiling, so small K gets K/2 bins.
MAX_BINS = 20
MIN_BINS = 4
SMOOTHING = 1e-4
PERCENTILE = 95


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """z_y − logsumexp of the other logits. logits [..., n, C], labels [n] → [..., n]."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(logits.shape[-2])
    correct = logits[..., rows, labels]
    others = logits.copy()
    others[..., rows, labels] = -np.inf
    top = others.max(axis=-1, keepdims=True)
    return correct - (top[..., 0] + np.log(np.exp(others - top).sum(axis=-1)))


def bins_for(k: int) -> int:
    return min(MAX_BINS, max(MIN_BINS, k // 2))


def klom(unlearned: np.ndarray, oracles: np.ndarray, bins: int, smoothing: float = SMOOTHING) -> np.ndarray:
    """KL(unlearned ‖ oracles) per example. Both are margins [K, n] (K may differ); returns [n]."""
    low = np.minimum(unlearned.min(axis=0), oracles.min(axis=0))
    high = np.maximum(unlearned.max(axis=0), oracles.max(axis=0))
    width = np.where(high > low, high - low, 1.0)
    p = _histogram(unlearned, low, width, bins) + smoothing
    q = _histogram(oracles, low, width, bins) + smoothing
    p /= p.sum(axis=1, keepdims=True)
    q /= q.sum(axis=1, keepdims=True)
    return (p * np.log(p / q)).sum(axis=1)


def _histogram(samples: np.ndarray, low: np.ndarray, width: np.ndarray, bins: int) -> np.ndarray:
    """Counts per example and bin: [K, n] samples → [n, bins]."""
    index = np.clip(((samples - low) / width * bins).astype(np.int64), 0, bins - 1)
    counts = np.zeros((samples.shape[1], bins))
    np.add.at(counts, (np.broadcast_to(np.arange(samples.shape[1]), samples.shape), index), 1.0)
    return counts


def percentile(values: np.ndarray) -> float | None:
    return round(float(np.percentile(values, PERCENTILE)), 4) if len(values) else None
