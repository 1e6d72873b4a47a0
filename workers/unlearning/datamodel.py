"""dmm's attribution: linear datamodels (Ilyas et al., Datamodels: Predicting Predictions from Training Data) fitted
on models trained on random subsets of the training rows, predicting how a training set's rows move each training
row's outputs. Two, one per kind of deletion:

A deletion that removes a whole class (fit): per row x of class y and logit j, tied so a few dozen subset models
determine the coefficients,

    f_j(x; S) ≈ a + b·|S|/N + e·[class y absent from S] + g·[class j ≠ y absent from S] + s·[x ∈ S]

b is the effect of the training set's size, e and g the effects of a whole class vanishing, s the row's own effect.

A deletion that keeps every class (fit_rows): the margin, with the row's own effect predicted from TRAK's
self-influence, the class mix of what is removed, and TRAK's pairwise effects (removing x's near neighbours lowers
its margin more than removing as many random rows does, trak.py). This is the common request, and the model a
retrain's margins are compared with (KLoM), so it is fitted in margin space.

The prediction for a forget set F is the original model's outputs plus f(x; rows − F) − f(x; rows)."""
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
        coefficients[rows] = _least_squares(x, logits[:, rows].astype(np.float64)).transpose(0, 2, 1)
    return coefficients


def _least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Damped least squares over the subset models (axis 0), one fit per remaining index, on centred features:
    x [M, ..., F], y [M, ...] → [..., F]. Relative damping keeps each feature's scale; the absolute term makes a
    feature that never varies (a class no subset model dropped, a row no model left out) solvable, with
    coefficient 0."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    gram = np.einsum("m...f,m...g->...fg", x, x)
    diagonal = np.arange(x.shape[-1])
    gram[..., diagonal, diagonal] = gram[..., diagonal, diagonal] * (1.0 + RIDGE) + 1e-9
    rhs = np.einsum("m...f,m...->...f", x, y)
    return torch.linalg.solve(torch.from_numpy(gram), torch.from_numpy(rhs)[..., None])[..., 0].numpy()


def drops_a_class(masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[M] booleans: which subset models left a whole class out."""
    present = np.bincount(labels) > 0
    return np.array([(np.bincount(labels[mask], minlength=len(present))[present] == 0).any() for mask in masks])


# Rows left out of fewer subset models than this do not inform the fit of the own effect on self-influence.
MIN_ABSENT = 3


def fit_rows(masks: np.ndarray, labels: np.ndarray, logits: np.ndarray, self_influence: np.ndarray, q: np.ndarray,
             effects: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The margin model for deletions that keep every class, fitted on subset models that kept every class (masks
    [M, N], logits [M, N, C], effects [M, N] = TRAK's removal effect of each model's left-out rows):

        margin(x; S) ≈ a + size_x·|S|/N + own_x·[x ∈ S] + κ·(share of x's class in S − |S|/N) + scale·TRAK(x; S)

    size_x is per row. own_x, a row's own effect, is read from the ~10% of models that left x out: too few for one
    row, so it is predicted from TRAK's self-influence and q instead, fitted across all rows (on digits that cut the
    forget rows' error against seed-paired retrains from 0.16 to 0.10). κ, the pull of the forget set's class mix,
    and TRAK's scale are two numbers fitted on what is left. Returns (size [N], own [N], κ, scale)."""
    y = margins(logits, labels)
    share = masks.mean(axis=1, keepdims=True)
    x = np.stack([np.broadcast_to(share, masks.shape), masks.astype(np.float64)], axis=-1)
    solved = _least_squares(x, y)
    size = solved[:, 0]
    predictors = np.stack([np.ones(len(labels)), self_influence, q], axis=1)
    informed = (~masks).sum(axis=0) >= MIN_ABSENT
    if informed.sum() < 10 * predictors.shape[1]:  # very few subset models: every row, however noisy
        informed[:] = True
    own = predictors @ np.linalg.lstsq(predictors[informed], solved[informed, 1], rcond=None)[0]
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    residual = y - size * x[..., 0] - own * x[..., 1]
    mix = class_mix(masks, labels)
    columns = np.stack([(mix - mix.mean(axis=0)).ravel(), effects.ravel()], axis=1)
    kappa, scale = np.linalg.lstsq(columns, residual.ravel(), rcond=None)[0]
    return size.astype(np.float32), own.astype(np.float32), float(kappa), float(scale)


def class_mix(masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[M, N]: the share of each row's class kept, less the share of all rows kept."""
    kept = np.stack([np.bincount(labels[mask], minlength=labels.max() + 1) for mask in masks])
    return kept[:, labels] / np.bincount(labels)[labels] - masks.mean(axis=1, keepdims=True)


def predicted_margin_shift(size: np.ndarray, own: np.ndarray, kappa: float, labels: np.ndarray, forget: np.ndarray,
                           pairwise: np.ndarray) -> np.ndarray:
    """fit_rows' margin change of every training row when `forget` goes [N]; `pairwise` is the scaled TRAK effect."""
    kept = (~forget)[None]
    return (size * (kept.mean() - 1.0) - own * forget + kappa * class_mix(kept, labels)[0] + pairwise).astype(
        np.float32)


def predicted_shift(coefficients: np.ndarray, labels: np.ndarray, forget: np.ndarray, num_classes: int) -> np.ndarray:
    """The tied model's f(x; rows − F) − f(x; rows) for every training row: [N, C]."""
    rows = np.arange(len(labels))
    after = _features((~forget)[None], labels, num_classes, rows)[0]
    before = _features(np.ones((1, len(labels)), dtype=bool), labels, num_classes, rows)[0]
    return np.einsum("nfc,ncf->nc", coefficients, after - before).astype(np.float32)
