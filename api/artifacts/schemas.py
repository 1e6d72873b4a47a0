"""Artifact response shapes."""
from typing import Literal

from pydantic import BaseModel

from db.models import Artifact


class ArtifactObject(BaseModel):
    id: str
    object: Literal["artifact"] = "artifact"
    job_id: str
    name: str
    size: int
    sha256: str
    content_type: str
    created_at: float
    url: str

    @classmethod
    def of(cls, a: Artifact) -> "ArtifactObject":
        return cls(id=a.id, job_id=a.job_id, name=a.name, size=a.size, sha256=a.sha256, content_type=a.content_type,
                   created_at=a.created_at, url=f"/v1/jobs/{a.job_id}/artifacts/{a.name}")


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactObject]
    has_more: bool = False
