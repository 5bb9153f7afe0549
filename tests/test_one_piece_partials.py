"""Downloads of one chunk (a config, a tokenizer) keep no log: their ``.one`` file is their own lock. They
are waited on like any download, resumed when a leftover is the whole content, kept by gc while held or
young; a finished one's release never deletes the file another claim made under the same name since; an
older version's ``.log`` and ``.part`` for the same content are never shared; a peer reads the chunk once
the whole file is the content."""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path

import blake3

from conftest import SMALL_CHUNK
from modeldepot import Depot
from modeldepot.gitobjects import git_blob_oid
from modeldepot.store.partials import PartialFiles

DATA = os.urandom(SMALL_CHUNK // 2)
SHA = hashlib.sha256(DATA).hexdigest()


def claim(partials: PartialFiles, key: str = SHA, data: bytes = DATA, wait: bool = False):  # type: ignore[no-untyped-def]
    return partials.claim(key, len(data), SMALL_CHUNK, wait=wait)


def land(partial, data: bytes = DATA) -> None:  # type: ignore[no-untyped-def]
    partial.write_chunk(0, memoryview(data), blake3.blake3(data).hexdigest())


def test_a_one_chunk_download_makes_no_log_and_its_file_is_the_lock(depot: Depot) -> None:
    partials = depot.store.partials
    first = claim(partials)
    assert first is not None
    try:
        root = depot.store.layout.partials
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith("pull-")) == [f"{SHA}.one"]
        assert claim(partials) is None, "a second claim while the first holds it"
        assert partials.holds(SHA)
    finally:
        first.release(completed=False)
    second = claim(partials)
    assert second is not None, "the lock went with the first claim"
    second.release(completed=True)
    assert not partials.holds(SHA)
    assert list(depot.store.layout.partials.glob(f"{SHA}*")) == []


def test_a_leftover_that_is_the_whole_content_is_resumed_and_a_wrong_one_starts_over(depot: Depot) -> None:
    partials = depot.store.partials
    partial = claim(partials)
    assert partial is not None
    land(partial)
    partial.release(completed=False)  # a pull that failed on another file: this one is verified, kept

    resumed = claim(partials)
    assert resumed is not None
    assert resumed.done == {0: blake3.blake3(DATA).hexdigest()} and resumed.resumed_bytes == len(DATA)
    resumed.release(completed=False)

    part = depot.store.layout.partials / f"{SHA}.one"
    part.write_bytes(DATA[:-1] + bytes([DATA[-1] ^ 1]))  # the right size, one byte wrong
    again = claim(partials)
    assert again is not None
    assert again.done == {} and again.resumed_bytes == 0
    assert os.pread(again.data_fd, len(DATA), 0) == bytes(len(DATA)), "started over: emptied, reserved"
    again.release(completed=True)


def test_a_leftover_that_came_whole_is_counted_kept_and_a_part_of_one_is_not(depot: Depot) -> None:
    """A one-chunk download whose file came whole before its pull stopped counted 0 kept: a Ctrl-C said "30 B
    of 1.5 MiB kept" of a variant whose file had come, `status` said the same, and the resume "3.1 MiB
    resumed" (an explorer's trial). Its size counts, as the resume takes it; a part of one does not (it
    starts over); `du` says the same bytes."""
    partials = depot.store.partials
    partial = claim(partials)
    assert partial is not None
    land(partial)
    partial.release(completed=False)
    assert partials.kept_bytes(SHA) == len(DATA)
    assert depot.du().partial_kept_bytes == len(DATA)
    other = os.urandom(SMALL_CHUNK // 4)
    key = hashlib.sha256(other).hexdigest()
    cut = claim(partials, key, other)
    assert cut is not None
    os.pwrite(cut.data_fd, other[:1000], 0)  # a transfer stopped 1,000 bytes in
    cut.release(completed=False)
    assert partials.kept_bytes(key) == 0
    assert depot.du().partial_kept_bytes == len(DATA)


def test_a_plain_git_file_leftover_is_checked_against_its_git_blob_id(depot: Depot) -> None:
    data = b'{"model_type": "bert"}'
    key = f"git-{git_blob_oid(data)}"
    partial = claim(depot.store.partials, key, data)
    assert partial is not None
    land(partial, data)
    partial.release(completed=False)
    resumed = claim(depot.store.partials, key, data)
    assert resumed is not None and resumed.resumed_bytes == len(data)
    resumed.release(completed=True)


def test_a_release_after_placing_leaves_a_newer_claims_file_alone(depot: Depot, tmp_path: Path) -> None:
    """The holder's finished .one is renamed away (as a version that placed by renaming did), then the
    holder releases; a claim made between the two has a new file under the same name, which the release
    must not delete."""
    partials = depot.store.partials
    holder = claim(partials)
    assert holder is not None
    land(holder)
    blob = holder.finish()
    blob.sync(durable=False)  # read-only from here on, as when placed
    placed = tmp_path / "placed-blob"
    os.rename(blob.path, placed)
    newcomer = claim(partials)  # after the rename: a new file under the same name, not locked by anyone
    assert newcomer is not None
    try:
        holder.release(completed=True)
        assert (depot.store.layout.partials / f"{SHA}.one").exists(), "the holder deleted another's file"
        assert placed.read_bytes() == DATA
    finally:
        newcomer.release(completed=True)


def test_gc_keeps_a_held_or_young_one_chunk_download_and_removes_an_old_one(depot: Depot) -> None:
    partials = depot.store.partials
    part = depot.store.layout.partials / f"{SHA}.one"
    held = claim(partials)
    assert held is not None
    try:
        # held: left to its download even by gc --partials, and counted as running, not as kept for a resume
        # (gc said "1 interrupted download kept (`gc --partials` drops it)" of a download running now)
        assert partials.collect(remove_all=True)[:3] == (0, 0, 1)
        assert part.exists()
    finally:
        held.release(completed=False)
    # Stopped before its chunk landed, it keeps nothing a resume takes: it goes (the room of a node's files,
    # killed as its pulls began, stayed taken for a week: an explorer's trial)
    assert partials.collect(remove_all=False)[:2] == (1, 0) and not part.exists()
    landed = claim(partials)
    assert landed is not None
    land(landed)
    landed.release(completed=False)
    assert partials.collect(remove_all=False)[:2] == (0, 1), "young and whole: kept for a resume"
    old = time.time() - 8 * 24 * 3600
    os.utime(part, (old, old))
    assert partials.collect(remove_all=False)[:2] == (1, 0)
    assert not part.exists()


def test_gc_keeps_a_download_by_git_id_that_landed_chunks(depot: Depot) -> None:
    """A file without a SHA-256 (a git id's key) downloaded in several chunks: its log was read as naming
    nothing, and gc took the chunks a resume would have reused (a review)."""
    partials = depot.store.partials
    data = os.urandom(3 * SMALL_CHUNK)
    key = f"git-{git_blob_oid(data)}"
    partial = partials.claim(key, len(data), SMALL_CHUNK, wait=False)
    assert partial is not None
    first = data[:SMALL_CHUNK]
    partial.write_chunk(0, memoryview(first), blake3.blake3(first).hexdigest())
    partial.release(completed=False)
    assert partials.collect(remove_all=False)[:2] == (0, 1), "a chunk landed: kept for a resume"
    resumed = partials.claim(key, len(data), SMALL_CHUNK, wait=False)
    assert resumed is not None and set(resumed.done) == {0}
    resumed.release(completed=True)


def test_gc_partials_removes_an_unheld_leftover_and_a_new_claim_starts_a_fresh_file(depot: Depot) -> None:
    partials = depot.store.partials
    leftover = claim(partials)
    assert leftover is not None
    land(leftover)
    leftover.release(completed=False)
    part = depot.store.layout.partials / f"{SHA}.one"
    assert partials.collect(remove_all=True)[:2] == (1, 0)
    assert not part.exists()
    fresh = claim(partials)
    assert fresh is not None and fresh.done == {}
    fresh.release(completed=True)


def test_an_older_versions_log_and_part_for_the_content_are_never_shared(depot: Depot) -> None:
    """A version that logged every content holds a .log and a .part for it (a serve started before an
    upgrade): a claim now uses its own .one file, never theirs, so neither empties the other's bytes;
    finishing leaves their files alone, and gc removes them once nobody holds them."""
    partials = depot.store.partials
    root = depot.store.layout.partials
    log, part = root / f"{SHA}.log", root / f"{SHA}.part"
    log.write_text(f"modeldepot-partial 1 size={len(DATA)} chunk={SMALL_CHUNK}\n")
    part.write_bytes(bytes(len(DATA)))  # preallocated, nothing landed yet
    held = os.open(log, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # that version's process, transferring it
    try:
        partial = claim(partials)
        assert partial is not None, "its own file: not blocked by the other version's lock"
        land(partial)
        assert (root / f"{SHA}.one").read_bytes() == DATA
        assert part.read_bytes() == bytes(len(DATA)) and log.read_text().count("\n") == 1, "theirs untouched"
        partial.release(completed=True)
        assert log.exists() and part.exists() and not (root / f"{SHA}.one").exists()
        assert partials.collect(remove_all=True)[:3] == (0, 0, 1), "held by that version: left to it"
    finally:
        os.close(held)
    assert partials.collect(remove_all=True)[:2] == (1, 0)
    assert list(root.glob(f"{SHA}*")) == []


def test_a_peer_reads_the_chunk_once_the_whole_file_is_the_content(depot: Depot) -> None:
    """Before its publish, a landed download of one chunk is offered like a logged chunk (read_log, the
    chunk map's source; open_chunks, the Range reads'); not before its bytes are the content, nor while
    its file is being set up."""
    partials = depot.store.partials
    assert partials.read_log(SHA) is None and partials.open_chunks(SHA) is None, "no download"
    partial = claim(partials)
    assert partial is not None
    try:
        assert partials.read_log(SHA) is None, "preallocated zeros are not the content"
        assert partials.open_chunks(SHA) is None
        land(partial, DATA[: len(DATA) // 2] + bytes(len(DATA) - len(DATA) // 2))  # half of it
        assert partials.read_log(SHA) is None
        land(partial)
        digest = blake3.blake3(DATA).hexdigest()
        log = partials.read_log(SHA)
        assert log is not None and log.logged == {0: digest}
        assert (log.size, log.chunk_size) == (len(DATA), depot.store.chunk_size)
        reader = partials.open_chunks(SHA)
        assert reader is not None
        with reader:
            assert reader.logged(0) and reader.check(0) == digest
            assert bytes(reader.view(0)) == DATA
        os.truncate(depot.store.layout.partials / f"{SHA}.one", 0)  # as a claim starting over leaves it
        assert partials.read_log(SHA) is None, "never the size of a file being set up"
    finally:
        partial.release(completed=False)
