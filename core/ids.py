"""Typed, time-ordered public ids (`job_…`, `art_…`, `file_…`): a ULID body, so sorting by id sorts by creation."""
import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32, as ULID uses
_lock = threading.Lock()
_last = (0, 0)


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars)).lower()


def new_id(prefix: str) -> str:
    """48 bits of milliseconds then 80 random bits, incremented within one millisecond so ids stay monotonic."""
    global _last
    with _lock:
        ms = int(time.time() * 1000)
        last_ms, last_rand = _last
        rand = last_rand + 1 if ms <= last_ms else int.from_bytes(os.urandom(10), "big")
        ms = max(ms, last_ms)
        _last = (ms, rand)
    return f"{prefix}_{_encode((ms << 80) | (rand & ((1 << 80) - 1)), 26)}"
