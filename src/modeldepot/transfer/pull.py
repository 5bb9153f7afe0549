"""Pulling variants of an upstream repo into the store, verified, with live status and progress.

Files whose content the store already holds (by SHA-256, or git oid for plain files) are not downloaded
again, whichever repo they came from. Everything else is downloaded into one write session and published
as the upstream commit, in one transaction, once every file has verified.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from modeldepot.errors import OfflineError
from modeldepot.hashing import BlobDigest
from modeldepot.hub.manifest import Manifest, RemoteFile
from modeldepot.store.blobs import PartialBlob, WriteSession
from modeldepot.store.publish import RevisionSpec, StagedFile, publish
from modeldepot.store.store import Store
from modeldepot.transfer.download import download_file
from modeldepot.transfer.sources import HttpSource

__all__ = ["PullProgress", "PullResult", "pull", "select"]

PullProgress = Callable[[str, int, int], None]
"""Called as ``progress(current_path, bytes_done, bytes_total)`` while a pull runs."""

STATUS_INTERVAL = 0.5  # seconds between status rows written during a transfer


@dataclass(frozen=True)
class PullResult:
    repo_id: str
    commit_id: str
    variants: tuple[str, ...]
    files: int
    bytes_total: int
    bytes_downloaded: int  # the rest was already in the store
    snapshot_path: str

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "variants": list(self.variants)}


def select(manifest: Manifest, quants: list[str] | str | None) -> tuple[list[RemoteFile], list[str]]:
    """The files a pull takes and the variants it completes: ``None`` = the whole repo, ``"all"`` = every
    variant with the shared files, a list = those variants with the shared files."""
    if quants is None:
        return list(manifest.files), [v.name for v in manifest.variants]
    names = (
        [v.name for v in manifest.variants] if quants == "all" else [manifest.variant(q).name for q in quants]
    )
    wanted = {f.path for name in names for f in manifest.files_of(name)}
    wanted.update(manifest.shared)
    return [f for f in manifest.files if f.path in wanted], names


class _Tracker:
    """Bytes done per file; turns them into progress callbacks and throttled status rows."""

    def __init__(self, store: Store, manifest: Manifest, names: list[str], files: list[RemoteFile],
                 progress: PullProgress | None) -> None:  # fmt: skip
        self.store, self.manifest, self.names, self.progress = store, manifest, names, progress
        self.total = sum(f.size for f in files)
        self.done: dict[str, int] = {}
        self.last_write = 0.0

    def add(self, path: str, amount: int) -> None:
        self.done[path] = self.done.get(path, 0) + amount
        if self.progress is not None:
            self.progress(path, sum(self.done.values()), self.total)
        if time.monotonic() - self.last_write >= STATUS_INTERVAL:
            self.write("downloading")

    def write(self, status: str, error: str | None = None) -> None:
        self.last_write = time.monotonic()
        for name in self.names:
            wanted = {f.path for f in self.manifest.files_of(name)}
            done = sum(n for path, n in self.done.items() if path in wanted)
            self.store.manifests.set_status(self.manifest.repo_id, name, status, done, error)


def pull(
    store: Store,
    manifest: Manifest,
    quants: list[str] | str | None,
    branch: str | None,
    source: HttpSource,
    offline: bool = False,
    progress: PullProgress | None = None,
    parallel: int = 8,
) -> PullResult:
    files, names = select(manifest, quants)
    have: dict[str, BlobDigest] = {}
    for remote in files:
        found = (
            store.local_digest(sha256=remote.sha256)
            if remote.sha256
            else store.local_digest(git_sha1=remote.git_oid)
        )
        if found is not None:
            have[remote.path] = found
    missing = [f for f in files if f.path not in have]
    if missing and offline:
        raise OfflineError(f"offline mode: {len(missing)} files of {manifest.repo_id} are not in the store")
    tracker = _Tracker(store, manifest, names, files, progress)
    for path, digest in have.items():
        tracker.done[path] = digest.size
    tracker.write("downloading")
    with WriteSession(store.layout) as session:
        try:
            fetched, partials = asyncio.run(
                _fetch_all(store, session, manifest, missing, source, tracker, parallel)
            )
            staged = [
                StagedFile(f.path, have.get(f.path) or fetched[f.path], f.git_oid, f.sha256 is not None)
                for f in files
            ]
            card = {k: v for k, v in (("pipeline_tag", manifest.pipeline_tag), ("library_name", manifest.library_name),
                                      ("tags", list(manifest.tags))) if v}  # fmt: skip
            spec = RevisionSpec(
                manifest.repo_id, manifest.commit_id, branch, origin=manifest.endpoint, card=card
            )
            publish(store, spec, staged, partials)
        except BaseException as error:
            tracker.write("failed", f"{type(error).__name__}: {error}"[:500])
            raise
    tracker.write("downloaded")
    return PullResult(
        repo_id=manifest.repo_id,
        commit_id=manifest.commit_id,
        variants=tuple(names),
        files=len(files),
        bytes_total=tracker.total,
        bytes_downloaded=sum({f.sha256 or f.git_oid: f.size for f in missing}.values()),
        snapshot_path=str(store.snapshots.path(manifest.repo_id, manifest.commit_id)),
    )


async def _fetch_all(
    store: Store,
    session: WriteSession,
    manifest: Manifest,
    missing: list[RemoteFile],
    source: HttpSource,
    tracker: _Tracker,
    parallel: int,
) -> tuple[dict[str, BlobDigest], dict[str, PartialBlob]]:
    fetched: dict[str, BlobDigest] = {}
    partials: dict[str, PartialBlob] = {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    by_content: dict[str, BlobDigest] = {}  # a repo may hold the same bytes under two paths
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for remote in missing:
            key = remote.sha256 or remote.git_oid
            if key in by_content:
                fetched[remote.path] = by_content[key]
                tracker.add(remote.path, remote.size)
                continue
            partial = await asyncio.to_thread(session.new_partial, remote.size)
            url = source.file_url(manifest.repo_id, manifest.commit_id, remote.path)

            def on_chunk(amount: int, path: str = remote.path) -> None:
                tracker.add(path, amount)

            digest = await download_file(
                http, source, url, remote, store.chunk_size, partial, parallel, on_chunk
            )
            await asyncio.to_thread(partial.sync)
            fetched[remote.path] = by_content[key] = digest
            partials.setdefault(digest.sha256, partial)
    return fetched, partials
