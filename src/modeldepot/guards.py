"""The checks every :class:`~modeldepot.depot.Depot` method that takes a repo id, or writes, makes before it
runs: repo ids in any case, a read-only store refused up front, a repo only a shared store holds said so."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from modeldepot.errors import RepoNotFoundError

__all__ = ["any_case", "own_store", "writes"]

F = TypeVar("F", bound=Callable[..., Any])


def any_case(method: F) -> F:
    """Repo ids match whatever their case, as on the Hub: ``method`` gets its ``repo_id`` (the first
    argument, or the keyword) as the store spells it (:meth:`Store.spelled`), validated."""

    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if "repo_id" in kwargs:
            if kwargs["repo_id"] is not None:
                kwargs["repo_id"] = self.store.spelled(kwargs["repo_id"])
        elif args and args[0] is not None:
            args = (self.store.spelled(args[0]), *args[1:])
        return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# What a writing method is called in a read-only store's refusal: the user's word, not the method's name
_WRITES = {"import_dir": "an import", "hf_cache_import": "an import", "pull": "a pull", "pull_async": "a pull",
           "download_quant": "a pull", "download_file": "a pull", "remove": "a removal",
           "gc": "gc", "pin": "a pin", "unpin": "an unpin", "set_max_size": "a disk budget",
           "shrink": "a shrink to the disk budget"}  # fmt: skip


def writes(method: F) -> F:
    """``method`` writes the store: on a read-only one it is a ReadOnlyStoreError before anything is done
    (not a failure halfway, naming a folder the user never heard of)."""

    doing = _WRITES.get(method.__name__, method.__name__.replace("_", " "))
    if inspect.iscoroutinefunction(method):  # (still one, refusing when awaited, as the method would)

        @wraps(method)
        async def awaited(self: Any, *args: Any, **kwargs: Any) -> Any:
            self.check_writable(doing)
            return await method(self, *args, **kwargs)

        return awaited  # type: ignore[return-value]

    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.check_writable(doing)
        return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def own_store(method: F) -> F:
    """``method`` works on the depot's own store only (a removal, a pin): a repo only a shared store holds
    is said to be there, read only from here, not "not in the store" (which ``ls``, listing it, belies)."""

    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except RepoNotFoundError as missing:
            repo_id = missing.repo_id or ""
            store = self._shared_holder(repo_id) if repo_id else None
            if store is not None:
                raise RepoNotFoundError(
                    repo_id, f"{repo_id} is in the shared store {store.home}, read only from here: change it "
                    "there (its owner may), or pull it into your own store"
                ) from None  # fmt: skip
            raise

    return wrapper  # type: ignore[return-value]
