"""The Python SDK and the `refinery` CLI as a user drives them against the running platform, plus the per-key
rate limiter."""
import hashlib
import json

from api.dependencies import RateLimiter
from client import Refinery, RefineryError


def test_sdk_submit_follow_download_with_resume(platform, tmp_path):
    rf = Refinery(platform.base, api_key=platform.headers["Authorization"].split()[1])
    job = rf.submit({"method": "train", "dataset": {"uri": "builtin://iris"}, "params": {"epochs": 5},
                     "budget": {"max_seconds": 60}}, idempotency_key="sdk-iris")
    types = [e["type"] for e in rf.events(job["id"], follow=True)]
    assert types[0] == "job.created" and types[-1] == "job.succeeded"
    done = rf.wait(job["id"])
    assert done["status"] == "succeeded"
    assert len(rf.metrics(job["id"], "val_accuracy")["val_accuracy"]) == 5
    whole = platform.http.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    partial = tmp_path / "model.onnx.part"
    partial.write_bytes(whole[:1000])  # an interrupted earlier download
    path = rf.download(job["id"], "model.onnx", tmp_path)
    assert path.read_bytes() == whole and not partial.exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == {a["name"]: a for a in rf.artifacts(job["id"])}[
        "model.onnx"]["sha256"]
    try:
        rf.submit({"method": "train", "dataset": {"uri": "builtin://iris"}, "seed": 9}, idempotency_key="sdk-iris")
        raise AssertionError("a reused key with another body must fail")
    except RefineryError as error:
        assert error.status == 409 and error.code == "idempotency_key_reused"


def test_cli_submit_wait_list_and_download(platform, tmp_path):
    key = platform.headers["Authorization"].split()[1]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"method": "train", "dataset": {"uri": "builtin://wine"}, "params": {"epochs": 3},
                                "budget": {"max_seconds": 60}}))
    base = ["--base-url", platform.base, "--api-key", key]
    out = platform.cli(*base, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split()[0]
    assert job_id.startswith("job_") and '"succeeded"' in out.stdout
    assert job_id in platform.cli(*base, "list", "--limit", "50").stdout
    download = platform.cli(*base, "download", job_id, "report.json", str(tmp_path))
    assert download.returncode == 0 and json.loads((tmp_path / "report.json").read_text())["summary"]["accuracy"] > 0.8
    missing = platform.cli(*base, "get", "job_doesnotexist")
    assert missing.returncode == 2 and "not_found" in missing.stdout


def test_rate_limiter_allows_the_rate_then_asks_to_wait():
    limiter = RateLimiter()
    waits = [limiter.retry_after("key_a", per_minute=5) for _ in range(6)]
    assert waits[:5] == [0.0] * 5 and 0 < waits[5] <= 12.0
    assert limiter.retry_after("key_b", per_minute=5) == 0.0  # per key
