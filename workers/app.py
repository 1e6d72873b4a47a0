"""Celery worker entry point: `celery -A workers.app worker --pool=solo`. Registers the run_job task by name."""
from core.broker import RUN_JOB, celery_app
from workers.tasks import execute

app = celery_app


@app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    return execute(job_id)
