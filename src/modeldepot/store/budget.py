"""A disk budget for the store's blobs: the least recently used revisions go first, never what is pinned or in
use.

The budget (``"200GiB"``, or ``"80%"`` of the file system that holds the store) is the store's: kept in its
index (:meth:`DiskBudget.save_max_size`: ``modeldepot budget``, ``serve --max-size``), so every process on the
store keeps to it, and a change reaches running ones at their next write. ``MODELDEPOT_MAX_SIZE`` caps one
process further (the smaller of the two holds). It bounds the bytes of the store's blobs (each content once, as ``du`` counts them). Before an import or a
pull writes new blobs, its :class:`BudgetWriter` (:meth:`DiskBudget.writing`) makes room: revisions (or
variants) are removed, as ``rm`` would, least recently used first, until the new bytes fit; when they cannot fit even
then, :class:`BudgetExceededError` (a :class:`~modeldepot.errors.StoreFullError`) is raised and nothing is
removed. The room a writer made stays reserved until it ends.

The unit of eviction is a revision (a commit of a repo), or one variant of a revision that holds several
(a GGUF repo's quants, an ONNX repo's precisions: the variants :meth:`evict_by_variant` is told of; the
store knows none itself). The last use of a revision is the later of its creation and its own last use
(reads, loads, preloads, imports and pulls count, through a branch or by commit id: store/access.py). The last use of a variant is the later of its revision's creation and the variant's own last
use (a load of it, a preload, a read or a download of one of its files, a pull of it): a config read with
every load keeps no quant alive. A variant goes with its own files only (those no other variant lists);
the revision's last variant, and its shared files (config, tokenizer), go with the revision. What is never
evicted: pinned revisions (store/pins.py; a pin of one variant keeps that
variant and the revision's shared files, and lets its other variants go), the revision a pull in this
process is writing and the files it writes there (:meth:`writing`: its other variants and the repo's other
revisions may go, the superseded revision a pull of a new one replaces among them), every revision of a
repo an import in this process is writing (its commit is known once it is written) or that another
process's pull marks as downloading (its variant status row, recently updated), and what the hooks given to :meth:`add_in_use`
name (the preloader's and the loaded-model cache's models: depot.py; where the hook of
:meth:`evict_by_variant` says which files they use, the revision's other variants may go), and the files
other processes map or hold open (store/elsewhere.py). Evictions are
logged and counted in the index (``settings``: ``evictions``, ``evicted_bytes``).

Several processes may share a store: each decides from the index as it reads it, and each removal takes the
store's lock like ``rm``; what a writer reuses is checked again when it publishes (store/publish.py). The
room a writer made is seen by every process (store/reservations.py), and made one process at a time; a
writer never evicts what was used or published since it began. A writer that ends above the budget (a
budget lowered meanwhile) evicts again (:meth:`BudgetWriter.keep_within`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modeldepot.config import budget_text, parse_max_size
from modeldepot.errors import (
    BudgetExceededError,
    ConfigError,
    DepotError,
    NotFoundError,
    StoreError,
    StoreFullError,
)
from modeldepot.store.elsewhere import HeldElsewhere
from modeldepot.store.eviction import (
    EvictionOrder,
    Kept,
    Unit,
    Variants,
    ok_bytes,
    shared_blobs,
)
from modeldepot.store.layout import FULL_DISK_ADVICE, os_error, size_text, sizes_text
from modeldepot.store.models import _Record
from modeldepot.store.pins import Pins
from modeldepot.store.reservations import Reservation, Reservations

if TYPE_CHECKING:
    from modeldepot.store.store import Store

__all__ = [
    "BudgetExceededError",
    "BudgetStatus",
    "BudgetWriter",
    "DiskBudget",
    "Eviction",
    "parse_max_size",
]

log = logging.getLogger(__name__)

EVICTIONS_KEPT = 1000  # the evictions remembered with what went and why (the counters keep them all)
MAX_SIZE_SETTING = "max_size"  # the store's budget in its settings table, as written ("200GiB", "80%")

SHARED_FRESH = 5.0  # seconds a look at which blobs are shared with files outside the store answers status()
# Whole revisions removed at once, at most, their bytes and their files (one transaction, one look for the blobs
# left unnamed; the store's lock is held for their files' unlinks, as reads wait for it: 64 revisions of 200 files
# each held it 2.9 s, a review; 1,000 files 0.25-0.4 s here)
EVICTION_BATCH = 64
EVICTION_BATCH_BYTES = 1 << 30
EVICTION_BATCH_FILES = 1000
DOWNLOADING_FRESH = (
    600.0  # seconds a 'downloading' status row protects its repo (a crashed pull's goes stale)
)

InUse = Callable[[], Iterable[tuple[str, str | None]]]
"""Names what is in use: (repo id, commit id), or (repo id, None) for every revision of the repo."""
PathsInUse = Callable[[], Mapping[tuple[str, str], set[str]]]
"""(repo id, commit id) -> the files of it in use (what the :data:`InUse` hooks name, file by file)."""


@dataclass(frozen=True)
class Eviction(_Record):
    repo_id: str
    commit_id: str
    bytes_freed: int
    last_used: float  # seconds since the epoch
    variant: str | None = None  # one variant's own files went; None: the whole revision
    # Bytes of its blobs that stay on disk, linked outside the store (an exported Hugging Face cache's)
    bytes_still_linked: int = 0
    at: float = 0.0  # when it went (seconds since the epoch)
    doing: str = ""  # the write or command it made room for ("pulling acme/x", "shrinking the store")
    origin: str = ""  # where the repo came from: "import", or the URL of the upstream it was pulled from


@dataclass(frozen=True)
class BudgetStatus(_Record):
    max_bytes: int | None  # the budget this process keeps to (the smaller of the two below); None: no budget
    used_bytes: int  # the blobs' bytes (each content once)
    pinned_bytes: int  # the blobs pinned revisions use
    in_use_bytes: int  # ... and those of revisions in use (pinned or not), which no eviction removes either
    evictions: int  # revisions and variants evicted since the store was created
    evicted_bytes: int
    store_max_size: str | None = None  # the store's budget as saved ("200GiB", "80%"); None: none saved
    process_max_bytes: int | None = None  # this process's own cap (MODELDEPOT_MAX_SIZE); None: none
    read_only: bool = False  # the store is read-only here: no budget can be saved, nothing evicted
    # Blobs another name outside the store links too (an adopted Hugging Face cache, `import --link`): on the
    # disk whatever the store does, so neither counted in used_bytes nor evicted for room
    shared_bytes: int = 0
    # Room writes under way (pulls, imports, in any process) made and hold until they publish: counted by
    # every check of the budget, though not in used_bytes yet
    reserved_bytes: int = 0


class DiskBudget:
    """The budget of one store: the one saved with it, capped by this process's ``max_size`` (None: no cap; the
    pins are kept either way). Thread-safe."""

    def __init__(self, store: Store, max_size: str | None) -> None:
        self.store = store
        self.process_max_bytes = None if max_size is None else parse_max_size(max_size, store.home)
        self._hooks: list[InUse] = []
        self._give_way: list[tuple[InUse, Callable[[], bool]]] = []
        self.order = EvictionOrder(store)
        self.pins = Pins(store, self.order)
        self._paths_in_use: PathsInUse | None = None
        self._evicted_hooks: list[Callable[[str], None]] = []
        self._before_variant_removal: Callable[[str, str], None] | None = None
        self._writers: list[BudgetWriter] = []
        self._reused: Counter[str] = Counter()  # blobs (SHA-256) writers found in the store and rely on
        self._reserved = 0  # bytes writers made room for and may not have written yet
        self._shared: tuple[float, dict[str, int]] | None = None  # (when, shared_blobs) for status
        self.elsewhere = HeldElsewhere(store)  # what other processes map or hold open, as looked at lately
        self._lock = threading.Lock()  # guards _writers, _reused, _reserved, _shared
        self._round = threading.Lock()  # one eviction round at a time in this process
        # What writers in other processes reserved (this process's own: _reserved)
        self.reservations = Reservations(store.layout.lock_path.parent / "reservations", store.read_only)

    @property
    def store_max_size(self) -> str | None:
        """The store's own budget, as saved (``"200GiB"``, ``"80%"``); None when it has none."""
        return self.store.index.setting(MAX_SIZE_SETTING)

    @property
    def max_bytes(self) -> int | None:
        """The budget this process keeps to: the store's, or this process's cap when that is smaller (one read
        of the index, so that a budget another process saves holds here at once)."""
        saved = self.store_max_size
        limits = [self.process_max_bytes]
        if saved is not None:
            try:
                limits.append(parse_max_size(saved, self.store.home))
            except ConfigError as error:  # (written by hand into the index: saving checks it)
                raise ConfigError(
                    f"the store's disk budget: {error}; set it again with modeldepot budget"
                ) from None
        known = [limit for limit in limits if limit is not None]
        return min(known) if known else None

    def _setting_that_binds(self, budget: int) -> str:
        if self.process_max_bytes == budget:
            return "this process's MODELDEPOT_MAX_SIZE"
        return "the store's: `modeldepot budget SIZE`"

    def save_max_size(self, max_size: str | int | None) -> None:
        """Make ``max_size`` the store's budget, which every process on the store keeps to (None: remove it)."""
        with self.store.index.write("saving the disk budget") as con:
            if max_size is None:
                con.execute("DELETE FROM settings WHERE key = ?", (MAX_SIZE_SETTING,))
            else:
                parse_max_size(max_size, self.store.home)  # (ConfigError before anything is saved)
                con.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                    "value = excluded.value",
                    (MAX_SIZE_SETTING, budget_text(max_size)),
                )
        log.info(
            "disk budget of %s: %s", self.store.home, "none" if max_size is None else budget_text(max_size)
        )

    # -- what may not go ------------------------------------------------------------------------------------

    def add_in_use(self, hook: InUse) -> None:
        """Never evict what ``hook()`` names (asked at each eviction round)."""
        self._hooks.append(hook)

    def add_gives_way(self, in_use: InUse, let_go: Callable[[], bool]) -> None:
        """Keep what ``in_use()`` names as :meth:`add_in_use` would, until room cannot be made otherwise and
        could be without them: then ``let_go()`` lets go of one of them and says whether it did (the RAM tier
        drops its least recently used preload, whose revision may go then), and the round is tried again. A
        model preloaded on a node kept its disk for as long as the node ran, and the node's own pulls were
        refused (a trial); and a write that could not fit at all emptied the RAM tier for nothing (a review)."""
        self._give_way.append((in_use, let_go))

    def _gave_way(self, needed: int, writer: BudgetWriter | None) -> bool:
        """(A write was refused.) Whether what gives way let go of one thing, as letting go of them all would
        make room for ``needed`` bytes."""
        budget = self.max_bytes
        if not self._give_way or budget is None:
            return False
        shared = shared_blobs(self.store)
        firm = self.order.kept_bytes(self._kept(writer, soft=False), blobs=self.kept_blobs(), shared=shared)
        if firm + self._others_reserved(writer) + needed > budget:
            return False
        return any(let_go() for _, let_go in self._give_way)

    def evict_by_variant(self, variants: Variants, paths_in_use: PathsInUse,
                         before_removal: Callable[[str, str], None] | None = None) -> None:  # fmt: skip
        """Let the variants of a revision that holds several go one at a time (``variants`` tells them
        apart); ``paths_in_use`` says which files of the revisions the :meth:`add_in_use` hooks name are in
        use (a revision the hooks name and it does not, stays whole); ``before_removal(repo, commit)`` is
        called before a variant's files go (the depot keeps the commit's whole listing)."""
        self.order.variants, self._paths_in_use = variants, paths_in_use
        self._before_variant_removal = before_removal

    def judge_whole_by(self, holds_whole: Callable[[str, str], bool]) -> None:
        """``holds_whole(repo, commit)`` says whether the store holds every file of a commit (by its listing,
        the hub layer's): a pinned branch's commit held whole lets the one it replaced go."""
        self.pins.holds_whole = holds_whole

    def add_evicted_hook(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(repo_id)`` after each eviction of one of the repo's revisions."""
        self._evicted_hooks.append(hook)

    @contextlib.contextmanager
    def writing(
        self,
        repo_id: str,
        commit_id: str | None = None,
        paths: Iterable[str] = (),
        variants: Iterable[str] = (),
    ) -> Iterator[BudgetWriter]:
        """An import or a pull writes ``repo_id``. With ``commit_id`` (a pull: the commit it publishes) that
        revision and the files ``paths`` it writes there are kept meanwhile and after, and the repo's other
        revisions and that revision's other variants may go, least recently used first, as any other's
        (a pull of a new revision makes room by the one it supersedes, a pull of one quant by a quant
        never read); without it (an import: its commit derives from what it writes), none of the repo's
        revisions is evicted meanwhile. The blobs it relies on (:meth:`BudgetWriter.reuse`) stay when a
        revision using them is evicted; the room it made is reserved until it ends (so that two writers in
        this process do not count the same free bytes). ``variants``: those it marks ``downloading`` in the
        index (another process's rows of the repo keep it whole, as ever)."""
        writer = BudgetWriter(self, repo_id, commit_id, paths, variants)
        with self._lock:
            self._writers.append(writer)
        try:
            yield writer
        finally:
            with self._lock:
                self._writers.remove(writer)
                self._reused.subtract(writer.reused)
                self._reserved -= writer.reserved
                writer.reserved = 0
                self._reused = +self._reused
                writer.release()  # (under the lock: a make_room still running must not reserve after)

    def _kept(self, writer: BudgetWriter | None = None, pins: Kept | None = None, soft: bool = True,
              fresh: bool = True) -> Kept:  # fmt: skip
        """What no eviction may remove now: pinned (``pins``, when read already), in use (in this process, or
        mapped or open in another: ``fresh`` False, as looked at in the last seconds), or being written
        (:meth:`writing`); ``soft``: and what gives way only when it must (:meth:`add_gives_way`)."""
        kept = self.pins.kept() if pins is None else Kept(
            set(pins.commits), set(pins.repos), {}, {k: set(v) for k, v in pins.pinned_variants.items()}
        )  # fmt: skip
        with self._lock:
            writers = list(self._writers)
        if writer is not None and writer not in writers:
            writers.append(writer)
        for each in writers:
            if each.commit_id is None:
                kept.repos.add(each.repo_id)
            else:
                key = (each.repo_id, each.commit_id)
                kept.parts.setdefault(key, set()).update(each.paths)
                kept.written.add(key)
        # Another process's pull, known by its status rows alone (no commit): its whole repo. The rows of the
        # variants this process's own pulls are downloading are theirs (they keep what they write, above); a
        # row of any other variant of the repo is another pull's, and keeps the repo whole.
        ours = {
            (each.repo_id, v.lower()) for each in writers if each.commit_id is not None for v in each.variants
        }
        # (a row whose pull was killed is no pull: no live process holds the repo's pull mark, and the row
        # protected its repo for DOWNLOADING_FRESH all the same: a tight budget refused writes meanwhile)
        since = time.time() - DOWNLOADING_FRESH
        pulled = {r["repo_id"] for r in self.store.index.read(
            "SELECT repo_id, variant FROM variant_status WHERE status = 'downloading' AND updated_at >= ?",
            (since,)) if (r["repo_id"], r["variant"].lower()) not in ours}  # fmt: skip
        kept.repos.update(repo_id for repo_id in pulled if self.store.partials.is_pulling(repo_id))
        hooks = [*self._hooks, *(in_use for in_use, _ in self._give_way)] if soft else self._hooks
        named = [used for hook in hooks for used in hook()]
        in_use: Mapping[tuple[str, str], set[str]] = {}
        if named and self._paths_in_use is not None and self.order.variants is not None:
            in_use = self._paths_in_use()  # (after the hooks: a model loaded between is named by both)
        for repo_id, commit_id in named:
            if commit_id is None:
                kept.repos.add(repo_id)
            elif (repo_id, commit_id) in in_use:
                kept.parts.setdefault((repo_id, commit_id), set()).update(in_use[(repo_id, commit_id)])
            else:
                kept.commits.add((repo_id, commit_id))
        for key, paths in self.elsewhere.files(fresh).items():
            kept.parts.setdefault(key, set()).update(paths)  # (their revision stays, and their variant)
        return kept

    # -- figures ----------------------------------------------------------------------------------------------

    def used_bytes(self, shared: Mapping[str, int] | None = None) -> int:
        """The blobs' bytes the budget counts: not those of the blobs another name outside the store links
        too (``shared``: :func:`~modeldepot.store.eviction.shared_blobs`, looked at now when not given)."""
        return self._all_bytes() - ok_bytes(
            self.store, shared_blobs(self.store) if shared is None else shared
        )

    def _all_bytes(self) -> int:
        """Every blob's bytes, shared or not: one indexed sum. What fits counting these fits (a look at which
        blobs are shared stats every blob file: only when the sum says a write may not fit, a review)."""
        return int(self.store.index.read("SELECT COALESCE(SUM(size), 0) FROM blobs WHERE state = 'ok'")[0][0])

    def _shared_lately(self) -> dict[str, int]:
        """:func:`shared_blobs` as looked at in the last SHARED_FRESH seconds (a node's status is asked often:
        by a dashboard, every scrape of /metrics; a look is a stat of every blob file). Evictions look anew."""
        now = time.monotonic()
        with self._lock:
            if self._shared is not None and now - self._shared[0] < SHARED_FRESH:
                return self._shared[1]
        shared = shared_blobs(self.store)
        with self._lock:
            self._shared = (now, shared)
        return shared

    def kept_blobs(self) -> frozenset[str]:
        """The blobs writers found in the store and rely on, in this process and in others (their
        reservations name them): an eviction, and gc, keep them."""
        with self._lock:
            own = frozenset(self._reused)
        return own | self.reservations.relied_on()

    def status(self, fresh: bool = True) -> BudgetStatus:
        """The figures (a node's stats and metrics ask often: read only, the uses as written so far;
        ``fresh`` False: the blobs shared with files outside the store as looked at in the last seconds)."""
        pinned = self.pins.kept()
        kept = self._kept(pins=pinned, fresh=fresh)
        shared = shared_blobs(self.store) if fresh else self._shared_lately()
        return BudgetStatus(
            max_bytes=self.max_bytes,
            store_max_size=self.store_max_size,
            process_max_bytes=self.process_max_bytes,
            used_bytes=self.used_bytes(shared),
            pinned_bytes=self.order.kept_bytes(pinned, flush=False, shared=shared),
            in_use_bytes=self.order.kept_bytes(kept, blobs=self.kept_blobs(), flush=False, shared=shared),
            evictions=int(self.store.index.setting("evictions") or 0),
            evicted_bytes=int(self.store.index.setting("evicted_bytes") or 0),
            read_only=self.store.read_only,
            shared_bytes=sum(shared.values()),
            reserved_bytes=self._others_reserved(None),
        )

    # -- evicting ---------------------------------------------------------------------------------------------

    def check_fits(self, needed: int, doing: str, writer: BudgetWriter | None = None) -> None:
        """Raise :class:`BudgetExceededError` when ``needed`` new bytes cannot fit even after evicting every
        revision that may go (and what gives way: :meth:`add_gives_way`); evict nothing."""
        looked_again = False
        while True:
            try:
                return self._check_fits(needed, doing, writer)
            except BudgetExceededError:
                if not looked_again and self.elsewhere.forget():
                    looked_again = True
                    continue
                if not self._gave_way(needed, writer):  # (as make_room would: an import was refused)
                    raise

    def _check_fits(self, needed: int, doing: str, writer: BudgetWriter | None) -> None:
        budget = self.max_bytes
        if budget is None or needed <= 0:
            return
        others = self._others_reserved(writer)
        if self._all_bytes() + others + needed <= budget:
            return  # (fits without evicting anything: the common case, one indexed sum)
        shared = shared_blobs(self.store)
        if self.used_bytes(shared) + others + needed <= budget:
            return
        kept = self._kept(writer)
        kept_bytes = self.order.kept_bytes(kept, blobs=self.kept_blobs(), shared=shared) + others
        self._refuse_if_too_big(needed, budget, kept_bytes, doing, writer)

    def make_room(self, needed: int, doing: str, writer: BudgetWriter | None = None,
                  disk_short: int = 0) -> list[Eviction]:  # fmt: skip
        """Evict the least recently used revisions and variants until ``needed`` new bytes fit in the budget
        (no-op without one), and until the disk, ``disk_short`` bytes short of them, has their room: a budget
        says models may go to make room, and another program's files on the disk took what it allowed (an
        imported model went for a pull the disk then could not take, an explorer's trial). Raises
        :class:`BudgetExceededError` (:class:`StoreFullError` when the disk binds), having removed nothing,
        when they cannot fit even after every revision that may go is gone."""
        budget = self.max_bytes
        if needed <= 0:
            return []
        if budget is None:
            # Held all the same: a budget set while this writes counts the room it is about to take (a pull
            # begun without one was invisible to `budget SIZE`, its dry run and the imports beside it: a trial)
            if writer is not None:
                try:
                    self._reserve(writer, needed)
                except OSError as error:  # (bookkeeping for a budget not set: never a reason to fail a write)
                    log.debug("no reservation of %d bytes for %s: %s", needed, writer.repo_id, error)
            return []
        looked_again = False
        while True:
            try:
                limit, on_disk = budget - needed, None
                if disk_short > 0:
                    # The blobs' bytes the disk can keep beside the new ones, and beside the room other writers
                    # hold and may not have taken on the disk yet (the round's sum counts them with the blobs:
                    # left out, a pull evicted for itself, then took another write's room: a review)
                    on_disk = self.used_bytes() - disk_short
                    limit = min(limit, on_disk)
                return self._evict_to(limit, needed, doing, writer, disk_bound=on_disk == limit)
            except (BudgetExceededError, StoreFullError):  # (the disk's too: what is in use may give way)
                if not looked_again and self.elsewhere.forget():
                    looked_again = True
                    continue
                if not self._gave_way(needed, writer):  # (one thing at a time, then a new round)
                    raise

    def shrink(self, max_bytes: int | None = None) -> list[Eviction]:
        """Evict the least recently used revisions and variants until the store is within ``max_bytes``
        (default: the budget); as far as it can when pins and uses keep it above."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        if limit is None:
            return []
        evicted = self._evict_to(limit, 0, "shrinking the store", None, partial=True)
        left = self._all_bytes()
        if left > limit and (left := self.used_bytes()) > limit:
            log.warning("shrinking the store to %s: it still takes %s, as the models pinned or in use keep it above "
                        "(unpin or remove models to go further)", size_text(limit), size_text(left))  # fmt: skip
        return evicted

    def plan_shrink(self, max_bytes: int | None = None) -> list[Eviction]:
        """What :meth:`shrink` to ``max_bytes`` (default: the budget) would evict now, in order, and the bytes
        each would free; nothing is removed (a budget's evictions, previewed before they are asked for)."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        if limit is None:
            return []
        if self._all_bytes() + self._others_reserved(None) <= limit:
            return []
        shared = shared_blobs(self.store)
        # (less what the shrink frees first: blobs no file names, nobody relies on)
        used = self.used_bytes(shared) + self._others_reserved(None) - self._unreferenced_bytes(shared)
        if used <= limit:
            return []
        kept = self._kept()
        units = self.order.units(kept)
        staying = self.order.staying_blobs(units, self.kept_blobs()) | shared.keys()
        written = {key: kept.parts.get(key, set()) for key in kept.written}  # (as the evictions group them)
        # (what stays on disk, linked outside the store, said apart as the eviction says it: the preview said an
        # exported model would free its size, the eviction then 0 B, a review)
        planned = []
        for unit, freed in self.order.choose(units, staying, used, limit, written)[0]:
            linked = min(freed, self._linked_out(unit, staying))
            planned.append(Eviction(unit.repo_id, unit.commit_id, freed - linked, unit.last_used, unit.variant,
                                    linked))  # fmt: skip
        return planned

    def _linked_out(self, unit: Unit, staying: Collection[str]) -> int:
        """Bytes of the blobs ``unit`` would remove whose files have names outside the store too (an export's:
        they stay on disk)."""
        rows = self.store.index.read("SELECT path, sha256, size FROM files WHERE repo_id = ? AND commit_id = ?",
                                     (unit.repo_id, unit.commit_id))  # fmt: skip
        blobs = {row["sha256"]: int(row["size"]) for row in rows
                 if (unit.variant is None or row["path"] in unit.files) and row["sha256"] not in staying}  # fmt: skip
        linked = 0
        for sha256, size in blobs.items():  # (a preview's few units: the layout's checked path of each)
            try:
                if os.stat(self.store.blobs.path(sha256), follow_symlinks=False).st_nlink > 1:
                    linked += size
            except (OSError, StoreError):
                continue
        return linked

    def _refuse_if_too_big(self, needed: int, budget: int, kept_bytes: int, doing: str,
                           writer: BudgetWriter | None) -> None:  # fmt: skip
        if kept_bytes + needed > budget:
            needed_said, budget_said = sizes_text(needed, budget)
            raise BudgetExceededError(
                f"{doing}: {needed_said} more does not fit in the disk budget of {budget_said}, even after "
                f"evicting every model that may go: {size_text(kept_bytes)} are pinned, in use (loaded, or mapped or open, in this process{self.elsewhere.said()}) or files this write reuses"
                + (f" or of {writer.repo_id} itself" if writer is not None and writer.commit_id is None else "")
                + self._writes_under_way(writer)
                + f" (pinned: {size_text(self.status().pinned_bytes)}); nothing was removed. Raise the budget "
                f"({self._setting_that_binds(budget)}), unpin or remove models" + self._pinned_update(writer),
                budget_bytes=budget, protected_bytes=kept_bytes, needed_bytes=needed,
                repo_id=writer.repo_id if writer else None,
            )  # fmt: skip

    def _pinned_update(self, writer: BudgetWriter | None) -> str:
        """What to say when ``writer`` pulls a new commit of a repo whose pin keeps another of its commits: the
        pin follows its branch only once the new commit is whole (an operator who pins "the model we serve"
        met this on the upstream's first update, the error naming no cause)."""
        if writer is None or writer.commit_id is None or writer.branch is None:
            return ""
        # (a pin of the branch this pull moves: one of a commit, or of another branch, it does not replace,
        # and "unpin, pull, pin again" would lose what it keeps: a review)
        branch = writer.branch.lower()
        pinned = [pin for pin in self.pins.all() if pin.repo_id.lower() == writer.repo_id.lower()
                  and pin.revision.lower() == branch]  # fmt: skip
        if not pinned:
            return ""
        try:
            if self.store.resolve(writer.repo_id, writer.branch) == writer.commit_id:
                return ""
        except NotFoundError:
            return ""
        return (f". {writer.repo_id} is pinned, and its pin keeps the revision this pull replaces until the new one "
                f"is whole: an update of a pinned model needs room for both (or `modeldepot unpin {writer.repo_id}`, "
                "pull, then pin it again)")  # fmt: skip

    def _others_reserved(self, writer: BudgetWriter | None) -> int:
        """The room other writers hold, in this process and in others, and have not filled yet; the room of
        one content counted once, however many hold it, and not at all when ``writer`` pulls it too (pulls of
        the same contents share their downloads: a second pull of a revision under a budget for 1.5 of it
        was refused, the room counted twice; a third write, of anything, beside two pulls of one repo was
        refused for that repo's room counted twice, an explorer's trial)."""
        mine = writer.contents if writer is not None else {}
        with self._lock:
            held: list[tuple[int, Mapping[str, int]]] = [
                (other.reserved, other.contents) for other in self._writers if other is not writer
            ]
        held += [(other.amount, other.contents) for other in self.reservations.elsewhere(contents=True)]
        counted, total = dict(mine), 0
        # (the largest first: a shared content counts with the holder that holds most room for it)
        for amount, contents in sorted(held, key=lambda item: -item[0]):
            total += _beyond(amount, contents, counted)
            counted.update(contents)
        return total

    def _writes_under_way(self, writer: BudgetWriter | None) -> str:
        """What the other writes under way hold, this process's and other processes', for a refusal ("" when
        none). (A node's pulls all run in its process: a refusal there blamed "pinned, in use (loaded by this
        process)", with nothing pinned or loaded, for the room another pull held: an explorer's trial.)"""
        with self._lock:
            here = [(other.repo_id, other.reserved) for other in self._writers
                    if other is not writer and other.reserved]  # fmt: skip
        named = [f"{repo_id} {size_text(amount)} in this process" for repo_id, amount in here]
        named += [f"{h.repo_id} {size_text(h.amount)}" + (f" by process {h.pid}" if h.pid else "")
                  for h in self.reservations.elsewhere() if h.amount]  # (not those that only keep blobs)  # fmt: skip
        if not named:
            return ""
        return f", or held by writes under way ({', '.join(named[:3])}{', ...' if len(named) > 3 else ''})"

    def _evict_to(self, limit: int, needed: int, doing: str, writer: BudgetWriter | None,
                  partial: bool = False, disk_bound: bool = False) -> list[Eviction]:  # fmt: skip
        if writer is None:
            with self._round:
                return self._evict_round(limit, needed, doing, writer, partial, disk_bound)
        # Room is made and reserved by one process at a time: two saw the same free bytes, and both took them
        with self.reservations.admitting(), self._round:
            evicted = self._evict_round(limit, needed, doing, writer, partial, disk_bound)
            try:
                self._reserve(writer, needed)
            except OSError as error:  # (no inode or room left for the reservation's file: the store's error)
                raise os_error(error, f"holding room in the disk budget for {writer.repo_id}") from error
            return evicted

    def _reserve(self, writer: BudgetWriter, needed: int) -> None:
        """Hold ``needed`` more bytes for ``writer`` until it publishes or ends (counted as used by the others)."""
        with self._lock:
            if needed and writer in self._writers:  # (a pull cancelled meanwhile left: nothing to hold)
                writer.reserved += needed
                self._reserved += needed
                writer.reserve(writer.reserved)

    def _evict_round(self, limit: int, needed: int, doing: str, writer: BudgetWriter | None,
                     partial: bool, disk_bound: bool = False) -> list[Eviction]:  # fmt: skip
        others = self._others_reserved(writer)
        if self._all_bytes() + others <= limit:
            return []  # (the common case: one indexed sum)
        shared = shared_blobs(self.store)
        used = self.used_bytes(shared) + others
        if used <= limit:
            return []
        if self._drop_unreferenced():  # (garbage first: no model goes for it)
            used = self.used_bytes(shared) + others
            if used <= limit:
                return []
        kept = self._kept(writer)
        units = self.order.units(kept)
        if not partial:  # (others' writes in use)
            kept_bytes = self.order.kept_bytes(kept, units, blobs=self.kept_blobs(), shared=shared) + others
            if disk_bound and kept_bytes > limit:
                raise StoreFullError(
                    f"{doing} needs {size_text(needed)} on the store's disk, which lacks room for them even after "
                    f"evicting every model that may go ({size_text(kept_bytes)} are pinned, in use or reused by "
                    f"this write): nothing was fetched or evicted; {FULL_DISK_ADVICE}"
                )
            self._refuse_if_too_big(needed, limit + needed, kept_bytes, doing, writer)
        evicted: list[Eviction] = []
        # (a copy of a pinned repo freed nothing, and went all the same: a repo lost for no byte; so did a
        # model adopted from a Hugging Face cache, whose files the cache keeps on the disk: a trial)
        # Used (or written) since this writer began: another process's pull that just said it was done went at
        # once to make room for this one (a trial); it stays above the budget, warned of, and the next write
        # evicts again. (Left out before what stays is worked out: their blobs stay, a review.)
        units = [u for u in units if writer is None or u.last_used < writer.started]
        staying = self.order.staying_blobs(units, self.kept_blobs()) | shared.keys()
        # What the plan needs (no unit that frees nothing the others need: EvictionOrder.choose), then, should
        # it fall short as it goes (a removal elsewhere meanwhile), the units it did not go through
        written = {key: kept.parts.get(key, set()) for key in kept.written}
        planned, after = self.order.choose(units, staying, used, limit, written)
        queue = [*(u for u, _ in planned), *after]
        frees = [freed for _, freed in planned]  # (what each unit the plan needs frees, as planned)
        place = 0
        while place < len(queue):
            run = self._next_batch(queue, place, frees)
            candidates = [
                p for p in range(place, place + run) if not self.order.frees_nothing(queue[p], staying)
            ]
            # The bytes looked at again once the batch is known, and it cut to what they still need: a removal
            # elsewhere meanwhile (another process's rm, its own budget round) left less to free, or nothing, and
            # a batch went whole for nothing (a review)
            used = self.used_bytes(shared) + others
            if used <= limit:
                break
            short, taken = used - limit, []
            for p in candidates:
                taken.append(p)
                short -= frees[p] if p < len(frees) else 0
                if short <= 0:
                    break
            place = taken[-1] + 1 if taken and short <= 0 else place + run
            batch = [queue[p] for p in taken]
            if not batch:
                continue
            came = self._origins({unit.repo_id for unit in batch})
            failures: list[DepotError] = []
            if batch[0].variant is not None:
                gone = [self._evict_variant(batch[0])]
            else:
                gone = self._evict_revisions(batch, failures)
            done = [(unit, dataclasses.replace(eviction, at=time.time(), doing=doing, origin=came.get(unit.repo_id, "")))
                    for unit, eviction in zip(batch, gone, strict=True) if eviction is not None]  # fmt: skip
            for unit, eviction in done:
                evicted.append(eviction)
                self._said(unit, eviction, doing, writer)
                for hook in self._evicted_hooks:
                    hook(unit.repo_id)
            self._count([eviction for _, eviction in done])
            if failures:  # (what went is counted first: a failure midway lost the record of the whole batch)
                raise failures[0]
        return evicted

    def _next_batch(self, queue: list[Unit], place: int, frees: list[int]) -> int:
        """How many units of ``queue`` from ``place`` to remove next: a run of whole revisions the plan needs (the
        first units, that free ``frees`` bytes each), up to EVICTION_BATCH of them, EVICTION_BATCH_BYTES and
        EVICTION_BATCH_FILES, in one removal; else one (a variant, or a unit past the plan: it fell short, a
        removal elsewhere meanwhile, and the bytes are looked at after each)."""
        end = place + 1
        if queue[place].variant is None and place < len(frees):
            bytes_, files = frees[place], self._file_count(queue[place])
            while end < min(len(frees), place + EVICTION_BATCH) and queue[end].variant is None:
                bytes_ += frees[end]
                files += self._file_count(queue[end])
                if bytes_ > EVICTION_BATCH_BYTES or files > EVICTION_BATCH_FILES:
                    break
                end += 1
        return end - place

    def _file_count(self, unit: Unit) -> int:
        found = self.store.index.read(
            "SELECT COUNT(*) FROM files WHERE repo_id = ? AND commit_id = ?", (unit.repo_id, unit.commit_id)
        )
        return int(found[0][0])

    def _origins(self, repos: Collection[str]) -> dict[str, str]:
        """Where each of these repos came from ("import", or the upstream's URL), read before they go."""
        found: dict[str, str] = {}
        names = sorted(repos)
        for start in range(0, len(names), 500):  # (SQLite's bound on parameters)
            part = names[start : start + 500]
            for row in self.store.index.read(
                f"SELECT repo_id, origin FROM repos WHERE repo_id IN ({','.join('?' * len(part))})",
                tuple(part),
            ):
                found[row["repo_id"]] = str(row["origin"] or "")
        return found

    def _said(self, unit: Unit, eviction: Eviction, doing: str, writer: BudgetWriter | None) -> None:
        what = f"{unit.repo_id}@{unit.commit_id[:12]}" + (f" ({unit.variant})" if unit.variant else "")
        # (a pull's or an import's evictions are warned of: their commands print no list of them)
        # (room is made before a write: said, as a pull that then failed had freed the space for nothing
        # and the operator read the warning as the pull's doing after it: a trial)
        # (an exported model's eviction said "0 B", read as an eviction for nothing: an explorer's trial)
        linked = (f"; {size_text(eviction.bytes_still_linked)} more stay on disk, linked by files outside the "
                  "store (a Hugging Face cache it was exported to)" if eviction.bytes_still_linked else "")  # fmt: skip
        log.log(logging.WARNING if writer is not None else logging.INFO,
                "evicted %s (%s freed, last used %s) to stay within the disk budget (%s)%s%s", what,
                size_text(eviction.bytes_freed), time.strftime("%Y-%m-%d %H:%M", time.localtime(unit.last_used)),
                doing, linked, "; room made before the write, gone even if the write fails" if writer is not None
                else "")  # fmt: skip

    def _unreferenced_bytes(self, shared: Mapping[str, int]) -> int:
        """The bytes :meth:`_drop_unreferenced` would free now (not those linked outside the store)."""
        kept = self.kept_blobs()
        rows = self.store.index.read(
            "SELECT sha256, size FROM blobs WHERE state = 'ok' AND sha256 NOT IN (SELECT sha256 FROM files)"
        )
        return sum(row["size"] for row in rows if row["sha256"] not in kept and row["sha256"] not in shared)

    def _drop_unreferenced(self) -> int:
        """Delete the blobs no file names and no writer relies on (a content a pull handed over, whose pull then
        failed); the bytes freed."""
        from modeldepot.store.maintenance import drop_unreferenced

        freed = drop_unreferenced(self.store, self.kept_blobs)
        if freed:
            log.info("freed %s of blobs no file names (handed over by a pull that then failed) to stay within the "
                     "disk budget", size_text(freed))  # fmt: skip
        return freed

    def _evict_revisions(self, units: list[Unit], failures: list[DepotError]) -> list[Eviction | None]:
        """Remove these whole revisions, in one removal (None for each gone meanwhile: another process's); a file
        that could not be deleted is added to ``failures``."""
        from modeldepot.store.maintenance import remove_revisions  # maintenance builds on the store

        # (the blobs kept are read under the store's lock: see remove)
        results = remove_revisions(
            self.store,
            [(u.repo_id, u.commit_id) for u in units],
            keep_blobs=self.kept_blobs,
            failures=failures,
        )
        # The bytes given back to the disk (a file another name links too stays, and the budget never counted it)
        return [None if result is None else Eviction(unit.repo_id, unit.commit_id, result.bytes_freed, unit.last_used,
                                                     None, result.bytes_still_linked)
                for unit, result in zip(units, results, strict=True)]  # fmt: skip

    def _evict_variant(self, unit: Unit) -> Eviction | None:
        """Remove the own files of the variant ``unit`` names (None: it went meanwhile, or it is its revision's
        last now)."""
        from modeldepot.store.maintenance import remove_files

        assert unit.variant is not None
        try:
            held = {e.path for e in self.store.files(unit.repo_id, unit.commit_id)}
            with self._lock:  # (grouped with what pulls write into it, as the units were: eviction.py)
                written = {p for w in self._writers if (w.repo_id, w.commit_id) == (unit.repo_id, unit.commit_id)
                           for p in w.paths}  # fmt: skip
            now = self.order.grouped((unit.repo_id, unit.commit_id), held, written)
            own = next((files for _, files, aliases in now if unit.variant.lower() in aliases), None)
            if len(now) < 2 or not own or own & written:
                return None  # (the last variant goes with its revision, by the repo's last use)
            if self._before_variant_removal is not None:
                self._before_variant_removal(unit.repo_id, unit.commit_id)
            result = remove_files(self.store, unit.repo_id, unit.commit_id, own, keep_blobs=self.kept_blobs)
        except NotFoundError:
            return None  # removed meanwhile (another process)
        return Eviction(unit.repo_id, unit.commit_id, result.bytes_freed, unit.last_used, unit.variant,
                        result.bytes_still_linked)  # fmt: skip

    def _count(self, evictions: list[Eviction]) -> None:
        """Count these evictions in the index, and keep them in its history (one write)."""
        if not evictions:
            return
        with self.store.index.write("counting evictions") as con:
            freed = sum(eviction.bytes_freed for eviction in evictions)
            for key, amount in (("evictions", len(evictions)), ("evicted_bytes", freed)):
                con.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                    "value = CAST(CAST(value AS INTEGER) + CAST(excluded.value AS INTEGER) AS TEXT)",
                    (key, str(amount)),
                )
            con.executemany(
                "INSERT INTO evictions (at, repo_id, commit_id, variant, bytes_freed, bytes_still_linked, last_used, "
                "doing, pid, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.at, e.repo_id, e.commit_id, e.variant, e.bytes_freed, e.bytes_still_linked, e.last_used,
                  e.doing[:300], os.getpid(), e.origin) for e in evictions],
            )  # fmt: skip
            con.execute("DELETE FROM evictions WHERE rowid <= (SELECT MAX(rowid) FROM evictions) - ?",
                        (EVICTIONS_KEPT,))  # fmt: skip

    def history(self, repo_id: str | None = None, limit: int = 20) -> list[Eviction]:
        """The latest evictions, newest first (of ``repo_id``'s revisions and variants only, when given): what
        went, when, and for what (the newest EVICTIONS_KEPT are kept)."""
        if self.store.index.schema < 15:  # (a store read where it cannot be upgraded: no history there yet)
            return []
        where, params = ("WHERE repo_id = ? COLLATE NOCASE", (repo_id,)) if repo_id is not None else ("", ())
        rows = self.store.index.read(
            "SELECT at, repo_id, commit_id, variant, bytes_freed, bytes_still_linked, last_used, doing, origin "
            "FROM evictions "
            f"{where} ORDER BY at DESC, rowid DESC LIMIT ?", (*params, max(0, limit)),
        )  # fmt: skip
        return [Eviction(r["repo_id"], r["commit_id"], r["bytes_freed"], r["last_used"], r["variant"],
                         r["bytes_still_linked"], r["at"], r["doing"], r["origin"]) for r in rows]  # fmt: skip

    def forget_history(self, repo_id: str, commit_id: str | None = None) -> None:
        """Forget the evictions of ``repo_id`` (of one commit of it): it was removed by hand, and is not the
        budget's doing any more (a repo evicted once, imported again and removed was "evicted by the disk
        budget" for good: a review)."""
        if self.store.index.schema < 15 or self.store.read_only:
            return
        where, params = ("AND commit_id = ?", (commit_id,)) if commit_id is not None else ("", ())
        with self.store.index.write("forgetting evictions") as con:
            con.execute(f"DELETE FROM evictions WHERE repo_id = ? COLLATE NOCASE {where}", (repo_id, *params))


def _beyond(amount: int, contents: Mapping[str, int], mine: Mapping[str, int]) -> int:
    """Of ``amount`` bytes held for ``contents``, those not for contents in ``mine`` too."""
    if not mine or not contents:
        return amount
    return max(0, amount - sum(size for key, size in contents.items() if key in mine))


class BudgetWriter:
    """One import or pull writing a repo under the budget (:meth:`DiskBudget.writing`)."""

    def __init__(self, budget: DiskBudget, repo_id: str, commit_id: str | None = None,
                 paths: Iterable[str] = (), variants: Iterable[str] = ()) -> None:  # fmt: skip
        self.budget, self.repo_id, self.commit_id = budget, repo_id, commit_id
        self.paths = frozenset(paths)  # the files it writes into ``commit_id``
        self.variants = frozenset(variants)  # the variants whose status rows it marks downloading
        self.reused: set[str] = set()  # blobs (SHA-256) it found in the store and relies on
        self.reserved = 0  # bytes it made room for
        # A pull's new contents (key -> size): another pull of them shares their downloads, and its room
        self.contents: dict[str, int] = {}
        self.branch: str | None = None  # a pull's: the branch it moves to ``commit_id``
        self.started = time.time()  # (what was used since is not evicted for it)
        self._reservation: Reservation | None = None  # its room, as other processes see it
        self._listed: set[str] = set()  # the contents its reservation names

    def reserve(self, amount: int) -> None:
        """Show other processes the room this writer holds (``amount`` bytes in all; 0: none) and the blobs
        it relies on."""
        if self._reservation is None:
            if amount or self.reused:
                self._reservation = self.budget.reservations.hold(
                    self.repo_id, amount, self.contents, sorted(self.reused)
                )
                self._listed = set(self.contents)
        elif amount or self.reused:
            self._reservation.set(amount)
            # (contents known since it was made: a pull relies on blobs before it knows what it fetches)
            unlisted = {key: size for key, size in self.contents.items() if key not in self._listed}
            self._reservation.add_contents(unlisted)
            self._listed.update(unlisted)
        else:
            self.release()

    def release(self) -> None:
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    def published(self) -> None:
        """What it wrote is in the index now, counted as used: the room it held is held no more (counted
        twice meanwhile, by every other process, it made one evict the model just published: a review)."""
        with self.budget._lock:
            self.budget._reserved -= self.reserved
            self.reserved = 0
            self.release()

    def written_early(self, size: int) -> None:
        """``size`` bytes of its room are in the index now, ahead of its publish (a blob a pull handed over to
        another that waited for it: transfer/pull.py, relied on first with :meth:`reuse`): held no more, or
        every process counts them twice until it publishes."""
        with self.budget._lock:
            taken = min(size, self.reserved)
            if not taken:
                return
            self.reserved -= taken
            self.budget._reserved -= taken
            if self._reservation is not None:
                try:
                    self._reservation.set(self.reserved)
                except OSError as error:  # (other processes count the room a while longer: no harm)
                    log.debug("the room %s holds is not lowered for other processes: %s", self.repo_id, error)

    def reuse(self, sha256s: Iterable[str]) -> None:
        """Keep these blobs of the store while it writes: an eviction of a revision using them, in any process,
        leaves them (blocking: a reservation file is written)."""
        with self.budget._lock:
            new = set(sha256s) - self.reused
            # (nothing for a writer that ended: a cancelled pull's thread ran this after it left, and its
            # reservation, never let go of, kept the blobs from every eviction and gc for the process's life)
            if not new or self not in self.budget._writers:
                return
            self.reused |= new
            self.budget._reused.update(new)
            try:
                if self._reservation is None:
                    self.reserve(self.reserved)
                else:
                    self._reservation.add_reused(sorted(new))
            except OSError as error:
                # (kept in this process all the same; a full disk failed an import of contents the store
                # held with a traceback, as make_room's bookkeeping never does without a budget)
                if self.budget.max_bytes is not None:
                    raise os_error(error, f"holding room in the disk budget for {self.repo_id}") from error
                log.debug("the blobs %s relies on are not named to other processes: %s", self.repo_id, error)

    def check_fits(self, needed: int, doing: str) -> None:
        """:meth:`DiskBudget.check_fits` for this writer: refuse early, evict nothing."""
        self.budget.check_fits(needed, doing, self)

    def make_room(self, needed: int, doing: str, disk_short: int = 0) -> list[Eviction]:
        """:meth:`DiskBudget.make_room` for this writer; the room stays reserved until it ends."""
        return self.budget.make_room(needed, doing, self, disk_short)

    def keep_within(self) -> list[Eviction]:
        """Once this writer published: if the store is above its budget, evict the least recently used
        revisions that may go (never what this writer wrote), as far as it can. Writers in other processes make
        room each for itself (a reservation is one process's): three pulls started together into the last
        room all fit, and the store stayed above its budget for good. Blocking: off an event loop."""
        budget = self.budget
        self.published()  # (when publish did not say so already)
        limit = budget.max_bytes
        if limit is None or budget._all_bytes() <= limit:
            return []  # (and when the shared bytes are what is over, _evict_to says so at once)
        evicted = budget._evict_to(limit, 0, f"keeping within the disk budget after writing {self.repo_id}", self,
                                   partial=True)  # fmt: skip
        left = budget._all_bytes()
        if (
            left > limit and (left := budget.used_bytes()) > limit
        ):  # (a budget lowered while this wrote, or what is pinned or in use)
            log.warning("the store takes %s, over its disk budget of %s, after writing %s: what is pinned, in use "
                        "or just written is kept; the next write evicts again", size_text(left), size_text(limit),
                        self.repo_id)  # fmt: skip
        return evicted
