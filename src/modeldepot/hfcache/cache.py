"""What the cache's two directions share: its layout's names, the results, the checks of a path."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modeldepot.errors import InvalidInputError
from modeldepot.validation import (
    validate_repo_id,
)

ORIGIN = "hf-cache"  # the repos table's origin of what an import adopts
PREFIX = "models--"  # the cache's folders of model repos (datasets--, spaces-- are not models)
ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
BLOCK = 4 << 20  # bytes read at a time to hash a file

Progress = Callable[[str, int, int], None]
"""Called as ``progress(what, bytes_done, bytes_total)`` while an import or an export runs."""


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload,no-any-return]


# Problems that are reported and leave the import (export) a success: they skip nothing a snapshot needs, or
# nothing a run could ever adopt (a legacy id, a download huggingface_hub left unfinished and no snapshot
# names), which made every scheduled import "fail" for good (a trial)
NOTES = frozenset(
    {
        "partial",
        "merged",
        "ref-moved",
        "branch-kept",
        "spelling",
        "incomplete",
        "legacy-id",
        "own-file",
        "listing-unreadable",
        "new-cache",
        "copied",
        "repaired",
        "held-twice",
        "named-elsewhere",
        "ref-name",
    }
)


@dataclass(frozen=True)
class HfCacheProblem(_Record):
    """Something of the cache that was skipped, and why."""

    repo_id: str | None
    path: str  # relative to the cache folder
    # corrupt, incomplete, missing, outside, invalid, unreadable, conflict (other bytes than the commit's),
    # failed (a repo skipped whole: over the disk budget...), partial (a commit in part: a note), merged
    # (folders of one repo under two spellings of its id, adopted as one: a note)
    problem: str
    detail: str


@dataclass(frozen=True)
class HfCacheRevision(_Record):
    commit_id: str
    refs: tuple[str, ...]
    files: int
    bytes: int


@dataclass(frozen=True)
class HfCacheRepo(_Record):
    """One repo adopted from the cache: its revisions, and how its blobs came into the store."""

    repo_id: str
    revisions: tuple[HfCacheRevision, ...]
    blobs: int  # distinct contents verified
    new_blobs: int  # of those, the ones the store did not hold before
    new_bytes: int
    linked_blobs: int  # hard links to the cache's files (same file system)
    copied_blobs: int


class _Reported(_Record):
    """A result that lists what it skipped: ``ok`` when nothing was (also in its dict)."""

    problems: tuple[HfCacheProblem, ...]

    @property
    def ok(self) -> bool:
        """True when nothing was skipped (a note, such as a commit the cache holds in part, skips nothing)."""
        return all(problem.problem in NOTES for problem in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "ok": self.ok}


@dataclass(frozen=True)
class HfCacheImportResult(_Reported):
    cache_dir: str
    repos: tuple[HfCacheRepo, ...]
    problems: tuple[HfCacheProblem, ...]


@dataclass(frozen=True)
class HfCacheExportResult(_Reported):
    repo_id: str
    revision: str
    commit_id: str
    cache_dir: str
    snapshot_path: str  # what snapshot_download(..., local_files_only=True) returns
    files: int
    bytes: int
    linked: int  # blobs hard-linked to the store's
    copied: int
    kept: int  # blobs the cache already held with the right bytes
    problems: tuple[HfCacheProblem, ...]
    # The commit's files the store does not hold (known from its saved scan): the snapshot lacks them too
    not_in_store: tuple[str, ...] = ()


def cache_dir_given(cache_dir: Path | str | None) -> Path:
    """The cache folder asked for, or huggingface_hub's (:func:`default_cache_dir`); an empty name is bad
    input (``--cache-dir ""`` wrote into the current folder)."""
    if cache_dir is None:
        return default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir).strip():
        raise InvalidInputError(f"the Hugging Face cache folder is {cache_dir!r}: give a folder, or none for "
                                "huggingface_hub's own")  # fmt: skip
    # (absolute: a relative --cache-dir came back relative in --json and the snapshot path printed, which a
    # script passes on from another folder: an explorer's trial)
    folder = Path(os.path.abspath(os.path.expanduser(cache_dir)))
    with contextlib.suppress(OSError):
        # HF_HOME given for HF_HUB_CACHE (they differ by /hub): an import adopted "nothing" and said so with
        # success, an export wrote where huggingface_hub never looks (a trial)
        if (folder / "hub").is_dir() and not any(folder.glob("models--*")):
            raise InvalidInputError(f"{folder} holds a hub/ folder and no models--* folder: it looks like HF_HOME, "
                                    f"whose cache is {folder / 'hub'} (HF_HUB_CACHE): give that")  # fmt: skip
    return folder


def default_cache_dir() -> Path:
    """Where huggingface_hub keeps its cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (as read when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def moved_repo_folder(folder: Path) -> str | None:
    """The real path of a repo's folder of a cache that is a link to a folder of the same name elsewhere (moved
    to another disk and linked back: ``mv models--org--big /data/ && ln -s /data/models--org--big``, which
    huggingface_hub reads as it reads any), both the link and its folder this user's; None for any other (a
    link under another name, or another user's, is no repo folder moved: what it leads to stays outside)."""
    if not folder.is_symlink():
        return None
    real = os.path.realpath(folder)
    try:
        # The link, and what it leads to, this user's own: in a cache others may write, a link one of them
        # planted to another user's cache (whose folders have the very same names) had its repo adopted, and
        # served (a review)
        owned = os.lstat(folder).st_uid == os.geteuid() == os.stat(real).st_uid
    except OSError:
        return None
    return real if owned and os.path.basename(real) == folder.name and os.path.isdir(real) else None


def repo_folder_name(repo_id: str) -> str:
    """``models--org--name``: the cache's folder of a model repo."""
    validate_repo_id(repo_id)
    return PREFIX + repo_id.replace("/", "--")


def within(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def etag_of_file(path: Path, size: int, lfs: bool) -> str | None:
    digest = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
    try:
        with open(path, "rb") as handle:
            while block := handle.read(BLOCK):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


# What else a Hugging Face cache holds: its locks, its tag, transformers' version.txt (a fresh cache's only file)
_CACHE_FILES = (".locks", "CACHEDIR.TAG", "version.txt")


def looks_like_a_cache(folder: Path) -> bool:
    """Whether ``folder`` holds what a Hugging Face cache holds (a repo's folder, its locks, its tag)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.name.startswith(("models--", "datasets--", "spaces--")) or e.name in _CACHE_FILES
                       for e in entries)  # fmt: skip
    except OSError:
        return True  # (unreadable: said as the scan reads it)
