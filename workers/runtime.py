"""`JobRun`: what a running job holds — its lease, budget, heartbeat, cancel flag, events, metrics, checkpoints and
artifacts. Every write goes through the lease fence, so a worker that lost its job can no longer touch it."""
import json
import logging
import mimetypes
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from core.ids import new_id
from core.settings import Settings
from core.spec import JobSpec
from core.storage import ArtifactStore, get_store
from db import lifecycle
from db.models import Artifact, Job
from db.repositories import artifacts as artifact_repo
from db.repositories import events as event_repo
from db.repositories.jobs import cancel_requested
from db.session import transaction

log = logging.getLogger("refinery.worker")

CONTENT_TYPES = {".onnx": "application/onnx", ".safetensors": "application/octet-stream", ".json": "application/json",
                 ".html": "text/html; charset=utf-8", ".npz": "application/octet-stream"}


class Stop(Exception):
    """Raised inside a loop to end the job early: `reason` is "cancelled" or "budget"."""

    def __init__(self, reason: str, step: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.step = step  # the global step reached when the loop stopped


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobRun:
    def __init__(self, settings: Settings, job: Job, token: str):
        self.settings = settings
        self.job_id = job.id
        self.project_id = job.project_id
        self.token = token
        self.worker = worker_name()
        self.attempt = job.attempt
        self.spec = JobSpec.model_validate(job.spec)
        self.params: dict[str, Any] = job.spec.get("params", {})
        self.max_seconds = float(job.max_seconds)
        self.used_before = float(job.used_seconds or 0.0)
        self.created_at = job.created_at
        self.store: ArtifactStore = get_store(settings.storage_url)
        self.workdir = settings.home / "work" / job.id / f"attempt-{job.attempt}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._started = time.monotonic()
        self._progress: dict[str, Any] = {}
        self._cancelled = threading.Event()
        self._lease_lost = threading.Event()
        self._stop_heartbeat = threading.Event()
        self._last_checkpoint = time.monotonic()
        self._samples = 0  # training samples processed by this attempt (written by the loop, read by the heartbeat)
        self._rate_mark = (time.monotonic(), 0)
        self._samples_per_second: float | None = None
        self._held: list[tuple[str, tuple]] = []  # metric points and debug events not yet written (see flush)
        self._flushed_at = time.monotonic()
        self._flush_lock = threading.Lock()
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{job.id}", daemon=True)

    # --- time and stopping -------------------------------------------------------------------------------------
    def used_seconds(self) -> float:
        return self.used_before + (time.monotonic() - self._started)

    def remaining_seconds(self) -> float:
        return self.max_seconds - self.used_seconds()

    def finish_reserve(self) -> float:
        """Seconds kept back from training for export, measurement and the report."""
        return min(20.0, 0.1 * self.max_seconds)

    def budget_reached(self, stop: Stop, message: str) -> str:
        """A loop ended by `stop`: a cancel goes on up; a spent budget is recorded as a `budget.exhausted` warning
        (`message` says what is kept) and the recipe publishes what it has. Returns the stopped_by value, "budget"."""
        if stop.reason == "cancelled":
            raise stop
        self.event("budget.exhausted", message, level="warning", used_seconds=round(self.used_seconds(), 2))
        return "budget"

    def check(self, step: int | None = None) -> None:
        """Called every step: raises Stop when the job was cancelled or its budget is spent, LeaseLost if fenced."""
        if self._lease_lost.is_set():
            raise lifecycle.LeaseLost(self.job_id)
        if self._cancelled.is_set():
            raise Stop("cancelled", step)
        if self.remaining_seconds() <= self.finish_reserve():
            raise Stop("budget", step)
        max_steps = self.spec.budget.max_steps
        if max_steps is not None and step is not None and step >= max_steps:
            raise Stop("budget", step)

    def stop_requested(self) -> str | None:
        """What the heartbeat has seen: "lease_lost", "cancelled" or None (relayed to the ranks of a multi-device
        job, whose loop checks the flags in this process's stead)."""
        if self._lease_lost.is_set():
            return "lease_lost"
        return "cancelled" if self._cancelled.is_set() else None

    # --- heartbeat ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._heartbeat.start()

    def release(self) -> None:
        """Stop the heartbeat and let the lease run out now, not in lease_seconds: an abandoned attempt (a lost rank)
        is requeued by the reaper's next sweep and resumes from its last checkpoint."""
        self._stop_heartbeat.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(timeout=10)
        with transaction(self.settings.database_url) as session:
            lifecycle.renew(session, self.job_id, self.token, 0.0, used_seconds=self.used_seconds(),
                            progress=self.public_progress())

    def close(self) -> None:
        self._stop_heartbeat.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _beat(self) -> None:
        """Renew the lease, write progress and used time, and pick up a cancel request. Cancel is polled more often
        than the lease is renewed so a running job stops within a few steps.

        When the ledger cannot be reached (Postgres restarting) the worker fences itself once its lease would have
        run out: by then the reaper may have handed the job to another attempt, and two attempts must never train
        at once. The deadline counts from the start of the last renewal that committed, so it is never later than
        the lease the database holds."""
        next_renew = 0.0
        held_until = time.monotonic() + self.settings.lease_seconds  # the claim's lease
        while not self._stop_heartbeat.is_set():
            try:
                if time.monotonic() >= held_until:
                    log.warning("job %s: lease not renewed for %.0f s (ledger unreachable); stopping this attempt",
                                self.job_id, self.settings.lease_seconds)
                    self._lease_lost.set()
                    return
                if time.monotonic() >= next_renew:
                    renewing_at = time.monotonic()
                    with transaction(self.settings.database_url) as session:
                        ok = lifecycle.renew(session, self.job_id, self.token, self.settings.lease_seconds,
                                             used_seconds=self.used_seconds(), progress=self.public_progress())
                    if not ok:
                        self._lease_lost.set()
                        return
                    held_until = renewing_at + self.settings.lease_seconds
                    next_renew = time.monotonic() + self.settings.heartbeat_seconds
                with transaction(self.settings.database_url, readonly=True) as session:
                    if cancel_requested(session, self.job_id):
                        self._cancelled.set()
                if self._held and self._flush_due():  # an epoch's held points, when the next epoch is long
                    try:
                        self.flush()
                    except lifecycle.LeaseLost:
                        self._lease_lost.set()
                        return
            except Exception:
                log.exception("heartbeat for %s failed; retrying", self.job_id)
            self._stop_heartbeat.wait(min(0.5, self.settings.heartbeat_seconds))

    # --- events, metrics, progress -----------------------------------------------------------------------------
    # Metric points and debug events (one of each per epoch) are held and written together, in one fenced
    # transaction at most every `events_flush_seconds`, instead of two transactions an epoch on the training path;
    # any other event, a checkpoint and the end of the recipe write what is held first, so the order is kept and
    # nothing a checkpoint covers is left unwritten. They keep the time they were made.
    def event(self, type_: str, message: str, level: str = "info", **data: Any) -> None:
        with self._flush_lock:
            self._held.append(("event", (type_, message, level, data, time.time())))
        log.info("%s %s: %s", self.job_id, type_, message)
        if level != "debug" or self._flush_due():
            self.flush()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        with self._flush_lock:
            self._held.append(("metrics", (step, values, time.time())))
        if self._flush_due():
            self.flush()

    def _flush_due(self) -> bool:
        return time.monotonic() - self._flushed_at >= self.settings.events_flush_seconds

    def flush(self) -> None:
        """Write the held metric points and events, fenced by the lease (LeaseLost when it is no longer ours)."""
        with self._flush_lock:  # the training thread and the heartbeat both flush; one at a time keeps the order
            if self._held:
                self._write(self._held)  # on an error they stay held, for the next flush
                self._held = []
            self._flushed_at = time.monotonic()

    def _write(self, held: list[tuple[str, tuple]]) -> None:
        with transaction(self.settings.database_url) as session:
            lifecycle.fence(session, self.job_id, self.token, self.settings.lease_seconds)
            for kind, item in held:
                if kind == "event":
                    type_, message, level, data, at = item
                    event_repo.add_event(session, self.job_id, self.attempt, type_, message, level=level, data=data,
                                         created_at=at)
                else:
                    step, values, at = item
                    event_repo.add_metrics(session, self.job_id, step, values, created_at=at)

    def progress(self, step: int, total_steps: int | None, **extra: Any) -> None:
        # Without a known step count (epochs="auto") the budget is the horizon.
        fraction = min(1.0, step / total_steps) if total_steps else min(1.0, self.used_seconds() / self.max_seconds)
        elapsed = time.monotonic() - self._started
        done_here = fraction - self._progress.get("_start_fraction", 0.0)
        eta = elapsed * (1 - fraction) / done_here if done_here > 0 else None
        self._progress = {"fraction": round(fraction, 4), "step": step, "total_steps": total_steps,
                          "eta_seconds": round(eta, 1) if eta is not None else None, **extra,
                          "_start_fraction": self._progress.get("_start_fraction", fraction)}

    def count_samples(self, n: int) -> None:
        """Called by the training loop after each optimizer step with the batch size."""
        self._samples += n

    def adopt_progress(self, progress: dict[str, Any], samples: int) -> None:
        """Progress and samples counted by rank 0 of a multi-device job, for this process's heartbeat to publish."""
        self._progress, self._samples = progress, samples

    def samples_per_second(self) -> float | None:
        """Training throughput over the interval since the previous reading (at least 1 s, so one heartbeat apart):
        current, not an average since the start, and 0 while the job evaluates or exports. None before the first
        training step."""
        now = time.monotonic()
        since, samples_then = self._rate_mark
        if now - since >= 1.0:
            samples = self._samples
            if samples or self._samples_per_second is not None:
                self._samples_per_second = round((samples - samples_then) / (now - since), 1)
            self._rate_mark = (now, samples)
        return self._samples_per_second

    def public_progress(self) -> dict[str, Any]:
        rate = self.samples_per_second()
        return {**{k: v for k, v in self._progress.items() if not k.startswith("_")},
                **({"samples_per_second": rate} if rate is not None else {})}

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _checkpoint_key(self, name: str) -> str:
        return f"checkpoints/{self.job_id}/{name}"

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_seconds

    def save_checkpoint(self, tensor_bytes: bytes, meta: dict[str, Any]) -> None:
        """Weights first, then the small JSON that points at them: a crash between the two leaves the old pair."""
        self.flush()
        with transaction(self.settings.database_url) as session:
            lifecycle.fence(session, self.job_id, self.token, self.settings.lease_seconds)
        stamp = f"{meta.get('step', 0):09d}"
        self.store.write_bytes(self._checkpoint_key(f"ckpt-{stamp}.safetensors"), tensor_bytes)
        previous = self.load_checkpoint_meta()
        self.store.write_bytes(self._checkpoint_key("latest.json"),
                               json.dumps({**meta, "weights": f"ckpt-{stamp}.safetensors"}).encode())
        if previous and previous.get("weights") != f"ckpt-{stamp}.safetensors":
            self.store.delete_prefix(self._checkpoint_key(previous["weights"]))
        self._last_checkpoint = time.monotonic()
        self.event("checkpoint.saved", f"Checkpoint at step {meta.get('step', 0)}; a new attempt resumes here.",
                   level="debug", step=meta.get("step", 0), bytes=len(tensor_bytes))

    def load_checkpoint_meta(self) -> dict[str, Any] | None:
        raw = self.store.read_bytes(self._checkpoint_key("latest.json"))
        return json.loads(raw) if raw else None

    def load_checkpoint(self) -> tuple[bytes, dict[str, Any]] | None:
        meta = self.load_checkpoint_meta()
        if meta is None:
            return None
        data = self.store.read_bytes(self._checkpoint_key(meta["weights"]))
        return (data, meta) if data is not None else None

    def drop_checkpoints(self) -> None:
        self.store.delete_prefix(f"checkpoints/{self.job_id}")

    # --- artifacts ---------------------------------------------------------------------------------------------
    def add_artifact(self, path: Path, name: str | None = None) -> Artifact:
        name = name or path.name
        key, sha, size = self.store.put_file(str(path))
        content_type = CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        with transaction(self.settings.database_url) as session:
            lifecycle.fence(session, self.job_id, self.token, self.settings.lease_seconds)
            return artifact_repo.upsert_artifact(session, Artifact(
                id=new_id("art"), job_id=self.job_id, name=name, size=size, sha256=sha, content_type=content_type,
                storage_key=key, created_at=time.time()))
