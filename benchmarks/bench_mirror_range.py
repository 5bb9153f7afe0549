"""A range read far into a big file through a cold mirror on a capped link, against the same read with the
code before a mirror fetched first the chunk a reader waits for (a worktree given as ``--before``), measured
in the same run.

    .venv/bin/python benchmarks/bench_mirror_range.py --before /tmp/old-worktree [--size 256MiB] [--rate 32MiB/s]
    .venv/bin/python benchmarks/bench_mirror_range.py --before /tmp/old-worktree --silences [--size 64MiB] [--rate 2MiB/s]

An upstream node holds one random file; a mirror (``serve --upstream``, ``--max-download-rate RATE``) that
holds none of it is asked for 1 MiB starting 15/16 into the file (the Range a safetensors reader sends for a
tensor near the end), by plain HTTP. The mirror pulls the file in 16 MiB chunks, four at once; before, it
fetched them in order and the read waited for nearly the whole file; now the read's chunk is the next one
fetched. Each run uses new stores. The floor is the capped link's time for the chunks in flight plus the
read's own chunk. Ratios are before / after: above 1 the read comes sooner.

``--silences`` measures instead what a client's read timeout sees (huggingface_hub's is 10 s): the time to the
first byte and the longest silence between two reads of the body, of two reads on a slow link: a safetensors
header (bytes 0-999) and 1000 bytes 100 KB before the end of the file's third chunk (a range deep inside a
chunk: read aside now, and the last bytes of both trickled while their chunk lands).
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

from common import random_file
from modeldepot.config import parse_size
from netutil import free_port, wait_for_port

REPO = "bench/far-range"


def serve(
    src: Path, home: Path, upstream: str | None = None, rate: str | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(port),
               "--log-level", "warning", "--scrub-interval", "off"]  # fmt: skip
    if upstream is not None:
        command += ["--upstream", upstream, "--max-download-rate", str(rate)]
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # (the upstream node alone: it vouches for every chunk)
        env.pop("HF_HUB_OFFLINE", None)
    process = subprocess.Popen(command, env=env)
    wait_for_port(port)
    return process, port


def read_seconds(src: Path, work: Path, upstream_url: str, size: int, rate: str) -> float:
    home = work / "mirror"
    shutil.rmtree(home, ignore_errors=True)
    mirror, port = serve(src, home, upstream_url, rate)
    try:
        start = size * 15 // 16
        request = urllib.request.Request(f"http://127.0.0.1:{port}/{REPO}/resolve/main/model.safetensors",
                                         headers={"Range": f"bytes={start}-{start + (1 << 20) - 1}"})  # fmt: skip
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as answer:
            body = answer.read()
        seconds = time.perf_counter() - began
        assert answer.status == 206 and len(body) == 1 << 20, (answer.status, len(body))
        return seconds
    finally:
        mirror.terminate()
        mirror.wait(timeout=60)


def silences(
    src: Path, work: Path, upstream_url: str, rate: str, start: int, length: int
) -> tuple[float, float, float]:
    """(seconds to the first byte of the body, the longest silence between two reads of it, the whole read) of
    ``length`` bytes from ``start`` through a fresh mirror."""
    import http.client

    home = work / "mirror"
    shutil.rmtree(home, ignore_errors=True)
    mirror, port = serve(src, home, upstream_url, rate)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        began = time.perf_counter()
        path = f"/{REPO}/resolve/main/model.safetensors"
        for _ in range(3):  # (a redirect to the commit's URL)
            connection.request("GET", path, headers={"Range": f"bytes={start}-{start + length - 1}"})
            answer = connection.getresponse()
            if answer.status not in (301, 302, 307):
                break
            answer.read()
            path = answer.getheader("Location", path)
            path = path if path.startswith("/") else f"/{REPO}/resolve/{path.split('/', 1)[1]}"
        assert answer.status == 206, answer.status
        got, first, longest, last = 0, 0.0, 0.0, time.perf_counter()
        while piece := answer.read1(1 << 16):
            now = time.perf_counter()
            if not got:
                first = now - began
            else:
                longest = max(longest, now - last)
            got, last = got + len(piece), now
        assert got == length, got
        connection.close()
        return first, longest, last - began
    finally:
        mirror.terminate()
        mirror.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, required=True, help="a worktree of the code before (its root)")
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--rate", default="32MiB/s", help="the mirror's --max-download-rate")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    parser.add_argument(
        "--silences", action="store_true", help="time to first byte and longest silence instead"
    )
    args = parser.parse_args()
    size = parse_size(args.size)
    work = args.dir.resolve() / "mirror-range"
    source = work / "src"
    random_file(source / "model.safetensors", size, seed=11)
    (source / "config.json").write_text("{}")
    ours = Path(__file__).resolve().parent.parent / "src"
    upstream_home = work / "upstream"
    shutil.rmtree(upstream_home, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "modeldepot", "import", str(source), "--repo", REPO, "--home",
                    str(upstream_home)], env={**os.environ, "PYTHONPATH": str(ours)}, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    upstream, port = serve(ours, upstream_home)
    if args.silences:
        try:
            quiet(args, ours, work, f"http://127.0.0.1:{port}", size)
        finally:
            upstream.terminate()
            upstream.wait(timeout=60)
        return
    samples: dict[str, list[float]] = {"before": [], "after": []}
    try:
        for _ in range(args.repeat):  # (alternated: the machine's drift falls on both)
            for name, src in (("before", args.before.resolve() / "src"), ("after", ours)):
                samples[name].append(read_seconds(src, work, f"http://127.0.0.1:{port}", size, args.rate))
    finally:
        upstream.terminate()
        upstream.wait(timeout=60)
    before, after = statistics.median(samples["before"]), statistics.median(samples["after"])
    rate = parse_size(args.rate.removesuffix("/s"))
    whole = size / rate
    print(
        f"1 MiB at 15/16 of a {args.size} file, mirror capped at {args.rate} (the whole file: {whole:.1f} s)"
    )
    print(f"samples (s): before {', '.join(f'{s:.2f}' for s in samples['before'])}; "
          f"after {', '.join(f'{s:.2f}' for s in samples['after'])}")  # fmt: skip
    print(
        "\n| read | before (chunks in order) | after (the read's chunk next) | ratio |\n| --- | --- | --- | --- |"
    )
    print(
        f"| 1 MiB at 15/16, {args.size} at {args.rate} | {before:.2f} s | {after:.2f} s | {before / after:.1f}× |"
    )


def quiet(args: argparse.Namespace, ours: Path, work: Path, upstream_url: str, size: int) -> None:
    chunk = 16 << 20
    reads = {"header, bytes 0-999": 0, "1000 bytes deep in chunk 2": min(3 * chunk, size) - 100_000}
    print(
        f"through a mirror capped at {args.rate} ({args.size} file, 16 MiB chunks); a client's read timeout is 10 s"
    )
    print("\n| read | code | first byte | longest silence | whole read |\n| --- | --- | --- | --- | --- |")
    for what, start in reads.items():
        for name, src in (("before", args.before.resolve() / "src"), ("after", ours)):
            runs = [silences(src, work, upstream_url, args.rate, start, 1000) for _ in range(args.repeat)]
            first, longest, whole = (statistics.median(run[i] for run in runs) for i in range(3))
            print(f"| {what} | {name} | {first:.1f} s | {longest:.1f} s | {whole:.1f} s |")


if __name__ == "__main__":
    main()
