"""load_dataset: from a job spec's dataset URI to a checked, in-memory Dataset (a sharded one too, when it fits)."""
from collections.abc import Callable
from pathlib import Path

from core.settings import Settings
from workers.data.builtin import load_builtin
from workers.data.dataset import Dataset
from workers.data.formats import read_dataset_file
from workers.data.streaming import is_sharded, open_sharded
from workers.data.uris import fetch
from workers.errors import JobFailure


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
    cap = settings.max_inmemory_bytes
    if is_sharded(uri):
        source = open_sharded(uri, settings, label_column=label_column, classes=classes)
        if source.decoded_bytes > cap:
            raise JobFailure("dataset_too_large", f"{uri}: {source.rows} rows decode to {source.decoded_bytes} bytes, "
                             f"above REFINERY_MAX_INMEMORY_BYTES ({cap}); only the train method streams a sharded "
                             "training set, and validation and forget sets are held in memory: use fewer rows here")
        return source.load_all()
    path = fetch(uri, dest_dir, settings, lookup, copy)
    if path.stat().st_size > cap:
        raise JobFailure("dataset_too_large", f"{uri}: the file holds {path.stat().st_size} bytes, above "
                         f"REFINERY_MAX_INMEMORY_BYTES ({cap}); split it into Parquet or WebDataset tar shards "
                         "(README: Sharded datasets) so it can be streamed")
    return read_dataset_file(path, uri=uri, label_column=label_column, classes=classes)
