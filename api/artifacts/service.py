"""HTTP byte ranges (RFC 9110 §14): one range per request, which is what download clients and resumers send."""
import re

from api.errors import APIError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive, or None for the whole body. Unsatisfiable ranges are a 416."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        return None  # malformed or multi-range: ignoring Range and sending 200 is allowed
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0:
            raise _unsatisfiable(size)
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> APIError:
    return APIError(416, "range_not_satisfiable", f"The artifact has {size} bytes.", param="Range",
                    headers={"Content-Range": f"bytes */{size}"})
