"""Making a stored repo appear in a Hugging Face cache (:func:`export_to_hf_cache`; see the package's doc)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from modeldepot.errors import (
    BlobRemovedError,
    CorruptBlobError,
    InvalidInputError,
    StoreError,
)
from modeldepot.hfcache.cache import (
    ETAG,
    HfCacheExportResult,
    HfCacheProblem,
    Progress,
    cache_dir_given,
    etag_of_file,
    looks_like_a_cache,
    moved_repo_folder,
    repo_folder_name,
    unlink_quietly,
    within,
)
from modeldepot.store.locks import lock_file, take_flock, unlock_and_close
from modeldepot.store.models import BlobRecord, FileEntry
from modeldepot.store.store import Store
from modeldepot.tiers import Tiers
from modeldepot.validation import (
    SHORT_COMMIT,
    is_commit_id,
    validate_path,
    validate_revision,
)


def export_to_hf_cache(
    store: Store,
    repo_id: str,
    revision: str = "main",
    cache_dir: str | Path | None = None,
    *,
    copy: bool = False,
    progress: Progress | None = None,
    skip: frozenset[str] = frozenset(),
    move_ref: bool = False,
    set_ref: bool = True,
    added: Adding | None = None,
) -> HfCacheExportResult:
    """Make ``repo_id`` at ``revision`` appear in a Hugging Face cache (default: huggingface_hub's), as a
    download of it from the Hub would have left it; ``refs/<revision>`` too when it is a branch.

    Blobs are hard links to the store's when the file systems allow (else copies, chunk-verified; always
    with ``copy``); a blob the cache already holds with the right bytes is kept. Refuses (InvalidInputError)
    to write through a link that leads out of the cache. A file whose blob the store has quarantined is
    skipped and reported.

    The cache's folder is named by ``repo_id`` as given, even when the store holds the repo under another
    case: huggingface_hub looks it up with the case its caller uses (``from_pretrained("Org/Name")``).
    ``skip``: paths left out (exported from another store already: a commit split across stores).
    ``move_ref``: move ``refs/<revision>`` even when it names another commit the cache holds (a newer
    download, maybe: moved back, offline code loaded older weights without a word, a trial); without it
    such a ref stays, and the result says so (not ``ok``). ``set_ref`` False: the ref is left to the caller
    (:func:`branch_ref`). ``added``: what exports of this commit from other stores added before (a commit
    split across stores), taken back with this one's when it fails; this one's are added to it, and the
    caller ends it (:meth:`_CacheWriter.finish`) once every store gave its part.
    """
    held = store.spelled(repo_id)
    validate_revision(revision)
    cache = cache_dir_given(cache_dir)
    commit_id = store.resolve(held, revision)
    entries = [e for e in store.files(held, commit_id) if e.path not in skip]
    if within(os.path.realpath(store.home), os.path.realpath(cache)):
        raise InvalidInputError(f"{cache} is inside the store ({store.home}): give the Hugging Face cache "
                                "(HF_HUB_CACHE, e.g. ~/.cache/huggingface/hub)")  # fmt: skip
    problems: list[HfCacheProblem] = []
    if os.path.lexists(cache) and not cache.is_dir():  # ("cannot create …: File exists" named no cause)
        raise InvalidInputError(f"{cache} is a file, not a folder: give the Hugging Face cache's folder")
    if not cache.is_dir():
        # (a typo in --cache-dir made a cache nothing reads, without a word: a trial)
        problems.append(HfCacheProblem(repo_id, str(cache), "new-cache", f"no Hugging Face cache was at {cache}: "
                                       "one was made (is it the one your tools read? HF_HUB_CACHE, HF_HOME)"))  # fmt: skip
    elif not looks_like_a_cache(cache) and any(cache.iterdir()):
        # (a folder of other things, `--cache-dir .`, took a models--* folder without a word, where an import
        # refuses it: an explorer's trial)
        problems.append(HfCacheProblem(repo_id, str(cache), "new-cache", f"{cache} held no Hugging Face cache (no "
                                       "models--* folder, .locks or CACHEDIR.TAG): one was made in it (is it the one "
                                       "your tools read? HF_HUB_CACHE, HF_HOME)"))  # fmt: skip
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(f"cannot create the Hugging Face cache folder {cache}: {error.strerror}") from None
    writer = _CacheWriter(cache, repo_folder_name(repo_id), added)
    blobs = writer.folder("blobs")
    writer.sweep(blobs)
    writer.sweep(writer.root)  # (the links' and refs' temporaries are made in the repo's folder)
    snapshot = writer.root / "snapshots" / commit_id
    building = writer.building(commit_id)
    counts = {"linked": 0, "copied": 0, "kept": 0}
    total, done, exported, exported_bytes = sum(e.size for e in entries), 0, 0, 0
    try:
        for listed in entries:
            path = f"{writer.name}/snapshots/{commit_id}/{listed.path}"
            try:
                entry = store.entry(held, validate_path(listed.path), commit_id)
                etag = entry.etag
                if ETAG.fullmatch(etag) is None:
                    raise CorruptBlobError(entry.sha256, f"its ETag {etag!r} is not a digest")
                counts[writer.blob(store, entry, blobs / etag, link=not copy)] += 1
            except CorruptBlobError as error:
                problems.append(HfCacheProblem(repo_id, path, "corrupt", f"skipped: {error}"))
                if ETAG.fullmatch(listed.etag):  # (a name of the index's, checked before it makes a path)
                    writer.drop_if_damaged(listed, blobs / listed.etag)
            except BlobRemovedError as error:  # (an `rm` or the budget beside the export)
                problems.append(HfCacheProblem(repo_id, path, "missing", f"skipped: {error}"))
            else:
                if writer.link(building, entry.path, blobs / etag):
                    exported, exported_bytes = exported + 1, exported_bytes + entry.size
                else:
                    problems.append(HfCacheProblem(repo_id, path, "own-file", "a file of its own is there, not a "
                                                   "link to the commit's: left as it is (remove it and export again "
                                                   "for the commit's)"))  # fmt: skip
            done += listed.size
            if progress is not None:
                progress(f"{repo_id}/{listed.path}", done, total)
        if added is None:
            writer.finish(commit_id)
    except BaseException as failed:
        # What this run added is taken back: a snapshot left with part of the commit's files is what
        # huggingface_hub hands an offline `snapshot_download(revision=<commit>)` (a disk that filled
        # mid-export left the configs without the weights: an explorer's trial)
        writer.take_back(commit_id)
        writer.drop_if_empty(snapshot)
        writer.drop_made_folders()
        if isinstance(failed, StoreError):
            failed.args = (f"{failed}; nothing of this export was kept",)
        raise
    finally:
        writer.drop_if_empty(snapshot)
    for removed in writer.removed:
        problems.append(HfCacheProblem(repo_id, f"{writer.name}/blobs/{removed.name}", "removed", "the cache's file "
                                       "held other bytes than its name's, and the store's are corrupt too: taken out "
                                       "of the cache (offline loads fail for it, rather than read them); pull or "
                                       "import it again, then export"))  # fmt: skip
    for repaired in writer.repaired:
        problems.append(HfCacheProblem(repo_id, f"{writer.name}/blobs/{repaired.name}", "repaired", "the cache's "
                                       "file held other bytes than its name's (corrupt): replaced by the store's "
                                       "verified ones"))  # fmt: skip
    if set_ref and exported:
        lacking = len(entries) - exported - sum(p.problem == "own-file" for p in problems)
        problems.extend(branch_ref(store, repo_id, revision, commit_id, cache, move_ref, lacking))
    if repo_id != held:
        problems.append(HfCacheProblem(repo_id, writer.name, "spelling", f"exported as {repo_id!r}, as typed: "
                                       f"huggingface_hub finds it when asked for that spelling; the store spells it "
                                       f"{held!r} (export {held} for that one)"))  # fmt: skip
    return HfCacheExportResult(
        repo_id=repo_id,
        revision=revision,
        commit_id=commit_id,
        cache_dir=str(cache),
        snapshot_path=str(snapshot),
        files=exported,
        bytes=exported_bytes,
        problems=tuple(problems),
        linked=counts["linked"],
        copied=counts["copied"],
        kept=counts["kept"],
    )


def branch_ref(store: Store, repo_id: str, revision: str, commit_id: str, cache: Path, move: bool,
               lacking: int) -> list[HfCacheProblem]:  # fmt: skip
    """``refs/<revision>`` of an exported commit, when ``revision`` is a branch or the start of a commit id (as
    huggingface_hub writes one for a download by it; not a whole commit id), and what became of it. Not when its snapshot lacks ``lacking`` files (skipped: corrupt, removed):
    offline loaders found such a snapshot, and failed for the file with "couldn't connect" (a trial); the
    ref is left as it was, said as a problem. So it is when the repo was removed from the store meanwhile
    (an `rm` beside the export: its files went out whole, and the export failed "not in the store" after
    them, leaving them all, an explorer's trial), or the branch alone."""
    held = store.spelled(repo_id)
    branch = bool(store.index.read("SELECT 1 FROM refs WHERE repo_id = ? AND name = ?", (held, revision)))
    if not branch and is_commit_id(revision.lower()):
        return []  # (exported by its commit: no ref names it)
    short = not branch and SHORT_COMMIT.fullmatch(revision.lower()) is not None  # (by the start of its id)
    if not branch and not short:
        gone = "the branch" if store.index.read("SELECT 1 FROM repos WHERE repo_id = ?", (held,)) else repo_id
        return [HfCacheProblem(repo_id, f"{repo_folder_name(repo_id)}/refs/{revision}", "ref-not-set",
                               f"not set to {commit_id[:12]}: {gone} was removed from the store while it was "
                               "exported (its files were exported whole)")]  # fmt: skip
    writer = _CacheWriter(cache, repo_folder_name(repo_id))
    if lacking:
        origin = store.origin(held)
        # (of an imported repo, a pull would ask the Hub for another repo of its name: an explorer's trial)
        again = ("import it again" if origin is not None and origin[0] == "import"
                 else f"`modeldepot pull {held} -r {commit_id}` fetches them again")  # fmt: skip
        # (an export before set it: "not set" was untrue, a trial)
        if writer.ref_target(revision) == commit_id:
            said = (f"it names {commit_id[:12]} (an export before), whose snapshot lacks the {lacking} file(s) "
                    "skipped now: offline loads of them fail")  # fmt: skip
        else:
            said = f"not set to {commit_id[:12]}: its snapshot lacks the {lacking} file(s) skipped"
        return [HfCacheProblem(repo_id, f"{writer.name}/refs/{revision}", "ref-not-set",
                               f"{said} ({again}; then export again)")]  # fmt: skip

    if short:
        # refs/<those digits>, as huggingface_hub writes one for a download by them: offline code asking for the
        # revision the export was given finds it (without, hf_hub_download(revision=<them>) failed, a trial)
        writer.ref(revision, commit_id)
        return []

    def known(commit: str) -> bool:
        """Whether the store knows ``commit`` and learned where its branch is after the cache's ref was
        written: an export before, the branch moved since. A commit the store adopted from this cache (a
        download newer than the store's branch) is not: the ref named it, and an export moved it back to
        the store's older commit, offline code loading the old config (an explorer's trial)."""
        if not store.index.read(
            "SELECT 1 FROM revisions WHERE repo_id = ? AND commit_id = ?", (held, commit)
        ):
            return False
        # (when the branch took its commit here, its publish, or the scan that saw it there last: a scan's
        # time alone was older than an export made while the pull ran, and the next export kept the cache's
        # ref at the old commit, a review)
        learned = store.index.read(
            "SELECT MAX(r.updated_at, v.created_at) AS at FROM refs r JOIN revisions v USING (repo_id, commit_id) "
            "WHERE r.repo_id = ? AND r.name = ?", (held, revision),
        )  # fmt: skip
        written = writer.ref_written(revision)
        return not learned or written is None or float(learned[0]["at"]) >= written

    return _set_ref(writer, repo_id, revision, commit_id, move, known)


def _set_ref(writer: _CacheWriter, repo_id: str, branch: str, commit_id: str, move: bool,
             known: Callable[[str], bool]) -> list[HfCacheProblem]:  # fmt: skip
    """``refs/<branch>`` set to ``commit_id``; what became of another commit it named, as a problem. A ref
    to a snapshot the cache holds of a commit the store does not know, or written after the store learned
    where the branch is (``known``: a newer download, maybe, the store may have adopted) stays unless
    ``move``; one the store knows from before (an export before, the branch moved since) moves."""
    before = writer.ref_target(branch)
    path = f"{writer.name}/refs/{branch}"
    if (
        before is not None
        and before != commit_id
        and not move
        and writer.holds_snapshot(before)
        and not known(before)
    ):
        return [HfCacheProblem(repo_id, path, "ref-kept", f"it names {before[:12]}, a snapshot the cache holds of a "
                               f"commit the store does not know, or downloaded after the store learned where "
                               f"{branch} is (a newer download, maybe): left as it is, so offline code "
                               f"asking for {branch} still loads that one; the snapshot of {commit_id[:12]} is "
                               f"exported (--move-ref moves {branch} to it)")]  # fmt: skip
    writer.ref(branch, commit_id)
    if before is not None and before != commit_id:
        return [HfCacheProblem(repo_id, path, "ref-moved", f"moved from {before[:12]} to {commit_id[:12]}")]
    return []


@dataclasses.dataclass
class Adding:
    """What an export of one commit adds to a repo's folder of the cache (from one store, or from several in
    turn: :func:`export_through_tiers`), until it ends: taken back whole when it fails, and by the next
    export's sweep when it was killed (its journal's lock free)."""

    made: list[Path] = dataclasses.field(default_factory=list)  # the blobs and links added
    # ``<repo>/.modeldepot-<pid>-<hex>.added``: the names of ``made`` outside the staging folder, each written
    # before the name is made; made first, and held locked (flock) for the whole export: the lock, not the
    # pid, says it runs (a pid is another's in another container's namespace, or on another host of a shared
    # cache: an export taken for dead there had its staging folder swept, and published the rest as the
    # commit, a review)
    journal: Path | None = None
    journal_fd: int | None = None
    # ``<repo>/.modeldepot-<pid>-<hex>.snap`` (the journal's name but its suffix): a snapshot the cache did not
    # hold is built in it, under ``<commit>/``, and moved into ``snapshots/`` whole (at the same depth: its
    # links read as they will there)
    staging: Path | None = None


class _CacheWriter:
    """Writes one repo's folder of a cache; every folder it writes into is checked to lie inside the cache
    (its real path) before anything is created in it, and every name appears by an atomic rename."""

    def __init__(self, cache: Path, name: str, adding: Adding | None = None) -> None:
        self.cache = cache
        self.real = os.path.realpath(cache)
        self.name = name
        # The repo's folder moved to another disk and linked back under its own name (to free the home disk:
        # huggingface_hub reads it so): what lies inside its real path is inside the cache too
        self.repo_real = moved_repo_folder(cache / name)
        self.made_folders: list[Path] = []  # the folders this writer created, in order
        self.root = self.folder("")
        # what this writer (and those of the same export before it) added, blobs and snapshot links
        self.adding = adding if adding is not None else Adding()
        self.repaired: list[Path] = []  # blobs of the cache whose bytes were not their name's, replaced
        # blobs of the cache whose bytes were not their name's, the store's corrupt too: taken out
        self.removed: list[Path] = []

    def take_back(self, commit_id: str) -> None:
        """Remove what this export added (it failed): its staging folder, the links it added to the snapshot
        the cache held, and the snapshot's folders left empty; the blobs it added. A blob it added that a link
        of the repo's snapshots leads to now stays (another export, or huggingface_hub, linked it meanwhile:
        removed, their snapshot was left a broken link, a review)."""
        blobs = self.root / "blobs"
        for name in reversed(self.adding.made):
            if name.parent != blobs:
                unlink_quietly(name)
        if self.adding.staging is not None:
            # (before the blobs are weighed: its links are no other snapshot's)
            _remove_folder(self.adding.staging)
            self.adding.staging = None
        linked = self._blobs_linked()
        for name in self.adding.made:
            if name.parent == blobs and name.name not in linked:
                unlink_quietly(name)
        self.adding.made.clear()
        snapshot = self.root / "snapshots" / commit_id
        for current, _, _ in sorted(os.walk(snapshot), key=lambda found: -len(found[0])):
            if current != str(snapshot):
                with contextlib.suppress(OSError):
                    os.rmdir(current)
        self._drop_journal()

    def building(self, commit_id: str) -> Path:
        """The folder this export links the commit's files in: a staging folder, moved into ``snapshots/`` whole
        by :meth:`finish` (into a snapshot the cache holds, the links it lacks are moved in, each journaled
        first). A snapshot grown a link at a time was, killed half-way, the commit to huggingface_hub: an
        offline ``snapshot_download(revision=<commit>)`` returned a config without weights (a review); and one
        the cache held grew its links over the whole export, its blobs copied between them (a review)."""
        journal = self._begin()
        if self.adding.staging is None:
            self.folder("snapshots")  # (a repo's folder without it is a corrupt one to scan_cache_dir)
            self.adding.staging = self.folder(journal.name[: -len(".added")] + ".snap")
        self._check_staging()
        return self.folder(f"{self.adding.staging.name}/{commit_id}")

    def _begin(self) -> Path:
        """This export's journal, made (empty) and locked for its whole run: see :class:`Adding`."""
        if self.adding.journal is not None:
            return self.adding.journal
        temporary = self._temporary(self.root)
        journal = temporary.with_suffix(".added")
        try:
            fd = lock_file(
                os.open,
                temporary,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
            )
        except OSError as error:
            raise StoreError(f"cannot write {journal} in the Hugging Face cache: {error.strerror}") from None
        try:
            # Locked before it is named a journal: a sweep never finds it free while this export runs
            take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(temporary, journal)
        except OSError as error:
            unlock_and_close(fd)
            unlink_quietly(temporary)
            raise StoreError(f"cannot write {journal} in the Hugging Face cache: {error.strerror}") from None
        self.adding.journal, self.adding.journal_fd = journal, fd
        return journal

    def _check_staging(self) -> None:
        """The staging folder is still this export's (never made again in silence: what it held would be missing
        from the snapshot moved into place, the commit to huggingface_hub)."""
        staging = self.adding.staging
        if staging is not None and not (staging.is_dir() and not staging.is_symlink()):
            raise StoreError(f"the folder this export built the snapshot in, {staging}, went while it ran (removed "
                             "by hand, or by another export that took this one for ended): nothing of it is "
                             "published; export again")  # fmt: skip

    def finish(self, commit_id: str) -> None:
        """The export done: the snapshot built in the staging folder moved into ``snapshots/`` whole (unless
        nothing was linked in it), and the journal dropped. Refs are written after this."""
        staging = self.adding.staging
        if staging is not None:
            self._check_staging()
            built = staging / commit_id
            missing = [
                name
                for name in self.adding.made
                if within(str(staging), str(name)) and not os.path.lexists(name)
            ]
            if missing:
                raise StoreError(f"{missing[0]} went from the folder this export built the snapshot in: nothing of it "
                                 "is published; export again")  # fmt: skip
            try:
                with os.scandir(built) as entries:
                    linked = any(entries)
            except OSError:
                linked = False
            if linked:
                try:
                    os.rename(built, self.folder("snapshots") / commit_id)
                except OSError:
                    # (another export, or a download, made that snapshot meanwhile: this one's links join it)
                    self._merge(built, commit_id)
            _remove_folder(staging)
            self.adding.staging = None
        self._drop_journal()

    def _merge(self, built: Path, commit_id: str) -> None:
        """Move the links of ``built`` into the cache's snapshot of ``commit_id``: each one it lacks (journaled
        first), or in place of a link there to another blob; a file of the user's there stays as it is."""
        for current, _, names in os.walk(built):
            relative = Path(current).relative_to(built).as_posix()
            for name in names:
                folder = self.folder(f"snapshots/{commit_id}" + ("" if relative == "." else f"/{relative}"))
                final = folder / name
                if os.path.lexists(final) and not os.path.islink(final):
                    continue  # (made meanwhile by the user: left alone, as link() leaves one)
                try:
                    if not os.path.lexists(final):
                        self.record(final)
                    os.replace(Path(current, name), final)
                except OSError as error:
                    raise StoreError(
                        f"cannot write {final} in the Hugging Face cache: {error.strerror}"
                    ) from None

    def record(self, name: Path) -> None:
        """Note that ``name`` (a blob, or a link) is about to be made: in the journal too when it is not in the
        staging folder, which the sweep removes whole. One line appended per name, by one write: a kill leaves
        every line whole but maybe the last, and that one names nothing made yet."""
        self.adding.made.append(name)
        if self.adding.staging is not None and within(str(self.adding.staging), str(name)):
            return
        self._begin()
        assert self.adding.journal_fd is not None
        try:
            os.write(self.adding.journal_fd, f"{name.relative_to(self.root).as_posix()}\n".encode())
        except OSError as error:
            raise StoreError(
                f"cannot write {self.adding.journal} in the Hugging Face cache: {error.strerror}"
            ) from None

    def _drop_journal(self) -> None:
        """The export is over: its journal goes, then its lock (removed while held: no sweep takes it meanwhile)."""
        if self.adding.journal is not None:
            unlink_quietly(self.adding.journal)
            self.adding.journal = None
        if self.adding.journal_fd is not None:
            unlock_and_close(self.adding.journal_fd)
            self.adding.journal_fd = None

    def folder(self, relative: str) -> Path:
        """``<cache>/<repo folder>/<relative>``, created a level at a time, each level checked first."""
        current = self.cache
        for part in [self.name, *(p for p in relative.split("/") if p)]:
            current = current / part
            try:
                current.mkdir()
                self.made_folders.append(current)
            except FileExistsError:
                pass
            except OSError as error:
                raise StoreError(
                    f"cannot create {current} in the Hugging Face cache: {error.strerror}"
                ) from None
            real = os.path.realpath(current)
            if not self.inside(real) or not os.path.isdir(real):
                raise InvalidInputError(
                    f"{current} leads to {real}, not a folder inside the cache at {self.cache}: refusing to "
                    "write there (remove that link)"
                )
        return current

    def inside(self, real: str) -> bool:
        """Whether a real path lies inside the cache (or inside the repo's folder moved out of it)."""
        return within(self.real, real) or (self.repo_real is not None and within(self.repo_real, real))

    def _temporary(self, folder: Path) -> Path:
        return folder / f".modeldepot-{os.getpid()}-{secrets.token_hex(6)}.tmp"

    def sweep(self, folder: Path) -> None:
        """Remove what an export killed left in ``folder``: its temporary files (its process gone), and, its
        journal's lock free, the snapshot it was building and what its journal says it added (the blobs no
        snapshot links to)."""
        try:
            names = os.listdir(folder)
        except OSError:
            return
        left = [(found, name) for name in names if (found := _LEFT.fullmatch(name)) is not None]
        for found, name in left:
            if found["kind"] == "tmp" and not _alive(int(found["pid"])):
                unlink_quietly(folder / name)
        if folder != self.root:
            return
        for found, name in left:
            journal = folder / f".modeldepot-{found['pid']}-{found['token']}.added"
            if found["kind"] == "snap" and not os.path.lexists(journal):
                _remove_folder(folder / name)  # (its journal, made first and dropped last, is gone: it ended)
            elif found["kind"] == "added":
                self._take_back_dead(journal)

    def _take_back_dead(self, journal: Path) -> None:
        """When no export holds ``journal``'s lock (it was killed): its staging folder removed whole, then what
        its journal names taken back as :meth:`take_back` does, then the journal (while locked: a later sweep
        finds nothing)."""
        try:  # (not a FIFO, nor a link another member of a shared cache put there: never waited on, nor followed)
            fd = lock_file(os.open, journal, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return
            try:
                take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # (its export runs)
            _remove_folder(journal.with_suffix(".snap"))
            blocks: list[bytes] = []
            while (got := sum(map(len, blocks))) < _MAX_JOURNAL_BYTES and (
                block := os.read(fd, min(1 << 20, _MAX_JOURNAL_BYTES - got))
            ):
                blocks.append(block)
            lines = b"".join(blocks).decode("utf-8", "replace").split("\n")[:-1]
            self._take_back_lines(lines)
            unlink_quietly(journal)
        finally:
            unlock_and_close(fd)

    def _take_back_lines(self, lines: list[str]) -> None:
        """Take back what a killed export's journal names. Its lines are checked as any name read from a cache
        (it may be another user's): a link of a snapshot, or a blob, inside this repo's folder, each removed by a
        name opened level by level without following a link."""
        blobs = set()
        for line in lines:
            kind, _, rest = line.partition("/")
            if kind == "blobs" and ETAG.fullmatch(rest):
                blobs.add(rest)
                continue
            commit, _, path = rest.partition("/")
            if kind != "snapshots" or not is_commit_id(commit):
                continue
            try:
                parts = ["snapshots", commit, *validate_path(path).split("/")]
            except InvalidInputError:
                continue
            if self._unlink(parts, links_only=True):
                self._drop_empty(parts[:-1], keep=1)
        linked = self._blobs_linked()
        for etag in blobs - linked:
            self._unlink(["blobs", etag], links_only=False)

    def _unlink(self, parts: list[str], *, links_only: bool) -> bool:
        """Remove ``<repo>/<parts...>``, a link (or, unless ``links_only``, a file): True when it was."""
        fd = self._open_folder(parts[:-1])
        if fd is None:
            return False
        try:
            kind = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode
            if not stat.S_ISLNK(kind) and (links_only or not stat.S_ISREG(kind)):
                return False
            os.unlink(parts[-1], dir_fd=fd)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _drop_empty(self, parts: list[str], keep: int) -> None:
        """Remove the folder ``<repo>/<parts...>`` and those above it that are left empty, but the ``keep``
        first levels."""
        while len(parts) > keep:
            fd = self._open_folder(parts[:-1])
            if fd is None:
                return
            try:
                os.rmdir(parts[-1], dir_fd=fd)
            except OSError:
                return
            finally:
                os.close(fd)
            parts = parts[:-1]

    def _open_folder(self, parts: list[str]) -> int | None:
        """A descriptor of the folder ``<repo>/<parts...>``, each level opened without following a link (a
        link in the way, planted to lead out of the cache, is no way in); None when it is not there."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        for part in parts:
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                os.close(fd)
                return None
            os.close(fd)
            fd = inner
        return fd

    def drop_no_exist(self, commit_id: str, path: str) -> None:
        """Remove huggingface_hub's note that the commit has no such file (``.no_exist/<commit>/<path>``),
        which ``try_to_load_from_cache`` reads before the snapshot: the file it has now stayed unseen (a
        review). Its folders are opened without following a link, so no file outside the repo's folder goes."""
        self._unlink([".no_exist", commit_id, *path.split("/")], links_only=False)

    def _blobs_linked(self) -> set[str]:
        """The names in blobs/ that a link of the repo's snapshots leads to, or of the snapshots other exports
        are building (a blob this one added, one of theirs found there and linked)."""
        linked: set[str] = set()
        folders = [self.root / "snapshots"]
        with contextlib.suppress(OSError):
            folders += [self.root / name for name in os.listdir(self.root) if _STAGING.fullmatch(name)]
        for folder in folders:
            for current, _, names in os.walk(folder):
                for name in names:
                    with contextlib.suppress(OSError):
                        target = os.readlink(os.path.join(current, name))
                        if os.path.basename(os.path.dirname(target)) == "blobs":
                            linked.add(os.path.basename(target))
        return linked

    def drop_made_folders(self) -> None:
        """Remove the folders this writer created that are empty (a failed export of a repo new to the cache
        left its ``models--*`` folder with empty ``blobs`` and ``snapshots``: an explorer's trial)."""
        for folder in reversed(self.made_folders):
            with contextlib.suppress(OSError):
                folder.rmdir()

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
        store.check_if_changed(record)
        held = self._holds(store, entry, target)
        if held == "ours" or (held == "same" and not (link and self._share(store, record, target))):
            return "kept"
        if held == "same":
            return "linked"
        # a file of the cache with other bytes than its name's: replaced, and said (it was without a word: the user
        # may have copies of those bytes); not a dangling link, nor one out of the cache (a review)
        damaged = os.path.isfile(target) and self.inside(os.path.realpath(target))
        temporary = self._temporary(target.parent)
        try:
            how = "linked" if link and _link_blob(store, record, temporary) else "copied"
            if how == "copied":
                _copy_blob(store, record, temporary)
            if not os.path.lexists(target):
                self.record(target)
            os.replace(temporary, target)
            # (a rename over another link to the same file does nothing, its name left behind: an export
            # beside this one linked the store's blob there a moment ago)
            unlink_quietly(temporary)
            if damaged:
                self.repaired.append(target)
        except StoreError:  # (the store's own, reading its blob: said as it is, not as the cache's, a trial)
            unlink_quietly(temporary)
            raise
        except OSError as error:
            unlink_quietly(temporary)
            raise StoreError(f"cannot write {target} in the Hugging Face cache: {error.strerror}") from None
        except BaseException:
            unlink_quietly(temporary)
            raise
        return how

    def _holds(self, store: Store, entry: FileEntry, target: Path) -> str | None:
        """Whether ``target`` is already the file's bytes: "ours" (the store's own inode), "same" (a file of
        the cache, maybe a link into huggingface_hub's shared blobs inside it, whose bytes match its name) or
        None."""
        real = os.path.realpath(target)
        try:
            info = os.stat(real)
        except OSError:
            return None
        if not self.inside(real) or not stat.S_ISREG(info.st_mode) or info.st_size != entry.size:
            return None
        try:
            ours = os.stat(store.blobs.path(entry.sha256))
            if (ours.st_dev, ours.st_ino) == (info.st_dev, info.st_ino):
                return "ours"
        except OSError:
            pass
        return "same" if etag_of_file(Path(real), entry.size, entry.lfs) == entry.etag else None

    def drop_if_damaged(self, entry: FileEntry, target: Path) -> None:
        """The store's copy of a file is corrupt: the cache's blob of it, when its bytes are not its name's
        either, goes too. After a power loss the cache's name was a link of the very file the store quarantined:
        an export said it "repaired" it, and offline loads read the corrupt weights (an explorer's trial); now
        they fail for it."""
        real = os.path.realpath(target)
        if not os.path.isfile(target) or not self.inside(real):
            return
        with contextlib.suppress(OSError):
            if (
                os.stat(real).st_size == entry.size
                and etag_of_file(Path(real), entry.size, entry.lfs) == entry.etag
            ):
                return
            unlink_quietly(target)
            self.removed.append(target)

    def _share(self, store: Store, blob: BlobRecord, target: Path) -> bool:
        """Make the cache's own copy of the blob's bytes (checked: :meth:`_holds`) a hard link to the store's
        blob; False, nothing changed, when it is a link or the file systems do not allow it. A model pulled
        before its cache was adopted, or adopted by two imports at once, stayed on disk twice for good (an
        export called it "already there", an explorer's trial); huggingface_hub replaces blobs by a rename too.
        """
        if os.path.islink(target):
            return False
        temporary = self._temporary(target.parent)
        try:
            if not _link_blob(store, blob, temporary):
                return False
            os.replace(temporary, target)
        except OSError:  # (read-only cache folder: the copy stays, as before)
            return False
        finally:
            unlink_quietly(temporary)
        return True

    def link(self, snapshot: Path, path: str, blob: Path) -> bool:
        """``snapshots/<commit>/<path>`` -> the relative way to ``blob``, as huggingface_hub links it. False,
        and nothing changed, when a file of the user's is there in place of a link (a config patched in the
        cache, a common fix: replaced by the link without a word, and counted "already there", a trial;
        huggingface_hub leaves such a file alone too)."""
        parent = str(Path(path).parent)
        folder = self.folder(f"{snapshot.relative_to(self.root).as_posix()}/{parent}" if parent != "." else
                             snapshot.relative_to(self.root).as_posix())  # fmt: skip
        final = folder / Path(path).name
        target = os.path.relpath(blob, folder)
        # What the cache's snapshot of the commit holds there (the staging folder is at its depth: the same
        # relative link): the right link already, a file of the user's, or a folder
        held = self.root / "snapshots" / snapshot.name / path
        try:
            if os.readlink(held) == target:
                self.drop_no_exist(snapshot.name, path)
                return True
        except OSError:
            pass
        if held.is_file() and not held.is_symlink():
            return False
        if held.is_dir() and not held.is_symlink():
            raise InvalidInputError(f"{held} is a folder; the repo has a file there: remove the folder")
        temporary = self._temporary(self.root)  # not in the snapshot: scan_cache_dir would list it
        try:
            if not os.path.lexists(final):
                self.record(final)
            os.symlink(target, temporary)
            os.replace(temporary, final)
        except OSError as error:
            unlink_quietly(temporary)
            raise StoreError(f"cannot write {final} in the Hugging Face cache: {error.strerror}") from None
        if not os.path.exists(
            final
        ):  # (its blob, found there a moment ago, taken back by another export since)
            raise StoreError(f"{blob} went from the Hugging Face cache while this export linked it (another "
                             "export took it back): export again")  # fmt: skip
        self.drop_no_exist(snapshot.name, path)
        return True

    def ref_target(self, branch: str) -> str | None:
        """The commit ``refs/<branch>`` names now (None: none, or not one to read)."""
        final = self.root / "refs" / branch
        try:
            named = final.read_text().strip() if not final.is_symlink() else ""
        except (OSError, UnicodeDecodeError):
            return None
        return named if is_commit_id(named) else None

    def ref_written(self, branch: str) -> float | None:
        """When ``refs/<branch>`` was last written (its mtime), None without one."""
        try:
            return (self.root / "refs" / branch).stat().st_mtime
        except OSError:
            return None

    def holds_snapshot(self, commit_id: str) -> bool:
        """Whether the cache holds a snapshot folder of ``commit_id`` for this repo."""
        snapshot = self.root / "snapshots" / commit_id
        return snapshot.is_dir() and not snapshot.is_symlink()

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
            unlink_quietly(temporary)
            raise StoreError(f"cannot write {final} in the Hugging Face cache: {error.strerror}") from None


# What an export leaves in the repo's folder (and blobs/) while it runs: temporary files (swept once their
# process is gone), the snapshot it builds (.snap) and the journal of what it added to the cache's (.added),
# locked while it runs (swept once its lock is free)
_LEFT = re.compile(r"\.modeldepot-(?P<pid>\d{1,9})-(?P<token>[0-9a-f]{12})\.(?P<kind>tmp|snap|added)")
_STAGING = re.compile(r"\.modeldepot-\d{1,9}-[0-9a-f]{12}\.snap")
_MAX_JOURNAL_BYTES = 64 << 20


def _remove_folder(folder: Path) -> None:
    """Remove a staging folder whole (its links, never what they lead to); a link in its place, only the link."""
    if folder.is_symlink():
        unlink_quietly(folder)
    else:
        shutil.rmtree(folder, ignore_errors=True)


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
            with reader.checked_view(index) as data:
                out.write(data)
        out.flush()
        os.fsync(out.fileno())


def export_through_tiers(
    tiers: Tiers,
    repo_id: str,
    revision: str = "main",
    cache_dir: str | Path | None = None,
    *,
    copy: bool = False,
    progress: Progress | None = None,
    move_ref: bool = False,
) -> HfCacheExportResult:
    """:func:`export_to_hf_cache` from the store that answers ``revision`` (tiers.py), then, for a commit
    split across a user's store and shared ones, from each other store that holds files of it; a file the
    answering store found corrupt is taken from another that holds it good."""
    # (the id as the own store spells it; the cache's folder keeps the caller's)
    answering, spelled, commit_id = tiers.holder(tiers.own.spelled(repo_id), revision)
    # (taken back together when a later store's part fails, a review; the snapshot moved into place once all
    # are in, so that a kill between two stores' parts leaves no part of the commit for the commit)
    added = Adding()
    result = export_to_hf_cache(answering, repo_id, revision, cache_dir, copy=copy, progress=progress,
                                set_ref=False, added=added)  # fmt: skip
    writer = _CacheWriter(Path(result.cache_dir), repo_folder_name(repo_id), added)
    try:
        done = frozenset(
            e.path
            for e in answering.files(spelled, commit_id)
            if answering.has_file(spelled, e.path, commit_id)
        )
        for other in tiers.all if tiers.shared else ():
            held = (
                {e.path for e in other.files(other.spelled(repo_id), commit_id)}
                if other is not answering
                else set()
            )
            if held - done:
                more = export_to_hf_cache(other, repo_id, commit_id, cache_dir, copy=copy, progress=progress,
                                          skip=done, added=added)  # fmt: skip
                mended = held - done - {p.path.rsplit(f"/{commit_id}/", 1)[-1] for p in more.problems}
                done |= held
                result = dataclasses.replace(
                    result, files=result.files + more.files, bytes=result.bytes + more.bytes,
                    linked=result.linked + more.linked, copied=result.copied + more.copied,
                    kept=result.kept + more.kept,
                    problems=tuple(p for p in result.problems
                                   if p.path.rsplit(f"/{commit_id}/", 1)[-1] not in mended) + more.problems,
                )  # fmt: skip
        writer.finish(commit_id)
    except BaseException:
        writer.take_back(
            commit_id
        )  # (nothing left to take back when a store's part failed: it took back all)
        writer.drop_if_empty(writer.root / "snapshots" / commit_id)
        raise
    if result.files:  # (once every store gave what it holds: a file one found corrupt, another may mend)
        lacking = sum(p.problem in ("corrupt", "missing") for p in result.problems)
        problems = branch_ref(
            answering, repo_id, revision, commit_id, Path(result.cache_dir), move_ref, lacking
        )
        result = dataclasses.replace(result, problems=result.problems + tuple(problems))
    return result
