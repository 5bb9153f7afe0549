"""The parts of chunks in flight a pull writes down as it goes (transfer/download.py ``_write_down_parts``),
so that a SIGKILL loses seconds of each: never a liar's bytes. A node that gives honest digests and sends
flipped bytes, slowly: its chunk fails its BLAKE3, and the next request for it (the Hub's) asks for the whole
chunk, not for "the rest" after the liar's part (a review found the rejected part kept and resumed from)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from pathlib import Path

import aiohttp
import blake3
import pytest
from aiohttp import web

from conftest import BackgroundServer
from modeldepot import Depot
from modeldepot.hub.manifest import RemoteFile
from modeldepot.transfer import download
from modeldepot.transfer.download import FileSource, Limits, download_file
from modeldepot.transfer.session import LazySession
from modeldepot.transfer.sources import HttpSource, RetryPolicy

CHUNK = 1 << 20
CHUNKS = 3
DATA = random.Random(5).randbytes(CHUNKS * CHUNK)
SHA = hashlib.sha256(DATA).hexdigest()
DIGESTS = tuple(blake3.blake3(DATA[i * CHUNK : (i + 1) * CHUNK]).hexdigest() for i in range(CHUNKS))
REMOTE = RemoteFile("w.safetensors", len(DATA), "0" * 40, SHA)
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


class RangeServer:
    """Answers ranges of DATA; ``lying``: each byte flipped, sent 256 KiB every 0.3 s."""

    def __init__(self, lying: bool) -> None:
        self.lying = lying
        self.asked: list[tuple[int, int]] = []
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._server = BackgroundServer(web.AppRunner(app), "liar" if lying else "hub")
        self.url = self._server.url

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        wanted = _RANGE.fullmatch(request.headers.get("Range", ""))
        assert wanted is not None
        start, end = int(wanted.group(1)), int(wanted.group(2))
        self.asked.append((start, end))
        body = DATA[start : end + 1]
        headers = {"Content-Range": f"bytes {start}-{end}/{len(DATA)}"}
        if not self.lying:
            return web.Response(status=206, body=body, headers=headers)
        body = bytes(b ^ 0xFF for b in body)
        response = web.StreamResponse(status=206, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        for at in range(0, len(body), 256 << 10):
            await response.write(body[at : at + (256 << 10)])
            await asyncio.sleep(0.3)
        return response

    def stop(self) -> None:
        self._server.stop()


def test_the_bytes_of_a_chunk_that_failed_its_check_are_never_resumed_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "PART_LOG_EVERY", 0.2)
    monkeypatch.setattr(download, "PART_LOG_MIN_BYTES", 8192)
    liar, hub = RangeServer(lying=True), RangeServer(lying=False)
    node = FileSource(HttpSource(liar.url, "node", None, RetryPolicy(attempts=1, base_delay=0.01)),
                      f"{liar.url}/blob", DIGESTS, "peer")  # fmt: skip
    upstream = FileSource(HttpSource(hub.url, "hub", None, RetryPolicy(attempts=1)), f"{hub.url}/file")
    try:
        with Depot(tmp_path / "local", chunk_size=CHUNK) as local:
            claim = local.store.partials.claim(SHA, len(DATA), CHUNK, False)
            assert claim is not None

            async def run() -> str:
                async with aiohttp.ClientSession() as http:
                    digest = await download_file(LazySession(http), REMOTE, claim, [node],
                                                 Limits(per_source=1, total=8), lambda: [upstream])  # fmt: skip
                    return digest.sha256

            try:
                assert asyncio.run(run()) == SHA
                assert claim.parts == {}, "no part of the liar's is kept"
            finally:
                claim.release(completed=False)
    finally:
        liar.stop()
        hub.stop()
    assert liar.asked == [(0, CHUNK - 1)], liar.asked
    resumed = [(start, end) for start, end in hub.asked if start % CHUNK]
    assert not resumed, f"the Hub was asked for the rest of a chunk the liar began: {resumed}"
    assert sorted(hub.asked) == [(i * CHUNK, (i + 1) * CHUNK - 1) for i in range(CHUNKS)], hub.asked
