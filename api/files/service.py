"""Storing an upload: bytes to the content-addressed store, a row in the caller's project."""
import re
import time
from typing import BinaryIO

from sqlalchemy.orm import Session

from api.errors import APIError
from core.ids import new_id
from core.settings import Settings
from core.storage import get_store
from db.models import File
from db.repositories.artifacts import add_file

PURPOSES = ("dataset", "model")


def safe_filename(name: str | None) -> str:
    """Keep the extension (it tells the loader the format); drop any path and odd characters."""
    base = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return base[:200] or "upload"


def store_upload(session: Session, settings: Settings, project_id: str, stream: BinaryIO, filename: str | None,
                 purpose: str, content_type: str | None) -> File:
    if purpose not in PURPOSES:
        raise APIError(422, "invalid_purpose", f"purpose must be one of {', '.join(PURPOSES)}.", param="purpose")
    try:
        key, sha, size = get_store(settings.storage_url).put_stream(stream, settings.max_upload_bytes)
    except ValueError:
        raise APIError(413, "file_too_large", f"Uploads are limited to {settings.max_upload_bytes} bytes.",
                       param="file") from None
    return add_file(session, File(id=new_id("file"), project_id=project_id, filename=safe_filename(filename),
                                  purpose=purpose, size=size, sha256=sha,
                                  content_type=content_type or "application/octet-stream", storage_key=key,
                                  created_at=time.time()))
