"""A mirror's answers of a range that starts deep inside a chunk slow to land (read aside: a request of its
own, compared with the chunk once it lands) and of a range whose last chunk lands slowly (its last bytes
trickled): see docs/architecture.md, "read aside"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

import faultproxy
from conftest import SMALL_CHUNK, wait_until
from faultproxy import FaultProxy, proxied_node
from mirrornodes import BIG, FILES, REPO, mirror_node, proxied_upstream, read_until_it_breaks, slow_chunks
from modeldepot.mirror import following as mirror_following
from modeldepot.mirror import pulls as mirror_pulls
from modeldepot.server.mirror_routes import MIRROR
from modeldepot.transfer import download


@pytest.fixture
def upstream_proxy(tmp_path: Path) -> Iterator[FaultProxy]:
    yield from proxied_upstream(tmp_path)


def reads_aside(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (first, last) byte of every read aside a download is asked for."""
    asked: list[tuple[int, int]] = []
    real = download._FileJob._read_aside

    def recorded(self: Any, first: int, last: int) -> Any:
        asked.append((first, last))
        return real(self, first, last)

    monkeypatch.setattr(download._FileJob, "_read_aside", recorded)
    return asked


def hold_ranges_from(monkeypatch: pytest.MonkeyPatch, start: int) -> list[float]:
    """Requests of a range from byte ``start`` (a read aside) are held unanswered for an hour."""
    held: list[float] = []
    real = faultproxy.FaultProxy._relay

    async def relay(self: Any, request: web.Request, *args: Any) -> web.StreamResponse:
        if request.headers.get("Range", "").startswith(f"bytes={start}-"):
            held.append(time.monotonic())
            await asyncio.sleep(3600)
        return await real(self, request, *args)

    monkeypatch.setattr(faultproxy.FaultProxy, "_relay", relay)
    return held


def test_a_range_deep_inside_a_chunk_slow_to_land_is_read_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """A range that starts near the end of a chunk slow to land waited for the chunk's bytes before it (a read
    of 1000 bytes near the end of a 16 MiB chunk, through a mirror of a 2 MiB/s upstream, timed out again and again: an
    explorer's trial). Its bytes are read aside, in a request of their own, and compared with the chunk once
    it lands."""
    slow_chunks(monkeypatch)
    # 4 KiB each 0.25 s: the pull's request reaches 60 KiB into a chunk after 3.75 s
    plan = upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.25, slow_piece=4096)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        start = 30 * SMALL_CHUNK + 60 * 1024
        with requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", stream=True, timeout=60,
                          headers={"Range": f"bytes={start}-{start + 999}"}) as answer:  # fmt: skip
            assert answer.status_code == 206
            # (the last few are held back, to be trickled while the last byte waits for its chunk to land)
            first = answer.raw.read(999 - mirror_following.TRICKLE_RESERVE)
            # (all the proxy sent by then: far less than the 60 KiB before the range, in the chunk's order)
            sent_by_then = plan.body_bytes
            plan.slow_delay = 0.0  # (the rest at once)
            rest = answer.raw.read()
        assert first + rest == FILES[BIG][start : start + 1000]
        assert sent_by_then < 48 * 1024, (sent_by_then, plan.requests)
        assert any(request.endswith(f"bytes={start}-{start + 998}") for request in plan.requests), (
            plan.requests
        )
        assert not mirror.runner.app[MIRROR].broke(REPO, BIG)
        whole = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", timeout=60)
        assert whole.status_code == 200 and whole.content == FILES[BIG]
    finally:
        mirror.stop()


def test_the_last_bytes_of_a_range_trickle_while_its_last_chunk_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """A range's last byte waits for its chunk to land (checked): a safetensors header read, bytes 0-999,
    through a mirror of a 2 MiB/s upstream got 999 bytes at once and its last one 28 s later, after the
    client's 10 s read timeout (a trial). While it waits, the few bytes before it go one at a time, each
    after a silence (compared with the chunk once it lands, as any bytes sent ahead are)."""
    slow_chunks(monkeypatch)
    monkeypatch.setattr(mirror_following, "TRICKLE_EVERY", 0.3)
    # 4 KiB each 0.5 s: the chunk (64 KiB) lands after 8 s
    plan = upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.5, slow_piece=4096)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        with requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", stream=True, timeout=60,
                          headers={"Range": "bytes=0-999"}) as answer:  # fmt: skip
            assert answer.status_code == 206
            first = answer.raw.read(999 - mirror_following.TRICKLE_RESERVE + 3)  # (three trickled)
            sent_by_then = plan.body_bytes
            plan.slow_delay = 0.0
            rest = answer.raw.read()
        assert first + rest == FILES[BIG][:1000]
        assert sent_by_then < SMALL_CHUNK, "the trickled bytes waited for their chunk to land"
        assert not mirror.runner.app[MIRROR].broke(REPO, BIG)
    finally:
        mirror.stop()


def test_bytes_read_aside_that_the_landed_chunk_refutes_break_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """Bytes read aside are the source's word alone: a wrong one went out, and the chunk, once it landed
    checked, refutes it; the answer breaks before its last byte, and the file is marked for its resumes."""
    slow_chunks(monkeypatch)
    start = 30 * SMALL_CHUNK + 60 * 1024
    plan = upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.25, slow_piece=4096,
                              flip_range_start=start)  # fmt: skip
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        with requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", stream=True, timeout=60,
                          headers={"Range": f"bytes={start}-{start + 999}"}) as answer:  # fmt: skip
            assert answer.status_code == 206
            first = answer.raw.read(999 - mirror_following.TRICKLE_RESERVE)
            assert first[0] != FILES[BIG][start]  # (the flipped byte went out, read aside)
            plan.slow_delay = 0.0
            with pytest.raises(requests.exceptions.ChunkedEncodingError):  # (cut short of its last byte)
                b"".join(answer.iter_content(1024))
        assert mirror.runner.app[MIRROR].broke(REPO, BIG)
        whole = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", timeout=60)
        assert whole.status_code == 200 and whole.content == FILES[BIG]
    finally:
        mirror.stop()


def test_a_read_aside_that_stalls_does_not_hold_the_range_past_its_chunks_landing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """The reader waited on the read aside's next bytes, blind to its chunk's landing, and the aside retried
    for minutes: the client's read timeout expired where the range used to go as the chunk landed (a
    review's trial). The reader looks at both; the landing closes the read aside."""
    slow_chunks(monkeypatch)
    start = 30 * SMALL_CHUNK + 60 * 1024
    held = hold_ranges_from(monkeypatch, start)
    upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.1, slow_piece=4096)  # (a chunk: 1.6 s)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", timeout=(5, 10),
                              headers={"Range": f"bytes={start}-{start + 999}"})  # fmt: skip
        assert held, "no read aside was made"
        assert (answer.status_code, answer.content) == (206, FILES[BIG][start : start + 1000])
    finally:
        mirror.stop()


def test_an_answer_reads_aside_the_chunk_it_starts_deep_inside_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """After a chunk read aside, the next ones were read aside whole, from their first byte (a chunk entered
    at its start that had received nothing looked as far behind as one deep inside): a resume deep in a chunk
    fetched every later one twice (a review's trial)."""
    slow_chunks(monkeypatch)
    asked = reads_aside(monkeypatch)
    plan = upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.05, slow_piece=4096)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        start = 40 * SMALL_CHUNK + 60 * 1024
        answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", timeout=120,
                              headers={"Range": f"bytes={start}-"})  # fmt: skip
        assert answer.status_code == 206 and answer.content == FILES[BIG][start:]
        assert {first // SMALL_CHUNK for first, _ in asked} == {40}, asked
        assert plan.body_bytes < len(FILES[BIG]) + SMALL_CHUNK  # (the file once, and a part of a chunk)
    finally:
        mirror.stop()


def test_a_whole_read_of_a_small_file_slow_to_come_is_not_read_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of one chunk under a MiB is received into a buffer, never followed as it comes: a whole GET of
    it slower than the headers' patience read it aside whole, the file twice over the link (a review's
    trial)."""
    slow_chunks(monkeypatch)
    monkeypatch.setattr(mirror_pulls, "FIRST_BYTES_PATIENCE", 1.0)  # (the headers go before it lands)
    asked = reads_aside(monkeypatch)
    small = bytes(range(256)) * 240  # (60 KiB: one chunk)
    for proxy in proxied_node(tmp_path / "upstream", {"config.json": b"{}", "tokenizer.json": small}, REPO):
        plan = proxy.set("slow", times=-1, path_suffix="tokenizer.json", slow_delay=0.2, slow_piece=4096)
        mirror = mirror_node(tmp_path, proxy.url, monkeypatch)
        try:
            answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/tokenizer.json", timeout=60)
            assert answer.status_code == 200 and answer.content == small
            assert asked == [] and plan.body_bytes == len(small), (asked, plan.body_bytes)
        finally:
            mirror.stop()


def test_no_byte_of_a_landed_chunk_whose_file_check_may_refute_it_is_trickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """The last chunk of a whole read landed unvouched (a Hub's bytes: only the file's SHA-256 proves them),
    its file's hash behind: a byte of it was trickled, recorded nowhere, and once the file was pulled again
    the client's resume was joined to that refuted byte (a review's trial). The reader waits for the check."""
    monkeypatch.setattr(mirror_following, "TRICKLE_EVERY", 0.2)
    last = len(FILES[BIG]) // SMALL_CHUNK * SMALL_CHUNK  # (the file's last chunk, 99 bytes)
    plan = upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.01, slow_piece=16384,
                              flip_range_start=last)  # fmt: skip
    real_hash = download._hash_chunk

    def hash_behind(hasher: Any, source: Any, offset: int, length: int, digest: str) -> None:
        if offset == last:
            time.sleep(1.5)  # (the file's hash behind the network: its last chunk's turn comes late)
        real_hash(hasher, source, offset, length, digest)

    monkeypatch.setattr(download, "_hash_chunk", hash_behind)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)
    try:
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        received = asyncio.run(read_until_it_breaks(url))
        assert len(received) == last and received == FILES[BIG][:last], "a byte of the last chunk went"
        assert plan.requests and mirror.runner.app[MIRROR].broke(REPO, BIG)
        plan.flip_range_start = -1
        wait_until(lambda: requests.get(url, timeout=60).status_code == 200 and mirror.depot.has_file(REPO, BIG),
                   60, "the file pulled again")  # fmt: skip
        commit = mirror.depot.resolve(REPO, "main")
        resumed = requests.get(f"{mirror.url}/{REPO}/resolve/{commit}/{BIG}", timeout=60,
                               headers={"Range": f"bytes={len(received)}-"})  # fmt: skip
        joined = received + resumed.content if resumed.status_code == 206 else resumed.content
        assert joined == FILES[BIG], resumed.status_code
    finally:
        mirror.stop()
