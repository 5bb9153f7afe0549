"""How a download judges its peers' pace (transfer/pace.py): slow by the fixed rate, then the Hub as the
yardstick, tried for one chunk when it sends none of the file. The rules, on a job built by hand with a
clock the test moves; the fleet tests (test_rate_limits.py) run them over real sockets."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from conftest import MovedClock as Clock
from modeldepot.transfer import pace as pace_module
from modeldepot.transfer.choosing import ChunkRequest
from modeldepot.transfer.download import FileSource, Limits, _FileJob
from modeldepot.transfer.ranged import Attempt
from modeldepot.transfer.sources import HttpSource

CHUNK = 4 << 20
SIZE = 8 * CHUNK
RATE = 1 << 20  # the fixed rate: peers below 1 MiB/s all together are slow


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(pace_module, "time", clock)
    return clock


def holder(name: str = "x") -> FileSource:
    return FileSource(HttpSource(f"http://{name}.test", "peer"), f"http://{name}.test/f")


HUB = FileSource(HttpSource("http://hub.test", "hub"), "http://hub.test/f")


def job_with_a_slow_holder(clock: Clock, limits: Limits | None = None) -> tuple[_FileJob, FileSource]:
    """A job outside a swarm whose one whole holder has sent 1 MiB in 20 s over its one request (slow by the
    fixed rate), and the Hub a live source that sent nothing of the file (the holder kept it from every
    chunk)."""
    partial = types.SimpleNamespace(done={}, chunks=SIZE // CHUNK, chunk_size=CHUNK, parts={}, wanted={})
    job = _FileJob(None, types.SimpleNamespace(size=SIZE, path="f"), partial,  # type: ignore[arg-type]
                   limits or Limits(slow_peer_rate=RATE), None, None)  # fmt: skip
    peer = holder()
    job.live, job.have = [peer, HUB], {peer: None, HUB: None}
    job.requests = {0: [on_the_wire(peer, clock.now - 20.0, 1 << 20)]}
    job.peer_started = clock.now - 20.0
    looks(job, clock.now - 20.0, clock.now, 50 << 10)  # (what the process received meanwhile: the holder's)
    return job, peer


def looks(job: _FileJob, start: float, end: float, rate: float) -> None:
    """``job``'s looks at what the process received, one a second from ``start`` to ``end``, at ``rate``
    bytes a second from then (after what earlier looks saw)."""
    when, total = (start, 0) if not job.received else job.received[-1]
    if not job.received:
        job.received.append((when, total))
    while when + 1 <= end:
        when, total = when + 1, total + int(rate)
        job.received.append((when, total))


def on_the_wire(source: FileSource, began: float, received: int) -> ChunkRequest:
    request = ChunkRequest(source, began)
    request.receiving.attempt = Attempt(received=received, began=began)
    return request


def test_peers_slow_by_the_fixed_rate_have_the_hub_tried_before_it_is_let_in(clock: Clock) -> None:
    """With no pace of the Hub's to compare, a node's own narrow link made healthy peers look slow, and the
    Hub was let in for what they hold (a 20 Mbit node among three whole holders had the Hub send 0.21-0.23
    times the model for nothing: a session's trial). The Hub is tried first, one request at a time."""
    job, _ = job_with_a_slow_holder(clock)
    assert job._judge_peers(clock.now) == "try"
    asyncio.run(job._try_hub(clock.now))
    assert job.hub_on_trial and job.trial_at == clock.now and job._trial_open()
    assert job._judge_peers(clock.now + 1.0) == "fine"  # (no request of the Hub's yet: it may come)
    job.requests[1] = [on_the_wire(HUB, clock.now, 0)]
    assert not job._trial_open()  # (one at a time)
    # On the wire for less than PACE_MIN, and having brought nothing: no verdict
    clock.now += pace_module.PACE_MIN - 0.5
    assert job._judge_peers(clock.now) == "fine" and job.trial_at is not None


def test_a_hub_no_faster_than_the_peers_keeps_out_for_a_while_for_every_file(clock: Clock) -> None:
    job, _ = job_with_a_slow_holder(clock)
    job.trial_at = clock.now
    # The Hub's request brings what the holder's does, each: 50 KiB/s
    job.requests[1] = [on_the_wire(HUB, clock.now, int(pace_module.PACE_MIN * (50 << 10)))]
    job.requests[0] = [on_the_wire(job.live[0], clock.now - 20.0, 20 * (50 << 10))]
    clock.now += pace_module.PACE_MIN
    looks(job, 0, clock.now, 50 << 10)  # (as much as before the trial)
    assert job._judge_peers(clock.now) == "fine"
    assert job.trial_at is None and job.limits.link_bound_at == clock.now
    # Another file of the transfer does not try the Hub again: not within OWN_LINK_MEMORY
    other, _ = job_with_a_slow_holder(clock, job.limits)
    assert other._judge_peers(clock.now + pace_module.OWN_LINK_MEMORY - 1) == "fine"
    assert other._judge_peers(clock.now + pace_module.OWN_LINK_MEMORY + 1) == "try"


def test_a_hub_that_lands_its_trial_far_faster_lets_it_in(clock: Clock) -> None:
    job, _ = job_with_a_slow_holder(clock)
    job.trial_at = clock.now
    clock.now += 1.0
    looks(job, 0, clock.now, 5 << 20)  # (a hundred times what came before the trial)
    job.paces.append((clock.now, True, CHUNK, 0.9))  # 4 MiB in 0.9 s: no need to wait PACE_MIN
    assert job._judge_peers(clock.now) == "slow"
    assert job.trial_at is None and job.limits.link_bound_at is None


def test_a_hub_that_takes_a_share_of_a_full_link_adds_nothing(clock: Clock) -> None:
    """On a shaped link the peers fill, a new request's first seconds took twice its share: the Hub's pace
    per request was twice a holder's, and healthy holders were judged slow (the fleet benchmark's late node,
    20 Mbit among three holders: the Hub sent 0.57 times the model). The process receives no more than it
    did before the trial: the Hub is no faster here."""
    job, _ = job_with_a_slow_holder(clock)
    job.trial_at = clock.now
    clock.now += 4.0
    looks(job, 0, clock.now, 50 << 10)  # (as much as before the trial)
    job.paces.append((clock.now, True, CHUNK, 3.5))  # 4 MiB in 3.5 s: twenty times the holder's pace
    assert job._judge_peers(clock.now) == "fine"
    assert job.trial_at is None and job.limits.link_bound_at == clock.now


def test_a_trial_the_hub_can_take_no_chunk_for_ends_without_a_verdict(clock: Clock) -> None:
    """Each chunk left has its two copies in flight: the Hub on trial takes none. Its trial waits a window
    for it (a request that ended unlanded leaves it open), then ends without a verdict: the fixed rate alone
    judged healthy peers slow on a narrow link, and every file of the transfer followed (a review)."""
    job, _ = job_with_a_slow_holder(clock)
    asyncio.run(job._try_hub(clock.now))
    clock.now += 1.0
    assert job._judge_peers(clock.now) == "fine"
    job.requests[1] = [on_the_wire(HUB, clock.now, 0)]
    clock.now += 1.0
    assert job._judge_peers(clock.now) == "fine"
    del job.requests[1]  # (cancelled: a reset, or the endgame)
    clock.now += 7.0  # (the window is 8 s: two chunks at the fixed rate)
    assert job._judge_peers(clock.now) == "fine" and job._trial_open()
    clock.now += 1.5
    assert job._judge_peers(clock.now) == "fine"
    assert job.trial_at is None and not job.hub_on_trial and job.limits.trial_by is None
    assert job._judge_peers(clock.now + 7.0) == "fine"  # (not tried again for a window)
    assert job._judge_peers(clock.now + 8.5) == "try"


def test_the_hub_on_trial_takes_an_endgame_copy_when_every_chunk_is_in_flight(clock: Clock) -> None:
    """A file whose chunks are all asked of the peers (48-192 MiB from three holders, or a tail): the Hub on
    trial duplicates the one outstanding longest at once, where it waited for a peer stuck (minutes on a
    narrow link), its trial ran out, and the fixed rate judged alone (a review)."""
    job, peer = job_with_a_slow_holder(clock)
    job.gaps_only = True  # (outside a swarm, the Hub joined as a gap filler)
    began = time.monotonic() - 5.0  # (the choices read the real clock)
    job.requests = {index: [on_the_wire(peer, began + index / 10, 1 << 20)] for index in range(SIZE // CHUNK)}
    assert job._pick(HUB) == (None, pytest.approx(15.0, abs=0.5))  # (a peer stuck 20 s: twice the patience)
    job.hub_on_trial = True
    assert job._pick(HUB) == (0, None)


def test_one_file_of_a_transfer_tries_the_hub_at_a_time(clock: Clock) -> None:
    job, _ = job_with_a_slow_holder(clock)
    other, _ = job_with_a_slow_holder(clock, job.limits)
    asyncio.run(job._try_hub(clock.now))
    assert other._judge_peers(clock.now) == "fine"
    job._end_trial()
    assert other._judge_peers(clock.now) == "try"


def test_a_hub_found_no_faster_has_its_trial_stopped(clock: Clock) -> None:
    """Its request would land a whole chunk more from the Hub (16 MiB, 80 s at a share of a 20 Mbit link): it
    is stopped, its part kept for the peer that sends the rest (a review)."""

    async def main() -> None:
        job, peer = job_with_a_slow_holder(clock)
        await job._try_hub(clock.now)
        trial = on_the_wire(HUB, clock.now, int(pace_module.PACE_MIN * (50 << 10)))
        trial.trial = True
        trial.task = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
        job.requests[1] = [trial]
        job.requests[0] = [on_the_wire(peer, clock.now - 20.0, 20 * (50 << 10))]
        clock.now += pace_module.PACE_MIN
        looks(job, 0, clock.now, 50 << 10)  # (as much as before the trial)
        assert job._judge_peers(clock.now) == "fine"
        assert trial.task is not None and trial.task.cancelled()
        assert not job.requests[0][0].trial

    asyncio.run(main())


def test_a_trial_waits_for_a_pace_of_the_peers(clock: Clock) -> None:
    """Its peer requests all wait for slots the transfer's other files hold: no pace to compare, and any
    Hub byte said "slow" (a review)."""
    job, peer = job_with_a_slow_holder(clock)
    job.trial_at = clock.now
    job.requests[0] = [ChunkRequest(peer, clock.now)]  # (not on the wire)
    job.requests[1] = [on_the_wire(HUB, clock.now, 4 * pace_module.PACE_MIN * (50 << 10))]
    clock.now += pace_module.PACE_MIN
    assert job._judge_peers(clock.now) == "fine" and job.trial_at is not None


def test_a_trial_ends_when_the_link_is_found_to_bind_otherwise_or_the_process_stood_still(
    clock: Clock,
) -> None:
    job, _ = job_with_a_slow_holder(clock)
    asyncio.run(job._try_hub(clock.now))
    job.limits.link_bound_at = clock.now  # (its claims given up, say)
    assert job._judge_peers(clock.now + 1) == "fine"
    assert job.trial_at is None and not job.hub_on_trial and job.limits.trial_by is None
    job.limits.link_bound_at = None
    asyncio.run(job._try_hub(clock.now))
    job.looked["pace"] = clock.now
    clock.now += 10.0  # (SIGSTOP: what the trial measured spans the stop)
    assert job._stood_still("pace", clock.now)
    assert job.trial_at is None and job.limits.trial_by is None


def test_a_hub_sending_already_is_the_yardstick_without_a_trial(clock: Clock) -> None:
    job, peer = job_with_a_slow_holder(clock)
    job.requests[0] = [on_the_wire(peer, clock.now - 20.0, 20 * (50 << 10))]
    job.requests[1] = [on_the_wire(HUB, clock.now - 10.0, 10 * (60 << 10))]  # no faster
    assert job._judge_peers(clock.now) == "fine" and job.trial_at is None
    assert job.limits.link_bound_at is None  # (measured afresh each look: the Hub sends anyway)
    job.requests[1] = [on_the_wire(HUB, clock.now - 10.0, 10 * (500 << 10))]  # ten times the peer's
    assert job._judge_peers(clock.now) == "slow"


def test_in_a_swarm_the_hub_on_trial_may_take_one_chunk_a_holder_holds(clock: Clock) -> None:
    """A holder's chunk is the Hub's only while it is on trial, one request at a time."""
    job, peer = job_with_a_slow_holder(clock)
    job.swarm = types.SimpleNamespace(  # type: ignore[assignment]
        claims={}, gave_up_at=None, standing_claim=lambda *_: None, settlers_lost=lambda *_: False,
        may_claim_fresh=lambda *_: True, digest=lambda _: None,
    )  # fmt: skip
    job.requests = {
        0: [on_the_wire(peer, clock.now - 1.0, 1 << 20)]
    }  # (not stuck: a holder the Hub waits for)
    assert job._may_take(peer, 3, clock.now)
    assert not job._may_take(HUB, 3, clock.now)
    job.hub_on_trial = True
    assert job._may_take(HUB, 3, clock.now)
    job.requests[2] = [on_the_wire(HUB, clock.now, 0)]
    assert not job._may_take(HUB, 3, clock.now)  # (one request of the Hub's at a time)


def test_after_a_stop_the_hub_is_tried_only_once_what_came_before_is_known(clock: Clock) -> None:
    """The process stood still: what it received is looked at afresh. A trial begun with no look before it
    had no gain to measure, and a Hub ten times faster was judged "no faster" (a review): none begins until
    the looks span PACE_MIN, and a trial whose gain cannot be measured goes on."""
    job, _ = job_with_a_slow_holder(clock)
    job.received.clear()
    looks(job, clock.now, clock.now, 50 << 10)  # (one look)
    assert job._judge_peers(clock.now) == "fine"
    looks(job, 0, clock.now + pace_module.PACE_MIN + 1, 50 << 10)
    clock.now += pace_module.PACE_MIN + 1
    assert job._judge_peers(clock.now) == "try"
    job.received.clear()
    job.trial_at = clock.now
    job.requests[1] = [on_the_wire(HUB, clock.now, 0)]
    clock.now += pace_module.PACE_MIN
    job.requests[1] = [on_the_wire(HUB, clock.now - pace_module.PACE_MIN, 10 << 20)]
    assert job._gain(clock.now, job.trial_at) is None
    assert job._judge_peers(clock.now) == "fine" and job.trial_at is not None  # (no verdict: it goes on)


def test_a_file_that_ends_on_trial_lets_the_others_try(clock: Clock) -> None:
    job, _ = job_with_a_slow_holder(clock)
    asyncio.run(job._try_hub(clock.now))
    job.partial.done = dict.fromkeys(range(job.partial.chunks), "x")  # (its last chunk landed)
    asyncio.run(job._watch_pace())
    assert job.limits.trial_by is None and job.trial_at is None


def test_outside_a_swarm_the_gap_filler_on_trial_takes_one_held_chunk_at_a_time(clock: Clock) -> None:
    job, _ = job_with_a_slow_holder(clock)
    job.gaps_only = True
    assert not job._may_take(HUB, 3, clock.now)
    job.hub_on_trial = True
    assert job._may_take(HUB, 3, clock.now)
    job.requests[2] = [on_the_wire(HUB, clock.now, 0)]
    assert not job._may_take(HUB, 3, clock.now)


def test_in_a_swarm_a_trial_stops_only_its_requests_on_the_wire_whose_chunk_is_not_being_written(
    clock: Clock,
) -> None:
    """A request still claiming, stopped, left its claim standing in the registry; one whose chunk's other
    copy is being written had its claim withdrawn, and the chunk was never settled (a review)."""

    async def main() -> None:
        job, peer = job_with_a_slow_holder(clock)
        withdrawn: list[set[int]] = []

        async def withdraw(chunks: set[int]) -> None:
            withdrawn.append(set(chunks))

        job.swarm = types.SimpleNamespace(withdraw=withdraw, gave_up_at=None)  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        requests = {}
        for index, wire in ((1, True), (2, True), (3, False)):
            request = on_the_wire(HUB, clock.now, 1 << 10) if wire else ChunkRequest(HUB, clock.now)
            request.trial, request.task = True, loop.create_future()  # type: ignore[assignment]
            requests[index] = request
        landing = on_the_wire(peer, clock.now - 5, CHUNK)
        landing.landing = True
        job.requests.update({1: [requests[1], landing], 2: [requests[2]], 3: [requests[3]]})
        job.trial_at = clock.now
        job._end_trial(stop=True)
        await asyncio.sleep(0)
        assert [index for index, r in requests.items() if r.task is not None and r.task.cancelled()] == [2]
        assert withdrawn == [{2}]

    asyncio.run(main())


def test_a_trial_is_judged_by_what_its_transfer_receives(clock: Clock) -> None:
    """Every file's requests, in flight and ended, and the files that ended: not the process's counters, which
    a serve process's other pulls shift (a review)."""
    job, _ = job_with_a_slow_holder(clock)
    other, _ = job_with_a_slow_holder(clock, job.limits)
    job.limits.files.update({job, other})
    assert job.limits.received() == 2 * (1 << 20)  # (each one's request in flight: 1 MiB in)
    job.ended_bytes += CHUNK  # (a chunk of it landed)
    job.limits.files.discard(other)
    job.limits.files_ended_bytes += other.bytes_received()
    assert job.limits.received() == CHUNK + 2 * (1 << 20)
    job.requests[0][0].receiving.in_place = 1 << 19  # (half of it an earlier pull's part: not received)
    assert job.limits.received() == CHUNK + (1 << 20) + (1 << 19)


def test_a_hub_copy_cancelled_before_it_lands_counts_in_its_trial(clock: Clock) -> None:
    """The Hub's endgame copy lost to the peer's (cancelled, unlanded): its time on the wire still counts, so
    the trial ends with a verdict at PACE_MIN on the wire, where it ran on past it (a review)."""
    job, _ = job_with_a_slow_holder(clock)
    job.trial_at = clock.now
    cancelled = on_the_wire(HUB, clock.now, 2 * (50 << 10))  # 2 s at the holder's pace
    clock.now += 2.0
    job._request_ended(cancelled)
    assert job.ended_bytes == 2 * (50 << 10)
    job.requests[1] = [on_the_wire(HUB, clock.now, 50 << 10)]
    clock.now += 1.0
    looks(job, 0, clock.now, 50 << 10)  # (as much as before the trial)
    assert job._judge_peers(clock.now) == "fine"
    assert job.trial_at is None and job.limits.link_bound_at == clock.now


def test_a_hub_request_that_never_went_on_the_wire_adds_no_time_to_its_trial(clock: Clock) -> None:
    job, _ = job_with_a_slow_holder(clock)
    job.trial_at = clock.now
    waited = ChunkRequest(HUB, clock.now)  # (it waited for a slot, then was cancelled)
    clock.now += 2.0
    job._request_ended(waited)
    assert job._paces(clock.now, job.trial_at)[0] == (0, 0.0)


def test_outside_a_trial_a_hub_copy_that_ended_unlanded_is_no_yardstick(clock: Clock) -> None:
    """A cancelled endgame copy's first second (a burst on a shaped link) judged healthy peers slow for a
    window, with no trial (a review): outside a trial, it leaves no pace."""
    job, _ = job_with_a_slow_holder(clock)
    copy = on_the_wire(HUB, clock.now, 128 << 10)
    clock.now += 1.0
    job._request_ended(copy)
    clock.now += 5.0
    looks(job, 0, clock.now, 50 << 10)
    assert job._judge_peers(clock.now) == "try"
