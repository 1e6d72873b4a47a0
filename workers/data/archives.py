"""Image-folder datasets packed as .zip / .tar / .tar.gz (one folder per class), read in memory, never extracted,
with every member's path, type and size checked first."""
import io
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from workers.data.dataset import Dataset, make_dataset
from workers.errors import JobFailure

# Caps on what an archive may unpack to (bytes of members, and decoded float32 pixels), and on its member count:
# a few kilobytes of zip can otherwise declare gigabytes (a zip bomb).
MAX_UNPACKED_BYTES = 4 * 1024**3
MAX_MEMBERS = 200_000
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def safe_member_path(name: str, uri: str) -> PurePosixPath:
    """The member's path, refused if it is absolute or climbs out with `..` (zip slip)."""
    normalized = name.replace("\\", "/")
    path = PurePosixPath(normalized)
    is_absolute = normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":")
    if is_absolute or ".." in path.parts:
        raise JobFailure(
            "archive_unsafe", f"{uri}: archive member {name!r} points outside the archive; use relative paths only"
        )
    return path


def check_zip_size(zf: zipfile.ZipFile, uri: str) -> list[zipfile.ZipInfo]:
    """The zip's members, after checking their count and declared sizes. Reading never yields more than the declared
    size (zipfile stops there), so checking the declarations bounds what is decompressed."""
    infos = zf.infolist()
    _check_totals(len(infos), sum(info.file_size for info in infos), uri)
    return infos


def _check_totals(members: int, unpacked_bytes: int, uri: str) -> None:
    if members > MAX_MEMBERS:
        raise JobFailure(
            "dataset_too_large", f"{uri}: the archive has more than {MAX_MEMBERS} members; split it or use .npz"
        )
    if unpacked_bytes > MAX_UNPACKED_BYTES:
        raise JobFailure(
            "dataset_too_large",
            f"{uri}: the archive unpacks to more than {MAX_UNPACKED_BYTES} bytes; send a smaller dataset",
        )


def _is_image(path: PurePosixPath) -> bool:
    # macOS zips carry __MACOSX/._name.png resource forks; hidden files are never data.
    hidden = any(part.startswith(".") or part == "__MACOSX" for part in path.parts)
    return not hidden and path.suffix.lower() in IMAGE_SUFFIXES


def _zip_images(path: str, uri: str) -> Iterator[tuple[PurePosixPath, bytes]]:
    with zipfile.ZipFile(path) as zf:
        for info in check_zip_size(zf, uri):
            member = safe_member_path(info.filename, uri)
            # Unix file type bits from the zip's external attributes: 0 when the zip was made without them.
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise JobFailure(
                    "archive_unsafe",
                    f"{uri}: archive member {info.filename!r} is a symlink or special file; store plain files only",
                )
            if info.flag_bits & 0x1:
                raise JobFailure("dataset_unreadable", f"{uri}: {info.filename!r} is encrypted; zip without a password")
            if not info.is_dir() and _is_image(member):
                yield member, zf.read(info)


def _tar_images(path: str, uri: str) -> Iterator[tuple[PurePosixPath, bytes]]:
    members = unpacked = 0
    with tarfile.open(path, "r:*") as tf:
        for info in tf:
            members += 1
            unpacked += info.size
            _check_totals(members, unpacked, uri)
            member = safe_member_path(info.name, uri)
            if info.isdir():
                continue
            if not info.isfile():
                raise JobFailure(
                    "archive_unsafe",
                    f"{uri}: archive member {info.name!r} is a link or device, not a file; store plain files only",
                )
            if _is_image(member):
                yield member, tf.extractfile(info).read()


def _decode(member: PurePosixPath, data: bytes, uri: str) -> np.ndarray:
    """One image as float32 [C, H, W] in [0, 1]: C=1 for greyscale, 3 for colour."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise JobFailure(
                    "dataset_too_large",
                    f"{uri}: {member} is {image.width}x{image.height}; images may have at most {MAX_IMAGE_PIXELS} "
                    "pixels",
                )
            if image.mode.startswith("I"):  # 16-bit greyscale PNG
                return np.asarray(image, dtype=np.float32)[None] / 65535.0
            if image.mode in ("1", "L", "LA"):
                return np.asarray(image.convert("L"), dtype=np.float32)[None] / 255.0
            return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise JobFailure("dataset_unreadable", f"{uri}: {member} is not a readable PNG or JPEG ({exc})") from None


def load_image_archive(path: str, *, archive: str, uri: str, classes: list[str] | None) -> Dataset:
    """Load class-folder images from a "zip" or "tar" archive; the class is each image's parent folder name."""
    images: list[np.ndarray] = []
    labels_by_name: list[str] = []
    first: tuple[PurePosixPath, tuple[int, int]] | None = None
    pixels = 0
    try:
        members = _zip_images(path, uri) if archive == "zip" else _tar_images(path, uri)
        for member, data in members:
            if member.parent == PurePosixPath("."):
                raise JobFailure(
                    "dataset_invalid",
                    f"{uri}: {member} is not in a class folder; put each class's images in its own folder "
                    "(e.g. cat/001.png)",
                )
            image = _decode(member, data, uri)
            first = first or (member, image.shape[1:])
            if image.shape[1:] != first[1]:
                raise JobFailure(
                    "dataset_invalid",
                    f"{uri}: {member} is {image.shape[2]}x{image.shape[1]} but {first[0]} is "
                    f"{first[1][1]}x{first[1][0]}; resize all images to one size",
                )
            pixels += image.size
            _check_totals(0, pixels * 4, uri)
            images.append(image)
            labels_by_name.append(member.parent.name)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise JobFailure("dataset_unreadable", f"{uri}: not a readable {archive} archive ({exc})") from None
    except OSError as exc:  # a gzip layer that is not gzip, a truncated file
        raise JobFailure("dataset_unreadable", f"{uri}: not a readable {archive} archive ({exc})") from None
    if not images:
        raise JobFailure(
            "dataset_invalid", f"{uri}: no PNG or JPEG images found; expected one folder per class, e.g. cat/001.png"
        )
    return _image_dataset(images, labels_by_name, uri, classes)


def _image_dataset(images: list[np.ndarray], folder_names: list[str], uri: str, classes: list[str] | None) -> Dataset:
    channels = max(image.shape[0] for image in images)
    # A mix of greyscale and colour images: repeat grey into 3 channels so every image has the same shape.
    x = np.stack([np.repeat(image, channels // image.shape[0], axis=0) for image in images])
    names = classes if classes is not None else sorted(set(folder_names))
    unknown = sorted(set(folder_names) - set(names))
    if unknown:
        raise JobFailure(
            "labels_out_of_range",
            f"{uri}: class folders {unknown} are not among the training set's classes {names}",
        )
    index = {name: i for i, name in enumerate(names)}
    y = np.array([index[name] for name in folder_names], dtype=np.int64)
    return make_dataset(x, y, uri=uri, classes=classes, class_names=names)
