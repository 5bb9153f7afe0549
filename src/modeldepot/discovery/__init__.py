"""The fleet: membership and holdings behind one interface (etcd, static, mem). See :mod:`.base`.

:func:`open_discovery` picks the backend from a cluster URL; aetcd (and gRPC) are imported only for an
``etcd://`` one.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence

from modeldepot.config import ClusterTls, cluster_credentials, cluster_tls
from modeldepot.discovery.base import (
    ClusterStatus,
    Discovery,
    Holder,
    Holding,
    NodeRecord,
    ViewDiscovery,
)
from modeldepot.errors import ConfigError, InvalidInputError
from modeldepot.validation import parse_cluster_url, validate_cluster_prefix

__all__ = [
    "ClusterStatus",
    "Discovery",
    "Holder",
    "Holding",
    "NodeRecord",
    "ViewDiscovery",
    "open_discovery",
]


def open_discovery(
    url: str | None,
    *,
    servers: Sequence[str] = (),
    prefix: str = "/modeldepot",
    ttl: float = 10.0,
) -> Discovery:
    """The backend a cluster URL names: ``etcd://HOST:PORT[,HOST:PORT...]`` (the fleet's etcd; ``etcds://``: over TLS),
    ``mem://NAME`` (a registry shared inside this process, for tests), or None: the configured
    ``servers`` alone (:class:`~modeldepot.discovery.static.StaticDiscovery`). Bad settings raise
    ConfigError. Call :meth:`Discovery.start` (on the loop that will use it), then :meth:`Discovery.close`."""
    if url is None:
        from modeldepot.discovery.static import StaticDiscovery

        try:
            return StaticDiscovery(servers)
        except InvalidInputError as error:
            raise ConfigError(f"depot server: {error}") from None
    try:
        kind, where = parse_cluster_url(url)
        prefix = validate_cluster_prefix(prefix)
    except InvalidInputError as error:
        raise ConfigError(str(error)) from None
    if kind == "mem":
        from modeldepot.discovery.mem import MemDiscovery, mem_registry

        assert isinstance(where, str)
        return MemDiscovery(mem_registry(where))
    from modeldepot.discovery.etcd import EtcdDiscovery  # imports aetcd and gRPC: only now

    assert isinstance(where, list)
    tls = cluster_tls(os.environ, secure=kind == "etcds")
    credentials = cluster_credentials(os.environ)
    if credentials is not None and tls is None and not all(_loopback(host) for host, _ in where):
        # (a CA given with etcd:// is refused for this; a password went in clear without a word: an explorer)
        logging.getLogger("modeldepot.discovery").warning(
            "the etcd password goes over the network in clear (etcd://): give an etcd that serves TLS as etcds://"
        )

    def reread() -> tuple[tuple[str, str] | None, ClusterTls | None]:
        return cluster_credentials(os.environ), cluster_tls(os.environ, secure=kind == "etcds")

    try:
        return EtcdDiscovery(where, prefix=prefix, ttl=ttl, credentials=credentials, tls=tls,
                             reread=reread)  # fmt: skip
    except InvalidInputError as error:
        raise ConfigError(f"cluster {url!r}: {error}") from None


def _loopback(host: str) -> bool:
    """Whether ``host`` is this machine (a name, or an address of the loopback)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
