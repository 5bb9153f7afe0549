"""The disk budget's room check on a store of many blobs, and its evictions of many small revisions, against
their anchors and floors, measured in the same run.

    .venv/bin/python benchmarks/bench_budget.py [--blobs 20000] [--repeat 20] [--revisions 1500]
        [--evict 1000] [--dir ./bench-data]

Every pull, import and mirror miss (a `resolve` of a file the mirror does not hold) asks the budget whether
its bytes fit. The floor is one indexed sum of the blobs' sizes (the check's own first step); the look at
which blobs files outside the store share (a `stat` of every blob file) is what the check takes only when
the sum says a write may not fit, and what a node's stats reuse for a few seconds. Medians of ``--repeat``.

Evictions: a store of ``--revisions`` small revisions (8 files of 1.2 KB each) shrunk by the budget until
``--evict`` of them went (the whole revisions its plan needs go in batches: store/budget.py), against the same
revisions removed one at a time (``maintenance.remove``: what each eviction was before), on copies of one
store; the floor is deleting as many files and folders (the blobs, the snapshots' links and folders) with
nothing else.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from modeldepot import Depot
from modeldepot.store import maintenance
from modeldepot.store.eviction import shared_blobs


def median_ms(action: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--revisions", type=int, default=1500)
    parser.add_argument("--evict", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    args = parser.parse_args()
    work = args.dir / "budget"
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "many"
    folder.mkdir(parents=True)
    for i in range(args.blobs):  # (distinct contents: one blob each)
        (folder / f"f{i:06d}.json").write_bytes(b'{"i": %d}' % i)
    with Depot(work / "store") as depot:
        depot.import_dir(folder, "bench/many")
        depot.set_max_size("100GiB")
        budget, index = depot.store.budget, depot.store.index
        floor = median_ms(lambda: index.read("SELECT COALESCE(SUM(size), 0) FROM blobs WHERE state = 'ok'"),
                          args.repeat)  # fmt: skip
        with budget.writing("bench/other", "0" * 40, ["x"]) as writer:
            check = median_ms(lambda: writer.check_fits(1 << 20, "a room check"), args.repeat)
        look = median_ms(lambda: shared_blobs(depot.store), max(3, args.repeat // 4))
        fresh = median_ms(lambda: depot.budget_status(), max(3, args.repeat // 4))
        depot.budget_status(fresh=False)
        cached = median_ms(lambda: depot.budget_status(fresh=False), args.repeat)
    shutil.rmtree(work, ignore_errors=True)
    one_by_one, batched, unlinks = evictions(args.dir / "evictions", args.revisions, args.evict)
    rows = [
        ("room check (check_fits), fits", "indexed sum of the blobs", floor, check),
        ("look at shared blobs (stat each)", "indexed sum of the blobs", floor, look),
        ("budget status, a node's (reused 5 s)", "budget status, fresh", fresh, cached),
        (f"{args.evict} evictions (shrink)", "one removal each", one_by_one, batched),
        (f"{args.evict} evictions (shrink)", "floor: their unlinks alone", unlinks, batched),
    ]
    table = Table(title=f"disk budget over {args.blobs} blobs, {os.cpu_count()} cores, {platform.machine()}")
    for column in ("benchmark", "anchor", "anchor ms", "ours ms", "ratio"):
        table.add_column(column)
    for name, anchor, anchor_ms, ours_ms in rows:
        table.add_row(name, anchor, f"{anchor_ms:.3f}", f"{ours_ms:.3f}", f"{anchor_ms / ours_ms:.2f}x")
    Console().print(table)
    print("\n| benchmark | anchor | anchor | ours | ratio |\n| --- | --- | --- | --- | --- |")
    for name, anchor, anchor_ms, ours_ms in rows:
        print(f"| {name} | {anchor} | {anchor_ms:.3f} ms | {ours_ms:.3f} ms | {anchor_ms / ours_ms:.2f}× |")


def evictions(work: Path, revisions: int, evict: int) -> tuple[float, float, float]:
    """Milliseconds to remove ``evict`` of ``revisions`` small revisions one at a time, by the budget's batched
    shrink, and to delete as many files and folders alone."""
    shutil.rmtree(work, ignore_errors=True)
    source = work / "src"
    with Depot(work / "made") as depot:
        for r in range(revisions):
            folder = source / f"r{r}"
            folder.mkdir(parents=True)
            for i in range(8):
                (folder / f"f{i}.json").write_bytes(b'{"r": %d, "i": %d}' % (r, i) + b"x" * 1200)
            depot.import_dir(folder, f"bench/r{r:05d}")
            shutil.rmtree(folder)
    for copy in ("one-by-one", "batched"):
        shutil.copytree(work / "made", work / copy, symlinks=True)
    with Depot(work / "one-by-one") as depot:
        gone = [(f"bench/r{r:05d}", depot.store.resolve(f"bench/r{r:05d}", "main")) for r in range(evict)]
        files = len(depot.store.index.read("SELECT 1 FROM files WHERE repo_id <= ?", (gone[-1][0],)))
        start = time.perf_counter()
        for repo_id, commit_id in gone:
            maintenance.remove(depot.store, repo_id, commit_id)
        one_by_one = time.perf_counter() - start
    with Depot(work / "batched") as depot:
        budget = depot.store.budget
        limit = budget.used_bytes() - sum(
            budget.plan_shrink(0)[r].bytes_freed for r in range(evict)
        )  # (the oldest revisions first: as many as ``evict``)
        start = time.perf_counter()
        went = budget.shrink(limit)
        batched = time.perf_counter() - start
        assert len(went) == evict, (len(went), evict)
    floor_dir = work / "floor"
    for r in range(evict):  # (a blob file and a snapshot link for each file, a snapshot folder each revision)
        folder = floor_dir / f"r{r}"
        folder.mkdir(parents=True)
        for i in range(files // evict):
            (folder / f"b{i}").write_bytes(b"x" * 1200)
            os.symlink(f"b{i}", folder / f"l{i}")
    start = time.perf_counter()
    for r in range(evict):
        shutil.rmtree(floor_dir / f"r{r}")
    unlinks = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    return one_by_one * 1000, batched * 1000, unlinks * 1000


if __name__ == "__main__":
    main()
