"""The loaded-model cache: single-flight, LRU by idle time under slot and memory limits (recomputed after
each eviction), idle TTL, pins, hooks that really free the engine, stats; a state machine for the limits."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import logging
import os
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from faultproxy import wait_until
from modeldepot.engines import LoadedModelCache, close_on_evict
from modeldepot.engines import cache as cache_module
from modeldepot.errors import CorruptBlobError, InvalidInputError, RepoNotFoundError, RevisionNotFoundError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Engine:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


class ClosingEngine:
    """An engine whose close() is noted by name (a list of the engines themselves would hold them)."""

    closed: ClassVar[list[str]] = []

    def __init__(self, name: str) -> None:
        self.name = name

    def close(self) -> None:
        ClosingEngine.closed.append(self.name)

    def run(self) -> str:
        assert self.name not in ClosingEngine.closed, f"{self.name} ran after it was closed"
        return self.name


class FlightWaiters:
    """How many callers have waited on another caller's load in flight (the single-flight path), so that a
    test can hold a load open until the others have joined it, instead of sleeping and hoping."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()
        self._listeners: list[Callable[[], None]] = []

    def joined(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()
            for listener in self._listeners:
                listener()

    def _too_few(self, count: int, timeout: float) -> TimeoutError:
        return TimeoutError(f"only {self.count} of {count} callers joined the load in flight in {timeout} s")

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.count >= count, timeout):
                raise self._too_few(count, timeout)

    async def wait_for_async(self, count: int, timeout: float = 30.0) -> None:
        """:meth:`wait_for` for a coroutine loader, without taking a worker thread from the event loop."""
        loop, reached = asyncio.get_running_loop(), asyncio.Event()

        def check() -> None:
            if self.count >= count:
                loop.call_soon_threadsafe(reached.set)

        with self._changed:
            self._listeners.append(check)
            check()
        try:
            await asyncio.wait_for(reached.wait(), timeout)
        except asyncio.TimeoutError:
            raise self._too_few(count, timeout) from None
        finally:
            with self._changed:
                self._listeners.remove(check)


@pytest.fixture
def flight_waiters(monkeypatch: pytest.MonkeyPatch) -> FlightWaiters:
    """Counts the callers that block on a load in flight, by giving each flight a counting ``done`` event."""
    waiters = FlightWaiters()

    class CountedEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waiters.joined()
            return super().wait(timeout)

    class CountedFlight(cache_module._Flight):
        def __init__(self, size: int | None) -> None:
            super().__init__(size)
            self.done = CountedEvent()

    monkeypatch.setattr(cache_module, "_Flight", CountedFlight)
    return waiters


def test_one_hundred_callers_of_one_key_make_one_load(flight_waiters: FlightWaiters) -> None:
    cache: LoadedModelCache[Engine] = LoadedModelCache()
    loads = []
    start = threading.Barrier(100)
    results: list[Engine] = []

    def loader() -> Engine:
        loads.append(1)
        flight_waiters.wait_for(99)  # the load stays in flight until every other caller waits on it
        return Engine("a")

    def call() -> None:
        start.wait()
        results.append(cache.get_or_load("a", loader, size=1))

    threads = [threading.Thread(target=call) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and flight_waiters.count == 99
    assert len(results) == 100 and all(r is results[0] for r in results)
    stats = cache.stats()
    # The 99 others waited on the one load: served by it without one of their own, they count as hits (a
    # hit rate that left them out counted a third of 128 calls in a trial as neither)
    assert stats.total_misses == 1 and stats.total_hits == 99 and stats.hit_rate == 0.99


def test_different_keys_load_in_parallel() -> None:
    cache: LoadedModelCache[str] = LoadedModelCache()
    both_loading = threading.Barrier(2, timeout=30)  # breaks (and fails the loads) if loads were serial

    def loader(name: str) -> str:
        both_loading.wait()
        return name

    threads = [threading.Thread(target=cache.get_or_load, args=(k, lambda k=k: loader(k), 1)) for k in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(cache.keys()) == {"a", "b"}


def test_a_failed_load_reaches_every_waiter_and_is_not_cached(flight_waiters: FlightWaiters) -> None:
    cache: LoadedModelCache[str] = LoadedModelCache()
    attempts = []
    release = threading.Event()

    def failing() -> str:
        attempts.append(1)
        release.wait(30)
        raise RuntimeError("model file is broken")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            cache.get_or_load("k", failing)
        except RuntimeError as error:
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(10)]
    for thread in threads:
        thread.start()
    try:
        flight_waiters.wait_for(9)  # the failure must reach callers that waited on the load, not later ones
    finally:
        release.set()
    for thread in threads:
        thread.join()
    assert len(attempts) == 1 and len(errors) == 10
    assert all(str(e) == "model file is broken" for e in errors)
    # Each waiter raises an error of its own, from the load's: one object raised in ten threads piled up all
    # their frames in its traceback (52 frames in a trial); and a wait that ended in failure is no hit
    assert len({id(e) for e in errors}) == 10 and all(e.__cause__ in errors for e in errors if e.__cause__)
    assert all(len(traceback.extract_tb(e.__traceback__)) < 8 for e in errors)
    stats = cache.stats()
    assert "k" not in cache and stats.load_failures == 1 and (stats.total_hits, stats.total_misses) == (0, 10)
    assert cache.get_or_load("k", lambda: "fine") == "fine"  # the next call loads again


@pytest.mark.parametrize("error", [
    RepoNotFoundError("org/missing"),
    CorruptBlobError("ab" * 32, "chunk 3 does not match its BLAKE3"),
    RevisionNotFoundError("org/m", "dev"),
    OSError(5, "Input/output error"),
    FileNotFoundError(2, "No such file or directory", "/models/tokenizer.json"),  # (its file name was lost)
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),  # (its message was empty)
], ids=lambda e: type(e).__name__)  # fmt: skip
def test_each_waiter_gets_the_failed_loads_own_error(flight_waiters: FlightWaiters, error: Exception) -> None:
    """Copied through its constructor, a RepoNotFoundError's message came out as its repo id for every
    waiter ('repo "repo \'org/x\' is not in the store …" is not in the store'), and errors whose constructor
    takes other arguments than their args were not copied at all (a review)."""
    cache: LoadedModelCache[str] = LoadedModelCache()
    release = threading.Event()

    def failing() -> str:
        release.wait(30)
        raise error

    caught: list[BaseException] = []

    def call() -> None:
        try:
            cache.get_or_load("k", failing)
        except BaseException as raised:  # (the type is checked below)
            caught.append(raised)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        flight_waiters.wait_for(3)
    finally:
        release.set()
    for thread in threads:
        thread.join()
    assert [type(e) for e in caught] == [type(error)] * 4 and {str(e) for e in caught} == {str(error)}
    assert len({id(e) for e in caught}) == 4 and vars(caught[0]) == vars(caught[-1])


def test_the_least_recently_used_goes_when_slots_run_out() -> None:
    evicted: list[Hashable] = []
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=2, on_evict=lambda k, m: evicted.append(k))
    cache.get_or_load("a", lambda: "A")
    cache.get_or_load("b", lambda: "B")
    cache.get_or_load("a", lambda: "never")  # a hit: a is now the most recent
    cache.get_or_load("c", lambda: "C")
    assert evicted == ["b"] and cache.keys() == ["a", "c"]


def test_the_memory_projection_is_recomputed_after_each_eviction() -> None:
    evicted: list[Hashable] = []
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=10, memory_budget=100,
                                                    on_evict=lambda k, m: evicted.append(k))  # fmt: skip
    cache.get_or_load("a", lambda: "A", size=40)
    cache.get_or_load("b", lambda: "B", size=40)
    cache.get_or_load("c", lambda: "C", size=50)  # 130 > 100: evicting a alone makes room (90)
    assert evicted == ["a"] and cache.keys() == ["b", "c"]
    assert cache.stats().total_memory_bytes == 90


def test_under_the_default_hook_one_load_evicts_only_what_it_needs_and_a_held_engine_still_counts() -> None:
    """Engines as Depot.load makes them (weakly referable, the default hook): each engine evicted counted in
    the budget until its hook ran, after the room-making loop, whose projection so never fell: one load that
    needed room evicted every idle engine (a review: 3 of 3 where 1 was needed, the LRU kept only the last
    one). An engine a caller holds as it is evicted still takes its memory: it counts, and more goes."""
    ClosingEngine.closed = []
    cache: LoadedModelCache[ClosingEngine] = LoadedModelCache(max_models=10, memory_budget=8)
    cache.get_or_load("a", lambda: ClosingEngine("a"), size=2)
    held = cache.get_or_load("b", lambda: ClosingEngine("b"), size=2)
    cache.get_or_load("c", lambda: ClosingEngine("c"), size=2)
    cache.get_or_load("d", lambda: ClosingEngine("d"), size=3)  # 6 + 3 > 8: a alone makes room
    assert sorted(cache.keys()) == ["b", "c", "d"] and ClosingEngine.closed == ["a"]
    assert cache.stats().evictions == 1
    # 7 + 2 > 8: b goes, but its caller holds it (its 2 bytes still taken), so c goes too; b is not closed
    cache.get_or_load("e", lambda: ClosingEngine("e"), size=2)
    assert sorted(cache.keys()) == ["d", "e"] and ClosingEngine.closed == ["a", "c"]
    assert held.run() == "b"
    del held  # (let go of: freed, and no longer counted)
    cache.get_or_load("f", lambda: ClosingEngine("f"), size=3)  # 5 + 3 fit
    assert sorted(cache.keys()) == ["d", "e", "f"] and ClosingEngine.closed == ["a", "c"]


def test_entries_the_ttl_let_go_of_make_room_for_a_load_that_needs_it() -> None:
    """An idle entry past its TTL, taken out as a load began, was counted again by that load's room-making:
    a live one went in its place (a review)."""
    ClosingEngine.closed = []
    cache: LoadedModelCache[ClosingEngine] = LoadedModelCache(max_models=10, memory_budget=4, ttl=10,
                                                              clock=(clock := Clock()))  # fmt: skip
    cache.get_or_load("a", lambda: ClosingEngine("a"), size=2)
    clock.now += 6
    cache.get_or_load("b", lambda: ClosingEngine("b"), size=2)
    clock.now += 5  # a is past its TTL, b is not
    cache.get_or_load("c", lambda: ClosingEngine("c"), size=2)
    assert cache.keys() == ["b", "c"] and ClosingEngine.closed == ["a"]


def test_a_model_over_the_whole_budget_is_kept_alone_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """It flushed every other engine and stayed over the budget without a word (a trial)."""
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=10, memory_budget=100)
    cache.get_or_load("a", lambda: "A", size=40)
    with caplog.at_level(logging.WARNING, logger="modeldepot.engines.cache"):
        cache.get_or_load("huge", lambda: "H", size=150)
    assert (
        cache.keys() == ["huge"] and "more than the engine cache's whole memory budget (100)" in caplog.text
    )


def test_loads_under_way_hold_their_room_in_the_budget_and_the_slots() -> None:
    """Three first loads of 4-byte models under a 6-byte budget, started together, were all built at once
    (each saw an empty cache), then two were evicted as they ended. A load now waits for those under way
    when nothing can be evicted, and the models are never more than the budget together."""
    evicted: list[Hashable] = []
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=10, memory_budget=6,
                                                    on_evict=lambda key, model: evicted.append(key))  # fmt: skip
    lock, loading, peak = threading.Lock(), [0], [0]
    start = threading.Barrier(3)

    def load(key: str) -> str:
        with lock:
            loading[0] += 1
            peak[0] = max(peak[0], loading[0] + len(cache))  # models in memory: cached and being built
        time.sleep(0.2)
        with lock:
            loading[0] -= 1
        return key.upper()

    def call(key: str) -> None:
        start.wait()
        assert cache.get_or_load(key, lambda: load(key), size=4) == key.upper()

    threads = [threading.Thread(target=call, args=(key,)) for key in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert peak[0] == 1, "one model at a time: each waited for the one under way, then evicted it"
    assert len(cache) == 1 and len(evicted) == 2
    # The slot limit too; and a loader that loads another model itself never waits for its own load
    slots: LoadedModelCache[str] = LoadedModelCache(max_models=1)
    assert slots.get_or_load("outer", lambda: slots.get_or_load("inner", lambda: "I") + "O") == "IO"


@pytest.mark.parametrize("limit", ["slots", "memory"])
def test_loaders_on_many_threads_that_each_load_another_model_never_wait_for_each_other(limit: str) -> None:
    """Two loads filled the cache's two slots, and each loader then loaded a companion model (a pipeline's
    tokenizer, an encoder): each companion waited for the other thread's load to end, which waited on its
    own companion: both hung for good (an explorer's trial)."""
    cache: LoadedModelCache[str] = (
        LoadedModelCache(max_models=2) if limit == "slots" else LoadedModelCache(memory_budget=8)
    )
    both_loading = threading.Barrier(2, timeout=10)

    def outer(key: str) -> str:
        both_loading.wait()  # (each has its room when the other asks for its companion)
        return key + cache.get_or_load(f"{key}-companion", lambda: "+c", size=4)

    results: dict[str, str] = {}
    threads = [
        threading.Thread(
            target=lambda key=key: results.update({key: cache.get_or_load(key, lambda: outer(key), size=4)})
        )
        for key in ("a", "b")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads), "nested loads on two threads hung"
    assert results == {"a": "a+c", "b": "b+c"}
    assert cache.loading() == []


def test_a_companion_another_thread_waits_room_for_is_not_waited_for_by_the_load_that_needs_it() -> None:
    """One slot: a load of A under way, another thread asking for B waits for A's room; A's loader then asks
    for B, joins B's load, and waited for it while B waited for A: both hung (a review)."""
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=1)
    b_waits = threading.Event()

    def load_a() -> str:
        b_waits.wait(10)
        wait_until(lambda: cache.loading() == ["A", "B"] or cache.loading() == ["B", "A"], timeout=10)
        time.sleep(0.1)  # (B's leader is in its wait for room)
        return "A" + cache.get_or_load("B", lambda: "b")

    outer = threading.Thread(target=lambda: cache.get_or_load("A", load_a), daemon=True)
    outer.start()
    wait_until(lambda: cache.loading() == ["A"], timeout=10)
    other = threading.Thread(target=lambda: (b_waits.set(), cache.get_or_load("B", lambda: "b")), daemon=True)
    other.start()
    outer.join(10)
    other.join(10)
    assert not outer.is_alive() and not other.is_alive(), "the two loads hung"
    assert cache.get_or_load("A", lambda: "never") == "Ab"


@pytest.mark.parametrize("limit", ["slots", "memory"])
def test_a_loader_that_loads_its_companion_on_a_pool_thread_is_not_left_waiting_for_its_own_room(
    limit: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A loader that loads a companion model on a ThreadPoolExecutor's thread (which carries no context) of a
    full cache: the companion waited for the room its own loader held, the loader for the companion, both
    for good (an explorer's trial). The wait is bounded while no load ends, and says why; a companion loaded
    in the loader's context is nested and never waits."""
    from concurrent.futures import ThreadPoolExecutor
    from contextvars import copy_context

    def cache() -> LoadedModelCache[str]:
        if limit == "slots":
            return LoadedModelCache(max_models=1, room_wait=0.5)
        return LoadedModelCache(memory_budget=6, room_wait=0.5)

    def outer(into: LoadedModelCache[str], carry_context: bool) -> str:
        def companion() -> str:
            return into.get_or_load("companion", lambda: "+c", size=4)

        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(copy_context().run, companion) if carry_context else pool.submit(companion)
            return "o" + future.result(timeout=20)

    def run(into: LoadedModelCache[str], carry_context: bool, result: list[str]) -> None:
        result.append(into.get_or_load("outer", lambda: outer(into, carry_context), size=4))

    for carry_context in (False, True):
        target = cache()
        caplog.clear()
        result: list[str] = []
        thread = threading.Thread(target=run, args=(target, carry_context, result), daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "the loader and its companion waited for each other for good"
        assert result == ["o+c"] and target.loading() == []
        warned = [r for r in caplog.records if "waited" in r.getMessage() and "'companion'" in r.getMessage()]
        if carry_context:
            assert not warned and time.monotonic() - started < 0.5, (
                "a companion in the loader's context waited"
            )
        else:
            assert warned and "'outer'" in warned[0].getMessage() and "copy_context" in warned[0].getMessage()


def test_a_load_that_waits_for_room_waits_again_from_each_load_that_ends() -> None:
    """The bound is on a wait in which no load ends: one that waits for loads ending one after another under
    a slot limit waits for them all, never goes over."""
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=1, room_wait=1.0)
    peak, running, lock = [0], [0], threading.Lock()

    def load(key: str) -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.5)  # (the last of four waits 1.5 s in all, never 1 s with no load ending)
        with lock:
            running[0] -= 1
        return key

    threads = [threading.Thread(target=cache.get_or_load, args=(k, lambda k=k: load(k))) for k in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert peak[0] == 1, f"{peak[0]} loads ran at once under one slot (a wait gave way while loads ended)"
    with pytest.raises(ValueError, match="room_wait"):
        LoadedModelCache(room_wait=0)


def test_a_coroutine_loader_that_loads_a_companion_does_not_wait_for_its_own_room() -> None:
    """A coroutine loader's companion is loaded on another worker thread: it waited for the room of the load
    it was part of, for good (a review). The load it is nested in goes by the context, not the thread."""
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=1)

    async def load_b() -> str:
        return "b"

    async def load_a() -> str:
        return "A" + await cache.get_or_load_async("B", load_b)

    async def main() -> str:
        return await asyncio.wait_for(cache.get_or_load_async("A", load_a), 10)

    assert asyncio.run(main()) == "Ab"


def _concurrent_loads(
    cache: LoadedModelCache[str], keys_to_wait: list[str], asker: Callable[[str], Any]
) -> int:
    """One slot. L loads slowly (holds the slot); other threads lead K1..Kn, each waiting for room.
    `asker(key)` then asks for each Ki as a waiter. Returns the most loads seen running at once."""
    running, peak, lock = 0, 0, threading.Lock()
    release = threading.Event()

    def loader(name: str) -> Callable[[], str]:
        def load() -> str:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            release.wait(5)
            with lock:
                running -= 1
            return name

        return load

    threads = [threading.Thread(target=cache.get_or_load, args=("L", loader("L")), daemon=True)]
    threads[0].start()
    wait_until(lambda: cache.loading() == ["L"], timeout=5)
    for k in keys_to_wait:
        t = threading.Thread(target=cache.get_or_load, args=(k, loader(k)), daemon=True)
        t.start()
        threads.append(t)
    wait_until(lambda: len(cache.loading()) == 1 + len(keys_to_wait), timeout=5)
    time.sleep(0.1)  # (their leaders wait for room)
    for k in keys_to_wait:
        asker(k)
    time.sleep(0.5)
    seen = peak
    release.set()
    for t in threads:
        t.join(5)
    return seen


def test_a_task_a_coroutine_loader_started_is_not_nested_in_its_load_once_it_ended() -> None:
    """(A task a loader started carries the loader's context on: it freed loads from the slot limit, without
    bound, long after the load ended: a review.)"""
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=1)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    requests: asyncio.Queue[str] = asyncio.Queue()
    started: set[asyncio.Future[str]] = set()

    async def background() -> None:  # e.g. an engine's serving loop, started by its loader
        while True:
            key = await requests.get()
            started.add(asyncio.ensure_future(cache.get_or_load_async(key, lambda: "never")))

    async def load_engine() -> str:
        asyncio.get_running_loop().create_task(background())
        return "engine"

    assert (
        asyncio.run_coroutine_threadsafe(cache.get_or_load_async("E", load_engine), loop).result(5)
        == "engine"
    )
    assert cache.loading() == []  # E's load is long over
    keys = [f"K{i}" for i in range(4)]
    peak = _concurrent_loads(cache, keys, lambda k: loop.call_soon_threadsafe(requests.put_nowait, k))
    assert peak == 1, f"{peak} loads ran at once under max_models=1 (nothing was nested)"


def test_a_load_in_another_cache_does_not_free_this_caches_limit() -> None:
    """(A loader of another cache asking for this one's models freed them from its limit: a review.)"""
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=1)
    other: LoadedModelCache[str] = LoadedModelCache(max_models=4)
    keys = [f"K{i}" for i in range(3)]

    def ask(k: str) -> None:
        # a loader of another cache (admitted there) that needs this cache's K: no cycle is possible here
        threading.Thread(
            target=other.get_or_load,
            args=(f"x{k}", lambda: cache.get_or_load(k, lambda: "never")),
            daemon=True,
        ).start()

    peak = _concurrent_loads(cache, keys, ask)
    assert peak == 1, f"{peak} loads ran at once under max_models=1"


def test_a_size_not_given_is_measured_as_rss_growth() -> None:
    rss = iter([1000, 1700])
    cache: LoadedModelCache[str] = LoadedModelCache(rss=lambda: next(rss))
    cache.get_or_load("a", lambda: "A")
    assert cache.stats().total_memory_bytes == 700


def test_idle_ttl_expires_and_reads_extend_it() -> None:
    clock = Clock()
    cache: LoadedModelCache[str] = LoadedModelCache(ttl=10, clock=clock)
    cache.get_or_load("a", lambda: "A", size=1)
    clock.now += 8
    assert cache.get_or_load("a", lambda: "reloaded") == "A"  # a hit 8 s in: idle time restarts
    clock.now += 8
    assert cache.contains("a") and cache.evict_stale() == 0
    clock.now += 3
    assert not cache.contains("a")
    assert cache.evict_stale() == 1 and len(cache) == 0
    assert cache.get_or_load("a", lambda: "reloaded") == "reloaded"


def test_an_idle_engine_goes_at_its_ttl_without_another_load() -> None:
    """The TTL was applied only when the next load came: a worker that loaded its engines and then only ran
    them kept every one (and the memory and preloads they hold) for good, counted in stats() while
    contains() said it was gone (a trial: 38 MB kept a minute past a TTL of 1 s)."""
    closed: list[Hashable] = []
    cache: LoadedModelCache[str] = LoadedModelCache(ttl=0.3, on_evict=lambda key, model: closed.append(key))
    cache.get_or_load("kept", lambda: "K", size=1)
    cache.pin("kept")
    cache.get_or_load("idle", lambda: "I", size=5)
    cache.get_or_load("used", lambda: "U", size=7)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # "used" is asked for all along: its idle time never reaches the TTL
        assert cache.get_or_load("used", lambda: "reloaded") == "U"
        time.sleep(0.05)
    assert closed == ["idle"], "the idle engine went on its own; the pinned and the used ones stay"
    assert cache.stats().cached_models == 2 and cache.stats().total_memory_bytes == 8
    cache.unpin("kept")
    deadline = time.monotonic() + 3
    while len(closed) < 3 and time.monotonic() < deadline:  # an unpinned entry's idle time ran all along
        time.sleep(0.02)
    assert sorted(closed) == ["idle", "kept", "used"]
    assert len(cache) == 0 and cache.stats().total_memory_bytes == 0


def test_the_ttl_thread_keeps_no_cache_alive() -> None:
    """The thread that keeps the TTL held the last cache it looked at while it waited: a closed depot's
    engines stayed, and the files they map stayed open (a read-only mount could not be unmounted)."""
    closed: list[Hashable] = []
    cache: LoadedModelCache[str] = LoadedModelCache(ttl=0.1, on_evict=lambda key, model: closed.append(key))
    cache.get_or_load("a", lambda: "A", size=1)
    deadline = time.monotonic() + 3
    while not closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert closed == ["a"]
    held = weakref.ref(cache)
    del cache
    gc.collect()
    assert held() is None


def test_the_ttl_thread_outlives_loads_from_many_threads_at_once() -> None:
    """The TTL thread walked a set of caches that loads in other threads added to: "Set changed size during
    iteration" ended it, and no engine expired in the process after (a review)."""
    caches: list[LoadedModelCache[object]] = []

    def load_many() -> None:
        for _ in range(200):
            cache: LoadedModelCache[object] = LoadedModelCache(ttl=3600)
            cache.get_or_load("k", object, size=1)
            caches.append(cache)

    workers = [threading.Thread(target=load_many) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    late: LoadedModelCache[object] = LoadedModelCache(ttl=0.2)
    late.get_or_load("idle", object, size=1)
    deadline = time.monotonic() + 3
    while "idle" in late._entries and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "idle" not in late._entries, "an idle engine outlived its TTL"


def test_the_ttl_thread_keeps_one_look_per_cache_however_many_loads() -> None:
    """Each load pushed a look at its cache, and each look pushed itself again: a server that loads often
    (four slots, many models) grew the heap, and the thread's wakes, without end (a second reading)."""
    from modeldepot.engines.cache import _REAPER

    cache: LoadedModelCache[object] = LoadedModelCache(max_models=4, ttl=3600)
    for key in range(200):
        cache.get_or_load(key, object, size=1)
    with _REAPER._changed:
        looks = [entry for entry in _REAPER._due if entry[2]() is cache]
    assert len(looks) == 1, len(looks)


def _child_can_lock(cache: LoadedModelCache[object]) -> bool:
    pid = os.fork()
    if pid == 0:
        os._exit(0 if cache._lock.acquire(timeout=2) else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # (3.12: fork with threads)
def test_a_fork_as_the_ttl_thread_works_leaves_the_child_a_usable_cache() -> None:
    """A fork while the TTL thread held a cache's lock left the child's copy held for good: its first use of
    that cache hung (a review: 19 forks in 20 with a cache of 200,000 entries)."""
    from modeldepot.engines.cache import _REAPER, _Entry

    cache: LoadedModelCache[object] = LoadedModelCache(max_models=10**6, ttl=3600)
    now = time.monotonic()
    cache._entries.update({i: _Entry(object(), 1, now - 3599.9, now - 3599.9) for i in range(200_000)})
    stuck = 0
    for _ in range(10):
        _REAPER.watch(cache)  # due at once: the thread takes the cache's lock as the fork comes
        stuck += not _child_can_lock(cache)
        cache._entries.update({i: _Entry(object(), 1, now - 3599.9, now - 3599.9) for i in range(200_000)})
    assert stuck == 0, f"{stuck} of 10 forked children found the cache's lock held for good"


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # (3.12: fork with threads)
def test_a_forked_child_lets_the_engines_it_inherited_go_at_their_ttl() -> None:
    cache: LoadedModelCache[object] = LoadedModelCache(ttl=0.3)
    cache.get_or_load("inherited", object, size=1)
    pid = os.fork()
    if pid == 0:
        time.sleep(1.0)
        os._exit(0 if "inherited" not in cache._entries else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's inherited idle engine outlived its TTL"


def test_what_has_expired_is_not_counted() -> None:
    clock = Clock()
    cache: LoadedModelCache[str] = LoadedModelCache(ttl=10, clock=clock)
    cache.get_or_load("a", lambda: "A", size=3)
    clock.now += 11
    assert cache.stats().cached_models == 0 and cache.stats().total_memory_bytes == 0
    assert cache.keys() == [] and len(cache) == 0


def test_eviction_closes_and_frees_the_engine() -> None:
    cache: LoadedModelCache[Engine] = LoadedModelCache(max_models=1)
    engine = cache.get_or_load("a", lambda: Engine("a"))
    ref = weakref.ref(engine)
    del engine
    cache.get_or_load("b", lambda: Engine("b"))  # evicts a
    gc.collect()
    assert ref() is None, "the cache kept a reference to an evicted engine"
    closed = []
    cache.on_evict = lambda key, model: closed.append(key)
    assert cache.evict("b") and closed == ["b"] and not cache.evict("b")


def test_an_engine_evicted_while_held_is_taken_back_not_built_twice() -> None:
    """A request thread held engine A while another's load evicted it: the next load of A built a second copy
    beside the live one (8 threads on more models than fit: the process grew 25 MiB under a 6 MiB budget, an
    explorer's trial). It is taken back; while held out it counts in the budget; what nobody holds, what was
    closed, and what was evicted by name are built anew."""
    built: list[str] = []

    def loader(name: str) -> Callable[[], ClosingEngine]:
        return lambda: built.append(name) or ClosingEngine(name)

    ClosingEngine.closed = []
    cache: LoadedModelCache[ClosingEngine] = LoadedModelCache(max_models=4, ttl=10, memory_budget=6,
                                                              clock=(clock := Clock()))  # fmt: skip
    held = cache.get_or_load("a", loader("a"), size=4)
    cache.get_or_load("b", loader("b"), size=4)  # a goes out of the cache, still held by its caller
    assert cache.keys() == ["b"] and ClosingEngine.closed == []
    assert cache.get_or_load("a", loader("a2"), size=4) is held  # taken back, not built again
    assert built == ["a", "b"] and cache.keys() == ["a"] and ClosingEngine.closed == ["b"]
    # Held out, its bytes count: a small model loaded beside it evicts the idle one to make room for them
    cache.get_or_load("c", loader("c"), size=1)  # a (4) + c (1) fit
    cache.get_or_load("d", loader("d"), size=4)  # evicts a (held: 4 bytes still taken), then c (nobody's)
    assert cache.keys() == ["d"] and "c" in ClosingEngine.closed and "a" not in ClosingEngine.closed
    held.run()
    # Let go of, it is freed and forgotten: the next load builds it
    del held
    assert cache.get_or_load("a", loader("a3"), size=4).name == "a3"
    # Its own TTL running out as it is asked for again: built anew (an engine nobody holds, closed)
    clock.now += 11
    assert cache.get_or_load("a", loader("a4"), size=4).name == "a4" and "a3" in ClosingEngine.closed
    # Evicted by name (a removed model's), it is not taken back, held or not
    kept = cache.get_or_load("a", loader("a5"), size=4)
    assert kept.name == "a4"
    assert cache.evict("a") and cache.get_or_load("a", loader("a5"), size=4).name == "a5"
    # Another hook (which may close what is held) is never taken back from
    closed: list[str] = []
    other: LoadedModelCache[ClosingEngine] = LoadedModelCache(
        max_models=1, on_evict=lambda k, m: closed.append(k)
    )
    first = other.get_or_load("x", lambda: ClosingEngine("x"))
    other.get_or_load("y", lambda: ClosingEngine("y"))
    assert closed == ["x"] and other.get_or_load("x", lambda: ClosingEngine("x2")) is not first


def test_an_engine_another_hook_closes_is_never_taken_back_between_its_eviction_and_its_hook() -> None:
    """A load of the key in the moment between an eviction and its hook (on the evicting thread, outside the
    lock) took the engine back; then the hook, another than the default, closed it in that caller's hands
    (a review)."""
    closed: list[str] = []
    cache: LoadedModelCache[Engine] = LoadedModelCache(
        max_models=2, ttl=5, clock=(clock := Clock()), on_evict=lambda key, model: (model.close(), closed.append(model.name))
    )  # fmt: skip
    between, go = threading.Event(), threading.Event()
    real = cache._run_hooks

    def held_hooks(evicted: list[tuple[Any, Engine]]) -> None:
        if evicted and threading.current_thread().name == "evicting":
            between.set()
            assert go.wait(30)
        real(evicted)

    cache._run_hooks = held_hooks  # type: ignore[method-assign]
    cache.get_or_load("a", lambda: Engine("a"))
    clock.now += 6  # (its TTL is up: the evicting thread takes it out)
    evicting = threading.Thread(target=cache.evict_stale, name="evicting")
    evicting.start()
    assert between.wait(30)
    got = cache.get_or_load("a", lambda: Engine("a2"))
    go.set()
    evicting.join(30)
    assert got.name == "a2" and not got.closed and closed == ["a"]


def test_default_hook_calls_close_of_an_engine_nobody_holds() -> None:
    ClosingEngine.closed = []
    cache: LoadedModelCache[ClosingEngine] = LoadedModelCache(max_models=1, ttl=10, clock=(clock := Clock()))
    cache.get_or_load("a", lambda: ClosingEngine("a"))
    cache.evict("a")
    assert ClosingEngine.closed == ["a"]
    # Each way out, the cache's own frames holding nothing: the TTL of the key asked for again, and an
    # unpin that lets the limits evict the entry it unpinned.
    cache.get_or_load("b", lambda: ClosingEngine("b"))
    clock.now += 11
    cache.get_or_load("b", lambda: ClosingEngine("b2"))
    assert ClosingEngine.closed == ["a", "b"]
    cache.pin("b")
    cache.get_or_load("c", lambda: ClosingEngine("c"))  # (the slot gives way to the pin)
    clock.now += 1
    cache.get_or_load("c", lambda: ClosingEngine("c2"))  # c used later than b2
    cache.unpin("b")
    assert cache.keys() == ["c"] and ClosingEngine.closed == ["a", "b", "b2"]


def test_an_engine_evicted_while_a_caller_holds_it_is_not_closed_under_it() -> None:
    ClosingEngine.closed = []
    cache: LoadedModelCache[ClosingEngine] = LoadedModelCache(max_models=1, ttl=5, clock=(clock := Clock()))
    in_use = cache.get_or_load("a", lambda: ClosingEngine("a"))
    cache.get_or_load("b", lambda: ClosingEngine("b"))  # evicts a, which a request still runs on
    assert in_use.run() == "a" and ClosingEngine.closed == []
    cache.get_or_load("c", lambda: ClosingEngine("c"))  # evicts b, which nobody holds: closed at once
    assert ClosingEngine.closed == ["b"]
    held = cache.get_or_load("c", lambda: ClosingEngine("other"))
    clock.now += 10
    cache.evict_stale()  # the TTL, with a caller still on it
    assert held.run() == "c" and ClosingEngine.closed == ["b"]
    ref = weakref.ref(in_use)
    del in_use, held
    gc.collect()
    assert ref() is None, "an engine left to its holders goes with the last of them"
    cache.get_or_load("d", lambda: ClosingEngine("d"))
    assert cache.evict("d") and ClosingEngine.closed == ["b", "d"]


class PooledEngine(ClosingEngine):
    """An engine with a worker thread running a closure over it (a batching loop, a pool)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.stopping = threading.Event()

        def serve() -> None:
            self.stopping.wait()

        self.worker = threading.Thread(target=serve, daemon=True, name=f"engine-{name}")
        self.worker.start()

    def close(self) -> None:
        super().close()
        self.stopping.set()


def test_an_engines_own_thread_is_a_holder_unless_the_hook_closes_whoever_holds_it() -> None:
    """Which references are an engine's own cannot be read safely from the interpreter (tried: a closure
    over ``self`` in its thread, an event loop it keeps reaching the requests that wait on it, the thread
    that loaded it: each closed an engine under its caller). The default hook counts them as holders;
    close_on_evict is the way for an engine that needs its close() to stop its thread."""
    ClosingEngine.closed = []
    cache: LoadedModelCache[PooledEngine] = LoadedModelCache(max_models=1)
    in_use = cache.get_or_load("a", lambda: PooledEngine("a"))
    cache.get_or_load("b", lambda: PooledEngine("b"))  # evicts a, which the caller still holds
    assert ClosingEngine.closed == [] and in_use.run() == "a"
    cache.clear()
    ClosingEngine.closed = []
    closing: LoadedModelCache[PooledEngine] = LoadedModelCache(max_models=1, on_evict=close_on_evict)
    closing.get_or_load("c", lambda: PooledEngine("c"))
    worker = next(t for t in threading.enumerate() if t.name == "engine-c")
    closing.get_or_load("d", lambda: PooledEngine("d"))
    assert ClosingEngine.closed == ["c"]
    worker.join(10)
    assert not worker.is_alive(), "its close() stopped its thread"
    closing.clear()
    in_use.close()


def test_an_engine_a_request_awaits_on_the_loop_it_keeps_is_not_closed_under_it() -> None:
    """A request (a task on the loop) holds the engine while it awaits; the engine keeps that loop."""

    class LoopEngine(ClosingEngine):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.loop = asyncio.get_running_loop()

    async def main() -> list[str]:
        cache: LoadedModelCache[ClosingEngine] = LoadedModelCache(max_models=1)
        got, finish = asyncio.Event(), asyncio.Event()

        async def request() -> str:
            engine = cache.get_or_load("a", lambda: LoopEngine("a"))
            got.set()
            await finish.wait()
            return engine.run()

        task = asyncio.create_task(request())
        await asyncio.wait_for(got.wait(), 10)
        cache.get_or_load("b", lambda: ClosingEngine("b"))  # another request's model evicts a
        closed_meanwhile = list(ClosingEngine.closed)
        finish.set()
        assert await task == "a"
        cache.clear()
        return closed_meanwhile

    ClosingEngine.closed = []
    assert asyncio.run(main()) == []


def test_an_engine_a_request_runs_on_in_another_thread_is_not_closed_under_it() -> None:
    """No variable holds the engine, only the request's frames (``get_or_load(...).run()``)."""
    ClosingEngine.closed = []
    started, finish = threading.Event(), threading.Event()
    ran: list[str] = []

    class Slow(ClosingEngine):
        def run(self) -> str:
            started.set()
            finish.wait(10)
            return super().run()

    cache: LoadedModelCache[ClosingEngine] = LoadedModelCache(max_models=1)
    request = threading.Thread(target=lambda: ran.append(cache.get_or_load("a", lambda: Slow("a")).run()))
    request.start()
    assert started.wait(10)
    cache.get_or_load("b", lambda: ClosingEngine("b"))  # evicts a, mid-request
    assert ClosingEngine.closed == []
    finish.set()
    request.join(10)
    assert ran == ["a"]


def test_close_on_evict_closes_whoever_holds_the_engine() -> None:
    ClosingEngine.closed = []
    cache: LoadedModelCache[ClosingEngine] = LoadedModelCache(max_models=1, on_evict=close_on_evict)
    held = cache.get_or_load("a", lambda: ClosingEngine("a"))
    cache.get_or_load("b", lambda: ClosingEngine("b"))
    assert ClosingEngine.closed == ["a"] and held.name == "a"


def test_a_hook_that_raises_does_not_break_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    def broken(key: Hashable, model: Any) -> None:
        raise OSError("close failed")

    cache: LoadedModelCache[str] = LoadedModelCache(max_models=1, on_evict=broken)
    cache.get_or_load("a", lambda: "A")
    cache.get_or_load("b", lambda: "B")
    assert cache.keys() == ["b"] and "on_evict failed" in caplog.text


def test_pinned_entries_survive_every_limit_until_unpinned() -> None:
    clock = Clock()
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=1, ttl=5, clock=clock)
    cache.get_or_load("a", lambda: "A")
    cache.pin("a")
    cache.get_or_load("b", lambda: "B")  # no slot can be freed: the limit gives way to the pin
    clock.now += 100
    assert cache.evict_stale() == 1 and cache.keys() == ["a"]  # b expired, a is pinned
    cache.unpin("a")
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin("a")
    with pytest.raises(KeyError):
        cache.pin("nope")
    cache.get_or_load("c", lambda: "C")
    assert cache.keys() == ["c"]


def test_stats_as_json() -> None:
    clock = Clock()
    cache: LoadedModelCache[str] = LoadedModelCache(clock=clock)
    cache.get_or_load("a", lambda: "A", size=10)
    clock.now += 2.5
    cache.get_or_load("a", lambda: "A", size=10)
    stats = json.loads(json.dumps(cache.stats().to_dict()))
    assert stats == {"cached_models": 1, "total_hits": 1, "total_misses": 1, "hit_rate": 0.5,
                     "total_memory_bytes": 10, "oldest_entry_age_secs": 2.5, "evictions": 0,
                     "load_failures": 0}  # fmt: skip


def test_memory_pressure_evicts_an_idle_entry_before_a_load() -> None:
    pressure = [1.0]
    cache: LoadedModelCache[str] = LoadedModelCache(available_fraction=lambda: pressure[0])
    cache.get_or_load("a", lambda: "A", size=1)
    cache.get_or_load("b", lambda: "B", size=1)
    pressure[0] = 0.05
    cache.get_or_load("c", lambda: "C", size=1)
    assert cache.keys() == ["b", "c"]


def test_the_async_twin_is_single_flight_for_coroutine_loaders(flight_waiters: FlightWaiters) -> None:
    cache: LoadedModelCache[str] = LoadedModelCache()
    loads = []

    async def loader() -> str:
        loads.append(1)
        # In flight until another caller waits on it. Not all 19: callers queue for the default executor's
        # few worker threads, and the leader holds one of them.
        await flight_waiters.wait_for_async(1)
        return "engine"

    async def main() -> list[str]:
        return await asyncio.gather(*(cache.get_or_load_async("k", loader, 1) for _ in range(20)))

    assert asyncio.run(main()) == ["engine"] * 20 and len(loads) == 1 and flight_waiters.count >= 1
    assert asyncio.run(cache.get_or_load_async("j", lambda: "sync loader")) == "sync loader"


def test_bad_settings_are_refused() -> None:
    # (a size in words, or a count as a string, raised a raw TypeError from a comparison: a trial)
    for kwargs in ({"max_models": 0}, {"ttl": 0}, {"memory_budget": -1}, {"max_models": "4"},
                   {"memory_budget": "lots"}, {"memory_budget": float("nan")}, {"ttl": "1h"}):  # fmt: skip
        # (a DepotError, as every bad input's: they were bare ValueErrors, an explorer's trial)
        with pytest.raises(InvalidInputError, match=r"must be|memory_budget: cannot read"):
            LoadedModelCache(**kwargs)  # type: ignore[arg-type]
    assert LoadedModelCache(memory_budget="8GiB").memory_budget == 8 << 30
    # A share of the RAM the process may use, as the preload budget's (refused here: an explorer's trial)
    from modeldepot.memory import ram_bytes

    assert LoadedModelCache(memory_budget="25%").memory_budget == ram_bytes() // 4
    for share in ("0%", "150%", "-5%", "lots%"):
        with pytest.raises(InvalidInputError, match="share of RAM"):
            LoadedModelCache(memory_budget=share)
    assert LoadedModelCache(memory_budget=0.5 * (16 << 30)).memory_budget == 8 << 30  # (a float: bytes)


class CacheMachine(RuleBasedStateMachine):
    """Random loads, uses, pins, evictions and clock jumps: the limits hold whenever they can, every
    entry that leaves is handed to the hook exactly once, and no expired entry is ever returned."""

    BUDGET = 100

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.hooked: list[Hashable] = []
        self.cache: LoadedModelCache[tuple[str, int]] = LoadedModelCache(
            max_models=3, ttl=30, memory_budget=self.BUDGET, clock=self.clock,
            on_evict=lambda k, m: self.hooked.append(k), available_fraction=lambda: 1.0,
        )  # fmt: skip
        self.generation = 0
        self.last_loaded: Hashable | None = None

    @rule(key=st.sampled_from("abcde"), size=st.integers(0, 120))
    def get(self, key: str, size: int) -> None:
        was_fresh = self.cache.contains(key)
        self.generation += 1
        model = self.cache.get_or_load(key, lambda: (key, self.generation), size)
        assert model[0] == key
        if not was_fresh:
            assert model[1] == self.generation, "an expired or evicted entry was returned"
            self.last_loaded = key

    @rule(seconds=st.floats(0, 40))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @precondition(lambda self: len(self.cache) > 0)
    @rule(data=st.data())
    def pin_or_unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.cache.keys()))
        entry = self.cache._entries[key]
        if entry.pins and data.draw(st.booleans()):
            self.cache.unpin(key)
        else:
            self.cache.pin(key)

    @rule(key=st.sampled_from("abcde"))
    def evict(self, key: str) -> None:
        self.cache.evict(key)

    @rule()
    def evict_stale(self) -> None:
        self.cache.evict_stale()

    @invariant()
    def limits_hold_unless_pins_forbid(self) -> None:
        entries = self.cache._entries
        movable = [k for k, e in entries.items() if e.pins == 0 and k != self.last_loaded]
        if movable:  # something could still be evicted: then every limit must hold
            assert len(entries) <= self.cache.max_models
            assert sum(e.size for e in entries.values()) <= self.BUDGET

    @invariant()
    def every_departure_is_hooked_once(self) -> None:
        evictions = self.cache.stats().evictions  # (first: stats() lets what has expired go)
        assert len(self.hooked) == evictions


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


class HeldModel:
    """An engine as Depot.load makes them: weakly referable, closed by the default hook."""

    def __init__(self, key: str, generation: int) -> None:
        self.key, self.generation, self.closed = key, generation, False

    def close(self) -> None:
        self.closed = True


class DefaultHookMachine(RuleBasedStateMachine):
    """Loads under the default hook, with callers holding some engines for a while: an engine is never closed
    while held, the limits hold with the held-out engines' bytes counted, and a load evicts no more than it
    needs (the last entry it evicted, nobody's, would not have fitted beside what stayed: one load evicted
    every idle engine, a review)."""

    BUDGET, SLOTS = 100, 3

    def __init__(self) -> None:
        super().__init__()
        self.cache: LoadedModelCache[HeldModel] = LoadedModelCache(
            max_models=self.SLOTS, memory_budget=self.BUDGET, available_fraction=lambda: 1.0
        )
        self.held: list[HeldModel] = []
        self.generation = 0

    @rule(key=st.sampled_from("abcdef"), size=st.integers(1, 60), hold=st.booleans())
    def get(self, key: str, size: int, hold: bool) -> None:
        before = {k: (e.size, e.last_used) for k, e in self.cache._entries.items()}
        self.generation += 1
        model = self.cache.get_or_load(key, lambda: HeldModel(key, self.generation), size)
        assert model.key == key and not model.closed
        if hold:
            self.held.append(model)
        entries = self.cache._entries
        gone = [k for k in before if k not in entries and k != key]
        held_keys = {m.key for m in self.held}
        if not gone or size > self.BUDGET:
            return
        youngest = max(gone, key=lambda k: before[k][1])  # (evicted last: least recent first)
        if youngest in held_keys:
            return  # (held: its bytes are still taken, as if it stayed)
        with self.cache._lock:
            taken = self.cache._total_locked() + self.cache._held_out_locked()
        assert len(entries) + 1 > self.SLOTS or taken + before[youngest][0] > self.BUDGET, (
            f"{youngest} was evicted though it fitted beside {sorted(entries)}"
        )

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))

    @rule(key=st.sampled_from("abcdef"))
    def evict(self, key: str) -> None:
        self.cache.evict(key)

    @invariant()
    def nothing_held_is_closed(self) -> None:
        assert not any(model.closed for model in self.held)

    @invariant()
    def limits_hold_with_the_held_out_counted(self) -> None:
        with self.cache._lock:
            entries = self.cache._entries
            taken = self.cache._total_locked() + self.cache._held_out_locked()
        movable = [k for k, e in entries.items() if e.pins == 0]
        if len(movable) > 1:  # (one alone may be over the budget: kept with a warning)
            assert len(entries) <= self.SLOTS and taken <= self.BUDGET


TestDefaultHookMachine = DefaultHookMachine.TestCase
TestDefaultHookMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_a_key_evicted_while_it_loads_is_handed_over_but_not_cached() -> None:
    """A repo removed while one of its engines was loading: the load finished into the cache, holding the
    removed files' mappings (and their disk space) until evicted by chance."""
    cache: LoadedModelCache[Engine] = LoadedModelCache(max_models=4)
    started, go = threading.Event(), threading.Event()

    def loader() -> Engine:
        started.set()
        go.wait(10)
        return Engine("a")

    got: list[Engine] = []
    caller = threading.Thread(target=lambda: got.append(cache.get_or_load("a", loader, size=1)))
    caller.start()
    assert started.wait(10)
    assert cache.loading() == ["a"]
    assert cache.evict("a") is False  # (not cached yet)
    go.set()
    caller.join(10)
    assert [e.name for e in got] == ["a"] and cache.keys() == [] and cache.loading() == []


def _in_a_thread(run: Callable[[], Any], timeout: float = 30) -> Any:
    """``run()`` on a daemon thread, its result; a hang fails the test rather than the session."""
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(run()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s: a hang"
    return outcome[0]


def test_async_loads_that_run_their_blocking_part_on_the_default_executor_never_wait_for_good() -> None:
    """A coroutine loader that builds its engine with asyncio.to_thread, the natural way: with as many calls at
    once as the loop's default executor has threads (six on two cores), each call held one of them while it
    waited, the loader's to_thread could never start, and every call waited for good (an explorer's trial)."""
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=16)
    calls = (os.cpu_count() or 1) + 8  # (more than the default executor's min(32, cpus + 4) threads)

    def build(key: str) -> str:
        time.sleep(0.05)
        return key.upper()

    async def many() -> list[str]:
        def loader_of(key: str) -> Callable[[], Any]:
            async def load() -> str:
                return await asyncio.to_thread(build, key)

            return load

        one_model = [cache.get_or_load_async("same", loader_of("same")) for _ in range(calls)]
        models = [cache.get_or_load_async(f"m{n}", loader_of(f"m{n}")) for n in range(calls)]
        return list(await asyncio.gather(*one_model, *models))

    served = _in_a_thread(lambda: asyncio.run(many()))
    assert served == ["SAME"] * calls + [f"M{n}" for n in range(calls)]
    assert cache.stats().total_misses == calls + 1


def test_a_coroutine_given_as_an_engine_is_refused_or_awaited_never_cached() -> None:
    """get_or_load(key, async_fn) cached the unawaited coroutine as the engine; get_or_load_async did so of a
    lambda that gives one (an explorer's trial)."""
    cache: LoadedModelCache[str] = LoadedModelCache()

    async def build() -> str:
        return "engine"

    with pytest.raises(TypeError, match="get_or_load_async"):
        cache.get_or_load("k", build)  # type: ignore[arg-type]
    assert not cache.contains("k") and cache.loading() == []
    assert cache.get_or_load("k", lambda: "plain") == "plain"

    async def both() -> tuple[str, str]:
        return (await cache.get_or_load_async("k2", lambda: build()),
                await cache.get_or_load_async("k3", build))  # fmt: skip

    assert _in_a_thread(lambda: asyncio.run(both())) == ("engine", "engine")


def test_a_load_whose_wait_for_room_fails_leaves_no_flight_behind(caplog: pytest.LogCaptureFixture) -> None:
    """A failure while a load made room (Ctrl-C in its wait for room, here the memory-pressure probe failing)
    left its load under way for good: every later load of that key waited on it for ever (an explorer's
    trial). The caller gets the error; a waiter that joined it and later callers load the key themselves."""
    failing = threading.Event()

    def available() -> float:
        if failing.is_set():
            failing.clear()
            raise RuntimeError("interrupted while it made room")
        return 1.0

    cache: LoadedModelCache[str] = LoadedModelCache(max_models=4, available_fraction=available)
    cache.get_or_load("a", lambda: "A")
    failing.set()
    with pytest.raises(RuntimeError, match="interrupted"):
        cache.get_or_load("b", lambda: "B")
    assert cache.loading() == []
    assert _in_a_thread(lambda: cache.get_or_load("b", lambda: "B"), timeout=10) == "B"
    # A caller interrupted in its wait for room (a slot held by a load under way), with a waiter behind it
    slots: LoadedModelCache[str] = LoadedModelCache(max_models=1)
    release = threading.Event()
    threading.Thread(
        target=lambda: slots.get_or_load("slow", lambda: (release.wait(10), "S")[1]), daemon=True
    ).start()
    wait_until(lambda: slots.loading() == ["slow"], timeout=10)

    def interrupted() -> None:
        with pytest.raises(KeyboardInterrupt):
            slots.get_or_load("next", lambda: "N")

    def interrupt_once_waiting() -> None:
        wait_until(lambda: "next" in slots.loading(), timeout=10)
        time.sleep(0.2)
        signal.pthread_kill(
            threading.main_thread().ident or 0, signal.SIGINT
        )  # (its wait wakes, as at Ctrl-C)

    first = threading.Thread(target=interrupt_once_waiting, daemon=True)
    first.start()
    interrupted()  # (the main thread: where Python delivers SIGINT)
    first.join(10)
    assert slots.loading() == ["slow"]
    waiter = threading.Thread(target=lambda: slots.get_or_load("next", lambda: "N"), daemon=True)
    waiter.start()
    release.set()
    waiter.join(10)
    assert not waiter.is_alive() and slots.keys() == ["next"]


def test_a_size_is_bytes_or_a_size_like_the_budget_and_nothing_else() -> None:
    """size="500MiB" (as memory_budget is written) was a TypeError from inside, and that key loaded never
    again; a negative size cancelled real entries out (-850 bytes in all under a budget of 100)."""
    cache: LoadedModelCache[str] = LoadedModelCache(memory_budget="1GiB")
    assert cache.get_or_load("m", lambda: "M", size="500MiB") == "M"
    assert cache.stats().total_memory_bytes == 500 << 20
    for bad in (-1, "lots", True, float("nan"), "-5MiB"):
        with pytest.raises(ValueError, match="size"):
            cache.get_or_load(f"bad-{bad}", lambda: "X", size=bad)  # type: ignore[arg-type]
    assert cache.loading() == [] and cache.keys() == ["m"]


def test_a_load_that_still_grows_the_process_is_waited_for_past_the_bound() -> None:
    """The bound on a wait for room could not tell a stuck loader from a big model read slowly (40 GB from a
    network disk for minutes): the next big model loaded beside it, the out-of-memory the budget exists to
    prevent (a review). A load under way that grows the process is waited for; one that neither ends nor grows
    it (the pool-thread companion above) is not."""
    growing = threading.Event()
    started = time.monotonic()

    def rss() -> int:  # (the process grows 1 GB a second while the big load reads its weights)
        return int((time.monotonic() - started) * 1e9) if growing.is_set() else 0

    cache: LoadedModelCache[str] = LoadedModelCache(max_models=1, room_wait=0.3, rss=rss)
    running, peak, lock = [0], [0], threading.Lock()

    def load(key: str, seconds: float) -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        growing.set()
        time.sleep(seconds)
        with lock:
            running[0] -= 1
        return key

    big = threading.Thread(target=cache.get_or_load, args=("big", lambda: load("big", 1.5)))
    big.start()
    wait_until(lambda: cache.loading() == ["big"], timeout=10)
    assert cache.get_or_load("next", lambda: load("next", 0.0)) == "next"
    big.join(10)
    assert peak[0] == 1, "the next model loaded beside one still being read"
    with pytest.raises(ValueError, match="room_wait"):
        LoadedModelCache(room_wait=-1)
    assert LoadedModelCache(room_wait=None).room_wait is None


def test_the_waiters_of_a_coroutine_load_cancelled_at_its_loops_end_load_the_key_themselves() -> None:
    """A coroutine loader's task cancelled (its caller timed out and asyncio.run ended) surfaced as
    concurrent.futures.CancelledError, an Exception: a caller waiting on another thread raised it rather
    than load the key (a review)."""
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=2)
    began = threading.Event()

    async def slow() -> str:
        began.set()
        await asyncio.sleep(5)
        return "model"

    async def leader() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(cache.get_or_load_async("k", slow), 0.3)

    got: list[object] = []

    def waiter() -> None:
        began.wait(10)
        try:
            got.append(cache.get_or_load("k", lambda: "from-waiter"))
        except BaseException as error:  # (what it raised is what the test looks at)
            got.append(error)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    asyncio.run(leader())
    thread.join(20)
    assert got == ["from-waiter"], got


def test_an_interruption_as_the_engines_a_load_evicted_close_leaves_no_load_behind() -> None:
    """Ctrl-C after the load was given its room and before its loader ran (as the engines it evicted closed):
    its load stayed under way for good, the key never loaded again and its room stayed taken (a review)."""

    def closing(key: Hashable, model: object) -> None:
        raise KeyboardInterrupt  # (as a signal delivered while the hook runs would)

    cache: LoadedModelCache[str] = LoadedModelCache(max_models=1, on_evict=closing, room_wait=5)
    cache.get_or_load("a", lambda: "A")
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_load("b", lambda: "B")
    assert cache.loading() == []
    assert _in_a_thread(lambda: cache.get_or_load("b", lambda: "B"), timeout=10) == "B"


def test_an_async_loader_that_raises_stopiteration_is_an_error_not_a_wait_for_ever() -> None:
    cache: LoadedModelCache[str] = LoadedModelCache()

    def empty() -> str:
        return next(iter([]))

    async def load() -> str:
        try:
            return await cache.get_or_load_async("k", empty)
        except RuntimeError as error:
            return str(error)

    assert "StopIteration" in _in_a_thread(lambda: asyncio.run(load()), timeout=10)


def test_a_loader_that_asks_for_its_own_key_fails_rather_than_waiting_for_good() -> None:
    """A loader that asked the cache for the key it was loading waited for its own end, for good (an
    explorer's trial: a server worker silent, no error to find). It is a RuntimeError now, and the key loads
    afterwards."""
    cache: LoadedModelCache[str] = LoadedModelCache()

    def recursive() -> str:
        return cache.get_or_load("self", recursive)

    result: list[BaseException] = []
    worker = threading.Thread(
        target=lambda: _record_error(result, lambda: cache.get_or_load("self", recursive)), daemon=True
    )
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the load waited for its own end"
    assert isinstance(result[0], RuntimeError) and "asked the cache for 'self' itself" in str(result[0])

    assert cache.get_or_load("self", lambda: "engine") == "engine"
    assert cache.stats().cached_models == 1
    # A companion the loader starts in its context and does not wait for waits for the load, as ever (a
    # review: the first check refused every code the loader's context went to)
    companions: list[Any] = []

    def starts_a_warmup() -> str:
        thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(
                _record_error,
                companions,
                lambda: companions.append(cache.get_or_load("warm", lambda: "2nd")),
            ),
        )
        thread.start()
        companions.append(thread)
        time.sleep(0.2)
        return "first"

    assert cache.get_or_load("warm", starts_a_warmup) == "first"
    companions[0].join(10)
    assert companions[1:] == ["first"]


def _record_error(errors: list[BaseException], call: Callable[[], Any]) -> None:
    try:
        call()
    except BaseException as error:
        errors.append(error)


def test_a_closed_depots_engines_are_refused_not_made_again_empty(tmp_path: Path) -> None:
    """After close(), `depot.engines` made a new, empty cache: a use after close went unseen, where every other
    method refuses (an explorer's trial)."""
    from modeldepot import Depot, StoreClosedError

    depot = Depot(tmp_path / "store")
    assert depot.engines.keys() == []
    depot.close()
    with pytest.raises(StoreClosedError, match="was closed"):
        depot.engines.stats()


def test_a_depot_refuses_what_is_no_engine_cache_or_home_when_made(tmp_path: Path) -> None:
    """`Depot(engine_cache={})` failed with an AttributeError at the first load, `Depot(5)` with a TypeError
    from pathlib (an explorer's trial): a ConfigError when the depot is made."""
    from modeldepot import Depot
    from modeldepot.errors import ConfigError

    with pytest.raises(ConfigError, match="engine_cache must be a LoadedModelCache"):
        Depot(tmp_path / "store", engine_cache={})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="home must be a folder's path"):
        Depot(5)  # type: ignore[arg-type]
    assert not (tmp_path / "store").exists()
