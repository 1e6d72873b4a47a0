"""The worker registry: each worker process reports itself to the ledger (the classes it serves, the job it runs)
every REFINERY_WORKER_REPORT_SECONDS and at each job's start and end; the API turns that into a queued job's
`waiting_for`. Works on Postgres and on the embedded SQLite alike: it is a row per worker process."""
import logging
import threading
import time

from core import resources
from core.settings import Settings, get_settings
from db.repositories import workers
from db.session import transaction

log = logging.getLogger("refinery.worker")

# A queued job's waiting_for reads the registry at most this often per API process (one small indexed select), so
# a poller of a queued job costs no extra query most of the time; a worker that starts shows within this + its
# first report.
CACHE_SECONDS = 2.0
_cache: dict[str, tuple[float, dict[str, int]]] = {}


class Reporter:
    """A worker's row in the registry, kept current by a daemon thread. busy()/idle() wake the thread to report at
    once (off the task's own path: a job's start waits for no extra write), so a queued job's waiting_for tells a
    busy pool from an idle one without waiting for the next periodic report."""

    def __init__(self, settings: Settings, worker_id: str, classes: list[str]):
        self.settings, self.worker_id, self.classes = settings, worker_id, classes
        self.started_at = time.time()
        self.job_id: str | None = None
        self.stopping = threading.Event()
        self.changed = threading.Event()

    def report(self) -> None:
        try:
            with transaction(self.settings.database_url) as session:
                workers.report(session, self.worker_id, self.classes, self.started_at, time.time(), self.job_id)
        except Exception as exc:  # the ledger is down: jobs cannot be claimed either; report again next time
            log.warning("worker registry report failed: %s", exc)

    def busy(self, job_id: str) -> None:
        self.job_id = job_id
        self.changed.set()

    def idle(self) -> None:
        self.job_id = None
        self.changed.set()

    def run(self) -> None:
        while True:
            self.changed.wait(self.settings.worker_report_seconds)
            self.changed.clear()
            if self.stopping.is_set():
                return
            self.report()

    def start(self) -> None:
        self.report()
        threading.Thread(target=self.run, name="refinery-worker-registry", daemon=True).start()

    def stop(self) -> None:
        """A clean shutdown removes the row at once, so its classes stop counting as served."""
        self.stopping.set()
        self.changed.set()
        try:
            with transaction(self.settings.database_url) as session:
                workers.leave(session, self.worker_id)
        except Exception as exc:
            log.warning("worker registry leave failed: %s", exc)


def idle_by_class(url: str, seen_seconds: float) -> dict[str, int]:
    """Live workers' classes → how many of them are idle, as the ledger said at most CACHE_SECONDS ago."""
    now = time.monotonic()
    cached = _cache.get(url)
    if cached and cached[0] > now:
        return cached[1]
    with transaction(url, readonly=True) as session:
        idle = workers.idle_by_class(session, time.time() - seen_seconds)
    _cache[url] = (now + CACHE_SECONDS, idle)
    return idle


def waiting_for(url: str, job) -> dict[str, str] | None:
    """Why a queued job (a Job or a row with status and resource_class) is not running yet; None for other jobs."""
    if job.status != "queued":
        return None
    seen = get_settings().worker_seen_seconds
    return resources.waiting_for(job.resource_class, idle_by_class(url, seen), seen)
