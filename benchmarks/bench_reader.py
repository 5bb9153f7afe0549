"""The ranged reader alone (``transfer/ranged.read_range``): each socket read looked at (its pace checked, a
drip caught), against a buffered ``readinto`` of whole pieces (the reader before), and the machine's floor,
curl, in the same run.

    .venv/bin/python benchmarks/bench_reader.py [--size 1GiB] [--repeat 5] [--dir ./bench-data]

One random file is imported into a store served by ``modeldepot serve`` in its own process; it is read in
16 MiB ranges, four at once (as a pull reads one source), into reused buffers, with nothing written or
hashed: the reader's own cost. Runs of the two readers alternate; medians of ``--repeat``. The floor: the
same ranges by four ``curl`` processes in parallel, to /dev/null. Ratios are buffered time / ours: about 1
means the pace check costs nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import Row, random_file, render
from modeldepot.config import parse_size
from modeldepot.transfer import ranged
from netutil import free_port, wait_for_port

CHUNK = 16 << 20
READERS = 4


def read_all(url: str, size: int, buffers: list[memoryview]) -> float:
    free, lock = list(range(len(buffers))), threading.Lock()

    def one(start: int) -> None:
        with lock:
            which = free.pop()
        try:
            end = min(size, start + CHUNK) - 1
            answer = ranged.read_range(url, {}, start, end, size, buffers[which], 30.0, ranged.Attempt())
            assert answer.got == end - start + 1, (answer.status, answer.got)
        finally:
            with lock:
                free.append(which)

    started = time.perf_counter()
    with ThreadPoolExecutor(READERS) as pool:
        list(pool.map(one, range(0, size, CHUNK)))
    return time.perf_counter() - started


def curl_all(url: str, size: int) -> float:
    ranges = [f"{start}-{min(size, start + CHUNK) - 1}" for start in range(0, size, CHUNK)]
    started = time.perf_counter()
    groups = [ranges[i::READERS] for i in range(READERS)]
    processes = [subprocess.Popen(["sh", "-c", " && ".join(f"curl -s -o /dev/null -r {r} {url}" for r in group)])
                 for group in groups if group]  # fmt: skip
    for process in processes:
        assert process.wait() == 0
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    args = parser.parse_args()
    size = parse_size(args.size)
    work = args.dir / "reader"
    shutil.rmtree(work, ignore_errors=True)
    random_file(work / "model" / "model.safetensors", size, seed=11)
    home = work / "store"
    subprocess.run([sys.executable, "-m", "modeldepot", "import", str(work / "model"), "--repo", "bench/reader",
                    "--home", str(home)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    port = free_port()
    node = subprocess.Popen([sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(port),
                             "--log-level", "warning", "--scrub-interval", "off"], env=os.environ)  # fmt: skip
    try:
        wait_for_port(port)
        commit = subprocess.run([sys.executable, "-m", "modeldepot", "path", "bench/reader", "--home", str(home)],
                                check=True, capture_output=True, text=True).stdout.strip().rsplit("/", 1)[-1]  # fmt: skip
        url = f"http://127.0.0.1:{port}/bench/reader/resolve/{commit}/model.safetensors"
        buffers = [memoryview(bytearray(CHUNK)) for _ in range(READERS)]
        ours_read = ranged._read_piece

        def buffered(response: object, into: memoryview, pace: object, got: int) -> int:
            return int(response.readinto(into))  # type: ignore[attr-defined]

        times: dict[str, list[float]] = {"ours": [], "buffered": [], "curl": []}
        read_all(url, size, buffers)  # (warm: the page cache, the connections)
        for _ in range(args.repeat):
            ranged._read_piece = ours_read
            times["ours"].append(read_all(url, size, buffers))
            ranged._read_piece = buffered  # type: ignore[assignment]
            times["buffered"].append(read_all(url, size, buffers))
            times["curl"].append(curl_all(url, size))
        ranged._read_piece = ours_read
    finally:
        node.terminate()
        node.wait()
    median = {name: statistics.median(samples) for name, samples in times.items()}
    render("The ranged reader, 16 MiB ranges four at once, loopback", [
        Row("read_range, each socket read looked at", "buffered readinto", median["buffered"], median["ours"], size, 0.95),
        Row("read_range, each socket read looked at", "curl x4 (floor)", median["curl"], median["ours"], size, 0.8),
    ])  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
