"""The data of an unlearning job: the rows the original model was trained on, the held-out test rows, and the forget
set over them — named by class, by row indices of the dataset file, or by a file of rows — with its audit trail.
A chained request (its model the output of earlier unlearn jobs) forgets the union of every request in the chain.

Test rows come from `dataset.validation.uri` when given (the whole dataset file is then training data); otherwise
from a held-out split of the dataset file, made with the same fraction and seed as the original train job's (or the
spec's own `dataset.validation` and seed), so they are rows the original model never trained on."""
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from core.spec import Forget, Validation
from workers.data import Dataset, split_validation
from workers.errors import JobFailure
from workers.inputs import _load
from workers.runtime import JobRun
from workers.unlearning.origin import Origin

DEFAULT_VALIDATION = Validation(fraction=0.1)  # train's default split
TRAINING_SET_RECIPE = ("sha256 of the training rows' inputs as float32 bytes (C order, rows in file order), then "
                       "their labels as int64 little-endian")


@dataclass
class UnlearningData:
    train: Dataset  # the rows the original model trained on, in file order
    test: Dataset  # held-out rows the original model never trained on
    forget: np.ndarray  # bool over `train`'s rows: the cumulative forget set of the chain
    forget_class: int | None
    audit: dict[str, Any]  # the cumulative forget set's
    test_source: str
    # One per request of the chain, oldest first, this job's last: its own audit and the cumulative forget mask
    # over `train` after it (what that request's job unlearned).
    requests: list[dict[str, Any]] = field(default_factory=list)
    cumulative: list[np.ndarray] = field(default_factory=list)
    training_set_sha256: str = ""
    forget_file_rows: np.ndarray | None = None  # the cumulative forget set as row numbers of the dataset file

    @property
    def retain_set(self) -> Dataset:
        return self.train.subset(~self.forget)

    @property
    def forget_set(self) -> Dataset:
        return self.train.subset(self.forget)


def training_set_sha256(train: Dataset) -> str:
    return hashlib.sha256(np.ascontiguousarray(train.x, dtype=np.float32).tobytes()
                          + train.y.astype("<i8").tobytes()).hexdigest()


def load_unlearning_data(run: JobRun, origin: Origin) -> UnlearningData:
    ref = run.spec.dataset
    data = _load(run, ref.uri, ref.label_column)
    validation, seed = _held_out_rule(run, origin)
    if validation.uri is not None:
        test = _load(run, validation.uri, ref.label_column, classes=data.classes)
        if test.x.shape[1:] != data.x.shape[1:]:
            raise JobFailure("dataset_invalid", f"validation inputs have shape {list(test.x.shape[1:])}, the training "
                             f"data {list(data.x.shape[1:])}; they must match.")
        train_rows, test_rows, source = np.arange(len(data)), None, f"dataset.validation.uri ({validation.uri})"
    else:
        train_rows, test_rows = _split_rows(data, validation.fraction, seed)
        source = f"held-out {validation.fraction:g} of the dataset file, split with seed {seed}"
    train = data.subset(train_rows)
    train_sha = training_set_sha256(train)
    _check_same_training_set(run, origin, train_sha)
    requests = [(link.job_id, link.forget, link.request_sha256) for link in origin.chain]
    requests.append((run.job_id, run.spec.forget, None))
    requested = np.zeros(len(data), dtype=bool)
    not_test = np.zeros(len(data), dtype=bool)
    audits, cumulative = [], []
    for job_id, forget, recorded in requests:
        rows = requested_rows(run, forget, data)
        audit = {"job_id": job_id, **_audit(data, rows, train_rows, forget)}
        audit.pop("hash_recipe")
        if recorded is not None and audit["sha256"] != recorded:
            raise JobFailure("chain_forget_changed", f"Job {job_id}'s forget request now names rows with sha256 "
                             f"{audit['sha256'][:16]}…, but that job recorded {recorded[:16]}…: the file behind its "
                             "forget.uri (or the dataset) changed since. Restore it, or start a new chain from the "
                             "train job with the whole forget set.")
        requested |= rows
        # Rows asked to be deleted are not used as test rows either, unless a class is forgotten: then the held-out
        # rows of that class are exactly what the forgotten class should now look like.
        if forget.class_ is None:
            not_test |= rows
        audits.append(audit)
        cumulative.append(requested[train_rows].copy())
    forget = requested[train_rows]
    if test_rows is not None:
        test = data.subset(test_rows[~not_test[test_rows]])
    _check_forget(forget, train, run.spec.forget)
    audit = _audit(data, requested, train_rows, run.spec.forget)
    classes = {f.class_ for _, f, _ in requests if f.class_ is not None}
    if len(requests) > 1:
        audit.update(named_by="chain", requests=len(requests))
        audit.pop("duplicate_indices", None)
    forget_class = classes.pop() if len(classes) == 1 else None
    return UnlearningData(train, test, forget, forget_class, audit, source, audits, cumulative, train_sha,
                          np.intersect1d(np.flatnonzero(requested), train_rows))


def _check_same_training_set(run: JobRun, origin: Origin, train_sha: str) -> None:
    """A chained request must unlearn from the training set the chain started with: its row numbers and hashes only
    mean something there."""
    if not origin.chain:
        return
    previous = origin.chain[-1]
    same = (train_sha == previous.training_set_sha256 if previous.training_set_sha256 is not None
            else run.spec.dataset.uri == previous.dataset_uri)
    if not same:
        raise JobFailure("chain_dataset_mismatch", f"The model comes from unlearn job {previous.job_id}, which "
                         f"unlearned from dataset {previous.dataset_uri!r}; this request's dataset "
                         f"{run.spec.dataset.uri!r} (with its validation rule) gives other training rows (sha256 "
                         f"{train_sha[:16]}…). A chained deletion must name the same training set: use dataset.uri "
                         f"{previous.dataset_uri!r} and the same validation as that job.")


def _held_out_rule(run: JobRun, origin: Origin) -> tuple[Validation, int]:
    """The spec's own validation and seed, else the original train job's when it used this same dataset."""
    if run.spec.dataset.validation is not None:
        return run.spec.dataset.validation, run.spec.seed
    if origin.train_job is not None and origin.dataset_uri == run.spec.dataset.uri:
        return origin.validation or DEFAULT_VALIDATION, origin.seed
    return DEFAULT_VALIDATION, run.spec.seed


def _split_rows(data: Dataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The row indices of train's own validation split: the same function on a dataset whose inputs are its row
    numbers, so the rows are exactly those a train job with this fraction and seed held out."""
    numbered = replace(data, x=np.arange(len(data))[:, None])
    train, held_out = split_validation(numbered, fraction, seed)
    return train.x[:, 0], held_out.x[:, 0]


def requested_rows(run: JobRun, forget: Forget, data: Dataset) -> np.ndarray:
    """The forget request as a boolean mask over the dataset file's rows."""
    mask = np.zeros(len(data), dtype=bool)
    if forget.class_ is not None:
        if forget.class_ >= len(data.classes):
            raise JobFailure("forget_class_unknown", f"forget.class {forget.class_} is not a class of this model and "
                             f"dataset: they have {len(data.classes)} classes (0..{len(data.classes) - 1}).")
        mask[data.y == forget.class_] = True
    elif forget.indices is not None:
        rows = np.asarray(forget.indices, dtype=np.int64)
        if rows.max() >= len(data):
            bad = rows[rows >= len(data)]
            raise JobFailure("forget_indices_out_of_range", f"forget.indices holds row {int(bad[0])}"
                             + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                             + f", but the dataset has {len(data)} rows (0..{len(data) - 1}).")
        mask[rows] = True
    else:
        mask = _rows_of_file(run, forget.uri, data)
    return mask


def _rows_of_file(run: JobRun, uri: str, data: Dataset) -> np.ndarray:
    """Rows of `data` equal (inputs and label) to the rows of the file at `uri`; every copy of a row is forgotten."""
    subset = _load(run, uri, run.spec.dataset.label_column, classes=data.classes)
    if subset.x.shape[1:] != data.x.shape[1:]:
        raise JobFailure("forget_set_invalid", f"forget.uri rows have shape {list(subset.x.shape[1:])}; the dataset's "
                         f"are {list(data.x.shape[1:])}.")
    where: dict[bytes, list[int]] = {}
    for row in range(len(data)):
        where.setdefault(_row_key(data, row), []).append(row)
    mask = np.zeros(len(data), dtype=bool)
    missing = []
    for row in range(len(subset)):
        found = where.get(_row_key(subset, row))
        if found is None:
            missing.append(row)
        else:
            mask[found] = True
    if missing:
        raise JobFailure("forget_rows_not_in_dataset", f"{len(missing)} of the {len(subset)} rows in forget.uri are "
                         f"not rows of the dataset (first: row {missing[0]}); a forget file must hold rows of the "
                         "dataset file exactly (same inputs and label).")
    return mask


def _row_key(data: Dataset, row: int) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(data.x[row], dtype=np.float32).tobytes()
                          + int(data.y[row]).to_bytes(8, "little")).digest()


def _check_forget(forget: np.ndarray, train: Dataset, request: Forget) -> None:
    if not forget.any():
        what = (f"class {request.class_} has no training rows" if request.class_ is not None
                else "none of the requested rows is a training row (all are in the held-out split)")
        raise JobFailure("forget_set_empty", f"The forget set is empty: {what}; there is nothing to unlearn.")
    if forget.all():
        raise JobFailure("forget_set_is_everything", "The forget set holds every training row, so nothing would be "
                         "left to retain; to drop the model, delete it instead.")
    if len(np.unique(train.y[~forget])) < 2:
        raise JobFailure("retain_set_one_class", "The retain set would hold a single class; a classifier needs two.")


def _audit(data: Dataset, requested: np.ndarray, train_rows: np.ndarray, request: Forget) -> dict[str, Any]:
    """What a deletion request's audit trail needs: which rows left the training data, and hashes anyone holding the
    dataset file can recompute."""
    rows = np.intersect1d(np.flatnonzero(requested), train_rows)
    content = hashlib.sha256()
    for row in rows:
        content.update(np.ascontiguousarray(data.x[row], dtype=np.float32).tobytes())
        content.update(int(data.y[row]).to_bytes(8, "little"))
    named_by = "class" if request.class_ is not None else "indices" if request.indices is not None else "uri"
    audit = {"named_by": named_by, "size": len(rows), "requested_rows": int(requested.sum()),
             "held_out_rows": int(requested.sum()) - len(rows),
             "sha256": content.hexdigest(), "rows_sha256": hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest(),
             "hash_recipe": "sha256: each forgotten row's inputs as float32 bytes, then its label as int64 "
                            "little-endian, rows in file order; rows_sha256: their file row numbers as int64 "
                            "little-endian"}
    if request.indices is not None:
        audit["duplicate_indices"] = len(request.indices) - int(requested.sum())
    return audit
