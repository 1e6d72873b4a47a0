"""`refinery serve`: the platform in one process tree — migrations, the bootstrap key, the API (uvicorn,
`REFINERY_API_PROCESSES` processes) and `REFINERY_WORKERS` Celery workers, all supervised: a child that dies is
started again. Same task code as production.
Embedded by default (SQLite, filesystem broker, local store); the production shape on one machine when given
REFINERY_DATABASE_URL=postgresql://… and REFINERY_BROKER_URL=redis://…"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.resources import class_queues
from core.settings import Settings

# Idle keep-alive connections live this long: past typical client pool and load-balancer idle times, so a client
# never reuses a connection the server is closing (uvicorn's 5 s default did that to slow pollers under load).
KEEP_ALIVE_SECONDS = 75
STABLE_SECONDS = 10.0  # a child up this long before it died was not crash-looping


def worker_args(queue: str) -> list[str]:
    """One job per worker process (solo pool) on `queue` (comma-separated queues: core.resources.class_queues);
    gossip, mingle and broker heartbeats are not needed: the ledger's leases are what detect a dead worker."""
    return ["-m", "celery", "-A", "workers.app", "worker", "--pool=solo", "--concurrency=1", "-Q", queue,
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=INFO"]


def api_process_args(settings: Settings) -> list[str]:
    """REFINERY_API_PROCESSES > 1: uvicorn's own supervisor runs that many API processes on one socket (and starts
    a dead one again); each runs the sweeper and the webhook sender, which are safe side by side (conditional
    UPDATEs and leases). Supervised here as one child: the supervisor."""
    return ["--workers", str(settings.api_processes)] if settings.api_processes > 1 else []


def api_key_for(settings: Settings) -> str:
    """The key to print: REFINERY_BOOTSTRAP_TOKEN if set, else one made on first start and kept in
    $REFINERY_HOME/api_key (mode 600) so later starts print the same key."""
    from db.repositories.projects import create_key, find_active_key, get_or_create_project
    from db.session import transaction

    if settings.bootstrap_token:
        return settings.bootstrap_token
    path = settings.home / "api_key"
    with transaction(settings.database_url) as session:
        if path.exists() and find_active_key(session, path.read_text().strip()):
            return path.read_text().strip()
        _, key = create_key(session, get_or_create_project(session, settings.bootstrap_project), name="embedded")
    path.write_text(key)
    path.chmod(0o600)
    return key


class Child:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path):
        self.name, self.args, self.env, self.log_path = name, args, env, log_path
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.quick_deaths = 0  # deaths in a row within STABLE_SECONDS of a start: what the restart delay grows with
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def serve(settings: Settings) -> None:
    from db.migrate import upgrade

    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "logs").mkdir(exist_ok=True)
    upgrade(settings.database_url)
    key = api_key_for(settings)
    env = dict(os.environ, REFINERY_HOME=str(settings.home), REFINERY_DATABASE_URL=settings.database_url,
               REFINERY_BROKER_URL=settings.broker_url, REFINERY_STORAGE_URL=settings.storage_url,
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    logs = settings.home / "logs"
    children = [
        Child("api", ["-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(settings.port),
                      "--timeout-keep-alive", str(KEEP_ALIVE_SECONDS), *api_process_args(settings),
                      "--log-level", "warning"], env, logs / "api.log"),
        *(Child(f"worker-{i + 1}", worker_args(",".join(class_queues(settings.queue, settings.worker_classes))), env,
                logs / f"worker-{i + 1}.log")
          for i in range(max(1, settings.workers))),
    ]
    for child in children:
        child.start()
    base = f"http://127.0.0.1:{settings.port}"
    print(f"Refinery is listening on {base}  (home {settings.home}, logs {logs})", flush=True)
    print(f"  database {settings.database_url}\n  broker   {settings.broker_url}\n  storage  {settings.storage_url}")
    print(f"Try:  curl -H 'Authorization: Bearer {key}' {base}/v1/methods")
    print(f"API key: {key}", flush=True)

    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopping:
            for child in children:
                if not child.alive() and not stopping:
                    code = child.proc.returncode if child.proc else None
                    child.restarts += 1
                    stable = time.monotonic() - child.started_at >= STABLE_SECONDS
                    child.quick_deaths = 0 if stable else child.quick_deaths + 1
                    print(f"{child.name} exited ({code}); restarting (restart {child.restarts})", flush=True)
                    # A child that keeps dying right after it starts is crash-looping: back off, up to 5 s.
                    time.sleep(min(5.0, 0.5 * child.quick_deaths))
                    child.start()
            time.sleep(0.5)
    finally:
        for child in children:
            child.stop()
