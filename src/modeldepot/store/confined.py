"""Files and folders of the store's own (its locks, reservations, space reserve, write sessions, downloads,
notes beside the index) opened so that no link leads out of it.

In a store a group shares, every member may rename and replace what lies in its folders: one who replaced
``locks/reservations`` with a link to another folder had every file there deleted by the next ``du`` of another
member, or of root, and by any client's GET of a node's ``/metrics``; a link in place of ``reserve/space`` had
root's next import pad a config file with 1 MiB of zeros (an explorer's trial). A name checked, then used, leaves
a race; so a folder is opened (``O_NOFOLLOW``, but for the home itself, whose links are the user's), the folder
opened is checked to lie inside the store, and what is made, opened or deleted in it is so relative to it
(``dir_fd``), the file itself never a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from modeldepot.errors import StoreError

__all__ = [
    "folder_within",
    "folders_in",
    "named",
    "open_within",
    "opened_folder",
    "remove_tree",
    "write_within",
]


def folder_within(path: Path, within: str, create: bool = False) -> int:
    """A descriptor of the folder ``path``, which must lie inside ``within`` (a real path: the store's home) as
    opened; ``create``: made first if missing, in its parent opened and checked the same way. Raises StoreError
    outside (a link in place of a folder), OSError as ``open`` does (FileNotFoundError: missing)."""
    if create:
        try:
            return _checked(path, within)
        except FileNotFoundError:
            with opened_folder(path.parent, within) as parent, contextlib.suppress(FileExistsError):
                try:
                    os.mkdir(path.name, dir_fd=parent)
                except OSError as error:
                    raise named(error, path) from None
    return _checked(path, within)


def _checked(path: Path, within: str) -> int:
    # (one open, one readlink: a pull of 300 small files opens a few thousand such folders; a realpath of each,
    # an lstat per component, made it 7% slower, measured)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR) or not os.path.islink(path):
            raise
        # (the home itself, through the user's link: not a store folder's name linked to the home, a review)
        if os.path.realpath(path) != within or _inside(os.path.realpath(path.parent), within):
            raise _a_link(path, within) from error
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # (no /proc: the name, resolved now)
        real = os.path.realpath(path)
    if not _inside(real, within):
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
    never a link (a StoreError says so)."""
    with opened_folder(path.parent, within) as folder:
        try:
            return os.open(path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise _a_link(path, within) from error
            raise named(error, path) from None


def folders_in(folder: int, relative: str) -> int:
    """A descriptor of the folder ``relative`` (names a validated path gives: no "..") under the folder
    ``folder`` is, each made if missing and none of them a link (ELOOP, ENOTDIR); the caller closes it."""
    current = os.dup(folder)
    for part in (p for p in relative.split("/") if p):
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, dir_fd=current)
            following = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current
            )
        finally:
            os.close(current)
        current = following
    return current


def write_within(path: Path, data: bytes, within: str, mode: int = 0o666) -> None:
    """Replace the file ``path`` of the store's own with ``data``, whole (a new file of a random name, then a
    rename, both in its folder as opened): a link put where its temporary or its name was leads nowhere."""
    with opened_folder(path.parent, within) as folder:
        temporary = f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                         dir_fd=folder)  # fmt: skip
        except OSError as error:
            raise named(error, path.with_name(temporary)) from None
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            try:
                os.rename(temporary, path.name, src_dir_fd=folder, dst_dir_fd=folder)
            except OSError as error:
                raise named(error, path) from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=folder)
            raise


def _inside(real: str, within: str) -> bool:
    """Whether the real path ``real`` is ``within`` or under it (both real paths: no "..", no "//")."""
    return real == within or real.startswith(within.rstrip("/") + "/")


def named(error: OSError, path: Path) -> OSError:
    """``error`` of a call relative to a folder's descriptor, naming the whole path (what the store's errors
    read: whose file it is, whether the disk's inodes ran out)."""
    return OSError(error.errno, error.strerror, os.fspath(path))


def _a_link(path: Path, within: str) -> StoreError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return StoreError(f"refusing to use {path}: it is a link (to {target}), and the store's own files and folders "
                      f"never are: a link there could lead out of the store at {within} (move it away)")  # fmt: skip


def remove_tree(folder: int, name: str) -> None:
    """Delete ``name`` in the opened ``folder`` and, a folder, everything in it, each folder opened as it is
    entered (``O_NOFOLLOW``, relative to its parent's descriptor): a link is removed, never followed, wherever
    it lies (shutil.rmtree takes a descriptor from Python 3.11 only). Raises OSError as the calls do."""
    try:
        inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(name, dir_fd=folder)  # (a file, or a link: the link itself)
        return
    try:
        with os.scandir(inner) as entries:
            found = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
        for child, is_folder in found:
            with contextlib.suppress(FileNotFoundError):
                if is_folder:
                    remove_tree(inner, child)
                else:
                    os.unlink(child, dir_fd=inner)
    finally:
        os.close(inner)
    os.rmdir(name, dir_fd=folder)
