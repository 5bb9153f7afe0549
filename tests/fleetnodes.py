"""Fleet nodes as processes, for the fleet and swarm tests: ``modeldepot serve --cluster`` (:class:`Node`),
an etcd with the nodes a test starts (:class:`Fleet`), and CLI commands as processes of their own."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aetcd  # type: ignore[import-untyped]

from conftest import SMALL_CHUNK, closed_port, free_port, wait_for_port
from etcdserver import EtcdServer

API = "/api/depot/v1"


@functools.cache
def _no_hub() -> int:
    """The one port every process's Hub is when a test gives none: one held socket for the session."""
    return closed_port()


def base_env(**extra: str) -> dict[str, str]:
    """The environment of every process a test starts: small chunks, a Hub where nothing listens (unless
    a test gives one), no token unless given."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MODELDEPOT_TOKEN", "HF_TOKEN")}
    env.update(MODELDEPOT_CHUNK_SIZE=str(SMALL_CHUNK), HF_ENDPOINT=f"http://127.0.0.1:{_no_hub()}",
               PYTHONUNBUFFERED="1")  # fmt: skip
    env.update(extra)
    return env


def modeldepot(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """``modeldepot ARGS`` as a process of its own."""
    done = subprocess.run([sys.executable, "-m", "modeldepot", *args], env=env, capture_output=True, text=True,
                          timeout=90)  # fmt: skip
    if check:
        assert done.returncode == 0, f"modeldepot {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    return done


class Node:
    """``modeldepot serve --cluster`` in a process of its own, its log in a file."""

    def __init__(self, home: Path, cluster: str, token: str | None = None, *extra: str,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.home, self.cluster, self.token = home, cluster, token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.with_suffix(".log")
        env = base_env(**({"MODELDEPOT_TOKEN": token} if token else {}), **(env or {}))
        argv = [sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(self.port),
                "--cluster", cluster, "--scrub-interval", "off", *extra]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.id = ""

    def ready(self) -> Node:
        wait_for_port(self.port, 60, process=self.process)
        self.id = self.get("/info")["id"]
        return self

    def get(self, route: str, token: bool = True) -> Any:
        request = urllib.request.Request(self.url + API + route)
        if token and self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
            return json.loads(answer.read())

    def health(self) -> dict[str, Any]:
        cluster: dict[str, Any] = self.get("/health", token=False)["cluster"]  # no token needed, ever
        return cluster

    def peer_ids(self) -> set[str]:
        return {row["node_id"] for row in self.get("/peers")}

    def row(self, node_id: str) -> dict[str, Any] | None:
        return next((row for row in self.get("/peers") if row["node_id"] == node_id), None)

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class Fleet:
    """An etcd, and the nodes a test starts (all stopped at its end)."""

    def __init__(self, root: Path, etcd: EtcdServer) -> None:
        self.root = root
        self.etcd = etcd
        self.nodes: list[Node] = []

    def node(
        self, name: str, token: str | None = None, *extra: str, env: dict[str, str] | None = None
    ) -> Node:
        node = Node(self.root / name, self.etcd.cluster, token, *extra, env=env)
        self.nodes.append(node)
        return node

    def peers_cli(self, *extra: str) -> list[dict[str, Any]]:
        """`modeldepot peers` on a host without a store (a jump host): it reads the registry alone, and makes no
        store in the default folder (it did, an SRE's trial)."""
        default = self.root / "jump-host-cache"
        done = modeldepot("peers", "--cluster", self.etcd.cluster, "--json", *extra,
                          env=base_env(XDG_CACHE_HOME=str(default), MODELDEPOT_HOME=""))  # fmt: skip
        assert not default.exists(), "peers made a store"
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def dump(self) -> dict[bytes, bytes]:
        """Every key and value in etcd, read with a raw client."""

        async def read() -> dict[bytes, bytes]:
            client = aetcd.Client("127.0.0.1", self.etcd.client_port, timeout=5)
            try:
                return {kv.key: kv.value for kv in await client.get_all()}
            finally:
                await client.close()

        return asyncio.run(read())

    def dump_claims(self, prefix: str = "/modeldepot") -> dict[str, dict[str, Any]]:
        """The chunk claims in etcd: key tail (``sha256/chunk_size/index``) -> claim."""
        root = f"{prefix}/claims/".encode()
        return {key[len(root) :].decode(): json.loads(value) for key, value in self.dump().items()
                if key.startswith(root)}  # fmt: skip

    def holdings(self, node_id: str, prefix: str = "/modeldepot") -> dict[str, dict[str, Any]]:
        """What etcd says ``node_id`` holds, by SHA-256."""
        root, tail = f"{prefix}/holdings/".encode(), f"/{node_id}".encode()
        return {
            key[len(root) :].split(b"/")[0].decode(): json.loads(value)
            for key, value in self.dump().items()
            if key.startswith(root) and key.endswith(tail)
        }

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
