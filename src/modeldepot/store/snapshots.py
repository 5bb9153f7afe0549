"""The snapshots tree: ``snapshots/<org>/<name>/<commit>/<path>`` as relative symlinks into blobs/.

It is derived state: the index says what a snapshot holds, and a missing or damaged snapshot is rebuilt
from it. A snapshot appears whole or not at all: it is built under a temporary name and renamed into
place, so a reader never sees half of one. Files published later into its revision are linked into it
where it stands (:meth:`Snapshots.add`), each link whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

from modeldepot.errors import StoreError
from modeldepot.store.layout import StoreLayout, fsync_dir, os_error

__all__ = ["REMOVING", "Snapshots"]

REMOVING = ".removing-"  # a snapshot set aside by a removal (then deleted with it; gc deletes a killed one's)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Snapshots:
    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout

    def path(self, repo_id: str, commit_id: str) -> Path:
        return self.layout.snapshot_dir(repo_id, commit_id)

    def is_complete(self, repo_id: str, commit_id: str, files: Iterable[tuple[str, str]]) -> bool:
        """Whether the snapshot holds exactly these links: each right, and no other (an `rm --quant` killed
        between its commit and the links' removal left the variant's links there, dangling or live, for
        good: a loader globbing ``*.gguf`` found a file the revision no longer has)."""
        files = list(files)
        if not self.holds(repo_id, commit_id, files):
            return False
        found = 0
        for _folder, _subfolders, names in os.walk(self.path(repo_id, commit_id)):  # (links are not followed)
            found += len(names)
        return found == len(files)

    def copied_whole(self, repo_id: str, commit_id: str, files: Iterable[tuple[str, str]]) -> bool:
        """Whether the snapshot holds a plain file where a link to a blob belongs: a copy of the store that
        followed its links (`cp -rL`, a bucket sync), twice its size, whose folders a read-only store cannot
        mend (every path read failed, "incomplete", and `verify` said ok: an explorer's trial)."""
        root = self.path(repo_id, commit_id)
        for path, _sha256 in files:
            link = self.layout.snapshot_file(root, path)
            if not link.is_symlink() and link.is_file():
                return True
        return False

    def holds(self, repo_id: str, commit_id: str, files: Iterable[tuple[str, str]]) -> bool:
        """Whether the snapshot holds a right link for each of these files (others aside): what a pull of part
        of a commit published. The whole check (:meth:`is_complete`) read every file row of the commit and
        every link of its folder, on each one-file pull of a mirror: a repo of 2,500 files took 230 s through
        one, the node's other clients waiting on each (an explorer's trial)."""
        root = self.path(repo_id, commit_id)
        for path, sha256 in files:
            link = self.layout.snapshot_file(root, path)
            try:
                if os.readlink(link) != self.layout.link_target(link, sha256):
                    return False
            except OSError:
                return False
        return True

    def build(self, repo_id: str, commit_id: str, files: Iterable[tuple[str, str]]) -> Path:
        """(Re)build a snapshot from (path, sha256) pairs and swap it into place atomically."""
        final = self.path(repo_id, commit_id)
        files = list(files)
        staging = final.parent / f".{commit_id}.{secrets.token_hex(4)}.partial"
        try:
            self.layout.make_folders(staging)  # (a name of its own: no other builder's)
            # Each link is relative to where it will live, which is at the same depth as staging.
            self.layout.symlinks(staging, [
                (path, self.layout.link_target(self.layout.snapshot_file(final, path), sha256))
                for path, sha256 in files
            ])  # fmt: skip
            self._swap_in(staging, final, lambda: self.is_complete(repo_id, commit_id, files))
        except OSError as error:
            # Said before the staging folder goes: after, the inodes it took are free again, and its folders
            # gone, and no inode left was said to be no byte left, which `df -h` denied (an explorer's trial)
            failure = os_error(error, f"building the snapshot of {repo_id}@{commit_id[:12]}")
            self.layout.rmtree(staging)
            raise failure from error
        return final

    def add(self, repo_id: str, commit_id: str, files: Iterable[tuple[str, str]]) -> bool:
        """Link these files into the revision's snapshot where it stands, each link made under a temporary
        name and renamed into place (a reader sees each whole). False, having done nothing, when there is no
        snapshot folder yet, or when a builder swapped another in meanwhile and a link of these is not in it
        (the caller builds it whole). A mirror that published each file it fetched into its commit rebuilt
        the whole folder each time: a repo of 700 files fetched through it took 363 s, 12 s from its node."""
        root = self.path(repo_id, commit_id)
        try:
            standing = os.stat(root).st_ino
        except FileNotFoundError:
            return False
        files = list(files)
        try:
            for path, sha256 in files:
                link = self.layout.snapshot_file(root, path)
                target = self.layout.link_target(link, sha256)
                with contextlib.suppress(OSError):
                    if os.readlink(link) == target:
                        continue
                self.layout.make_folders(link.parent)
                staging = link.with_name(f".{link.name}.{secrets.token_hex(4)}.link")
                self.layout.symlink(staging, target)
                try:
                    self.layout.rename(staging, link)
                except OSError:
                    with contextlib.suppress(OSError):
                        self.layout.unlink(staging)
                    raise
            # In the folder that stands now: not one retired meanwhile, nor one its linking made anew where a
            # builder had moved the old aside (a half folder: a review)
            if os.stat(root).st_ino != standing:
                return False
            for path, sha256 in files:
                link = self.layout.snapshot_file(root, path)
                if os.readlink(link) != self.layout.link_target(link, sha256):
                    return False
        except FileNotFoundError:
            return False  # (swapped or removed as it linked: built whole)
        except OSError as error:
            raise os_error(error, f"linking files into the snapshot of {repo_id}@{commit_id[:12]}") from error
        return True

    def _swap_in(self, staging: Path, final: Path, final_is_complete: Callable[[], bool]) -> None:
        """Rename staging over final, racing other builders of the same snapshot safely.

        rename() onto a non-empty directory fails, so a loser either finds the winner's complete snapshot
        (same content: done) or moves the damaged one aside and tries again.
        """
        for _attempt in range(100):
            try:
                self.layout.rename(staging, final)
                return
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if final_is_complete():
                self.layout.rmtree(staging)
                return
            retired = final.parent / f".{final.name}.{secrets.token_hex(4)}.retired"
            try:
                self.layout.rename(final, retired)
            except FileNotFoundError:
                continue
            self.layout.rmtree(retired)
        raise OSError(errno.EBUSY, "other processes keep replacing this snapshot", str(final))

    def unlink(self, repo_id: str, commit_id: str, paths: Iterable[str]) -> None:
        """Take these files' links out of a snapshot that stays (its other links keep working for whoever
        reads the folder now), and the folders they leave empty."""
        root = self.path(repo_id, commit_id)
        for path in paths:
            link = self.layout.snapshot_file(root, path)
            try:
                self.layout.unlink(link)
            except FileNotFoundError:
                continue
            folder = link.parent
            while folder != root:
                try:
                    self.layout.rmdir(folder)
                except OSError:
                    break
                folder = folder.parent

    def set_aside(self, repo_id: str, commit_id: str) -> Path | None:
        """Move a revision's snapshot out of its name (a hidden one: :meth:`remove_stale` takes it) before its
        rows go: a removal killed between the two leaves the revision, its snapshot rebuilt when read, or a
        hidden leftover; never a whole snapshot of a revision the index does not know, which gc keeps
        (:meth:`whole_unknown`). None when it has none."""
        final = self.path(repo_id, commit_id)
        aside = final.parent / f"{REMOVING}{commit_id}.{secrets.token_hex(4)}"
        try:
            self.layout.rename(final, aside)
        except FileNotFoundError:
            return None
        except (OSError, StoreError):  # (a folder this user may not change, a `sudo` pull's: the removal goes
            return None  # on, and says it was left where it is, as before: review 40)
        return aside

    def put_back(self, aside: Path, repo_id: str, commit_id: str) -> None:
        """Undo :meth:`set_aside` (the rows stayed); one built meanwhile stands."""
        try:
            self.layout.rename(aside, self.path(repo_id, commit_id))
        except OSError:
            self.layout.rmtree(aside)

    def whole_unknown(self, live: set[tuple[str, str]]) -> dict[tuple[str, str], set[str]]:
        """The snapshot folders of revisions the index does not know (``live``: those it does) whose every
        link leads to a blob the store holds, each with those blobs. A removal sets its snapshot aside before
        its rows go, so these are no removal's leftovers: the index lost revisions it had (an older copy of
        it put back by hand), and what they hold is kept until ``recover-index`` takes them in (gc took them
        for orphans and deleted every model imported since the copy: an explorer's trial)."""
        found: dict[tuple[str, str], set[str]] = {}
        for repo_id, commit_id in self.present():
            if (repo_id, commit_id) not in live and _COMMIT.fullmatch(commit_id):
                blobs = self._whole(self.path(repo_id, commit_id))
                if blobs:
                    found[(repo_id, commit_id)] = blobs
        return found

    def _whole(self, root: Path) -> set[str] | None:
        """The blobs the links of the snapshot at ``root`` lead to, when each is a link of this store's making
        to a blob it holds; None when one is not."""
        blobs: set[str] = set()
        for folder, _subfolders, names in os.walk(root):  # (links are not followed)
            for name in names:
                link = Path(folder, name)
                try:
                    target = os.readlink(link)
                except OSError:
                    return None
                sha256 = os.path.basename(target)
                if not (_SHA256.fullmatch(sha256) and target == self.layout.link_target(link, sha256)
                        and self.layout.blob_path(sha256).is_file()):  # fmt: skip
                    return None
                blobs.add(sha256)
        return blobs

    def remove(self, repo_id: str, commit_id: str) -> None:
        """Remove one snapshot (set aside first, as gc's: :meth:`remove_stale`); prune the emptied folders."""
        repo_dir = self.layout.repo_snapshots(repo_id)
        aside = self.set_aside(repo_id, commit_id)
        self.layout.rmtree(
            aside if aside is not None else self.path(repo_id, commit_id)
        )  # (one not moved: said)
        for directory in (repo_dir, repo_dir.parent):
            try:
                self.layout.rmdir(directory)
            except OSError:
                break

    def sync(self) -> None:
        """Make every snapshot folder's entries durable (``modeldepot sync``). They are derived state, rebuilt
        from the index when lost, but a program that kept a path from before a power loss opens it as it
        is, and file systems that log each file's fsync apart (btrfs) made no link durable with its blob."""
        for folder, _subfolders, _files in os.walk(self.layout.snapshots):  # (links are not followed)
            with contextlib.suppress(FileNotFoundError):  # (a snapshot swapped or removed meanwhile)
                fsync_dir(Path(folder))

    def present(self) -> list[tuple[str, str]]:
        """(repo_id, folder name) of every snapshot folder on disk, including leftovers."""
        root = self.layout.snapshots
        return [(f"{org.name}/{name.name}", commit.name)
                for org in _subdirs(root) for name in _subdirs(org) for commit in _subdirs(name)]  # fmt: skip

    def remove_stale(self, live: set[tuple[str, str]]) -> int:
        """gc: delete every snapshot folder on disk that no revision in ``live`` names (leftovers of an
        interrupted build or swap included); returns how many went. Hold the store lock exclusively."""
        removed = 0
        for org in _subdirs(self.layout.snapshots):
            for name in _subdirs(org):
                for commit in _subdirs(name):
                    if (f"{org.name}/{name.name}", commit.name) not in live:
                        # (set aside first: a gc killed in an rmtree that took a dangling link first left the
                        # rest whole, then kept as an older index's revision)
                        gone = commit
                        if not commit.name.startswith("."):
                            gone = commit.parent / f"{REMOVING}{commit.name}.{secrets.token_hex(4)}"
                            self.layout.rename(commit, gone)
                        self.layout.rmtree(
                            gone
                        )  # a name read from disk: inside by construction, checked anyway
                        removed += 1
                for directory in (name, org):
                    try:
                        self.layout.rmdir(directory)
                    except OSError:
                        break
        return removed


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and not p.is_symlink()]
    except FileNotFoundError:
        return []
