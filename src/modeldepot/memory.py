"""The memory this process may use: the machine's RAM, or less where its control group (a container's, a
systemd unit's) is limited. A preload budget of "50%" was half the host's RAM in a 4 GiB pod on a 256 GiB
host (128 GiB: the kernel reclaims or kills long before the tier evicts), and the engine cache judged
memory pressure by the host alone (an explorer's find). cgroup v2 (``memory.max``) and v1
(``memory.limit_in_bytes``) are read, every level from the process's group up to the root of its mount:
the lowest limit binds.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_bytes", "available_fraction", "memory_limit", "ram_bytes"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_NO_LIMIT = 1 << 62  # (v1 says "no limit" as the largest page-aligned number: 9223372036854771712)


def ram_bytes(cgroups: Path = CGROUP_ROOT, own: Path = PROC_CGROUP) -> int:
    """Bytes of memory this process may use: the machine's RAM, or its control group's limit when lower."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = memory_limit(cgroups, own)
    return physical if limit is None else min(physical, limit)


def memory_limit(cgroups: Path = CGROUP_ROOT, own: Path = PROC_CGROUP) -> int | None:
    """The lowest memory limit of this process's control group and the groups above it; None when there is
    none (or no control group to read)."""
    found = _limits(cgroups, own)
    return min((limit for limit, _ in found), default=None)


def available_fraction(cgroups: Path = CGROUP_ROOT, own: Path = PROC_CGROUP,
                       meminfo: Path = Path("/proc/meminfo")) -> float:  # fmt: skip
    """The share of memory still available: the machine's (MemAvailable / MemTotal), or the tightest control
    group's (its limit less its working set: usage without the page cache it may drop, as the kubelet
    counts it) when lower; 1.0 where nothing can be read."""
    shares = []
    try:
        with open(meminfo) as handle:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in handle if line.count(" ") >= 1}
        shares.append(fields["MemAvailable"] / fields["MemTotal"])
    except (OSError, ValueError, KeyError, IndexError, ZeroDivisionError):
        pass
    for limit, folder in _limits(cgroups, own):
        used = _working_set(folder)
        if used is not None and limit > 0:
            shares.append(max(0.0, (limit - used) / limit))
    return min(shares, default=1.0)


def available_bytes(cgroups: Path = CGROUP_ROOT, own: Path = PROC_CGROUP,
                    meminfo: Path = Path("/proc/meminfo")) -> int | None:  # fmt: skip
    """Bytes of memory this process may still take before the kernel must kill something: the machine's
    MemAvailable, or the tightest control group's limit less its working set when lower; None where
    nothing can be read."""
    found = []
    try:
        with open(meminfo) as handle:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in handle if line.count(" ") >= 1}
        found.append(fields["MemAvailable"] * 1024)
    except (OSError, ValueError, KeyError, IndexError):
        pass
    for limit, folder in _limits(cgroups, own):
        used = _working_set(folder)
        if used is not None:
            found.append(max(0, limit - used))
    return min(found, default=None)


def _limits(cgroups: Path, own: Path) -> list[tuple[int, Path]]:
    """(limit, folder) of each limited level of this process's memory control group, v2 or v1."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return []
    found: list[tuple[int, Path]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and (cgroups / "cgroup.controllers").is_file():  # v2, the unified hierarchy
            found.extend(_levels(cgroups, path, "memory.max"))
        elif "memory" in controllers.split(","):  # v1
            found.extend(_levels(cgroups / "memory", path, "memory.limit_in_bytes"))
    return found


def _levels(mount: Path, path: str, name: str) -> list[tuple[int, Path]]:
    """The limits named ``name`` from the group at ``path`` under ``mount`` up to the mount's root. Where the
    group is not under the mount (a container whose root is its own group, without a cgroup namespace), the
    mount's root is the group."""
    leaf = mount / path.strip("/")
    if not leaf.is_dir():
        leaf = mount
    found: list[tuple[int, Path]] = []
    folder = leaf
    while True:
        limit = _read_limit(folder / name)
        if limit is not None:
            found.append((limit, folder))
        if folder == mount or mount not in folder.parents:
            return found
        folder = folder.parent


def _read_limit(file: Path) -> int | None:
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _NO_LIMIT else None


def _working_set(folder: Path) -> int | None:
    """A group's memory in use, without the page cache it may drop (inactive file pages)."""
    usage = next(
        (value for name in ("memory.current", "memory.usage_in_bytes")
         if (value := _read_number(folder / name)) is not None),
        None,
    )  # fmt: skip
    if usage is None:
        return None
    inactive = 0
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, number = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                inactive = int(number)
                if key == "total_inactive_file":  # (v1: the whole subtree's, as the usage is)
                    break
    except (OSError, ValueError):
        pass
    return max(0, usage - inactive)


def _read_number(file: Path) -> int | None:
    try:
        return int(file.read_text().strip())
    except (OSError, ValueError):
        return None
