"""Chaos soak on the production shape: `refinery serve` with REFINERY_WORKERS=2 on a private Postgres cluster and a
private Redis server (loopback only), running real training jobs while the faults land:

1. worker kills — SIGKILL the worker process running a job, again and again (at most twice per job, so every job
   stays within max_attempts = 3); serve restarts the worker;
2. Redis kills — the broker is killed with jobs queued and running, jobs are POSTed while it is down, then it is
   started again (empty: it keeps no data);
3. Postgres restarts — the database is stopped for longer than a lease while jobs run, and started again, with a
   client polling the API all along.

Figures: jobs lost (not `succeeded` at the end) per fault, duplicate completions, the most attempts of one job that
were ever alive at once (from the workers' own "attempt began / ended" log lines; a killed attempt ends at its kill),
recovery time (kill → the next attempt's `job.started`) beside the lease, work redone per kill, API answers while
Postgres was down, POST answers while Redis was down, artifacts present.

    .venv/bin/python -m bench.chaos [--kills 24] [--redis-kills 3] [--pg-restarts 3]

Writes bench/results/chaos.json. Takes ~6-10 minutes on 2 cores."""
import argparse
import collections
import json
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import RESULTS, Served, celery_log_time, free_port, job_events, served
from bench.services import PrivateRedis, private_postgres

LEASE = 5.0
WORKERS = 2
ENV = {"REFINERY_WORKERS": str(WORKERS), "REFINERY_LEASE_SECONDS": str(LEASE), "REFINERY_HEARTBEAT_SECONDS": "1",
       "REFINERY_CHECKPOINT_SECONDS": "1", "REFINERY_REDISPATCH_SECONDS": "3", "REFINERY_SWEEP_SECONDS": "0.5",
       "REFINERY_RATE_LIMIT_PER_MINUTE": "1000000", "REFINERY_WORKER_STALL_SECONDS": "15"}
TERMINAL = ("succeeded", "failed", "cancelled")
EPOCHS = 80
LOG_LINE = re.compile(r"\[[^\]]*\] job (\w+) attempt (\d+) (began|ended) on \S+?:(\d+)")


class Soak:
    def __init__(self, platform: Served, postgres, redis: PrivateRedis):
        self.platform, self.postgres, self.redis = platform, postgres, redis
        self.http = httpx.Client(base_url=platform.base, headers=platform.headers, timeout=30)
        self.jobs: dict[str, list[str]] = collections.defaultdict(list)  # fault → job ids
        self.kills: list[dict] = []
        self.killed_pids: dict[int, float] = {}
        self.pg_answers: collections.Counter = collections.Counter()
        self.pg_downtimes: list[dict] = []
        self.redis_posts: collections.Counter = collections.Counter()
        self.redis_rounds = 0

    # --- plumbing ------------------------------------------------------------------------------------------------
    def submit(self, fault: str, epochs: int) -> int:
        """POST a training job (an MLP on digits: ~0.05 s an epoch on an idle core); returns the status code (the
        job is tracked when it is 201)."""
        seed = sum(len(ids) for ids in self.jobs.values())
        response = self.http.post("/v1/jobs", json={"method": "train", "dataset": {"uri": "builtin://digits"},
                                                    "model": {"arch": "mlp"}, "params": {"epochs": epochs},
                                                    "budget": {"max_seconds": 900}, "seed": seed})
        if response.status_code == 201:
            self.jobs[fault].append(response.json()["id"])
        return response.status_code

    def events(self, job_id: str) -> list[dict]:
        return job_events(self.http, job_id)

    def wait_all(self, ids: list[str], timeout: float = 1200) -> list[dict]:
        deadline, done = time.time() + timeout, {}
        while time.time() < deadline and len(done) < len(ids):
            for job_id in ids:
                if job_id not in done:
                    response = self.http.get(f"/v1/jobs/{job_id}")
                    if response.status_code == 200 and response.json()["status"] in TERMINAL:
                        done[job_id] = response.json()
            time.sleep(0.5)
        return [done.get(job_id) or self.http.get(f"/v1/jobs/{job_id}").json() for job_id in ids]

    def running(self, ids: list[str]) -> list[dict]:
        jobs = [self.http.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
        return [job for job in jobs if job.get("status") == "running"]

    # --- 1. worker kills -----------------------------------------------------------------------------------------
    def worker_kills(self, kills: int) -> None:
        """As many jobs in flight as there are workers, so a requeued job waits for a worker to come back, not
        behind a queue of others: the recovery time is the platform's, not the backlog's."""
        per_job = collections.Counter()
        ids = self.jobs["worker_kill"]
        while len(self.kills) < kills:
            statuses = {job_id: self.http.get(f"/v1/jobs/{job_id}").json() for job_id in ids}
            if sum(job["status"] not in TERMINAL for job in statuses.values()) < WORKERS:
                self.submit("worker_kill", epochs=EPOCHS)
                continue
            candidates = [job for job in statuses.values() if job["status"] == "running"
                          and per_job[job["id"]] < 2 and (job["progress"] or {}).get("step")]
            for job in candidates[:1]:
                events = self.events(job["id"])
                started = [e for e in events if e["type"] == "job.started" and e["attempt"] == job["attempt"]]
                saved = [e for e in events if e["type"] == "checkpoint.saved" and e["attempt"] == job["attempt"]]
                if not started or not saved:
                    continue
                pid = int(started[-1]["message"].rsplit(":", 1)[1].rstrip("."))
                if pid not in self.platform.worker_pids():
                    continue
                step_before = (self.http.get(f"/v1/jobs/{job['id']}").json()["progress"] or {}).get("step") or 0
                os.kill(pid, signal.SIGKILL)
                at = time.time()
                self.killed_pids[pid] = at
                per_job[job["id"]] += 1
                self.kills.append({"job": job["id"], "attempt": job["attempt"], "pid": pid, "at": at,
                                   "step_before": step_before, "last_checkpoint_at": saved[-1]["created_at"],
                                   "last_checkpoint_step": saved[-1]["data"]["step"]})
            time.sleep(1.0)
        self.wait_all(ids)

    # --- 2. Redis kills ------------------------------------------------------------------------------------------
    def redis_kills(self, rounds: int) -> None:
        for _ in range(rounds):
            for _ in range(4):
                self.submit("redis_kill", epochs=EPOCHS // 2)
            time.sleep(2)
            self.redis.kill()
            for _ in range(4):
                self.redis_posts[self.submit("redis_kill", epochs=EPOCHS // 2)] += 1
            time.sleep(5)
            self.redis.start()
            self.redis_rounds += 1
            time.sleep(3)
        self.wait_all(self.jobs["redis_kill"])

    # --- 3. Postgres restarts ------------------------------------------------------------------------------------
    def postgres_restarts(self, rounds: int) -> None:
        for _ in range(rounds):
            before = len(self.jobs["postgres_restart"])
            for _ in range(3):
                self.submit("postgres_restart", epochs=EPOCHS)
            ids = self.jobs["postgres_restart"][before:]
            deadline = time.time() + 120
            while time.time() < deadline and sum(bool((j["progress"] or {}).get("step"))
                                                 for j in self.running(ids)) < 2:
                time.sleep(0.5)
            stop = threading.Event()
            poller = threading.Thread(target=self._poll, args=(ids[0], stop), daemon=True)
            poller.start()
            self.postgres.stop()
            down_at = time.time()
            time.sleep(LEASE + 2)
            self.postgres.start()
            self.pg_downtimes.append({"down_at": down_at, "up_at": time.time(), "jobs": ids})
            time.sleep(5)
            stop.set()
            poller.join()
            self.wait_all(ids)

    def _poll(self, job_id: str, stop: threading.Event) -> None:
        while not stop.is_set():
            for path in (f"/v1/jobs/{job_id}", "/v1/jobs", f"/v1/jobs/{job_id}/events"):
                try:
                    self.pg_answers[self.http.get(path).status_code] += 1
                except httpx.HTTPError as exc:
                    self.pg_answers[type(exc).__name__] += 1
            time.sleep(0.05)

    # --- figures -------------------------------------------------------------------------------------------------
    def figures(self) -> dict:
        all_ids = [job_id for ids in self.jobs.values() for job_id in ids]
        final = {job_id: self.http.get(f"/v1/jobs/{job_id}").json() for job_id in all_ids}
        events = {job_id: self.events(job_id) for job_id in all_ids}
        for kill in self.kills:
            after = [e for e in events[kill["job"]] if e["attempt"] == kill["attempt"] + 1]
            started = next((e for e in after if e["type"] == "job.started"), None)
            resumed = next((e for e in after if e["type"] == "job.resumed"), None)
            requeued = next((e for e in events[kill["job"]] if e["type"] == "job.requeued"
                             and e["attempt"] == kill["attempt"] + 1), None)
            kill["requeued_after_seconds"] = round(requeued["created_at"] - kill["at"], 2) if requeued else None
            kill["recovery_seconds"] = round(started["created_at"] - kill["at"], 2) if started else None
            kill["resumed_at_step"] = resumed["data"]["step"] if resumed else 0
            kill["steps_redone_at_least"] = max(0, kill["step_before"] - kill["resumed_at_step"])
            kill["seconds_since_checkpoint"] = round(kill["at"] - kill["last_checkpoint_at"], 2)
        recoveries = sorted(k["recovery_seconds"] for k in self.kills if k["recovery_seconds"] is not None)
        pg_recoveries = []
        for down in self.pg_downtimes:
            for job_id in down["jobs"]:
                later = [e["created_at"] for e in events[job_id] if e["type"] == "job.started"
                         and e["created_at"] > down["up_at"] and e["attempt"] > 1]
                if later:
                    pg_recoveries.append(round(later[0] - down["up_at"], 2))
        artifacts = {job_id: {a["name"] for a in self.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
                     for job_id, job in final.items() if job["status"] == "succeeded"}
        return {
            "settings": {**ENV, "jobs": f"train mlp on builtin://digits, {EPOCHS // 2}-{EPOCHS} epochs", "pool": "solo (the worker "
                         "process is the pool process)"},
            "jobs_submitted": {fault: len(ids) for fault, ids in self.jobs.items()},
            "jobs_lost": {fault: sum(final[j]["status"] != "succeeded" for j in ids) for fault, ids in self.jobs.items()},
            "worker_kills": len(self.kills), "redis_kills": self.redis_rounds,
            "postgres_restarts": len(self.pg_downtimes),
            "duplicate_completions": sum(max(0, [e["type"] for e in evs].count("job.succeeded") - 1)
                                         for evs in events.values()),
            "max_concurrent_attempts_per_job": self.max_concurrent_attempts(),
            "max_attempt": max(job["attempt"] for job in final.values()),
            "requeued_seconds_after_worker_kill": _spread(sorted(k["requeued_after_seconds"] for k in self.kills
                                                                 if k["requeued_after_seconds"] is not None)),
            "recovery_seconds_after_worker_kill": _spread(recoveries),
            "recovery_seconds_after_postgres_start": _spread(sorted(pg_recoveries)),
            "lease_seconds": LEASE,
            "steps_redone_per_kill_at_least": _spread(sorted(k["steps_redone_at_least"] for k in self.kills)),
            "seconds_since_last_checkpoint_at_kill": _spread(sorted(k["seconds_since_checkpoint"]
                                                                    for k in self.kills)),
            "api_answers_while_postgres_down": {str(k): v for k, v in self.pg_answers.items()},
            "post_answers_while_redis_down": {str(k): v for k, v in self.redis_posts.items()},
            "stalled_workers_restarted_by_the_watchdog": (self.platform.home / "serve.log").read_text()
            .count("exited (75)"),
            "succeeded_jobs_missing_model_onnx": sum("model.onnx" not in names for names in artifacts.values()),
            "kills": self.kills,
        }

    def max_concurrent_attempts(self) -> int:
        """From the workers' logs: each attempt's [began, ended] (a killed worker's attempt ends at its kill); the
        largest number of one job's attempts alive at any instant."""
        spans: dict[tuple[str, int, int], list[float]] = {}
        for line in self.platform.worker_logs().splitlines():
            match = LOG_LINE.match(line)
            if match:
                job_id, attempt, edge, pid = match.groups()
                at = celery_log_time(line)
                spans.setdefault((job_id, int(attempt), int(pid)), [at, None])[edge == "ended"] = at
        per_job: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        for (job_id, _, pid), (began, ended) in spans.items():
            per_job[job_id].append((began, ended or self.killed_pids.get(pid, float("inf"))))
        worst = 0
        for intervals in per_job.values():
            edges = sorted([(b, 1) for b, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
            alive = 0
            for _, delta in edges:
                alive += delta
                worst = max(worst, alive)
        return worst


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
    return {"n": len(values), "p50": round(statistics.median(values), 2), "p99": round(p99, 2),
            "max": round(values[-1], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--redis-kills", type=int, default=3)
    parser.add_argument("--pg-restarts", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="refinery-chaos-"))
    redis = PrivateRedis(free_port(), home)
    redis.start()
    started = time.time()
    try:
        with private_postgres(free_port()) as postgres:
            env = {**ENV, "REFINERY_DATABASE_URL": postgres.create_database("refinery"),
                   "REFINERY_BROKER_URL": redis.url, "REFINERY_STORAGE_URL": f"file://{home / 'store'}"}
            with served(env, home) as platform:
                soak = Soak(platform, postgres, redis)
                soak.worker_kills(args.kills)
                print(f"worker kills done ({time.time() - started:.0f} s)", flush=True)
                soak.redis_kills(args.redis_kills)
                print(f"redis kills done ({time.time() - started:.0f} s)", flush=True)
                soak.postgres_restarts(args.pg_restarts)
                print(f"postgres restarts done ({time.time() - started:.0f} s)", flush=True)
                figures = soak.figures()
    finally:
        redis.kill()
    figures["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps({k: v for k, v in figures.items() if k != "kills"}, indent=1))


if __name__ == "__main__":
    main()
