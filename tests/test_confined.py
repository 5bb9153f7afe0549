"""The store's own files (locks, reservations, the space reserve, write sessions) are made, read and deleted so
that no link leads out of the store (store/confined.py): in a store a group shares, any member may put a link in
place of one of its folders or files, and the next command of another member, or root's, or a client's GET of a
node's /metrics, deleted, created or padded files outside it (an explorer's trial)."""

from __future__ import annotations

import os
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
        with pytest.raises(DepotError, match="leads out of the store"):
            depot.budget_status()
        with pytest.raises(DepotError, match="leads out of the store"):
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
    victim = _victim(tmp_path)
    with _store(tmp_path) as depot:
        lock = depot.store.layout.lock_path
        lock.unlink()
        lock.symlink_to(victim / "nologin")
        folder = write_model_dir(tmp_path / "src2", {"config.json": b"{}"})
        with pytest.raises((DepotError, OSError)):
            depot.import_dir(folder, "acme/other")
    assert sorted(os.listdir(victim)) == ["precious.conf"]


def test_a_link_in_place_of_tmp_makes_no_session_outside(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    with _store(tmp_path) as depot:
        tmp = depot.store.layout.tmp
        tmp.rename(tmp.with_name("tmp.old"))
        tmp.symlink_to(victim)
        folder = write_model_dir(tmp_path / "src2", {"config.json": b"{}"})
        with pytest.raises(DepotError):
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
        with pytest.raises(
            DepotError, match=r"acme/m@\w{12} was removed from the store, but its snapshot folder"
        ):
            depot.remove("acme/m")
        assert depot.list_repos() == []
    assert sorted(os.listdir(victim)) == ["precious.conf"]
