"""The swarm scheduler of one file (transfer/download.py) against real nodes on loopback: partial holders
(their chunk maps, read through the node's own route), rarest first, the endgame, the ban of a source whose
bytes fail their digest, and the bytes counted by kind of source. Proxies in front of the nodes log each
request and count the body bytes they let through; nothing waits by sleeping."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import blake3
import pytest
from aiohttp import web

from conftest import (
    SMALL_CHUNK,
    BackgroundServer,
    ForwardingProxy,
    InProcessNode,
    LiveNode,
    SilentAddress,
    closed_port,
    wait_until,
    write_model_dir,
    write_partial,
)
from modeldepot import Depot
from modeldepot.discovery.base import NodeRecord
from modeldepot.discovery.mem import MemDiscovery, MemRegistry
from modeldepot.hashing import chunk_count, chunk_span
from modeldepot.hub.manifest import Manifest, RemoteFile
from modeldepot.transfer import choosing
from modeldepot.transfer import swarm as swarm_module
from modeldepot.transfer.download import BytesDone, FileSource, Limits, download_file
from modeldepot.transfer.fleet import FleetView
from modeldepot.transfer.progress import PullUpdate
from modeldepot.transfer.session import LazySession
from modeldepot.transfer.sources import HttpSource, RetryPolicy
from modeldepot.transfer.swarm import SwarmFile

TOKEN = "swarm-secret"
API = "/api/depot/v1"
CHUNKS = 12
DATA = random.Random(7).randbytes(CHUNKS * SMALL_CHUNK - 11)
SHA = hashlib.sha256(DATA).hexdigest()
DIGESTS = tuple(
    blake3.blake3(DATA[o : o + n]).hexdigest()
    for o, n in (chunk_span(i, len(DATA), SMALL_CHUNK) for i in range(CHUNKS))
)
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


class Proxy(ForwardingProxy):
    """Forwards to a node; logs each blob request's chunk (None for other routes) and counts body bytes.
    ``flip`` corrupts one byte of every body; ``trickle`` sends 512 bytes per 0.1 s; ``hang`` never answers
    a ranged request (a node frozen after it answered its chunk map)."""

    def __init__(
        self, upstream: str, flip: bool = False, trickle: bool = False, hang: bool = False, gone: frozenset[int] = frozenset()
    ) -> None:  # fmt: skip
        self.upstream, self.flip, self.trickle, self.hang = upstream, flip, trickle, hang
        self.gone = gone  # chunks answered a plain 404, as by a node that holds no copy of the file
        self.chunks: list[int] = []  # chunk of each ranged request, in order
        self.body_bytes = 0
        super().__init__("swarm-proxy")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        wanted = _RANGE.fullmatch(request.headers.get("Range", ""))
        if wanted is not None:
            self.chunks.append(int(wanted.group(1)) // SMALL_CHUNK)
            if self.hang:
                await asyncio.Event().wait()  # (until the client goes)
            if self.chunks[-1] in self.gone:
                return web.json_response({"error": "not found"}, status=404)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("range", "authorization", "x-chunk-digests")
        }
        async with self.session.get(self.upstream + request.path_qs, headers=headers) as upstream:
            body = await upstream.read()
            out = {k: v for k, v in upstream.headers.items()
                   if k.lower() not in ("transfer-encoding", "connection", "content-encoding", "content-length")}  # fmt: skip
        if wanted is None or upstream.status != 206:
            return web.Response(status=upstream.status, body=body, headers=out)
        if self.flip and len(body) > 100:
            body = body[:100] + bytes([body[100] ^ 0x01]) + body[101:]
        response = web.StreamResponse(status=206, headers=out)
        response.content_length = len(body)
        await response.prepare(request)
        step = 512 if self.trickle else len(body)
        for start in range(0, len(body), step):
            if self.trickle:
                await asyncio.sleep(0.1)  # the fault itself (a slow link), not a synchronisation
            await response.write(body[start : start + step])
            self.body_bytes += len(body[start : start + step])
        return response


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict[str, LiveNode]]:
    """Nodes with a token: ``full`` holds the file whole; ``low`` and ``high`` hold its halves in progress."""
    half = CHUNKS // 2
    made: dict[str, LiveNode] = {}
    depots: list[Depot] = []
    try:
        for name, chunks in (("full", None), ("low", list(range(half))), ("high", list(range(half, CHUNKS)))):
            depot = Depot(tmp_path / name, chunk_size=SMALL_CHUNK)
            depots.append(depot)
            if chunks is None:
                depot.import_dir(write_model_dir(tmp_path / f"src-{name}", {"w.safetensors": DATA}), "acme/w")
            else:
                assert write_partial(depot, DATA, chunks) == SHA
            made[name] = LiveNode(depot, token=TOKEN)
        yield made
    finally:
        for node in made.values():
            node.stop()
        for depot in depots:
            depot.close()


def lose_chunk_0(node: LiveNode) -> None:
    """Zero chunk 0 of the node's download in progress: its log still names it, its bytes are gone."""
    offset, length = chunk_span(0, len(DATA), SMALL_CHUNK)
    part = node.depot.store.layout.partial_stem(SHA).with_name(f"{SHA}.part")
    with open(part, "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(length))


def source(url: str, origin: str, partial: bool = False) -> FileSource:
    blob = f"{url}{API}/blobs/{SHA}"
    http = HttpSource(url, "node", TOKEN, RetryPolicy(attempts=2, base_delay=0.05, read_timeout=30))
    return FileSource(http, blob, DIGESTS, origin, f"{blob}/chunks" if partial else None)


def download(tmp_path: Path, sources: list[FileSource], limits: Limits,
             hub: list[FileSource] | None = None) -> tuple[str, dict[str, int]]:  # fmt: skip
    """Download DATA into a fresh store's partial; its SHA-256 and the bytes written by kind of source."""
    counted: dict[str, int] = {}

    def on_bytes(amount: int, kind: str, base_url: str) -> None:
        counted[kind] = counted.get(kind, 0) + amount

    async def run() -> str:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            digest = await download_file(LazySession(http), remote, claim, sources, limits,
                                         (lambda: hub) if hub else None, on_bytes)  # fmt: skip
            return digest.sha256

    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
        remote = RemoteFile("w.safetensors", len(DATA), "0" * 40, SHA)
        claim = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
        assert claim is not None
        try:
            return asyncio.run(run()), counted
        finally:
            claim.release(completed=False)


class Hub:
    """A Hub that counts connections and hangs up: it must never be asked."""

    def __init__(self) -> None:
        self.connections = 0
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = BackgroundServer(web.AppRunner(app), "counting-hub")
        self.url = self._server.url

    async def _handle(self, request: web.Request) -> web.Response:
        self.connections += 1
        return web.Response(status=500)

    def stop(self) -> None:
        self._server.stop()

    def source(self) -> FileSource:
        http = HttpSource(self.url, "hub", None, RetryPolicy(attempts=1))
        return FileSource(http, f"{self.url}/acme/w/resolve/main/w.safetensors")


def test_two_partial_holders_with_complementary_halves_make_the_whole_file_without_the_hub(
    tmp_path: Path, nodes: dict[str, LiveNode]
) -> None:
    low, high, hub = Proxy(nodes["low"].url), Proxy(nodes["high"].url), Hub()
    try:
        sha, counted = download(tmp_path, [source(low.url, "peer", True), source(high.url, "peer", True)],
                                Limits(per_source=2, total=8), [hub.source()])  # fmt: skip
        assert sha == SHA
        assert counted == {"peer": len(DATA)}
        assert hub.connections == 0
        assert set(low.chunks) == set(range(CHUNKS // 2)) and set(high.chunks) == set(
            range(CHUNKS // 2, CHUNKS)
        )
        assert low.body_bytes + high.body_bytes == len(DATA)  # each chunk once, from the holder that had it
    finally:
        for server in (low, high, hub):
            server.stop()


def test_chunks_go_rarest_first(tmp_path: Path, nodes: dict[str, LiveNode]) -> None:
    """The whole holder starts with the chunks only it has (the partial holder has the low half)."""
    full, low = Proxy(nodes["full"].url), Proxy(nodes["low"].url)
    try:
        sha, counted = download(tmp_path, [source(full.url, "node"), source(low.url, "peer", True)],
                                Limits(per_source=1, total=4))  # fmt: skip
        assert sha == SHA and sum(counted.values()) == len(DATA)
        rare = list(range(CHUNKS // 2, CHUNKS))
        assert full.chunks[: len(rare)] == rare  # lowest rare one first, then the next rarest...
        assert set(low.chunks) <= set(range(CHUNKS // 2))  # the partial holder is asked for what it has
        assert low.chunks[0] == 0
    finally:
        full.stop(), low.stop()


def test_a_source_whose_chunk_fails_its_digest_gets_no_more_chunks(
    tmp_path: Path, nodes: dict[str, LiveNode]
) -> None:
    good, flipper = Proxy(nodes["full"].url), Proxy(nodes["full"].url, flip=True)
    try:
        sha, counted = download(tmp_path, [source(flipper.url, "peer"), source(good.url, "node")],
                                Limits(per_source=1, total=4))  # fmt: skip
        assert sha == SHA
        assert len(flipper.chunks) == 1, (
            "banned after its first (corrupt) chunk, for the rest of the transfer"
        )
        assert counted == {"node": len(DATA)}
        assert sorted(good.chunks) == list(range(CHUNKS))
        # The next download (another file of the pull, another pull) does not ask it either: the ban was
        # per file, and a liar was asked again for every file of a pull, "not asked for 30 s" each time.
        assert download(tmp_path / "next", [source(flipper.url, "peer"), source(good.url, "node")],
                        Limits(per_source=1, total=4))[0] == SHA  # fmt: skip
        assert len(flipper.chunks) == 1
    finally:
        good.stop(), flipper.stop()


def test_a_lone_source_whose_chunk_fails_its_digest_makes_the_fallback_join(
    tmp_path: Path, nodes: dict[str, LiveNode]
) -> None:
    """The one node holding a file sent a chunk that failed its digest: it was asked again for it (three
    times) before the Hub joined, each failure logged as "not asking it for 30 s"."""
    hub, flipper = Proxy(nodes["full"].url), Proxy(nodes["full"].url, flip=True)
    try:
        sha, counted = download(tmp_path, [source(flipper.url, "peer")], Limits(per_source=1, total=4),
                                hub=[source(hub.url, "hub")])  # fmt: skip
        assert sha == SHA and counted == {"hub": len(DATA)}
        assert len(flipper.chunks) == 1, "the Hub joined at its first corrupt chunk"
    finally:
        hub.stop(), flipper.stop()


def test_a_node_whose_ban_ends_is_asked_again_without_waiting_for_another_source(
    tmp_path: Path, nodes: dict[str, LiveNode]
) -> None:
    """A node banned by another download of the process (its ban has a moment left) slept until another
    source landed a chunk: behind a source that trickles, the whole file waited for it."""
    from modeldepot.transfer.choosing import BANNED_NODES

    fast, slow = Proxy(nodes["full"].url), Proxy(nodes["full"].url, trickle=True)
    try:
        BANNED_NODES[f"node {fast.url}"] = time.monotonic() + 0.5  # (its source name: kind and URL)
        sha, _ = download(tmp_path, [source(slow.url, "peer"), source(fast.url, "node")],
                                Limits(per_source=1, total=4))  # fmt: skip
        assert sha == SHA and fast.chunks
        assert slow.body_bytes < SMALL_CHUNK, "the download ended before the trickling source sent a chunk"
    finally:
        fast.stop(), slow.stop()


def test_the_endgame_takes_the_slow_sources_chunks_from_another(
    tmp_path: Path, nodes: dict[str, LiveNode]
) -> None:
    fast, slow = Proxy(nodes["full"].url), Proxy(nodes["full"].url, trickle=True)
    try:
        sha, counted = download(tmp_path, [source(slow.url, "peer"), source(fast.url, "node")],
                                Limits(per_source=2, total=8))  # fmt: skip
        assert sha == SHA
        assert slow.chunks, "the slow source was given chunks"
        # Alone it would have sent the whole file; it did not even finish one chunk: its chunks came
        # from the fast source, and its requests were cancelled.
        assert slow.body_bytes < SMALL_CHUNK
        assert set(slow.chunks) <= set(fast.chunks)
        assert counted == {"node": len(DATA)}
    finally:
        fast.stop(), slow.stop()


def test_a_pull_reports_its_bytes_by_kind_of_source(
    tmp_path: Path, nodes: dict[str, LiveNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # no Hub
    monkeypatch.setenv("MODELDEPOT_SERVERS", nodes["full"].url)
    monkeypatch.setenv("MODELDEPOT_TOKEN", TOKEN)
    with Depot(tmp_path / "puller", chunk_size=SMALL_CHUNK) as local:
        result = local.pull("acme/w")
        assert result.bytes_by_source == {"node": len(DATA)} == {"node": result.bytes_total}
        assert result.to_dict()["bytes_by_source"] == {"node": len(DATA)}
        # The manifest's status rows keep it, per variant (the single-file repo has one).
        assert [v.bytes_by_source for v in local.get_manifest("acme/w").variants] == [{"node": len(DATA)}]
        again = local.pull("acme/w")
        assert again.bytes_by_source == {"local": len(DATA)}
        assert [v.bytes_by_source for v in local.get_manifest("acme/w").variants] == [{"local": len(DATA)}]
    assert chunk_count(len(DATA), SMALL_CHUNK) == CHUNKS


def test_a_chunk_the_partial_holder_turns_out_to_lack_goes_back_to_the_pool_and_the_holder_stays(
    tmp_path: Path, nodes: dict[str, LiveNode]
) -> None:
    """The low half's log names chunk 0, but its bytes on disk are gone (zeroed): its chunk map still
    claims it, the node refuses it (404 ChunkNotAvailable). The chunk comes from the whole holder; the
    partial holder is not asked for it again, and still serves the rest of its half."""
    lose_chunk_0(nodes["low"])
    full, low = Proxy(nodes["full"].url), Proxy(nodes["low"].url)
    try:

        async def claimed() -> frozenset[int] | None:
            held, digests = await source(low.url, "peer", True).source.chunk_map(
                f"{low.url}{API}/blobs/{SHA}/chunks", len(DATA), SMALL_CHUNK, with_digests=True
            )
            # (with the BLAKE3 its log names for each chunk it offers: the lost one's too, as the log says)
            assert held is not None and set(digests) == held, (held, digests)
            return held

        assert asyncio.run(claimed()) == frozenset(range(CHUNKS // 2)), "the map claims the lost chunk"
        low.chunks.clear()
        sha, counted = download(tmp_path, [source(full.url, "node"), source(low.url, "peer", True)],
                                Limits(per_source=1, total=4))  # fmt: skip
        assert sha == SHA and sum(counted.values()) == len(DATA)
        assert low.chunks[0] == 0, "its first pick: the lowest of its own chunks (all as rare)"
        assert low.chunks.count(0) == 1, "refused once, never asked for it again"
        assert len(low.chunks) >= 2 and set(low.chunks[1:]) <= set(range(1, CHUNKS // 2)), (
            "still asked for the other chunks it holds, after the refusal"
        )
        assert low.body_bytes == counted.get("peer", 0) > 0, "and it served them"
        assert 0 in full.chunks and counted["node"] == len(DATA) - counted["peer"]
    finally:
        full.stop(), low.stop()


def test_fleet_peers_holding_complementary_partials_are_sources_with_their_chunk_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes of a mem:// fleet each hold half of the file as a download in progress. The chain of a
    depot on that fleet (``_fleet_holders``) makes both sources that read their chunk maps, and the file
    comes from them alone: the Hub is never asked."""
    cluster = f"mem://swarm-{uuid.uuid4().hex[:12]}"
    half = CHUNKS // 2
    hub = Hub()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline, a depot reads no fleet
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("MODELDEPOT_TOKEN", TOKEN)
    monkeypatch.delenv("MODELDEPOT_SERVERS", raising=False)
    started: list[InProcessNode] = []
    with (
        Depot(tmp_path / "low", chunk_size=SMALL_CHUNK) as low_depot,
        Depot(tmp_path / "high", chunk_size=SMALL_CHUNK) as high_depot,
    ):
        assert write_partial(low_depot, DATA, list(range(half))) == SHA
        assert write_partial(high_depot, DATA, list(range(half, CHUNKS))) == SHA
        try:
            low, high = InProcessNode(low_depot, cluster, TOKEN), InProcessNode(high_depot, cluster, TOKEN)
            started += [low, high]
            with Depot(tmp_path / "puller", chunk_size=SMALL_CHUNK, cluster=cluster) as puller:
                expected = {low_depot.node_id: (0, 1), high_depot.node_id: (0, 1)}
                wait_until(lambda: {r.node_id: (r.blobs, r.partial) for r in puller.peers()} == expected, 10,
                           "both nodes and their partial holdings in the view")  # fmt: skip
                remote = RemoteFile("w.safetensors", len(DATA), "0" * 40, SHA)
                manifest = Manifest("acme/w", "main", "1" * 40, 0.0, hub.url, None, None, (), False,
                                    (remote,), (), (), ())  # fmt: skip
                chain = puller.chain

                async def holders() -> tuple[list[FileSource], dict[str, frozenset[int] | None]]:
                    found = (await chain.holders(manifest, SMALL_CHUNK, [remote]))[remote.path]
                    maps = {}
                    for s in found:
                        assert s.chunks_url is not None
                        maps[s.source.base_url] = (
                            await s.source.chunk_map(s.chunks_url, len(DATA), SMALL_CHUNK)
                        )[0]
                    return found, maps

                found, maps = asyncio.run(holders())
                by_url = {s.source.base_url: s for s in found}
                assert set(by_url) == {low.url, high.url} and len(found) == 2
                for url, s in by_url.items():
                    blob = f"{url}{API}/blobs/{SHA}"
                    assert (s.url, s.chunks_url, s.origin) == (blob, f"{blob}/chunks", "peer")
                    assert s.source.token == TOKEN
                assert maps == {low.url: frozenset(range(half)), high.url: frozenset(range(half, CHUNKS))}
                sha, counted = download(tmp_path, found, Limits(per_source=2, total=8),
                                        [chain.hub_source(manifest, remote)])  # fmt: skip
                assert sha == SHA
                assert counted == {"peer": len(DATA)}
                assert hub.connections == 0
        finally:
            for node in started:
                node.stop()
            hub.stop()


def swarm_download(tmp_path: Path, claimer_url: str, hub_url: str, settled: bool, limits: Limits,
                   on_bytes: BytesDone | None = None, read_timeout: float = 30) -> tuple[str, dict[str, int]]:  # fmt: skip
    """Download DATA into a fresh store's partial as a member of a swarm (a mem registry) in which another
    node, reached at ``claimer_url``, has claimed the low half (and, if ``settled``, settled it with the
    right digests), the Hub being ``hub_url``: the SHA-256 and the bytes written by kind of source (unless
    ``on_bytes`` is given: it is called instead)."""
    retry = RetryPolicy(attempts=2, base_delay=0.05, read_timeout=read_timeout)
    me = NodeRecord("a" * 32, "http://127.0.0.1:9/", "1", 1.0)
    claimer = NodeRecord("b" * 32, claimer_url, "1", 1.0)

    def claimer_source(record: NodeRecord, holding: object) -> FileSource:
        blob = f"{record.url}{API}/blobs/{SHA}"  # no digests: a claimer's, as a swarm has it
        return FileSource(HttpSource(record.url, "peer", TOKEN, retry), blob, None, "peer", f"{blob}/chunks")

    async def main() -> tuple[str, dict[str, int]]:
        registry = MemRegistry(f"swarm-{uuid.uuid4().hex[:8]}")
        mine, theirs = MemDiscovery(registry), MemDiscovery(registry)
        for discovery, record in ((mine, me), (theirs, claimer)):
            await discovery.start()
            await discovery.register(record)
        counted: dict[str, int] = {}

        def count(amount: int, kind: str, base_url: str) -> None:
            counted[kind] = counted.get(kind, 0) + amount

        try:
            for index in range(CHUNKS // 2):
                assert await theirs.claim_chunk(SHA, SMALL_CHUNK, index, claimer.node_id) is not None
                if settled:
                    await theirs.settle_claim(SHA, SMALL_CHUNK, index, DIGESTS[index])
            fleet = FleetView(mine, asyncio.get_running_loop(), me.node_id)
            swarm = SwarmFile(fleet, me.node_id, SHA, len(DATA), SMALL_CHUNK, claimer_source)
            origin = FileSource(HttpSource(hub_url, "hub", TOKEN, retry), f"{hub_url}{API}/blobs/{SHA}")
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
                remote = RemoteFile("w.safetensors", len(DATA), "0" * 40, SHA)
                claim = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
                assert claim is not None
                try:
                    async with aiohttp.ClientSession(auto_decompress=False) as session:
                        digest = await download_file(
                            LazySession(session), remote, claim, [origin], limits,
                            on_bytes=on_bytes or count, swarm=swarm,
                        )  # fmt: skip
                        return digest.sha256, counted
                finally:
                    claim.release(completed=False)
        finally:
            await mine.close(), await theirs.close()

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_in_a_swarm_a_partial_holders_chunk_is_taken_only_once_its_digest_is_known(
    tmp_path: Path, nodes: dict[str, LiveNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claimer's chunk map lists a chunk as soon as it is written; its settlement (the chunk's BLAKE3 in
    the registry) follows. Here the claimer ``low`` has written its half and settled none of it, and what
    reaches us from it has a byte flipped: taken before their digests are known, those chunks would be
    written unchecked and the whole file would fail its SHA-256. They are not asked for: once the claims
    are overdue the Hub gives them, and the file is whole."""
    monkeypatch.setattr(swarm_module, "FIRST_LANDING_PATIENCE", 0.0)
    monkeypatch.setattr(choosing, "SWARM_PATIENCE", 0.5)
    flipper, hub = Proxy(nodes["low"].url, flip=True), Proxy(nodes["full"].url)
    try:
        sha, _ = swarm_download(tmp_path, flipper.url, hub.url, False, Limits(per_source=2, total=8))
        assert sha == SHA
        assert flipper.chunks == [], "no chunk was asked of the claimer before its digest was known"
        assert sorted(hub.chunks) == list(range(CHUNKS))
    finally:
        flipper.stop(), hub.stop()


def tokenless_pull_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull of a fleet's node without a token: online, no configured servers."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MODELDEPOT_TOKEN", raising=False)
    monkeypatch.delenv("MODELDEPOT_SERVERS", raising=False)


def fleet_pull_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull of a fleet's node: online, with the fleet's token, no configured servers."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("MODELDEPOT_TOKEN", TOKEN)
    monkeypatch.delenv("MODELDEPOT_SERVERS", raising=False)


def test_a_file_that_fails_its_sha256_after_chunks_from_other_nodes_is_fetched_again_from_the_hub_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fleet node holds half of the file as a download in progress, but its bytes are wrong, logged
    with their own BLAKE3s (a node that lies, or a disk that rotted under its log). Outside a swarm its
    chunks can only be checked by the whole file's SHA-256, which fails: the pull does not give up, it
    fetches the file again from the Hub alone, keeps the right bytes and counts none of the liar's. The
    upstream's bytes then say which node sent chunks that are not the file's: it is named and banned for
    long (never named nor banned, every pull that asked it fetched the file twice: an explorer's trial)."""
    cluster = f"mem://liar-{uuid.uuid4().hex[:12]}"
    half = CHUNKS // 2
    banned: list[str] = []
    fleet_pull_env(monkeypatch)
    with (
        Depot(tmp_path / "hub", chunk_size=SMALL_CHUNK) as hub_depot,
        Depot(tmp_path / "liar", chunk_size=SMALL_CHUNK) as liar_depot,
    ):
        hub_depot.import_dir(write_model_dir(tmp_path / "src", {"w.safetensors": DATA}), "acme/w")
        partial = liar_depot.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, wait=False)
        assert partial is not None
        try:
            for index in range(half):
                offset, length = chunk_span(index, len(DATA), SMALL_CHUNK)
                piece = bytearray(DATA[offset : offset + length])
                piece[100] ^= 0x01
                partial.write_chunk(index, memoryview(piece), blake3.blake3(piece).hexdigest())
        finally:
            partial.release(completed=False)
        hub, liar = LiveNode(hub_depot), None
        try:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            liar = InProcessNode(liar_depot, cluster, TOKEN)
            with Depot(tmp_path / "puller", chunk_size=SMALL_CHUNK, cluster=cluster) as puller:
                wait_until(lambda: [(r.blobs, r.partial) for r in puller.peers()] == [(0, 1)], 10,
                           "the liar's partial holding in the view")  # fmt: skip
                with caplog.at_level("WARNING", logger="modeldepot.transfer.pull"):
                    result = puller.pull("acme/w")
                # (one node sent every chunk not the Hub's: left out, and the file fetched again the fleet's way
                # without it; from the upstream alone, each node a liar fooled fetched it whole)
                assert re.search(r"with chunks from \S+ \S+ alone it failed the upstream's SHA-256 \(thrown away\); "
                                 r"fetching the file again without it", caplog.text), caplog.text  # fmt: skip
                # (a store that only pulls from the fleet, never served in it, joins no swarm without a word)
                assert "no live node of the fleet" not in caplog.text, caplog.text
                assert result.bytes_by_source == {"hub": len(DATA)}
                with open(puller.file_path("acme/w", "w.safetensors"), "rb") as stored:
                    assert hashlib.sha256(stored.read()).hexdigest() == SHA
                named = re.search(rf"(\S+ {re.escape(liar.url)}/?) \({half} chunks\) sent chunks that are not the "
                                  r"file's", caplog.text)  # fmt: skip
                assert named is not None, caplog.text
                banned.append(named.group(1))
                assert choosing.BANNED_NODES[banned[0]] > time.monotonic() + 500
                # The store's next pull, in a process of its own, leaves it alone too (the ban lived in one
                # process: a pull a second later asked the liar again and fetched the file twice, an SRE's
                # trial)
                choosing.BANNED_NODES.pop(banned[0]), choosing.LIARS.pop(banned[0])
                from modeldepot.transfer.liars import recall_liars

                recall_liars(puller.home)
                assert choosing.LIARS[banned[0]] > time.monotonic() + 500
            caplog.clear()
            with (
                Depot(tmp_path / "puller-2", chunk_size=SMALL_CHUNK, cluster=cluster) as second,
                caplog.at_level("WARNING", logger="modeldepot.transfer.pull"),
            ):
                wait_until(lambda: [r.partial for r in second.peers()] == [1], 10, "the liar in the view")
                # A fleet node's store (its serve registered it once), pulled while its serve is down: said
                # (the swarm was skipped without a word, and the Hub sent the model once more: an SRE's trial)
                from modeldepot.transfer.chain import FLEET_NODE_SETTING

                noted = json.dumps({"prefix": second.config.cluster_prefix, "at": time.time()})
                with second.store.index.write("a test") as con:
                    con.execute("INSERT INTO settings VALUES (?, ?)", (FLEET_NODE_SETTING, noted))
                assert second.pull("acme/w").bytes_by_source == {"hub": len(DATA)}
            assert "fetching it again" not in caplog.text, "the banned liar was asked again"
            assert (
                "this store is no live node of the fleet (is its `serve --cluster` running?)" in caplog.text
            )
        finally:
            hub.stop()
            if liar is not None:
                liar.stop()
            for name in banned:
                choosing.BANNED_NODES.pop(name, None)
                choosing.LIARS.pop(name, None)


def test_a_settled_chunk_its_claimer_no_longer_has_comes_from_the_hub(
    tmp_path: Path, nodes: dict[str, LiveNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claimer ``low`` settled its half, then lost chunk 0 (its bytes zeroed: it refuses it, 404). Its
    settlement no longer counts as holding the chunk, nor its claim as keeping the Hub from it: chunk 0 is
    asked of ``low`` once, then comes from the Hub; the rest of the half still comes from ``low``. (Half
    settled, this node starts as a late one: it waits for the swarm's claims to stand still, here 0.5 s,
    before it claims the other half; that wait is not what is tested.)"""
    monkeypatch.setattr(choosing, "SWARM_PATIENCE", 0.5)
    lose_chunk_0(nodes["low"])
    low, hub = Proxy(nodes["low"].url), Proxy(nodes["full"].url)
    try:
        sha, counted = swarm_download(tmp_path, low.url, hub.url, True, Limits(per_source=1, total=4))
        assert sha == SHA
        assert low.chunks.count(0) == 1, low.chunks
        assert 0 in hub.chunks and set(hub.chunks) <= {0, *range(CHUNKS // 2, CHUNKS)}, hub.chunks
        from_low = (CHUNKS // 2 - 1) * SMALL_CHUNK
        assert counted == {"peer": from_low, "hub": len(DATA) - from_low}
    finally:
        low.stop(), hub.stop()


def test_a_claimer_with_no_copy_for_a_chunk_it_settled_stays_a_source_for_the_rest(
    tmp_path: Path, nodes: dict[str, LiveNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that removed the file and pulls it again at once: what it settled of the copy that went is in
    the view a moment longer, and a chunk asked of it by that is a plain 404. It was dropped for the whole
    file, its fresh claims taken for void and fetched from the Hub again (1.26-1.52 times the model with four
    nodes: an explorer's trial). That chunk comes from the Hub; the node stays a source for the rest."""
    monkeypatch.setattr(choosing, "SWARM_PATIENCE", 0.5)
    low, hub = Proxy(nodes["low"].url, gone=frozenset({0})), Proxy(nodes["full"].url)
    try:
        sha, counted = swarm_download(tmp_path, low.url, hub.url, True, Limits(per_source=1, total=4))
        assert sha == SHA
        assert low.chunks.count(0) == 1, low.chunks
        from_low = (CHUNKS // 2 - 1) * SMALL_CHUNK
        assert counted == {"peer": from_low, "hub": len(DATA) - from_low}, counted
    finally:
        low.stop(), hub.stop()


def test_a_claimer_that_never_answers_is_given_up_on_in_seconds_not_a_read_timeout(
    tmp_path: Path, nodes: dict[str, LiveNode]
) -> None:
    """The claimer of the low half settled it and is then reached at an address that accepts and never
    answers (frozen, or a wrong --advertise): its chunk map was waited for the whole read timeout, and a
    3-node swarm took 35 s instead of 8 (an explorer's trial). A node that sends no byte in SILENT_PEER
    seconds is given up on, and its chunks come from the Hub."""
    silent, hub = SilentAddress(), Proxy(nodes["full"].url)
    try:
        sha, counted = swarm_download(
            tmp_path, silent.url, hub.url, True, Limits(per_source=2, total=4), read_timeout=600
        )
        assert sha == SHA and counted == {"hub": len(DATA)}
        assert any("/chunks" in line for line in silent.asked), silent.asked
    finally:
        silent.close(), hub.stop()


def test_a_claimer_that_stops_answering_ranges_is_given_up_on_in_seconds(
    tmp_path: Path, nodes: dict[str, LiveNode], caplog: pytest.LogCaptureFixture
) -> None:
    """The claimer of the low half answers its chunk map, then no range (frozen since): each of its claims
    stood while a request to it was outstanding, until the read timeout, and the next request to it waited
    as long. A peer whose request brings no byte in SILENT_PEER seconds is dropped for the file, its claims
    void, and the Hub gives its chunks. (SWARM_PATIENCE stays as it is: the patience grows with the age of
    the requests in flight, so a lone hung one was never "stuck". The late node's wait for the swarm's claims
    to stand still, 10 s of it, is not what is tested.)"""
    hung, hub = Proxy(nodes["low"].url, hang=True), Proxy(nodes["full"].url)
    try:
        with caplog.at_level(logging.INFO, logger="modeldepot.transfer.download"):
            sha, counted = swarm_download(
                tmp_path, hung.url, hub.url, True, Limits(per_source=1, total=4), read_timeout=600
            )
        assert sha == SHA and counted == {"hub": len(DATA)}
        assert len(hung.chunks) == 1, f"asked once, then dropped: {hung.chunks}"
        dropped = [r.getMessage() for r in caplog.records if "no longer asking" in r.getMessage()]
        assert any(hung.url in m and "did not answer in" in m for m in dropped), dropped
    finally:
        hung.stop(), hub.stop()


def test_a_byte_callback_that_raises_fails_the_swarm_download_at_once(
    tmp_path: Path, nodes: dict[str, LiveNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claimer's chunks come from a source that joined the download on its way (the swarm's view),
    not from one it started with. When the caller's byte callback raises for them, the download fails
    with that error at once; it used to wait for the hasher forever (here: the 60 s timeout)."""
    monkeypatch.setattr(choosing, "SWARM_PATIENCE", 0.5)

    def broken(amount: int, kind: str, base_url: str) -> None:
        if kind == "peer":
            raise RuntimeError("the caller's callback broke")

    low, hub = Proxy(nodes["low"].url), Proxy(nodes["full"].url)
    try:
        with pytest.raises(RuntimeError, match="callback broke"):
            swarm_download(tmp_path, low.url, hub.url, True, Limits(per_source=1, total=4), broken)
    finally:
        low.stop(), hub.stop()


class FlipOnce(Proxy):
    """The Hub: one byte of the first ranged answer of the file's last chunk altered, once (a transient
    corruption, or an upstream that lied once); every other answer forwarded as it is."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.flipped = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        wanted = _RANGE.fullmatch(request.headers.get("Range", ""))
        self.flip = bool(
            wanted is not None and not self.flipped and int(wanted.group(1)) // SMALL_CHUNK == CHUNKS - 1
        )
        if self.flip:
            self.flipped = True
        return await super().handle(request)


def test_an_honest_partial_holder_is_not_banned_when_the_hubs_chunk_was_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One node sent every chunk the Hub did not, and the file failed its SHA-256: the Hub's chunk was the bad
    one. Banned for ten minutes as the liar at once (and in the store's other pulls), the honest node was
    named in the log for the Hub's fault (a review): it is left out of the retry alone, and banned only when
    the upstream's bytes say its chunks were not the file's."""
    cluster = f"mem://honest-{uuid.uuid4().hex[:12]}"
    half = CHUNKS // 2
    fleet_pull_env(monkeypatch)
    with (
        Depot(tmp_path / "hub", chunk_size=SMALL_CHUNK) as hub_depot,
        Depot(tmp_path / "honest", chunk_size=SMALL_CHUNK) as honest_depot,
    ):
        hub_depot.import_dir(write_model_dir(tmp_path / "src", {"w.safetensors": DATA}), "acme/w")
        assert write_partial(honest_depot, DATA, list(range(half))) == SHA  # right bytes
        hub = LiveNode(hub_depot)
        proxy = FlipOnce(hub.url)
        honest = None
        banned_names: list[str] = []
        banned_before = set(choosing.LIARS)  # (other tests' liars, in this process)
        try:
            monkeypatch.setenv("HF_ENDPOINT", proxy.url)
            honest = InProcessNode(honest_depot, cluster, TOKEN)
            with Depot(tmp_path / "puller", chunk_size=SMALL_CHUNK, cluster=cluster) as puller:
                wait_until(lambda: [(r.blobs, r.partial) for r in puller.peers()] == [(0, 1)], 10,
                           "the honest partial holding in the view")  # fmt: skip
                with caplog.at_level("WARNING", logger="modeldepot.transfer.pull"):
                    result = puller.pull("acme/w")
                assert result.files == 1
                assert proxy.flipped, "the Hub's bad chunk was sent"
                with open(puller.file_path("acme/w", "w.safetensors"), "rb") as stored:
                    assert hashlib.sha256(stored.read()).hexdigest() == SHA
                now = time.monotonic()
                banned_names = [
                    n for n, until in choosing.LIARS.items() if until > now and n not in banned_before
                ]
                assert banned_names == [], (
                    f"an honest node, whose every chunk was the file's, banned as a liar: {banned_names}"
                )
        finally:
            proxy.stop(), hub.stop()
            if honest is not None:
                honest.stop()
            for name in set(choosing.LIARS) - banned_before:
                choosing.BANNED_NODES.pop(name, None)
                choosing.LIARS.pop(name, None)


def test_a_pull_whose_process_stood_still_does_not_blame_its_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """This process stands still for 7 s in the middle of a pull from a node that holds the file (here its
    event loop is blocked; a SIGSTOP, a paused container): when it went on, the pace it measured over its own
    stop judged the node slow, and the Hub was brought in for what the node holds (an explorer's trial). The
    peers are judged again from the moment it goes on."""
    big = random.Random(17).randbytes(48 << 20)
    sha = hashlib.sha256(big).hexdigest()
    cluster = f"mem://stood-{uuid.uuid4().hex[:12]}"
    fleet_pull_env(monkeypatch)
    with (
        Depot(tmp_path / "hub", chunk_size=SMALL_CHUNK) as hub_depot,
        Depot(tmp_path / "holder", chunk_size=SMALL_CHUNK) as holder_depot,
    ):
        for depot in (hub_depot, holder_depot):
            depot.import_dir(write_model_dir(tmp_path / "src", {"w.safetensors": big}), "acme/w")
        hub = LiveNode(hub_depot)
        holder = None
        try:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            holder = InProcessNode(holder_depot, cluster, TOKEN)
            stood: list[float] = []

            def stand_still(update: PullUpdate) -> None:
                if not stood and update.done > 0 and update.path == "w.safetensors":
                    stood.append(time.monotonic())
                    time.sleep(7)  # (the pull's loop runs nothing meanwhile)

            with Depot(tmp_path / "puller", chunk_size=SMALL_CHUNK, cluster=cluster) as puller:
                wait_until(lambda: [r.blobs for r in puller.peers()] == [1], 10, "the holder in the view")
                with caplog.at_level("INFO", logger="modeldepot.transfer"):
                    result = puller.pull("acme/w", progress=stand_still)
                assert stood and result.files == 1
                with open(puller.file_path("acme/w", "w.safetensors"), "rb") as stored:
                    assert hashlib.sha256(stored.read()).hexdigest() == sha
            assert "the upstream joins" not in caplog.text and "did not answer in" not in caplog.text
            assert "the upstream is tried" not in caplog.text, caplog.text
            assert result.bytes_by_source.get("hub", 0) == 0, result.bytes_by_source
        finally:
            hub.stop()
            if holder is not None:
                holder.stop()


def test_a_node_without_a_token_claims_no_chunk_of_a_private_repos_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node without a token serves no private repo's download to its peers, nor names its blobs in the
    registry: its claims on a private file's chunks held the others back for chunks they could not take from
    it, and its pull waited at its end for a holding it never publishes (a review). It claims none; a public
    repo's file, it claims as before."""
    cluster = f"mem://private-{uuid.uuid4().hex[:12]}"
    tokenless_pull_env(monkeypatch)
    other = random.Random(8).randbytes(len(DATA))
    with Depot(tmp_path / "hub", chunk_size=SMALL_CHUNK) as hub_depot:
        hub_depot.import_dir(
            write_model_dir(tmp_path / "s", {"w.safetensors": DATA}), "acme/secret", private=True
        )
        hub_depot.import_dir(write_model_dir(tmp_path / "o", {"w.safetensors": other}), "acme/open")
        hub = LiveNode(hub_depot, token="hub-secret")
        node = None
        try:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            monkeypatch.setenv("HF_TOKEN", "hub-secret")
            with Depot(tmp_path / "node", chunk_size=SMALL_CHUNK, cluster=cluster) as depot:
                node = InProcessNode(depot, cluster)
                wait_until(lambda: len(depot.peers()) == 1, 10, "the node in the view")
                secret = depot.pull("acme/secret")
                assert secret.bytes_by_source == {"hub": len(DATA)}
                assert secret.swarm == {}, "no chunk of a private file claimed"
                public = depot.pull("acme/open")
                assert public.swarm.get("claims_won", 0) == CHUNKS, public.swarm
        finally:
            if node is not None:
                node.stop()
            hub.stop()


def test_a_node_without_a_token_claims_no_chunk_of_a_repo_its_store_keeps_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo its operator keeps private here stays so when a pull publishes a revision the Hub calls public
    (the pull's manifest is private when the store or the Hub says so): its node without a token names none
    of its blobs to its peers, so its pull claims none of the file's chunks, where a public repo's pull claims
    them all (a review feared the Hub's word alone decided). (One hidden on its upstream's word is shown
    again as the upstream shows it: test_mirror.)"""
    cluster = f"mem://kept-{uuid.uuid4().hex[:12]}"
    tokenless_pull_env(monkeypatch)
    newer = random.Random(9).randbytes(len(DATA))
    with Depot(tmp_path / "hub", chunk_size=SMALL_CHUNK) as hub_depot:
        hub_depot.import_dir(write_model_dir(tmp_path / "s", {"w.safetensors": DATA}), "acme/open")
        hub_depot.import_dir(write_model_dir(tmp_path / "n", {"w.safetensors": newer}), "acme/kept")
        hub = LiveNode(hub_depot)
        node = None
        try:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            with Depot(tmp_path / "node", chunk_size=SMALL_CHUNK, cluster=cluster) as depot:
                node = InProcessNode(depot, cluster)
                wait_until(lambda: len(depot.peers()) == 1, 10, "the node in the view")
                assert depot.pull("acme/open").swarm.get("claims_won", 0) == CHUNKS
                mine = write_model_dir(tmp_path / "mine", {"w.safetensors": random.Random(10).randbytes(99)})
                depot.import_dir(mine, "acme/kept", private=True)  # (the operator's word)
                kept = depot.pull("acme/kept")
                assert kept.bytes_by_source == {"hub": len(newer)}
                assert kept.swarm == {}, "no chunk of a file its store keeps private claimed"
                assert depot.store.repo_private("acme/kept")
        finally:
            if node is not None:
                node.stop()
            hub.stop()
