"""Expected job failures: a stable code the user can branch on, and a message that says what to fix."""
from typing import Literal

ErrorClass = Literal["user_error", "infra_error"]


class JobFailure(Exception):
    """Raised anywhere in a job to fail it cleanly; the worker records it and takes the next job."""

    def __init__(self, code: str, message: str, error_class: ErrorClass = "user_error"):
        super().__init__(message)
        self.code = code
        self.message = message
        self.error_class = error_class

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "class": self.error_class}
