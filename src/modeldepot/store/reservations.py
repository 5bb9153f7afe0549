"""Room in the disk budget that writes under way made, seen by every process on the store.

A writer (an import, a pull) makes room before it writes and holds that room until it publishes. Kept in
one process's memory, two processes each saw the same free bytes: three pulls started together went to
137% of the budget while they downloaded, and the first to finish was evicted at once by another (a trial
of several processes). So each process's reservations are files in ``locks/reservations/``, each held
with ``flock`` by its process for as long as it holds the room: the kernel lets go of a killed process's
lock, and a reservation nobody holds is no reservation (it is removed when found). Room is made under
``locks/budget.lock`` (:meth:`Reservations.admitting`), so two processes do not both take the last of it.

A reservation also names the blobs its writer found in the store and relies on (``reuse <sha256>`` lines,
an amount of 0 when that is all it holds): every process's evictions keep them. Known to the writer's own
process alone, another's eviction removed them, and an import that had them staged placed them again with
no room asked (two imports beside each other ended 330 MiB into a 300 MiB budget, an explorer's trial).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from modeldepot.errors import StoreError
from modeldepot.store.confined import folder_within, opened_folder
from modeldepot.store.locks import StoreLock, lock_file, take_flock, unlock_and_close

log = logging.getLogger(__name__)

_FIELD = 20  # digits of a reservation's byte count (fixed: the file is rewritten in place)
T = TypeVar("T")
_REUSE = "reuse"  # (a line's first word: a blob the writer relies on; not a content key, whose size follows)


class Reservation:
    """One writer's room, held until :meth:`release` (or the process ends). The file's first line is the
    amount and the repo; the lines after it, the contents the room is for (``key size``: a pull's, whose
    downloads other pulls of the same contents share)."""

    def __init__(self, fd: int, path: Path, repo_id: str, within: str) -> None:
        self._fd, self.path, self.repo_id = fd, path, repo_id
        # The store's home (real path): no link leads its unlink out (store/confined.py)
        self._within = within
        self._end = 0  # where the next line goes

    def set(self, amount: int) -> None:
        first = f"{amount:{_FIELD}d} {self.repo_id}\n".encode()
        os.pwrite(self._fd, first, 0)
        self._end = max(self._end, len(first))

    def _add_lines(self, lines: str) -> None:
        if lines and self._fd >= 0:
            self._end += os.pwrite(self._fd, lines.encode(), self._end)

    def add_contents(self, contents: Mapping[str, int]) -> None:
        """Name more contents the room is for (content key -> size)."""
        self._add_lines("".join(f"{key} {size}\n" for key, size in contents.items()))

    def add_reused(self, sha256s: Iterable[str]) -> None:
        """Name more blobs the writer relies on (kept by every process's evictions from here on)."""
        self._add_lines("".join(f"{_REUSE} {sha256}\n" for sha256 in sha256s))

    def release(self) -> None:
        """Give the room back; never raises (called once a write published, and in ``finally`` blocks: a link
        in place of the folder, or the folder gone, leaves a file no lock holds, which the next look removes)."""
        if self._fd < 0:
            return
        try:
            with opened_folder(self.path.parent, self._within) as folder:
                # (before the lock goes: a reader never counts a file nobody holds)
                os.unlink(self.path.name, dir_fd=folder)
        except (OSError, StoreError) as error:
            if not isinstance(error, FileNotFoundError):
                log.warning("could not remove the reservation %s: %s (no process holds it now: it counts for "
                            "nothing)", self.path, error)  # fmt: skip
        finally:
            unlock_and_close(self._fd)
            self._fd = -1


class Reservations:
    """The reservations of one store (``directory``: its ``locks/reservations``)."""

    def __init__(self, directory: Path, read_only: bool = False) -> None:
        self.directory = directory
        self.read_only = read_only
        # The store's home (real path; ``directory`` is its locks/reservations): what is made, read and deleted
        # there stays inside it, whatever link a member of a group that shares the store put in place
        self.within = os.path.realpath(directory.parent.parent)
        self._admission = StoreLock(directory.parent / "budget.lock", read_only)
        self._names = itertools.count()
        self._token = ""  # this process's names' start (a new one in a forked child)
        self._pid = 0
        # Other processes' reservations as last read: name -> what their lines after the first said, up to
        # which byte (they are only appended to: each is parsed once; read whole at every status and
        # admission, two pulls of 40,000 files each took a status from 1 ms to 58 ms: a review)
        self._parsed: dict[str, _Lines] = {}

    def admitting(self) -> contextlib.AbstractContextManager[None]:
        """Held while a writer makes room and reserves it: one process at a time."""
        return self._admission.exclusive()

    def hold(self, repo_id: str, amount: int, contents: Mapping[str, int] | None = None,
             reused: Iterable[str] = ()) -> Reservation:  # fmt: skip
        """Reserve ``amount`` bytes for a write of ``repo_id`` (from any thread): for ``contents`` (content key
        -> size), when the write is a pull's; ``reused``: the blobs it relies on (:meth:`Reservation.add_reused`)."""
        name = f"{self._prefix()}{next(self._names)}"
        with opened_folder(self.directory, self.within, create=True) as folder:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = lock_file(os.open, f".{name}", flags, 0o664, dir_fd=folder)
            try:
                take_flock(fd, fcntl.LOCK_EX)  # (held before it has its name: never seen unheld)
                reservation = Reservation(fd, self.directory / name, repo_id, self.within)
                reservation.set(amount)
                reservation.add_contents(contents or {})
                reservation.add_reused(reused)
                os.rename(f".{name}", name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                unlock_and_close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(f".{name}", dir_fd=folder)
                raise
        return reservation

    def elsewhere(self, contents: bool = False) -> list[Held]:
        """The room other processes' live writes hold (this process counts its own); what a killed one
        left is removed. ``contents``: with the contents each holds room for and the blobs it relies on (read
        only when asked)."""
        if self.read_only:
            return []
        try:
            folder = folder_within(self.directory, self.within)
        except FileNotFoundError:
            return []
        try:
            return self._read(folder, contents)
        finally:
            os.close(folder)

    def _read(self, folder: int, contents: bool) -> list[Held]:
        mine = self._prefix()
        found: list[Held] = []
        parsed: dict[str, _Lines] = {}
        for name in os.listdir(folder):
            if name.startswith(mine):
                continue
            held = _held(folder, name, self._parsed.get(name) if contents else None, contents)
            if held is None:
                if not name.startswith("."):  # (a staging name is a reservation being made)
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=folder)
                continue
            found.append(held[0])
            if held[1] is not None:
                parsed[name] = held[1]
        if contents:
            self._parsed = parsed
        return found

    def relied_on(self) -> frozenset[str]:
        """The blobs other processes' live writes rely on (their reservations' ``reuse`` lines). Read on
        every status and eviction (each file's lines parsed once: see ``_parsed``)."""
        return frozenset().union(*(held.reused for held in self.elsewhere(contents=True)))

    def _prefix(self) -> str:
        if self._pid != os.getpid():
            self._pid, self._token = os.getpid(), secrets.token_hex(4)
        return f"{self._pid}-{self._token}-"


@dataclass(frozen=True)
class Held:
    """Room a write under way in another process holds."""

    repo_id: str
    amount: int
    pid: int | None
    contents: Mapping[str, int] = field(default_factory=dict)  # (a pull's: content key -> size)
    reused: frozenset[str] = frozenset()  # the blobs (SHA-256) it found in the store and relies on


def _if_held(folder: int, name: str, read: Callable[[int], T]) -> T | None:
    """``read(fd)`` of a reservation file (``name`` in ``folder``) while a process holds its lock; None when none
    does (or it is gone, or not a file of its own: a link): a killed process's lock went with it."""
    try:
        fd = lock_file(
            os.open, name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder
        )
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            take_flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read(fd)
        return None
    finally:
        unlock_and_close(fd)


@dataclass(frozen=True)
class _Lines:
    """What a reservation file's lines after the first said, up to byte ``end``."""

    end: int
    contents: Mapping[str, int]
    reused: frozenset[str]


def _held(
    folder: int, name: str, parsed: _Lines | None, with_contents: bool
) -> tuple[Held, _Lines | None] | None:
    """What a reservation file holds while a process holds its lock (None when none does), with its lines
    after the first as parsed now (``with_contents``: from where ``parsed`` ended)."""

    def read(fd: int) -> tuple[Held, _Lines | None]:
        # (a file being made is empty a moment: held, with nothing in it yet)
        head = os.pread(fd, 4096, 0)
        first = head.split(b"\n", 1)[0].decode(errors="replace")
        amount, _, repo_id = first.strip().partition(" ")
        pid = name.lstrip(".").split("-", 1)[0]
        lines = _lines_after(fd, len(first.encode()) + 1, parsed) if with_contents and b"\n" in head else None
        held = Held(repo_id, int(amount) if amount.isascii() and amount.isdigit() else 0,
                    int(pid) if pid.isascii() and pid.isdigit() else None,
                    lines.contents if lines else {}, lines.reused if lines else frozenset())  # fmt: skip
        return held, lines

    return _if_held(folder, name, read)


def _lines_after(fd: int, start: int, parsed: _Lines | None) -> _Lines:
    """The file's lines from byte ``start`` (after the first line), the ones ``parsed`` read taken from it
    and only the whole lines appended since parsed."""
    begin = parsed.end if parsed is not None and parsed.end >= start else start
    # (all of it: the ``reuse`` lines come after the contents, and a cap left a pull of 130,000 files
    # relying on no blob, which other processes' evictions then took: a review)
    size = os.fstat(fd).st_size
    if parsed is not None and begin >= size:
        return parsed
    more = os.pread(fd, max(0, size - begin), begin)
    whole = more[: more.rfind(b"\n") + 1]  # (a line being written is read once it ends)
    contents: dict[str, int] = {}
    reused: set[str] = set()
    for line in whole.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if key == _REUSE:
            reused.add(value)
        elif value.isascii() and value.isdigit():
            contents[key] = int(value)
    if parsed is not None and begin != start:
        if not whole:
            return parsed
        return _Lines(begin + len(whole), {**parsed.contents, **contents}, parsed.reused | reused)
    return _Lines(begin + len(whole), contents, frozenset(reused))
