"""When another node's claim on a chunk stops keeping this node from the Hub (transfer/swarm.py), on the
real mem registry and a real etcd: the claim of a node whose registration lapsed stands for a grace period;
a claim is late against the swarm's typical time to land, not against a fixed time, and claims that never
land do not hold that time up; the pull reports why it asked the Hub. And a pull whose own node's server is
gone from the fleet claims nothing more."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import types
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest

from conftest import MovedClock as Clock
from etcdserver import EtcdServer
from fleetnodes import Fleet
from modeldepot.discovery.base import NodeRecord
from modeldepot.discovery.etcd import EtcdDiscovery
from modeldepot.discovery.mem import MemDiscovery, MemRegistry
from modeldepot.transfer import download as download_module
from modeldepot.transfer import pace as pace_module
from modeldepot.transfer import swarm as swarm_module
from modeldepot.transfer.choosing import ChunkChooser, ChunkRequest
from modeldepot.transfer.download import FileSource, _FileJob
from modeldepot.transfer.fleet import FleetView
from modeldepot.transfer.ranged import Attempt
from modeldepot.transfer.sources import HttpSource
from modeldepot.transfer.swarm import SwarmFile

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
CHUNK = 4 << 20
SIZE = 8 * CHUNK
SHA = hashlib.sha256(b"content").hexdigest()
BLAKE = "ab" * 32


def run(main: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(main, 45))


def node(name: str) -> NodeRecord:
    return NodeRecord(hashlib.sha256(name.encode()).hexdigest()[:32], f"http://{name}.test:8980", "1", 1.0)


def as_source(record: NodeRecord, holding: object) -> FileSource:
    source = HttpSource(record.url, "peer")
    return FileSource(source, f"{record.url}/api/depot/v1/blobs/{SHA}", origin="peer", chunks_url="x")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(swarm_module, "time", clock)
    return clock


@contextlib.asynccontextmanager
async def members(registry: MemRegistry, *records: NodeRecord | None) -> AsyncIterator[list[MemDiscovery]]:
    """A started discovery per record, registered as that node (None: one that only claims, as a pull)."""
    discoveries = [MemDiscovery(registry) for _ in records]
    for discovery, record in zip(discoveries, records, strict=True):
        await discovery.start()
        if record is not None:
            await discovery.register(record)
    try:
        yield discoveries
    finally:
        for discovery in discoveries:
            await discovery.close()


def swarm_of(discovery: MemDiscovery | EtcdDiscovery, me: NodeRecord | str) -> SwarmFile:
    node_id = me if isinstance(me, str) else me.node_id
    return SwarmFile(FleetView(discovery, asyncio.get_running_loop(), node_id), node_id, SHA, SIZE, CHUNK,
                     as_source)  # fmt: skip


def on_etcd(server: EtcdServer) -> EtcdDiscovery:
    return EtcdDiscovery([("127.0.0.1", server.client_port)])


@contextlib.asynccontextmanager
async def registered_on_etcd(server: EtcdServer, *records: NodeRecord) -> AsyncIterator[list[EtcdDiscovery]]:
    """A discovery on ``server`` per record, each registered as its node; closed after."""
    discoveries = [on_etcd(server) for _ in records]
    try:
        for discovery, record in zip(discoveries, records, strict=True):
            await discovery.start()
            await discovery.register(record)
        yield discoveries
    finally:
        for discovery in discoveries:
            await discovery.close()


def test_a_claimer_whose_registration_lapses_keeps_its_claim_for_the_grace_then_loses_it(
    clock: Clock,
) -> None:
    registry = MemRegistry("lapse")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b, None) as (da, serve_b, pull_b):
            assert await pull_b.claim_chunk(SHA, CHUNK, 3, b.node_id) is not None  # b's pull, its own lease
            swarm = swarm_of(da, a)
            swarm.refresh()
            assert swarm.standing_claim(3, set(), patience=10) is not None
            assert set(swarm.sources()) == {b.node_id}

            await serve_b.close()  # b's serve process's registration lapses; its pull's claim stands
            swarm.refresh()
            assert b.node_id not in swarm.nodes
            clock.now += swarm_module.REGISTRATION_GRACE - 1
            swarm.refresh()
            assert swarm.standing_claim(3, set(), patience=10) is not None, "a lapse is not a departure"
            assert set(swarm.sources()) == {b.node_id}, "reached at its last known URL meanwhile"

            clock.now += 2  # gone for longer than the grace: it left
            swarm.refresh()
            assert swarm.standing_claim(3, set(), patience=10) is None
            assert swarm.sources() == {}
            assert await swarm.claim(3, set(), patience=10)  # taken over, by revision
            assert swarm.events == {"claims_won": 1, "taken_over_left": 1}

    run(main())


def test_a_claim_is_late_against_the_swarms_time_to_land_not_a_fixed_time(clock: Clock) -> None:
    registry = MemRegistry("late")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b) as (da, db):
            for index in range(SIZE // CHUNK):  # every chunk claimed at once, as when all start together
                assert await db.claim_chunk(SHA, CHUNK, index, b.node_id) is not None
            swarm = swarm_of(da, a)
            swarm.refresh()

            # Nothing has landed yet: the whole file shares the uplink, so 30 s unlanded is not late.
            clock.now += 30
            swarm.refresh()
            assert swarm.typical_landing() is None
            assert swarm.standing_claim(0, set(), patience=10) is not None
            assert not await swarm.claim(0, set(), patience=10)

            # Six of the eight land at 40 s: the typical time is 40 s (the two unlanded count at their age).
            clock.now += 10
            for index in range(2, 8):
                await db.settle_claim(SHA, CHUNK, index, BLAKE)
            swarm.refresh()
            assert swarm.typical_landing() == pytest.approx(40)
            clock.now += 3 * 40 - 40 - 1  # 119 s: not yet three times the typical time
            swarm.refresh()
            assert swarm.standing_claim(0, set(), patience=10) is not None
            clock.now += 2  # 121 s: late
            assert swarm.standing_claim(0, set(), patience=10) is None
            assert await swarm.claim(0, set(), patience=10)
            assert swarm.events == {"claims_won": 1, "taken_over_overdue": 1}

            # A settled claim never goes late; a claim of a peer whose copy failed here does not stand.
            assert swarm.standing_claim(2, set(), patience=10) is not None
            assert swarm.standing_claim(2, {f"peer {b.url}"}, patience=10) is None

    run(main())


def test_before_any_landing_only_a_long_silence_makes_a_claim_late(clock: Clock) -> None:
    registry = MemRegistry("silence")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b) as (da, db):
            assert await db.claim_chunk(SHA, CHUNK, 5, b.node_id) is not None
            swarm = swarm_of(da, a)
            swarm.refresh()
            clock.now += swarm_module.FIRST_LANDING_PATIENCE - 1
            assert swarm.standing_claim(5, set(), patience=10) is not None
            clock.now += 2
            assert swarm.standing_claim(5, set(), patience=10) is None

    run(main())


def test_while_the_registry_is_out_of_reach_a_claim_is_late_after_the_patience(clock: Clock) -> None:
    """With etcd down, no settlement can be seen: another node's claim, made before the outage, held the
    chunk from the Hub for the minute before a first landing (a trial: 71 s where the Hub alone takes 7)."""
    registry = MemRegistry("outage")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b) as (da, db):
            assert await db.claim_chunk(SHA, CHUNK, 5, b.node_id) is not None
            swarm = swarm_of(da, a)
            swarm.refresh()
            clock.now += 11
            assert swarm.standing_claim(5, set(), patience=10) is not None  # answering: waited for
            registry.set_available(False)
            swarm.refresh()
            assert not swarm.registry_answers
            # (one unanswered look is no outage: a call that timed out under load voids nothing)
            assert swarm.standing_claim(5, set(), patience=10) is not None
            clock.now += 10
            swarm.refresh()
            assert swarm.standing_claim(5, set(), patience=10) is None
            registry.set_available(True)
            swarm.refresh()
            assert swarm.standing_claim(5, set(), patience=10) is not None

    run(main())


def test_claims_that_never_land_do_not_hold_up_the_time_they_are_judged_by(
    clock: Clock, etcd_server: EtcdServer
) -> None:
    """b claims eight chunks and settles two, ten seconds later; the six others never land (b hangs, or
    its settlements were lost) while b stays in the fleet. Counted at their growing age, the six held the
    typical time to land at their own age, and three times it stayed ahead of them for ever: they were
    never late, and the file waited on b. Counted at most three times the landings' median, they make the
    typical time 30 s: they are late at 90 s."""
    a, b = node("a"), node("b")

    async def main() -> None:
        async with registered_on_etcd(etcd_server, a, b) as (da, db):
            for index in range(SIZE // CHUNK):
                assert await db.claim_chunk(SHA, CHUNK, index, b.node_id) is not None
            await da.wait_for(
                lambda: len(da.claims(SHA, CHUNK)) == SIZE // CHUNK and len(da.peers()) == 2, 10
            )
            swarm = swarm_of(da, a)
            swarm.refresh()
            clock.now += 10
            for index in (0, 1):
                await db.settle_claim(SHA, CHUNK, index, BLAKE)
            await da.wait_for(lambda: len(da.settlements(SHA, CHUNK)) == 2, 10)
            swarm.refresh()
            assert swarm.typical_landing() == pytest.approx(10)

            clock.now += 75  # 85 s unlanded: late only past 3 x 30 s
            swarm.refresh()
            assert swarm.typical_landing() == pytest.approx(30)
            assert swarm.standing_claim(5, set(), patience=10) is not None
            clock.now += 10  # 95 s
            swarm.refresh()
            assert swarm.typical_landing() == pytest.approx(30), "no longer rising with the claims' age"
            assert swarm.standing_claim(5, set(), patience=10) is None
            assert await swarm.claim(5, set(), patience=10)
            assert swarm.events == {"claims_won": 1, "taken_over_overdue": 1}
            assert swarm.standing_claim(0, set(), patience=10) is not None  # a settled claim is never late

    run(main())


def test_a_pull_whose_nodes_server_died_claims_no_more_chunks(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``modeldepot pull --cluster`` into a served store claims on a lease of its own. Its node's
    ``serve`` is SIGKILLed: a claim the pull took then would keep the others from the Hub for a chunk none
    of them can take from this store, until they took it over: the Hub sent it twice (the trial: 1.16-1.38×).
    Nothing listening at the node's address tells at once, before its record goes with its lease (10 s,
    most of a four-node pull); then the node is gone from the view. Either way the pull claims nothing more
    (it fetches on its own), says so once for each, and still settles what it claimed before."""
    served = fleet.node("a").ready()
    caplog.set_level(logging.INFO, "modeldepot.transfer.swarm")

    async def main() -> None:
        pull = on_etcd(fleet.etcd)  # as a CLI pull's fleet view: started, never registered
        await pull.start()
        try:
            await pull.wait_for(lambda: served.id in {n.node_id for n in pull.peers()}, 10)
            swarm = swarm_of(pull, served.id)
            swarm.refresh()
            assert await swarm.claim(0, set(), patience=10)
            assert pull.claims(SHA, CHUNK)[0].node_id == served.id

            await asyncio.to_thread(served.kill)  # SIGKILL: its record goes when its lease runs out
            await asyncio.sleep(1.1)  # (one look at its port a second)
            swarm.refresh()
            assert served.id in {n.node_id for n in pull.peers()}, "its record is still there"
            assert await swarm.claim(1, set(), patience=10), "the pull fetches it itself"
            await pull.wait_for(lambda: served.id not in {n.node_id for n in pull.peers()}, 20)
            swarm.refresh()
            assert await swarm.claim(2, set(), patience=10)
            assert set(pull.claims(SHA, CHUNK)) == {0}, "and claims them for nobody"
            assert swarm.events == {"claims_won": 1, "unshared": 2}
            assert not swarm.serving
            await swarm.settle(0, BLAKE)  # what it claimed before, it still settles
            await pull.wait_for(lambda: pull.settlements(SHA, CHUNK) == {0: (served.id, BLAKE)}, 10)
        finally:
            await pull.close()

    run(main())
    claims = fleet.dump_claims()
    assert claims == {}, json.dumps(claims)  # (its lease revoked with its view)
    for said in ("nothing listens at this store's node", "no longer in the fleet"):
        assert len([r for r in caplog.records if said in r.getMessage()]) == 1, said


def test_a_pull_under_a_download_cap_follows_the_others(clock: Clock) -> None:
    """A `pull --max-rate` claimed chunks like the others, landed them at its pace, and held the swarm back
    until they were taken over (three nodes waited for one capped at 5 MiB/s: 39 s instead of 8, and the
    Hub sent 1.46× the file). It now follows while other nodes are live: it claims no fresh chunk while their
    claims move, and claims the rest once they stop, as a late node does."""
    registry = MemRegistry("slow")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b) as (da, db):
            capped = SwarmFile(FleetView(da, asyncio.get_running_loop(), a.node_id), a.node_id, SHA, SIZE, CHUNK,
                               as_source, slow=True)  # fmt: skip
            capped.refresh()
            assert capped.follower and not capped.may_claim_fresh(patience=10)
            assert await db.claim_chunk(SHA, CHUNK, 0, b.node_id) is not None  # b moves on
            clock.now += 9
            capped.refresh()
            assert not capped.may_claim_fresh(patience=10)
            clock.now += 11  # b's claims stood still for the patience: the capped pull goes on its own
            capped.refresh()
            assert capped.may_claim_fresh(patience=10)
            alone = swarm_of(db, b)  # (uncapped: it starts claiming at once)
            alone.refresh()
            assert alone.may_claim_fresh(patience=10)

    run(main())


def test_a_withdrawal_cut_short_by_the_pulls_end_leaves_no_claim_behind(etcd_server: EtcdServer) -> None:
    """A node that drops the Hub withdraws its unlanded claims; the pull that then fails cancels the
    withdrawal while its deletes are in flight, and its release knew nothing of the claims any more: they
    stood in etcd until the process ended, and the other nodes waited on them (a review). A chunk whose bytes
    are being written is not withdrawn."""
    a, b = node("a"), node("b")

    async def main() -> None:
        async with registered_on_etcd(etcd_server, a, b) as (da, db):
            swarm = swarm_of(da, a)
            for index in range(4):
                assert await swarm.claim(index, set(), patience=10)
            await db.wait_for(lambda: len(db.claims(SHA, CHUNK)) == 4, 10)
            withdrawing = asyncio.create_task(swarm.withdraw_unlanded(landing={3}))
            await asyncio.sleep(0)  # (its deletes sent)
            withdrawing.cancel()  # the pull failed meanwhile: its run() cancels its tasks
            await asyncio.gather(withdrawing, return_exceptions=True)
            await swarm.release()  # the pull's end
            await db.wait_for(lambda: not db.claims(SHA, CHUNK), 10)
            # Withdrawn in full, a landing chunk's claim stays (to be settled), the rest go at once
            for index in range(4):
                assert await swarm.claim(index, set(), patience=10)
            await swarm.withdraw_unlanded(landing={3})
            await db.wait_for(lambda: set(db.claims(SHA, CHUNK)) == {3}, 10)
            await swarm.release()
            await db.wait_for(lambda: not db.claims(SHA, CHUNK), 10)

    run(main())


def test_nodes_claiming_in_another_chunk_size_are_named_in_a_warning(
    clock: Clock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stores made with different chunk sizes claim one content under different keys: they cannot share
    its chunks, and the Hub sends it once per size. The pulls succeeded, so only a warning can tell the
    operator, who had nothing to go on (an explorer's trial)."""
    import modeldepot.transfer.notices as notices

    monkeypatch.setattr(notices, "_said", {})
    registry = MemRegistry("sizes")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b) as (da, db):
            swarm = swarm_of(da, a)
            swarm.refresh()
            assert await db.claim_chunk(SHA, CHUNK * 2, 0, b.node_id) is not None  # b's store: 8 MiB chunks
            caplog.set_level(logging.WARNING, logger="modeldepot.transfer.swarm")
            swarm.refresh()
            swarm.refresh()
            assert swarm.claims == {}, "a claim of another size is no claim of this file's chunks"

    run(main())
    said = [r.getMessage() for r in caplog.records if "another size" in r.getMessage()]
    assert len(said) == 1, said
    assert f"{node('b').node_id} in 8.0 MiB chunks" in said[0] and "this store's 4.0 MiB" in said[0]


def test_chunks_a_pull_holds_as_it_joins_are_claimed_and_settled_for_the_others(clock: Clock) -> None:
    """A pull that joins the swarm on the way (it began while etcd was down) or resumes an earlier pull's
    chunks claims what it holds and settles it, and claims what it is fetching: the others take those from
    it. A chunk another node claims already is left to that node."""
    registry = MemRegistry("held")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b) as (da, db):
            assert await db.claim_chunk(SHA, CHUNK, 3, b.node_id) is not None
            joining, other = swarm_of(da, a), swarm_of(db, b)
            joining.refresh()
            landed_meanwhile = {2: "cd" * 32}  # chunk 2 lands while the claims are made
            await joining.claim_held({0: BLAKE, 3: BLAKE}, {1, 2}, lambda: landed_meanwhile)
            assert joining.mine == {0, 1, 2}
            other.refresh()
            assert other.digest(0) == BLAKE and other.digest(2) == "cd" * 32
            assert other.claims[1].node_id == a.node_id and other.claims[1].blake3 is None
            assert other.claims[3].node_id == b.node_id, "b's claim stands"
            assert set(other.sources()) == {a.node_id}

    run(main())


def test_claims_are_taken_as_lost_only_on_the_registrys_word_not_as_the_process_closes(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Claims that went from the registry (a lease that ran out) are claimed again; but a view detached as
    the process closes reads as an empty fleet, and its missing claims are no loss: nothing is claimed
    again nor logged as gone (every shutdown mid-pull logged "N of this node's claims went", a review)."""
    registry = MemRegistry("closing")
    a = node("a")

    async def main() -> None:
        async with members(registry, a) as (da,):
            joining = swarm_of(da, a)
            joining.refresh()
            await joining.claim_held({0: BLAKE}, {1}, dict)
            assert joining.mine == {0, 1}
            await da.release_claims(SHA, CHUNK)  # (the claims go, as with the lease)
            joining.fleet.detach()
            joining.refresh()
            assert not joining.shares_lost()
            assert joining.mine == {0, 1} and not joining.unclaimed
            assert "claims went" not in caplog.text
            joining.fleet = FleetView(da, asyncio.get_running_loop(), a.node_id)
            joining.refresh()
            assert joining.shares_lost()
            assert not joining.mine and joining.unclaimed == {0, 1}
            assert "2 of this node's claims went" in caplog.text

    with caplog.at_level(logging.INFO, logger="modeldepot"):
        run(main())


def test_a_node_is_refused_by_the_fleet_when_no_peer_takes_its_token_and_enough_refuse_it() -> None:
    """A node whose token the fleet refuses claims nothing (test_swarm_fleet); a good node that asked the odd
    one and a busy one (no answer in time) was taken for the odd one, in a CI run, and pulled alone. A verdict
    needs every peer asked, or two, to refuse, and none to take the token; a look that says nothing keeps it."""
    from modeldepot.transfer.choosing import judge_token, refused_by_the_fleet

    assert not refused_by_the_fleet()
    judge_token([False, None])  # (the odd one refuses, the other is busy: nothing said)
    assert not refused_by_the_fleet()
    judge_token([False, None, False])  # (two refuse)
    assert refused_by_the_fleet()
    judge_token([None, None])  # (nobody answers: the verdict stands)
    assert refused_by_the_fleet()
    judge_token([False, True])  # (one takes it: a token rotated back, or the odd one was the other)
    assert not refused_by_the_fleet()
    judge_token([False])  # (a fleet of one peer, which refuses)
    assert refused_by_the_fleet()


def test_a_nodes_404_stands_until_the_chunk_is_claimed_afresh_and_not_after_that_claim_goes(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node b removed the model and pulls it again: asked for chunk 0 on its old copy's settlement while
    nobody claims the chunk, it answers 404, and is not asked for it again. It then claims the chunk,
    settles it, and its pull ends (its claims released): it holds the chunk, and is asked for it again.
    Keyed on the claim standing now, the refusal "under no claim" stood again once b's claim went (0 == 0),
    and b's chunk map lost the chunk for good: the Hub sent it again (a review)."""
    registry = MemRegistry("refused")
    a, b = node("a"), node("b")

    async def whole(
        self: HttpSource, url: str, size: int, chunk_size: int, with_digests: bool = False
    ) -> tuple[None, dict[int, str]]:
        return None, {}  # (b's chunk map: it holds the file whole)

    monkeypatch.setattr(HttpSource, "chunk_map", whole)

    async def main() -> None:
        async with members(registry, a, b) as (da, db):
            swarm = swarm_of(da, a)
            swarm.settled = {b.node_id: {0, 1}}  # its old copy's settlements, still in the view
            swarm.refresh()
            holder, hub = (
                as_source(b, None),
                FileSource(HttpSource("http://hub.test", "hub"), "http://hub.test/f"),
            )
            partial = types.SimpleNamespace(
                done={}, chunks=SIZE // CHUNK, wanted={}, chunk_size=CHUNK, size=SIZE
            )
            job = _FileJob.__new__(_FileJob)
            ChunkChooser.__init__(job, partial, swarm)  # type: ignore[arg-type]
            job.remote = types.SimpleNamespace(size=SIZE, path="f")  # type: ignore[assignment]
            job.refreshing, job.refreshed, job._pulse = set(), {}, lambda: None  # type: ignore[method-assign]
            job.live, job.have = [holder, hub], {holder: None, hub: None}

            def announce() -> None:
                swarm.refresh()
                job.announced = {holder: swarm.announced().get(b.node_id, frozenset())}

            asked = ChunkRequest(holder, clock.now, under=swarm.claim_revision(0))
            job._lacks(holder, 0, asked)  # its 404
            announce()
            assert not job._holds(holder, 0) and not job._may_take(holder, 0, clock.now)
            await job._refresh(holder)  # (its map says whole: the refusal stands over it)
            assert job.have[holder] == frozenset(range(1, SIZE // CHUNK))

            assert await db.claim_chunk(SHA, CHUNK, 0, b.node_id) is not None  # it claims the chunk afresh
            announce()
            await db.settle_claim(SHA, CHUNK, 0, BLAKE)
            announce()
            await db.release_claims(SHA, CHUNK)  # its pull is over
            announce()
            assert 0 not in swarm.claims
            assert job._holds(holder, 0) and job._may_take(holder, 0, clock.now)
            assert holder.source.name not in job._failed_for(0, clock.now, 10.0)
            await job._refresh(holder)
            assert job.have[holder] is None

    run(main())


def _landed(
    swarm: SwarmFile, claimer: MemDiscovery, record: NodeRecord, index: int
) -> Coroutine[Any, Any, None]:
    async def land() -> None:
        assert await claimer.claim_chunk(SHA, CHUNK, index, record.node_id) is not None
        swarm.refresh()
        await claimer.settle_claim(SHA, CHUNK, index, BLAKE)
        swarm.refresh()

    return land()


def test_a_node_far_behind_the_swarm_gives_its_claims_up_but_not_alone_nor_when_every_node_is_slow(
    clock: Clock,
) -> None:
    """A node's claims unlanded 3/4 of the time after which the others take them over are given up, once
    the others' newer claims landed first (its own link binds). Alone, or with the Hub slow for every node
    (nothing newer lands), none is: every node gave its claims up then, and one was left claiming for the
    fleet; a node alone gave them up to nobody (a review)."""
    registry = MemRegistry("yield")
    a, b, c = node("a"), node("b"), node("c")

    async def main() -> None:
        async with members(registry, a, b, c) as (da, db, dc):
            swarm = swarm_of(da, a)
            swarm.refresh()
            assert await swarm.claim(0, set(), 10.0) and await swarm.claim(1, set(), 10.0)
            assert await db.claim_chunk(SHA, CHUNK, 7, b.node_id) is not None  # made with a's
            swarm.refresh()
            clock.now += 1
            await swarm.settle(0, BLAKE)  # its own first landing: 1 s
            await db.settle_claim(SHA, CHUNK, 7, BLAKE)  # (landed: no sign of a's pace, made with it)
            swarm.refresh()
            clock.now += 20
            swarm.refresh()
            assert swarm.typical_landing() == pytest.approx(1)
            assert swarm.own_claims_late() == {}  # 21 s unlanded, but nothing newer landed: the Hub's pace
            await _landed(swarm, db, b, 6)
            assert swarm.own_claims_late() == {}  # one witness is not enough
            await _landed(swarm, dc, c, 5)
            late = swarm.own_claims_late()
            assert list(late) == [1] and late[1] == pytest.approx(1000 + 10)  # taken over at 10 s (patience)
            await swarm.withdraw(late)
            swarm.refresh()
            assert 1 not in da.claims(SHA, CHUNK) and 1 not in swarm.claims and 1 in swarm.given_up

    run(main())


def test_a_given_up_claim_whose_release_was_lost_is_not_fetched_again(clock: Clock) -> None:
    """The release of a claim given up does not reach the registry (a call that timed out): read back, it
    was this node's own again, and the follower fetched the chunk it gave up over its narrow link while the
    others took it over (a review). Now it is no claim of this node's while it follows; it claims it again
    only as it claims afresh."""
    registry = MemRegistry("lost-release")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b) as (da, db):
            swarm = swarm_of(da, a)
            swarm.refresh()
            assert await swarm.claim(3, set(), 10.0)

            async def lost(sha256: str, chunk_size: int, indexes: object = None) -> None:
                return None  # (the write never happened)

            da.release_claims = lost  # type: ignore[method-assign,assignment]
            swarm.follower = True
            await swarm.withdraw({3})
            assert await db.claim_chunk(SHA, CHUNK, 6, b.node_id) is not None  # the others move on
            swarm.refresh()
            assert da.claims(SHA, CHUNK)[3].node_id == a.node_id and 3 not in swarm.claims
            hub = FileSource(HttpSource("http://hub.test", "hub"), "http://hub.test/f")
            partial = types.SimpleNamespace(
                done={}, chunks=SIZE // CHUNK, wanted={}, chunk_size=CHUNK, size=SIZE
            )
            choice = ChunkChooser(partial, swarm)  # type: ignore[arg-type]
            choice.live, choice.have = [hub], {hub: None}
            assert not choice._may_take(hub, 3, clock.now)  # a follower: the chunk is the others' to fetch
            swarm.follower = False  # the others stopped: it claims afresh, that chunk too
            assert await swarm.claim(3, set(), 10.0) and 3 in swarm.mine and 3 not in swarm.given_up
            swarm.refresh()
            assert swarm.claims[3].node_id == a.node_id

    run(main())


def test_a_late_claim_is_given_up_by_its_pace_on_the_wire_and_not_while_a_copy_lands(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of this node's late claims, the Hub request is stopped (its claim withdrawn, the node follows) when at
    its pace so far it would land after the others take it over; not when it would land in time, nor when
    it has been on the wire too short to tell, nor when another copy of the chunk is being written (given
    up, that copy would settle nothing and the fleet would fetch the chunk again: a review)."""
    registry = MemRegistry("pace")
    a, b, c = node("a"), node("b"), node("c")
    monkeypatch.setattr(download_module, "time", clock)

    def on_the_wire(seconds: float, received: int) -> ChunkRequest:
        request = ChunkRequest(
            FileSource(HttpSource("http://hub.test", "hub"), "http://hub.test/f"), clock.now
        )
        request.receiving.attempt = Attempt(received=received, began=clock.now - seconds)
        request.task = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
        return request

    async def main() -> None:
        async with members(registry, a, b, c) as (da, db, dc):
            swarm = swarm_of(da, a)
            swarm.refresh()
            for index in range(4):
                assert await swarm.claim(index, set(), 10.0)
            swarm.refresh()
            clock.now += 1
            await swarm.settle(0, BLAKE)
            clock.now += 1.5
            await _landed(swarm, db, b, 7)
            await _landed(swarm, dc, c, 6)
            clock.now += 6  # 8.5 s unlanded; taken over at 10 s
            swarm.refresh()
            assert set(swarm.own_claims_late()) == {1, 2, 3}
            job = _FileJob.__new__(_FileJob)
            job.swarm, job.landing, job.limits = swarm, {3}, download_module.Limits()
            job.remote = types.SimpleNamespace(size=SIZE, path="f")  # type: ignore[assignment]
            job.partial = types.SimpleNamespace(chunk_size=CHUNK)  # type: ignore[assignment]
            slow, in_time, landing = (
                on_the_wire(5, CHUNK // 8),
                on_the_wire(5, CHUNK - 1024),
                on_the_wire(5, 0),
            )
            job.requests = {1: [slow], 2: [in_time], 3: [landing]}
            assert await job._yield_late_claims()
            assert slow.task.cancelled() and not in_time.task.done() and not landing.task.done()
            assert swarm.follower and swarm.given_up == {1} and swarm.events["claims_given_up"] == 1
            assert job.limits.link_bound_at == clock.now  # (for every file of the transfer)
            assert set(da.claims(SHA, CHUNK)) >= {2, 3} and 1 not in da.claims(SHA, CHUNK)
            # (just on the wire: its pace is not known yet)
            clock.now += 1
            fresh = on_the_wire(0.5, 0)
            job.requests = {2: [fresh]}
            assert not await job._yield_late_claims() and not fresh.task.done()

    run(main())


async def _following_landings_of_30_s(
    clock: Clock,
    me: tuple[MemDiscovery, NodeRecord],
    other: tuple[MemDiscovery, NodeRecord],
    claimed: list[int],
) -> SwarmFile:
    """A follower of the other node, which settled chunk 0 before it looked, then claimed ``claimed`` and
    landed the first of them 30 s after it was seen claimed."""
    (mine, record), (theirs, claimer) = me, other
    await _landed(swarm_of(theirs, claimer), theirs, claimer, 0)
    follower = swarm_of(mine, record)
    follower.refresh()
    assert follower.follower
    for index in claimed:
        assert await theirs.claim_chunk(SHA, CHUNK, index, claimer.node_id) is not None
    follower.refresh()
    clock.now += 30
    await theirs.settle_claim(SHA, CHUNK, claimed[0], BLAKE)
    follower.refresh()
    return follower


def _claims_fresh_after(clock: Clock, follower: SwarmFile, seconds: float) -> None:
    """The follower claims no fresh chunk until the claims have stood still ``seconds`` (with a patience of
    10 s), and does after."""
    clock.now += seconds - 1
    follower.refresh()
    assert not follower.may_claim_fresh(patience=10)
    clock.now += 2
    follower.refresh()
    assert follower.may_claim_fresh(patience=10)


def test_a_follower_waits_for_the_swarms_typical_landing_before_it_claims_fresh_chunks(clock: Clock) -> None:
    """A Hub slow for every node lands each claim in 30 s: the others' claims may stand still for more than
    the patience (10 s) while every claimer is busy. A follower that took that for the others having
    stopped claimed chunks of its own, for good; it waits for a typical landing as well."""
    registry = MemRegistry("typical")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b) as (da, db):
            follower = await _following_landings_of_30_s(clock, (da, a), (db, b), claimed=[1])
            assert follower.typical_landing() == pytest.approx(30.0)
            _claims_fresh_after(clock, follower, 30.0)  # (not after the patience, 10 s)

    run(main())


def test_claims_gone_unlanded_leave_the_swarms_typical_landing(clock: Clock) -> None:
    """Claims that went without landing (their claimer died, or withdrew them) land never: kept in the
    typical landing at three times the landings' median, they had a follower of a swarm that died wait
    90 s where its claims landed in 30 (a review). They are dropped as they go."""
    registry = MemRegistry("gone")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b) as (da, db):
            follower = await _following_landings_of_30_s(clock, (da, a), (db, b), claimed=[1, 2, 3, 4, 5, 6])
            clock.now += 50
            await db.release_claims(SHA, CHUNK, {2, 3, 4, 5, 6})  # b dies: its claims go unlanded
            follower.refresh()
            assert follower.typical_landing() == pytest.approx(30.0)
            _claims_fresh_after(clock, follower, 30.0)

    run(main())


def test_a_node_that_gave_its_claims_up_does_not_judge_its_peers_slow(clock: Clock) -> None:
    """A node that gave its claims up (its own Hub requests landed far behind the fleet's) fetches nothing
    from the Hub since: with no Hub pace to compare, its narrow link made every peer look slower than
    MODELDEPOT_SLOW_PEER_RATE, and the Hub was let in for what they hold (a review)."""
    registry = MemRegistry("narrow")
    a = node("a")

    async def main() -> None:
        async with members(registry, a) as (da,):
            swarm = swarm_of(da, a)
            swarm.refresh()
            holder = as_source(node("x"), None)
            hub = FileSource(HttpSource("http://hub.test", "hub"), "http://hub.test/f")
            partial = types.SimpleNamespace(
                done={}, chunks=SIZE // CHUNK, chunk_size=CHUNK, parts={}, wanted={}
            )
            job = _FileJob(None, types.SimpleNamespace(size=SIZE, path="f"), partial,  # type: ignore[arg-type]
                           download_module.Limits(slow_peer_rate=1 << 20), None, None, swarm)  # fmt: skip
            job.live, job.have = [holder, hub], {holder: None, hub: None}
            now = clock.now
            job.requests = {0: [ChunkRequest(holder, now - 20.0)]}
            job.requests[0][0].receiving.attempt = Attempt(
                received=1 << 16, began=now - 20.0
            )  # (on the wire)
            job.peer_started = now - 20.0
            job.received.extend([(now - 20.0, 0), (now, 1 << 20)])  # (what the process received meanwhile)
            # Nothing landed from it in 20 s: slow by the fixed rate, and the Hub is tried (it sends nothing)
            assert job._judge_peers(now) == "try"
            swarm.gave_up_at = now - 5.0
            assert job._judge_peers(now) == "fine"
            # (for a while: a Hub hiccup long ago must not leave it to a holder throttled since)
            swarm.gave_up_at = now - pace_module.OWN_LINK_MEMORY - 1
            assert job._judge_peers(now) == "try"

    run(main())


def test_a_pull_that_landed_the_file_hands_its_claims_over_once_its_node_is_seen_holding_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Released as its pull ended, a node's claims left the file neither claimed nor held until its serve
    published its holdings: a node that asked in between took it from the Hub (1.25x in CI). A pull that
    published the file returns at once (waited for, the hand-over held every mirrored response's end), and
    its claims stand until its node is seen holding the file, or its patience ends; a failed pull's go at once."""
    from modeldepot.discovery.base import Holding

    registry = MemRegistry("hand-over")
    a = node("a")
    monkeypatch.setattr(swarm_module, "HANDOVER_PATIENCE", 1.0)

    async def claims_gone(discovery: MemDiscovery, within: float) -> float:
        clock = asyncio.get_running_loop()
        began = clock.time()
        while discovery.claims(SHA, CHUNK):
            assert clock.time() - began < within, discovery.claims(SHA, CHUNK)
            await asyncio.sleep(0.01)
        return clock.time() - began

    async def main() -> None:
        clock = asyncio.get_running_loop()
        async with members(registry, a, None) as (serve_a, pull_a):
            swarm = swarm_of(pull_a, a)
            swarm.refresh()
            assert await swarm.claim(0, set(), patience=10)
            await swarm.settle(0, BLAKE)
            began = clock.time()
            await swarm.release(hand_over=True)
            assert clock.time() - began < 0.1, "the pull returns at once"
            await asyncio.sleep(0.3)
            assert set(pull_a.claims(SHA, CHUNK)) == {0}, "its claim stands until its node holds the file"
            await serve_a.publish({SHA: Holding(SIZE, True)})
            assert await claims_gone(pull_a, 0.5) < 0.5

            swarm.refresh()
            assert await swarm.claim(1, set(), patience=10)
            await swarm.release()  # (a pull that failed)
            assert not pull_a.claims(SHA, CHUNK)

            await serve_a.publish({})  # (its holding not seen: the claims go at the patience's end)
            swarm.refresh()
            assert await swarm.claim(2, set(), patience=10)
            await swarm.release(hand_over=True)
            # A newer download of the same content in this process, meanwhile: its claims are its own (a
            # release of every claim of the process on the content dropped them mid-transfer, a review)
            newer = swarm_of(pull_a, a)
            newer.refresh()
            assert await newer.claim(3, set(), patience=10)
            await asyncio.sleep(1.2)
            assert set(pull_a.claims(SHA, CHUNK)) == {3}, "the hand-over withdrew its own claims alone"
            await newer.release()
            assert not pull_a.claims(SHA, CHUNK)

    run(main())


def test_while_the_registry_is_out_of_reach_a_holders_own_digest_makes_its_chunk_takeable(
    clock: Clock,
) -> None:
    """With etcd down no settlement shows, and a chunk a claimer holds could not be checked before it is
    written: not taken from it, every claim's chunks went late and came from the Hub, 2.4 times the model for
    four nodes through a 25 s outage, every peer up (an explorer's trial). The holder's chunk map gives the
    BLAKE3 its log names for each chunk it offers: while the registry is silent, that word (what its settlement
    would say) makes the chunk takeable, and the chunk is checked against it; with the registry back, a
    settlement is waited for, as ever."""
    registry = MemRegistry("silent")
    a, b = node("a"), node("b")

    async def main() -> None:
        async with members(registry, a, b) as (da, _db):
            swarm = swarm_of(da, a)
            swarm.refresh()
            holder = as_source(b, None)
            partial = types.SimpleNamespace(
                done={}, chunks=SIZE // CHUNK, chunk_size=CHUNK, parts={}, wanted={}
            )
            job = _FileJob(None, types.SimpleNamespace(size=SIZE, path="f"), partial,  # type: ignore[arg-type]
                           download_module.Limits(), None, None, swarm)  # fmt: skip
            job.live, job.have = [holder], {holder: frozenset({0, 1})}
            job.map_digests[holder] = {0: "ab" * 32}
            assert not job._checkable(holder, 0)  # (the registry answers: a settlement is waited for)
            registry.set_available(False)
            swarm.refresh()
            assert job._checkable(holder, 0) and not job._checkable(holder, 1)  # (1: no digest given)
            assert job._expected(holder, 0) == "ab" * 32
            # (landed so, the chunk is not settled in this node's name: the holder's word alone would become the
            # fleet's settlement, a review)
            assert job._on_map_word(holder, 0)
            registry.set_available(True)
            swarm.refresh()
            assert not job._checkable(holder, 0)

    run(main())
