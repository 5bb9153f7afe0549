"""The disk budget with writers in several processes: the room a write holds goes as it publishes, and a
pull cancelled while it makes room holds none after."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_CHUNK, LiveNode, store_files_consistent, write_model_dir
from modeldepot import Depot
from modeldepot.errors import StoreError
from test_budget import MB, model, refused_while_publishing, repos


@contextlib.contextmanager
def hub_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo_id: str, size: int
) -> Iterator[tuple[Depot, LiveNode]]:
    """A node holding ``repo_id`` (a model of ``size`` bytes), named by HF_ENDPOINT, no disk budget here."""
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as hub:
        hub.import_dir(model(tmp_path, repo_id, size=size), repo_id)
        node = LiveNode(hub)
        try:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.delenv("MODELDEPOT_MAX_SIZE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", node.url)
            yield hub, node
        finally:
            node.stop()


def test_a_published_write_still_holds_its_room_and_another_process_evicts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between its publish and keep_within a writer's bytes are counted twice by every other process: once
    as blobs in the index (used_bytes) and once as its reservation file. 2 MiB + 2 MiB fit in a 5 MiB
    budget, yet the second import (another Depot = another process) evicts the model the first one has
    just published (and import_dir of it returned normally)."""
    from modeldepot.store import importer

    monkeypatch.delenv("MODELDEPOT_MAX_SIZE", raising=False)
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as first, Depot(home, chunk_size=SMALL_CHUNK) as second:
        first.set_max_size("5MiB")
        publishing = importer.publish
        raced: list[str] = []

        def publish_then_the_other_writes(*args: object, **kwargs: object) -> object:
            new = publishing(*args, **kwargs)  # type: ignore[arg-type]
            if not raced:  # (a window of a pull: run.release, swarm releases, access flush, status write)
                raced.append("y")
                second.import_dir(model(tmp_path, "acme/y", size=2 * MB), "acme/y")
            return new

        monkeypatch.setattr(importer, "publish", publish_then_the_other_writes)
        first.import_dir(model(tmp_path, "acme/x", size=2 * MB), "acme/x")
        assert raced == ["y"]
        # 4 MiB and a little in a 5 MiB budget: nothing had to go
        assert repos(first) == {"acme/x", "acme/y"}, "x, just published, was evicted for y"
        assert first.budget_status().evictions == 0


def test_an_import_of_contents_the_store_holds_keeps_them_from_another_processs_eviction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import of a folder whose contents the store holds (here the repo acme/twin, imported again under
    another name) relies on those blobs, and asks no room for them. Only its own process knew: another
    process's import evicted acme/twin for its room, and the first import, which had the bytes staged,
    placed them again with no room asked: the store ended over its budget, with nothing left to evict (an
    explorer's trial: 330 MiB of 300 MiB). Both cannot fit: the second import is refused, naming nothing
    it could evict, and the store stays within its budget."""

    monkeypatch.delenv("MODELDEPOT_MAX_SIZE", raising=False)
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as first, Depot(home, chunk_size=SMALL_CHUNK) as second:
        first.set_max_size("3.5MiB")
        twin = model(tmp_path, "acme/twin", size=2 * MB)
        first.import_dir(twin, "acme/twin")
        refused = refused_while_publishing(monkeypatch, second, tmp_path)
        result = first.import_dir(twin, "acme/copy")
        assert refused, "the second import was never tried"
        assert result.new_blobs == 0, "the contents it found in the store were placed again"
        assert repos(first) == {"acme/twin", "acme/copy"}
        assert first.budget_status().used_bytes <= int(3.5 * MB)
        assert not list((home / "locks" / "reservations").iterdir()), (
            "the reservations went with their writers"
        )
        assert first.verify().ok and store_files_consistent(first) == []


def test_gc_in_another_process_leaves_the_blobs_an_import_relies_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget lowered in another process evicts acme/twin, but leaves the blob an import under way found
    there (nothing else of the store names it then); a gc beside took it all the same, and the import
    copied it in again. gc keeps what a write under way relies on, in any process."""
    from modeldepot.store import importer

    monkeypatch.delenv("MODELDEPOT_MAX_SIZE", raising=False)
    home = tmp_path / "store"
    weights = np.random.default_rng(7).bytes(2 * MB)
    twin = write_model_dir(tmp_path / "twin", {"model.safetensors": weights, "extra.bin": b"x" * MB})
    copy = write_model_dir(tmp_path / "copy", {"model.safetensors": weights})
    with Depot(home, chunk_size=SMALL_CHUNK) as first, Depot(home, chunk_size=SMALL_CHUNK) as second:
        first.import_dir(twin, "acme/twin")
        publishing = importer.publish
        collected: list[int] = []

        def publish_after_the_other_collected(*args: object, **kwargs: object) -> object:
            if not collected:
                evicted = second.set_max_size("2.5MiB")
                assert [e.repo_id for e in evicted] == ["acme/twin"]
                collected.append(second.gc().blobs_removed)
            return publishing(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(importer, "publish", publish_after_the_other_collected)
        result = first.import_dir(copy, "acme/copy")
        assert collected == [0], "gc removed a blob"
        assert result.new_blobs == 0, "the blob it relied on was collected and copied in again"
        assert repos(first) == {"acme/copy"}
        assert first.verify().ok and store_files_consistent(first) == []


def test_a_pull_cancelled_while_it_makes_room_leaks_its_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pull.py runs writer.make_room in asyncio.to_thread: a pull cancelled while it waits there (for
    budget.lock, which another process holds while it evicts) leaves `with budget.writing()` at once; the
    thread then goes on, adds the room to budget._reserved and creates a reservation file held by this
    process. Neither is ever released: every process on the store counts that room as taken for as long
    as this one lives (a node, a library caller with asyncio.wait_for)."""
    with (
        hub_serving(tmp_path, monkeypatch, "up/one", 2 * MB),
        Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local,
    ):
        local.set_max_size("10MiB")
        budget = local.store.budget
        manifest = local.manifest_for("up/one", "main")
        admission = budget.reservations._admission
        held = threading.Event()
        let_go = threading.Event()

        def other_process_evicting() -> None:  # (another process's make_room, under budget.lock)
            with admission.exclusive():
                held.set()
                let_go.wait(30)

        holder = threading.Thread(target=other_process_evicting)
        holder.start()
        assert held.wait(10)

        async def pull_then_cancel() -> None:
            task = asyncio.create_task(local.pull_async("up/one", manifest=manifest))
            await asyncio.sleep(1.0)  # waiting for budget.lock in make_room's thread
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            let_go.set()  # the other process is done: make_room's thread goes on
            await asyncio.sleep(1.0)

        asyncio.run(pull_then_cancel())
        holder.join()
        directory = budget.reservations.directory
        left = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        assert (budget._reserved, left) == (0, []), (
            f"{budget._reserved} bytes stay reserved in this process, reservation files held for a "
            f"pull that ended: {left}"
        )


def test_a_second_pull_of_the_same_revision_under_the_budget_shares_the_first_ones_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes pulling one revision make one transfer, but the budget's reservations counted its room
    twice: under a budget for 1.5 of the revision, the second pull was refused, told to raise a budget
    that fits (a trial: several workers loading one model at start)."""
    import subprocess
    import sys

    from conftest import wait_until
    from fleetnodes import base_env

    with hub_serving(tmp_path, monkeypatch, "up/big", 4 * MB) as (hub, node):
        home = tmp_path / "local"
        with Depot(home, chunk_size=SMALL_CHUNK) as local:
            local.set_max_size("6MiB")
            reservations = home / "locks" / "reservations"
            first = subprocess.Popen(
                [sys.executable, "-m", "modeldepot", "pull", "up/big", "--home", str(home), "--max-rate", "1MiB/s"],
                env=base_env(HF_ENDPOINT=node.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                wait_until(lambda: reservations.exists() and any(reservations.iterdir()), 30,
                           "the first pull's reservation")  # fmt: skip
                assert local.pull("up/big").commit_id == hub.resolve("up/big")
                _, err = first.communicate(timeout=60)
                assert first.returncode == 0, err
            finally:
                first.kill()
                first.communicate()
            assert local.verify().ok and repos(local) == {"up/big"}


def test_a_reservation_being_made_is_read_as_no_room_yet(tmp_path: Path) -> None:
    """A reservation file another process has made and locked, and not written yet, is empty a moment: read
    as none (it raised ValueError, and a node's metrics, stats and imports with it: a review)."""
    import fcntl
    import os

    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        reservations = depot.store.budget.reservations
        reservations.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(reservations.directory / ".4242-abcd-0", os.O_RDWR | os.O_CREAT, 0o664)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # (another open file description: a lock of another process's)
            for contents in (False, True):
                assert [(h.amount, h.pid) for h in reservations.elsewhere(contents)] == [(0, 4242)]
            assert depot.budget_status().reserved_bytes == 0
        finally:
            os.close(fd)


def test_a_reservation_names_the_contents_a_pull_learns_of_after_the_blobs_it_relies_on(
    tmp_path: Path,
) -> None:
    """A pull relies on the blobs it found before it knows what it fetches: its reservation, made then (of 0
    bytes), must name the contents it makes room for later, or another pull of them counts that room twice."""
    with Depot(tmp_path / "store") as first, Depot(tmp_path / "store") as second:
        with first.store.budget.writing("acme/x", "0" * 40, ["a"]) as writer:
            writer.reuse(["1" * 64])
            writer.contents = {"2" * 64: 5 * MB}
            writer.budget._reserve(writer, 5 * MB)
            (held,) = second.store.budget.reservations.elsewhere(contents=True)
            assert (held.repo_id, held.amount, dict(held.contents), held.reused) == (
                "acme/x", 5 * MB, {"2" * 64: 5 * MB}, frozenset({"1" * 64}),
            )  # fmt: skip
            assert second.store.budget.kept_blobs() == {"1" * 64}
            # (each file's lines are parsed once, and what is appended after: a status read them all each time)
            writer.reuse(["3" * 64])
            writer.contents = {"4" * 64: MB}
            writer.budget._reserve(writer, MB)
            (held,) = second.store.budget.reservations.elsewhere(contents=True)
            assert (held.amount, dict(held.contents), held.reused) == (
                6 * MB, {"2" * 64: 5 * MB, "4" * 64: MB}, frozenset({"1" * 64, "3" * 64}),
            ), held  # fmt: skip
        assert second.store.budget.reservations.elsewhere() == []


def test_the_room_two_pulls_of_one_content_hold_counts_once_against_a_third_write(tmp_path: Path) -> None:
    """Two processes pulling one repo share its download, and neither counts the other's room: a third
    write, of anything, counted that room twice, and was refused though it fit ("384 MiB held by writes
    under way" for one 192 MiB download: an explorer's trial)."""
    home, big, small = tmp_path / "store", {"2" * 64: 192 * MB}, {"3" * 64: 40 * MB}
    with Depot(home) as first, Depot(home) as second, Depot(home) as third:
        third.set_max_size(f"{250 * MB}B")
        with contextlib.ExitStack() as pulls:
            for depot in (first, second, third):  # (the third process pulls it too, in a thread of its own)
                writer = pulls.enter_context(depot.store.budget.writing("acme/big", "0" * 40, ["big"]))
                writer.contents = dict(big)
                writer.make_room(192 * MB, "pulling acme/big")
            assert third.budget_status().reserved_bytes == 192 * MB
            with third.store.budget.writing("acme/gg", "1" * 40, ["gg"]) as writer:
                writer.contents = dict(small)
                writer.check_fits(40 * MB, "pulling acme/gg")  # (232 of 250 MB)
                with pytest.raises(StoreError) as refused:
                    writer.check_fits(60 * MB, "pulling acme/gg")  # (252: over)
                assert "192.0 MiB are pinned, in use" in str(refused.value), refused.value


def test_a_writer_that_ended_names_no_blob_and_a_full_disk_fails_no_write_without_a_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    """A cancelled pull's thread named the blobs it found after the pull had left: a reservation nobody
    let go of kept them from every eviction and gc for the process's life (a review). And naming them
    writes a file: on a full disk, an import of contents the store held failed with a raw OSError, with no
    budget set (a review)."""
    import errno

    from modeldepot.store.reservations import Reservations

    monkeypatch.delenv("MODELDEPOT_MAX_SIZE", raising=False)
    home = tmp_path / "store"
    with Depot(home) as first, Depot(home) as second:
        with first.store.budget.writing("acme/x", "0" * 40, ["a"]) as writer:
            pass
        writer.reuse(["1" * 64])  # (the thread of a pull cancelled meanwhile runs now)
        assert second.store.budget.kept_blobs() == frozenset()
        assert first.store.budget.kept_blobs() == frozenset()
        first.import_dir(model_dir, "acme/a")

        def full(*args: object, **kwargs: object) -> object:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Reservations, "hold", full)
        assert first.import_dir(model_dir, "acme/b").new_blobs == 0
        first.set_max_size("1GiB")
        with pytest.raises(StoreError, match="holding room in the disk budget"):
            first.import_dir(model_dir, "acme/c")


def test_a_pull_of_very_many_files_still_keeps_the_blobs_it_relies_on(tmp_path: Path) -> None:
    """(A review.) A reservation's lines were read up to 8 MiB: a pull of 130,000 files named its contents
    past that, and the blobs it relied on (its ``reuse`` lines, after them) were kept from no eviction."""
    with (
        Depot(tmp_path / "store") as first,
        Depot(tmp_path / "store") as second,
        first.store.budget.writing("acme/huge", "0" * 40, ["a"]) as writer,
    ):
        writer.contents = {f"{i:064x}": 1 for i in range(130_000)}
        writer.budget._reserve(writer, MB)
        writer.reuse(["f" * 64])
        assert second.store.budget.kept_blobs() == {"f" * 64}
