"""Reading a local dataset file: the format from its extension (or its first bytes when it has none, as uploads do),
then .npz / .safetensors arrays, .csv / .parquet tables, or an image-folder archive. Pickle is never loaded."""
import codecs
import json
import math
import struct
import zipfile
from pathlib import Path

import numpy as np
import numpy.lib.format as npy_format
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from safetensors import SafetensorError, safe_open

from workers.data import archives
from workers.data.archives import check_zip_size, load_image_archive
from workers.data.dataset import Dataset, make_dataset
from workers.errors import JobFailure

SUFFIX_FORMATS = {
    ".npz": "npz",
    ".safetensors": "safetensors",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".zip": "zip",
    ".tar": "tar",
    ".tgz": "tar",
    ".tar.gz": "tar",
}
# Loading any of these runs arbitrary code from the file (pickle), so they are refused by name, unopened.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt")
SUPPORTED = ".npz, .safetensors, .csv, .parquet, or an image-folder .zip / .tar / .tar.gz"


def detect_format(path: Path, uri: str) -> str:
    """One of SUFFIX_FORMATS' values; raises unsafe_format for pickles, dataset_unreadable for anything else."""
    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise _unsafe(uri)
    for suffix, fmt in SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    if path.suffix and path.suffix.lower() not in (".bin", ".dat", ".data"):
        raise JobFailure("dataset_unreadable", f"{uri}: unsupported file type {path.suffix!r}; use {SUPPORTED}")
    return sniff_format(path, uri)


def _unsafe(uri: str) -> JobFailure:
    return JobFailure("unsafe_format", f"{uri}: pickle files are refused; save as .npz or .safetensors")


def sniff_format(path: Path, uri: str) -> str:
    """Recognise a file without an extension by its magic bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path, uri)
    if head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"PAR1"):
        return "parquet"
    if _looks_like_safetensors(head, path.stat().st_size):
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _unsafe(uri)
    if _looks_like_text(head):
        return "csv"
    raise JobFailure("dataset_unreadable", f"{uri}: unrecognised file format; use {SUPPORTED}")


def _looks_like_text(head: bytes) -> bool:
    try:
        # Incremental: the 512-byte head may end in the middle of a multi-byte character.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # safetensors: an 8-byte little-endian header length, then that many bytes of JSON starting with "{".
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return 2 <= header_length <= size - 8 and head[8:9] == b"{"


def _sniff_zip(path: Path, uri: str) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as exc:
        raise JobFailure("dataset_unreadable", f"{uri}: a damaged zip file ({exc})") from None
    if any(name.endswith(".pkl") for name in names):  # torch.save's zip format keeps its pickle in data.pkl
        raise _unsafe(uri)
    return "npz" if names and all(name.endswith(".npy") for name in names) else "zip"


def read_dataset_file(path: Path, *, uri: str, label_column: str | None, classes: list[str] | None) -> Dataset:
    """Read and check the dataset in `path`; `classes` as in make_dataset."""
    fmt = detect_format(path, uri)
    if fmt == "npz":
        x, y = _read_npz(path, uri)
    elif fmt == "safetensors":
        x, y = _read_safetensors(path, uri)
    elif fmt in ("csv", "parquet"):
        return _table_dataset(_read_table(path, fmt, uri), label_column, uri, classes)
    else:
        return load_image_archive(str(path), archive=fmt, uri=uri, classes=classes)
    return make_dataset(x, y, uri=uri, classes=classes)


def _require_xy(names: list[str], uri: str) -> None:
    missing = [name for name in ("x", "y") if name not in names]
    if missing:
        raise JobFailure(
            "dataset_invalid",
            f"{uri}: missing array(s) {', '.join(missing)} (found: {', '.join(sorted(names)) or 'none'}); "
            "save features as x and integer labels as y",
        )


def _check_npz_arrays(zf: zipfile.ZipFile, uri: str) -> None:
    """Compare each array's declared shape with the bytes stored for it: np.load allocates the declared shape before
    reading, so a header claiming 10^12 elements would otherwise exhaust memory."""
    for info in check_zip_size(zf, uri):
        if not info.filename.endswith(".npy"):
            continue
        with zf.open(info) as member:
            version = npy_format.read_magic(member)
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, _, dtype = read_header(member)
        if dtype.hasobject:
            raise JobFailure(
                "dataset_unreadable", f"{uri}: {info.filename} holds Python objects (pickled); save numeric arrays"
            )
        if math.prod(shape) * dtype.itemsize > info.file_size:
            raise JobFailure(
                "dataset_unreadable", f"{uri}: {info.filename} declares shape {shape} but holds fewer bytes; re-save it"
            )


def _read_npz(path: Path, uri: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as zf:
            _check_npz_arrays(zf, uri)
        # allow_pickle=False: an object array inside is refused, never unpickled.
        with np.load(path, allow_pickle=False) as arrays:
            _require_xy(list(arrays.files), uri)
            return arrays["x"], arrays["y"]
    except JobFailure:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise JobFailure(
                "dataset_unreadable", f"{uri}: the arrays hold Python objects (pickled); save numeric arrays"
            ) from None
        raise JobFailure("dataset_unreadable", f"{uri}: not a readable .npz file ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise JobFailure("dataset_unreadable", f"{uri}: not a readable .npz file ({exc})") from None


def _read_safetensors(path: Path, uri: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with safe_open(str(path), framework="np") as tensors:
            _require_xy(list(tensors.keys()), uri)
            return tensors.get_tensor("x"), tensors.get_tensor("y")
    except (SafetensorError, OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise JobFailure("dataset_unreadable", f"{uri}: not a readable .safetensors file ({exc})") from None


def _read_table(path: Path, fmt: str, uri: str) -> pa.Table:
    try:
        if fmt == "csv":
            return pa_csv.read_csv(path)
        _check_parquet_size(path, uri)
        return pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise JobFailure("dataset_unreadable", f"{uri}: not a readable {fmt} file ({exc})") from None


def _check_parquet_size(path: Path, uri: str) -> None:
    # Run-length and dictionary encodings let a kilobyte of parquet hold millions of rows; what reading costs is
    # about 8 bytes (a float64) per cell, plus the encoded bytes themselves.
    metadata = pq.read_metadata(path)
    encoded = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    unpacked = metadata.num_rows * metadata.num_columns * 8 + encoded
    if unpacked > archives.MAX_UNPACKED_BYTES:
        raise JobFailure(
            "dataset_too_large",
            f"{uri}: the table unpacks to {unpacked} bytes, more than {archives.MAX_UNPACKED_BYTES}; send fewer rows",
        )


def _table_dataset(table: pa.Table, label_column: str | None, uri: str, classes: list[str] | None) -> Dataset:
    if label_column is None:
        raise JobFailure(
            "label_column_required",
            f"{uri}: tabular datasets need dataset.label_column, the column holding each row's class "
            f"(columns: {', '.join(table.column_names)})",
        )
    if label_column not in table.column_names:
        raise JobFailure(
            "label_column_not_found",
            f"{uri}: no column named {label_column!r}; the columns are {', '.join(table.column_names)}",
        )
    feature_names = [name for name in table.column_names if name != label_column]
    for name in feature_names:
        kind = table.schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise JobFailure(
                "dataset_invalid",
                f"{uri}: feature column {name!r} is {kind}, not numeric; encode it as numbers or drop it",
            )
    if not feature_names:
        raise JobFailure("dataset_invalid", f"{uri}: the table has no feature columns besides {label_column!r}")
    # Nulls become NaN here, which make_dataset reports with the row number.
    x = np.column_stack(
        [table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False) for name in feature_names]
    )
    y, class_names = _encode_labels(table.column(label_column).to_pylist(), label_column, uri, classes)
    return make_dataset(x, y, uri=uri, classes=classes, feature_names=feature_names, class_names=class_names)


def _encode_labels(
    values: list, label_column: str, uri: str, classes: list[str] | None
) -> tuple[np.ndarray, list[str]]:
    """Label values (ints or strings) as class ids: sorted unique values become 0..K-1, or the training set's
    `classes` decide when given. Returns (ids, class names)."""
    if None in values:
        raise JobFailure(
            "labels_invalid", f"{uri}: row {values.index(None)} has no value in {label_column!r}; every row needs a label"
        )
    if any(isinstance(value, float) and not value.is_integer() for value in values):
        raise JobFailure("labels_invalid", f"{uri}: column {label_column!r} holds fractional numbers, not classes")
    # 3.0 from a float column names the same class as 3.
    as_names = [str(int(v)) if isinstance(v, float | bool | int) else str(v) for v in values]
    if classes is None:
        unique = sorted(set(values), key=lambda v: (isinstance(v, str), v))
        names = list(dict.fromkeys(str(int(v)) if not isinstance(v, str) else v for v in unique))
    else:
        names = classes
        unknown = sorted(set(as_names) - set(names))
        if unknown:
            raise JobFailure(
                "labels_out_of_range",
                f"{uri}: labels {unknown[:10]} are not among the training set's classes {names[:20]}",
            )
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[name] for name in as_names], dtype=np.int64), names
