"""File response shapes."""
from typing import Literal

from pydantic import BaseModel

from db.models import File


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    filename: str
    purpose: str
    bytes: int
    sha256: str
    content_type: str
    created_at: float

    @classmethod
    def of(cls, f: File) -> "FileObject":
        return cls(id=f.id, filename=f.filename, purpose=f.purpose, bytes=f.size, sha256=f.sha256,
                   content_type=f.content_type, created_at=f.created_at)


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
