"""The disk budget (store/budget.py): least recently used revisions go first, never what is pinned or in
use; content that cannot fit fails before a byte is written, and nothing is lost."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from conftest import SMALL_CHUNK, LiveNode, store_files_consistent, write_model_dir
from modeldepot import Depot
from modeldepot.cli import cli
from modeldepot.errors import ConfigError, InvalidInputError, NotFoundError, StoreError, StoreFullError
from modeldepot.preload import Preloader
from modeldepot.store import maintenance
from modeldepot.store.budget import BudgetExceededError, parse_max_size
from modeldepot.store.layout import os_error
from modeldepot.store.partials import ENDED_MARK, PUBLIC_MARK

MB = 1 << 20


def model(tmp_path: Path, name: str, size: int = MB, seed: int = 0) -> Path:
    """A folder with one weights file of ``size`` random bytes and a small config."""
    rng = np.random.default_rng(abs(hash((name, seed))) % (1 << 32))
    return write_model_dir(tmp_path / "src" / name, {
        "config.json": json.dumps({"name": name, "seed": seed}).encode(),
        "model.safetensors": rng.bytes(size),
    })  # fmt: skip


@contextlib.contextmanager
def hub_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    """A node that plays the Hub (HF_ENDPOINT) for the test's pulls: its depot, to import into."""
    with Depot(tmp_path / "upstream") as hub:
        node = LiveNode(hub)
        try:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", node.url)
            yield hub
        finally:
            node.stop()


def budgeted(home: Path, max_size: str, monkeypatch: pytest.MonkeyPatch) -> Depot:
    monkeypatch.setenv("MODELDEPOT_MAX_SIZE", max_size)
    return Depot(home, chunk_size=SMALL_CHUNK)


@contextlib.contextmanager
def budgeted_mirror(
    tmp_path: Path, upstream_url: str, max_size: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Depot, LiveNode]]:
    """A mirroring node of ``upstream_url`` (named by HF_ENDPOINT) whose store keeps to ``max_size``."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", upstream_url)
    depot = Depot(tmp_path / "mirror", chunk_size=SMALL_CHUNK)
    depot.set_max_size(max_size)
    mirror = LiveNode(depot, mirror=True, owns_depot=True)
    try:
        yield depot, mirror
    finally:
        mirror.stop()


def repos(depot: Depot) -> set[str]:
    return {r.repo_id for r in depot.list_repos()}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    with budgeted(tmp_path / "store", "3.5MiB", monkeypatch) as depot:
        yield depot


def test_sizes_and_shares_of_the_disk_are_read_and_bad_ones_refused(tmp_path: Path) -> None:
    assert parse_max_size("200GiB", tmp_path) == 200 << 30
    assert parse_max_size("1048576", tmp_path) == MB
    assert parse_max_size("1.5 GiB", tmp_path) == 3 << 29
    stat = os.statvfs(tmp_path)
    assert parse_max_size("50%", tmp_path) == int(stat.f_blocks * stat.f_frsize * 0.5)
    assert parse_max_size(MB, tmp_path) == MB  # (Depot.set_max_size(1 << 30): an AttributeError)
    # Typed, a bare number of bytes that holds no model is a unit left out (`serve --max-size 5` emptied a
    # store); saved by the store (set_max_size(524288) keeps "524288"), it is read as it is
    from modeldepot.config import DepotConfig, typed_max_size

    with pytest.raises(ConfigError, match=r"give a unit \(like 5GiB\)"):
        typed_max_size("5", tmp_path)
    with pytest.raises(ConfigError, match=r"MODELDEPOT_MAX_SIZE: .*give a unit"):  # (it emptied a store too)
        DepotConfig.from_env({"MODELDEPOT_MAX_SIZE": "5"}, home=tmp_path)
    assert typed_max_size("5KiB", tmp_path) == 5 << 10 and parse_max_size("5", tmp_path) == 5
    # (a budget that rounds to 0 bytes evicted everything; 400 digits overflowed a float: a traceback)
    huge = ("9" * 400 + "GiB", "99999999999999999999999999999999TiB", "1" + "0" * 19)
    for bad in (
        "0",
        "0%",
        "101%",
        "lots",
        "-5GiB",
        "%",
        "0.00000000000000000001%",
        *huge,
        0,
        True,
        1.5,
        ["1GiB"],
    ):
        with pytest.raises(ConfigError):
            parse_max_size(bad, tmp_path)  # type: ignore[arg-type]


def test_the_least_recently_used_revision_goes_first_and_reads_count_as_uses(
    store: Depot, tmp_path: Path
) -> None:
    for name in ("acme/a", "acme/b", "acme/c"):
        store.import_dir(model(tmp_path, name), name)
        time.sleep(0.01)
    store.get_file("acme/a", "config.json")  # a is read: b is now the least recently used
    store.store.access.flush()
    store.import_dir(model(tmp_path, "acme/d"), "acme/d")  # 4 MiB > 3.5 MiB: one must go
    assert repos(store) == {"acme/a", "acme/c", "acme/d"}
    status = store.budget_status()
    assert status.max_bytes == int(3.5 * MB) and status.used_bytes <= status.max_bytes
    assert status.evictions == 1 and status.evicted_bytes >= MB
    assert store_files_consistent(store) == []


def test_uses_recorded_under_a_clock_set_back_since_neither_keep_a_model_nor_make_it_go_first(
    store: Depot, tmp_path: Path
) -> None:
    """A box that booted with its clock ahead, then met NTP: every model used meanwhile had a last use in the
    future, counted as used during every write since, and was never evicted (the store went over its budget,
    `budget` saying 0 B kept), and the model just pulled went in its place (an explorer's trial on an edge
    box); taken as never used, they went before a model unused for a month (review 41). Such a use counts
    as a minute ago; a use made since replaces it."""
    import sqlite3

    for name in ("acme/old", "acme/a", "acme/b"):
        store.import_dir(model(tmp_path, name), name)
        store.get_file(name, "config.json")
    store.store.access.flush()
    month = 30 * 86400
    with sqlite3.connect(store.store.layout.index_path) as con:
        for table in ("access", "revision_access"):  # (old: a month ago; a and b: an hour ahead)
            con.execute(
                f"UPDATE {table} SET last_access = last_access - ? WHERE repo_id = 'acme/old'", (month,)
            )
            con.execute(f"UPDATE {table} SET last_access = last_access + 3600 WHERE repo_id != 'acme/old'")
        con.execute("UPDATE revisions SET created_at = created_at - ? WHERE repo_id = 'acme/old'", (month,))
    store.import_dir(model(tmp_path, "acme/c"), "acme/c")  # 4 MiB > 3.5 MiB: one must go
    assert repos(store) == {"acme/a", "acme/b", "acme/c"}, "the month-old one, not those used an hour ahead"
    store.get_file("acme/a", "config.json")  # a use now (the clock right again)
    store.store.access.flush()
    store.import_dir(model(tmp_path, "acme/d"), "acme/d")
    assert repos(store) == {"acme/a", "acme/c", "acme/d"}, "b's use, an hour ahead, keeps it no longer"
    status = store.budget_status()
    assert status.used_bytes <= status.max_bytes and status.evictions == 2
    ahead = time.time() + 60
    assert not store.store.index.read("SELECT 1 FROM access WHERE last_access > ?", (ahead,)), "set back"


def test_a_preload_counts_as_a_use(store: Depot, tmp_path: Path) -> None:
    """A model preloaded (here by another process, since let go of) was used then: the budget evicted it
    first all the same, as if it had not been touched since its import."""
    for name in ("acme/a", "acme/b", "acme/c"):
        store.import_dir(model(tmp_path, name), name)
        time.sleep(0.01)
    with Depot(store.home, chunk_size=SMALL_CHUNK) as other:
        preloader = Preloader(other, budget="1GiB")
        preloader.preload("acme/a")
        preloader.close()
    store.import_dir(model(tmp_path, "acme/d"), "acme/d")  # 4 MiB > 3.5 MiB: one must go
    assert repos(store) == {"acme/a", "acme/c", "acme/d"}


def test_pinned_content_is_never_evicted_and_what_cannot_fit_fails_before_writing(
    store: Depot, tmp_path: Path
) -> None:
    store.import_dir(model(tmp_path, "acme/a"), "acme/a")
    store.import_dir(model(tmp_path, "acme/b"), "acme/b")
    store.pin("acme/a")
    store.pin("acme/b", revision=store.resolve("acme/b"))  # by commit id
    assert {p.repo_id for p in store.pins()} == {"acme/a", "acme/b"}
    before = store.du()

    with pytest.raises(BudgetExceededError) as caught:
        store.import_dir(model(tmp_path, "acme/big", size=2 * MB), "acme/big")
    error = caught.value
    assert isinstance(error, StoreFullError)
    assert error.budget_bytes == int(3.5 * MB) and error.needed_bytes >= 2 * MB
    assert error.protected_bytes >= 2 * MB
    assert "3.5 MiB" in str(error) and "pinned" in str(error)
    assert repos(store) == {"acme/a", "acme/b"}, "nothing removed"
    after = store.du()
    assert (after.blob_bytes, after.blobs) == (before.blob_bytes, before.blobs), "nothing written"
    assert not any((store.home / "tmp").iterdir()) if (store.home / "tmp").exists() else True

    assert store.unpin("acme/a") and not store.unpin("acme/a")
    store.import_dir(model(tmp_path, "acme/big", size=2 * MB), "acme/big")  # a may go now: it does
    assert repos(store) == {"acme/b", "acme/big"}
    assert store_files_consistent(store) == []


def test_what_would_free_nothing_is_not_evicted(tmp_path: Path) -> None:
    """A copy of a pinned repo (each of its blobs the pinned one's) was evicted first, freeing 0 bytes: a
    repo lost for nothing, counted as an eviction (a trial). Two unpinned copies still go, together."""
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        same = model(tmp_path, "acme/same", size=3 * MB)
        depot.import_dir(same, "acme/pinned")
        depot.import_dir(same, "acme/copy-of-pinned")  # (used first: the least recently used is the other)
        depot.import_dir(model(tmp_path, "acme/other", size=2 * MB), "acme/other")
        depot.pin("acme/pinned")
        evicted = depot.set_max_size(4 * MB)
        assert [(e.repo_id, e.bytes_freed > 0) for e in evicted] == [("acme/other", True)]
        assert repos(depot) == {"acme/pinned", "acme/copy-of-pinned"}
        depot.unpin("acme/pinned")
        evicted = depot.set_max_size(2 * MB)  # (two copies, neither pinned: each alone frees nothing)
        assert {e.repo_id for e in evicted} == {"acme/pinned", "acme/copy-of-pinned"} and repos(
            depot
        ) == set()


def test_a_quarantined_blob_counts_neither_as_used_nor_as_pinned(store: Depot, tmp_path: Path) -> None:
    store.import_dir(model(tmp_path, "acme/a"), "acme/a")
    store.pin("acme/a")
    before = store.budget_status()
    assert MB <= before.pinned_bytes == before.used_bytes < 1.1 * MB
    weights = store.file_info("acme/a", "model.safetensors").sha256
    assert store.store.quarantine(weights)
    after = store.budget_status()
    # (the metric modeldepot_store_pinned_bytes kept the megabyte verify had moved out of the store)
    assert after.pinned_bytes == after.used_bytes == before.used_bytes - MB


def test_pins_are_validated(store: Depot, tmp_path: Path) -> None:
    store.import_dir(model(tmp_path, "acme/a"), "acme/a")
    with pytest.raises(NotFoundError):
        store.pin("acme/missing")
    with pytest.raises(NotFoundError):
        store.pin("acme/a", quant="q4")  # no such variant
    with pytest.raises(NotFoundError):
        store.pin("acme/a", revision="nope")
    with pytest.raises(InvalidInputError):
        store.pin("../etc")
    with pytest.raises(InvalidInputError):
        store.unpin("acme/a", revision="a..b")


def test_preloaded_and_loaded_models_and_pulls_in_progress_are_in_use(store: Depot, tmp_path: Path) -> None:
    folder = tmp_path / "st"
    folder.mkdir()
    save_file({"w": np.ones((256, 1024), dtype=np.float32)}, str(folder / "model.safetensors"))  # 1 MiB
    store.import_dir(folder, "acme/loaded")
    store.import_dir(model(tmp_path, "acme/preloaded"), "acme/preloaded")
    store.import_dir(model(tmp_path, "acme/pulling"), "acme/pulling")
    store.load("acme/loaded", engine="safetensors")
    store.preloader.preload("acme/preloaded")
    # A pull in another process marks its repo as downloading in the index, and holds its pull mark:
    with store.store.index.write("test") as con:
        con.execute("INSERT INTO manifests VALUES ('acme/pulling', 'main', ?, '{}', ?)",
                    (store.resolve("acme/pulling"), time.time()))  # fmt: skip
        con.execute("INSERT INTO variant_status (repo_id, variant, status, updated_at) "
                    "VALUES ('acme/pulling', '', 'downloading', ?)", (time.time(),))  # fmt: skip
    pull_mark = contextlib.ExitStack()
    pull_mark.enter_context(store.store.partials.pulling("acme/pulling"))
    status = store.budget_status()
    assert status.in_use_bytes >= 3 * MB and status.pinned_bytes == 0
    held = store.preloader.get("acme/preloaded")  # (a preload a caller holds does not give way)
    with pytest.raises(BudgetExceededError) as refused:
        store.import_dir(model(tmp_path, "acme/new"), "acme/new")
    assert "pinned, in use (loaded, or mapped or open, in this process) or files this write reuses" in str(
        refused.value
    )
    assert repos(store) == {"acme/loaded", "acme/preloaded", "acme/pulling"}
    held.release()

    # A preload nothing holds gives way when room cannot be made otherwise (a node's preloads refused its own
    # pulls for as long as it ran: a trial); the engine stays
    store.import_dir(model(tmp_path, "acme/new"), "acme/new")
    assert repos(store) == {"acme/loaded", "acme/pulling", "acme/new"}
    assert store.preloader.revisions() == set()

    store.engines.clear()  # the engine is unloaded: its model may go
    store.import_dir(model(tmp_path, "acme/newer"), "acme/newer")
    assert repos(store) == {"acme/pulling", "acme/new", "acme/newer"}
    pull_mark.close()  # the pull is killed: its row still says downloading, and keeps nothing (a chaos
    # trial: a tight budget refused writes for the ten minutes the row stayed fresh)
    budget = store.store.budget
    with budget.writing("acme/other") as writer:
        assert "acme/pulling" not in budget._kept(writer).repos


def test_a_file_this_process_maps_or_holds_open_is_in_use(store: Depot, tmp_path: Path) -> None:
    """An inference server read a model through get_file while an import needed room: its revision was
    evicted, its disk space stayed taken by the mapping, and the budget said it was free (an explorer's
    trial). A live view, mapping or stream keeps it; once let go of, it may go."""
    for name in ("acme/mapped", "acme/streamed", "acme/idle"):
        store.import_dir(model(tmp_path, name), name)
    view = store.get_file("acme/mapped", "model.safetensors")
    with store.open_file("acme/streamed", "model.safetensors") as stream:
        assert store.budget_status().in_use_bytes >= 2 * MB
        for name in ("acme/new", "acme/newer"):  # (room for each: the one not in use goes)
            store.import_dir(model(tmp_path, name), name)
            assert {"acme/mapped", "acme/streamed", name} == repos(store)
        assert stream.read(8) == (tmp_path / "src" / "acme/streamed" / "model.safetensors").read_bytes()[:8]
    # Closed, the stream keeps nothing: its revision, the least recently used, goes next
    store.import_dir(model(tmp_path, "acme/newest"), "acme/newest")
    assert repos(store) == {"acme/mapped", "acme/newer", "acme/newest"}
    with store.map_file("acme/newer", "model.safetensors") as mapped:
        assert len(mapped) == MB
        with pytest.raises(
            BudgetExceededError, match=r"in use \(loaded, or mapped or open, in this process\)"
        ):
            store.import_dir(model(tmp_path, "acme/big", size=2 * MB), "acme/big")
    assert bytes(view[:8]) == (tmp_path / "src" / "acme/mapped" / "model.safetensors").read_bytes()[:8]
    del view  # (unmapped: it may go too)
    store.import_dir(model(tmp_path, "acme/big", size=2 * MB), "acme/big")
    assert repos(store) == {"acme/big"} | (repos(store) & {"acme/newer", "acme/newest"})
    assert "acme/mapped" not in repos(store)


WORKER = """
import mmap, sys
from modeldepot import Depot

depot = Depot(sys.argv[1], create=False)
engine = depot.load("acme/loaded", engine="safetensors")  # (maps its blob through a link of its own, gone since)
with open(depot.file_path("acme/mapped", "model.safetensors"), "rb") as file:
    mapped = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
depot.close()
print("holding", flush=True)
sys.stdin.read()
print(float(sum(t.sum() for t in engine.values())), mapped[:1].hex(), flush=True)
"""


def test_a_model_another_process_has_loaded_or_maps_is_in_use(store: Depot, tmp_path: Path) -> None:
    """A CLI pull under a budget evicted a model a notebook had loaded: that freed nothing while the notebook
    mapped it, and its next load pulled it back (an explorer's trial). What other processes map or hold open
    is in use, as this process's own is, and a refusal names them."""
    import subprocess
    import sys

    folder = tmp_path / "st"
    folder.mkdir()
    save_file({"w": np.ones((256, 1024), dtype=np.float32)}, str(folder / "model.safetensors"))  # 1 MiB
    store.import_dir(folder, "acme/loaded")
    for name in ("acme/mapped", "acme/idle"):
        store.import_dir(model(tmp_path, name), name)
    (tmp_path / "worker.py").write_text(WORKER)
    worker = subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(store.home)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "holding\n"
        assert store.budget_status().in_use_bytes >= 2 * MB
        for name in ("acme/new", "acme/newer"):  # (room for each: the one no process holds goes)
            store.import_dir(model(tmp_path, name), name)
            assert repos(store) == {"acme/loaded", "acme/mapped", name}
        with pytest.raises(BudgetExceededError, match=rf"or by process {worker.pid} \(worker.py "):
            store.import_dir(model(tmp_path, "acme/big", size=2 * MB), "acme/big")
        assert repos(store) == {"acme/loaded", "acme/mapped", "acme/newer"}
        said, _ = worker.communicate("", timeout=60)
        first = (tmp_path / "src" / "acme/mapped" / "model.safetensors").read_bytes()[:1]
        assert said.split() == [str(256.0 * 1024), first.hex()] and worker.returncode == 0, said
    finally:
        worker.kill()
        worker.wait()
    store.import_dir(model(tmp_path, "acme/big", size=2 * MB), "acme/big")  # (let go of: they may go)
    assert "acme/big" in repos(store) and len(repos(store) & {"acme/loaded", "acme/mapped"}) < 2


def _slow_client(url: str) -> socket.socket:
    """A client that asks for ``url`` (a node's file: its redirect followed) and reads 64 KiB of the answer,
    then nothing: its answer stays in flight (a slow client's)."""
    import http.client

    parsed = urllib.parse.urlsplit(url)
    asking = http.client.HTTPConnection(parsed.netloc, timeout=30)
    asking.request("HEAD", parsed.path)
    answer = asking.getresponse()
    location = answer.getheader("Location")
    asking.close()
    if answer.status == 302 and location:
        parsed = urllib.parse.urlsplit(urllib.parse.urljoin(url, location))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (little room in flight for the answer)
    client.connect((parsed.hostname, parsed.port))
    target = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    client.sendall(f"GET {target} HTTP/1.1\r\nHost: {parsed.netloc}\r\n\r\n".encode())
    got = b""
    while len(got) < 65536:
        piece = client.recv(65536)
        assert piece, got[:200]
        got += piece
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    return client


@pytest.mark.parametrize("where", ["this process", "another process"])
def test_a_file_a_node_is_sending_is_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A node streaming a model to a slow client: an import needing room evicted it, said its bytes freed, and
    the disk stayed over budget until the client was done (the next client got a 404: an explorer's trial). A
    node lets go of its preloads within seconds, not of an answer in flight: what it sends is in use, in the
    node's own process and, said in its announcement, for the other processes of the store."""
    import subprocess
    import sys

    from conftest import free_port, wait_for_port

    home = tmp_path / "store"
    with budgeted(home, "40MiB", monkeypatch) as depot:
        depot.import_dir(model(tmp_path, "acme/served", size=24 * MB), "acme/served")
        node: LiveNode | None = None
        server: subprocess.Popen[bytes] | None = None
        if where == "this process":
            node = LiveNode(depot)
            url = node.url
        else:
            port = free_port()
            server = subprocess.Popen([sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port",
                                       str(port), "--scrub-interval", "off"])  # fmt: skip
            wait_for_port(port, 60, process=server)
            url = f"http://127.0.0.1:{port}"
        client: socket.socket | None = None
        try:
            client = _slow_client(f"{url}/acme/served/resolve/main/model.safetensors")
            time.sleep(2.5)  # (a node says what it sends every 2 s)
            with pytest.raises(BudgetExceededError) as refused:
                depot.import_dir(model(tmp_path, "acme/new", size=24 * MB), "acme/new")
            said = str(refused.value)
            assert "in use" in said, said
            if server is not None:
                assert f"process {server.pid}" in said, said
            assert repos(depot) == {"acme/served"}
            client.close()  # (the answer ends: the model may go)
            deadline = time.monotonic() + 30
            while True:
                try:
                    depot.import_dir(model(tmp_path, "acme/new", size=24 * MB), "acme/new")
                    break
                except BudgetExceededError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            assert repos(depot) == {"acme/new"}
        finally:
            if client is not None:
                client.close()
            if node is not None:
                node.stop()
            if server is not None:
                server.terminate()
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()


def test_a_file_a_node_sends_keeps_its_revision_not_every_one_that_shares_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob a node sent kept every revision that names it from eviction: a slow download of one repo's
    tokenizer, which a fine-tune shares, kept the fine-tune too, and an import that fitted once that went was
    refused (a review). The file's revision is in use; the others sharing the blob may go."""
    import random

    shared = random.Random(7).randbytes(8 * MB)
    with budgeted(tmp_path / "store", "40MiB", monkeypatch) as depot:
        for name, seed in (("acme/a", 1), ("acme/b", 2)):
            weights = random.Random(seed).randbytes(8 * MB)
            depot.import_dir(
                write_model_dir(tmp_path / name, {"tokenizer.json": shared, "model.safetensors": weights}),
                name,
            )
            time.sleep(0.05)  # (acme/a used first: without the download, it would go first)
        node = LiveNode(depot)
        client: socket.socket | None = None
        try:
            client = _slow_client(f"{node.url}/acme/a/resolve/main/tokenizer.json")
            depot.import_dir(model(tmp_path, "acme/new", size=20 * MB), "acme/new")
            assert repos(depot) == {"acme/a", "acme/new"}, repos(depot)
        finally:
            if client is not None:
                client.close()
            node.stop()


def test_an_update_of_a_pinned_model_that_cannot_fit_beside_it_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pinned branch whose upstream moved, under a budget for one revision: the pin keeps the commit the pull
    replaces until the new one is whole, so the update is refused, saying so and what to do (the error named
    no cause: "unpin or remove models" with one model, an operator's first upstream update)."""
    with Depot(tmp_path / "upstream") as hub:
        hub.import_dir(model(tmp_path, "up/served", size=2 * MB), "up/served")
        node = LiveNode(hub)
        try:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", node.url)
            with budgeted(tmp_path / "local", "3MiB", monkeypatch) as local:
                local.pull("up/served")
                local.pin("up/served")
                hub.import_dir(model(tmp_path, "up/served", size=2 * MB, seed=1), "up/served")
                with pytest.raises(BudgetExceededError) as refused:
                    local.pull("up/served")
                said = str(refused.value)
                assert "its pin keeps the revision this pull replaces" in said, said
                assert "modeldepot unpin up/served" in said, said
                # What status says meanwhile: the variant is held whole at the commit main names here
                served = local.resolve("up/served", "main")
                [variant] = local.get_manifest("up/served").variants
                assert (variant.status, variant.held_commit) == ("available", served), variant
                local.unpin("up/served")
                local.pin("up/served", revision=served)  # kept on purpose: an update replaces nothing of it
                with pytest.raises(BudgetExceededError) as refused:
                    local.pull("up/served")
                assert "this pull replaces" not in str(refused.value) and "unpin" in str(refused.value)
                local.unpin("up/served", revision=served)
                local.pull("up/served")  # (as it says: then it fits)
                assert local.resolve("up/served", "main") == hub.resolve("up/served", "main") != served
                [variant] = local.get_manifest("up/served").variants
                assert (variant.status, variant.held_commit) == ("downloaded", None), variant
        finally:
            node.stop()


def test_a_pinned_model_updated_a_variant_at_a_time_keeps_what_it_held_until_the_update_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pin of the whole model followed its branch to an update pulled a quant at a time: the commit that held
    the pinned model whole was left to no ref, and the next write evicted the pinned Q8 (a trial). It is kept
    while the update lacks a variant it held; once the update is whole it may go."""
    with hub_node(tmp_path, monkeypatch) as hub:
        hub.import_dir(quants(tmp_path, "up/q"), "up/q")
        with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
            local.pull("up/q")
            old = local.resolve("up/q")
            local.pin("up/q")
            local.set_max_size("3.5MiB")
            update = quants(tmp_path, "up/q")
            (update / "model-Q4_K_M.gguf").write_bytes(np.random.default_rng(9).bytes(MB))
            # (Q8 changed too: one unchanged is kept at the new commit by the pull of another, from the store)
            (update / "model-Q8_0.gguf").write_bytes(np.random.default_rng(10).bytes(MB))
            hub.import_dir(update, "up/q")
            local.pull("up/q", "Q4_K_M")
            new = local.resolve("up/q")
            assert new != old and not local.has_file("up/q", "model-Q8_0.gguf", new)
            # status says where the pin keeps it whole (it said "available", of 18 MiB the pin kept: a trial)
            variants = {v.name: v for v in local.get_manifest("up/q").variants}
            assert (variants["Q8_0"].status, variants["Q8_0"].held_commit) == ("available", old)
            shown = " ".join(
                CliRunner().invoke(cli, ["status", "up/q", "--home", str(local.home)]).output.split()
            )
            assert f"held whole at {old[:12]} here" in shown, shown
            with pytest.raises(BudgetExceededError):  # (3 MiB held, all of it pinned: 1 MiB more is over)
                local.import_dir(model(tmp_path, "acme/other", size=MB), "acme/other")
            assert local.has_file("up/q", "model-Q8_0.gguf", old), "the pinned Q8 stays"
            local.set_max_size(None)
            local.pull("up/q")  # the update, whole: the pin needs no more of the old commit
            assert local.has_file("up/q", "model-Q8_0.gguf", new)
            assert {(e.repo_id, e.commit_id) for e in local.shrink("2.5MiB")} == {("up/q", old)}
            assert [c for c, _ in local.store.revisions("up/q")] == [new]


def test_a_pull_evicts_before_it_downloads_and_fails_before_it_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Depot(tmp_path / "upstream") as hub:
        hub.import_dir(model(tmp_path, "up/one", size=2 * MB), "up/one")
        hub.import_dir(model(tmp_path, "up/huge", size=4 * MB), "up/huge")
        node = LiveNode(hub)
        try:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", node.url)
            # The room is made on threads of its own: a mirror's pulls waiting for the budget's lock took every
            # thread of the default executor, and its /health waited seconds behind them (an explorer's trial)
            from modeldepot.store.budget import DiskBudget

            made_on: list[str] = []
            make_room = DiskBudget.make_room
            monkeypatch.setattr(DiskBudget, "make_room", lambda self, *args, **kwargs: (
                made_on.append(threading.current_thread().name), make_room(self, *args, **kwargs))[1])  # fmt: skip
            with budgeted(tmp_path / "local", "3.5MiB", monkeypatch) as local:
                local.import_dir(model(tmp_path, "acme/old"), "acme/old")
                local.import_dir(model(tmp_path, "acme/kept"), "acme/kept")
                local.pin("acme/kept")
                made_on.clear()
                result = local.pull("up/one")
                assert repos(local) == {"acme/kept", "up/one"}
                assert made_on and all(name.startswith("modeldepot-budget") for name in made_on), made_on
                assert result.bytes_by_source.get("node", 0) + result.bytes_by_source.get("hub", 0) > 2 * MB

                with pytest.raises(BudgetExceededError):
                    local.pull("up/huge")
                assert repos(local) == {"acme/kept", "up/one"}
                partials = local.home / "partials"
                fetched = [p for p in partials.rglob("*")
                           if p.is_file() and p.suffix != ".lock" and p.name not in (PUBLIC_MARK, ENDED_MARK)]  # fmt: skip
                assert fetched == [], "nothing fetched"
                assert local.budget_status().evictions == 1
                assert {v.status for v in local.get_manifest("up/one").variants} == {"downloaded"}
                assert [e.repo_id for e in local.shrink("1MiB")] == ["up/one"]  # the pinned one stays
                assert {v.status for v in local.get_manifest("up/one").variants} == {"available"}
                assert store_files_consistent(local) == []
        finally:
            node.stop()


def test_cli_pin_unpin_du_gc_and_bad_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "cli-store"
    runner = CliRunner()
    for name in ("acme/a", "acme/b", "acme/c"):
        ok = runner.invoke(cli, ["import", str(model(tmp_path, name)), "--repo", name, "--home", str(home)])
        assert ok.exit_code == 0, ok.output
        time.sleep(0.01)
    pinned = runner.invoke(cli, ["pin", "acme/a", "--home", str(home), "--json"])
    assert pinned.exit_code == 0 and json.loads(pinned.output)["repo_id"] == "acme/a"
    listed = runner.invoke(cli, ["pins", "--home", str(home), "--json"])
    assert [p["repo_id"] for p in json.loads(listed.output)] == ["acme/a"]

    shrunk = runner.invoke(cli, ["gc", "--max-size", "1.5 potatoes", "--home", str(home), "--json"])
    assert shrunk.exit_code == 2 and "disk budget" in shrunk.output
    shrunk = runner.invoke(cli, ["gc", "--max-size", "1.5MiB", "--home", str(home), "--json"])
    assert shrunk.exit_code == 0, shrunk.output
    evicted = [e["repo_id"] for e in json.loads(shrunk.output)["evicted"]]
    assert evicted == ["acme/b", "acme/c"], "the oldest first; the pinned one stays"
    assert json.loads(shrunk.output)["over_max_size_bytes"] == 0
    # Below what the pin keeps: no writer's refusal ("0 B more does not fit ... nothing was removed") before
    # it does what it can, but the size it could not reach, said after.
    kept = runner.invoke(cli, ["gc", "--max-size", "10KiB", "--home", str(home)])
    # (exit 1: the size asked for was not reached, for a script's `|| alert`)
    assert kept.exit_code == 1 and "nothing was removed" not in kept.output, kept.output
    assert "over the size asked for" in kept.output and "pinned or in use" in kept.output, kept.output

    usage = runner.invoke(cli, ["du", "--home", str(home), "--json"], env={"MODELDEPOT_MAX_SIZE": "2MiB"})
    budget = json.loads(usage.output)["budget"]
    assert budget["max_bytes"] == 2 * MB and budget["evictions"] == 2 and budget["pinned_bytes"] >= MB
    text = runner.invoke(cli, ["du", "--home", str(home)], env={"MODELDEPOT_MAX_SIZE": "2MiB"})
    assert "budget" in text.output and "so far, in 2 evictions" in text.output, text.output
    assert "kept from eviction (pinned or in use), of which" in text.output, "in use includes the pinned"
    assert "MODELDEPOT_MAX_SIZE, this command's alone" in text.output
    assert (
        "budget      none"
        in runner.invoke(cli, ["du", "--home", str(home)], env={"MODELDEPOT_MAX_SIZE": ""}).output
    )

    unpinned = runner.invoke(cli, ["unpin", "acme/a", "--home", str(home)])
    assert unpinned.exit_code == 0 and "unpinned" in unpinned.output
    again = runner.invoke(cli, ["unpin", "acme/a", "--home", str(home)])
    assert again.exit_code == 1 and "was not pinned" in again.output and "its pins" not in again.output
    unknown = runner.invoke(cli, ["unpin", "acme/nope", "--home", str(home)])  # (it said "was not pinned")
    assert unknown.exit_code == 1 and "is not in the store" in unknown.output, unknown.output
    # A pin of another revision (or variant): `unpin REPO` said "was not pinned" as `pins` listed it (trial)
    with Depot(home) as depot:
        commit = depot.resolve("acme/a")
    assert runner.invoke(cli, ["pin", "acme/a", "-r", commit, "--home", str(home)]).exit_code == 0
    other = runner.invoke(cli, ["unpin", "acme/a", "--home", str(home)])
    assert other.exit_code == 1 and f"its pins: `modeldepot unpin acme/a -r {commit}`" in other.output, (
        other.output
    )
    bad = runner.invoke(cli, ["du", "--home", str(home)], env={"MODELDEPOT_MAX_SIZE": "lots"})
    assert bad.exit_code == 2 and "disk budget" in bad.output
    bad = runner.invoke(cli, ["serve", "--max-size", "200%", "--home", str(home)])
    assert bad.exit_code == 2 and "200%" in bad.output


def test_a_node_reports_its_budget_in_its_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    with budgeted(tmp_path / "served", "10MiB", monkeypatch) as depot:
        depot.import_dir(model(tmp_path, "acme/a"), "acme/a")
        node = LiveNode(depot, token="secret")
        try:
            request = urllib.request.Request(f"{node.url}/api/depot/v1/stats",
                                             headers={"Authorization": "Bearer secret"})  # fmt: skip
            with urllib.request.urlopen(request) as answer:
                budget = json.loads(answer.read())["budget"]
            assert budget["max_bytes"] == 10 * MB and budget["used_bytes"] >= MB and budget["evictions"] == 0
        finally:
            node.stop()


def test_an_old_revision_no_ref_names_goes_before_a_repo_used_since(store: Depot, tmp_path: Path) -> None:
    store.import_dir(model(tmp_path, "acme/a", seed=1), "acme/a")  # a@v1
    old = store.resolve("acme/a")
    time.sleep(0.01)
    store.import_dir(model(tmp_path, "acme/b"), "acme/b")
    time.sleep(0.01)
    store.import_dir(model(tmp_path, "acme/a", seed=2), "acme/a")  # main moves to a@v2: v1 has no ref now
    store.get_file("acme/a", "config.json")  # a is used daily; b was used before, once
    evicted = store.store.budget.shrink(int(2.5 * MB))
    assert [(e.repo_id, e.commit_id) for e in evicted] == [("acme/a", old)]
    assert repos(store) == {"acme/a", "acme/b"}


def test_a_repo_pulled_by_commit_id_counts_its_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo pulled by commit id (a pinned deployment's, a mirror's clients asking by commit) has no ref: its
    reads counted for nothing, and the budget evicted it, read three times, before a repo never read (a
    trial). Its reads count now; among its revisions, the oldest still goes first."""
    with hub_node(tmp_path, monkeypatch) as hub:
        hub.import_dir(model(tmp_path, "up/hot"), "up/hot")
        with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
            commit = hub.resolve("up/hot")
            local.pull("up/hot", revision=commit)
            assert local.store.index.read("SELECT 1 FROM refs WHERE repo_id = 'up/hot'") == []
            time.sleep(0.01)
            local.import_dir(model(tmp_path, "acme/never-read"), "acme/never-read")
            time.sleep(0.01)
            for _ in range(3):
                local.get_file("up/hot", "config.json", revision=commit)
            local.store.access.flush()
            assert [e.repo_id for e in local.plan_shrink(int(1.5 * MB))] == ["acme/never-read"]


def test_a_branch_pin_keeps_no_commit_the_branch_never_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit pulled in part by its id (an experiment), then main pulled a quant at a later commit, then main
    pinned: the pin kept the experiment, which main never named, for as long as main lacked its quant (a
    review). What a whole-model pin keeps besides its branch's commit is a commit held whole."""
    with hub_node(tmp_path, monkeypatch) as hub:
        hub.import_dir(quants(tmp_path, "up/q"), "up/q")
        first = hub.resolve("up/q")
        update = quants(tmp_path, "up/q")
        (update / "model-Q4_K_M.gguf").write_bytes(np.random.default_rng(9).bytes(MB))
        hub.import_dir(update, "up/q")
        with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
            local.pull("up/q", "Q8_0", revision=first)  # (by commit id, one quant: no ref)
            time.sleep(0.01)
            local.pull("up/q", "Q4_K_M")  # main: the newer commit, one quant
            local.pin("up/q")
            assert ("up/q", first) in {(e.repo_id, e.commit_id) for e in local.plan_shrink(1)}


@pytest.mark.parametrize("pinned", [None, "Q8_0"])
def test_a_branch_pinned_while_held_in_part_keeps_its_quant_through_an_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pinned: str | None
) -> None:
    """main pulled with one quant and pinned whole, then a quant of the update pulled (main moves): the quant
    main named when pinned stays, though its commit was never held whole (a review). So does a quant pinned
    alone (`pin --quant`), which went at the next write, the pin still listed (an explorer's trial), until the
    update holds it."""
    with hub_node(tmp_path, monkeypatch) as hub:
        hub.import_dir(quants(tmp_path, "up/q"), "up/q")
        with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
            local.pull("up/q", "Q8_0")
            old = local.resolve("up/q")
            local.pin("up/q", pinned)
            update = quants(tmp_path, "up/q")
            (update / "model-Q4_K_M.gguf").write_bytes(np.random.default_rng(9).bytes(MB))
            (update / "model-Q8_0.gguf").write_bytes(np.random.default_rng(10).bytes(MB))
            hub.import_dir(update, "up/q")
            time.sleep(0.01)
            local.pull("up/q", "Q4_K_M")
            assert local.resolve("up/q") != old
            assert ("up/q", old) not in {(e.repo_id, e.commit_id) for e in local.plan_shrink(1)}
            local.store.budget.shrink(1)
            assert local.file_path("up/q", "model-Q8_0.gguf", revision=old).exists()
            local.pull("up/q", "Q8_0")  # the update is whole now: the pin follows it alone
            assert ("up/q", old) in {(e.repo_id, e.commit_id) for e in local.plan_shrink(1)}


def test_in_a_repo_no_ref_names_its_reads_keep_its_newest_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo pulled by commit id twice: its reads counted for every revision, and the old commit never read
    since outlived a repo read after it (a review). They count for its newest; the old goes first."""
    with hub_node(tmp_path, monkeypatch) as hub:
        hub.import_dir(model(tmp_path, "up/hot", seed=1), "up/hot")
        old = hub.resolve("up/hot")
        hub.import_dir(model(tmp_path, "up/hot", seed=2), "up/hot")
        new = hub.resolve("up/hot")
        with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
            local.pull("up/hot", revision=old)
            time.sleep(0.01)
            local.import_dir(model(tmp_path, "acme/warm"), "acme/warm")
            time.sleep(0.01)
            local.pull("up/hot", revision=new)
            time.sleep(0.01)
            local.get_file("acme/warm", "config.json")
            time.sleep(0.01)
            local.get_file("up/hot", "config.json", revision=new)
            local.store.access.flush()
            order = [(e.repo_id, e.commit_id) for e in local.plan_shrink(1)]
            assert order == [("up/hot", old), ("acme/warm", order[1][1]), ("up/hot", new)], order


def test_an_old_commit_read_by_its_id_outlives_the_one_its_branch_moved_to_and_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment pinned to a commit reads it by its id every day; main moved to a newer commit, pulled once
    and never read. The repo's reads kept main's commit alive and the pinned one went first (a review): each
    revision counts its own reads now."""
    with hub_node(tmp_path, monkeypatch) as hub:
        hub.import_dir(model(tmp_path, "up/hot", seed=1), "up/hot")
        deployed = hub.resolve("up/hot")
        hub.import_dir(model(tmp_path, "up/hot", seed=2), "up/hot")
        with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
            local.pull("up/hot", revision=deployed)
            local.pull("up/hot")  # main: the newer commit
            newer = local.resolve("up/hot")
            time.sleep(0.01)
            local.import_dir(model(tmp_path, "acme/warm"), "acme/warm")
            time.sleep(0.01)
            with local.open_file("up/hot", "model.safetensors", revision=deployed) as stream:
                stream.read(16)
            local.store.access.flush()
            order = [(e.repo_id, e.commit_id) for e in local.plan_shrink(1)]
            assert order[:2] == [("up/hot", newer), ("acme/warm", order[1][1])], order
            assert order[2] == ("up/hot", deployed), order


def test_the_uses_of_a_store_before_revisions_counted_their_own_count_for_its_refs(tmp_path: Path) -> None:
    """A store whose uses were counted per repo (schema 10): they count, as they did, for the revisions the
    repo's refs name, and for none of its others."""
    import sqlite3

    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(model(tmp_path, "acme/a", seed=1), "acme/a")
        old = depot.resolve("acme/a")
        depot.import_dir(model(tmp_path, "acme/a", seed=2), "acme/a")
        new = depot.resolve("acme/a")
    with contextlib.closing(sqlite3.connect(tmp_path / "store" / "index.db")) as con:
        con.execute("DROP TABLE revision_access")
        con.execute("DROP INDEX blobs_by_size")
        con.execute("DROP TABLE evictions")
        con.execute("DROP INDEX blobs_not_ok")
        con.execute("ALTER TABLE repos DROP COLUMN hidden_at")
        con.execute("ALTER TABLE refs DROP COLUMN tag")
        con.execute("ALTER TABLE repos DROP COLUMN gated_only")
        con.execute("DROP TABLE ref_history")
        con.execute("INSERT OR REPLACE INTO access VALUES ('acme/a', '', 5, 4e9)")  # (a use in 2096)
        con.execute("PRAGMA user_version = 10")
        con.commit()
    with Depot(tmp_path / "store") as depot:
        assert depot.store.access.revision_uses() == {("acme/a", new): 4e9}
        assert [(e.repo_id, e.commit_id) for e in depot.plan_shrink(1)] == [("acme/a", old), ("acme/a", new)]


def test_a_model_read_during_a_write_keeps_its_blobs_and_the_least_recently_used_goes(tmp_path: Path) -> None:
    """A model read after a write began is not evicted for it, and its blobs stay: counted as neither staying
    nor in use, they made a plan evict a repo for 0 B and one used more recently than the least (a review). And
    the preview, with a pull writing a quant, says what the shrink then removes (a review)."""
    rng = np.random.default_rng(1)
    shared, extra, other = rng.bytes(MB), rng.bytes(MB), rng.bytes(MB)
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        for name, files in (("acme/one", {"model.safetensors": shared}),
                            ("acme/two", {"model.safetensors": shared, "extra.bin": extra}),
                            ("acme/c", {"model.safetensors": other}),
                            ("acme/three", {"extra.bin": extra, "config.json": b"{}"})):  # fmt: skip
            depot.import_dir(write_model_dir(tmp_path / name, files), name)
            time.sleep(0.02)
        depot.set_max_size(depot.du().blob_bytes + MB // 2)  # (a 1 MiB write needs 0.5 MiB freed)
        with depot.store.budget.writing("acme/new") as writer:
            time.sleep(0.02)
            depot.get_file("acme/three", "extra.bin").release()  # (a client reads acme/three meanwhile)
            depot.store.access.flush()
            evicted = writer.make_room(MB, "importing acme/new")
        assert [(e.repo_id, e.bytes_freed) for e in evicted] == [("acme/one", 0), ("acme/two", MB)]
        assert repos(depot) == {"acme/c", "acme/three"}
    with Depot(tmp_path / "preview", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "q", {"config.json": b"{}", "model-Q4_K_M.gguf": rng.bytes(MB)}),
                         "acme/q")  # fmt: skip
        commit = depot.resolve("acme/q")
        time.sleep(0.02)
        depot.import_dir(write_model_dir(tmp_path / "b", {"model.safetensors": rng.bytes(MB)}), "acme/b")
        with depot.store.budget.writing("acme/q", commit, paths=["model-Q8_0.gguf"]):
            planned = [(e.repo_id, e.variant, e.bytes_freed) for e in depot.plan_shrink(MB + MB // 2)]
            shrunk = [(e.repo_id, e.variant, e.bytes_freed) for e in depot.shrink(MB + MB // 2)]
        assert planned == shrunk


def test_writers_in_one_process_reserve_the_room_they_made(store: Depot, tmp_path: Path) -> None:
    store.import_dir(model(tmp_path, "acme/a"), "acme/a")
    time.sleep(0.01)
    store.import_dir(model(tmp_path, "acme/b"), "acme/b")
    budget = store.store.budget
    with budget.writing("acme/x") as first:
        assert [e.repo_id for e in first.make_room(2 * MB, "first")] == ["acme/a"]  # 1 + 2 <= 3.5
        with budget.writing("acme/y") as second:  # 1 MiB stored + 2 MiB reserved: b must go too
            assert [e.repo_id for e in second.make_room(MB, "second")] == ["acme/b"]
            with budget.writing("acme/z") as third, pytest.raises(BudgetExceededError):
                third.make_room(MB, "third")  # 3 MiB reserved by the others: 1 more does not fit
    with budget.writing("acme/z") as fourth:
        assert fourth.make_room(MB, "fourth") == []  # the reservations went with their writers


def test_the_budget_says_the_room_writes_under_way_hold(store: Depot, tmp_path: Path) -> None:
    """A pull under way was shown "0% used" and its files "not counted (`gc --partials` frees them)", while
    the budget counted its room (the next import was refused) and gc left it alone (a trial)."""
    store.import_dir(model(tmp_path, "acme/a"), "acme/a")
    with store.store.budget.writing("acme/x") as writer:
        writer.make_room(2 * MB, "a pull")
        assert store.budget_status().reserved_bytes == 2 * MB
        shown = CliRunner().invoke(cli, ["budget", "--home", str(store.home), "--json"])
        assert json.loads(shown.output)["reserved_bytes"] == 2 * MB
        said = " ".join(CliRunner().invoke(cli, ["budget", "--home", str(store.home)]).output.split())
        assert "2.0 MiB more held for writes under way until they publish" in said, said
        # A budget the blobs alone fit, and the room held beside them does not: the eviction counts that
        # room, so the preview says what goes and the budget asks first (it evicted without a word: a trial)
        home = str(store.home)
        shown = " ".join(
            CliRunner().invoke(cli, ["budget", "2MiB", "--dry-run", "--home", home]).output.split()
        )
        assert "would evict acme/a@" in shown and "writes under way hold 2.0 MiB more" in shown, shown
        refused = CliRunner().invoke(cli, ["budget", "2MiB", "--home", home], input="n\n")  # (no terminal)
        assert refused.exit_code == 2 and "pass --yes" in refused.output, refused.output
        assert repos(store) == {"acme/a"} and store.budget_status().store_max_size is None
    assert store.budget_status().reserved_bytes == 0


def test_a_budget_below_a_write_under_way_says_the_store_stays_over(store: Depot, tmp_path: Path) -> None:
    """`budget SIZE --yes` below the room a pull under way holds evicted the other models, as it should (the
    least recently used first), then said the store was within the budget (`over_budget_bytes` 0, no
    warning), while the dry run said it would stay over; the pull landed 75% over it (an explorer's
    trial). It says how far over, and why; so does `gc --max-size`."""
    store.import_dir(model(tmp_path, "acme/a"), "acme/a")
    home = str(store.home)
    with store.store.budget.writing("acme/x") as writer:
        writer.make_room(2 * MB, "a pull")
        shown = CliRunner().invoke(cli, ["budget", "1MiB", "--yes", "--json", "--home", home])
        assert shown.exit_code == 0, shown.output
        body = json.loads(shown.stdout)
        assert [e["repo_id"] for e in body["evicted"]] == ["acme/a"]
        assert body["over_budget_bytes"] == MB, body  # (2 MiB held, 1 MiB the budget)
        said = CliRunner().invoke(cli, ["budget", "--home", home])
        assert "1.0 MiB over its budget" in said.stderr and "writes under way (2.0 MiB)" in said.stderr, (
            said.stderr
        )
        # (the node evicts as it starts too: "the next import or pull" left it out, an explorer's trial)
        assert "next import, pull or node start" in " ".join(said.stderr.split()), said.stderr
        gc = CliRunner().invoke(cli, ["gc", "--max-size", "1MiB", "--json", "--home", home])
        assert json.loads(gc.stdout)["over_max_size_bytes"] == MB, gc.output


def test_a_budget_set_while_a_write_runs_counts_the_room_it_takes(tmp_path: Path) -> None:
    """A pull begun with no budget held no room: a budget set meanwhile, its dry run and the imports beside
    it saw the store within it, and the pull's end left the store at 307% of it (a trial)."""
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot, Depot(depot.home) as beside:
        depot.import_dir(model(tmp_path, "acme/a"), "acme/a")
        with depot.store.budget.writing("acme/big") as writer:
            writer.make_room(3 * MB, "a pull")  # (no budget yet)
            assert [e.repo_id for e in beside.plan_shrink(2 * MB)] == ["acme/a"]
            beside.set_max_size(3 * MB)
            with pytest.raises(StoreFullError):  # 1 + 3 held: 1 more does not fit beside them
                beside.import_dir(model(tmp_path, "acme/b", seed=3), "acme/b")
        assert beside.budget_status().reserved_bytes == 0


def test_a_revision_is_not_published_over_a_shared_blob_removed_meanwhile(
    store: Depot, tmp_path: Path
) -> None:
    from modeldepot.store.publish import RevisionSpec, StagedFile, publish

    store.import_dir(model(tmp_path, "acme/a"), "acme/a")
    entry = store.file_info("acme/a", "model.safetensors")
    digest = store.store.local_digest(sha256=entry.sha256)
    assert digest is not None
    store.remove("acme/a")  # as an eviction in another process would, between a pull's look and its publish
    spec = RevisionSpec("acme/reuser", "1" * 40, "main")
    with pytest.raises(StoreError, match="removed from the store meanwhile"):
        publish(store.store, spec, [StagedFile("model.safetensors", digest, entry.git_oid, True)], {})
    assert "acme/reuser" not in repos(store)
    assert store_files_consistent(store) == []


def test_an_evicted_revision_leaves_the_blobs_a_writer_shares_with_it(store: Depot, tmp_path: Path) -> None:
    shared = os.urandom(MB // 2)
    old = model(tmp_path, "acme/old", size=2 * MB)
    (old / "tokenizer.bin").write_bytes(shared)
    store.import_dir(old, "acme/old")
    new = model(tmp_path, "acme/new", size=2 * MB)
    (new / "tokenizer.bin").write_bytes(shared)  # the same content: found in the store, relied on
    store.import_dir(new, "acme/new")  # 2.5 + 2 > 3.5: old goes, the shared blob stays
    assert repos(store) == {"acme/new"}
    assert bytes(store.get_file("acme/new", "tokenizer.bin")) == shared
    assert store.verify().ok and store_files_consistent(store) == []
    assert store.budget_status().used_bytes <= int(3.5 * MB)


def test_a_pin_keeps_a_commit_whole_and_goes_with_its_repo(tmp_path: Path) -> None:
    """A pin by the start of a commit id was kept as typed; the pins of a removed repo stayed, listed by
    `pins` and applied again, unseen, to a later pull of the repo."""
    with Depot(tmp_path / "s") as depot:
        commit = depot.import_dir(model(tmp_path, "acme/a"), "acme/a").commit_id
        depot.pin("acme/a", revision=commit[:7])
        depot.pin("acme/a")
        assert sorted(p.revision for p in depot.pins()) == sorted([commit, "main"])
        depot.remove("acme/a")
        assert depot.pins() == []


def test_the_pins_of_a_revision_removed_go_with_it(tmp_path: Path) -> None:
    """Removing a repo's last revision by name (`rm REPO --revision main`) took the repo but left its pin,
    which then kept a later, unrelated import of the repo from eviction; a commit pinned and removed
    alone likewise. Pins of what stays stay."""
    with Depot(tmp_path / "s") as depot:
        old = depot.import_dir(model(tmp_path, "acme/a"), "acme/a").commit_id
        depot.pin("acme/a")
        depot.pin("acme/a", revision=old)
        depot.import_dir(model(tmp_path, "acme/a", seed=1), "acme/a", revision="dev")
        depot.pin("acme/a", revision="dev")
        depot.remove("acme/a", revision=old)  # main's commit: main goes with it, dev stays
        assert [p.revision for p in depot.pins()] == ["dev"]
        depot.remove("acme/a", revision="dev")  # the last revision: the repo is gone
        assert depot.pins() == []
        depot.import_dir(model(tmp_path, "acme/a", seed=2), "acme/a")
        assert depot.pins() == []


def test_a_node_says_what_it_evicted_as_it_started(tmp_path: Path) -> None:
    """`serve --max-size` (or a store over its saved budget) evicted models before the node's log was set up:
    the budget's lines were lost, and models went without a word (a trial)."""
    import subprocess
    import sys

    from conftest import free_port, wait_for_port

    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        for name in ("acme/a", "acme/b"):
            depot.import_dir(model(tmp_path, name), name)
            time.sleep(0.01)
    env = {k: v for k, v in os.environ.items() if k not in ("MODELDEPOT_MAX_SIZE", "MODELDEPOT_TOKEN")}
    port, log = free_port(), tmp_path / "serve.log"
    with log.open("wb") as log_file:
        node = subprocess.Popen([sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port",
                                 str(port), "--max-size", "1.5MiB", "--yes", "--scrub-interval", "off"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log_file)  # fmt: skip
    try:
        wait_for_port(port, 60, process=node)
    finally:
        node.terminate()
        node.wait(30)
    said = log.read_text()
    assert "over its disk budget of 1.5 MiB: 1 eviction freed" in said and "evicted acme/a@" in said, said


def test_a_node_asked_for_a_budget_below_the_store_asks_before_it_evicts(tmp_path: Path) -> None:
    """`serve --max-size` below what the store held evicted models at the node's start without a word of
    warning, where `modeldepot budget` asks (a mistyped 10GiB for 100GiB: a trial). Without a terminal the
    node now refuses to start, nothing evicted and the budget unchanged, unless --yes."""
    from click.testing import CliRunner

    from modeldepot.cli import cli

    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        for name in ("acme/a", "acme/b"):
            depot.import_dir(model(tmp_path, name), name)
    refused = CliRunner().invoke(cli, ["serve", "--home", str(home), "--port", "0", "--max-size", "1.5MiB"])
    assert refused.exit_code == 2, refused.output
    assert "setting this budget removes the least recently used models" in refused.output, refused.output
    assert "pass --yes" in refused.output, refused.output
    # (serve has no --dry-run: "--dry-run shows what would go" sent the user to "No such option")
    assert f"`modeldepot budget 1.5MiB --dry-run --home {home}` shows" in " ".join(refused.output.split()), (
        refused.output
    )
    with Depot(home) as depot:
        assert {r.repo_id for r in depot.list_repos()} == {"acme/a", "acme/b"}
        assert depot.store.budget.max_bytes is None
    # The same cap given as MODELDEPOT_MAX_SIZE (a unit file's, a manifest's) evicted at start without asking,
    # and `budget` then said "none" (an explorer's trial): asked the same way
    env_capped = CliRunner().invoke(cli, ["serve", "--home", str(home), "--port", "0"],
                                    env={"MODELDEPOT_MAX_SIZE": "1.5MiB"})  # fmt: skip
    assert env_capped.exit_code == 2, env_capped.output
    assert "pass --yes" in env_capped.output and "the size MODELDEPOT_MAX_SIZE gives" in env_capped.output, (
        env_capped.output
    )
    with Depot(home) as depot:
        assert {r.repo_id for r in depot.list_repos()} == {"acme/a", "acme/b"}
        # Over it by what is pinned alone, nothing would go: no question (a node under systemd did not start
        # after a restart, a review's trial)
        from modeldepot.cli.space import confirm_evictions

        for name in ("acme/a", "acme/b"):
            depot.pin(name)
        assert depot.plan_shrink("1.5MiB") == []
        confirm_evictions(depot, "1.5MiB")  # (no SystemExit)


def test_a_budget_the_evictions_cannot_reach_is_said_before_it_is_asked(tmp_path: Path) -> None:
    """Q8_0 loaded by a process, Q4_K_M not: `budget 50MiB --yes` evicted Q4_K_M, the store still over it, and
    the loaded one alone, let go of later, would have been enough (an explorer's trial). The question (and
    the refusal without a terminal) says that even the evictions leave the store over the budget."""
    from click.testing import CliRunner

    from modeldepot.cli import cli

    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        for name in ("acme/a", "acme/b"):
            depot.import_dir(model(tmp_path, name), name)
        depot.pin("acme/a")  # (kept, as one in use is)
        plan = depot.plan_shrink("64KiB")
        assert [e.repo_id for e in plan] == ["acme/b"]
    refused = CliRunner().invoke(cli, ["budget", "64KiB", "--home", str(home)])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "but even then it takes" in said and "pinned or in use" in said, said
    reachable = CliRunner().invoke(cli, ["budget", "1.5MiB", "--home", str(home)])
    assert "even then" not in reachable.output, reachable.output


def test_the_budget_is_the_stores_and_every_process_on_it_keeps_to_it(tmp_path: Path) -> None:
    """`serve --max-size` held in the node alone: a `modeldepot import` or `pull` beside it, not given the same
    MODELDEPOT_MAX_SIZE, filled the disk past it. The budget is now saved with the store (`serve --max-size`,
    `modeldepot budget`), and a change reaches a running node at once."""
    import subprocess
    import sys
    import urllib.request

    from conftest import free_port, wait_for_port

    home = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k not in ("MODELDEPOT_MAX_SIZE", "MODELDEPOT_TOKEN")}
    env["MODELDEPOT_CHUNK_SIZE"] = str(SMALL_CHUNK)

    def cli_process(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modeldepot", *args, "--home", str(home)],
                              env={**env, **extra}, capture_output=True, text=True, timeout=90)  # fmt: skip

    for name in ("acme/a", "acme/b"):
        assert cli_process("import", str(model(tmp_path, name)), "--repo", name).returncode == 0
        time.sleep(0.01)
    port = free_port()
    node = subprocess.Popen([sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(port),
                             "--max-size", "2.5MiB", "--scrub-interval", "off"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(port, 60, process=node)

        def node_budget() -> dict[str, object]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/depot/v1/stats", timeout=10) as answer:
                budget: dict[str, object] = json.loads(answer.read())["budget"]
                return budget

        assert node_budget()["max_bytes"] == int(2.5 * MB)
        beside = cli_process("import", str(model(tmp_path, "acme/c")), "--repo", "acme/c")  # no budget given
        assert beside.returncode == 0, beside.stderr
        with Depot(home, create=False) as depot:
            assert repos(depot) == {"acme/b", "acme/c"}, (
                "the import beside the node kept to the node's budget"
            )
            assert depot.budget_status().used_bytes <= int(2.5 * MB)
        # A process's own MODELDEPOT_MAX_SIZE may cap it further, never raise the store's.
        shown = cli_process("budget", "--json", MODELDEPOT_MAX_SIZE="1TiB")
        assert json.loads(shown.stdout)["max_bytes"] == int(2.5 * MB), shown.stdout
        assert json.loads(shown.stdout)["store_max_size"] == "2.5MiB"
        # Set from the CLI while the node runs: the node's next look has it, and the store is brought within.
        refused = cli_process("budget", "1.5MiB")  # below what the store holds: removes models, so asks
        assert refused.returncode == 2 and "pass --yes" in refused.stderr, refused.stderr
        assert node_budget()["max_bytes"] == int(2.5 * MB), "nothing changed"
        lowered = cli_process("budget", "1.5MiB", "--yes")
        assert lowered.returncode == 0 and "evicted acme/b@" in lowered.stdout, (
            lowered.stdout + lowered.stderr
        )
        assert "the store's 1.5MiB" in lowered.stdout
        assert node_budget()["max_bytes"] == int(1.5 * MB)
        assert cli_process("budget", "none").returncode == 0 and node_budget()["max_bytes"] is None
        assert cli_process("import", str(model(tmp_path, "acme/d")), "--repo", "acme/d").returncode == 0
        with Depot(home, create=False) as depot:
            assert repos(depot) == {"acme/c", "acme/d"}, "no budget: nothing evicted"
        bad = cli_process("budget", "lots")
        assert bad.returncode == 2 and "write it like 200GiB or 80%" in bad.stderr, bad.stderr
        # A budget is set before anything is imported (the first step on a new machine); a bad size says so,
        # not "no store".
        fresh = tmp_path / "fresh"
        bad = subprocess.run([sys.executable, "-m", "modeldepot", "budget", "lots", "--home", str(fresh)], env=env,
                             capture_output=True, text=True, timeout=90)  # fmt: skip
        assert bad.returncode == 2 and "write it like 200GiB" in bad.stderr and not fresh.exists(), bad.stderr
        done = subprocess.run([sys.executable, "-m", "modeldepot", "budget", "10GiB", "--home", str(fresh)], env=env,
                              capture_output=True, text=True, timeout=90)  # fmt: skip
        assert done.returncode == 0, done.stderr
        with Depot(fresh, create=False) as depot:
            assert depot.budget_status().max_bytes == 10 << 30
    finally:
        node.terminate()
        node.wait(30)


def test_a_mirror_says_its_disk_budget_is_what_refuses_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A mirror whose budget could not take a file answered 507 "the node's disk is full": the client, and
    whoever ran the node, looked for a full disk. A HEAD (huggingface_hub's, before its GET) is answered from
    the upstream's metadata, starting nothing: huggingface_hub took its 507 for a network error ("check your
    connection", an explorer's trial), where the GET's it shows with its reason."""
    import gc
    import urllib.error
    import urllib.request

    from conftest import serving_repo

    files = {"model.safetensors": np.random.default_rng(4).bytes(3 * MB)}
    with (
        serving_repo(tmp_path, files, "acme/big", chunk_size=SMALL_CHUNK) as upstream,
        budgeted_mirror(tmp_path, upstream.url, "1MiB", monkeypatch) as (_, mirror),
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{mirror.url}/acme/big/resolve/main/model.safetensors").close()
        said = refused.value.read().decode()
        assert refused.value.code == 507 and "disk budget" in said and "disk is full" not in said, said
        assert "modeldepot budget" in said and "3.0 MiB more does not fit" in said, said
        import requests  # (urllib follows the HEAD's redirect to its commit with a GET)

        headed = requests.head(f"{mirror.url}/acme/big/resolve/main/model.safetensors", allow_redirects=True,
                               timeout=30)  # fmt: skip
        assert headed.status_code == 200 and int(headed.headers["Content-Length"]) == 3 * MB
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        with pytest.raises(HfHubHTTPError, match="disk budget"):
            hf_hub_download(
                "acme/big", "model.safetensors", endpoint=mirror.url, cache_dir=tmp_path / "client"
            )
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_a_mirrors_head_says_what_its_get_would_for_a_second_file_of_a_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the revision's first file held, the GET of a second that cannot fit is refused (the first file
    counted as room, it was taken): 507."""
    import urllib.error
    import urllib.request

    from conftest import serving_repo

    rng = np.random.default_rng(5)
    files = {"a.safetensors": rng.bytes(2 * MB), "b.safetensors": rng.bytes(2 * MB)}
    with (
        serving_repo(tmp_path, files, "acme/two", chunk_size=SMALL_CHUNK) as upstream,
        budgeted_mirror(tmp_path, upstream.url, "3MiB", monkeypatch) as (_, mirror),
    ):
        base = f"{mirror.url}/acme/two/resolve/main"
        with urllib.request.urlopen(f"{base}/a.safetensors") as first:
            assert first.read() == files["a.safetensors"]
        codes = []
        import requests  # (urllib follows the HEAD's redirect to its commit with a GET)

        assert requests.head(f"{base}/b.safetensors", allow_redirects=True, timeout=30).status_code == 200
        for method in ("GET",):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(f"{base}/b.safetensors", method=method)).close()
            codes.append(refused.value.code)
            refused.value.close()  # (its connection)
        assert codes == [507]  # (and the HEAD, from the upstream's metadata: what the GET then refuses)


def refused_while_publishing(
    monkeypatch: pytest.MonkeyPatch, other: Depot, tmp_path: Path
) -> list[StoreFullError]:
    """Make the next publish of the store first try to import a 2 MiB acme/y through ``other`` (another Depot
    on the store, as another process would be, or the same one), which must be refused: the refusal is in
    the list returned once that publish has run."""
    from modeldepot.store import importer

    publishing = importer.publish
    refused: list[StoreFullError] = []

    def publish_after_the_other_tried(*args: object, **kwargs: object) -> object:
        if not refused:
            with pytest.raises(StoreFullError) as caught:
                other.import_dir(model(tmp_path, "acme/y", size=2 * MB), "acme/y")
            refused.append(caught.value)
        return publishing(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(importer, "publish", publish_after_the_other_tried)
    return refused


def test_a_write_in_another_process_counts_the_room_a_write_under_way_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each process counted the room its own writers made: two that made room before either published both
    found it free (three pulls at once went to 137% of the budget while they downloaded, and the first to
    finish was evicted by another at once: a trial). The room a write under way holds is seen by every
    process on the store: the second write, from another Depot on the store (as another process would be),
    made while the first is under way, is refused before it writes, naming what holds the room."""

    monkeypatch.delenv("MODELDEPOT_MAX_SIZE", raising=False)
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as first, Depot(home, chunk_size=SMALL_CHUNK) as second:
        first.set_max_size("3.5MiB")
        first.import_dir(model(tmp_path, "acme/old"), "acme/old")  # 1 MiB, the least recently used
        refused = refused_while_publishing(monkeypatch, second, tmp_path)
        first.import_dir(model(tmp_path, "acme/x", size=2 * MB), "acme/x")
        assert "held by writes under way (acme/x 2.0 MiB by process" in str(refused[0])
        assert repos(first) == {"acme/old", "acme/x"}, "y was never written"
        assert first.budget_status().used_bytes <= int(3.5 * MB)
        assert not list((home / "locks" / "reservations").iterdir()), "the room went with its writer"
        assert first.verify().ok and store_files_consistent(first) == []


def test_a_refusal_names_the_room_another_write_of_this_process_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node runs every pull in its own process: a pull refused for the room another one held was told that
    room was "pinned, in use (loaded by this process)", with nothing pinned or loaded (an explorer's trial).
    It names the write under way."""

    monkeypatch.delenv("MODELDEPOT_MAX_SIZE", raising=False)
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.set_max_size("3.5MiB")
        refused = refused_while_publishing(monkeypatch, depot, tmp_path)
        depot.import_dir(model(tmp_path, "acme/x", size=2 * MB), "acme/x")
        assert "held by writes under way (acme/x 2.0 MiB in this process)" in str(refused[0]), refused[0]
        assert repos(depot) == {"acme/x"}


def test_a_write_does_not_evict_what_was_published_or_used_since_it_began(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that ends above the budget evicts the least recently used: never what another process
    published (or anyone used) while it wrote. The model a concurrent pull had just said it pulled went at
    once (a trial). Here a process without the budget (MODELDEPOT_MAX_SIZE caps one process) publishes
    between the first's room and its publish: the first evicts the old model, keeps the new one, and says
    that the store is above its budget."""
    from modeldepot.store import importer

    home = tmp_path / "store"
    with budgeted(home, "3.5MiB", monkeypatch) as first:
        monkeypatch.delenv("MODELDEPOT_MAX_SIZE")
        with Depot(home, chunk_size=SMALL_CHUNK) as second:
            first.import_dir(model(tmp_path, "acme/old"), "acme/old")  # 1 MiB, the least recently used
            time.sleep(0.01)
            publishing = importer.publish
            raced: list[str] = []

            def publish_after_the_other(*args: object, **kwargs: object) -> object:
                if not raced:
                    raced.append("y")
                    second.import_dir(model(tmp_path, "acme/y", size=2 * MB), "acme/y")
                return publishing(*args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(importer, "publish", publish_after_the_other)
            first.import_dir(model(tmp_path, "acme/x", size=2 * MB), "acme/x")
            assert raced == ["y"]
            assert repos(first) == {"acme/x", "acme/y"}, "what was published meanwhile stays"
            assert first.verify().ok and store_files_consistent(first) == []


HOLDER = """
import sys, time
from pathlib import Path
from modeldepot.store.reservations import Reservations
held = Reservations(Path(sys.argv[1])).hold("acme/elsewhere", int(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def test_the_room_a_killed_process_held_is_free_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reservation is a file its process holds locked: while it lives, other processes count its room;
    killed (SIGKILL: nothing of it runs), the kernel lets go of its lock, and the room is free again."""
    import subprocess
    import sys

    with budgeted(tmp_path / "store", "3.5MiB", monkeypatch) as depot:
        depot.import_dir(model(tmp_path, "acme/old"), "acme/old")
        directory = depot.store.budget.reservations.directory
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), str(3 * MB)],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            with pytest.raises(StoreFullError, match=f"acme/elsewhere 3.0 MiB by process {holder.pid}"):
                depot.import_dir(model(tmp_path, "acme/x", size=MB), "acme/x")
        finally:
            holder.kill()
            holder.wait()
            assert holder.stdout is not None
            holder.stdout.close()
        depot.import_dir(model(tmp_path, "acme/x", size=MB), "acme/x")
        assert repos(depot) == {"acme/old", "acme/x"}
        assert not list(directory.iterdir()), "the dead process's reservation was removed"


def test_unpin_takes_what_pin_took(tmp_path: Path) -> None:
    """A pin of "q4_k_m" was kept as typed and one of a commit's start as the whole id: `unpin` of the
    variant's own spelling, or of the same start, said it was not pinned, and the pin stayed."""
    files = {"m-Q4_K_M.gguf": os.urandom(1000), "m-Q8_0.gguf": os.urandom(1000)}
    with Depot(tmp_path / "s") as depot:
        commit = depot.import_dir(write_model_dir(tmp_path / "g", files), "acme/m-GGUF").commit_id
        assert depot.pin("acme/m-GGUF", "q4_k_m").quant == "Q4_K_M", "kept under the variant's own name"
        assert depot.unpin("acme/m-GGUF", "Q4_K_M") and depot.pins() == []
        depot.pin("acme/m-GGUF", "Q8_0", commit[:8])
        assert depot.unpin("acme/m-GGUF", "q8_0", commit[:8]) and depot.pins() == []
        assert not depot.unpin("acme/m-GGUF", "Q8_0")


def quants(tmp_path: Path, name: str, size: int = MB) -> Path:
    """A GGUF repo's folder: two quants of ``size`` random bytes each and a small config."""
    rng = np.random.default_rng(abs(hash(name)) % (1 << 32))
    return write_model_dir(tmp_path / "src" / name, {
        "config.json": json.dumps({"name": name}).encode(),
        "model-Q4_K_M.gguf": rng.bytes(size),
        "model-Q8_0.gguf": rng.bytes(size),
    })  # fmt: skip


def test_a_big_unit_that_has_to_go_makes_the_small_ones_before_it_needless(tmp_path: Path) -> None:
    """An explorer's trial: a GGUF repo's Q4_K_M, Q8_0 and F16, used in that order, and a budget below what
    the three take: Q4_K_M went, then Q8_0, then F16 (which did not fit with them anyway), and the budget left
    the store empty. F16 alone was enough: it alone goes now, the preview said so, and the eviction names it."""
    rng = np.random.default_rng(7)
    folder = write_model_dir(tmp_path / "src" / "gguf", {
        "config.json": b"{}", "m-Q4_K_M.gguf": rng.bytes(MB), "m-Q8_0.gguf": rng.bytes(3 * MB // 2),
        "m-F16.gguf": rng.bytes(3 * MB),
    })  # fmt: skip
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/gguf")
        for path in ("m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-F16.gguf"):
            time.sleep(0.01)
            depot.get_file("acme/gguf", path)
        depot.store.access.flush()
        planned = depot.plan_shrink(3 * MB)
        assert [e.variant for e in planned] == ["F16"]
        evicted = depot.shrink(3 * MB)
        assert [(e.variant, e.bytes_freed) for e in evicted] == [("F16", 3 * MB)]
        assert held_paths(depot, "acme/gguf") == {"config.json", "m-Q4_K_M.gguf", "m-Q8_0.gguf"}


def test_a_pin_recorded_under_a_variants_former_name_still_keeps_it(tmp_path: Path) -> None:
    """A review: 0.2 names a split model's quant by its folder (``Q8_0/model-00001-of-00002.gguf`` was the
    variant ``model``); a pin recorded under the former name named no variant then, and the pinned quants
    could go. A pin under a name no variant has keeps those it named in 0.1; a pin of a name a variant has is
    that variant's alone (a second review: a pin of Q4_0 kept its ARM repack Q4_0_4_4 too, and the budget
    evicted another quant in its place)."""
    rng = np.random.default_rng(3)
    folder = write_model_dir(tmp_path / "src" / "split", {
        "config.json": b"{}",
        **{f"{q}/model-0000{i}-of-00002.gguf": rng.bytes(MB // 2) for q in ("Q4_K_M", "Q8_0") for i in (1, 2)},
        "L-Q4_0.gguf": rng.bytes(MB), "L-Q4_0_4_4.gguf": rng.bytes(MB), "L-Q6_K.gguf": rng.bytes(MB),
    })  # fmt: skip
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/split")
        assert {v.name for v in depot.scan_repo("acme/split").variants} == {
            "Q4_K_M", "Q8_0", "Q4_0", "Q4_0_4_4", "Q6_K"}  # fmt: skip
        for name in ("model", "Q4_0"):  # (as 0.1 recorded them: the store's own pin, unchecked)
            depot.store.budget.pins.pin("acme/split", name)
        evicted = depot.shrink(int(3.5 * MB))
        assert sorted(e.variant or "" for e in evicted) == ["Q4_0_4_4", "Q6_K"]
        assert held_paths(depot, "acme/split") == {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                                   if p.is_file() and p.name not in ("L-Q6_K.gguf", "L-Q4_0_4_4.gguf")}  # fmt: skip


def test_an_evicted_variant_is_the_one_of_its_name_not_one_it_was_an_alias_of(tmp_path: Path) -> None:
    """A second review: a root ``model.gguf`` (the variant ``model``) beside ``Q4_K_M/model.gguf``, whose 0.1 name
    was ``model`` too: evicting ``model`` removed Q4_K_M's file, and the most recently used quant went next."""
    rng = np.random.default_rng(5)
    order = ["model.gguf", "Q4_K_M/model.gguf", "Q8_0/model.gguf"]  # least recently used first
    folder = write_model_dir(tmp_path / "src" / "m", {path: rng.bytes(MB) for path in order})
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/m")
        for path in order:
            time.sleep(0.01)
            depot.get_file("acme/m", path)
        depot.store.access.flush()
        assert [(e.variant, e.bytes_freed) for e in depot.shrink(MB)] == [("model", MB), ("Q4_K_M", MB)]
        assert held_paths(depot, "acme/m") == {"Q8_0/model.gguf"}


def held_paths(depot: Depot, repo_id: str) -> set[str]:
    return {f.path for f in depot.list_files(repo_id)}


@pytest.mark.parametrize("how", ["preview", "gc --max-size", "a write"])
def test_no_unit_goes_that_the_bytes_freed_do_not_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Two repos of the same files (a copy under another name): the least recently used went whole for 0 B, then
    one quant of the other freed the bytes needed, with the first one's copy of that quant (an explorer's trial:
    a repo lost for nothing). Only the two copies of that quant go now."""
    with budgeted(tmp_path / "store", "1GiB", monkeypatch) as store:
        folder = quants(tmp_path, "acme/one")
        store.import_dir(folder, "acme/one")
        time.sleep(0.01)
        store.import_dir(folder, "acme/two")
        time.sleep(0.01)
        store.get_file("acme/two", "model-Q4_K_M.gguf").release()  # (Q8_0 is the least used quant of both)
        store.store.access.flush()
        limit = store.du().blob_bytes - MB // 2
        if how == "preview":
            evicted = store.plan_shrink(limit)
        elif how == "gc --max-size":
            evicted = store.store.budget.shrink(limit)
        else:
            store.set_max_size(limit + MB // 2)
            with store.store.budget.writing("acme/new") as writer:
                evicted = writer.make_room(MB // 2, "importing acme/new")
        assert [(e.repo_id, e.variant, e.bytes_freed) for e in evicted] == [
            ("acme/one", "Q8_0", 0), ("acme/two", "Q8_0", MB)]  # fmt: skip
        if how != "preview":
            for repo in ("acme/one", "acme/two"):
                assert held_paths(store, repo) == {"config.json", "model-Q4_K_M.gguf"}, repo
        assert store_files_consistent(store) == []


def test_a_quant_read_lately_stays_and_the_one_never_read_goes_alone(store: Depot, tmp_path: Path) -> None:
    """The budget evicts a revision's variants apart: the quant read every day keeps its place, the one
    pulled once and never read goes, and the repo's other files and other repos stay. (By revision, the
    repo's reads kept both quants, and a repo used since went instead.)"""
    store.import_dir(quants(tmp_path, "acme/q"), "acme/q")
    time.sleep(0.01)
    store.import_dir(model(tmp_path, "acme/b"), "acme/b")
    time.sleep(0.01)
    store.get_file("acme/q", "model-Q4_K_M.gguf")  # Q4 is used now; Q8 was last used at its import
    store.get_file("acme/q", "config.json")  # (read with every load: it keeps no quant alive)
    store.store.access.flush()
    gc = CliRunner().invoke(cli, ["gc", "--max-size", "2.3MiB", "--home", str(store.home)])
    assert gc.output.count("evicted ") == 1 and "Q8_0 (1.0 MiB, last used" in gc.output, gc.output
    assert held_paths(store, "acme/q") == {"config.json", "model-Q4_K_M.gguf"}
    assert repos(store) == {"acme/q", "acme/b"}
    store.get_file("acme/q", "model-Q4_K_M.gguf")  # still there, whole
    assert store_files_consistent(store) == []
    du = CliRunner().invoke(cli, ["du", "--home", str(store.home)])
    assert "1.0 MiB so far, in 1 eviction" in du.output, du.output
    # The last quant goes with its revision, by the repo's last use: b (not used since) goes before it.
    evicted = store.store.budget.make_room(int(2.2 * MB), "test")
    assert [(e.repo_id, e.variant) for e in evicted] == [("acme/b", None)]


def test_a_quants_pin_keeps_it_and_lets_the_others_go(store: Depot, tmp_path: Path) -> None:
    """A pin of one variant keeps that variant and the shared files, not the revision's other variants:
    what cannot go is counted so too, and a write that fits once they are gone is not refused."""
    store.import_dir(quants(tmp_path, "acme/q"), "acme/q")
    time.sleep(0.01)
    store.import_dir(model(tmp_path, "acme/b"), "acme/b")
    store.pin("acme/q", quant="q8_0")  # (any case, as the variant's name is matched)
    store.pin("acme/b")
    status = store.budget_status()
    assert MB <= status.pinned_bytes < 2.1 * MB, status  # b, Q8 and q's config: not Q4
    store.import_dir(model(tmp_path, "acme/c", size=MB + MB // 4), "acme/c")  # fits only if Q4 goes
    assert held_paths(store, "acme/q") == {"config.json", "model-Q8_0.gguf"}
    assert repos(store) == {"acme/q", "acme/b", "acme/c"}
    with pytest.raises(BudgetExceededError):  # Q8 and b are pinned, c is in the way of nothing
        store.import_dir(model(tmp_path, "acme/d", size=2 * MB), "acme/d")
    assert store_files_consistent(store) == []


def test_a_preloaded_quant_stays_while_its_revisions_other_quant_goes(store: Depot, tmp_path: Path) -> None:
    """What the RAM tier maps is in use, file by file: the revision's other quant may go."""
    store.import_dir(quants(tmp_path, "acme/q"), "acme/q")
    time.sleep(0.01)
    store.import_dir(model(tmp_path, "acme/b"), "acme/b")
    store.preloader.preload("acme/q", quant="Q8_0")
    evicted = store.store.budget.make_room(int(1.2 * MB), "test")
    assert [(e.repo_id, e.variant, e.bytes_freed) for e in evicted] == [("acme/q", "Q4_K_M", MB)]
    assert evicted[0].to_dict()["variant"] == "Q4_K_M"  # (as `gc --json` and the control API show it)
    assert held_paths(store, "acme/q") == {"config.json", "model-Q8_0.gguf"}
    assert {"model-Q8_0.gguf"} <= next(iter(store.preloader.paths().values()))
    with store.preloader.get("acme/q", quant="Q8_0"), pytest.raises(BudgetExceededError):
        store.store.budget.make_room(int(2.6 * MB), "test")  # Q8 is held, and b is all that may go besides
    # Not held, the preload gives way when nothing else can make the room (the RAM tier is no pin)
    evicted = store.store.budget.make_room(int(2.6 * MB), "test")
    assert {(e.repo_id, e.variant) for e in evicted} >= {("acme/b", None)} and not store.preloader.revisions()


def test_a_write_that_cannot_fit_leaves_the_ram_tier_alone(store: Depot, tmp_path: Path) -> None:
    """The RAM tier gave way one preload after another for a write that could not fit even without them
    (larger than the budget, or behind a pin): it emptied the tier, and the write was refused all the
    same (a review). And an import, checked before it writes, was refused where a pull gave way."""
    for name in ("acme/a", "acme/b", "acme/c"):
        store.import_dir(model(tmp_path, name), name)
    store.pin("acme/c")
    store.preloader.preload("acme/a")
    store.preloader.preload("acme/b")
    with pytest.raises(BudgetExceededError):
        store.store.budget.make_room(3 * MB, "test")  # (c is pinned: a and b would not make the room)
    with pytest.raises(BudgetExceededError):
        store.import_dir(model(tmp_path, "acme/big", size=3 * MB), "acme/big")
    assert {key[0] for key in store.preloader.revisions()} == {"acme/a", "acme/b"}
    store.import_dir(
        model(tmp_path, "acme/d", size=int(1.2 * MB)), "acme/d"
    )  # (one preload must go: one goes)
    assert repos(store) == {"acme/b", "acme/c", "acme/d"}
    assert {key[0] for key in store.preloader.revisions()} == {"acme/b"}


@pytest.fixture
def upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    """A node serving ``up/one`` (a 2 MB model and a config) and ``up/q`` (two quants and a config), named by
    HF_ENDPOINT: its store (a test moves a repo's main on by importing into it)."""
    with hub_node(tmp_path, monkeypatch) as hub:
        hub.import_dir(model(tmp_path, "up/one", size=2 * MB), "up/one")
        hub.import_dir(quants(tmp_path, "up/q"), "up/q")
        yield hub


def test_a_quant_pulled_into_an_older_revision_is_not_the_first_to_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: Depot
) -> None:
    """A pull is a use of each variant it pulls: Q4 pulled today into the revision Q8 came with last week
    stays, Q8 goes (by the revision's age alone, the two tied and Q4 went by its name)."""
    with budgeted(tmp_path / "local", "3.5MiB", monkeypatch) as local:
        local.pull("up/q", quants=["Q8_0"])
        time.sleep(0.01)
        local.pull("up/q", quants=["Q4_K_M"])
        assert held_paths(local, "up/q") == {"config.json", "model-Q4_K_M.gguf", "model-Q8_0.gguf"}
        evicted = local.store.budget.make_room(int(1.7 * MB), "test")
        assert [(e.repo_id, e.variant) for e in evicted] == [("up/q", "Q8_0")]
        variants = {v.name: v for v in local.get_manifest("up/q").variants}
        assert {name: v.status for name, v in variants.items()} == {
            "Q4_K_M": "downloaded",
            "Q8_0": "available",
        }
        assert variants["Q8_0"].error is None  # (evicted: available again, not an error to report)
        assert store_files_consistent(local) == []
        # ... and `status` says when it went (it read "available", as if never pulled: an explorer's trial)
        said = CliRunner().invoke(cli, ["status", "up/q", "--home", str(local.home)])
        rows = {line.split()[1]: line for line in said.output.splitlines() if line.startswith("│")}
        assert "evicted" in " ".join(said.output.split()) and "evicted" not in rows["Q4_K_M"], said.output


def test_a_repo_pulled_whole_gives_up_one_quant_before_its_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: Depot
) -> None:
    """The pull marked the revision used a moment before its variants: the revision, older by microseconds,
    went whole where one quant was enough (an explorer's 18 MiB GGUF repo evicted for 1 MiB of room)."""
    with budgeted(tmp_path / "local", "3.5MiB", monkeypatch) as local:
        local.pull("up/q")
        assert held_paths(local, "up/q") == {"config.json", "model-Q4_K_M.gguf", "model-Q8_0.gguf"}
        evicted = local.store.budget.make_room(int(2 * MB), "test")
        assert [(e.repo_id, e.variant) for e in evicted] == [("up/q", "Q4_K_M")]
        assert held_paths(local, "up/q") == {"config.json", "model-Q8_0.gguf"}
    with budgeted(tmp_path / "other", "3.5MiB", monkeypatch) as other:
        other.pull("up/q")
        other.snapshot_path("up/q")  # (a folder handed to a loader: a use of every variant, the same way)
        other.store.access.flush()
        (planned,) = other.store.budget.plan_shrink(int(1.5 * MB))
        assert planned.variant in ("Q4_K_M", "Q8_0")  # (one of them, not the revision)


def test_a_kept_revision_keeps_one_variant_and_what_cannot_fit_is_refused_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pin of a quant whose branch moved to a commit without it keeps that revision (as a use would):
    its variants may go but one, and that one counts as staying, so a write that cannot fit even then is
    refused before anything is removed (one quant went for nothing, and the write overshot the budget)."""
    with budgeted(tmp_path / "store", "5MiB", monkeypatch) as store:
        store.import_dir(quants(tmp_path, "acme/q"), "acme/q")
        store.pin("acme/q", quant="Q4_K_M")  # follows main
        rng = np.random.default_rng(7)
        moved = write_model_dir(tmp_path / "src" / "q2", {
            "config.json": b"{}", "model-Q5_K_M.gguf": rng.bytes(MB), "model-Q8_0.gguf": rng.bytes(MB)})  # fmt: skip
        store.import_dir(moved, "acme/q")  # main moves to a commit without Q4_K_M
        old = next(r["commit_id"] for r in store.store.index.read("SELECT commit_id FROM revisions")
                   if r["commit_id"] != store.resolve("acme/q"))  # fmt: skip
        store.remove("acme/q", old)
        with pytest.raises(BudgetExceededError):  # only one of Q5 and Q8 may go
            store.store.budget.make_room(int(4.5 * MB), "test")
        assert len(held_paths(store, "acme/q")) == 3, "nothing removed before the refusal"
        assert [e.variant for e in store.store.budget.make_room(int(3.5 * MB), "test")] == ["Q5_K_M"]


def test_a_pinned_variant_renamed_when_another_kind_goes_stays_pinned(store: Depot, tmp_path: Path) -> None:
    """Variants' names depend on the files a revision holds (fp16 is onnx-fp16 beside a safetensors fp16):
    a pin made under one name still keeps the variant once the other went and the name changed."""
    rng = np.random.default_rng(3)
    folder = write_model_dir(tmp_path / "src" / "o", {
        "config.json": b"{}", "onnx/model.onnx": rng.bytes(MB // 2), "onnx/model_fp16.onnx": rng.bytes(MB // 2),
        "onnx/model_quantized.onnx": rng.bytes(MB // 2), "model.fp16.safetensors": rng.bytes(MB // 2),
    })  # fmt: skip
    store.import_dir(folder, "acme/o")
    store.pin("acme/o", quant="onnx-fp16")
    time.sleep(0.01)
    store.get_file("acme/o", "onnx/model.onnx")
    store.get_file("acme/o", "onnx/model_quantized.onnx")
    store.store.access.flush()
    evicted = store.store.budget.make_room(int(1.6 * MB), "test")
    assert [e.variant for e in evicted] == ["safetensors-fp16"]  # the least recently used
    store.store.budget.make_room(int(2.9 * MB), "test")  # fp32 and q8 go; fp16 (pinned) does not
    assert held_paths(store, "acme/o") == {"config.json", "onnx/model_fp16.onnx"}


def test_a_variant_loaded_from_the_snapshot_folder_or_pulled_later_counts_as_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: Depot
) -> None:
    """A loader given the revision's folder (from_pretrained(path, variant=...)) reads unseen: every
    variant of it counts as used then; and reads of a quant pulled into a commit read before count for it."""
    with budgeted(tmp_path / "local", "10MiB", monkeypatch) as local:
        local.pull("up/q", quants=["Q4_K_M"])
        local.get_file("up/q", "model-Q4_K_M.gguf")  # (the commit's variants are known now)
        local.pull("up/q", quants=["Q8_0"])  # one more variant in the same commit

        def last_uses() -> dict[str, float]:
            local.store.access.flush()
            rows = local.store.index.read("SELECT variant, last_access FROM access WHERE repo_id = 'up/q'")
            return {r["variant"]: r["last_access"] for r in rows}

        pulled = last_uses()
        time.sleep(0.02)
        local.get_file("up/q", "model-Q8_0.gguf")
        read = last_uses()
        assert read["Q8_0"] > pulled["Q8_0"] and read["Q4_K_M"] == pulled["Q4_K_M"]
        time.sleep(0.02)
        local.snapshot_path("up/q")
        folder = last_uses()
        assert folder["Q8_0"] > read["Q8_0"] and folder["Q4_K_M"] > read["Q4_K_M"]


def test_a_file_several_quants_list_is_a_use_of_none_and_a_writers_evictions_are_warned_of(
    store: Depot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A GGUF repo's mmproj projector goes with every quant: read with the one in use, it made the last quant
    listing it look used (the quant in use went). And an import that evicts says so at warning level: its
    command prints no list of evictions."""
    rng = np.random.default_rng(11)
    folder = write_model_dir(tmp_path / "src" / "phi", {
        "config.json": b"{}", "phi-Q4_K_M.gguf": rng.bytes(MB), "phi-Q8_0.gguf": rng.bytes(MB),
        "mmproj-f16.gguf": rng.bytes(MB // 4),
    })  # fmt: skip
    store.import_dir(folder, "acme/phi")
    time.sleep(0.01)
    store.get_file("acme/phi", "phi-Q4_K_M.gguf")
    time.sleep(0.01)
    store.get_file("acme/phi", "mmproj-f16.gguf")  # (read after the quant, with it)
    store.store.access.flush()
    caplog.set_level(logging.WARNING, logger="modeldepot.store.budget")
    store.import_dir(model(tmp_path, "acme/b", size=MB + MB // 2), "acme/b")  # needs one quant's room
    assert held_paths(store, "acme/phi") == {"config.json", "phi-Q4_K_M.gguf", "mmproj-f16.gguf"}
    assert "evicted acme/phi@" in caplog.text and "Q8_0" in caplog.text
    assert (
        "room made before the write, gone even if the write fails" in caplog.text
    )  # (a trial: read as lost)


def test_uses_are_written_soon_after_a_burst_without_another_use(tmp_path: Path) -> None:
    """A node's last downloads of a burst were written only when another use came, or when it stopped: a
    `gc --max-size` beside it took the quants its clients had just fetched for unused."""
    from modeldepot.store.access import AccessLog

    with Depot(tmp_path / "store") as depot:
        access = AccessLog(depot.store.index, flush_interval=0.2)
        access.flush()  # (the interval counts from here)
        access.record("acme/x", "Q4_K_M")
        with Depot(tmp_path / "store") as other:  # another process's view: what the index holds
            deadline = time.monotonic() + 30
            rows: list[object] = []
            while time.monotonic() < deadline and not rows:
                rows = other.store.index.read("SELECT 1 FROM access WHERE repo_id = 'acme/x'")
                time.sleep(0.05)
            assert rows, "the use was never written"
        access.close()


def test_a_pull_makes_room_by_its_repos_superseded_revision_and_unread_quant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: Depot
) -> None:
    """A pull of a repo's new revision under a budget that holds one: the revision it replaces goes
    (huggingface_hub#1013), where the whole repo was kept and the pull refused. A pull of another quant of
    the revision: the quant never read goes, the one just pulled stays, and the shared config with it."""
    with budgeted(tmp_path / "local", "3.5MiB", monkeypatch) as local:
        first = local.pull("up/one").commit_id
        upstream.import_dir(model(tmp_path, "up/one", size=2 * MB, seed=1), "up/one")  # main moves on
        second = local.pull("up/one").commit_id
        assert second != first
        assert [r["commit_id"] for r in local.store.index.read(
            "SELECT commit_id FROM revisions WHERE repo_id = 'up/one'")] == [second]  # fmt: skip
        assert local.store.check_blob(local.file_info("up/one", "model.safetensors").sha256,
                                      2 * MB, local.chunk_size) is None  # fmt: skip
        local.remove("up/one")

        local.set_max_size("1.5MiB")
        local.pull("up/q", quants=["Q8_0"])
        commit = local.resolve("up/q")
        # The room is made before a byte is fetched, by the revision's only other quant (the store
        # went above its budget while the pull ran, and only the pull's end evicted it)
        writing = {"config.json", "model-Q4_K_M.gguf"}
        with local.store.budget.writing("up/q", commit, writing) as writer:
            evicted = writer.make_room(MB, "pulling up/q")
            assert [(e.repo_id, e.variant) for e in evicted] == [("up/q", "Q8_0")]
        local.pull("up/q", quants=["Q4_K_M"])  # room only for one quant: Q8_0 was never read
        assert held_paths(local, "up/q") == {"config.json", "model-Q4_K_M.gguf"}
        statuses = {v.name: v.status for v in local.get_manifest("up/q").variants}
        assert statuses == {"Q4_K_M": "downloaded", "Q8_0": "available"}

        local.load("up/q", "Q4_K_M", engine=lambda path: path.read_bytes()[:4])  # in use now
        with pytest.raises(BudgetExceededError):
            local.pull("up/q", quants=["Q8_0"])
        assert held_paths(local, "up/q") == {"config.json", "model-Q4_K_M.gguf"}
        local.engines.clear()
        local.pull("up/q", quants=["Q8_0"])
        assert held_paths(local, "up/q") == {"config.json", "model-Q8_0.gguf"}
        assert store_files_consistent(local) == []


def test_the_revision_a_pull_replaces_goes_last_and_stays_when_the_pull_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: Depot
) -> None:
    """A pull of a new main made room by the revision it replaces first, before a byte was fetched: when the
    download then failed, the model that loaded a minute before was gone. Now any other model that may go,
    used since, goes first; the replaced revision goes only when nothing else can (and a failed pull then
    resumes where it stopped)."""
    from modeldepot.transfer import pull as pull_module

    with budgeted(tmp_path / "local", "4.5MiB", monkeypatch) as local:
        first = local.pull("up/one").commit_id
        time.sleep(0.01)
        local.import_dir(model(tmp_path, "acme/used"), "acme/used")  # used after up/one
        upstream.import_dir(model(tmp_path, "up/one", size=2 * MB, seed=1), "up/one")  # main moves on

        async def broken(self: object, missing: object) -> object:
            raise ConnectionError("the network went away")

        with monkeypatch.context() as patched:
            patched.setattr(pull_module._PullRun, "fetch", broken)
            with pytest.raises(ConnectionError):
                local.pull("up/one")
        assert local.resolve("up/one") == first, "the model in use before the pull is still there"
        assert repos(local) == {"up/one"}, "acme/used went instead, though used since"
        second = local.pull("up/one").commit_id
        assert second != first and local.resolve("up/one") == second
        assert store_files_consistent(local) == []


def test_another_processs_pull_of_another_variant_of_the_repo_keeps_it_whole(tmp_path: Path) -> None:
    """A pull here of one quant, while another process pulls another quant of the same repo (its fresh
    'downloading' row): the other pull may rely on the revision it supersedes (blobs it found in the store,
    known in its process only), so the repo stays whole, as before this process's pull (which dropped every
    row of its repo as its own)."""
    with Depot(tmp_path / "s") as depot:
        depot.import_dir(quants(tmp_path, "acme/q"), "acme/q")
        new, now = "c" * 40, time.time()
        with depot.store.index.write("another process's pull") as con:
            con.execute("INSERT INTO manifests (repo_id, revision, commit_id, body, scanned_at) "
                        "VALUES ('acme/q', 'main', ?, '{}', ?)", (new, now))  # fmt: skip
            con.execute("INSERT INTO variant_status (repo_id, variant, status, updated_at) "
                        "VALUES ('acme/q', 'Q8_0', 'downloading', ?)", (now,))  # fmt: skip
        budget = depot.store.budget
        paths = ["config.json", "model-Q4_K_M.gguf"]
        with (
            depot.store.partials.pulling("acme/q"),
            budget.writing("acme/q", new, paths, ["Q4_K_M"]) as writer,
        ):
            assert not [u for u in budget.order.units(budget._kept(writer)) if u.repo_id == "acme/q"]
        with budget.writing("acme/q", new, paths, ["Q8_0"]) as writer:  # (the row is this pull's own)
            assert [u for u in budget.order.units(budget._kept(writer)) if u.repo_id == "acme/q"]


def test_a_pull_into_a_revision_takes_none_of_its_quants_for_a_readme_nor_the_shard_it_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write into a revision may make room by a quant of it only for another quant that comes: a mirror's
    fetch of a README evicted the revision's only model, and one of a split GGUF's second shard evicted the
    first (half a variant, grouped without what was being written), where a model used since went first."""
    rng = np.random.default_rng(9)
    shard = "Q8_0/model-Q8_0-00002-of-00002.gguf"
    for name, files, writing in (
        ("acme/gg", {"config.json": b"{}", "model-Q4_K_M.gguf": rng.bytes(MB)}, "README.md"),
        ("acme/split", {"config.json": b"{}", "Q8_0/model-Q8_0-00001-of-00002.gguf": rng.bytes(MB)}, shard),
    ):
        with budgeted(tmp_path / name, "1GiB", monkeypatch) as store:
            commit = store.import_dir(write_model_dir(tmp_path / "src" / name, files), name).commit_id
            time.sleep(0.01)
            store.import_dir(model(tmp_path, "acme/b"), "acme/b")  # used after the quant
            store.store.access.flush()
            store.set_max_size(store.du().blob_bytes + 1000)
            with store.store.budget.writing(name, commit, [writing]) as writer:
                evicted = writer.make_room(MB // 2, f"mirroring {writing}")
            assert [(e.repo_id, e.variant) for e in evicted] == [("acme/b", None)], name
            assert held_paths(store, name) == set(files), name


def test_a_mirror_takes_a_file_whose_content_it_holds_whatever_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget's check before a mirror's pull counted the whole file, though the pull reuses content the
    store holds under another repo or commit (a new commit that changed only the README): a 507 for nothing."""
    import urllib.request

    weights = np.random.default_rng(6).bytes(3 * MB)
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as hub:
        for name in ("acme/big", "acme/copy"):
            hub.import_dir(write_model_dir(tmp_path / "src" / name, {"model.safetensors": weights}), name)
        upstream = LiveNode(hub)
        try:
            with budgeted_mirror(tmp_path, upstream.url, "4MiB", monkeypatch) as (depot, mirror):
                for name in ("acme/big", "acme/copy"):
                    with urllib.request.urlopen(f"{mirror.url}/{name}/resolve/main/model.safetensors") as got:
                        assert got.read() == weights
                    if name == "acme/big":
                        depot.pin(name)  # (what is pinned stays: only the reuse makes room)
        finally:
            upstream.stop()


def test_the_preview_takes_a_revisions_last_variant_with_its_shared_files_as_the_eviction_does(
    tmp_path: Path,
) -> None:
    """The preview showed a revision's last quant going alone and its config and tokenizer staying; the
    eviction took the revision whole (its repo gone from `ls`), in fewer steps (a trial)."""
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        folder = quants(tmp_path, "acme/q")
        (folder / "tokenizer.json").write_bytes(json.dumps({"vocab": ["x" * 64] * 8000}).encode())
        depot.import_dir(folder, "acme/q")
        planned = depot.plan_shrink(1024)
        assert [e.variant for e in planned] in (["Q4_K_M", None], ["Q8_0", None])
        evicted = depot.shrink(1024)
        assert [(e.repo_id, e.commit_id, e.variant, e.bytes_freed) for e in evicted] == [
            (e.repo_id, e.commit_id, e.variant, e.bytes_freed) for e in planned
        ]
        assert repos(depot) == set()


def test_a_budgets_evictions_are_previewed_as_they_then_go(tmp_path: Path) -> None:
    """`budget SIZE --dry-run` (Depot.plan_shrink) lists what a budget would evict, in order, and the bytes
    each frees, changing nothing; setting the budget then evicts just that: variants apart, a copy that frees
    nothing alone, a pin kept. (A budget's evictions could not be previewed: `budget` asked "Go on?" or,
    without a terminal, refused, and named no model.)"""
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(quants(tmp_path, "acme/q"), "acme/q")
        time.sleep(0.01)
        depot.import_dir(model(tmp_path, "acme/b", size=2 * MB), "acme/b")
        depot.import_dir(model(tmp_path, "acme/b", size=2 * MB), "acme/copy-of-b")
        time.sleep(0.01)
        depot.import_dir(model(tmp_path, "acme/pinned", size=MB), "acme/pinned")
        depot.pin("acme/pinned")
        time.sleep(0.01)
        depot.get_file("acme/q", "model-Q4_K_M.gguf")
        depot.store.access.flush()
        home = str(depot.home)
        held = {r: held_paths(depot, r) for r in repos(depot)}
        for limit in (int(4.5 * MB), int(2.5 * MB), MB):  # (Q8; b, then its copy that frees it; q)
            planned = depot.plan_shrink(limit)
            shown = CliRunner().invoke(cli, ["budget", str(limit), "--dry-run", "--json", "--home", home])
            assert shown.exit_code == 0, shown.output
            body = json.loads(shown.output)
            assert body["would_evict"] == [e.to_dict() for e in planned] and body["max_bytes"] == limit
            assert {r: held_paths(depot, r) for r in repos(depot)} == held, "a dry run removed nothing"
            assert depot.budget_status().store_max_size is None, "nor saved the budget"
            evicted = depot.shrink(limit)
            assert [(e.repo_id, e.commit_id, e.variant, e.bytes_freed) for e in evicted] == [
                (e.repo_id, e.commit_id, e.variant, e.bytes_freed) for e in planned
            ], limit
            held = {r: held_paths(depot, r) for r in repos(depot)}
        assert "acme/pinned" in held
        assert depot.plan_shrink(100 * MB) == []
        said = CliRunner().invoke(cli, ["budget", "100MiB", "--dry-run", "--home", home])
        assert "nothing would be evicted" in said.output, said.output
        # The text, and what the pins keep above the budget
        depot.import_dir(model(tmp_path, "acme/c", size=MB), "acme/c")
        said = CliRunner().invoke(cli, ["budget", "1KiB", "--dry-run", "--home", home])
        assert said.exit_code == 0 and "would evict acme/c@" in said.output, said.output
        assert "over it, as what is pinned or in use stays" in said.output, said.output
        assert "acme/c" in repos(depot)
        refused = CliRunner().invoke(cli, ["budget", "1KiB", "--home", home])  # (no terminal: not asked)
        assert refused.exit_code == 2 and "--dry-run shows what would go" in refused.output, refused.output
        assert "acme/c" in repos(depot)
        refused = CliRunner().invoke(cli, ["budget", "none", "--dry-run", "--home", home])
        assert refused.exit_code == 2 and "give the size to try" in refused.output, refused.output
        refused = CliRunner().invoke(cli, ["budget", "--dry-run", "--home", home])  # (no budget saved)
        assert refused.exit_code == 2 and "has no disk budget" in refused.output, refused.output


def test_blobs_shared_with_files_outside_the_store_are_neither_counted_nor_evicted(tmp_path: Path) -> None:
    """A model adopted from a Hugging Face cache (or imported with --link) was counted against the budget and
    evicted first, freeing no disk: the cache keeps its files (a trial: `budget 100MiB` evicted an adopted
    1 GiB model, 0 MiB given back, and the next pull evicted more). Its blobs are neither counted nor evicted
    for room; once the outside names go, the blobs are the store's alone: counted, and evicted in turn."""
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        folder = model(tmp_path, "acme/linked", size=2 * MB)
        depot.import_dir(folder, "acme/linked", link=True)
        time.sleep(0.01)
        depot.import_dir(model(tmp_path, "acme/copied", size=MB), "acme/copied")
        status = depot.budget_status()
        assert MB <= status.used_bytes < 1.1 * MB and 2 * MB <= status.shared_bytes < 2.1 * MB, status
        assert [e.repo_id for e in depot.plan_shrink(MB // 2)] == ["acme/copied"]
        evicted = depot.set_max_size(MB // 2)
        assert [(e.repo_id, e.bytes_freed >= MB) for e in evicted] == [("acme/copied", True)]
        assert repos(depot) == {"acme/linked"}
        said = CliRunner().invoke(cli, ["budget", "--home", str(depot.home)])
        assert "shared with files outside the store" in said.output, said.output
        for path in folder.iterdir():  # the folder's own names go: the blobs are the store's alone now
            path.unlink()
        status = depot.budget_status()
        assert status.used_bytes >= 2 * MB and status.shared_bytes == 0
        assert [(e.repo_id, e.bytes_freed >= 2 * MB) for e in depot.shrink()] == [("acme/linked", True)]


def test_evictions_are_remembered_with_when_and_why_and_said_where_the_model_is_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model the budget evicted weeks ago was "not in the store" (`info`), and the totals alone were kept (an
    explorer's trial): each eviction is kept with when it was and the write it made room for, listed by
    `budget`, and said by `info` of a repo that went whole; the newest EVICTIONS_KEPT of them."""
    from modeldepot.store import budget as budget_module

    home = tmp_path / "store"
    with Depot(home) as depot:
        depot.set_max_size(int(2.5 * MB))
        for name in ("acme/a", "acme/b", "acme/c"):
            depot.import_dir(model(tmp_path, name), name)
            time.sleep(0.01)
        [went] = depot.evictions()
        assert (went.repo_id, went.doing) == ("acme/a", "importing acme/c"), went
        assert time.time() - 60 < went.at <= time.time() and went.bytes_freed >= MB
        assert depot.evictions("ACME/A") == [went] and depot.evictions("acme/b") == []
        with pytest.raises(InvalidInputError):
            depot.evictions(limit=-1)
    said = CliRunner().invoke(cli, ["info", "acme/a", "--home", str(home)])
    assert said.exit_code == 1, said.output
    assert "the disk budget evicted it on" in said.stderr and "(importing acme/c)" in said.stderr, said.stderr
    # (imported: the operator's own, which a pull would not bring back, a review)
    assert "importing its folder again brings it back" in said.stderr, said.stderr
    said = CliRunner().invoke(cli, ["info", "acme/never", "--home", str(home)])
    assert "evicted" not in said.stderr, said.stderr
    listed = CliRunner().invoke(cli, ["budget", "--home", str(home)])
    assert "in 1 eviction, the latest:" in listed.output and "acme/a@" in listed.output, listed.output
    assert "for importing acme/c" in listed.output, listed.output
    body = json.loads(CliRunner().invoke(cli, ["budget", "--json", "--home", str(home)]).output)
    assert [e["repo_id"] for e in body["recent_evictions"]] == ["acme/a"], body
    monkeypatch.setattr(budget_module, "EVICTIONS_KEPT", 2)  # (the newest kept: the totals count them all)
    with Depot(home) as depot:
        for name in ("acme/d", "acme/e"):
            depot.import_dir(model(tmp_path, name), name)
            time.sleep(0.01)
        assert [e.repo_id for e in depot.evictions()] == ["acme/c", "acme/b"]
        assert depot.budget_status().evictions == 3
        # Removed by hand once imported again, it is no longer the budget's doing (a review)
        depot.set_max_size(None)
        depot.import_dir(model(tmp_path, "acme/c"), "acme/c")
        depot.remove("acme/c")
        assert [e.repo_id for e in depot.evictions()] == ["acme/b"]
    said = CliRunner().invoke(cli, ["info", "acme/c", "--home", str(home)])
    assert said.exit_code == 1 and "evicted" not in said.stderr, said.stderr


def test_a_refusal_by_a_few_bytes_says_the_bytes(tmp_path: Path) -> None:
    """A file a few bytes over the budget was refused as "10.0 MiB more does not fit in the disk budget of 10.0
    MiB" (an explorer's trial): sizes that read the same rounded are said in bytes."""
    with Depot(tmp_path / "store") as depot:
        depot.set_max_size(MB)
        with pytest.raises(BudgetExceededError) as refused:
            depot.import_dir(model(tmp_path, "acme/over", size=MB), "acme/over")  # (+ its config)
    said = str(refused.value)
    needed = refused.value.needed_bytes
    assert MB < needed < MB + 1000, needed
    assert f"{needed:,} B more does not fit in the disk budget of {MB:,} B" in said, said


def test_blobs_exported_to_a_hugging_face_cache_are_still_the_stores(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An export links the store's blobs into a Hugging Face cache: they were taken for blobs linked in from
    outside, neither counted nor evicted, and pulls and exports took the store past its budget with `budget`
    saying 0% used (a trial). They are the store's: counted, and evicted in turn; the cache keeps its copy."""
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(model(tmp_path, "acme/old", size=MB), "acme/old")
        cache = tmp_path / "hf" / "hub"
        exported = depot.hf_cache_export("acme/old", cache_dir=cache)
        assert exported.ok and exported.linked == exported.files
        time.sleep(0.01)
        depot.import_dir(model(tmp_path, "acme/new", size=MB), "acme/new")
        status = depot.budget_status()
        assert status.used_bytes >= 2 * MB and status.shared_bytes == 0, status
        [planned] = depot.plan_shrink(3 * MB // 2)  # (the preview says it as the eviction does)
        assert planned.bytes_freed == 0 and planned.bytes_still_linked >= MB, planned
        # The dry run's outcome is the budget's after the eviction: it said "the store would take 2.0 MiB ...
        # over it, as what is pinned or in use stays" with nothing pinned (an explorer's trial)
        limit = str(3 * MB // 2)
        said = CliRunner().invoke(cli, ["budget", limit, "--dry-run", "--home", str(depot.home)])
        assert said.exit_code == 0 and "over it" not in said.output, said.output
        assert "would leave the budget, staying on disk linked outside the store" in said.output, said.output
        said = CliRunner().invoke(cli, ["budget", limit, "--dry-run", "--json", "--home", str(depot.home)])
        body = json.loads(said.output)
        assert body["would_free_bytes"] == 0 and body["would_take_bytes"] <= 3 * MB // 2, body
        with caplog.at_level(logging.INFO, logger="modeldepot.store.budget"):
            evicted = depot.set_max_size(3 * MB // 2)
        assert [e.repo_id for e in evicted] == ["acme/old"]  # (its bytes stay on the disk, the cache's now)
        # Said so: "evicted acme/old (0 B, ...)" read as an eviction for nothing (an explorer's trial)
        assert evicted[0].bytes_freed == 0 and evicted[0].bytes_still_linked >= MB
        assert "more stay on disk, linked by files outside the store" in caplog.text, caplog.text
        assert repos(depot) == {"acme/new"} and depot.budget_status().used_bytes <= 3 * MB // 2
        kept = cache / "models--acme--old" / "snapshots" / exported.commit_id
        assert all(path.read_bytes() for path in kept.iterdir()), "the cache's copy stays whole"


def test_removing_the_last_variant_of_a_revision_drops_its_pins(store: Depot, tmp_path: Path) -> None:
    """`rm --quant` of a revision's last variant removed the revision and kept its pins: listed for good,
    and applied again, unseen, to a later pull of it (a README walk)."""
    folder = quants(tmp_path, "acme/q")
    (folder / "config.json").unlink()  # (no shared file: the last variant's files are the revision's last)
    store.import_dir(folder, "acme/q")
    store.pin("acme/q", quant="Q4_K_M")
    store.pin("acme/q", quant="Q8_0")
    store.remove("acme/q", quant="Q8_0")
    assert [p.quant for p in store.pins("acme/q")] == ["Q4_K_M"]
    store.remove("acme/q", quant="Q4_K_M")  # (the last: the revision goes with it)
    assert "acme/q" not in repos(store) and store.pins("acme/q") == []


def test_many_small_revisions_are_evicted_in_batches_each_freeing_what_it_alone_held(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A budget that evicts many small revisions removed them one at a time, each with a scan of the store's every
    file for the blobs left unnamed: 1,155 evictions took 13.9 s on a store of 24,000 files (explorer 30). Whole
    revisions the plan needs now go in batches, one scan each; what each is said to free, the history and the
    store are as they were: a blob two of them share is freed once, by the later."""
    from modeldepot.store import maintenance

    scans: list[int] = []
    scan = maintenance._delete_unreferenced_rows

    def counted(con: object, candidates: list[str]) -> list[str]:
        scans.append(len(candidates))
        return scan(con, candidates)  # type: ignore[arg-type]

    shared = os.urandom(5000)
    with Depot(tmp_path / "store") as depot:
        for i in range(100):
            files = {"config.json": b'{"i": %d}' % i, "weights.bin": os.urandom(10_000)}
            if i in (3, 7):
                files["shared.bin"] = shared
            depot.import_dir(write_model_dir(tmp_path / "src" / f"r{i}", files), f"acme/r{i:03d}")
        budget = depot.store.budget
        before = budget.used_bytes()
        monkeypatch.setattr(maintenance, "_delete_unreferenced_rows", counted)
        evicted = budget.shrink(before - 500_000)
        monkeypatch.undo()
        after = budget.used_bytes()
        assert after <= before - 500_000 and 40 <= len(evicted) <= 60
        assert len(scans) <= len(evicted) // 64 + 2  # (one a revision before: as many as the evictions)
        assert sum(e.bytes_freed for e in evicted) == before - after
        freed = {e.repo_id: e.bytes_freed for e in evicted}
        assert freed["acme/r007"] == freed["acme/r003"] + 5000
        assert [e.repo_id for e in evicted] == [
            f"acme/r{i:03d}" for i in range(len(evicted))
        ]  # (oldest first)
        assert [e.repo_id for e in reversed(budget.history(limit=100))] == [e.repo_id for e in evicted]
        assert repos(depot) == {f"acme/r{i:03d}" for i in range(len(evicted), 100)}
        assert not any((depot.store.layout.home / "snapshots" / "acme").glob("r000*"))
        assert store_files_consistent(depot) == []
        assert depot.verify().ok


def _small_revisions(depot: Depot, tmp_path: Path, count: int, size: int = 100_000) -> None:
    """``count`` revisions acme/r000.. of ``size`` bytes each, oldest first."""
    for i in range(count):
        files = {"config.json": b'{"i": %d}' % i, "weights.bin": os.urandom(size)}
        depot.import_dir(write_model_dir(tmp_path / "src" / f"r{i}", files), f"acme/r{i:03d}")


def _snapshots(depot: Depot) -> set[str]:
    root = depot.store.layout.home / "snapshots" / "acme"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def test_a_removal_elsewhere_during_a_round_stops_its_evictions(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Another process's `rm` (or its own budget round) frees the room while this round goes: the bytes were
    looked at only between batches, and the whole batch of the plan (up to 64 revisions, 1 GiB) went, every one
    of them for nothing (a review). They are looked at again once the batch is known."""
    with Depot(tmp_path / "store") as depot:
        _small_revisions(depot, tmp_path, 6)
        big = write_model_dir(tmp_path / "src" / "big", {"weights.bin": os.urandom(1_000_000)})
        depot.import_dir(big, "acme/big")  # (the newest: not in the plan)
        budget = depot.store.budget
        limit = budget.used_bytes() - 450_000
        assert [e.repo_id for e in budget.plan_shrink(limit)] == [f"acme/r{i:03d}" for i in range(5)]
        real = budget.order.frees_nothing
        removed: list[object] = []

        def meanwhile(*args: object) -> bool:
            if not removed:  # (another process removes 1 MB, as this round goes)
                removed.append(maintenance.remove(depot.store, "acme/big"))
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(budget.order, "frees_nothing", meanwhile)
        evicted = budget.shrink(limit)
        assert removed
        # (2a058e7: ["acme/r000"], the bytes looked at again after it; 25aaa04: all five)
        assert len(evicted) <= 1, [e.repo_id for e in evicted]


def test_a_batch_that_fails_midway_accounts_for_the_revisions_it_took_out(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A blob file that cannot be deleted (a `sudo` pull's folder under blobs/: EACCES) failed the removal of a
    batch after its transaction: its every revision was out of the index, none counted, logged, nor in the
    history, and every snapshot of the batch stayed (dangling links; a review). What went is on record, its
    snapshots gone, and the error said after."""
    with Depot(tmp_path / "store") as depot:
        _small_revisions(depot, tmp_path, 6)
        store = depot.store
        budget = store.budget
        limit = budget.used_bytes() - 450_000
        assert [e.repo_id for e in budget.plan_shrink(limit)] == [f"acme/r{i:03d}" for i in range(5)]
        commit = store.resolve("acme/r002", "main")
        stuck = next(e.sha256 for e in store.files("acme/r002", commit) if e.path == "weights.bin")
        real = store.blobs.delete

        def refused(sha256: str, *args: object, **kwargs: object) -> int:
            if sha256 == stuck:
                raise os_error(PermissionError(13, "Permission denied", str(store.blobs.path(sha256))),
                               f"deleting {store.blobs.path(sha256)}")  # fmt: skip
            return real(sha256, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(store.blobs, "delete", refused)
        with pytest.raises(StoreError):
            budget.shrink(limit)
        monkeypatch.undo()
        held = {r.repo_id for r in depot.list_repos()}
        gone = (
            {f"acme/r{i:03d}" for i in range(6)} - held - {"acme/r002"}
        )  # (the one whose file stayed aside)
        assert gone, "the round removed nothing"
        history = {e.repo_id for e in budget.history(limit=100)}
        counted = int(store.index.setting("evictions") or 0)
        # Each revision the round took out of the index is an eviction on record, as it was
        assert gone <= history, f"evicted with no record: {sorted(gone - history)}"
        assert counted >= len(gone)
        # ... and its snapshot is gone (a loader globbing it found links to deleted blobs)
        assert not {name for name in _snapshots(depot) if f"acme/{name}" in gone}


def test_rm_of_a_repo_with_no_revision_left_removes_its_row(tmp_path: Path) -> None:
    """A repo's row no revision is left of (an older version's crash, a hand edit) goes with `rm` of the repo;
    built on the removal of revisions, which deletes the row with its last revision, it stayed for good (a
    review): `ls` listed it, and every `rm` of it "succeeded"."""
    with Depot(tmp_path / "store") as depot:
        _small_revisions(depot, tmp_path, 1)
        store = depot.store
        commit = store.resolve("acme/r000", "main")
        with store.index.write("a row with no revision (a crash of an older version, a hand edit)") as con:
            con.execute("DELETE FROM revisions WHERE repo_id = ? AND commit_id = ?", ("acme/r000", commit))
        assert store.index.read("SELECT 1 FROM repos WHERE repo_id = ?", ("acme/r000",))
        maintenance.remove(store, "acme/r000")
        assert not store.index.read("SELECT 1 FROM repos WHERE repo_id = ?", ("acme/r000",))
