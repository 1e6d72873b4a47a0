"""`OwnedWebhook`: the endpoint in the path, if it belongs to the caller's project; a 404 otherwise (same as missing)."""
from typing import Annotated

from fastapi import Depends

from api.dependencies import PathId, ProjectId, SessionDep
from api.errors import not_found
from db.models import Webhook
from db.repositories.webhooks import get_project_webhook


def get_owned_webhook(webhook_id: PathId, project_id: ProjectId, session: SessionDep) -> Webhook:
    webhook = get_project_webhook(session, project_id, webhook_id)
    if webhook is None:
        raise not_found("webhook", webhook_id)
    return webhook


OwnedWebhook = Annotated[Webhook, Depends(get_owned_webhook)]
