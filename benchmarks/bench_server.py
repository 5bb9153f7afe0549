"""The node over loopback against its anchors, measured in the same run.

    .venv/bin/python benchmarks/bench_server.py [--size 2GiB] [--repeat 3] [--dir ./bench-data]

1. One big file to ``curl`` from ``modeldepot serve`` vs from nginx (sendfile on, 2 workers) serving the
   same blob file: goal >= 1.0x. The node hashes every chunk it sends against its BLAKE3 (nginx checks
   nothing); the floor beside it is one core of BLAKE3 over the same bytes from the page cache. Installs
   Debian's nginx when it is missing (needs root).
2. ``hf_hub_download`` of the same file through the node vs through Olah with the node as its upstream,
   Olah cold (first fetch) and warm (cached): goal >= 1.2x. Installs PyPI's ``olah`` into its own venv.
3. 64 concurrent clients each fetching 8 files (aiohttp), every body's SHA-256 checked: errors and
   aggregate throughput.

Ratios are anchor time / our time: above 1 we are faster.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp

from common import Row, hub_client_env, random_file, render
from modeldepot import Depot
from modeldepot.config import parse_size
from netutil import free_port, wait_for_port

REPO = "bench/big"
MANY_REPO = "bench/many"


def curl_seconds(url: str) -> float:
    out = subprocess.run(
        ["curl", "-sL", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", url],  # (-L: see bench_pull)
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    return float(out[0])


def blake3_seconds(path: Path) -> float:
    """One core of BLAKE3 over the file, read from the page cache through a mapping (as the node hashes)."""
    import mmap

    import blake3

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mapping:
        view = memoryview(mapping)
        blake3.blake3(view)  # warm the page cache
        started = time.perf_counter()
        step = 16 << 20
        for offset in range(0, len(view), step):
            blake3.blake3(view[offset : offset + step]).hexdigest()
        seconds = time.perf_counter() - started
        view.release()
    return seconds


def start_nginx(root: Path, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    if shutil.which("nginx") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "nginx-light"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 2;
        daemon off;
        pid {work}/nginx.pid;
        error_log {work}/nginx-error.log;
        events {{ worker_connections 1024; }}
        http {{
            access_log off;
            sendfile on;
            tcp_nopush on;
            client_body_temp_path {work}/nginx-tmp;
            server {{ listen 127.0.0.1:{port}; root {root}; }}
        }}
    """))  # fmt: skip
    process = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])
    wait_for_port(port)
    return process, port


def start_node(home: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modeldepot",
            "serve",
            "--home",
            str(home),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
    )
    wait_for_port(port)
    return process, port


def olah_venv(work: Path) -> Path:
    venv = work / "olah-venv"
    if not (venv / "bin" / "olah-cli").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([venv / "bin" / "pip", "install", "-q", "olah"], check=True)
    return venv


def start_olah(venv: Path, upstream_port: int, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    repos = work / "olah-repos"
    shutil.rmtree(repos, ignore_errors=True)
    upstream = f"127.0.0.1:{upstream_port}"
    mirror = f"127.0.0.1:{port}"
    process = subprocess.Popen(
        [venv / "bin" / "olah-cli", "--host", "127.0.0.1", "--port", str(port), "--hf-scheme", "http",
         "--hf-netloc", upstream, "--hf-lfs-netloc", upstream, "--mirror-netloc", mirror,
         "--mirror-lfs-netloc", mirror, "--repos-path", str(repos)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work,  # olah writes logs/ where it runs
    )  # fmt: skip
    wait_for_port(port)
    return process, port


DOWNLOAD = """
import os, sys, time
from huggingface_hub import hf_hub_download
start = time.perf_counter()
hf_hub_download(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3])
print(time.perf_counter() - start)
"""


def hf_download_seconds(endpoint: str, filename: str, cache: Path) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-c", DOWNLOAD, REPO, filename, str(cache)],
        env=hub_client_env(endpoint),
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(cache, ignore_errors=True)
    return float(out.stdout.strip().splitlines()[-1])


async def many_clients(
    url: str, files: dict[str, str], clients: int, per_client: int
) -> tuple[int, int, float]:
    names = sorted(files)
    errors = 0
    received = 0
    connector = aiohttp.TCPConnector(limit=clients)

    async def one(client: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors, received
        for i in range(per_client):
            name = names[(client + i) % len(names)]
            digest = hashlib.sha256()
            try:
                async with session.get(f"{url}/{MANY_REPO}/resolve/main/{name}") as response:
                    if response.status != 200:
                        errors += 1
                        continue
                    async for block in response.content.iter_chunked(1 << 20):
                        digest.update(block)
                        received += len(block)
            except aiohttp.ClientError:
                errors += 1
                continue
            if digest.hexdigest() != files[name]:
                errors += 1

    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one(c, session) for c in range(clients)))
        return errors, received, time.perf_counter() - start


def median_interleaved(actions: dict[str, object], repeat: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeat):
        for name, action in actions.items():
            samples[name].append(action())  # type: ignore[operator]
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--hf-size", default="1GiB", help="file size for the hf_hub_download rows")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    parser.add_argument("--skip-olah", action="store_true", help="only the curl and concurrency rows")
    args = parser.parse_args()
    work = args.dir.resolve() / "server"
    work.mkdir(parents=True, exist_ok=True)
    size, hf_size = parse_size(args.size), parse_size(args.hf_size)
    home = work / "store"
    shutil.rmtree(home, ignore_errors=True)
    source = work / "source"
    shutil.rmtree(source, ignore_errors=True)
    random_file(source / "big" / "model.safetensors", size, 1)
    random_file(source / "big" / "model-small.safetensors", hf_size, 2)
    many = {f"shard-{i}.bin": os.urandom(8 << 20) for i in range(8)}
    for name, data in many.items():
        (source / "many").mkdir(exist_ok=True)
        (source / "many" / name).write_bytes(data)
    with Depot(home) as depot:
        depot.import_dir(source / "big", REPO)
        depot.import_dir(source / "many", MANY_REPO)
        blob = depot.store.blobs.path(depot.file_info(REPO, "model.safetensors").sha256)
    shutil.rmtree(source)
    rows: list[Row] = []
    node, node_port = start_node(home)
    nginx, nginx_port = start_nginx(blob.parent, work)
    try:
        node_url = f"http://127.0.0.1:{node_port}"
        times = median_interleaved(
            {
                "nginx": lambda: curl_seconds(f"http://127.0.0.1:{nginx_port}/{blob.name}"),
                "node": lambda: curl_seconds(f"{node_url}/{REPO}/resolve/main/model.safetensors"),
            },
            args.repeat,
        )
        rows.append(Row("curl, one file", "nginx sendfile", times["nginx"], times["node"], size, 1.0))
        floor = blake3_seconds(blob)
        print(f"floor: BLAKE3 of the same {size / 2**30:.2f} GiB on one core, from the page cache: {floor:.3f} s "
              f"({size / floor / 1e9:.2f} GB/s); curl from nginx: {size / times['nginx'] / 1e9:.2f} GB/s")  # fmt: skip
        if not args.skip_olah:
            venv = olah_venv(work)
            olah, olah_port = start_olah(venv, node_port, work)
            try:
                olah_url = f"http://127.0.0.1:{olah_port}"
                cold = hf_download_seconds(olah_url, "model-small.safetensors", work / "hf-cache")
                times = median_interleaved(
                    {
                        "olah": lambda: hf_download_seconds(
                            olah_url, "model-small.safetensors", work / "hf-cache"
                        ),
                        "node": lambda: hf_download_seconds(
                            node_url, "model-small.safetensors", work / "hf-cache"
                        ),
                    },
                    args.repeat,
                )
            finally:
                olah.terminate()
                olah.wait(30)
            rows.append(Row("hf_hub_download", "through Olah, cold", cold, times["node"], hf_size, 1.2))
            rows.append(
                Row("hf_hub_download", "through Olah, warm", times["olah"], times["node"], hf_size, 1.2)
            )
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in many.items()}
        errors, received, seconds = asyncio.run(many_clients(node_url, digests, 64, 8))
    finally:
        nginx.terminate()
        node.terminate()
        nginx.wait(30)
        node.wait(60)
    shutil.rmtree(home, ignore_errors=True)
    report(rows, errors, received, seconds)


def report(rows: list[Row], errors: int, received: int, seconds: float) -> None:
    render("modeldepot node over loopback", rows)
    print(f"\n64 clients × 8 files of 8 MiB: {errors} errors, {received / 2**30:.2f} GiB received and SHA-256-checked "
          f"in {seconds:.2f} s = {received / seconds / 1e9:.2f} GB/s aggregate")  # fmt: skip


if __name__ == "__main__":
    main()
