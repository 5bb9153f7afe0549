"""The node through the real huggingface_hub client (and transformers), over loopback sockets."""

from __future__ import annotations

import asyncio
import email.message
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import requests
from huggingface_hub import (
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from conftest import (
    SMALL_CHUNK,
    LiveNode,
    cancel_other_tasks,
    flip_byte,
    free_port,
    minilm_model_dir,
    sample_files,
    wait_for_port,
    write_model_dir,
)
from modeldepot import Depot
from modeldepot.errors import InvalidInputError

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SAMPLE = "acme/sample"


@pytest.fixture
def node(depot: Depot, live_node: LiveNode, tmp_path: Path) -> LiveNode:
    depot.import_dir(minilm_model_dir(), MINILM)
    depot.import_dir(write_model_dir(tmp_path / "sample", sample_files()), SAMPLE)
    depot.import_dir(write_model_dir(tmp_path / "dev", {"config.json": b'{"dev": true}'}), SAMPLE, "dev")
    depot.import_dir(write_model_dir(tmp_path / "pr", {"config.json": b'{"pr": 1}'}), SAMPLE, "refs/pr/1")
    return live_node


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_snapshot_download_is_byte_identical(node: LiveNode, tmp_path: Path) -> None:
    for repo, original in ((MINILM, read_tree(minilm_model_dir())), (SAMPLE, sample_files())):
        folder = snapshot_download(repo, endpoint=node.url, cache_dir=tmp_path / "hf")
        assert read_tree(Path(folder)) == original
        assert Path(folder).name == node.depot.resolve(repo)  # the client names snapshots after X-Repo-Commit


def test_a_small_file_with_a_flipped_byte_is_never_served_whole(node: LiveNode, depot: Depot) -> None:
    """A file up to 256 KiB is read rather than mapped and goes out with its headers in one write, from the
    bytes that were hashed: a byte flipped in its second chunk cuts the answer short, in its first the
    answer is a 503 before anything of it left."""
    files = sample_files()
    data = files["onnx/model_q4.onnx"]
    assert SMALL_CHUNK < len(data) <= 256 << 10
    commit = depot.resolve(SAMPLE)
    url = f"{node.url}/{SAMPLE}/resolve/{commit}/onnx/model_q4.onnx"
    assert requests.get(url, timeout=30).content == data
    flip_byte(depot.store.blobs.path(hashlib.sha256(data).hexdigest()), SMALL_CHUNK + 5)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # (its Content-Length never reached)
        requests.get(url, timeout=30)
    flip_byte(depot.store.blobs.path(hashlib.sha256(files["tokenizer.json"]).hexdigest()), 3)
    refused = requests.get(f"{node.url}/{SAMPLE}/resolve/{commit}/tokenizer.json", timeout=30)
    assert refused.status_code == 503 and files["tokenizer.json"][:100] not in refused.content


def test_hf_hub_download_and_file_metadata(node: LiveNode, tmp_path: Path) -> None:
    path = hf_hub_download(MINILM, "model.safetensors", endpoint=node.url, cache_dir=tmp_path / "hf")
    assert Path(path).read_bytes() == (minilm_model_dir() / "model.safetensors").read_bytes()
    weights = get_hf_file_metadata(hf_hub_url(MINILM, "model.safetensors", endpoint=node.url))
    config = get_hf_file_metadata(hf_hub_url(MINILM, "config.json", endpoint=node.url))
    commit = node.depot.resolve(MINILM)
    assert weights.commit_hash == config.commit_hash == commit
    assert weights.etag == hashlib.sha256(Path(path).read_bytes()).hexdigest()  # LFS: the SHA-256
    assert config.etag == node.depot.file_info(MINILM, "config.json").git_oid  # plain git: the blob SHA-1
    assert weights.size == os.path.getsize(path)
    dev = hf_hub_download(SAMPLE, "config.json", revision="dev", endpoint=node.url, cache_dir=tmp_path / "hf")
    assert Path(dev).read_bytes() == b'{"dev": true}'
    pr = hf_hub_download(
        SAMPLE, "config.json", revision="refs/pr/1", endpoint=node.url, cache_dir=tmp_path / "hf"
    )
    assert Path(pr).read_bytes() == b'{"pr": 1}'


def test_a_pull_requests_ref_is_read_percent_encoded_or_not(node: LiveNode) -> None:
    """`resolve/refs/pr/1/config.json` as a user types it (the Hub takes it) was refused: "refs" was taken
    for the revision, "Invalid rev id: refs"; the listings of the PR's tree and info were 404s."""
    for ref in ("refs/pr/1", "refs%2Fpr%2F1"):
        assert (
            requests.get(f"{node.url}/{SAMPLE}/resolve/{ref}/config.json", timeout=30).content == b'{"pr": 1}'
        )
        assert requests.get(f"{node.url}/{SAMPLE}/raw/{ref}/config.json", timeout=30).content == b'{"pr": 1}'
        info = requests.get(f"{node.url}/api/models/{SAMPLE}/revision/{ref}", timeout=30).json()
        assert info["sha"] == node.depot.resolve(SAMPLE, "refs/pr/1"), ref
        tree = requests.get(f"{node.url}/api/models/{SAMPLE}/tree/{ref}", timeout=30).json()
        assert [entry["path"] for entry in tree] == ["config.json"], ref
    missing = requests.get(f"{node.url}/{SAMPLE}/resolve/refs/pr/2/config.json", timeout=30)
    assert (missing.status_code, missing.headers["X-Error-Code"]) == (404, "RevisionNotFound")
    assert "refs/pr/2" in missing.json()["error"]


def test_an_id_of_a_short_org_and_a_long_name_is_served(
    depot: Depot, live_node: LiveNode, tmp_path: Path
) -> None:
    """The Hub's 96 characters are of the org and of the name each: a real `org/` and 90-character name was
    refused everywhere, and a node answered repo_exists() of it with a 400 (an explorer's trial)."""
    long_id = "some-org/" + "a-very-long-model-name-" * 3 + "x" * 21  # a 90-character name
    assert len(long_id.split("/")[1]) == 90
    depot.import_dir(write_model_dir(tmp_path / "long", {"config.json": b'{"long": 1}'}), long_id)
    api = HfApi(endpoint=live_node.url)
    assert api.repo_exists(long_id) and not api.repo_exists("some-org/" + "y" * 96)
    path = hf_hub_download(long_id, "config.json", endpoint=live_node.url, cache_dir=tmp_path / "hf")
    assert Path(path).read_bytes() == b'{"long": 1}'


def test_a_download_counts_one_use_of_its_variant(node: LiveNode) -> None:
    """One GET of a file counted two uses of its repo (the route and the blob's opening each did), so
    `most used` and `--preload-top` favoured repos clients fetch over HTTP over those loaded in process;
    and a use of the whole repo, so the RAM tier preloaded every quant of a repo whose clients fetched
    one. A variant's file counts one use of that variant; a config, which comes with any, counts none."""
    import urllib.request

    access = node.depot.store.access

    def uses() -> dict[tuple[str, str], int]:
        return {(a.repo_id, a.variant): a.count for a in access.top(20) if a.repo_id == SAMPLE}

    before = uses()
    for path in ("onnx/model_q4.onnx", "config.json"):
        with urllib.request.urlopen(f"{node.url}/{SAMPLE}/resolve/main/{path}", timeout=30) as answer:
            answer.read()
    after = uses()
    assert after.get((SAMPLE, "q4"), 0) == before.get((SAMPLE, "q4"), 0) + 1
    assert after.get((SAMPLE, ""), 0) == before.get((SAMPLE, ""), 0), after  # ('': the repo as a whole)


def test_a_download_in_many_ranges_counts_one_use(
    node: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every range request counted a use: one peer's pull of a 768 MiB file counted 49, and `--preload-top`
    preloaded the file a peer fetched once over the model loaded ten times (a trial). A download counts
    once, at its first byte: a GET of the file, or of a range from byte 0; a HEAD, a range further on and a
    resume count none."""
    access = node.depot.store.access
    url = f"{node.url}/{SAMPLE}/resolve/main/model.safetensors"

    def count() -> int:
        return sum(a.count for a in access.top(20) if a.repo_id == SAMPLE)

    before = count()
    for method, header in (("HEAD", None), ("GET", "bytes=100-199"), ("GET", "bytes=70000-"),
                           ("GET", "bytes=-500"), ("GET", "bytes=0-99")):  # fmt: skip
        answer = requests.request(method, url, headers={"Range": header} if header else {}, timeout=30)
        assert answer.status_code in (200, 206), (method, header, answer.status_code)
    assert count() == before + 1, "only the range from byte 0 starts a download"
    hf_hub_download(SAMPLE, "model.safetensors", endpoint=node.url, cache_dir=tmp_path / "hf")  # HEAD, GET
    assert count() == before + 2
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", node.url)
    with Depot(tmp_path / "peer", chunk_size=SMALL_CHUNK) as peer:  # a pull: one range per 64 KiB chunk
        peer.download_file(SAMPLE, "model.safetensors")
        assert bytes(peer.get_file(SAMPLE, "model.safetensors")) == sample_files()["model.safetensors"]
    assert count() == before + 3


def test_model_info_with_files_metadata(node: LiveNode) -> None:
    api = HfApi(endpoint=node.url)
    info = api.model_info(MINILM, files_metadata=True)
    assert info.id == MINILM and info.sha == node.depot.resolve(MINILM) and info.private is False
    assert info.security_repo_status is None  # (not asked)
    # Asked, the node says in the Hub's shape that it scans nothing (None raised on ["scansDone"])
    scanned = api.model_info(MINILM, securityStatus=True).security_repo_status
    assert scanned == {"scansDone": False, "filesWithIssues": []}
    siblings = {s.rfilename: s for s in info.siblings or []}
    for entry in node.depot.list_files(MINILM):
        sibling = siblings[entry.path]
        assert sibling.size == entry.size and sibling.blob_id == entry.git_oid
        assert (sibling.lfs is not None) == entry.lfs
        if sibling.lfs is not None:
            assert sibling.lfs.sha256 == entry.sha256 and sibling.lfs.size == entry.size
    by_commit = api.model_info(SAMPLE, revision=node.depot.resolve(SAMPLE, "dev"))
    assert [s.rfilename for s in by_commit.siblings or []] == ["config.json"]


def test_listing_files_trees_and_paths(node: LiveNode) -> None:
    api = HfApi(endpoint=node.url)
    assert api.list_repo_files(SAMPLE) == sorted(sample_files())
    top = {(item.path, type(item).__name__) for item in api.list_repo_tree(SAMPLE)}
    assert ("onnx", "RepoFolder") in top and ("config.json", "RepoFile") in top
    assert {item.path for item in api.list_repo_tree(SAMPLE, path_in_repo="onnx")} == {
        "onnx/model_q4.onnx", "onnx/model_q4.onnx_data"}  # fmt: skip
    expanded = list(api.list_repo_tree(SAMPLE, recursive=True, expand=True))
    assert all(item.last_commit is not None for item in expanded)
    assert api.file_exists(SAMPLE, "onnx/model_q4.onnx") and not api.file_exists(SAMPLE, "missing.bin")
    assert not api.file_exists("acme/absent", "config.json")
    # Revisions no branch here can have (names git allows but the node does not take, a tag's full ref, a
    # ref copied encoded): False, as from the Hub, where a 400 made these calls raise
    for odd in ("v1.0+x", "my branch", "refs/tags/v1", "refs%2Fpr%2F1", "x" * 201):
        assert not api.revision_exists(SAMPLE, odd), odd
        assert not api.file_exists(SAMPLE, "config.json", revision=odd), odd
    assert api.revision_exists(SAMPLE, "dev") and api.revision_exists(SAMPLE, "refs/heads/dev")
    infos = api.get_paths_info(SAMPLE, ["config.json", "onnx", "missing.bin"])
    assert sorted(i.path for i in infos) == ["config.json", "onnx"]
    # Paths no file can have (an empty segment): not there, as from the Hub (a 400 made file_exists raise,
    # hf_hub_download say "check your connection", and one such path fail a whole paths-info batch)
    for odd in ("onnx/", "nope/", "onnx//model_q4.onnx", "config.json/"):
        assert not api.file_exists(SAMPLE, odd), odd
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(
            SAMPLE, "config.json/", endpoint=node.url, cache_dir=node.depot.home.parent / "odd-cache"
        )
    infos = api.get_paths_info(SAMPLE, ["config.json", "onnx//model_q4.onnx"])
    assert [i.path for i in infos] == ["config.json"]
    refs = api.list_repo_refs(SAMPLE, include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [p.ref for p in refs.pull_requests or []] == ["refs/pr/1"]


def test_tree_pages_are_followed(depot: Depot, live_node: LiveNode, tmp_path: Path) -> None:
    files = {f"shard/{i:05d}.json": str(i).encode() for i in range(1203)}
    depot.import_dir(write_model_dir(tmp_path / "many", files), "acme/many")
    api = HfApi(endpoint=live_node.url)
    assert api.list_repo_files("acme/many") == sorted(files)  # 1000 per page, then a Link rel="next"
    expanded = list(api.list_repo_tree("acme/many", path_in_repo="shard", expand=True))  # 50 per page
    assert [item.path for item in expanded] == sorted(files)


def test_a_tree_paged_through_is_read_once_while_the_index_stays(
    depot: Depot, live_node: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every page of a tree read all of the commit's rows and built its whole tree: a listing quadratic in
    the files (a repo of 100,000 files: 0.8 s a page, 100 pages; a scale trial). Read once now, again only
    when the index changed."""
    files = {f"shard/{i:05d}.json": str(i).encode() for i in range(1203)}
    depot.import_dir(write_model_dir(tmp_path / "many", files), "acme/many")
    # (the flusher recording the import's blobs durable is a change of the index: done before the paging,
    # which it made read twice when it came between two pages, under CI's load; so is the write of the
    # import's use, due a few seconds after the store opened: written now, its timer finds nothing to write)
    depot.sync()
    depot.store.access.flush()
    reads: list[str] = []
    real = depot.commit_files
    monkeypatch.setattr(depot, "commit_files", lambda *args: reads.append(args[0]) or real(*args))
    api = HfApi(endpoint=live_node.url)
    expanded = list(api.list_repo_tree("acme/many", path_in_repo="shard", expand=True))  # 25 pages
    assert [item.path for item in expanded] == sorted(files) and api.list_repo_files("acme/many") == sorted(
        files
    )
    assert reads == ["acme/many"]
    depot.import_dir(write_model_dir(tmp_path / "more", {"more.json": b"{}"}), "acme/many")  # (main moves on)
    assert api.list_repo_files("acme/many") == ["more.json"] and len(reads) == 2


def test_names_with_percent_signs_are_decoded_once(node: LiveNode, depot: Depot, tmp_path: Path) -> None:
    """A folder "x%20y" beside "x y" listed the other's files, "p%41" was a 404 for "pA", and a revision
    quoted twice resolved: the node decoded what aiohttp had decoded already."""
    files = {"x%20y/a.txt": b"a", "x y/b.txt": b"b", "p%41/c.txt": b"c"}
    depot.import_dir(write_model_dir(tmp_path / "pct", files), "acme/pct")
    api = HfApi(endpoint=node.url)
    for folder, listed in (("x%20y", ["x%20y/a.txt"]), ("x y", ["x y/b.txt"]), ("p%41", ["p%41/c.txt"])):
        assert [item.path for item in api.list_repo_tree("acme/pct", path_in_repo=folder)] == listed
    assert {item.path for item in api.list_repo_tree(SAMPLE, revision="refs/pr/1")} == {"config.json"}
    twice = requests.get(f"{node.url}/api/models/{SAMPLE}/tree/refs%252Fpr%252F1", timeout=30)
    assert twice.status_code in (400, 404), twice.text  # "refs%2Fpr%2F1" is no revision of it


def test_typed_errors(node: LiveNode, tmp_path: Path) -> None:
    api = HfApi(endpoint=node.url)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/absent")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/absent", "config.json", endpoint=node.url, cache_dir=tmp_path / "hf")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(SAMPLE, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            SAMPLE, "config.json", revision="no-such-branch", endpoint=node.url, cache_dir=tmp_path / "hf"
        )
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(SAMPLE, "missing.bin", endpoint=node.url, cache_dir=tmp_path / "hf")


class CuttingRelay:
    """A TCP relay to the node that drops the connection partway through the first GET of a file body.

    A real network fault, not a mock: the client sees a short read and must resume with a Range request.
    """

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.cut_done = False
        self.requests: list[str] = []
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            server.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        armed = asyncio.Event()

        async def to_node() -> None:
            while data := await client_r.read(65536):
                head = data.decode("latin-1", "replace")
                if head[:4] in ("GET ", "HEAD"):
                    self.requests.append(head.split("\r\n\r\n")[0])
                    if head.startswith("GET ") and "/resolve/" in head and not self.cut_done:
                        armed.set()
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def to_client() -> None:
            sent = 0
            while data := await up_r.read(65536):
                if armed.is_set() and not self.cut_done:
                    if sent + len(data) >= self.cut_after:
                        client_w.write(data[: self.cut_after - sent])
                        await client_w.drain()
                        self.cut_done = True
                        client_w.transport.abort()
                        up_w.close()
                        return
                    sent += len(data)
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(to_node(), to_client(), return_exceptions=True)
        finally:
            for writer in (client_w, up_w):
                writer.close()
                try:
                    await writer.wait_closed()
                except (ConnectionError, asyncio.CancelledError):
                    pass

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(cancel_other_tasks(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def test_interrupted_download_resumes_with_range(node: LiveNode, tmp_path: Path) -> None:
    # huggingface_hub writes in 10 MiB pieces and resumes from what it wrote: cut well past two of them.
    relay = CuttingRelay(node.port, cut_after=25_000_000)
    try:
        path = hf_hub_download(
            MINILM, "model.safetensors", endpoint=f"http://127.0.0.1:{relay.port}", cache_dir=tmp_path / "hf"
        )
    finally:
        relay.close()
    assert relay.cut_done
    assert Path(path).read_bytes() == (minilm_model_dir() / "model.safetensors").read_bytes()
    resumed = [r for r in relay.requests if r.startswith("GET ") and "range: bytes=" in r.lower()]
    assert resumed, relay.requests
    offset = int(resumed[0].lower().split("range: bytes=")[1].split("-")[0])
    assert 10 << 20 <= offset < 25_000_000


def test_a_request_with_two_range_headers_gets_the_file_whole(node: LiveNode) -> None:
    """Two ``Range`` fields are not one range (a proxy that joined two requests, a client's bug): the first
    was served as a 206, and a client that meant the second joined the wrong bytes. Ignored, as a header of
    several ranges is: a 200 of the whole file says so."""
    import http.client

    data = sample_files()["tokenizer.json"]
    commit = node.depot.resolve(SAMPLE)
    sha = hashlib.sha256(data).hexdigest()
    for path in (f"/{SAMPLE}/resolve/{commit}/tokenizer.json", f"/api/depot/v1/blobs/{sha}"):
        for ranges in (["bytes=0-9", "bytes=10-19"], ["bytes=10-19"]):
            connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
            try:
                connection.putrequest("GET", path)
                for value in ranges:
                    connection.putheader("Range", value)
                connection.endheaders()
                answer = connection.getresponse()
                body = answer.read()
            finally:
                connection.close()
            expected = (200, data) if len(ranges) == 2 else (206, data[10:20])
            assert (answer.status, body) == expected, (path, ranges)


def test_transformers_loads_a_tokenizer_through_hf_endpoint(node: LiveNode, tmp_path: Path) -> None:
    script = (
        "import json, transformers\n"
        f"tok = transformers.AutoTokenizer.from_pretrained({MINILM!r})\n"
        f"cfg = transformers.AutoConfig.from_pretrained({MINILM!r})\n"
        "print(json.dumps({'ids': tok('modeldepot serves models')['input_ids'], 'type': cfg.model_type}))\n"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": node.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_XET": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(minilm_model_dir())
    assert result == {"ids": reference("modeldepot serves models")["input_ids"], "type": "bert"}


@pytest.fixture
def served(home: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, bytes]]:
    """`modeldepot serve` as users run it, on a store holding one 24 MiB file."""
    payload = os.urandom(24 << 20)
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "big", {"model.safetensors": payload}), "acme/big")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, 60, process=process)
        yield process, f"http://127.0.0.1:{port}", payload
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_serve_command_serves_and_finishes_in_flight_downloads_on_sigterm(
    served: tuple[subprocess.Popen[bytes], str, bytes], stop: signal.Signals
) -> None:
    """SIGHUP (the session that started the node closed, a supervisor's reload) killed it on the spot: a
    graceful stop too, whose exit status says SIGHUP ended it (129: a unit's Restart=on-failure starts it
    again; with 0 a reload stopped the node for good, an explorer's trial)."""
    process, url, payload = served
    port = int(url.rsplit(":", 1)[1])
    # (a branch's LFS file redirects to its commit's URL, as the Hub's to its CDN: the download goes there)
    pinned = requests.head(f"{url}/acme/big/resolve/main/model.safetensors", timeout=30)
    location = urlsplit(
        urljoin(f"{url}/acme/big/resolve/main/model.safetensors", pinned.headers["Location"])
    ).path
    assert (
        pinned.status_code == 302
        and location == f"/acme/big/resolve/{pinned.headers['X-Repo-Commit']}/model.safetensors"
    )
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(f"GET {location} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = bytearray(sock.recv(65536))
        process.send_signal(stop)  # while most of the body is still to be sent
        while chunk := sock.recv(1 << 20):
            received += chunk
    header, _, body = bytes(received).partition(b"\r\n\r\n")
    assert header.startswith(b"HTTP/1.1 200") and body == payload
    assert process.wait(60) == (129 if stop == signal.SIGHUP else 0)
    assert process.stdout is not None
    log = process.stdout.read().decode()
    assert "serving" in log and f"GET {location}" in log and f"stopping ({stop.name})" in log
    assert log.rstrip().endswith(f"stopped ({stop.name})"), log[-300:]


def test_model_card_metadata_reaches_model_info(node: LiveNode) -> None:
    info = HfApi(endpoint=node.url).model_info(MINILM)
    assert info.pipeline_tag == "sentence-similarity" and info.library_name == "sentence-transformers"
    assert "feature-extraction" in (info.tags or [])
    # The whole front matter, and the tags the Hub derives from it (list_models(filter="en") found nothing)
    assert (
        info.card_data is not None
        and info.card_data.language == "en"
        and "ms_marco" in info.card_data.datasets
    )
    assert {"en", "dataset:ms_marco"} <= set(info.tags or [])
    api = HfApi(endpoint=node.url)
    for found in (api.list_models(filter="en"), api.list_models(trained_dataset="ms_marco")):
        assert [m.id for m in found] == [MINILM]
    bare = HfApi(endpoint=node.url).model_info(SAMPLE)  # no README: nothing claimed but its files' formats
    assert bare.pipeline_tag is None and bare.library_name is None and bare.tags == ["safetensors", "onnx"]
    assert bare.card_data is None


def test_a_request_that_does_not_arrive_in_time_gets_408(depot: Depot) -> None:
    node = LiveNode(depot, request_deadline=0.5)
    try:
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
            sock.sendall(
                b"POST /api/models/acme/sample/paths-info/main HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\npaths=con"
            )  # and then nothing more: a stalled upload
            answer = sock.recv(65536)
    finally:
        node.stop()
    assert answer.startswith(b"HTTP/1.1 408")


def test_last_commit_is_when_the_revision_came_and_gated_repos_say_so(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from liar import REPO, Liar

    first = depot.import_dir(write_model_dir(tmp_path / "one", {"config.json": b"{}"}), SAMPLE).commit_id
    depot.import_dir(write_model_dir(tmp_path / "two", {"config.json": b'{"v": 2}'}), SAMPLE, "dev")
    with depot.store.index.write() as con:  # the first revision came long ago; the repo changed since
        con.execute("UPDATE revisions SET created_at = 978307200 WHERE commit_id = ?", (first,))
    liar = Liar()
    liar.lie(gated="manual")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", liar.url)
    try:
        with Depot(depot.home) as online:  # the fixture's depot was made offline
            online.pull(REPO)  # a gated upstream repo
            online.pull(REPO)  # (pulled again: still gated, not taken for private by its own flag, a review)
    finally:
        liar.stop()
    node = LiveNode(depot, token="t")
    try:
        api = HfApi(endpoint=node.url, token="t")
        tree = list(api.list_repo_tree(SAMPLE, revision=first, expand=True))
        assert tree[0].last_commit is not None and tree[0].last_commit.date.year == 2001
        info = api.model_info(REPO)
        assert info.gated == "manual" and not info.private  # as the Hub says it
        assert "gated" not in (info.card_data or {})
    finally:
        node.stop()
    # An open node describes it to anyone, as the Hub does (it was "Repository Not Found", an explorer's
    # trial), and serves its files to the control token's holders alone: the node's credentials accepted
    # the upstream's conditions, not everyone's
    open_node = LiveNode(depot, control_token="ctl")
    try:
        anyone = HfApi(endpoint=open_node.url, token=False)
        assert anyone.model_info(REPO).gated == "manual" and anyone.repo_exists(REPO)
        assert REPO in [m.id for m in anyone.list_models()]
        for call in (
            lambda: hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "anyone", endpoint=open_node.url,
                                    token=False),
            lambda: anyone.auth_check(REPO),
        ):  # fmt: skip
            with pytest.raises(GatedRepoError, match="node's token"):
                call()
        got = hf_hub_download(
            REPO, "config.json", cache_dir=tmp_path / "member", endpoint=open_node.url, token="ctl"
        )
        assert Path(got).read_bytes() == liar.files["config.json"]
        # Hidden whole: the operator's private repo; a row an older modeldepot wrote (its card said `gated` of
        # private upstream repos too, a review's trial); a repo its upstream made private since, whatever
        # branch a pull then brought
        for change in ("gated_only = 0", "hidden_at = NULL"):
            with depot.store.index.write() as con:
                con.execute(f"UPDATE repos SET {change}")
            with pytest.raises(RepositoryNotFoundError):
                anyone.model_info(REPO)
            with depot.store.index.write() as con:
                con.execute("UPDATE repos SET gated_only = 1, hidden_at = 1")
            assert anyone.model_info(REPO).gated == "manual"
        liar = Liar()
        liar.lie(private=True)
        monkeypatch.setenv("HF_ENDPOINT", liar.url)
        try:
            with Depot(depot.home) as online:
                online.pull(REPO, revision="dev")
        finally:
            liar.stop()
        with pytest.raises(RepositoryNotFoundError):
            anyone.model_info(REPO)
    finally:
        open_node.stop()


def test_a_tag_pulled_is_listed_as_a_tag_down_a_chain_of_nodes(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A git tag pulled (`pull -r v1.0`) became a branch: `list_repo_refs().tags` was always empty, and code
    picking releases from it found none (an explorer's trial). The upstream's refs say what it is; a
    branch stays a branch, and a node pulling from this one learns the tag from it."""
    from liar import REPO, SHA, Liar

    liar = Liar()
    at = {"targetCommit": SHA}
    liar.refs = {"branches": [{"name": "main", "ref": "refs/heads/main", **at},
                              {"name": "stable", "ref": "refs/heads/stable", **at}],
                 "tags": [{"name": "v1.0", "ref": "refs/tags/v1.0", **at},
                          {"name": "elsewhere", "ref": "refs/tags/elsewhere", "targetCommit": "f" * 40}],
                 "converts": []}  # fmt: skip
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", liar.url)
    try:
        with Depot(depot.home) as online:  # the fixture's depot was made offline
            for revision in ("v1.0", "stable", "elsewhere"):  # (elsewhere: a tag at another commit, a branch)
                online.pull(REPO, revision=revision)
            # A tag made upstream since the refs were read (kept 10 s) is asked again, not taken for a branch
            liar.refs = {
                **liar.refs,
                "tags": [*liar.refs["tags"], {"name": "v2.0", "ref": "refs/tags/v2.0", **at}],
            }
            online.pull(REPO, revision="v2.0")
            assert "v2.0" in online.store.repo_summary(REPO).tag_refs
            # Refs that cannot be had keep what the store recorded (a tag became a branch again: a review)
            from modeldepot.hub import scan

            liar.refs = None
            scan._refs_seen.clear()
            online.pull(REPO, revision="v1.0")
            assert online.store.repo_summary(REPO).tag_refs == ("v1.0", "v2.0")
            liar.refs = {"branches": [{"name": "v1.0", "ref": "refs/heads/v1.0", **at}], "tags": []}
            scan._refs_seen.clear()
            online.pull(REPO, revision="v1.0")  # (what the refs say, once they say it)
            assert online.store.repo_summary(REPO).tag_refs == ("v2.0",)
            liar.refs = {"branches": [], "tags": [{"name": "v1.0", "ref": "refs/tags/v1.0", **at}]}
            scan._refs_seen.clear()
            online.pull(REPO, revision="v1.0")
    finally:
        liar.stop()
    node = LiveNode(depot)
    try:
        refs = HfApi(endpoint=node.url, token=False).list_repo_refs(REPO)
        assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [
            ("v1.0", "refs/tags/v1.0", SHA),
            ("v2.0", "refs/tags/v2.0", SHA),
        ]
        assert sorted(b.name for b in refs.branches) == ["elsewhere", "stable"]
        got = hf_hub_download(
            REPO, "config.json", revision="v1.0", cache_dir=tmp_path / "client", endpoint=node.url
        )
        assert Path(got).read_bytes() == liar.files["config.json"]
        monkeypatch.setenv("HF_ENDPOINT", node.url)
        with Depot(tmp_path / "next") as downstream:
            downstream.pull(REPO, revision="v1.0")
            assert downstream.store.repo_summary(REPO).tag_refs == ("v1.0",)
    finally:
        node.stop()


def test_what_a_node_does_not_serve_is_refused_clearly(node: LiveNode, tmp_path: Path) -> None:

    api = HfApi(endpoint=node.url, token=False)
    for call in (lambda: api.dataset_info("acme/data"), lambda: api.space_info("acme/app")):
        with pytest.raises(RepositoryNotFoundError, match="model repos only"):
            call()
    # Their listings are empty ones: code listing every kind of repo crashed on a RepositoryNotFoundError
    assert list(api.list_datasets(limit=5)) == [] and list(api.list_spaces(author="acme")) == []
    for write in (
        lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=SAMPLE, token="t"),
        lambda: api.create_repo("acme/new", token="t"),
        lambda: api.delete_file("config.json", SAMPLE, token="t"),
    ):
        with pytest.raises(HfHubHTTPError, match="read-only") as refused:
            write()
        assert refused.value.response.status_code == 405
    assert node.depot.list_files(SAMPLE)  # nothing was changed
    # An id without an org (the Hub's old "gpt2") was a bare 404, which huggingface_hub took for a broken
    # connection ("check your connection"), and repo_exists raised
    assert api.repo_exists("gpt2") is False and api.repo_exists(SAMPLE) is True
    for call in (lambda: api.model_info("gpt2"), lambda: api.list_repo_refs("gpt2"),
                 lambda: api.list_repo_files("gpt2", revision="refs/pr/1"),
                 lambda: api.get_paths_info("gpt2", ["config.json"]),
                 lambda: hf_hub_download("gpt2", "config.json", endpoint=node.url, cache_dir=str(tmp_path))):  # fmt: skip
        with pytest.raises(RepositoryNotFoundError):  # ("gpt2/refs" reads as a repo id too: not held either)
            call()
    with pytest.raises(RepositoryNotFoundError, match="org/name"):
        api.model_info("gpt2", revision="main")
    # An id whose '/' came encoded ("org%2Fname") was said not found, as an id without an org: a repo the
    # node holds (an explorer's trial)
    org, name = SAMPLE.split("/")
    for encoded in (f"api/models/{org}%2F{name}", f"{org}%2f{name}/resolve/main/config.json"):
        answer = requests.get(f"{node.url}/{encoded}", timeout=30)
        assert answer.status_code == 404 and "sent encoded (%2F)" in answer.json()["error"], answer.text
    unknown = requests.get(f"{node.url}/api/models/acme/x/unknown", timeout=30)  # (no repo route at all)
    assert unknown.status_code == 404 and "X-Error-Code" not in unknown.headers


def test_huggingface_hub_caches_the_nodes_agent_registry_instead_of_asking_every_process(
    node: LiveNode, tmp_path: Path
) -> None:
    # huggingface_hub reads /api/agent-harnesses for its user-agent before its first request, and caches
    # only an answer: a 404 costs every client process a round trip.
    probe = (
        f"from huggingface_hub import HfApi; print(HfApi(endpoint={node.url!r}).model_info({SAMPLE!r}).sha)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=node.url)  # (telemetry off skips the registry)
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == node.depot.resolve(SAMPLE)
    cached = tmp_path / "hf-home" / ".agent_harnesses.json"
    assert json.loads(cached.read_text()) == {"standardEnvVars": [], "harnesses": {}}


def test_a_branchs_lfs_file_redirects_to_its_commit_so_a_resume_stays_on_it(tmp_path: Path) -> None:
    """A download of a branch's file that was cut after the branch moved resumed, from the branch's URL, with
    the new commit's bytes: the old commit's file held both halves under its own digest, and
    huggingface_hub, which checks the size alone, kept it (a trial). As the Hub redirects an LFS file to its
    CDN, a node redirects a branch's LFS file to its commit's URL: the download, and its resume, stay there.
    Plain files are sent from the branch's URL, as the Hub sends them."""
    size = 3 * SMALL_CHUNK
    one, two = os.urandom(size), os.urandom(size)
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        first = depot.import_dir(
            write_model_dir(tmp_path / "one", {"config.json": b"{}", "model.safetensors": one}), "acme/flip"
        ).commit_id
        node = LiveNode(depot)
        try:
            metadata = get_hf_file_metadata(hf_hub_url("acme/flip", "model.safetensors", endpoint=node.url))
            assert metadata.location == f"{node.url}/acme/flip/resolve/{first}/model.safetensors"
            assert (metadata.commit_hash, metadata.size) == (first, size)
            depot.import_dir(
                write_model_dir(tmp_path / "two", {"config.json": b"{}", "model.safetensors": two}),
                "acme/flip",
            )  # main moves, to a file of the same size
            resumed = requests.get(metadata.location, headers={"Range": f"bytes={size // 2}-"}, timeout=30)
            assert resumed.status_code == 206 and resumed.content == one[size // 2 :], (
                "the resume stays on its commit"
            )
            plain = requests.head(f"{node.url}/acme/flip/resolve/main/config.json", timeout=30)
            assert plain.status_code == 200 and "Location" not in plain.headers
            pinned = requests.head(
                f"{node.url}/acme/flip/resolve/main/model.safetensors?download=true", timeout=30
            )
            assert pinned.status_code == 302 and pinned.headers["X-Linked-Size"] == str(size)
            assert pinned.headers["Location"].endswith("/model.safetensors?download=true")
            # The query as sent: decoded, "%0d%0a" broke the answer (none at all) and "%23" cut the value
            odd = requests.head(
                f"{node.url}/acme/flip/resolve/main/model.safetensors?x=%0d%0a&y=%23f&z=a%20b", timeout=30
            )
            assert odd.status_code == 302
            assert odd.headers["Location"].lower().endswith("/model.safetensors?x=%0d%0a&y=%23f&z=a%20b")
            downloaded = hf_hub_download(
                "acme/flip", "model.safetensors", cache_dir=tmp_path / "hf", endpoint=node.url
            )
            assert Path(downloaded).read_bytes() == two
        finally:
            node.stop()


def test_a_branchs_full_ref_name_is_the_branch(node: LiveNode, tmp_path: Path) -> None:
    """`list_repo_refs` gives each branch's `ref` as `refs/heads/dev`; given back as a revision it was a 400
    that reached huggingface_hub's HEAD without its body: "check your connection" (a trial). As on the Hub,
    it names the branch."""
    api = HfApi(endpoint=node.url)
    refs = {b.name: b.ref for b in api.list_repo_refs(SAMPLE).branches}
    assert refs["dev"] == "refs/heads/dev"
    got = hf_hub_download(
        SAMPLE, "config.json", revision=refs["dev"], endpoint=node.url, cache_dir=tmp_path / "hf"
    )
    assert Path(got).read_bytes() == b'{"dev": true}'
    assert api.list_repo_files(SAMPLE, revision="refs/heads/main") == api.list_repo_files(SAMPLE)


def test_hf_auth_login_and_whoami_take_a_nodes_token(depot: Depot, tmp_path: Path) -> None:
    """`hf auth login --token T` and `hf auth whoami` failed against a node (no /api/whoami-v2): its token could
    be given as HF_TOKEN alone (a trial). The node's token is a read token of the user "modeldepot"."""
    depot.import_dir(write_model_dir(tmp_path / "m", {"config.json": b"{}"}), SAMPLE, private=True)
    node = LiveNode(depot, token="node-secret")
    try:
        assert HfApi(endpoint=node.url, token="node-secret").whoami()["name"] == "modeldepot"
        with pytest.raises(HfHubHTTPError) as refused:
            HfApi(endpoint=node.url, token="wrong").whoami()
        assert refused.value.response.status_code == 401
        env = {**os.environ, "HF_ENDPOINT": node.url, "HF_HOME": str(tmp_path / "hf")}
        for name in ("HF_TOKEN", "HF_HUB_OFFLINE"):  # (the tests run offline but for loopback nodes)
            env.pop(name, None)
        hf = str(Path(sys.executable).parent / "hf")
        login = subprocess.run([hf, "auth", "login", "--token", "node-secret"], env=env, capture_output=True,
                               text=True, timeout=120)  # fmt: skip
        assert login.returncode == 0, login.stdout + login.stderr
        who = subprocess.run([hf, "auth", "whoami"], env=env, capture_output=True, text=True, timeout=120)
        assert who.returncode == 0 and "modeldepot" in who.stdout, who.stdout + who.stderr
        # and the login's token reads the node's private repo
        got = subprocess.run([sys.executable, "-c", f"from huggingface_hub import hf_hub_download; print(open("
                              f"hf_hub_download({SAMPLE!r}, 'config.json')).read())"], env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert got.returncode == 0 and got.stdout.strip() == "{}", got.stderr
    finally:
        node.stop()


def test_model_info_gives_the_safetensors_parameters(node: LiveNode, depot: Depot, tmp_path: Path) -> None:
    """`model_info(...).safetensors` was None, `expand=["safetensors"]` too, though the node held the files
    (a trial; `get_safetensors_metadata` worked). The parameters by dtype, summed over a sharded model's
    files, as the Hub gives them; none for a file that is no safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    api = HfApi(endpoint=node.url)
    real = api.get_safetensors_metadata(MINILM)
    info = api.model_info(MINILM).safetensors
    assert (
        info is not None
        and info.parameters == real.parameter_count
        and info.total == sum(real.parameter_count.values())
    )
    assert api.model_info(MINILM, expand=["safetensors"]).safetensors == info
    # ... and a listing asked for it (it answered bare ids: an explorer's trial)
    [listed] = [m for m in api.list_models(expand=["safetensors"]) if m.id == MINILM]
    assert listed.safetensors == info
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file(
        {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.int64)},
        str(folder / "model-00001-of-00002.safetensors"),
    )
    save_file({"c": np.zeros((2, 2, 2), np.float16)}, str(folder / "model-00002-of-00002.safetensors"))
    depot.import_dir(folder, "acme/sharded")
    sharded = api.model_info("acme/sharded").safetensors
    assert sharded is not None and (sharded.parameters, sharded.total) == (
        {"F32": 12, "I64": 5, "F16": 8},
        25,
    )
    assert api.model_info(SAMPLE).safetensors is None  # (its model.safetensors is random bytes)
    # Mistral's layout: the same weights as shards (with their index) and as consolidated.safetensors, and a
    # checkpoint in a folder: the model is counted once, as get_safetensors_metadata reads it (it was twice)
    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.int64), "c": np.zeros(8, np.float16)},
              str(folder / "consolidated.safetensors"))  # fmt: skip
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                           "b": "model-00001-of-00002.safetensors",
                                           "c": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "checkpoint-1").mkdir()
    save_file({"d": np.zeros(100, np.float32)}, str(folder / "checkpoint-1" / "model.safetensors"))
    # an older sharding's file left beside the index's (named as a shard, in no weight map)
    save_file({"a": np.zeros((3, 4), np.float32)}, str(folder / "model-00001-of-00003.safetensors"))
    depot.import_dir(folder, "acme/sharded")
    both = api.model_info("acme/sharded").safetensors
    assert both is not None and (both.parameters, both.total) == ({"F32": 12, "I64": 5, "F16": 8}, 25)
    assert api.get_safetensors_metadata("acme/sharded").parameter_count == both.parameters


def test_a_safetensors_header_whose_shape_multiplies_past_its_file_is_no_model(
    node: LiveNode, depot: Depot, tmp_path: Path
) -> None:
    """A tensor of 120,000 dimensions of 2**60 in a 2.4 MB header: multiplied whole, it held every thread of
    the node for 25 s, and its product, too big to write as JSON, made model info a 500 for good, and a
    listing of every repo asked for `safetensors` too (an explorer's trial). Bounded as it is multiplied,
    it is no model: no parameters, and no load."""
    header = json.dumps({"t": {"dtype": "F32", "shape": [2**60] * 100, "data_offsets": [0, 0]}}).encode()
    folder = tmp_path / "lying"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    depot.import_dir(folder, "acme/lying")
    api = HfApi(endpoint=node.url)
    assert api.model_info("acme/lying").safetensors is None
    assert {m.id: m.safetensors for m in api.list_models(expand=["safetensors"])}["acme/lying"] is None
    with pytest.raises(InvalidInputError, match="tensor 't' has"):
        depot.load("acme/lying", engine="safetensors")


def test_auth_check_says_whether_the_request_may_read_the_repo(depot: Depot, tmp_path: Path) -> None:
    """`HfApi.auth_check` got a bare 404 ("no route") for a repo anyone could read."""
    depot.import_dir(write_model_dir(tmp_path / "public", {"config.json": b"{}"}), SAMPLE)
    depot.import_dir(
        write_model_dir(tmp_path / "secret", {"config.json": b"{}"}), "acme/secret", private=True
    )
    node = LiveNode(depot, control_token="t0ken")  # (a node without a token: its control token reads all)
    try:
        anonymous, holder = HfApi(endpoint=node.url, token=False), HfApi(endpoint=node.url, token="t0ken")
        anonymous.auth_check(SAMPLE)
        anonymous.auth_check("ACME/sample")
        holder.auth_check("acme/secret")
        for api, repo in ((anonymous, "acme/secret"), (holder, "acme/missing")):
            with pytest.raises(RepositoryNotFoundError):
                api.auth_check(repo)
        with pytest.raises(HfHubHTTPError) as refused:
            holder.auth_check(SAMPLE, write=True)
        assert refused.value.response.status_code == 403 and "read-only" in str(refused.value)
    finally:
        node.stop()


def test_a_cache_holding_the_hubs_xet_listing_is_told_how_to_download_from_a_node(
    node: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub with hf_xet asks for a Xet token, without a HEAD, for a file its cache's listing of the
    commit (trees/<commit>.json, written from the Hub) gives a Xet hash: a user who pointed HF_ENDPOINT at a
    node with the cache they had failed with "this node has no route" (an explorer's trial). The answer
    says why, and the way out works."""
    from huggingface_hub import _tree_cache, constants
    from huggingface_hub.errors import HfHubHTTPError

    pytest.importorskip("hf_xet")  # (huggingface_hub's own dependency: the client that asks)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    cache = tmp_path / "hf"
    snapshot_download(SAMPLE, endpoint=node.url, cache_dir=cache, allow_patterns=["*.json"])
    (listing,) = cache.glob("models--*/trees/*.json")
    written = json.loads(listing.read_text())
    written["files"]["model.safetensors"]["xet_hash"] = "a" * 64  # (what the Hub's listing gives)
    listing.write_text(json.dumps(written))
    monkeypatch.setattr(_tree_cache, "_IN_MEMORY_TREE_CACHE", {})  # (as in a new client process)
    with pytest.raises(HfHubHTTPError) as refused:
        snapshot_download(SAMPLE, endpoint=node.url, cache_dir=cache)
    said = str(refused.value)
    assert "not Xet" in said and "HF_HUB_DISABLE_XET=1" in said and f"trees/{listing.stem}.json" in said, said
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    folder = snapshot_download(SAMPLE, endpoint=node.url, cache_dir=cache)
    assert read_tree(Path(folder)) == sample_files()


def test_a_file_is_named_in_its_answer_as_the_hub_names_it(
    node: LiveNode, depot: Depot, tmp_path: Path
) -> None:
    """A resolve answer had no Content-Disposition: `wget --content-disposition` and `curl -OJ` of a
    `?download=true` link (the Hub's pages give those) saved "model.safetensors?download=true", and a name
    with a space as "file%20with%20space.txt" (an explorer's trial)."""
    depot.import_dir(
        write_model_dir(tmp_path / "names", {"sub dir/a b.txt": b"hi", "é.txt": b"e"}), "acme/names"
    )
    base = f"{node.url}/{SAMPLE}/resolve/main/onnx/model_q4.onnx"
    for query, kind in (("", "inline"), ("?download=true", "attachment")):
        for method in ("HEAD", "GET"):
            answer = requests.request(method, base + query, timeout=30, allow_redirects=False)
            assert answer.headers["Content-Disposition"] == (
                f"{kind}; filename*=UTF-8''model_q4.onnx; filename=\"model_q4.onnx\""
            ), (method, answer.status_code)
    unicode = requests.head(f"{node.url}/acme/names/resolve/main/%C3%A9.txt", timeout=30)
    # (RFC 6266: the UTF-8 name, and an ASCII one for clients that read no other, curl among them)
    assert unicode.headers["Content-Disposition"] == "inline; filename*=UTF-8''%C3%A9.txt; filename=\"_.txt\""
    assert disposed_name(unicode.headers["Content-Disposition"]) == "é.txt"
    spaced = f"{node.url}/acme/names/resolve/main/sub%20dir/a%20b.txt?download=true"
    assert disposed_name(requests.head(spaced, timeout=30).headers["Content-Disposition"]) == "a b.txt"
    if shutil.which("curl"):  # (what users save such links with; not on every machine)
        saved = tmp_path / "saved"
        saved.mkdir()
        for url in (f"{base}?download=true", spaced):
            subprocess.run(["curl", "-sSfLOJ", url], cwd=saved, check=True, timeout=60)
        assert sorted(p.name for p in saved.iterdir()) == ["a b.txt", "model_q4.onnx"]
        assert (saved / "model_q4.onnx").read_bytes() == sample_files()["onnx/model_q4.onnx"]


def disposed_name(header: str) -> str | None:
    """The file name a client that reads RFC 2231/6266 takes from ``header`` (the stdlib's MIME parser)."""
    message = email.message.EmailMessage()
    message["Content-Disposition"] = header
    return message.get_filename()


def test_a_listing_gives_no_parameters_of_a_revision_held_in_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model info never says a sum of part for a revision held in part: the upstream's figure of the whole
    commit, as its scan said it (review 41), or none; the listing asked for it summed the one shard held (it
    read the held files as the commit's: a review)."""
    import numpy as np
    from safetensors.numpy import save

    from conftest import hub_path_depot, serving_repo

    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    files = {"config.json": b"{}", "model.safetensors.index.json": json.dumps({"weight_map": weight_map}).encode(),
             "model-00001-of-00002.safetensors": save({"a": np.zeros((3, 4), np.float32)}),
             "model-00002-of-00002.safetensors": save({"b": np.zeros(1000, np.float32)})}  # fmt: skip
    with (
        serving_repo(tmp_path, files, "acme/sharded") as upstream,
        hub_path_depot(tmp_path / "local", upstream.url, monkeypatch) as local,
    ):
        local.pull("acme/sharded", include=["*.json", "model-00001-*"])
        node = LiveNode(local)
        try:
            api = HfApi(endpoint=node.url)
            said = api.model_info("acme/sharded", expand=["safetensors"]).safetensors
            assert said is not None and said.total == 12 + 1000, said  # (the whole commit's, not 12)
            [listed] = [m for m in api.list_models(expand=["safetensors"]) if m.id == "acme/sharded"]
            assert listed.safetensors is None, listed.safetensors
        finally:
            node.stop()
