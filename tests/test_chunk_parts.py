"""Parts of chunks: what a request cut mid-chunk left in the file's pages, completed by the next request.
A part keeps the BLAKE3 its sender gave for the chunk, so a node's bytes completed by the Hub (which gives no
chunk digest) are still checked at the chunk; its bytes are credited to the source that sent them."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import Callable
from pathlib import Path

import aiohttp
import blake3
import pytest
from aiohttp import web

from conftest import SMALL_CHUNK, BackgroundServer
from modeldepot import Depot
from modeldepot.errors import UpstreamError
from modeldepot.hashing import chunk_span
from modeldepot.hub.manifest import RemoteFile
from modeldepot.store.partials import ResumablePartial
from modeldepot.transfer.download import FileSource, Limits, download_file
from modeldepot.transfer.session import LazySession
from modeldepot.transfer.sources import HttpSource, RetryPolicy

CHUNKS = 4
DATA = random.Random(22).randbytes(CHUNKS * SMALL_CHUNK)
SHA = hashlib.sha256(DATA).hexdigest()
DIGESTS = tuple(
    blake3.blake3(DATA[o : o + n]).hexdigest()
    for o, n in (chunk_span(i, len(DATA), SMALL_CHUNK) for i in range(CHUNKS))
)
REMOTE = RemoteFile("w.safetensors", len(DATA), "0" * 40, SHA)
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
CUT_AT = 20_000


class RangeServer:
    """Answers ranges of DATA. ``cutting``: the first answer to each chunk's range sends ``CUT_AT`` bytes
    (flipped when ``lying``) and hangs up; every request after that gets a 500 (the node went away)."""

    def __init__(self, cutting: bool = False, lying: bool = False) -> None:
        self.cutting, self.lying = cutting, lying
        self.cut: set[int] = set()
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._server = BackgroundServer(web.AppRunner(app), "parts-" + ("cutting" if cutting else "whole"))
        self.url = self._server.url

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        wanted = _RANGE.fullmatch(request.headers.get("Range", ""))
        assert wanted is not None
        start, end = int(wanted.group(1)), int(wanted.group(2))
        body = DATA[start : end + 1]
        headers = {"Content-Range": f"bytes {start}-{end}/{len(DATA)}"}
        if not self.cutting:
            return web.Response(status=206, body=body, headers=headers)
        if start in self.cut or start % SMALL_CHUNK:
            return web.Response(status=500)
        self.cut.add(start)
        response = web.StreamResponse(status=206, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(bytes(b ^ 0xFF for b in body[:CUT_AT]) if self.lying else body[:CUT_AT])
        assert request.transport is not None
        request.transport.close()
        return response

    def stop(self) -> None:
        self._server.stop()


def node_source(server: RangeServer) -> FileSource:
    """A node that gives the chunks' BLAKE3s (honest ones, whatever its bytes)."""
    return FileSource(HttpSource(server.url, "node", None, RetryPolicy(attempts=1, base_delay=0.01)),
                      f"{server.url}/blob", DIGESTS, "peer")  # fmt: skip


def hub_source(server: RangeServer) -> FileSource:
    return FileSource(HttpSource(server.url, "hub", None, RetryPolicy(attempts=1)), f"{server.url}/file")


def fetch(
    claim: ResumablePartial, sources: list[FileSource], fallback: list[FileSource],
    on_bytes: Callable[[int, str, str], None] | None = None,
    on_start: Callable[[Callable[[], int], Callable[[], int]], None] | None = None,
) -> str:  # fmt: skip
    async def run() -> str:
        async with aiohttp.ClientSession() as http:
            digest = await download_file(LazySession(http), REMOTE, claim, sources, Limits(per_source=2, total=8),
                                         lambda: fallback, on_bytes, on_start=on_start)  # fmt: skip
            return digest.sha256

    return asyncio.run(run())


@pytest.fixture
def servers() -> object:
    made: list[RangeServer] = []

    def make(**how: bool) -> RangeServer:
        made.append(RangeServer(**how))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def test_a_lying_nodes_part_completed_from_the_hub_is_caught_at_the_chunk(
    tmp_path: Path, servers: Callable
) -> None:
    """A node sends flipped bytes and hangs up; the Hub completes each chunk from where it stopped. The
    mixed chunk was logged done unchecked (the Hub gives no digest), the file failed its SHA-256, and every
    chunk was thrown away: the node's BLAKE3 kept with the part catches it at the chunk."""
    liar, hub = servers(cutting=True, lying=True), servers()
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
        claim = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
        assert claim is not None
        try:
            assert fetch(claim, [node_source(liar)], [hub_source(hub)]) == SHA
        finally:
            claim.release(completed=False)


def test_a_part_a_node_sent_is_checked_by_its_digest_after_a_restart(
    tmp_path: Path, servers: Callable
) -> None:
    """The same across two pulls: the first ends with the node's parts in the file (it went away, no Hub
    to fall back on); the next, from the Hub alone, finds them in the log with the node's BLAKE3s."""
    liar, hub = servers(cutting=True, lying=True), servers()
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
        claim = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
        assert claim is not None
        with pytest.raises(UpstreamError):
            fetch(claim, [node_source(liar)], [])
        claim.release(completed=False)
        again = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
        assert again is not None
        try:
            assert again.parts, "the node's parts are in the file, for this pull"
            assert fetch(again, [hub_source(hub)], []) == SHA
        finally:
            again.release(completed=False)


def test_a_kept_chunk_gone_bad_is_fetched_again_whole_not_resumed_from_its_old_part(
    tmp_path: Path, servers: Callable
) -> None:
    """A chunk whose part was logged while it downloaded, then logged done, then rotted on disk (a write lost
    in a power loss, bit rot) failed its BLAKE3 at the resume, as it should; but its old part came back from
    the log, and its bad bytes were kept and completed: the file failed its SHA-256 and was fetched whole again
    (an SRE's trial: 400 MiB from the Hub for a 200 MiB file)."""
    hub = servers()
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
        claim = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
        assert claim is not None
        offset, length = chunk_span(1, len(DATA), SMALL_CHUNK)
        with claim.map_chunk(1) as pages:  # (received into its pages, as a transfer does)
            pages[: length // 2] = DATA[offset : offset + length // 2]
        claim.log_part(1, length // 2)
        claim.write_chunk(1, memoryview(DATA[offset : offset + length]), DIGESTS[1])
        claim.release(completed=False)
        data_file = next((local.home / "partials").glob("*.part"))
        with open(data_file, "r+b") as rotten:  # (in the part the log once named)
            rotten.seek(offset + 100)
            rotten.write(b"\0" * 16)
        again = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
        assert again is not None
        try:
            assert 1 not in again.done and 1 not in again.parts, (again.done, again.parts)
            asked: list[int] = []
            assert fetch(again, [hub_source(hub)], [], on_bytes=lambda n, origin, url: asked.append(n)) == SHA
            assert sum(asked) == len(DATA)  # (every chunk fetched, none failed: the file was right at once)
        finally:
            again.release(completed=False)


def test_bytes_a_node_sent_in_this_pull_are_its_not_resumed(tmp_path: Path, servers: Callable) -> None:
    """An honest node cut after 20,000 bytes of each chunk, the Hub sends the rest: those bytes came over
    the network from the node in this pull. They were counted as found on disk ("local": bytes_resumed,
    not the node's in bytes_by_source nor its metrics)."""
    cutter, hub = servers(cutting=True), servers()
    counted: dict[str, int] = {}

    def on_bytes(amount: int, kind: str, base_url: str) -> None:
        counted[kind] = counted.get(kind, 0) + amount

    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
        claim = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
        assert claim is not None and not claim.parts and not claim.done
        try:
            assert fetch(claim, [node_source(cutter)], [hub_source(hub)], on_bytes) == SHA
        finally:
            claim.release(completed=False)
    sent = len(cutter.cut) * CUT_AT
    assert sent and counted == {"peer": sent, "hub": len(DATA) - sent}, counted


def test_the_parts_an_earlier_pull_left_are_shown_from_the_start_as_found(
    tmp_path: Path, servers: Callable
) -> None:
    """A pull stopped with parts of its chunks in the file: the next one showed them only as their chunks
    landed (a resume of a pull stopped at 39 of 64 MiB began at "0 B", its time left reckoned for the whole
    file, then jumped to the end). They are shown from the start, as found on disk (no part of the rate)."""
    cutter, hub = servers(cutting=True), servers()
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
        claim = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
        assert claim is not None
        with pytest.raises(UpstreamError):
            fetch(claim, [node_source(cutter)], [])
        claim.release(completed=False)
        again = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
        assert again is not None
        kept = sum(part.received for part in again.parts.values())
        assert kept == len(cutter.cut) * CUT_AT > 0 and not again.done
        seen: list[tuple[int, int]] = []
        counted: dict[str, int] = {}

        def on_start(receiving: Callable[[], int], kept_earlier: Callable[[], int]) -> None:
            seen.append((receiving(), kept_earlier()))

        def on_bytes(amount: int, kind: str, base_url: str) -> None:
            counted[kind] = counted.get(kind, 0) + amount

        try:
            assert fetch(again, [hub_source(hub)], [], on_bytes, on_start) == SHA
        finally:
            again.release(completed=False)
    assert seen == [(kept, kept)], "shown and found at the start"
    assert counted == {"local": kept, "hub": len(DATA) - kept}, "credited as found when their chunks landed"


class WholeLiar:
    """A node that ignores ranges and sends the whole file with one byte of every chunk flipped, its chunk
    digests those of its own bytes (every chunk passes its check; the file fails its SHA-256)."""

    def __init__(self) -> None:
        wrong = bytearray(DATA)
        for index in range(CHUNKS):
            wrong[index * SMALL_CHUNK + 100] ^= 0x01
        self.data = bytes(wrong)
        self.digests = tuple(
            blake3.blake3(self.data[o : o + n]).hexdigest()
            for o, n in (chunk_span(i, len(DATA), SMALL_CHUNK) for i in range(CHUNKS))
        )
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._server = BackgroundServer(web.AppRunner(app), "parts-whole-liar")
        self.url = self._server.url

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, body=self.data)

    def source(self) -> FileSource:
        return FileSource(HttpSource(self.url, "node", None, RetryPolicy(attempts=3, base_delay=0.01)),
                          f"{self.url}/blob", self.digests, "peer")  # fmt: skip

    def stop(self) -> None:
        self._server.stop()


def test_only_the_nodes_whose_bytes_are_in_the_wrong_chunks_are_named_liars(
    tmp_path: Path, servers: Callable
) -> None:
    """An honest node sent the start of two chunks and hung up; a liar ignoring ranges then sent the whole
    file, every chunk landing from its buffer (the honest parts fetched over). The honest node was named a
    liar with it, and would have been banned for 10 minutes (a review): only the liar is named."""
    from modeldepot.errors import IntegrityError
    from modeldepot.hashing import digest_bytes
    from modeldepot.transfer.download import liars

    cutter, liar = servers(cutting=True), WholeLiar()
    try:
        with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
            claim = local.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, False)
            assert claim is not None
            try:
                with pytest.raises(IntegrityError) as failed:
                    fetch(claim, [node_source(cutter)], [liar.source()])
            finally:
                claim.release(completed=False)
        assert cutter.cut, "the honest node sent parts first"
        named = liars(failed.value, digest_bytes(DATA, SMALL_CHUNK))
        assert named == {liar.source().source.name: CHUNKS}, named
    finally:
        liar.stop()
