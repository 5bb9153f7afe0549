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
import os
import re
from collections.abc import Collection

from modeldepot.validation import redact_credentials

__all__ = ["FileKey", "files_held_elsewhere", "holding_processes", "process_command", "processes_with_open"]

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


def files_held_elsewhere(folders: Collection[str]) -> dict[FileKey, tuple[str, set[int]]]:
    """The files under ``folders`` (real paths, each ending in "/") other processes map or hold open now,
    deleted since or not (a load's own links), by device and inode: the path they were seen by, and the
    processes. A model another process had loaded maps its blob: evicting it freed nothing until that
    process let go, and its next load fetched the model again (an explorer's trial)."""
    found: dict[FileKey, tuple[str, set[int]]] = {}
    under = tuple(folders)
    for pid in _other_processes():
        for key, path in _under(pid, under).items():
            found.setdefault(key, (path, set()))[1].add(int(pid))
    return found


def _under(pid: str, folders: tuple[str, ...]) -> dict[FileKey, str]:
    """:func:`files_held_elsewhere` of one process."""
    held: dict[FileKey, str] = {}
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address perms offset major:minor inode path
                if len(fields) < 6:
                    continue
                path = fields[5].rstrip(b"\n").decode(errors="replace").removesuffix(" (deleted)")
                if not path.startswith(folders):
                    continue
                try:
                    major, minor = (int(part, 16) for part in fields[3].split(b":"))
                    held[(os.makedev(major, minor), int(fields[4]))] = path
                except ValueError:
                    continue
    except OSError:  # (gone meanwhile, or not this user's)
        return held
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                path = os.readlink(f"/proc/{pid}/fd/{fd}").removesuffix(" (deleted)")
                if path.startswith(folders):
                    info = os.stat(f"/proc/{pid}/fd/{fd}")
                    held[(info.st_dev, info.st_ino)] = path
            except OSError:
                continue
    return held


def _held_by(pid: str, files: Collection[FileKey]) -> set[FileKey]:
    held: set[FileKey] = set()
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            for line in maps:
                if not line.endswith(b" (deleted)\n"):
                    continue
                fields = line.split(maxsplit=5)  # address perms offset major:minor inode path
                try:
                    major, minor = (int(part, 16) for part in fields[3].split(b":"))
                    key = (os.makedev(major, minor), int(fields[4]))
                except (IndexError, ValueError):
                    continue
                if key in files:
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
