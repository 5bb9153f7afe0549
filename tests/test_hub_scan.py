"""Scanning upstream repos: variant detection on real layouts, manifests, statuses, errors, offline mode."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SMALL_CHUNK, LiveNode, write_model_dir
from liar import REPO as LIAR_REPO
from liar import Liar
from modeldepot import Depot, NotFoundError
from modeldepot.cli import cli
from modeldepot.errors import (
    AccessDeniedError,
    OfflineError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UpstreamDataError,
    UpstreamError,
)
from modeldepot.hub.variants import gguf_quant, group_files
from modeldepot.server.control_routes import QUANT
from modeldepot.validation import validate_quant

ONNX_COMMUNITY = [  # onnx-community/Phi-3.5-mini-instruct-onnx-web style, with external data
    ".gitattributes", "README.md", "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "onnx/model.onnx", "onnx/model.onnx_data",
    "onnx/model_fp16.onnx", "onnx/model_fp16.onnx_data", "onnx/model_q4f16.onnx", "onnx/model_q4f16.onnx_data",
    "onnx/model_q4f16.onnx_data_1", "onnx/model_quantized.onnx", "onnx/model_q4.onnx", "onnx/model_bnb4.onnx",
    "onnx/decoder_model_merged_int8.onnx", "onnx/encoder_model_int8.onnx",
]  # fmt: skip
GGUF_REPO = [  # bartowski / unsloth style, with a split quant and a multimodal projector
    "README.md", "Qwen3-8B-Q4_K_M.gguf", "Qwen3-8B-Q8_0.gguf", "Qwen3-8B-IQ2_XXS.gguf", "Qwen3-8B-bf16.gguf",
    "UD-Q4_K_XL/Qwen3-8B-UD-Q4_K_XL-00001-of-00002.gguf", "UD-Q4_K_XL/Qwen3-8B-UD-Q4_K_XL-00002-of-00002.gguf",
    "mmproj-Qwen3-8B-F16.gguf", "params", "template",
]  # fmt: skip
SAFETENSORS_REPO = [  # transformers shards plus a diffusers-style fp16 component
    "config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "merges.txt",
    "vocab.json", "chat_template.jinja", "unet/diffusion_pytorch_model.fp16.safetensors", "unet/config.json",
    "scheduler/scheduler_config.json",
]  # fmt: skip


def test_onnx_dtypes_with_their_external_data() -> None:
    grouping = group_files(ONNX_COMMUNITY)
    variants = {v.name: v.files for v in grouping.variants}
    assert set(variants) == {"fp32", "fp16", "q4f16", "q8", "q4", "bnb4", "int8"}
    assert variants["q4f16"] == (
        "onnx/model_q4f16.onnx",
        "onnx/model_q4f16.onnx_data",
        "onnx/model_q4f16.onnx_data_1",
    )
    assert variants["fp32"] == ("onnx/model.onnx", "onnx/model.onnx_data")
    assert variants["int8"] == ("onnx/decoder_model_merged_int8.onnx", "onnx/encoder_model_int8.onnx")
    assert set(grouping.shared) == {"config.json", "generation_config.json", "tokenizer.json",
                                    "tokenizer_config.json", "special_tokens_map.json"}  # fmt: skip
    assert grouping.other == (".gitattributes", "README.md")
    genai = group_files(["model.onnx", "model.onnx.data", "genai_config.json"])
    assert genai.variants[0].files == ("model.onnx", "model.onnx.data") and genai.shared == (
        "genai_config.json",
    )
    # A file per tensor (torch.onnx.export over 2 GB) beside the one model of its folder is its data; not
    # where the folder holds several models (whose is it?), nor at the root (anything is there)
    export = group_files(["config.json", "onnx/model.onnx", "onnx/onnx__MatMul_1", "onnx/layers.0.weight",
                          "onnx/README.md", "model.onnx", "weights.bin"])  # fmt: skip
    by_name = {v.name: v.files for v in export.variants}
    assert by_name == {
        "fp32": ("model.onnx", "onnx/layers.0.weight", "onnx/model.onnx", "onnx/onnx__MatMul_1")
    }, by_name
    assert export.other == ("onnx/README.md", "weights.bin")


def test_each_gguf_model_takes_one_projector_and_the_others_are_variants_of_their_own() -> None:
    """Every projector went with every quant: a vision repo's Q4_K_M pull (unsloth/gemma-3-4b-it-GGUF: F16, BF16
    and F32 projectors) moved 5.9 GB for 3.3 (an explorer's trial). Each model takes the projector of its
    quant, else F16, BF16, F32, of its own folder first; one no model takes is pulled by its own name."""
    grouping = group_files([
        "gemma-3-4b-it-Q4_K_M.gguf", "gemma-3-4b-it-Q8_0.gguf", "gemma-3-4b-it-BF16.gguf",
        "mmproj-F16.gguf", "mmproj-BF16.gguf", "mmproj-F32.gguf", "config.json",
        "other/m-Q4_0.gguf", "other/mmproj-m-Q8_0.gguf",
    ])  # fmt: skip
    variants = {v.name: set(v.files) for v in grouping.variants}
    assert variants == {
        "Q4_K_M": {"gemma-3-4b-it-Q4_K_M.gguf", "mmproj-F16.gguf"},
        "Q8_0": {"gemma-3-4b-it-Q8_0.gguf", "mmproj-F16.gguf"},
        "BF16": {"gemma-3-4b-it-BF16.gguf", "mmproj-BF16.gguf"},
        "Q4_0": {"other/m-Q4_0.gguf", "other/mmproj-m-Q8_0.gguf"},
        "mmproj-F32": {"mmproj-F32.gguf"},
    }
    assert grouping.shared == ("config.json",)
    qwen = group_files(
        ["q-q4_k_m.gguf", "mmproj-q-bf16.gguf", "mmproj-q-fp16.gguf"]
    )  # (FP16 is F16: a review)
    assert {v.name: set(v.files) for v in qwen.variants} == {
        "Q4_K_M": {"q-q4_k_m.gguf", "mmproj-q-fp16.gguf"}, "mmproj-q-bf16": {"mmproj-q-bf16.gguf"}}  # fmt: skip


def test_qwens_fp16_spelling_is_a_quant_label() -> None:
    """Qwen/Qwen2.5-*-Instruct-GGUF name their half-precision file `…-fp16.gguf`: its variant was named after the
    whole file, and neither -q fp16 nor -q F16 found it (an explorer's trial)."""
    grouping = group_files(["qwen2.5-0.5b-instruct-fp16.gguf", "qwen2.5-0.5b-instruct-q4_k_m.gguf"])
    assert [v.name for v in grouping.variants] == ["FP16", "Q4_K_M"]
    assert grouping.find("fp16") is not None


def test_gguf_quants_splits_and_projectors() -> None:
    grouping = group_files(GGUF_REPO)
    variants = {v.name: v.files for v in grouping.variants}
    assert set(variants) == {"Q4_K_M", "Q8_0", "IQ2_XXS", "BF16", "UD-Q4_K_XL"}
    assert variants["UD-Q4_K_XL"] == (
        "UD-Q4_K_XL/Qwen3-8B-UD-Q4_K_XL-00001-of-00002.gguf",
        "UD-Q4_K_XL/Qwen3-8B-UD-Q4_K_XL-00002-of-00002.gguf",
        "mmproj-Qwen3-8B-F16.gguf",
    )
    assert all("mmproj-Qwen3-8B-F16.gguf" in files for files in variants.values())  # a companion of each
    assert set(grouping.other) == {"README.md", "params", "template"}


@pytest.mark.parametrize(
    ("name", "label"),
    [("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Q4_K_M"), ("model-IQ4_XS.gguf", "IQ4_XS"), ("x.Q8_0.gguf", "Q8_0"),
     ("phi-4-F16.gguf", "F16"), ("phi-4-BF16.gguf", "BF16"), ("gpt-oss-20b-MXFP4.gguf", "MXFP4"),
     ("Q4_0-but-really-Q5_K_S.gguf", "Q5_K_S"), ("DeepSeek-UD-IQ1_M.gguf", "UD-IQ1_M"), ("tinyllama.gguf", None)],
)  # fmt: skip
def test_gguf_labels_follow_huggingface_js(name: str, label: str | None) -> None:
    assert gguf_quant(name) == label


def test_every_gguf_model_is_a_variant_of_its_own() -> None:
    """An explorer's trial: ARM repacks (Q4_0_4_4 beside Q4_0) and split models named by their folder alone
    were each one variant (a pull took them all, a load either), and an importance matrix was a variant, the
    model a load without a quant took. A name is the file's own (a review: one named after the others beside
    it was another name in a store holding it alone), so two models of one label stay one variant."""
    grouping = group_files([
        "L-Q4_0.gguf", "L-Q4_0_4_4.gguf", "L-Q4_0_8_8.gguf", "L-IQ4_NL_4_4.gguf",
        "Q4_K_M/model-00001-of-00002.gguf", "Q4_K_M/model-00002-of-00002.gguf",
        "Q8_0/model-00001-of-00002.gguf", "Q8_0/model-00002-of-00002.gguf",
        "X-Q5_K_M.gguf", "X-Instruct-Q5_K_M.gguf", "a/Y-Q6_K.gguf", "b/Y-Q6_K.gguf",
        "imatrix.gguf", "X.imatrix.gguf", "m-Q3_K_M-imatrix.gguf", "mmproj-F16.gguf",
    ])  # fmt: skip
    variants = {v.name: set(v.files) - {"mmproj-F16.gguf"} for v in grouping.variants}
    assert variants == {
        "Q4_0": {"L-Q4_0.gguf"}, "Q4_0_4_4": {"L-Q4_0_4_4.gguf"}, "Q4_0_8_8": {"L-Q4_0_8_8.gguf"},
        "IQ4_NL_4_4": {"L-IQ4_NL_4_4.gguf"},
        "Q4_K_M": {"Q4_K_M/model-00001-of-00002.gguf", "Q4_K_M/model-00002-of-00002.gguf"},
        "Q8_0": {"Q8_0/model-00001-of-00002.gguf", "Q8_0/model-00002-of-00002.gguf"},
        "Q5_K_M": {"X-Q5_K_M.gguf", "X-Instruct-Q5_K_M.gguf"}, "Q6_K": {"a/Y-Q6_K.gguf", "b/Y-Q6_K.gguf"},
        "Q3_K_M": {"m-Q3_K_M-imatrix.gguf"},  # (a quant made with an importance matrix is a model)
    }  # fmt: skip
    assert set(grouping.other) == {"imatrix.gguf", "X.imatrix.gguf"}  # pulled with the whole repo alone
    for paths in (["X-Q5_K_M.gguf"], ["X-Instruct-Q5_K_M.gguf"], ["Q8_0/model-00002-of-00002.gguf"]):
        # the name a variant has in the whole listing, it has in a store holding it alone
        whole = next(v.name for v in grouping.variants if paths[0] in v.files)
        assert [v.name for v in group_files(paths).variants] == [whole]
    # Names a user can type after -q and the control API takes, whatever the files are called
    odd = group_files(["My Model v2.gguf", "A" * 120 + ".gguf", "B" * 120 + ".gguf"]).variants
    assert len(odd) == 3 and "My-Model-v2" in {v.name for v in odd}
    for name in [*variants, *(v.name for v in odd)]:
        assert validate_quant(name) == name and QUANT.fullmatch(name), name


def test_safetensors_shards_index_and_dtype_variants() -> None:
    grouping = group_files(SAFETENSORS_REPO)
    variants = {v.name: v.files for v in grouping.variants}
    assert variants["safetensors"] == (
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json")  # fmt: skip
    assert variants["fp16"] == ("unet/diffusion_pytorch_model.fp16.safetensors",)
    assert {"merges.txt", "vocab.json", "chat_template.jinja", "unet/config.json"} <= set(grouping.shared)
    assert "scheduler/scheduler_config.json" in grouping.shared and grouping.other == ("pytorch_model.bin",)
    mixed = group_files(["onnx/model_fp16.onnx", "model.fp16.safetensors"])
    assert {v.name for v in mixed.variants} == {"onnx-fp16", "safetensors-fp16"}  # names stay unique


GITATTRIBUTES = b"".join(
    b"%s filter=lfs diff=lfs merge=lfs -text\n" % pattern
    for pattern in (b"*.onnx", b"*.onnx_data*", b"*.gguf")
)


def layout_files(paths: list[str]) -> dict[str, bytes]:
    files = {p: (f"{p}\n".encode() * 50) if not p.endswith(".json") else b'{"x": 1}' for p in paths}
    if ".gitattributes" in files:
        files[".gitattributes"] = GITATTRIBUTES
    return files


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LiveNode]:
    """A node that plays the Hub: it holds the repos the tests scan."""
    with Depot(tmp_path / "upstream-store") as hub:
        hub.import_dir(
            write_model_dir(tmp_path / "onnx", layout_files(ONNX_COMMUNITY)), "onnx-community/tiny"
        )
        hub.import_dir(write_model_dir(tmp_path / "gguf", layout_files(GGUF_REPO)), "acme/tiny-gguf")
        hub.import_dir(
            write_model_dir(tmp_path / "secret", {"config.json": b"{}"}), "acme/secret", private=True
        )
        node = LiveNode(hub)
        yield node
        node.stop()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, upstream: LiveNode) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", upstream.url)


@pytest.mark.usefixtures("online")
def test_scan_builds_and_keeps_a_manifest(upstream: LiveNode, tmp_path: Path) -> None:
    with Depot(tmp_path / "local") as depot:
        manifest = depot.scan_repo("onnx-community/tiny")
        assert (
            manifest.commit_id == upstream.depot.resolve("onnx-community/tiny")
            and manifest.endpoint == upstream.url
        )
        files = {f.path: f for f in manifest.files}
        model = files["onnx/model_q4f16.onnx"]
        assert model.size == len(layout_files(ONNX_COMMUNITY)["onnx/model_q4f16.onnx"])
        assert (
            model.sha256 == hashlib.sha256(layout_files(ONNX_COMMUNITY)["onnx/model_q4f16.onnx"]).hexdigest()
        )
        assert files["config.json"].sha256 is None and files["config.json"].git_oid  # a plain git file
        q4f16 = manifest.variant("Q4F16")  # names match case-insensitively
        assert q4f16.status == "available" and q4f16.bytes_done == 0
        needed = {f.path for f in manifest.files_of("q4f16")}
        assert needed == {*q4f16.files, *manifest.shared}
        assert q4f16.total_bytes == sum(files[p].size for p in needed)
        with pytest.raises(NotFoundError, match="has no variant 'q3'"):
            manifest.variant("q3")
    with Depot(tmp_path / "local") as reopened:  # statuses and manifests survive a restart
        assert reopened.get_manifest("onnx-community/tiny") == manifest


@pytest.mark.usefixtures("online")
def test_a_store_that_holds_the_commit_sees_its_variants_as_downloaded(tmp_path: Path) -> None:
    with Depot(tmp_path / "local") as depot:
        depot.import_dir(write_model_dir(tmp_path / "same", layout_files(GGUF_REPO)), "acme/tiny-gguf")
        manifest = depot.scan_repo("acme/tiny-gguf")  # same files, same commit id, on both nodes
        assert {v.status for v in manifest.variants} == {"downloaded"}


@pytest.mark.usefixtures("online")
def test_scan_errors_name_the_repo_and_the_fix(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Depot(tmp_path / "local") as depot:
        with pytest.raises(NotFoundError, match=r"acme/absent was not found on .*HF_TOKEN") as absent:
            depot.scan_repo("acme/absent")
        assert (absent.value.repo_id, absent.value.source, absent.value.status) == (
            "acme/absent",
            upstream.url,
            404,
        )
        with pytest.raises(NotFoundError, match=r"revision 'nope'"):
            depot.scan_repo("acme/tiny-gguf", "nope")
        with pytest.raises(NotFoundError, match="private"):  # the node hides private repos without its token
            depot.scan_repo("acme/secret")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        with (
            Depot(tmp_path / "local") as depot,
            pytest.raises(UpstreamError, match="cannot reach") as unreachable,
        ):
            depot.scan_repo("acme/tiny-gguf")
        assert unreachable.value.repo_id == "acme/tiny-gguf" and unreachable.value.status is None


HUB_REFUSALS = [  # what the Hub answers (hf-protocol.md), and what a scan must make of it
    (401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"",
     RepoNotFoundError, r"acme/model was not found on .*set HF_TOKEN to a token that can read it"),
    (401, {"X-Error-Message": "Invalid username or password."}, b"",  # (from https, "not found": HfApi's rule)
     AccessDeniedError, r"refused access to acme/model \(401\): check HF_TOKEN"),
    (401, {"X-Error-Message": "Invalid credentials in Authorization header"}, b"",
     AccessDeniedError, r"refused access to acme/model \(401\): check HF_TOKEN"),
    (403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model acme/model is restricted."}, b"",
     AccessDeniedError, r"acme/model is gated on .*accept its conditions there"),
    (404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id: v9"}, b"",
     RevisionNotFoundError, r"revision 'v9' of acme/model does not exist"),
    (403, {"X-Error-Message": "Access to this resource is disabled."}, b"",
     AccessDeniedError, r"refused access to acme/model \(403\)"),
    (500, {"Content-Type": "application/json"}, b'{"error": "Internal Error - We\'re working hard to fix this"}',
     UpstreamError, r"failed to describe acme/model: HTTP 500 \(Internal Error - We're working"),
    (200, {"Content-Type": "application/json"}, b"<html>maintenance</html>",
     UpstreamDataError, r"describing acme/model.*not JSON"),
    (200, {"Content-Type": "application/json"}, b"[" * 100_000,
     UpstreamDataError, r"describing acme/model.*nests too deep"),
    (200, {"Content-Type": "application/json"}, b"[" + b"{}," * 1_000_001 + b"{}]",
     UpstreamDataError, r"describing acme/model.*more than 1000000 JSON objects"),
    (500, {"Content-Type": "application/json"}, b"[" * 100_000,
     UpstreamError, r"failed to describe acme/model: HTTP 500$"),
    (302, {"Location": "http://[::1/x"}, b"",
     UpstreamError, r"cannot reach .* to scan acme/model"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "headers", "body", "kind", "says"), HUB_REFUSALS,
                         ids=["RepoNotFound", "401", "bad-token", "GatedRepo", "RevisionNotFound", "disabled",
                              "500", "not-json", "too-deep", "too-many", "500-too-deep", "bad-redirect"])  # fmt: skip
def test_the_hubs_refusals_become_errors_naming_the_repo_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, headers: dict[str, str], body: bytes,
    kind: type[Exception], says: str,
) -> None:  # fmt: skip
    liar = Liar()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", liar.url)
    liar.refusal = (status, headers, body)
    try:
        with Depot(tmp_path / "local") as depot, pytest.raises(kind, match=says) as caught:
            depot.scan_repo(LIAR_REPO, "v9")
    finally:
        liar.stop()
    assert type(caught.value) is kind
    assert LIAR_REPO in str(caught.value)
    if kind is not UpstreamDataError:  # (that one names the upstream and the field it lied in)
        answered = None if status == 302 else status  # (a redirect that leads nowhere is no answer)
        assert (caught.value.repo_id, caught.value.status) == (LIAR_REPO, answered)  # type: ignore[attr-defined]


def test_a_renamed_repo_is_followed_and_the_token_never_leaves_its_origin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub answers a renamed repo with a redirect to its new name: followed, with the token on the same
    origin, without it to another one."""
    hub, elsewhere = Liar(), Liar()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    renamed = f"/api/models/{LIAR_REPO}-renamed/revision/main?blobs=true"
    try:
        hub.moved_to = renamed
        with Depot(tmp_path / "same") as depot:
            assert depot.scan_repo(LIAR_REPO).commit_id == hub.info["sha"]
        assert hub.requests == [f"/api/models/{LIAR_REPO}/revision/main", renamed.split("?")[0]]
        assert hub.authorizations == ["Bearer hf_secret"] * 2
        hub.moved_to = elsewhere.url + renamed
        with Depot(tmp_path / "other") as depot:
            assert depot.scan_repo(LIAR_REPO).commit_id == elsewhere.info["sha"]
        assert elsewhere.requests == [renamed.split("?")[0]] and elsewhere.authorizations == [None]
    finally:
        hub.stop()
        elsewhere.stop()


def test_an_upstreams_redirect_never_leads_further_in_than_the_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redirect is the upstream's word: one on this machine leading to a link-local address (a cloud's
    metadata service) is refused, for a repo's description and for its files, before any request is made
    there; nothing is written."""
    hub = Liar()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    metadata = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    try:
        hub.moved_to = metadata
        with Depot(tmp_path / "described") as depot, pytest.raises(UpstreamError) as described:
            depot.scan_repo(LIAR_REPO)
        assert "redirected to http://169.254.169.254, on a link-local address" in str(described.value)
        hub.moved_to, hub.files_moved_to = None, metadata
        with Depot(tmp_path / "files", chunk_size=SMALL_CHUNK) as depot:
            with pytest.raises(UpstreamError) as pulled:
                depot.pull(LIAR_REPO)
            assert "redirected to http://169.254.169.254" in str(pulled.value), pulled.value
            assert depot.list_repos() == []
    finally:
        hub.stop()


def test_a_whole_file_streamed_follows_no_redirect_further_in() -> None:
    """A server that ignores ranges has the file streamed whole, through aiohttp, which followed redirects on
    its own, unchecked (review 40): they are followed and checked as the ranged reads' are."""
    import asyncio
    import http.server
    import threading

    import aiohttp

    from modeldepot.transfer.sources import HttpSource

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    async def stream() -> None:
        async def sink(_: memoryview) -> None:
            raise AssertionError("no byte may come")

        async with aiohttp.ClientSession() as session:
            await HttpSource(base).stream_whole(session, f"{base}/acme/m/resolve/main/w.bin", 10, sink)

    try:
        with pytest.raises(
            UpstreamError, match=r"redirected to http://169\.254\.169\.254, on a link-local address"
        ):
            asyncio.run(stream())
    finally:
        server.shutdown()
        server.server_close()


def test_a_redirected_connection_is_judged_by_the_address_it_reached() -> None:
    """A name checked as public may resolve to this machine when connected to (a rebinding name), or not at all
    at the check: the address the connection reached is judged too (review 40)."""
    from modeldepot.transfer.redirects import RedirectRefused, check_peer

    with pytest.raises(RedirectRefused, match=r"which led to 127\.0\.0\.1, on this machine"):
        check_peer("https://93.184.215.14/x", "https://cdn.example/y", "127.0.0.1")
    with pytest.raises(RedirectRefused, match="on a link-local address"):
        check_peer("http://127.0.0.1:1/x", "http://meta.example/y", "::ffff:169.254.169.254")
    check_peer("https://93.184.215.14/x", "https://cdn.example/y", "151.101.1.1")
    check_peer("http://127.0.0.1:1/x", "http://127.0.0.1:2/y", "127.0.0.1")


@pytest.mark.parametrize(
    ("upstream", "location", "refused"),
    [
        ("https://93.184.215.14/x", "https://151.101.1.1/y", False),  # (the Hub to its CDN)
        ("https://93.184.215.14/x", "http://127.0.0.1:8980/y", True),
        ("https://93.184.215.14/x", "http://localhost/y", True),
        ("https://93.184.215.14/x", "http://10.0.0.5/y", True),
        ("https://93.184.215.14/x", "http://100.64.1.1/y", True),
        ("https://93.184.215.14/x", "http://[::ffff:127.0.0.1]/y", True),
        ("https://93.184.215.14/x", "http://0.0.0.0/y", True),
        ("http://10.0.0.2/x", "http://10.0.0.5/y", False),
        ("http://10.0.0.2/x", "https://93.184.215.14/y", False),
        ("http://10.0.0.2/x", "http://127.0.0.1/y", True),
        ("http://127.0.0.1:1/x", "http://10.0.0.5/y", False),
        ("http://127.0.0.1:1/x", "http://127.0.0.1:2/y", False),
        ("http://127.0.0.1:1/x", "http://169.254.169.254/y", True),
        ("http://[fe80::1]/x", "http://169.254.169.254/y", False),
        ("http://10.0.0.2/x", "http://100.100.100.200/y", True),  # (clouds' metadata outside 169.254/16)
        ("http://127.0.0.1:1/x", "http://[fd00:ec2::254]/y", True),
    ],
)
def test_where_a_redirect_may_lead(upstream: str, location: str, refused: bool) -> None:
    from modeldepot.transfer.redirects import RedirectRefused, check_redirect

    if refused:
        with pytest.raises(RedirectRefused, match="further in than the upstream itself"):
            check_redirect(upstream, location)
    else:
        check_redirect(upstream, location)


@pytest.mark.usefixtures("online")
def test_a_new_commit_resets_variant_statuses(upstream: LiveNode, tmp_path: Path) -> None:
    with Depot(tmp_path / "local") as depot:
        depot.import_dir(write_model_dir(tmp_path / "same", layout_files(GGUF_REPO)), "acme/tiny-gguf")
        assert depot.scan_repo("acme/tiny-gguf").variant("Q8_0").status == "downloaded"
        upstream.depot.import_dir(
            write_model_dir(tmp_path / "v2", {**layout_files(GGUF_REPO), "Qwen3-8B-Q8_0.gguf": b"new"}),
            "acme/tiny-gguf",
        )
        rescanned = depot.scan_repo("acme/tiny-gguf")
        assert rescanned.commit_id == upstream.depot.resolve("acme/tiny-gguf")
        assert {v.status for v in rescanned.variants} == {"available"}


class CountingListener:
    """A socket that accepts and counts connections: offline mode must never produce one."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_offline_mode_answers_from_the_store_and_opens_no_socket(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", upstream.url)
    with Depot(tmp_path / "local") as depot:
        scanned = depot.scan_repo("acme/tiny-gguf")
    listener = CountingListener()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.sock.getsockname()[1]}")
        monkeypatch.setenv("MODELDEPOT_OFFLINE", "1")
        with Depot(tmp_path / "local") as depot:
            assert depot.scan_repo("acme/tiny-gguf") == scanned
            with pytest.raises(OfflineError, match="the store does not hold"):
                depot.scan_repo("onnx-community/tiny")
    finally:
        listener.close()
    assert listener.accepted == 0


@pytest.mark.usefixtures("online")
def test_cli_scan_and_status(tmp_path: Path) -> None:
    home = str(tmp_path / "cli-home")
    runner = CliRunner()
    shown = runner.invoke(cli, ["scan", "acme/tiny-gguf", "--home", home])
    assert shown.exit_code == 0 and "Q4_K_M" in shown.stdout and "available" in shown.stdout
    as_json = json.loads(runner.invoke(cli, ["scan", "acme/tiny-gguf", "--json", "--home", home]).stdout)
    assert {v["name"] for v in as_json["variants"]} == {"Q4_K_M", "Q8_0", "IQ2_XXS", "BF16", "UD-Q4_K_XL"}
    status = json.loads(runner.invoke(cli, ["status", "--json", "--home", home]).stdout)
    assert [m["repo_id"] for m in status] == ["acme/tiny-gguf"]
    missing = runner.invoke(cli, ["status", "acme/unscanned", "--home", home])
    assert missing.exit_code == 1 and "modeldepot scan" in missing.stderr
    bad = runner.invoke(cli, ["scan", "../x", "--home", home])
    assert bad.exit_code == 2
