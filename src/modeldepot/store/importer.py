"""Publishing a local directory as a repo revision.

Each file is read once: its bytes are hashed (SHA-256, chunk BLAKE3, git SHA-1) while they are copied
into a partial file of this import's write session. When every file is durable, the blobs are placed
and one index transaction adds the repo, the revision, its ref and its files: a kill at any moment
leaves the store as it was before the import or as it is after it, never in between.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modeldepot.errors import InvalidInputError, InvalidPathError, SourceDirectoryError, StoreError
from modeldepot.gitobjects import (
    DEFAULT_LFS_PATTERNS,
    TreeEntry,
    commit_id_for_tree,
    git_blob_oid,
    is_lfs_path,
    lfs_patterns_from_gitattributes,
    lfs_pointer,
    tree_oids,
)
from modeldepot.hashing import GIT_OID_LIMIT, BlobDigest, digest_stream
from modeldepot.modelcard import MAX_CARD_BYTES, card_metadata
from modeldepot.store.blobs import PartialBlob, WriteSession
from modeldepot.store.index import Index
from modeldepot.store.models import ImportResult
from modeldepot.store.store import Store
from modeldepot.validation import validate_branch, validate_path, validate_repo_id

__all__ = ["ImportProgress", "import_dir", "scan_source"]

log = logging.getLogger(__name__)

# Folders a model directory may carry that are not part of the model (as huggingface_hub's upload skips).
_SKIPPED_DIRS = {".git", ".cache"}

ImportProgress = Callable[[str, int, int], None]
"""Called as ``progress(current_path, bytes_done, bytes_total)`` while an import runs."""


@dataclass(frozen=True)
class SourceFile:
    path: str  # repo-relative, validated
    absolute: Path
    size: int


@dataclass
class _Staged:
    source: SourceFile
    digest: BlobDigest
    lfs: bool

    @property
    def git_oid(self) -> str:
        if self.lfs or self.digest.git_sha1 is None:
            return git_blob_oid(lfs_pointer(self.digest.sha256, self.digest.size))
        return self.digest.git_sha1


def scan_source(directory: Path) -> list[SourceFile]:
    """The regular files under ``directory`` (symlinks to files followed), validated and sorted."""
    if not directory.is_dir():
        raise SourceDirectoryError(f"{directory} is not a directory: give the folder that holds the model")
    found: list[SourceFile] = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not (Path(root) == directory and d in _SKIPPED_DIRS))
        for name in names:
            absolute = Path(root) / name
            relative = absolute.relative_to(directory).as_posix()
            try:
                validate_path(relative)
            except InvalidPathError as error:
                raise InvalidPathError(f"cannot import {absolute}: {error}") from None
            try:
                info = absolute.stat()
            except OSError as error:
                raise SourceDirectoryError(f"cannot read {absolute}: {error.strerror}") from None
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInputError(
                    f"{absolute} is not a regular file; remove it or import another folder"
                )
            found.append(SourceFile(relative, absolute, info.st_size))
    if not found:
        raise SourceDirectoryError(f"{directory} holds no files to import")
    return sorted(found, key=lambda f: f.path)


def _card(files: list[SourceFile]) -> dict[str, Any]:
    for source in files:
        if source.path == "README.md" and source.size <= MAX_CARD_BYTES:
            return card_metadata(source.absolute.read_text(errors="replace"))
    return {}


def _lfs_patterns(files: list[SourceFile]) -> tuple[str, ...]:
    for source in files:
        if source.path == ".gitattributes":
            return lfs_patterns_from_gitattributes(source.absolute.read_text(errors="replace"))
    return DEFAULT_LFS_PATTERNS


def _stage(
    session: WriteSession, source: SourceFile, chunk_size: int, report: Callable[[int], None]
) -> tuple[BlobDigest, PartialBlob]:
    try:
        handle = open(source.absolute, "rb", buffering=0)  # noqa: SIM115  (closed below)
    except OSError as error:
        raise SourceDirectoryError(f"cannot read {source.absolute}: {error.strerror}") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        partial = session.new_partial(size)
        digest = digest_stream(handle.readinto, size, chunk_size, sink=partial.write, progress=report)
    return digest, partial


def _stage_all(
    session: WriteSession, files: list[SourceFile], chunk_size: int, progress: ImportProgress | None
) -> tuple[list[_Staged], dict[str, PartialBlob]]:
    """Copy and hash every file into the session; one synced partial per distinct content."""
    patterns = _lfs_patterns(files)
    total = sum(f.size for f in files)
    staged: list[_Staged] = []
    partials: dict[str, PartialBlob] = {}
    done_before = 0
    for source in files:

        def report(done: int, path: str = source.path, base: int = done_before) -> None:
            if progress is not None:
                progress(path, base + done, total)

        digest, partial = _stage(session, source, chunk_size, report)
        if digest.sha256 in partials:
            partial.discard()  # the same content twice in one folder
        else:
            partial.sync()
            partials[digest.sha256] = partial
        staged.append(_Staged(source, digest, is_lfs_path(source.path, digest.size, patterns, GIT_OID_LIMIT)))
        done_before += source.size
    return staged, partials


def import_dir(
    store: Store,
    directory: Path | str,
    repo_id: str,
    revision: str = "main",
    private: bool = False,
    progress: ImportProgress | None = None,
) -> ImportResult:
    validate_repo_id(repo_id)
    validate_branch(revision)
    files = scan_source(Path(directory))
    with WriteSession(store.layout) as session:
        staged, partials = _stage_all(session, files, store.chunk_size, progress)
        trees = tree_oids(TreeEntry(s.source.path, s.git_oid) for s in staged)
        commit_id = commit_id_for_tree(trees[""])
        placed: list[str] = []
        try:
            with store.lock.shared():
                known = _blob_states(store.index, list(partials))
                for sha256, partial in partials.items():
                    if known.get(sha256) != "ok":
                        store.blobs.place(partial, sha256, replace=True)
                        placed.append(sha256)
                _commit(store.index, repo_id, revision, private, _card(files), commit_id, trees[""], staged)
                placed = []  # committed: the rows own these blobs now
                _build_snapshot(store, repo_id, commit_id, staged)
        except BaseException:
            if placed:
                _unplace(store, placed)
            raise
    new_blobs = {sha256: p.size for sha256, p in partials.items() if sha256 not in known}
    return ImportResult(
        repo_id=repo_id,
        revision=revision,
        commit_id=commit_id,
        files=len(staged),
        bytes=sum(f.size for f in files),
        new_blobs=len(new_blobs),
        new_bytes=sum(new_blobs.values()),
        snapshot_path=str(store.snapshots.path(repo_id, commit_id)),
    )


def _build_snapshot(store: Store, repo_id: str, commit_id: str, staged: list[_Staged]) -> None:
    """Build the snapshot of a committed revision. Called under the shared store lock, so gc (exclusive)
    never removes a snapshot being built. The snapshot is derived state: if this fails (a full disk, no
    inodes), the import has still happened, and snapshot_path/file_path/verify rebuild it later."""
    try:
        store.snapshots.build(repo_id, commit_id, [(s.source.path, s.digest.sha256) for s in staged])
    except StoreError as error:
        log.warning(
            "imported %s@%s, but its snapshot folder could not be built yet: %s", repo_id, commit_id, error
        )


def _unplace(store: Store, placed: list[str]) -> None:
    """Delete blobs this import placed but never committed, so a failed import gives its disk space back.

    Under the exclusive lock no writer is between placing and committing, so a blob without an 'ok' row
    is nobody's. If this cleanup fails too, the files stay as orphans that gc removes.
    """
    with store.lock.exclusive():
        states = _blob_states(store.index, placed)
        for sha256 in placed:
            if states.get(sha256) != "ok":
                store.blobs.delete(sha256)


def _blob_states(index: Index, digests: list[str]) -> dict[str, str]:
    states: dict[str, str] = {}
    for start in range(0, len(digests), 500):
        batch = digests[start : start + 500]
        marks = ",".join("?" * len(batch))
        for row in index.read(f"SELECT sha256, state FROM blobs WHERE sha256 IN ({marks})", tuple(batch)):
            states[row["sha256"]] = row["state"]
    return states


def _commit(
    index: Index,
    repo_id: str,
    branch: str,
    private: bool,
    card: dict[str, Any],
    commit_id: str,
    tree_oid: str,
    staged: list[_Staged],
) -> None:
    now = time.time()
    with index.write(f"recording the import of {repo_id}") as con:
        con.execute(
            "INSERT INTO repos (repo_id, private, origin, card, created_at, updated_at) "
            "VALUES (?, ?, 'import', ?, ?, ?) ON CONFLICT (repo_id) DO UPDATE SET private = excluded.private, "
            "card = excluded.card, updated_at = excluded.updated_at",
            (repo_id, int(private), json.dumps(card), now, now),
        )
        con.execute(
            "INSERT OR IGNORE INTO revisions (repo_id, commit_id, tree_oid, created_at) VALUES (?, ?, ?, ?)",
            (repo_id, commit_id, tree_oid, now),
        )
        for item in staged:
            digest = item.digest
            con.execute(
                "INSERT INTO blobs (sha256, size, chunk_size, git_sha1, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (sha256) DO UPDATE SET state = 'ok', chunk_size = excluded.chunk_size, verified_at = NULL "
                "WHERE state != 'ok'",
                (digest.sha256, digest.size, digest.chunk_size, digest.git_sha1, now),
            )
            if con.execute("SELECT changes()").fetchone()[0]:
                con.execute("DELETE FROM chunks WHERE sha256 = ?", (digest.sha256,))
                con.executemany(
                    "INSERT INTO chunks (sha256, idx, blake3) VALUES (?, ?, ?)",
                    [(digest.sha256, i, b3) for i, b3 in enumerate(digest.chunk_blake3)],
                )
            con.execute(
                "INSERT OR REPLACE INTO files (repo_id, commit_id, path, sha256, size, git_oid, lfs) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    repo_id,
                    commit_id,
                    item.source.path,
                    digest.sha256,
                    digest.size,
                    item.git_oid,
                    int(item.lfs),
                ),
            )
        con.execute(
            "INSERT INTO refs (repo_id, name, commit_id, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (repo_id, name) DO UPDATE SET commit_id = excluded.commit_id, updated_at = excluded.updated_at",
            (repo_id, branch, commit_id, now),
        )
