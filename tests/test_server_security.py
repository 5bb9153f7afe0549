"""The node as an attacker and a browser meet it: traversal, tokens, private repos, limits, CORS, no xet."""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

import pytest

import modeldepot
from conftest import LiveNode, sample_files, write_model_dir
from controlnodes import Reply
from modeldepot import Depot
from modeldepot.enginekeys import engine_key
from modeldepot.hub.manifest import RemoteFile, manifest_body
from modeldepot.server import create_app

REPO = "acme/tiny"
HIDDEN = "acme/hidden"
TOKEN = "s3cret"
SECRET = b"modeldepot-sentinel-9f2c4e1a7b: this file lies outside the store"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def call(
    node: LiveNode, method: str, target: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> Reply:
    """One request sent exactly as given (no normalising, no re-encoding) on a fresh connection; a redirect
    to the node itself (a branch's LFS file to its commit's URL) is followed, with the same headers, as
    huggingface_hub follows it."""
    reply = _call_once(node, method, target, headers, body)
    location = reply.headers.get("Location", "")
    if reply.status == 302 and location and "//" not in location:  # (relative: to the node itself)
        followed = urljoin(target, location)
        assert (
            reply.headers.get("X-Repo-Commit") and f"/resolve/{reply.headers['X-Repo-Commit']}/" in followed
        )
        return _call_once(node, method, followed, headers, body)
    return reply


def _call_once(
    node: LiveNode, method: str, target: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def raw_exchange(port: int, request: bytes) -> bytes:
    """Bytes on the wire, for requests http.client refuses to send; the node closes after answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock, sock.makefile("rb") as answer:
        sock.sendall(request)
        return answer.read()


def assert_leaks_nothing(reply: Reply) -> None:
    assert SECRET not in reply.body
    assert b"SQLite format 3" not in reply.body and b"root:x:0:0" not in reply.body
    assert b"Traceback" not in reply.body and b'File "' not in reply.body
    assert str(Path(modeldepot.__file__).parent).encode() not in reply.body


def assert_refused(reply: Reply, head: bool = False) -> None:
    assert reply.status in (400, 404), (reply.status, reply.body[:200])
    assert_leaks_nothing(reply)
    assert reply.headers["X-Error-Message"] and (head or "error" in reply.json())


@pytest.fixture
def node(depot: Depot, live_node: LiveNode, model_dir: Path) -> LiveNode:
    """A node without a token over REPO, with a sentinel file planted beside and inside the store."""
    depot.import_dir(model_dir, REPO)
    for place in (depot.home.parent / "secret.txt", depot.home / "secret.txt"):
        place.write_bytes(SECRET)
    return live_node


@pytest.fixture
def guarded(depot: Depot, node: LiveNode) -> Iterator[LiveNode]:
    """A node started with a token."""
    node = LiveNode(depot, token=TOKEN)
    call(node, "GET", "/api/depot/v1/health")  # absorbs the once-per-process 500 (test_first_request_...)
    yield node
    node.stop()


# -- traversal -----------------------------------------------------------------------------------------

PATH_ATTACKS = [
    "..", "../secret.txt", "../../secret.txt", "../../../../../../secret.txt", "onnx/../../secret.txt",
    "%2e%2e", "%2e%2e/secret.txt", "%2e%2e%2fsecret.txt", "%2E%2E%2Fsecret.txt", ".%2e/secret.txt",
    "%2E%2E%2F%2E%2E%2Fsecret.txt", "%2e./secret.txt", "onnx/%2e%2e/%2e%2e/secret.txt", "%252e%252e/secret.txt",
    "%252e%252e%252fsecret.txt", "%25252e%25252e%25252fsecret.txt", "..%2f..%2fsecret.txt",
    "..%2f..%2fetc%2fpasswd", "../../../../../../../../etc/passwd", "%00", "config.json%00",
    "config.json%00.txt", "%00/../secret.txt", "%5c", "..%5csecret.txt", "..%5c..%5csecret.txt",
    "%5c%5c..%5csecret.txt", "/etc/passwd", "%2fetc%2fpasswd", "//etc/passwd", "a" * 5000, "x/" * 2000 + "x",
    "../index.db", "../../../index.db", "index.db", "..%2findex.db", ".", "onnx/./model_q4.onnx", "onnx//x",
]  # fmt: skip
REV_ATTACKS = [
    "a..b", "..", "%2e%2e", "%2E%2E%2F%2E%2E", "main%2f..%2f..", "%252e%252e", "a%00b", "%00", "main%00",
    "..%5c..", "%5cmain", "x" * 5000, ".hidden", "main.lock", "refs%2f..%2fmain", "%2fmain",
]  # fmt: skip
REPO_ATTACKS = [
    "../tiny", "acme/..", "%2e%2e/%2e%2e", "acme/tiny.git", "ac--me/tiny", "-acme/tiny", "acme%00/tiny",
    "acme%5c../tiny", "a" * 200 + "/tiny", "acme/%252e%252e", "acme/.tiny",
]  # fmt: skip


def test_path_traversal_corpus_is_refused_on_every_route(node: LiveNode, depot: Depot) -> None:
    absolute = str(depot.home.parent / "secret.txt")
    for attack in [*PATH_ATTACKS, absolute.lstrip("/"), absolute, quote(absolute, safe="")]:
        for target in (
            f"/{REPO}/resolve/main/{attack}",
            f"/api/models/{REPO}/tree/main/{attack}",
            f"/api/depot/v1/blobs/{attack}",
            f"/api/depot/v1/blobs/{attack}/chunks/0",
        ):
            assert_refused(call(node, "GET", target))
        assert_refused(call(node, "HEAD", f"/{REPO}/resolve/main/{attack}"), head=True)
        form = b"paths=%s" % attack.encode()
        paths_info = call(node, "POST", f"/api/models/{REPO}/paths-info/main", FORM, form)
        assert_leaks_nothing(paths_info)
        assert paths_info.status == 400 or paths_info.json() == [], (attack, paths_info.body[:200])


def test_bad_revisions_and_repo_ids_are_refused(node: LiveNode) -> None:
    targets = []
    for rev in REV_ATTACKS:
        targets += [f"/{REPO}/resolve/{rev}/config.json", f"/api/models/{REPO}/tree/{rev}",
                    f"/api/models/{REPO}/revision/{rev}", f"POST /api/models/{REPO}/paths-info/{rev}",
                    f"/api/depot/v1/repos/{REPO}/revisions/{rev}/manifest"]  # fmt: skip
    for repo in REPO_ATTACKS:
        targets += [f"/api/models/{repo}", f"/api/models/{repo}/tree/main", f"/api/models/{repo}/refs",
                    f"/{repo}/resolve/main/config.json", f"POST /api/models/{repo}/paths-info/main",
                    f"/api/depot/v1/repos/{repo}/revisions/main/manifest"]  # fmt: skip
    for target in targets:
        if target.startswith("POST "):
            assert_refused(call(node, "POST", target[5:], FORM, b"paths=config.json"))
        else:
            assert_refused(call(node, "GET", target))


def test_links_planted_in_a_snapshot_are_never_followed(node: LiveNode, depot: Depot) -> None:
    snapshot = depot.snapshot_path(REPO)
    secret = depot.home.parent / "secret.txt"
    (snapshot / "planted.txt").symlink_to(secret)
    (snapshot / "onnx" / "escape").symlink_to(depot.home.parent, target_is_directory=True)
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(secret)
    for target in (f"/{REPO}/resolve/main/planted.txt", f"/{REPO}/resolve/main/onnx/escape/secret.txt"):
        reply = call(node, "GET", target)
        assert reply.status == 404 and reply.headers["X-Error-Code"] == "EntryNotFound"
        assert_leaks_nothing(reply)
    served = call(node, "GET", f"/{REPO}/resolve/main/config.json")  # the index names the blob, not the link
    assert served.status == 200 and served.body == sample_files()["config.json"]
    listing = call(node, "GET", f"/api/models/{REPO}/tree/main?recursive=true")
    files = {e["path"] for e in listing.json() if e["type"] == "file"}
    assert files == set(sample_files())
    form = b"paths=planted.txt&paths=onnx/escape"
    info = call(node, "POST", f"/api/models/{REPO}/paths-info/main", FORM, form)
    assert info.json() == []
    for reply in (listing, info, call(node, "GET", f"/api/models/{REPO}/tree/main/onnx/escape")):
        assert_leaks_nothing(reply)


# -- token and private repos ---------------------------------------------------------------------------


def record_scan(depot: Depot, repo: str) -> None:
    """Save a manifest for ``repo`` as a scan of an upstream holding the same files would."""
    files = [
        RemoteFile(f.path, f.size, f.git_oid, f.sha256 if f.lfs else None) for f in depot.list_files(repo)
    ]
    commit_id = depot.resolve(repo)
    info = {"private": depot.store.repo_private(repo)}
    depot.store.manifests.save(
        repo, "main", commit_id, manifest_body(repo, "main", commit_id, "http://up", info, files), {}
    )


def route_requests(depot: Depot, repo: str, path: str, folder: str) -> list[tuple[str, str]]:
    """One concrete (method, target) for every route the app registers, names filled in from ``repo``
    (which gets a saved scan, so its manifest route answers). The event stream never ends: it has its
    own test below."""
    record_scan(depot, repo)
    org, name = repo.split("/")
    sha = depot.file_info(repo, path).sha256
    values = {"org": org, "name": name, "rev": "main", "sha256": sha, "index": "0"}
    requests = []
    for resource in create_app(depot).router.resources():
        if (resource.name or "").startswith("refused"):
            continue  # what the node refuses on purpose (datasets, writes): test_server_hub checks those
        if (resource.name or "").startswith(("control-", "dashboard-")):
            continue  # the control routes and the dashboard's files: tests/test_control_routes.py
        values["path"] = folder if "/tree/" in resource.canonical else path
        target = re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: values[m[1]], resource.canonical)
        if target != "/api/depot/v1/events":
            requests += [(route.method, target) for route in resource]
    return requests


def test_the_event_stream_needs_the_token_too(guarded: LiveNode) -> None:
    for headers, status in (({}, 401), ({"Authorization": f"Bearer {TOKEN}"}, 200)):
        connection = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=30)
        try:
            connection.request("GET", "/api/depot/v1/events", headers=headers)
            response = connection.getresponse()
            assert response.status == status
            if status == 200:
                assert response.getheader("Content-Type", "").startswith("text/event-stream")
        finally:
            connection.close()


def send(node: LiveNode, method: str, target: str, headers: dict[str, str]) -> Reply:
    post = method == "POST"
    body = f"paths={target.split('/')[-1]}&paths=config.json".encode() if post else None
    return call(node, method, target, {**headers, **(FORM if post else {})}, body)


WRONG_CREDENTIALS = ("Bearer wrong", "Bearer s3cret2", "Bearer S3CRET", "s3cret", "Basic czNjcmV0", "Bearer ",
                     "Token s3cret")  # fmt: skip


def test_token_guards_every_route_but_health(guarded: LiveNode, depot: Depot) -> None:
    requests = route_requests(depot, REPO, "config.json", "onnx")
    assert len(requests) >= 2 * 14  # GET and HEAD of every route, and the paths-info POST
    for method, target in requests:
        if target == "/api/depot/v1/health":
            assert send(guarded, method, target, {}).status == 200
            continue
        bare = send(guarded, method, target, {})
        assert bare.status == 401 and bare.headers["X-Error-Message"], (method, target)
        for value in WRONG_CREDENTIALS:
            reply = send(guarded, method, target, {"Authorization": value})
            assert reply.status == 401, (method, target, value)
            assert reply.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
            if method != "HEAD":
                assert reply.json() == {"error": "Invalid credentials in Authorization header"}
        assert send(guarded, method, target, {"Authorization": f"Bearer {TOKEN}"}).status == 200, target


FIRST_REQUEST = """
import sys, urllib.request
sys.path.insert(0, sys.argv[1])
from conftest import LiveNode
from modeldepot import Depot
with Depot(sys.argv[2] + "/store") as depot:
    node = LiveNode(depot, token="s3cret")
    try:
        print(urllib.request.urlopen(node.url + "/api/depot/v1/health").status)
    finally:
        node.stop()
"""


def test_first_request_to_a_token_node_survives_warnings_as_errors(tmp_path: Path) -> None:
    """The suite runs with filterwarnings=error; a fresh process must not turn a warning into a 500."""
    argv = [sys.executable, "-W", "error", "-c", FIRST_REQUEST, str(Path(__file__).parent), str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip() == "200", done.stderr[-3000:]


def test_undecodable_bytes_are_refused_not_crashes(node: LiveNode, guarded: LiveNode) -> None:
    request = b"GET /api/depot/v1/info HTTP/1.1\r\nHost: n\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
    for value in (b"Bearer \xff\xfe", b"Bearer \xe9", b"\xff s3cret"):
        answer = raw_exchange(guarded.port, request % value)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:120]
    form = b"paths=\xff\xfe&paths=config.json"
    reply = call(node, "POST", f"/api/models/{REPO}/paths-info/main", FORM, form)
    assert reply.status == 400, reply.body


@pytest.fixture
def hidden(depot: Depot, node: LiveNode, tmp_path: Path) -> dict[str, bytes]:
    """A private repo sharing one blob (config.json) with the public REPO."""
    files = {"config.json": sample_files()["config.json"], "weights.bin": b"private" * 999, "sub/a": b"x"}
    depot.import_dir(write_model_dir(tmp_path / "hidden", files), HIDDEN, private=True)
    return files


def test_private_repos_are_invisible_without_a_token(node: LiveNode, hidden: dict[str, bytes]) -> None:
    depot = node.depot
    private_sha = depot.file_info(HIDDEN, "weights.bin").sha256
    for method, target in route_requests(depot, HIDDEN, "weights.bin", "sub"):
        if HIDDEN in target:
            reply = send(node, method, target, {})
            absent = send(node, method, target.replace(HIDDEN, "acme/nope"), {})
            assert reply.status == absent.status == 404, target
            assert reply.headers["X-Error-Code"] == absent.headers["X-Error-Code"] == "RepoNotFound"
            assert hidden["weights.bin"][:32] not in reply.body
            # A case variant is answered as an absent repo is, named as typed: the store's spelling told that
            # it was there, and how it is spelled (a security trial)
            variant = HIDDEN.swapcase()
            guessed = send(node, method, target.replace(HIDDEN, variant), {})
            assert guessed.status == 404 and guessed.headers["X-Error-Code"] == "RepoNotFound", target
            assert (
                HIDDEN not in guessed.headers.get("X-Error-Message", "")
                and HIDDEN.encode() not in guessed.body
            )
    for target in (f"/api/depot/v1/blobs/{private_sha}", f"/api/depot/v1/blobs/{private_sha}/chunks/0"):
        assert call(node, "GET", target).status == 404
        assert call(node, "HEAD", target).status == 404
    assert [r["repo_id"] for r in call(node, "GET", "/api/depot/v1/repos").json()] == [REPO]
    listed = {b["sha256"] for b in call(node, "GET", "/api/depot/v1/inventory").json()["blobs"]}
    shared = depot.file_info(HIDDEN, "config.json").sha256
    assert private_sha not in listed and shared in listed
    public_copy = call(node, "GET", f"/api/depot/v1/blobs/{shared}")  # the public repo uses it too
    assert public_copy.status == 200 and public_copy.body == hidden["config.json"]


def test_private_repos_are_served_with_the_token(guarded: LiveNode, hidden: dict[str, bytes]) -> None:
    depot = guarded.depot
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for method, target in route_requests(depot, HIDDEN, "weights.bin", "sub"):
        reply = send(guarded, method, target, auth)
        assert reply.status == 200, (method, target, reply.body[:200])
    assert call(guarded, "GET", f"/{HIDDEN}/resolve/main/weights.bin", auth).body == hidden["weights.bin"]
    assert call(guarded, "GET", f"/api/models/{HIDDEN}", auth).json()["private"] is True
    repos = {r["repo_id"]: r for r in call(guarded, "GET", "/api/depot/v1/repos", auth).json()}
    assert repos[HIDDEN]["private"] is True and REPO in repos
    listed = {b["sha256"] for b in call(guarded, "GET", "/api/depot/v1/inventory", auth).json()["blobs"]}
    assert depot.file_info(HIDDEN, "weights.bin").sha256 in listed


def store_figures(depot: Depot, repos: list[str]) -> tuple[int, int, int, int]:
    """(repos, blobs, blob bytes, logical bytes) of ``repos`` alone, from their file lists."""
    files = [f for repo in repos for f in depot.list_files(repo)]
    blobs = {f.sha256: f.size for f in files}
    return len(repos), len(blobs), sum(blobs.values()), sum(f.size for f in files)


def test_stats_without_the_token_count_public_repos_alone(
    node: LiveNode, guarded: LiveNode, hidden: dict[str, bytes], tmp_path: Path
) -> None:
    depot = node.depot
    gone = "acme/gone"  # private, used, then removed: its access counts stay in the index
    depot.import_dir(write_model_dir(tmp_path / "gone", {"x.bin": b"gone" * 99}), gone, private=True)
    uses = [(REPO, "model.safetensors"), (HIDDEN, "weights.bin"), (HIDDEN, "weights.bin"), (gone, "x.bin")]
    for repo, path in uses:
        depot.get_file(repo, path).release()  # each counts a use
    depot.remove(gone)
    for repo in (REPO, HIDDEN):
        depot.preloader.preload(repo)
        depot.engines.get_or_load(engine_key(depot.store, repo, depot.resolve(repo), "config.json", "test"), object,
                                  size=1)  # fmt: skip
    private_sha = depot.file_info(HIDDEN, "weights.bin").sha256

    public = call(node, "GET", "/api/depot/v1/stats")
    assert public.status == 200, public.body
    for secret in (HIDDEN, gone, private_sha):
        assert secret.encode() not in public.body, secret
    stats = public.json()
    assert (stats["repos"], stats["blobs"], stats["blob_bytes"], stats["logical_bytes"]) == store_figures(
        depot, [REPO]
    )
    preload = stats["preload"]
    assert [m["repo_id"] for m in preload["models"]] == [REPO]
    assert preload["ram_bytes"] == preload["models"][0]["resident_bytes"]
    assert preload["hits"] is None and preload["avg_load_seconds_cold"] is None  # node-wide: withheld
    assert [(a["repo_id"], a["count"]) for a in stats["most_accessed"]] == [(REPO, 1)]
    assert stats["engines"]["cached_models"] == 1 and stats["engines"]["total_hits"] is None

    auth = {"Authorization": f"Bearer {TOKEN}"}
    full = call(guarded, "GET", "/api/depot/v1/stats", auth).json()
    assert (full["repos"], full["blobs"], full["blob_bytes"], full["logical_bytes"]) == store_figures(
        depot, [REPO, HIDDEN]
    )
    assert full["blobs"] > stats["blobs"] and full["logical_bytes"] > stats["logical_bytes"]
    assert sorted(m["repo_id"] for m in full["preload"]["models"]) == [HIDDEN, REPO]
    # (not the removed repo: "the most used" named a repo the disk budget had just evicted, a trial)
    assert {a["repo_id"]: a["count"] for a in full["most_accessed"]} == {HIDDEN: 2, REPO: 1}
    assert full["engines"]["cached_models"] == 2 and full["engines"]["total_misses"] == 2
    assert isinstance(full["preload"]["hits"], int)


# -- limits --------------------------------------------------------------------------------------------


HEADER_REQUEST = b"GET /api/depot/v1/health HTTP/1.1\r\nHost: n\r\nX: %s\r\nConnection: close\r\n\r\n"


def test_body_and_header_limits(node: LiveNode) -> None:
    big = call(node, "POST", f"/api/models/{REPO}/paths-info/main", FORM, b"paths=" + b"a" * (1 << 20))
    assert big.status == 413 and "error" in big.json()
    assert raw_exchange(node.port, HEADER_REQUEST % (b"a" * 12 * 1024)).startswith(b"HTTP/1.1 200 ")
    refused = raw_exchange(node.port, HEADER_REQUEST % (b"a" * 17 * 1024))
    assert refused.split(b"\r\n")[0].split(b" ")[1] == b"400" and b"Traceback" not in refused


MALFORMED_RANGES = [  # (and one past the end: 416)
    "bytes=abc", "bytes=5-2", "items=0-1", "bytes=0-1,3-4", "bytes=99999999999999999999999-",
    "bytes=", "bytes=-", "bytes 0-1", "=0-1", "bytes=0-1-2", "bytes=--1", "bytes=0x10-", "bytes=\t1-2x",
    "bytes=1 2-3",
]  # fmt: skip
HUGE_WHOLE_RANGES = ["bytes=-99999999999999999999999", "bytes=0-99999999999999999999999"]  # the whole file


def test_range_headers_never_break_a_download(node: LiveNode, depot: Depot) -> None:
    for path in ("model.safetensors", "config.json", "empty.txt"):
        data = sample_files()[path]
        size = len(data)
        sha = depot.file_info(REPO, path).sha256
        for target in (f"/{REPO}/resolve/main/{path}", f"/api/depot/v1/blobs/{sha}"):
            # The Hub's routes send an empty file whole, its size in Content-Range, whatever range is asked
            # (huggingface.js asks every file for bytes=0-0 and takes a 416 for a failure).
            empty_whole = size == 0 and "/resolve/" in target
            for value in MALFORMED_RANGES:
                reply = call(node, "GET", target, {"Range": value})
                assert reply.status in (200, 416), (target, value, reply.status)
                if reply.status == 200:
                    assert reply.body == data
                    assert reply.headers.get("Content-Range") == ("bytes */0" if empty_whole else None)
                else:
                    assert not empty_whole and reply.headers["Content-Range"] == f"bytes */{size}"
            for value in (f"bytes={size}-", f"bytes={size}-{size + 10}", f"bytes={size + 7}-", "bytes=-0"):
                reply = call(node, "GET", target, {"Range": value})
                assert reply.status == (200 if empty_whole else 416), (target, value, reply.status)
                assert reply.headers["Content-Range"] == f"bytes */{size}" and reply.body == b""
                if not empty_whole:  # (a HEAD says the answer's length as the GET does: none)
                    head = call(node, "HEAD", target, {"Range": value})
                    assert (head.status, head.headers.get("Content-Length")) == (416, "0"), (target, value)
            for value in HUGE_WHOLE_RANGES if size else ():
                reply = call(node, "GET", target, {"Range": value})
                assert (reply.status, reply.body) == (206, data), (target, value, reply.status)
                assert reply.headers["Content-Range"] == f"bytes 0-{size - 1}/{size}"
            if size:
                first = call(node, "GET", target, {"Range": "bytes=0-0"})
                assert first.status == 206 and first.body == data[:1]
                assert first.headers["Content-Range"] == f"bytes 0-0/{size}"


# -- errors, CORS, xet ---------------------------------------------------------------------------------


def test_errors_are_json_and_never_leak_internals(node: LiveNode, depot: Depot) -> None:
    sha = depot.file_info(REPO, "model.safetensors").sha256
    for target in ("/nope", "/api/depot/v1/nope", "/api/depot/v2/info", "/api/datasets/acme/x", f"/{REPO}"):
        reply = call(node, "GET", target)
        assert reply.status == 404 and reply.headers["Content-Type"].startswith("application/json")
        assert "error" in reply.json()
    for method, target in (("POST", "/api/depot/v1/info"), ("DELETE", f"/{REPO}/resolve/main/config.json"),
                           ("PUT", f"/api/models/{REPO}/paths-info/main"), ("POST", f"/api/models/{REPO}"),
                           ("PATCH", f"/api/depot/v1/blobs/{sha}")):  # fmt: skip
        reply = call(node, method, target)
        assert reply.status == 405 and "error" in reply.json() and reply.headers["Allow"]
    provoking = [call(node, "GET", f"/api/depot/v1/blobs/{sha}/chunks/{i}") for i in ("%C2%B2", "9" * 5000)]
    provoking += [call(node, "POST", f"/api/models/{REPO}/paths-info/main", FORM, b"paths=\xff"),
                  call(node, "GET", "/api/depot/v1/inventory?limit=" + "9" * 5000),
                  call(node, "GET", f"/api/models/{REPO}/tree/main?cursor=-1"),
                  call(node, "GET", "/api/models/acme/nope/refs")]  # fmt: skip
    for reply in provoking:
        assert reply.status >= 400
        assert_leaks_nothing(reply)
        assert str(depot.home).encode() not in reply.body
        assert set(reply.json()) == {"error"}


def listed(reply: Reply, header: str) -> set[str]:
    return {item.strip().lower() for item in reply.headers.get(header, "").split(",")}


EXPOSED = {"x-repo-commit", "etag", "content-range", "x-error-code"}
PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET",
             "Access-Control-Request-Headers": "authorization, range"}  # fmt: skip


def test_cors_headers_on_every_kind_of_answer(node: LiveNode, guarded: LiveNode, depot: Depot) -> None:
    sha = depot.file_info(REPO, "model.safetensors").sha256
    replies = [
        call(node, "GET", f"/api/models/{REPO}"),
        call(node, "GET", f"/{REPO}/resolve/main/model.safetensors", {"Range": "bytes=0-9"}),
        call(node, "HEAD", f"/{REPO}/resolve/main/model.safetensors"),
        call(node, "GET", f"/api/depot/v1/blobs/{sha}", {"Range": "bytes=-0"}),
        call(node, "GET", f"/{REPO}/resolve/main/missing.bin"),
        call(node, "POST", "/api/depot/v1/info"),
        call(guarded, "GET", f"/api/models/{REPO}"),
    ]
    assert [r.status for r in replies] == [200, 206, 200, 416, 404, 405, 401]
    for reply in replies:
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        assert listed(reply, "Access-Control-Expose-Headers") >= EXPOSED
        # (a file answer is application/octet-stream: no browser sniffs a README or a JSON into a page)
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
    for target_node in (node, guarded):  # preflights carry no credentials, even to a node with a token
        preflight = call(target_node, "OPTIONS", f"/{REPO}/resolve/main/config.json", PREFLIGHT)
        assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert {"get", "head", "post"} <= listed(preflight, "Access-Control-Allow-Methods")
        assert {"authorization", "range", "if-none-match"} <= listed(
            preflight, "Access-Control-Allow-Headers"
        )


def json_keys(value: Any) -> Iterator[str]:
    """Every key of every object nested anywhere in a JSON value."""
    if isinstance(value, dict):
        yield from value
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from json_keys(item)


def test_no_xet_anywhere(node: LiveNode) -> None:
    every_path = "&".join(f"paths={p}" for p in [*sample_files(), "onnx"])
    json_replies = [
        call(node, "GET", f"/api/models/{REPO}?blobs=true"),
        call(node, "GET", f"/api/models/{REPO}/revision/main?blobs=True&expand=xetEnabled"),
        call(node, "GET", f"/api/models/{REPO}/tree/main?recursive=true&expand=true"),
        call(node, "GET", f"/api/models/{REPO}/tree/main/onnx?expand=True"),
        call(node, "POST", f"/api/models/{REPO}/paths-info/main", FORM, f"{every_path}&expand=true".encode()),
    ]
    keys = [k for reply in json_replies for k in json_keys(reply.json())]
    assert "lfs" in keys and "siblings" in keys and "lastCommit" in keys  # the listings are not empty
    assert not [k for k in keys if "xet" in k.lower()]
    file_replies = [
        call(node, method, f"/{REPO}/resolve/main/{path}")
        for method in ("HEAD", "GET")
        for path in ("model.safetensors", "config.json", "onnx/model_q4.onnx_data")
    ]
    for reply in json_replies + file_replies:
        assert reply.status == 200
        assert not [name for name in reply.headers if name.lower().startswith("x-xet")]
        assert not [v for v in reply.headers.get_all("Link") or [] if "xet" in v.lower()]


def test_a_cards_control_characters_and_overlong_tags_are_not_served_and_the_repo_pulls_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A README's front matter went to every Hub client as the repo's tags, pipeline tag and library with
    its terminal escapes, and a 300-character tag too; every other modeldepot refused the repo as "invalid"
    from that node, so it could be pulled through none (a security trial). A card's names are labels, as
    an upstream's must be; the rest of it stays."""
    import requests

    front = ('---\nlicense: "mit\\e]0;PWNED\\a"\ntags:\n- "a\\e[2Jb"\n- ok-tag\n- "' + "x" * 300 + '"\n'
             'pipeline_tag: "text\\e[5mblink"\nlibrary_name: transformers\nlanguage: [en, "f\\er"]\n'
             'model-index: [{name: "any \\e text"}]\n---\nhello\n')  # fmt: skip
    files = {"README.md": front.encode(), "config.json": b"{}"}
    with Depot(tmp_path / "store") as depot:
        depot.import_dir(write_model_dir(tmp_path / "m", files), "acme/esc")
        node = LiveNode(depot)
        try:
            info = requests.get(f"{node.url}/api/models/acme/esc", timeout=30).json()
            assert info["tags"] == ["ok-tag", "transformers", "en"], info["tags"]
            assert "pipeline_tag" not in info and info["library_name"] == "transformers"
            assert info["cardData"]["model-index"] == [
                {"name": "any \x1b text"}
            ]  # (JSON, escaped on the wire)
            monkeypatch.setenv("HF_ENDPOINT", node.url)
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            with Depot(tmp_path / "other") as other:
                assert other.pull("acme/esc").files == len(files)
        finally:
            node.stop()
