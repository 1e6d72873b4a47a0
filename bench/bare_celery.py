"""The baseline for dispatch latency: a bare Celery task on the platform's broker, configured by the same
core.broker.make_celery (BENCH_HOME and BENCH_BROKER_URL name the platform's home and broker)."""
import os
import time
from pathlib import Path

from celery import Celery

from core.broker import make_celery
from core.settings import Settings

STARTED = "bench.started"
QUEUE = "bench.bare"


def make_app(home: Path, broker_url: str) -> Celery:
    return make_celery(Settings(home=home, broker_url=broker_url, queue=QUEUE))


app = make_app(Path(os.environ.get("BENCH_HOME", ".refinery")), os.environ.get("BENCH_BROKER_URL", ""))


@app.task(name=STARTED)
def started(path: str) -> None:
    Path(path).write_text(repr(time.time()))
