"""A node serves the verified chunks of a file it is still downloading (to requests with its token), says
which chunks it has, refuses a chunk it lacks with 404 ``ChunkNotAvailable``, and never serves a partial as
a complete file (blob route without a Range, Hub routes)."""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import blake3
import pytest

from conftest import SMALL_CHUNK, LiveNode, flip_byte, write_model_dir, write_partial
from conftest import http_request as get
from modeldepot import Depot
from modeldepot.store import publish as publish_module
from modeldepot.store.partials import ENDED_MARK

API = "/api/depot/v1"
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DATA = os.urandom(4 * SMALL_CHUNK + 1000)  # 5 chunks, the last short
LOGGED = [0, 1, 3]  # chunks 2 and 4 not downloaded yet
SHA = hashlib.sha256(DATA).hexdigest()


def chunk(index: int) -> bytes:
    return DATA[index * SMALL_CHUNK : (index + 1) * SMALL_CHUNK]


@pytest.fixture
def nodes(depot: Depot) -> Iterator[tuple[LiveNode, LiveNode]]:
    """A node with a token and one without, over a store holding a download of DATA in progress."""
    assert write_partial(depot, DATA, LOGGED) == SHA
    guarded, open_node = LiveNode(depot, token=TOKEN), LiveNode(depot)
    yield guarded, open_node
    open_node.stop()
    guarded.stop()


def test_the_chunk_map_names_the_logged_chunks_of_a_partial_and_all_of_a_blob(
    nodes: tuple[LiveNode, LiveNode], depot: Depot, tmp_path: Path
) -> None:
    guarded, _ = nodes
    status, _, body = get(guarded, f"{API}/blobs/{SHA}/chunks", AUTH)
    assert status == 200
    answer = json.loads(body)
    assert answer == {
        "sha256": SHA,
        "size": len(DATA),
        "chunk_size": SMALL_CHUNK,
        "complete": False,
        "chunks": base64.b64encode(bytes([0b11010000])).decode(),
    }
    # Asked, the BLAKE3 its log names of each chunk it offers (taken while the registry is silent)
    status, _, body = get(guarded, f"{API}/blobs/{SHA}/chunks", {**AUTH, "X-Chunk-Digests": "1"})
    logged = [blake3.blake3(DATA[i * SMALL_CHUNK : (i + 1) * SMALL_CHUNK]).hexdigest() for i in (0, 1, 3)]
    assert status == 200
    assert json.loads(body) == {
        **answer,
        "blake3": [logged[0], logged[1], None, logged[2], None],
    }  # (5 chunks)

    whole = os.urandom(8 * SMALL_CHUNK + 1)  # 9 chunks: two bytes of bitfield, seven bits of padding
    depot.import_dir(write_model_dir(tmp_path / "src", {"w.bin": whole}), "acme/whole")
    status, _, body = get(guarded, f"{API}/blobs/{hashlib.sha256(whole).hexdigest()}/chunks", AUTH)
    assert status == 200
    answer = json.loads(body)
    assert answer["complete"] is True and answer["size"] == len(whole)
    assert base64.b64decode(answer["chunks"]) == bytes([0xFF, 0x80])


def test_ranges_inside_logged_chunks_are_served_byte_for_byte(nodes: tuple[LiveNode, LiveNode]) -> None:
    guarded, _ = nodes
    for first, last in [(5, 99), (SMALL_CHUNK - 10, SMALL_CHUNK + 10), (0, 2 * SMALL_CHUNK - 1),
                        (3 * SMALL_CHUNK, 4 * SMALL_CHUNK - 1)]:  # fmt: skip
        status, headers, body = get(guarded, f"{API}/blobs/{SHA}", {**AUTH, "Range": f"bytes={first}-{last}"})
        assert status == 206, (first, last, body[:200])
        assert body == DATA[first : last + 1]
        assert headers["Content-Range"] == f"bytes {first}-{last}/{len(DATA)}"
        assert headers["X-Chunk-Size"] == str(SMALL_CHUNK)
        assert headers["ETag"] == f'"{SHA}"'
    status, headers, body = get(guarded, f"{API}/blobs/{SHA}/chunks/1", AUTH)
    assert status == 200 and body == chunk(1)
    assert headers["X-Chunk-Blake3"] == blake3.blake3(chunk(1)).hexdigest()


def test_a_chunk_not_downloaded_is_refused_and_the_partial_is_never_whole(
    nodes: tuple[LiveNode, LiveNode],
) -> None:
    guarded, _ = nodes
    refusals = [
        (f"{API}/blobs/{SHA}", {"Range": f"bytes={2 * SMALL_CHUNK - 1}-{2 * SMALL_CHUNK}"}, "GET"),  # 1 and 2
        (f"{API}/blobs/{SHA}", {"Range": "bytes=-10"}, "GET"),  # the last chunk, 4
        (f"{API}/blobs/{SHA}", {}, "GET"),  # the whole file: only a complete blob is that
        (f"{API}/blobs/{SHA}", {}, "HEAD"),  # what the source chain asks a node that may hold content
        (f"{API}/blobs/{SHA}/chunks/2", {}, "GET"),
    ]
    for target, headers, method in refusals:
        status, answer, body = get(guarded, target, {**AUTH, **headers}, method)
        assert (status, answer.get("X-Error-Code")) == (404, "ChunkNotAvailable"), (target, headers, method)
        assert chunk(1)[-16:] not in body and chunk(2)[:16] not in body
    status, answer, _ = get(guarded, f"{API}/blobs/{SHA}", {**AUTH, "Range": f"bytes={len(DATA)}-"})
    assert status == 416 and answer["Content-Range"] == f"bytes */{len(DATA)}"


def test_a_logged_chunk_whose_bytes_are_wrong_is_not_sent(
    nodes: tuple[LiveNode, LiveNode], depot: Depot, caplog: pytest.LogCaptureFixture
) -> None:
    guarded, _ = nodes
    part = depot.store.layout.partials / f"{SHA}.part"
    flip_byte(part, 3 * SMALL_CHUNK + 7)
    for target, headers in [(f"{API}/blobs/{SHA}", {"Range": f"bytes={3 * SMALL_CHUNK}-{3 * SMALL_CHUNK + 99}"}),
                            (f"{API}/blobs/{SHA}/chunks/3", {})]:  # fmt: skip
        status, answer, body = get(guarded, target, {**AUTH, **headers})
        assert (status, answer.get("X-Error-Code")) == (404, "ChunkNotAvailable"), target
        assert DATA[3 * SMALL_CHUNK + 8 : 3 * SMALL_CHUNK + 40] not in body
    # Found bad, it is said once and offered no more while it stays so (every peer sent to it got a 404 and
    # counted a failure, and the node said nothing of a disk going bad: an SRE's trial)
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if r.message.startswith("chunk 3 of the download"))
    ) == 1
    # A line that reached the log before its bytes reached the disk: claimed, refused when read.
    with open(depot.store.layout.partials / f"{SHA}.log", "a") as log:
        log.write(f"2 {blake3.blake3(chunk(2)).hexdigest()}\n")
    status, _, body = get(guarded, f"{API}/blobs/{SHA}/chunks", AUTH)
    assert base64.b64decode(json.loads(body)["chunks"]) == bytes([0b11100000])
    status, answer, _ = get(guarded, f"{API}/blobs/{SHA}/chunks/2", AUTH)
    assert (status, answer.get("X-Error-Code")) == (404, "ChunkNotAvailable")
    status, _, body = get(guarded, f"{API}/blobs/{SHA}/chunks", AUTH)
    assert base64.b64decode(json.loads(body)["chunks"]) == bytes([0b11000000])
    # (not read again while the file is unwritten: every peer's refresh of the map read 16 MiB of a failing
    # disk, a review); right again by a write, as a resume that fetched it anew leaves it, it is offered
    flip_byte(part, 3 * SMALL_CHUNK + 7)
    status, _, body = get(guarded, f"{API}/blobs/{SHA}/chunks", AUTH)
    assert base64.b64decode(json.loads(body)["chunks"]) == bytes([0b11000000])
    os.utime(part, ns=(time.time_ns(), time.time_ns() + 10**9))
    status, _, body = get(guarded, f"{API}/blobs/{SHA}/chunks", AUTH)
    assert base64.b64decode(json.loads(body)["chunks"]) == bytes([0b11010000])
    # A bad chunk after the first of a range: the headers went, the body is cut, never complete.
    flip_byte(part, SMALL_CHUNK + 3)
    connection = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=60)
    try:
        connection.request(
            "GET", f"{API}/blobs/{SHA}", headers={**AUTH, "Range": f"bytes=0-{2 * SMALL_CHUNK - 1}"}
        )
        response = connection.getresponse()
        assert response.status == 206
        with pytest.raises(http.client.IncompleteRead) as cut:
            response.read()
        assert cut.value.partial == chunk(0)  # the good chunk, then nothing of the bad one
    finally:
        connection.close()
    assert depot.store.partials.read_log(SHA) is not None  # nothing quarantined, the pull may fix it


def test_partials_are_served_only_with_the_token(nodes: tuple[LiveNode, LiveNode]) -> None:
    guarded, open_node = nodes
    nowhere = hashlib.sha256(b"nowhere").hexdigest()
    for suffix, headers in [("", {"Range": "bytes=0-9"}), ("/chunks", {}), ("/chunks/0", {})]:
        status, _, _ = get(guarded, f"{API}/blobs/{SHA}{suffix}", headers)
        assert status == 401
        answers = []
        for digest in (SHA, nowhere):
            status, answer, body = get(open_node, f"{API}/blobs/{digest}{suffix}", headers)
            answers.append((status, answer.get("X-Error-Code"), body.replace(digest.encode(), b"<digest>")))
        assert answers[0] == answers[1] == (404, "NotFound", answers[1][2]), suffix
        assert SHA[:16].encode() not in answers[0][2].replace(b"<digest>", b"")


def test_a_public_repos_download_is_served_without_a_token(nodes: tuple[LiveNode, LiveNode]) -> None:
    """A pull marks the download of a public repo's file as such: a node without a token (a fleet without
    one) serves its logged chunks to peers; before, it served no download in progress to anyone, and each
    node of such a fleet fetched every chunk from the Hub. A token node still wants its token. gc takes
    the mark away with the download."""
    guarded, open_node = nodes
    depot = open_node.depot
    claim = depot.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, wait=False)
    assert claim is not None
    claim.mark_public(True)
    claim.release(completed=False)
    status, _, body = get(open_node, f"{API}/blobs/{SHA}/chunks/1")
    assert status == 200 and body == chunk(1)
    status, _, body = get(open_node, f"{API}/blobs/{SHA}", {"Range": f"bytes=0-{SMALL_CHUNK - 1}"})
    assert status == 206 and body == chunk(0)
    status, _, body = get(open_node, f"{API}/blobs/{SHA}/chunks")
    assert status == 200 and json.loads(body)["complete"] is False
    assert get(guarded, f"{API}/blobs/{SHA}/chunks/1")[0] == 401
    again = depot.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, wait=False)  # a private repo's pull
    assert again is not None  # of the same content resumes it: the mark the public one left goes
    again.mark_public(False)
    again.release(completed=False)
    assert get(open_node, f"{API}/blobs/{SHA}/chunks/1")[0] == 404
    again = depot.store.partials.claim(SHA, len(DATA), SMALL_CHUNK, wait=False)
    assert again is not None
    again.mark_public(True)
    again.release(completed=False)
    depot.gc(partials=True)
    assert not depot.store.partials.is_public(SHA) and get(open_node, f"{API}/blobs/{SHA}/chunks")[0] == 404


def test_public_marks_are_links_of_one_file_and_free_no_inode(depot: Depot) -> None:
    """Each download's mark is a hard link of ``partials/public-mark``: a pull of 300 configs made and freed
    300 inodes, and on an ext4 without a journal every inode freed in the last seconds is skipped by the
    next allocations (the next pull's files cost 20 times as much). Made again when it went; a download's
    release takes its mark, not the shared file."""
    partials = depot.store.partials
    contents = [os.urandom(100 + i) for i in range(3)]
    claims = []
    for data in contents:
        claim = partials.claim(hashlib.sha256(data).hexdigest(), len(data), SMALL_CHUNK, wait=False)
        assert claim is not None
        claim.mark_public(True)
        claims.append(claim)
    shared = partials.root / "public-mark"
    marks = [partials.root / f"{hashlib.sha256(data).hexdigest()}.public" for data in contents]
    assert {m.stat().st_ino for m in marks} == {shared.stat().st_ino} and shared.stat().st_nlink == 4
    assert all(partials.is_public(hashlib.sha256(data).hexdigest()) for data in contents)
    claims[0].release(completed=True)  # (its content in the store now: the mark goes with the download)
    assert not marks[0].exists() and shared.stat().st_nlink == 3
    claims[1].mark_public(False)  # (a private repo's pull of the same content takes the mark away)
    assert not partials.is_public(hashlib.sha256(contents[1]).hexdigest()) and shared.exists()
    shared.unlink()
    claims[1].mark_public(True)  # (the shared file gone: made again)
    assert marks[1].stat().st_ino == shared.stat().st_ino
    for claim in claims[1:]:
        claim.release(completed=False)
    assert partials.keys_on_disk() == {hashlib.sha256(data).hexdigest() for data in contents[1:]}
    depot.gc(partials=True)  # (the downloads dropped, their marks, then the shared file no mark links)
    assert partials.keys_on_disk() == set() and not shared.exists() and not any(m.exists() for m in marks)


def test_a_partial_is_served_beside_the_pull_that_holds_it(depot: Depot) -> None:
    """The partial's lock held (as by a pulling process): the node reads its log and chunks without it."""
    data = os.urandom(3 * SMALL_CHUNK)
    sha256 = hashlib.sha256(data).hexdigest()
    partial = depot.store.partials.claim(sha256, len(data), SMALL_CHUNK, wait=False)
    assert partial is not None
    node = LiveNode(depot, token=TOKEN)
    try:
        partial.write_chunk(1, memoryview(data)[SMALL_CHUNK : 2 * SMALL_CHUNK],
                            blake3.blake3(data[SMALL_CHUNK : 2 * SMALL_CHUNK]).hexdigest())  # fmt: skip
        status, _, body = get(node, f"{API}/blobs/{sha256}/chunks", AUTH)
        assert status == 200 and base64.b64decode(json.loads(body)["chunks"]) == bytes([0b01000000])
        status, _, body = get(node, f"{API}/blobs/{sha256}", {**AUTH, "Range": f"bytes={SMALL_CHUNK}-"
                                                              f"{2 * SMALL_CHUNK - 1}"})  # fmt: skip
        assert status == 206 and body == data[SMALL_CHUNK : 2 * SMALL_CHUNK]
    finally:
        node.stop()
        partial.release(completed=False)


def test_a_download_of_one_chunk_is_served_once_it_landed_before_it_is_published(depot: Depot) -> None:
    """A file of one chunk keeps no log (a claimer in a swarm holds it until its whole repo publishes,
    and peers ask it once it settled the chunk): the node offers its chunk once the file is the content;
    before, it knows no such blob."""
    data = os.urandom(SMALL_CHUNK // 3)
    sha256 = hashlib.sha256(data).hexdigest()
    partial = depot.store.partials.claim(sha256, len(data), SMALL_CHUNK, wait=False)
    assert partial is not None
    node = LiveNode(depot, token=TOKEN)
    whole = {**AUTH, "Range": f"bytes=0-{len(data) - 1}"}
    try:
        for target in (f"{API}/blobs/{sha256}/chunks", f"{API}/blobs/{sha256}"):
            status, answer, _ = get(node, target, whole)
            assert (status, answer.get("X-Error-Code")) == (404, "NotFound"), target
        partial.write_chunk(0, memoryview(data), blake3.blake3(data).hexdigest())
        status, _, body = get(node, f"{API}/blobs/{sha256}/chunks", AUTH)
        assert status == 200 and base64.b64decode(json.loads(body)["chunks"]) == bytes([0b10000000])
        status, _, body = get(node, f"{API}/blobs/{sha256}", whole)
        assert status == 206 and body == data
        status, _, body = get(node, f"{API}/blobs/{sha256}", {**AUTH, "Range": "bytes=5-9"})
        assert status == 206 and body == data[5:10]
    finally:
        node.stop()
        partial.release(completed=False)


def test_the_hub_routes_never_serve_a_partial(depot: Depot, tmp_path: Path) -> None:
    """A repo at v1 and the download of its v2 weights in progress: resolve and raw answer v1's published
    bytes, and a path only the new content would have is EntryNotFound, never partial bytes."""
    v1 = os.urandom(2 * SMALL_CHUNK)
    depot.import_dir(write_model_dir(tmp_path / "v1", {"weights.bin": v1, "config.json": b"{}"}), "acme/m")
    write_partial(depot, DATA, LOGGED)
    node = LiveNode(depot, token=TOKEN)
    try:
        for route in ("resolve", "raw"):
            status, answer, body = get(node, f"/acme/m/{route}/main/weights.bin", AUTH)
            if route == "resolve":  # (an LFS file by its branch: a redirect to its commit's URL, followed)
                assert status == 302, status
                status, _, body = get(
                    node, urljoin(f"/acme/m/{route}/main/weights.bin", answer["Location"]), AUTH
                )
            assert status == 200 and DATA[:32] not in body, route
            assert body == v1 or route == "raw"  # raw sends an LFS file's pointer
            for headers in ({}, {"Range": "bytes=0-99"}):
                status, answer, body = get(node, f"/acme/m/{route}/main/weights-v2.bin", {**AUTH, **headers})
                assert (status, answer.get("X-Error-Code")) == (404, "EntryNotFound"), (route, headers)
                assert DATA[:32] not in body
        status, _, _ = get(node, "/acme/other/resolve/main/weights.bin", AUTH)
        assert status == 404
    finally:
        node.stop()


@pytest.mark.parametrize("size", [3 * SMALL_CHUNK + 7, SMALL_CHUNK // 3], ids=["chunked", "one-chunk"])
def test_a_download_is_served_at_every_step_of_its_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Placing links the blob to the download's file, which its pull lets go only once the index has the
    blob: a peer asking between the placing and the commit is served from the download, after the commit
    from the blob. Never a 404, which a swarm peer takes for a claimer that lost the file (it then fetched
    the claimer's chunks from the Hub a second time)."""
    data = os.urandom(size)
    sha256 = hashlib.sha256(data).hexdigest()
    files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", "m.safetensors": data}
    answers: list[tuple[str, int, bool]] = []
    whole = {**AUTH, "Range": f"bytes=0-{size - 1}"}
    with Depot(tmp_path / "hub") as hub_store:
        hub_store.import_dir(write_model_dir(tmp_path / "src", files), "acme/m")
        hub = LiveNode(hub_store)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        local = Depot(tmp_path / "local", chunk_size=SMALL_CHUNK)
        node = LiveNode(local, token=TOKEN)
        commit = publish_module._commit

        def ask(when: str) -> None:
            status, _, body = get(node, f"{API}/blobs/{sha256}", whole)
            answers.append((when, status, body == data))

        def observed_commit(*args: Any) -> Any:
            ask("placed")
            recorded = commit(*args)
            ask("committed")
            return recorded

        monkeypatch.setattr(publish_module, "_commit", observed_commit)
        try:
            local.pull("acme/m")
            ask("released")
            assert local.store.partials.open_chunks(sha256) is None, "the download's files went with its pull"
        finally:
            node.stop()
            hub.stop()
            local.close()
    assert answers == [("placed", 206, True), ("committed", 206, True), ("released", 206, True)]


def test_a_download_that_ended_after_placing_its_blob_is_never_written_again(depot: Depot) -> None:
    """A pull killed between placing a blob and letting its download go leaves a partial file that is also
    the blob (two names of one file): a new claim starts a file of its own instead of writing into the
    blob, and gc removes the leftover at once (it is no resume: the blob is whole)."""
    data = os.urandom(3 * SMALL_CHUNK)
    sha256 = write_partial(depot, data, [0, 1, 2])
    partial = depot.store.partials.claim(sha256, len(data), SMALL_CHUNK, wait=False)
    assert partial is not None and len(partial.done) == 3
    finished = partial.finish()
    finished.sync(durable=False)
    with depot.store.lock.shared():
        depot.store.blobs.place(finished, sha256)
    os.close(partial._lock_fd)  # the process dies here: its lock goes, its files stay
    partial._lock_fd = -1
    blob = depot.store.blobs.path(sha256)
    assert blob.read_bytes() == data and os.stat(blob).st_nlink == 2

    again = depot.store.partials.claim(sha256, len(data), SMALL_CHUNK, wait=False)
    assert again is not None
    try:
        assert again.done == {}, "a new file: nothing to resume"
        zeros = memoryview(bytes(SMALL_CHUNK))
        again.write_chunk(0, zeros, blake3.blake3(zeros).hexdigest())
    finally:
        again.release(completed=False)
    assert blob.read_bytes() == data and os.stat(blob).st_nlink == 1, "the blob was written through"

    write_partial(depot, data, [0, 1, 2])
    partial = depot.store.partials.claim(sha256, len(data), SMALL_CHUNK, wait=False)
    assert partial is not None
    with depot.store.lock.shared():
        depot.store.blobs.place(partial.finish(), sha256)
    os.close(partial._lock_fd)
    partial._lock_fd = -1
    removed, kept, _, freed = depot.store.partials.collect(remove_all=False)
    assert (removed, kept) == (1, 0), "young, but a blob's: removed"
    assert freed < SMALL_CHUNK, "its data is the blob's: only its log's space comes back"
    assert not depot.store.partials.holds(sha256)


LEFTOVER_PROBE = """
import hashlib, os, sys
import blake3
from modeldepot import Depot

home, stage, chunk = sys.argv[1], sys.argv[2], 64 * 1024
data = os.urandom(3 * chunk)
sha256 = hashlib.sha256(data).hexdigest()
with Depot(home, chunk_size=chunk) as depot:
    partial = depot.store.partials.claim(sha256, len(data), chunk, wait=False)
    for index in range(3):
        piece = memoryview(data)[index * chunk : (index + 1) * chunk]
        partial.write_chunk(index, piece, blake3.blake3(piece).hexdigest())
    finished = partial.finish()
    finished.sync(durable=False)  # read-only from here on
    if stage == "placed":
        with depot.store.lock.shared():
            depot.store.blobs.place(finished, sha256)
    os.close(partial._lock_fd)  # the pull is killed here
    again = depot.store.partials.claim(sha256, len(data), chunk, wait=False)
    print(len(again.done), end=" ")
    again.release(completed=False)
    if stage == "placed":
        print(depot.store.blobs.path(sha256).read_bytes() == data, end="")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to run as nobody")
@pytest.mark.parametrize(("stage", "expected"), [("flushed", "3 "), ("placed", "0 True")])
def test_a_killed_pulls_leftover_is_claimed_again_by_a_user_who_is_not_root(
    stage: str, expected: str
) -> None:
    """A finished download is read-only once flushed for placing: a pull killed then leaves a file its
    owner cannot open for writing. Claimed again (as the unprivileged user a store usually belongs to),
    one that was not placed is resumed whole, and one that was is left to its blob and started anew."""
    root = Path(tempfile.mkdtemp(prefix="modeldepot-nobody-"))
    try:
        root.chmod(0o777)
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", LEFTOVER_PROBE,
             str(root / "store"), stage],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(root)},
        )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


def test_a_download_that_finished_between_the_nodes_two_looks_is_served_from_the_store(
    depot: Depot, tmp_path: Path
) -> None:
    """The node looks at the store, then at the downloads: a download whose pull committed its blob and
    let it go between the two is found by a second look at the store, not answered 404."""
    data = os.urandom(3 * SMALL_CHUNK)
    sha256 = hashlib.sha256(data).hexdigest()
    partials = depot.store.partials
    open_chunks = partials.open_chunks

    def finished_meanwhile(key: str) -> Any:
        if key == sha256 and not depot.store.partials.holds(key):
            depot.import_dir(write_model_dir(tmp_path / "src", {"m.safetensors": data}), "acme/m")
            return None  # (the download's files are gone, its blob is in the store)
        return open_chunks(key)

    partials.open_chunks = finished_meanwhile  # type: ignore[method-assign]
    node = LiveNode(depot, token=TOKEN)
    try:
        status, _, body = get(node, f"{API}/blobs/{sha256}/chunks/1", AUTH)
    finally:
        node.stop()
    assert status == 200 and body == chunk_of(data, 1)


def chunk_of(data: bytes, index: int) -> bytes:
    return data[index * SMALL_CHUNK : (index + 1) * SMALL_CHUNK]


def test_a_store_whose_file_system_refuses_hard_links_still_pulls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Placing a download links its file; where the file system refuses hard links (EPERM: some network
    and FAT file systems), it renames it, as a write session's, and the pull goes on."""
    data = os.urandom(3 * SMALL_CHUNK + 5)
    files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", "m.safetensors": data}
    refused: list[str] = []

    def no_links(source: Any, target: Any, **kwargs: Any) -> None:
        refused.append(str(target))
        raise PermissionError(errno.EPERM, "Operation not permitted", str(target))

    with Depot(tmp_path / "hub") as hub_store:
        hub_store.import_dir(write_model_dir(tmp_path / "src", files), "acme/m")
        hub = LiveNode(hub_store)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(os, "link", no_links)
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
                local.pull("acme/m")
                assert local.file_path("acme/m", "m.safetensors").read_bytes() == data
                assert sorted(p.name for p in local.store.layout.partials.iterdir()
                              if not p.name.startswith("pull-") and p.name != ENDED_MARK) == []  # fmt: skip
        finally:
            hub.stop()
    assert refused, "placing never tried a link"
