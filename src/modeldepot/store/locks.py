"""The store-wide lock that keeps blob deletion away from blob placement.

Correctness comes from atomic renames and index transactions; the lock closes the one window those
leave open: a writer that has placed (or found) a blob file but not yet committed the rows that
reference it must not see that file deleted by gc or remove. Writers take the lock shared, deleters
exclusive. ``flock`` locks belong to an open file description, so they also exclude threads of one
process, and the kernel drops them when a process dies, even by SIGKILL: no stale locks.
Always taken before an index transaction, never while one is open.

Every ``flock`` of the store is taken through :func:`take_flock` (one way, so that none is missed): a child
forked while other threads of its parent held locks (a gunicorn worker forked as the master's warm-up thread
pulled) shares those open file descriptions, and so held the locks on after the parent was killed: `rm`
refused ("a pull is running", naming the dead pid), a new pull of the file waited, status said
"downloading", for the worker's whole life (an explorer's trial). The child lets go of its copies of other
threads' locks at once (:func:`_let_go_in_child`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from modeldepot.store.confined import open_within

__all__ = [
    "StoreLock",
    "close_keeping_lock",
    "flock_holder",
    "held_exclusively",
    "lock_is_held",
    "note_flock",
    "process_state",
    "take_flock",
    "unlock_and_close",
]

log = logging.getLogger(__name__)

# Seconds a wait for a lock another process holds goes on before it is said, and between two sayings
WAIT_SAID, WAIT_SAID_AGAIN = 5.0, 60.0


@dataclass(frozen=True)
class _Taken:
    thread: int | None  # the thread that took it; None: the process's (every child lets go of it)
    file: tuple[int, int]  # (st_dev, st_ino) of the file locked: a number reused for another file is not it


# The descriptors holding this process's flocks (see the module's docstring). A plain dict: the child reads it
# with no lock of a thread that may not be there.
_TAKEN: dict[int, _Taken] = {}


def take_flock(fd: int, mode: int, *, for_the_process: bool = False) -> None:
    """``fcntl.flock(fd, mode)``, noted as this thread's lock (``for_the_process``: the whole process's, for as
    long as it lives) until :func:`unlock_and_close` or :func:`close_keeping_lock`. A child forked by another
    thread (any thread, for the process's) lets go of its copy."""
    noted = fd in _TAKEN
    note_flock(fd, for_the_process=for_the_process)  # (first: a fork just after the lock sees it noted)
    try:
        fcntl.flock(fd, mode)
    except BaseException:
        if not noted:
            _TAKEN.pop(fd, None)
        raise


def note_flock(fd: int, *, for_the_process: bool = False) -> None:
    """Note ``fd`` as holding a lock of this thread's (a ``dup`` of a descriptor :func:`take_flock` locked)."""
    info = os.fstat(fd)
    _TAKEN[fd] = _Taken(None if for_the_process else threading.get_ident(), (info.st_dev, info.st_ino))


def unlock_and_close(fd: int) -> None:
    """Close ``fd``, letting go of the ``flock`` it holds first. A child forked while it was held shares its
    open file description, and a close alone leaves the lock to that description until the child exits: a
    worker forked while another thread pulled kept `rm` refused ("a pull is running") for its whole life,
    and one forked during a write waited for ever on the lock its own copy held (a trial)."""
    _TAKEN.pop(fd, None)
    with contextlib.suppress(OSError):  # (a file system without flock: nothing to let go of)
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def close_keeping_lock(fd: int) -> None:
    """Close ``fd`` whose lock another descriptor of the same open file (its ``dup``) holds on."""
    _TAKEN.pop(fd, None)
    os.close(fd)


def _let_go_in_child() -> None:
    """In a forked child: let go of its copies of the locks other threads of the parent held (and of the
    process's). Not by closing them: the objects that own those numbers are still in the child's memory, and
    one freed later would close the number again, by then another file's (a socket, a blob read). Each is
    made a descriptor of /dev/null instead (``dup2``), the parent's lock left to the parent alone."""
    me = threading.get_ident()
    theirs = [(fd, taken) for fd, taken in list(_TAKEN.items()) if taken.thread != me]
    if not theirs:
        return
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        for fd, taken in theirs:
            _TAKEN.pop(fd, None)
            with contextlib.suppress(OSError):
                info = os.fstat(fd)
                if (info.st_dev, info.st_ino) == taken.file:
                    os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


os.register_at_fork(after_in_child=_let_go_in_child)


@contextmanager
def held_exclusively(
    path: Path, within: str, mode: int = 0o664, *, or_without: bool = False
) -> Iterator[None]:
    """The lock file ``path`` (made if missing; inside ``within``, never through a link: store/confined.py)
    ``flock()``ed exclusively for the block, waiting for it. ``or_without``: a lock file that cannot be opened
    (no room, another user's) is done without: the block runs unlocked, as it would without the lock."""
    try:
        fd = open_within(path, os.O_RDWR | os.O_CREAT, mode, within)
    except OSError:
        if not or_without:
            raise
        yield
        return
    try:
        take_flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        unlock_and_close(fd)


class StoreLock:
    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only  # a store on a read-only mount: nobody writes it, nothing to lock out
        # The store's home (``path`` is in its locks/): a link in place of the file, or of locks/, leads nowhere
        # out of it (one made root create /etc/nologin: an explorer's trial; store/confined.py)
        self._within = os.path.realpath(path.parent.parent)

    @contextmanager
    def _hold(self, mode: int) -> Iterator[None]:
        if self.read_only:
            yield
            return
        fd = open_within(self.path, os.O_RDWR | os.O_CREAT, 0o664, self._within)
        try:
            try:
                take_flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                self._wait(fd, mode)
            yield
        finally:
            unlock_and_close(fd)

    def _wait(self, fd: int, mode: int) -> None:
        """Block for the lock, saying who holds it once the wait is long (a gc suspended by Ctrl-Z held every
        import, rm and pull waiting for ever, without a word: a trial)."""
        done = threading.Event()

        def say() -> None:
            while not done.wait(WAIT_SAID if not said else WAIT_SAID_AGAIN):
                pid = flock_holder(self.path)
                who = "another process" if pid is None else f"process {pid}"
                if pid == os.getpid():
                    # (another thread of this one: a node's pulls making room one at a time; said again, a
                    # warning: a thread of this one waiting for its own lock would hang unsaid)
                    (log.warning if said else log.info)(
                        "waiting for the store's lock (%s), which another write of this process holds (room made "
                        "in the disk budget, an eviction)", self.path.name)  # fmt: skip
                elif pid is not None and process_state(pid) == "T":
                    log.warning("waiting for the store's lock (%s), which %s holds and is suspended (Ctrl-Z or "
                                "SIGSTOP): `kill -CONT %d` lets it go on", self.path.name, who, pid)  # fmt: skip
                else:
                    log.warning("waiting for the store's lock (%s), which %s holds (a gc, a removal or a write "
                                "under way)", self.path.name, who)  # fmt: skip
                said.append(True)

        said: list[bool] = []
        notice = threading.Thread(target=say, name="lock-wait-notice", daemon=True)
        notice.start()
        try:
            take_flock(fd, mode)
        finally:
            done.set()

    def shared(self) -> AbstractContextManager[None]:
        return self._hold(fcntl.LOCK_SH)

    def exclusive(self) -> AbstractContextManager[None]:
        return self._hold(fcntl.LOCK_EX)

    @contextmanager
    def exclusive_if_free(self) -> Iterator[bool]:
        """The lock exclusively if nobody holds it now (True), else at once False: for upkeep that may
        as well wait for the next writer."""
        if self.read_only:
            yield False
            return
        fd = open_within(self.path, os.O_RDWR | os.O_CREAT, 0o664, self._within)
        try:
            try:
                take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            unlock_and_close(fd)


def lock_is_held(path: Path | str, folder: int | None = None) -> bool | None:
    """Whether a live process holds a ``flock`` on ``path`` (shared or exclusive); None when there is no
    such file. The kernel drops a dead process's locks, so a held lock means a live holder. ``folder``: the
    descriptor of the folder ``path`` (a name) is in, never opened through a link (store/confined.py)."""
    flags = os.O_RDONLY | os.O_CLOEXEC  # (flock needs no write access: a read-only mount)
    if folder is not None:
        flags |= os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, dir_fd=folder)
    except FileNotFoundError:
        return None
    try:
        take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        unlock_and_close(fd)
    return False


def flock_holder(path: Path) -> int | None:
    """The pid of a process holding a ``flock`` on ``path`` (``/proc/locks``), None when none does or it
    cannot be told (no procfs; a holder in another pid namespace shows as none)."""
    try:
        info = os.stat(path)
        same_inode: list[int] = []
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                # "1: FLOCK  ADVISORY  WRITE 28045 fe:00:2343248 0 EOF" (a waiter's: "1: -> FLOCK ...")
                fields = line.split()
                if len(fields) < 6 or fields[1] != "FLOCK":
                    continue
                major, minor, inode = fields[5].split(":")
                if int(inode) != info.st_ino or int(fields[4]) <= 0:
                    continue
                if os.makedev(int(major, 16), int(minor, 16)) == info.st_dev:
                    return int(fields[4])
                same_inode.append(int(fields[4]))
        # (btrfs and some overlays show another device number there than stat() does: the inode alone,
        # when one process holds a lock of it)
        return same_inode[0] if len(set(same_inode)) == 1 else None
    except (OSError, ValueError):
        pass
    return None


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``R``, ``S``, ``D``; ``T`` stopped: Ctrl-Z, SIGSTOP), None
    when it is gone or cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None
