"""Where bytes come from. Every origin (the Hub, a depot node) answers ``resolve`` URLs with Range.

A token goes only to the origin it belongs to: the Hub token to the Hub, the node token to depot nodes.
Redirects are followed (the Hub sends LFS files to a CDN) and drop the Authorization header when they
change origin (transfer/ranged.py for ranges; aiohttp for whole bodies), and a test holds it to that.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import http.client
import json
import logging
import mmap
import random
import re
import socket
import ssl
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from modeldepot.counters import PULLS
from modeldepot.errors import (
    AccessDeniedError,
    NotFoundError,
    UpstreamDataError,
    UpstreamError,
    UpstreamTimeoutError,
)
from modeldepot.hashing import chunk_count, chunk_span
from modeldepot.transfer.outage import OUTAGE, QUICK_REFUSALS, OutageClock, wait_in_outage
from modeldepot.transfer.ranged import (
    MAX_REDIRECTS,
    READERS,
    Answer,
    Attempt,
    Reply,
    SlowBody,
    TooSlowError,
    proxy_of,
    read_range,
    reading_body,
    request,
)
from modeldepot.transfer.redirects import RedirectRefused, check_redirect
from modeldepot.transfer.threads import until_done
from modeldepot.validation import from_upstream, validate_blake3

if TYPE_CHECKING:
    import aiohttp  # imported where used: a pull from the Hub alone never needs it (transfer/session.py)

    from modeldepot.ratelimit import RateLimit

__all__ = [
    "ChunkUnavailableError",
    "HttpSource",
    "RangeIgnoredError",
    "Receiving",
    "RetryPolicy",
    "SourceKind",
    "retry_after_seconds",
    "small_request",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_SMALL_ANSWER = 256 << 20  # bytes of a manifest or chunk map taken from a node (200,000 files fit)
# ASCII digits only: str.isdigit() also takes "²", which float() refuses.
_DELAY_SECONDS = re.compile(r"[0-9]+")

SourceKind = str  # "hub" | "node"
PieceSink = Callable[[memoryview], Awaitable[None]]


class RangeIgnoredError(UpstreamError):
    """The server answered a Range request with the whole file (200): stream it whole instead."""


class ChunkUnavailableError(NotFoundError):
    """A node answered a Range with 404 ``ChunkNotAvailable``: it holds the file in part, not that range.
    Other chunks may still come from it; this one must come from another source."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5  # seconds, doubled per attempt, with jitter
    max_delay: float = 30.0
    read_timeout: float = 30.0  # seconds without a byte before a request counts as stalled
    # An attempt cut after it brought bytes is resumed where it stopped and not counted as failed (at most
    # max_resumes times a range: a server that always cuts early still fails); at once when it brought this
    # much (or a quarter of the range), else after the first backoff.
    progress_bytes: int = 1 << 20
    max_resumes: int = 64

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before retry ``attempt + 1``: what the server asked for (``Retry-After``, up to
        ``max_delay``), else exponential backoff with jitter."""
        asked = retry_after_seconds(retry_after) if retry_after is not None else None
        if asked is not None:
            return min(asked, self.max_delay)
        return float(min(self.base_delay * (1 << attempt), self.max_delay) * random.uniform(0.5, 1.0))


# Seconds a fleet peer may take to answer a chunk map's request, or a range's (its status line: then it is
# dropped for the file): a live node answers at once, however busy or slow its link (its bytes may then
# trickle); one frozen, or advertised at an address that accepts and never answers, held the chunks it had
# claimed in a swarm for the whole read timeout (35 s instead of 8: an explorer's trial)
SILENT_PEER = 5.0

# Seconds between the attempts a refused connection to the Hub makes in a mirror's pull (QUICK_REFUSALS)
REFUSED_RETRY_DELAY = 0.2

# What an unreachable network or host gives (not an answer, nor a setting: a TLS certificate, a redirect loop)
_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})


# Asks a node for the BLAKE3 of each chunk of a download in progress in its chunk map (as its log names them:
# a map of thousands of chunks grew 50-280 times with them, read every 2 s by each peer, a review)
DIGESTS_HEADER = "X-Chunk-Digests"

# What a gateway before an upstream answers when the upstream does not (Bad Gateway, Service Unavailable,
# Gateway Timeout)
_GATEWAY_DOWN = frozenset({502, 503, 504})


def is_no_answer(error: BaseException) -> bool:
    """Whether ``error`` says no answer came at all (refused, reset, cut, silent, unreachable, a name that
    did not resolve): what an outage gives, and waiting it out may mend. Not an answer that said no, nor a
    failure of its own (a TLS certificate, a redirect loop, a malformed status line)."""
    if isinstance(error, ssl.SSLError):
        return False
    return isinstance(
        error, (ConnectionError, TimeoutError, socket.gaierror, http.client.IncompleteRead)
    ) or (isinstance(error, OSError) and error.errno in _UNREACHABLE)


def retry_after_seconds(value: str, now: float | None = None) -> float | None:
    """A ``Retry-After`` value (RFC 9110 section 10.2.3: delay-seconds or an HTTP-date) as seconds from
    ``now`` (a Unix time; the clock by default), 0 for a date already past; None when it is neither form.

    A date is taken against this machine's clock: a server whose clock is ahead asks for a longer wait
    than it means, which the ``max_delay`` cap keeps in bounds.
    """
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime dates and "-0000" state no zone; HTTP-dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class Receiving:
    """The bytes of one ranged fetch received so far, over its attempts: those the attempts before kept in
    place and those the one in flight has read (its reader thread writes them; the loop reads them)."""

    kept: int = 0
    attempt: Attempt | None = None
    # Bytes in place before the first attempt (a part of the chunk an earlier transfer left), not fetched
    # by this one: 0 once a retry starts the range over
    in_place: int = 0

    @property
    def count(self) -> int:
        attempt = self.attempt
        return self.kept + (attempt.received if attempt is not None else 0)

    @property
    def fetched(self) -> int:
        """What this fetch received over the network (the bytes in place before it aside)."""
        return max(0, self.count - self.in_place)


@dataclass(frozen=True)
class HttpSource:
    base_url: str
    kind: SourceKind = "hub"
    token: str | None = field(default=None, repr=False)
    retry: RetryPolicy = RetryPolicy()
    limit: RateLimit | None = field(default=None, repr=False, compare=False)  # what all downloads may take

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
        import aiohttp

        return aiohttp.ClientTimeout(total=None, sock_connect=self.retry.read_timeout,
                                     sock_read=self.retry.read_timeout)  # fmt: skip

    async def fetch(
        self, url: str, start: int, end: int, size: int, into: bytearray | mmap.mmap | None = None,
        receiving: Receiving | None = None, counted_as: str | None = None,
    ) -> memoryview:  # fmt: skip
        """Bytes ``start..end`` (inclusive) of a ``size``-byte file; retried on transient failures. Read
        into ``into`` when it is large enough: a reused buffer (no allocation, no zeroing per chunk), or
        the file's own pages, mapped (no copy between the socket and the file). ``receiving`` counts the
        bytes in as they arrive (a progress display's). The process's counters (:data:`PULLS`) take them as
        they cross the wire, as from a source of kind ``counted_as`` (default: this source's kind).

        A connection cut (or stalled) in the middle of the body is retried for the rest of the range alone,
        and an attempt that brought bytes is not counted against the attempts (up to
        ``RetryPolicy.max_resumes`` times): a flaky link that drops every few seconds still completes the
        range, however slowly.

        Raises RangeIgnoredError when the server sends the whole file in reply to a partial range. Never
        returns or raises while a reader thread may still write into ``into``, even when cancelled.
        """
        want = end - start + 1
        buffer = into if into is not None and len(into) >= want else bytearray(want)
        view = memoryview(buffer)[:want]
        try:
            await self._read(url, start, size, view, Receiving() if receiving is None else receiving,
                             counted_as or self.kind)  # fmt: skip
            return view
        except BaseException:
            view.release()  # no reader holds it now: the caller may reuse, resize or unmap what it viewed
            raise

    async def _read(self, url: str, start: int, size: int, view: memoryview, receiving: Receiving,
                    counted_as: str) -> None:  # fmt: skip
        clock = OUTAGE.get()  # (a pull's, when it waits out outages)
        if clock is None:
            return await self._read_attempts(url, start, size, view, receiving, None, 0, counted_as)
        token = clock.asking_begins()
        try:
            return await self._read_attempts(url, start, size, view, receiving, clock, token, counted_as)
        finally:
            clock.asking_ends(token)

    async def _read_attempts(self, url: str, start: int, size: int, view: memoryview, receiving: Receiving,
                             clock: OutageClock | None, token: int, counted_as: str) -> None:  # fmt: skip
        want = len(view)
        headers = self.headers()
        problem = ""
        timed_out = False
        failures = 0  # attempts that failed and brought too little to count as progress
        resumed = 0  # attempts that continued where a cut one stopped
        outage_waits = 0  # of the Hub's attempts that met the pull's outage
        tried = 0
        last_error: BaseException | None = (
            None  # (the cause the error carries: transfer/download's _no_route)
        )
        while True:
            retry_after = None
            # (what the last attempt met is what the error says)
            timed_out = no_answer = refused = too_slow = gateway_down = False
            last_error = None
            kept = receiving.kept
            # (its bytes counted as they cross the wire, whether the chunk lands or not: counted as chunks
            # landed, a pull's parts kept when its source died were never counted, and its resume said them
            # "found in place", an explorer's trial)
            attempt = receiving.attempt = Attempt(counted_as=counted_as)
            tried += 1
            if clock is not None:
                clock.attempt(token, attempt)
            try:
                with view[kept:] as rest:  # (released on the way out: an unmapped file must hold no view)
                    answer = await self._attempt(
                        url, start + kept, start + want - 1, size, rest, headers, attempt
                    )
                if clock is not None and self.kind == "hub":
                    clock.hub_heard = True  # (an answer, whatever it says: the address is right)
                status = answer.status
                if status == 206 or (status == 200 and want - kept == size):
                    if answer.problem:
                        problem = answer.problem
                    elif answer.got == want - kept:
                        receiving.kept, receiving.attempt = want, None
                        return
                    else:
                        problem = f"received {kept + answer.got} bytes of {want}"
                elif status == 200 and kept:
                    # The range of a retry answered with the whole file (another server behind a balancer):
                    # the chunk is asked for whole again.
                    receiving.kept, receiving.in_place, attempt.received = 0, 0, 0
                    problem = "the server ignored the range of a retry"
                elif status == 200:
                    raise RangeIgnoredError(f"{url}: the server ignored the Range header")
                elif status == 503 and answer.headers.get("X-Error-Code") == "CorruptFile":
                    # A node (a peer, or one given as HF_ENDPOINT) whose copy failed its check: it will not
                    # serve it however often it is asked (retried, each range waited 5 attempts on every
                    # such holder, and the pull said "HTTP 503 after 5 attempts", the node's reason dropped)
                    said = answer.headers.get("X-Error-Message") or "the file failed its check there"
                    reason = "".join(c for c in said if c.isprintable())
                    raise UpstreamError(f"{url}: the node's copy is corrupt and is not served ({reason[:300]})",
                                        source=url, status=503)  # fmt: skip
                elif status in RETRY_STATUSES:
                    retry_after = answer.headers.get("Retry-After")
                    problem = f"HTTP {status}"
                    # A gateway before the Hub (a load balancer, a CDN, a corporate proxy) saying the Hub does
                    # not answer is the Hub's outage as a refused connection is: waited out for the patience,
                    # not every pull of a fleet failed after 30 s (an explorer's trial). Not a depot node's own
                    # reasoned refusal (X-Error-Code: Offline, ReadOnlyStore...), which no wait mends (a review)
                    gateway_down = (
                        self.kind == "hub"
                        and status in _GATEWAY_DOWN
                        and "X-Error-Code" not in answer.headers
                    )
                elif status == 404 and answer.headers.get("X-Error-Code") == "ChunkNotAvailable":
                    raise ChunkUnavailableError(f"{url} bytes {start}-{start + want - 1}: not held there (yet)",
                                                source=url, status=404)  # fmt: skip
                else:
                    # (the error message of the source's own origin alone: one a redirect led to, another host,
                    # maybe an internal one a hostile upstream named, is not relayed to a mirror's clients, a
                    # security trial)
                    own = answer.headers.get("X-Error-Message") if _same_origin(answer.url, url) else None
                    raise _final_error(status, answer.url, own)
            except (OSError, http.client.HTTPException) as error:
                if isinstance(error, ConnectionRefusedError) and self.kind != "hub":
                    # Nothing listens at a node's address: it is down. Retrying for seconds would hold its
                    # chunks (its claims, in a swarm) from the sources that have them; dropped now, it
                    # counts as failed at once.
                    down = UpstreamError(
                        f"{url}: nothing listens there (the node is down): {error}", source=url
                    )
                    down.network = True
                    raise down from error
                problem = (
                    str(error)
                    if isinstance(error, TooSlowError)
                    else f"{type(error).__name__}: {error}".rstrip(": ")
                )
                timed_out, no_answer = isinstance(error, TimeoutError), is_no_answer(error)
                refused = isinstance(error, ConnectionRefusedError)
                too_slow = isinstance(error, TooSlowError)
                last_error = error
            # What the attempt read before it failed is in place: the next one asks for the rest only.
            receiving.kept, receiving.attempt = receiving.kept + attempt.received, None
            silent = no_answer or gateway_down  # (for the pull's outage clock: nothing came of the Hub)
            if clock is not None:
                clock.attempt_ended(token, heard=bool(attempt.received) or not silent)
            if attempt.received and resumed < self.retry.max_resumes and not too_slow:
                # Not a failure: the link works and the range moved (a link cut every 700 KiB completed no
                # 16 MiB chunk in five attempts). Asked again at once when it brought much, else after the
                # first backoff (a server that cuts after every few bytes is not asked in a burst).
                if not resumed:
                    log.info("%s: cut after %d bytes of %d; asking for the rest", url, receiving.kept, want)
                resumed += 1
                if attempt.received < min(self.retry.progress_bytes, want // 4):
                    await asyncio.sleep(self.retry.delay(0, retry_after))
                continue
            failures += 1
            if outage_waits and clock is not None and not clock.outage():
                # (the outage it waited out is over, other ranges heard from: its failures then are forgiven, or
                # an answer sent before the link came back failed the pull, its attempts used up meanwhile: a
                # CI run of the gateway's 502s)
                failures, outage_waits = 1, 0
            if silent and self.kind == "hub" and clock is not None and clock.outage() and clock.left() > 0:
                # Nothing came from any source of the pull for a while, the Hub (the last resort) did not
                # answer: the network's failure. Asked again until the pull has heard nothing for its
                # patience; then its attempts count as ever. (A node is not waited for: failed over.) Not
                # sooner than a Retry-After asks (a review).
                clock.say(f"{url}: {problem}")
                asked = self.retry.delay(0, retry_after) if retry_after else 0.0
                await asyncio.sleep(max(wait_in_outage(outage_waits, clock), asked))
                outage_waits += 1
                continue
            if failures >= self.retry.attempts:
                break
            if refused and clock is None and QUICK_REFUSALS.get():
                # Nothing listens at the Hub's address, and an answer's headers wait on this pull (a
                # mirror's): asked again soon, not over seconds of backoff. A mirror's headers went after
                # 5 s of them, and its client got a 200 that ended at 0 bytes, not the 502. (Not a pull
                # job's, polled: it rides out an upstream's restart, as a review found it no longer did.)
                await asyncio.sleep(REFUSED_RETRY_DELAY)
                continue
            await asyncio.sleep(self.retry.delay(failures - 1, retry_after))
        kind = UpstreamTimeoutError if timed_out else UpstreamError  # what the last attempt met
        failed = kind(f"{url} bytes {start}-{start + want - 1}: {problem} after {tried} attempt{'s' if tried > 1 else ''}",
                      source=url)  # fmt: skip
        failed.network = no_answer
        raise failed from last_error

    async def _attempt(self, url: str, start: int, end: int, size: int, into: memoryview,
                       headers: dict[str, str], attempt: Attempt) -> Answer:  # fmt: skip
        """One ranged GET, its body read into ``into`` on a reader thread (transfer/ranged.py); a cancelled
        request aborts its read there, and waits until the thread has let go of the buffer."""
        return await _on_a_reader(attempt, lambda: read_range(url, headers, start, end, size, into,
                                                              self.retry.read_timeout, attempt, self.limit))  # fmt: skip

    async def chunk_map(
        self, url: str, size: int, chunk_size: int, with_digests: bool = False
    ) -> tuple[frozenset[int] | None, dict[int, str]]:
        """Which of our ``chunk_size`` chunks of a ``size``-byte file a node can serve, from its bitfield
        (``GET /api/depot/v1/blobs/{sha256}/chunks``): None when it holds the whole file. A node that chunks
        otherwise serves our chunk when it holds every one of its chunks that the span touches. And, asked
        (``with_digests``: a header an older node ignores), of a download in progress at our chunk size, the
        BLAKE3 its log names for each chunk it offers (its own word, validated). One attempt."""
        body = await self._chunk_map_body(url, {DIGESTS_HEADER: "1"} if with_digests else None)
        held = _parse_chunk_map(url, body, size, chunk_size)
        digests: dict[int, str] = {}
        given = body.get("blake3")
        if held is not None and body.get("chunk_size") == chunk_size and given is not None:
            if not isinstance(given, list) or len(given) != chunk_count(size, chunk_size):
                raise UpstreamDataError(url, "chunk map", "its blake3 is not one digest or null a chunk")
            for index, digest in enumerate(given):
                if digest is not None and index in held:
                    digests[index] = from_upstream(url, "chunk digest", validate_blake3, digest)
        return held, digests

    async def chunk_digests(self, url: str, size: int, chunk_size: int) -> tuple[str, ...] | None:
        """The BLAKE3 of each of our ``chunk_size`` chunks of a complete blob a node holds, from its chunk map
        (``…/chunks``); None when it gives none at our chunk size (a download in progress, another chunk size,
        an older node). Each digest validated: it is a peer's word. One attempt."""
        body = await self._chunk_map_body(url)
        if _parse_chunk_map(url, body, size, chunk_size) is not None or body.get("chunk_size") != chunk_size:
            return None
        digests = body.get("blake3")
        if digests is None:
            return None
        if not isinstance(digests, list) or len(digests) != chunk_count(size, chunk_size):
            raise UpstreamDataError(url, "chunk map", "its blake3 is not one digest a chunk")
        return tuple(from_upstream(url, "chunk digest", validate_blake3, digest) for digest in digests)

    async def _chunk_map_body(self, url: str, extra: dict[str, str] | None = None) -> Any:
        try:
            headers = {**self.headers(), **(extra or {})}
            reply = await small_request("GET", url, headers, min(self.retry.read_timeout, SILENT_PEER))
            if reply.status != 200:
                raise _final_error(reply.status, url, reply.headers.get("X-Error-Message"))
            try:
                return json.loads(reply.body)
            except (ValueError, RecursionError) as error:  # (too deep: a lie)
                raise UpstreamDataError(
                    url, "chunk map", f"it is not JSON ({type(error).__name__})"
                ) from None
        except (OSError, http.client.HTTPException) as error:
            kind = UpstreamTimeoutError if isinstance(error, TimeoutError) else UpstreamError
            raise kind(f"{url}: {type(error).__name__}: {error}", source=url) from error

    async def _get_following(self, session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
        """GET ``url``, its redirects followed here, not by aiohttp: each checked as the ranged reads check
        theirs (transfer/redirects.py; aiohttp's own following let a public upstream lead a node to a service
        on its loopback: review 40), the token dropped for another origin."""
        headers, target = self.headers(), url
        for _ in range(MAX_REDIRECTS + 1):
            proxy = proxy_of(target)
            response = await session.get(
                target, headers=headers, timeout=self._timeout(), allow_redirects=False,
                proxy=None if proxy is None else proxy.url, proxy_headers=None if proxy is None else proxy.headers(),
            )  # fmt: skip
            location = response.headers.get("Location")
            if response.status not in (301, 302, 303, 307, 308) or not location:
                return response
            response.release()
            location = urljoin(target, location)
            try:
                check_redirect(url, location)
            except RedirectRefused as refused:
                raise UpstreamError(str(refused), source=url) from None
            if not _same_origin(target, location):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            target = location
        raise UpstreamError(f"{url}: more than {MAX_REDIRECTS} redirects", source=url)

    async def stream_whole(
        self,
        session: aiohttp.ClientSession,
        url: str,
        size: int,
        sink: PieceSink,
        counted_as: str | None = None,
    ) -> None:
        """The whole file in one GET without Range, handed to ``sink`` piece by piece (for servers that
        do not do ranges). One attempt: a caller that needs more tries again."""
        import aiohttp

        try:
            async with await self._get_following(session, url) as response:
                if response.status != 200:
                    raise _final_error(response.status, url, response.headers.get("X-Error-Message"))
                got = 0
                pace = SlowBody(self.retry.read_timeout)
                with reading_body():
                    async for piece in response.content.iter_any():
                        got += len(piece)
                        if got > size:
                            raise UpstreamError(
                                f"{url}: the server sent more than the file's {size} bytes", source=url
                            )
                        PULLS.add_bytes(
                            counted_as or self.kind, len(piece)
                        )  # (as they cross the wire: see fetch)
                        waiting = time.monotonic()  # (what this side waits for is not the sender's slowness)
                        if self.limit is not None:
                            await self.limit.take_async(len(piece))
                        await sink(memoryview(piece))
                        pace.paused(time.monotonic() - waiting)
                        pace.took(got)
                if got != size:
                    raise UpstreamError(f"{url}: received {got} bytes of {size}", source=url)
        except (
            aiohttp.ClientConnectionError,
            aiohttp.ClientPayloadError,
            asyncio.TimeoutError,
            TimeoutError,
        ) as error:
            # (TooSlowError is the builtin TimeoutError's, which before Python 3.11 asyncio's is not)
            kind = (
                UpstreamTimeoutError
                if isinstance(error, (asyncio.TimeoutError, TimeoutError))
                else UpstreamError
            )
            raise kind(f"{url}: {type(error).__name__}: {error}", source=url) from error


async def small_request(method: str, url: str, headers: dict[str, str], timeout: float) -> Reply:
    """A request whose answer is small (a node's manifest, a chunk map, a blob probe), on a reader thread
    over the ranged reads' kept-alive connections: no aiohttp for a pull (transfer/session.py). Raises
    OSError or http.client.HTTPException; a cancelled request is abandoned (its socket shut down)."""
    attempt = Attempt()
    return await _on_a_reader(
        attempt, lambda: request(method, url, headers, timeout, MAX_SMALL_ANSWER, attempt)
    )


async def _on_a_reader(attempt: Attempt, call: Callable[[], T]) -> T:
    """``call()`` (a blocking request of ``attempt``) on a reader thread; cancelled, the request is abandoned
    (its socket shut down) and waited for until its thread has let go of what it reads into."""
    future = READERS.submit(call)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        attempt.abort()
        await until_done(future)
        if not future.cancelled() and (failed := future.exception()) is not None:
            traceback.clear_frames(failed.__traceback__)  # (as below: its frames hold views of the buffer)
        raise
    except BaseException as error:
        # The thread's frames hold views of what it read into (a chunk's mapping of the partial file): kept by
        # the error (a source's last one, a cancelled task's), the mapping could not be closed, and the file
        # stayed open after a resumed pull had finished and deleted it (an explorer's trial)
        traceback.clear_frames(error.__traceback__)
        raise


def _parse_chunk_map(url: str, body: object, size: int, chunk_size: int) -> frozenset[int] | None:
    """A node's chunk map, checked (it is input from a peer), as our chunk indices (None: all of them)."""
    if not isinstance(body, dict) or body.get("size") != size:
        raise UpstreamDataError(url, "chunk map", f"it is not of a {size}-byte file")
    if body.get("complete") is True:
        return None
    theirs, field = body.get("chunk_size"), body.get("chunks")
    if isinstance(theirs, bool) or not isinstance(theirs, int) or theirs <= 0 or not isinstance(field, str):
        raise UpstreamDataError(url, "chunk map", "no valid chunk size or bitfield")
    try:
        bits = base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError):
        raise UpstreamDataError(url, "chunk map", "the bitfield is not base64") from None
    count = chunk_count(size, theirs)
    if len(bits) != -(-count // 8):  # checked before a bit is read: the count is bounded by the body
        raise UpstreamDataError(url, "chunk map", f"the bitfield is not {count} bits long")
    held = {i for i in range(count) if bits[i // 8] & (0x80 >> (i % 8))}
    if theirs == chunk_size:
        return frozenset(held)
    ours = set()
    for index in range(chunk_count(size, chunk_size)):
        offset, length = chunk_span(index, size, chunk_size)
        if all(j in held for j in range(offset // theirs, (offset + max(length, 1) - 1) // theirs + 1)):
            ours.add(index)
    return frozenset(ours)


def _same_origin(one: str, other: str) -> bool:
    first, second = urlsplit(one), urlsplit(other)
    return (first.scheme, first.hostname, first.port) == (second.scheme, second.hostname, second.port)


def _final_error(status: int, url: str, message: str | None) -> Exception:
    detail = f"{url}: HTTP {status}" + (f" ({message})" if message else "")
    if status in (401, 403):
        return AccessDeniedError(f"{detail}: check HF_TOKEN (for the Hub) or MODELDEPOT_TOKEN (for nodes)",
                                 source=url, status=status)  # fmt: skip
    if status == 404:
        return NotFoundError(detail, source=url, status=status)
    return UpstreamError(detail, source=url, status=status)
