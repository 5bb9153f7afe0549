"""A mirroring node (`serve --upstream`) in front of a real upstream node, for the mirror's tests: the
upstream holds FILES as REPO, behind a fault proxy or not."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from conftest import SMALL_CHUNK, LiveNode, write_model_dir
from faultproxy import FaultProxy, proxied_node
from modeldepot import Depot
from modeldepot.mirror import following as mirror_following

__all__ = [
    "BIG",
    "FILES",
    "REPO",
    "mirror_node",
    "mirror_of_a_node",
    "proxied_upstream",
    "read_then_leave",
    "read_until_it_breaks",
    "slow_chunks",
]

REPO = "acme/mirrored"
BIG = "model.safetensors"
rng = random.Random(7)
FILES = {
    "config.json": b'{"model_type": "bert", "hidden_size": 8}',
    "tokenizer.json": b'{"vocab": {"x": 0}}',
    BIG: rng.randbytes(48 * SMALL_CHUNK + 99),
    "empty.txt": b"",
}


def proxied_upstream(tmp_path: Path) -> Iterator[FaultProxy]:
    """(For a fixture.) An upstream node holding FILES as REPO, behind a fault proxy (yielded)."""
    yield from proxied_node(tmp_path / "upstream", FILES, REPO)


def mirror_node(
    tmp_path: Path,
    upstream: str,
    monkeypatch: pytest.MonkeyPatch,
    as_node: bool = True,
    request_deadline: float = 60.0,
) -> LiveNode:
    """A mirroring node whose upstream is a depot node (chunk digests), or a Hub-like one (none)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9" if as_node else upstream)
    depot = Depot(tmp_path / "mirror", chunk_size=SMALL_CHUNK, servers=[upstream] if as_node else [])
    return LiveNode(depot, request_deadline=request_deadline, mirror=True, owns_depot=True)


@contextlib.contextmanager
def mirror_of_a_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Depot, LiveNode]]:
    """An upstream node holding FILES as REPO (its depot, to change it) and a mirror of it."""
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        node = LiveNode(upstream_depot)
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            yield upstream_depot, mirror
        finally:
            mirror.stop()
            node.stop()


async def read_then_leave(url: str, at_least: int) -> bytes:
    """What a GET of ``url`` (a 200) received once it had ``at_least`` bytes, when its client left."""
    got = bytearray()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        async for piece in response.content.iter_any():
            got += piece
            if len(got) >= at_least:
                break  # (the client leaves: the connection is closed)
    return bytes(got)


async def read_until_it_breaks(url: str) -> bytes:
    """What a GET of ``url`` received before its answer broke (it must break, after a 200)."""
    received = bytearray()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        try:
            async for piece in response.content.iter_any():
                received += piece
        except aiohttp.ClientPayloadError:
            return bytes(received)
    raise AssertionError(f"the answer ended whole ({len(received)} bytes)")


def slow_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror's reader follows a chunk slow to land after 0.2 s, and its pulls read bodies 4 KiB at a time
    (as a 16 MiB chunk over a slow link lands a 256 KiB piece at a time), one connection to a source."""
    from modeldepot.transfer import ranged

    monkeypatch.setattr(mirror_following, "AHEAD_PATIENCE", 0.2)
    monkeypatch.setattr(mirror_following, "AHEAD_LOOK", 0.05)
    monkeypatch.setattr(ranged, "READ_PIECE", 4096)
    monkeypatch.setenv("MODELDEPOT_CONNECTIONS_PER_SOURCE", "1")
