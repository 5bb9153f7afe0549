"""Which file system holds the store, and whether it is one several machines share.

A store is one machine's: its index is SQLite in WAL mode, whose shared-memory file only works between
processes of one kernel, and several file systems of this kind make locks local or no-ops (Lustre without
``flock``; huggingface_hub PR#4228 met corrupt blobs that way). Machines share a store over HTTP instead:
one serves it (``modeldepot serve``), the others name it in ``MODELDEPOT_SERVERS`` or join its fleet. A
store opened on such a file system says so once, with that advice (:func:`shared_filesystem`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["NETWORK_FILESYSTEMS", "mount_of", "shared_filesystem"]

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "9p", "afs",
    "ocfs2", "gfs2", "panfs", "wekafs", "virtiofs",
    # FUSE file systems are "fuse.<name>": these reach other machines or object stores
    "fuse.sshfs", "fuse.gcsfuse", "fuse.s3fs", "fuse.rclone", "fuse.juicefs", "fuse.glusterfs",
    "fuse.ceph-fuse", "fuse.goofys", "fuse.mountpoint-s3", "fuse.blobfuse", "fuse.blobfuse2",
})  # fmt: skip

MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """mountinfo writes a space, a tab, a newline and a backslash in a path as octal escapes."""
    for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escape, char)
    return field


def mount_of(path: Path, mountinfo: str | None = None) -> tuple[str, str] | None:
    """(mount point, file system type) of the mount that holds ``path`` (its deepest mount point that is a
    prefix of the resolved path), from ``mountinfo`` (default: this process's); None when unknown (no
    /proc)."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-")  # optional fields come before it
            mount_point, fstype = _unescape(fields[4]), fields[separator + 1]
        except (ValueError, IndexError):
            continue
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        # (a later line with the same mount point is a mount over the earlier one: it wins)
        if inside and (best is None or len(mount_point) >= len(best[0])):
            best = (mount_point, fstype)
    return best


def shared_filesystem(path: Path, mountinfo: str | None = None) -> tuple[str, str] | None:
    """(mount point, type) when ``path`` is on a file system several machines may share; else None."""
    mount = mount_of(path, mountinfo)
    if mount is None:
        return None
    return mount if mount[1].lower() in NETWORK_FILESYSTEMS else None
