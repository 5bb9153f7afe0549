"""A fleet pulling one model at once from a Hub behind a slow uplink (issue 13, item 5).

    .venv/bin/python benchmarks/bench_fleet.py [--size 1GiB] [--nodes 8] [--shards 4] [--quick]
        [--scenarios anchor,solo,cluster] [--uplink 500mbit] [--link 1gbit] [--dir ./bench-data]
        [--etcd-stall SECONDS]

Needs root (network namespaces, ``tc``) and etcd (``./scripts/install-etcd``).

The network, all in namespaces named ``mdbfleet-*`` (whatever a crashed run left is removed at start;
everything is removed at the end, Ctrl-C included): a Linux bridge in ``mdbfleet-core``, which also holds
etcd (3.4, ``--heartbeat-interval 10 --election-timeout 100`` as in the tests, its data in /dev/shm: a
registry on its own machine, not on the nodes' disk); the Hub in ``mdbfleet-hub`` behind a veth shaped
with ``tbf`` at ``--uplink`` both ways; ``--nodes`` nodes, each in ``mdbfleet-nK`` behind its own veth
shaped at ``--link`` both ways. There is no added delay (no ``netem`` in this kernel).

The Hub is a ``modeldepot serve`` (no cluster, no token) on a store into which the repo was imported: one
``--size`` of random bytes in ``--shards`` safetensors files, plus ``config.json``. Its bytes sent are the
``tx_bytes`` of its veth before and after each scenario: every byte it sent, HTTP and TCP/IP headers and
retransmissions included. A veth counts segmentation-offloaded packets (one header per up to 64 KiB), so
this is ~0.1% above the payload (the run prints the figure for its ``curl``), where a real 1500-byte MTU
wire carries ~3% more.

Three scenarios, each with every node starting at one moment into an empty store, each node's time
being its process's exit, from that moment (process start-up included):

- anchor: ``huggingface_hub.snapshot_download(repo, cache_dir=DEST)`` with ``HF_ENDPOINT=<hub>`` (no
  hf_transfer, no xet, no telemetry);
- solo: ``modeldepot pull REPO --home DEST --json`` with ``HF_ENDPOINT=<hub>``: each node from the Hub;
- cluster: every node runs ``modeldepot serve --cluster etcd://... --advertise http://NODE:8980`` with a
  shared ``MODELDEPOT_TOKEN`` (none with ``--no-token``); once all are healthy and each lists every node in ``/api/depot/v1/peers``,
  all run ``modeldepot pull REPO --home HOME --cluster etcd://... --json`` into the served store (the
  serve process gives peers the chunks its pull has landed).

Goals (issue 13): for the cluster, Hub bytes ≤ 1.05× the repo, all nodes done ≥ 5× sooner than the
anchor, p99 of the node times ≤ 1.5× their p50. Floors measured in the same run: ``curl`` of the repo's
files through the uplink (one copy), a single writer's fsynced write rate of this disk (the nodes share
it), and, per scenario, the CPU time it used on the whole machine ÷ its cores (the nodes share them; the
run also prints SHA-256 and BLAKE3 rates). The largest floor is said to bind. Each scenario also shows
when the Hub sent its first MiB and 99% of its bytes, from its counter sampled every 0.2 s, and where the
CPU time went (the clients, the Hub, the nodes' serve processes, etcd, the rest); a scenario that began on
a machine already busy with others' work is flagged, its figures not clean.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import numpy as np
from rich.console import Console
from rich.table import Table

from bench_pull import machine_facts
from common import Row, random_file, render
from modeldepot.config import parse_size
from netns import (
    add_namespace,
    attach,
    bridge,
    counter,
    in_ns,
    remove_namespaces,
    sampler,
    shape,
    up,
    veth,
)

REPO = "bench/fleet"
PREFIX = "mdbfleet-"
CORE, HUB = f"{PREFIX}core", f"{PREFIX}hub"
SUBNET = "10.213.0"
BRIDGE_IP = f"{SUBNET}.1"  # the bridge's own address, in the core namespace: etcd listens there
HUB_IP = f"{SUBNET}.2"
PORT = 8980  # every server has a namespace of its own: one port for all
ETCD_PORT = 2379
HUB_DEV = "uplink"  # the Hub's end of its veth, in the hub namespace; its tx_bytes are the Hub's bytes sent
NODE_DEV = "eth0"  # a node's end of its veth, in its namespace
TOKEN = "bench-fleet-token"
HEALTH = "/api/depot/v1/health"
PEERS = "/api/depot/v1/peers"
SCENARIOS = ("anchor", "solo", "cluster")
GOAL_HUB = 1.05  # cluster: the Hub's bytes sent ÷ the repo's size, at most
GOAL_SOONER = 5.0  # cluster: all nodes done this many times sooner than the anchor, at least
GOAL_SPREAD = 1.5  # cluster: p99 ÷ p50 of the node times, at most

SNAPSHOT = """
import sys, time
from pathlib import Path
from huggingface_hub import snapshot_download
start = time.perf_counter()
path = snapshot_download(sys.argv[1], cache_dir=sys.argv[2])
seconds = time.perf_counter() - start
print(seconds, sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()))
"""


def node_ns(i: int) -> str:
    return f"{PREFIX}n{i}"


def node_ip(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


def modeldepot(*args: str) -> list[str]:
    return [sys.executable, "-m", "modeldepot", *args]


def durability() -> str:
    """How the pulls publish (``MODELDEPOT_DURABILITY``, passed on to them): ``deferred`` (the default:
    published once verified, flushed in the background) or ``sync`` (flushed first)."""
    return (os.environ.get("MODELDEPOT_DURABILITY") or "deferred").strip().lower()


def base_env(**extra: str) -> dict[str, str]:
    """The environment of every process started here: nothing of the caller's depot or Hub settings but
    ``MODELDEPOT_DURABILITY``."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MODELDEPOT_", "HF_")) or key == "MODELDEPOT_DURABILITY"}  # fmt: skip
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", HF_HUB_ENABLE_HF_TRANSFER="0",
               HF_HUB_DISABLE_PROGRESS_BARS="1")  # fmt: skip
    env.update(extra)
    return env


# -- the repo ---------------------------------------------------------------------------------------------


def make_repo(folder: Path, size: int, shards: int) -> list[str]:
    """The repo's folder, made afresh; returns the names of its big files."""
    shutil.rmtree(folder, ignore_errors=True)
    names = []
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = size // shards + (size % shards if k == shards - 1 else 0)
        random_file(folder / name, part, 1000 + k)
        names.append(name)
    config = {"architectures": ["BenchModel"], "model_type": "bench", "hidden_size": 1024}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return names


# -- processes --------------------------------------------------------------------------------------------


class Processes:
    """Every long-running process started here, to be ended (by its pid) whatever happens."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[Any]] = []
        self.roles: dict[int, str] = {}  # pid -> what the long-running ones are, for the CPU breakdown

    def start(self, command: list[str], env: dict[str, str], log: Path | None = None, role: str = "",
              **kwargs: Any) -> subprocess.Popen[Any]:  # fmt: skip
        if log is not None:
            with open(log, "ab") as handle:
                process = subprocess.Popen(
                    command, env=env, stdout=handle, stderr=subprocess.STDOUT, **kwargs
                )
        else:
            process = subprocess.Popen(command, env=env, **kwargs)
        self.running.append(process)
        if role:
            self.roles[process.pid] = role
        return process

    def stop(self, processes: list[subprocess.Popen[Any]] | None = None, grace: float = 15.0) -> None:
        """SIGTERM to all at once, then SIGKILL to whichever has not exited after ``grace`` seconds."""
        chosen = list(self.running if processes is None else processes)
        for process in chosen:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace
        for process in chosen:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process in self.running:
                self.running.remove(process)
            self.roles.pop(process.pid, None)


def curl_ok(prefix: list[str], url: str, *headers: str) -> str | None:
    """The body of a 2xx answer to GET ``url`` (from inside ``prefix``'s namespace), else None."""
    extra = [arg for header in headers for arg in ("-H", header)]
    done = subprocess.run([*prefix, "curl", "-sf", "--max-time", "2", *extra, url],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout if done.returncode == 0 else None


def wait_for(what: str, check: Any, processes: list[subprocess.Popen[Any]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"waiting for {what}: `{' '.join(process.args)}` exited ({process.returncode})"
                )
        if time.monotonic() >= deadline:
            raise RuntimeError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)


# -- the network ------------------------------------------------------------------------------------------


def build_network(nodes: int, uplink: str, link: str, late_link: str | None = None) -> None:
    """The bridge, the Hub and ``nodes`` nodes on ``link``; with ``late_link``, one more node on that."""
    add_namespace(CORE)
    bridge(CORE, "br0", f"{BRIDGE_IP}/24")
    add_namespace(HUB)
    veth(HUB, HUB_DEV, CORE, "hub")
    attach(CORE, "hub", "br0")
    up(HUB, HUB_DEV, f"{HUB_IP}/24")
    shape(HUB, HUB_DEV, uplink)  # what the Hub sends
    shape(CORE, "hub", uplink)  # what it receives
    for i in range(1, nodes + 1 + bool(late_link)):
        ns = node_ns(i)
        add_namespace(ns)
        veth(ns, NODE_DEV, CORE, f"n{i}")
        attach(CORE, f"n{i}", "br0")
        up(ns, NODE_DEV, f"{node_ip(i)}/24")
        rate = late_link if late_link and i > nodes else link
        shape(ns, NODE_DEV, rate)
        shape(CORE, f"n{i}", rate)


def tc_rate(text: str) -> float:
    """Bytes a second of a tc rate such as ``500mbit`` or ``1gbit``."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, scale in units.items():
        if text.lower().endswith(unit):
            return float(text[: -len(unit)]) * scale / 8
    raise ValueError(f"a rate like 500mbit or 1gbit, not {text!r}")


# -- one scenario -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    times: list[float]  # each node's seconds from the common start to its process's exit
    hub_bytes: int  # tx_bytes of the Hub's veth during the scenario
    node_bytes: int  # tx_bytes of the nodes' veths, summed (what peers sent each other, and requests)
    hub_first: float  # seconds from the start until the Hub had sent its first MiB
    hub_busy: float  # seconds from the start until the Hub had sent 99% of its bytes
    cpu_busy: float  # share of the machine's CPU time that was busy (user, system, irq, ...)
    cpu_seconds: float  # CPU time used on the whole machine (every process: nodes, Hub, etcd)
    cpu_iowait: float  # share spent waiting for the disk
    cpu_parts: dict[str, float] = field(default_factory=dict)  # CPU seconds by who used them
    busy_before: float = 0.0  # share of the CPU busy in the second before the start, less our servers
    by_source: dict[str, int] = field(default_factory=dict)  # modeldepot pulls: summed over the nodes
    swarm: list[dict[str, int]] = field(default_factory=list)  # each pull's swarm counts (claims, take-overs)
    note: str = ""

    @property
    def all_done(self) -> float:
        return max(self.times)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.times, q))


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system, all threads) a live process has used so far; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds of this process's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_times() -> tuple[int, int, int]:
    """(total, idle, iowait) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields[:8]), fields[3], fields[4]


class Sampler:
    """The Hub's tx_bytes, stamped as they arrive every 0.2 s, from a process in the hub namespace."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self.process = sampler(HUB, HUB_DEV)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append((time.perf_counter(), int(line)))

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()
        self.thread.join(5)

    def reached(self, start: float, share: float = 0.0, least: int = 0) -> float:
        """Seconds from ``start`` until the Hub had sent ``share`` of what it sent after ``start``, and at
        least ``least`` bytes (as the samples resolve it: 0.2 s)."""
        after = [(t, b) for t, b in self.samples if t >= start]
        before = [b for t, b in self.samples if t < start]
        if not after:
            return 0.0
        first = before[-1] if before else after[0][1]
        goal = max(share * (after[-1][1] - first), least)
        return next((t - start for t, b in after if b - first >= goal), after[-1][0] - start)


def wave(name: str, commands: list[list[str]], envs: list[dict[str, str]], procs: Processes,
         nodes: int, timeout: float, log_dir: Path | None = None) -> tuple[Outcome, list[str]]:  # fmt: skip
    """Start every command at one moment; each one's exit time from then, and its stdout."""
    hub_before = counter(HUB, HUB_DEV)
    nodes_before = sum(counter(node_ns(i), NODE_DEV) for i in range(1, nodes + 1))
    watch = Sampler()
    roles = dict(procs.roles)  # the long-running processes: the Hub, the nodes' serve, etcd
    idle_before, idle_roles = cpu_times(), sum(process_cpu(pid) for pid in roles)
    time.sleep(1.0)  # samples before the start; how busy the machine is without the scenario
    cpu_before = cpu_times()
    role_before = {pid: process_cpu(pid) for pid in roles}
    quiet = [a - b for a, b in zip(cpu_before, idle_before, strict=True)]
    quiet_ours = (sum(role_before.values()) - idle_roles) * os.sysconf("SC_CLK_TCK")  # in jiffies
    clients_before = children_cpu()
    ends: list[float] = [0.0] * len(commands)
    outputs: list[tuple[str, str]] = [("", "")] * len(commands)
    started: list[subprocess.Popen[str]] = []

    def finish(k: int, process: subprocess.Popen[str]) -> None:
        outputs[k] = process.communicate()
        ends[k] = time.perf_counter()
        if log_dir is not None:
            (log_dir / f"{name}-n{k + 1}.err").write_text(outputs[k][1])

    start = time.perf_counter()
    threads = []
    for k, (command, env) in enumerate(zip(commands, envs, strict=True)):
        process = procs.start(command, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        threads.append(threading.Thread(target=finish, args=(k, process), daemon=True))
        threads[-1].start()
    try:
        for thread in threads:
            thread.join(max(0.0, start + timeout - time.perf_counter()))
            if thread.is_alive():
                raise RuntimeError(f"{name}: not all nodes done after {timeout:.0f} s")
    finally:
        procs.stop(started, grace=5)
        cpu_after = cpu_times()
        clients = children_cpu() - clients_before
        role_after = {pid: process_cpu(pid) for pid in roles}
        time.sleep(0.3)
        watch.close()
    for k, process in enumerate(started):
        if process.returncode != 0:
            raise RuntimeError(f"{name}, node {k + 1}: `{' '.join(map(str, process.args))}` failed "
                               f"({process.returncode}):\n{outputs[k][1][-3000:]}")  # fmt: skip
    total, idle, iowait = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
    outcome = Outcome(
        name,
        [end - start for end in ends],
        counter(HUB, HUB_DEV) - hub_before,
        sum(counter(node_ns(i), NODE_DEV) for i in range(1, nodes + 1)) - nodes_before,
        watch.reached(start, least=1 << 20),
        watch.reached(start, share=0.99),
        (total - idle - iowait) / total,
        (total - idle - iowait) / os.sysconf("SC_CLK_TCK"),
        iowait / total,
    )
    outcome.busy_before = max(0.0, quiet[0] - quiet[1] - quiet[2] - quiet_ours) / max(quiet[0], 1)
    outcome.cpu_parts["clients"] = clients
    for pid, role in roles.items():
        outcome.cpu_parts[role] = outcome.cpu_parts.get(role, 0.0) + role_after[pid] - role_before[pid]
    outcome.cpu_parts["the rest (kernel: network, disk; others)"] = outcome.cpu_seconds - sum(
        outcome.cpu_parts.values()
    )
    return outcome, [out for out, _ in outputs]


def homes(work: Path, nodes: int) -> list[Path]:
    return [work / "nodes" / f"n{i}" for i in range(1, nodes + 1)]


def clear_nodes(work: Path) -> None:
    shutil.rmtree(work / "nodes", ignore_errors=True)
    os.sync()  # the last scenario's writeback does not run into the next one


def anchor(work: Path, args: argparse.Namespace, procs: Processes, total: int) -> Outcome:
    env = base_env(HF_ENDPOINT=f"http://{HUB_IP}:{PORT}")
    commands = [[*in_ns(node_ns(i)), sys.executable, "-c", SNAPSHOT, REPO, str(home / "hf")]
                for i, home in enumerate(homes(work, args.nodes), 1)]  # fmt: skip
    outcome, outputs = wave("anchor", commands, [env] * args.nodes, procs, args.nodes, args.timeout)
    for k, out in enumerate(outputs):
        got = int(out.split()[-1])
        if got != total:
            raise RuntimeError(f"anchor, node {k + 1}: snapshot_download brought {got} bytes of {total}")
    return outcome


def check_pulls(name: str, outputs: list[str], total: int, outcome: Outcome) -> None:
    for k, out in enumerate(outputs):
        lines = out.splitlines()  # (a profiled pull's output has py-spy's lines around the JSON)
        start = next(i for i, line in enumerate(lines) if line.startswith("{"))
        end = max(i for i, line in enumerate(lines) if line.startswith("}"))
        result = json.loads("\n".join(lines[start : end + 1]))
        by_source = result.get("bytes_by_source", {})
        if result["bytes_total"] != total or sum(by_source.values()) != total:
            raise RuntimeError(f"{name}, node {k + 1}: pull reported {result}; the repo has {total} bytes")
        for source, count in by_source.items():
            outcome.by_source[source] = outcome.by_source.get(source, 0) + count
        outcome.swarm.append(result.get("swarm", {}))


def solo(work: Path, args: argparse.Namespace, procs: Processes, total: int) -> Outcome:
    env = base_env(HF_ENDPOINT=f"http://{HUB_IP}:{PORT}")
    commands = [[*in_ns(node_ns(i)), *modeldepot("pull", REPO, "--home", str(home), "--json")]
                for i, home in enumerate(homes(work, args.nodes), 1)]  # fmt: skip
    outcome, outputs = wave("solo", commands, [env] * args.nodes, procs, args.nodes, args.timeout)
    check_pulls("solo", outputs, total, outcome)
    return outcome


def profiled(node: int, args: argparse.Namespace, work: Path) -> list[str]:
    """py-spy's command line to put before node ``node``'s pull when --profile-node names it."""
    if args.profile_node != node:
        return []
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = work / "logs" / f"cluster-n{node}.pyspy"
    return [spy, "record", "--format", "raw", "--threads", "--rate", "200", "-o", str(out), "--"]


def start_etcd(procs: Processes, data: Path, log: Path) -> subprocess.Popen[Any]:
    etcd = shutil.which("etcd")
    if etcd is None:
        raise RuntimeError("etcd is not installed: run ./scripts/install-etcd (Debian's etcd-server)")
    client, peer = f"http://{BRIDGE_IP}:{ETCD_PORT}", "http://127.0.0.1:2380"
    # The registry runs on its own machines in a real fleet; here it shares 2 cores with 8 nodes, so it
    # runs ahead of them (nice -10) lest a starved etcd, not the swarm, decide what the Hub sends.
    command = [
        *in_ns(CORE), "nice", "-n", "-10", etcd, "--name", "fleet", "--data-dir", str(data),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"fleet={peer}", "--initial-cluster-state", "new",
        "--heartbeat-interval", "10", "--election-timeout", "100",
        "--logger", "zap", "--log-level", "error", "--log-outputs", "stderr",
    ]  # fmt: skip
    process = procs.start(command, base_env(), log, "etcd")
    wait_for("etcd", lambda: '"true"' in (curl_ok(in_ns(CORE), f"{client}/health") or ""), [process], 30)
    return process


def cluster(work: Path, args: argparse.Namespace, procs: Processes, total: int) -> dict[str, Outcome]:
    shm = Path("/dev/shm")
    data = Path(tempfile.mkdtemp(prefix=f"{PREFIX}etcd-", dir=shm if shm.is_dir() else None))
    registry = f"etcd://{BRIDGE_IP}:{ETCD_PORT}"
    servers: list[subprocess.Popen[Any]] = []
    etcd = None
    try:
        etcd = start_etcd(procs, data / "data", work / "logs" / "etcd.log")
        env = base_env(HF_ENDPOINT=f"http://{HUB_IP}:{PORT}")
        if not args.no_token:
            env["MODELDEPOT_TOKEN"] = TOKEN
        for i, home in enumerate(homes(work, args.nodes), 1):
            command = [*in_ns(node_ns(i)), *modeldepot(
                "serve", "--home", str(home), "--host", "0.0.0.0", "--port", str(PORT), "--cluster", registry,
                "--advertise", f"http://{node_ip(i)}:{PORT}", "--log-level", "warning")]  # fmt: skip
            servers.append(procs.start(command, env, work / "logs" / f"serve-n{i}.log", "node serves"))

        def all_registered() -> bool:
            for i in range(1, args.nodes + 1):
                auth = [] if args.no_token else [f"Authorization: Bearer {TOKEN}"]
                body = curl_ok(in_ns(node_ns(i)), f"http://127.0.0.1:{PORT}{PEERS}", *auth)
                if body is None or len(json.loads(body)) != args.nodes:
                    return False
            return True

        registered = time.perf_counter()
        wait_for(f"{args.nodes} nodes registered, as each sees it", all_registered, [*servers, etcd], 120)
        registered = time.perf_counter() - registered
        commands = [[*in_ns(node_ns(i)), *profiled(i, args, work), *modeldepot(
            "pull", REPO, "--home", str(home), "--cluster", registry, "--json")]
            for i, home in enumerate(homes(work, args.nodes), 1)]  # fmt: skip
        pull_env = {**env, "MODELDEPOT_LOG_LEVEL": "info"}  # take-overs logged, in logs/cluster-nK.err
        stalling = None
        if args.etcd_stall:  # (a hung etcd, a partition from it, a leader election storm: SIGSTOP)
            stalling = threading.Thread(target=stall_etcd, args=(etcd, args.etcd_stall), daemon=True)
            stalling.start()
        outcome, outputs = wave("cluster", commands, [pull_env] * args.nodes, procs, args.nodes, args.timeout,
                                work / "logs")  # fmt: skip
        if stalling is not None:
            stalling.join()
        check_pulls("cluster", outputs, total, outcome)
        outcome.note = f"serve processes healthy and all registered {registered:.1f} s after they started"
        if args.etcd_stall:
            outcome.note += (f"; etcd frozen (SIGSTOP) for {args.etcd_stall:.0f} s from {ETCD_STALL_AT:.0f} s after "
                             "the pulls began")  # fmt: skip
        for i, server in enumerate(servers, 1):
            if server.poll() is not None:
                raise RuntimeError(f"node {i}'s serve process exited ({server.returncode}) during the pull")
        outcomes = {"cluster": outcome}
        if args.late_link:
            outcomes["late"] = late(work, args, procs, total, env, registry, servers)
        return outcomes
    finally:
        procs.stop(servers)
        if etcd is not None:
            if etcd.poll() is None:
                etcd.send_signal(signal.SIGCONT)  # (a run that failed while --etcd-stall froze it)
            procs.stop([etcd])
        shutil.rmtree(data, ignore_errors=True)


ETCD_STALL_AT = 4.0  # seconds after the cluster's pulls begin that --etcd-stall freezes etcd


def stall_etcd(etcd: subprocess.Popen[Any], seconds: float) -> None:
    """Freeze etcd (SIGSTOP) ETCD_STALL_AT seconds from now, for ``seconds``."""
    time.sleep(ETCD_STALL_AT)
    etcd.send_signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        etcd.send_signal(signal.SIGCONT)


def late(work: Path, args: argparse.Namespace, procs: Processes, total: int, env: dict[str, str],
         registry: str, servers: list[subprocess.Popen[Any]]) -> Outcome:  # fmt: skip
    """One more node, on ``--late-link``, joins the fleet that holds the repo and pulls it: every chunk is
    held by the others, so the Hub should send nothing. (Its narrow link made its peers look slower than
    MODELDEPOT_SLOW_PEER_RATE, and the Hub was let in for what they hold: 0.21-0.23 times the repo for
    nothing at 20mbit, a session's trial.)"""
    i = args.nodes + 1
    home = work / "nodes" / f"n{i}"
    command = [*in_ns(node_ns(i)), *modeldepot(
        "serve", "--home", str(home), "--host", "0.0.0.0", "--port", str(PORT), "--cluster", registry,
        "--advertise", f"http://{node_ip(i)}:{PORT}", "--log-level", "warning")]  # fmt: skip
    servers.append(procs.start(command, env, work / "logs" / f"serve-n{i}.log", "node serves"))
    auth = [] if args.no_token else [f"Authorization: Bearer {TOKEN}"]

    def sees_all() -> bool:
        body = curl_ok(in_ns(node_ns(i)), f"http://127.0.0.1:{PORT}{PEERS}", *auth)
        return body is not None and len(json.loads(body)) == i

    wait_for(f"the late node n{i} registered, seeing the fleet", sees_all, servers, 120)
    pull = [
        *in_ns(node_ns(i)),
        *modeldepot("pull", REPO, "--home", str(home), "--cluster", registry, "--json"),
    ]
    outcome, outputs = wave("late", [pull], [{**env, "MODELDEPOT_LOG_LEVEL": "info"}], procs, i, args.timeout,
                            work / "logs")  # fmt: skip
    check_pulls("late", outputs, total, outcome)
    outcome.note = (f"one node on {args.late_link} pulled it from the {args.nodes} that hold it; its link "
                    f"alone takes {total / tc_rate(args.late_link):.1f} s for one copy (nominal)")  # fmt: skip
    return outcome


# -- floors -----------------------------------------------------------------------------------------------


def curl_floor(names: list[str]) -> tuple[float, int]:
    """Seconds and bytes for curl (one stream, one file after the other) to bring the repo's big files from
    the Hub to /dev/null in node 1's namespace: the uplink's real rate."""
    urls = [f"http://{HUB_IP}:{PORT}/{REPO}/resolve/main/{name}" for name in names]
    # (-L: a branch's LFS file is a redirect to its commit's URL, as on the Hub)
    command = [*in_ns(node_ns(1)), "curl", "-sfL", "-w", "%{size_download} %{time_total}\n"]
    for url in urls:
        command += ["-o", "/dev/null", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
    got = sum(int(x) for x in out[0::2])
    return sum(float(x) for x in out[1::2]), got


def disk_rate(folder: Path, size: int) -> float:
    """Bytes a second one writer gets from this disk, fsync included (random bytes, 64 MiB writes)."""
    block = np.random.default_rng(7).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    path = folder / "disk-probe"
    os.sync()
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(max(1, size // len(block))):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    written = path.stat().st_size
    path.unlink()
    return written / seconds


def hash_rates() -> tuple[float, float]:
    """Bytes a second of SHA-256 and BLAKE3 (single-threaded, as a pull uses them) on one core."""
    block = np.random.default_rng(8).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    rates = []
    for make in (hashlib.sha256, blake3.blake3):
        start = time.perf_counter()
        for _ in range(4):
            make(block).digest()
        rates.append(4 * len(block) / (time.perf_counter() - start))
    return rates[0], rates[1]


# -- the report -------------------------------------------------------------------------------------------


def show(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A rich table, then the same as Markdown."""
    table = Table(title=title)  # as wide as it needs (COLUMNS, set in main)
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    print("\n| " + " | ".join(headers) + " |\n|" + " --- |" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(outcomes: dict[str, Outcome], total: int, args: argparse.Namespace, floors: dict[str, float],
           notes: list[str]) -> None:  # fmt: skip
    n = args.nodes
    rows: list[Row] = []
    if "anchor" in outcomes:
        base = outcomes["anchor"]
        for name, goal in (("solo", 1.0), ("cluster", GOAL_SOONER)):
            if name in outcomes:
                rows.append(Row(f"{name}: all {n} nodes done", f"snapshot_download x{n}", base.all_done,
                                outcomes[name].all_done, n * total, goal))  # fmt: skip
                rows.append(Row(f"{name}: p50 node", "snapshot_download p50", base.percentile(50),
                                outcomes[name].percentile(50), total, 1.0))  # fmt: skip
    if rows:
        render(f"{n} nodes pulling {gib(total)} at once through a {args.uplink} Hub uplink", rows)
        print()

    uplink_s = floors["uplink_s"]
    show(
        "scenarios (times from the common start; bytes as the veths count them, headers included)",
        ["scenario", "all done", "p50", "p99", "p99/p50", "Hub sent ÷ repo", "Hub 1st MiB at", "Hub 99% at",
         "Hub rate, 1st MiB to 99%", "nodes sent ÷ repo", "CPU busy", "CPU time", "iowait", "CPU busy 1 s before (not ours)"],
        [[o.name, f"{o.all_done:.1f} s", f"{o.percentile(50):.1f} s", f"{o.percentile(99):.1f} s",
          f"{o.percentile(99) / o.percentile(50):.2f}", f"{o.hub_bytes / total:.3f}", f"{o.hub_first:.1f} s",
          f"{o.hub_busy:.1f} s", f"{0.99 * o.hub_bytes * 8 / max(o.hub_busy - o.hub_first, 0.2) / 1e6:.0f} Mbit/s",
          f"{o.node_bytes / total:.2f}", f"{o.cpu_busy:.0%}", f"{o.cpu_seconds:.0f} s", f"{o.cpu_iowait:.0%}", f"{o.busy_before:.0%}"]
         for o in outcomes.values()],
    )  # fmt: skip

    goals = []
    if "cluster" in outcomes:
        c = outcomes["cluster"]
        ratio = c.hub_bytes / total
        goals.append(["cluster: Hub bytes sent ÷ repo", f"{ratio:.3f}", f"<= {GOAL_HUB}",
                      "yes" if ratio <= GOAL_HUB else "NO"])  # fmt: skip
        if "anchor" in outcomes:
            sooner = outcomes["anchor"].all_done / c.all_done
            goals.append([f"cluster: all {n} done, times sooner than the anchor", f"{sooner:.2f}x",
                          f">= {GOAL_SOONER}x", "yes" if sooner >= GOAL_SOONER else "NO"])  # fmt: skip
        spread = c.percentile(99) / c.percentile(50)
        goals.append(["cluster: p99 ÷ p50 of node times", f"{spread:.2f}", f"<= {GOAL_SPREAD}",
                      "yes" if spread <= GOAL_SPREAD else "NO"])  # fmt: skip
        show("goals (issue 13, item 5)", ["goal", "measured", "target", "met"], goals)

    for o in outcomes.values():
        if o.by_source:
            pulled = len(o.times)
            parts = ", ".join(
                f"{k} {gib(v)} ({v / (pulled * total):.0%})" for k, v in sorted(o.by_source.items())
            )
            print(f"{o.name}: bytes_by_source summed over the {pulled} nodes: {parts}")
        if any(o.swarm):
            events = sorted({e for counts in o.swarm for e in counts})
            print(f"{o.name}: swarm counts per node (why the Hub was asked): " + "; ".join(
                f"{e} {[counts.get(e, 0) for counts in o.swarm]}" for e in events))  # fmt: skip
        if "hub" in o.by_source:
            kept = o.by_source["hub"] / total
            print(f"{o.name}: the Hub sent {o.hub_bytes / total:.3f}x the repo on the wire; the pulls kept "
                  f"{kept:.3f}x from it: {o.hub_bytes / total - kept:.3f}x is headers and transfers "
                  f"cancelled or thrown away")  # fmt: skip
        if "peer" in o.by_source:
            kept = o.by_source["peer"] / total
            print(f"{o.name}: the nodes sent {o.node_bytes / total:.3f}x the repo (peers' chunks, requests); the "
                  f"pulls kept {kept:.3f}x from peers: {o.node_bytes / total - kept:.3f}x is requests, headers "
                  f"and transfers cancelled or thrown away")  # fmt: skip
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in o.cpu_parts.items())
        print(f"{o.name}: CPU time {o.cpu_seconds:.1f} s: {parts}")
        if o.busy_before > 0.1:
            print(f"{o.name}: WARNING: the machine was {o.busy_before:.0%} busy in the second before the start, "
                  f"not counting this run's servers (others' processes, or the kernel): its times and CPU "
                  f"figures are not clean")  # fmt: skip
        if o.note:
            print(f"{o.name}: {o.note}")

    # What binds: each scenario's floors, the largest of them, and how far the measurement is from it.
    disk_s = n * total / floors["disk"]
    hash_s = n * total * (1 / floors["sha256"] + 2 / floors["blake3"]) / (os.cpu_count() or 1)
    link_s = total / tc_rate(args.link)
    print(
        f"\nfloors measured in this run: uplink (curl, one stream, of the repo's {args.shards} big files "
        f"from the Hub in node 1) {uplink_s:.2f} s for one copy = {floors['uplink_rate'] * 8 / 1e6:.0f} Mbit/s "
        f"of payload; disk (one writer, fsync) {floors['disk'] / 1e6:.0f} MB/s, so {n} copies {disk_s:.1f} s; "
        f"hashing SHA-256 {floors['sha256'] / 1e9:.2f} GB/s, BLAKE3 {floors['blake3'] / 1e9:.2f} GB/s per core, "
        f"so {n} copies (SHA-256 once, BLAKE3 on receipt and on sending to a peer) {hash_s:.1f} s on "
        f"{os.cpu_count()} cores; a node's {args.link} link {link_s:.1f} s for one copy (nominal)."
    )  # fmt: skip
    # A pull waits for the disk only with sync durability; deferred, the page cache takes the copies
    # (RAM allowing) and the flush comes after, as for snapshot_download.
    disk = {f"disk x{n}": disk_s} if durability() == "sync" else {}
    per_scenario = {
        "anchor": {f"uplink x{n}": n * uplink_s, "node link": link_s},
        "solo": {f"uplink x{n}": n * uplink_s, "node link": link_s, **disk},
        "cluster": {"uplink x1": uplink_s, "node link": link_s, **disk},
        "late": {"late node link": total / tc_rate(args.late_link)} if args.late_link else {},
    }
    cores = os.cpu_count() or 1
    print(f"CPU below: the CPU time the scenario used on the whole machine ÷ {cores} cores (its work, had "
          f"the CPU been the only limit)")  # fmt: skip
    for o in outcomes.values():
        candidates = {**per_scenario[o.name], "CPU": o.cpu_seconds / cores}
        binding = max(candidates, key=lambda key: candidates[key])
        listed = ", ".join(f"{k} {v:.1f} s" for k, v in candidates.items())
        print(f"{o.name}: floors {listed}; binding: {binding} ({candidates[binding]:.1f} s); "
              f"all done {o.all_done:.1f} s = {o.all_done / candidates[binding]:.2f}x that floor")  # fmt: skip
    print(f"(pulls with MODELDEPOT_DURABILITY={durability()}: "
          + ("they flush before publishing, so the disk is a floor for them; "
             if durability() == "sync" else "published before the flush, so no disk floor; ")
          + f"snapshot_download never flushes: its {n} copies can sit in the page cache)")  # fmt: skip
    for note in notes:
        print(note)


# -- the run ----------------------------------------------------------------------------------------------


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="1GiB", help="the repo's big files together")
    parser.add_argument("--shards", type=int, default=4, help="safetensors files the size is split into")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="any of anchor,solo,cluster")
    parser.add_argument("--uplink", default="500mbit", help="tbf rate of the Hub's link, both ways")
    parser.add_argument("--link", default="1gbit", help="tbf rate of each node's link, both ways")
    parser.add_argument("--late-link", default="", metavar="RATE",
                        help="after the cluster's pull, one more node on a link this narrow (20mbit, say) "
                             "joins and pulls the repo from the nodes that hold it: the Hub should send "
                             "nothing")  # fmt: skip
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    parser.add_argument(
        "--etcd-stall",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="freeze etcd (SIGSTOP) this long, 4 s into the cluster's pulls (a registry outage)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a scenario may take")
    parser.add_argument("--quick", action="store_true", help="256MiB, 4 nodes: a smoke test")
    parser.add_argument("--no-token", action="store_true",
                        help="the cluster without a shared MODELDEPOT_TOKEN (a fleet shares public repos' chunks all the same)")  # fmt: skip
    parser.add_argument("--profile-node", type=int, default=0, metavar="N",
                        help="sample node N's cluster pull with py-spy (pip install py-spy): collapsed "
                             "stacks in logs/cluster-nN.pyspy, on-CPU samples only")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.size, args.nodes = "256MiB", 4
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not chosen or any(s not in SCENARIOS for s in chosen):
        parser.error(f"--scenarios takes some of {','.join(SCENARIOS)}")
    if not 1 <= args.nodes <= 200 or args.shards < 1:
        parser.error("--nodes from 1 to 200, --shards at least 1")
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "200")  # rich's tables whole in a log, not folded into 80 columns
    if os.geteuid() != 0:
        sys.exit("bench_fleet.py needs root: network namespaces and tc")
    if args.late_link and "cluster" not in chosen:
        parser.error("--late-link joins a node to the cluster scenario's fleet: include cluster")
    if args.nodes == 1 and "cluster" in chosen:
        print("note: one node has no peers", file=sys.stderr)

    # Ctrl-C and SIGTERM both end in the finally below; a second one while it cleans up is ignored.
    signal.signal(signal.SIGTERM, interrupted)
    size = parse_size(args.size)
    work = args.dir.resolve() / "fleet"
    shutil.rmtree(work / "logs", ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    left = remove_namespaces(PREFIX)
    if left:
        print(f"removed {len(left)} namespaces a previous run left: {', '.join(left)}", file=sys.stderr)
    clear_nodes(work)
    procs = Processes()
    outcomes: dict[str, Outcome] = {}
    notes: list[str] = []
    began = time.perf_counter()
    try:
        names = make_repo(work / "repo", size, args.shards)
        total = sum(p.stat().st_size for p in (work / "repo").iterdir())
        hub_home = work / "hub-store"
        shutil.rmtree(hub_home, ignore_errors=True)
        subprocess.run(modeldepot("import", str(work / "repo"), "--repo", REPO, "--home", str(hub_home)),
                       check=True, stdout=subprocess.DEVNULL, env=base_env())  # fmt: skip
        print(machine_facts())
        print(f"repo {REPO}: {gib(total)} in {args.shards} safetensors files and config.json; {args.nodes} "
              f"nodes on {args.link} links; Hub uplink {args.uplink}; scenarios {', '.join(chosen)}")  # fmt: skip
        floors: dict[str, float] = {}
        floors["disk"] = disk_rate(work, min(size, 1 << 30))
        floors["sha256"], floors["blake3"] = hash_rates()

        build_network(args.nodes, args.uplink, args.link, args.late_link or None)
        hub = procs.start([*in_ns(HUB), *modeldepot("serve", "--home", str(hub_home), "--host", "0.0.0.0",
                           "--port", str(PORT), "--log-level", "warning")], base_env(), work / "logs" / "hub.log", "Hub")  # fmt: skip
        for i in range(1, args.nodes + 1):
            url = f"http://{HUB_IP}:{PORT}{HEALTH}"
            wait_for(f"the Hub from node {i}", lambda i=i, url=url: curl_ok(in_ns(node_ns(i)), url), [hub])
        before = counter(HUB, HUB_DEV)
        floors["uplink_s"], got = curl_floor(names)
        floors["uplink_rate"] = got / floors["uplink_s"]
        notes.append(f"curl floor: the Hub sent {(counter(HUB, HUB_DEV) - before) / got:.3f}x the payload "
                     f"({got} bytes) on the wire: the headers' share in every Hub figure above")  # fmt: skip

        runs = {"anchor": anchor, "solo": solo}
        for name in SCENARIOS:
            if name in chosen:
                clear_nodes(work)
                began_scenario = time.perf_counter()
                if name == "cluster":
                    outcomes.update(cluster(work, args, procs, total))
                else:
                    outcomes[name] = runs[name](work, args, procs, total)
                o = outcomes[name]
                print(f"{name}: all {args.nodes} done in {o.all_done:.1f} s, Hub sent {o.hub_bytes / total:.2f}x "
                      f"the repo ({time.perf_counter() - began_scenario:.0f} s with set-up)", file=sys.stderr)  # fmt: skip
                if hub.poll() is not None:
                    raise RuntimeError(f"the Hub exited ({hub.returncode}): see {work / 'logs' / 'hub.log'}")
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        procs.stop()
        remove_namespaces(PREFIX)
        clear_nodes(work)
        shutil.rmtree(work / "hub-store", ignore_errors=True)
        shutil.rmtree(work / "repo", ignore_errors=True)
        signal.signal(signal.SIGINT, previous)
    print()
    report(outcomes, total, args, floors, notes)
    print(f"\nwhole run {time.perf_counter() - began:.0f} s; logs in {work / 'logs'}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: every process and namespace of the run was removed")
