"""Several writers and readers on one store at once: processes, threads, forked children, live mappings."""

from __future__ import annotations

import faulthandler
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from conftest import SMALL_CHUNK, sample_files, store_files_consistent, wait_until, write_model_dir
from modeldepot import Depot, NotFoundError, RepoNotFoundError, RevisionNotFoundError

Files = dict[str, bytes]

# Waits for a line on stdin (the start signal), runs one operation, prints its result and ends; "snapshot"
# repeats on every further line.
CHILD = """
import sys
from modeldepot import Depot
home, operation, *args = sys.argv[1:]
print("ready", flush=True)
depot = None
while sys.stdin.readline():
    depot = depot or Depot(home)  # opened on the first signal: the store may not exist yet
    if operation == "snapshot":
        try:
            depot.snapshot_path(args[0])
            print("ok", flush=True)
        except Exception as error:
            print(f"{type(error).__name__}: {error}", flush=True)
        continue
    if operation == "open":
        print(depot.chunk_size, flush=True)
    elif operation == "import":
        print(depot.import_dir(args[0], args[1]).commit_id, flush=True)
    else:
        print(depot.remove(*args).blobs_removed, depot.gc().blobs_removed, flush=True)
    break
"""


def start_children(stack: ExitStack, count: int, *args: str) -> list[subprocess.Popen[str]]:
    """Start ``count`` children and wait until each is ready for its start signal."""
    procs = []
    for _ in range(count):
        proc = stack.enter_context(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "MODELDEPOT_CHUNK_SIZE": str(SMALL_CHUNK)},
            )
        )
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        procs.append(proc)
    return procs


def go(procs: list[subprocess.Popen[str]]) -> None:
    """The start signal: one line to every child, sent back to back."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def finish(proc: subprocess.Popen[str]) -> str:
    """Wait for the child to end (closing its stdin) and return what it printed."""
    out, err = proc.communicate()
    assert proc.returncode == 0, f"child failed: {err}"
    return out


def model_files(seed: int) -> Files:
    files = sample_files(seed=seed, big=1_500_000)
    return {**files, "weights/copy.safetensors": files["model.safetensors"]}


def assert_stored_once(depot: Depot, files: Files, repo_ids: set[str]) -> None:
    """One blob row and one blob file per distinct content, every repo whole, nothing left in tmp/."""
    distinct = sorted({hashlib.sha256(data).hexdigest() for data in files.values()})
    assert sorted(r["sha256"] for r in depot.store.index.read("SELECT sha256 FROM blobs")) == distinct
    assert sorted(p.name for p in depot.store.layout.blobs.rglob("*") if p.is_file()) == distinct
    assert store_files_consistent(depot) == []
    assert depot.verify().ok
    assert list(depot.store.layout.tmp.iterdir()) == []
    assert {r.repo_id for r in depot.list_repos()} == repo_ids
    for repo_id in repo_ids:
        snapshot = depot.snapshot_path(repo_id)
        for path, data in files.items():
            assert depot.get_file(repo_id, path) == data, f"{repo_id}/{path}"
            assert (snapshot / path).read_bytes() == data, f"{repo_id}/{path} in the snapshot"


def test_processes_opening_a_new_store_at_once(tmp_path: Path) -> None:
    """Programs started together on a fresh MODELDEPOT_HOME all get the store, none an error."""
    for round_ in range(10):
        with ExitStack() as stack:
            procs = start_children(stack, 3, str(tmp_path / f"store-{round_}"), "open")
            go(procs)
            sizes = [finish(proc).strip() for proc in procs]
        assert sizes == [str(SMALL_CHUNK)] * 3, f"round {round_}"


@pytest.mark.parametrize("same_repo", [True, False], ids=["same-repo", "different-repos"])
def test_two_processes_import_the_same_content_at_once(tmp_path: Path, same_repo: bool) -> None:
    """Released together by their start signal, into a store that exists but holds nothing yet."""
    files = model_files(seed=1)
    folder = write_model_dir(tmp_path / "model", files)
    for round_ in range(4):
        home, repo_ids = tmp_path / f"store-{round_}", ["org/a", "org/a" if same_repo else "org/b"]
        Depot(home, chunk_size=SMALL_CHUNK).close()
        with ExitStack() as stack:
            procs = [start_children(stack, 1, str(home), "import", str(folder), r)[0] for r in repo_ids]
            go(procs)
            commits = {finish(proc).strip() for proc in procs}
        assert len(commits) == 1, f"round {round_}: the two imports disagree on the commit: {commits}"
        with Depot(home) as depot:
            assert {depot.store.resolve(r) for r in repo_ids} == commits
            assert_stored_once(depot, files, set(repo_ids))


def import_in_threads(depot: Depot, folder: Path, repo_ids: list[str]) -> tuple[set[str], list[str]]:
    """One thread per repo id, released together by a barrier; returns (commit ids, tracebacks)."""
    barrier, commits, errors = threading.Barrier(len(repo_ids)), set(), []

    def run(repo_id: str) -> None:
        barrier.wait()
        try:
            commits.add(depot.import_dir(folder, repo_id).commit_id)
        except Exception:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(repo_id,)) for repo_id in repo_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return commits, errors


@pytest.mark.parametrize("same_repo", [True, False], ids=["same-repo", "different-repos"])
def test_threads_import_the_same_content_at_once(tmp_path: Path, same_repo: bool) -> None:
    """Four threads share one Depot (one index connection each)."""
    files = model_files(seed=2)
    folder = write_model_dir(tmp_path / "model", files)
    for round_ in range(6):
        with Depot(tmp_path / f"store-{round_}", chunk_size=SMALL_CHUNK) as depot:
            repo_ids = ["org/same" if same_repo else f"org/t{n}" for n in range(4)]
            commits, errors = import_in_threads(depot, folder, repo_ids)
            assert errors == [], f"round {round_}: {errors[0]}"
            assert len(commits) == 1
            assert_stored_once(depot, files, set(repo_ids))


def fork_children(count: int, work: Callable[[int], None]) -> Iterator[int]:
    """Fork ``count`` children running ``work(n)``; yields each pid, then checks every child succeeded."""
    children = []
    for n in range(count):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            os.close(read_fd)
            faulthandler.dump_traceback_later(60, exit=True)  # (a child that hangs fails, saying where)
            code, report = 1, b""
            try:
                work(n)
                code = 0
            except BaseException:
                report = traceback.format_exc().encode()
            finally:
                os.write(write_fd, report[-8000:])
                os._exit(code)
        os.close(write_fd)
        children.append((pid, read_fd))
        yield pid
    for pid, read_fd in children:
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"forked child {pid} failed:\n{report}"


def test_forked_children_use_the_parents_depot(depot: Depot, tmp_path: Path) -> None:
    """The parent's index connection exists before the fork; each child must open its own and work."""
    before = sample_files(seed=3)
    depot.import_dir(write_model_dir(tmp_path / "before", before), "org/before")
    assert [r.repo_id for r in depot.list_repos()] == ["org/before"]
    folders = [write_model_dir(tmp_path / f"child-{n}", model_files(seed=10 + n)) for n in range(4)]

    def work(n: int) -> None:
        assert depot.get_file("org/before", "model.safetensors") == before["model.safetensors"]
        assert "org/before" in {r.repo_id for r in depot.list_repos()}
        depot.import_dir(folders[n], f"org/child-{n}")
        assert depot.get_file(f"org/child-{n}", "config.json") == model_files(seed=10 + n)["config.json"]

    for n, _pid in enumerate(fork_children(3, work)):
        if n == 1:  # the parent writes while the children do
            depot.import_dir(folders[3], "org/parent")
    repos = {r.repo_id for r in depot.list_repos()}
    assert repos == {"org/before", "org/parent", "org/child-0", "org/child-1", "org/child-2"}
    for n in range(3):
        for path, data in model_files(seed=10 + n).items():
            assert depot.get_file(f"org/child-{n}", path) == data
    depot.import_dir(write_model_dir(tmp_path / "after", sample_files(seed=4)), "org/after")
    assert store_files_consistent(depot) == []
    assert depot.verify().ok


def test_a_forked_worker_flushes_and_counts_its_own_work(depot: Depot, tmp_path: Path) -> None:
    """A worker forked after the store was opened (gunicorn's pattern) has the parent's memory, not its
    threads: its writes waited for another process's flush (the flusher thread it "had" was the parent's),
    its uses were written only at its exit, the parent's pending ones again with them (13 recorded for 11
    reads; a trial). Each object with a thread of its own starts over in the child now."""
    depot.import_dir(write_model_dir(tmp_path / "before", sample_files(seed=3)), "org/before")
    assert wait_until(lambda: not unflushed(depot), timeout=10), "the parent's flusher runs"
    # (pending in the parent when it forks: the parent's to write)
    depot.get_file("org/before", "onnx/model_q4.onnx")
    folder = write_model_dir(tmp_path / "child", model_files(seed=11))

    def work(_: int) -> None:
        depot.store.access.flush_interval = 0.2
        depot.import_dir(folder, "org/child")
        for _ in range(5):
            depot.get_file("org/child", "onnx/model_q4.onnx")
        assert wait_until(lambda: not unflushed(depot), timeout=10), "the child's own flusher runs"
        assert wait_until(lambda: uses(depot, "org/child") == 5, timeout=10), "written while it runs"
        depot.store.access.flush()  # (what its exit does)

    list(fork_children(1, work))  # (each child ends by os._exit: nothing written at its exit)
    depot.store.access.flush()
    assert uses(depot, "org/before") == 1 and uses(depot, "org/child") == 5


def test_a_fork_while_another_thread_writes_the_index_leaves_the_child_able_to_write(
    depot: Depot, tmp_path: Path
) -> None:
    """SQLite keeps a process's locks in its memory: a fork while another thread was inside a transaction
    left the child sure the lock was held, and its every write failed ("database is locked", after the busy
    timeout). A fork waits for the transactions under way now (and none starts meanwhile)."""
    inside, forked = threading.Event(), threading.Event()

    def long_write() -> None:
        with depot.store.index.write("a long transaction"):
            inside.set()
            forked.wait(0.5)  # (the fork waits for this transaction: it cannot come before it ends)

    writer = threading.Thread(target=long_write)
    writer.start()
    assert inside.wait(10)
    folder = write_model_dir(tmp_path / "child", model_files(seed=12))

    def work(_: int) -> None:
        depot.import_dir(folder, "org/child")

    list(fork_children(1, work))
    forked.set()
    writer.join()
    assert depot.get_file("org/child", "config.json") == model_files(seed=12)["config.json"]


def test_two_forks_at_once_keep_transactions_out_until_both_are_done() -> None:
    """The gate was one flag: the first of two forks at once to end opened it while the second went on, and
    a transaction could start inside that one (its child sure the lock was held: a review). The hooks are
    called as os.fork calls them."""
    from modeldepot.store.forking import ForkGate

    gate, entered = ForkGate(), threading.Event()
    gate.before_fork()  # one thread forks
    gate.before_fork()  # and another, at once
    gate.after_fork_in_parent()  # the first is done

    def transaction() -> None:
        with gate:
            entered.set()

    inside = threading.Thread(target=transaction)
    inside.start()
    assert not entered.wait(0.5), "a transaction started inside the second fork"
    gate.after_fork_in_parent()
    assert entered.wait(5)
    inside.join(5)


def test_a_gate_held_alone_holds_back_forks_and_others_and_is_taken_only_when_empty() -> None:
    """An index's close holds its gate alone while it closes the other threads' connections: a fork, another
    close, a transaction wait for it (it did not count itself inside: a fork went ahead of its closes, a
    review). It never waits holding anything: it takes the gate only when nobody is inside, and waits for
    them with nothing held back (a Ctrl-C in that wait left the gate shut; waiting inside the process's gate
    deadlocked against a thread forking inside a transaction: reviews)."""
    from modeldepot.store.forking import ForkGate

    gate, order = ForkGate(), []
    assert gate.try_alone()
    assert gate.try_alone()  # (the same thread again: nested, it may)
    gate.end_alone()
    gate.end_alone()

    def fork() -> None:
        gate.before_fork()
        order.append("fork")
        gate.after_fork_in_parent()

    def other() -> None:
        while not gate.try_alone():
            gate.wait_for_others()
        order.append("other")
        gate.end_alone()

    def transaction() -> None:
        with gate:
            order.append("transaction")

    threads = [threading.Thread(target=target) for target in (fork, other, transaction)]
    assert gate.try_alone()
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert order == [], "a fork, another close or a transaction went ahead of the gate held alone"
    gate.end_alone()
    for thread in threads:
        thread.join(5)
    assert sorted(order) == ["fork", "other", "transaction"]

    # Someone inside: it is not taken, nothing is held back, and the wait ends when they leave
    inside, leave = threading.Event(), threading.Event()

    def stay() -> None:
        with gate:
            inside.set()
            leave.wait(5)

    staying = threading.Thread(target=stay)
    staying.start()
    assert inside.wait(5)
    assert not gate.try_alone()
    entered = threading.Event()
    later = threading.Thread(target=lambda: (gate.__enter__(), entered.set(), gate.__exit__()))
    later.start()
    assert entered.wait(5), "a failed try held the gate shut"
    later.join(5)
    waited = threading.Thread(target=gate.wait_for_others)
    waited.start()
    waited.join(0.3)
    assert waited.is_alive()
    leave.set()
    waited.join(5)
    assert not waited.is_alive() and gate.try_alone()
    gate.end_alone()


def unflushed(depot: Depot) -> list[str]:
    return [
        r["sha256"]
        for r in depot.store.index.read("SELECT sha256 FROM blobs WHERE unflushed_boot IS NOT NULL")
    ]


def uses(depot: Depot, repo_id: str) -> int:
    """The uses counted of the repo, its variants' included."""
    rows = depot.store.index.read("SELECT sum(count) AS uses FROM access WHERE repo_id = ?", (repo_id,))
    return rows[0]["uses"] or 0


@pytest.mark.parametrize("whole_repo", [True, False], ids=["repo", "revision"])
def test_mapped_reads_survive_remove_and_gc_by_another_process(
    depot: Depot, tmp_path: Path, whole_repo: bool
) -> None:
    files, new_files = sample_files(seed=5, big=3_000_000), sample_files(seed=6)
    old = depot.import_dir(write_model_dir(tmp_path / "old", files), "org/m", "old").commit_id
    depot.import_dir(write_model_dir(tmp_path / "new", new_files), "org/m")
    old_blobs, new_blobs = ({hashlib.sha256(d).digest() for d in f.values()} for f in (files, new_files))
    freed = len(old_blobs | new_blobs) if whole_repo else len(old_blobs - new_blobs)
    path = "model.safetensors"
    blob = depot.store.blobs.path(depot.file_info("org/m", path, old).sha256)
    expected = hashlib.sha256(files[path]).digest()
    view = depot.get_file("org/m", path, old)
    stream = depot.open_file("org/m", "onnx/model_q4.onnx", old)
    with ExitStack() as stack, depot.map_file("org/m", "tokenizer.json", old) as mapped:
        stack.enter_context(stream)
        args = [str(depot.home), "remove", "org/m"] + ([] if whole_repo else [old])
        (proc,) = start_children(stack, 1, *args)
        go([proc])
        while proc.poll() is None:  # read the whole view over and over while the other process works
            assert hashlib.sha256(view).digest() == expected
        assert finish(proc).split() == [str(freed), "0"], "remove frees the blobs, gc finds nothing more"
        assert not blob.exists(), "the blob was not deleted: the test did not exercise an unlinked mapping"
        assert view == files[path]
        assert mapped == files["tokenizer.json"]
        assert stream.read() == files["onnx/model_q4.onnx"]
    missing = RepoNotFoundError if whole_repo else RevisionNotFoundError
    with pytest.raises(missing):
        depot.get_file("org/m", path, old)
    with pytest.raises(missing):
        depot.open_file("org/m", path, old)
    assert not depot.has_file("org/m", path, old)
    if not whole_repo:
        assert depot.get_file("org/m", path) == new_files[path]
    assert store_files_consistent(depot) == []


def test_processes_rebuilding_a_missing_snapshot_at_once(depot: Depot, model_dir: Path) -> None:
    """Snapshots are derived state: any reader may rebuild a missing one, and two may do so at once."""
    depot.import_dir(model_dir, "org/model")
    with ExitStack() as stack:
        procs = start_children(stack, 2, str(depot.home), "snapshot", "org/model")
        for round_ in range(200):
            shutil.rmtree(depot.store.layout.snapshots / "org")
            go(procs)
            answers = [proc.stdout.readline().strip() for proc in procs if proc.stdout is not None]
            assert answers == ["ok", "ok"], f"round {round_}: {answers}"
        for proc in procs:
            finish(proc)
    assert depot.verify().snapshots_repaired == 0


def _republish_between(depot: Depot, tmp_path: Path, files: dict[str, bytes]) -> Callable[[], None]:
    """What an `rm` of acme/x and an import of the same bytes as acme/y beside a reader do: the reader's
    look at the blob is of a placement that is gone, and a new, good one is there."""

    def republish() -> None:
        depot.remove("acme/x")
        depot.import_dir(write_model_dir(tmp_path / "y", files), "acme/y")

    return republish


def test_a_read_that_lost_a_race_with_rm_and_an_import_leaves_the_new_blob_alone(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader whose blob was removed under it (its open failed: the file was missing) quarantined the blob
    of the same content that an import had published meanwhile: acme/y, just imported, was unreadable.
    The race is made deterministic by doing the rm and the import inside the reader's failing open."""
    files = {"model.safetensors": os.urandom(3 * SMALL_CHUNK + 1)}
    depot.import_dir(write_model_dir(tmp_path / "x", files), "acme/x")
    entry = depot.file_info("acme/x", "model.safetensors")
    opening = depot.store.blobs.open
    depot.remove("acme/x")  # the reader resolved its entry before this

    def open_then_race(sha256: str, size: int) -> int:
        try:
            return opening(sha256, size)
        finally:
            if not depot.has_file("acme/y", "model.safetensors"):
                depot.import_dir(write_model_dir(tmp_path / "y", files), "acme/y")

    monkeypatch.setattr(depot.store.blobs, "open", open_then_race)
    fd = depot.store.open_fd(entry)  # the new placement, opened once the old one is known gone
    os.close(fd)
    monkeypatch.setattr(depot.store.blobs, "open", opening)
    assert bytes(depot.get_file("acme/y", "model.safetensors")) == files["model.safetensors"]
    assert depot.verify().ok and store_files_consistent(depot) == []


def test_a_read_that_lost_a_race_with_rm_is_told_the_file_was_removed(depot: Depot, tmp_path: Path) -> None:
    """A reader resolved its entry, then an `rm` took the repo: its open said the blob was corrupt and
    quarantined (nothing was quarantined; a client of the node got a 503 for a file simply gone)."""
    depot.import_dir(
        write_model_dir(tmp_path / "x", {"model.safetensors": os.urandom(SMALL_CHUNK)}), "acme/x"
    )
    entry = depot.store.entry("acme/x", "model.safetensors", "main")
    depot.remove("acme/x")
    with pytest.raises(NotFoundError, match=r"model\.safetensors was removed from the store"):
        depot.store.open(entry)
    assert list(depot.store.layout.quarantine.iterdir()) == []


def test_verify_that_lost_a_race_with_rm_and_an_import_leaves_the_new_blob_alone(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify` found a blob missing (removed while it ran) and quarantined the one of the same content
    that an import had published meanwhile."""
    files = {"model.safetensors": os.urandom(3 * SMALL_CHUNK + 1)}
    depot.import_dir(write_model_dir(tmp_path / "x", files), "acme/x")
    checking = depot.store.check_blob
    republish = _republish_between(depot, tmp_path, files)

    def race_then_check(sha256: str, size: int, chunk_size: int) -> tuple[str, str] | None:
        if depot.has_file("acme/x", "model.safetensors"):
            republish()
            return ("missing", "its file is missing")  # what the check saw of the placement rm removed
        return checking(sha256, size, chunk_size)

    monkeypatch.setattr(depot.store, "check_blob", race_then_check)
    report = depot.verify()
    monkeypatch.setattr(depot.store, "check_blob", checking)
    assert report.problems == (), report.problems
    assert bytes(depot.get_file("acme/y", "model.safetensors")) == files["model.safetensors"]
    assert depot.verify().ok and store_files_consistent(depot) == []


def test_a_wait_for_a_lock_another_thread_of_this_process_holds_is_said_so(
    depot: Depot, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node's pulls waiting for one of them to make room in the disk budget warned, each, that the node's
    own pid held the lock, "a gc, a removal or a write under way": an operator went looking for a gc (an
    explorer's trial). It is said as this process's own work, at INFO."""
    import logging

    from modeldepot.store import locks

    monkeypatch.setattr(locks, "WAIT_SAID", 0.2)
    caplog.set_level(logging.INFO, "modeldepot.store.locks")
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with depot.store.lock.exclusive():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        waiting = threading.Thread(target=depot.gc)
        waiting.start()
        wait_until(
            lambda: "which another write of this process holds" in caplog.text, 10, "the wait to be said"
        )
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        release.set()
        holder.join(30)
    waiting.join(30)


def test_a_wait_for_the_store_lock_says_who_holds_it_and_that_it_is_suspended(
    depot: Depot, model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A gc suspended (Ctrl-Z) while it held the store's lock kept every import, rm and pull waiting for
    ever, and none of them said a word (a trial)."""
    import logging
    import signal

    from modeldepot.store import locks

    monkeypatch.setattr(locks, "WAIT_SAID", 0.2)
    depot.import_dir(model_dir, "acme/a")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(depot.store.lock.path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        os.kill(holder.pid, signal.SIGSTOP)
        caplog.set_level(logging.WARNING, "modeldepot.store.locks")
        collected: list[object] = []
        waiting = threading.Thread(target=lambda: collected.append(depot.gc()))
        waiting.start()
        wait_until(lambda: f"kill -CONT {holder.pid}" in caplog.text, 10, "the wait to be said")
        assert f"which process {holder.pid} holds and is suspended" in caplog.text and not collected
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        waiting.join(30)
        assert collected, "the gc ran once the holder was gone"
    finally:
        holder.kill()
        holder.communicate()


def test_a_write_starts_while_a_sweep_probes_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep of tmp/ (another import's start) probes a starting session's lock, holding it for an instant:
    a write that took its own lock in that instant failed, "resource temporarily unavailable" (a CI run's
    trial, threads importing at once). The start tries again."""
    import fcntl

    import modeldepot.store.blobs as blobs

    real_flock, probed = fcntl.flock, []

    def probed_flock(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX | fcntl.LOCK_NB and len(probed) < 3:
            probed.append(fd)
            raise BlockingIOError(11, "Resource temporarily unavailable")  # (the probe holds it)
        real_flock(fd, operation)

    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        monkeypatch.setattr(blobs.fcntl, "flock", probed_flock)
        with blobs.WriteSession(depot.store.layout) as session:
            assert len(probed) == 3 and session.path.is_dir()
