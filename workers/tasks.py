"""The one Celery task, `run_job(job_id)`: claim the job, run its recipe under its budget, finish it. It never
raises: every outcome, including bad input and bugs, is written to the ledger and the worker takes the next job.
A job with resources.devices > 1 runs its recipe on that many ranks (workers/distributed.py) while this process keeps
the claim and the heartbeat; with resources.nodes > 1 this process leads, and `join` serves another worker's attempt
as one more node."""
import logging
import time

import torch
from sqlalchemy.exc import InterfaceError, OperationalError

from core.settings import get_settings
from db import lifecycle
from db.repositories.events import add_event, drop_metrics_after
from db.repositories.jobs import get_job
from db.session import transaction
from workers import distributed
from workers.checkpoints import unpack
from workers.errors import JobFailure
from workers.methods import get_recipe
from workers.runtime import JobRun, Stop, worker_name

log = logging.getLogger("refinery.worker")

# The database is down or the connection dropped: an outage, not a property of the job.
LEDGER_ERRORS = (OperationalError, InterfaceError)


def execute(job_id: str) -> str:
    """Run one job to a final status; returns what happened (for logs and tests)."""
    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    with transaction(settings.database_url) as session:
        token = lifecycle.claim(session, job_id, worker_name(), settings.lease_seconds)
        job = get_job(session, job_id) if token else None
    if token is None or job is None:
        log.info("job %s is not claimable (already taken, finished or cancelled); dropping the message", job_id)
        return "skipped"
    run = JobRun(settings, job, token)
    run.start()
    # These two lines bracket the attempt in the worker's log: bench/chaos.py reads them to prove that no two
    # attempts of a job ever ran at once.
    log.info("job %s attempt %s began on %s", job_id, run.attempt, run.worker)
    outcome = "crashed"
    try:
        if run.spec.resources.devices > 1 or run.spec.resources.nodes > 1:
            status, result, error = distributed.launch(run)
        else:
            status, result, error = run_recipe(run)
        _finish(run, status, result, error)
        outcome = status
    except distributed.HandedBack as lost:
        log.warning("job %s: %s", job_id, lost)
        _abandon(run, lost)
        outcome = lost.outcome
    except distributed.Abandoned as abandoned:
        log.warning("job %s: %s; abandoning attempt %s to the reaper", job_id, abandoned, run.attempt)
        outcome = abandoned.outcome
    except lifecycle.LeaseLost:
        log.warning("job %s: lease lost; another attempt owns it now", job_id)
        outcome = "lease_lost"
    except LEDGER_ERRORS as exc:
        # The ledger went away mid-run: nothing about this attempt can be recorded, so it is abandoned, not failed.
        # Its lease runs out, the reaper requeues the job and the next attempt resumes from the last checkpoint.
        log.warning("job %s: ledger unreachable (%s); abandoning attempt %s to the reaper", job_id,
                    type(exc).__name__, run.attempt)
        outcome = "ledger_lost"
    finally:
        run.close()
        log.info("job %s attempt %s ended on %s: %s", job_id, run.attempt, run.worker, outcome)
    return outcome


def _finish(run: JobRun, status: str, result: dict | None, error: dict | None) -> None:
    with transaction(run.settings.database_url) as session:
        finished = lifecycle.finish(session, run.job_id, run.token, status, result=result, error=error,
                                    used_seconds=run.used_seconds(), progress=run.public_progress())
        if finished:
            message = {"succeeded": "Job succeeded.", "cancelled": "Job cancelled; its last checkpoint is kept.",
                       "failed": f"Job failed: {(error or {}).get('message', '')}"}[status]
            add_event(session, run.job_id, run.attempt, f"job.{status}", message,
                      level="error" if status == "failed" else "info", data={"error": error} if error else {})
    if finished and status == "succeeded":
        run.drop_checkpoints()


def join(job_id: str, attempt: int, endpoint: str, leader: str, control_port: int) -> str:
    """Serve one node of another worker's multi-node attempt (a `refinery.join_job` message); never raises."""
    try:
        return distributed.join(job_id, attempt, endpoint, leader, control_port)
    except Exception:
        log.exception("job %s attempt %s: serving as a node failed", job_id, attempt)
        return "crashed"
    finally:
        log.info("job %s attempt %s: no longer a node of it", job_id, attempt)


def _abandon(run: JobRun, lost: "distributed.HandedBack") -> None:
    """A rank died, or the other nodes did not all join: say so, and hand the lease back now so the reaper requeues
    the job at its next sweep (the next attempt resumes from the last checkpoint) instead of after lease_seconds."""
    try:
        run.event(lost.event, str(lost), level="warning", **lost.data)
        run.release()
    except (lifecycle.LeaseLost, *LEDGER_ERRORS) as exc:  # the lease runs out on its own
        log.warning("job %s: could not hand the lease back (%s)", run.job_id, type(exc).__name__)


def run_recipe(run: JobRun) -> tuple[str, dict | None, dict | None]:
    """Set the recipe up, resume it from the newest checkpoint, run it: (status, result, error). In a multi-device job
    every rank runs this; rank 0's run is the one that writes. What the run still holds is written before the status
    is, so the job's final event comes last."""
    outcome = _recipe_outcome(run)
    run.flush()
    return outcome


def _recipe_outcome(run: JobRun) -> tuple[str, dict | None, dict | None]:
    started = time.time()
    try:
        recipe = get_recipe(run.spec.method, run.spec.algorithm or "")
        if recipe is None:
            raise JobFailure("method_unavailable", f"This worker cannot run {run.spec.method}/{run.spec.algorithm}.",
                             "infra_error")
        run.event("job.started", f"Attempt {run.attempt} started on {run.worker}.", attempt=run.attempt)
        distributed.announce(run)
        recipe.setup(run)
        checkpoint = run.load_checkpoint()
        if checkpoint is not None:
            blob, meta = checkpoint
            recipe.load_checkpoint(unpack(blob), meta)
            if distributed.is_main():
                with transaction(run.settings.database_url) as session:
                    drop_metrics_after(session, run.job_id, int(meta.get("metric_step", meta.get("step", 0))))
            run.event("job.resumed", f"Resumed from the checkpoint at step {meta.get('step')}.", step=meta.get("step"))
        outcome = recipe.run(run)
        return "succeeded", {"metrics": outcome.metrics, "stopped_by": outcome.stopped_by, **outcome.extra}, None
    except distributed.FollowerDone:  # a rank > 0 at the end of training: rank 0 publishes and reports
        return "succeeded", None, None
    except Stop as stop:
        return "cancelled", {"stopped_by": stop.reason, "seconds": round(time.time() - started, 2)}, None
    except (lifecycle.LeaseLost, *LEDGER_ERRORS):
        raise
    except JobFailure as failure:
        return "failed", None, failure.as_dict()
    except MemoryError:
        return "failed", None, JobFailure("out_of_memory", "The job ran out of memory; use a smaller model, batch "
                                          "size or dataset.", "infra_error").as_dict()
    except Exception as exc:  # a bug: fail this job, keep the worker alive, log the trace for us
        log.exception("job %s crashed", run.job_id)
        return "failed", None, JobFailure("internal_error", f"An internal error stopped the job ({type(exc).__name__}: "
                                          f"{exc}); it has been logged.", "infra_error").as_dict()
