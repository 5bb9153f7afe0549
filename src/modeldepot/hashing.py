"""Every digest a blob needs, computed in one sequential pass over its bytes.

- SHA-256 of the whole file: the blob's name, and the Hub's LFS oid.
- BLAKE3 of each fixed-size chunk: verification, resume and peer serving work per chunk.
- The git blob SHA-1 of small files: the Hub's ETag for files that are not in LFS.

SHA-256 is the slowest of these (~1.9 GB/s here against ~5 GB/s for BLAKE3 on one core), so
:func:`digest_stream` runs it on a helper thread while the calling thread hashes chunks, writes the
block to its sink and reads the next one. hashlib and blake3 release the GIL on large buffers, so the
two cores really work in parallel. Nothing is ever read twice.

SHA-256 (SHA-NI) of bytes that are not in the CPU's caches runs at about half its speed here (1.0 against
1.8 GiB/s): each 64-byte block depends on the one before, so the core waits on memory one line at a time,
where a copy keeps many loads in flight (9.6 GiB/s). Bytes hashed long after they landed (a download's
chunks, hashed in file order from the partial's mapping) are therefore copied a MiB at a time into a buffer
that stays in cache and hashed from there (1.5 GiB/s, copy included): ``update_sha256(data, cold=True)``.
Bytes just read or received are hashed where they are (the copy would cost 7%).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import blake3

from modeldepot.errors import IntegrityError

__all__ = [
    "BLOCK_SIZE",
    "GIT_OID_LIMIT",
    "BlobDigest",
    "BlobHasher",
    "chunk_count",
    "chunk_span",
    "digest_bytes",
    "digest_stream",
]

MiB = 1024 * 1024
BLOCK_SIZE = 4 * MiB  # read/hash/write granularity: big enough to amortise calls, small enough to pipeline
GIT_OID_LIMIT = 10 * MiB  # the Hub keeps files under 10 MiB in git; their ETag is the git blob SHA-1
STAGE_SIZE = 1 * MiB  # cold bytes reach SHA-256 through a buffer this big (fits in L2 with room to spare)

ReadInto = Callable[[memoryview], int]
Sink = Callable[[memoryview], None]
Progress = Callable[[int], None]


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks of a blob; an empty blob has one empty chunk so every blob has a digest."""
    return max(1, -(-size // chunk_size))


def chunk_span(index: int, size: int, chunk_size: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index``."""
    offset = index * chunk_size
    return offset, max(0, min(chunk_size, size - offset))


@dataclass(frozen=True)
class BlobDigest:
    sha256: str
    size: int
    chunk_size: int
    chunk_blake3: tuple[str, ...]
    git_sha1: str | None


class BlobHasher:
    """Incremental hasher of one blob of known size (the git header needs the size up front)."""

    def __init__(self, size: int, chunk_size: int, git_oid_limit: int = GIT_OID_LIMIT) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self._sha256 = hashlib.sha256()
        self._git = hashlib.sha1(b"blob %d\0" % size) if size < git_oid_limit else None
        self._chunk = blake3.blake3()
        self._chunk_filled = 0
        self._chunks: list[str] = []
        self._sha_seen = 0
        self._chunk_seen = 0
        self._stage: bytearray | None = None

    def update_sha256(self, data: memoryview, cold: bool = False) -> None:
        """Feed the SHA-256; ``cold``: the bytes are likely out of the CPU's caches (see the module's
        docstring), so they are hashed through a small buffer that is."""
        if not cold or len(data) <= STAGE_SIZE:
            self._sha256.update(data)
        else:
            if self._stage is None:
                self._stage = bytearray(STAGE_SIZE)
            stage = memoryview(self._stage)
            for offset in range(0, len(data), STAGE_SIZE):
                piece = data[offset : offset + STAGE_SIZE]
                staged = stage[: len(piece)]
                staged[:] = piece
                self._sha256.update(staged)
        self._sha_seen += len(data)

    def update_chunks(self, data: memoryview) -> None:
        """Feed the chunk digests (and the git SHA-1); the bytes must come in file order."""
        if self._git is not None:
            self._git.update(data)
        self._chunk_seen += len(data)
        while data:
            room = self.chunk_size - self._chunk_filled
            part, data = data[:room], data[room:]
            self._chunk.update(part)
            self._chunk_filled += len(part)
            if self._chunk_filled == self.chunk_size:
                self._chunks.append(self._chunk.hexdigest())
                self._chunk = blake3.blake3()
                self._chunk_filled = 0

    def update(self, data: memoryview) -> None:
        self.update_sha256(data)
        self.update_chunks(data)

    def update_chunk(self, data: memoryview, blake3_hex: str) -> None:
        """Feed one whole chunk, in order, whose BLAKE3 is already known (computed as it arrived): only
        the git SHA-1 is computed here; the SHA-256 still needs :meth:`update_sha256`."""
        if self._chunk_filled:
            raise ValueError("update_chunk needs chunk-aligned input")
        if self._git is not None:
            self._git.update(data)
        self._chunk_seen += len(data)
        self._chunks.append(blake3_hex)

    def finish(self) -> BlobDigest:
        if self._sha_seen != self.size or self._chunk_seen != self.size:
            raise IntegrityError(
                f"expected {self.size} bytes, hashed {min(self._sha_seen, self._chunk_seen)}: "
                "the source changed or was truncated while it was read"
            )
        if self._chunk_filled or not self._chunks:
            self._chunks.append(self._chunk.hexdigest())
        return BlobDigest(
            sha256=self._sha256.hexdigest(),
            size=self.size,
            chunk_size=self.chunk_size,
            chunk_blake3=tuple(self._chunks),
            git_sha1=self._git.hexdigest() if self._git is not None else None,
        )


def digest_bytes(data: bytes | memoryview, chunk_size: int) -> BlobDigest:
    hasher = BlobHasher(len(data), chunk_size)
    hasher.update(memoryview(data))
    return hasher.finish()


INLINE_BYTES = 1 << 20  # a file up to this size is hashed on the reading thread alone


def _fill(readinto: ReadInto, buffer: bytearray, want: int) -> int:
    """Read exactly ``want`` bytes unless the source ends first; return how many were read."""
    view = memoryview(buffer)
    got = 0
    while got < want:
        n = readinto(view[got:want])
        if not n:
            break
        got += n
    return got


def digest_stream(
    readinto: ReadInto,
    size: int,
    chunk_size: int,
    sink: Sink | None = None,
    progress: Progress | None = None,
    block_size: int = BLOCK_SIZE,
    inline_bytes: int = INLINE_BYTES,
) -> BlobDigest:
    """Read ``size`` bytes through ``readinto``, hash them and hand each block to ``sink`` (up to
    ``inline_bytes``, all on this thread; beyond, SHA-256 on another while this one reads the next block).

    Raises IntegrityError if the source holds fewer or more than ``size`` bytes (it changed under us).
    """
    hasher = BlobHasher(size, chunk_size)
    if size <= inline_bytes:  # (a thread per small file cost more than it saved: an import of 30,000 configs)
        data = bytearray(size)
        done = _fill(readinto, data, size)
        block = memoryview(data)[:done]
        hasher.update(block)
        if sink is not None and done:
            sink(block)
        if progress is not None and done:
            progress(done)
    else:
        done = _digest_blocks(hasher, readinto, size, sink, progress, block_size)
    if done == size and _fill(readinto, bytearray(1), 1):
        raise IntegrityError(f"expected {size} bytes but the source holds more: it changed while it was read")
    return hasher.finish()


def _digest_blocks(hasher: BlobHasher, readinto: ReadInto, size: int, sink: Sink | None,
                   progress: Progress | None, block_size: int) -> int:  # fmt: skip
    """(:func:`digest_stream`.) SHA-256 on a thread of its own while this one reads the next block and
    feeds the chunk digests and ``sink``; returns the bytes read."""
    block_size = min(block_size, max(size, 1))
    buffers = (bytearray(block_size), bytearray(block_size))
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as pool:
        current = 0
        filled = _fill(readinto, buffers[current], min(block_size, size))
        while filled:
            block = memoryview(buffers[current])[:filled]
            sha = pool.submit(hasher.update_sha256, block)
            try:
                hasher.update_chunks(block)
                if sink is not None:
                    sink(block)
                done += filled
                if progress is not None:
                    progress(done)
                following = 1 - current
                filled = _fill(readinto, buffers[following], min(block_size, size - done))
            finally:
                sha.result()
            current = following
    return done
