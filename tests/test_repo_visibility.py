"""A repo's visibility and model card are the whole repo's, as on the Hub: publishing a branch does not
change them unless asked. (An import of a branch without ``--private`` made a private repo's ``main``
public to every client; a branch without a README erased ``main``'s pipeline tag and tags.)"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from conftest import LiveNode, http_request, write_model_dir
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
