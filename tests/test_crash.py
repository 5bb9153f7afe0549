"""SIGKILL at random moments of import, gc and remove: after every kill the store is in the old or the new state.

Each operation runs in a real child process (``sys.executable -c``) that is SIGKILLed after a delay drawn
uniformly over one uninterrupted run, measured first. Delays come from a seeded generator and every
assertion message carries the seed and the delay: ``MODELDEPOT_CRASH_SEED=<seed>`` replays a failure.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import SMALL_CHUNK, LiveNode, store_files_consistent, wait_until, write_model_dir
from modeldepot import Depot, RepoNotFoundError
from modeldepot.hashing import digest_bytes

SEED = int(os.environ.get("MODELDEPOT_CRASH_SEED", "20240607"))

CHILD = """
import sys
from modeldepot import Depot
home, chunk_size, operation, *args = sys.argv[1:]
depot = Depot(home, chunk_size=int(chunk_size))
print("ready", flush=True)
if operation == "import":
    print(depot.import_dir(args[0], args[1]).commit_id, flush=True)
elif operation == "gc":
    depot.gc()
else:
    depot.remove(args[0])
print("done", flush=True)
"""

Files = dict[str, bytes]
States = dict[str | None, Files]  # commit id (None: the repo is absent) -> the files it must hold


def run_child(home: Path, *args: str, kill_after: float | None = None) -> tuple[bool, float]:
    """Run one operation in a child; returns (killed before it ended, seconds from ready to done)."""
    command = [sys.executable, "-c", CHILD, str(home), str(SMALL_CHUNK), *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        started = time.perf_counter()
        if ready == "ready\n" and kill_after is not None:
            time.sleep(kill_after)  # the random kill point, not a synchronisation
            proc.send_signal(signal.SIGKILL)  # does nothing if the child has already been reaped
        elif ready == "ready\n":
            while proc.stdout.readline() not in ("done\n", ""):
                pass
        seconds = time.perf_counter() - started
        _, err = proc.communicate()
    killed = proc.returncode == -signal.SIGKILL
    assert ready == "ready\n" and (killed or proc.returncode == 0), f"{args}: exit {proc.returncode}: {err}"
    return killed and kill_after is not None, seconds


def kill_rounds(name: str, kills: int, duration: float, one_round: Callable[[float, str], bool]) -> None:
    """Run rounds with delays uniform over ``duration`` until ``kills`` of them killed the child mid-way.

    ``duration`` is one uninterrupted run, measured once; a machine busier then than later would make it
    too long and most kills land after the end. A round that ended before its kill ran for less than its
    delay, so the delays are drawn below that from then on: the bound on rounds is a check that the test
    kills mid-way, not a speed requirement."""
    rng = random.Random(f"{SEED}:{name}")
    killed = rounds = 0
    while killed < kills:
        assert rounds < 3 * kills, (
            f"seed={SEED}: {name} ended before the kill in {rounds - killed} of {rounds} rounds"
        )
        delay = rng.uniform(0.0, duration)
        context = (
            f"{name} round {rounds} (seed={SEED}, killed after {delay * 1e3:.2f} of {duration * 1e3:.2f} ms)"
        )
        if one_round(delay, context):
            killed += 1
        else:
            duration = delay  # this run took less than that
        rounds += 1


def check_store(home: Path, expected: dict[str, States], context: str) -> None:
    """Everything that must hold after a kill, then after a gc."""
    with Depot(home) as depot:
        assert store_files_consistent(depot) == [], context
        report = depot.verify()
        assert report.ok, f"{context}: verify found {report.problems}"
        layout = depot.store.layout
        partials = [p for p in layout.blobs.rglob("*") if p.name.endswith(".partial")]
        assert partials == [], f"{context}: partial files in blobs/"
        for repo_id, states in expected.items():
            try:
                commit: str | None = depot.store.resolve(repo_id)
            except RepoNotFoundError:
                commit = None
            assert commit in states, f"{context}: {repo_id} is at {commit}, not one of {list(states)}"
            files = states[commit]
            listed = sorted(f.path for f in depot.store.files(repo_id, commit)) if commit else []
            assert listed == sorted(files), f"{context}: {repo_id}@{commit} lists the wrong files"
            for path, data in files.items():
                assert depot.get_file(repo_id, path) == data, (
                    f"{context}: {repo_id}/{path} has the wrong bytes"
                )
        depot.gc()
        leftovers = [p.name for p in layout.tmp.iterdir()]  # the killed writer's pid is gone: all abandoned
        assert leftovers == [], f"{context}: gc left abandoned sessions in tmp/"
        assert not list(layout.tmp.rglob("*.partial")), f"{context}: gc left partial files in tmp/"
        rows = {r["sha256"] for r in depot.store.index.read("SELECT sha256 FROM blobs WHERE state = 'ok'")}
        assert {p.name for p in layout.blobs.rglob("*") if p.is_file()} == rows, f"{context}: orphan blobs"
        live = {(r["repo_id"], r["commit_id"]) for r in depot.store.index.read("SELECT * FROM revisions")}
        assert set(depot.store.snapshots.present()) == live, f"{context}: stale or missing snapshots"


def reimport(home: Path, folder: Path, repo_id: str, commit: str, context: str) -> None:
    """Import again after a kill: the same commit, a consistent store, and nothing the killed import
    staged left in tmp/ (it stayed until a gc: 129 MiB of a trial's)."""
    with Depot(home) as depot:
        assert depot.import_dir(folder, repo_id).commit_id == commit, (
            f"{context}: re-import changed the commit"
        )
        assert store_files_consistent(depot) == [], context
    left = list((home / "tmp").iterdir()) if (home / "tmp").exists() else []
    assert left == [], f"{context}: a killed import's session is still in tmp/: {left}"


def random_files(rng: random.Random, count: int, low: int, high: int, prefix: str = "") -> Files:
    return {f"{prefix}part-{i:02d}.bin": rng.randbytes(rng.randint(low, high)) for i in range(count)}


def model_files(rng: random.Random) -> Files:
    """12 files of 100 KB to 3 MB, a duplicate, a config and an empty file: about 20 MB."""
    files = random_files(rng, 12, 100_000, 3_000_000, prefix="weights/")
    return {**files, "weights/copy.bin": files["weights/part-00.bin"], "config.json": b"{}", "empty.txt": b""}


@pytest.fixture(params=["deferred", "sync"])
def durability(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both durability modes (the children inherit the setting): a kill loses nothing in either."""
    monkeypatch.setenv("MODELDEPOT_DURABILITY", request.param)
    return str(request.param)


@pytest.mark.usefixtures("durability")
def test_kill_import_into_fresh_stores(tmp_path: Path) -> None:
    files = model_files(random.Random(f"{SEED}:fresh"))
    folder = write_model_dir(tmp_path / "model", files)
    _, duration = run_child(tmp_path / "calibration", "import", str(folder), "org/model")
    with Depot(tmp_path / "calibration") as depot:
        commit = depot.store.resolve("org/model")
    homes = iter(tmp_path / f"store-{n}" for n in range(1000))

    def one_round(delay: float, context: str) -> bool:
        home = next(homes)
        killed, _ = run_child(home, "import", str(folder), "org/model", kill_after=delay)
        check_store(home, {"org/model": {None: {}, commit: files}}, context)
        reimport(home, folder, "org/model", commit, context)
        return killed

    kill_rounds("import into a fresh store", 15, duration, one_round)


@pytest.mark.usefixtures("durability")
def test_kill_import_of_a_new_revision_keeps_the_old_one(tmp_path: Path) -> None:
    """A reused store: the repo is at the previous revision or the new one, never in between."""
    rng = random.Random(f"{SEED}:revisions")
    base = random_files(rng, 8, 100_000, 2_000_000, prefix="base/")
    home, reference = tmp_path / "store", Depot(tmp_path / "reference", chunk_size=SMALL_CHUNK)
    folders: list[tuple[Path, Files, str]] = []

    def next_folder() -> tuple[Path, Files, str]:
        files = {**base, **random_files(rng, 3, 100_000, 3_000_000, prefix=f"new{len(folders)}/")}
        folder = write_model_dir(tmp_path / f"model-{len(folders)}", files)
        # (imported in the same order as the store's, on one branch: the same history, the same ids)
        commit = reference.import_dir(folder, "ref/model").commit_id
        folders.append((folder, files, commit))
        return folders[-1]

    with reference:
        folder, _, commit = next_folder()
        _, duration = run_child(home, "import", str(folder), "org/model")
        with Depot(home) as depot:
            assert depot.store.resolve("org/model") == commit

        def one_round(delay: float, context: str) -> bool:
            (_, old_files, old_commit), (folder, files, commit) = folders[-1], next_folder()
            killed, _ = run_child(home, "import", str(folder), "org/model", kill_after=delay)
            check_store(home, {"org/model": {old_commit: old_files, commit: files}}, context)
            reimport(home, folder, "org/model", commit, context)
            return killed

        kill_rounds("import of a new revision", 15, duration, one_round)


def make_garbage(depot: Depot, rng: random.Random) -> None:
    """What killed imports and removes leave behind: orphan blobs, unreferenced rows, sessions, snapshots."""
    layout, now = depot.store.layout, time.time()
    keep = [(f.path, f.sha256) for f in depot.store.files("org/keep", depot.store.resolve("org/keep"))]
    for n in range(16):
        data = rng.randbytes(rng.randint(10_000, 300_000))
        digest = digest_bytes(data, SMALL_CHUNK)
        layout.blob_path(digest.sha256).parent.mkdir(exist_ok=True)
        layout.blob_path(digest.sha256).write_bytes(data)
        if n % 4 == 0:  # a whole blob row that no file references, as a stopped pull would leave
            with depot.store.index.write() as con:
                con.execute(
                    "INSERT INTO blobs (sha256, size, chunk_size, created_at) VALUES (?, ?, ?, ?)",
                    (digest.sha256, len(data), SMALL_CHUNK, now),
                )
                con.executemany(
                    "INSERT INTO chunks (sha256, idx, blake3) VALUES (?, ?, ?)",
                    [(digest.sha256, i, b3) for i, b3 in enumerate(digest.chunk_blake3)],
                )
    for _ in range(8):
        session = layout.tmp / f"{rng.randint(2**22, 2**23)}-{rng.randbytes(8).hex()}"
        session.mkdir()
        (session / ".lock").touch()
        for n in range(3):
            (session / f"{n}.partial").write_bytes(rng.randbytes(rng.randint(1, 200_000)))
    for n in range(3):
        # (a removal sets its snapshot aside before its rows go: what a killed one leaves is hidden, and a
        # snapshot an older version's left has a link its blob went from; a whole one of a revision the index
        # does not know is kept by gc, an older index's, see test_recover_index)
        commit = rng.randbytes(20).hex()
        depot.store.snapshots.build("org/removed", commit, [*keep, *([] if n else [("gone.bin", "0" * 64)])])
        if n:
            depot.store.snapshots.set_aside("org/removed", commit)
    (layout.quarantine / rng.randbytes(32).hex()).write_bytes(rng.randbytes(50_000))


def kept_and_doomed(home: Path, rng: random.Random, tmp_path: Path) -> dict[str, tuple[Path, Files, str]]:
    """Two repos sharing three files, imported without interruption."""
    shared = random_files(rng, 3, 100_000, 500_000, prefix="shared/")
    repos = {}
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        for name in ("keep", "doomed"):
            files = {**shared, **random_files(rng, 15, 1, 400_000, prefix=f"{name}/")}
            folder = write_model_dir(tmp_path / name, files)
            repos[f"org/{name}"] = (folder, files, depot.import_dir(folder, f"org/{name}").commit_id)
    return repos


def test_kill_gc(tmp_path: Path) -> None:
    rng, home = random.Random(f"{SEED}:gc"), tmp_path / "store"
    repos = kept_and_doomed(home, rng, tmp_path)
    expected: dict[str, States] = {repo: {commit: files} for repo, (_, files, commit) in repos.items()}
    with Depot(home) as depot:
        make_garbage(depot, rng)
    _, duration = run_child(home, "gc")
    check_store(home, expected, "uninterrupted gc")

    def one_round(delay: float, context: str) -> bool:
        with Depot(home) as depot:
            make_garbage(depot, rng)
        killed, _ = run_child(home, "gc", kill_after=delay)
        check_store(home, expected, context)
        folder, _, commit = repos["org/keep"]
        reimport(home, folder, "org/keep", commit, context)
        return killed

    kill_rounds("gc", 12, duration, one_round)


def test_kill_remove(tmp_path: Path) -> None:
    rng, home = random.Random(f"{SEED}:remove"), tmp_path / "store"
    repos = kept_and_doomed(home, rng, tmp_path)
    (_, keep_files, keep_commit), (folder, files, commit) = repos["org/keep"], repos["org/doomed"]
    _, duration = run_child(home, "remove", "org/doomed")
    check_store(
        home, {"org/keep": {keep_commit: keep_files}, "org/doomed": {None: {}}}, "uninterrupted remove"
    )
    reimport(home, folder, "org/doomed", commit, "uninterrupted remove")

    def one_round(delay: float, context: str) -> bool:
        killed, _ = run_child(home, "remove", "org/doomed", kill_after=delay)
        check_store(
            home, {"org/keep": {keep_commit: keep_files}, "org/doomed": {None: {}, commit: files}}, context
        )
        reimport(home, folder, "org/doomed", commit, context)
        return killed

    kill_rounds("remove", 8, duration, one_round)


@pytest.mark.parametrize("next_step", ["import", "serve"])
def test_what_a_killed_import_staged_goes_at_the_next_import_or_start(tmp_path: Path, next_step: str) -> None:
    """An import killed while it stages leaves its write session in tmp/ (the file copied so far): it stayed
    until a `gc` (129 MiB of a trial's, through imports and a node's start). The next import removes it, and
    so does a node as it starts."""
    folder = write_model_dir(tmp_path / "big", {"model.safetensors": random.Random(5).randbytes(64 << 20)})
    home = tmp_path / "store"
    command = [sys.executable, "-c", CHILD, str(home), str(SMALL_CHUNK), "import", str(folder), "org/big"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:

        def staging() -> bool:
            partials = list((home / "tmp").glob("*/*.partial")) if (home / "tmp").exists() else []
            return any(p.stat().st_blocks for p in partials)

        wait_until(staging, timeout=60)
        proc.kill()
        proc.communicate()
    assert staging(), "the killed import's staged file is in tmp/"
    with Depot(home) as depot:
        if next_step == "import":
            depot.import_dir(write_model_dir(tmp_path / "small", {"config.json": b"{}"}), "org/small")
        else:
            LiveNode(depot).stop()
    assert list((home / "tmp").iterdir()) == []
