"""The outage clock and answers that bring nothing: a Hub that redirects to a CDN nothing listens at, or
answers a range and sends no byte of it, is given up on after the patience (taken as heard, it was tried
again for good)."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from conftest import closed_port
from modeldepot.errors import UpstreamError
from modeldepot.transfer.progress import PullUpdate


@pytest.fixture
def hub_redirecting_to_a_dead_cdn() -> Iterator[str]:
    """A "Hub" that answers every GET at once with a 302 to a CDN nothing listens at (a CDN outage, or a
    firewall that lets huggingface.co through and not its CDN's host)."""
    dead = closed_port()

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{dead}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with _serving(Redirect) as url:
        yield url


@pytest.fixture
def hub_stalling_every_body() -> Iterator[str]:
    """A "Hub" that answers each range with 206 headers, then sends no byte of the body until the reader's
    timeout (a broken proxy in between, an overloaded CDN)."""

    class Cut(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(206)
            self.send_header("Content-Range", "bytes 0-9/10")
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.flush()
            time.sleep(1.0)  # (past the read timeout: the reader gives up first)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    with _serving(Cut) as url:
        yield url


@contextlib.contextmanager
def _serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("hub", ["hub_redirecting_to_a_dead_cdn", "hub_stalling_every_body"])
def test_a_hub_that_answers_and_then_sends_nothing_is_given_up_on_after_the_patience(
    hub: str, request: pytest.FixtureRequest
) -> None:
    """read_range sets attempt.activity when an answer's headers come (a redirect's, or a 206 whose body
    never comes); the attempt then fails with no answer (the CDN refuses; the body stalls until the read timeout). The clock takes the redirect as "heard" (its last_heard moves on every
    attempt), while the range's error says network=True: run_through_outages tries again, the patience
    never runs out, and the pull never gives up (before abc19f5 it gave up after the patience: heard()
    was only called once an attempt returned an answer)."""
    from modeldepot.transfer import outage, sources

    hub_redirecting_to_a_dead_cdn = request.getfixturevalue(hub)
    source = sources.HttpSource(hub_redirecting_to_a_dead_cdn, "hub", None,
                                sources.RetryPolicy(attempts=5, base_delay=0.01, read_timeout=0.3))  # fmt: skip
    began = time.monotonic()
    tries = 0

    async def a_try(watch: Callable[[PullUpdate], None]) -> str:
        nonlocal tries
        tries += 1
        if time.monotonic() - began > 15:  # five times the patience
            return f"never gave up ({tries} tries in {time.monotonic() - began:.0f} s)"
        await source.fetch(f"{hub_redirecting_to_a_dead_cdn}/acme/x/resolve/main/w.bin", 0, 9, 10)
        return "fetched"

    old = outage.OUTAGE_FIRST_WAIT, outage.OUTAGE_LONGEST_WAIT
    outage.OUTAGE_FIRST_WAIT, outage.OUTAGE_LONGEST_WAIT = 0.05, 0.2
    try:
        with pytest.raises(UpstreamError, match="MODELDEPOT_OUTAGE_PATIENCE"):
            outage.run_through_outages(a_try, None, 3.0, "acme/x")
    finally:
        outage.OUTAGE_FIRST_WAIT, outage.OUTAGE_LONGEST_WAIT = old
