"""The RAM tier: residency measured with mincore, LRU under the budget, handles that outlive eviction,
the four strategies, single-flight, auto-preload from recorded accesses, and load() using it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import drop_page_cache, wait_until, write_model_dir
from modeldepot import Depot
from modeldepot.errors import ConfigError, DepotError, InvalidInputError, NotFoundError
from modeldepot.preload import STRATEGIES, Preloader, PreloadHandle, PreloadInfo, parse_budget
from modeldepot.preload.residency import resident_bytes

MiB = 1024 * 1024


def model_files(seed: int, size: int = 4 * MiB) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"config.json": b'{"seed": %d}' % seed, "model.safetensors": rng.randbytes(size)}


def add_repo(depot: Depot, tmp_path: Path, name: str, seed: int, size: int = 4 * MiB) -> dict[str, bytes]:
    files = model_files(seed, size)
    depot.import_dir(write_model_dir(tmp_path / name, files), f"acme/{name}")
    return files


def resident(depot: Depot, repo_id: str, path: str = "model.safetensors") -> int:
    entry = depot.file_info(repo_id, path)
    fd = os.open(depot.store.blobs.path(entry.sha256), os.O_RDONLY)
    try:
        return resident_bytes(fd, entry.size)
    finally:
        os.close(fd)


def test_page_cache_preload_makes_every_page_resident(depot: Depot, tmp_path: Path) -> None:
    add_repo(depot, tmp_path, "a", 1)
    drop_page_cache(depot, "acme/a")
    assert resident(depot, "acme/a") < MiB
    preloader = Preloader(depot, budget="1GiB")
    info = preloader.preload("acme/a")
    assert info.resident_bytes == info.bytes == 4 * MiB + len(b'{"seed": 1}')
    assert resident(depot, "acme/a") == 4 * MiB  # measured apart from the preloader: really in RAM
    stats = preloader.stats()
    assert stats.models == 1 and stats.ram_bytes == info.bytes and stats.budget_bytes == 1 << 30
    preloader.close()


@pytest.mark.parametrize("strategy", ["read", "memfd"])
def test_a_private_copy_leaves_no_second_copy_in_the_page_cache(
    depot: Depot, tmp_path: Path, strategy: str
) -> None:
    """A `read` or `memfd` copy was read through the page cache, which kept the blob too: twice the RAM the
    tier counted, and never dropped (an explorer's trial). A blob that was in the cache before stays."""
    files = add_repo(depot, tmp_path, "a", 1)
    add_repo(depot, tmp_path, "b", 2)
    drop_page_cache(depot, "acme/a")
    drop_page_cache(depot, "acme/b")
    assert resident(depot, "acme/a") == resident(depot, "acme/b") == 0
    assert depot.file_path("acme/b", "model.safetensors").read_bytes()  # another reader warms b
    preloader = Preloader(depot, budget="1GiB", strategy=strategy)
    try:
        for name in ("a", "b"):
            assert preloader.preload(f"acme/{name}").resident_bytes == 4 * MiB + len(b'{"seed": 1}')
        assert resident(depot, "acme/a") == 0, "the copy is the model's one copy in RAM"
        assert resident(depot, "acme/b") == 4 * MiB, "the other reader's pages stay"
        with preloader.get("acme/a") as handle:
            assert bytes(handle.views["model.safetensors"]) == files["model.safetensors"]
    finally:
        preloader.close()


def test_a_model_preloaded_by_a_branch_follows_it_to_a_new_commit(depot: Depot, tmp_path: Path) -> None:
    """A pull moved main: the tier kept the commit it first found for good, counted in its budget, while loads
    of main read the new commit from disk (an explorer's trial). The new commit is preloaded, the old let
    go; a model asked by its commit id stays where it is."""
    add_repo(depot, tmp_path, "a", 1)
    add_repo(depot, tmp_path, "b", 3)
    first, pinned_b = depot.resolve("acme/a"), depot.resolve("acme/b")
    preloader = Preloader(depot, budget="1GiB")
    try:
        preloader.preload("acme/a")  # by main
        preloader.preload("acme/b", revision=pinned_b)  # by its commit id
        add_repo(depot, tmp_path / "again", "a", 2)  # main moves (as a pull of a new commit would)
        add_repo(depot, tmp_path / "again", "b", 4)
        second = depot.resolve("acme/a")
        assert second != first and depot.resolve("acme/b") != pinned_b

        def moved() -> bool:
            return {m.repo_id: m.commit_id for m in preloader.stats().preloaded} == {
                "acme/a": second,
                "acme/b": pinned_b,
            }

        wait_until(moved, 20, "the preload of main to follow it")
        assert resident(depot, "acme/a") == 4 * MiB
        assert preloader.holds("acme/a") and not preloader.holds("acme/a", revision=first)
    finally:
        preloader.close()


@pytest.mark.parametrize("tier", ["the depot's", "its own", "its own, of the depot's store"])
def test_a_tier_used_without_load_lets_go_of_what_another_process_removed(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tier: str
) -> None:
    """A worker that preloads and reads its models (no load()) kept a model another process removed: mapped,
    its disk space taken though `rm` said it was freed, its budget spent, and evict() refused it as "not in
    the store" (an explorer's trial). A tier of its own (Preloader(depot, ...)) did so even after the same
    process's remove(). And one of the depot's store (Preloader(depot.store, ...)) was not even kept from the
    disk budget's eviction."""
    import modeldepot.held

    add_repo(depot, tmp_path, "gone", 1)
    add_repo(depot, tmp_path, "kept", 2)
    tiers = {"the depot's": lambda: depot.preloader, "its own": lambda: Preloader(depot, budget="1GiB"),
             "its own, of the depot's store": lambda: Preloader(depot.store, budget="1GiB")}  # fmt: skip
    preloader = tiers[tier]()
    preloader.preload("acme/gone")
    preloader.preload("acme/kept")
    blob = depot.store.blobs.path(depot.file_info("acme/gone", "model.safetensors").sha256)
    with Depot(depot.home) as other:  # (another process's Depot: nothing of this one's memory)
        other.remove("acme/gone")
    assert not blob.exists()
    monkeypatch.setattr(modeldepot.held, "LOOK_EVERY", 0.0)
    depot._held._next_look = 0.0
    stats = preloader.stats()
    assert [m.repo_id for m in stats.preloaded] == ["acme/kept"] and stats.models == 1
    mapped = Path("/proc/self/maps").read_text()
    opened = [os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink()]
    assert str(blob) not in mapped and not any(str(blob) in path for path in opened), (
        "the removed blob's disk space is given back"
    )
    if tier != "the depot's":  # (kept from the disk budget's eviction, as the depot's own held models are)
        assert ("acme/kept", depot.resolve("acme/kept")) in depot._held.in_use()
        preloader.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_preload_of_a_model_removed_and_put_back_at_once_lets_the_old_file_go(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """Removed and imported again (the same commit) between two looks for removals: the index said the
    revision was whole, so the tier kept the deleted file mapped for good, its space taken (a trial). (And
    a look keeps what is whole: memfd copies were dropped at every look, a review.)"""
    import modeldepot.held

    add_repo(depot, tmp_path, "back", 1)
    depot.use_preloader(Preloader(depot, budget="1GiB", strategy=strategy))
    depot.preloader.preload("acme/back")
    monkeypatch.setattr(modeldepot.held, "LOOK_EVERY", 0.0)
    depot._held._next_look = 0.0
    assert depot.preloader.stats().models == 1, "a look keeps what is whole"
    blob = depot.store.blobs.path(depot.file_info("acme/back", "model.safetensors").sha256)
    with Depot(depot.home) as other:  # (another process's Depot)
        commit = other.resolve("acme/back")
        other.remove("acme/back")
        assert other.import_dir(tmp_path / "back", "acme/back").commit_id == commit
    depot._held._next_look = 0.0
    # (a private copy, read or memfd, let go of the file once made: it stays, the commit's bytes still)
    assert depot.preloader.stats().models == (0 if strategy in ("page-cache", "mmap") else 1)
    assert "(deleted)" not in "".join(
        line for line in Path("/proc/self/maps").read_text().splitlines() if str(blob) in line
    )
    assert depot.preloader.preload("acme/back").resident_bytes > 0  # (the file there now)


def test_a_preload_that_ends_after_its_tier_closed_lets_its_copy_go(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Depot closed (a server shutting down, a store reloaded) while a warm-up preload ran: the preload put
    its copy into the closed tier, where nothing could free it (memfd: the model's size in RAM for the life
    of the process). It is freed, the preload says the tier closed, and a preload after that is refused."""
    add_repo(depot, tmp_path, "a", 2)
    preloader = Preloader(depot, budget="1GiB", strategy="memfd")
    loaded, go_on, outcome = threading.Event(), threading.Event(), []
    load = preloader._load

    def load_then_wait(*args: Any) -> Any:
        model = load(*args)
        loaded.set()
        go_on.wait(10)
        return model

    monkeypatch.setattr(preloader, "_load", load_then_wait)

    def preload() -> None:
        try:
            outcome.append(preloader.preload("acme/a"))
        except Exception as error:
            outcome.append(error)

    def memfds() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:modeldepot")
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))  # fmt: skip

    worker = threading.Thread(target=preload)
    worker.start()
    assert loaded.wait(30) and memfds() >= 1
    preloader.close()
    go_on.set()
    worker.join(30)
    [failed] = outcome
    assert isinstance(failed, DepotError) and "closed" in str(failed), failed
    assert memfds() == 0, "the copy loaded into the closed tier was kept"
    with pytest.raises(DepotError, match="closed"):
        preloader.preload("acme/a")


def test_preloads_at_once_count_each_others_room(depot: Depot, tmp_path: Path) -> None:
    """Each preload saw only what was loaded: two at once both passed the room check and held private
    copies over the budget together, and the first was evicted as the second ended (a trial)."""
    for seed, name in enumerate(("one", "two")):
        add_repo(depot, tmp_path, name, seed)
    loading: list[int] = []
    peak = [0]

    class Watched(Preloader):
        def _load(self, *args: Any, **kwargs: Any) -> Any:
            loading.append(args[2])  # (the size)
            peak[0] = max(peak[0], sum(loading) + self._resident_total())
            time.sleep(0.2)  # (both would be loading at once)
            try:
                return super()._load(*args, **kwargs)
            finally:
                loading.remove(args[2])

    preloader = Watched(depot, budget=6 * MiB, strategy="read")
    barrier = threading.Barrier(2)

    def preload(name: str) -> None:
        barrier.wait()
        preloader.preload(f"acme/{name}")

    threads = [threading.Thread(target=preload, args=(name,)) for name in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] <= 6 * MiB, f"{peak[0]} bytes in RAM at once under a budget of {6 * MiB}"
    assert preloader.stats().evictions == 1 and len(preloader.stats().preloaded) == 1


def test_a_preload_beside_evictions_is_measured_held(depot: Depot, tmp_path: Path) -> None:
    """A preload measured its model outside the lock: another thread's eviction had closed its files (a
    raw OSError, EBADF, from a preload that had succeeded; 46 of 4,400 in a trial)."""
    add_repo(depot, tmp_path, "one", 1, size=256 * 1024)
    preloader = Preloader(depot, budget=8 * MiB, strategy="page-cache")
    errors: list[BaseException] = []
    stop = time.monotonic() + 1.5

    def preloading() -> None:
        while time.monotonic() < stop:
            try:
                preloader.preload("acme/one")
            except BaseException as error:  # (every failure is the finding)
                errors.append(error)

    def evicting() -> None:
        while time.monotonic() < stop:
            preloader.evict("acme/one")

    threads = [threading.Thread(target=preloading) for _ in range(2)] + [threading.Thread(target=evicting)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_preload_over_a_held_or_pinned_model_stays_as_it_returns(depot: Depot, tmp_path: Path) -> None:
    """The budget gives way to a held (or pinned) model: a preload measured while held evicted the model
    it had just loaded as it let go of it (a review)."""
    add_repo(depot, tmp_path, "a", 1)
    add_repo(depot, tmp_path, "b", 2)
    add_repo(depot, tmp_path, "c", 3)
    preloader = Preloader(depot, budget=6 * MiB, strategy="read")
    with preloader.get("acme/a"):
        assert not preloader.preload("acme/b").already
        assert preloader.holds("acme/b") and preloader.stats().evictions == 0
    preloader.pin("acme/b")
    assert not preloader.preload("acme/c").already and preloader.holds("acme/c")
    preloader.close()


def test_least_recently_used_models_go_when_the_budget_is_full(depot: Depot, tmp_path: Path) -> None:
    for seed, name in enumerate("abc"):
        add_repo(depot, tmp_path, name, seed)
    preloader = Preloader(depot, budget=9 * MiB)
    preloader.preload("acme/a")
    preloader.preload("acme/b")
    preloader.get("acme/a").release()  # a is now the most recently used
    preloader.preload("acme/c")  # 12 MiB > 9 MiB: b goes
    assert preloader.holds("acme/a") and preloader.holds("acme/c") and not preloader.holds("acme/b")
    assert resident(depot, "acme/b") < MiB, "evicting drops the pages, not just the mapping"
    stats = preloader.stats()
    assert stats.evictions == 1 and stats.ram_bytes <= 9 * MiB
    with pytest.raises(InvalidInputError, match="larger than the preload budget"):
        Preloader(depot, budget=MiB).preload("acme/a")
    preloader.close()


def test_a_held_handle_survives_eviction(depot: Depot, tmp_path: Path) -> None:
    files = add_repo(depot, tmp_path, "a", 1)
    preloader = Preloader(depot, budget="1GiB")
    with preloader.get("acme/a") as handle:
        assert preloader.evict("acme/a") and not preloader.holds("acme/a")
        assert bytes(handle.views["model.safetensors"]) == files["model.safetensors"]
        assert handle.paths["model.safetensors"].read_bytes()[:64] == files["model.safetensors"][:64]
    assert not preloader.evict("acme/a")
    stats = preloader.stats()
    assert (stats.hits, stats.misses, stats.models) == (0, 1, 0)
    preloader.close()


def open_paths() -> set[str]:
    """What this process's descriptors name now."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # (listdir's own, closed since)
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
    return paths


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_view_kept_past_its_handle_neither_breaks_eviction_nor_leaks(
    strategy: str, depot: Depot, tmp_path: Path
) -> None:
    """A caller keeps a slice of a view (numpy.frombuffer does) after its handle is released. Evicting the
    model raised BufferError out of an unrelated preload, left that preload's model marked as loading
    (the next call for it waited forever) and its blob's descriptor open. Eviction now goes on; the
    mapping goes when the view does, and what the view shows stays right."""
    files = {name: add_repo(depot, tmp_path, name, seed) for seed, name in enumerate("abc")}
    preloader = Preloader(depot, budget=9 * MiB, strategy=strategy)
    with preloader.get("acme/a") as handle:
        kept = handle.views["model.safetensors"][:16]
    blob = str(depot.store.blobs.path(depot.file_info("acme/a", "model.safetensors").sha256))
    preloader.preload("acme/b")
    preloader.preload("acme/c")  # a goes
    assert not preloader.holds("acme/a") and preloader.holds("acme/c")
    assert bytes(kept) == files["a"]["model.safetensors"][:16]
    kept.release()
    assert blob not in open_paths(), "the evicted model's blob stayed open once its last view went"
    done = threading.Event()
    threading.Thread(target=lambda: (preloader.preload("acme/a"), done.set()), daemon=True).start()
    assert done.wait(30), "a preload after the failed eviction waited forever"
    preloader.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_serves_the_right_bytes(strategy: str, depot: Depot, tmp_path: Path) -> None:
    files = add_repo(depot, tmp_path, "a", 3, size=MiB + 123)
    preloader = Preloader(depot, budget="1GiB", strategy=strategy)
    preloader.preload("acme/a")
    with preloader.get("acme/a") as handle:
        assert bytes(handle.views["model.safetensors"]) == files["model.safetensors"]
        assert handle.paths["model.safetensors"].read_bytes() == files["model.safetensors"]
        if strategy == "memfd":
            assert str(handle.paths["config.json"]).startswith("/proc/")
    assert preloader.stats().hits == 1
    preloader.close()
    with pytest.raises(ConfigError, match="strategy"):
        Preloader(depot, strategy="swap")


def _locked_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmLck:\s+(\d+) kB", status, re.M).group(1)) * 1024  # type: ignore[union-attr]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mlock_pins_or_says_why_not(depot: Depot, tmp_path: Path, strategy: str) -> None:
    """(`read` said locked=True and locked nothing: its copy is a buffer, not a mapping, a trial.)"""
    add_repo(depot, tmp_path, "a", 1, size=MiB)
    before = _locked_bytes()
    preloader = Preloader(depot, budget="1GiB", strategy=strategy, mlock=True)
    info = preloader.preload("acme/a")
    assert info.locked or "RLIMIT_MEMLOCK" in (info.lock_error or "")
    if info.locked:
        assert _locked_bytes() - before >= MiB, "locked, as it says"
    preloader.close()
    assert _locked_bytes() <= before, "and let go of when the tier closes"


LOCK_SOME = """
import re, sys
from pathlib import Path
from modeldepot import Depot
from modeldepot.preload import Preloader

def locked():
    return int(re.search(r"^VmLck:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))

with Depot(sys.argv[1]) as depot:
    preloader = Preloader(depot, budget="1GiB", strategy=sys.argv[2], mlock=True)
    before = locked()
    info = preloader.preload("acme/five")
    print(info.locked, locked() - before, info.lock_error)
    preloader.close()
"""


@pytest.mark.skipif(
    shutil.which("capsh") is None or os.geteuid() != 0, reason="drops CAP_IPC_LOCK with capsh"
)
@pytest.mark.parametrize("strategy", ["page-cache", "read"])
def test_mlock_refused_part_way_locks_nothing(home: Path, tmp_path: Path, strategy: str) -> None:
    """Five 1 MiB files under a 3 MiB memlock limit: the fourth is refused. The three locked before it stayed
    locked, the model said unlocked, and its pages taken from the limit for as long as it stayed (an
    explorer's trial): all or nothing."""
    files = {f"part-{i}.bin": random.Random(i).randbytes(MiB) for i in range(5)}
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "five", files), "acme/five")
    run = subprocess.run(
        ["capsh", "--drop=cap_ipc_lock", "--", "-c",
         f"ulimit -l 3072 && exec {sys.executable} -c '{LOCK_SOME}' {home} {strategy}"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    locked, more_locked, error = run.stdout.split(" ", 2)
    assert locked == "False" and "RLIMIT_MEMLOCK" in error
    assert int(more_locked) == 0, f"{more_locked} kB left locked by a model said unlocked"


def test_concurrent_preloads_of_one_model_load_it_once(
    depot: Depot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modeldepot.preload.preloader")
    add_repo(depot, tmp_path, "a", 1)
    preloader = Preloader(depot, budget="1GiB")
    start = threading.Barrier(8)
    results = []

    def call() -> None:
        start.wait()
        results.append(preloader.preload("acme/a"))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert caplog.text.count("preloaded acme/a") == 1
    assert sorted(r.already for r in results) == [False] + [True] * 7
    preloader.close()


def test_preload_async_leaves_the_event_loop_free(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = add_repo(depot, tmp_path, "a", 1, size=8 * MiB)
    drop_page_cache(depot, "acme/a")
    preloader = Preloader(depot, budget="1GiB", strategy="read")
    preload = preloader.preload
    answers: list[str] = []

    async def main() -> PreloadInfo:
        loop = asyncio.get_running_loop()

        async def probe() -> str:
            return "the loop ran a coroutine meanwhile"

        def preload_with_probe(repo_id: str, quant: str | None = None, revision: str = "main") -> PreloadInfo:
            # Inside the preload: run a coroutine on the loop and wait for it. Were the preload run on the
            # loop's own thread, the loop could not run it and this would time out.
            answers.append(asyncio.run_coroutine_threadsafe(probe(), loop).result(30))
            return preload(repo_id, quant, revision)

        monkeypatch.setattr(preloader, "preload", preload_with_probe)
        return await preloader.preload_async("acme/a")

    info = asyncio.run(main())
    assert answers == ["the loop ran a coroutine meanwhile"]
    assert info.repo_id == "acme/a" and info.bytes == sum(map(len, files.values()))
    with preloader.get("acme/a") as handle:
        assert bytes(handle.views["model.safetensors"]) == files["model.safetensors"]
    preloader.close()


def test_accesses_are_counted_persisted_and_drive_auto_preload(home: Path, tmp_path: Path) -> None:
    with Depot(home) as depot:
        for seed, name in enumerate("abc"):
            add_repo(depot, tmp_path, name, seed, size=MiB)
        for name, uses in (("a", 2), ("b", 5), ("c", 1)):
            for _ in range(uses):
                depot.get_file(f"acme/{name}", "model.safetensors")
    with Depot(home) as depot:  # counts survive a restart
        top = depot.store.access.top(3)
        assert [(a.repo_id, a.count) for a in top] == [("acme/b", 5), ("acme/a", 2), ("acme/c", 1)]
        preloader = Preloader(depot, budget="1GiB")
        done = preloader.auto_preload(2)
        assert [i.repo_id for i in done] == ["acme/b", "acme/a"]
        assert [m.repo_id for m in preloader.stats().most_accessed][:2] == ["acme/b", "acme/a"]
        depot.remove("acme/b")
        assert [i.repo_id for i in Preloader(depot, budget="1GiB").auto_preload(2)] == ["acme/a", "acme/c"]
        preloader.close()


def test_auto_preload_keeps_the_most_used_that_fit_together_and_skips_what_left(
    home: Path, tmp_path: Path
) -> None:
    """`--preload-top 3` under a budget for two preloaded the most used first, and each preload evicted the
    least recently preloaded: the most used went. And the uses of removed repos (never forgotten) took the
    places of the models there: four times N of them, and nothing was preloaded (a trial)."""
    with Depot(home) as depot:
        for seed, name in enumerate(("gone1", "gone2", "gone3", "gone4", "gone5", "m1", "m2", "m3")):
            add_repo(depot, tmp_path, name, seed, size=MiB)
        for name, uses in (("gone1", 30), ("gone2", 30), ("gone3", 30), ("gone4", 30), ("gone5", 30),
                           ("m1", 20), ("m2", 10), ("m3", 5)):  # fmt: skip
            for _ in range(uses):
                depot.get_file(f"acme/{name}", "model.safetensors")
        for name in ("gone1", "gone2", "gone3", "gone4", "gone5"):
            depot.remove(f"acme/{name}")
        preloader = Preloader(depot, budget=int(2.5 * MiB))
        try:
            done = preloader.auto_preload(3)
            assert [i.repo_id for i in done] == ["acme/m1", "acme/m2"]
            assert {key[0] for key in preloader.revisions()} == {"acme/m1", "acme/m2"}
            assert [m.repo_id for m in preloader.stats().most_accessed][:2] == ["acme/m1", "acme/m2"]
        finally:
            preloader.close()


def test_auto_preload_goes_on_past_a_model_found_corrupt_and_takes_it_once_repaired(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After a power loss the most used model's torn blob, found as `--preload-top` read it, stopped the
    preload of every model, its error lost in a future nobody looked at; repaired seconds later, the model
    stayed out of RAM until the next restart (an explorer's trial on an edge box). The others are
    preloaded, the skipped one is said, and it goes in once repaired."""
    from conftest import flip_byte
    from modeldepot.store import durability

    monkeypatch.setattr(durability.Durability, "_start", lambda self: None)  # (no background flush nor check)
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "before")
    with Depot(home) as depot:
        for seed, name in enumerate("ab"):
            add_repo(depot, tmp_path, name, seed, size=MiB)
        for name, uses in (("a", 2), ("b", 5)):
            for _ in range(uses):
                depot.get_file(f"acme/{name}", "model.safetensors")
        flip_byte(depot.store.blobs.path(depot.file_info("acme/b", "model.safetensors").sha256), 10)
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "after")
    with Depot(home) as depot:
        preloader = Preloader(depot, budget="1GiB")
        try:
            with caplog.at_level(logging.WARNING, logger="modeldepot.preload"):
                done = preloader.auto_preload_in_background(2).result(timeout=60)
            assert [i.repo_id for i in done] == ["acme/a"]
            assert "not preloading acme/b (safetensors) now: blob" in caplog.text
            assert preloader.evict("acme/a")  # (the operator's: kept so by a repair, review 41)
            depot.import_dir(tmp_path / "b", "acme/b")  # (repaired: as `serve --repair` pulls it again)
            preloader.preload_again_after_repair()
            wait_until(lambda: {key[0] for key in preloader.revisions()} == {"acme/b"}, 60,
                       "the repaired model preloaded, alone")  # fmt: skip
        finally:
            preloader.close()


def test_a_quant_read_through_the_file_api_is_the_one_auto_preload_takes(
    depot: Depot, tmp_path: Path
) -> None:
    """Reads of one quant's file (file_path, map_file: how llama.cpp users read it) counted a use of the
    whole repo: `--preload-top` took every quant, which did not fit, and preloaded nothing (a trial)."""
    files = {
        "config.json": b"{}",
        **{f"tiny-{q}.gguf": os.urandom(MiB) for q in ("Q4_K_M", "Q5_K_M", "Q8_0")},
    }
    depot.import_dir(write_model_dir(tmp_path / "g", files), "acme/tiny-GGUF")
    for _ in range(3):  # (with the config a loader reads beside: it comes with any quant, and counts none)
        depot.file_path("acme/tiny-GGUF", "tiny-Q4_K_M.gguf")
        with depot.map_file("acme/tiny-GGUF", "tiny-Q4_K_M.gguf"):
            pass
        depot.get_file("acme/tiny-GGUF", "config.json")
        depot.get_file("acme/tiny-GGUF", "config.json")
    preloader = Preloader(depot, budget=int(1.5 * MiB))
    try:
        assert [(i.repo_id, i.variant) for i in preloader.auto_preload(1)] == [("acme/tiny-GGUF", "Q4_K_M")]
    finally:
        preloader.close()


def test_variants_and_bad_names(depot: Depot, tmp_path: Path) -> None:
    files = {"onnx/model.onnx": b"x" * 1000, "onnx/model_q4.onnx": b"y" * 500, "config.json": b"{}"}
    depot.import_dir(write_model_dir(tmp_path / "v", files), "acme/v")
    preloader = Preloader(depot, budget="1GiB")
    info = preloader.preload("acme/v", "q4")
    assert (info.variant, info.files, info.bytes) == ("q4", 2, 502)
    with pytest.raises(NotFoundError, match="q8"):
        preloader.preload("acme/v", "q8")
    with pytest.raises(ValueError, match="repo"):
        preloader.preload("../etc")
    preloader.close()


def test_a_preloader_of_something_else_or_a_bad_count_is_a_clear_error(depot: Depot) -> None:
    """Preloader(None) was an AttributeError from inside, auto_preload("3") a TypeError, and
    auto_preload(-1) preloaded nothing, silently (an explorer's trial)."""
    for source in (None, "/tmp/models", 5):
        with pytest.raises(TypeError, match="Depot or its Store"):
            Preloader(source)
    with pytest.raises(ConfigError, match="mlock"):
        Preloader(depot, mlock="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="strategy"):
        Preloader(depot, strategy=None)  # type: ignore[arg-type]
    preloader = Preloader(depot.store, budget="1GiB")
    try:
        for count in (-1, "3", 1.5, True):
            with pytest.raises(InvalidInputError, match="number of models"):
                preloader.auto_preload(count)  # type: ignore[arg-type]
            with pytest.raises(InvalidInputError, match="number of models"):
                preloader.auto_preload_in_background(count)  # type: ignore[arg-type]
        assert preloader.auto_preload(0) == []
    finally:
        preloader.close()


def test_a_preload_that_meets_an_rm_as_it_resolves_keeps_no_model_of_no_file(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `rm` between the preload's resolve of the revision and its look at the files: the preload said it
    succeeded with 0 files and kept that model, and once the same files were imported again (the same
    commit), every get() handed out a handle with no file, for good (an explorer's stress run)."""
    folder = write_model_dir(tmp_path / "m", {"model.safetensors": b"w" * 5000, "config.json": b"{}"})
    depot.import_dir(folder, "acme/raced")
    resolve = depot.store.resolve

    def resolve_then_meet_an_rm(repo_id: str, revision: str = "main") -> str:
        monkeypatch.setattr(depot.store, "resolve", resolve)
        commit_id = resolve(repo_id, revision)
        depot.remove("acme/raced")
        return commit_id

    monkeypatch.setattr(depot.store, "resolve", resolve_then_meet_an_rm)
    preloader = Preloader(depot, budget="1GiB")
    try:
        with pytest.raises(NotFoundError, match="removed from the store meanwhile"):
            preloader.preload("acme/raced")
        assert not preloader.stats().preloaded
        depot.import_dir(folder, "acme/raced")
        with preloader.get("acme/raced") as held:
            assert bytes(held.views["model.safetensors"]) == b"w" * 5000
    finally:
        preloader.close()


def test_a_handle_dropped_unreleased_lets_go_of_its_model_with_a_warning(
    depot: Depot, tmp_path: Path
) -> None:
    """A request that failed between get() and release(): the handle's hold stayed for the life of the process,
    the model over the RAM budget and its revision kept from the disk budget (an explorer's trial)."""
    import gc

    depot.import_dir(write_model_dir(tmp_path / "m", {"model.safetensors": b"w" * 5000}), "acme/dropped")
    preloader = Preloader(depot, budget="1GiB")
    try:

        def failing_request() -> None:
            handle = preloader.get("acme/dropped")
            assert handle.views
            raise RuntimeError("the request failed before release()")

        with pytest.warns(ResourceWarning, match="dropped without release"):  # noqa: PT031
            with pytest.raises(RuntimeError):
                failing_request()
            gc.collect()
        # Let go of at the preloader's next call, outside its lock: the collector runs the finalizer inside
        # whatever code allocates, the preloader's own loops over its models among them (a review)
        assert preloader.revisions(gives_way=False) == {("acme/dropped", depot.resolve("acme/dropped"))}
        assert preloader.stats().preloaded
        assert preloader.revisions(gives_way=False) == set()
        with preloader.get(
            "acme/dropped"
        ) as held:  # (a handle released is not released twice when collected)
            assert bytes(held.views["model.safetensors"]) == b"w" * 5000
        del held
        gc.collect()
        assert preloader.revisions(gives_way=True) == {("acme/dropped", depot.resolve("acme/dropped"))}
    finally:
        preloader.close()
    with pytest.raises(DepotError, match="closed"):
        preloader.auto_preload_in_background(1)


def test_a_budget_of_another_type_is_a_clear_error() -> None:
    for bad in (1.5, None, True):
        with pytest.raises(ConfigError, match="preload budget"):
            parse_budget(bad)  # type: ignore[arg-type]


def test_budgets_parse() -> None:
    assert parse_budget("1GiB") == 1 << 30 and parse_budget(123) == 123
    assert parse_budget("1.5GiB") == 3 << 29, "as MODELDEPOT_MAX_SIZE=1.5TiB is (it was refused here)"
    assert 0 < parse_budget("50%") < parse_budget("100%")
    for bad in ("0%", "150%", "lots", "x%", 0, "1.5.5GiB", "0.1"):
        with pytest.raises(
            ConfigError, match=r"preload budget .*--preload-budget, MODELDEPOT_PRELOAD_BUDGET"
        ):
            parse_budget(bad)
    # More bytes than the machine's RAM, as "150%" is: a budget that would never evict
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert parse_budget(ram) == parse_budget("100%")
    for too_much in (ram + 1, 2**80, "64TiB"):
        with pytest.raises(
            ConfigError, match=r"more than the RAM this process may use .*: give 100% at most"
        ):
            parse_budget(too_much)


class PreloaderMachine(RuleBasedStateMachine):
    """Random preloads, gets, releases, pins and evictions: the resident total stays within the budget
    whenever something could still be evicted, and every handle reads the right bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="preload-machine-"))
        self.depot = Depot(self.tmp / "store")
        self.files = {
            name: add_repo(self.depot, self.tmp, name, seed, size=MiB) for seed, name in enumerate("abcd")
        }
        self.preloader = Preloader(self.depot, budget=int(2.5 * MiB))
        self.handles: list[PreloadHandle] = []

    @rule(name=st.sampled_from("abcd"))
    def preload(self, name: str) -> None:
        self.preloader.preload(f"acme/{name}")

    @rule(name=st.sampled_from("abcd"))
    def get(self, name: str) -> None:
        handle = self.preloader.get(f"acme/{name}")
        assert bytes(handle.views["model.safetensors"][:64]) == self.files[name]["model.safetensors"][:64]
        self.handles.append(handle)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        handle = self.handles.pop(data.draw(st.integers(0, len(self.handles) - 1)))
        handle.release()

    @rule(name=st.sampled_from("abcd"), pinned=st.booleans())
    def pin(self, name: str, pinned: bool) -> None:
        if self.preloader.holds(f"acme/{name}"):
            self.preloader.pin(f"acme/{name}", pinned=pinned)

    @rule(name=st.sampled_from("abcd"))
    def evict(self, name: str) -> None:
        self.preloader.evict(f"acme/{name}")

    @invariant()
    def within_budget_unless_everything_is_held(self) -> None:
        models = list(self.preloader._models.values())
        newest = max(models, key=lambda m: m.loaded_at, default=None)  # never evicted by its own arrival
        if any(m.holders == 0 and not m.pinned and m is not newest for m in models):
            assert sum(self.preloader._resident(m) for m in models) <= self.preloader.budget

    def teardown(self) -> None:
        for handle in self.handles:
            handle.release()
        self.preloader.close()
        self.depot.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


TestPreloaderMachine = PreloaderMachine.TestCase
TestPreloaderMachine.settings = settings(max_examples=15, stateful_step_count=25, deadline=None)


def test_removing_a_preloaded_repo_lets_go_of_its_ram_and_its_disk_space(
    depot: Depot, tmp_path: Path
) -> None:
    """A removed repo's preload kept its deleted blobs mapped: the space came back only when the node
    stopped, and the RAM tier (and /metrics) still counted it."""
    add_repo(depot, tmp_path, "a", 1)
    add_repo(depot, tmp_path, "b", 2)
    blob = str(depot.store.blobs.path(depot.file_info("acme/a", "model.safetensors").sha256))
    depot.preloader.preload("acme/a")
    depot.preloader.preload("acme/b")
    with depot.preloader.get("acme/a"):  # a holder keeps it until it lets go, no longer
        depot.remove("acme/a")
        assert [m.repo_id for m in depot.preloader.stats().preloaded] == ["acme/b"]
        assert blob in Path("/proc/self/maps").read_text(), "still mapped for its holder"
    maps = Path("/proc/self/maps").read_text()
    assert blob not in maps, "the deleted blob is no longer mapped: its space is back"
    assert depot.preloader.holds("acme/b")


def test_a_repo_removed_while_it_is_being_preloaded_is_not_kept(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal that came while a preload read the files was missed: the preload finished, kept the deleted
    blobs mapped (their space taken) and counted them in the RAM tier."""
    add_repo(depot, tmp_path, "a", 1)
    blob = str(depot.store.blobs.path(depot.file_info("acme/a", "model.safetensors").sha256))
    preloader = depot.preloader
    load = preloader._load

    def load_then_removed(*args: Any) -> Any:
        model = load(*args)  # its files mapped; the removal comes before the preload keeps them
        depot.remove("acme/a")
        return model

    monkeypatch.setattr(preloader, "_load", load_then_removed)
    with pytest.raises(NotFoundError, match="removed from the store while it was being preloaded"):
        preloader.preload("acme/a")
    assert not preloader.stats().preloaded and preloader.revisions() == set()
    assert blob not in Path("/proc/self/maps").read_text(), "the deleted blob is not kept mapped"
    monkeypatch.setattr(preloader, "_load", load)
    add_repo(depot, tmp_path, "a", 2)
    assert preloader.preload("acme/a").repo_id == "acme/a", "nothing of the abandoned load stays in the way"


def test_a_blob_preloaded_by_two_models_counts_once(depot: Depot, tmp_path: Path) -> None:
    """A repo preloaded whole and then as its one variant counted its 4 MiB twice (ram_bytes, /metrics), and
    the budget made room for the second by evicting the first, which held the same pages."""
    files = {"model.safetensors": random.Random(5).randbytes(4 * MiB), "config.json": b"{}"}
    depot.import_dir(write_model_dir(tmp_path / "s", files), "acme/s")
    size = 4 * MiB + 2
    preloader = Preloader(depot, budget=size + MiB)
    preloader.preload("acme/s")
    preloader.preload("acme/s", "safetensors")
    stats = preloader.stats()
    assert {m.variant for m in stats.preloaded} == {"", "safetensors"} and stats.evictions == 0
    assert stats.ram_bytes == size and all(m.resident_bytes == size for m in stats.preloaded)
    preloader.close()


def test_two_paths_of_one_blob_count_once_against_the_budget(depot: Depot, tmp_path: Path) -> None:
    """A model whose two files hold the same bytes (one blob: 4 MiB of RAM) was refused under a budget of 6
    MiB as "larger than the preload budget" (8 MiB), and said 8 MiB resident."""
    data = random.Random(6).randbytes(4 * MiB)
    depot.import_dir(write_model_dir(tmp_path / "d", {"model.safetensors": data, "copy/model.safetensors": data}),
                     "acme/dup")  # fmt: skip
    preloader = Preloader(depot, budget=6 * MiB)
    info = preloader.preload("acme/dup")
    assert info.resident_bytes == 4 * MiB and preloader.stats().ram_bytes == 4 * MiB
    preloader.close()
    copies = Preloader(depot, budget=6 * MiB, strategy="read")  # (private copies: each file its own memory)
    with pytest.raises(InvalidInputError, match="larger than the preload budget"):
        copies.preload("acme/dup")
    copies.close()


POPULATE_TRUNCATED = """
import errno, mmap, os, sys
from modeldepot.preload.residency import populate
fd = os.open(sys.argv[1], os.O_RDONLY)
mapping = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
os.truncate(sys.argv[2], 0)  # the other name of the same file (a Hugging Face cache's), truncated
try:
    populate(mapping, len(mapping))
except OSError as error:
    print("refused", errno.errorcode[error.errno])
"""


def test_populating_a_file_truncated_through_another_name_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """MADV_POPULATE_READ's EFAULT (the mapping runs past the file's end) was taken for an older kernel, and
    the pages were touched one by one: SIGBUS killed the node preloading an adopted blob."""
    blob, other = tmp_path / "blob", tmp_path / "hf-cache-blob"
    blob.write_bytes(os.urandom(4 * MiB))
    os.link(blob, other)
    done = subprocess.run([sys.executable, "-c", POPULATE_TRUNCATED, str(blob), str(other)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, "refused EFAULT"), (done.returncode, done.stderr)


def test_a_node_lets_go_of_what_another_process_removed(depot: Depot, tmp_path: Path) -> None:
    """`modeldepot rm` beside a running node removed a repo the node had preloaded: the node kept the deleted
    blobs mapped (their space taken) and counted them in RAM until it stopped."""
    from conftest import LiveNode, wait_until

    add_repo(depot, tmp_path, "a", 1)
    add_repo(depot, tmp_path, "b", 2)
    blob = str(depot.store.blobs.path(depot.file_info("acme/a", "model.safetensors").sha256))
    node = LiveNode(depot)
    try:
        depot.preloader.preload("acme/a")
        depot.preloader.preload("acme/b")
        with Depot(depot.home) as beside:  # (another process's Depot: nothing of the node's memory)
            beside.remove("acme/a")
        wait_until(lambda: blob not in Path("/proc/self/maps").read_text(), timeout=10)
        assert [m.repo_id for m in depot.preloader.stats().preloaded] == ["acme/b"]
    finally:
        node.stop()


def test_removing_one_variant_lets_go_of_its_preload_only_here_and_beside_a_node(
    depot: Depot, tmp_path: Path
) -> None:
    """`rm --quant` left the removed variant mapped in a node beside it (its revision stayed whole, so the
    node's look for removed revisions saw nothing: the space was not given back), and in its own process
    dropped the preloads of the variants that stayed too."""
    from conftest import LiveNode, wait_until

    rng = random.Random(9)
    files = {name: rng.randbytes(MiB) for name in ("m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-F16.gguf")}
    depot.import_dir(write_model_dir(tmp_path / "g", files), "acme/m-GGUF")
    blob = {name: str(depot.store.blobs.path(depot.file_info("acme/m-GGUF", name).sha256)) for name in files}
    for quant in ("Q4_K_M", "Q8_0", "F16"):
        depot.preloader.preload("acme/m-GGUF", quant)
    depot.remove("acme/m-GGUF", quant="F16")  # in this process
    assert {m.variant for m in depot.preloader.stats().preloaded} == {"Q4_K_M", "Q8_0"}
    assert blob["m-F16.gguf"] not in Path("/proc/self/maps").read_text()
    node = LiveNode(depot)
    try:
        with Depot(depot.home) as beside:  # (another process's Depot: nothing of the node's memory)
            beside.remove("acme/m-GGUF", quant="Q8_0")
        wait_until(lambda: blob["m-Q8_0.gguf"] not in Path("/proc/self/maps").read_text(), timeout=10)
        assert {m.variant for m in depot.preloader.stats().preloaded} == {"Q4_K_M"}
        assert blob["m-Q4_K_M.gguf"] in Path("/proc/self/maps").read_text()
    finally:
        node.stop()


def test_threads_first_use_of_the_ram_tier_makes_one(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight threads reach for ``depot.preloader`` at once (their first ``load()`` or preload). Each
    made its own tier: the last one stayed, the others' models were held by no one the store or the
    budget knew of, and ``close()`` never let go of them."""
    import modeldepot.preload as preload_package

    class SlowToMake(Preloader):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.05)  # the window between the look and the assignment, made wide
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(preload_package, "Preloader", SlowToMake)
    start, seen = threading.Barrier(8), []

    def first_use() -> None:
        start.wait()
        seen.append(depot.preloader)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(preloader) for preloader in seen}) == 1


def test_a_release_and_repeated_stats_do_not_measure_the_whole_tier_again(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A measure walks the page cache (0.1 s a GiB): every load's release measured the whole tier under the
    # tier's lock, and so did every stats call (every dashboard poll, every metrics scrape), twice.
    from modeldepot.preload import copies

    for seed, name in enumerate("ab"):
        add_repo(depot, tmp_path, name, seed)
    preloader = Preloader(depot, budget="1GiB")
    preloader.preload("acme/a")
    preloader.preload("acme/b")
    measured: list[int] = []
    real = copies.resident_bytes
    monkeypatch.setattr(copies, "resident_bytes", lambda fd, size: measured.append(size) or real(fd, size))
    for _ in range(20):
        preloader.get("acme/a").release()
    assert measured == [], "a release within the budget measures nothing"
    stats = preloader.stats()
    once = len(measured)
    assert (
        stats.ram_bytes == sum(m.resident_bytes for m in stats.preloaded) and once <= 4
    )  # (2 models x 2 files)
    for _ in range(10):
        assert preloader.stats().ram_bytes == stats.ram_bytes
    assert len(measured) == once, "stats within a second of the last measure read it again"
    preloader.evict("acme/b")
    assert preloader.stats().models == 1 and len(measured) > once, "the models changed: measured again"
    preloader.close()


AS_ANOTHER_USER = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="reads a file of another user: as root, with setpriv",
)
ANOTHER_USERS_RAM = """
import json, sys
from modeldepot import Depot
from modeldepot.preload import Preloader, resident_in_ram
with Depot(sys.argv[1]) as depot:
    in_ram, size = resident_in_ram(depot.store, "acme/a", check=False)
    preloader = Preloader(depot, budget="1GiB")
    info = preloader.preload("acme/a")
    print(json.dumps({"in_ram": in_ram, "size": size, "preloaded": info.resident_bytes,
                      "tier": preloader.stats().ram_bytes}))
    preloader.close()
"""


@AS_ANOTHER_USER
def test_the_ram_of_another_users_blobs_is_unknown_not_whole(home: Path, tmp_path: Path) -> None:
    """mincore tells a process the page cache of a file it owns or may write; of any other it says every page
    is resident (the kernel's side-channel rule). `stats` said 100% in RAM of a shared or another user's
    store that nothing had read since a reboot; a preload of it counted what the kernel hid."""
    from conftest import WITHOUT_OVERRIDE
    from fleetnodes import base_env

    with Depot(home) as depot:
        add_repo(depot, tmp_path, "a", 7)
        depot.get_file("acme/a", "model.safetensors")  # (a use: listed by stats)
        add_repo(depot, tmp_path, "b", 8)  # (never used: an admin's preload, say)
        depot.sync()
        size = sum(entry.size for entry in depot.list_files("acme/a"))
        drop_page_cache(depot, "acme/a")
        for blob in (home / "blobs").rglob("*"):
            os.chown(blob, 12345, 12345, follow_symlinks=False)  # (0444: readable, not writable, by others)
    env = base_env(PYTHONDONTWRITEBYTECODE="1", MODELDEPOT_CHUNK_SIZE=str(16 * MiB))  # (the store's own)
    done = subprocess.run([*WITHOUT_OVERRIDE, sys.executable, "-c", ANOTHER_USERS_RAM, str(home)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["size"] == size and seen["in_ram"] is None, seen
    # The preload's own mappings hold every page: counted from them, whatever the kernel hides of the file.
    assert seen["preloaded"] == seen["tier"] == size, seen
    with Depot(home) as depot:
        drop_page_cache(depot, "acme/a")
    table = subprocess.run([*WITHOUT_OVERRIDE, sys.executable, "-m", "modeldepot", "stats", "--home", str(home)],
                           env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "acme/a" in table.stdout and "unknown" in table.stdout and "(100%)" not in table.stdout, (
        table.stdout
    )
    assert "acme/b" in table.stdout and "none is in RAM" not in table.stdout, table.stdout


def test_a_mappings_resident_pages_are_counted_from_its_page_table(tmp_path: Path) -> None:
    """The measure for blobs whose page cache the kernel hides: the present pages of the preload's own
    mapping. It follows the pages in and out (MADV_PAGEOUT reclaims the mapping's clean pages)."""
    import mmap

    from modeldepot.preload.residency import mapped_resident_bytes, populate

    path = tmp_path / "blob"
    path.write_bytes(random.Random(3).randbytes(4 * MiB + 100))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size = os.fstat(fd).st_size
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        assert mapped_resident_bytes(mapping, size) == 0
        populate(mapping, size)
        assert mapped_resident_bytes(mapping, size) == size
        assert resident_bytes(fd, size) == size
        try:
            mapping.madvise(21)  # MADV_PAGEOUT (Linux 5.4)
        except OSError:
            pytest.skip("MADV_PAGEOUT is not known to this kernel")
        assert mapped_resident_bytes(mapping, size) < MiB
        mapping.close()
    finally:
        os.close(fd)


def test_a_forked_worker_reads_its_memfd_copy_by_its_path_whatever_the_parent_does_after(
    depot: Depot, tmp_path: Path
) -> None:
    """A worker forked after a memfd preload read the model's path as /proc/<parent>/fd/N: once the parent let the
    model go and preloaded another into the same fd number, the worker read the other model's bytes (a trial)."""
    first = add_repo(depot, tmp_path, "first", 1, MiB)
    add_repo(depot, tmp_path, "second", 2, MiB)
    preloader = Preloader(depot, budget="1GiB", strategy="memfd")
    try:
        with preloader.get("acme/first") as handle:
            path = handle.paths["model.safetensors"]
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:  # (the worker: reads once the parent has moved on)
            try:
                os.close(writer)
                os.read(reader, 1)
                same = Path(path).read_bytes() == first["model.safetensors"]
                os._exit(0 if same else 3)
            except BaseException:
                os._exit(4)
        os.close(reader)
        preloader.evict("acme/first")
        preloader.preload("acme/second")
        os.write(writer, b"x")
        os.close(writer)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the worker read another model's bytes"
    finally:
        preloader.close()


def test_a_model_asked_by_its_commit_id_too_stays_when_its_branch_moves(depot: Depot, tmp_path: Path) -> None:
    """Asked by its commit id (an operator keeps that exact commit in RAM) and by main while main named it:
    main moved, and the commit-id model went with the follow (a review). Both are in RAM."""
    add_repo(depot, tmp_path, "a", 1)
    first = depot.resolve("acme/a")
    preloader = Preloader(depot, budget="1GiB")
    try:
        preloader.preload("acme/a", revision=first)  # kept by its commit id
        preloader.preload("acme/a")  # main (the same commit, the same model): a load of main asks it so
        add_repo(depot, tmp_path / "again", "a", 2)  # main moves
        second = depot.resolve("acme/a")
        preloader.store.held_models.let_go_of_removed()  # (the depot's look, every 2 s of use)
        wait_until(lambda: preloader.holds("acme/a", revision=second), 20, "main's new commit preloaded")
        commits = sorted(m.commit_id[:8] for m in preloader.stats().preloaded)
        assert preloader.holds("acme/a", revision=first), f"the commit-id preload went: in RAM {commits}"
    finally:
        preloader.close()


def test_a_follow_that_cannot_succeed_is_not_tried_again_for_that_commit(
    depot: Depot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """main moved to a commit larger than the budget: each look (every 2 s of a serving node's life) started
    the follow again, and logged a warning, for ever (a review). Once for that commit."""
    add_repo(depot, tmp_path, "a", 1)
    preloader = Preloader(depot, budget=6 * MiB)
    try:
        preloader.preload("acme/a")
        add_repo(depot, tmp_path / "again", "a", 2, size=8 * MiB)  # main moves to a commit over the budget
        caplog.set_level(logging.WARNING, logger="modeldepot.preload.preloader")
        started = 0
        for _ in range(5):
            started += preloader.follow_branches()
            wait_until(lambda: not preloader._following, 20, "the follow to end")
        warnings = [r for r in caplog.records if "its preload failed" in r.getMessage()]
        assert started <= 1 and len(warnings) <= 1, (started, len(warnings), warnings[0].getMessage())
    finally:
        preloader.close()


def test_a_follow_lets_the_old_commit_go_before_it_makes_room(depot: Depot, tmp_path: Path) -> None:
    """Room for two models: a (used lately) and b. main of a moved: the follow loaded a's new commit beside
    its old one, which evicted b, then let the old a go: b was lost for nothing (a review)."""
    add_repo(depot, tmp_path, "a", 1)
    add_repo(depot, tmp_path, "b", 3)
    preloader = Preloader(depot, budget=9 * MiB)
    try:
        preloader.preload("acme/a")
        preloader.preload("acme/b")
        with preloader.get("acme/a"):  # a is used: b is now the least recently used
            pass
        add_repo(depot, tmp_path / "again", "a", 2)
        second = depot.resolve("acme/a")
        assert preloader.follow_branches() == 1
        wait_until(lambda: not preloader._following, 20, "the follow to end")
        held = sorted((m.repo_id, m.commit_id[:8]) for m in preloader.stats().preloaded)
        assert preloader.holds("acme/a", revision=second)
        assert preloader.holds("acme/b"), (
            f"b was evicted for the follow: in RAM {held}, evictions {preloader.stats().evictions}"
        )
    finally:
        preloader.close()


def test_unloading_by_a_branch_that_moved_takes_out_what_it_preloaded(depot: Depot, tmp_path: Path) -> None:
    """A model preloaded by main, main moved since: an unload by main (DELETE .../preload) answered "unloaded":
    false and left the old commit in RAM, where the next look moved it on (a review)."""
    add_repo(depot, tmp_path, "a", 1)
    preloader = Preloader(depot, budget="1GiB")
    try:
        preloader.preload("acme/a")
        add_repo(depot, tmp_path / "again", "a", 2)
        assert preloader.evict("acme/a") is True
        wait_until(lambda: not preloader._following, 20, "no follow")
        assert preloader.stats().models == 0 and preloader.stats().evictions == 0
    finally:
        preloader.close()


def test_an_unload_while_a_follow_loads_lets_the_new_commit_go(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main moved and the tier loads its new commit: an unload by main then found nothing in RAM (the old
    commit let go, the new one not landed), answered false, and the new commit landed after it (a review).
    The unload says it unloaded, and the new commit goes as it lands."""
    add_repo(depot, tmp_path, "a", 1)
    preloader = Preloader(depot, budget="1GiB")
    try:
        preloader.preload("acme/a")
        add_repo(depot, tmp_path / "again", "a", 2)
        second = depot.resolve("acme/a")
        loading, go_on = _held_back_loads(monkeypatch, second)  # (the follow's, until the unload answered)
        assert preloader.follow_branches() == 1
        assert loading.wait(20), "the follow did not load the new commit"
        assert preloader.evict("acme/a") is True
        go_on.set()
        wait_until(lambda: not preloader._following, 20, "the follow to end")
        assert preloader.stats().models == 0, [m.commit_id[:8] for m in preloader.stats().preloaded]
    finally:
        go_on.set()
        preloader.close()


def _held_back_loads(monkeypatch: pytest.MonkeyPatch, commit: str) -> tuple[threading.Event, threading.Event]:
    """Loads of all of ``commit``'s files wait, once begun, until the second event is set."""
    loading, go_on = threading.Event(), threading.Event()
    load = Preloader._load

    def held_back(self: Preloader, key: Any, *args: Any) -> Any:
        if key[1] == commit and key[2] == "":
            loading.set()
            go_on.wait(20)
        return load(self, key, *args)

    monkeypatch.setattr(Preloader, "_load", held_back)
    return loading, go_on


def test_an_unload_during_a_follow_lets_only_the_followed_model_go(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follow of an unloaded model let its new commit go by evicting every model of that commit: a variant
    someone preloaded by the commit id and pinned went with it (a review)."""
    rng = random.Random(11)

    def commit(seed: int) -> str:
        files = {name: rng.randbytes(MiB) for name in ("m-Q4_K_M.gguf", "m-Q8_0.gguf")}
        depot.import_dir(write_model_dir(tmp_path / f"g{seed}", files), "acme/m-GGUF")
        return depot.resolve("acme/m-GGUF")

    first = commit(1)
    preloader = Preloader(depot, budget="1GiB")
    try:
        preloader.preload("acme/m-GGUF")  # every file, by main
        second = commit(2)  # main moves
        preloader.preload("acme/m-GGUF", "Q8_0", second)  # by its commit id, and pinned
        preloader.pin("acme/m-GGUF", "Q8_0", second)
        loading, go_on = _held_back_loads(monkeypatch, second)
        assert preloader.follow_branches() == 1
        assert loading.wait(20), "the follow did not load the new commit"
        assert preloader.evict("acme/m-GGUF", revision=first) is True  # (the followed model, by its commit)
        go_on.set()
        wait_until(lambda: not preloader._following, 20, "the follow to end")
        left = {(m.variant, m.commit_id) for m in preloader.stats().preloaded}
        assert left == {("Q8_0", second)}, left
    finally:
        go_on.set()
        preloader.close()


def test_a_preload_asked_after_an_unload_during_a_follow_keeps_what_lands(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unloaded while the follow loaded, then preloaded again by its branch (it waited for the load in flight
    and answered preloaded): the follow let the model go as it landed (a review). A new ask keeps it."""
    add_repo(depot, tmp_path, "a", 1)
    preloader = Preloader(depot, budget="1GiB")
    try:
        preloader.preload("acme/a")
        add_repo(depot, tmp_path / "again", "a", 2)
        second = depot.resolve("acme/a")
        loading, go_on = _held_back_loads(monkeypatch, second)
        answered = threading.Event()
        release = Preloader._release

        def after_the_ask(self: Preloader, *args: Any, **kwargs: Any) -> None:
            if threading.current_thread().name not in ("ask", "MainThread"):
                answered.wait(20)  # (the follow's thread goes on once the new ask was answered)
            release(self, *args, **kwargs)

        monkeypatch.setattr(Preloader, "_release", after_the_ask)
        assert preloader.follow_branches() == 1
        assert loading.wait(20)
        assert preloader.evict("acme/a") is True
        answers: list[PreloadInfo] = []

        def ask() -> None:
            answers.append(preloader.preload("acme/a"))
            answered.set()

        again = threading.Thread(target=ask, name="ask")
        again.start()  # (it waits for the load in flight)
        wait_until(lambda: not preloader._unfollowed, 20, "the new ask to be seen")
        go_on.set()
        again.join(30)
        wait_until(lambda: not preloader._following, 20, "the follow to end")
        assert answers and answers[0].commit_id == second
        assert preloader.holds("acme/a"), "preload() answered preloaded, and the follow let the model go"
    finally:
        go_on.set(), answered.set()
        preloader.close()
