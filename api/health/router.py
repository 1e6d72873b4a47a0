"""/healthz (the process answers), /readyz (db and broker answer), /metrics (Prometheus)."""
import logging
import time

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from core.broker import ping_broker
from core.settings import get_settings
from db.lifecycle import TERMINAL
from db.repositories.jobs import count_by_method_and_status, dispatch_waits, finished_durations, ping, running_progress
from db.repositories.outbox import queue_depth
from db.repositories.webhooks import delivery_outcomes
from db.session import get_sessionmaker

log = logging.getLogger("refinery.api")
router = APIRouter(tags=["health"])
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
DISPATCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/readyz")
def readyz():
    checks = {"database": False, "broker": False}
    try:
        session = get_sessionmaker(get_settings().database_url)()
        try:
            ping(session)
            checks["database"] = True
        finally:
            session.close()
    except Exception as exc:  # any failure means "not ready"; say why in the log
        log.warning("readiness: database check failed: %s", exc)
    checks["broker"] = ping_broker()
    ok = all(checks.values())
    return JSONResponse({"status": "ready" if ok else "unavailable", "checks": checks}, 200 if ok else 503)


class LedgerCollector:
    """Metrics read from the ledger at scrape time, so every API replica reports the same truth, one query each.

    Workers are not scraped: they are short-lived Celery processes in pods or behind NAT, which a scraper would have
    to discover, and each one's heartbeat already writes its job's progress (samples per second included) to the
    ledger every few seconds. The ledger is the channel, as a Pushgateway would be, with nothing more to run.
    The histograms cover jobs of the last 24 h and are recomputed at each scrape: read them with
    histogram_quantile over the buckets directly, not over rate()."""

    def describe(self):
        return []  # nothing to query when registering; names are known at scrape time

    def collect(self):
        since = time.time() - 24 * 3600
        session = get_sessionmaker(get_settings().database_url)()
        try:
            counts = count_by_method_and_status(session)
            depth = queue_depth(session)
            durations = finished_durations(session, since=since)
            waits = dispatch_waits(session, since=since)
            running = running_progress(session)
            deliveries = delivery_outcomes(session)
        finally:
            session.close()
        jobs = GaugeMetricFamily("refinery_jobs", "Jobs in the ledger by status", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], sum(n for (_, s), n in counts.items() if s == status))
        yield jobs
        by_method = GaugeMetricFamily("refinery_jobs_by_method", "Jobs in the ledger by method and status",
                                      labels=["method", "status"])
        # A finished status is final and job rows are never deleted, so these counts only grow: a true counter.
        finished = CounterMetricFamily("refinery_jobs_finished", "Jobs that reached a final status, by method",
                                       labels=["method", "status"])
        for (method, status), count in sorted(counts.items()):
            by_method.add_metric([method, status], count)
            if status in TERMINAL:
                finished.add_metric([method, status], count)
        yield by_method
        yield finished
        yield GaugeMetricFamily("refinery_queue_depth", "Queued jobs not yet claimed by a worker", value=depth)
        yield _histogram("refinery_job_duration_seconds", "Run time of jobs finished in the last 24 h (their last "
                         "attempt)", durations, DURATION_BUCKETS)
        yield _histogram("refinery_job_dispatch_latency_seconds", "Wait from queued (created or requeued) to claimed "
                         "by a worker, per attempt, for jobs claimed in the last 24 h", waits, DISPATCH_BUCKETS)
        throughput = GaugeMetricFamily("refinery_job_samples_per_second", "Training samples per second of each "
                                       "running job, from its worker's last heartbeat", labels=["job_id", "method"])
        for job_id, method, progress in running:
            rate = progress.get("samples_per_second")
            if isinstance(rate, int | float):
                throughput.add_metric([job_id, method], rate)
        yield throughput
        webhooks = GaugeMetricFamily("refinery_webhook_deliveries", "Webhook deliveries in the ledger by outcome",
                                     labels=["outcome"])
        for outcome, count in sorted(deliveries.items()):
            webhooks.add_metric([outcome], count)
        yield webhooks


def _histogram(name: str, documentation: str, observations: list[tuple[str, float]],
               bounds: tuple[float, ...]) -> HistogramMetricFamily:
    hist = HistogramMetricFamily(name, documentation, labels=["method"])
    for method in sorted({m for m, _ in observations}):
        values = [v for m, v in observations if m == method]
        buckets = [(str(b), sum(v <= b for v in values)) for b in bounds] + [("+Inf", len(values))]
        hist.add_metric([method], buckets, sum(values))
    return hist


_registered = False


def register_collector() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(LedgerCollector())
        _registered = True


@router.get("/metrics", response_class=Response)
def metrics():
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
