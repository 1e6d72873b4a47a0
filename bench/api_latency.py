"""Status-polling latency and throughput of `GET /v1/jobs/{id}` (auth, rate limit, ledger read) as ratios against a
bare FastAPI endpoint served the same way (uvicorn, same machine), with the same client load.

    .venv/bin/python bench/api_latency.py [--clients 8] [--seconds 10] [--api-processes 1]

With --api-processes N > 1 both servers run N uvicorn workers, and the result goes to api_latency_processesN.json.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import httpx

from bench.common import RESULTS, ROOT, embedded_platform, free_port


def hammer(url: str, headers: dict, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        nonlocal errors
        mine, bad = [], 0
        with httpx.Client(headers=headers, timeout=30) as http:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                status = http.get(url).status_code
                mine.append(time.perf_counter() - t0)
                bad += status != 200
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {"requests": len(latencies), "errors": errors, "per_second": len(latencies) / seconds,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}


@contextlib.contextmanager
def bare_server(processes: int = 1):
    port = free_port()
    workers = ["--workers", str(processes)] if processes > 1 else []
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--port", str(port), *workers,
                             "--log-level", "warning"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}/job"
    try:
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--api-processes", type=int, default=1)
    args = parser.parse_args()
    with bare_server(args.api_processes) as url:
        bare = hammer(url, {}, args.clients, args.seconds)
    with embedded_platform({"REFINERY_RATE_LIMIT_PER_MINUTE": "1000000",
                            "REFINERY_API_PROCESSES": str(args.api_processes)}) as (base, headers):
        job = httpx.post(f"{base}/v1/jobs", headers=headers, json={
            "method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 1}}).json()
        refinery = hammer(f"{base}/v1/jobs/{job['id']}", headers, args.clients, args.seconds)
    summary = {"clients": args.clients, "seconds": args.seconds, "api_processes": args.api_processes,
               "bare_fastapi": bare, "refinery_get_job": refinery,
               "ratio_p50": refinery["p50_ms"] / bare["p50_ms"], "ratio_p99": refinery["p99_ms"] / bare["p99_ms"],
               "ratio_throughput": refinery["per_second"] / bare["per_second"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "api_latency.json" if args.api_processes == 1 else f"api_latency_processes{args.api_processes}.json"
    (RESULTS / name).write_text(json.dumps(summary, indent=2))
    for name, r in (("bare FastAPI endpoint", bare), ("GET /v1/jobs/{id} (embedded, SQLite)", refinery)):
        print(f"{name:40s} {r['per_second']:7.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
              f"errors {r['errors']}")
    print(f"ratios refinery/bare: p50 {summary['ratio_p50']:.2f}, p99 {summary['ratio_p99']:.2f}, "
          f"throughput {summary['ratio_throughput']:.2f}")


if __name__ == "__main__":
    main()
