"""Where everything lives under the store's home, and the few filesystem primitives the store relies on.

::

    <home>/
    ├── index.db                     SQLite (WAL): repos, revisions, refs, files, blobs, chunk digests
    ├── blobs/<ab>/<sha256>          one read-only file per distinct content, named by its SHA-256
    ├── snapshots/<org>/<name>/<commit>/<path>
    │                                relative symlinks into blobs/, for consumers that need real paths
    ├── tmp/<pid>-<random>/          one write session: .lock (flock()ed while its writer lives), N.partial
    ├── partials/<key>.part, .log    resumable downloads: data, and the log of verified chunks (the lock)
    ├── partials/<key>.one           a download of one chunk: data and lock in one, no log
    ├── partials/wanted/<key>        a pull waits for the content: its holder hands it over once verified
    ├── quarantine/<sha256>          blobs that failed verification, kept for inspection, never served
    ├── shared-refused/<sha256>      a shared store's blob found corrupt (tiers.py: pulled into this one)
    └── locks/store.lock             shared while blobs are placed, exclusive while blobs are deleted
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from modeldepot.config import personal_cache_home
from modeldepot.errors import InvalidInputError, ReadOnlyStoreError, StoreError, StoreFullError
from modeldepot.store.confined import folder_within, folders_in, named, opened_folder, remove_tree
from modeldepot.validation import validate_commit_id, validate_path, validate_repo_id, validate_sha256

__all__ = [
    "FULL_DISK_ADVICE",
    "StoreLayout",
    "fsync_dir",
    "os_error",
    "size_text",
    "unlink_counting",
    "writable_mode",
]

FULL_DISK_ADVICE = (  # what to do about a full disk, in every error that reports one
    "free space with `modeldepot rm REPO` or `modeldepot gc` (`gc --partials` also drops the interrupted "
    "downloads kept for a resume, which take room for their whole files): they work on a full disk (the store "
    "keeps a reserve for them); or free space elsewhere on the disk, or move MODELDEPOT_HOME"
)
_PARTIAL_KEY = re.compile(r"[0-9a-f]{64}|git-[0-9a-f]{40}")

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def size_text(count: int) -> str:
    """``count`` bytes as a person reads them (``76.3 MiB``), binary as every size of modeldepot's."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def sizes_text(*counts: int) -> tuple[str, ...]:
    """Sizes said side by side, in exact bytes when rounded they would read the same though they differ: "10.0
    MiB more does not fit in 10.0 MiB" said nothing of why (a trial: 10,485,906 and 10,485,760 bytes)."""
    texts = tuple(size_text(count) for count in counts)
    if len(set(texts)) < len(set(counts)):
        return tuple(f"{count:,} B" for count in counts)
    return texts


def writable_mode() -> int:
    """The mode a file this process makes gets when it asks for 0o666: the umask's say (0o664 under 002, a
    group's shared store; 0o644 under 022)."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    """This process's umask, read from /proc, never by setting the umask (which would race with every other
    thread's files); 022 when it cannot be read."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def group_shared(home: Path) -> bool:
    """Whether the store at ``home`` is one a group shares: its folder setgid and group-writable (the README's
    `chmod 2775`), every member to make its files with the group's write (umask 002); for a store not made
    yet, the folder it is made in."""
    for place in (home, *home.parents):
        try:
            mode = os.stat(place).st_mode
        except FileNotFoundError:
            continue
        except OSError:
            return False
        return bool(mode & stat.S_ISGID and mode & stat.S_IWGRP)
    return False


def keeps_the_group_out(home: Path) -> bool:
    """Whether this process makes files the group of a store it shares cannot read, enter or write (its umask
    takes group bits away: 022, most systems' default and systemd's; 077): every other member's `rm`, `gc`
    and pull of them then fails."""
    return group_shared(home) and bool(current_umask() & 0o070)


def _out_of_inodes(error: OSError) -> bool:
    """Whether an ENOSPC came of a file system without a free inode (its file's folder tells: of a link
    made, the link's, not its target's, which is relative to it)."""
    made = error.filename2 if error.filename2 is not None else error.filename
    if error.errno != errno.ENOSPC or not isinstance(made, (str, os.PathLike)):
        return False
    try:
        found = os.statvfs(os.path.dirname(os.fspath(made)) or ".")
    except (OSError, TypeError):
        return False
    return found.f_files > 0 and found.f_favail == 0 and found.f_bavail > 0


# What a store whose file system turned read-only under it is said to be (as in "the store at X is ...")
REFUSES_WRITES = ("on a file system that refuses writes, though mounted read-write (ext4 does so after a disk "
                  "error, under errors=remount-ro: see `dmesg`; once the disk is checked with fsck and mounted "
                  "again, restart what uses the store)")  # fmt: skip


def refuses_writes(home: Path) -> bool:
    """Whether the file system of the store at ``home`` refuses to open a file of its for writing: read-only
    though its mount says read-write, as ext4 turns after an error under errors=remount-ro (the mount's
    flags stay, a statvfs sees nothing; every command crashed on its first write, an explorer's trial).
    Nothing is written. The file looked at is the index's setup lock, which is only ever flock()ed: never
    ``index.db``, whose POSIX locks SQLite's connections in this process hold, and which any close of a
    descriptor of that file would drop (a node's health probe so let another process delete the live log,
    a review)."""
    try:
        found = os.open(
            home / "locks" / "index-setup.lock", os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        )
    except OSError as error:
        return error.errno == errno.EROFS
    os.close(found)
    return False


def _read_only_said(error: OSError) -> str:
    """The store's state an EROFS tells: on a read-only mount (a bind mount, an image, an export), or on a
    file system that refuses writes though its mount says read-write."""
    named = error.filename if isinstance(error.filename, (str, bytes, os.PathLike)) else None
    place = os.fspath(named) if named is not None else "."
    for candidate in (place, os.path.dirname(place) or "."):
        try:
            if os.statvfs(candidate).f_flag & os.ST_RDONLY:
                return "on a read-only file system"
            return REFUSES_WRITES
        except (OSError, TypeError, ValueError):
            continue
    return "on a read-only file system"


def os_error(error: OSError, doing: str) -> StoreError:
    """Translate an OSError from the store's own files into the exception tree."""
    if error.errno == errno.EROFS:
        return ReadOnlyStoreError(f"{doing} failed: the store is {_read_only_said(error)}")
    if error.errno in _FULL:
        if _out_of_inodes(error):  # (said as bytes, the user looked for room `df -h` showed free: a trial)
            return StoreFullError(f"no file can be made on the store's file system while {doing}: every inode "
                                  f"is taken (`df -i`), though bytes are free; {FULL_DISK_ADVICE}")  # fmt: skip
        return StoreFullError(f"no space left on the store's disk while {doing}; {FULL_DISK_ADVICE}")
    # (of a link made, the link: its target, relative to it, was named)
    named = error.filename2 if error.filename2 is not None else error.filename
    return StoreError(
        f"{doing} failed: {error.strerror or error}{f' ({named})' if named else ''}{_foreign(error)}"
    )


def _foreign(error: OSError) -> str:
    """What to say of a permission refused inside a store some of whose files another user wrote (a `sudo
    modeldepot pull` into one's own store: rm failed halfway, gc at the same file every time, and a pull
    of the repo for good, none saying why): who owns them, and how to give them back."""
    if error.errno not in (errno.EACCES, errno.EPERM) or not error.filename:
        return ""
    path = Path(os.fsdecode(error.filename))
    me = os.geteuid()
    for place in (path, path.parent):  # (a file opened, or a name deleted in its folder)
        try:
            owner = place.lstat().st_uid
        except OSError:
            continue
        if owner == me:
            continue  # (the user's own: refused for another reason, a read-only file system, an ACL)
        store = next((p for p in place.parents if (p / "index.db").exists()), None)
        if store is not None and group_shared(store):  # (a member's: theirs, the group's to write)
            return (f"; {place} belongs to {_user(owner)}, and the group of this shared store may not write it "
                    f"(made under a umask that takes the group's write away, 022: each member needs umask 002, "
                    f"a service UMask=0002): `chmod -R g+w {store}`, run as {_user(owner)} or root, gives it "
                    "back")  # fmt: skip
        try:
            own_store = store is not None and (store / "index.db").stat().st_uid == me
        except OSError:
            own_store = False
        if not own_store:  # (an admin's store, say: its owner's to change, not the user's to take)
            return f"; {place} belongs to {_user(owner)}, not {_user(me)}"
        return (f"; {place} belongs to {_user(owner)}, not {_user(me)} (a command run as another user, with sudo, "
                f"wrote into your store): `sudo chown -R {_user(me)} {store}` gives it back")  # fmt: skip
    return ""


def unlink_counting(path: Path) -> int:
    """Delete a file; return the bytes freed (0 if it was already gone)."""
    try:
        size = path.lstat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as error:
        raise os_error(error, f"deleting {path}") from error
    return size


def fsync_file(path: Path) -> None:
    """Make a file's bytes durable (before it replaces one whose row may say durable)."""
    _fsync(path, os.O_RDONLY | os.O_CLOEXEC)


def fsync_dir(path: Path) -> None:
    """Make a rename, link or unlink inside ``path`` durable."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno == errno.EROFS:  # (said as what it is: a node's stop ended in a traceback, a trial)
            raise os_error(error, f"flushing {path} to the disk") from error
        raise
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoreLayout:
    """Every path the store builds, and the guarded operations that change the file system.

    Defence in depth: a name from the index (or from an upstream, through it) becomes a path only after
    it passes the validators, and nothing is created, renamed or deleted but in a folder as opened and
    checked to lie inside the store's home (:meth:`folder`). A corrupted or hostile index row can make an
    operation fail; it cannot make the store touch a file outside its home.
    """

    home: Path

    @property
    def index_path(self) -> Path:
        return self.home / "index.db"

    @property
    def blobs(self) -> Path:
        return self.home / "blobs"

    @property
    def snapshots(self) -> Path:
        return self.home / "snapshots"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    @property
    def partials(self) -> Path:
        return self.home / "partials"

    @property
    def quarantine(self) -> Path:
        return self.home / "quarantine"

    @property
    def lock_path(self) -> Path:
        return self.home / "locks" / "store.lock"

    def blob_path(self, sha256: str) -> Path:
        _trusted("blob digest", validate_sha256, sha256)
        return self.blobs / sha256[:2] / sha256

    def repo_snapshots(self, repo_id: str) -> Path:
        _trusted("repo id", validate_repo_id, repo_id)
        return self.snapshots / repo_id

    def snapshot_dir(self, repo_id: str, commit_id: str) -> Path:
        _trusted("commit id", validate_commit_id, commit_id)
        return self.repo_snapshots(repo_id) / commit_id

    def snapshot_file(self, root: Path, path: str) -> Path:
        """``root / path`` for a file path of a revision (``root``: a snapshot folder or its staging)."""
        _trusted("file path", validate_path, path)
        return root / path

    def partial_stem(self, key: str) -> Path:
        """``partials/<key>``: the key is a SHA-256, or ``git-`` and a git oid."""
        if not isinstance(key, str) or _PARTIAL_KEY.fullmatch(key) is None:
            raise StoreError(f"refusing the download key {str(key)[:80]!r}: not a digest")
        return self.partials / key

    # -- guarded changes: each made in a folder as opened, checked to lie inside the home ------------------

    @functools.cached_property
    def _real_home(self) -> str:
        return os.path.realpath(self.home)

    @property
    def real_home(self) -> str:
        """The home's real path (the bound of store/confined.py's folders)."""
        return self._real_home

    @functools.cached_property
    def _scope(self) -> threading.local:
        return threading.local()

    @contextlib.contextmanager
    def same_folders(self) -> Iterator[None]:
        """Within this block, on this thread, the home and its own folders (``blobs/``, ``partials/``,
        ``tmp/``..., which the store never moves nor removes) are opened and checked once, and a folder below
        them is opened from its parent's descriptor, one component at a time without following a link: a
        publish of 300 files looked at its few folders 1,800 times. (Not every ``blobs/<ab>`` kept open: a
        publish of 800 blobs held 256 descriptors more, and a pull the open-file check let in failed, a review.)"""
        outer: dict[str, int] | None = getattr(self._scope, "folders", None)
        self._scope.folders = {} if outer is None else outer
        try:
            yield
        finally:
            if outer is None:
                for fd in self._scope.folders.values():
                    os.close(fd)
            self._scope.folders = outer

    @contextlib.contextmanager
    def folder(self, path: Path, create: bool = False) -> Iterator[int]:
        """The folder ``path`` of the store as opened (no link followed but the home's own), checked to lie
        inside the home (store/confined.py); ``create``: it and the folders above it made where missing, each
        in its parent as opened. What is made, renamed or linked in it is so relative to the descriptor: a
        member of a group that shares the store who swaps a folder for a link after the look leads nothing
        out of it (a review)."""
        if path != self.home and self.home not in path.parents:
            raise StoreError(f"refusing to change {path}: it is outside the store at {self.home}")
        cache: dict[str, int] | None = getattr(self._scope, "folders", None)
        if cache is None:
            fd = self._open_folder(path, create)
        elif path == self.home or (path.parent == self.home and path.name in _KEPT_OPEN):  # (never moved)
            key = os.fspath(path)
            if key not in cache:
                cache[key] = self._open_folder(path, create)
            yield cache[key]
            return
        else:
            with self.folder(path.parent, create) as parent:
                fd = _child(parent, path, create)
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_folder(self, path: Path, create: bool) -> int:
        try:
            return folder_within(path, self.real_home)
        except FileNotFoundError:
            if not create or path == self.home:
                raise
        with self.folder(path.parent, create=True) as parent, contextlib.suppress(FileExistsError):
            try:
                os.mkdir(path.name, dir_fd=parent)
            except OSError as error:
                raise named(error, path) from None
        return folder_within(path, self.real_home)

    def make_folders(self, path: Path) -> None:
        """``mkdir -p`` of a folder inside the store, each made in its parent as opened (raises OSError as
        mkdir does, StoreError for a link on the way)."""
        with self.folder(path, create=True):
            pass

    # Deletions go through the folder as opened (store/confined.py), never by the path checked: a member of a
    # group that shares the store who swapped a folder for a link between the check and the deletion had
    # another user's `rm` delete, outside the store, what bore the store's naming (a Hugging Face cache's
    # snapshot of the same commit: a review)

    def unlink(self, path: Path) -> int:
        """Delete a file inside the store; return the bytes freed (0 if it was already gone)."""
        name = self._own_name(path)
        try:
            with opened_folder(path.parent, self.real_home) as folder:
                size = os.stat(name, dir_fd=folder, follow_symlinks=False).st_size
                os.unlink(name, dir_fd=folder)
        except FileNotFoundError:
            return 0
        except StoreError:
            raise
        except OSError as error:
            raise os_error(named(error, path), f"deleting {path}") from error
        return size

    def rmtree(self, path: Path) -> None:
        """Delete a folder inside the store and everything in it (links are removed, never followed)."""
        name = self._own_name(path)
        try:
            with opened_folder(path.parent, self.real_home) as folder:
                remove_tree(folder, name)
        except StoreError:
            raise
        except OSError:
            pass  # (as far as it goes: a file another user owns stays, as shutil.rmtree's ignore_errors left it)

    def rmdir(self, path: Path) -> None:
        """rmdir(2) of a folder inside the store (raises OSError as rmdir does: not empty, missing)."""
        name = self._own_name(path)
        with opened_folder(path.parent, self.real_home) as folder:
            try:
                os.rmdir(name, dir_fd=folder)
            except OSError as error:
                raise named(error, path) from None

    def _own_name(self, path: Path) -> str:
        if path.name in ("", ".", ".."):
            raise StoreError(f"refusing to change {path}: it is outside the store at {self.home}")
        return path.name

    def rename(self, source: Path, target: Path) -> None:
        """rename(2), both ends inside the store, each in its folder as opened (raises OSError as rename
        does, naming both paths)."""
        self._both(os.rename, source, target)

    def replace(self, source: Path, target: Path) -> None:
        """:meth:`rename`, over a file at ``target``."""
        self._both(os.replace, source, target)

    def link(self, source: Path, target: Path) -> None:
        """link(2) of a file of the store (a link itself, never followed) to a new name in the store."""
        self._both(functools.partial(os.link, follow_symlinks=False), source, target)

    def _both(self, call: Callable[..., None], source: Path, target: Path) -> None:
        with self.folder(source.parent) as origin, self.folder(target.parent) as destination:
            try:
                call(
                    self._own_name(source), self._own_name(target), src_dir_fd=origin, dst_dir_fd=destination
                )
            except OSError as error:
                raise OSError(
                    error.errno, error.strerror, os.fspath(source), None, os.fspath(target)
                ) from None

    def symlink(self, link: Path, target: str) -> None:
        """The symbolic link ``link`` (in its folder as opened) holding ``target``."""
        with self.folder(link.parent) as folder:
            try:
                os.symlink(target, self._own_name(link), dir_fd=folder)
            except OSError as error:
                raise named(error, link) from None

    def symlinks(self, root: Path, links: Iterable[tuple[str, str]]) -> None:
        """Under the folder ``root`` of the store, each (path, target) pair's symbolic link ``path`` (a valid
        file path: no "..") holding ``target``, its folders made where missing: all in ``root`` as opened, each
        folder below it opened without following a link (a snapshot of 300 files opened ``root`` once), one at
        a time (a repo of 1,100 folders kept as many open and failed, "Too many open files": a review)."""
        by_folder: dict[str, list[tuple[str, str]]] = {}
        for path, target in links:
            parent, _, name = path.rpartition("/")
            by_folder.setdefault(parent, []).append((name, target))
        with self.folder(root) as top:
            for parent, entries in by_folder.items():
                try:
                    at = folders_in(top, parent) if parent else top
                except OSError as error:
                    raise named(error, root / parent) from None
                try:
                    for name, target in entries:
                        try:
                            os.symlink(target, name, dir_fd=at)
                        except OSError as error:
                            raise named(error, root / parent / name) from None
                finally:
                    if at != top:
                        os.close(at)

    def link_target(self, link: Path, sha256: str) -> str:
        """What a snapshot link at ``link`` holds: the relative way to blob ``sha256``."""
        return os.path.relpath(self.blob_path(sha256), link.parent)

    def holds_a_store(self) -> bool:
        """Whether a store is here (its index); a StoreError when this user may not read it."""
        try:
            found = self.index_path.is_file()
        except OSError as error:  # (a folder of another user's, 0700: is_file cannot look)
            raise StoreError(f"the store at {self.home} is not readable by this user ({_user(os.geteuid())}): "
                             f"{error.strerror or error}; {self.home} belongs to {_owner(self.home)}") from None  # fmt: skip
        effective = os.access in os.supports_effective_ids
        if found and not os.access(self.index_path, os.R_OK, effective_ids=effective):
            raise StoreError(f"the store at {self.home} is not readable by this user ({_user(os.geteuid())}; "
                             f"{self.index_path} belongs to {_owner(self.index_path)})")  # fmt: skip
        return found

    def not_the_stores(self) -> tuple[list[str], list[str]]:
        """What the home holds (a folder with no index) that is not the store's own, and which of the store's own
        folders hold something (a store whose index was lost: a new one would take every blob for garbage). A
        store is made only in a new or empty folder, or one a store's creation left with its folders empty,
        never in a folder of the user's (`--home ~/projects` made a store in it, and the next import deleted the
        files of its tmp/, gc those of its blobs/: an explorer's trial). Hidden names and lost+found (a file
        system's own: a disk mounted there for the store) do not count."""
        try:
            names = os.listdir(self.home)
        except FileNotFoundError:
            return [], []
        except OSError as error:
            raise os_error(error, f"looking at {self.home} before making a store there") from error
        theirs = sorted(name for name in names if name not in _STORE_NAMES and not name.startswith(".")
                        and not name.startswith("index.db") and name != "lost+found")  # fmt: skip
        filled = []
        for name in sorted(_STORE_FOLDERS & set(names)):
            try:
                if os.listdir(self.home / name):
                    filled.append(name)
            except OSError:  # (not a folder, or not readable: not the store's)
                theirs.append(name)
        return theirs, filled

    def read_only_reason(self) -> str | None:
        """Why this process may only read the store, as in "the store at X is ...": it is on a read-only
        mount, or its files are another user's and this one may not write them (a store an admin fills in
        /opt/models, huggingface_hub#2797); None when it may write it."""
        if self.on_read_only_mount():
            return "on a read-only file system"
        if refuses_writes(self.home):
            return REFUSES_WRITES
        effective = os.access in os.supports_effective_ids
        for path in (self.home, self.index_path, self.lock_path.parent, self.blobs, self.snapshots):
            try:
                writable = not path.exists() or os.access(path, os.W_OK, effective_ids=effective)
            except OSError:
                continue
            if not writable:
                return f"not writable by this user ({_user(os.geteuid())}; {path} belongs to {_owner(path)})"
        return None

    def on_read_only_mount(self) -> bool:
        """Whether the store's home exists on a file system mounted read-only (a container's read-only
        root or volume, a read-only NFS export): nobody writes there, so the store is only read."""
        try:
            return bool(os.statvfs(self.home).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    def free_bytes(self) -> int | None:
        """Bytes free for this user on the store's file system (None when it cannot be asked)."""
        try:
            found = os.statvfs(self.home)
        except OSError:
            return None
        return found.f_bavail * found.f_frsize

    def create(self) -> None:
        """The store's folders, made where missing. The user's own cache store (``$XDG_CACHE_HOME/modeldepot``,
        or ``~/.cache/modeldepot``), made here, is the user's alone (0700, as the XDG spec makes a user's cache
        folders): its blobs take the umask's mode, 0444 whatever a private repo's source was, and its index
        names the repos; any local user read them (a security trial). A folder named for the store (a team's,
        a service's) keeps the mode it is made with, and a store a group shares its group's."""
        try:
            if not self.home.exists() and self.home == personal_cache_home() and not group_shared(self.home):
                self.home.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):  # (another process made it a moment ago)
                    self.home.mkdir(mode=0o700)
            for directory in (self.home, self.blobs, self.snapshots, self.tmp, self.partials, self.quarantine,
                              self.lock_path.parent):  # fmt: skip
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise os_error(error, f"creating the store at {self.home}") from error


# What a store's home holds: its folders, which hold files once it is used; the index's (index.db and its
# journals, index.py's reserve/, locks/); notes beside it (transfer/liars.py, mirror/marks.py, tiers.py)
_STORE_FOLDERS = frozenset({"blobs", "snapshots", "tmp", "partials", "quarantine"})
_STORE_NAMES = _STORE_FOLDERS | {"locks", "reserve", "liars.json", "mirror-broken.json", "shared-refused"}


# The home's own folders that no process ever moves or removes (reserve/ goes and comes back: SpaceReserve)
_KEPT_OPEN = frozenset({"blobs", "snapshots", "tmp", "partials", "quarantine", "locks"})


def _child(parent: int, path: Path, create: bool) -> int:
    """A descriptor of the folder ``path``, named in the folder ``parent`` is, never through a link (made
    first if missing, ``create``)."""
    for attempt in range(2):
        try:
            return os.open(
                path.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
            )
        except FileNotFoundError:
            if not create or attempt:
                raise named(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)), path) from None
            with contextlib.suppress(FileExistsError):
                try:
                    os.mkdir(path.name, dir_fd=parent)
                except OSError as error:
                    raise named(error, path) from None
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StoreError(f"refusing to use {path}: it is a link or no folder, and the store's own "
                                 "folders never are (move it away)") from None  # fmt: skip
            raise named(error, path) from None
    raise AssertionError("unreachable")


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _owner(path: Path) -> str:
    try:
        return _user(path.stat().st_uid)
    except OSError:
        return "another user"


def _trusted(what: str, check: Callable[[object], object], value: str) -> None:
    """Run a validator on a name the store is about to turn into a path; a failure is the index's (or an
    upstream's) fault, not the caller's, so it is a StoreError."""
    try:
        check(value)
    except InvalidInputError as error:
        raise StoreError(f"refusing to build a path from an invalid {what}: {error}") from None
