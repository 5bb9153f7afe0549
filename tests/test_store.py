"""The Depot API over a real store on disk: import, reads, paths, verify, remove, gc, du."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import pwd
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from conftest import (
    SMALL_CHUNK,
    LiveNode,
    flip_byte,
    sample_files,
    store_files_consistent,
    writable,
    write_model_dir,
)
from modeldepot import (
    ConfigError,
    CorruptBlobError,
    Depot,
    EntryNotFoundError,
    ImportResult,
    InvalidInputError,
    InvalidRangeError,
    InvalidRevisionError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SourceDirectoryError,
    StoreClosedError,
    StoreSchemaError,
)
from modeldepot.errors import NotFoundError, StoreError
from modeldepot.gitobjects import git_blob_oid
from modeldepot.store import FileEntry
from modeldepot.store.blobs import WriteSession
from modeldepot.store.maintenance import totals as store_totals
from modeldepot.store.snapshots import Snapshots

REPO = "acme/tiny-bert"


def test_import_then_read_every_file_every_way(depot: Depot, model_dir: Path) -> None:
    files = sample_files()
    result = depot.import_dir(model_dir, REPO)
    assert (result.files, result.bytes, result.new_blobs) == (
        len(files),
        sum(map(len, files.values())),
        len(files),
    )
    for path, data in files.items():
        assert depot.has_file(REPO, path)
        view = depot.get_file(REPO, path)
        assert view.readonly and bytes(view) == data
        view.release()
        with depot.map_file(REPO, path) as mapped:
            assert bytes(mapped) == data
        with depot.open_file(REPO, path) as stream:
            assert stream.read() == data
        assert depot.file_path(REPO, path).read_bytes() == data
        assert depot.file_path(REPO, path).as_posix().endswith(f"/{result.commit_id}/{path}")
        assert depot.file_info(REPO, path).sha256 == hashlib.sha256(data).hexdigest()
    assert not depot.has_file(REPO, "nope.bin")


def test_an_import_of_no_path_is_a_clear_error(depot: Depot) -> None:
    from modeldepot.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="the folder to import is a path, not NoneType"):
        depot.import_dir(None, "acme/x")  # type: ignore[arg-type]
    assert depot.list_repos() == []


def test_a_closed_depot_reads_and_writes_nothing_and_says_so(tmp_path: Path, model_dir: Path) -> None:
    """A closed depot went on reading, importing and pulling (each thread opened a connection no close would end,
    and an import's blobs had no flusher to make them durable): it refuses, saying why."""
    depot = Depot(tmp_path / "store", chunk_size=SMALL_CHUNK)
    depot.import_dir(model_dir, REPO)
    depot.close()
    for call in (
        lambda: depot.get_file(REPO, "config.json"),
        lambda: depot.list_repos(),
        lambda: depot.import_dir(model_dir, "acme/other"),
        lambda: depot.snapshot_path(REPO),
    ):
        with pytest.raises(StoreClosedError, match="was closed"):
            call()
    depot.close()  # (twice: nothing more to do)
    with Depot(tmp_path / "store") as again:
        assert [r.repo_id for r in again.list_repos()] == [REPO]


def test_a_closed_depot_leaves_no_thread_with_the_index_open(tmp_path: Path, model_dir: Path) -> None:
    """Each thread that read the store kept its connection (the index and its -wal and -shm: ten descriptors
    for a pool of four) as long as the Depot lived, closed or not. Close ends them all, a thread inside a
    transaction waited for; one that ended before gives its connection back the next time one is made."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    def index_files_open() -> int:
        index = str(depot.store.index.path)
        names = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # (the listing's own descriptor, gone)
                names.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sum(1 for name in names if name.startswith(index))

    depot = Depot(tmp_path / "store", chunk_size=SMALL_CHUNK)
    depot.import_dir(model_dir, REPO)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: depot.list_repos(), range(16)))
        # A thread that ended: its connection goes when the next one is made
        alone = threading.Thread(target=depot.list_repos)
        alone.start()
        alone.join()
        index = depot.store.index
        _, left = index._opened[alone]  # (SQLite keeps descriptors for reuse: the connection is looked at)
        another = threading.Thread(target=depot.list_repos)  # (a connection of its own, made now)
        another.start()
        another.join()
        assert alone not in index._opened
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            left.execute("SELECT 1")
        # A transaction under way in another thread is waited for, not cut
        inside, go_on = threading.Event(), threading.Event()

        def write_slowly() -> None:
            with depot.store.index.write("a slow write") as con:
                inside.set()
                go_on.wait(10)
                con.execute("INSERT OR REPLACE INTO settings (key, value) VALUES ('slow', 'written')")

        writing = pool.submit(write_slowly)
        assert inside.wait(10)
        closing = threading.Thread(target=depot.store.index.close)  # (the index's own: nothing else waits)
        closing.start()
        closing.join(0.5)
        assert closing.is_alive()  # (it waits for the transaction)
        go_on.set()
        closing.join(10)
        writing.result(10)
        assert not closing.is_alive()
        assert index_files_open() == 0
        with pytest.raises(StoreClosedError):
            pool.submit(depot.list_repos).result(10)
    depot.close()
    with Depot(tmp_path / "store") as again:
        assert again.store.index.setting("slow") == "written"


def test_a_close_and_a_fork_from_inside_a_transaction_do_not_wait_on_each_other(tmp_path: Path) -> None:
    """A close that waited for the index's users while holding the process's gate, and a thread that forked
    inside its transaction (the fork waits for every thread inside that gate but its own), waited on each
    other for ever (a review)."""
    import threading

    depot = Depot(tmp_path / "store", chunk_size=SMALL_CHUNK)
    depot.list_repos()
    inside, forked = threading.Event(), []

    def fork_inside_a_write() -> None:
        with depot.store.index.write("a write that forks"):
            inside.set()
            time.sleep(0.3)  # (the close is under way)
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            forked.append(os.waitpid(pid, 0)[1])

    forking = threading.Thread(target=fork_inside_a_write)
    forking.start()
    assert inside.wait(10)
    closing = threading.Thread(target=depot.store.index.close)
    closing.start()
    forking.join(10)
    closing.join(10)
    assert not forking.is_alive() and not closing.is_alive(), "the close and the fork waited on each other"
    assert forked == [0]
    depot.close()


def test_map_file_releases_the_mapping_and_refuses_while_a_slice_is_held(
    depot: Depot, model_dir: Path
) -> None:
    depot.import_dir(model_dir, REPO)
    with depot.map_file(REPO, "model.safetensors") as view:
        first = view[0]
    with pytest.raises(ValueError, match="released"):
        view[0]
    assert first == sample_files()["model.safetensors"][0]
    mapped = depot.map_file(REPO, "model.safetensors")
    held = mapped.view[10:20]
    with pytest.raises(BufferError, match="still in use"):
        mapped.close()
    held.release()
    mapped.close()


def test_map_file_read_through_numpy_ends_its_block_without_an_error(depot: Depot, model_dir: Path) -> None:
    """``np.frombuffer(view)`` in the block, the usual way to read the bytes: the array, a local, still lived
    as the block ended, and its exit raised BufferError, in place of the block's own exception too (an
    explorer's trial). The mapping now stays while the array lives, with a ResourceWarning."""
    import gc
    import weakref

    import numpy as np

    depot.import_dir(model_dir, REPO)
    data = sample_files()["model.safetensors"]
    with (
        pytest.warns(ResourceWarning, match="stays mapped"),
        depot.map_file(REPO, "model.safetensors") as view,
    ):
        array = np.frombuffer(view, dtype=np.uint8)
    assert array[:16].tobytes() == data[:16]  # (still mapped: read after the block)
    arrays = []

    def read_then_fail() -> None:
        with depot.map_file(REPO, "model.safetensors") as view:
            arrays.append(np.frombuffer(view, dtype=np.uint8))
            raise KeyError("the block's own")

    with pytest.raises(
        KeyError, match="the block's own"
    ):  # (and no warning: -W error raised it in its place)
        read_then_fail()
    assert arrays[0][-1] == data[-1]
    mapped = depot.map_file(REPO, "model.safetensors")
    gone = weakref.finalize(mapped.view.obj, lambda: None)  # (the mmap the view exports)
    with pytest.warns(ResourceWarning), mapped as view:
        last = np.frombuffer(view, dtype=np.uint8)
    assert gone.alive
    del last, view
    gc.collect()
    assert not gone.alive  # unmapped with the last array


def test_open_file_is_seekable_and_streams(depot: Depot, model_dir: Path) -> None:
    depot.import_dir(model_dir, REPO)
    data = sample_files()["model.safetensors"]
    with depot.open_file(REPO, "model.safetensors") as stream:
        assert stream.seekable()
        assert stream.name == str(depot.file_path(REPO, "model.safetensors"))  # (was the descriptor's number)
        stream.seek(1000)
        assert stream.read(10) == data[1000:1010]
        assert stream.tell() == 1010
        stream.seek(-5, os.SEEK_END)
        assert stream.read() == data[-5:]
        buffer = bytearray(100)
        stream.seek(0)
        assert stream.readinto(buffer) == 100 and bytes(buffer) == data[:100]


def test_chunks_are_views_of_the_file_and_checked(depot: Depot, model_dir: Path) -> None:
    depot.import_dir(model_dir, REPO)
    data = sample_files()["model.safetensors"]
    count = -(-len(data) // SMALL_CHUNK)
    parts = [bytes(depot.get_chunk(REPO, "model.safetensors", i)) for i in range(count)]
    assert b"".join(parts) == data and all(len(p) == SMALL_CHUNK for p in parts[:-1])
    for bad in (-1, count, True, "0", 1.0):
        with pytest.raises(InvalidRangeError):
            depot.get_chunk(REPO, "model.safetensors", bad)  # type: ignore[arg-type]
    assert bytes(depot.get_chunk(REPO, "empty.txt", 0)) == b""


def test_chunk_digests_of_many_blobs_match_one_at_a_time(depot: Depot, model_dir: Path) -> None:
    """The batched lookup (a node's manifest) returns each blob's digests in chunk order, across its
    batches of 500, and none for a blob the store lacks."""
    depot.import_dir(model_dir, REPO)
    held = sorted({entry.sha256 for entry in depot.list_files(REPO)})
    absent = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(700)]
    found = depot.store.chunk_digests_of([*absent[:350], *held, *held, *absent[350:]])
    assert set(found) == set(held) | set(absent)
    for sha256 in held:
        assert found[sha256] == depot.store.chunk_digests(sha256)
    assert any(len(found[sha256]) > 1 for sha256 in held)  # the order of several chunks is checked
    assert all(found[sha256] == [] for sha256 in absent)


def test_a_corrupt_chunk_is_refused_and_quarantined(depot: Depot, model_dir: Path) -> None:
    depot.import_dir(model_dir, REPO)
    entry = depot.file_info(REPO, "model.safetensors")
    blob = depot.store.blobs.path(entry.sha256)
    flip_byte(blob, SMALL_CHUNK + 5)
    assert (
        bytes(depot.get_chunk(REPO, "model.safetensors", 0))
        == sample_files()["model.safetensors"][:SMALL_CHUNK]
    )
    with pytest.raises(CorruptBlobError, match="chunk 1"):
        depot.get_chunk(REPO, "model.safetensors", 1)
    assert not blob.exists() and not depot.has_file(REPO, "model.safetensors")
    with pytest.raises(CorruptBlobError):
        depot.get_file(REPO, "model.safetensors")
    # A file not held is not counted as held (its size made up savings of deduplication that were none)
    held = sum(map(len, sample_files().values())) - entry.size
    usage = depot.du()
    assert usage.logical_bytes == held == usage.repos[0].logical_bytes
    assert usage.blob_bytes == held and store_totals(depot.store).logical_bytes == held
    report = depot.verify()
    assert not report.ok and [p.sha256 for p in report.problems] == [entry.sha256]
    restored = depot.import_dir(model_dir, REPO)  # the same bytes again restore the blob
    assert (restored.new_blobs, restored.new_bytes) == (1, entry.size)  # (it said they were in the store)
    assert depot.verify().ok
    assert bytes(depot.get_file(REPO, "model.safetensors")) == sample_files()["model.safetensors"]


def test_verify_records_when_each_blob_passed_in_batches(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify recorded each blob that passed in a transaction of its own: 69 s of the index's flushes for
    61,500 small blobs (an explorer's trial). In batches, the last one too; a corrupt blob is not recorded."""
    from modeldepot.store import maintenance

    monkeypatch.setattr(maintenance, "RECORD_EVERY", 2)
    files = {f"f{i}.txt": f"file {i}".encode() for i in range(5)}
    depot.import_dir(write_model_dir(tmp_path / "five", files), REPO)
    bad = depot.file_info(REPO, "f4.txt").sha256
    good = {depot.file_info(REPO, p).sha256 for p in files} - {bad}
    flip_byte(depot.store.blobs.path(bad), 0)
    before = time.time()
    flushes: list[int] = []
    record = depot.store.record_all_verified
    monkeypatch.setattr(
        depot.store, "record_all_verified", lambda found: flushes.append(len(found)) or record(found)
    )
    report = depot.verify(REPO)
    assert [p.sha256 for p in report.problems] == [bad]
    rows = {
        r["sha256"]: r["verified_at"] for r in depot.store.index.read("SELECT sha256, verified_at FROM blobs")
    }
    assert all((rows[sha] or 0) >= before for sha in good), rows
    assert sorted(flushes) == [2, 2], flushes  # (four good blobs, two batches; not one transaction each)


def test_verify_finds_flipped_truncated_and_missing_blobs(depot: Depot, model_dir: Path) -> None:
    depot.import_dir(model_dir, REPO)
    flipped, truncated, missing = (
        depot.file_info(REPO, p) for p in ("model.safetensors", "config.json", "tokenizer.json")
    )
    flip_byte(depot.store.blobs.path(flipped.sha256), flipped.size - 1)
    with writable(depot.store.blobs.path(truncated.sha256)) as path:
        os.truncate(path, 3)
    depot.store.blobs.path(missing.sha256).unlink()
    report = depot.verify(REPO)
    assert {(p.sha256, p.problem) for p in report.problems} == {
        (flipped.sha256, "chunk"), (truncated.sha256, "size"), (missing.sha256, "missing")}  # fmt: skip
    assert all(f"{REPO}@" in p.files[0] for p in report.problems)
    quarantined = {p.quarantined_to for p in report.problems} - {None}
    assert len(quarantined) == 2 and all(
        Path(q).parent == depot.home / "quarantine" for q in quarantined if q
    )
    again = depot.verify()  # still reported until the files come back
    assert {p.problem for p in again.problems} == {"quarantined"}
    assert store_files_consistent(depot) == []


def damage_the_index(home: Path, table: str) -> None:
    """Flip a bit of the cell count of ``table``'s (or an index's) root page: SQLite reads the page without
    a word, and sees rows that are not there or misses some that are."""
    con = sqlite3.connect(home / "index.db")
    root, page_size = (con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0],
                       con.execute("PRAGMA page_size").fetchone()[0])  # fmt: skip
    con.close()
    with (home / "index.db").open("r+b") as index:  # (the low byte of the page's cell count)
        index.seek((root - 1) * page_size + 4)
        count = index.read(1)[0]
        index.seek(-1, os.SEEK_CUR)
        index.write(bytes([count ^ 0x04]))


def test_gc_deletes_nothing_on_a_damaged_index_and_says_how_to_get_out(home: Path, model_dir: Path) -> None:
    """One flipped bit of the index (the cell count of the blobs table's page: SQLite reads the page without
    a word) and gc took 4 of 7 good blobs for orphans, and said all went well (a trial)."""
    from click.testing import CliRunner

    from modeldepot.cli import cli
    from modeldepot.errors import IndexDamagedError

    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(model_dir, REPO)
    blobs = sorted(p for p in (home / "blobs").rglob("*") if p.is_file())
    damage_the_index(home, "blobs")
    with Depot(home) as depot, pytest.raises(IndexDamagedError, match="deleted nothing") as refused:
        depot.gc()
    assert "modeldepot recover-index" in str(refused.value) and "modeldepot import" in str(refused.value)
    done = CliRunner().invoke(cli, ["gc", "--home", str(home)])
    assert done.exit_code != 0 and "failed SQLite's check" in done.output, done.output
    assert sorted(p for p in (home / "blobs").rglob("*") if p.is_file()) == blobs
    checked = CliRunner().invoke(cli, ["verify", "--home", str(home)])
    assert checked.exit_code != 0 and "recover-index" in checked.output, checked.output
    assert "0 problems" not in checked.output and "the index is damaged" in checked.output, checked.output


def test_rm_deletes_nothing_on_a_damaged_index(home: Path, model_dir: Path) -> None:
    """rm frees the blobs no other file row names, read from the index: a damaged page is read wrong without a
    word (gc so deleted good blobs) or fails halfway (here: a bare "database disk image is malformed" from
    SQLite). rm runs SQLite's quick check first, as gc does, deletes nothing and says how to get out."""
    from modeldepot.errors import IndexDamagedError

    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(model_dir, REPO)
        depot.import_dir(model_dir, "acme/same-files")
    blobs = sorted(p for p in (home / "blobs").rglob("*") if p.is_file())
    damage_the_index(home, "files_by_blob")
    with Depot(home) as depot:
        with pytest.raises(IndexDamagedError, match="deleted nothing") as refused:
            depot.remove(REPO)
        assert "modeldepot recover-index" in str(refused.value)
        with pytest.raises(IndexDamagedError, match="deleted nothing"):
            depot.remove(REPO, quant="q4")
    assert sorted(p for p in (home / "blobs").rglob("*") if p.is_file()) == blobs


def test_a_key_flipped_in_the_index_by_blob_makes_gc_delete_no_file_a_revision_names(
    home: Path, model_dir: Path
) -> None:
    """One bit of a blob's key in the index ``files_by_blob``, which SQLite's quick check does not see: gc
    took the weights for garbage and deleted the store's only copy (an explorer's trial). Whether a file names
    a blob is read from the table itself."""
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(model_dir, REPO)
        weights = depot.file_info(REPO, "model.safetensors").sha256
    con = sqlite3.connect(home / "index.db")
    root, page_size = (con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'files_by_blob'").fetchone()[0],
                       con.execute("PRAGMA page_size").fetchone()[0])  # fmt: skip
    con.close()
    with (home / "index.db").open("r+b") as index:
        index.seek((root - 1) * page_size)
        page = index.read(page_size)
        index.seek((root - 1) * page_size + page.index(weights.encode()) + 5)
        index.write(bytes([page[page.index(weights.encode()) + 5] ^ 0x01]))  # (one bit of one hex digit)
    with Depot(home) as depot:
        assert depot.store.index.read("PRAGMA quick_check")[0][0] == "ok"  # (blind to it)
        depot.gc()
        assert bytes(depot.get_file(REPO, "model.safetensors")) == sample_files()["model.safetensors"]
        # verify's whole check sees it, and rebuilds the index's indexes from its tables (REINDEX)
        assert depot.store.index.read("PRAGMA integrity_check")[0][0] != "ok"
        assert depot.verify().ok
        assert depot.store.index.read("PRAGMA integrity_check")[0][0] == "ok"
        assert depot.store.index.read("SELECT path FROM files WHERE sha256 = ?", (weights,))


def test_wrong_chunk_digests_in_the_index_are_rewritten_not_taken_for_bad_bytes(
    depot: Depot, model_dir: Path
) -> None:
    """A chunk digest of the index damaged (its bytes intact: they match their SHA-256, the blob's name): verify
    quarantined the blob and gc deleted the only copy (an explorer's trial). The digests are rewritten."""
    depot.import_dir(model_dir, REPO)
    entry = depot.file_info(REPO, "model.safetensors")
    with depot.store.index.write("test") as con:
        con.execute("UPDATE chunks SET blake3 = ? WHERE sha256 = ? AND idx = 0", ("0" * 64, entry.sha256))
    assert depot.verify().ok
    assert depot.store.chunk_digests(entry.sha256)[0] != "0" * 64
    depot.gc()
    assert (
        bytes(depot.get_chunk(REPO, "model.safetensors", 0))
        == sample_files()["model.safetensors"][: entry.chunk_size]
    )


def test_a_value_of_the_index_that_is_no_utf8_says_the_index_is_damaged_and_how_to_get_out(
    home: Path, model_dir: Path
) -> None:
    """One flipped bit of a text value (no check of SQLite's sees it): every read of the repo, and verify, ended
    in a bare "index error ... Could not decode to UTF-8", and the node answered 500 (an explorer's trial)."""
    from modeldepot.errors import IndexDamagedError

    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(model_dir, REPO)
        with depot.store.index.write("test") as con:  # (SQLite keeps the bytes as they are: no UTF-8)
            con.execute("UPDATE files SET git_oid = CAST(X'6461ff35' AS TEXT) WHERE path = 'config.json'")
    with Depot(home) as depot:
        with pytest.raises(
            IndexDamagedError, match=r"the index is damaged .*modeldepot recover-index.*modeldepot import"
        ):
            depot.verify()
        node = LiveNode(depot)
        try:
            answer = requests.get(f"{node.url}/api/models/{REPO}", timeout=30)
            assert answer.status_code == 503 and "damaged" in answer.json()["error"], answer.text
        finally:
            node.stop()


def test_files_another_user_wrote_into_the_store_are_named_and_gc_goes_past_them(
    home: Path, model_dir: Path
) -> None:
    """A `sudo modeldepot pull` into one's own store left files of root's: `rm` failed halfway and gc at the
    same file every time, never reaching the rest, and neither said whose the files were (a trial). As root
    without its override of permissions, a folder of another user's is what root's is to a user."""
    from conftest import WITHOUT_OVERRIDE
    from fleetnodes import base_env

    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(model_dir, REPO)
        weights = depot.file_info(REPO, "model.safetensors").sha256
    foreign = home / "blobs" / weights[:2]
    for path in (foreign, *foreign.iterdir()):
        os.chown(path, 12345, 12345)
    env = base_env(PYTHONDONTWRITEBYTECODE="1")

    def modeldepot(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*WITHOUT_OVERRIDE, sys.executable, "-m", "modeldepot", *args, "--home", str(home)],
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip

    removed = modeldepot("rm", REPO, "--yes")
    assert removed.returncode != 0 and "belongs to uid 12345, not root" in removed.stderr, removed.stderr
    assert f"sudo chown -R root {home}" in removed.stderr, removed.stderr
    collected = modeldepot("gc")
    assert collected.returncode == 1 and "not deleted:" in collected.stderr, collected.stderr
    assert "belongs to uid 12345" in collected.stderr and "freed " in collected.stdout, collected.stdout
    left = [p for p in (home / "blobs").rglob("*") if p.is_file()]
    assert [p.name for p in left] == [weights], "gc went past the file it could not delete"


def test_truncated_blob_is_caught_on_open(depot: Depot, model_dir: Path) -> None:
    depot.import_dir(model_dir, REPO)
    entry = depot.file_info(REPO, "model.safetensors")
    with writable(depot.store.blobs.path(entry.sha256)) as path:
        os.truncate(path, 10)
    with pytest.raises(CorruptBlobError, match="10 bytes"):
        depot.get_file(REPO, "model.safetensors")
    assert not depot.has_file(REPO, "model.safetensors")


def test_an_older_folder_imported_again_is_a_new_commit_on_the_branch(
    tmp_path: Path, model_dir: Path
) -> None:
    """Commit ids came from the files alone: importing v1, v2, then v1 again moved main back to v1's old
    commit, and the commits listed from main no longer had v2's."""
    newer = write_model_dir(tmp_path / "v2", {**sample_files(), "config.json": b'{"v": 2}'})
    with (
        Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as a,
        Depot(tmp_path / "b", chunk_size=SMALL_CHUNK) as b,
    ):
        first = a.import_dir(model_dir, REPO)
        assert a.import_dir(model_dir, REPO).commit_id == first.commit_id  # the same files: nothing new
        second = a.import_dir(newer, REPO)
        third = a.import_dir(model_dir, REPO)
        assert third.commit_id not in (first.commit_id, second.commit_id)
        assert a.resolve(REPO) == third.commit_id
        assert [c for c, _ in a.store.revisions(REPO)][:3] == [
            third.commit_id,
            second.commit_id,
            first.commit_id,
        ]
        assert a.get_file(REPO, "config.json", third.commit_id) == sample_files()["config.json"]
        # The same history gives the same ids on another machine
        assert [b.import_dir(d, REPO).commit_id for d in (model_dir, newer, model_dir)] == [
            first.commit_id,
            second.commit_id,
            third.commit_id,
        ]
        assert a.import_dir(model_dir, REPO, "dev").commit_id == first.commit_id  # a new branch: no parent


def test_a_commits_history_follows_its_parents_then_the_time_revisions_came(
    tmp_path: Path, model_dir: Path
) -> None:
    """Listed by the time they came, one branch's history held another's commits (a trial). An import's
    parent is told from its id; past a commit whose parent cannot be told (pulled: no tree of ours), the
    older revisions follow by the time they came, as before."""
    from modeldepot.store.history import commit_history

    def folder(n: int) -> Path:
        return write_model_dir(tmp_path / f"v{n}", {**sample_files(), "config.json": b'{"v": %d}' % n})

    with Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as depot:
        m0 = depot.import_dir(folder(0), REPO).commit_id
        d0 = depot.import_dir(folder(1), REPO, "dev").commit_id
        m1 = depot.import_dir(folder(2), REPO).commit_id
        m2 = depot.import_dir(folder(3), REPO).commit_id

        def history(commit: str) -> list[str]:
            return [c for c, _ in commit_history(depot.store, REPO, commit)]

        assert history(m2) == [m2, m1, m0] and history(d0) == [d0] and history(m1) == [m1, m0]
        with depot.store.index.write() as con:  # m1 as a pulled commit is kept: no tree of ours
            con.execute("UPDATE revisions SET tree_oid = NULL WHERE commit_id = ?", (m1,))
        assert history(m2) == [m2, m1, d0, m0]  # (its parent still told by m2's id; then by time)


def test_imports_at_once_onto_one_branch_keep_each_others_commits(tmp_path: Path) -> None:
    """Each import read the branch's head before it published: two at once took the same parent, and the
    last one's commit dropped the other's from the branch's history, or a re-import of the head's files
    moved the branch back (a trial). The head is read in the publishing transaction now."""
    import threading

    from modeldepot.store.history import commit_history

    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as first, Depot(home) as second:
        for round_ in range(6):
            folders = [write_model_dir(tmp_path / f"r{round_}-{n}", {"config.json": b'{"r": %d, "n": %d}' % (round_, n)})
                       for n in range(2)]  # fmt: skip
            barrier, made = threading.Barrier(2), {}

            def run(depot: Depot, folder: Path, barrier: threading.Barrier, made: dict[Path, str]) -> None:
                barrier.wait()
                made[folder] = depot.import_dir(folder, REPO).commit_id

            threads = [threading.Thread(target=run, args=(depot, folder, barrier, made))
                       for depot, folder in zip((first, second), folders, strict=True)]  # fmt: skip
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            history = [c for c, _ in commit_history(first.store, REPO, first.resolve(REPO))]
            assert set(made.values()) <= set(history), (round_, made, history)
            assert first.resolve(REPO) in made.values()


def test_the_same_files_published_again_are_no_update_of_the_repo(tmp_path: Path, model_dir: Path) -> None:
    """A re-import that changed nothing made the repo "updated just now". (Its ref's time moves: the store
    learned where the branch is, which a shared store's reader goes by.)"""
    with Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(model_dir, REPO)
        updated, learned = depot.repo_info(REPO).updated_at, depot.store.ref_time(REPO, "main")
        depot.import_dir(model_dir, REPO)
        assert depot.repo_info(REPO).updated_at == updated
        assert (depot.store.ref_time(REPO, "main") or 0) > (learned or 0)
        depot.import_dir(write_model_dir(tmp_path / "v2", {"config.json": b"{}"}), REPO)
        assert depot.repo_info(REPO).updated_at > updated


def test_commit_ids_are_deterministic_and_content_is_stored_once(tmp_path: Path, model_dir: Path) -> None:
    with (
        Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as a,
        Depot(tmp_path / "b", chunk_size=SMALL_CHUNK) as b,
    ):
        first = a.import_dir(model_dir, REPO)
        assert b.import_dir(model_dir, "other/name").commit_id == first.commit_id
        again = a.import_dir(model_dir, "other/copy", "dev")
        assert again.commit_id == first.commit_id and again.new_blobs == 0 and again.new_bytes == 0
        changed = write_model_dir(tmp_path / "v2", {**sample_files(), "config.json": b'{"v": 2}'})
        second = a.import_dir(changed, REPO)
        assert second.commit_id != first.commit_id and (second.new_blobs, second.new_bytes) == (1, 8)
        rows = a.store.index.read("SELECT COUNT(*) AS n FROM blobs")[0]["n"]
        assert rows == len(sample_files()) + 1
        usage = a.du()
        assert usage.blob_bytes == sum(map(len, sample_files().values())) + 8
        assert usage.logical_bytes == 3 * sum(map(len, sample_files().values())) + 8 - len(
            b'{"model_type": "bert", "seed": 0}'
        )


def test_revisions_refs_and_lookup_errors(depot: Depot, tmp_path: Path, model_dir: Path) -> None:
    main = depot.import_dir(model_dir, REPO)
    dev_dir = write_model_dir(tmp_path / "dev", {"config.json": b"{}"})
    dev = depot.import_dir(dev_dir, REPO, "dev")
    assert depot.repo_info(REPO).refs == {"dev": dev.commit_id, "main": main.commit_id}
    assert depot.has_file(REPO, "model.safetensors", main.commit_id)
    assert not depot.has_file(REPO, "model.safetensors", "dev")
    assert depot.snapshot_path(REPO, "dev").name == dev.commit_id
    with pytest.raises(RepoNotFoundError):
        depot.get_file("acme/none", "config.json")
    with pytest.raises(RevisionNotFoundError):
        depot.get_file(REPO, "config.json", "feature")
    with pytest.raises(RevisionNotFoundError):
        depot.get_file(REPO, "config.json", "0" * 40)
    with pytest.raises(EntryNotFoundError) as caught:
        depot.get_file(REPO, "missing.json")
    assert isinstance(caught.value, FileNotFoundError) and "missing.json" in str(caught.value)


def test_blobs_are_read_only_and_snapshots_are_relative_links(depot: Depot, model_dir: Path) -> None:
    depot.import_dir(model_dir, REPO)
    entry = depot.file_info(REPO, "onnx/model_q4.onnx")
    assert stat.S_IMODE(depot.store.blobs.path(entry.sha256).stat().st_mode) == 0o444
    link = depot.file_path(REPO, "onnx/model_q4.onnx")
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    assert (link.parent / "model_q4.onnx_data").exists()  # engines find external data next to the model


def test_snapshot_is_rebuilt_when_damaged(depot: Depot, model_dir: Path) -> None:
    result = depot.import_dir(model_dir, REPO)
    snapshot = Path(result.snapshot_path)
    (snapshot / "config.json").unlink()
    (snapshot / "onnx" / "model_q4.onnx").unlink()
    os.symlink("/etc/hostname", snapshot / "onnx" / "model_q4.onnx")
    assert depot.file_path(REPO, "config.json").read_bytes() == sample_files()["config.json"]
    assert depot.verify().snapshots_repaired == 0  # file_path already rebuilt it
    (snapshot / "tokenizer.json").unlink()
    assert depot.verify().snapshots_repaired == 1
    assert depot.file_path(REPO, "onnx/model_q4.onnx").read_bytes() == sample_files()["onnx/model_q4.onnx"]


def test_a_snapshot_with_a_link_its_revision_lost_is_rebuilt(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rm --quant` killed after its commit and before it took the variant's links out left them in the
    snapshot folder for good (dangling, or live when another repo holds the blob): `path`, `verify` and
    `gc` found every expected link right and looked no further (a crash trial)."""
    files = {"config.json": b"{}", "m-Q4_K_M.gguf": b"4" * 5000, "m-Q8_0.gguf": b"8" * 9000}
    depot.import_dir(write_model_dir(tmp_path / "m", files), "acme/gguf")

    class Killed(Exception):
        pass

    def killed(*_: object) -> None:
        raise Killed  # (the process ends here: after the commit, before the links go)

    monkeypatch.setattr(Snapshots, "unlink", killed)
    with pytest.raises(Killed):
        depot.remove("acme/gguf", quant="Q8_0")
    monkeypatch.undo()
    folder = depot.snapshot_path("acme/gguf")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "m-Q4_K_M.gguf"]
    depot.import_dir(write_model_dir(tmp_path / "m", files), "acme/gguf")
    monkeypatch.setattr(Snapshots, "unlink", killed)
    with pytest.raises(Killed):  # (again, and this time `verify` is what finds it)
        depot.remove("acme/gguf", quant="Q8_0")
    monkeypatch.undo()
    assert depot.verify().snapshots_repaired == 1
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "m-Q4_K_M.gguf"]


def test_a_snapshot_rebuilt_from_a_stale_look_is_built_again_of_the_files_now(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot counts as whole only with no link its revision lacks: a reader that looked at the files
    just before a pull added one to the commit found the pull's snapshot "damaged" and replaced it with one
    of the files before (a review). It looks again after its build, and builds again."""
    files = {"config.json": b"{}", "m-Q4_K_M.gguf": b"4" * 5000, "m-Q8_0.gguf": b"8" * 9000}
    commit = depot.import_dir(write_model_dir(tmp_path / "m", files), "acme/gguf").commit_id
    folder = depot.store.snapshots.path("acme/gguf", commit)
    (folder / "config.json").unlink()  # (so that the reader rebuilds)
    real, looks = depot.store.files, []

    def stale_first(repo_id: str, commit_id: str) -> list[FileEntry]:
        looks.append(1)
        found = real(repo_id, commit_id)
        return [f for f in found if f.path != "m-Q8_0.gguf"] if len(looks) == 1 else found

    monkeypatch.setattr(depot.store, "files", stale_first)
    assert depot.store.ensure_snapshot("acme/gguf", commit)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)


def test_etags_follow_the_hub_rules(depot: Depot, tmp_path: Path) -> None:
    folder = write_model_dir(
        tmp_path / "m",
        {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", "config.json": b"{}",
         "model.safetensors": b"w" * 10, "notes.txt": b"n"},
    )  # fmt: skip
    depot.import_dir(folder, REPO)
    config, weights = depot.file_info(REPO, "config.json"), depot.file_info(REPO, "model.safetensors")
    assert not config.lfs and config.etag == config.git_oid == git_blob_oid(b"{}")
    assert weights.lfs and weights.etag == weights.sha256 and weights.git_oid != git_blob_oid(b"w" * 10)


def test_import_follows_file_links_and_skips_git_folders(
    depot: Depot, tmp_path: Path, model_dir: Path
) -> None:
    linked = tmp_path / "linked"
    (linked / ".git").mkdir(parents=True)
    (linked / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (linked / "config.json").symlink_to(model_dir / "config.json")
    depot.import_dir(linked, REPO)
    assert [f.path for f in depot.repo_info(REPO).revisions[0].files] == ["config.json"]
    with pytest.raises(SourceDirectoryError, match="not a directory"):
        depot.import_dir(tmp_path / "absent", REPO)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceDirectoryError, match="no files"):
        depot.import_dir(tmp_path / "empty", REPO)


def test_a_linked_file_is_made_read_only_for_its_own_readers_alone(depot: Depot, tmp_path: Path) -> None:
    """`import --link` of a fine-tune saved 0600 (safetensors writes so) made it 0444: anyone's to read, a
    private repo's too (a trial). It loses its write bits, and gains no reader; it is served as ever."""
    folder = write_model_dir(tmp_path / "folder", {"model.safetensors": os.urandom(2 * SMALL_CHUNK)})
    (folder / "config.json").write_bytes(b"{}")
    os.chmod(folder / "model.safetensors", 0o600)
    os.chmod(folder / "config.json", 0o640)
    depot.import_dir(folder, REPO, link=True, private=True)
    assert stat.S_IMODE(os.stat(folder / "model.safetensors").st_mode) == 0o400
    assert stat.S_IMODE(os.stat(folder / "config.json").st_mode) == 0o440
    assert bytes(depot.get_file(REPO, "model.safetensors")) == (folder / "model.safetensors").read_bytes()
    assert depot.verify().ok and store_files_consistent(depot) == []
    # `du` says the bytes are shared (it counted a 40 GB adopted cache as the store's own: a trial)
    assert depot.du().linked_bytes == 2 * SMALL_CHUNK + 2
    (folder / "model.safetensors").unlink()
    assert depot.du().linked_bytes == 2, "the store's alone once the folder's name went"


def test_a_private_file_is_copied_not_linked_into_a_store_others_may_enter() -> None:
    """Linked, a file only its owner may read made its blob its owner's alone (0400): in a store others read
    (a shared store, MODELDEPOT_SHARED), every repo of the same bytes, pulled or imported later, was
    unreadable to them (an explorer's trial, adopting a private Hugging Face cache). Such a file is copied
    into a store others may enter (the store's blob 0444; the file left as it was); into one they cannot
    (every test's other store: pytest's folder is its owner's alone), it is linked as before."""
    open_root = Path(tempfile.mkdtemp(prefix="modeldepot-open-"))
    try:
        os.chmod(open_root, 0o755)
        folder = write_model_dir(open_root / "folder", {"model.safetensors": os.urandom(2 * SMALL_CHUNK)})
        (folder / "config.json").write_bytes(b"{}")
        os.chmod(folder / "model.safetensors", 0o600)
        os.chmod(folder / "config.json", 0o644)
        with Depot(open_root / "store", chunk_size=SMALL_CHUNK) as depot:
            os.chmod(depot.home, 0o755)
            result = depot.import_dir(folder, REPO, link=True)
            # (said so: `import --link` said "another file system or another user's files", an explorer's trial)
            assert result.copied_because == (
                "fewer may read them than the store's blobs, in a store others may enter",
            )

            def blob(path: str) -> os.stat_result:
                return os.stat(depot.store.blobs.path(depot.file_info(REPO, path).sha256))

            private, public = folder / "model.safetensors", folder / "config.json"
            assert blob("model.safetensors").st_ino != private.stat().st_ino, "copied"
            assert stat.S_IMODE(blob("model.safetensors").st_mode) == 0o444
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, "left as it was"
            assert blob("config.json").st_ino == public.stat().st_ino, "a file anyone may read is linked"
            assert bytes(depot.get_file(REPO, "model.safetensors")) == private.read_bytes()
        # A home of 0750 whose group is its owner's own (Debian's user-private groups) is its owner's alone:
        # linked there (every private file of a personal store was copied: a review)
        owner = pwd.getpwuid(os.geteuid())
        if grp.getgrgid(owner.pw_gid).gr_name == owner.pw_name:
            os.chown(open_root, owner.pw_uid, owner.pw_gid)
            os.chmod(open_root, 0o750)
            with Depot(open_root / "personal", chunk_size=SMALL_CHUNK) as personal:
                personal.import_dir(folder, "acme/personal", link=True)
                entry = personal.file_info("acme/personal", "model.safetensors")
                assert os.stat(personal.store.blobs.path(entry.sha256)).st_ino == private.stat().st_ino
    finally:
        subprocess.run(["rm", "-rf", str(open_root)], check=True)


def test_a_removed_or_evicted_link_import_gives_its_files_their_write_bit_back(
    depot: Depot, tmp_path: Path
) -> None:
    """`rm` (or the disk budget's eviction) of an `import --link` left the user's own files read-only for good
    (a trial): as the store lets go of a blob that has a name elsewhere, its owner's write bit comes back."""
    folder = write_model_dir(tmp_path / "folder", {"model.safetensors": os.urandom(2 * SMALL_CHUNK)})
    (folder / "config.json").write_bytes(b'{"linked": 1}')
    os.chmod(folder / "model.safetensors", 0o600)
    depot.import_dir(folder, REPO, link=True)
    assert stat.S_IMODE(os.stat(folder / "model.safetensors").st_mode) == 0o400
    depot.remove(REPO)
    assert stat.S_IMODE(os.stat(folder / "model.safetensors").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder / "config.json").st_mode) == 0o644
    # (the disk budget does not evict a link import while the folder's files stay: it would free no disk;
    # once they are gone the store's name is the last, and no file of the user's is left to give a mode to)
    depot.import_dir(folder, "acme/linked", link=True)
    depot.import_dir(
        write_model_dir(tmp_path / "copied", {"w.bin": os.urandom(3 * SMALL_CHUNK)}), "acme/copied"
    )
    assert [e.repo_id for e in depot.shrink(100)] == ["acme/copied"]
    assert stat.S_IMODE(os.stat(folder / "model.safetensors").st_mode) == 0o400
    depot.remove("acme/linked")
    assert stat.S_IMODE(os.stat(folder / "model.safetensors").st_mode) == 0o600
    assert store_files_consistent(depot) == []


def test_gc_after_an_rm_killed_past_its_commit_gives_the_link_imports_files_their_mode_back(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `rm` (or an eviction) killed after its commit, before it deleted the blobs' files, left them to gc
    as orphans, and gc deleted them without giving the user's files their mode back: read-only for good (a
    crash fuzzer's trial)."""
    from modeldepot.store import maintenance

    folder = write_model_dir(tmp_path / "folder", {"model.gguf": os.urandom(2 * SMALL_CHUNK)})
    (folder / "config.json").write_bytes(b"{}")
    os.chmod(folder / "model.gguf", 0o640)
    depot.import_dir(folder, REPO, link=True)

    def killed(*args: object, **kwargs: object) -> dict[str, object]:
        raise KeyboardInterrupt  # (the process dies here: the rows went, the files stay)

    monkeypatch.setattr(maintenance, "_delete_each_blob_file", killed)
    with pytest.raises(KeyboardInterrupt):
        depot.remove(REPO)
    monkeypatch.undo()
    assert stat.S_IMODE(os.stat(folder / "model.gguf").st_mode) == 0o440
    report = depot.gc()
    assert report.blobs_removed == 2 and report.bytes_freed == 0  # (the files are the user's still)
    assert stat.S_IMODE(os.stat(folder / "model.gguf").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(folder / "config.json").st_mode) == 0o644
    assert depot.store.index.read("SELECT COUNT(*) AS n FROM linked_sources")[0]["n"] == 0
    assert store_files_consistent(depot) == []


def test_a_link_import_killed_before_its_commit_gives_the_files_their_mode_back_whatever_runs_first(
    tmp_path: Path,
) -> None:
    """An `import --link` killed between placing its blobs and its commit left its notes of the files' modes
    in its session; the next write's sweep of dead sessions could not give the modes back (the placed blob
    is another name of each file) and deleted the notes: gc then deleted the orphan blobs, and the user's
    files stayed read-only for good (a crash fuzzer's trial). The notes wait for gc."""
    import subprocess
    import sys

    home = tmp_path / "store"
    folder = write_model_dir(tmp_path / "folder", {"model.gguf": os.urandom(2 * SMALL_CHUNK)})
    (folder / "config.json").write_bytes(b"{}")
    os.chmod(folder / "model.gguf", 0o640)
    killed = subprocess.run(
        [sys.executable, "-c", "import os, sys\n"
         "from modeldepot import Depot\nfrom modeldepot.store import publish\n"
         "publish._commit = lambda *a, **k: os._exit(9)  # (dies here: placed, not committed)\n"
         f"Depot({str(home)!r}, chunk_size={SMALL_CHUNK}).import_dir({str(folder)!r}, 'acme/linked', link=True)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == 9, killed.stderr
    assert stat.S_IMODE(os.stat(folder / "model.gguf").st_mode) == 0o440
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        # another write first: its sweep of dead sessions
        depot.import_dir(
            write_model_dir(tmp_path / "other", {"w.bin": os.urandom(SMALL_CHUNK)}), "acme/other"
        )
        depot.gc()
        assert stat.S_IMODE(os.stat(folder / "model.gguf").st_mode) == 0o640
        assert stat.S_IMODE(os.stat(folder / "config.json").st_mode) == 0o644
        assert not list(depot.store.layout.tmp.iterdir()), "the session went with gc"
        assert store_files_consistent(depot) == []


def test_gc_frees_nothing_of_a_quarantined_file_the_user_still_links(depot: Depot, tmp_path: Path) -> None:
    """A blob of an `import --link` changed in the user's folder is quarantined; gc removes the store's name
    of it, but the file stays the user's: gc said it freed its size."""
    folder = write_model_dir(tmp_path / "folder", {"w.bin": os.urandom(2 * SMALL_CHUNK)})
    os.chmod(folder / "w.bin", 0o640)
    depot.import_dir(folder, REPO, link=True)
    with writable(folder / "w.bin"):  # (bit rot: the mode stays as the store left it)
        flip_byte(folder / "w.bin", 10)
    assert not depot.verify().ok  # (quarantined)
    report = depot.gc()
    assert (report.quarantined_removed, report.bytes_freed) == (1, 0)
    assert (folder / "w.bin").stat().st_nlink == 1
    # and the store let go of it as of a removed blob: its mode comes back, its record goes
    assert stat.S_IMODE((folder / "w.bin").stat().st_mode) == 0o640
    assert depot.store.index.read("SELECT COUNT(*) AS n FROM linked_sources")[0]["n"] == 0


def test_a_removed_link_import_gives_back_the_mode_it_took_and_widens_none(
    depot: Depot, tmp_path: Path
) -> None:
    """Given back by the link count alone, the owner's write bit widened a read-only cache's files (0444 came
    back 0644) and another store's blobs of the same cache, once the cache's own names went (a trial). The
    mode recorded as the store took a file comes back, to that file alone, while it is as the store left it
    and has no other name."""

    def mode(path: Path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    read_only = write_model_dir(tmp_path / "ro", {"a.bin": os.urandom(SMALL_CHUNK), "b.bin": b"b" * 100})
    for name in ("a.bin", "b.bin"):
        os.chmod(read_only / name, 0o444)
    depot.import_dir(read_only, "acme/ro", link=True)
    depot.remove("acme/ro")
    assert (mode(read_only / "a.bin"), mode(read_only / "b.bin")) == (0o444, 0o444)

    shared = write_model_dir(tmp_path / "shared", {"w.bin": os.urandom(SMALL_CHUNK)})
    os.chmod(shared / "w.bin", 0o640)
    with Depot(tmp_path / "other", chunk_size=SMALL_CHUNK) as other:
        depot.import_dir(shared, "acme/shared", link=True)
        other.import_dir(shared, "acme/shared", link=True)  # (the same file: a second store adopts it)
        theirs = other.store.blobs.path(other.file_info("acme/shared", "w.bin").sha256)
        assert os.stat(theirs).st_nlink == 3 and mode(theirs) == 0o440
        (shared / "w.bin").unlink()  # the folder's own name goes (a cache that deleted the revision)
        depot.remove("acme/shared")
        assert mode(theirs) == 0o440, "the other store's blob stays read-only"
        assert other.verify().ok
    assert store_files_consistent(depot) == []
    # A note a killed store left on a file says nothing of the mode its user set since (it widened it back)
    stale = write_model_dir(tmp_path / "stale", {"s.bin": os.urandom(SMALL_CHUNK)})
    os.setxattr(stale / "s.bin", "user.modeldepot.mode", b"420")  # 0644, noted by a store since gone
    os.chmod(stale / "s.bin", 0o444)  # the user's choice
    depot.import_dir(stale, "acme/stale", link=True)
    depot.remove("acme/stale")
    assert mode(stale / "s.bin") == 0o444


def test_a_link_import_from_before_the_modes_were_recorded_gets_its_write_bit_back(tmp_path: Path) -> None:
    """A store upgraded to schema 9 holds links it made before it recorded their modes: removed, their
    files stayed read-only for good (a review). Such a store gives a blob with no record its owner's write
    bit back when the user's name is its last, as before; one made since records every link."""
    folder = write_model_dir(tmp_path / "folder", {"w.bin": os.urandom(SMALL_CHUNK)})
    os.chmod(folder / "w.bin", 0o644)
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        assert depot.store.index.setting("links_unrecorded") is None  # (a store made at schema 9 or later)
        depot.import_dir(folder, REPO, link=True)
    with sqlite3.connect(home / "index.db") as con:  # as the upgrade left a store that linked files before
        con.execute("DELETE FROM linked_sources")
        con.execute("INSERT INTO settings (key, value) VALUES ('links_unrecorded', '1')")
    con.close()
    with Depot(home) as depot:
        assert stat.S_IMODE(os.stat(folder / "w.bin").st_mode) == 0o444
        depot.remove(REPO)
    assert stat.S_IMODE(os.stat(folder / "w.bin").st_mode) == 0o644


def test_an_upgraded_store_counts_its_own_blobs_exported_since(tmp_path: Path) -> None:
    """A store upgraded to schema 9 was flagged, for good, as one that linked files in before it recorded
    them: every blob another name linked counted as shared, so the blobs it exported to a Hugging Face cache
    after the upgrade left the disk budget (113 MiB used became 6 MiB: an explorer's trial). On the
    upgrade, the blobs linked then are noted as linked in; the rest stay the store's own."""
    folder = write_model_dir(tmp_path / "folder", {"w.bin": os.urandom(SMALL_CHUNK)})
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/linked", link=True)
        depot.import_dir(
            write_model_dir(tmp_path / "own", {"o.bin": os.urandom(3 * SMALL_CHUNK)}), "acme/own"
        )
    with contextlib.closing(sqlite3.connect(home / "index.db")) as con:  # (as an upgrade left it)
        con.execute("DELETE FROM linked_sources")
        con.execute("INSERT INTO settings (key, value) VALUES ('links_unrecorded', '1')")
        con.commit()
    with Depot(home) as depot:
        assert depot.store.index.setting("links_unrecorded") is None
        used = depot.budget_status().used_bytes
        assert used == 3 * SMALL_CHUNK  # (the linked-in blob is shared: not counted)
        depot.hf_cache_export("acme/own", cache_dir=tmp_path / "hf" / "hub")  # (hard links: a second name)
        assert depot.budget_status().used_bytes == used, "the store's own blob, exported, still counts"
        depot.remove("acme/linked")
        assert depot.store.index.read("SELECT COUNT(*) FROM linked_sources")[0][0] == 0
    assert stat.S_IMODE(os.stat(folder / "w.bin").st_mode) & stat.S_IWUSR  # (its write bit back, as before)


def test_an_import_with_link_makes_no_second_copy(depot: Depot, tmp_path: Path) -> None:
    """`import --link` (ollama#7254: an import copied 40 GB GGUFs it could have linked): the folder's files
    become the store's blobs (one inode, read-only), a link in the folder links the file it names, a file
    on another file system is copied; a linked file written in place later is never served."""
    files = {"model.gguf": os.urandom(3 * SMALL_CHUNK + 5), "config.json": b'{"a": 1}'}
    folder = write_model_dir(tmp_path / "folder", files)
    elsewhere = write_model_dir(tmp_path / "elsewhere", {"tokenizer.json": b'{"t": 2}'})
    (folder / "tokenizer.json").symlink_to(elsewhere / "tokenizer.json")
    result = depot.import_dir(folder, REPO, link=True)
    assert result.linked_bytes == result.new_bytes == sum(map(len, files.values())) + len(b'{"t": 2}')
    for path, source in (
        ("model.gguf", folder / "model.gguf"),
        ("tokenizer.json", elsewhere / "tokenizer.json"),
    ):
        blob = depot.store.blobs.path(depot.file_info(REPO, path).sha256)
        assert os.stat(blob).st_ino == os.stat(source).st_ino  # one file, two names
        assert stat.S_IMODE(os.stat(source).st_mode) == 0o444
    assert imported(depot, REPO) == {**files, "tokenizer.json": b'{"t": 2}'}
    assert depot.verify().ok and store_files_consistent(depot) == []

    if os.path.isdir("/dev/shm"):  # another file system: copied
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            other = write_model_dir(Path(shm), {"other.bin": os.urandom(SMALL_CHUNK)})
            copied = depot.import_dir(other, "acme/other", link=True)
            assert copied.new_bytes == SMALL_CHUNK and copied.linked_bytes == 0
            assert copied.copied_because == ("on another file system than the store",)

    # A read-only bind mount of the store's own disk: the same device, no link across mounts; said why (it
    # was "the file system refused a hard link, or another import ...": an explorer's trial)
    if os.geteuid() == 0:
        from conftest import Mounts

        mounts = Mounts(tmp_path)
        try:
            mine = write_model_dir(tmp_path / "mine", {"mine.bin": os.urandom(SMALL_CHUNK)})
            os.chmod(mine / "mine.bin", 0o444)
            mounted = depot.import_dir(mounts.read_only(mine), "acme/mine", link=True)
            assert mounted.linked_bytes == 0 and mounted.copied_because == (
                "on a read-only mount (a hard link is made on the source's mount only)",
            ), mounted.copied_because
        finally:
            mounts.unmount_all()

    # A file whose content the store held already is not linked: it is given its mode back
    again = write_model_dir(tmp_path / "again", {"config.json": b'{"a": 1}'})
    os.chmod(again / "config.json", 0o640)
    assert depot.import_dir(again, "acme/again", link=True).new_bytes == 0
    assert stat.S_IMODE(os.stat(again / "config.json").st_mode) == 0o640

    # Its owner makes it writable again and changes it in place: found at the next read by its mtime
    os.chmod(folder / "model.gguf", 0o644)
    with open(folder / "model.gguf", "r+b") as handle:
        handle.seek(SMALL_CHUNK)
        handle.write(b"changed")
    with pytest.raises(CorruptBlobError):
        depot.get_file(REPO, "model.gguf")


def test_a_linked_file_written_while_it_is_hashed_is_refused(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program that had the file open for writing before `import --link` made it read-only writes to it
    while it is hashed: the hash is of neither version, and it was published and served as good."""
    from modeldepot.store import importer

    folder = write_model_dir(tmp_path / "folder", {"model.gguf": os.urandom(3 * SMALL_CHUNK)})
    writer = os.open(folder / "model.gguf", os.O_WRONLY)
    hashing = importer.digest_stream

    def written_meanwhile(*args: object, **kwargs: object) -> object:
        digest = hashing(*args, **kwargs)  # type: ignore[arg-type]
        os.pwrite(writer, b"EVIL", 0)  # (after the bytes were read: the hash is of the old ones)
        return digest

    monkeypatch.setattr(importer, "digest_stream", written_meanwhile)
    try:
        with pytest.raises(SourceDirectoryError, match="changed while it was being read"):
            depot.import_dir(folder, REPO, link=True)
    finally:
        os.close(writer)
    assert depot.list_repos() == [] and stat.S_IMODE(os.stat(folder / "model.gguf").st_mode) != 0o444


@pytest.mark.parametrize("held_before", [False, True], ids=["new-content", "content-held-before"])
def test_a_file_written_while_it_is_copied_is_refused(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held_before: bool
) -> None:
    """A file written in place while `import` copies it was stored as a mix of its two versions (its old
    start, its new end), hashed as copied so every check passed, and said imported (an explorer's trial).
    Also when the store held the file's bytes before (hashed where it is, then not copied)."""
    from modeldepot.store import importer

    old = os.urandom(3 * SMALL_CHUNK)
    folder = write_model_dir(tmp_path / "folder", {"model.gguf": old})
    os.utime(
        folder / "model.gguf", (1e9, 1e9)
    )  # (written long ago: a write within one clock tick moves no mtime)
    if held_before:
        depot.import_dir(folder, "org/before")
    hashing = importer.digest_stream

    def written_meanwhile(*args: object, **kwargs: object) -> object:
        digest = hashing(*args, **kwargs)  # type: ignore[arg-type]
        with open(folder / "model.gguf", "r+b") as handle:  # (after the bytes were read)
            handle.write(b"NEW!")
        return digest

    monkeypatch.setattr(importer, "digest_stream", written_meanwhile)
    with pytest.raises(SourceDirectoryError, match="changed while it was being read"):
        depot.import_dir(folder, REPO)
    assert REPO not in [repo.repo_id for repo in depot.list_repos()]
    monkeypatch.setattr(importer, "digest_stream", hashing)
    depot.import_dir(folder, REPO)  # (once written, it imports: the version it holds now)
    assert bytes(depot.get_file(REPO, "model.gguf")) == b"NEW!" + old[4:]


def _second_import_during(
    depot: Depot,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    also: Callable[[], None] = lambda: None,
) -> tuple[ImportResult, ImportResult, dict[str, bytes], Path]:
    """`import --link` of a folder, and a second one of the same folder (and ``also``) run when the first
    reaches ``step`` (a function of the importer's) the first time: (first, second, files, folder)."""
    from modeldepot.store import importer

    files = {"model.gguf": os.urandom(3 * SMALL_CHUNK), "config.json": b'{"a": 1}'}
    folder = write_model_dir(tmp_path / "folder", files)
    for name in files:
        os.chmod(folder / name, 0o640)
    original, started, results = getattr(importer, step), [], []
    with Depot(depot.home) as other:

        def meanwhile(*args: object, **kwargs: object) -> object:
            if not started:
                started.append(True)
                results.append(other.import_dir(folder, "acme/second", link=True))
                also()
            return original(*args, **kwargs)

        monkeypatch.setattr(importer, step, meanwhile)
        first = depot.import_dir(folder, REPO, link=True)
    assert imported(depot, REPO) == files and imported(depot, "acme/second") == files
    return first, results[0], files, folder


def _modes_given_back(depot: Depot, folder: Path, files: dict[str, bytes]) -> None:
    """A file the store keeps as its blob is read-only; any other has its mode back."""
    for name in files:
        blob = depot.store.blobs.path(depot.file_info(REPO, name).sha256)
        kept = os.stat(blob).st_ino == os.stat(folder / name).st_ino
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == (0o440 if kept else 0o640), name
    assert depot.verify().ok and store_files_consistent(depot) == []


def test_two_imports_linking_one_folder_at_once_both_succeed_and_give_the_modes_back(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `import --link` of one folder at once (a chaos trial): each one's link and chmod moved the other's
    change time, both failed ("changed while it was being hashed") and the user's files stayed read-only
    (the second noted the mode the first had set). The second now copies what the first links."""
    # (the second runs once the first has linked its first file and holds it)
    first, second, files, folder = _second_import_during(depot, tmp_path, monkeypatch, "digest_stream")
    assert second.linked_bytes < second.new_bytes, "the file the first one held was copied"
    assert first.new_bytes + second.new_bytes == sum(map(len, files.values()))
    _modes_given_back(depot, folder, files)


def test_a_second_import_linking_one_folder_after_the_first_hashed_copies_and_neither_fails(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock that makes a second `import --link` of a file copy it was let go when the first had hashed
    the file (its descriptor closed), not when it had placed it: both linked, and both failed, "changed
    after it was hashed", or left the user's files read-only. A link made and dropped elsewhere (another
    store's import and rm) between the hash and the publish failed an import too."""

    def a_passing_link() -> None:
        for name in ("model.gguf", "config.json"):
            os.link(tmp_path / "folder" / name, tmp_path / "passing")
            os.unlink(tmp_path / "passing")

    # (the second runs once every file of the first is hashed and held)
    first, second, files, folder = _second_import_during(
        depot, tmp_path, monkeypatch, "publish", a_passing_link
    )
    assert second.linked_bytes == 0, "the files the first one held were copied"
    assert first.new_bytes == 0, "the second one, published first, placed them"
    _modes_given_back(depot, folder, files)


LINK_UNDER_A_LOW_FILE_LIMIT = """
import resource, sys
from modeldepot import Depot
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
with Depot(sys.argv[1]) as depot:
    result = depot.import_dir(sys.argv[2], "acme/many", link=True)
    print(result.files, result.linked_bytes)
"""


def test_an_import_with_link_of_more_files_than_descriptors_succeeds(tmp_path: Path) -> None:
    """Each linked file's lock was held by a descriptor until the import published: `import --link` of 1,100
    files failed under the usual limit of 1,024 ("Too many open files"), and `hf-cache import` of a large repo
    called its blobs unreadable."""
    files = {f"f{i}.json": str(i).encode() for i in range(400)}
    folder = write_model_dir(tmp_path / "many", files)
    done = subprocess.run([sys.executable, "-c", LINK_UNDER_A_LOW_FILE_LIMIT, str(tmp_path / "store"), str(folder)],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["400", str(sum(map(len, files.values())))]


def test_a_removal_beside_an_import_with_link_is_no_writer(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `rm` (or gc, or an eviction) of another name of a linked file moves its change time: an `import
    --link` beside it failed, "changed while it was being hashed (something still writes it)", for a writer
    that was not (a chaos trial)."""
    from modeldepot.store import importer

    folder = write_model_dir(tmp_path / "folder", {"model.gguf": os.urandom(3 * SMALL_CHUNK)})
    depot.import_dir(folder, "acme/first", link=True)  # the user's file is the store's blob now
    hashing = importer.digest_stream

    def removed_meanwhile(*args: object, **kwargs: object) -> object:
        digest = hashing(*args, **kwargs)  # type: ignore[arg-type]
        depot.remove("acme/first")  # the blob's name goes: one link fewer
        return digest

    monkeypatch.setattr(importer, "digest_stream", removed_meanwhile)
    # (linked again, not taken as held: a content the store holds is hashed in place, and never linked)
    monkeypatch.setattr(importer.HeldContents, "may_hold", lambda *args: False)
    depot.import_dir(folder, REPO, link=True)
    assert imported(depot, REPO) == {"model.gguf": (folder / "model.gguf").read_bytes()}


def test_an_import_that_finds_a_content_held_survives_the_removal_of_its_only_other_repo(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A content the store holds is hashed in place and reused, not copied: an `rm` of the one repo holding it,
    between the look and the publish, removed the blob the import relied on (evictions left it, a removal did
    not), and the import failed "run it again" (a review). And a file written since the folder was walked
    is taken as it is then, as a copy takes it (it was refused for its size)."""

    from modeldepot.hashing import BlobDigest
    from modeldepot.store import importer

    folder = write_model_dir(tmp_path / "folder", {"w.bin": os.urandom(3 * SMALL_CHUNK), "c.json": b"{}"})
    depot.import_dir(folder, "acme/first")
    relied_on = importer.HeldContents.relied_on

    def then_removed(self: importer.HeldContents, digest: BlobDigest) -> bool:
        held = relied_on(self, digest)
        if depot.store.index.read("SELECT 1 FROM repos WHERE repo_id = 'acme/first'"):
            depot.remove("acme/first")  # (another process's `rm`, between the look and the publish)
        return held

    monkeypatch.setattr(importer.HeldContents, "relied_on", then_removed)
    result = depot.import_dir(folder, REPO)
    assert imported(depot, REPO) == {"w.bin": (folder / "w.bin").read_bytes(), "c.json": b"{}"}
    assert result.new_blobs <= 1 and depot.verify().ok  # (the file not looked at yet when it went: copied)
    monkeypatch.undo()
    hashed = importer.HeldContents.hashed

    def written_meanwhile(
        self: importer.HeldContents, source: Path, report: Callable[[int], None]
    ) -> BlobDigest:
        with open(source, "ab") as grown:
            grown.write(b"more")
        return hashed(self, source, report)

    monkeypatch.setattr(importer.HeldContents, "hashed", written_meanwhile)
    depot.import_dir(folder, REPO)
    assert imported(depot, REPO)["w.bin"] == (folder / "w.bin").read_bytes()
    assert (folder / "w.bin").stat().st_size == 3 * SMALL_CHUNK + 4


def kill_import_with_link(depot: Depot, folder: Path, at: str = "importer.digest_stream") -> None:
    """`import --link` of ``folder`` in a process killed at ``at`` (a function of the store's package): by
    default once its first file is linked and made read-only, before it is hashed."""
    module, function = at.rsplit(".", 1)
    killed = subprocess.run(
        [sys.executable, "-c", "import os, sys\n"
         "from modeldepot import Depot\n"
         f"from modeldepot.store import {module}\n"
         f"{module}.{function} = lambda *a, **k: os._exit(9)\n"
         "Depot(sys.argv[1]).import_dir(sys.argv[2], 'acme/x', link=True)\n",
         str(depot.home), str(folder)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert killed.returncode == 9, killed.stderr


@pytest.mark.parametrize("at", ["importer.digest_stream", "publish._commit"], ids=["hashing", "placed"])
def test_a_killed_import_with_link_gives_the_files_their_modes_back_at_gc(
    depot: Depot, tmp_path: Path, at: str
) -> None:
    """`import --link` killed while it hashed left the user's file read-only for good (its mode was kept in
    memory only): it is kept beside the link, and gc gives it back once the writer is gone. Killed after
    its blobs were placed, before its commit, the files stayed 0444 all the same: the mode kept named the
    link, renamed into blobs/ by then, and gc deleted the blob (a crash trial)."""
    folder = write_model_dir(tmp_path / "folder", {"model.gguf": os.urandom(3 * SMALL_CHUNK)})
    os.chmod(folder / "model.gguf", 0o640)
    kill_import_with_link(depot, folder, at)
    assert stat.S_IMODE(os.stat(folder / "model.gguf").st_mode) == 0o440  # (as the kill left it)
    depot.gc()
    assert stat.S_IMODE(os.stat(folder / "model.gguf").st_mode) == 0o640
    assert os.stat(folder / "model.gguf").st_nlink == 1 and depot.list_repos() == []


def test_an_import_with_link_failing_after_it_placed_gives_the_modes_back(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `import --link` failing after it placed its blobs (a disk error at its commit) takes them out
    again, and left the user's files 0444 for good (a crash trial)."""
    from modeldepot.store import publish

    folder = write_model_dir(
        tmp_path / "folder", {"a.gguf": os.urandom(SMALL_CHUNK), "b.gguf": os.urandom(99)}
    )
    for name in ("a.gguf", "b.gguf"):
        os.chmod(folder / name, 0o640)

    def failing(*_: object, **__: object) -> None:
        raise StoreError("the disk failed")

    monkeypatch.setattr(publish, "_commit", failing)
    with pytest.raises(StoreError, match="the disk failed"):
        depot.import_dir(folder, REPO, link=True)
    for name in ("a.gguf", "b.gguf"):
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o640 and os.stat(folder / name).st_nlink == 1
    monkeypatch.undo()
    depot.import_dir(folder, REPO, link=True)  # (and then it is the store's, read-only)
    assert stat.S_IMODE(os.stat(folder / "a.gguf").st_mode) == 0o440


def test_gc_never_makes_a_linked_blob_writable(depot: Depot, tmp_path: Path) -> None:
    """A killed `import --link` left its link and the file's old mode; the import run again made the file
    the store's blob, and its owner deleted their name of it (the store holds it now): gc gave the blob,
    the one other name left beside the dead import's link, the user's mode back, 0644."""
    folder = write_model_dir(tmp_path / "folder", {"model.gguf": os.urandom(3 * SMALL_CHUNK)})
    os.chmod(folder / "model.gguf", 0o644)
    kill_import_with_link(depot, folder)
    depot.import_dir(folder, REPO, link=True)
    blob = depot.store.blobs.path(depot.file_info(REPO, "model.gguf").sha256)
    (folder / "model.gguf").unlink()
    depot.gc()
    assert stat.S_IMODE(os.stat(blob).st_mode) == 0o444


def test_a_linked_file_written_after_it_was_hashed_is_not_published(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that had a.bin open writes to it while b.bin is hashed, after a.bin's hash: its digests
    were published with bytes they are not the hash of, served as good by local reads."""
    from modeldepot.store import importer

    folder = write_model_dir(
        tmp_path / "folder", {"a.bin": os.urandom(SMALL_CHUNK), "b.bin": os.urandom(SMALL_CHUNK)}
    )
    writer = os.open(folder / "a.bin", os.O_WRONLY)
    hashing, calls = importer.digest_stream, []

    def writing_to_the_first(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            os.pwrite(writer, b"EVIL", 0)
        return hashing(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(importer, "digest_stream", writing_to_the_first)
    try:
        with pytest.raises(SourceDirectoryError, match=r"a\.bin changed after it was hashed"):
            depot.import_dir(folder, REPO, link=True)
    finally:
        os.close(writer)
    assert depot.list_repos() == [] and depot.verify().ok


def imported(depot: Depot, repo: str) -> dict[str, bytes]:
    return {f.path: bytes(depot.get_file(repo, f.path)) for f in depot.list_files(repo)}


def test_import_follows_folder_links_that_stay_inside_the_folder(depot: Depot, tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model", {"config.json": b"{}", "onnx/model.onnx": b"graph"})
    (model / "weights").symlink_to("onnx")  # relative, to a sibling
    (model / "shared").mkdir()
    (model / "shared" / "a.txt").write_bytes(b"a")
    (model / "onnx" / "shared").symlink_to(model / "shared")  # absolute, still inside
    (model / "onnx" / "deeper").mkdir()
    (model / "onnx" / "deeper" / "again").symlink_to("../../shared")
    depot.import_dir(model, REPO)
    assert imported(depot, REPO) == {
        "config.json": b"{}",
        "onnx/deeper/again/a.txt": b"a",
        "onnx/model.onnx": b"graph",
        "onnx/shared/a.txt": b"a",
        "shared/a.txt": b"a",
        "weights/deeper/again/a.txt": b"a",
        "weights/model.onnx": b"graph",
        "weights/shared/a.txt": b"a",
    }
    assert depot.verify().ok


def test_a_folder_link_leaving_the_folder_is_refused_before_anything_is_written(
    depot: Depot, tmp_path: Path
) -> None:
    elsewhere = write_model_dir(tmp_path / "elsewhere", {"secret.bin": b"not part of the model"})
    model = write_model_dir(tmp_path / "model", {"config.json": b"{}"})
    (model / "onnx").mkdir()
    (model / "onnx" / "data").symlink_to("../../elsewhere")
    with pytest.raises(InvalidInputError) as caught:
        depot.import_dir(model, REPO)
    message = str(caught.value)
    assert str(model / "onnx" / "data") in message and str(elsewhere) in message, message
    assert "outside the folder being imported" in message
    assert depot.list_repos() == [] and depot.du().blobs == 0
    assert not any(p.is_file() for p in depot.store.layout.blobs.rglob("*"))
    assert list(depot.store.layout.tmp.iterdir()) == []
    (model / "onnx" / "data").unlink()  # the same folder without the link imports
    depot.import_dir(model, REPO)
    assert imported(depot, REPO) == {"config.json": b"{}"}


@pytest.mark.parametrize("shape", ["to-the-root", "to-its-parent", "two-folders-each-way"])
def test_folder_link_loops_end_with_a_clear_error(depot: Depot, tmp_path: Path, shape: str) -> None:
    model = write_model_dir(tmp_path / "model", {"config.json": b"{}", "a/x.bin": b"x", "b/y.bin": b"y"})
    if shape == "to-the-root":
        (model / "a" / "loop").symlink_to("..")
    elif shape == "to-its-parent":
        (model / "a" / "inner").mkdir()
        (model / "a" / "inner" / "loop").symlink_to(model / "a")
    else:
        (model / "a" / "to-b").symlink_to("../b")
        (model / "b" / "to-a").symlink_to("../a")
    with pytest.raises(InvalidInputError, match="a loop") as caught:
        depot.import_dir(model, REPO)
    assert "loop" in str(caught.value) and str(model) in str(caught.value)
    assert depot.list_repos() == [] and list(depot.store.layout.tmp.iterdir()) == []


def test_a_hugging_face_cache_snapshot_imports(depot: Depot, tmp_path: Path) -> None:
    """snapshots/<commit>/ holds links into ../../blobs/ (outside the snapshot folder): links to files are
    followed wherever they point, and its subfolders are plain folders."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    files = {"config.json": b'{"a": 1}', "onnx/model.onnx": b"graph" * 100, "tokenizer.json": b"{}"}
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    depot.import_dir(repo / "snapshots" / commit, REPO)
    assert imported(depot, REPO) == files
    (repo / "snapshots" / "main").symlink_to(commit)  # a folder link to the snapshot imports the same
    assert depot.import_dir(repo / "snapshots" / "main", "acme/again").commit_id == depot.resolve(REPO)


def test_remove_a_revision_keeps_shared_blobs(depot: Depot, tmp_path: Path, model_dir: Path) -> None:
    main = depot.import_dir(model_dir, REPO)
    dev_dir = write_model_dir(tmp_path / "dev", {**sample_files(), "extra.bin": b"x" * 1000})
    dev = depot.import_dir(dev_dir, REPO, "dev")
    result = depot.remove(REPO, "dev")
    assert result.commits == (dev.commit_id,) and result.blobs_removed == 1 and result.bytes_freed == 1000
    assert depot.repo_info(REPO).refs == {"main": main.commit_id}
    assert not (depot.home / "snapshots" / REPO / dev.commit_id).exists()
    assert depot.remove(REPO).blobs_removed == len(sample_files())
    assert depot.list_repos() == [] and list((depot.home / "blobs").rglob("*.*")) == []
    assert not (depot.home / "snapshots" / "acme").exists()
    with pytest.raises(RepoNotFoundError):
        depot.remove(REPO)


def test_removing_a_branch_that_shares_its_commit_removes_the_branch_alone(
    depot: Depot, model_dir: Path
) -> None:
    """`rm -r v1.0` used to remove the commit v1.0 names, and with it `main` (which named it too)."""
    main = depot.import_dir(model_dir, REPO)
    assert depot.import_dir(model_dir, REPO, "v1.0").commit_id == main.commit_id
    result = depot.remove(REPO, "v1.0")
    assert (result.ref_removed, result.commit_kept_for, result.commits, result.bytes_freed) == (
        "v1.0", ("main",), (), 0)  # fmt: skip
    assert depot.repo_info(REPO).refs == {"main": main.commit_id}
    with pytest.raises(RevisionNotFoundError):
        depot.resolve(REPO, "v1.0")
    assert bytes(depot.get_file(REPO, "config.json")) == sample_files()["config.json"]
    assert depot.remove(REPO, "main").commits == (main.commit_id,)  # the last ref: the commit goes
    assert depot.list_repos() == []


def test_a_commit_is_found_by_the_start_of_its_id(depot: Depot, model_dir: Path, tmp_path: Path) -> None:
    """`info` prints commits abbreviated; `-r 04dcf47` said the revision was not in the store."""
    main = depot.import_dir(model_dir, REPO)
    assert depot.resolve(REPO, main.commit_id[:7]) == main.commit_id
    assert depot.file_info(REPO, "config.json", main.commit_id[:12]).commit_id == main.commit_id
    # In capitals, as git takes it (it was not found)
    assert depot.resolve(REPO, main.commit_id.upper()) == main.commit_id
    assert depot.resolve(REPO, main.commit_id[:9].upper()) == main.commit_id
    assert depot.file_info(REPO, "config.json", main.commit_id.upper()).commit_id == main.commit_id
    with pytest.raises(RevisionNotFoundError):
        depot.resolve(REPO, "0000000" if not main.commit_id.startswith("0000000") else "1111111")
    with pytest.raises(RevisionNotFoundError):
        depot.resolve(REPO, main.commit_id[:6])  # (shorter than git's shortest: a branch name only)
    # A branch named like the start of a commit id would shadow it: no write makes one.
    with pytest.raises(InvalidRevisionError, match="reads as the start of a commit id"):
        depot.import_dir(model_dir, REPO, main.commit_id[:8])
    other = depot.import_dir(write_model_dir(tmp_path / "o", {"a.txt": b"a"}), REPO, "v2")
    assert depot.resolve(REPO, other.commit_id[:8]) == other.commit_id
    # rm by the start of a commit id removes that commit (it took it for a branch and removed nothing)
    assert depot.remove(REPO, other.commit_id[:9]).commits == (other.commit_id,)
    assert depot.remove(REPO, main.commit_id[:7]).commits == (main.commit_id,)
    assert depot.list_repos() == []


def test_gc_frees_orphans_and_abandoned_partials_but_not_live_ones(depot: Depot, model_dir: Path) -> None:
    depot.import_dir(model_dir, REPO)
    orphan = depot.store.blobs.path("ab" * 32)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"o" * 500)
    abandoned = depot.home / "tmp" / "999999-dead"
    abandoned.mkdir()
    (abandoned / "0.partial").write_bytes(b"p" * 300)
    abandoned_bytes = (abandoned / "0.partial").stat().st_blocks * 512  # (what the disk gives back)
    stale_snapshot = depot.home / "snapshots" / "gone" / "repo" / ("1" * 40)
    stale_snapshot.mkdir(parents=True)
    with WriteSession(depot.store.layout) as live:
        live.new_partial(100)
        report = depot.gc()
        assert live.path.exists()
    assert (
        report.blobs_removed,
        report.partials_removed,
        report.snapshots_removed,
        report.kept_partials,
    ) == (1, 1, 1, 1)
    assert report.bytes_freed == 500 + abandoned_bytes and not orphan.exists() and not abandoned.exists()
    assert not stale_snapshot.exists()
    assert depot.verify().ok and store_files_consistent(depot) == []
    assert depot.gc().bytes_freed == 0
    entry = depot.file_info(REPO, "config.json")
    depot.store.quarantine(entry.sha256)  # (found corrupt: kept in quarantine/ for a look, until gc)
    again = depot.gc()
    assert (again.quarantined_removed, again.bytes_freed) == (1, entry.size)  # (gc said "0 blobs")


def test_gc_goes_past_a_session_that_ends_as_it_looks(
    depot: Depot, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write session ends by deleting its folder, then letting go of its lock: gc, looking at that moment,
    read it as abandoned and listed a folder being deleted, and raised a bare FileNotFoundError (beside a
    thread loading models, 18 of 8,308 calls; an explorer's trial). It goes past it."""
    depot.import_dir(model_dir, REPO)
    ending = WriteSession(depot.store.layout)
    ending.new_partial(100)
    from modeldepot.store import maintenance

    looked, modes = WriteSession.is_abandoned, maintenance.give_back_modes

    def read_as_abandoned(session_dir: Path, fresh: float = 0.0) -> bool:
        # (its lock file went with its folder's first entries: no lock is seen held)
        return session_dir == ending.path or looked(session_dir, fresh)

    def ends_as_gc_looks(session_dir: Path) -> dict[Path, tuple[int, int]]:
        found = modes(session_dir)
        if session_dir == ending.path:
            ending.close()
        return found

    monkeypatch.setattr(WriteSession, "is_abandoned", read_as_abandoned)
    monkeypatch.setattr(maintenance, "give_back_modes", ends_as_gc_looks)
    report = depot.gc()
    assert (report.partials_removed, report.kept_partials) == (0, 0) and not ending.path.exists()
    assert depot.verify().ok


def test_chunk_size_is_fixed_per_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Depot(tmp_path / "s", chunk_size=SMALL_CHUNK).close()
    with Depot(tmp_path / "s") as reopened:
        assert reopened.chunk_size == SMALL_CHUNK
    with pytest.raises(ConfigError, match="chunk size is fixed"):
        Depot(tmp_path / "s", chunk_size=2 * SMALL_CHUNK)
    with pytest.raises(ConfigError):
        Depot(tmp_path / "t", chunk_size=10)
    monkeypatch.setenv("MODELDEPOT_CHUNK_SIZE", "1MiB")
    with Depot(tmp_path / "u") as from_env:
        assert from_env.chunk_size == 1 << 20
    # The variable shapes new stores: an older store keeps its own (set in a profile, it made each fail)
    with Depot(tmp_path / "s") as older:
        assert older.chunk_size == SMALL_CHUNK
    with pytest.raises(
        ConfigError, match="chunk size is fixed"
    ):  # (asked for by the program, it is an error)
        Depot(tmp_path / "s", chunk_size=2 * SMALL_CHUNK)
    monkeypatch.setenv("MODELDEPOT_CHUNK_SIZE", "lots")
    with pytest.raises(ConfigError, match="cannot read size"):
        Depot(tmp_path / "v")
    monkeypatch.delenv("MODELDEPOT_CHUNK_SIZE")
    # Written as every size of modeldepot's is (a TypeError from deep inside, in an explorer's trial)
    with Depot(tmp_path / "w", chunk_size="128KiB") as texted:
        assert texted.chunk_size == 128 << 10
    with pytest.raises(ConfigError, match="chunk_size: cannot read size 'lots'"):
        Depot(tmp_path / "x", chunk_size="lots")
    with pytest.raises(ConfigError, match="chunk_size is a number of bytes"):
        Depot(tmp_path / "y", chunk_size=65536.0)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_default_home_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELDEPOT_HOME", str(tmp_path / "env-home"))
    with Depot() as depot:
        assert depot.home == tmp_path / "env-home" and (depot.home / "index.db").exists()
    monkeypatch.delenv("MODELDEPOT_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with Depot() as depot:
        assert depot.home == tmp_path / "xdg" / "modeldepot"


def test_index_is_wal_and_a_newer_schema_is_refused(depot: Depot, home: Path) -> None:
    assert depot.store.index.read("PRAGMA journal_mode")[0][0] == "wal"
    depot.close()
    with sqlite3.connect(home / "index.db") as con:
        con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(StoreSchemaError, match="upgrade modeldepot"):
        Depot(home)


def test_private_flag_is_recorded(depot: Depot, model_dir: Path) -> None:
    depot.import_dir(model_dir, REPO, private=True)
    assert depot.repo_info(REPO).private and depot.list_repos()[0].private


def test_store_id_is_stable_across_opens(home: Path) -> None:
    with Depot(home) as first:
        store_id = first.store_id
    with Depot(home) as again:
        assert again.store_id == store_id and len(store_id) == 32
    with Depot(home.parent / "other") as other:
        assert other.store_id != store_id


def test_a_failed_link_import_gives_the_exact_mode_back_and_another_stores_blob_stays_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ways the write bit given back on `rm` went too far (a review): a failed `import --link` of a 0664
    file left it 0644 (the bit came back before the exact mode could), and `rm` in one store made the same
    file, linked into another store too, writable there."""
    from modeldepot.store import publish

    folder = write_model_dir(tmp_path / "folder", {"a.gguf": os.urandom(SMALL_CHUNK)})
    os.chmod(folder / "a.gguf", 0o664)

    def failing(*_: object, **__: object) -> None:
        raise StoreError("the disk failed")

    with Depot(tmp_path / "failing", chunk_size=SMALL_CHUNK) as depot, monkeypatch.context() as patched:
        patched.setattr(publish, "_commit", failing)
        with pytest.raises(StoreError):
            depot.import_dir(folder, REPO, link=True)
    assert stat.S_IMODE(os.stat(folder / "a.gguf").st_mode) == 0o664
    with Depot(tmp_path / "one", chunk_size=SMALL_CHUNK) as one, \
            Depot(tmp_path / "two", chunk_size=SMALL_CHUNK) as two:  # fmt: skip
        one.import_dir(folder, REPO, link=True)
        two.import_dir(folder, REPO, link=True)
        blob = two.store.blobs.path(two.file_info(REPO, "a.gguf").sha256)
        assert os.stat(blob).st_ino == os.stat(folder / "a.gguf").st_ino
        one.remove(REPO)
        assert stat.S_IMODE(os.stat(blob).st_mode) == 0o444, "the other store's blob stays read-only"
        two.remove(REPO)
    # (the mode it had: the first store noted it on the file, and the second, finding it read-only, read it)
    assert stat.S_IMODE(os.stat(folder / "a.gguf").st_mode) == 0o664, "its owner may write it again"
    assert "user.modeldepot.mode" not in os.listxattr(folder / "a.gguf"), (
        "nothing of the stores is left on it"
    )


def test_a_copied_store_is_another_node(home: Path, model_dir: Path) -> None:
    """`cp -a` of a store (an image with models baked in, run twice) kept the id its node is known by in the
    fleet: the copy's node pushed the original's out (a trial). The node id is the store's on this machine
    at this path: a copy's is its own, and each stays as it is opened again."""
    import shutil

    with Depot(home) as original:
        original.import_dir(model_dir, REPO)
        node_id = original.node_id
    copy = home.parent / "copy"
    shutil.copytree(home, copy, symlinks=True)
    with Depot(copy) as copied, Depot(home) as again:
        assert copied.store_id == again.store_id, "the same store, copied"
        assert copied.node_id != node_id and len(copied.node_id) == 32 and again.node_id == node_id
        assert copied.resolve(REPO)
    with Depot(copy) as reopened:
        assert reopened.node_id == copied.node_id


def test_a_blob_written_since_its_check_is_rehashed_once(
    depot: Depot, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads rehash a blob whose file changed after it was last checked, then record the check: a file
    whose mtime is ahead of the clock (a clock set back) must not make every read rehash it."""
    depot.import_dir(model_dir, REPO)
    entry = depot.file_info(REPO, "model.safetensors")
    blob = depot.store.blobs.path(entry.sha256)
    ahead = time.time() + 3600
    os.utime(blob, (ahead, ahead))
    checks: list[str] = []
    real = depot.store.check_blob
    monkeypatch.setattr(depot.store, "check_blob", lambda *a: checks.append(a[0]) or real(*a))
    for _ in range(3):
        assert bytes(depot.get_file(REPO, "model.safetensors")) == sample_files()["model.safetensors"]
    assert checks == [entry.sha256], "once, then known checked"


def test_a_store_on_a_file_system_machines_share_says_it_is_one_machines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A store on NFS, Lustre or a FUSE mount of another machine is one machine's (its index is SQLite in WAL
    mode; such locks may not hold between machines: huggingface_hub PR#4228). It said nothing. This machine
    has no NFS to mount: the mount table is written as /proc would show such a mount."""
    from modeldepot.store import filesystem

    sample = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"40 22 0:50 / {str(tmp_path).replace(' ', chr(92) + '040')} rw,relatime shared:9 - nfs4 "
        "filer:/export/models rw,vers=4.2\n"
        "41 22 0:51 / /mnt/remote\\040models rw - fuse.sshfs me@host:/m rw\n"
    )
    assert filesystem.mount_of(tmp_path / "home" / "blobs", sample) == (str(tmp_path), "nfs4")
    assert filesystem.shared_filesystem(Path("/mnt/remote models/x"), sample) == (
        "/mnt/remote models",
        "fuse.sshfs",
    )
    assert filesystem.shared_filesystem(Path("/srv/models"), sample) is None, "on the root's ext4"
    table = tmp_path.parent / f"{tmp_path.name}-mountinfo"
    table.write_text(sample)
    monkeypatch.setattr(filesystem, "MOUNTINFO", table)
    with caplog.at_level("WARNING", logger="modeldepot.store.store"):
        for _ in range(2):
            with Depot(tmp_path / "home"):
                pass
    said = [r.getMessage() for r in caplog.records if "several machines may share" in r.getMessage()]
    assert len(said) == 1, "once per process"
    assert "on nfs4" in said[0] and "MODELDEPOT_SERVERS" in said[0] and "modeldepot serve" in said[0]


def test_the_listing_kept_of_an_import_goes_with_the_import(depot: Depot, tmp_path: Path) -> None:
    """An imported repo that lost a variant (`rm --quant`: its listing is kept, to list the commit whole)
    and was then removed stayed in `status`, the manifest route and the dashboard for good, "scanned, not
    in the store yet", with Pull buttons answering 404 and a removal answering 404 too (a trial)."""
    files = {"config.json": b"{}", "onnx/model.onnx": b"a" * 3000, "onnx/model_fp16.onnx": b"b" * 2000}
    for removal in ("repo", "revision"):
        commit = depot.import_dir(write_model_dir(tmp_path / removal, files), "acme/imp").commit_id
        depot.remove("acme/imp", quant="fp16")
        assert [m.repo_id for m in depot.list_manifests()] == ["acme/imp"]
        depot.remove("acme/imp", commit if removal == "revision" else None)
        assert depot.list_manifests() == [] and depot.list_repos() == []
        with pytest.raises(LookupError, match="not been scanned"):
            depot.get_manifest("acme/imp")


def test_a_variant_is_named_as_status_names_it_whatever_else_the_store_holds(
    depot: Depot, tmp_path: Path
) -> None:
    """A repo of fp16 in two kinds: status names them onnx-fp16 and safetensors-fp16 (the commit's listing), but
    once the store held one of them, pin, rm --quant and preload refused that name ("it has: fp16") and took
    "fp16", a name status never shows (an explorer's trial). Either name is taken while it names one variant;
    a pin keeps the kind's name typed; a name of two variants is refused, naming both."""
    from modeldepot.preload import Preloader

    files = {"onnx/model.onnx": os.urandom(SMALL_CHUNK), "onnx/model_fp16.onnx": os.urandom(SMALL_CHUNK),
             "model.safetensors": os.urandom(SMALL_CHUNK), "model.fp16.safetensors": os.urandom(SMALL_CHUNK),
             "config.json": b"{}"}  # fmt: skip
    depot.import_dir(write_model_dir(tmp_path / "m", files), "acme/two-kinds")
    with pytest.raises(NotFoundError, match=r"onnx-fp16, .*safetensors-fp16|safetensors-fp16, .*onnx-fp16"):
        depot.pin("acme/two-kinds", quant="fp16")
    depot.remove("acme/two-kinds", quant="onnx-fp16")
    pin = depot.pin("acme/two-kinds", quant="safetensors-fp16")
    assert pin.quant == "safetensors-fp16"
    preloader = Preloader(depot, budget="1GiB")
    try:
        assert preloader.preload("acme/two-kinds", "safetensors-fp16").files == 2  # (its file and the config)
    finally:
        preloader.close()
    depot.remove("acme/two-kinds", quant="safetensors-fp16")
    assert not depot.has_file("acme/two-kinds", "model.fp16.safetensors")
    assert depot.pins("acme/two-kinds") == [], "the pin of what was removed went with it"
    # A pin of "fp16" made while one kind was held keeps both kinds once main holds both: removing one kind
    # leaves the pin, which still names the other (it went with it: a review)
    onnx = {"onnx/model_fp16.onnx": os.urandom(SMALL_CHUNK), "config.json": b"{}"}
    depot.import_dir(write_model_dir(tmp_path / "one", onnx), "acme/pinned")
    depot.pin("acme/pinned", quant="fp16")
    both = {**onnx, "model.fp16.safetensors": os.urandom(SMALL_CHUNK)}
    depot.import_dir(write_model_dir(tmp_path / "both", both), "acme/pinned")
    depot.remove("acme/pinned", quant="safetensors-fp16")
    assert [p.quant for p in depot.pins("acme/pinned")] == ["fp16"]


def test_rm_quant_removes_one_variants_own_files_and_keeps_the_rest(depot: Depot, tmp_path: Path) -> None:
    """A GGUF repo with several quantizations held all of them until the whole revision went: pinning one
    kept them all, and nothing removed just one."""
    from click.testing import CliRunner

    from modeldepot.cli import cli

    files = {
        "README.md": b"# tiny\n",
        "config.json": b"{}",
        "tiny-Q4_K_M.gguf": os.urandom(2 * SMALL_CHUNK + 3),
        "tiny-Q8_0.gguf": os.urandom(3 * SMALL_CHUNK + 5),
        "sub/tiny-F16.gguf": os.urandom(SMALL_CHUNK),
        "mmproj-tiny-f16.gguf": os.urandom(SMALL_CHUNK + 1),  # every GGUF variant needs the projector
    }
    repo = "acme/tiny-GGUF"
    commit = depot.import_dir(write_model_dir(tmp_path / "g", files), repo).commit_id
    snapshot = depot.snapshot_path(repo)
    q8 = depot.file_info(repo, "tiny-Q8_0.gguf").sha256
    result = depot.remove(repo, quant="q8_0")  # (a variant's name in any case)
    assert result.files_removed == ("tiny-Q8_0.gguf",) and result.bytes_freed == len(files["tiny-Q8_0.gguf"])
    assert not depot.store.blobs.path(q8).exists()
    assert depot.resolve(repo) == commit, "the revision stays"
    assert {e.path for e in depot.list_files(repo)} == set(files) - {"tiny-Q8_0.gguf"}
    assert not (snapshot / "tiny-Q8_0.gguf").exists() and (snapshot / "tiny-Q4_K_M.gguf").exists()
    assert depot.get_file(repo, "mmproj-tiny-f16.gguf") == files["mmproj-tiny-f16.gguf"], "the others need it"
    assert depot.get_file(repo, "config.json") == files["config.json"]
    runner = CliRunner()
    home = str(depot.home)
    done = runner.invoke(cli, ["rm", repo, "--quant", "F16", "--yes", "--home", home])
    assert done.exit_code == 0 and "1 file of a revision that stays" in done.output, done.output
    assert not (snapshot / "sub").exists(), "the folder it emptied goes too"
    missing = runner.invoke(cli, ["rm", repo, "--quant", "Q2_K", "--yes", "--home", home])
    assert (
        missing.exit_code == 1 and "holds no variant 'Q2_K'" in missing.output and "Q4_K_M" in missing.output
    )
    asked = runner.invoke(cli, ["rm", repo, "--quant", "Q4_K_M", "--home", home], input="n\n")
    assert asked.exit_code == 2 and "the Q4_K_M files of" in asked.output, asked.output
    empty = runner.invoke(cli, ["rm", repo, "--quant", " ", "--yes", "--home", home])
    assert empty.exit_code == 2 and "variant's name" in empty.output, empty.output
    depot.pin(repo, "Q4_K_M")
    depot.remove(repo, quant="Q4_K_M")  # a pin of what is gone would keep nothing: it goes too
    assert depot.pins(repo) == []
    assert depot.verify().ok and store_files_consistent(depot) == []


def test_uses_in_a_process_that_never_closes_its_depot_are_recorded(depot: Depot, model_dir: Path) -> None:
    """A worker that loads models and exits without closing its Depot (as the README's examples do) recorded
    none of its uses: `stats` and `serve --preload-top` never saw them."""
    import subprocess
    import sys

    depot.import_dir(model_dir, REPO)
    script = (
        "import sys\nfrom modeldepot import Depot\nd = Depot(sys.argv[1])\n"
        f"for _ in range(3):\n    d.get_file({REPO!r}, 'onnx/model_q4.onnx')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(depot.home)], check=True, timeout=60)
    counts = {(a.repo_id, a.variant): a.count for a in depot.store.access.top()}
    assert counts.get((REPO, "q4")) == 3, counts


def test_a_depot_sent_to_another_process_says_what_to_do(tmp_path: Path) -> None:
    """Handing a Depot to a spawned worker (a ProcessPoolExecutor's, the default on macOS) failed with
    pickle's "cannot pickle '_thread._local' object", which named an internal and not what to do (an
    explorer's trial)."""
    import multiprocessing
    import pickle

    with Depot(tmp_path / "store") as depot:
        with pytest.raises(TypeError, match=r"open Depot\(home\) there"):
            pickle.dumps(depot)
        with (
            multiprocessing.get_context("spawn").Pool(1) as pool,
            pytest.raises(TypeError, match="pass its home"),
        ):
            pool.apply(len, (depot,))


def test_the_users_own_cache_store_is_made_theirs_alone_a_named_one_keeps_its_mode(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blobs take the umask's mode (0444, a private repo's too) and the index names the repos: in a cache
    store made 0755, any local user read them (a security trial). The user's own cache store is made 0700,
    as the XDG spec makes a user's cache; a folder named for a store (a team's, a service's) keeps its mode."""
    import stat

    from modeldepot.store.layout import current_umask

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MODELDEPOT_HOME", raising=False)
    with Depot() as depot:
        depot.import_dir(model_dir, REPO)
        assert depot.home == tmp_path / "cache" / "modeldepot"
    assert stat.S_IMODE((tmp_path / "cache" / "modeldepot").stat().st_mode) == 0o700
    with Depot(tmp_path / "team") as team:
        team.import_dir(model_dir, REPO)
    assert stat.S_IMODE((tmp_path / "team").stat().st_mode) == 0o777 & ~current_umask()


def test_an_import_says_which_files_are_links_to_files_outside_its_folder(
    depot: Depot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A clone whose tokenizer.json linked to its user's SSH key was imported, the key served to anyone, the
    import silent (an explorer's trial). Such links are still followed (users link weights kept elsewhere,
    and a Hugging Face cache's snapshot is made of links to its blobs, said nothing of), and said."""
    secret = write_model_dir(tmp_path / "home" / ".ssh", {"id_rsa": b"-----BEGIN KEY-----"}) / "id_rsa"
    folder = write_model_dir(tmp_path / "clone", {"config.json": b"{}", "inside.json": b"[]"})
    (folder / "tokenizer.json").symlink_to(secret)
    (folder / "again.json").symlink_to("inside.json")  # (inside the folder: nothing to say)
    cache = tmp_path / "hub" / "models--acme--x"
    blob = write_model_dir(cache / "blobs", {"0" * 40: b"weights"}) / ("0" * 40)
    (folder / "weights.bin").symlink_to(blob)  # (a cache's blob: nothing to say)
    with caplog.at_level(logging.WARNING, logger="modeldepot.store.importer"):
        depot.import_dir(folder, REPO)
    said = [r.getMessage() for r in caplog.records if "outside it" in r.getMessage()]
    assert (
        len(said) == 1 and "1 file of it is a link to a file outside it, imported as its bytes" in said[0]
    ), said
    assert (
        f"tokenizer.json -> {secret}" in said[0] and "again.json" not in said[0] and "weights" not in said[0]
    )


def test_a_pulls_takes_file_is_never_seen_unlocked(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc ran between a takes file's creation and its lock, deleted it as a killed pull's, and `rm -q` of
    the variant that pull took went through (another pull of the process said what it took: a review's
    trial). The file is named as a pull's once it is locked."""
    import fcntl

    import modeldepot.store.partials as partials_module
    from modeldepot.errors import PullRunningError

    files = {
        "config.json": b"{}",
        "model-Q4_K_M.gguf": b"GGUF" + bytes(60),
        "model-Q8_0.gguf": b"GGUF" + bytes(90),
    }
    depot.import_dir(write_model_dir(tmp_path / "m", files), "acme/quants")
    partials = depot.store.partials
    real = partials_module.take_flock
    armed = [False]

    def racing(fd: int, flags: int) -> None:
        if flags == fcntl.LOCK_EX and armed[0]:  # (the takes file's lock)
            armed[0] = False
            partials.collect(False)  # (a gc right then)
        real(fd, flags)

    monkeypatch.setattr(partials_module, "take_flock", racing)
    with partials.pulling("acme/quants", ["config.json", "model-Q4_K_M.gguf"]):
        armed[0] = True
        with partials.pulling("acme/quants", ["config.json", "model-Q8_0.gguf"]):
            assert partials.pulls_take("acme/quants") == {
                "config.json",
                "model-Q4_K_M.gguf",
                "model-Q8_0.gguf",
            }
            with pytest.raises(PullRunningError):
                depot.remove("acme/quants", quant="Q8_0")
    assert not list(partials.root.glob("*.takes")) and not list(partials.root.glob(".*.takes"))
