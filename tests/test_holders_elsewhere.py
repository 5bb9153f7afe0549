"""What other processes map or hold open is in use for the disk budget (store/eviction.py
`blobs_held_elsewhere`): a CLI pull evicted a model a notebook had loaded, which freed nothing while it was
mapped (an explorer's trial). Seen on btrfs and through another path to the store; a private copy holds
nothing; a node, which lets go of what is removed on its own, keeps nothing from another process's
evictions; and one write looks at /proc once or twice, not once per step.

The mount tests run as root (CI does) in a mount namespace of their own (`unshare -m`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from controlnodes import Serving
from modeldepot import Depot
from modeldepot.store.holders import say_sending, sent_by
from test_budget import MB, model, repos, store  # noqa: F401  (the 3.5 MiB budgeted store fixture)

SRC = str(Path(__file__).resolve().parents[1] / "src")


HOLDER_SCRIPT = r"""
import ctypes, mmap, os, subprocess, sys
from pathlib import Path
from modeldepot import Depot
home = Path(sys.argv[1])
src = home.parent / "src"; src.mkdir(parents=True, exist_ok=True)
(src / "config.json").write_text("{}"); (src / "model.safetensors").write_bytes(os.urandom(1 << 20))
with Depot(home) as depot:
    depot.import_dir(src, "acme/m")
    blob = os.path.realpath(depot.file_path("acme/m", "model.safetensors"))
seen_as = blob.replace(str(home), sys.argv[2]) if len(sys.argv) > 2 else blob
child = subprocess.Popen([sys.executable, "-c", f'''
import ctypes, os, sys
libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open({seen_as!r}, os.O_RDONLY); libc.mmap(None, 1 << 20, 1, 1, fd, 0); os.close(fd)  # as memmap2 does
print("ready", flush=True); sys.stdin.read()'''], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
try:
    assert child.stdout.readline() == "ready\n"
    with Depot(home) as depot:
        print(depot.budget_status().in_use_bytes, flush=True)
finally:
    child.kill(); child.wait()
"""


def _in_a_mount_namespace(tmp_path: Path, mount: str, *args: str) -> int:
    # (as the other mount tests: root, allowed to mount, as CI runs the suite; util-linux's unshare)
    assert os.geteuid() == 0 and shutil.which("unshare"), "these tests need root and unshare(1), on Linux"
    (tmp_path / "holder.py").write_text(HOLDER_SCRIPT)
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{mount} && {sys.executable} {tmp_path / 'holder.py'} {' '.join(args)}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


def test_a_blob_another_process_maps_is_in_use_on_btrfs(tmp_path: Path) -> None:
    """/proc/PID/maps gives btrfs's superblock device (00:2x), stat() the subvolume's (0:2y): a mapping
    compared by device and inode was missed. Python's mmap keeps a descriptor (seen in /proc/PID/fd);
    safetensors (memmap2), llama.cpp and torch close theirs, and a notebook's loaded model was evicted on
    Fedora's default file system (a review). Holders are matched by inode."""
    assert shutil.which("mkfs.btrfs"), "scripts/install-btrfs installs btrfs-progs"
    image, point = tmp_path / "btrfs.img", tmp_path / "mnt"
    point.mkdir()
    with open(image, "wb") as file:
        file.truncate(300 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
    in_use = _in_a_mount_namespace(tmp_path, f"mount -o loop {image} {point}", str(point / "store"))
    assert in_use >= MB


def test_a_blob_another_process_maps_through_a_bind_mount_is_in_use(tmp_path: Path) -> None:
    """The same store seen at another path (a bind mount; a container's volume): /proc shows the holder's
    path, and the holder was missed (a review). A blob is known by its name under blobs/, by any path, then
    checked by its inode."""
    real, alias = tmp_path / "real", tmp_path / "alias"
    real.mkdir()
    alias.mkdir()
    in_use = _in_a_mount_namespace(tmp_path, f"mount --bind {real} {alias}", str(real / "store"),
                                   str(alias / "store"))  # fmt: skip
    assert in_use >= MB


def test_one_write_looks_at_proc_once_or_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each look at what other processes hold (check_fits, every eviction round, every give-way try, the
    refusal's status()) walked all of /proc again: an import for which 3 preloads gave way made 11 walks;
    with 300 python processes on the machine (80 ms a walk) that was 850 ms of the import's 950 ms (a
    review). A look a second old answers an eviction."""
    import modeldepot.store.elsewhere as elsewhere_module
    from modeldepot.preload import Preloader

    looks = []
    real = elsewhere_module.blobs_held_elsewhere
    monkeypatch.setattr(elsewhere_module, "blobs_held_elsewhere", lambda of: looks.append(1) or real(of))
    monkeypatch.setenv("MODELDEPOT_MAX_SIZE", "6MiB")
    with Depot(tmp_path / "store") as depot:
        depot.use_preloader(Preloader(depot, 1 << 30, "page-cache"))
        for name in ("acme/a", "acme/b", "acme/c", "acme/d"):
            depot.import_dir(model(tmp_path, name), name)
        for name in ("acme/a", "acme/b", "acme/c"):
            depot.preloader.preload(name)
        looks.clear()
        depot.import_dir(model(tmp_path, "acme/big", size=5 * MB), "acme/big")
    assert len(looks) <= 2, len(looks)


def test_a_memfd_preload_in_another_process_does_not_keep_its_revision(store: Depot, tmp_path: Path) -> None:  # noqa: F811
    """A memfd (or read) preload copies the model into the process's own memory, and kept the blob's
    descriptor open all the same: seen in /proc/PID/fd, the copy kept its revision from every eviction beside
    it, though evicting it frees its disk at once (a review). The copy lets go of the blob once made."""
    store.import_dir(model(tmp_path, "acme/preloaded"), "acme/preloaded")
    store.import_dir(model(tmp_path, "acme/idle"), "acme/idle")
    node = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from modeldepot import Depot
            from modeldepot.preload import Preloader
            depot = Depot({str(store.home)!r})
            depot.use_preloader(Preloader(depot, 1 << 30, "memfd"))
            depot.preloader.preload("acme/preloaded")
            print("preloaded", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    try:
        assert node.stdout is not None and node.stdout.readline() == "preloaded\n"
        store.import_dir(model(tmp_path, "acme/new", size=5 * MB // 2), "acme/new")  # needs both to go
        assert "acme/new" in repos(store)
    finally:
        node.kill()
        node.communicate()


def test_a_nodes_preloads_give_way_to_another_processs_eviction(store: Depot, tmp_path: Path) -> None:  # noqa: F811
    """A node maps what it preloads (page-cache, mmap), and lets go of what another process removes within
    seconds: its preloads are a cache of the disk, not a pin, and kept every CLI pull beside it from making
    room once what other processes map was in use (a review). A node says so in the store
    (locks/letting-go/<pid>): what it holds is not kept."""
    for name in ("acme/preloaded", "acme/idle"):
        store.import_dir(model(tmp_path, name), name)
    store.get_file("acme/preloaded", "model.safetensors").release()  # (a use: the most used is preloaded)
    store.store.access.flush()
    node = Serving(store.home, "--preload-top", "1")
    try:
        node.line_with(
            "preloaded acme/preloaded"
        )  # (after its start, which says it lets go: the preload waits)
        assert store.store.budget.elsewhere.blobs() == {}, "a node's preloads keep nothing"
        store.import_dir(model(tmp_path, "acme/new", size=5 * MB // 2), "acme/new")  # (both go)
        assert repos(store) == {"acme/new"}
    finally:
        node.stop()


def test_a_forked_child_of_a_node_does_not_keep_its_announcement(tmp_path: Path) -> None:
    """A node's announcement that it lets go of what is removed is a file it holds locked; a child it forked kept
    the lock after the node ended (a flock is the open file's), so the node's pid, taken later by another
    process, read as a node's, whose mappings keep nothing (a review)."""
    from modeldepot.store.holders import processes_letting_go

    folder = tmp_path / "letting-go"
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from modeldepot.store.holders import announce_letting_go
        assert announce_letting_go(Path({str(folder)!r})) is not None
        child = os.fork()
        if child == 0:
            quiet = os.open(os.devnull, os.O_WRONLY)  # (the test reads the output to its end)
            os.dup2(quiet, 1)
            os.dup2(quiet, 2)
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    child = int(done.stdout.split()[0])
    try:
        announced = [int(name) for name in os.listdir(folder)]
        assert len(announced) == 1 and announced[0] != child
        assert processes_letting_go(folder) == set(), "the node ended: its child holds no announcement of it"
    finally:
        os.kill(child, 9)


def test_a_sending_list_rewritten_while_it_is_read_never_loses_a_line(tmp_path: Path) -> None:
    """Another process reads a node's list of the blobs it sends while the node rewrites it: a read is not
    atomic against a write, and a read racing a rewrite in place saw a line of mixed bytes (a blob being
    sent missed for that look: 9% of looks against a writer rewriting it without pause, a review). The
    blobs named in every version are seen at every look."""
    folder = tmp_path / "home" / "locks" / "letting-go"
    folder.mkdir(parents=True)
    pid = 4242
    fd = os.open(folder / str(pid), os.O_RDWR | os.O_CREAT, 0o644)
    always = [f"{i:064x}" for i in range(1, 400, 2)]  # (several pages: the rewrite spans them)
    longer, shorter = (
        always + [f"{i:064x}" for i in range(0, 400, 2)],
        always + [f"{i:064x}" for i in range(999, 1009)],
    )
    say_sending(fd, shorter)  # (said before the first look)
    stop = time.monotonic() + 2.0
    writer = os.fork()
    if writer == 0:  # pragma: no cover  (the child)
        try:
            while time.monotonic() < stop:
                say_sending(fd, longer)
                time.sleep(0.0002)
                say_sending(fd, shorter)
                time.sleep(0.0002)
        finally:
            os._exit(0)
    looks, missed = 0, 0
    try:
        while time.monotonic() < stop:
            seen = sent_by(folder, [pid])
            looks += 1
            missed += not set(always) <= set(seen)
    finally:
        os.waitpid(writer, 0)
        os.close(fd)
    assert looks > 500 and missed == 0, (looks, missed)


def test_a_sending_list_of_a_node_before_the_crc_is_read_after_short_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node of the version before the CRC line writes its list bare: read, it is taken after the retries,
    which wait 20 ms in all (a tenth of a second per such node and look, a review)."""
    from modeldepot.store import holders

    folder = tmp_path / "home" / "locks" / "letting-go"
    folder.mkdir(parents=True)
    digest = "ab" * 32
    (folder / "4242").write_text(f"{digest}\n")
    waited: list[float] = []
    monkeypatch.setattr(holders.time, "sleep", waited.append)
    assert sent_by(folder, [4242]) == {digest: {4242}}
    assert sum(waited) <= 0.02 + 1e-9, waited
