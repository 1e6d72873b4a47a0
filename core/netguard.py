"""Outbound addresses the platform may connect to on a user's behalf (dataset downloads, webhooks, MLflow export):
globally routable ones, plus the private ranges an operator allows for internal receivers. Checked after DNS
resolution, on every resolution, so a name cannot be pointed at the platform's own network (SSRF)."""
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE_PREFIX = ipaddress.ip_network("::/96")


class AddressRefused(ValueError):
    """The host does not resolve, or resolves to an address this platform will not connect to."""


def is_public_address(ip: IPAddress) -> bool:
    """True when `ip`, and any IPv4 address embedded in it, is globally routable: not loopback, private,
    link-local (169.254.169.254, the cloud metadata service), unique-local, multicast, reserved or unspecified."""
    return all(
        candidate.is_global and not (candidate.is_multicast or candidate.is_reserved or candidate.is_unspecified)
        for candidate in (ip, *_embedded_ipv4(ip))
    )


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address tunnels to (::ffff:127.0.0.1 reaches 127.0.0.1), so that they are checked too."""
    if ip.version == 4:
        return []
    embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in NAT64_PREFIX or ip in IPV4_COMPATIBLE_PREFIX:
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [address for address in embedded if address is not None]


def parse_networks(text: str) -> list[IPNetwork]:
    """'10.0.0.0/8, 127.0.0.1/32' → networks; raises ValueError naming a bad entry (a settings error at start)."""
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


def address_policy(allowed_networks: Iterable[IPNetwork] = ()) -> Callable[[IPAddress], bool]:
    """Public addresses, or any address inside one of the operator's allowed networks."""
    networks = list(allowed_networks)

    def allowed(ip: IPAddress) -> bool:
        return is_public_address(ip) or any(ip.version == net.version and ip in net for net in networks)

    return allowed


def resolve_checked(host: str, port: int, allowed: Callable[[IPAddress], bool]) -> list[IPAddress]:
    """Every address `host` resolves to, refused unless all are allowed: a name that resolves to one public and one
    private address could otherwise be made to connect to the private one. Connect to the first one returned."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressRefused(f"cannot resolve host {host!r} ({exc})") from None
    # Scoped IPv6 addresses come back as "fe80::1%eth0"; the scope is not part of the address.
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
    refused = [str(address) for address in addresses if not allowed(address)]
    if refused or not addresses:
        raise AddressRefused(f"host {host!r} resolves to {', '.join(refused) or 'nothing'}, which is not a public "
                             "internet address (an operator can allow a private range with "
                             "REFINERY_OUTBOUND_ALLOWED_NETWORKS)")
    return addresses


@dataclass(frozen=True)
class PinnedTarget:
    """A request aimed at the address that was checked, not at whatever a second DNS answer says (DNS rebinding),
    while the server still sees the real Host header and TLS verifies the certificate against the real name (SNI)."""
    url: str
    host_header: str
    sni_hostname: str


def pin(parts: SplitResult, ip: IPAddress) -> PinnedTarget:
    """`parts` (an http:// or https:// URL with a host) with its host replaced by the checked address `ip`."""
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    ip_netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    url = urlunsplit((parts.scheme.lower(), ip_netloc, parts.path or "/", parts.query, ""))
    host = parts.hostname if parts.hostname.isascii() else parts.hostname.encode("idna").decode("ascii")
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        host_header += f":{parts.port}"
    return PinnedTarget(url=url, host_header=host_header, sni_hostname=host)


def check_http_url(url: str, allowed: Callable[[IPAddress], bool]) -> tuple[SplitResult, IPAddress]:
    """An http(s) URL without credentials whose host resolves, now, only to allowed addresses: its parts and the
    address to connect to. Raises AddressRefused saying what is wrong (webhooks and MLflow export call this)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise AddressRefused("the URL must start with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise AddressRefused("credentials in the URL are not supported; put a token in the path or query instead")
    if not parts.hostname:
        raise AddressRefused("the URL names no host")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise AddressRefused("the URL's port is not a number in 0..65535") from None
    return parts, resolve_checked(parts.hostname, port, allowed)[0]
