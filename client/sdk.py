"""`Refinery`: a small typed-enough client over the REST API (httpx), with waiting, SSE events and verified downloads."""
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from client.webhooks import WebhookVerificationError, verify_webhook  # noqa: F401  (re-exported for users)

TERMINAL = ("succeeded", "failed", "cancelled")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class RefineryError(Exception):
    def __init__(self, status: int, error: dict[str, Any]):
        super().__init__(f"{status} {error.get('code')}: {error.get('message')}")
        self.status, self.code, self.message, self.param = status, error.get("code"), error.get("message"), error.get("param")


class Refinery:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                error = response.json().get("error", {})
            except ValueError:
                error = {"code": "http_error", "message": response.text[:300]}
            raise RefineryError(response.status_code, error)
        return response.json()

    # jobs
    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post("/v1/jobs", json=spec, headers=headers))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}"))

    def jobs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every job matching the filters, following the cursor."""
        params = {k: v for k, v in filters.items() if v is not None}
        while True:
            page = self._check(self.http.get("/v1/jobs", params=params))
            yield from page["data"]
            if not page["has_more"]:
                return
            params["after"] = page["data"][-1]["id"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, timeout: float = 3600, poll: float = 1.0) -> dict[str, Any]:
        """The job once it is finished, or as it is when `timeout` runs out. Long-polls: each request waits up to
        30 s on the server for the job to change from the version this client holds (If-None-Match), so a job
        costs about one request per change. `poll` is the pause between requests only against a server that
        answers at once (one without long-polling)."""
        deadline = time.monotonic() + timeout
        response = self.http.get(f"/v1/jobs/{job_id}")
        job = self._check(response)
        while job["status"] not in TERMINAL and (remaining := deadline - time.monotonic()) > 0:
            etag, wait = response.headers.get("etag"), round(max(0.1, min(30.0, remaining)), 1)
            started = time.monotonic()
            response = self.http.get(f"/v1/jobs/{job_id}", params={"wait": wait},
                                     headers={"If-None-Match": etag} if etag else {},
                                     timeout=httpx.Timeout(self.http.timeout.read or 60.0, read=wait + 30.0))
            if response.status_code == 304:
                continue
            job = self._check(response)
            if response.headers.get("etag") in (None, etag) and time.monotonic() - started < min(wait, poll):
                time.sleep(poll)  # the server did not wait: poll as before
        return job

    def events(self, job_id: str, follow: bool = False) -> Iterator[dict[str, Any]]:
        if not follow:
            params: dict[str, Any] = {"limit": 100}
            while True:
                page = self._check(self.http.get(f"/v1/jobs/{job_id}/events", params=params))
                yield from page["data"]
                if not page["has_more"]:
                    return
                params["after"] = page["data"][-1]["id"]
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"},
                              timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                    if "status" in data and "id" not in data:
                        return
                    yield data

    def metrics(self, job_id: str, name: str | None = None) -> dict[str, list[tuple[int, float]]]:
        page = self._check(self.http.get(f"/v1/jobs/{job_id}/metrics", params={"name": name} if name else {}))
        return {s["name"]: [(p["step"], p["value"]) for p in s["points"]] for s in page["data"]}

    # artifacts and files
    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/artifacts"))["data"]

    def download(self, job_id: str, name: str, dest: str | Path) -> Path:
        """Stream to disk, resuming a partial file with Range, then verify the sha256 the server sent."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / name
        partial = dest.with_suffix(dest.suffix + ".part")
        offset = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}", headers=headers) as response:
            if response.status_code >= 400 and response.status_code != 416:
                response.read()
                self._check(response)
            expected = response.headers.get("x-checksum-sha256") or response.headers.get("etag", "").strip('"')
            mode = "ab" if response.status_code == 206 else "wb"
            if response.status_code != 416:
                with open(partial, mode) as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
        digest = _sha256(partial)
        if expected and digest != expected:
            partial.unlink()
            raise RefineryError(0, {"code": "checksum_mismatch", "message": f"{name}: sha256 {digest} != {expected}"})
        partial.replace(dest)
        return dest

    def verify_certificate(self, job_id: str, certificate: str | Path | None = None, key: bytes | None = None,
                           dest: str | Path | None = None, dataset: str | Path | None = None) -> dict[str, Any]:
        """Check an unlearn job's deletion certificate (its own certificate.json, or the file `certificate`) against
        the job's model files and the original model's weights, downloaded into `dest` (a temporary folder when
        unset); raises client.certificates.CertificateError naming what does not hold."""
        import tempfile

        from client.certificates import certificate_key, verify_certificate

        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(dest or scratch)
            folder.mkdir(parents=True, exist_ok=True)
            path = Path(certificate) if certificate else self.download(job_id, "certificate.json", folder)
            document = json.loads(Path(path).read_text())
            names = [a["name"] for a in self.artifacts(job_id)]
            files = {name: self.download(job_id, name, folder) for name in ("model.safetensors", "model.onnx",
                                                                            "model.json") if name in names}
            first = ((document.get("certificate") or {}).get("original_model") or {}).get("uri", "")
            original = None
            if first.startswith("job://") and "/" not in first.removeprefix("job://"):
                (folder / "original").mkdir(exist_ok=True)
                original = self.download(first.removeprefix("job://"), "model.safetensors", folder / "original")
            return verify_certificate(document, key or certificate_key(), files, original,
                                      Path(dataset) if dataset else None)

    def upload(self, path: str | Path, purpose: str = "dataset") -> dict[str, Any]:
        path = Path(path)
        with open(path, "rb") as f:
            return self._check(self.http.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": purpose},
                                              timeout=None))

    def methods(self) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/methods"))["data"]

    # integrations and the dashboard
    def export_mlflow(self, job_id: str, tracking_uri: str, experiment_name: str | None = None,
                      run_name: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """Log a finished job to an MLflow tracking server as a new run; returns {"experiment_id", "run_id",
        "run_url", "artifacts", …}. The server must reach `tracking_uri` (a private address only where the operator
        allows its range)."""
        body: dict[str, Any] = {"tracking_uri": tracking_uri}
        if experiment_name is not None:
            body["experiment_name"] = experiment_name
        if run_name is not None:
            body["run_name"] = run_name
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post(f"/v1/jobs/{job_id}/export/mlflow", json=body, headers=headers))

    def dashboard_url(self, job_id: str, public_url: str | None = None) -> str:
        """The job's page in the web dashboard: under `public_url` (the server's REFINERY_PUBLIC_URL, where people
        reach it) or else this client's base URL."""
        return f"{(public_url or str(self.http.base_url)).rstrip('/')}/ui/jobs/{job_id}"

    # webhooks
    def create_webhook(self, url: str, event_types: list[str] | None = None, description: str | None = None,
                       idempotency_key: str | None = None) -> dict[str, Any]:
        """The new endpoint, with its `secret` (whsec_…): store it now, it is not shown again."""
        body: dict[str, Any] = {"url": url}
        if event_types:
            body["event_types"] = event_types
        if description is not None:
            body["description"] = description
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post("/v1/webhooks", json=body, headers=headers))

    def webhooks(self) -> Iterator[dict[str, Any]]:
        yield from self._pages("/v1/webhooks")

    def webhook(self, webhook_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/webhooks/{webhook_id}"))

    def update_webhook(self, webhook_id: str, **changes: Any) -> dict[str, Any]:
        """Change url, event_types or description; enabled=True re-enables an endpoint disabled after failures."""
        return self._check(self.http.patch(f"/v1/webhooks/{webhook_id}", json=changes))

    def delete_webhook(self, webhook_id: str) -> dict[str, Any]:
        return self._check(self.http.delete(f"/v1/webhooks/{webhook_id}"))

    def rotate_webhook_secret(self, webhook_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/webhooks/{webhook_id}/rotate_secret"))

    def ping_webhook(self, webhook_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/webhooks/{webhook_id}/ping"))

    def webhook_deliveries(self, webhook_id: str) -> Iterator[dict[str, Any]]:
        """Newest first, following the cursor."""
        yield from self._pages(f"/v1/webhooks/{webhook_id}/deliveries")

    def _pages(self, path: str) -> Iterator[dict[str, Any]]:
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self._check(self.http.get(path, params=params))
            yield from page["data"]
            if not page["has_more"]:
                return
            params["after"] = page["data"][-1]["id"]
