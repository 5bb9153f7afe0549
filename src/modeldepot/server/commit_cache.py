"""A commit's listing and tree, a repo's summary and the list of repos, kept while the index has not changed.

A client paging the tree of a repo of 100,000 files (``list_repo_files``, ``snapshot_download``: 1,000
entries a page) had the node read every row of the commit and build its whole tree at every page: 0.4 s a
page for 50,000 files, a listing quadratic in the files (a scale trial). Any commit to the index, by any
connection of any process, moves its ``data_version`` (:class:`~modeldepot.store.index.ChangeCounter`):
until then what was read stands. Every open dashboard lists the repos every 2 s (0.25 s of CPU at 3,000
repos, the query and the JSON), and every page of ``/api/models`` read them all: read once per change now,
and a dashboard that holds the list gets a 304 for it (its ETag is a digest of the list's bytes).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import blake3
from aiohttp import web

from modeldepot.store import FileEntry, RepoSummary, Store

__all__ = ["COMMITS", "CommitCache"]

KEPT = 8  # commits kept: a few clients paging a few big repos at once
BODIES_KEPT = 64 * 1024 * 1024  # bytes of answers' bodies kept (a 100,000-file commit's manifest: ~40 MB)
T = TypeVar("T")
V = TypeVar("V")


class CommitCache(Generic[T]):
    """(repo, commit) -> its files, and what is built of them (the tree), as of an index version."""

    def __init__(self, store: Store) -> None:
        self._counter = store.index.change_counter()
        self._lock = threading.Lock()  # (the counter's connection: one thread at a time)
        self._kept: OrderedDict[tuple[str, str], tuple[int, tuple[FileEntry, ...], T | None]] = OrderedDict()
        self._summaries: OrderedDict[str, tuple[int, RepoSummary]] = OrderedDict()
        self._repos: tuple[int, tuple[RepoSummary, ...]] | None = None
        self._bodies: OrderedDict[Hashable, tuple[int, bytes, str]] = OrderedDict()
        self._figures: dict[Hashable, tuple[int, object]] = {}  # (a few: the stats' totals, by who asks)

    def version(self) -> int:
        """The index's ``data_version`` now (the event streams' look asks it too: one counter for both)."""
        with self._lock:
            return self._counter.value()

    def files(self, key: tuple[str, str], read: Callable[[], list[FileEntry]]) -> tuple[FileEntry, ...]:
        """The commit's files, read again only when the index changed since (call from a worker thread)."""
        with self._lock:
            version = self._counter.value()
            kept = self._kept.get(key)
            if kept is not None and kept[0] == version:
                self._kept.move_to_end(key)
                return kept[1]
        files = tuple(read())
        with self._lock:
            self._kept[key] = (version, files, None)
            self._kept.move_to_end(key)
            while len(self._kept) > KEPT:
                self._kept.popitem(last=False)
        return files

    def summary(self, repo_id: str, read: Callable[[], RepoSummary]) -> RepoSummary:
        """The repo's summary (its counts add up every file row: 77 ms at 50,000 files, at every page)."""
        with self._lock:
            version = self._counter.value()
            kept = self._summaries.get(repo_id)
            if kept is not None and kept[0] == version:
                return kept[1]
        found = read()
        with self._lock:
            self._summaries[repo_id] = (version, found)
            self._summaries.move_to_end(repo_id)
            while len(self._summaries) > KEPT:
                self._summaries.popitem(last=False)
        return found

    def repos(self, read: Callable[[], list[RepoSummary]]) -> tuple[int, tuple[RepoSummary, ...]]:
        """Every repo's summary, and the index version they are as of (call from a worker thread)."""
        with self._lock:
            version = self._counter.value()
            if self._repos is not None and self._repos[0] == version:
                return self._repos
        found = (version, tuple(read()))  # (the version read before the rows: never newer than they are)
        with self._lock:
            self._repos = found
        return found

    def figures(self, key: Hashable, read: Callable[[], V]) -> V:
        """``read()`` once per index version (call from a worker thread): the stats' totals scanned the whole
        index at every call, and a dashboard asks every 2 s per tab (an explorer's trial)."""
        with self._lock:
            version = self._counter.value()
            kept = self._figures.get(key)
            if kept is not None and kept[0] == version:
                return kept[1]  # type: ignore[return-value]
        found = read()  # (the version read before: never newer than what was read)
        with self._lock:
            self._figures[key] = (version, found)
        return found

    def body(self, key: Hashable, version: int, make: Callable[[], bytes]) -> tuple[bytes, str]:
        """An answer's body made of what was read at index ``version``, made once for that version, and a
        tag of its bytes: the same list after a write that changed nothing of it (a use recorded, a pull's
        status) keeps its tag, and a client that holds it gets a 304 still."""
        with self._lock:
            kept = self._bodies.get(key)
            if kept is not None and kept[0] == version:
                self._bodies.move_to_end(key)
                return kept[1], kept[2]
        made = make()
        tag = blake3.blake3(made).hexdigest()[:32]
        with self._lock:
            self._bodies[key] = (version, made, tag)
            self._bodies.move_to_end(key)
            kept_bytes = sum(len(body) for _, body, _ in self._bodies.values())
            while kept_bytes > BODIES_KEPT and len(self._bodies) > 1:
                kept_bytes -= len(self._bodies.popitem(last=False)[1][1])
        return made, tag

    def built(self, key: tuple[str, str], files: tuple[FileEntry, ...], build: Callable[[], T]) -> T:
        """What ``build`` makes of ``files``, made once for as long as they are the ones kept for ``key``."""
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept[1] is files and kept[2] is not None:
                return kept[2]
        made = build()
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept[1] is files:
                self._kept[key] = (kept[0], files, made)
        return made

    def close(self) -> None:
        with self._lock:
            self._counter.close()
            self._kept.clear()
            self._summaries.clear()
            self._repos = None
            self._bodies.clear()


COMMITS = web.AppKey("commits", CommitCache)
