"""Pins: what the disk budget never evicts (store/budget.py), kept in the store's index (the ``pins`` table),
so every process on the store keeps them.

A pin names a repo, a revision (a branch, followed: the commit it names when evicting; or a commit id) and
maybe one variant (a GGUF repo's quant, an ONNX repo's precision: told apart by the hub layer, through the
eviction order's :data:`~modeldepot.store.eviction.Variants`). A pin of one variant keeps that variant and the
revision's shared files, and lets its other variants go. While an update of a pinned branch is pulled a variant
at a time, the commit the branch named before stays, until the update holds what it held.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modeldepot.errors import NotFoundError
from modeldepot.store.eviction import EvictionOrder, Kept
from modeldepot.store.models import _Record
from modeldepot.validation import validate_quant, validate_repo_id, validate_revision

if TYPE_CHECKING:
    from modeldepot.store.store import Store

__all__ = ["Pin", "Pins"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pin(_Record):
    repo_id: str
    quant: str | None  # None: the whole repo
    revision: str  # a branch (followed: the revision it names when evicting) or a commit id
    created_at: float


class Pins:
    """The pins of one store."""

    def __init__(self, store: Store, order: EvictionOrder) -> None:
        self.store = store
        self.order = order
        # Whether the store holds every file of a commit (by its listing, the hub layer's): a pinned branch's
        # commit held whole lets the one it replaced go (DiskBudget.judge_whole_by)
        self.holds_whole: Callable[[str, str], bool] | None = None

    def pin(self, repo_id: str, quant: str | None = None, revision: str = "main") -> Pin:
        """Keep the revision ``revision`` names (a branch is followed) from eviction. The repo must be in the
        store (``quant``, a variant's name, is checked by the caller: variants are the hub layer's)."""
        validate_repo_id(repo_id)
        validate_revision(revision)
        commit_id = self.store.resolve(repo_id, revision)  # raises RepoNotFoundError / RevisionNotFoundError
        if not self.store.index.read(
            "SELECT 1 FROM refs WHERE repo_id = ? AND name = ?", (repo_id, revision)
        ):
            revision = commit_id  # (the start of a commit id names that commit: kept whole, not as typed)
        if quant is not None:
            validate_quant(quant)
        with self.store.index.write(f"pinning {repo_id}") as con:
            con.execute(
                "INSERT INTO pins (repo_id, variant, revision, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (repo_id, variant, revision) DO NOTHING",
                (repo_id, quant or "", revision, time.time()),
            )
            # (a pin made again keeps the time it was first made)
            created_at = con.execute(
                "SELECT created_at FROM pins WHERE repo_id = ? AND variant = ? AND revision = ?",
                (repo_id, quant or "", revision),
            ).fetchone()[0]
        log.info("pinned %s%s@%s", repo_id, f" ({quant})" if quant else "", revision)
        return Pin(repo_id, quant, revision, float(created_at))

    def unpin(self, repo_id: str, quant: str | None = None, revision: str = "main") -> bool:
        """Remove a pin; False when there was none."""
        validate_repo_id(repo_id)
        validate_revision(revision)
        if quant is not None:
            validate_quant(quant)
        with self.store.index.write(f"unpinning {repo_id}") as con:
            removed = con.execute(
                "DELETE FROM pins WHERE repo_id = ? AND variant = ? AND revision = ?",
                (repo_id, quant or "", revision),
            ).rowcount
        return bool(removed)

    def all(self, repo_id: str | None = None) -> list[Pin]:
        """The pins (of ``repo_id`` alone, given one), by repo, variant and revision."""
        where, params = ("WHERE repo_id = ?", (repo_id,)) if repo_id is not None else ("", ())
        rows = self.store.index.read(
            f"SELECT repo_id, variant, revision, created_at FROM pins {where} ORDER BY repo_id, variant, revision",
            params,
        )
        return [Pin(r["repo_id"], r["variant"] or None, r["revision"], r["created_at"]) for r in rows]

    def commits(self, repo_id: str) -> set[str]:
        """The commits of ``repo_id`` its pins keep (a pinned branch's, and the one before it while an update
        pulled a variant at a time lacks a variant that one held)."""
        return {commit for _, commit in self.by_revision(repo_id)}

    def by_revision(self, repo_id: str | None = None) -> dict[tuple[str, str], set[str]]:
        """(repo, commit) -> what is pinned in it: variants' names in lower case, '' for the whole repo (of
        ``repo_id``'s pins alone, given one)."""
        pinned: dict[tuple[str, str], set[str]] = {}
        for pin in self.all(repo_id):
            try:
                key = (pin.repo_id, self.store.resolve(pin.repo_id, pin.revision))
            except NotFoundError:
                continue  # the pin names a branch or repo no longer in the store: nothing to keep
            pinned.setdefault(key, set()).add((pin.quant or "").lower())
            if pin.revision != key[1]:
                earlier = self._held_before(pin.repo_id, key[1], pin.created_at, pin.quant)
                if earlier is not None:
                    pinned.setdefault((pin.repo_id, earlier), set()).add((pin.quant or "").lower())
        return pinned

    def _held_before(
        self, repo_id: str, commit_id: str, pinned_at: float, quant: str | None = None
    ) -> str | None:
        """The newest revision older than ``commit_id`` that holds a variant (a file, without the variants'
        hook) it lacks: the commit a pinned branch named before a pull of some variants of an update moved it.
        A pin of the whole model keeps that one too, until the update holds all it held (a `pull --quant fp16`
        of an update left the pin on fp16 alone, and the next write evicted the pinned fp32 and q4: a trial).
        ``quant``: a pin of that variant alone, which keeps the newest such revision that holds it, until the
        update does (a pull of another quant of the update moved the branch, and the pinned quant went at the
        next write, the pin still listed: an explorer's trial)."""

        def held(commit: str) -> set[str]:
            paths = list(self.store.file_sizes(repo_id, commit))
            if self.order.variants is None:
                return set(paths)
            return {
                alias for name, _, aliases in self.order.variants(paths) for alias in (name.lower(), *aliases)
            }

        if quant is not None and self.order.variants is None:
            return None  # (no variants told apart here: the pin keeps its commit whole)
        if self.holds_whole is not None and self.holds_whole(repo_id, commit_id):
            return None  # (an update that dropped a variant upstream is the model now)
        revisions = self.store.revisions(repo_id)
        newer = next((when for commit, when in revisions if commit == commit_id), None)
        if newer is None:
            return None
        now = held(commit_id)
        wanted = quant.lower() if quant is not None else None
        if wanted is not None and wanted in now:
            return None
        # The revisions the branch may have named since the pin: from the newest made before it (the one the
        # branch named then, the store keeping no history of its refs) on. Not a commit pulled in part by its
        # id before, which the branch never named, kept for as long as the branch lacked its quant (a review),
        # unless held whole; nor only those held whole: a branch pulled a quant at a time lost its pinned one
        # (a review).
        since = max((when for _, when in revisions if when <= pinned_at), default=0.0)
        for commit, when in revisions:
            if commit == commit_id or when > newer:
                continue
            named = when >= since or self.holds_whole is None or self.holds_whole(repo_id, commit)
            if named and (wanted in held(commit) if wanted is not None else held(commit) - now):
                return commit
        return None

    def kept(self) -> Kept:
        """What the pins alone keep."""
        kept = Kept(commits=set(), repos=set())
        for key, variants in self.by_revision().items():
            if "" in variants or self.order.variants is None:
                kept.commits.add(key)
            else:
                kept.pinned_variants[key] = variants
        return kept
