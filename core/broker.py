"""The Celery app both sides share. The API only publishes a job id by task name; the broker only wakes workers."""
from celery import Celery

from core.resources import queue_for
from core.settings import Settings, get_settings

RUN_JOB = "refinery.run_job"
QUEUE = "refinery.jobs"  # the default of REFINERY_QUEUE


def make_celery(settings: Settings) -> Celery:
    app = Celery("refinery", broker=settings.broker_url)
    options: dict = {"visibility_timeout": settings.max_seconds_cap * 2 + 3600}
    if settings.broker_url.startswith("filesystem://"):
        # kombu's filesystem transport: producer and consumer share one folder; polled every 50 ms (DESIGN §2).
        folder = settings.broker_folder
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        options = {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
                   "control_folder": str(folder / "control"), "store_processed": False, "polling_interval": 0.05}
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
    )
    return app


celery_app = make_celery(get_settings())


def publish(job_id: str, queue: str | None = None) -> None:
    """Wake a worker for this job. Failing here loses nothing: the dispatcher sweep publishes again."""
    celery_app.send_task(RUN_JOB, args=[job_id], queue=queue or get_settings().queue, retry=False)


def publish_job(job_id: str, resource_class: str) -> None:
    """Wake a worker of the job's resource class: publish to that class's queue (core/resources.py)."""
    publish(job_id, queue_for(resource_class, get_settings().queue))


def ping_broker() -> bool:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
