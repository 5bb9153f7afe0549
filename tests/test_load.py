"""Depot.load: real onnxruntime sessions (external data included) and safetensors, warmed up, cached,
pulled through the chain when missing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from conftest import SMALL_CHUNK, LiveNode, SilentAddress, closed_port, flip_byte, write_model_dir
from modeldepot import Depot
from modeldepot.engines.adapters import dummy_inputs, load_safetensors, warmup
from modeldepot.errors import ConfigError, CorruptBlobError, InvalidInputError, NotFoundError, OfflineError

REPO = "acme/linear"
rng = np.random.default_rng(3)
WEIGHT = rng.standard_normal((4, 256)).astype(np.float32)
BIAS = rng.standard_normal(256).astype(np.float32)


def linear_model(dtype: int, weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """y = x @ W + b, with a symbolic batch dimension."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", dtype, ["batch", 4])],
        [helper.make_tensor_value_info("y", dtype, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_repo(folder: Path) -> Path:
    (folder / "onnx").mkdir(parents=True)
    onnx.save_model(linear_model(TensorProto.FLOAT, WEIGHT, BIAS), str(folder / "onnx" / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data",
                    size_threshold=0)  # fmt: skip
    onnx.save_model(linear_model(TensorProto.FLOAT16, WEIGHT.astype(np.float16), BIAS.astype(np.float16)),
                    str(folder / "onnx" / "model_fp16.onnx"))  # fmt: skip
    (folder / "config.json").write_text('{"model_type": "linear"}')
    assert (folder / "onnx" / "model.onnx_data").stat().st_size >= WEIGHT.nbytes
    return folder


@pytest.fixture
def loaded(depot: Depot, tmp_path: Path) -> Depot:
    depot.import_dir(write_repo(tmp_path / "repo"), REPO)
    return depot


def test_load_gives_a_warmed_session_with_external_data_and_caches_it(
    loaded: Depot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modeldepot.engines.adapters")
    session = loaded.load(REPO)
    assert "warmed up in 1 passes" in caplog.text
    x = rng.standard_normal((3, 4)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ WEIGHT + BIAS, rtol=1e-5)
    assert loaded.load(REPO) is session
    stats = loaded.engines.stats()
    assert (stats.total_misses, stats.total_hits, stats.cached_models) == (1, 1, 1)


def test_load_takes_onnxruntimes_providers_and_caches_a_session_per_list(loaded: Depot) -> None:
    """`load` took no execution providers: a GPU's session needed a caller's own loader, which cannot reach
    external data on a read-only store (an explorer's trial)."""
    default = loaded.load(REPO, "fp32", warmup=0)
    chosen = loaded.load(REPO, "fp32", warmup=0, providers=["CPUExecutionProvider"])
    assert chosen.get_providers() == ["CPUExecutionProvider"] and chosen is not default
    assert loaded.load(REPO, "fp32", warmup=0, providers=("CPUExecutionProvider",)) is chosen  # (a cache hit)
    for wrong, engine in (
        ("CPUExecutionProvider", "onnxruntime"),
        (["CPUExecutionProvider"], "safetensors"),
        ([], "onnxruntime"),
    ):
        with pytest.raises(InvalidInputError):
            loaded.load(REPO, "fp32", warmup=0, providers=wrong, engine=engine)


def test_a_callers_loader_and_linked_folder_open_a_model_with_external_data(
    loaded: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime (1.31 and later) resolves links and refuses external data outside the model's real folder:
    a caller's own loader got the snapshot path, and so did `modeldepot path`, and onnxruntime refused both
    ("External data path escapes model directory"), where the same files from the Hugging Face cache loaded
    (an explorer's trial). A caller's loader of such a model gets the folder of hard links for the call;
    `Depot.linked_folder` gives one for a block; `modeldepot path` says what to do."""
    import onnxruntime as ort
    from click.testing import CliRunner

    from modeldepot.cli import cli

    x = rng.standard_normal((3, 4)).astype(np.float32)
    seen: list[Path] = []

    def own(path: Path) -> Any:
        seen.append(path)
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    session = loaded.load(REPO, engine=own, file="onnx/model.onnx", warmup=0)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ WEIGHT + BIAS, rtol=1e-5)
    assert not seen[0].exists(), "the folder of links goes after the call"
    with loaded.linked_folder(REPO.upper(), "onnx") as folder:
        assert sorted(os.listdir(folder)) == ["model.onnx", "model.onnx_data", "model_fp16.onnx"]
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ WEIGHT + BIAS, rtol=1e-5)
    assert not folder.exists()
    with pytest.raises(InvalidInputError), loaded.linked_folder(REPO, "../onnx"):
        pass
    # A file of no ONNX folder: a caller's loader gets the lasting snapshot path
    assert (
        loaded.load(REPO, engine=lambda path: seen.append(path) or "own", file="config.json", warmup=0)
        == "own"
    )
    assert seen[-1] == loaded.file_path(REPO, "config.json")
    monkeypatch.delenv("MODELDEPOT_HOME", raising=False)
    said = CliRunner().invoke(cli, ["path", REPO, "onnx/model.onnx", "--home", str(loaded.home)])
    assert said.exit_code == 0 and said.stdout.strip() == str(loaded.file_path(REPO, "onnx/model.onnx"))
    assert "Depot.linked_folder" in said.stderr and "cp -rL" in said.stderr, said.stderr
    quiet = CliRunner().invoke(cli, ["path", REPO, "config.json", "--home", str(loaded.home)])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr


def test_external_data_kept_in_a_subfolder_loads(depot: Depot, tmp_path: Path) -> None:
    """onnx.save_model(..., location="weights/w.bin"): onnxruntime loads it from the folder; through
    ``load`` it was a raw "External data path does not exist" (only the model's own folder was linked)."""
    folder = tmp_path / "sub"
    (folder / "onnx" / "weights").mkdir(parents=True)
    onnx.save_model(linear_model(TensorProto.FLOAT, WEIGHT, BIAS), str(folder / "onnx" / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="weights/w.bin",
                    size_threshold=0)  # fmt: skip
    assert (folder / "onnx" / "weights" / "w.bin").stat().st_size >= WEIGHT.nbytes
    depot.import_dir(folder, "acme/sub")
    session = depot.load("acme/sub")
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ WEIGHT + BIAS, rtol=1e-5)
    # External data not named after its model is its variant's all the same: pulled with it, preloaded
    # with it, counted in the engine cache's budget (the graph alone was: 149 bytes of a 4 KiB model)
    [variant] = depot.get_manifest("acme/sub").variants
    assert set(variant.files) >= {"onnx/model.onnx", "onnx/weights/w.bin"}
    assert depot.engines.stats().total_memory_bytes >= WEIGHT.nbytes
    assert depot.preloader.preload("acme/sub", variant.name).bytes >= WEIGHT.nbytes
    depot.store.quarantine(depot.file_info("acme/sub", "onnx/weights/w.bin").sha256)
    assert depot.engines.keys() == [], "the session mapping the quarantined weights is let go of"


def test_a_root_model_loads_whatever_happened_to_other_files_of_its_repo(
    depot: Depot, tmp_path: Path
) -> None:
    """A model at the repo's root: its folder is the whole repo, and a quarantined file of another model
    in a subfolder failed the load (every file was checked and linked for onnxruntime)."""
    folder = tmp_path / "root"
    (folder / "gguf").mkdir(parents=True)
    onnx.save_model(linear_model(TensorProto.FLOAT, WEIGHT, BIAS), str(folder / "model.onnx"))
    (folder / "gguf" / "other.bin").write_bytes(b"x" * 5000)
    depot.import_dir(folder, "acme/root")
    depot.store.quarantine(depot.file_info("acme/root", "gguf/other.bin").sha256)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(depot.load("acme/root", warmup=0).run(None, {"x": x})[0], x @ WEIGHT + BIAS,
                               rtol=1e-5)  # fmt: skip


def test_a_quant_loads_when_another_quant_beside_it_is_corrupt(loaded: Depot) -> None:
    """onnx-community keeps every quant in one onnx/ folder: fp32's quarantined external data made fp16
    unloadable too (every file of the folder was checked for the loader), with an error naming a digest."""
    loaded.store.quarantine(loaded.file_info(REPO, "onnx/model.onnx_data").sha256)
    assert loaded.load(REPO, "fp16", warmup=0).get_inputs()[0].type == "tensor(float16)"
    with pytest.raises(CorruptBlobError, match=r"onnx/model\.onnx_data of acme/linear@"):
        loaded.load(REPO, "fp32", warmup=0)


def test_a_session_a_request_still_runs_on_is_taken_back_not_built_twice(tmp_path: Path) -> None:
    """One slot: a request held fp32's session while another loaded fp16; fp32's next load built a second
    session beside the live one (an explorer's trial: the process past the budget). The live one is taken back."""
    from modeldepot.engines import LoadedModelCache

    cache: LoadedModelCache[object] = LoadedModelCache(max_models=1)
    with Depot(tmp_path / "d", engine_cache=cache) as depot:
        depot.import_dir(write_repo(tmp_path / "repo"), REPO)
        running = depot.load(REPO, "fp32", warmup=0)
        other = depot.load(REPO, "fp16", warmup=0)
        assert len(cache.keys()) == 1
        assert depot.load(REPO, "fp32", warmup=0) is running
        assert depot.load(REPO, "fp16", warmup=0) is other  # (its turn to be held out: taken back too)
        del running, other
        gc.collect()
        fresh = depot.load(REPO, "fp32", warmup=0)  # (nobody held it: built anew, and it works)
        x = rng.standard_normal((2, 4)).astype(np.float32)
        np.testing.assert_allclose(fresh.run(None, {"x": x})[0], x @ WEIGHT + BIAS, rtol=1e-5)
        assert cache.stats().total_misses == 3


def test_depots_sharing_an_engine_cache_let_go_of_their_own_engines_only(tmp_path: Path) -> None:
    """A cache given to two depots: each one's look for removed models took the other store's engines for
    removed ones and evicted them (every 2 s, a cold load each time); a remove in one dropped the other's."""
    from modeldepot.engines import LoadedModelCache

    cache: LoadedModelCache[object] = LoadedModelCache(max_models=8)
    with Depot(tmp_path / "a", engine_cache=cache) as a, Depot(tmp_path / "b", engine_cache=cache) as b:
        for depot in (a, b):
            depot.import_dir(write_repo(tmp_path / f"repo-{depot.home.name}"), REPO)
        ours = a.load(REPO, warmup=0)
        b.load(REPO, "fp16", warmup=0)
        assert b.let_go_of_removed() == 0 and a.load(REPO, warmup=0) is ours
        b.remove(REPO)  # the same repo, the same commit, in b's store
        assert a.load(REPO, warmup=0) is ours
        assert a.let_go_of_removed() == 0 and cache.stats().evictions == 1  # (b's fp16 engine)


def test_load_picks_the_variant(loaded: Depot) -> None:
    session = loaded.load(REPO, "fp16")
    assert session.get_inputs()[0].type == "tensor(float16)"
    assert loaded.load(REPO, "FP16") is session  # variant names match case-insensitively
    with pytest.raises(NotFoundError, match="q4"):
        loaded.load(REPO, "q4")


def test_safetensors_and_callable_engines(depot: Depot, tmp_path: Path) -> None:
    folder = tmp_path / "st"
    folder.mkdir()
    tensors = {"w": WEIGHT, "b": BIAS, "empty": np.zeros((0, 4), np.float32)}
    save_file(tensors, str(folder / "model.safetensors"))
    depot.import_dir(folder, "acme/st")
    loaded = depot.load("acme/st", engine="safetensors")
    assert set(loaded) == {"w", "b", "empty"}
    np.testing.assert_array_equal(loaded["w"], WEIGHT)
    np.testing.assert_array_equal(loaded["b"], BIAS)
    # (an empty tensor too: it was a writable array, an explorer's find)
    assert not any(t.flags.writeable for t in loaded.values()), "the tensors map the shared file: read-only"
    assert loaded["empty"].shape == (0, 4)
    paths: list[Path] = []

    def engine(path: Path) -> str:
        paths.append(path)
        return "custom"

    assert depot.load("acme/st", engine=engine) == "custom"
    assert (
        paths[0].name == "model.safetensors"
        and paths[0].read_bytes()[:8] == (folder / "model.safetensors").read_bytes()[:8]
    )
    with pytest.raises(ConfigError, match="unknown engine"):
        depot.load("acme/st", engine="tensorrt")
    try:
        import torch  # noqa: F401
    except ImportError:
        # Said before the cache makes room for it: the warm engines stay (a failed load evicted them)
        depot.engines.max_models = 1
        warm = depot.load("acme/st", engine="safetensors")
        with pytest.raises(ConfigError, match="pip install torch"):
            depot.load("acme/st", engine="torch")
        assert depot.load("acme/st", engine="safetensors") is warm and depot.engines.stats().evictions == 0
    else:
        assert set(depot.load("acme/st", engine="torch")) == {"w", "b"}


def test_a_sharded_safetensors_checkpoint_loads_whole(depot: Depot, tmp_path: Path) -> None:
    """The Hub's layout for every checkpoint over 5 GB: engine="safetensors" returned the first shard's
    tensors alone, silently, and the cache counted that shard's size alone."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"w": WEIGHT}, str(folder / "model-00001-of-00002.safetensors"))
    save_file(
        {"b": BIAS, "c": np.arange(1000, dtype=np.float32)}, str(folder / "model-00002-of-00002.safetensors")
    )
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))  # fmt: skip
    depot.import_dir(folder, "acme/sharded")
    loaded = depot.load("acme/sharded", engine="safetensors")
    assert set(loaded) == {"w", "b", "c"}
    np.testing.assert_array_equal(loaded["c"], np.arange(1000, dtype=np.float32))
    shards = sum((folder / f"model-0000{i}-of-00002.safetensors").stat().st_size for i in (1, 2))
    assert depot.engines.stats().total_memory_bytes == shards
    # Two shards holding one tensor are no checkpoint
    save_file({"w": WEIGHT}, str(folder / "model-00002-of-00002.safetensors"))
    depot.import_dir(folder, "acme/twice")
    with pytest.raises(InvalidInputError, match="in two shards"):
        depot.load("acme/twice", engine="safetensors")
    # A store holding a shard short (a pull cut midway) has no model to load: a pull fetches the rest
    from modeldepot.engines.adapters import model_file

    with pytest.raises(NotFoundError, match=r"lacks model-00002-of-00002\.safetensors"):
        model_file(["config.json", "model-00001-of-00002.safetensors"], None, (".safetensors",))


def test_a_malformed_safetensors_file_is_a_clear_error(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": WEIGHT}, str(good))
    data = good.read_bytes()
    cases = {
        "short": b"abc",
        "header too long": (10**12).to_bytes(8, "little") + data[8:],
        "not json": data[:8] + b"x" * (len(data) - 8),
        "out of the file": data[:8]
        + data[8:].replace(b'"data_offsets":[0,4096]', b'"data_offsets":[0,9999]'),
        "nested too deep": (100_000).to_bytes(8, "little") + b"[" * 100_000,  # (a RecursionError to json)
    }
    length = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
    for field, value in (("data_offsets", ["0", "4096"]), ("data_offsets", [0.0, 4096.0]),
                         ("shape", [4, 256.0]), ("shape", [True, 1024]), ("dtype", 5)):  # fmt: skip
        described = json.dumps({**header, "w": {**header["w"], field: value}}).encode()
        cases[f"{field} {value}"] = len(described).to_bytes(8, "little") + described + body
    for content in cases.values():
        (tmp_path / "bad.safetensors").write_bytes(content)
        with pytest.raises(InvalidInputError, match=r"bad\.safetensors"):
            load_safetensors(tmp_path / "bad.safetensors")
    assert load_safetensors(good)["w"].shape == WEIGHT.shape


def test_a_file_an_engine_cannot_parse_is_bad_input_naming_the_repo_and_file(
    depot: Depot, tmp_path: Path
) -> None:
    """onnxruntime's own InvalidProtobuf (and safetensors' SafetensorError for a dtype numpy lacks) reached the
    caller raw, naming a private folder that was gone by then."""
    header = json.dumps({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    depot.import_dir(
        write_model_dir(tmp_path / "o", {"model.onnx": b"not an onnx model" * 50}), "acme/bad-onnx"
    )
    depot.import_dir(write_model_dir(tmp_path / "s", {"model.safetensors": len(header).to_bytes(8, "little")
                                                       + header + b"\0" * 2}), "acme/bad-st")  # fmt: skip
    for repo, engine, file in (("acme/bad-onnx", "onnxruntime", "model.onnx"),
                               ("acme/bad-st", "safetensors", "model.safetensors")):  # fmt: skip
        with pytest.raises(InvalidInputError, match=f"{engine} could not load {file} of {repo}") as refused:
            depot.load(repo, engine=engine, warmup=0)
        assert "/tmp/" not in str(refused.value).replace(str(tmp_path), "") and str(depot.home) not in str(
            refused.value
        )


def test_a_file_rotten_in_place_that_an_engine_refuses_is_found_corrupt_not_bad_input(
    depot: Depot, tmp_path: Path
) -> None:
    """An adopted cache's file written through its link with the mtime put back passes every look at the
    file, and its load said "invalid input" (InvalidProtobuf) of a model the store held corrupt (a trial). A
    file an engine refuses is checked: corrupt, it is quarantined and said so; sound, the engine's refusal
    stands (a file that is no ONNX model from the start)."""
    write_repo(tmp_path / "src")
    depot.import_dir(tmp_path / "src", "acme/rot")
    model = depot.file_info("acme/rot", "onnx/model.onnx")
    blob = depot.store.blobs.path(model.sha256)
    for offset in range(min(64, blob.stat().st_size)):
        flip_byte(blob, offset)  # the protobuf's start: onnxruntime cannot parse it
    with pytest.raises(CorruptBlobError, match="the engine refused it") as found:
        depot.load("acme/rot", engine="onnxruntime", warmup=0)
    assert found.value.sha256 == model.sha256 and "quarantined" in str(found.value)
    assert not blob.exists() and not depot.has_file("acme/rot", model.path)


def test_a_rotten_shard_of_a_sharded_checkpoint_is_found_corrupt_not_bad_input(
    depot: Depot, tmp_path: Path
) -> None:
    """A sharded safetensors checkpoint whose second shard rotted: its load said "invalid input", and the shard
    stayed in the store, served (an explorer's trial); only a split GGUF's shards were checked."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"w": WEIGHT}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": BIAS}, str(folder / "model-00002-of-00002.safetensors"))
    depot.import_dir(folder, "acme/sharded")
    second = depot.file_info("acme/sharded", "model-00002-of-00002.safetensors")
    blob = depot.store.blobs.path(second.sha256)
    for offset in range(8):
        flip_byte(blob, offset)  # (the header's length: safetensors cannot read it)
    with pytest.raises(CorruptBlobError, match="the engine refused it") as found:
        depot.load("acme/sharded", engine="safetensors")
    assert found.value.sha256 == second.sha256 and not depot.has_file("acme/sharded", second.path)


def test_bf16_and_fp8_safetensors_load_as_arrays_mapping_the_file(depot: Depot, tmp_path: Path) -> None:
    """A BF16 checkpoint (most of the Hub's LLM weights) failed to load with engine="safetensors": "data
    type 'bfloat16' not understood", as bad input (a trial). Its tensors are ml_dtypes arrays now, mapping
    the stored file as the other types' do; a type no numpy array holds is named."""
    import ml_dtypes

    values = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -0.25]], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # (exact: 8 bits of mantissa)
    fp8 = values.astype(ml_dtypes.float8_e4m3fn).tobytes()
    header = json.dumps({
        "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
        "q": {"dtype": "F8_E4M3", "shape": [2, 3], "data_offsets": [12, 18]},
        "__metadata__": {"format": "pt"},
    }).encode()  # fmt: skip
    content = len(header).to_bytes(8, "little") + header + bf16 + fp8
    depot.import_dir(write_model_dir(tmp_path / "m", {"model.safetensors": content}), "acme/bf16")
    tensors = depot.load("acme/bf16", engine="safetensors")
    assert tensors["w"].dtype == ml_dtypes.bfloat16 and tensors["q"].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(tensors["w"].astype(np.float32), values)
    np.testing.assert_array_equal(tensors["q"].astype(np.float32), values)
    assert not tensors["w"].flags.writeable, "it maps the stored file"
    shifted = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 4]}}).encode()
    depot.import_dir(write_model_dir(tmp_path / "n", {"model.safetensors": len(shifted).to_bytes(8, "little")
                                                      + shifted + b"\0" * 4}), "acme/short")  # fmt: skip
    with pytest.raises(InvalidInputError, match="does not fit the file"):  # (4 BF16 values are 8 bytes)
        depot.load("acme/short", engine="safetensors")
    # Two tensors on the same bytes, which the safetensors library refuses: refused, not aliased arrays
    overlapping = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()  # fmt: skip
    depot.import_dir(write_model_dir(tmp_path / "o", {"model.safetensors": len(overlapping).to_bytes(8, "little")
                                                      + overlapping + b"\0" * 12}), "acme/overlap")  # fmt: skip
    with pytest.raises(InvalidInputError, match="'a' and 'b' overlap"):
        depot.load("acme/overlap", engine="safetensors")


def test_warmup_survives_errors_and_shapes_inputs(loaded: Depot) -> None:
    session = loaded.load(REPO, warmup=0)
    inputs = dummy_inputs(session)
    assert inputs["x"].shape == (1, 4) and inputs["x"].dtype == np.float32
    report = warmup(session, passes=3)
    assert report.ok and report.passes == 3 and len(report.seconds) == 3

    def broken(**_: Any) -> None:
        raise RuntimeError("no GPU")

    failed = warmup(broken, passes=2)
    assert not failed.ok and failed.passes == 0 and "no GPU" in failed.errors[0]
    with pytest.raises(ValueError, match="passes"):
        warmup(session, passes=-1)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LiveNode]:
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        node_depot.import_dir(write_repo(tmp_path / "up-repo"), REPO)
        node = LiveNode(node_depot)
        yield node
        node.stop()


def test_load_pulls_a_missing_variant_first(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as local:
        session = local.load(REPO, "fp16")
        assert session.get_inputs()[0].type == "tensor(float16)"
        assert local.has_file(REPO, "onnx/model_fp16.onnx") and local.has_file(REPO, "config.json")
        assert not local.has_file(REPO, "onnx/model.onnx_data"), "only the variant asked for"
        local.remove(REPO)
        local.pull(REPO, "fp16")  # one name alone, not in a list: it was taken letter by letter
        assert local.has_file(REPO, "onnx/model_fp16.onnx") and not local.has_file(
            REPO, "onnx/model.onnx_data"
        )


def test_a_load_that_pulls_a_variant_removed_beside_it_lets_go_of_the_old_engine(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rm --quant` beside a worker, then its next load within LOOK_EVERY: the variant was pulled again and
    the cached engine, mapping the removed blob, handed out over the new copy, the model taking twice its
    room until the worker ended (an explorer's trial, with a 40 GB GGUF in mind). Let go of first now."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as local:
        first = local.load(REPO, "fp16", warmup=0)
        with Depot(local.home) as beside:  # (another process's Depot: nothing of this one's memory)
            beside.remove(REPO, quant="fp16")
        local._held._next_look = time.monotonic() + 3600  # (within LOOK_EVERY of the last look)
        again = local.load(REPO, "fp16", warmup=0)
        assert again is not first and local.engines.stats().evictions == 1
        assert local.du().blob_bytes == sum(f.size for f in local.repo_info(REPO).revisions[0].files)


def test_a_load_of_a_variant_with_the_wrong_engine_pulls_nothing_and_evicts_nothing(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load(repo, quant) with an engine the variant's files are not for (the default onnxruntime on a GGUF
    repo's quant): the variant was pulled whole, under a budget after evicting the user's other models to
    make room, and only then was it said to hold no such file (an explorer's trial). The scan says it:
    nothing is pulled, nothing evicted."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as local:
        local.import_dir(write_model_dir(tmp_path / "mine", {"w.gguf": os.urandom(3 << 20)}), "acme/mine")
        held = local.du().blob_bytes
        local.set_max_size(held)  # (no room for the variant beside the user's model)
        with pytest.raises(NotFoundError) as raised:
            local.load(REPO, "fp16", engine="gguf")
        assert str(raised.value).startswith("no .gguf file in variant 'fp16'"), raised.value
        assert "pulling" not in str(raised.value)
        assert [r.repo_id for r in local.list_repos()] == ["acme/mine"], "the user's model stays"
        assert local.du().blob_bytes == held and not local.has_file(REPO, "onnx/model_fp16.onnx")


def test_load_pulls_again_a_file_found_corrupt(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file found corrupt (a read, a scrub) is quarantined: `load` failed on it, again and again, while it
    pulls a missing one and `get_file(download=True)` pulled it again (an explorer's trial)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as local:
        local.pull(REPO, "fp16")
        path = local.file_path(REPO, "onnx/model_fp16.onnx")
        flip_byte(local.store.blobs.path(local.file_info(REPO, "onnx/model_fp16.onnx").sha256), 100)
        assert not local.verify().ok  # (found, quarantined: as a scrub does)
        with pytest.raises(CorruptBlobError):
            local.get_file(REPO, "onnx/model_fp16.onnx")
        session = local.load(REPO, "fp16")
        assert session.get_inputs()[0].type == "tensor(float16)"
        assert bytes(local.get_file(REPO, "onnx/model_fp16.onnx")) == path.read_bytes()
        assert local.verify().ok


@contextlib.contextmanager
def a_pulled_copy(tmp_path: Path, source: Path, repo_id: str) -> Iterator[tuple[str, Depot]]:
    """A node serving ``source`` as ``repo_id``, and a store (``tmp_path / "local"``, open) that pulled it from
    there: (the node's URL, the store)."""
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(source, repo_id)
        upstream = LiveNode(upstream_depot)
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as local:
                local.pull(repo_id)
                yield upstream.url, local
        finally:
            upstream.stop()


@pytest.mark.parametrize("found", ["a shared file scrubbed", "files torn by a power loss, read unchecked"])
def test_load_pulls_again_a_shared_file_found_corrupt_and_one_found_so_as_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, found: str
) -> None:
    """A config torn by a power loss (or a rot a scrub found) failed every load for good: the load pulled a
    quarantined model file again, not a quarantined shared one. And right after the restart, a load that
    read a torn blob before the store's background check had reached it failed where the check's own find
    healed (a race, an explorer's trial on an edge box). Both are pulled again, and the load goes on."""
    from modeldepot.store import durability

    weights = {"w": np.arange(4096, dtype=np.float32)}
    source = tmp_path / "src"
    source.mkdir()
    save_file(weights, str(source / "model.safetensors"))
    (source / "config.json").write_text('{"model_type": "linear", "hidden_size": 4096}')
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "before")
    monkeypatch.setattr(durability.Durability, "_start", lambda self: None)  # (no background flush nor check)
    with a_pulled_copy(tmp_path, source, "acme/st") as (upstream, local):
        torn = ["config.json"] if found.startswith("a shared") else ["config.json", "model.safetensors"]
        for path in torn:
            flip_byte(local.store.blobs.path(local.file_info("acme/st", path).sha256), 10)
        if found.startswith("a shared"):
            assert not local.verify().ok  # (found, quarantined: as a scrub does)
        local.close()
        monkeypatch.setenv("MODELDEPOT_BOOT_ID", "after")
        with Depot(tmp_path / "local", servers=[upstream]) as again:
            loaded = again.load("acme/st", engine="safetensors", warmup=0)
            assert np.array_equal(loaded["w"], weights["w"])
            assert again.verify().ok
            for path in ("config.json", "model.safetensors"):
                assert bytes(again.get_file("acme/st", path)) == (source / path).read_bytes()


def test_a_load_offline_is_not_stopped_by_a_corrupt_file_it_does_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quarantined shared file the engine never reads (a root tokenizer.json beside weights/) is no reason
    to pull: counted as missing, it failed loads that worked offline, or with the upstream down (review 41)."""
    weights = {"w": np.arange(4096, dtype=np.float32)}
    source = tmp_path / "src"
    (source / "weights").mkdir(parents=True)
    save_file(weights, str(source / "weights" / "model.safetensors"))
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with a_pulled_copy(tmp_path, source, "acme/st") as (_, local):
        flip_byte(local.store.blobs.path(local.file_info("acme/st", "tokenizer.json").sha256), 3)
        assert not local.verify().ok  # (quarantined, as a scrub finds it)
    monkeypatch.setenv("MODELDEPOT_OFFLINE", "1")
    with Depot(tmp_path / "local") as local:
        assert np.array_equal(local.load("acme/st", engine="safetensors", warmup=0)["w"], weights["w"])


def test_load_without_a_variant_pulls_the_one_it_loads(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load(repo)`` loads fp32; it pulled every variant first (a GGUF repo's every quant)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as local:
        session = local.load(REPO)
        assert session.get_inputs()[0].type == "tensor(float)"
        assert local.has_file(REPO, "onnx/model.onnx_data") and local.has_file(REPO, "config.json")
        assert not local.has_file(REPO, "onnx/model_fp16.onnx"), "only the variant it loads"


def test_a_load_by_engine_alone_pulls_that_engines_variant_whatever_the_store_holds_of_the_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo with ONNX and safetensors weights: load(engine="safetensors") worked on a fresh store, and on
    one that held the ONNX variant (an earlier load) said the repo had no .safetensors file (an explorer's
    trial). Its variant is pulled, as on a fresh store; the other way round too."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    folder = write_repo(tmp_path / "mixed")
    save_file({"weight": WEIGHT}, str(folder / "model.safetensors"))
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        node_depot.import_dir(folder, REPO)
        node = LiveNode(node_depot)
        try:
            for first, then in (("onnxruntime", "safetensors"), ("safetensors", "onnxruntime")):
                with Depot(tmp_path / f"local-{first}", chunk_size=SMALL_CHUNK, servers=[node.url]) as local:
                    local.load(REPO, engine=first)
                    loaded = local.load(REPO, engine=then)
                    if then == "safetensors":
                        assert np.array_equal(loaded["weight"], WEIGHT)
                    else:
                        assert loaded.get_inputs()[0].type == "tensor(float)"
        finally:
            node.stop()


def test_load_async_loads_beside_a_pull_on_the_same_loop(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async app had no async load: the blocking one is refused on a loop where a pull_async runs (it
    would wait for that pull's claim of a shared config, and the pull for the loop), and it had to guess
    between asyncio.to_thread and the engine cache's own async call (which charged the model twice)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as local:

        async def app() -> Any:
            warming = asyncio.create_task(local.pull_async(REPO, ["fp16"]))  # (its config.json: shared)
            await asyncio.sleep(0)
            session = await local.load_async(REPO, warmup=0)
            await warming
            return session

        session = asyncio.run(asyncio.wait_for(app(), 60))
        assert session.get_inputs()[0].type == "tensor(float)"
        assert asyncio.run(local.load_async(REPO, warmup=0)) is session, "one engine, cached"
        assert len(local.engines.keys()) == 1


def test_a_bare_precision_names_the_engines_variant_on_every_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo with fp16 in ONNX and in safetensors (onnx-fp16, safetensors-fp16): load(repo, "fp16") failed on
    a fresh store ("no variant 'fp16'") and loaded the ONNX file on one that held onnx-fp16, for the
    safetensors engine too, whose error then said to switch engines (an explorer's trial). It is the
    engine's fp16 everywhere, pulled when the store lacks it; a name no commit has is said once, with the
    commit's list (the store's and the commit's were both said, each list different)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    folder = write_repo(tmp_path / "mixed")
    half = WEIGHT.astype(np.float16)
    save_file({"weight": WEIGHT}, str(folder / "model.safetensors"))
    save_file({"weight": half}, str(folder / "model.fp16.safetensors"))
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        node_depot.import_dir(folder, REPO)
        node = LiveNode(node_depot)
        try:
            for first in (None, "onnx-fp16", "safetensors-fp16"):
                with Depot(tmp_path / f"local-{first}", chunk_size=SMALL_CHUNK, servers=[node.url]) as local:
                    if first is not None:
                        local.pull(REPO, [first])
                    session = local.load(REPO, "fp16")
                    assert session.get_inputs()[0].type == "tensor(float16)", first
                    tensors = local.load(REPO, "fp16", engine="safetensors")
                    assert tensors["weight"].dtype == np.float16 and np.array_equal(tensors["weight"], half)
                    assert local.has_file(REPO, "model.fp16.safetensors")
                    assert not local.has_file(REPO, "model.safetensors"), "only the variant it loads"
                    with pytest.raises(NotFoundError) as lacking:
                        local.load(REPO, "int4")
                    said = str(lacking.value)
                    assert said.count("no variant 'int4'") == 1 and "onnx-fp16" in said, said
        finally:
            node.stop()


def test_a_depot_dropped_without_close_lets_go_of_its_engines_and_threads(loaded: Depot) -> None:
    """A notebook's cell run again (`d = Depot(); d.load(...)`) kept every depot dropped so, and the engines
    each held: the store's flusher, a running thread, reached it through the store's hooks (40 MiB more a run
    with a 40 MiB model, an explorer's trial). A dropped depot is collected, and closes its store."""
    import threading
    import weakref

    def flushers() -> int:
        return sum(t.name == "modeldepot-durability" and t.is_alive() for t in threading.enumerate())

    before = flushers()
    for _ in range(3):
        other = Depot(loaded.home)
        session = other.load(REPO, warmup=0)
        dropped, engine = weakref.ref(other), weakref.ref(session)
        del other, session
        gc.collect()
        assert dropped() is None and engine() is None, "a depot dropped lives on, with its engine"
    deadline = time.monotonic() + 10
    while flushers() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flushers() == before
    assert loaded.load(REPO, warmup=0) is not None  # (the depot held stays whole)


def test_bad_input_is_refused_before_anything_loads(loaded: Depot) -> None:
    with pytest.raises(ValueError, match="repo"):
        loaded.load("not a repo")
    # (each was a raw TypeError or AttributeError, or came after the whole load: warmup=-1)
    # (10**9 warm-up passes hung the load: an explorer's trial)
    for kwargs, error in (({"warmup": -1}, InvalidInputError), ({"warmup": "x"}, InvalidInputError),
                          ({"warmup": 10**9}, InvalidInputError),
                          ({"engine": None}, ConfigError), ({"quant": 5}, InvalidInputError),
                          ({"inputs": [1, 2]}, InvalidInputError)):  # fmt: skip
        with pytest.raises(error):
            loaded.load(REPO, **kwargs)  # type: ignore[arg-type]
    assert loaded.engines.stats().total_misses == 0


def test_load_uses_the_preloaded_copy_and_times_both_ways(loaded: Depot) -> None:
    loaded.load(REPO, "fp16")  # not preloaded: a cold load
    loaded.preloader.preload(REPO)
    assert loaded.preloader.holds(REPO)
    loaded.load(REPO)  # fp32, preloaded
    stats = loaded.preloader.stats()
    assert stats.avg_load_seconds_cold is not None and stats.avg_load_seconds_preloaded is not None
    assert stats.hits == 1  # the load held the preloaded model while the engine read it
    top = {(a.repo_id, a.variant): a.count for a in stats.most_accessed}
    assert top[(REPO, "fp16")] == 1 and top[(REPO, "fp32")] == 1  # (a load without one: the variant loaded)


def test_a_load_beside_a_private_copy_counts_as_cold(loaded: Depot) -> None:
    """With the `read` or `memfd` strategy the engine reads the store's files, not the tier's private copy:
    such loads were counted as preloaded (an explorer's trial: the file read from the disk again)."""
    from modeldepot.preload import Preloader

    for strategy in ("read", "memfd"):
        loaded.engines.clear()
        tier = Preloader(loaded, budget="64MiB", strategy=strategy)
        loaded.use_preloader(tier)
        tier.preload(REPO)
        assert not tier.serves_loads and tier.holds(REPO)
        loaded.load(REPO, warmup=0)
        stats = tier.stats()
        assert stats.avg_load_seconds_preloaded is None and stats.avg_load_seconds_cold is not None, strategy


def test_a_load_holds_the_preload_of_its_variant_or_of_its_whole_revision_however_either_was_named(
    loaded: Depot,
) -> None:
    """A preload of "fp32" and a load without a quant (fp32: the same files), or a preload of the whole revision
    and a load of "fp16": the load held nothing and counted as cold (an explorer's trial)."""
    loaded.preloader.preload(REPO, "fp32")
    loaded.load(REPO, warmup=0)
    assert loaded.preloader.stats().avg_load_seconds_cold is None, "the fp32 preload was held"
    loaded.preloader.evict(REPO, "fp32")
    loaded.preloader.preload(REPO)  # the whole revision
    loaded.load(REPO, "fp16", warmup=0)
    stats = loaded.preloader.stats()
    assert stats.avg_load_seconds_cold is None and stats.avg_load_seconds_preloaded is not None

    async def builder(path: Path) -> None:
        return None

    with pytest.raises(ConfigError, match="coroutine function"):
        loaded.load(REPO, engine=builder)  # type: ignore[arg-type]


def test_callables_with_one_name_get_their_own_engines(depot: Depot, tmp_path: Path) -> None:
    folder = tmp_path / "st"
    folder.mkdir()
    save_file({"w": WEIGHT}, str(folder / "model.safetensors"))
    depot.import_dir(folder, "acme/st")

    def factory(tag: str) -> Callable[[Path], str]:
        def build(path: Path) -> str:
            return f"{tag}:{path.name}"

        return build

    first, second = factory("first"), factory("second")
    assert first.__qualname__ == second.__qualname__  # what the engine cache used to key by
    assert depot.load("acme/st", engine=first) == "first:model.safetensors"
    assert depot.load("acme/st", engine=second) == "second:model.safetensors"
    assert depot.load("acme/st", engine=first) == "first:model.safetensors"  # a hit, its own
    assert depot.engines.stats().total_hits == 1


def _safetensors_repo(depot: Depot, tmp_path: Path, repo_id: str, scale: float = 1.0) -> Path:
    folder = tmp_path / repo_id.replace("/", "-")
    folder.mkdir()
    save_file({"w": WEIGHT * scale, "b": BIAS}, str(folder / "model.safetensors"))
    depot.import_dir(folder, repo_id)
    return depot.store.blobs.path(depot.file_info(repo_id, "model.safetensors").sha256)


def test_a_blob_changed_in_place_is_never_handed_to_an_engine(depot: Depot, tmp_path: Path) -> None:
    """A blob's bytes changed on disk at the same size (a write through a link, or as root) were loaded and
    gave wrong outputs, with no error: a blob written since it was last checked is rehashed before any read
    (one stat otherwise) and quarantined when it no longer matches."""
    from modeldepot.errors import CorruptBlobError

    blob = _safetensors_repo(depot, tmp_path, "acme/st")
    flip_byte(blob, blob.stat().st_size - 1, keep_mtime=False)  # (the weights: the header still parses)
    with pytest.raises(CorruptBlobError, match="changed after it was stored"):
        depot.load("acme/st", engine="safetensors")
    assert not depot.has_file("acme/st", "model.safetensors"), "quarantined"
    for read in (depot.get_file, depot.file_path):
        with pytest.raises(CorruptBlobError):
            read("acme/st", "model.safetensors")


def test_engines_and_preloads_of_a_blob_found_corrupt_are_let_go(depot: Depot, tmp_path: Path) -> None:
    """verify (or the scrub) quarantined a blob, but load() kept answering from the cached engine and the
    RAM tier kept the model: both went on using the bad bytes."""
    blob = _safetensors_repo(depot, tmp_path, "acme/st")
    _safetensors_repo(depot, tmp_path, "acme/other", scale=2.0)
    depot.load("acme/st", engine="safetensors")
    depot.load("acme/other", engine="safetensors")
    depot.preloader.preload("acme/st")
    flip_byte(blob, blob.stat().st_size - 1)  # rot: the bytes change, the mtime does not
    assert not depot.verify().ok
    loaded = depot.engines.keys()  # (a list: the cache is no mapping)
    assert [key[0] for key in loaded] == ["acme/other"]
    assert depot.preloader.stats().preloaded == ()


def test_a_blob_quarantined_lets_go_only_of_the_models_that_map_it(loaded: Depot, tmp_path: Path) -> None:
    """fp32's weights were quarantined: the preload and engine of fp16, whose own files are whole, were
    dropped too (a preload answered 200 and was gone two seconds later, counted as an eviction); so they
    were when another process quarantined it and a node looked for what had left the store."""
    weights = loaded.file_info(REPO, "onnx/model.onnx_data").sha256

    def hold_both() -> None:
        loaded.preloader.preload(REPO, "fp16")
        loaded.preloader.preload(REPO)  # the whole revision: it maps the bad file
        loaded.load(REPO, "fp16", warmup=0)

    hold_both()
    loaded.store.quarantine(weights)  # here (verify, a read): the quarantine's hooks
    assert [m.variant for m in loaded.preloader.stats().preloaded] == ["fp16"]
    assert len(loaded.engines.keys()) == 1 and loaded.preloader.stats().evictions == 0
    loaded.import_dir(write_repo(tmp_path / "again"), REPO)  # whole again
    hold_both()
    with Depot(loaded.home) as other:
        other.store.quarantine(weights)  # in another process: a node's look for what left the store
    loaded._held.let_go_of_removed()
    assert [m.variant for m in loaded.preloader.stats().preloaded] == ["fp16"]
    assert len(loaded.engines.keys()) == 1


def test_a_library_load_lets_go_of_what_another_process_removed(
    loaded: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that loads with the library (no node, whose timer looks every 2 s) handed out its cached
    engine of a repo another process had removed, for ever, and its mapping kept the deleted files' disk
    space (a trial). load() looks too now, every LOOK_EVERY seconds at most."""
    import modeldepot.held

    session = loaded.load(REPO, "fp16", warmup=0)
    with Depot(loaded.home) as other:  # (another process's Depot: nothing of this one's memory)
        other.remove(REPO)
    monkeypatch.setattr(modeldepot.held, "LOOK_EVERY", 0.0)
    loaded._held._next_look = 0.0
    with pytest.raises(OfflineError):  # (the repo is gone, as for any other caller: offline, not found here)
        loaded.load(REPO, "fp16", warmup=0)
    assert loaded.engines.keys() == [] and session is not None


def test_what_an_imported_repo_lacks_is_said_not_a_hub_error(
    loaded: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load() of a variant an imported repo lacks said only "cannot reach https://huggingface.co to scan
    ...": what the store lacks comes first (the variants there are, the engine a file needs), then why the
    pull that could have completed it failed."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # (nothing listens)
    with (
        Depot(loaded.home) as online,
        pytest.raises(
            NotFoundError, match=r"^no variant 'q9' here \(there is: fp16, fp32\); pulling it failed"
        ),
    ):
        online.load(REPO, "q9")
    with pytest.raises(NotFoundError, match=r"^revision 'dev' of .* is not in the store"):
        loaded.load(REPO, revision="dev")  # (offline: the repo is here, not that revision of it)
    with (
        Depot(loaded.home) as online,
        pytest.raises(NotFoundError, match=r"^revision 'dev' .*; pulling it failed"),
    ):
        online.load(REPO, revision="dev")
    with pytest.raises(NotFoundError, match=r"no \.safetensors file") as raised:
        loaded.load(REPO, engine="safetensors")
    assert "engine='onnxruntime'" in str(raised.value)


def test_the_wrong_engine_for_a_variant_held_whole_is_said_at_once(
    loaded: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load(engine="gguf") of an ONNX variant the store holds whole asked an upstream that never answered for
    30 s, then blamed the network: no pull changes what engine its files need."""
    silent = SilentAddress()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", silent.url)
    try:
        with Depot(loaded.home) as online, pytest.raises(NotFoundError) as raised:
            online.load(REPO, "fp16", engine="gguf")
        assert str(raised.value).startswith(
            "no .gguf file in variant 'fp16'; it has .onnx (engine='onnxruntime')"
        )
        assert "pulling" not in str(raised.value) and silent.asked == [], silent.asked
    finally:
        silent.close()


def test_an_import_is_completed_only_by_an_upstream_repo_holding_its_files(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's own model imported under a Hub name (a fine-tune kept under its base's id): load() of a
    variant it lacked pulled the upstream's repo of that name and moved main to it, and the next load() of
    the user's variant returned the upstream's weights (a trial). An import the upstream's repo holds file
    for file (a download's folder, a variant short) is completed, as before; an explicit pull still takes
    the upstream's repo whatever the import holds."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for name, config, completed in (("download", '{"model_type": "linear"}', True),
                                    ("fine-tune", '{"model_type": "mine"}', False)):  # fmt: skip
        mine = write_repo(tmp_path / name)
        (mine / "onnx" / "model.onnx").unlink()
        (mine / "onnx" / "model.onnx_data").unlink()  # fp16 alone: the upstream's has fp32 too
        (mine / "config.json").write_text(config)
        with Depot(tmp_path / f"local-{name}", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as local:
            imported = local.import_dir(mine, REPO).commit_id
            if completed:
                local.load(REPO, "fp32")
                assert local.has_file(REPO, "onnx/model.onnx_data"), "completed from the upstream"
                # ... and the variant imported stays on main (it was left on a detached revision: a README walk)
                assert local.has_file(REPO, "onnx/model_fp16.onnx") and local.file_path(
                    REPO, "onnx/model_fp16.onnx"
                )
                continue
            with pytest.raises(NotFoundError, match=r"no variant 'fp32' here .*; pulling it failed too: "
                               r"acme/linear was imported here, .* another \(config.json differs\)"):  # fmt: skip
                local.load(REPO, "fp32")
            assert local.resolve(REPO) == imported and not local.has_file(REPO, "onnx/model.onnx")
            assert local.load(REPO, "fp16").get_inputs()[0].type == "tensor(float16)"
            local.pull(REPO, "fp32")  # (asked for by name: the upstream's repo takes the import's place)
            assert local.resolve(REPO) != imported and local.load(REPO, "fp32") is not None


def test_uses_are_counted_under_the_variants_own_name(loaded: Depot) -> None:
    """load("FP16") and load("fp16") are one model: counted apart, they split its uses in stats and in
    serve --preload-top."""
    loaded.load(REPO, "fp16", warmup=0)
    loaded.load(REPO, "FP16", warmup=0)
    loaded.store.access.flush()
    assert [(a.variant, a.count) for a in loaded.store.access.top(5)] == [("fp16", 2)]


def test_a_load_without_a_variant_counts_as_a_use_of_the_variant_it_loads(loaded: Depot) -> None:
    # (a use of the whole repo made serve --preload-top preload every variant of it)
    loaded.load(REPO, warmup=0)
    loaded.store.access.flush()
    assert [(a.variant, a.count) for a in loaded.store.access.top(5)] == [("fp32", 1)]


def test_a_repo_of_onnx_exports_beside_its_safetensors_loads_either(loaded: Depot, tmp_path: Path) -> None:
    # (the layout of sentence-transformers' repos on the Hub: fp32 is the ONNX export there)
    folder = write_repo(tmp_path / "mixed")
    save_file({"w": WEIGHT, "b": BIAS}, str(folder / "model.safetensors"))
    loaded.import_dir(folder, "acme/mixed")
    tensors = loaded.load("acme/mixed", engine="safetensors")
    np.testing.assert_array_equal(tensors["w"], WEIGHT)
    assert loaded.load("acme/mixed").get_inputs()[0].type == "tensor(float)"


def test_the_memory_budget_counts_a_model_by_its_files_and_makes_room_before_it_loads(
    loaded: Depot, tmp_path: Path
) -> None:
    # Measured as the process's growth over the load, an ONNX model was charged for onnxruntime's import
    # and a mapped one for next to nothing; and nothing was made room for before the load.
    onnx_bytes = sum(
        (tmp_path / "repo" / "onnx" / name).stat().st_size for name in ("model.onnx", "model.onnx_data")
    )
    loaded.load(REPO, warmup=0)
    assert loaded.engines.stats().total_memory_bytes == onnx_bytes
    _safetensors_repo(loaded, tmp_path, "acme/st")
    st_bytes = loaded.file_info("acme/st", "model.safetensors").size
    loaded.engines.memory_budget = onnx_bytes + st_bytes - 1  # (one model fits, not both)
    loaded.load("acme/st", engine="safetensors")
    stats = loaded.engines.stats()
    assert (stats.cached_models, stats.total_memory_bytes) == (1, st_bytes), "room made before the load"


def test_a_graph_of_an_encoder_decoder_export_is_charged_for_itself_not_its_siblings(
    depot: Depot, tmp_path: Path
) -> None:
    """An encoder-decoder export (Whisper, T5, Florence: several graphs in one variant) was charged every graph
    of the variant for the one it loads: 2.25 times its size, over the whole budget, every other engine
    evicted (an explorer's trial). The graph loaded and its own external data count."""
    folder = tmp_path / "encdec"
    (folder / "onnx").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name, width in (("encoder_model", 300), ("decoder_model", 40), ("decoder_model_merged", 500)):
        weight = rng.standard_normal((4, width)).astype(np.float32)
        onnx.save_model(linear_model(TensorProto.FLOAT, weight, np.zeros(width, np.float32)),
                        str(folder / "onnx" / f"{name}.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{name}.onnx_data", size_threshold=0)  # fmt: skip
    (folder / "config.json").write_text('{"model_type": "encdec"}')
    depot.import_dir(folder, "acme/encdec")
    depot.load("acme/encdec", warmup=0)
    own = sum(
        (folder / "onnx" / name).stat().st_size for name in ("decoder_model.onnx", "decoder_model.onnx_data")
    )
    assert depot.engines.stats().total_memory_bytes == own


def test_a_graph_of_an_encoder_decoder_export_is_loaded_by_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encoder-decoder export (T5, Whisper, Florence: several graphs in one variant): load() could only
    give the variant's first graph, the decoder; the encoder could not be had (an explorer's note). A file
    named is loaded, pulled with its own variant alone; one that is not there, or not of the engine's
    format or of the variant named, is a clear error before any pull or load."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    folder = tmp_path / "encdec"
    (folder / "onnx").mkdir(parents=True)
    widths = {"encoder_model": 48, "decoder_model": 24}
    for name, width in widths.items():
        weight = rng.standard_normal((4, width)).astype(np.float32)
        bias = np.zeros(width, np.float32)
        onnx.save_model(linear_model(TensorProto.FLOAT, weight, bias), str(folder / "onnx" / f"{name}.onnx"),
                        save_as_external_data=True, all_tensors_to_one_file=True, location=f"{name}.onnx_data",
                        size_threshold=0)  # fmt: skip
        onnx.save_model(linear_model(TensorProto.FLOAT16, weight.astype(np.float16), bias.astype(np.float16)),
                        str(folder / "onnx" / f"{name}_fp16.onnx"))  # fmt: skip
    (folder / "config.json").write_text('{"model_type": "encdec"}')
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        node_depot.import_dir(folder, "acme/encdec")
        node = LiveNode(node_depot)
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[node.url]) as local:
                encoder = local.load("acme/encdec", file="onnx/encoder_model_fp16.onnx", warmup=0)
                assert encoder.get_outputs()[0].shape == ["batch", widths["encoder_model"]]
                assert encoder.get_inputs()[0].type == "tensor(float16)"
                assert local.has_file("acme/encdec", "onnx/decoder_model_fp16.onnx")
                assert not local.has_file("acme/encdec", "onnx/encoder_model.onnx_data"), "its variant alone"
                decoder = local.load("acme/encdec", "fp16", file="onnx/decoder_model_fp16.onnx", warmup=0)
                assert decoder.get_outputs()[0].shape == ["batch", widths["decoder_model"]]
                assert local.load("acme/encdec", file="onnx/encoder_model_fp16.onnx") is encoder
                fp32 = local.load("acme/encdec", file="onnx/encoder_model.onnx", warmup=0)  # (pulled now)
                assert (
                    fp32.get_inputs()[0].type == "tensor(float)" and local.engines.stats().cached_models == 3
                )
                misses = local.engines.stats().total_misses
                for kwargs, error, said in (
                    (
                        {"file": "onnx/encoder.onnx"},
                        NotFoundError,
                        "no file 'onnx/encoder.onnx' here .*encoder_model",
                    ),
                    ({"file": "config.json"}, InvalidInputError, "not a .onnx file"),
                    (
                        {"file": "onnx/encoder_model.onnx", "engine": "safetensors"},
                        InvalidInputError,
                        "safetensors",
                    ),
                    (
                        {"file": "onnx/encoder_model.onnx", "quant": "fp16"},
                        NotFoundError,
                        "not a file of the variant",
                    ),
                    ({"file": "../onnx/encoder_model.onnx"}, ValueError, "leave the repo"),
                    ({"file": 5}, ValueError, "must be a string"),
                ):
                    with pytest.raises(error, match=said):
                        local.load("acme/encdec", **kwargs)  # type: ignore[arg-type]
                assert local.engines.stats().total_misses == misses, "nothing loaded for a bad file"
        finally:
            node.stop()


def test_a_file_of_no_variant_is_pulled_with_the_shared_files_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load(file=...) of a file in no variant (a custom engine's weights.pt) pulled the whole repo, every
    quant (a review)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    files = {"onnx/model.onnx": os.urandom(SMALL_CHUNK), "onnx/model_q4.onnx": os.urandom(SMALL_CHUNK),
             "onnx/model_fp16.onnx": os.urandom(SMALL_CHUNK), "weights.pt": b"w" * 100, "config.json": b"{}"}  # fmt: skip

    def engine(path: Path) -> bytes:
        return Path(path).read_bytes()

    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        node_depot.import_dir(write_model_dir(tmp_path / "m", files), "acme/m")
        node = LiveNode(node_depot)
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[node.url]) as local:
                assert local.load("acme/m", file="weights.pt", engine=engine, warmup=0) == b"w" * 100
                assert sorted(f.path for f in local.list_files("acme/m")) == ["config.json", "weights.pt"]
        finally:
            node.stop()


def test_a_variant_held_in_part_is_pulled_whole_or_named_as_lacking(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store held a variant's model file without its external data (a cache adopted from an
    allow_patterns download, a pull that got part of it): load() handed onnxruntime the model, which failed
    with "External data path does not exist". The commit's listing says what the variant needs."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as local:
        local.download_file(REPO, "onnx/model.onnx")  # the model file alone
        assert not local.has_file(REPO, "onnx/model.onnx_data")
        offline = Depot(tmp_path / "local")
        offline.config = dataclasses.replace(offline.config, offline=True)
        # (and that nothing was pulled for it: "no variant here" read as a repo without it, an explorer's trial)
        with (
            offline,
            pytest.raises(NotFoundError, match=r"in part: it lacks onnx/model.onnx_data; offline \("),
        ):
            offline.load(REPO, "fp32")
        local.download_file(REPO, "onnx/model_fp16.onnx")
        # Without a variant named, the default's lack is said, and the variant a load could take (an offline
        # worker baked with one quant was told only what fp32 lacked)
        offline = Depot(tmp_path / "local")
        offline.config = dataclasses.replace(offline.config, offline=True)
        with (
            offline,
            pytest.raises(NotFoundError, match=r"lacks onnx/model.onnx_data; it holds the variants fp16"),
        ):
            offline.load(REPO)
        session = local.load(REPO, "fp32")  # online: the rest is pulled first
        assert local.has_file(REPO, "onnx/model.onnx_data")
        (out,) = session.run(None, {"x": np.ones((1, 4), dtype=np.float32)})
        np.testing.assert_allclose(out, np.ones((1, 4), dtype=np.float32) @ WEIGHT + BIAS, rtol=1e-5)


def test_a_model_removed_while_it_loads_is_a_clear_error(loaded: Depot) -> None:
    """A load racing an `rm` (here or in another process) failed with the engine's own error about a
    missing file (onnxruntime's NoSuchFile, a bare FileNotFoundError). (A loader given the snapshot's path:
    one of an ONNX folder with external data gets hard links, which the removal leaves it.)"""

    def engine_that_meets_an_rm(path: Path) -> bytes:
        loaded.remove(REPO)  # between the look at the store and the engine's open of the file
        return Path(path).read_bytes()

    with pytest.raises(NotFoundError, match="was removed from the store while it was being loaded"):
        loaded.load(REPO, engine=engine_that_meets_an_rm, warmup=0, file="config.json")


def test_a_model_removed_as_its_load_resolves_it_is_said_removed(
    loaded: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `rm` between the load's resolve of the revision and its look at the files: the load said the repo
    had no .onnx file (a trial), as if it held some other model."""
    resolve = loaded.store.resolve

    def resolve_then_meet_an_rm(repo_id: str, revision: str = "main") -> str:
        commit_id = resolve(repo_id, revision)
        loaded.remove(REPO)
        return commit_id

    monkeypatch.setattr(loaded.store, "resolve", resolve_then_meet_an_rm)
    with pytest.raises(NotFoundError, match="was removed from the store while it was being loaded") as raised:
        loaded.load(REPO, "fp16", warmup=0)
    assert "no .onnx" not in str(raised.value)


def test_a_model_removed_and_imported_again_as_its_files_are_linked_is_said_removed(
    loaded: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `rm` as the load linked the model's files, and the same files imported again before the engine
    opened them: a raw FileNotFoundError naming a private tmp/…/view/ path (an explorer's stress run)."""
    import contextlib

    linked_folder = loaded.store.linked_folder

    @contextlib.contextmanager
    def meeting_an_rm_and_an_import(*args: Any, **kwargs: Any) -> Iterator[Path]:
        loaded.remove(REPO)
        with linked_folder(*args, **kwargs) as view:
            loaded.import_dir(write_repo(tmp_path / "again"), REPO)
            yield view

    monkeypatch.setattr(loaded.store, "linked_folder", meeting_an_rm_and_an_import)
    with pytest.raises(NotFoundError, match="removed from the store meanwhile"):
        loaded.load(REPO, "fp16", warmup=0)


def test_an_engine_held_past_its_depot_is_not_closed_with_it(tmp_path: Path) -> None:
    """A closed depot lets go of the engines it loaded (they map its files) without closing one a caller
    still holds (a llama-cpp `Llama` has a close())."""

    class Engine:
        closed = False

        def __init__(self, path: Path) -> None:
            self.path = path

        def close(self) -> None:
            self.closed = True

    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_repo(tmp_path / "repo"), REPO)
        engine = depot.load(REPO, quant="fp16", engine=Engine)
        assert depot.load(REPO, quant="fp16", engine=Engine) is engine
    assert isinstance(engine, Engine) and not engine.closed
    assert engine.path.name == "model_fp16.onnx"


def test_a_wrong_engine_is_said_once_and_without_the_network_for_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default engine (onnxruntime) on a pulled safetensors repo: the store's answer ("no .onnx file; it
    has .safetensors") and then a pull, which said the same again ("pulling it failed too: ..."). For a
    commit id whose listing lacks such a file too, no pull is made (it only asked the network); a branch is
    pulled again (it may have moved on upstream), and the answer is said once."""
    from conftest import serving_repo

    weights = tmp_path / "w.safetensors"
    save_file({"w": np.ones((4, 4), dtype=np.float32)}, str(weights))
    said = "no .onnx file; it has .safetensors (engine='safetensors')"
    files = {"model.safetensors": weights.read_bytes(), "config.json": b"{}"}
    with serving_repo(tmp_path, files, "acme/st") as up:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", up.url)
        with Depot(tmp_path / "local") as depot:
            commit = depot.pull("acme/st").commit_id
            with pytest.raises(NotFoundError) as once:
                depot.load("acme/st")
            assert str(once.value) == said
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # nothing answers from here on
    with Depot(tmp_path / "local") as depot:
        with pytest.raises(NotFoundError) as at_commit:
            depot.load("acme/st", revision=commit)
        assert str(at_commit.value) == said
        assert depot.load("acme/st", engine="safetensors")["w"].shape == (4, 4)


def test_a_load_links_no_other_variants_files_and_one_killed_midway_holds_no_space_from_rm(
    loaded: Depot,
) -> None:
    """A load's view of the model's folder linked every variant's files, and a load killed midway left those
    links in tmp/: `rm` of the repo then said "0 B freed; … more stay on disk, linked from elsewhere too (a
    Hugging Face cache …)", of a store that had none (an explorer's 1.5 GiB model). Now the view holds the
    loaded variant's files alone, and a removal sweeps what dead loads left first."""
    import signal
    import subprocess
    import sys

    child = (
        "import os, signal, sys\n"
        "from modeldepot import Depot\n"
        "from modeldepot.hub.variants import files_of_other_variants\n"
        f"depot = Depot({str(loaded.home)!r})\n"
        f"commit = depot.resolve({REPO!r})\n"
        "paths = [e.path for e in depot.list_files(" + repr(REPO) + ")]\n"
        "others = files_of_other_variants('onnx/model_fp16.onnx', paths)\n"
        f"with depot.store.linked_folder({REPO!r}, commit, 'onnx', others) as view:\n"
        "    print(sorted(p.name for p in view.iterdir()), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.strip() == "['model_fp16.onnx']"
    assert any(loaded.store.layout.tmp.iterdir())  # (what the killed load left)
    total = sum(e.size for e in loaded.list_files(REPO))
    result = loaded.remove(REPO)
    assert (result.bytes_freed, result.bytes_still_linked) == (total, 0)
    assert not any(loaded.store.layout.tmp.iterdir())


def test_a_session_starting_in_another_pid_namespace_is_not_swept_by_a_removal(loaded: Depot) -> None:
    """A removal sweeps what dead writers left in tmp/ (above); a session still under its dot-name whose pid
    no kill here can see (a writer in another container sharing the store, between its mkdir and its rename)
    was taken for dead and removed, and that writer's start failed. Young or locked, it stays; old and
    unlocked, with no such process, it goes."""
    import fcntl

    tmp = loaded.store.layout.tmp
    tmp.mkdir(exist_ok=True)
    starting = tmp / ".999999999-0123456789abcdef"  # (no such pid here)
    starting.mkdir()
    locked = tmp / ".999999998-0123456789abcdef"
    locked.mkdir()
    lock_fd = os.open(locked / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    old = os.stat(starting).st_mtime - 3600
    os.utime(locked, (old, old))
    loaded.remove(REPO, quant="fp16")
    assert starting.is_dir() and locked.is_dir()
    os.utime(starting, (old, old))
    loaded.remove(REPO)
    assert not starting.exists() and locked.is_dir()
    os.close(lock_fd)


def test_rm_says_what_another_process_still_maps_stays_on_disk(depot: Depot, tmp_path: Path) -> None:
    """An idle worker that loaded a model keeps its files' disk space after an `rm` until it lets go: `rm`
    said "192.0 MiB freed" while `df` got nothing back (an explorer's trial). It says which processes hold
    what, and counts only the rest as freed."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from modeldepot.cli import cli

    folder = tmp_path / "st"
    folder.mkdir()
    save_file({"w": np.arange(65536, dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    depot.import_dir(folder, "acme/st")
    (folder / "config.json").write_text('{"other": 1}')
    depot.import_dir(folder, "acme/st2", "dev")  # (its config loaded by nobody)
    weights = depot.file_info("acme/st", "model.safetensors").size
    worker = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom modeldepot import Depot\n"
         f"model = Depot({str(depot.home)!r}).load('acme/st', engine='safetensors')\n"
         "print('loaded', flush=True)\nsys.stdin.read()\n"],  # (idle until told)
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "loaded"
        result = depot.remove("acme/st2")  # (its own config alone goes: nobody holds it)
        assert (result.bytes_freed, result.bytes_still_held, result.held_by) == (12, 0, ()), result
        removed = CliRunner().invoke(cli, ["rm", "acme/st", "--yes", "--home", str(depot.home)])
        assert removed.exit_code == 0, removed.output
        said = " ".join(removed.stdout.split())
        assert (
            f"2 B freed; {format_size(weights)} more stay on disk while process {worker.pid} (-c import"
            in said
        )
        assert "still maps or holds them open" in said, (
            said
        )  # (named by what it runs: the worker's -c program)
        # `du` just after says so too (it said nothing, and `df` disagreed: an explorer's trial)
        usage = depot.du()
        assert (usage.removed_held_bytes, usage.removed_held_by) == (weights, (worker.pid,)), usage
        shown = CliRunner().invoke(cli, ["du", "--home", str(depot.home)])
        said = " ".join(shown.stdout.split())
        assert (
            f"removed {format_size(weights)} more, of files removed from the store, stay on disk while process {worker.pid}"
            in said
        ), said
    finally:
        worker.communicate("", timeout=60)
    assert depot.du().removed_held_bytes == 0  # (let go of: freed)


def test_du_counts_no_removed_link_whose_file_stays(tmp_path: Path) -> None:
    """A blob of an `import --link` is the user's file too: removed from the store while a process maps it,
    its bytes stay for good, and `du` said they came back once the process let go (a review). Only files no
    name holds count."""
    import mmap

    source = tmp_path / "src"
    source.mkdir()
    (source / "w.bin").write_bytes(os.urandom(4 << 20))
    with Depot(tmp_path / "home") as depot:
        depot.import_dir(source, "acme/linked", link=True)
        blob = depot.store.blobs.path(depot.list_files("acme/linked")[0].sha256)
        assert os.stat(blob).st_ino == os.stat(source / "w.bin").st_ino  # (the user's file, linked)
        with open(blob, "rb") as held:
            mapping = mmap.mmap(held.fileno(), 0, prot=mmap.PROT_READ)
        try:
            depot.remove("acme/linked")
            assert not blob.exists() and (source / "w.bin").exists()
            assert depot.du().removed_held_bytes == 0
        finally:
            mapping.close()


def format_size(size: int) -> str:
    from modeldepot.cli.render import format_bytes

    return format_bytes(size)


def test_a_variant_the_repo_lacks_is_a_variant_not_found_error_wherever_it_is_asked(loaded: Depot) -> None:
    """`except VariantNotFoundError` missed most of them: a pin, a removal, a preload of a variant the repo
    lacks raised a plain NotFoundError (a load, the subclass; an explorer's trial)."""
    from modeldepot.errors import VariantNotFoundError

    for ask in (
        lambda: loaded.pin(REPO, quant="q9"),
        lambda: loaded.remove(REPO, quant="q9"),
        lambda: loaded.preloader.preload(REPO, "q9"),
        lambda: loaded.get_manifest(REPO).variant("q9"),
        lambda: loaded.load(REPO, "q9"),
    ):
        with pytest.raises(VariantNotFoundError, match="q9"):
            ask()


def test_a_left_behind_onnx_model_held_without_its_external_data_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offline load (and `path -q`) of a variant the branch's new commit lacks takes it from the revision
    the branch left behind, whole; without that revision's listing (an import), an ONNX model held without
    the external data the branch's commit has beside it was taken, and onnxruntime failed raw (a review).
    It is not: the variant is to be pulled."""
    from click.testing import CliRunner

    from modeldepot.cli import cli

    full = {
        "config.json": b"{}",
        "onnx/model_q4.onnx": b"q4-graph",
        "onnx/model_q4.onnx_data": b"q4-weights" * 100,
        "onnx/model_fp16.onnx": b"fp16-graph",
    }
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as node_depot:
        node_depot.import_dir(write_model_dir(tmp_path / "full", full), REPO)
        node = LiveNode(node_depot)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
        try:
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[node.url]) as local:
                part = {p: full[p] for p in ("config.json", "onnx/model_q4.onnx")}  # (without its data)
                local.import_dir(write_model_dir(tmp_path / "part", part), REPO)
                old = local.resolve(REPO)
                local.pull(REPO, "fp16")  # (main moves to the upstream's commit, which has q4 whole)
                assert local.resolve(REPO) != old
        finally:
            node.stop()
    said = CliRunner().invoke(cli, ["path", REPO, "-q", "q4", "--home", str(tmp_path / "local")])
    assert said.exit_code != 0 and old not in said.stdout, said.output
