"""The store-wide lock that keeps blob deletion away from blob placement.

Correctness comes from atomic renames and index transactions; the lock closes the one window those
leave open: a writer that has placed (or found) a blob file but not yet committed the rows that
reference it must not see that file deleted by gc or remove. Writers take the lock shared, deleters
exclusive. ``flock`` locks belong to an open file description, so they also exclude threads of one
process, and the kernel drops them when a process dies, even by SIGKILL: no stale locks.
Always taken before an index transaction, never while one is open.

Every file this process ``flock``s is opened through :func:`lock_file` and locked through :func:`take_flock`
(one way, so that none is missed; a test keeps ``fcntl.flock`` out of every other module): a child forked while
its parent held locks (a gunicorn worker forked as the master's warm-up thread pulled) shares those open file
descriptions, and so held the locks on after the parent was killed: `rm` refused ("a pull is running", naming
the dead pid), a new pull of the file waited, status said "downloading", for the worker's whole life (an
explorer's trial). The child lets go of its copies at once (:func:`_let_go_in_child`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from modeldepot.store.confined import open_within
from modeldepot.store.forking import held_at_fork

__all__ = [
    "StoreLock",
    "dup_lock",
    "flock_holder",
    "forget_and_close",
    "held_exclusively",
    "lock_file",
    "lock_is_held",
    "process_state",
    "take_flock",
    "unlock_and_close",
]

log = logging.getLogger(__name__)

# Seconds a wait for a lock another process holds goes on before it is said, and between two sayings
WAIT_SAID, WAIT_SAID_AGAIN = 5.0, 60.0


# The descriptors of this process's lock files, from their opening to their close (see the module's docstring):
# descriptor -> (st_dev, st_ino) of its file. Noted at the open, not at the lock: one opened, then locked after a
# fork by another thread, was the child's too. Changed under _NOTING alone, which a fork waits for (reentrant: a
# descriptor's owner freed by the garbage collector inside an open may close its own).
_NOTED: dict[int, tuple[int, int]] = {}
_NOTING = threading.RLock()


def lock_file(opener: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """The descriptor ``opener(*args, **kwargs)`` opens (``os.open``, ``open_within``) of a file this process
    will ``flock`` (:func:`take_flock`), noted as such until :func:`unlock_and_close` or
    :func:`forget_and_close` closes it: a child forked meanwhile lets go of its copy (:func:`_let_go_in_child`)."""
    with _NOTING:
        fd = opener(*args, **kwargs)
        try:
            _note(fd)
        except OSError:
            os.close(fd)
            raise
    return fd


def dup_lock(fd: int) -> int:
    """A ``dup`` of the lock file descriptor ``fd`` (sharing its lock), noted as it is."""
    with _NOTING:
        copy = os.dup(fd)
        _NOTED[copy] = _NOTED[fd] if fd in _NOTED else _file_of(copy)
    return copy


def _note(fd: int) -> None:
    _NOTED[fd] = _file_of(fd)


def _file_of(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def take_flock(fd: int, mode: int) -> None:
    """``fcntl.flock(fd, mode)`` of a descriptor :func:`lock_file` opened (one opened otherwise is noted now)."""
    if fd not in _NOTED:
        with _NOTING:
            _note(fd)
    fcntl.flock(fd, mode)


def unlock_and_close(fd: int) -> None:
    """Close ``fd``, letting go of the ``flock`` it holds first. A child forked while it was held shares its
    open file description, and a close alone leaves the lock to that description until the child exits: a
    worker forked while another thread pulled kept `rm` refused ("a pull is running") for its whole life,
    and one forked during a write waited for ever on the lock its own copy held (a trial)."""
    with contextlib.suppress(OSError):  # (a file system without flock: nothing to let go of)
        fcntl.flock(fd, fcntl.LOCK_UN)
    forget_and_close(fd)


def forget_and_close(fd: int) -> None:
    """Close ``fd`` without letting go of a lock: one it failed to take, or one a ``dup`` of it holds on (also
    any descriptor that may have been a lock file's: forgetting one never noted is no harm)."""
    with _NOTING:
        _NOTED.pop(fd, None)
        os.close(fd)


# Seconds a fork waits for a lock file's opening to be noted: a garbage collection inside one may run a store's
# finalizer, whose index write waits at the fork gate this fork holds (review 40): then the fork goes on
# without the note, as before the notes (a descriptor opened in that instant may stay the child's too)
NOTE_WAIT = 2.0
_held_for_fork = threading.local()


def _before_fork() -> None:
    _held_for_fork.held = _NOTING.acquire(timeout=NOTE_WAIT)


def _after_fork_in_parent() -> None:
    if getattr(_held_for_fork, "held", False):
        _held_for_fork.held = False
        _NOTING.release()


def _let_go_in_child() -> None:
    """In a forked child: let go of its copies of every lock file descriptor of the parent, whichever thread
    opened it (the thread that took a lock is no owner: a pull's locks are taken and let go of on several
    threads, its event loop's forks too, and a thread's id is reused at once). Held or not yet: the parent may
    lock one after the fork. Not by closing them: the objects that own those numbers are still in the child's
    memory, and one freed later would close the number again, by then another file's (a socket, a blob
    read). Each is made a descriptor of /dev/null instead (``dup2``), the parent's locks left to the parent
    alone. A child forked inside a locked block of its own thread goes on without that lock (the parent's,
    which the child's unlock would have let go of under the parent)."""
    global _NOTING
    _NOTING = threading.RLock()
    noted = dict(_NOTED)
    _NOTED.clear()
    if not noted:
        return
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # (no /dev/null: a chroot) the read end of a pipe, which nothing writes to, as well
        null, writer = os.pipe()
        os.close(writer)
    try:
        for fd, file in noted.items():
            with contextlib.suppress(OSError):
                info = os.fstat(fd)
                if (info.st_dev, info.st_ino) == file:
                    os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


held_at_fork(_before_fork, _after_fork_in_parent, _let_go_in_child)


@contextmanager
def held_exclusively(
    path: Path, within: str, mode: int = 0o664, *, or_without: bool = False
) -> Iterator[None]:
    """The lock file ``path`` (made if missing; inside ``within``, never through a link: store/confined.py)
    ``flock()``ed exclusively for the block, waiting for it. ``or_without``: a lock file that cannot be opened
    (no room, another user's) is done without: the block runs unlocked, as it would without the lock."""
    try:
        fd = lock_file(open_within, path, os.O_RDWR | os.O_CREAT, mode, within)
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
        fd = lock_file(open_within, self.path, os.O_RDWR | os.O_CREAT, 0o664, self._within)
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
        fd = lock_file(open_within, self.path, os.O_RDWR | os.O_CREAT, 0o664, self._within)
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
    # (flock needs no write access: a read-only mount; a FIFO in its place is not waited on)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if folder is not None:
        flags |= os.O_NOFOLLOW
    try:
        fd = lock_file(os.open, path, flags, dir_fd=folder)
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
    holders = flock_holders(path)
    return min(holders) if holders else None


def flock_holders(path: Path) -> frozenset[int] | None:
    """The pids of the processes holding a ``flock`` on ``path`` (``/proc/locks``: a shared lock's every
    holder); None when it cannot be told (no procfs, no such file). A holder in another pid namespace shows
    as none."""
    try:
        info = os.stat(path)
        same_device: set[int] = set()
        same_inode: set[int] = set()
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
                    same_device.add(int(fields[4]))
                same_inode.add(int(fields[4]))
        # (btrfs and some overlays show another device number there than stat() does: the inode alone,
        # when one process holds a lock of it)
        return (
            frozenset(same_device)
            if same_device
            else frozenset(same_inode)
            if len(same_inode) == 1
            else frozenset()
        )
    except (OSError, ValueError):
        return None


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``R``, ``S``, ``D``; ``T`` stopped: Ctrl-Z, SIGSTOP), None
    when it is gone or cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None
