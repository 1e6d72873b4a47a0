"""The dispatcher and reaper sweep: the ledger's guarantee that no job is lost when a broker message or a worker is.
Safe to run in every API replica at once: each step is a conditional UPDATE or an idempotent publish. Each job is
published to its resource class's queue (core/resources.py)."""
import logging
import threading
import time

from core.broker import publish
from core.resources import queue_for
from core.settings import Settings
from db.lifecycle import reap_expired
from db.repositories import outbox, workers
from db.session import transaction

log = logging.getLogger("refinery.sweeper")
FORGET_WORKERS_SECONDS = 24 * 3600  # a worker row not seen for a day is deleted


def publish_and_mark(settings: Settings, job_id: str, resource_class: str) -> bool:
    try:
        publish(job_id, queue_for(resource_class, settings.queue))
    except Exception as exc:  # broker down: the job stays in the outbox and the next sweep tries again
        log.warning("publish of %s failed: %s", job_id, exc)
        return False
    with transaction(settings.database_url) as session:
        outbox.mark_published(session, job_id, settings.redispatch_seconds, settings.redispatch_max_seconds)
    return True


def sweep_once(settings: Settings) -> dict[str, int]:
    url = settings.database_url
    with transaction(url) as session:
        reaped = reap_expired(session)
    now = time.time()  # after the reap, so the jobs it requeued (due at its own now) are published in this sweep
    with transaction(url) as session:
        due = dict(outbox.pending_jobs(session) + outbox.stale_queued_jobs(session, now))
        workers.forget(session, now - FORGET_WORKERS_SECONDS)
    published = sum(publish_and_mark(settings, job_id, resource_class) for job_id, resource_class in due.items())
    return {"reaped": len(reaped), "published": published}


def run_forever(settings: Settings, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            sweep_once(settings)
        except Exception:
            log.exception("sweep failed; retrying")
        stop.wait(settings.sweep_seconds)


def start_thread(settings: Settings) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=run_forever, args=(settings, stop), name="refinery-sweeper", daemon=True)
    thread.start()
    return thread, stop
