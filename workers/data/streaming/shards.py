"""Reading one shard: a Parquet table (numeric feature columns, an integer label column, optionally a row-id column)
or a WebDataset tar (samples `<key>.npy` or `<key>.png` with `<key>.cls`), read whole into memory, checked, and
returned as float32 rows. Anything wrong with a shard is a `bad_shard` failure that names it."""
import hashlib
import io
import posixpath
import tarfile
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from workers.errors import JobFailure


@dataclass(frozen=True)
class Shard:
    index: int  # position in the dataset's shard list
    name: str  # path relative to the dataset folder, what errors and reports call it
    uri: str
    rows: int | None  # None until indexed
    sha256: str | None = None


@dataclass
class ShardRows:
    x: np.ndarray  # float32 [n, *input_shape]
    y: np.ndarray  # int64 [n]
    ids: list[str]  # one id per row: the id column, the sample key, or "<shard>:<row>"
    feature_names: list[str] | None


def bad_shard(shard: Shard, problem: str) -> JobFailure:
    return JobFailure("bad_shard", f"shard {shard.name} ({shard.uri}): {problem}; fix or remove that shard")


def read_bytes(shard: Shard) -> bytes:
    try:
        with fsspec.open(shard.uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise bad_shard(shard, "the file is missing") from None
    except PermissionError as exc:
        raise bad_shard(shard, f"access denied ({exc})") from None
    except OSError as exc:
        raise bad_shard(shard, f"it could not be read ({exc})") from None
    if shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256.lower():
        raise bad_shard(shard, "its sha256 differs from the manifest's (a changed or damaged file)")
    return data


def read_shard(shard: Shard, fmt: str, *, label_column: str | None, id_column: str | None,
               num_classes: int, input_shape: tuple[int, ...] | None,
               feature_names: list[str] | None) -> ShardRows:
    """All rows of `shard`, checked against what the dataset expects: `input_shape` and `feature_names` as the first
    shard had them (None while reading the first), labels below `num_classes`, the manifest's row count."""
    data = read_bytes(shard)
    if fmt == "parquet":
        rows = _parquet_rows(shard, data, label_column, id_column, feature_names)
    else:
        rows = _tar_rows(shard, data)
    if shard.rows is not None and len(rows.y) != shard.rows:
        raise bad_shard(shard, f"it holds {len(rows.y)} rows, the manifest says {shard.rows}")
    if input_shape is not None and tuple(rows.x.shape[1:]) != tuple(input_shape):
        raise bad_shard(shard, f"its rows have shape {list(rows.x.shape[1:])}, the dataset's {list(input_shape)}")
    if len(rows.y) and (rows.y.min() < 0 or rows.y.max() >= num_classes):
        bad = int(rows.y.max() if rows.y.max() >= num_classes else rows.y.min())
        raise bad_shard(shard, f"label {bad} is outside the dataset's {num_classes} classes (0..{num_classes - 1})")
    finite = np.isfinite(rows.x.reshape(len(rows.x), -1)).all(axis=1)
    if not finite.all():
        raise bad_shard(shard, f"row {int(np.flatnonzero(~finite)[0])} holds NaN or infinite values")
    return rows


def index_shard(shard: Shard, fmt: str, label_column: str | None) -> tuple[int, int]:
    """(rows, largest label) without decoding the inputs: Parquet reads its footer and the label column only."""
    if fmt == "parquet":
        try:
            with fsspec.open(shard.uri, "rb") as f:
                table = pq.ParquetFile(f).read(columns=[label_column])
        except FileNotFoundError:
            raise bad_shard(shard, "the file is missing") from None
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            raise bad_shard(shard, f"not a readable Parquet file with column {label_column!r} ({exc})") from None
        labels = _labels(shard, table.column(label_column), label_column)
    else:
        labels = np.array([_cls(shard, key, raw) for key, _, raw in _tar_members(shard, read_bytes(shard), ".cls")],
                          dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise bad_shard(shard, f"label {int(labels.min())} is negative; labels are class ids 0, 1, …")
    return len(labels), int(labels.max()) if len(labels) else -1


def _parquet_rows(shard: Shard, data: bytes, label_column: str | None, id_column: str | None,
                  expected_features: list[str] | None) -> ShardRows:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise bad_shard(shard, f"not a readable Parquet file ({exc})") from None
    if label_column not in table.column_names:
        raise bad_shard(shard, f"no label column {label_column!r} (columns: {', '.join(table.column_names[:20])})")
    features = [name for name in table.column_names if name not in (label_column, id_column)]
    if expected_features is not None and features != expected_features:
        raise bad_shard(shard, f"its feature columns {features[:10]} differ from the first shard's "
                        f"{expected_features[:10]}")
    for name in features:
        kind = table.schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise bad_shard(shard, f"feature column {name!r} is {kind}, not numeric")
    if not features:
        raise bad_shard(shard, f"no feature columns besides {label_column!r}")
    x = np.column_stack([table.column(name).cast(pa.float32()).to_numpy(zero_copy_only=False) for name in features])
    y = _labels(shard, table.column(label_column), label_column)
    if id_column is not None and id_column in table.column_names:
        ids = [str(v) for v in table.column(id_column).to_pylist()]
    else:
        ids = [f"{shard.name}:{row}" for row in range(len(y))]
    return ShardRows(x=x.astype(np.float32, copy=False), y=y, ids=ids, feature_names=features)


def _labels(shard: Shard, column: pa.ChunkedArray, label_column: str) -> np.ndarray:
    if column.null_count:
        raise bad_shard(shard, f"column {label_column!r} has empty labels")
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise bad_shard(shard, f"column {label_column!r} is {column.type}; sharded datasets need integer class ids "
                        "(name the classes in manifest.json \"classes\")")
    values = column.to_numpy(zero_copy_only=False)
    if not np.equal(np.round(values), values).all():
        raise bad_shard(shard, f"column {label_column!r} holds fractional numbers, not class ids")
    return values.astype(np.int64)


def _tar_members(shard: Shard, data: bytes, *suffixes: str):
    """(sample key, member bytes) for the regular members whose extension is one of `suffixes`, in tar order. The
    key is the member's path up to the first dot of its file name, as WebDataset groups a sample's files."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = posixpath.split(member.name)
                base, dot, ext = name.partition(".")
                if dot and f".{ext.lower()}" in suffixes:
                    yield posixpath.join(folder, base), f".{ext.lower()}", tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise bad_shard(shard, f"not a readable tar file ({exc})") from None


def _cls(shard: Shard, key: str, raw: bytes) -> int:
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise bad_shard(shard, f"sample {key}: {key}.cls must hold an integer class id, not {raw[:20]!r}") from None


def _tar_rows(shard: Shard, data: bytes) -> ShardRows:
    inputs: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    for key, ext, raw in _tar_members(shard, data, ".npy", ".png", ".cls"):
        if ext == ".cls":
            labels[key] = _cls(shard, key, raw)
        else:
            if key in inputs:
                raise bad_shard(shard, f"sample {key} has both a .npy and a .png input; keep one")
            inputs[key] = _npy(shard, key, raw) if ext == ".npy" else _png(shard, key, raw)
    if not inputs:
        raise bad_shard(shard, "no <key>.npy or <key>.png samples in the tar")
    missing = [key for key in inputs if key not in labels]
    if missing:
        raise bad_shard(shard, f"sample {missing[0]} has no .cls label member ({len(missing)} samples lack one)")
    orphans = [key for key in labels if key not in inputs]
    if orphans:
        raise bad_shard(shard, f"sample {orphans[0]} has a .cls label but no .npy or .png input")
    keys = list(inputs)
    shapes = {inputs[key].shape for key in keys}
    if len(shapes) > 1:
        first = inputs[keys[0]].shape
        odd = next(key for key in keys if inputs[key].shape != first)
        raise bad_shard(shard, f"sample {odd} has shape {list(inputs[odd].shape)}, sample {keys[0]} "
                        f"{list(first)}; every sample needs the same shape")
    return ShardRows(x=np.stack([inputs[key] for key in keys]), y=np.array([labels[key] for key in keys], np.int64),
                     ids=keys, feature_names=None)


def _npy(shard: Shard, key: str, raw: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)  # an object array is refused, never unpickled
    except (ValueError, OSError, EOFError) as exc:
        raise bad_shard(shard, f"sample {key}: {key}.npy is not a numeric .npy array ({exc})") from None
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or array.ndim not in (1, 2, 3):
        raise bad_shard(shard, f"sample {key}: {key}.npy has dtype {array.dtype} and shape {list(array.shape)}; "
                        "save numbers shaped [features], [H, W] or [C, H, W]")
    array = array.astype(np.float32)
    return array[None] if array.ndim == 2 else array


def _png(shard: Shard, key: str, raw: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as image:
            pixels = np.asarray(image.convert("L" if image.mode in ("1", "L", "I", "I;16") else "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise bad_shard(shard, f"sample {key}: {key}.png is not a readable PNG ({exc})") from None
    pixels = pixels.astype(np.float32) / 255.0  # grey levels 0..255 to [0, 1], like the image-folder archives
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
