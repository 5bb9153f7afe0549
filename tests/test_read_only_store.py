"""A store on a read-only mount (a container's read-only root or volume, a read-only export): read, loaded
and served as it is; every write refused first and clearly; what is found corrupt refused, left in place.

The mounts are real: a read-only bind mount of a store made here (``mount`` needs root, as the fleet
tests' network namespaces do)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors.numpy import save_file

from conftest import (
    SMALL_CHUNK,
    WITHOUT_OVERRIDE,
    LiveNode,
    Mounts,
    closed_port,
    free_port,
    wait_for_port,
    write_model_dir,
)
from fleetnodes import base_env, modeldepot
from modeldepot import Depot, ReadOnlyStoreError
from modeldepot.cli import cli
from modeldepot.errors import CorruptBlobError, NotFoundError, RepoNotFoundError
from modeldepot.preload import Preloader
from modeldepot.store.layout import refuses_writes
from test_load import BIAS as ONNX_BIAS
from test_load import REPO as ONNX_REPO
from test_load import WEIGHT as ONNX_WEIGHT
from test_load import write_repo as write_onnx_repo

Mount = Callable[[Path], Path]


@pytest.fixture
def read_only(mounts: Mounts) -> Mount:
    """``read_only(folder)``: a read-only bind mount of ``folder`` (unmounted after the test)."""
    return mounts.read_only


def made_store(tmp_path: Path) -> Path:
    """A store holding a safetensors model, two GGUF-named quants and an ONNX repo; closed."""
    home = tmp_path / "store"
    folder = tmp_path / "src" / "st"
    folder.mkdir(parents=True)
    save_file(
        {"w": np.arange(64 * 256, dtype=np.float32).reshape(64, 256)}, str(folder / "model.safetensors")
    )
    (folder / "config.json").write_text('{"model_type": "test"}')
    rng = np.random.default_rng(5)
    quants = write_model_dir(tmp_path / "src" / "q", {
        "config.json": b"{}", "model-Q4_K_M.gguf": rng.bytes(300_000), "model-Q8_0.gguf": rng.bytes(500_000),
    })  # fmt: skip
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(folder, "acme/st")
        depot.import_dir(quants, "acme/q")
        depot.import_dir(write_onnx_repo(tmp_path / "src" / "onnx"), ONNX_REPO)
    return home


def made_source(tmp_path: Path) -> Path:
    """A repo folder with two safetensors variants (fp32 "safetensors" and "fp16") and a config."""
    folder = tmp_path / "src" / "two"
    folder.mkdir(parents=True)
    weights = np.arange(256, dtype=np.float32).reshape(16, 16)
    save_file({"w": weights}, str(folder / "model.safetensors"))
    save_file({"w": weights.astype(np.float16)}, str(folder / "model.fp16.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


def tree(home: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(home)): (p.lstat().st_size, p.lstat().st_mtime) for p in home.rglob("*")}


def test_a_read_only_copy_of_a_store_is_another_node(tmp_path: Path, read_only: Mount) -> None:
    """An image with a store baked in, run twice: each copy is a node of its own in the fleet (known by the
    store's id alone, one pushed the other out), though a read-only store records nothing."""
    home = made_store(tmp_path)
    with Depot(home) as original:
        node_id = original.node_id
    baked = tmp_path / "baked"
    shutil.copytree(home, baked, symlinks=True)
    with Depot(read_only(baked)) as copy:
        assert copy.store.read_only and copy.node_id != node_id and len(copy.node_id) == 32
        mounted = copy.home
    with Depot(mounted) as again:
        assert again.node_id == copy.node_id


def test_a_read_only_store_of_the_schema_before_is_read_as_it_is(tmp_path: Path, read_only: Mount) -> None:
    """Schemas 9 to 14 added what reads do without (the linked files' modes, commits' listings kept, revisions'
    last uses, an index of blobs by size, when a repo was hidden on its upstream's word): a
    store baked with schema 8 is read
    where it cannot be upgraded (before, every new schema made a baked store unreadable until re-baked); one
    older than that is refused, saying how to upgrade it; once writable, it is upgraded."""
    from modeldepot.store.index import READABLE_FROM, SCHEMA_VERSION

    home = made_store(tmp_path)
    with closing(sqlite3.connect(home / "index.db")) as con:  # (as schema 8 left it)
        con.execute("DROP TABLE linked_sources")
        con.execute("DROP TABLE commit_listings")
        con.execute("DROP TABLE revision_access")
        con.execute("DROP INDEX blobs_by_size")
        con.execute("DROP TABLE evictions")
        con.execute("DROP INDEX blobs_not_ok")
        con.execute("ALTER TABLE repos DROP COLUMN hidden_at")
        con.execute("ALTER TABLE repos DROP COLUMN gated_only")
        con.execute("DROP TABLE ref_history")
        con.execute("ALTER TABLE refs DROP COLUMN tag")
        con.execute(f"PRAGMA user_version = {READABLE_FROM}")
        con.commit()
    with Depot(read_only(home)) as depot:
        assert depot.store.read_only
        weights = (tmp_path / "src" / "q" / "model-Q8_0.gguf").read_bytes()
        assert bytes(depot.get_file("acme/q", "model-Q8_0.gguf")) == weights
        # (what asked for the linked files' records failed: "no such table: linked_sources", an explorer's
        # trial; a node's /metrics and stats with them)
        assert depot.du().total_bytes > len(weights) and depot.budget_status().used_bytes > len(weights)
        assert depot.evictions() == []  # (no history in a schema before 15: none, not "no such table")
        summary = depot.store.repo_summary("acme/q")  # (no refs.tag, no repos.hidden_at: branches, not gated)
        assert (summary.tag_refs, summary.gated) == ((), False) and depot.store.origin("acme/q") is not None
    with closing(sqlite3.connect(home / "index.db")) as con:
        con.execute(f"PRAGMA user_version = {READABLE_FROM - 1}")
        con.commit()
    with pytest.raises(ReadOnlyStoreError, match="open it once where it is writable to upgrade it"):
        Depot(read_only(home))
    with closing(sqlite3.connect(home / "index.db")) as con:
        con.execute(f"PRAGMA user_version = {READABLE_FROM}")
        con.commit()
    with Depot(home) as depot:  # writable: upgraded
        assert depot.store.index.read("PRAGMA user_version")[0][0] == SCHEMA_VERSION
        # (it held blobs: links, maybe; none has another name, so none was linked in)
        assert depot.store.index.setting("links_unrecorded") is None
        assert depot.store.index.read("SELECT COUNT(*) FROM linked_sources")[0][0] == 0
        depot.remove("acme/q")


def test_a_store_on_a_read_only_mount_is_read_loaded_and_served(tmp_path: Path, read_only: Mount) -> None:
    home = made_store(tmp_path)
    before = tree(home)
    views_before = set(Path(tempfile.gettempdir()).glob("modeldepot-view-*"))
    with Depot(read_only(home)) as depot:
        assert depot.store.read_only
        assert {r.repo_id for r in depot.list_repos()} == {"acme/st", "acme/q", ONNX_REPO}
        weights = (tmp_path / "src" / "q" / "model-Q8_0.gguf").read_bytes()
        assert bytes(depot.get_file("acme/q", "model-Q8_0.gguf")) == weights
        with depot.open_file("acme/q", "model-Q4_K_M.gguf") as stream:
            assert len(stream.read()) == 300_000
        assert depot.file_path("acme/st", "model.safetensors").read_bytes()[:8]
        assert (depot.snapshot_path("acme/st") / "config.json").read_text() == '{"model_type": "test"}'
        tensors = depot.load("acme/st", engine="safetensors")
        np.testing.assert_array_equal(tensors["w"][1], np.arange(256, 512, dtype=np.float32))
        session = depot.load(
            ONNX_REPO, quant="fp16"
        )  # (real onnxruntime, through links made outside the store)
        assert session.get_inputs()[0].name == "x"
        # fp32 keeps its weights in external data, which onnxruntime refuses behind the snapshot's links
        # out of the folder: handed over mapped instead
        fp32 = depot.load(ONNX_REPO, quant="fp32")
        x = np.ones((2, 4), dtype=np.float32)
        np.testing.assert_allclose(fp32.run(None, {"x": x})[0], x @ ONNX_WEIGHT + ONNX_BIAS, rtol=1e-5)
        # (with providers chosen, too: a caller's own loader cannot reach that data here, an explorer's trial)
        chosen = depot.load(ONNX_REPO, quant="fp32", providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(chosen.run(None, {"x": x})[0], x @ ONNX_WEIGHT + ONNX_BIAS, rtol=1e-5)
        assert depot.preloader.preload("acme/q", quant="Q4_K_M").bytes > 300_000
        assert depot.verify().problems == ()
        assert depot.scrubber().scrub().blobs_checked == depot.du().blobs
        assert depot.sync() == depot.du().blobs  # (none flushed by its writer yet: flushed, not recorded)
        assert depot.budget_status().used_bytes == depot.du().blob_bytes
        # A model the image lacks (a typo): a NotFoundError naming it, as on any store, not only "it pulls
        # nothing" (`except NotFoundError` missed it: an explorer's trial)
        with pytest.raises(RepoNotFoundError, match=r"'acme/s' is not in the store.*read-only"):
            depot.load("acme/s", engine="safetensors")

        node = LiveNode(depot)
        try:
            with urllib.request.urlopen(f"{node.url}/api/depot/v1/info", timeout=10) as answer:
                assert json.loads(answer.read())["read_only"] is True
            cache = tmp_path / "hf-cache"
            path = hf_hub_download("acme/q", "model-Q8_0.gguf", cache_dir=cache, endpoint=node.url)
            assert Path(path).read_bytes() == weights
            folder = snapshot_download("acme/st", cache_dir=cache, endpoint=node.url)
            assert (Path(folder) / "config.json").read_text() == '{"model_type": "test"}'
        finally:
            node.stop()
    assert tree(home) == before, "nothing in the store changed"
    assert set(Path(tempfile.gettempdir()).glob("modeldepot-view-*")) == views_before, "no view left behind"


def open_blob_fds(home: Path) -> list[str]:
    """This process's open files under ``home``'s blobs."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith(str(home / "blobs")):
                found.append(target)
    return found


@pytest.mark.parametrize("strategy", ["page-cache", "memfd"])
def test_a_store_in_a_squashfs_image_is_read_preloaded_and_evicted(
    tmp_path: Path, mounts: Mounts, strategy: str
) -> None:
    """A store baked into a read-only image (squashfs: Apptainer, snaps, container layers), whose files have
    no flush (fdatasync is EINVAL): every eviction of the RAM tier raised, the model left its books with its
    file and pages still held, the node answered 500, and no preload that needed room could succeed again
    (an explorer's trial)."""
    home = mounts.squashfs(made_store(tmp_path))
    with Depot(home) as depot:
        assert depot.store.read_only
        q4 = depot.resolve("acme/q", "main")
        preloader = Preloader(depot, budget=600_000, strategy=strategy)
        try:
            preloader.preload("acme/q", quant="Q4_K_M")  # 300,000 bytes
            preloader.preload("acme/q", quant="Q8_0")  # 500,000 more: Q4_K_M makes way
            assert [(m.repo_id, m.variant) for m in preloader.stats().preloaded] == [("acme/q", "Q8_0")]
            assert not any("Q4" in target or q4 in target for target in open_blob_fds(home))
            assert preloader.evict("acme/q", quant="Q8_0") is True
            assert preloader.stats().models == 0 and open_blob_fds(home) == []
            assert preloader.preload("acme/q", quant="Q4_K_M").bytes >= 300_000  # and again, as ever
        finally:
            preloader.close()
        assert depot.verify().problems == ()
        assert depot.sync() == depot.du().blobs  # (a flush that has nothing to do is no failure)
        weights = (tmp_path / "src" / "q" / "model-Q8_0.gguf").read_bytes()
        assert bytes(depot.get_file("acme/q", "model-Q8_0.gguf")) == weights


def test_every_write_is_refused_first_and_clearly(tmp_path: Path, read_only: Mount) -> None:
    home = made_store(tmp_path)
    mounted = read_only(home)
    with Depot(mounted) as depot:
        writes = {  # (named as the user knows them: "import dir: do that where...", "set max size: ...")
            "an import": lambda: depot.import_dir(tmp_path / "src" / "st", "acme/new"),
            "a pull": lambda: depot.pull("acme/st"),
            "a removal": lambda: depot.remove("acme/q", quant="Q8_0"),
            "a pin": lambda: depot.pin("acme/st"),
            "gc": lambda: depot.gc(),
            "a disk budget": lambda: depot.set_max_size("1GiB"),
        }
        for what, write in writes.items():
            with pytest.raises(ReadOnlyStoreError, match="read-only file system") as caught:
                write()
            assert f"({what}: do that where the store is writable)" in str(caught.value), what
        assert {r.repo_id for r in depot.list_repos()} == {"acme/st", "acme/q", ONNX_REPO}
    runner = CliRunner()
    result = runner.invoke(cli, ["rm", "acme/q", "--yes", "--home", str(mounted)])
    assert result.exit_code != 0 and "read-only file system" in result.output, result.output
    asked = runner.invoke(cli, ["rm", "acme/q", "--home", str(mounted)])  # (said before any question)
    assert asked.exit_code != 0 and "read-only file system" in asked.output, asked.output
    listed = runner.invoke(cli, ["ls", "--home", str(mounted)])
    assert listed.exit_code == 0 and "acme/q" in listed.output, listed.output
    shown = runner.invoke(cli, ["budget", "--home", str(mounted)])  # (it suggested a command that fails)
    assert shown.exit_code == 0 and "none (the store is read-only here)" in shown.output, shown.output
    usage = runner.invoke(cli, ["du", "--home", str(mounted)])
    assert usage.exit_code == 0 and "(read-only here: served as it is)" in usage.output, usage.output


def test_a_corrupt_blob_is_refused_and_left_in_place(
    tmp_path: Path, read_only: Mount, caplog: pytest.LogCaptureFixture
) -> None:
    """Found corrupt on a read-only store: never served (a read, a node's client), nothing moved; a blob
    written before a restart and never checked is checked before its first read."""
    home = made_store(tmp_path)
    with Depot(home) as depot:
        changed = depot.file_info("acme/q", "model-Q8_0.gguf").sha256
        unchecked = depot.file_info("acme/st", "model.safetensors").sha256
    blob = home / "blobs" / changed[:2] / changed
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as handle:  # changed in place after it was stored: its mtime says so
        handle.seek(1000)
        handle.write(b"\0" * 64)
    zeroed = home / "blobs" / unchecked[:2] / unchecked
    os.chmod(zeroed, 0o644)
    stamp = zeroed.stat()
    zeroed.write_bytes(bytes(stamp.st_size))  # a power loss's zeros, its mtime put back
    os.utime(zeroed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with sqlite3.connect(home / "index.db") as con:  # written under a boot that has ended, never flushed
        con.execute("UPDATE blobs SET unflushed_boot = 'a-boot-gone' WHERE sha256 = ?", (unchecked,))
    con.close()
    before = tree(home)
    from modeldepot.server.fleet import HoldingsReader

    with Depot(read_only(home)) as depot:
        holdings = HoldingsReader(depot.store)  # (what a node tells its fleet it holds)
        first = holdings.poll()
        assert first is not None and changed in first
        for sha256, repo, path in (
            (changed, "acme/q", "model-Q8_0.gguf"),
            (unchecked, "acme/st", "model.safetensors"),
        ):
            for _ in range(2):  # (the second time from this process's memory: nothing was moved)
                with pytest.raises(CorruptBlobError) as caught:
                    depot.get_file(repo, path)
                assert caught.value.sha256 == sha256
                assert "the store is read-only, so it stays in place" in str(caught.value)
        node = LiveNode(depot)
        try:
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{node.url}/acme/q/resolve/main/model-Q8_0.gguf", timeout=30)
            refused.value.close()
            assert refused.value.code == 503 and refused.value.headers["X-Error-Code"] == "CorruptFile"
            # Nor named to the fleet any more, nor its chunks said held: every peer asked it, and got 503s
            # (an explorer's trial)
            held = holdings.poll()
            holdings.close()
            assert held is not None and changed not in held and unchecked not in held
            assert depot.file_info("acme/q", "config.json").sha256 in held
            with pytest.raises(urllib.error.HTTPError) as unheld:
                urllib.request.urlopen(f"{node.url}/api/depot/v1/blobs/{changed}/chunks", timeout=30)
            unheld.value.close()
            assert unheld.value.code == 404
        finally:
            node.stop()
        with pytest.raises(CorruptBlobError):  # (a loader's folder: its links lead to the bad bytes)
            depot.snapshot_path("acme/st")
        assert bytes(depot.get_file("acme/q", "config.json")) == b"{}"  # the rest is served
        assert depot.du().quarantine_bytes == 0
    assert "quarantined; pull it again" not in caplog.text  # (nothing was)
    assert tree(home) == before, "nothing moved"
    assert hashlib.sha256(blob.read_bytes()).hexdigest() != changed


def test_a_corrupt_blob_repaired_where_the_store_is_writable_is_served_again(
    tmp_path: Path, read_only: Mount
) -> None:
    """A node on a read-only view refused a blob it found corrupt for as long as it ran, after the owner
    repaired it as the log said (verify, then an import again): the refusal was of the content, not of the
    placement found bad (a trial)."""
    home = made_store(tmp_path)
    with Depot(home) as depot:
        sha256 = depot.file_info("acme/q", "model-Q8_0.gguf").sha256
    blob = home / "blobs" / sha256[:2] / sha256
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\0" * 64)
    with Depot(read_only(home)) as reader:
        with pytest.raises(CorruptBlobError):
            reader.get_file("acme/q", "model-Q8_0.gguf")
        with Depot(home) as owner:  # the repair, where the store is writable
            assert not owner.verify().ok
            owner.import_dir(tmp_path / "src" / "q", "acme/q")
            assert owner.verify().ok
        data = bytes(reader.get_file("acme/q", "model-Q8_0.gguf"))
        assert hashlib.sha256(data).hexdigest() == sha256


def test_a_store_copied_while_open_is_read_with_its_log_or_says_how_to_open_it(
    tmp_path: Path, read_only: Mount
) -> None:
    """Copied while a process had it open (a write-ahead log not merged): with the log's shared-memory file
    beside it, it is read as it is, the log included; without it (which cannot be made on a read-only
    mount), the error says what to do."""
    home = made_store(tmp_path)
    con = sqlite3.connect(home / "index.db")
    try:
        con.execute("PRAGMA wal_autocheckpoint=0")
        con.execute("INSERT INTO settings VALUES ('copied-while-open', '1')")
        con.commit()
        shutil.copytree(home, tmp_path / "copied", symlinks=True)
        shutil.copytree(home, tmp_path / "copied-without-shm", symlinks=True)
    finally:
        con.close()
    assert (tmp_path / "copied" / "index.db-wal").stat().st_size > 0
    with Depot(read_only(tmp_path / "copied")) as depot:
        assert depot.store.read_only and depot.store.index.setting("copied-while-open") == "1"
    (tmp_path / "copied-without-shm" / "index.db-shm").unlink()
    with pytest.raises(ReadOnlyStoreError, match=r"not closed cleanly.*open it once where it is writable"):
        Depot(read_only(tmp_path / "copied-without-shm"))


def test_a_read_only_view_of_a_store_written_elsewhere_follows_it(tmp_path: Path, read_only: Mount) -> None:
    """A `:ro` volume of a store another container writes: this side reads what the writer commits, before
    and after the writer opened it (read as immutable, a store that changed underneath read as corrupt)."""
    home = made_store(tmp_path)
    with Depot(read_only(home)) as reader:
        assert {r.repo_id for r in reader.list_repos()} == {"acme/st", "acme/q", ONNX_REPO}
        with Depot(home, chunk_size=SMALL_CHUNK) as writer:
            for number in range(30):
                writer.import_dir(tmp_path / "src" / "st", f"acme/more-{number}")
            assert len(reader.list_repos()) == 33  # (while the writer has it open)
        assert len(reader.list_repos()) == 33
        assert bytes(reader.get_file("acme/more-29", "config.json")) == b'{"model_type": "test"}'


def test_a_read_only_view_follows_a_writer_that_came_and_went_between_two_looks(
    tmp_path: Path, read_only: Mount
) -> None:
    """An admin's one CLI command on a store a node (or a long-lived process) reads read-only: the writer
    made the index's shared-memory file and removed it as it closed, before the reader looked again, and the
    reader's immutable connections kept the old pages for good: a moved branch was served at its old commit
    on one thread and its new one on another, and a repo removed and collected read as corrupt (a trial)."""
    home = made_store(tmp_path)
    with Depot(read_only(home)) as reader:
        node = LiveNode(reader)
        try:
            before = json.loads(urllib.request.urlopen(f"{node.url}/api/models/acme/st", timeout=10).read())
            assert bytes(reader.get_file("acme/st", "config.json")) == b'{"model_type": "test"}'
            moved = tmp_path / "moved"
            moved.mkdir()
            (moved / "config.json").write_bytes(b'{"model_type": "moved"}')
            with Depot(home, chunk_size=SMALL_CHUNK) as writer:
                commit = writer.import_dir(moved, "acme/st").commit_id
            assert not Path(f"{home}/index.db-shm").exists()  # (the writer came and went)
            assert reader.resolve("acme/st") == commit != before["sha"]
            assert bytes(reader.get_file("acme/st", "config.json")) == b'{"model_type": "moved"}'
            for _ in range(8):  # (the node's worker threads, each with its own connection)
                info = json.loads(urllib.request.urlopen(f"{node.url}/api/models/acme/st", timeout=10).read())
                assert info["sha"] == commit
            with Depot(home) as writer:
                writer.remove("acme/st")
                writer.gc()
            with pytest.raises(RepoNotFoundError):
                reader.get_file("acme/st", "config.json")
        finally:
            node.stop()


def test_a_node_on_a_read_only_view_lists_what_the_writer_adds(tmp_path: Path, read_only: Mount) -> None:
    """The node's lists are kept while the index's version stands: a version read on the view's immutable
    connection never moved, and a node served the list of before the writer came, for good."""
    home = made_store(tmp_path)
    with Depot(read_only(home)) as reader:
        node = LiveNode(reader)
        try:
            listed = json.loads(urllib.request.urlopen(f"{node.url}/api/depot/v1/repos", timeout=10).read())
            assert len(listed) == 3
            with Depot(home, chunk_size=SMALL_CHUNK) as writer:
                writer.import_dir(tmp_path / "src" / "st", "acme/added-later")
                repos = json.loads(
                    urllib.request.urlopen(f"{node.url}/api/depot/v1/repos", timeout=10).read()
                )
                models = json.loads(urllib.request.urlopen(f"{node.url}/api/models", timeout=10).read())
                info = json.loads(
                    urllib.request.urlopen(f"{node.url}/api/models/acme/added-later", timeout=10).read()
                )
            assert "acme/added-later" in {r["repo_id"] for r in repos}
            assert "acme/added-later" in {m["id"] for m in models}
            assert {s["rfilename"] for s in info["siblings"]} >= {"config.json"}
        finally:
            node.stop()


def test_modeldepot_serve_on_a_read_only_store_with_a_budget(tmp_path: Path, read_only: Mount) -> None:
    """`serve` brings a store over its budget within it when it starts: not a read-only one, which it
    serves as it is (it failed to start)."""
    home = made_store(tmp_path)
    with Depot(home) as depot:
        depot.set_max_size("1MiB")  # (the store holds more)
    mounted, port = read_only(home), free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "modeldepot", "serve", "--home", str(mounted), "--port", str(port),
             "--scrub-interval", "off"], env=base_env(), stdout=subprocess.DEVNULL, stderr=errors,
        )  # fmt: skip
    try:
        wait_for_port(port, 60, process=process)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/acme/q/resolve/main/config.json", timeout=10
        ) as got:
            assert got.read() == b"{}"
    finally:
        process.terminate()
        process.wait(30)
    assert "the store is on a read-only file system" in log.read_text(), log.read_text()


def test_a_store_pulled_with_the_cli_and_synced_is_served_read_only(
    tmp_path: Path, read_only: Mount, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The image-baking path: `modeldepot pull` then `modeldepot sync` in a build step, the store mounted
    read-only elsewhere (another boot). A pull leaves its marks (a lock file per repo pulled, a write-ahead
    log its threads' connections kept), and the store opened read-only all the same: status, info, a scan,
    no rehash of what sync made durable, no pull, and loads without a writable temporary folder."""
    with Depot(tmp_path / "upstream") as upstream:
        upstream.import_dir(made_source(tmp_path), "acme/q")
        node = LiveNode(upstream)
        try:
            env = base_env(HF_ENDPOINT=node.url)
            home = tmp_path / "baked"
            modeldepot("pull", "acme/q", "--quant", "safetensors", "--home", str(home), env=env)
            unsynced = tmp_path / "unsynced"
            shutil.copytree(home, unsynced, symlinks=True)  # (as a build step without `sync` leaves it)
            modeldepot("sync", "--home", str(home), env=env)
            mounted = read_only(home)
            monkeypatch.setenv("MODELDEPOT_BOOT_ID", "another-machine")
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", node.url)
            views = tmp_path / "no-temp"
            views.mkdir()
            monkeypatch.setattr(tempfile, "tempdir", str(read_only(views)))  # (a read-only /tmp)
            with Depot(mounted) as depot:
                assert depot.store.read_only and depot.store.durability.unchecked() == 0
                manifest = depot.get_manifest("acme/q")
                statuses = {v.name: v.status for v in manifest.variants}
                assert statuses == {"safetensors": "downloaded", "fp16": "available"}
                assert depot.scan_repo("acme/q").commit_id == manifest.commit_id  # (shown, not kept)
                with pytest.raises(ReadOnlyStoreError):
                    asyncio.run(depot.pull_async("acme/q", ["fp16"], manifest=manifest))
                with pytest.raises(NotFoundError, match=r"pulling it failed too: .* it pulls nothing"):
                    depot.load("acme/q", quant="fp16", engine="safetensors")  # (missing: it would pull)
                assert depot.load("acme/q", quant="safetensors", engine="safetensors")["w"].shape == (16, 16)
            for command in (["status", "acme/q"], ["info", "acme/q"], ["ls"]):
                done = modeldepot(*command, "--home", str(mounted), env=env)
                assert "Traceback" not in done.stderr, done.stderr
            caplog.set_level(logging.WARNING, logger="modeldepot.store.durability")
            with Depot(
                read_only(unsynced)
            ) as depot:  # not synced: checked at first read, said how to avoid it
                assert depot.store.durability.unchecked() > 0 and depot.store.durability._thread is None
                assert "modeldepot sync" in caplog.text
                assert bytes(depot.get_file("acme/q", "config.json")) == b"{}"
        finally:
            node.stop()


def test_sync_of_a_read_only_store_flushes_its_writers_blobs(tmp_path: Path, read_only: Mount) -> None:
    """`modeldepot sync` where the store is read-only (another user's, a build step's still in the page
    cache) was refused, exit 1: the kernel can flush what its writer left all the same; only the record of
    it waits for the writer (so a power loss costs a rehash there, never an unchecked byte)."""
    home = tmp_path / "store"
    env = base_env()
    modeldepot("import", str(made_source(tmp_path)), "--repo", "acme/q", "--home", str(home), env=env)
    with sqlite3.connect(f"file:{home / 'index.db'}?mode=ro", uri=True) as con:  # (a Depot would flush them)
        unflushed = con.execute("SELECT count(*) FROM blobs WHERE unflushed_boot IS NOT NULL").fetchone()[0]
    con.close()
    assert unflushed == 3, "an import leaves its flush to the background (or to the next process)"
    mounted = read_only(home)
    before = tree(home)
    done = modeldepot("sync", "--json", "--home", str(mounted), env=env)
    assert json.loads(done.stdout) == {"flushed": unflushed, "checked": 0, "corrupt": [], "read_only": True}
    said = modeldepot("sync", "--home", str(mounted), env=env).stdout
    assert "3 blobs flushed to disk (the store is read-only here: its writer's next sync" in said, said
    assert tree(home) == before, "nothing in the store changed"
    assert json.loads(modeldepot("sync", "--json", "--home", str(home), env=env).stdout)["flushed"] == 3
    assert "everything was already on disk" in modeldepot("sync", "--home", str(mounted), env=env).stdout


def test_a_read_only_node_refuses_pulls_with_503_and_does_not_mirror(
    tmp_path: Path, read_only: Mount
) -> None:
    home = made_store(tmp_path)
    with Depot(read_only(home)) as depot:
        node = LiveNode(depot, token="secret", mirror=True)
        try:
            request = urllib.request.Request(
                f"{node.url}/api/depot/v1/pulls", data=json.dumps({"repo": "acme/q"}).encode(), method="POST",
                headers={"Authorization": "Bearer secret", "Content-Type": "application/json"},
            )  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            refused.value.close()
            assert (refused.value.code, refused.value.headers["X-Error-Code"]) == (503, "ReadOnlyStore")
        finally:
            node.stop()


def test_a_store_whose_disk_turned_read_only_under_it_is_read_served_and_says_so(
    tmp_path: Path, mounts: Mounts
) -> None:
    """ext4 after a disk error (errors=remount-ro) refuses every write while its mount still says
    read-write: every command crashed on its first write with a traceback, a node restarted there died,
    and the node running answered writes 500 ("disk I/O error"), its health "ok" (an explorer's trial)."""
    disk = mounts.ext4("64M")
    home = made_store(disk)
    with Depot(home) as depot:
        node = LiveNode(depot, token="secret")
        try:
            mounts.fail_ext4(disk)
            with urllib.request.urlopen(f"{node.url}/api/depot/v1/health", timeout=30) as answer:
                health = json.load(answer)
            assert health["status"] == "degraded" and "refuses writes" in health["detail"], health
            pin = urllib.request.Request(f"{node.url}/api/depot/v1/repos/acme/st/pin", method="PUT",
                                         headers={"Authorization": "Bearer secret"})  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(pin, timeout=30)
            refused.value.close()
            assert (refused.value.code, refused.value.headers["X-Error-Code"]) == (503, "ReadOnlyStore")
            with pytest.raises(ReadOnlyStoreError, match="refuses writes, though mounted read-write"):
                depot.pin("acme/q")
            served = hf_hub_download(
                "acme/st", "config.json", endpoint=node.url, cache_dir=tmp_path / "hf", token="secret"
            )
            assert Path(served).read_text() == '{"model_type": "test"}'
        finally:
            node.stop()
    # Opened again (a command, a node restarted): read as it is, every write refused first and clearly
    with Depot(home) as again:
        assert again.store.read_only and "refuses writes" in str(again.store.read_only_reason)
        assert bytes(again.get_file("acme/st", "config.json")) == b'{"model_type": "test"}'
        with pytest.raises(ReadOnlyStoreError, match="refuses writes"):
            again.pin("acme/st")
    listed = CliRunner().invoke(cli, ["ls", "--home", str(home)])
    assert listed.exit_code == 0 and "acme/st" in listed.output, listed.output


def test_a_look_at_whether_the_disk_refuses_writes_keeps_sqlites_locks(tmp_path: Path) -> None:
    """The look opened and closed index.db, whose POSIX locks SQLite's connections in the process hold: a
    close of any descriptor of the file drops them, and another process closing the store took itself for
    its last user and deleted the live log under the node (its health probe looked each time: a review)."""
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "src", {"config.json": b"{}"}), "acme/a")
        wal = home / "index.db-wal"
        assert wal.exists()
        assert not refuses_writes(home)  # (what a node's health looks at, each time)
        other = (f"import sqlite3; c = sqlite3.connect({str(home / 'index.db')!r}); "
                 "c.execute('SELECT COUNT(*) FROM sqlite_master').fetchone(); c.close()")  # fmt: skip
        subprocess.run([sys.executable, "-c", other], check=True)
        assert wal.exists(), "another process deleted the log of a store open here"
        depot.import_dir(write_model_dir(tmp_path / "src2", {"config.json": b"[1]"}), "acme/b")
    with Depot(home) as again:
        assert {repo.repo_id for repo in again.list_repos()} == {"acme/a", "acme/b"}


def test_a_store_made_on_a_read_only_mount_is_not_said_to_be_on_a_failed_disk(
    tmp_path: Path, read_only: Mount
) -> None:
    (tmp_path / "empty").mkdir()
    view = read_only(tmp_path / "empty")
    with pytest.raises(ReadOnlyStoreError, match="on a read-only file system") as refused:
        Depot(view / "store")
    assert "fsck" not in str(refused.value)


def test_a_store_whose_mount_turned_writable_says_the_process_must_start_again(
    tmp_path: Path, read_only: Mount
) -> None:
    """A node started on a read-only mount kept refusing every write once the mount was read-write again,
    saying the file system was read-only (an explorer's trial): the refusal says to start it again."""
    view = read_only(made_store(tmp_path))
    with Depot(view) as depot:
        with pytest.raises(ReadOnlyStoreError) as before:
            depot.pin("acme/st")
        assert "writable now" not in str(before.value)
        subprocess.run(["mount", "-o", "remount,bind,rw", str(view)], check=True)
        with pytest.raises(
            ReadOnlyStoreError, match=r"when this process opened it \(it is writable now: start it again"
        ):
            depot.pin("acme/st")
    with Depot(view) as again:  # (started again: it writes there)
        again.pin("acme/st")
        assert [pin.repo_id for pin in again.pins()] == ["acme/st"]


ANOTHER_USERS_READER = """
import json, sys
import numpy as np
from modeldepot import Depot, ReadOnlyStoreError
home, repo, weight, bias = sys.argv[1], sys.argv[2], np.array(json.loads(sys.argv[3]), np.float32), \\
    np.array(json.loads(sys.argv[4]), np.float32)
with Depot(home) as depot:
    print("reason:", depot.store.read_only_reason)
    print("pins:", [p.repo_id for p in depot.pins()])
    print("config:", bytes(depot.get_file("acme/st", "config.json")).decode())
    print("tensors:", sorted(depot.load("acme/st", engine="safetensors")))
    session = depot.load(repo, quant="fp32")
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight + bias, rtol=1e-5)
    print("onnx: ok")
    for write in (lambda: depot.pin("acme/st"), lambda: depot.pull("acme/st"), lambda: depot.gc()):
        try:
            write()
        except ReadOnlyStoreError as error:
            print("refused:", error)
"""


def test_a_store_another_user_owns_is_read_as_it_is(tmp_path: Path) -> None:
    """A store an admin fills (root's /opt/models, another user's cache: huggingface_hub#2797) read by a user
    who may not write it: read, loaded and listed as a read-only mount's, writes refused with the reason,
    nothing created there; while its owner has it open and writes, what the owner commits is seen. It was a
    PermissionError on the index's setup lock."""
    home = made_store(tmp_path)
    owner = 12345
    with Depot(home) as writer:
        writer.pin("acme/q")  # the owner's process has the index open: its -shm file is there
        writer.store.durability.close()  # (its background flush would write the index during the test)
        writer.sync()
        for path in [home, *home.rglob("*")]:
            os.chown(path, owner, owner, follow_symlinks=False)
        assert Path(f"{home}/index.db-shm").exists()
        before = tree(home)
        env = base_env(PYTHONDONTWRITEBYTECODE="1")
        args = [str(home), ONNX_REPO, json.dumps(ONNX_WEIGHT.tolist()), json.dumps(ONNX_BIAS.tolist())]
        done = subprocess.run([*WITHOUT_OVERRIDE, sys.executable, "-c", ANOTHER_USERS_READER, *args], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == f"reason: not writable by this user (root; {home} belongs to uid {owner})", lines
        assert "pins: ['acme/q']" in lines, "what the owner committed is seen"
        assert 'config: {"model_type": "test"}' in lines and "tensors: ['w']" in lines and "onnx: ok" in lines
        refusals = [line for line in lines if line.startswith("refused:")]
        assert len(refusals) == 3 and all("not writable by this user" in line for line in refusals), refusals
        removed = subprocess.run([*WITHOUT_OVERRIDE, sys.executable, "-m", "modeldepot", "rm", "acme/q",
                                  "--home", str(home)], env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert removed.returncode != 0 and "not writable by this user" in removed.stderr + removed.stdout
        assert tree(home) == before, "nothing in the store changed"


OPENING = "import sys\nfrom modeldepot import Depot\nDepot(sys.argv[1], create=False)"


@pytest.mark.parametrize("mode", [0o700, 0o711])
def test_a_store_this_user_may_not_read_is_said_so(tmp_path: Path, mode: int) -> None:
    """Another user's store (an admin's, umask 077) as --home, or named in MODELDEPOT_SHARED: it was a
    PermissionError traceback on every command (0o700: the index cannot even be looked at; 0o711: SQLite
    cannot open it). As --home: an error naming the owner. Shared: left out, said, the own store used."""
    home = made_store(tmp_path)
    for path in [home, *home.rglob("*")]:
        os.chown(path, 12345, 12345, follow_symlinks=False)
        if not path.is_symlink():
            path.chmod(mode if path.is_dir() else 0o600)
    Depot(tmp_path / "user", chunk_size=SMALL_CHUNK).close()

    def as_user(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*WITHOUT_OVERRIDE, sys.executable, "-m", "modeldepot", *args],
                              env=base_env(PYTHONDONTWRITEBYTECODE="1", **env), capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    own = as_user("ls", "--home", str(home))  # (the folder itself: the CLI says so)
    assert own.returncode == 2 and "Traceback" not in own.stderr and "is not readable" in own.stderr, (
        own.stderr
    )
    opened = subprocess.run([*WITHOUT_OVERRIDE, sys.executable, "-c", OPENING, str(home)], env=base_env(),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    said = opened.stderr.strip().splitlines()[-1]
    assert said.startswith(
        f"modeldepot.errors.StoreError: the store at {home} is not readable by this user (root"
    )
    assert "uid 12345" in said
    shared = as_user("ls", "--home", str(tmp_path / "user"), MODELDEPOT_SHARED=str(home))
    assert shared.returncode == 0 and "Traceback" not in shared.stderr, shared.stderr
    assert f"MODELDEPOT_SHARED: {home} is left out: the store at {home} is not readable" in shared.stderr
    path = as_user(
        "path", "acme/st", "config.json", "--home", str(tmp_path / "user"), MODELDEPOT_SHARED=str(home)
    )
    assert path.returncode == 1 and "error: repo 'acme/st' is not in the store" in path.stderr, path.stderr


def test_a_copy_that_lost_its_file_times_is_said_once_as_it_costs_a_rehash(
    tmp_path: Path, read_only: Mount, caplog: pytest.LogCaptureFixture
) -> None:
    """A store copied with `cp -r` (file times not kept): every blob newer than its record, rehashed at its
    first read in every process, unsaid (an explorer's trial). Said once, the copy's fix named."""
    home = made_store(tmp_path)
    later = time.time() + 5
    for blob in (home / "blobs").rglob("*"):
        if blob.is_file():
            os.utime(blob, (later, later))
    with caplog.at_level(logging.WARNING, logger="modeldepot.store.store"), Depot(read_only(home)) as depot:
        assert bytes(depot.get_file("acme/st", "config.json")) == b'{"model_type": "test"}'
        assert len(bytes(depot.get_file("acme/q", "model-Q8_0.gguf"))) == 500_000
    said = [r.getMessage() for r in caplog.records if "newer than the store's record" in r.getMessage()]
    assert len(said) == 1 and "copy a store with `cp -a`" in said[0], said


def test_a_copy_that_followed_links_is_said_so_by_reads_and_verify(tmp_path: Path, read_only: Mount) -> None:
    """A store shipped by a tool that follows links (`cp -rL`, a bucket sync): its snapshot folders hold files
    where links belong; every path read on the read-only mount failed "incomplete: modeldepot verify", and
    verify there said ok (an explorer's trial). Both say what happened, verify exits 1."""
    home = made_store(tmp_path)
    with Depot(home, create=False) as depot:
        folder = depot.snapshot_path("acme/st")
    link = folder / "config.json"
    copied = link.read_bytes()
    link.unlink()
    link.write_bytes(copied)
    mounted = read_only(home)
    with Depot(mounted) as depot:
        with pytest.raises(ReadOnlyStoreError, match=r"a copy of the store that followed links.*`cp -a`"):
            depot.snapshot_path("acme/st")
        assert bytes(depot.get_file("acme/st", "config.json")) == copied  # (read by the blob, as ever)
    checked = CliRunner().invoke(cli, ["verify", "--home", str(mounted)])
    assert checked.exit_code == 1 and "followed links" in " ".join(checked.output.split()), checked.output
    # An export from the read-only mount copies (no link crosses it), and says so: each container's start
    # copied each model whole, unsaid (an explorer's trial)
    exported = CliRunner().invoke(
        cli, ["hf-cache", "export", "acme/q", "--cache-dir", str(tmp_path / "hf"), "--home", str(mounted)]
    )
    said = " ".join(exported.output.split())
    assert exported.exit_code == 0 and "0 hard-linked" in said and "could not be hard-linked" in said, said


def test_verify_says_a_blob_this_user_may_not_read_and_checks_the_rest(tmp_path: Path) -> None:
    """A copied image's blob of another owner (mode 0600): `verify` stopped at it with a PermissionError
    traceback, nothing else checked (an explorer's trial). Said as unreadable, not quarantined (its bytes
    may be good), the rest checked, exit 1."""
    home = made_store(tmp_path)
    with Depot(home, create=False) as depot:
        blob = depot.store.blobs.path(depot.file_info("acme/st", "model.safetensors").sha256)
        total = len(depot.store.index.read("SELECT 1 FROM blobs"))
    os.chown(blob, 12345, 12345)
    blob.chmod(0o600)
    checked = subprocess.run([*WITHOUT_OVERRIDE, sys.executable, "-m", "modeldepot", "verify", "--home", str(home)],
                             env=base_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert checked.returncode == 1 and "Traceback" not in checked.stderr, checked.stderr
    said = " ".join(checked.stderr.split())
    assert "unreadable blob" in said and "this user may not read its file" in said and "uid 12345" in said, (
        said
    )
    assert f"checked {total} blobs" in " ".join((checked.stdout + checked.stderr).split()), checked.stdout
    assert blob.exists(), "not quarantined: its bytes may be good"
    # An export of it says the store's blob, not "cannot write … in the Hugging Face cache: None" (a trial)
    exported = subprocess.run([*WITHOUT_OVERRIDE, sys.executable, "-m", "modeldepot", "hf-cache", "export", "acme/st",
                               "--copy", "--cache-dir", str(tmp_path / "hf"), "--home", str(home)],
                              env=base_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    said = " ".join(exported.stderr.split())
    assert exported.returncode == 1 and "Traceback" not in said and "None" not in said, said
    assert "uid 12345" in said and "Hugging Face cache" not in said.split("uid 12345")[0], said


def test_an_upgrade_under_a_running_process_of_the_old_version_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Any command of a new version upgrades the store's index as it opens it: a node of the old version left
    running went on by its old rules without a word (its uses recorded where the new disk budget does not
    read them, which then evicted the model it served: an explorer's trial). The upgrade says which
    processes hold the index open."""
    from modeldepot.store.index import SCHEMA_VERSION

    home = made_store(tmp_path)
    with closing(sqlite3.connect(home / "index.db")) as con:  # (as schema 12 left it)
        con.execute("DROP TABLE evictions")
        con.execute("DROP INDEX blobs_not_ok")
        con.execute("ALTER TABLE repos DROP COLUMN hidden_at")
        con.execute("ALTER TABLE repos DROP COLUMN gated_only")
        con.execute("DROP TABLE ref_history")
        con.execute("ALTER TABLE refs DROP COLUMN tag")
        con.execute("PRAGMA user_version = 12")
        con.commit()
    old_node = subprocess.Popen(
        [sys.executable, "-c", f"import sys\nindex = open({str(home / 'index.db')!r}, 'rb')\nprint('open', "
         "flush=True)\nsys.stdin.read()\n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert old_node.stdout is not None and old_node.stdout.readline().strip() == "open"
        with caplog.at_level(logging.WARNING, logger="modeldepot.store.index"), Depot(home) as depot:
            assert depot.store.index.schema == SCHEMA_VERSION
        said = " ".join(r.getMessage() for r in caplog.records)
        assert (
            f"process(es) {old_node.pid} hold it open" in said and "restart it with this version" in said
        ), said
    finally:
        old_node.communicate("", timeout=60)
    caplog.clear()
    with Depot(home) as depot:  # (upgraded: said once)
        assert depot.list_repos()
    assert not [r for r in caplog.records if "upgraded" in r.getMessage()]


def team_store(
    tmp_path: Path, group: int
) -> tuple[Path, Callable[..., subprocess.CompletedProcess[str]]]:  # fmt: skip
    """A store's home in a folder of ``group`` with its setgid bit, and a runner of `modeldepot ARGS --home
    HOME` as a member of it (umask 002, unless given ``umask=``), played by uid 0 without its powers over
    files."""
    team = tmp_path / "team"
    team.mkdir()
    os.chown(team, -1, group)
    team.chmod(0o2775)
    env = base_env(PYTHONDONTWRITEBYTECODE="1")
    home = team / "store"

    def as_member(*args: str, umask: str = "002") -> subprocess.CompletedProcess[str]:
        command = " ".join(
            shlex.quote(a) for a in [sys.executable, "-m", "modeldepot", *args, "--home", str(home)]
        )
        return subprocess.run([*WITHOUT_OVERRIDE, f"--regid={group}", f"--groups={group}", "sh", "-c",
                               f"umask {umask} && exec {command}"], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    return home, as_member


def test_a_store_a_group_shares_is_written_by_each_member(tmp_path: Path) -> None:
    """A team's store in a setgid folder, its members' umask 002 (as a shared Hugging Face cache is kept):
    SQLite made index.db 0o644 whatever the umask, and the store was read-only to every member but the one
    who made it (an explorer's trial). Another member is played by uid 0 without its powers over files, once
    the files are given to another owner of the group."""
    group, owner = 4242, 12345
    home, as_member = team_store(tmp_path, group)
    folder = write_model_dir(tmp_path / "src", {"config.json": b'{"a": 1}', "x.txt": b"hi"})

    made = as_member("import", str(folder), "--repo", "team/a")
    assert made.returncode == 0, made.stderr
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        if (home / name).exists():
            assert (home / name).stat().st_mode & 0o777 == 0o664, name
    for path in [home, *home.rglob("*")]:  # (the first member's, now)
        os.chown(path, owner, -1, follow_symlinks=False)
    second = as_member("import", str(folder), "--repo", "team/b")
    assert second.returncode == 0, second.stderr
    listed = as_member("ls", "--json")
    assert sorted(r["repo_id"] for r in json.loads(listed.stdout)) == ["team/a", "team/b"]


@pytest.mark.parametrize("umask", ["022", "077"])
def test_a_member_whose_umask_keeps_the_group_out_still_makes_what_the_group_writes(
    tmp_path: Path, umask: str
) -> None:
    """One member's umask 022 (most systems' default, systemd's UMask) in a store a group shares: the files
    it made were the others' to read only, and their rm failed halfway, gc at the same file every time,
    and the error said `sudo chown -R` the whole store to them (an explorer's trial); with 077 the group's
    write alone made folders 0720, which the others could not enter (a review). The command line gives the
    group what the owner has, whatever the umask."""
    group, owner = 4244, 12347
    home, as_member = team_store(tmp_path, group)
    folder = write_model_dir(tmp_path / "src", {"config.json": b'{"a": 1}', "w.bin": os.urandom(100_000)})
    made = as_member("import", str(folder), "--repo", "team/a", umask=umask)
    assert made.returncode == 0, made.stderr
    for path in [home, *home.rglob("*")]:
        mode = path.lstat().st_mode
        # (the disk reserve's own files are its maker's alone, whatever the umask)
        if not stat.S_ISLNK(mode) and "reserve" not in path.relative_to(home).parts:
            assert mode & 0o070 == (mode & 0o700) >> 3, f"{path}: {oct(mode)}"
    for path in [home, *home.rglob("*")]:  # (that member's; another removes what it made)
        os.chown(path, owner, -1, follow_symlinks=False)
    removed = as_member("rm", "team/a", "--yes")
    assert removed.returncode == 0, removed.stderr
    collected = as_member("gc")
    assert collected.returncode == 0, collected.stderr
    assert not [p for p in (home / "blobs").rglob("*") if p.is_file()]


def test_the_groups_umask_stays_in_the_store(tmp_path: Path) -> None:
    """The umask is the process's: `hf-cache export` from a store a group shares made the user's own Hugging
    Face cache group-writable (refs/main 0664, snapshots/ 0775: others of a shared primary group could
    repoint a ref, a review). What the command writes outside the store takes the user's own umask."""
    group = 4246
    _, as_member = team_store(tmp_path, group)
    folder = write_model_dir(tmp_path / "src", {"config.json": b'{"a": 1}'})
    assert as_member("import", str(folder), "--repo", "team/a").returncode == 0
    cache = tmp_path / "mine"
    cache.mkdir()
    cache.chmod(0o755)
    exported = as_member("hf-cache", "export", "team/a", "--cache-dir", str(cache / "hub"), umask="022")
    assert exported.returncode == 0, exported.stderr
    loose = [f"{p}: {oct(p.lstat().st_mode)}" for p in cache.rglob("*")
             if not stat.S_ISLNK(p.lstat().st_mode) and p.lstat().st_mode & stat.S_IWGRP]  # fmt: skip
    assert not loose, loose


def test_a_group_store_made_before_gets_the_groups_write_when_its_maker_opens_it(tmp_path: Path) -> None:
    """A store a group shares, made before its index took the umask (index.db 0o644): the README's advice
    was a `chmod g+w index.db*` by hand. Opened by the member who made it, the index files get the group's
    write, and another member writes the store."""
    group, owner = 4243, 12346
    home, as_member = team_store(tmp_path, group)
    folder = write_model_dir(tmp_path / "src", {"config.json": b'{"a": 1}'})

    assert as_member("import", str(folder), "--repo", "team/a").returncode == 0
    old = [home / n for n in ("index.db", "index.db-wal", "index.db-shm") if (home / n).exists()]
    for path in old:
        path.chmod(0o644)  # (as SQLite made them)
    opened = as_member("import", str(folder), "--repo", "team/a")  # (its maker, again: nothing new)
    assert opened.returncode == 0, opened.stderr
    assert {p.name: p.stat().st_mode & 0o777 for p in old} == {p.name: 0o664 for p in old}
    for path in [home, *home.rglob("*")]:
        os.chown(path, owner, -1, follow_symlinks=False)
    second = as_member("import", str(folder), "--repo", "team/b")
    assert second.returncode == 0, second.stderr


def test_the_groups_write_is_not_given_through_a_link_a_member_put_in_the_store(tmp_path: Path) -> None:
    """Any member may put a link in the group's folder, named as an index file: the maker's next command
    gave the group write on whatever file of the maker's it named (a review). Links are not followed."""
    from modeldepot.store.index import _share_with_the_group

    store = tmp_path / "team"
    store.mkdir()
    store.chmod(0o2775)
    victim = tmp_path / "victim"
    victim.write_text("the maker's own file")
    victim.chmod(0o644)
    (store / "index.db").write_bytes(b"")
    (store / "index.db").chmod(0o644)
    (store / "index.db-wal").symlink_to(victim)
    before = os.umask(0o002)
    try:
        _share_with_the_group(store / "index.db")
    finally:
        os.umask(before)
    assert victim.stat().st_mode & 0o777 == 0o644
    assert (store / "index.db").stat().st_mode & 0o777 == 0o664  # (the index itself, as before)


def test_the_mode_files_are_given_back_follows_the_umask() -> None:
    """A download file made read-only for its flush and then not placed is given back the mode the umask says
    (it was 0o644 whatever the umask: another member of a group could not resume it)."""
    from modeldepot.store.layout import writable_mode

    before = os.umask(0o002)
    try:
        assert writable_mode() == 0o664
    finally:
        os.umask(before)
    assert writable_mode() == 0o666 & ~before


def test_a_whole_repo_pull_on_a_read_only_store_is_refused_before_any_scan(
    tmp_path: Path, read_only: Mount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pull REPO` (every variant: it scans first, to say what it takes) asked the Hub before it said the store
    was read-only, and failed on an unreachable Hub with that error instead (a review's trial)."""
    from click.testing import CliRunner

    mounted = read_only(made_store(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MODELDEPOT_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    result = CliRunner().invoke(cli, ["pull", "acme/q", "--home", str(mounted)])
    said = " ".join(result.output.split())
    assert result.exit_code != 0 and "read-only file system" in said and "scan" not in said, said
