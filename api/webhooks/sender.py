"""The webhook sender: leases due deliveries from the ledger, POSTs each one signed (Standard Webhooks: webhook-id,
webhook-timestamp, webhook-signature) to the address its endpoint's host resolves to now, checked against the
outbound policy, and records the outcome: delivered on a 2xx, otherwise another try on the retry schedule, and after
the last one the delivery fails and the endpoint is disabled.

Every API process runs one (a daemon thread beside the sweeper); `refinery webhook-sender` runs one alone. Several
at once are safe: a delivery is leased with a conditional UPDATE, a killed sender's lease runs out and another sender
retries it with the same webhook-id. Endpoints are served in parallel, one delivery at a time each, so a receiver
that hangs holds up only its own deliveries, never other endpoints' nor any job."""
import logging
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from standardwebhooks import Webhook as Signer

from core.netguard import AddressRefused, PinnedTarget, address_policy, check_http_url, pin
from core.settings import Settings
from db.repositories import webhooks as repo
from db.session import transaction

log = logging.getLogger("refinery.webhooks")
USER_AGENT = "Refinery-Webhooks/1"
JITTER = 0.2  # each wait is the schedule's ±20 %, so endpoints that failed together do not retry together
# One TLS context for every try: building one (loading the CA bundle) costs ~50 ms, more than a loopback delivery.
_TLS = httpx.create_ssl_context()


class UnsafeURL(ValueError):
    """Not an http(s) URL this platform will send to (scheme, credentials, port, or a refused address)."""


def resolve_target(url: str, allowed) -> PinnedTarget:
    """Check `url` and resolve its host now, on every try (a name may be re-pointed after the endpoint was created):
    the pinned target to connect to, or UnsafeURL saying why not."""
    try:
        return pin(*check_http_url(url, allowed))
    except AddressRefused as exc:
        raise UnsafeURL(str(exc)) from None


def secret_signature(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    return Signer(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), body)


@dataclass
class Outcome:
    status_code: int | None
    error: str | None
    latency_ms: float | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def send(settings: Settings, url: str, secret: str, msg_id: str, body: str) -> Outcome:
    """One try: resolve and check, sign with the current secret and this try's timestamp, POST without redirects."""
    try:
        target = resolve_target(url, address_policy(settings.outbound_networks))
    except UnsafeURL as exc:
        return Outcome(None, f"address refused: {exc}", None)
    timestamp = int(time.time())
    headers = {"Host": target.host_header, "Content-Type": "application/json", "User-Agent": USER_AGENT,
               "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
               "webhook-signature": secret_signature(secret, msg_id, timestamp, body)}
    timeout = httpx.Timeout(settings.webhook_timeout_seconds, connect=settings.webhook_connect_timeout_seconds)
    started = time.monotonic()
    try:
        # trust_env=False: a proxy from the environment would make its own, unchecked connection.
        # A client per try: a pooled connection to the same address could carry another host's request over a TLS
        # session verified for the first host.
        with httpx.Client(verify=_TLS, timeout=timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request("POST", target.url, content=body.encode(), headers=headers,
                                           extensions={"sni_hostname": target.sni_hostname})
            response = client.send(request)
    except httpx.TimeoutException as exc:
        return Outcome(None, f"timed out ({type(exc).__name__})", _ms(started))
    except httpx.HTTPError as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}"[:500], _ms(started))
    latency = _ms(started)
    if 200 <= response.status_code < 300:
        return Outcome(response.status_code, None, latency)
    note = " (redirects are not followed)" if 300 <= response.status_code < 400 else ""
    return Outcome(response.status_code, f"HTTP {response.status_code}{note}", latency)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


class Sender:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = settings.database_url
        self.schedule = settings.webhook_retry_schedule
        self.busy: set[str] = set()  # endpoints this sender is serving now
        self.lock = threading.Lock()
        self.wake = threading.Event()

    def run(self, stop: threading.Event) -> None:
        with ThreadPoolExecutor(self.settings.webhook_sender_threads, thread_name_prefix="refinery-webhook") as pool:
            while not stop.is_set():
                try:
                    self.dispatch(pool)
                except Exception:
                    log.exception("webhook dispatch failed; retrying")
                self.wake.wait(self.settings.webhook_poll_seconds)
                self.wake.clear()
            pool.shutdown(wait=False, cancel_futures=True)

    def dispatch(self, pool: ThreadPoolExecutor) -> int:
        """Start serving each endpoint with a due delivery, as many as there are free threads."""
        with self.lock:
            free = self.settings.webhook_sender_threads - len(self.busy)
            busy = set(self.busy)
        if free <= 0:
            return 0
        with transaction(self.url, readonly=True) as session:
            due = repo.due_webhooks(session, time.time(), exclude=busy, limit=free)
        for webhook_id in due:
            with self.lock:
                self.busy.add(webhook_id)
            pool.submit(self.serve_endpoint, webhook_id)
        return len(due)

    def serve_endpoint(self, webhook_id: str) -> None:
        """Send the endpoint's due deliveries one after another, oldest first, until none is due."""
        try:
            while self.try_next(webhook_id):
                pass
        except Exception:
            log.exception("webhook %s: sending failed; retrying on the next poll", webhook_id)
        finally:
            with self.lock:
                self.busy.discard(webhook_id)

    def try_next(self, webhook_id: str) -> bool:
        """Lease, send and record one delivery; False when the endpoint has none due (or another sender has it)."""
        with transaction(self.url) as session:
            claimed = repo.claim_due(session, webhook_id, time.time(), self.settings.webhook_lease_seconds)
            if claimed is None:
                return False
            delivery_id, token = claimed
            delivery, webhook = repo.get_delivery(session, delivery_id), repo.get_webhook(session, webhook_id)
            if delivery is None or webhook is None:  # deleted meanwhile
                return False
            url, secret, body, attempts = webhook.url, webhook.secret, delivery.body, delivery.attempts
        outcome = send(self.settings, url, secret, delivery_id, body)  # no database connection held meanwhile
        self.record(webhook_id, delivery_id, token, attempts, outcome)
        return True

    def record(self, webhook_id: str, delivery_id: str, token: str, attempts: int, outcome: Outcome) -> None:
        with transaction(self.url) as session:
            if outcome.ok:
                repo.mark_delivered(session, delivery_id, token, status_code=outcome.status_code,
                                    latency_ms=outcome.latency_ms)
                return
            if attempts < len(self.schedule):
                wait = self.schedule[attempts] * random.uniform(1 - JITTER, 1 + JITTER)
                repo.schedule_retry(session, delivery_id, token, next_attempt_at=time.time() + wait,
                                    status_code=outcome.status_code, error=outcome.error,
                                    latency_ms=outcome.latency_ms)
                log.info("webhook %s delivery %s try %d failed (%s); next in %.0f s", webhook_id, delivery_id,
                         attempts, outcome.error, wait)
                return
            reason = f"{attempts} tries to deliver {delivery_id} failed; the last: {outcome.error}"
            if repo.fail_and_disable(session, delivery_id, token, status_code=outcome.status_code,
                                     error=outcome.error, latency_ms=outcome.latency_ms, reason=reason):
                log.warning("webhook %s disabled: %s", webhook_id, reason)


def start_thread(settings: Settings) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=Sender(settings).run, args=(stop,), name="refinery-webhook-sender", daemon=True)
    thread.start()
    return thread, stop


def run_forever(settings: Settings) -> None:
    """`refinery webhook-sender`: until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("webhook sender started (poll %.2f s, %d threads)", settings.webhook_poll_seconds,
             settings.webhook_sender_threads)
    Sender(settings).run(stop)
