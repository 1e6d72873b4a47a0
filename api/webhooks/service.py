"""Webhook rules: the URL is http(s) and resolves to an address the outbound policy allows (checked again on every
try by the sender), secrets are random and shown once, creation is idempotent, pings go through the outbox."""
import base64
import secrets
import time

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import APIError
from api.idempotency import replayed_id, request_hash
from api.webhooks.schemas import WebhookCreate, WebhookUpdate
from api.webhooks.sender import UnsafeURL, resolve_target
from core.ids import new_id
from core.netguard import address_policy
from core.settings import Settings
from db.models import Webhook, WebhookDelivery
from db.repositories import idempotency
from db.repositories import webhooks as repo

ENDPOINT = "POST /v1/webhooks"


def new_secret() -> str:
    """whsec_ + base64 of 32 random bytes, the Standard Webhooks secret format."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_url(url: str, settings: Settings) -> str:
    try:
        resolve_target(url, address_policy(settings.outbound_networks))
    except UnsafeURL as exc:
        raise APIError(422, "invalid_url", f"url: {exc}.", param="url") from None
    return url


def create_webhook(session: Session, settings: Settings, project_id: str, body: WebhookCreate,
                   key: str | None) -> tuple[Webhook, bool]:
    """Returns (webhook, created). The same Idempotency-Key and body return the first webhook, secret included (the
    retry of a create whose answer was lost must still learn it); another body with the key is a 409."""
    digest = request_hash(body.model_dump(mode="json"))
    if key is not None:
        replay = _replay(session, project_id, key, digest)
        if replay is not None:
            return replay, False
    check_url(body.url, settings)
    webhook = Webhook(id=new_id("wh"), project_id=project_id, url=body.url,
                      event_types=body.event_types or list(repo.JOB_EVENT_TYPES), description=body.description,
                      secret=new_secret(), created_at=time.time())
    try:
        with session.begin_nested():
            repo.add_webhook(session, webhook)
            if key is not None:
                idempotency.add_record(session, project_id, ENDPOINT, key, digest, webhook.id)
    except IntegrityError:
        replay = _replay(session, project_id, key, digest) if key is not None else None
        if replay is None:
            raise
        return replay, False
    return webhook, True


def _replay(session: Session, project_id: str, key: str, digest: str) -> Webhook | None:
    webhook_id = replayed_id(session, project_id, ENDPOINT, key, digest, "webhook")
    if webhook_id is None:
        return None
    webhook = repo.get_project_webhook(session, project_id, webhook_id)
    if webhook is None:
        raise APIError(409, "idempotency_key_reused", "The webhook this Idempotency-Key created has been deleted; "
                       "use a new key.", param="Idempotency-Key")
    return webhook


def update_webhook(session: Session, settings: Settings, webhook: Webhook, body: WebhookUpdate) -> Webhook:
    if body.url is not None:
        webhook.url = check_url(body.url, settings)
    if body.event_types is not None:
        webhook.event_types = body.event_types
    if "description" in body.model_fields_set:
        webhook.description = body.description
    if body.enabled is True:
        webhook.disabled_at, webhook.disabled_reason = None, None
    elif body.enabled is False and webhook.disabled_at is None:
        webhook.disabled_at, webhook.disabled_reason = time.time(), "disabled by a user"
    session.flush()
    return webhook


def rotate_secret(session: Session, webhook: Webhook) -> Webhook:
    """Tries from now on are signed with the new secret only; the old one stops verifying at once."""
    webhook.secret = new_secret()
    session.flush()
    return webhook


def ping(session: Session, webhook: Webhook) -> WebhookDelivery:
    if webhook.disabled_at is not None:
        raise APIError(409, "webhook_disabled", "This webhook is disabled; enable it with PATCH "
                       '{"enabled": true} first.', param="id")
    now = time.time()
    delivery = repo.add_delivery(session, webhook.id, repo.PING,
                                 repo.payload(repo.PING, {"webhook_id": webhook.id}, now), now=now)
    session.flush()
    return delivery
