"""Model card front matter, and the index migration that made room for it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from conftest import write_model_dir
from modeldepot import Depot
from modeldepot.modelcard import card_metadata
from modeldepot.store.index import _MIGRATIONS, SCHEMA_VERSION


def test_front_matter_fields() -> None:
    card = "---\npipeline_tag: text-generation\nlibrary_name: gguf\nlicense: mit\ntags:\n- llama\n- 4-bit\n---\n# Model\n"
    assert card_metadata(card) == {
        "pipeline_tag": "text-generation", "library_name": "gguf", "license": "mit", "tags": ["llama", "4-bit"]}  # fmt: skip
    assert card_metadata("# No front matter\n") == {}
    assert card_metadata("---\n: [unclosed\n---\n") == {}  # invalid YAML says nothing
    assert card_metadata("---\n- a list\n---\n") == {}
    assert card_metadata("---\npipeline_tag: {nested: 1}\n---\n") == {}


def test_the_whole_front_matter_is_the_card_data_in_json() -> None:
    """Only five keys were kept: `card_data.language`, `datasets` and `model-index` were None on a node (an
    explorer's trial). The whole front matter is kept now, its values as JSON has them; never `gated`."""
    card = (
        "---\nlanguage: [en, fr]\ndatasets:\n- ms_marco\nlicense: mit\nreleased: 2024-05-01\ngated: true\n"
        "file_tags: [gguf]\nratio: .nan\nmodel-index:\n- name: m\n  results:\n  - metrics:\n    - {type: acc, value: 0.9}\n"
        "1: numbered\n---\n# Model\n"
    )
    assert card_metadata(card) == {
        "language": ["en", "fr"], "datasets": ["ms_marco"], "license": "mit", "released": "2024-05-01",
        "ratio": "nan", "model-index": [{"name": "m", "results": [{"metrics": [{"type": "acc", "value": 0.9}]}]}],
    }  # fmt: skip
    json.dumps(card_metadata(card), allow_nan=False)  # (what a node sends)
    deep = "---\nwidget: " + "[" * 40 + "1" + "]" * 40 + "\nlicense: mit\n---\n"
    kept = card_metadata(deep)  # (nested past what is kept: that part dropped)
    assert kept["license"] == "mit" and "1" not in json.dumps(kept["widget"])


def test_a_card_nested_too_deep_for_the_parser_says_nothing_and_the_import_goes_on(
    depot: Depot, tmp_path: Path
) -> None:
    """A README is anyone's text: front matter 5,000 lists deep (a RecursionError to the YAML parser)."""
    deep = "---\ntags: " + "[" * 5000 + "]" * 5000 + "\n---\n# Model\n"
    assert card_metadata(deep) == {}
    folder = write_model_dir(tmp_path / "deep", {"README.md": deep.encode(), "config.json": b"{}"})
    depot.import_dir(folder, "acme/deep")
    assert {f.path for f in depot.list_files("acme/deep")} == {"README.md", "config.json"}


def test_an_index_from_schema_1_is_migrated_to_the_latest_and_keeps_its_data(tmp_path: Path) -> None:
    home = tmp_path / "old-store"
    home.mkdir()
    with sqlite3.connect(home / "index.db") as con:  # the store as the first release wrote it
        for statement in _MIGRATIONS[0].split(";"):
            if statement.strip():
                con.execute(statement)
        con.execute("PRAGMA user_version = 1")
        con.execute("INSERT INTO settings VALUES ('chunk_size', '65536')")
        con.execute("INSERT INTO repos (repo_id, created_at, updated_at) VALUES ('old/repo', 1, 2)")
        con.execute(
            "INSERT INTO revisions (repo_id, commit_id, created_at) VALUES ('old/repo', ?, 1)", ("a" * 40,)
        )
        con.execute("INSERT INTO refs VALUES ('old/repo', 'main', ?, 1)", ("a" * 40,))
    con.close()
    with Depot(home) as depot:
        assert depot.store.index.read("PRAGMA user_version")[0][0] == SCHEMA_VERSION >= 3
        summary = depot.store.repo_summary("old/repo")
        assert summary.card == {} and summary.refs == {"main": "a" * 40} and depot.chunk_size == 65536
        card = "---\npipeline_tag: fill-mask\n---\n"
        depot.import_dir(write_model_dir(tmp_path / "m", {"README.md": card.encode()}), "old/repo")
        assert depot.store.repo_summary("old/repo").card == {"pipeline_tag": "fill-mask"}
        assert json.loads(depot.store.index.read("SELECT card FROM repos")[0]["card"]) == {
            "pipeline_tag": "fill-mask"
        }


def test_aliases_that_repeat_a_value_without_end_are_cut_short() -> None:
    """YAML aliases repeat one value as often as they like: a README of 280 bytes made a card of 53 MB, in
    memory, in the index and in every listing (a review's trial). What a front matter keeps is bounded."""
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for previous, name in zip("abcdef", "bcdefg", strict=True):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    bomb = "---\nlicense: mit\n" + "\n".join(levels) + "\ndatasets: *g\n---\n# Model\n"
    card = card_metadata(bomb)
    assert card["license"] == "mit" and len(json.dumps(card)) < 2 << 20


def test_the_architecture_document_names_the_schema_version_of_the_code() -> None:
    """An operator planning an upgrade read version 15 there, the code at 18 (an explorer's trial)."""
    document = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    assert f"### The index (schema version {SCHEMA_VERSION}," in document
