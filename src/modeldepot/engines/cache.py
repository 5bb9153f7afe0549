"""A bounded set of loaded engines kept warm in-process: LRU by idle time, slot and memory limits, idle
TTL, single-flight loads per key, and an eviction hook that really lets the engine go.

Design notes (where the seed was thin or wrong):

- The memory budget is enforced by evicting the least recently used entry and *recomputing* the
  projection after each eviction; the seed computed it once and could evict everything or loop.
- A load happens outside the lock, once per key however many callers ask (they wait for its result, or
  all receive its exception; a failure is not cached). Different keys load in parallel.
- Room is made before a load (a free slot, the budget's bytes for the size given, beside the loads
  under way: a load waits for those when nothing more can be evicted, for as long as they end or grow the
  process, see ``room_wait``), so that two big models are never in memory at once (Ollama, too, unloads a
  runner before it starts the next): a load that then fails
  does not bring back what it evicted. ``Depot.load`` checks what it can before it asks
  (the engine's package, the files there and whole). A model bigger than the whole budget is loaded and
  kept alone, with a warning: refusing it would fail a worker's one model.
- ``on_evict`` runs outside the lock, after the entry is gone from the cache, so a slow ``close()`` never
  blocks other callers. The cache keeps no other reference: once the caller drops theirs, the engine is
  freed. The default hook closes an engine only when nothing outside the cache holds it: ``load()`` hands
  out the engine itself, with no release to say when a caller is done, so an engine evicted (another
  model's load, the TTL) while a request ran on it was closed under that request (a native engine's
  ``close()`` frees what the request reads). One still held is left to its holders, and goes, with its
  own finalizer, when the last one lets go of it (as the seed's ``Arc`` did). Held is read from the
  reference count alone: an engine's own references (a worker thread running its method, a callback it
  keeps) count as holders too, so such an engine is not closed by the default hook; ``on_evict=
  close_on_evict`` closes on eviction whoever holds the engine. (Reading which references are the
  engine's own was tried, and closed engines under requests: a closure over ``self`` in its thread, an
  event loop it keeps that reaches the tasks waiting on it.)
- The TTL is kept by one thread for every cache (``_Reaper``), woken when the first idle entry's time is up:
  applied only when the next load came, an engine a worker stopped asking for stayed loaded, and counted,
  for good (a trial: two engines, 38 MB, kept a minute past a TTL of 1 s). A cache given its own ``clock``
  has no real time to wait on: its TTL applies as it is used (and :meth:`LoadedModelCache.evict_stale`).
- An engine evicted by the limits (LRU, budget, TTL, memory pressure) while a caller still holds it is
  remembered by a weak reference: the next load of its key takes it back into the cache rather than build a
  second copy beside it (8 request threads on more models than fit built copy after copy: the process grew
  25 MiB under a 6 MiB budget, an explorer's trial), and until its holders let go its bytes count in the
  budget's projection (what is loaded next evicts idle engines for them). An explicit :meth:`evict` or
  :meth:`clear` forgets it: the next load builds anew.
- A size that is not given is measured as the process's RSS growth during the load (a rough figure when
  loads overlap, and 0 if memory was freed meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import ctypes
import heapq
import inspect
import itertools
import logging
import math
import numbers
import operator
import os
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable
from concurrent import futures
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from modeldepot.config import parse_share, parse_size
from modeldepot.errors import ConfigError, InvalidInputError
from modeldepot.memory import available_fraction, ram_bytes
from modeldepot.store.forking import start_over_after_fork

__all__ = ["CacheStats", "LoadedModelCache", "close_on_evict", "default_on_evict", "process_rss_bytes"]

log = logging.getLogger(__name__)

M = TypeVar("M")
Loader = Callable[[], M]
EvictHook = Callable[[Hashable, Any], None]
LOW_MEMORY_FRACTION = 0.10  # below this share of RAM available, evict before loading (memory pressure)
# A load waits this long for room while no load under way ends nor grows the process, then goes over
ROOM_WAIT_SECONDS = 120.0
# What the process must grow by in such a wait for the loads under way to count as progressing
PROGRESS_BYTES = 64 << 20
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc/self/statm``); 0 where unknown."""
    try:
        with open("/proc/self/statm") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return resident_pages * _PAGE_SIZE


def _available_fraction() -> float:
    """The share of memory still available to this process: the machine's, or its container's when lower."""
    return available_fraction()


def close_on_evict(key: Hashable, model: Any) -> None:
    """Call the engine's ``close()`` when it has one, as soon as it leaves the cache, whoever holds it (for
    an engine whose own worker thread or callbacks keep it referenced, and whose close() is safe to call
    while a caller may still hold it)."""
    close = getattr(model, "close", None)
    if callable(close):
        close()


def default_on_evict(key: Hashable, model: Any) -> None:
    """Call the engine's ``close()`` when it has one (sessions, files, pools). The cache calls it only for
    an engine nothing else holds (see the module's docstring)."""
    close_on_evict(key, model)


def _keep_for_good(model: object) -> None:
    """One reference more to ``model`` that nothing ever drops: not even the interpreter's end frees it
    (a reference kept in a list went as the modules were cleared at exit, and the worker hung there)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(model))


def _references_to(model: object) -> int:
    return sys.getrefcount(model)


def _own_references() -> int:
    """The references an evicted engine has while :meth:`LoadedModelCache._run_hooks` decides whether to
    close it, when nothing outside the cache holds it: counted on this interpreter, through the same steps
    (a fixed number would be wrong where the interpreter counts a local passed along otherwise, and an
    engine held by a caller would be closed under it again)."""
    evicted: list[tuple[Hashable, object]] = [("probe", object())]
    while evicted:
        _key, model = evicted.pop()
        return _references_to(model)
    raise AssertionError("unreachable")


_OWN_REFERENCES = _own_references()


def _entry_references() -> int:
    """The references a cached engine has in :meth:`LoadedModelCache._remember_locked` when nothing outside the
    cache holds it (its entry's), counted through the same steps (see :func:`_own_references`)."""
    entry = _Entry(object(), 0, 0.0, 0.0)
    return _references_to(entry.model)


def _own_copy(error: BaseException) -> BaseException:
    """The failed load's error for one more of its waiters (raised from it): a copy of the same type, with a
    traceback of its own (one object raised in every waiting thread piled up all their frames), or the
    error itself when it cannot be copied. Made without its constructor, which several errors give other
    arguments than their ``args`` (a RepoNotFoundError's message came out as its repo id)."""
    cls = type(error)
    try:
        if cls.__module__ == "builtins":  # (built by their constructor: an OSError's file name, a
            return copy.copy(error)  # UnicodeDecodeError's every field, are not in __dict__)
        copied = cls.__new__(cls, *error.args)
        copied.args = error.args
        copied.__dict__.update(error.__dict__)
    except Exception:
        return error
    return copied


class _Reaper:
    """One daemon thread that evicts the idle entries of every cache with a TTL (and a real clock) when their
    time is up: a heap of (when, cache), one look per cache that is due (not a walk over every cache at each
    load). It holds the caches weakly: a cache no one holds goes, and its engines with it.

    Fork-safe: a fork waits until the thread holds no cache's lock (``_busy``; a child that inherited one
    held would hang at its first use of that cache), and a child starts a thread of its own for the engines
    it inherited (they expired only once it loaded something itself)."""

    SHORTEST_WAIT = 0.05  # seconds (an entry due now but used again meanwhile is not looked at in a loop)

    def __init__(self) -> None:
        self._due: list[tuple[float, int, weakref.ref[LoadedModelCache[Any]]]] = []  # a heap
        # Each cache's one look to come: an entry of the heap for another time is stale, and skipped (a heap
        # entry per load, each looked at and pushed again, grew without end in a server that loads often)
        self._scheduled: weakref.WeakKeyDictionary[LoadedModelCache[Any], float] = weakref.WeakKeyDictionary()
        self._order = itertools.count()  # (ties in the heap: never compare the references)
        self._changed = threading.Condition()  # guards _due, _scheduled, _pid; order: _changed, then _busy
        self._busy = threading.Lock()  # held by the thread while it is inside a cache's lock
        self._pid = 0  # the process whose thread runs
        os.register_at_fork(
            before=self._before_fork, after_in_parent=self._after_fork, after_in_child=self._forked
        )

    def _before_fork(self) -> None:
        self._changed.acquire()
        self._busy.acquire()

    def _after_fork(self) -> None:
        self._busy.release()
        self._changed.release()

    def _forked(self) -> None:
        self._changed, self._busy, self._pid = threading.Condition(), threading.Lock(), 0
        if self._due:
            self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="modeldepot-engine-ttl", daemon=True).start()

    def watch(self, cache: LoadedModelCache[Any]) -> None:
        """``cache`` holds an entry that may expire: look at it when its time is up (never called under the
        cache's lock)."""
        when = cache._next_expiry()
        if when is None:
            return
        with self._changed:
            if self._schedule(cache, weakref.ref(cache), when):
                self._changed.notify()
            if self._pid != os.getpid():
                self._start()

    def _schedule(
        self, cache: LoadedModelCache[Any], held: weakref.ref[LoadedModelCache[Any]], when: float
    ) -> bool:
        """(Under ``_changed``.) Look at ``cache`` at ``when`` (monotonic), unless a look is due no later."""
        if self._scheduled.get(cache, float("inf")) <= when:
            return False
        self._scheduled[cache] = when
        heapq.heappush(self._due, (when, next(self._order), held))
        return True

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    if wait is None or wait > 0:
                        self._changed.wait(None if wait is None else max(wait, self.SHORTEST_WAIT))
                        continue
                    when, _, held = heapq.heappop(self._due)
                self._look(held, when)
        except BaseException:  # (never expected: said, and the next watch() starts another thread)
            log.exception("the thread that keeps the engine caches' TTL stopped")
            with self._changed:
                self._pid = 0
            raise

    def _look(self, held: weakref.ref[LoadedModelCache[Any]], when: float) -> None:
        """Evict one cache's idle entries, and look again when its next is due. In a frame of its own: no
        reference to a cache outlives it (one left in the waiting frame kept a closed depot's engines, and
        the files they map, open)."""
        cache = held()
        if cache is None:
            return
        with self._changed:
            if self._scheduled.get(cache) != when:
                return  # (a stale entry: the cache's look is another)
            del self._scheduled[cache]
        try:
            with self._busy:
                evicted = cache._take_stale()
            cache._run_hooks(evicted)  # (outside: a slow close() holds up no fork)
            with self._busy:
                next_due = cache._next_expiry()
        except Exception:  # (a hook's error is logged by _run_hooks; one cache's must not end the thread)
            log.exception("evicting the idle engines of a cache failed")
            return
        if next_due is not None:
            with self._changed:
                self._schedule(cache, held, next_due)


_REAPER = _Reaper()


@dataclass(frozen=True)
class CacheStats:
    cached_models: int
    total_hits: int
    total_misses: int
    hit_rate: float
    total_memory_bytes: int
    oldest_entry_age_secs: float
    evictions: int
    load_failures: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Entry(Generic[M]):
    model: M
    size: int
    loaded_at: float
    last_used: float
    pins: int = 0


_ENTRY_REFERENCES = _entry_references()


class _Flight:
    """One load in progress; its waiters block on ``done``."""

    def __init__(self, size: int | None) -> None:
        self.done = threading.Event()
        self.model: Any = None
        self.error: BaseException | None = None
        self.dropped = False  # evicted while loading: handed to its callers, never cached
        self.size = size  # the bytes it will take, when known: counted in the budget while it loads
        self.thread = threading.get_ident()  # its leader (a load it makes itself never waits for it)
        self.admitted = False  # given its room (a slot, its bytes) and loading: not waiting for room
        self.needed = False  # a thread that leads a load waits for it: it waits for room no more
        self.abandoned = False  # its leader failed before the load began (interrupted in its wait for room)


# The loads the running code leads (inside their loaders): a load it asks for is nested in them, and never
# waits for room they hold
_LEADING: contextvars.ContextVar[tuple[_Flight, ...]] = contextvars.ContextVar("leading_loads", default=())


_MISS = object()  # (the hit path found nothing it may answer)


def _size(size: object) -> int | None:
    """A load's size in bytes from what a caller gives: None (measured), bytes, or a size like ``"500MiB"``
    (as the memory budget is written: it was a TypeError from inside, and the key loaded never again)."""
    if size is None:
        return None
    if isinstance(size, str):
        try:
            return parse_size(size)
        except ConfigError as error:
            raise InvalidInputError(f"size: {error}") from None
    number = _real(size)
    if number is None or number < 0:  # (a negative one cancelled the real entries out: -850 bytes in all)
        raise InvalidInputError(
            f"size must be the bytes the model takes (0 or more, or like '500MiB'), not {size!r}"
        )
    return int(number)


async def _awaited(awaitable: Awaitable[M]) -> M:
    return await awaitable


async def _on_a_thread_of_its_own(function: Callable[..., M], *args: object) -> M:
    """``function(*args)`` on a new thread, in this context (the loads it is nested in go with it, as with
    ``asyncio.to_thread``), awaited here. A cancelled caller leaves it running, as ``to_thread`` does."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[M] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: M | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if isinstance(error, StopIteration):  # (a future refuses it: its awaiter waited for good)
            error = RuntimeError(f"the loader raised StopIteration: {error}")
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = context.run(function, *args)
        except BaseException as error:
            outcome: tuple[M | None, BaseException | None] = (None, error)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile: nobody waits)
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="engine-load", daemon=True).start()
    return await future


def _real(value: object) -> float | None:
    """A finite real number given (an int, a float, a numpy scalar), not a bool or a string; else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class LoadedModelCache(Generic[M]):
    """Loaded engines by key. Thread-safe; an async twin of every loading call.

    ``max_models`` slots; ``ttl`` seconds of idleness before an entry goes (reads extend it);
    ``memory_budget`` bytes (or a size like ``"8GiB"``, or a share of RAM like ``"25%"``) for all entries together (None: no budget);
    ``evict_on_memory_pressure``
    evicts idle entries before a load when the machine is short of memory; ``on_evict(key, model)`` runs
    after an entry leaves (default: :func:`default_on_evict`). ``room_wait`` seconds: how long a load that
    finds no room waits while no load under way ends nor grows the process's memory by 64 MiB, before it goes
    over the limits with a warning (None: for ever; a
    loader that loads a companion model on a thread it started without its context, as a
    ``ThreadPoolExecutor`` does, would otherwise wait for its own room for good: run the companion's load
    with ``contextvars.copy_context().run`` to have it nested). ``clock`` and ``rss`` are injectable for
    tests.
    """

    def __init__(
        self,
        max_models: int = 4,
        ttl: float | None = 3600.0,
        memory_budget: float | str | None = None,
        evict_on_memory_pressure: bool = True,
        on_evict: EvictHook | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rss: Callable[[], int] = process_rss_bytes,
        available_fraction: Callable[[], float] = _available_fraction,
        room_wait: float | None = ROOM_WAIT_SECONDS,
    ) -> None:
        try:
            slots = -1 if isinstance(max_models, bool) else operator.index(max_models)  # (a numpy int too)
        except TypeError:
            slots = -1
        if slots < 1:
            raise InvalidInputError(f"max_models must be a number of models, at least 1, not {max_models!r}")
        if ttl is not None and not (_real(ttl) or 0) > 0:
            raise InvalidInputError(
                f"ttl must be a positive number of seconds (or None for no expiry), not {ttl!r}"
            )
        budget: int | None = None
        if isinstance(memory_budget, str) and memory_budget.strip().endswith("%"):
            # (a share of the RAM this process may use, the container's limit when lower, as the preload
            # budget's "50%": refused here, an explorer's trial)
            try:
                share = parse_share(memory_budget)
            except ValueError:
                share = -1.0
            if not 0 < share <= 100:
                raise InvalidInputError(f"memory_budget {memory_budget!r}: a share of RAM is more than 0% and at most "
                                        "100%")  # fmt: skip
            budget = max(1, int(ram_bytes() * share / 100))
        elif isinstance(memory_budget, str):  # ("8GiB", as every size of modeldepot's is written)
            try:
                budget = parse_size(memory_budget)
            except ConfigError as error:
                raise InvalidInputError(f"memory_budget: {error}") from None
        elif memory_budget is not None:  # (bytes, a float among them: 0.5 * the machine's RAM)
            number = _real(memory_budget)
            if number is None or number < 1:
                raise InvalidInputError(f"memory_budget must be a positive size (bytes, or like '8GiB'), or None for no "
                                 f"budget, not {memory_budget!r}")  # fmt: skip
            budget = int(number)
        if budget is not None and budget < 1:
            raise InvalidInputError(f"memory_budget must be a positive size, not {memory_budget!r}")
        if room_wait is not None and not (_real(room_wait) or 0) > 0:
            raise InvalidInputError(
                f"room_wait must be a positive number of seconds (or None: no bound), not {room_wait!r}"
            )
        self.room_wait = None if room_wait is None else float(room_wait)
        self.max_models = slots
        self.ttl = ttl
        self.memory_budget = budget
        self.evict_on_memory_pressure = evict_on_memory_pressure
        self.on_evict: EvictHook = on_evict if on_evict is not None else default_on_evict
        self._clock, self._rss, self._available = clock, rss, available_fraction
        self._lock = threading.Lock()
        # Recency is each entry's last_used: a hit only stamps it (no reordering on the hot path);
        # eviction, rare, looks for the oldest among the few entries.
        self._entries: dict[Hashable, _Entry[M]] = {}
        # Engines the limits evicted, by key, while they may still be held: (weak reference, size)
        self._held_out: dict[Hashable, tuple[weakref.ref[Any], int]] = {}
        # Of those, the ones whose hook found them held (counted in the budget); until then they are in the list
        # of the evicted being let go of, and their bytes are not the cache's any more
        self._held_counted: set[Hashable] = set()
        # (in a forked child) the ids of the engines the parent had loaded: never closed nor freed here
        self._from_parent: set[int] = set()
        self._next_sweep = 0.0  # when expired entries are next looked for (at most once a second)
        self._flights: dict[Hashable, _Flight] = {}
        self._flight_ended = threading.Condition(self._lock)  # (a load waiting for room waits on it)
        self._flights_ended = 0  # (a load waiting for room sees whether any ended while it waited)
        self._hits = self._misses = self._evictions = self._failures = 0
        start_over_after_fork(self)

    def after_fork(self) -> None:
        """In a forked child: the loads the parent's other threads had under way never end here. A load of
        one of them waited for ever for it, and under a memory budget a load of any model waited for the
        room they held (a worker forked while a warm-up thread loaded: a trial). The loaded engines stay, and
        are never closed nor freed in the child, whatever leaves the cache: a native library may not survive
        its objects' teardown in a process its threads did not follow into (onnxruntime's session waits for
        ever on its thread pool's condition variable: every gunicorn ``--preload`` worker that evicted, or
        closed its depot, hung, an explorer's trial). Their pages are the parent's, shared until written:
        kept, they cost the child nothing it would have got back, and its budget does not count them once
        they left. (The child's own exit still hangs in onnxruntime's exit handlers, with onnxruntime alone:
        end such workers with ``os._exit``, or load ONNX models after the fork.)"""
        forking = (
            threading.get_ident()
        )  # (the child's one thread: its own load, if it forked in one, goes on)
        self._lock = threading.Lock()
        self._flight_ended = threading.Condition(self._lock)
        for key, flight in list(self._flights.items()):
            if flight.thread != forking:
                del self._flights[key]
        # (those the parent's limits evicted while a caller held them too: that caller's reference is in the
        # child as well, and its end tore them down, a review)
        held_out = (ref() for ref, _ in self._held_out.values())
        for model in [*(entry.model for entry in self._entries.values()), *held_out]:
            if model is not None and id(model) not in self._from_parent:
                _keep_for_good(model)
                self._from_parent.add(id(model))  # (its id is its own for good: it is never freed)

    # -- loading ----------------------------------------------------------------------------------------

    def get_or_load(self, key: Hashable, loader: Loader[M], size: int | str | None = None) -> M:
        """The cached engine for ``key``, or ``loader()``'s result, loaded once however many ask. ``size``: the
        bytes it takes (or a size like ``"500MiB"``), counted in the memory budget; measured when not given."""
        bytes_taken = _size(size)
        now = self._clock()
        model = self._hit(key, now)
        if model is not _MISS:
            return model  # type: ignore[return-value]
        return self._get_slow(key, loader, bytes_taken, now)

    def _hit(self, key: Hashable, now: float) -> object:
        """The hit path: one lookup, one stamp; ``_MISS`` when the slow path must look (no entry, or one that
        may have expired)."""
        with self._lock:
            entry = self._entries.get(key)
            if (
                entry is not None
                and now < self._next_sweep
                and (self.ttl is None or entry.pins or now - entry.last_used < self.ttl)
            ):
                self._hits += 1
                entry.last_used = now
                return entry.model
        # (no reference of the cache's kept here: the slow path may expire the entry, and its hook must find none)
        return _MISS

    def _get_slow(self, key: Hashable, loader: Loader[M], size: int | None, now: float) -> M:
        failed: BaseException | None = None
        with self._lock:
            evicted = self._expire_locked(now)
            self._next_sweep = now + min(self.ttl or 1.0, 1.0)
            entry = self._entries.get(key)
            flight = self._flights.get(key)
            # (not one that just expired here)
            if entry is None and flight is None and all(k != key for k, _ in evicted):
                entry = self._take_back_locked(key, now, evicted)
            leader = entry is None and flight is None
            if entry is not None:
                self._hits += 1
                entry.last_used = now
            elif flight is None:
                self._misses += 1
                flight = self._flights[key] = _Flight(size)
                try:
                    self._make_room_locked(key, size, evicted)
                except BaseException as error:  # (Ctrl-C in its wait for room: the key loaded never again)
                    failed = error
        try:
            if evicted:
                self._run_hooks(evicted)
        except BaseException as error:  # (Ctrl-C as the engines it evicted close: the same, a review)
            failed = failed or error
        if failed is not None:
            if leader:
                assert flight is not None
                self._abandon(key, flight)
            raise failed
        if entry is not None:
            return entry.model
        assert flight is not None
        if not leader:
            with self._lock:
                if flight.thread == threading.get_ident():
                    # (its own loader, on its thread, would wait for its own end: for good, in a trial; one on a
                    # thread the loader started, or a task, may be a companion the loader does not wait for)
                    raise RuntimeError(f"the loader of {key!r} asked the cache for {key!r} itself: a load cannot "
                                       "wait for its own end")  # fmt: skip
                if not flight.admitted and any(f.admitted for f in self._led_here_locked()):
                    # (this thread holds room for a load of its own: were that load's companion to wait for
                    # room, each would wait for the other, a review)
                    flight.needed = True
                    self._flight_ended.notify_all()
            flight.done.wait()
            if flight.abandoned or (
                flight.error is not None
                and (
                    not isinstance(flight.error, Exception)
                    or isinstance(flight.error, futures.CancelledError)
                )
            ):
                # (its leader was interrupted, Ctrl-C or a task cancelled: not this caller's to raise; it loads)
                return self._get_slow(key, loader, size, self._clock())
            with self._lock:  # (a hit once the load under way served it: a failed one served nobody)
                if flight.error is None:
                    self._hits += 1
                else:
                    self._misses += 1
            if flight.error is not None:
                own = _own_copy(flight.error)
                if own is flight.error:
                    raise own
                raise own from flight.error
            return flight.model  # type: ignore[no-any-return]
        return self._lead(key, flight, loader, size)

    def _take_back_locked(
        self, key: Hashable, now: float, evicted: list[tuple[Hashable, M]]
    ) -> _Entry[M] | None:
        """The engine of ``key`` the limits evicted while a caller held it, back in the cache when it is still
        alive (what it pushes out goes into ``evicted``); None when it is gone."""
        held = self._held_out.pop(key, None)
        model = held[0]() if held is not None and self.on_evict is default_on_evict else None
        if held is None or model is None:
            return None
        entry = self._entries[key] = _Entry(model, held[1], now, now)
        evicted.extend(self._enforce_locked(keep=key))
        log.debug("%r, evicted while still held, is taken back into the cache", key)
        return entry

    def _abandon(self, key: Hashable, flight: _Flight) -> None:
        """A load given up before its loader ran (its caller interrupted): no longer under way, its room free,
        its waiters woken to load the key themselves."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
            self._flights_ended += 1
            self._flight_ended.notify_all()
        flight.abandoned = True
        flight.done.set()

    def _lead(self, key: Hashable, flight: _Flight, loader: Loader[M], size: int | None) -> M:
        leading: contextvars.Token[tuple[_Flight, ...]] | None = None
        try:  # (from its first step: a Ctrl-C before the loader ran left the load under way for good, a review)
            before = self._rss() if size is None else 0
            # (what the loader loads itself is nested in this load, on this thread or, through the context that
            # asyncio.to_thread copies, on another: a nested coroutine loader's companion waited for this room)
            leading = _LEADING.set((*_LEADING.get(), flight))
            model = loader()
            # (a coroutine function's: it was cached, unawaited, as the engine)
            if inspect.isawaitable(model):
                if inspect.iscoroutine(model):
                    model.close()
                raise TypeError(f"the loader of {key!r} gave {type(model).__name__}, not an engine: a coroutine "
                                "loader goes to get_or_load_async")  # fmt: skip
        except BaseException as error:
            if leading is not None:
                _LEADING.reset(leading)
            with self._lock:
                self._failures += 1
                del self._flights[key]
                self._flights_ended += 1
                self._flight_ended.notify_all()
            flight.error = error
            flight.done.set()
            raise
        _LEADING.reset(leading)
        measured = size if size is not None else max(0, self._rss() - before)
        now = self._clock()
        with self._lock:
            del self._flights[key]
            self._flights_ended += 1
            self._flight_ended.notify_all()
            if flight.dropped:  # (what it was loaded from went meanwhile: its callers have it, the cache not)
                evicted = []
            else:
                self._entries[key] = _Entry(model, measured, now, now)
                evicted = self._enforce_locked(keep=key)
        flight.model = model
        flight.done.set()
        if self.memory_budget is not None and measured > self.memory_budget and not flight.dropped:
            log.warning("%r takes %d bytes, more than the engine cache's whole memory budget (%d): it is kept "
                        "with only what is pinned or held beside it", key, measured, self.memory_budget)  # fmt: skip
        self._run_hooks(evicted)
        if self.ttl is not None and self._clock is time.monotonic:
            _REAPER.watch(self)
        return model

    async def get_or_load_async(
        self,
        key: Hashable,
        loader: Callable[[], M] | Callable[[], Awaitable[M]],
        size: int | str | None = None,
    ) -> M:
        """:meth:`get_or_load` without blocking the event loop; ``loader`` may be a coroutine function (or give
        an awaitable: it is then awaited on this loop) or a plain callable (it then runs on a thread). A hit is
        answered on the loop; a miss waits on a thread of its own, not one of the loop's default executor: a
        coroutine loader that ran its blocking part with ``asyncio.to_thread`` found every thread of it taken by
        the calls waiting for it (six at once, on two cores), and waited for good (an explorer's trial)."""
        bytes_taken = _size(size)
        model = self._hit(key, self._clock())
        if model is not _MISS:
            return model  # type: ignore[return-value]
        loop = asyncio.get_running_loop()

        def blocking() -> M:
            made = loader()
            if inspect.isawaitable(made):
                try:
                    result: M = asyncio.run_coroutine_threadsafe(_awaited(made), loop).result()
                except futures.CancelledError:  # (an Exception: the waiters of a load cancelled raised it)
                    raise asyncio.CancelledError from None
                return result
            return made

        return await _on_a_thread_of_its_own(self.get_or_load, key, blocking, bytes_taken)

    # -- eviction ---------------------------------------------------------------------------------------

    def _make_room_locked(
        self, key: Hashable, incoming: int | None, evicted: list[tuple[Hashable, M]]
    ) -> None:
        """Before the load of ``key``: a free slot, room in the budget for ``incoming`` bytes beside the
        entries and the loads under way, and (under memory pressure) one idle entry less. The projection
        is recomputed after every eviction. When nothing more can be evicted and loads under way hold the
        room, it waits for them to end (and evicts again): loads that started together were all built at
        once (three models of 4 MiB under a 6 MiB budget), then all but one evicted. Never for one that
        waits for room itself, never by code that leads a load under way (a loader that loads another model, on
        its thread or one its context went to: ``_LEADING``): it would hold its room while it waits, and two
        such loads waited for each other for good; nor for a load such code waits for (``needed``). Nor for
        longer than ``room_wait`` while none of them ends nor grows the process by ``PROGRESS_BYTES``: a loader that loads its companion on a thread
        it started (a ``ThreadPoolExecutor``'s, which carries no context) waits on that companion, and the
        companion for its room, for good (an explorer's trial). What it evicts goes into ``evicted`` (theirs to
        let go of, even when the wait is interrupted)."""
        bound = math.inf if self.room_wait is None else self.room_wait
        ended, deadline = self._flights_ended, time.monotonic() + bound
        grown_to = -1  # the process's RSS when the wait last saw the loads under way make progress
        while True:
            while not self._slot_free_locked(key) and self._evict_lru_locked(evicted):
                pass
            if incoming is not None:
                while not self._fits_locked(key, incoming) and self._evict_lru_locked(evicted):
                    pass
            room = self._slot_free_locked(key) and (incoming is None or self._fits_locked(key, incoming))
            loading = self._loading_locked(key)
            led = self._led_here_locked()
            if room or not loading or self._flights[key].needed or any(f in led for f in loading):
                break  # (room, none to wait for, or a nested load: the limit gives way, as for what is pinned)
            if self._flights_ended != ended:  # (a load ended: the wait starts again from now)
                ended, deadline = self._flights_ended, time.monotonic() + bound
            left = deadline - time.monotonic()
            if left <= 0:
                # Loads under way that still grow the process (a 40 GB model read from a network disk) are slow,
                # not stuck: the wait goes on (two big models in memory at once is what the budget prevents)
                rss = self._rss()
                if rss >= grown_to + PROGRESS_BYTES:
                    grown_to, deadline = rss, time.monotonic() + bound
                    continue
                log.warning("the load of %r waited %.1f s for room held by loads under way (%s), which neither "
                            "ended nor grew the process: it goes over the cache's limits (a loader that loads it "
                            "on a thread of its own should run that load in its context: "
                            "contextvars.copy_context().run)", key, bound,
                            ", ".join(repr(k) for k, f in self._flights.items() if f in loading))  # fmt: skip
                break
            if grown_to < 0:  # (measured once it waits: most loads find room at once)
                grown_to = self._rss()
            self._flight_ended.wait(None if left == math.inf else left)
        self._flights[key].admitted = True
        if self.evict_on_memory_pressure and self._entries and self._available() < LOW_MEMORY_FRACTION:
            self._evict_lru_locked(evicted)

    def _led_here_locked(self) -> list[_Flight]:
        """The loads of this cache under way that the running code is nested in (not another cache's, nor one
        that ended: a task a coroutine loader started carries its context on, a review)."""
        live = {id(f) for f in self._flights.values()}
        return [f for f in _LEADING.get() if id(f) in live]

    def _loading_locked(self, key: Hashable) -> list[_Flight]:
        """The loads under way (given their room) but the one of ``key``."""
        return [f for k, f in self._flights.items() if k != key and f.admitted]

    def _slot_free_locked(self, key: Hashable) -> bool:
        """Whether the load of ``key`` has a slot beside the entries and the loads under way."""
        return len(self._entries) + len(self._loading_locked(key)) + 1 <= self.max_models

    def _fits_locked(self, key: Hashable, incoming: int) -> bool:
        if self.memory_budget is None:
            return True
        loading = sum(f.size or 0 for f in self._loading_locked(key))
        return self._total_locked() + self._held_out_locked() + loading + incoming <= self.memory_budget

    def _held_out_locked(self) -> int:
        """The bytes of the engines the limits evicted that their callers still hold (the dead forgotten)."""
        for key in [k for k, (ref, _) in self._held_out.items() if ref() is None]:
            del self._held_out[key]
        self._held_counted &= self._held_out.keys()
        return sum(size for key, (_, size) in self._held_out.items() if key in self._held_counted)

    def _remember_locked(self, key: Hashable, entry: _Entry[M]) -> None:
        """An entry the limits evict: its engine is taken back if a caller still holds it when next asked
        (forgotten by :meth:`_run_hooks` when it is closed, or when it cannot be weakly referenced). Only under
        the default hook, which judges under the lock whether it is held: another hook may close it whoever
        holds it, and one taken back before its hook ran was closed in the caller's hands (a review)."""
        if self.on_evict is not default_on_evict:
            return
        self._held_counted.discard(key)
        try:
            self._held_out[key] = (weakref.ref(entry.model), entry.size)
        except TypeError:  # (a plain dict, a tuple: no weak reference to them)
            self._held_out.pop(key, None)
            return
        # Its bytes count in the budget from now on only when a caller holds it now (or when its hook finds it
        # held): counted at once, every engine an eviction let go of still counted until its hook ran, and the
        # room-making loop, its projection never lower, evicted every idle engine for one load (a review)
        # (the parent's engines in a forked child have a reference more, of their own: not a caller's, and
        # they cost the child nothing; counted, the budget stayed full of one for good, a review)
        if _references_to(entry.model) > _ENTRY_REFERENCES + (id(entry.model) in self._from_parent):
            self._held_counted.add(key)

    def _enforce_locked(self, keep: Hashable) -> list[tuple[Hashable, M]]:
        """After a load: the limits again, with what the new entry really took beside the loads under way;
        it is never the victim."""
        evicted: list[tuple[Hashable, M]] = []
        while len(self._entries) + len(
            self._loading_locked(keep)
        ) > self.max_models and self._evict_lru_locked(evicted, keep):
            pass
        if self.memory_budget is not None:
            while not self._fits_locked(keep, 0) and self._evict_lru_locked(evicted, keep):
                pass
        return evicted

    def _evict_lru_locked(self, evicted: list[tuple[Hashable, M]], keep: Hashable | None = None) -> bool:
        candidates = [(e.last_used, k) for k, e in self._entries.items() if e.pins == 0 and k != keep]
        if not candidates:
            return False  # everything left is pinned (or the one kept): the limit gives way
        _, key = min(candidates, key=lambda pair: pair[0])
        entry = self._entries.pop(key)
        self._remember_locked(key, entry)
        evicted.append((key, entry.model))
        self._evictions += 1
        return True

    def _expire_locked(self, now: float | None = None) -> list[tuple[Hashable, M]]:
        if self.ttl is None:
            return []
        deadline = (self._clock() if now is None else now) - self.ttl
        stale = [k for k, e in self._entries.items() if e.pins == 0 and e.last_used <= deadline]
        for key in stale:
            self._remember_locked(key, self._entries[key])
        evicted = [(k, self._entries.pop(k).model) for k in stale]
        self._evictions += len(evicted)
        return evicted

    def _run_hooks(self, evicted: list[tuple[Hashable, M]]) -> None:
        """The hook for each evicted entry; the list holds the cache's last references (it is emptied)."""
        while evicted:
            key, model = evicted.pop()
            if id(model) in self._from_parent:
                log.debug("%r left the cache of a forked child: the parent's, it is kept, not closed", key)
                del model
                continue
            try:
                # (judged and forgotten at once: a load that took it back meanwhile holds it)
                with self._lock:
                    held = self.on_evict is default_on_evict and _references_to(model) > _OWN_REFERENCES
                    out = self._held_out.get(key)
                    if not held and out is not None and out[0]() is model:
                        del self._held_out[key]  # (closed, or given to another hook: never taken back)
                    elif held and out is not None and out[0]() is model:
                        self._held_counted.add(key)  # (still held by a caller: its bytes count from now on)
                if held:
                    log.debug("%r left the cache while still held: it goes when its holders let go", key)
                else:
                    self.on_evict(key, model)
            except Exception:
                log.exception("on_evict failed for %r; the entry is gone all the same", key)
            del model

    def evict(self, key: Hashable) -> bool:
        """Drop ``key`` (even if pinned); True if it was cached. A load of it under way is not cached when
        it ends (its callers still get it)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            self._held_out.pop(key, None)
            if entry is not None:
                self._evictions += 1
            if key in self._flights:
                self._flights[key].dropped = True
        if entry is None:
            return False
        evicted = [(key, entry.model)]
        del entry  # (the hook's list holds the cache's last reference)
        self._run_hooks(evicted)
        return True

    def evict_stale(self) -> int:
        """Drop every entry idle for longer than the TTL; returns how many went."""
        evicted = self._take_stale()
        count = len(evicted)
        self._run_hooks(evicted)
        return count

    def _take_stale(self) -> list[tuple[Hashable, M]]:
        """The entries idle for longer than the TTL, taken out (their hooks not run yet)."""
        with self._lock:
            return self._expire_locked()

    def clear(self) -> None:
        with self._lock:
            evicted = list((k, e.model) for k, e in self._entries.items())
            self._evictions += len(evicted)
            self._entries.clear()
            self._held_out.clear()
        self._run_hooks(evicted)

    # -- pins and queries -------------------------------------------------------------------------------

    def pin(self, key: Hashable) -> None:
        """Keep ``key`` through every limit and the TTL until :meth:`unpin` (pins count)."""
        with self._lock:
            self._require(key).pins += 1

    def unpin(self, key: Hashable) -> None:
        """Release one pin; limits that gave way to the pin apply again at once."""
        with self._lock:
            entry = self._require(key)
            if entry.pins == 0:
                raise InvalidInputError(f"{key!r} is not pinned")
            entry.pins -= 1
            del entry  # (it may be the one evicted: its hook must find no reference of the cache's)
            evicted = self._enforce_locked(keep=None)
        self._run_hooks(evicted)
        if self.ttl is not None and self._clock is time.monotonic:
            _REAPER.watch(self)  # (it may be due: a pinned entry's idle time counts all along)

    def _require(self, key: Hashable) -> _Entry[M]:
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"{key!r} is not loaded")
        return entry

    def contains(self, key: Hashable) -> bool:
        """Whether ``key`` is loaded (and not expired); does not count as a use."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and (
                self.ttl is None or entry.pins > 0 or entry.last_used > self._clock() - self.ttl
            )

    __contains__ = contains

    def __len__(self) -> int:
        self.evict_stale()  # (what has expired is not counted: contains() already says it is gone)
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[Hashable]:
        """Loaded keys, least recently used first."""
        self.evict_stale()
        with self._lock:
            return [k for k, _ in sorted(self._entries.items(), key=lambda item: item[1].last_used)]

    def loading(self) -> list[Hashable]:
        """The keys of the loads under way."""
        with self._lock:
            return list(self._flights)

    def _next_expiry(self) -> float | None:
        """When (on the cache's clock) the first idle entry is due to expire; None when none can."""
        with self._lock:
            if self.ttl is None:
                return None
            idle = [e.last_used for e in self._entries.values() if e.pins == 0]
            return min(idle) + self.ttl if idle else None

    def _total_locked(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def stats(self) -> CacheStats:
        self.evict_stale()
        with self._lock:
            lookups = self._hits + self._misses
            now = self._clock()
            return CacheStats(
                cached_models=len(self._entries),
                total_hits=self._hits,
                total_misses=self._misses,
                hit_rate=self._hits / lookups if lookups else 0.0,
                total_memory_bytes=self._total_locked(),
                oldest_entry_age_secs=max((now - e.loaded_at for e in self._entries.values()), default=0.0),
                evictions=self._evictions,
                load_failures=self._failures,
            )
