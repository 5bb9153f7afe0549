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
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp import web

from conftest import ForwardingProxy, free_port, wait_for_port, wait_until, write_model_dir
from fleetnodes import Fleet, Node, base_env, modeldepot

MiB = 1 << 20
CHUNK = 4 * MiB
TOKEN = "swarm-fleet-secret"
REPO = "acme/big"
BIG = "model.safetensors"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class HubProxy(ForwardingProxy):
    """Forwards to the Hub node, streaming; counts, per chunk of the big file, the body bytes it sent.

    ``on_chunk(index)`` is called as a ranged request for the big file starts (a test's trigger)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.sent: Counter[int] = Counter()  # chunk index -> body bytes sent
        self.requests: Counter[int] = Counter()
        self.on_chunk: Any = None
        self.seconds_per_mib = 0.0  # a slow uplink, per connection (0: as fast as it goes)
        super().__init__("hub-proxy")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        wanted = _RANGE.fullmatch(request.headers.get("Range", ""))
        chunk = int(wanted.group(1)) // CHUNK if wanted and request.path.endswith(f"/{BIG}") else None
        if chunk is not None:
            self.requests[chunk] += 1
            if self.on_chunk is not None:
                self.on_chunk(chunk)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("range", "authorization")}
        body = await request.read() if request.can_read_body else None
        async with self.session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body, allow_redirects=False) as upstream:  # fmt: skip
            out = {k: v for k, v in upstream.headers.items()
                   if k.lower() not in ("transfer-encoding", "connection", "content-encoding")}  # fmt: skip
            response = web.StreamResponse(status=upstream.status, headers=out)
            await response.prepare(request)
            if request.method != "HEAD":
                async for piece in upstream.content.iter_chunked(1 << 20):
                    if self.seconds_per_mib and chunk is not None:
                        await asyncio.sleep(self.seconds_per_mib * len(piece) / MiB)  # the slow link itself
                    await response.write(piece)
                    if chunk is not None:
                        self.sent[chunk] += len(piece)
            await response.write_eof()
            return response

    def total(self) -> int:
        return sum(self.sent.values())


class Hub:
    """The Hub: a store holding the repo, served by ``modeldepot serve`` (no cluster, no token), behind a
    :class:`HubProxy`."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        home = root / "hub"
        env = base_env(MODELDEPOT_CHUNK_SIZE=str(CHUNK))
        modeldepot(
            "import",
            str(write_model_dir(root / "hub-src", files)),
            "--repo",
            REPO,
            "--home",
            str(home),
            env=env,
        )
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


@pytest.fixture(autouse=True)
def no_pull_left() -> Iterator[None]:
    """A test that failed with pulls still running (their pipes open) kills and reaps them."""
    yield
    while Pull.running:
        Pull.running.pop().kill()


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
    """Start nodes (with the token, 4 MiB chunks) and wait until every node of the fleet sees them all."""
    nodes = [fleet.node(name, TOKEN, *extra, env=node_env()) for name in names]
    for node in fleet.nodes:
        if not node.id:
            node.ready()
    everyone = {n.id for n in fleet.nodes}
    for node in nodes:
        wait_until(lambda n=node: n.peer_ids() >= everyone, 20, f"{node.home.name} sees the fleet")  # type: ignore[misc]
    return nodes


class Pull:
    """``modeldepot pull REPO --cluster`` on a node's store, as a process of its own."""

    running: ClassVar[
        list[Pull]
    ] = []  # killed after each test, so that a failed one leaves no process behind

    def __init__(self, node: Node, hub: Hub, token: str = TOKEN, **extra: str) -> None:
        self.node = node
        Pull.running.append(self)
        settings = {"MODELDEPOT_TOKEN": token, "HF_ENDPOINT": hub.proxy.url, "MODELDEPOT_CHUNK_SIZE": str(CHUNK),
                    "MODELDEPOT_READ_TIMEOUT": "5", **extra}  # fmt: skip
        env = base_env(**settings)
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modeldepot", "pull", REPO, "--home", str(node.home), "--cluster",
             node.cluster, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.seconds = 0.0
        self.stderr = ""

    def result(self, timeout: float = 240) -> dict[str, Any]:
        out, err = self.process.communicate(timeout=timeout)
        self.seconds = time.monotonic() - self.started
        self.stderr = err
        (self.node.home.parent / f"{self.node.home.name}-pull.log").write_text(err)  # kept beside the node's
        assert self.process.returncode == 0, (
            f"pull on {self.node.home.name} exited {self.process.returncode}:\n{err}"
        )
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
    from_peers = sum(r["bytes_by_source"].get("peer", 0) for r in results)
    assert from_peers >= (len(nodes) - 1.1) * size  # the other copies went from node to node
    for result, node in zip(results, nodes, strict=True):  # `sources` left out the swarm's claimers
        if result["bytes_by_source"].get("peer"):
            assert set(result["sources"]) - {hub.proxy.url} <= {n.url for n in nodes} - {node.url}
            assert set(result["sources"]) & ({n.url for n in nodes} - {node.url}), result["sources"]
    assert fleet.dump_claims() == {}  # released when the pulls ended


def test_a_claimer_killed_midway_loses_nothing_and_its_chunks_come_from_the_hub_once_more(
    fleet: Fleet, hub: Hub, big_file: bytes
) -> None:
    """Node a (its server and its pull) is SIGKILLed once the Hub has been asked for a third of the chunks:
    b and c finish, byte-identical; a chunk a claimed and never shared is fetched again, by one node."""
    nodes = start_nodes(fleet, ["a", "b", "c"])
    victim = nodes[0]
    killed = threading.Event()
    chunks = -(-len(big_file) // CHUNK)
    pulls: list[Pull] = []

    def on_chunk(_index: int) -> None:
        if sum(hub.proxy.requests.values()) >= chunks // 3 and not killed.is_set():
            killed.set()
            victim.kill()
            pulls[0].process.kill()

    hub.proxy.seconds_per_mib = 0.05  # the Hub is slower than the peers: a is killed with claims in flight
    hub.proxy.on_chunk = on_chunk
    pulls.extend(Pull(node, hub) for node in nodes)
    results = [pull.result() for pull in pulls[1:]]
    pulls[0].kill()
    assert killed.is_set()
    expected = hashlib.sha256(big_file).hexdigest()
    assert [stored_sha256(node) for node in nodes[1:]] == [expected, expected]
    print(f"hub sent {hub.proxy.total() / len(big_file):.3f}x, per chunk at most "
          f"{max(hub.proxy.sent.values()) / CHUNK:.2f} chunks; {[r['bytes_by_source'] for r in results]}")  # fmt: skip
    assert max(hub.proxy.sent.values()) <= 2 * CHUNK, {i: n for i, n in hub.proxy.sent.items() if n > CHUNK}
    assert hub.proxy.total() <= 1.5 * len(big_file)


def test_a_node_joining_late_takes_nothing_from_the_hub(fleet: Fleet, hub: Hub, big_file: bytes) -> None:
    """d starts pulling once the Hub has sent a quarter of the file to a, b and c, still downloading: every
    byte of the model comes from them (only the repo's two small git files come from the Hub)."""
    nodes = start_nodes(fleet, ["a", "b", "c", "d"])
    hub.proxy.seconds_per_mib = 0.25
    early = [Pull(node, hub) for node in nodes[:3]]
    wait_until(lambda: hub.proxy.total() >= len(big_file) // 4, 120, "a quarter of the file from the Hub")
    assert all(pull.process.poll() is None for pull in early)
    late = Pull(nodes[3], hub)
    result = late.result()
    for pull in early:
        pull.result()
    expected = hashlib.sha256(big_file).hexdigest()
    assert [stored_sha256(node) for node in nodes] == [expected] * 4
    small = len(GITATTRIBUTES) + len(b'{"model_type": "bert"}')
    print(f"late node: {result['bytes_by_source']}; hub sent {hub.proxy.total() / len(big_file):.3f}x")
    assert result["bytes_by_source"].get("hub", 0) <= small
    assert result["bytes_by_source"]["peer"] == len(big_file)
    assert hub.proxy.total() <= 1.1 * len(big_file)


def test_a_node_with_another_token_costs_the_hub_its_own_copy_alone_and_says_so_in_its_health(
    fleet: Fleet, hub: Hub, big_file: bytes
) -> None:
    """An explorer's trial: a node started with another MODELDEPOT_TOKEN pulled with two good ones; each side
    took the other's claims over as void (neither could read the other), and the good nodes fetched 1.4 times
    the file from the Hub between them (2.4 in all), while every health said "ok". The odd node claims nothing
    once the fleet refuses it now (its copy, 1x, is the whole cost), and its health says why."""
    good = start_nodes(fleet, ["a", "b"])
    odd = fleet.node("odd", "another-token", env=node_env()).ready()
    everyone = {node.id for node in fleet.nodes}
    wait_until(
        lambda: odd.peer_ids() >= everyone and good[0].peer_ids() >= everyone, 20, "one fleet of three"
    )
    hub.proxy.seconds_per_mib = 0.02
    first = Pull(odd, hub, token="another-token")
    wait_until(lambda: hub.proxy.total() >= 24 * MiB, 60, "the odd node to have started")
    pulls = [Pull(node, hub) for node in good]
    results = [pull.result() for pull in pulls]
    first.result()
    expected = hashlib.sha256(big_file).hexdigest()
    assert [stored_sha256(node) for node in [*good, odd]] == [expected] * 3
    from_hub = [r["bytes_by_source"].get("hub", 0) for r in results]
    print(f"hub sent {hub.proxy.total() / len(big_file):.3f}x; the good nodes took {from_hub} from it")
    assert sum(from_hub) <= 1.15 * len(big_file), from_hub  # (1.4 times before)
    assert hub.proxy.total() <= 2.2 * len(big_file)
    wait_until(lambda: odd.get("/health", token=False)["status"] == "degraded", 15, "the odd node's health")
    said = odd.get("/health", token=False)
    assert "refuse this node's requests" in said["detail"] and "MODELDEPOT_TOKEN" in said["detail"], said
    assert all(node.get("/health", token=False)["status"] == "ok" for node in good)


class PeerProxy(ForwardingProxy):
    """What peers reach a node through (its ``--advertise``): ranged answers get a byte flipped
    (``flip``), never answered (``stall``), or trickled at 5 KB/s (``trickle``); the rest passes."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.upstream = ""
        self.faulty = 0  # ranged blob requests it spoiled
        self.released: asyncio.Event | None = None  # set at stop: stalled answers end
        super().__init__(f"peer-proxy-{mode}")

    async def started(self) -> None:
        self.released = asyncio.Event()

    async def stopping(self) -> None:
        assert self.released is not None
        self.released.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("range", "authorization")}
        async with self.session.get(self.upstream + request.path_qs, headers=headers) as upstream:
            body = await upstream.read()
            out = {k: v for k, v in upstream.headers.items()
                   if k.lower() not in ("transfer-encoding", "connection", "content-encoding", "content-length")}  # fmt: skip
        if upstream.status != 206:  # ranged answers of the blob route or of resolve (x, done, is a scan node)
            return web.Response(status=upstream.status, body=body, headers=out)
        self.faulty += 1
        if self.mode == "stall":
            assert self.released is not None
            await self.released.wait()  # never answered while the test runs
        if self.mode == "flip":
            body = body[:100] + bytes([body[100] ^ 0x01]) + body[101:]
        response = web.StreamResponse(status=206, headers=out)
        response.content_length = len(body)
        await response.prepare(request)
        step = 512 if self.mode == "trickle" else len(body)
        for start in range(0, len(body), step):
            if self.mode == "trickle":
                await asyncio.sleep(0.1)  # the fault itself (a slow link), not a synchronisation
            await response.write(body[start : start + step])
        return response


@pytest.mark.parametrize("mode", ["flip", "stall", "trickle"])
def test_a_lying_stalling_or_trickling_peer_does_not_spoil_or_hold_up_the_pull(
    fleet: Fleet, hub: Hub, big_file: bytes, mode: str
) -> None:
    """Node x pulls too, and claims its share of the chunks, but peers reach it through a proxy that
    flips a byte (x is banned at the first bad chunk: its chunks come from the Hub instead, the results are
    right), never answers, or trickles (the endgame and the take-over of its claims finish the pull without
    it: the pull ends, here long before the trickle could have sent one chunk)."""
    proxy = PeerProxy(mode)
    try:
        x = fleet.node("x", TOKEN, "--advertise", proxy.url, env=node_env())
        proxy.upstream = x.url
        nodes = [*start_nodes(fleet, ["a", "b"]), x]
        hub.proxy.seconds_per_mib = 0.02
        # x starts first, so that it holds claims the others need (else it might be the one that follows)
        first = Pull(x, hub)
        wait_until(lambda: sum(hub.proxy.requests.values()) >= 4, 60, "x's first claims from the Hub")
        pulls = [*(Pull(node, hub) for node in nodes[:2]), first]
        results = [pull.result(timeout=200) for pull in pulls]
        expected = hashlib.sha256(big_file).hexdigest()
        assert [stored_sha256(node) for node in nodes] == [expected] * 3
        print(f"{mode}: {proxy.faulty} spoiled answers; hub sent {hub.proxy.total() / len(big_file):.3f}x; "
              f"{[r['bytes_by_source'] for r in results]}; {[round(p.seconds, 1) for p in pulls]} s")  # fmt: skip
        assert proxy.faulty > 0  # x was asked, and failed them
        if mode == "flip":
            # a and b each banned x at its first bad chunk (4 requests in flight at most), for 30 s at a time
            bans = 1 + int(max(p.seconds for p in pulls) // 30)
            assert proxy.faulty <= 2 * 5 * bans, (proxy.faulty, [p.seconds for p in pulls])
            logs = "".join(pull.stderr for pull in pulls[:2])
            assert "failed its BLAKE3 check" in logs and proxy.url in logs
    finally:
        proxy.stop()


def test_a_node_on_a_narrow_link_leaves_its_claims_to_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    """Four nodes pull at once; node n reaches the Hub through a narrow link (8 s a MiB per connection), the
    others through a fast one. n's claims would land long after the swarm's typical time: the others took
    them over and fetched them again while n went on receiving each (a node on 20 Mbit among 200 Mbit ones
    had the Hub send 1.11-1.21 times the model, an explorer's trial). n gives them up before the others
    judge them late, and takes those chunks from whoever fetches them: the Hub sends the file about once."""
    size = 64 * MiB
    files = {".gitattributes": GITATTRIBUTES, "config.json": b"{}", BIG: random_bytes(size, seed=41)}
    hub = Hub(tmp_path, files)
    narrow = HubProxy(f"http://127.0.0.1:{hub.port}")
    narrow.seconds_per_mib = 8.0
    try:
        nodes = start_nodes(fleet, ["a", "b", "c", "n"])
        # n starts first, so that it holds claims (the others would be done before its first one)
        first = Pull(nodes[3], hub, HF_ENDPOINT=narrow.url, MODELDEPOT_READ_TIMEOUT="30")
        wait_until(lambda: sum(narrow.requests.values()) >= 2, 60, "n's first claims from the Hub")
        pulls = [*(Pull(node, hub) for node in nodes[:3]), first]
        results = [pull.result(timeout=200) for pull in pulls]
        sent = {"fast": hub.proxy.total(), "narrow": narrow.total()}
    finally:
        narrow.stop()
        hub.stop()
    expected = hashlib.sha256(files[BIG]).hexdigest()
    assert [stored_sha256(node) for node in nodes] == [expected] * 4
    print(f"hub sent {sum(sent.values()) / size:.3f}x {sent}; n: {results[3]['swarm']} "
          f"{results[3]['bytes_by_source']}; {[round(p.seconds, 1) for p in pulls]} s")  # fmt: skip
    assert narrow.requests, "n claimed no chunk of its own: nothing was tried"
    assert results[3]["swarm"].get("claims_given_up", 0) >= 1, results[3]["swarm"]
    assert sum(sent.values()) <= 1.035 * size, sent  # (1.069 times before: the others fetched n's again)


def test_a_fleet_without_a_token_shares_what_it_pulls(fleet: Fleet, tmp_path: Path) -> None:
    """Nodes started without a token served no download in progress to anyone (it might be a private
    repo's): three nodes pulling a public model of four shards each fetched all of it from the Hub (three
    times the model). A pull of a public repo marks its downloads as shareable: the Hub sends it once."""
    files = {".gitattributes": GITATTRIBUTES, "config.json": b'{"model_type": "bert"}'}
    for n in range(4):
        files[f"model-0000{n + 1}-of-00004.safetensors"] = random_bytes(24 * MiB - 12345 * n, seed=20 + n)
    size = sum(len(data) for data in files.values())
    hub = Hub(tmp_path, files)
    try:
        nodes = [fleet.node(name, None, env=node_env()) for name in ("a", "b", "c")]
        for node in nodes:
            node.ready()
        everyone = {n.id for n in nodes}
        for node in nodes:
            wait_until(lambda n=node: n.peer_ids() >= everyone, 20, f"{node.home.name} sees the fleet")  # type: ignore[misc]
        env = {k: v for k, v in base_env(HF_ENDPOINT=hub.proxy.url, MODELDEPOT_CHUNK_SIZE=str(CHUNK)).items()
               if k != "MODELDEPOT_TOKEN"}  # fmt: skip
        pulls = [subprocess.Popen([sys.executable, "-m", "modeldepot", "pull", REPO, "--home", str(node.home),
                                   "--cluster", node.cluster, "--json"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for node in nodes]  # fmt: skip
        results, logs = [], []
        for pull in pulls:
            out, err = pull.communicate(timeout=240)
            assert pull.returncode == 0, err
            results.append(json.loads(out))
            logs.append(err)
    finally:
        hub.stop()
    from_hub = sum(r["bytes_by_source"].get("hub", 0) for r in results)
    assert from_hub <= 1.2 * size, ([r["bytes_by_source"] for r in results], logs)
    assert sum(r["bytes_by_source"].get("peer", 0) for r in results) >= 1.5 * size


def test_a_pull_keeps_its_claims_until_its_node_is_seen_holding_what_it_pulled(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A pull released its claims as it ended, and its node's serve publishes what the store holds once a
    second: a node that asked in between found the last files neither claimed nor held, and fetched them
    from the Hub again (1.25x the model in CI). As the pull ends, the fleet sees its node holding them."""
    files = {".gitattributes": GITATTRIBUTES, "config.json": b'{"model_type": "bert"}'}
    for n in range(4):
        files[f"model-0000{n + 1}-of-00004.safetensors"] = random_bytes(8 * MiB + 1000 * n, seed=40 + n)
    hub = Hub(tmp_path, files)
    try:
        [node, _] = start_nodes(fleet, ["a", "b"])
        Pull(node, hub).result(timeout=200)
        held = fleet.holdings(node.id)
        shards = {
            hashlib.sha256(data).hexdigest() for path, data in files.items() if path.endswith(".safetensors")
        }
        assert shards <= set(held), (sorted(shards - set(held)), node.log_text()[-2000:])
        assert all(held[sha]["complete"] for sha in shards), held
    finally:
        hub.stop()


def test_a_swarm_whose_hub_dies_for_good_fails_at_the_outage_patience(fleet: Fleet, tmp_path: Path) -> None:
    """The Hub goes away for good while two nodes pull one file from it together: each pull fails once it
    has heard nothing for MODELDEPOT_OUTAGE_PATIENCE, as its warning says. Before, each node kept its claims
    on the chunks it could no longer fetch, and the other waited for them to go late (a trial: 19 s for a
    patience of 8; 60 s once no claim had landed yet)."""
    size = 48 * MiB
    files = {".gitattributes": GITATTRIBUTES, "config.json": b"{}", BIG: random_bytes(size, seed=29)}
    hub = Hub(tmp_path, files)
    try:
        nodes = start_nodes(fleet, ["a", "b"])
        hub.proxy.seconds_per_mib = 2.0  # a slow uplink: the Hub goes before any claimed chunk lands
        patience = 5
        pulls = [Pull(node, hub, MODELDEPOT_OUTAGE_PATIENCE=str(patience), MODELDEPOT_LOG_LEVEL="info")
                 for node in nodes]  # fmt: skip
        wait_until(lambda: hub.proxy.total() >= MiB, 60, "the Hub sends the file")
    finally:
        stopped = time.monotonic()
        hub.stop()
    for pull in pulls:
        out, err = pull.process.communicate(timeout=120)
        waited = time.monotonic() - stopped
        print(
            f"{pull.node.home.name}: exit {pull.process.returncode} {waited:.1f} s after the Hub went:\n{err}"
        )
        assert pull.process.returncode != 0, out
        [said] = [line for line in err.splitlines() if line.startswith("error:")]
        assert (
            f"no source answered for {patience} s: MODELDEPOT_OUTAGE_PATIENCE" in said
        )  # an outage, said so
        # (the Hub's answers in flight end within 5 s of its stop; then the patience and a try's attempts)
        assert waited < 5 + patience + 8, f"{pull.node.home.name} failed {waited:.1f} s after the Hub went"


def test_pulls_that_start_while_etcd_is_down_share_the_rest_once_it_is_back(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Two nodes start pulling one file while etcd is down: each fetches from the Hub on its own. Once etcd is
    back (and their servers registered again), each file joins the swarm: the chunks each holds or fetches
    are claimed, and the rest comes from the Hub once. Before, the swarm was decided once per file, at its
    start: the Hub sent the whole file to every node (2.0× here)."""
    size = 64 * MiB
    data = random_bytes(size, seed=31)
    hub = Hub(tmp_path, {".gitattributes": GITATTRIBUTES, "config.json": b"{}", BIG: data})
    try:
        nodes = start_nodes(fleet, ["a", "b"])
        fleet.etcd.kill()
        # 4 connections: 32 s for the file alone, time enough for etcd to come back and both to join on a
        # loaded machine (at 16 s, one pull of a CI run was done before its node was registered again)
        hub.proxy.seconds_per_mib = 2.0
        pulls = [Pull(node, hub, MODELDEPOT_LOG_LEVEL="info") for node in nodes]
        # (both: each has its download's log; the Hub's requests alone could be one pull's, the other started
        # once etcd was back, in the swarm from its start, as a CI run had it)
        wait_until(lambda: all(list((n.home / "partials").glob("*.log")) for n in nodes) and
                   len(hub.proxy.requests) >= 4, 60, "both pulls fetch from the Hub")  # fmt: skip
        fleet.etcd.start()  # same data, same ports
        results = [pull.result() for pull in pulls]
    finally:
        hub.stop()
    expected = hashlib.sha256(data).hexdigest()
    assert [stored_sha256(node) for node in nodes] == [expected, expected]
    joined = [pull.stderr.count("the fleet's swarm is in reach") for pull in pulls]
    print(f"hub sent {hub.proxy.total() / size:.3f}x; swarm {[r.get('swarm') for r in results]}; "
          f"by source {[r['bytes_by_source'] for r in results]}; joined {joined}")  # fmt: skip
    # Each joined once; or (a start slowed down on a loaded machine) one began after etcd was back, in the
    # swarm from its start, and the other joined it
    assert all(count <= 1 for count in joined) and sum(joined) >= 1, joined
    assert sum(r["bytes_by_source"].get("peer", 0) for r in results) > 0, "chunks went from node to node"
    assert hub.proxy.total() <= 1.6 * size, dict(hub.proxy.sent)
    assert fleet.dump_claims() == {}  # released when the pulls ended


def test_an_etcd_stalled_longer_than_the_lease_mid_pull_costs_the_hub_little_more_than_one_copy(
    fleet: Fleet, tmp_path: Path
) -> None:
    """etcd stops answering (SIGSTOP: a hung etcd, or a partition) for longer than the nodes' 10 s leases while
    two nodes pull a file: every claim and settlement went with the leases. Nothing claimed again what each
    node held or fetched, so each fetched from the Hub what the other had (an explorer's trial: the Hub sent
    the model 1.75-2.0 times). Each node's pull claims again, as soon as etcd answers, the chunks it holds or
    fetches from the Hub and lost (or fetched unclaimed while etcd was silent)."""
    size = 64 * MiB
    data = random_bytes(size, seed=37)
    hub = Hub(tmp_path, {".gitattributes": GITATTRIBUTES, "config.json": b"{}", BIG: data})
    process = fleet.etcd.process
    assert process is not None
    try:
        nodes = start_nodes(fleet, ["a", "b"])
        hub.proxy.seconds_per_mib = 1.0  # 4 s a chunk per connection: the pull outlives the stall
        pulls = [Pull(node, hub, MODELDEPOT_LOG_LEVEL="info") for node in nodes]
        wait_until(lambda: len(hub.proxy.requests) >= 6, 60, "both pulls fetch from the Hub")
        process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(13)  # past the 10 s lease
        finally:
            process.send_signal(signal.SIGCONT)
        results = [pull.result() for pull in pulls]
    finally:
        hub.stop()
    expected = hashlib.sha256(data).hexdigest()
    assert [stored_sha256(node) for node in nodes] == [expected, expected]
    again = [pull.stderr.count("claimed again") for pull in pulls]
    print(f"hub sent {hub.proxy.total() / size:.3f}x; swarm {[r.get('swarm') for r in results]}; "
          f"by source {[r['bytes_by_source'] for r in results]}; claimed again {again}")  # fmt: skip
    assert sum(r["bytes_by_source"].get("peer", 0) for r in results) > 0, "chunks went from node to node"
    assert hub.proxy.total() <= 1.4 * size, dict(hub.proxy.sent)


def test_a_node_that_comes_late_to_a_lying_holder_takes_the_file_from_the_honest_ones(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A node pulling once an honest node holds the file beside a lying complete holder takes chunks from
    both: the file failed its SHA-256 with two nodes to suspect, and was fetched again from the Hub alone (one
    more copy per node that comes late: 2.2x for three nodes in CI, where 1.0x is the aim). One chunk from the
    Hub, on which their digests differ, says which lied: the file is taken from the honest one again."""
    files = lying_holders_repo(37)
    size = len(files[BIG])
    hub = Hub(tmp_path, files)
    try:
        lying_store(tmp_path / "liar", files, tmp_path)
        start_nodes(fleet, ["liar"])
        early, late = start_nodes(fleet, ["a", "b"])
        liar_url = fleet.nodes[0].url
        Pull(early, hub).result(timeout=200)
        sha = hashlib.sha256(files[BIG]).hexdigest()
        wait_until(lambda: sha in fleet.holdings(early.id), 15, "a's holding of the file in etcd")
        before = hub.proxy.total()
        results = [Pull(late, hub).result(timeout=200)]
        assert stored_sha256(late) == sha
        hub_sent = hub.proxy.total() - before
        logs = (tmp_path / "b-pull.log").read_text()
        print(f"hub sent {hub_sent / size:.2f}x to b; {results[0]['bytes_by_source']}")
        # (names as the log gives them: a URL followed by a space, not a prefix of another port's)
        [settled] = [line for line in logs.splitlines() if "from the upstream says" in line]
        said = settled.split(" says ")[1]
        assert f"{liar_url} lied" in said and f"{early.url} " not in said, logs
        [named] = [line for line in logs.splitlines() if "sent chunks that are not the file's" in line]
        assert f"{liar_url} (" in named and f"{early.url} " not in named, logs
        assert hub_sent < size / 2, (hub_sent / size, results[0]["bytes_by_source"], logs)
    finally:
        hub.stop()


def lying_holders_repo(seed: int) -> dict[str, bytes]:
    """The repo of the lying holder's tests: a config and a big file of ten chunks and a short one."""
    return {".gitattributes": GITATTRIBUTES, "config.json": b'{"model_type": "bert"}',
            BIG: random_bytes(40 * MiB - 4321, seed)}  # fmt: skip


def lying_store(home: Path, files: dict[str, bytes], root: Path) -> None:
    """A store that holds the repo with every chunk of the big file's blob altered, and its index's chunk
    digests made those of the altered bytes (its mtime put back): a node serving it passes every chunk check
    of its own and of its peers; only the file's SHA-256 tells."""
    import sqlite3

    import blake3

    env = base_env(MODELDEPOT_CHUNK_SIZE=str(CHUNK))
    modeldepot("import", str(write_model_dir(root / "liar-src", files)), "--repo", REPO, "--home", str(home),
               env=env)  # fmt: skip
    sha = hashlib.sha256(files[BIG]).hexdigest()
    blob = home / "blobs" / sha[:2] / sha
    times = blob.stat()
    data = bytearray(blob.read_bytes())
    digests = []
    for offset in range(0, len(data), CHUNK):
        data[offset + 100] ^= 0x01
        digests.append(blake3.blake3(data[offset : offset + CHUNK]).hexdigest())
    blob.chmod(0o644)
    blob.write_bytes(data)
    blob.chmod(0o444)
    import os

    os.utime(blob, ns=(times.st_atime_ns, times.st_mtime_ns))
    with sqlite3.connect(home / "index.db") as index:
        index.executemany("UPDATE chunks SET blake3 = ? WHERE sha256 = ? AND idx = ?",
                          [(digest, sha, idx) for idx, digest in enumerate(digests)])  # fmt: skip


def test_a_complete_holder_that_lies_costs_the_hub_one_more_copy_not_one_per_node(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A node holding the whole file, its chunks altered and its digests of them made to match: as a
    complete holder it kept the Hub off every chunk, each pulling node took the file from it, failed its
    SHA-256, and fetched it again from the Hub alone, the Hub sending one copy per node (4.7x with four: an
    explorer's trial). The one node that sent every chunk the Hub did not is known at once: banned, and the
    file fetched again the fleet's way, each chunk from the Hub about once more."""
    files = lying_holders_repo(31)
    size = len(files[BIG])
    hub = Hub(tmp_path, files)
    try:
        lying_store(tmp_path / "liar", files, tmp_path)
        start_nodes(fleet, ["liar"])
        nodes = start_nodes(fleet, ["a", "b", "c"])
        liar_url = fleet.nodes[0].url
        hub.proxy.seconds_per_mib = 0.05  # (an uplink slower than the nodes' links: what the swarm is for)
        pulls = [Pull(node, hub) for node in nodes]
        results = [pull.result(timeout=200) for pull in pulls]
        expected = hashlib.sha256(files[BIG]).hexdigest()
        assert [stored_sha256(node) for node in nodes] == [expected] * 3
        sent = hub.proxy.total() / size
        print(f"hub sent {sent:.2f}x; {[r['bytes_by_source'] for r in results]}; "
              f"{[round(p.seconds, 1) for p in pulls]} s")  # fmt: skip
        logs = "".join(pull.stderr for pull in pulls)
        assert f"with chunks from node {liar_url}" in logs and "fetching the file again without it" in logs, (
            logs
        )
        # Once the liar is known, about one more copy between the three (1.0x on a quiet machine; 2.0x seen
        # under a full test run's load, the three retries at once before one settles), not one each (3.0x)
        assert sent <= 2.2, (sent, [r["bytes_by_source"] for r in results], logs)
    finally:
        hub.stop()
