"""Celery worker entry point: `celery -A workers.app worker --pool=solo`. Registers the run_job task by name, and on
Redis starts the stalled-consumer watchdog (workers/watchdog.py)."""
from celery.signals import task_postrun, task_prerun, worker_ready

from core.broker import RUN_JOB, celery_app
from core.settings import get_settings
from workers.tasks import execute
from workers.watchdog import Watchdog, redis_queue_depth

app = celery_app
watchdog: Watchdog | None = None


@app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    return execute(job_id)


@worker_ready.connect
def _start_watchdog(**_) -> None:
    global watchdog
    settings = get_settings()
    if settings.broker_url.startswith(("redis://", "rediss://")) and settings.worker_stall_seconds > 0:
        watchdog = Watchdog(redis_queue_depth(settings.broker_url, settings.queue), settings.worker_stall_seconds)
        watchdog.start()


@task_prerun.connect
def _busy(**_) -> None:
    if watchdog:
        watchdog.busy.set()


@task_postrun.connect
def _idle(**_) -> None:
    if watchdog:
        watchdog.busy.clear()
