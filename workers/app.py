"""Celery worker entry point: `celery -A workers.app worker --pool=solo`. Registers the run_job task by name (and
join_job, which makes this worker one node of another worker's multi-node attempt); consumes
the queues of the resource classes in REFINERY_WORKER_CLASSES (core/resources.py); reports itself to the ledger's
worker registry (db/worker_registry.py); and on Redis starts the stalled-consumer watchdog (workers/watchdog.py) over
those queues."""
from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutdown
from kombu import Exchange, Queue

from core.broker import RUN_JOB, celery_app
from core.resources import class_queues, parse_classes
from core.settings import get_settings
from db.worker_registry import Reporter
from workers.distributed import JOIN_JOB
from workers.runtime import worker_name
from workers.tasks import execute, join
from workers.watchdog import Watchdog, redis_queue_depth

app = celery_app
# Declared the way a publisher's send_task(queue=name) declares a queue it does not know (a direct exchange of the
# same name), so both sides agree on every transport.
app.conf.task_queues = [Queue(name, Exchange(name), routing_key=name)
                        for name in class_queues(get_settings().queue, get_settings().worker_classes)]
watchdog: Watchdog | None = None
reporter: Reporter | None = None


@app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    return execute(job_id)


# Acknowledged on receipt: a join that dies with its worker is not worth redelivering (the leader's rendezvous times
# out and the job is requeued), and the worker registry shows this worker busy with the job while it serves.
@app.task(name=JOIN_JOB, acks_late=False, ignore_result=True)
def join_job(job_id: str, attempt: int, endpoint: str, leader: str, control_port: int) -> str:
    return join(job_id, attempt, endpoint, leader, control_port)


@worker_ready.connect
def _start(**_) -> None:
    global watchdog, reporter
    settings = get_settings()
    # REFINERY_WORKER_CLASSES is what this worker serves: it reports those classes, and the watchdog watches their
    # queues (a `-Q`, as `refinery serve` passes, names the same queues).
    reporter = Reporter(settings, worker_name(), parse_classes(settings.worker_classes))
    reporter.start()
    if settings.broker_url.startswith(("redis://", "rediss://")) and settings.worker_stall_seconds > 0:
        depths = [redis_queue_depth(settings.broker_url, name)
                  for name in class_queues(settings.queue, settings.worker_classes)]
        watchdog = Watchdog(lambda: sum(depth() for depth in depths), settings.worker_stall_seconds)
        watchdog.start()


@worker_shutdown.connect
def _stop(**_) -> None:
    if reporter:
        reporter.stop()


@task_prerun.connect
def _busy(args=None, **_) -> None:
    if watchdog:
        watchdog.busy.set()
    if reporter and args:
        reporter.busy(str(args[0]))


@task_postrun.connect
def _idle(**_) -> None:
    if watchdog:
        watchdog.busy.clear()
    if reporter:
        reporter.idle()
