"""The access log's bytes are the body bytes each answer sent: a file sent by sendfile, a Range of it, a
mirrored stream, and what a client that left early was sent until then (never the size of the headers)."""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import struct
from pathlib import Path

import pytest
import requests

from conftest import SMALL_CHUNK, LiveNode, wait_until, write_model_dir
from modeldepot import Depot

REPO = "acme/big"
BIG = "big.bin"
DATA = random.Random(11).randbytes(20 * SMALL_CHUNK + 12345)  # 21 chunks: 21 sendfile calls


def logged(caplog: pytest.LogCaptureFixture, request_line: str, count: int = 1) -> list[tuple[int, int]]:
    """(status, bytes) of the access lines of ``request_line`` (``GET /path``), once there are ``count``
    (the node writes a line after its answer went out: the client may be faster)."""
    pattern = re.compile(rf'"{re.escape(request_line)} HTTP/1\.1" (\d{{3}}) (\d+)(?:/\d+)? ')

    def lines() -> list[tuple[int, int]] | None:
        found = [m.groups() for r in caplog.records if (m := pattern.search(r.getMessage()))]
        return [(int(status), int(size)) for status, size in found] if len(found) >= count else None

    result: list[tuple[int, int]] = wait_until(lines, 10, f"{count} access line(s) of {request_line}")
    return result


@pytest.fixture
def node(depot: Depot, live_node: LiveNode, tmp_path: Path) -> LiveNode:
    depot.import_dir(write_model_dir(tmp_path / "big", {BIG: DATA, "config.json": b"{}"}), REPO)
    return live_node


def test_a_file_and_its_ranges_are_logged_with_their_body_bytes(
    node: LiveNode, caplog: pytest.LogCaptureFixture
) -> None:
    # (by its commit: by its branch, an LFS file is a redirect there, logged as a 302 of no body)
    path = f"/{REPO}/resolve/{node.depot.resolve(REPO)}/{BIG}"
    caplog.set_level(logging.INFO)
    assert requests.head(f"{node.url}/{REPO}/resolve/main/{BIG}", timeout=30).status_code == 302
    assert logged(caplog, f"HEAD /{REPO}/resolve/main/{BIG}") == [(302, 0)]
    whole = requests.get(node.url + path, timeout=30)
    assert whole.status_code == 200 and whole.content == DATA
    assert logged(caplog, f"GET {path}") == [(200, len(DATA))]
    assert f'HTTP/1.1" 200 {len(DATA)} ' in caplog.text  # (whole: no "/size" said)

    start, end = SMALL_CHUNK - 100, 5 * SMALL_CHUNK + 7  # across chunk boundaries, not aligned to them
    part = requests.get(node.url + path, headers={"Range": f"bytes={start}-{end}"}, timeout=30)
    assert part.status_code == 206 and part.content == DATA[start : end + 1]
    assert logged(caplog, f"GET {path}", 2)[1] == (206, end - start + 1)

    tail = requests.get(node.url + path, headers={"Range": "bytes=-1000"}, timeout=30)
    assert tail.status_code == 206 and tail.content == DATA[-1000:]
    assert logged(caplog, f"GET {path}", 3)[2] == (206, 1000)

    assert requests.head(node.url + path, timeout=30).status_code == 200
    assert logged(caplog, f"HEAD {path}") == [(200, 0)]  # the headers only: no body


def test_answers_from_memory_are_logged_with_their_body_bytes(
    node: LiveNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    info = requests.get(f"{node.url}/api/models/{REPO}", timeout=30)
    assert info.status_code == 200
    assert logged(caplog, f"GET /api/models/{REPO}") == [(200, len(info.content))]
    missing = requests.get(f"{node.url}/api/models/acme/missing", timeout=30)
    assert missing.status_code == 404
    assert logged(caplog, "GET /api/models/acme/missing") == [(404, len(missing.content))]


def test_a_client_that_leaves_is_logged_with_what_it_was_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One chunk, so one sendfile call, which the client cuts: what it sent is counted, not nothing.
    size = 48 << 20
    with Depot(tmp_path / "store", chunk_size=64 << 20) as depot:
        depot.import_dir(write_model_dir(tmp_path / "huge", {BIG: os.urandom(size)}), REPO)
        node = LiveNode(depot)
        try:
            caplog.set_level(logging.INFO)
            path = f"/{REPO}/resolve/{depot.resolve(REPO)}/{BIG}"
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
                sock.connect(("127.0.0.1", node.port))
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
                received = b""
                while len(received) < 1 << 20:
                    data = sock.recv(1 << 16)
                    assert data, "the node closed the connection"
                    received += data
                head, _, body = received.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
            ((status, sent),) = logged(caplog, f"GET {path}")
        finally:
            node.stop()
    assert status == 200
    assert len(body) <= sent < size, (len(body), sent)
    # Said cut short, with the bytes it was to send (it read as a whole download's line: an explorer's trial)
    assert f'HTTP/1.1" 200 {sent}/{size} ' in caplog.text, caplog.text


def test_a_mirrored_stream_is_logged_with_its_body_bytes(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    depot.import_dir(write_model_dir(tmp_path / "big", {BIG: DATA}), REPO)
    upstream = LiveNode(depot)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    mirror = LiveNode(
        Depot(tmp_path / "mirror", chunk_size=SMALL_CHUNK, servers=[upstream.url]),
        mirror=True,
        owns_depot=True,
    )
    try:
        caplog.set_level(logging.INFO)
        path = f"/{REPO}/resolve/{depot.resolve(REPO)}/{BIG}"
        answer = requests.get(mirror.url + path, timeout=30)
        assert answer.status_code == 200 and answer.content == DATA
        # (the upstream, in this process too, logs the ranges the mirror asked of the same path: 206s)
        whole = wait_until(
            lambda: [line for line in logged(caplog, f"GET {path}") if line[0] == 200] or None, 10
        )
        assert whole == [(200, len(DATA))]
    finally:
        mirror.stop()
        upstream.stop()
