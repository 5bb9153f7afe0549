"""The disk budget's room check on a store of many blobs, against its floor, measured in the same run.

    .venv/bin/python benchmarks/bench_budget.py [--blobs 20000] [--repeat 20] [--dir ./bench-data]

Every pull, import and mirror miss (a `resolve` of a file the mirror does not hold) asks the budget whether
its bytes fit. The floor is one indexed sum of the blobs' sizes (the check's own first step); the look at
which blobs files outside the store share (a `stat` of every blob file) is what the check takes only when
the sum says a write may not fit, and what a node's stats reuse for a few seconds. Medians of ``--repeat``.
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
    rows = [
        ("room check (check_fits), fits", "indexed sum of the blobs", floor, check),
        ("look at shared blobs (stat each)", "indexed sum of the blobs", floor, look),
        ("budget status, a node's (reused 5 s)", "budget status, fresh", fresh, cached),
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


if __name__ == "__main__":
    main()
