"""Artifacts (a job's outputs) and uploaded files: rows hold name, size, sha256 and where the bytes are."""
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Artifact, File, Job


def upsert_artifact(session: Session, artifact: Artifact) -> Artifact:
    """A retried attempt may write the same name again; the newest bytes win."""
    existing = session.scalar(select(Artifact).where(Artifact.job_id == artifact.job_id, Artifact.name == artifact.name))
    if existing is not None:
        existing.size, existing.sha256 = artifact.size, artifact.sha256
        existing.content_type, existing.storage_key = artifact.content_type, artifact.storage_key
        existing.created_at = artifact.created_at
        return existing
    session.add(artifact)
    return artifact


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(session: Session, job_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))


def get_project_artifact(session: Session, project_id: str, job_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).join(Job, Job.id == Artifact.job_id)
                          .where(Job.project_id == project_id, Artifact.job_id == job_id, Artifact.name == name))


def newest_project_artifact(session: Session, project_id: str, name: str) -> Artifact | None:
    """The newest artifact with this name in the project, whatever its job's status (e.g. a cached attribution)."""
    return session.scalar(select(Artifact).join(Job, Job.id == Artifact.job_id)
                          .where(Job.project_id == project_id, Artifact.name == name)
                          .order_by(Artifact.created_at.desc()).limit(1))


def add_file(session: Session, file: File) -> File:
    session.add(file)
    session.flush()
    return file


def get_project_file(session: Session, project_id: str, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.project_id == project_id))


def list_files(session: Session, project_id: str, *, after: str | None, limit: int) -> tuple[list[File], bool]:
    query = select(File).where(File.project_id == project_id).order_by(File.id.desc())
    if after:
        query = query.where(File.id < after)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit
