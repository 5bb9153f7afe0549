"""Store hot paths against their anchors, measured in the same run.

    .venv/bin/python benchmarks/bench_store.py [--size 2GiB] [--repeat 3] [--dir ./bench-data]

1. import of one big file (read once: SHA-256 + chunk BLAKE3 + write + fsync) vs copy-then-hash, two passes:
   ``cp; sha256sum`` (the goal's anchor), and the stronger ``cp; openssl sha256`` (coreutils' sha256sum has no
   SHA-NI path, OpenSSL's has, like hashlib), each also with ``sync`` before hashing (durable, like us).
2. ``get_file`` touching every page vs a raw ``mmap`` of the same blob touching every page (warm cache).
3. ``open_file`` read loop vs a raw ``os.read`` loop over the same blob (16 MiB reads, warm cache).

Ratios are anchor time / our time: above 1 we are faster. Medians of ``--repeat`` runs, interleaved.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import Row, median_time, random_file, render
from modeldepot import Depot
from modeldepot.config import parse_size

READ_BLOCK = 16 * 1024 * 1024
REPO = "bench/big-model"


def make_source(folder: Path, size: int) -> Path:
    target = folder / "model.safetensors"
    random_file(target, size, 7)
    return target


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(READ_BLOCK)
        while handle.readinto(buffer):
            pass


def touch_pages(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8)[:: mmap.PAGESIZE].sum())


def bench_import(depot: Depot, source: Path, work: Path, repeat: int) -> list[Row]:
    copy = work / "copy.bin"
    size = source.stat().st_size

    # Every timed step starts with no dirty pages left by the previous one (an unsynced cp leaves 2 GiB
    # for the kernel to flush during whatever runs next), so the untimed setups end with a full sync.
    def reset_store() -> None:
        if depot.list_repos():
            depot.remove(REPO)
        depot.gc()
        os.sync()

    def reset_copy() -> None:
        copy.unlink(missing_ok=True)
        os.sync()

    def cp_then_hash(sync: bool, hasher: list[str]) -> None:
        subprocess.run(["cp", str(source), str(copy)], check=True)
        if sync:
            subprocess.run(["sync", str(copy)], check=True)
        subprocess.run([*hasher, str(copy)], check=True, capture_output=True)

    anchors = {
        "cp; sha256sum": (False, ["sha256sum"]),
        "cp; sync; sha256sum": (True, ["sha256sum"]),
        "cp; openssl sha256": (False, ["openssl", "dgst", "-sha256"]),
        "cp; sync; openssl sha256": (True, ["openssl", "dgst", "-sha256"]),
    }
    warm(source)
    ours: list[float] = []
    theirs: dict[str, list[float]] = {name: [] for name in anchors}
    for _ in range(repeat):  # interleaved so drifting machine load hits all alike
        ours.append(median_time(lambda: depot.import_dir(source.parent, REPO), reset_store, 1))
        for name, (sync, hasher) in anchors.items():
            theirs[name].append(median_time(lambda s=sync, h=hasher: cp_then_hash(s, h), reset_copy, 1))
    reset_copy()
    ours_s = statistics.median(ours)
    return [
        Row("import (hash + copy + fsync)", name, statistics.median(samples), ours_s, size, 1.2)
        for name, samples in theirs.items()
    ]


def bench_reads(depot: Depot, repeat: int) -> list[Row]:
    entry = depot.file_info(REPO, "model.safetensors")
    blob = depot.store.blobs.path(entry.sha256)
    warm(blob)

    def ours_touch() -> None:
        with depot.map_file(REPO, "model.safetensors") as view:
            touch_pages(view)

    def raw_touch() -> None:
        with open(blob, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            view = memoryview(mapped)
            touch_pages(view)
            view.release()

    def ours_stream() -> None:
        with depot.open_file(REPO, "model.safetensors") as stream:
            while stream.read(READ_BLOCK):
                pass

    def raw_stream() -> None:
        fd = os.open(blob, os.O_RDONLY)
        try:
            while os.read(fd, READ_BLOCK):
                pass
        finally:
            os.close(fd)

    rows = []
    for name, anchor, mine, theirs, goal in (
        ("get_file, touch every page", "raw mmap", ours_touch, raw_touch, 0.95),
        ("open_file, 16 MiB reads", "os.read loop", ours_stream, raw_stream, 0.9),
    ):
        mine(), theirs()  # fault in the page tables / allocator once
        anchor_samples, our_samples = [], []
        for _ in range(repeat):
            anchor_samples.append(median_time(theirs))
            our_samples.append(median_time(mine))
        rows.append(
            Row(
                name,
                anchor,
                statistics.median(anchor_samples),
                statistics.median(our_samples),
                entry.size,
                goal,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    parser.add_argument("--keep", action="store_true", help="keep the generated source file for the next run")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = args.dir.resolve()
    source = make_source(work / "source", size)
    home = work / "store"
    shutil.rmtree(home, ignore_errors=True)
    with Depot(home) as depot:
        rows = bench_import(depot, source, work, args.repeat)
        depot.import_dir(source.parent, REPO)
        rows += bench_reads(depot, args.repeat)
    shutil.rmtree(home, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work / "source", ignore_errors=True)
    render(f"modeldepot store, {size / 2**30:.2f} GiB file", rows)
    sys.exit(0)


if __name__ == "__main__":
    main()
