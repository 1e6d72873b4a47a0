"""The artifact store: bytes under content-addressed keys (sha256), on any fsspec filesystem (local dir, S3, MinIO)."""
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import fsspec

CHUNK = 1024 * 1024


class ArtifactStore:
    def __init__(self, url: str):
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        if self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol:
            os.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put_file(self, local_path: str) -> tuple[str, str, int]:
        """Store a local file under its sha256; returns (key, sha256, size)."""
        digest = hashlib.sha256()
        size = 0
        with open(local_path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        sha = digest.hexdigest()
        key = f"blobs/{sha[:2]}/{sha}"
        if not self.fs.exists(self._path(key)):
            self.fs.makedirs(self._path(f"blobs/{sha[:2]}"), exist_ok=True)
            tmp = self._path(f"{key}.{os.getpid()}.tmp")
            self.fs.put_file(local_path, tmp)
            self.fs.mv(tmp, self._path(key))
        return key, sha, size

    def put_stream(self, stream: BinaryIO, max_bytes: int) -> tuple[str, str, int]:
        """Copy a stream to the store (through a temp file, so memory stays constant). Raises ValueError past max_bytes."""
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            try:
                size = 0
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise ValueError("too large")
                    tmp.write(chunk)
                tmp.close()
                return self.put_file(tmp.name)
            finally:
                os.unlink(tmp.name)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a named (not content-addressed) object atomically, e.g. a checkpoint."""
        parent = key.rsplit("/", 1)[0]
        self.fs.makedirs(self._path(parent), exist_ok=True)
        tmp = self._path(f"{key}.{os.getpid()}.tmp")
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, self._path(key))

    def read_bytes(self, key: str) -> bytes | None:
        try:
            with self.fs.open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete_prefix(self, prefix: str) -> None:
        if self.fs.exists(self._path(prefix)):
            self.fs.rm(self._path(prefix), recursive=True)

    def open(self, key: str) -> BinaryIO:
        return self.fs.open(self._path(key), "rb")

    def iter_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Yield bytes [start, end] inclusive in 1 MiB chunks: constant memory whatever the artifact's size."""
        with self.open(key) as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = f.read(min(CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk

    def local_path(self, key: str) -> str | None:
        """The object's path on this machine when the store is a local directory (so it can be sent with sendfile)."""
        return self._path(key) if "file" in self.fs.protocol or "local" in self.fs.protocol else None

    def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        """A time-limited URL a client can GET directly (S3 and compatibles), or None when the store cannot sign."""
        if "s3" not in self.fs.protocol and "s3a" not in self.fs.protocol:
            return None
        return self.fs.sign(self._path(key), expiration=expires_seconds)

    def copy_to(self, key: str, local_path: str) -> None:
        with self.open(key) as src, open(local_path, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)


_stores: dict[str, ArtifactStore] = {}


def get_store(url: str) -> ArtifactStore:
    if url not in _stores:
        _stores[url] = ArtifactStore(url)
    return _stores[url]
