"""Pulls through the forward proxy the environment names (HTTP_PROXY, HTTPS_PROXY, NO_PROXY), as behind a
corporate proxy: an http upstream asked for absolute URLs, an https one through a CONNECT tunnel, the
proxy's credentials sent to it alone. The proxy is a real one on loopback (tunnels and forwards bytes)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LiveNode, closed_port, free_port, write_model_dir
from faultproxy import FaultProxy
from fleetnodes import base_env, modeldepot
from modeldepot import Depot

REPO = "acme/proxied"
FILES = {"config.json": b'{"model_type": "bert"}', "model.safetensors": bytes(range(256)) * 4096}  # 1 MiB


class ForwardProxy:
    """A forward proxy on a loopback port, on a loop of its own: ``CONNECT host:port`` opens a tunnel
    (or, with ``refuse_tunnels``, is answered 403), a request for an absolute URL is passed to its origin
    (the rest of the connection piped both ways). Records each connection's first request line and the
    Proxy-Authorization it carried."""

    def __init__(self, refuse_tunnels: bool = False) -> None:
        self.refuse_tunnels = refuse_tunnels
        self.heads: list[tuple[str, str | None]] = []  # (first request line, Proxy-Authorization)
        self.ranges: list[str | None] = []  # the first request's Range header, per connection
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forward-proxy", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            self.heads.append((lines[0], fields.get("Proxy-Authorization")))
            self.ranges.append(fields.get("Range"))
            method, target, _ = lines[0].split(" ", 2)
            if method == "CONNECT":
                if self.refuse_tunnels:
                    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    return
                host, port = target.rsplit(":", 1)
                upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = b""
            else:  # an absolute URL: the origin takes the same request (HTTP/1.1 servers accept the form)
                authority = target.split("/", 3)[2]
                host, _, port = authority.rpartition(":")
                upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port or 80))
                first = head
            try:
                upstream_writer.write(first)
                await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
            finally:
                upstream_writer.close()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while block := await reader.read(1 << 16):
                writer.write(block)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LiveNode]:
    depot = Depot(tmp_path / "hub")
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    node = LiveNode(depot, owns_depot=True)
    yield node
    node.stop()


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    proxy = ForwardProxy()
    yield proxy
    proxy.stop()


def without_proxies(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in base_env().items() if not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


def stored(home: Path) -> dict[str, str]:
    with Depot(home) as depot:
        return {
            f.path: hashlib.sha256(depot.get_file(REPO, f.path)).hexdigest() for f in depot.list_files(REPO)
        }


EXPECTED = {path: hashlib.sha256(data).hexdigest() for path, data in FILES.items()}


def test_a_pull_goes_through_the_http_proxy_with_its_credentials(
    hub: LiveNode, proxy: ForwardProxy, tmp_path: Path
) -> None:
    proxied = proxy.url.replace("http://", "http://puller:s%40cret@")
    env = without_proxies(HF_ENDPOINT=hub.url, HTTP_PROXY=proxied, MODELDEPOT_CHUNK_SIZE=str(256 << 10))
    modeldepot("pull", REPO, "--home", str(tmp_path / "store"), env=env)
    assert stored(tmp_path / "store") == EXPECTED
    lines = [line for line, _ in proxy.heads]
    assert any(line.startswith(f"GET {hub.url}/api/models/{REPO}/revision/main") for line in lines), lines
    assert all(line.startswith(f"GET {hub.url}/") for line in lines), "absolute URLs, on every connection"
    expected = "Basic " + base64.b64encode(b"puller:s@cret").decode()
    assert {authorization for _, authorization in proxy.heads} == {expected}


@pytest.mark.parametrize(
    "no_proxy", ["localhost,127.0.0.1", "10.0.0.0/8, 127.0.0.0/8"]
)  # names; address ranges
def test_no_proxy_names_the_hosts_reached_directly(
    hub: LiveNode, proxy: ForwardProxy, tmp_path: Path, no_proxy: str
) -> None:
    env = without_proxies(HF_ENDPOINT=hub.url, http_proxy=proxy.url, no_proxy=no_proxy)
    modeldepot("pull", REPO, "--home", str(tmp_path / "store"), env=env)
    assert stored(tmp_path / "store") == EXPECTED
    assert proxy.heads == []


def test_an_https_upstream_is_reached_through_a_connect_tunnel(tmp_path: Path) -> None:
    """The proxy refuses the tunnel (as a corporate proxy refuses a host it does not allow): the pull asked
    it for one, with the proxy's credentials, and says why it failed."""
    refusing = ForwardProxy(refuse_tunnels=True)
    try:
        port = free_port()
        env = without_proxies(HF_ENDPOINT=f"https://127.0.0.1:{port}", HTTPS_PROXY=f"http://u:p@127.0.0.1:{refusing.port}",
                              MODELDEPOT_READ_TIMEOUT="5")  # fmt: skip
        done = modeldepot("pull", REPO, "--home", str(tmp_path / "store"), env=env, check=False)
        assert done.returncode != 0
        assert "403" in done.stderr, done.stderr
        authorization = "Basic " + base64.b64encode(b"u:p").decode()
        assert refusing.heads and all(
            line.startswith(f"CONNECT 127.0.0.1:{port} HTTP/") and sent == authorization
            for line, sent in refusing.heads
        ), refusing.heads
    finally:
        refusing.stop()


def test_a_proxy_of_another_kind_is_a_clear_error(hub: LiveNode, tmp_path: Path) -> None:
    env = without_proxies(
        HF_ENDPOINT=hub.url, ALL_PROXY="socks5://127.0.0.1:1080", MODELDEPOT_READ_TIMEOUT="5"
    )
    done = modeldepot("pull", REPO, "--home", str(tmp_path / "store"), env=env, check=False)
    assert done.returncode != 0
    assert "only http:// proxies are supported" in done.stderr, done.stderr


def test_a_proxy_that_cannot_be_reached_is_named(hub: LiveNode, tmp_path: Path) -> None:
    """A dead proxy was reported as the Hub out of reach (it was up): a user behind a proxy debugged the wrong
    machine (an explorer's trial)."""
    dead = f"127.0.0.1:{closed_port()}"
    env = without_proxies(HF_ENDPOINT=hub.url, HTTP_PROXY=f"http://{dead}", MODELDEPOT_READ_TIMEOUT="5",
                          MODELDEPOT_OUTAGE_PATIENCE="0")  # fmt: skip
    done = modeldepot("pull", REPO, "--home", str(tmp_path / "store"), env=env, check=False)
    assert done.returncode != 0
    assert f"the proxy {dead} (from HTTP_PROXY) for {hub.url}" in done.stderr, done.stderr
    env = without_proxies(HF_ENDPOINT=hub.url, ALL_PROXY=f"http://{dead}", MODELDEPOT_READ_TIMEOUT="5",
                          MODELDEPOT_OUTAGE_PATIENCE="0")  # fmt: skip
    done = modeldepot("pull", REPO, "--home", str(tmp_path / "store"), env=env, check=False)
    assert f"the proxy {dead} (from ALL_PROXY)" in done.stderr, done.stderr  # (it named http_proxy, a review)


def test_a_server_that_ignores_ranges_is_streamed_through_the_proxy_too(
    hub: LiveNode, proxy: ForwardProxy, tmp_path: Path
) -> None:
    """The whole-body stream (aiohttp, for an upstream that ignores Range) takes the same proxy, and reads
    no ~/.netrc: an entry there for the upstream would clash with the Hub token (aiohttp refuses both)."""
    ignoring = FaultProxy(hub.url)
    try:
        plan = ignoring.set("ignore-range", times=-1, path_suffix="model.safetensors")
        home = tmp_path / "user"
        home.mkdir()
        (home / ".netrc").write_text("machine 127.0.0.1 login someone password something\n")
        (home / ".netrc").chmod(0o600)
        env = without_proxies(HF_ENDPOINT=ignoring.url, HTTP_PROXY=proxy.url, HOME=str(home), HF_TOKEN="hf_x",
                              MODELDEPOT_CHUNK_SIZE=str(256 << 10))  # fmt: skip
        modeldepot("pull", REPO, "--home", str(tmp_path / "store"), env=env)
        assert stored(tmp_path / "store") == EXPECTED
        assert plan.injected >= 1
        lines = [line for line, _ in proxy.heads]
        assert lines and all(line.startswith(f"GET {ignoring.url}/") for line in lines), lines
        whole = [line for line, asked in zip(lines, proxy.ranges, strict=True)
                 if asked is None and "/resolve/" in line and "model.safetensors" in line]  # fmt: skip
        assert whole, "the whole-body GET went through the proxy"
    finally:
        ignoring.stop()
