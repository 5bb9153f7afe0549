"""Where an upstream's redirect may lead. A ``Location`` is the upstream's word like any field it sends: a
hostile or compromised upstream on the internet could point a node at this machine or its private network
(a cloud's metadata service at 169.254.169.254, an admin port on 127.0.0.1, a database on 10.0.0.5), and the
node would make that request for it. The bytes it got back are checked against their digests, but the
request itself is the harm (an explorer's finding). So a redirect may not lead further in than the upstream
the user named: an upstream on the internet, to the internet alone; one on the private network, there or
out; one on this machine (a local proxy, Olah, a test's node), anywhere but link-local addresses, which
only an upstream on a link-local address may lead to (the metadata service is the one thing there)."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
from urllib.parse import urlsplit

__all__ = ["RedirectRefused", "check_peer", "check_redirect"]

# How far in an address is: each scope may lead to the ones below or equal to it, link-local to itself alone
PUBLIC, PRIVATE, LOOPBACK, LINK_LOCAL = 0, 1, 2, 3
_SCOPE_NAMES = {PUBLIC: "the internet", PRIVATE: "a private network", LOOPBACK: "this machine",
                LINK_LOCAL: "a link-local address (a cloud's metadata service)"}  # fmt: skip
RESOLVED_FOR = 60.0  # seconds a host's scope is remembered (the Hub's CDN is redirected to on every range)


class RedirectRefused(http.client.InvalidURL):
    """A redirect that led further in than its upstream (see the module's docstring)."""


_resolved: dict[str, tuple[float, int | None]] = {}
_resolved_lock = threading.Lock()


# Clouds' metadata services outside 169.254/16 (AWS's over IPv6, Alibaba's): as link-local (review 40)
_METADATA = {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}


def _scope_of_address(address: str) -> int:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_link_local or ip in _METADATA:
        return LINK_LOCAL
    if ip.is_loopback or ip.is_unspecified:  # (0.0.0.0 reaches this machine)
        return LOOPBACK
    if ip.is_private or ip in ipaddress.ip_network("100.64.0.0/10") or not ip.is_global:
        return PRIVATE
    return PUBLIC


def scope_of_host(host: str) -> int | None:
    """How far in ``host`` is (an address, or a name: the innermost of its addresses); None when the name
    does not resolve (the connection says so)."""
    try:
        return _scope_of_address(host)
    except ValueError:
        pass
    now = time.monotonic()
    with _resolved_lock:
        known = _resolved.get(host)
    if known is not None and now - known[0] < RESOLVED_FOR:
        return known[1]
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        scope: int | None = max(_scope_of_address(str(info[4][0])) for info in infos)
    except (OSError, ValueError, UnicodeError):
        scope = None
    with _resolved_lock:
        if len(_resolved) > 1024:
            _resolved.clear()
        _resolved[host] = (now, scope)
    return scope


def check_redirect(upstream: str, location: str) -> None:
    """Raise :class:`RedirectRefused` when ``location`` (an absolute URL a redirect gave) leads further in
    than ``upstream`` (the URL first asked)."""
    upstream_host, target_host = urlsplit(upstream).hostname, urlsplit(location).hostname
    if not upstream_host or not target_host or upstream_host == target_host:
        return
    target = scope_of_host(target_host)
    if target is None or target == PUBLIC:
        return
    origin = scope_of_host(upstream_host)
    if origin is None:
        origin = PUBLIC
    if target <= origin:
        return
    raise RedirectRefused(
        f"{_shown(upstream)} redirected to {_shown(location)}, on {_SCOPE_NAMES[target]}, further in than the "
        f"upstream itself ({_SCOPE_NAMES[origin]}): refused (an upstream's redirect is never followed into "
        "the node's own machine or networks unless the upstream is there too: see docs/security.md)"
    )


def check_peer(upstream: str, location: str, address: str) -> None:
    """Raise :class:`RedirectRefused` when ``address``, which a redirect's ``location`` connected to, lies
    further in than ``upstream``: its name may resolve to another address at the connection than at the
    check (a rebinding name), or not at all then."""
    host = urlsplit(upstream).hostname
    origin = scope_of_host(host) if host else None
    target = _scope_of_address(address)
    if target > (PUBLIC if origin is None else origin):
        raise RedirectRefused(
            f"{_shown(upstream)} redirected to {_shown(location)}, which led to {address}, on "
            f"{_SCOPE_NAMES[target]}, further in than the upstream itself "
            f"({_SCOPE_NAMES[PUBLIC if origin is None else origin]}): refused (see docs/security.md)"
        )


def _shown(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"[:200]
