"""Workers forked from a process that opened the store and used it (gunicorn ``--preload``, a multiprocessing
pool of forks): what other threads of the parent were doing at the fork must neither hang the child nor
keep the parent's locks for the child's whole life (an explorer's findings, each failing before)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from conftest import SMALL_CHUNK, hub_path_depot, sample_files, serving_repo, write_model_dir
from modeldepot import Depot
from modeldepot.engines import LoadedModelCache
from modeldepot.preload import Preloader
from test_concurrency import fork_children

REPO = "acme/forked"


def test_a_worker_forked_after_the_parent_pulled_can_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child inherited the ranged readers' thread pool with its threads dead and its idle count saying
    otherwise: nothing submitted there ran, and every pull of the child hung without a word."""
    files, other = sample_files(seed=21), sample_files(seed=22)
    with serving_repo(tmp_path / "up", files, REPO, chunk_size=SMALL_CHUNK) as node:
        node.depot.import_dir(write_model_dir(tmp_path / "other", other), "acme/other")
        with hub_path_depot(tmp_path / "local", node.url, monkeypatch) as depot:
            depot.pull(REPO)  # (the readers' threads start in the parent)

            def work(_: int) -> None:
                depot.pull("acme/other")
                assert depot.get_file("acme/other", "model.safetensors") == other["model.safetensors"]

            list(fork_children(1, work))


def test_a_store_lock_held_as_a_worker_forked_is_the_parents_to_let_go(depot: Depot, tmp_path: Path) -> None:
    """A flock belongs to the open file description, which a forked child shares: closed in the parent, the
    lock stayed held until the child exited (a worker forked while a thread pulled kept `rm` refused, "a pull
    is running", and gc waiting, for its whole life). Each lock is let go of before its descriptor closes."""
    depot.import_dir(write_model_dir(tmp_path / "model", sample_files(seed=23)), REPO)
    holding, forked = threading.Event(), threading.Event()

    def write_while_it_forks() -> None:
        with depot.store.lock.shared(), depot.store.partials.pulling(REPO):
            holding.set()
            forked.wait(10)

    writer = threading.Thread(target=write_while_it_forks)
    writer.start()
    assert holding.wait(10)

    def idle(_: int) -> None:
        time.sleep(4)  # (a worker that does not touch the store)

    for _pid in fork_children(1, idle):
        forked.set()
        writer.join(10)
        assert not depot.store.partials.is_pulling(REPO), "the parent's pull mark outlived its pull"
        with depot.store.lock.exclusive_if_free() as free:
            assert free, "the parent's store lock outlived its write"
        depot.remove(REPO)


def test_a_load_under_way_in_another_thread_as_a_worker_forked_does_not_hang_the_worker() -> None:
    """The child inherited the load in flight of a thread it does not have: its load of that model waited for
    ever, and under a memory budget its load of any model waited for the room that flight held."""
    cache: LoadedModelCache[str] = LoadedModelCache(max_models=4, memory_budget=100)
    loading, forked = threading.Event(), threading.Event()

    def slow_load() -> str:
        loading.set()
        forked.wait(10)
        return "the parent's"

    loader = threading.Thread(target=lambda: cache.get_or_load("model", slow_load, size=80))
    loader.start()
    assert loading.wait(10)

    def work(_: int) -> None:
        assert cache.get_or_load("other", lambda: "another", size=60) == "another"
        assert cache.get_or_load("model", lambda: "the child's", size=30) == "the child's"

    try:
        list(fork_children(1, work))
    finally:
        forked.set()
        loader.join(10)
    assert cache.get_or_load("model", lambda: "again") == "the parent's"


def test_a_preload_under_way_in_another_thread_as_a_worker_forked_does_not_hang_the_worker(
    depot: Depot, tmp_path: Path
) -> None:
    """The same for the RAM tier: the child waited for ever on the parent's preload of the model, and its
    background preloads (one thread, inherited dead) never ran."""
    depot.import_dir(write_model_dir(tmp_path / "model", sample_files(seed=24)), REPO)
    preloader = Preloader(depot, budget="64MiB")
    preloader.auto_preload_in_background(1).result(30)  # (its thread starts in the parent)
    key = (REPO, depot.resolve(REPO), "")
    preloader.evict(REPO)  # (in case it was preloaded: the worker's preload must load it)
    with preloader._lock:  # a thread of the parent is loading it as the worker forks
        preloader._loading[key] = threading.Event()

    def work(_: int) -> None:
        assert not preloader.preload(REPO).already
        assert preloader.auto_preload_in_background(1).result(30) is not None

    try:
        list(fork_children(1, work))
    finally:
        preloader._loading.pop(key).set()
        preloader.close()


def test_a_worker_that_lets_go_of_an_onnx_session_the_parent_loaded_does_not_hang(
    depot: Depot, tmp_path: Path
) -> None:
    """gunicorn ``--preload``: the master loads its model, then forks. onnxruntime's session, torn down in a
    child its thread pool did not follow into, waits for ever (its pool's threads had parked in the parent:
    a second's idling before the fork). The worker's cache let go of it at its first eviction, its
    ``clear()``, a removal of the repo or its depot's close, and hung (an explorer's trial, with gunicorn
    killing its workers as timed out). What the parent loaded is kept in the child, never torn down."""
    from test_load import write_repo

    depot.import_dir(write_repo(tmp_path / "repo"), REPO)
    parents = id(depot.load(REPO))  # (held by the cache alone: a caller's reference keeps it from teardown)
    time.sleep(1.5)  # (the session's pool threads wait on their condition variable now)

    def run_once() -> int:
        import numpy as np

        session = depot.load(REPO)
        (y,) = session.run(None, {"x": np.ones((1, 4), np.float32)})
        assert y.shape == (1, 256)
        return id(session)

    def work(evicting: bool) -> None:
        assert run_once() == parents  # (the parent's session, and it works here)
        if evicting:
            depot.engines.clear()  # (as an eviction does: the LRU, the TTL, the memory budget)
            assert run_once() != parents  # (loaded afresh in the child: its own, closed as any other)
            depot.remove(REPO)
        depot.close()

    # (one worker after the other: the first's removal of the repo would pull the rug from under the second)
    list(fork_children(1, lambda _: work(evicting=False)))
    list(fork_children(1, lambda _: work(evicting=True)))


def test_a_worker_forked_while_another_thread_pulled_closes_its_depot_at_once() -> None:
    """A depot's close waits for the pulls under way on other threads' loops to unwind (10 s at most). In a
    worker forked while the master's warm-up thread pulled, that pull is the master's, its thread is not
    in the worker, and the worker's close waited the whole 10 s for it (an explorer's trial)."""
    import asyncio

    from modeldepot.running import RunningPulls

    pulls = RunningPulls("store")
    started, release = threading.Event(), threading.Event()

    async def pull() -> None:
        started.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)

    async def main() -> None:
        await pulls.run(pull())

    warm_up = threading.Thread(target=asyncio.run, args=(main(),))
    warm_up.start()
    assert started.wait(10)

    def work(_: int) -> None:
        assert not pulls._running  # (nothing of the parent's for its stop to wait on)
        pulls.stop()

    try:
        list(fork_children(1, work))
    finally:
        release.set()
        warm_up.join(10)


class _Engine:
    """An engine that says when it is closed or freed, into ``said``."""

    def __init__(self, name: str, said: list[str]) -> None:
        self.name, self.said = name, said

    def close(self) -> None:
        self.said.append(f"closed {self.name}")

    def __del__(self) -> None:
        self.said.append(f"freed {self.name}")


def test_the_parents_engines_in_a_worker_are_neither_torn_down_nor_counted_once_they_left() -> None:
    """What the parent loaded is kept in the child (never closed nor freed: onnxruntime hangs there), also an
    engine the parent's limits evicted while a caller held it, torn down when the child's caller let go (a
    review). Once out of the child's cache, a kept engine's bytes count in no budget: counted, as a held
    engine is, the budget stayed full of it for good and every load evicted every other engine (a review)."""
    import gc

    said: list[str] = []
    cache: LoadedModelCache[_Engine] = LoadedModelCache(max_models=4, memory_budget=100)
    cache.get_or_load("A", lambda: _Engine("A", said), size=60)
    one: LoadedModelCache[_Engine] = LoadedModelCache(max_models=1)
    held = [one.get_or_load("held", lambda: _Engine("held", said))]
    one.get_or_load("other", lambda: _Engine("other", said))  # (the limits evict it, a caller holds it)

    def work(_: int) -> None:
        cache.get_or_load("B", lambda: _Engine("B", said), size=30)
        cache.get_or_load("C", lambda: _Engine("C", said), size=30)  # (A, the least used, goes)
        cache.get_or_load("D", lambda: _Engine("D", said), size=30)
        assert sorted(cache.keys()) == ["B", "C", "D"], (cache.keys(), said)
        held.clear()
        gc.collect()
        assert not [s for s in said if s.endswith((" A", " held"))], said

    list(fork_children(1, work))


_MASTER = """
import os, sys, threading, time
from modeldepot import Depot

home, repo = sys.argv[1], sys.argv[2]
depot = Depot(home, chunk_size=64 * 1024)
threading.Thread(target=depot.pull, args=(repo,), daemon=True).start()  # (the master's warm-up pull)
partials, deadline = depot.store.partials, time.monotonic() + 60
while not (partials.is_pulling(repo) and any(partials.downloading(key) for key in partials.keys_on_disk())):
    if time.monotonic() > deadline:
        sys.exit("the pull never began")
    time.sleep(0.01)
worker = os.fork()
if worker == 0:
    time.sleep(120)  # (a worker that never touches the store)
    os._exit(0)
print(worker, flush=True)
time.sleep(120)
"""


def test_a_worker_keeps_no_lock_of_the_pull_its_master_ran_once_the_master_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker forked while the master's warm-up thread pulled shared that pull's locks (a flock is the open
    file's): the master killed, the pull it ran looked alive for the worker's whole life: `rm` refused naming
    the dead master, a new pull of the file waited, status said downloading (an explorer's trial). The worker
    lets go of its copies of other threads' locks as it starts."""
    import os
    import signal
    import subprocess
    import sys

    from modeldepot.store.locks import lock_is_held
    from modeldepot.store.reservations import Reservations

    files = sample_files(seed=24, big=6 << 20)
    with serving_repo(tmp_path / "up", files, REPO, chunk_size=SMALL_CHUNK) as node:
        home = tmp_path / "local"
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", node.url)
        environment = dict(os.environ, MODELDEPOT_MAX_DOWNLOAD_RATE="1MiB/s")
        master = subprocess.Popen([sys.executable, "-c", _MASTER, str(home), REPO], stdout=subprocess.PIPE,
                                  env=environment)  # fmt: skip
        worker = None
        try:
            assert master.stdout is not None
            worker = int(master.stdout.readline())
            master.kill()
            master.wait(10)
            with Depot(home, chunk_size=SMALL_CHUNK) as depot:
                store = depot.store
                assert store.partials.keys_on_disk(), "the master's pull had not begun"
                assert not store.partials.is_pulling(REPO), "the dead master's pull still looks alive"
                assert not [key for key in store.partials.keys_on_disk() if store.partials.downloading(key)]
                assert not [p for p in store.layout.tmp.glob("*/.lock") if lock_is_held(p)], "a write session"
                assert not Reservations(store.layout.lock_path.parent / "reservations", False).elsewhere()
                depot.pull(REPO)  # (resumes what the master fetched)
                assert depot.get_file(REPO, "model.safetensors") == files["model.safetensors"]
                state = Path(f"/proc/{worker}/stat").read_text().rpartition(")")[2].split()[0]
                assert state in "RSD", f"the worker did not live on through it all ({state})"
        finally:
            master.kill()
            master.wait(10)
            master.stdout.close()
            if worker is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)


def test_a_worker_lets_go_of_every_lock_of_its_parent_without_touching_the_parents(tmp_path: Path) -> None:
    """In the child, every lock file descriptor of the parent is made /dev/null's, not closed (its number,
    reused, would be closed again by the object that owns it): another thread's, the forking thread's own (a
    pull's locks are taken on its event loop's thread, whose tasks may fork: a review), and one opened but
    not locked yet, which the parent locks after the fork (a review). What the objects owning them do in the
    child (their unlock and close) leaves the parent's locks held."""
    import fcntl
    import os

    from modeldepot.store.locks import lock_file, lock_is_held, take_flock, unlock_and_close

    theirs, mine, later = tmp_path / "theirs.lock", tmp_path / "mine.lock", tmp_path / "later.lock"
    holding, done = threading.Event(), threading.Event()
    descriptors: list[int] = []

    def hold() -> None:
        fd = lock_file(os.open, theirs, os.O_RDWR | os.O_CREAT)
        take_flock(fd, fcntl.LOCK_EX)
        descriptors.append(fd)
        holding.set()
        done.wait(30)
        unlock_and_close(fd)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    own = lock_file(os.open, mine, os.O_RDWR | os.O_CREAT)
    take_flock(own, fcntl.LOCK_EX)
    unlocked = lock_file(os.open, later, os.O_RDWR | os.O_CREAT)

    def work(_: int) -> None:
        null = os.stat(os.devnull).st_rdev
        for fd in (descriptors[0], own, unlocked):
            assert os.fstat(fd).st_rdev == null, "a lock file of the parent's kept in the child"
        for fd in (descriptors[0], own, unlocked):
            unlock_and_close(fd)  # (what the object owning it would do, freed in the child)

    try:
        for _pid in fork_children(1, work):
            take_flock(unlocked, fcntl.LOCK_EX)  # (the parent locks it after the fork)
        assert lock_is_held(theirs) and lock_is_held(mine), "the child let go of the parent's locks"
    finally:
        done.set()
        holder.join(10)
        unlock_and_close(own)
        unlock_and_close(unlocked)
    assert not lock_is_held(theirs) and not lock_is_held(mine) and not lock_is_held(later)
