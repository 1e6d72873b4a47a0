"""Routes under /v1/webhooks."""
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from api.dependencies import CursorQuery, ProjectId, SessionDep, SettingsDep, idempotency_key
from api.errors import V1_ERRORS, documented
from api.webhooks import service
from api.webhooks.dependencies import OwnedWebhook
from api.webhooks.schemas import (
    DeliveryList,
    DeliveryObject,
    WebhookCreate,
    WebhookDeleted,
    WebhookList,
    WebhookObject,
    WebhookUpdate,
    WebhookWithSecret,
)
from db.repositories import webhooks as repo

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=V1_ERRORS)
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("", status_code=201, response_model=WebhookWithSecret, responses=documented(409))
def create_webhook(body: WebhookCreate, project_id: ProjectId, session: SessionDep, settings: SettingsDep,
                   response: Response, key: Annotated[str | None, Depends(idempotency_key)]):
    webhook, created = service.create_webhook(session, settings, project_id, body, key)
    session.commit()
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return WebhookWithSecret.of(webhook)


@router.get("", response_model=WebhookList)
def list_webhooks(project_id: ProjectId, session: SessionDep, limit: Limit = 20, after: CursorQuery = None):
    rows, has_more = repo.list_webhooks(session, project_id, after=after, limit=limit)
    return WebhookList(data=[WebhookObject.of(w) for w in rows], has_more=has_more)


@router.get("/{webhook_id}", response_model=WebhookObject)
def get_webhook(webhook: OwnedWebhook):
    return WebhookObject.of(webhook)


@router.patch("/{webhook_id}", response_model=WebhookObject)
def update_webhook(webhook: OwnedWebhook, body: WebhookUpdate, session: SessionDep, settings: SettingsDep):
    service.update_webhook(session, settings, webhook, body)
    session.commit()
    return WebhookObject.of(webhook)


@router.delete("/{webhook_id}", response_model=WebhookDeleted)
def delete_webhook(webhook: OwnedWebhook, session: SessionDep):
    webhook_id = webhook.id
    repo.delete_webhook(session, webhook)
    session.commit()
    return WebhookDeleted(id=webhook_id)


@router.post("/{webhook_id}/rotate_secret", response_model=WebhookWithSecret)
def rotate_secret(webhook: OwnedWebhook, session: SessionDep):
    service.rotate_secret(session, webhook)
    session.commit()
    return WebhookWithSecret.of(webhook)


@router.post("/{webhook_id}/ping", status_code=202, response_model=DeliveryObject, responses=documented(409))
def ping(webhook: OwnedWebhook, session: SessionDep):
    delivery = service.ping(session, webhook)
    session.commit()
    return DeliveryObject.of(delivery)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList)
def list_deliveries(webhook: OwnedWebhook, session: SessionDep, limit: Limit = 20, after: CursorQuery = None):
    rows, has_more = repo.list_deliveries(session, webhook.id, after=after, limit=limit)
    return DeliveryList(data=[DeliveryObject.of(d) for d in rows], has_more=has_more)
