"""Shared bench plumbing: start the embedded platform (`refinery serve`) in a scratch home and talk to it over HTTP."""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_platform(extra_env: dict[str, str] | None = None):
    """Yields (base_url, headers). Same command a user runs; torn down afterwards."""
    home = Path(tempfile.mkdtemp(prefix="refinery-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFINERY_")}
    env.update(REFINERY_HOME=str(home), REFINERY_PORT=str(free_port()), OMP_NUM_THREADS="1", **(extra_env or {}))
    log = open(home / "serve.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "refinery"), "serve"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{env['REFINERY_PORT']}"
    try:
        for _ in range(240):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        key = re.search(r"API key: (\S+)", (home / "serve.log").read_text()).group(1)
        yield base, {"Authorization": f"Bearer {key}"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def wait_job(base: str, headers: dict, job_id: str, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)
