"""Multi-device jobs: `resources.devices` = N > 1 trains one model in N processes (ranks) with DistributedDataParallel,
gloo on CPU, NCCL on GPU (one GPU per rank). The decisions, also in the README:

- Launch. The worker process keeps the claim, the heartbeat and the lease. It starts the ranks with torch's elastic
  launcher (`elastic_launch`, what `torchrun --standalone` runs: a c10d rendezvous on 127.0.0.1, no restarts) and
  waits for them. Ranks fork from a forkserver that imported torch and the recipes once per worker process (a freshly
  spawned rank spends seconds importing them). Every rank runs the job's recipe (setup, checkpoint resume, run) as
  the one process of a 1-device job would, with torch threads set to 1.
- Writes. Rank 0 holds a RankRun: the attempt's own lease token fences its events, metrics, checkpoints and artifacts,
  as in a 1-device job, and it has no heartbeat of its own. Ranks > 0 hold a FollowerRun that writes nothing.
- Control. A TCPStore the worker process hosts carries the heartbeat's cancel / lease-lost flag to rank 0, rank 0's
  progress and sample count back to the heartbeat, and every rank's outcome back to the worker (Relay, Control).
- The loop is workers/training.train_one_epoch, the one every method trains through. Every rank draws the global
  batches a 1-device run draws (same seed, same batch size) and takes index[rank::world] of each; DDP averages the
  gradients and the loss is scaled by rows_here * world / rows_all, so each step's gradient is the 1-device step's
  (up to float summation order). One all_reduce per step carries rank 0's stop decision (budget, cancel, lease),
  whether every rank has rows, and the rows in the step: every rank stops at the same step. A second carries the
  batch loss, so a non-finite loss stops every rank at once. DDP is built per call (an epoch) over the model plus the
  optimizer's other parameters (kd's hint regressor), so a model pruned between epochs is wrapped as it now is, and
  the recipe's own loss is DDP's forward, so recipes keep calling their model directly. Buffers (BatchNorm
  statistics) are rank 0's, broadcast after each epoch: every rank evaluates the same model and takes the same
  decisions (best epoch, plateau). A global batch with fewer rows than ranks (an epoch's tail) ends the epoch.
- After training a recipe calls `training_done()`: ranks > 0 leave there, and rank 0 exports, measures and publishes
  alone (any later train_one_epoch, e.g. a comparison model, runs on rank 0 only). Recipes that train this way say
  so with `data_parallel = True`; others refuse devices > 1 with `devices_unsupported`.
- Failure. A rank that dies (killed, out of memory) ends the launch: elastic stops the others, the attempt is
  abandoned with a `job.rank_lost` event and its lease handed back (JobRun.release), so the reaper requeues it at its
  next sweep and the next attempt resumes from the last checkpoint (past max_attempts the reaper fails it as
  worker_lost). A rank that raises fails the job as any bug does. More devices than the worker has (GPUs, or CPU
  cores for gloo) fails with `devices_unavailable`; more than one node with `nodes_unsupported`. Budgets count wall
  time from the claim, as for one device.
"""
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from core.resources import queue_for, resource_class
from core.settings import Settings
from core.spec import Resources
from db import lifecycle
from db.models import Job
from workers.errors import JobFailure
from workers.runtime import JobRun, Stop, worker_name

log = logging.getLogger("refinery.worker")

POLL_SECONDS = 0.2  # how often rank 0 reads the heartbeat's flag, and the worker process reads rank 0's progress
FOLLOWER_GRACE_SECONDS = 10.0  # a rank > 0 still running this long after rank 0 posted its outcome is stopped
SHUTDOWN_SECONDS = 5  # elastic's wait between SIGTERM and SIGKILL when it stops the ranks
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # the handlers torch elastic takes over
JOIN_JOB = "refinery.join_job"  # the Celery task that makes a worker one node of another worker's attempt
GO, CANCELLED, BUDGET, LEASE_LOST = 0, 1, 2, 3  # rank 0's stop decision, as the per-step all_reduce carries it

_training_over = False  # set on rank 0 by training_done(): later loops run on this process alone


class FollowerDone(Exception):
    """Raised on ranks > 0 where training ends: what follows (export, report, publishing) is rank 0's."""


class Abandoned(Exception):
    """The attempt cannot be recorded or continued here; its lease runs out and the reaper requeues it."""

    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome = outcome


class HandedBack(Abandoned):
    """The attempt ends without a result and hands its lease back now (JobRun.release), so the reaper requeues the
    job at its next sweep; `event` (with `data`) is the event that says why."""

    def __init__(self, outcome: str, event: str, message: str, **data: Any):
        super().__init__(outcome, message)
        self.event, self.data = event, data


class RanksLost(HandedBack):
    """A rank died mid-attempt. `ranks` describes the dead ones (rank, pid, worker, signal)."""

    def __init__(self, message: str, ranks: list[dict[str, Any]]):
        super().__init__("rank_lost", "job.rank_lost", message, ranks=ranks)
        self.ranks = ranks


class NodesMissing(HandedBack):
    """Fewer than resources.nodes workers joined the rendezvous within REFINERY_NODES_JOIN_SECONDS."""

    def __init__(self, message: str, joined: int, nodes: int):
        super().__init__("nodes_missing", "job.nodes_missing", message, joined=joined, nodes=nodes)


# --- where this process stands ---------------------------------------------------------------------------------
def world() -> int:
    """Ranks the training loop runs on: 1 outside a multi-device job, and on rank 0 once training_done() ran."""
    if _training_over or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True in a 1-device job and on rank 0: the process that writes."""
    return rank() == 0


def device() -> torch.device | None:
    """This rank's device in a multi-device job (its own GPU under NCCL, else the CPU); None outside one."""
    if not dist.is_initialized():
        return None
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def training_done() -> None:
    """A recipe's data-parallel training is over: ranks > 0 leave here (raising FollowerDone) and rank 0 goes on
    alone. Nothing in a 1-device job."""
    global _training_over
    if world() == 1:
        return
    if not is_main():
        raise FollowerDone()
    _training_over = True


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the training loop's ranks (itself in a 1-device job): per-rank running sums → the job's."""
    if world() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


# --- the training loop's two shapes ----------------------------------------------------------------------------
def rank_slices(batches: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    """This rank's rows of each global index batch, index[rank::world]; the batches themselves in a 1-device job."""
    ranks, me = world(), rank()
    return batches if ranks == 1 else (index[me::ranks] for index in batches)


class Replica:
    """The model as one process trains it: the budget checked before every step, the recipe's loss as it is."""

    def __init__(self, loss_of_batch: Callable[[Any], torch.Tensor]):
        self.loss_of_batch = loss_of_batch

    def steps(self, run: Any, batches: Iterable[Any], step: int,
              rows_of: Callable[[Any], int]) -> Iterator[tuple[Any, int, int]]:
        """(batch, rows in it here, rows in the step over all ranks) for each step; raises Stop or LeaseLost."""
        for batch in batches:
            run.check(step)
            rows = rows_of(batch)
            yield batch, rows, rows
            step += 1

    def loss(self, batch: Any, rows_here: int, rows_all: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to back-propagate, the step's mean loss over all its rows, detached)."""
        loss = self.loss_of_batch(batch)
        return loss, loss.detach()

    def close(self) -> None:
        pass


class _Trained(nn.Module):
    """What DDP wraps: the model and the optimizer's parameters outside it, with the recipe's loss as forward, so the
    recipe's own code (which calls its model directly) runs inside DDP and every trained parameter is reduced."""

    def __init__(self, model: nn.Module, extra: list[nn.Parameter], loss_of_batch: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.extra = nn.ParameterList(extra)
        self.loss_of_batch = loss_of_batch

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_of_batch(batch)


class DataParallelReplica(Replica):
    """The model as every rank of a multi-device job trains it, in step with the others."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_of_batch: Callable[[Any], torch.Tensor]):
        super().__init__(loss_of_batch)
        self.model, self.ranks, self.device = model, world(), device()
        own = {id(p) for p in model.parameters()}
        extra = list({id(p): p for group in optimizer.param_groups for p in group["params"]
                      if id(p) not in own and p.requires_grad}.values())
        # Buffers are rank 0's at the start (DDP's init sync) and again after the epoch (close()), not every forward.
        self.ddp = nn.parallel.DistributedDataParallel(
            _Trained(model, extra, loss_of_batch), forward_sync_buffers=False,
            device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def steps(self, run: Any, batches: Iterable[Any], step: int,
              rows_of: Callable[[Any], int]) -> Iterator[tuple[Any, int, int]]:
        main = is_main()
        for batch in itertools.chain(batches, itertools.repeat(None)):
            rows_here = 0 if batch is None else rows_of(batch)
            agreed = torch.tensor([_decision(run, step) if main else GO, int(rows_here > 0), rows_here],
                                  device=self.device)
            dist.all_reduce(agreed)
            decision, ready, rows_all = agreed.tolist()
            if ready < self.ranks:  # some rank is out of rows: the epoch ends here for all (a stop waits, as it
                return              # would for one process, until the next epoch's first step)
            if decision != GO:
                raise _stopped(decision, run, step)
            yield batch, rows_here, rows_all
            step += 1

    def loss(self, batch: Any, rows_here: int, rows_all: int) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.ddp(batch)
        step_loss = loss.detach() * rows_here
        dist.all_reduce(step_loss)
        # DDP averages gradients over ranks; weighting each rank's mean by its share of the rows makes the result the
        # gradient of the mean over all the step's rows, as one process computes it.
        return loss * (rows_here * self.ranks / rows_all), step_loss / rows_all

    def close(self) -> None:
        for buffer in self.model.buffers():
            dist.broadcast(buffer, 0)
        self.ddp = None


def replica(model: nn.Module, optimizer: torch.optim.Optimizer,
            loss_of_batch: Callable[[Any], torch.Tensor]) -> Replica:
    return DataParallelReplica(model, optimizer, loss_of_batch) if world() > 1 else Replica(loss_of_batch)


def _decision(run: Any, step: int) -> int:
    try:
        run.check(step)
    except Stop as stop:
        return CANCELLED if stop.reason == "cancelled" else BUDGET
    except lifecycle.LeaseLost:
        return LEASE_LOST
    return GO


def _stopped(decision: int, run: Any, step: int) -> Exception:
    if decision == LEASE_LOST:
        return lifecycle.LeaseLost(getattr(run, "job_id", ""))
    return Stop("cancelled" if decision == CANCELLED else "budget", step)


# --- the worker process ↔ ranks channel ------------------------------------------------------------------------
class Control:
    """A TCPStore hosted by the worker process that leads the attempt (it listens on every interface: the ranks of
    the other nodes reach it at REFINERY_WORKER_ADDRESS). Keys: `stop` ("cancelled" or "lease_lost", from the
    heartbeat), `progress` (rank 0's progress and sample count, JSON), `outcome/<rank>` (JSON), `rank/<rank>` (its
    pid and worker), `joined` (nodes that took a join message), `leader_group` (the leader's elastic group rank)."""

    def __init__(self, store: dist.TCPStore):
        self.store = store

    @classmethod
    def host(cls) -> "Control":
        return cls(dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                 timeout=timedelta(seconds=30)))

    @classmethod
    def join(cls, host: str, port: int, connect_seconds: float = 30) -> "Control":
        return cls(dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=connect_seconds)))

    @property
    def port(self) -> int:
        return self.store.port

    def _read(self, key: str) -> Any:
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def request_stop(self, reason: str) -> None:
        self.store.set("stop", json.dumps(reason))

    def stop_requested(self) -> str | None:
        return self._read("stop")

    def report(self, progress: dict[str, Any], samples: int) -> None:
        self.store.set("progress", json.dumps({"progress": progress, "samples": samples}))

    def progress(self) -> dict[str, Any] | None:
        return self._read("progress")

    def register(self, rank_: int, worker: str) -> None:
        self.store.set(f"rank/{rank_}", json.dumps({"pid": os.getpid(), "worker": worker}))

    def registered(self, rank_: int) -> dict[str, Any] | None:
        return self._read(f"rank/{rank_}")

    def count_joined(self) -> None:
        self.store.add("joined", 1)

    def joined(self) -> int:
        return self.store.add("joined", 0)

    def node_rank(self, leader: bool, local_rank: int) -> int:
        """This node's place with the leader's node first. Elastic numbers the nodes by (address, pid), so the
        leader's local rank 0 publishes its elastic group rank and every node moves that one to 0."""
        group = int(os.environ["GROUP_RANK"])
        if leader and local_rank == 0:
            self.store.set("leader_group", str(group))
        lead = int(self.store.get("leader_group"))  # waits until the leader's rank has set it
        return 0 if group == lead else group + 1 if group < lead else group

    def post_outcome(self, rank_: int, status: str, result: dict | None, error: dict | None) -> None:
        self.store.set(f"outcome/{rank_}", json.dumps({"status": status, "result": result, "error": error,
                                                       "at": time.time()}))

    def outcome(self, rank_: int) -> dict[str, Any] | None:
        return self._read(f"outcome/{rank_}")


class Relay:
    """In a worker process while its ranks run: on the leader, the heartbeat's stop flag to rank 0 and rank 0's
    progress to the heartbeat (`job_run`; None on the other nodes); on every node, its own ranks > 0 that outstay
    rank 0's outcome by FOLLOWER_GRACE_SECONDS stopped (they have nothing left to do, and the launch waits for every
    rank)."""

    def __init__(self, job_id: str, control: Control, ranks: int, job_run: JobRun | None = None):
        self.job_id, self.job_run, self.control, self.ranks = job_id, job_run, control, ranks
        self.worker = worker_name()
        self.sent: str | None = None
        self.main_done_at: float | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"ranks-{job_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.sync()

    def _loop(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            try:
                self.sync()
                self._stop_stragglers()
            except Exception:
                log.exception("job %s: relaying to its ranks failed; retrying", self.job_id)

    def sync(self) -> None:
        if self.job_run is None:
            return
        reason = self.job_run.stop_requested()
        if reason is not None and reason != self.sent:
            self.control.request_stop(reason)
            self.sent = reason
        seen = self.control.progress()
        if seen is not None:
            self.job_run.adopt_progress(seen["progress"], seen["samples"])

    def _stop_stragglers(self) -> None:
        if self.main_done_at is None:
            if self.control.outcome(0) is not None:
                self.main_done_at = time.monotonic()
            return
        if time.monotonic() - self.main_done_at < FOLLOWER_GRACE_SECONDS:
            return
        for follower in range(1, self.ranks):
            seen = self.control.registered(follower)
            if seen is not None and seen["worker"] == self.worker and self.control.outcome(follower) is None:
                log.warning("job %s: rank %d (pid %d) still runs %.0f s after rank 0 finished; stopping it",
                            self.job_id, follower, seen["pid"], FOLLOWER_GRACE_SECONDS)
                try:
                    os.kill(seen["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.main_done_at = float("inf")  # once


# --- the ranks' JobRuns ----------------------------------------------------------------------------------------
class RankRun(JobRun):
    """Rank 0's JobRun: the attempt's token fences its writes as in a 1-device job. It never heartbeats (the worker
    process does); it reads the heartbeat's stop flag from the control store and reports its progress there. Budget
    time counts from the worker's claim (`attempt["started"]`, a machine-wide monotonic clock)."""

    def __init__(self, settings: Settings, job: Job, token: str, control: Control, attempt: dict[str, Any]):
        super().__init__(settings, job, token)
        self.control = control
        self.worker, self.attempt = attempt["worker"], attempt["attempt"]
        self.used_before, self._started = attempt["used_before"], attempt["started"]
        self.workdir = Path(attempt["workdir"]) / f"rank-{rank()}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._polled = 0.0

    def check(self, step: int | None = None) -> None:
        if time.monotonic() - self._polled >= POLL_SECONDS:
            self._polled = time.monotonic()
            reason = self.control.stop_requested()
            if reason == "cancelled":
                self._cancelled.set()
            elif reason == "lease_lost":
                self._lease_lost.set()
            self.report()
            if self._held and self._flush_due():  # no heartbeat thread here to write held points
                self.flush()
        super().check(step)

    def progress(self, step: int, total_steps: int | None, **extra: Any) -> None:
        super().progress(step, total_steps, **extra)
        self.report()

    def report(self) -> None:
        self.control.report(self._progress, self._samples)


class FollowerRun(RankRun):
    """A rank > 0's JobRun: reads what rank 0 reads (the dataset, the model, the checkpoint), writes nothing."""

    def check(self, step: int | None = None) -> None:
        """Outside the data-parallel loop (which takes rank 0's decision): only notices that rank 0 has finished."""
        if time.monotonic() - self._polled >= POLL_SECONDS:
            self._polled = time.monotonic()
            if self.control.outcome(0) is not None:
                raise FollowerDone()

    def event(self, type_: str, message: str, level: str = "info", **data: Any) -> None:
        pass

    def metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def progress(self, step: int, total_steps: int | None, **extra: Any) -> None:
        pass

    def report(self) -> None:
        pass

    def count_samples(self, n: int) -> None:
        pass

    def checkpoint_due(self) -> bool:
        return False

    def save_checkpoint(self, tensor_bytes: bytes, meta: dict[str, Any]) -> None:
        pass

    def drop_checkpoints(self) -> None:
        pass

    def add_artifact(self, path: Path, name: str | None = None) -> None:
        return None


def announce(run: JobRun) -> None:
    """Rank 0 records which processes train this attempt: the `distributed.started` event (users read it; the tests
    find a rank's pid in it). Every rank calls it (it gathers); nothing in a 1-device job."""
    if world() == 1:
        return
    ranks: list[Any] = [None] * world()
    dist.all_gather_object(ranks, {"rank": rank(), "pid": os.getpid(), "host": socket.gethostname(),
                                   "worker": run.worker, "device": str(device())})
    nodes = len({r["worker"] for r in ranks})
    where = f" on {nodes} nodes" if nodes > 1 else ""
    run.event("distributed.started", f"Training on {world()} ranks{where} with DistributedDataParallel "
              f"({dist.get_backend()}, {ranks[0]['device']}); rank 0 writes.", world_size=world(), nodes=nodes,
              backend=dist.get_backend(), ranks=ranks)


# --- launching -------------------------------------------------------------------------------------------------
def available_devices(gpu: bool) -> int:
    return torch.cuda.device_count() if gpu else len(os.sched_getaffinity(0))


def require_devices(resources: Resources) -> None:
    """Fail a job this worker cannot give its devices (per node): JobFailure devices_unavailable."""
    gpu = resources.accelerator == "gpu"
    have = available_devices(gpu)
    if resources.devices > have:
        what = "GPUs" if gpu else "CPU cores"
        raise JobFailure("devices_unavailable", f"resources.devices is {resources.devices}, but this worker has "
                         f"{have} {what}; ask for at most {have} or send the job to a larger pool.", "infra_error")


def launch(run: JobRun) -> tuple[str, dict | None, dict | None]:
    """Run the attempt on `resources.nodes` × `resources.devices` ranks and return (status, result, error) as rank 0
    finished it. With nodes > 1 this worker leads: it invites nodes - 1 workers of the job's class (JOIN_JOB) to its
    rendezvous and its own ranks are the first `devices`. Raises LeaseLost, RanksLost (a rank died), NodesMissing
    (the other nodes did not all join) or Abandoned (rank 0 lost the ledger)."""
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    from workers.methods import get_recipe

    resources = run.spec.resources
    try:
        require_devices(resources)
        recipe = get_recipe(run.spec.method, run.spec.algorithm or "")
        if recipe is not None and not getattr(recipe, "data_parallel", False):
            raise JobFailure("devices_unsupported", f"{run.spec.method}/{run.spec.algorithm} trains in one process; "
                             "submit it with resources.devices 1 and resources.nodes 1.")
    except JobFailure as failure:
        return "failed", None, failure.as_dict()
    gpu = resources.accelerator == "gpu"
    nodes, world_size = resources.nodes, resources.nodes * resources.devices
    control = Control.host()
    relay = Relay(run.job_id, control, world_size, run)
    attempt = {"worker": run.worker, "attempt": run.attempt, "pid": os.getpid(), "used_before": run.used_before,
               "started": time.monotonic() - (run.used_seconds() - run.used_before), "workdir": str(run.workdir),
               "leader": True, "nodes": nodes}
    if nodes > 1:
        address = worker_address(run.settings)
        endpoint = f"{address}:{run.settings.rendezvous_port or _free_port()}"
        _invite(run, endpoint, address, control.port)
    else:
        address, endpoint = "127.0.0.1", "127.0.0.1:0"
    config = _launch_config(f"{run.job_id}-{run.attempt}", resources, run.workdir / "elastic", endpoint, address,
                            is_host=True, join_seconds=run.settings.nodes_join_seconds)
    try:
        failures, interrupted = _run_ranks(config, relay, run.job_id, run.token, "127.0.0.1", control.port, attempt,
                                           gpu)
    except RendezvousTimeoutError:
        joined = 1 + control.joined()
        raise NodesMissing(f"Only {joined} of {nodes} nodes joined the rendezvous within "
                           f"{run.settings.nodes_join_seconds:.0f} s (the other workers serving "
                           f"{resource_class(resources)} were busy or absent); this attempt is handed back and the job "
                           "is requeued.", joined, nodes) from None
    except Exception as exc:  # the launcher itself failed (rendezvous, a port): the machine or a bug, not the job
        log.exception("job %s: starting its ranks failed", run.job_id)
        return "failed", None, JobFailure("internal_error", f"Starting the job's {world_size} ranks failed "
                                          f"({type(exc).__name__}: {exc}); it has been logged.", "infra_error").as_dict()
    if interrupted is not None:
        signal.raise_signal(interrupted)  # now for the worker's own handler (Celery: warm shutdown)
        raise RanksLost(f"The worker got {interrupted.name} and stopped this attempt's ranks; the job is requeued "
                        "and resumes from its last checkpoint.", [])
    return _outcome(run, control, resources, failures)


def join(job_id: str, attempt_no: int, endpoint: str, leader: str, control_port: int) -> str:
    """A JOIN_JOB message: serve one node of a multi-node attempt led by the worker at `leader`, if that attempt is
    still the job's current one. Its ranks follow (they write nothing); it returns when they end. Returns what
    happened, for the log."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from core.settings import get_settings
    from core.spec import JobSpec
    from db.repositories.jobs import get_job
    from db.session import transaction

    settings = get_settings()
    with transaction(settings.database_url, readonly=True) as session:
        job = get_job(session, job_id)
        # Still this attempt, still leased (a leader that gave up has handed its lease back), and not led by this
        # worker (the leader may take a join message of its own once its attempt ended).
        current = (job is not None and job.status == "running" and job.attempt == attempt_no
                   and (job.lease_expires_at or 0) > time.time() and job.worker != worker_name())
        resources = JobSpec.model_validate(job.spec).resources if current else None
    if resources is None:
        log.info("job %s attempt %s is not running any more; dropping its join message", job_id, attempt_no)
        return "skipped"
    try:
        require_devices(resources)
        control = Control.join(leader, control_port, connect_seconds=10)
    except (JobFailure, RuntimeError) as exc:  # too few devices here, or the leader is gone: it times out alone
        log.warning("job %s attempt %s: not joining (%s)", job_id, attempt_no, exc)
        return "skipped"
    control.count_joined()
    workdir = settings.home / "work" / job_id / f"attempt-{attempt_no}" / f"node-{os.getpid()}"
    attempt = {"worker": worker_name(), "attempt": attempt_no, "pid": os.getpid(), "used_before": 0.0,
               "started": time.monotonic(), "workdir": str(workdir), "leader": False, "nodes": resources.nodes}
    config = _launch_config(f"{job_id}-{attempt_no}", resources, workdir / "elastic", endpoint,
                            worker_address(settings), is_host=False, join_seconds=settings.nodes_join_seconds)
    log.info("job %s attempt %s: joining %s's rendezvous at %s as one of %d nodes", job_id, attempt_no, leader,
             endpoint, resources.nodes)
    relay = Relay(job_id, control, resources.nodes * resources.devices)
    try:
        failures, interrupted = _run_ranks(config, relay, job_id, "", leader, control_port, attempt,
                                           resources.accelerator == "gpu")
    except ChildFailedError:  # its failures are in the ranks' log; the leader decides what the attempt's end means
        return "ranks_failed"
    except Exception as exc:  # the rendezvous closed or timed out, the leader went away
        log.warning("job %s attempt %s: this node's launch ended (%s: %s)", job_id, attempt_no,
                    type(exc).__name__, exc)
        return "launch_failed"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if interrupted is not None:
        signal.raise_signal(interrupted)
        return "interrupted"
    return "ranks_failed" if failures else "done"


def _invite(run: JobRun, endpoint: str, address: str, control_port: int) -> None:
    """Publish nodes - 1 JOIN_JOB messages to the job's class queue. Failing here only means fewer nodes join: the
    rendezvous times out and the attempt is handed back."""
    from core.broker import celery_app

    queue = queue_for(resource_class(run.spec.resources), run.settings.queue)
    try:
        for _ in range(run.spec.resources.nodes - 1):
            celery_app.send_task(JOIN_JOB, args=[run.job_id, run.attempt, endpoint, address, control_port],
                                 queue=queue, retry=False)
    except Exception:
        log.exception("job %s: publishing its join messages failed", run.job_id)


def worker_address(settings: Settings) -> str:
    """Where the other nodes reach this worker: REFINERY_WORKER_ADDRESS, else this host name's address."""
    if settings.worker_address:
        return settings.worker_address
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _launch_config(run_id: str, resources: Resources, log_dir: Path, endpoint: str, address: str, is_host: bool,
                   join_seconds: float) -> Any:
    """elastic's LaunchConfig: on one node a standalone c10d rendezvous on 127.0.0.1; on `nodes` a c10d rendezvous
    the leader hosts at `endpoint`, waiting `join_seconds` for exactly `nodes` nodes. No restarts: a lost rank ends
    the attempt and the job is requeued instead."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    nodes = resources.nodes
    rendezvous = {"is_host": is_host, "join_timeout": max(1, round(join_seconds))} if nodes > 1 else {}
    return LaunchConfig(min_nodes=nodes, max_nodes=nodes, nproc_per_node=resources.devices, role="rank",
                        run_id=run_id, rdzv_backend="c10d", rdzv_endpoint=endpoint, rdzv_configs=rendezvous,
                        local_addr=address, max_restarts=0, monitor_interval=POLL_SECONDS,
                        start_method="forkserver", shutdown_timeout=SHUTDOWN_SECONDS,
                        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir)))


def _run_ranks(config: Any, relay: Relay, *args: Any) -> tuple[dict[int, Any], signal.Signals | None]:
    """elastic_launch(config, rank_main)(*args) with the relay running: (the failed ranks by elastic's global rank,
    the signal that stopped the worker or None). Raises what the launcher raised (rendezvous timeout, a port)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    _preload_ranks()
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    relay.start()
    try:
        elastic_launch(config, rank_main)(*args)
    except ChildFailedError as failed:
        return failed.failures, None
    except SignalException as stop:  # the worker was told to stop: elastic has stopped the ranks
        return {}, stop.sigval
    finally:
        # Elastic installs handlers that raise in the main thread; the Celery worker's own come back.
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        relay.stop()
    return {}, None


def _outcome(run: JobRun, control: Control, resources: Resources,
             failures: dict[int, Any]) -> tuple[str, dict | None, dict | None]:
    ranks, here = resources.nodes * resources.devices, resources.devices  # this node's ranks are 0 .. devices - 1
    outcomes = {r: control.outcome(r) for r in range(ranks)}
    main = outcomes[0]
    internal = main is not None and main["status"] == "failed" and (main["error"] or {}).get("code") == "internal_error"
    died = [{"rank": f.local_rank, "pid": f.pid, "worker": run.worker, "signal": f.signal_name()}
            for f in sorted(failures.values(), key=lambda f: f.local_rank) if f.exitcode < 0]
    if internal:  # the other nodes' ranks that are still alive post theirs as their collectives fail too
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(outcomes[r] is None for r in range(here, ranks)):
            time.sleep(0.1)
            outcomes.update({r: control.outcome(r) for r in range(here, ranks) if outcomes[r] is None})
    # A rank on another node that posted no outcome died with it, or its node did.
    died += [{"rank": r, "signal": "lost", **(control.registered(r) or {"pid": None, "worker": None})}
             for r in range(here, ranks) if outcomes[r] is None]
    if died and (main is None or internal):
        # A dead rank also breaks the others' collectives (rank 0's internal error is then only the echo of it).
        first = died[0]
        how = f"died ({first['signal']})" if first["signal"] != "lost" else f"on {first['worker']} was lost"
        raise RanksLost(f"Rank {first['rank']} of {ranks} (pid {first['pid']}) {how}; this attempt is abandoned and "
                        "the job is requeued to resume from its last checkpoint.", died)
    if main is None:
        failure = min(failures.values(), key=lambda f: f.local_rank) if failures else None
        why = f"exited with code {failure.exitcode}: {failure.message}" if failure is not None else "posted no outcome"
        rank_ = failure.local_rank if failure is not None else 0
        return "failed", None, JobFailure("rank_failed", f"Rank {rank_} of {ranks} {why}. It has been logged.",
                                          "infra_error").as_dict()
    if main["status"] == "lease_lost":
        raise lifecycle.LeaseLost(run.job_id)
    if main["status"] == "ledger_lost":
        raise Abandoned("ledger_lost", "Rank 0 could not reach the ledger.")
    if internal:
        # A rank > 0 that failed first is the cause; rank 0's error is then its peer going away.
        earlier = [o for r, o in outcomes.items() if r > 0 and o is not None and o["status"] == "failed"
                   and o["at"] < main["at"]]
        if earlier:
            return "failed", None, min(earlier, key=lambda o: o["at"])["error"]
    return main["status"], main["result"], main["error"]


def _preload_ranks() -> None:
    """What the forkserver imports before it forks ranks: the task code, every recipe module that imported here (so
    the ranks' registry is this worker's) and torch._dynamo (a first optimizer imports it: a second per rank). Takes
    effect when the server starts, at this worker's first launch."""
    import multiprocessing
    import pkgutil

    import workers.methods

    multiprocessing.set_forkserver_preload(["workers.tasks", "torch._dynamo"] + [
        f"workers.methods.{module.name}" for module in pkgutil.iter_modules(workers.methods.__path__)
        if module.name not in workers.methods.BROKEN])


def _exit_with(worker_pid: int) -> None:
    """A rank whose worker process died (SIGKILL, OOM) must not train on: its lease is gone and another attempt may
    start. Watch the worker's pid from a daemon thread (a rank's parent is the forkserver) and exit when it is gone."""
    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(worker_pid, 0)
            except ProcessLookupError:
                os._exit(1)
    threading.Thread(target=watch, name="worker-watch", daemon=True).start()


def rank_main(job_id: str, token: str, control_host: str, port: int, attempt: dict[str, Any], gpu: bool) -> None:
    """One rank of a multi-device attempt, started by elastic_launch (which sets RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT). Posts its (status, result, error) to the leader's control store. On several nodes
    its global rank is node rank × devices + local rank, the leader's node first (Control.node_rank), and a rank
    whose group broke before training ended exits 1: elastic's agents then stop at once instead of waiting in their
    exit barrier for a node that will not come."""
    from core.settings import get_settings
    from db.repositories.jobs import get_job
    from db.session import transaction
    from workers.tasks import LEDGER_ERRORS, run_recipe

    local_rank = int(os.environ["LOCAL_RANK"])
    _exit_with(attempt["pid"])
    control = Control.join(control_host, port)
    if attempt["nodes"] > 1:
        node = control.node_rank(attempt["leader"], local_rank)
        os.environ["RANK"] = str(node * int(os.environ["LOCAL_WORLD_SIZE"]) + local_rank)
    me = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s: %(levelname)s/rank-{me}] %(message)s")
    torch.set_num_threads(1)
    settings = get_settings()
    timeout = timedelta(seconds=settings.distributed_timeout_seconds)
    if gpu:  # one GPU per rank, by local rank
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    control.register(me, attempt["worker"])
    with transaction(settings.database_url, readonly=True) as session:
        job = get_job(session, job_id)
    run = (RankRun if me == 0 else FollowerRun)(settings, job, token, control, attempt)
    try:
        outcome = run_recipe(run)
    except lifecycle.LeaseLost:
        outcome = ("lease_lost", None, None)
    except LEDGER_ERRORS:
        outcome = ("ledger_lost", None, None)
    finally:
        run.close()
    run.report()
    control.post_outcome(me, *outcome)
    dist.destroy_process_group()
    if attempt["nodes"] > 1 and not _training_over and outcome[0] not in ("succeeded", "cancelled"):
        raise SystemExit(1)
