"""Projects and their API keys. Keys are stored as sha256 digests: they are 256-bit random, so a fast hash is enough."""
import hashlib
import secrets
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.ids import new_id
from db.models import ApiKey, Project

KEY_PREFIX = "rfy_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(id=new_id("proj"), name=name, created_at=time.time())
        session.add(project)
        session.flush()
    return project


def create_key(session: Session, project: Project, name: str | None = None, key: str | None = None) -> tuple[ApiKey, str]:
    """Create a key (random unless given, e.g. the bootstrap token); returns the row and the plaintext, shown once."""
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), project_id=project.id, key_hash=hash_key(key), prefix=key[:10], name=name,
                 created_at=time.time())
    session.add(row)
    session.flush()
    return row, key


def find_active_key(session: Session, key: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))


def active_key_owner(session: Session, key_hash: str) -> tuple[str, str] | None:
    """(key id, project id) of the active key with this sha256 digest: what a request's auth needs, nothing more."""
    row = session.execute(select(ApiKey.id, ApiKey.project_id)
                          .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))).first()
    return (row[0], row[1]) if row else None


def key_exists(session: Session, key: str) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key))) is not None


def revoke_key(session: Session, key_or_id: str) -> bool:
    condition = ApiKey.id == key_or_id if key_or_id.startswith("key_") else ApiKey.key_hash == hash_key(key_or_id)
    result = session.execute(update(ApiKey).where(condition, ApiKey.revoked_at.is_(None)).values(revoked_at=time.time()))
    return result.rowcount > 0


def list_keys(session: Session, project_name: str | None = None) -> list[tuple[ApiKey, Project]]:
    query = select(ApiKey, Project).join(Project, Project.id == ApiKey.project_id).order_by(ApiKey.created_at)
    if project_name:
        query = query.where(Project.name == project_name)
    return [(key, project) for key, project in session.execute(query)]
