"""A damaged index recovered, and what it lost of the store's revisions taken in again from their snapshot
folders (``modeldepot recover-index``).

:func:`~modeldepot.store.salvage.salvage_index` keeps every row SQLite can still read. The rows of a lost page
(or of the last transactions, a log lost) named files whose bytes are still in ``blobs/``, linked from their
snapshot folders: left so, `gc` would take those blobs for garbage and delete them, and the snapshot folders
with them. So each snapshot folder that holds more files than the recovered index names for its revision is
imported again (its links are followed to the blobs: nothing is fetched, each file is hashed once); into
its repo's ``main`` when the index lost the repo's branches, else into a branch of its own,
``recovered-<commit>``, which moves no branch the index still has.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from modeldepot.errors import DepotError, InvalidInputError
from modeldepot.store.layout import StoreLayout
from modeldepot.store.salvage import Salvaged, salvage_index
from modeldepot.validation import validate_commit_id

__all__ = ["Recovery", "TakenIn", "recover_index"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TakenIn:
    """A snapshot folder imported again: the revision it was, the one it now is (or why it could not be)."""

    repo_id: str
    was_commit: str
    files: int
    revision: str = ""
    commit_id: str = ""
    error: str = ""


@dataclass
class Recovery:
    salvaged: Salvaged
    taken_in: list[TakenIn] = field(default_factory=list)


def recover_index(home: Path) -> Recovery:
    """Recover the damaged index of the store at ``home`` (:func:`salvage_index`), then import again each
    snapshot folder whose revision lost files in it (newest first: a repo whose branches all went gets its
    newest revision as ``main``)."""
    from modeldepot.depot import Depot

    salvaged = salvage_index(StoreLayout(home))
    recovery = Recovery(salvaged)
    with Depot(home, create=False, shared=()) as depot:
        store = depot.store
        found = []
        for repo_id, name in store.snapshots.present():
            try:
                validate_commit_id(name)
            except InvalidInputError:
                continue  # (a snapshot's staging, a leftover: not a revision)
            folder = store.snapshots.path(repo_id, name)
            with contextlib.suppress(OSError):
                found.append((folder.stat().st_mtime, repo_id, name, folder))
        for _when, repo_id, name, folder in sorted(found, reverse=True):
            held, strangers = _files_in(folder, store.layout.blobs)
            # (files whose blob's row went count as lost too: gc would take their blob for garbage)
            named = store.index.read(
                "SELECT COUNT(*) FROM files f JOIN blobs b ON b.sha256 = f.sha256 AND b.state = 'ok' "
                "WHERE f.repo_id = ? AND f.commit_id = ?",
                (repo_id, name),
            )[0][0]
            if held == 0 or named >= held:
                continue
            if strangers:  # (planted: `import` follows a link anywhere, and would publish what it leads to)
                recovery.taken_in.append(TakenIn(repo_id, name, held, error=(
                    f"left alone: {strangers[0]} is no link to a blob file of the store (a link planted there "
                    "would have its target published)")))  # fmt: skip
                continue
            branches = store.index.read("SELECT 1 FROM refs WHERE repo_id = ? LIMIT 1", (repo_id,))
            revision = f"recovered-{name[:12]}" if branches else "main"
            try:
                result = depot.import_dir(folder, repo_id, revision)
            except (DepotError, OSError) as error:
                log.warning("the snapshot folder %s could not be imported again: %s", folder, error)
                recovery.taken_in.append(TakenIn(repo_id, name, held, error=str(error)))
                continue
            recovery.taken_in.append(TakenIn(repo_id, name, held, revision, result.commit_id))
    return recovery


def _files_in(folder: Path, blobs: Path) -> tuple[int, list[str]]:
    """The files of a snapshot folder, and those that are no link to a blob file of the store (by the
    link's target, resolved)."""
    real_blobs = os.path.realpath(blobs)
    held, strangers = 0, []
    for root, folders, files in os.walk(folder):
        strangers += [
            os.path.join(root, name) for name in folders if os.path.islink(os.path.join(root, name))
        ]
        for file in files:
            path = os.path.join(root, file)
            held += 1
            target = os.path.realpath(path)
            if (not os.path.islink(path) or os.path.dirname(os.path.dirname(target)) != real_blobs
                    or not os.path.isfile(target)):  # fmt: skip
                strangers.append(path)
    return held, strangers
