"""The transfer engine against a misbehaving network: every fault ends with correct bytes committed, or the
file marked failed with nothing committed; a killed pull resumes without refetching finished chunks; two
pullers of the same content make one transfer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SMALL_CHUNK, LiveNode, serving_repo, store_files_consistent, write_model_dir
from faultproxy import (
    FaultPlan,
    FaultProxy,
    a_slow_node_before_the_hub,
    proxied_node,
    pull_in_a_thread,
    wait_until,
)
from modeldepot import Depot, IntegrityError
from modeldepot.errors import NotFoundError, PullRunningError, UpstreamError, UpstreamTimeoutError
from modeldepot.hashing import chunk_span
from modeldepot.hub.manifest import INTERRUPTED, INTERRUPTED_NOTHING_KEPT, Manifest
from modeldepot.transfer.progress import PullUpdate
from modeldepot.transfer.pull import PullResult
from modeldepot.transfer.ranged import Attempt, SlowBody, TooSlowError, read_range, reading_body
from modeldepot.transfer.threads import to_thread_to_the_end

REPO = "acme/faulty"
BIG = "model.safetensors"


def repo_files(big_chunks: int) -> dict[str, bytes]:
    rng = random.Random(big_chunks)
    return {
        "config.json": b'{"model_type": "bert"}',
        "tokenizer.json": b'{"vocab": {"a": 0, "b": 1}}',
        BIG: rng.randbytes(big_chunks * SMALL_CHUNK + 1234),  # many chunks, the last one short
    }


FILES = repo_files(24)


def serving(tmp_path: Path, files: dict[str, bytes]) -> contextlib.AbstractContextManager[LiveNode]:
    """A node on loopback that holds ``files`` as REPO."""
    return serving_repo(tmp_path, files, REPO, chunk_size=SMALL_CHUNK)


def configs(seed: int, count: int) -> dict[str, bytes]:
    """``count`` small plain files (configs, tokenizers: one chunk each)."""
    rng = random.Random(seed)
    return {f"configs/c{i:02d}.json": rng.randbytes(rng.randrange(100, 3000)) for i in range(count)}


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LiveNode]:
    with serving(tmp_path, FILES) as node:
        yield node


@pytest.fixture
def proxy(upstream: LiveNode) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(upstream.url)
    yield fault_proxy
    fault_proxy.stop()


def local_depot(home: Path, proxy: FaultProxy, as_node: bool, monkeypatch: pytest.MonkeyPatch,
                read_timeout: float = 1) -> Depot:  # fmt: skip
    """A depot that reaches the upstream through the proxy, either as the Hub (whole-file SHA-256 only) or
    as a depot server (a BLAKE3 per chunk too)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", str(read_timeout))
    if as_node:
        monkeypatch.setenv("MODELDEPOT_SERVERS", proxy.url)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: a Hub nobody reaches
    else:
        monkeypatch.setenv("HF_ENDPOINT", proxy.url)
    return Depot(home, chunk_size=SMALL_CHUNK)


def assert_committed(depot: Depot) -> None:
    for path, data in FILES.items():
        assert bytes(depot.get_file(REPO, path)) == data
    assert store_files_consistent(depot) == []


def assert_nothing_of_big_committed(depot: Depot) -> None:
    assert not depot.has_file(REPO, BIG)
    assert store_files_consistent(depot) == []


RECOVERABLE = ["drop", "500", "429", "stall", "ignore-range"]


@pytest.mark.parametrize("as_node", [False, True], ids=["hub", "node"])
@pytest.mark.parametrize("mode", RECOVERABLE)
def test_a_transient_fault_still_commits_correct_bytes(
    mode: str, as_node: bool, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = proxy.set(mode, times=1 if mode != "ignore-range" else -1, path_suffix=BIG)
    with local_depot(tmp_path / "local", proxy, as_node, monkeypatch) as depot:
        result = depot.pull(REPO)
        assert plan.injected >= 1
        assert result.files == len(FILES)
        assert_committed(depot)
        assert depot.get_manifest(REPO).variants[0].status == "downloaded"
    assert not any((tmp_path / "local" / "partials").glob("*.part")), "a finished pull leaves no partials"


def test_a_flipped_byte_from_a_node_is_refetched_and_never_committed(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = proxy.set("flip", times=1, path_suffix=BIG)
    # (no stall to cut short here: on a loaded machine a 1 s read timeout made a retry, a request more)
    with local_depot(tmp_path / "local", proxy, True, monkeypatch, read_timeout=30) as depot:
        depot.pull(REPO)
        assert plan.injected == 1
        chunks = -(-len(FILES[BIG]) // SMALL_CHUNK)
        assert len([r for r in plan.requests if r.split()[0].endswith(BIG)]) == chunks + 1  # one refetch
        assert_committed(depot)


@pytest.mark.parametrize("hub_reachable", [True, False], ids=["hub", "no-hub"])
def test_a_node_banned_for_a_bad_chunk_is_not_asked_for_the_next_file(
    proxy: FaultProxy,
    upstream: LiveNode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hub_reachable: bool,
) -> None:
    """A node whose chunk failed its BLAKE3 is banned for 30 s, as the log says: the next file's download
    began with it as its one source and asked it again, a liar's bytes sent for every file of a pull (an
    explorer's trial). The Hub is asked instead; with no Hub to reach, the node remains the last resort."""
    from modeldepot.transfer import choosing

    plan = proxy.set("flip", times=1, path_suffix=BIG)
    local_depot(tmp_path / "local", proxy, True, monkeypatch, read_timeout=30).close()  # (its settings)
    if hub_reachable:
        monkeypatch.setenv("HF_ENDPOINT", upstream.url)
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as depot:
        try:
            depot.download_file(REPO, BIG)
            assert plan.injected == 1 and choosing.BANNED_NODES, "the node was banned for its bad chunk"
            asked = len(plan.requests)
            assert depot.download_file(REPO, "tokenizer.json").size == len(FILES["tokenizer.json"])
            assert (len(plan.requests) == asked) is hub_reachable, plan.requests[asked:]
            assert_committed_file(depot, "tokenizer.json")
        finally:
            choosing.BANNED_NODES.clear()


def assert_committed_file(depot: Depot, path: str) -> None:
    assert bytes(depot.get_file(REPO, path)) == FILES[path]
    assert store_files_consistent(depot) == []


def test_a_flipped_byte_from_the_hub_fails_the_file_and_commits_nothing(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = proxy.set("flip", times=1, path_suffix=BIG)
    with local_depot(tmp_path / "local", proxy, False, monkeypatch) as depot:
        with pytest.raises(IntegrityError, match="SHA-256"):
            depot.pull(REPO)
        assert plan.injected == 1
        assert_nothing_of_big_committed(depot)
        variant = depot.get_manifest(REPO).variants[0]
        assert variant.status == "failed" and "SHA-256" in (variant.error or "")
        # The bad partial was reset: the next pull starts that file over and gets it right; the small
        # files, verified the first time but not published without the big one, are resumed.
        result = depot.pull(REPO)
        assert result.bytes_resumed == sum(len(d) for p, d in FILES.items() if p != BIG)
        assert result.bytes_downloaded == len(FILES[BIG])
        assert_committed(depot)


KEEPS_FAILING = {"500": UpstreamError, "404": NotFoundError}


@pytest.mark.parametrize("mode", sorted(KEEPS_FAILING))
def test_a_source_that_keeps_failing_marks_the_file_failed(
    mode: str, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy.set(mode, times=-1, path_suffix=BIG)
    with local_depot(tmp_path / "local", proxy, False, monkeypatch) as depot:
        with pytest.raises(KEEPS_FAILING[mode], match=BIG) as failed:
            depot.pull(REPO)
        assert failed.value.path == BIG
        assert_nothing_of_big_committed(depot)
        assert depot.get_manifest(REPO).variants[0].status == "failed"
        assert not depot.has_file(REPO, "config.json"), "a pull publishes all of its files or none"


@pytest.mark.parametrize("as_node", [False, True], ids=["hub", "node"])
def test_a_source_that_drips_its_body_fails_the_file_rather_than_holding_the_pull(
    as_node: bool, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 bytes every 0.1 s on each connection: a byte always comes within the read timeout (1 s), so it alone
    # never ends a request, and a chunk would take 800 s (a Hub that sent a byte a second held a pull for
    # ever); the ranges read at once bring under 1 KiB/s together.
    proxy.set("slow", times=-1, path_suffix=BIG, slow_piece=8, slow_delay=0.1)
    started = time.monotonic()
    with local_depot(tmp_path / "local", proxy, as_node, monkeypatch) as depot:
        # (a node's file fails over to the Hub, here out of reach: what each met is said)
        failed_as = UpstreamError if as_node else UpstreamTimeoutError
        with pytest.raises(
            failed_as, match=r"bytes \d+-\d+: the body came at \d+ B/s over \d s \(too slow"
        ) as failed:
            depot.pull(REPO)
        assert failed.value.path == BIG
        assert_nothing_of_big_committed(depot)
    # Five attempts of a read timeout each, and the backoff between them: not the 100 s of a chunk's drip,
    # nor 64 attempts resumed where each stopped (a cut link's)
    assert time.monotonic() - started < 60


def test_a_bodys_pace_leaves_out_what_the_reader_waited_for_itself() -> None:
    pace = SlowBody(0.2)
    time.sleep(0.25)
    pace.paused(0.25)  # (a rate limit of the user's held the reader)
    pace.took(10)
    time.sleep(0.25)
    with pytest.raises(TooSlowError, match="at least 1,024 B/s"):
        pace.took(20)
    fast = SlowBody(0.1)
    for spans in range(1, 4):
        time.sleep(0.1)
        fast.took(spans << 20)  # (a MiB in each span: well above the floor)


@pytest.mark.parametrize("framing", ["chunked", "close-delimited"])
def test_a_dripped_body_is_too_slow_whatever_its_framing(framing: str) -> None:
    """A body without a length (chunked, or ended by the close) was read a whole piece at a time, its pace
    looked at only then: a Hub that answered chunked dripped a byte at a time for ever (a review)."""
    size = 64 << 10
    framed = "Transfer-Encoding: chunked" if framing == "chunked" else "Connection: close"
    head = f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{size - 1}/{size}\r\n{framed}\r\n\r\n"
    drip = b"1\r\nx\r\n" if framing == "chunked" else b"x"
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            asked = b""
            while b"\r\n\r\n" not in asked:
                asked += connection.recv(4096)
            connection.sendall(head.encode())
            with contextlib.suppress(OSError):
                while not stop.wait(0.2):
                    connection.sendall(drip)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    started = time.monotonic()
    try:
        with pytest.raises(TooSlowError, match="too slow"):
            read_range(f"http://127.0.0.1:{listener.getsockname()[1]}/f", {}, 0, size - 1, size,
                       memoryview(bytearray(size)), 1.0, Attempt())  # fmt: skip
        assert time.monotonic() - started < 4, "held past its read timeout's span"
    finally:
        stop.set()
        listener.close()
        server.join(timeout=5)


def test_the_floor_of_a_bodys_pace_is_shared_by_the_bodies_read_at_once() -> None:
    """16 ranges of a link of 100 kbit/s bring under 1 KiB/s each: each alone is held to its share."""
    with reading_body(), reading_body():  # (this one and another)
        pace = SlowBody(0.1)
        time.sleep(0.12)
        pace.took(60)  # (60 B in a span of 0.1 s: above the 51 B its share of the floor asks for)
        time.sleep(0.12)
        with pytest.raises(TooSlowError, match="at least 512 B/s"):
            pace.took(80)


def _pull_process(home: Path, env: dict[str, str], interruptible: bool = False) -> subprocess.Popen[str]:
    """``modeldepot pull`` in its own process; ``interruptible``: with Python's own SIGINT handling, even
    when this process was started with SIGINT ignored."""
    start = ["-m", "modeldepot"]
    if interruptible:
        start = ["-c", "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                       "runpy.run_module('modeldepot', run_name='__main__', alter_sys=True)"]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, *start, "pull", REPO, "--home", str(home), "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _subprocess_env(proxy: FaultProxy) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(MODELDEPOT_SERVERS=proxy.url, HF_ENDPOINT="http://127.0.0.1:9", MODELDEPOT_CONNECTIONS="4")
    return env


BIG_FILES = repo_files(160)  # 10 MiB: long enough, through a slowed proxy, to be killed half-way


@pytest.fixture
def big_upstream(tmp_path: Path) -> Iterator[FaultProxy]:
    yield from proxied_node(tmp_path / "big-upstream", BIG_FILES, REPO)


def _killed_a_third_through(proxy: FaultProxy, home: Path) -> int:
    """A pull into a new store at ``home``, through ``proxy`` slowed down, SIGKILLed once a third of the
    big file has crossed: how many body bytes crossed by then."""
    Depot(home, chunk_size=SMALL_CHUNK).close()
    first = proxy.set("slow", times=-1, slow_delay=0.03)
    process = _pull_process(home, _subprocess_env(proxy))
    try:
        wait_until(lambda: first.body_bytes > len(BIG_FILES[BIG]) // 3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    return first.body_bytes


def test_a_pull_killed_outright_keeps_most_of_its_chunks_in_flight(
    big_upstream: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILL (the OOM killer, a preempted machine) lost every byte of the chunks in flight, which only a
    stop wrote down: five pulls killed after 2 s each kept 2 of the 150 MiB they received (an explorer's
    trial). The pull writes their parts down now and then; the resume asks for the rest alone."""
    proxy, home = big_upstream, tmp_path / "local"
    Depot(home, chunk_size=4 << 20).close()  # (3 chunks of the 10 MiB file: none lands before the kill)
    plan = proxy.set("slow", times=-1, slow_delay=0.1)  # ~640 KiB/s a connection
    process = _pull_process(home, _subprocess_env(proxy))
    try:
        wait_until(lambda: plan.body_bytes > 9 * (1 << 20) // 2, 60)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    big = BIG_FILES[BIG]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("MODELDEPOT_SERVERS", "HF_ENDPOINT", "MODELDEPOT_CONNECTIONS"):
        monkeypatch.setenv(name, _subprocess_env(proxy)[name])
    with Depot(home) as depot:
        [entry] = [f for f in depot.get_manifest(REPO).files if f.path == BIG]
        log = depot.store.partials.read_log(entry.sha256 or "")
        assert log is not None and not log.logged, "(no chunk had landed)"
        kept = sum(log.parts.values())
        assert kept >= 3 << 20, (
            log.parts
        )  # (at least 1 MiB of each of three chunks, written down every second)
        again = proxy.set("pass", times=-1)
        result = depot.pull(REPO)
        assert result.bytes_resumed >= kept
        assert bytes(depot.get_file(REPO, BIG)) == big
        assert 0 < again.body_bytes <= len(big) - kept + 4096, "only the rest was asked for"
        assert store_files_consistent(depot) == []


def _interrupted(process: subprocess.Popen[str], plan: FaultPlan, after: int, presses: int) -> str:
    """Ctrl-C ``presses`` times (50 ms apart) once ``after`` body bytes crossed; the pull's stderr (it exited 130)."""
    try:
        wait_until(lambda: plan.body_bytes > after)
        for _ in range(presses):
            process.send_signal(signal.SIGINT)
            time.sleep(0.05)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    return err


def test_after_ctrl_c_what_was_kept_is_said_alike_everywhere(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    """After a Ctrl-C the figures disagreed (a trial): the bar fell back 36 MiB, `status` said 64 MiB kept
    (the checked chunks), the resume said 112 MiB resumed (with the parts of the chunks in flight, kept as
    promised), `du` said 300 MiB partial (the room taken for the whole file). The parts kept count as kept:
    the interrupted line, the status row, `du` and the resume say the same bytes."""
    from modeldepot.cli.render import format_bytes

    proxy, home = big_upstream, tmp_path / "local"
    chunk = 1 << 20
    Depot(home, chunk_size=chunk).close()
    plan = proxy.set("slow", times=-1, slow_delay=0.03)
    err = _interrupted(
        _pull_process(home, _subprocess_env(proxy), interruptible=True), plan, 5 * chunk // 2, 1
    )
    small = sum(len(data) for path, data in BIG_FILES.items() if path != BIG)
    with Depot(home) as depot:
        manifest = depot.get_manifest(REPO)
        [big] = [f for f in manifest.files if f.path == BIG]
        log = depot.store.partials.read_log(big.sha256 or "")
        assert log is not None and log.parts, "(the chunks in flight kept their parts)"
        checked = sum(chunk_span(index, log.size, log.chunk_size)[1] for index in log.logged)
        kept = checked + sum(log.parts.values())
        variant = manifest.variants[0]
        assert kept <= variant.bytes_done <= kept + small, (
            "status counts the parts (and the configs, if done)"
        )
        said = f"interrupted: {format_bytes(variant.bytes_done)} of {format_bytes(variant.total_bytes)} kept"
        assert said in err, err
        assert depot.du().partial_kept_bytes == kept
    plan.slow_delay = 0.0
    again = _pull_process(home, _subprocess_env(proxy))
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    resumed = json.loads(out)["bytes_resumed"]
    assert abs(resumed - variant.bytes_done) <= small, (resumed, variant.bytes_done)


def test_a_ctrl_c_of_a_pull_another_process_waits_for_says_that_one_goes_on(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    """Two pulls of one repo, the second waiting for the first's downloads: a Ctrl-C of the first said
    "interrupted: 0 B of 10 MiB kept", the rows then the second's, which took the downloads over with every
    byte kept (an explorer's trial). It says the other process goes on."""
    proxy, home = big_upstream, tmp_path / "local"
    Depot(home, chunk_size=1 << 20).close()
    plan = proxy.set("slow", times=-1, slow_delay=0.03)
    first = _pull_process(home, _subprocess_env(proxy), interruptible=True)
    wait_until(lambda: plan.body_bytes > 1 << 20)
    second = _pull_process(home, _subprocess_env(proxy))
    try:
        with Depot(home) as depot:  # (the second waits for the first's claims)
            wait_until(lambda: bool(depot.store.partials.wanted_keys()))
        err = _interrupted(first, plan, 0, 1)
        assert f"interrupted: process {second.pid} (modeldepot pull {REPO} --home " in err, err
        assert f"goes on with the downloads of {REPO} this pull was making" in err and " kept" not in err, err
        plan.slow_delay = 0.0
        out, err = second.communicate(timeout=120)
    finally:
        if second.poll() is None:
            second.kill()
            second.communicate()
    assert second.returncode == 0, err
    assert json.loads(out)["bytes_resumed"] > 0, out


def test_a_ctrl_c_beside_another_pull_of_the_repo_that_shares_nothing_still_says_what_was_kept(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    """Another process pulls the same repo but none of these downloads (another variant, other files, another
    revision: here a process that holds the repo's pull mark alone): the Ctrl-C said it went on with them and
    no longer said what this pull kept (a review)."""
    proxy, home = big_upstream, tmp_path / "local"
    Depot(home, chunk_size=1 << 20).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from modeldepot import Depot
            depot = Depot({str(home)!r})
            with depot.store.partials.pulling({REPO!r}):  # (as a pull of another variant of the repo does)
                print("pulling", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "pulling\n"
        plan = proxy.set("slow", times=-1, slow_delay=0.03)
        first = _pull_process(home, _subprocess_env(proxy), interruptible=True)
        err = _interrupted(first, plan, 3 << 20, 1)
    finally:
        holder.kill()
        holder.communicate()
    assert "goes on with" not in err, err
    assert " kept" in err, err  # ("2.1 MiB of 10.0 MiB kept": what this pull's own resume will not fetch)


def test_ctrl_c_pressed_again_and_again_keeps_what_the_chunks_in_flight_received(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    """Ctrl-C pressed three times: the second raised KeyboardInterrupt in the middle of the pull's
    unwinding, and the parts of the chunks in flight were not written down, a resume fetching them again (an
    explorer's trial). Those pressed while it unwinds let it finish."""
    proxy, home = big_upstream, tmp_path / "local"
    chunk = 1 << 20
    Depot(home, chunk_size=chunk).close()
    plan = proxy.set("pass")
    env = {
        **_subprocess_env(proxy),
        "MODELDEPOT_MAX_DOWNLOAD_RATE": "2MiB/s",
    }  # (cancelled, it unwinds a while)
    err = _interrupted(
        _pull_process(home, env, interruptible=True), plan, 5 * chunk // 2, 3
    )  # (again and again)
    with Depot(home) as depot:
        [big] = [f for f in depot.get_manifest(REPO).files if f.path == BIG]
        log = depot.store.partials.read_log(big.sha256 or "")
        assert log is not None and log.parts, "(the chunks in flight kept their parts)"
    assert "every finished chunk is kept" not in err and " kept" in err, err


def test_the_bytes_a_stopped_pull_received_count_as_fetched_from_their_source(
    big_upstream: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process's counters (a node's /metrics) took a pull's bytes as its chunks landed: the parts of chunks
    a pull stopped with (its source died, a Ctrl-C), kept for a resume, crossed the wire and were never counted
    as fetched (an explorer's trial: 46.7 MB received, 20 B counted). They count as they arrive."""
    import asyncio

    from modeldepot.counters import PULLS

    proxy, home = big_upstream, tmp_path / "local"
    chunk = 1 << 20
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("MODELDEPOT_SERVERS", "HF_ENDPOINT", "MODELDEPOT_CONNECTIONS"):
        monkeypatch.setenv(name, _subprocess_env(proxy)[name])
    plan = proxy.set("slow", times=-1, slow_delay=0.03)
    before = PULLS.snapshot().bytes_by_source.get("node", 0)
    with Depot(home, chunk_size=chunk) as depot:

        async def stopped_midway() -> None:
            pulling = asyncio.ensure_future(depot.pull_async(REPO))
            while plan.body_bytes < 5 * chunk // 2 and not pulling.done():
                await asyncio.sleep(0.01)
            pulling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pulling

        asyncio.run(stopped_midway())
        kept = depot.du().partial_kept_bytes
    fetched = PULLS.snapshot().bytes_by_source.get("node", 0) - before
    assert 0 < kept <= fetched <= plan.body_bytes, (kept, fetched, plan.body_bytes)


def test_a_pulls_bytes_are_counted_while_its_chunk_still_downloads(
    big_upstream: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counters (a node's `modeldepot_pull_bytes_total`) took an attempt's bytes when it ended: a 16 MiB
    chunk's stayed out of /metrics until it landed, so a slow pull showed 0 B/s, then a step (an explorer's
    trial). Counted as each piece is read."""
    from modeldepot.counters import PULLS

    proxy, home = big_upstream, tmp_path / "local"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("MODELDEPOT_SERVERS", "HF_ENDPOINT", "MODELDEPOT_CONNECTIONS"):
        monkeypatch.setenv(name, _subprocess_env(proxy)[name])
    monkeypatch.setenv("MODELDEPOT_CONNECTIONS", "1")  # (one chunk in flight: the big file's alone)
    plan = proxy.set("slow", times=-1, slow_delay=0.03, path_suffix=BIG)
    before = PULLS.snapshot().bytes_by_source.get("node", 0)
    outcome: list[object] = []
    with Depot(home, chunk_size=len(BIG_FILES[BIG])) as depot:  # (the big file is one chunk)
        pulling = pull_in_a_thread(depot, REPO, outcome)
        try:
            wait_until(lambda: plan.body_bytes > 1 << 20 or bool(outcome), 30)
            counted = PULLS.snapshot().bytes_by_source.get("node", 0) - before
            unlanded = len(BIG_FILES[BIG]) - plan.body_bytes
        finally:
            proxy.set("pass")
            pulling.join(60)
    # (a piece or two may be on the way still between the proxy and the counter)
    assert unlanded > 0 and counted >= 1 << 19, (counted, unlanded, outcome)
    assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome


def test_a_pulls_status_row_moves_while_its_chunk_still_downloads(
    big_upstream: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variant's status row (the dashboard's row, `status`) held checked chunks alone: a 30 MiB pull of
    16 MiB chunks read "downloading 0%" to its end, beside its pull's own 49% (an operator's trial). The
    parts written down for a resume count: kept, as a stop would say."""
    proxy, home = big_upstream, tmp_path / "local"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("MODELDEPOT_SERVERS", "HF_ENDPOINT", "MODELDEPOT_CONNECTIONS"):
        monkeypatch.setenv(name, _subprocess_env(proxy)[name])
    monkeypatch.setenv("MODELDEPOT_CONNECTIONS", "1")
    plan = proxy.set("slow", times=-1, slow_delay=0.1, path_suffix=BIG)  # ~640 KiB/s: 6 s a chunk
    outcome: list[object] = []
    with Depot(home, chunk_size=4 << 20) as depot:  # (3 chunks of the 10 MiB file)
        pulling = pull_in_a_thread(depot, REPO, outcome)
        try:
            wait_until(lambda: plan.body_bytes > 1 << 20 or bool(outcome), 30)
            deadline = time.monotonic() + 20
            row = 0
            while not row and time.monotonic() < deadline and plan.body_bytes < (4 << 20) - (256 << 10):
                variant = depot.get_manifest(REPO).variants[0]
                row = variant.bytes_done if variant.status == "downloading" else 0
                time.sleep(0.1)
            unlanded = plan.body_bytes < 4 << 20  # (the first chunk not whole yet)
        finally:
            proxy.set("pass")
            pulling.join(60)
    assert row > 0 and unlanded, (row, plan.body_bytes, outcome)
    assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome


def test_a_killed_pull_resumes_fetching_only_the_missing_chunks(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    proxy, home = big_upstream, tmp_path / "local"
    size = len(BIG_FILES[BIG])
    crossed_first = _killed_a_third_through(proxy, home)
    assert crossed_first < size, "the pull finished before it could be killed"

    with Depot(home) as depot:
        variant = depot.get_manifest(REPO).variants[0]
        assert (variant.status, variant.error, variant.resumable) == ("failed", INTERRUPTED, True)
        # `ls` says what is kept, and how to resume it (it said "the store is empty": an explorer's trial)
        listed = subprocess.run([sys.executable, "-m", "modeldepot", "ls", "--home", str(home)],
                                env=_subprocess_env(proxy), capture_output=True, text=True, timeout=60)  # fmt: skip
        assert f"An interrupted pull of {REPO}" in " ".join(listed.stdout.split()), listed.stdout
        assert f"`modeldepot pull {REPO}` resumes it" in " ".join(listed.stdout.split()), listed.stdout
        second = proxy.set("pass")
        result = subprocess.run(
            [sys.executable, "-m", "modeldepot", "pull", REPO, "--home", str(home), "--json"],
            env=_subprocess_env(proxy), capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        report = json.loads(result.stdout)
        # What crossed the wire the second time is exactly what the pull says it downloaded, and that is
        # at most the chunks the first run had not finished (4 connections had a chunk each in flight).
        assert second.body_bytes == report["bytes_downloaded"]
        assert report["bytes_resumed"] >= crossed_first - 4 * SMALL_CHUNK - 2 * 1024
        missing = sum(len(d) for d in BIG_FILES.values()) - report["bytes_resumed"]
        assert second.body_bytes <= missing
        for path, data in BIG_FILES.items():
            assert bytes(depot.get_file(REPO, path)) == data
        assert depot.get_manifest(REPO).variants[0].status == "downloaded"
        assert store_files_consistent(depot) == []
    assert not list((home / "partials").glob("*.part"))


def test_a_killed_pull_whose_download_gc_threw_away_is_not_called_resumable(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    """After `gc --partials` a killed pull's status still said "pull again to resume", of bytes gone."""
    home = tmp_path / "local"
    _killed_a_third_through(big_upstream, home)
    with Depot(home) as depot:
        assert depot.get_manifest(REPO).variants[0].resumable
        assert depot.gc(partials=True).partials_removed > 0
        variant = depot.get_manifest(REPO).variants[0]
    assert (variant.status, variant.resumable, variant.bytes_done) == ("failed", False, 0)
    assert variant.error == INTERRUPTED_NOTHING_KEPT
    shown = subprocess.run([sys.executable, "-m", "modeldepot", "status", REPO, "--home", str(home)],
                           capture_output=True, text=True, timeout=60, check=True,
                           env={**os.environ, "COLUMNS": "300"}).stdout  # fmt: skip
    assert "nothing of it kept" in " ".join(shown.split()) and "resum" not in shown, shown


def test_gc_drops_a_killed_pulls_download_whose_content_came_in_another_way(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    """A killed pull's download whose file was then imported (or adopted from a Hugging Face cache) was kept
    a week "for a resume" no pull would ever make: disk outside the budget (an operator's trial)."""
    home = tmp_path / "local"
    _killed_a_third_through(big_upstream, home)
    with Depot(home) as depot:
        assert depot.gc().resumable_downloads >= 1  # (young, and its content not held: kept)
        depot.import_dir(write_model_dir(tmp_path / "same", BIG_FILES), REPO)
        report = depot.gc()
        assert report.partials_removed >= 1 and report.resumable_downloads == 0, report
        assert depot.du().partial_bytes == 0
    assert not list((home / "partials").glob("*.part"))


def test_a_download_whose_data_went_keeps_nothing_and_gc_drops_its_log(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    """A publish that failed (no inode left) took out a blob placed by a rename: the download's data file
    went, its log stayed, and `du` said its bytes were kept for a resume that then fetched them all (a crash
    fuzzer's trial)."""
    home = tmp_path / "local"
    _killed_a_third_through(big_upstream, home)
    data = next((home / "partials").glob("*.part"))
    with Depot(home) as depot:
        assert depot.du().partial_kept_bytes > 0
        data.unlink()
        assert depot.du().partial_kept_bytes < 1 << 10  # (the small files' downloads of one chunk alone)
        depot.gc()
    assert not data.with_suffix(".log").exists()


def test_two_processes_pulling_the_same_repo_make_one_transfer(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    proxy, home = big_upstream, tmp_path / "local"
    Depot(home, chunk_size=SMALL_CHUNK).close()
    plan = proxy.set("slow", times=-1, slow_delay=0.005)
    env = _subprocess_env(proxy)
    processes = [_pull_process(home, env) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=120) for p in processes]
    finally:
        for process in processes:  # a hung pull must not outlive the test (nor leak its pipes)
            process.kill()
            process.communicate()
    assert [p.returncode for p in processes] == [0, 0], outputs
    reports = [json.loads(out) for out, _ in outputs]
    total = sum(len(d) for d in BIG_FILES.values())
    assert plan.body_bytes == total, "every byte crossed the wire once"
    assert sum(r["bytes_downloaded"] for r in reports) == total
    with Depot(home) as depot:
        for path, data in BIG_FILES.items():
            assert bytes(depot.get_file(REPO, path)) == data
        assert store_files_consistent(depot) == []


def test_pulls_sharing_files_in_opposite_orders_do_not_wait_for_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two repos hold the same two contents under swapped names. A pull holds its claims until it publishes,
    # so if each pull claimed one content and then waited for the other's, neither would ever finish. The
    # first pull is made to pause before its claim of the second content until the other pull has gone on
    # (holds that content, or waits for the first): the interleaving that deadlocked when claims were taken
    # in each repo's file order.
    rng = random.Random(7)
    first, second = rng.randbytes(3 * SMALL_CHUNK), rng.randbytes(3 * SMALL_CHUNK + 5)
    low, high = sorted([first, second], key=lambda data: hashlib.sha256(data).hexdigest())
    repos = {"acme/one": {"a.bin": low, "b.bin": high}, "acme/two": {"a.bin": high, "b.bin": low}}
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        for repo, files in repos.items():
            node_depot.import_dir(write_model_dir(tmp_path / repo.replace("/", "-"), files), repo)
        node = LiveNode(node_depot)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("MODELDEPOT_SERVERS", node.url)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        home = tmp_path / "local"
        depots = [Depot(home, chunk_size=SMALL_CHUNK) for _ in repos]
        try:
            one_store, two_store = (depot.store for depot in depots)
            claim_of_one = one_store.partials.claim
            low_key, high_key = hashlib.sha256(low).hexdigest(), hashlib.sha256(high).hexdigest()

            two_tried: list[str] = []  # keys the second pull has tried to claim (got or not)
            claim_of_two = two_store.partials.claim

            def claim_two(key: str, *args: Any) -> Any:
                try:
                    return claim_of_two(key, *args)
                finally:
                    two_tried.append(key)

            def two_went_on() -> bool:  # it holds the high content, or it waits (it tried the low one twice)
                return high_key in two_tried or two_tried.count(low_key) >= 2

            def claim_one(key: str, *args: Any) -> Any:
                if key == high_key:
                    deadline = time.monotonic() + 30
                    while not two_went_on() and time.monotonic() < deadline:
                        time.sleep(0.01)
                return claim_of_one(key, *args)

            monkeypatch.setattr(one_store.partials, "claim", claim_one)
            monkeypatch.setattr(two_store.partials, "claim", claim_two)
            results: dict[str, Any] = {}

            def pull(depot: Depot, repo: str) -> None:
                try:
                    results[repo] = depot.pull(repo)
                except BaseException as error:  # reported below
                    results[repo] = error

            threads = [
                threading.Thread(target=pull, args=(d, r), daemon=True)
                for d, r in zip(depots, repos, strict=True)
            ]
            threads[0].start()
            wait_until(lambda: bool(list((home / "partials").glob("*.log"))))
            threads[1].start()
            for thread in threads:
                thread.join(timeout=60)
            assert not any(thread.is_alive() for thread in threads), "the two pulls wait for each other"
            for repo, files in repos.items():
                assert not isinstance(results[repo], BaseException), results[repo]
                for path, data in files.items():
                    assert bytes(depots[0].get_file(repo, path)) == data
            assert results["acme/two"].bytes_downloaded == 0, "the second pull found both files in the store"
            assert store_files_consistent(depots[0]) == []
        finally:
            for depot in depots:
                depot.close()
            node.stop()


def test_small_files_are_not_held_to_the_per_source_limit_of_ranges_but_to_the_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small file's request waits on the round trip, not on bandwidth: 4 at a time over a 20 ms link
    # lost to snapshot_download's 8 threads. The ranges of a big file keep the per-source limit.
    files = {**configs(5, 16), BIG: random.Random(5).randbytes(8 * SMALL_CHUNK)}
    with serving(tmp_path, files) as node:
        proxy = FaultProxy(node.url)
        try:
            plan = proxy.set("slow", times=-1, slow_delay=0.05)
            monkeypatch.setenv("MODELDEPOT_CONNECTIONS", "6")
            monkeypatch.setenv("MODELDEPOT_CONNECTIONS_PER_SOURCE", "1")
            with local_depot(tmp_path / "local", proxy, as_node=False, monkeypatch=monkeypatch) as depot:
                depot.pull(REPO)
                for path, data in files.items():
                    assert bytes(depot.get_file(REPO, path)) == data
            assert plan.peak_in_flight[BIG] == 1, "a big file's ranges keep the per-source limit"
            small_at_once = max(len(names - {BIG}) for names in plan.overlaps)
            assert 1 < small_at_once <= 6, f"{small_at_once} small files in flight at once"
            assert max(len(names) for names in plan.overlaps) <= 6, "the total limit holds"
        finally:
            proxy.stop()


def test_a_pull_claims_in_key_order_and_waits_at_a_content_another_process_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Claims are taken in batches, but never past a content another process holds: while it is held,
    # this pull holds exactly the contents before it in key order (and may transfer them), none after.
    files = configs(11, 24)

    def key(data: bytes) -> str:  # plain (non-LFS) files are claimed by git oid
        return "git-" + hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    keys = sorted(key(data) for data in files.values())
    held_key = keys[9]
    with serving(tmp_path, files) as node:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("MODELDEPOT_SERVERS", node.url)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        home = tmp_path / "local"
        other, depot = Depot(home, chunk_size=SMALL_CHUNK), Depot(home, chunk_size=SMALL_CHUNK)
        try:
            size = len(next(d for d in files.values() if key(d) == held_key))
            held = other.store.partials.claim(held_key, size, SMALL_CHUNK, False)
            assert held is not None
            claimed: list[str] = []
            claim = depot.store.partials.claim

            def recording_claim(key: str, *args: Any) -> Any:
                partial = claim(key, *args)
                if partial is not None:
                    claimed.append(key)
                return partial

            monkeypatch.setattr(depot.store.partials, "claim", recording_claim)
            result: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: result.update(pulled=depot.pull(REPO)), daemon=True)
            thread.start()
            wait_until(lambda: len(claimed) == 9 or not thread.is_alive())
            time.sleep(0.5)  # several tries for the held one go by
            assert thread.is_alive(), "the pull waits for the content another process holds"
            assert claimed == keys[:9], "nothing after the held content was claimed"
            held.release(completed=False)
            thread.join(timeout=60)
            assert not thread.is_alive()
            assert claimed == keys
            assert result["pulled"].bytes_downloaded == sum(len(d) for d in files.values())
            for path, data in files.items():
                assert bytes(depot.get_file(REPO, path)) == data
            assert store_files_consistent(depot) == []
        finally:
            depot.close()
            other.close()


def test_ctrl_c_stops_a_pull_cleanly_and_keeps_its_chunks(
    big_upstream: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, home = big_upstream, tmp_path / "local"
    Depot(home, chunk_size=SMALL_CHUNK).close()
    first = proxy.set("slow", times=-1, slow_delay=0.03)
    # As from a terminal: a test run started in the background by a shell without job control ignores
    # SIGINT, and a child inherits that (the pull then finished, Ctrl-C unseen, and exited 0).
    process = _pull_process(home, _subprocess_env(proxy), interruptible=True)
    try:
        wait_until(lambda: first.body_bytes > len(BIG_FILES[BIG]) // 4)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()  # (a no-op once it has ended) a hung pull must not outlive the test
        process.communicate()
    assert process.returncode == 130, stderr
    assert "resume" in stderr
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("MODELDEPOT_SERVERS", "HF_ENDPOINT", "MODELDEPOT_CONNECTIONS"):
        monkeypatch.setenv(name, _subprocess_env(proxy)[name])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with Depot(home) as depot:
        variant = depot.get_manifest(REPO).variants[0]
        assert variant.status == "failed" and variant.resumable
        assert variant.error == INTERRUPTED, "a Ctrl-C is an interruption, not a CancelledError"
        assert not depot.has_file(REPO, BIG)
        proxy.set("pass")
        result = depot.pull(REPO)
        assert result.bytes_resumed > 0
        assert bytes(depot.get_file(REPO, BIG)) == BIG_FILES[BIG]
        assert store_files_consistent(depot) == []


@pytest.mark.parametrize("ctrl_c", ["heeded", "ignored"])
def test_sigterm_stops_a_pull_as_ctrl_c_does_even_where_ctrl_c_is_ignored(
    ctrl_c: str, big_upstream: FaultProxy, tmp_path: Path
) -> None:
    """`docker stop`, `kill`, a scheduler's timeout: SIGTERM killed a pull at once (exit 143, nothing said, the
    parts of its chunks in flight lost: an explorer's trial). It stops as Ctrl-C stops it, also where Ctrl-C
    is ignored: a script's `pull … & kill $!` (a shell ignores SIGINT for its background jobs) lost them
    too (an explorer's trial)."""
    proxy, home = big_upstream, tmp_path / "local"
    Depot(home, chunk_size=SMALL_CHUNK).close()
    plan = proxy.set("slow", times=-1, slow_delay=0.03)
    if ctrl_c == "heeded":
        process = _pull_process(home, _subprocess_env(proxy), interruptible=True)
    else:  # (started with SIGINT ignored, as a shell's background job is)
        process = subprocess.Popen(
            [sys.executable, "-m", "modeldepot", "pull", REPO, "--home", str(home)], env=_subprocess_env(proxy),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )  # fmt: skip
    try:
        wait_until(lambda: plan.body_bytes > len(BIG_FILES[BIG]) // 4)
        process.send_signal(signal.SIGTERM)
        for _ in range(4):  # (a supervisor that insists: each within the unwinding's grace, as Ctrl-Cs are)
            time.sleep(0.003)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()  # (a no-op once it has ended)
        process.communicate()
    assert process.returncode == 130, stderr
    assert "interrupted:" in stderr and " kept" in stderr and "resume" in stderr, stderr
    with Depot(home) as depot:
        variant = depot.get_manifest(REPO).variants[0]
        assert variant.status == "failed" and variant.resumable and variant.bytes_done > 0


def test_content_a_node_holds_under_another_repo_comes_from_that_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = FILES[BIG]
    with Depot(tmp_path / "node-a", chunk_size=SMALL_CHUNK) as node_a_depot, \
         Depot(tmp_path / "hub", chunk_size=SMALL_CHUNK) as hub_depot:  # fmt: skip
        node_a_depot.import_dir(
            write_model_dir(tmp_path / "base", {BIG: weights, "config.json": b"{}"}), "acme/base"
        )
        hub_depot.import_dir(write_model_dir(tmp_path / "tuned", FILES), REPO)  # same weights, other repo
        node_a, hub = LiveNode(node_a_depot), LiveNode(hub_depot)
        hub_proxy = FaultProxy(hub.url)
        try:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", hub_proxy.url)
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[node_a.url]) as local:
                result = local.pull(REPO)
                assert_committed(local)
            assert node_a.url in result.sources
            crossed = [r for r in hub_proxy.plan.requests if r.split()[0].endswith(BIG)]
            assert crossed == [], "the weights came from node A, which holds them under acme/base"
            assert hub_proxy.plan.body_bytes == sum(len(d) for p, d in FILES.items() if p != BIG)
        finally:
            hub_proxy.stop()
            hub.stop()
            node_a.stop()


@pytest.mark.parametrize("as_node", [False, True], ids=["hub", "node"])
def test_a_retry_after_given_as_an_http_date_is_waited_for(
    as_node: bool, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = proxy.set("429", times=1, path_suffix=BIG, retry_after_date=3)
    with local_depot(tmp_path / "local", proxy, as_node, monkeypatch) as depot:
        depot.pull(REPO)
        assert_committed(depot)
    timed = zip(plan.request_times, plan.requests, strict=True)
    big = [(at, r) for at, r in timed if r.split()[0].endswith(BIG)]
    (refused_at, refused), *later = big  # the first request for the file is the one refused
    retried_at = next(at for at, r in later if r == refused)
    # The date has whole seconds, so it lies 2 to 3 s after the refusal; backoff alone (no Retry-After
    # understood) would have retried within 0.5 s.
    assert 1.8 <= retried_at - refused_at < 10


def test_a_cancelled_caller_unwinds_only_once_its_worker_thread_has_ended() -> None:
    """A chunk's write runs on a worker thread through the download's descriptors; a cancelled pull closes
    them as it unwinds, so it must not unwind while the write goes on (a reused descriptor number would
    take the late write into another file). Cancelled twice, it still waits; a failure is not lost."""
    ended = threading.Event()

    def slow_write() -> str:
        time.sleep(0.3)
        ended.set()
        return "written"

    def failing_write() -> None:
        raise OSError(28, "No space left on device")

    async def main() -> tuple[bool, bool]:
        task = asyncio.create_task(to_thread_to_the_end(slow_write))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ended_when_unwound = ended.is_set()
        with pytest.raises(OSError, match="No space left"):
            await to_thread_to_the_end(failing_write)
        return ended_when_unwound, await to_thread_to_the_end(slow_write) == "written"

    assert asyncio.run(main()) == (True, True)


def _kept_of_the_big_file(depot: Depot) -> tuple[Manifest, int]:
    """The repo's manifest, and the bytes its big file's download log says were kept."""
    manifest = depot.get_manifest(REPO)
    [big] = [f for f in manifest.files if f.path == BIG]
    log = depot.store.partials.read_log(big.sha256 or "")
    assert log is not None
    return manifest, sum(chunk_span(index, log.size, log.chunk_size)[1] for index in log.logged)


def test_a_pull_killed_right_after_it_resumed_shows_what_it_kept(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    """The status row is written every half second at most: a pull killed soon after it resumed had a row
    of 0 bytes, and `status` said "resumable: 0 B kept" over a third of the file on disk (a user may then
    drop it with gc --partials). What a resumable variant kept is read from its downloads' logs."""
    proxy, home = big_upstream, tmp_path / "local"
    size = len(BIG_FILES[BIG])
    _killed_a_third_through(proxy, home)
    stalled = proxy.set("stall", times=-1, path_suffix=BIG)
    process = _pull_process(home, _subprocess_env(proxy))
    try:
        wait_until(lambda: stalled.injected > 0)  # the resumed pull asks for the rest
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    with Depot(home) as depot:
        manifest, kept = _kept_of_the_big_file(depot)
        assert kept >= size // 4
        variant = manifest.variants[0]
        assert (variant.status, variant.resumable) == ("failed", True)
        assert variant.bytes_done >= kept, (variant.bytes_done, kept)


def test_a_file_download_killed_midway_shows_what_it_kept_though_it_made_no_status_row(
    big_upstream: FaultProxy, tmp_path: Path
) -> None:
    """A download of one file (``download_file``, a mirror's pull for a reader) writes no status row: killed
    midway, `status` said "available resumable: 0 B kept" while du said 64 MiB were received and the next
    pull resumed them (an explorer's trial). The variant shows what its downloads' logs kept."""
    proxy, home = big_upstream, tmp_path / "local"
    Depot(home, chunk_size=SMALL_CHUNK).close()
    plan = proxy.set("slow", times=-1, slow_delay=0.03)
    script = f"from modeldepot import Depot; Depot({str(home)!r}).download_file({REPO!r}, {BIG!r})"
    process = subprocess.Popen([sys.executable, "-c", script], env=_subprocess_env(proxy),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: plan.body_bytes > len(BIG_FILES[BIG]) // 3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    with Depot(home) as depot:
        manifest, kept = _kept_of_the_big_file(depot)
        [variant] = [v for v in manifest.variants if BIG in v.files or BIG in manifest.shared]
        assert (variant.status, variant.resumable) == ("available", True)
        assert variant.bytes_done >= kept > 0, (variant.bytes_done, kept)


def test_a_node_where_nothing_listens_is_dropped_at_once_the_hub_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node that is down (connection refused) was retried with backoff, 4-8 s per chunk: in a swarm its
    claims stood that long (the other nodes stalled, and fetched more from the Hub). It is dropped at the
    first refusal now; the Hub, whose refusal is more likely a blip, is still retried."""
    import modeldepot.transfer.sources as sources
    from conftest import closed_port

    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(sources.asyncio, "sleep", no_wait)
    port = closed_port()  # (nothing listens there)
    for kind, retried in (("node", 0), ("hub", 4)):
        waits.clear()
        source = sources.HttpSource(f"http://127.0.0.1:{port}", kind, None, sources.RetryPolicy(attempts=5))
        with pytest.raises(
            UpstreamError, match="nothing listens there" if kind == "node" else "after 5 attempts"
        ):
            asyncio.run(source.fetch(f"http://127.0.0.1:{port}/x", 0, 9, 10))
        assert len(waits) == retried, kind


@pytest.mark.parametrize("as_node", [False, True], ids=["hub", "node"])
def test_a_link_that_cuts_every_answer_midway_still_completes_each_range_asking_for_the_rest(
    as_node: bool, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every answer is cut a fifth of a chunk in: five attempts from the start of the range never completed
    # one, and each of them fetched the same fifth again.
    plan = proxy.set("cut", times=-1, path_suffix=BIG, cut_after=SMALL_CHUNK // 5)
    with local_depot(tmp_path / "local", proxy, as_node, monkeypatch) as depot:
        depot.pull(REPO)
        assert_committed(depot)
    assert plan.injected >= 5 * (len(FILES[BIG]) // SMALL_CHUNK)
    assert plan.body_bytes == sum(map(len, FILES.values())), (
        "a retry asks only for what the cut one did not bring"
    )


def test_a_slow_link_shows_progress_as_bytes_arrive_not_only_as_chunks_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk = 4 << 20
    files = {"config.json": b"{}", BIG: random.Random(7).randbytes(2 * chunk)}
    with serving(tmp_path / "upstream", files) as node:
        proxy = FaultProxy(node.url)
        try:
            # About 3 MB/s for each of the two chunks: 1.3 s before either is whole.
            proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.02)
            # (parts of chunks written down for a resume count in the rows too, as kept: none here, where a pull
            # slower than a second wrote one down and the test, of checked bytes alone, failed half the time)
            monkeypatch.setattr("modeldepot.transfer.download.PART_LOG_MIN_BYTES", 1 << 40)
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", proxy.url)
            updates = []
            with Depot(tmp_path / "local", chunk_size=chunk) as depot:
                pulling = threading.Thread(target=lambda: depot.pull(REPO, progress=updates.append))
                pulling.start()
                rows = set()  # what `status` and the dashboard show meanwhile
                while pulling.is_alive():
                    with contextlib.suppress(NotFoundError):
                        rows.add(depot.get_manifest(REPO).variants[0].bytes_done)
                    time.sleep(0.05)
                pulling.join()
                assert bytes(depot.get_file(REPO, BIG)) == files[BIG]
        finally:
            proxy.stop()
    # The status rows say what is checked, and kept for a resume: never the bytes in flight (a killed pull
    # was said to have kept 45 MiB, and had kept none).
    landed_only = {n + k * chunk for n in (0, 2) for k in range(3)}
    assert rows <= landed_only, f"the status rows counted unchecked bytes: {sorted(rows - landed_only)}"
    big = [u for u in updates if u.path == BIG]
    before_a_chunk_landed = [u.file_shown for u in big if u.file_done == 0]
    assert max(before_a_chunk_landed) >= chunk // 2, "bytes received were shown before a chunk was whole"
    assert all(u.file_shown <= u.file_size and u.shown <= u.total for u in updates)
    assert big[-1].file_done == big[-1].file_shown == len(files[BIG]), "the last update: all checked"
    assert updates[-1].receiving == 0


@pytest.mark.parametrize("patience", [60, 0])
def test_a_pull_waits_out_an_outage_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, patience: int
) -> None:
    """The network goes away for 10 s mid-pull (every connection cut, every new one closed unanswered):
    longer than a range's five attempts. The pull ended with an error (run again, it resumed); it tries
    again, resuming, for MODELDEPOT_OUTAGE_PATIENCE seconds. 0: it fails at once, as before."""
    chunk = 1 << 20
    files = {"config.json": b"{}", BIG: random.Random(8).randbytes(6 * chunk)}
    with serving(tmp_path / "upstream", files) as node:
        proxy = FaultProxy(node.url)
        try:
            plan = proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.05)  # 1.3 MB/s a connection
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", proxy.url)
            monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", str(patience))
            outcome: list[object] = []
            with Depot(tmp_path / "local", chunk_size=chunk) as depot:
                pulling = pull_in_a_thread(depot, REPO, outcome)
                wait_until(lambda: plan.body_bytes > chunk)
                plan.down_until = time.monotonic() + 10
                pulling.join(120)
                assert not pulling.is_alive()
                if not patience:
                    assert isinstance(outcome[0], UpstreamError) and outcome[0].network, outcome
                    return
                assert not isinstance(outcome[0], Exception), outcome
                assert bytes(depot.get_file(REPO, BIG)) == files[BIG]
        finally:
            proxy.stop()
    waits = [r.getMessage() for r in caplog.records if "no source has sent anything" in r.getMessage()]
    assert waits and "asking again for" in waits[0], "the wait is said"
    # What came before the outage was kept: the bytes through the link are the file and what cut reads
    # lost (a piece of 256 KiB at most a request), not the file twice.
    assert plan.body_bytes < len(files[BIG]) + 8 * (256 << 10)


SLOW_PULLED = {"config.json": b"{}", BIG: random.Random(9).randbytes(4 << 20)}


@contextlib.contextmanager
def pull_in_another_process(home: Path, node: LiveNode) -> Iterator[subprocess.Popen[bytes]]:
    """``modeldepot pull`` of SLOW_PULLED from ``node`` into ``home`` at 1 MiB/s, as a process of its own,
    yielded once its download is under way (killed after)."""
    from fleetnodes import base_env

    pulling = subprocess.Popen(
        [sys.executable, "-m", "modeldepot", "pull", REPO, "--home", str(home), "--max-rate", "1MiB/s"],
        env=base_env(HF_ENDPOINT=node.url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: (home / "partials").exists() and any((home / "partials").glob("*.log")))
        yield pulling
    finally:
        pulling.kill()
        pulling.wait()


def test_a_pull_waiting_for_a_suspended_one_says_who_and_takes_over_once_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A pull in another terminal suspended with Ctrl-Z held the download: a second pull of the same file
    waited without end and said "waiting for another process", nothing more (a trial's waited 150 s)."""
    home = tmp_path / "local"
    with serving(tmp_path / "upstream", SLOW_PULLED) as node, pull_in_another_process(home, node) as first:
        first.send_signal(signal.SIGSTOP)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", node.url)
        outcome: list[object] = []
        with Depot(home) as depot:
            second = threading.Thread(target=lambda: outcome.append(depot.pull(REPO)))
            second.start()
            wait_until(lambda: any("suspended" in r.getMessage() for r in caplog.records))
            said = next(r.getMessage() for r in caplog.records if "suspended" in r.getMessage())
            assert f"process {first.pid}" in said and f"kill -CONT {first.pid}" in said, said
            first.kill()  # the user stops it: the waiting pull takes the download over
            second.join(60)
            assert outcome and bytes(depot.get_file(REPO, BIG)) == SLOW_PULLED[BIG]


def test_a_repo_another_process_pulls_is_not_removed_under_it(tmp_path: Path) -> None:
    """`rm` while another process pulled the repo removed it, and the pull failed at its end, its bytes all
    fetched, saying files "it shares with other repos" went (a trial); the control API said 409 of a pull
    in its own process only."""
    home = tmp_path / "local"
    with serving(tmp_path / "upstream", SLOW_PULLED) as node, pull_in_another_process(home, node) as pulling:
        with Depot(home) as depot, pytest.raises(PullRunningError, match=f"process {pulling.pid}"):
            depot.remove(REPO)
        refused = subprocess.run([sys.executable, "-m", "modeldepot", "rm", REPO, "--yes", "--home", str(home)],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert refused.returncode == 1 and "a pull of acme/faulty is running" in refused.stderr, (
            refused.stderr
        )
        assert pulling.wait(60) == 0, "the pull ends as it would have"
    with Depot(home) as depot:
        assert bytes(depot.get_file(REPO, BIG)) == SLOW_PULLED[BIG]
        assert depot.remove(REPO).commits, "once the pull ended, removed"


def test_a_repo_being_pulled_is_pinned_once_published(tmp_path: Path) -> None:
    """`pin` of a repo another process was pulling said "not in the store" (the node: 404), while `status`
    showed it downloading and `rm` said a pull runs (a trial): it says the pull runs, and to pin it after."""
    home = tmp_path / "local"
    with serving(tmp_path / "upstream", SLOW_PULLED) as node, pull_in_another_process(home, node) as pulling:
        with Depot(home) as depot, pytest.raises(PullRunningError, match="pin it once the pull is done"):
            depot.pin(REPO)
        refused = subprocess.run([sys.executable, "-m", "modeldepot", "pin", REPO, "--home", str(home)],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert refused.returncode == 1 and f"process {pulling.pid}" in refused.stderr, refused.stderr
        assert pulling.wait(60) == 0
    with Depot(home) as depot:
        assert depot.pin(REPO).repo_id == REPO
        with pytest.raises(NotFoundError, match="not in the store"):
            depot.pin("acme/never-pulled")


@pytest.mark.parametrize("removal", ["rm", "unaware"])
def test_a_file_another_repo_shared_removed_under_a_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, removal: str
) -> None:
    """`rm` of another repo (or the disk budget evicting it) that held a file the pull found in the store (a
    config of two bytes) made the pull fail at its end, everything fetched: "run it again" (a trial, a
    250 MiB pull). A removal leaves the blobs a pull relies on now, as an eviction does: the pull finds it in
    place. One that does not know of them (an older modeldepot's beside this one) takes it: the pull fetches
    that file too, in the same run, and says what it fetched."""
    home = tmp_path / "local"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(
            write_model_dir(tmp_path / "other", {"config.json": SLOW_PULLED["config.json"]}), "acme/other"
        )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with serving(tmp_path / "upstream", SLOW_PULLED) as node:
        monkeypatch.setenv("HF_ENDPOINT", node.url)
        with Depot(home, chunk_size=SMALL_CHUNK) as depot:
            _pull_past_a_removal(depot, home, removal)


def _pull_past_a_removal(depot: Depot, home: Path, removal: str) -> None:
    """A pull at 2 MiB/s; the other repo removed (by another Depot) once its weights are under way."""
    import dataclasses

    from modeldepot.store.maintenance import remove

    depot.config = dataclasses.replace(depot.config, max_download_rate=2 << 20)  # (2 s for the weights)
    outcome: list[object] = []
    updates: list[PullUpdate] = []
    pulling = pull_in_a_thread(depot, REPO, outcome, updates)
    wait_until(lambda: outcome or any(u.path == BIG and u.file_done for u in updates))
    assert not outcome, outcome
    with Depot(home) as other:
        if removal == "rm":
            assert other.remove("acme/other").commits
        else:  # (the blob the pull found for its config.json goes)
            assert remove(other.store, "acme/other", keep_blobs=frozenset()).commits
    pulling.join(60)
    result = outcome[0]
    assert isinstance(result, PullResult), result
    total, config = sum(map(len, SLOW_PULLED.values())), len(SLOW_PULLED["config.json"])
    if removal == "rm":
        assert result.bytes_by_source.get("local") == config and result.bytes_downloaded == total - config, (
            result
        )
    else:
        assert result.bytes_downloaded == total and result.bytes_resumed == 0
        assert "local" not in result.bytes_by_source and result.sources, result
    statuses = {v.name: v.status for v in depot.get_manifest(REPO).variants}
    assert set(statuses.values()) == {"downloaded"}, statuses
    for path, data in SLOW_PULLED.items():
        assert bytes(depot.get_file(REPO, path)) == data
    assert store_files_consistent(depot) == []


def test_a_failover_mid_chunk_does_not_take_back_what_was_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node (the file's first source) goes away with chunks half received into the file's pages, and the
    Hub's requests go on from their parts. As such a chunk landed it was told done in two pieces (the part
    its sender sent, then the rest), and between the two the progress given to the library's caller and
    the file's bar fell back by the rest (a review: 4.0 to 3.5 MiB)."""
    chunk = 1 << 20
    files = {"config.json": b"{}", BIG: random.Random(11).randbytes(6 * chunk)}
    with serving_repo(tmp_path / "upstream", files, REPO, chunk_size=chunk) as node, \
            a_slow_node_before_the_hub(node, monkeypatch, BIG, patience=0) as plan:  # fmt: skip
        updates: list[PullUpdate] = []
        outcome: list[object] = []
        with Depot(tmp_path / "local", chunk_size=chunk) as depot:
            pulling = pull_in_a_thread(depot, REPO, outcome, updates)
            wait_until(lambda: plan.body_bytes > chunk + chunk // 2)
            plan.down_until = time.monotonic() + 3600  # the node is gone for good
            pulling.join(90)
            assert not pulling.is_alive()
            assert not isinstance(outcome[0], Exception), outcome
            assert bytes(depot.get_file(REPO, BIG)) == files[BIG]
    big = [u for u in updates if u.path == BIG]
    assert any(u.file_done % chunk > 0 for u in big), "no chunk was finished from a part (nothing tested)"
    fell = [(a.file_shown, b.file_shown) for a, b in itertools.pairwise(big) if b.file_shown < a.file_shown]
    fell_total = [(a.shown, b.shown) for a, b in itertools.pairwise(updates) if b.shown < a.shown]
    assert not fell and not fell_total, f"the file's progress fell: {fell[:3]}; the pull's: {fell_total[:3]}"


OUTAGE_FILES = {"config.json": b"{}", BIG: random.Random(10).randbytes(6 << 20)}


def test_a_silent_outage_is_said_while_it_lasts_and_waited_out_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Packets vanish for 8 s mid-pull (nothing refused, nothing cut: each attempt waits out its read
    timeout). The patience began only once a range's five attempts had run out: a trial over network
    namespaces heard no word for 5 minutes (30 s timeouts), then saw the pull start over as the link came
    back, its progress back to 0 and "no source answers" while bytes flowed. Now the silence is said while
    it lasts, the ranges ask again without the pull starting over, and what progress shows never goes back."""
    chunk = 1 << 20
    with serving(tmp_path / "upstream", OUTAGE_FILES) as node:
        proxy = FaultProxy(node.url)
        try:
            plan = proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.05)
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", proxy.url)
            monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", "60")
            monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", "1")
            outcome: list[object] = []
            updates: list[PullUpdate] = []
            with Depot(tmp_path / "local", chunk_size=chunk) as depot:
                pulling = pull_in_a_thread(depot, REPO, outcome, updates)
                wait_until(lambda: plan.body_bytes > chunk)
                plan.silent_until = time.monotonic() + 8
                silence_ends = time.time() + 8
                pulling.join(120)
                assert not pulling.is_alive()
                assert not isinstance(outcome[0], Exception), outcome
                assert bytes(depot.get_file(REPO, BIG)) == OUTAGE_FILES[BIG]
        finally:
            proxy.stop()
    said = [r for r in caplog.records if "no source has sent anything" in r.getMessage()]
    assert len(said) == 1 and said[0].created < silence_ends, "the silence is said once, while it lasts"
    assert any("bytes come again" in r.getMessage() for r in caplog.records)
    assert not any("trying again in" in r.getMessage() for r in caplog.records), "the pull did not start over"
    shown = [u.shown for u in updates]
    assert shown == sorted(shown), "progress went back"


def test_the_outage_patience_counts_from_the_last_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a silent outage that does not end, the pull gives up once nothing has come for the patience
    (and the range has made its five attempts): not after the five attempts of a range, then the patience,
    then a last try's five attempts more (the trial's "for 49 s more at most" was overrun by the outage).
    What came is kept: pulled again once the link is back, the file is not fetched twice."""
    chunk = 1 << 20
    patience, read_timeout = 8, 1
    with serving(tmp_path / "upstream", OUTAGE_FILES) as node:
        proxy = FaultProxy(node.url)
        try:
            plan = proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.05)
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", proxy.url)
            monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", str(patience))
            monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", str(read_timeout))
            outcome: list[object] = []
            with Depot(tmp_path / "local", chunk_size=chunk) as depot:
                pulling = pull_in_a_thread(depot, REPO, outcome)
                wait_until(lambda: plan.body_bytes > 2 * chunk)
                plan.silent_until = time.monotonic() + 3600
                silent_from = time.monotonic()
                pulling.join(120)
                waited = time.monotonic() - silent_from
                assert not pulling.is_alive()
                failed = outcome[0]
                assert isinstance(failed, UpstreamError) and failed.network, outcome
                assert f"no source answered for {patience} s: MODELDEPOT_OUTAGE_PATIENCE" in str(failed)
                # (before: a try's five attempts, 9-13 s here, then the patience, then a try more)
                assert waited < patience + 7 * read_timeout, f"gave up after {waited:.1f} s of silence"
                plan.silent_until = 0
                sent_before = plan.body_bytes
                depot.pull(REPO)
                assert bytes(depot.get_file(REPO, BIG)) == OUTAGE_FILES[BIG]
        finally:
            proxy.stop()
    assert plan.body_bytes - sent_before < len(OUTAGE_FILES[BIG]) - chunk, "what came was fetched again"


def test_progress_never_goes_back_when_a_pull_starts_over() -> None:
    """A try that starts over counts its parts of chunks again from 0 as it resumes them: shown as they
    were, the total went back by 32 MiB and a rate of 65 MiB/s on a 2.3 MiB/s link (trial). What the
    tries before showed holds until the new one passes it; checked bytes stay as they are."""
    from modeldepot.transfer import outage

    tries = 0

    async def a_try(watch: Callable[[PullUpdate], None]) -> str:
        nonlocal tries
        tries += 1
        if tries == 1:
            watch(PullUpdate(BIG, 100, 1000, 110, 2000, file_receiving=500, receiving=500))  # 610, 600 shown
            failed = UpstreamError("no answer")
            failed.network = True
            raise failed
        watch(PullUpdate(BIG, 100, 1000, 110, 2000))  # resumed: its part not counted yet
        watch(PullUpdate(BIG, 100, 1000, 110, 2000, file_receiving=520, receiving=520))
        return "done"

    shown: list[PullUpdate] = []
    assert outage.run_through_outages(a_try, shown.append, 30.0, REPO) == "done"
    assert [(u.file_shown, u.shown, u.file_done, u.done) for u in shown] == [
        (600, 610, 100, 110), (600, 610, 100, 110), (620, 630, 100, 110),
    ]  # fmt: skip


def test_only_no_answer_at_all_counts_as_an_outage() -> None:
    """A redirect loop, a malformed status line, a TLS certificate are answers or settings: not waited out."""
    import errno
    import http.client
    import socket
    import ssl

    from modeldepot.transfer.sources import is_no_answer

    outages = [ConnectionRefusedError(), http.client.RemoteDisconnected("closed"), TimeoutError(),
               socket.gaierror(-2, "Name or service not known"), OSError(errno.ENETUNREACH, "unreachable"),
               http.client.IncompleteRead(b"")]  # fmt: skip
    answers = [http.client.HTTPException("more than 5 redirects"), http.client.BadStatusLine("junk"),
               ssl.SSLCertVerificationError("certificate verify failed"), OSError(errno.EACCES, "denied")]  # fmt: skip
    assert [is_no_answer(e) for e in outages] == [True] * len(outages)
    assert [is_no_answer(e) for e in answers] == [False] * len(answers)


def test_a_tiny_file_from_a_failing_source_is_retried_with_backoff_not_in_a_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A range of 1-3 bytes made every failure a "resume" (a quarter of it is 0 bytes): 69 requests at once.
    files = {"config.json": b"{}", "tokenizer.json": b'{"a": 1}'}
    with serving(tmp_path / "upstream", files) as node:
        proxy = FaultProxy(node.url)
        try:
            plan = proxy.set("500", times=-1, path_suffix="config.json")
            depot = local_depot(tmp_path / "local", proxy, False, monkeypatch)
            with depot, pytest.raises(UpstreamError, match="after 5 attempts"):
                depot.pull(REPO)
            assert plan.injected == 5
        finally:
            proxy.stop()


def _interrupted_on_a_slow_hub(proxy: FaultProxy, home: Path, env: dict[str, str]) -> int:
    """A pull into a new store of 2 MiB chunks from ``proxy`` as the Hub, slowed down, Ctrl-C'ed while four
    chunks are in flight and none is whole: how many body bytes crossed."""
    Depot(home, chunk_size=2 << 20).close()
    first = proxy.set("slow", times=-1, slow_delay=0.04)  # (64 KiB pieces: 1.6 MB/s a connection)
    process = _pull_process(home, env, interruptible=True)
    try:
        wait_until(lambda: first.body_bytes > 6 << 20)  # four chunks at 1.5 MiB each
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == 130, stderr
    return first.body_bytes


def _hub_env(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(MODELDEPOT_SERVERS="", HF_ENDPOINT=proxy.url, MODELDEPOT_CONNECTIONS="4")  # (the Hub path)
    for name in ("MODELDEPOT_SERVERS", "HF_ENDPOINT", "MODELDEPOT_CONNECTIONS"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return env


def test_ctrl_c_keeps_what_each_chunk_in_flight_received(
    big_upstream: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a slow link four chunks a file are in flight for a minute each: a Ctrl-C threw all of them away.
    proxy, home = big_upstream, tmp_path / "local"
    crossed = _interrupted_on_a_slow_hub(proxy, home, _hub_env(proxy, monkeypatch))
    second = proxy.set("pass")
    with Depot(home) as depot:
        result = depot.pull(REPO)
        assert bytes(depot.get_file(REPO, BIG)) == BIG_FILES[BIG]
        assert store_files_consistent(depot) == []
    lost = crossed + second.body_bytes - sum(map(len, BIG_FILES.values()))
    assert result.bytes_resumed >= 4 << 20, result
    # (at most a read piece and what sat in the socket, a connection: it was every byte in flight, 6 MiB)
    assert lost < 2 << 20, f"{lost} bytes crossed twice"
    assert result.bytes_downloaded == second.body_bytes, "the parts count as resumed, not fetched"


@pytest.mark.parametrize("how", ["rotten", "rotten-from-a-node", "rebooted"])
def test_a_part_kept_from_a_stopped_pull_is_never_taken_on_trust(
    how: str, big_upstream: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A part is checked with its chunk: wrong (rotten here), the file is fetched again from the Hub and comes
    # out right, or the chunk from a node (its BLAKE3), which is not blamed for it (the Hub is out of reach:
    # a ban would fail the pull); written under another boot of the kernel (its pages may never have
    # reached the disk), it is not taken.
    if how == "rotten-from-a-node":
        stack = contextlib.ExitStack()
        node = stack.enter_context(serving_repo(tmp_path / "node", BIG_FILES, REPO, chunk_size=2 << 20))
        proxy = FaultProxy(node.url)
        stack.callback(proxy.stop)
        env = _hub_env(proxy, monkeypatch)
        env.update(MODELDEPOT_SERVERS=proxy.url, HF_ENDPOINT="http://127.0.0.1:9")
        for name in ("MODELDEPOT_SERVERS", "HF_ENDPOINT"):
            monkeypatch.setenv(name, env[name])
    else:
        stack, proxy = contextlib.ExitStack(), big_upstream
        env = _hub_env(proxy, monkeypatch)
    with stack:
        _run_with_a_part_not_to_trust(how, proxy, tmp_path / "local", env, monkeypatch)


def _run_with_a_part_not_to_trust(
    how: str, proxy: FaultProxy, home: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _interrupted_on_a_slow_hub(proxy, home, env)
    if how.startswith("rotten"):
        (part,) = (home / "partials").glob("*.part")
        with open(part, "r+b") as data:
            data.seek(1000)
            data.write(b"rot" * 100)
    else:
        monkeypatch.setenv("MODELDEPOT_BOOT_ID", "another-boot")
    proxy.set("pass")
    with Depot(home) as depot:
        result = depot.pull(REPO)
        assert bytes(depot.get_file(REPO, BIG)) == BIG_FILES[BIG]
        assert store_files_consistent(depot) == []
    if how == "rebooted":
        assert result.bytes_resumed < 1 << 20, "a part of another boot was taken"
    if how == "rotten-from-a-node":
        from modeldepot.transfer.choosing import BANNED_NODES

        assert result.bytes_by_source.get("node", 0) > 0 and "hub" not in result.bytes_by_source
        assert not [name for name in BANNED_NODES if proxy.url in name], "the node was blamed for our part"


def test_ctrl_c_is_pythons_own_again_once_an_interrupted_pull_has_unwound() -> None:
    """A script that caught the KeyboardInterrupt of an interrupted pull and went on lost its Ctrl-Cs for 5 s,
    and its next pull could not be interrupted at all (a review): the handler of the pull's loop stayed."""
    import asyncio

    from modeldepot.transfer.outage import run_blocking

    unwound: list[bool] = []

    async def interrupted() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # (the user's Ctrl-C)
        try:
            await asyncio.sleep(30)
        finally:
            unwound.append(True)

    with pytest.raises(KeyboardInterrupt):
        run_blocking(interrupted())
    assert unwound == [True], "cancelled, and unwound, before the KeyboardInterrupt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("cancelled", [False, True], ids=["failed", "cancelled"])
def test_a_reads_error_holds_no_view_of_what_it_read_into(cancelled: bool) -> None:
    """A reader thread's frames hold views of what it reads into (a chunk's mapping of the download's file):
    kept by the read's error (a cancelled pull's, a source's last one), the mapping could not be closed, and
    the file stayed open after a resumed pull had finished and deleted it, its whole size taken on the disk
    (an explorer's trial: one cancelled pull in eight). The error keeps its traceback, not those views."""
    import mmap

    from modeldepot.transfer.ranged import Attempt
    from modeldepot.transfer.sources import _on_a_reader

    pages, attempt, reading = mmap.mmap(-1, 4096), Attempt(), threading.Event()

    def read() -> None:
        into = memoryview(pages)[1024:]  # (as read_range holds the buffer it reads into)
        reading.set()
        while cancelled and not attempt.aborted:
            time.sleep(0.01)
        raise OSError(f"the read of {len(into)} bytes broke")

    async def run() -> BaseException:
        task = asyncio.create_task(_on_a_reader(attempt, read))
        if cancelled:
            await asyncio.to_thread(reading.wait, 10)
            task.cancel()
        try:
            await task
        except BaseException as error:
            return error
        raise AssertionError("the read did not fail")

    error = asyncio.run(run())
    assert isinstance(error, asyncio.CancelledError if cancelled else OSError)
    assert error.__traceback__ is not None
    pages.close()  # (BufferError while a frame the error keeps holds a view)


def test_a_depot_closed_while_another_thread_pulls_stops_the_pull_which_keeps_what_it_received(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`close()` returned at once while another thread's pull downloaded the rest of the model, which then
    failed at publishing it (a service's shutdown downloading gigabytes for minutes: an explorer's trial).
    The pull stops, keeps what it received, and raises StoreClosedError; the next depot resumes it."""
    from modeldepot.errors import StoreClosedError

    plan = proxy.set("slow", times=-1, slow_delay=0.05, slow_piece=8192)  # (the whole file: ~10 s)
    depot = local_depot(tmp_path / "local", proxy, as_node=False, monkeypatch=monkeypatch)
    outcome: list[BaseException | PullResult] = []

    def pull() -> None:
        try:
            outcome.append(depot.pull(REPO))
        except BaseException as error:
            outcome.append(error)

    puller = threading.Thread(target=pull)
    puller.start()
    wait_until(lambda: plan.body_bytes >= 8 * SMALL_CHUNK, 30)  # (a few chunks in)
    depot.close()  # (waits for the pull to unwind)
    puller.join(15)
    assert not puller.is_alive()
    assert isinstance(outcome[0], StoreClosedError), outcome
    sent = plan.body_bytes
    assert sent < len(FILES[BIG]), "stopped, not downloaded to the end"
    plan.slow_delay = 0.0
    with local_depot(tmp_path / "local", proxy, as_node=False, monkeypatch=monkeypatch) as again:
        result = again.pull(REPO)
        # (what the stopped pull received: most of what the proxy sent, less what was still on its way, a piece
        # on each connection, which a CI run found short of the whole by one)
        assert result.bytes_resumed >= 4 * SMALL_CHUNK, result
        assert_committed(again)


def test_pulls_of_a_closed_depot_on_one_loop_are_refused_at_once(tmp_path: Path) -> None:
    """(A review.) A pull of a closed depot waited for its cancelled task while holding a thread lock: a
    second pull on the same event loop then blocked that loop for good."""
    from modeldepot.errors import StoreClosedError

    depot = Depot(tmp_path / "store")
    depot.close()
    outcome: list[object] = []

    def run() -> None:
        async def both() -> list[BaseException | PullResult]:
            return await asyncio.gather(depot.pull_async("acme/a"), depot.pull_async("acme/b"),
                                        return_exceptions=True)  # fmt: skip

        outcome.extend(asyncio.run(both()))

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), "the loop hangs"
    assert [type(o) for o in outcome] == [StoreClosedError, StoreClosedError], outcome
