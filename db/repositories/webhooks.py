"""Webhook endpoints and their deliveries. Deliveries are an outbox: `enqueue_job_event` writes them in the same
transaction as the job's status change; senders lease due ones (`claim_due`) and record each try's outcome, fenced
by the lease token so a sender whose lease ran out cannot overwrite the outcome of the one that took over."""
import json
import secrets
import time
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, aliased

from core.ids import new_id
from core.job_object import JobObject
from db.models import Job, Webhook, WebhookDelivery

JOB_EVENT_TYPES = ("job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled", "job.requeued")
PING = "webhook.ping"


def payload(event_type: str, data: dict[str, Any], timestamp: float) -> str:
    """The body every receiver gets: {"type", "timestamp" (Unix seconds), "data"}, serialised once and kept."""
    return json.dumps({"type": event_type, "timestamp": timestamp, "data": data}, separators=(",", ":"))


def add_webhook(session: Session, webhook: Webhook) -> Webhook:
    session.add(webhook)
    session.flush()
    return webhook


def get_project_webhook(session: Session, project_id: str, webhook_id: str) -> Webhook | None:
    return session.scalar(select(Webhook).where(Webhook.id == webhook_id, Webhook.project_id == project_id))


def get_webhook(session: Session, webhook_id: str) -> Webhook | None:
    return session.get(Webhook, webhook_id)


def list_webhooks(session: Session, project_id: str, *, after: str | None, limit: int) -> tuple[list[Webhook], bool]:
    """Newest first; `after` is the last id of the previous page."""
    query = select(Webhook).where(Webhook.project_id == project_id).order_by(Webhook.id.desc())
    if after:
        query = query.where(Webhook.id < after)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_webhook(session: Session, webhook: Webhook) -> None:
    """The endpoint and its delivery log (pending deliveries are dropped: there is nowhere to send them)."""
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook.id))
    session.delete(webhook)
    session.flush()


def add_delivery(session: Session, webhook_id: str, event_type: str, body: str, *, job_id: str | None = None,
                 now: float | None = None) -> WebhookDelivery:
    now = now or time.time()
    delivery = WebhookDelivery(id=new_id("msg"), webhook_id=webhook_id, job_id=job_id, event_type=event_type,
                               body=body, status="pending", attempts=0, next_attempt_at=now, created_at=now)
    session.add(delivery)
    return delivery


def enqueue_job_event(session: Session, job_id: str, project_id: str, event_type: str) -> int:
    """One delivery per enabled endpoint of the project subscribed to `event_type`, carrying the job object as it
    is now (after the caller's UPDATE, in the caller's transaction). Returns how many. Cheap when the project has no
    webhooks: one indexed SELECT, and the job is read only when some endpoint wants it."""
    hooks = [hook_id for hook_id, types in session.execute(
        select(Webhook.id, Webhook.event_types).where(Webhook.project_id == project_id, Webhook.disabled_at.is_(None)))
        if event_type in types]
    if not hooks:
        return 0
    # populate_existing: the caller changed the row with a bulk UPDATE, which a Job already in the session predates.
    job = session.scalar(select(Job).where(Job.id == job_id).execution_options(populate_existing=True))
    now = time.time()
    body = payload(event_type, JobObject.of(job).as_json(), now)
    for hook_id in hooks:
        add_delivery(session, hook_id, event_type, body, job_id=job_id, now=now)
    return len(hooks)


def list_deliveries(session: Session, webhook_id: str, *, after: str | None,
                    limit: int) -> tuple[list[WebhookDelivery], bool]:
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id).order_by(WebhookDelivery.id.desc())
    if after:
        query = query.where(WebhookDelivery.id < after)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def get_delivery(session: Session, delivery_id: str) -> WebhookDelivery | None:
    return session.get(WebhookDelivery, delivery_id)


def _due(now: float):
    return (WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now,
            WebhookDelivery.locked_until.is_(None) | (WebhookDelivery.locked_until < now))


def due_webhooks(session: Session, now: float, *, exclude: set[str], limit: int) -> list[str]:
    """Enabled endpoints that have a delivery due, oldest due first (a read: senders claim only when there is work)."""
    query = (select(WebhookDelivery.webhook_id, func.min(WebhookDelivery.next_attempt_at))
             .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
             .where(*_due(now), Webhook.disabled_at.is_(None))
             .group_by(WebhookDelivery.webhook_id).order_by(func.min(WebhookDelivery.next_attempt_at)))
    if exclude:
        query = query.where(WebhookDelivery.webhook_id.not_in(exclude))
    return [webhook_id for webhook_id, _ in session.execute(query.limit(limit))]


def claim_due(session: Session, webhook_id: str, now: float, lease_seconds: float) -> tuple[str, str] | None:
    """Lease the endpoint's oldest due delivery with one conditional UPDATE: (delivery id, lease token), or None when
    another sender won it or holds a delivery to this endpoint already (one try in flight per endpoint keeps a
    receiver's events in order while nothing is retrying). Counts the try."""
    candidate = session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.webhook_id == webhook_id, *_due(now))
                               .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.created_at,
                                         WebhookDelivery.id).limit(1))
    if candidate is None:
        return None
    in_flight = aliased(WebhookDelivery)
    token = secrets.token_hex(16)
    claimed = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == candidate, *_due(now),
               ~select(in_flight.id).where(in_flight.webhook_id == webhook_id, in_flight.status == "pending",
                                           in_flight.locked_until >= now).exists())
        .values(locked_until=now + lease_seconds, lock_token=token, attempts=WebhookDelivery.attempts + 1)
        .execution_options(synchronize_session=False))
    return (candidate, token) if claimed.rowcount == 1 else None


def _record(session: Session, delivery_id: str, token: str, **values: Any) -> bool:
    result = session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.lock_token == token,
                                      WebhookDelivery.status == "pending")
        .values(locked_until=None, lock_token=None, **values).execution_options(synchronize_session=False))
    return result.rowcount == 1


def mark_delivered(session: Session, delivery_id: str, token: str, *, status_code: int, latency_ms: float) -> bool:
    return _record(session, delivery_id, token, status="delivered", delivered_at=time.time(), next_attempt_at=None,
                   last_status_code=status_code, last_error=None, last_latency_ms=latency_ms)


def schedule_retry(session: Session, delivery_id: str, token: str, *, next_attempt_at: float,
                   status_code: int | None, error: str, latency_ms: float | None) -> bool:
    return _record(session, delivery_id, token, next_attempt_at=next_attempt_at, last_status_code=status_code,
                   last_error=error, last_latency_ms=latency_ms)


def fail_and_disable(session: Session, delivery_id: str, token: str, *, status_code: int | None, error: str,
                     latency_ms: float | None, reason: str) -> bool:
    """The last try failed: the delivery is failed, its endpoint disabled (no more deliveries are enqueued for it)
    and the endpoint's other pending deliveries are failed with it."""
    if not _record(session, delivery_id, token, status="failed", next_attempt_at=None, last_status_code=status_code,
                   last_error=error, last_latency_ms=latency_ms):
        return False
    webhook_id = session.scalar(select(WebhookDelivery.webhook_id).where(WebhookDelivery.id == delivery_id))
    now = time.time()
    session.execute(update(Webhook).where(Webhook.id == webhook_id, Webhook.disabled_at.is_(None))
                    .values(disabled_at=now, disabled_reason=reason).execution_options(synchronize_session=False))
    session.execute(update(WebhookDelivery)
                    .where(WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.status == "pending",
                           WebhookDelivery.id != delivery_id)
                    .values(status="failed", next_attempt_at=None, last_error="endpoint disabled: " + reason)
                    .execution_options(synchronize_session=False))
    return True


def delivery_outcomes(session: Session) -> dict[str, int]:
    """Deliveries by status (pending, delivered, failed), every status present: for the Prometheus collector."""
    counts = dict.fromkeys(("pending", "delivered", "failed"), 0)
    counts.update(session.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)).all())
    return counts
