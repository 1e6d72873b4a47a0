"""dmm's pairwise term: TRAK (Park et al., TRAK: Attributing Model Behavior at Scale) estimates how removing particular
training rows moves another row's margin, which the margin datamodel's per-row terms (datamodel.py) cannot see:
removing a row's near neighbours lowers its margin more than removing as many random rows does.

Per model m: Φ_m [N, k] holds randomly projected gradients of every training row's margin; TRAK's attribution of
row x to row i is φ_m(x)ᵀ (Φ_mᵀΦ_m + λI)⁻¹ φ_m(i) · q_i, q_i = 1 − p(correct | i), averaged over models. It is stored
whitened, W_m = Φ_m L_m⁻ᵀ with L_m L_mᵀ = Φ_mᵀΦ_m + λI, so the attribution is mean_m W_m(x)·W_m(i) · q_i without an
N × N matrix. The same features give each row's self-influence (its attribution to itself), which predicts how much
a retrain without the row lowers its own margin (datamodel.fit_rows).

Storage: W is kept in float32, or in float16 when float32 would pass FLOAT16_ABOVE_BYTES (dmm's trak_dtype "auto"; 2
bytes × models × N × width: 16 models × 50,000 rows × 256 = 410 MB, × 128 = 205 MB), and widened one model at a time
when used, so the working set is one model's [N, width]. float16 is not the default for small sets: on digits it moved
the K = 32 test-set KLoM95 of the tests' request by 0.08 (3.21 → 3.29), as much as some targets' margins. The
projection is one Gaussian block per parameter tensor, and per-row gradients are taken in chunks sized to the model
(at most ~16 M floats of gradients at once), so a convnet's features fit where an MLP's did."""

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from workers.data import Dataset

# Projection width, how many subset models give features, and the ridge λ relative to the mean squared norm of a
# row's projected gradient. On digits (1397 rows, 16 models) the correlation of TRAK's removal effect with what a
# retrain moves on retained rows beyond the size effect (measured against 32 seed-paired retrains) was 0.78 at width
# 128 with a vanishing ridge, 0.83 at widths 256-1024 with λ = 1, and lower at λ = 0.3 (0.81) or 3 (0.80); without a
# ridge, widths near N interpolate and the attributions get noisy (0.52 at 512). λ = 1 damps that instead.
DIM = 256
MODELS = 16
RIDGE = 1.0


GRADIENT_FLOATS = 1 << 24  # per-row gradients held at once: rows per chunk = this ÷ parameters (16 to 1024)
FLOAT16_ABOVE_BYTES = 256 * 2**20


def feature_dtype(choice: str, rows: int, width: int, models: int) -> str:
    """dmm's trak_dtype: "float32", "float16", or "auto" (float16 when float32 features would pass 256 MiB)."""
    if choice != "auto":
        return choice
    return "float16" if 4 * rows * width * models > FLOAT16_ABOVE_BYTES else "float32"


def gradient_features(model: torch.nn.Module, rows: Dataset, dim: int, seed: int,
                      dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """(W [N, dim] whitened projected margin gradients in `dtype`, q [N] = 1 − p(correct)) of one trained model."""
    model = model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.from_numpy(rows.x).float()
    onehot = torch.nn.functional.one_hot(torch.from_numpy(rows.y).long(), len(rows.classes)).float()

    def margin(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        z = functional_call(model, (p, buffers), (xi[None],))[0]
        return (z * yi).sum() - torch.logsumexp(z.masked_fill(yi > 0, -torch.inf), 0)

    generator = torch.Generator().manual_seed(seed)
    # One Gaussian projection block per parameter tensor: together a [parameters, dim] projection.
    blocks = {name: torch.randn(p.numel(), dim, generator=generator) / dim ** 0.5 for name, p in params.items()}
    projected = torch.zeros(len(x), dim, dtype=torch.float64)
    chunk = max(16, min(1024, GRADIENT_FLOATS // sum(p.numel() for p in params.values())))
    for start in range(0, len(x), chunk):
        grads = vmap(grad(margin), in_dims=(None, 0, 0))(params, x[start:start + chunk], onehot[start:start + chunk])
        for name, g in grads.items():
            projected[start:start + len(g)] += (g.reshape(len(g), -1) @ blocks[name]).double()
    gram = projected.T @ projected
    gram += RIDGE * projected.square().sum(1).mean() * torch.eye(dim, dtype=torch.float64)
    lower = torch.linalg.cholesky(gram)
    whitened = torch.linalg.solve_triangular(lower, projected.T, upper=False).T
    with torch.no_grad():
        p_correct = (torch.softmax(model(x), 1) * onehot).sum(1)
    return whitened.to(getattr(torch, dtype)).numpy(), (1 - p_correct).double().numpy()


def _widened(whitened: np.ndarray):
    """Each model's W [N, k] in float32, one at a time."""
    for features in whitened:
        yield features.astype(np.float32)


def self_influence(whitened: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Each row's attribution to itself, mean_m |W_m(x)|² · q_x: [N]."""
    total = sum(np.einsum("nk,nk->n", w, w, dtype=np.float64) for w in _widened(whitened))
    return total / len(whitened) * q


def removal_effect(whitened: np.ndarray, q: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """TRAK's margin change of every row when the rows in each mask of `removed` [R, N] are removed, less what
    removing as many random rows would do (that part is the margin datamodel's size effect), and without a row's effect
    on itself (the datamodel's own-row term): [R, N]. whitened [M, N, k], q [N]."""
    removed = removed.astype(np.float64)
    self_term = self_influence(whitened, q)
    row_total = np.zeros(removed.shape[1])
    effect = np.zeros(removed.shape)
    for w in _widened(whitened):
        w = w.astype(np.float64)
        row_total += w @ (q @ w)
        effect += ((removed * q) @ w) @ w.T
    row_total = row_total / len(whitened) - self_term
    effect = effect / len(whitened) - removed * self_term
    others_removed = removed.sum(1, keepdims=True) - removed
    return -(effect - others_removed / (removed.shape[1] - 1) * row_total)
