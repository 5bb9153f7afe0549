"""Blob files: written as partials in tmp/, placed under blobs/ by atomic link or rename, read by mmap.

The write protocol (the only way bytes enter blobs/):

1. ``WriteSession.new_partial``: a new file in the writer's session folder under tmp/ (the session's lock
   tells gc whether its writer is alive), preallocated to its final size (a full disk fails here);
2. bytes are written while they are hashed; writeback starts block by block so the final fsync is short;
3. ``fsync`` the file; the caller checks the digests;
4. ``BlobFiles.place``: made read-only, then renamed (a download's file: linked) to ``blobs/<ab>/<sha256>``
   and the directory fsynced; only then may an index transaction reference it. A kill before the index
   commit leaves an orphan file that no row names: invisible, and removed by gc.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from modeldepot.errors import CorruptBlobError, StoreError
from modeldepot.store.confined import named, open_within, opened_folder, write_within
from modeldepot.store.layout import StoreLayout, fsync_dir, fsync_file, os_error, size_text
from modeldepot.store.locks import forget_and_close, lock_file, lock_is_held, take_flock, unlock_and_close

__all__ = [
    "UNRECORDED_MODE",
    "BlobFiles",
    "LinkedSource",
    "PartialBlob",
    "WriteSession",
    "file_stamp",
    "give_back_mode",
    "give_back_modes",
    "start_writeback",
    "written_since",
]

_SYNC_FILE_RANGE_WRITE = 2
STARTING_SESSION_FRESH = 60.0  # seconds an unlocked session under its dot-name is taken to be starting
STARTING_SESSION_GRACE = 3600.0  # seconds a session may sit under its dot-name while its pid is alive


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return,unused-ignore]


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now (Linux), so the final fsync waits less."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# The mode a ``linked_sources`` row holds for a blob linked in before the store recorded such files (schema
# 9): its file of the user's, and that file's mode, are unknown (store.py notes them on the upgrade)
UNRECORDED_MODE = -1


@dataclass(frozen=True)
class LinkedSource:
    """The file of the user's a blob is a hard link of, and the mode it had before the store took it."""

    path: Path
    inode: tuple[int, int]  # (device, inode)
    mode: int


class PartialBlob:
    """A file being written inside a write session, or a download's finished file (``keep_name``: placing
    links it, and the download removes its name). Removed on ``discard`` unless it was placed."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.written = 0
        self.placed = False
        # A download's file placed under the blob's name (no inode left for a link): should its publish
        # fail, it is put back under its own, for the next pull to resume, not deleted with the blob
        self.name_taken = False
        self.keep_name = False
        self.writeback = True  # start writing each block to disk as it is written (for a quick fsync)
        # A hard link to a file of the user's (import --link, adopt), made read-only: the mode it had, given
        # back when the partial is not placed (its content was in the store already, the import failed)
        self.mode_to_restore: int | None = None
        self.read_only = 0o444  # (a linked file's: its own readers only, read_only_mode)
        self.linked_from: Path | None = None
        self.linked_inode: tuple[int, int] | None = None
        self.stamp: FileStamp | None = None  # (a linked file: see hashed)
        # (A linked file:) a descriptor of it holding the exclusive flock that keeps a second import from
        # linking the same file, until this partial is discarded (its session ends: placed by then, or not)
        self.link_lock = -1

    def write(self, data: memoryview) -> None:
        try:
            while data:
                n = os.pwrite(self.fd, data, self.written)
                if self.writeback:
                    start_writeback(self.fd, self.written, n)
                self.written += n
                data = data[n:]
        except OSError as error:
            raise os_error(error, "writing a blob") from error

    def sync(self, durable: bool = True) -> None:
        """Make the file read-only and release the descriptor, the bytes durable first (``durable``; else
        they reach the disk later: store/durability.py)."""
        try:
            if self.written != self.size:
                os.ftruncate(self.fd, self.written)
            os.fchmod(self.fd, self.read_only)
            if durable:
                os.fsync(self.fd)
        except OSError as error:
            raise os_error(error, "flushing a blob to disk") from error
        finally:
            self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            forget_and_close(self.fd)  # (a linked file's: its lock, if any, is link_lock's now)
            self.fd = -1

    def keep_mode(self, source: Path, mode: int) -> None:
        """This partial is a hard link to ``source``, a file of the user's, about to be made read-only:
        ``mode`` is given back if it is not placed, by :meth:`discard`, or by gc when its writer was killed
        (written beside it: :func:`give_back_modes`). A file another store took first is read-only already:
        the mode it had before is the one that store noted on the file (:func:`_mode_before_stores`)."""
        linked = os.stat(self.path, follow_symlinks=False)
        mode = _mode_before_stores(self.path, mode)
        self.mode_to_restore = mode
        self.read_only = read_only_mode(mode)
        self.linked_from = source
        self.linked_inode = (linked.st_dev, linked.st_ino)
        # (beside it in its session's folder, as opened: tmp/<session>/, store/confined.py)
        write_within(_mode_file(self.path), json.dumps({"mode": mode, "source": str(source),
                     "inode": list(self.linked_inode)}).encode(), os.path.realpath(self.path.parents[2]))  # fmt: skip

    def linked_source(self) -> LinkedSource | None:
        """The file of the user's this partial is a hard link of (:meth:`keep_mode`), if any."""
        if self.linked_from is None or self.mode_to_restore is None or self.linked_inode is None:
            return None
        return LinkedSource(self.linked_from, self.linked_inode, self.mode_to_restore)

    def hashed(self) -> None:
        """Its bytes were just hashed: what a write would move is noted, for :meth:`changed_since_hashed`."""
        self.stamp = file_stamp(os.stat(self.path))

    def changed_since_hashed(self) -> bool:
        """Whether the file was written since :meth:`hashed` (a writer that had a linked file of the user's
        open before it was made read-only): its digests would not be its bytes'."""
        return self.stamp is not None and written_since(self.stamp, file_stamp(os.stat(self.path)))

    def discard(self) -> None:
        self._close()
        if self.mode_to_restore is not None and self.linked_from is not None:
            # (placed too: a failed import takes its placed blobs out again, and the user's file was left 0444)
            give_back_mode(self.path, self.linked_from, self.mode_to_restore, self.linked_inode)
        if not self.placed:
            with contextlib.suppress(FileNotFoundError):
                _mode_file(self.path).unlink()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.release_link_lock()  # (last: no other import links the file before its mode is given back)

    def release_link_lock(self) -> None:
        if self.link_lock >= 0:
            unlock_and_close(self.link_lock)
            self.link_lock = -1


FileStamp = tuple[int, int]


def read_only_mode(mode: int) -> int:
    """The mode a linked file of the user's takes as a blob: its write bits gone, and no reader added (a
    0600 fine-tune made 0444 was anyone's to read: a trial)."""
    return 0o400 | (mode & 0o444)


def file_stamp(info: os.stat_result) -> FileStamp:
    """What a write moves: the size and the mtime."""
    return info.st_size, info.st_mtime_ns


def written_since(before: FileStamp, now: FileStamp) -> bool:
    """Whether a file was written between two stamps. (Not the change time: a link made and dropped
    elsewhere, another import's chmod, an `rm` of another name move it and nothing else, and failed imports
    beside them; a writer that also puts the mtime back is left, as rot is, to the chunk checks of every
    send, the scrub and `verify`.)"""
    return now != before


# An extended attribute on a file of the user's a store took: its mode before any store did, for the next
# store that takes it (it finds the file read-only) and for whichever lets go of it last.
_MODE_ATTRIBUTE = "user.modeldepot.mode"


def _mode_before_stores(path: Path, mode: int) -> int:
    """The mode of the file ``path`` links (now ``mode``) before any store took it: the one noted on it, while
    another store holds it (a name besides the user's and this partial) and it is still as that store left
    it; else ``mode``, noted now (a note no store holds to any more, left by a kill, says nothing of a mode
    the user set since: trusted, it widened a file the user had made read-only, a review). Without extended
    attributes, ``mode``: a file another store took then keeps its read-only mode when the stores let go."""
    with contextlib.suppress(OSError, ValueError):
        noted = int(os.getxattr(path, _MODE_ATTRIBUTE, follow_symlinks=False))
        held_elsewhere = os.stat(path, follow_symlinks=False).st_nlink > 2
        if held_elsewhere and 0 <= noted <= 0o7777 and read_only_mode(noted) == mode:
            return noted
    with contextlib.suppress(OSError):
        os.setxattr(path, _MODE_ATTRIBUTE, str(mode).encode(), follow_symlinks=False)
    return mode


def _mode_file(partial: Path) -> Path:
    return partial.with_name(partial.name + ".mode")


def give_back_mode(partial: Path, source: Path, mode: int, inode: tuple[int, int] | None = None) -> None:
    """Give a linked file of the user's its mode back, only while the user's name of it still names it
    (``inode``: the file linked; the partial's, when not noted) and it has no other name than that one and
    the partial: another (the store's blob, placed and committed; another partial of the same file) must
    stay read-only. A blob placed and never committed (a failed import took it out again; gc deleted a
    killed one's) is no name any more: the mode comes back."""
    with contextlib.suppress(OSError):
        try:
            ours = os.stat(partial, follow_symlinks=False)
        except FileNotFoundError:
            ours = None  # (placed into blobs/, or discarded)
        if inode is None:
            if ours is None:
                return
            inode = (ours.st_dev, ours.st_ino)
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            theirs = os.fstat(fd)
            names = theirs.st_nlink - (ours is not None and (ours.st_dev, ours.st_ino) == tuple(inode))
            # (and still as the import left it: a mode kept names a file of the user's, never one to widen)
            if (
                (theirs.st_dev, theirs.st_ino) == tuple(inode)
                and names == 1
                and stat.S_IMODE(theirs.st_mode) == read_only_mode(mode)
            ):
                os.fchmod(fd, mode & 0o7777)
                with contextlib.suppress(OSError):  # (no store holds it now)
                    os.removexattr(fd, _MODE_ATTRIBUTE)
        finally:
            os.close(fd)


def give_back_modes(session: Path) -> dict[Path, tuple[int, int]]:
    """Before a dead writer's session is deleted (gc): the files of the user's it linked and made read-only
    get their modes back (an `import --link` killed midway left them 0444 for good). Returns the notes of
    those kept read-only because they have another name still (a blob placed, committed or not), with the
    (device, inode) of each."""
    waiting: dict[Path, tuple[int, int]] = {}
    for kept in session.glob("*.mode"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            noted = json.loads(kept.read_text())
            inode = noted.get("inode")
            linked = None if inode is None else (int(inode[0]), int(inode[1]))
            partial = kept.with_name(kept.name[: -len(".mode")])
            give_back_mode(partial, Path(noted["source"]), int(noted["mode"]), linked)
            theirs = os.stat(noted["source"], follow_symlinks=False)
            # (the session's own link of it goes with the session: not a name that keeps it read-only)
            ours = 1 if partial.exists() and os.stat(partial).st_ino == theirs.st_ino else 0
            if linked is not None and (theirs.st_dev, theirs.st_ino) == linked and theirs.st_nlink - ours > 1:
                waiting[kept] = linked
    return waiting


def _lock_new_session(fd: int) -> None:
    """Lock a new session's lock file. A sweep of tmp/ (another writer's start) may hold it for an instant,
    probing whether its writer lives (``lock_is_held``): a start failed on that instant, "resource temporarily
    unavailable" (a CI run's trial). Tried again for a while; no other holder keeps it."""
    for _ in range(200):
        try:
            take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.005)
    take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class WriteSession:
    """A private folder in tmp/ for one writer's partial files, alive while its lock file is flock()ed.

    One lock per session (not per file) keeps descriptor use constant however many files a repo has.
    gc removes a session whose lock it can take: its writer is gone (ended, crashed or killed).
    Use as a context manager: the folder and every unplaced partial in it go away on exit.
    """

    LOCK_NAME = ".lock"

    def __init__(self, layout: StoreLayout) -> None:
        name = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.layout = layout
        self.path = layout.tmp / name
        self._partials: list[PartialBlob] = []
        self.link_locks = 0  # linked files' locks taken (store/importer.py: at most a share of the fd limit)
        # Locked under a dot-name first, then renamed: gc never sees a session whose lock is not yet held.
        starting = layout.tmp / f".{name}"
        self._lock_fd = -1
        try:
            # (in tmp/ as opened: a link in its place had the folder and its lock made outside the store before
            # the guard refused, an explorer's trial; store/confined.py)
            with opened_folder(layout.tmp, os.path.realpath(layout.home)) as tmp:
                os.mkdir(starting.name, dir_fd=tmp)
                with opened_folder(starting, os.path.realpath(layout.home)) as folder:
                    self._lock_fd = lock_file(
                        os.open,
                        self.LOCK_NAME,
                        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o666,
                        dir_fd=folder,
                    )
                _lock_new_session(self._lock_fd)
                os.rename(starting.name, name, src_dir_fd=tmp, dst_dir_fd=tmp)
        except StoreError:
            raise  # (a link in place of tmp/: said as such, nothing made)
        except OSError as error:
            if (
                self._lock_fd >= 0
            ):  # (its lock goes with it: kept, it was held, unused, for the process's life)
                unlock_and_close(self._lock_fd)
            layout.rmtree(starting)
            if not error.filename or not os.path.isabs(
                os.fsdecode(error.filename)
            ):  # (relative to tmp/'s descriptor)
                error = named(error, starting)
            raise os_error(error, "starting a write in the store's tmp/") from error

    @classmethod
    def _starting_is_abandoned(cls, session_dir: Path, fresh: float = 0.0) -> bool:
        """A session still under its dot-name: its writer is between mkdir and rename, or died there. Its lock
        held, it lives whatever the pid says; so does one younger than ``fresh`` seconds (a removal's sweep,
        which runs often: a writer in another pid namespace, a container sharing the store, is one no kill
        sees, and its start would fail)."""
        if lock_is_held(session_dir / cls.LOCK_NAME) is True:
            return False
        try:
            age = time.time() - session_dir.lstat().st_mtime
        except FileNotFoundError:
            return False  # (renamed meanwhile: started)
        if age < fresh:
            return False
        pid_text = session_dir.name[1:].split("-", 1)[0]
        try:
            os.kill(int(pid_text), 0)
        except (ValueError, ProcessLookupError):
            return True  # not one of our names, or its writer is gone
        except PermissionError:
            pass  # alive, as another user
        # Alive, or the pid was reused: only a session stuck far longer than any start takes is dead.
        return age > STARTING_SESSION_GRACE

    def new_partial(self, size: int) -> PartialBlob:
        """A new partial file, preallocated to ``size`` so a full disk fails before any work is done."""
        path = self.path / f"{len(self._partials)}.partial"
        try:  # (in the session's folder as opened: a link put in its place leads nowhere, store/confined.py)
            fd = open_within(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666, self.layout.real_home)
        except OSError as error:
            raise os_error(error, "creating a file in the store's tmp/") from error
        partial = PartialBlob(path, fd, size)
        self._partials.append(partial)
        if size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as error:
                partial.discard()  # (the room it took given back first: the free figure is then true)
                free = self.layout.free_bytes()
                had = f" (it has {size_text(free)} free)" if free is not None else ""
                raise os_error(error, f"reserving {size_text(size)} in the store{had}") from error
        return partial

    def close(self) -> None:
        for partial in self._partials:
            partial.discard()
        self.layout.rmtree(self.path)
        unlock_and_close(self._lock_fd)

    def __enter__(self) -> WriteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def is_abandoned(cls, session_dir: Path, fresh: float = 0.0) -> bool:
        """True if no live process holds the session's lock (or it never got one); ``fresh``: a session still
        starting and younger than that is not (:meth:`_starting_is_abandoned`)."""
        if session_dir.name.startswith("."):
            return cls._starting_is_abandoned(session_dir, fresh)
        return lock_is_held(session_dir / cls.LOCK_NAME) is not True


_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)


class BlobFiles:
    """The blob files under blobs/: placing, opening, mapping, quarantining, deleting."""

    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout

    def path(self, sha256: str) -> Path:
        return self.layout.blob_path(sha256)

    def place(self, partial: PartialBlob, sha256: str, durable: bool = True) -> None:
        """Publish a verified partial as blob ``sha256``. Hold the store lock shared while calling.

        A file there already (an orphan of unknown history, a blob not checked since a restart, or the copy
        another writer placed a moment ago: writers look at the index before they place, under the shared
        lock, so two may place one blob) is replaced only by bytes made durable first: its row may say
        durable, or be marked so by another process's flush, and nothing would ever flush the new file.

        A partial that readers may find by its name (``keep_name``: a download in progress, served to
        peers) is linked, and keeps its name until its owner lets it go once the index has the blob: no
        moment between the placing and the commit finds neither, and a commit that fails leaves the
        download whole for a resume. Others are linked and unlinked (renamed where the file system has no
        hard links, or no inode left for one): a link never replaces a file, so placing over one is known.
        """
        target = self.path(sha256)
        try:
            self.layout.make_folders(target.parent)
            if not (partial.keep_name and self._link(partial.path, target)):
                self._move(partial.path, target)
                partial.name_taken = partial.keep_name
            partial.placed = True
            partial.release_link_lock()  # (the store holds the file now: another import finds it there)
            if durable:
                fsync_dir(target.parent)
                # (blobs/ too: its <ab>/ entry may be new, made by this writer or by another a moment ago)
                fsync_dir(target.parent.parent)
        except OSError as error:
            raise os_error(error, f"placing blob {sha256[:16]}…") from error

    def _link(self, source: Path, target: Path) -> bool:
        """Link ``target`` to ``source`` (over a file there, ``source`` made durable first); False where the
        file system has no hard links for it (then placing renames, as for a write session)."""
        try:
            try:
                self.layout.link(source, target)
            except FileExistsError:
                fsync_file(source)
                spare = target.with_name(f".{target.name}.{secrets.token_hex(4)}")  # gc's after a kill
                self.layout.link(source, spare)
                self.layout.replace(spare, target)
        except OSError as error:
            if error.errno in (*_NO_HARD_LINKS, errno.ENOSPC, errno.EDQUOT):  # (no inode left for a link)
                return False
            raise
        return True

    def _move(self, source: Path, target: Path) -> None:
        """``source`` becomes ``target``; a file there is replaced only once ``source`` is durable."""
        try:
            self.layout.link(source, target)
        except FileExistsError:
            fsync_file(source)
            self.layout.replace(source, target)
            return
        except OSError as error:
            # (no links here; or none left: on tmpfs a link takes an inode of its own, a rename none)
            if error.errno not in (*_NO_HARD_LINKS, errno.ENOSPC, errno.EDQUOT):
                raise
            if os.path.lexists(target):  # (a writer placing at this very moment goes unseen here: no links)
                fsync_file(source)
            self.layout.replace(source, target)
            return
        self.layout.unlink(source)

    def open(self, sha256: str, size: int) -> int:
        """An fd for reading the blob, after a cheap check that it is there with the right size."""
        try:
            fd = os.open(self.path(sha256), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptBlobError(sha256, "its file is missing") from None
        except OSError as error:
            raise os_error(error, f"opening blob {sha256[:16]}…") from error
        actual = os.fstat(fd).st_size
        if actual != size:
            os.close(fd)
            raise CorruptBlobError(sha256, f"its file holds {actual} bytes, the index says {size}")
        return fd

    def quarantine(self, sha256: str) -> Path | None:
        """Move a bad blob out of blobs/ (so nothing can open it); returns where it went."""
        source = self.path(sha256)
        target = self.layout.quarantine / sha256
        if target.exists():
            target = self.layout.quarantine / f"{sha256}.{int(time.time())}.{secrets.token_hex(2)}"
        try:
            self.layout.rename(source, target)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise os_error(error, f"quarantining blob {sha256[:16]}…") from error
        fsync_dir(source.parent)
        fsync_dir(target.parent)
        return target

    def drop_quarantined(self, sha256s: Collection[str]) -> int:
        """Delete the quarantined copies of blobs placed good again (a pull or an import restored them): a
        failing disk's corrupt copies stayed until `gc`, a repaired node's disk holding twice what every
        figure said (an explorer's trial). Returns the bytes freed (none of a copy another name links: an
        `import --link` folder's file)."""
        wanted = set(sha256s)
        try:
            names = os.listdir(self.layout.quarantine) if wanted else []
        except OSError:
            return 0
        freed = 0
        for name in names:
            if name.split(".", 1)[0] not in wanted:
                continue
            path = self.layout.quarantine / name
            try:
                linked = os.lstat(path).st_nlink > 1
                size = self.layout.unlink(path)
            except (OSError, StoreError):
                continue
            freed += 0 if linked else size
        return freed

    def put_back(self, sha256: str, partial: PartialBlob) -> bool:
        """Rename a blob placed and never committed back to the download's file it was (``name_taken``);
        False, having done nothing, when that name is taken again or the rename fails (the caller deletes
        the blob)."""
        blob = self.path(sha256)
        try:
            # (its claim is held: no other pull writes that name; a waiter of a one-chunk download may have made
            # it anew, and keeps it: a link never replaces a name, a rename only after a look, where no link
            # can be made)
            try:
                self.layout.link(blob, partial.path)
            except FileExistsError:
                return False
            except OSError:
                if os.path.lexists(partial.path):
                    return False
                self.layout.rename(blob, partial.path)
            else:
                self.layout.unlink(blob)
        except OSError:  # (a StoreError too: a link in place of partials/)
            return False
        partial.placed = partial.name_taken = False
        return True

    def delete(self, sha256: str, linked: LinkedSource | None = None, unrecorded: bool = False) -> int:
        """Unlink a blob file; returns the bytes freed. Hold the store lock exclusively.

        A blob that is a hard link of a file of the user's (``linked``: an `import --link` folder's, an
        adopted Hugging Face cache's) was made read-only when the store took it: its mode comes back, the
        one it had then, when that file is still the one linked, still as the store left it, and now its
        only name (a removed `--link` import left the user's files read-only for good: a trial). Never
        another name's: guessed from the link count alone, a read-only cache's files were made writable,
        and so were another store's blobs of the same cache (a trial). ``unrecorded``: the store linked
        files before it recorded them (schema 9): a blob with no record gets its owner's write bit back
        when its last other name is the user's, as before (a review: such files stayed read-only)."""
        path = self.path(sha256)
        fd = -1
        if linked is None and unrecorded:
            with (
                contextlib.suppress(OSError),
                self.layout.folder(path.parent) as folder,
            ):  # (gone: unlink says)
                fd = os.open(path.name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=folder)
        try:
            freed = self.layout.unlink(path)
            if fd >= 0:
                info = os.fstat(fd)
                if info.st_nlink == 1 and not info.st_mode & stat.S_IWUSR and info.st_uid == os.geteuid():
                    with contextlib.suppress(OSError):
                        os.fchmod(fd, stat.S_IMODE(info.st_mode) | stat.S_IWUSR)
        finally:
            if fd >= 0:
                os.close(fd)
        if linked is not None:
            give_back_mode(path, linked.path, linked.mode, linked.inode)
        return freed
