"""Idempotency records: (project, endpoint, key) → the request's hash and the object it created."""
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import IdempotencyRecord


def find_record(session: Session, project_id: str, endpoint: str, key: str) -> IdempotencyRecord | None:
    return session.scalar(select(IdempotencyRecord).where(IdempotencyRecord.project_id == project_id,
                                                          IdempotencyRecord.endpoint == endpoint,
                                                          IdempotencyRecord.key == key))


def add_record(session: Session, project_id: str, endpoint: str, key: str, request_hash: str, resource_id: str) -> None:
    """Flushed at once so the unique constraint decides between concurrent requests with the same key."""
    session.add(IdempotencyRecord(project_id=project_id, endpoint=endpoint, key=key, request_hash=request_hash,
                                  resource_id=resource_id, created_at=time.time()))
    session.flush()
