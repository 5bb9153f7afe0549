"""What the control-route and dashboard tests share: a source node holding a generated ONNX repo, a node
that pulls from it (``servers=[...]``, no Hub), a node without a token whose control token is known
(:class:`OpenNode`), a proxy that can hold a transfer midway, plain HTTP calls to a node, and `modeldepot
serve` in a process of its own (:class:`Serving`)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import (
    SMALL_CHUNK,
    BackgroundServer,
    ForwardingProxy,
    LiveNode,
    closed_port,
    free_port,
    write_model_dir,
)
from modeldepot import Depot
from modeldepot.server import create_app
from modeldepot.server.connections import NodeRunner

API = "/api/depot/v1"
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTROL_TOKEN = "c0ntrol-t0ken"  # an OpenNode's (a real node makes a random one at start)
CONTROL = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
JSON = {"Content-Type": "application/json"}
REPO = "onnx-community/tiny"
_rng = random.Random(15)
FILES = {
    ".gitattributes": b"*.onnx filter=lfs diff=lfs merge=lfs -text\n*.onnx_data filter=lfs diff=lfs merge=lfs -text\n",
    "README.md": b"---\npipeline_tag: text-generation\n---\n# tiny\n",
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b'{"vocab": {"a": 0}}',
    "onnx/model.onnx": _rng.randbytes(300_000),
    "onnx/model_q4f16.onnx": _rng.randbytes(1 << 20),  # 16 chunks of 64 KiB
    "onnx/model_q4f16.onnx_data": _rng.randbytes(200_000),
    "onnx/model_fp16.onnx": _rng.randbytes(120_000),
}
Q4F16 = ("onnx/model_q4f16.onnx", "onnx/model_q4f16.onnx_data", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    target: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> Reply:
    """One request on a fresh connection; ``body``: bytes as they are, anything else as JSON."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    sent = {**(JSON if data is not None and not isinstance(body, bytes) else {}), **(headers or {})}
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request(method, target, body=data, headers=sent)
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


@contextlib.contextmanager
def source_node(tmp_path: Path, token: str | None = None) -> Iterator[LiveNode]:
    """A node holding REPO (imported from FILES), in 64 KiB chunks."""
    with Depot(tmp_path / "source-store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "source-files", FILES), REPO)
        node = LiveNode(depot, token=token)
        try:
            yield node
        finally:
            node.stop()


class OpenNode(LiveNode):
    """A node without a token (its reads open to anyone), its control routes unlocked by ``control_token``:
    the production app, served as ``modeldepot serve`` serves it, on a loopback port."""

    def __init__(self, depot: Depot, control_token: str = CONTROL_TOKEN) -> None:
        self.depot = depot
        self.control_token = control_token
        app = create_app(depot, control_token=control_token)
        BackgroundServer.__init__(self, NodeRunner(app), name="open-node")


def pulling_depot(home: Path, server: str, monkeypatch: pytest.MonkeyPatch) -> Depot:
    """A depot that pulls from ``server`` alone (the Hub is a port where nothing listens), online."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    return Depot(home, chunk_size=SMALL_CHUNK, servers=[server])


class HoldingProxy(ForwardingProxy):
    """Forwards everything to ``upstream``; once ``allowance`` bytes of blob bodies went through, the rest
    waits until :meth:`release` (a pull held midway, its progress on show). Released from the start unless
    :meth:`hold` is called."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.allowance = -1  # -1: nothing held
        self.sent = 0
        self.requests: list[str] = []  # "METHOD /path?query" of every request, in order
        self._gate: asyncio.Event | None = None
        super().__init__("holding-proxy")

    async def started(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()

    async def stopping(self) -> None:
        self.release_now()

    def release_now(self) -> None:
        if self._gate is not None:
            self.allowance = -1
            self._gate.set()

    def hold(self, allowance: int) -> None:
        def close_gate() -> None:
            assert self._gate is not None
            self.allowance, self.sent = allowance, 0
            self._gate.clear()

        self._server.loop.call_soon_threadsafe(close_gate)

    def release(self) -> None:
        self._server.loop.call_soon_threadsafe(self.release_now)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path_qs}")
        try:
            return await self._relay(request)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            raise web.HTTPException() from None  # the client left (a pull cancelled): nothing to answer

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() in ("range", "authorization", "accept")
        }
        async with self.session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=await request.read() or None,
        ) as upstream:
            kept = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() not in ("transfer-encoding", "connection", "content-encoding")
            }
            response = web.StreamResponse(status=upstream.status, headers=kept)
            await response.prepare(request)
            held = upstream.headers.get("Content-Type", "").startswith("application/octet-stream")
            async for piece in upstream.content.iter_chunked(16 * 1024):
                if held and self.allowance >= 0 and self.sent >= self.allowance:
                    assert self._gate is not None
                    await self._gate.wait()
                self.sent += len(piece)
                await response.write(piece)
            await response.write_eof()
            return response


class Serving:
    """``modeldepot serve`` in a process of its own on a free loopback port, its stderr read line by line
    (on a thread, so the pipe never fills)."""

    def __init__(self, home: Path, *args: str, env_extra: dict[str, str] | None = None) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("MODELDEPOT_TOKEN", "HF_TOKEN")}
        env.update(env_extra or {})
        env["PYTHONUNBUFFERED"] = "1"
        argv = [sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(self.port),
                "--scrub-interval", "off", *args]  # fmt: skip
        self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, name="serve-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put("")  # the end

    def line_with(self, fragment: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line with {fragment!r} in {timeout} s:\n{''.join(self.seen)}"
                ) from None
            if not line:
                raise AssertionError(f"serve exited ({self.process.poll()}):\n{''.join(self.seen)}")
            self.seen.append(line)
            if fragment in line:
                return line

    def stop(self) -> str:
        """Stop it (SIGTERM) and return all it wrote to stderr."""
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(60)
        self._reader.join(30)
        assert self.process.stderr is not None
        self.process.stderr.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)
