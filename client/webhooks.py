"""Verifying a Refinery webhook on the receiving side: the Standard Webhooks signature over id.timestamp.body,
with the five-minute replay window (https://www.standardwebhooks.com), using the `standardwebhooks` package."""
import binascii
from collections.abc import Mapping
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

__all__ = ["WebhookVerificationError", "verify_webhook"]


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes | str) -> dict[str, Any]:
    """The event ({"type", "timestamp", "data"}) if `body` carries a valid signature made with `secret` (whsec_…)
    within the last five minutes; raises WebhookVerificationError otherwise. Pass the raw body, before any JSON
    parsing: the signature is over the exact bytes sent."""
    try:
        return Webhook(secret).verify(body, dict(headers))
    except WebhookVerificationError:
        raise
    except (ValueError, binascii.Error) as exc:  # a malformed header or secret
        raise WebhookVerificationError(f"malformed webhook headers or secret: {exc}") from None
