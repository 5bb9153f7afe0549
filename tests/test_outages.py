"""Outages with the pull's outage clock on (MODELDEPOT_OUTAGE_PATIENCE; the suite runs with 0 elsewhere): a
node that goes away is failed over at once, the time nothing is asked is no silence, a slow link is no
outage, resumed bytes are no answer, a short patience never takes a range's attempts away (a review of the
clock's first version: each of these failed on it)."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import LiveNode, closed_port, free_port, serving_repo
from faultproxy import FaultProxy, a_slow_node_before_the_hub, pull_in_a_thread, wait_until
from modeldepot import Depot
from modeldepot.errors import UpstreamError
from modeldepot.transfer.progress import PullUpdate
from restarting import RestartingServer

REPO = "acme/faulty"
BIG = "model.safetensors"
FILES = {"config.json": b"{}", BIG: random.Random(11).randbytes(6 << 20)}


def test_a_configured_node_that_goes_away_mid_pull_is_failed_over_to_the_hub_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A configured node (MODELDEPOT_SERVERS) is the file's only source, the Hub its fallback, and the node
    goes away mid-pull: every connection to it closed unanswered (a reset, an unreachable host: fast
    failures, not a refusal). Its failures count, and the Hub finishes the file after the node's five
    attempts. The clock's first version took them for the network's (only the node was asked, so the pull
    heard nothing) and waited the whole patience for the node, saying that no source answered."""
    chunk = 1 << 20
    with serving_repo(tmp_path / "upstream", FILES, REPO, chunk_size=chunk) as node, \
            a_slow_node_before_the_hub(node, monkeypatch, BIG, patience=60) as plan:  # fmt: skip
        outcome: list[object] = []
        with Depot(tmp_path / "local", chunk_size=chunk) as depot:
            pulling = pull_in_a_thread(depot, REPO, outcome)
            wait_until(lambda: plan.body_bytes > chunk)
            plan.down_until = time.monotonic() + 3600  # the node is gone for good
            gone = time.monotonic()
            pulling.join(90)
            took = time.monotonic() - gone
            assert not pulling.is_alive()
            assert not isinstance(outcome[0], Exception), outcome
            assert bytes(depot.get_file(REPO, BIG)) == FILES[BIG]
    said = [r.getMessage() for r in caplog.records if "no source has sent anything" in r.getMessage()]
    assert took < 25 and not said, (
        f"the Hub took over {took:.0f} s after the node went away (said: {said[:1]})"
    )


def test_the_silence_of_a_hub_that_never_answered_a_pull_looked_up_through_a_node_names_hf_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A pull looks the repo up through a configured node (``pull --server``), the node goes away mid-pull,
    and nothing listens at HF_ENDPOINT (mistyped, or the network went): it is waited out as an outage (a
    Wi-Fi blip is silent everywhere; failing it at once ended pulls through a node: a review), and the
    warning says that the Hub never answered, so that a wrong HF_ENDPOINT is looked at (a user's first try
    of a mirror with --server waited two minutes without a word on it)."""
    chunk = 1 << 20
    with serving_repo(tmp_path / "upstream", FILES, REPO, chunk_size=chunk) as node, \
            a_slow_node_before_the_hub(node, monkeypatch, BIG, patience=12) as plan:  # fmt: skip
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # (nothing listens there)
        outcome: list[object] = []
        with Depot(tmp_path / "local", chunk_size=chunk) as depot:
            pulling = pull_in_a_thread(depot, REPO, outcome)
            wait_until(lambda: plan.body_bytes > chunk)
            plan.down_until = time.monotonic() + 3600
            pulling.join(90)
            assert not pulling.is_alive()
    [failed] = outcome
    assert isinstance(failed, UpstreamError) and "MODELDEPOT_OUTAGE_PATIENCE" in str(failed), failed
    said = [r.getMessage() for r in caplog.records if "no source has sent anything" in r.getMessage()]
    assert said and "the Hub has not answered this pull once: if HF_ENDPOINT is wrong" in said[0], said


def test_a_pull_without_a_clock_rides_out_an_upstream_that_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MODELDEPOT_OUTAGE_PATIENCE=0 (as a control API's pull job): the upstream restarts mid-pull, refusing
    connections for 2 s. The range's five attempts spread over seconds of backoff ride it out; made 0.2 s
    apart for every pull without a clock (for a mirror's headers), they gave up within a second (a review)."""
    chunk = 1 << 20
    files = {"config.json": b"{}", BIG: random.Random(12).randbytes(8 << 20)}
    with serving_repo(tmp_path / "upstream", files, REPO, chunk_size=chunk) as node:
        slow = FaultProxy(node.url)
        plan = slow.set("slow", times=-1, path_suffix=BIG, slow_delay=0.05)
        target = urlsplit(slow.url)
        upstream = RestartingServer(free_port(), (target.hostname or "127.0.0.1", target.port or 80))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", upstream.url)
        monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", "0")
        try:
            outcome: list[object] = []
            with Depot(tmp_path / "local", chunk_size=chunk) as depot:
                pulling = pull_in_a_thread(depot, REPO, outcome)
                wait_until(lambda: plan.body_bytes > chunk)
                upstream.down()
                time.sleep(2)
                upstream.up()
                pulling.join(120)
                assert not isinstance(outcome[0], Exception), outcome
                assert bytes(depot.get_file(REPO, BIG)) == files[BIG]
        finally:
            upstream.down()
            slow.stop()


def test_resumed_bytes_at_the_start_of_a_try_are_not_taken_for_a_source_that_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A try that starts over reports what it resumes from disk, file by file: no source answered. Taken for
    bytes that came, it set the patience back each try, and a pull whose tries fail for want of an answer
    never gave up (saying "bytes come again" each time). Only answers and bodies tell the clock."""
    from modeldepot.transfer import outage

    tries = 0

    async def a_try(watch: Callable[[PullUpdate], None]) -> str:
        nonlocal tries
        tries += 1
        if tries > 50:
            return "never gave up"
        # (as _PullRun reports two partially downloaded files it resumes, before any request)
        watch(PullUpdate("a.bin", 100, 1000, 100, 2000))
        watch(PullUpdate("b.bin", 300, 1000, 400, 2000))
        await asyncio.sleep(0.05)
        failed = UpstreamError("no answer")
        failed.network = True
        raise failed

    caplog.set_level(logging.INFO)
    old = outage.OUTAGE_FIRST_WAIT, outage.OUTAGE_LONGEST_WAIT
    outage.OUTAGE_FIRST_WAIT = outage.OUTAGE_LONGEST_WAIT = 0.01
    try:
        with pytest.raises(UpstreamError, match="MODELDEPOT_OUTAGE_PATIENCE"):
            outage.run_through_outages(a_try, None, 0.3, REPO)
    finally:
        outage.OUTAGE_FIRST_WAIT, outage.OUTAGE_LONGEST_WAIT = old
    assert not any("bytes come again" in r.getMessage() for r in caplog.records)


def test_silence_while_no_source_was_asked_does_not_use_up_the_patience(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time no range asks anything is no silence: here the pull waits for another process that holds the
    download (suspended, then killed), and as it takes the download over its first attempts meet a blip (a
    second of connections closed unanswered). The clock's first version counted the wait as silence past
    the patience and ended the range after one attempt, and the pull with it."""
    import signal
    import subprocess
    import sys

    from conftest import SMALL_CHUNK
    from fleetnodes import base_env

    files = {BIG: random.Random(12).randbytes(24 * SMALL_CHUNK)}
    home = tmp_path / "local"
    with serving_repo(tmp_path / "upstream", files, REPO, chunk_size=SMALL_CHUNK) as node:
        proxy = FaultProxy(node.url)
        first = subprocess.Popen(
            [sys.executable, "-m", "modeldepot", "pull", REPO, "--home", str(home), "--max-rate", "1MiB/s"],
            env=base_env(HF_ENDPOINT=node.url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(lambda: (home / "partials").exists() and any((home / "partials").glob("*.log")))
            first.send_signal(signal.SIGSTOP)
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", proxy.url)
            monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", "5")
            monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", "2")
            outcome: list[object] = []
            with Depot(home, chunk_size=SMALL_CHUNK) as depot:
                second = pull_in_a_thread(depot, REPO, outcome)
                time.sleep(8)  # it waits for the suspended process
                proxy.plan.down_until = time.monotonic() + 1.0  # a one-second blip as it takes over
                first.kill()
                first.wait()
                second.join(60)
                assert not second.is_alive()
                assert not isinstance(outcome[0], Exception), outcome
                assert bytes(depot.get_file(REPO, BIG)) == files[BIG]
        finally:
            first.kill()
            first.wait()
            proxy.stop()


def test_a_hub_behind_a_gateway_that_says_502_is_waited_out_as_an_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub down behind a load balancer, a CDN or a corporate proxy answers 502 Bad Gateway: every pull of a
    fleet failed after its five attempts (23-30 s), where the same outage as a refused connection was waited out
    for the patience (an explorer's trial). A gateway's 502/503/504 from the Hub is an outage too."""
    from conftest import SMALL_CHUNK

    files = {BIG: random.Random(13).randbytes(16 * SMALL_CHUNK)}
    with serving_repo(tmp_path / "upstream", files, REPO, chunk_size=SMALL_CHUNK) as node:
        proxy = FaultProxy(node.url)
        plan = proxy.set("502", times=-1)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", proxy.url)
        monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", "60")
        outcome: list[object] = []
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as depot:
                pulling = pull_in_a_thread(depot, REPO, outcome)
                time.sleep(12)  # (past the five attempts' backoff, ~8 s)
                assert pulling.is_alive(), outcome
                assert plan.injected >= 5, plan.injected
                proxy.set("pass")
                pulling.join(60)
                assert not pulling.is_alive()
                assert not isinstance(outcome[0], Exception), outcome
                assert bytes(depot.get_file(REPO, BIG)) == files[BIG]
        finally:
            proxy.stop()


def test_a_depot_nodes_own_503_is_no_outage_to_wait_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A depot node given as HF_ENDPOINT that refuses with a reason of its own (503 Offline, ReadOnlyStore: its
    X-Error-Code) is no gateway before a Hub that is down: no wait mends it, and the pull fails after its
    attempts, not after the outage's patience (a review)."""
    from conftest import SMALL_CHUNK

    files = {BIG: random.Random(14).randbytes(16 * SMALL_CHUNK)}
    with serving_repo(tmp_path / "upstream", files, REPO, chunk_size=SMALL_CHUNK) as node:
        proxy = FaultProxy(node.url)
        proxy.set("503-offline", times=-1)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", proxy.url)
        monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", "60")
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as depot:
                began = time.monotonic()
                with pytest.raises(UpstreamError, match="HTTP 503"):
                    depot.pull(REPO)
                assert time.monotonic() - began < 40, "the node's own refusal was waited out as an outage"
        finally:
            proxy.stop()


def test_a_slow_but_alive_link_is_not_taken_for_an_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow link is no outage: an attempt that has its answer and reads counts as heard until it ends (a
    stall ends it after the read timeout). The clock's first version heard bytes only per 256 KiB piece, so
    a 512 kbit/s link was 4 s of silence at a time (and under 17 kbit/s the whole patience)."""
    from modeldepot.transfer import outage

    clocks: list[outage.OutageClock] = []

    class Recorded(outage.OutageClock):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            clocks.append(self)

    monkeypatch.setattr(outage, "OutageClock", Recorded)
    chunk = 1 << 20
    with serving_repo(tmp_path / "upstream", FILES, REPO, chunk_size=chunk) as node:
        proxy = FaultProxy(node.url)
        try:
            plan = proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=1.0)  # 64 KiB a second
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", proxy.url)
            monkeypatch.setenv("MODELDEPOT_CONNECTIONS", "1")
            monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", "120")  # (conftest sets 0: no clock)
            with Depot(tmp_path / "local", chunk_size=chunk) as depot:
                pulling = threading.Thread(target=lambda: depot.pull(REPO))
                pulling.start()
                wait_until(lambda: plan.body_bytes > 0)
                worst, last_sent, sent = 0.0, time.monotonic(), plan.body_bytes
                until = time.monotonic() + 10
                while time.monotonic() < until:
                    if plan.body_bytes != sent:
                        sent, last_sent = plan.body_bytes, time.monotonic()
                    if time.monotonic() - last_sent < 1.1:  # bytes came within the last second
                        worst = max(worst, clocks[0].silent_for())
                    time.sleep(0.05)
                plan.slow_delay = 0.0
                pulling.join(60)
        finally:
            proxy.stop()
    assert worst < outage.QUIET_BEFORE_OUTAGE, (
        f"silent for {worst:.1f} s by the clock while bytes arrived every 1 s"
    )


def test_a_short_patience_never_gives_a_range_fewer_attempts_than_no_patience(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A range always has its five attempts: a patience shorter than the quiet that makes an outage (or one
    used up) gave the Hub's range one attempt, where no patience gives five."""
    import modeldepot.transfer.sources as sources
    from modeldepot.transfer import outage

    async def no_wait(seconds: float) -> None:
        pass

    monkeypatch.setattr(sources.asyncio, "sleep", no_wait)
    port = closed_port()  # (nothing listens there: the Hub's refusal, a blip)
    source = sources.HttpSource(f"http://127.0.0.1:{port}", "hub", None, sources.RetryPolicy(attempts=5))
    tries: dict[str, str] = {}
    for label, clock in (("no clock", None), ("patience 1 s", outage.OutageClock(1.0, REPO))):
        if clock is not None:
            clock.last_heard -= 2.5  # the pull has been quiet for 2.5 s (its setup, a slow link)

        async def read(clock: outage.OutageClock | None = clock) -> None:
            outage.OUTAGE.set(clock)
            await source.fetch(f"http://127.0.0.1:{port}/x", 0, 9, 10)

        with pytest.raises(UpstreamError) as failed:
            asyncio.run(read())
        tries[label] = str(failed.value).rsplit(" after ", 1)[-1]
    assert tries == {"no clock": "5 attempts", "patience 1 s": "5 attempts"}, tries


def test_an_attempt_that_ended_is_no_sign_of_life_while_its_range_waits() -> None:
    """An attempt that got its answer counts as heard while it reads; once it ended (failed: a stall after
    the headers), it is not: kept as in flight while its range waited to ask again (backoff up to 30 s),
    it made the whole pull look heard from, and no outage was seen."""
    from modeldepot.transfer.outage import OutageClock
    from modeldepot.transfer.ranged import Attempt

    clock = OutageClock(60.0, REPO)
    token = clock.asking_begins()
    clock.last_heard -= 10  # (nothing for 10 s)
    stalled = Attempt()
    stalled.activity = time.monotonic() - 5  # answered 5 s ago, nothing since
    clock.attempt(token, stalled)
    assert clock.silent_for() == 0 and not clock.outage()
    clock.attempt_ended(token, heard=False)  # (headers, then a stalled body: no answer)
    assert clock.silent_for() >= 4.5 and clock.outage()


def test_a_pull_started_on_a_node_rides_out_an_outage_as_the_clis_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull started through the node's control API (the dashboard's Pull: the POST answered at once) ran
    one try: its only source gone for a few seconds (a node restarted, a network blip), it failed 6 s later
    whatever MODELDEPOT_OUTAGE_PATIENCE said, where `modeldepot pull` waited it out (an explorer's trial)."""
    from controlnodes import API, call

    chunk = 1 << 20
    with serving_repo(tmp_path / "upstream", FILES, REPO, chunk_size=chunk) as node:
        proxy = FaultProxy(node.url)
        try:
            plan = proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.05)  # 1.3 MB/s a connection
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # (no Hub behind it)
            monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", "60")
            monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", "2")
            with Depot(tmp_path / "local", chunk_size=chunk, servers=[proxy.url]) as depot:
                served = LiveNode(depot, token="t0ken")
                try:
                    auth = {"Authorization": "Bearer t0ken"}
                    started = call(served.port, "POST", f"{API}/pulls", {"repo": REPO}, auth)
                    assert started.status == 202, started.body
                    job = started.json()["id"]
                    wait_until(lambda: plan.body_bytes > chunk)
                    plan.down_until = time.monotonic() + 10  # (longer than a range's five attempts)
                    deadline = time.monotonic() + 90
                    while (state := call(served.port, "GET", f"{API}/pulls/{job}", headers=auth).json())[
                        "state"
                    ] == "running" and time.monotonic() < deadline:
                        time.sleep(0.2)
                    assert state["state"] == "done", state
                    assert bytes(depot.get_file(REPO, BIG)) == FILES[BIG]
                finally:
                    served.stop()
        finally:
            proxy.stop()
