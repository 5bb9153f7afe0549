"""Pulling variants from an upstream node that plays the Hub: selection, verification, reuse, statuses."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from click.testing import CliRunner

from conftest import (
    SMALL_CHUNK,
    LiveNode,
    flip_byte,
    hub_path_depot,
    serving_repo,
    store_files_consistent,
    write_model_dir,
    write_partial,
)
from modeldepot import Depot, IntegrityError, NotFoundError
from modeldepot.cli import cli, render
from modeldepot.errors import ConfigError, InvalidInputError, OfflineError, PullRunningError
from modeldepot.store.partials import ENDED_MARK, PUBLIC_MARK, partial_key
from modeldepot.transfer.progress import PullUpdate

REPO = "onnx-community/tiny"
FILES = {
    ".gitattributes": b"*.onnx filter=lfs diff=lfs merge=lfs -text\n*.onnx_data filter=lfs diff=lfs merge=lfs -text\n",
    "README.md": b"---\npipeline_tag: text-generation\n---\n# tiny\n",
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b'{"vocab": {"a": 0}}',
    "onnx/model.onnx": bytes(range(256)) * 900,  # 230400 bytes: four 64 KiB chunks
    "onnx/model_q4f16.onnx": b"q4f16" * 40_000,
    "onnx/model_q4f16.onnx_data": b"data" * 50_000,
    "onnx/model_fp16.onnx": b"fp16" * 30_000,
}


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LiveNode]:
    with serving_repo(tmp_path, FILES, REPO) as node:
        yield node


@pytest.fixture
def local(upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    with hub_path_depot(tmp_path / "local", upstream.url, monkeypatch) as depot:
        yield depot


def test_a_variant_a_scan_finds_held_is_downloaded_whole(local: Depot) -> None:
    """A scan that found a variant held (its status row gone: another commit scanned between, a peer's scan)
    wrote "downloaded" with 0 bytes done, which the events and the manifest API said (an explorer's trial)."""
    local.pull(REPO, ["q4f16"])
    with local.store.index.write() as db:
        db.execute("DELETE FROM variant_status")
    local.scan_repo(REPO)
    variant = local.get_manifest(REPO).variant("q4f16")
    assert (variant.status, variant.bytes_done) == ("downloaded", variant.total_bytes)


def test_a_variant_being_pulled_is_not_called_resumable(local: Depot) -> None:
    """`status` during a pull said "downloading 0% resumable: 0 B kept" for seconds (the running pull's own
    downloads on disk): read as a pull that had stopped (an explorer's trial)."""
    seen: list[tuple[str, bool]] = []

    def look(update: PullUpdate) -> None:
        if update.path == "onnx/model_q4f16.onnx" and not seen:
            variant = local.get_manifest(REPO).variant("q4f16")
            seen.append((variant.status, variant.resumable))

    local.pull(REPO, ["q4f16"], progress=look)
    assert seen == [("downloading", False)]


def test_pull_of_files_by_pattern_as_hf_download_takes_them(local: Depot, tmp_path: Path) -> None:
    """`modeldepot pull` selected by variant alone: a repo without variants (or a folder of it) was pulled
    whole, where `hf download --include/--exclude` takes what its patterns match (an explorer's trial)."""
    result = local.pull(REPO, include=["*.json", "onnx/"], exclude=["*_data", "*16*"])
    assert {f.path for f in local.list_files(REPO)} == {"config.json", "tokenizer.json", "onnx/model.onnx"}
    assert result.files == 3 and result.bytes_total == sum(
        len(FILES[p]) for p in ("config.json", "tokenizer.json", "onnx/model.onnx")
    )
    # Within a variant: its files and the shared ones, narrowed
    local.pull(REPO, ["q4f16"], exclude=["*.json"])
    assert "onnx/model_q4f16.onnx_data" in {f.path for f in local.list_files(REPO)}
    with pytest.raises(
        InvalidInputError, match=r"no file of onnx-community/tiny@\w+ matches --include \*\.bin"
    ):
        local.pull(REPO, include=["*.bin"])
    with pytest.raises(InvalidInputError, match="a list of glob patterns"):
        local.pull(REPO, include="*.json")  # type: ignore[arg-type]
    home = str(local.home)
    done = CliRunner().invoke(cli, ["pull", REPO, "--include", "README.md", "--home", home, "--json"])
    assert done.exit_code == 0, done.output
    assert "README.md" in {f.path for f in local.list_files(REPO)}
    refused = CliRunner().invoke(cli, ["pull", REPO, "--exclude", "*", "--home", home])
    assert refused.exit_code == 2 and "matches --exclude *" in refused.output, refused.output
    # A subset was said to be "all files"; a variant whose own files the patterns all leave out took the
    # shared files alone and exited 0 (an explorer's trial)
    said = CliRunner().invoke(cli, ["pull", REPO, "--include", "tokenizer.json", "--home", home])
    assert said.exit_code == 0 and "(files matching --include/--exclude)" in said.stdout, said.output
    emptied = CliRunner().invoke(cli, ["pull", REPO, "-q", "q4f16", "--exclude", "*q4f16*", "--home", home])
    assert emptied.exit_code == 2 and "leave none of the own files of q4f16" in emptied.output, emptied.output


def test_pull_one_variant_takes_exactly_its_files_and_the_shared_ones(
    local: Depot, upstream: LiveNode
) -> None:
    seen: list[int] = []
    result = local.pull(REPO, ["q4f16"], progress=lambda update: seen.append(update.done))
    wanted = {"onnx/model_q4f16.onnx", "onnx/model_q4f16.onnx_data", "config.json", "tokenizer.json"}
    assert result.commit_id == upstream.depot.resolve(REPO) and result.variants == ("q4f16",)
    assert {f.path for f in local.list_files(REPO)} == wanted
    assert result.bytes_total == result.bytes_downloaded == sum(len(FILES[p]) for p in wanted)
    for path in wanted:
        assert bytes(local.get_file(REPO, path)) == FILES[path]
        assert local.file_info(REPO, path).etag == upstream.depot.file_info(REPO, path).etag  # Hub-identical
    assert seen == sorted(seen) and seen[-1] == result.bytes_total
    assert local.verify().ok and store_files_consistent(local) == []
    variant = local.get_manifest(REPO).variant("q4f16")
    assert (variant.status, variant.bytes_done, variant.error) == ("downloaded", variant.total_bytes, None)
    assert variant.finished_at is not None and variant.started_at is not None
    assert local.get_manifest(REPO).variant("fp32").status == "available"
    assert sorted(p.name for p in Path(result.snapshot_path).rglob("*") if p.is_file()) == sorted(
        Path(p).name for p in wanted)  # fmt: skip
    assert local.store.repo_summary(REPO).card["pipeline_tag"] == "text-generation"
    assert list((local.home / "tmp").iterdir()) == []


def test_a_variant_never_pulled_is_resumable_by_its_own_files_only(local: Depot) -> None:
    """A pull of one variant interrupted after the shared config landed made every variant "resumable: 0 B
    kept" in `status`, those never asked for too."""
    manifest = local.scan_repo(REPO)
    chunk = local.chunk_size

    def leave_a_partial(path: str) -> None:
        [remote] = [f for f in manifest.files if f.path == path]
        claim = local.store.partials.claim(
            partial_key(remote.sha256, remote.git_oid), remote.size, chunk, False
        )
        assert claim is not None
        claim.release(completed=False)  # (a pull interrupted: it stays for a resume)

    leave_a_partial("config.json")  # shared by every variant
    assert not any(v.resumable for v in local.get_manifest(REPO).variants)
    leave_a_partial("onnx/model_fp16.onnx")
    assert {v.name for v in local.get_manifest(REPO).variants if v.resumable} == {"fp16"}
    # Nothing landed of it: nothing said kept ("resumable: 0 B kept" of a mirror killed as its pulls began)
    said = CliRunner().invoke(cli, ["status", REPO, "--home", str(local.home)])
    assert said.exit_code == 0 and "fp16" in said.output and "resumable" not in said.output, said.output


def test_a_pull_drops_the_partial_its_file_left_under_its_other_name(local: Depot) -> None:
    """A small file an older version downloaded in a data file and a log (killed mid-pull), pulled now in one
    file of its own: the old ones sat in partials/ until a gc (an explorer's trial, after an upgrade)."""
    from modeldepot.store.partials import partial_key

    manifest = local.scan_repo(REPO)
    [remote] = [f for f in manifest.files if f.path == "config.json"]
    key = partial_key(remote.sha256, remote.git_oid)
    # (as the older version named it: a chunk size under the file's size made it a data file and a log)
    claim = local.store.partials.claim(key, remote.size, 8, False)
    assert claim is not None and not claim.paths.one_piece
    claim.release(completed=False)
    assert key in local.store.partials.keys_on_disk()
    local.pull(REPO, ["q4f16"])
    assert key not in local.store.partials.keys_on_disk(), sorted(local.store.partials.keys_on_disk())


def test_a_node_holding_one_variant_lists_the_whole_commit_and_refuses_what_it_lacks(
    local: Depot, upstream: LiveNode, tmp_path: Path
) -> None:
    """A node that pulled one variant listed its commit with that variant's files alone: snapshot_download
    through it ended "complete" with part of the repo, and huggingface_hub keeps a commit's listing for good
    (trees/<commit>.json), so the real Hub's later downloads of that commit skipped the rest."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError as HubEntryNotFound

    local.pull(REPO, ["q4f16"])
    node = LiveNode(local)
    try:
        ours, theirs = HfApi(endpoint=node.url), HfApi(endpoint=upstream.url)
        assert {s.rfilename for s in ours.model_info(REPO).siblings or []} == set(FILES)

        def tree(api: HfApi) -> list[tuple[str, str]]:
            return sorted((item.path, getattr(item, "blob_id", None) or item.tree_id)
                          for item in api.list_repo_tree(REPO, recursive=True))  # fmt: skip

        assert tree(ours) == tree(theirs), "the same tree, oids included"
        wanted = ["onnx/model_q4f16.onnx*", "*.json"]
        folder = snapshot_download(REPO, endpoint=node.url, cache_dir=tmp_path / "hf", allow_patterns=wanted)
        assert (Path(folder) / "onnx/model_q4f16.onnx_data").read_bytes() == FILES[
            "onnx/model_q4f16.onnx_data"
        ]
        with pytest.raises(HubEntryNotFound):
            snapshot_download(REPO, endpoint=node.url, cache_dir=tmp_path / "hf2")
    finally:
        node.stop()


def test_a_pull_killed_after_it_published_shows_its_variants_downloaded(local: Depot) -> None:
    """A pull killed between its commit and the rows that say its variants are done left them
    "downloading", shown as "failed (interrupted before it finished: pull again to resume)" of a revision
    the store holds whole (a crash trial). What the store holds whole is downloaded; the rest stays failed."""
    local.pull(REPO, "fp16")
    local.store.manifests.set_statuses(
        REPO, {"fp16": 10, "q4f16": 10}, "downloading"
    )  # (as the kill left them)
    statuses = {v.name: (v.status, v.error) for v in local.get_manifest(REPO).variants}
    assert statuses["fp16"] == ("downloaded", None)
    assert statuses["q4f16"][0] == "failed" and "interrupted" in (statuses["q4f16"][1] or "")
    # Its download's files, published by hard links, kept their names in partials/ until gc: `du` counted
    # them a second time ("partial 94 MiB" beside the same bytes as blobs)
    blob = local.store.blobs.path(local.file_info(REPO, "onnx/model_fp16.onnx").sha256)
    os.link(blob, local.store.layout.partials / "left-by-a-kill.part")
    assert local.du().partial_bytes == 0


def test_gc_removes_the_pull_marks_no_pull_holds(local: Depot) -> None:
    """Every repo ever pulled left its pull mark (an empty lock file) in partials/ for good: rm, gc and
    gc --partials left them all (a crash trial)."""
    local.pull(REPO, "fp16")
    marks = list(local.store.layout.partials.glob("pull-*.lock"))
    assert len(marks) == 1
    with local.store.partials.pulling(REPO):  # (a pull running: its mark stays, and says so)
        local.gc()
        assert local.store.partials.is_pulling(REPO) and marks[0].exists()
    local.gc()
    assert not marks[0].exists() and not local.store.partials.is_pulling(REPO)
    local.remove(REPO)
    local.pull(REPO, "fp16")  # (a new mark, made anew)
    assert local.get_manifest(REPO).variant("fp16").status == "downloaded"


def test_a_pull_of_more_files_than_the_process_may_open_says_so_before_a_byte_moves(
    local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull holds each file it fetches open until it publishes: a repo of 100,000 files failed after 40 s
    with "Too many open files", 40,000 partial files left (a scale trial)."""
    from modeldepot.transfer import pull as pulling

    monkeypatch.setattr(pulling, "open_file_limit", lambda: 260)
    monkeypatch.setattr(pulling, "raise_open_file_limit", lambda: 260)  # (a hard limit it cannot pass)
    with pytest.raises(
        ConfigError, match=r"each of the 6 files it fetches open .* may hold 260 files .*ulimit -n"
    ) as refused:
        local.pull(REPO, "all")
    # (--quant alone was offered: no help for a repo without variants, an explorer's trial)
    assert "--include, --exclude" in str(refused.value)
    assert not any(local.store.layout.partials.glob("*.part*")) and local.list_repos() == []
    local.pull(REPO, "fp16")  # (fewer files: room enough)
    assert local.has_file(REPO, "onnx/model_fp16.onnx")


def test_a_second_variant_reuses_the_shared_files_and_grows_the_revision(local: Depot) -> None:
    local.pull(REPO, ["q4f16"])
    second = local.pull(REPO, ["fp32"])
    assert second.bytes_downloaded == len(FILES["onnx/model.onnx"])  # configs and tokenizer came with q4f16
    assert bytes(local.get_file(REPO, "onnx/model.onnx")) == FILES["onnx/model.onnx"]
    assert local.has_file(REPO, "onnx/model_q4f16.onnx")  # the first variant stays in the same revision
    statuses = {v.name: v.status for v in local.get_manifest(REPO).variants}
    assert statuses == {"fp32": "downloaded", "q4f16": "downloaded", "fp16": "available"}
    # A file of one found corrupt since (verify, a read): that variant is to be pulled again (it still said
    # downloaded); the other stays downloaded
    local.store.quarantine(local.file_info(REPO, "onnx/model.onnx").sha256)
    variants = {v.name: v for v in local.get_manifest(REPO).variants}
    assert (variants["fp32"].status, variants["q4f16"].status) == ("available", "downloaded")
    assert "onnx/model.onnx no longer in the store" in (variants["fp32"].error or "")
    local.pull(REPO, ["fp32"])
    assert {v.name: v.status for v in local.get_manifest(REPO).variants}["fp32"] == "downloaded"


def test_pull_of_the_whole_repo_and_of_everything_again(local: Depot) -> None:
    whole = local.pull(REPO)
    assert {f.path for f in local.list_files(REPO)} == set(FILES)
    assert whole.bytes_downloaded == sum(map(len, FILES.values()))
    again = local.pull(REPO, "all")
    assert again.bytes_downloaded == 0 and set(again.variants) == {"fp32", "fp16", "q4f16"}


def test_bytes_that_do_not_match_upstream_digests_are_never_committed(
    local: Depot, upstream: LiveNode
) -> None:
    entry = upstream.depot.file_info(REPO, "onnx/model_fp16.onnx")
    path = upstream.depot.store.blobs.path(entry.sha256)
    flip_byte(path, 5)
    # The upstream now serves one wrong byte as good: a node checks each chunk against its index before it
    # sends it, so its index is made to agree with the wrong bytes (as a lying Hub's answer would).
    with upstream.depot.store.index.write() as con:
        con.execute("UPDATE chunks SET blake3 = ? WHERE sha256 = ? AND idx = 0",
                    (blake3.blake3(path.read_bytes()[: entry.chunk_size]).hexdigest(), entry.sha256))  # fmt: skip
    with pytest.raises(IntegrityError, match="do not match the upstream's SHA-256"):
        local.pull(REPO, ["fp16"])
    assert local.list_repos() == [] and local.du().blobs == 0
    assert list((local.home / "tmp").iterdir()) == []
    failed = local.get_manifest(REPO).variant("fp16")
    assert failed.status == "failed" and "IntegrityError" in (failed.error or "")
    # "Nothing was kept": its refuted bytes are not kept as a resumable download (status said "resumable:
    # N kept", the fleet's registry listed it as a partial holding, and the next pull fetched it all again)
    assert not local.store.partials.holds(entry.sha256)
    assert failed.bytes_done == failed.total_bytes - entry.size  # (the config and tokenizer are kept)
    assert local.pull(REPO, ["q4f16"]).files == 4  # an unharmed variant still pulls


def test_unknown_variants_and_offline_pulls(
    local: Depot, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(NotFoundError, match=r"has no variant 'q3'.*fp16"):
        local.pull(REPO, ["q3"])
    local.pull(REPO, ["q4f16"])
    monkeypatch.setenv("MODELDEPOT_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: offline must not try
    with Depot(local.home) as offline:
        assert offline.pull(REPO, ["q4f16"]).bytes_downloaded == 0
        with pytest.raises(
            OfflineError, match=r"1 file of .* is not in the store \(.+\): pull it once online"
        ):
            offline.pull(REPO, ["fp32"])


def test_offline_a_pull_of_a_branch_takes_that_branch_not_the_last_one_scanned(
    local: Depot, upstream: LiveNode, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Offline, a pull (and a scan) took the saved scan whatever revision it was asked for: after a pull of
    dev, an offline pull of main answered with dev's commit and moved main to it (from_pretrained read
    dev's weights from then on); a commit id given was ignored too (an explorer's trial)."""
    changed = {**FILES, "config.json": b'{"model_type": "llama", "dev": true}'}
    upstream.depot.import_dir(write_model_dir(tmp_path / "dev", changed), REPO, revision="dev")
    main = local.pull(REPO, ["q4f16"]).commit_id
    dev = local.pull(REPO, ["q4f16"], revision="dev").commit_id
    assert main != dev
    monkeypatch.setenv("MODELDEPOT_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: offline must not try
    with Depot(local.home) as offline:
        assert offline.pull(REPO, ["q4f16"]).commit_id == main
        assert offline.pull(REPO, ["q4f16"], revision=main).commit_id == main
        assert offline.scan_repo(REPO, "main").commit_id == main
        assert (offline.resolve(REPO, "main"), offline.resolve(REPO, "dev")) == (main, dev), "no branch moved"
        with pytest.raises(OfflineError, match=r"does not hold onnx-community/tiny@v2"):
            offline.pull(REPO, ["q4f16"], revision="v2")
        # main's commit is held in part, and the saved scan is dev's: main's whole listing, kept, says what
        # it lacks (a manifest of the files held said "no variant 'fp32'", and a whole pull "done", a review)
        with pytest.raises(OfflineError, match=r"not in the store"):
            offline.pull(REPO, ["fp32"])
        with pytest.raises(OfflineError, match=r"not in the store"):
            offline.pull(REPO)
        assert offline.scan_repo(REPO, "main").variant("fp32").status == "available"


def test_info_says_of_each_revision_held_in_part_how_many_files_its_commit_has(
    local: Depot, upstream: LiveNode, tmp_path: Path
) -> None:
    """`info` said it of the revision of the last scan alone: once dev was pulled, main's "4 of the commit's 8
    files" note was gone, though main still lacked them (an explorer's trial)."""
    changed = {**FILES, "config.json": b'{"model_type": "llama", "dev": true}'}
    upstream.depot.import_dir(write_model_dir(tmp_path / "dev", changed), REPO, revision="dev")
    local.pull(REPO, ["q4f16"])
    local.pull(REPO, ["q4f16"], revision="dev")
    info = CliRunner().invoke(cli, ["info", REPO, "--home", str(local.home)])
    assert info.exit_code == 0, info.output
    assert info.stdout.replace("\n", " ").count(f"4 of the commit's {len(FILES)} files") == 2, info.stdout


def test_cli_pull(local: Depot) -> None:
    runner = CliRunner()
    home = str(local.home)
    done = runner.invoke(cli, ["pull", REPO, "--quant", "q4f16", "--json", "--home", home])
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["variants"] == ["q4f16"]
    # One variant of several: info says the revision holds only some of the commit's files.
    manifest = local.get_manifest(REPO)
    held = len(local.list_files(REPO))
    assert 0 < held < len(manifest.files)
    info = runner.invoke(cli, ["info", REPO, "--home", home])
    assert f"{held} of the commit's {len(manifest.files)} files" in info.stdout.replace("\n", " "), (
        info.stdout
    )
    described = json.loads(runner.invoke(cli, ["info", REPO, "--json", "--home", home]).stdout)
    assert described["upstream_files"] == {manifest.commit_id: len(manifest.files)}
    # Not a terminal: plain lines (written in batches), one per file fetched, and the total at the end.
    fetched = [f.path for f in local.get_manifest(REPO).files if f"  {f.path} (" in done.stderr]
    assert fetched and all(done.stderr.count(f"  {path} (") == 1 for path in fetched)
    assert f"pulling {REPO}: " in done.stderr and "(100%)" in done.stderr
    shown = runner.invoke(cli, ["pull", REPO, "-q", "fp16", "--home", home])
    assert shown.exit_code == 0 and "pulled onnx-community/tiny" in shown.stdout
    assert runner.invoke(cli, ["pull", REPO, "-q", "fp16", "--all", "--home", home]).exit_code == 2
    status = json.loads(runner.invoke(cli, ["status", REPO, "--json", "--home", home]).stdout)
    assert {v["name"]: v["status"] for v in status[0]["variants"]}["fp16"] == "downloaded"


def test_status_counts_the_files_in_no_variant_and_what_of_them_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file in no variant (weights.bin) comes with a pull of the whole repo, but status listed it apart
    with neither whether it was here nor what an interrupted pull kept of it (880 MiB in the trial)."""
    weights = bytes(range(256)) * 1024  # 4 chunks of 64 KiB
    with (
        serving_repo(tmp_path, {"config.json": b"{}", "weights.bin": weights}, "acme/w") as node,
        hub_path_depot(tmp_path / "local", node.url, monkeypatch) as local,
    ):
        manifest = local.scan_repo("acme/w")
        assert manifest.other == ("weights.bin",) and manifest.other_held == ()
        write_partial(local, weights, [0, 1])  # a pull killed halfway through
        assert local.get_manifest("acme/w").other_kept_bytes == 2 * SMALL_CHUNK
        shown = CliRunner().invoke(cli, ["status", "acme/w", "--home", str(local.home)])
        assert "0 of 1 here; 128.0 KiB of the rest kept for a resume" in shown.stdout, shown.stdout
        local.pull("acme/w")
        after = local.get_manifest("acme/w")
        assert (after.other_held, after.other_kept_bytes) == (("weights.bin",), 0)


def test_cli_pull_and_scan_from_a_server_given_on_the_command_line(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no Hub: the node alone must do
    runner, home = CliRunner(), tmp_path / "cli-home"
    scanned = runner.invoke(cli, ["scan", REPO, "--server", upstream.url, "--json", "--home", str(home)])
    assert scanned.exit_code == 0, scanned.output
    assert json.loads(scanned.stdout)["endpoint"] == upstream.url
    done = runner.invoke(
        cli, ["pull", REPO, "-q", "q4f16", "--server", upstream.url, "--json", "--home", str(home)]
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["sources"] == [upstream.url]
    elsewhere = tmp_path / "never-created"
    refused = runner.invoke(cli, ["pull", REPO, "--server", "ftp://node", "--home", str(elsewhere)])
    assert refused.exit_code == 2 and "ftp://node" in refused.output
    assert not elsewhere.exists(), "bad input is refused before a store is opened"


def test_the_same_content_under_two_paths_crosses_the_wire_once(
    local: Depot, upstream: LiveNode, tmp_path: Path
) -> None:
    weights = b"w" * 150_000
    files = {"a/model.safetensors": weights, "b/model.safetensors": weights, "config.json": b"{}"}
    upstream.depot.import_dir(write_model_dir(tmp_path / "dupes", files), "acme/dupes")
    result = local.pull("acme/dupes")
    assert result.bytes_total == 2 * len(weights) + 2
    assert result.bytes_downloaded == len(weights) + 2
    assert bytes(local.get_file("acme/dupes", "b/model.safetensors")) == weights
    assert local.du().blobs == 2


def test_a_file_published_into_a_revision_is_linked_into_its_snapshot_where_it_stands(local: Depot) -> None:
    """Each file a mirror fetches is published into its commit: the whole snapshot folder was built again and
    swapped in each time, so fetching a repo of 700 files through a mirror took 363 s (12 s from its node).
    A file published into a revision whose snapshot stands is linked into it; the folder and the links
    already there stay as they are, and the snapshot is whole."""
    local.download_file(REPO, "config.json")
    commit = local.resolve(REPO)
    folder = local.store.snapshots.path(REPO, commit)
    before = (os.stat(folder).st_ino, os.lstat(folder / "config.json").st_ino)
    local.download_file(REPO, "onnx/model.onnx")
    local.download_file(REPO, "tokenizer.json")
    assert (os.stat(folder).st_ino, os.lstat(folder / "config.json").st_ino) == before, "built again"
    for path in ("config.json", "onnx/model.onnx", "tokenizer.json"):
        assert (folder / path).read_bytes() == FILES[path]
    assert not local.store.ensure_snapshot(REPO, commit), "the snapshot is whole, and nothing else is in it"


def test_the_blocking_api_works_inside_an_event_loop(local: Depot) -> None:
    """A notebook cell or an async server calling the plain API: it blocks, and it works."""

    async def cell() -> tuple[int, str, bytes]:
        pulled = local.pull(REPO, ["q4f16"])
        entry = local.download_file(REPO, "onnx/model.onnx")
        data = bytes(local.get_file(REPO, "onnx/model_fp16.onnx", download=True))
        return pulled.files, entry.path, data

    files, path, data = asyncio.run(cell())
    assert files == 4 and path == "onnx/model.onnx" and data == FILES["onnx/model_fp16.onnx"]
    assert local.verify().ok

    # ... but not beside a pull_async on the same loop: the call would wait for what that pull holds (the
    # claim of a content both need, a shared config), and the pull for the loop the call blocks: it hung for
    # good (an explorer's trial). Refused at once, saying how; on a thread of its own it works.
    async def beside_a_pull() -> None:
        pulling = asyncio.create_task(local.pull_async(REPO, ["fp16"]))
        await asyncio.sleep(0)  # (the pull under way)
        with pytest.raises(PullRunningError, match=r"asyncio\.to_thread"):
            local.get_file(REPO, "README.md", download=True)  # (not held yet: downloaded)
        assert bytes(await asyncio.to_thread(local.get_file, REPO, "README.md", download=True))
        await pulling
        assert bytes(local.get_file(REPO, ".gitattributes", download=True))  # (no pull on the loop now)

    asyncio.run(asyncio.wait_for(beside_a_pull(), 60))


def test_a_pull_cancelled_while_it_publishes_waits_for_the_publish_and_counts_it(
    local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or a server's cancel) during the publish: the pull unwinds only once the publish on its
    worker thread has ended; the revision it committed is said downloaded, and its claims go as completed
    (nothing left in partials/ for a resume that has nothing to do)."""
    import modeldepot.transfer.pull as pull_module

    started = threading.Event()
    real_publish = pull_module.publish

    def slow_publish(*args: object) -> set[str]:
        started.set()
        time.sleep(0.4)
        return real_publish(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pull_module, "publish", slow_publish)

    async def pull_then_cancel() -> None:
        task = asyncio.create_task(local.pull_async(REPO, ["q4f16"]))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(pull_then_cancel())
    assert bytes(local.get_file(REPO, "onnx/model_q4f16.onnx")) == FILES["onnx/model_q4f16.onnx"]
    statuses = {v.name: v.status for v in local.get_manifest(REPO).variants}
    assert statuses["q4f16"] == "downloaded", statuses
    left = [p.name for p in local.store.layout.partials.iterdir()
            if not p.name.startswith("pull-") and p.name not in (PUBLIC_MARK, ENDED_MARK)]  # fmt: skip
    assert left == [], left
    assert store_files_consistent(local) == []


@pytest.mark.parametrize("as_node", [False, True], ids=["hub", "node"])
def test_chunks_off_page_boundaries_are_received_through_a_buffer(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_node: bool
) -> None:
    """Chunks are received into the partial file's mapped pages when they start on a page boundary; with a
    chunk size that is no multiple of the page size most do not, and go through a buffer: every file
    still comes out whole, from either kind of source."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", upstream.url)
    if as_node:
        monkeypatch.setenv("MODELDEPOT_SERVERS", upstream.url)
    with Depot(tmp_path / "odd-chunks", chunk_size=SMALL_CHUNK + 100) as depot:
        result = depot.pull(REPO)
        assert result.bytes_downloaded == sum(len(data) for data in FILES.values())
        for path, data in FILES.items():
            assert bytes(depot.get_file(REPO, path)) == data
        assert store_files_consistent(depot) == []


@pytest.mark.parametrize("via", ["hub", "server"])
def test_a_pull_never_imports_aiohttp(upstream: LiveNode, tmp_path: Path, via: str) -> None:
    # aiohttp's import was 0.17 s of every CLI pull's start-up: the Hub's ranges and a depot server's
    # manifest, blob probes and chunk maps are all asked with http.client (transfer/ranged.py).
    import os
    import subprocess
    import sys

    probe = (
        "import sys; from modeldepot import Depot\n"
        f"with Depot({str(tmp_path / 'local')!r}) as depot: result = depot.pull({REPO!r})\n"
        "print(result.bytes_downloaded, 'aiohttp' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MODELDEPOT_SERVERS")}
    if via == "hub":
        env["HF_ENDPOINT"] = upstream.url
    else:
        env.update(MODELDEPOT_SERVERS=upstream.url, HF_ENDPOINT="http://127.0.0.1:9")
    answer = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert answer.returncode == 0, answer.stderr
    downloaded, imported = answer.stdout.split()
    assert int(downloaded) == sum(len(data) for data in FILES.values())
    assert imported == "False"


def test_a_pull_waiting_on_another_process_shows_how_far_that_one_is(local: Depot) -> None:
    """A file another process is downloading: the pull showed it at 0 until the other had finished (a
    CLI pull sat silent, "waiting for another process")."""
    import hashlib

    data = FILES["onnx/model.onnx"]
    sha = hashlib.sha256(data).hexdigest()
    updates: list[PullUpdate] = []
    with Depot(local.home) as other:  # (its own descriptors: as another process, to the claim's lock)
        claim = other.store.partials.claim(sha, len(data), SMALL_CHUNK, wait=False)
        assert claim is not None
        first = memoryview(data[:SMALL_CHUNK])
        claim.write_chunk(0, first, blake3.blake3(first).hexdigest())
        pulling = threading.Thread(target=lambda: local.pull(REPO, ["fp32"], progress=updates.append))
        pulling.start()
        try:
            deadline = time.monotonic() + 20
            while not any(u.waiting and u.file_done == SMALL_CHUNK for u in updates):
                assert time.monotonic() < deadline, [u for u in updates if u.path == "onnx/model.onnx"]
                time.sleep(0.1)
        finally:
            claim.release(completed=False)  # it let go: the waiting pull takes the download over
            pulling.join(60)
    assert bytes(local.get_file(REPO, "onnx/model.onnx")) == data


def test_a_file_just_pulled_is_not_hashed_again_when_read(
    local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads rehash a blob whose change time moved since it was checked (a write in place that put its mtime
    back); the pull's own last step, dropping its downloads' names, moves it too: the pull vouches for those
    blobs, or the first read of every pulled model would hash it whole once more."""
    local.pull(REPO, ["fp32"])
    checked: list[str] = []
    checking = local.store.check_blob
    monkeypatch.setattr(
        local.store, "check_blob", lambda sha, *rest: checked.append(sha) or checking(sha, *rest)
    )
    assert bytes(local.get_file(REPO, "onnx/model.onnx")) == FILES["onnx/model.onnx"]
    assert checked == []


def test_offline_a_pull_whose_shared_files_went_meanwhile_opens_nothing(
    local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, a pull (a load's) of a repo the store holds, whose files shared with another repo were removed
    before it published, fetched them again from the Hub: offline mode opened connections (an explorer's
    trial). It says what went, and opens nothing."""
    import dataclasses

    from modeldepot.errors import SharedBlobsRemovedError
    from modeldepot.transfer import pull as pull_module

    local.pull(REPO, ["q4f16"])
    config = local.file_info(REPO, "config.json").sha256

    def removed_meanwhile(*_: object) -> None:
        gone = SharedBlobsRemovedError("removed meanwhile", repo_id=REPO)
        gone.gone = (config,)
        raise gone

    monkeypatch.setattr(pull_module._PullRun, "publish", removed_meanwhile)
    fetched: list[object] = []
    real_fetch = pull_module._PullRun.fetch

    async def fetch(run: object, missing: list[object]) -> object:
        fetched.extend(missing)
        return await real_fetch(run, missing)  # type: ignore[arg-type]

    monkeypatch.setattr(pull_module._PullRun, "fetch", fetch)
    local.config = dataclasses.replace(local.config, offline=True)
    with pytest.raises(OfflineError, match="were removed"):
        local.pull(REPO, ["q4f16"])
    assert fetched == [], "nothing fetched offline"


def test_a_branch_whose_time_is_ahead_of_the_clock_still_moves(
    upstream: LiveNode, local: Depot, tmp_path: Path
) -> None:
    """A pull keeps a branch where the store learned of it after the pull's scan; a ref written by a clock that
    ran fast and was set back since seemed learned later than any scan, and every pull left the branch at the
    old commit while it said it had the new one (a review). A time ahead of now is no news."""
    local.pull(REPO)
    with local.store.index.write() as con:  # (the clock was an hour fast when main was written)
        con.execute("UPDATE refs SET updated_at = ?", (time.time() + 3600,))
    upstream.depot.import_dir(
        write_model_dir(tmp_path / "newer", {**FILES, "config.json": b'{"v": 2}'}), REPO
    )
    result = local.pull(REPO)
    assert local.resolve(REPO) == result.commit_id == upstream.depot.resolve(REPO)


def test_a_progress_write_that_fails_is_not_left_for_asyncio_to_print(
    local: Depot, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A status write during a pull that failed (a full disk) and was followed by another was never awaited:
    asyncio printed "Future exception was never retrieved" and its traceback over the pull's one-line error (an
    explorer's trial). Each write's failure is taken now."""
    import gc

    import modeldepot.transfer.progress as progress
    from modeldepot.errors import StoreFullError

    monkeypatch.setattr(progress, "STATUS_INTERVAL", 0.0)
    manifests = local.store.manifests
    real_set_statuses = manifests.set_statuses
    failed: list[str] = []

    def disk_full_while_downloading(repo_id: str, rows: object, status: str, *args: object) -> None:
        if status == "downloading" and threading.current_thread().name.startswith(
            "asyncio_"
        ):  # (the periodic ones)
            failed.append(status)
            raise StoreFullError("no space left while recording the status (a test)")
        real_set_statuses(repo_id, rows, status, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(manifests, "set_statuses", disk_full_while_downloading)
    with caplog.at_level("ERROR", logger="asyncio"):
        local.pull(REPO)
        gc.collect()
    assert len(failed) >= 2, failed  # (a failed write followed by another)
    assert "never retrieved" not in caplog.text, caplog.text


def test_a_tally_keeps_its_sum_as_files_change() -> None:
    """Every progress update summed every file's bytes (a pull of 10,000 small files spent seconds of its
    event loop adding: an explorer's profile): the sum is kept as the bytes change, the same as summed."""
    from modeldepot.transfer.progress import Tally

    tally, plain = Tally(), {}
    rng = random.Random(4)
    for _ in range(2000):
        path, amount = f"f{rng.randrange(50)}", rng.randrange(1000)
        action = rng.random()
        if action < 0.7:
            tally[path] = plain[path] = amount
        elif action < 0.9:
            assert tally.pop(path, 0) == plain.pop(path, 0)
        elif path in plain:
            del tally[path], plain[path]
        assert tally.total == sum(plain.values()) and tally == plain


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts the snapshot folder read-only: root")
def test_a_pull_into_a_standing_snapshot_that_takes_no_link_is_not_called_built(local: Depot) -> None:
    """A pull into a revision whose snapshot folder stood (an earlier variant's) said its snapshot built when
    the folder had refused its links (a full disk, here a read-only mount over the folder: a review): its
    result says what the folder holds, and the snapshot is made whole once it can be."""
    first = local.pull(REPO, ["q4f16"])
    assert first.snapshot_built
    folder = Path(first.snapshot_path)
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        second = local.pull(REPO, ["fp16"])
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    assert not (folder / "onnx" / "model_fp16.onnx").exists()
    assert second.snapshot_built is False and second.to_dict()["snapshot_built"] is False
    assert (local.snapshot_path(REPO) / "onnx" / "model_fp16.onnx").read_bytes() == FILES[
        "onnx/model_fp16.onnx"
    ]


def test_a_pull_of_one_quant_after_an_update_keeps_the_unchanged_quants_held(
    upstream: LiveNode, local: Depot, tmp_path: Path
) -> None:
    """The upstream changed one variant; a pull of it moved the branch to the new commit without the other
    variants the store held, unchanged: `path` of their files failed, `status` said "available", and an
    offline load of one said the repo had no such variant, its bytes in the store (an explorer's trial).
    They come along, fetched from nowhere."""
    local.pull(REPO, ["q4f16", "fp16"])
    before = local.resolve(REPO)
    changed = {**FILES, "onnx/model_q4f16.onnx": b"q4f16-v2" * 30_000}
    upstream.depot.import_dir(write_model_dir(tmp_path / "v2", changed), REPO)
    result = local.pull(REPO, ["q4f16"])
    assert local.resolve(REPO) != before
    assert set(result.variants) == {"q4f16", "fp16"}
    assert result.bytes_downloaded == len(changed["onnx/model_q4f16.onnx"])
    assert local.has_file(REPO, "onnx/model_fp16.onnx")  # (at main: the new commit)
    assert local.get_manifest(REPO).variant("fp16").status == "downloaded"
    assert not local.has_file(REPO, "onnx/model.onnx"), "a variant not held before is not taken"


def test_gc_drops_a_download_of_a_file_no_commit_lists_any_more(
    upstream: LiveNode, local: Depot, tmp_path: Path
) -> None:
    """A pull stopped midway, then the upstream replaced the file, and the new commit was pulled: the old
    download kept its whole preallocated size, outside the budget, for a week, `gc` saying "kept for a resume"
    of a content no commit wanted (an explorer's trial). gc keeps a download a commit the store knows of lists,
    and drops one no commit lists any more."""
    local.scan_repo(REPO)
    stopped = write_partial(local, FILES["onnx/model.onnx"], [0])  # (a pull of fp32 stopped after a chunk)
    kept = local.gc()
    assert stopped in local.store.partials.keys_on_disk() and kept.resumable_downloads == 1
    changed = {**FILES, "onnx/model.onnx": bytes(range(255, -1, -1)) * 900}
    upstream.depot.import_dir(write_model_dir(tmp_path / "v2", changed), REPO)
    local.pull(REPO, ["fp32"])
    report = local.gc()
    assert stopped not in local.store.partials.keys_on_disk() and report.partials_removed == 1, report
    assert bytes(local.get_file(REPO, "onnx/model.onnx")) == changed["onnx/model.onnx"]


def test_a_server_dropped_while_this_nodes_link_was_down_is_asked_again_once_bytes_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This node's cable pulled for 40 s: every peer failed with "no route to host" and was dropped for the rest
    of the pull, which then took the whole model from the Hub, three peers holding it (an explorer's trial).
    A source dropped for a failure of this node's own link is asked again once bytes come from anywhere. (The
    cut is made where a range is read: the error a range's attempts end in carries the reason, a review.)"""
    import errno
    import functools

    from faultproxy import FaultProxy
    from modeldepot.transfer import chain, download, sources

    big = random.Random(5).randbytes(8 << 20)
    files = {"config.json": b"{}", "model.safetensors": big}
    with (
        serving_repo(tmp_path / "hub", files, "acme/cut", chunk_size=SMALL_CHUNK) as hub,
        serving_repo(tmp_path / "server", files, "acme/cut", chunk_size=SMALL_CHUNK) as server,
    ):
        proxy = FaultProxy(hub.url)
        proxy.set("slow", times=-1, slow_delay=0.2)  # (the Hub slow: the server, back, does the rest)
        cut_until = time.monotonic() + 1.5
        read_range = sources.read_range

        def cut_link(url: str, *args: object, **kwargs: object) -> object:
            if url.startswith(server.url) and time.monotonic() < cut_until:
                raise OSError(errno.EHOSTUNREACH, "No route to host")
            return read_range(url, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(sources, "read_range", cut_link)
        # (two quick attempts a range: dropped within the cut, as five over seconds of backoff are in a long one)
        monkeypatch.setattr(chain, "RetryPolicy", functools.partial(sources.RetryPolicy, attempts=2,
                                                                    base_delay=0.05))  # fmt: skip
        monkeypatch.setattr(download, "PARKED_AT_LEAST", 0.3)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", proxy.url)
        monkeypatch.setenv("MODELDEPOT_SERVERS", server.url)
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as depot:
                result = depot.pull("acme/cut")
                assert bytes(depot.get_file("acme/cut", "model.safetensors")) == big
        finally:
            proxy.stop()
    assert result.bytes_by_source.get("node", 0) > len(big) // 2, result.bytes_by_source


def test_a_pull_of_a_whole_repo_of_several_variants_says_so_first(local: Depot) -> None:
    """`pull REPO` of a GGUF repo started every quant, hundreds of GB of a big model's, without a word, where
    llama.cpp and `load` pick one (an explorer's trial): it says what it takes, and how to take one."""
    home = str(local.home)
    whole = CliRunner().invoke(cli, ["pull", REPO, "--home", home])
    assert whole.exit_code == 0, whole.output
    variants = local.get_manifest(REPO).variants
    assert len(variants) > 1
    total = render.format_bytes(sum(len(b) for b in FILES.values()))
    assert f"note: {REPO} has {len(variants)} variants (" in whole.stderr, whole.stderr
    assert f"pulling them all, {total}; `-q q4f16` pulls one" in whole.stderr, whole.stderr
    one = CliRunner().invoke(cli, ["pull", REPO, "-q", "fp16", "--home", home])
    assert one.exit_code == 0 and "note:" not in one.stderr, one.output
    with pytest.raises(InvalidInputError, match="the manifest given is"):
        local.pull("acme/other", manifest=local.get_manifest(REPO))
