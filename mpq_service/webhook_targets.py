"""Where a webhook may be sent: the URL's form (checked when a job is submitted) and the
addresses it resolves to (checked again at every call).

A webhook makes the workers send a request on a tenant's behalf, so by default it may only go
to public addresses: never to loopback, private, link-local (cloud metadata at
169.254.169.254), shared, reserved or multicast ones, where the service's own network lives.
The host is resolved at each call and the call connects to the very address that was checked
(the URL's host stays in ``Host`` and in TLS's SNI and certificate check), so a DNS answer that
changes between the check and the connection (DNS rebinding) cannot redirect it.
``MPQ_WEBHOOK_ALLOW_PRIVATE=true`` lifts the address rule (a service on a private network, tests).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

__all__ = [
    "MAX_URL_LENGTH",
    "HostUnresolved",
    "Target",
    "WebhookTargetError",
    "check_webhook_url",
    "is_public_address",
    "resolve_target",
]

MAX_URL_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}

Resolver = Callable[..., list[tuple[Any, ...]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookTargetError(ValueError):
    """The webhook URL is malformed, or names (or resolves to) an address it may not reach."""


class HostUnresolved(WebhookTargetError):
    """The webhook URL's host does not resolve (now: DNS may answer later)."""


def is_public_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is a public unicast address; IPv4 addresses carried in IPv6 (mapped,
    6to4) are judged by their IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is not None:
            ip = inner
    return ip.is_global and not ip.is_multicast


def _split(url: str) -> SplitResult:
    if len(url) > MAX_URL_LENGTH:
        raise WebhookTargetError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise WebhookTargetError(
            "the URL must be ASCII without spaces (write international domain names in punycode)"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError as exc:
        raise WebhookTargetError(f"not a valid URL ({exc})") from None
    if parts.scheme.lower() not in _DEFAULT_PORTS:
        raise WebhookTargetError("the URL must start with http:// or https://")
    if "@" in parts.netloc:
        raise WebhookTargetError("the URL must not hold credentials (user:password@)")
    if not parts.hostname:
        raise WebhookTargetError("the URL has no host")
    return parts


def _literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_webhook_url(url: str, *, allow_private: bool) -> str:
    """``url`` if it may be a job's webhook: http or https, at most :data:`MAX_URL_LENGTH`
    characters, no credentials, and (unless ``allow_private``) no literal non-public address or
    ``localhost``. Host names are resolved only when the call is made (:func:`resolve_target`).

    Raises:
        WebhookTargetError: saying what is wrong.
    """
    host = (_split(url).hostname or "").lower()
    if not allow_private:
        ip = _literal_ip(host)
        if (
            (ip is not None and not is_public_address(ip))
            or host == "localhost"
            or (host.endswith(".localhost"))
        ):
            raise WebhookTargetError(f"the host {host} is not a public address")
    return url


@dataclass(frozen=True)
class Target:
    """Where one call goes: ``url`` with the checked address in place of the host name, the
    ``Host`` header to send, and the TLS server name (https only)."""

    url: str
    host_header: str
    sni_hostname: str | None


def resolve_target(
    url: str, *, allow_private: bool, resolve: Resolver = socket.getaddrinfo
) -> Target:
    """Resolve ``url``'s host and pick the address to connect to (see the module docstring).

    Raises:
        HostUnresolved: the host does not resolve.
        WebhookTargetError: the URL is malformed, or (unless ``allow_private``) any of the
            host's addresses is not public.
    """
    parts = _split(url)
    host = parts.hostname or ""
    scheme = parts.scheme.lower()
    port = parts.port or _DEFAULT_PORTS[scheme]
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise HostUnresolved(f"the host {host} does not resolve ({exc})") from None
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise HostUnresolved(f"the host {host} does not resolve")
    if not allow_private:
        # Every address, not just the first: which one a later resolution puts first is not ours.
        for ip in addresses:
            if not is_public_address(ip):
                raise WebhookTargetError(f"the host {host} resolves to a non-public address {ip}")
    ip = addresses[0]
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    pinned = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = parts.netloc
    return Target(pinned, host_header, host if scheme == "https" else None)
