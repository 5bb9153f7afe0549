"""The node as an attacker and a browser meet it: traversal, tokens, private repos, limits, CORS, no xet."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

import modeldepot
from conftest import LiveNode, sample_files, write_model_dir
from modeldepot import Depot
from modeldepot.server import create_app

REPO = "acme/tiny"
HIDDEN = "acme/hidden"
TOKEN = "s3cret"
SECRET = b"modeldepot-sentinel-9f2c4e1a7b: this file lies outside the store"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclass(frozen=True)
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    node: LiveNode, method: str, target: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> Reply:
    """One request sent exactly as given (no normalising, no re-encoding) on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def raw_exchange(port: int, request: bytes) -> bytes:
    """Bytes on the wire, for requests http.client refuses to send; the node closes after answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def assert_leaks_nothing(reply: Reply) -> None:
    assert SECRET not in reply.body
    assert b"SQLite format 3" not in reply.body and b"root:x:0:0" not in reply.body
    assert b"Traceback" not in reply.body and b'File "' not in reply.body
    assert str(Path(modeldepot.__file__).parent).encode() not in reply.body


def assert_refused(reply: Reply) -> None:
    assert reply.status in (400, 404), (reply.status, reply.body[:200])
    assert_leaks_nothing(reply)
    assert "error" in reply.json()


@pytest.fixture
def node(depot: Depot, live_node: LiveNode, model_dir: Path) -> LiveNode:
    depot.import_dir(model_dir, REPO)
    for place in (depot.home.parent / "secret.txt", depot.home / "secret.txt"):
        place.write_bytes(SECRET)
    return live_node


@pytest.fixture
def guarded(depot: Depot, model_dir: Path) -> Iterator[LiveNode]:
    """A node started with a token."""
    depot.import_dir(model_dir, REPO)
    node = LiveNode(depot, token=TOKEN)
    yield node
    node.stop()


# -- traversal -----------------------------------------------------------------------------------------

PATH_ATTACKS = [
    "..", "../secret.txt", "../../secret.txt", "../../../../../../secret.txt", "onnx/../../secret.txt",
    "%2e%2e", "%2e%2e/secret.txt", "%2e%2e%2fsecret.txt", "%2E%2E%2Fsecret.txt", "%2E%2E%2F%2E%2E%2Fsecret.txt",
    ".%2e/secret.txt", "%2e./secret.txt", "onnx/%2e%2e/%2e%2e/secret.txt", "%252e%252e/secret.txt",
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
        assert_refused(call(node, "HEAD", f"/{REPO}/resolve/main/{attack}"))
        paths_info = call(node, "POST", f"/api/models/{REPO}/paths-info/main", FORM, b"paths=" + attack.encode())
        assert_leaks_nothing(paths_info)
        assert paths_info.status == 400 or paths_info.json() == [], (attack, paths_info.body[:200])


def test_bad_revisions_and_repo_ids_are_refused(node: LiveNode) -> None:
    targets = []
    for rev in REV_ATTACKS:
        targets += [
            ("GET", f"/{REPO}/resolve/{rev}/config.json"),
            ("GET", f"/api/models/{REPO}/tree/{rev}"),
            ("GET", f"/api/models/{REPO}/revision/{rev}"),
            ("POST", f"/api/models/{REPO}/paths-info/{rev}"),
            ("GET", f"/api/depot/v1/repos/{REPO}/revisions/{rev}/manifest"),
        ]
    for repo in REPO_ATTACKS:
        targets += [
            ("GET", f"/api/models/{repo}"),
            ("GET", f"/api/models/{repo}/tree/main"),
            ("GET", f"/api/models/{repo}/refs"),
            ("GET", f"/{repo}/resolve/main/config.json"),
            ("POST", f"/api/models/{repo}/paths-info/main"),
            ("GET", f"/api/depot/v1/repos/{repo}/revisions/main/manifest"),
        ]
    for method, target in targets:
        body = b"paths=config.json" if method == "POST" else None
        assert_refused(call(node, method, target, FORM if body else None, body))


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
    info = call(node, "POST", f"/api/models/{REPO}/paths-info/main", FORM, b"paths=planted.txt&paths=onnx/escape")
    assert info.json() == []
    for reply in (listing, info, call(node, "GET", f"/api/models/{REPO}/tree/main/onnx/escape")):
        assert_leaks_nothing(reply)


# -- token and private repos ---------------------------------------------------------------------------


def route_requests(depot: Depot, repo: str, path: str) -> list[tuple[str, str]]:
    """One concrete (method, target) for every route the app registers, names filled in from ``repo``."""
    entry = depot.file_info(repo, path)
    org, name = repo.split("/")
    values = {"org": org, "name": name, "rev": "main", "path": path, "sha256": entry.sha256, "index": "0"}
    requests = []
    for resource in create_app(depot).router.resources():
        target = re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: values[m[1]], resource.canonical)
        requests += [(route.method, target) for route in resource]
    return requests


def send(node: LiveNode, method: str, target: str, headers: dict[str, str]) -> Reply:
    post = method == "POST"
    body = f"paths={target.split('/')[-1]}&paths=config.json".encode() if post else None
    return call(node, method, target, {**headers, **(FORM if post else {})}, body)


def test_token_guards_every_route_but_health(guarded: LiveNode, depot: Depot) -> None:
    requests = route_requests(depot, REPO, "config.json")
    assert len(requests) >= 2 * 14  # GET and HEAD of every route, and the paths-info POST
    wrong = ["Bearer wrong", "Bearer s3cret2", "Bearer S3CRET", "s3cret", "Basic czNjcmV0", "Bearer ", "Token s3cret"]
    for method, target in requests:
        if target == "/api/depot/v1/health":
            assert send(guarded, method, target, {}).status == 200
            continue
        bare = send(guarded, method, target, {})
        assert bare.status == 401 and bare.headers["X-Error-Message"], (method, target)
        for value in wrong:
            reply = send(guarded, method, target, {"Authorization": value})
            assert reply.status == 401, (method, target, value)
            assert reply.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
            if method != "HEAD":
                assert reply.json() == {"error": "Invalid credentials in Authorization header"}
        assert send(guarded, method, target, {"Authorization": f"Bearer {TOKEN}"}).status == 200, target


def test_undecodable_authorization_header_is_a_401_not_a_crash(guarded: LiveNode) -> None:
    for value in (b"Bearer \xff\xfe", b"Bearer \xe9", b"\xff s3cret"):
        request = b"GET /api/depot/v1/info HTTP/1.1\r\nHost: node\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
        answer = raw_exchange(guarded.port, request % value)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:120]


@pytest.fixture
def hidden(depot: Depot, model_dir: Path, tmp_path: Path) -> dict[str, bytes]:
    """A private repo sharing one blob (config.json) with the public REPO."""
    depot.import_dir(model_dir, REPO)
    files = {"config.json": sample_files()["config.json"], "weights.bin": b"private weights " * 999, "sub/a.txt": b"x"}
    depot.import_dir(write_model_dir(tmp_path / "hidden", files), HIDDEN, private=True)
    return files


def test_private_repos_are_invisible_without_a_token(live_node: LiveNode, depot: Depot, hidden: dict[str, bytes]) -> None:
    private_sha = depot.file_info(HIDDEN, "weights.bin").sha256
    for method, target in route_requests(depot, HIDDEN, "weights.bin"):
        if HIDDEN in target:
            reply, absent = send(live_node, method, target, {}), send(live_node, method, target.replace(HIDDEN, "acme/nope"), {})
            assert reply.status == absent.status == 404, target
            assert reply.headers["X-Error-Code"] == absent.headers["X-Error-Code"] == "RepoNotFound"
            assert hidden["weights.bin"][:32] not in reply.body
    for target in (f"/api/depot/v1/blobs/{private_sha}", f"/api/depot/v1/blobs/{private_sha}/chunks/0"):
        assert call(live_node, "GET", target).status == 404
        assert call(live_node, "HEAD", target).status == 404
    assert [r["repo_id"] for r in call(live_node, "GET", "/api/depot/v1/repos").json()] == [REPO]
    listed = {b["sha256"] for b in call(live_node, "GET", "/api/depot/v1/inventory").json()["blobs"]}
    shared = depot.file_info(HIDDEN, "config.json").sha256
    assert private_sha not in listed and shared in listed
    public_copy = call(live_node, "GET", f"/api/depot/v1/blobs/{shared}")  # the public repo uses it too
    assert public_copy.status == 200 and public_copy.body == hidden["config.json"]


def test_private_repos_are_served_with_the_token(depot: Depot, hidden: dict[str, bytes]) -> None:
    node = LiveNode(depot, token=TOKEN)
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for method, target in route_requests(depot, HIDDEN, "weights.bin"):
            reply = send(node, method, target, auth)
            assert reply.status == 200, (method, target, reply.body[:200])
        assert call(node, "GET", f"/{HIDDEN}/resolve/main/weights.bin", auth).body == hidden["weights.bin"]
        assert call(node, "GET", f"/api/models/{HIDDEN}", auth).json()["private"] is True
        repos = {r["repo_id"]: r for r in call(node, "GET", "/api/depot/v1/repos", auth).json()}
        assert repos[HIDDEN]["private"] is True and REPO in repos
        listed = {b["sha256"] for b in call(node, "GET", "/api/depot/v1/inventory", auth).json()["blobs"]}
        assert depot.file_info(HIDDEN, "weights.bin").sha256 in listed
    finally:
        node.stop()
