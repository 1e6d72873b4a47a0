"""load_dataset: from a job spec's dataset URI to a checked, in-memory Dataset."""
from collections.abc import Callable
from pathlib import Path

from core.settings import Settings
from workers.data.builtin import load_builtin
from workers.data.dataset import Dataset
from workers.data.formats import read_dataset_file
from workers.data.uris import fetch


def load_dataset(
    uri: str,
    *,
    label_column: str | None,
    dest_dir: Path,
    settings: Settings,
    lookup: Callable[[str], str],
    copy: Callable[[str, str], None],
    classes: list[str] | None = None,
) -> Dataset:
    """Fetch and read the dataset `uri` names. Pass the training set's `classes` when loading a validation or forget
    set: its labels are then checked against them instead of defining new ones. Raises JobFailure on bad input."""
    if uri.lower().startswith("builtin://"):
        return load_builtin(uri, classes)
    path = fetch(uri, dest_dir, settings, lookup, copy)
    return read_dataset_file(path, uri=uri, label_column=label_column, classes=classes)
