"""Deletion certificates: what an unlearn job removed and what it produced, as hashes anyone holding the artifacts
and the dataset can recompute, signed so that a changed certificate is caught (`refinery verify-certificate`).

The signature is HMAC-SHA256 over the canonical JSON of `certificate` (keys sorted, no spaces, UTF-8), under the
platform's certificate key: REFINERY_CERTIFICATE_KEY, else a random key made on first use and kept in
$REFINERY_HOME/certificate_key (mode 600), like the embedded API key. Workers on several machines must share one key
(set REFINERY_CERTIFICATE_KEY), or each machine signs with its own."""
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from core.settings import Settings

FORMAT = "refinery-deletion-certificate-1"
KEY_FILE = "certificate_key"
ALGORITHM = "HMAC-SHA256"


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def certificate_key(settings: Settings) -> bytes:
    if settings.certificate_key:
        return settings.certificate_key.encode()
    path = settings.home / KEY_FILE
    if not path.exists():
        # Written whole under another name, then linked into place: a second worker starting at the same moment
        # either links first or reads the finished file, never a half-written one.
        staged = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        try:
            os.link(staged, path)
        except FileExistsError:
            pass
        finally:
            staged.unlink()
    return path.read_text().strip().encode()


def key_id(key: bytes) -> str:
    """Names the key without revealing it: which key signed, when keys are rotated."""
    return hashlib.sha256(b"refinery-certificate-key:" + key).hexdigest()[:16]


def sign(body: dict[str, Any], key: bytes) -> dict[str, Any]:
    return {"certificate": body, "signature": {"algorithm": ALGORITHM, "key_id": key_id(key),
                                               "value": hmac.new(key, canonical(body), hashlib.sha256).hexdigest()}}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
