"""Connection hygiene: a header-read timeout, caps on concurrent connections, one line per malformed request.

aiohttp runs one :class:`RequestHandler` (an asyncio protocol) per connection. :class:`NodeRunner` is an
``AppRunner`` whose server builds :class:`NodeRequestHandler` instead, which adds, per connection:

- **Caps**, checked before aiohttp sees the connection: a client address holding ``max_per_client``
  connections, or a node holding ``max_total``, gets a canned 503 and a close, without a byte being read.
- **A header timeout**: from the moment the connection opens, and again from the moment each response has
  been sent, the client has ``header_timeout`` seconds to deliver a complete request head (request line and
  headers), or the connection is closed. Bytes arriving do not restart the clock, so dripping a header byte
  at a time (slowloris) does not keep a connection; an idle keep-alive connection is closed the same way.
  While a request is being handled and its answer sent (a download may take minutes) no clock runs.
- **A send timeout**: a client that stops reading an answer (its receive window closed) for
  ``send_timeout`` seconds is disconnected by the kernel (``TCP_USER_TIMEOUT``, which also covers data
  never acknowledged): a download only ever waits on a client that reads, however slowly.
- **Malformed requests** (a garbage request line, TLS or other non-HTTP bytes, an invalid header) are
  answered 400 and logged as one line with the client address and a short reason: no traceback, and no
  access-log line of their own.

Its access log (:class:`NodeAccessLogger`, on the logger ``modeldepot.access``) gives each answer's body
bytes as sent, sendfile and streams included.

``serve`` and the tests both serve the app through :class:`NodeRunner`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger, AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from modeldepot.errors import ConfigError
from modeldepot.openfiles import open_file_limit, raise_open_file_limit
from modeldepot.server.app import CORS, MAX_HEADER
from modeldepot.server.metrics import METRICS
from modeldepot.server.responses import body_bytes_sent, error_response

__all__ = [
    "BACKLOG",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS_PER_CLIENT",
    "DEFAULT_SEND_TIMEOUT",
    "ConnectionLimits",
    "NodeAccessLogger",
    "NodeRequestHandler",
    "NodeRunner",
    "NodeServer",
    "open_file_limit",
    "raise_open_file_limit",
    "set_send_timeout",
    "total_connection_cap",
]

log = logging.getLogger("modeldepot.server")

DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to deliver a request head (MODELDEPOT_HEADER_TIMEOUT)
DEFAULT_SEND_TIMEOUT = 60.0  # seconds a client may leave an answer unread (MODELDEPOT_SEND_TIMEOUT)
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 256  # per client address (MODELDEPOT_MAX_CONNECTIONS_PER_CLIENT)
RESERVED_DESCRIPTORS = 128  # kept for the store's files and index, logs and outgoing pulls
# A connection holds its socket and, while it sends a blob, the blob's file and the descriptor the blob's
# mapping keeps (CPython's mmap holds a duplicate of the one it maps)
DESCRIPTORS_PER_CONNECTION = 3
BACKLOG = 1024  # pending connections the kernel queues for accept() (it caps this at net.core.somaxconn)


@dataclass(frozen=True)
class ConnectionLimits:
    """``max_per_client`` 0 means no cap per address; ``max_total`` None means "from RLIMIT_NOFILE"."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    max_total: int | None = None
    send_timeout: float = DEFAULT_SEND_TIMEOUT

    def __post_init__(self) -> None:
        if not 0 < self.header_timeout <= 86400:
            raise ConfigError(f"header timeout {self.header_timeout!r} must be in (0, 86400] seconds")
        if not 0.001 <= self.send_timeout <= 86400:
            raise ConfigError(f"send timeout {self.send_timeout!r} must be in [0.001, 86400] seconds")
        if self.max_per_client < 0:
            raise ConfigError(f"connections per client {self.max_per_client} must be >= 0 (0: no cap)")
        if self.max_total is not None and self.max_total < 1:
            raise ConfigError(f"total connections {self.max_total} must be >= 1")


def total_connection_cap(open_files: int) -> int:
    """Connections a node with ``open_files`` descriptors can hold: each may also hold the file it sends
    (and its mapping's descriptor)."""
    return max(1, (open_files - RESERVED_DESCRIPTORS) // DESCRIPTORS_PER_CONNECTION)


def set_send_timeout(transport: asyncio.BaseTransport, seconds: float) -> bool:
    """Have the kernel drop the connection when what it sends stays unacknowledged, or unsent for a closed
    receive window, ``seconds`` long; False where it cannot (not TCP, not Linux)."""
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is None or option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, round(seconds * 1000)))
    except OSError:
        return False
    return True


def client_address(transport: asyncio.BaseTransport) -> str:
    """The peer's IP address (IPv4-mapped IPv6 as IPv4); "local" for a Unix socket."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return "local"
    host = str(peer[0])
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


class _Admission:
    """Counts open connections per client address and in total; says which ones may not open."""

    def __init__(self, max_per_client: int, max_total: int) -> None:
        self.max_per_client = max_per_client
        self.max_total = max_total
        self.total = 0
        self._open: dict[str, int] = {}
        self._capped: set[str] = set()  # addresses refused since they last dropped below the cap
        self._full = False

    def admit(self, client: str) -> tuple[str, str] | None:
        """None when ``client`` may open one more connection (it is counted), else why not: the reason's name
        (as /metrics counts it) and what the client is told."""
        if self.total >= self.max_total:
            if not self._full:
                self._full = True
                log.warning("the node holds %d connections, its limit: new connections are refused "
                            "until some close", self.total)  # fmt: skip
            return "connection_limit", "the node is at its connection limit, try again shortly"
        held = self._open.get(client, 0)
        if self.max_per_client and held >= self.max_per_client:
            if client not in self._capped:
                self._capped.add(client)
                log.warning("%s holds %d connections, the cap per client: its further connections are "
                            "refused until some close (behind a proxy every client has its address: raise "
                            "--max-connections-per-client)", client, held)  # fmt: skip
            return "per_client_cap", "too many connections from your address, try again shortly"
        self._open[client] = held + 1
        self.total += 1
        return None

    def release(self, client: str) -> None:
        held = self._open.pop(client) - 1
        if held:
            self._open[client] = held
        self.total -= 1
        if held < self.max_per_client:
            self._capped.discard(client)
        if self.total < self.max_total:
            self._full = False


@functools.lru_cache(maxsize=8)
def _refusal(reason: str) -> bytes:
    """The whole 503 a refused connection gets, in the Hub's error shape (the app never sees it)."""
    response = error_response(503, None, reason)
    body = response.body
    assert isinstance(body, bytes)
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "X-Error-Message": response.headers["X-Error-Message"],
        "Retry-After": "1",
        "Connection": "close",
        **CORS,
    }
    head = "HTTP/1.1 503 Service Unavailable\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("ascii") + body


# The client's bytes the parser's message quotes (b'...'): left out, as they may hold a credential (a token file
# with a Windows line end, sent by curl, put the node's token in the log and in the answer; a folded line, or a
# quote in the token, let a redaction by header name miss it: an explorer's trial, a review)
_QUOTED_BYTES = re.compile(r"""b'(?:[^'\\]|\\.)*'?|b"(?:[^"\\]|\\.)*"?""")


def _redacted(text: str) -> str:
    return _QUOTED_BYTES.sub("b'<left out>'", text)


def _short_reason(error: HttpProcessingError) -> str:
    """The parser's message on one line, printable and short (it quotes the client's bytes), credentials out."""
    lines = (line.strip() for line in str(error.message).splitlines())
    text = _redacted(" ".join(line for line in lines if line.strip("^ ")))
    text = "".join(c if c.isprintable() else "?" for c in text)
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _quoted(text: str) -> str:
    """``text`` for a quoted field of the access line: a quote in a client's User-Agent forged the fields after
    it (an explorer's trial)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


SHUTDOWN_LOOK = 0.05  # seconds between looks, as a node stops, at an answer still going

_PROBES = frozenset({"/api/depot/v1/health", "/metrics"})  # (asked every few seconds by machines)
# The header of the dashboard's reads, every 2 s while a tab is open: one tab wrote 165 access lines a minute
# (an explorer's trial). Taken of those reads alone: on any GET, a client hid its downloads from the log (a
# review)
POLL_HEADER = "X-Depot-Poll"
_POLLED = frozenset(f"/api/depot/v1/{name}" for name in ("info", "stats", "repos", "peers", "pins", "pulls"))


def _polled(request: BaseRequest) -> bool:
    """Whether ``request`` is a dashboard's read (:data:`POLL_HEADER`, of what the page polls)."""
    path = request.path
    return (
        request.method == "GET"
        and POLL_HEADER in request.headers
        and (path in _POLLED or (path.startswith("/api/depot/v1/repos/") and path.endswith("/manifest")))
    )


class NodeAccessLogger(AbstractAccessLogger):
    """One line per answer: client, request line, status, body bytes sent, seconds, user agent and request
    id, e.g. ``127.0.0.1 "GET /acme/x/resolve/main/a.bin HTTP/1.1" 206 16777216 0.012345s "curl/8.5.0" 3f2a9c``;
    an answer cut short says the bytes it was to send after those it sent (``200 15794176/83887608``).

    The bytes are the body's, as :func:`~modeldepot.server.responses.body_bytes_sent` counts them: what a
    blob response sent by sendfile and what a stream wrote, up to where a client that left stopped it
    (aiohttp's ``%b`` counts only what went through its writer, headers included). The line's shape is
    fixed here: a ``log_format`` given to the runner is not used."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        try:
            version = request.version
            # A load balancer's probe, a scrape and a dashboard's read that went well, at DEBUG: one every 2 s
            # made 43,000 lines a day of a service's journal, and --log-level warning, the only way out, hid the
            # start lines too (an explorer's trial)
            polled = request.path in _PROBES or _polled(request)
            level = logging.DEBUG if polled and response.status < 400 else logging.INFO
            sent = body_bytes_sent(request, response)
            # An answer cut short (a client that left mid-download) says the bytes it was to send too: its line
            # looked like a whole download's (an explorer's trial)
            planned = response.content_length if request.method != "HEAD" else None
            said = f"{sent}/{planned}" if planned is not None and sent < planned else str(sent)
            self.logger.log(level, '%s "%s %s HTTP/%d.%d" %d %s %fs "%s" %s', request.remote or "-", request.method,
                             request.path_qs, version.major, version.minor, response.status, said, time,
                             _quoted(request.headers.get("User-Agent", "-")),
                             response.headers.get("X-Request-Id", "-"))  # fmt: skip
        except Exception:
            self.logger.exception("could not write the access line of %s %s", request.method, request.path)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)  # (checked once per connection)


class NodeRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, plus the caps, the header timeout and one-line parse errors."""

    __slots__ = ("_admission", "_asked", "_client", "_dropped", "_head_timer", "_header_timeout", "_malformed",
                 "_send_timeout", "_timer_loop", "streaming_events")  # fmt: skip

    def __init__(self, manager: NodeServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._admission = manager.admission
        self._dropped = manager.on_dropped
        self._asked = False  # a request head came on it (a kept-alive one left idle is no dropped connection)
        self._header_timeout = manager.limits.header_timeout
        self._send_timeout = manager.limits.send_timeout
        self._timer_loop = loop
        self._client: str | None = None  # set while the connection is admitted and counted
        self._head_timer: asyncio.TimerHandle | None = None
        self._malformed: web.StreamResponse | None = None
        # An event stream (a dashboard's) is under way: it ends as the node stops, so no answer a stop waits for
        self.streaming_events = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = client_address(transport)
        refused = self._admission.admit(client)
        if refused is not None:
            # aiohttp never sees this connection: no parser runs, no task starts, nothing is read.
            assert isinstance(transport, asyncio.WriteTransport)
            self._dropped(refused[0])
            transport.write(_refusal(refused[1]))
            transport.close()
            return
        self._client = client
        set_send_timeout(transport, self._send_timeout)
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._client is None:  # refused in connection_made
            return
        self._admission.release(self._client)
        self._client = None
        self._stop_head_timer()
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        # (counted when the grace ends with the answer still going: a node cut downloads at its stop, and said
        # nothing of them, an explorer's trial)
        manager = self._manager
        if timeout is not None and timeout <= 0:  # (`--shutdown-grace 0`: aiohttp takes 0 for no bound)
            timeout = SHUTDOWN_LOOK
        if self._request_in_progress and timeout is not None and isinstance(manager, NodeServer):
            deadline = self._timer_loop.time() + timeout
            while self._request_in_progress and self._timer_loop.time() < deadline:
                await asyncio.sleep(SHUTDOWN_LOOK)
            if self._request_in_progress:
                manager.cut_at_stop += 1
            # (what is left of the grace; never 0, which aiohttp takes for no bound: the stop hung on the answer)
            timeout = max(SHUTDOWN_LOOK, deadline - self._timer_loop.time())
        await super().shutdown(timeout)

    # -- the header timeout ------------------------------------------------------------------------

    def _await_head(self) -> None:
        """The connection is waiting for a request head: it has header_timeout seconds from now."""
        self._stop_head_timer()
        self._head_timer = self._timer_loop.call_later(self._header_timeout, self._head_overdue)

    def head_received(self) -> None:
        """A complete request head arrived (NodeServer's request factory says so): no clock runs."""
        self._asked = True
        self._stop_head_timer()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.transport is not None:
            log.debug("closing the connection from %s: no request head within %g s", self._client,
                      self._header_timeout)  # fmt: skip
            if not self._asked:  # (not one served, then kept alive and left idle: review 40)
                self._dropped("header_timeout")
            self.force_close()

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # The answer (a file body included: BlobResponse sends it in prepare) has been written when this
        # returns; from then on the connection waits for the next request head.
        result = await super().finish_response(request, resp, start_time)
        if self.transport is not None:
            self._await_head()
        return result

    # -- malformed requests ------------------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):  # not a parse error: aiohttp's own handling
            return super().handle_error(request, status, exc, message)
        # aiohttp would log a full traceback (or, for a bad method, one at debug level) and an access line.
        reason = _short_reason(exc)
        log.info("malformed request from %s: %s (answered %d, closed)", self._client or request.remote,
                 reason, status)  # fmt: skip
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already started, no error answer can follow")
        response = error_response(status, None, f"malformed request: {reason}")
        response.force_close()
        self._malformed = response
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        error = kw.get("exc_info")
        if isinstance(error, web.RequestPayloadError):
            # The rest of a body that could not be decoded (gzip that is not), drained after the app's 400:
            # aiohttp would log a traceback for what is the client's fault, already answered.
            log.info("request body from %s could not be read: %s (answered 400)", self._client,
                     error.__cause__ or error)  # fmt: skip
            return
        super().log_exception(*args, **kw)

    def log_access(self, request: BaseRequest, response: web.StreamResponse, time: float | None) -> None:
        if response is self._malformed:  # logged once, as malformed, by handle_error
            return
        super().log_access(request, response, time)


class NodeServer(web.Server):
    """aiohttp's low-level server (the protocol factory) building :class:`NodeRequestHandler`s."""

    def __init__(
        self,
        handler: Any,
        *,
        limits: ConnectionLimits,
        request_factory: Callable[..., BaseRequest] | None = None,
        handler_cancellation: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            loop=loop,
            **kwargs,
        )
        self.limits = limits
        self.cut_at_stop = 0  # answers still going when a stop's grace ended (cut then)
        # Told of each connection turned away or closed before a request reached the app, by reason (the
        # app's metrics: NodeRunner)
        self.on_dropped: Callable[[str], None] = lambda reason: None
        max_total = limits.max_total or total_connection_cap(open_file_limit())
        self.admission = _Admission(limits.max_per_client, max_total)
        self._handler_loop = loop or asyncio.get_running_loop()
        self._handler_kwargs = kwargs
        inner = self.request_factory

        def request_factory_marking_heads(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> BaseRequest:
            # aiohttp calls this once per parsed request head (parse errors included), before handling it.
            if isinstance(protocol, NodeRequestHandler):
                protocol.head_received()
            return inner(message, payload, protocol, writer, task)

        self.request_factory = request_factory_marking_heads

    @property
    def max_total(self) -> int:
        return self.admission.max_total

    def answers_under_way(self) -> int:
        """The connections whose answer (a file's body included) is being made or sent now; not the event streams
        (a dashboard's: they end as the node stops, and the stop line counted each open page as an answer a stop
        waits for, a review)."""
        return sum(
            1
            for connection in self.connections
            if getattr(connection, "_request_in_progress", False)
            and not getattr(connection, "streaming_events", False)
        )

    def __call__(self) -> NodeRequestHandler:
        return NodeRequestHandler(self, loop=self._handler_loop, **self._handler_kwargs)


class NodeRunner(web.AppRunner):
    """An AppRunner whose connections get :class:`ConnectionLimits`; header lines are capped at MAX_HEADER;
    the access log is :class:`NodeAccessLogger` on ``modeldepot.access`` (``access_log=None``: none).

    Use it as an AppRunner: ``await runner.setup()``, then ``web.TCPSite(runner, host, port).start()``.
    """

    __slots__ = ("limits",)

    def __init__(
        self, app: web.Application, *, limits: ConnectionLimits | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("max_line_size", MAX_HEADER)
        kwargs.setdefault("max_field_size", MAX_HEADER)
        kwargs.setdefault("access_log", logging.getLogger("modeldepot.access"))
        kwargs.setdefault("access_log_class", NodeAccessLogger)
        super().__init__(app, **kwargs)
        self.limits = limits or ConnectionLimits()

    async def _make_server(self) -> web.Server:
        # AppRunner starts the app and builds aiohttp's Server with every handler argument merged (the
        # runner's, the app's handler_args, debug, access log class); NodeServer takes the same, and only
        # builds another kind of handler.
        plain = await super()._make_server()
        server = NodeServer(
            plain.request_handler,
            limits=self.limits,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,
        )
        metrics = self.app.get(METRICS)
        if metrics is not None:
            server.on_dropped = metrics.http.count_dropped
        return server
