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
from conftest import LiveNode
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
    "SourceDirectoryError": (404, "NotFound"),
    "IntegrityError": (502, "UpstreamIntegrity"),
    "CorruptBlobError": (503, "CorruptFile"),
    "UpstreamError": (502, "UpstreamError"),
    "UpstreamDataError": (502, "UpstreamError"),
    "UpstreamTimeoutError": (504, "UpstreamTimeout"),
    "AccessDeniedError": (502, "UpstreamError"),
    "OfflineError": (503, "Offline"),
    "StoreFullError": (507, "StoreFull"),
    "StoreError": (500, "NodeError"),
    "StoreSchemaError": (500, "NodeError"),
    "ConfigError": (500, "NodeError"),
}


def _instance(cls: type[errors.DepotError]) -> errors.DepotError:
    arguments = {
        "RepoNotFoundError": ("acme/x",),
        "RevisionNotFoundError": ("acme/x", "main"),
        "EntryNotFoundError": ("acme/x", "main", "a.bin"),
        "CorruptBlobError": ("0" * 64, "chunk 0"),
        "ChunkNotAvailableError": ("0" * 64, 3, "not downloaded yet"),
        "UpstreamDataError": ("http://up", "commit id", "bad"),
    }
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
