"""The pull's aiohttp session, made on first use: for the whole-body stream from a server that ignores
Range (``HttpSource.stream_whole``), and nothing else.

Every other request of a pull (chunk ranges, depot nodes' manifests, blob probes, chunk maps) goes over
http.client on reader threads (transfer/ranged.py). Importing aiohttp (which loads the CA bundle twice)
was 0.17 s of every ``modeldepot pull``'s start-up, so a pull never imports it unless a server ignores
ranges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

__all__ = ["LazySession"]


class LazySession:
    """An ``aiohttp.ClientSession`` made when first asked for (or the one given), closed with :meth:`close`
    if this made it. For one event loop."""

    def __init__(self, session: aiohttp.ClientSession | None = None) -> None:
        self._session = session
        self._owned = session is None

    async def get(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._owned:
            await self._session.close()
        self._session = None
