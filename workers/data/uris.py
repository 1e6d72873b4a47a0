"""Turning a dataset or model URI into a local file: `file://` confined to the data roots, `https://` through the
SSRF-safe downloader, `s3://` through fsspec, uploads (`file_…`) and other jobs' outputs (`job://`) from the store."""
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import fsspec

from core.settings import Settings
from workers.data.downloads import download_https, local_name_for
from workers.errors import JobFailure

SCHEMES = "builtin://, file://, https://, s3://, file_… (uploads), job://<job_id>/<artifact>"


def fetch(
    uri: str,
    dest_dir: Path,
    settings: Settings,
    lookup: Callable[[str], str],
    copy: Callable[[str, str], None],
) -> Path:
    """Make the object `uri` names available as a local file and return its path.

    Downloads and store copies land in dest_dir; a `file://` path inside the data roots is returned in place (it is
    already local, and copying a large dataset would only cost time). `lookup(uri)` maps a `file_…` id or a `job://`
    URI to a store key, raising JobFailure itself for missing objects or other projects' objects; `copy(key, path)`
    copies that key out of the store. `builtin://` names no file: load_dataset reads it from memory.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme == "builtin":
        raise ValueError("builtin:// datasets are not files; load them with load_dataset")
    if scheme == "file":
        return confined_local_path(uri, settings)
    if scheme == "http":
        raise JobFailure("uri_forbidden", f"{uri}: plain http:// is not allowed; use an https:// URL")
    if scheme == "https":
        return download_https(
            uri, _unique_dir(dest_dir, uri), max_bytes=settings.https_max_bytes,
            timeout_seconds=settings.https_timeout_seconds,
        )
    if scheme == "s3":
        return copy_with_fsspec(uri, _unique_dir(dest_dir, uri) / local_name_for(uri))
    if scheme == "job" or (not scheme and uri.startswith("file_")):
        return _copy_from_store(uri, dest_dir, lookup, copy)
    raise JobFailure("uri_forbidden", f"{uri}: unsupported URI; use one of {SCHEMES}")


def _unique_dir(dest_dir: Path, uri: str) -> Path:
    """A folder per URI, so two inputs with the same file name (a train and a validation data.npz) never collide."""
    folder = dest_dir / hashlib.sha256(uri.encode()).hexdigest()[:12]
    folder.mkdir(exist_ok=True)
    return folder


def confined_local_path(uri: str, settings: Settings, *, allow_folder: bool = False) -> Path:
    """The real path a `file://` URI names, refused unless it lies under one of the data roots. `allow_folder`: a
    folder is accepted too (a sharded dataset's).

    Symlinks and `..` are resolved before the check, so neither can lead outside a root."""
    roots = settings.data_root_paths
    if not roots:
        raise JobFailure(
            "uri_forbidden",
            f"{uri}: file:// datasets are disabled because no data roots are configured; an operator enables them "
            "by setting REFINERY_DATA_ROOTS to the directories jobs may read",
        )
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise JobFailure("uri_invalid", f"{uri}: write file URIs with an absolute path, e.g. file:///data/train.npz")
    path = Path(unquote(parts.path)).resolve()
    if not any(path.is_relative_to(root) for root in roots):
        raise JobFailure(
            "uri_forbidden",
            f"{uri}: resolves to {path}, outside the data roots ({', '.join(map(str, roots))}); file:// may only read "
            "under those roots, which REFINERY_DATA_ROOTS sets",
        )
    if not path.exists():
        raise JobFailure("dataset_not_found", f"{uri}: no such file")
    if not path.is_file() and not (allow_folder and path.is_dir()):
        raise JobFailure(
            "dataset_unreadable", f"{uri}: is not a regular file; pack image folders as .zip or .tar"
        )
    return path


def copy_with_fsspec(url: str, local_path: Path) -> Path:
    """Copy a remote object (s3://, or any fsspec URL) to local_path."""
    try:
        remote = fsspec.open(url, "rb")
    except (ImportError, ValueError) as exc:
        protocol = url.split("://", 1)[0]
        raise JobFailure(
            "storage_unavailable",
            f"{url}: this worker cannot read {protocol}:// URIs ({exc}); install s3fs on the workers "
            "(pip install 'refinery[s3]')",
            "infra_error",
        ) from None
    try:
        with remote as src, open(local_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
    except FileNotFoundError:
        local_path.unlink(missing_ok=True)
        raise JobFailure("dataset_not_found", f"{url}: no such object") from None
    except PermissionError as exc:
        local_path.unlink(missing_ok=True)
        raise JobFailure("uri_forbidden", f"{url}: access denied ({exc}); grant the workers read access") from None
    except OSError as exc:
        local_path.unlink(missing_ok=True)
        raise JobFailure("download_failed", f"{url}: download failed ({exc})") from None
    return local_path


def _copy_from_store(uri: str, dest_dir: Path, lookup: Callable[[str], str], copy: Callable[[str, str], None]) -> Path:
    key = lookup(uri)
    # job://job_abc/synthetic.npz keeps its artifact name (and so its extension); an upload id has none and is
    # recognised by its first bytes.
    parts = urlsplit(uri)
    name = local_name_for(uri) if parts.path.strip("/") else local_name_for(f"/{parts.netloc or uri}")
    local_path = _unique_dir(dest_dir, uri) / name
    try:
        copy(key, str(local_path))
    except FileNotFoundError:
        local_path.unlink(missing_ok=True)
        raise JobFailure(
            "storage_unavailable", f"{uri}: its bytes are missing from the artifact store", "infra_error"
        ) from None
    return local_path
