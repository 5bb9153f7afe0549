"""Where bytes come from. Every origin (the Hub, a depot node) answers ``resolve`` URLs with Range.

A token goes only to the origin it belongs to: the Hub token to the Hub, the node token to depot nodes.
Redirects are followed (the Hub sends LFS files to a CDN); aiohttp drops the Authorization header when a
redirect changes host, and a test holds it to that.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp

from modeldepot.errors import AccessDeniedError, NotFoundError, UpstreamError

__all__ = ["HttpSource", "RangeIgnoredError", "RetryPolicy", "SourceKind"]

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

SourceKind = str  # "hub" | "node"
PieceSink = Callable[[memoryview], Awaitable[None]]


class RangeIgnoredError(UpstreamError):
    """The server answered a Range request with the whole file (200): stream it whole instead."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5  # seconds, doubled per attempt, with jitter
    max_delay: float = 30.0
    read_timeout: float = 30.0  # seconds without a byte before a request counts as stalled

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None and retry_after.strip().isdigit():
            return min(float(retry_after), self.max_delay)
        return float(min(self.base_delay * (1 << attempt), self.max_delay) * random.uniform(0.5, 1.0))


@dataclass(frozen=True)
class HttpSource:
    base_url: str
    kind: SourceKind = "hub"
    token: str | None = field(default=None, repr=False)
    retry: RetryPolicy = RetryPolicy()

    @property
    def name(self) -> str:
        return f"{self.kind} {self.base_url}"

    def file_url(self, repo_id: str, commit_id: str, path: str) -> str:
        return f"{self.base_url.rstrip('/')}/{repo_id}/resolve/{commit_id}/{quote(path)}"

    def headers(self) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.retry.read_timeout,
                                     sock_read=self.retry.read_timeout)  # fmt: skip

    async def fetch(
        self, session: aiohttp.ClientSession, url: str, start: int, end: int, size: int
    ) -> bytearray:
        """Bytes ``start..end`` (inclusive) of a ``size``-byte file; retried on transient failures.

        Raises RangeIgnoredError when the server sends the whole file in reply to a partial range.
        """
        want = end - start + 1
        headers = {**self.headers(), "Range": f"bytes={start}-{end}"}
        problem = "no attempt was made"
        for attempt in range(self.retry.attempts):
            retry_after = None
            try:
                async with session.get(url, headers=headers, timeout=self._timeout()) as response:
                    if response.status == 206 or (response.status == 200 and want == size):
                        problem = _range_problem(response, start, end, want, size)
                        if not problem:
                            buffer = bytearray(want)
                            got = await _read_into(response, memoryview(buffer))
                            if got == want:
                                return buffer
                            problem = f"received {got} bytes of {want}"
                    elif response.status == 200:
                        raise RangeIgnoredError(f"{url}: the server ignored the Range header")
                    elif response.status in RETRY_STATUSES:
                        retry_after = response.headers.get("Retry-After")
                        problem = f"HTTP {response.status}"
                    else:
                        raise _final_error(response.status, url, response.headers.get("X-Error-Message"))
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as error:
                problem = f"{type(error).__name__}: {error}".rstrip(": ")
            if attempt + 1 < self.retry.attempts:
                await asyncio.sleep(self.retry.delay(attempt, retry_after))
        raise UpstreamError(f"{url} bytes {start}-{end}: {problem} after {self.retry.attempts} attempts")

    async def stream_whole(
        self, session: aiohttp.ClientSession, url: str, size: int, sink: PieceSink
    ) -> None:
        """The whole file in one GET without Range, handed to ``sink`` piece by piece (for servers that
        do not do ranges). One attempt: a caller that needs more tries again."""
        try:
            async with session.get(url, headers=self.headers(), timeout=self._timeout()) as response:
                if response.status != 200:
                    raise _final_error(response.status, url, response.headers.get("X-Error-Message"))
                got = 0
                async for piece in response.content.iter_any():
                    got += len(piece)
                    if got > size:
                        raise UpstreamError(f"{url}: the server sent more than the file's {size} bytes")
                    await sink(memoryview(piece))
                if got != size:
                    raise UpstreamError(f"{url}: received {got} bytes of {size}")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as error:
            raise UpstreamError(f"{url}: {type(error).__name__}: {error}") from error


def _range_problem(response: aiohttp.ClientResponse, start: int, end: int, want: int, size: int) -> str:
    """Why a 2xx answer is not the range asked for ('' when it is)."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or (int(match.group(1)), int(match.group(2))) != (start, end):
            return f"the server sent range {response.headers.get('Content-Range')!r}, not {start}-{end}"
    length = response.content_length
    if length is not None and length != want:
        return f"the server announced {length} bytes, not {want}"
    return ""


async def _read_into(response: aiohttp.ClientResponse, view: memoryview) -> int:
    got = 0
    async for piece in response.content.iter_any():
        end = got + len(piece)
        if end > len(view):
            return end  # too many bytes: the caller reports the mismatch
        view[got:end] = piece
        got = end
    return got


def _final_error(status: int, url: str, message: str | None) -> Exception:
    detail = f"{url}: HTTP {status}" + (f" ({message})" if message else "")
    if status in (401, 403):
        return AccessDeniedError(f"{detail}: check HF_TOKEN (for the Hub) or MODELDEPOT_TOKEN (for nodes)")
    if status == 404:
        return NotFoundError(detail)
    return UpstreamError(detail)
