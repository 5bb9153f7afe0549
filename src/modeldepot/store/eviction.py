"""The order in which the disk budget evicts (store/budget.py): what may go, least recently used first, and
the bytes that stay once it has gone.

The units are revisions, and the variants of a revision that holds several (told apart by the
:data:`Variants` the depot gives: the store knows none itself). The last use of a revision is the later of its
creation and its own last use (a read through a branch is a use of the commit the branch names); of a variant, the
later of its revision's creation and the variant's own last use, by any of its names. A revision that is
kept (pinned, in use) but whose every variant may go keeps one, its most recently used, so that the bytes
that stay are counted right and what cannot fit is refused before anything is removed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modeldepot.store.access import CLOCK_SLACK

if TYPE_CHECKING:
    from modeldepot.store.store import Store

__all__ = ["EvictionOrder", "Kept", "Unit", "Variants", "ok_bytes", "shared_blobs"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
FORMER = "0.1:"  # marks a variant's former name among its aliases (hub.variants.variants_own_files writes it)
PRUNE_TRIALS = 32  # walks of a plan again, at most, to take out what the bytes freed do not need

Variants = Callable[[list[str]], list[tuple[str, frozenset[str], frozenset[str]]]]
"""The variants among a revision's files: (name, its own files (those no other variant lists), the names in
lower case a pin or a use of it may have been recorded under)."""


@dataclass(frozen=True)
class Unit:
    """What one eviction removes: a revision, or one variant's own files of it."""

    repo_id: str
    commit_id: str
    last_used: float
    variant: str | None = None
    files: frozenset[str] = field(default_factory=frozenset)
    aliases: frozenset[str] = field(default_factory=frozenset)  # (lower case)


@dataclass
class Kept:
    """What no eviction may remove now."""

    commits: set[tuple[str, str]]  # revisions kept whole
    repos: set[str]  # repos every revision of which is kept whole
    # Revisions that stay, but whose variants may go but for these files (a variant's pin, files in use)
    parts: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    pinned_variants: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (lower case)
    # Revisions a pull is writing files into (the files in ``parts``): their variants are told apart with
    # those files too, so the one being written is in use, and one held may go for another that comes
    written: set[tuple[str, str]] = field(default_factory=set)


def _in_the_past() -> Callable[[float], float]:
    """A recorded time as eviction counts it: one ahead of the clock now (by more than CLOCK_SLACK) was taken
    under a clock that has been set back since (a box that booted with its clock ahead, then met NTP): a
    minute ago, recent but before any write now under way. Taken at its word, each such model counted as
    used during every write after it, was never evicted, and the model just pulled went in its place (an
    explorer's trial); taken as never used, the box's working set went before models unused for a month
    (review 41). The next record of uses sets such times to the moment it is noticed (store/access.py)."""
    now = time.time()
    return lambda recorded: recorded if recorded <= now + CLOCK_SLACK else now - CLOCK_SLACK


class EvictionOrder:
    """The units of one store and what stays; ``variants`` set: revisions go variant by variant."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.variants: Variants | None = None  # without: revisions go whole
        self._grouped: dict[
            tuple[str, str, frozenset[str]], list[tuple[str, frozenset[str], frozenset[str]]]
        ] = {}

    def units(self, kept: Kept, flush: bool = True) -> list[Unit]:
        """What may go, least recently used first (ties: a variant before its revision, revisions no ref
        names, then the oldest), the other revisions of a repo a pull writes last of all: revisions, and the
        variants of those that hold several. ``flush``: this process's uses not yet written count too (one
        write)."""
        if flush:
            self.store.access.flush_for_a_read()
        past = _in_the_past()
        variant_access: dict[tuple[str, str], float] = {}
        for row in self.store.index.read(
            "SELECT repo_id, variant, last_access FROM access WHERE variant != ''"
        ):
            key = (row["repo_id"], row["variant"].lower())
            variant_access[key] = max(variant_access.get(key, 0.0), past(row["last_access"]))
        revision_access = {key: past(used) for key, used in self.store.access.revision_uses().items()}
        named = {
            (r["repo_id"], r["commit_id"])
            for r in self.store.index.read("SELECT repo_id, commit_id FROM refs")
        }
        paths: dict[tuple[str, str], list[str]] = {}  # (one read for every revision's files)
        if self.variants is not None:
            for row in self.store.index.read("SELECT repo_id, commit_id, path FROM files"):
                paths.setdefault((row["repo_id"], row["commit_id"]), []).append(row["path"])
        # The other revisions of a repo a pull writes go last: should the pull fail, the revision it was to
        # replace is still there (they go when nothing else can, or once the pull published: keep_within).
        written = {key[0] for key in kept.written}
        found: list[tuple[bool, float, bool, float, bool, Unit]] = []
        for row in self.store.index.read("SELECT repo_id, commit_id, created_at FROM revisions"):
            key = (row["repo_id"], row["commit_id"])
            if key in kept.commits or row["repo_id"] in kept.repos:
                continue
            # Each revision counts its own uses, whatever names it: a read through a branch is one of the commit
            # the branch names, and a read by commit id one of that commit (a deployment pinned to an old commit
            # read it daily, and the repo's uses kept alive the commit its branch had moved to, pulled once and
            # never read, while the old one went: a review).
            created = past(row["created_at"])
            last_used = max(created, revision_access.get(key, 0.0))
            replaced = key[0] in written and key not in kept.written
            if key not in kept.parts and key not in kept.pinned_variants:
                found.append((replaced, last_used, key in named, created, True, Unit(*key, last_used)))
            for unit in self._variant_units(key, paths.get(key, []), created, kept, variant_access):
                found.append((replaced, unit.last_used, key in named, created, False, unit))
        found.sort(key=lambda f: (*f[:5], f[5].repo_id, f[5].commit_id, f[5].variant or ""))
        return [f[5] for f in found]

    def _variant_units(self, key: tuple[str, str], paths: list[str], created: float, kept: Kept,
                       variant_access: dict[tuple[str, str], float]) -> list[Unit]:  # fmt: skip
        """The variants of a revision (of these files) that holds several which may go: not pinned, none
        of their files in use. A revision a pull writes into is grouped with the files it writes: the
        variant it writes is in use (a split GGUF's first shard stays while the next is fetched), and a
        variant it holds may go for another that comes (not for a README)."""
        if self.variants is None:
            return []
        variants = self.grouped(key, paths, kept.parts.get(key, set()) if key in kept.written else set())
        if len(variants) < 2:
            return []
        in_use, pinned = kept.parts.get(key, set()), kept.pinned_variants.get(key, set())
        # (a pin under a name no variant answers to now: one 0.1 gave, which keeps the variants it named then;
        # their former names are among their aliases as FORMER + name, which no name typed matches)
        former = {
            FORMER + name for name in pinned - {alias for _, _, aliases in variants for alias in aliases}
        }
        units = []
        for name, files, aliases in variants:
            if former & aliases:
                continue
            if files and not aliases & pinned and not files & in_use:
                used = max([created, *(variant_access.get((key[0], alias), 0.0) for alias in aliases)])
                units.append(Unit(*key, used, name, files, aliases))
        if len(units) == len(variants) and (key in kept.parts or key in kept.pinned_variants):
            # A revision kept (in use, or a pin that names none of its variants now: its branch moved) whose
            # every variant may go: its last stays with it, the most recently used, as least-recently-used
            # order would leave it; counted as staying, so that what cannot fit is refused before a removal.
            units.remove(max(units, key=lambda u: (u.last_used, u.variant or "")))
        return units

    def grouped(self, key: tuple[str, str], held: Iterable[str], written: Iterable[str] = ()
                ) -> list[tuple[str, frozenset[str], frozenset[str]]]:  # fmt: skip
        """The variants of a revision's files, with the files a pull writes into it (each variant's own files
        among them: those a removal of it would take are the held ones)."""
        assert self.variants is not None
        paths = frozenset(held) | frozenset(written)
        if len(paths) < 2:
            return []
        grouped = (key[0], key[1], paths)  # (the files a commit holds change: rm, a pull)
        variants = self._grouped.get(grouped)
        if variants is None:
            if len(self._grouped) >= 10_000:
                self._grouped.clear()
            variants = self._grouped[grouped] = self.variants(sorted(paths))
        return variants

    def bytes_of(self, revisions: Iterable[tuple[str, str]], repos: Iterable[str] = (),
                 blobs: Iterable[str] = (), shared: Mapping[str, int] | None = None) -> int:  # fmt: skip
        """The bytes of the distinct blobs the revisions (and every revision of ``repos``) use, and of
        ``blobs`` (SHA-256s); not of quarantined ones (their files are out of the store, as in
        :meth:`DiskBudget.used_bytes`), nor of the ``shared`` ones (:func:`shared_blobs`)."""
        keys, whole, extra = sorted(set(revisions)), sorted(set(repos)), sorted(set(blobs))
        if not keys and not whole and not extra:
            return 0
        values = ",".join(["(?, ?)"] * len(keys)) or "(NULL, NULL)"
        marks, extra_marks = ",".join("?" * len(whole)), ",".join("?" * len(extra))
        rows = self.store.index.read(
            f"WITH kept (repo_id, commit_id) AS (VALUES {values}) "
            "SELECT sha256, size FROM blobs WHERE state = 'ok' AND (sha256 IN (SELECT f.sha256 "
            f"FROM files f WHERE f.repo_id IN ({marks}) OR EXISTS (SELECT 1 FROM kept k WHERE k.repo_id = "
            f"f.repo_id AND k.commit_id = f.commit_id)) OR sha256 IN ({extra_marks}))",
            (*(part for key in keys for part in key), *whole, *extra),
        )
        shared = shared or {}
        return sum(int(row["size"]) for row in rows if row["sha256"] not in shared)

    def staying_blobs(self, units: list[Unit], blobs: Iterable[str] = ()) -> set[str]:
        """The blobs that stay whatever of ``units`` goes (a file outside them uses each: a pinned or
        in-use revision's, a repo being written), and ``blobs``."""
        whole = {(u.repo_id, u.commit_id) for u in units if u.variant is None}
        parts: dict[tuple[str, str], set[str]] = {}
        for unit in units:
            if unit.variant is not None:
                parts.setdefault((unit.repo_id, unit.commit_id), set()).update(unit.files)
        staying = set(blobs)
        for row in self.store.index.read("SELECT repo_id, commit_id, path, sha256 FROM files"):
            key = (row["repo_id"], row["commit_id"])
            if key not in whole and row["path"] not in parts.get(key, ()):
                staying.add(row["sha256"])
        return staying

    def plan(self, units: list[Unit], staying: set[str], used: int, limit: int) -> list[tuple[Unit, int]]:
        """What evicting ``units`` in order until ``used`` bytes are down to ``limit`` would remove, and the
        bytes each would free (a blob goes with the last file that uses it; ``staying`` ones never go), as
        the evictions themselves go: a unit that frees nothing is passed over, and a revision's last variant
        goes with its revision. Nothing is removed. (:meth:`choose` is the same, with what the plan went past.)"""
        return self.choose(units, staying, used, limit)[0]

    def choose(self, units: list[Unit], staying: set[str], used: int, limit: int,
               written: Mapping[tuple[str, str], Iterable[str]] | None = None
               ) -> tuple[list[tuple[Unit, int]], list[Unit]]:  # fmt: skip
        """:meth:`plan`, and the units after those it went through (what may go next, should the plan fall short
        of ``limit`` as it is carried out: a removal meanwhile elsewhere).

        Least recently used first, but no removal that the bytes freed do not need: where units share blobs (two
        repos of the same files, a quant in two revisions), the first freed nothing and went all the same, a
        whole repo lost for the 8 MiB the next unit freed (an explorer's trial). Once the plan reaches ``limit``
        (or frees all it can), each unit is taken out again, the most recently used first, when what the others
        free is still enough: the one whose blob the next freed stays in, and the small ones a big one that had to
        go anyway made needless (a GGUF repo's Q4_K_M and Q8_0 went before its F16, which alone was enough: the
        budget left the store empty, an explorer's trial).
        ``written``: the files writers write into revisions (grouped with them, as the units were)."""
        files: dict[tuple[str, str], dict[str, str]] = {(u.repo_id, u.commit_id): {} for u in units}
        for row in self.store.index.read("SELECT repo_id, commit_id, path, sha256 FROM files"):  # (one read)
            held = files.get((row["repo_id"], row["commit_id"]))
            if held is not None:
                held[row["path"]] = row["sha256"]
        counted: dict[str, int] = {}  # blob -> the files of the units' revisions that use it
        for held in files.values():
            for sha256 in held.values():
                counted[sha256] = counted.get(sha256, 0) + 1
        sizes = ok_sizes(self.store, counted)
        writing = written or {}
        planned, went_through = self._carry_out(units, files, sizes, staying, used, limit, writing, counted)
        goal = min(used - limit, sum(freed for _, freed in planned))

        def carried(trial: list[Unit]) -> list[tuple[Unit, int]]:
            return self._carry_out(trial, files, sizes, staying, used, None, writing, counted)[0]

        def freeing(trial: list[Unit]) -> int:
            return sum(freed for _, freed in carried(trial))

        # (each trial walks the plan again: a bounded number of them, the most recently used first, or a store of
        # 3000 copies of one model took 13 s under the budget's lock to plan, a review)
        trials = PRUNE_TRIALS

        def pruned(trial: list[Unit], only: Collection[int] | None = None) -> list[Unit]:
            """``trial`` without the units the others make needless (those that free nothing first). Of a trial
            that frees enough, only a unit that frees no more than it frees beyond the goal is tried: one that
            frees more is needed, or another that holds its blobs would free them in its place, which LRU order
            does not prefer (a walk each: 3000 revisions took 0.9 s to plan, trying them all). ``only``: the
            ids of the units to try (the others were tried already)."""
            nonlocal trials
            walked = carried(trial)
            beyond = sum(freed for _, freed in walked) - goal
            for unit, freed in sorted(reversed(walked), key=lambda unit_freed: unit_freed[1] != 0):
                if only is not None and id(unit) not in only:
                    continue
                if len(trial) > 1 and trials > 0 and (beyond < 0 or freed <= beyond):
                    trials -= 1
                    if (left := freeing(without := [u for u in trial if u is not unit])) >= goal:
                        trial, beyond = without, left - goal
            return trial

        chosen = pruned([unit for unit, _ in planned])
        # A revision that went whole where some of its variants are what the bytes freed need: its F16, which
        # went as the revision's last once its other quants had gone before it, alone; or its copy of the quant
        # the next unit frees (its other variant went before it, and made that one its last)
        variants_of: dict[tuple[str, str], list[Unit]] = {}
        for unit in units:
            if unit.variant is not None:
                variants_of.setdefault((unit.repo_id, unit.commit_id), []).append(unit)
        # (only revisions with variants, tested first: a plan of 10,000 one-model revisions took 9 s, a review)
        wholes = [u for u in chosen if u.variant is None and (u.repo_id, u.commit_id) in variants_of]
        as_planned = {id(unit): freed for unit, freed in carried(chosen)} if wholes else {}
        total, taken = sum(as_planned.values()), {id(u) for u in chosen} if wholes else set[int]()
        for revision in wholes:
            if trials <= 0:
                break
            whole_freed = as_planned.get(id(revision), 0)
            if id(revision) not in taken or (whole_freed and total - goal <= 0):
                continue  # (gone from the plan; or every byte it frees is needed: none of its variants could stay)
            its = [v for v in variants_of[(revision.repo_id, revision.commit_id)] if id(v) not in taken]
            if not its:
                continue
            trials -= 2  # (the walks of the trial as it is, and of the trial pruned)
            trial = pruned(
                [part for u in chosen for part in (its if u is revision else [u])], {id(v) for v in its}
            )
            # (less given back; or as much, where the revision whole freed nothing itself: a variant's files go,
            # not a repo lost for no byte)
            trial_freed = freeing(trial)
            if trial_freed >= goal and (trial_freed, whole_freed != 0) < (total, True):
                chosen = trial
                as_planned = {id(unit): freed for unit, freed in carried(chosen)}
                total, taken = sum(as_planned.values()), {id(u) for u in chosen}
        if chosen != [unit for unit, _ in planned]:
            planned = self._carry_out(chosen, files, sizes, staying, used, None, writing, counted)[0]
        return planned, units[went_through:]

    def _carry_out(self, units: list[Unit], files: dict[tuple[str, str], dict[str, str]], sizes: dict[str, int],
                   staying: set[str], used: int, limit: int | None, written: Mapping[tuple[str, str], Iterable[str]],
                   counted: Mapping[str, int]) -> tuple[list[tuple[Unit, int]], int]:  # fmt: skip
        """The units evicting ``units`` in order would remove (until ``used`` is down to ``limit``; None: all of
        them), with the bytes each frees, and how many of ``units`` it went through."""
        held_now: dict[tuple[str, str], dict[str, str]] = {}  # (as the plan goes: copied when touched)
        users = dict(counted)  # blob -> files of the units' revisions that use it, as the plan goes
        planned: list[tuple[Unit, int]] = []
        went_through = 0
        for unit in units:
            if limit is not None and used <= limit:
                break
            went_through += 1
            key = (unit.repo_id, unit.commit_id)
            held = held_now.get(key)
            if held is None:
                held = held_now[key] = dict(files[key])
            if unit.variant is None:
                going = dict(held)
            else:  # (as DiskBudget._evict_variant judges: among the files left, a last variant goes with its revision,
                # config and tokenizer too: the preview said they stayed, a trial)
                now = self.grouped(key, held, written.get(key, ())) if self.variants is not None else []
                own = next((mine for _, mine, aliases in now if unit.variant.lower() in aliases), None)
                if len(now) < 2 or not own:
                    continue
                going = {p: s for p, s in held.items() if p in own}
            if not going:
                continue  # (gone with a variant before)
            if set(going.values()) <= staying:
                continue
            freed = 0
            for path, sha256 in going.items():
                del held[path]
                users[sha256] -= 1
                if users[sha256] == 0 and sha256 not in staying:
                    freed += sizes.get(sha256, 0)
            planned.append((unit, freed))
            used -= freed
        return planned, went_through

    def frees_nothing(self, unit: Unit, staying: set[str]) -> bool:
        """Whether removing ``unit`` would free no byte: each of its blobs stays (:meth:`staying_blobs`)."""
        entries = self.store.files(unit.repo_id, unit.commit_id)
        used = {e.sha256 for e in entries if unit.variant is None or e.path in unit.files}
        return bool(used) and used <= staying

    def kept_bytes(self, kept: Kept, units: list[Unit] | None = None, blobs: Iterable[str] = (),
                   flush: bool = True, shared: Mapping[str, int] | None = None) -> int:  # fmt: skip
        """The bytes of the distinct blobs that stay when every unit that may go has gone (``units``, or
        worked out here when some are needed): those of the revisions ``kept`` keeps, but for their variants
        that may go, and ``blobs``."""
        partly = {key for key in (*kept.parts, *kept.pinned_variants)
                  if key not in kept.commits and key[0] not in kept.repos}  # fmt: skip
        if not partly:
            return self.bytes_of(kept.commits, kept.repos, blobs, shared)
        going: dict[tuple[str, str], set[str]] = {}
        for unit in self.units(kept, flush) if units is None else units:
            if unit.variant is not None:
                going.setdefault((unit.repo_id, unit.commit_id), set()).update(unit.files)
        staying = set(blobs)
        for key in sorted(partly):
            staying.update(e.sha256 for e in self.store.files(*key) if e.path not in going.get(key, set()))
        return self.bytes_of(kept.commits, kept.repos, staying, shared)


def shared_blobs(store: Store) -> dict[str, int]:
    """The store's blobs that another name outside it links too (an adopted Hugging Face cache's file, an
    `import --link` folder's), with their sizes: on the disk whether the store keeps them or not, so the disk
    budget neither counts them nor evicts them to make room (evicting an adopted model freed nothing: a
    trial). One look at each blob file.

    Only a blob that came in by a link (``linked_sources``) is so: one the store wrote, and then exported to a
    Hugging Face cache by a hard link, is the store's, counted and evicted (the cache keeps its link); taken
    for shared, exports took a store past its budget with `budget` saying 0% used (a trial). (The blobs an
    upgraded store had linked in before it recorded such links are noted as linked in, their files unknown;
    a store read where it cannot be upgraded, of a schema before 9 or not noted yet, cannot tell: every blob
    linked elsewhere is shared. Asked for its records, a read-only store of schema 8 failed every `du`,
    `budget` and scrape of its node's metrics: an explorer's trial.)"""
    shared: dict[str, int] = {}
    folder = str(store.layout.blobs)
    linked_in = (
        None if store.index.schema < 9 or store.index.setting("links_unrecorded") == "1"
        else {row["sha256"] for row in store.index.read("SELECT sha256 FROM linked_sources")}
    )  # fmt: skip
    for sha256, size in store.index.read("SELECT sha256, size FROM blobs WHERE state = 'ok'"):
        if _SHA256.fullmatch(sha256) is None or (linked_in is not None and sha256 not in linked_in):
            continue  # (the store's own; or a row no write makes, no path built from it)
        try:  # (a string path, one stat: Path objects and checks per blob took 19 us of its 25)
            if os.stat(f"{folder}/{sha256[:2]}/{sha256}", follow_symlinks=False).st_nlink > 1:
                shared[sha256] = int(size)
        except OSError:
            continue
    return shared


def ok_sizes(store: Store, blobs: Iterable[str]) -> dict[str, int]:
    """The sizes of those of ``blobs`` the store holds (not quarantined), by SHA-256."""
    wanted, found = sorted(blobs), dict[str, int]()
    for start in range(0, len(wanted), 500):  # (SQLite's bound on parameters)
        part = wanted[start : start + 500]
        found.update((r["sha256"], int(r["size"])) for r in store.index.read(
            f"SELECT sha256, size FROM blobs WHERE state = 'ok' AND sha256 IN ({','.join('?' * len(part))})",
            tuple(part)))  # fmt: skip
    return found


def ok_bytes(store: Store, blobs: Iterable[str]) -> int:
    """The bytes of those of ``blobs`` the store holds (not quarantined)."""
    return sum(ok_sizes(store, blobs).values())
