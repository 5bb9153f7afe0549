"""What one process holds in memory of the store: its preloads (the RAM tier) and its loaded engines.

The disk budget never evicts them (:meth:`HeldModels.in_use`), and once what they map leaves the store (an
`rm`, here or in another process, a quarantined blob, a variant's files taken out of a revision) they are
let go of: their mappings would keep the deleted files' disk space taken, and bad bytes in use, until the
process ends. A :class:`~modeldepot.Depot` keeps one; a node asks it every few seconds for what another
process removed (:meth:`HeldModels.let_go_of_removed`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from modeldepot.store import Store

if TYPE_CHECKING:
    from modeldepot.engines.cache import LoadedModelCache
    from modeldepot.preload import Preloader

__all__ = ["HeldModels"]


def _maps_one_of(model_file: object, paths: Collection[str]) -> bool:
    """Whether an engine loaded from ``model_file`` maps one of ``paths``: the file itself, or its
    external data, named after it (``model.onnx_data``, ``model.onnx.data``)."""
    if not isinstance(model_file, str):
        return True
    return any(path.startswith(model_file) for path in paths)


def _engine_revision(key: object) -> tuple[str, str, object] | None:
    """(repo, commit, model file) of an engine's cache key (``Depot.load``'s), or None for another key."""
    if isinstance(key, tuple) and len(key) >= 3 and isinstance(key[0], str) and isinstance(key[1], str):
        return key[0], key[1], key[2]
    return None


class HeldModels:
    """This process's preloads and engines of ``store`` (made on first use elsewhere: asked through
    ``preloader()`` and ``engines()``, which return None until they exist)."""

    def __init__(self, store: Store, preloader: Callable[[], Preloader | None],
                 engines: Callable[[], LoadedModelCache[Any] | None]) -> None:  # fmt: skip
        self.store = store
        self._preloader = preloader
        self._engines = engines

    def in_use(self) -> list[tuple[str, str | None]]:
        """The revisions in use in this process, which no eviction removes: preloaded, or loaded engines'."""
        preloader, engines = self._preloader(), self._engines()
        used: list[tuple[str, str | None]] = list(preloader.revisions()) if preloader is not None else []
        # (a list, least recently used first: the cache is no mapping; none made yet, none loaded)
        for key in engines.keys() if engines is not None else []:
            revision = _engine_revision(key)
            if revision is not None:
                used.append((revision[0], revision[1]))
        return used

    def paths_in_use(self) -> dict[tuple[str, str], set[str]]:
        """(repo, commit) -> the files this process's preloads map and its engines were loaded from."""
        preloader, engines = self._preloader(), self._engines()
        found = preloader.paths() if preloader is not None else {}
        for key in engines.keys() if engines is not None else []:
            revision = _engine_revision(key)
            if revision is not None and isinstance(revision[2], str):
                found.setdefault((revision[0], revision[1]), set()).add(revision[2])
        return found

    def let_go_of_removed(self) -> int:
        """Let go of what is no longer whole in the store (removed, a blob of it quarantined, or files taken
        out of it by another process: a `modeldepot rm` beside a node). Returns how many revisions."""
        read = self.store.index.read
        gone = [
            (repo_id, commit_id)
            for repo_id, commit_id in set(self.in_use())
            if commit_id is not None
            and not read("SELECT 1 FROM revisions WHERE repo_id = ? AND commit_id = ?", (repo_id, commit_id))
        ]
        for repo_id, commit_id in gone:
            self.let_go_of(repo_id, [commit_id])
        # Files taken out of a revision that stays (`rm --quant` beside the node) or whose blob is quarantined:
        # the models that map them (a variant whose own files are whole stays).
        for (repo_id, commit_id), used in self.paths_in_use().items():
            if (repo_id, commit_id) in gone:
                continue
            held = {row["path"] for row in read(
                "SELECT path FROM files f JOIN blobs b USING (sha256) WHERE f.repo_id = ? AND f.commit_id = ? "
                "AND b.state = 'ok'", (repo_id, commit_id))}  # fmt: skip
            if used - held:
                self.let_go_of(repo_id, [commit_id], used - held)
                gone.append((repo_id, commit_id))
        return len(gone)

    def let_go_of_blob(self, sha256: str) -> None:
        """A blob this process quarantined: its engines and preloads must not go on using the bad bytes."""
        if self._preloader() is None and self._engines() is None:
            return
        users: dict[tuple[str, str], set[str]] = {}
        for row in self.store.index.read(
            "SELECT repo_id, commit_id, path FROM files WHERE sha256 = ?", (sha256,)
        ):
            users.setdefault((row["repo_id"], row["commit_id"]), set()).add(row["path"])
        for (repo_id, commit_id), paths in users.items():
            self.let_go_of(repo_id, [commit_id], paths)  # (the models mapping those files: not the others)

    def let_go_of(
        self, repo_id: str, commit_ids: Sequence[str], paths: Collection[str] | None = None
    ) -> None:
        """Drop this process's preloads and loaded engines of these revisions (with ``paths``: those that map
        one of these files, removed from a revision that stays)."""
        if not commit_ids:
            return
        preloader, engines = self._preloader(), self._engines()
        if preloader is not None:
            preloader.forget(repo_id, commit_ids, paths)
        if engines is None:
            return
        for key in [*engines.keys(), *engines.loading()]:
            revision = _engine_revision(key)
            if revision is None or revision[0] != repo_id or revision[1] not in commit_ids:
                continue
            if paths is None or _maps_one_of(revision[2], paths):
                engines.evict(key)
