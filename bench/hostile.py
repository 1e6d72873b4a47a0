"""Hostile input over HTTP, as an attacker holding a valid key would send it to `refinery serve`: SSRF dataset URIs
aimed at a loopback canary, path traversal and symlinks out of REFINERY_DATA_ROOTS, zip slip, archive links, a zip
bomb, pickles carrying a payload, an oversized streamed upload, a request burst and other projects' ids. Counts
what was tried and what was blocked, and the canary's connections (must be 0) and payload markers (must not exist).

    .venv/bin/python -m bench.hostile

Writes bench/results/hostile.json."""
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np

from bench.common import RESULTS, Canary, Served, served
from core.ids import new_id

TERMINAL = ("succeeded", "failed", "cancelled")


class Payload:
    """Unpickling this creates `marker`: the proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def ssrf_uris(port: int, root: Path) -> list[str]:
    hosts = ["127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]", "2130706433", "0x7f000001", "0177.0.0.1",
             "127.1", "0.0.0.0", "[::]", "127.0.0.2"]  # noqa: S104  (an address to refuse, not to bind)
    uris = [f"https://{host}:{port}/d.npz" for host in hosts]
    uris += ["https://169.254.169.254/latest/meta-data/", "https://[fd00::1]/d.npz", "https://10.0.0.1/d.npz",
             "https://172.16.0.1/d.npz", "https://192.168.1.1/d.npz", "https://100.64.0.1/d.npz",
             f"https://user:secret@127.0.0.1:{port}/d.npz", f"http://127.0.0.1:{port}/d.npz",
             f"ftp://127.0.0.1:{port}/d.npz", f"gopher://127.0.0.1:{port}/_x", f"dict://127.0.0.1:{port}/x",
             "file:///etc/passwd", f"file://{root}/../../../etc/passwd", f"file://{root}/link-out/passwd",
             f"file://{root}/%2e%2e/%2e%2e/etc/passwd", "file://evil.example/etc/passwd"]
    return uris


def archives(outside: Path) -> dict[str, tuple[str, bytes]]:
    """name → (file name, bytes) of hostile archives."""
    png = _png()
    out: dict[str, tuple[str, bytes]] = {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("0/ok.png", png)
        z.writestr(f"../../../../..{outside}/slip.png", png)
    out["zip slip (../)"] = ("slip.zip", buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("0/ok.png", png)
        z.writestr(f"{outside}/absolute.png", png)
    out["zip slip (absolute path)"] = ("abs.zip", buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("0/link.png")
        info.external_attr = 0o120777 << 16  # a symlink member
        z.writestr(info, "/etc/passwd")
    out["zip symlink member"] = ("link.zip", buf.getvalue())
    for kind, make in (("symlink", tarfile.SYMTYPE), ("hard link", tarfile.LNKTYPE), ("device", tarfile.CHRTYPE)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo("0/x.png")
            info.type, info.linkname = make, "/etc/passwd"
            t.addfile(info)
        out[f"tar {kind} member"] = (f"{kind.replace(' ', '')}.tar", buf.getvalue())
    buf = io.BytesIO()
    zeros = bytes(64 * 2**20)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z, \
            z.open("0/bomb.png", "w", force_zip64=True) as member:
        for _ in range(72):  # 4.5 GiB of zeros, a few MB compressed
            member.write(zeros)
    out["zip bomb (4.5 GiB unpacked)"] = ("bomb.zip", buf.getvalue())
    return out


def _png() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Attack:
    def __init__(self, platform: Served):
        self.platform = platform
        self.http = httpx.Client(base_url=platform.base, headers=platform.headers, timeout=120)
        self.rows: list[dict] = []

    def job_outcome(self, spec: dict) -> tuple[str, str]:
        """('rejected', code) for a 4xx at submit, else the job's final (status, error code)."""
        response = self.http.post("/v1/jobs", json=spec)
        if response.status_code != 201:
            return f"rejected {response.status_code}", response.json()["error"]["code"]
        job_id = response.json()["id"]
        for _ in range(600):
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in TERMINAL:
                return job["status"], (job.get("error") or {}).get("code", "")
            time.sleep(0.5)
        return "timeout", ""

    def record(self, group: str, name: str, outcome: tuple[str, str]) -> None:
        blocked = outcome[0] != "succeeded" and outcome[0] != "timeout"
        self.rows.append({"group": group, "input": name, "outcome": outcome[0], "code": outcome[1],
                          "blocked": blocked})
        print(f"{'blocked' if blocked else 'NOT BLOCKED':12} {group:10} {name[:70]:70} {outcome}", flush=True)

    def upload(self, filename: str, content: bytes, purpose: str = "dataset") -> str:
        response = self.http.post("/v1/files", files={"file": (filename, content)}, data={"purpose": purpose})
        assert response.status_code == 201, response.text
        return response.json()["id"]


def api_rss(platform: Served) -> int:
    out = subprocess.run(["ps", "-eo", "pid,ppid,rss,args"], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[2]) * 1024 for line in out.splitlines()[1:]
                if "uvicorn" in line and int(line.split()[1]) == platform.proc.pid)


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="refinery-hostile-"))
    root = home / "data"
    root.mkdir()
    (root / "link-out").symlink_to("/etc")
    outside = Path(tempfile.mkdtemp(prefix="refinery-outside-"))
    markers = [outside / f"pwned-{i}" for i in range(3)]
    canary = Canary("127.0.0.1", "::1")
    env = {"REFINERY_DATA_ROOTS": str(root), "REFINERY_MAX_UPLOAD_BYTES": str(50 * 2**20),
           "REFINERY_RATE_LIMIT_PER_MINUTE": "1200"}
    with served(env, home) as platform:
        attack = Attack(platform)
        for uri in ssrf_uris(canary.port, root):
            attack.record("dataset uri", uri, attack.job_outcome({"method": "train", "dataset": {"uri": uri}}))
        for name, (filename, content) in archives(outside).items():
            file_id = attack.upload(filename, content)
            attack.record("archive", name, attack.job_outcome({"method": "train", "dataset": {"uri": file_id}}))
        weights = attack.upload("weights.pt", pickle.dumps({"state_dict": Payload(markers[0])}), purpose="model")
        attack.record("pickle", "torch .pt weights with a payload", attack.job_outcome(
            {"method": "train", "dataset": {"uri": "builtin://digits"}, "model": {"uri": weights, "arch": "mlp"}}))
        pth = attack.upload("weights.pth", pickle.dumps(Payload(markers[1])), purpose="model")
        attack.record("pickle", "a .pth pickle with a payload", attack.job_outcome(
            {"method": "train", "dataset": {"uri": "builtin://digits"}, "model": {"uri": pth, "arch": "mlp"}}))
        buf = io.BytesIO()
        np.savez(buf, x=np.array([Payload(markers[2])] * 4, dtype=object), y=np.zeros(4, dtype=np.int64))
        npz = attack.upload("objects.npz", buf.getvalue())
        attack.record("pickle", ".npz with an object array (a pickle inside)", attack.job_outcome(
            {"method": "train", "dataset": {"uri": npz}}))
        # An upload past the limit, streamed without Content-Length: refused, and the API does not buffer it.
        before = api_rss(platform)

        def chunks():
            yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n\r\n'
            for _ in range(500):
                yield bytes(2**20)
        with_status = attack.http.post("/v1/files", content=chunks(),
                                       headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        growth = api_rss(platform) - before
        attack.record("upload", "500 MiB streamed upload, limit 50 MiB", (f"rejected {with_status.status_code}",
                                                                          with_status.json()["error"]["code"]))
        # Another project's key on this project's objects.
        other = subprocess.run([str(Path(sys.executable).parent / "refinery"), "keys", "create", "--project",
                                "intruder"], env={**os.environ, "REFINERY_HOME": str(home)}, capture_output=True,
                               text=True, check=True).stdout.strip().splitlines()[-1]
        job_id = attack.http.post("/v1/jobs", json={"method": "train", "dataset": {"uri": "builtin://iris"}}).json()["id"]
        intruder = httpx.Client(base_url=platform.base, headers={"Authorization": f"Bearer {other}"})
        missing_id = new_id("job")
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/artifacts",
                     f"/v1/jobs/{job_id}/artifacts/model.onnx"):
            theirs, missing = intruder.get(path), intruder.get(path.replace(job_id, missing_id))
            same = theirs.status_code == 404 and theirs.text.replace(job_id, missing_id) == missing.text
            attack.record("isolation", f"GET {path.replace(job_id, '{other project job}')}",
                          (f"rejected {theirs.status_code}" if same else "exposed", theirs.json()["error"]["code"]))
        # A burst over the per-key limit.
        statuses, retry_after = [], set()
        for _ in range(1500):
            response = intruder.get("/v1/jobs")
            statuses.append(response.status_code)
            if response.status_code == 429:
                retry_after.add(response.headers.get("retry-after"))
        throttled = statuses.count(429)
        attack.record("burst", "1500 requests in a burst, limit 1200/min", (f"rejected 429 x{throttled}",
                                                                            f"Retry-After {sorted(retry_after)}")
                      if throttled and None not in retry_after else ("succeeded", ""))
        log = platform.worker_logs()
    canary.close()
    escaped = sorted(str(p) for p in outside.rglob("*"))
    summary = {"tried": len(attack.rows), "blocked": sum(r["blocked"] for r in attack.rows),
               "canary_connections": canary.connections, "payload_markers_created": sum(m.exists() for m in markers),
               "files_written_outside": escaped, "api_rss_growth_during_oversized_upload_mib": round(growth / 2**20, 1),
               "worker_tracebacks": len(re.findall(r"Traceback", log)), "inputs": attack.rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "inputs"}, indent=1))


if __name__ == "__main__":
    main()
