"""The scheduler's choices alone (transfer/choosing.py: no I/O): when the endgame duplicates a request, when
a peer's request counts as stuck, with requests of given ages in flight, and what a node's 404 voids."""

from __future__ import annotations

import time
import types

import pytest

from modeldepot.transfer.choosing import ChunkChooser, ChunkRequest, FileSource
from modeldepot.transfer.sources import HttpSource, RetryPolicy

CHUNK = 16 << 20


def request(source: FileSource, age: float, received: int = 0) -> ChunkRequest:
    """A request to ``source`` on the wire for ``age`` seconds, ``received`` bytes in."""
    made = ChunkRequest(source, time.monotonic() - age)
    made.receiving.kept = received
    return made


def source(port: int, kind: str) -> FileSource:
    url = f"http://127.0.0.1:{port}"
    return FileSource(HttpSource(url, kind, None, RetryPolicy(attempts=1)), url + "/f")


def chooser(chunks: int, *sources: FileSource) -> ChunkChooser:
    partial = types.SimpleNamespace(done={}, chunks=chunks, wanted={}, chunk_size=CHUNK, size=chunks * CHUNK)
    choice = ChunkChooser(partial, None)  # type: ignore[arg-type]
    choice.live = list(sources)
    choice.have = dict.fromkeys(sources)
    return choice


@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("age", [25.0, 1000.0])
def test_a_peer_that_stalls_with_every_request_is_duplicated_by_the_hub(chunks: int, age: float) -> None:
    """One peer holds every request of the file, outstanding ``age`` seconds (it stalls or trickles); the Hub
    joined for the gaps (outside a swarm). Measured against its own requests' ages, the peer was never stuck
    and the Hub never took its chunks (a review): it does, once past the floor of the patience."""
    peer, hub = source(1, "peer"), source(2, "hub")
    choice = chooser(chunks, peer, hub)
    choice.gaps_only = True
    choice.requests = {i: [request(peer, age)] for i in range(chunks)}
    assert choice._pick(hub) == (0, None)


@pytest.mark.parametrize("age", [25.0, 1000.0])
def test_a_source_with_no_time_of_its_own_duplicates_a_stalled_one(age: float) -> None:
    """A stalled peer holds the four requests of a file; another peer, idle and with no chunk of the file
    landed yet, takes the oldest in the endgame (the stalled requests are no yardstick for themselves)."""
    stalled, idle = source(1, "peer"), source(3, "peer")
    choice = chooser(4, stalled, idle)
    choice.requests = {i: [request(stalled, age)] for i in range(4)}
    assert choice._pick(idle) == (0, None)


def test_a_nodes_404_voids_the_claim_it_was_asked_under_not_a_fresh_one() -> None:
    """A node removed a model and pulls it again at once: asked for a chunk its old copy had settled (claim
    revision 5), it answers 404. That claim is void here and the node is not asked for the chunk; its fresh
    claim of the chunk (revision 9) was taken for failed too, and fetched from the Hub again by the others
    (1.26-1.97 times the model with four nodes). A refusal is of the claim it was asked under."""
    node = source(1, "peer")
    choice = chooser(2, node)
    revisions = {0: 5}
    choice.swarm = types.SimpleNamespace(claim_revision=revisions.get)  # type: ignore[assignment]
    choice.have = {node: frozenset()}
    choice.announced = {node: frozenset({0})}
    now = time.monotonic()
    choice.refused, choice.refused_under = {node: {0}}, {(node, 0): 5}
    assert not choice._holds(node, 0) and node.source.name in choice._failed_for(0, now, 10.0)
    revisions[0] = 9  # its claim afresh, then settled
    assert node.source.name not in choice._failed_for(0, now, 10.0) and choice._holds(node, 0)


def test_a_chunk_a_node_claims_again_is_not_taken_for_one_it_settled_before() -> None:
    """The same node: its old copy settled chunks 0 and 1, kept in the swarm's view after their claims went;
    it removed the copy and claims chunk 0 again (not landed yet). It was asked for chunk 0 on the old
    settlement, answered 404 under the new claim, and that fresh claim was taken for failed (a review)."""
    from modeldepot.discovery.base import ChunkClaim, NodeRecord
    from modeldepot.transfer.swarm import SwarmFile

    swarm = SwarmFile(None, "self", "a" * 64, 2 * CHUNK, CHUNK, lambda node, holding: None)  # type: ignore[arg-type]
    swarm.nodes = {"x": NodeRecord("x", "http://x.test:8980", "1", 1.0)}
    swarm.settled = {"x": {0, 1}}
    assert swarm.announced() == {"x": frozenset({0, 1})}
    swarm.claims = {0: ChunkClaim("x", None, 9)}  # claimed afresh, unsettled
    assert swarm.announced() == {"x": frozenset({1})}
    swarm.claims = {0: ChunkClaim("x", "b" * 64, 9)}  # settled again
    assert swarm.announced() == {"x": frozenset({0, 1})}


def test_a_trickling_peer_is_stuck_by_the_others_pace_not_its_own() -> None:
    """Peer x holds four requests, 25 s on the wire with nothing in; one chunk landed from peer b in half
    a second. Counted with the landings, x's own requests set the patience at three times their age, and
    x was never stuck: every node of a swarm following it waited for ever (the trickling-peer fleet test,
    with the Hub tried early). Judged by the others' pace, x is stuck; four peers all as slow are not."""
    x, b, hub = source(1, "peer"), source(3, "peer"), source(2, "hub")
    choice = chooser(8, x, b, hub)
    choice.peer_times.append(0.5)
    choice.requests = {i: [request(x, 25.0)] for i in range(4)}
    now = time.monotonic()
    assert x.source.name in choice._failed_for(0, now, choice._patience())
    assert b.source.name not in choice._failed_for(0, now, choice._patience())
    peers = [source(port, "peer") for port in (4, 5, 6, 7)]
    busy = chooser(8, *peers, hub)
    busy.peer_times.append(0.5)
    busy.requests = {i: [request(peer, 25.0)] for i, peer in enumerate(peers)}
    assert not busy._failed_for(0, now, busy._patience())


def test_holders_all_as_slow_are_not_stuck_before_a_chunk_of_theirs_lands() -> None:
    """A node on 20 Mbit asks three whole holders for twelve 16 MiB chunks at once: each takes 80 s. With no
    peer chunk landed yet, the patience was its floor (10 s), every holder was stuck at 20 s, and the Hub
    was let in for four chunks, a quarter of the model (the fleet benchmark's late node). Judged by the
    others' requests in flight, none is stuck; one that stalls alone is, at twice the floor."""
    holders, hub = [source(port, "peer") for port in (1, 3, 4)], source(2, "hub")
    choice = chooser(16, *holders, hub)
    choice.requests = {i: [request(holders[i % 3], 25.0)] for i in range(12)}
    now = time.monotonic()
    assert not choice._failed_for(12, now, choice._patience())
    alone = chooser(16, holders[0], hub)
    alone.requests = {i: [request(holders[0], 25.0)] for i in range(4)}
    assert holders[0].source.name in alone._failed_for(12, now, alone._patience())


def following(chooser_: ChunkChooser, stood_still: float) -> None:
    """``chooser_`` pulls in a swarm as a follower; the claims on the file last moved ``stood_still`` s ago."""
    from modeldepot.transfer.swarm import SwarmFile

    swarm = SwarmFile(
        None, "self", "a" * 64, chooser_.partial.chunks * CHUNK, CHUNK, lambda node, holding: None
    )  # type: ignore[arg-type]
    swarm.follower, swarm.last_activity = True, time.monotonic() - stood_still
    chooser_.swarm = swarm


def test_a_follower_times_the_swarm_standing_still_by_what_lands_not_by_its_requests_in_flight() -> None:
    """A follower claims no fresh chunk from the Hub until the others' claims stood still for the patience
    (10 s here). Peer x, holding chunks 0-3, has this node's four requests 8 s on the wire (not stuck yet);
    one chunk landed from another peer in half a second. Counted at their age, x's requests set that
    patience at three times it, and a follower of a trickling holder waited until x was judged stuck (20 s)
    for chunks nobody claimed nor held."""
    x, b, hub = source(1, "peer"), source(3, "peer"), source(2, "hub")
    choice = chooser(8, x, b, hub)
    choice.have = {x: frozenset(range(4)), b: frozenset(), hub: None}
    choice.peer_times.append(0.5)
    choice.requests = {i: [request(x, 8.0)] for i in range(4)}
    following(choice, stood_still=12.0)
    assert not choice._origin_blocked(5, time.monotonic(), endgame=False)
    following(choice, stood_still=5.0)  # the claims moved lately: this node still follows
    assert choice._origin_blocked(5, time.monotonic(), endgame=False)


@pytest.mark.parametrize("peers_slow", [False, True])
def test_a_follower_takes_from_the_hub_what_slow_holders_hold(peers_slow: bool) -> None:
    """Peer x holds the whole file and sends it too slowly (the node judged its peers slow: the Hub joins for
    the rest). A follower waited for a claim of x's chunks, which nobody makes (x holds them), until the
    claims had stood still for the patience. With x not slow, its chunks are its to give."""
    x, hub = source(1, "peer"), source(2, "hub")
    choice = chooser(8, x, hub)
    following(choice, stood_still=0.0)
    choice.peers_slow = peers_slow
    choice.rotation = 0  # (the Hub's scan starts at a random chunk in a swarm: at 0 here)
    assert choice._origin_blocked(0, time.monotonic(), endgame=False) is not peers_slow
    assert (choice._pick(hub)[0] == 0) is peers_slow


def test_in_the_endgame_a_follower_takes_a_stuck_peers_chunk_from_the_hub() -> None:
    """Every chunk left is in flight to peer x, which trickles (25 s, nothing in; another peer landed one in
    half a second). Each follower had asked x for them and waited for another node's claim of them, which
    nobody made (they all followed): 10 s more, in the trickling-peer fleet test. In the endgame the Hub
    takes them once x is stuck, judged by the others' pace (its own requests' ages are no yardstick)."""
    x, b, hub = source(1, "peer"), source(3, "peer"), source(2, "hub")
    choice = chooser(4, x, b, hub)
    choice.have = {x: None, b: frozenset(), hub: None}
    choice.peer_times.append(0.5)
    choice.requests = {i: [request(x, 25.0)] for i in range(4)}
    following(choice, stood_still=0.0)
    assert not choice._origin_blocked(0, time.monotonic(), endgame=True)
    assert choice._pick(hub) == (0, None)
    choice.requests = {i: [request(x, 15.0)] for i in range(4)}  # not stuck yet (20 s): the Hub waits
    index, wake = choice._pick(hub)
    assert index is None and wake is not None and 4.0 < wake <= 5.0


def test_a_follower_takes_from_the_hub_a_chunk_only_a_failed_or_gone_node_settled() -> None:
    """Node x claimed and settled chunk 5, then finished (its claims went). Its copy failed here (a liar,
    banned), or it left the fleet: nobody claims the chunk again, and a follower waited for a claim of it
    until the others' claims had stood still for the patience (10 s, in half the runs of the flipping-peer
    fleet test). A live settler not failed here will hold it (its holdings are published a moment after
    its claims go: the Hub sent its chunks again meanwhile, a CI run), and a chunk nobody settled is
    still left to the others' claims."""
    from modeldepot.discovery.base import NodeRecord

    x, hub = source(1, "peer"), source(2, "hub")
    choice = chooser(8, hub)  # (x is no source here yet: its holdings are not published)
    following(choice, stood_still=0.0)
    swarm = choice.swarm
    assert swarm is not None
    swarm.make_source = lambda node, holding: x
    swarm.nodes = {"x": NodeRecord("x", "http://127.0.0.1:1", "1", 1.0)}
    swarm.settled, swarm.digests[5] = {"x": {5}}, "ab" * 32
    now = time.monotonic()
    assert choice._origin_blocked(5, now, endgame=False)  # x lives, and holds it soon
    assert choice._origin_blocked(6, now, endgame=False)
    choice.errors = {x.source.name: ValueError("its copy failed its BLAKE3 check")}
    assert not choice._origin_blocked(5, now, endgame=False)
    assert choice._origin_blocked(6, now, endgame=False)
    choice.errors, swarm.nodes = {}, {}  # x left the fleet
    assert not choice._origin_blocked(5, now, endgame=False)
    assert choice._origin_blocked(6, now, endgame=False)
