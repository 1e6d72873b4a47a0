"""The in-memory dataset a job trains on, the checks every loaded dataset passes, and the validation split."""
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from sklearn.model_selection import train_test_split

from workers.errors import JobFailure

# A training set smaller than this cannot be split into train and validation data and still mean anything.
MIN_TRAINING_ROWS = 10
# Label ids define the class list (0..max(y)); a stray huge id would otherwise make a list of a billion names.
MAX_CLASSES = 100_000


@dataclass(eq=False)  # identity equality: comparing arrays element-wise has no single truth value
class Dataset:
    x: np.ndarray  # float32; images [N, C, H, W], tabular [N, F]
    y: np.ndarray  # int64 [N], values in 0..len(classes)-1
    classes: list[str]  # class names; index = label id
    kind: Literal["image", "tabular"]
    feature_names: list[str] | None  # tabular column names, without the label column
    uri: str

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> "Dataset":
        """The rows `idx` (indices or a boolean mask), with the same classes and feature names."""
        return replace(self, x=self.x[idx], y=self.y[idx])


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    *,
    uri: str,
    classes: list[str] | None,
    feature_names: list[str] | None = None,
    class_names: list[str] | None = None,
) -> Dataset:
    """Check arrays read from a user's file and shape them into a Dataset.

    `classes` is the training set's class list when this is a validation or forget set: its labels must fall inside
    it, and it may hold a single class and few rows. Without it the labels define the classes: `class_names` when the
    file names them (string labels, class folders), else "0".."max(y)".
    """
    x = _checked_features(np.asarray(x), uri)
    y = _checked_labels(np.asarray(y), uri)
    if len(x) != len(y):
        raise JobFailure("dataset_invalid", f"{uri}: x has {len(x)} rows but y has {len(y)}; they must match")
    if classes is None:
        classes = class_names or [str(i) for i in range(int(y.max()) + 1)]
        _check_trainable(y, uri)
    elif y.max() >= len(classes):
        raise JobFailure(
            "labels_out_of_range",
            f"{uri}: label {int(y.max())} is outside the training set's {len(classes)} classes "
            f"(0..{len(classes) - 1}); use the same label ids as the training data",
        )
    kind: Literal["image", "tabular"] = "tabular" if x.ndim == 2 else "image"
    if x.ndim == 3:
        x = x[:, None]  # [N, H, W] is single-channel images: add C=1
    if kind == "tabular" and feature_names is not None and len(feature_names) != x.shape[1]:
        raise ValueError(f"{len(feature_names)} feature names for {x.shape[1]} features")
    return Dataset(x=x, y=y, classes=list(classes), kind=kind, feature_names=feature_names, uri=uri)


def _checked_features(x: np.ndarray, uri: str) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_):
        raise JobFailure("dataset_invalid", f"{uri}: x has dtype {x.dtype}; save it as a float array")
    if x.ndim not in (2, 3, 4):
        raise JobFailure(
            "dataset_invalid",
            f"{uri}: x has shape {list(x.shape)}; expected [N, features] (tabular), [N, H, W] or [N, C, H, W] (images)",
        )
    if len(x) == 0:
        raise JobFailure("dataset_invalid", f"{uri}: the dataset has no rows")
    x = x.astype(np.float32, copy=False)
    bad_rows = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad_rows.any():
        first = int(np.flatnonzero(bad_rows)[0])
        raise JobFailure(
            "dataset_invalid",
            f"{uri}: {int(bad_rows.sum())} rows of x hold NaN or infinite values (first: row {first}) "
            "after conversion to float32; drop or impute them",
        )
    return x


def _checked_labels(y: np.ndarray, uri: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        raise JobFailure(
            "labels_invalid",
            f"{uri}: y has shape {list(y.shape)}; it must be one class index per row (for one-hot labels save y.argmax(1))",
        )
    if y.ndim != 1:
        raise JobFailure("labels_invalid", f"{uri}: y has shape {list(y.shape)}; it must be one class index per row")
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.equal(np.round(y), y).all():
            raise JobFailure("labels_invalid", f"{uri}: y holds non-integer values; labels must be class indices 0, 1, …")
    elif not np.issubdtype(y.dtype, np.integer):
        raise JobFailure("labels_invalid", f"{uri}: y has dtype {y.dtype}; labels must be integer class indices")
    if len(y) and y.min() < 0:
        raise JobFailure("labels_invalid", f"{uri}: y holds negative labels ({int(y.min())}); labels must be 0, 1, …")
    if len(y) and y.max() >= MAX_CLASSES:
        raise JobFailure(
            "labels_invalid",
            f"{uri}: y holds label {int(y.max())}; labels must be class indices 0..K-1 with K at most {MAX_CLASSES}",
        )
    return y.astype(np.int64)


def _check_trainable(y: np.ndarray, uri: str) -> None:
    if len(y) < MIN_TRAINING_ROWS:
        raise JobFailure(
            "dataset_invalid", f"{uri}: {len(y)} rows is too few to train on; provide at least {MIN_TRAINING_ROWS}"
        )
    if len(np.unique(y)) < 2:
        raise JobFailure("dataset_invalid", f"{uri}: every row has label {int(y[0])}; a classifier needs 2+ classes")


def split_validation(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out `fraction` of the rows as validation data, stratified by class when every class has 2+ rows."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rows = np.arange(len(ds))
    counts = np.bincount(ds.y)
    n_val = int(np.ceil(fraction * len(ds)))
    n_present = int((counts > 0).sum())
    # Stratifying needs two rows of each class and room for every class on both sides of the split.
    stratify = ds.y if counts[counts > 0].min() >= 2 and min(n_val, len(ds) - n_val) >= n_present else None
    train_rows, val_rows = train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    return ds.subset(np.sort(train_rows)), ds.subset(np.sort(val_rows))
