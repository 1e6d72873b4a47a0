"""Worker kills under load on the embedded platform: jobs lost, duplicate completions, attempts per job, recovery
time (SIGKILL → the job running again on a new attempt) and steps redone per kill.

    .venv/bin/python -m bench.chaos_worker_kills [--jobs 8] [--kills 6]
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import time

import httpx

from bench.common import RESULTS, embedded_platform, wait_job


def celery_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:] if "celery -A workers.app worker" in line]


def all_events(base: str, headers: dict, job_id: str) -> list[dict]:
    events, params = [], {"limit": 100}
    while True:
        page = httpx.get(f"{base}/v1/jobs/{job_id}/events", headers=headers, params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        params["after"] = page["data"][-1]["id"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    env = {"REFINERY_LEASE_SECONDS": "5", "REFINERY_HEARTBEAT_SECONDS": "1", "REFINERY_CHECKPOINT_SECONDS": "1"}
    kills = []
    with embedded_platform(env) as (base, headers):
        ids = [httpx.post(f"{base}/v1/jobs", headers=headers, json={
            "method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": args.epochs},
            "budget": {"max_seconds": 900}, "seed": i}).json()["id"] for i in range(args.jobs)]
        while len(kills) < args.kills:
            time.sleep(4)
            running = [j for j in ids if httpx.get(f"{base}/v1/jobs/{j}", headers=headers).json()["status"] == "running"]
            pids = celery_pids()
            if not running or not pids:
                continue
            job = httpx.get(f"{base}/v1/jobs/{running[0]}", headers=headers).json()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            kills.append({"job": job["id"], "at": time.time(), "step_before": job["progress"].get("step") or 0})
        jobs = [wait_job(base, headers, j, timeout=1800) for j in ids]
        events = {j: all_events(base, headers, j) for j in ids}
    for kill in kills:
        later = [e for e in events[kill["job"]] if e["created_at"] > kill["at"] and e["type"] == "job.started"]
        resumed = [e for e in events[kill["job"]] if e["created_at"] > kill["at"] and e["type"] == "job.resumed"]
        kill["recovery_seconds"] = later[0]["created_at"] - kill["at"] if later else None
        kill["resumed_at_step"] = resumed[0]["data"]["step"] if resumed else 0
        # progress is written by the heartbeat (every second), so this slightly undercounts the steps redone
        kill["steps_redone"] = max(0, kill["step_before"] - kill["resumed_at_step"])
    recoveries = sorted(k["recovery_seconds"] for k in kills if k["recovery_seconds"] is not None)
    summary = {
        "jobs": args.jobs, "kills": len(kills), "epochs_per_job": args.epochs,
        "jobs_lost": sum(j["status"] != "succeeded" for j in jobs),
        "duplicate_completions": sum(max(0, [e["type"] for e in events[j["id"]]].count("job.succeeded") - 1)
                                     for j in jobs),
        "max_attempt": max(j["attempt"] for j in jobs),
        "recovery_seconds_p50": statistics.median(recoveries) if recoveries else None,
        "recovery_seconds_max": recoveries[-1] if recoveries else None,
        "steps_redone_median": statistics.median(k["steps_redone"] for k in kills) if kills else None,
        "kills_detail": kills,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chaos_worker_kills.json").write_text(json.dumps(summary, indent=2))
    print(f"{summary['jobs']} jobs, {summary['kills']} worker SIGKILLs: lost {summary['jobs_lost']}, duplicate "
          f"completions {summary['duplicate_completions']}, max attempt {summary['max_attempt']}, recovery p50 "
          f"{summary['recovery_seconds_p50']:.1f} s / max {summary['recovery_seconds_max']:.1f} s (lease 5 s), "
          f"median steps redone per kill {summary['steps_redone_median']}")


if __name__ == "__main__":
    main()
