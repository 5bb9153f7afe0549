"""Adopting a Hugging Face cache into the store (:func:`import_hf_cache`; see the package's doc)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from modeldepot.errors import (
    BudgetExceededError,
    CommitConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    RepoNotFoundError,
    SharedBlobsRemovedError,
    SourceDirectoryError,
    StoreFullError,
    UpstreamDataError,
)
from modeldepot.gitobjects import git_blob_oid, lfs_pointer
from modeldepot.hashing import BlobDigest
from modeldepot.hfcache.cache import (
    BLOCK,
    ETAG,
    ORIGIN,
    PREFIX,
    HfCacheImportResult,
    HfCacheProblem,
    HfCacheRepo,
    HfCacheRevision,
    Progress,
    cache_dir_given,
    looks_like_a_cache,
    moved_repo_folder,
    repo_folder_name,
    within,
)
from modeldepot.hub.manifest import RemoteFile, holds_whole, keep_known_listing, save_scan
from modeldepot.modelcard import MAX_CARD_BYTES, repo_card
from modeldepot.store.blobs import PartialBlob, WriteSession
from modeldepot.store.importer import (
    HeldContents,
    likely_linked,
    likely_new_bytes,
    room_for_new,
    stage_blob,
    why_copied,
)
from modeldepot.store.layout import size_text
from modeldepot.store.maintenance import sweep_dead_sessions
from modeldepot.store.publish import RevisionSpec, StagedFile, publish
from modeldepot.store.store import Store
from modeldepot.validation import (
    SHORT_COMMIT,
    from_upstream,
    is_commit_id,
    validate_branch,
    validate_git_oid,
    validate_path,
    validate_repo_id,
    validate_sha256,
    validate_size,
)

T = TypeVar("T")

MAX_TREE_LISTING = 64 * 1024 * 1024  # bytes of a trees/<commit>.json read (the Hub's 100k files fit)
# huggingface_hub writes a ref as refs/<name>.<8 hex>.tmp, then renames it
_HF_TEMP_REF = re.compile(r".+\.[0-9a-f]{8}\.tmp")
_MAX_REF_BYTES = 256


@dataclass(frozen=True)
class _Link:
    path: str  # inside the revision
    etag: str  # the blob's name
    source: Path  # the real file
    size: int


@dataclass
class _CachedRepo:
    repo_id: str
    folder: Path
    snapshots: dict[str, list[_Link]]
    refs: dict[str, str]  # name -> commit
    # commits a folder of whose snapshot could not be read (adopted without its files: not known whole, unless
    # their listing names none in it)
    unread: frozenset[str] = frozenset()


class _Scan:
    """The cache being read, and the problems found in it."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.real = os.path.realpath(cache)
        self.started = time.time()  # (a store's ref moved since was moved by this run: another folder's)
        self.problems: list[HfCacheProblem] = []
        # Commits whose listing names files the snapshot lacked: (repo, its listing's path, commit, listing),
        # said once every folder is adopted (a folder of another spelling of the id may hold the rest)
        self.partial: list[tuple[str, Path, str, list[RemoteFile]]] = []
        self.listings: dict[Path, list[RemoteFile] | None] = {}  # trees/<commit>.json read (and said) once

    def problem(self, repo_id: str | None, path: Path, kind: str, detail: str) -> None:
        self.problems.append(
            HfCacheProblem(repo_id, Path(os.path.relpath(path, self.cache)).as_posix(), kind, detail)
        )


def _listdir(folder: Path) -> list[str]:
    """The names in ``folder`` (none when it is not there); another OSError (EACCES: another user's 0700
    folder in a cache they share) is raised, for the caller to say."""
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _repo_folders(scan: _Scan, wanted: list[str] | None) -> list[tuple[str, Path]]:
    """The cache's folders of model repos (of the ones ``wanted``, under any case), by repo id as each folder
    spells it."""
    wanted_lower = {w.lower() for w in wanted or ()}
    found = []
    try:
        names = _listdir(scan.cache)
    except OSError as error:
        raise SourceDirectoryError(f"cannot read the Hugging Face cache at {scan.cache}: "
                                   f"{error.strerror or error}") from None  # fmt: skip
    for name in names:
        folder = scan.cache / name
        if not name.startswith(PREFIX) or not folder.is_dir():
            continue  # datasets, spaces, .locks, the shared blobs/ of newer huggingface_hub
        repo_id = name[len(PREFIX) :].replace("--", "/")
        if wanted is not None:
            if repo_id.lower() in wanted_lower:
                found.append((repo_id, folder))
            continue
        try:
            validate_repo_id(repo_id)
        except InvalidInputError as error:
            example = (
                f"modeldepot import {folder}/snapshots/COMMIT --repo ORG/{repo_id} --link"
                if "/" not in repo_id
                else "modeldepot import SNAPSHOT_FOLDER --repo ORG/NAME --link"
            )
            scan.problem(None, folder, "legacy-id", f"not a repo id the store accepts: {error}; the Hub moved such "
                         f"repos under an org (gpt2 is openai-community/gpt2 now): pull it by that id, or take "
                         f"these files as they are, by hard links ({example})")  # fmt: skip
            continue
        found.append((repo_id, folder))
    for repo_id in wanted or ():
        if not any(found_id.lower() == repo_id.lower() for found_id, _ in found):
            # (the near misses it holds: a name cut short, a version left out, refused with no word of the
            # repo meant, an explorer's trial)
            import difflib

            held = {name[len(PREFIX) :].replace("--", "/").lower(): name[len(PREFIX) :].replace("--", "/")
                    for name in names if name.startswith(PREFIX)}  # fmt: skip
            close = [held[c] for c in difflib.get_close_matches(repo_id.lower(), held, n=3, cutoff=0.75)]
            hint = f"; it holds {', '.join(close)}" if close else ""
            raise SourceDirectoryError(f"{repo_id} is not in the Hugging Face cache at {scan.cache} (no folder "
                                       f"{repo_folder_name(repo_id)}){hint}")  # fmt: skip
    return found


def _one_folder_per_repo(
    scan: _Scan, store: Store, folders: list[tuple[str, Path]]
) -> list[tuple[str, Path]]:
    """The Hub matches repo ids whatever their case, the Hugging Face cache keeps a folder per spelling
    (``Org/Model`` and ``org/model`` downloaded twice): such folders are one repo, adopted under one
    spelling (the store's, else that of the folder holding the most bytes, the newest of those: a one-off
    call with a mistyped case downloads a tokenizer or a config, and was the newest folder, whose spelling
    then named the repo for good, an explorer's trial), the newest folder last, so that where their refs
    differ the newest download's are kept. Said in a note."""
    groups: dict[str, list[tuple[str, Path]]] = {}
    for repo_id, folder in folders:
        groups.setdefault(repo_id.lower(), []).append((repo_id, folder))
    ordered = []
    for group in groups.values():
        group.sort(key=lambda item: (_refs_written(item[1]), item[1].name))
        fullest = max(group, key=lambda item: (_blob_bytes(item[1]), _refs_written(item[1]), item[1].name))
        spelling = store.spelled(fullest[0])
        if len(group) > 1:
            names = ", ".join(folder.name for _, folder in group)
            scan.problem(spelling, group[-1][1], "merged",
                         f"{names} are one repo on the Hub (the Hugging Face cache keeps a folder per spelling of "
                         f"its id): adopted together as {spelling}; where their refs differ, this folder's, the "
                         "newest download's, are taken, unless a branch would move to a commit of which only part "
                         "is held (then a branch-kept note follows)")  # fmt: skip
        ordered += [(spelling, folder) for _, folder in group]
    return ordered


def _blob_bytes(folder: Path) -> int:
    """What the folder's finished blobs hold, in bytes (0 where they cannot be listed)."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(folder / "blobs") as entries:
        for entry in entries:
            if not entry.name.endswith(".incomplete"):
                with contextlib.suppress(OSError):
                    total += entry.stat().st_size
    return total


def _refs_written(folder: Path) -> float:
    """When huggingface_hub last moved one of the folder's refs (0 when it has none)."""
    newest = 0.0
    for current, _, names in os.walk(folder / "refs"):
        for name in names:
            try:
                newest = max(newest, os.lstat(os.path.join(current, name)).st_mtime)
            except OSError:
                continue
    return newest


def _scan_repo(scan: _Scan, repo_id: str, folder: Path) -> _CachedRepo | None:
    """The repo's folder as read; None when its blobs or snapshots cannot be listed (said: the others are
    adopted; another user's 0700 folder in a shared cache stopped the whole import, a traceback, a review)."""
    try:
        blob_names, snapshot_names = _listdir(folder / "blobs"), _listdir(folder / "snapshots")
    except OSError as error:
        where = Path(error.filename) if error.filename else folder
        scan.problem(repo_id, where, "unreadable", f"{error.strerror or error}: the repo is skipped (a folder "
                     "of another user's? its owner may import it, or make it readable to you)")  # fmt: skip
        return None
    for name in blob_names:
        if name.endswith(".incomplete"):
            scan.problem(repo_id, folder / "blobs" / name, "incomplete",
                         "a download that did not finish: skipped (download it again to finish it)")  # fmt: skip
    snapshots: dict[str, list[_Link]] = {}
    unread: set[str] = set()
    for name in snapshot_names:
        path = folder / "snapshots" / name
        if path.is_symlink() or not path.is_dir():
            scan.problem(repo_id, path, "invalid", "not a snapshot folder")
        elif not is_commit_id(name):
            scan.problem(repo_id, path, "invalid", "a snapshot folder must be named by a 40-hex commit id")
        else:
            listing = _read_tree_listing(scan, repo_id, folder / "trees" / f"{name}.json")
            snapshots[name], whole = _scan_snapshot(scan, repo_id, folder, path, listing)
            if not whole:
                unread.add(name)
    refs = _scan_refs(scan, repo_id, folder, snapshots)
    return _CachedRepo(repo_id, folder, snapshots, refs, frozenset(unread))


def _scan_snapshot(
    scan: _Scan, repo_id: str, folder: Path, root: Path, listing: list[RemoteFile] | None
) -> tuple[list[_Link], bool]:
    """The snapshot's links, and whether every folder of it could be read (else the files in those that could
    not are said, and the commit is held in part)."""
    blobs = os.path.normpath(os.path.abspath(folder / "blobs"))
    links: list[_Link] = []
    listed = {f.path: f for f in listing or []}
    unread: list[OSError] = []
    # (os.walk skips a folder it cannot list without a word: the commit was adopted without its onnx/, unsaid)
    for current, dirs, names in os.walk(root, onerror=unread.append):  # links to folders are never entered
        for name in [d for d in dirs if os.path.islink(os.path.join(current, d))]:
            scan.problem(repo_id, Path(current, name), "outside", "a link to a folder: refused")
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(current, d)))
        for name in sorted(names):
            link = Path(current, name)
            found = _read_link(scan, repo_id, blobs, root, link, listed)
            if found is not None:
                links.append(found)
    for error in unread:
        scan.problem(repo_id, Path(error.filename or root), "unreadable",
                     f"{error.strerror or error}: the files in it are not adopted (commit {root.name[:12]} is "
                     "adopted without them, as a commit the cache holds in part)")  # fmt: skip
    return links, not unread


def _read_link(scan: _Scan, repo_id: str, blobs: str, root: Path, link: Path,
               listed: dict[str, RemoteFile]) -> _Link | None:  # fmt: skip
    """The blob a snapshot entry names, once everything about it checked out; else a problem. A file in
    place of the link (a cache copied with `cp -rL`, or made where links are off: huggingface_hub reads it
    so) is its own blob, verified against the commit's listing (``listed``: trees/<commit>.json)."""
    relative = link.relative_to(root).as_posix()
    try:
        validate_path(relative)
    except InvalidInputError as error:
        scan.problem(repo_id, link, "invalid", str(error))
        return None
    if not link.is_symlink():
        entry = listed.get(relative)
        try:
            info = os.stat(link, follow_symlinks=False)
        except OSError as error:
            scan.problem(repo_id, link, "unreadable", str(error))
            return None
        if entry is None or not stat.S_ISREG(info.st_mode):
            commit = root.name
            scan.problem(repo_id, link, "unlisted", "a file in place of a link to blobs/, and the commit's listing "
                         "(trees/<commit>.json) names none to verify it against: skipped (a cache copied with its "
                         f"links followed, `cp -rL` or an object store? `modeldepot pull {repo_id} -r {commit}` "
                         f"fetches the commit, or `modeldepot import {root} --repo {repo_id} -r from-cache` takes "
                         "its files as they are, under a commit id of their own, on a branch of their own)")  # fmt: skip
            return None
        return _Link(relative, entry.sha256 or entry.git_oid, link, info.st_size)
    target = os.readlink(link)
    hop = os.path.normpath(os.path.join(os.path.abspath(link.parent), target))
    etag = os.path.basename(hop)
    if os.path.dirname(hop) != blobs:
        scan.problem(repo_id, link, "outside", f"links to {target}, not to a blob of this repo: refused")
        return None
    if ETAG.fullmatch(etag) is None:
        scan.problem(
            repo_id, link, "invalid", f"links to blobs/{etag}, not named by a SHA-256 or a git blob id"
        )
        return None
    real = os.path.realpath(link)
    moved = moved_repo_folder(Path(blobs).parent)  # (the repo's folder moved to another disk, linked back)
    if not within(scan.real, real) and not (moved is not None and within(moved, real)):
        scan.problem(repo_id, link, "outside", f"resolves to {real}, outside the cache: refused")
        return None
    try:
        info = os.stat(real)
    except OSError:
        unfinished = False
        with contextlib.suppress(OSError):
            unfinished = any(name.startswith(etag + ".") and name.endswith(".incomplete")
                             for name in _listdir(Path(blobs)))  # fmt: skip
        scan.problem(repo_id, link, "missing", f"links to blobs/{etag}, which is missing"
                     + (" (its download did not finish)" if unfinished else ""))  # fmt: skip
        return None
    if not stat.S_ISREG(info.st_mode):
        scan.problem(repo_id, link, "invalid", f"blobs/{etag} is not a regular file")
        return None
    return _Link(relative, etag, Path(real), info.st_size)


def _scan_refs(scan: _Scan, repo_id: str, folder: Path, snapshots: dict[str, list[_Link]]) -> dict[str, str]:
    refs: dict[str, str] = {}
    root = folder / "refs"
    unread: list[OSError] = []
    for current, dirs, names in os.walk(root, onerror=unread.append):
        for name in [d for d in dirs if os.path.islink(os.path.join(current, d))]:
            scan.problem(repo_id, Path(current, name), "outside", "a link to a folder: refused")
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(current, d)))
        for name in sorted(names):
            path = Path(current, name)
            ref = path.relative_to(root).as_posix()
            if _HF_TEMP_REF.fullmatch(name):
                scan.problem(repo_id, path, "incomplete", "a ref huggingface_hub was writing: skipped")
                continue
            try:
                validate_branch(ref)
            except InvalidInputError as error:
                # A name git and the Hub take (`v1.0+build`, `release@2024`) that the store names no branch so is no
                # damage, and no run will adopt it: as a problem, every scheduled import failed on it for good (an
                # explorer's trial); its commit is adopted under its other refs
                kind = "ref-name" if _GIT_REF.fullmatch(ref) and "@{" not in ref else "invalid"
                scan.problem(repo_id, path, kind, f"{error}: the store names no branch so; skipped")
                continue
            if path.is_symlink() or not path.is_file():
                scan.problem(repo_id, path, "invalid", "a ref must be a file holding a commit id")
                continue
            try:
                with open(path, "rb") as handle:
                    commit = handle.read(_MAX_REF_BYTES).decode("ascii", "replace").strip()
            except OSError as error:
                scan.problem(repo_id, path, "unreadable", error.strerror or str(error))
                continue
            if not is_commit_id(commit):
                scan.problem(repo_id, path, "invalid", "does not hold a 40-hex commit id")
            elif commit not in snapshots:
                _no_snapshot(scan, repo_id, folder, path, commit)
            elif commit.startswith(ref.lower()) and SHORT_COMMIT.fullmatch(ref.lower()):
                # huggingface_hub's note of a download by a short commit id, no branch: adopted as one, the
                # store listed branches named "543139c" that never moved (an explorer's trial)
                continue
            else:
                refs[ref] = commit
    # (a refs/ that is not there holds no branch: nothing to say)
    for failed in [e for e in unread if not isinstance(e, (FileNotFoundError, NotADirectoryError))]:
        scan.problem(repo_id, Path(failed.filename or root), "unreadable",
                     f"{failed.strerror or failed}: the refs in it are not adopted")  # fmt: skip
    return refs


# A ref name as `git check-ref-format` takes it (no control character, space, "..", ~ ^ : ? * [ \\, no component
# starting with "." or ending with ".lock")
_GIT_REF = re.compile(
    r"(?!.*\.\.)(?!.*//)(?!.*\.lock(?:/|$))(?!(?:.*/)?\.)[^\x00-\x20\x7f~^:?*\[\\]+(?<![./])"
)


def _no_snapshot(scan: _Scan, repo_id: str, folder: Path, ref: Path, commit: str) -> None:
    """Say the ref ``ref`` to ``commit`` was not set, the commit having no snapshot folder: a note when all
    huggingface_hub holds of it is its record of files the repo lacks, else a problem (a snapshot deleted)."""
    # huggingface_hub writes the ref as it resolves the commit: an optional file looked for and absent
    # (transformers' `adapter_config.json`) leaves it and `.no_exist/<commit>/`, no snapshot. Nothing is there to
    # adopt, and no run will find more: as a problem, every scheduled import failed on it for good (an
    # explorer's trial).
    if (folder / ".no_exist" / commit).is_dir():
        scan.problem(repo_id, ref, "incomplete", f"points at commit {commit}, of which huggingface_hub holds only "
                     "its record of files the repo lacks (`.no_exist/`), no file: skipped")  # fmt: skip
        return
    scan.problem(repo_id, ref, "missing", f"points at commit {commit}, which has no snapshot here")


def _git_oid_of(path: Path, size: int) -> str:
    """The git blob id of a file too big for the store's one-pass digests (≥ 10 MiB outside LFS: rare)."""
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            sha1.update(block)
    return sha1.hexdigest()


@dataclass(frozen=True)
class _Verified:
    digest: BlobDigest
    lfs: bool
    git_oid: str


def import_hf_cache(
    store: Store,
    cache_dir: str | Path | None = None,
    repo_ids: Sequence[str] | None = None,
    *,
    private: bool = False,
    copy: bool = False,
    progress: Progress | None = None,
) -> HfCacheImportResult:
    """Adopt the model repos of a Hugging Face cache (``repo_ids``, or all of them) into ``store``.

    ``cache_dir`` defaults to huggingface_hub's (:func:`default_cache_dir`). Blobs are hard-linked when the
    file system allows, else copied (always with ``copy``); see the module's docstring. A repo the store
    holds as private stays private; ``private`` makes the adopted repos private. Raises
    SourceDirectoryError when there is no cache, or a repo asked for is not in it (before anything is
    written); what is skipped is in the result's ``problems``.
    """
    wanted = [validate_repo_id(r) for r in repo_ids] if repo_ids is not None else None
    cache = cache_dir_given(cache_dir)
    if not cache.is_dir():
        raise SourceDirectoryError(f"there is no Hugging Face cache at {cache}: give --cache-dir, or download "
                                   "something with huggingface_hub first")  # fmt: skip
    if cache_dir is not None and not looks_like_a_cache(cache):  # (a mistyped one "adopted nothing", exit 0)
        raise SourceDirectoryError(f"{cache} is not a Hugging Face cache: it holds no models--ORG--NAME folder (nor "
                                   "datasets--, .locks, CACHEDIR.TAG): give the cache's own folder (HF_HUB_CACHE, "
                                   "by default ~/.cache/huggingface/hub)")  # fmt: skip
    scan = _Scan(cache)
    # (a repo the store holds under another case is that repo: its spelling, and its private flag, are kept)
    scanned = (
        _scan_repo(scan, repo_id, folder)
        for repo_id, folder in _one_folder_per_repo(scan, store, _repo_folders(scan, wanted))
    )
    repos = [repo for repo in scanned if repo is not None]
    total = sum(link.size for repo in repos for link in _blob_sources(repo).values())
    done = [0]

    def report(what: str, count: int) -> None:
        if progress is not None:
            progress(what, done[0] + count, total)

    with contextlib.ExitStack() as run:
        return _adopt_each(store, scan, cache, repos, private, copy, report, done, run)


def _adopt_each(store: Store, scan: _Scan, cache: Path, repos: list[_CachedRepo], private: bool, copy: bool,
                report: Callable[[str, int], None], done: list[int], run: contextlib.ExitStack) -> HfCacheImportResult:  # fmt: skip
    """Adopt each repo in turn (those adopted kept from evictions until ``run`` ends); what each could not be
    adopted for is a problem of the result."""
    adopted = []
    for repo in repos:
        start = done[0]
        try:
            result = _adopt(store, scan, repo, private, not copy, report, done, run)
        except (
            BudgetExceededError,
            SharedBlobsRemovedError,
            StoreFullError,
            IntegrityError,
            NotFoundError,
            InvalidInputError,
            UpstreamDataError,
        ) as error:
            # One repo that cannot be adopted (over the disk budget, or more than the disk has left; a file
            # written while it was hashed) is reported and skipped, nothing of it kept; the others are adopted
            # (a full disk stopped them all, the smaller ones after too, and the summary of those adopted
            # before was lost, --json printing nothing: a trial). Another store error stops them all.
            scan.problem(repo.repo_id, repo.folder, "failed", f"{error}: the repo was not adopted (revisions "
                         "published before this stay: `modeldepot info` shows them)")  # fmt: skip
            done[0] = start + sum(link.size for link in _blob_sources(repo).values())
            continue
        if result is not None:
            adopted.append(result)
    # (what the store holds of each commit now, every folder adopted)
    for repo_id, tree, commit, listing in scan.partial:
        held = {entry.path for entry in store.files(repo_id, commit)}
        missing = [f.path for f in listing if f.path not in held]
        if missing:
            scan.problem(repo_id, tree, "partial",
                         f"commit {commit[:12]} has {len(listing)} files and {len(missing)} {'was' if len(missing) == 1 else 'were'} not imported "
                         f"(e.g. {missing[0]!r}): `modeldepot pull {repo_id} -r {commit}` takes the rest")  # fmt: skip
    return HfCacheImportResult(str(cache), tuple(_one_per_repo(store, adopted)), tuple(scan.problems))


def _one_per_repo(store: Store, adopted: list[tuple[HfCacheRepo, frozenset[str]]]) -> list[HfCacheRepo]:
    """The folders of one repo (its id's spellings) said as one: they were "adopted" twice (a trial); a
    commit both held counts the files the store holds of it now, and a content both held is one blob (two
    folders of the same 3 blobs said "6 blobs": an explorer's trial)."""
    merged: dict[str, HfCacheRepo] = {}
    contents: dict[str, frozenset[str]] = {}
    for repo, verified in adopted:
        held = merged.get(repo.repo_id)
        contents[repo.repo_id] = contents.get(repo.repo_id, frozenset()) | verified
        if held is None:
            merged[repo.repo_id] = repo
            continue
        revisions = {r.commit_id: r for r in held.revisions}
        for revision in repo.revisions:
            known = revisions.get(revision.commit_id)
            if known is None:
                revisions[revision.commit_id] = revision
                continue
            files = store.files(repo.repo_id, revision.commit_id)
            revisions[revision.commit_id] = HfCacheRevision(
                revision.commit_id, tuple(dict.fromkeys([*known.refs, *revision.refs])), len(files),
                sum(f.size for f in files),
            )  # fmt: skip
        merged[repo.repo_id] = dataclasses.replace(
            held, revisions=tuple(revisions.values()), blobs=len(contents[repo.repo_id]),
            new_blobs=held.new_blobs + repo.new_blobs, new_bytes=held.new_bytes + repo.new_bytes,
            linked_blobs=held.linked_blobs + repo.linked_blobs, copied_blobs=held.copied_blobs + repo.copied_blobs,
        )  # fmt: skip
    return list(merged.values())


def _nothing_adopted_for(scan: _Scan, repo: _CachedRepo, ref: str, commit: str) -> None:
    """Say why the ref ``ref`` to ``commit`` was not set: none of the commit's files could be adopted."""
    # (a snapshot that could not be read, said so: no unfinished download)
    if commit not in repo.unread and not any(
        names for _, _, names in os.walk(repo.folder / "snapshots" / commit)
    ):
        # huggingface_hub writes the ref and makes the snapshot's folder (and the file's folder in it: a
        # review found `onnx/`), then downloads: a first download
        # that never finished left them (no run could adopt anything of it; as a problem, every scheduled
        # import failed on it for good: an explorer's trial)
        scan.problem(repo.repo_id, repo.folder / "refs" / ref, "incomplete",
                     f"points at commit {commit}, of which huggingface_hub has downloaded no file yet (an "
                     "unfinished download): skipped")  # fmt: skip
        return
    scan.problem(repo.repo_id, repo.folder / "refs" / ref, "missing",
                 f"points at commit {commit}, none of whose files could be imported")  # fmt: skip


def _blob_sources(repo: _CachedRepo) -> dict[str, _Link]:
    """One file per blob name (every link to a name resolves to the same file)."""
    sources: dict[str, _Link] = {}
    for links in repo.snapshots.values():
        for link in links:
            sources.setdefault(link.etag, link)
    return sources


def _adopt(store: Store, scan: _Scan, repo: _CachedRepo, private: bool, link: bool,
           report: Callable[[str, int], None], done: list[int],
           run: contextlib.ExitStack) -> tuple[HfCacheRepo, frozenset[str]] | None:  # fmt: skip
    """The repo adopted from one folder, and the contents (SHA-256s) it verified. Once adopted, it is kept
    from the disk budget's evictions until ``run`` ends: a repo that could not fit beside the ones adopted
    before it evicted them, and the run said all of them adopted (an explorer's trial)."""
    sources = _blob_sources(repo)
    if not sources:
        for name, commit in repo.refs.items():
            _nothing_adopted_for(scan, repo, name, commit)
        return None
    durable = not store.durability.deferred
    doing = f"adopting {repo.repo_id} from the Hugging Face cache"
    sweep_dead_sessions(store)
    with contextlib.ExitStack() as this_repo, WriteSession(store.layout) as session:
        writer = this_repo.enter_context(store.budget.writing(repo.repo_id))
        # The disk budget: what surely cannot fit is refused before anything is staged; room is made for
        # what turned out new once hashed, the blobs it shares kept from eviction meanwhile.
        # (counted by the cache's sizes: a blob the check would find corrupt, and skip, is counted here too)
        # (a blob that will be a hard link to the cache's file takes no room, and is not counted once adopted:
        # a cache bigger than the budget was refused by its sizes, adopted when the budget was set after, a
        # trial)
        copied = [s.size for s in sources.values() if not (link and likely_linked(store, s.source))]
        writer.check_fits(likely_new_bytes(store, copied),
                          f"{doing} (by the sizes of its blobs, before they are checked)")  # fmt: skip
        verified: dict[str, _Verified] = {}
        partials: dict[str, PartialBlob] = {}  # by SHA-256
        linked_ones: set[str] = set()  # (SHA-256s) the partials that are hard links to the cache's files
        sources_of: dict[str, Path] = {}  # SHA-256 -> the cache's file it was staged from
        held = HeldContents(store, writer, store.chunk_size)
        # The sizes of the blobs the store holds in a file of its own beside the cache's, and of those linked that
        # have names outside the cache too
        twice, elsewhere = list[int](), dict[str, int]()
        for etag, source in sorted(sources.items()):
            what = f"{repo.repo_id}/{source.path}"
            if len(etag) == 64 and held.may_hold(source.size, etag):  # (held: hashed where it is, not copied)
                hashing = functools.partial(held.hashed, source.source, functools.partial(report, what))
                in_place = _noted(scan, repo, etag, done, source.size, hashing)
                if in_place is None:
                    continue
                digest = in_place
                if digest.sha256 != etag:
                    _corrupt(scan, repo, etag, digest.sha256, True)
                    continue
                if held.relied_on(digest):
                    verified[etag] = _Verified(
                        digest, True, git_blob_oid(lfs_pointer(digest.sha256, digest.size))
                    )
                    if link and _twice(source.source, store.blobs.path(digest.sha256)):
                        twice.append(source.size)
                    continue
                done[0] -= source.size  # (gone meanwhile: staged below, as any other)
            named_elsewhere = link and _names(source.source) > 1  # (before the store's link adds its own)
            staging = functools.partial(stage_blob, session, source.source, store.chunk_size,
                                        functools.partial(report, what), durable, link=link)  # fmt: skip
            staged = _noted(scan, repo, etag, done, source.size, staging)
            if staged is None:
                continue
            digest, partial, was_linked = staged
            lfs = len(etag) == 64
            actual = digest.sha256 if lfs else (digest.git_sha1 or _git_oid_of(partial.path, digest.size))
            if actual != etag:
                partial.discard()
                _corrupt(scan, repo, etag, actual, lfs)
                continue
            git_oid = git_blob_oid(lfs_pointer(digest.sha256, digest.size)) if lfs else etag
            verified[etag] = _Verified(digest, lfs, git_oid)
            if digest.sha256 in partials:
                partial.discard()  # the same bytes under both kinds of name
            else:
                partials[digest.sha256] = partial
                sources_of[digest.sha256] = source.source
                if was_linked:
                    linked_ones.add(digest.sha256)
                    if named_elsewhere:
                        elsewhere[digest.sha256] = source.size
        room_for_new(store, writer, partials, doing, free=linked_ones)
        revisions, new = _publish_revisions(store, scan, repo, verified, partials, private)
        twice.extend(partials[sha256].size for sha256, source in sources_of.items()
                     if link and sha256 not in new and _twice(source, store.blobs.path(sha256)))  # fmt: skip
        writer.keep_within()
        run.enter_context(this_repo.pop_all())  # (the writer, which reserves no more, keeps the repo)
    new_bytes = sum(p.size for sha256, p in partials.items() if sha256 in new)
    # (what came into the store, and how: a run again linked nothing, and said "7 hard-linked" of blobs it held)
    linked = len(new & linked_ones)
    if link:
        _say_why_copied(store, scan, repo, {sha256: (sources_of[sha256], partials[sha256].size)
                                            for sha256 in new - linked_ones})  # fmt: skip
    # (a `cp -al` backup made read-only without a word, and left so: an explorer's trial; of the blobs new to the
    # store: one it held already, linked by an import before, is a name of the store's)
    if named := [size for sha256, size in elsewhere.items() if sha256 in new]:
        scan.problem(repo.repo_id, repo.folder / "blobs", "named-elsewhere",
                     f"{len(named)} blob(s) ({size_text(sum(named))}) have other names besides the cache's "
                     "(hard links: a backup, another store): those names are made read-only too, as one file, and "
                     "keep that mode after the store lets go of them (chmod them back then; --copy adopts copies)")  # fmt: skip
    # (pulled before the cache was adopted, or two imports at once: on the disk twice, without a word)
    if twice:
        scan.problem(repo.repo_id, repo.folder / "blobs", "held-twice",
                     f"{len(twice)} blob(s) ({size_text(sum(twice))}) are on the disk twice, the store's file "
                     f"beside the cache's: `modeldepot hf-cache export {repo.repo_id}` (-r for each commit) makes "
                     "the cache's a hard link to the store's")  # fmt: skip
    contents = frozenset(v.digest.sha256 for v in verified.values())  # (those held too: hashed in place)
    adopted = HfCacheRepo(
        repo.repo_id, tuple(revisions), len(contents), len(new), new_bytes, linked, len(new) - linked
    )
    return adopted, contents


def _names(path: Path) -> int:
    """How many names (hard links) the file at ``path`` has (1 when it cannot be read)."""
    try:
        return os.stat(path).st_nlink
    except OSError:
        return 1


def _twice(cached: Path, blob: Path) -> bool:
    """Whether the cache's file and the store's blob are two files of one file system (which a hard link
    could make one: not across file systems, where a copy is all there can be)."""
    try:
        first, second = os.stat(cached), os.stat(blob)
    except OSError:
        return False
    return first.st_dev == second.st_dev and first.st_ino != second.st_ino


def _noted(
    scan: _Scan, repo: _CachedRepo, etag: str, done: list[int], size: int, read: Callable[[], T]
) -> T | None:
    """``read()`` of the cache's blob ``etag`` (counted done, ``size`` bytes, whatever comes of it); None when it
    cannot be read, or changed as it was read: noted as a problem of the repo."""
    try:
        return read()
    except SourceDirectoryError as error:
        scan.problem(repo.repo_id, repo.folder / "blobs" / etag, "unreadable", str(error))
    except IntegrityError as error:
        scan.problem(repo.repo_id, repo.folder / "blobs" / etag, "corrupt", str(error))
    finally:
        done[0] += size
    return None


def _corrupt(scan: _Scan, repo: _CachedRepo, etag: str, actual: str, lfs: bool) -> None:
    users = sum(1 for links in repo.snapshots.values() for f in links if f.etag == etag)
    scan.problem(repo.repo_id, repo.folder / "blobs" / etag, "corrupt",
                 f"its {'SHA-256' if lfs else 'git blob id'} is {actual}, not the name it has: "
                 f"skipped, with the {users} file(s) that link to it")  # fmt: skip


def _say_why_copied(
    store: Store, scan: _Scan, repo: _CachedRepo, copied: dict[str, tuple[Path, int]]
) -> None:
    """A note per reason the blobs adopted by copies were not hard-linked (the summary said "0 hard-linked,
    5 copied", never why: an admin adopting hundreds of GB by links got a second copy, or a full disk, a
    trial)."""
    reasons: dict[str, list[int]] = {}
    for source, size in copied.values():
        reasons.setdefault(why_copied(store.layout, source), []).append(size)
    for reason, sizes in reasons.items():
        scan.problem(repo.repo_id, repo.folder / "blobs", "copied",
                     f"{len(sizes)} blob(s), {size_text(sum(sizes))}, copied rather than linked: {reason}")  # fmt: skip


def _publish_revisions(store: Store, scan: _Scan, repo: _CachedRepo, verified: dict[str, _Verified],
                       partials: dict[str, PartialBlob], private: bool) -> tuple[list[HfCacheRevision], set[str]]:  # fmt: skip
    """One publish per snapshot (its first ref moved with it; a second ref to the same commit takes one more,
    with nothing new to place). The revision ``main`` names goes last."""
    keep_or_private = True if private else None  # never makes a private repo public (kept in the transaction)
    refs: dict[str, list[str]] = {}
    for name, commit in sorted(repo.refs.items(), key=lambda item: (item[0] != "main", item[0])):
        if not _keeps_the_stores_ref(store, scan, repo, name, commit):
            refs.setdefault(commit, []).append(name)
    order = sorted(repo.snapshots, key=lambda c: ("main" in refs.get(c, ()), c in refs, c))
    revisions: list[HfCacheRevision] = []
    new: set[str] = set()
    for commit in order:
        links = [f for f in repo.snapshots[commit] if f.etag in verified]
        if not links:
            for name in refs.get(commit, ()):
                _nothing_adopted_for(scan, repo, name, commit)
            continue
        listing = _read_tree_listing(scan, repo.repo_id, repo.folder / "trees" / f"{commit}.json")
        staged = _files_of_the_commit(store, scan, repo, commit, links, verified, listing)
        names = refs.get(commit, [])
        if not staged:
            for name in names:
                scan.problem(repo.repo_id, repo.folder / "refs" / name, "missing",
                             f"points at commit {commit}, none of whose files could be imported")  # fmt: skip
            continue
        # (a cache holds what its user downloaded: without the README, the card is not known to be empty)
        spec = RevisionSpec(repo.repo_id, commit, names[0] if names else None, keep_or_private, ORIGIN,
                            _card(links), card_known=any(link.path == "README.md" for link in links))  # fmt: skip
        used = {s.digest.sha256 for s in staged}
        try:
            new |= publish(
                store, spec, staged, {sha256: partials[sha256] for sha256 in used if sha256 in partials}
            )
        except CommitConflictError as conflict:
            # (another writer published the commit since it was looked at)
            scan.problem(repo.repo_id, repo.folder / "snapshots" / commit, "conflict", f"{conflict}: skipped")
            continue
        for name in names[1:]:
            publish(store, dataclasses.replace(spec, branch=name), staged, {})
        revisions.append(
            HfCacheRevision(commit, tuple(names), len(staged), sum(s.digest.size for s in staged))
        )
        try:  # (the scan kept for the rest says what the repo is now: a pull of the rest keeps it private)
            now_private = store.repo_private(repo.repo_id)
        except RepoNotFoundError:  # (removed meanwhile)
            now_private = private
        if listing is not None:  # (without it, what the cache held is not known to be the whole commit)
            keep_known_listing(store, repo.repo_id, commit, listing)
        _note_a_partial_commit(
            store, scan, repo, commit, names, {s.path for s in staged}, now_private, listing
        )
    return revisions, new


def _keeps_the_stores_ref(store: Store, scan: _Scan, repo: _CachedRepo, name: str, commit: str) -> bool:
    """Whether the store's ref ``name``, at another commit, stays where it is rather than move to the cache's
    ``commit`` (adopted all the same, said in a note): when the store's moved after the cache's ref was
    written (re-adopting a cache after imports moved main on set main back to the cache's older commit,
    without a word: a trial), or when the cache's commit is not known whole and the store does not hold it
    yet (hf_hub_download and from_pretrained leave a few files and no listing: main moved to a commit of a
    config alone, and `path` and `load` found no weights, a trial). A ref that moves is said too (a cache
    copied without its times, by `cp -r` or `scp`, looks newer and moved main back, silently: a trial)."""
    rows = store.index.read("SELECT commit_id, updated_at FROM refs WHERE repo_id = ? AND name = ?",
                            (store.spelled(repo.repo_id), name))  # fmt: skip
    if not rows or rows[0]["commit_id"] == commit:
        return False
    held, ref = rows[0]["commit_id"], repo.folder / "refs" / name
    try:
        written = os.lstat(ref).st_mtime
    except OSError:
        written = None
    if written is not None and written < float(rows[0]["updated_at"]) < scan.started:
        scan.problem(repo.repo_id, ref, "branch-kept",
                     f"points at {commit[:12]}, while the store's {name} moved to {held[:12]} after this ref was "
                     f"written: the store's stays (its commit {commit[:12]} is adopted all the same)")  # fmt: skip
        return True
    listing = _read_tree_listing(scan, repo.repo_id, repo.folder / "trees" / f"{commit}.json")
    cached = {link.path for link in repo.snapshots.get(commit, [])}
    whole = listing is not None and all(f.path in cached for f in listing)
    if not whole and not holds_whole(store, store.spelled(repo.repo_id), commit):
        what = ("no listing of it (huggingface_hub writes one in snapshot_download alone)" if listing is None
                else f"{len(listing)} files listed for it")  # fmt: skip
        scan.problem(repo.repo_id, ref, "branch-kept",
                     f"points at {commit[:12]}, of which the cache holds {len(cached)} files and {what}: the "
                     f"store's {name} stays at {held[:12]}, which it holds (commit {commit[:12]} is adopted as it "
                     f"is; `modeldepot pull {repo.repo_id} -r {name}` brings it whole and moves {name})")  # fmt: skip
        return True
    scan.problem(repo.repo_id, ref, "ref-moved", f"moved from {held[:12]} to {commit[:12]}")
    return False


def _files_of_the_commit(store: Store, scan: _Scan, repo: _CachedRepo, commit: str, links: list[_Link],
                         verified: dict[str, _Verified], listing: list[RemoteFile] | None) -> list[StagedFile]:  # fmt: skip
    """The snapshot's files that may be published as the commit's: not one the commit's own listing
    (``trees/<commit>.json``) gives other bytes, nor one the store holds with other bytes for that commit
    (another cache's snapshot under the same commit id: a commit's files never change). Those are reported."""
    held = {entry.path: entry.sha256 for entry in store.files(repo.repo_id, commit)}
    listed = {f.path: f for f in listing or []}
    staged = []
    for link in links:
        found = verified[link.etag]
        entry = listed.get(link.path)
        where = repo.folder / "snapshots" / commit / link.path
        if entry is not None and (entry.git_oid != found.git_oid or entry.size != found.digest.size):
            scan.problem(repo.repo_id, where, "conflict",
                         f"it links to blob {link.etag[:12]}…, and the commit's listing ({commit[:12]}…) names "
                         f"another (git blob id {entry.git_oid[:12]}…): skipped")  # fmt: skip
        elif held.get(link.path, found.digest.sha256) != found.digest.sha256:
            scan.problem(repo.repo_id, where, "conflict",
                         f"the store holds other bytes for this file of commit {commit[:12]}… (SHA-256 "
                         f"{held[link.path][:12]}…, this one {found.digest.sha256[:12]}…), and a commit's files "
                         "never change: skipped")  # fmt: skip
        else:
            staged.append(StagedFile(link.path, found.digest, found.git_oid, found.lfs))
    return staged


def _note_a_partial_commit(store: Store, scan: _Scan, repo: _CachedRepo, commit: str, names: list[str],
                           imported: set[str], private: bool, listing: list[RemoteFile] | None) -> None:  # fmt: skip
    """When huggingface_hub's listing of the commit (``trees/<commit>.json``, written by snapshot_download)
    names files the cache did not hold or that could not be imported, say so, and keep that listing as the
    repo's manifest (unless the repo has one of another commit, not main's): ``info`` and ``status`` count
    what is missing, a node lists the whole commit and refuses what it lacks, a pull takes the rest."""
    tree = repo.folder / "trees" / f"{commit}.json"
    if listing is None:
        return
    if all(f.path in imported for f in listing):
        return
    scan.partial.append((repo.repo_id, tree, commit, listing))
    try:
        saved = store.manifests.load(repo.repo_id).commit_id
    except NotFoundError:
        saved = None
    if saved in (None, commit) or "main" in names:
        save_scan(store, repo.repo_id, names[0] if names else commit, commit, ORIGIN, {"private": private},
                  listing)  # fmt: skip


def _read_tree_listing(scan: _Scan, repo_id: str, tree: Path) -> list[RemoteFile] | None:
    """huggingface_hub's cached listing of a commit, every value checked as an upstream's would be; None
    when there is none (older huggingface_hub, hf_hub_download alone) or it cannot be read (reported, once)."""
    if tree in scan.listings:
        return scan.listings[tree]
    scan.listings[tree] = found = _read_listing_once(scan, repo_id, tree)
    return found


def _read_listing_once(scan: _Scan, repo_id: str, tree: Path) -> list[RemoteFile] | None:
    try:
        if tree.stat().st_size > MAX_TREE_LISTING:
            raise ValueError(f"it is larger than {MAX_TREE_LISTING} bytes")
        body = json.loads(tree.read_bytes())
        entries = body["files"]
        if not isinstance(entries, dict):
            raise ValueError("its files are not an object")
    except FileNotFoundError:
        return None
    except PermissionError:
        # (huggingface_hub writes its listings 0600: adopting another user's cache "failed", exit 1, for every
        # commit snapshot_download fetched, each adopted all the same: a trial)
        scan.problem(repo_id, tree, "listing-unreadable", "the commit's file listing is not readable by you "
                     "(huggingface_hub writes it for its owner alone): whether the cache holds the commit whole "
                     "cannot be told, and it is adopted as the files it holds")  # fmt: skip
        return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        scan.problem(repo_id, tree, "unreadable", f"the commit's file listing is not readable: {error}")
        return None
    source = str(tree)
    try:
        files = []
        for path, entry in entries.items():
            path = from_upstream(source, "file path", validate_path, path)
            if not isinstance(entry, dict):
                raise UpstreamDataError(source, f"entry of {path!r}", "it is not an object")
            size = from_upstream(source, f"size of {path!r}", validate_size, entry.get("size"))
            git_oid = from_upstream(source, f"git oid of {path!r}", validate_git_oid, entry.get("blob_id"))
            sha256 = entry.get("lfs_sha256")
            if sha256 is not None:
                sha256 = from_upstream(source, f"LFS SHA-256 of {path!r}", validate_sha256, sha256)
            files.append(RemoteFile(path=path, size=size, git_oid=git_oid, sha256=sha256))
    except UpstreamDataError as error:
        scan.problem(repo_id, tree, "unreadable", f"the commit's file listing is not valid: {error}")
        return None
    return files


def _card(links: list[_Link]) -> dict[str, Any]:
    readme = next((link for link in links if link.path == "README.md" and link.size <= MAX_CARD_BYTES), None)
    try:
        text = readme.source.read_text(errors="replace") if readme else None
    except OSError:
        text = None
    return repo_card(text, (link.path for link in links))
