"""The keys ``Depot.load`` caches engines under: a module of its own, light, for the loading (``engines``) and
for what lets go of engines (``held``) to share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modeldepot.store import Store

__all__ = ["engine_key", "engine_revision"]


def engine_key(
    store: Store, repo_id: str, commit_id: str, model_file: str, engine: object
) -> tuple[Any, ...]:
    """The cache key of an engine ``Depot.load`` makes. It names the store: a cache given to several depots
    holds the engines of each, and each lets go of its own only (another store's were taken for removed
    ones, and evicted every 2 s)."""
    return (repo_id, commit_id, model_file, engine, store.store_id)


def engine_revision(key: object, store: Store) -> tuple[str, str, object] | None:
    """(repo, commit, model file) of an engine's cache key (``Depot.load``'s, of ``store``), or None for
    another key."""
    if isinstance(key, tuple) and len(key) == 5 and key[4] == store.store_id:
        return key[0], key[1], key[2]
    return None
