"""The Hugging Face cache, both ways (``modeldepot hf-cache``), with the real huggingface_hub and transformers.

A real cache is made the way users get one: ``snapshot_download`` / ``hf_hub_download`` from a modeldepot
node on loopback (the production app over sockets). Import adopts it into a fresh store; export writes a
store's repo into an empty cache, which huggingface_hub then reads with ``local_files_only=True``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download

from conftest import (
    SMALL_CHUNK,
    LiveNode,
    closed_port,
    flip_byte,
    minilm_model_dir,
    sample_files,
    store_files_consistent,
    write_model_dir,
)
from modeldepot import (
    Depot,
    EntryNotFoundError,
    InvalidInputError,
    NotFoundError,
    SourceDirectoryError,
    StoreError,
)
from modeldepot.cli import cli

SAMPLE = "acme/sample"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
DEV_FILES = {"config.json": b'{"dev": true}', "README.md": b"---\nlicense: mit\n---\n# dev\n"}
PR_FILES = {"config.json": b'{"pr": 1}'}
FOLDER = "models--acme--sample"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Depot, LiveNode]]:
    """A node serving acme/sample (main, dev, refs/pr/1) and the real all-MiniLM-L6-v2."""
    root = tmp_path_factory.mktemp("hf-source")
    depot = Depot(root / "store", chunk_size=SMALL_CHUNK)
    depot.import_dir(write_model_dir(root / "sample", sample_files()), SAMPLE)
    depot.import_dir(write_model_dir(root / "dev", DEV_FILES), SAMPLE, "dev")
    depot.import_dir(write_model_dir(root / "pr", PR_FILES), SAMPLE, "refs/pr/1")
    depot.import_dir(minilm_model_dir(), MINILM)
    node = LiveNode(depot)
    yield depot, node
    node.stop()
    depot.close()


@pytest.fixture(scope="module")
def pristine(source: tuple[Depot, LiveNode], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache as huggingface_hub leaves it: acme/sample's main whole, dev's and refs/pr/1's config.json."""
    _, node = source
    cache = tmp_path_factory.mktemp("hf-pristine") / "hub"
    snapshot_download(SAMPLE, endpoint=node.url, cache_dir=cache)
    hf_hub_download(SAMPLE, "config.json", revision="dev", endpoint=node.url, cache_dir=cache)
    hf_hub_download(SAMPLE, "config.json", revision="refs/pr/1", endpoint=node.url, cache_dir=cache)
    return cache


@pytest.fixture
def hf_cache(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the pristine cache (links kept as links), for a test to adopt or damage."""
    cache = tmp_path / "hf" / "hub"
    shutil.copytree(pristine, cache, symlinks=True)
    return cache


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def snapshot_of(cache: Path, branch: str = "main") -> Path:
    return cache / FOLDER / "snapshots" / (cache / FOLDER / "refs" / branch).read_text()


def inode(path: Path | str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def index_rows(depot: Depot) -> dict[str, list[tuple[object, ...]]]:
    queries = {
        "files": "SELECT repo_id, commit_id, path, sha256, size, git_oid, lfs FROM files ORDER BY 1, 2, 3",
        "refs": "SELECT repo_id, name, commit_id FROM refs ORDER BY 1, 2",
        "revisions": "SELECT repo_id, commit_id FROM revisions ORDER BY 1, 2",
        "blobs": "SELECT sha256, size, state, git_sha1 FROM blobs ORDER BY 1",
    }
    return {name: [tuple(row) for row in depot.store.index.read(sql)] for name, sql in queries.items()}


def store_blob_files(depot: Depot) -> set[str]:
    return {name for _, _, names in os.walk(depot.store.layout.blobs) for name in names}


def run(*args: str, home: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [*args, "--home", str(home)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# -- import ------------------------------------------------------------------------------------------------


def test_import_adopts_a_real_cache_by_hard_links(
    depot: Depot, hf_cache: Path, source: tuple[Depot, LiveNode]
) -> None:
    origin, _ = source
    seen: list[tuple[str, int, int]] = []
    result = depot.hf_cache_import(cache_dir=hf_cache, progress=lambda *update: seen.append(update))
    assert result.ok, result.problems
    assert [r.repo_id for r in result.repos] == [SAMPLE]
    repo = result.repos[0]
    # Every ref and revision kept, under the Hub's commit ids.
    for branch in ("main", "dev", "refs/pr/1"):
        assert depot.resolve(SAMPLE, branch) == origin.resolve(SAMPLE, branch)
    assert {r.commit_id: r.refs for r in repo.revisions} == {
        origin.resolve(SAMPLE, "main"): ("main",),
        origin.resolve(SAMPLE, "dev"): ("dev",),
        origin.resolve(SAMPLE, "refs/pr/1"): ("refs/pr/1",),
    }
    # Contents verified, byte-identical, with the Hub's digests and ETags.
    assert read_tree(depot.snapshot_path(SAMPLE)) == sample_files()
    for entry in depot.list_files(SAMPLE):
        assert bytes(depot.get_file(SAMPLE, entry.path)) == sample_files()[entry.path]
        theirs = origin.file_info(SAMPLE, entry.path)
        assert (entry.sha256, entry.git_oid, entry.lfs, entry.etag) == (
            theirs.sha256, theirs.git_oid, theirs.lfs, theirs.etag
        )  # fmt: skip
    assert depot.file_info(SAMPLE, "model.safetensors").lfs
    assert not depot.file_info(SAMPLE, "config.json").lfs
    assert bytes(depot.get_file(SAMPLE, "config.json", "dev")) == DEV_FILES["config.json"]
    assert bytes(depot.get_file(SAMPLE, "config.json", "refs/pr/1")) == PR_FILES["config.json"]
    assert depot.verify().ok and store_files_consistent(depot) == []
    assert depot.repo_info(SAMPLE).origin == "hf-cache"
    # Same file system: every blob is the cache's own inode, now read-only as the store's blobs are.
    snapshot = snapshot_of(hf_cache)
    for entry in depot.list_files(SAMPLE):
        assert inode(snapshot / entry.path) == inode(depot.store.blobs.path(entry.sha256)), entry.path
        assert stat.S_IMODE(os.stat(snapshot / entry.path).st_mode) == 0o444
    assert repo.linked_blobs == repo.blobs == repo.new_blobs == len(store_blob_files(depot))
    assert repo.copied_blobs == 0
    every_blob = sum(map(len, sample_files().values())) + len(
        DEV_FILES["config.json"] + PR_FILES["config.json"]
    )
    assert seen and seen[-1][1] == seen[-1][2] == every_blob


def test_an_import_keeps_to_the_disk_budget(
    hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELDEPOT_MAX_SIZE", "1KiB")  # far below the sample's weights
    with Depot(tmp_path / "small") as small:
        refused = small.hf_cache_import(cache_dir=hf_cache, copy=True)  # (reported; the next repo is tried)
        assert [(p.repo_id, p.problem) for p in refused.problems] == [(SAMPLE, "failed")]
        assert "budget" in refused.problems[0].detail and refused.repos == ()
        # (said to be counted by the cache's sizes: a repo whose big blob was corrupt, and would be skipped,
        # was refused for its size, the corrupt blob never named: a trial)
        assert "before they are checked" in refused.problems[0].detail, refused.problems
        assert small.list_repos() == [] and store_blob_files(small) == set()
        # By hard links the blobs take no room and are not counted (refused by their sizes, a cache bigger
        # than the budget was adopted once the budget was set after: a trial): what is copied counts
        linked = small.hf_cache_import(cache_dir=hf_cache)
        assert linked.ok and linked.repos[0].linked_blobs == linked.repos[0].blobs, linked
        status = small.budget_status()
        assert status.used_bytes <= 1024 < status.shared_bytes, status
    monkeypatch.setenv("MODELDEPOT_MAX_SIZE", "64MiB")
    with Depot(tmp_path / "roomy") as roomy:
        roomy.import_dir(
            write_model_dir(tmp_path / "old", {"w.bin": os.urandom((64 << 20) - (100 << 10))}), "acme/old"
        )
        assert roomy.hf_cache_import(cache_dir=hf_cache, copy=True).ok  # the old repo goes to make room
        assert [r.repo_id for r in roomy.list_repos()] == [SAMPLE]
        assert roomy.budget_status().evictions == 1


def test_an_adopted_commit_the_cache_holds_in_part_is_known_as_partial(
    depot: Depot, hf_cache: Path, source: tuple[Depot, LiveNode]
) -> None:
    """A cache holding some of a commit's files was adopted as the whole commit: a node then listed that
    commit with files missing, and clients took it for complete. huggingface_hub's own listing of the commit
    (trees/<commit>.json, written by snapshot_download) says what the commit has."""
    origin, _ = source
    commit = origin.resolve(SAMPLE)
    assert (hf_cache / FOLDER / "trees" / f"{commit}.json").is_file()
    (snapshot_of(hf_cache) / "tokenizer.json").unlink()  # (as an interrupted snapshot_download leaves it)
    result = depot.hf_cache_import(cache_dir=hf_cache)
    assert [(p.problem, p.path.rsplit("/", 1)[-1]) for p in result.problems] == [
        ("partial", f"{commit}.json")
    ]
    assert "1 was not imported" in result.problems[0].detail and "tokenizer.json" in result.problems[0].detail
    assert result.ok, "a note: nothing was skipped (every snapshot_download with allow_patterns exited 1)"
    assert {e.path for e in depot.list_files(SAMPLE)} == set(sample_files()) - {"tokenizer.json"}
    listed = depot.commit_files(SAMPLE)
    assert {e.path for e in listed} == set(sample_files())
    assert [e.path for e in listed if e.chunk_size == 0 and e.size] == ["tokenizer.json"]
    assert depot.get_manifest(SAMPLE).commit_id == commit
    node = LiveNode(depot)
    try:
        from huggingface_hub import HfApi

        assert {s.rfilename for s in HfApi(endpoint=node.url).model_info(SAMPLE).siblings or []} == set(
            sample_files()
        )
        # The file the commit has and the node lacks is a 404, one huggingface_hub does not record as absent
        # from the commit (.no_exist): it took the file from no other node once it had asked this one.
        from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError as HubEntryNotFound

        client_cache = hf_cache.parent / "client"
        for path in ("tokenizer.json", "not-in-the-commit.json"):
            with pytest.raises(HubEntryNotFound):
                hf_hub_download(SAMPLE, path, cache_dir=client_cache, endpoint=node.url)
        assert try_to_load_from_cache(SAMPLE, "tokenizer.json", cache_dir=client_cache) is None
        assert (
            try_to_load_from_cache(SAMPLE, "not-in-the-commit.json", cache_dir=client_cache)
            is _CACHED_NO_EXIST
        )
        code, out, _ = run("info", SAMPLE, home=depot.home)
        assert code == 0
        assert "of the commit's 6 files" in out, out
        # Its variants lack the tokenizer: "available", with what of them is here (it said nothing is)
        variants = depot.get_manifest(SAMPLE).variants
        files = sample_files()
        assert {v.status for v in variants} == {"available"}
        for variant in variants:
            assert variant.bytes_done == variant.total_bytes - len(files["tokenizer.json"]), variant
        code, out, _ = run("status", SAMPLE, home=depot.home)
        assert code == 0 and "of it here: a pull takes the rest" in out, out
        # `path` and `cat` of it said it is "not in" the commit, which has it
        for command in ("path", "cat"):
            code, _, err = run(command, SAMPLE, "tokenizer.json", home=depot.home)
            assert code != 0 and "its commit has it" in err and f"modeldepot pull {SAMPLE}" in err, err
            # (that file alone: the whole commit was every quant of a GGUF repo, an explorer's trial)
            assert "--include tokenizer.json` fetches it" in " ".join(err.split()), err
        # Exported again, the snapshot lacks the file too, and the export says so (it said nothing)
        exported = depot.hf_cache_export(SAMPLE, cache_dir=hf_cache.parent / "again")
        assert exported.ok and exported.not_in_store == ("tokenizer.json",)
        code, _, err = run("hf-cache", "export", SAMPLE, "--cache-dir", str(hf_cache.parent / "again2"),
                           home=depot.home)  # fmt: skip
        assert code == 0 and "1 more files the store does not hold" in err and "tokenizer.json" in err, err
    finally:
        node.stop()


def test_a_commit_adopted_without_its_listing_is_not_taken_for_the_whole_of_it(
    tmp_path: Path,
    source: tuple[Depot, LiveNode],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cache filled file by file (hf_hub_download, transformers' way) has no trees/<commit>.json: what it
    holds of a commit was taken for the whole commit. A pull of that commit by its id fetched nothing and
    said its weights were not in it; a mirror over the store listed the commit as the cached files, and
    answered a file of it with a 404 that made the client record it as absent (.no_exist) (a trial)."""
    from huggingface_hub import HfApi

    origin, node = source
    commit = origin.resolve(SAMPLE)
    cache = tmp_path / "hf" / "hub"
    hf_hub_download(SAMPLE, "config.json", endpoint=node.url, cache_dir=cache)
    assert not (cache / FOLDER / "trees").exists()
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        assert depot.hf_cache_import(cache_dir=cache).ok
        # A node that does not mirror answered a file of it with the commit's id, and the client recorded the
        # file as absent from the commit for good (an explorer's trial); the CLI said it was "not in" it
        plain = LiveNode(Depot(tmp_path / "store"), owns_depot=True)
        try:
            from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache
            from huggingface_hub.errors import EntryNotFoundError as HubEntryNotFound

            with pytest.raises(HubEntryNotFound):
                hf_hub_download(SAMPLE, "model.safetensors", revision=commit, endpoint=plain.url,
                                cache_dir=tmp_path / "client2")  # fmt: skip
            cached = try_to_load_from_cache(
                SAMPLE, "model.safetensors", revision=commit, cache_dir=tmp_path / "client2"
            )
            assert cached is not _CACHED_NO_EXIST
        finally:
            plain.stop()
        with pytest.raises(EntryNotFoundError, match="its commit may have it"):
            depot.file_path(SAMPLE, "model.safetensors", revision=commit)
    # Offline, a pull of it cannot know the rest: it said "(all files)" without a word (an explorer's trial)
    offline = CliRunner().invoke(cli, ["pull", SAMPLE, "-r", commit, "--home", str(tmp_path / "store")],
                                 env={"MODELDEPOT_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert offline.exit_code == 0, offline.output
    assert "holds 1 files of acme/sample" in caplog.text and "pull it online" in caplog.text
    caplog.clear()
    by_branch = CliRunner().invoke(cli, ["pull", SAMPLE, "--home", str(tmp_path / "store")],
                                   env={"MODELDEPOT_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert by_branch.exit_code == 0 and "pull it online" in caplog.text, by_branch.output
    with Depot(tmp_path / "store") as depot:  # (the pull made it "imported", and the next pull took it whole)
        assert depot.store.origin(SAMPLE) == ("hf-cache", False, False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", node.url)
    with Depot(tmp_path / "store") as depot:
        mirror = LiveNode(Depot(tmp_path / "store"), mirror=True, owns_depot=True)
        try:
            listed = {
                f.path
                for f in HfApi(endpoint=mirror.url).list_repo_tree(SAMPLE, revision=commit, recursive=True)
            }
            assert listed >= set(sample_files()), listed
            client = tmp_path / "client"
            found = hf_hub_download(
                SAMPLE, "tokenizer.json", revision=commit, endpoint=mirror.url, cache_dir=client
            )
            assert Path(found).read_bytes() == sample_files()["tokenizer.json"]
        finally:
            mirror.stop()
        entry = depot.download_file(SAMPLE, "model.safetensors", revision=commit)
        assert bytes(depot.get_file(SAMPLE, entry.path, commit)) == sample_files()["model.safetensors"]


def test_a_depot_pulling_from_a_node_that_holds_part_of_a_commit_asks_the_hub_for_the_rest(
    tmp_path: Path,
    source: tuple[Depot, LiveNode],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node whose store adopted a few files of a commit without its listing (transformers' way of filling a
    cache) answered a depot's scan with those files as the commit: a pull from it (`--server`) said "all
    files" without the weights, never asked the Hub, and its store then held the weights as "not in" the
    commit (an explorer's trial). The node says it lists part of the commit; the pull takes the commit's
    listing from the Hub, the node's files still by content; with no other source, the part, said so."""
    origin, hub = source
    commit = origin.resolve(SAMPLE)
    cache = tmp_path / "hf" / "hub"
    hf_hub_download(SAMPLE, "config.json", endpoint=hub.url, cache_dir=cache)
    with Depot(tmp_path / "partial", chunk_size=SMALL_CHUNK) as adopted:
        assert adopted.hf_cache_import(cache_dir=cache).ok
    node = LiveNode(Depot(tmp_path / "partial"), owns_depot=True)
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with Depot(tmp_path / "puller", chunk_size=SMALL_CHUNK, servers=[node.url]) as puller:
            result = puller.pull(SAMPLE)
            assert result.commit_id == commit
            assert read_tree(puller.snapshot_path(SAMPLE)) == sample_files()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # (no Hub now)
        caplog.set_level("WARNING", logger="modeldepot.transfer.chain")
        with Depot(tmp_path / "alone", chunk_size=SMALL_CHUNK, servers=[node.url]) as alone:
            assert alone.pull(SAMPLE).commit_id == commit
            assert alone.has_file(SAMPLE, "config.json") and not alone.has_file(SAMPLE, "model.safetensors")
            # The part stays a part here too: this node says so in turn, and asks again once the Hub is back
            # (saved as the commit's listing, it was served as the whole commit one hop on: a review)
            assert not alone.commit_known_whole(SAMPLE, commit)
            relay = LiveNode(alone)
            try:
                with urllib.request.urlopen(f"{relay.url}/api/models/{SAMPLE}/revision/{commit}") as answer:
                    assert answer.headers["X-Depot-Part-Of-Commit"] == "1"
            finally:
                relay.stop()
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with Depot(tmp_path / "alone", servers=[node.url]) as alone:
            alone.pull(SAMPLE, revision=commit)
            assert read_tree(alone.snapshot_path(SAMPLE, commit)) == sample_files()
            assert alone.commit_known_whole(SAMPLE, commit)
        assert any("without the commit's listing" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        node.stop()


def test_a_commit_adopted_whole_with_its_listing_is_pulled_without_the_upstream(
    tmp_path: Path, hf_cache: Path, source: tuple[Depot, LiveNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit adopted with huggingface_hub's listing of it (snapshot_download's) is known whole: a pull of
    it by its id needs no upstream (it was looked up there, and failed with the upstream down: a review)."""
    origin, _ = source
    commit = origin.resolve(SAMPLE)
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        assert depot.hf_cache_import(cache_dir=hf_cache).ok
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # (nothing answers there)
    with Depot(tmp_path / "store") as depot:
        assert depot.pull(SAMPLE, revision=commit).commit_id == commit


def test_removing_an_adopted_repo_says_what_stays_linked_from_the_cache(depot: Depot, hf_cache: Path) -> None:
    """rm of an adopted repo said its bytes were freed while the cache's hard links kept every one on disk."""
    assert depot.hf_cache_import(cache_dir=hf_cache).ok
    total = sum(e.size for e in depot.list_files(SAMPLE))
    result = depot.remove(SAMPLE, "main")
    assert result.bytes_freed == 0 and 0 < result.bytes_still_linked <= total
    assert depot.hf_cache_import(cache_dir=hf_cache).ok
    code, out, _ = run("rm", SAMPLE, "--yes", home=depot.home)
    assert code == 0 and "0 B freed" in out and "linked from elsewhere" in out, out
    # (and an export's links are named too: "a cache the store adopted" sent one looking for no adoption)
    assert "hf-cache export" in " ".join(out.split()), out
    # The cache's files, its alone again, get the mode they had back (they stayed 0444 for good: an explorer's
    # trial; huggingface_hub copes, a user's `rm` of them asked)
    blobs = [path for path in (hf_cache / FOLDER / "blobs").iterdir() if path.is_file()]
    assert blobs and all(os.stat(path).st_mode & stat.S_IWUSR for path in blobs), [
        (path.name, oct(os.stat(path).st_mode)) for path in blobs
    ]


def test_a_second_import_changes_nothing(depot: Depot, hf_cache: Path) -> None:
    first = depot.hf_cache_import(cache_dir=hf_cache)
    rows, blobs = index_rows(depot), store_blob_files(depot)
    inodes = {sha256: inode(depot.store.blobs.path(sha256)) for sha256 in blobs}
    second = depot.hf_cache_import(cache_dir=hf_cache)
    assert first.ok and second.ok
    assert [r.new_blobs for r in second.repos] == [0] and [r.new_bytes for r in second.repos] == [0]
    assert [r.revisions for r in second.repos] == [r.revisions for r in first.repos]
    assert index_rows(depot) == rows and store_blob_files(depot) == blobs
    assert {sha256: inode(depot.store.blobs.path(sha256)) for sha256 in blobs} == inodes
    assert list(depot.store.layout.tmp.iterdir()) == []  # the write sessions went


def test_a_ref_huggingface_hub_wrote_for_a_short_commit_id_is_no_branch(
    depot: Depot, hf_cache: Path, source: tuple[Depot, LiveNode]
) -> None:
    """A download by a short commit id makes huggingface_hub write refs/<that id>: adopted as a branch, the
    store listed branches named "543139c" that no upstream has, and they never moved (an explorer's trial)."""
    _, node = source
    commit = node.depot.resolve(SAMPLE, "dev")
    hf_hub_download(SAMPLE, "config.json", revision=commit[:7], endpoint=node.url, cache_dir=hf_cache)
    assert (hf_cache / FOLDER / "refs" / commit[:7]).read_text() == commit  # (what huggingface_hub wrote)
    report = depot.hf_cache_import(cache_dir=hf_cache)
    assert report.ok, report
    refs = {name for _, name, _ in index_rows(depot)["refs"]}
    assert commit[:7] not in refs and {"main", "dev", "refs/pr/1"} <= refs, refs
    assert depot.resolve(SAMPLE, commit[:7]) == commit  # (the commit itself is there)


def test_damaged_entries_are_reported_and_skipped_the_rest_imported(
    depot: Depot, hf_cache: Path, tmp_path: Path
) -> None:
    folder = hf_cache / FOLDER
    main = snapshot_of(hf_cache)
    commit = main.name

    def blob_of(path: str) -> Path:
        return Path(os.path.realpath(main / path))

    weights, config, onnx = (
        blob_of("model.safetensors"),
        blob_of("config.json"),
        blob_of("onnx/model_q4.onnx"),
    )
    flip_byte(weights, 1000)  # an LFS blob whose SHA-256 no longer matches its name
    config.write_bytes(config.read_bytes().replace(b"bert", b"BERT"))  # a git blob whose id no longer does
    onnx.rename(onnx.with_name(onnx.name + ".incomplete"))  # a download killed before it finished
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for the store")
    (main / "leak.txt").symlink_to(secret)  # a link out of the cache
    import hashlib

    disguised = folder / "blobs" / hashlib.sha256(secret.read_bytes()).hexdigest()
    disguised.symlink_to(secret)  # a blob of the right name that is a link out of the cache
    (main / "leak2.bin").symlink_to(f"../../blobs/{disguised.name}")
    (folder / "refs" / "gone").write_text("0" * 40)  # a ref to no snapshot

    result = depot.hf_cache_import(cache_dir=hf_cache)

    found = sorted((p.problem, p.path) for p in result.problems)
    assert found == sorted([
        ("corrupt", f"{FOLDER}/blobs/{weights.name}"),
        ("corrupt", f"{FOLDER}/blobs/{config.name}"),
        ("incomplete", f"{FOLDER}/blobs/{onnx.name}.incomplete"),
        ("missing", f"{FOLDER}/snapshots/{commit}/onnx/model_q4.onnx"),
        ("missing", f"{FOLDER}/refs/gone"),
        ("outside", f"{FOLDER}/snapshots/{commit}/leak.txt"),
        ("outside", f"{FOLDER}/snapshots/{commit}/leak2.bin"),
        ("partial", f"{FOLDER}/trees/{commit}.json"),  # (the commit's listing names what was skipped)
    ]), result.problems  # fmt: skip
    assert all(p.repo_id == SAMPLE and p.detail for p in result.problems)
    (unfinished,) = [p for p in result.problems if p.path.endswith("onnx/model_q4.onnx")]
    assert "did not finish" in unfinished.detail
    skipped = {"model.safetensors", "config.json", "onnx/model_q4.onnx"}
    kept = {path: data for path, data in sample_files().items() if path not in skipped}
    assert read_tree(depot.snapshot_path(SAMPLE)) == kept
    for path in [*skipped, "leak.txt", "leak2.bin"]:
        assert not depot.has_file(SAMPLE, path)
    assert bytes(depot.get_file(SAMPLE, "config.json", "dev")) == DEV_FILES["config.json"]
    assert depot.resolve(SAMPLE) == commit
    # Nothing of the damaged or outside files reached the store; the cache keeps what it had.
    expected = {e.sha256 for rev in ("main", "dev", "refs/pr/1") for e in depot.list_files(SAMPLE, rev)}
    assert store_blob_files(depot) == expected
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in expected
    assert weights.exists() and hashlib.sha256(weights.read_bytes()).hexdigest() != weights.name
    assert depot.verify().ok and store_files_consistent(depot) == []
    assert list(depot.store.layout.tmp.iterdir()) == []


_KILLED_DOWNLOAD = """
import os, sys
import huggingface_hub.file_download as fd

def killed(url, temp_file, **kwargs):
    temp_file.write(b"x" * 100)
    temp_file.flush()
    os._exit(9)  # (as a kill -9 mid-file)

fd.http_get = killed
fd.hf_hub_download(sys.argv[1], sys.argv[2], endpoint=sys.argv[3], cache_dir=sys.argv[4])
"""


def test_a_first_download_huggingface_hub_never_finished_is_a_note(
    source: tuple[Depot, LiveNode], tmp_path: Path
) -> None:
    """huggingface_hub writes the ref and makes the snapshot's folder before it downloads: a first download
    killed mid-file leaves a ref to an empty snapshot. The import said that ref was "missing", exit 1, at
    every run, for a state no run can adopt; it is now a note, like the `.incomplete` blob beside it (an
    explorer's trial)."""
    _, node = source
    cache = tmp_path / "hub"
    killed = subprocess.run([sys.executable, "-c", _KILLED_DOWNLOAD, SAMPLE, "onnx/model_q4.onnx", node.url,
                             str(cache)], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"})  # fmt: skip
    assert killed.returncode == 9, killed.stderr
    [commit] = os.listdir(cache / FOLDER / "snapshots")
    assert os.listdir(cache / FOLDER / "snapshots" / commit) in ([], ["onnx"])  # (a folder, no file)
    code, out, err = run("hf-cache", "import", "--cache-dir", str(cache), "--json", home=tmp_path / "store")
    assert code == 0, (out, err)
    found = sorted((p["problem"], p["path"].split("/")[1]) for p in json.loads(out)["problems"])
    assert found == [("incomplete", "blobs"), ("incomplete", "refs")], found
    # Once the download is finished, the next run adopts it.
    hf_hub_download(SAMPLE, "onnx/model_q4.onnx", endpoint=node.url, cache_dir=cache)
    code, out, err = run("hf-cache", "import", "--cache-dir", str(cache), home=tmp_path / "store")
    assert code == 0, (out, err)
    with Depot(tmp_path / "store") as depot:
        assert depot.resolve(SAMPLE) == commit
        assert bytes(depot.get_file(SAMPLE, "onnx/model_q4.onnx")) == sample_files()["onnx/model_q4.onnx"]


def test_a_file_huggingface_hub_found_absent_and_nothing_else_is_a_note(
    source: tuple[Depot, LiveNode], tmp_path: Path
) -> None:
    """transformers looks for optional files (`adapter_config.json`): huggingface_hub, told the file is absent,
    writes the ref and `.no_exist/<commit>/<file>`, and no snapshot folder. The import said that ref was
    "missing", exit 1, at every run, for a state no run can adopt (an explorer's trial): a note now."""
    from huggingface_hub.errors import EntryNotFoundError as HubEntryNotFound

    _, node = source
    cache = tmp_path / "hub"
    with pytest.raises(HubEntryNotFound):
        hf_hub_download(SAMPLE, "adapter_config.json", endpoint=node.url, cache_dir=cache)
    assert not (cache / FOLDER / "snapshots").exists() and (cache / FOLDER / ".no_exist").is_dir()
    code, out, err = run("hf-cache", "import", "--cache-dir", str(cache), "--json", home=tmp_path / "store")
    assert code == 0, (out, err)
    found = [(p["problem"], p["path"].split("/")[1], p["detail"]) for p in json.loads(out)["problems"]]
    assert [(kind, where) for kind, where, _ in found] == [("incomplete", "refs")], found
    assert "`.no_exist/`" in found[0][2], found


def test_a_ref_git_takes_and_the_store_names_no_branch_so_is_a_note(
    source: tuple[Depot, LiveNode], tmp_path: Path
) -> None:
    """A tag such as `v1.0+build` (semver) or `release@2024`, which git and the Hub take, left in the cache by a
    download of it: the store names no branch so, and the import failed on it, exit 1, at every run (an
    explorer's trial). A note; the commit is adopted under its other refs. A name git refuses stays a problem."""
    _, node = source
    cache = tmp_path / "hub"
    hf_hub_download(SAMPLE, "config.json", endpoint=node.url, cache_dir=cache)
    commit = (cache / FOLDER / "refs" / "main").read_text()
    for name in ("v1.0+build", "release@2024"):
        (cache / FOLDER / "refs" / name).write_text(commit)
    code, out, err = run("hf-cache", "import", "--cache-dir", str(cache), "--json", home=tmp_path / "store")
    assert code == 0, (out, err)
    found = sorted((p["problem"], p["path"].rsplit("/", 1)[1]) for p in json.loads(out)["problems"])
    assert found == [("ref-name", "release@2024"), ("ref-name", "v1.0+build")], found
    with Depot(tmp_path / "store") as depot:
        assert depot.resolve(SAMPLE) == commit
    (cache / FOLDER / "refs" / "bad:name").write_text(commit)
    code, out, err = run("hf-cache", "import", "--cache-dir", str(cache), "--json", home=tmp_path / "store")
    assert code == 1 and ("invalid", "bad:name") in [
        (p["problem"], p["path"].rsplit("/", 1)[1]) for p in json.loads(out)["problems"]
    ], out


def _relink(snapshot: Path, path: str, data: bytes) -> None:
    """Point a snapshot's (plain, git-named) file at another valid blob of ``data``."""
    from modeldepot.gitobjects import git_blob_oid

    blobs = snapshot.parent.parent / "blobs"
    (blobs / git_blob_oid(data)).write_bytes(data)
    (snapshot / path).unlink()
    (snapshot / path).symlink_to(f"../../blobs/{git_blob_oid(data)}")


def test_the_files_of_a_commit_the_store_holds_never_change(
    depot: Depot, hf_cache: Path, tmp_path: Path
) -> None:
    """A second cache's snapshot of the same commit linking config.json to other (valid) bytes replaced the
    store's file of that commit: `cat`, the node and peers sent the new bytes under the old commit, and
    verify found nothing wrong."""
    assert depot.hf_cache_import(cache_dir=hf_cache).ok
    commit = depot.resolve(SAMPLE)
    other = tmp_path / "other" / "hub"
    shutil.copytree(hf_cache, other, symlinks=True)
    shutil.rmtree(other / FOLDER / "trees")  # (no listing of the commit to tell: the store's files do)
    _relink(snapshot_of(other), "config.json", b'{"model_type": "EVIL"}')
    result = depot.hf_cache_import(cache_dir=other)
    # (the copy's other blobs are the store's bytes in files of their own: a held-twice note says so)
    assert [(p.problem, p.path) for p in result.problems if p.problem != "held-twice"] == [
        ("conflict", f"{FOLDER}/snapshots/{commit}/config.json")
    ]
    assert "never change" in result.problems[0].detail and not result.ok
    assert bytes(depot.get_file(SAMPLE, "config.json", commit)) == sample_files()["config.json"]
    assert depot.verify().ok and store_files_consistent(depot) == []


def test_a_file_the_commits_listing_gives_other_bytes_is_not_adopted(hf_cache: Path, tmp_path: Path) -> None:
    _relink(snapshot_of(hf_cache), "config.json", b'{"model_type": "EVIL"}')
    commit = snapshot_of(hf_cache).name
    with Depot(tmp_path / "fresh") as fresh:
        result = fresh.hf_cache_import(cache_dir=hf_cache)
        assert ("conflict", f"{FOLDER}/snapshots/{commit}/config.json") in [
            (p.problem, p.path) for p in result.problems
        ]
        assert not fresh.has_file(SAMPLE, "config.json") and fresh.has_file(SAMPLE, "tokenizer.json")


def test_a_commit_published_meanwhile_with_other_bytes_is_refused_whole(
    depot: Depot, hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publishing transaction itself refuses other bytes for a commit's file (a writer that published the
    commit after the import looked: here, the look skipped)."""
    from modeldepot.hfcache import adopt
    from modeldepot.store.publish import StagedFile

    assert depot.hf_cache_import(cache_dir=hf_cache).ok
    other = tmp_path / "other" / "hub"
    shutil.copytree(hf_cache, other, symlinks=True)
    shutil.rmtree(other / FOLDER / "trees")
    _relink(snapshot_of(other), "config.json", b'{"model_type": "EVIL"}')
    looked: list[int] = []

    def no_look(store, scan, repo, commit, links, verified, listing):  # type: ignore[no-untyped-def]
        looked.append(1)
        return [StagedFile(f.path, verified[f.etag].digest, verified[f.etag].git_oid, verified[f.etag].lfs)
                for f in links]  # fmt: skip

    monkeypatch.setattr(adopt, "_files_of_the_commit", no_look)
    result = depot.hf_cache_import(cache_dir=other)
    assert looked and any(p.problem == "conflict" and "never change" in p.detail for p in result.problems)
    assert bytes(depot.get_file(SAMPLE, "config.json")) == sample_files()["config.json"]


def test_a_repo_that_cannot_be_adopted_is_skipped_and_the_others_are_adopted(
    hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One repo over the disk budget stopped the whole import: the repos after it were not adopted."""
    import hashlib

    big = os.urandom(2 << 20)
    folder = hf_cache / "models--acme--aaa-big"  # (adopted first: by name)
    sha = hashlib.sha256(big).hexdigest()
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / sha).write_bytes(big)
    (folder / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("a" * 40) / "big.bin").symlink_to(f"../../blobs/{sha}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("MODELDEPOT_MAX_SIZE", "1MiB")  # room for the sample, not for the big one
    with Depot(tmp_path / "small") as small:
        result = small.hf_cache_import(cache_dir=hf_cache, copy=True)  # (linked, blobs take no room)
        assert [(p.repo_id, p.problem) for p in result.problems] == [("acme/aaa-big", "failed")]
        assert "disk budget" in result.problems[0].detail
        assert [r.repo_id for r in small.list_repos()] == [SAMPLE]
    code, out, _ = run("hf-cache", "import", "--cache-dir", str(hf_cache), "--copy", "--json",
                       home=tmp_path / "small")  # fmt: skip
    assert code == 1 and json.loads(out)["problems"], out  # (--json printed nothing when a repo failed)


def test_a_repo_that_cannot_fit_beside_those_adopted_before_it_in_the_run_is_refused_not_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a disk budget, the second repo of a run evicted the first to make its room, and the run said
    both adopted (exit 0; an explorer's trial: the summary listed a repo `ls` no longer showed)."""
    import hashlib
    import random

    cache = tmp_path / "hf"
    for name, seed in (("aaa", 1), ("bbb", 2)):
        data = random.Random(seed).randbytes(700 << 10)
        sha = hashlib.sha256(data).hexdigest()
        folder = cache / f"models--acme--{name}"
        (folder / "blobs").mkdir(parents=True)
        (folder / "blobs" / sha).write_bytes(data)
        (folder / "snapshots" / (str(seed) * 40)).mkdir(parents=True)
        (folder / "snapshots" / (str(seed) * 40) / "w.bin").symlink_to(f"../../blobs/{sha}")
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(str(seed) * 40)
    monkeypatch.setenv("MODELDEPOT_MAX_SIZE", "1MiB")  # room for one of them
    with Depot(tmp_path / "store") as store:
        result = store.hf_cache_import(cache_dir=cache, copy=True)
        assert [r.repo_id for r in result.repos] == ["acme/aaa"]
        assert [(p.repo_id, p.problem) for p in result.problems] == [("acme/bbb", "failed")]
        assert "disk budget" in result.problems[0].detail
        assert [r.repo_id for r in store.list_repos()] == ["acme/aaa"]
        assert store.budget_status().evictions == 0
        # A run of its own later may evict it, as any write evicts what was used least lately
        assert store.hf_cache_import(["acme/bbb"], cache_dir=cache, copy=True).ok
        assert [r.repo_id for r in store.list_repos()] == ["acme/bbb"]


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a file to another user: as root")
def test_another_users_files_are_copied_never_linked_even_by_root(depot: Depot, hf_cache: Path) -> None:
    weights = snapshot_of(hf_cache) / "model.safetensors"
    blob = weights.resolve()
    os.chown(blob, 12345, 12345)  # the cache's owner is not the one importing (root, in a container)
    os.chmod(blob, 0o644)
    assert depot.hf_cache_import(cache_dir=hf_cache).ok
    stored = depot.store.blobs.path(depot.file_info(SAMPLE, "model.safetensors").sha256)
    assert inode(stored) != inode(blob), "its owner could make it writable again and change the store's bytes"
    assert stat.S_IMODE(os.stat(blob).st_mode) == 0o644, "another user's file is left as it was"
    assert inode(depot.store.blobs.path(depot.file_info(SAMPLE, "config.json").sha256)) == inode(
        snapshot_of(hf_cache) / "config.json"
    ), "the importer's own files are still linked"


def test_a_listing_only_its_owner_may_read_is_a_note(
    depot: Depot, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub writes trees/<commit>.json 0600: adopting another user's cache "failed", exit 1, for
    every commit snapshot_download fetched, though each was adopted (a trial). It is a note. (Root reads any
    file: the refusal a user gets is what the test makes the listing's read raise.)"""
    read = Path.read_bytes

    def refused(path: Path) -> bytes:
        if path.parent.name == "trees":
            raise PermissionError(13, "Permission denied", str(path))
        return read(path)

    monkeypatch.setattr(Path, "read_bytes", refused)
    result = depot.hf_cache_import(cache_dir=hf_cache)
    assert result.ok and "listing-unreadable" in {p.problem for p in result.problems}, result.problems
    assert depot.resolve(SAMPLE) == snapshot_of(hf_cache).name


def test_copies_when_asked_and_the_cache_is_left_alone(depot: Depot, hf_cache: Path) -> None:
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (hf_cache / FOLDER / "blobs").iterdir()}
    result = depot.hf_cache_import(cache_dir=hf_cache, copy=True)
    assert result.ok and result.repos[0].linked_blobs == 0 and result.repos[0].copied_blobs > 0
    snapshot = snapshot_of(hf_cache)
    for entry in depot.list_files(SAMPLE):
        assert inode(snapshot / entry.path) != inode(depot.store.blobs.path(entry.sha256))
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in (hf_cache / FOLDER / "blobs").iterdir()} == modes
    assert read_tree(depot.snapshot_path(SAMPLE)) == sample_files() and depot.verify().ok


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="mounts a tmpfs: Linux, as root")
def test_copies_across_file_systems(hf_cache: Path, tmp_path: Path) -> None:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        with Depot(mount / "store", chunk_size=SMALL_CHUNK) as depot:
            result = depot.hf_cache_import(cache_dir=hf_cache)
            assert result.ok and result.repos[0].linked_blobs == 0
            assert result.repos[0].copied_blobs == result.repos[0].blobs > 0
            # (said why: "0 hard-linked, 5 copied" alone sent an admin looking, a trial)
            (note,) = result.problems
            assert note.problem == "copied" and note.detail.endswith("on another file system than the store")
            assert note.detail.startswith(f"{result.repos[0].copied_blobs} blob(s)"), note
            assert read_tree(depot.snapshot_path(SAMPLE)) == sample_files() and depot.verify().ok
            exported = depot.hf_cache_export(SAMPLE, cache_dir=tmp_path / "exported")
            assert exported.copied == exported.files and exported.linked == 0
            assert read_tree(Path(exported.snapshot_path)) == sample_files()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_failed_import_publishes_nothing_and_loses_nothing_of_the_cache(
    depot: Depot, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modeldepot.store.publish

    def failing_commit(*args: object, **kwargs: object) -> None:
        raise StoreError("the index failed (simulated)")

    monkeypatch.setattr(modeldepot.store.publish, "_commit", failing_commit)
    with pytest.raises(StoreError, match="simulated"):
        depot.hf_cache_import(cache_dir=hf_cache)
    assert depot.list_repos() == [] and store_blob_files(depot) == set()
    assert list(depot.store.layout.tmp.iterdir()) == []
    # The store's names went; the cache's hard-linked files did not.
    folder = snapshot_download(SAMPLE, cache_dir=hf_cache, local_files_only=True)
    assert read_tree(Path(folder)) == sample_files()
    monkeypatch.undo()
    assert depot.hf_cache_import(cache_dir=hf_cache).ok
    assert read_tree(depot.snapshot_path(SAMPLE)) == sample_files()


def test_a_private_repo_held_under_another_case_stays_private(
    depot: Depot, hf_cache: Path, tmp_path: Path
) -> None:
    """The cache names acme/sample; the store holds it as Acme/Sample, private. Adopting it must find that
    repo (not make a second one) and keep it private (the import looked its privacy up by the cache's case,
    found nothing, and published the repo as public)."""
    depot.import_dir(write_model_dir(tmp_path / "own", {"config.json": b"{}"}), "Acme/Sample", private=True)
    assert depot.hf_cache_import(cache_dir=hf_cache).ok
    assert [(r.repo_id, r.private) for r in depot.list_repos()] == [("Acme/Sample", True)]


def test_a_branch_stays_rather_than_move_to_an_import_a_quant_was_removed_from(
    depot: Depot, tmp_path: Path
) -> None:
    """An import's commit was taken for whole by its tree though `rm --quant` had taken files of it: a cache
    whose main named it (config alone) moved the store's main to a commit held in part (a review)."""
    files = {"config.json": b'{"a": 1}', "m-Q4_K_M.gguf": b"q4" * 5000, "m-Q8_0.gguf": b"q8" * 9000}
    older = depot.import_dir(write_model_dir(tmp_path / "x", files), "acme/m").commit_id
    cache = tmp_path / "cache"
    assert depot.hf_cache_export("acme/m", older, cache_dir=cache).ok
    newer = depot.import_dir(write_model_dir(tmp_path / "y", {**files, "config.json": b'{"a": 2}'}), "acme/m")
    depot.remove("acme/m", older, quant="Q8_0")
    folder = cache / "models--acme--m"
    for weights in (folder / "snapshots" / older).glob("*.gguf"):
        weights.unlink()  # (the cache holds its config alone, as hf_hub_download leaves it)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(older)
    later = time.time() + 5
    os.utime(folder / "refs" / "main", (later, later))
    result = depot.hf_cache_import(cache_dir=cache)
    assert [p.problem for p in result.problems] == ["branch-kept"], result.problems
    assert depot.resolve("acme/m") == newer.commit_id


@pytest.mark.parametrize("newest", ["models--Acme--Sample", FOLDER])
def test_two_spellings_of_one_repo_are_adopted_as_one_the_newest_refs_kept(
    depot: Depot, hf_cache: Path, source: tuple[Depot, LiveNode], newest: str
) -> None:
    """huggingface_hub downloads Acme/Sample and acme/sample into two folders; the Hub has one repo. They
    were merged under the sort order's spelling, main left at whichever folder came last by name, without a
    word: the newest download's refs are kept, and a note says so."""
    source_depot, _ = source
    main, dev = source_depot.resolve(SAMPLE), source_depot.resolve(SAMPLE, "dev")
    other = hf_cache / "models--Acme--Sample"
    shutil.copytree(hf_cache / FOLDER, other, symlinks=True)
    (other / "refs" / "main").write_text(dev)  # the other spelling's download saw another main
    older = FOLDER if newest != FOLDER else other.name
    os.utime(hf_cache / older / "refs" / "main", (1_000_000_000, 1_000_000_000))
    result = depot.hf_cache_import(cache_dir=hf_cache)
    assert result.ok, result.problems
    spelling = "Acme/Sample" if newest == other.name else SAMPLE
    assert [r.repo_id for r in depot.list_repos()] == [spelling]
    # (the same contents in both folders are one blob each: "6 blobs" of 3, an explorer's trial)
    blobs = {link.resolve() for link in (hf_cache / FOLDER / "blobs").iterdir()}
    assert [(r.blobs, r.new_blobs) for r in result.repos] == [(len(blobs), len(blobs))], result.repos
    # (the newest folder's main is dev's commit, of which it holds config.json alone and no listing: main
    # stays at the commit held whole, said in a note, rather than move to a few files of another)
    assert depot.resolve(SAMPLE) == main
    kept = [p for p in result.problems if p.problem == "branch-kept"]
    assert len(kept) == (1 if newest == other.name else 0), result.problems
    notes = [p for p in result.problems if p.problem == "merged"]
    assert len(notes) == 1 and notes[0].path == newest and FOLDER in notes[0].detail, result.problems
    assert depot.hf_cache_import(["ACME/sample"], cache_dir=hf_cache).ok  # asked for under a third spelling
    assert [r.repo_id for r in depot.list_repos()] == [spelling]
    code, _, err = run("hf-cache", "import", "--cache-dir", str(hf_cache), home=depot.home)
    assert code == 0 and "note" in err and "merged" in err, err


def test_a_one_off_call_under_a_mistyped_case_does_not_name_the_repo(
    depot: Depot, hf_cache: Path, source: tuple[Depot, LiveNode]
) -> None:
    """The whole repo downloaded as acme/sample, then one later call spelled ACME/Sample fetched a config:
    the newest folder is the typo's, and its spelling named the repo for good (an explorer's trial). The
    folder holding the most bytes names it."""
    _, node = source
    hf_hub_download("ACME/Sample", "config.json", endpoint=node.url, cache_dir=hf_cache)
    typo = hf_cache / "models--ACME--Sample"
    assert typo.is_dir() and len(list((typo / "blobs").iterdir())) == 1
    os.utime(hf_cache / FOLDER / "refs" / "main", (1_000_000_000, 1_000_000_000))  # the typo's is newest
    result = depot.hf_cache_import(cache_dir=hf_cache)
    assert result.ok, result.problems
    assert [r.repo_id for r in depot.list_repos()] == [SAMPLE]
    notes = [p for p in result.problems if p.problem == "merged"]
    assert len(notes) == 1 and f"as {SAMPLE};" in notes[0].detail, result.problems


def test_only_the_repos_asked_for_and_private_stays_private(
    depot: Depot, hf_cache: Path, source: tuple[Depot, LiveNode], tmp_path: Path
) -> None:
    _, node = source
    snapshot_download(MINILM, endpoint=node.url, cache_dir=hf_cache, allow_patterns=["*.json", "*.txt"])
    result = depot.hf_cache_import([MINILM], cache_dir=hf_cache)
    assert [r.repo_id for r in result.repos] == [MINILM] and [r.repo_id for r in depot.list_repos()] == [
        MINILM
    ]
    depot.import_dir(write_model_dir(tmp_path / "other", {"a.txt": b"a"}), SAMPLE, "other", private=True)
    assert depot.hf_cache_import([SAMPLE], cache_dir=hf_cache).ok
    assert depot.repo_info(SAMPLE).private  # adopting a cache never makes a private repo public
    with pytest.raises(SourceDirectoryError, match="acme/absent") as refused:
        depot.hf_cache_import(["acme/absent"], cache_dir=hf_cache)
    assert "it holds" not in str(refused.value)
    with pytest.raises(SourceDirectoryError, match=f"; it holds {MINILM}"):  # (a near miss named: a trial)
        depot.hf_cache_import([MINILM[:-3]], cache_dir=hf_cache)
    with pytest.raises(SourceDirectoryError):
        depot.hf_cache_import(cache_dir=tmp_path / "no-cache")
    with pytest.raises(InvalidInputError):
        depot.hf_cache_import(["../etc"], cache_dir=hf_cache)
    with pytest.raises(InvalidInputError, match=r"give \['acme/absent'\]"):  # (was read letter by letter)
        depot.hf_cache_import("acme/absent", cache_dir=hf_cache)  # type: ignore[arg-type]


TRUNCATE_WHILE_OPEN = """
import os, sys
from modeldepot import CorruptBlobError, Depot
home, cache_file = sys.argv[1], sys.argv[2]
with Depot(home) as depot:
    entry = depot.file_info("acme/sample", "model.safetensors")
    with depot.open_verified(entry) as reader:
        reader.check(0)
        os.chmod(cache_file, 0o644)
        os.truncate(cache_file, 1000)  # the user truncates their own cache's file, the node sending it
        try:
            reader.check(1)
        except CorruptBlobError as error:
            print("refused:", error)
    print("quarantined" if not depot.has_file("acme/sample", "model.safetensors") else "served")
"""


def test_a_blob_truncated_through_the_cache_is_refused_not_a_crash(depot: Depot, hf_cache: Path) -> None:
    """An adopted blob is one inode with the cache's: truncated there while a node sent it, the node died
    of SIGBUS (its chunk checks read a mapping past the file's new end). Run apart: it killed its process."""
    assert depot.hf_cache_import(cache_dir=hf_cache).ok
    cache_file = os.path.realpath(snapshot_of(hf_cache) / "model.safetensors")
    with depot.open_verified(depot.file_info(SAMPLE, "model.safetensors")) as reader:
        assert reader.shared  # (named by the cache too: read, never mapped)
    done = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_OPEN, str(depot.home), cache_file],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr)  # (-7: SIGBUS)
    assert "refused:" in done.stdout and "ends before chunk 1" in done.stdout and "quarantined" in done.stdout


def _unreadable(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """Listing ``folders`` (and what is inside them) fails with EACCES, as another user's 0700 folders do for
    anyone but root (the tests run as root)."""
    locked = [str(folder) for folder in folders]
    real_listdir, real_scandir = os.listdir, os.scandir

    def refuse(path: Any) -> None:
        if isinstance(path, (str, os.PathLike)):  # (not a descriptor)
            name = os.fspath(path)
            if any(name == folder or name.startswith(folder + "/") for folder in locked):
                raise PermissionError(errno.EACCES, "Permission denied", name)

    def listdir(path: Any = ".") -> list[str]:
        refuse(path)
        return real_listdir(path)

    def scandir(path: Any = ".") -> Any:
        refuse(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "scandir", scandir)  # (what os.walk lists with)


def test_an_unreadable_repo_folder_is_said_and_the_others_are_adopted(
    filled: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a cache several users share, one repo's folder another user's (0700): the import raised
    PermissionError while it listed the repos, adopted nothing, and the command printed a traceback (a
    review). Now that repo is said `unreadable` and skipped, the others adopted; a refs/ that cannot be read
    is said too, its repo adopted without branches, and so is a snapshot (its ref is no unfinished download)."""
    cache = tmp_path / "hub"
    others = ("acme/locked", "acme/norefs", "acme/nosnap")
    for repo_id in others:
        filled.import_dir(write_model_dir(tmp_path / repo_id, {"config.json": repo_id.encode()}), repo_id)
    for repo_id in (SAMPLE, *others):
        assert filled.hf_cache_export(repo_id, cache_dir=cache, copy=True).ok
    nosnap = f"models--acme--nosnap/snapshots/{filled.resolve('acme/nosnap')}"
    _unreadable(
        monkeypatch, cache / "models--acme--locked", cache / "models--acme--norefs" / "refs", cache / nosnap
    )
    with Depot(tmp_path / "adopter", chunk_size=SMALL_CHUNK) as depot:
        result = depot.hf_cache_import(cache_dir=cache)
        assert not result.ok
        assert {r.repo_id: [v.refs for v in r.revisions] for r in result.repos} == {
            SAMPLE: [("main",)],
            "acme/norefs": [()],
        }
        assert sorted((p.repo_id, p.path, p.problem) for p in result.problems) == [
            ("acme/locked", "models--acme--locked/blobs", "unreadable"),
            ("acme/norefs", "models--acme--norefs/refs", "unreadable"),
            ("acme/nosnap", "models--acme--nosnap/refs/main", "missing"),
            ("acme/nosnap", nosnap, "unreadable"),
        ]
        assert all("Permission denied" in p.detail for p in result.problems if p.problem == "unreadable")
        assert depot.resolve(SAMPLE) == filled.resolve(SAMPLE)
        assert [r.repo_id for r in depot.list_repos()].count("acme/locked") == 0
    code, out, err = run("hf-cache", "import", "--cache-dir", str(cache), home=tmp_path / "cli")
    assert code == 1 and f"adopted {SAMPLE}" in out, (out, err)
    assert "models--acme--locked/blobs (unreadable): Permission denied" in " ".join(err.split())


def test_an_unreadable_folder_inside_a_snapshot_makes_its_commit_partial(
    depot: Depot, hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.walk skips a folder it cannot list without a word: a snapshot whose onnx/ was another user's was
    adopted without its files, and nothing said so (a review). It is said `unreadable`, and the commit is
    one the cache holds in part: the store's main, at a commit it holds whole, does not move to it."""
    depot.import_dir(write_model_dir(tmp_path / "older", {"config.json": b"{}"}), SAMPLE)
    older = depot.resolve(SAMPLE)
    snapshot = snapshot_of(hf_cache)
    now = time.time() + 5  # (the cache's main written after the store's: that alone keeps no branch)
    os.utime(hf_cache / FOLDER / "refs" / "main", (now, now))
    _unreadable(monkeypatch, snapshot / "onnx")
    result = depot.hf_cache_import([SAMPLE], cache_dir=hf_cache)
    assert not result.ok
    unreadable = [p for p in result.problems if p.problem == "unreadable"]
    assert [p.path for p in unreadable] == [f"{FOLDER}/snapshots/{snapshot.name}/onnx"], result.problems
    assert "Permission denied" in unreadable[0].detail and "not adopted" in unreadable[0].detail
    assert depot.resolve(SAMPLE) == older, "main stays at the commit the store holds whole"
    said = {(p.problem, p.path) for p in result.problems}
    assert ("branch-kept", f"{FOLDER}/refs/main") in said and (
        "partial",
        f"{FOLDER}/trees/{snapshot.name}.json",
    ) in said
    adopted = {e.path for e in depot.list_files(SAMPLE, snapshot.name)}
    assert adopted == {p for p in sample_files() if not p.startswith("onnx/")}


# -- export ------------------------------------------------------------------------------------------------


@pytest.fixture
def filled(depot: Depot, tmp_path: Path) -> Depot:
    depot.import_dir(write_model_dir(tmp_path / "sample", sample_files()), SAMPLE)
    depot.import_dir(write_model_dir(tmp_path / "dev", DEV_FILES), SAMPLE, "dev")
    return depot


def test_export_is_found_offline_by_huggingface_hub(filled: Depot, tmp_path: Path) -> None:
    cache = tmp_path / "empty" / "hub"
    result = filled.hf_cache_export(SAMPLE, cache_dir=cache)
    dev = filled.hf_cache_export(SAMPLE, "dev", cache_dir=cache)
    assert result.ok and dev.ok and result.files == len(sample_files()) and result.linked == result.files
    # (a typo in --cache-dir made a cache nothing reads without a word: a trial)
    assert [p.problem for p in result.problems] == ["new-cache"] and dev.problems == ()
    # A folder of other things (`--cache-dir .`) is said too: an import refuses it (an explorer's trial)
    sources = tmp_path / "sources"
    (sources / "my-model").mkdir(parents=True)
    into_sources = filled.hf_cache_export(SAMPLE, cache_dir=sources)
    assert [p.problem for p in into_sources.problems] == ["new-cache"], into_sources.problems
    assert "held no Hugging Face cache" in into_sources.problems[0].detail
    assert filled.hf_cache_export(SAMPLE, cache_dir=sources).problems == ()  # (a cache now)
    fresh = tmp_path / "fresh-cache"  # (transformers' version.txt alone: a cache all the same, a review)
    fresh.mkdir()
    (fresh / "version.txt").write_text("1")
    assert filled.hf_cache_export(SAMPLE, cache_dir=fresh).problems == ()
    with pytest.raises(InvalidInputError, match="inside the store"):
        filled.hf_cache_export(SAMPLE, cache_dir=filled.home / "hub")
    for path, data in sample_files().items():
        found = hf_hub_download(SAMPLE, path, cache_dir=cache, local_files_only=True)
        assert Path(found).read_bytes() == data
        assert inode(found) == inode(filled.store.blobs.path(filled.file_info(SAMPLE, path).sha256))
    folder = snapshot_download(SAMPLE, cache_dir=cache, local_files_only=True)
    assert read_tree(Path(folder)) == sample_files() and folder == result.snapshot_path
    assert Path(folder).name == filled.resolve(SAMPLE)
    found = hf_hub_download(SAMPLE, "config.json", revision="dev", cache_dir=cache, local_files_only=True)
    assert Path(found).read_bytes() == DEV_FILES["config.json"]
    by_commit = filled.resolve(SAMPLE, "dev")
    assert (
        read_tree(Path(snapshot_download(SAMPLE, revision=by_commit, cache_dir=cache, local_files_only=True)))
        == DEV_FILES
    )
    scanned = scan_cache_dir(cache)
    assert scanned.warnings == []
    (repo,) = scanned.repos
    assert repo.repo_id == SAMPLE and repo.repo_type == "model"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {
        filled.resolve(SAMPLE): {"main"},
        filled.resolve(SAMPLE, "dev"): {"dev"},
    }
    again = filled.hf_cache_export(SAMPLE, cache_dir=cache)
    assert (again.kept, again.linked, again.copied) == (len(sample_files()), 0, 0)
    assert list((cache / FOLDER).glob(".modeldepot-*")) == []  # no temporary file left


def test_an_export_beside_an_rm_of_its_repo_keeps_what_it_exported_and_says_the_ref_is_not_set(
    filled: Depot, tmp_path: Path
) -> None:
    """An `rm` of the repo while an export wrote its files: the export went on (its blobs were open), then
    failed "not in the store" at the ref, exit 1, and left every file it had written (an explorer's trial).
    The files went out whole: they stay, and the ref is said not set."""
    cache, files = tmp_path / "hf" / "hub", sample_files()

    def removed_at_the_last_file(name: str, done: int, total: int) -> None:
        if done == total:
            with Depot(filled.home) as other:  # (another process's `rm`)
                other.remove(SAMPLE)

    result = filled.hf_cache_export(SAMPLE, cache_dir=cache, progress=removed_at_the_last_file)
    with pytest.raises(NotFoundError):
        filled.resolve(SAMPLE)
    (unset,) = [p for p in result.problems if p.problem != "new-cache"]
    assert result.files == len(files) and unset.problem == "ref-not-set", result
    assert "removed from the store while it was exported" in unset.detail
    snapshot = cache / FOLDER / "snapshots" / result.commit_id
    assert read_tree(snapshot) == files and not (cache / FOLDER / "refs" / "main").exists()


def test_an_export_beside_an_rm_of_its_branch_says_the_ref_is_not_set_and_a_hex_branch_gets_its_ref(
    filled: Depot, tmp_path: Path
) -> None:
    """(A review.) The branch alone removed while its commit was exported left no ref and said nothing; and
    a branch whose name looks like a commit's start (a date: 20241105) got no ref."""
    cache = tmp_path / "hf" / "hub"

    def removed_at_the_last_file(name: str, done: int, total: int) -> None:
        if done == total:
            with Depot(filled.home) as other:
                other.remove(SAMPLE, "dev")

    result = filled.hf_cache_export(SAMPLE, "dev", cache_dir=cache, progress=removed_at_the_last_file)
    (unset,) = [p for p in result.problems if p.problem != "new-cache"]
    assert unset.problem == "ref-not-set" and "the branch was removed from the store" in unset.detail, result
    # (no write makes such a branch now; one adopted from a Hugging Face cache's refs may be there)
    main = filled.resolve(SAMPLE)
    with filled.store.index.write("a branch adopted from a cache") as con:
        con.execute(
            "INSERT INTO refs (repo_id, name, commit_id, updated_at) VALUES (?, '20241105', ?, 0)",
            (SAMPLE, main),
        )
    dated = filled.hf_cache_export(SAMPLE, "20241105", cache_dir=cache)
    assert dated.ok, dated
    assert (cache / FOLDER / "refs" / "20241105").read_text() == main


def test_export_leaves_a_file_of_the_users_in_a_snapshot_alone(filled: Depot, tmp_path: Path) -> None:
    """A config patched in the cache (its link replaced by a file, a common fix) was replaced by the link again
    without a word by the next export, counted "already there" (a trial). It stays, said in a note."""
    cache = tmp_path / "exported" / "hub"
    assert filled.hf_cache_export(SAMPLE, cache_dir=cache).ok
    patched = cache / FOLDER / "snapshots" / filled.resolve(SAMPLE) / "config.json"
    patched.unlink()
    patched.write_bytes(b'{"patched": true}')
    again = filled.hf_cache_export(SAMPLE, cache_dir=cache)
    assert again.ok and [(p.problem, p.path) for p in again.problems] == [
        ("own-file", f"{FOLDER}/snapshots/{filled.resolve(SAMPLE)}/config.json")
    ]
    assert patched.read_bytes() == b'{"patched": true}' and not patched.is_symlink()
    assert again.files == len(sample_files()) - 1 and again.kept == len(sample_files())
    found = hf_hub_download(SAMPLE, "config.json", cache_dir=cache, local_files_only=True)
    assert Path(found).read_bytes() == b'{"patched": true}'


def test_export_lays_the_cache_out_as_a_download_does(source: tuple[Depot, LiveNode], tmp_path: Path) -> None:
    origin, node = source
    downloaded, exported = tmp_path / "downloaded", tmp_path / "exported"
    for revision in ("main", "dev", "refs/pr/1"):
        snapshot_download(SAMPLE, revision=revision, endpoint=node.url, cache_dir=downloaded)
        origin.hf_cache_export(SAMPLE, revision, cache_dir=exported)

    def layout(cache: Path) -> dict[str, str | bytes]:
        found: dict[str, str | bytes] = {}
        for path in sorted((cache / FOLDER).rglob("*")):
            relative = path.relative_to(cache / FOLDER).as_posix()
            if relative.split("/")[0] not in ("blobs", "snapshots", "refs") or path.is_dir():
                continue  # trees/ (huggingface_hub's listing cache) and folders
            found[relative] = os.readlink(path) if path.is_symlink() else path.read_bytes()
        return found

    assert layout(exported) == layout(downloaded)
    assert any(key.startswith("refs/refs/pr/") for key in layout(exported))


def test_an_export_beside_another_leaves_no_temporary_name(
    filled: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two exports of one repo at once: the second one's link, renamed over the first one's link to the same
    file, stayed under its temporary name (a rename between two links to one file does nothing)."""
    from modeldepot.hfcache import export

    cache = tmp_path / "c" / "hub"
    assert filled.hf_cache_export(SAMPLE, cache_dir=cache).ok
    monkeypatch.setattr(
        export._CacheWriter, "_holds", lambda *args: False
    )  # (both looked before either linked)
    assert filled.hf_cache_export(SAMPLE, cache_dir=cache).ok
    assert [p.name for p in (cache / FOLDER / "blobs").iterdir() if p.name.endswith(".tmp")] == []


def test_export_copies_when_asked_and_repairs_a_damaged_blob(filled: Depot, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    result = filled.hf_cache_export(SAMPLE, cache_dir=cache, copy=True)
    assert result.copied == result.files and result.linked == 0
    weights = Path(os.path.realpath(Path(result.snapshot_path) / "model.safetensors"))
    assert inode(weights) != inode(
        filled.store.blobs.path(filled.file_info(SAMPLE, "model.safetensors").sha256)
    )
    flip_byte(weights, 5)
    again = filled.hf_cache_export(SAMPLE, cache_dir=cache, copy=True)
    assert (again.kept, again.copied) == (result.files - 1, 1)
    # Said, as a note (it was replaced without a word: an explorer's trial)
    assert [(p.problem, p.path.rsplit("/", 1)[-1]) for p in again.problems] == [("repaired", weights.name)]
    assert again.ok
    # A dangling link in its place is no corrupt file of the cache: replaced, without that note (a review)
    weights.unlink()
    weights.symlink_to(tmp_path / "gone")
    third = filled.hf_cache_export(SAMPLE, cache_dir=cache, copy=True)
    assert third.ok and not third.problems and third.copied == 1
    assert (
        read_tree(Path(snapshot_download(SAMPLE, cache_dir=cache, local_files_only=True))) == sample_files()
    )


def test_export_skips_a_quarantined_file(filled: Depot, tmp_path: Path) -> None:
    """A file whose blob is quarantined is skipped, and the branch's ref is not set to the snapshot that lacks
    it (offline loaders found such a snapshot and failed for the file with "couldn't connect": a trial)."""
    filled.store.quarantine(filled.file_info(SAMPLE, "tokenizer.json").sha256)
    (tmp_path / "hub").mkdir()  # (a cache there already: no note that one was made)
    result = filled.hf_cache_export(SAMPLE, cache_dir=tmp_path / "hub")
    assert not result.ok and [(p.problem, p.path.rsplit("/", 1)[-1]) for p in result.problems] == [
        ("corrupt", "tokenizer.json"),
        ("ref-not-set", "main"),
    ]
    # (an imported repo is imported again: a pull would ask the Hub for another repo of its name, an explorer's
    # trial)
    assert "(import it again; then export again)" in result.problems[1].detail
    assert result.files == len(sample_files()) - 1
    folder = Path(result.snapshot_path)
    assert read_tree(folder) == {p: d for p, d in sample_files().items() if p != "tokenizer.json"}
    assert not (tmp_path / "hub" / FOLDER / "refs" / "main").exists()


def test_export_rehashes_a_blob_changed_in_place_through_an_adopted_cache(
    depot: Depot, hf_cache: Path, tmp_path: Path
) -> None:
    """An adopted blob shares its inode with the Hugging Face cache, which can change it in place; an
    export linked it on unchecked (a new user's trial), so the corrupt bytes reached a second cache."""
    assert depot.hf_cache_import(cache_dir=hf_cache).ok
    entry = depot.file_info(SAMPLE, "model.safetensors")
    shared = snapshot_of(hf_cache) / "model.safetensors"
    assert inode(shared) == inode(depot.store.blobs.path(entry.sha256))
    flip_byte(shared, 1000, keep_mtime=False)  # (a write through the cache's name)
    (tmp_path / "other" / "hub").mkdir(parents=True)  # (a cache there already: no note that one was made)
    result = depot.hf_cache_export(SAMPLE, cache_dir=tmp_path / "other" / "hub")
    assert [(p.problem, p.path.rsplit("/", 1)[-1]) for p in result.problems] == [
        ("corrupt", "model.safetensors"),
        ("ref-not-set", "main"),
    ]
    assert "changed after it was stored" in result.problems[0].detail
    exported = read_tree(Path(result.snapshot_path))
    assert exported == {p: d for p, d in sample_files().items() if p != "model.safetensors"}
    assert not depot.has_file(SAMPLE, "model.safetensors"), "quarantined"
    # The blobs nobody changed went out at once, by link, without a rehash: the check costs a stat.
    assert result.linked == len(sample_files()) - 1


def test_an_export_again_takes_out_of_the_cache_a_blob_damaged_with_the_stores(
    filled: Depot, tmp_path: Path
) -> None:
    """Exported by hard links, the cache's name and the store's were one file; damaged (a power loss before its
    flush), an export again said it "repaired" the cache's, which stayed the damaged file under refs/main, and
    offline loads read the corrupt weights (an explorer's trial). It goes from the cache; the ref says so."""
    cache = tmp_path / "hub"
    assert filled.hf_cache_export(SAMPLE, cache_dir=cache).ok
    entry = filled.file_info(SAMPLE, "model.safetensors")
    blob = cache / FOLDER / "blobs" / entry.etag
    assert inode(blob) == inode(filled.store.blobs.path(entry.sha256))
    flip_byte(blob, 1000, keep_mtime=False)
    again = filled.hf_cache_export(SAMPLE, cache_dir=cache)
    said = {p.problem: p.detail for p in again.problems}
    assert set(said) == {"corrupt", "removed", "ref-not-set"}, again.problems
    assert "an export before" in said["ref-not-set"] and "repaired" not in said
    assert not blob.exists()
    with pytest.raises(Exception, match=r"(?i)offline|cannot find|local"):
        hf_hub_download(SAMPLE, "model.safetensors", cache_dir=cache, local_files_only=True)


def test_an_export_sweeps_what_a_killed_one_left_and_a_failed_one_leaves_no_empty_snapshot(
    filled: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed export left its temporary file (400 MB in the trial) in the cache's blobs/ for good; a failed
    one an empty snapshot folder, which snapshot_download offline returned as a snapshot with no files."""
    cache = tmp_path / "hub"
    blobs = cache / FOLDER / "blobs"
    blobs.mkdir(parents=True)
    stale = blobs / f".modeldepot-{_ended_pid()}-0123456789ab.tmp"
    stale.write_bytes(b"x" * 1000)
    live = blobs / f".modeldepot-{os.getpid()}-0123456789ab.tmp"  # (a running export's: kept)
    live.write_bytes(b"y")
    stale_link = (
        cache / FOLDER / f".modeldepot-{_ended_pid()}-ba9876543210.tmp"
    )  # (a link's, in the repo folder)
    stale_link.symlink_to("snapshots")
    import modeldepot.hfcache.export

    def full_disk(*args: object, **kwargs: object) -> str:
        raise StoreError("no space left (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(modeldepot.hfcache.export._CacheWriter, "blob", full_disk)
        with pytest.raises(StoreError, match="simulated"):
            filled.hf_cache_export(SAMPLE, cache_dir=cache)
    assert not stale.exists() and live.exists() and not stale_link.is_symlink()
    commit_id = filled.resolve(SAMPLE)
    assert not (cache / FOLDER / "snapshots" / commit_id).exists()
    result = filled.hf_cache_export(SAMPLE, cache_dir=cache)
    assert result.ok and read_tree(Path(result.snapshot_path)) == sample_files()


def test_an_export_that_fails_midway_takes_back_what_it_added(
    filled: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that filled mid-export left the snapshot with the configs and no weights, which an offline
    `snapshot_download(revision=<commit>)` returned as the commit (an explorer's trial). What the failed run
    added is taken back; what an earlier export put there stays."""
    import modeldepot.hfcache.export

    real_blob = modeldepot.hfcache.export._CacheWriter.blob
    calls = {"n": 0, "fail_at": 3}

    def fills_up(self: object, *args: object, **kwargs: object) -> str:
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise StoreError("cannot write x in the Hugging Face cache: No space left on device (simulated)")
        return real_blob(self, *args, **kwargs)  # type: ignore[arg-type]

    cache = tmp_path / "hub"
    commit_id = filled.resolve(SAMPLE)
    snapshot = cache / FOLDER / "snapshots" / commit_id
    with monkeypatch.context() as patch:
        patch.setattr(modeldepot.hfcache.export._CacheWriter, "blob", fills_up)
        with pytest.raises(StoreError, match="nothing of this export was kept"):
            filled.hf_cache_export(SAMPLE, cache_dir=cache)
    assert not snapshot.exists()
    # (the repo's folder, new to the cache, goes whole: its empty blobs/ and snapshots/ stayed, a trial)
    assert not (cache / FOLDER).exists() and cache.exists()
    offline = subprocess.run([sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download; "
                              "snapshot_download(sys.argv[1], revision=sys.argv[2], cache_dir=sys.argv[3], "
                              "local_files_only=True)", SAMPLE, commit_id, str(cache)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert offline.returncode != 0, "no partial snapshot for huggingface_hub to hand out"

    assert filled.hf_cache_export(SAMPLE, cache_dir=cache).ok  # then an export that worked...
    (snapshot / "config.json").unlink()  # ... and one file gone since
    calls.update(n=0, fail_at=len(sample_files()))
    with monkeypatch.context() as patch:
        patch.setattr(modeldepot.hfcache.export._CacheWriter, "blob", fills_up)
        with pytest.raises(StoreError):
            filled.hf_cache_export(SAMPLE, cache_dir=cache)
    assert read_tree(snapshot) == {p: d for p, d in sample_files().items() if p != "config.json"}


def _ended_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_an_export_of_nothing_writes_no_ref(filled: Depot, tmp_path: Path) -> None:
    """Every file skipped (quarantined): the ref pointed at a snapshot that was not there."""
    for entry in filled.list_files(SAMPLE):
        filled.store.quarantine(entry.sha256)
    result = filled.hf_cache_export(SAMPLE, cache_dir=tmp_path / "hub")
    assert result.files == 0 and not (tmp_path / "hub" / FOLDER / "refs" / "main").exists()


def test_an_export_by_a_short_commit_writes_its_ref_as_a_download_does_and_the_cli_prints_it(
    filled: Depot, tmp_path: Path
) -> None:
    """An export by its whole commit id writes no ref; by the start of one, refs/<those digits>, as
    huggingface_hub writes for a download by them (without it, offline code asking for the revision the export
    was given failed, an explorer's trial), which an import takes for no branch. `hf-cache import` printed
    "1 revision(s) , 6 blobs" when a commit id began with a-f (rich read "[e00f… (main)]" as markup)."""
    commit = filled.resolve(SAMPLE)
    hub = tmp_path / "hub"
    assert filled.hf_cache_export(SAMPLE, commit, cache_dir=hub).files == len(sample_files())
    assert not (hub / FOLDER / "refs").exists() or list((hub / FOLDER / "refs").iterdir()) == []
    assert filled.hf_cache_export(SAMPLE, commit[:7], cache_dir=hub).ok
    assert (hub / FOLDER / "refs" / commit[:7]).read_text() == commit
    found = hf_hub_download(SAMPLE, "config.json", revision=commit[:7], cache_dir=hub, local_files_only=True)
    assert Path(found).read_bytes() == sample_files()["config.json"]
    filled.hf_cache_export(SAMPLE, cache_dir=hub)  # by its branch: refs/main
    adopted = CliRunner().invoke(cli, ["hf-cache", "import", "--cache-dir", str(hub), "--home",
                                       str(tmp_path / "again")])  # fmt: skip
    assert adopted.exit_code == 0, adopted.output
    assert f"1 revision [{commit[:12]} (main)]" in adopted.output, adopted.output


def test_a_model_both_downloaded_and_pulled_is_on_the_disk_once_after_an_export(
    source: tuple[Depot, LiveNode], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model huggingface_hub downloaded and the store pulled again (before the cache was adopted) was on
    the disk twice for good: the import hashed the cache's files and linked nothing, the export called them
    "already there" (an explorer's trial). The import says so; the export makes the cache's blobs links to
    the store's, and huggingface_hub still reads them offline."""
    _, hub = source
    cache = tmp_path / "hf" / "hub"
    snapshot_download(SAMPLE, endpoint=hub.url, cache_dir=cache)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.pull(SAMPLE)
        blobs = sorted((cache / FOLDER / "blobs").iterdir())

        def shared() -> int:
            return sum(os.path.samefile(blob, depot.store.blobs.path(depot.file_info(SAMPLE, path).sha256))
                       for blob in blobs for path in sample_files()
                       if depot.file_info(SAMPLE, path).etag == blob.name)  # fmt: skip

        assert shared() == 0
        adopted = depot.hf_cache_import([SAMPLE], cache_dir=cache)
        assert adopted.ok  # (a note: nothing skipped)
        [twice] = [p for p in adopted.problems if p.problem == "held-twice"]
        assert f"{len(blobs)} blob(s)" in twice.detail and f"hf-cache export {SAMPLE}" in twice.detail
        exported = depot.hf_cache_export(SAMPLE, cache_dir=cache)
        assert (exported.linked, exported.copied, exported.kept) == (len(blobs), 0, 0)
        assert shared() == len(blobs) == len(sample_files())
        assert not [p for p in depot.hf_cache_import([SAMPLE], cache_dir=cache).problems
                    if p.problem == "held-twice"]  # fmt: skip
        again = depot.hf_cache_export(SAMPLE, cache_dir=cache)  # (nothing more to do)
        assert (again.linked, again.kept) == (0, len(blobs))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = snapshot_download(SAMPLE, cache_dir=cache, local_files_only=True)
    assert read_tree(Path(folder)) == sample_files()


def test_an_import_says_which_blobs_have_names_outside_the_cache_it_makes_read_only(
    depot: Depot, hf_cache: Path, tmp_path: Path
) -> None:
    """A `cp -al` backup of a cache blob is one file with it: the import made both names read-only without a
    word, and they stay so after the store lets go (an explorer's trial). It says so, once."""
    blob = next(p for p in (hf_cache / FOLDER / "blobs").iterdir() if len(p.name) == 64)
    os.link(blob, tmp_path / "backup.safetensors")
    # (a git-named one too: staged again by every import, it is the store's own name the second time)
    small = next(p for p in (hf_cache / FOLDER / "blobs").iterdir() if len(p.name) == 40)
    os.link(small, tmp_path / "backup.json")
    adopted = depot.hf_cache_import(cache_dir=hf_cache)
    assert adopted.ok
    [note] = [p for p in adopted.problems if p.problem == "named-elsewhere"]
    assert note.detail.startswith("2 blob(s)") and "read-only" in note.detail
    assert not os.stat(tmp_path / "backup.safetensors").st_mode & 0o222
    again = depot.hf_cache_import(cache_dir=hf_cache)
    assert "named-elsewhere" not in {p.problem for p in again.problems}


def test_a_repo_folder_moved_to_another_disk_and_linked_back_is_adopted_and_fed(
    depot: Depot, hf_cache: Path, tmp_path: Path
) -> None:
    """`mv models--org--big /data/ && ln -s /data/models--org--big` (to free the home disk; huggingface_hub reads
    it): the import refused every file as "outside the cache", the export said to remove the link (an
    explorer's trial). A link to a folder of the same name is the repo's folder; one under another name is not."""
    moved = tmp_path / "bigdisk" / FOLDER
    moved.parent.mkdir()
    shutil.move(hf_cache / FOLDER, moved)
    (hf_cache / FOLDER).symlink_to(moved)
    adopted = depot.hf_cache_import(cache_dir=hf_cache)
    assert adopted.ok, adopted.problems
    assert read_tree(depot.snapshot_path(SAMPLE)) == sample_files()
    exported = depot.hf_cache_export(SAMPLE, "dev", cache_dir=hf_cache)
    assert exported.ok and (moved / "refs" / "dev").read_text() == depot.resolve(SAMPLE, "dev")
    assert read_tree(Path(snapshot_download(SAMPLE, revision="dev", cache_dir=hf_cache, local_files_only=True))) \
        == read_tree(depot.snapshot_path(SAMPLE, "dev"))  # fmt: skip
    # A link another user made (in a cache others may write: one to someone else's cache, whose folders have the
    # very same names) leads nowhere the store adopts from (a review: its repo was adopted and served)
    if os.geteuid() == 0:
        os.lchown(hf_cache / FOLDER, 65534, 65534)
        with Depot(tmp_path / "planted") as fresh:
            planted = fresh.hf_cache_import(cache_dir=hf_cache)
            assert not planted.repos and {p.problem for p in planted.problems} >= {"outside"}, (
                planted.problems
            )
        os.lchown(hf_cache / FOLDER, 0, 0)
    # Under another name, what it leads to stays outside the cache
    other = tmp_path / "elsewhere" / "not-a-repo-folder"
    other.parent.mkdir()
    (hf_cache / FOLDER).unlink()
    shutil.move(moved, other)
    (hf_cache / FOLDER).symlink_to(other)
    with Depot(tmp_path / "other") as fresh:
        refused = fresh.hf_cache_import(cache_dir=hf_cache)
        assert not refused.repos and {p.problem for p in refused.problems} >= {"outside"}
        with pytest.raises(InvalidInputError, match="remove that link"):
            depot.hf_cache_export(SAMPLE, cache_dir=hf_cache)


def test_export_refuses_to_write_through_a_link_out_of_the_cache(filled: Depot, tmp_path: Path) -> None:
    cache, elsewhere = tmp_path / "hub", tmp_path / "elsewhere"
    cache.mkdir()
    elsewhere.mkdir()
    (cache / FOLDER).symlink_to(elsewhere)
    with pytest.raises(InvalidInputError, match="not a folder inside the cache"):
        filled.hf_cache_export(SAMPLE, cache_dir=cache)
    assert list(elsewhere.iterdir()) == []
    code, _, err = run("hf-cache", "export", SAMPLE, "--cache-dir", str(cache), home=filled.home)
    assert code == 2 and "refusing" in err and list(elsewhere.iterdir()) == []


def test_export_then_import_round_trips(filled: Depot, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    filled.hf_cache_export(SAMPLE, cache_dir=cache)
    filled.hf_cache_export(SAMPLE, "dev", cache_dir=cache)
    with Depot(tmp_path / "second", chunk_size=SMALL_CHUNK) as second:
        assert second.hf_cache_import(cache_dir=cache).ok
        for branch in ("main", "dev"):
            assert second.resolve(SAMPLE, branch) == filled.resolve(SAMPLE, branch)
            assert [(e.path, e.sha256, e.git_oid, e.lfs) for e in second.list_files(SAMPLE, branch)] == [
                (e.path, e.sha256, e.git_oid, e.lfs) for e in filled.list_files(SAMPLE, branch)
            ]


# -- the real model, and the command -------------------------------------------------------------------------


def test_the_real_model_both_ways_and_transformers_offline(
    depot: Depot, source: tuple[Depot, LiveNode], tmp_path: Path
) -> None:
    _, node = source
    downloaded = tmp_path / "downloaded"
    snapshot_download(MINILM, endpoint=node.url, cache_dir=downloaded)
    assert depot.hf_cache_import([MINILM], cache_dir=downloaded).ok
    assert read_tree(depot.snapshot_path(MINILM)) == read_tree(minilm_model_dir())
    weights = depot.file_info(MINILM, "model.safetensors")
    assert weights.lfs and inode(depot.file_path(MINILM, "model.safetensors")) == inode(
        depot.store.blobs.path(weights.sha256)
    )
    exported = tmp_path / "exported"
    assert depot.hf_cache_export(MINILM, cache_dir=exported).ok
    script = (
        "import json, sys, transformers\n"
        f"tok = transformers.AutoTokenizer.from_pretrained({MINILM!r}, cache_dir=sys.argv[1])\n"
        f"cfg = transformers.AutoConfig.from_pretrained({MINILM!r}, cache_dir=sys.argv[1])\n"
        "print(json.dumps({'ids': tok('modeldepot adopts caches')['input_ids'], 'type': cfg.model_type}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "unused-hf-home")}
    done = subprocess.run([sys.executable, "-c", script, str(exported)], env=env, capture_output=True,
                          text=True, timeout=180, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(minilm_model_dir())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "ids": reference("modeldepot adopts caches")["input_ids"],
        "type": "bert",
    }


def test_a_relative_cache_dir_is_answered_as_an_absolute_path(
    home: Path, hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--cache-dir c3` came back as "c3" in --json and the snapshot path printed: a script passing it on
    from another folder named nothing (an explorer's trial)."""
    assert run("hf-cache", "import", "--cache-dir", str(hf_cache), home=home)[0] == 0
    monkeypatch.chdir(tmp_path)
    code, out, _ = run("hf-cache", "export", SAMPLE, "--cache-dir", "relative", "--json", home=home)
    body = json.loads(out)
    assert code == 0 and body["cache_dir"] == str(tmp_path / "relative"), body
    assert Path(body["snapshot_path"]).is_absolute() and Path(body["snapshot_path"]).is_dir()
    code, out, _ = run("hf-cache", "import", "--cache-dir", "relative", "--json", home=home)
    assert code == 0 and json.loads(out)["cache_dir"] == str(tmp_path / "relative")


def test_the_command(home: Path, hf_cache: Path, tmp_path: Path) -> None:
    code, out, _ = run("hf-cache", "import", "--cache-dir", str(hf_cache), "--json", home=home)
    body = json.loads(out)
    assert code == 0 and body["ok"] and body["problems"] == []
    assert [r["repo_id"] for r in body["repos"]] == [SAMPLE] and body["repos"][0]["new_blobs"] > 0
    code, out, _ = run("hf-cache", "import", SAMPLE, "--cache-dir", str(hf_cache), home=home)
    assert code == 0 and f"adopted {SAMPLE}" in out and "0 new" in out
    assert "(0 hard-linked, 0 copied)" in out, "a run again brought nothing in, and says so"
    # What no run could ever adopt is said, as notes: a legacy id, a download left unfinished that no snapshot
    # names (every scheduled import "failed" for good over them: a trial)
    (hf_cache / "models--gpt2" / "snapshots").mkdir(parents=True)
    stale = next((hf_cache / FOLDER / "blobs").iterdir())
    (stale.parent / f"{'0' * 64}.incomplete").write_bytes(b"half")
    code, out, err = run("hf-cache", "import", "--cache-dir", str(hf_cache), home=home)
    assert code == 0 and "note models--gpt2 (legacy-id)" in err and "openai-community/gpt2" in err, err
    assert "--repo ORG/gpt2 --link" in " ".join(err.split()), "the way to take its files as they are"
    assert "(incomplete)" in err, err
    shutil.rmtree(hf_cache / "models--gpt2")
    (stale.parent / f"{'0' * 64}.incomplete").unlink()
    exported = tmp_path / "exported"
    code, out, _ = run("hf-cache", "export", SAMPLE, "--cache-dir", str(exported), "--json", home=home)
    body = json.loads(out)
    assert code == 0 and body["ok"] and body["files"] == len(sample_files())
    assert (
        Path(hf_hub_download(SAMPLE, "empty.txt", cache_dir=exported, local_files_only=True)).read_bytes()
        == b""
    )
    code, out, _ = run("hf-cache", "export", SAMPLE, "-r", "dev", "--cache-dir", str(exported), home=home)
    assert code == 0 and "exported acme/sample@dev" in out
    # Something skipped: reported, exit 1.
    (snapshot_of(hf_cache) / "stray.txt").write_bytes(b"a file, not a link")
    code, out, err = run("hf-cache", "import", "--cache-dir", str(hf_cache), "--json", home=home)
    assert code == 1 and not json.loads(out)["ok"]
    assert [p["problem"] for p in json.loads(out)["problems"]] == ["unlisted"]
    code, _, err = run("hf-cache", "import", "--cache-dir", str(hf_cache), home=home)
    assert code == 1 and "stray.txt" in err
    # Bad input: exit 2 before anything opens; absent things: exit 1.
    assert run("hf-cache", "import", "not/a/repo", home=home)[0] == 2
    assert run("hf-cache", "export", "nope", home=home)[0] == 2
    assert run("hf-cache", "export", SAMPLE, "-r", "../x", home=home)[0] == 2
    code, _, err = run("hf-cache", "import", "acme/absent", "--cache-dir", str(hf_cache), home=home)
    assert code == 1 and "acme/absent" in err
    assert run("hf-cache", "export", "acme/absent", "--cache-dir", str(exported), home=home)[0] == 1
    (tmp_path / "a-file").write_bytes(b"")
    code, _, err = run("hf-cache", "export", SAMPLE, "--cache-dir", str(tmp_path / "a-file"), home=home)
    assert code == 2 and "is a file, not a folder" in err, err


def test_the_default_cache_is_huggingface_hubs(pristine: Path, tmp_path: Path) -> None:
    """HF_HOME (and HF_HUB_CACHE) decide where both directions look, as for huggingface_hub itself."""
    hf_home = tmp_path / "hf-home"
    shutil.copytree(pristine, hf_home / "hub", symlinks=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env["HF_HOME"] = str(hf_home)
    command = [sys.executable, "-m", "modeldepot", "hf-cache"]
    done = subprocess.run([*command, "import", "--json", "--home", str(tmp_path / "store")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["cache_dir"] == str(hf_home / "hub") and [r["repo_id"] for r in body["repos"]] == [SAMPLE]
    env["HF_HUB_CACHE"] = str(tmp_path / "elsewhere")
    done = subprocess.run([*command, "export", SAMPLE, "--json", "--home", str(tmp_path / "store")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert read_tree(
        tmp_path / "elsewhere" / FOLDER / "snapshots" / json.loads(done.stdout)["commit_id"]
    ) == (sample_files())


def test_an_export_keeps_a_ref_to_another_snapshot_and_says_what_it_names(tmp_path: Path) -> None:
    """An export of a store whose main was older than the cache's moved the cache's refs/main back without a
    word: offline code loaded older weights (a trial). Such a ref stays (the export says so, and fails)
    unless --move-ref; a move is said. An export under another case than the store's says which spelling
    huggingface_hub will find; HF_HOME given for its hub/ cache is refused, for an import too."""
    cache = tmp_path / "hf" / "hub"
    newer, older = (
        {"config.json": b'{"v": 2}', "w.bin": b"2" * 100},
        {"config.json": b'{"v": 1}', "w.bin": b"1" * 100},
    )
    with (
        Depot(tmp_path / "new", chunk_size=SMALL_CHUNK) as new,
        Depot(tmp_path / "old", chunk_size=SMALL_CHUNK) as old,
    ):
        b = new.import_dir(write_model_dir(tmp_path / "b", newer), "acme/m").commit_id
        a = old.import_dir(write_model_dir(tmp_path / "a", older), "acme/m").commit_id
        assert new.hf_cache_export("acme/m", cache_dir=cache).ok
        ref = cache / "models--acme--m" / "refs" / "main"
        kept = old.hf_cache_export("acme/m", cache_dir=cache)
        assert not kept.ok and ref.read_text() == b and (cache / "models--acme--m" / "snapshots" / a).is_dir()
        [problem] = kept.problems
        assert problem.problem == "ref-kept" and b[:12] in problem.detail and "--move-ref" in problem.detail
        said = CliRunner().invoke(cli, ["hf-cache", "export", "acme/m", "--cache-dir", str(cache), "--home",
                                        str(old.home)])  # fmt: skip
        assert said.exit_code == 1 and "ref-kept" in said.output and ref.read_text() == b, said.output
        moved = old.hf_cache_export("acme/m", cache_dir=cache, move_ref=True)
        assert moved.ok and ref.read_text() == a
        assert [(p.problem, p.detail) for p in moved.problems] == [
            ("ref-moved", f"moved from {b[:12]} to {a[:12]}")
        ]
        # The store's branch moves on (a pull, then an export, on a schedule): a commit it knows is moved from
        c = old.import_dir(
            write_model_dir(tmp_path / "c", {**older, "w.bin": b"3" * 100}), "acme/m"
        ).commit_id
        forward = old.hf_cache_export("acme/m", cache_dir=cache)
        assert forward.ok and ref.read_text() == c, forward.problems
        assert [p.problem for p in forward.problems] == ["ref-moved"]
        spelled = old.hf_cache_export("ACME/M", cache_dir=cache)
        assert spelled.ok and [p.problem for p in spelled.problems] == ["spelling"]
        assert "'acme/m'" in spelled.problems[0].detail
        with pytest.raises(InvalidInputError, match="looks like HF_HOME"):
            old.hf_cache_export("acme/m", cache_dir=tmp_path / "hf")
        with pytest.raises(InvalidInputError, match=r"whose cache is .*hub \(HF_HUB_CACHE\)"):
            old.hf_cache_import(cache_dir=tmp_path / "hf")


def test_a_commit_split_across_two_spellings_folders_is_one_repo_whole_without_a_partial_note(
    depot: Depot, hf_cache: Path
) -> None:
    """`Org/Model` held one quant of a commit, `org/model` the other: each folder's note said the commit lacked
    what the other folder held (`pull` it), and the repo was said adopted twice (a trial). The note counts
    what the store holds of the commit once every folder is adopted; the repo is said once."""
    other = hf_cache / "models--Acme--Sample"
    shutil.copytree(hf_cache / FOLDER, other, symlinks=True)
    commit = (hf_cache / FOLDER / "refs" / "main").read_text()
    assert (hf_cache / FOLDER / "trees" / f"{commit}.json").exists()  # (the commit's whole listing)
    for folder, dropped in ((hf_cache / FOLDER, "onnx"), (other, "model.safetensors")):
        target = folder / "snapshots" / commit / dropped
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    result = depot.hf_cache_import(cache_dir=hf_cache)
    # (the copied folder's blobs are the first's bytes again: a held-twice note says so)
    assert [p.problem for p in result.problems] == ["merged", "held-twice"], result.problems
    [repo] = result.repos
    [revision] = [r for r in repo.revisions if r.commit_id == commit]
    assert revision.files == len(sample_files()) and "main" in revision.refs
    assert {f.path for f in depot.list_files(repo.repo_id)} == set(sample_files())


def test_a_cache_whose_snapshots_hold_files_is_adopted_by_the_commits_listing(
    depot: Depot, pristine: Path, tmp_path: Path
) -> None:
    """A cache copied with `cp -rL` (or made where links are off) holds files in its snapshots, not links to
    blobs/: huggingface_hub reads it, and the import skipped every file as "invalid". Each is verified against
    the commit's listing (trees/<commit>.json) and adopted; a file the listing does not name is skipped."""
    copied = tmp_path / "copied" / "hub"
    shutil.copytree(pristine, copied)  # (links followed: files everywhere)
    commit = (copied / FOLDER / "refs" / "main").read_text()
    snapshot = copied / FOLDER / "snapshots" / commit
    assert not (snapshot / "config.json").is_symlink()
    (snapshot / "extra.txt").write_bytes(b"not in the listing")
    result = depot.hf_cache_import([SAMPLE], cache_dir=copied)
    # (the other commits were fetched file by file: no listing of theirs to verify their files against)
    assert [(p.problem, p.path) for p in result.problems if commit in p.path] == [
        ("unlisted", f"{FOLDER}/snapshots/{commit}/extra.txt")
    ]  # fmt: skip
    unlisted = next(p for p in result.problems if p.problem == "unlisted")
    assert f"modeldepot pull {SAMPLE} -r {commit}" in unlisted.detail, "said what to do instead"
    assert read_tree(depot.snapshot_path(SAMPLE, commit)) == sample_files()
    flip_byte(snapshot / "config.json", 3)  # a file that is not what the listing says: refused as corrupt
    with Depot(tmp_path / "other") as other:
        refused = other.hf_cache_import([SAMPLE], cache_dir=copied)
        assert ("corrupt", f"{FOLDER}/blobs/") in {
            (p.problem, p.path[: len(FOLDER) + 7]) for p in refused.problems
        }
        assert not other.has_file(SAMPLE, "config.json", commit)


def test_adopting_a_cache_older_than_the_stores_branch_keeps_the_stores(depot: Depot, tmp_path: Path) -> None:
    """Re-adopting a cache after imports moved main on set main back to the cache's older commit, with exit 0
    and no word (a trial). A ref huggingface_hub wrote since the store's moved (a newer download) moves it."""
    first = depot.import_dir(
        write_model_dir(tmp_path / "v1", {"config.json": b'{"v": 1}'}), "acme/m"
    ).commit_id
    cache = tmp_path / "cache"
    assert depot.hf_cache_export("acme/m", cache_dir=cache).ok
    second = depot.import_dir(
        write_model_dir(tmp_path / "v2", {"config.json": b'{"v": 2}'}), "acme/m"
    ).commit_id
    result = depot.hf_cache_import(["acme/m"], cache_dir=cache)
    assert result.ok and [p.problem for p in result.problems] == ["branch-kept"], result.problems
    assert depot.resolve("acme/m") == second and depot.resolve("acme/m", first) == first
    later = time.time() + 5
    os.utime(cache / "models--acme--m" / "refs" / "main", (later, later))
    moved = depot.hf_cache_import(["acme/m"], cache_dir=cache)
    assert moved.ok and [(p.problem, p.detail) for p in moved.problems] == [
        ("ref-moved", f"moved from {second[:12]} to {first[:12]}")
    ], "said: a cache copied without its times (cp -r, scp) looks newer and moved main back silently"
    assert depot.resolve("acme/m") == first


def test_a_branch_stays_at_a_whole_commit_rather_than_move_to_a_few_files_of_another(
    tmp_path: Path, source: tuple[Depot, LiveNode], hf_cache: Path
) -> None:
    """hf_hub_download and from_pretrained leave a few files of a commit and no listing of it: adopting such
    a cache whose main is newer moved the store's main from the model it held whole to a commit of its config
    alone, exit 0 and no word, and `path` and `load` found no weights (a trial). The store's main stays, the
    commit is adopted as it is, and a note says how to have it whole. A commit known whole (its listing) moves
    it, said too."""
    origin, node = source
    commit = origin.resolve(SAMPLE)
    cache = tmp_path / "config-only" / "hub"
    hf_hub_download(SAMPLE, "config.json", endpoint=node.url, cache_dir=cache)
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        older = {**sample_files(), "config.json": b'{"older": true}'}
        held = depot.import_dir(write_model_dir(tmp_path / "held", older), SAMPLE).commit_id
        later = time.time() + 5  # (the caches' main written after the store's: newer downloads)
        for ref in (cache / FOLDER / "refs" / "main", hf_cache / FOLDER / "refs" / "main"):
            os.utime(ref, (later, later))
        adopted = depot.hf_cache_import(cache_dir=cache)
        assert adopted.ok and [p.problem for p in adopted.problems] == ["branch-kept"], adopted.problems
        assert f"modeldepot pull {SAMPLE} -r main" in adopted.problems[0].detail
        assert depot.resolve(SAMPLE) == held and depot.has_file(SAMPLE, "model.safetensors")
        assert bytes(depot.get_file(SAMPLE, "config.json", commit)) == sample_files()["config.json"]
        again = depot.hf_cache_import(cache_dir=cache)  # (held in part now: main moved to it, a review)
        assert [p.problem for p in again.problems] == ["branch-kept"] and depot.resolve(SAMPLE) == held
        whole = depot.hf_cache_import(cache_dir=hf_cache)
        assert ("ref-moved", f"moved from {held[:12]} to {commit[:12]}") in {
            (p.problem, p.detail) for p in whole.problems
        }, whole.problems
        assert depot.resolve(SAMPLE) == commit


def test_a_folder_that_is_no_cache_is_said_so_and_leaves_no_store(tmp_path: Path) -> None:
    """`--cache-dir` naming a folder of models that is no Hugging Face cache (~/models, a mistyped path): the
    run "adopted nothing" with exit 0, and left an empty store where --home named (an explorer's trial)."""
    folder = write_model_dir(tmp_path / "models", {"model.safetensors": b"weights", "config.json": b"{}"})
    code, out, err = run("hf-cache", "import", "--cache-dir", str(folder), home=tmp_path / "store")
    assert code == 1 and "is not a Hugging Face cache" in err, (out, err)
    assert not (tmp_path / "store").exists()
    (tmp_path / "empty").mkdir()  # (an empty cache named: the same)
    code, _, err = run("hf-cache", "import", "--cache-dir", str(tmp_path / "empty"), home=tmp_path / "store")
    assert code == 1 and "is not a Hugging Face cache" in err, err


def _node_holding_part_of_sample(tmp_path: Path, hub: LiveNode) -> LiveNode:
    """A node whose store adopted config.json and the q4 ONNX of acme/sample, without the commit's listing."""
    cache = tmp_path / "hf" / "hub"
    for name in ("config.json", "onnx/model_q4.onnx", "onnx/model_q4.onnx_data"):
        hf_hub_download(SAMPLE, name, endpoint=hub.url, cache_dir=cache)
    with Depot(tmp_path / "partial", chunk_size=SMALL_CHUNK) as adopted:
        assert adopted.hf_cache_import(cache_dir=cache).ok
    return LiveNode(Depot(tmp_path / "partial"), owns_depot=True)


def test_a_part_of_a_commit_stays_a_part_when_a_variant_of_it_is_removed(
    tmp_path: Path, source: tuple[Depot, LiveNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rm --quant` (or the budget evicting a variant) keeps the commit's listing before it removes files:
    it kept a node's part as that listing, and once the repo's scan moved on, the part was the whole commit
    (a review)."""
    origin, hub = source
    commit = origin.resolve(SAMPLE)
    node = _node_holding_part_of_sample(tmp_path, hub)
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # (no Hub now)
        with Depot(tmp_path / "alone", chunk_size=SMALL_CHUNK, servers=[node.url]) as alone:
            assert alone.pull(SAMPLE).commit_id == commit
            alone.remove(SAMPLE, quant="q4")
            assert alone.store.manifests.listing(SAMPLE, commit) is None
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with Depot(tmp_path / "alone", servers=[node.url]) as alone:
            alone.pull(SAMPLE, revision="dev")  # (the repo's scan moves to dev's commit)
            assert not alone.commit_known_whole(SAMPLE, commit)
    finally:
        node.stop()


def test_a_part_scanned_while_the_hub_is_down_hides_no_listing_the_store_kept(
    tmp_path: Path, source: tuple[Depot, LiveNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit whose whole listing the store kept (pulled once with the Hub up), scanned again while the Hub
    is down from a node holding part of it: the part hid the listing, and the commit was listed as 3 of its 6
    files (a review)."""
    origin, hub = source
    commit = origin.resolve(SAMPLE)
    node = _node_holding_part_of_sample(tmp_path, hub)
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with Depot(tmp_path / "alone", chunk_size=SMALL_CHUNK, servers=[node.url]) as alone:
            alone.pull(SAMPLE, ["q4"])
            before = [f.path for f in alone.commit_files(SAMPLE, commit)]
        assert len(before) == len(sample_files())
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # (no Hub now)
        with Depot(tmp_path / "alone", servers=[node.url]) as alone:
            alone.pull(SAMPLE, ["q4"])
            assert [f.path for f in alone.commit_files(SAMPLE, commit)] == before
            assert alone.commit_known_whole(SAMPLE, commit)
    finally:
        node.stop()


def test_a_failed_export_leaves_a_blob_another_snapshot_linked_meanwhile(
    filled: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed export took back the blobs it had added, one that another export (or huggingface_hub) had
    linked meanwhile among them: that snapshot was left a broken link (a review)."""
    import modeldepot.hfcache.export

    real_blob = modeldepot.hfcache.export._CacheWriter.blob
    cache = tmp_path / "hub"
    other = cache / FOLDER / "snapshots" / ("f" * 40)
    calls = {"n": 0}

    def links_then_fills_up(self: object, store: object, entry: object, target: Path, link: bool) -> str:
        calls["n"] += 1
        if calls["n"] == 3:  # another snapshot links the first blob this export added, then the disk fills
            first = sorted((cache / FOLDER / "blobs").iterdir())[0]
            other.mkdir(parents=True)
            (other / "config.json").symlink_to(os.path.relpath(first, other))
            raise StoreError("cannot write x in the Hugging Face cache: No space left on device (simulated)")
        return real_blob(self, store, entry, target, link)  # type: ignore[arg-type]

    monkeypatch.setattr(modeldepot.hfcache.export._CacheWriter, "blob", links_then_fills_up)
    with pytest.raises(StoreError, match="nothing of this export was kept"):
        filled.hf_cache_export(SAMPLE, cache_dir=cache)
    assert (other / "config.json").exists(), "the other snapshot's link still leads to its blob"
    assert not (cache / FOLDER / "snapshots" / filled.resolve(SAMPLE)).exists()
    assert len(list((cache / FOLDER / "blobs").iterdir())) == 1, "the blob nobody links is taken back"


_KILLED_EXPORT = """
import os, signal, sys
import modeldepot.hfcache.export as export
from modeldepot import Depot
home, cache, revision, after, merged = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
done, moved = [], []

def progress(what, done_bytes, total):
    done.append(what)
    if len(done) == after:  # (a kill -9, the OOM killer, a container stopped: no clean-up runs)
        os.kill(os.getpid(), signal.SIGKILL)

recorded = export._CacheWriter.record

def record(self, name):
    recorded(self, name)
    if "/snapshots/" in str(name):  # (a link moved into a snapshot the cache held, journaled first)
        moved.append(name)
        if len(moved) > merged >= 0:
            os.kill(os.getpid(), signal.SIGKILL)

export._CacheWriter.record = record
Depot(home).hf_cache_export("acme/sample", revision, cache_dir=cache, progress=progress)
"""


def _export_killed(depot: Depot, cache: Path, after: int, revision: str = "main", merged: int = -1) -> None:
    """Run an export of acme/sample in a process of its own, killed once ``after`` files are in the cache, or
    (``merged``) once that many links were moved into a snapshot the cache held."""
    killed = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(depot.home), str(cache), revision, str(after),
                             str(merged)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def _blobs_and_links(cache: Path) -> tuple[set[str], set[str]]:
    """The names in the repo's blobs/, and those its snapshots' links lead to."""
    linked = {
        os.path.basename(os.readlink(Path(current, name)))
        for current, _, names in os.walk(cache / FOLDER / "snapshots")
        for name in names
    }
    return set(os.listdir(cache / FOLDER / "blobs")), linked


def test_a_killed_export_leaves_no_part_of_the_commit_and_the_next_one_sweeps_what_it_left(
    filled: Depot, tmp_path: Path
) -> None:
    """An export killed half-way (SIGKILL: nothing of the clean-up of a failed one runs) left
    snapshots/<commit>/ with the files linked so far: offline, `snapshot_download(revision=<commit>)` returned
    a config without weights, `scan_cache_dir` listed it, and nothing ever took it back (a review). The
    snapshot is built aside and moved into place whole; the next export removes what the dead one left."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache, commit_id = tmp_path / "hub", filled.resolve(SAMPLE)
    _export_killed(filled, cache, after=3)
    assert len(os.listdir(cache / FOLDER / "blobs")) >= 3  # (the kill came half-way, as asked)
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(SAMPLE, revision=commit_id, cache_dir=cache, local_files_only=True)
    assert try_to_load_from_cache(SAMPLE, "config.json", cache_dir=cache, revision=commit_id) is None
    scanned = scan_cache_dir(cache)
    assert scanned.warnings == [] and [sorted(r.revisions) for r in scanned.repos] == [[]]

    result = filled.hf_cache_export(SAMPLE, cache_dir=cache)
    assert result.ok and read_tree(Path(result.snapshot_path)) == sample_files()
    assert (
        read_tree(Path(snapshot_download(SAMPLE, cache_dir=cache, local_files_only=True))) == sample_files()
    )
    assert [p.name for p in (cache / FOLDER).iterdir() if p.name.startswith(".")] == []
    blobs, linked = _blobs_and_links(cache)
    assert blobs == linked


def test_a_killed_export_into_a_snapshot_the_cache_held_is_taken_back_by_the_next_export(
    filled: Depot, tmp_path: Path
) -> None:
    """Added to a snapshot the cache holds, a killed export's links, and its blobs, stayed for good. Its links
    wait in its staging folder until every blob is in (a kill before leaves the snapshot as it was), and each
    one moved in is written in a journal first: the next export (of any commit of the repo) takes back what
    the dead one added, but for a blob another snapshot links to meanwhile."""
    cache, commit_id = tmp_path / "hub", filled.resolve(SAMPLE)
    assert filled.hf_cache_export(SAMPLE, cache_dir=cache).ok
    snapshot = cache / FOLDER / "snapshots" / commit_id
    (snapshot / "model.safetensors").unlink()  # (the user's `hf cache` clean-up, say)
    shutil.rmtree(snapshot / "onnx")
    for blob in set(os.listdir(cache / FOLDER / "blobs")) - _blobs_and_links(cache)[1]:
        (cache / FOLDER / "blobs" / blob).unlink()
    before = read_tree(snapshot)
    blobs_before = set(os.listdir(cache / FOLDER / "blobs"))

    _export_killed(filled, cache, after=4)
    assert read_tree(snapshot) == before, "killed before its links were moved in: nothing added"
    _export_killed(filled, cache, after=-1, merged=2)
    added = read_tree(snapshot).keys() - before.keys()
    assert len(added) == 2 and "model.safetensors" in added, added  # (the kill came half-way, as asked)
    weights = os.path.basename(os.readlink(snapshot / "model.safetensors"))
    other = cache / FOLDER / "snapshots" / ("f" * 40)  # (another snapshot links a blob the dead one added)
    other.mkdir()
    (other / "weights.bin").symlink_to(f"../../blobs/{weights}")

    assert filled.hf_cache_export(SAMPLE, "dev", cache_dir=cache).ok  # (the next export, of another commit)
    assert read_tree(snapshot) == before, "what the killed export added is taken back"
    assert not (snapshot / "onnx").exists()
    blobs, linked = _blobs_and_links(cache)
    assert blobs - blobs_before <= linked, (
        "a blob the killed export added, and no snapshot links, is taken back"
    )
    assert (other / "weights.bin").read_bytes() == sample_files()["model.safetensors"]
    assert [p.name for p in (cache / FOLDER).iterdir() if p.name.startswith(".")] == []
    shutil.rmtree(other)
    result = filled.hf_cache_export(SAMPLE, cache_dir=cache)
    assert result.ok and read_tree(snapshot) == sample_files()


def test_an_export_running_in_another_pid_namespace_is_never_taken_for_ended(
    filled: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache shared between containers (each its own pid namespace) or hosts: an export there saw this one's
    pid as ended, swept its staging folder and blobs, and this one published the rest as the commit and said
    ok (a review). An export runs while its journal's lock is held, whatever its pid says elsewhere; a journal
    that is a FIFO (a stray one, or another member's) is never waited on."""
    import modeldepot.hfcache.export as export_module

    cache, commit_id = tmp_path / "hub", filled.resolve(SAMPLE)
    (cache / FOLDER).mkdir(parents=True)
    fifo = cache / FOLDER / f".modeldepot-{_ended_pid()}-0123456789ab.added"
    os.mkfifo(fifo)
    calls = {"n": 0}

    def elsewhere(name: str, done: int, total: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # (another namespace's export of another branch, half-way through this one)
            with monkeypatch.context() as patch:
                patch.setattr(export_module, "_alive", lambda pid: False)
                assert filled.hf_cache_export(SAMPLE, "dev", cache_dir=cache).ok

    result = filled.hf_cache_export(SAMPLE, cache_dir=cache, progress=elsewhere)
    assert calls["n"] > 2 and result.ok, result
    assert read_tree(cache / FOLDER / "snapshots" / commit_id) == sample_files()
    assert (
        read_tree(Path(snapshot_download(SAMPLE, cache_dir=cache, local_files_only=True))) == sample_files()
    )
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # (not ours: left as it is)
    assert sorted(p.name for p in (cache / FOLDER).iterdir() if p.name.startswith(".")) == [fifo.name]


def test_an_export_clears_huggingface_hubs_note_that_the_commit_lacks_a_file_it_writes(
    filled: Depot, tmp_path: Path
) -> None:
    """huggingface_hub notes a file a commit does not have as `.no_exist/<commit>/<path>`, and
    `try_to_load_from_cache` reads that note before the snapshot: a file an export wrote stayed unseen (a
    review). The note goes with the export (a new snapshot, or one the cache held); a note of a file the
    commit lacks stays, and none is removed through a link out of the repo's folder."""
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

    cache, commit_id, dev = tmp_path / "hub", filled.resolve(SAMPLE), filled.resolve(SAMPLE, "dev")
    no_exist = cache / FOLDER / ".no_exist"
    for path in ("config.json", "onnx/model_q4.onnx", "adapter_config.json"):
        (no_exist / commit_id / path).parent.mkdir(parents=True, exist_ok=True)
        (no_exist / commit_id / path).touch()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("not the cache's")
    (no_exist / dev).symlink_to(outside)
    assert filled.hf_cache_export(SAMPLE, cache_dir=cache).ok
    assert filled.hf_cache_export(SAMPLE, "dev", cache_dir=cache).ok
    for path in ("config.json", "onnx/model_q4.onnx"):
        found = try_to_load_from_cache(SAMPLE, path, cache_dir=cache)
        assert isinstance(found, str) and Path(found).read_bytes() == sample_files()[path]
    assert try_to_load_from_cache(SAMPLE, "adapter_config.json", cache_dir=cache) is _CACHED_NO_EXIST
    assert (outside / "config.json").read_text() == "not the cache's"
    (no_exist / commit_id / "tokenizer.json").touch()  # (a note written after an export)
    assert filled.hf_cache_export(SAMPLE, cache_dir=cache).ok
    assert not (no_exist / commit_id / "tokenizer.json").exists()


def test_an_export_keeps_a_ref_to_a_newer_download_the_store_adopted(tmp_path: Path) -> None:
    """The cache held a download newer than the store's main; an `hf-cache import` adopted it (the store's
    main kept), and the export then moved the cache's main back to the store's older commit, a commit the
    store now knew: offline code loaded the old config (an explorer's trial). The store learned where its main
    is before the cache's ref was written: the ref stays."""
    cache = tmp_path / "hf" / "hub"
    older, newer = (
        {"config.json": b'{"v": 1}', "w.bin": b"1" * 100},
        {"config.json": b'{"v": 2}', "w.bin": b"2" * 100},
    )
    with (
        Depot(tmp_path / "old", chunk_size=SMALL_CHUNK) as old,
        Depot(tmp_path / "new", chunk_size=SMALL_CHUNK) as new,
    ):
        a = old.import_dir(write_model_dir(tmp_path / "a", older), "acme/m").commit_id
        b = new.import_dir(write_model_dir(tmp_path / "b", newer), "acme/m").commit_id
        assert new.hf_cache_export("acme/m", cache_dir=cache).ok  # (the newer download, after old's main)
        old.hf_cache_import(cache_dir=cache)
        assert old.resolve("acme/m") == a and old.resolve("acme/m", b) == b, "adopted, its main kept"
        ref = cache / "models--acme--m" / "refs" / "main"
        kept = old.hf_cache_export("acme/m", cache_dir=cache)
        assert ref.read_text() == b and [p.problem for p in kept.problems] == ["ref-kept"], kept.problems
