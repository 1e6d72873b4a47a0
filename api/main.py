"""The FastAPI application: routers, error handlers, limits, and the sweeper thread (dispatcher + reaper)."""
import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.exc import OperationalError

from api.artifacts.router import router as artifacts_router
from api.bootstrap import ensure_bootstrap_key
from api.errors import install_handlers
from api.files.router import router as files_router
from api.health.router import register_collector
from api.health.router import router as health_router
from api.integrations.router import router as integrations_router
from api.jobs.router import router as jobs_router
from api.limits import AdmissionGate, BodySizeLimit
from api.methods.router import router as methods_router
from api.ui.router import mount as mount_ui
from api.webhooks import sender as webhook_sender
from api.webhooks.router import router as webhooks_router
from core.settings import get_settings
from db import sweeper

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _bootstrap_when_the_database_answers(settings) -> None:
    """The API starts even while the database is down (readiness says 503); the bootstrap key follows when it is up."""
    while True:
        try:
            ensure_bootstrap_key(settings)
            return
        except OperationalError as exc:
            logging.getLogger("refinery.api").warning("bootstrap key deferred, database unavailable: %s", exc.orig)
            time.sleep(5)


@asynccontextmanager
async def lifespan(_: FastAPI):
    settings = get_settings()
    threading.Thread(target=_bootstrap_when_the_database_answers, args=(settings,), daemon=True).start()
    register_collector()
    stops = []
    if settings.run_sweeper:
        stops.append(sweeper.start_thread(settings)[1])
    if settings.run_webhook_sender:
        stops.append(webhook_sender.start_thread(settings)[1])
    yield
    for stop in stops:
        stop.set()


def create_app() -> FastAPI:
    app = FastAPI(title="Refinery", version="1.0.0", lifespan=lifespan,
                  description="Training-as-a-service for model compression and machine unlearning.")
    install_handlers(app)
    for router in (health_router, jobs_router, artifacts_router, files_router, methods_router, webhooks_router,
                   integrations_router):
        app.include_router(router)
    mount_ui(app)
    # Multipart overhead on top of the file itself is small; 1 MiB of slack keeps a file at the limit uploadable.
    app.add_middleware(BodySizeLimit, max_bytes_for=lambda: get_settings().max_upload_bytes + 1024 * 1024)
    app.add_middleware(AdmissionGate, limit=get_settings().api_concurrency)
    return app


app = create_app()
