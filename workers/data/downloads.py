"""`https://` downloads that cannot be turned against the worker's own network (SSRF): every hop's addresses are
checked after DNS resolution, the checked address is the one connected to, and the body is streamed under a cap."""
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from core.netguard import AddressRefused, IPAddress, is_public_address, pin, resolve_checked
from workers.errors import JobFailure

MAX_REDIRECTS = 5
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
CHUNK = 1024 * 1024


def download_https(
    url: str,
    dest_dir: Path,
    *,
    max_bytes: int,
    timeout_seconds: float,
    address_allowed: Callable[[IPAddress], bool] = is_public_address,
    verify: ssl.SSLContext | bool = True,
) -> Path:
    """Download `url` into dest_dir (named after the URL's last path segment) and return the file's path.

    Redirects are followed by hand, at most MAX_REDIRECTS, each hop checked like the first. `address_allowed` and
    `verify` exist so tests can serve from loopback with their own certificate; jobs use the defaults.
    """
    deadline = time.monotonic() + timeout_seconds
    target = dest_dir / local_name_for(url)
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        parts = _checked_https_url(current, url)
        ip = _resolve_checked(parts, url, address_allowed)
        location = _get_to_file(parts, ip, target, url, max_bytes, timeout_seconds, deadline, verify)
        if location is None:
            return target
        current = urljoin(current, location)
    raise JobFailure("download_failed", f"{url}: more than {MAX_REDIRECTS} redirects; link to the file directly")


def local_name_for(url: str) -> str:
    """A safe file name from the URL's last path segment; the extension tells the format reader what to expect."""
    last = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in last).lstrip(".")
    return cleaned[:120] or "download"


def _checked_https_url(url: str, original: str) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        raise JobFailure(
            "uri_forbidden", f"{original}: only https:// downloads are allowed (this hop is {parts.scheme or 'relative'}://)"
        )
    if parts.username is not None or parts.password is not None:
        raise JobFailure("uri_forbidden", f"{original}: credentials in the URL are not supported; use a signed URL")
    if not parts.hostname:
        raise JobFailure("uri_invalid", f"{original}: the URL names no host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise JobFailure("uri_invalid", f"{original}: the URL's port is not a number in 0..65535") from None
    return parts


def _resolve_checked(
    parts: SplitResult, original: str, address_allowed: Callable[[IPAddress], bool]
) -> IPAddress:
    try:
        return resolve_checked(parts.hostname, parts.port or 443, address_allowed)[0]
    except AddressRefused as exc:
        code = "download_failed" if "cannot resolve" in str(exc) else "uri_forbidden"
        suffix = "" if code == "download_failed" else "; datasets can be downloaded only from public https servers"
        raise JobFailure(code, f"{original}: {exc}{suffix}") from None


def _get_to_file(
    parts: SplitResult,
    ip: IPAddress,
    target: Path,
    original: str,
    max_bytes: int,
    timeout_seconds: float,
    deadline: float,
    verify: ssl.SSLContext | bool,
) -> str | None:
    """GET one hop from the checked address. Returns the redirect location, or None once the body is in `target`."""
    # Connect to the address we checked (core.netguard.pin: real Host header and SNI).
    # trust_env=False: a proxy from the environment would make its own, unchecked connection.
    # Each hop gets what is left of the whole download's time, so redirects cannot stretch it.
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise JobFailure("download_failed", f"{original}: the download took longer than {timeout_seconds:g} s")
    try:
        with httpx.Client(verify=verify, timeout=remaining, follow_redirects=False, trust_env=False) as client:
            pinned = pin(parts, ip)
            request = client.build_request(
                "GET", pinned.url, headers={"Host": pinned.host_header}, extensions={"sni_hostname": pinned.sni_hostname}
            )
            response = client.send(request, stream=True)
            try:
                if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                    return response.headers["location"]
                _check_status(response, original)
                _stream_to_file(response, target, original, max_bytes, deadline, timeout_seconds)
                return None
            finally:
                response.close()
    except httpx.TimeoutException:
        raise JobFailure(
            "download_failed", f"{original}: the server did not answer within {timeout_seconds:g} s"
        ) from None
    except httpx.HTTPError as exc:
        raise JobFailure("download_failed", f"{original}: download failed ({type(exc).__name__}: {exc})") from None


def _check_status(response: httpx.Response, original: str) -> None:
    if response.status_code in (404, 410):
        raise JobFailure("dataset_not_found", f"{original}: the server answered {response.status_code} (not found)")
    if not 200 <= response.status_code < 300:
        raise JobFailure(
            "download_failed", f"{original}: the server answered {response.status_code}; check the URL is public"
        )


def _stream_to_file(
    response: httpx.Response, target: Path, original: str, max_bytes: int, deadline: float, timeout_seconds: float
) -> None:
    too_large = JobFailure(
        "dataset_too_large",
        f"{original}: the file is larger than the {max_bytes} byte download limit (REFINERY_HTTPS_MAX_BYTES)",
    )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    received = 0
    try:
        with open(target, "wb") as out:
            for chunk in response.iter_bytes(CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise too_large
                if time.monotonic() > deadline:
                    # httpx's timeout is per read; a server trickling bytes would otherwise never time out.
                    raise JobFailure("download_failed", f"{original}: the download took longer than {timeout_seconds:g} s")
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
