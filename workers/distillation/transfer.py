"""Unlabeled transfer data (`transfer: {"uri": …}`): inputs the teacher labels softly for the student. Labelled files
are accepted and their labels ignored; .npz / .safetensors files may hold `x` alone."""
import zipfile

import numpy as np
from safetensors import SafetensorError, safe_open

from core.spec import DatasetRef
from workers.data import Dataset
from workers.data.formats import _check_npz_arrays, detect_format
from workers.errors import JobFailure
from workers.inputs import _fetch, _load
from workers.runtime import JobRun

# Codes the dataset loader raises when labels are missing or unusable: an unlabeled file then gets read for x alone.
LABEL_PROBLEMS = ("dataset_invalid", "labels_invalid", "labels_out_of_range")


def load_transfer_inputs(run: JobRun, ref: DatasetRef, train: Dataset) -> np.ndarray:
    """The transfer rows' inputs as float32 [N, *train input shape]."""
    try:
        x = _load(run, ref.uri, ref.label_column, classes=train.classes).x
    except JobFailure as failure:
        if failure.code not in LABEL_PROBLEMS or ref.uri.startswith("builtin://"):
            raise _named(failure) from None
        x = _read_inputs_only(run, ref.uri, failure)
    if x.ndim == 3 and train.x.ndim == 4:
        x = x[:, None]  # [N, H, W] is single-channel images, as for the dataset
    if x.shape[1:] != train.x.shape[1:]:
        raise JobFailure("transfer_mismatch", f"transfer: inputs shaped {list(x.shape[1:])}, the dataset's "
                                              f"{list(train.x.shape[1:])}; they must match.")
    return x


def _read_inputs_only(run: JobRun, uri: str, label_failure: JobFailure) -> np.ndarray:
    path = _fetch(run, uri)
    fmt = detect_format(path, uri)
    if fmt == "npz":
        with zipfile.ZipFile(path) as archive:
            _check_npz_arrays(archive, uri)  # declared shapes against stored bytes, before anything is allocated
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays.files:
                raise _named(label_failure)
            x = arrays["x"]
    elif fmt == "safetensors":
        try:
            with safe_open(str(path), framework="np") as tensors:
                if "x" not in tensors.keys():  # noqa: SIM118 (safe_open is no mapping)
                    raise _named(label_failure)
                x = tensors.get_tensor("x")
        except (SafetensorError, OSError, ValueError) as error:
            raise JobFailure("dataset_unreadable", f"transfer: {uri} is not a readable .safetensors file "
                                                   f"({error})") from None
    else:
        raise _named(label_failure)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)) or x.ndim not in (2, 3, 4):
        raise JobFailure("dataset_invalid", f"transfer: x has dtype {x.dtype} and shape {list(x.shape)}; save a "
                                            "float array shaped like the dataset's inputs.")
    x = x.astype(np.float32)
    if len(x) == 0 or not np.isfinite(x).all():
        raise JobFailure("dataset_invalid", "transfer: x is empty or holds NaN or infinite values.")
    return x


def _named(failure: JobFailure) -> JobFailure:
    return JobFailure(failure.code, f"transfer: {failure.message}", failure.error_class)
