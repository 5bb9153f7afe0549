"""The memory a process may use: a container's (control group's) limit, not only the host's RAM. A preload
budget of "50%" was half the host's RAM in a pod limited to a few GiB (an explorer's find).

A real cgroup v1 group is made where this machine lets root make one (these machines do); cgroup v2's files
are laid out in a folder, as the kernel shows them, since a machine has one hierarchy or the other."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from modeldepot.memory import available_fraction, memory_limit, ram_bytes

GiB = 1 << 30
V1_MEMORY = Path("/sys/fs/cgroup/memory")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limits_are_read_up_the_tree_and_the_lowest_binds(tmp_path: Path) -> None:
    root, own = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    write(root / "cgroup.controllers", "cpu memory pids\n")
    write(own, "0::/kubepods/pod1/container\n")
    write(root / "kubepods" / "memory.max", "max\n")
    write(root / "kubepods" / "pod1" / "memory.max", f"{4 * GiB}\n")
    write(root / "kubepods" / "pod1" / "container" / "memory.max", "max\n")
    assert memory_limit(root, own) == 4 * GiB
    assert ram_bytes(root, own) == min(4 * GiB, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    # Available: the limit less the working set (usage without the inactive page cache, which may be dropped)
    container = root / "kubepods" / "pod1"
    write(container / "memory.current", f"{3 * GiB}\n")
    write(container / "memory.stat", f"anon {GiB}\ninactive_file {2 * GiB}\nactive_file 0\n")
    meminfo = tmp_path / "meminfo"
    write(meminfo, "MemTotal:       100 kB\nMemAvailable:    90 kB\n")
    assert available_fraction(root, own, meminfo) == pytest.approx(0.75)
    write(container / "memory.stat", "anon 0\ninactive_file 0\n")
    assert available_fraction(root, own, meminfo) == pytest.approx(0.25)
    # No limit anywhere: the machine's RAM and its own share
    write(root / "kubepods" / "pod1" / "memory.max", "max\n")
    assert memory_limit(root, own) is None and available_fraction(root, own, meminfo) == pytest.approx(0.9)


def test_a_container_without_a_cgroup_namespace_reads_its_mounts_root(tmp_path: Path) -> None:
    """/proc/self/cgroup names the host's path; the container's mount shows its own group at its root."""
    root, own = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    write(own, "12:pids:/docker/abc\n4:cpu,memory:/docker/abc\n0::/docker/abc\n")
    write(root / "memory" / "memory.limit_in_bytes", f"{2 * GiB}\n")
    assert memory_limit(root, own) == 2 * GiB
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert memory_limit(root, own) is None
    assert memory_limit(root, tmp_path / "no-such-file") is None


def test_a_preload_budget_in_percent_is_a_share_of_the_containers_limit() -> None:
    """In a real memory cgroup limited to 1 GiB, "50%" is 512 MiB and "100%" no more than the limit."""
    group = V1_MEMORY / f"modeldepot-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(GiB))
    except OSError as error:
        pytest.skip(f"no memory cgroup to make here ({error}): the folder-laid tests above stand for it")
    try:
        script = (
            "import os, sys\n"
            f"open('{group}/cgroup.procs', 'w').write(str(os.getpid()))\n"
            "from modeldepot.preload.preloader import parse_budget\n"
            "from modeldepot.engines.cache import _available_fraction\n"
            "from modeldepot.errors import ConfigError\n"
            "print(parse_budget('50%'), parse_budget('100%'), 0 < _available_fraction() <= 1)\n"
            "try:\n    parse_budget('2GiB')\nexcept ConfigError as error:\n    print(error)\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        shares, refused = done.stdout.splitlines()
        assert shares.split() == [str(GiB // 2), str(GiB), "True"]
        assert "more than the RAM this process may use (1.0 GiB" in refused
    finally:
        group.rmdir()
