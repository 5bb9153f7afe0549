"""The limits a transfer keeps: the memory a pull holds is bounded by its connection limit, however many
files it moves; and a server's ``Retry-After`` (seconds or an HTTP date) sets the wait before a retry."""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LiveNode
from modeldepot import Depot
from modeldepot.transfer.sources import RetryPolicy, retry_after_seconds

MiB = 1024 * 1024
REPO = "acme/many-shards"
CHUNK = 8 * MiB  # large, so that chunk buffers dominate what a pull allocates
FILES = 40  # more than the 32 files a pull transfers at once
FILE_SIZE = CHUNK + 4321  # two chunks, the last one short
CONNECTIONS = 4
# Besides its chunk buffers a pull holds aiohttp's read buffers (flow-controlled: a few socket reads per
# connection) and small objects (tasks, manifests): about 3 MiB in all was measured with 4 connections.
OTHER_PER_CONNECTION = 2 * MiB

# Runs the pull in its own process, so that what it allocates is all that is counted. The bytearrays that
# hold chunks are Python allocations, which tracemalloc sees exactly. The peak RSS (VmHWM) would also
# count the page-cache pages of the partials mapped for hashing, and RssAnon keeps no peak.
PULL_AND_MEASURE = """
import json, sys, tracemalloc
from modeldepot import Depot
import modeldepot.transfer.pull  # imported before the measurement: modules are not the pull's memory

with Depot(sys.argv[1]) as depot:
    depot.scan_repo(sys.argv[2])  # likewise huggingface_hub and the scan
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    result = depot.pull(sys.argv[2])
    peak = tracemalloc.get_traced_memory()[1] - before
print(json.dumps({"peak": peak, "downloaded": result.bytes_downloaded, "files": result.files}))
"""


@pytest.fixture
def many_files_upstream(tmp_path: Path) -> Iterator[LiveNode]:
    source = tmp_path / "src"
    source.mkdir()
    for n in range(FILES):  # written one at a time: the test process need not hold them all
        (source / f"model-{n + 1:05d}-of-{FILES:05d}.safetensors").write_bytes(os.urandom(FILE_SIZE))
    with Depot(tmp_path / "upstream", chunk_size=CHUNK) as hub:
        hub.import_dir(source, REPO)
        node = LiveNode(hub)
        yield node
        node.stop()


def test_a_pull_of_many_files_holds_at_most_one_chunk_buffer_per_connection(
    many_files_upstream: LiveNode, tmp_path: Path
) -> None:
    """Landing a chunk (BLAKE3, then a write, on the default executor's few threads) is slower here than
    fetching it over loopback: fetched chunks waiting to land must hold a connection's place, or they pile
    up, one per worker of every file (measured: 59 to 67 MiB here before they did, 35 MiB after)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MODELDEPOT_SERVERS")}
    env.update(
        HF_ENDPOINT=many_files_upstream.url,
        MODELDEPOT_CONNECTIONS=str(CONNECTIONS),
        MODELDEPOT_CHUNK_SIZE=str(CHUNK),
    )
    child = subprocess.run(
        [sys.executable, "-c", PULL_AND_MEASURE, str(tmp_path / "local"), REPO],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert (report["files"], report["downloaded"]) == (FILES, FILES * FILE_SIZE)
    bound = CONNECTIONS * (CHUNK + OTHER_PER_CONNECTION)
    assert report["peak"] <= bound, (
        f"the pull held {report['peak'] / MiB:.1f} MiB at its peak; {CONNECTIONS} connections of "
        f"{CHUNK // MiB} MiB chunks allow {bound / MiB:.0f} MiB"
    )


# -- Retry-After ----------------------------------------------------------------------------------------


def test_retry_after_in_seconds_is_taken_up_to_the_cap() -> None:
    policy = RetryPolicy(max_delay=30.0)
    assert policy.delay(0, "7") == 7.0
    assert policy.delay(0, " 0 ") == 0.0
    assert policy.delay(3, "120") == 30.0


def test_retry_after_as_an_http_date_is_the_time_left_until_then() -> None:
    policy = RetryPolicy(max_delay=30.0)
    soon = email.utils.formatdate(time.time() + 3, usegmt=True)  # whole seconds: 2 to 3 s from now
    assert 1.5 <= policy.delay(0, soon) <= 3.0
    assert policy.delay(0, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past: retry at once
    assert policy.delay(0, email.utils.formatdate(time.time() + 3600, usegmt=True)) == 30.0


def test_every_http_date_form_is_read_against_the_given_clock() -> None:
    then = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=then - 3) == 3.0  # IMF-fixdate
    assert retry_after_seconds("Wednesday, 21-Oct-15 07:28:00 GMT", now=then - 3) == 3.0  # RFC 850
    assert retry_after_seconds("Wed Oct 21 07:28:00 2015", now=then - 3) == 3.0  # asctime
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=then + 60) == 0.0


@pytest.mark.parametrize(
    "garbage",
    [
        "soon",
        "",
        "-5",
        "1.5",
        "1e3",
        "\u00b2",
        "Mon, 32 Foo 99999 99:99:99 GMT",
        "Fri, 31 Dec 9999 23:59:59 +9999",
    ],
)
def test_a_retry_after_that_is_neither_form_falls_back_to_backoff(garbage: str) -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=30.0)
    assert retry_after_seconds(garbage) is None
    assert 1.0 <= policy.delay(2, garbage) <= 2.0  # 0.5 s doubled twice, with jitter of up to half


def test_a_source_that_never_answers_is_a_timeout() -> None:
    """Stalls are told apart from other failures (a mirror answers them 504, not 502)."""
    import asyncio
    import socket

    from modeldepot import UpstreamTimeoutError
    from modeldepot.transfer.sources import HttpSource

    async def fetch(url: str) -> None:
        source = HttpSource(url, retry=RetryPolicy(attempts=2, base_delay=0.01, read_timeout=0.5))
        await source.fetch(f"{url}/acme/x/resolve/main/a.bin", 0, 9, 100)

    with socket.socket() as sock:  # the kernel accepts connections; nobody ever answers them
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(UpstreamTimeoutError, match="after 2 attempts") as stalled:
            asyncio.run(fetch(url))
    assert stalled.value.source is not None and stalled.value.source.startswith(url)


def test_a_peer_trickling_its_chunk_map_is_a_timeout_within_the_read_timeout() -> None:
    """A chunk map (or a node's manifest) must come whole within the read timeout: a peer that sends a
    byte now and then, each well within the timeout, is not waited for byte after byte."""
    import asyncio
    import socket
    import threading

    from modeldepot import UpstreamTimeoutError
    from modeldepot.transfer.sources import HttpSource

    stop = threading.Event()

    def trickle(listener: socket.socket) -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            )
            while not stop.wait(0.1):
                try:
                    connection.sendall(b" ")
                except OSError:
                    return  # the client gave up

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        server = threading.Thread(target=trickle, args=(listener,), daemon=True)
        server.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        source = HttpSource(url, "peer", retry=RetryPolicy(attempts=1, read_timeout=1.0))
        try:
            with pytest.raises(UpstreamTimeoutError):
                # A failing run ends at wait_for's bound with its own TimeoutError (1000 bytes take 100 s).
                asyncio.run(asyncio.wait_for(source.chunk_map(f"{url}/chunks", 100, 10), 20))
        finally:
            stop.set()
            server.join(timeout=5)


def test_the_answers_a_process_reads_at_once_are_bounded_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each answer read whole (a repo's description, a node's manifest) may hold up to its own limit, and a
    mirror's anonymous clients choose how many it reads: a hostile upstream's endless answers took a mirror to
    1 GB with 24 of them (an explorer's trial). Past the sum, the answer that would go over fails; the bytes of
    one that ended are counted no more."""
    import http.client
    import socket
    import threading

    from modeldepot.transfer import ranged

    monkeypatch.setattr(ranged, "ANSWERS_HELD", 1 * MiB)
    stop = threading.Event()

    def answer(listener: socket.socket) -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue  # (a look at stop: closing the socket wakes no accept)
            except OSError:
                return
            connection.settimeout(10)
            with connection:
                asked = connection.recv(65536)
                if b"/endless" in asked:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 1000000000\r\n\r\n")  # fmt: skip
                    with contextlib.suppress(OSError):
                        while not stop.is_set():
                            connection.sendall(b" " * 65536)
                else:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(0.1)
        server = threading.Thread(target=answer, args=(listener,), daemon=True)
        server.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        try:
            with pytest.raises(http.client.HTTPException, match="answers this process is reading at once"):
                ranged.request("GET", f"{url}/endless", {}, 10.0, 64 * MiB, ranged.Attempt())
            assert ranged._answers_held == 0
            assert ranged.request("GET", f"{url}/small", {}, 10.0, 64 * MiB, ranged.Attempt()).body == b"{}"
        finally:
            stop.set()
            listener.close()
            server.join(timeout=5)


@pytest.mark.parametrize("location", ["ftp://cdn.test/a.bin", "http://cdn.test:99999/a.bin", "http:///a.bin"])
def test_a_redirect_to_no_http_url_is_an_upstream_error(location: str) -> None:
    """Where a redirect points is the upstream's word: a URL that is no http(s) URL of a host is a clear
    upstream error (retried, then reported), never a crash of the reader."""
    import asyncio

    from aiohttp import web

    from conftest import BackgroundServer
    from modeldepot import UpstreamError
    from modeldepot.transfer.sources import HttpSource

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(location)

    app = web.Application()
    app.router.add_get("/{tail:.*}", redirect)
    server = BackgroundServer(web.AppRunner(app), "redirector")

    async def fetch() -> None:
        source = HttpSource(server.url, retry=RetryPolicy(attempts=2, base_delay=0.01, read_timeout=5))
        await source.fetch(f"{server.url}/acme/x/resolve/main/a.bin", 0, 9, 100)

    try:
        with pytest.raises(UpstreamError, match="after 2 attempts"):
            asyncio.run(fetch())
    finally:
        server.stop()


def test_a_cancelled_fetch_returns_only_once_its_reader_has_let_go_of_the_buffer() -> None:
    """Chunks are received straight into the file's mapped pages, and the endgame's winner writes its copy
    there once the loser is cancelled: the loser's reader thread must be done with those pages by the time
    its cancellation returns. A bytearray cannot be resized while a thread still holds a view of it."""
    import asyncio
    import socket
    import threading

    from modeldepot.transfer.sources import HttpSource

    def stall_mid_body(listener: socket.socket, sent: threading.Event) -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9999/100000\r\n"
                               b"Content-Length: 10000\r\n\r\n" + b"x" * 100)  # fmt: skip
            sent.set()
            connection.recv(1)  # until the client shuts its end down

    async def cancel_mid_body(url: str, sent: threading.Event, buffer: bytearray) -> None:
        source = HttpSource(url, retry=RetryPolicy(attempts=1, read_timeout=30))
        task = asyncio.create_task(source.fetch(f"{url}/a.bin", 0, 9999, 100000, buffer))
        while not sent.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the reader is blocked in recv, holding a view of the buffer
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            buffer.extend(b"!")  # BufferError if the reader thread still held its view
        else:
            pytest.fail("the fetch was not cancelled")

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sent = threading.Event()
        server = threading.Thread(target=stall_mid_body, args=(listener, sent), daemon=True)
        server.start()
        buffer = bytearray(10000)
        asyncio.run(cancel_mid_body(f"http://127.0.0.1:{listener.getsockname()[1]}", sent, buffer))
        server.join(timeout=10)
    assert buffer[:100] == b"x" * 100 and len(buffer) == 10001


def test_the_error_message_of_a_host_a_redirect_led_to_is_not_relayed() -> None:
    """A hostile upstream redirected a mirror to an internal address, and the mirror's 502 to anonymous
    clients carried that host's X-Error-Message (a security trial): a source's own message is said, another
    origin's is not."""
    import asyncio

    from aiohttp import web

    from conftest import BackgroundServer
    from modeldepot import AccessDeniedError
    from modeldepot.transfer.sources import HttpSource

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, headers={"X-Error-Message": f"SECRET-OF-{request.path}"})

    internal_app = web.Application()
    internal_app.router.add_get("/{tail:.*}", refuse)
    internal = BackgroundServer(web.AppRunner(internal_app), "internal")

    async def redirect(request: web.Request) -> web.Response:
        if request.path.startswith("/own/"):
            return await refuse(request)
        raise web.HTTPFound(f"{internal.url}/inside")

    app = web.Application()
    app.router.add_get("/{tail:.*}", redirect)
    upstream = BackgroundServer(web.AppRunner(app), "redirector")

    async def fetch(path: str) -> None:
        source = HttpSource(upstream.url, retry=RetryPolicy(attempts=1, base_delay=0.01, read_timeout=5))
        await source.fetch(f"{upstream.url}{path}", 0, 9, 100)

    try:
        with pytest.raises(AccessDeniedError) as led:
            asyncio.run(fetch("/acme/x/resolve/main/a.bin"))
        assert "HTTP 403" in str(led.value) and "SECRET" not in str(led.value), str(led.value)
        with pytest.raises(AccessDeniedError, match=r"SECRET-OF-/own/a\.bin"):  # (its own: said)
            asyncio.run(fetch("/own/a.bin"))
    finally:
        upstream.stop()
        internal.stop()
