"""dmm's attribution as a service: the datamodel is fitted once per trained model (and its training data) and stored
as an artifact of the job that fitted it, `attribution-<key>.safetensors`, where key hashes the model's weights, the
training rows and the number of subset models. Later dmm jobs in the same project find it by that name in the ledger
and only fine-tune: each deletion request after the first is cheap. It holds the class model's coefficients and
TRAK's whitened gradient features and the margin model fitted with them (datamodel.py, trak.py)."""
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from db.repositories.artifacts import newest_project_artifact
from db.session import transaction
from workers.data import Dataset
from workers.runtime import JobRun
from workers.unlearning import datamodel, trak
from workers.unlearning.ensemble import Order, Shared, train_many
from workers.unlearning.oracles import seed_for

FORMAT = "refinery-datamodel-5"


@dataclass(frozen=True)
class Size:
    """How much attribution to fit: `models` subset models, of which the first `feature_models` that keep every class
    give TRAK features of `width` in `dtype` (dmm's attribution_models / trak_models / trak_width / trak_dtype,
    "auto" resolved by trak.feature_dtype)."""
    models: int
    width: int = trak.DIM
    feature_models: int = trak.MODELS
    dtype: str = "float32"


@dataclass
class Fitted:
    coefficients: np.ndarray  # [N, 3 + C], see datamodel.fit: deletions that remove a class
    whitened: np.ndarray  # [feature models, N, width] float32 or float16, see trak.gradient_features
    q: np.ndarray  # [N], 1 − p(correct) averaged over those models
    size: np.ndarray  # [N], see datamodel.fit_rows: deletions that keep every class
    own: np.ndarray  # [N]
    kappa: float
    pairwise_scale: float

    def predicted_shift(self, labels: np.ndarray, forget: np.ndarray, num_classes: int) -> np.ndarray:
        """What a retrain without `forget` would change in every training row's logits: [N, C]. The margin models'
        change goes onto each row's own-class logit, which moves its margin by as much."""
        if datamodel.drops_a_class(~forget[None], labels)[0]:
            margin = datamodel.predicted_class_margin_shift(self.coefficients, labels, forget)
        else:
            pairwise = self.pairwise_scale * trak.removal_effect(self.whitened, self.q, forget[None])[0]
            margin = datamodel.predicted_margin_shift(self.size, self.own, self.kappa, labels, forget, pairwise)
        shift = np.zeros((len(labels), num_classes), dtype=np.float32)
        shift[np.arange(len(labels)), labels] = margin
        return shift


@dataclass
class Attribution:
    fitted: Fitted
    key: str
    artifact: str  # its name
    source_job: str  # the job that fitted it
    seconds: float  # what fitting it cost, once
    models: int
    reused: bool


def weights_sha256(model: torch.nn.Module) -> str:
    """A hash of the weights themselves (names, dtypes, shapes, bytes), whatever file they were read from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_sha256(train: Dataset) -> str:
    return hashlib.sha256(np.ascontiguousarray(train.x, dtype=np.float32).tobytes()
                          + train.y.astype("<i8").tobytes()).hexdigest()


def attribution_key(model_sha: str, train_sha: str, size: Size) -> str:
    text = f"{FORMAT}:{model_sha}:{train_sha}:{size.models}:{size.width}:{size.feature_models}:{size.dtype}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def get_attribution(run: JobRun, model: torch.nn.Module, shared: Shared, size: Size,
                    watch: Callable[[int], None]) -> Attribution:
    """The cached datamodel for this model and data, or a new one (then stored for the next request)."""
    key = attribution_key(weights_sha256(model), data_sha256(shared.train), size)
    name = f"attribution-{key}.safetensors"
    found = _find(run, name)
    if found is not None:
        job_id, storage_key = found
        path = run.workdir / name
        run.store.copy_to(storage_key, str(path))
        with safe_open(str(path), framework="np") as stored:
            meta = stored.metadata()
            fitted = Fitted(stored.get_tensor("coefficients"), stored.get_tensor("trak_whitened"),
                            stored.get_tensor("trak_q"), stored.get_tensor("size"), stored.get_tensor("own"),
                            float(meta["kappa"]), float(meta["pairwise_scale"]))
        if meta.get("key") == key and fitted.coefficients.shape[0] == len(shared.train):
            return Attribution(fitted, key, name, job_id, float(meta.get("seconds", 0)), size.models, True)
    fitted, seconds = fit_attribution(shared, size, watch)
    _store(run, run.workdir / name, fitted, key, size, seconds)
    return Attribution(fitted, key, name, run.job_id, seconds, size.models, False)


def fit_attribution(shared: Shared, size: Size | int, watch: Callable[[int], None]) -> tuple[Fitted, float]:
    """Train `size.models` subset models in helper processes (the first `size.feature_models` that keep every class
    also give gradient features) and fit both datamodels; returns (fitted, seconds)."""
    size = Size(size) if isinstance(size, int) else size
    started = time.perf_counter()
    labels = shared.train.y
    masks = datamodel.subset_masks(labels, size.models, seed=0)
    every_class = ~datamodel.drops_a_class(masks, labels)
    with_features = np.flatnonzero(every_class)[:size.feature_models]
    orders = [Order("subset", seed_for("subset", 0, m), masks[m], size.width if m in with_features else 0,
                    size.dtype) for m in range(size.models)]
    trained = train_many(orders, replace(shared, algorithm=None), watch)
    logits = np.stack([t.train_logits for t in trained])
    coefficients = datamodel.fit(masks, labels, logits)
    whitened = np.stack([trained[m].gradient_features[0] for m in with_features])
    q = np.mean([trained[m].gradient_features[1] for m in with_features], axis=0)
    effects = trak.removal_effect(whitened, q, ~masks[every_class])
    size, own, kappa, scale = datamodel.fit_rows(masks[every_class], labels, logits[every_class],
                                                 trak.self_influence(whitened, q), q, effects)
    fitted = Fitted(coefficients, whitened, q.astype(np.float32), size, own, kappa, scale)
    return fitted, time.perf_counter() - started


def _find(run: JobRun, name: str) -> tuple[str, str] | None:
    """(job id, storage key) of the newest artifact with this name in the caller's project, whatever the job's
    status: the artifact is written only once complete, so a job that failed later still leaves a good one."""
    with transaction(run.settings.database_url, readonly=True) as session:
        row = newest_project_artifact(session, run.project_id, name)
        return (row.job_id, row.storage_key) if row else None


def _store(run: JobRun, path: Path, fitted: Fitted, key: str, size: Size, seconds: float) -> None:
    tensors = {"coefficients": fitted.coefficients, "trak_whitened": fitted.whitened, "trak_q": fitted.q,
               "size": fitted.size, "own": fitted.own}
    save_file({name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in tensors.items()}, str(path),
              metadata={"format": FORMAT, "key": key, "models": str(size.models), "trak_width": str(size.width),
                        "trak_models": str(size.feature_models), "trak_dtype": size.dtype, "seconds": f"{seconds:.3f}",
                        "fitted_by": run.job_id, "features": "share,share_squared,row_kept,class_absent",
                        "kappa": repr(fitted.kappa), "pairwise_scale": repr(fitted.pairwise_scale)})
    run.add_artifact(path)
