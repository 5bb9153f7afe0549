"""Connection hygiene over real sockets: slowloris, caps per client and in total, long downloads, garbage.

The node is served as ``modeldepot serve`` serves it (NodeRunner); the last test runs ``serve`` itself.
Clients bind to other loopback source addresses (127.0.0.2, ...), which Linux routes on lo, to be other
client addresses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BackgroundServer, free_port, wait_until, write_model_dir
from modeldepot import Depot
from modeldepot.server import create_app
from modeldepot.server.connections import (
    BACKLOG,
    ConnectionLimits,
    NodeRunner,
    NodeServer,
    open_file_limit,
    raise_open_file_limit,
)

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="clients bind to 127.0.0.x source addresses, which Linux routes on lo"
)

HEALTH = b"GET /api/depot/v1/health HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"
KEEP_ALIVE_HEALTH = b"GET /api/depot/v1/health HTTP/1.1\r\nHost: node\r\n\r\n"
PARTIAL_HEAD = b"GET /api/depot/v1/health HTTP/1.1\r\nHost: node\r\nX-Drip: "
GRACE = 5.0  # seconds allowed beyond a timeout, for a loaded machine


class HygieneNode(BackgroundServer):
    """The production app behind a NodeRunner with the given limits, on a loopback port."""

    def __init__(self, depot: Depot, limits: ConnectionLimits) -> None:
        super().__init__(NodeRunner(create_app(depot), limits=limits), name="hygiene-node", backlog=BACKLOG)

    @property
    def server(self) -> NodeServer:
        server = self.runner.server
        assert isinstance(server, NodeServer)
        return server


@pytest.fixture
def serve_node(depot: Depot) -> Iterator[Callable[[ConnectionLimits], HygieneNode]]:
    nodes: list[HygieneNode] = []

    def serve(limits: ConnectionLimits) -> HygieneNode:
        nodes.append(HygieneNode(depot, limits))
        return nodes[-1]

    yield serve
    for node in nodes:
        node.stop()


def connect(port: int, source: str = "127.0.0.1", timeout: float = 30.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the node sends until it closes (EOF or reset); a socket timeout fails the test."""
    data = b""
    while True:
        try:
            block = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not block:
            return data
        data += block


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:200]
    return int(answer.split(b" ", 2)[1])


def health(port: int, source: str) -> int:
    with connect(port, source) as sock:
        sock.sendall(HEALTH)
        return status_of(read_until_closed(sock))


def dropped(port: int) -> dict[str, float]:
    """``modeldepot_http_connections_dropped_total`` of a scrape of the node's /metrics, by reason (asked from
    an address of its own: not one a test holds at its cap)."""
    from prometheus_client.parser import text_string_to_metric_families

    with connect(port, "127.0.0.9") as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        answer = read_until_closed(sock)
    assert status_of(answer) == 200, answer[:300]
    body = answer.split(b"\r\n\r\n", 1)[1].decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "modeldepot_http_connections_dropped_total"
    }


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response with a Content-Length from a keep-alive connection: status and body."""
    head = b""
    while b"\r\n\r\n" not in head:
        block = sock.recv(1)
        assert block, f"closed before a complete response head: {head!r}"
        head += block
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = bytearray()
    while len(body) < length:
        block = sock.recv(min(65536, length - len(body)))
        assert block, "closed in the middle of a body"
        body += block
    return status_of(head), bytes(body)


# -- slowloris ---------------------------------------------------------------------------------------


@dataclass
class HalfOpen:
    started: float  # before connecting: the node cannot have seen the connection earlier
    connected: float = 0.0
    closed: float = 0.0
    answer: bytes = b""
    dripped: int = 0


async def half_open(
    port: int, source: str, drip_every: float, give_up: float, connected: asyncio.Future[None]
) -> HalfOpen:
    """A slowloris connection: a partial request head, then one more header byte every ``drip_every``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    record = HalfOpen(started=time.monotonic())
    try:
        sock.bind((source, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        record.connected = time.monotonic()
        connected.set_result(None)
        await loop.sock_sendall(sock, PARTIAL_HEAD)
        reading = asyncio.ensure_future(loop.sock_recv(sock, 65536))
        deadline = record.connected + give_up
        while not reading.done() and time.monotonic() < deadline:
            await asyncio.wait([reading], timeout=drip_every)
            if not reading.done():
                try:
                    await loop.sock_sendall(sock, b"a")
                    record.dripped += 1
                except OSError:  # the node closed it while we dripped; the read says how
                    await asyncio.wait([reading], timeout=GRACE)
        if reading.done():
            try:
                record.answer = reading.result()
            except ConnectionResetError:
                pass
            record.closed = time.monotonic()
        else:
            reading.cancel()
        return record
    except BaseException as error:
        if not connected.done():
            connected.set_exception(error)
        raise
    finally:
        sock.close()


async def async_health(port: int, source: str) -> int:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, HEALTH)
        answer = b""
        while block := await loop.sock_recv(sock, 65536):
            answer += block
        return status_of(answer)
    finally:
        sock.close()


def test_slowloris_is_closed_by_the_header_timeout_while_health_answers(
    serve_node: Callable[[ConnectionLimits], HygieneNode],
) -> None:
    raise_open_file_limit()
    count = min(2000, (open_file_limit() - 512) // 2)  # each connection costs two descriptors here
    if count < 500:
        pytest.skip(f"too few open files allowed ({open_file_limit()}) for a slowloris")
    timeout, per_source = 2.0, 250
    node = serve_node(ConnectionLimits(header_timeout=timeout, max_per_client=256, max_total=count + 64))

    async def attack() -> tuple[list[HalfOpen], list[int]]:
        tasks: list[asyncio.Task[HalfOpen]] = []
        statuses: list[int] = []
        for first in range(0, count, per_source):
            source = f"127.0.0.{3 + first // per_source}"
            connected = [
                asyncio.get_running_loop().create_future() for _ in range(min(per_source, count - first))
            ]
            tasks += [
                asyncio.create_task(half_open(node.port, source, 0.5, timeout + 3 * GRACE, done))
                for done in connected
            ]
            await asyncio.gather(*connected)
            # With this batch connected and the ones before dripping, another address is served.
            statuses.append(await asyncio.wait_for(async_health(node.port, "127.0.0.2"), 3 * GRACE))
        return await asyncio.gather(*tasks), statuses

    records, statuses = asyncio.run(attack())

    assert statuses == [200] * len(statuses)
    assert len(records) == count
    never_closed = [r for r in records if not r.closed]
    assert not never_closed, f"{len(never_closed)} dripping connections were never closed"
    assert {r.answer for r in records} == {b""}, "a half-open connection got an answer instead of a close"
    earliest = min(r.closed - r.started for r in records)
    latest = max(r.closed - r.connected for r in records)
    assert earliest >= timeout  # the header timeout closed them, not a refusal ...
    assert latest <= timeout + GRACE  # ... and the bytes they kept dripping did not extend it
    assert min(r.dripped for r in records) >= 1
    assert health(node.port, "127.0.0.1") == 200


# -- caps ------------------------------------------------------------------------------------------


def test_connections_beyond_the_per_client_cap_are_refused_at_once(
    serve_node: Callable[[ConnectionLimits], HygieneNode],
) -> None:
    node = serve_node(ConnectionLimits(header_timeout=120, max_per_client=4))
    held = [connect(node.port) for _ in range(4)]
    try:
        for _ in range(3):
            with connect(node.port) as extra:
                began = time.monotonic()
                answer = read_until_closed(extra)  # sent nothing: the node answers without reading
                assert time.monotonic() - began < GRACE  # at once, not after the 120 s header timeout
            assert status_of(answer) == 503 and b"too many connections" in answer, answer
            assert b"Retry-After: 1" in answer
        assert health(node.port, "127.0.0.2") == 200  # another address is served meanwhile
        for sock in held:  # the connections under the cap were kept, and are served
            sock.sendall(HEALTH)
            assert status_of(read_until_closed(sock)) == 200
        assert health(node.port, "127.0.0.1") == 200  # closed connections give their places back
        assert node.server.admission.total == 0  # each close was counted before the node sent its FIN
        # (none of them in http_requests: a CI wave's 503s were seen by no alert, an explorer's trial)
        assert dropped(node.port) == {"per_client_cap": 3, "connection_limit": 0, "header_timeout": 0}
    finally:
        for sock in held:
            sock.close()


def test_connections_beyond_the_total_cap_are_refused(
    serve_node: Callable[[ConnectionLimits], HygieneNode],
) -> None:
    node = serve_node(ConnectionLimits(header_timeout=120, max_per_client=0, max_total=5))
    held = [connect(node.port, f"127.0.0.{3 + i % 2}") for i in range(5)]
    try:
        with connect(node.port, "127.0.0.2") as extra:
            answer = read_until_closed(extra)
        assert status_of(answer) == 503 and b"connection limit" in answer, answer
        with held.pop() as done:  # the node closes this one after answering, and counts that first
            done.sendall(HEALTH)
            assert status_of(read_until_closed(done)) == 200
        assert health(node.port, "127.0.0.2") == 200
        assert dropped(node.port)["connection_limit"] == 1
    finally:
        for sock in held:
            sock.close()


def test_a_connection_closed_for_want_of_a_request_head_is_counted(
    serve_node: Callable[[ConnectionLimits], HygieneNode],
) -> None:
    node = serve_node(ConnectionLimits(header_timeout=0.5))
    with connect(node.port) as silent:
        assert read_until_closed(silent) == b""  # closed, nothing said
    assert dropped(node.port) == {"per_client_cap": 0, "connection_limit": 0, "header_timeout": 1}
    with connect(
        node.port
    ) as served:  # (one served, then kept alive and left idle: no dropped one, review 40)
        served.sendall(KEEP_ALIVE_HEALTH)
        assert read_response(served)[0] == 200
        read_until_closed(served)
    assert dropped(node.port)["header_timeout"] == 1


def test_total_cap_follows_the_open_file_limit(serve_node: Callable[[ConnectionLimits], HygieneNode]) -> None:
    node = serve_node(ConnectionLimits())
    # (a connection sending a blob holds three descriptors: 136 never-reading downloads from one address
    # ran a node with 400 open files out of them when it counted two: 500s, and an index it could not open)
    assert node.server.max_total == (open_file_limit() - 128) // 3
    assert node.server.admission.max_per_client == 256


def send_buffer_max() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 << 20


# -- what the header timeout must not cut --------------------------------------------------------------


def test_a_slow_download_outlives_the_header_timeout_and_an_idle_keep_alive_does_not(
    depot: Depot, serve_node: Callable[[ConnectionLimits], HygieneNode], tmp_path: Path
) -> None:
    big = os.urandom((24 << 20) + send_buffer_max())  # far more than the socket buffers can hold
    depot.import_dir(write_model_dir(tmp_path / "big", {"big.bin": big}), "acme/big")
    timeout = 1.0
    node = serve_node(ConnectionLimits(header_timeout=timeout))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", node.port))
    with sock:
        began = time.monotonic()
        sock.sendall(
            f"GET /acme/big/resolve/{depot.resolve('acme/big')}/big.bin HTTP/1.1\r\nHost: node\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert status_of(head) == 200
        digest, received, rate = hashlib.sha256(), 0, len(big) / 3  # bytes a second: 3 s for the file
        while received < len(big):
            block = sock.recv(min(64 << 10, len(big) - received))
            assert block, f"the download was cut after {received} bytes"
            digest.update(block)
            received += len(block)
            ahead = received / rate - (time.monotonic() - began)
            if ahead > 0:
                time.sleep(ahead)  # a slow reader (pacing, not synchronisation)
        assert digest.hexdigest() == hashlib.sha256(big).hexdigest()
        assert time.monotonic() - began > 2 * timeout  # the download did outlast the header timeout
        sock.sendall(KEEP_ALIVE_HEALTH)  # the connection stays usable for the next request ...
        assert read_response(sock)[0] == 200
        answered = time.monotonic()
        dripped = 0
        sock.settimeout(0.2)
        while True:  # ... but not for a next head that never completes
            try:
                if not sock.recv(1):
                    break
            except TimeoutError:
                try:
                    sock.sendall(PARTIAL_HEAD[dripped : dripped + 1])
                except OSError:  # closed meanwhile: the next read says so
                    continue
                dripped += 1
            except ConnectionResetError:
                break
            assert time.monotonic() - answered < timeout + GRACE, "an idle keep-alive connection stayed open"
        assert dripped >= 1


def test_a_client_that_stops_reading_is_disconnected_after_the_send_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "modeldepot.access")
    big = os.urandom((8 << 20) + 2 * send_buffer_max())  # more than the socket buffers hold
    depot = Depot(
        tmp_path / "store16"
    )  # (chunks of 16 MiB: one sendfile call meets the timeout, as in serve)
    depot.import_dir(write_model_dir(tmp_path / "big", {"big.bin": big}), "acme/big")
    timeout = 1.0
    commit = depot.resolve("acme/big")
    node = HygieneNode(depot, ConnectionLimits(header_timeout=120, send_timeout=timeout))
    try:
        _stop_reading(node, big, timeout, commit)
    finally:
        node.stop()
        depot.close()
    # (sendfile's ETIMEDOUT was an unhandled error to aiohttp: a traceback, and no access line)
    assert not any(
        s in caplog.text for s in ("Traceback", "Error handling request", "Unhandled exception")
    ), caplog.text
    assert f'"GET /acme/big/resolve/{commit}/big.bin HTTP/1.1" 200' in caplog.text


def _stop_reading(node: HygieneNode, big: bytes, timeout: float, commit: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", node.port))
    with sock:
        # (by its commit: by its branch, an LFS file is a redirect there)
        sock.sendall(f"GET /acme/big/resolve/{commit}/big.bin HTTP/1.1\r\nHost: node\r\n\r\n".encode())
        assert status_of(sock.recv(4096)) == 200
        began = time.monotonic()
        wait_until(lambda: node.server.admission.total == 0, timeout + 3 * GRACE,
                   "the node to drop the connection whose client stopped reading")  # fmt: skip
        assert time.monotonic() - began >= timeout * 0.9  # (not before: the client was only slow so far)
        assert len(read_until_closed(sock)) < len(big)  # cut: the body never completes
    assert health(node.port, "127.0.0.1") == 200


# -- malformed requests --------------------------------------------------------------------------------

MALFORMED = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "tls client hello": bytes.fromhex("160301020001000001fc0303") + os.urandom(64),
    "binary noise": bytes(range(256)) * 4,
    "invalid method": b"G\x00T / HTTP/1.1\r\nHost: node\r\n\r\n",
    "bad header": b"GET / HTTP/1.1\r\nHost: node\r\nBad\x01Header: x\r\n\r\n",
    "request line too long": b"GET /" + b"a" * (32 << 10) + b" HTTP/1.1\r\nHost: node\r\n\r\n",
    "garbage after a good request": KEEP_ALIVE_HEALTH + b"\x01\x02GARBAGE\r\n\r\n",
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_request_logs_one_line_and_no_traceback(
    serve_node: Callable[[ConnectionLimits], HygieneNode], caplog: pytest.LogCaptureFixture, name: str
) -> None:
    node = serve_node(ConnectionLimits())
    payload = MALFORMED[name]
    caplog.set_level(logging.DEBUG)  # aiohttp logs some parse errors with a traceback at debug level only
    caplog.clear()
    with connect(node.port) as sock:
        if payload.startswith(KEEP_ALIVE_HEALTH):
            sock.sendall(KEEP_ALIVE_HEALTH)
            assert read_response(sock)[0] == 200
            payload = payload[len(KEEP_ALIVE_HEALTH) :]
        sock.sendall(payload)
        answer = read_until_closed(sock)  # the node logs before it answers, and closes after its access log
    assert status_of(answer) == 400 and b"malformed request" in answer and b"Traceback" not in answer
    records = [r for r in caplog.records if not r.name.startswith("asyncio")]
    access = [r.getMessage() for r in records if r.name == "modeldepot.access"]
    others = [r for r in records if r.name != "modeldepot.access"]
    assert len(others) == 1, [r.getMessage() for r in others]
    line = others[0]
    assert line.name == "modeldepot.server" and line.levelno == logging.INFO
    assert line.getMessage().startswith("malformed request from 127.0.0.1: ")
    assert "\n" not in line.getMessage() and len(line.getMessage()) < 300
    assert not any(r.exc_info for r in records) and "Traceback" not in caplog.text
    # No access line for the malformed request: the good request before it has its own.
    good = 1 if name == "garbage after a good request" else 0
    assert len(access) == good and all('"GET /api/depot/v1/health HTTP/1.1" 200' in a for a in access), access


@pytest.mark.parametrize(
    "payload",
    [
        b"GET /api/models HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer S3cretTok_123\r\r\n\r\n",
        b"GET /api/models HTTP/1.1\r\nHost: node\r\nCookie: session=S3cretTok_123\x01\r\n\r\n",
        b"GET /api/models HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer S3cretTok_123"
        + b"x" * (32 << 10)
        + b"\r\n\r\n",
        b"GET /api/models HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer S3cret'Tok_123\r\r\n\r\n",
        b"GET /api/models HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer\r\n S3cretTok_123\r\r\n\r\n",
    ],
    ids=[
        "a token with a carriage return",
        "a cookie with a control byte",
        "a header too long",
        "a quote in the token",
        "a folded header line",
    ],
)
def test_a_malformed_request_never_logs_nor_answers_its_credentials(
    serve_node: Callable[[ConnectionLimits], HygieneNode], caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    """The parser's message quotes the header it could not parse: a token file with a Windows line end, sent by
    curl, put the node's token in the log at INFO and in the 400 answer (an explorer's trial)."""
    node = serve_node(ConnectionLimits())
    caplog.set_level(logging.DEBUG)
    with connect(node.port) as sock:
        sock.sendall(payload)
        answer = read_until_closed(sock)
    assert status_of(answer) == 400 and b"malformed request" in answer, answer[:300]
    assert b"Tok_123" not in answer, answer
    assert "Tok_123" not in caplog.text, caplog.text


def test_a_quote_in_a_user_agent_cannot_forge_the_access_line(
    serve_node: Callable[[ConnectionLimits], HygieneNode], caplog: pytest.LogCaptureFixture
) -> None:
    node = serve_node(ConnectionLimits())
    caplog.set_level(logging.DEBUG, logger="modeldepot.access")  # (a probe of /health is at DEBUG)
    with connect(node.port) as sock:
        sock.sendall(b'GET /api/depot/v1/health HTTP/1.1\r\nHost: node\r\nUser-Agent: evil" 500 1 0.1s "x\r\n'
                     b"Connection: close\r\n\r\n")  # fmt: skip
        read_until_closed(sock)
    access = [r.getMessage() for r in caplog.records if r.name == "modeldepot.access"]
    assert access and access[-1].count('"') - access[-1].count('\\"') == 4, (
        access
    )  # (request line, user agent)
    assert '"evil\\" 500 1 0.1s \\"x"' in access[-1], access


# -- modeldepot serve ----------------------------------------------------------------------------------


LOWER_OPEN_FILE_LIMIT = (
    "import os, resource, sys; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)  # runs `python ARGS` with a soft limit below the hard one, for serve to raise


def test_serve_applies_the_limits_and_logs_one_line_per_malformed_request(home: Path) -> None:
    import resource

    port = free_port()
    env = {**os.environ, "MODELDEPOT_MAX_CONNECTIONS_PER_CLIENT": "2", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-c", LOWER_OPEN_FILE_LIMIT, "-m", "modeldepot", "serve", "--home", str(home),
            "--port", str(port), "--header-timeout", "1", "--send-timeout", "2"]  # fmt: skip
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            lines.put(line)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    try:
        while (
            "connections: a request head within 1 s, an answer read within 2 s, at most 2 per client"
            not in (line := lines.get(timeout=60))
        ):
            assert "Traceback" not in line, "".join(log)
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        soft_now = next(ln.split()[3] for ln in limits.splitlines() if ln.startswith("Max open files"))
        assert soft_now == str(hard)  # serve raised its soft limit from 1024 to the hard one

        with connect(port), connect(port), connect(port) as extra:  # two held, the third over the cap
            assert status_of(read_until_closed(extra)) == 503
            with connect(port, "127.0.0.2") as half:
                half.sendall(PARTIAL_HEAD)
                began = time.monotonic()
                assert read_until_closed(half) == b""
                assert time.monotonic() - began < 1 + GRACE
            with connect(port, "127.0.0.3") as bad:
                bad.sendall(b"GARBAGE\r\n\r\n")
                assert status_of(read_until_closed(bad)) == 400
            assert health(port, "127.0.0.4") == 200
            with connect(port, "127.0.0.4") as sock:
                sock.sendall(b"GET /api/depot/v1/repos HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
                assert status_of(read_until_closed(sock)) == 200
            with connect(port, "127.0.0.4") as sock:  # (the dashboard's read, every 2 s)
                sock.sendall(b"GET /api/depot/v1/stats HTTP/1.1\r\nHost: node\r\nX-Depot-Poll: 1\r\n"
                             b"Connection: close\r\n\r\n")  # fmt: skip
                assert status_of(read_until_closed(sock)) == 200
            with connect(port, "127.0.0.4") as sock:
                sock.sendall(b"GET /api/depot/v1/inventory HTTP/1.1\r\nHost: node\r\nX-Depot-Poll: 1\r\n"
                             b"Connection: close\r\n\r\n")  # fmt: skip
                assert status_of(read_until_closed(sock)) == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        pumping.join(30)  # to the end of stderr
        assert process.stderr is not None
        process.stderr.close()
    text = "".join(log)
    assert "Traceback" not in text, text
    about_garbage = [line for line in log if "127.0.0.3" in line]  # one line, no access line besides it
    assert len(about_garbage) == 1 and "malformed request from 127.0.0.3: BadHttpMethod" in about_garbage[0]
    assert sum("127.0.0.1 holds 2 connections" in line for line in log) == 1, text
    assert sum('127.0.0.4 "GET /api/depot/v1/repos HTTP/1.1" 200' in line for line in log) == 1, text
    # (a probe that went well is logged at DEBUG: one every 2 s filled a service's journal, an explorer's trial)
    assert not any('"GET /api/depot/v1/health HTTP/1.1" 200' in line for line in log), text
    # (nor the dashboard's reads, nor a download with its header: it hid downloads from the log, a review)
    assert not any('"GET /api/depot/v1/stats HTTP/1.1" 200' in line for line in log), text
    assert sum('"GET /api/depot/v1/inventory HTTP/1.1" 200' in line for line in log) == 1, text
