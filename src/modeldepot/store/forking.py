"""What a child made by ``fork()`` (a gunicorn or multiprocessing worker forked after the store was opened)
must not inherit half-done.

The child has the parent's memory, not its threads. So a background thread an object started is not
running there, and a lock one of them held stays held for ever: such objects register here, and each
starts over in the child (``after_fork``). And SQLite keeps each process's file locks in its own memory: a
fork while another thread was inside a transaction left the child believing the lock held, and every write
of the child failed with "database is locked" after its busy timeout (a trial: a worker forked while the
parent's use counts were being written). So a fork waits until no thread of the process is inside an
index transaction (:data:`INDEX_GATE`), and no transaction starts until it is done. (So a thread must not
wait, inside one, for a lock a forking thread may hold: the fork would wait for ever.)
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class StartsOverAfterFork(Protocol):
    def after_fork(self) -> None:
        """In the child: drop the parent's threads, locks and work in progress (not its data)."""


_OWNERS: weakref.WeakSet[StartsOverAfterFork] = weakref.WeakSet()


def start_over_after_fork(owner: StartsOverAfterFork) -> None:
    """Have ``owner.after_fork()`` called in every child this process forks while ``owner`` lives."""
    _OWNERS.add(owner)


class ForkSafeExecutor(Executor):
    """A thread pool made on first use, and made anew in a forked child. A child inherits a
    ``ThreadPoolExecutor`` with its threads dead and its count of idle ones saying otherwise: it starts
    none, and nothing submitted there ever runs (every pull of a gunicorn worker forked after the parent
    pulled hung for good, without a word: a trial)."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self._max_workers, self._prefix = max_workers, thread_name_prefix
        self._pool: ThreadPoolExecutor | None = None
        self._made = threading.Lock()
        self._shut = False  # (shut before its first use: a submit is refused as a thread pool refuses it)
        start_over_after_fork(self)

    def _current(self) -> ThreadPoolExecutor:
        pool = self._pool
        if pool is None:
            with self._made:
                if self._shut:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix=self._prefix)
                pool = self._pool
        return pool

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return self._current().submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._made:
            self._shut = True
        pool = self._pool
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    def after_fork(self) -> None:
        self._pool, self._made = None, threading.Lock()  # (the parent's threads are not the child's)


class ForkGate:
    """Counts the threads inside index transactions; a fork waits until there are none (those of the
    forking thread itself aside: it cannot wait for itself) and holds new ones back until it is done. Each
    index has one of its own too, which its close holds alone (:meth:`try_alone`) as it closes the other
    threads' connections."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._inside = 0
        self._forking = 0  # forks under way (two threads may fork at once: the first done must not open it)
        self._mine = threading.local()  # this thread's depth (a write's body reads too)

    def __enter__(self) -> None:
        """A thread enters an index transaction (``with INDEX_GATE:``)."""
        mine = self._mine
        depth = getattr(mine, "depth", 0)
        if depth == 0:
            with self._changed:
                while self._forking:
                    self._changed.wait()
                self._inside += 1
        mine.depth = depth + 1

    def __exit__(self, *exc: object) -> None:
        mine = self._mine
        mine.depth -= 1
        if mine.depth == 0:
            with self._changed:
                self._inside -= 1
                if self._inside <= 1:  # (a fork, or whoever waits for the others, may go on: it looks)
                    self._changed.notify_all()

    def before_fork(self) -> None:
        mine = 1 if getattr(self._mine, "depth", 0) else 0
        with self._changed:
            self._forking += 1
            while self._inside > mine:
                self._changed.wait()

    def after_fork_in_parent(self) -> None:
        with self._changed:
            self._forking -= 1
            if not self._forking:
                self._changed.notify_all()

    def try_alone(self) -> bool:
        """If no other thread is inside now, hold new ones back (forks too) until :meth:`end_alone`, this one
        counted inside, and say True; else False, holding nothing. It does not wait: a thread that waited for
        the others, holding the process's gate, deadlocked against one that forked inside a transaction (a
        review), and a Ctrl-C in the wait left the gate shut (a review). See :meth:`wait_for_others`."""
        mine = self._mine
        depth = getattr(mine, "depth", 0)
        with self._changed:
            if self._inside > (1 if depth else 0):
                return False
            self._forking += 1
            if not depth:
                self._inside += 1
        mine.depth = depth + 1
        return True

    def end_alone(self) -> None:
        mine = self._mine
        mine.depth -= 1
        with self._changed:
            if mine.depth == 0:
                self._inside -= 1
            self._forking -= 1
            self._changed.notify_all()

    def wait_for_others(self) -> None:
        """Wait until no other thread is inside (holding nobody back meanwhile)."""
        depth = getattr(self._mine, "depth", 0)
        with self._changed:
            while self._inside > (1 if depth else 0):
                self._changed.wait()

    def after_fork_in_child(self) -> None:
        depth = getattr(self._mine, "depth", 0)  # (the forking thread's: the only one the child has)
        self._reset()
        self._inside, self._mine.depth = (1 if depth else 0), depth


INDEX_GATE = ForkGate()

# Locks of this process's own a fork takes after the gate (``before``), in order, and gives back (``after_in_parent``)
# or starts over (``after_in_child``): taken before the gate, one held by a thread waiting to enter a transaction
# would deadlock a fork that waits for another thread's transaction, which waits for that lock
_HELD_AT_FORK: list[tuple[Callable[[], None], Callable[[], None], Callable[[], None]]] = []


def held_at_fork(before: Callable[[], None], after_in_parent: Callable[[], None],
                 after_in_child: Callable[[], None]) -> None:  # fmt: skip
    """Have a fork call ``before`` once no thread is inside an index transaction, and one of the others after."""
    _HELD_AT_FORK.append((before, after_in_parent, after_in_child))


def _before() -> None:
    INDEX_GATE.before_fork()
    for before, _, _ in _HELD_AT_FORK:
        before()


def _in_parent() -> None:
    for _, after, _ in reversed(_HELD_AT_FORK):
        after()
    INDEX_GATE.after_fork_in_parent()


def _in_child() -> None:
    INDEX_GATE.after_fork_in_child()
    for _, _, after in _HELD_AT_FORK:
        after()
    for owner in list(_OWNERS):
        owner.after_fork()


os.register_at_fork(before=_before, after_in_parent=_in_parent, after_in_child=_in_child)
