"""Every error modeldepot raises on purpose.

One tree, so callers catch what they mean and the CLI and the server map it to an exit code or an
HTTP status in one place each::

    DepotError
    ├── InvalidInputError (ValueError)           bad input: nothing was read or written   → exit 2 / 400
    │   ├── InvalidRepoIdError
    │   ├── InvalidPathError
    │   ├── InvalidRevisionError
    │   └── InvalidRangeError
    ├── NotFoundError (LookupError)              valid input naming something the store lacks → exit 1 / 404
    │   ├── RepoNotFoundError
    │   ├── RevisionNotFoundError
    │   ├── EntryNotFoundError (FileNotFoundError)
    │   ├── ChunkNotAvailableError               a chunk of a download in progress this node cannot serve yet
    │   ├── VariantNotFoundError                 no variant of that name (a load's quant)
    │   ├── EngineMismatchError                  the files are another engine's (a load's engine=)
    │   └── SourceDirectoryError (FileNotFoundError)
    ├── IntegrityError                           bytes that do not match their digests     → exit 1
    │   ├── CorruptBlobError                     a quarantined or damaged blob: never served
    │   └── CommitConflictError                  other bytes for a file of a commit the store holds
    ├── UpstreamError                            the Hub or a node refused or failed       → exit 1
    │   ├── UpstreamDataError                    it answered with a value we refuse (a name, digest, size)
    │   ├── UpstreamTimeoutError                 it did not answer in time
    │   ├── AccessDeniedError                    gated or private upstream repo: needs a token
    │   └── OfflineError                         offline mode forbids the connection
    ├── GatedRepoError                           a gated repo's file asked without the node's token → 401
    ├── PullRunningError                         a pull of the repo runs: removing it waits → exit 1 / 409
    ├── MemoryShortError                         a preload would leave the process too little RAM → exit 1 / 503
    ├── StoreError (OSError)                     the store itself cannot do its job        → exit 1
    │   ├── StoreFullError                       ENOSPC / SQLITE_FULL: nothing partial is left behind
    │   │   └── BudgetExceededError              the disk budget cannot hold it, even evicting what may go
    │   ├── SharedBlobsRemovedError              files it shares removed before it published: fetched again
    │   └── StoreSchemaError                     an index written by a newer modeldepot
    └── ConfigError                              bad settings (env vars, chunk size)       → exit 2

Messages say what happened and what to do about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AccessDeniedError",
    "BlobRemovedError",
    "BudgetExceededError",
    "ConfigError",
    "CorruptBlobError",
    "DepotError",
    "EngineMismatchError",
    "EntryNotFoundError",
    "GatedRepoError",
    "IntegrityError",
    "InvalidInputError",
    "InvalidPathError",
    "InvalidRangeError",
    "InvalidRepoIdError",
    "InvalidRevisionError",
    "MemoryShortError",
    "NotFoundError",
    "OfflineError",
    "PullRunningError",
    "ReadOnlyStoreError",
    "RepoNotFoundError",
    "RevisionNotFoundError",
    "SharedBlobsRemovedError",
    "SourceDirectoryError",
    "StoreClosedError",
    "StoreError",
    "StoreFullError",
    "StoreSchemaError",
    "UpstreamDataError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "VariantNotFoundError",
]


class DepotError(Exception):
    """Base of every error modeldepot raises on purpose.

    Besides its message, an error carries what it is about as attributes (``None`` where one does not
    apply), so callers need not parse messages: ``repo_id``, ``path`` (a file in the repo), ``source``
    (the upstream's URL) and ``status`` (the HTTP status the upstream answered).
    """

    repo_id: str | None = None
    path: str | None = None
    source: str | None = None
    status: int | None = None
    # Of a lookup that asked several upstreams, the URLs of those that said the repo is not there, or refused
    # it (a mirror hides a repo only when the one it came from says so)
    denied_by: tuple[str, ...] = ()

    def __init__(
        self,
        *args: object,
        repo_id: str | None = None,
        path: str | None = None,
        source: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(*args)
        for name, value in (("repo_id", repo_id), ("path", path), ("source", source), ("status", status)):
            if value is not None:
                setattr(self, name, value)


class InvalidInputError(DepotError, ValueError):
    """The caller passed something malformed; nothing was read from or written to the store."""


class InvalidRepoIdError(InvalidInputError):
    pass


class InvalidPathError(InvalidInputError):
    pass


class InvalidRevisionError(InvalidInputError):
    pass


class InvalidRangeError(InvalidInputError):
    pass


class NotFoundError(DepotError, LookupError):
    """Well-formed input naming something the store does not hold."""


class VariantNotFoundError(NotFoundError):
    """No variant of the name asked for in the files looked at (the store's, or a commit's listing)."""


class EngineMismatchError(NotFoundError):
    """The files are there, for another engine than the one asked for (``engine=`` names the wrong one)."""


class RepoNotFoundError(NotFoundError):
    """The repo is not in the store, or (``message`` given, with ``source``) not on an upstream."""

    def __init__(self, repo_id: str, message: str | None = None, **context: Any) -> None:
        super().__init__(message or f"repo {repo_id!r} is not in the store (see `modeldepot ls`)", **context)
        self.repo_id = repo_id


class RevisionNotFoundError(NotFoundError):
    """The repo has no such revision in the store, or (``message`` given, with ``source``) upstream."""

    def __init__(
        self,
        repo_id: str,
        revision: str,
        message: str | None = None,
        in_store: bool | None = None,
        **context: Any,
    ) -> None:
        # (a commit's first characters, too few to be taken for its id: "8e6e2" said only "not in the store")
        short = (
            "; a commit is named by 7 or more of its characters"
            if 0 < len(revision) < 7 and all(c in "0123456789abcdefABCDEF" for c in revision)
            else ""
        )
        super().__init__(
            message
            or f"revision {revision!r} of {repo_id!r} is not in the store (see `modeldepot info {repo_id}`){short}",
            **context,
        )
        self.repo_id = repo_id
        self.revision = revision
        # The store's own answer, not an upstream's (nor the chain's): its default words, or said so
        self.in_store = message is None if in_store is None else in_store


class EntryNotFoundError(NotFoundError, FileNotFoundError):
    def __init__(self, repo_id: str, revision: str, path: str, commit_id: str | None = None,
                 in_commit: bool = False, advice: str = "") -> None:  # fmt: skip
        super().__init__(
            (f"{path!r} of {repo_id}@{revision} is not held here" if in_commit
             else f"{path!r} is not in {repo_id}@{revision}") + advice
        )  # fmt: skip
        self.repo_id = repo_id
        self.revision = revision
        self.path = path
        self.commit_id = commit_id  # the commit looked in, when the revision resolved
        self.in_commit = in_commit  # the commit has the file (its listing says so), the store does not

    def __str__(self) -> str:
        return str(self.args[0])


class BlobRemovedError(NotFoundError):
    """A file or blob looked up a moment ago was removed from the store before it was opened (an `rm`, the
    disk budget): not corrupt. A mirror fetches it again; a scrub or an export goes on without it."""


class ChunkNotAvailableError(NotFoundError):
    """A chunk of a download in progress that the node cannot serve (yet): not downloaded, or its bytes
    do not match the BLAKE3 its log names (the line landed before the bytes). Another source may have it."""

    def __init__(self, sha256: str, index: int, detail: str) -> None:
        super().__init__(f"chunk {index} of {sha256[:16]}… is not available here: {detail}")
        self.sha256 = sha256
        self.index = index


class SourceDirectoryError(NotFoundError, FileNotFoundError):
    """The directory given to an import does not exist or holds no regular files."""

    def __str__(self) -> str:
        return str(self.args[0])


class IntegrityError(DepotError):
    """Bytes do not match the digests recorded for them. ``chunks_landed``, of a downloaded file that failed
    the upstream's digest: each chunk's BLAKE3 as it landed and the other nodes that sent it (by name)."""

    chunks_landed: Mapping[int, tuple[frozenset[str], str]] | None = None


class CorruptBlobError(IntegrityError):
    def __init__(self, sha256: str, detail: str, kept_in_place: bool = False) -> None:
        # (kept_in_place: the store is read-only, nothing could be moved or fetched again there)
        super().__init__(
            f"blob {sha256[:16]}… is corrupt ({detail}); "
            + (
                "the store is read-only, so it stays in place and this process does not serve it: repair the "
                "store where it is writable (modeldepot verify, then pull or import the file again)"
                if kept_in_place
                else "it is quarantined and will not be served. Import or pull the file again to restore it."
            )
        )
        self.sha256 = sha256
        self.detail = detail
        self.kept_in_place = kept_in_place
        self.found_before = False

    @classmethod
    def found_earlier(cls, sha256: str) -> CorruptBlobError:
        """A blob quarantined before this look (by a check, a scrub, a verify: that one said why)."""
        error = cls(sha256, "it failed verification earlier")
        error.found_before = True
        return error


class CommitConflictError(IntegrityError):
    """A commit names fixed content: a write that would give a file of a commit the store holds other
    bytes (another cache's snapshot under the same commit id, an upstream that lies) changes nothing."""

    def __init__(self, repo_id: str, commit_id: str, path: str, held: str, offered: str) -> None:
        super().__init__(
            f"{path!r} of {repo_id}@{commit_id[:12]} is held with other bytes (SHA-256 {held[:12]}…) than "
            f"these ({offered[:12]}…): a commit's files never change, so nothing was changed"
        )
        self.repo_id, self.commit_id, self.path = repo_id, commit_id, path


class UpstreamError(DepotError):
    """The Hub or another node could not answer (unreachable, server error, refused)."""

    # No answer came at all (a connection refused, cut, or silent: the network or the host), rather than
    # an HTTP answer that said no: what waiting out an outage may mend
    network: bool = False


class UpstreamDataError(UpstreamError):
    """An upstream (the Hub, a depot node, a mirror's upstream) sent a value that fails validation.

    Everything an upstream says is untrusted input: a commit id, a file path, a digest or a size that would
    not pass as user input is refused where it enters, before it names a file or reaches the store.
    """

    def __init__(self, source: str, field: str, detail: str) -> None:
        super().__init__(f"{source} sent an invalid {field}: {detail}; nothing was written", source=source)
        self.field = field
        self.detail = detail

    def __str__(self) -> str:
        return str(self.args[0])


class UpstreamTimeoutError(UpstreamError):
    """The upstream accepted the connection (or was being connected to) but did not answer in time."""


class AccessDeniedError(UpstreamError):
    """The upstream repo is gated or private and the request carried no token that opens it."""


class OfflineError(UpstreamError):
    """Offline mode (HF_HUB_OFFLINE=1 or MODELDEPOT_OFFLINE=1) forbids opening a connection."""


class GatedRepoError(DepotError):
    """A file of a repo its upstream gates, asked without the node's token: the node's own credentials
    accepted the upstream's conditions, and it serves the files to those its operator gave the token (the
    repo itself is described to anyone, as the Hub describes a gated repo)."""

    def __init__(self, repo_id: str) -> None:
        super().__init__(
            f"Access to model {repo_id} is restricted: it is gated on the node's upstream, and the node serves its "
            "files only to requests with the node's token, its control token where it has none (set HF_TOKEN to "
            "it; ask the node's operator)"
        )
        self.repo_id = repo_id


class PullRunningError(DepotError):
    """A pull of the repo is running (in this process or another): removing it now would come undone when
    the pull publishes, or fail the pull at its end. Nothing was removed."""


class MemoryShortError(DepotError):
    """A preload into private memory (the ``read`` or ``memfd`` strategy, or pages locked) would leave the
    process, or its container, less room than it needs: the kernel would kill it before the tier reached its
    budget. Nothing was loaded."""


class StoreError(DepotError, OSError):
    """The store cannot complete an operation (disk, permissions, index)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


class StoreFullError(StoreError):
    """No space left: the operation was rolled back and nothing partial is visible."""


class BudgetExceededError(StoreFullError):
    """The new content does not fit in the disk budget even after evicting everything that may go (nothing
    was removed for it). ``budget_bytes``, ``protected_bytes`` (pinned, in use), ``needed_bytes``."""

    def __init__(self, message: str, *, budget_bytes: int, protected_bytes: int, needed_bytes: int,
                 repo_id: str | None = None) -> None:  # fmt: skip
        super().__init__(message, repo_id=repo_id)
        self.budget_bytes, self.protected_bytes, self.needed_bytes = (
            budget_bytes,
            protected_bytes,
            needed_bytes,
        )


class SharedBlobsRemovedError(StoreError):
    """Blobs a write found in the store and relied on (files it shares with other repos) were removed before
    it published (an `rm`, the disk budget, in another process): nothing was published. A pull fetches them
    again by itself. ``gone``: their SHA-256s."""

    gone: tuple[str, ...] = ()


class StoreSchemaError(StoreError):
    """The index was written by a newer modeldepot than this one."""


class IndexDamagedError(StoreError):
    """The store's index failed SQLite's check: a pass that deletes what the index does not name (gc) would
    take good files for garbage. Nothing was deleted."""


class ReadOnlyStoreError(StoreError):
    """The store is read-only here (a read-only mount, or another user's files): it is read and served, never
    written."""


class StoreClosedError(StoreError):
    """The store (its :class:`~modeldepot.Depot`) was closed: a closed depot reads and writes nothing (it went on
    opening connections no close would end, and writing blobs no flusher made durable)."""


class ConfigError(DepotError):
    """A setting (environment variable, option) is invalid."""
