"""A real etcd (Debian's etcd-server, installed by scripts/install-etcd) on loopback, for fleet tests.

Each :class:`EtcdServer` gets free ports and its own data folder; it can be killed and started again on the
same data and ports, as an outage and a recovery. Short heartbeat and election timeouts make a single-member
cluster ready in well under a second.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import subprocess
import urllib.request
from pathlib import Path

from conftest import free_port, wait_until

__all__ = ["EtcdServer", "TcpGate", "TlsFiles", "etcd_binary"]


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found is None:
        raise RuntimeError("etcd is not installed: run ./scripts/install-etcd (Debian's etcd-server)")
    return found


class TlsFiles:
    """A CA of its own (made with openssl), and the certificates it signed: etcd's (for 127.0.0.1) and a
    client's (etcd's --client-cert-auth asks for one). ``other_ca``: a CA that signed none of them."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ca, self.ca_key = self._made("ca", None, "")
        self.server, self.server_key = self._made("server", "ca", "subjectAltName=IP:127.0.0.1\n"
                                                  "extendedKeyUsage=serverAuth")  # fmt: skip
        self.client, self.client_key = self._made("client", "ca", "extendedKeyUsage=clientAuth")
        self.other_ca, _ = self._made("other-ca", None, "")
        # a client's certificate another CA signed (etcd refuses it)
        self.stranger, self.stranger_key = self._made("stranger", "other-ca", "extendedKeyUsage=clientAuth")

    def expired(self) -> tuple[Path, Path]:
        """A client certificate of this CA whose dates ended yesterday, and its key."""
        return self._made("expired", "ca", "extendedKeyUsage=clientAuth", days="-1")

    def _made(self, name: str, signer: str | None, extensions: str, days: str = "2") -> tuple[Path, Path]:
        key, cert = self.folder / f"{name}.key", self.folder / f"{name}.pem"
        new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key)]
        if signer is None:
            subprocess.run(["openssl", "req", "-x509", *new_key, "-out", str(cert), "-days", "2",
                            "-subj", f"/CN=test {name}"], check=True, capture_output=True)  # fmt: skip
            return cert, key
        request, ext = self.folder / f"{name}.csr", self.folder / f"{name}.ext"
        ext.write_text(extensions + "\n")
        subprocess.run(["openssl", "req", *new_key, "-out", str(request), "-subj", f"/CN=test {name}"],
                       check=True, capture_output=True)  # fmt: skip
        subprocess.run(["openssl", "x509", "-req", "-in", str(request), "-CA", str(self.folder / f"{signer}.pem"),
                        "-CAkey", str(self.folder / f"{signer}.key"), "-CAcreateserial", "-out", str(cert),
                        "-days", days, "-extfile", str(ext)], check=True, capture_output=True)  # fmt: skip
        return cert, key

    def env(self) -> dict[str, str]:
        """What a node of the fleet is given: the CA, and its client certificate and key."""
        return {"MODELDEPOT_CLUSTER_CA": str(self.ca), "MODELDEPOT_CLUSTER_CERT": str(self.client),
                "MODELDEPOT_CLUSTER_KEY": str(self.client_key)}  # fmt: skip


class EtcdServer:
    def __init__(self, data_dir: Path, *extra: str, tls: TlsFiles | None = None) -> None:
        self.data_dir = data_dir
        self.extra = extra  # more of etcd's flags
        self.tls = tls  # its clients reach it over TLS, with a client certificate
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.client_port}"
        self.cluster = f"{'etcds' if tls else 'etcd'}://127.0.0.1:{self.client_port}"  # what --cluster takes
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls = self.tls
        secured = [] if tls is None else [
            "--cert-file", str(tls.server), "--key-file", str(tls.server_key),
            "--trusted-ca-file", str(tls.ca), "--client-cert-auth",
        ]  # fmt: skip
        return [
            etcd_binary(), "--name", "test", "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--initial-cluster-state", "new",
            "--heartbeat-interval", "10", "--election-timeout", "100", *secured,
            "--logger", "zap", "--log-level", "error", "--log-outputs", "stderr", *self.extra,
        ]  # fmt: skip

    def start(self) -> EtcdServer:
        log = open(self.data_dir.with_suffix(".log"), "ab")  # noqa: SIM115  (the process holds it)
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self.healthy, 30, f"etcd on {self.url} to be ready", self.process)
        return self

    def healthy(self) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client), str(self.tls.client_key))
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1, context=context) as answer:
                return b'"true"' in answer.read()
        except OSError:
            return False

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self.process = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class TcpGate:
    """A TCP relay on loopback in front of ``port`` (an etcd's), run on the caller's event loop, that a test
    can close (every connection through it is cut and new ones are refused: one client's network outage,
    while etcd itself and its other clients go on) and open again on the same port."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._relays: set[asyncio.Task[None]] = set()
        self.generation = 0
        self.delay = 0.0  # seconds each piece waits each way (a far etcd: 0.06 is a 120 ms round trip)

    async def open(self) -> TcpGate:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        return self

    async def close(self) -> None:
        self.generation += 1  # a connection being set up now is cut too
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        generation = self.generation
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        ends = [writer]
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            ends.append(up_writer)
            self._writers.add(up_writer)
            if generation == self.generation:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            for end in ends:
                end.transport.abort()
                self._writers.discard(end)
            self._relays.discard(task)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.transport.abort()
