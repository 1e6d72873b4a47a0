"""Figures P1–P3 against a served platform: training overhead against a hand-written loop (P1), a kd epoch with
cached teacher logits against a from-scratch epoch (P2), submit → running against a bare Celery round trip (P3)."""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench import bare_celery
from bench.common import ROOT, Served, wait_job
from bench.distill_common import SMALL_STUDENT
from bench.distill_kd import kd_spec
from bench.suite import Row, Size, interleaved, percentile, row
from bench.train_overhead import hand_written_loop, platform_job

DIGITS_TRAIN_ROWS = 1617  # digits less the stratified 10 % validation split, on both sides
DIGITS = {"uri": "builtin://digits", "validation": {"fraction": 0.1}}


def p1_training(size: Size, platform: Served) -> list[Row]:
    torch.set_num_threads(1)  # the worker's REFINERY_TORCH_THREADS default
    if size.warm_up:
        platform_job(platform.base, platform.headers, 1, 99)  # warm the worker (imports, first ONNX export)
    jobs, hand = [], []

    def ours(rep: int) -> float:
        jobs.append(platform_job(platform.base, platform.headers, size.train_epochs, rep))
        return jobs[-1]["training_seconds"]

    def theirs(rep: int) -> float:
        hand.append(hand_written_loop(size.train_epochs, rep)[0])
        return hand[-1]

    training, hand_seconds = interleaved(size.repeats, ours, theirs)
    samples = size.train_epochs * DIGITS_TRAIN_ROWS
    accuracy = {"platform": [j["accuracy"] for j in jobs]}
    return [
        row("P1", "train job, training phase", "samples/s", "≥ 0.97×", [samples / s for s in training],
            [samples / s for s in hand_seconds], "hand-written loop",
            note=f"digits CNN, batch 64, {size.train_epochs} epoch(s), seeds 0…{size.repeats - 1}, one thread; "
                 "training = model.built → train.finished events", details=accuracy),
        row("P1", "train job, whole job wall time", "s", "≤ 1.10×", [j["job_seconds"] for j in jobs], hand_seconds,
            "hand-written loop", note="started → finished: data, training, ONNX export and check, report"),
    ]


class _Builtin:
    """kd_spec's view of a dataset: the builtin digits, so no data files are needed."""

    @staticmethod
    def dataset(_name: str) -> dict:
        return DIGITS


def p2_kd_epoch(size: Size, platform: Served) -> list[Row]:
    http = httpx.Client(base_url=platform.base, headers=platform.headers, timeout=60)
    teacher = http.post("/v1/jobs", json={"method": "train", "dataset": DIGITS, "params": {"epochs": 1 if size.name == "smoke" else 3},
                                          "seed": 0}).json()
    teacher = wait_job(platform.base, platform.headers, teacher["id"])
    student, scratch = [], []
    for rep in range(size.repeats):
        # Both epochs are timed inside the same job (the student's, then its from-scratch twin's), so a pair is
        # interleaved by construction.
        job = http.post("/v1/jobs", json={**kd_spec(_Builtin, "digits", teacher, SMALL_STUDENT, rep,
                                                    epochs=size.kd_epochs), "budget": {"max_seconds": 600}}).json()
        job = wait_job(platform.base, platform.headers, job["id"])
        if job["status"] != "succeeded":
            raise RuntimeError(f"kd job {job['status']}: {job['error']}")
        report = json.loads(http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").content)
        seconds = report["distillation"]["seconds_per_epoch"]
        student.append(seconds["student"])
        scratch.append(seconds["baseline"])
    return [row("P2", "kd epoch, cached teacher logits", "s/epoch", "≤ 1.2×", student, scratch,
                "from-scratch epoch", note=f"digits, 1.7k-parameter student, {size.kd_epochs} epoch(s) per job; "
                                           "both timed in the same job (`baseline: true`)")]


@contextlib.contextmanager
def bare_celery_worker(home: Path, broker_url: str):
    """A Celery worker of bench/bare_celery.py on the platform's broker (its own queue)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFINERY_")}
    env.update(BENCH_HOME=str(home), BENCH_BROKER_URL=broker_url)
    log = open(home / "bare-celery.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.bare_celery", "worker", "-P", "solo",
                             "-Q", bare_celery.QUEUE, "--without-gossip", "--without-mingle", "--loglevel", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield bare_celery.make_app(home, broker_url)
    finally:
        proc.terminate()
        proc.wait(30)


def bare_round_trip(producer, folder: Path, timeout: float = 60) -> float:
    """Seconds from send_task to the bare task starting (it writes its start time to a file)."""
    stamp = folder / f"{time.time_ns()}"
    sent = time.time()
    producer.send_task(bare_celery.STARTED, args=[str(stamp)], queue=bare_celery.QUEUE)
    deadline = time.monotonic() + timeout
    while not stamp.exists() or not stamp.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError("the bare Celery task never started")
        time.sleep(0.002)
    return float(stamp.read_text()) - sent


def submit_to_running(http: httpx.Client, platform: Served, parts: dict[str, list[float]] | None = None) -> float:
    """Seconds from POST /v1/jobs to the job's started_at (the worker's claim), then waits for it to finish. `http`
    is one kept-alive client, as the bare side keeps one producer: a new httpx client per call costs ~20 ms of its
    own (SSL context, connection), which is the client's cost, not the platform's. `parts` collects the pieces:
    the POST's own response time, and created_at → started_at (publish, broker, claim)."""
    sent = time.time()
    response = http.post("/v1/jobs", json={"method": "train", "dataset": DIGITS, "params": {"epochs": 1}})
    answered = time.time()
    job = wait_job(platform.base, platform.headers, response.json()["id"])
    if parts is not None:
        parts["post_ms"].append(1000 * (answered - sent))
        parts["created_to_running_ms"].append(1000 * (job["started_at"] - job["created_at"]))
    return job["started_at"] - sent


def p3_dispatch(size: Size, platform: Served, shape: str, broker_url: str) -> list[Row]:
    folder = Path(tempfile.mkdtemp(prefix="refinery-bare-celery-"))
    http = httpx.Client(base_url=platform.base, headers=platform.headers, timeout=30)
    parts: dict[str, list[float]] = {"post_ms": [], "created_to_running_ms": []}
    with bare_celery_worker(platform.home, broker_url) as producer:
        bare_round_trip(producer, folder, timeout=120)  # the worker is up
        if size.warm_up:
            submit_to_running(http, platform)
        ours: dict[str, list[float]] = {"p50": [], "p99": []}
        theirs: dict[str, list[float]] = {"p50": [], "p99": []}

        def batch(measure, into):
            def run(_rep: int) -> float:
                values = sorted(1000 * measure() for _ in range(size.submits))
                into["p50"].append(percentile(values, 0.5))
                into["p99"].append(percentile(values, 0.99))
                return into["p50"][-1]
            return run

        interleaved(size.repeats, batch(lambda: submit_to_running(http, platform, parts), ours),
                    batch(lambda: bare_round_trip(producer, folder), theirs))
    note = (f"{shape}; {size.submits} submissions per repetition, one at a time (each job runs to the end before the "
            "next); platform = POST /v1/jobs → started_at over one kept-alive client, bare = send_task → the task's "
            "first line; parts (medians): POST answered in "
            f"{percentile(sorted(parts['post_ms']), 0.5):.1f} ms, created_at → started_at (publish, broker, claim) "
            f"{percentile(sorted(parts['created_to_running_ms']), 0.5):.1f} ms")
    return [row("P3", f"submit → running p50, {shape}", "ms", "≤ 1.2×", ours["p50"], theirs["p50"],
                "bare Celery task", note=note, details=parts),
            row("P3", f"submit → running p99, {shape}", "ms", "≤ 1.2×", ours["p99"], theirs["p99"],
                "bare Celery task")]
