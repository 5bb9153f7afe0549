"""Publishing a local directory as a repo revision.

Each file is read once: its bytes are hashed (SHA-256, chunk BLAKE3, git SHA-1) while they are copied
into a partial file of this import's write session. When every file is durable, the blobs are placed
and one index transaction adds the repo, the revision, its ref and its files: a kill at any moment
leaves the store as it was before the import or as it is after it, never in between.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import grp
import io
import logging
import os
import pwd
import stat
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modeldepot.errors import InvalidInputError, InvalidPathError, SourceDirectoryError
from modeldepot.gitobjects import (
    DEFAULT_LFS_PATTERNS,
    TreeEntry,
    git_blob_oid,
    is_lfs_path,
    lfs_patterns_from_gitattributes,
    lfs_pointer,
    tree_oids,
)
from modeldepot.hashing import GIT_OID_LIMIT, BlobDigest, digest_stream
from modeldepot.modelcard import MAX_CARD_BYTES, repo_card
from modeldepot.openfiles import open_file_limit
from modeldepot.store.blobs import PartialBlob, WriteSession, file_stamp, written_since
from modeldepot.store.budget import BudgetWriter
from modeldepot.store.layout import StoreLayout, os_error
from modeldepot.store.locks import dup_lock, forget_and_close, lock_file, take_flock, unlock_and_close
from modeldepot.store.maintenance import sweep_dead_sessions
from modeldepot.store.models import ImportResult
from modeldepot.store.publish import (
    RevisionSpec,
    StagedFile,
    blob_states,
    held_good,
    publish,
    refuse_nested_branch,
)
from modeldepot.store.store import Store
from modeldepot.validation import validate_new_branch, validate_path, validate_repo_id

__all__ = [
    "HeldContents",
    "ImportProgress",
    "import_dir",
    "likely_linked",
    "likely_new_bytes",
    "room_for_new",
    "scan_source",
    "stage_blob",
]

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


def _git_oid(digest: BlobDigest, lfs: bool) -> str:
    """The oid git would give the file: of its LFS pointer when in LFS, else of its content."""
    if lfs or digest.git_sha1 is None:
        return git_blob_oid(lfs_pointer(digest.sha256, digest.size))
    return digest.git_sha1


def scan_source(directory: Path, store_home: Path | None = None) -> list[SourceFile]:
    """The regular files under ``directory``, validated and sorted; the store at ``store_home`` is never
    one of them (``--home`` in the model's folder, ``MODELDEPOT_HOME=.``: its live index, locks and reserve
    became files of the repo a node would serve), and is no folder to import.

    Links to files are followed wherever they point: a link names one file its owner chose, and the Hub's
    cache is made of them (``snapshots/<commit>/*`` link to ``../../blobs/``, outside the snapshot folder).
    Links to folders are followed only while their real path stays inside the folder's real path: one
    that leaves it (to ``/``, to a home folder) would bring in a whole tree nobody looked at, and is
    refused, as is a link back to a folder it lies in (a loop). Both before anything is written.
    """
    if not directory.is_dir():
        raise SourceDirectoryError(f"{directory} is not a directory: give the folder that holds the model")
    real_root = os.path.realpath(directory)
    real_store = os.path.realpath(store_home) if store_home is not None else None
    if real_store == real_root:
        raise SourceDirectoryError(f"{directory} is the store itself: give the folder that holds the model")
    found: list[SourceFile] = []
    outside: list[str] = []  # links to files outside the folder: "path -> target"
    # The real paths of each folder walked and of the folders it lies in: a link to one of them is a loop.
    lineage: dict[str, frozenset[str]] = {os.fspath(directory): frozenset({real_root})}
    for root, dirs, names in os.walk(directory, followlinks=True):
        dirs[:] = sorted(
            d for d in dirs
            if not (Path(root) == directory and d in _SKIPPED_DIRS)
            and (real_store is None or os.path.realpath(os.path.join(root, d)) != real_store)
        )  # fmt: skip
        for name in dirs:
            lineage[os.path.join(root, name)] = _enter(Path(root) / name, directory, real_root, lineage[root])
        for name in names:
            absolute = Path(root) / name
            relative = absolute.relative_to(directory).as_posix()
            try:
                validate_path(relative)
            except InvalidPathError as error:
                # (the folder, not the file's name: that one is the error's, shown escaped)
                raise InvalidPathError(f"cannot import a file of {directory}: {error}") from None
            try:
                info = absolute.stat()
            except OSError as error:
                raise SourceDirectoryError(f"cannot read {absolute}: {error.strerror}") from None
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInputError(
                    f"{absolute} is not a regular file; remove it or import another folder"
                )
            found.append(SourceFile(relative, absolute, info.st_size))
            if absolute.is_symlink():
                target = os.path.realpath(absolute)
                # (a Hugging Face cache's blob, as a snapshot folder's links name: what it is made of)
                if (
                    os.path.commonpath([real_root, target]) != real_root
                    and Path(target).parent.name != "blobs"
                ):
                    outside.append(f"{relative} -> {target}")
    if not found:
        raise SourceDirectoryError(f"{directory} holds no files to import")
    if outside:
        # (a clone whose tokenizer.json linked to its user's SSH key served the key to anyone, the import
        # silent: an explorer's trial)
        several = len(outside) != 1
        log.warning("%s: %s of it %s outside it, imported as %s bytes: %s%s; a folder from a clone or an "
                    "archive deserves a look before its repo is served (--private keeps it to the token's "
                    "holders)", directory, f"{len(outside)} files" if several else "1 file",
                    "are links to files" if several else "is a link to a file", "their" if several else "its",
                    "; ".join(outside[:3]), f" and {len(outside) - 3} more" if len(outside) > 3 else "")  # fmt: skip
    return sorted(found, key=lambda f: f.path)


def _enter(folder: Path, directory: Path, real_root: str, above: frozenset[str]) -> frozenset[str]:
    """The real paths of ``folder`` and of the folders it lies in; refuses a folder (a link, since a plain
    folder's real path is its parent's plus its name) that resolves outside the root, or to a folder it
    lies in."""
    real = os.path.realpath(folder)
    if os.path.commonpath([real_root, real]) != real_root:
        raise InvalidInputError(
            f"{folder} is a link to {real}, outside the folder being imported ({directory}): import that "
            "folder on its own, or link or copy its files (links to files are followed anywhere)"
        )
    if real in above:
        raise InvalidInputError(
            f"{folder} is a link to {real}, which holds the link itself: a loop; remove the link"
        )
    return above | {real}


def _card(files: list[SourceFile]) -> dict[str, Any]:
    readme = next((f for f in files if f.path == "README.md" and f.size <= MAX_CARD_BYTES), None)
    return repo_card(readme.absolute.read_text(errors="replace") if readme else None, (f.path for f in files))


def _lfs_patterns(files: list[SourceFile]) -> tuple[str, ...]:
    for source in files:
        if source.path == ".gitattributes":
            return lfs_patterns_from_gitattributes(source.absolute.read_text(errors="replace"))
    return DEFAULT_LFS_PATTERNS


def _stage(
    session: WriteSession, source: SourceFile, chunk_size: int, report: Callable[[int], None],
    durable: bool = True,
) -> tuple[BlobDigest, PartialBlob]:  # fmt: skip
    try:
        handle = open(source.absolute, "rb", buffering=0)  # noqa: SIM115  (closed below)
    except OSError as error:
        raise SourceDirectoryError(f"cannot read {source.absolute}: {error.strerror}") from None
    with handle:
        before = file_stamp(os.fstat(handle.fileno()))
        size = before[0]
        partial = session.new_partial(size)
        partial.writeback = durable  # deferred: the disk is not raced while the hashing runs
        try:
            digest = digest_stream(handle.readinto, size, chunk_size, sink=partial.write, progress=report)
            # (a file written in place meanwhile was stored as a mix of its two versions, its old start and
            # its new end, and said imported: an explorer's trial)
            if written_since(before, file_stamp(os.fstat(handle.fileno()))):
                raise _changed_meanwhile(source.absolute)
        except BaseException:
            partial.discard()
            raise
    return digest, partial


def _changed_meanwhile(source: Path) -> SourceDirectoryError:
    return SourceDirectoryError(f"{source} changed while it was being read (something still writes it): "
                                "import it again once it is written")  # fmt: skip


class HeldContents:
    """What an import finds the store holds already, by hashing a file where it is, before it copies it: a
    folder imported again, or again with one file changed, needed free room for a second copy of all of it (a
    disk mostly of models refused it: an explorer's trial), and wrote every byte again. Tried for a file of a
    size some good blob has (an exact digest, when the caller knows one): a file new to the store is then
    read twice, a held one never copied."""

    def __init__(self, store: Store, writer: BudgetWriter, chunk_size: int) -> None:
        self.store, self.writer, self.chunk_size = store, writer, chunk_size
        self._sizes: set[int] | None = None

    def may_hold(self, size: int, sha256: str | None = None) -> bool:
        """Whether a good blob of ``size`` (or that very ``sha256``) may be there: worth a hash in place. Not
        for a file under one chunk: its copy costs little room, and a folder of 30,000 configs would name each
        in the write's reservation, one write apiece."""
        if size < self.chunk_size:
            return False
        if sha256 is not None:
            return bool(held_good(self.store, [sha256]))
        if self._sizes is None:
            rows = self.store.index.read("SELECT DISTINCT size FROM blobs WHERE state = 'ok' AND size > 0")
            self._sizes = {row["size"] for row in rows}
        return size in self._sizes

    def hashed(self, source: Path, report: Callable[[int], None]) -> BlobDigest:
        """The digests of ``source``, read where it is (nothing written), at its size now."""
        try:
            handle = open(source, "rb", buffering=0)  # noqa: SIM115  (closed below)
        except OSError as error:
            raise SourceDirectoryError(f"cannot read {source}: {error.strerror}") from None
        with handle:
            # (its size now, as a copy takes it: one written since the folder was walked was refused, a review)
            before = file_stamp(os.fstat(handle.fileno()))
            digest = digest_stream(handle.readinto, before[0], self.chunk_size, progress=report)
            if written_since(before, file_stamp(os.fstat(handle.fileno()))):
                raise _changed_meanwhile(source)
            return digest

    def relied_on(self, digest: BlobDigest) -> bool:
        """Whether the store holds ``digest``'s blob good, named first as one this write relies on (kept from
        every process's evictions until it publishes: :meth:`BudgetWriter.reuse`)."""
        self.writer.reuse([digest.sha256])
        with self.store.lock.shared():
            return bool(held_good(self.store, [digest.sha256]))


def _stage_all(
    session: WriteSession,
    files: list[SourceFile],
    chunk_size: int,
    progress: ImportProgress | None,
    durable: bool = True,
    link: bool = False,
    held: HeldContents | None = None,
) -> tuple[list[StagedFile], dict[str, PartialBlob], set[str]]:
    """Copy and hash every file into the session (with ``link``, hard-link those that can be: see
    :func:`stage_blob`); one synced partial per distinct content, and the contents that were linked. A file
    ``held`` finds the store holds is hashed where it is and staged by no partial (publish reuses its blob)."""
    patterns = _lfs_patterns(files)
    total = sum(f.size for f in files)
    staged: list[StagedFile] = []
    partials: dict[str, PartialBlob] = {}
    linked: set[str] = set()
    done_before = 0
    for source in files:

        def report(done: int, path: str = source.path, base: int = done_before) -> None:
            if progress is not None:
                progress(path, base + done, total)

        if held is not None and held.may_hold(source.size):
            digest = held.hashed(source.absolute, report)
            if held.relied_on(digest):
                lfs = is_lfs_path(source.path, digest.size, patterns, GIT_OID_LIMIT)
                staged.append(StagedFile(source.path, digest, _git_oid(digest, lfs), lfs))
                done_before += source.size
                continue
        if link:  # (the file a link in the folder names: linking the link itself would copy; synced)
            real = Path(os.path.realpath(source.absolute))
            digest, partial, was_linked = stage_blob(session, real, chunk_size, report, durable, link=True)
        else:
            digest, partial = _stage(session, source, chunk_size, report, durable)
            was_linked = False
        if digest.sha256 in partials:
            partial.discard()  # the same content twice in one folder
        else:
            if not link:
                partial.sync(durable)
            partials[digest.sha256] = partial
            if was_linked:
                linked.add(digest.sha256)
        lfs = is_lfs_path(source.path, digest.size, patterns, GIT_OID_LIMIT)
        staged.append(StagedFile(source.path, digest, _git_oid(digest, lfs), lfs))
        done_before += source.size
    return staged, partials, linked


def stage_blob(
    session: WriteSession,
    source: Path,
    chunk_size: int,
    report: Callable[[int], None] | None = None,
    durable: bool = True,
    *,
    link: bool = False,
) -> tuple[BlobDigest, PartialBlob, bool]:
    """Hash the file ``source`` into a partial of ``session`` for :func:`~modeldepot.store.publish.publish`:
    returns its digests, the partial (synced: read-only, flushed when ``durable``) and whether it is a hard
    link to ``source`` rather than a copy.

    With ``link`` the partial is a hard link to ``source`` when the file system allows it (the same file
    system, a file this process owns or root): nothing is copied, the inode becomes the blob once placed,
    and it is made read-only (0444, for every name it has) as every blob is. Its bytes are hashed through
    the link after it was made, so the digests are those of the inode the store keeps. Otherwise, or when
    linking fails, the bytes are copied while they are hashed, as :func:`import_dir` does. The caller
    compares the digests with what it expects, and discards the partial when they differ.
    """
    if link:
        linked = _stage_link(session, source, chunk_size, report, durable)
        if linked is not None:
            return linked[0], linked[1], True
    try:
        size = source.stat().st_size
    except OSError as error:
        raise SourceDirectoryError(f"cannot read {source}: {error.strerror}") from None
    digest, partial = _stage(session, SourceFile(source.name, source, size), chunk_size,
                             report or (lambda done: None), durable)  # fmt: skip
    partial.sync(durable)
    return digest, partial, False


def _linking_alone(fd: int) -> bool:
    """Whether this import may link the file open at ``fd`` (an exclusive ``flock`` of it, held until its
    partial is discarded: :attr:`PartialBlob.link_lock`): False while another import links the very same file. Two that did both failed
    ("changed while it was being hashed": each one's link and chmod moved the other's change time) and left
    the user's files read-only (the second noted the mode the first had set). The second copies it instead
    (what it copies is dropped at publish when the first placed the same bytes)."""
    try:
        take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass  # (a file system without flock: linked as before)
    return True


def why_copied(layout: StoreLayout, source: Path) -> str:
    """Why a file an import was asked to link was copied instead, as far as can be told after the fact."""
    try:
        info = os.stat(source)
        store_device = os.stat(layout.blobs).st_dev
    except OSError:
        return "it could not be linked"
    if info.st_dev != store_device:
        return "on another file system than the store"
    if info.st_uid != os.geteuid():
        return "another user's files (their owner could change the store's bytes through them)"
    if _narrows_readers(layout, stat.S_IMODE(info.st_mode)):
        return "fewer may read them than the store's blobs, in a store others may enter"
    with contextlib.suppress(OSError):
        # (a read-only bind mount of the store's disk: the same device, and no link across mounts; said "the
        # file system refused a hard link, or another import ...", an explorer's trial)
        if os.statvfs(source).f_flag & os.ST_RDONLY:
            return "on a read-only mount (a hard link is made on the source's mount only)"
    return "the file system refused a hard link, or another import was linking the same file"


def _narrows_readers(layout: StoreLayout, mode: int) -> bool:
    """Whether a file of ``mode`` taken as a blob by a hard link (which keeps its readers: a 0600 file becomes
    0400) would have fewer readers than the store's own blobs (0444) in a store others may enter (no folder
    from / to its home closed to them): such a file is copied. Linked, an adopted private cache made its blobs its owner's alone,
    and every repo of the same bytes, pulled or imported later, unreadable to the other users of a shared
    store (a trial)."""
    if mode & 0o444 == 0o444:
        return False
    folder = os.path.realpath(layout.home)
    while True:  # (a folder on the way that neither its group nor others may enter keeps everyone else out)
        try:
            if _closed_to_others(os.stat(folder)):
                return False
        except OSError:
            return False
        parent = os.path.dirname(folder)
        if parent == folder:
            return True
        folder = parent


def _closed_to_others(info: os.stat_result) -> bool:
    """Whether no user but this one (and root) may enter the folder: it is this user's (a folder of another's
    keeps its owner in: root linking a 0600 file into alice's store made a blob she could not read, a
    review), and others may not enter, nor its group, unless that is this user's own group alone (a
    user-private group, as Debian and Ubuntu make them: a home of 0750 is its owner's alone; counted open,
    every private file of a personal store was copied, a review)."""
    if info.st_uid != os.geteuid() or info.st_mode & 0o001:
        return False
    return not info.st_mode & 0o010 or _own_private_group(info.st_uid, info.st_gid)


@functools.lru_cache(maxsize=64)
def _own_private_group(uid: int, gid: int) -> bool:
    """Whether ``gid`` is the user-private group of ``uid``: named as the user, its primary group, no other
    member listed (one lookup per pair: with LDAP each may be a request)."""
    try:
        user = pwd.getpwuid(uid)
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return group.gr_name == user.pw_name and user.pw_gid == gid and set(group.gr_mem) <= {user.pw_name}


def _stage_link(
    session: WriteSession, source: Path, chunk_size: int, report: Callable[[int], None] | None, durable: bool
) -> tuple[BlobDigest, PartialBlob] | None:
    """A partial that is a hard link to ``source``, hashed; None when the file cannot be linked (another
    file system, a file of another user, a file system without hard links): then the caller copies it."""
    partial = session.new_partial(0)  # an empty file under the session's next name: the link replaces it
    os.close(partial.fd)
    partial.fd = -1
    staging = partial.path.name + ".link"
    fd = -1
    # (in the session's folder as opened: store/confined.py)
    with session.layout.folder(partial.path.parent) as folder:
        try:
            # The name itself, never through a symbolic link (a name swapped for a link to another file after
            # the scan must not bring that file in, nor have its mode changed below).
            fd = lock_file(os.open, source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            if not _linking_alone(fd):
                forget_and_close(fd)
                partial.discard()
                return None
            os.link(source, staging, dst_dir_fd=folder, follow_symlinks=False)
            os.replace(staging, partial.path.name, src_dir_fd=folder, dst_dir_fd=folder)
            if os.stat(partial.path.name, dir_fd=folder, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                raise OSError(errno.ESTALE, "the name was given to another file meanwhile")
        except FileNotFoundError:
            if fd >= 0:
                unlock_and_close(fd)
            partial.discard()
            raise SourceDirectoryError(f"cannot read {source}: it is gone") from None
        except OSError:  # EXDEV, EPERM (protected hard links), EMLINK, ENOTSUP, ELOOP (a link): copy instead
            with contextlib.suppress(OSError):
                os.unlink(staging, dir_fd=folder)
            if fd >= 0:
                unlock_and_close(fd)
            partial.discard()
            return None
    partial.fd = fd
    # The lock _linking_alone took, held by a descriptor of its own (sync closes ``fd``) until the file is
    # placed: for as many files as a share of the descriptors allows (an import of thousands of files ran out
    # of them); the files beyond are linked without it (two imports of one file then may leave it read-only).
    if session.link_locks < max(64, open_file_limit() // 4):
        with contextlib.suppress(OSError):
            partial.link_lock = dup_lock(fd)
            session.link_locks += 1
    try:
        info = os.fstat(fd)
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.geteuid()
            or _narrows_readers(session.layout, stat.S_IMODE(info.st_mode))
        ):
            # Another user's file: it could not be made read-only for good (its owner may make it writable
            # again and change the store's blob), root included. It is copied instead.
            partial.discard()
            return None
        partial.keep_mode(source, stat.S_IMODE(info.st_mode))  # (given back if the partial is not placed)
        os.fchmod(fd, partial.read_only)  # before the bytes are read: no new writer may open it from here on
        partial.size = partial.written = info.st_size
        partial.hashed()  # (before: a write from here on is seen, now and when it is placed)
        reader = io.FileIO(fd, "rb", closefd=False)
        digest = digest_stream(reader.readinto, info.st_size, chunk_size, progress=report)
        changed = partial.changed_since_hashed()  # a writer that had it open before: a hash of neither
        if not changed:
            partial.sync(durable)
            partial.hashed()  # (sync made it read-only once more: that moved its change time)
    except OSError as error:
        partial.discard()
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            # The store's side (the note of the file's mode, its flush): a full disk was said to be the source's
            # fault, each adopted cache blob "unreadable: cannot read <blob>: No space left on device" (an
            # explorer's trial)
            raise os_error(error, f"linking {source} into the store") from error
        raise SourceDirectoryError(f"cannot read {source}: {error.strerror}") from None
    except BaseException:
        partial.discard()
        raise
    if changed:
        partial.discard()
        raise _changed_meanwhile(source)
    return digest, partial


def import_dir(
    store: Store,
    directory: Path | str,
    repo_id: str,
    revision: str = "main",
    private: bool | None = None,
    progress: ImportProgress | None = None,
    link: bool = False,
) -> ImportResult:
    """Publish the folder ``directory`` as ``repo_id`` at branch ``revision``; ``private`` sets the repo's
    visibility (None keeps it; a new repo is public). With ``link``, each file the
    store lacks becomes a blob by a hard link, not a copy, where the file system allows (the same one, a
    file of this user): it is then made read-only, as every blob is (see :func:`stage_blob`)."""
    if not isinstance(directory, (str, os.PathLike)):  # (None gave a bare TypeError: an explorer's trial)
        raise InvalidInputError(
            f"the folder to import is a path, not {type(directory).__name__}: {directory!r}"
        )
    validate_repo_id(repo_id)
    validate_new_branch(revision)
    refuse_nested_branch(store.index, repo_id, revision)
    files = scan_source(Path(directory), store.home)
    doing = f"importing {repo_id}"
    sweep_dead_sessions(store)
    with store.budget.writing(repo_id) as writer, WriteSession(store.layout) as session:
        # Before a byte is written, refuse what surely cannot fit (the files no blob of the same size may
        # hold); once hashed, make room for the blobs really new, keeping those it shares from eviction.
        # (a file to be hard-linked takes no room: an `import --link` of a folder bigger than the budget was
        # refused, a trial, which the adoption of a cache by links never was)
        to_copy = [f.size for f in files if not (link and likely_linked(store, f.absolute))]
        writer.check_fits(likely_new_bytes(store, to_copy), doing)
        held = HeldContents(store, writer, store.chunk_size)
        staged, partials, linked = _stage_all(session, files, store.chunk_size, progress,
                                              not store.durability.deferred, link, held)  # fmt: skip
        room_for_new(store, writer, partials, doing, free=linked)
        trees = tree_oids(TreeEntry(s.path, s.git_oid) for s in staged)
        spec = RevisionSpec(repo_id, "", revision, private, "import", _card(files), trees[""], on_head=True)
        recorded: list[RevisionSpec] = []
        new = publish(store, spec, staged, partials, writer.published, recorded)
        # (as the store spells the repo: an import of it typed in another case, at once, may have made it)
        repo_id, commit_id = recorded[0].repo_id, recorded[0].commit_id
        writer.keep_within()
    # An import is a use (the disk budget evicts the least recently used), of the commit it made or found
    store.access.record(repo_id, count=0, commit_id=commit_id)
    new_blobs = {sha256: p.size for sha256, p in partials.items() if sha256 in new}
    copied = {
        s.digest.sha256 for s in staged if s.digest.sha256 in new_blobs and s.digest.sha256 not in linked
    }
    # (said of each file, not guessed: the CLI said "another file system or another user's files" of a private
    # file of the user's own, copied lest it narrow who reads the store's blobs, an explorer's trial)
    reasons = dict.fromkeys(
        why_copied(store.layout, Path(os.path.realpath(f.absolute)))
        for f, s in zip(files, staged, strict=True)
        if link and s.digest.sha256 in copied
    )
    return ImportResult(
        repo_id=repo_id,
        revision=revision,
        commit_id=commit_id,
        files=len(staged),
        bytes=sum(f.size for f in files),
        new_blobs=len(new_blobs),
        new_bytes=sum(new_blobs.values()),
        snapshot_path=str(store.snapshots.path(repo_id, commit_id)),
        linked_bytes=sum(size for sha256, size in new_blobs.items() if sha256 in linked),
        copied_because=tuple(reasons),
        snapshot_built=store.snapshot_complete(repo_id, commit_id),
    )


def room_for_new(
    store: Store,
    writer: BudgetWriter,
    partials: dict[str, PartialBlob],
    doing: str,
    free: Set[str] = frozenset(),
) -> None:
    """Make room for the staged ``partials`` whose contents the store lacks (but those in ``free``: linked
    from files the budget does not count), and keep the blobs it holds of the others from eviction (in every
    process) until they are published."""
    # Every staged content is named first (naming one the store lacks keeps nothing), then read once under
    # the lock removals take, which read what writers rely on under it: a blob there then stays, one gone is
    # new, and room is made for it. (Placed at publish with no room asked, two imports beside each other
    # ended over the budget: a trial; so did one placed by another process between two reads, a review.)
    writer.reuse(partials)
    with store.lock.shared():
        known = blob_states(store.index, list(partials))
    writer.make_room(
        sum(p.size for sha256, p in partials.items() if known.get(sha256) != "ok" and sha256 not in free),
        doing,
    )


def likely_linked(store: Store, source: Path) -> bool:
    """Whether ``source`` may become a blob by a hard link (on the store's file system, and the user's own:
    another's is copied, as :func:`stage_blob` does), taking no room the disk budget counts."""
    try:
        info = os.stat(source)
        same = info.st_dev == os.stat(store.layout.blobs).st_dev and info.st_uid == os.geteuid()
    except OSError:
        return False
    # (a file fewer may read than the store's blobs, in a store others may enter, is copied: a review)
    return same and not _narrows_readers(store.layout, stat.S_IMODE(info.st_mode))


def likely_new_bytes(store: Store, sizes: list[int]) -> int:
    """The sum of the ``sizes`` no blob in the store has (a lower bound of what is new: contents of equal
    sizes may differ), for a disk budget's check before anything is written."""
    held: set[int] = set()
    batch = sorted(set(sizes))
    for start in range(0, len(batch), 500):
        part = batch[start : start + 500]
        marks = ",".join("?" * len(part))
        rows = store.index.read(
            f"SELECT DISTINCT size FROM blobs WHERE state = 'ok' AND size IN ({marks})", tuple(part)
        )
        held.update(r["size"] for r in rows)
    return sum(size for size in sizes if size not in held)
