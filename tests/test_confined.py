"""The store's own files (locks, reservations, the space reserve, write sessions) are made, read and deleted so
that no link leads out of the store (store/confined.py): in a store a group shares, any member may put a link in
place of one of its folders or files, and the next command of another member, or root's, or a client's GET of a
node's /metrics, deleted, created or padded files outside it (an explorer's trial)."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from pathlib import Path

import pytest

from conftest import write_model_dir
from modeldepot import Depot
from modeldepot.errors import DepotError


def _store(tmp_path: Path) -> Depot:
    depot = Depot(tmp_path / "store")
    depot.import_dir(
        write_model_dir(tmp_path / "src", {"config.json": b"{}", "w.bin": os.urandom(4096)}), "acme/m"
    )
    return depot


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.conf").write_bytes(b"precious config\n")
    return victim


def test_a_link_in_place_of_the_reservations_folder_deletes_nothing_outside(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    with _store(tmp_path) as depot:
        reservations = depot.store.budget.reservations.directory
        reservations.mkdir(exist_ok=True)
        reservations.rename(reservations.with_name("reservations.old"))
        reservations.symlink_to(victim)
        with pytest.raises(DepotError, match=r"refusing to use .*reservations: it is a link"):
            depot.budget_status()
        with pytest.raises(DepotError, match=r"refusing to use .*reservations: it is a link"):
            depot.store.budget.reservations.hold("acme/x", 10)
    assert sorted(os.listdir(victim)) == ["precious.conf"]
    assert (victim / "precious.conf").read_bytes() == b"precious config\n"


def test_a_link_in_place_of_the_space_reserve_pads_no_file_outside(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    target = victim / "precious.conf"
    with _store(tmp_path) as depot:
        reserve = depot.store.index.reserve
        reserve.space.unlink()
        reserve.space.symlink_to(target)
        reserve.released = True  # (as after a full disk: it takes back all it can)
        reserve.refill()
        assert target.read_bytes() == b"precious config\n"
        reserve.space.unlink()
        reserve.folder.rename(reserve.folder.with_name("reserve.old"))
        reserve.folder.symlink_to(victim)
        reserve.release()
        reserve.refill()
    assert sorted(os.listdir(victim)) == ["precious.conf"] and target.read_bytes() == b"precious config\n"


def test_a_link_in_place_of_the_store_lock_makes_no_file_outside(tmp_path: Path) -> None:
    """It is refused as a StoreError that says so (it was a bare ELOOP naming neither the path nor the fix: a
    review)."""
    victim = _victim(tmp_path)
    with _store(tmp_path) as depot:
        lock = depot.store.layout.lock_path
        lock.unlink()
        lock.symlink_to(victim / "nologin")
        folder = write_model_dir(tmp_path / "src2", {"config.json": b"{}"})
        with pytest.raises(DepotError, match="it is a link"):
            depot.import_dir(folder, "acme/other")
    assert sorted(os.listdir(victim)) == ["precious.conf"]


def test_a_link_in_place_of_tmp_makes_no_session_outside(tmp_path: Path) -> None:
    """It is said to be a link (the cleanup's own refusal, naming a folder never made, took its place: a review)."""
    victim = _victim(tmp_path)
    with _store(tmp_path) as depot:
        tmp = depot.store.layout.tmp
        tmp.rename(tmp.with_name("tmp.old"))
        tmp.symlink_to(victim)
        folder = write_model_dir(tmp_path / "src2", {"config.json": b"{}"})
        with pytest.raises(DepotError, match="it is a link"):
            depot.import_dir(folder, "acme/other")
    assert sorted(os.listdir(victim)) == ["precious.conf"]


def test_a_store_is_made_only_in_a_new_or_empty_folder(tmp_path: Path) -> None:
    """`--home ~/projects` made a store in a folder of the user's, and the next import deleted the files of its
    tmp/, gc those of its blobs/ (an explorer's trial). A folder that holds files and no store is refused; one
    that holds only hidden names and lost+found (a disk mounted there for the store) is not."""
    from modeldepot.errors import ConfigError

    mine = tmp_path / "projects"
    (mine / "tmp").mkdir(parents=True)
    (mine / "tmp" / "important.txt").write_bytes(b"precious")
    (mine / "notes.txt").write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"holds files and no store \(notes.txt\)"):
        Depot(mine)
    assert sorted(os.listdir(mine)) == ["notes.txt", "tmp"] and os.listdir(mine / "tmp") == ["important.txt"]
    mounted = tmp_path / "disk"
    (mounted / "lost+found").mkdir(parents=True)
    (mounted / ".snapshot").mkdir()
    with Depot(mounted) as depot:
        assert depot.list_repos() == []
    (mounted / "notes.txt").write_bytes(b"beside a store: none of its business")
    with Depot(mounted) as depot:  # (a store now: opened as it is)
        assert depot.list_repos() == []


def test_an_rm_whose_snapshot_folder_leads_out_says_what_it_removed(tmp_path: Path) -> None:
    """A link in place of snapshots/<org>: `rm` removed the repo, left the folder the link leads to alone, and
    said only "refusing to change ...": the user read that nothing was removed (an explorer's trial)."""
    victim = _victim(tmp_path)
    with _store(tmp_path) as depot:
        org = depot.store.layout.snapshots / "acme"
        org.rename(org.with_name("acme.real"))
        org.symlink_to(victim)
        said = ""
        try:  # (the folder the link leads to holds no such snapshot: nothing to remove there, or said so)
            depot.remove("acme/m")
        except DepotError as error:
            said = str(error)
        assert not said or re.search(
            r"acme/m@\w{12} was removed from the store, but its snapshot folder", said
        )
        assert depot.list_repos() == []
    assert sorted(os.listdir(victim)) == ["precious.conf"]


def test_a_link_in_place_of_the_index_setup_lock_makes_no_file_outside(tmp_path: Path) -> None:
    """locks/index-setup.lock was opened O_CREAT by path, links followed, at every open of a writable store: the
    attack on locks/store.lock (root creating /etc/nologin) worked there too (a review)."""
    victim = _victim(tmp_path)
    _store(tmp_path).close()
    setup = tmp_path / "store" / "locks" / "index-setup.lock"
    setup.unlink()
    setup.symlink_to(victim / "nologin")
    try:  # (refused, or opened without following: either way nothing outside)
        Depot(tmp_path / "store").close()
    except (DepotError, OSError):
        pass
    assert sorted(os.listdir(victim)) == ["precious.conf"]


def test_a_link_in_place_of_a_started_write_session_makes_no_file_outside(tmp_path: Path) -> None:
    """A write session's partials were made by path (tmp/<session>/N.partial): a member who put a link in place of
    the session's folder had the writer (root) create and fill files in any folder (a review)."""
    from modeldepot.store.blobs import WriteSession

    victim = _victim(tmp_path)
    with _store(tmp_path) as depot:
        session = WriteSession(depot.store.layout)
        try:
            session.path.rename(session.path.with_name("moved-away"))
            session.path.symlink_to(victim)
            try:  # (refused, or made inside the store: either way nothing outside)
                session.new_partial(4096)
            except (DepotError, OSError):
                pass
            made_outside = sorted(os.listdir(victim))  # (before close: its discard unlinks through the link)
        finally:
            session.close()
    assert made_outside == ["precious.conf"]
    assert sorted(os.listdir(victim)) == ["precious.conf"]


def test_a_link_in_place_of_a_download_log_truncates_no_file_outside(tmp_path: Path) -> None:
    """partials/<sha>.log and .part were opened O_CREAT by path, links followed, then emptied: a member's link
    there had root's pull of that content truncate any file (a review)."""
    victim = _victim(tmp_path)
    target = victim / "precious.conf"
    with _store(tmp_path) as depot:
        store = depot.store
        key = "ab" * 32
        partials = store.layout.partials
        partials.mkdir(exist_ok=True)
        (partials / f"{key}.log").symlink_to(target)
        try:
            partial = store.partials.claim(key, 2 * store.chunk_size + 1, store.chunk_size, wait=False)
        except (DepotError, OSError):
            partial = None
        if partial is not None and hasattr(partial, "close"):
            partial.close()
    assert target.read_bytes() == b"precious config\n"


def test_a_folder_of_the_users_with_only_store_named_folders_is_not_taken_over(tmp_path: Path) -> None:
    """A folder of the user's holding only names the store uses (tmp/) and hidden ones (.git) was taken over, and
    the next import deleted the files of its tmp/ (a review)."""
    from modeldepot.errors import ConfigError

    mine = tmp_path / "work"
    (mine / "tmp").mkdir(parents=True)
    (mine / "tmp" / "important.txt").write_bytes(b"precious")
    (mine / ".git").mkdir()
    try:
        with Depot(mine) as depot:
            depot.import_dir(write_model_dir(tmp_path / "src", {"config.json": b"{}"}), "acme/m")
    except ConfigError:
        pass  # (refused: right)
    assert (mine / "tmp" / "important.txt").read_bytes() == b"precious"


def test_a_reservations_release_raises_nothing_for_a_link_in_place_of_its_folder(tmp_path: Path) -> None:
    """A release is called once a write published, and in `finally` blocks: a link in place of its folder made
    it raise, and an import that had published reported a failure (a review). Nothing is deleted through it."""
    victim = _victim(tmp_path)
    with _store(tmp_path) as depot:
        reservations = depot.store.budget.reservations
        held = reservations.hold("acme/x", 10)
        reservations.directory.rename(reservations.directory.with_name("reservations.old"))
        reservations.directory.symlink_to(victim)
        try:
            held.release()  # (nothing deleted through the link, and no error out of a release)
        finally:
            reservations.directory.unlink()
            reservations.directory.with_name("reservations.old").rename(reservations.directory)
    assert sorted(os.listdir(victim)) == ["precious.conf"]


def test_a_reservations_release_raises_nothing_when_its_folder_is_gone(tmp_path: Path) -> None:
    """Before e8cdb65 `path.unlink()` under suppress(FileNotFoundError): a folder gone meanwhile was nothing to
    do. Now opened_folder raises FileNotFoundError before the suppress is entered."""
    import shutil

    with _store(tmp_path) as depot:
        reservations = depot.store.budget.reservations
        held = reservations.hold("acme/y", 10)
        shutil.rmtree(reservations.directory)
        held.release()


def test_a_link_in_the_home_makes_a_mirror_node_write_no_file_outside(tmp_path: Path) -> None:
    """mirror/marks.py wrote `<home>/.mirror-broken.json.<pid>.tmp` through a link (the pid is a node's, seen in
    `ps`): a member's link there had a root node overwrite any file with JSON (a review)."""
    from modeldepot.mirror.marks import BROKEN_FILE, BrokenMarks

    victim = _victim(tmp_path)
    target = victim / "precious.conf"
    home = tmp_path / "store"
    _store(tmp_path).close()
    (home / f".{BROKEN_FILE}.{os.getpid()}.tmp").symlink_to(target)
    (home / f".{BROKEN_FILE}.lock").symlink_to(victim / "nologin")
    BrokenMarks(home).note("acme/m", "w.bin", None)
    assert target.read_bytes() == b"precious config\n"
    assert sorted(os.listdir(victim)) == ["precious.conf"]


def test_a_store_whose_index_was_lost_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A store whose index.db was lost, beside its own notes (liars.json, a pull's): a new index would take every
    blob for garbage (the next gc deletes them all), so it is refused, saying how to get the models back; its notes
    are no "files of yours" (a review)."""
    from modeldepot.errors import ConfigError
    from modeldepot.transfer.liars import remember_liars

    home = tmp_path / "store"
    _store(tmp_path).close()
    remember_liars(home, ["peer-a"], 600.0)
    assert (home / "liars.json").exists()
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        (home / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=r"holds a store's files \(blobs/, snapshots/\) but no index"):
        Depot(home)
    assert any((home / "blobs").rglob("*")) and not (home / "index.db").exists()


def test_a_link_in_place_of_the_ended_mark_makes_no_file_outside(tmp_path: Path) -> None:
    """partials/ended-mark was utime'd by path (links followed), and touched (O_CREAT, links followed) when that
    said FileNotFoundError: a dangling link there had every completed download create its target (/etc/nologin;
    a review)."""
    from modeldepot.store.partials import ENDED_MARK

    victim = _victim(tmp_path)
    with _store(tmp_path) as depot:
        store = depot.store
        mark = store.layout.partials / ENDED_MARK
        store.layout.partials.mkdir(exist_ok=True)
        mark.unlink(missing_ok=True)
        mark.symlink_to(victim / "nologin")
        key = "cd" * 32
        partial = store.partials.claim(key, 2 * store.chunk_size + 1, store.chunk_size, wait=False)
        assert partial is not None
        partial.release(completed=True)
    assert sorted(os.listdir(victim)) == ["precious.conf"]


def test_a_link_in_place_of_the_ended_mark_touches_no_file_outside(tmp_path: Path) -> None:
    """The same mark, a link to an existing file: its times were set to now (os.utime follows links)."""
    from modeldepot.store.partials import ENDED_MARK

    victim = _victim(tmp_path)
    target = victim / "precious.conf"
    os.utime(target, (1_000_000_000, 1_000_000_000))
    with _store(tmp_path) as depot:
        store = depot.store
        mark = store.layout.partials / ENDED_MARK
        store.layout.partials.mkdir(exist_ok=True)
        mark.unlink(missing_ok=True)
        mark.symlink_to(target)
        partial = store.partials.claim("ce" * 32, 2 * store.chunk_size + 1, store.chunk_size, wait=False)
        assert partial is not None
        partial.release(completed=True)
    assert target.stat().st_mtime == 1_000_000_000


def test_a_link_in_place_of_a_download_data_file_chmods_no_file_outside(tmp_path: Path) -> None:
    """A claim stat'ed and chmod'ed partials/<key>.part by path (links followed) before open_within
    refuses it: a link there to a read-only file (a 0400 key, /etc/sudoers 0440) had root's claim of that content
    make it 0o644/0o664 (readable by all)."""
    victim = _victim(tmp_path)
    target = victim / "precious.conf"
    target.chmod(0o400)
    with _store(tmp_path) as depot:
        store = depot.store
        key = "ef" * 32
        store.layout.partials.mkdir(exist_ok=True)
        (store.layout.partials / f"{key}.part").symlink_to(target)
        try:
            partial = store.partials.claim(key, 2 * store.chunk_size + 1, store.chunk_size, wait=False)
        except (DepotError, OSError):
            partial = None
        if partial is not None:
            partial.release(completed=False)
    assert stat.S_IMODE(target.stat().st_mode) == 0o400


def test_a_link_put_in_place_of_a_finished_download_is_not_reopened(tmp_path: Path) -> None:
    """ResumablePartial.finish reopened partials/<key>.part by path, O_RDWR, links followed (close_data closed it
    while the pull's other files came): a member's link there had the pull fchmod the link's target 0444 (a 0600
    private file: readable by all) and hand it over for placing as the verified blob (its bytes then served)."""
    victim = _victim(tmp_path)
    target = victim / "precious.conf"
    target.chmod(0o600)
    with _store(tmp_path) as depot:
        store = depot.store
        key = "aa" * 32
        size = 2 * store.chunk_size + 1
        partial = store.partials.claim(key, size, store.chunk_size, wait=False)
        assert partial is not None
        try:
            partial.close_data()  # (as pull.py does once a file came whole, before the publish)
            data = partial.paths.data
            data.rename(data.with_name("moved-away"))
            data.symlink_to(target)
            opened_outside = False
            try:
                blob = partial.finish()
                opened_outside = os.path.samestat(os.fstat(blob.fd), target.stat())
                blob.sync(durable=False)  # (as finish_partials does next: fchmod to its read-only mode)
            except (DepotError, OSError):
                pass
        finally:
            partial.release(completed=False)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not opened_outside


def test_a_link_in_place_of_letting_go_deletes_no_file_outside(tmp_path: Path) -> None:
    """processes_letting_go listed, stat'ed and unlinked locks/letting-go/<digits> by path: a link in place of the
    folder had every gc/du (another member's, root's) delete the files of digit names a minute old in any folder
    (a spool's, a queue's)."""
    from modeldepot.store.holders import LETTING_GO, processes_letting_go

    victim = _victim(tmp_path)
    numbered = victim / "12345"
    numbered.write_bytes(b"a queued job\n")
    old = time.time() - 3600
    os.utime(numbered, (old, old))
    with _store(tmp_path) as depot:
        folder = depot.store.layout.lock_path.parent / LETTING_GO
        if folder.exists():
            folder.rename(folder.with_name("letting-go.old"))
        folder.symlink_to(victim)
        try:
            processes_letting_go(folder)
        except (DepotError, OSError):
            pass
    assert sorted(os.listdir(victim)) == ["12345", "precious.conf"]


def test_a_loaders_view_links_no_blob_outside_when_its_folder_is_swapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loader's view (hard links under tmp/<session>/view) was made by path after a check of the path: a member
    who swapped the view folder for a link in between had root's load link a blob of the member's choosing into
    any folder (/etc/profile.d; a review). The swap is made right before the link; the link goes where the
    folder was opened, not where the name leads now."""
    victim = _victim(tmp_path)
    with _store(tmp_path) as depot:
        store = depot.store
        commit_id = store.resolve("acme/m", "main")
        link = os.link
        swapped: list[Path] = []

        def swap_then_link(source: object, target: object, *args: object, **kwargs: object) -> None:
            if not swapped:  # (the member's move, right before root's link)
                view = next((store.layout.tmp).glob("*/view"))
                view.rename(view.with_name("view.moved"))
                view.symlink_to(victim)
                swapped.append(view)
            link(source, target, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "link", swap_then_link)
        try:
            with store.linked_folder("acme/m", commit_id, ""):
                pass
        except (DepotError, OSError):
            pass
        monkeypatch.undo()
    assert swapped
    assert sorted(os.listdir(victim)) == ["precious.conf"]


def test_a_link_to_the_home_in_place_of_a_store_folder_is_refused(tmp_path: Path) -> None:
    """The home itself may be the user's link; a link to the home in place of one of the store's folders is no
    such link: reserve/ pointed at the home had a full disk's release unlink every file of the home, the index
    with them (a review)."""
    with _store(tmp_path) as depot:
        reserve = depot.store.index.reserve
        reserve.folder.rename(reserve.folder.with_name("reserve.old"))
        reserve.folder.symlink_to(depot.store.layout.home)
        reserve.release()
        assert (depot.store.layout.home / "index.db").exists()
        assert [r.repo_id for r in depot.list_repos()] == ["acme/m"]


def test_a_store_whose_home_is_a_link_works(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "home").symlink_to(tmp_path / "real")
    with Depot(tmp_path / "home") as depot:
        depot.import_dir(write_model_dir(tmp_path / "src", {"config.json": b"{}"}), "acme/m")
        assert depot.budget_status().used_bytes > 0
    with Depot(tmp_path / "home") as depot:
        assert [r.repo_id for r in depot.list_repos()] == ["acme/m"]


def test_gc_opens_no_fifo_nor_device_a_link_in_partials_leads_to(tmp_path: Path) -> None:
    """gc opened the downloads' files by name, links followed: a member's link there to a FIFO hung root's gc,
    and one to /dev/watchdog would have started the machine's watchdog (a review). Such a link is left alone."""
    import threading

    victim = _victim(tmp_path)
    fifo = victim / "fifo"
    os.mkfifo(fifo)
    with _store(tmp_path) as depot:
        partials = depot.store.layout.partials
        partials.mkdir(exist_ok=True)
        (partials / f"{'ab' * 32}.one").symlink_to(fifo)
        (partials / f"{'cd' * 32}.log").symlink_to(fifo)
        done: list[object] = []
        collecting = threading.Thread(target=lambda: done.append(depot.gc(partials=True)), daemon=True)
        collecting.start()
        collecting.join(timeout=30)
        if not done:  # (unblock a gc stuck opening the FIFO, for the process to end)
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_RDWR))
        assert done, "gc hung on a link to a FIFO"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_an_rm_deletes_nothing_outside_when_a_folder_is_swapped_right_before_the_deletion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletions went by the path after a check of the path (once per folder, in a batch): a member who
    swapped a folder for a link in between had another user's `rm` delete, outside the store, what bore the
    store's naming (a blob's digest; a commit's snapshot folder: a Hugging Face cache's of the same commit, a
    review). The swap is made right before each deletion; it happens where the folder was opened."""
    victim = tmp_path / "victim"
    with _store(tmp_path) as depot:
        store = depot.store
        blobs = [p for p in store.layout.blobs.rglob("*") if p.is_file()]
        victim.mkdir()
        for blob in blobs:  # (files of the same names outside, in a folder the member leads the store's to)
            (victim / blob.name).write_bytes(b"precious\n")
        unlink, swapped = os.unlink, []

        def swap_then_unlink(path: object, *args: object, **kwargs: object) -> None:
            folder = next((b.parent for b in blobs if b.name == os.path.basename(str(path))), None)
            if folder is not None and folder.is_dir() and not folder.is_symlink():
                folder.rename(folder.with_name(folder.name + ".moved"))  # (the member's move, right before)
                folder.symlink_to(victim)
                swapped.append(folder)
            unlink(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "unlink", swap_then_unlink)
        with contextlib.suppress(DepotError, OSError):
            depot.remove("acme/m")
        monkeypatch.undo()
    assert swapped, "no blob was deleted"
    assert sorted(os.listdir(victim)) == sorted(blob.name for blob in blobs)


@pytest.mark.parametrize(
    ("call", "under"),
    [("link", "blobs"), ("symlink", "snapshots"), ("mkdir", "snapshots")],
)
def test_an_import_makes_nothing_outside_when_a_folder_is_swapped_right_before_the_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, under: str
) -> None:
    """Renames, hard links, symbolic links and folders were made by path after a check of the path: a member
    of a group that shares the store who swapped a folder for a link in between had another user's import
    place a blob, a snapshot's link or folder outside the store (a review). The swap is made right before
    the call, of the folder the call makes its entry in; the entry goes where the folder was opened."""
    victim = tmp_path / "victim"
    victim.mkdir()
    home = tmp_path / "store"
    source = write_model_dir(tmp_path / "src", {"config.json": b"{}", "sub/w.bin": os.urandom(4096)})
    with Depot(home) as depot:
        real, rename, symlink = getattr(os, call), os.rename, os.symlink
        swapped: list[str] = []

        def swap_then_call(*args: object, **kwargs: object) -> object:
            name = args[1] if call in ("link", "symlink", "rename") else args[0]
            at = kwargs.get("dst_dir_fd" if call in ("link", "rename") else "dir_fd")
            folder = (
                os.readlink(f"/proc/self/fd/{at}")
                if isinstance(at, int)
                else os.path.dirname(
                    os.path.abspath(os.fspath(name))  # type: ignore[arg-type]
                )
            )
            inside = os.path.relpath(folder, home.resolve()).split(os.sep)
            if not swapped and inside[0] == under and len(inside) > 1 and not os.path.islink(folder):
                rename(folder, folder + ".moved")  # (the member's move, right before the call)
                symlink(victim, folder)
                swapped.append(folder)
            return real(*args, **kwargs)

        monkeypatch.setattr(os, call, swap_then_call)
        with contextlib.suppress(DepotError, OSError):
            depot.import_dir(source, "acme/m")
        monkeypatch.undo()
    assert swapped, f"no {call} was made in {under}/"
    assert os.listdir(victim) == []


def test_a_quarantine_moves_no_blob_outside_when_its_folder_is_swapped_right_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupt blob is renamed into quarantine/: by path, after a check of the path, a member who swapped
    quarantine/ for a link in between had the blob moved out of the store (a review). The swap is made right
    before the rename; the blob goes where the folder was opened."""
    victim = tmp_path / "victim"
    victim.mkdir()
    with _store(tmp_path) as depot:
        blob = max(
            (p for p in depot.store.layout.blobs.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
        )
        blob.chmod(0o644)
        with blob.open("r+b") as damaged:
            damaged.write(b"rot")
        quarantine = depot.store.layout.quarantine
        rename, swapped = os.rename, []

        def swap_then_rename(*args: object, **kwargs: object) -> None:
            at = kwargs.get("dst_dir_fd")
            folder = (
                os.readlink(f"/proc/self/fd/{at}") if isinstance(at, int) else os.path.dirname(str(args[1]))
            )
            if not swapped and folder == str(quarantine.resolve()):
                rename(quarantine, quarantine.with_name("quarantine.moved"))  # (the member's move)
                quarantine.symlink_to(victim)
                swapped.append(folder)
            rename(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "rename", swap_then_rename)
        with contextlib.suppress(DepotError, OSError):
            depot.verify()
        monkeypatch.undo()
    assert swapped, "no blob was quarantined"
    assert os.listdir(victim) == []


def test_a_publish_of_many_blobs_keeps_a_few_folders_open_not_one_per_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folders opened once for a batch (StoreLayout.same_folders) kept every `blobs/<ab>` a publish placed
    into open to its end: 256 descriptors more, and a pull of 800 files the open-file check had let in failed
    as it published ("Too many open files", a review). The home and its own folders are kept; a shard is
    opened from blobs/ for its placing."""
    from modeldepot.store.layout import StoreLayout

    source = write_model_dir(tmp_path / "src", {f"f{n:03}.json": b"%d" % n for n in range(400)})
    counts: list[int] = []
    link = StoreLayout.link

    def counting(layout: StoreLayout, *paths: Path) -> None:
        counts.append(len(os.listdir("/proc/self/fd")))
        link(layout, *paths)

    with Depot(tmp_path / "store") as depot:
        monkeypatch.setattr(StoreLayout, "link", counting)
        depot.import_dir(source, "acme/many")
        monkeypatch.undo()
        assert len(depot.list_files("acme/many", depot.resolve("acme/many"))) == 400
    assert len(counts) >= 300, len(counts)
    assert max(counts) - min(counts) < 32, (min(counts), max(counts))


def test_a_snapshot_of_many_folders_keeps_one_folder_open_at_a_time(tmp_path: Path) -> None:
    """A snapshot's links made in folders as opened kept every folder open to the end of the build: a repo of
    1,100 folders (`checkpoint-N/`) under the usual limit of 1,024 descriptors never got its snapshot, and
    its paths failed for good ("Too many open files", a review)."""
    import resource

    folders = 400
    source = write_model_dir(
        tmp_path / "src", {f"checkpoint-{n}/state.json": b"%d" % n for n in range(folders)}
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with Depot(tmp_path / "store") as depot:
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + folders // 2, hard))
        try:
            result = depot.import_dir(source, "acme/many-folders")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert result.snapshot_built
        assert (
            depot.snapshot_path("acme/many-folders") / "checkpoint-399" / "state.json"
        ).read_bytes() == b"399"
