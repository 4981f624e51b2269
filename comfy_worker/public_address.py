"""Is a host one the worker may reach on a user's behalf? Only public addresses, unless allowed by name.

A URL a request brings (a webhook, later a model to download) must not point the worker at itself or its
network: loopback (ComfyUI's unauthenticated port, the API), private and link-local addresses (other
containers, the cloud's metadata service at 169.254.169.254) and every other address that is not globally
routable are refused. ``literal_problem`` judges a host as written (an IP literal, ``localhost``), without
DNS; ``resolved_problem`` judges every address a name resolves to; ``HostAllowList`` is the explicit
exception (a setting such as ``WEBHOOK_ALLOW_HOSTS``: ``host`` or ``host:port`` entries).
"""

from __future__ import annotations

import ipaddress
import socket

NAT64 = ipaddress.ip_network("64:ff9b::/96")  # an IPv4 address inside an IPv6 one (RFC 6052)


class NotPublic(OSError):
    """A host that is, or resolves to, an address the worker must not reach."""


def address_problem(address: str) -> str | None:
    """Why this IP address is not public ("loopback", "private", ...), None when it is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is not part of it
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_problem(str(embedded))
    for kind in ("loopback", "unspecified", "link_local", "private", "multicast", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def literal_ip(host: str) -> str | None:
    """The address a host names without DNS: an IP literal (``[::1]`` too) or a legacy IPv4 form such as
    ``127.1`` or ``2130706433`` (which the C library accepts); None for a name."""
    host = host.strip("[]")
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and host[0].isdigit():
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    return None


def literal_problem(host: str) -> str | None:
    """Why a host is not public as written (an IP literal, ``localhost``), None when DNS must tell."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return "loopback"
    address = literal_ip(name)
    return address_problem(address) if address else None


def resolved_problem(host: str, addresses: list[str]) -> str | None:
    """Why ``host`` (resolved to ``addresses``) is not public: the first address that is not, or None."""
    for address in addresses:
        problem = address_problem(address)
        if problem:
            return f"{host} resolves to {address}, a {problem} address"
    return None


def resolve_checked(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (blocking DNS), NotPublic when any one is not public."""
    addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
    problem = resolved_problem(host, addresses)
    if problem:
        raise NotPublic(problem)
    return addresses


class HostAllowList:
    """``host`` (any port) or ``host:port`` entries (``[::1]:8080`` for IPv6), names compared without case.

    ``setting`` names where they came from, for the error about a malformed entry."""

    def __init__(self, entries: tuple[str, ...] | list[str], setting: str):
        self.entries: set[tuple[str, int | None]] = set()
        for entry in entries:
            if not entry.strip():
                continue
            try:
                host, port = split_host_port(entry.strip())
            except ValueError as exc:
                raise ValueError(f"{setting}: {exc} (entries are host or host:port, comma-separated)") from None
            if not host:
                raise ValueError(f"{setting}: {entry!r} is not a host or host:port")
            self.entries.add((host, port))

    def allows(self, host: str, port: int | None) -> bool:
        host = normal_host(host)
        return (host, None) in self.entries or (host, port) in self.entries

    def __bool__(self) -> bool:
        return bool(self.entries)


def normal_host(host: str) -> str:
    return host.strip("[]").lower().rstrip(".")


def split_host_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address -> (host, port or None)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if not rest else "bad")
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    else:
        host, port = entry, ""
    if port and not port.isdigit():
        raise ValueError(f"{entry!r}: the port must be a number")
    return normal_host(host), int(port) if port else None
