"""A repo's visibility and model card are the whole repo's, as on the Hub: publishing a branch does not
change them unless asked. (An import of a branch without ``--private`` made a private repo's ``main``
public to every client; a branch without a README erased ``main``'s pipeline tag and tags.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from conftest import LiveNode, http_request, hub_path_depot, serving_repo, write_model_dir
from modeldepot import Depot
from test_cli import run

REPO = "acme/secret"
CARD = b"---\nlicense: mit\nlibrary_name: transformers\npipeline_tag: text-classification\ntags: [foo]\n---\n# x\n"


def served_without_token(node: LiveNode, revision: str = "main") -> int:
    return http_request(node, f"/{REPO}/resolve/{revision}/config.json")[0]


def test_a_branch_imported_without_a_flag_keeps_the_repos_visibility(tmp_path: Path) -> None:
    home = tmp_path / "home"
    main = write_model_dir(tmp_path / "main", {"config.json": b'{"a": 1}'})
    dev = write_model_dir(tmp_path / "dev", {"config.json": b'{"a": 2}'})
    assert run("import", str(main), "--repo", REPO, "--private", home=home)[0] == 0
    assert run("import", str(dev), "--repo", REPO, "-r", "dev", home=home)[0] == 0
    with Depot(home) as depot:
        assert depot.store.repo_private(REPO)
        node = LiveNode(depot, token="t0ken")
        try:
            assert served_without_token(node) == 401 and served_without_token(node, "dev") == 401
        finally:
            node.stop()
    # Asked for, the visibility changes, from either branch
    assert run("import", str(dev), "--repo", REPO, "-r", "dev", "--public", home=home)[0] == 0
    with Depot(home) as depot:
        assert not depot.store.repo_private(REPO)
        depot.import_dir(main, REPO)  # (the API: None keeps it)
        assert not depot.store.repo_private(REPO)
        depot.import_dir(dev, REPO, "dev", private=True)
        assert depot.store.repo_private(REPO)


def test_a_branch_without_a_readme_keeps_mains_card(tmp_path: Path) -> None:
    with Depot(tmp_path / "home") as depot:
        depot.import_dir(write_model_dir(tmp_path / "main", {"config.json": b"{}", "README.md": CARD}), REPO)
        depot.import_dir(write_model_dir(tmp_path / "dev", {"config.json": b'{"a": 2}'}), REPO, "dev")
        node = LiveNode(depot)
        try:
            api = HfApi(endpoint=node.url)
            info = api.model_info(REPO)
            assert info.pipeline_tag == "text-classification" and info.library_name == "transformers"
            assert "foo" in (info.tags or [])
            assert [m.id for m in api.list_models(filter="text-classification")] == [REPO]
            # A new README on main is the repo's card from then on
            changed = CARD.replace(b"text-classification", b"fill-mask")
            depot.import_dir(
                write_model_dir(tmp_path / "main2", {"config.json": b"{}", "README.md": changed}), REPO
            )
            assert api.model_info(REPO).pipeline_tag == "fill-mask"
        finally:
            node.stop()


def test_the_formats_of_a_repos_files_are_its_tags_as_on_the_hub(tmp_path: Path) -> None:
    """`list_models(filter="gguf")` found no GGUF repo whose card did not list the tag: the Hub tags a repo
    with its files' formats. They are not the README's: not in the card data."""
    with Depot(tmp_path / "home") as depot:
        files = {"config.json": b"{}", "README.md": CARD, "onnx/model.onnx": b"x"}
        depot.import_dir(write_model_dir(tmp_path / "a", files), "acme/onnx")
        depot.import_dir(write_model_dir(tmp_path / "b", {"llama-Q4_K_M.GGUF": b"y"}), "acme/quants")
        depot.import_dir(write_model_dir(tmp_path / "c", {"config.json": b"{}"}), "acme/plain")
        node = LiveNode(depot)
        try:
            api = HfApi(endpoint=node.url)
            assert [m.id for m in api.list_models(filter="gguf")] == ["acme/quants"]
            assert [m.id for m in api.list_models(filter=["onnx", "text-classification"])] == ["acme/onnx"]
            info = api.model_info("acme/onnx")
            assert {"onnx", "foo", "transformers"} <= set(info.tags or [])
            assert info.card_data is not None and "file_tags" not in info.card_data.to_dict()
            assert "gguf" not in (api.model_info("acme/plain").tags or [])
        finally:
            node.stop()


CARD_B = b"---\npipeline_tag: fill-mask\ntags: [beta]\n---\n# b\n"
WEIGHTS = {"config.json": b"{}", "model.safetensors": bytes(range(256)) * 100}


@pytest.mark.parametrize("pulled_first", [False, True], ids=["private-then-pull", "pull-then-private"])
def test_the_depot_apis_manifest_of_a_private_repo_pulled_from_a_public_one_stays_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pulled_first: bool
) -> None:
    """The repo stays private (the store's flag), but its saved scan said the upstream's "public": the depot
    API's manifest and event stream gave its commit, files and statuses to any request."""
    with (
        serving_repo(tmp_path, WEIGHTS, REPO) as upstream,
        hub_path_depot(tmp_path / "local", upstream.url, monkeypatch) as depot,
    ):
        own = write_model_dir(tmp_path / "own", {"config.json": b'{"secret": 1}'})
        if pulled_first:
            depot.pull(REPO)
        depot.import_dir(own, REPO, "mine", private=True)
        if not pulled_first:
            depot.pull(REPO)
        assert depot.store.repo_private(REPO)
        node = LiveNode(depot, control_token="ctl")
        try:
            assert http_request(node, f"/api/models/{REPO}")[0] == 404
            assert http_request(node, f"/api/depot/v1/repos/{REPO}/manifest")[0] == 404  # (RepoNotFound)
            status, _, body = http_request(
                node, f"/api/depot/v1/repos/{REPO}/manifest", {"Authorization": "Bearer ctl"}
            )
            assert status == 200 and json.loads(body)["repo_id"] == REPO
        finally:
            node.stop()


def test_the_card_of_a_repo_without_main_is_its_newest_revisions(tmp_path: Path) -> None:
    """Listed by its newest revision (it has no main), a repo kept its first revision's card."""
    with Depot(tmp_path / "home") as depot:
        depot.import_dir(
            write_model_dir(tmp_path / "a", {"README.md": CARD, "config.json": b"{}"}), REPO, "v1"
        )
        depot.import_dir(write_model_dir(tmp_path / "b", {"README.md": CARD_B, "w.gguf": b"x"}), REPO, "v2")
        node = LiveNode(depot)
        try:
            api = HfApi(endpoint=node.url)
            info = api.model_info(REPO)
            assert info.sha == depot.resolve(REPO, "v2") and info.pipeline_tag == "fill-mask"
            assert [m.id for m in api.list_models(filter="gguf")] == [REPO]
        finally:
            node.stop()


def test_a_branch_import_into_a_pulled_repo_leaves_its_origin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import of a branch made a pulled repo the node's own (origin "import"): a mirror stopped following
    its upstream's main."""
    with (
        serving_repo(tmp_path, WEIGHTS, REPO) as upstream,
        hub_path_depot(tmp_path / "local", upstream.url, monkeypatch) as depot,
    ):
        depot.pull(REPO)
        origin = depot.store.repo_summary(REPO).origin
        depot.import_dir(write_model_dir(tmp_path / "own", {"config.json": b"{}"}), REPO, "mine")
        assert depot.store.repo_summary(REPO).origin == origin != "import"


def test_an_adopted_cache_without_the_readme_keeps_the_pulled_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hugging Face cache holds what its user downloaded: adopting main without its README erased the card
    a pull had stored (pipeline tag, tags)."""
    from huggingface_hub import hf_hub_download

    with (
        serving_repo(tmp_path, {**WEIGHTS, "README.md": CARD}, REPO) as upstream,
        hub_path_depot(tmp_path / "local", upstream.url, monkeypatch) as depot,
    ):
        depot.pull(REPO)
        assert depot.store.repo_summary(REPO).card.get("pipeline_tag") == "text-classification"
        cache = tmp_path / "hf"
        hf_hub_download(REPO, "config.json", endpoint=upstream.url, cache_dir=cache)
        depot.hf_cache_import([REPO], cache_dir=cache)
        card = depot.store.repo_summary(REPO).card
        assert card.get("pipeline_tag") == "text-classification" and "foo" in card.get("tags", []), card


def test_a_pulled_repo_is_described_as_the_node_it_came_from_describes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card was rebuilt from the upstream's tag list: `license: mit` became a card tag `license:mit`,
    and the card data of the node that pulled it had no license."""
    card = CARD.replace(b"tags: [foo]", b"tags: [foo]\nbase_model: acme/base")
    with (
        serving_repo(tmp_path, {**WEIGHTS, "README.md": card}, REPO) as upstream,
        hub_path_depot(tmp_path / "local", upstream.url, monkeypatch) as depot,
    ):
        depot.pull(REPO)
        node = LiveNode(depot)
        try:
            theirs = HfApi(endpoint=upstream.url).model_info(REPO)
            ours = HfApi(endpoint=node.url).model_info(REPO)
            assert theirs.card_data is not None and ours.card_data is not None
            assert ours.card_data.to_dict() == theirs.card_data.to_dict()
            assert ours.card_data.license == "mit" and ours.card_data.base_model == "acme/base"
            assert sorted(ours.tags or []) == sorted(theirs.tags or [])
        finally:
            node.stop()
