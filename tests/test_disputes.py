"""Which of several nodes lied about a file, settled by one chunk of the upstream's (transfer/disputes.py):
the chunk chosen from the nodes' own words, and the upstream's bytes of it, fetched over a real socket."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator

import blake3
import pytest
from aiohttp import web

from conftest import BackgroundServer
from modeldepot.errors import IntegrityError
from modeldepot.transfer.choosing import FileSource
from modeldepot.transfer.disputes import caught_by_upstream, disputed_chunk
from modeldepot.transfer.download import Limits
from modeldepot.transfer.sources import HttpSource, RetryPolicy

CHUNK = 64 * 1024
DATA = random.Random(5).randbytes(3 * CHUNK + 1000)
TRUE = tuple(blake3.blake3(DATA[o : o + CHUNK]).hexdigest() for o in range(0, len(DATA), CHUNK))
LIE = tuple(blake3.blake3(b"not it %d" % index).hexdigest() for index in range(len(TRUE)))
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


def holder(name: str, digests: tuple[str, ...] | None) -> FileSource:
    return FileSource(HttpSource(f"http://{name}", "peer"), f"http://{name}/blob", digests, "peer")


def landed(chunks: dict[int, tuple[set[str], str]]) -> IntegrityError:
    mismatch = IntegrityError("the file's SHA-256 does not match")
    mismatch.chunks_landed = {
        index: (frozenset(senders), digest) for index, (senders, digest) in chunks.items()
    }
    return mismatch


def test_the_chunk_in_dispute_is_one_the_suspects_words_differ_on() -> None:
    liar, honest = holder("liar", LIE), holder("honest", TRUE)
    names = {liar.source.name, honest.source.name}
    mismatch = landed(
        {0: ({liar.source.name}, LIE[0]), 1: ({honest.source.name}, TRUE[1]), 2: (set(), TRUE[2])}
    )
    index, said = disputed_chunk(mismatch, names, [liar, honest]) or (None, {})
    assert index == 0 and said == {liar.source.name: LIE[0], honest.source.name: TRUE[0]}


def test_no_dispute_when_the_words_agree_or_a_chunk_had_two_senders() -> None:
    honest, liar, other = holder("honest", TRUE), holder("liar", None), holder("other", TRUE)
    names = {honest.source.name, liar.source.name, other.source.name}
    # An honest node sent a cut prefix of chunk 0 and the liar the rest: it landed as the liar's. No one
    # suspect's word: taken for the honest node's, it was in dispute with the others' lists, and the honest
    # node would have been caught by the upstream's chunk
    mismatch = landed(
        {0: ({honest.source.name, liar.source.name}, LIE[0]), 1: ({other.source.name}, TRUE[1])}
    )
    assert disputed_chunk(mismatch, names, [honest, liar, other]) is None
    # (a node not suspected gives no word: its digests are not in the dispute)
    assert (
        disputed_chunk(landed({0: ({honest.source.name}, TRUE[0])}), {honest.source.name}, [holder("x", LIE)])
        is None
    )


def test_a_leave_out_lifted_lifts_itself_alone() -> None:
    """Two files of one pull left the same suspect out; one file's digests cleared it. It stays out while
    the other file's leave-out lasts, and no longer (one value restored on a lift brought back a lifted one)."""
    from modeldepot.transfer.choosing import LEFT_OUT, ChunkChooser, left_out

    source = holder("suspect", None)
    first = left_out(source.source.name, 30)
    second = left_out(source.source.name, 60)
    assert ChunkChooser._banned_until(source) > time.monotonic() + 50
    second()
    assert time.monotonic() + 20 < ChunkChooser._banned_until(source) <= time.monotonic() + 30
    first()
    assert ChunkChooser._banned_until(source) == 0.0 and source.source.name not in LEFT_OUT
    second()  # (lifted twice: nothing more)
    assert ChunkChooser._banned_until(source) == 0.0


class Upstream:
    """Answers ranges of DATA, or of DATA with every byte flipped (a garbled upstream)."""

    def __init__(self, garbled: bool = False) -> None:
        self.body = bytes(b ^ 0xFF for b in DATA) if garbled else DATA
        self.asked: list[str] = []
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._server = BackgroundServer(web.AppRunner(app), "disputes-upstream")
        self.source = FileSource(HttpSource(self._server.url, "hub", None, RetryPolicy(attempts=1)),
                                 f"{self._server.url}/blob")  # fmt: skip

    async def _handle(self, request: web.Request) -> web.Response:
        wanted = _RANGE.fullmatch(request.headers.get("Range", ""))
        assert wanted is not None
        self.asked.append(wanted.group(0))
        start, end = int(wanted.group(1)), int(wanted.group(2))
        headers = {"Content-Range": f"bytes {start}-{end}/{len(DATA)}"}
        return web.Response(status=206, body=self.body[start : end + 1], headers=headers)

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


def test_the_upstreams_chunk_names_whoever_differs_from_it(upstream: Upstream) -> None:
    said = {"liar": LIE[3], "honest": TRUE[3], "also honest": TRUE[3]}
    caught = asyncio.run(caught_by_upstream(upstream.source, len(DATA), CHUNK, 3, said, Limits()))
    assert caught == ({"liar"}, len(DATA) - 3 * CHUNK)
    assert upstream.asked == [f"bytes={3 * CHUNK}-{len(DATA) - 1}"]  # (the last chunk, short: one range)


def test_an_upstream_chunk_that_matches_no_word_catches_nobody() -> None:
    garbled = Upstream(garbled=True)
    try:
        said = {"liar": LIE[1], "honest": TRUE[1]}
        assert asyncio.run(caught_by_upstream(garbled.source, len(DATA), CHUNK, 1, said, Limits())) == (
            None,
            CHUNK,
        )
    finally:
        garbled.stop()


def test_an_upstream_that_cannot_be_asked_settles_nothing() -> None:
    gone = FileSource(HttpSource("http://127.0.0.1:9", "hub", None, RetryPolicy(attempts=1, base_delay=0.01)),
                      "http://127.0.0.1:9/blob")  # fmt: skip
    said = {"liar": LIE[0], "honest": TRUE[0]}
    assert asyncio.run(caught_by_upstream(gone, len(DATA), CHUNK, 0, said, Limits())) == (None, 0)
