"""Where an import's time goes: hashing alone, then + writes, + early writeback, + the final fsync.

.venv/bin/python benchmarks/profile_import.py [FILE]     (default: bench-data/source/model.safetensors,
                                                          which bench_store.py --keep leaves behind)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from modeldepot.hashing import digest_stream
from modeldepot.store.blobs import start_writeback

CHUNK = 16 << 20


def run(source: Path, label: str, write: bool, writeback: bool, block: int) -> None:
    size = source.stat().st_size
    target = source.parent / "profile-out.bin"
    out = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC) if write else -1
    offset = 0

    def sink(view: memoryview) -> None:
        nonlocal offset
        written = os.pwrite(out, view, offset)
        if writeback:
            start_writeback(out, offset, written)
        offset += written

    try:
        if write:
            os.posix_fallocate(out, 0, size)
        with open(source, "rb", buffering=0) as handle:
            start = time.perf_counter()
            digest_stream(handle.readinto, size, CHUNK, sink=sink if write else None, block_size=block)
            piped = time.perf_counter()
            if write:
                os.fsync(out)
            done = time.perf_counter()
    finally:
        if write:
            os.close(out)
            target.unlink()
    os.sync()
    print(f"{label:34s} pipeline {piped - start:.2f}s  fsync {done - piped:.2f}s  total {done - start:.2f}s")


def main() -> None:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-data/source/model.safetensors")
    for block in (4 << 20, 8 << 20, 16 << 20):
        run(source, f"hash only, {block >> 20} MiB blocks", False, False, block)
    run(source, "hash + write, 4 MiB", True, False, 4 << 20)
    run(source, "hash + write + writeback, 4 MiB", True, True, 4 << 20)


if __name__ == "__main__":
    main()
