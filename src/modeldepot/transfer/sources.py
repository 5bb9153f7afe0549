"""Where bytes come from. Every origin (the Hub, a depot node) answers ``resolve`` URLs with Range.

A token goes only to the origin it belongs to: the Hub token to the Hub, a node token to its node.
Redirects are followed (the Hub sends LFS files to a CDN); aiohttp drops the Authorization header when a
redirect changes host.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp

from modeldepot.errors import AccessDeniedError, NotFoundError, UpstreamError

__all__ = ["HttpSource", "RetryPolicy"]

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5  # seconds, doubled per attempt, with jitter
    max_delay: float = 30.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None and retry_after.strip().isdigit():
            return min(float(retry_after), self.max_delay)
        return float(min(self.base_delay * (1 << attempt), self.max_delay) * random.uniform(0.5, 1.0))


@dataclass(frozen=True)
class HttpSource:
    base_url: str
    token: str | None = field(default=None, repr=False)
    retry: RetryPolicy = RetryPolicy()

    def file_url(self, repo_id: str, commit_id: str, path: str) -> str:
        return f"{self.base_url.rstrip('/')}/{repo_id}/resolve/{commit_id}/{quote(path)}"

    def _headers(self, start: int, end: int) -> dict[str, str]:
        headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def fetch(self, session: aiohttp.ClientSession, url: str, start: int, end: int, size: int) -> bytes:
        """Bytes ``start..end`` (inclusive) of a ``size``-byte file; retried on transient failures."""
        want = end - start + 1
        for attempt in range(self.retry.attempts):
            retry_after = None
            try:
                async with session.get(url, headers=self._headers(start, end)) as response:
                    if response.status == 206 or (response.status == 200 and want == size):
                        data = await response.read()
                        if len(data) == want:
                            return data
                        problem = f"received {len(data)} bytes of {want}"
                    elif response.status == 200:
                        problem = (
                            "the server ignored the Range header"  # a partial range can't come from a 200
                        )
                    elif response.status in RETRY_STATUSES:
                        retry_after = response.headers.get("Retry-After")
                        problem = f"HTTP {response.status}"
                    else:
                        raise _final_error(response.status, url, response.headers.get("X-Error-Message"))
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as error:
                problem = f"{type(error).__name__}: {error}"
            if attempt + 1 < self.retry.attempts:
                await asyncio.sleep(self.retry.delay(attempt, retry_after))
        raise UpstreamError(f"{url} bytes {start}-{end}: {problem} after {self.retry.attempts} attempts")


def _final_error(status: int, url: str, message: str | None) -> Exception:
    detail = f"{url}: HTTP {status}" + (f" ({message})" if message else "")
    if status in (401, 403):
        return AccessDeniedError(f"{detail}: check HF_TOKEN (or the node's token)")
    if status == 404:
        return NotFoundError(detail)
    return UpstreamError(detail)
