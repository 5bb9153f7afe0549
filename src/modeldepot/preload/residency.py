"""Making file pages resident, pinning them, and measuring what really is resident (docs/background.md:
one WILLNEED preloads only the readahead window, so residency is made page by page and then measured).

- ``populate``: ``madvise(MADV_POPULATE_READ)`` on a shared mapping where the kernel has it (5.14+); else
  one byte per page is touched. The pages land in the page cache, shared with every process that maps or
  opens the same file.
- ``resident_bytes``: ``mincore`` over a mapping of the file (libc, through ctypes).
- ``lock``/``unlock``: ``mlock`` of a mapping; refused (EPERM, ENOMEM) when RLIMIT_MEMLOCK is too small.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import resource

__all__ = ["MADV_POPULATE_READ", "MlockError", "lock", "populate", "resident_bytes", "unlock"]

MADV_POPULATE_READ = 22  # linux/mman.h; Python's mmap module may not name it
PAGE = mmap.PAGESIZE
_RESIDENT_BIT = bytes(
    flag & 1 for flag in range(256)
)  # mincore's byte per page: its lowest bit says resident
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


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


def _address(mapping: mmap.mmap) -> ctypes.c_void_p:
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


def resident_bytes(fd: int, length: int) -> int:
    """How many bytes of the file behind ``fd`` are in the page cache now."""
    if length == 0:
        return 0
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


def lock(mapping: mmap.mmap, length: int) -> None:
    if length and _libc.mlock(_address(mapping), length) != 0:
        error = ctypes.get_errno()
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
        raise MlockError(
            error,
            f"mlock of {length} bytes refused ({os.strerror(error)}); RLIMIT_MEMLOCK is {limit}: raise it "
            "(ulimit -l, LimitMEMLOCK= in systemd, --ulimit memlock in docker) or run without mlock",
        )


def unlock(mapping: mmap.mmap, length: int) -> None:
    if length:
        _libc.munlock(_address(mapping), length)
