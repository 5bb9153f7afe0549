"""The source chain over real loopback sockets: depot nodes first (chunks spread across them), the Hub last.

Every server here is real: LiveNodes (the production app) hold the repos; small aiohttp apps on a
background loop play the parts a test needs to watch: a recording reverse proxy in front of a node, a
Hub look-alike that sends LFS files to a "CDN" on another port, and a listener that only counts the
connections it is offered (a Hub that must never be asked).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import blake3
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from conftest import (
    SMALL_CHUNK,
    LiveNode,
    cancel_other_tasks,
    closed_port,
    store_files_consistent,
    write_model_dir,
)
from modeldepot import Depot
from modeldepot.errors import (
    AccessDeniedError,
    DepotError,
    EntryNotFoundError,
    IntegrityError,
    InvalidPathError,
    NotFoundError,
    UpstreamError,
)

REPO = "acme/spread"
WEIGHTS = "model.safetensors"
CHUNKS = 20
BIG = random.Random(7).randbytes(CHUNKS * SMALL_CHUNK)
FILES = {
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "config.json": b'{"model_type": "bert"}',
    "tokenizer.json": b'{"vocab": {"a": 0, "b": 1}}',
    WEIGHTS: BIG,
}
OTHER_REPO = "acme/hub-only"
OTHER_FILES = {
    ".gitattributes": FILES[".gitattributes"],
    "config.json": b'{"model_type": "gpt2"}',
    WEIGHTS: random.Random(8).randbytes(5 * SMALL_CHUNK + 123),
}
HF_SECRET = "hf_secret"
NODE_SECRET = "node-secret"

_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
CLIENT = web.AppKey("client", aiohttp.ClientSession)
T = TypeVar("T")
Accept = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# -- helper servers on a background loop ---------------------------------------------------------------


class Background:
    """One event loop on a thread, hosting the helper servers of a test; ``stop`` closes all of them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="helpers", daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []
        self._servers: list[asyncio.Server] = []

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def serve(self, app: web.Application) -> str:
        async def start() -> int:
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self._runners.append(runner)
            return int(runner.addresses[0][1])

        return f"http://127.0.0.1:{self.run(start())}"

    def listen(self, accept: Accept) -> str:
        async def start() -> asyncio.Server:
            return await asyncio.start_server(accept, "127.0.0.1", 0)

        server = self.run(start())
        self._servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        async def shutdown() -> None:
            for runner in self._runners:
                await runner.cleanup()
            for server in self._servers:
                server.close()
                await server.wait_closed()
            await cancel_other_tasks()

        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


async def _client(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        app[CLIENT] = session
        yield


def _app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(_client)
    return app


async def _forward(
    request: web.Request, base: str, raw_path: str | None = None, drop_auth: bool = False
) -> web.Response:
    """Send ``request`` on to ``base`` (raw path and query kept) and hand back the answer as it came."""
    headers = CIMultiDict(
        (k, v)
        for k, v in request.headers.items()
        if k.lower() not in _HOP and not (drop_auth and k.lower() == "authorization")
    )
    body = await request.read()
    url = URL(base + (raw_path or request.raw_path), encoded=True)
    session = request.app[CLIENT]
    async with session.request(
        request.method, url, headers=headers, data=body or None, allow_redirects=False
    ) as upstream:
        data = await upstream.read()
        out = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP)
        return web.Response(status=upstream.status, body=data, headers=out)


def _body_size(response: web.Response) -> int:
    return len(response.body) if isinstance(response.body, bytes) else 0


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None
    header_values: tuple[str, ...]
    status: int
    body: int


class RecordingProxy:
    """A reverse proxy in front of a node that records every request and how many body bytes it answered."""

    def __init__(self, background: Background, upstream: str, flip_at: int | None = None,
                 flip_path: str = WEIGHTS) -> None:  # fmt: skip
        self.upstream = upstream
        self.flip_at = flip_at  # a byte of flip_path it flips in every answer that carries it (a liar)
        self.flip_path = flip_path
        self.seen: list[Seen] = []
        app = _app()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.url = background.serve(app)

    async def _handle(self, request: web.Request) -> web.Response:
        response = await _forward(request, self.upstream)
        if (
            self.flip_at is not None
            and request.path.endswith(f"/{self.flip_path}")
            and isinstance(response.body, bytes)
        ):
            start = int(response.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
            if 0 <= self.flip_at - start < len(response.body):
                body = bytearray(response.body)
                body[self.flip_at - start] ^= 0xFF
                response.body = bytes(body)
        self.seen.append(
            Seen(
                request.method,
                request.path,
                request.headers.get("Range"),
                request.headers.get("Authorization"),
                tuple(request.headers.values()),
                response.status,
                _body_size(response),
            )
        )
        return response

    def ranged(self, path: str = WEIGHTS) -> list[Seen]:
        """The Range GETs of ``path`` through resolve that the node answered with 206."""
        return [
            s
            for s in self.seen
            if s.method == "GET" and s.path.endswith(f"/{path}") and "/resolve/" in s.path
            if s.range is not None and s.status == 206
        ]

    def resolved_paths(self) -> set[str]:
        return {m["path"] for s in self.seen if (m := _RESOLVE.match(s.path))}


class CountingListener:
    """Accepts TCP connections, counts them and hangs up: a Hub that must never be asked."""

    def __init__(self, background: Background) -> None:
        self.connections = 0
        self.url = background.listen(self._accept)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class HubLike:
    """Answers like the Hub, from an upstream node: metadata is the node's, an LFS file's resolve is a 302
    to a CDN on another port (as the Hub sends them to its CDN), small files come from the Hub itself."""

    def __init__(self, background: Background, upstream: str) -> None:
        self.upstream = upstream
        self.hub_seen: list[tuple[str, str | None, tuple[str, ...]]] = []  # path, Authorization, all values
        self.cdn_seen: list[tuple[str | None, str | None, int]] = []  # Range, Authorization, bytes sent
        self.redirects = 0
        cdn = _app()
        cdn.router.add_get("/blobs/{sha256}", self._cdn)
        self.cdn_url = background.serve(cdn)
        hub = _app()
        hub.router.add_route("*", "/{tail:.*}", self._hub)
        self.url = background.serve(hub)

    async def _hub(self, request: web.Request) -> web.Response:
        self.hub_seen.append(
            (request.path, request.headers.get("Authorization"), tuple(request.headers.values()))
        )
        match = _RESOLVE.match(request.path)
        if match is not None and request.method in ("GET", "HEAD"):
            sibling, commit = await self._sibling(request, match["repo"], match["rev"], match["path"])
            if sibling is not None and "lfs" in sibling:
                self.redirects += 1
                sha256, size = sibling["lfs"]["sha256"], sibling["lfs"]["size"]
                return web.Response(
                    status=302,
                    headers={
                        "Location": f"{self.cdn_url}/blobs/{sha256}?X-Amz-Signature=not-a-secret",
                        "X-Repo-Commit": commit,
                        "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": str(size),
                    },
                )
        return await _forward(request, self.upstream, drop_auth=True)

    async def _sibling(
        self, request: web.Request, repo: str, rev: str, path: str
    ) -> tuple[dict[str, Any] | None, str]:
        url = f"{self.upstream}/api/models/{repo}/revision/{rev}?blobs=true"
        async with request.app[CLIENT].get(url) as response:
            if response.status != 200:
                return None, ""
            info = await response.json()
        found = [s for s in info["siblings"] if s["rfilename"] == path]
        return (found[0] if found else None), info["sha"]

    async def _cdn(self, request: web.Request) -> web.Response:
        raw = f"/api/depot/v1/blobs/{request.match_info['sha256']}"
        response = await _forward(request, self.upstream, raw_path=raw, drop_auth=True)
        self.cdn_seen.append(
            (request.headers.get("Range"), request.headers.get("Authorization"), _body_size(response))
        )
        return response

    def cdn_bytes(self) -> int:
        return sum(n for _, _, n in self.cdn_seen)


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
def background() -> Iterator[Background]:
    helpers = Background()
    yield helpers
    helpers.stop()


NodeFactory = Callable[..., LiveNode]


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start a node holding ``repos`` ({repo id: files}); stopped and closed at the end of the test."""
    made: list[LiveNode] = []

    def make(name: str, repos: dict[str, dict[str, bytes]], token: str | None = None,
             private: bool = False) -> LiveNode:  # fmt: skip
        depot = Depot(tmp_path / f"node-{name}", chunk_size=SMALL_CHUNK)
        for index, (repo, files) in enumerate(repos.items()):
            source = write_model_dir(tmp_path / f"src-{name}-{index}", files)
            depot.import_dir(source, repo, private=private)
        node = LiveNode(depot, token=token)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()
        node.depot.close()


LocalFactory = Callable[..., Depot]


@pytest.fixture
def make_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalFactory]:
    """A local Depot reading its sources from the environment, as a user's would."""
    opened: list[Depot] = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def make(name: str, servers: list[str], hub: str, node_token: str | None = None,
             hf_token: str | None = None) -> Depot:  # fmt: skip
        monkeypatch.setenv("MODELDEPOT_SERVERS", ",".join(servers))
        monkeypatch.setenv("HF_ENDPOINT", hub)
        for variable, value in (("MODELDEPOT_TOKEN", node_token), ("HF_TOKEN", hf_token)):
            if value is None:
                monkeypatch.delenv(variable, raising=False)
            else:
                monkeypatch.setenv(variable, value)
        depot = Depot(tmp_path / f"local-{name}", chunk_size=SMALL_CHUNK)
        opened.append(depot)
        return depot

    yield make
    for depot in opened:
        depot.close()


def chunk_range(index: int) -> str:
    start = index * SMALL_CHUNK
    return f"bytes={start}-{start + SMALL_CHUNK - 1}"


def assert_holds(local: Depot, repo: str, files: dict[str, bytes]) -> None:
    assert {f.path for f in local.list_files(repo)} == set(files)
    for path, data in files.items():
        assert bytes(local.get_file(repo, path)) == data, path
    assert store_files_consistent(local) == []


# -- 1. chunks spread across nodes ----------------------------------------------------------------------


def test_chunks_of_one_file_come_from_every_node_that_holds_it(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    node_a, node_b = make_node("a", {REPO: FILES}), make_node("b", {REPO: FILES})
    commit = node_a.depot.resolve(REPO)
    assert node_b.depot.resolve(REPO) == commit  # same files, same deterministic commit id
    proxy_a, proxy_b = RecordingProxy(background, node_a.url), RecordingProxy(background, node_b.url)
    hub = CountingListener(background)
    local = make_local("spread", [proxy_a.url, proxy_b.url], hub.url)

    result = local.pull(REPO)

    assert result.commit_id == commit and result.bytes_downloaded == sum(map(len, FILES.values()))
    assert set(result.sources) == {proxy_a.url, proxy_b.url}
    assert_holds(local, REPO, FILES)
    from_a, from_b = proxy_a.ranged(), proxy_b.ranged()
    assert from_a and from_b, "both nodes serve chunks of the one big file"
    assert sum(s.body for s in from_a + from_b) == len(BIG)  # each chunk crossed the wire once
    chunk_ranges = {chunk_range(i) for i in range(CHUNKS)}
    assert {s.range for s in from_a + from_b} == chunk_ranges  # chunk-aligned ranges, all of them
    assert hub.connections == 0


# -- 2. a private repo from a node with its token -------------------------------------------------------


def test_a_private_repo_is_pulled_from_a_node_with_its_token_and_never_from_the_hub(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    node = make_node("private", {REPO: FILES}, token=NODE_SECRET, private=True)
    assert node.depot.store.repo_private(REPO)
    hub = CountingListener(background)
    local = make_local("b", [node.url], hub.url, node_token=NODE_SECRET)

    result = local.pull(REPO)

    assert result.commit_id == node.depot.resolve(REPO)
    assert_holds(local, REPO, FILES)
    assert hub.connections == 0


def test_a_private_repo_without_the_node_token_is_a_clear_error_naming_the_repo(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    node = make_node("private", {REPO: FILES}, token=NODE_SECRET, private=True)
    hub = CountingListener(background)
    local = make_local("no-token", [node.url], hub.url)
    with pytest.raises((NotFoundError, AccessDeniedError), match=REPO):
        local.pull(REPO)
    assert local.list_repos() == []


def test_without_the_node_token_a_hub_that_lacks_the_repo_gives_not_found_naming_repo_and_node(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    node = make_node("private", {REPO: FILES}, token=NODE_SECRET, private=True)
    public_hub = make_node("hub", {OTHER_REPO: OTHER_FILES})  # a Hub that knows nothing of REPO
    local = make_local("no-token", [node.url], public_hub.url)
    with pytest.raises((NotFoundError, AccessDeniedError), match=REPO) as caught:
        local.pull(REPO)
    assert node.url in str(caught.value)  # the node's refusal is part of the message
    assert local.list_repos() == [] and store_files_consistent(local) == []


def test_a_node_that_refuses_the_scan_points_to_modeldepot_token(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    node = make_node("private", {REPO: FILES}, token=NODE_SECRET, private=True)
    public_hub = make_node("hub", {OTHER_REPO: OTHER_FILES})
    local = make_local("no-token", [node.url], public_hub.url)
    with pytest.raises(DepotError) as caught:
        local.pull(REPO)
    assert "MODELDEPOT_TOKEN" in str(caught.value)


# -- 3. tokens stay with their owners -------------------------------------------------------------------


def test_each_token_goes_only_to_its_own_origin(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    node = make_node("node", {REPO: FILES}, token=NODE_SECRET)
    proxy = RecordingProxy(background, node.url)
    hub = HubLike(background, make_node("hub", {REPO: FILES, OTHER_REPO: OTHER_FILES}).url)
    local = make_local("tokens", [proxy.url], hub.url, node_token=NODE_SECRET, hf_token=HF_SECRET)

    local.pull(REPO)  # the node holds it: the Hub is not needed
    assert hub.hub_seen == [] and hub.cdn_seen == []
    local.pull(OTHER_REPO)  # only the Hub holds it: the node is asked first and says no

    assert_holds(local, REPO, FILES)
    assert_holds(local, OTHER_REPO, OTHER_FILES)
    assert proxy.seen and hub.hub_seen and hub.cdn_seen and hub.redirects
    assert {s.authorization for s in proxy.seen} == {f"Bearer {NODE_SECRET}"}
    assert not any(HF_SECRET in value for s in proxy.seen for value in s.header_values)
    assert {auth for _, auth, _ in hub.hub_seen} == {f"Bearer {HF_SECRET}"}
    assert not any(NODE_SECRET in value for _, _, values in hub.hub_seen for value in values)
    assert {auth for _, auth, _ in hub.cdn_seen} == {None}


# -- 4. a Hub that redirects LFS files to a CDN ---------------------------------------------------------


def test_the_hub_token_is_not_sent_to_the_cdn_a_redirect_points_to(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    storage = make_node("hub-storage", {REPO: FILES})
    hub = HubLike(background, storage.url)
    local = make_local("hub", [], hub.url, hf_token=HF_SECRET)

    result = local.pull(REPO)

    assert result.commit_id == storage.depot.resolve(REPO) and result.sources == (hub.url,)
    assert_holds(local, REPO, FILES)
    assert hub.redirects >= CHUNKS  # one redirect per chunk request of the LFS file
    assert hub.cdn_bytes() == len(BIG)
    assert {r for r, _, _ in hub.cdn_seen} == {chunk_range(i) for i in range(CHUNKS)}
    assert [auth for _, auth, _ in hub.cdn_seen] == [None] * len(hub.cdn_seen)
    assert hub.hub_seen and {auth for _, auth, _ in hub.hub_seen} == {f"Bearer {HF_SECRET}"}
    assert any("/resolve/" in path for path, _, _ in hub.hub_seen)


# -- 5. a corrupt chunk on one node ---------------------------------------------------------------------


def _lying(background: Background, node: LiveNode, chunk: int) -> RecordingProxy:
    """The node behind a proxy that flips one byte of ``chunk`` in transit: a node that serves it wrong (a
    node itself checks every chunk before sending it, so the lie has to be told on the way)."""
    return RecordingProxy(background, node.url, flip_at=chunk * SMALL_CHUNK + 100)


def test_a_chunk_a_node_serves_wrong_is_fetched_from_the_other_node(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    node_a, node_b = make_node("a", {REPO: FILES}), make_node("b", {REPO: FILES})
    bad = 3
    proxy_a, proxy_b = _lying(background, node_a, bad), RecordingProxy(background, node_b.url)
    hub = CountingListener(background)
    local = make_local("repair", [proxy_a.url, proxy_b.url], hub.url)

    local.pull(REPO)

    assert_holds(local, REPO, FILES)  # the original bytes, A's wrong byte nowhere
    assert chunk_range(bad) in {s.range for s in proxy_a.ranged()}  # A did serve it (wrong)
    assert chunk_range(bad) in {s.range for s in proxy_b.ranged()}  # B served it right
    assert [s.range for s in proxy_a.ranged()].count(chunk_range(bad)) == 1  # A is not asked again
    assert hub.connections == 0


def test_a_small_file_a_node_serves_wrong_is_fetched_from_the_other_node(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    """A config lands on one worker-thread trip (its BLAKE3 checked there, then written and hashed): the
    node's chunk digest still rejects a wrong copy before it is written, and the other node serves it."""
    node_a, node_b = make_node("a", {REPO: FILES}), make_node("b", {REPO: FILES})
    proxy_a = RecordingProxy(background, node_a.url, flip_at=5, flip_path="tokenizer.json")
    proxy_b = RecordingProxy(background, node_b.url)
    hub = CountingListener(background)
    local = make_local("repair-small", [proxy_a.url, proxy_b.url], hub.url)

    local.pull(REPO)

    assert_holds(local, REPO, FILES)
    assert [s.status for s in proxy_a.ranged("tokenizer.json")] == [206]  # A served it (wrong), once
    assert [s.status for s in proxy_b.ranged("tokenizer.json")] == [206]  # B served it right
    assert hub.connections == 0


def test_with_only_the_corrupt_node_and_no_hub_the_file_fails_and_nothing_is_committed(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    node_a = make_node("a", {REPO: FILES})
    hub = CountingListener(background)
    local = make_local("only-a", [_lying(background, node_a, 3).url], hub.url)

    with pytest.raises((IntegrityError, UpstreamError), match=re.escape(WEIGHTS)):
        local.pull(REPO)

    variant = local.get_manifest(REPO).variant("safetensors")
    assert variant.status == "failed" and variant.error
    assert not local.store.has_file(REPO, WEIGHTS, node_a.depot.resolve(REPO))
    assert local.list_repos() == [] and local.du().blobs == 0
    assert store_files_consistent(local) == []


def test_when_every_node_fails_a_chunk_the_hub_joins(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    node_a = make_node("a", {REPO: FILES})
    hub = HubLike(background, make_node("hub-storage", {REPO: FILES}).url)
    local = make_local("fallback", [_lying(background, node_a, 3).url], hub.url)

    local.pull(REPO)

    assert_holds(local, REPO, FILES)
    assert chunk_range(3) in {r for r, _, _ in hub.cdn_seen}


def _lying_about(node: LiveNode, chunks: set[int]) -> None:
    """The node's copy of the weights with a byte of each of ``chunks`` altered, and its index's digests of
    those chunks made to match (its mtime put back): it passes every chunk check, its own and its peers';
    only the file's SHA-256 tells."""
    sha = hashlib.sha256(BIG).hexdigest()
    blob = node.depot.store.blobs.path(sha)
    times = blob.stat()
    data = bytearray(blob.read_bytes())
    digests = {}
    for index in chunks:
        data[index * SMALL_CHUNK + 100] ^= 0x01
        digests[index] = blake3.blake3(data[index * SMALL_CHUNK : (index + 1) * SMALL_CHUNK]).hexdigest()
    blob.chmod(0o644)
    blob.write_bytes(data)
    blob.chmod(0o444)
    os.utime(blob, ns=(times.st_atime_ns, times.st_mtime_ns))
    with node.depot.store.index.write("a test") as con:
        con.executemany("UPDATE chunks SET blake3 = ? WHERE sha256 = ? AND idx = ?",
                        [(digest, sha, index) for index, digest in digests.items()])  # fmt: skip


def test_a_node_that_lied_elsewhere_than_the_chunk_in_dispute_costs_one_try_from_the_hub_alone(
    background: Background, make_node: NodeFactory, make_local: LocalFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Two nodes lie about the weights, each with digests that match its own bytes: A about every chunk, B
    about chunk 2 alone (the same byte: the same lie). Whoever sent chunks, the first try fails; the chunk in
    dispute (0: their lists differ there) clears B, or B alone is suspected, or A alone; the try without the
    one left out fails again (B's chunk 2, or A's every chunk). Then the file comes from the upstream alone
    (before, several suspects meant the upstream at once, and a retry that failed again failed the pull: a
    review), and both are named liars, each for chunks it sent in one of the tries."""
    node_a, node_b = make_node("a", {REPO: FILES}), make_node("b", {REPO: FILES})
    _lying_about(node_a, set(range(CHUNKS)))
    _lying_about(node_b, {2})
    hub = HubLike(background, make_node("hub-storage", {REPO: FILES}).url)
    local = make_local("two-liars", [node_a.url, node_b.url], hub.url)

    with caplog.at_level(logging.WARNING, logger="modeldepot.transfer.pull"):
        local.pull(REPO)

    assert_holds(local, REPO, FILES)
    assert re.search(r"without .+ it failed the upstream's SHA-256 again \(thrown away\); fetching it again "
                     r"from the upstream alone", caplog.text), caplog.text  # fmt: skip
    named = [line for line in caplog.text.splitlines() if "sent chunks that are not the file's" in line]
    assert len(named) == 1 and node_a.url in named[0] and node_b.url in named[0], caplog.text
    assert {r for r, _, _ in hub.cdn_seen} >= {chunk_range(i) for i in range(CHUNKS)}, "the file from the Hub"
    assert hub.cdn_bytes() <= len(BIG) + SMALL_CHUNK, "once, and the chunk in dispute"


# -- 6. one file on demand ------------------------------------------------------------------------------


def test_download_file_and_get_file_with_download_fetch_exactly_one_file(
    background: Background, make_node: NodeFactory, make_local: LocalFactory
) -> None:
    node = make_node("n", {REPO: FILES})
    proxy = RecordingProxy(background, node.url)
    hub = CountingListener(background)
    local = make_local("one", [proxy.url], hub.url)

    entry = local.download_file(REPO, "tokenizer.json")

    assert entry.path == "tokenizer.json" and entry.commit_id == node.depot.resolve(REPO)
    assert [f.path for f in local.list_files(REPO)] == ["tokenizer.json"]
    assert local.du().blobs == 1 and proxy.resolved_paths() == {"tokenizer.json"}
    asked = len(proxy.seen)
    assert local.download_file(REPO, "tokenizer.json") == entry  # already there: no connection at all
    assert len(proxy.seen) == asked

    assert bytes(local.get_file(REPO, WEIGHTS, download=True)) == BIG  # a miss, fetched on demand
    assert {f.path for f in local.list_files(REPO)} == {"tokenizer.json", WEIGHTS}
    assert proxy.resolved_paths() == {"tokenizer.json", WEIGHTS}
    assert not local.has_file(REPO, "config.json")

    with pytest.raises(EntryNotFoundError, match=r"nope\.bin"):
        local.download_file(REPO, "nope.bin")
    with pytest.raises(EntryNotFoundError):
        local.get_file(REPO, "nope.bin", download=True)
    assert store_files_consistent(local) == [] and hub.connections == 0


def test_pulls_of_one_commit_file_by_file_read_its_manifest_once(
    background: Background, make_node: NodeFactory, make_local: LocalFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (A mirror pulls each file a client asks for on its own: each pull asked the node for the commit's
    # whole manifest, built and parsed again every time.)
    import modeldepot.transfer.chain as chain_module

    chain_module._MANIFESTS.clear()  # (an earlier test's node at the same port and of the same files: a 304)
    node = make_node("n", {REPO: FILES})
    proxy = RecordingProxy(background, node.url)
    local = make_local("by-file", [proxy.url], CountingListener(background).url)

    for path in ("tokenizer.json", "config.json", WEIGHTS):
        local.download_file(REPO, path)

    manifests = [s.status for s in proxy.seen if s.path.endswith("/manifest") and "/revisions/" in s.path]
    assert manifests == [200, 304, 304], manifests
    assert bytes(local.get_file(REPO, WEIGHTS)) == BIG and proxy.resolved_paths() == {
        "tokenizer.json",
        "config.json",
        WEIGHTS,
    }
    # A listing of more files than are kept is not kept (a 100,000-file one took 102 MiB: a review)
    chain_module._MANIFESTS.clear()
    monkeypatch.setattr(chain_module, "MANIFEST_FILES_KEPT", len(FILES) - 1)
    local.remove(REPO)
    for path in ("tokenizer.json", "config.json"):
        local.download_file(REPO, path)
    manifests = [s.status for s in proxy.seen if s.path.endswith("/manifest") and "/revisions/" in s.path]
    assert manifests[3:] == [200, 200] and chain_module._MANIFESTS == {}, manifests


def test_a_bad_path_is_refused_before_any_connection(
    background: Background, make_local: LocalFactory
) -> None:
    server, hub = CountingListener(background), CountingListener(background)
    local = make_local("bad-path", [server.url], hub.url)
    for path in ("../x", "a/../../x", "/etc/passwd", "a//b", "a\\b"):
        with pytest.raises(InvalidPathError):
            local.download_file(REPO, path)
        with pytest.raises(InvalidPathError):
            local.get_file(REPO, path, download=True)
    assert server.connections == hub.connections == 0


def test_a_kept_alive_connection_the_node_closed_while_idle_is_not_reused(tmp_path: Path) -> None:
    """A node closes a connection idle for its header timeout (10 s by default); the reader kept idle ones
    for 30 s. Reused, each failed its request (RemoteDisconnected), and with several in the pool every
    retry of a range met another: a fleet's pulls, idle while etcd was down, failed after 5 attempts (a
    trial found it)."""
    import time

    from conftest import BackgroundServer
    from modeldepot.server import create_app
    from modeldepot.server.connections import ConnectionLimits, NodeRunner
    from modeldepot.transfer import ranged

    data = random.randbytes(3 * SMALL_CHUNK)
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "m", {"w.bin": data}), "acme/m")
        limits = ConnectionLimits(header_timeout=0.3)
        node = BackgroundServer(NodeRunner(create_app(depot), limits=limits), name="impatient-node")
        try:
            url = f"{node.url}/acme/m/resolve/main/w.bin"
            buffer = memoryview(bytearray(len(data)))

            def read_all_at_once() -> None:  # four connections at once: four kept alive after
                readers = [threading.Thread(target=lambda i=i: ranged.read_range(
                    url, {}, i * SMALL_CHUNK // 2, (i + 1) * SMALL_CHUNK // 2 - 1, len(data),
                    buffer[i * SMALL_CHUNK // 2 : (i + 1) * SMALL_CHUNK // 2], 10, ranged.Attempt()))
                    for i in range(4)]  # fmt: skip
                for reader in readers:
                    reader.start()
                for reader in readers:
                    reader.join()

            read_all_at_once()
            time.sleep(1.0)  # the node closes them all
            for _ in range(4):  # one attempt each, as a source's retries would make
                answer = ranged.read_range(url, {}, 0, 99, len(data), buffer[:100], 10, ranged.Attempt())
                assert answer.status == 206 and answer.got == 100
            assert bytes(buffer[:100]) == data[:100]
        finally:
            node.stop()


def test_a_peer_whose_copy_failed_its_check_is_asked_once_not_five_times(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer answers 503 CorruptFile for a blob that failed its check: it will not serve it however often
    it is asked. Taken for a passing 503, each range waited five attempts on every such holder (a trial: a
    pull took twice as long with two corrupt holders). The Hub's 503 is still retried."""
    import logging
    import time

    from conftest import LiveNode, flip_byte
    from modeldepot.errors import UpstreamError
    from modeldepot.transfer.sources import HttpSource

    data = random.randbytes(2 * SMALL_CHUNK)
    caplog.set_level(logging.INFO, "modeldepot.access")
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "m", {"w.bin": data}), "acme/m")
        entry = depot.file_info("acme/m", "w.bin")
        flip_byte(depot.store.blobs.path(entry.sha256), 5, keep_mtime=False)  # noticed at the next read
        node = LiveNode(depot)
        try:
            source = HttpSource(node.url, "peer")
            url = f"{node.url}/api/depot/v1/blobs/{entry.sha256}"
            started = time.monotonic()
            with pytest.raises(UpstreamError, match="copy is corrupt"):
                asyncio.run(source.fetch(url, 0, SMALL_CHUNK - 1, len(data)))
            assert time.monotonic() - started < 0.5  # (five attempts wait 0.25 s and more between them)
            # The same node given as HF_ENDPOINT: the pull said "HTTP 503 after 5 attempts", the node's
            # reason dropped (a trial)
            hub = HttpSource(node.url, "hub")
            with pytest.raises(UpstreamError, match=r"copy is corrupt and is not served \(.*verification"):
                asyncio.run(hub.fetch(f"{node.url}/acme/m/resolve/main/w.bin", 0, SMALL_CHUNK - 1, len(data)))
        finally:
            node.stop()
    asked = [r for r in caplog.records if r.name == "modeldepot.access" and "w.bin" in r.getMessage()]
    assert len(asked) == 1, [r.getMessage() for r in asked]
    asked = [r for r in caplog.records if r.name == "modeldepot.access" and entry.sha256 in r.getMessage()]
    assert len(asked) == 1, [r.getMessage() for r in asked]


def test_a_revision_nowhere_is_said_by_the_hub_first_and_is_a_revision_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revision that does not exist, pulled with depot nodes ahead of the Hub: each node's "not found; if it
    is private, set MODELDEPOT_TOKEN", and a refusal by a node with a token, came before the Hub's "revision
    ... does not exist" (a wall). The Hub's answer comes first, the nodes' in one clause: a
    RevisionNotFoundError (404); with a node that refused to say, still a refusal (the revision may be that
    node's, a private repo's)."""
    from modeldepot.errors import RevisionNotFoundError

    with Depot(tmp_path / "hub", chunk_size=SMALL_CHUNK) as hub_depot, \
            Depot(tmp_path / "a") as a_depot, Depot(tmp_path / "b") as b_depot:  # fmt: skip
        hub_depot.import_dir(write_model_dir(tmp_path / "m", {"config.json": b"{}"}), REPO)
        hub, empty, guarded = LiveNode(hub_depot), LiveNode(a_depot), LiveNode(b_depot, token="secret")
        try:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            monkeypatch.setenv("MODELDEPOT_SERVERS", empty.url)
            with Depot(tmp_path / "local") as depot, pytest.raises(RevisionNotFoundError) as raised:
                depot.pull(REPO, revision="f" * 40)
            said = str(raised.value)
            assert said.startswith(f"revision '{'f' * 40}' of {REPO} does not exist on {hub.url}"), said
            assert f"not on the depot node {empty.url} either" in said and "MODELDEPOT_TOKEN" not in said, (
                said
            )
            monkeypatch.setenv("MODELDEPOT_SERVERS", f"{empty.url},{guarded.url}")
            with Depot(tmp_path / "local") as depot, pytest.raises(AccessDeniedError) as refused:
                depot.pull(REPO, revision="f" * 40)
            said = str(refused.value)
            assert said.startswith(f"revision '{'f' * 40}' of {REPO} does not exist on {hub.url}"), said
            assert f"{guarded.url} refused access" in said and said.count("MODELDEPOT_TOKEN") == 1, said
            # A node that holds the repo, not the revision, says so ("not on the depot node" sent users
            # looking for a repo it held)
            monkeypatch.setenv("MODELDEPOT_SERVERS", f"{empty.url},{hub.url}")
            with Depot(tmp_path / "local") as depot, pytest.raises(RevisionNotFoundError) as raised:
                depot.pull(REPO, revision="f" * 40)
            said = str(raised.value)
            assert f"not on the depot node {empty.url} either" in said, said
            assert f"the depot node {hub.url} has the repo, but no revision '{'f' * 40}'" in said, said
        finally:
            for node in (hub, empty, guarded):
                node.stop()


def test_a_hub_that_answered_before_and_is_silent_now_is_a_timeout_not_a_node_miss(
    make_local: LocalFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With a Hub that answered this process before gone silent, the nodes' "not here" is no answer: an outage,
    said as the timeout it is (a 504 from a mirror), not as a 502 (a fleet's mirror said 504 once, then 502 for
    the same scan asked again: an explorer's trial)."""
    from conftest import SilentAddress
    from modeldepot.errors import UpstreamTimeoutError
    from modeldepot.transfer import chain

    monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", "1")
    with Depot(tmp_path / "empty") as empty_depot:
        empty, silent = LiveNode(empty_depot), SilentAddress()
        try:
            monkeypatch.setattr(chain, "_HUB_ANSWERED", {silent.url})  # (it answered this process before)
            local = make_local("silent-hub", [empty.url], silent.url)
            with pytest.raises(UpstreamTimeoutError, match="not on the depot node"):
                local.scan_repo(REPO)
        finally:
            empty.stop()
            silent.close()


def test_a_configured_server_that_cannot_be_reached_is_said(
    make_node: NodeFactory,
    make_local: LocalFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A depot server the user named (a mistyped port) that cannot be reached was passed over without a word,
    the whole model coming through the Hub (an explorer's trial). It is said, once in a while, and the pull
    goes on from the next source."""
    import modeldepot.transfer.notices as notices

    monkeypatch.setattr(notices, "_said", {})
    hub = make_node("hub", {REPO: FILES})
    dead = f"http://127.0.0.1:{closed_port()}"
    local = make_local("typo", [dead], hub.url)
    with caplog.at_level("WARNING", logger="modeldepot.transfer.chain"):
        result = local.pull(REPO)
        local.scan_repo(REPO)  # (said once in a while, not at every scan)
    assert result.sources == (hub.url,)
    said = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(said) == 1 and dead in said[0], caplog.text


def test_a_node_that_fails_its_transfers_is_said_to_the_operator(
    make_node: NodeFactory,
    make_local: LocalFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node of the chain that answers its scan and fails every transfer (a sick host) cost each pull of what
    it holds time, and only the info log named it (an explorer's trial): a warning does, now and then."""
    import modeldepot.transfer.notices as notices
    from faultproxy import FaultProxy

    monkeypatch.setattr(notices, "_said", {})
    sick = FaultProxy(make_node("sick", {REPO: FILES}).url)
    try:
        sick.set("500", times=-1)
        hub = make_node("hub", {REPO: FILES})
        local = make_local("warned", [sick.url], hub.url)
        with caplog.at_level("WARNING", logger="modeldepot.transfer.download"):
            result = local.pull(REPO)
        assert_holds(local, REPO, FILES)
        assert result.bytes_by_source.get("hub") == sum(map(len, FILES.values()))
        said = [r.getMessage() for r in caplog.records if "pulls go on without it" in r.getMessage()]
        assert len(said) == 1 and sick.url in said[0], caplog.text
    finally:
        sick.stop()
