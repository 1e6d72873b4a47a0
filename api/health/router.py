"""/healthz (the process answers), /readyz (db and broker answer), /metrics (Prometheus)."""
import logging
import time

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from core.broker import ping_broker
from core.settings import get_settings
from db.repositories.jobs import count_by_status, finished_durations, ping
from db.repositories.outbox import queue_depth
from db.session import get_sessionmaker

log = logging.getLogger("refinery.api")
router = APIRouter(tags=["health"])
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)


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
    """Job gauges read from the ledger at scrape time, so every API replica reports the same truth."""

    def describe(self):
        return []  # nothing to query when registering; names are known at scrape time

    def collect(self):
        session = get_sessionmaker(get_settings().database_url)()
        try:
            counts = count_by_status(session)
            depth = queue_depth(session)
            durations = finished_durations(session, since=time.time() - 24 * 3600)
        finally:
            session.close()
        jobs = GaugeMetricFamily("refinery_jobs", "Jobs in the ledger by status", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("refinery_queue_depth", "Queued jobs not yet claimed by a worker", value=depth)
        hist = HistogramMetricFamily("refinery_job_duration_seconds",
                                     "Run time of jobs finished in the last 24 h", labels=["method"])
        for method in sorted({m for m, _ in durations}):
            values = [d for m, d in durations if m == method]
            buckets = [(str(b), sum(v <= b for v in values)) for b in DURATION_BUCKETS] + [("+Inf", len(values))]
            hist.add_metric([method], buckets, sum(values))
        yield hist


_registered = False


def register_collector() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(LedgerCollector())
        _registered = True


@router.get("/metrics", response_class=Response)
def metrics():
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
