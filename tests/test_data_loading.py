"""workers.data: every URI scheme and file format, each error code, and the safety checks (SSRF, zip slip, symlinks,
zip bombs, pickle) against real files in tmp_path, real scikit-learn data, a real artifact store and local servers."""
import io
import ipaddress
import os
import pickle
import shutil
import socket
import ssl
import stat
import subprocess
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.numpy import save_file
from sklearn.datasets import load_iris

from bench.common import Canary
from core.settings import Settings
from core.storage import ArtifactStore
from workers.data import Dataset, archives, fetch, load_dataset, split_validation
from workers.data.downloads import download_https, is_public_address
from workers.data.uris import copy_with_fsspec
from workers.errors import JobFailure

LOOPBACK_V4 = ipaddress.ip_address("127.0.0.1")


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def settings(tmp_path: Path, data_root: Path) -> Settings:
    return Settings(home=tmp_path / "home", data_roots=str(data_root), https_timeout_seconds=5, https_max_bytes=10**6)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(f"file://{tmp_path / 'store'}")


class Catalog:
    """The caller's side of lookup: URIs the project owns, mapped to store keys."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self.keys: dict[str, str] = {}

    def add(self, uri: str, local_file: Path) -> None:
        self.keys[uri] = self.store.put_file(str(local_file))[0]

    def lookup(self, uri: str) -> str:
        if uri not in self.keys:
            raise JobFailure("file_not_found", f"{uri}: no such file in this project")
        return self.keys[uri]


@pytest.fixture
def catalog(store: ArtifactStore) -> Catalog:
    return Catalog(store)


def no_lookup(uri: str) -> str:
    raise JobFailure("file_not_found", f"{uri}: no such file in this project")


def no_copy(key: str, local_path: str) -> None:
    raise AssertionError("nothing should be copied from the store")


def load(uri: str, settings: Settings, tmp_path: Path, catalog: Catalog | None = None, **kwargs) -> Dataset:
    lookup, copy = (catalog.lookup, catalog.store.copy_to) if catalog else (no_lookup, no_copy)
    kwargs.setdefault("label_column", None)
    return load_dataset(uri, dest_dir=tmp_path / "work", settings=settings, lookup=lookup, copy=copy, **kwargs)


def failure(fn, *args, **kwargs) -> JobFailure:
    with pytest.raises(JobFailure) as info:
        fn(*args, **kwargs)
    return info.value


def load_failure(uri: str, settings: Settings, tmp_path: Path, **kwargs) -> JobFailure:
    return failure(load, uri, settings, tmp_path, **kwargs)


def save_npz(path: Path, **arrays) -> str:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path with another suffix
        np.savez(f, **arrays)
    return f"file://{path}"


def blobs(n: int = 20, classes: int = 2, features: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    return rng.normal(size=(n, features)).astype(np.float32) + y[:, None], y


def png_bytes(value: int, size: tuple[int, int] = (6, 5), mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    color = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(value: int, size: tuple[int, int] = (6, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="JPEG")
    return buffer.getvalue()


def image_members(prefix: str = "") -> dict[str, bytes]:
    """Five images per class for 'cat' and 'dog', greyscale, one of them a JPEG."""
    members = {f"{prefix}cat/{i}.png": png_bytes(10 * i) for i in range(5)}
    members |= {f"{prefix}dog/{i}.png": png_bytes(200 + 10 * i) for i in range(4)}
    members[f"{prefix}dog/4.jpg"] = jpeg_bytes(250)
    return members


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


class MarkerPayload:
    """Unpickling this creates `path`: if the marker file ever appears, something unpickled user data."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------- builtin://


def test_builtin_digits_are_8x8_images_in_unit_range(settings, tmp_path):
    ds = load("builtin://digits", settings, tmp_path)
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.y.dtype == np.int64 and ds.classes == [str(i) for i in range(10)]
    assert ds.kind == "image" and ds.feature_names is None and ds.uri == "builtin://digits"


def test_builtin_mnist5k_loads_offline(settings, tmp_path):
    ds = load("builtin://mnist5k", settings, tmp_path)
    assert ds.x.shape == (5000, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.x.min() >= 0.0 and ds.x.max() == 1.0
    assert sorted(set(ds.y.tolist())) == list(range(10))


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [("iris", (150, 4), 3), ("wine", (178, 13), 3), ("breast_cancer", (569, 30), 2)],
)
def test_builtin_tabular_sets_keep_feature_and_class_names(settings, tmp_path, name, shape, classes):
    ds = load(f"builtin://{name}", settings, tmp_path)
    assert ds.kind == "tabular" and ds.x.shape == shape and len(ds.feature_names) == shape[1]
    assert len(ds.classes) == classes
    if name == "iris":
        assert ds.classes == ["setosa", "versicolor", "virginica"]
        assert ds.feature_names[0] == "sepal length (cm)"


def test_unknown_builtin_lists_the_available_ones(settings, tmp_path):
    error = load_failure("builtin://cifar1000", settings, tmp_path)
    assert error.code == "dataset_not_found"
    assert "builtin://digits" in error.message and "builtin://iris" in error.message


# ---------------------------------------------------------------- .npz and .safetensors


def test_npz_tabular(settings, tmp_path, data_root):
    x, y = blobs()
    ds = load(save_npz(data_root / "train.npz", x=x, y=y), settings, tmp_path)
    assert ds.kind == "tabular" and ds.x.shape == (20, 3) and ds.feature_names is None
    np.testing.assert_array_equal(ds.y, y)
    assert ds.classes == ["0", "1"]


def test_npz_images_without_channel_get_one(settings, tmp_path, data_root):
    x = np.random.default_rng(0).random((12, 7, 7))
    uri = save_npz(data_root / "images.NPZ", x=x, y=np.arange(12) % 3)
    ds = load(uri, settings, tmp_path)
    assert ds.kind == "image" and ds.x.shape == (12, 1, 7, 7) and ds.x.dtype == np.float32
    assert ds.classes == ["0", "1", "2"]


def test_npz_sparse_labels_define_classes_up_to_the_largest(settings, tmp_path, data_root):
    x = np.zeros((12, 3, 4, 4), dtype=np.float32)
    ds = load(save_npz(data_root / "rgb.npz", x=x, y=np.array([0, 5] * 6)), settings, tmp_path)
    assert ds.x.shape == (12, 3, 4, 4) and ds.classes == [str(i) for i in range(6)]


def test_float_labels_with_integer_values_are_accepted(settings, tmp_path, data_root):
    x, y = blobs()
    ds = load(save_npz(data_root / "f.npz", x=x, y=y.astype(np.float64)), settings, tmp_path)
    assert ds.y.dtype == np.int64


def test_safetensors(settings, tmp_path, data_root):
    x, y = blobs()
    save_file({"x": x, "y": y.astype(np.int64)}, str(data_root / "train.safetensors"))
    ds = load(f"file://{data_root / 'train.safetensors'}", settings, tmp_path)
    np.testing.assert_allclose(ds.x, x)
    np.testing.assert_array_equal(ds.y, y)


def test_safetensors_missing_y_names_it(settings, tmp_path, data_root):
    save_file({"x": blobs()[0], "labels": blobs()[1].astype(np.int64)}, str(data_root / "t.safetensors"))
    error = load_failure(f"file://{data_root / 't.safetensors'}", settings, tmp_path)
    assert error.code == "dataset_invalid" and "y" in error.message and "labels" in error.message


# ---------------------------------------------------------------- checks on every dataset


@pytest.mark.parametrize(
    ("arrays", "code", "words"),
    [
        ({"x": blobs()[0]}, "dataset_invalid", "missing array(s) y"),
        ({"features": blobs()[0], "labels": blobs()[1]}, "dataset_invalid", "x, y"),
        ({"x": np.array(["a"] * 20), "y": blobs()[1]}, "dataset_invalid", "dtype"),
        ({"x": np.full((20, 3), np.nan), "y": blobs()[1]}, "dataset_invalid", "NaN"),
        ({"x": np.full((20, 3), np.inf), "y": blobs()[1]}, "dataset_invalid", "infinite"),
        ({"x": np.zeros((20, 2, 2, 2, 2)), "y": blobs()[1]}, "dataset_invalid", "shape"),
        ({"x": blobs()[0], "y": blobs()[1][:19]}, "dataset_invalid", "19"),
        ({"x": blobs()[0], "y": np.zeros(20, dtype=int)}, "dataset_invalid", "2+ classes"),
        ({"x": blobs(n=6)[0], "y": blobs(n=6)[1]}, "dataset_invalid", "too few"),
        ({"x": blobs()[0], "y": blobs()[1] + 0.5}, "labels_invalid", "non-integer"),
        ({"x": blobs()[0], "y": blobs()[1] - 1}, "labels_invalid", "negative"),
        ({"x": blobs()[0], "y": np.eye(2)[blobs()[1]]}, "labels_invalid", "argmax"),
        ({"x": blobs()[0], "y": np.array(["a", "b"] * 10)}, "labels_invalid", "dtype"),
        ({"x": blobs()[0], "y": blobs()[1] * 10**9}, "labels_invalid", "at most"),
        ({"x": np.zeros((0, 3)), "y": np.zeros(0, dtype=int)}, "dataset_invalid", "no rows"),
    ],
)
def test_bad_arrays_fail_with_a_code_and_what_to_fix(settings, tmp_path, data_root, arrays, code, words):
    error = load_failure(save_npz(data_root / "bad.npz", **arrays), settings, tmp_path)
    assert error.code == code and words in error.message
    assert error.error_class == "user_error"


def test_labels_beyond_the_training_classes_are_out_of_range(settings, tmp_path, data_root):
    x, y = blobs(classes=3)
    error = load_failure(save_npz(data_root / "val.npz", x=x, y=y), settings, tmp_path, classes=["0", "1"])
    assert error.code == "labels_out_of_range"


def test_a_forget_set_may_hold_one_class_and_few_rows(settings, tmp_path, data_root):
    uri = save_npz(data_root / "forget.npz", x=np.ones((3, 4)), y=np.array([3, 3, 3]))
    ds = load(uri, settings, tmp_path, classes=[str(i) for i in range(10)])
    assert len(ds) == 3 and len(ds.classes) == 10


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not a zip at all"])
def test_corrupt_npz_is_unreadable(settings, tmp_path, data_root, content):
    (data_root / "broken.npz").write_bytes(content)
    assert load_failure(f"file://{data_root / 'broken.npz'}", settings, tmp_path).code == "dataset_unreadable"


def test_corrupt_safetensors_is_unreadable(settings, tmp_path, data_root):
    (data_root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert load_failure(f"file://{data_root / 'broken.safetensors'}", settings, tmp_path).code == "dataset_unreadable"


def test_unknown_extension_is_unreadable(settings, tmp_path, data_root):
    np.save(data_root / "x.npy", np.zeros(3))
    error = load_failure(f"file://{data_root / 'x.npy'}", settings, tmp_path)
    assert error.code == "dataset_unreadable" and ".npz" in error.message


# ---------------------------------------------------------------- pickle is never loaded


@pytest.mark.parametrize("suffix", [".pkl", ".pickle", ".pt", ".pth"])
def test_pickle_files_are_refused_unopened(settings, tmp_path, data_root, suffix):
    marker = tmp_path / "unpickled"
    (data_root / f"model{suffix}").write_bytes(pickle.dumps({"x": MarkerPayload(marker)}))
    error = load_failure(f"file://{data_root / f'model{suffix}'}", settings, tmp_path)
    assert error.code == "unsafe_format" and ".npz or .safetensors" in error.message
    assert not marker.exists()


def test_object_arrays_in_npz_are_never_unpickled(settings, tmp_path, data_root):
    marker = tmp_path / "unpickled"
    x = np.array([MarkerPayload(marker)] * 20, dtype=object)
    error = load_failure(save_npz(data_root / "objects.npz", x=x, y=blobs()[1]), settings, tmp_path)
    assert error.code == "dataset_unreadable" and "pickled" in error.message
    assert not marker.exists()


def test_an_uploaded_pickle_without_extension_is_refused(settings, tmp_path, catalog):
    marker = tmp_path / "unpickled"
    upload = tmp_path / "upload"
    upload.write_bytes(pickle.dumps(MarkerPayload(marker), protocol=4))
    catalog.add("file_pickle", upload)
    assert load_failure("file_pickle", settings, tmp_path, catalog=catalog).code == "unsafe_format"
    assert not marker.exists()


def test_an_uploaded_torch_checkpoint_is_refused(settings, tmp_path, catalog):
    marker = tmp_path / "unpickled"
    write_zip(tmp_path / "ckpt", {"archive/data.pkl": pickle.dumps(MarkerPayload(marker)), "archive/version": b"3"})
    catalog.add("file_ckpt", tmp_path / "ckpt")
    assert load_failure("file_ckpt", settings, tmp_path, catalog=catalog).code == "unsafe_format"
    assert not marker.exists()


# ---------------------------------------------------------------- .csv and .parquet


def iris_table(label_as_names: bool = True) -> pa.Table:
    iris = load_iris()
    columns = {name: iris.data[:, i] for i, name in enumerate(["sepal_l", "sepal_w", "petal_l", "petal_w"])}
    labels = iris.target_names[iris.target].tolist() if label_as_names else (iris.target + 1).tolist()
    return pa.table(columns | {"species": labels})


def test_csv_with_string_labels(settings, tmp_path, data_root):
    pa_csv.write_csv(iris_table(), data_root / "iris.csv")
    ds = load(f"file://{data_root / 'iris.csv'}", settings, tmp_path, label_column="species")
    assert ds.kind == "tabular" and ds.x.shape == (150, 4) and ds.x.dtype == np.float32
    assert ds.feature_names == ["sepal_l", "sepal_w", "petal_l", "petal_w"]
    assert ds.classes == ["setosa", "versicolor", "virginica"]
    np.testing.assert_array_equal(ds.y, load_iris().target)


def test_parquet_with_integer_labels_maps_sorted_values_to_ids(settings, tmp_path, data_root):
    pq.write_table(iris_table(label_as_names=False), data_root / "iris.parquet")
    ds = load(f"file://{data_root / 'iris.parquet'}", settings, tmp_path, label_column="species")
    assert ds.classes == ["1", "2", "3"]
    np.testing.assert_array_equal(ds.y, load_iris().target)


def test_tabular_validation_set_uses_the_training_classes(settings, tmp_path, data_root):
    table = iris_table()
    table = table.filter(pc.equal(table["species"], "virginica"))
    pa_csv.write_csv(table, data_root / "val.csv")
    classes = ["setosa", "versicolor", "virginica"]
    ds = load(f"file://{data_root / 'val.csv'}", settings, tmp_path, label_column="species", classes=classes)
    assert set(ds.y.tolist()) == {2} and ds.classes == classes
    error = load_failure(
        f"file://{data_root / 'val.csv'}", settings, tmp_path, label_column="species", classes=["setosa", "other"]
    )
    assert error.code == "labels_out_of_range" and "virginica" in error.message


def test_tabular_needs_a_label_column(settings, tmp_path, data_root):
    pa_csv.write_csv(iris_table(), data_root / "iris.csv")
    error = load_failure(f"file://{data_root / 'iris.csv'}", settings, tmp_path)
    assert error.code == "label_column_required" and "species" in error.message


def test_missing_label_column_names_the_columns_that_exist(settings, tmp_path, data_root):
    pq.write_table(iris_table(), data_root / "iris.parquet")
    error = load_failure(f"file://{data_root / 'iris.parquet'}", settings, tmp_path, label_column="label")
    assert error.code == "label_column_not_found" and "sepal_l" in error.message and "species" in error.message


def test_non_numeric_feature_is_named(settings, tmp_path, data_root):
    table = iris_table().append_column("colour", pa.array(["red"] * 150))
    pa_csv.write_csv(table, data_root / "iris.csv")
    error = load_failure(f"file://{data_root / 'iris.csv'}", settings, tmp_path, label_column="species")
    assert error.code == "dataset_invalid" and "'colour'" in error.message


def test_empty_feature_cell_is_reported(settings, tmp_path, data_root):
    text = "a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(19)) + "1,,0\n"
    (data_root / "holes.csv").write_text(text)
    error = load_failure(f"file://{data_root / 'holes.csv'}", settings, tmp_path, label_column="label")
    assert error.code == "dataset_invalid" and "row 19" in error.message


def test_empty_label_cell_is_reported(settings, tmp_path, data_root):
    text = "a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(19)) + "1,\n"
    (data_root / "holes.csv").write_text(text)
    error = load_failure(f"file://{data_root / 'holes.csv'}", settings, tmp_path, label_column="label")
    assert error.code == "labels_invalid" and "row 19" in error.message


def test_garbage_parquet_is_unreadable(settings, tmp_path, data_root):
    (data_root / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    error = load_failure(f"file://{data_root / 'bad.parquet'}", settings, tmp_path, label_column="y")
    assert error.code == "dataset_unreadable"


# ---------------------------------------------------------------- image-folder archives


def test_zip_of_class_folders(settings, tmp_path, data_root):
    write_zip(data_root / "pets.zip", image_members(prefix="pets/"))
    ds = load(f"file://{data_root / 'pets.zip'}", settings, tmp_path)
    assert ds.kind == "image" and ds.x.shape == (10, 1, 5, 6) and ds.x.dtype == np.float32
    assert ds.classes == ["cat", "dog"] and sorted(ds.y.tolist()) == [0] * 5 + [1] * 5
    cat_zero = ds.x[np.flatnonzero(ds.y == 0)].min()
    assert cat_zero == 0.0 and 0.9 < ds.x.max() <= 1.0


@pytest.mark.parametrize(("name", "mode"), [("pets.tar.gz", "w:gz"), ("pets.tgz", "w:gz"), ("pets.TAR", "w")])
def test_tar_of_class_folders(settings, tmp_path, data_root, name, mode):
    write_tar(data_root / name, image_members(), mode)
    ds = load(f"file://{data_root / name}", settings, tmp_path)
    assert ds.x.shape == (10, 1, 5, 6) and ds.classes == ["cat", "dog"]


def test_colour_images_have_three_channels(settings, tmp_path, data_root):
    members = {f"a/{i}.png": png_bytes(i * 20, mode="RGB") for i in range(5)}
    members |= {f"b/{i}.png": png_bytes(i * 20) for i in range(5)}  # greyscale mixed in: repeated to 3 channels
    write_zip(data_root / "rgb.zip", members)
    ds = load(f"file://{data_root / 'rgb.zip'}", settings, tmp_path)
    assert ds.x.shape == (10, 3, 5, 6)
    grey = ds.x[np.flatnonzero(ds.y == 1)[0]]
    assert np.array_equal(grey[0], grey[1])


def test_images_of_different_sizes_are_invalid(settings, tmp_path, data_root):
    members = image_members() | {"dog/big.png": png_bytes(3, size=(9, 9))}
    write_zip(data_root / "mixed.zip", members)
    error = load_failure(f"file://{data_root / 'mixed.zip'}", settings, tmp_path)
    assert error.code == "dataset_invalid" and "dog/big.png is 9x9" in error.message


def test_images_outside_class_folders_are_invalid(settings, tmp_path, data_root):
    write_zip(data_root / "flat.zip", {f"{i}.png": png_bytes(i) for i in range(10)})
    error = load_failure(f"file://{data_root / 'flat.zip'}", settings, tmp_path)
    assert error.code == "dataset_invalid" and "class folder" in error.message


def test_archive_without_images_is_invalid(settings, tmp_path, data_root):
    write_zip(data_root / "docs.zip", {"readme.txt": b"hello", "__MACOSX/cat/._1.png": b"junk"})
    assert load_failure(f"file://{data_root / 'docs.zip'}", settings, tmp_path).code == "dataset_invalid"


def test_undecodable_image_is_unreadable(settings, tmp_path, data_root):
    write_zip(data_root / "broken.zip", image_members() | {"cat/bad.png": b"\x89PNG not really"})
    error = load_failure(f"file://{data_root / 'broken.zip'}", settings, tmp_path)
    assert error.code == "dataset_unreadable" and "cat/bad.png" in error.message


def test_truncated_tar_is_unreadable(settings, tmp_path, data_root):
    write_tar(tmp_path / "pets.tar.gz", image_members())
    (data_root / "pets.tar.gz").write_bytes((tmp_path / "pets.tar.gz").read_bytes()[:200])
    assert load_failure(f"file://{data_root / 'pets.tar.gz'}", settings, tmp_path).code == "dataset_unreadable"


@pytest.mark.parametrize("evil", ["../evil.png", "cat/../../evil.png", "/tmp/evil.png", "..\\evil.png"])
@pytest.mark.parametrize("archive", ["zip", "tar"])
def test_zip_slip_is_refused_and_writes_nothing(settings, tmp_path, data_root, evil, archive):
    members = image_members() | {evil: png_bytes(1)}
    path = data_root / f"slip.{archive}"
    if archive == "zip":
        write_zip(path, members)
    else:
        write_tar(path, members, "w")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    error = load_failure(f"file://{path}", settings, tmp_path)
    assert error.code == "archive_unsafe" and "outside the archive" in error.message
    created = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in created if p not in before and p.parts[0] != "work"] == []
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()


def test_symlink_in_zip_is_refused(settings, tmp_path, data_root):
    path = write_zip(data_root / "link.zip", image_members())
    with zipfile.ZipFile(path, "a") as zf:
        link = zipfile.ZipInfo("cat/passwd.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    error = load_failure(f"file://{path}", settings, tmp_path)
    assert error.code == "archive_unsafe" and "symlink" in error.message


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_links_and_devices_in_tar_are_refused(settings, tmp_path, data_root, kind):
    path = write_tar(data_root / "link.tar", image_members(), "w")
    with tarfile.open(path, "a") as tf:
        info = tarfile.TarInfo("cat/special.png")
        info.type = kind
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    error = load_failure(f"file://{path}", settings, tmp_path)
    assert error.code == "archive_unsafe" and "cat/special.png" in error.message


@pytest.mark.parametrize("archive", ["zip", "tar.gz", "npz"])
def test_zip_bomb_is_too_large(settings, tmp_path, data_root, monkeypatch, archive):
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 4 * 1024 * 1024)
    zeros = bytes(16 * 1024 * 1024)  # 16 MiB of zeros deflates to ~16 KiB: 1000x
    path = data_root / f"bomb.{archive}"
    if archive == "zip":
        write_zip(path, image_members() | {"cat/bomb.png": zeros})
    elif archive == "tar.gz":
        write_tar(path, image_members() | {"cat/bomb.png": zeros})
    else:
        np.savez_compressed(path, x=np.zeros((len(zeros) // 4 // 10, 10), dtype=np.float32), y=np.arange(2))
    assert path.stat().st_size < 200_000
    error = load_failure(f"file://{path}", settings, tmp_path)
    assert error.code == "dataset_too_large"


def test_parquet_that_unpacks_past_the_cap_is_too_large(settings, tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 1024 * 1024)
    pq.write_table(pa.table({"a": np.zeros(500_000), "label": np.arange(500_000) % 2}), data_root / "zeros.parquet")
    assert (data_root / "zeros.parquet").stat().st_size < 100_000
    error = load_failure(f"file://{data_root / 'zeros.parquet'}", settings, tmp_path, label_column="label")
    assert error.code == "dataset_too_large"


def test_zip_whose_headers_understate_sizes_is_unreadable(settings, tmp_path, data_root):
    # Headers claiming 100 bytes for a 1 MB member: reading stops at the claim and the checksum then fails.
    data = bytearray(write_zip(tmp_path / "liar.zip", image_members() | {"cat/big.png": bytes(10**6)}).read_bytes())
    # (signature, offset of the name, offset of the uncompressed size) in local and central directory headers
    for signature, name_offset, size_offset in ((b"PK\x03\x04", 30, 22), (b"PK\x01\x02", 46, 24)):
        start = data.find(signature)
        while start != -1:
            if data[start + name_offset : start + name_offset + 11] == b"cat/big.png":
                data[start + size_offset : start + size_offset + 4] = (100).to_bytes(4, "little")
            start = data.find(signature, start + 4)
    (data_root / "liar.zip").write_bytes(bytes(data))
    with zipfile.ZipFile(data_root / "liar.zip") as zf:
        assert zf.getinfo("cat/big.png").file_size == 100
    assert load_failure(f"file://{data_root / 'liar.zip'}", settings, tmp_path).code == "dataset_unreadable"


def test_npz_whose_header_claims_a_huge_array_is_refused_before_allocating(settings, tmp_path, data_root):
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    member.write(bytes(64))
    write_zip(data_root / "huge.npz", {"x.npy": member.getvalue(), "y.npy": npy_bytes(np.arange(20) % 2)})
    error = load_failure(f"file://{data_root / 'huge.npz'}", settings, tmp_path)
    assert error.code == "dataset_unreadable" and "(1000000000000,)" in error.message


def test_archive_with_too_many_members_is_too_large(settings, tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(archives, "MAX_MEMBERS", 8)
    write_zip(data_root / "many.zip", image_members())
    assert load_failure(f"file://{data_root / 'many.zip'}", settings, tmp_path).code == "dataset_too_large"


# ---------------------------------------------------------------- file:// confinement


def test_file_uri_outside_the_data_roots_is_forbidden(settings, tmp_path, data_root):
    x, y = blobs()
    outside = tmp_path / "secret.npz"
    np.savez(outside, x=x, y=y)
    error = load_failure(f"file://{outside}", settings, tmp_path)
    assert error.code == "uri_forbidden"
    assert str(data_root) in error.message and "REFINERY_DATA_ROOTS" in error.message


def test_dot_dot_cannot_climb_out_of_a_root(settings, tmp_path, data_root):
    np.savez(tmp_path / "secret.npz", x=blobs()[0], y=blobs()[1])
    error = load_failure(f"file://{data_root}/../secret.npz", settings, tmp_path)
    assert error.code == "uri_forbidden"


def test_symlink_inside_a_root_pointing_outside_is_forbidden(settings, tmp_path, data_root):
    np.savez(tmp_path / "secret.npz", x=blobs()[0], y=blobs()[1])
    (data_root / "innocent.npz").symlink_to(tmp_path / "secret.npz")
    (data_root / "escape").symlink_to(tmp_path)
    assert load_failure(f"file://{data_root / 'innocent.npz'}", settings, tmp_path).code == "uri_forbidden"
    assert load_failure(f"file://{data_root / 'escape' / 'secret.npz'}", settings, tmp_path).code == "uri_forbidden"


def test_symlink_staying_inside_a_root_is_followed(settings, tmp_path, data_root):
    save_npz(data_root / "real.npz", x=blobs()[0], y=blobs()[1])
    (data_root / "alias.npz").symlink_to(data_root / "real.npz")
    assert len(load(f"file://{data_root / 'alias.npz'}", settings, tmp_path)) == 20


def test_missing_file_under_a_root_is_not_found(settings, tmp_path, data_root):
    assert load_failure(f"file://{data_root / 'nope.npz'}", settings, tmp_path).code == "dataset_not_found"


def test_a_directory_is_not_a_dataset(settings, tmp_path, data_root):
    (data_root / "folder").mkdir()
    error = load_failure(f"file://{data_root / 'folder'}", settings, tmp_path)
    assert error.code == "dataset_unreadable" and ".zip" in error.message


def test_file_uris_are_forbidden_when_no_roots_are_configured(tmp_path, data_root):
    no_roots = Settings(home=tmp_path / "home", data_roots="")
    save_npz(data_root / "train.npz", x=blobs()[0], y=blobs()[1])
    error = load_failure(f"file://{data_root / 'train.npz'}", no_roots, tmp_path)
    assert error.code == "uri_forbidden" and "REFINERY_DATA_ROOTS" in error.message


def test_file_uri_with_a_host_is_invalid(settings, tmp_path):
    assert load_failure("file://server/share/train.npz", settings, tmp_path).code == "uri_invalid"


def test_file_uri_is_read_in_place(settings, tmp_path, data_root, store):
    save_npz(data_root / "train.npz", x=blobs()[0], y=blobs()[1])
    path = fetch(f"file://{data_root / 'train.npz'}", tmp_path / "work", settings, None, store.copy_to)
    assert path == data_root / "train.npz"


# ---------------------------------------------------------------- uploads (file_…) and job:// outputs


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "csv", "parquet", "zip", "tar.gz"])
def test_uploads_without_extension_are_recognised_by_content(settings, tmp_path, catalog, fmt):
    source = tmp_path / f"source.{fmt}"
    x, y = blobs()
    if fmt == "npz":
        np.savez_compressed(source, x=x, y=y)
    elif fmt == "safetensors":
        save_file({"x": x, "y": y.astype(np.int64)}, str(source))
    elif fmt == "csv":
        pa_csv.write_csv(iris_table(), source)
    elif fmt == "parquet":
        pq.write_table(iris_table(), source)
    elif fmt == "zip":
        write_zip(source, image_members())
    else:
        write_tar(source, image_members())
    catalog.add("file_0123abcd", source)
    ds = load("file_0123abcd", settings, tmp_path, catalog=catalog, label_column="species")
    assert len(ds) == {"csv": 150, "parquet": 150, "zip": 10, "tar.gz": 10}.get(fmt, 20)


def test_an_upload_in_no_known_format_is_unreadable(settings, tmp_path, catalog):
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 4)
    catalog.add("file_blob", tmp_path / "blob")
    assert load_failure("file_blob", settings, tmp_path, catalog=catalog).code == "dataset_unreadable"


def test_job_artifact_is_copied_from_the_store_under_its_name(settings, tmp_path, catalog):
    np.savez(tmp_path / "synthetic.npz", x=blobs()[0], y=blobs()[1])
    catalog.add("job://job_abc/synthetic.npz", tmp_path / "synthetic.npz")
    path = fetch("job://job_abc/synthetic.npz", tmp_path / "work", settings, catalog.lookup, catalog.store.copy_to)
    assert path.name == "synthetic.npz" and path.is_relative_to(tmp_path / "work")
    assert len(load("job://job_abc/synthetic.npz", settings, tmp_path, catalog=catalog)) == 20


def test_lookup_failures_reach_the_caller_unchanged(settings, tmp_path, catalog):
    error = load_failure("job://job_other/synthetic.npz", settings, tmp_path, catalog=catalog)
    assert error.code == "file_not_found"


def test_bytes_missing_from_the_store_are_an_infra_error(settings, tmp_path, catalog):
    catalog.keys["file_gone"] = "blobs/00/0000"
    error = load_failure("file_gone", settings, tmp_path, catalog=catalog)
    assert error.code == "storage_unavailable" and error.error_class == "infra_error"


def test_two_inputs_with_the_same_name_do_not_collide(settings, tmp_path, catalog):
    for job in ("job_a", "job_b"):
        np.savez(tmp_path / f"{job}.npz", x=blobs()[0], y=blobs()[1])
        catalog.add(f"job://{job}/data.npz", tmp_path / f"{job}.npz")
    paths = {fetch(f"job://{j}/data.npz", tmp_path / "w", settings, catalog.lookup, catalog.store.copy_to)
             for j in ("job_a", "job_b")}
    assert len(paths) == 2


@pytest.mark.parametrize("uri", ["ftp://example.com/x.npz", "gs://bucket/x.npz", "data.npz", "/etc/passwd"])
def test_unsupported_schemes_are_forbidden(settings, tmp_path, uri):
    error = load_failure(uri, settings, tmp_path)
    assert error.code == "uri_forbidden" and "https://" in error.message


# ---------------------------------------------------------------- s3:// (fsspec)


def test_s3_without_s3fs_is_an_infra_error(settings, tmp_path):
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("s3fs is installed here; this test covers workers without it")
    error = load_failure("s3://bucket/train.npz", settings, tmp_path)
    assert error.code == "storage_unavailable" and error.error_class == "infra_error" and "s3fs" in error.message


def test_remote_objects_are_copied_through_fsspec(tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/bucket/train.npz", b"payload")
    try:
        assert copy_with_fsspec("memory://bucket/train.npz", tmp_path / "t.npz").read_bytes() == b"payload"
        error = failure(copy_with_fsspec, "memory://bucket/missing.npz", tmp_path / "m.npz")
        assert error.code == "dataset_not_found" and not (tmp_path / "m.npz").exists()
    finally:
        memory.rm("/bucket", recursive=True)


# ---------------------------------------------------------------- https:// and SSRF


@pytest.fixture
def canaries():
    v4, v6 = Canary("127.0.0.1"), Canary("::1")
    yield v4, v6
    v4.close()
    v6.close()


@pytest.fixture
def connections(monkeypatch):
    """Every outgoing connect() the code under test attempts; anything but loopback is blocked, not sent."""
    attempts: list = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        attempts.append(address)
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise OSError(f"test guard: refusing to connect to {address[0]}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return attempts


SSRF_URLS = [
    "https://127.0.0.1:{v4}/x.npz",
    "https://localhost:{v4}/x.npz",
    "https://[::1]:{v6}/x.npz",
    "https://[::ffff:127.0.0.1]:{v4}/x.npz",
    "https://[::ffff:7f00:1]:{v4}/x.npz",
    "https://2130706433:{v4}/x.npz",
    "https://0177.0.0.1:{v4}/x.npz",
    "https://0x7f.0.0.1:{v4}/x.npz",
    "https://127.1:{v4}/x.npz",
    "https://169.254.169.254:{v4}/latest/meta-data/",
    "https://10.0.0.1:{v4}/x.npz",
    "https://192.168.1.1:{v4}/x.npz",
    "https://100.64.0.1:{v4}/x.npz",
    "https://0.0.0.0:{v4}/x.npz",
    "https://[fd00::1]:{v6}/x.npz",
    "https://[fe80::1]:{v6}/x.npz",
    "https://[64:ff9b::a00:1]:{v6}/x.npz",
    "http://127.0.0.1:{v4}/x.npz",
    "http://2130706433:{v4}/x.npz",
    "http://[::1]:{v6}/x.npz",
]


@pytest.mark.parametrize("template", SSRF_URLS)
def test_non_public_addresses_are_refused_before_connecting(settings, tmp_path, canaries, connections, template):
    v4, v6 = canaries
    url = template.format(v4=v4.port, v6=v6.port)
    error = failure(fetch, url, tmp_path / "work", settings, None, None)
    assert error.code == "uri_forbidden"
    assert connections == [] and v4.connections == 0 and v6.connections == 0
    assert not any((tmp_path / "work").rglob("*.npz"))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address):
    assert is_public_address(ipaddress.ip_address(address))


def test_credentials_in_https_urls_are_refused(settings, tmp_path, connections):
    error = failure(fetch, "https://user:pw@example.com/x.npz", tmp_path / "work", settings, None, None)
    assert error.code == "uri_forbidden" and connections == []


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


class DatasetServer(ThreadingHTTPServer):
    """An HTTPS server on 127.0.0.1 for `localhost`, recording the Host headers and SNI names it sees."""

    daemon_threads = True

    def __init__(self, certificate: tuple[Path, Path], routes: dict):
        super().__init__(("127.0.0.1", 0), RouteHandler)
        self.routes = routes
        self.hosts: list[str] = []
        self.sni: list[str] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*map(str, certificate))
        context.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.socket = context.wrap_socket(self.socket, server_side=True)

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (timeout tests) is expected here


class RouteHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.hosts.append(self.headers["Host"])
        status, headers, body, delay = self.server.routes.get(self.path, (404, {}, b"", 0))
        time.sleep(delay)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def https_server(certificate):
    if socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)[0][4][0] != "127.0.0.1":
        pytest.skip("localhost does not resolve to 127.0.0.1 first here")
    server = DatasetServer(certificate, {})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def https_get(url: str, dest: Path, certificate, *, max_bytes: int = 10**6, timeout: float = 5.0) -> Path:
    dest.mkdir(exist_ok=True)
    return download_https(
        url, dest, max_bytes=max_bytes, timeout_seconds=timeout,
        # The test server lives on loopback, which jobs may never reach: allow exactly 127.0.0.1 here.
        address_allowed=lambda ip: ip == LOOPBACK_V4,
        verify=ssl.create_default_context(cafile=str(certificate[0])),
    )


def npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=blobs()[0], y=blobs()[1])
    return buffer.getvalue()


def test_https_download_pins_the_address_and_keeps_host_and_sni(https_server, certificate, tmp_path):
    body = npz_bytes()
    https_server.routes["/sets/train.npz"] = (200, {"Content-Length": str(len(body))}, body, 0)
    port = https_server.server_address[1]
    path = https_get(f"https://localhost:{port}/sets/train.npz", tmp_path / "dl", certificate)
    assert path.name == "train.npz" and path.read_bytes() == body
    assert https_server.hosts == [f"localhost:{port}"] and https_server.sni == ["localhost"]


def test_https_redirects_are_followed_and_rechecked(https_server, certificate, tmp_path, connections):
    body = npz_bytes()
    port = https_server.server_address[1]
    https_server.routes["/a"] = (302, {"Location": "/b"}, b"", 0)
    https_server.routes["/b"] = (301, {"Location": f"https://localhost:{port}/data.npz"}, b"", 0)
    https_server.routes["/data.npz"] = (200, {}, body, 0)
    assert https_get(f"https://localhost:{port}/a", tmp_path / "dl", certificate).read_bytes() == body

    canary = Canary("127.0.0.2")
    try:
        https_server.routes["/to-internal"] = (302, {"Location": f"https://127.0.0.2:{canary.port}/x"}, b"", 0)
        error = failure(https_get, f"https://localhost:{port}/to-internal", tmp_path / "dl2", certificate)
        assert error.code == "uri_forbidden" and canary.connections == 0
        assert all(address[0] == "127.0.0.1" for address in connections)
    finally:
        canary.close()

    https_server.routes["/to-http"] = (302, {"Location": f"http://localhost:{port}/data.npz"}, b"", 0)
    assert failure(https_get, f"https://localhost:{port}/to-http", tmp_path / "dl3", certificate).code == "uri_forbidden"


def test_https_redirect_loops_stop(https_server, certificate, tmp_path):
    https_server.routes["/loop"] = (302, {"Location": "/loop"}, b"", 0)
    port = https_server.server_address[1]
    error = failure(https_get, f"https://localhost:{port}/loop", tmp_path / "dl", certificate)
    assert error.code == "download_failed" and "redirects" in error.message
    assert len(https_server.hosts) == 6


def test_https_size_cap(https_server, certificate, tmp_path):
    big = bytes(5000)
    port = https_server.server_address[1]
    https_server.routes["/declared.npz"] = (200, {"Content-Length": str(len(big))}, big, 0)
    https_server.routes["/undeclared.npz"] = (200, {}, big, 0)  # HTTP/1.0 body until close: no length given
    for name in ("declared.npz", "undeclared.npz"):
        error = failure(https_get, f"https://localhost:{port}/{name}", tmp_path / name, certificate, max_bytes=4000)
        assert error.code == "dataset_too_large" and "REFINERY_HTTPS_MAX_BYTES" in error.message
        assert list((tmp_path / name).iterdir()) == []


def test_https_timeout_and_errors(https_server, certificate, tmp_path):
    port = https_server.server_address[1]
    https_server.routes["/slow.npz"] = (200, {}, b"late", 2.0)
    https_server.routes["/broken.npz"] = (500, {}, b"", 0)
    slow = failure(https_get, f"https://localhost:{port}/slow.npz", tmp_path / "a", certificate, timeout=0.3)
    assert slow.code == "download_failed" and "0.3 s" in slow.message
    assert failure(https_get, f"https://localhost:{port}/gone.npz", tmp_path / "b", certificate).code == (
        "dataset_not_found"
    )
    assert failure(https_get, f"https://localhost:{port}/broken.npz", tmp_path / "c", certificate).code == (
        "download_failed"
    )


def test_https_certificate_is_verified_against_the_host_name(https_server, certificate, tmp_path):
    port = https_server.server_address[1]
    tmp_dest = tmp_path / "dl"
    tmp_dest.mkdir()
    error = failure(
        download_https, f"https://localhost:{port}/x.npz", tmp_dest, max_bytes=1000, timeout_seconds=5,
        address_allowed=lambda ip: ip == LOOPBACK_V4,  # default trust store: the self-signed cert must fail
    )
    assert error.code == "download_failed" and https_server.hosts == []


# ---------------------------------------------------------------- Dataset.subset and split_validation


def digits(settings, tmp_path) -> Dataset:
    return load("builtin://digits", settings, tmp_path)


def test_subset_keeps_classes_and_kind(settings, tmp_path):
    ds = digits(settings, tmp_path)
    part = ds.subset(np.array([0, 5, 7]))
    assert len(part) == 3 and part.classes == ds.classes and part.kind == "image"
    np.testing.assert_array_equal(part.y, ds.y[[0, 5, 7]])
    assert len(ds.subset(ds.y == 3)) == int((ds.y == 3).sum())


def test_split_validation_is_stratified_seeded_and_disjoint():
    # Feature 0 is the row id, so the split's rows can be read back; classes have 40, 80 and 80 rows.
    y = np.repeat([0, 1, 2], [40, 80, 80])
    ds = Dataset(x=np.arange(200, dtype=np.float32)[:, None], y=y, classes=["a", "b", "c"], kind="tabular",
                 feature_names=["row"], uri="test://rows")
    train, val = split_validation(ds, 0.25, seed=0)
    assert np.bincount(val.y).tolist() == [10, 20, 20] and np.bincount(train.y).tolist() == [30, 60, 60]
    train_rows, val_rows = set(train.x[:, 0].tolist()), set(val.x[:, 0].tolist())
    assert not train_rows & val_rows and len(train_rows | val_rows) == 200
    assert val.classes == ds.classes and val.feature_names == ["row"]
    np.testing.assert_array_equal(split_validation(ds, 0.25, seed=0)[1].x, val.x)
    assert not np.array_equal(split_validation(ds, 0.25, seed=1)[1].x, val.x)


def test_split_validation_falls_back_when_a_class_has_one_row(settings, tmp_path, data_root):
    x, y = blobs(n=20)
    y[-1] = 2  # class 2 has a single row: stratifying would fail
    ds = load(save_npz(data_root / "rare.npz", x=x, y=y), settings, tmp_path)
    train, val = split_validation(ds, 0.25, seed=0)
    assert len(train) == 15 and len(val) == 5


def test_split_validation_rejects_a_bad_fraction(settings, tmp_path):
    with pytest.raises(ValueError):
        split_validation(digits(settings, tmp_path), 1.0, seed=0)


def test_loading_writes_only_under_dest_dir(settings, tmp_path, catalog, data_root):
    write_tar(tmp_path / "pets.tgz", image_members())
    catalog.add("file_pets", tmp_path / "pets.tgz")
    before = set(os.listdir(tmp_path))
    load("file_pets", settings, tmp_path, catalog=catalog)
    assert set(os.listdir(tmp_path)) - before <= {"work"}
