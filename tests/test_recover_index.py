"""`modeldepot recover-index`: a damaged index made whole again from what SQLite can still read of it.

The advice a damaged index printed (`sqlite3 index.db .recover`) failed with Debian 12's sqlite3 even on a
healthy index, and the sqlite3 shell is seldom installed (an explorer's trial). The damage here is real: a
page of the index's file overwritten, as a disk's bad sector leaves it."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_model_dir
from modeldepot import Depot
from modeldepot.cli import cli
from modeldepot.errors import IndexDamagedError, StoreError
from modeldepot.recovery import recover_index
from modeldepot.store import salvage
from modeldepot.store.layout import StoreLayout
from modeldepot.store.salvage import salvage_index

PAGE = 4096
REPOS = [f"acme/model-{n:02d}" for n in range(12)]


def store_with_many_rows(tmp_path: Path) -> Path:
    """A store of 12 repos of 60 small files each: its `files` table spans many pages."""
    home = tmp_path / "store"
    with Depot(home) as depot:
        for n, repo in enumerate(REPOS):
            files = {f"part/{i:03d}-{'x' * 40}.json": f'{{"n": {n}, "i": {i}}}'.encode() for i in range(60)}
            depot.import_dir(write_model_dir(tmp_path / "src" / repo, files), repo)
    return home


def leaf_pages_of(index: Path, table: str) -> list[int]:
    """The numbers (0-based) of the leaf pages of ``table``'s b-tree, in key order (SQLite's file format: an
    interior page's cells each begin with a child's page number; its rightmost child is at offset 8)."""
    with closing(sqlite3.connect(index)) as con:
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    data = index.read_bytes()

    def walk(number: int) -> list[int]:
        at = (number - 1) * PAGE
        header = at + (100 if number == 1 else 0)
        kind = data[header]
        if kind in (0x0A, 0x0D):
            return [number - 1]
        cells = int.from_bytes(data[header + 3 : header + 5], "big")
        pointers = [
            int.from_bytes(data[header + 12 + 2 * i : header + 14 + 2 * i], "big") for i in range(cells)
        ]
        children = [int.from_bytes(data[at + offset : at + offset + 4], "big") for offset in pointers]
        children.append(int.from_bytes(data[header + 8 : header + 12], "big"))
        return [leaf for child in children for leaf in walk(child)]

    return walk(root)


def damage_page(index: Path, page: int) -> None:
    with open(index, "r+b") as file:
        file.seek(page * PAGE)
        file.write(b"\xff" * PAGE)


def test_a_damaged_index_is_recovered_and_the_store_works_again(tmp_path: Path) -> None:
    home = store_with_many_rows(tmp_path)
    index = home / "index.db"
    with closing(sqlite3.connect(index)) as con:
        assert con.execute("PRAGMA page_size").fetchone()[0] == PAGE
    leaves = leaf_pages_of(index, "files")
    assert len(leaves) > 10, "the test needs a table of many pages"
    damaged = leaves[len(leaves) // 2]  # (rows before it and after it)
    damage_page(index, damaged)
    with Depot(home) as depot:  # (a read meeting the page, or verify's look at the whole, says what to do)
        try:
            advice = depot.verify().index_advice
        except IndexDamagedError as error:
            advice = str(error)
        assert "modeldepot recover-index" in advice, advice

    result = CliRunner().invoke(cli, ["recover-index", "--home", str(home), "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    kept = Path(body["kept_at"])
    assert kept.parent == home and kept.name.startswith("index.db.damaged-")
    assert kept.read_bytes()[damaged * PAGE : (damaged + 1) * PAGE] == b"\xff" * PAGE, (
        "the damaged index is kept"
    )
    assert list(body["damaged_tables"]) == ["files"], "a table read in part is said"
    with closing(sqlite3.connect(kept)) as con:
        whole = con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    assert whole - 20 <= body["rows"]["files"] < whole, (body["rows"], whole)  # (one page's rows lost)

    with Depot(home) as depot:
        report = depot.verify()
        assert report.index_ok, report.index_advice
        listed = {repo.repo_id for repo in depot.list_repos()}
        assert len(listed) >= len(REPOS) - 2, listed  # (a page of rows lost, not the store)
        for repo in sorted(listed)[:3]:  # what the index names is served as before
            n = REPOS.index(repo)
            name = f"part/000-{'x' * 40}.json"
            if depot.has_file(repo, name):
                assert bytes(depot.get_file(repo, name)) == f'{{"n": {n}, "i": 0}}'.encode()
        depot.import_dir(write_model_dir(tmp_path / "src" / "new", {"a.json": b"{}"}), "acme/after")
        assert bytes(depot.get_file("acme/after", "a.json")) == b"{}"


def test_recovering_an_index_another_process_has_open_is_refused(tmp_path: Path) -> None:
    home = store_with_many_rows(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
         "c.execute('SELECT 1 FROM settings'); print('open', flush=True); time.sleep(60)", str(home / "index.db")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        result = CliRunner().invoke(cli, ["recover-index", "--home", str(home)])
        assert result.exit_code == 1
        assert f"is open in process {holder.pid}" in result.output and "stop it first" in result.output
        assert not list(home.glob("index.db.damaged-*")), "nothing was done"
    finally:
        holder.kill()
        holder.communicate()


def test_an_index_whose_schema_cannot_be_read_says_what_else_to_do(tmp_path: Path) -> None:
    home = store_with_many_rows(tmp_path)
    damage_page(home / "index.db", 0)  # (page 1: the header and the schema)
    with pytest.raises(IndexDamagedError, match="import each folder under"):
        salvage_index(StoreLayout(home))


def test_revisions_the_index_lost_are_taken_in_again_from_their_snapshot_folders(tmp_path: Path) -> None:
    """The last transactions lost (a log deleted, an older index put back): their blobs and snapshot folders
    are on disk, named by no row, and `gc` would have deleted them (an explorer's trial). They are imported
    again from their snapshot folders, nothing fetched, and gc keeps them."""
    home = tmp_path / "store"
    older = {"config.json": b'{"v": 1}', "weights.bin": b"a" * 5000}
    newer = {"config.json": b'{"v": 2}', "weights.bin": b"b" * 7000}
    lost = {"model.bin": b"c" * 9000, "tokenizer.json": b"{}"}
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "v1", older), "acme/kept")
    backup = tmp_path / "index-before.db"
    with closing(sqlite3.connect(home / "index.db")) as source, closing(sqlite3.connect(backup)) as copy:
        source.backup(copy)
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "v2", newer), "acme/kept")  # (main moves on)
        depot.import_dir(write_model_dir(tmp_path / "lost", lost), "acme/lost")
    (home / "index.db").write_bytes(backup.read_bytes())  # the last two imports' rows are gone

    result = CliRunner().invoke(cli, ["recover-index", "--home", str(home), "--json"])
    assert result.exit_code == 0, result.output
    taken = {(t["repo_id"], t["revision"]): t for t in json.loads(result.stdout)["taken_in"]}
    assert set(taken) == {
        ("acme/lost", "main"),
        ("acme/kept", next(r for _, r in taken if r.startswith("recovered-"))),
    }
    assert all(not t["error"] for t in taken.values())
    with Depot(home) as depot:
        depot.gc()
        assert {name: bytes(depot.get_file("acme/lost", name)) for name in lost} == lost
        # (the branch the index kept stays where it was; the lost revision is on a branch of its own)
        assert bytes(depot.get_file("acme/kept", "config.json")) == older["config.json"]
        recovered = next(r for (repo, r) in taken if repo == "acme/kept")
        assert bytes(depot.get_file("acme/kept", "config.json", revision=recovered)) == newer["config.json"]
        assert depot.verify().ok


def _kept_store(tmp_path: Path) -> Path:
    home = tmp_path / "store"
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "m", {"config.json": b'{"v": 1}'}), "acme/kept")
    return home


def test_a_link_planted_in_a_snapshot_folder_is_not_followed_out_of_the_store(tmp_path: Path) -> None:
    """`import` follows a link anywhere: a member of a group that shares the store planted a snapshot folder
    whose file linked to another user's key, and whoever recovered the index published it (a review)."""
    home = _kept_store(tmp_path)
    secret = tmp_path / "private" / "id_ed25519"
    secret.parent.mkdir()
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    planted = home / "snapshots" / "evil" / "leak" / ("a" * 40)
    planted.mkdir(parents=True)
    (planted / "config.json").symlink_to(secret)
    recovery = recover_index(home)
    [taken] = [t for t in recovery.taken_in if t.repo_id == "evil/leak"]
    assert taken.error.startswith("left alone") and not taken.commit_id
    with Depot(home) as depot:
        assert not depot.has_file("evil/leak", "config.json")


def test_rows_lost_from_the_blobs_table_are_taken_in_again(tmp_path: Path) -> None:
    """A lost page of `blobs` left the files rows whole: nothing was imported again, and gc deleted the blobs
    the index no longer knew (a review)."""
    home = tmp_path / "store"
    files = {"config.json": b'{"v": 1}', "w.bin": os.urandom(5000)}
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "m", files), "acme/m")
    with closing(sqlite3.connect(home / "index.db")) as con, con:
        con.execute("DELETE FROM blobs")
    recover_index(home)
    with Depot(home) as depot:
        depot.gc()
        assert {name: bytes(depot.get_file("acme/m", name)) for name in files} == files


def test_a_failure_writing_the_new_index_leaves_the_old_one_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write of the new file that failed (its disk full) was taken for damage of the old one, and the short
    index put in place (a review): the old one stays, and the error says so."""
    home = _kept_store(tmp_path)
    connect = sqlite3.connect

    class Failing:
        def __init__(self, con: sqlite3.Connection) -> None:
            self.con = con

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql.startswith('INSERT OR IGNORE INTO "files"'):
                raise sqlite3.OperationalError("database or disk is full")
            return self.con.execute(sql, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(self.con, name)

    def failing_connect(path: object, *args: object, **kwargs: object) -> object:
        made = connect(path, *args, **kwargs)  # type: ignore[arg-type]
        return Failing(made) if str(path).endswith(".recovering") else made

    monkeypatch.setattr(salvage.sqlite3, "connect", failing_connect)
    with pytest.raises(
        StoreError, match=r"writing the recovered index failed \(database or disk is full\): the index"
    ):
        salvage_index(StoreLayout(home))
    monkeypatch.undo()
    assert not (home / "index.db.recovering").exists()
    with Depot(home) as depot:
        assert bytes(depot.get_file("acme/kept", "config.json")) == b'{"v": 1}'


def test_two_recoveries_in_one_second_keep_two_copies(tmp_path: Path) -> None:
    home = _kept_store(tmp_path)
    first, second = recover_index(home), recover_index(home)
    assert first.salvaged.kept_at != second.salvaged.kept_at
    assert first.salvaged.kept_at.exists() and second.salvaged.kept_at.exists()


def test_the_recovered_index_keeps_the_owner_and_mode_of_the_damaged_one(tmp_path: Path) -> None:
    """Recovered as root (the usual way to repair a service's store), the new index was root's: the
    service's user could no longer write its own store (a review)."""
    home = _kept_store(tmp_path)
    for root, folders, names in os.walk(home):
        for name in [*folders, *names]:
            os.lchown(os.path.join(root, name), 65534, 65534)
    os.chown(home, 65534, 65534)
    os.chmod(home / "index.db", 0o660)
    recover_index(home)
    found = os.stat(home / "index.db")
    assert (found.st_uid, found.st_gid, found.st_mode & 0o777) == (65534, 65534, 0o660)


def test_a_process_that_opens_the_store_during_a_recovery_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that opened the store after the look at who has it open wrote into the file then replaced,
    and lost an import it was told was done (a review): it waits for the recovery's locks."""
    home = _kept_store(tmp_path)
    source = write_model_dir(tmp_path / "late", {"late.json": b"{}"})
    copy_rows = salvage._copy_rows
    started: list[subprocess.Popen[str]] = []

    def start_an_import_then_copy(*args: object) -> None:
        if not started:
            started.append(subprocess.Popen(
                [sys.executable, "-c", "import sys; from modeldepot import Depot\n"
                 "with Depot(sys.argv[1]) as d: d.import_dir(sys.argv[2], 'acme/late')", str(home), str(source)],
            ))  # fmt: skip
            time.sleep(1.0)  # (time for it to open the store, were it let)
        copy_rows(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(salvage, "_copy_rows", start_an_import_then_copy)
    salvage_index(StoreLayout(home))
    assert started[0].wait(timeout=60) == 0
    with Depot(home) as depot:
        assert depot.has_file("acme/late", "late.json"), "an import done during the recovery was lost"


def test_an_older_index_put_back_loses_no_model_to_gc(tmp_path: Path) -> None:
    """An older copy of the index put back by hand (a backup) knows nothing of the models imported since: gc
    took their blobs for a killed removal's orphans and deleted them, an imported model gone for good (an
    explorer's trial). A removal sets its snapshot aside before its rows go, so a whole snapshot of a revision
    the index does not know is no removal's leftover: gc keeps it with its blobs and says so, and
    `recover-index` takes it in."""
    import shutil

    home = tmp_path / "store"
    first, second = (
        {"config.json": b'{"a": 1}', "model.bin": os.urandom(200_000)},
        {"weights.bin": os.urandom(300_000)},
    )
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "first", first), "acme/first")
    index = StoreLayout(home).index_path
    backup = tmp_path / "index-backup.db"
    shutil.copy(index, backup)
    with Depot(home) as depot:
        commit = depot.import_dir(write_model_dir(tmp_path / "second", second), "acme/second").commit_id
    for stale in (index.with_name(index.name + "-wal"), index.with_name(index.name + "-shm")):
        stale.unlink(missing_ok=True)
    shutil.copy(backup, index)
    with Depot(home) as depot:
        report = depot.gc()
        assert report.unknown_revisions == (f"acme/second@{commit}",) and report.blobs_removed == 0
        assert depot.list_repos()[0].repo_id == "acme/first"
    result = CliRunner().invoke(cli, ["gc", "--home", str(home)])
    assert result.exit_code == 0 and "kept 1 revision the index does not know" in result.stderr, result.stderr
    recover_index(home)
    with Depot(home) as depot:
        assert bytes(depot.get_file("acme/second", "weights.bin")) == second["weights.bin"]
        assert depot.gc().unknown_revisions == ()


def test_a_removal_killed_after_its_rows_went_leaves_nothing_gc_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between its commit and the deletion of its files, a removal leaves orphan blobs and its snapshot
    set aside under a hidden name: gc deletes both (no whole snapshot of an unknown revision is left, which gc
    would keep as an older index's)."""
    from modeldepot.store import maintenance

    home = tmp_path / "store"
    files = {"weights.bin": os.urandom(300_000)}
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "doomed", files), "acme/doomed")

        def killed(*_: object, **__: object) -> None:
            raise KeyboardInterrupt  # (the process stops here, its rows gone)

        monkeypatch.setattr(maintenance, "_delete_each_blob_file", killed)
        with pytest.raises(KeyboardInterrupt):
            depot.remove("acme/doomed")
        monkeypatch.undo()
        assert depot.list_repos() == []
        report = depot.gc()
        assert report.unknown_revisions == () and report.blobs_removed == 1 and report.snapshots_removed == 1
        assert not list(depot.store.layout.snapshots.rglob("*"))


def test_a_removal_interrupted_just_after_its_commit_leaves_no_snapshot_gc_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C (or the CLI's SIGTERM) just after a removal's commit put its snapshot back, whole, for a revision
    gone: gc kept it, and its blobs, with a false warning of an older index, for good (review 40). Put back
    only where the rows stayed."""
    home = tmp_path / "store"
    with Depot(home) as depot:
        depot.import_dir(
            write_model_dir(tmp_path / "doomed", {"weights.bin": os.urandom(300_000)}), "acme/doomed"
        )
        committed = depot.store.index.write_freeing

        def interrupted(*args: object, **kwargs: object) -> object:
            committed(*args, **kwargs)  # type: ignore[arg-type]
            raise KeyboardInterrupt

        monkeypatch.setattr(depot.store.index, "write_freeing", interrupted)
        with pytest.raises(KeyboardInterrupt):
            depot.remove("acme/doomed")
        monkeypatch.undo()
        report = depot.gc()
        assert report.unknown_revisions == () and report.blobs_removed == 1


def test_a_failed_publish_of_content_a_kept_snapshot_names_leaves_its_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an older index put back, a publish of content only a kept snapshot's blob holds places its bytes
    over that blob; failing, it deleted it: the snapshot gc kept was no longer whole, and the next gc deleted
    the rest of the model (review 40). Bytes placed over a file of their name stay."""
    import shutil

    from modeldepot.store import publish

    home = tmp_path / "store"
    weights = os.urandom(300_000)
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "first", {"config.json": b"{}"}), "acme/first")
    index = StoreLayout(home).index_path
    backup = tmp_path / "index-backup.db"
    shutil.copy(index, backup)
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "second", {"weights.bin": weights}), "acme/second")
    for stale in (index.with_name(index.name + "-wal"), index.with_name(index.name + "-shm")):
        stale.unlink(missing_ok=True)
    shutil.copy(backup, index)

    def failing(*args: object, **kwargs: object) -> None:
        raise StoreError("the index refused the revision")

    with Depot(home) as depot:
        monkeypatch.setattr(publish, "_commit", failing)
        with pytest.raises(StoreError, match="refused"):
            depot.import_dir(write_model_dir(tmp_path / "again", {"copy.bin": weights}), "acme/again")
        monkeypatch.undo()
        assert depot.gc().unknown_revisions != (), "the snapshot is still whole: kept"
    recover_index(home)
    with Depot(home) as depot:
        assert bytes(depot.get_file("acme/second", "weights.bin")) == weights


def test_a_failed_import_by_link_over_a_file_of_the_blobs_name_gives_the_users_file_its_mode_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes placed over a file of their name stay when a publish fails (above); a user's file linked in by
    `import --link` is no store's bytes: kept, it stayed read-only for good (review 41). It goes as before."""
    import shutil
    import stat

    from modeldepot.store import publish

    weights = os.urandom(300_000)
    with Depot(tmp_path / "store") as depot:
        depot.import_dir(write_model_dir(tmp_path / "first", {"weights.bin": weights}), "acme/first")
        blob = depot.store.blobs.path(depot.file_info("acme/first", "weights.bin").sha256)
        shutil.copy(blob, tmp_path / "saved")
        depot.remove("acme/first")
        shutil.copy(tmp_path / "saved", blob)  # (a file of the blob's name, no row names it)
        user = write_model_dir(tmp_path / "mine", {"weights.bin": weights})
        mode = stat.S_IMODE(os.stat(user / "weights.bin").st_mode)

        def failing(*args: object, **kwargs: object) -> None:
            raise StoreError("the index refused the revision")

        monkeypatch.setattr(publish, "_commit", failing)
        with pytest.raises(StoreError, match="refused"):
            depot.import_dir(user, "acme/mine", link=True)
        monkeypatch.undo()
        assert stat.S_IMODE(os.stat(user / "weights.bin").st_mode) == mode


def test_a_snapshot_rebuilt_as_its_revision_is_removed_is_not_left_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild of a snapshot read the revision's files before its lock: a removal in between, then the build
    made the removed revision's snapshot whole again, and a kill before the next look left it so (gc keeps
    such a one as an older index's, with its blobs, for good: review 40). The files are read under the lock."""
    home = tmp_path / "store"
    with Depot(home) as depot:
        commit = depot.import_dir(
            write_model_dir(tmp_path / "doomed", {"weights.bin": os.urandom(300_000)}), "acme/doomed"
        ).commit_id
        snapshots = depot.store.snapshots
        (snapshots.path("acme/doomed", commit) / "weights.bin").unlink()
        looked = snapshots.is_complete

        def removed_after_the_look(*args: object) -> bool:
            whole = looked(*args)  # type: ignore[arg-type]
            depot.remove("acme/doomed")
            return whole

        built = snapshots.build
        builds: list[object] = []

        class Killed(BaseException):
            pass

        def killed_after_one_build(*args: object) -> None:
            if builds:
                raise Killed  # (the process ends here)
            builds.append(args)
            built(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(snapshots, "is_complete", removed_after_the_look)
        monkeypatch.setattr(snapshots, "build", killed_after_one_build)
        with contextlib.suppress(Killed):
            depot.store.ensure_snapshot("acme/doomed", commit)
        monkeypatch.undo()
        assert builds == [], "nothing to build: the revision is gone"
        assert depot.gc().unknown_revisions == ()
