"""The store-wide lock that keeps blob deletion away from blob placement.

Correctness comes from atomic renames and index transactions; the lock closes the one window those
leave open: a writer that has placed (or found) a blob file but not yet committed the rows that
reference it must not see that file deleted by gc or remove. Writers take the lock shared, deleters
exclusive. ``flock`` locks belong to an open file description, so they also exclude threads of one
process, and the kernel drops them when a process dies, even by SIGKILL: no stale locks.
Always taken before an index transaction, never while one is open.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

__all__ = ["StoreLock", "lock_is_held"]


class StoreLock:
    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only  # a store on a read-only mount: nobody writes it, nothing to lock out

    @contextmanager
    def _hold(self, mode: int) -> Iterator[None]:
        if self.read_only:
            yield
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def shared(self) -> AbstractContextManager[None]:
        return self._hold(fcntl.LOCK_SH)

    def exclusive(self) -> AbstractContextManager[None]:
        return self._hold(fcntl.LOCK_EX)


def lock_is_held(path: Path) -> bool | None:
    """Whether a live process holds a ``flock`` on ``path`` (shared or exclusive); None when there is no
    such file. The kernel drops a dead process's locks, so a held lock means a live holder."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # (flock needs no write access: a read-only mount)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # a lock we took is released with it
    return False
