"""Downloading one file: parallel chunk-aligned ranges, hashed in order while they arrive, then checked.

A sliding window keeps ``parallel`` chunk requests in flight. Chunks are consumed in file order: each is
hashed (SHA-256, chunk BLAKE3, git SHA-1: the same one pass an import makes) and appended to a
preallocated partial file, so memory stays bounded by the window and no byte is read twice. The result
is compared with what the upstream announced (its LFS SHA-256, or the git oid of a plain file); a
mismatch raises and nothing is committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from modeldepot.errors import IntegrityError
from modeldepot.hashing import BlobDigest, BlobHasher, chunk_count, chunk_span
from modeldepot.hub.manifest import RemoteFile
from modeldepot.store.blobs import PartialBlob
from modeldepot.transfer.sources import HttpSource

__all__ = ["download_file"]

ChunkDone = Callable[[int], None]  # called with the bytes of each chunk committed to the partial


async def download_file(
    session: aiohttp.ClientSession,
    source: HttpSource,
    url: str,
    remote: RemoteFile,
    chunk_size: int,
    partial: PartialBlob,
    parallel: int = 8,
    on_chunk: ChunkDone | None = None,
) -> BlobDigest:
    hasher = BlobHasher(remote.size, chunk_size)
    count = chunk_count(remote.size, chunk_size) if remote.size else 0
    in_flight: dict[int, asyncio.Task[bytes]] = {}
    started = 0
    try:
        for index in range(count):
            while started < count and started < index + parallel:
                offset, length = chunk_span(started, remote.size, chunk_size)
                in_flight[started] = asyncio.create_task(
                    source.fetch(session, url, offset, offset + length - 1, remote.size)
                )
                started += 1
            data = memoryview(await in_flight.pop(index))
            await asyncio.to_thread(_hash_and_write, hasher, partial, data)
            if on_chunk is not None:
                on_chunk(len(data))
    finally:
        for task in in_flight.values():
            task.cancel()
        await asyncio.gather(*in_flight.values(), return_exceptions=True)
    digest = hasher.finish()
    _check(remote, digest)
    return digest


def _hash_and_write(hasher: BlobHasher, partial: PartialBlob, data: memoryview) -> None:
    hasher.update(data)
    partial.write(data)


def _check(remote: RemoteFile, digest: BlobDigest) -> None:
    if remote.sha256 is not None and digest.sha256 != remote.sha256:
        raise IntegrityError(
            f"{remote.path}: the bytes received do not match the upstream's SHA-256; nothing was kept"
        )
    if remote.sha256 is None and digest.git_sha1 != remote.git_oid:
        raise IntegrityError(
            f"{remote.path}: the bytes received do not match the upstream's git oid; nothing was kept"
        )
