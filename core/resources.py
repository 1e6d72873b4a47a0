"""Resource classes: which worker pool a job needs, and the Celery queue that pool consumes.

A class is the accelerator, then `-x{devices}` when a job runs on more than one device, then `-n{nodes}` when it spans
more than one machine: `cpu`, `cpu-x2`, `gpu`, `gpu-x4`, `gpu-x8-n2` (2 machines of 8 GPUs each). It is decided from
the spec's `resources` alone: none of today's methods needs more than what `resources` asks for (every one runs on a
CPU), so the method adds nothing yet. The class `cpu` is published to the base queue (REFINERY_QUEUE), so existing
deployments keep working; every other class to `{REFINERY_QUEUE}.{class}`. A worker serves the classes in
REFINERY_WORKER_CLASSES (default `cpu`) and consumes exactly their queues."""
import re
from typing import Any

CPU = "cpu"
CLASS_PATTERN = re.compile(r"^(cpu|gpu)(-x([2-9]|[1-5][0-9]|6[0-4]))?(-n([2-9]|[1-5][0-9]|6[0-4]))?$")


def resource_class(resources: Any) -> str:
    """The class of a spec's `resources` (a core.spec.Resources, or its JSON form as stored in a job's spec)."""
    if isinstance(resources, dict):
        accelerator = resources.get("accelerator", "cpu")
        devices, nodes = int(resources.get("devices", 1)), int(resources.get("nodes", 1))
    else:
        accelerator, devices, nodes = resources.accelerator, resources.devices, resources.nodes
    return accelerator + (f"-x{devices}" if devices > 1 else "") + (f"-n{nodes}" if nodes > 1 else "")


def queue_for(resource_class: str, base_queue: str) -> str:
    return base_queue if resource_class == CPU else f"{base_queue}.{resource_class}"


def parse_classes(text: str) -> list[str]:
    """REFINERY_WORKER_CLASSES: comma-separated classes, e.g. `cpu,cpu-x2` or `gpu-x4`. Raises ValueError naming a
    malformed entry, so a worker with a typo stops at start instead of waiting on a queue nothing publishes to."""
    classes = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not classes:
        raise ValueError("worker_classes: name at least one resource class, e.g. cpu or gpu,gpu-x4")
    for name in classes:
        if not CLASS_PATTERN.match(name):
            raise ValueError(f"worker_classes: {name!r} is not a resource class; classes look like cpu, cpu-x2, gpu, "
                             "gpu-x4, gpu-x8-n2 (accelerator, -x devices when more than 1, -n nodes when more than 1)")
    return classes


def class_queues(base_queue: str, classes: str) -> list[str]:
    """The Celery queues a worker serving `classes` (REFINERY_WORKER_CLASSES' text) consumes."""
    return [queue_for(name, base_queue) for name in parse_classes(classes)]


def waiting_for(resource_class: str, live: dict[str, int], seen_seconds: float) -> dict[str, str] | None:
    """Why a queued job is not running yet, from the live workers per class and how many of them are idle
    (`live[class]` = idle workers, present only for classes some live worker serves). None while an idle worker
    serving its class exists: it is being dispatched."""
    if resource_class not in live:
        return {"reason": "no_worker_for_class", "resource_class": resource_class,
                "message": f"No worker serving resource class {resource_class} has been seen in the last "
                           f"{seen_seconds:.0f} s, so this job waits in its queue; start one with "
                           f"REFINERY_WORKER_CLASSES={resource_class} (or a Helm workerPools entry with that class)."}
    if live[resource_class] == 0:
        return {"reason": "worker_busy", "resource_class": resource_class,
                "message": f"Every worker serving resource class {resource_class} is running another job; this job "
                           "starts when one is free."}
    return None
