"""Downloading one file from one or more sources: chunk-aligned ranges in parallel, resumable, verified.

Workers, a few per source, take the lowest chunk nobody has yet, fetch its range, check it against the
source's BLAKE3 for that chunk when the source has one (a depot node does), and write it at its offset in
the claimed partial (store/partials.py), logging it. A fast source simply takes more chunks than a slow
one. A source that keeps failing is dropped for this file and its chunk goes back to the pool; a chunk
that fails its digest is fetched from another source (or, with one source, once more).

Memory is bounded by the connection limit, not by the number of files: a request takes a buffer slot
(one of ``Limits.total``) and keeps it until its chunk has landed, so when landing falls behind the
network, requests wait instead of fetched chunks piling up.

The whole-file SHA-256 (and the git SHA-1 of small files) is computed in file order while chunks land,
reading each chunk back from the page cache through a mapping: no second pass over the disk, no copy in
memory. A resumed chunk is hashed the same way. The result must equal what the upstream announced (LFS
SHA-256, or git oid); if not, the partial is reset and nothing is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import blake3

from modeldepot.errors import (
    AccessDeniedError,
    DepotError,
    IntegrityError,
    NotFoundError,
    StoreError,
    UpstreamError,
    UpstreamTimeoutError,
)
from modeldepot.hashing import BlobDigest, BlobHasher, chunk_span, digest_bytes
from modeldepot.hub.manifest import RemoteFile
from modeldepot.store.partials import ResumablePartial
from modeldepot.transfer.sources import HttpSource, RangeIgnoredError

__all__ = ["FileSource", "Limits", "download_file"]

MAX_CHUNK_ATTEMPTS = 3  # tries of one chunk that failed its digest before the file is given up
BytesDone = Callable[[int], None]


@dataclass(frozen=True)
class FileSource:
    """A source that holds a file, with the URL to ask and (from a depot node) its chunk digests."""

    source: HttpSource
    url: str
    chunk_blake3: tuple[str, ...] | None = None


@dataclass
class Limits:
    """Limits shared by every file of a transfer: requests per source, and chunk buffers in total.

    A buffer slot is held from the start of a request until its chunk has landed (or been rejected), so
    at most ``total`` chunk buffers exist at once, and at most ``total`` requests are in flight.
    """

    per_source: int = 4
    total: int = 16
    _buffers: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    _sources: dict[str, asyncio.Semaphore] = field(default_factory=dict, init=False, repr=False)

    def buffer_slot(self) -> asyncio.Semaphore:
        if self._buffers is None:
            self._buffers = asyncio.Semaphore(self.total)
        return self._buffers

    def source_slot(self, source: HttpSource) -> asyncio.Semaphore:
        return self._sources.setdefault(source.base_url, asyncio.Semaphore(self.per_source))


async def download_file(
    http: aiohttp.ClientSession,
    remote: RemoteFile,
    partial: ResumablePartial,
    sources: list[FileSource],
    limits: Limits,
    fallback: Callable[[], list[FileSource]] | None = None,
    on_bytes: BytesDone | None = None,
) -> BlobDigest:
    """Complete ``partial`` with ``remote``'s bytes and return their digests, checked against upstream.

    ``fallback`` is asked once for more sources when every source given has failed (the chain's last
    resort, the Hub). ``on_bytes`` is called with the size of each chunk as it is written.
    """
    if remote.size == 0:
        digest = digest_bytes(b"", partial.chunk_size)
        _check(remote, digest)
        return digest
    job = _FileJob(http, remote, partial, limits, fallback, on_bytes)
    return await job.run(sources)


class _FileJob:
    def __init__(self, http: aiohttp.ClientSession, remote: RemoteFile, partial: ResumablePartial,
                 limits: Limits, fallback: Callable[[], list[FileSource]] | None,
                 on_bytes: BytesDone | None) -> None:  # fmt: skip
        self.http, self.remote, self.partial, self.limits = http, remote, partial, limits
        self.fallback, self.on_bytes = fallback, on_bytes
        self.in_flight: set[int] = set()
        self.bad: dict[int, set[str]] = {}  # chunk -> sources whose bytes failed its digest
        self.attempts: dict[int, int] = {}
        self.live: list[FileSource] = []
        self.errors: dict[str, Exception] = {}  # source -> why it was dropped
        # Woken on every change (a chunk landed, a request ended, a source dropped). A waiter takes the
        # current event *before* it looks at the state, so a change between its look and its wait is
        # never lost (a Condition's lock acquisition could let one slip by).
        self._changed = asyncio.Event()
        self.failure: DepotError | None = None
        self.whole_body = False
        self.low = 0  # the lowest chunk that may not be done yet

    async def run(self, sources: list[FileSource]) -> BlobDigest:
        workers: list[asyncio.Task[None]] = []
        hasher = asyncio.create_task(self._hash_in_order())
        try:
            self._start(sources, workers)
            if not self.live:
                await self._fall_back(workers)
            while not hasher.done():
                finished, _ = await asyncio.wait([hasher, *workers], return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    if task is not hasher and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                workers = [w for w in workers if not w.done()]
                if self.failure is not None:
                    raise self.failure
                if not workers and self._work_left():
                    await self._fall_back(workers)
            digest = hasher.result()
        finally:
            for task in [hasher, *workers]:
                task.cancel()
            await asyncio.gather(hasher, *workers, return_exceptions=True)
        try:
            _check(self.remote, digest)
        except IntegrityError:
            await asyncio.to_thread(self.partial.reset)
            raise
        return digest

    def _start(self, sources: list[FileSource], workers: list[asyncio.Task[None]]) -> None:
        for source in sources:
            self.live.append(source)
            for _ in range(self.limits.per_source):
                workers.append(asyncio.create_task(self._work(source)))

    async def _fall_back(self, workers: list[asyncio.Task[None]]) -> None:
        extra = self.fallback() if self.fallback is not None else []
        self.fallback = None
        if extra:
            self._start(extra, workers)
            return
        reasons = "; ".join(f"{name}: {why}" for name, why in self.errors.items()) or "no source holds it"
        kinds = {type(error) for error in self.errors.values()}
        kind = kinds.pop() if len(kinds) == 1 else UpstreamError
        if not issubclass(kind, (NotFoundError, AccessDeniedError, IntegrityError, UpstreamTimeoutError)):
            kind = UpstreamError  # one cause everywhere (missing, refused, corrupt) is worth keeping
        raise kind(f"{self.remote.path}: could not download it ({reasons})", path=self.remote.path)

    # -- choosing chunks --------------------------------------------------------------------------------

    def _pick(self, source: FileSource) -> int | None:
        live_names = {s.source.name for s in self.live}
        while self.low in self.partial.done:  # below it every chunk is done: no scan from 0 per pick
            self.low += 1
        for index in range(self.low, self.partial.chunks):
            if index in self.partial.done or index in self.in_flight:
                continue
            failed_by = self.bad.get(index, set())
            if source.source.name not in failed_by:
                return index
            if live_names <= failed_by and self.attempts.get(index, 0) < MAX_CHUNK_ATTEMPTS:
                return index  # every source failed it: let this one try again
        return None

    def _work_left(self) -> bool:
        return len(self.partial.done) < self.partial.chunks

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _work(self, source: FileSource) -> None:
        while self._work_left() and source in self.live:
            changed = self._changed
            index = self._pick(source)
            if index is None:
                if not self.in_flight:
                    if self._work_left():  # the remaining chunks failed their digest from every source
                        bad = IntegrityError(
                            f"chunks kept failing their BLAKE3 check ({sorted(self.bad)[:5]})"
                        )
                        for stuck in list(self.live):
                            self._drop(stuck, bad)  # the fallback (the Hub) may still have good bytes
                        self._pulse()
                    return
                await changed.wait()
                continue
            self.in_flight.add(index)
            try:
                await self._fetch_chunk(source, index)
            except RangeIgnoredError:
                if self.whole_body:
                    return  # another worker of this source already streams the whole file
                await self._stream_whole(source, index)
            except StoreError as error:  # our disk, not the source: the file cannot go on
                self._fail(error)
                return
            except DepotError as error:
                self._drop(source, error)
            finally:
                self.in_flight.discard(index)
                self._pulse()

    async def _fetch_chunk(self, source: FileSource, index: int) -> None:
        offset, length = chunk_span(index, self.remote.size, self.partial.chunk_size)
        # The source slot comes first so that a worker waiting for a busy source holds no buffer slot
        # that another source could use. The source slot ends with the request; the buffer slot only once
        # the chunk has landed, since landing (on threads) can fall behind the network.
        buffers = self.limits.buffer_slot()
        async with self.limits.source_slot(source.source):
            await buffers.acquire()
            try:
                data = await source.source.fetch(
                    self.http, source.url, offset, offset + length - 1, self.remote.size
                )
            except BaseException:
                buffers.release()
                raise
        try:
            await self._land(source, index, memoryview(data))
        finally:
            buffers.release()

    async def _land(self, source: FileSource, index: int, data: memoryview) -> None:
        """Check a fetched chunk against the source's digest, then write and log it."""
        digest = await asyncio.to_thread(_blake3, data)
        expected = source.chunk_blake3[index] if source.chunk_blake3 else None
        if expected is not None and digest != expected:
            self.bad.setdefault(index, set()).add(source.source.name)
            self.attempts[index] = self.attempts.get(index, 0) + 1
            return
        await asyncio.to_thread(self.partial.write_chunk, index, data, digest)
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        self._pulse()

    async def _stream_whole(self, source: FileSource, own_index: int) -> None:
        """The server ignores ranges: take the whole body once, landing every chunk nobody else has."""
        self.whole_body = True
        chunk_size = self.partial.chunk_size
        state = {"index": 0, "filled": 0}

        async def sink(piece: memoryview) -> None:
            while piece:
                index = state["index"]
                length = chunk_span(index, self.remote.size, chunk_size)[1]
                take = min(len(piece), length - state["filled"])
                buffer[state["filled"] : state["filled"] + take] = piece[:take]
                state["filled"] += take
                piece = piece[take:]
                if state["filled"] == length:
                    if index not in self.partial.done and (index not in self.in_flight or index == own_index):
                        await self._land(source, index, memoryview(buffer)[:length])
                    state["index"], state["filled"] = index + 1, 0

        try:
            async with self.limits.source_slot(source.source), self.limits.buffer_slot():
                buffer = bytearray(chunk_size)  # allocated under the buffer slot, like a fetched chunk's
                await source.source.stream_whole(self.http, source.url, self.remote.size, sink)
        except StoreError:
            raise
        except DepotError as error:
            self._drop(source, error)
        finally:
            self.whole_body = False

    def _drop(self, source: FileSource, error: Exception) -> None:
        if source in self.live:
            self.live.remove(source)
            self.errors[source.source.name] = error

    def _fail(self, error: DepotError) -> None:
        if self.failure is None:
            self.failure = error

    # -- hashing ----------------------------------------------------------------------------------------

    async def _hash_in_order(self) -> BlobDigest:
        size, chunk_size = self.remote.size, self.partial.chunk_size
        hasher = BlobHasher(size, chunk_size)
        mapping = mmap.mmap(self.partial.data_fd, size, prot=mmap.PROT_READ)
        try:
            for index in range(self.partial.chunks):
                while True:
                    changed = self._changed
                    if index in self.partial.done:
                        break
                    await changed.wait()
                offset, length = chunk_span(index, size, chunk_size)
                await asyncio.to_thread(
                    _hash_chunk, hasher, mapping, offset, length, self.partial.done[index]
                )
            return hasher.finish()
        finally:
            with contextlib.suppress(BufferError):  # a cancelled hashing thread may still hold a view
                mapping.close()


def _blake3(data: memoryview) -> str:
    return blake3.blake3(data).hexdigest()


def _hash_chunk(hasher: BlobHasher, mapping: mmap.mmap, offset: int, length: int, digest: str) -> None:
    with memoryview(mapping) as whole, whole[offset : offset + length] as data:
        hasher.update_sha256(data)
        hasher.update_chunk(data, digest)


def _check(remote: RemoteFile, digest: BlobDigest) -> None:
    if remote.sha256 is not None and digest.sha256 != remote.sha256:
        raise IntegrityError(
            f"{remote.path}: the bytes received do not match the upstream's SHA-256; nothing was kept"
        )
    if remote.sha256 is None and digest.git_sha1 != remote.git_oid:
        raise IntegrityError(
            f"{remote.path}: the bytes received do not match the upstream's git oid; nothing was kept"
        )
