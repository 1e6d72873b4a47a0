"""dmm's attribution: linear datamodels (Ilyas et al., Datamodels: Predicting Predictions from Training Data) fitted
on models trained on random subsets of the training rows, predicting how removing training rows moves each training
row's margin (the quantity KLoM compares with a retrain's). Two, one per kind of deletion:

A deletion that removes a whole class (fit): per row x, from every subset model,

    margin(x; S) ≈ a + b₁·|S|/N + b₂·(|S|/N)² + s·[x ∈ S] + Σ_c e_c·[class c absent from S]

e_c is what a retrain without class c does to x: on the class's own rows the whole drop of its logit (a retrained
model puts those rows on the classes they look like, row by row), on the others the gain of rows that class c
competed with. The square bends the size effect, which a class (10% of the rows at once) reaches.

A deletion that keeps every class (fit_rows): the row's own effect predicted from TRAK's self-influence, the class
mix of what is removed, and TRAK's pairwise effects (removing x's near neighbours lowers its margin more than
removing as many random rows does, trak.py). This is the common request.

The prediction for a forget set F is the original model's margins plus f(x; rows − F) − f(x; rows)."""
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


def class_features(masks: np.ndarray, labels: np.ndarray, rows: np.ndarray, num_classes: int) -> np.ndarray:
    """Features of training rows `rows` per subset model: [M, n, 3 + C], holding the share of rows kept and its
    square (a class deletion removes 10% at once, where the size effect bends), whether the row itself is kept, and
    which classes are absent."""
    counts = np.stack([np.bincount(labels[mask], minlength=num_classes) for mask in masks])
    absent = (counts == 0).astype(np.float64)  # [M, C]
    share = masks.mean(axis=1)
    shape = (len(masks), len(rows))
    return np.concatenate([np.broadcast_to(share[:, None, None], shape + (1,)),
                           np.broadcast_to(share[:, None, None] ** 2, shape + (1,)),
                           masks[:, rows, None].astype(np.float64),
                           np.broadcast_to(absent[:, None, :], shape + (num_classes,))], axis=-1)


CHUNK_ROWS = 1024  # rows solved at once: bounds memory at M × 1024 × (3 + C) doubles


def fit(masks: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """The class model, least squares per row on centred features: masks [M, N], logits [M, N, C] → coefficients
    [N, 3 + C] (share, share², row kept, class c absent); the intercept cancels in every prediction."""
    y, num_classes = margins(logits, labels), logits.shape[-1]
    coefficients = np.empty((masks.shape[1], 3 + num_classes), dtype=np.float32)
    for start in range(0, masks.shape[1], CHUNK_ROWS):
        rows = np.arange(start, min(start + CHUNK_ROWS, masks.shape[1]))
        coefficients[rows] = _least_squares(class_features(masks, labels, rows, num_classes), y[:, rows])
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


def predicted_class_margin_shift(coefficients: np.ndarray, labels: np.ndarray, forget: np.ndarray) -> np.ndarray:
    """The class model's margin change of every training row when `forget` goes: [N]."""
    rows, num_classes = np.arange(len(labels)), coefficients.shape[1] - 3
    after = class_features((~forget)[None], labels, rows, num_classes)[0]
    before = class_features(np.ones((1, len(labels)), dtype=bool), labels, rows, num_classes)[0]
    return np.einsum("nf,nf->n", coefficients, after - before).astype(np.float32)
