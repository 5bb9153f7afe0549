"""The node's own API, /api/depot/v1, over a live node: info, repos, manifests, blobs, chunks, inventory."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import blake3
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import modeldepot
from conftest import SMALL_CHUNK, LiveNode, flip_byte, sample_files, write_model_dir
from modeldepot import Depot
from modeldepot._version import build_id, node_version
from modeldepot.errors import StoreError
from modeldepot.server import create_app
from modeldepot.server.openapi import openapi_document

API = "/api/depot/v1"
REPOS = {"acme/tiny": sample_files(0), "acme/other": sample_files(1, big=200_000)}
BLOBS = {hashlib.sha256(data).hexdigest(): data for files in REPOS.values() for data in files.values()}
CAPABILITIES = {"hub-api", "blobs", "chunks", "ranges", "inventory"}


class Reply:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(node: LiveNode, target: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    try:
        connection.request(method, target, headers=headers or {})
        return Reply(connection.getresponse())
    finally:
        connection.close()


def chunks_of(data: bytes, chunk_size: int = SMALL_CHUNK) -> list[bytes]:
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LiveNode]:
    """An empty node on loopback that plays the Hub: what the fuzzing asks the node to pull (POST
    /api/depot/v1/pulls) is scanned there and not found (404); nothing ever leaves the machine."""
    with Depot(tmp_path / "hub-store") as empty:
        node = LiveNode(empty)
        yield node
        node.stop()


@pytest.fixture
def depot(home: Path, hub: LiveNode, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    """conftest's depot, online towards ``hub`` alone (offline, every pull would be a 503)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with Depot(home, chunk_size=SMALL_CHUNK) as d:
        yield d


CONTROL = "fuzz-control-token"  # the node's control token: the fuzzing reaches the control routes' bodies
CONTROL_HEADERS = {"Authorization": f"Bearer {CONTROL}"}  # (a tokenless node's reads ignore it)


@pytest.fixture
def node(depot: Depot, tmp_path: Path) -> Iterator[LiveNode]:
    for repo_id, files in REPOS.items():
        depot.import_dir(write_model_dir(tmp_path / repo_id, files), repo_id)
    live = LiveNode(depot, control_token=CONTROL)
    yield live
    live.stop()


def test_info_health_and_stats(node: LiveNode, depot: Depot) -> None:
    info = fetch(node, f"{API}/info").json()
    assert info["id"] == depot.node_id == fetch(node, f"{API}/info").json()["id"]  # the node's, stable
    assert info["version"] == node_version() == f"{modeldepot.__version__}+{build_id()}"
    assert info["chunk_size"] == depot.chunk_size == SMALL_CHUNK
    assert set(info["capabilities"]) >= CAPABILITIES
    assert fetch(node, f"{API}/health").json() == {"status": "ok"}
    stats = fetch(node, f"{API}/stats").json()
    assert (stats["repos"], stats["blobs"]) == (2, len(BLOBS))
    assert stats["blob_bytes"] == sum(map(len, BLOBS.values()))
    assert stats["logical_bytes"] == sum(len(d) for files in REPOS.values() for d in files.values())
    assert stats["uptime_seconds"] >= 0


def test_repos_lists_each_repo_with_its_refs(node: LiveNode, depot: Depot) -> None:
    listed = fetch(node, f"{API}/repos").json()
    assert [r["repo_id"] for r in listed] == sorted(REPOS)
    for summary in listed:
        files = REPOS[summary["repo_id"]]
        assert summary["refs"] == {"main": depot.resolve(summary["repo_id"])}
        assert (summary["files"], summary["size"], summary["private"]) == (
            len(files),
            sum(map(len, files.values())),
            False,
        )


def test_the_repo_list_answers_304_while_the_index_stands_and_its_change_at_once(
    depot: Depot, tmp_path: Path
) -> None:
    # (The dashboard polls it every 2 s: unchanged, it is neither read, encoded nor sent again.)
    depot.import_dir(write_model_dir(tmp_path / "pub", sample_files(0)), "acme/public")
    depot.import_dir(write_model_dir(tmp_path / "priv", sample_files(1)), "acme/secret", private=True)
    live = LiveNode(depot, control_token="control-token")  # (reads open; private repos behind the token)
    try:
        token = {"Authorization": "Bearer control-token"}
        public, everything = fetch(live, f"{API}/repos"), fetch(live, f"{API}/repos", token)
        assert [r["repo_id"] for r in public.json()] == ["acme/public"]
        assert [r["repo_id"] for r in everything.json()] == ["acme/public", "acme/secret"]
        assert public.headers["ETag"] != everything.headers["ETag"], (
            "one tag per view: the token's holds more"
        )
        again = fetch(live, f"{API}/repos", {"If-None-Match": public.headers["ETag"]})
        assert (again.status, again.body, again.headers["ETag"]) == (304, b"", public.headers["ETag"])
        depot.store.access.record("acme/public")  # (a write to the index that changes nothing listed)
        depot.store.access.flush()
        unchanged = fetch(live, f"{API}/repos", {"If-None-Match": public.headers["ETag"]})
        assert unchanged.status == 304, "a list that stands keeps its tag, whatever else the index recorded"
        # A tokenless client that kept the token's tag is not told its (private) list still stands.
        taken = fetch(live, f"{API}/repos", {"If-None-Match": everything.headers["ETag"]})
        assert taken.status == 200 and [r["repo_id"] for r in taken.json()] == ["acme/public"]
        depot.import_dir(write_model_dir(tmp_path / "new", sample_files(2)), "acme/newer")
        changed = fetch(live, f"{API}/repos", {"If-None-Match": public.headers["ETag"]})
        assert changed.status == 200 and changed.headers["ETag"] != public.headers["ETag"]
        assert [r["repo_id"] for r in changed.json()] == ["acme/newer", "acme/public"]
        models = fetch(live, "/api/models").json()  # (the Hub's listing reads the same kept list)
        assert sorted(m["id"] for m in models) == ["acme/newer", "acme/public"]
        depot.remove("acme/newer")
        assert [r["repo_id"] for r in fetch(live, f"{API}/repos").json()] == ["acme/public"]
        assert [m["id"] for m in fetch(live, "/api/models").json()] == ["acme/public"]
    finally:
        live.stop()


def test_manifest_lists_every_file_with_its_chunk_digests(node: LiveNode, depot: Depot) -> None:
    for repo_id, files in REPOS.items():
        commit = depot.resolve(repo_id)
        manifest = fetch(node, f"{API}/repos/{repo_id}/revisions/main/manifest").json()
        assert fetch(node, f"{API}/repos/{repo_id}/revisions/{commit}/manifest").json() == manifest
        assert (manifest["repo_id"], manifest["commit_id"], manifest["private"]) == (repo_id, commit, False)
        assert {f["path"] for f in manifest["files"]} == set(files)
        for entry in manifest["files"]:
            data = files[entry["path"]]
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            assert (entry["size"], entry["chunk_size"]) == (len(data), SMALL_CHUNK)
            assert entry["chunks"] == [blake3.blake3(chunk).hexdigest() for chunk in chunks_of(data)]
            assert entry["etag"] == (entry["sha256"] if entry["lfs"] else entry["git_oid"])
    for target, code in (
        (f"{API}/repos/acme/tiny/revisions/nope/manifest", "RevisionNotFound"),
        (f"{API}/repos/acme/tiny/revisions/{'0' * 40}/manifest", "RevisionNotFound"),
        (f"{API}/repos/acme/nope/revisions/main/manifest", "RepoNotFound"),
    ):
        reply = fetch(node, target)
        assert reply.status == 404 and reply.headers["X-Error-Code"] == code


def test_a_manifest_answers_304_while_the_commit_stands_and_its_change_at_once(
    node: LiveNode, depot: Depot
) -> None:
    # (A mirror or a peer pulling a commit's files one by one asks for its manifest at every file.)
    target = f"{API}/repos/acme/other/revisions/{depot.resolve('acme/other')}/manifest"
    first = fetch(node, target)
    tag = first.headers["ETag"]
    again = fetch(node, target, {"If-None-Match": tag})
    assert (again.status, again.body, again.headers["ETag"]) == (304, b"", tag)
    depot.store.access.record("acme/other")  # (a write to the index that changes nothing the manifest says)
    depot.store.access.flush()
    assert fetch(node, target, {"If-None-Match": tag}).status == 304
    assert fetch(node, f"{API}/repos/acme/tiny/revisions/main/manifest", {"If-None-Match": tag}).status == 200
    depot.remove("acme/other", quant="q4")  # (the commit stands; the store holds less of it)
    changed = fetch(node, target, {"If-None-Match": tag})
    assert changed.status == 200 and changed.headers["ETag"] != tag
    assert {f["path"] for f in changed.json()["files"]} == {f["path"] for f in first.json()["files"]} - {
        "onnx/model_q4.onnx",
        "onnx/model_q4.onnx_data",
    }


def test_blob_reads_whole_by_range_and_by_if_range(node: LiveNode) -> None:
    for sha, data in BLOBS.items():
        size = len(data)
        whole = fetch(node, f"{API}/blobs/{sha}")
        assert whole.status == 200 and whole.body == data
        assert whole.headers["ETag"] == f'"{sha}"' and whole.headers["X-Chunk-Size"] == str(SMALL_CHUNK)
        assert whole.headers["Accept-Ranges"] == "bytes"
        head = fetch(node, f"{API}/blobs/{sha}", method="HEAD")
        assert head.status == 200 and head.body == b"" and head.headers["Content-Length"] == str(size)
        for value in ("bytes=-0", f"bytes={size}-{size + 5}"):
            unsatisfiable = fetch(node, f"{API}/blobs/{sha}", {"Range": value})
            assert unsatisfiable.status == 416 and unsatisfiable.headers["Content-Range"] == f"bytes */{size}"
        if size < 20:
            continue
        for value, start, end in (
            ("bytes=0-0", 0, 0),
            ("bytes=10-19", 10, 19),
            ("bytes=-7", size - 7, size - 1),
            (f"bytes={size - 3}-", size - 3, size - 1),
            (f"bytes=5-{size * 2}", 5, size - 1),
        ):
            part = fetch(node, f"{API}/blobs/{sha}", {"Range": value})
            assert part.status == 206 and part.body == data[start : end + 1], value
            assert part.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        same = fetch(node, f"{API}/blobs/{sha}", {"Range": "bytes=1-2", "If-Range": f'"{sha}"'})
        assert same.status == 206 and same.body == data[1:3]
        other = fetch(node, f"{API}/blobs/{sha}", {"Range": "bytes=1-2", "If-Range": '"stale"'})
        assert other.status == 200 and other.body == data
        upper = fetch(node, f"{API}/blobs/{sha}", {"Range": "BYTES=1-2"})  # (units are case-insensitive)
        assert upper.status == 206 and upper.body == data[1:3]
        for held in (f'"{sha}"', f'"stale", W/"{sha}"', "*"):  # the client holds these bytes: a 304
            unchanged = fetch(node, f"{API}/blobs/{sha}", {"If-None-Match": held})
            assert (
                unchanged.status == 304 and unchanged.body == b"" and unchanged.headers["ETag"] == f'"{sha}"'
            )
        changed = fetch(node, f"{API}/blobs/{sha}", {"If-None-Match": '"stale"'})
        assert changed.status == 200 and changed.body == data


def test_chunk_reads_carry_their_blake3(node: LiveNode) -> None:
    manifest = fetch(node, f"{API}/repos/acme/tiny/revisions/main/manifest").json()
    digests = {f["sha256"]: f["chunks"] for f in manifest["files"]}
    for sha, data in BLOBS.items():
        pieces = chunks_of(data)
        for index, piece in enumerate(pieces):
            reply = fetch(node, f"{API}/blobs/{sha}/chunks/{index}")
            assert reply.status == 200 and reply.body == piece
            assert reply.headers["X-Chunk-Blake3"] == blake3.blake3(reply.body).hexdigest()
            assert reply.headers["ETag"] == f'"{reply.headers["X-Chunk-Blake3"]}"'
            assert sha not in digests or digests[sha][index] == reply.headers["X-Chunk-Blake3"]
        for index in (len(pieces), len(pieces) + 1, 10**6):
            assert fetch(node, f"{API}/blobs/{sha}/chunks/{index}").status == 400
    for bad in ("A" * 64, "a" * 63, "a" * 65, "g" * 64, "..", "%2e%2e", "-1"):
        assert fetch(node, f"{API}/blobs/{bad}").status == 400
        assert fetch(node, f"{API}/blobs/{bad}/chunks/0").status == 400
    unknown = hashlib.sha256(b"not in the store").hexdigest()
    for target in (f"{API}/blobs/{unknown}", f"{API}/blobs/{unknown}/chunks/0"):
        assert fetch(node, target).status == 404 and fetch(node, target, method="HEAD").status == 404


def test_chunk_index_must_be_a_decimal_number(node: LiveNode) -> None:
    sha = hashlib.sha256(REPOS["acme/tiny"]["model.safetensors"]).hexdigest()
    for index in ("x", "-1", "1.5", "0x1", "%20", "1e3", "%C2%B2", "%D9%A3", "9" * 5000):
        reply = fetch(node, f"{API}/blobs/{sha}/chunks/{index}")
        assert reply.status == 400, (index[:12], reply.status)  # ² is a digit to str.isdigit, not to int()


def test_a_corrupted_chunk_is_never_served(node: LiveNode, depot: Depot) -> None:
    data = REPOS["acme/tiny"]["model.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    flip_byte(depot.store.blobs.path(sha), SMALL_CHUNK + 100)
    corrupt = bytearray(chunks_of(data)[1])
    corrupt[100] ^= 0xFF
    reply = fetch(node, f"{API}/blobs/{sha}/chunks/1")
    assert reply.status == 503, reply.status
    assert bytes(corrupt) not in reply.body and reply.json()["error"]
    assert fetch(node, f"{API}/blobs/{sha}/chunks/0").status == 503  # quarantined as a whole
    listed = {b["sha256"] for b in fetch(node, f"{API}/inventory").json()["blobs"]}
    assert sha not in listed and len(listed) == len(BLOBS) - 1


def test_inventory_pages_list_every_blob_exactly_once(node: LiveNode) -> None:
    seen: list[dict[str, Any]] = []
    target: str | None = f"{API}/inventory?limit=2"
    while target is not None:
        page = fetch(node, target).json()
        assert len(page["blobs"]) <= 2
        seen += page["blobs"]
        if "next" not in page:
            break
        following = urlsplit(page["next"])
        assert following.path == f"{API}/inventory"
        assert parse_qs(following.query) == {"limit": ["2"], "after": [page["blobs"][-1]["sha256"]]}
        target = f"{following.path}?{following.query}"
    shas = [b["sha256"] for b in seen]
    assert shas == sorted(BLOBS) and len(set(shas)) == len(shas)
    assert all(b["size"] == len(BLOBS[b["sha256"]]) and b["chunk_size"] == SMALL_CHUNK for b in seen)
    assert fetch(node, f"{API}/inventory?after={'f' * 64}").json() == {"blobs": []}
    for limit in ("0", "1001", "x", "-5", "2.5"):
        assert fetch(node, f"{API}/inventory?limit={limit}").status == 400


def status_of(node: LiveNode, target: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """GET ``target``: its status, X-Error-Code and JSON error (a stream's body is never read: an event
    stream answered 200 does not end)."""
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    try:
        connection.request("GET", target, headers=headers or {})
        response = connection.getresponse()
        code = response.getheader("X-Error-Code", "")
        if response.getheader("Content-Type", "").startswith("text/event-stream"):
            return response.status, code, ""
        body = response.read()
        return response.status, code, json.loads(body).get("error", "") if response.status >= 400 else ""
    finally:
        connection.close()


def test_every_route_refuses_a_query_parameter_it_does_not_take(node: LiveNode) -> None:
    """Every route of /api/depot/v1 answered 200 to `?x=1` (only the control routes and a repo's saved scan
    refused it), as if the parameter meant nothing: `inventory?afer=…` listed from the start. Each GET the
    document lists (the control ones with the control token) refuses one, and names it."""
    document = openapi_document(modeldepot.__version__)
    sha = hashlib.sha256(REPOS["acme/tiny"]["model.safetensors"]).hexdigest()
    values = {"org": "acme", "name": "tiny", "rev": "main", "sha256": sha, "index": "0", "id": "nope"}
    routes = [path for path, item in document["paths"].items() if "get" in item and path.startswith(API)]
    assert len(routes) >= 15, routes
    for path in routes:
        target = re.sub(r"\{(\w+)\}", lambda m: values[m[1]], path)
        takes = [
            p["name"] for p in document["paths"][path]["get"].get("parameters", []) if p["in"] == "query"
        ]
        unknown = [("x=1", "x"), ("revision=main", "revision"), ("Flag", "Flag")]
        if takes:  # (beside one it takes)
            unknown.append((f"{takes[-1]}=1&zz=1", "zz"))
        for query, named in unknown:
            if named in takes:
                continue
            status, code, error = status_of(node, f"{target}?{query}", CONTROL_HEADERS)
            assert (status, code) == (400, "BadRequest"), (target, query, status, error)
            assert error.startswith(f"unknown query parameter {named!r}: this route takes "), (target, error)
            assert all(name in error for name in takes), (target, error)
        status, _, error = status_of(node, target, CONTROL_HEADERS)  # (and without one, as before)
        assert status in (200, 404), (target, status, error)  # (404: the pull id no pull has)


def test_inventory_refuses_a_bad_after_and_a_parameter_given_twice(node: LiveNode) -> None:
    """`after` of 200 characters that are not hex was taken (the document says at most 64), one in capitals
    paged silently wrong (digests compare as lowercase text), and `limit=5&limit=abc` took the first."""
    for after in ("z" * 200, "0" * 65, "A" * 64, "abcg", "%2E%2E", "%00", "%20ab", "0x1f"):
        status, code, error = status_of(node, f"{API}/inventory?after={after}")
        assert (status, code) == (400, "BadRequest") and error.startswith("after: "), (after, status, error)
    for limit in ("+5", "%205", "5_0", "%D9%A5", "9" * 30):
        status, _, error = status_of(node, f"{API}/inventory?limit={limit}")
        assert status == 400 and error.startswith("limit: "), (limit, status, error)
    for query in (
        "limit=5&limit=abc",
        "limit=5&limit=5",
        f"after={'0' * 64}&after=",
        "after=&after=&limit=2",
    ):
        status, _, error = status_of(node, f"{API}/inventory?{query}")
        name = query.split("=")[0]
        assert (status, error) == (400, f"{name}: give this query parameter once"), (query, status, error)
    shas = sorted(BLOBS)
    for after, expected in (("", shas), ("0", shas), (shas[0], shas[1:]), (shas[0][:10], shas),
                            ("f" * 64, [])):  # fmt: skip
        page = fetch(node, f"{API}/inventory?after={after}&limit=1000").json()
        assert [b["sha256"] for b in page["blobs"]] == expected, after
    assert fetch(node, f"{API}/inventory?limit=0001").json()["next"].endswith(f"after={shas[0]}")


def test_openapi_document_is_valid_and_covers_every_native_route(node: LiveNode, depot: Depot) -> None:
    document = fetch(node, f"{API}/openapi.json").json()
    assert document["openapi"].startswith("3.1.") and document["info"]["version"] == modeldepot.__version__
    schemathesis.openapi.from_dict(document).validate()  # against the OpenAPI 3.1 meta-schema
    with pytest.raises(Exception, match="paths"):  # the validation can fail: a broken copy does
        schemathesis.openapi.from_dict({**document, "paths": []}).validate()
    schemas = document["components"]["schemas"]
    refs = re.findall(r'"\$ref": "#/components/schemas/(\w+)"', json.dumps(document))
    assert refs and all(ref in schemas for ref in refs)
    operation_ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            operation_ids.append(operation["operationId"])
            assert operation["responses"], (method, path)
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), (method, path)
    assert len(operation_ids) == len(set(operation_ids))
    registered = {}
    for resource in create_app(depot).router.resources():
        if resource.canonical.startswith(API):
            methods = {route.method.lower() for route in resource} - {"head"}
            registered[re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", resource.canonical)] = methods
    assert len(registered) >= 9
    undocumented = {
        path for path, methods in registered.items() if not methods <= set(document["paths"].get(path, {}))
    }
    assert not undocumented, undocumented


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]  # fmt: skip
SETTINGS = settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_schemathesis_against_the_document_the_node_serves(node: LiveNode) -> None:
    """Hypothesis strategies (the docs' style) from the schema the node serves: positive and negative data."""
    schema = schemathesis.openapi.from_url(f"{node.url}{API}/openapi.json")
    document = fetch(node, f"{API}/openapi.json").json()
    assert document == openapi_document(modeldepot.__version__)  # what test_schemathesis_operation runs on
    real_sha = hashlib.sha256(REPOS["acme/tiny"]["model.safetensors"]).hexdigest()
    labels = [f"GET {API}/events"]  # an endless stream: tested in test_mirror.py, not here
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == f"{API}/events":
            continue
        labels.append(operation.label)
        negative = "parameters" in document["paths"][operation.path][operation.method.lower()]
        strategies = [operation.as_strategy(mode) for mode in GenerationMode if negative or mode.is_positive]
        if "{" in operation.path:  # once more on names the store holds, so ranges and indexes reach bytes
            real = {"sha256": real_sha} if "{sha256}" in operation.path else {"org": "acme", "name": "tiny"}
            strategies.append(operation.as_strategy(path_parameters=real))
        for strategy in strategies:

            @given(case=strategy)
            @SETTINGS
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(checks=CHECKS, headers=CONTROL_HEADERS)

            check()
    documented = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    assert set(labels) == documented - {f"GET {API}/openapi.json"}  # every operation but the schema's own


SCHEMA = schemathesis.openapi.from_dict(openapi_document(modeldepot.__version__)).exclude(
    path=f"{API}/events"
)


@SCHEMA.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_schemathesis_operation(case: schemathesis.Case, node: LiveNode) -> None:
    """schemathesis' pytest runner (coverage phase: boundaries and edge values) against a live node."""
    case.call_and_validate(base_url=node.url, checks=CHECKS, headers=CONTROL_HEADERS)


def test_open_dashboards_share_one_look_and_hear_when_a_repo_goes(
    depot: Depot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each event stream (an open dashboard) looked at every manifest on its own every half second: ten
    saturated a node of 500 repos. And a removed repo's variants were never said gone: its row stayed on
    the dashboard, "scanned, not in the store yet", every variant "downloaded" (a trial)."""
    import threading
    import time

    for name in ("acme/one", "acme/two"):
        depot.import_dir(
            write_model_dir(tmp_path / name, {"config.json": b"{}", "model.onnx": name.encode()}), name
        )
    looks: list[float] = []
    real, failing = depot.list_manifests, threading.Event()

    def look() -> Any:
        looks.append(time.monotonic())
        if failing.is_set():  # (a busy index: the streams go on with the last look)
            raise StoreError("reading the index: database is locked")
        return real()

    monkeypatch.setattr(depot, "list_manifests", look)
    node = LiveNode(depot)
    events: list[list[tuple[str, dict[str, Any]]]] = [[] for _ in range(4)]
    done = threading.Event()

    def listen(heard: list[tuple[str, dict[str, Any]]]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
        connection.request("GET", "/api/depot/v1/events")
        answer, name = connection.getresponse(), ""
        while not done.is_set():
            line = answer.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                heard.append((name, json.loads(line[6:])))
        connection.close()

    listeners = [threading.Thread(target=listen, args=(heard,), daemon=True) for heard in events]
    try:
        for listener in listeners:
            listener.start()
        deadline = time.monotonic() + 20
        while not all(len(heard) >= 2 for heard in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        start = len(looks)
        time.sleep(2.0)
        assert len(looks) - start <= 1, (  # (and while the index does not change, one each EVENTS_REREAD)
            f"{len(looks) - start} looks in 2 s for 4 streams: one shared look, only when something changed"
        )
        failing.set()
        depot.pin("acme/two")  # (the index changes: a look, which fails)
        failed_from = len(looks)
        deadline_failing = time.monotonic() + 10
        while len(looks) == failed_from and time.monotonic() < deadline_failing:
            time.sleep(0.05)
        assert len(looks) > failed_from, "a look was made while it failed"
        time.sleep(0.6)
        failing.clear()
        depot.remove("acme/one")
        while (
            not all(any(n == "gone" for n, _ in heard) for heard in events)
            and time.monotonic() < deadline + 10
        ):
            time.sleep(0.05)
        for heard in events:
            assert [s for n, s in heard if n == "gone"] == [{"repo_id": "acme/one", "variant": "fp32"}], heard
    finally:
        done.set()
        node.stop()
