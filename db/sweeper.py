"""The dispatcher and reaper sweep: the ledger's guarantee that no job is lost when a broker message or a worker is.
Safe to run in every API replica at once: each step is a conditional UPDATE or an idempotent publish."""
import logging
import threading
import time

from core.broker import publish
from core.settings import Settings
from db.lifecycle import reap_expired
from db.repositories import outbox
from db.session import transaction

log = logging.getLogger("refinery.sweeper")


def publish_and_mark(url: str, job_id: str, queue: str) -> bool:
    try:
        publish(job_id, queue)
    except Exception as exc:  # broker down: the job stays in the outbox and the next sweep tries again
        log.warning("publish of %s failed: %s", job_id, exc)
        return False
    with transaction(url) as session:
        outbox.mark_published(session, job_id)
    return True


def sweep_once(settings: Settings) -> dict[str, int]:
    url = settings.database_url
    with transaction(url) as session:
        reaped = reap_expired(session)
    with transaction(url) as session:
        pending = [m.job_id for m in outbox.pending(session)]
        stale = outbox.stale_queued_jobs(session, time.time(), settings.redispatch_seconds,
                                         settings.redispatch_max_seconds)
    published = sum(publish_and_mark(url, job_id, settings.queue) for job_id in dict.fromkeys(pending + stale))
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
