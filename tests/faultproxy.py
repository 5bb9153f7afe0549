"""A reverse proxy in front of a real node that injects one kind of fault into file transfers, on demand,
and counts the body bytes it lets through (what really crossed the wire)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from conftest import SMALL_CHUNK, BackgroundServer, LiveNode, write_model_dir
from modeldepot import Depot
from modeldepot.transfer.progress import PullUpdate

# "hang": every request, metadata too, is accepted and never answered (a hung Hub or proxy)
# "cut": each answer's connection is closed after ``cut_after`` body bytes (a flaky link)
# "flip-slow": "flip", then the body sent slowly (``slow_piece`` bytes every ``slow_delay`` seconds)
# "garble": a 200 whose body is no JSON (a peer's chunk map mangled on the way)
MODES = (
    "pass",
    "drop",
    "500",
    "429",
    "stall",
    "flip",
    "ignore-range",
    "slow",
    "404",
    "hang",
    "cut",
    "flip-slow",
    "garble",
    "502",
    "503-offline",
)


@dataclass
class FaultPlan:
    """Which fault to inject, into how many file requests (``times``; -1 = all), and what happened."""

    mode: str = "pass"
    times: int = 1
    path_suffix: str = ""  # only requests for files ending so are touched ("" = every file)
    slow_delay: float = 0.02  # seconds per 64 KiB piece in "slow" mode
    slow_piece: int = 65536  # "slow" and "flip-slow" modes: bytes sent after each delay
    flip_range_start: int = (
        -1
    )  # "slow" mode: the answer to a request of a range from this byte has a byte flipped
    retry_after_date: float = 0.0  # "429" mode: Retry-After as an HTTP date this far ahead (0: "1" second)
    cut_after: int = 0  # "cut" mode: body bytes sent before the connection is closed
    # Until this time.monotonic(), whatever the mode, every connection is closed unanswered and the ones
    # answering are cut (the network went away)
    down_until: float = 0.0
    # Until this time.monotonic(), nothing is sent at all (packets vanish): requests are held unanswered and
    # answers stall; then they go on, for any client still waiting
    silent_until: float = 0.0
    injected: int = 0
    body_bytes: int = 0  # file bytes the proxy sent to clients
    requests: list[str] = field(default_factory=list)  # "<path> <range>" of every file request
    api_requests: list[str] = field(default_factory=list)  # the path of every other request
    request_times: list[float] = field(default_factory=list)  # time.time() of each of them
    authorizations: list[str] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)  # file requests being answered, by file name
    peak_in_flight: dict[str, int] = field(default_factory=dict)  # the most of them at once, by file name
    overlaps: list[frozenset[str]] = field(default_factory=list)  # the files in flight as each request began

    def should_inject(self, path: str) -> bool:
        if self.mode == "pass" or not path.endswith(self.path_suffix):
            return False
        if self.times >= 0 and self.injected >= self.times:
            return False
        self.injected += 1
        return True


class FaultProxy:
    """Forwards everything to ``upstream`` (settable after: a node that advertises the proxy's URL); file
    downloads (``/resolve/``, or the ``file_routes`` given) go through the plan."""

    def __init__(self, upstream: str, file_routes: tuple[str, ...] = ("/resolve/",)) -> None:
        self.upstream = upstream.rstrip("/")
        self.file_routes = file_routes  # (a node's blob route too, for a peer's bytes: "/blobs/")
        self.plan = FaultPlan()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)

        async def open_session() -> None:
            self._session = aiohttp.ClientSession(auto_decompress=False)

        async def close_session() -> None:
            await self._session.close()

        self._server = BackgroundServer(
            # A stalled answer sleeps for an hour: at shutdown it is cancelled after 5 s, not aiohttp's 60.
            web.AppRunner(app, shutdown_timeout=5.0),
            "fault-proxy",
            on_start=open_session,
            after_stop=close_session,  # once no handler runs: one still connecting would leak its transport
        )
        self.url = self._server.url

    def set(self, mode: str, times: int = 1, path_suffix: str = "", **extra: float) -> FaultPlan:
        assert mode in MODES, mode
        self.plan = FaultPlan(mode, times, path_suffix, **extra)  # type: ignore[arg-type]
        return self.plan

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        plan = self.plan
        if time.monotonic() < plan.down_until:
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPException()  # (nothing is sent on the closed connection)
        await _wait_out_silence(plan)
        is_file = any(route in request.path for route in self.file_routes)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("range", "authorization", "accept-encoding", "x-chunk-digests")
        }
        if plan.mode == "hang":
            (plan.requests if is_file else plan.api_requests).append(request.path)
            await asyncio.sleep(3600)
        if not is_file:
            plan.api_requests.append(request.path)
            return await self._forward(request, headers, plan, count=False)
        plan.requests.append(f"{request.path} {request.headers.get('Range', '-')}")
        plan.request_times.append(time.time())
        plan.authorizations.append(request.headers.get("Authorization", ""))
        if plan.should_inject(request.path):
            mode = plan.mode
            if mode in ("500", "404", "502"):
                return web.Response(status=int(mode), text="injected")
            if mode == "503-offline":  # (a depot node's own reasoned refusal, as its error answers carry)
                return web.Response(status=503, text="offline", headers={"X-Error-Code": "Offline"})
            if mode == "garble":
                return web.Response(
                    status=200, body=b'{"size": 12, "blake3": [\x00garbled', content_type="application/json"
                )
            if mode == "429":
                retry_after = "1"
                if plan.retry_after_date:
                    retry_after = email.utils.formatdate(time.time() + plan.retry_after_date, usegmt=True)
                return web.Response(status=429, text="slow down", headers={"Retry-After": retry_after})
            if mode == "ignore-range":
                headers.pop("Range", None)
                headers.pop("range", None)
            return await self._forward(request, headers, plan, count=True, fault=mode)
        return await self._forward(
            request, headers, plan, count=True, fault="slow" if plan.mode == "slow" else ""
        )

    async def _forward(self, request: web.Request, headers: dict[str, str], plan: FaultPlan, count: bool,
                       fault: str = "") -> web.StreamResponse:  # fmt: skip
        name = request.path.rsplit("/", 1)[-1] if count else ""
        if name:
            plan.in_flight[name] = plan.in_flight.get(name, 0) + 1
            plan.peak_in_flight[name] = max(plan.peak_in_flight.get(name, 0), plan.in_flight[name])
            plan.overlaps.append(frozenset(n for n, count in plan.in_flight.items() if count))
        try:
            return await self._relay(request, headers, plan, count, fault)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            raise web.HTTPException() from None  # the client left (a killed pull): nothing to answer
        finally:
            if name:
                plan.in_flight[name] -= 1

    async def _relay(self, request: web.Request, headers: dict[str, str], plan: FaultPlan, count: bool,
                     fault: str) -> web.StreamResponse:  # fmt: skip
        url = self.upstream + request.path_qs
        async with self._session.request(
            request.method, url, headers=headers, allow_redirects=False
        ) as upstream:
            out_headers = {k: v for k, v in upstream.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "content-encoding")}  # fmt: skip
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            sent = 0
            async for piece in upstream.content.iter_chunked(65536):
                if time.monotonic() < plan.down_until:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await _wait_out_silence(plan)
                if fault == "drop" and sent >= 1000:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if fault == "stall" and sent >= 1000:
                    await asyncio.sleep(3600)
                if fault == "cut" and sent + len(piece) >= plan.cut_after:
                    piece = piece[: plan.cut_after - sent]
                    await response.write(piece)
                    plan.body_bytes += len(piece)
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if fault in ("flip", "flip-slow") and sent == 0 and len(piece) > 100:
                    piece = piece[:100] + bytes([piece[100] ^ 0x01]) + piece[101:]
                if (
                    plan.flip_range_start >= 0
                    and sent == 0
                    and request.headers.get("Range", "").startswith(f"bytes={plan.flip_range_start}-")
                ):
                    piece = bytes([piece[0] ^ 0x01]) + piece[1:]
                if fault in ("slow", "flip-slow"):
                    for at in range(0, len(piece), plan.slow_piece):
                        await asyncio.sleep(plan.slow_delay)
                        await response.write(piece[at : at + plan.slow_piece])
                        if count:  # (as each piece goes: a slow answer's bytes are counted as they are sent)
                            plan.body_bytes += len(piece[at : at + plan.slow_piece])
                else:
                    await response.write(piece)
                    if count:
                        plan.body_bytes += len(piece)
                sent += len(piece)
            await response.write_eof()
            return response

    def stop(self) -> None:
        self._server.stop()


async def _wait_out_silence(plan: FaultPlan) -> None:
    while time.monotonic() < plan.silent_until:  # (until the plan lifts it, or the time comes)
        await asyncio.sleep(0.05)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def proxied_node(folder: Path, files: dict[str, bytes], repo: str) -> Iterator[FaultProxy]:
    """(For a fixture.) A node holding ``files`` as ``repo`` (its store and the model folder in ``folder``),
    behind a fault proxy (yielded); both stopped after."""
    with Depot(folder / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(folder / "src", files), repo)
        node = LiveNode(depot)
        proxy = FaultProxy(node.url)
        yield proxy
        proxy.stop()
        node.stop()


def pull_in_a_thread(
    depot: Depot, repo: str, outcome: list[object], updates: list[PullUpdate] | None = None
) -> threading.Thread:
    """``depot.pull(repo)`` on a thread of its own, started: its result (or its error) is appended to
    ``outcome``, its progress to ``updates``."""

    def pull() -> None:
        try:
            outcome.append(depot.pull(repo, progress=None if updates is None else updates.append))
        except Exception as error:
            outcome.append(error)

    pulling = threading.Thread(target=pull)
    pulling.start()
    return pulling


@contextlib.contextmanager
def a_slow_node_before_the_hub(
    node: LiveNode, monkeypatch: pytest.MonkeyPatch, path_suffix: str, patience: float
) -> Iterator[FaultPlan]:
    """``node`` as a configured depot node (MODELDEPOT_SERVERS) behind a proxy that sends the files ending
    in ``path_suffix`` slowly (1.3 MB/s a connection), and as the Hub (HF_ENDPOINT), up all along; reads time
    out after 2 s, the outage patience is ``patience``. Yields the proxy's plan (its faults to set)."""
    proxy = FaultProxy(node.url)
    try:
        plan = proxy.set("slow", times=-1, path_suffix=path_suffix, slow_delay=0.05)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("MODELDEPOT_SERVERS", proxy.url)
        monkeypatch.setenv("HF_ENDPOINT", node.url)
        monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", str(patience))
        monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", "2")
        yield plan
    finally:
        proxy.stop()
