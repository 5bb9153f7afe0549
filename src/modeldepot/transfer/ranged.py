"""One ranged GET, read straight into the caller's chunk buffer on a thread of its own.

The chunk bodies are the bulk of a pull. Read through an asyncio client, each one crosses the event loop
in pieces: the kernel's bytes are copied into a new ``bytes`` per piece, queued, then copied again into the
chunk buffer, all while holding the GIL. Here a blocking ``http.client`` connection reads the body with
``readinto`` into the buffer itself (one copy, kernel to buffer, with the GIL released), on a pool of
threads apart from the loop, so the loop only coordinates, and receiving, hashing and writing run side by
side on the machine's cores.

Connections are kept alive per origin (scheme, host, port) and reused by whichever thread asks next.
The proxies the environment names are used as curl and requests use them (``HTTPS_PROXY``, ``HTTP_PROXY``,
``ALL_PROXY``, lower case first, with ``NO_PROXY``): an https origin through a ``CONNECT`` tunnel, an http
one by asking the proxy for the absolute URL; ``user:password@`` in the proxy's URL is sent to it alone.
Redirects are followed (the Hub sends LFS files to its CDN), at most five, and the Authorization header is
dropped when one leads to another origin (scheme, host or port). An attempt that is abandoned (the endgame's loser, a
cancelled pull) shuts its socket down, so that its thread returns at once.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit

from modeldepot.counters import PULLS
from modeldepot.errors import ConfigError
from modeldepot.store.forking import ForkSafeExecutor
from modeldepot.transfer.redirects import check_peer, check_redirect

if TYPE_CHECKING:
    from modeldepot.ratelimit import RateLimit

__all__ = [
    "READERS",
    "Answer",
    "Attempt",
    "Proxy",
    "Reply",
    "SlowBody",
    "TooSlowError",
    "close_idle",
    "proxy_for",
    "proxy_of",
    "read_range",
    "reading_body",
    "request",
]

MAX_REDIRECTS = 5
# A body is read into its buffer in pieces of at most this size, the count of bytes in updated after each:
# a 16 MiB chunk over a slow link would otherwise show no progress until it is whole (8 s at 2 MiB/s; a
# piece of 1 MiB still sat 8 s at 1 Mbit/s). 64 calls a chunk cost nothing measurable.
READ_PIECE = 256 << 10
IDLE_SECONDS = 30.0  # a kept-alive connection unused for longer is closed, not reused
# Bytes a second a body must average over each read timeout's span (waits for a rate limit of the user's left
# out). A read timeout alone starts again with every byte: a Hub that sent one byte a second held a pull for
# ever (a security trial). curl's --speed-limit, set for the user: 8 kbit/s is no link's honest pace.
MIN_BODY_RATE = 1024
MIN_SHARE = 16  # bytes a second each body brings at least, however many are read at once
# Bytes of whole answers (repo descriptions, manifests) read into memory at once by all of a process's requests:
# each may hold up to its own limit (64 MiB of a repo's description), and a mirror's anonymous clients choose
# how many it reads; a hostile upstream's endless answers took a mirror to 1 GB with 24 of them (an explorer's
# trial). One answer past the sum fails, the others go on.
ANSWERS_HELD = 512 << 20
_answers_held = 0
_answers_lock = threading.Lock()


def _hold_answer_bytes(amount: int, url: str) -> None:
    global _answers_held
    with _answers_lock:
        if amount > 0 and _answers_held + amount > ANSWERS_HELD:
            raise http.client.HTTPException(
                f"{url}: the answers this process is reading at once already take {_answers_held >> 20} MiB "
                f"(at most {ANSWERS_HELD >> 20} MiB): this one is left"
            )
        _answers_held += amount


READERS = ForkSafeExecutor(max_workers=64, thread_name_prefix="modeldepot-range")
"""The threads ranged reads run on (not the loop's default executor: landing and hashing use that one)."""

_Origin = tuple[str, str, int]


@dataclass(frozen=True)
class Proxy:
    """A forward proxy: where it listens, and the Proxy-Authorization its URL's credentials make."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)
    # The variable that named it (HTTPS_PROXY, ALL_PROXY...), for its errors
    source: str = field(default="", repr=False, compare=False)

    @property
    def url(self) -> str:
        return f"http://{_netloc(self.host, self.port)}"

    def headers(self) -> dict[str, str]:
        return {} if self.authorization is None else {"Proxy-Authorization": self.authorization}


def proxy_for(scheme: str, host: str, port: int) -> Proxy | None:
    """The proxy the environment names for ``scheme://host:port``, or None (none named, or NO_PROXY lists
    the host: a name or domain suffix, ``*``, or an address range such as ``10.0.0.0/8``). Raises
    ConfigError for a proxy that is not an ``http://`` one."""
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return None  # (the common case, without importing urllib.request)
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    source = f"{scheme.upper()}_PROXY" if proxies.get(scheme) else "ALL_PROXY"
    if not url or _bypassed(host, proxies.get("no", "")) or urllib.request.proxy_bypass(f"{host}:{port}"):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")  # (a bare host:port, as requests takes)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(
            f"proxy {parts.scheme}://{parts.hostname}: only http:// proxies are supported (from the environment's"
            f" {scheme.upper()}_PROXY or ALL_PROXY)"
        )
    try:
        proxy_port = parts.port or 80
    except ValueError:
        raise ConfigError(f"bad port in the proxy's URL {parts.hostname!r}") from None
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode()
    return Proxy(parts.hostname, proxy_port, authorization, source)


def proxy_of(url: str) -> Proxy | None:
    """:func:`proxy_for` the origin of ``url`` (http.client.InvalidURL for one that is no http(s) URL)."""
    return proxy_for(*_origin(url)[0])


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``host``, an IP address, lies in an address range NO_PROXY lists (urllib reads names only;
    requests and curl read ranges too: a fleet's nodes are often listed so)."""
    import ipaddress

    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    for entry in no_proxy.split(","):
        entry = entry.strip()
        if "/" in entry:
            with contextlib.suppress(ValueError):
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
    return False


_Route = tuple[_Origin, "Proxy | None"]  # an origin, and the proxy it is reached through
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)", re.ASCII)


@dataclass
class Answer:
    """What one attempt got: the status and headers of the final answer, and for a 206 (or a 200 of the
    whole file) how many body bytes were read into the buffer."""

    status: int
    headers: http.client.HTTPMessage  # case-insensitive
    url: str  # where the answer came from, after redirects
    got: int = 0
    problem: str = ""  # why a 2xx answer is not the range asked for ('' when it is)


@dataclass
class Attempt:
    """One attempt in flight; :meth:`abort` (from any thread) ends its read. ``received``: the body's bytes
    read into the buffer so far (written by the reader thread alone; a progress display reads it, and a
    retry after a cut asks only for the rest)."""

    connection: http.client.HTTPConnection | None = None
    aborted: bool = False
    received: int = 0
    # time.monotonic() of the last sign of life from the server: its answer, then each piece of its body
    # (a pull's outage clock reads it: transfer/outage.py)
    activity: float = 0.0
    # time.monotonic() when a reader thread took it up and opened its connection (0 until then: an attempt
    # waiting for a thread is not yet asking the server anything)
    began: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The kind of source a pull's body bytes count as (``PULLS``), as each piece is read: counted when the
    # attempt ended, a 16 MiB chunk's bytes stayed out of /metrics until it landed (an explorer's trial)
    counted_as: str | None = None

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            sock = self.connection.sock if self.connection is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """Whether the server closed a kept-alive connection while it was idle (a node closes one idle for its
    header timeout, 10 s by default): it then reads as ready (its end of file) before anything was sent.
    Reused, it fails the next request with RemoteDisconnected, and a pool of them failed every retry of a
    range (a swarm's pulls, idle while etcd was down, failed so)."""
    sock = connection.sock
    if sock is None:
        return False
    try:
        poll = select.poll()  # (not select.select: a node has more than 1024 files open)
        poll.register(sock, select.POLLIN)
        return bool(poll.poll(0))
    except (OSError, ValueError):
        return True


class _Pool:
    """Idle keep-alive connections by origin. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[_Route, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._tls: ssl.SSLContext | None = None  # made on first use: loading the CA bundle takes 30 ms

    def take(self, route: _Route, timeout: float) -> http.client.HTTPConnection:
        now = time.monotonic()
        while True:
            # The lock is held for the pop alone: the checks below make system calls, which let go of the GIL,
            # and a thread waiting for it back (5 ms while another thread runs Python) held up every reader
            # behind the lock (8 ms per take and per give, on average, in a pull of 300 configs).
            with self._lock:
                idle = self._idle.get(route)
                if not idle:
                    break
                since, connection = idle.pop()
            if now - since < IDLE_SECONDS and not _dropped(connection):
                connection.timeout = timeout
                if connection.sock is not None:
                    connection.sock.settimeout(timeout)
                return connection
            connection.close()
        (scheme, host, port), proxy = route
        if proxy is not None and scheme == "http":  # asked for absolute URLs (_InUse.send)
            return http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout)
        if scheme == "https":
            with self._lock:
                if self._tls is None:
                    self._tls = ssl.create_default_context()
            if proxy is not None:  # TLS to the origin, inside a CONNECT tunnel through the proxy
                connection = http.client.HTTPSConnection(
                    proxy.host, proxy.port, timeout=timeout, context=self._tls
                )
                connection.set_tunnel(host, port, headers=proxy.headers())
                return connection
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def give(self, route: _Route, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault(route, []).append((time.monotonic(), connection))

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _since, connection in connections:
                connection.close()


_POOL = _Pool()


def close_idle() -> None:
    """Close the kept-alive connections nobody uses now (a pull's end: the next one opens its own)."""
    _POOL.close_idle()


def _redirected(asked: str, url: str, origin: _Origin, location: str, sent: dict[str, str]
                ) -> tuple[str, dict[str, str]]:  # fmt: skip
    """Where a redirect of ``url`` (asked first as ``asked``) to ``location`` leads, and the headers to send
    there: another origin never sees the token, and no redirect leads further in than the upstream asked
    (transfer/redirects.py)."""
    location = urljoin(url, location)
    if _origin(location)[0] != origin:
        sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
    check_redirect(asked, location)
    return location, sent


def _origin(url: str) -> tuple[_Origin, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise http.client.InvalidURL(f"not an http(s) URL: {url[:200]!r}")  # (a redirect may say anything)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise http.client.InvalidURL(f"bad port in {url[:200]!r}") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return (parts.scheme, parts.hostname, port), target


def _range_problem(response: http.client.HTTPResponse, start: int, end: int, want: int) -> str:
    """Why a 2xx answer is not the range asked for ('' when it is)."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch((response.getheader("Content-Range") or "").strip())
        if match is None or (int(match.group(1)), int(match.group(2))) != (start, end):
            return f"the server sent range {response.getheader('Content-Range')!r}, not {start}-{end}"
    if response.length is not None and response.length != want:
        return f"the server announced {response.length} bytes, not {want}"
    return ""


@dataclass
class Reply:
    """The answer to a small request (a node's manifest, a chunk map, a blob probe)."""

    status: int
    headers: http.client.HTTPMessage  # case-insensitive
    body: bytes


class _InUse:
    """A kept-alive connection one attempt uses; given back to the pool at the end if the attempt set
    ``reusable`` (its answer was read to the end) and was not abandoned, else closed."""

    def __init__(self, connection: http.client.HTTPConnection, route: _Route) -> None:
        self.connection = connection
        self.reusable = False
        (self._scheme, self._host, self._port), proxy = route
        self._forward = proxy if self._scheme == "http" else None  # an http proxy asked for absolute URLs

    def send(self, method: str, target: str, headers: Mapping[str, str]) -> None:
        if self._forward is not None:
            target = f"http://{_netloc(self._host, self._port)}{target}"
            headers = {**headers, **self._forward.headers()}
        self.connection.request(method, target, headers=dict(headers))


def _netloc(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port == 80 else f"{host}:{port}"


@contextlib.contextmanager
def _connection(origin: _Origin, timeout: float, attempt: Attempt,
                redirected_from: str | None = None) -> Iterator[_InUse]:  # fmt: skip
    """A connection to ``origin`` (kept alive, or made). ``redirected_from``: the upstream asked first, which
    redirected here: the address connected to may not lie further in than it (its name, checked before,
    may resolve otherwise now: review 40)."""
    route = (origin, proxy_for(*origin))
    connection = _POOL.take(route, timeout)
    with attempt.lock:
        if attempt.aborted:
            connection.close()
            raise ConnectionAbortedError("the request was abandoned")
        attempt.connection = connection
        attempt.began = attempt.began or time.monotonic()
    use = _InUse(connection, route)
    try:
        if connection.sock is None:  # connect first: an abort that came while the socket was being
            _connect(connection, route)  # made had none to shut down, and is seen here instead
            with attempt.lock:
                if attempt.aborted:
                    raise ConnectionAbortedError("the request was abandoned")
        if redirected_from is not None and route[1] is None and connection.sock is not None:
            check_peer(redirected_from, f"{origin[0]}://{_netloc(origin[1], origin[2])}",
                       str(connection.sock.getpeername()[0]))  # fmt: skip
        yield use
    finally:
        with attempt.lock:
            attempt.connection = None
        if use.reusable and not attempt.aborted:
            _POOL.give(route, connection)
        else:
            connection.close()


def _connect(connection: http.client.HTTPConnection, route: _Route) -> None:
    """Connect; through a proxy, a failure names the proxy (it named the origin alone, which was up: a user
    behind a proxy debugged the wrong machine, an explorer's trial)."""
    try:
        connection.connect()
    except OSError as error:
        (scheme, host, port), proxy = route
        if proxy is None:
            raise
        said = (f"the proxy {_netloc(proxy.host, proxy.port)} (from {proxy.source or 'the environment'}) for "
                f"{scheme}://{_netloc(host, port)}: {error.strerror or error or type(error).__name__}")  # fmt: skip
        try:
            named = type(error)(error.errno, said) if error.errno is not None else type(error)(said)
        except Exception:  # (an error its type builds otherwise: raised as it came)
            raise error from None
        raise named from error


def request(method: str, url: str, headers: Mapping[str, str], timeout: float, limit: int, attempt: Attempt,
            redirects: int = 0, total: float | None = None) -> Reply:  # fmt: skip
    """One request whose whole answer is read into memory (at most ``limit`` bytes of body: more is an
    http.client.HTTPException) within ``total`` seconds in all (default ``timeout``; a TimeoutError after:
    a peer trickling its answer byte by byte is not waited for), and ``timeout`` seconds at most without a
    byte, on the same kept-alive connections as the ranged reads.
    Up to ``redirects`` redirects are followed (the Hub's API redirects a renamed repo; a depot node's
    API does not), the Authorization header dropped when one leads to another origin. Blocking: run it
    on :data:`READERS`."""
    total = timeout if total is None else total
    deadline = time.monotonic() + total
    sent, asked = dict(headers), url
    for _ in range(redirects + 1):
        origin, target = _origin(url)
        with _connection(origin, timeout, attempt, None if url == asked else asked) as use:
            _time_left(deadline, url, total, timeout, use.connection)
            use.send(method, target, sent)
            _time_left(deadline, url, total, timeout, use.connection)
            response = use.connection.getresponse()
            pieces: list[bytes] = []
            got = 0
            if method == "HEAD":
                response.read()  # no body: marks the answer read, so the connection may be reused
            try:
                # One receive at most per read1, so a trickled answer meets its deadline.
                while _time_left(deadline, url, total, timeout, use.connection) and (
                    piece := response.read1(1 << 16)
                ):
                    got += len(piece)
                    if got > limit:
                        raise http.client.HTTPException(f"{url}: the answer is over {limit} bytes")
                    _hold_answer_bytes(len(piece), url)
                    pieces.append(piece)
            finally:
                _hold_answer_bytes(-sum(len(piece) for piece in pieces), url)
            use.reusable = not response.will_close and response.isclosed()  # (closed: read to the end)
            location = response.getheader("Location")
            if redirects and response.status in (301, 302, 303, 307, 308) and location:
                url, sent = _redirected(asked, url, origin, location, sent)
                continue
            return Reply(response.status, response.headers, b"".join(pieces))
    raise http.client.HTTPException(f"more than {redirects} redirects from {url}")


def _time_left(deadline: float, url: str, total: float, idle: float, connection: http.client.HTTPConnection
               ) -> float:  # fmt: skip
    """Seconds left until ``deadline`` (a TimeoutError when none); the socket waits that long at most, and
    ``idle`` seconds at most for its next bytes."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"{url}: no whole answer within {total:g} s")
    if connection.sock is not None:
        connection.sock.settimeout(min(left, idle))
    return left


class TooSlowError(TimeoutError):
    """A body that came slower than its share of :data:`MIN_BODY_RATE` over a read timeout's span: the
    attempt failed (it is not resumed as a cut one is: asked again it would drip again)."""


_bodies = 0  # bodies this process reads at once (their floor is shared: a slow link's many ranges)
_bodies_lock = threading.Lock()


@contextlib.contextmanager
def reading_body() -> Iterator[None]:
    """Counts a body being read while the block runs: each one's floor is :data:`MIN_BODY_RATE` shared by
    all of them (16 ranges of a link of 100 kbit/s bring under 1 KiB/s each, and each failed, a review)."""
    global _bodies
    with _bodies_lock:
        _bodies += 1
    try:
        yield
    finally:
        with _bodies_lock:
            _bodies -= 1


class SlowBody:
    """Watches a body's pace: :meth:`took` raises TooSlowError once ``span`` seconds brought fewer bytes a
    second than its share of :data:`MIN_BODY_RATE` (read within :func:`reading_body`)."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._since, self._at = time.monotonic(), 0
        self.failed = ""

    def paused(self, seconds: float) -> None:
        """``seconds`` the reader waited of its own accord (a rate limit's): not the sender's slowness."""
        self._since += seconds

    def took(self, got: int) -> None:
        """``got`` bytes of the body are in: TooSlowError when they came too slowly."""
        if self.too_slow(got):
            raise TooSlowError(self.failed)

    def too_slow(self, got: int) -> bool:
        """Whether ``got`` bytes of the body came too slowly (``failed`` then says how)."""
        now = time.monotonic()
        if now - self._since < self.span:
            return False
        came, floor = got - self._at, max(MIN_SHARE, MIN_BODY_RATE // max(1, _bodies))
        if came < floor * self.span:
            self.failed = (f"the body came at {came / (now - self._since):,.0f} B/s over {now - self._since:.0f} s "
                           f"(too slow: at least {floor:,} B/s is asked for)")  # fmt: skip
            return True
        self._since, self._at = now, got
        return False


def _read_piece(response: http.client.HTTPResponse, into: memoryview, pace: SlowBody, got: int) -> int:
    """Bytes of ``response``'s body read into ``into`` (``got`` of the body in before it): as many as come
    before it is full, the body ends or is cut, or their pace fails (``pace.failed`` then says how), looked
    at as each read of the socket brings them. (A buffered ``readinto`` waits for ``into`` whole: a body
    dripped a byte at a time held it for days, its read timeout met by every byte, its pace never looked
    at. A fast sender fills the socket's buffer, and a read takes much at once all the same.)"""
    if response.isclosed():
        return 0
    n, want = 0, len(into)
    if response.chunked or response.length is None:  # (rare: a range's answer has a length; a copy here)
        while n < want:
            data = response.read1(want - n)
            if not data:
                break
            into[n : n + len(data)] = data
            n += len(data)
            if pace.too_slow(got + n):
                break
        return n
    want = min(want, response.length)
    while n < want:
        came = response.fp.readinto1(into[n:want])
        if not came:  # (cut short: closed, as http.client's readinto closes it)
            response.length -= n
            response.close()
            return n
        n += came
        if pace.too_slow(got + n):
            break
    response.length -= n
    if not response.length:
        response.read()  # (read whole: closed as http.client closes it, the connection free for the next)
    return n


def read_range(url: str, headers: Mapping[str, str], start: int, end: int, size: int, buffer: memoryview,
               timeout: float, attempt: Attempt, limit: RateLimit | None = None) -> Answer:  # fmt: skip
    """GET ``url`` with ``Range: bytes=start-end`` (following redirects), reading a 206 (or a 200 of the
    whole ``size``-byte file) into ``buffer``, piece by piece within ``limit`` when there is one. Blocking:
    run it on :data:`READERS`. Raises OSError or http.client.HTTPException when the connection fails (the
    caller retries)."""
    want = end - start + 1
    piece = min(want, READ_PIECE) if limit is None else min(limit.piece(), READ_PIECE)
    sent, asked = {**headers, "Range": f"bytes={start}-{end}"}, url
    for _ in range(MAX_REDIRECTS + 1):
        origin, target = _origin(url)
        with _connection(origin, timeout, attempt, None if url == asked else asked) as use:
            use.send("GET", target, sent)
            response = use.connection.getresponse()
            answer = Answer(response.status, response.headers, url)
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                # (a redirect's body is short: read whole, a hostile upstream's endless one took a mirror to
                # 2 GB in a second, a security trial; one longer is left, and its connection with it)
                response.read(1 << 16)
                use.reusable = not response.will_close and response.length == 0
                url, sent = _redirected(asked, url, origin, response.getheader("Location", ""), sent)
                continue
            attempt.activity = time.monotonic()  # (a redirect is no sign of life: its target may be down)
            if response.status == 206 or (response.status == 200 and want == size):
                answer.problem = _range_problem(response, start, end, want)
                if answer.problem:
                    return answer  # (the connection is closed: its body was not read)
                got = 0
                pace = SlowBody(timeout)
                with reading_body():
                    while got < want:
                        if limit is not None:
                            waiting = time.monotonic()
                            limit.take(min(piece, want - got))
                            pace.paused(time.monotonic() - waiting)
                        n = _read_piece(response, buffer[got : min(want, got + piece)], pace, got)
                        if not n:
                            break
                        got += n
                        attempt.received, attempt.activity = got, time.monotonic()
                        if attempt.counted_as is not None:
                            PULLS.add_bytes(attempt.counted_as, n)
                        if pace.failed:  # (once what came is counted: kept for the next attempt)
                            raise TooSlowError(pace.failed)
                answer.got = got
                # A body longer than announced, or one cut short, leaves the connection unusable.
                use.reusable = got == want and not response.will_close and response.length == 0
                return answer
            response.read(1 << 16)  # an error body is short: read it so the connection may be reused
            use.reusable = not response.will_close and response.length == 0  # (None: chunked, maybe unread)
            return answer
    raise http.client.HTTPException(f"more than {MAX_REDIRECTS} redirects from {url}")
