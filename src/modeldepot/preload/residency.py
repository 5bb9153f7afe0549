"""Making file pages resident, pinning them, and measuring what really is resident (docs/background.md:
one WILLNEED preloads only the readahead window, so residency is made page by page and then measured).

- ``populate``: ``madvise(MADV_POPULATE_READ)`` on a shared mapping where the kernel has it (5.14+); else
  one byte per page is touched. The pages land in the page cache, shared with every process that maps or
  opens the same file.
- ``resident_bytes``: ``cachestat`` of the file (Linux 6.5+), else ``mincore`` over a mapping of it (libc,
  through ctypes); None when the kernel will not say. Both reveal the page cache only to a process that owns
  the file or may write it (a side channel otherwise): ``cachestat`` refuses, ``mincore`` answers "every
  page resident" whatever is true, so it is asked only where it tells the truth.
- ``mapped_resident_bytes``: the pages of one of this process's own mappings that are in RAM, from
  ``/proc/self/pagemap``: true of a mapping of any file (a preloaded model of another user's store).
- ``lock``/``unlock``: ``mlock`` of a mapping; refused (EPERM, ENOMEM) when RLIMIT_MEMLOCK is too small.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import resource
import sys

__all__ = [
    "MADV_POPULATE_READ",
    "MlockError",
    "lock",
    "mapped_resident_bytes",
    "populate",
    "resident_bytes",
    "unlock",
]

MADV_POPULATE_READ = 22  # linux/mman.h; Python's mmap module may not name it
PAGE = mmap.PAGESIZE
_RESIDENT_BIT = bytes(
    flag & 1 for flag in range(256)
)  # mincore's byte per page: its lowest bit says resident
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long
# cachestat's number in the table every architecture but alpha shares since Linux 5.1 (asm-generic and
# x86's alike); left unasked elsewhere rather than risk another call under that number.
_CACHESTAT = (
    451
    if sys.platform == "linux"
    and platform.machine()
    in {"x86_64", "aarch64", "arm64", "armv7l", "riscv64", "ppc64le", "ppc64", "s390x", "loongarch64", "i686"}
    else None
)
_CAP_FOWNER = 3  # linux/capability.h
_PRESENT_BIT = bytes(flag >> 7 for flag in range(256))  # a pagemap entry's top byte: bit 63, page present


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]  # fmt: skip


class MlockError(OSError):
    """mlock was refused: the message says the limit and how to raise it."""


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]  # fmt: skip


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def _address(mapping: mmap.mmap | bytearray) -> ctypes.c_void_p:
    """The start address of a mapping (read-only ones too: ctypes' from_buffer wants a writable buffer,
    the buffer protocol does not). Valid while the mapping is open."""
    buffer = _PyBuffer()
    if _get_buffer(mapping, ctypes.byref(buffer), 0) != 0:
        raise OSError("cannot read the mapping's address")
    try:
        return ctypes.c_void_p(buffer.buf)
    finally:
        _release_buffer(ctypes.byref(buffer))


def populate(mapping: mmap.mmap, length: int) -> None:
    """Make every page of a shared file mapping resident."""
    if length == 0:
        return
    try:
        mapping.madvise(MADV_POPULATE_READ, 0, length)
        return
    except ValueError:
        pass  # (a platform without madvise's advice: touch the pages)
    except OSError as error:
        if error.errno == errno.EFAULT:  # (touching the pages would kill the process: SIGBUS)
            raise OSError(errno.EFAULT, "the file is shorter than its mapping: it was truncated") from None
        if error.errno != errno.EINVAL:
            raise
        # an older kernel, which does not know the advice: touch the pages
    view = memoryview(mapping)
    try:
        for offset in range(0, length, PAGE):
            view[offset]
    finally:
        view.release()


def resident_bytes(fd: int, length: int) -> int | None:
    """How many bytes of the first ``length`` of the file behind ``fd`` are in the page cache now; None when
    the kernel will not tell this process (a file it neither owns nor may write: another user's store)."""
    if length == 0:
        return 0
    cached = _cachestat(fd, length)
    if cached is not None:
        return cached
    if not _mincore_tells_the_truth(fd):
        return None
    mapping = mmap.mmap(fd, length, prot=mmap.PROT_READ)
    try:
        pages = -(-length // PAGE)
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(_address(mapping), length, vector) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"mincore failed: {os.strerror(error)}")
        resident = bytes(vector).translate(_RESIDENT_BIT).count(1)  # (a loop in Python: 0.02 s a GiB)
    finally:
        mapping.close()
    return min(length, resident * PAGE)


def _cachestat(fd: int, length: int) -> int | None:
    """Bytes of the file's first ``length`` in the page cache, by ``cachestat``; None when the kernel lacks
    it or refuses this file (EPERM: the rule mincore keeps, below)."""
    if _CACHESTAT is None:
        return None
    stat = _Cachestat()
    span = _CachestatRange(0, length)
    if _libc.syscall(ctypes.c_long(_CACHESTAT), ctypes.c_long(fd), ctypes.byref(span), ctypes.byref(stat),
                     ctypes.c_long(0)) != 0:  # fmt: skip
        error = ctypes.get_errno()
        if error in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise OSError(error, f"cachestat failed: {os.strerror(error)}")
    return min(length, int(stat.nr_cache) * PAGE)


def _mincore_tells_the_truth(fd: int) -> bool:
    """Whether mincore reports this file's page cache (Linux 5.2+, mm/mincore.c can_do_mincore): for a file
    the process owns (or has CAP_FOWNER over) or may write; of any other it says every page is resident."""
    if os.fstat(fd).st_uid == os.geteuid() or _has_capability(_CAP_FOWNER):
        return True
    try:
        return os.access(f"/proc/self/fd/{fd}", os.W_OK, effective_ids=True)
    except (OSError, NotImplementedError):
        return False


def _has_capability(number: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> number & 1)
    except (OSError, ValueError):
        pass
    return False


def mapped_resident_bytes(mapping: mmap.mmap, length: int) -> int | None:
    """How many bytes of this process's ``mapping`` (its first ``length``) are in RAM and mapped now, from
    the present bits of ``/proc/self/pagemap``; None where there is no pagemap to read. A page the kernel
    reclaims leaves every mapping of it, so this never counts a page that is gone; a page another process
    brought back is counted once this one touches it."""
    if length == 0:
        return 0
    pages = -(-length // PAGE)
    first = _address(mapping).value or 0
    try:
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        entries = os.pread(pagemap, pages * 8, first // PAGE * 8)
    except OSError:
        return None
    finally:
        os.close(pagemap)
    top_byte = 7 if sys.byteorder == "little" else 0  # (the byte of each 8-byte entry that holds bit 63)
    present = entries[top_byte::8].translate(_PRESENT_BIT).count(1)
    return min(length, present * PAGE)


def lock(mapping: mmap.mmap | bytearray, length: int) -> None:
    if length and _libc.mlock(_address(mapping), length) != 0:
        error = ctypes.get_errno()
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
        raise MlockError(
            error,
            f"mlock of {length} bytes refused ({os.strerror(error)}); RLIMIT_MEMLOCK is {limit}: raise it "
            "(ulimit -l, LimitMEMLOCK= in systemd, --ulimit memlock in docker) or run without mlock",
        )


def unlock(mapping: mmap.mmap | bytearray, length: int) -> None:
    if length:
        _libc.munlock(_address(mapping), length)
