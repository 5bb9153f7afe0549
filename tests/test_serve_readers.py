"""What the node keeps while it answers a file: the blob's reader, and the bytes it checked. A shared blob
(another name links it: `import --link`, an adopted or exported Hugging Face cache) is read rather than
mapped; a small one too. A reader is closed however its answer ends, and never beneath a thread that
still reads it; a revalidation (If-None-Match) is answered without reading the file."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from conftest import SMALL_CHUNK, LiveNode, flip_byte, http_request, sample_files, write_model_dir
from modeldepot import Depot
from modeldepot.store.verified import VerifiedBlob

REPO = "acme/tiny"
FILES = sample_files(0)
BIG = "model.safetensors"  # 300,000 bytes: five chunks of 64 KiB, sent by sendfile
CONF = "config.json"


def test_a_shared_blob_sent_by_sendfile_keeps_no_copies_of_its_chunks(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunks a check read are kept for the answer only when they are what it sends (a small blob's):
    a shared blob of 16 MiB chunks sent by sendfile held 32 MiB per connection until it ended."""
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO, link=True)
    kept: list[int] = []
    real_close = VerifiedBlob.close

    def close(self: VerifiedBlob) -> None:
        kept.append(sum(len(v) for v in getattr(self, "_checked", {}).values()))
        real_close(self)

    monkeypatch.setattr(VerifiedBlob, "close", close)
    node = LiveNode(depot)
    try:
        status, _, body = http_request(node, f"/{REPO}/resolve/{depot.resolve(REPO)}/{BIG}")
    finally:
        node.stop()
    assert status == 200 and body == FILES[BIG]
    assert kept and max(kept) == 0, f"bytes of checked chunks still held when the answer ended: {kept}"


def test_a_revalidation_is_answered_without_reading_the_file(depot: Depot, tmp_path: Path) -> None:
    """A GET naming the ETag it holds gets its 304 without the blob being read: a rotted first chunk made it a
    503 (and the blob quarantined) once the first chunk was checked as the file was opened."""
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    node = LiveNode(depot)
    try:
        target = f"/{REPO}/resolve/{depot.resolve(REPO)}/{CONF}"
        status, headers, _ = http_request(node, target)
        assert status == 200
        flip_byte(depot.store.blobs.path(hashlib.sha256(FILES[CONF]).hexdigest()), 2)
        status, _, body = http_request(node, target, {"If-None-Match": headers["ETag"]})
        assert status == 304, (status, body[:200])
        assert http_request(node, target)[0] == 503  # (the rot is found by the next read that sends it)
    finally:
        node.stop()


def test_a_reader_opened_for_an_answer_past_its_deadline_is_closed(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check slower than the request's deadline (a slow disk): the answer is a 408, and the reader its
    worker thread opened is closed by the node once the thread is done with it (it was left to the garbage
    collector, an unclosed file)."""
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    opened: list[int] = []
    closed: list[int] = []
    real_init, real_close, real_check = VerifiedBlob.__init__, VerifiedBlob.close, VerifiedBlob.check

    def init(self: VerifiedBlob, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        opened.append(id(self))

    def close(self: VerifiedBlob) -> None:
        closed.append(id(self))
        real_close(self)

    def check(self: VerifiedBlob, index: int) -> str:
        time.sleep(1.0)  # (a slow disk)
        return real_check(self, index)

    monkeypatch.setattr(VerifiedBlob, "__init__", init)
    monkeypatch.setattr(VerifiedBlob, "close", close)
    monkeypatch.setattr(VerifiedBlob, "check", check)
    node = LiveNode(depot, request_deadline=0.3)
    try:
        for path in (CONF, BIG):  # (opened and checked in one trip; checked in send_blob after a Range)
            headers = {} if path == CONF else {"Range": "bytes=70000-"}
            assert http_request(node, f"/{REPO}/resolve/{depot.resolve(REPO)}/{path}", headers)[0] == 408
        deadline = time.monotonic() + 10
        while not set(opened) <= set(closed) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        node.stop()
    assert len(opened) == 2 and set(opened) <= set(closed), f"opened {len(opened)}, closed {len(closed)}"


def test_where_sendfile_cannot_run_the_answer_goes_whole_through_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transport asyncio cannot sendfile on (TLS, say) raises NotImplementedError: the piece and the rest
    go through the writer, from the checked chunks, under the upload cap (each piece paid for once)."""
    import asyncio

    monkeypatch.setenv("MODELDEPOT_MAX_UPLOAD_RATE", "1MiB/s")  # (pieces of 64 KiB)

    async def no_sendfile(*args: object, **kwargs: object) -> int:
        raise NotImplementedError("sendfile is not supported for this transport")

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", no_sendfile)
    with Depot(tmp_path / "capped", chunk_size=SMALL_CHUNK) as depot:
        assert depot.config.max_upload_rate == 1 << 20
        depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        node = LiveNode(depot)
        try:
            target = f"/{REPO}/resolve/{depot.resolve(REPO)}/{BIG}"
            status, _, body = http_request(node, target)
            assert status == 200 and body == FILES[BIG]
            status, _, body = http_request(node, target, {"Range": "bytes=70000-299999"})
            assert status == 206 and body == FILES[BIG][70000:]
        finally:
            node.stop()
