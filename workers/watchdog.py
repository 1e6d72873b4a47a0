"""The stalled-consumer watchdog. A Celery worker on Redis can lose its broker connection (Redis restarted while it
acked a message) and reconnect without consuming again, alive but deaf (celery/celery#8384, #10205, #10302: still
reported on Celery 5.6). The ledger keeps the jobs safe, but nobody would run them. So a worker that sits idle while
its queue has held messages for `worker_stall_seconds` exits, and its supervisor (`refinery serve`, Kubernetes)
starts a fresh one — the same call a liveness probe makes, from inside."""
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("refinery.worker")

EXIT_STALLED = 75  # EX_TEMPFAIL: try again


class Watchdog:
    def __init__(self, queue_depth: Callable[[], int], stall_seconds: float, exit: Callable[[int], None] = os._exit,
                 interval: float = 1.0):
        self.queue_depth, self.stall_seconds, self.exit, self.interval = queue_depth, stall_seconds, exit, interval
        self.busy = threading.Event()  # set while a task runs (task_prerun → task_postrun)
        self.stopping = threading.Event()
        self._waiting_since: float | None = None
        self.depth = 0  # messages waiting at the last look

    def check(self) -> bool:
        """One look; True when the worker has stalled and should exit."""
        try:
            depth = 0 if self.busy.is_set() else self.queue_depth()
        except Exception as exc:  # broker down: that is the reconnect logic's business, not a stall
            log.debug("watchdog: queue depth unavailable (%s)", exc)
            depth = 0
        self.depth = depth
        if depth == 0:
            self._waiting_since = None
            return False
        self._waiting_since = self._waiting_since or time.monotonic()
        return time.monotonic() - self._waiting_since >= self.stall_seconds

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            if self.check():
                log.critical("idle for %.0f s while %d messages wait in the queue: the broker consumer has stalled; "
                             "exiting so the supervisor starts a fresh worker", self.stall_seconds, self.depth)
                self.exit(EXIT_STALLED)
                return

    def start(self) -> None:
        threading.Thread(target=self.run, name="refinery-watchdog", daemon=True).start()


def redis_queue_depth(broker_url: str, queue: str) -> Callable[[], int]:
    """Messages waiting in a kombu Redis queue (a list named after the queue; prefetched ones are not in it)."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
    return lambda: int(client.llen(queue))
