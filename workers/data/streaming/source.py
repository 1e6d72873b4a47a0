"""A sharded dataset's description: its shards (from a directory listing or a manifest.json), their row counts,
the classes, the input shape, and what it would cost to hold in memory. Local (`file://` under the data roots) or
`s3://`, both through fsspec.

manifest.json (every field but `shards` optional; paths are relative to the manifest's folder):

    {"format": "parquet" | "webdataset",
     "shards": [{"path": "part-000000.parquet", "rows": 1000, "sha256": "…"}, …],
     "classes": ["cat", "dog", …],    class names by label id (default "0".."max label")
     "label_column": "label",         Parquet: the label column (dataset.label_column wins)
     "id_column": "row_id"}           Parquet: a column that is not a feature (row ids)
"""
import json
import math
import posixpath
import re
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import fsspec
import numpy as np

from core.settings import Settings
from workers.data.dataset import MAX_CLASSES, Dataset, make_dataset
from workers.data.streaming.shards import Shard, ShardRows, bad_shard, index_shard, read_shard
from workers.data.uris import confined_local_path
from workers.errors import JobFailure

MANIFEST = "manifest.json"
SHARD_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".tar": "webdataset"}


def is_sharded(uri: str) -> bool:
    """A sharded dataset is named by its manifest.json, by a folder URI ending in "/", or by a local folder."""
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme not in ("file", "s3"):
        return False
    if uri.endswith("/") or uri.rsplit("/", 1)[-1] == MANIFEST:
        return True
    return scheme == "file" and Path(unquote(urlsplit(uri).path)).is_dir()


@dataclass(frozen=True)
class ShardedSource:
    uri: str
    format: str  # "parquet" | "webdataset"
    shards: tuple[Shard, ...]
    classes: list[str]
    input_shape: tuple[int, ...]  # one row: (features,) or (C, H, W)
    kind: str  # "tabular" | "image"
    feature_names: list[str] | None
    label_column: str | None
    id_column: str | None

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.input_shape) * 4 + 8  # float32 inputs, an int64 label

    @property
    def decoded_bytes(self) -> int:
        """What loading every row in memory costs: the in-memory path's float32 x and int64 y."""
        return self.rows * self.row_bytes

    def with_shards(self, shards: list[Shard]) -> "ShardedSource":
        return replace(self, shards=tuple(shards))

    def read(self, shard: Shard) -> ShardRows:
        return read_shard(shard, self.format, label_column=self.label_column,
                          id_column=self.id_column, num_classes=len(self.classes), input_shape=self.input_shape,
                          feature_names=self.feature_names)

    def load_all(self) -> Dataset:
        """Every row in memory, as the in-memory path trains on (for sources below REFINERY_MAX_INMEMORY_BYTES)."""
        parts = [self.read(shard) for shard in self.shards]
        x = np.concatenate([part.x for part in parts])
        y = np.concatenate([part.y for part in parts])
        return make_dataset(x, y, uri=self.uri, classes=self.classes, feature_names=self.feature_names)

    def sample(self, max_rows: int, seed: int) -> Dataset:
        """The first `max_rows` rows of the shards in a seeded order: what normalisation statistics are computed on
        and what describes the data (shape, classes) to the model and its card."""
        order = np.random.default_rng([seed, 7]).permutation(len(self.shards))
        xs, ys, have = [], [], 0
        for i in order:
            part = self.read(self.shards[i])
            take = min(len(part.y), max_rows - have)
            xs.append(part.x[:take])
            ys.append(part.y[:take])
            have += take
            if have >= max_rows:
                break
        return make_dataset(np.concatenate(xs), np.concatenate(ys), uri=self.uri, classes=self.classes,
                            feature_names=self.feature_names)


def open_sharded(uri: str, settings: Settings, *, label_column: str | None,
                 classes: list[str] | None = None) -> ShardedSource:
    """List and check a sharded dataset. Rows and labels come from the manifest when it gives them; otherwise one
    indexing pass reads each shard's row count and largest label (Parquet: metadata and the label column only).
    The first shard is read whole to learn the input shape. `classes`: the training set's, for a validation set."""
    fs, folder, manifest = _locate(uri, settings)
    fmt = manifest.get("format")
    label_column = label_column or manifest.get("label_column")
    id_column = manifest.get("id_column")
    if manifest.get("shards") is not None:
        shards = _manifest_shards(manifest["shards"], fs, folder, uri, settings)
    else:
        shards = _listed_shards(fs, folder, uri, settings)
    formats = {SHARD_SUFFIXES.get(posixpath.splitext(s.name)[1].lower()) for s in shards}
    if fmt is None:
        if len(formats) != 1 or None in formats:
            raise JobFailure("dataset_invalid", f"{uri}: shards must all be .parquet or all .tar (found "
                             f"{', '.join(sorted(s.name for s in shards)[:5])}); or set \"format\" in {MANIFEST}")
        fmt = formats.pop()
    if fmt not in ("parquet", "webdataset"):
        raise JobFailure("dataset_invalid", f"{uri}: {MANIFEST} format {fmt!r}; use \"parquet\" or \"webdataset\"")
    if fmt == "parquet" and label_column is None:
        raise JobFailure("label_column_required", f"{uri}: Parquet shards need dataset.label_column (or "
                         f"\"label_column\" in {MANIFEST}), the column holding each row's class id")
    classes = classes or manifest.get("classes")
    if classes is not None and (not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES):
        raise JobFailure("dataset_invalid", f"{uri}: {MANIFEST} \"classes\" must be a list of 2 to {MAX_CLASSES} names")
    if any(s.rows is None for s in shards) or classes is None:
        indexed = [index_shard(s, fmt, label_column) for s in shards]
        for shard, (rows, _) in zip(shards, indexed, strict=True):
            if shard.rows is not None and shard.rows != rows:
                raise bad_shard(shard, f"it holds {rows} rows, the manifest says {shard.rows}")
        shards = [replace(s, rows=rows) for s, (rows, _) in zip(shards, indexed, strict=True)]
        if classes is None:
            largest = max(label for _, label in indexed)
            if not 1 <= largest < MAX_CLASSES:
                raise JobFailure("dataset_invalid", f"{uri}: the largest label is {largest}; a classifier needs class "
                                 f"ids 0..K-1 with 2 <= K <= {MAX_CLASSES}")
            classes = [str(i) for i in range(largest + 1)]
    empty = [s for s in shards if s.rows == 0]
    if empty:
        raise bad_shard(empty[0], "it holds no rows")
    first = read_shard(shards[0], fmt, label_column=label_column, id_column=id_column,
                       num_classes=len(classes), input_shape=None, feature_names=None)
    input_shape = tuple(first.x.shape[1:])
    kind = "tabular" if len(input_shape) == 1 else "image"
    return ShardedSource(uri=uri, format=fmt, shards=tuple(shards), classes=[str(c) for c in classes],
                         input_shape=input_shape, kind=kind, feature_names=first.feature_names,
                         label_column=label_column, id_column=id_column)


def _locate(uri: str, settings: Settings) -> tuple[fsspec.AbstractFileSystem, str, dict]:
    """(filesystem, folder path, manifest or {}) for a folder or manifest URI; file:// confined to the data roots."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "file":
        path = _confined(uri, settings)
        fs = fsspec.filesystem("file")
    else:
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as exc:
            raise JobFailure("storage_unavailable", f"{uri}: this worker cannot read s3:// URIs ({exc}); install "
                             "s3fs on the workers (pip install 'refinery[s3]')", "infra_error") from None
        path = path.rstrip("/")
    if path.rsplit("/", 1)[-1] == MANIFEST:
        folder = posixpath.dirname(path)
        try:
            with fs.open(path, "rb") as f:
                manifest = json.loads(f.read(8 * 1024 * 1024))
        except FileNotFoundError:
            raise JobFailure("dataset_not_found", f"{uri}: no such manifest") from None
        except (OSError, ValueError) as exc:
            raise JobFailure("dataset_invalid", f"{uri}: not a readable JSON manifest ({exc})") from None
        if not isinstance(manifest, dict):
            raise JobFailure("dataset_invalid", f"{uri}: the manifest must be a JSON object with \"shards\"")
        return fs, folder, manifest
    try:
        if fs.exists(posixpath.join(path, MANIFEST)):
            return _locate(uri.rstrip("/") + "/" + MANIFEST, settings)
        if not fs.isdir(path):
            raise JobFailure("dataset_not_found", f"{uri}: no such folder")
    except PermissionError as exc:
        raise JobFailure("uri_forbidden", f"{uri}: access denied ({exc}); grant the workers read access") from None
    return fs, path, {}


def _confined(uri: str, settings: Settings) -> str:
    return str(confined_local_path(uri, settings, allow_folder=True))


def _shard_uri(uri: str, folder: str, fs: fsspec.AbstractFileSystem, name: str) -> str:
    if urlsplit(uri).scheme.lower() == "file":
        return "file://" + posixpath.join(folder, name)
    return fs.unstrip_protocol(posixpath.join(folder, name))


def _manifest_shards(entries, fs, folder: str, uri: str, settings: Settings) -> list[Shard]:
    if not isinstance(entries, list) or not entries:
        raise JobFailure("dataset_invalid", f"{uri}: {MANIFEST} \"shards\" must be a non-empty list")
    shards = []
    for i, entry in enumerate(entries):
        entry = {"path": entry} if isinstance(entry, str) else entry
        path = entry.get("path") if isinstance(entry, dict) else None
        rows = entry.get("rows") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
            raise JobFailure("dataset_invalid", f"{uri}: shards[{i}].path must be a relative path inside the "
                             "manifest's folder")
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
            raise JobFailure("dataset_invalid", f"{uri}: shards[{i}].rows must be a row count")
        shard_uri = _shard_uri(uri, folder, fs, path)
        if shard_uri.startswith("file://"):
            _confined(shard_uri, settings)  # a symlinked shard may not lead outside the data roots
        sha256 = entry.get("sha256") if isinstance(entry, dict) else None
        if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256)):
            raise JobFailure("dataset_invalid", f"{uri}: shards[{i}].sha256 must be 64 hex digits")
        shards.append(Shard(index=i, name=path, uri=shard_uri, rows=rows, sha256=sha256))
    return shards


def _listed_shards(fs, folder: str, uri: str, settings: Settings) -> list[Shard]:
    names = sorted(posixpath.basename(p) for p in fs.ls(folder, detail=False)
                   if posixpath.splitext(p)[1].lower() in SHARD_SUFFIXES)
    if not names:
        raise JobFailure("dataset_unreadable", f"{uri}: the folder holds no .parquet or .tar shards and no {MANIFEST}, "
                         "so it is not a sharded dataset; pack an image folder (one folder per class) as .zip or .tar")
    shards = []
    for i, name in enumerate(names):
        shard_uri = _shard_uri(uri, folder, fs, name)
        if shard_uri.startswith("file://"):
            _confined(shard_uri, settings)
        shards.append(Shard(index=i, name=name, uri=shard_uri, rows=None, sha256=None))
    return shards
