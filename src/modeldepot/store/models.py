"""Plain records the store returns. Frozen, typed, and convertible to JSON with ``to_dict``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "BlobRecord",
    "DiskUsage",
    "FileEntry",
    "GcReport",
    "HeldRepo",
    "ImportResult",
    "RepoDiskUsage",
    "RepoInfo",
    "RepoSummary",
    "RevisionInfo",
    "VerifyProblem",
    "VerifyReport",
]


_PLAIN = (str, int, float, bool, type(None))


class _Record:
    def to_dict(self) -> dict[str, Any]:
        # A record of plain values is read field by field: ``asdict`` deep-copies each one, and a node's
        # manifest of a 300-file commit spent 8 ms in it at every peer's and mirror's ask (a profile)
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        if all(isinstance(value, _PLAIN) for value in plain.values()):
            return plain
        return dataclasses.asdict(self)  # type: ignore[call-overload,no-any-return]


@dataclass(frozen=True)
class BlobRecord(_Record):
    """One distinct content in the store."""

    sha256: str
    size: int
    chunk_size: int


@dataclass(frozen=True)
class FileEntry(_Record):
    """One file of one revision."""

    repo_id: str
    commit_id: str
    path: str
    size: int
    sha256: str
    git_oid: str  # the Hub's tree oid: git blob SHA-1 of the content, or of the LFS pointer
    lfs: bool
    chunk_size: int

    @property
    def etag(self) -> str:
        """What the Hub sends as (X-Linked-)ETag: SHA-256 for LFS files, the git blob SHA-1 otherwise."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class RevisionInfo(_Record):
    commit_id: str
    refs: tuple[str, ...]
    created_at: float
    files: tuple[FileEntry, ...]
    # Paths of ``files`` whose content failed a check and is quarantined: listed, never served (pull again)
    quarantined: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class RepoSummary(_Record):
    repo_id: str
    private: bool
    origin: str
    refs: dict[str, str]
    revisions: int
    files: int  # in the newest revision
    size: int  # bytes of the newest revision's files
    card: dict[str, Any]  # pipeline_tag, library_name, license, base_model, tags: what the model card says
    created_at: float
    updated_at: float
    quarantined: int = 0  # of ``files``, those whose content failed a check: listed, not served
    # Private because its upstream gates it (card ``gated``, private on that upstream's word): described to
    # anyone, as the Hub describes a gated repo, its files only to requests with the node's token
    gated: bool = False
    tag_refs: tuple[str, ...] = ()  # of ``refs``, those that are git tags upstream (pulled by one)


class HeldRepo(NamedTuple):
    """What a request's access to a held repo turns on (:meth:`Store.origin <modeldepot.store.Store.origin>`)."""

    origin: str  # ``import``, or the URL of the upstream a pull came from
    private: bool  # its files behind the node's token
    gated: bool  # private because its upstream gates it: see RepoSummary.gated


@dataclass(frozen=True)
class RepoInfo(_Record):
    repo_id: str
    private: bool
    origin: str
    refs: dict[str, str]
    created_at: float
    updated_at: float
    revisions: tuple[RevisionInfo, ...]  # newest first


@dataclass(frozen=True)
class ImportResult(_Record):
    repo_id: str
    revision: str
    commit_id: str
    files: int
    bytes: int
    new_blobs: int  # distinct contents the store did not hold before
    new_bytes: int  # disk the import added (the rest was deduplicated)
    snapshot_path: str
    linked_bytes: int = 0  # of new_bytes, those hard-linked to the folder's files (``link``): no second copy
    copied_because: tuple[
        str, ...
    ] = ()  # (``link``) why the new files not linked were copied, each reason once
    # False when the snapshot folder could not be made (a full disk, no inode left): the files are published,
    # snapshot_path not made yet (`modeldepot path`, a load or verify makes it once there is room)
    snapshot_built: bool = True


@dataclass(frozen=True)
class VerifyProblem(_Record):
    sha256: str
    # "missing", "size", "sha256", "chunk", "read", "restart" (found corrupt after one), "quarantined", or
    # "unreadable" (this user may not open it: not checked, not quarantined)
    problem: str
    detail: str
    quarantined_to: str | None
    files: tuple[str, ...]  # "org/name@commit:path" of every file that used the blob


@dataclass(frozen=True)
class VerifyReport(_Record):
    blobs_checked: int
    bytes_checked: int
    problems: tuple[VerifyProblem, ...]
    index_ok: bool
    snapshots_repaired: int
    seconds: float
    read_only: bool = False  # the store is: a corrupt blob stays in place, refused by each process
    index_advice: str = ""  # how to get out of a damaged index (when not index_ok)
    # "org/name@commit: why" of each snapshot folder that could not be rebuilt (a full disk): its files are
    # whole in the store, their paths not made yet (the next verify, path or load makes them)
    snapshots_not_repaired: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.index_ok and not self.problems


@dataclass(frozen=True)
class GcReport(_Record):
    blobs_removed: int
    bytes_freed: int
    partials_removed: int
    snapshots_removed: int
    kept_partials: int  # partials whose writer is still alive
    resumable_downloads: int = 0  # interrupted downloads kept in partials/ for a resume
    quarantined_removed: int = 0  # files of quarantine/ (blobs found corrupt, kept for a look) deleted
    # What it could not delete (another user's files: a `sudo` pull's), each said with its owner and the fix;
    # gc went past them
    not_deleted: tuple[str, ...] = ()
    # Snapshots of revisions the index does not know, each whole (``repo@commit``): kept with their blobs, for
    # `recover-index` to take in (an older index put back by hand lost them: store/snapshots.py)
    unknown_revisions: tuple[str, ...] = ()


@dataclass(frozen=True)
class RepoDiskUsage(_Record):
    repo_id: str
    revisions: int
    files: int
    logical_bytes: int  # sum of every file of every revision
    unique_bytes: int  # blobs no other repo uses: what removing the repo would free


@dataclass(frozen=True)
class DiskUsage(_Record):
    home: str
    blobs: int
    blob_bytes: int  # what the blobs occupy (each content once)
    logical_bytes: int  # what the same files would take without deduplication
    partial_bytes: int
    quarantine_bytes: int
    index_bytes: int
    repos: tuple[RepoDiskUsage, ...] = field(default_factory=tuple)
    read_only: bool = False  # the store is read-only here (a read-only mount, another user's, a shared one)
    # Of partial_bytes (each download takes room for its whole file as it starts): what interrupted downloads
    # received and keep for a resume
    partial_kept_bytes: int = 0
    # Of blob_bytes: blobs with a name outside the store too (adopted from a Hugging Face cache, `import
    # --link`): shared on the disk, and not freed when the store lets them go
    linked_bytes: int = 0
    # What writes that never ended (an import or a pull killed) left in tmp/: no resume takes them, `gc` frees
    # them (they were shown as "partial", among the downloads kept for a resume: a trial)
    unfinished_write_bytes: int = 0
    # What writes under way (an import, an adoption: their session's lock held) have in tmp/ now: theirs, and
    # in the room the budget holds for them (a running import's were said left by killed writes, for `gc`,
    # which frees none of them: an explorer's trial)
    writing_bytes: int = 0
    # The room kept free beside the index so that `rm` and `gc` work on a full disk (twice the index, 1 MiB at
    # least): on the disk, and left out of the total, a store's 200 MiB that `du -sh` found and `du` did not
    reserve_bytes: int = 0
    # Files deleted from the store (removed, evicted) that processes still map or hold open: on the disk until
    # they let go, and in no other figure (`rm` said so; `du` just after said nothing while `df` disagreed)
    removed_held_bytes: int = 0
    removed_held_by: tuple[int, ...] = ()

    @property
    def total_bytes(self) -> int:
        return (self.blob_bytes + self.partial_bytes + self.unfinished_write_bytes + self.writing_bytes
                + self.quarantine_bytes + self.index_bytes + self.reserve_bytes)  # fmt: skip
