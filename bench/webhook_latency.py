"""Webhook delivery latency: from the status change in the ledger (a ping's delivery created_at; a job's created_at,
started_at, finished_at as its payload carries them) to the moment the receiver has the request, against a direct
httpx POST to the same receiver from this process (a fresh client per POST sharing one TLS context, as the sender
makes them).

The platform is `refinery serve` in the production shape (Postgres, Redis) with its in-API sender at the default
poll interval (REFINERY_WEBHOOK_POLL_SECONDS, 0.5 s), then at each further --poll value, one platform each; the
receiver is a loopback HTTP server in this process, so both sides read the same clock.

    .venv/bin/python -m bench.webhook_latency [--pings 50] [--jobs 4] [--poll 0.5 0.1] [--embedded]
"""
import argparse
import json
import statistics
import time
import uuid

import httpx
import psycopg

from bench.common import RESULTS, WebhookReceiver, served, wait_job

PG = "host=127.0.0.1 user=postgres dbname=postgres"


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"n": len(ordered), "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
            "max_ms": round(1000 * ordered[-1], 1)}


def baseline(receiver: WebhookReceiver, count: int) -> list[float]:
    latencies, tls = [], httpx.create_ssl_context()
    for i in range(count):
        key = f"baseline-{i}"
        started = time.time()
        with httpx.Client(verify=tls, trust_env=False, timeout=10) as client:
            client.post(receiver.url, content=b'{"type":"baseline"}', headers={"webhook-id": key,
                                                                              "content-type": "application/json"})
        latencies.append(receiver.wait_for_id(key)["at"] - started)
        time.sleep(0.05)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--poll", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument("--embedded", action="store_true", help="SQLite and the filesystem broker instead")
    args = parser.parse_args()
    runs = [measure(args, poll) for poll in args.poll]
    print(json.dumps(runs, indent=2))
    suffix = "_embedded" if args.embedded else ""
    (RESULTS / f"webhook_latency{suffix}.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")


def measure(args, poll: float) -> dict:
    receiver = WebhookReceiver()
    env = {"REFINERY_OUTBOUND_ALLOWED_NETWORKS": "127.0.0.0/8", "REFINERY_WEBHOOK_POLL_SECONDS": str(poll)}
    database = None
    if not args.embedded:
        database = f"refinery_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        env.update(REFINERY_DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{database}",
                   REFINERY_BROKER_URL="redis://127.0.0.1:6379/12", REFINERY_QUEUE=f"refinery.bench.{database}")
    try:
        with served(env) as platform:
            http = httpx.Client(base_url=platform.base, headers=platform.headers, timeout=60)
            hook = http.post("/v1/webhooks", json={"url": receiver.url}).json()
            direct = baseline(receiver, args.pings)

            pings = []
            for _ in range(args.pings):
                delivery = http.post(f"/v1/webhooks/{hook['id']}/ping").json()
                pings.append(receiver.wait_for_id(delivery["id"])["at"] - delivery["created_at"])
                time.sleep(0.13)  # not a multiple of the poll interval: pings land anywhere in its cycle

            changes = {"job.queued": [], "job.running": [], "job.succeeded": []}
            stamp = {"job.queued": "created_at", "job.running": "started_at", "job.succeeded": "finished_at"}
            for i in range(args.jobs):
                job = http.post("/v1/jobs", json={"method": "train", "model": {"arch": "mlp"},
                                                  "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 1},
                                                  "budget": {"max_seconds": 120}, "seed": i}).json()
                final = wait_job(platform.base, platform.headers, job["id"])
                assert final["status"] == "succeeded", final["error"]
                seen = {d["event_type"]: d["id"] for d in
                        http.get(f"/v1/webhooks/{hook['id']}/deliveries", params={"limit": 100}).json()["data"]
                        if d["job_id"] == job["id"]}
                for event_type, msg_id in seen.items():
                    arrival = receiver.wait_for_id(msg_id)
                    changes[event_type].append(arrival["at"] - json.loads(arrival["body"])["data"][stamp[event_type]])
    finally:
        if database:
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    jobs_all = [s for series in changes.values() for s in series]
    result = {
        "shape": "embedded (SQLite, filesystem broker)" if args.embedded else "production (Postgres, Redis)",
        "poll_seconds": poll,
        "baseline_direct_post": summary(direct),
        "ping_from_enqueue": summary(pings),
        "job_events_from_status_change": summary(jobs_all),
        "job_events_by_type": {t: summary(s) for t, s in changes.items() if s},
    }
    base = result["baseline_direct_post"]
    for name in ("ping_from_enqueue", "job_events_from_status_change"):
        result[name]["p50_ratio_to_baseline"] = round(result[name]["p50_ms"] / base["p50_ms"], 1)
        result[name]["p99_ratio_to_baseline"] = round(result[name]["p99_ms"] / base["p99_ms"], 1)
    receiver.close()
    return result


if __name__ == "__main__":
    main()
