"""Repo ids match whatever their case, as on the Hub: one repo is stored once, found under any case, and
never pulled twice because a caller spelled it differently (huggingface_hub issues #2090, #3838, #4040)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from conftest import LiveNode, http_request, hub_path_depot, serving_repo, write_model_dir
from modeldepot import Depot
from modeldepot.errors import RepoNotFoundError

REPO = "Org-X/Tiny-Model"
FILES = {
    "config.json": b'{"model_type": "bert"}',
    "model.safetensors": bytes(range(256)) * 1000,
}


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LiveNode]:
    with serving_repo(tmp_path, FILES, REPO) as node:
        yield node


@pytest.fixture
def local(upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    with hub_path_depot(tmp_path / "local", upstream.url, monkeypatch) as depot:
        yield depot


def test_a_stored_repo_is_found_under_any_case_and_stored_once(depot: Depot, tmp_path: Path) -> None:
    source = write_model_dir(tmp_path / "src", FILES)
    depot.import_dir(source, REPO)
    for asked in ("org-x/tiny-model", "ORG-X/TINY-MODEL", "Org-x/tiny-Model"):
        assert bytes(depot.get_file(asked, "config.json")) == FILES["config.json"]
        assert depot.resolve(asked) == depot.resolve(REPO)
        assert depot.file_info(asked, "model.safetensors").repo_id == REPO
        assert depot.snapshot_path(asked) == depot.snapshot_path(REPO)
        assert depot.has_file(asked, "model.safetensors")

    # A load too, offline, one engine for every spelling (it lost its any-case guard: a load in another case
    # pulled, moved the branch, and said the model "was removed while it was being loaded", explorer 28)
    def engine(path: str) -> list[str]:  # (a caller's engine: the file's path, in a list of its own)
        return [path]

    loaded = {
        id(depot.load(spelled, engine=engine, warmup=0))
        for spelled in ("org-x/tiny-model", "ORG-X/TINY-MODEL")
    }
    assert len(loaded) == 1
    again = asyncio.run(depot.load_async("Org-x/tiny-Model", engine=engine, warmup=0))
    assert again is depot.load(REPO, engine=engine, warmup=0)
    changed = write_model_dir(tmp_path / "src2", {**FILES, "config.json": b'{"model_type": "roberta"}'})
    depot.import_dir(changed, "org-x/tiny-model")
    assert [r.repo_id for r in depot.list_repos()] == [REPO], "a second spelling is not a second repo"
    assert bytes(depot.get_file(REPO, "config.json")) == b'{"model_type": "roberta"}'
    assert len(depot.repo_info("ORG-X/tiny-model").revisions) == 2
    assert not (depot.home / "snapshots" / "org-x").exists()
    with pytest.raises(RepoNotFoundError):
        depot.resolve("org-x/tiny-modell")  # another name is still another repo
    depot.remove("org-x/TINY-model")
    assert depot.list_repos() == []


def test_a_pull_stores_the_upstreams_spelling_and_never_pulls_a_held_repo_again(
    local: Depot, upstream: LiveNode
) -> None:
    first = local.pull("org-x/tiny-model")
    assert first.repo_id == REPO and first.bytes_downloaded == sum(map(len, FILES.values()))
    assert [r.repo_id for r in local.list_repos()] == [REPO]
    assert local.get_manifest("ORG-X/TINY-MODEL").repo_id == REPO
    again = local.pull("ORG-X/Tiny-Model")
    assert again.repo_id == REPO and again.bytes_downloaded == 0
    assert [r.repo_id for r in local.list_repos()] == [REPO]
    assert local.download_file("org-x/TINY-MODEL", "config.json").repo_id == REPO


def test_a_pull_by_a_commit_id_in_capitals_sets_no_branch(local: Depot, upstream: LiveNode) -> None:
    """Reads take a commit id in capitals, as git does; a pull of ``-r CFEDE1F`` made a branch of that name."""
    commit = upstream.depot.resolve(REPO)
    local.pull(REPO, revision=commit[:7].upper())
    local.pull(REPO, revision=commit.upper())
    assert local.repo_info(REPO).refs == {}
    assert local.resolve(REPO, commit) == commit


def test_hub_clients_reach_a_repo_in_any_case_and_are_told_its_spelling(
    live_node: LiveNode, tmp_path: Path
) -> None:
    live_node.depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    api = HfApi(endpoint=live_node.url)
    info = api.model_info("org-x/tiny-model", files_metadata=True)
    assert info.id == REPO and {s.rfilename for s in info.siblings or []} == set(FILES)
    got = hf_hub_download("ORG-X/TINY-MODEL", "model.safetensors", endpoint=live_node.url,
                          cache_dir=tmp_path / "hf")  # fmt: skip
    assert Path(got).read_bytes() == FILES["model.safetensors"]
    assert [f.path for f in api.list_repo_tree("org-x/Tiny-Model")] == sorted(FILES)


def test_a_private_repo_asked_in_another_case_stays_hidden_without_the_token(
    depot: Depot, tmp_path: Path
) -> None:
    """A file's answer spells the repo in the same trip to a worker thread as the file's lookup: typed in
    another case, a private repo is still hidden from a request without the token."""
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO, private=True)
    node = LiveNode(depot, token="secret")
    try:
        for asked in ("org-x/tiny-model", REPO):
            for route in ("resolve", "raw"):
                status, _, body = http_request(node, f"/{asked}/{route}/main/config.json")
                assert status == 401 and FILES["config.json"] not in body  # (the Hub: 401, RepoNotFound)
                status, _, body = http_request(
                    node, f"/{asked}/{route}/main/config.json", {"Authorization": "Bearer secret"}
                )
                assert (status, body) == (200, FILES["config.json"])
    finally:
        node.stop()


def test_the_hf_cache_export_is_named_as_asked(depot: Depot, tmp_path: Path) -> None:
    """huggingface_hub finds a cached repo under the exact case its caller uses: the export names the folder
    that way, while the files come from the one stored repo."""
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    cache = tmp_path / "hf"
    depot.hf_cache_export("org-x/tiny-model", cache_dir=cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    got = hf_hub_download("org-x/tiny-model", "config.json", cache_dir=cache)
    assert Path(got).read_bytes() == FILES["config.json"]
    assert (cache / "models--org-x--tiny-model").is_dir()


def test_an_import_racing_one_typed_in_another_case_names_the_repo_as_stored(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Two imports of a new repo at once, typed in two cases: the one that published second said the repo was
    stored under the case it was typed in, and its snapshot path named a folder that does not exist (an
    explorer's trial: `from_pretrained(result.snapshot_path)` failed). It names the store's spelling now."""
    import threading

    import modeldepot.store.importer as importer

    source = write_model_dir(tmp_path / "src", FILES)
    staged, go_on = threading.Event(), threading.Event()
    real_publish = importer.publish

    def held_publish(*args: object, **kwargs: object) -> object:
        if threading.current_thread().name == "lower-case import":
            staged.set()
            go_on.wait(30)
        return real_publish(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(importer, "publish", held_publish)
    results = {}
    with Depot(tmp_path / "store") as first, Depot(tmp_path / "store") as second:

        def lower() -> None:
            results["lower"] = first.import_dir(source, REPO.lower())

        racing = threading.Thread(target=lower, name="lower-case import")
        racing.start()
        assert staged.wait(30), "the first import did not reach its publish"
        upper = second.import_dir(source, REPO)
        go_on.set()
        racing.join(30)
    assert upper.repo_id == REPO and results["lower"].repo_id == REPO
    assert Path(results["lower"].snapshot_path) == Path(upper.snapshot_path)
    assert (Path(upper.snapshot_path) / "config.json").is_file()
