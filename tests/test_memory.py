"""The memory a process may use: a container's (control group's) limit, not only the host's RAM. A preload
budget of "50%" was half the host's RAM in a pod limited to a few GiB (an explorer's find).

A real cgroup v1 group is made where this machine lets root make one (these machines do); cgroup v2's files
are laid out in a folder, as the kernel shows them, since a machine has one hierarchy or the other."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from modeldepot import Depot
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


PRELOAD_IN_A_GROUP = """
import os, sys
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
from modeldepot import Depot, MemoryShortError
from modeldepot.preload import Preloader
with Depot(sys.argv[2]) as depot:
    tier = Preloader(depot, budget="95%", strategy="memfd")
    for name in "abcde":
        tier.preload(f"acme/{name}")
        print(name, *sorted(m.repo_id[-1] for m in tier.stats().preloaded), flush=True)
    held = tier.stats().preloaded  # (the most recently used first)
    for model in held[:-1]:
        tier.pin(model.repo_id)
    try:  # (what the one model that may go gives back is not enough: none goes)
        tier.preload("acme/g")
    except MemoryShortError as error:
        print("refused", len(tier.stats().preloaded) == len(held), error)
    tier.pin(held[-1].repo_id)
    try:
        tier.preload("acme/f")
    except MemoryShortError as error:
        print("refused", error)
    tier.close()
"""


def test_a_tier_of_private_copies_keeps_its_container_alive(tmp_path: Path) -> None:
    """A `memfd` tier under a budget of 95% of its container's limit was killed by the kernel before the
    budget was reached (the budget counts the tier, not the process: an explorer's trial). In a real 200 MiB
    group, six 32 MiB models: the tier lets the oldest go for memory, and refuses, clearly, what it cannot
    make room for."""
    group = V1_MEMORY / f"modeldepot-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(200 << 20))
    except OSError as error:
        pytest.skip(f"no memory cgroup to make here ({error})")
    try:
        home = tmp_path / "store"
        with Depot(home) as depot:
            for index, name in enumerate("abcdefg"):
                folder = tmp_path / name
                folder.mkdir()
                (folder / "model.bin").write_bytes(
                    random.Random(index).randbytes((60 if name == "g" else 32) << 20)
                )
                depot.import_dir(folder, f"acme/{name}")
        done = subprocess.run([sys.executable, "-c", PRELOAD_IN_A_GROUP, str(group), str(home)],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        kills = [
            line for line in (group / "memory.oom_control").read_text().splitlines() if "oom_kill " in line
        ]
        assert done.returncode == 0, f"{done.returncode} ({kills}): {done.stdout} {done.stderr[-2000:]}"
        *steps, kept, refused = done.stdout.splitlines()
        assert kept.startswith("refused True preloading acme/g (60.0 MiB)"), kept
        held = [step.split()[1:] for step in steps]
        assert [step.split()[0] for step in steps] == list("abcde")
        assert held[0] == ["a"] and all(step[-1] == name for step, name in zip(held, "abcde", strict=True))
        assert len(held[-1]) < 5, "160 MiB of copies beside the process: some made way for memory"
        assert refused.startswith("refused preloading acme/f (32.0 MiB) would leave this process")
        assert "lower the preload budget, or use the page-cache strategy" in refused
    finally:
        group.rmdir()
