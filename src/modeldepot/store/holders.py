"""Which other processes still hold files the store deleted, mapped or open: a deleted file's disk space comes
back only when the last of them lets go (an idle inference worker's loaded model kept a removed 192 MiB on
disk while `rm` said it was freed: an explorer's trial).

Read from ``/proc`` (Linux), for the processes this user may look into; elsewhere, or for another user's
processes, nothing is found. A file is known by its device and inode (a loaded model maps it through another
name, a load's own link, deleted since): a mapping's as ``/proc/PID/maps`` gives them, an open file's by the
``stat`` of its descriptor, looked at only when the kernel calls it deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import time
import zlib
from collections.abc import Collection
from pathlib import Path

from modeldepot.errors import StoreError
from modeldepot.store.confined import folder_within, opened_folder
from modeldepot.store.locks import forget_and_close, lock_file, lock_is_held, take_flock, unlock_and_close
from modeldepot.validation import redact_credentials

__all__ = [
    "BLOB_FILE",
    "LETTING_GO",
    "FileKey",
    "announce_letting_go",
    "files_held_elsewhere",
    "holding_processes",
    "process_command",
    "processes_letting_go",
    "processes_with_open",
    "say_sending",
    "sent_by",
    "stop_letting_go",
]

FileKey = tuple[int, int]  # (st_dev, st_ino)


def holding_processes(files: Collection[FileKey]) -> dict[FileKey, set[int]]:
    """The processes that map or hold open each of ``files`` (deleted just now: their device and inode);
    those nobody holds are left out. This one too, once it let go of what it could: a node removing a repo
    while it sends one of its files to a slow client said the whole freed, `du` agreeing, and the disk got
    nothing back until the client was done (an explorer's trial)."""
    found: dict[FileKey, set[int]] = {}
    files = set(files)
    if not files:
        return found
    for pid in [str(os.getpid()), *_other_processes()]:
        for key in _held_by(pid, files):
            found.setdefault(key, set()).add(int(pid))
    return found


# A store's blob, by whatever path it is reached (a bind mount, a container's volume)
BLOB_FILE = re.compile(r"/blobs/[0-9a-f]{2}/([0-9a-f]{64})\Z")
_BLOBS_NEEDLE = b"/blobs/"


def files_held_elsewhere(
    folders: Collection[str], skip: Collection[int] = ()
) -> dict[int, tuple[str, set[int]]]:
    """The files other processes (but ``skip``) map or hold open now under ``folders`` (real paths, each
    ending in "/"), deleted since or not (a load's own links), and the store's blobs by any path (a bind
    mount, a container's volume): by inode (btrfs shows a subvolume's files under another device number in
    ``maps`` than ``stat`` gives), with the path they were seen by and the processes. A model another process
    had loaded maps its blob: evicting it freed nothing until that process let go, and its next load fetched
    the model again (an explorer's trial). An open file under ``folders`` is one only when it is another name
    of a file (a link to a blob) or deleted: a writer's own session files are not."""
    found: dict[int, tuple[str, set[int]]] = {}
    under = tuple(folders)
    needles = (_BLOBS_NEEDLE, *(os.fsencode(folder) for folder in under))
    for pid in _other_processes():
        if int(pid) in skip:
            continue
        for inode, path in _under(pid, under, needles).items():
            found.setdefault(inode, (path, set()))[1].add(int(pid))
    return found


def _under(pid: str, folders: tuple[str, ...], needles: tuple[bytes, ...]) -> dict[int, str]:
    """:func:`files_held_elsewhere` of one process."""
    held: dict[int, str] = {}
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            data = maps.read()
    except OSError:  # (gone meanwhile, or not this user's)
        return held
    if any(needle in data for needle in needles):  # (one look at the whole: most processes map none)
        for line in data.splitlines():
            fields = line.split(maxsplit=5)  # address perms offset major:minor inode path
            if len(fields) < 6:
                continue
            # (the kernel writes a newline in a name as \012; a name is bytes, not always UTF-8)
            path = os.fsdecode(fields[5].replace(b"\\012", b"\n")).removesuffix(" (deleted)")
            if path.startswith(folders) or BLOB_FILE.search(path):
                with contextlib.suppress(ValueError):
                    held[int(fields[4])] = path
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                named = os.readlink(f"/proc/{pid}/fd/{fd}")
                path = named.removesuffix(" (deleted)")
                blob = BLOB_FILE.search(path) is not None
                if not blob and not path.startswith(folders):
                    continue
                info = os.stat(f"/proc/{pid}/fd/{fd}")
                if blob or named != path or info.st_nlink > 1:
                    held[info.st_ino] = path
            except OSError:
                continue
    return held


def removed_files_held(folders: Collection[str]) -> dict[int, tuple[int, set[int]]]:
    """The files deleted from ``folders`` (real paths, each ending in "/") or deleted blobs (by any path) that
    processes, this one too, still map or hold open: by inode, their size and the processes. Their disk
    comes back only once those let go: `rm` said so, and `du`, run just after, said nothing of it while `df`
    disagreed (an explorer's trial). A mapping's size is its file's where ``/proc/PID/map_files`` may be
    read, else the length mapped."""
    found: dict[int, tuple[int, set[int]]] = {}
    under = tuple(folders)
    for pid in [str(os.getpid()), *_other_processes()]:
        for inode, size in _removed_under(pid, under).items():
            was = found.get(inode, (0, set()))
            found[inode] = (max(was[0], size), was[1] | {int(pid)})
    return found


def _removed_under(pid: str, folders: tuple[str, ...]) -> dict[int, int]:
    held: dict[int, int] = {}
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            data = maps.read()
    except OSError:
        return held
    if b" (deleted)" in data:
        for line in data.splitlines():
            if not line.endswith(b" (deleted)"):
                continue
            fields = line.split(maxsplit=5)
            if len(fields) < 6:
                continue
            path = os.fsdecode(fields[5].replace(b"\\012", b"\n")).removesuffix(" (deleted)")
            if not path.startswith(folders) and not BLOB_FILE.search(path):
                continue
            try:
                inode = int(fields[4])
                start, end = (int(part, 16) for part in fields[0].split(b"-"))
            except ValueError:
                continue
            try:
                mapped = os.stat(f"/proc/{pid}/map_files/{fields[0].decode()}")
            except OSError:
                size = end - start
            else:
                if mapped.st_nlink:  # (another name keeps it: nothing comes back when it is let go)
                    continue
                size = mapped.st_size
            held[inode] = max(held.get(inode, 0), size)
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                named = os.readlink(f"/proc/{pid}/fd/{fd}")
                path = named.removesuffix(" (deleted)")
                if named == path or not (path.startswith(folders) or BLOB_FILE.search(path)):
                    continue
                info = os.stat(f"/proc/{pid}/fd/{fd}")
                if info.st_nlink:
                    continue
                held[info.st_ino] = max(held.get(info.st_ino, 0), info.st_size)
            except OSError:
                continue
    return held


LETTING_GO = "letting-go"  # locks/letting-go/<pid>: the nodes that let go of what is removed on their own


def announce_letting_go(folder: Path) -> int | None:
    """Say, until :func:`stop_letting_go`, that this process lets go of what another process removes from the
    store within seconds (a node: it looks every few): what it maps or holds open is no reason for another
    process to keep a model from eviction (a node's preloads kept every CLI pull beside it from making room).
    The descriptor held (its lock tells a live announcer from a killed one's file); None when it cannot be
    said (a read-only store)."""
    name = str(os.getpid())
    try:  # (in locks/letting-go as opened: a link in its place leads nowhere, store/confined.py)
        with opened_folder(folder, os.path.realpath(folder.parents[1]), create=True) as opened:
            # (a file new, of a new time: a killed process's of this pid, old, could be taken for stale by
            # another process's look and removed between this open and its lock, the announcement then unseen)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=opened)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = lock_file(os.open, name, flags, 0o644, dir_fd=opened)
    except (OSError, StoreError):
        return None
    try:
        # (a forked child lets go of its copy: it held the lock on past the node's end, and /proc/locks names
        # the process that took it, so the node's pid, taken later by a notebook, read as a node's, and what
        # the notebook mapped was evicted: a review)
        take_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        forget_and_close(fd)
        return None
    return fd


def stop_letting_go(folder: Path, fd: int) -> None:
    """The end of :func:`announce_letting_go`."""
    with contextlib.suppress(OSError):
        os.unlink(folder / str(os.getpid()))
    with contextlib.suppress(OSError):
        unlock_and_close(fd)


def processes_letting_go(folder: Path) -> set[int]:
    """The live processes that announced they let go of what is removed (each holds the lock of the file of
    its own pid: a killed node's file, its pid taken since by a notebook, is not one; such a file goes once
    a minute old)."""
    try:  # (the folder as opened: a link in its place had stale-looking files of any folder deleted, a review)
        opened = folder_within(folder, os.path.realpath(folder.parents[1]))
    except (OSError, StoreError):
        return set()
    try:
        names = [name for name in os.listdir(opened) if name.isdigit()]
        if not names:
            return set()
        held = _flock_holders()  # (one read of /proc/locks for them all)
        found = set()
        for name in names:
            try:
                info = os.stat(name, dir_fd=opened, follow_symlinks=False)
            except OSError:
                continue
            if held.get(info.st_ino) == int(name):
                found.add(int(name))
            elif stat.S_ISREG(info.st_mode) and time.time() - info.st_mtime > STALE_ANNOUNCEMENT:
                with contextlib.suppress(OSError):
                    if lock_is_held(name, opened) is False:
                        os.unlink(name, dir_fd=opened)  # (a killed node's: the kernel dropped its lock)
        return found
    finally:
        os.close(opened)


STALE_ANNOUNCEMENT = 60.0  # seconds after which an announcement no live process holds goes


def say_sending(fd: int, digests: Collection[str]) -> None:
    """Write in this process's announcement (:func:`announce_letting_go`'s ``fd``) the blobs it is sending
    now, one SHA-256 a line: a node lets go of its preloads within seconds, not of an answer in flight to a
    slow client, and another process's eviction of that blob freed nothing while it said so (an explorer's
    trial). The same file (its lock is the announcement): written over, then cut to its length, the list's
    CRC-32 on its last line, so that a reader can tell a read that raced the writes (a read is not atomic
    against a write: one saw a line of mixed bytes and missed a blob being sent for that look, a review)
    and read again. Never raises."""
    body = "".join(f"{sha256}\n" for sha256 in sorted(digests)).encode()
    data = body + b"crc32 %08x\n" % zlib.crc32(body)
    with contextlib.suppress(OSError):
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))


def sent_by(folder: Path, pids: Collection[int]) -> dict[str, set[int]]:
    """The blobs the live announcers ``pids`` (of :func:`processes_letting_go`) said they are sending
    (:func:`say_sending`), with the processes."""
    found: dict[str, set[int]] = {}
    try:
        opened = folder_within(folder, os.path.realpath(folder.parents[1]))
    except (OSError, StoreError):
        return found
    try:
        for pid in pids:
            try:
                fd = os.open(
                    str(pid), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=opened
                )
            except OSError:
                continue
            try:
                data = _whole_list(fd)
            except OSError:
                continue
            finally:
                os.close(fd)
            for line in data.split(b"\n"):
                if _SENT.fullmatch(line):
                    found.setdefault(line.decode(), set()).add(pid)
    finally:
        os.close(opened)
    return found


_SENT = re.compile(rb"[0-9a-f]{64}")
SENDING_READS = 20  # reads of a sending list, at most, until one is whole (its CRC-32 matches)


def _whole_list(fd: int) -> bytes:
    """The sending list in ``fd`` as one write left it: read again (a moment apart) while the read raced a
    write; after SENDING_READS, every read's lines together (a line torn by a write names no blob; and the
    list of a node of a version before the CRC: read so, 20 ms late. Two reads alike are no proof: a writer
    stalled mid-write showed the same torn list twice, a test's trial)."""
    reads: list[bytes] = []
    for _ in range(SENDING_READS):
        data = os.pread(fd, 1 << 20, 0)
        if not data:
            return data  # (nothing said yet)
        body, _, last = data.rstrip(b"\n").rpartition(b"\n")
        body = body + b"\n" if body else b""
        if last == b"crc32 %08x" % zlib.crc32(body):
            return body
        reads.append(data)
        time.sleep(0.001)
    return b"\n".join(reads)


def _flock_holders() -> dict[int, int]:
    """Inode -> the pid /proc/locks gives for a FLOCK of it (by inode alone, as flock_holder falls back to:
    btrfs shows another device number there)."""
    found: dict[int, int] = {}
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) < 6 or fields[1] != "FLOCK":
                    continue
                with contextlib.suppress(ValueError, IndexError):
                    found[int(fields[5].split(":")[2])] = int(fields[4])
    except OSError:
        pass
    return found


def _held_by(pid: str, files: Collection[FileKey]) -> set[FileKey]:
    held: set[FileKey] = set()
    by_inode = {inode: (device, inode) for device, inode in files}
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            for line in maps:
                if not line.endswith(b" (deleted)\n"):
                    continue
                fields = line.split(maxsplit=5)  # address perms offset major:minor inode path
                try:  # (by the inode: btrfs shows a subvolume's files under another device number there)
                    key = by_inode.get(int(fields[4]))
                except (IndexError, ValueError):
                    continue
                if key is not None:
                    held.add(key)
    except OSError:  # (gone meanwhile, or not this user's)
        return held
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return held
    for fd in descriptors:
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").endswith(" (deleted)"):
                continue
            info = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in files:
            held.add((info.st_dev, info.st_ino))
    return held


def processes_with_open(path: str) -> set[int]:
    """The processes other than this one that hold the file ``path`` open (its real path)."""
    wanted, found = os.path.realpath(path), set[int]()
    for pid in _other_processes():
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == wanted:
                    found.add(int(pid))
                    break
    return found


def _other_processes() -> list[str]:
    """The process ids in ``/proc`` but this process's (none where there is no ``/proc``)."""
    try:
        return [name for name in os.listdir("/proc") if name.isdigit() and int(name) != os.getpid()]
    except OSError:
        return []


def process_command(pid: int) -> str | None:
    """What process ``pid`` runs, as its command line reads (shortened): a holder named by its pid alone was
    guessed to be "a worker's loaded model" when it was the node sending the file to a slow client (an
    explorer's trial). None when it cannot be read (gone, another user's)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = [arg.decode(errors="replace") for arg in cmdline.read().split(b"\0") if arg]
    except OSError:
        return None
    if not argv:
        return None
    words = [os.path.basename(argv[0]), *_redacted(argv[1:])]
    if len(words) > 1 and words[0].startswith("python") and words[1] == "-m":
        words = words[2:]  # (python -m modeldepot serve: the module is the command)
    elif len(words) > 1 and words[0].startswith("python"):
        words = [os.path.basename(words[1]), *words[2:]]
    said = " ".join(" ".join(words).split())  # (one line: a `python -c` program's newlines)
    return said if len(said) <= 60 else f"{said[:57]}..."


_SECRET = re.compile(r"--?[\w-]*(token|password|passwd|secret|key|auth)[\w-]*", re.IGNORECASE)


def _redacted(args: list[str]) -> list[str]:
    """``args`` with the values of options that name a secret (``--token T``, ``--token=T``) and the
    passwords of URLs said as ``***``: `modeldepot serve --token ...` is how a node is given its token, and a
    holder's command line is printed (a review)."""
    said, hide_next = [], False
    for arg in args:
        if hide_next:
            said.append("***")
            hide_next = False
            continue
        option, equals, _ = arg.partition("=")
        if _SECRET.fullmatch(option):
            said.append(f"{option}=***" if equals else arg)
            hide_next = not equals
            continue
        said.append(redact_credentials(arg))
    return said
