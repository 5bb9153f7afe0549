"""Files and folders of the store's own (its locks, reservations, space reserve, write sessions) opened so that
no link leads out of it.

In a store a group shares, every member may rename and replace what lies in its folders: one who replaced
``locks/reservations`` with a link to another folder had every file there deleted by the next ``du`` of another
member, or of root, and by any client's GET of a node's ``/metrics``; a link in place of ``reserve/space`` had
root's next import pad a config file with 1 MiB of zeros (an explorer's trial). A name checked, then used, leaves
a race; so a folder is opened (``O_NOFOLLOW``), the folder opened is checked to lie inside the store, and what is
made, opened or deleted in it is so relative to it (``dir_fd``), the file itself never a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from modeldepot.errors import StoreError

__all__ = ["folder_within", "open_within", "opened_folder"]


def folder_within(path: Path, within: str, create: bool = False) -> int:
    """A descriptor of the folder ``path``, which must lie inside ``within`` (a real path: the store's home) as
    opened; ``create``: made first if missing, in its parent checked the same way. Raises StoreError outside (a
    link somewhere on the way), OSError as ``open`` does (FileNotFoundError: missing; ELOOP or ENOTDIR: the
    folder is a link, or a file)."""
    if create:
        parent = folder_within(path.parent, within) if os.path.realpath(path.parent) != within else None
        try:
            if parent is None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path)
            else:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path.name, dir_fd=parent)
        finally:
            if parent is not None:
                os.close(parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise StoreError(f"refusing to use {path}: it is a link (to {os.readlink(path)}), and the store's own "
                             f"folders never are; it leads out of the store at {within} (move it away)") from error  # fmt: skip
        raise
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # (no /proc: the name, resolved now)
        real = os.path.realpath(path)
    if real != within and os.path.commonpath([within, real]) != within:
        os.close(fd)
        raise StoreError(f"refusing to use {path}: it leads out of the store at {within} (to {real})")
    return fd


@contextlib.contextmanager
def opened_folder(path: Path, within: str, create: bool = False) -> Iterator[int]:
    """:func:`folder_within`, closed at the end of the block."""
    fd = folder_within(path, within, create)
    try:
        yield fd
    finally:
        os.close(fd)


def open_within(path: Path, flags: int, mode: int, within: str) -> int:
    """``os.open`` of a file of the store's own: its folder checked as :func:`folder_within` checks it, the file
    never a link (``O_NOFOLLOW``: ELOOP)."""
    with opened_folder(path.parent, within) as folder:
        return os.open(path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder)
