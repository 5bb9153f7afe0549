"""Free ports and waiting for something to happen: the one copy the benchmarks and the tests share.

Standard library only. The benchmarks run as scripts (``benchmarks/`` is on ``sys.path``) and import it as
``netutil``; the tests' ``conftest.py`` loads this file by path and re-exports its names, so tests write
``from conftest import free_port, wait_for_port, wait_until``.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


_HANDED_OUT: set[int] = set()  # the ports free_port returned (their servers may not have bound them yet)
_HELD: list[socket.socket] = []  # the sockets that keep closed_port's ports refusing


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now, for a server started in another process.

    Another program could take it before that server binds it; a server in this process binds port 0
    instead and reads the port it got."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = int(probe.getsockname()[1])
    _HANDED_OUT.add(port)
    return port


def closed_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that refuses connections for the rest of this process, for an upstream
    that is down. A socket stays bound there without listening: a connection is refused, and no server
    (of this process or another) can be given the port, as one could a port ``free_port`` returned. Never
    one ``free_port`` returned: its server may not have bound it yet."""
    while True:
        held = socket.socket()
        held.bind((host, 0))
        port = int(held.getsockname()[1])
        if port not in _HANDED_OUT:
            _HELD.append(held)
            return port
        held.close()


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    what: str = "the condition",
    process: subprocess.Popen[Any] | None = None,
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something true, and return that.

    For what offers no event to wait on (another process, a file a server writes). Raises TimeoutError
    naming ``what`` after ``timeout`` seconds, or RuntimeError at once if ``process`` (the one expected to
    bring the condition about) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"waiting for {what}: the process exited with code {process.returncode}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host``:``port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int, timeout: float = 60.0, host: str = "127.0.0.1", process: subprocess.Popen[Any] | None = None
) -> None:
    """Wait until something accepts TCP connections on ``host``:``port`` (a server that has started).

    Raises TimeoutError after ``timeout`` seconds, or RuntimeError at once if ``process`` has exited."""
    wait_until(lambda: port_open(port, host), timeout, f"a server listening on {host}:{port}", process, 0.05)
