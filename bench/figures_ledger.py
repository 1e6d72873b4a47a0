"""Figure P6, cost growth of the ledger: the repository queries the API and the sweeper run (list page, deep keyset
page, get by id, the dispatcher's stale-queued query, an events page) on scratch Postgres databases filled by COPY
with synthetic rows, each size measured side by side with the smallest."""
import contextlib
import json
import os
import statistics
import time

import psycopg
from sqlalchemy import text

from bench.suite import Row, Size, interleaved, row
from db.migrate import upgrade
from db.repositories.events import list_events
from db.repositories.jobs import get_project_job, list_jobs
from db.repositories.outbox import stale_queued_jobs
from db.session import get_sessionmaker

ADMIN = os.environ.get("BENCH_POSTGRES", "host=127.0.0.1 user=postgres dbname=postgres")
PROJECT = "proj_bench"
CALLS = 20  # per query per repetition; the median of these is one repetition's value


def fill(url: str, jobs: int, queued: int, events: int) -> None:
    """`jobs` jobs (the last `queued` of them queued, the rest succeeded), `events` events on job 0. The queued ones
    were published just now, once: due again in 10 s (REFINERY_REDISPATCH_SECONDS' default)."""
    spec = json.dumps({"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 5}})
    now = time.time()
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO projects (id, name, created_at) VALUES (%s, %s, %s)", (PROJECT, "bench", now))
        with cur.copy("COPY jobs (id, project_id, status, method, algorithm, spec, metadata, created_at, attempt, "
                      "max_attempts, cancel_requested, progress, max_seconds, used_seconds, dispatches, "
                      "last_dispatched_at, next_dispatch_at) FROM STDIN") as copy:
            for i in range(jobs):
                is_queued = i >= jobs - queued
                copy.write_row((f"job_{i:012d}", PROJECT, "queued" if is_queued else "succeeded", "train", "sgd",
                                spec, f'{{"team": "t{i % 7}"}}', now - jobs + i, 1, 3, False, "{}", 600, 1.0,
                                1 if is_queued else 0, now if is_queued else None, now + 10 if is_queued else None))
        with cur.copy("COPY job_events (job_id, created_at, level, type, message, data, attempt) FROM STDIN") as copy:
            for i in range(events):
                copy.write_row(("job_000000000000", now + i / 1e3, "info", "train.epoch", f"epoch {i}", "{}", 1))
        conn.commit()
        cur.execute("ANALYZE")


@contextlib.contextmanager
def scratch_database(tag: str):
    name = f"refinery_bench_{tag}_{os.getpid()}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    host = dict(part.split("=") for part in ADMIN.split())
    url = f"postgresql://{host.get('user', 'postgres')}@{host.get('host', '127.0.0.1')}:5432/{name}"
    try:
        yield url
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def queries(session, jobs: int, events: int) -> dict:
    """Each query once: name → callable. Ids chosen so every size asks the same shape of question."""
    middle = f"job_{jobs // 2:012d}"
    last_seq = session.execute(
        text("SELECT max(seq) FROM job_events")).scalar() or 0
    deep_seq = max(0, last_seq - max(1, events // 10))
    no_metadata: dict = {}
    return {
        "list, first page": lambda: list_jobs(session, PROJECT, after=None, limit=20, status=None, method=None,
                                              metadata=no_metadata),
        "list, keyset page in the middle": lambda: list_jobs(session, PROJECT, after=middle, limit=20, status=None,
                                                             method=None, metadata=no_metadata),
        "get by id": lambda: get_project_job(session, PROJECT, middle),
        "dispatcher stale-queued sweep": lambda: stale_queued_jobs(session, time.time()),
        "events page deep in one job": lambda: list_events(session, "job_000000000000", after_seq=deep_seq,
                                                           limit=100),
    }


def timed_ms(call) -> float:
    values = []
    for _ in range(CALLS):
        started = time.perf_counter()
        call()
        values.append(1000 * (time.perf_counter() - started))
    return statistics.median(values)


def p6_growth(size: Size) -> list[Row]:
    small, large = size.ledger_sizes[0], size.ledger_sizes[-1]
    shapes = {n: (size.queued_sizes[1] if n == large else size.queued_sizes[0],
                  size.events_sizes[1] if n == large else size.events_sizes[0]) for n in size.ledger_sizes}
    medians: dict[str, dict[int, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        sessions, fill_seconds = {}, {}
        for n in size.ledger_sizes:
            url = stack.enter_context(scratch_database(str(n)))
            upgrade(url)
            started = time.perf_counter()
            fill(url, n, *shapes[n])
            fill_seconds[n] = round(time.perf_counter() - started, 1)
            sessions[n] = stack.enter_context(get_sessionmaker(url)())
        calls = {n: queries(sessions[n], n, shapes[n][1]) for n in size.ledger_sizes}
        for name in calls[small]:
            for n in size.ledger_sizes:
                calls[n][name]()  # warm the cache and the plan
            for n in size.ledger_sizes[1:]:
                ours, theirs = interleaved(size.repeats, lambda _r, n=n, name=name: timed_ms(calls[n][name]),
                                           lambda _r, name=name: timed_ms(calls[small][name]))
                medians.setdefault(name, {})[n] = ours
                medians[name][small] = theirs
    rows = []
    for name, by_size in medians.items():
        growth = {str(n): statistics.median(v) for n, v in sorted(by_size.items())}
        if name.startswith("dispatcher"):
            label, sizes = "queued jobs", size.queued_sizes
        elif name.startswith("events"):
            label, sizes = "events in the job", size.events_sizes
        else:
            label, sizes = "jobs", (small, large)
        rows.append(row("P6", f"{name}, {sizes[1]:,} vs {sizes[0]:,} {label}", "ms", "≤ 1.5×", by_size[large],
                        by_size[small], f"at {sizes[0]:,}", details={"median_ms_by_ledger_size": growth,
                                                                      "fill_seconds": fill_seconds}))
    rows[0].note = (f"scratch Postgres databases of {' → '.join(f'{n:,}' for n in size.ledger_sizes)} jobs (COPY), "
                    f"median of {CALLS} calls per repetition through the repositories")
    return rows
