"""A fixed fleet: the node URLs configured with ``--server`` / ``MODELDEPOT_SERVERS``.

Nothing is registered or published and nothing is known of holdings: :meth:`~StaticDiscovery.holders`
answers ``[]`` and a puller asks the configured servers, in their order, as without discovery.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from modeldepot.discovery.base import ClusterStatus, Holding, NodeRecord, ViewDiscovery, validate_node_url

__all__ = ["StaticDiscovery"]


class StaticDiscovery(ViewDiscovery):
    name = "static"

    def __init__(self, urls: Iterable[str]) -> None:
        super().__init__()
        self.urls: tuple[str, ...] = tuple(dict.fromkeys(validate_node_url(u).rstrip("/") for u in urls))
        for url in self.urls:  # the node id is the URL; version and start time are unknown
            self._set_node(NodeRecord(node_id=url, url=url, version="", started_at=0.0))
        self._since = time.time()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def register(self, record: NodeRecord) -> None:
        pass  # no registry to register in

    async def publish(self, holdings: Mapping[str, Holding]) -> None:
        pass

    def status(self) -> ClusterStatus:
        return ClusterStatus(
            backend="static", connected=True, registered=False, since=self._since, peers=len(self.urls)
        )
