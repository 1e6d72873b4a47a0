"""Status polling under load on the production shape: 200 concurrent clients, each polling a job's status and listing
its events in a loop for 60 s, while two workers train jobs — `refinery serve` (one API process) with
REFINERY_WORKERS=2 on a private Postgres and Redis. Beside it, the same 200 clients against a bare FastAPI endpoint
(bench/bare_app.py: no auth, no database) served the same way, as the baseline ratio. Client, server and training
share the machine's 2 cores.

    .venv/bin/python -m bench.load_polling [--clients 200] [--seconds 60] [--api-processes 1]

Writes bench/results/load_polling.json (load_polling_processesN.json with --api-processes N > 1, where the bare
endpoint runs N uvicorn workers too)."""
import argparse
import asyncio
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.api_latency import bare_server
from bench.common import RESULTS, free_port, served
from bench.services import PrivateRedis, private_postgres


async def _client(http: httpx.AsyncClient, paths: list[str], stop_at: float, latencies: list[float],
                  outcomes: collections.Counter) -> None:
    turn = 0
    while time.monotonic() < stop_at:
        path = paths[turn % len(paths)]
        turn += 1
        started = time.perf_counter()
        try:
            status = (await http.get(path)).status_code
        except httpx.HTTPError as exc:
            outcomes[type(exc).__name__] += 1
            continue
        latencies.append(time.perf_counter() - started)
        outcomes[status] += 1


async def _load(base: str, headers: dict, paths: list[list[str]], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    outcomes: collections.Counter = collections.Counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120, limits=limits) as http:
        stop_at = time.monotonic() + seconds
        started = time.monotonic()
        await asyncio.gather(*(_client(http, paths[i % len(paths)], stop_at, latencies, outcomes)
                               for i in range(clients)))
        elapsed = time.monotonic() - started
    latencies.sort()
    ok = outcomes.get(200, 0)
    return {"requests": sum(outcomes.values()), "ok": ok, "errors": sum(outcomes.values()) - ok,
            "outcomes": {str(k): v for k, v in outcomes.items()}, "per_second": round(ok / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
            "max_ms": round(1000 * latencies[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--api-processes", type=int, default=1)
    args = parser.parse_args()
    with bare_server(args.api_processes) as url:
        bare = asyncio.run(_load(url.removesuffix("/job"), {}, [["/job"]], args.clients, args.seconds))
    print(f"bare FastAPI: {bare}", flush=True)
    home = Path(tempfile.mkdtemp(prefix="refinery-load-"))
    redis = PrivateRedis(free_port(), home)
    redis.start()
    try:
        with private_postgres(free_port()) as postgres:
            env = {"REFINERY_DATABASE_URL": postgres.create_database("refinery"), "REFINERY_BROKER_URL": redis.url,
                   "REFINERY_STORAGE_URL": f"file://{home / 'store'}", "REFINERY_WORKERS": "2",
                   "REFINERY_RATE_LIMIT_PER_MINUTE": "100000000", "REFINERY_API_PROCESSES": str(args.api_processes)}
            with served(env, home) as platform:
                http = httpx.Client(base_url=platform.base, headers=platform.headers, timeout=30)
                ids = [http.post("/v1/jobs", json={"method": "train", "dataset": {"uri": "builtin://digits"},
                                                   "params": {"epochs": 400}, "budget": {"max_seconds": 900},
                                                   "seed": seed}).json()["id"] for seed in range(8)]
                paths = [[f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events?limit=50"] for job_id in ids]
                time.sleep(5)  # the workers are training when the load starts
                load = asyncio.run(_load(platform.base, platform.headers, paths, args.clients, args.seconds))
                statuses = collections.Counter(http.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in ids)
                for job_id in ids:
                    http.post(f"/v1/jobs/{job_id}/cancel")
    finally:
        redis.kill()
    summary = {"clients": args.clients, "seconds": args.seconds,
               "setting": f"{args.api_processes} uvicorn API process(es), 2 training workers, private Postgres + "
                          "Redis, 2 shared cores; each client alternates GET /v1/jobs/{id} and "
                          "GET /v1/jobs/{id}/events?limit=50",
               "refinery": load, "bare_fastapi": bare, "jobs_during_load": dict(statuses),
               "ratio_p50": round(load["p50_ms"] / bare["p50_ms"], 2),
               "ratio_p99": round(load["p99_ms"] / bare["p99_ms"], 2),
               "ratio_throughput": round(load["per_second"] / bare["per_second"], 3)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "load_polling.json" if args.api_processes == 1 else f"load_polling_processes{args.api_processes}.json"
    (RESULTS / name).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
