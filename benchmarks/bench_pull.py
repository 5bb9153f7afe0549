"""Pulling a whole repo from a node: ``modeldepot pull`` against ``snapshot_download``, in the same run.

    .venv/bin/python benchmarks/bench_pull.py [--size 2GiB] [--repeat 3] [--dir ./bench-data] [--quick]
                                               [--only loopback|wan] [--rtt-ms 20] [--rate 1gbit]

The repo is one big random ``model.safetensors`` (``--size``) plus a small ``config.json`` and
``tokenizer.json``, imported into a source store with ``modeldepot import`` and served by
``modeldepot serve`` in its own process. Each client runs in a fresh process into a fresh, empty
destination that is deleted afterwards; the whole process is timed (start-up included, for both), after
an untimed ``sync``. Runs of the two clients are interleaved and we take the median of ``--repeat``.

- anchor: ``huggingface_hub.snapshot_download(repo, cache_dir=DEST, endpoint=NODE)`` with
  ``HF_ENDPOINT=NODE`` (no hf_transfer, no xet, no telemetry).
- ours: ``modeldepot pull REPO --home DEST`` with ``MODELDEPOT_SERVERS=NODE`` and ``HF_ENDPOINT=NODE``
  (the engine being written reads the first, the current one the second).

Sections:

1. loopback: node and clients on 127.0.0.1.
2. wan: two network namespaces joined by a veth pair shaped with ``tbf`` (``--rate``, both ends). This
   kernel has no ``netem``, so the round-trip time comes from a TCP relay (asyncio, in the client
   namespace) that holds every piece it forwards for half of ``--rtt-ms`` in each direction. It is a
   delay line, not a rate limit: each piece is stamped when read and released when its time is up,
   while reading goes on. The node listens on 0.0.0.0 in the server namespace; clients reach it through
   the relay. TCP itself sees short round trips on each leg (client-relay, relay-node): the relay adds
   latency to every request and response, not a long TCP path. ``curl`` lines give the wire's own
   ceiling with and without the relay. Needs root; skipped with the reason if the namespaces cannot be
   made.

Ratios are anchor time / our time: above 1 we are faster. No issue sets a goal for pulls yet: the goal
column says "no slower than snapshot_download" (``--goal``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from common import Row, random_file, render
from modeldepot.config import parse_size
from netutil import free_port

REPO = "bench/pull"
HEALTH = "/api/depot/v1/health"
BIG = "model.safetensors"
NODE_PORT = 8980  # inside the server namespace, where nothing else listens
PIECE = 256 << 10  # bytes the relay reads at once
RELAY_BUFFER = 256  # pieces held per direction before the relay stops reading (64 MiB)

SNAPSHOT = """
import sys, time
from pathlib import Path
from huggingface_hub import snapshot_download
start = time.perf_counter()
path = snapshot_download(sys.argv[1], cache_dir=sys.argv[2], endpoint=sys.argv[3])
seconds = time.perf_counter() - start
print(seconds, sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()))
"""

Prefix = list[str]  # what runs a command in a namespace: [] or ["ip", "netns", "exec", NS]


# -- the repo and the source node ---------------------------------------------------------------------


def make_repo(folder: Path, size: int) -> int:
    """The repo's folder; returns its size in bytes."""
    shutil.rmtree(folder, ignore_errors=True)
    random_file(folder / BIG, size, 3)
    config = {"architectures": ["BenchModel"], "model_type": "bench", "hidden_size": 1024}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    vocab = {f"tok{i}": i for i in range(20000)}
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "tok0"}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer) + "\n")
    return sum(p.stat().st_size for p in folder.iterdir())


def modeldepot(*args: str) -> list[str]:
    return [sys.executable, "-m", "modeldepot", *args]


def start_node(home: Path, prefix: Prefix, host: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = modeldepot("serve", "--home", str(home), "--host", host, "--port", str(port))
    with open(log, "ab") as handle:
        return subprocess.Popen([*prefix, *command, "--log-level", "warning"], stderr=handle)


def wait_healthy(url: str, prefix: Prefix, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the node exited with code {process.returncode}")
        probe = [*prefix, "curl", "-sf", "-o", "/dev/null", "--max-time", "2", url + HEALTH]
        if subprocess.run(probe, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url}{HEALTH} did not answer within {timeout:.0f} s")


def stop(process: subprocess.Popen[Any] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the clients --------------------------------------------------------------------------------------


def client_env(url: str) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": url, "MODELDEPOT_SERVERS": url, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    for name in ("HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_OFFLINE", "MODELDEPOT_OFFLINE", "MODELDEPOT_HOME"):
        env.pop(name, None)
    return env


def timed(command: list[str], env: dict[str, str], dest: Path, then_sync: bool = False) -> tuple[float, str]:
    """Wall time of ``command`` writing into the fresh ``dest`` (deleted afterwards), and its stdout.
    ``then_sync``: the time includes a ``sync`` after it (the bytes on disk, as a pull leaves them)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if then_sync:
        os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(dest, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


class Clients:
    """Runs both clients against one node URL from one namespace; keeps what each run reported."""

    def __init__(self, prefix: Prefix, url: str, work: Path, total: int, big: int) -> None:
        self.prefix, self.url, self.work, self.total, self.big = prefix, url, work, total, big
        self.call_only: list[float] = []  # snapshot_download's call alone, without process start-up

    def snapshot(self, then_sync: bool = False) -> float:
        dest = self.work / "dest-snapshot"
        command = [*self.prefix, sys.executable, "-c", SNAPSHOT, REPO, str(dest), self.url]
        seconds, out = timed(command, client_env(self.url), dest, then_sync)
        call, got = out.split()[-2:]
        if int(got) != self.total:
            raise RuntimeError(f"snapshot_download brought {got} bytes, the repo has {self.total}")
        self.call_only.append(float(call))
        return seconds

    def pull(self) -> float:
        dest = self.work / "dest-pull"
        command = [*self.prefix, *modeldepot("pull", REPO, "--home", str(dest), "--json")]
        seconds, out = timed(command, client_env(self.url), dest)
        result = json.loads(out)
        if result["bytes_total"] != self.total or result["bytes_downloaded"] != self.total:
            raise RuntimeError(f"pull reported {result}, the repo has {self.total} bytes")
        return seconds

    def curl(self, url: str, label: str) -> str:
        """A note: how long curl takes to fetch the big file from ``url`` (one stream, into /dev/null)."""
        out = subprocess.run(
            [*self.prefix, "curl", "-sf", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
             f"{url}/{REPO}/resolve/main/{BIG}"],
            check=True, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        seconds, got = float(out[0]), int(out[1])
        if got != self.big:
            raise RuntimeError(f"curl got {got} bytes of {self.big}")
        return f"{label}: curl of {BIG} alone {seconds:.3f} s ({got / seconds / 1e9:.3f} GB/s, one stream)"

    def round_trip(self, url: str, label: str) -> str:
        """A note: connected to response done, for the health route; best of 5 (new connections)."""
        samples = []
        for _ in range(5):
            out = subprocess.run(
                [*self.prefix, "curl", "-sf", "-o", "/dev/null", "-w",
                 "%{time_connect} %{time_total}", url + HEALTH],
                check=True, capture_output=True, text=True,
            ).stdout.split()  # fmt: skip
            samples.append(float(out[1]) - float(out[0]))
        return f"{label}: health request and response {min(samples) * 1000:.2f} ms"


def median_interleaved(actions: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeat):
        for name, action in actions.items():
            samples[name].append(action())
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(clients: Clients, name: str, repeat: int, goal: float, notes: list[str]) -> list[Row]:
    """Two anchors: snapshot_download as users run it (bytes possibly still in the page cache), and
    followed by ``sync`` (on disk, as a pull leaves them: a pull fsyncs before it publishes)."""
    actions = {
        "snapshot": clients.snapshot,
        "snapshot+sync": lambda: clients.snapshot(True),
        "pull": clients.pull,
    }
    times = median_interleaved(actions, repeat)
    call = statistics.median(clients.call_only)
    notes.append(f"{name}: snapshot_download call alone {call:.3f} s "
                 f"(process start-up and imports {times['snapshot'] - call:.3f} s)")  # fmt: skip
    return [
        Row(name, "snapshot_download", times["snapshot"], times["pull"], clients.total, goal),
        Row(name, "snapshot_download; sync", times["snapshot+sync"], times["pull"], clients.total, goal),
    ]


# -- the emulated WAN ---------------------------------------------------------------------------------


class Wan:
    """Two namespaces, a shaped veth pair between them, the node in one, a delaying relay in the other."""

    def __init__(self, rate: str, rtt_ms: float, work: Path) -> None:
        tag = os.getpid() % 100000
        self.client_ns, self.server_ns = f"mdbench-c{tag}", f"mdbench-s{tag}"
        self.client_if, self.server_if = f"mdbc{tag}", f"mdbs{tag}"
        self.client_ip, self.server_ip = "10.233.7.1", "10.233.7.2"
        self.rate, self.rtt_ms, self.work = rate, rtt_ms, work
        self.made: list[str] = []
        self.node: subprocess.Popen[bytes] | None = None
        self.relay: subprocess.Popen[str] | None = None
        self.relay_port = 0

    def client(self) -> Prefix:
        return ["ip", "netns", "exec", self.client_ns]

    def server(self) -> Prefix:
        return ["ip", "netns", "exec", self.server_ns]

    def setup(self, home: Path) -> None:
        for ns in (self.client_ns, self.server_ns):
            _ip("netns", "add", ns)
            self.made.append(ns)
        _ip("link", "add", self.client_if, "type", "veth", "peer", "name", self.server_if)
        for ns, dev, ip in ((self.client_ns, self.client_if, self.client_ip),
                            (self.server_ns, self.server_if, self.server_ip)):  # fmt: skip
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                  "burst", "1mb", "latency", "50ms"])  # fmt: skip
        self.node = start_node(home, self.server(), "0.0.0.0", NODE_PORT, self.work / "node-wan.log")
        wait_healthy(f"http://127.0.0.1:{NODE_PORT}", self.server(), self.node)
        wait_healthy(self.direct_url, self.client(), self.node)
        self.relay = subprocess.Popen(
            [*self.client(), sys.executable, __file__, "--relay", f"{self.server_ip}:{NODE_PORT}",
             "--delay-ms", str(self.rtt_ms / 2)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.relay.stdout is not None
        line = self.relay.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"the relay did not start: {line!r}")
        self.relay_port = int(line.split()[1])
        wait_healthy(self.relay_url, self.client(), self.node)

    @property
    def direct_url(self) -> str:
        return f"http://{self.server_ip}:{NODE_PORT}"

    @property
    def relay_url(self) -> str:
        return f"http://127.0.0.1:{self.relay_port}"

    def teardown(self) -> None:
        stop(self.node)
        stop(self.relay)
        for ns in reversed(self.made):  # deleting a namespace deletes its end of the veth, and the pair
            subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "link", "del", self.client_if], check=False, capture_output=True)


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")


# -- the relay (runs as its own process, in the client namespace) -------------------------------------


async def _delay_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer`` in order, each piece ``delay`` seconds after it was read.

    Reading never waits for writing (up to RELAY_BUFFER pieces), so the delay adds latency, not a cap on
    throughput: a piece whose time has come while the writer was busy goes out at once.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(RELAY_BUFFER)

    async def read_side() -> None:
        data = b"x"
        while data:
            try:
                data = await reader.read(PIECE)
            except OSError:
                data = b""
            await queue.put((loop.time() + delay, data))

    async def write_side() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.create_task(read_side())
    try:
        await write_side()
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)


async def _relay(target: str, delay: float) -> None:
    host, port = target.rsplit(":", 1)

    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        for w in (client_w, server_w):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pumps = [asyncio.create_task(_delay_line(client_r, server_w, delay)),
                 asyncio.create_task(_delay_line(server_r, client_w, delay))]  # fmt: skip
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.exception() is not None for t in done):  # a reset: end both directions
                for task in pumps:
                    task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for w in (client_w, server_w):
                w.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0, backlog=256)
    print("listening", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# -- the run --------------------------------------------------------------------------------------------


def machine_facts() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, {ram / 2**30:.0f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}, "
            f"huggingface_hub {version('huggingface_hub')}, aiohttp {version('aiohttp')}, "
            f"modeldepot {version('modeldepot')}")  # fmt: skip


def loopback(home: Path, work: Path, total: int, args: argparse.Namespace, notes: list[str]) -> list[Row]:
    port = free_port()
    node = start_node(home, [], "127.0.0.1", port, work / "node-loopback.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, [], node)
        clients = Clients([], url, work, total, parse_size(args.size))
        notes.append(clients.curl(url, "loopback"))
        return measure(clients, "pull, whole repo, loopback", args.repeat, args.goal or 3.0, notes)
    finally:
        stop(node)


def wan(home: Path, work: Path, total: int, args: argparse.Namespace, notes: list[str]) -> list[Row]:
    link = f"{args.rate} tbf veth, {args.rtt_ms:g} ms RTT relay"
    net = Wan(args.rate, args.rtt_ms, work)
    try:
        try:
            net.setup(home)
        except (OSError, RuntimeError) as error:
            print(f"\nWAN section skipped: {error}", file=sys.stderr)
            return []
        clients = Clients(net.client(), net.relay_url, work, total, parse_size(args.size))
        notes.append(clients.curl(net.direct_url, "wan, veth without the relay"))
        notes.append(clients.curl(net.relay_url, "wan, through the relay"))
        notes.append(clients.round_trip(net.direct_url, "wan, veth without the relay"))
        notes.append(clients.round_trip(net.relay_url, "wan, through the relay"))
        return measure(clients, f"pull, whole repo, WAN ({link})", args.repeat, args.goal or 2.0, notes)
    finally:
        net.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="2GiB", help="size of model.safetensors")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    parser.add_argument("--quick", action="store_true", help="256MiB, one run: a sanity check")
    parser.add_argument("--only", choices=("loopback", "wan"), help="run one section")
    parser.add_argument("--rate", default="1gbit", help="tbf rate on both veth ends")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip the relay adds")
    parser.add_argument(
        "--goal", type=float, default=0.0, help="override the issue's goals (3x loopback, 2x WAN)"
    )
    parser.add_argument("--relay", help=argparse.SUPPRESS)  # HOST:PORT: run as the delaying relay
    parser.add_argument("--delay-ms", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        asyncio.run(_relay(args.relay, args.delay_ms / 1000))
        return
    if args.quick:
        args.size, args.repeat = "256MiB", 1
    work = args.dir.resolve() / "pull"
    work.mkdir(parents=True, exist_ok=True)
    home = work / "source-store"
    shutil.rmtree(home, ignore_errors=True)
    total = make_repo(work / "repo", parse_size(args.size))
    subprocess.run(modeldepot("import", str(work / "repo"), "--repo", REPO, "--home", str(home)),
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    print(machine_facts())
    print(f"repo {REPO}: {total / 2**30:.3f} GiB in 3 files; median of {args.repeat}")
    rows: list[Row] = []
    notes: list[str] = []
    try:
        if args.only in (None, "loopback"):
            rows.extend(loopback(home, work, total, args, notes))
        if args.only in (None, "wan"):
            rows.extend(wan(home, work, total, args, notes))
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work / "repo", ignore_errors=True)
    render("modeldepot pull vs snapshot_download from a node", rows)
    print()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
