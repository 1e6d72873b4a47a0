"""dmm's attribution: a linear datamodel (Ilyas et al., Datamodels: Predicting Predictions from Training Data) fitted
on models trained on random subsets of the training rows, predicting each training row's logits from which rows a
training set holds.

The per-row coefficients are tied so a few dozen subset models determine them: for row x of class y and logit j,

    f_j(x; S) ≈ a + b·|S|/N + e·[class y absent from S] + g·[class j ≠ y absent from S] + s·[x ∈ S]

b is the effect of the training set's size (fewer rows, fewer optimizer steps), e and g the effects of a whole class
vanishing (class forgetting), s the row's own effect (memorisation: what a retrain without x loses on x). Pairwise
effects between particular rows (removing x's near neighbours) are TRAK's part (trak.py), added to the margin with a
scale fitted here on the same subset models. The prediction for a forget set F is the original model's logits plus
f(x; rows − F) − f(x; rows)."""
import numpy as np
import torch

from workers.unlearning.klom import margins

# Rows kept per subset model: a share drawn uniformly from [KEEP_LOW, 1], so both the size effect and each row's
# own effect (a row is left out of ~10% of the models, more with class drops) are measured. Shares from [0.5, 1]
# gave a flatter size effect than the one near 1 that a deletion of a few percent meets.
KEEP_LOW = 0.8
# Every DROP_EVERY-th subset model also leaves one whole class out, cycling through the classes: the class effect.
DROP_EVERY = 3
RIDGE = 1e-3


def subset_masks(labels: np.ndarray, models: int, seed: int) -> np.ndarray:
    """[models, N] booleans: which training rows each subset model trains on."""
    rng = np.random.default_rng(seed)
    present = np.flatnonzero(np.bincount(labels) > 0)
    classes = rng.permutation(present)
    masks = np.empty((models, len(labels)), dtype=bool)
    for m in range(models):
        masks[m] = rng.random(len(labels)) < rng.uniform(KEEP_LOW, 1.0)
        if m % DROP_EVERY == 0 and len(present) > 2:
            masks[m, labels == classes[(m // DROP_EVERY) % len(classes)]] = False
    return masks


def _features(masks: np.ndarray, labels: np.ndarray, num_classes: int, reference: np.ndarray) -> np.ndarray:
    """Features of training rows `reference` (a few at a time) per subset model: [M, n, C, 4], holding per row x and
    logit j: the share of rows kept, whether x's class is absent, whether class j is absent (j ≠ x's class; the
    own-class feature covers j = x's class), whether x itself is kept."""
    counts = np.stack([np.bincount(labels[mask], minlength=num_classes) for mask in masks])
    absent = (counts == 0).astype(np.float64)  # [M, C]
    own_class = labels[reference]
    other = np.arange(num_classes)[None, :] != own_class[:, None]  # [n, C]
    shape = (len(masks), len(reference), num_classes)
    return np.stack([np.broadcast_to(masks.mean(axis=1)[:, None, None], shape),
                     np.broadcast_to(absent[:, own_class][:, :, None], shape),
                     absent[:, None, :] * other[None],
                     np.broadcast_to(masks[:, reference][:, :, None].astype(np.float64), shape)], axis=-1)


FEATURES = 4
CHUNK_ROWS = 1024  # rows solved at once: bounds memory at M × 1024 × C × 4 doubles


def fit(masks: np.ndarray, labels: np.ndarray, logits: np.ndarray, num_classes: int) -> np.ndarray:
    """Least squares per (row, logit) on centred features. masks [M, N], logits [M, N, C] → coefficients
    [N, 4, C] (size, own class absent, logit's class absent, row kept); the intercept cancels in every prediction."""
    coefficients = np.empty((masks.shape[1], FEATURES, num_classes), dtype=np.float32)
    for start in range(0, masks.shape[1], CHUNK_ROWS):
        rows = np.arange(start, min(start + CHUNK_ROWS, masks.shape[1]))
        x = _features(masks, labels, num_classes, rows)
        x = x - x.mean(axis=0)
        y = logits[:, rows].astype(np.float64)
        y = y - y.mean(axis=0)
        gram = np.einsum("mncf,mncg->ncfg", x, x)
        # Relative damping keeps each feature's scale; the absolute term makes a feature that never varies (a class
        # no subset model dropped) solvable, with coefficient 0.
        diagonal = np.arange(FEATURES)
        gram[..., diagonal, diagonal] = gram[..., diagonal, diagonal] * (1.0 + RIDGE) + 1e-9
        rhs = np.einsum("mncf,mnc->ncf", x, y)
        solved = torch.linalg.solve(torch.from_numpy(gram), torch.from_numpy(rhs)[..., None])[..., 0].numpy()
        coefficients[rows] = solved.transpose(0, 2, 1)
    return coefficients


def drops_a_class(masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[M] booleans: which subset models left a whole class out."""
    present = np.bincount(labels) > 0
    return np.array([(np.bincount(labels[mask], minlength=len(present))[present] == 0).any() for mask in masks])


def pairwise_scale(masks: np.ndarray, labels: np.ndarray, logits: np.ndarray, coefficients: np.ndarray,
                   effects: np.ndarray, num_classes: int) -> float:
    """The factor on TRAK's removal effects [M, N] (trak.removal_effect of each model's left-out rows): least squares
    of what the tied fit leaves over in the subset models' margins. Models that drop a class are left out: removing a
    whole class is far outside TRAK's linear regime, and the class features cover it."""
    keep = ~drops_a_class(masks, labels)
    residual = np.empty((int(keep.sum()), masks.shape[1]))
    for start in range(0, masks.shape[1], CHUNK_ROWS):
        rows = np.arange(start, min(start + CHUNK_ROWS, masks.shape[1]))
        x = _features(masks, labels, num_classes, rows)
        fitted = logits[:, rows].mean(axis=0) + np.einsum("mncf,nfc->mnc", x - x.mean(axis=0), coefficients[rows])
        residual[:, rows] = margins(logits[keep][:, rows], labels[rows]) - margins(fitted[keep], labels[rows])
    effects = effects[keep]
    return float((residual * effects).sum() / max((effects * effects).sum(), 1e-12))


def predicted_shift(coefficients: np.ndarray, labels: np.ndarray, forget: np.ndarray, num_classes: int,
                    pairwise: np.ndarray | None = None) -> np.ndarray:
    """f(x; rows − F) − f(x; rows) for every training row: [N, C]. `pairwise` [N], the scaled TRAK margin change,
    goes onto each row's own-class logit, which moves its margin by as much."""
    rows = np.arange(len(labels))
    after = _features((~forget)[None], labels, num_classes, rows)[0]
    before = _features(np.ones((1, len(labels)), dtype=bool), labels, num_classes, rows)[0]
    shift = np.einsum("nfc,ncf->nc", coefficients, after - before)
    if pairwise is not None:
        shift[rows, labels] += pairwise
    return shift.astype(np.float32)
