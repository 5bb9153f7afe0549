"""A full disk: the store lives on a small tmpfs, so its writes really fail with ENOSPC.

Linux only, as root (CI runs so): each test mounts its own tmpfs and unmounts it afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest

from conftest import (
    SMALL_CHUNK,
    LiveNode,
    Mounts,
    free_port,
    sample_files,
    store_files_consistent,
    wait_for_port,
    write_model_dir,
)
from modeldepot import Depot, StoreFullError
from modeldepot.store.layout import StoreLayout, size_text
from modeldepot.store.models import ImportResult

Mount = Callable[[str], Path]

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="mounts a tmpfs: Linux only"),
    pytest.mark.skipif(
        sys.platform == "linux" and os.geteuid() != 0,
        reason="needs root: mounts a small tmpfs to fill a disk for real (run the suite as root, as CI does)",
    ),
]


@pytest.fixture
def mount_tmpfs(mounts: Mounts) -> Mount:
    """``mount(options)`` mounts a fresh tmpfs (e.g. ``"size=2m"``) and returns its root."""
    return mounts.tmpfs


def free_bytes(root: Path) -> int:
    stats = os.statvfs(root)
    return stats.f_bavail * stats.f_frsize


def free_inodes(root: Path) -> int:
    return os.statvfs(root).f_favail


def leave_free(root: Path, left: int) -> None:
    """Another program's file taking the disk of ``root`` but ``left`` bytes."""
    filler = os.open(root / "filler", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.posix_fallocate(filler, 0, free_bytes(root) - left)
    finally:
        os.close(filler)


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bytes]]:
    """acme/two, two files of 3 MiB, on a node given as HF_ENDPOINT."""
    files = {"a.bin": random.Random(1).randbytes(3 << 20), "b.bin": random.Random(2).randbytes(3 << 20)}
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", files), "acme/two")
        upstream = LiveNode(upstream_depot)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", upstream.url)
        try:
            yield files
        finally:
            upstream.stop()


def random_folder(path: Path, sizes: list[int], seed: int) -> Path:
    rng = random.Random(seed)
    return write_model_dir(
        path, {f"weights/part-{n}.bin": rng.randbytes(size) for n, size in enumerate(sizes)}
    )


def state(depot: Depot) -> tuple[object, ...]:
    """What a failed import must not change (the index files themselves may grow by unused WAL frames)."""
    usage = depot.du().to_dict()
    del usage["index_bytes"], usage["reserve_bytes"]  # (the reserve follows the index's size)
    blob_files = sorted(p.name for p in depot.store.layout.blobs.rglob("*") if p.is_file())
    return [r.to_dict() for r in depot.list_repos()], usage, blob_files


def assert_unchanged(depot: Depot, before: tuple[object, ...], small: dict[str, bytes]) -> None:
    repos, usage, blob_files = state(depot)
    assert repos == before[0], "the failed import changed the repos"
    home = depot.home
    assert [str(p) for p in home.rglob("*") if p.name.endswith(".partial")] == [], "partial files were left"
    assert list(depot.store.layout.tmp.iterdir()) == [], "a write session was left in tmp/"
    assert blob_files == before[2], "the failed import left blob files"
    assert usage == before[1], "the failed import changed what du reports"
    for path, data in small.items():
        assert depot.get_file("org/small", path) == data
    assert depot.verify().ok


def small_store(root: Path) -> tuple[Depot, dict[str, bytes]]:
    """A store on ``root`` holding one small repo, org/small."""
    small = sample_files(seed=1, big=100_000)
    depot = Depot(root / "home", chunk_size=SMALL_CHUNK)
    depot.import_dir(write_model_dir(root.parent / f"{root.name}-small", small), "org/small")
    return depot, small


def assert_import_works(depot: Depot, folder: Path) -> None:
    depot.import_dir(folder, "org/after")
    for path in folder.rglob("*"):
        if path.is_file():
            assert depot.get_file("org/after", path.relative_to(folder).as_posix()) == path.read_bytes()
    assert depot.verify().ok


@pytest.mark.parametrize("shape", ["one-file-too-big", "files-fit-one-by-one"])
def test_import_bigger_than_the_free_space(mount_tmpfs: Mount, tmp_path: Path, shape: str) -> None:
    """Fails when reserving a file: the first one, or the fourth after three were written and synced."""
    root = mount_tmpfs("size=4m")
    depot, small = small_store(root)
    with depot:
        free = free_bytes(root)
        sizes = [free + 100_000] if shape == "one-file-too-big" else [free * 3 // 10] * 4
        folder = random_folder(tmp_path / "big", sizes, seed=2)
        before, done = state(depot), [0]
        with pytest.raises(StoreFullError, match="no space left") as caught:
            depot.import_dir(folder, "org/big", progress=lambda path, n, total: done.append(n))
        assert f"reserving {size_text(sizes[-1])} in the store (it has " in str(
            caught.value
        )  # (in MiB: it said bytes; and what the disk has: it said nothing of it, an explorer's trial)
        assert max(done) == sum(sizes[:-1]), "the import did not fail at the last file"
        assert free_bytes(root) == free, "the failed import did not give back all the space it took"
        assert_unchanged(depot, before, small)
        assert_import_works(depot, random_folder(tmp_path / "fits", [free // 3], seed=3))


def test_a_cache_import_fails_the_repo_the_disk_cannot_hold_and_adopts_the_rest(
    mount_tmpfs: Mount, tmp_path: Path
) -> None:
    """A full disk while adopting a Hugging Face cache stopped the whole run: the repos after it, that fit,
    were never tried, and the summary of those adopted before was lost (`--json` printed nothing: a trial).
    The repo that does not fit fails (nothing of it kept), as one over the disk budget does; the rest are
    adopted."""
    root = mount_tmpfs("size=4m")
    depot, _small = small_store(root)
    cache = tmp_path / "hf" / "hub"  # (another file system: its blobs are copied)
    with depot, Depot(tmp_path / "other", chunk_size=SMALL_CHUNK) as other:
        free = free_bytes(root)
        for repo_id, size, seed in (
            ("a/first", free // 10, 4),
            ("b/big", free + 100_000, 5),
            ("c/last", free // 10, 6),
        ):
            other.import_dir(random_folder(tmp_path / repo_id.replace("/", "-"), [size], seed), repo_id)
            assert other.hf_cache_export(repo_id, cache_dir=cache).ok
        result = depot.hf_cache_import(cache_dir=cache)
        failed = [p for p in result.problems if p.problem != "copied"]  # (the notes: another file system)
        assert [(p.repo_id, p.problem) for p in failed] == [("b/big", "failed")], result.problems
        assert "no space left" in failed[0].detail and not result.ok
        assert [repo.repo_id for repo in result.repos] == ["a/first", "c/last"]
        assert {"a/first", "c/last", "org/small"} == {r.repo_id for r in depot.list_repos()}
        assert store_files_consistent(depot) == []
        for repo_id in ("a/first", "c/last"):
            assert depot.verify(repo_id).ok


def test_what_the_store_holds_is_imported_and_adopted_again_on_a_nearly_full_disk(
    mount_tmpfs: Mount, tmp_path: Path
) -> None:
    """A folder imported again (its README edited), or a Hugging Face cache adopted again by copies, staged a
    copy of every file before it found the store held it: on a disk mostly of models, "no space left" (an
    explorer's trial; "running it again changes nothing"). What the store holds is hashed where it is now."""
    root = mount_tmpfs("size=8m")
    depot, _small = small_store(root)
    cache = tmp_path / "hf" / "hub"  # (another file system: adopting copies)
    with depot, Depot(tmp_path / "other", chunk_size=SMALL_CHUNK) as other:
        free = free_bytes(root)
        big = random_folder(tmp_path / "big", [free // 3, free // 3], seed=7)
        (big / "README.md").write_text("# big\n")
        first = depot.import_dir(big, "org/big")
        other.import_dir(big, "org/big")
        assert other.hf_cache_export("org/big", cache_dir=cache).ok
        assert free_bytes(root) < free // 3, "the disk is not nearly full"
        (big / "README.md").write_text("# big, said better\n")
        again = depot.import_dir(big, "org/big")
        assert (again.new_blobs, again.new_bytes) == (1, len("# big, said better\n"))
        assert again.commit_id != first.commit_id
        adopted = depot.hf_cache_import(cache_dir=cache)
        # (its main, the first commit, stays where the store's moved since: "branch-kept", a note)
        assert {p.problem for p in adopted.problems} <= {"copied", "branch-kept"}, adopted.problems
        assert [(r.repo_id, r.blobs, r.new_blobs) for r in adopted.repos] == [("org/big", 3, 0)]
        # A cache's file whose bytes are not its name is found so, as ever, though the store holds that name
        weights = next(p for p in (cache / "models--org--big" / "blobs").iterdir() if p.stat().st_size > 1000)
        with open(weights, "r+b") as handle:
            handle.write(b"rot")
        rotten = depot.hf_cache_import(cache_dir=cache)
        assert [(p.problem, Path(p.path).name) for p in rotten.problems if p.problem == "corrupt"] == [
            ("corrupt", weights.name)
        ]
        assert depot.verify().ok and store_files_consistent(depot) == []


def test_index_full_after_the_blobs_were_written(mount_tmpfs: Mount, tmp_path: Path) -> None:
    """Every file fits, so the blobs are written and placed; then the index transaction finds no room."""
    root = mount_tmpfs("size=4m")
    depot, small = small_store(root)
    with depot:
        sizes = [300_000, 500_000, 700_000]
        folder = random_folder(tmp_path / "big", sizes, seed=4)
        need = sum(-(-size // 4096) * 4096 for size in sizes)  # tmpfs allocates whole pages
        filler = os.open(root / "filler", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.posix_fallocate(filler, 0, free_bytes(root) - need - 4096)  # one page left for the index
        finally:
            os.close(filler)
        before = state(depot)
        with pytest.raises(StoreFullError, match="no space left while recording") as caught:
            depot.import_dir(folder, "org/big")
        assert "`modeldepot rm REPO` or `modeldepot gc` (`gc --partials` also drops" in str(caught.value)
        assert_unchanged(depot, before, small)
        assert_import_works(depot, random_folder(tmp_path / "fits", [100_000], seed=5))


def new_prefixes(depot: Depot, folder: Path) -> set[str]:
    """The blobs/<ab>/ folders an import of ``folder`` has to create."""
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}
    return {d[:2] for d in digests if not depot.store.layout.blob_path(d).parent.exists()}


def failure(action: Callable[[], object]) -> StoreFullError | None:
    try:
        action()
    except StoreFullError as error:
        return error
    return None


@pytest.mark.parametrize("stage", ["creating a file", "placing blob", "building the snapshot"])
def test_out_of_inodes_during_an_import(mount_tmpfs: Mount, tmp_path: Path, stage: str) -> None:
    """No inode left for a partial file, for a blobs/<ab>/ folder, or for the snapshot's links."""
    root = mount_tmpfs("size=16m,nr_inodes=64")
    depot, small = small_store(root)
    with depot:
        folder = random_folder(tmp_path / "big", [50_000, 60_000, 70_000, 80_000], seed=6)
        prefixes = len(new_prefixes(depot, folder))
        assert prefixes >= 2, "the test needs blobs in two new blobs/<ab>/ folders"
        # The session's folder and .lock, one partial file per file, and the room it holds in the budget's
        # reservations (taken once hashed: before the blobs are placed)
        session = 2 + 4
        budget = {"creating a file": session - 1, "placing blob": session + 1 + 1}.get(
            stage, session + 1 + prefixes
        )
        (root / "filler").mkdir()
        for n in range(free_inodes(root) - budget):
            (root / "filler" / str(n)).touch()
        assert free_inodes(root) == budget
        before = state(depot)
        results: list[ImportResult] = []
        error = failure(lambda: results.append(depot.import_dir(folder, "org/big")))
        if error is not None:
            # (said as inodes: as bytes, the user looked for room `df -h` showed free, a crash fuzzer's trial)
            assert stage in str(error) and "every inode is taken (`df -i`)" in str(error), str(error)
            assert_unchanged(depot, before, small)
        else:  # only a snapshot, which can be rebuilt later, may be left out of a successful import
            assert stage == "building the snapshot", "the import succeeded without the inodes it needs"
            assert [r.repo_id for r in depot.list_repos()] == ["org/big", "org/small"]
            # (it said a snapshot path that was not there, for a script's from_pretrained: an explorer's trial)
            made = depot.store.snapshots.path("org/big", results[0].commit_id).is_dir()
            assert results[0].snapshot_built is made and results[0].to_dict()["snapshot_built"] is made
        for path in (root / "filler").iterdir():
            path.unlink()
        assert_import_works(depot, random_folder(tmp_path / "fits", [10_000, 20_000], seed=7))


def test_a_downloads_mark_with_no_inode_left_is_said_as_inodes(mount_tmpfs: Mount) -> None:
    """A pull out of inodes said "no space left on the store's disk while marking a download as public or
    not" of a disk `df -h` showed nearly empty: the mark's error named its file relative to its folder, and
    the look at the inodes looked at the current folder's disk (an explorer's trial)."""
    from modeldepot.store.layout import os_error
    from modeldepot.store.partials import _make_mark

    root = mount_tmpfs("size=16m,nr_inodes=32")
    (root / "partials").mkdir()
    (root / "filler").mkdir()
    for n in range(free_inodes(root)):
        (root / "filler" / str(n)).touch()
    # (no shared mark to link, nor room for one)
    with pytest.raises(OSError, match="No space left") as failed:
        _make_mark(root / "partials" / ".public", root / "partials" / "abc.public", str(root))
    said = str(os_error(failed.value, "marking a download as public or not"))
    assert "every inode is taken (`df -i`)" in said, said


def test_cli_import_on_a_full_disk(mount_tmpfs: Mount, tmp_path: Path) -> None:
    root = mount_tmpfs("size=1m")
    home = root / "home"
    Depot(home, chunk_size=SMALL_CHUNK).close()
    folder = random_folder(tmp_path / "big", [free_bytes(root) // 2] * 3, seed=8)
    command = [sys.executable, "-m", "modeldepot", "import", str(folder), "--repo", "a/b"]
    done = subprocess.run([*command, "--home", str(home)], capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stderr
    assert "no space left" in done.stderr and "error" in done.stderr, done.stderr
    with Depot(home) as depot:
        assert depot.list_repos() == []
        assert [
            p for p in depot.home.rglob("*") if p.name.endswith(".partial") or p.parent.name == "tmp"
        ] == []
        assert not any(p.is_file() for p in depot.store.layout.blobs.rglob("*"))


# -- freeing space on a full disk ----------------------------------------------------------------------


def fill_disk(root: Path) -> Path:
    """Grow a file that is not the store's until the file system has not one free byte left."""
    filler = root / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for block in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * block)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    assert free_bytes(root) == 0
    return filler


def fill_inodes(root: Path) -> None:
    """Create empty files that are not the store's until the file system has no free inode left."""
    folder = root / "inode-filler"
    folder.mkdir(exist_ok=True)
    number = len(list(folder.iterdir()))
    while True:
        try:
            (folder / str(number)).touch()
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            break
        number += 1
    assert free_inodes(root) == 0


def modeldepot(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command line, in a process of its own: it opens the store on the full disk, as a user would."""
    command = [sys.executable, "-m", "modeldepot", *args, "--home", str(home)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def store_with_garbage(root: Path, tmp_path: Path) -> tuple[dict[str, bytes], dict[str, int]]:
    """org/small, org/big (two blobs of its own), and what gc frees: blob rows no file uses (their repo's
    rows lost, as by a crash; so gc's transaction must write), an orphan blob file, a quarantined file, an
    abandoned write session. Returns the small repo's files and the sizes of what rm and gc free."""
    depot, small = small_store(root)
    with depot:
        big = random_folder(tmp_path / "big", [400_000, 300_000], seed=9)
        depot.import_dir(big, "org/big")
        depot.import_dir(random_folder(tmp_path / "lost", [200_000, 100_000], seed=10), "org/lost")
        lost = depot.resolve("org/lost")
        with depot.store.index.write() as con:
            con.execute("DELETE FROM revisions WHERE repo_id = 'org/lost'")  # its files go with it
            con.execute("DELETE FROM repos WHERE repo_id = 'org/lost'")
        # (its snapshot as a removal killed after its commit leaves it, set aside: one left whole, gc keeps with
        # its blobs, as an older index's revision)
        depot.store.snapshots.set_aside("org/lost", lost)
        orphan = depot.store.layout.blobs / "ff" / ("f" * 64)
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"o" * 50_000)
        (depot.store.layout.quarantine / ("e" * 64)).write_bytes(b"q" * 60_000)
        (depot.store.layout.tmp / "1-abandoned").mkdir()
        (depot.store.layout.tmp / "1-abandoned" / "0.partial").write_bytes(b"p" * 70_000)
        assert depot.store.index.reserve.held() > 0, "the store keeps no reserve"
    return small, {"rm": 700_000, "gc": 300_000 + 50_000 + 60_000 + 70_000}


def assert_consistent(home: Path, small: dict[str, bytes], reserve: int) -> None:
    with Depot(home) as depot:
        assert store_files_consistent(depot) == []
        assert depot.verify().ok
        assert [r.repo_id for r in depot.list_repos()] == ["org/small"]
        for path, data in small.items():
            assert depot.get_file("org/small", path) == data
        indexed = {r["sha256"] for r in depot.store.index.read("SELECT sha256 FROM blobs")}
        on_disk = {p.name for p in depot.store.layout.blobs.rglob("*") if p.is_file()}
        assert on_disk == indexed, "the blob files and the index disagree"
        assert list(depot.store.layout.quarantine.iterdir()) == []
        assert list(depot.store.layout.tmp.iterdir()) == []
        assert depot.store.index.reserve.held() == reserve, "the reserve was not taken back"


def test_a_download_the_upstream_says_is_bigger_than_the_disk_reserves_nothing(
    mount_tmpfs: Mount, tmp_path: Path
) -> None:
    """An upstream that says a file is terabytes had its pull reserve the whole disk, and the failed
    reservation left it full (a security trial: a mirror of such an upstream, filled by one request). A
    download bigger than the free room is refused before anything is reserved, naming the size it was told."""
    root = mount_tmpfs("size=8m")
    depot, _ = small_store(root)
    with depot:
        free = free_bytes(root)
        sha = "ab" * 32
        with pytest.raises(
            StoreFullError, match=r"a download of 4\.0 TiB \(content abababababababab…, as its upstream"
        ):
            depot.store.partials.claim(sha, 4 << 40, SMALL_CHUNK, wait=False)
        assert free_bytes(root) >= free - (64 << 10)  # (a log and an empty file at most)
        assert_import_works(depot, random_folder(tmp_path / "fits", [100_000], seed=8))


def test_rm_gc_and_verify_work_on_a_full_disk(mount_tmpfs: Mount, tmp_path: Path) -> None:
    root = mount_tmpfs("size=8m")
    home = root / "home"
    small, frees = store_with_garbage(root, tmp_path)
    reserve = (home / "reserve" / "space").stat().st_blocks * 512
    fill_disk(root)
    done = modeldepot(home, "rm", "org/big", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bytes_freed"] == frees["rm"]
    assert free_bytes(root) >= frees["rm"], "rm did not give the space back"
    # (a removal sweeps what dead writers left in tmp/ first, as an import does: the abandoned session went)
    assert not (home / "tmp" / "1-abandoned").exists()
    fill_disk(root)
    done = modeldepot(home, "gc", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["bytes_freed"] == frees["gc"] - 70_000
    assert report["partials_removed"] == 0
    assert free_bytes(root) >= frees["gc"] - 70_000, "gc did not give the space back"
    fill_disk(root)
    for command in (["verify", "--json"], ["ls", "--json"], ["du", "--json"]):
        done = modeldepot(home, *command)
        assert done.returncode == 0, (command, done.stderr)
    assert json.loads(modeldepot(home, "verify", "--json").stdout)["ok"] is True
    (root / "filler").unlink()
    assert_consistent(home, small, reserve)


def test_rm_and_gc_work_without_a_free_inode(mount_tmpfs: Mount, tmp_path: Path) -> None:
    root = mount_tmpfs("size=16m,nr_inodes=256")
    home = root / "home"
    small, _ = store_with_garbage(root, tmp_path)
    reserve = (home / "reserve" / "space").stat().st_blocks * 512
    fill_inodes(root)
    done = modeldepot(home, "rm", "org/big", "--yes")
    assert done.returncode == 0, done.stderr
    fill_inodes(root)
    done = modeldepot(home, "gc")
    assert done.returncode == 0, done.stderr
    fill_inodes(root)
    assert modeldepot(home, "verify").returncode == 0
    shutil.rmtree(root / "inode-filler")
    assert_consistent(home, small, reserve)


def test_with_its_reserve_used_up_a_full_store_says_what_to_do(mount_tmpfs: Mount, tmp_path: Path) -> None:
    root = mount_tmpfs("size=4m")
    home = root / "home"
    small_store(root)[0].close()
    shutil.rmtree(home / "reserve")  # as if something else had taken its room
    filler = fill_disk(root)
    done = modeldepot(home, "rm", "org/small", "--yes")
    assert done.returncode == 1
    assert "no space left" in done.stderr and "reserve is used up" in done.stderr, done.stderr
    assert "free some space elsewhere on the disk" in done.stderr, done.stderr
    filler.unlink()
    # With room again the store opens, makes a new reserve, and rm works.
    done = modeldepot(home, "rm", "org/small", "--yes")
    assert done.returncode == 0, done.stderr
    assert (home / "reserve" / "space").stat().st_blocks > 0


def test_a_mirror_on_a_full_disk_answers_507_before_any_header(
    mount_tmpfs: Mount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror whose disk cannot take the file used to answer 200 with the file's length and then send
    nothing (huggingface_hub retried five times on 0 bytes), logging nothing."""
    big = random.Random(3).randbytes(3 * 1024 * 1024)
    root = mount_tmpfs("size=2m")
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", {"big.bin": big}), "acme/big")
        upstream = LiveNode(upstream_depot)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", upstream.url)
        mirror = LiveNode(Depot(root / "mirror", chunk_size=SMALL_CHUNK), mirror=True, owns_depot=True)
        try:
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{mirror.url}/acme/big/resolve/main/big.bin").close()
            assert refused.value.code == 507 and b"disk is full" in refused.value.read()
            assert store_files_consistent(mirror.depot) == []
        finally:
            mirror.stop()
            upstream.stop()


def test_the_mount_that_holds_a_store_is_found(mount_tmpfs: Mount) -> None:
    from modeldepot.store.filesystem import mount_of, shared_filesystem

    root = mount_tmpfs("size=1m")
    assert mount_of(root / "store" / "blobs") == (str(root), "tmpfs")
    assert shared_filesystem(root / "store") is None


def test_a_mirror_whose_disk_fills_while_it_pulls_says_507_to_the_next_clients(
    mount_tmpfs: Mount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something else fills the disk while a mirror pulls a file: its bytes all land (their room was taken
    as the pull began), its record cannot be written. Each later GET resumed the pull at once, answered 200,
    and was cut at the held-back last chunk: huggingface_hub retried for ever, 4 GiB sent for a 60 MiB file,
    and never saw the 507 (an explorer's trial). The next GETs are a 507 before any header."""
    import threading

    from faultproxy import FaultProxy

    big = random.Random(5).randbytes(3 * 1024 * 1024)
    root = mount_tmpfs("size=12m")
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", {"big.bin": big}), "acme/big")
        upstream = LiveNode(upstream_depot)
        proxy = FaultProxy(upstream.url)  # (the Hub's way: files by /resolve/, slowed)
        proxy.set("slow", times=-1, path_suffix="big.bin", slow_delay=0.1)
        # The mirror as `serve --upstream $HF_ENDPOINT` runs it: a process of its own
        port = free_port()
        env = {
            k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MODELDEPOT_TOKEN", "HF_TOKEN")
        }
        env.update(HF_ENDPOINT=proxy.url, MODELDEPOT_CHUNK_SIZE=str(SMALL_CHUNK))
        mirror = subprocess.Popen(
            [sys.executable, "-m", "modeldepot", "serve", "--home", str(root / "mirror"), "--port", str(port),
             "--upstream", proxy.url, "--scrub-interval", "off"], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)  # fmt: skip
        mirror_url = f"http://127.0.0.1:{port}"
        stop = threading.Event()

        def fill() -> None:  # (as a `dd` beside: whatever room comes free is taken)
            with open(root / "filler", "ab") as filler:
                while not stop.wait(0.005):
                    with contextlib.suppress(OSError):
                        filler.write(b"\0" * 65536)
                        filler.flush()

        filling = threading.Thread(target=fill)
        try:
            wait_for_port(port, 60, process=mirror)
            commit = json.loads(urllib.request.urlopen(f"{mirror_url}/api/models/acme/big").read())["sha"]
            url = f"{mirror_url}/acme/big/resolve/{commit}/big.bin"
            with urllib.request.urlopen(url) as first:
                assert first.status == 200
                filling.start()  # (the pull's room is taken: the disk fills around it)
                with contextlib.suppress(Exception):  # (cut short: its record could not be written)
                    first.read()
            for _ in range(3):
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(url).close()
                assert refused.value.code == 507 and b"disk is full" in refused.value.read()
        finally:
            stop.set()
            if filling.is_alive():
                filling.join()
            mirror.kill()
            mirror.wait(30)
            proxy.stop()
            upstream.stop()


def test_an_import_by_link_on_a_full_disk_names_the_disk_not_the_source(mount_tmpfs: Mount) -> None:
    """`import --link` (and `hf-cache import`) of files on the store's own full disk: each was "cannot read
    <file>: No space left on device", the source blamed (a cache's blobs said "unreadable") for what the
    store could not write."""
    root = mount_tmpfs("size=8m")
    depot, small = small_store(root)
    with depot:
        folder = random_folder(root / "to-link", [200_000, 300_000], seed=9)
        filler = os.open(root / "filler", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            with contextlib.suppress(OSError):
                os.posix_fallocate(filler, 0, free_bytes(root))
            while True:  # (the last pages, and inodes' worth of room)
                try:
                    os.write(filler, b"\0" * 4096)
                except OSError:
                    break
        finally:
            os.close(filler)
        before = state(depot)
        with pytest.raises(StoreFullError, match="no space left on the store's disk") as raised:
            depot.import_dir(folder, "org/linked", link=True)
        assert "cannot read" not in str(raised.value)
        assert_unchanged(depot, before, small)


def test_verify_out_of_inodes_reports_what_it_found_and_the_snapshot_it_could_not_make(
    mount_tmpfs: Mount, tmp_path: Path
) -> None:
    """With no inode left and a snapshot folder to rebuild, verify ended in the snapshot's error: no report,
    and the corrupt blob it had just quarantined unsaid; the error said no byte was left, where `df -h` showed
    room (inodes were what lacked)."""
    root = mount_tmpfs("size=16m,nr_inodes=160")
    depot, _small = small_store(root)
    with depot:
        folder = write_model_dir(tmp_path / "many", {f"f{n}.json": b'{"n": %d}' % n for n in range(40)})
        depot.import_dir(folder, "org/many")
        commit = depot.resolve("org/many")
        shutil.rmtree(depot.store.snapshots.path("org/many", commit))  # (derived: verify rebuilds it)
        rotten = depot.file_info("org/small", "config.json").sha256
        blob = depot.store.blobs.path(rotten)
        blob.chmod(0o644)
        with open(blob, "r+b") as file:
            file.write(b"X")
        (root / "filler").mkdir()
        for n in range(free_inodes(root) - 5):  # (room for the staging folder and a few of its 40 links)
            (root / "filler" / str(n)).touch()
        report = depot.verify()
        assert [p.sha256 for p in report.problems] == [rotten]  # (found, quarantined and said)
        assert len(report.snapshots_not_repaired) == 1, report.snapshots_not_repaired
        said = report.snapshots_not_repaired[0]
        assert said.startswith(f"org/many@{commit[:12]}: ") and "every inode is taken (`df -i`)" in said, said
        shutil.rmtree(root / "filler")
        again = depot.verify()
        assert again.snapshots_repaired == 1 and again.snapshots_not_repaired == ()
        assert (depot.snapshot_path("org/many") / "f7.json").read_bytes() == b'{"n": 7}'


def test_a_pull_larger_than_the_free_disk_is_refused_before_a_byte_is_fetched(
    mount_tmpfs: Mount, files: dict[str, bytes]
) -> None:
    """Two 3 MiB files, 5 MiB free: the pull fetched the first whole, failed on the second, and left the first
    taking the room of a download that could never end there, its error naming one file against what was
    left. Refused at once, the whole pull's need against the free disk."""
    root = mount_tmpfs("size=8m")
    with Depot(root / "home", chunk_size=SMALL_CHUNK) as depot:
        leave_free(root, 5 << 20)
        with pytest.raises(StoreFullError) as refused:
            depot.pull("acme/two")
        said = str(refused.value)
        assert said.startswith("pulling acme/two needs 6.0 MiB more on the store's disk (2 files)"), said
        assert "nothing was fetched" in said
        assert depot.du().partial_bytes == 0 and list(depot.store.layout.partials.glob("*.part")) == []
        os.unlink(root / "filler")
        assert depot.pull("acme/two").files == 2  # and once there is room


def test_a_pull_the_disk_lacks_room_for_deletes_the_corrupt_copies_kept_in_quarantine(
    mount_tmpfs: Mount, files: dict[str, bytes]
) -> None:
    """After a power loss the torn copy of a model, quarantined, kept the room its own pull needed: every
    repair and pull failed with "lacks room" for good, until a human ran gc (an explorer's trial on an edge
    box). A disk short of room deletes the corrupt copies first."""
    import hashlib as _hashlib

    root = mount_tmpfs("size=10m")
    with Depot(root / "home", chunk_size=SMALL_CHUNK) as depot:
        depot.pull("acme/two")
        blob = depot.store.blobs.path(_hashlib.sha256(files["a.bin"]).hexdigest())
        os.chmod(blob, 0o644)
        with open(blob, "r+b") as torn:
            torn.write(bytes(1 << 20))  # (zeroed, as an unflushed write a power loss tore)
        assert not depot.verify().ok
        assert sum(p.stat().st_size for p in depot.store.layout.quarantine.iterdir()) == 3 << 20
        leave_free(root, 2 << 20)
        depot.pull("acme/two")
        assert bytes(depot.get_file("acme/two", "a.bin")) == files["a.bin"]
        assert list(depot.store.layout.quarantine.iterdir()) == []
        assert depot.verify().ok


def test_a_pull_the_disk_lacks_room_for_deletes_the_downloads_other_pulls_gave_up(
    mount_tmpfs: Mount, files: dict[str, bytes]
) -> None:
    """A pull killed mid-way (a control API's, a Ctrl-C'd one never run again) kept its files' whole
    preallocated size a week, beside the budget: every pull of another model failed "lacks room" (an
    explorer's trial on an edge box). A disk short of room deletes them, never the pull's own (its resume)."""
    root = mount_tmpfs("size=12m")
    with Depot(root / "home", chunk_size=SMALL_CHUNK) as depot:
        partials = depot.store.partials
        own_key = hashlib.sha256(files["a.bin"]).hexdigest()
        for key, size in (("f" * 64, 4 << 20), (own_key, len(files["a.bin"]))):  # given up; this pull's own
            download = partials.claim(key, size, SMALL_CHUNK, wait=False)
            assert download is not None
            first = files["a.bin"][:SMALL_CHUNK]
            download.write_chunk(0, memoryview(first), blake3.blake3(first).hexdigest())
            download.release(completed=False)
        own_kept = partials.kept_bytes(own_key)
        assert own_kept == SMALL_CHUNK and partials.kept_bytes("f" * 64) == SMALL_CHUNK
        leave_free(root, 3 << 20)  # the pull needs 6 MiB less its own 1: room once the 4 given up go
        # Not while another repo's pull runs: a download it has not claimed yet is its resume (a review)
        with partials.pulling("acme/elsewhere"), pytest.raises(StoreFullError):
            depot.pull("acme/two")
        assert partials.kept_bytes("f" * 64) == SMALL_CHUNK
        pulled = depot.pull("acme/two")
        assert pulled.files == 2 and pulled.bytes_resumed == own_kept, pulled
        assert partials.kept_bytes("f" * 64) is None
        assert bytes(depot.get_file("acme/two", "a.bin")) == files["a.bin"]


@pytest.mark.parametrize("free_mib", [2, 4])
def test_under_a_budget_a_pull_evicts_for_the_disk_too_or_nothing(
    mount_tmpfs: Mount, tmp_path: Path, files: dict[str, bytes], free_mib: int
) -> None:
    """Another program's files took the disk the budget allows: a pull evicted an imported model (which no
    upstream gives back) for its budget, then found the disk short and failed, "nothing was fetched" (an
    explorer's trial). Under a budget, models may go to make room: the least recently used go until the
    disk has it too (4 MiB free: one goes, 3 MiB), or none when all of them would not do (2 MiB free)."""
    root = mount_tmpfs("size=20m")
    with Depot(root / "home", chunk_size=SMALL_CHUNK) as depot:
        mine = {name: {"w.bin": random.Random(seed).randbytes(3 << 20)} for name, seed in
                (("me/older", 3), ("me/newer", 4))}  # fmt: skip
        for repo, held in mine.items():
            depot.import_dir(write_model_dir(tmp_path / repo, held), repo)
            time.sleep(0.05)  # (the older used first: it goes first)
        depot.set_max_size(16 << 20)  # 6 MiB held + 6 MiB pulled: the budget alone evicts nothing
        leave_free(root, free_mib << 20)
        if free_mib == 4:  # 4 MiB free and the older model's 3: the 6 MiB fit
            assert depot.pull("acme/two").files == 2
            assert [e.repo_id for e in depot.evictions()] == ["me/older"]
            assert bytes(depot.get_file("me/newer", "w.bin")) == mine["me/newer"]["w.bin"]
            return
        # 2 MiB free: even with both models' 6, 8 MiB, it fits; with the newer pinned, 5 does not
        depot.pin("me/newer")
        with pytest.raises(StoreFullError) as refused:
            depot.pull("acme/two")
        said = str(refused.value)
        assert "lacks room for them even after evicting every model that may go" in said, said
        assert "nothing was fetched or evicted" in said, said
        assert depot.evictions() == []
        for repo, held in mine.items():
            assert bytes(depot.get_file(repo, "w.bin")) == held["w.bin"]
        os.unlink(root / "filler")
        assert depot.pull("acme/two").files == 2  # with room, the budget evicts nothing
        assert depot.evictions() == []


def test_a_pull_evicting_for_the_disk_leaves_other_writers_their_room(
    mount_tmpfs: Mount, tmp_path: Path, files: dict[str, bytes]
) -> None:
    """The disk's shortfall a pull evicted for left out the room another write held and had not taken on the
    disk yet: the pull evicted for itself, then took that room, and the other write failed (a review)."""
    root = mount_tmpfs("size=24m")
    with Depot(root / "home", chunk_size=SMALL_CHUNK) as depot:
        for repo, seed in (("me/older", 3), ("me/newer", 4)):
            depot.import_dir(
                write_model_dir(tmp_path / repo, {"w.bin": random.Random(seed).randbytes(3 << 20)}),
                repo,
            )
            time.sleep(0.05)
        depot.set_max_size(20 << 20)  # the budget alone evicts nothing
        leave_free(root, 4 << 20)
        # another write under way holds 3 MiB of room it has not written yet
        with depot.store.budget.writing("other/import") as other:
            other.make_room(3 << 20, "importing other/import")
            depot.pull("acme/two")  # (4 MiB free, 6 needed, 3 held for the other: both models go)
            evicted = sorted(e.repo_id for e in depot.evictions())
            assert evicted == ["me/newer", "me/older"]
            assert free_bytes(root) >= 3 << 20, (
                f"evicted {evicted} for the pull, which then took the other writer's room: "
                f"{free_bytes(root) >> 10} KiB left of its 3 MiB"
            )


def test_a_mirror_on_a_full_disk_still_serves_what_it_holds_when_its_scan_is_due(
    mount_tmpfs: Mount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something else filled a mirror's disk: each time its scan of a branch was due, the scan's record found
    no room, and `resolve/main` of a model it held whole answered 507 (snapshot_download failed, health "ok":
    an explorer's trial). A full disk stops writes, not reads: the scan is used unrecorded."""
    import dataclasses

    files = {
        "config.json": b'{"model_type": "bert"}',
        "model.safetensors": random.Random(8).randbytes(300_000),
    }
    root = mount_tmpfs("size=4m")
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", files), "acme/held")
        upstream = LiveNode(upstream_depot)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", upstream.url)
        depot = Depot(root / "mirror", chunk_size=SMALL_CHUNK)
        depot.config = dataclasses.replace(depot.config, mirror_ttl=0.0)  # (a scan at every request)
        mirror = LiveNode(depot, mirror=True, owns_depot=True)
        url = f"{mirror.url}/acme/held/resolve/main/model.safetensors"
        try:
            assert urllib.request.urlopen(url).read() == files["model.safetensors"]
            depot.store.access.flush()
            full_since = time.time()
            with open(root / "filler", "ab") as filler, contextlib.suppress(OSError):
                while True:  # (as a `dd` beside it: every byte of the disk taken)
                    filler.write(b"\0" * 65536)
                    filler.flush()
            assert free_bytes(root) < 65536
            health = json.loads(urllib.request.urlopen(f"{mirror.url}/api/depot/v1/health").read())
            assert health["status"] == "degraded" and health["disk_free_bytes"] < 65536, health
            assert "pulls and other writes fail" in health["detail"], health
            # Its stats too, which write the uses they read first: they answered 507 (an explorer's trial)
            stats = json.loads(urllib.request.urlopen(f"{mirror.url}/api/depot/v1/stats").read())
            assert stats["disk"]["free_bytes"] < 65536, stats["disk"]  # (the dashboard's card says it)
            for _ in range(2):
                assert urllib.request.urlopen(url).read() == files["model.safetensors"]
                listing = json.loads(
                    urllib.request.urlopen(f"{mirror.url}/api/models/acme/held/revision/main").read()
                )
                assert {s["rfilename"] for s in listing["siblings"]} >= set(files)
            with pytest.raises(StoreFullError):
                depot.store.access.flush()
            (root / "filler").unlink()  # (room again: the uses made on the full disk are written, none lost)
            depot.store.access.flush()
            assert depot.store.access.last_uses()["acme/held"] > full_since
        finally:
            mirror.stop()
            upstream.stop()


@pytest.mark.parametrize("chunk_size", [SMALL_CHUNK, 8 << 20])  # (downloads of many chunks, of one)
@pytest.mark.parametrize("stage", ["link", "make_folders"])
def test_a_download_whose_placing_finds_no_inode_is_kept_for_the_next_pull(
    mount_tmpfs: Mount, files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, chunk_size: int, stage: str
) -> None:
    """The inodes ran out as a pull placed its blobs: the first, with no inode for a hard link, was placed by
    a rename of its download's file, the second found none for its blobs/<ab>/ folder, and the publish failed,
    deleting the first blob, its finished download with it: the next pull fetched it again (an explorer's
    trial). A download placed so goes back under its own name: the next pull, once inodes are free, places
    both without a byte fetched. (``stage``: what the last inodes are taken right before; a placing by link
    fails too, and one for the folder fails from the first blob on.)"""
    root = mount_tmpfs("size=16m,nr_inodes=256")
    with Depot(root / "home", chunk_size=chunk_size) as depot:
        real, filled = getattr(StoreLayout, stage), []

        def fill_first(layout: StoreLayout, *paths: Path) -> None:
            if not filled and layout.blobs in paths[-1].parents:
                fill_inodes(root)  # (everything else took the last inodes, right before the placing)
                filled.append(paths)
            real(layout, *paths)

        monkeypatch.setattr(StoreLayout, stage, fill_first)
        with pytest.raises(StoreFullError) as refused:
            depot.pull("acme/two")
        assert "every inode is taken (`df -i`)" in str(refused.value), str(refused.value)
        monkeypatch.undo()
        assert filled
        shutil.rmtree(root / "inode-filler")
        assert [p for p in depot.store.layout.blobs.rglob("*") if not p.is_dir()] == []
        again = depot.pull("acme/two")
        assert again.files == 2 and again.bytes_downloaded == 0 and again.bytes_resumed == 6 << 20, again
        for name, data in files.items():
            assert bytes(depot.get_file("acme/two", name)) == data


def test_a_pull_that_fills_the_disk_at_its_end_says_so_in_its_status(
    mount_tmpfs: Mount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk filled as a pull published: the pull failed, and so did the write of its failed status (the
    index had no room for it either), which left the row "downloading": `status` said "interrupted" of a pull
    no one had stopped, and the error raised was the status's, not the pull's (an explorer's trial). The status
    is written with the room the store's reserve keeps, and says the disk is full."""
    weights = {f"{n}.safetensors": random.Random(n).randbytes(3 << 20) for n in "ab"}  # (a variant: a status)
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", weights), "acme/weights")
        upstream = LiveNode(upstream_depot)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", upstream.url)
        root = mount_tmpfs("size=16m")
        try:
            with Depot(root / "home", chunk_size=SMALL_CHUNK) as depot:
                real, filled = StoreLayout.make_folders, []

                def fill_first(layout: StoreLayout, path: Path) -> None:
                    if not filled and layout.blobs in path.parents:
                        leave_free(root, 0)  # (another program took the disk, right before the placing)
                        filled.append(path)
                    real(layout, path)

                monkeypatch.setattr(StoreLayout, "make_folders", fill_first)
                with pytest.raises(StoreFullError) as refused:
                    depot.pull("acme/weights")
                monkeypatch.undo()
                assert filled
                said = str(refused.value)
                assert said.startswith("no space left while recording acme/weights@"), (
                    said
                )  # (not its status's)
                variant = depot.get_manifest("acme/weights").variants[0]
                assert variant.status == "failed" and variant.error is not None, variant
                assert variant.error.startswith(f"StoreFullError: {said}"[:120]), variant.error
                os.unlink(root / "filler")
                again = depot.pull("acme/weights")
                assert again.files == 2 and again.bytes_downloaded == 0, again
        finally:
            upstream.stop()
