"""The RAM tier: models preloaded under a byte budget, so a worker's start reads memory, not disk.

Strategies (what "preloaded" means):

- ``page-cache`` (default): every page of the model's blobs is made resident in the kernel's page cache
  (``MADV_POPULATE_READ``) and kept mapped. One copy in RAM, shared with every process that maps or opens
  the same files (a worker that loads from the snapshot path finds it there). Residency is measured
  (``cachestat``, ``mincore``, or the copy's own mapping for another user's blobs: :mod:`.residency`):
  the budget counts what is really in RAM.
- ``mmap``: the same, populated when mapped (``MAP_POPULATE``).
- ``read``: a private buffer per file (this process only; doubles RAM if others also map the file).
- ``memfd``: a RAM-only file per blob, reachable by path (``/proc/self/fd/N``) for loaders that want a path.

``get`` returns a handle (memoryviews and paths per file) that holds the model: eviction never pulls
memory from under a holder; an entry evicted while held goes when the last holder lets go. Eviction is
LRU under the budget; pinned models stay. Evicting in the page-cache modes also drops the pages
(``POSIX_FADV_DONTNEED``), so the budget means RAM, not just mappings.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import mmap
import operator
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

from modeldepot.config import parse_share, parse_size
from modeldepot.errors import (
    ConfigError,
    CorruptBlobError,
    DepotError,
    InvalidInputError,
    MemoryShortError,
    NotFoundError,
    VariantNotFoundError,
)
from modeldepot.hub.manifest import scan_lists
from modeldepot.hub.variants import group_files
from modeldepot.memory import available_bytes, ram_bytes
from modeldepot.preload.copies import STRATEGIES, FileCopy
from modeldepot.preload.residency import MlockError, lock, resident_bytes, unlock
from modeldepot.store.access import ModelAccess
from modeldepot.store.forking import ForkSafeExecutor, start_over_after_fork
from modeldepot.store.layout import size_text
from modeldepot.store.models import FileEntry
from modeldepot.store.store import Store
from modeldepot.tiers import Tiers
from modeldepot.validation import is_commit_id, validate_quant

__all__ = [
    "STRATEGIES",
    "PreloadHandle",
    "PreloadInfo",
    "PreloadStats",
    "Preloader",
    "parse_budget",
    "resident_in_ram",
]

log = logging.getLogger(__name__)

ModelKey = tuple[str, str, str]  # repo, commit, variant ('' = every file)
RESIDENCY_FRESH = 1.0  # seconds a measure of what is in RAM answers stats (the models unchanged)
RECHECK_SECONDS = 10.0  # a holder's release measures the tier against its budget at least this often


CLOSED = "the preloader is closed (its depot was closed): open the depot again"


def _said_if_failed(done: Future[list[PreloadInfo]]) -> None:
    if not done.cancelled() and (error := done.exception()) is not None:
        log.warning("the preload of the most used models failed: %s: %s", type(error).__name__, error)


def _check_model_count(top_n: object) -> None:
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:  # (-1 preloaded nothing, silently)
        raise InvalidInputError(f"auto_preload takes a number of models, 0 or more, not {top_n!r}")


def parse_budget(budget: int | str) -> int:
    """Bytes from ``"50%"`` (of the RAM this process may use: the machine's, or its container's limit when
    lower), ``"8GiB"`` or a number."""
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise ConfigError(f"a preload budget is a number of bytes or a text like 8GiB or 50%, not {budget!r}")
    if isinstance(budget, int):
        value = budget
    elif budget.strip().endswith("%"):
        try:
            share = parse_share(budget)
        except ValueError:
            raise ConfigError(f"cannot read the preload budget {budget!r} (--preload-budget, "
                              "MODELDEPOT_PRELOAD_BUDGET): write it like 50% or 8GiB") from None  # fmt: skip
        if not 0 < share <= 100:
            raise ConfigError(f"the preload budget {budget!r} (--preload-budget, MODELDEPOT_PRELOAD_BUDGET) must "
                              "be a share between 0% and 100% of RAM")  # fmt: skip
        value = int(_ram() * share / 100)
    else:
        try:
            value = parse_size(budget)
        except ConfigError as error:
            raise ConfigError(
                f"the preload budget (--preload-budget, MODELDEPOT_PRELOAD_BUDGET): {error}"
            ) from None
    if value <= 0:
        raise ConfigError(f"the preload budget {budget!r} (--preload-budget, MODELDEPOT_PRELOAD_BUDGET) must be "
                          "more than 0 bytes")  # fmt: skip
    if isinstance(budget, str) and budget.strip().isdigit() and value < 1 << 20:
        # (a unit left out, as the disk budget refuses it: `--preload-budget 50` was 50 bytes, and every
        # preload was refused, an explorer's trial; an int is the API's bytes)
        raise ConfigError(f"the preload budget {budget.strip()!r} (--preload-budget, MODELDEPOT_PRELOAD_BUDGET) is "
                          f"{value} bytes, which holds no model: give a unit (like {budget.strip()}GiB) or a "
                          "share of RAM (like 50%)")  # fmt: skip
    if value > (ram := _ram()):  # ("150%" was refused, 2**80 bytes taken: a budget that never evicts)
        raise ConfigError(f"the preload budget {budget!r} (--preload-budget, MODELDEPOT_PRELOAD_BUDGET) is more "
                          f"than the RAM this process may use ({ram / (1 << 30):.1f} GiB: the machine's, or its "
                          "container's limit): give 100% at most")  # fmt: skip
    return value


def headroom() -> int:
    """Memory a tier of private copies leaves free for the rest of its process (its engines, its requests):
    a twentieth of what the process may use, between 64 MiB and 1 GiB (a twentieth of a large host's RAM
    refused preloads on a busy one, a review)."""
    return max(64 << 20, min(1 << 30, ram_bytes() // 20))


def _memory_short(repo_id: str, incoming: int, free: int, room: int) -> MemoryShortError:
    return MemoryShortError(
        f"preloading {repo_id} ({size_text(incoming)}) would leave this process {max(0, free - incoming)} bytes "
        f"of memory, where it keeps {room} free (a twentieth of its limit, {size_text(ram_bytes())}: the "
        "machine's or its container's), and the models preloaded that may make way give back too little: lower "
        "the preload budget, or use the page-cache strategy, whose pages the kernel takes back rather than kill "
        "the process",
        repo_id=repo_id,
    )


def _nothing() -> None:
    pass


def _ram() -> int:
    """Bytes of RAM this process may use: the machine's, or its container's (control group's) limit."""
    return ram_bytes()


@dataclass
class _Model:
    key: ModelKey
    files: dict[str, FileCopy]
    size: int
    seconds: float
    loaded_at: float
    last_used: float
    locked: bool = False
    lock_error: str | None = None
    holders: int = 0
    pinned: bool = False
    evicted: bool = False  # out of the cache; freed when the last holder lets go


@dataclass(frozen=True)
class PreloadInfo:
    repo_id: str
    commit_id: str
    variant: str
    files: int
    bytes: int
    resident_bytes: int
    seconds: float
    strategy: str
    locked: bool
    lock_error: str | None
    already: bool  # it was preloaded before this call (always true in stats: the server's listings omit it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PreloadStats:
    strategy: str
    budget_bytes: int
    models: int
    ram_bytes: int  # resident now (measured in the page-cache modes)
    hits: int
    misses: int
    hit_rate: float | None  # None before the first lookup
    evictions: int
    avg_load_seconds_preloaded: float | None
    avg_load_seconds_cold: float | None
    preloaded: tuple[PreloadInfo, ...] = field(default=())
    most_accessed: tuple[ModelAccess, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _release_dropped(preloader: Preloader, model: _Model) -> None:
    # Only noted: the collector runs this in whatever code allocates, the preloader's own loops over its models
    # under its (re-entrant) lock among them; a release there changed the models under them (a review). The
    # preloader's next call lets go of it, outside its lock.
    preloader._dropped.append(model)
    warnings.warn(f"a preload handle of {model.key[0]}@{model.key[1][:12]} was dropped without release(): use "
                  "it in a with block", ResourceWarning, stacklevel=1)  # fmt: skip


class PreloadHandle:
    """A preloaded model, held: ``views`` (memoryview per path) stay valid until :meth:`release` (or the end
    of a ``with`` block), whatever happens to the store meanwhile. ``paths`` (a real path per file, for
    loaders that open files by name) name the revision's files in the store: no eviction takes a held
    model's, but an ``rm`` of the revision does (``memfd`` copies' paths are this process's own, and stay)."""

    def __init__(self, preloader: Preloader, model: _Model) -> None:
        self._preloader = preloader
        self._model: _Model | None = model
        self.repo_id, self.commit_id, self.variant = model.key
        self.views = {path: copy.view() for path, copy in model.files.items()}
        self.paths = {path: copy.path for path, copy in model.files.items()}
        # A handle dropped unreleased (a request that failed between get() and release()) let go of its hold
        # never: its model stayed over the RAM budget and kept its revision from the disk budget, for good
        # (an explorer's trial). The collector lets go of it, with a warning, as of an unclosed file.
        self._finalizer = weakref.finalize(self, _release_dropped, preloader, model)
        self._finalizer.atexit = False

    def release(self) -> None:
        if self._model is None:
            return
        self._finalizer.detach()
        for view in self.views.values():
            view.release()
        self.views = {}
        model, self._model = self._model, None
        self._preloader._release(model)

    def __enter__(self) -> PreloadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Preloader:
    """Models in RAM under ``budget`` (bytes, ``"8GiB"`` or ``"50%"`` of RAM). Thread-safe.

    ``source`` is a :class:`~modeldepot.Depot` or its :class:`Store`.
    """

    def __init__(
        self, source: Any, budget: int | str = "50%", strategy: str = "page-cache", mlock: bool = False
    ) -> None:
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise ConfigError(f"unknown preload strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        if not isinstance(mlock, bool):
            raise ConfigError(f"mlock is True or False, not {mlock!r}")
        store = source if isinstance(source, Store) else getattr(source, "store", None)
        if not isinstance(store, Store):  # (None, a path: an AttributeError from deep inside, a trial)
            raise TypeError(f"a Preloader reads a Depot or its Store, not {source!r}: open one with "
                            "modeldepot.Depot(home)")  # fmt: skip
        self.store: Store = store
        # A depot's shared stores (tiers.py) are read too: their models are preloaded from where they are
        self._tiers: Tiers | None = None if isinstance(source, Store) else getattr(source, "tiers", None)
        self.budget = parse_budget(budget)
        self.strategy = strategy
        self.mlock = mlock
        self._lock = threading.RLock()
        self._models: dict[ModelKey, _Model] = {}  # insertion order = least recently used first
        self._loading: dict[ModelKey, threading.Event] = {}
        self._forgotten: set[ModelKey] = set()  # loading when :meth:`forget` named their revision
        # The branch each model was asked by (a commit id asked: none), and those being moved to its new commit
        self._branches: dict[ModelKey, str] = {}
        self._by_commit: set[ModelKey] = set()  # asked by a commit id too: such a model stays where it is
        # A model moving to its branch's new commit -> (the branch, that commit)
        self._following: dict[ModelKey, tuple[str, str]] = {}
        # ... unloaded by :meth:`evict` meanwhile (the new one goes as it lands, unless asked for again since)
        self._unfollowed: set[ModelKey] = set()
        # The commit a follow failed to bring in: not tried again
        self._follow_failed: dict[ModelKey, str] = {}
        self._loading_paths: dict[ModelKey, frozenset[str]] = {}  # the files each load in progress reads
        self._loading_bytes: dict[ModelKey, int] = {}  # the room each load in progress made for itself
        self._hits = self._misses = self._evictions = 0
        # (loads, their seconds in all) by whether the model was preloaded: a list of every load's time grew for
        # the life of a serving process, an explorer's trial
        self._load_times: dict[bool, tuple[int, float]] = {True: (0, 0.0), False: (0, 0.0)}
        self._pool = ForkSafeExecutor(max_workers=1, thread_name_prefix="preload")
        # Whether the budget gave way to a holder or a pin (everything left held): a release then measures
        # again. Every release of every load measured the whole tier (0.1 s a GiB) under the lock.
        self._gave_way = False
        self._room_made_at = time.monotonic()  # when the tier was last measured against its budget
        # The last measure for stats: when, of which models, each one's bytes in RAM, and the tier's
        self._measured: tuple[float, tuple[_Model, ...], dict[ModelKey, int], int] | None = None
        # Closed: what it loads is freed, not kept (a Depot closed while a preload ran held its memfd copy,
        # 100 MiB of RAM, for the life of the process: a trial)
        self._closed = threading.Event()
        # The models auto_preload skipped as corrupt (repo, quant): preloaded once repaired
        self._skipped_corrupt: list[tuple[str, str | None]] = []
        # (the models of handles collected unreleased, let go of at the next call: _release_dropped)
        self._dropped: collections.deque[_Model] = collections.deque()
        # A depot's: what it holds counts as in use there, and what another process removed goes at the next
        # use after a few seconds (a worker that only preloads and reads kept a removed model mapped, its disk
        # space taken and its budget spent, for good: a trial). (So does one built on a depot's store; one on a
        # store opened alone has no depot to tell.)
        held = source.held_models if isinstance(source, Store) else getattr(source, "_held", None)
        self._look_for_removed: Callable[[], None] = held.look_now_and_then if held is not None else _nothing
        if held is not None:
            held.add_preloader(self)
        start_over_after_fork(self)

    def after_fork(self) -> None:
        """In a forked child: the loads the parent's other threads had under way never end here (a preload of
        one of them waited for ever), and one of them may have held the lock."""
        self._lock = threading.RLock()
        for loading in (self._loading, self._loading_paths, self._loading_bytes):
            loading.clear()
        self._forgotten.clear()

    # -- which files ------------------------------------------------------------------------------------

    def _resolve(
        self, repo_id: str, quant: str | None, revision: str
    ) -> tuple[ModelKey, list[FileEntry], Store]:
        """The model's key, its files, and the store that answers its revision (the depot's own, or a shared
        one: tiers.py)."""
        if quant is not None:
            validate_quant(quant)  # (a number was an AttributeError from the variants' grouping)
        if self._tiers is not None and self._tiers.shared:
            store, commit_id, entries = self._tiers.files(repo_id, revision)
            repo_id = store.spelled(repo_id)
        else:
            store = self.store
            repo_id = self.store.spelled(repo_id)  # (any case: the Hub's repo ids ignore it)
            commit_id = self.store.resolve(repo_id, revision)
            entries = self.store.revision_files(repo_id, commit_id)
        entries, key = self._variant(store, repo_id, commit_id, entries, quant)
        return key, entries, store

    def _holders(self, key: ModelKey, entries: list[FileEntry], answering: Store) -> dict[str, Store]:
        """The store each file is read from (a commit split across stores: each file's own); a file no store
        gives good is left to the answering one, which says why as it would alone."""
        if self._tiers is None or not self._tiers.shared:
            return {}
        holders: dict[str, Store] = {}
        for entry in entries:
            try:
                holders[entry.path] = self._tiers.entry(key[0], entry.path, key[1])[0]
            except (NotFoundError, CorruptBlobError):
                holders[entry.path] = answering
        return holders

    @staticmethod
    def _variant(
        store: Store, repo_id: str, commit_id: str, entries: list[FileEntry], quant: str | None
    ) -> tuple[list[FileEntry], ModelKey]:
        if quant is None:
            return entries, (repo_id, commit_id, "")
        grouping = group_files(e.path for e in entries)
        variant = grouping.find(quant)
        if variant is None:
            # (it said "has no variant" of one the scan lists; pin did not)
            if scan_lists(store, repo_id, quant):
                raise NotFoundError(f"{repo_id}@{commit_id[:12]} holds no file of {quant!r} (it holds: "
                                    f"{grouping.names()}): pull it first", repo_id=repo_id)  # fmt: skip
            raise VariantNotFoundError(
                f"{repo_id}@{commit_id[:12]} has no variant {quant!r} (it has: {grouping.names()})",
                repo_id=repo_id,
            )
        wanted = {*variant.files, *grouping.shared}
        return [e for e in entries if e.path in wanted], (repo_id, commit_id, variant.name)

    # -- preloading -------------------------------------------------------------------------------------

    def preload(self, repo_id: str, quant: str | None = None, revision: str = "main") -> PreloadInfo:
        """Bring a model (a variant and the shared files, or the whole revision) into RAM, evicting the
        least recently used models as the budget needs. Concurrent calls for one model load it once."""
        return self._preload(repo_id, quant, revision, asked=True)

    def _preload(self, repo_id: str, quant: str | None, revision: str, asked: bool) -> PreloadInfo:
        self._look_for_removed()
        self._let_go_of_dropped()
        # Held while it is measured: an eviction by another thread closed its files under the measure
        # (a raw EBADF from a preload that had succeeded: a trial)
        model, already = self._obtain(repo_id, quant, revision, hold=True, asked=asked)
        try:
            return self._info(model, already)
        finally:
            self._release(model, budget_again=False)  # (not to evict the model it just loaded)

    def _obtain(
        self, repo_id: str, quant: str | None, revision: str, hold: bool, asked: bool = True
    ) -> tuple[_Model, bool]:
        """The model in RAM (loaded now if needed) and whether it was there; with ``hold``, a holder is
        counted before the lock is let go, so no eviction can come between. ``asked``: by a caller, not a
        follow: a follow unloaded meanwhile keeps what it lands for this ask (it took a model a preload after
        the unload had said was in RAM: a review)."""
        key, entries, answering = self._resolve(repo_id, quant, revision)
        if asked:
            with self._lock:
                self._unfollowed.difference_update(
                    old for old, (branch, commit_id) in self._following.items()
                    if old[0] == key[0] and old[2] == key[2] and key[1] == commit_id
                )  # fmt: skip
        holders = self._holders(key, entries, answering)
        size = self._footprint(entries)
        if size > self.budget:
            raise InvalidInputError(
                f"{repo_id} ({size_text(size)}) is larger than the preload budget ({size_text(self.budget)})"
            )
        # A use for the disk budget's recency, not one for popularity (auto_preload's own picks would count);
        # a shared store's model is not the own store's to count
        if all(holders.get(e.path, self.store) is self.store for e in entries):
            self.store.access.record(key[0], key[2], count=0, commit_id=key[1])
        while True:
            with self._lock:
                if self._closed.is_set():
                    raise DepotError(CLOSED)
                if is_commit_id(revision):
                    self._by_commit.add(key)
                else:
                    self._branches[key] = revision
                model = self._models.get(key)
                if model is not None:
                    self._touch(model)
                    model.holders += hold
                    return model, True
                waiting = self._loading.get(key)
                if waiting is None:
                    # Loads in flight count: two preloads at once each saw only what was loaded, both went
                    # over the budget, and the first was evicted as the second ended (a trial). One that
                    # fits once those end waits for one of them, then looks again; one that would not fit
                    # beside what is held or pinned anyway goes on, the budget giving way as ever (waiting
                    # made every preload wait for the others then: a review).
                    incoming = self._new_bytes(entries)
                    self._make_room(incoming)
                    self._make_headroom(repo_id, incoming)
                    if self._gave_way and self._loading and self._resident_total() + incoming <= self.budget:
                        waiting = next(iter(self._loading.values()))
                    else:
                        self._loading[key] = threading.Event()
                        self._loading_paths[key] = frozenset(e.path for e in entries)
                        self._loading_bytes[key] = incoming
                        break
            waiting.wait()
        try:
            model = self._load(key, entries, size, holders)
        except BaseException:
            with self._lock:
                self._loading.pop(key).set()
                self._loading_paths.pop(key, None)
                self._loading_bytes.pop(key, None)
                self._forgotten.discard(key)
                if key not in self._models:  # (asked, never loaded: nothing to follow)
                    self._branches.pop(key, None)
                    self._by_commit.discard(key)
            raise
        with self._lock:
            self._loading.pop(key).set()
            self._loading_paths.pop(key, None)
            self._loading_bytes.pop(key, None)
            forgotten = key in self._forgotten
            self._forgotten.discard(key)
            if (
                self._closed.is_set()
            ):  # (closed while it loaded: a copy kept in a closed tier was held for good)
                self._free(model, drop_cache=False)
                raise DepotError("the preloader was closed while this model was being preloaded")
            if not forgotten:
                self._models[key] = model
                model.holders += hold
                self._make_room(0, keep=key)  # bigger than expected (or a race): the others make way
                return model, False
        self._free(model, drop_cache=False)  # (its files are gone: nothing to drop)
        raise NotFoundError(f"{key[0]}@{key[1][:12]} was removed from the store while it was being preloaded")

    def _load(self, key: ModelKey, entries: list[FileEntry], size: int, holders: dict[str, Store]) -> _Model:
        started = time.perf_counter()
        files: dict[str, FileCopy] = {}
        try:
            for entry in entries:
                files[entry.path] = FileCopy(holders.get(entry.path, self.store), entry, self.strategy)
        except BaseException:
            for copy in files.values():
                copy.close(drop_cache=False)
            raise
        now = time.monotonic()
        model = _Model(key, files, size, time.perf_counter() - started, now, now)
        if self.mlock:
            self._lock_pages(model)
        log.info("preloaded %s (%s, %d bytes) in %.2f s", key[0], key[2] or "all files", size, model.seconds)
        return model

    def _lock_pages(self, model: _Model) -> None:
        locked: list[tuple[mmap.mmap | bytearray, int]] = []
        try:
            for copy in model.files.values():
                held = copy.mapping if copy.mapping is not None else copy.buffer  # (`read`'s is a buffer:
                if held is not None:  # left unlocked, it was said locked, a trial)
                    lock(held, copy.size)
                    locked.append((held, copy.size))
            model.locked = True
        except MlockError as error:
            # All or nothing: the files locked before the one refused stayed locked, the model said unlocked
            # and its pages taken from the memlock limit until it left (an explorer's trial)
            for held, size in locked:
                unlock(held, size)
            model.lock_error = str(error)
            log.warning("%s stays preloaded but unpinned: %s", model.key[0], error)

    async def preload_async(
        self, repo_id: str, quant: str | None = None, revision: str = "main"
    ) -> PreloadInfo:
        """:meth:`preload` on a worker thread: the event loop keeps running."""
        return await asyncio.to_thread(self.preload, repo_id, quant, revision)

    def auto_preload_in_background(self, top_n: int) -> Future[list[PreloadInfo]]:
        """Start :meth:`auto_preload` on the preloader's own thread; returns at once."""
        _check_model_count(top_n)  # (said here, not in the future)
        if self._closed.is_set():
            raise DepotError(CLOSED)
        try:
            started = self._pool.submit(self.auto_preload, top_n)
        except RuntimeError:  # (the executor's own, raw, when closed meanwhile: every other call says this)
            raise DepotError(CLOSED) from None
        # (nobody looks at the future: its error was lost, a trial)
        started.add_done_callback(_said_if_failed)
        return started

    def preload_again_after_repair(self) -> None:
        """Preload, in the background, the models :meth:`auto_preload` skipped as corrupt: repaired now
        (``serve --repair``), each goes in as it would have (after a power loss, the most used model stayed
        out of RAM until the next restart: an explorer's trial). Those alone: the whole top again undid
        what the operator had preloaded or unloaded since (review 41). One still corrupt is skipped again."""
        with self._lock:
            skipped, self._skipped_corrupt = self._skipped_corrupt, []
        if skipped and not self._closed.is_set():
            with contextlib.suppress(DepotError, RuntimeError):  # (RuntimeError: the pool, closed meanwhile)
                self._pool.submit(self._preload_skipped, skipped).add_done_callback(_said_if_failed)

    def _preload_skipped(self, skipped: list[tuple[str, str | None]]) -> list[PreloadInfo]:
        done = []
        for repo_id, quant in skipped:
            try:
                done.append(self.preload(repo_id, quant))
            except (NotFoundError, InvalidInputError) as error:
                log.info("not preloading %s: %s", repo_id, error)
            except CorruptBlobError as error:
                with self._lock:
                    self._skipped_corrupt.append((repo_id, quant))
                log.warning("not preloading %s%s now: %s", repo_id, f" ({quant})" if quant else "", error)
        return done

    def auto_preload(self, top_n: int) -> list[PreloadInfo]:
        """Preload the ``top_n`` most used models (by recorded accesses) that fit the budget together, the
        most used first; models no longer in the store, and those that do not fit beside the more used ones,
        are skipped. (Preloaded in turn, most used first, each evicted the least recently preloaded: with
        room for two of three, the most used went, a trial.) Returns them, most used first."""
        _check_model_count(top_n)
        chosen: list[tuple[str, str | None]] = []
        room = self.budget
        for access in self.store.access.top(top_n * 4 + 20, in_store=True):
            if len(chosen) >= top_n:
                break
            quant = access.variant or None
            try:
                _, entries, _ = self._resolve(access.repo_id, quant, "main")
            except NotFoundError as error:  # (a variant removed, a repo without main)
                log.info("not preloading %s: %s", access.repo_id, error)
                continue
            size = self._footprint(entries)
            if size > room:
                log.info("not preloading %s (%s): %d bytes do not fit in the preload budget beside the %d more "
                         "used models", access.repo_id, quant or "all files", size, len(chosen))  # fmt: skip
                continue
            room -= size
            chosen.append((access.repo_id, quant))
        done: list[PreloadInfo] = []
        for repo_id, quant in reversed(chosen):  # (the least used first: should one evict, it is theirs)
            try:
                done.insert(0, self.preload(repo_id, quant))
            except (NotFoundError, InvalidInputError) as error:  # (removed meanwhile)
                log.info("not preloading %s: %s", repo_id, error)
            except CorruptBlobError as error:  # (the others go in all the same: it stopped them, a trial)
                with self._lock:
                    self._skipped_corrupt.append((repo_id, quant))
                log.warning("not preloading %s%s now: %s", repo_id, f" ({quant})" if quant else "", error)
        if not done:  # (it said it would preload, then nothing: a README walk)
            log.info("preloaded nothing: no model in the store was used yet (a use: a load, a read or a download "
                     "of a variant's file), or none fits the preload budget")  # fmt: skip
        return done

    # -- using ------------------------------------------------------------------------------------------

    def get(self, repo_id: str, quant: str | None = None, revision: str = "main") -> PreloadHandle:
        """A held handle on a model, preloading it first when it is not in RAM (a miss)."""
        self._look_for_removed()
        self._let_go_of_dropped()
        key, *_ = self._resolve(repo_id, quant, revision)
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._hits += 1
                self._touch(model)
                model.holders += 1
                return PreloadHandle(self, model)
            self._misses += 1
        model, _ = self._obtain(repo_id, quant, revision, hold=True)
        return PreloadHandle(self, model)

    def holds(self, repo_id: str, quant: str | None = None, revision: str = "main") -> bool:
        self._let_go_of_dropped()
        try:
            key, *_ = self._resolve(repo_id, quant, revision)
        except NotFoundError:
            return False
        with self._lock:
            return key in self._models

    def _let_go_of_dropped(self) -> None:
        """Release the models of handles collected unreleased (:func:`_release_dropped`)."""
        while True:
            try:
                model = self._dropped.popleft()
            except IndexError:
                return
            self._release(model)

    @property
    def serves_loads(self) -> bool:
        """Whether an engine's load reads what this tier holds: the page cache's pages of the store's files
        (``page-cache``, ``mmap``), not a private copy (``read``, ``memfd``: only :meth:`get`'s readers read
        those; an engine reads the store's files, from the disk once their pages went)."""
        return self.strategy in ("page-cache", "mmap")

    def record_load(self, seconds: float, preloaded: bool) -> None:
        """Tell the stats how long an engine took to load, and whether its model was preloaded."""
        with self._lock:
            loads, total = self._load_times[preloaded]
            self._load_times[preloaded] = (loads + 1, total + seconds)

    def _touch(self, model: _Model) -> None:
        model.last_used = time.monotonic()
        self._models.pop(model.key)
        self._models[model.key] = model

    def _release(self, model: _Model, budget_again: bool = True) -> None:
        with self._lock:
            model.holders -= 1
            free = model.evicted and model.holders == 0
            stale = time.monotonic() - self._room_made_at >= RECHECK_SECONDS
            if budget_again and not model.evicted and model.holders == 0 and (self._gave_way or stale):
                # A budget that gave way to this holder applies again; and now and then all the same: pages
                # the kernel took back and a reader brought in again put the tier over its budget unseen.
                self._make_room(0)
        if free:
            self._free(model)

    # -- evicting ---------------------------------------------------------------------------------------

    def _footprint(self, entries: list[FileEntry], held: frozenset[str] = frozenset()) -> int:
        """The RAM ``entries`` take in the tier, but for the blobs in ``held``: in the page cache each content
        once (two paths of one blob are the same pages), as private copies each file its own."""
        if not self.serves_loads:
            return sum(e.size for e in entries)
        return sum(e.size for e in {e.sha256: e for e in entries}.values() if e.sha256 not in held)

    def _new_bytes(self, entries: list[FileEntry]) -> int:
        """What loading ``entries`` adds to the tier: not the blobs another model already holds in the page
        cache (the same pages)."""
        held = frozenset(c.entry.sha256 for m in self._models.values() for c in m.files.values() if c.shared)
        return self._footprint(entries, held)

    def _resident_total(self) -> int:
        """RAM the tier holds: a blob in the page cache counts once, however many models (a repo preloaded
        whole and as a variant) or paths map it; a private copy counts each time."""
        return self._resident(*self._models.values())

    def _resident(self, *models: _Model) -> int:
        """RAM ``models`` hold (counted as :meth:`_resident_total` counts it)."""
        counted: set[str] = set()
        total = 0
        for model in models:
            for copy in model.files.values():
                if copy.shared:
                    if copy.entry.sha256 in counted:
                        continue
                    counted.add(copy.entry.sha256)
                total += copy.resident()
        return total

    def _make_room(self, incoming: int, keep: ModelKey | None = None) -> None:
        """Evict least recently used models (not held, not pinned, not ``keep``) until ``incoming`` more
        bytes fit; what is resident is measured again after each eviction."""
        self._gave_way = False
        self._room_made_at = time.monotonic()
        incoming += sum(self._loading_bytes.values())  # (the room loads in progress made for themselves)
        while self._resident_total() + incoming > self.budget:
            victim = next(
                (m for m in self._models.values() if m.holders == 0 and not m.pinned and m.key != keep), None
            )
            if victim is None:
                self._gave_way = True
                return  # everything left is held or pinned: the budget gives way
            self._drop(victim)

    def _make_headroom(self, repo_id: str, incoming: int) -> None:
        """For a copy the kernel cannot take back (private memory, or locked pages): evict least recently used
        models until the process, or its container, keeps :func:`headroom` free beside ``incoming``; a
        :class:`MemoryShortError` when evicting cannot make it. A `memfd` tier under a budget of 95% of its
        container was killed by the kernel at 234 of 243 MiB: the budget counts the tier, not the process
        (an explorer's trial). Page-cache copies are left to the kernel's reclaim."""
        if self.strategy not in ("read", "memfd") and not self.mlock:
            return
        incoming += sum(self._loading_bytes.values())
        free, room = available_bytes(), headroom()
        if free is None or free - incoming >= room:
            return
        # What letting go of every model nothing needs would give back: not enough, and none goes (the whole
        # tier went, and the preload was refused all the same: a review)
        victims = [m for m in self._models.values() if m.holders == 0 and not m.pinned]
        if free + sum(m.size for m in victims) - incoming < room:
            raise _memory_short(repo_id, incoming, free, room)
        for victim in victims:
            log.info("letting go of the preload of %s (%s) for memory: %s free", victim.key[0],
                     victim.key[2] or "all files", size_text(free))  # fmt: skip
            self._drop(victim)
            free = available_bytes()
            if free is None or free - incoming >= room:
                return
        # (what they gave back was less than they held: a view of one a caller keeps holds its memory) Refused,
        # not loaded regardless: the kernel would kill the process
        raise _memory_short(repo_id, incoming, free, room)

    def follow_branches(self) -> int:
        """Models preloaded by a branch that moved since (a pull of a new commit, here or in another process)
        follow it, on the tier's own thread: the new commit is preloaded, then the old one let go (when its
        last holder does; a pinned one stays). A tier kept the commit it first found for good, counted in its
        budget, while loads of the branch read the new commit from disk (an explorer's trial). Returns how
        many moves were started."""
        if self._tiers is not None and self._tiers.shared:
            return 0  # (a commit split across stores: followed by asking again)
        with self._lock:
            asked = [(key, branch) for key, branch in self._branches.items()
                     if key in self._models and key not in self._following]  # fmt: skip
        started = 0
        for key, branch in asked:
            try:
                now = self.store.resolve(key[0], branch)
            except DepotError:
                continue  # (the branch went: a removal lets the model go)
            if now == key[1]:
                continue
            with self._lock:
                # (a follow that failed, for want of room say, is not tried again every 2 s for the same commit)
                if key in self._following or self._closed.is_set() or self._follow_failed.get(key) == now:
                    continue
                self._following[key] = (branch, now)
            started += 1
            try:
                self._pool.submit(self._follow, key, branch, now)
            except RuntimeError:  # (the tier is closing)
                with self._lock:
                    self._following.pop(key, None)
        return started

    def _follow(self, old: ModelKey, branch: str, commit_id: str) -> None:
        repo_id, _, variant = old
        with self._lock:
            model = self._models.get(old)
            if model is None or old in self._unfollowed:
                self._following.pop(old, None)
                self._unfollowed.discard(old)
                return  # (unloaded meanwhile)
            self._branches.pop(old, None)
            # The old commit goes first when nothing needs it (not held, not pinned, not asked by its commit id):
            # counted beside the new one, it made another model go for room (a review)
            keep = model.holders > 0 or model.pinned or old in self._by_commit
            if not keep:
                self._drop(model, evicted=False)
        try:
            landed = self._preload(repo_id, variant or None, branch, asked=False)
            with self._lock:
                self._follow_failed.pop(old, None)
                # (an unload by the branch while this loaded: it landed after the unload answered; only the
                # model this follow loaded goes, not another variant, nor one that was in RAM already)
                new = self._models.get((repo_id, landed.commit_id, variant))
                unloaded = old in self._unfollowed and new is not None and not landed.already
                if unloaded and new is not None:
                    self._drop(new, evicted=False)
            if unloaded:
                log.info("%s (%s): %s moved to %s, unloaded meanwhile: let go", repo_id, variant or "all files",
                         branch, commit_id[:12])  # fmt: skip
                return
            log.info("%s (%s): %s moved to %s: preloaded%s", repo_id, variant or "all files", branch, commit_id[:12],
                     f", {old[1][:12]} kept (held, pinned or asked by its commit id)" if keep else
                     f", {old[1][:12]} let go")  # fmt: skip
        except NotFoundError as error:
            log.info("%s (%s): %s moved to %s, not preloaded: %s", repo_id, variant or "all files", branch,
                     commit_id[:12], error)  # fmt: skip
        except Exception as error:
            with self._lock:
                self._follow_failed[old] = commit_id
                if keep and old in self._models:
                    self._branches[old] = branch  # (still followed: the next commit may fit)
            log.warning("%s (%s): %s moved to %s, and its preload failed (not tried again for that commit): %s",
                        repo_id, variant or "all files", branch, commit_id[:12], error)  # fmt: skip
        finally:
            with self._lock:
                self._following.pop(old, None)
                self._unfollowed.discard(old)

    def _drop(self, model: _Model, evicted: bool = True) -> None:
        """Take ``model`` out of the tier; ``evicted``: for room (counted), else because it left the store."""
        del self._models[model.key]
        self._branches.pop(model.key, None)
        self._by_commit.discard(model.key)
        self._follow_failed.pop(model.key, None)
        self._evictions += evicted
        model.evicted = True
        if model.holders == 0:
            self._free(model)

    def _free(self, model: _Model, drop_cache: bool = True) -> None:
        for copy in model.files.values():
            held = copy.mapping if copy.mapping is not None else copy.buffer
            if model.locked and held is not None:
                unlock(held, copy.size)
            copy.close(drop_cache)

    def evict(self, repo_id: str, quant: str | None = None, revision: str = "main") -> bool:
        """Take a model out of RAM (at once, or when its last holder lets go), pinned or not; without ``quant``,
        every model of the revision (its files all, or any variant: an unload with no variant named answered
        false and left the preloaded fp16 in RAM, an explorer's trial). By a branch, the models preloaded by
        that branch too, though it moved since. True if one was there. Not counted as an eviction (those make
        room)."""
        self._let_go_of_dropped()
        key, *_ = self._resolve(repo_id, quant, revision)

        def named(model_key: ModelKey, branch: str | None) -> bool:
            # (by the branch it was preloaded by, though the branch moved since: not left in RAM with "false",
            # a review)
            return (model_key[0] == key[0] and (quant is None or model_key[2] == key[2])
                    and (model_key[1] == key[1] or (not is_commit_id(revision) and branch == revision)))  # fmt: skip

        with self._lock:
            found = [m for k, m in self._models.items() if named(k, self._branches.get(k))]
            for model in found:
                self._drop(model, evicted=False)
            # A model on its way to its branch's new commit: the new one goes as it lands (it landed after the
            # unload had answered, a review)
            moving = [old for old, (branch, _) in self._following.items() if named(old, branch)]
            self._unfollowed.update(moving)
        self._look_for_removed()  # (after: a look would have started a follow of what is being unloaded)
        return bool(found or moving)

    def give_way(self) -> bool:
        """Drop the least recently used model that nothing holds and that is not pinned, for the disk budget
        (its revision may be evicted then: the RAM tier is a cache of the disk, not a pin); whether one went."""
        self._let_go_of_dropped()
        with self._lock:
            victim = next((m for m in self._models.values() if m.holders == 0 and not m.pinned), None)
            if victim is None:
                return False
            log.info("letting go of the preload of %s (%s) for room on disk", victim.key[0],
                     victim.key[2] or "all files")  # fmt: skip
            self._drop(victim)
            return True

    def revisions(self, gives_way: bool | None = None) -> set[tuple[str, str]]:
        """(repo, commit) of every model in RAM now; ``gives_way``: of those :meth:`give_way` may drop (True:
        nothing holds them and they are not pinned), or of the others (False)."""
        with self._lock:
            return {(key[0], key[1]) for key, model in self._models.items()
                    if gives_way is None or gives_way == (model.holders == 0 and not model.pinned)}  # fmt: skip

    def paths(self) -> dict[tuple[str, str], set[str]]:
        """(repo, commit) -> the files this preloader maps of it, or reads for a load in progress."""
        found: dict[tuple[str, str], set[str]] = {}
        with self._lock:
            for key, model in self._models.items():
                found.setdefault((key[0], key[1]), set()).update(model.files)
            for key, paths in self._loading_paths.items():
                found.setdefault((key[0], key[1]), set()).update(paths)
        return found

    def replaced(self) -> dict[tuple[str, str], set[str]]:
        """(repo, commit) -> the files of the models in RAM whose blob the store no longer holds as the one
        mapped (removed, and the same commit imported or pulled again before a look for removals: the index
        says the revision is whole, and the old, deleted file stayed mapped for good, a trial)."""
        with self._lock:
            held = [
                (key, path, copy) for key, model in self._models.items() for path, copy in model.files.items()
            ]
        found: dict[tuple[str, str], set[str]] = {}
        for key, path, copy in held:
            # (a private copy holds no file: its bytes are the commit's, whatever became of the file)
            if not copy.shared:
                continue
            try:
                now = os.stat(copy.stored_path)
                same = (now.st_dev, now.st_ino) == copy.blob_file
            except (OSError, ValueError):  # (its file went)
                same = False
            if not same:
                found.setdefault((key[0], key[1]), set()).add(path)
        return found

    def forget(self, repo_id: str, commit_ids: Iterable[str], paths: Iterable[str] | None = None) -> int:
        """Take every model of these revisions out of RAM (they were removed from the store: their mappings
        would keep the deleted files' space taken, and count in the RAM tier); a held one goes when its last
        holder lets go, and one being loaded when its load ends (that preload raises NotFoundError). With
        ``paths``, only the models that map one of these files (removed from a revision that stays: `rm
        --quant`). Returns how many models were dropped."""
        commits = set(commit_ids)
        only = None if paths is None else set(paths)  # (given: the models that map one of these files)
        with self._lock:
            gone = [m for m in self._models.values() if m.key[0] == repo_id and m.key[1] in commits
                    and (only is None or not only.isdisjoint(m.files))]  # fmt: skip
            for model in gone:
                self._drop(model, evicted=False)
            # (a model being loaded now is let go of when its load ends, instead of kept)
            self._forgotten.update(k for k in self._loading if k[0] == repo_id and k[1] in commits
                                   and (only is None or not only.isdisjoint(self._loading_paths.get(k, ()))))  # fmt: skip
        return len(gone)

    def pin(
        self, repo_id: str, quant: str | None = None, revision: str = "main", pinned: bool = True
    ) -> None:
        """Keep a preloaded model through every eviction (``pinned=False`` lets it go again)."""
        key, *_ = self._resolve(repo_id, quant, revision)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                raise NotFoundError(f"{repo_id} ({quant or 'all files'}) is not preloaded")
            model.pinned = pinned
            if not pinned:
                self._make_room(0)  # a budget that gave way to the pin applies again

    def close(self) -> None:
        """Unmap everything. The pages stay in the page cache for whoever reads them next (a `modeldepot
        preload` run warms the cache for the workers that follow); only eviction drops them."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._closed.set()
            for model in list(self._models.values()):
                del self._models[model.key]
                model.evicted = True
                if model.holders == 0:
                    self._free(model, drop_cache=False)

    # -- figures ----------------------------------------------------------------------------------------

    def _info(self, model: _Model, already: bool, resident: int | None = None) -> PreloadInfo:
        repo_id, commit_id, variant = model.key
        resident = self._resident(model) if resident is None else resident
        return PreloadInfo(repo_id, commit_id, variant, len(model.files), model.size, resident,
                           round(model.seconds, 6), self.strategy, model.locked, model.lock_error, already)  # fmt: skip

    def _measured_locked(self) -> tuple[dict[ModelKey, int], int]:
        """Each model's bytes in RAM and the tier's, measured again only after ``RESIDENCY_FRESH`` seconds or
        when the models changed: a measure walks the page cache (0.1 s a GiB), and stats are read by every
        dashboard's poll and every metrics scrape."""
        models = tuple(self._models.values())
        now = time.monotonic()
        kept = self._measured
        same = kept is not None and len(kept[1]) == len(models) and all(map(operator.is_, kept[1], models))
        if kept is not None and same and now - kept[0] < RESIDENCY_FRESH:
            return kept[2], kept[3]
        blobs: dict[str, int] = {}  # a blob in the page cache, measured once however many models map it
        per_model: dict[ModelKey, int] = {}
        total = 0
        for model in models:
            counted: set[str] = set()
            held = 0
            for copy in model.files.values():
                if not copy.shared:
                    held += (resident := copy.resident())
                    total += resident
                elif (sha256 := copy.entry.sha256) not in counted:
                    counted.add(sha256)
                    if sha256 not in blobs:
                        blobs[sha256] = copy.resident()
                        total += blobs[sha256]
                    held += blobs[sha256]
            per_model[model.key] = held
        self._measured = (now, models, per_model, total)
        return per_model, total

    def stats(self) -> PreloadStats:
        self._look_for_removed()
        self._let_go_of_dropped()
        with self._lock:
            per_model, total = self._measured_locked()
            infos = tuple(
                self._info(m, already=True, resident=per_model[m.key])
                for m in reversed(self._models.values())
            )
            gets = self._hits + self._misses
            (warm, warm_seconds), (cold, cold_seconds) = self._load_times[True], self._load_times[False]
            return PreloadStats(
                strategy=self.strategy,
                budget_bytes=self.budget,
                models=len(infos),
                ram_bytes=total,
                hits=self._hits,
                misses=self._misses,
                hit_rate=self._hits / gets if gets else None,
                evictions=self._evictions,
                avg_load_seconds_preloaded=warm_seconds / warm if warm else None,
                avg_load_seconds_cold=cold_seconds / cold if cold else None,
                preloaded=infos,
                most_accessed=tuple(self.store.access.top(5, in_store=True)),
            )


def resident_in_ram(
    store: Store, repo_id: str, revision: str | None = "main", check: bool = True, variant: str | None = None
) -> tuple[int | None, int]:
    """(bytes in the page cache now, bytes in all) of a revision's blobs, from any process: of ``variant``'s
    files and the shared ones when it is named (a NotFoundError when the revision no longer holds it: `rm
    --quant` left its shared files, counted as the variant), else of all. ``revision`` None:
    main, or the newest revision when no main names one (a repo pulled by commit id). ``check`` False: the
    blobs are opened as they are, never rehashed (one not yet checked since a power loss would be read
    whole, into RAM, by its check): a look that must not change what it looks at. The bytes in the page
    cache are None when the kernel does not show them to this process (blobs of another user's store)."""
    if revision is None:
        try:
            commit_id = store.resolve(repo_id, "main")
        except NotFoundError:
            newest = store.revisions(repo_id)
            if not newest:
                raise
            commit_id = newest[0][0]
    else:
        commit_id = store.resolve(repo_id, revision)
    entries = store.files(repo_id, commit_id)
    if variant:
        grouping = group_files(e.path for e in entries)
        chosen = grouping.find(variant)
        if chosen is None:
            raise NotFoundError(f"{repo_id}@{commit_id[:12]} no longer holds {variant}", repo_id=repo_id)
        wanted = {*chosen.files, *grouping.shared}
        entries = [e for e in entries if e.path in wanted]
    resident: int | None = 0
    total = 0
    for entry in entries:
        total += entry.size
        if check:
            fd = store.open_fd(entry)
        else:
            try:
                fd = os.open(store.blobs.path(entry.sha256), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # gone or unreadable: nothing of it in RAM to count
        try:
            measured = resident_bytes(fd, entry.size)
        finally:
            os.close(fd)
        resident = None if resident is None or measured is None else resident + measured
    return resident, total
