"""The Hugging Face cache, both ways: adopting what huggingface_hub downloaded into the store, and making a
repo of the store appear in the cache so that an unmodified ``hf_hub_download``, ``snapshot_download`` or
``from_pretrained`` finds it offline.

The cache's layout (huggingface_hub's ``file_download.py``)::

    <cache>/models--<org>--<name>/
    ├── blobs/<etag>                 one file per content, named by the Hub's ETag for it: the SHA-256 for
    │                                LFS files, the git blob id (SHA-1 of "blob <size>\\0" + bytes) otherwise
    ├── blobs/<etag>[.<8 hex>].incomplete   a download under way, or one that was killed
    ├── snapshots/<commit>/<path>    relative links to ../../blobs/<etag> (one more ../ per folder in <path>)
    └── refs/<branch>                the commit a branch (main, refs/pr/1) stood at: 40 hex digits

**Import** (:func:`import_hf_cache`) walks that layout itself: ``huggingface_hub.scan_cache_dir`` drops a
whole repo on the first broken link, and an import should keep the rest. Every blob is read once and
checked against its name (SHA-256, or git blob id) while the store computes its own digests; then each
snapshot becomes a revision of the same commit id and each ref a ref of the store, through the store's
one commit path (:func:`modeldepot.store.publish.publish`: a kill or an error leaves each revision wholly
in or wholly out). What cannot be verified is reported and skipped, the rest imported: a blob whose bytes
do not match its name (and the files that use it), an ``.incomplete`` download, a link to a missing blob,
a link that leads out of the repo's ``blobs/`` or out of the cache (refused: it is never read), a ref that
names no snapshot, a name the store refuses.

A blob is **hard-linked** into the store when the cache is on the store's file system (and the file is the
user's own): no byte is copied, and the store and the cache share one inode, which the import makes
read-only (0444) as every blob of the store is. That is safe because huggingface_hub never writes a blob
in place: a download writes an ``.incomplete`` file and renames it over the blob, and deleting a revision
(``hf cache delete``) unlinks names; either leaves the store's name, and bytes, as they were. What could
still change the shared bytes is a writer that ignores the mode (root) or a disk that rots: the store
checks every chunk it sends against its BLAKE3, and its scrub and ``verify`` quarantine such a blob (the
cache's name keeps the damaged bytes it had anyway). Across file systems, or with ``copy``, the bytes
are copied. The import never writes to the cache otherwise.

**Export** (:func:`export_to_hf_cache`) writes ``blobs/<etag>`` as a hard link to the store's blob when
they share a file system (else a copy, each chunk checked against its BLAKE3 on the way), never a symlink
into the store, whose blob files ``rm`` and ``gc`` delete; then ``snapshots/<commit>/<path>`` as relative
links, exactly as huggingface_hub makes them, and ``refs/<branch>`` last. Each name appears by an atomic
rename of a finished file, so a kill leaves nothing half-written that the cache would name. The tree
listing huggingface_hub caches (``trees/<commit>.json``) is not written: the store may hold only part of
a revision (one variant), and that listing would tell later online downloads that the rest does not exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modeldepot.errors import (
    CorruptBlobError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    RepoNotFoundError,
    SourceDirectoryError,
    StoreError,
    UpstreamDataError,
)
from modeldepot.gitobjects import git_blob_oid, lfs_pointer
from modeldepot.hashing import BlobDigest
from modeldepot.hub.manifest import RemoteFile, save_scan
from modeldepot.modelcard import MAX_CARD_BYTES, card_metadata
from modeldepot.store.blobs import PartialBlob, WriteSession
from modeldepot.store.importer import likely_new_bytes, stage_blob
from modeldepot.store.maintenance import check_if_changed
from modeldepot.store.models import BlobRecord, FileEntry
from modeldepot.store.publish import RevisionSpec, StagedFile, blob_states, publish
from modeldepot.store.store import Store
from modeldepot.validation import (
    from_upstream,
    is_commit_id,
    validate_branch,
    validate_git_oid,
    validate_path,
    validate_repo_id,
    validate_revision,
    validate_sha256,
    validate_size,
)

__all__ = [
    "ORIGIN",
    "HfCacheExportResult",
    "HfCacheImportResult",
    "HfCacheProblem",
    "HfCacheRepo",
    "HfCacheRevision",
    "default_cache_dir",
    "export_to_hf_cache",
    "import_hf_cache",
    "repo_folder_name",
]

ORIGIN = "hf-cache"  # the repos table's origin of what an import adopts
MAX_TREE_LISTING = 64 * 1024 * 1024  # bytes of a trees/<commit>.json read (the Hub's 100k files fit)
_PREFIX = "models--"  # the cache's folders of model repos (datasets--, spaces-- are not models)
_ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# huggingface_hub writes a ref as refs/<name>.<8 hex>.tmp, then renames it
_HF_TEMP_REF = re.compile(r".+\.[0-9a-f]{8}\.tmp")
_MAX_REF_BYTES = 256
_BLOCK = 4 << 20

Progress = Callable[[str, int, int], None]
"""Called as ``progress(what, bytes_done, bytes_total)`` while an import or an export runs."""


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload,no-any-return]


@dataclass(frozen=True)
class HfCacheProblem(_Record):
    """Something of the cache that was skipped, and why."""

    repo_id: str | None
    path: str  # relative to the cache folder
    problem: (
        str  # corrupt, incomplete, missing, outside, invalid, unreadable, partial (a commit held in part)
    )
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
        """True when nothing was skipped."""
        return not self.problems

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


def default_cache_dir() -> Path:
    """Where huggingface_hub keeps its cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (as read when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder_name(repo_id: str) -> str:
    """``models--org--name``: the cache's folder of a model repo."""
    validate_repo_id(repo_id)
    return _PREFIX + repo_id.replace("/", "--")


def _within(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


# -- import ------------------------------------------------------------------------------------------------


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


class _Scan:
    """The cache being read, and the problems found in it."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.real = os.path.realpath(cache)
        self.problems: list[HfCacheProblem] = []

    def problem(self, repo_id: str | None, path: Path, kind: str, detail: str) -> None:
        self.problems.append(
            HfCacheProblem(repo_id, Path(os.path.relpath(path, self.cache)).as_posix(), kind, detail)
        )


def _listdir(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _repo_folders(scan: _Scan, wanted: list[str] | None) -> list[tuple[str, Path]]:
    if wanted is not None:
        found = []
        for repo_id in wanted:
            folder = scan.cache / repo_folder_name(repo_id)
            if not folder.is_dir():
                raise SourceDirectoryError(
                    f"{repo_id} is not in the Hugging Face cache at {scan.cache} (no folder {folder.name})"
                )
            found.append((repo_id, folder))
        return found
    found = []
    for name in _listdir(scan.cache):
        folder = scan.cache / name
        if not name.startswith(_PREFIX) or not folder.is_dir():
            continue  # datasets, spaces, .locks, the shared blobs/ of newer huggingface_hub
        repo_id = name[len(_PREFIX) :].replace("--", "/")
        try:
            validate_repo_id(repo_id)
        except InvalidInputError as error:
            scan.problem(None, folder, "invalid", f"not a repo id the store accepts: {error}")
            continue
        found.append((repo_id, folder))
    return found


def _scan_repo(scan: _Scan, repo_id: str, folder: Path) -> _CachedRepo:
    for name in _listdir(folder / "blobs"):
        if name.endswith(".incomplete"):
            scan.problem(repo_id, folder / "blobs" / name, "incomplete",
                         "a download that did not finish: skipped (download it again to finish it)")  # fmt: skip
    snapshots: dict[str, list[_Link]] = {}
    for name in _listdir(folder / "snapshots"):
        path = folder / "snapshots" / name
        if path.is_symlink() or not path.is_dir():
            scan.problem(repo_id, path, "invalid", "not a snapshot folder")
        elif not is_commit_id(name):
            scan.problem(repo_id, path, "invalid", "a snapshot folder must be named by a 40-hex commit id")
        else:
            snapshots[name] = _scan_snapshot(scan, repo_id, folder, path)
    return _CachedRepo(repo_id, folder, snapshots, _scan_refs(scan, repo_id, folder, snapshots))


def _scan_snapshot(scan: _Scan, repo_id: str, folder: Path, root: Path) -> list[_Link]:
    blobs = os.path.normpath(os.path.abspath(folder / "blobs"))
    links: list[_Link] = []
    for current, dirs, names in os.walk(root):  # links to folders are listed in dirs, never entered
        for name in [d for d in dirs if os.path.islink(os.path.join(current, d))]:
            scan.problem(repo_id, Path(current, name), "outside", "a link to a folder: refused")
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(current, d)))
        for name in sorted(names):
            link = Path(current, name)
            found = _read_link(scan, repo_id, blobs, root, link)
            if found is not None:
                links.append(found)
    return links


def _read_link(scan: _Scan, repo_id: str, blobs: str, root: Path, link: Path) -> _Link | None:
    """The blob a snapshot entry names, once everything about it checked out; else a problem."""
    relative = link.relative_to(root).as_posix()
    try:
        validate_path(relative)
    except InvalidInputError as error:
        scan.problem(repo_id, link, "invalid", str(error))
        return None
    if not link.is_symlink():
        scan.problem(repo_id, link, "invalid", "a file, not a link to blobs/: no name to verify it against")
        return None
    target = os.readlink(link)
    hop = os.path.normpath(os.path.join(os.path.abspath(link.parent), target))
    etag = os.path.basename(hop)
    if os.path.dirname(hop) != blobs:
        scan.problem(repo_id, link, "outside", f"links to {target}, not to a blob of this repo: refused")
        return None
    if _ETAG.fullmatch(etag) is None:
        scan.problem(
            repo_id, link, "invalid", f"links to blobs/{etag}, not named by a SHA-256 or a git blob id"
        )
        return None
    real = os.path.realpath(link)
    if not _within(scan.real, real):
        scan.problem(repo_id, link, "outside", f"resolves to {real}, outside the cache: refused")
        return None
    try:
        info = os.stat(real)
    except OSError:
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
    for current, dirs, names in os.walk(root):
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
                scan.problem(repo_id, path, "invalid", str(error))
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
                scan.problem(
                    repo_id, path, "missing", f"points at commit {commit}, which has no snapshot here"
                )
            else:
                refs[ref] = commit
    return refs


def _git_oid_of(path: Path, size: int) -> str:
    """The git blob id of a file too big for the store's one-pass digests (≥ 10 MiB outside LFS: rare)."""
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
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
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not cache.is_dir():
        raise SourceDirectoryError(f"there is no Hugging Face cache at {cache}: give --cache-dir, or download "
                                   "something with huggingface_hub first")  # fmt: skip
    scan = _Scan(cache)
    repos = [_scan_repo(scan, repo_id, folder) for repo_id, folder in _repo_folders(scan, wanted)]
    total = sum(link.size for repo in repos for link in _blob_sources(repo).values())
    done = [0]

    def report(what: str, count: int) -> None:
        if progress is not None:
            progress(what, done[0] + count, total)

    adopted = []
    for repo in repos:
        result = _adopt(store, scan, repo, private, not copy, report, done)
        if result is not None:
            adopted.append(result)
    return HfCacheImportResult(str(cache), tuple(adopted), tuple(scan.problems))


def _blob_sources(repo: _CachedRepo) -> dict[str, _Link]:
    """One file per blob name (every link to a name resolves to the same file)."""
    sources: dict[str, _Link] = {}
    for links in repo.snapshots.values():
        for link in links:
            sources.setdefault(link.etag, link)
    return sources


def _adopt(store: Store, scan: _Scan, repo: _CachedRepo, private: bool, link: bool,
           report: Callable[[str, int], None], done: list[int]) -> HfCacheRepo | None:  # fmt: skip
    sources = _blob_sources(repo)
    if not sources:
        for name, commit in repo.refs.items():
            scan.problem(repo.repo_id, repo.folder / "refs" / name, "missing",
                         f"points at commit {commit}, none of whose files could be imported")  # fmt: skip
        return None
    durable = not store.durability.deferred
    doing = f"adopting {repo.repo_id} from the Hugging Face cache"
    with store.budget.writing(repo.repo_id) as writer, WriteSession(store.layout) as session:
        # The disk budget: what surely cannot fit is refused before anything is staged; room is made for
        # what turned out new once hashed, the blobs it shares kept from eviction meanwhile.
        writer.check_fits(likely_new_bytes(store, [s.size for s in sources.values()]), doing)
        verified: dict[str, _Verified] = {}
        partials: dict[str, PartialBlob] = {}  # by SHA-256
        linked = copied = 0
        for etag, source in sorted(sources.items()):
            what = f"{repo.repo_id}/{source.path}"
            try:
                digest, partial, was_linked = stage_blob(
                    session,
                    source.source,
                    store.chunk_size,
                    functools.partial(report, what),
                    durable,
                    link=link,
                )
            except SourceDirectoryError as error:
                scan.problem(repo.repo_id, repo.folder / "blobs" / etag, "unreadable", str(error))
                continue
            except IntegrityError as error:
                scan.problem(repo.repo_id, repo.folder / "blobs" / etag, "corrupt", str(error))
                continue
            finally:
                done[0] += source.size
            lfs = len(etag) == 64
            actual = digest.sha256 if lfs else (digest.git_sha1 or _git_oid_of(partial.path, digest.size))
            if actual != etag:
                partial.discard()
                users = sum(1 for links in repo.snapshots.values() for f in links if f.etag == etag)
                scan.problem(repo.repo_id, repo.folder / "blobs" / etag, "corrupt",
                             f"its {'SHA-256' if lfs else 'git blob id'} is {actual}, not the name it has: "
                             f"skipped, with the {users} file(s) that link to it")  # fmt: skip
                continue
            git_oid = git_blob_oid(lfs_pointer(digest.sha256, digest.size)) if lfs else etag
            verified[etag] = _Verified(digest, lfs, git_oid)
            if digest.sha256 in partials:
                partial.discard()  # the same bytes under both kinds of name
            else:
                partials[digest.sha256] = partial
                linked, copied = linked + was_linked, copied + (not was_linked)
        known = blob_states(store.index, list(partials))
        writer.reuse(sha256 for sha256 in partials if known.get(sha256) == "ok")
        writer.make_room(sum(p.size for sha, p in partials.items() if known.get(sha) != "ok"), doing)
        revisions, new = _publish_revisions(store, scan, repo, verified, partials, private)
    new_bytes = sum(p.size for sha256, p in partials.items() if sha256 in new)
    return HfCacheRepo(repo.repo_id, tuple(revisions), len(partials), len(new), new_bytes, linked, copied)


def _publish_revisions(store: Store, scan: _Scan, repo: _CachedRepo, verified: dict[str, _Verified],
                       partials: dict[str, PartialBlob], private: bool) -> tuple[list[HfCacheRevision], set[str]]:  # fmt: skip
    """One publish per snapshot (its first ref moved with it; a second ref to the same commit takes one more,
    with nothing new to place). The revision ``main`` names goes last: the repo's card is the last one's."""
    try:
        private = private or store.repo_private(repo.repo_id)  # never make a private repo public
    except RepoNotFoundError:
        pass
    refs: dict[str, list[str]] = {}
    for name, commit in sorted(repo.refs.items(), key=lambda item: (item[0] != "main", item[0])):
        refs.setdefault(commit, []).append(name)
    order = sorted(repo.snapshots, key=lambda c: ("main" in refs.get(c, ()), c in refs, c))
    revisions: list[HfCacheRevision] = []
    new: set[str] = set()
    for commit in order:
        links = [f for f in repo.snapshots[commit] if f.etag in verified]
        if not links:
            for name in refs.get(commit, ()):
                scan.problem(repo.repo_id, repo.folder / "refs" / name, "missing",
                             f"points at commit {commit}, none of whose files could be imported")  # fmt: skip
            continue
        staged = [StagedFile(f.path, verified[f.etag].digest, verified[f.etag].git_oid, verified[f.etag].lfs)
                  for f in links]  # fmt: skip
        names = refs.get(commit, [])
        spec = RevisionSpec(repo.repo_id, commit, names[0] if names else None, private, ORIGIN, _card(links))
        used = {s.digest.sha256 for s in staged}
        new |= publish(store, spec, staged, {sha256: partials[sha256] for sha256 in used})
        for name in names[1:]:
            publish(store, dataclasses.replace(spec, branch=name), staged, {})
        revisions.append(
            HfCacheRevision(commit, tuple(names), len(staged), sum(s.digest.size for s in staged))
        )
        _note_a_partial_commit(store, scan, repo, commit, names, {s.path for s in staged}, private)
    return revisions, new


def _note_a_partial_commit(store: Store, scan: _Scan, repo: _CachedRepo, commit: str, names: list[str],
                           imported: set[str], private: bool) -> None:  # fmt: skip
    """When huggingface_hub's listing of the commit (``trees/<commit>.json``, written by snapshot_download)
    names files the cache did not hold or that could not be imported, say so, and keep that listing as the
    repo's manifest (unless the repo has one of another commit, not main's): ``info`` and ``status`` count
    what is missing, a node lists the whole commit and refuses what it lacks, a pull takes the rest."""
    tree = repo.folder / "trees" / f"{commit}.json"
    listing = _read_tree_listing(scan, repo.repo_id, tree)
    if listing is None:
        return
    missing = [f.path for f in listing if f.path not in imported]
    if not missing:
        return
    scan.problem(repo.repo_id, tree, "partial",
                 f"commit {commit[:12]} has {len(listing)} files and {len(missing)} were not imported (e.g. "
                 f"{missing[0]!r}): `modeldepot pull {repo.repo_id} -r {commit}` takes the rest")  # fmt: skip
    try:
        saved = store.manifests.load(repo.repo_id).commit_id
    except NotFoundError:
        saved = None
    if saved in (None, commit) or "main" in names:
        save_scan(store, repo.repo_id, names[0] if names else commit, commit, ORIGIN, {"private": private},
                  listing)  # fmt: skip


def _read_tree_listing(scan: _Scan, repo_id: str, tree: Path) -> list[RemoteFile] | None:
    """huggingface_hub's cached listing of a commit, every value checked as an upstream's would be; None
    when there is none (older huggingface_hub, hf_hub_download alone) or it cannot be read (reported)."""
    try:
        if tree.stat().st_size > MAX_TREE_LISTING:
            raise ValueError(f"it is larger than {MAX_TREE_LISTING} bytes")
        body = json.loads(tree.read_bytes())
        entries = body["files"]
        if not isinstance(entries, dict):
            raise ValueError("its files are not an object")
    except FileNotFoundError:
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
    for link in links:
        if link.path == "README.md" and link.size <= MAX_CARD_BYTES:
            try:
                return card_metadata(link.source.read_text(errors="replace"))
            except OSError:
                return {}
    return {}


# -- export ------------------------------------------------------------------------------------------------


def export_to_hf_cache(
    store: Store,
    repo_id: str,
    revision: str = "main",
    cache_dir: str | Path | None = None,
    *,
    copy: bool = False,
    progress: Progress | None = None,
) -> HfCacheExportResult:
    """Make ``repo_id`` at ``revision`` appear in a Hugging Face cache (default: huggingface_hub's), as a
    download of it from the Hub would have left it; ``refs/<revision>`` too when it is a branch.

    Blobs are hard links to the store's when the file systems allow (else copies, chunk-verified; always
    with ``copy``); a blob the cache already holds with the right bytes is kept. Refuses (InvalidInputError)
    to write through a link that leads out of the cache. A file whose blob the store has quarantined is
    skipped and reported.

    The cache's folder is named by ``repo_id`` as given, even when the store holds the repo under another
    case: huggingface_hub looks it up with the case its caller uses (``from_pretrained("Org/Name")``).
    """
    held = store.spelled(repo_id)
    validate_revision(revision)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    commit_id = store.resolve(held, revision)
    entries = store.files(held, commit_id)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(f"cannot create the Hugging Face cache folder {cache}: {error.strerror}") from None
    writer = _CacheWriter(cache, repo_folder_name(repo_id))
    blobs = writer.folder("blobs")
    writer.sweep(blobs)
    snapshot = writer.folder(f"snapshots/{commit_id}")
    problems: list[HfCacheProblem] = []
    counts = {"linked": 0, "copied": 0, "kept": 0}
    total, done, exported, exported_bytes = sum(e.size for e in entries), 0, 0, 0
    try:
        for listed in entries:
            path = f"{writer.name}/snapshots/{commit_id}/{listed.path}"
            try:
                entry = store.entry(held, validate_path(listed.path), commit_id)
                etag = entry.etag
                if _ETAG.fullmatch(etag) is None:
                    raise CorruptBlobError(entry.sha256, f"its ETag {etag!r} is not a digest")
                counts[writer.blob(store, entry, blobs / etag, link=not copy)] += 1
            except CorruptBlobError as error:
                problems.append(HfCacheProblem(repo_id, path, "corrupt", f"skipped: {error}"))
            else:
                writer.link(snapshot, entry.path, blobs / etag)
                exported, exported_bytes = exported + 1, exported_bytes + entry.size
            done += listed.size
            if progress is not None:
                progress(f"{repo_id}/{listed.path}", done, total)
    finally:
        writer.drop_if_empty(snapshot)
    if not is_commit_id(revision):
        writer.ref(revision, commit_id)
    return HfCacheExportResult(
        repo_id=repo_id,
        revision=revision,
        commit_id=commit_id,
        cache_dir=str(cache),
        snapshot_path=str(snapshot),
        files=exported,
        bytes=exported_bytes,
        problems=tuple(problems),
        **counts,
    )


class _CacheWriter:
    """Writes one repo's folder of a cache; every folder it writes into is checked to lie inside the cache
    (its real path) before anything is created in it, and every name appears by an atomic rename."""

    def __init__(self, cache: Path, name: str) -> None:
        self.cache = cache
        self.real = os.path.realpath(cache)
        self.name = name
        self.root = self.folder("")

    def folder(self, relative: str) -> Path:
        """``<cache>/<repo folder>/<relative>``, created a level at a time, each level checked first."""
        current = self.cache
        for part in [self.name, *(p for p in relative.split("/") if p)]:
            current = current / part
            try:
                current.mkdir()
            except FileExistsError:
                pass
            except OSError as error:
                raise StoreError(
                    f"cannot create {current} in the Hugging Face cache: {error.strerror}"
                ) from None
            real = os.path.realpath(current)
            if not _within(self.real, real) or not os.path.isdir(real):
                raise InvalidInputError(
                    f"{current} leads to {real}, not a folder inside the cache at {self.cache}: refusing to "
                    "write there (remove that link)"
                )
        return current

    def _temporary(self, folder: Path) -> Path:
        return folder / f".modeldepot-{os.getpid()}-{secrets.token_hex(6)}.tmp"

    def sweep(self, folder: Path) -> None:
        """Remove the temporary files an export killed in ``folder`` left (their writer is gone)."""
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for name in names:
            found = _TEMPORARY.fullmatch(name)
            if found is not None and not _alive(int(found[1])):
                _unlink(folder / name)

    def drop_if_empty(self, folder: Path) -> None:
        """Remove ``folder`` when nothing was written in it: huggingface_hub takes an empty snapshot folder
        for a snapshot with no files (``snapshot_download`` offline returns it)."""
        with contextlib.suppress(OSError):
            folder.rmdir()

    def blob(self, store: Store, entry: FileEntry, target: Path, link: bool) -> str:
        """Put the file's bytes at ``target`` (blobs/<etag>); returns "kept", "linked" or "copied". A blob
        changed in place since it was checked (through a link from a cache) is rehashed first: a corrupt one
        is CorruptBlobError, never linked or taken as already there."""
        record = BlobRecord(entry.sha256, entry.size, entry.chunk_size)
        check_if_changed(store, record)
        if self._holds(store, entry, target):
            return "kept"
        temporary = self._temporary(target.parent)
        try:
            how = "linked" if link and _link_blob(store, record, temporary) else "copied"
            if how == "copied":
                _copy_blob(store, record, temporary)
            os.replace(temporary, target)
        except OSError as error:
            _unlink(temporary)
            raise StoreError(f"cannot write {target} in the Hugging Face cache: {error.strerror}") from None
        except BaseException:
            _unlink(temporary)
            raise
        return how

    def _holds(self, store: Store, entry: FileEntry, target: Path) -> bool:
        """Whether ``target`` is already the file's bytes: the store's own inode, or a file of the cache
        (maybe a link into huggingface_hub's shared blobs, inside the cache) whose bytes match its name."""
        real = os.path.realpath(target)
        try:
            info = os.stat(real)
        except OSError:
            return False
        if not _within(self.real, real) or not stat.S_ISREG(info.st_mode) or info.st_size != entry.size:
            return False
        try:
            ours = os.stat(store.blobs.path(entry.sha256))
            if (ours.st_dev, ours.st_ino) == (info.st_dev, info.st_ino):
                return True
        except OSError:
            pass
        return _etag_of_file(Path(real), entry.size, entry.lfs) == entry.etag

    def link(self, snapshot: Path, path: str, blob: Path) -> None:
        """``snapshots/<commit>/<path>`` -> the relative way to ``blob``, as huggingface_hub links it."""
        parent = str(Path(path).parent)
        folder = self.folder(f"{snapshot.relative_to(self.root).as_posix()}/{parent}" if parent != "." else
                             snapshot.relative_to(self.root).as_posix())  # fmt: skip
        final = folder / Path(path).name
        target = os.path.relpath(blob, folder)
        try:
            if os.readlink(final) == target:
                return
        except OSError:
            pass
        if final.is_dir() and not final.is_symlink():
            raise InvalidInputError(f"{final} is a folder; the repo has a file there: remove the folder")
        temporary = self._temporary(self.root)  # not in the snapshot: scan_cache_dir would list it
        try:
            os.symlink(target, temporary)
            os.replace(temporary, final)
        except OSError as error:
            _unlink(temporary)
            raise StoreError(f"cannot write {final} in the Hugging Face cache: {error.strerror}") from None

    def ref(self, branch: str, commit_id: str) -> None:
        """``refs/<branch>`` holding ``commit_id`` (no newline, as huggingface_hub writes it)."""
        parent = str(Path(branch).parent)
        folder = self.folder("refs" if parent == "." else f"refs/{parent}")
        final = folder / Path(branch).name
        try:
            if not final.is_symlink() and final.read_text() == commit_id:
                return
        except OSError:
            pass
        temporary = self._temporary(self.root)  # not in refs/: scan_cache_dir reads every file there
        try:
            temporary.write_text(commit_id)
            os.replace(temporary, final)
        except OSError as error:
            _unlink(temporary)
            raise StoreError(f"cannot write {final} in the Hugging Face cache: {error.strerror}") from None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _etag_of_file(path: Path, size: int, lfs: bool) -> str | None:
    digest = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
    try:
        with open(path, "rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


_TEMPORARY = re.compile(r"\.modeldepot-(\d{1,9})-[0-9a-f]{12}\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # (another user's)
    return True


def _link_blob(store: Store, blob: BlobRecord, temporary: Path) -> bool:
    """Hard-link the store's blob at ``temporary``; False when the file systems do not allow it. The blob
    is opened first (present, right size, checked if written before a restart) and flushed to disk: the
    cache will name these bytes, whatever the store's deferred flushing does."""
    fd = store.open_fd(blob)
    try:
        try:
            os.link(store.blobs.path(blob.sha256), temporary)
        except OSError:
            return False  # EXDEV, EPERM, EMLINK; or the blob went meanwhile: the copy says which
        linked, opened = os.stat(temporary), os.fstat(fd)
        if (linked.st_dev, linked.st_ino) != (opened.st_dev, opened.st_ino):
            temporary.unlink()  # replaced between the open and the link: copy what was checked
            return False
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def _copy_blob(store: Store, blob: BlobRecord, temporary: Path) -> None:
    """Copy the store's blob to ``temporary``, each chunk checked against its BLAKE3 first, then flushed."""
    with store.open_verified(blob) as reader, open(temporary, "xb") as out:
        for index in range(reader.chunks):
            reader.check(index)
            with reader.view(index) as data:
                out.write(data)
        out.flush()
        os.fsync(out.fileno())
