"""Throughput across workers (issue 13): 200 short training jobs through the production shape — `refinery serve` with
REFINERY_WORKERS = 1, 2 and 4 Celery worker processes on a private Postgres cluster and a private Redis server — and
how many jobs a minute each finishes, its scaling efficiency against 1 worker, and that none is lost: every job ends
`succeeded` after exactly one attempt (attempt 1, one job.started and one job.succeeded event in the ledger).

Each run starts on a fresh database, waits until all its workers have reported to the ledger's worker registry,
warms each worker up with one job (imports, first ONNX export), then POSTs the jobs at once and times from the first
POST to the last job's finished_at in the ledger. A job is an MLP on iris for one epoch, so the figure is the
platform's per-job cost (claim, data, export, artifacts, report, events), not training.

    .venv/bin/python -m bench.soak_scaling [--jobs 200] [--workers 1,2,4]

Writes bench/results/soak_scaling.json. The machine's cores bound the figure: with fewer cores than workers, more
workers cannot go faster (the load averages before and after each run are in the file)."""
import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

from bench.common import RESULTS, free_port, served
from bench.services import PrivateRedis, private_postgres

SPEC = {"method": "train", "dataset": {"uri": "builtin://iris"}, "params": {"epochs": 1},
        "budget": {"max_seconds": 300}}
ENV = {"REFINERY_RATE_LIMIT_PER_MINUTE": "1000000", "REFINERY_WORKER_REPORT_SECONDS": "1",
       "REFINERY_SWEEP_SECONDS": "1", "REFINERY_REDISPATCH_SECONDS": "30"}
TERMINAL = ("succeeded", "failed", "cancelled")


def wait_for(check, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(what)


def submit(http: httpx.Client, count: int, tag: str) -> list[str]:
    ids = []
    for i in range(count):
        response = http.post("/v1/jobs", json={**SPEC, "seed": i, "metadata": {"soak": tag}})
        response.raise_for_status()
        ids.append(response.json()["id"])
    return ids


def finished(db: psycopg.Connection, ids: list[str]) -> bool:
    done = db.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status = ANY(%s)",
                      (ids, list(TERMINAL))).fetchone()[0]
    return done == len(ids)


def run(postgres, redis: PrivateRedis, workers: int, jobs: int, home: Path) -> dict:
    url = postgres.create_database(f"soak_w{workers}")
    env = {**ENV, "REFINERY_WORKERS": str(workers), "REFINERY_DATABASE_URL": url, "REFINERY_BROKER_URL": redis.url,
           "REFINERY_QUEUE": f"refinery.soak.w{workers}", "REFINERY_STORAGE_URL": f"file://{home / 'store'}"}
    run_home = home / f"w{workers}"
    run_home.mkdir()
    with served(env, run_home) as platform, psycopg.connect(url, autocommit=True) as db, \
            httpx.Client(base_url=platform.base, headers=platform.headers, timeout=60) as http:
        wait_for(lambda: db.execute("SELECT count(*) FROM workers WHERE seen_at > %s",
                                    (time.time() - 5,)).fetchone()[0] >= workers, 120, f"{workers} workers")
        warm = submit(http, workers, "warm-up")
        wait_for(lambda: finished(db, warm), 300, "warm-up jobs")
        load_before = os.getloadavg()
        started = time.time()
        ids = submit(http, jobs, "timed")
        submitted = time.time()
        wait_for(lambda: finished(db, ids), 3600, f"{jobs} jobs on {workers} workers", every=0.25)
        rows = db.execute("SELECT id, status, attempt, worker, started_at, finished_at, created_at FROM jobs "
                          "WHERE id = ANY(%s)", (ids,)).fetchall()
        events = dict(((job_id, kind), count) for job_id, kind, count in db.execute(
            "SELECT job_id, type, count(*) FROM job_events WHERE job_id = ANY(%s) AND type IN "
            "('job.started', 'job.succeeded') GROUP BY job_id, type", (ids,)).fetchall())
        load_after = os.getloadavg()
    last = max(r[5] for r in rows)
    seconds = last - started
    once = [r[0] for r in rows if r[1] == "succeeded" and r[2] == 1 and events.get((r[0], "job.started")) == 1
            and events.get((r[0], "job.succeeded")) == 1]
    per_worker: dict[str, int] = {}
    for r in rows:
        per_worker[r[3]] = per_worker.get(r[3], 0) + 1
    run_seconds = sorted(r[5] - r[4] for r in rows)
    return {"workers": workers, "jobs": jobs, "seconds": round(seconds, 2),
            "jobs_per_minute": round(60 * jobs / seconds, 1),
            "submit_seconds": round(submitted - started, 2),
            "lost": sum(r[1] != "succeeded" for r in rows),
            "not_exactly_one_successful_attempt": jobs - len(once),
            "jobs_per_worker": sorted(per_worker.values(), reverse=True),
            "job_run_seconds_p50": round(statistics.median(run_seconds), 3),
            "job_run_seconds_p90": round(run_seconds[int(0.9 * (len(run_seconds) - 1))], 3),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak_scaling.json")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    home = Path(tempfile.mkdtemp(prefix="refinery-soak-"))
    redis = PrivateRedis(free_port(), home)
    redis.start()
    began = time.time()
    runs = []
    try:
        with private_postgres(free_port()) as postgres:
            for workers in counts:
                runs.append(run(postgres, redis, workers, args.jobs, home))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        redis.kill()
    base = next((r for r in runs if r["workers"] == 1), None)
    for r in runs:
        if base:
            r["speedup_vs_1"] = round(r["jobs_per_minute"] / base["jobs_per_minute"], 3)
            r["scaling_efficiency_vs_1"] = round(r["speedup_vs_1"] / r["workers"], 3)
    figures = {"command": f"python -m bench.soak_scaling --jobs {args.jobs} --workers {args.workers}",
               "job": SPEC, "shape": "refinery serve (API + REFINERY_WORKERS Celery solo workers), private Postgres "
                                     "cluster and Redis server on loopback",
               "cpu_count": os.cpu_count(), "runs": runs, "lost_total": sum(r["lost"] for r in runs),
               "seconds_total": round(time.time() - began, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "runs"}))


if __name__ == "__main__":
    main()
