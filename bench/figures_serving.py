"""Figures P4 and P5 against the production shape: GET /v1/jobs/{id} under 8 and 200 clients against a bare FastAPI
endpoint doing the same primary-key read on the same database (P4); a large artifact download against nginx with
sendfile serving the same file, and the serving process's RSS meanwhile (P5)."""
import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.api_latency import bare_server
from bench.common import Served, free_port
from bench.load_polling import _load
from bench.suite import Row, Size, environ, interleaved, row, skipped
from core.storage import ArtifactStore
from db.models import Artifact
from db.session import get_sessionmaker


def p4_polling(size: Size, platform: Served, database_url: str, job_id: str) -> list[Row]:
    rows = []
    with environ(BENCH_BARE_DATABASE_URL=database_url, BENCH_BARE_JOB_ID=job_id), bare_server() as bare_url:
        for clients in (8, 200):
            ours, theirs = [], []

            def load(base, headers, path, into, clients=clients):
                def run(_rep: int) -> float:
                    into.append(asyncio.run(_load(base, headers, [[path]], clients, size.poll_seconds)))
                    return into[-1]["per_second"]
                return run

            interleaved(size.repeats, load(platform.base, platform.headers, f"/v1/jobs/{job_id}", ours),
                        load(bare_url.removesuffix("/job"), {}, "/job", theirs))
            errors = {"platform": sum(r["errors"] for r in ours), "baseline": sum(r["errors"] for r in theirs)}
            for key, label, unit, goal in (("per_second", "throughput", "req/s", "≥ 0.6×"),
                                           ("p50_ms", "p50", "ms", ""), ("p99_ms", "p99", "ms", "≤ 1.5×")):
                rows.append(row("P4", f"GET /v1/jobs/{{id}} {label}, {clients} clients", unit, goal, [r[key] for r in ours],
                                [r[key] for r in theirs], "bare FastAPI, same PK read", details=errors))
    rows[0].note = (f"one API process each, Postgres; {size.poll_seconds:g} s of load per repetition from one "
                    "asyncio httpx client process on the same cores")
    return rows


def _tree_rss_mb(root_pid: int, skip: str = "celery") -> float:
    """Resident memory (MB) of a process and its descendants, leaving out those whose command line has `skip`."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,rss,args"], capture_output=True, text=True, check=True).stdout
    procs = [line.split(None, 3) for line in out.splitlines()[1:]]
    children: dict[int, list] = {}
    for pid, ppid, rss, args in procs:
        children.setdefault(int(ppid), []).append((int(pid), int(rss), args))
    total, stack = 0, [root_pid]
    own = next((int(rss) for pid, _, rss, _ in procs if int(pid) == root_pid), 0)
    total += own
    while stack:
        for pid, rss, args in children.get(stack.pop(), []):
            if skip not in args:
                total += rss
                stack.append(pid)
    return total / 1024


def download(url: str, headers: dict, pid: int) -> tuple[float, float, float]:
    """(MB/s, the serving process tree's RSS growth in MB during the download: peak less before, its peak RSS)."""
    before = _tree_rss_mb(pid)
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(_tree_rss_mb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    received, started = 0, time.perf_counter()
    try:
        with httpx.stream("GET", url, headers=headers, timeout=120) as response:
            response.raise_for_status()
            for chunk in response.iter_raw(1024 * 1024):
                received += len(chunk)
    finally:
        done.set()
        sampler.join()
    return received / 1e6 / (time.perf_counter() - started), max(peak) - before, max(peak)


@contextlib.contextmanager
def nginx(root: Path):
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if binary is None:
        yield None
        return
    prefix, port = Path(tempfile.mkdtemp(prefix="refinery-nginx-")), free_port()
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read the platform's store
    temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                        "scgi"))
    (prefix / "nginx.conf").write_text(f"""{user} worker_processes 1; daemon off; pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{ access_log off; sendfile on; tcp_nopush on; {temp}
  server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }} }}
""")
    proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/")
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def p5_download(size: Size, platform: Served, database_url: str, storage_url: str, job_id: str) -> list[Row]:
    figure = f"download of a {size.download_mb} MB artifact"
    source = Path(tempfile.mkdtemp(prefix="refinery-p5-")) / "artifact.bin"
    with open(source, "wb") as f:
        for _ in range(size.download_mb):
            f.write(os.urandom(1024 * 1024))
    store = ArtifactStore(storage_url)
    key, sha, nbytes = store.put_file(str(source))
    source.unlink()
    with get_sessionmaker(database_url)() as session:
        session.add(Artifact(id=f"art_bench{time.time_ns()}", job_id=job_id, name="bench.bin", size=nbytes, sha256=sha,
                             content_type="application/octet-stream", storage_key=key, created_at=time.time()))
        session.commit()
    blob = Path(store.local_path(key))
    with nginx(blob.parent) as served_by_nginx:
        if served_by_nginx is None:
            return [skipped("P5", figure, "nginx is not installed (apt-get install -y nginx)")]
        nginx_url, nginx_pid = served_by_nginx
        ours, theirs = [], []

        def measure(url, headers, pid, into):
            def run(_rep: int) -> float:
                into.append(download(url, headers, pid))
                return into[-1][0]
            return run

        interleaved(size.repeats, measure(f"{platform.base}/v1/jobs/{job_id}/artifacts/bench.bin", platform.headers,
                                          platform.proc.pid, ours),
                    measure(f"{nginx_url}/{blob.name}", {}, nginx_pid, theirs))
    note = ("local store, one client on loopback; RSS = the serving process tree (refinery serve's supervisor and API "
            "process, workers left out; nginx master and worker), peak of 50 ms samples less the RSS before")
    return [row("P5", figure, "MB/s", "≥ 0.7×", [r[0] for r in ours], [r[0] for r in theirs], "nginx sendfile",
                note=note),
            row("P5", "serving RSS growth during the download", "MB", "flat", [r[1] for r in ours],
                [r[1] for r in theirs], "nginx sendfile",
                details={"peak_rss_mb": {"platform": [r[2] for r in ours], "baseline": [r[2] for r in theirs]}})]
