"""A repo of many small files fetched through a mirror for the first time, against the same fetch from the
node it mirrors, measured in the same run.

    .venv/bin/python benchmarks/bench_mirror_files.py [--files 600] [--dir ./bench-data]

1. ``snapshot_download`` (8 threads) of the whole repo through a mirror that holds none of it (every file a
   miss: scanned, pulled from the upstream, verified, published, streamed) vs from the upstream node itself.
2. One file after another through a cold mirror: the mean time of a miss over the first and the last 50
   files. Each file published into the commit used to rebuild its whole snapshot folder, so a miss cost time
   in proportion to the files held already (640 ms a file after 350, 78 ms at first; 700 files took 363 s).
   The floor is the upstream's own answer (one round trip on loopback): a miss is bound by its own work, not
   by the link.

Ratios are anchor time / our time: above 1 the mirror is faster (a miss does more than a hit: well below 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import Row, hub_client_env, render
from modeldepot import Depot
from netutil import free_port, wait_for_port

REPO = "bench/many-small"

SNAPSHOT = """
import sys, time
from huggingface_hub import snapshot_download
start = time.perf_counter()
snapshot_download(sys.argv[1], cache_dir=sys.argv[2], max_workers=8)
print(time.perf_counter() - start)
"""


def serve(home: Path, upstream: str | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ}
    command = [sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(port),
               "--log-level", "warning"]  # fmt: skip
    if upstream is not None:
        command += ["--upstream", upstream]
        env["HF_ENDPOINT"] = upstream
        env.pop("HF_HUB_OFFLINE", None)
    process = subprocess.Popen(command, env=env)
    wait_for_port(port)
    return process, port


def snapshot_seconds(endpoint: str, cache: Path) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", SNAPSHOT, REPO, str(cache)], env=hub_client_env(endpoint), check=True,
                         capture_output=True, text=True)  # fmt: skip
    shutil.rmtree(cache, ignore_errors=True)
    return float(out.stdout.strip().splitlines()[-1])


def one_after_another(url: str, paths: list[str]) -> list[float]:
    times = []
    for path in paths:
        start = time.perf_counter()
        with urllib.request.urlopen(f"{url}/{REPO}/resolve/main/{path}") as answer:
            answer.read()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    args = parser.parse_args()
    work = args.dir.resolve() / "mirror-files"
    shutil.rmtree(work, ignore_errors=True)
    source = work / "source"
    paths = [f"d{i % 5}/f{i:05d}.json" for i in range(args.files)]
    for i, path in enumerate(paths):
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text(f'{{"i": {i}, "pad": "{"x" * (i % 200)}"}}\n')
    size = sum((source / p).stat().st_size for p in paths)
    with Depot(work / "upstream") as upstream_store:
        upstream_store.import_dir(source, REPO)
    upstream, up_port = serve(work / "upstream")
    up_url = f"http://127.0.0.1:{up_port}"
    mirrors: list[subprocess.Popen[bytes]] = []
    try:
        direct = snapshot_seconds(up_url, work / "cache")
        mirror, port = serve(work / "mirror-a", up_url)
        mirrors.append(mirror)
        through = snapshot_seconds(f"http://127.0.0.1:{port}", work / "cache")
        rows = [Row(f"snapshot_download, {args.files} files, cold mirror", "from the upstream node", direct,
                    through, size, 0.0)]  # fmt: skip
        direct_each = one_after_another(up_url, paths)
        mirror, port = serve(work / "mirror-b", up_url)
        mirrors.append(mirror)
        cold_each = one_after_another(f"http://127.0.0.1:{port}", paths)
        first, last = statistics.mean(cold_each[:50]), statistics.mean(cold_each[-50:])
        floor = statistics.mean(direct_each)
        rows.append(Row("one miss, the first 50 files", "the upstream's answer", floor, first, 0, 0.0))
        rows.append(
            Row(f"one miss, the last 50 of {args.files}", "the upstream's answer", floor, last, 0, 0.0)
        )
        render("A mirror's first fetches of a repo of many small files", rows)
        print(f"\nmiss: {first * 1000:.0f} ms (first 50) → {last * 1000:.0f} ms (last 50): "
              f"{'flat' if last < 1.5 * first else 'GROWING with the files held'}; upstream {floor * 1000:.1f} ms")  # fmt: skip
    finally:
        for process in (*mirrors, upstream):
            process.terminate()
            process.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
