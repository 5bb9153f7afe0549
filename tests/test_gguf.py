"""Depot.load(engine="gguf"): metadata and tensors of GGUF files written by gguf-py's GGUFWriter, as
read-only arrays that map the stored blob (no copy), split models loaded whole, and malformed files
refused with the project's errors."""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from conftest import SMALL_CHUNK, LiveNode
from modeldepot import Depot
from modeldepot.engines import GgufModel
from modeldepot.engines.adapters import load_gguf, model_file
from modeldepot.errors import ConfigError, InvalidInputError, NotFoundError

REPO = "acme/tiny-gguf"
Q8 = gguf.GGMLQuantizationType.Q8_0
rng = np.random.default_rng(7)
F32 = rng.standard_normal((4, 64)).astype(np.float32)
F16 = rng.standard_normal((8, 32)).astype(np.float16)
INTS = np.arange(-3, 5, dtype=np.int32)
QUANT_SOURCE = rng.standard_normal((2, 64)).astype(np.float32)
Q8_BYTES = gguf.quants.quantize(QUANT_SOURCE, Q8)  # uint8 blocks: what the file holds
TOKENS = ["<s>", "hello", "wörld", "🙂"]
SCORES = [0.0, -1.5, 2.25, 3.0]
METADATA: dict[str, Any] = {
    "general.architecture": "llama",
    "general.name": "tiny test model",
    "llama.context_length": 2048,
    "llama.rope.freq_base": 10000.0,
    "test.int64": -(2**40),
    "test.float64": 0.1,
    "test.flag": True,
    "tokenizer.ggml.tokens": TOKENS,
    "tokenizer.ggml.scores": SCORES,
    "test.ids": [1, 2, 3],
}
TENSORS = {"f32.weight": F32, "f16.weight": F16, "ints": INTS}


def write_gguf(
    path: Path, *, split_max_tensors: int = 0, endianess: Any = gguf.GGUFEndian.LITTLE
) -> list[Path]:
    """A GGUF (or its shards) with METADATA, TENSORS and a Q8_0 tensor; returns the files written."""
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors, endianess=endianess)
    writer.add_string("general.name", METADATA["general.name"])
    writer.add_uint32("llama.context_length", METADATA["llama.context_length"])
    writer.add_float32("llama.rope.freq_base", METADATA["llama.rope.freq_base"])
    writer.add_int64("test.int64", METADATA["test.int64"])
    writer.add_float64("test.float64", METADATA["test.float64"])
    writer.add_bool("test.flag", METADATA["test.flag"])
    writer.add_array("tokenizer.ggml.tokens", TOKENS)
    writer.add_array("tokenizer.ggml.scores", SCORES)
    writer.add_array("test.ids", METADATA["test.ids"])
    for name, array in TENSORS.items():
        writer.add_tensor(name, array)
    writer.add_tensor("q8.weight", Q8_BYTES, raw_dtype=Q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(path)


def check_values(model: GgufModel) -> None:
    """What was written, read back: metadata, numeric tensors, raw Q8_0 blocks and their meaning."""
    for key, value in METADATA.items():
        if isinstance(value, float) or (isinstance(value, list) and isinstance(value[0], float)):
            np.testing.assert_allclose(model.metadata[key], value, rtol=1e-7)
        else:
            assert model.metadata[key] == value and type(model.metadata[key]) is type(value), key
    assert model.architecture == "llama" and model.version == 3
    assert not any(key.startswith("GGUF.") for key in model.metadata)
    assert set(model.tensors) == {*TENSORS, "q8.weight"}
    for name, expected in TENSORS.items():
        array = model.tensors[name]
        assert array.dtype == expected.dtype and array.shape == expected.shape, name
        np.testing.assert_array_equal(array, expected)
        info = model.tensor_info[name]
        assert info.shape == expected.shape and not info.raw and info.n_bytes == expected.nbytes
    quantized, info = model.tensors["q8.weight"], model.tensor_info["q8.weight"]
    assert info.ggml_type == "Q8_0" and info.raw and info.shape == QUANT_SOURCE.shape
    assert quantized.dtype == np.uint8 and quantized.shape == Q8_BYTES.shape  # the raw ggml blocks
    np.testing.assert_array_equal(quantized, Q8_BYTES)
    np.testing.assert_array_equal(model.dequantize("q8.weight"), gguf.quants.dequantize(Q8_BYTES, Q8))
    np.testing.assert_allclose(model.dequantize("q8.weight"), QUANT_SOURCE, atol=0.03)
    np.testing.assert_array_equal(model.dequantize("f16.weight"), F16.astype(np.float32))
    # plain integers are numbers already (gguf.quants refuses I32: it was "a newer gguf package may decode it")
    assert model.dequantize("ints").dtype == np.float32
    np.testing.assert_array_equal(model.dequantize("ints"), INTS.astype(np.float32))


def file_mappings() -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, path) of this process's file mappings."""
    mappings = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mappings.append((start, end, fields[1], fields[5].strip()))
    return mappings


def assert_maps_the_file(array: np.ndarray, path: Path) -> None:
    """``array`` is a read-only view of a shared mapping of ``path``'s blob: no copy anywhere."""
    assert array.flags.writeable is False
    with pytest.raises(ValueError, match="read-only"):
        array.flat[0] = 0
    base: Any = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    assert isinstance(base, mmap.mmap), "the array's base chain ends in the file's mmap"
    assert len(base) == path.stat().st_size
    blob = os.path.realpath(path)
    address = array.__array_interface__["data"][0]
    found = [(perms, name) for start, end, perms, name in file_mappings() if start <= address < end]
    assert found == [("r--s", blob)], f"{array.shape} lies in {found}, not a shared read-only map of {blob}"


@pytest.fixture
def single(depot: Depot, tmp_path: Path) -> Depot:
    folder = tmp_path / "single"
    folder.mkdir()
    write_gguf(folder / "tiny-Q8_0.gguf")
    # A projector ships beside every GGUF variant; it must not be taken for the model (its name is
    # shorter, so a choice by name alone would pick it).
    writer = gguf.GGUFWriter(folder / "mmproj.gguf", "clip")
    writer.add_tensor("proj", F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (folder / "config.json").write_text("{}")
    depot.import_dir(folder, REPO)
    return depot


def test_load_gives_metadata_and_tensors_that_map_the_stored_file(single: Depot, home: Path) -> None:
    model = single.load(REPO, "Q8_0", engine="gguf")
    assert isinstance(model, GgufModel)
    check_values(model)
    stored = single.file_path(REPO, "tiny-Q8_0.gguf")
    assert model.files == [stored]
    assert os.path.realpath(stored).startswith(f"{os.path.realpath(home)}/blobs/")
    for name, array in model.tensors.items():
        assert_maps_the_file(array, stored)
        assert model.tensor_info[name].file == stored
        offset = model.tensor_info[name].offset
        assert stored.read_bytes()[offset : offset + array.nbytes] == array.tobytes(), name
    assert "GgufModel('llama', 4 tensors" in repr(model)


def test_a_second_load_is_a_cache_hit_and_a_preloaded_copy_is_used(single: Depot) -> None:
    single.preloader.preload(REPO, "Q8_0")
    model = single.load(REPO, "Q8_0", engine="gguf")
    assert single.preloader.stats().hits == 1, "the load held the preloaded copy while it mapped the file"
    assert single.load(REPO, "q8_0", engine="gguf") is model  # variant names match case-insensitively
    assert single.load(REPO, engine="gguf") is model  # no variant: the one model file (not mmproj)
    stats = single.engines.stats()
    assert (stats.total_misses, stats.total_hits, stats.cached_models) == (1, 2, 1)


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "split"
    folder.mkdir()
    shards = write_gguf(folder / "tiny-Q8_0.gguf", split_max_tensors=2)
    assert [p.name for p in shards] == ["tiny-Q8_0-00001-of-00002.gguf", "tiny-Q8_0-00002-of-00002.gguf"]
    assert all(p.exists() for p in shards)
    return folder


def test_a_split_model_loads_whole_from_its_shards(depot: Depot, split_folder: Path) -> None:
    depot.import_dir(split_folder, REPO)
    assert model_file([p.name for p in split_folder.iterdir()], "Q8_0", (".gguf",)) == (
        "tiny-Q8_0-00001-of-00002.gguf"
    )
    model = depot.load(REPO, "Q8_0", engine="gguf")
    check_values(model)
    first, second = (depot.file_path(REPO, f"tiny-Q8_0-0000{n}-of-00002.gguf") for n in (1, 2))
    assert model.files == [first, second]
    assert model.metadata["split.count"] == 2 and model.metadata["split.tensors.count"] == 4
    held_by = {name: info.file for name, info in model.tensor_info.items()}
    assert set(held_by.values()) == {first, second}, "the tensors come from both shards"
    for name, array in model.tensors.items():
        assert_maps_the_file(array, held_by[name])
    assert depot.load(REPO, "Q8_0", engine="gguf") is model
    # Named by its second shard, it is the same model: loaded and counted once (an explorer's trial)
    assert depot.load(REPO, file="tiny-Q8_0-00002-of-00002.gguf", engine="gguf") is model
    assert len(depot.engines.keys()) == 1
    # A script's `llama-server -m "$(modeldepot path REPO -q Q8_0)"`: the first shard, named by its quant (a
    # script had to know the file's name, an explorer's trial)
    from click.testing import CliRunner

    from modeldepot.cli import cli

    said = CliRunner().invoke(cli, ["path", REPO, "-q", "q8_0", "--home", str(depot.home)])
    assert said.exit_code == 0 and said.stdout.strip() == str(first), said.output
    lacking = CliRunner().invoke(cli, ["path", REPO, "-q", "Q4_K_M", "--home", str(depot.home)])
    # (imported here: a pull would ask the Hub for another repo of its name, so none is advised, a review)
    assert lacking.exit_code == 1 and "no variant 'Q4_K_M'" in lacking.output and "pull" not in lacking.output


@pytest.mark.parametrize("where", ["here", "another process"])
def test_a_quarantined_shard_lets_go_of_the_engine_that_maps_it(
    depot: Depot, split_folder: Path, where: str
) -> None:
    """Shard 2 of a split model found corrupt: the engine, which maps every shard, is let go of (it was
    kept: its cache key names shard 1 alone)."""
    depot.import_dir(split_folder, REPO)
    depot.load(REPO, "Q8_0", engine="gguf")
    second = depot.file_info(REPO, "tiny-Q8_0-00002-of-00002.gguf").sha256
    if where == "here":
        depot.store.quarantine(second)
    else:
        with Depot(depot.home) as other:
            other.store.quarantine(second)
        assert depot.let_go_of_removed() == 1  # (a node does this every few seconds)
    assert depot.engines.keys() == []


def test_a_missing_shard_is_an_error_not_a_partial_model(depot: Depot, split_folder: Path) -> None:
    second = split_folder / "tiny-Q8_0-00002-of-00002.gguf"
    kept = second.read_bytes()
    second.unlink()
    depot.import_dir(split_folder, REPO)
    with pytest.raises(NotFoundError, match=r"lacks tiny-Q8_0-00002-of-00002\.gguf"):
        depot.load(REPO, "Q8_0", engine="gguf")  # offline (the tests' default): nothing to pull it from
    assert depot.engines.stats().cached_models == 0
    # Loaded from a folder directly, the same.
    with pytest.raises(NotFoundError, match=r"tiny-Q8_0-00002-of-00002\.gguf is missing"):
        load_gguf(split_folder / "tiny-Q8_0-00001-of-00002.gguf")
    with pytest.raises(NotFoundError, match=r"^single\.gguf is missing \(removed"):  # (not "one of 1 shards")
        load_gguf(split_folder / "single.gguf")
    # A shard of another split (3 files) under the missing one's name: the shards disagree.
    other = split_folder / "other"
    other.mkdir()
    write_gguf(other / "x.gguf", split_max_tensors=1)
    shutil.copy(other / "x-00002-of-00004.gguf", second)
    with pytest.raises(
        InvalidInputError, match=r"named shard 2 of 2 but its split\.no/split\.count say 2 of 4"
    ):
        load_gguf(split_folder / "tiny-Q8_0-00001-of-00002.gguf")
    # A shard renamed to a plain name: its siblings cannot be found.
    second.write_bytes(kept)
    shutil.copy(split_folder / "tiny-Q8_0-00001-of-00002.gguf", split_folder / "renamed.gguf")
    with pytest.raises(NotFoundError, match="shard 1 of 2 of a split GGUF, but is not named as one"):
        load_gguf(split_folder / "renamed.gguf")
    assert set(load_gguf(second).tensors) == {*TENSORS, "q8.weight"}  # any shard's path finds them all


@pytest.fixture
def upstream(tmp_path: Path, split_folder: Path) -> Iterator[LiveNode]:
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        node_depot.import_dir(split_folder, REPO)
        node = LiveNode(node_depot)
        yield node
        node.stop()


def test_a_store_missing_a_shard_pulls_the_variant_first(
    upstream: LiveNode, tmp_path: Path, split_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(split_folder / "tiny-Q8_0-00001-of-00002.gguf", partial)
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as local:
        local.import_dir(partial, REPO)
        check_values(local.load(REPO, "Q8_0", engine="gguf"))
        assert local.has_file(REPO, "tiny-Q8_0-00002-of-00002.gguf")


def write_imatrix(path: Path) -> None:
    """An importance matrix as llama-imatrix writes it: a GGUF of general.type imatrix."""
    writer = gguf.GGUFWriter(path, arch="")
    writer.add_type("imatrix")
    writer.add_tensor("blk.0.ffn_up.weight.in_sum2", np.ones((1, 256), np.float32))
    writer.add_tensor("blk.0.ffn_up.weight.counts", np.ones((1, 1), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_load_without_a_quant_takes_what_llama_cpp_takes_never_an_importance_matrix(
    depot: Depot, tmp_path: Path
) -> None:
    """An explorer's trial: a load naming no quant returned the repo's imatrix.gguf as the model (no error),
    and otherwise the shortest name: Q2_K, the worst quant, or F16, the largest."""
    folder = tmp_path / "quants"
    folder.mkdir()
    for quant in ("Q2_K", "Q4_K_M", "Q8_0", "F16"):
        write_gguf(folder / f"tiny-{quant}.gguf")
    write_imatrix(folder / "imatrix.gguf")
    depot.import_dir(folder, REPO)
    assert {v.name for v in depot.scan_repo(REPO).variants} == {"Q2_K", "Q4_K_M", "Q8_0", "F16"}
    assert [p.name for p in depot.load(REPO, engine="gguf").files] == ["tiny-Q4_K_M.gguf"]
    (folder / "tiny-Q4_K_M.gguf").unlink()
    depot.import_dir(folder, "acme/no-q4")
    assert [p.name for p in depot.load("acme/no-q4", engine="gguf").files] == ["tiny-Q8_0.gguf"]
    alone = tmp_path / "alone"
    alone.mkdir()
    write_imatrix(alone / "imatrix.gguf")
    depot.import_dir(alone, "acme/imatrix")
    with pytest.raises(NotFoundError, match=r"imatrix\.gguf is no model .*name it with file="):
        depot.load("acme/imatrix", engine="gguf")
    matrix = depot.load("acme/imatrix", engine="gguf", file="imatrix.gguf")  # named: loaded as asked
    assert matrix.metadata["general.type"] == "imatrix"


def test_a_split_model_its_commit_lacks_a_shard_of_is_said_at_the_pull_and_the_load(
    tmp_path: Path, split_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An explorer's trial: a repo whose upload lacked a shard pulled as "downloaded" without a word, and the
    load then said the store lacked it (no pull brings it)."""
    (split_folder / "tiny-Q8_0-00002-of-00002.gguf").unlink()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        node_depot.import_dir(split_folder, REPO)
        node = LiveNode(node_depot)
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[node.url]) as local:
                local.pull(REPO, "Q8_0")
                said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
                assert any("tiny-Q8_0-00001-of-00002.gguf is one of 2 shards and the commit lacks "
                           "tiny-Q8_0-00002-of-00002.gguf" in message for message in said), said  # fmt: skip
                with pytest.raises(NotFoundError, match=r"its commit [0-9a-f]{12} lacks tiny-Q8_0-00002"):
                    local.load(REPO, "Q8_0", engine="gguf")
        finally:
            node.stop()
    from click.testing import CliRunner

    from modeldepot.cli import cli

    # `path -q` says so too: "the store lacks" sent users to pull again, which changed nothing (a trial)
    said = CliRunner().invoke(cli, ["path", REPO, "-q", "Q8_0", "--home", str(tmp_path / "local")])
    assert said.exit_code == 1 and "its commit" in said.output and "lacks tiny-Q8_0-00002" in said.output, (
        said.output
    )
    assert "the store lacks" not in said.output


def test_a_file_that_is_not_gguf_is_a_clear_error_and_not_cached(depot: Depot, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "tiny-Q8_0.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    depot.import_dir(folder, REPO)
    for _ in range(2):
        with pytest.raises(InvalidInputError, match=r"tiny-Q8_0\.gguf is not a GGUF file"):
            depot.load(REPO, "Q8_0", engine="gguf")
    stats = depot.engines.stats()
    assert (stats.load_failures, stats.cached_models) == (2, 0)


def test_every_truncation_is_a_clear_error(tmp_path: Path) -> None:
    good = tmp_path / "good.gguf"
    write_gguf(good)
    data = good.read_bytes()
    model = load_gguf(good)
    needed = max(info.offset + info.n_bytes for info in model.tensor_info.values())
    header_end = min(info.offset for info in model.tensor_info.values())
    bad = tmp_path / "bad.gguf"
    cuts = [*range(header_end + 1), *range(header_end + 1, needed, 61), needed - 1]
    for cut in cuts:
        bad.write_bytes(data[:cut])
        with pytest.raises(InvalidInputError, match=r"bad\.gguf (is not a GGUF file|is truncated)"):
            load_gguf(bad)
    bad.write_bytes(data[:needed])  # only the padding after the last tensor gone: still whole
    check_values(load_gguf(bad))


def kv_value_offset(data: bytes, key: str) -> int:
    """Where the value type of key-value ``key`` starts in a GGUF file's bytes."""
    encoded = key.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


def tensor_info_offset(data: bytes, name: str) -> int:
    """Where the ``n_dims`` of tensor ``name``'s info starts."""
    encoded = name.encode()
    return data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)


def patched(data: bytes, offset: int, fmt: str, *values: Any) -> bytes:
    packed = struct.pack(fmt, *values)
    return data[:offset] + packed + data[offset + len(packed) :]


def test_a_file_that_lies_about_its_sizes_is_refused_at_once(tmp_path: Path) -> None:
    good = tmp_path / "good.gguf"
    write_gguf(good)
    data = good.read_bytes()
    tokens, scores = (
        kv_value_offset(data, "tokenizer.ggml.tokens"),
        kv_value_offset(data, "tokenizer.ggml.scores"),
    )
    f32 = tensor_info_offset(data, "f32.weight")
    cases = {
        "magic": (b"GGML" + data[4:], "is not a GGUF file"),
        "version": (patched(data, 4, "<I", 99), "version 99"),
        "tensor count": (patched(data, 8, "<Q", 2**60), "truncated"),
        "string count": (patched(data, tokens + 8, "<Q", 2**62), "truncated"),  # gguf-py would loop on
        "float count": (patched(data, scores + 8, "<Q", 2**62), "truncated"),  # these for ages
        "value type": (patched(data, tokens, "<I", 77), "value type 77"),
        "dimensions": (patched(data, f32, "<I", 2**31), "has 2147483648 dimensions"),
        "tensor offset": (patched(data, f32 + 4 + 16 + 4, "<Q", 2**40), "tensor 'f32.weight' needs bytes"),
        "ggml type": (patched(data, f32 + 4 + 16, "<I", 999), "ggml type 999"),
        "rows": (patched(data, data.index(struct.pack("<Q", 9) + b"q8.weight") + 17 + 4, "<Q", 33), "blocks"),
    }
    bad = tmp_path / "bad.gguf"
    for case, (content, message) in cases.items():
        assert len(content) == len(data), case
        bad.write_bytes(content)
        started = time.monotonic()
        with pytest.raises(InvalidInputError, match=message):
            load_gguf(bad)
        assert time.monotonic() - started < 1.0, case
    with pytest.raises(NotFoundError):
        load_gguf(tmp_path / "absent.gguf")


def test_a_big_endian_file_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    write_gguf(path, endianess=gguf.GGUFEndian.BIG)
    assert path.read_bytes()[4:8] == struct.pack(">I", 3)
    model = load_gguf(path)
    assert (
        model.metadata["llama.context_length"] == 2048 and model.metadata["tokenizer.ggml.tokens"] == TOKENS
    )
    for name, expected in TENSORS.items():
        assert model.tensors[name].dtype.byteorder == ">" or expected.dtype.itemsize == 1
        np.testing.assert_array_equal(model.tensors[name], expected)


def test_model_info_gives_the_gguf_properties(single: Depot, depot: Depot, split_folder: Path) -> None:
    """`model_info(...).gguf` was None against a node holding the files (a trial): the first GGUF model's
    parameters, architecture and context length, as the Hub gives them (not its projector's); a split
    model's over every shard; nothing for a repo without GGUF."""
    from huggingface_hub import HfApi

    node = LiveNode(single)
    try:
        api = HfApi(endpoint=node.url)
        total = sum(int(np.prod(a.shape)) for a in TENSORS.values()) + int(np.prod(QUANT_SOURCE.shape))
        expected = {"total": total, "architecture": "llama", "context_length": 2048}
        assert api.model_info(REPO).gguf == expected
        assert api.model_info(REPO, expand=["gguf"]).gguf == expected
        # ... and a listing asked for it (it answered bare ids: an explorer's trial)
        assert [(m.id, m.gguf) for m in api.list_models(expand=["gguf"])] == [(REPO, expected)]
        depot.import_dir(split_folder, "acme/split-gguf")
        assert api.model_info("acme/split-gguf").gguf == expected  # (its tensors spread over two shards)
        (split_folder.parent / "plain").mkdir()
        (split_folder.parent / "plain" / "config.json").write_text("{}")
        depot.import_dir(split_folder.parent / "plain", "acme/plain")
        assert api.model_info("acme/plain").gguf is None
    finally:
        node.stop()


def test_a_missing_gguf_package_is_said_before_the_cache_makes_room(
    single: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's own package was not among those checked first: the warm engine was evicted for a load
    that had to fail (a review)."""
    single.engines.max_models = 1
    single.load(REPO, "Q8_0", engine=lambda path: object())
    monkeypatch.setitem(sys.modules, "gguf", None)  # (import gguf raises ImportError, as if not installed)
    with pytest.raises(ConfigError, match="'gguf' package"):
        single.load(REPO, "Q8_0", engine="gguf")
    assert single.engines.stats().evictions == 0


def test_a_quant_left_behind_by_a_pull_of_another_is_found_at_its_older_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user holds Q4_K_M; the upstream changes it; the user pulls Q8_0: main moves to the new commit and
    Q4_K_M stays at the old one only. `path -q Q4_K_M` (what llama-server -m gets) and an offline load failed
    while its bytes were on disk, the advice to download it again (an explorer's trial). They take it from
    the older revision, saying so; a commit id asked for stays that commit's."""
    from click.testing import CliRunner

    from modeldepot.cli import cli

    source = tmp_path / "source"
    source.mkdir()
    write_gguf(source / "tiny-Q4_K_M.gguf")
    write_gguf(source / "tiny-Q8_0.gguf")
    with open(source / "tiny-Q8_0.gguf", "ab") as q8:  # (other bytes than Q4_K_M's: never loaded here)
        q8.write(b"\0" * 64)
    (source / "README.md").write_text("tiny\n")  # (shared: each revision stays with it)
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        node_depot.import_dir(source, REPO)
        node = LiveNode(node_depot)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[node.url]) as local:
                local.pull(REPO, "Q4_K_M")
                old = local.resolve(REPO)
                (source / "tiny-Q4_K_M.gguf").write_bytes(
                    (source / "tiny-Q4_K_M.gguf").read_bytes() + b"\0" * 32
                )
                node_depot.import_dir(source, REPO)  # (a new Q4_K_M upstream)
                local.pull(REPO, "Q8_0")
                assert local.resolve(REPO) != old
        finally:
            node.stop()
    said = CliRunner().invoke(cli, ["path", REPO, "-q", "Q4_K_M", "--home", str(tmp_path / "local")])
    assert said.exit_code == 0, said.output
    found = Path(said.stdout.strip())
    assert found.name == "tiny-Q4_K_M.gguf" and found.parent.name == old, said.output
    assert f"this is Q4_K_M of {old[:12]}, the revision it left behind" in said.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Depot(tmp_path / "local") as offline:
        check_values(offline.load(REPO, "Q4_K_M", engine="gguf"))
        with pytest.raises(NotFoundError):  # (by the new commit's id: that one's, not an older one's)
            offline.load(REPO, "Q4_K_M", revision=offline.resolve(REPO), engine="gguf")
        offline.engines.clear()
    # `rm --quant` takes the copies older revisions no ref names hold too (main's alone went: an update's
    # left-behind copy kept its room, shown nowhere but du and info, an explorer's trial)
    with Depot(tmp_path / "local") as local:
        local.pin(REPO, "Q4_K_M", revision=old)  # (a known-good quant kept by its commit stays: a review)
        with pytest.raises(NotFoundError, match="no variant"):
            local.remove(REPO, quant="Q4_K_M")
        assert [p.revision for p in local.pins()] == [old]
        local.unpin(REPO, "Q4_K_M", revision=old)
        held = local.du().blob_bytes
        removed = local.remove(REPO, quant="Q4_K_M")  # (main lacks it: the older revision's goes, whole)
        assert removed.commits == (old,) and removed.blobs_removed == 1, removed
        assert [r.commit_id for r in local.repo_info(REPO).revisions] == [local.resolve(REPO)]
        assert local.du().blob_bytes == held - removed.bytes_freed and removed.bytes_freed > 0
        with pytest.raises(NotFoundError, match="no variant"):
            local.remove(REPO, quant="Q4_K_M")


def test_a_variant_of_a_pull_request_is_not_taken_for_mains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main holds Q8_0 alone; a contributor's PR (pulled to try it) has a Q4_K_M: `path -q Q4_K_M` printed the
    PR's file as main's "older revision", and an offline load loaded it (a review). Only a revision the
    branch left behind answers, and only for a variant the branch's commit has."""
    from click.testing import CliRunner

    from modeldepot.cli import cli

    main_source, pr_source = tmp_path / "main", tmp_path / "pr"
    main_source.mkdir()
    pr_source.mkdir()
    write_gguf(main_source / "tiny-Q8_0.gguf")
    write_gguf(pr_source / "tiny-Q8_0.gguf")
    write_gguf(pr_source / "tiny-Q4_K_M.gguf")
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        node_depot.import_dir(main_source, REPO)
        node_depot.import_dir(pr_source, REPO, revision="refs/pr/7")
        node = LiveNode(node_depot)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[node.url]) as local:
                local.pull(REPO)
                local.pull(REPO, "Q4_K_M", revision="refs/pr/7")
        finally:
            node.stop()
    said = CliRunner().invoke(cli, ["path", REPO, "-q", "Q4_K_M", "--home", str(tmp_path / "local")])
    assert said.exit_code == 1 and "no variant 'Q4_K_M'" in said.output, said.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Depot(tmp_path / "local") as offline, pytest.raises(NotFoundError, match="offline"):
        offline.load(REPO, "Q4_K_M", engine="gguf")


def test_model_info_reads_a_gguf_header_without_the_gguf_reader(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gguf package's reader made numpy objects of every element of every metadata array: an 8 MB file
    of a million empty strings cost it 18 s and 1.6 GB at each model info, eight at once a node's memory
    (an explorer's trial). The listing walks the header for its few values alone; a tensor whose dimensions
    multiply past what its file could hold is no model's."""
    from huggingface_hub import HfApi

    folder = tmp_path / "big-vocab"
    folder.mkdir()
    writer = gguf.GGUFWriter(folder / "vocab-Q8_0.gguf", "llama")
    writer.add_uint32("llama.context_length", 4096)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_array(
        "tokenizer.ggml.tokens", ["<s>", "</s>"] + [""] * 100_000
    )  # (empty strings: 8 bytes each)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 0)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 1)
    writer.add_tensor("w", F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    depot.import_dir(folder, "acme/vocab")
    lying = tmp_path / "lying"
    lying.mkdir()
    header = struct.pack("<4sIQQ", b"GGUF", 3, 1, 1)
    header += struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<IQ", 8, 5) + b"llama"
    header += struct.pack("<Q", 1) + b"t" + struct.pack("<I", 3) + struct.pack("<3Q", 2**40, 2**40, 2**40)
    header += struct.pack("<IQ", 0, 0)
    (lying / "lying-F32.gguf").write_bytes(header + bytes(64))
    depot.import_dir(lying, "acme/lying")

    def no_reader(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the listing read the header with GGUFReader")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    node = LiveNode(depot)
    try:
        api = HfApi(endpoint=node.url)
        assert api.model_info("acme/vocab").gguf == {
            "total": F32.size, "architecture": "llama", "context_length": 4096,
            "chat_template": "{{ messages }}", "bos_token": "<s>", "eos_token": "</s>",
        }  # fmt: skip
        assert api.model_info("acme/lying").gguf is None
        assert {m.id: m.gguf for m in api.list_models(expand=["gguf"])}["acme/lying"] is None
    finally:
        node.stop()


def test_a_shard_not_named_as_one_has_no_gguf_properties(
    depot: Depot, split_folder: Path, tmp_path: Path
) -> None:
    """A single file whose metadata says it is shard 1 of 2 gave that shard's parameters as the model's, where
    the loader refuses it (a review's trial)."""
    from huggingface_hub import HfApi

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(split_folder / "tiny-Q8_0-00001-of-00002.gguf", lone / "tiny-Q8_0.gguf")
    depot.import_dir(lone, "acme/lone")
    node = LiveNode(depot)
    try:
        assert HfApi(endpoint=node.url).model_info("acme/lone").gguf is None
    finally:
        node.stop()


def test_a_slow_header_read_holds_no_other_repos_model_info(
    single: Depot, depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One lock for every header read: a hostile file's slow read held every other repo's model info (a
    review's trial). Whoever asks for one commit's waits for its one read; another commit's goes on."""
    import threading

    from huggingface_hub import HfApi

    from modeldepot.server import listing

    (tmp_path / "other").mkdir()
    write_gguf(tmp_path / "other" / "other-Q8_0.gguf")
    depot.import_dir(tmp_path / "other", "acme/other")
    reading, go_on = threading.Event(), threading.Event()
    real = listing.gguf_summary

    def held_read(paths: list[Path]) -> Any:
        if paths[0].name == "tiny-Q8_0.gguf":
            reading.set()
            go_on.wait(30)
        return real(paths)

    monkeypatch.setattr(listing, "gguf_summary", held_read)
    node = LiveNode(depot)
    try:
        api = HfApi(endpoint=node.url)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(api.model_info, REPO)
            assert reading.wait(30)
            assert api.model_info("acme/other").gguf is not None  # (while the other read is held)
            go_on.set()
            assert slow.result(30).gguf is not None
    finally:
        go_on.set()
        node.stop()


def test_one_reader_of_a_commits_headers_at_a_time() -> None:
    """The lock of a commit's header reads went as its holder let go, while a waiter woken had yet to take
    it: the next asker made another, and four read one commit at once (a review's trial)."""
    import threading
    import time

    from modeldepot.server import listing

    key = ("home", "acme/x", "c0ffee", ("sha",))
    inside, most = [0], [0]
    guard = threading.Lock()

    def reader() -> None:
        for _ in range(300):
            with listing._read_once(key):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.0005)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and listing._BEING_READ == {}, most
