"""Where everything lives under the store's home, and the few filesystem primitives the store relies on.

::

    <home>/
    ├── index.db                     SQLite (WAL): repos, revisions, refs, files, blobs, chunk digests
    ├── blobs/<ab>/<sha256>          one read-only file per distinct content, named by its SHA-256
    ├── snapshots/<org>/<name>/<commit>/<path>
    │                                relative symlinks into blobs/, for consumers that need real paths
    ├── tmp/<pid>-<random>/          one write session: .lock (flock()ed while its writer lives), N.partial
    ├── partials/<key>.part, .log    resumable downloads: data, and the log of verified chunks (the lock)
    ├── quarantine/<sha256>          blobs that failed verification, kept for inspection, never served
    └── locks/store.lock             shared while blobs are placed, exclusive while blobs are deleted
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from modeldepot.errors import StoreError, StoreFullError

__all__ = ["StoreLayout", "fsync_dir", "os_error", "unlink_counting"]

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def os_error(error: OSError, doing: str) -> StoreError:
    """Translate an OSError from the store's own files into the exception tree."""
    if error.errno in _FULL:
        return StoreFullError(
            f"no space left on the store's disk while {doing}: nothing partial was kept; free space "
            "(`modeldepot gc`, `modeldepot rm`) or move MODELDEPOT_HOME"
        )
    return StoreError(f"{doing} failed: {error.strerror or error} ({error.filename or ''})")


def unlink_counting(path: Path) -> int:
    """Delete a file; return the bytes freed (0 if it was already gone)."""
    try:
        size = path.lstat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as error:
        raise os_error(error, f"deleting {path}") from error
    return size


def fsync_dir(path: Path) -> None:
    """Make a rename, link or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoreLayout:
    home: Path

    @property
    def index_path(self) -> Path:
        return self.home / "index.db"

    @property
    def blobs(self) -> Path:
        return self.home / "blobs"

    @property
    def snapshots(self) -> Path:
        return self.home / "snapshots"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    @property
    def partials(self) -> Path:
        return self.home / "partials"

    @property
    def quarantine(self) -> Path:
        return self.home / "quarantine"

    @property
    def lock_path(self) -> Path:
        return self.home / "locks" / "store.lock"

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def snapshot_dir(self, repo_id: str, commit_id: str) -> Path:
        return self.snapshots / repo_id / commit_id

    def create(self) -> None:
        try:
            for directory in (self.home, self.blobs, self.snapshots, self.tmp, self.partials, self.quarantine,
                              self.lock_path.parent):  # fmt: skip
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise os_error(error, f"creating the store at {self.home}") from error
