"""Pulling a whole repo from a node: ``modeldepot pull`` against ``snapshot_download``, in the same run.

    .venv/bin/python benchmarks/bench_pull.py [--size 2GiB] [--repeat 3] [--dir ./bench-data] [--quick]
                                               [--only loopback|wan] [--rtt-ms 20] [--rate 1gbit]
                                               [--scenarios [a,b,c]]

The repo is one big random ``model.safetensors`` (``--size``) plus a small ``config.json`` and
``tokenizer.json``, imported into a source store with ``modeldepot import`` and served by
``modeldepot serve`` in its own process. Each client runs in a fresh process into a fresh, empty
destination, set aside afterwards and deleted when the section ends (a deletion right before a run made
that run pay: see ``Trash``); the whole process is timed (start-up included, for both), after an untimed
``sync`` and memory as big as the run's writes recycled (``recycle_memory``). Runs of the two clients are
interleaved and we take the median of ``--repeat``.

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

``--scenarios`` (issue 14) runs, instead of the two sections above, three repos on one loopback node:

- (a) one big file (``--size``, 2 GiB) + ``config.json``;
- (b) four shards of ``--size``/8 (256 MiB) + ``model.safetensors.index.json``, ``config.json`` and a
  ~2 MiB ``tokenizer.json``;
- (c) 300 files of 4-200 KiB (sizes and bytes from a fixed seed) in a few folders.

For each repo, interleaved, median of ``--repeat`` (``--scenarios a,c`` picks some):

- anchor: ``snapshot_download`` as above (``HF_ENDPOINT=NODE``);
- the Hub path: ``modeldepot pull REPO`` with ``HF_ENDPOINT=NODE`` and ``MODELDEPOT_SERVERS=`` (empty):
  the node is only a Hub to it (no chunk digests); its ``bytes_by_source`` must say "hub" for every byte;
- the depot path: ``modeldepot pull REPO --server NODE`` (same ``HF_ENDPOINT``); every byte from "node";
- the machine's floor, in the same loop: the same files from the same node to ``/dev/null`` by curl in
  parallel, two ways (one ``curl -Z --parallel-max 8`` process, files over 32 MiB in 16 MiB ranges, kept
  connections; and ``xargs -P 8`` of one curl process per file or 64 MiB slice), the faster of the two
  counting; SHA-256 of the same bytes on one core (``hashlib``, 16 MiB reads of the repo's files, from
  the page cache); and ``dd bs=16M conv=fdatasync`` of the biggest file into the work folder (the disk,
  printed, not part of the floor: pulls publish once verified and flush later). The floor is
  ``min(curl, SHA-256)`` as a rate; the output says which binds, and each pull's rate ÷ the floor's
  (goal 0.8). The pulls' times include process start-up; the floors' do not (start-up is printed apart).

Goals (issue 14): Hub path >= 3x snapshot_download for (a) and (b), >= 2x for (c); the depot path within
10% of the Hub path or faster (Hub time / depot time >= 0.9); each pull >= 0.8 of the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

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
    for name in ("HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_OFFLINE", "MODELDEPOT_OFFLINE", "MODELDEPOT_HOME",
                 "MODELDEPOT_CLUSTER", "MODELDEPOT_CLUSTER_PREFIX"):  # fmt: skip
        env.pop(name, None)
    return env


class Trash:
    """Finished destinations, set aside with one rename and deleted when a section ends.

    Deleting them between runs made the next run pay for it: on an ext4 without a journal (this machine's
    root) a new inode skips every inode deleted in the last 5-35 seconds (``recently_deleted`` in the
    allocator), so after a run of 300 files was deleted, each file the next client created cost about
    0.7 ms instead of 0.03 ms, the anchor's and ours alike. Whoever ran right after a deletion paid most.
    Big files are emptied at once, though: nine kept copies of 2 GiB filled the page cache, and the runs
    after paid for reclaiming it (a pull's system time doubled)."""

    def __init__(self) -> None:
        self.folders: list[Path] = []

    def put(self, dest: Path) -> None:
        if dest.exists():
            for folder, _, names in os.walk(dest):
                for name in names:
                    path = os.path.join(folder, name)
                    if not os.path.islink(path) and os.path.getsize(path) > 1 << 20:
                        os.chmod(path, 0o644)  # blobs are read-only
                        os.truncate(path, 0)
            aside = dest.with_name(f"{dest.name}.done-{len(self.folders)}")
            shutil.rmtree(aside, ignore_errors=True)
            dest.rename(aside)
            self.folders.append(aside)

    def empty(self) -> None:
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        self.folders.clear()


TRASH = Trash()


def recycle_memory(folder: Path, size: int) -> None:
    """Write ``size`` bytes into a scratch file and delete it, so that the next run's page cache comes
    from memory just freed. This VM's kernel hands free memory back to its host, and a page fresh from the
    host costs about 2.3 s of system time per GiB on first touch: without this, whichever client ran
    when memory had gone back paid it, and a 1 GiB write took 0.3 s or 2.3 s (docs/benchmarks.md)."""
    scratch = folder / "recycle.tmp"
    block = bytes(16 << 20)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(-(-size // len(block))):
            os.write(fd, block)
    finally:
        os.close(fd)
        scratch.unlink()


def timed(command: list[str], env: dict[str, str], dest: Path, then_sync: bool = False,
          recycle: int = 0) -> tuple[float, str]:  # fmt: skip
    """Wall time of ``command`` writing into the fresh ``dest`` (set aside afterwards: :class:`Trash`),
    and its stdout. ``then_sync``: the time includes a ``sync`` after it (the bytes on disk, as a pull
    leaves them). ``recycle``: bytes of memory recycled right before (:func:`recycle_memory`)."""
    TRASH.put(dest)
    os.sync()
    if recycle:  # after the sync, which can take a second: recycled pages go back to the host in about one
        recycle_memory(dest.parent, recycle)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if then_sync:
        os.sync()
    seconds = time.perf_counter() - start
    TRASH.put(dest)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


class Clients:
    """Runs both clients against one node URL from one namespace; keeps what each run reported."""

    def __init__(self, prefix: Prefix, url: str, work: Path, total: int, big: int, repo: str = REPO,
                 big_path: str = BIG) -> None:  # fmt: skip
        self.prefix, self.url, self.work, self.total, self.big = prefix, url, work, total, big
        self.repo, self.big_path = repo, big_path
        self.call_only: list[float] = []  # snapshot_download's call alone, without process start-up
        self.recycle = total + (64 << 20)  # memory recycled before each run: what it writes, and some
        self._commit: str | None = None

    @property
    def commit(self) -> str:
        """The repo's commit on the node: curl asks files by it (a branch's LFS file is a redirect there)."""
        if self._commit is None:
            out = subprocess.run([*self.prefix, "curl", "-sf", f"{self.url}/api/models/{self.repo}"],
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            self._commit = str(json.loads(out)["sha"])
        return self._commit

    def snapshot(self, then_sync: bool = False) -> float:
        dest = self.work / "dest-snapshot"
        command = [*self.prefix, sys.executable, "-c", SNAPSHOT, self.repo, str(dest), self.url]
        seconds, out = timed(command, client_env(self.url), dest, then_sync, self.recycle)
        call, got = out.split()[-2:]
        if int(got) != self.total:
            raise RuntimeError(f"snapshot_download brought {got} bytes, the repo has {self.total}")
        self.call_only.append(float(call))
        return seconds

    def pull(self) -> float:
        dest = self.work / "dest-pull"
        command = [*self.prefix, *modeldepot("pull", self.repo, "--home", str(dest), "--json")]
        seconds, out = timed(command, client_env(self.url), dest, recycle=self.recycle)
        result = json.loads(out)
        if result["bytes_total"] != self.total or result["bytes_downloaded"] != self.total:
            raise RuntimeError(f"pull reported {result}, the repo has {self.total} bytes")
        return seconds

    def curl(self, url: str, label: str) -> str:
        """A note: how long curl takes to fetch the big file from ``url`` (one stream, into /dev/null)."""
        out = subprocess.run(
            [*self.prefix, "curl", "-sf", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
             f"{url}/{self.repo}/resolve/{self.commit}/{self.big_path}"],
            check=True, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        seconds, got = float(out[0]), int(out[1])
        if got != self.big:
            raise RuntimeError(f"curl got {got} bytes of {self.big}")
        return f"{label}: curl of {self.big_path} alone {seconds:.3f} s ({got / seconds / 1e9:.3f} GB/s, one stream)"

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


def interleaved(actions: dict[str, Callable[[], float]], repeat: int) -> dict[str, list[float]]:
    """Every action once per round, ``repeat`` rounds: drifting load hits all alike. The order rotates
    by one each round, so that no action always runs right after the same other one (whose deleted
    files, freed pages and freshly freed inodes the next run pays for on this machine)."""
    samples: dict[str, list[float]] = {name: [] for name in actions}
    names = list(actions)
    for round_number in range(repeat):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(actions[name]())
    return samples


def median_interleaved(actions: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in interleaved(actions, repeat).items()}


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


# -- scenarios (issue 14): three repos on one loopback node; the Hub path, the depot path, the floor -----

SCENARIO_KEYS = ("a", "b", "c")
CURL_RANGE = 16 << 20  # bytes per range of the one-process curl floor (files over twice this are split)
XARGS_SLICE = 64 << 20  # bytes per curl process of the xargs floor (files over this are split)
CURL_PARALLEL = 8
SMALL_FILES = 300


@dataclass
class Scenario:
    key: str
    repo: str
    title: str
    goal: float  # the Hub path against snapshot_download
    folder: Path
    files: list[tuple[str, int]]  # (path in the repo, size), sorted

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def biggest(self) -> tuple[str, int]:
        return max(self.files, key=lambda item: item[1])


def _small_json(folder: Path) -> None:
    config = {"architectures": ["BenchModel"], "model_type": "bench", "hidden_size": 1024}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file()
    )


def make_scenario(key: str, folder: Path, big: int) -> Scenario:
    """Repo (a), (b) or (c) in ``folder`` (made anew): ``big`` is (a)'s file, (b)'s shards are ``big``/8."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if key == "a":
        random_file(folder / BIG, big, 11)
        _small_json(folder)
        title, goal = f"(a) one {big / 2**30:.2f} GiB file + config.json", 3.0
    elif key == "b":
        shard = big // 8
        names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
        for i, name in enumerate(names):
            random_file(folder / name, shard, 21 + i)
        weight_map = {f"layers.{layer}.weight": names[layer * 4 // 32] for layer in range(32)}
        index = {"metadata": {"total_size": 4 * shard}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _small_json(folder)
        vocab = {f"tok{i:06d}": i for i in range(100_000)}  # about 2 MiB of JSON
        tokenizer = {
            "version": "1.0",
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "tok000000"},
        }
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer) + "\n")
        title, goal = f"(b) 4 x {shard / 2**20:.0f} MiB shards + 3 small files", 3.0
    elif key == "c":
        rng = np.random.default_rng(14)
        sizes = rng.integers(4 << 10, (200 << 10) + 1, SMALL_FILES)
        for i, size in enumerate(sizes):
            path = folder / "data" / f"{i // 50:02d}" / f"part-{i:03d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.bytes(int(size)))
        title, goal = f"(c) {SMALL_FILES} files of 4-200 KiB", 2.0
    else:
        raise ValueError(f"no scenario {key!r}")
    return Scenario(key, f"bench/pull-{key}", title, goal, folder, _listing(folder))


class ScenarioClients(Clients):
    """The three clients and the floor's measures for one scenario, against one loopback node."""

    def __init__(self, url: str, work: Path, scenario: Scenario) -> None:
        path, size = scenario.biggest
        super().__init__([], url, work, scenario.total, size, scenario.repo, path)
        self.scenario = scenario

    def pull_via(self, source: str) -> float:
        """``modeldepot pull`` by the Hub path (``source="hub"``: HF_ENDPOINT only, no depot servers) or
        the depot path (``"node"``: ``--server NODE``); every byte must have come from that source."""
        dest = self.work / f"dest-pull-{source}"
        extra = ["--server", self.url] if source == "node" else []
        env = {**client_env(self.url), "MODELDEPOT_SERVERS": ""}
        command = modeldepot("pull", self.repo, "--home", str(dest), "--json", *extra)
        seconds, out = timed(command, env, dest, recycle=self.recycle)
        result = json.loads(out)
        by_source = result.get("bytes_by_source", {})
        if result["bytes_total"] != self.total or result["bytes_downloaded"] != self.total:
            raise RuntimeError(f"pull ({source}) reported {result}, the repo has {self.total} bytes")
        if by_source.get(source) != self.total:
            raise RuntimeError(f"pull ({source}) took its bytes from {by_source}, not all from {source!r}")
        return seconds

    def _url(self, path: str) -> str:
        return f"{self.url}/{self.repo}/resolve/{self.commit}/{path}"

    def curl_one_process(self) -> float:
        """One ``curl -Z`` process, CURL_PARALLEL transfers at once over kept connections; files over
        twice CURL_RANGE fetched in CURL_RANGE ranges. Wall time."""
        groups = []
        for path, size in self.scenario.files:
            ranges = [(0, size - 1)] if size <= 2 * CURL_RANGE else [
                (start, min(start + CURL_RANGE, size) - 1) for start in range(0, size, CURL_RANGE)]  # fmt: skip
            # a config file's "next" starts a new group of options, so each transfer carries all of its own
            groups += [f'url = "{self._url(path)}"\noutput = "/dev/null"\nrange = "{first}-{last}"\n'
                       'silent\nfail\nwrite-out = "%{size_download}\\n"\n' for first, last in ranges]  # fmt: skip
        config = self.work / "curl-floor.conf"
        config.write_text("next\n".join(groups))
        command = ["curl", "-s", "-Z", "--parallel-max", str(CURL_PARALLEL), "-K", str(config)]
        return self._curl_timed(command, None)

    def curl_xargs(self) -> float:
        """``xargs -P CURL_PARALLEL`` of one curl process per file, or per XARGS_SLICE of a bigger file."""
        items = []
        for path, size in self.scenario.files:
            for start in range(0, size, XARGS_SLICE):
                items += [f"{start}-{min(start + XARGS_SLICE, size) - 1}", self._url(path)]
        command = ["xargs", "-P", str(CURL_PARALLEL), "-n", "2", "curl", "-sf", "-o", "/dev/null",
                   "-w", "%{size_download}\n", "-r"]  # fmt: skip
        return self._curl_timed(command, "\n".join(items) + "\n")

    def _curl_timed(self, command: list[str], stdin: str | None) -> float:
        os.sync()
        start = time.perf_counter()
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{command[:4]} failed ({done.returncode}): {done.stderr[-2000:]}")
        got = sum(int(n) for n in done.stdout.split())
        if got != self.total:
            raise RuntimeError(f"{command[0]} fetched {got} bytes, the repo has {self.total}")
        return seconds

    def sha256_one_core(self) -> float:
        """SHA-256 of every file of the repo, one after the other on this thread (16 MiB reads)."""
        buffer = bytearray(16 << 20)
        view = memoryview(buffer)
        os.sync()
        start = time.perf_counter()
        for path, _ in self.scenario.files:
            digest = hashlib.sha256()
            with open(self.scenario.folder / path, "rb", buffering=0) as handle:
                while n := handle.readinto(buffer):
                    digest.update(view[:n])
        return time.perf_counter() - start

    def dd_fdatasync(self) -> float:
        """``dd bs=16M conv=fdatasync`` of the biggest file into the work folder (the pulls' disk)."""
        target = self.work / "dd-floor.bin"
        target.unlink(missing_ok=True)
        os.sync()
        source = self.scenario.folder / self.big_path
        start = time.perf_counter()
        subprocess.run(["dd", f"if={source}", f"of={target}", "bs=16M", "conv=fdatasync", "status=none"],
                       check=True)  # fmt: skip
        seconds = time.perf_counter() - start
        target.unlink()
        return seconds


def _gbps(size: int, seconds: float) -> str:
    return f"{seconds:.3f} s ({size / seconds / 1e9:.2f} GB/s)"


def use_bytecode_cache(work: Path) -> str:
    """Let every Python process started from here keep compiled bytecode, under ``work/pycache``.

    This environment sets PYTHONDONTWRITEBYTECODE=1 and modeldepot is installed editable (no .pyc): each
    modeldepot process would compile its sources again, which an installed package never does, while
    huggingface_hub's site-packages have their .pyc. PYTHONPYCACHEPREFIX keeps the cache out of the
    source tree. Returns a line for the output."""
    before = os.environ.get("PYTHONDONTWRITEBYTECODE")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    for module in ("modeldepot.cli", "huggingface_hub"):  # compiled once here, untimed
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return (f"client processes keep bytecode in {work / 'pycache'} (PYTHONPYCACHEPREFIX; "
            f"PYTHONDONTWRITEBYTECODE was {before!r}, now unset), compiled once before timing")  # fmt: skip


def startup_costs(repeat: int = 5) -> str:
    """Median of ``repeat`` runs, interleaved, of what a client process pays before its work: the
    interpreter, and each client's imports (with the bytecode cache; for modeldepot, also without)."""
    no_bytecode = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    no_bytecode.pop("PYTHONPYCACHEPREFIX", None)
    commands: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "python -c pass": ([sys.executable, "-c", "pass"], None),
        "import modeldepot.cli": ([sys.executable, "-c", "import modeldepot.cli"], None),
        "import modeldepot.cli without bytecode": ([sys.executable, "-c", "import modeldepot.cli"], no_bytecode),
        "from huggingface_hub import snapshot_download": (
            [sys.executable, "-c", "from huggingface_hub import snapshot_download"], None),
    }  # fmt: skip

    def run(command: list[str], env: dict[str, str] | None) -> float:
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        return time.perf_counter() - start

    actions = {name: lambda c=command, e=env: run(c, e) for name, (command, env) in commands.items()}
    medians = median_interleaved(actions, repeat)
    return (f"process start-up (median of {repeat}; in every client's time, in no floor): "
            + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in medians.items()))  # fmt: skip


def run_scenarios(work: Path, args: argparse.Namespace, bytecode: str) -> None:
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = set(keys) - set(SCENARIO_KEYS)
    if unknown or not keys:
        raise SystemExit(f"--scenarios takes some of {','.join(SCENARIO_KEYS)}, not {args.scenarios!r}")
    big = parse_size(args.size)
    home = work / "scenario-store"
    shutil.rmtree(home, ignore_errors=True)
    made = time.perf_counter()
    scenarios = [make_scenario(key, work / f"repo-{key}", big) for key in keys]
    for scenario in scenarios:
        subprocess.run(modeldepot("import", str(scenario.folder), "--repo", scenario.repo, "--home", str(home)),
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    os.sync()
    print(machine_facts())
    print(bytecode)
    print(f"repos made and imported in {time.perf_counter() - made:.1f} s; median of {args.repeat} "
          f"interleaved runs per repo")  # fmt: skip
    for scenario in scenarios:
        print(f"  {scenario.repo}: {scenario.title}: {len(scenario.files)} files, "
              f"{scenario.total / 2**30:.3f} GiB")  # fmt: skip
    rows: list[Row] = []
    floors: list[str] = []
    notes = [startup_costs()]
    port = free_port()
    node = start_node(home, [], "127.0.0.1", port, work / "node-scenarios.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, [], node)
        for scenario in scenarios:
            rows += measure_scenario(ScenarioClients(url, work, scenario), node.pid, args, floors, notes)
            TRASH.empty()  # (a)'s nine copies of 2 GiB need not wait for (c)
    finally:
        stop(node)
        TRASH.empty()
        shutil.rmtree(home, ignore_errors=True)
        for scenario in scenarios:
            shutil.rmtree(scenario.folder, ignore_errors=True)
        (work / "curl-floor.conf").unlink(missing_ok=True)
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "200")  # rich's table unwrapped in a log file
    render("issue 14: modeldepot pull by the Hub path and the depot path, loopback", rows)
    print("\nThe floor, measured in the same loop (medians; the faster curl counts):\n")
    print("| repo | curl -Z x8, one process | xargs -P 8 curl | SHA-256, one core | dd conv=fdatasync, "
          "biggest file | floor | binds | Hub path / floor | depot path / floor |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for line in floors:
        print(line)
    print()
    for note in notes:
        print(note)


def children_cpu() -> tuple[float, float]:
    """CPU seconds (user, system) of this process's waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_scenario(clients: ScenarioClients, node_pid: int, args: argparse.Namespace, floors: list[str],
                     notes: list[str]) -> list[Row]:  # fmt: skip
    scenario, total = clients.scenario, clients.total
    clients_cpu: dict[str, list[tuple[float, float]]] = {}
    nodes_cpu: dict[str, list[float]] = {}

    def with_cpu(name: str, action: Callable[[], float]) -> Callable[[], float]:
        """``action``, noting the CPU its child processes and the node used while it ran."""

        def run() -> float:
            child, node = children_cpu(), process_cpu(node_pid)
            seconds = action()
            after = children_cpu()
            clients_cpu.setdefault(name, []).append((after[0] - child[0], after[1] - child[1]))
            nodes_cpu.setdefault(name, []).append(process_cpu(node_pid) - node)
            return seconds

        return run

    actions: dict[str, Callable[[], float]] = {
        "snapshot_download": clients.snapshot,
        "pull, Hub path": lambda: clients.pull_via("hub"),
        "pull --server": lambda: clients.pull_via("node"),
        "curl -Z": clients.curl_one_process,
        "xargs curl": clients.curl_xargs,
        "sha256": clients.sha256_one_core,
        "dd": clients.dd_fdatasync,
    }
    cpu_noted = ("snapshot_download", "pull, Hub path", "pull --server", "curl -Z", "xargs curl")
    actions = {name: with_cpu(name, a) if name in cpu_noted else a for name, a in actions.items()}
    clients.sha256_one_core()  # the repo's files into the page cache, where the node's blobs are too
    started = time.perf_counter()
    samples = interleaved(actions, args.repeat)
    elapsed = time.perf_counter() - started
    t = {name: statistics.median(values) for name, values in samples.items()}
    curl_name = min(("curl -Z", "xargs curl"), key=lambda name: t[name])
    curl = t[curl_name]
    # the floor is the slower of the wire and the hash: min of the two rates, the longer of the two times
    floor, binds = (
        (curl, f"loopback {curl_name}") if curl >= t["sha256"] else (t["sha256"], "SHA-256, one core")
    )
    hub, node = t["pull, Hub path"], t["pull --server"]
    big_size = scenario.biggest[1]
    floors.append(
        f"| {scenario.title} | {_gbps(total, t['curl -Z'])} | {_gbps(total, t['xargs curl'])} | "
        f"{_gbps(total, t['sha256'])} | {_gbps(big_size, t['dd'])} | {_gbps(total, floor)} | {binds} | "
        f"{floor / hub:.2f} | {floor / node:.2f} |"
    )
    call = statistics.median(clients.call_only[-args.repeat :])
    notes.append(f"({scenario.key}) measured in {elapsed:.0f} s; samples (s): " + "; ".join(
        f"{name} " + ", ".join(f"{v:.3f}" for v in values) for name, values in samples.items()))  # fmt: skip
    notes.append(f"({scenario.key}) CPU seconds (medians) of the client processes, user + system, and of the node, "
                 f"on {os.cpu_count()} cores: " + ", ".join(
                     f"{name} {statistics.median(u for u, _ in clients_cpu[name]):.2f} + "
                     f"{statistics.median(s for _, s in clients_cpu[name]):.2f}, node "
                     f"{statistics.median(nodes_cpu[name]):.2f} (wall {t[name]:.2f})" for name in cpu_noted))  # fmt: skip
    notes.append(f"({scenario.key}) snapshot_download call alone {call:.3f} s (process start-up and imports "
                 f"{t['snapshot_download'] - call:.3f} s); the floor binds: {binds}")  # fmt: skip
    goal = args.goal or scenario.goal
    return [
        Row(
            f"({scenario.key}) pull, Hub path", "snapshot_download", t["snapshot_download"], hub, total, goal
        ),
        Row(f"({scenario.key}) pull --server", "pull, Hub path", hub, node, total, 0.9),
        Row(f"({scenario.key}) pull, Hub path", f"floor ({binds})", floor, hub, total, 0.8),
        Row(f"({scenario.key}) pull --server", f"floor ({binds})", floor, node, total, 0.8),
    ]


# -- the run --------------------------------------------------------------------------------------------


def machine_facts() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    vm = {
        name: Path(f"/proc/sys/vm/{name}").read_text().strip()
        for name in ("dirty_background_ratio", "dirty_ratio")
    }
    return (f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, {ram / 2**30:.0f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}, "
            f"huggingface_hub {version('huggingface_hub')}, aiohttp {version('aiohttp')}, "
            f"modeldepot {version('modeldepot')} ({source_state()}), "
            f"MODELDEPOT_DURABILITY={os.environ.get('MODELDEPOT_DURABILITY') or '(unset: deferred)'}, "
            f"vm.dirty_background_ratio {vm['dirty_background_ratio']}%, "
            f"vm.dirty_ratio {vm['dirty_ratio']}%")  # fmt: skip


def source_state() -> str:
    """The commit of the code under test, and whether src/ has changes not committed (read only)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"], check=True,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}" + (f", {len(dirty.splitlines())} files changed in src/" if dirty else "")


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
    parser.add_argument(
        "--quick", action="store_true", help="--size 256MiB ((b): 32 MiB shards), one run: a sanity check"
    )
    parser.add_argument("--only", choices=("loopback", "wan"), help="run one section")
    parser.add_argument("--rate", default="1gbit", help="tbf rate on both veth ends")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip the relay adds")
    parser.add_argument(
        "--goal", type=float, default=0.0, help="override the issue's goals (3x loopback, 2x WAN)"
    )
    parser.add_argument(
        "--scenarios", nargs="?", const=",".join(SCENARIO_KEYS), metavar="a,b,c",
        help="issue 14: repos (a) big file, (b) shards, (c) 300 small files on a loopback node, the Hub path, "
        "the --server path and the floor, instead of the loopback and wan sections",
    )  # fmt: skip
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
    bytecode = use_bytecode_cache(work)
    if args.scenarios is not None:
        if args.only == "wan":
            parser.error("--scenarios runs on loopback only")
        run_scenarios(work, args, bytecode)
        return
    home = work / "source-store"
    shutil.rmtree(home, ignore_errors=True)
    total = make_repo(work / "repo", parse_size(args.size))
    subprocess.run(modeldepot("import", str(work / "repo"), "--repo", REPO, "--home", str(home)),
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    print(machine_facts())
    print(bytecode)
    print(f"repo {REPO}: {total / 2**30:.3f} GiB in 3 files; median of {args.repeat}")
    rows: list[Row] = []
    notes: list[str] = []
    try:
        if args.only in (None, "loopback"):
            rows.extend(loopback(home, work, total, args, notes))
        if args.only in (None, "wan"):
            rows.extend(wan(home, work, total, args, notes))
    finally:
        TRASH.empty()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work / "repo", ignore_errors=True)
    render("modeldepot pull vs snapshot_download from a node", rows)
    print()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
