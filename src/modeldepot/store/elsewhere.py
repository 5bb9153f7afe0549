"""What other processes map or hold open of a store's blobs (a model a notebook loaded, a file a worker
reads), seen from ``/proc``: the disk budget keeps those revisions as it keeps this process's own models
(store/budget.py), as evicting one frees nothing until they let go, and they fetch it again once it is gone.

A look reads every process's maps and descriptors (store/holders.py), 24 ms with 300 idle processes and up to
0.7 s with fd-heavy ones: :class:`HeldElsewhere` keeps the last look for the evictions of a second, and for
a few seconds for the figures a node is asked for often.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from modeldepot.store.holders import (
    BLOB_FILE,
    LETTING_GO,
    files_held_elsewhere,
    process_command,
    processes_letting_go,
    sent_by,
)

if TYPE_CHECKING:
    from modeldepot.store.store import Store

__all__ = ["ELSEWHERE_FRESH", "FIGURES_FRESH", "HeldElsewhere", "blobs_held_elsewhere", "revisions_naming"]

ELSEWHERE_FRESH = 1.0  # seconds a look at what other processes map or hold open answers an eviction
FIGURES_FRESH = (
    5.0  # seconds it answers the figures (a node's status is asked by every scrape of its metrics)
)

_SHA256 = re.compile(r"[0-9a-f]{64}")


class HeldElsewhere:
    """The looks at what other processes hold of one store's blobs, the last one kept. Thread-safe."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._look: tuple[float, dict[str, set[int]]] | None = None  # (when, what it found)
        self._lock = threading.Lock()

    def blobs(self, fresh: bool = True) -> dict[str, set[int]]:
        """The store's blobs other processes map or hold open, with those processes (as looked at in the last
        ELSEWHERE_FRESH seconds; ``fresh`` False: FIGURES_FRESH)."""
        now = time.monotonic()
        with self._lock:
            # (even an eviction's look may be a second old: one write looked 11 times, 0.85 s of its 0.95 s
            # with 300 processes on the machine, a review)
            if self._look is not None and now - self._look[0] < (ELSEWHERE_FRESH if fresh else FIGURES_FRESH):
                return self._look[1]
        held = blobs_held_elsewhere(self.store)
        with self._lock:
            self._look = (now, held)
        return held

    def files(self, fresh: bool = True) -> dict[tuple[str, str], set[str]]:
        """(repo, commit) -> its files whose blobs other processes map or hold open: what the in-use hooks of
        the budget say of this process's models, seen from ``/proc``. A blob several revisions name keeps the
        one used last (a fork with the same weights and a file more stayed whole beside the model loaded, and a
        write that fitted was refused: a review)."""
        return revisions_naming(self.store, self.blobs(fresh))

    def forget(self) -> bool:
        """Forget the last look, when it found anything held: a refusal is made on a look made for it (a look a
        second old named a process gone since, and refused a write that fitted)."""
        with self._lock:
            if self._look is None or not self._look[1]:
                return False
            self._look = None
            return True

    def said(self) -> str:
        """The processes the last look found holding the store's blobs, for a refusal: " or by process N
        (command)" ("" when none)."""
        with self._lock:
            held = self._look[1] if self._look is not None else {}
        pids = sorted(set().union(*held.values())) if held else []
        if not pids:
            return ""
        named = [f"{pid} ({command})" if (command := process_command(pid)) else str(pid) for pid in pids[:3]]
        return f" or by process{'es' if len(pids) > 1 else ''} {', '.join(named)}{', ...' if len(pids) > 3 else ''}"


def revisions_naming(store: Store, digests: Collection[str]) -> dict[tuple[str, str], set[str]]:
    """(repo, commit) -> its files whose blobs are among ``digests``: of each blob, the revision used last of
    those that name it (a fork with the same weights and a file more stayed whole beside the model loaded, and
    a write that fitted was refused: a review; one shared tokenizer a node sent kept every fine-tune that has
    it from eviction, a review)."""
    if not digests:
        return {}
    named: dict[str, list[tuple[str, str, str]]] = {}
    created: dict[tuple[str, str], float] = {}
    wanted = sorted(digests)
    for start in range(0, len(wanted), 500):  # (SQLite's bound on parameters)
        part = wanted[start : start + 500]
        for row in store.index.read(
            "SELECT f.repo_id, f.commit_id, f.path, f.sha256, r.created_at FROM files f JOIN revisions r "
            f"USING (repo_id, commit_id) WHERE f.sha256 IN ({','.join('?' * len(part))})",
            tuple(part),
        ):
            named.setdefault(row["sha256"], []).append((row["repo_id"], row["commit_id"], row["path"]))
            created[(row["repo_id"], row["commit_id"])] = row["created_at"]
    uses = store.access.revision_uses()
    found: dict[tuple[str, str], set[str]] = {}
    for rows in named.values():
        last = max({(r, c) for r, c, _ in rows}, key=lambda k: (max(uses.get(k, 0.0), created[k]), k))
        found.setdefault(last, set()).update(path for r, c, path in rows if (r, c) == last)
    return found


def blobs_held_elsewhere(store: Store) -> dict[str, set[int]]:
    """The store's blobs other processes map or hold open now (a model loaded by a notebook or a worker, a
    file another process reads), with those processes: evicting one frees nothing until they let go, and they
    fetch it again once it is gone (a CLI pull under a budget evicted a model a notebook had loaded, whose
    next load pulled it back, evicting the pull's: an explorer's trial). Not those of the processes that let
    go of what is removed on their own within seconds (nodes: :func:`~modeldepot.store.holders.
    announce_letting_go`; their preloads kept every CLI pull beside them from making room, a review), but for
    the blobs they say they are sending (:func:`~modeldepot.store.holders.say_sending`). Only
    the processes this user may look into are seen (store/holders.py). One read of each process's maps and
    descriptors; a stat of each blob only when a link of the store's own (a load's, under tmp/) is held."""
    blobs = f"{os.path.realpath(store.layout.blobs)}/"
    letting_go = store.layout.lock_path.parent / LETTING_GO
    nodes = processes_letting_go(letting_go)
    held = files_held_elsewhere([blobs, f"{os.path.realpath(store.layout.tmp)}/"], skip=nodes)
    # (but what the nodes are sending: an answer in flight to a slow client is no preload)
    found = sent_by(letting_go, nodes - {os.getpid()})  # (this process's own: HeldModels.sending)
    unresolved: dict[int, set[int]] = {}
    for inode, (path, pids) in held.items():
        named = BLOB_FILE.search(path)
        if named is not None:
            try:  # (this store's blob of that name, now: one quarantined since holds nothing of the store's)
                if os.stat(f"{blobs}{named[1][:2]}/{named[1]}", follow_symlinks=False).st_ino == inode:
                    found.setdefault(named[1], set()).update(pids)
            except OSError:
                pass
            continue
        unresolved[inode] = pids
    if unresolved:
        for (sha256,) in store.index.read("SELECT sha256 FROM blobs WHERE state = 'ok'"):
            if _SHA256.fullmatch(sha256) is None:
                continue
            try:
                inode = os.stat(f"{blobs}{sha256[:2]}/{sha256}", follow_symlinks=False).st_ino
            except OSError:
                continue
            holders = unresolved.get(inode)
            if holders:
                found.setdefault(sha256, set()).update(holders)
    return found
