"""The depot store: blobs, chunk digests, repos, revisions and files on local disk. Knows nothing of HTTP."""

from modeldepot.store.importer import ImportProgress, import_dir
from modeldepot.store.maintenance import RemoveResult, disk_usage, gc, remove, verify
from modeldepot.store.models import (
    BlobRecord,
    DiskUsage,
    FileEntry,
    GcReport,
    HeldRepo,
    ImportResult,
    RepoDiskUsage,
    RepoInfo,
    RepoSummary,
    RevisionInfo,
    VerifyProblem,
    VerifyReport,
)
from modeldepot.store.store import Store

__all__ = [
    "BlobRecord",
    "DiskUsage",
    "FileEntry",
    "GcReport",
    "HeldRepo",
    "ImportProgress",
    "ImportResult",
    "RemoveResult",
    "RepoDiskUsage",
    "RepoInfo",
    "RepoSummary",
    "RevisionInfo",
    "Store",
    "VerifyProblem",
    "VerifyReport",
    "disk_usage",
    "gc",
    "import_dir",
    "remove",
    "verify",
]
