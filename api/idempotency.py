"""Idempotency-Key rules shared by every creating POST: same key + same body → the first object; same key + another
body → 409. The records themselves are in db/repositories/idempotency.py."""
import hashlib
import json

from sqlalchemy.orm import Session

from api.errors import APIError
from db.repositories import idempotency


def request_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def replayed_id(session: Session, project_id: str, endpoint: str, key: str, digest: str, noun: str) -> str | None:
    """The id of what an earlier request with this key created, or None when the key is new."""
    record = idempotency.find_record(session, project_id, endpoint, key)
    if record is None:
        return None
    if record.request_hash != digest:
        raise APIError(409, "idempotency_key_reused", "This Idempotency-Key was used with a different request body; "
                       f"use a new key for a new {noun}.", param="Idempotency-Key")
    return record.resource_id
