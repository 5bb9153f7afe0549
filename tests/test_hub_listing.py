"""Listings, commits, raw files and paths-info as the Hub answers them, through the real huggingface_hub client
(and the real `hf` CLI) and plain HTTP, over loopback sockets."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from aiohttp import web
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from conftest import SMALL_CHUNK, ForwardingProxy, LiveNode, sample_files, write_model_dir
from modeldepot import Depot
from modeldepot.gitobjects import git_blob_oid, lfs_pointer
from modeldepot.hub.manifest import keep_listing
from modeldepot.server import listing
from modeldepot.server.views import iso_time

TOKEN = "s3cret"
BERT, GPT, EMBED, PLAIN, SECRET = (
    "acme/bert-tiny",
    "acme/gpt-small",
    "acme/Onnx-Embedder",
    "acme/plain",
    "acme/secret",
)
LARGE = "other/bert-large"


def card(**fields: object) -> bytes:
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {v}" for v in value)]
        else:
            lines.append(f"{key}: {value}")
    return ("\n".join([*lines, "---", "# A model", ""])).encode()


CONFIG = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 8}
TOKENIZER_CONFIG = {"unk_token": "[UNK]", "mask_token": "[MASK]", "model_max_length": 512}

# repo -> (files, private, created_at, updated_at). Times are set so that every order differs from id order.
REPOS: dict[str, tuple[dict[str, bytes], bool, float, float]] = {
    BERT: (
        {
            **sample_files(1),
            "config.json": json.dumps(CONFIG).encode(),
            "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG).encode(),
            "README.md": card(library_name="transformers", pipeline_tag="fill-mask", license="mit", tags=["bert"]),
        },
        False, 1_600_000_300, 1_700_000_100,
    ),
    GPT: (
        {"config.json": b'{"model_type": "gpt2"}',
         "README.md": card(library_name="transformers", pipeline_tag="text-generation", tags=["gpt"])},
        False, 1_600_000_100, 1_700_000_400,
    ),
    EMBED: (
        {"model.onnx": b"onnx" * 100, "README.md": card(library_name="onnx", pipeline_tag="feature-extraction")},
        False, 1_600_000_400, 1_700_000_300,
    ),
    PLAIN: ({"config.json": b"{}"}, False, 1_600_000_200, 1_700_000_200),
    SECRET: (
        {"config.json": b'{"secret": 1}', "README.md": card(pipeline_tag="fill-mask", tags=["bert"])},
        True, 1_600_000_500, 1_700_000_500,
    ),
    LARGE: (
        {"config.json": b'{"model_type": "bert"}',
         "README.md": card(library_name="transformers", pipeline_tag="fill-mask")},
        False, 1_600_000_000, 1_700_000_000,
    ),
}  # fmt: skip
PUBLIC = sorted(repo for repo, (_, private, _, _) in REPOS.items() if not private)


@pytest.fixture
def catalog(depot: Depot, tmp_path: Path) -> Depot:
    for repo, (files, private, created, updated) in REPOS.items():
        depot.import_dir(write_model_dir(tmp_path / repo, files), repo, private=private)
        with depot.store.index.write() as con:
            con.execute(
                "UPDATE repos SET created_at = ?, updated_at = ? WHERE repo_id = ?", (created, updated, repo)
            )
    return depot


@pytest.fixture
def node(catalog: Depot) -> Iterator[LiveNode]:
    node = LiveNode(catalog)
    yield node
    node.stop()


@pytest.fixture
def token_node(catalog: Depot) -> Iterator[LiveNode]:
    node = LiveNode(catalog, token=TOKEN)
    yield node
    node.stop()


def ids(models: object) -> list[str]:
    return [m.id for m in models]  # type: ignore[attr-defined]


def by(key: int) -> list[str]:
    """The public repos ordered by created (2) or updated (3) time, newest first."""
    return sorted(PUBLIC, key=lambda r: REPOS[r][key], reverse=True)


# -- /api/models ---------------------------------------------------------------------------------------


def test_models_are_filtered_as_the_hub_filters_them(node: LiveNode) -> None:
    api = HfApi(endpoint=node.url, token=False)
    assert sorted(ids(api.list_models())) == PUBLIC  # the private repo is not listed without the token
    assert sorted(ids(api.list_models(author="acme"))) == [r for r in PUBLIC if r.startswith("acme/")]
    assert ids(api.list_models(author="nobody")) == []
    assert sorted(ids(api.list_models(search="BERT"))) == [BERT, LARGE]  # a substring of the id, any case
    assert ids(api.list_models(search="onnx-emb")) == [EMBED]
    assert ids(api.list_models(search="bert", author="other")) == [LARGE]
    # filter: tags, and the library and pipeline tags the Hub counts among them; several must all match
    assert sorted(ids(api.list_models(filter="fill-mask"))) == [BERT, LARGE]
    assert sorted(ids(api.list_models(filter="transformers"))) == [BERT, GPT, LARGE]
    assert ids(api.list_models(filter=["transformers", "bert"])) == [BERT]
    assert ids(api.list_models(filter=["license:mit"])) == [BERT]
    assert ids(api.list_models(filter=["fill-mask", "gpt"])) == []
    assert ids(api.list_models(pipeline_tag="text-generation")) == [GPT]
    assert sorted(ids(api.list_models(gated=False))) == PUBLIC
    assert ids(api.list_models(gated=True)) == []


def test_models_are_sorted_and_directed(node: LiveNode) -> None:
    api = HfApi(endpoint=node.url, token=False)
    assert ids(api.list_models(sort="created_at")) == by(2)  # the Hub sorts descending
    assert ids(api.list_models(sort="last_modified")) == by(3)
    assert ids(api.list_models()) == PUBLIC  # trending first: every score is 0, so ties go by id
    assert ids(api.list_models(sort="downloads")) == PUBLIC
    # huggingface_hub 2.x sends no direction; older clients and scripts send direction=-1 (or 1)
    url = f"{node.url}/api/models"
    for direction, expected in (("-1", by(3)), ("1", by(3)[::-1])):
        answer = requests.get(url, params={"sort": "lastModified", "direction": direction}, timeout=30)
        assert [m["id"] for m in answer.json()] == expected
    answer = requests.get(url, params={"sort": "id", "direction": "1"}, timeout=30)
    assert [m["id"] for m in answer.json()] == PUBLIC
    answer = requests.get(url, params={"sort": "id"}, timeout=30)
    assert [m["id"] for m in answer.json()] == PUBLIC[::-1]
    too_deep = base64.urlsafe_b64encode(b"[" * 4000).decode()  # (Python's JSON parser: a RecursionError)
    huge, infinite = (
        base64.urlsafe_b64encode(key + b', "acme/a"]').decode() for key in (b"[1" + b"0" * 400, b"[Infinity")
    )
    for bad in ({"sort": "stars"}, {"direction": "up"}, {"limit": "0"}, {"limit": "x"}, {"cursor": "!!"},
                {"cursor": too_deep}, {"apps": "ollama"}, {"inference_provider": "all"},
                {"sort": "created_at", "cursor": huge}, {"sort": "created_at", "cursor": infinite}):  # fmt: skip
        answer = requests.get(url, params=bad, timeout=30)
        assert answer.status_code == 400, bad
        assert answer.headers["X-Error-Code"] == "BadRequest"


def test_pages_are_chained_by_link_headers(
    node: LiveNode, catalog: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listing, "LIST_PAGE", 2)
    api = HfApi(endpoint=node.url, token=False)
    assert ids(api.list_models(sort="created_at")) == by(2)  # 5 models: 3 pages followed
    assert ids(api.list_models(sort="created_at", limit=3)) == by(2)[:3]  # across a page, then it stops
    first = requests.get(f"{node.url}/api/models", params={"sort": "id", "direction": "1"}, timeout=30)
    assert [m["id"] for m in first.json()] == PUBLIC[:2]
    assert first.links["next"]["url"].startswith(
        f"{node.url}/api/models?"
    )  # absolute, as huggingface.js wants
    # A model added between two pages: the next page goes on after the last one seen (a cursor, not an
    # offset), so nothing is listed twice.
    catalog.import_dir(write_model_dir(tmp_path / "early", {"config.json": b"{}"}), "aaa/first")
    rest: list[str] = []
    link = first.links.get("next", {}).get("url")
    while link:
        page = requests.get(link, timeout=30)
        rest += [m["id"] for m in page.json()]
        link = page.links.get("next", {}).get("url")
    assert rest == PUBLIC[2:]
    last = requests.get(f"{node.url}/api/models", params={"limit": "1", "search": "gpt"}, timeout=30)
    assert [m["id"] for m in last.json()] == [GPT] and "next" not in last.links


def test_a_host_header_naming_no_host_is_bad_input_where_a_next_link_is_built(node: LiveNode) -> None:
    """The Link to the next page is absolute, made of the Host header: one naming no host was a 500."""
    import socket

    for host in (b"x:99999", b"x:abc"):
        for target in (b"/api/models?limit=1", b"/api/depot/v1/inventory?limit=1"):
            with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
                sock.sendall(
                    b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
                )
                answer = b""
                while block := sock.recv(65536):
                    answer += block
            assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
            assert b"Host header" in answer


class PrefixProxy(ForwardingProxy):
    """A reverse proxy mounting a node under ``prefix``, with the Host header of its upstream, as nginx's
    ``location /models/ { proxy_pass http://127.0.0.1:8980/; }`` does; keeps the paths it forwards."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.upstream, self.forwarded = prefix, "", []
        super().__init__("prefix-proxy")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert request.path.startswith(self.prefix + "/"), request.path
        path = request.raw_path[len(self.prefix) :]
        self.forwarded.append(path.split("?")[0])
        asked = {k: v for k, v in request.headers.items() if k in ("Range", "Authorization", "If-None-Match")}
        async with self.session.request(request.method, self.upstream + path, headers=asked,
                                        allow_redirects=False) as answer:  # fmt: skip
            body = await answer.read()
            # (a redirect's Location as the node sent it, as nginx passes it: proxy_redirect off)
            kept = {k: v for k, v in answer.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}  # fmt: skip
            if request.method == "HEAD":
                return web.Response(status=answer.status, headers=kept)
            return web.Response(status=answer.status, body=body, headers=kept)


def test_the_next_pages_link_points_where_clients_reach_the_node(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a reverse proxy (under a prefix, the Host its upstream's, as nginx's proxy_pass sends it), the
    next page's Link, made of the request, led huggingface_hub past the proxy to the node's own address (over
    TLS, to http). With a public URL (``serve --public-url``) every page is asked through the proxy."""
    for name in ("acme/a", "acme/b", "acme/c"):
        depot.import_dir(write_model_dir(tmp_path / name, {"config.json": b"{}"}), name)
    monkeypatch.setattr(listing, "LIST_PAGE", 1)
    proxy = PrefixProxy("/models")
    node = LiveNode(depot, public_url=f"{proxy.url}/models/")
    proxy.upstream = node.url
    try:
        api = HfApi(endpoint=f"{proxy.url}/models", token=False)
        assert [model.id for model in api.list_models()] == ["acme/a", "acme/b", "acme/c"]
        assert proxy.forwarded == ["/api/models"] * 3
    finally:
        node.stop()
        proxy.stop()


def test_a_file_asked_by_its_branch_is_sent_where_clients_reach_the_node(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An LFS file asked for by a branch redirects to its commit's URL: made from the root, it left the prefix
    a reverse proxy mounts the node under, and every download of weights by branch was a 404 there
    (`hf_hub_download`, `HfFileSystem`, `file_exists`: an explorer's trial). Relative, it stays under it."""
    from huggingface_hub import HfFileSystem

    weights = os.urandom(300_000)
    depot.import_dir(write_model_dir(tmp_path / "m", {"config.json": b"{}", "model.safetensors": weights}),
                     "acme/m")  # fmt: skip
    proxy = PrefixProxy("/models")
    node = LiveNode(depot)
    proxy.upstream = node.url
    try:
        endpoint = f"{proxy.url}/models"
        got = hf_hub_download("acme/m", "model.safetensors", cache_dir=tmp_path / "hf", endpoint=endpoint)
        assert Path(got).read_bytes() == weights
        assert HfApi(endpoint=endpoint, token=False).file_exists("acme/m", "model.safetensors")
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with HfFileSystem(endpoint=endpoint, token=False).open("acme/m/model.safetensors", "rb") as opened:
            assert opened.read(8) == weights[:8]
        commit = depot.resolve("acme/m")
        assert f"/acme/m/resolve/{commit}/model.safetensors" in proxy.forwarded
    finally:
        node.stop()
        proxy.stop()


def test_listed_properties_full_config_card_and_expand(node: LiveNode, catalog: Depot) -> None:
    api = HfApi(endpoint=node.url, token=False)
    [plain] = api.list_models(search="bert-tiny")
    assert plain.siblings is None and plain.sha is None and plain.last_modified is None  # not without full
    assert (
        plain.pipeline_tag == "fill-mask" and plain.library_name == "transformers" and plain.private is False
    )
    assert plain.created_at is not None and plain.created_at.timestamp() == REPOS[BERT][2]
    assert plain.tags == ["bert", "transformers", "safetensors", "onnx", "fill-mask", "license:mit"]
    [full] = api.list_models(search="bert-tiny", full=True)
    assert full.sha == catalog.resolve(BERT) and full.author == "acme" and full.gated is False
    assert full.last_modified is not None and full.last_modified.timestamp() == REPOS[BERT][3]
    assert sorted(s.rfilename for s in full.siblings or []) == sorted(REPOS[BERT][0])
    assert full.config is None and full.card_data is None
    [configured] = api.list_models(search="bert-tiny", fetch_config=True, cardData=True)
    assert configured.config == {
        "architectures": ["BertForMaskedLM"], "model_type": "bert",
        "tokenizer_config": {"unk_token": "[UNK]", "mask_token": "[MASK]"}}  # fmt: skip
    assert configured.card_data is not None and configured.card_data.license == "mit"
    expanded = api.list_models(author="acme", expand=["sha", "siblings", "config"], sort="created_at")
    by_id = {m.id: m for m in expanded}
    assert list(by_id) == [r for r in by(2) if r.startswith("acme/")]
    assert by_id[PLAIN].sha == catalog.resolve(PLAIN) and by_id[PLAIN].config is None  # no model_type there
    assert [s.rfilename for s in by_id[PLAIN].siblings or []] == ["config.json"]
    assert by_id[BERT].config is not None and by_id[BERT].config["model_type"] == "bert"
    assert by_id[BERT].downloads is None and by_id[BERT].pipeline_tag is None  # only what was asked for
    raw = requests.get(f"{node.url}/api/models", params=[("search", "gpt"), ("expand[]", "likes"),
                                                           ("expand[]", "lastModified")], timeout=30)  # fmt: skip
    assert raw.json() == [{"_id": GPT, "id": GPT, "likes": 0, "lastModified": iso_time(REPOS[GPT][3])}]
    unknown = requests.get(f"{node.url}/api/models", params={"expand": "stars"}, timeout=30)
    assert unknown.status_code == 400 and "stars" in unknown.json()["error"]
    info = api.model_info(BERT, expand=["sha", "config", "usedStorage"])  # model info takes expand too
    assert info.sha == catalog.resolve(BERT) and info.siblings is None and info.pipeline_tag is None
    assert info.config is not None and info.config["architectures"] == ["BertForMaskedLM"]
    assert info.used_storage == sum(len(data) for data in REPOS[BERT][0].values())


def test_the_listing_reads_every_repo_in_one_pass(catalog: Depot, tmp_path: Path) -> None:
    catalog.import_dir(write_model_dir(tmp_path / "dev", {"config.json": b'{"dev": 1}'}), BERT, "dev")
    pr = catalog.import_dir(
        write_model_dir(tmp_path / "pr", {"a.txt": b"a", "b.txt": b"b"}), PLAIN, "refs/pr/1"
    )
    summaries = catalog.store.list_repos()
    assert [s.repo_id for s in summaries] == sorted(REPOS)
    bert = next(s for s in summaries if s.repo_id == BERT)
    assert bert.revisions == 2 and set(bert.refs) == {"main", "dev"}
    plain = next(s for s in summaries if s.repo_id == PLAIN)
    assert (
        plain.files == 2 and plain.size == 2 and plain.refs["refs/pr/1"] == pr.commit_id
    )  # newest: the PR's
    assert catalog.store.repo_summary(PLAIN) == plain


def test_private_repos_are_listed_only_with_the_node_token(node: LiveNode, token_node: LiveNode) -> None:
    assert SECRET not in ids(HfApi(endpoint=node.url, token=False).list_models(author="acme"))
    assert SECRET not in ids(HfApi(endpoint=node.url, token=TOKEN).list_models())  # a node without a token
    with pytest.raises(HfHubHTTPError) as refused:
        list(HfApi(endpoint=token_node.url, token=False).list_models())
    assert refused.value.response.status_code == 401
    listed = HfApi(endpoint=token_node.url, token=TOKEN).list_models(filter="bert", full=True)
    by_id = {m.id: m for m in listed}
    assert sorted(by_id) == [BERT, SECRET] and by_id[SECRET].private is True


def test_the_hf_cli_lists_and_describes_models(node: LiveNode, catalog: Depot, tmp_path: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": node.url, "HF_HOME": str(tmp_path / "hf-home"), "NO_COLOR": "1"}
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN"):
        env.pop(name, None)
    hf = str(Path(sys.executable).parent / "hf")

    def run(*args: str) -> str:
        done = subprocess.run([hf, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = json.loads(
        run("models", "ls", "--author", "acme", "--sort", "last_modified", "--format", "json")
    )
    assert [m["id"] for m in listed] == [r for r in by(3) if r.startswith("acme/")]
    human = run("models", "ls", "--search", "bert", "--no-truncate")
    assert BERT in human and LARGE in human and GPT not in human
    info = json.loads(run("models", "info", BERT, "--revision", "HEAD", "--format", "json"))
    assert info["id"] == BERT and info["sha"] == catalog.resolve(BERT)
    assert sorted(s["rfilename"] for s in info["siblings"]) == sorted(REPOS[BERT][0])


# -- HEAD and commits ------------------------------------------------------------------------------------


@pytest.fixture
def history(depot: Depot, tmp_path: Path) -> dict[str, str]:
    """Five revisions of one repo, imported to main, dev, main, main, dev at known times; and a pull
    request."""
    commits = {}
    for step, (branch, when) in enumerate(
        (("main", 1000.0), ("dev", 1500.0), ("main", 2000.0), ("main", 3000.0), ("dev", 4000.0))
    ):
        folder = write_model_dir(tmp_path / f"r{step}", {"config.json": json.dumps({"step": step}).encode()})
        commits[f"r{step}"] = commit = depot.import_dir(folder, "acme/history", branch).commit_id
        with depot.store.index.write() as con:
            con.execute("UPDATE revisions SET created_at = ? WHERE commit_id = ?", (when, commit))
    pr = write_model_dir(tmp_path / "pr", {"config.json": b'{"pr": 1}'})
    commits["pr"] = depot.import_dir(pr, "acme/history", "refs/pr/1").commit_id  # now: the newest of all
    return commits


def test_head_names_the_default_branch(node: LiveNode, catalog: Depot, tmp_path: Path) -> None:
    api = HfApi(endpoint=node.url, token=False)
    main = catalog.resolve(BERT)
    catalog.import_dir(write_model_dir(tmp_path / "dev", {"config.json": b'{"dev": 1}'}), BERT, "dev")
    assert api.model_info(BERT, revision="HEAD").sha == main
    assert api.list_repo_files(BERT, revision="HEAD") == sorted(REPOS[BERT][0])
    assert [i.path for i in api.get_paths_info(BERT, ["config.json"], revision="HEAD")] == ["config.json"]
    path = hf_hub_download(BERT, "config.json", revision="HEAD", endpoint=node.url, cache_dir=tmp_path / "hf")
    assert Path(path).read_bytes() == REPOS[BERT][0]["config.json"] and Path(path).parent.name == main
    raw = requests.get(f"{node.url}/{BERT}/raw/HEAD/config.json", timeout=30)
    assert raw.content == REPOS[BERT][0]["config.json"] and raw.headers["X-Repo-Commit"] == main
    assert [c.commit_id for c in api.list_repo_commits(BERT, revision="HEAD")] == [main]


def test_a_repo_without_a_main_branch_is_described_as_it_is_listed(
    node: LiveNode, catalog: Depot, tmp_path: Path
) -> None:
    """Imported with ``-r dev`` only, a repo was listed (with the sha of its newest revision) while
    model_info and repo_exists of it failed: "Invalid rev id: main"."""
    catalog.import_dir(write_model_dir(tmp_path / "devonly", {"config.json": b"{}"}), "acme/devonly", "dev")
    api = HfApi(endpoint=node.url, token=False)
    listed = next(m for m in api.list_models(author="acme", full=True) if m.id == "acme/devonly")
    assert listed.sha == catalog.resolve("acme/devonly", "dev")
    assert api.repo_exists("acme/devonly") and api.model_info("acme/devonly").sha == listed.sha
    with pytest.raises(RevisionNotFoundError):  # (main named: it is not there)
        api.model_info("acme/devonly", revision="main")


def test_commits_list_the_revisions_from_the_one_named(
    depot: Depot, history: dict[str, str], live_node: LiveNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A branch's commits are its history: an import's parent is its branch's head (main listed dev's
    commits, and dev main's, by the time they came: a trial)."""
    api = HfApi(endpoint=live_node.url, token=False)
    r0, d0, r1, r2, d1 = (history[f"r{i}"] for i in range(5))
    main = api.list_repo_commits("acme/history")
    assert [c.commit_id for c in main] == [r2, r1, r0]  # newest first, main's alone
    assert [c.created_at.timestamp() for c in main] == [3000.0, 2000.0, 1000.0]
    assert all(
        c.title == "modeldepot import" and c.authors == ["modeldepot"] and c.message == "" for c in main
    )
    assert [c.commit_id for c in api.list_repo_commits("acme/history", revision="dev")] == [d1, d0]
    assert [c.commit_id for c in api.list_repo_commits("acme/history", revision=r1)] == [r1, r0]
    by_pr = api.list_repo_commits("acme/history", revision="refs/pr/1")
    assert [c.commit_id for c in by_pr] == [history["pr"]]  # (a branch of its own: a root)
    formatted = api.list_repo_commits("acme/history", formatted=True)
    assert [c.formatted_title for c in formatted] == ["modeldepot import"] * 3
    # Pages: `limit` and `p` as the Hub takes them, chained by Link, counted by X-Total-Count
    url = f"{live_node.url}/api/models/acme/history/commits/main"
    first = requests.get(url, params={"limit": "2"}, timeout=30)
    assert [c["id"] for c in first.json()] == [r2, r1] and first.headers["X-Total-Count"] == "3"
    second = requests.get(first.links["next"]["url"], timeout=30)
    assert "p=1" in first.links["next"]["url"] and [c["id"] for c in second.json()] == [r0]
    assert "next" not in second.links and second.headers["X-Total-Count"] == "3"
    unencoded = requests.get(f"{live_node.url}/api/models/acme/history/commits/refs/pr/1", timeout=30)
    assert [c["id"] for c in unencoded.json()] == [history["pr"]]  # as huggingface.js sends it
    monkeypatch.setattr(listing, "COMMITS_PAGE", 2)  # the client follows the pages
    assert [c.commit_id for c in api.list_repo_commits("acme/history")] == [r2, r1, r0]
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_commits("acme/history", revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_commits("acme/absent")
    for page in (
        "-1",
        "\u00b2",
        "\u0663",
    ):  # (a superscript two and an Arabic-Indic three: str.isdigit takes them)
        assert requests.get(url, params={"p": page}, timeout=30).status_code == 400, page


def test_commits_of_a_private_repo_need_the_token(depot: Depot, tmp_path: Path) -> None:
    depot.import_dir(write_model_dir(tmp_path / "s", {"config.json": b"{}"}), SECRET, private=True)
    node = LiveNode(depot)
    try:
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=node.url, token=False).list_repo_commits(SECRET)
    finally:
        node.stop()
    node = LiveNode(depot, token=TOKEN)
    try:
        commits = HfApi(endpoint=node.url, token=TOKEN).list_repo_commits(SECRET)
        assert [c.commit_id for c in commits] == [depot.resolve(SECRET)]
    finally:
        node.stop()


# -- raw ---------------------------------------------------------------------------------------------------


def test_raw_sends_plain_files_and_lfs_pointers(node: LiveNode, catalog: Depot) -> None:
    base = f"{node.url}/{BERT}/raw/main"
    commit = catalog.resolve(BERT)
    config = REPOS[BERT][0]["config.json"]
    whole = requests.get(f"{base}/config.json", timeout=30)
    assert whole.status_code == 200 and whole.content == config
    assert whole.headers["ETag"] == f'"{git_blob_oid(config)}"' and whole.headers["X-Repo-Commit"] == commit
    part = requests.get(f"{base}/config.json", headers={"Range": "bytes=2-9"}, timeout=30)
    assert part.status_code == 206 and part.content == config[2:10]
    assert part.headers["Content-Range"] == f"bytes 2-9/{len(config)}"
    weights = REPOS[BERT][0]["model.safetensors"]
    pointer = lfs_pointer(hashlib.sha256(weights).hexdigest(), len(weights))
    lfs = requests.get(f"{base}/model.safetensors", timeout=30)
    assert lfs.status_code == 200 and lfs.content == pointer  # not the 300 kB of weights
    assert lfs.content.startswith(b"version https://git-lfs.github.com/spec/v1\noid sha256:")
    assert lfs.headers["ETag"] == f'"{git_blob_oid(pointer)}"'
    assert lfs.headers["ETag"] == f'"{catalog.file_info(BERT, "model.safetensors").git_oid}"'
    assert lfs.headers["X-Repo-Commit"] == commit
    ranged = requests.get(f"{base}/model.safetensors", headers={"Range": "bytes=-10"}, timeout=30)
    assert ranged.status_code == 206 and ranged.content == pointer[-10:]
    other = requests.get(
        f"{base}/model.safetensors", headers={"Range": "bytes=0-3", "If-Range": '"0"'}, timeout=30
    )
    assert other.status_code == 200 and other.content == pointer  # If-Range names another version
    beyond = requests.get(f"{base}/model.safetensors", headers={"Range": "bytes=500-"}, timeout=30)
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{len(pointer)}"
    head = requests.head(f"{base}/model.safetensors", timeout=30)
    assert (
        head.status_code == 200
        and head.headers["Content-Length"] == str(len(pointer))
        and head.content == b""
    )
    head = requests.head(f"{base}/config.json", timeout=30)
    assert (
        head.headers["Content-Length"] == str(len(config)) and head.headers["ETag"] == whole.headers["ETag"]
    )
    missing = requests.get(f"{base}/nope.bin", timeout=30)
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    hidden = requests.get(f"{node.url}/{SECRET}/raw/main/config.json", timeout=30)
    assert hidden.status_code == 404 and hidden.headers["X-Error-Code"] == "RepoNotFound"
    # (a path no file can have is not there, as the Hub answers: 404, nothing read outside the repo)
    outside = requests.get(f"{node.url}/{BERT}/raw/main/..%2Fx", timeout=30)
    assert outside.status_code == 404 and outside.headers["X-Error-Code"] == "EntryNotFound"


def test_raw_on_a_mirror_answers_from_upstream_metadata(
    tmp_path: Path, catalog: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = LiveNode(catalog)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never asked: the upstream node knows the repo
    mirror = LiveNode(
        Depot(tmp_path / "mirror", chunk_size=SMALL_CHUNK, servers=[upstream.url]),
        mirror=True,
        owns_depot=True,
    )
    try:
        weights = REPOS[BERT][0]["model.safetensors"]
        lfs = requests.get(f"{mirror.url}/{BERT}/raw/main/model.safetensors", timeout=30)
        assert lfs.content == lfs_pointer(hashlib.sha256(weights).hexdigest(), len(weights))
        assert lfs.headers["X-Repo-Commit"] == catalog.resolve(BERT)
        assert not mirror.depot.has_file(BERT, "model.safetensors")  # a pointer needs no bytes
        config = requests.get(f"{mirror.url}/{BERT}/raw/main/config.json", timeout=30)
        assert config.content == REPOS[BERT][0]["config.json"]
        assert config.headers["ETag"] == f'"{git_blob_oid(config.content)}"'
    finally:
        mirror.stop()
        mirror.depot.close()
        upstream.stop()


# -- paths-info ----------------------------------------------------------------------------------------------


def test_paths_info_takes_json_and_forms(node: LiveNode, catalog: Depot) -> None:
    url = f"{node.url}/api/models/{BERT}/paths-info/main"
    wanted = ["config.json", "onnx", "model.safetensors", "missing.bin"]
    by_json = requests.post(url, json={"paths": wanted, "expand": True}, timeout=30)
    by_form = requests.post(url, data={"paths": wanted, "expand": "True"}, timeout=30)
    assert by_json.status_code == by_form.status_code == 200
    assert by_json.json() == by_form.json()
    entries = {e["path"]: e for e in by_json.json()}
    assert sorted(entries) == ["config.json", "model.safetensors", "onnx"]
    assert entries["onnx"]["type"] == "directory" and "lastCommit" in entries["config.json"]
    assert entries["model.safetensors"]["lfs"]["oid"] == catalog.file_info(BERT, "model.safetensors").sha256
    plain = requests.post(url, json={"paths": ["config.json"]}, timeout=30).json()
    assert [e["path"] for e in plain] == ["config.json"] and "lastCommit" not in plain[0]
    infos = HfApi(endpoint=node.url, token=False).get_paths_info(BERT, wanted, expand=True)
    assert sorted(i.path for i in infos) == sorted(entries)
    for body in (b"{not json", b'["config.json"]', b'{"paths": "x", "expand": 1', b'{"paths": [1]}',
                 b"\xff\xfe", b"[" * 100_000):  # fmt: skip
        answer = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert answer.status_code == 400, body
    # A path no file can have is left out, as a missing one (one such path failed the whole batch)
    outside = requests.post(url, json={"paths": ["../etc/passwd", "config.json"]}, timeout=30)
    assert outside.status_code == 200 and [e["path"] for e in outside.json()] == ["config.json"]
    traversal = requests.post(url, data={"paths": ["onnx/../../x"]}, timeout=30)
    assert traversal.status_code == 200 and traversal.json() == []
    # A path named many times is answered once (a 1 MB body naming one file 52,000 times was a 12 MB answer
    # built on the event loop); more than the Hub's 1000 paths is a 413 that says so, both ways
    repeated = requests.post(url, json={"paths": ["config.json"] * 5000}, timeout=30)
    assert repeated.status_code == 200 and [e["path"] for e in repeated.json()] == ["config.json"]
    # (exactly 1000 with `expand`, as huggingface_hub sends them: 1001 form fields, aiohttp's cap was 1000)
    at_most = [f"f{i:04d}.txt" for i in range(1000)]
    assert requests.post(url, data={"paths": at_most, "expand": "True"}, timeout=30).status_code == 200
    many = [f"f{i:04d}.txt" for i in range(1001)]
    for sent in ({"json": {"paths": many}}, {"data": {"paths": many}}):
        refused = requests.post(url, timeout=30, **sent)  # type: ignore[arg-type]
        assert refused.status_code == 413 and "at most 1000 paths" in refused.json()["error"], refused.text


def test_a_config_nested_too_deep_to_parse_is_left_out_of_the_listing(depot: Depot, tmp_path: Path) -> None:
    """A repo's config.json is anyone's content: one Python's JSON parser cannot read (100,000 arrays
    deep: a RecursionError) gives a listing without its ``config``, not a 500."""
    files = {"config.json": b"[" * 100_000, "model.onnx": b"x" * 100}
    depot.import_dir(write_model_dir(tmp_path / "deep", files), "acme/deep")
    node = LiveNode(depot)
    try:
        answer = requests.get(
            f"{node.url}/api/models", params={"search": "deep", "expand": "config"}, timeout=30
        )
    finally:
        node.stop()
    assert answer.status_code == 200, answer.text
    assert [(m["id"], m.get("config")) for m in answer.json()] == [("acme/deep", None)]


def test_an_imported_repo_that_loses_a_variant_is_still_listed_whole(tmp_path: Path) -> None:
    """`rm --quant` (or the disk budget evicting a variant) on a repo imported, never scanned: its commit was
    listed with the files left alone, and huggingface_hub, which keeps a commit's listing for good, then
    never fetched the rest even from a node that holds it all. The whole listing is kept before files go."""
    folder = write_model_dir(tmp_path / "ox", {
        "config.json": b"{}", "onnx/model.onnx": b"a" * 300, "onnx/model_fp16.onnx": b"b" * 200,
        "onnx/model_quantized.onnx": b"c" * 100,
    })  # fmt: skip
    quants = write_model_dir(
        tmp_path / "gg", {"model-Q4_K_M.gguf": b"d" * 300, "model-Q8_0.gguf": b"e" * 400}
    )
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        commit = depot.import_dir(folder, "acme/ox").commit_id
        depot.import_dir(quants, "acme/gg")
        whole = {f.path for f in depot.list_files("acme/ox")}
        depot.remove("acme/ox", quant="q8")
        assert "onnx/model_quantized.onnx" not in {f.path for f in depot.list_files("acme/ox")}
        depot.pin("acme/ox")
        assert [e.variant for e in depot.shrink(depot.du().blob_bytes - 300)] == [
            "Q4_K_M"
        ]  # a quant of acme/gg
        assert len(depot.list_files("acme/gg")) == 1
        node = LiveNode(depot)
        try:
            api = HfApi(endpoint=node.url)
            assert {s.rfilename for s in api.model_info("acme/ox", revision=commit).siblings or []} == whole
            assert len(api.model_info("acme/gg").siblings or []) == 2
        finally:
            node.stop()
        status = depot.get_manifest("acme/ox")
        assert {v.name: v.status for v in status.variants}["q8"] == "available"


def test_a_repo_imported_again_keeps_its_status_on_main_and_each_listing_whole(tmp_path: Path) -> None:
    """The listing kept at the first `rm --quant` was the repo's scan for good: its status stayed on that
    commit after an import moved main, and the new commit, losing a quant in turn, was listed in part."""
    files = {"config.json": b"{}", "m-Q4_K_M.gguf": b"q" * 300, "m-Q8_0.gguf": b"e" * 400}
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "one", files), "acme/gg")
        depot.remove("acme/gg", quant="Q8_0")
        moved = depot.import_dir(
            write_model_dir(tmp_path / "two", {**files, "config.json": b'{"a": 1}'}), "acme/gg"
        )
        assert depot.get_manifest("acme/gg").commit_id == moved.commit_id
        depot.remove("acme/gg", quant="Q8_0")
        assert {f.path for f in depot.commit_files("acme/gg", moved.commit_id)} == set(files)
        assert {v.name: v.status for v in depot.get_manifest("acme/gg").variants} == {
            "Q4_K_M": "downloaded", "Q8_0": "available"
        }  # fmt: skip
        first = depot.resolve("acme/gg", moved.commit_id)  # (main) then an older commit loses a file:
        older = next(r.commit_id for r in depot.repo_info("acme/gg").revisions if r.commit_id != first)
        depot.remove("acme/gg", revision=older, quant="Q4_K_M")  # main's kept listing stays
        assert {f.path for f in depot.commit_files("acme/gg", moved.commit_id)} == set(files)
        assert depot.get_manifest("acme/gg").commit_id == moved.commit_id


def test_a_commit_held_in_part_is_listed_whole_after_the_repos_scan_moves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose store pulled one quant of main, then one of dev, listed main's commit as the files it held
    (the repo's one saved scan was dev's by then): `snapshot_download` of main ended "complete" with part of
    it, and huggingface_hub keeps a commit's listing for good (a trial). Each scanned commit's listing is
    kept: main is listed whole, and a whole-repo download of it fails loudly on the file the node lacks."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    files = {"config.json": b"{}", "tokenizer.json": b'{"t": 1}', "m-Q4_K_M.gguf": b"q" * 300,
             "m-Q8_0.gguf": b"e" * 400}  # fmt: skip
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream:
        main = upstream.import_dir(write_model_dir(tmp_path / "main", files), "acme/gg").commit_id
        dev_files = {**files, "config.json": b'{"dev": 1}'}
        dev = upstream.import_dir(write_model_dir(tmp_path / "dev", dev_files), "acme/gg", "dev").commit_id
        hub = LiveNode(upstream)
        try:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK) as local:
                local.pull("acme/gg", "Q4_K_M")
                # (as a store upgraded to schema 10 after that pull: no listing kept; a listing kept now, as
                # before a removal, is the scan's, not the part the store holds: a review)
                with local.store.index.write("forgetting the listings") as con:
                    con.execute("DELETE FROM commit_listings")
                keep_listing(local.store, "acme/gg", main)
                local.pull("acme/gg", "Q8_0", revision="dev")
                assert local.get_manifest("acme/gg").commit_id == dev
                assert {f.path for f in local.commit_files("acme/gg", main)} == set(files)
                node = LiveNode(local)
                try:
                    api = HfApi(endpoint=node.url, token=False)
                    for revision in ("main", main):
                        assert set(api.list_repo_files("acme/gg", revision=revision)) == set(files), revision
                    with pytest.raises(EntryNotFoundError):
                        snapshot_download(
                            "acme/gg", revision=main, cache_dir=tmp_path / "hf", endpoint=node.url
                        )
                    held = snapshot_download("acme/gg", revision=main, cache_dir=tmp_path / "hf2",
                                             endpoint=node.url, allow_patterns=["*Q4_K_M*", "*.json"])  # fmt: skip
                    assert sorted(p.name for p in Path(held).iterdir()) == [
                        "config.json", "m-Q4_K_M.gguf", "tokenizer.json"
                    ]  # fmt: skip
                finally:
                    node.stop()
                local.remove("acme/gg", revision=main)  # (gc lets go of the listing of a commit gone)
                local.gc()
                assert local.store.manifests.listing("acme/gg", main) is None
                assert local.store.manifests.listing("acme/gg", dev) is not None  # (the repo's scan's)
        finally:
            hub.stop()
