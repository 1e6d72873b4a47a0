"""The Python SDK and the `refinery` CLI. Talks HTTP only; server-side admin commands import the server lazily."""
from client.sdk import Refinery, RefineryError

__all__ = ["Refinery", "RefineryError"]
