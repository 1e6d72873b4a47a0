"""The benchmark suite (`make bench`, issue 12): figures P1–P6, each the platform against a baseline measured in the
same run, written to bench/results/summary.json and summary.md (the README's performance table).

    .venv/bin/python -m bench.run_all [--quick | --smoke] [--results DIR] [--only P1,P4]
    .venv/bin/python -m bench.run_all --scripts   # the older one-off bench scripts, each to its own JSON

--quick takes about five minutes on two cores; --smoke (the test suite's check that the suite works) under a minute.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import RESULTS, free_port, served
from bench.services import PrivateRedis
from bench.suite import SIZES, Row, machine, markdown, write

HERE = Path(__file__).parent
NOT_SCRIPTS = {"__init__", "common", "services", "distill_common", "bare_app", "bare_celery", "run_all", "suite",
               "readme_table", "gpu", "figures_jobs", "figures_serving", "figures_ledger"}


def legacy_scripts() -> None:
    for script in sorted(HERE.glob("*.py")):
        if script.stem in NOT_SCRIPTS:
            continue
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, "-m", f"bench.{script.stem}"], cwd=HERE.parent, check=False)


def figures(size, only: set[str]) -> list[Row]:
    from bench.figures_jobs import p1_training, p2_kd_epoch, p3_dispatch
    from bench.figures_ledger import p6_growth, scratch_database
    from bench.figures_serving import p4_polling, p5_download

    rows: list[Row] = []
    clock = [time.perf_counter()]

    def add(label: str, more: list[Row]) -> None:
        rows.extend(more)
        print(f"{label}: {time.perf_counter() - clock[0]:.0f} s", file=sys.stderr, flush=True)
        clock[0] = time.perf_counter()

    if only & {"P1", "P2", "P3"}:
        with served() as embedded:
            add("embedded platform up", [])
            if "P1" in only:
                add("P1", p1_training(size, embedded))
            if "P2" in only:
                add("P2", p2_kd_epoch(size, embedded))
            if "P3" in only:
                add("P3 embedded", p3_dispatch(size, embedded, "embedded (SQLite, filesystem broker)", ""))
    if only & {"P3", "P4", "P5"}:
        home = Path(tempfile.mkdtemp(prefix="refinery-suite-"))
        redis = PrivateRedis(free_port(), home)
        redis.start()
        try:
            with scratch_database("api") as database_url:
                env = {"REFINERY_DATABASE_URL": database_url, "REFINERY_BROKER_URL": redis.url,
                       "REFINERY_STORAGE_URL": f"file://{home / 'store'}", "REFINERY_RATE_LIMIT_PER_MINUTE": "100000000"}
                with served(env, home) as production:
                    add("production platform up", [])
                    if "P3" in only:
                        add("P3 production", p3_dispatch(size, production, "production shape (Postgres, Redis)",
                                                         redis.url))
                    http = httpx.Client(base_url=production.base, headers=production.headers, timeout=30)
                    job = http.post("/v1/jobs", json={"method": "train", "dataset": {"uri": "builtin://digits"},
                                                      "params": {"epochs": 1}}).json()
                    if "P4" in only:
                        add("P4", p4_polling(size, production, database_url, job["id"]))
                    if "P5" in only:
                        add("P5", p5_download(size, production, database_url, env["REFINERY_STORAGE_URL"], job["id"]))
        finally:
            redis.kill()
    if "P6" in only:
        add("P6", p6_growth(size))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", const="quick", dest="size")
    group.add_argument("--smoke", action="store_const", const="smoke", dest="size")
    group.add_argument("--scripts", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--only", default="P1,P2,P3,P4,P5,P6")
    args = parser.parse_args()
    if args.scripts:
        return legacy_scripts()
    size = SIZES[args.size or "full"]
    started, machine_info = time.time(), machine()
    rows = figures(size, {part.strip().upper() for part in args.only.split(",")})
    summary = write(args.results, size, rows, machine_info, started)
    print(markdown(summary))


if __name__ == "__main__":
    main()
