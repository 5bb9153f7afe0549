"""The /api/depot/v1 OpenAPI document against what the routes answer: every documented route is called on a
live node (with and without the token), and every answer must match the schema documented for its route and
status, with no key missing and none extra. The document's routes and the app's are the same set."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import modeldepot
from conftest import SMALL_CHUNK, LiveNode, flip_byte, sample_files, write_model_dir, write_partial
from modeldepot import Depot
from modeldepot.server import create_app
from modeldepot.server.control_routes import CONTROL_PATHS
from modeldepot.server.openapi import ComponentSchemas, openapi_document

API = "/api/depot/v1"
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PUBLIC, PRIVATE, PULLED = "acme/tiny", "acme/hidden", "onnx-community/tiny"
UPSTREAM_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b'{"vocab": {"a": 0}}',
    "onnx/model.onnx": bytes(range(256)) * 900,
    "onnx/model_q4f16.onnx": b"q4f16" * 40_000,
    "onnx/model_q4f16.onnx_data": b"data" * 50_000,
}
BIG = sample_files(0)["model.safetensors"]  # several chunks; only PUBLIC holds it
BIG_SHA = hashlib.sha256(BIG).hexdigest()
DOCUMENT_URI = "urn:modeldepot:openapi"


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    events: list[tuple[str, str]]  # (event, data) of a text/event-stream answer: its first event
    etag: str | None = None


def request(node: LiveNode, target: str, headers: dict[str, str] | None = None) -> Reply:
    """GET ``target``; an event stream is read up to its first event, then the connection is dropped."""
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    try:
        connection.request("GET", target, headers=headers or {})
        response = connection.getresponse()
        content_type = response.getheader("Content-Type", "").split(";")[0].strip()
        if content_type != "text/event-stream":
            return Reply(response.status, content_type, response.read(), [], response.getheader("ETag"))
        fields: dict[str, str] = {}
        while line := response.readline().decode():  # "" when the stream ends
            line = line.rstrip("\r\n")
            if not line and fields:
                break  # the end of the first event
            name, _, value = line.partition(":")
            if name:  # a line starting with ':' is a comment (the heartbeat)
                value = value.removeprefix(" ")
                fields[name] = f"{fields[name]}\n{value}" if name in fields else value
        events = [(fields.get("event", "message"), fields["data"])] if "data" in fields else []
        return Reply(response.status, content_type, b"", events)
    finally:
        connection.close()


class Checker:
    """Validates answers against the document, and remembers each (path, status) it saw."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.registry = Registry().with_resource(
            DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT202012)
        )
        self.seen: set[tuple[str, str]] = set()

    def validate(self, instance: Any, pointer: str, what: str) -> None:
        validator = Draft202012Validator({"$ref": f"{DOCUMENT_URI}#{pointer}"}, registry=self.registry)
        problems = [
            f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(instance)
        ]
        assert not problems, f"{what} does not match its documented schema:\n" + "\n".join(problems)

    def check(self, path: str, reply: Reply, what: str) -> None:
        responses = self.document["paths"][path]["get"]["responses"]
        status = str(reply.status)
        assert status in responses, f"{what} answered {status}, which the document does not list"
        self.seen.add((path, status))
        content = responses[status].get("content", {})
        if not content:
            assert reply.body == b"", f"{what} sent a body the document does not describe"
            return
        assert reply.content_type in content, f"{what} sent {reply.content_type}, documented: {list(content)}"
        base = f"/paths/{escape(path)}/get/responses/{status}/content/{escape(reply.content_type)}"
        if reply.content_type == "application/json":
            self.validate(json.loads(reply.body), f"{base}/schema", what)
        elif reply.content_type == "text/event-stream":
            events = content[reply.content_type]["x-event-data"]
            assert reply.events, f"{what} sent no event"
            for event, data in reply.events:
                assert event in events, f"{what} sent an undocumented event {event!r}"
                self.validate(
                    json.loads(data), f"{base}/x-event-data/{escape(event)}", f"{what}, event {event}"
                )


def escape(token: str) -> str:
    """A JSON pointer token."""
    return token.replace("~", "~0").replace("/", "~1")


def fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values[m[1]], path)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LiveNode]:
    """A node that plays the Hub for the scan and pull of PULLED."""
    with Depot(tmp_path / "upstream-store") as hub:
        hub.import_dir(write_model_dir(tmp_path / "upstream-src", UPSTREAM_FILES), PULLED)
        node = LiveNode(hub)
        yield node
        node.stop()


@pytest.fixture
def depot(home: Path, upstream: LiveNode, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    """conftest's depot, online towards ``upstream`` (a depot reads the environment when it is made)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", upstream.url)
    with Depot(home, chunk_size=SMALL_CHUNK) as d:
        yield d


@pytest.fixture
def nodes(depot: Depot, tmp_path: Path) -> Iterator[tuple[LiveNode, LiveNode]]:
    """A node without a token and one with it, over a store with something behind every route: a public and
    a private import, a pulled variant (a saved scan with statuses), preloaded models, an engine, uses."""
    depot.import_dir(write_model_dir(tmp_path / "public", sample_files(0)), PUBLIC)
    hidden = {"weights.bin": b"private" * 999, "config.json": b"{}"}
    depot.import_dir(write_model_dir(tmp_path / "private", hidden), PRIVATE, private=True)
    depot.pull(PULLED, ["q4f16"])
    for repo in (PUBLIC, PRIVATE):
        depot.get_file(repo, "config.json").release()  # a use, for most_accessed
        depot.preloader.preload(repo)
        depot.engines.get_or_load((repo, depot.resolve(repo), "config.json", "test"), object, size=1)
    open_node, guarded = LiveNode(depot), LiveNode(depot, token=TOKEN)
    yield open_node, guarded
    guarded.stop()
    open_node.stop()


def test_every_route_answers_as_the_document_says(nodes: tuple[LiveNode, LiveNode], depot: Depot) -> None:
    open_node, guarded = nodes
    document = request(open_node, f"{API}/openapi.json")
    assert document.status == 200
    checker = Checker(json.loads(document.body))
    assert checker.document == openapi_document(modeldepot.__version__)
    Draft202012Validator.check_schema({"$defs": checker.document["components"]["schemas"]})

    values = {"org": "onnx-community", "name": "tiny", "rev": "main", "sha256": BIG_SHA, "index": "1"}
    queries = {"after": "0" * 64, "limit": "1"}  # limit 1: a full page, so "next" is there too

    def call(node: LiveNode, path: str, expect: int, headers: dict[str, str] | None = None,
             query: dict[str, str] | None = None, **names: str) -> Reply:  # fmt: skip
        target = fill(path, {**values, **names}) + (f"?{urlencode(query)}" if query else "")
        token = "token" if "Authorization" in (headers or {}) else "no token"
        what = f"GET {target} ({'guarded' if node is guarded else 'open'} node, {token})"
        reply = request(node, target, headers)
        assert reply.status == expect, f"{what} answered {reply.status}, not {expect}: {reply.body[:300]!r}"
        checker.check(path, reply, what)
        return reply

    # Every documented route with valid parameters: open, with the token, and without it on the guarded node.
    for path, item in checker.document["paths"].items():
        if path in CONTROL_PATHS:
            continue  # every method and answer of the control routes: tests/test_control_routes.py
        assert set(item) == {"get"}, path
        declared = {p["name"] for p in item["get"].get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", path)), path
        call(open_node, path, 200)
        call(guarded, path, 200, AUTH)
        call(guarded, path, 200 if path == f"{API}/health" else 401)
        query = {
            p["name"]: queries[p["name"]] for p in item["get"].get("parameters", []) if p["in"] == "query"
        }
        if query:
            assert "next" in json.loads(call(open_node, path, 200, query=query).body)

    private = {"org": "acme", "name": "hidden"}
    call(guarded, f"{API}/repos/{{org}}/{{name}}/revisions/{{rev}}/manifest", 200, AUTH, **private)
    # Every other status the document lists, each the way it happens.
    call(open_node, f"{API}/repos/{{org}}/{{name}}/revisions/{{rev}}/manifest", 404, **private)
    call(open_node, f"{API}/repos/{{org}}/{{name}}/revisions/{{rev}}/manifest", 404, rev="nope")
    call(open_node, f"{API}/repos/{{org}}/{{name}}/revisions/{{rev}}/manifest", 400, rev="a..b")
    call(
        open_node, f"{API}/repos/{{org}}/{{name}}/manifest", 200, org="acme"
    )  # imported: what the store holds
    call(open_node, f"{API}/repos/{{org}}/{{name}}/manifest", 404, org="acme", name="nowhere")
    call(open_node, f"{API}/repos/{{org}}/{{name}}/manifest", 400, org="-acme")
    listed = call(open_node, f"{API}/repos", 200)
    assert listed.etag is not None
    call(open_node, f"{API}/repos", 304, {"If-None-Match": listed.etag})
    call(open_node, f"{API}/blobs/{{sha256}}", 206, {"Range": "bytes=10-19"})
    call(open_node, f"{API}/blobs/{{sha256}}", 416, {"Range": f"bytes={len(BIG)}-"})
    # A file still downloading (chunk 0 of 3 logged): served to the token alone, by Range, chunk by chunk.
    in_progress = write_partial(depot, bytes(range(251)) * 700, [0])
    partial = {"sha256": in_progress}
    held = call(guarded, f"{API}/blobs/{{sha256}}/chunks", 200, AUTH, **partial)
    assert json.loads(held.body)["complete"] is False
    assert call(guarded, f"{API}/blobs/{{sha256}}", 206, {**AUTH, "Range": "bytes=0-9"}, **partial).body
    call(guarded, f"{API}/blobs/{{sha256}}", 404, {**AUTH, "Range": f"bytes={SMALL_CHUNK}-"}, **partial)
    call(guarded, f"{API}/blobs/{{sha256}}/chunks/{{index}}", 200, AUTH, index="0", **partial)
    call(guarded, f"{API}/blobs/{{sha256}}/chunks/{{index}}", 404, AUTH, index="1", **partial)
    call(open_node, f"{API}/blobs/{{sha256}}/chunks", 404, **partial)
    for route in (
        f"{API}/blobs/{{sha256}}",
        f"{API}/blobs/{{sha256}}/chunks",
        f"{API}/blobs/{{sha256}}/chunks/{{index}}",
    ):
        call(open_node, route, 404, sha256=hashlib.sha256(b"nowhere").hexdigest())
        call(open_node, route, 400, sha256="g" * 64)
    call(open_node, f"{API}/blobs/{{sha256}}/chunks/{{index}}", 400, index=str(10**6))
    call(open_node, f"{API}/inventory", 400, query={"limit": "0"})
    call(open_node, f"{API}/inventory", 400, query={"after": "z" * 200})
    for path in checker.document["paths"]:  # a query parameter a route does not take: a 400 naming it
        if path not in CONTROL_PATHS and path.startswith(API):
            refused = json.loads(call(open_node, path, 400, query={"x": "1"}).body)["error"]
            assert refused.startswith("unknown query parameter 'x'"), (path, refused)
    flip_byte(depot.store.blobs.path(BIG_SHA), 3)  # last: the blob is quarantined from now on
    call(open_node, f"{API}/blobs/{{sha256}}", 503)
    call(open_node, f"{API}/blobs/{{sha256}}/chunks/{{index}}", 503, index="0")
    call(open_node, f"{API}/blobs/{{sha256}}/chunks", 503)

    documented = {
        (path, status)
        for path, item in checker.document["paths"].items()
        if path not in CONTROL_PATHS
        for status in item["get"]["responses"]
    }
    assert documented - checker.seen == set(), "documented answers no test call produced"


def registered_routes(app_kwargs: dict[str, Any], depot: Depot) -> set[tuple[str, str]]:
    """(METHOD, path) of every route the app registers under /api/depot/v1, and /metrics; a HEAD that
    aiohttp adds beside a GET (add_get) counts as that GET."""
    routes = set()
    for resource in create_app(depot, **app_kwargs).router.resources():
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", resource.canonical)
        if path == API or path.startswith(f"{API}/") or path == "/metrics":
            methods = {route.method for route in resource}
            routes |= {(method, path) for method in methods if not (method == "HEAD" and "GET" in methods)}
    return routes


def test_the_document_lists_exactly_the_routes_the_app_registers(depot: Depot) -> None:
    document = openapi_document(modeldepot.__version__)
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    for kwargs in ({}, {"token": TOKEN}, {"mirror": True}):
        registered = registered_routes(kwargs, depot)
        assert registered - documented == set(), f"routes the document lacks ({kwargs})"
        assert documented - registered == set(), f"documented routes the app lacks ({kwargs})"


def walk(schema: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(schema, dict):
        yield where, schema
        for key, value in schema.items():
            yield from walk(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from walk(value, f"{where}/{index}")


def test_every_described_object_is_closed() -> None:
    """An object schema that names its keys allows no other: an extra key in an answer is a failure."""
    document = openapi_document(modeldepot.__version__)
    open_objects = [
        where
        for where, schema in walk(document)
        if isinstance(schema.get("properties"), dict) and schema.get("additionalProperties") is not False
    ]
    assert open_objects == []


@dataclasses.dataclass(frozen=True)
class Inner:
    name: str


@dataclasses.dataclass(frozen=True)
class Outer:
    text: str
    count: int
    ratio: float
    flag: bool
    maybe: str | None
    either: bool | str
    names: tuple[str, ...]
    pair: tuple[int, str]
    items: list[Inner]
    inner: Inner | None
    mapping: dict[str, int]
    anything: dict[str, Any]
    mode: Literal["a", "b"]
    later: float | None = None


def test_dataclass_schemas_follow_the_fields_and_their_types() -> None:
    components = ComponentSchemas()
    assert components.ref(Outer) == {"$ref": "#/components/schemas/Outer"}
    outer = components.schemas["Outer"]
    assert outer["required"] == [
        f.name for f in dataclasses.fields(Outer)
    ]  # defaults included: asdict has them
    assert outer["additionalProperties"] is False
    assert outer["properties"] == {
        "text": {"type": "string"},
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "maybe": {"type": ["string", "null"]},
        "either": {"type": ["boolean", "string"]},
        "names": {"type": "array", "items": {"type": "string"}},
        "pair": {
            "type": "array",
            "prefixItems": [{"type": "integer"}, {"type": "string"}],
            "minItems": 2,
            "items": False,
        },
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Inner"}},
        "inner": {"anyOf": [{"$ref": "#/components/schemas/Inner"}, {"type": "null"}]},
        "mapping": {"type": "object", "additionalProperties": {"type": "integer"}},
        "anything": {"type": "object"},
        "mode": {"enum": ["a", "b"]},
        "later": {"type": ["number", "null"]},
    }
    assert components.schemas["Inner"]["properties"] == {"name": {"type": "string"}}
    value = Outer(
        "t", 1, 0.5, True, None, "auto", ("x",), (1, "y"), [Inner("i")], None, {"k": 2}, {"a": [1]}, "a"
    )
    registry = Registry().with_resource(
        DOCUMENT_URI, Resource.from_contents({"components": {"schemas": components.schemas}}, DRAFT202012)
    )
    check = Draft202012Validator({"$ref": f"{DOCUMENT_URI}#/components/schemas/Outer"}, registry=registry)
    assert check.is_valid(json.loads(json.dumps(dataclasses.asdict(value))))
    assert not check.is_valid({**json.loads(json.dumps(dataclasses.asdict(value))), "new": 1})
    assert not check.is_valid({k: v for k, v in dataclasses.asdict(value).items() if k != "later"})

    narrowed = components.record(
        Outer, only=["text", "maybe"], nullable=["text"], add={"x": {"type": "string"}}
    )
    assert narrowed["properties"] == {
        "text": {"type": ["string", "null"]},
        "maybe": {"type": ["string", "null"]},
        "x": {"type": "string"},
    }
    with pytest.raises(ValueError, match="no field gone"):
        components.record(Outer, omit=["gone"])
    with pytest.raises(ValueError, match="two component schemas"):
        components.add("Inner", {})

    @dataclasses.dataclass
    class Odd:
        when: set[int]

    with pytest.raises(TypeError, match="no JSON schema"):
        ComponentSchemas().ref(Odd)


def test_the_documents_repo_ids_take_what_the_node_takes() -> None:
    """The document said a pull's repo is 96 characters at most, where the Hub's limit (and the node's) is of
    the org and of the name each: clients made from it refused the ids the node takes (a review)."""
    from modeldepot.validation import validate_repo_id

    schema = openapi_document(modeldepot.__version__)["components"]["schemas"]["PullRequest"]["properties"][
        "repo"
    ]
    validator = Draft202012Validator(schema)
    for good in ("some-org/" + "n" * 90, "x" * 96 + "/" + "y" * 96, "a/b"):
        validate_repo_id(good)
        assert validator.is_valid(good), good
    for bad in ("x" * 97 + "/y", "o/" + "m" * 97, "a/b/c"):
        assert not validator.is_valid(bad), bad
