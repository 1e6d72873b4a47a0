"""The baseline for API latency: a bare FastAPI endpoint doing the read GET /v1/jobs/{id} must do — one primary-key
select of a job's public columns, through SQLAlchemy Core on a pooled engine — and nothing else (no auth, no rate
limit, no schema). BENCH_BARE_DATABASE_URL and BENCH_BARE_JOB_ID point it at the platform's database and a job there;
without them it reads a one-job SQLite file it makes itself.

    .venv/bin/python -m uvicorn bench.bare_app:app --port 8001   # GET /job
"""
import os
import tempfile
import time

from fastapi import FastAPI
from sqlalchemy import insert, select

from db.models import Base, Job, Project
from db.session import get_engine

COLUMNS = (Job.id, Job.status, Job.method, Job.algorithm, Job.spec, Job.created_at, Job.started_at, Job.finished_at,
           Job.attempt, Job.max_attempts, Job.cancel_requested, Job.progress, Job.max_seconds, Job.used_seconds,
           Job.result, Job.error, Job.metadata_)


def _own_database() -> tuple[str, str]:
    url = f"sqlite:///{tempfile.mkdtemp(prefix='refinery-bare-')}/bare.db"
    engine = get_engine(url)
    Base.metadata.create_all(engine, tables=[Project.__table__, Job.__table__])
    with engine.begin() as conn:
        conn.execute(insert(Project).values(id="proj_0", name="bare", created_at=time.time()))
        conn.execute(insert(Job).values(
            id="job_0", project_id="proj_0", status="running", method="train", algorithm="sgd",
            spec={"x": list(range(40))}, metadata_={}, created_at=time.time(), attempt=1, max_attempts=3,
            cancel_requested=False, progress={"fraction": 0.5}, max_seconds=600, used_seconds=0.0, dispatches=0))
    return url, "job_0"


if "BENCH_BARE_DATABASE_URL" in os.environ:
    URL, JOB_ID = os.environ["BENCH_BARE_DATABASE_URL"], os.environ["BENCH_BARE_JOB_ID"]
else:
    URL, JOB_ID = _own_database()
engine = get_engine(URL)
app = FastAPI()


@app.get("/job")
def job():
    with engine.connect() as conn:
        row = conn.execute(select(*COLUMNS).where(Job.id == JOB_ID)).one()
    return dict(row._mapping)
