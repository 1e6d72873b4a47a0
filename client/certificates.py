"""Checking a deletion certificate (an unlearn job's certificate.json) without the server: its HMAC-SHA256 signature
over the canonical JSON of `certificate` (keys sorted, no spaces, UTF-8), and the sha256 of every file it names that
the caller holds: the resulting model.safetensors / model.onnx / model.json, the original model's weights, and the
forget set recomputed from the dataset file's rows."""
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

KEY_FILE = "certificate_key"


class CertificateError(Exception):
    """The certificate does not hold: a bad signature, or a file whose sha256 differs from the one certified."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def certificate_key(key: str | None = None, key_file: str | Path | None = None) -> bytes:
    """The signing key: given, else REFINERY_CERTIFICATE_KEY, else the file the embedded platform keeps in
    $REFINERY_HOME (default ./.refinery)."""
    if key:
        return key.encode()
    if key_file is None and os.environ.get("REFINERY_CERTIFICATE_KEY"):
        return os.environ["REFINERY_CERTIFICATE_KEY"].encode()
    path = Path(key_file) if key_file else Path(os.environ.get("REFINERY_HOME", ".refinery")).expanduser() / KEY_FILE
    if not path.exists():
        raise CertificateError([f"no certificate key: give --key, set REFINERY_CERTIFICATE_KEY, or keep the "
                                f"platform's key file at {path}"])
    return path.read_text().strip().encode()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def forget_set_sha256(dataset: str | Path, rows: list[int]) -> str:
    """The certified forget-set hash from the dataset file (.npz with x, y): each row's inputs as float32 bytes, then
    its label as int64 little-endian, rows in file order."""
    with np.load(dataset) as data:
        x, y = data["x"], data["y"]
        digest = hashlib.sha256()
        for row in sorted(rows):
            digest.update(np.ascontiguousarray(x[row], dtype=np.float32).tobytes())
            digest.update(int(y[row]).to_bytes(8, "little"))
    return digest.hexdigest()


def verify_certificate(document: dict[str, Any], key: bytes, files: dict[str, Path] | None = None,
                       original_model: Path | None = None, dataset: Path | None = None) -> dict[str, Any]:
    """Raise CertificateError naming every problem; return what was checked. `files`: the job's artifacts by name
    (model.safetensors, model.onnx, model.json); `original_model`: the weights the chain started from; `dataset`:
    the training file (.npz), to recompute the forget set's hash from the certified rows."""
    body, signature = document.get("certificate"), document.get("signature") or {}
    if not isinstance(body, dict) or "value" not in signature:
        raise CertificateError(["not a deletion certificate: it needs `certificate` and `signature.value`"])
    problems, checked = [], ["signature"]
    expected = hmac.new(key, canonical(body), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, str(signature["value"])):
        problems.append("signature mismatch: the certificate was changed after signing, or signed with another key")
    for name, path in (files or {}).items():
        certified = (body.get("result") or {}).get(name)
        if certified is None:
            continue
        checked.append(name)
        if _sha256(path) != certified:
            problems.append(f"{name}: sha256 {_sha256(path)} differs from the certified {certified}")
    if original_model is not None:
        checked.append("original model")
        certified = (body.get("original_model") or {}).get("model.safetensors_sha256")
        if _sha256(original_model) != certified:
            problems.append(f"original model: sha256 {_sha256(original_model)} differs from the certified {certified}")
    if dataset is not None:
        checked.append("forget set")
        forget = body.get("forget_set") or {}
        rows = forget.get("file_rows") or []
        if len(rows) != forget.get("size"):
            problems.append(f"forget set: {len(rows)} rows listed, size says {forget.get('size')}")
        recomputed = forget_set_sha256(dataset, rows)
        if recomputed != forget.get("sha256"):
            problems.append(f"forget set: sha256 {recomputed} from {dataset} differs from the certified "
                            f"{forget.get('sha256')}")
    if problems:
        raise CertificateError(problems)
    return {"job_id": body.get("job_id"), "checked": checked}
