"""modeldepot: a model-file cache and distribution node.

Content-addressed, chunk-verified storage for model repos (ONNX, GGUF, safetensors, tokenizers) with
zero-copy reads and real paths for inference engines. Start with :class:`Depot`.
"""

from modeldepot._version import __version__
from modeldepot.config import DepotConfig
from modeldepot.depot import Depot, MappedFile
from modeldepot.errors import (
    AccessDeniedError,
    ConfigError,
    CorruptBlobError,
    DepotError,
    EntryNotFoundError,
    IntegrityError,
    InvalidInputError,
    InvalidPathError,
    InvalidRangeError,
    InvalidRepoIdError,
    InvalidRevisionError,
    NotFoundError,
    OfflineError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SourceDirectoryError,
    StoreError,
    StoreFullError,
    StoreSchemaError,
    UpstreamDataError,
    UpstreamError,
    UpstreamTimeoutError,
)
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

__all__ = [
    "AccessDeniedError",
    "ConfigError",
    "CorruptBlobError",
    "Depot",
    "DepotConfig",
    "DepotError",
    "DiskUsage",
    "EntryNotFoundError",
    "FileEntry",
    "GcReport",
    "ImportResult",
    "IntegrityError",
    "InvalidInputError",
    "InvalidPathError",
    "InvalidRangeError",
    "InvalidRepoIdError",
    "InvalidRevisionError",
    "MappedFile",
    "NotFoundError",
    "OfflineError",
    "RemoveResult",
    "RepoInfo",
    "RepoNotFoundError",
    "RepoSummary",
    "RevisionInfo",
    "RevisionNotFoundError",
    "SourceDirectoryError",
    "StoreError",
    "StoreFullError",
    "StoreSchemaError",
    "UpstreamDataError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "VerifyProblem",
    "VerifyReport",
    "__version__",
]
