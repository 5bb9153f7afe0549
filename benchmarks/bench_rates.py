"""How closely the bandwidth caps hold: ``pull --max-rate`` and ``serve --max-upload-rate`` against ``curl
--limit-rate`` at the same caps, in the same run.

    .venv/bin/python benchmarks/bench_rates.py [--size 128MiB] [--caps 16MiB,64MiB,256MiB] [--dir ./bench-data]

A node serves one random file of ``--size`` on loopback. For each cap:

- download cap: ``modeldepot pull REPO --max-rate CAP`` (a fresh process into a fresh store, the node given
  as ``HF_ENDPOINT``) against ``curl --limit-rate CAP`` of the same file from the same node;
- upload cap: ``curl`` (no limit of its own) of the file from a second node started with
  ``--max-upload-rate CAP``.

Each line is the rate reached (bytes over wall time) as a share of the cap: 1.00 is the cap exactly, below
it the time lost to start-up (our pull is a Python process that scans the repo first; curl starts in
milliseconds), above it a cap that does not hold. The floor, uncapped: curl of the file from the node.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import random_file
from modeldepot.config import parse_rate, parse_size
from netutil import free_port, wait_for_port

MODELDEPOT = [sys.executable, "-m", "modeldepot"]
REPO = "bench/rates"


def serve(home: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    node = subprocess.Popen([*MODELDEPOT, "serve", "--home", str(home), "--port", str(port),
                             "--scrub-interval", "off", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_port(port, 60, process=node)
    return node, f"http://127.0.0.1:{port}"


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="128MiB")
    parser.add_argument("--caps", default="16MiB,64MiB,256MiB")
    parser.add_argument("--dir", default="bench-data")
    args = parser.parse_args()
    size = parse_size(args.size)
    caps = [parse_rate(cap) for cap in args.caps.split(",")]
    data = Path(args.dir) / "rates" / "model.safetensors"
    random_file(data, size, seed=14)
    work = Path(tempfile.mkdtemp(prefix="bench-rates-", dir=args.dir))
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        served = work / "served"
        subprocess.run([*MODELDEPOT, "import", str(data.parent), "--repo", REPO, "--home", str(served)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        node, url = serve(served)
        nodes.append(node)
        file_url = f"{url}/{REPO}/resolve/main/model.safetensors"
        curl = [
            "curl",
            "-sfL",
            "-o",
            "/dev/null",
            file_url,
        ]  # (-L: a branch's LFS file redirects to its commit's)
        floor = min(timed(curl) for _ in range(3))
        print(
            f"{os.cpu_count()} cores; file {size} bytes; floor (curl, uncapped): {size / floor / 2**20:.0f} MiB/s"
        )
        print("\n| cap | ours: pull --max-rate | anchor: curl --limit-rate | ours: serve --max-upload-rate |")
        print("| --- | --- | --- | --- |")
        env = {**os.environ, "HF_ENDPOINT": url}
        env.pop("HF_HUB_OFFLINE", None)
        for cap in caps:
            home = work / f"pull-{cap}"
            ours = timed([*MODELDEPOT, "pull", REPO, "--max-rate", str(cap), "--home", str(home)], env)
            shutil.rmtree(home)
            anchor = timed([*curl[:-1], "--limit-rate", str(cap), file_url])
            capped, capped_url = serve(served, "--max-upload-rate", str(cap))
            try:
                upload = timed(
                    ["curl", "-sfL", "-o", "/dev/null", f"{capped_url}/{REPO}/resolve/main/model.safetensors"]
                )
            finally:
                capped.send_signal(signal.SIGINT)
                capped.wait(30)

            def share(seconds: float, cap: int = cap) -> str:
                return f"{size / seconds / 2**20:.1f} MiB/s ({size / seconds / cap:.2f} of the cap)"

            print(f"| {cap / 2**20:.0f} MiB/s | {share(ours)} | {share(anchor)} | {share(upload)} |")
    finally:
        for node in nodes:
            node.send_signal(signal.SIGINT)
            node.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
