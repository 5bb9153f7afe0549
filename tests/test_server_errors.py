"""Every error of the library's tree becomes its own HTTP status with the Hub's error headers, and the
node logs what went wrong under the request's id."""

from __future__ import annotations

import inspect
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import modeldepot.errors as errors
from conftest import LiveNode, wait_until
from modeldepot import Depot
from modeldepot.server.responses import response_for_error

EXPECTED = {
    "InvalidInputError": (400, "BadRequest"),
    "InvalidRepoIdError": (400, "BadRequest"),
    "InvalidPathError": (400, "BadRequest"),
    "InvalidRevisionError": (400, "BadRequest"),
    "InvalidRangeError": (400, "BadRequest"),
    "NotFoundError": (404, "NotFound"),
    "RepoNotFoundError": (404, "RepoNotFound"),
    "RevisionNotFoundError": (404, "RevisionNotFound"),
    "EntryNotFoundError": (404, "EntryNotFound"),
    "ChunkNotAvailableError": (404, "ChunkNotAvailable"),
    "GatedRepoError": (401, "GatedRepo"),
    "SourceDirectoryError": (404, "NotFound"),
    "VariantNotFoundError": (404, "NotFound"),
    "EngineMismatchError": (404, "NotFound"),
    "BlobRemovedError": (404, "NotFound"),
    "IntegrityError": (502, "UpstreamIntegrity"),
    "CorruptBlobError": (503, "CorruptFile"),
    "CommitConflictError": (
        502,
        "UpstreamIntegrity",
    ),  # (a mirror's upstream giving a held commit other bytes)
    "UpstreamError": (502, "UpstreamError"),
    "UpstreamDataError": (502, "UpstreamError"),
    "UpstreamTimeoutError": (504, "UpstreamTimeout"),
    "AccessDeniedError": (502, "UpstreamError"),
    "OfflineError": (503, "Offline"),
    "PullRunningError": (409, "PullRunning"),
    "MemoryShortError": (
        503,
        "InsufficientMemory",
    ),  # (a RAM tier of private copies that cannot take a model)
    "StoreFullError": (507, "StoreFull"),
    "BudgetExceededError": (507, "StoreFull"),
    "StoreError": (500, "NodeError"),
    "StoreSchemaError": (500, "NodeError"),
    "IndexDamagedError": (
        503,
        "IndexDamaged",
    ),  # (a damaged index: the node says so, its operator recovers it)
    "SharedBlobsRemovedError": (500, "NodeError"),  # (a pull's files removed under it three times running)
    "ReadOnlyStoreError": (503, "ReadOnlyStore"),
    "StoreClosedError": (503, "ShuttingDown"),  # (a request that came as the node stopped)
    "ConfigError": (500, "NodeError"),
}


def _instance(cls: type[errors.DepotError]) -> errors.DepotError:
    arguments = {
        "RepoNotFoundError": ("acme/x",),
        "RevisionNotFoundError": ("acme/x", "main"),
        "EntryNotFoundError": ("acme/x", "main", "a.bin"),
        "CorruptBlobError": ("0" * 64, "chunk 0"),
        "CommitConflictError": ("acme/x", "c" * 40, "a.bin", "0" * 64, "1" * 64),
        "ChunkNotAvailableError": ("0" * 64, 3, "not downloaded yet"),
        "UpstreamDataError": ("http://up", "commit id", "bad"),
    }
    if cls is errors.BudgetExceededError:
        return cls("why", budget_bytes=1, protected_bytes=0, needed_bytes=2)
    return cls(*arguments.get(cls.__name__, ("why",)))


def test_every_error_of_the_tree_has_its_status() -> None:
    tree = {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.DepotError) and cls is not errors.DepotError
    }
    assert set(tree) == set(EXPECTED), "a new error needs its status here and in response_for_error"
    for name, cls in tree.items():
        response = response_for_error(_instance(cls))
        assert (response.status, response.headers.get("X-Error-Code")) == EXPECTED[name], name
        assert response.headers["X-Error-Message"]


def test_an_error_message_header_keeps_its_ellipsis_and_quotes_in_ascii() -> None:
    """A shortened name's "…" came out as "?" in X-Error-Message (the body kept it: a trial)."""
    response = response_for_error(errors.InvalidPathError("file path ‘aaaa…aaaa’ is longer than 1024 bytes"))
    assert response.headers["X-Error-Message"] == "file path 'aaaa...aaaa' is longer than 1024 bytes"


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", "1")


@pytest.fixture
def hanging_upstream() -> Iterator[str]:
    """A port whose kernel accepts connections that nobody ever answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def _mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: str) -> LiveNode:
    monkeypatch.setenv("HF_ENDPOINT", upstream)
    return LiveNode(Depot(tmp_path / "mirror"), mirror=True, owns_depot=True)


def test_an_unreachable_upstream_is_a_logged_502(
    online: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    node = _mirror(tmp_path, monkeypatch, "http://127.0.0.1:9")  # nothing listens there
    try:
        with caplog.at_level(logging.WARNING, logger="modeldepot.server"):
            answer = requests.get(f"{node.url}/api/models/acme/missing", timeout=30)
            sent_id = requests.get(
                f"{node.url}/api/models/acme/missing", headers={"X-Request-Id": "client-42"}, timeout=30
            )
    finally:
        node.stop()
    assert answer.status_code == 502 and answer.headers["X-Error-Code"] == "UpstreamError"
    assert "127.0.0.1:9" in answer.headers["X-Error-Message"]  # the client learns why
    request_id = answer.headers["X-Request-Id"]
    lines = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert lines and "502" in lines[0] and "UpstreamError" in lines[0]  # and so does the operator
    assert sent_id.headers["X-Request-Id"] == "client-42"
    assert any("client-42" in r.getMessage() for r in caplog.records)


def test_an_upstream_that_does_not_answer_is_a_504(
    online: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hanging_upstream: str
) -> None:
    node = _mirror(tmp_path, monkeypatch, hanging_upstream)
    try:
        answer = requests.get(f"{node.url}/api/models/acme/slow", timeout=60)
    finally:
        node.stop()
    assert answer.status_code == 504 and answer.headers["X-Error-Code"] == "UpstreamTimeout"


# -- bodies that cannot be read, clients that leave: a 4xx or nothing, never a 500 ------------------------


def _exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` (with Connection: close) on a fresh connection; the status and the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while block := sock.recv(65536):
            answer += block
    return int(answer.split(b" ", 2)[1]), answer


def _post(path: str, content_type: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: node", "Connection: close", f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}", *extra]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.fixture
def served(tmp_path: Path) -> Iterator[LiveNode]:
    from conftest import write_model_dir

    depot = Depot(tmp_path / "store")
    depot.import_dir(write_model_dir(tmp_path / "src", {"config.json": b"{}"}), "acme/w")
    node = LiveNode(depot, control_token="control-secret", owns_depot=True)
    yield node
    node.stop()


UNREADABLE_BODIES = {
    "multipart without a boundary": ("multipart/form-data", b"paths=config.json"),
    "multipart that never starts": ("multipart/form-data; boundary=zz", b"paths=config.json"),
    "a charset nobody knows": ("application/x-www-form-urlencoded; charset=bogus", b"paths=config.json"),
    "gzip that is not gzip": ("application/json", b'{"paths": ["config.json"]}'),
}


@pytest.mark.parametrize("name", UNREADABLE_BODIES)
def test_a_paths_info_body_that_cannot_be_read_is_a_400(
    served: LiveNode, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    content_type, body = UNREADABLE_BODIES[name]
    extra = ("Content-Encoding: gzip",) if "gzip" in name else ()
    port = int(served.url.rsplit(":", 1)[1])
    with caplog.at_level(logging.INFO):
        status, answer = _exchange(
            port, _post("/api/models/acme/w/paths-info/main", content_type, body, *extra)
        )
    assert status == 400 and b"X-Error-Code: BadRequest" in answer, answer
    assert not any(r.levelno >= logging.ERROR or r.exc_info for r in caplog.records), caplog.text
    good = _post(
        "/api/models/acme/w/paths-info/main", "application/x-www-form-urlencoded", b"paths=config.json"
    )
    status, answer = _exchange(port, good)
    assert status == 200 and b'"path":"config.json"' in answer.replace(b" ", b"")


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/acme/w", "a file is at /acme/w/resolve/REVISION/PATH, the repo's info at /api/models/acme/w"),
        ("/acme/w/blob/main/config.json", "serves no web pages of a repo; a file is at /acme/w/resolve/"),
        ("/acme/w/resolve/main", "a file's URL names its path, /acme/w/resolve/main/PATH"),
        ("/acme/w/raw/main/", "a file's URL names its path, /acme/w/raw/main/PATH"),
        ("/acme/w/resolve/main%2Fconfig.json", "names its path, /acme/w/resolve/main%2Fconfig.json/PATH"),
        (
            "/nothing/here/at/all",
            "the node's own under /api/depot/v1 (described at /api/depot/v1/openapi.json)",
        ),
        ("/dashboard/nothing.js", "the dashboard at /"),
    ],
)
def test_a_path_no_route_takes_is_a_404_that_says_where_to_look(
    served: LiveNode, path: str, says: str
) -> None:
    """A bare "Not Found" left a user who typed a repo's Hub page, or a file's URL without its path, guessing."""
    answer = requests.get(served.url + path, timeout=30)
    assert answer.status_code == 404
    assert (
        answer.json()["error"].startswith(f"this node has no route {path}") and says in answer.json()["error"]
    )


def test_a_control_body_sent_compressed_is_refused_not_taken_for_empty(served: LiveNode) -> None:
    """aiohttp reads a truncated gzip body as an empty one: a pin would be set from no settings at all."""
    port = int(served.url.rsplit(":", 1)[1])
    request = _post("/api/depot/v1/repos/acme/w/pin", "application/json", b"\x1f",
                    "Content-Encoding: gzip", "Authorization: Bearer control-secret").replace(b"POST", b"PUT", 1)  # fmt: skip
    status, answer = _exchange(port, request)
    assert status == 415, answer
    assert served.depot.pins() == []


def test_head_of_the_event_stream_ends(served: LiveNode) -> None:
    """HEAD answers the stream's headers and ends, so the connection serves the next request; it used to
    send heartbeats to nobody for as long as the connection stayed open."""
    port = int(served.url.rsplit(":", 1)[1])
    both = (b"HEAD /api/depot/v1/events HTTP/1.1\r\nHost: node\r\n\r\n"
            b"GET /api/depot/v1/health HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")  # fmt: skip
    status, answer = _exchange(port, both)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert status == 200 and b"Content-Type: text/event-stream" in head
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]


def test_a_client_that_leaves_mid_body_is_one_info_line_not_a_500(
    served: LiveNode, caplog: pytest.LogCaptureFixture
) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    request = _post("/api/models/acme/w/paths-info/main", "application/json", b'{"paths": ["config.json"]}')
    request = request.replace(b"Content-Length: 26", b"Content-Length: 2600")  # promised, never sent
    with caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
        wait_until(lambda: "the client left during POST" in caplog.text, 10, "the node's line about it")
    assert not any(r.levelno >= logging.WARNING or r.exc_info for r in caplog.records), caplog.text


def test_every_error_of_the_tree_is_importable_from_the_package() -> None:
    """The README promises every class of the tree from `modeldepot` (two were not: a README walk)."""
    import modeldepot

    tree = [
        name
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.DepotError)
    ]
    assert [name for name in tree if getattr(modeldepot, name, None) is not getattr(errors, name)] == []
