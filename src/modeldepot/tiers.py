"""Stores read through: a depot's own store first, then shared ones (``MODELDEPOT_SHARED``), never written
by it (huggingface_hub#2816: an admin fills one store with the models everyone uses, each user pulls the
rest into a store of their own, and nothing is held twice).

A shared store is opened read-only, whoever may write it (its owner does, as ever, from their own
depot): nothing of it is locked, counted or changed from here. What the tiers answer:

- **a revision** (:meth:`Tiers.holder`): a commit id is the first store's that holds it, the own store
  first; a branch is the store's whose ref of it moved last (each store's ``refs.updated_at``: when it last
  learned where the branch is), so a model the admin updated is read from the shared store even when the
  user pulled an older one of it into their own, and the user's pull of a newer one wins over the
  admin's older one;
- **a file** (:meth:`Tiers.entry`): the holder's, or, when it lacks the file (or holds it corrupt), the
  first other store's that holds the same commit and file (one quant in the shared store, another in
  the user's);
- **a pull** (:meth:`Tiers.holding`): the shared store that holds everything a pull would fetch, at the
  commit it names, whose branch is there too and newer than the own store's: the pull then writes
  nothing.

A snapshot folder is one store's (the holder's): a revision split across stores is read file by file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from modeldepot.config import DepotConfig
from modeldepot.errors import (
    CorruptBlobError,
    DepotError,
    EntryNotFoundError,
    NotFoundError,
    RevisionNotFoundError,
)
from modeldepot.hub.manifest import Manifest, RemoteFile, current_manifest, held_manifest
from modeldepot.store import Store
from modeldepot.store.confined import opened_folder, write_within
from modeldepot.store.models import FileEntry, RepoInfo, RepoSummary, RevisionInfo
from modeldepot.validation import validate_path, validate_repo_id, validate_revision

if TYPE_CHECKING:
    from modeldepot.transfer.pull import PullResult

__all__ = ["SHARED", "Tiers"]

log = logging.getLogger(__name__)

SHARED = "shared: read through, never written from here"  # (a shared store's read-only reason)
# The own store's folder of notes on shared stores' blobs found corrupt (one file per blob: its placement)
REFUSED_FOLDER = "shared-refused"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Tiers:
    """A depot's own store and the shared stores read after it, in order."""

    def __init__(self, own: Store, shared: Sequence[Store] = ()) -> None:
        self.own = own
        self.shared = tuple(shared)
        self.all = (own, *self.shared)
        self._said_lacking: set[tuple[str, str, str]] = set()  # (a folder's lack, said once a process)
        for store in self.shared:
            store.add_quarantine_hook(functools.partial(self._found_corrupt, store))
        if self.shared:
            self._refuse_what_was_found_corrupt()

    def _refuse_what_was_found_corrupt(self) -> None:
        """Each shared store refuses, in this process too, the blobs another process of the depot found
        corrupt (its reads served them again: only pulls read the notes, a review)."""
        for sha256, placement in self._notes().items():
            for store in self.shared:
                store.refuse(sha256, placement)

    def _notes(self) -> dict[str, float]:
        """The notes kept in the own store: SHA-256 -> the placement found corrupt."""
        folder = self.own.home / REFUSED_FOLDER
        notes: dict[str, float] = {}
        try:
            names = os.listdir(folder)
        except OSError:
            return notes
        for name in names:
            if _SHA256.fullmatch(name) is None:
                continue  # (a temporary, or anything else: no path is built from it)
            with contextlib.suppress(OSError, ValueError):
                notes[name] = float((folder / name).read_text())
        return notes

    def _found_corrupt(self, store: Store, sha256: str) -> None:
        """A shared store's blob this process found corrupt stays in place (the store is not this user's to
        repair): kept in mind in the own store, with its placement, so that a pull in any process fetches the
        file into the own store rather than take that copy for held (rotten in the admin's store, it was
        never readable again: "0 B downloaded from shared", pull after pull, an explorer's trial)."""
        if _SHA256.fullmatch(sha256) is None:
            return  # (a name from another store's index: no path is built from it unless it is a digest)
        folder = self.own.home / REFUSED_FOLDER
        try:
            placement = store.placement(sha256)
            if self.own.read_only or placement is None:
                return
            # (no link there leads out of the store: store/confined.py)
            within = os.path.realpath(self.own.home)
            with opened_folder(folder, within, create=True):
                pass
            write_within(folder / sha256, repr(placement).encode(), within)
        except (OSError, DepotError) as error:  # (never in place of the CorruptBlobError the reader gets)
            log.warning("could not note in %s that a shared store's blob %s… is corrupt: %s", folder,
                        sha256[:16], error)  # fmt: skip

    def forget_repaired(self) -> int:
        """Remove the notes of blobs no shared store holds at the placement found corrupt any more (repaired,
        or removed there): they only grew, one a blob, for the life of the store. The number removed."""
        removed = 0
        for sha256, noted in self._notes().items():
            if any(store.placement(sha256) == noted for store in self.shared):
                continue
            with contextlib.suppress(FileNotFoundError):
                (self.own.home / REFUSED_FOLDER / sha256).unlink()
                removed += 1
        return removed

    def found_corrupt(self, store: Store, sha256: str) -> bool:
        """Whether a process of this depot found ``store``'s blob corrupt, and it is still that placement (a
        repair of the shared store places it anew)."""
        try:
            noted = float((self.own.home / REFUSED_FOLDER / sha256).read_text())
        except (OSError, ValueError):
            return False
        return store.placement(sha256) == noted

    @classmethod
    def open(cls, own: Store, config: DepotConfig) -> Tiers:
        """``own`` over the shared stores ``config.shared`` names, each opened read-only. One that cannot be
        opened (not there, not readable by this user, of another schema) is left out with a warning: the
        own store, and the other shared ones, are used as ever."""
        opened: list[Store] = []
        try:
            for home in config.shared:
                if os.path.realpath(home) == os.path.realpath(own.home):  # (through a link too)
                    # (read as the own store: one env block naming the image's store as both was an error, a
                    # trial; a store is never its own tier twice)
                    log.info("MODELDEPOT_SHARED: %s is this depot's own store: read as that", home)
                    continue
                settings = dataclasses.replace(config, home=home, chunk_size=None, shared=())
                try:
                    opened.append(Store(settings, create=False, read_only=SHARED))
                except DepotError as error:
                    log.warning("MODELDEPOT_SHARED: %s is left out: %s", home, error)
        except BaseException:
            for store in opened:
                store.close()
            raise
        return cls(own, opened)

    def holder(self, repo_id: str, revision: str) -> tuple[Store, str, str]:
        """The store that answers ``revision`` of ``repo_id`` (the module's docstring says which), the repo
        id as it spells it, and the commit id; the own store's error when none holds it (a shared store's
        when only it knows the repo)."""
        if not self.shared:  # (the depot's methods spelled the id already: no lookup more on a node's reads)
            return self.own, repo_id, self.own.resolve(repo_id, revision)
        validate_repo_id(repo_id)
        validate_revision(revision)
        found: list[tuple[float, int, Store, str, str]] = []
        errors: list[NotFoundError] = []
        for rank, store in enumerate(self.all):
            spelled = store.spelled(repo_id)
            try:
                commit_id = store.resolve(spelled, revision)
            except NotFoundError as error:
                errors.append(error)
                continue
            moved = store.ref_time(spelled, revision)
            found.append((moved if moved is not None else float("-inf"), -rank, store, spelled, commit_id))
        if not found:
            raise next((e for e in errors if isinstance(e, RevisionNotFoundError)), errors[0])
        _, _, store, spelled, commit_id = max(found, key=lambda f: f[:2])
        return store, spelled, commit_id

    def folder_holder(self, repo_id: str, revision: str) -> tuple[Store, str, str]:
        """:meth:`holder`, for a snapshot folder: of the stores holding the commit, the one holding the most of
        its bytes (the answering one first), with a warning naming what other stores hold of the commit that
        its folder lacks (a folder is one store's). A pull of one variant into the own store made its
        folder, configs and that variant, the one `snapshot_path` gave, where a shared store's held the
        weights `from_pretrained` read (an explorer's trial)."""
        store, spelled, commit_id = self.holder(repo_id, revision)
        if not self.shared:
            return store, spelled, commit_id
        held = {s: (other_spelled := s.spelled(repo_id), self._paths_held(s, other_spelled, commit_id))
                for s in self.all}  # fmt: skip
        for (
            shared
        ) in self.shared:  # (a blob a process of this depot found corrupt there holds nothing: a review)
            paths = held[shared][1]
            for path, sha256 in list(self._blobs_of(shared, held[shared][0], commit_id).items()):
                if path in paths and self.found_corrupt(shared, sha256):
                    del paths[path]
        best = max(self.all, key=lambda s: (sum(held[s][1].values()), s is store))
        lacking = sorted(set().union(*(paths for _, paths in held.values())) - set(held[best][1]))
        if lacking and (said := (best.store_id, repo_id.lower(), commit_id)) not in self._said_lacking:
            self._said_lacking.add(said)
            log.warning("%s@%s: the snapshot folder at %s lacks %s, which another store holds: read such files "
                        "with get_file or file_path (a folder is one store's)", repo_id, commit_id[:12],
                        best.home, ", ".join(lacking[:3]) + (" and more" if len(lacking) > 3 else ""))  # fmt: skip
        return best, held[best][0], commit_id

    @staticmethod
    def _paths_held(store: Store, repo_id: str, commit_id: str) -> dict[str, int]:
        """Path -> size of the commit's files the store holds good."""
        rows = store.index.read("SELECT f.path, f.size FROM files f JOIN blobs b USING (sha256) WHERE f.repo_id = ? "
                                "AND f.commit_id = ? AND b.state = 'ok'", (repo_id, commit_id))  # fmt: skip
        return {str(row["path"]): int(row["size"]) for row in rows}

    def _blobs_of(self, store: Store, repo_id: str, commit_id: str) -> dict[str, str]:
        """Path -> SHA-256 of the commit's files in ``store`` whose blob this depot noted refused (none: no look)."""
        refused_folder = self.own.home / REFUSED_FOLDER
        if not refused_folder.is_dir():
            return {}
        refused = set(os.listdir(refused_folder))
        rows = store.index.read("SELECT path, sha256 FROM files WHERE repo_id = ? AND commit_id = ?",
                                (repo_id, commit_id))  # fmt: skip
        return {str(row["path"]): str(row["sha256"]) for row in rows if row["sha256"] in refused}

    def entry(self, repo_id: str, path: str, revision: str) -> tuple[Store, FileEntry]:
        """The store holding the file, and its record (see the module's docstring)."""
        validate_path(path)
        store, spelled, commit_id = self.holder(repo_id, revision)
        try:
            return store, store.entry(spelled, path, commit_id)
        except (EntryNotFoundError, CorruptBlobError) as missing:
            for other in self.all:
                if other is not store:
                    with contextlib.suppress(NotFoundError, CorruptBlobError):
                        return other, other.entry(other.spelled(repo_id), path, commit_id)
            raise missing from None

    def files(self, repo_id: str, revision: str) -> tuple[Store, str, list[FileEntry]]:
        """The store that answers the revision, its commit, and every file of it that a store holds (that
        store's own first: a commit split across stores is listed as it is read, file by file)."""
        store, spelled, commit_id = self.holder(repo_id, revision)
        if not self.shared:  # (every Hub listing of a node asks: as the store answers it)
            return store, commit_id, store.revision_files(spelled, commit_id)
        return store, commit_id, self._commit_files(repo_id, commit_id, first=store)

    def _commit_files(self, repo_id: str, commit_id: str, first: Store) -> list[FileEntry]:
        found = {e.path: e for e in first.revision_files(first.spelled(repo_id), commit_id)}
        for other in self.all:
            if other is not first:
                for entry in other.files(other.spelled(repo_id), commit_id):
                    found.setdefault(entry.path, entry)
        return sorted(found.values(), key=lambda e: e.path)

    def _refs(self, repo_id: str) -> dict[str, str]:
        """The repo's branches as the tiers answer them: each from the store where it moved last."""
        latest: dict[str, tuple[float, int, str]] = {}
        for rank, store in enumerate(self.all):
            for row in store.index.read("SELECT name, commit_id, updated_at FROM refs WHERE repo_id = ?",
                                        (store.spelled(repo_id),)):  # fmt: skip
                seen = (float(row["updated_at"]), -rank, str(row["commit_id"]))
                latest[row["name"]] = max(latest.get(row["name"], seen), seen)
        return {name: latest[name][2] for name in sorted(latest)}

    def store_of_blob(self, sha256: str) -> Store:
        """The first store whose index holds the blob, good (the own store when none does: its error)."""
        if not self.shared:
            return self.own
        for store in self.all:
            if store.index.read("SELECT 1 FROM blobs WHERE sha256 = ? AND state = 'ok'", (sha256,)):
                return store
        return self.own

    def holding(
        self, repo_id: str, commit_id: str, paths: Iterable[str], branch: str | None
    ) -> dict[str, Store] | None:
        """Where each of ``paths`` at ``commit_id`` is held, when a pull of them (setting ``branch``) need
        write nothing: the stores hold each of them, good, a shared store some of them, and reads of
        ``branch`` find that commit already (else they would not find what was pulled). None: pull."""
        if not self.shared:
            return None
        if branch is not None:
            try:
                if self.holder(repo_id, branch)[2] != commit_id:
                    return None
            except NotFoundError:
                return None
        found: dict[str, Store] = {}
        for path in paths:
            store = next((s for s in self.all if self._held_good(s, repo_id, path, commit_id)), None)
            if store is None:
                return None
            found[path] = store
        return found if any(store is not self.own for store in found.values()) else None

    def _held_good(self, store: Store, repo_id: str, path: str, commit_id: str) -> bool:
        """Whether ``store`` holds the file good, as far as can be told without reading it all: not found
        corrupt by a process of this depot (:meth:`found_corrupt`), its blob checked after a restart of the
        machine when it was written before it and maybe never flushed (a shared store after a power loss: a
        pull took its zeroed weights for held, wrote nothing and gave their folder as the model's, and pulled
        nothing again: a trial), and not changed in place since it was checked."""
        spelled = store.spelled(repo_id)
        if not store.has_file(spelled, path, commit_id):
            return False
        try:
            entry = store.entry(spelled, path, commit_id)
            if store is not self.own and (
                store.refused(entry.sha256) or self.found_corrupt(store, entry.sha256)
            ):
                return False
            store.durability.ensure_checked(entry.sha256)
            store.check_if_changed(entry)
        except (CorruptBlobError, NotFoundError):
            return False
        return True

    def manifest(self, repo_id: str, revision: str) -> Manifest | None:
        """(Offline.) The manifest of the commit the stores answer for ``revision``: a store's saved scan of
        it, the own store's first, else the files the answering store holds of it. None when no store holds
        the revision. (The own store's scan of an older commit would pull that one again, and its branch,
        set anew, would read that older commit from then on.)"""
        try:
            answering, spelled, commit_id = self.holder(repo_id, revision)
        except NotFoundError:
            return None
        endpoint = ""
        for store in self.all:
            with contextlib.suppress(NotFoundError):
                found = current_manifest(store, store.spelled(repo_id))
                if found.commit_id == commit_id:
                    return found
                endpoint = endpoint or found.endpoint
        return held_manifest(
            answering, spelled, answering.repo_private(spelled), commit_id, revision, endpoint
        )

    def pulled(self, manifest: Manifest, files: Sequence[RemoteFile], variants: Sequence[str],
               branch: str | None) -> PullResult | None:  # fmt: skip
        """What a pull of ``files`` (of ``variants``) at the manifest's commit returns when the stores hold
        them all, a shared one some (:meth:`holding`): nothing written, each file read where it is from
        then on. None when the pull must write."""
        from modeldepot.transfer.pull import PullResult

        held = self.holding(manifest.repo_id, manifest.commit_id, [f.path for f in files], branch)
        if held is None:
            return None
        by_source: dict[str, int] = {}
        for remote in files:
            source = "local" if held[remote.path] is self.own else "shared"
            by_source[source] = by_source.get(source, 0) + remote.size
        # (the folder of the store holding the biggest file pulled, the model's: a folder is one store's)
        store = held[max(files, key=lambda f: f.size).path] if files else self.own
        spelled = store.spelled(manifest.repo_id)
        log.info("%s@%s: held by the shared stores, nothing pulled", spelled, manifest.commit_id[:12])
        return PullResult(repo_id=spelled, commit_id=manifest.commit_id, variants=tuple(variants),
                          files=len(files), bytes_total=sum(by_source.values()), bytes_downloaded=0,
                          bytes_resumed=0, snapshot_path=str(store.snapshots.path(spelled, manifest.commit_id)),
                          sources=("shared",), bytes_by_source=by_source)  # fmt: skip

    def list_repos(self) -> list[RepoSummary]:
        """Every repo of every store, each once, sorted by repo id; one several stores hold is summed up as
        :meth:`repo_info` tells it (its branches where they moved last, its revisions in any store)."""
        seen: dict[str, list[RepoSummary]] = {}
        for store in self.all:
            for summary in store.list_repos():
                seen.setdefault(summary.repo_id.lower(), []).append(summary)
        merged = []
        for summaries in seen.values():
            if len(summaries) == 1:
                merged.append(summaries[0])
                continue
            info = self.repo_info(summaries[0].repo_id)
            newest = info.revisions[0] if info.revisions else None
            # (a ref is a tag where the store it moved in last says so: a review)
            tags = {name for s in summaries for name in s.tag_refs if s.refs.get(name) == info.refs.get(name)}
            merged.append(dataclasses.replace(
                summaries[0], refs=info.refs, revisions=len(info.revisions),
                files=len(newest.files) if newest else 0, size=newest.size if newest else 0,
                tag_refs=tuple(sorted(tags & set(info.refs))),
            ))  # fmt: skip
        return sorted(merged, key=lambda s: s.repo_id)

    def repo_info(self, repo_id: str) -> RepoInfo:
        """The repo as the stores hold it together: the first one's record, the branches where they moved
        last, every revision any store holds (newest first), each with the files any store holds of it."""
        infos: list[tuple[Store, RepoInfo]] = []
        error: NotFoundError | None = None
        for store in self.all:
            try:
                infos.append((store, store.repo_info(store.spelled(repo_id))))
            except NotFoundError as missing:
                error = error or missing
        if not infos:
            assert error is not None
            raise error
        if len(infos) == 1:
            return infos[0][1]
        refs = self._refs(repo_id)
        revisions: dict[str, RevisionInfo] = {}
        for store, info in infos:
            for revision in info.revisions:
                if revision.commit_id not in revisions:
                    files = tuple(self._commit_files(repo_id, revision.commit_id, first=store))
                    names = tuple(name for name, commit in refs.items() if commit == revision.commit_id)
                    revisions[revision.commit_id] = dataclasses.replace(revision, refs=names, files=files)
        ordered = sorted(revisions.values(), key=lambda r: (-r.created_at, r.commit_id))
        return dataclasses.replace(infos[0][1], refs=refs, revisions=tuple(ordered))

    def close(self) -> None:
        for store in self.shared:
            store.close()
