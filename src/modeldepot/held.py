"""What one process holds in memory of the store: its preloads (the RAM tier), its loaded engines, and the
files it maps or holds open through the depot (``get_file``, ``map_file``, ``open_file``).

The disk budget never evicts them (:meth:`HeldModels.in_use`), and once what they map leaves the store (an
`rm`, here or in another process, a quarantined blob, a variant's files taken out of a revision) they are
let go of: their mappings would keep the deleted files' disk space taken, and bad bytes in use, until the
process ends. A :class:`~modeldepot.Depot` keeps one; a node asks it every few seconds for what another
process removed (:meth:`HeldModels.let_go_of_removed`).
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from modeldepot.enginekeys import engine_revision
from modeldepot.store import Store
from modeldepot.store.elsewhere import revisions_naming

if TYPE_CHECKING:
    from modeldepot.engines.cache import LoadedModelCache
    from modeldepot.preload import Preloader

__all__ = ["HeldModels"]

# Seconds between looks for what another process removed, from a process that loads models (a library's:
# a node looks on a timer of its own)
LOOK_EVERY = 2.0


def _maps_one_of(model_file: object, paths: Collection[str], revision_paths: Collection[str]) -> bool:
    """Whether an engine loaded from ``model_file`` may map one of ``paths`` (files of a revision whose
    files are ``revision_paths``): its variant's own files (a split GGUF's every shard, an ONNX model's
    external data named after it), or, for ONNX, any file under its folder no other variant owns (external
    data may be named anything: the load links that folder). An engine of another key (a callable's: what
    it read is unknown) maps them all."""
    if not isinstance(model_file, str):
        return True
    from modeldepot.hub.variants import files_of_other_variants, gguf_shard_names, group_files

    variants = group_files({*revision_paths, *paths, model_file}).variants
    own = next((set(v.files) for v in variants if model_file in v.files), {model_file})
    own.update(gguf_shard_names(model_file) or ())
    others = files_of_other_variants(model_file, {*revision_paths, *paths})
    folder = model_file.rpartition("/")[0]
    under = f"{folder}/" if folder else ""
    onnx = model_file.endswith(".onnx")
    return any(
        path in own or path.startswith(model_file) or (onnx and path.startswith(under) and path not in others)
        for path in paths
    )


def _open(handle: object) -> bool:
    """Whether a handle followed is alive and not closed (a closed mmap, a closed stream)."""
    return handle is not None and not getattr(handle, "closed", False)


class HeldModels:
    """This process's preloads and engines of ``store`` (made on first use elsewhere: asked through
    ``preloader()`` and ``engines()``, which return None until they exist)."""

    def __init__(self, store: Store, preloader: Callable[[], Preloader | None],
                 engines: Callable[[], LoadedModelCache[Any] | None], shared: Sequence[Store] = ()) -> None:  # fmt: skip
        self.store = store
        self.shared = tuple(
            shared
        )  # stores read through under this one (MODELDEPOT_SHARED): models come from them too
        self._preloader = preloader
        self._engines = engines
        self._next_look = time.monotonic() + LOOK_EVERY
        # RAM tiers of the caller's own (``Preloader(depot, ...)``) beside the depot's: kept from eviction
        # and let go of once removed as its own is (they kept a removed model's disk space for good)
        self._own_preloaders: weakref.WeakSet[Preloader] = weakref.WeakSet()
        # (a tier built on the depot's store is the depot's too: Preloader(depot.store))
        store.held_models = self
        # Files handed out mapped or open, by a number of their own: (weak reference, repo, commit, path). An
        # import evicted a revision an inference server read through get_file: its disk space stayed taken
        # while the budget said it was free (an explorer's trial); evicting it frees nothing while it is held.
        self._views: dict[int, tuple[weakref.ref[Any], str, str, str]] = {}
        self._view_numbers = itertools.count()
        self._views_lock = threading.Lock()
        self._views_pruned_at = 0  # how many there were at the last prune (the next is at twice as many)
        # Blobs being sent (a node's answers, by number: (weak reference, SHA-256)): an eviction took the model a
        # node streamed to a slow client, said its bytes freed, and the disk stayed over budget until the client
        # was done (an explorer's trial)
        # (a file's answer is a view of that file too; a blob's, a peer's, keeps the revision used last of those
        # that name it: elsewhere.revisions_naming)
        self._sending: dict[int, tuple[weakref.ref[Any], str, bool]] = {}

    def add_view(self, handle: object, repo_id: str, commit_id: str, path: str) -> None:
        """A file of the store this process maps or holds open (``handle``: the mapping or the stream): in use
        while it lives and is not closed."""
        try:
            reference = weakref.ref(handle)
        except TypeError:  # (no weak reference to it: nothing to follow)
            return
        with self._views_lock:
            self._views[next(self._view_numbers)] = (reference, repo_id, commit_id, path)
            if len(self._views) > 2 * self._views_pruned_at + 64:
                self._prune_views_locked()

    def add_sending(self, handle: object, sha256: str, file: tuple[str, str, str] | None = None) -> None:
        """A blob of the store this process is sending (``handle``: the open blob), as ``file`` (repo, commit,
        path) or as a blob (a peer's request): in use while it lives and is not closed."""
        if file is not None:
            self.add_view(handle, *file)
        try:
            reference = weakref.ref(handle)
        except TypeError:
            return
        with self._views_lock:
            self._sending[next(self._view_numbers)] = (reference, sha256, file is not None)
            if len(self._views) + len(self._sending) > 2 * self._views_pruned_at + 64:
                self._prune_views_locked()

    def sending(self, as_blobs_only: bool = False) -> set[str]:
        """The SHA-256 of the blobs this process is sending now (``as_blobs_only``: of those sent as blobs, not
        as a file of a revision)."""
        with self._views_lock:
            self._prune_views_locked()
            return {
                sha256 for _, sha256, as_file in self._sending.values() if not (as_blobs_only and as_file)
            }

    def _prune_views_locked(self) -> None:
        for number in [n for n, (reference, *_) in self._views.items() if not _open(reference())]:
            del self._views[number]
        for number in [n for n, (reference, *_) in self._sending.items() if not _open(reference())]:
            del self._sending[number]
        self._views_pruned_at = len(self._views) + len(self._sending)

    def viewed(self) -> dict[tuple[str, str], set[str]]:
        """(repo, commit) -> the files this process maps or holds open through the depot now, those it is
        sending, and of each blob it sends as a blob, the files of the revision used last that names it."""
        with self._views_lock:
            self._prune_views_locked()
            views = list(self._views.values())
        found: dict[tuple[str, str], set[str]] = {}
        for _, repo_id, commit_id, path in views:
            found.setdefault((repo_id, commit_id), set()).add(path)
        for (repo_id, commit_id), paths in revisions_naming(
            self.store, self.sending(as_blobs_only=True)
        ).items():
            found.setdefault((repo_id, commit_id), set()).update(paths)
        return found

    def add_preloader(self, preloader: Preloader) -> None:
        """A RAM tier built on this depot: its models count as in use, and go once removed."""
        self._own_preloaders.add(preloader)

    def _preloaders(self) -> list[Preloader]:
        """The depot's RAM tier (when made) and the others built on it."""
        main = self._preloader()
        return [
            *([main] if main is not None else []),
            *(p for p in list(self._own_preloaders) if p is not main),
        ]

    def in_use(self) -> list[tuple[str, str | None]]:
        """The revisions in use in this process: preloaded, or loaded engines'."""
        return [*self.preloaded(), *self.loaded()]

    def preloaded(self) -> list[tuple[str, str | None]]:
        """The revisions of this process's preloads that may give way (kept from eviction until room cannot
        be made else): none held, nor pinned in RAM."""
        preloader = self._preloader()
        return list(preloader.revisions(gives_way=True)) if preloader is not None else []

    def loaded(self) -> list[tuple[str, str | None]]:
        """The revisions of this process's loaded engines, of its preloads held or pinned, and of the files it
        maps or holds open (never evicted)."""
        preloader, engines = self._preloader(), self._engines()
        used: list[tuple[str, str | None]] = (
            list(preloader.revisions(gives_way=False)) if preloader is not None else []
        )
        for other in self._preloaders()[1 if preloader is not None else 0 :]:
            used.extend(other.revisions())  # (the disk budget asks only the depot's own tier to give way)
        # (a list, least recently used first: the cache is no mapping; none made yet, none loaded)
        for key in engines.keys() if engines is not None else []:
            revision = engine_revision(key, self.store)
            if revision is not None:
                used.append((revision[0], revision[1]))
        used.extend(self.viewed())
        return used

    def paths_in_use(self) -> dict[tuple[str, str], set[str]]:
        """(repo, commit) -> the files this process's preloads map, its engines were loaded from, and it maps
        or holds open through the depot."""
        engines = self._engines()
        found: dict[tuple[str, str], set[str]] = self.viewed()
        for preloader in self._preloaders():
            for held, mapped in preloader.paths().items():
                found.setdefault(held, set()).update(mapped)
        for key in engines.keys() if engines is not None else []:
            revision = engine_revision(key, self.store)
            if revision is None:
                continue
            paths = found.setdefault((revision[0], revision[1]), set())
            if isinstance(revision[2], str):
                paths.add(revision[2])
            else:  # (no file named: every file of the revision counts as in use)
                paths.update(e.path for e in self.store.files(revision[0], revision[1]))
        return found

    def look_now_and_then(self) -> None:
        """:meth:`let_go_of_removed`, if LOOK_EVERY has passed since the last look (a library user's load:
        an engine of a repo another process removed was handed out again, and kept its disk space)."""
        now = time.monotonic()
        if now >= self._next_look:
            self._next_look = now + LOOK_EVERY
            self.let_go_of_removed()

    def let_go_of_removed(self) -> int:
        """Let go of what is no longer whole in the store (removed, a blob of it quarantined, or files taken
        out of it by another process: a `modeldepot rm` beside a node). Returns how many preloads and engines went."""
        dropped = 0
        used = self.paths_in_use()
        for repo_id, commit_id in set(self.in_use()):
            if commit_id is None:
                continue
            # (the store that holds the revision: a shared store's engine was let go of, every 2 s, as removed)
            read = next((store.index.read for store in (self.store, *self.shared) if store.index.read(
                "SELECT 1 FROM revisions WHERE repo_id = ? AND commit_id = ?", (repo_id, commit_id))), None)  # fmt: skip
            if read is None:
                dropped += self.let_go_of(repo_id, [commit_id])
                continue
            # Files taken out of a revision that stays (`rm --quant` beside the node), or whose blob is
            # quarantined: the models that map them go (a variant whose own files are whole stays).
            rows = read("SELECT path, state FROM files f JOIN blobs b USING (sha256) "
                        "WHERE f.repo_id = ? AND f.commit_id = ?", (repo_id, commit_id))  # fmt: skip
            bad = {row["path"] for row in rows if row["state"] != "ok"}
            bad |= used.get((repo_id, commit_id), set()) - {row["path"] for row in rows}
            if bad:
                dropped += self.let_go_of(repo_id, [commit_id], bad)
        for preloader in self._preloaders():
            for (repo_id, commit_id), paths in preloader.replaced().items():
                dropped += preloader.forget(repo_id, [commit_id], paths)
            preloader.follow_branches()  # (and a branch that moved: its new commit preloaded, in the background)
        return dropped

    def let_go_of_blob(self, sha256: str) -> None:
        """A blob this process quarantined: its engines and preloads must not go on using the bad bytes."""
        if not self._preloaders() and self._engines() is None:
            return
        users: dict[tuple[str, str], set[str]] = {}
        for row in self.store.index.read(
            "SELECT repo_id, commit_id, path FROM files WHERE sha256 = ?", (sha256,)
        ):
            users.setdefault((row["repo_id"], row["commit_id"]), set()).add(row["path"])
        for (repo_id, commit_id), paths in users.items():
            self.let_go_of(repo_id, [commit_id], paths)  # (the models mapping those files: not the others)

    def let_go_of(self, repo_id: str, commit_ids: Sequence[str], paths: Collection[str] | None = None) -> int:
        """Drop this process's preloads and loaded engines of these revisions (with ``paths``: those that map
        one of these files, removed from a revision that stays, or quarantined). Returns how many preloads
        and loaded engines went (one being loaded goes when its load ends: not counted)."""
        if not commit_ids:
            return 0
        engines = self._engines()
        dropped = sum(preloader.forget(repo_id, commit_ids, paths) for preloader in self._preloaders())
        if engines is None:
            return dropped
        loaded = set(engines.keys())
        listed: dict[str, list[str]] = {}  # by commit: its files, read once
        for key in [*loaded, *engines.loading()]:
            revision = engine_revision(key, self.store)
            if revision is None or revision[0] != repo_id or revision[1] not in commit_ids:
                continue
            if paths is not None and revision[1] not in listed:
                listed[revision[1]] = [row["path"] for row in self.store.index.read(
                    "SELECT path FROM files WHERE repo_id = ? AND commit_id = ?", (repo_id, revision[1]))]  # fmt: skip
            if paths is None or _maps_one_of(revision[2], paths, listed[revision[1]]):
                engines.evict(key)
                dropped += key in loaded
        return dropped
