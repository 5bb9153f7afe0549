"""Network namespaces, veth pairs, a bridge and ``tbf`` shaping, for the benchmarks that need a network.

Standard library only; needs root (``ip`` and ``tc`` from iproute2). This kernel has no ``netem``:
``tbf`` gives a rate, nothing gives a delay. Every namespace a benchmark makes carries a name prefix of its
own, so what a crashed run left (namespaces, and the processes still inside them) can be found by that
prefix and removed before the next run (:func:`remove_namespaces`). Nothing here touches the root
namespace's interfaces: veth pairs are made inside the namespaces they join.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

Prefix = list[str]  # what runs a command in a namespace: [] or ["ip", "netns", "exec", NS]


def run(command: list[str]) -> str:
    """Run ``command``; its stdout, or RuntimeError with its stderr when it fails."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return done.stdout


def ip(*args: str) -> str:
    return run(["ip", *args])


def in_ns(ns: str) -> Prefix:
    """The prefix that runs a command inside ``ns`` (``ip netns exec`` execs it: the pid is the command's)."""
    return ["ip", "netns", "exec", ns]


def namespaces() -> list[str]:
    """The names of the namespaces ``ip netns`` knows."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def add_namespace(ns: str) -> None:
    """A new namespace with its loopback up."""
    ip("netns", "add", ns)
    ip("-n", ns, "link", "set", "lo", "up")


def pids_in(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def remove_namespaces(prefix: str, grace: float = 5.0) -> list[str]:
    """Delete every namespace whose name starts with ``prefix``, after ending the processes inside them
    (SIGTERM, then SIGKILL after ``grace`` seconds): a namespace with processes in it outlives its name.
    Deleting a namespace deletes the veth ends in it, and so their peers. Returns the names deleted."""
    doomed = [ns for ns in namespaces() if ns.startswith(prefix)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        pids = [pid for ns in doomed for pid in pids_in(ns)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline and any(pids_in(ns) for ns in doomed):
            time.sleep(0.1)
    for ns in doomed:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    return doomed


def veth(ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
    """A veth pair: ``dev_a`` in ``ns_a``, ``dev_b`` in ``ns_b`` (made in place, never in the root
    namespace)."""
    ip("-n", ns_a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)


def bridge(ns: str, dev: str, cidr: str | None = None) -> None:
    """A Linux bridge ``dev`` in ``ns`` (no STP: ports forward at once), up, with an address if given."""
    ip("-n", ns, "link", "add", dev, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    if cidr is not None:
        ip("-n", ns, "addr", "add", cidr, "dev", dev)
    ip("-n", ns, "link", "set", dev, "up")


def attach(ns: str, dev: str, bridge_dev: str) -> None:
    """Make ``dev`` a port of ``bridge_dev`` (both in ``ns``) and bring it up."""
    ip("-n", ns, "link", "set", dev, "master", bridge_dev)
    ip("-n", ns, "link", "set", dev, "up")


def up(ns: str, dev: str, cidr: str | None = None) -> None:
    if cidr is not None:
        ip("-n", ns, "addr", "add", cidr, "dev", dev)
    ip("-n", ns, "link", "set", dev, "up")


def shape(ns: str, dev: str, rate: str, burst: str = "1mb", latency: str = "50ms") -> None:
    """A ``tbf`` root qdisc on ``dev``: what leaves through it goes at most at ``rate`` (tc's units:
    ``500mbit``, ``1gbit``)."""
    run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
         "latency", latency])  # fmt: skip


def counter(ns: str, dev: str, name: str = "tx_bytes") -> int:
    """One of ``dev``'s statistics (``tx_bytes``, ``rx_bytes``, ...), as the kernel counts it: every byte
    of every frame, TCP/IP headers and retransmissions included."""
    return int(run([*in_ns(ns), "cat", f"/sys/class/net/{dev}/statistics/{name}"]))


def sampler(ns: str, dev: str, interval: float = 0.2, name: str = "tx_bytes") -> subprocess.Popen[str]:
    """A process in ``ns`` that prints ``dev``'s counter every ``interval`` seconds, one line each, until
    it is terminated: the caller stamps the lines as they arrive."""
    path = f"/sys/class/net/{dev}/statistics/{name}"
    script = f"while :; do cat {path} || exit 1; sleep {interval}; done"
    return subprocess.Popen([*in_ns(ns), "sh", "-c", script], stdout=subprocess.PIPE, text=True)
