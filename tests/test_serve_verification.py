"""Silent corruption is never sent: a byte flipped on disk after a blob was stored (same size, so the
cheap checks pass) is caught by the chunk check on every path that sends bytes to another machine, and
by the scrub for local readers."""

from __future__ import annotations

import hashlib
import http.client
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests

from conftest import SMALL_CHUNK, LiveNode, flip_byte, free_port, wait_until, write_model_dir
from modeldepot import CorruptBlobError, Depot
from modeldepot.store.scrub import Scrubber

REPO = "acme/weights"
WEIGHTS = bytes(range(256)) * 1200  # 307200 bytes: five 64 KiB chunks
FILES = {"config.json": b'{"model_type": "bert"}', "model.safetensors": WEIGHTS}
SHA = hashlib.sha256(WEIGHTS).hexdigest()


@pytest.fixture
def node(depot: Depot, tmp_path: Path) -> Iterator[LiveNode]:
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    live = LiveNode(depot)
    yield live
    live.stop()


def _flip(depot: Depot, chunk: int) -> None:
    flip_byte(depot.store.blobs.path(SHA), chunk * SMALL_CHUNK + 17)


def _raw_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body received, whether the body was complete) over a plain socket; a redirect to the
    same node (a branch's LFS file to its commit's URL) is followed, as huggingface_hub follows it."""
    answer = _raw_get_once(url, headers)
    if answer[0] == 302:
        return _raw_get_once(urljoin(url, answer[1]["Location"]), headers)
    return answer


def _raw_get_once(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, bool]:
    parsed = requests.utils.urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        connection.request(
            "GET", parsed.path + (f"?{parsed.query}" if parsed.query else ""), headers=headers or {}
        )
        response = connection.getresponse()
        try:
            body, complete = response.read(), True
        except http.client.IncompleteRead as error:
            body, complete = error.partial, False
        return response.status, dict(response.getheaders()), body, complete
    finally:
        connection.close()


ROUTES = {
    "resolve": f"/{REPO}/resolve/main/model.safetensors",
    "blob": f"/api/depot/v1/blobs/{SHA}",
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_flip_in_the_first_chunk_is_a_503_and_quarantines(node: LiveNode, depot: Depot, route: str) -> None:
    assert _raw_get(node.url + ROUTES[route])[2] == WEIGHTS  # served whole while sound
    _flip(depot, 0)
    status, headers, body, _ = _raw_get(node.url + ROUTES[route])
    assert status == 503 and body != WEIGHTS and "verification" in headers["X-Error-Message"]
    with pytest.raises(CorruptBlobError):
        depot.get_file(REPO, "model.safetensors")  # quarantined: no read path serves it any more
    assert _raw_get(node.url + ROUTES[route])[0] in (404, 503)
    # The node's health says so (it said "ok" while the model answered 503: an explorer's trial)
    health = requests.get(f"{node.url}/api/depot/v1/health", timeout=10).json()
    assert health["status"] == "degraded" and "1 file failed verification" in health["detail"], health


def test_a_head_of_a_file_found_corrupt_is_answered_from_its_listing(node: LiveNode, depot: Depot) -> None:
    """A HEAD of a quarantined file was a 503: huggingface_hub retried it for 23 s, then said "check your
    connection", and file_exists raised (an explorer's trial). The HEAD says what the file is; the GET why
    it is not sent."""
    from huggingface_hub import HfApi

    _flip(depot, 0)
    assert not depot.verify().ok  # (quarantined, as a scrub finds it)
    commit = depot.resolve(REPO)
    for revision in ("main", commit):
        head = requests.head(f"{node.url}/{REPO}/resolve/{revision}/model.safetensors", timeout=30)
        assert head.status_code in (200, 302) and head.headers["X-Linked-Size"] == str(len(WEIGHTS)), revision
    pinned = requests.head(f"{node.url}/{REPO}/resolve/{commit}/model.safetensors", timeout=30)
    assert pinned.status_code == 200 and pinned.headers["Content-Length"] == str(len(WEIGHTS))
    assert HfApi(endpoint=node.url).file_exists(REPO, "model.safetensors")
    status, headers, body, _ = _raw_get(node.url + ROUTES["resolve"])
    assert status == 503 and "verification" in headers["X-Error-Message"] and body != WEIGHTS


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_flip_later_in_the_file_breaks_the_body(node: LiveNode, depot: Depot, route: str) -> None:
    _flip(depot, 3)
    status, headers, body, complete = _raw_get(node.url + ROUTES[route])
    assert status == 200 and int(headers["Content-Length"]) == len(WEIGHTS)
    assert not complete and len(body) <= 3 * SMALL_CHUNK  # the sound chunks before it, then a cut
    assert body == WEIGHTS[: len(body)]
    with pytest.raises(CorruptBlobError):
        depot.get_file(REPO, "model.safetensors")


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_ranges_check_every_chunk_they_touch(node: LiveNode, depot: Depot, route: str) -> None:
    _flip(depot, 2)
    clean = _raw_get(node.url + ROUTES[route], {"Range": "bytes=0-100000"})  # chunks 0 and 1
    assert clean[0] == 206 and clean[2] == WEIGHTS[:100001] and clean[3]
    first_bad = _raw_get(
        node.url + ROUTES[route], {"Range": f"bytes={2 * SMALL_CHUNK + 5}-{2 * SMALL_CHUNK + 50}"}
    )
    assert first_bad[0] == 503
    # Spanning into the bad chunk from a good one: the good bytes, then a cut (the blob is quarantined by now,
    # so restore it to try again).
    depot.import_dir(write_model_dir(depot.home.parent / "again", FILES), REPO)
    _flip(depot, 2)
    spanning = _raw_get(node.url + ROUTES[route], {"Range": f"bytes={SMALL_CHUNK}-{3 * SMALL_CHUNK}"})
    assert spanning[0] == 206 and not spanning[3]
    assert spanning[2] == WEIGHTS[SMALL_CHUNK : SMALL_CHUNK + len(spanning[2])]


def test_the_hub_client_never_keeps_a_corrupt_file(node: LiveNode, depot: Depot, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from huggingface_hub import hf_hub_download

    _flip(depot, 4)
    cache = tmp_path / "hf-cache"
    with pytest.raises(Exception):  # noqa: B017,PT011  (the client's own error types vary by version)
        hf_hub_download(REPO, "model.safetensors", cache_dir=cache, endpoint=node.url, etag_timeout=30)
    kept = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size == len(WEIGHTS)]
    assert kept == []


def test_the_scrub_names_a_pull_for_a_repo_pulled_here(
    node: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with Depot(tmp_path / "pulled", chunk_size=SMALL_CHUNK, servers=[node.url]) as pulled:
        pulled.pull(REPO)
        flip_byte(pulled.store.blobs.path(SHA), 17)
        with caplog.at_level(logging.ERROR, logger="modeldepot.store.scrub"):
            assert Scrubber(pulled.store).scrub().corrupt == (SHA,)
    assert f"(`modeldepot pull {REPO}` restores it)" in caplog.text, caplog.text


def test_the_scrub_quarantines_rot_before_a_local_reader_meets_it(
    depot: Depot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    scrubber = Scrubber(depot.store)
    assert scrubber.due(older_than=3600) == []  # just written, so just verified
    clean = scrubber.scrub()
    assert (
        clean.corrupt == ()
        and clean.blobs_checked == 2
        and clean.bytes_checked == sum(map(len, FILES.values()))
    )
    assert bytes(depot.get_file(REPO, "model.safetensors")) == WEIGHTS
    _flip(depot, 1)
    assert bytes(depot.get_file(REPO, "model.safetensors")) != WEIGHTS  # local reads do not hash...
    with caplog.at_level(logging.ERROR, logger="modeldepot.store.scrub"):
        report = scrubber.scrub()
    assert report.corrupt == (SHA,)
    # Said with the files it breaks and what restores them (the blob's id alone named no model: a trial): an
    # import, for a repo imported here (a pull was prescribed, which no upstream could answer: an explorer's)
    assert f"Used by {REPO}@" in caplog.text and f"(importing {REPO} again restores it)" in caplog.text
    with pytest.raises(CorruptBlobError):  # ...the scrub found it, and now nothing serves it
        depot.get_file(REPO, "model.safetensors")
    assert not depot.verify().ok


def test_a_blob_quarantined_after_the_scrub_listed_it_is_not_reported_again(
    depot: Depot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    scrubber = Scrubber(depot.store)
    listed = scrubber.due(older_than=0)
    _flip(depot, 1)
    assert depot.store.quarantine(SHA)  # another thread's check (after a restart) reached it first...
    scrubber.due = lambda older_than: listed  # type: ignore[method-assign]  # ...after the pass listed it
    report = scrubber.scrub()
    # (the scrub logged "its file is missing" and counted it as its own find, a wrong reason told twice)
    assert report.corrupt == () and report.blobs_checked == 1
    assert "scrub" not in caplog.text
    with pytest.raises(CorruptBlobError, match="failed verification earlier"):
        depot.get_file(REPO, "model.safetensors")


def test_the_scrub_keeps_its_rate_and_stops_when_asked(depot: Depot, tmp_path: Path) -> None:
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    now = [0.0]
    waits: list[float] = []

    class Paced(threading.Event):
        """A stop event that is never set; its waits move a fake clock instead of sleeping."""

        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            now[0] += timeout or 0.0
            return False

    slow = Scrubber(depot.store, rate=SMALL_CHUNK, clock=lambda: now[0])  # one chunk a second
    report = slow.scrub(stop=Paced())
    assert not report.stopped and report.blobs_checked == 2
    assert sum(waits) == pytest.approx(sum(map(len, FILES.values())) / SMALL_CHUNK)  # exactly its byte budget
    stop = threading.Event()
    stop.set()
    stopped = Scrubber(depot.store).scrub(stop=stop)
    assert stopped.stopped and stopped.blobs_checked == 0 and stopped.bytes_checked == 0


def test_serve_scrubs_in_the_background(home: Path, tmp_path: Path) -> None:
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        _flip(depot, 2)
    port = free_port()
    log = tmp_path / "serve.log"  # a file, not a pipe nobody reads while the server runs: it cannot fill up
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(port),
             "--scrub-interval", "0.05", "--scrub-rate", "1GiB"],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        with Depot(home) as depot:

            def quarantined() -> bool:
                state = depot.store.index.read("SELECT state FROM blobs WHERE sha256 = ?", (SHA,))[0][0]
                return bool(state != "ok")

            wait_until(quarantined, 60, "the background scrub to quarantine the flipped blob", process)
            with pytest.raises(CorruptBlobError):
                depot.get_file(REPO, "model.safetensors")
            assert bytes(depot.get_file(REPO, "config.json")) == FILES["config.json"]  # the sound blob stays
    finally:
        process.terminate()
        process.wait(30)
    logged = log.read_text()
    assert process.returncode == 0 and "scrub" in logged and "Traceback" not in logged
