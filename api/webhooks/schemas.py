"""Request and response shapes for webhook endpoints and their deliveries."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from db.models import Webhook, WebhookDelivery
from db.repositories.webhooks import JOB_EVENT_TYPES

EventTypes = list[str]
_EVENT_TYPES_FIELD = {"json_schema_extra": {"items": {"type": "string", "enum": list(JOB_EVENT_TYPES)}},
                      "description": "the job events to receive; all of them when omitted"}


def _known_event_types(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    unknown = [t for t in value if t not in JOB_EVENT_TYPES]
    if unknown:
        raise ValueError(f"unknown event type {unknown[0]!r}; choose from {', '.join(JOB_EVENT_TYPES)}")
    return list(dict.fromkeys(value))


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2048, description="http:// or https:// URL the events are POSTed to")
    event_types: EventTypes | None = Field(None, min_length=1, **_EVENT_TYPES_FIELD)
    description: str | None = Field(None, max_length=500)

    _check_types = field_validator("event_types")(_known_event_types)


class WebhookUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(None, min_length=1, max_length=2048)
    event_types: EventTypes | None = Field(None, min_length=1, **_EVENT_TYPES_FIELD)
    description: str | None = Field(None, max_length=500)
    enabled: bool | None = Field(None, description="true re-enables an endpoint disabled after failed deliveries")

    _check_types = field_validator("event_types")(_known_event_types)


class WebhookObject(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    url: str
    event_types: list[str]
    description: str | None
    status: Literal["enabled", "disabled"]
    disabled_at: float | None
    disabled_reason: str | None
    created_at: float

    @classmethod
    def of(cls, hook: Webhook) -> "WebhookObject":
        return cls(id=hook.id, url=hook.url, event_types=hook.event_types, description=hook.description,
                   status="disabled" if hook.disabled_at else "enabled", disabled_at=hook.disabled_at,
                   disabled_reason=hook.disabled_reason, created_at=hook.created_at)


class WebhookWithSecret(WebhookObject):
    """Only the create and rotate_secret responses carry the secret; store it then, it is not shown again."""
    secret: str = Field(description="whsec_…: verify each delivery's webhook-signature with it")

    @classmethod
    def of(cls, hook: Webhook) -> "WebhookWithSecret":
        return cls(**WebhookObject.of(hook).model_dump(), secret=hook.secret)


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookObject]
    has_more: bool


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    deleted: Literal[True] = True


class DeliveryObject(BaseModel):
    id: str = Field(description="msg_…: the webhook-id header, the same on every try")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    webhook_id: str
    event_type: str
    job_id: str | None
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_latency_ms: float | None
    next_attempt_at: float | None
    created_at: float
    delivered_at: float | None

    @classmethod
    def of(cls, d: WebhookDelivery) -> "DeliveryObject":
        return cls(id=d.id, webhook_id=d.webhook_id, event_type=d.event_type, job_id=d.job_id, status=d.status,
                   attempts=d.attempts, last_status_code=d.last_status_code, last_error=d.last_error,
                   last_latency_ms=d.last_latency_ms, next_attempt_at=d.next_attempt_at, created_at=d.created_at,
                   delivered_at=d.delivered_at)


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryObject]
    has_more: bool
