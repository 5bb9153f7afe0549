"""Deferred durability (store/durability.py): imports and pulls publish once verified, flush in the
background, and a power loss is detected (another boot id) and healed: no corrupt byte is ever served.

A power loss is simulated as the kernel would leave the disk: the store reopened under another boot id
(``MODELDEPOT_BOOT_ID``), with the blobs that were never flushed truncated, zeroed or missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SMALL_CHUNK, LiveNode, wait_until, writable, write_model_dir
from modeldepot import Depot
from modeldepot.cli import cli
from modeldepot.errors import CorruptBlobError, StoreError

FILES = {
    "config.json": b'{"model_type": "bert"}',
    "a.safetensors": os.urandom(3 * SMALL_CHUNK + 17),
    "b.safetensors": os.urandom(5 * SMALL_CHUNK),
    "c.safetensors": os.urandom(2 * SMALL_CHUNK + 1),
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def marks(depot: Depot) -> dict[str, str | None]:
    rows = depot.store.index.read("SELECT sha256, unflushed_boot FROM blobs")
    return {row["sha256"]: row["unflushed_boot"] for row in rows}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model", FILES)


def test_deferred_imports_publish_at_once_and_flush_in_the_background(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "boot-one")
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/m")
        assert set(marks(depot).values()) <= {"boot-one", None}
        assert depot.get_file("acme/m", "a.safetensors") == FILES["a.safetensors"]  # readable at once
        wait_until(lambda: set(marks(depot).values()) == {None}, 30, "the background flush")
    # sync mode: durable before it is published
    monkeypatch.setenv("MODELDEPOT_DURABILITY", "sync")
    with Depot(tmp_path / "sync-store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/m")
        assert set(marks(depot).values()) == {None}


def test_sync_waits_until_everything_is_durable(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "boot-one")
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/m")
    # The process ended before its background flush (a CLI import): the next one flushes on `sync`.
    with Depot(home) as depot:
        assert any(marks(depot).values())
    done = CliRunner().invoke(cli, ["sync", "--json", "--home", str(home)])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["flushed"] >= 1
    with Depot(home) as depot:
        assert set(marks(depot).values()) == {None}
        assert depot.sync() == 0
    again = CliRunner().invoke(cli, ["sync", "--home", str(home)])
    assert again.exit_code == 0 and "already on disk" in again.stdout


def test_a_process_that_opens_the_store_flushes_what_an_ended_one_left(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CLI import ends before its background flush; a process that opens the store later and stays
    (a node, a notebook reading the model) flushes those blobs, as the docs say. It never did: they stayed
    unflushed until a `modeldepot sync`."""
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "boot-one")
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/m")
    with Depot(home) as depot:
        assert any(marks(depot).values())
        wait_until(lambda: set(marks(depot).values()) == {None}, 30, "the flush of what the import left")


def power_loss(depot: Depot) -> dict[str, str]:
    """What a power loss may leave of three unflushed blobs: one truncated, one zeroed, one missing; the
    fourth (the config) survived. Returns what happened to each file, by path."""
    entries = {e.path: e for e in depot.list_files("acme/m")}
    damage = {"a.safetensors": "truncated", "b.safetensors": "zeroed", "c.safetensors": "missing"}
    for path, how in damage.items():
        blob = depot.store.blobs.path(entries[path].sha256)
        with writable(blob):
            if how == "truncated":
                os.truncate(blob, SMALL_CHUNK)
            elif how == "zeroed":
                blob.write_bytes(bytes(blob.stat().st_size))
        if how == "missing":
            blob.unlink()
    return damage


def after_a_power_loss(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, dict[str, str]]:
    """A store that imported ``folder`` as acme/m, never flushed, then lost its power (:func:`power_loss`),
    and the machine started again: its home, and what happened to each damaged file."""
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "before-the-outage")
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/m")
        damage = power_loss(depot)
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "after-the-outage")
    return home, damage


def test_a_power_loss_never_serves_a_corrupt_byte_and_the_store_heals(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "before-the-outage")
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/m")
        assert set(marks(depot).values()) == {"before-the-outage"}  # nothing flushed yet: the loss may bite
        damage = power_loss(depot)

    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "after-the-outage")
    with Depot(home) as depot:
        assert depot.store.durability.unchecked() == len(FILES)
        # Every read path checks an unchecked blob first: a local read ...
        with pytest.raises(CorruptBlobError):
            depot.get_file("acme/m", "a.safetensors")
        # ... a path for an engine ...
        with pytest.raises(CorruptBlobError):
            depot.file_path("acme/m", "b.safetensors")
        # ... and the node's routes (the Hub's resolve): 503, never the zeros or the short file.
        node = LiveNode(depot)
        try:
            for path in damage:
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(f"{node.url}/acme/m/resolve/main/{path}", timeout=30)
                refused.value.close()
                assert refused.value.code in (404, 503), path
            with urllib.request.urlopen(f"{node.url}/acme/m/resolve/main/config.json", timeout=30) as answer:
                assert answer.read() == FILES["config.json"]  # intact: checked, then served
        finally:
            node.stop()
        wait_until(lambda: depot.store.durability.unchecked() == 0, 30, "the background check")
        states = {r["sha256"]: (r["state"], r["unflushed_boot"])
                  for r in depot.store.index.read("SELECT sha256, state, unflushed_boot FROM blobs")}  # fmt: skip
        assert states[sha(FILES["config.json"])] == ("ok", None)  # checked and now durable
        for path in damage:
            assert states[sha(FILES[path])][0] == "quarantined", path
        # The store heals: the next import (or pull) of the same files brings them back.
        depot.import_dir(folder, "acme/m")
        for path, data in FILES.items():
            assert depot.get_file("acme/m", path) == data
        assert depot.verify().ok


def test_verify_after_a_power_loss_checks_each_blob_once_with_the_stores_own_check(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify` after a reboot rehashed the blobs the store's background check was rehashing too (two reads
    of a big store), reported those the thread had quarantined first as "missing", and left what it found
    good unchecked for the next process to read again (an explorer's trial). It checks an unchecked blob
    through the store's own check: each damaged one is said to have been found corrupt after the restart,
    and every good one is recorded checked and durable."""
    home, damage = after_a_power_loss(tmp_path, folder, monkeypatch)
    with Depot(home) as depot:
        report = depot.verify()
        kinds = {problem.sha256: problem.problem for problem in report.problems}
        assert set(kinds) == {sha(FILES[path]) for path in damage}, report.problems
        assert set(kinds.values()) <= {"restart", "quarantined"}, report.problems
        assert marks(depot)[sha(FILES["config.json"])] is None, "checked, and recorded durable"
        assert depot.store.durability.unchecked() == 0


@pytest.mark.parametrize("store_kind", ["writable", "read-only"])
def test_sync_after_a_power_loss_names_the_files_found_corrupt_and_fails(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, store_kind: str
) -> None:
    """A boot script's `sync --json` said `"checked": 3`, exit 0, of three files the power loss had torn
    (an explorer's trial on an edge box): nothing told it the store had lost them. A read-only store's finds
    are refused in memory, not marked in its index: said all the same (review 41)."""
    from modeldepot.store.layout import StoreLayout

    home, damage = after_a_power_loss(tmp_path, folder, monkeypatch)
    if store_kind == "read-only":
        monkeypatch.setattr(StoreLayout, "read_only_reason", lambda self: "read-only for this test")
    done = CliRunner().invoke(cli, ["sync", "--json", "--home", str(home)])
    assert done.exit_code == 1, done.output
    said = json.loads(done.stdout)
    assert sorted(path.rsplit("/", 1)[1] for path in said["corrupt"]) == sorted(damage), said
    human = CliRunner().invoke(cli, ["sync", "--home", str(home)])
    assert human.exit_code == 1 and f"corrupt: {len(damage)} file" in human.stderr, human.stderr
    assert ("where the store is writable" in human.stderr) == (store_kind == "read-only"), human.stderr


def test_verify_after_a_restart_goes_on_when_the_disk_is_too_full_to_record_its_checks(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's own check records a blob durable, an index write: on a full disk its StoreFullError
    escaped `verify` (a review), which went on without recording before (the disk full after a power loss
    is a likely time to run it). It goes on, and says the store is sound."""
    from modeldepot.errors import StoreFullError
    from modeldepot.store import durability as durability_module
    from modeldepot.store.index import Index

    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "before-the-outage")
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/m")
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "after-the-outage")
    monkeypatch.setattr(durability_module.Durability, "_start", lambda self: None)  # (no background check)
    write = Index.write

    @contextlib.contextmanager
    def full(self: Index, doing: str, *args: object, **kwargs: object) -> Iterator[object]:
        if doing in ("recording blobs as durable", "recording a verification"):
            raise StoreFullError(f"no space left while {doing}")
        with write(self, doing, *args, **kwargs) as con:  # type: ignore[arg-type]
            yield con

    monkeypatch.setattr(Index, "write", full)
    with Depot(tmp_path / "store") as depot:
        assert depot.store.durability.unchecked() == len(FILES)
        report = depot.verify()
        assert report.ok and report.blobs_checked == len(FILES), report


@pytest.mark.parametrize("setting", ["MODELDEPOT_DURABILITY", "MODELDEPOT_PRELOAD_STRATEGY"])
def test_settings_are_checked_when_the_store_opens(
    setting: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(The preload strategy was read at the first preload only: `serve` started, and its /metrics and
    /stats answered 500.)"""
    monkeypatch.setenv(setting, "sometimes")
    done = CliRunner().invoke(cli, ["ls", "--home", str(tmp_path / "s")])
    assert done.exit_code == 2 and setting in done.output


def test_only_a_store_that_flushes_before_publishing_starts_writeback_during_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Early writeback shortens the flush before a publish (sync); deferred durability flushes after it,
    and writeback during the download would only slow the pull down (docs/benchmarks.md, issue 14)."""
    for mode, expected in (("deferred", False), ("sync", True)):
        monkeypatch.setenv("MODELDEPOT_DURABILITY", mode)
        with Depot(tmp_path / mode, chunk_size=SMALL_CHUNK) as depot:
            partial = depot.store.partials.claim("ab" * 32, 2 * SMALL_CHUNK, SMALL_CHUNK, wait=False)
            assert partial is not None
            try:
                assert partial.writeback is expected, mode
            finally:
                partial.release(completed=False)


def test_after_a_power_loss_a_writer_places_its_own_bytes_over_an_unchecked_blob(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import after a power loss took a damaged blob, not checked yet, as held: it threw its own verified
    copy away and reported success for a repo it could not read. A pull's look for what the store holds
    did the same."""
    home, damage = after_a_power_loss(tmp_path, folder, monkeypatch)
    with Depot(home) as depot:
        depot.store.durability.close()  # (no background check: the writers meet the blobs unchecked)
        assert depot.store.durability.unchecked() == len(FILES)
        # A pull asks what the store holds: a damaged blob is checked first, and found lacking.
        assert depot.store.local_digest(sha256=sha(FILES["a.safetensors"])) is None
        assert depot.store.local_digest(sha256=sha(FILES["config.json"])) is not None
        # An import of the same bytes (another repo) places them over the unchecked blobs.
        depot.import_dir(folder, "acme/copy")
        for path, data in FILES.items():
            assert depot.get_file("acme/copy", path) == data, path
            assert depot.get_file("acme/m", path) == data, f"{path} ({damage.get(path, 'intact')}) healed"
        assert depot.verify().ok


def test_the_flusher_never_marks_durable_a_blob_published_again_after_its_flush(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background flush fsyncs a batch, then records it durable by SHA-256. An `rm` and an import of
    the same bytes between the two made a new file, never fsynced, that the record then covered: after a
    power loss it was served unchecked. The interleaving is played in order here."""
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "this-boot")
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        durability = depot.store.durability
        durability.close()  # (the test plays the flusher's steps itself)
        depot.import_dir(folder, "acme/m")
        batch = durability.pending()
        durability._flush_files([sha256 for sha256, _ in batch])  # the flush of the first placement ...
        depot.remove("acme/m")  # ... then an rm and an import beside it ...
        depot.import_dir(folder, "acme/again")
        durability._mark_durable(batch, "this-boot")  # ... then the flusher's record
        assert set(marks(depot).values()) == {"this-boot"}, "the new placement still waits for its flush"
        assert durability.sync() == len(FILES)
        assert set(marks(depot).values()) == {None}


@contextlib.contextmanager
def unflushed_import(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    """A store under boot "boot-one" that imported ``folder`` as acme/m, with its background flusher stopped:
    every blob is unflushed until the test flushes it."""
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "boot-one")
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.store.durability.close()
        depot.import_dir(folder, "acme/m")
        yield depot


class FsyncLog:
    """Every inode ``os.fsync`` made durable (and, with ``fail``, a write-back error for some): what a
    power loss may take is then known, file by file, as the kernel would know it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inodes: set[int] = set()
        self.fail: set[int] = set()  # inodes whose next fsync reports EIO (once, as the kernel does)
        real = os.fsync

        def fsync(fd: int) -> None:
            inode = os.fstat(fd).st_ino
            if inode in self.fail:
                self.fail.discard(inode)
                raise OSError(5, "Input/output error")
            real(fd)
            self.inodes.add(inode)

        monkeypatch.setattr(os, "fsync", fsync)


def test_a_writer_placing_over_a_blob_another_made_durable_makes_its_own_bytes_durable_first(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers look at the index before they place (the shared lock lets two do it at once). One that looked
    before another's commit and flush renamed its unflushed copy over the flushed blob and was killed
    before its own commit: the row said durable, the file was never fsynced, and after a power loss its
    zeros were served unchecked (found by a review; played in order here)."""
    import modeldepot.store.publish as publish_module

    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "boot-one")
    home = tmp_path / "store"
    first, late = Depot(home, chunk_size=SMALL_CHUNK), Depot(home)
    first.store.durability.close()
    late.store.durability.close()
    fsynced = FsyncLog(monkeypatch)
    real_states, real_commit = publish_module.blob_states, publish_module._commit
    looked = []

    def stale_look(index: object, digests: list[str], boot: str | None = None) -> dict[str, str]:
        states = real_states(index, digests, boot)  # type: ignore[arg-type]
        if index is late.store.index and not looked:
            looked.append(states)  # the late writer has looked: the first one commits and flushes now
            first.import_dir(folder, "acme/first")
            assert first.sync() == len(FILES)
        return states

    def killed(index: object, *args: object) -> object:
        if index is late.store.index:
            raise SystemExit("killed before its commit")
        return real_commit(index, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(publish_module, "blob_states", stale_look)
    monkeypatch.setattr(publish_module, "_commit", killed)
    with pytest.raises(SystemExit):
        late.import_dir(folder, "acme/late")
    monkeypatch.setattr(publish_module, "_commit", real_commit)
    assert looked and not any(state == "ok" for state in looked[0].values())
    durable = [sha256 for sha256, boot in marks(first).items() if boot is None]
    assert len(durable) == len(FILES)
    for sha256 in durable:  # every file whose row says durable was fsynced, whoever placed it last
        assert first.store.blobs.path(sha256).stat().st_ino in fsynced.inodes, sha256[:12]
    # A power loss takes what was never fsynced: nothing the rows call durable.
    for sha256 in durable:
        blob = first.store.blobs.path(sha256)
        if blob.stat().st_ino not in fsynced.inodes:
            with writable(blob):
                blob.write_bytes(bytes(blob.stat().st_size))
    first.close()
    late.close()
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "boot-two")
    with Depot(home) as depot:
        for path, data in FILES.items():
            assert depot.get_file("acme/first", path) == data, path


def test_a_quarantine_cut_short_leaves_nothing_taken_as_held(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quarantining moves the file, then marks the row. Cut between the two (a kill; a full disk refusing
    the index write), the row said good and named no file: an import of the same bytes placed nothing
    ("0 new blobs") and made a repo it could not read, and a pull took the blob as held."""
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "boot-one")
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/m")
        index = depot.store.index
        real_write = index.write

        def full_disk(doing: str = "writing the index") -> object:
            if doing == "quarantining a blob":
                raise SystemExit("killed before the row was written")
            return real_write(doing)

        a, b = sha(FILES["a.safetensors"]), sha(FILES["b.safetensors"])
        monkeypatch.setattr(index, "write", full_disk)
        for blob in (a, b):
            with pytest.raises(SystemExit):
                depot.store.quarantine(blob)
        monkeypatch.setattr(index, "write", real_write)
        assert {r["state"] for r in index.read("SELECT state FROM blobs")} == {"ok"}
        assert not depot.store.blobs.path(a).exists()
        # An import of the same bytes places them again ...
        result = depot.import_dir(folder, "acme/again")
        assert result.new_blobs == 2
        for path, data in FILES.items():
            assert depot.get_file("acme/again", path) == data, path
            assert depot.get_file("acme/m", path) == data, path
        # ... and a pull's look for what the store holds takes a missing file as missing.
        with writable(depot.store.blobs.path(b)):
            pass
        depot.store.blobs.path(b).unlink()
        assert depot.store.local_digest(sha256=b) is None
        assert index.read("SELECT state FROM blobs WHERE sha256 = ?", (b,))[0]["state"] == "quarantined"


def test_a_blob_whose_flush_failed_is_quarantined_not_recorded_durable(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel reports a write-back error to one fsync: the flusher's retry 5 s later succeeded and
    recorded as durable a blob whose bytes never reached the disk (a review found it). Reading it back
    proves nothing either (the cache answers, and dropping it spares what a preload maps): such a blob is
    quarantined, `sync` says so, and the next import or pull places it again."""
    with unflushed_import(tmp_path, folder, monkeypatch) as depot:
        durability = depot.store.durability
        target = sha(FILES["b.safetensors"])
        fsynced = FsyncLog(monkeypatch)
        fsynced.fail.add(depot.store.blobs.path(target).stat().st_ino)
        with pytest.raises(StoreError, match="could not be made durable"):
            durability.sync()
        state = depot.store.index.read("SELECT state FROM blobs WHERE sha256 = ?", (target,))[0]["state"]
        assert state == "quarantined"
        assert {s: m for s, m in marks(depot).items() if s != target} == {
            sha(data): None for path, data in FILES.items() if path != "b.safetensors"
        }
        with pytest.raises(CorruptBlobError):
            depot.get_file("acme/m", "b.safetensors")
        assert durability.sync() == 0  # (the retry has nothing left to trust)
        depot.import_dir(folder, "acme/again")  # placed again, whole
        assert depot.get_file("acme/m", "b.safetensors") == FILES["b.safetensors"]
        assert durability.sync() == 1 and set(marks(depot).values()) == {None}


def test_a_flush_failing_in_one_thread_is_not_trusted_by_another(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background flush met a write-back error; a `Depot.sync()` on another thread, whose fsync of the
    same blob then succeeded, recorded it durable before the first had dealt with it (a review). One flush
    runs at a time now: the second waits, and finds the blob quarantined."""
    import threading

    with unflushed_import(tmp_path, folder, monkeypatch) as depot:
        durability = depot.store.durability
        target = sha(FILES["a.safetensors"])
        inode = depot.store.blobs.path(target).stat().st_ino
        real = os.fsync
        seen_by_the_other: list[str | None] = []
        failed = []

        def quietly_sync() -> None:
            with contextlib.suppress(StoreError):
                durability.sync()

        def fsync(fd: int) -> None:
            if os.fstat(fd).st_ino == inode and not failed:
                failed.append(fd)
                other = threading.Thread(target=quietly_sync)
                other.start()
                other.join(1.0)  # the other flush, meanwhile
                seen_by_the_other.append(marks(depot)[target])
                raise OSError(5, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(StoreError):
            durability.sync()
        assert seen_by_the_other == ["boot-one"], "the other flush recorded it durable meanwhile"
        state = depot.store.index.read("SELECT state FROM blobs WHERE sha256 = ?", (target,))[0]["state"]
        assert state == "quarantined"


def test_a_folder_whose_flush_failed_keeps_its_blobs_marked(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error flushing a blob's folder raised out of the flush halfway, a bare OSError, and lost which
    blob had failed (a review): now the blobs of that folder keep their mark (a lost entry is found
    missing after a power loss, never read as good), `sync` says so, and the next flush records them."""
    with unflushed_import(tmp_path, folder, monkeypatch) as depot:
        durability = depot.store.durability
        target = sha(FILES["c.safetensors"])
        fsynced = FsyncLog(monkeypatch)
        fsynced.fail.add(depot.store.blobs.path(target).parent.stat().st_ino)
        with pytest.raises(StoreError, match="could not be made durable"):
            durability.sync()
        assert marks(depot)[target] == "boot-one"
        assert depot.get_file("acme/m", "c.safetensors") == FILES["c.safetensors"]
        assert durability.sync() >= 1 and set(marks(depot).values()) == {None}


def test_without_a_boot_id_every_blob_is_durable_before_it_is_published(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deferred durability tells a power loss by the kernel's boot id. Where there is none (another
    system, a sandbox hiding /proc), its stand-in never changed, so unflushed blobs were trusted after a
    power loss: now such a store writes durably, as under MODELDEPOT_DURABILITY=sync."""
    import modeldepot.store.durability as durability_module

    monkeypatch.delenv("MODELDEPOT_BOOT_ID", raising=False)
    monkeypatch.setattr(durability_module, "BOOT_ID_PATH", tmp_path / "no-such-file")
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        assert not depot.store.durability.deferred
        depot.import_dir(folder, "acme/m")
        assert set(marks(depot).values()) == {None}


def test_sync_makes_the_snapshot_folders_durable_too(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`modeldepot sync` flushed the blobs alone: a snapshot's links were left to the file system's own
    ordering (btrfs logs each file's fsync apart), and a path kept from before a power loss could name none."""
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "boot-one")
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.store.durability.close()
        depot.import_dir(folder, "acme/m")
        fsynced = FsyncLog(monkeypatch)
        depot.sync()
        snapshot = depot.snapshot_path("acme/m")
        for made in (snapshot, snapshot.parent, snapshot.parent.parent):
            assert made.stat().st_ino in fsynced.inodes, made


def test_a_store_closed_while_its_background_check_quarantines_waits_for_the_row(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short command that ended while its background check quarantined a blob left the file moved and the
    row saying good: the next read said "its file is missing" of a truncated blob (an explorer's trial).
    Closing the store waits for a quarantine under way."""
    import threading

    from modeldepot.store.blobs import BlobFiles

    home, _ = after_a_power_loss(tmp_path, folder, monkeypatch)
    moved = threading.Event()
    real_quarantine = BlobFiles.quarantine

    def slow_quarantine(self: BlobFiles, sha256: str) -> Path | None:
        found = real_quarantine(self, sha256)
        if found is not None:  # (a missing blob's file has nothing to move)
            moved.set()
            time.sleep(0.5)  # (the file is moved; the row is written after this)
        return found

    monkeypatch.setattr(BlobFiles, "quarantine", slow_quarantine)
    depot = Depot(home)  # (its background check starts at once)
    try:
        wait_until(moved.is_set, 30, "the background check to quarantine a blob")
    finally:
        depot.close()
    # The index is read without opening a Depot: a Depot's own background check would go on quarantining
    # the blobs this one left unchecked, and race the read (a CI run caught it mid-quarantine).
    index = sqlite3.connect(f"file:{home / 'index.db'}?mode=ro", uri=True)
    try:
        quarantined = {r[0] for r in index.execute("SELECT sha256 FROM blobs WHERE state = 'quarantined'")}
    finally:
        index.close()
    in_quarantine = {p.name[:64] for p in (home / "quarantine").iterdir()}
    assert in_quarantine and in_quarantine <= quarantined, (in_quarantine, quarantined)


def test_closing_the_store_waits_for_a_quarantine_under_way_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quarantine waits for the store's lock, which another process stopped with Ctrl-Z may hold for good:
    a close that waited for it hung with it (a review)."""
    from modeldepot.store import durability

    monkeypatch.setattr(durability, "QUARANTINE_WAIT", 0.3)
    depot = Depot(tmp_path / "store")
    stuck = depot.store.durability._quarantining
    stuck.acquire()  # (a quarantine under way, waiting on that lock)
    try:
        began = time.monotonic()
        depot.close()
        assert time.monotonic() - began < 5
    finally:
        stuck.release()
