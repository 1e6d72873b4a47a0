"""Shared bench plumbing: start the embedded platform (`refinery serve`) in a scratch home and talk to it over HTTP."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_events(http: httpx.Client, job_id: str) -> list[dict]:
    """Every event of a job, following the cursor pages."""
    events, params = [], {"limit": 100}
    while True:
        page = http.get(f"/v1/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        params["after"] = page["data"][-1]["id"]


def worker_pids(parent_pid: int) -> list[int]:
    """The Celery worker processes a supervisor (`refinery serve`) started: its direct celery children."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:]
            if "celery" in line and int(line.split()[1]) == parent_pid]


def celery_log_time(line: str) -> float | None:
    """The stamp of a Celery log line, "[2026-11-30 01:02:03,456: WARNING/MainProcess] …", in local time."""
    match = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None


@dataclass
class Served:
    """A running `refinery serve`: its URL, API key header, home (logs under home/logs) and process."""
    base: str
    headers: dict[str, str]
    home: Path
    proc: subprocess.Popen

    def worker_pids(self) -> list[int]:
        return worker_pids(self.proc.pid)

    def worker_logs(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted((self.home / "logs").glob("worker-*.log")))


@contextlib.contextmanager
def served(extra_env: dict[str, str] | None = None, home: Path | None = None):
    """`refinery serve` (what `make serve` runs) in a scratch home, torn down afterwards. Embedded by default; the
    production shape when extra_env names a postgresql:// database and a redis:// broker."""
    home = home or Path(tempfile.mkdtemp(prefix="refinery-bench-"))
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
        yield Served(base, {"Authorization": f"Bearer {key}"}, home, proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@contextlib.contextmanager
def embedded_platform(extra_env: dict[str, str] | None = None):
    """Yields (base_url, headers) of a served platform."""
    with served(extra_env) as platform:
        yield platform.base, platform.headers


def wait_job(base: str, headers: dict, job_id: str, timeout: float = 900) -> dict:
    """The job once it is final, long-polling (`?wait=`) over one client as the SDK does: a client polling every
    0.2 s with a new connection each time spends CPU beside the job it times, on the same cores."""
    deadline = time.time() + timeout
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        while time.time() < deadline:
            job = http.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
    raise TimeoutError(job_id)


class Canary:
    """Loopback listeners on one port, one per host, counting every connection they accept: a refused URI must
    leave the count at zero. The first host must bind; a later one that cannot (no IPv6 loopback) is left out."""

    def __init__(self, *hosts: str):
        self.connections, self.port, self.sockets = 0, 0, []
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                sock = socket.create_server((host, self.port), family=family)
            except OSError:
                if not self.sockets:
                    raise
                continue
            sock.settimeout(0.05)
            self.port = sock.getsockname()[1]
            self.sockets.append(sock)
        self.running = True
        self.threads = [threading.Thread(target=self._serve, args=(sock,), daemon=True) for sock in self.sockets]
        for thread in self.threads:
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        while self.running:
            try:
                conn, _ = sock.accept()
            except OSError:  # the accept timeout (TimeoutError is an OSError) or a closed socket
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join()
        for sock in self.sockets:
            sock.close()


class WebhookReceiver:
    """A webhook receiver on loopback (tests and benches). `answer(n, request)` gives the status for the n-th request (from 0); it may
    block to play a slow receiver. Every request is recorded with its lower-cased headers, raw body and arrival."""

    def __init__(self, answer=lambda n, request: 200):
        self.requests: list[dict] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = {"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                           "at": time.time(), "path": self.path}
                with receiver.cond:
                    n = len(receiver.requests)
                    receiver.requests.append(request)
                    receiver.cond.notify_all()
                status = answer(n, request)
                with contextlib.suppress(OSError):  # the sender may be gone (timed out, or killed)
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 30) -> list[dict]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.requests) >= count, timeout), \
                f"{len(self.requests)} of {count} requests arrived"
            return list(self.requests)

    def events(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


    def wait_for_id(self, webhook_id: str, timeout: float = 60) -> dict:
        """The first request that carried this webhook-id."""
        def found():
            return next((r for r in self.requests if r["headers"].get("webhook-id") == webhook_id), None)
        with self.cond:
            assert self.cond.wait_for(lambda: found() is not None, timeout), f"{webhook_id} never arrived"
            return found()
