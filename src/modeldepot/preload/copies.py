"""One file of a preloaded model, held in RAM in one of the four ways (see :mod:`.preloader`)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

from modeldepot.config import PRELOAD_STRATEGIES
from modeldepot.errors import CorruptBlobError
from modeldepot.preload.residency import mapped_resident_bytes, populate, resident_bytes
from modeldepot.store.models import FileEntry
from modeldepot.store.store import Store

__all__ = ["STRATEGIES", "FileCopy"]

STRATEGIES = PRELOAD_STRATEGIES


class FileCopy:
    """One file of a preloaded model, held in RAM the strategy's way."""

    def __init__(self, store: Store, entry: FileEntry, strategy: str) -> None:
        self.entry = entry
        self.size = entry.size
        self.strategy = strategy
        self.mapping: mmap.mmap | None = None
        self.buffer: bytearray | None = None
        self.memfd = -1
        self.blob_fd = store.open_fd(entry)
        held = os.fstat(self.blob_fd)
        self.blob_file = (held.st_dev, held.st_ino)  # (the blob's file copied or mapped: the store's still?)
        self.path = store.file_path(entry.repo_id, entry.path, entry.commit_id)
        self.stored_path = self.path  # (the store's name of it: a memfd copy's path is its own)
        try:
            self._fill()
        except OSError as error:
            self.close(drop_cache=False)
            if error.errno != errno.EFAULT:
                raise
            # (a blob named elsewhere too, truncated there since it was opened: corrupt, as a check finds it)
            store.quarantine(entry.sha256)
            raise CorruptBlobError(entry.sha256, "its file is shorter than the index says") from None
        except BaseException:
            self.close(drop_cache=False)
            raise

    def _fill(self) -> None:
        if self.size == 0:
            return
        if self.strategy in ("read", "memfd"):
            # A private copy is read through the page cache, which kept the blob's pages too: twice the RAM
            # the tier counted, for good (an explorer's trial). The pages this copy brought in are let go of;
            # a blob mostly in the cache before (another reader's, a fresh download's) stays there. (Mostly:
            # a header read's few pages kept the whole blob there beside its copy, a review.)
            before = resident_bytes(self.blob_fd, self.size)
            cold = before is not None and before < self.size // 2
            self._copy()
            if cold:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self.blob_fd, 0, 0, os.POSIX_FADV_DONTNEED)
            # (the copy is its own: the blob's descriptor kept open told another process's evictions that
            # this one held the blob, a review)
            os.close(self.blob_fd)
            self.blob_fd = -1
            return
        if self.strategy == "page-cache":
            self.mapping = mmap.mmap(self.blob_fd, self.size, prot=mmap.PROT_READ)
            populate(self.mapping, self.size)
        elif self.strategy == "mmap":
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.mapping = mmap.mmap(self.blob_fd, self.size, flags=flags, prot=mmap.PROT_READ)

    def _copy(self) -> None:
        """The blob into this process's own memory (``read``) or a RAM-only file (``memfd``)."""
        if self.strategy == "read":
            self.buffer = bytearray(self.size)
            view, done = memoryview(self.buffer), 0
            while done < self.size:
                got = os.preadv(self.blob_fd, [view[done:]], done)
                if not got:
                    raise OSError(f"{self.entry.path}: the blob ended at {done} of {self.size} bytes")
                done += got
            view.release()
        else:  # memfd
            self.memfd = os.memfd_create(f"modeldepot:{self.entry.path}", 0)
            os.ftruncate(self.memfd, self.size)
            done = 0
            while done < self.size:  # in-kernel copy (copy_file_range refuses to cross filesystems)
                sent = os.sendfile(self.memfd, self.blob_fd, done, self.size - done)
                if not sent:
                    raise OSError(f"{self.entry.path}: the blob ended at {done} of {self.size} bytes")
                done += sent
            self.mapping = mmap.mmap(self.memfd, self.size, prot=mmap.PROT_READ)
            # (of the process that reads it: a forked worker read the parent's fd of that number, another model once
            # the parent had let this one go, a trial)
            self.path = Path(f"/proc/self/fd/{self.memfd}")

    def view(self) -> memoryview:
        if self.mapping is not None:
            return memoryview(self.mapping)
        if self.buffer is not None:
            return memoryview(self.buffer).toreadonly()
        return memoryview(b"")

    @property
    def shared(self) -> bool:
        """Whether this copy's RAM is the blob's page cache, the same for every copy of the blob (else its
        own private memory)."""
        return self.strategy in ("page-cache", "mmap")

    def resident(self) -> int:
        """Bytes of this file in RAM now (page cache or private memory)."""
        if self.strategy not in ("page-cache", "mmap"):
            return self.size
        measured = resident_bytes(self.blob_fd, self.size)
        if measured is None and self.mapping is not None:
            # Another user's blob, whose page cache the kernel does not show: what of it this copy's own
            # mapping holds, which the preload made whole and the kernel unmaps as it reclaims.
            measured = mapped_resident_bytes(self.mapping, self.size)
        # (no measure at all: counted whole, the side of the budget that never holds more than it says)
        return self.size if measured is None else measured

    def __del__(self) -> None:
        # (a RAM tier dropped without its close, with the depot that made it, a notebook's cell run again: its
        # descriptors, and a memfd's private copy, went with the process alone, a review)
        for fd in (getattr(self, "memfd", -1), getattr(self, "blob_fd", -1)):
            if fd >= 0:
                with contextlib.suppress(Exception):
                    os.close(fd)

    def close(self, drop_cache: bool) -> None:
        """Let go of the copy. A view of it a caller still holds keeps its memory (the mapping is unmapped
        when the last view goes) and stays valid: what was read stays read."""
        if self.mapping is not None:
            with contextlib.suppress(BufferError):  # exported: unmapped by the collector once released
                self.mapping.close()
            self.mapping = None
        self.buffer = None
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1
        if self.blob_fd >= 0:
            try:
                if drop_cache and self.strategy in ("page-cache", "mmap"):
                    _drop_pages(self.blob_fd)
            finally:
                os.close(self.blob_fd)
                self.blob_fd = -1


def _drop_pages(fd: int) -> None:
    """Ask the kernel to drop a blob's pages from its cache (a hint: what fails leaves them to its reclaim).

    The kernel drops only clean pages: a blob published before its flush (deferred durability) is written
    out first, or its pages would stay in RAM. A file system with nothing to flush refuses the flush
    (squashfs, erofs: EINVAL; a read-only mount: EROFS): every eviction of a tier on a store in a read-only
    image raised, the model out of the tier's books and its pages and file left held, an explorer's trial."""
    with contextlib.suppress(OSError):
        os.fdatasync(fd)
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
