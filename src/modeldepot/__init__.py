"""modeldepot: a model-file cache and distribution node.

Content-addressed, chunk-verified storage for model repos (ONNX, GGUF, safetensors, tokenizers) with
zero-copy reads and real paths for inference engines. Start with :class:`Depot`.
"""

from typing import TYPE_CHECKING, Any

from modeldepot._version import __version__
from modeldepot.errors import (
    AccessDeniedError,
    BlobRemovedError,
    BudgetExceededError,
    ChunkNotAvailableError,
    CommitConflictError,
    ConfigError,
    CorruptBlobError,
    DepotError,
    EngineMismatchError,
    EntryNotFoundError,
    GatedRepoError,
    IndexDamagedError,
    IntegrityError,
    InvalidInputError,
    InvalidPathError,
    InvalidRangeError,
    InvalidRepoIdError,
    InvalidRevisionError,
    MemoryShortError,
    NotFoundError,
    OfflineError,
    PullRunningError,
    ReadOnlyStoreError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SharedBlobsRemovedError,
    SourceDirectoryError,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreSchemaError,
    UpstreamDataError,
    UpstreamError,
    UpstreamTimeoutError,
    VariantNotFoundError,
)

if TYPE_CHECKING:
    from modeldepot.config import DepotConfig
    from modeldepot.depot import Depot, MappedFile
    from modeldepot.store import (
        DiskUsage,
        FileEntry,
        GcReport,
        ImportResult,
        RemoveResult,
        RepoInfo,
        RepoSummary,
        RevisionInfo,
        VerifyProblem,
        VerifyReport,
    )

# Imported on first use (PEP 562): `import modeldepot` stays light, so the command's entry point is running
# before the store's modules load, and a Ctrl-C in its first half second is no traceback (a trial).
_LAZY = {
    "DepotConfig": "modeldepot.config",
    "Depot": "modeldepot.depot",
    "MappedFile": "modeldepot.depot",
    **dict.fromkeys(("DiskUsage", "FileEntry", "GcReport", "ImportResult", "RemoveResult", "RepoInfo",
                     "RepoSummary", "RevisionInfo", "VerifyProblem", "VerifyReport"), "modeldepot.store"),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'modeldepot' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AccessDeniedError",
    "BlobRemovedError",
    "BudgetExceededError",
    "ChunkNotAvailableError",
    "CommitConflictError",
    "ConfigError",
    "CorruptBlobError",
    "Depot",
    "DepotConfig",
    "DepotError",
    "DiskUsage",
    "EngineMismatchError",
    "EntryNotFoundError",
    "FileEntry",
    "GatedRepoError",
    "GcReport",
    "ImportResult",
    "IndexDamagedError",
    "IntegrityError",
    "InvalidInputError",
    "InvalidPathError",
    "InvalidRangeError",
    "InvalidRepoIdError",
    "InvalidRevisionError",
    "MappedFile",
    "MemoryShortError",
    "NotFoundError",
    "OfflineError",
    "PullRunningError",
    "ReadOnlyStoreError",
    "RemoveResult",
    "RepoInfo",
    "RepoNotFoundError",
    "RepoSummary",
    "RevisionInfo",
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
    "VerifyProblem",
    "VerifyReport",
    "__version__",
]
