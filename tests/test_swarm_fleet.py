"""A fleet pulling one model from the Hub at once (issue 13): each chunk from the Hub once, shared while it
downloads. Real processes on loopback: an etcd, ``modeldepot serve --cluster`` nodes, ``modeldepot pull``
processes on their stores, and a Hub (a plain ``modeldepot serve`` holding the repo) behind a proxy that
counts the bytes it sends for each chunk of the big file.

- four nodes pull a 256 MiB file at once: the Hub sends it about once, and all four are byte-identical;
- the claimer is SIGKILLed mid-way: the others finish, and the Hub sends each chunk at most twice;
- a node joining late, while the others download, takes nothing from the Hub;
- a peer whose answers flip a byte is banned, and the results stay right; one that stalls, or trickles,
  does not hold up the pull.

Nothing waits by sleeping: every wait is bounded and polls its condition.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import BackgroundServer, free_port, wait_for_port, wait_until, write_model_dir
from fleetnodes import API, Fleet, Node, base_env, modeldepot

MiB = 1 << 20
CHUNK = 4 * MiB
TOKEN = "swarm-fleet-secret"
REPO = "acme/big"
BIG = "model.safetensors"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class HubProxy:
    """Forwards to the Hub node, streaming; counts, per chunk of the big file, the body bytes it sent.

    ``on_chunk(index)`` is called as a ranged request for the big file starts (a test's trigger)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.sent: Counter[int] = Counter()  # chunk index -> body bytes sent
        self.requests: Counter[int] = Counter()
        self.on_chunk: Any = None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session: aiohttp.ClientSession | None = None

        async def open_session() -> None:
            self._session = aiohttp.ClientSession(auto_decompress=False)

        async def close_session() -> None:
            assert self._session is not None
            await self._session.close()

        self._server = BackgroundServer(web.AppRunner(app), "hub-proxy", on_start=open_session,
                                        on_stop=close_session)  # fmt: skip
        self.url = self._server.url

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        wanted = _RANGE.fullmatch(request.headers.get("Range", ""))
        chunk = int(wanted.group(1)) // CHUNK if wanted and request.path.endswith(f"/{BIG}") else None
        if chunk is not None:
            self.requests[chunk] += 1
            if self.on_chunk is not None:
                self.on_chunk(chunk)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("range", "authorization")}
        body = await request.read() if request.can_read_body else None
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body, allow_redirects=False) as upstream:  # fmt: skip
            out = {k: v for k, v in upstream.headers.items()
                   if k.lower() not in ("transfer-encoding", "connection", "content-encoding")}  # fmt: skip
            response = web.StreamResponse(status=upstream.status, headers=out)
            await response.prepare(request)
            if request.method != "HEAD":
                async for piece in upstream.content.iter_chunked(1 << 20):
                    await response.write(piece)
                    if chunk is not None:
                        self.sent[chunk] += len(piece)
            await response.write_eof()
            return response

    def total(self) -> int:
        return sum(self.sent.values())

    def stop(self) -> None:
        self._server.stop()


class Hub:
    """The Hub: a store holding the repo, served by ``modeldepot serve`` (no cluster, no token), behind a
    :class:`HubProxy`."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        home = root / "hub"
        env = base_env(MODELDEPOT_CHUNK_SIZE=str(CHUNK))
        modeldepot("import", str(write_model_dir(root / "hub-src", files)), "--repo", REPO, "--home", str(home), env=env)
        self.port = free_port()
        self.log = root / "hub.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(self.port),
                 "--scrub-interval", "off"], env=env, stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        wait_for_port(self.port, 60, process=self.process)
        self.proxy = HubProxy(f"http://127.0.0.1:{self.port}")

    def stop(self) -> None:
        self.proxy.stop()
        self.process.kill()
        self.process.wait(30)


@pytest.fixture
def big_file() -> bytes:
    return random_bytes(256 * MiB - 12345, seed=13)


@pytest.fixture
def hub(tmp_path: Path, big_file: bytes) -> Iterator[Hub]:
    files = {".gitattributes": GITATTRIBUTES, "config.json": b'{"model_type": "bert"}', BIG: big_file}
    hub = Hub(tmp_path, files)
    yield hub
    hub.stop()


def node_env(**extra: str) -> dict[str, str]:
    return {"MODELDEPOT_CHUNK_SIZE": str(CHUNK), **extra}


def start_nodes(fleet: Fleet, names: list[str], *extra: str) -> list[Node]:
    nodes = [fleet.node(name, TOKEN, *extra, env=node_env()) for name in names]
    for node in nodes:
        node.ready()
    everyone = {n.id for n in fleet.nodes}
    for node in nodes:
        wait_until(lambda n=node: n.peer_ids() >= everyone, 20, f"{node.home.name} sees the fleet")  # type: ignore[misc]
    return nodes


class Pull:
    """``modeldepot pull REPO --cluster`` on a node's store, as a process of its own."""

    def __init__(self, node: Node, hub: Hub, **extra: str) -> None:
        self.node = node
        env = base_env(MODELDEPOT_TOKEN=TOKEN, HF_ENDPOINT=hub.proxy.url, MODELDEPOT_CHUNK_SIZE=str(CHUNK),
                       MODELDEPOT_READ_TIMEOUT="5", **extra)  # fmt: skip
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modeldepot", "pull", REPO, "--home", str(node.home), "--cluster",
             node.cluster, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.seconds = 0.0

    def result(self, timeout: float = 240) -> dict[str, Any]:
        out, err = self.process.communicate(timeout=timeout)
        self.seconds = time.monotonic() - self.started
        assert self.process.returncode == 0, f"pull on {self.node.home.name} exited {self.process.returncode}:\n{err}"
        result: dict[str, Any] = json.loads(out)
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=60)


def stored_sha256(node: Node) -> str:
    """The SHA-256 of the big file as the node's snapshot holds it (read back from disk)."""
    snapshots = node.home / "snapshots"
    [path] = list(snapshots.rglob(BIG))
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(8 * MiB):
            digest.update(piece)
    return digest.hexdigest()


def test_four_nodes_pulling_at_once_take_each_chunk_from_the_hub_once(
    fleet: Fleet, hub: Hub, big_file: bytes
) -> None:
    nodes = start_nodes(fleet, ["a", "b", "c", "d"])
    pulls = [Pull(node, hub) for node in nodes]
    results = [pull.result() for pull in pulls]
    expected = hashlib.sha256(big_file).hexdigest()
    for node in nodes:
        assert stored_sha256(node) == expected
    size = len(big_file)
    from_hub = sum(r["bytes_by_source"].get("hub", 0) for r in results)
    print(f"hub sent {hub.proxy.total() / size:.3f}x; pulls took {[round(p.seconds, 1) for p in pulls]} s; "
          f"by source {[r['bytes_by_source'] for r in results]}")  # fmt: skip
    assert hub.proxy.total() <= 1.1 * size, dict(hub.proxy.sent)
    assert from_hub >= size  # every chunk came from the Hub once at least, as each node counted it
    assert all(r["bytes_by_source"].get("peer", 0) > 0 for r in results)
    assert fleet.dump_claims() == {}  # released when the pulls ended
