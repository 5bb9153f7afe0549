"""Mirror mode (`serve --upstream`): a miss is pulled through the chain while the client reads it, with the
real huggingface_hub as the client; live status in the manifest route and the event stream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import requests
from aiohttp import web
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download

from conftest import SMALL_CHUNK, LiveNode, flip_byte, store_files_consistent, wait_until, write_model_dir
from faultproxy import FaultProxy
from fleetnodes import base_env
from mirrornodes import (
    BIG,
    FILES,
    REPO,
    mirror_node,
    mirror_of_a_node,
    proxied_upstream,
    read_then_leave,
    read_until_it_breaks,
    slow_chunks,
)
from modeldepot import Depot
from modeldepot.mirror import following as mirror_following
from modeldepot.mirror import pulls as mirror_pulls
from modeldepot.server.mirror_routes import MIRROR


@pytest.fixture
def upstream_proxy(tmp_path: Path) -> Iterator[FaultProxy]:
    yield from proxied_upstream(tmp_path)


@pytest.fixture
def client_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    return tmp_path / "hf-cache"


def test_huggingface_hub_downloads_a_miss_through_the_mirror(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="modeldepot.mirror")
    plan = upstream_proxy.set("slow", times=-1, slow_delay=0.05)  # a transfer takes a while
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        url = hf_hub_url(REPO, BIG, endpoint=mirror.url)
        metadata = get_hf_file_metadata(url)
        assert plan.body_bytes < len(FILES[BIG]), "the HEAD is answered from metadata, not after a transfer"
        assert metadata.size == len(FILES[BIG]) and metadata.commit_hash
        path = hf_hub_download(REPO, BIG, cache_dir=client_env, endpoint=mirror.url)
        assert Path(path).read_bytes() == FILES[BIG]
        assert mirror.depot.has_file(REPO, BIG), "the mirror keeps what it fetched"
        assert not mirror.depot.has_file(REPO, "config.json"), "and only that"
        crossed = upstream_proxy.plan.body_bytes
        assert crossed == len(FILES[BIG])
        # A second client is served from the store: nothing more crosses the upstream link.
        again = hf_hub_download(REPO, BIG, cache_dir=tmp_path / "other-cache", endpoint=mirror.url)
        assert Path(again).read_bytes() == FILES[BIG]
        assert upstream_proxy.plan.body_bytes == crossed
        assert store_files_consistent(mirror.depot) == []
        # Its log says what it pulled, once (an operator told a mirror's misses from its hits by nothing)
        pulled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pulled ")]
        assert len(pulled) == 1 and f"{REPO}@" in pulled[0] and f" {BIG} (" in pulled[0], pulled
    finally:
        mirror.stop()
        mirror.depot.close()


def test_a_range_read_far_into_a_file_the_mirror_pulls_is_fetched_before_the_chunks_ahead_of_it(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range read near the end of a big file on a slow upstream link waited for every chunk before it (in
    order, rarest first): a tensor read through a mirror waited for the whole file, longer than a client's
    read timeout. The chunk a reader waits for is fetched next."""
    plan = upstream_proxy.set("slow", times=-1, slow_delay=0.2)  # 320 KiB/s a connection, four at once
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        start = 40 * SMALL_CHUNK + 5
        answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", timeout=60,
                              headers={"Range": f"bytes={start}-{start + 999}"})  # fmt: skip
        assert answer.status_code == 206 and answer.content == FILES[BIG][start : start + 1000]
        # (the chunks in flight when the read came, and its own: not the forty before it)
        assert plan.body_bytes < 16 * SMALL_CHUNK, plan.body_bytes / SMALL_CHUNK
        whole = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", timeout=60)
        assert whole.status_code == 200 and whole.content == FILES[BIG]
        assert store_files_consistent(mirror.depot) == []
    finally:
        mirror.stop()


def test_a_range_reader_takes_a_connection_from_a_chunk_in_flight_whose_part_is_kept(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every connection busy, the read's chunk waited for one of the chunks in flight to land (on a
    capped link, 3.9 s of the 8 the whole file took, where its own chunk alone took 2): the chunk in flight
    that received least gives its connection, and what it received is kept, asked for again from there."""
    plan = upstream_proxy.set("slow", times=-1, slow_delay=0.1, slow_piece=8192)  # 80 KiB/s a connection
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        # (a reader of the file's start: the pull runs, four chunks at once)
        first: list[requests.Response] = []
        reader = threading.Thread(target=lambda: first.append(requests.get(
            f"{mirror.url}/{REPO}/resolve/main/{BIG}", headers={"Range": "bytes=0-999"}, timeout=60)))  # fmt: skip
        reader.start()
        wait_until(lambda: len(plan.requests) >= 4, 30, "the pull's first four chunks in flight")
        time.sleep(0.35)  # (each has received some of its chunk: a quarter of it at most)
        start = 40 * SMALL_CHUNK + 5
        answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", timeout=60,
                              headers={"Range": f"bytes={start}-{start + 999}"})  # fmt: skip
        assert answer.status_code == 206 and answer.content == FILES[BIG][start : start + 1000]
        plan.slow_delay = 0.0  # (the rest at once)
        reader.join(60)
        assert first[0].status_code == 206 and first[0].content == FILES[BIG][:1000]
        whole = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", timeout=60)
        assert whole.status_code == 200 and whole.content == FILES[BIG]
        starts = [int(r.split("bytes=", 1)[1].split("-")[0]) for r in plan.requests if "bytes=" in r]
        # (a chunk in flight gave its connection to the read's: asked for again from where its part ended)
        assert any(offset % SMALL_CHUNK for offset in starts), [
            (o // SMALL_CHUNK, o % SMALL_CHUNK) for o in starts
        ]
        # (nothing fetched twice: the proxy counts a stopped request's bytes, cut in a piece, not at all)
        assert plan.body_bytes <= len(FILES[BIG])
        assert store_files_consistent(mirror.depot) == []
    finally:
        mirror.stop()


def test_a_client_revalidating_a_file_the_mirror_does_not_hold_gets_a_304_and_nothing_is_pulled(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache that holds a file (a browser's, a reverse proxy's, transformers.js's) sends its ETag back: a
    mirror that did not hold the file pulled it and sent the whole of it, though the upstream's scan names
    the very bytes the client holds."""
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        etag = requests.head(url, timeout=60).headers["ETag"]
        answer = requests.get(url, headers={"If-None-Match": etag}, timeout=60)
        assert (answer.status_code, answer.content, answer.headers.get("ETag")) == (304, b"", etag)
        assert upstream_proxy.plan.body_bytes == 0 and not mirror.depot.has_file(REPO, BIG), "nothing pulled"
        assert requests.get(url, headers={"If-None-Match": '"another"'}, timeout=60).content == FILES[BIG]
    finally:
        mirror.stop()
        mirror.depot.close()


def test_snapshot_download_of_a_repo_the_mirror_never_saw(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path
) -> None:
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        folder = Path(snapshot_download(REPO, cache_dir=client_env, endpoint=mirror.url))
        for name, data in FILES.items():
            assert (folder / name).read_bytes() == data
        assert [n for n in FILES if not mirror.depot.has_file(REPO, n)] == []
    finally:
        mirror.stop()
        mirror.depot.close()


@pytest.mark.parametrize("as_node", [True, False], ids=["node upstream", "hub-like upstream"])
def test_a_mirror_says_a_repo_or_revision_is_missing_as_the_hub_does(
    upstream_proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    client_env: Path,
    as_node: bool,
) -> None:
    """A repo or revision no upstream has was a bare 404 "NotFound": huggingface_hub took it for a broken
    connection (repo_exists raised, hf_hub_download fell back to its cache, transformers said it could not
    connect). It is RepoNotFound or RevisionNotFound, as the Hub and a plain node say."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=as_node)
    try:
        for target, code in (
            ("acme/nope/resolve/main/config.json", "RepoNotFound"),
            (f"{REPO}/resolve/no-such-branch/config.json", "RevisionNotFound"),
            ("api/models/acme/nope", "RepoNotFound"),
            (f"api/models/{REPO}/revision/no-such-branch", "RevisionNotFound"),
        ):
            status, headers = asyncio.run(_head(f"{mirror.url}/{target}"))
            assert (status, headers.get("X-Error-Code")) == (404, code), target
        api = HfApi(endpoint=mirror.url)
        assert api.repo_exists(REPO) and not api.repo_exists("acme/nope")
        assert not api.revision_exists(REPO, "no-such-branch")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("acme/nope", "config.json", cache_dir=client_env, endpoint=mirror.url)
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download(REPO, "config.json", revision="no-such-branch", cache_dir=client_env,
                            endpoint=mirror.url)  # fmt: skip
    finally:
        mirror.stop()
        mirror.depot.close()


async def _head(url: str) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, dict(response.headers)


async def _read(
    url: str, headers: dict[str, str] | None = None, at_headers: Callable[[], int] = lambda: 0
) -> tuple[int, bytes]:
    """(what ``at_headers`` said when the headers arrived, body) of one GET."""
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {}) as response:
        assert response.status in (200, 206), response.status
        seen = at_headers()
        body = await response.read()
    return seen, body


def test_a_file_removed_while_the_mirror_opens_it_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `rm` (or the disk budget) between the mirror's look-up of a file and its opening: the client got a
    404 for a file the upstream has; it is fetched again."""
    with mirror_of_a_node(tmp_path, monkeypatch) as (_, mirror):
        url = f"{mirror.url}/{REPO}/resolve/main/config.json"
        assert asyncio.run(_read(url))[1] == FILES["config.json"]
        blobs, removed = mirror.depot.store.blobs, []
        opening = blobs.open

        def removing_first(sha256: str, size: int) -> int:
            if not removed:
                removed.append(sha256)
                mirror.depot.remove(REPO)
            return opening(sha256, size)

        monkeypatch.setattr(blobs, "open", removing_first)
        assert asyncio.run(_read(url))[1] == FILES["config.json"]
        assert removed and mirror.depot.has_file(REPO, "config.json")


def test_clients_get_bytes_while_a_slow_pull_runs_and_share_one_transfer(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = upstream_proxy.set("slow", times=-1, slow_delay=0.03)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"

        async def both() -> list[tuple[int, bytes]]:
            def crossed() -> int:
                return plan.body_bytes

            return await asyncio.gather(
                _read(url, at_headers=crossed), _read(url, {"Range": f"bytes=100-{3 * SMALL_CHUNK}"})
            )

        (crossed_at_headers, whole), (_, part) = asyncio.run(both())
        assert whole == FILES[BIG]
        assert part == FILES[BIG][100 : 3 * SMALL_CHUNK + 1]
        assert crossed_at_headers < len(FILES[BIG]), "headers come at once, bytes as they land"
        assert plan.body_bytes == len(FILES[BIG]), "two readers, one transfer"
    finally:
        mirror.stop()
        mirror.depot.close()


def test_a_corrupt_upstream_breaks_the_stream_and_nothing_is_kept(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream_proxy.set("flip", times=1, path_suffix=BIG)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)  # no chunk digests
    try:
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        with pytest.raises(aiohttp.ClientPayloadError):  # a range of the first chunk is held back too
            asyncio.run(_read(url, {"Range": "bytes=0-1000"}))
        upstream_proxy.set("flip", times=1, path_suffix=BIG)
        with pytest.raises(aiohttp.ClientPayloadError):
            asyncio.run(_read(url))
        assert not mirror.depot.has_file(REPO, BIG)
        assert store_files_consistent(mirror.depot) == []
        # Twice wrong: the next requests hear why for a while (FAILED_TTL) rather than pull it all again...
        refused = requests.get(url, timeout=60)
        assert (refused.status_code, refused.headers["X-Error-Code"]) == (502, "UpstreamIntegrity")
        monkeypatch.setattr(mirror_pulls, "FAILED_TTL", 0.0)
        # ...then a request pulls again and now gets it right.
        assert asyncio.run(_read(url))[1] == FILES[BIG]
    finally:
        mirror.stop()
        mirror.depot.close()


async def _get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.read()


def test_a_client_resuming_a_broken_answer_gets_the_file_whole(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path
) -> None:
    """A broken answer from a Hub-like upstream (no chunk digests) handed out bytes its final check refuted;
    a resume from where it stopped would join good bytes to them (huggingface_hub kept such a file as
    good). The mirror answers that file whole for a while, whatever range is asked, and remembers it across
    a restart (a client resuming after one got the range)."""
    upstream_proxy.set("flip", times=1, path_suffix=BIG)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)
    try:
        received = asyncio.run(read_until_it_breaks(f"{mirror.url}/{REPO}/resolve/main/{BIG}"))
        assert 0 < len(received) < len(FILES[BIG])
        mirror.stop()
        mirror.depot.close()
        mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)  # the same home
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        status, body = asyncio.run(_get(url, {"Range": f"bytes={len(received)}-"}))
        assert (status, len(body)) == (200, len(FILES[BIG])) and body == FILES[BIG]
        assert mirror.depot.has_file(REPO, BIG)
        status, body = asyncio.run(_get(url, {"Range": f"bytes={len(received)}-"}))
        assert (status, body) == (200, FILES[BIG]), "still whole: the file is answered from the store now"
        # By commit, what the broken answer sent is checked against the stored file: refuted, still whole
        commit_url = f"{mirror.url}/{REPO}/resolve/{mirror.depot.resolve(REPO)}/{BIG}"
        status, body = asyncio.run(_get(commit_url, {"Range": f"bytes={len(received)}-"}))
        assert (status, body) == (200, FILES[BIG])
        assert mirror.runner.app[MIRROR].broke(REPO, BIG)
        status, body = asyncio.run(
            _get(url, {"Range": "bytes=10-19"})
        )  # (HfFileSystem's reads: read as asked,
        assert (status, body) == (
            206,
            FILES[BIG][10:20],
        )  # a 200 was taken for the range: the file's first bytes)

        mirror.depot.remove(REPO)  # huggingface_hub's own resume, end to end: pulled again, flipped again
        upstream_proxy.set("flip", times=1, path_suffix=BIG)
        got = hf_hub_download(REPO, BIG, revision="main", endpoint=mirror.url, cache_dir=client_env)
        assert Path(got).read_bytes() == FILES[BIG]
        assert upstream_proxy.plan.injected == 1
    finally:
        mirror.stop()
        mirror.depot.close()


async def _read_some_and_leave(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.content.readany()


def test_a_client_that_left_before_the_pull_failed_gets_the_file_whole_when_it_resumes(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that left before the pull's final check refuted what it had been given (a Ctrl-C, `curl -m`)
    resumed with a range, and was answered 206: a corrupt file of good bytes joined to refuted ones."""
    from modeldepot.server.mirror_routes import MIRROR

    upstream_proxy.set("flip", times=1, path_suffix=BIG)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)
    try:
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        received = asyncio.run(_read_some_and_leave(url))
        assert 0 < len(received) < len(FILES[BIG])
        pulls = mirror.runner.app[MIRROR]
        wait_until(lambda: not pulls._jobs, 60, "the mirror's pull to end")  # (failed: a byte flipped)
        assert pulls.broke(REPO, BIG) and not mirror.depot.has_file(REPO, BIG)
        status, body = asyncio.run(_get(url, {"Range": f"bytes={len(received)}-"}))
        assert (status, body) == (200, FILES[BIG])
    finally:
        mirror.stop()
        mirror.depot.close()


def test_a_file_the_upstreams_branch_dropped_is_not_answered_from_the_mirrors_older_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream's main moved to a commit without tokenizer.json: the mirror answered it from the older
    commit it held (200, that commit's X-Repo-Commit), and huggingface_hub moved the client's refs/main back."""

    monkeypatch.setenv("MODELDEPOT_MIRROR_TTL", "0")  # (the upstream is asked again at once)
    with mirror_of_a_node(tmp_path, monkeypatch) as (upstream_depot, mirror):
        url = f"{mirror.url}/{REPO}/resolve/main/config.json"
        assert asyncio.run(_read(url))[1] == FILES["config.json"]  # the mirror holds the first commit
        kept = {path: data for path, data in FILES.items() if path != "config.json"}
        upstream_depot.import_dir(write_model_dir(tmp_path / "v2", kept), REPO)  # main moves upstream
        answer = requests.get(url, timeout=60)
        assert answer.status_code == 404 and answer.headers["X-Error-Code"] == "EntryNotFound"
        assert answer.headers.get("X-Repo-Commit") == upstream_depot.resolve(REPO)


def test_a_second_name_of_content_being_pulled_follows_that_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same weights under main and dev (or a tokenizer two repos share) on a cold mirror: the second
    request's pull waited for the first one's claim on the content, writing nothing, and its answer sent no
    headers until the first pull ended (after a minute a 408; huggingface_hub gave up long before)."""
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "main", FILES), REPO)
        dev = {BIG: FILES[BIG], "config.json": b'{"dev": true}'}
        upstream_depot.import_dir(write_model_dir(tmp_path / "dev", dev), REPO, "dev")
        node = LiveNode(upstream_depot)
        proxy = FaultProxy(node.url)
        proxy.set("slow", times=-1, slow_delay=0.3)  # the file takes seconds to come
        mirror = mirror_node(tmp_path, proxy.url, monkeypatch)
        try:
            first = threading.Thread(
                target=lambda: asyncio.run(_read(f"{mirror.url}/{REPO}/resolve/main/{BIG}"))
            )
            first.start()
            wait_until(lambda: proxy.plan.body_bytes > 0, 60, "the first pull to be under way")
            seen, body = asyncio.run(_read(f"{mirror.url}/{REPO}/resolve/dev/{BIG}",
                                           at_headers=lambda: int(mirror.depot.has_file(REPO, BIG))))  # fmt: skip
            first.join(60)
            assert seen == 0, "the second answer's headers came while the first pull was still running"
            assert body == FILES[BIG]
            wait_until(lambda: mirror.depot.has_file(REPO, BIG, "dev"), 60, "dev's pull to take the content")

            def uses() -> int:  # (each answer a use: the one that followed main's pull too, a review)
                mirror.depot.store.access.flush()
                return sum(a.count for a in mirror.depot.store.access.top(10) if a.repo_id == REPO)

            wait_until(lambda: uses() == 2, 30, "both answers counted as uses")
        finally:
            mirror.stop()
            proxy.stop()
            node.stop()


def test_a_mirror_pulls_a_quarantined_file_again(
    upstream_proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file the mirror found corrupt is one it lacks: it is fetched again, not refused (503) until someone
    runs `modeldepot pull` by hand."""
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        assert asyncio.run(_read(url))[1] == FILES[BIG]

        # Sent as it was pulled: a use of it, as an answer from the store is (every model's first use on a
        # mirror was lost to `stats` and `--preload-top`, an explorer's trial)
        def uses() -> list[tuple[str, int]]:
            mirror.depot.store.access.flush()
            return [(a.repo_id, a.count) for a in mirror.depot.store.access.top(5)]

        wait_until(
            lambda: uses() == [(REPO, 1)], 10, "the answer's use to be counted"
        )  # (as the answer ends)
        entry = mirror.depot.file_info(REPO, BIG)
        flip_byte(mirror.depot.store.blobs.path(entry.sha256), 5)
        assert mirror.depot.verify().problems, "quarantined"
        assert not mirror.depot.has_file(REPO, BIG)
        assert asyncio.run(_read(url))[1] == FILES[BIG]
        assert mirror.depot.has_file(REPO, BIG) and store_files_consistent(mirror.depot) == []
        assert asyncio.run(_read(url, {"Range": "bytes=5-9"}))[1] == FILES[BIG][5:10]
        # Found corrupt as it is read: said so (a failing disk went unnoticed, the file fetched again without a
        # word and the quarantine gauge back at 0, an explorer's trial)
        flip_byte(mirror.depot.store.blobs.path(entry.sha256), 5)
        with caplog.at_level(logging.WARNING, logger="modeldepot.server"):
            assert asyncio.run(_read(url))[1] == FILES[BIG]
        said = [r.getMessage() for r in caplog.records if "the store's copy is corrupt" in r.getMessage()]
        assert said and said[-1].startswith(f"{REPO}/{BIG} at ") and "does not match" in said[-1], said
    finally:
        mirror.stop()
        mirror.depot.close()


def test_a_repo_the_mirror_imported_is_its_own_and_never_mixed_with_the_upstreams(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mirror holds its own acme/mirrored (imported), the upstream another of that name. A quarantined
    file of it, or one it lacks, was fetched from the upstream's repo and published into the local one,
    moving its main: now a 503 and a 404, the local repo untouched."""
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        own = {"config.json": b'{"own": true}', "w.bin": b"w" * 1000}
        mirror.depot.import_dir(write_model_dir(tmp_path / "own", own), REPO)
        main = mirror.depot.resolve(REPO)
        mirror.depot.store.quarantine(mirror.depot.file_info(REPO, "config.json").sha256)
        for path, status in (("config.json", 503), (BIG, 404)):
            with pytest.raises(aiohttp.ClientResponseError) as refused:
                asyncio.run(_get_or_raise(f"{mirror.url}/{REPO}/resolve/main/{path}"))
            assert refused.value.status == status, path
        assert mirror.depot.resolve(REPO) == main and {e.path for e in mirror.depot.list_files(REPO)} == set(
            own
        )
        assert upstream_proxy.plan.requests == [], "the upstream was never asked for a file"
    finally:
        mirror.stop()
        mirror.depot.close()


async def _get_or_raise(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        return await response.read()


def test_manifest_route_and_event_stream_show_pull_progress(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with Depot(tmp_path / "node", chunk_size=SMALL_CHUNK, servers=[upstream_proxy.url]) as depot:
        node = LiveNode(depot)
        try:
            depot.scan_repo(REPO)
            events: list[dict[str, object]] = []
            subscribed = threading.Event()

            async def listen() -> None:
                url = f"{node.url}/api/depot/v1/events"
                async with aiohttp.ClientSession() as session, session.get(url) as response:
                    assert response.headers["Content-Type"].startswith("text/event-stream")
                    name = ""
                    async for line in response.content:
                        if line.startswith(b"event: "):
                            name = line[7:].decode().strip()
                        elif line.startswith(b"data: ") and name == "snapshot":
                            subscribed.set()  # the state at connect has arrived: changes come next
                        elif line.startswith(b"data: ") and name == "variant":
                            events.append(json.loads(line[6:]))
                            if events[-1]["status"] == "downloaded":
                                return

            listener = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(listen(), 30)))
            listener.start()
            assert subscribed.wait(30), "the event stream never sent the state at connect"
            upstream_proxy.set("slow", times=-1, slow_delay=0.1)
            depot.pull(REPO)
            listener.join(40)
            statuses = [e["status"] for e in events]
            assert statuses[0] == "available" and statuses[-1] == "downloaded"
            assert "downloading" in statuses

            async def manifest() -> dict[str, object]:
                url = f"{node.url}/api/depot/v1/repos/{REPO}/manifest"
                async with aiohttp.ClientSession() as session, session.get(url) as response:
                    assert response.status == 200
                    return await response.json()  # type: ignore[no-any-return]

            body = asyncio.run(manifest())
            assert body["commit_id"] == depot.resolve(REPO)
            assert [v["status"] for v in body["variants"]] == ["downloaded"]  # type: ignore[index]
        finally:
            node.stop()


def test_the_event_stream_ends_when_the_server_shuts_down(depot: Depot) -> None:
    node = LiveNode(depot)
    ended, subscribed = threading.Event(), threading.Event()

    async def listen() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{node.url}/api/depot/v1/events") as response,
        ):
            subscribed.set()
            async for _ in response.content:
                pass
        ended.set()

    listener = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(listen(), 30)))
    listener.start()
    assert subscribed.wait(30), "the event stream never answered"
    node.stop()  # without the fix this waits out the 60 s graceful-shutdown timeout
    assert ended.wait(10), "the stream kept the connection open through the shutdown"
    listener.join(10)


def test_a_file_being_pulled_is_described_as_a_stored_one(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model info, trees and ranges from a mirror's miss have the shape of the same answers for a stored repo,
    so every client (and `modeldepot pull` pointed at the mirror) reads them alike."""
    import requests
    from click.testing import CliRunner

    from modeldepot.cli import cli

    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        base = f"/api/models/{REPO}"
        for route in (f"{base}?blobs=true", f"{base}/tree/main?recursive=true&expand=true"):
            missed = requests.get(mirror.url + route, timeout=30).json()
            stored = requests.get(upstream_proxy.url + route, timeout=30).json()
            if isinstance(missed, dict):
                volatile = ("lastModified", "createdAt")
                missed, stored = ({k: v for k, v in d.items() if k not in volatile} for d in (missed, stored))
            else:  # a tree: the same entries, lastCommit dated by when each side got the commit
                for entry in (*missed, *stored):
                    entry.get("lastCommit", {}).pop("date", None)
            assert missed == stored, route
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        etag = requests.head(url, timeout=30).headers["ETag"]
        other = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": '"0000"'}, timeout=60)
        assert other.status_code == 200 and other.content == FILES[BIG]  # another version: the whole file
        same = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}, timeout=60)
        assert same.status_code == 206 and same.content == FILES[BIG][:10]
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)  # a pull that treats the mirror as its Hub
        result = CliRunner().invoke(cli, ["pull", REPO, "--home", str(tmp_path / "third"), "--json"])
        assert result.exit_code == 0, result.output
        with Depot(tmp_path / "third") as third:
            assert {f.path: bytes(third.get_file(REPO, f.path)) for f in third.list_files(REPO)} == FILES
    finally:
        mirror.stop()


def test_a_mirror_shows_the_variants_its_clients_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path
) -> None:
    """Files fetched through a mirror completed variants that `status`, the event stream and the dashboard
    still showed as available: only a whole pull wrote statuses."""
    from conftest import serving_repo

    rng = random.Random(11)
    files = {
        "README.md": b"# tiny\n",
        "tiny-Q4_K_M.gguf": rng.randbytes(3 * SMALL_CHUNK + 5),
        "tiny-Q8_0.gguf": rng.randbytes(5 * SMALL_CHUNK + 7),
    }
    repo = "acme/tiny-GGUF"
    with serving_repo(tmp_path, files, repo, chunk_size=SMALL_CHUNK) as upstream:
        mirror = mirror_node(tmp_path, upstream.url, monkeypatch, as_node=False)
        try:
            for name in ("README.md", "tiny-Q4_K_M.gguf"):
                got = hf_hub_download(repo, name, cache_dir=client_env, endpoint=mirror.url)
                assert Path(got).read_bytes() == files[name]
            variants = {v.name: v for v in mirror.depot.get_manifest(repo).variants}
            assert set(variants) == {"Q4_K_M", "Q8_0"}
            assert variants["Q4_K_M"].status == "downloaded", variants["Q4_K_M"]
            assert variants["Q4_K_M"].bytes_done == variants["Q4_K_M"].total_bytes
            assert variants["Q8_0"].status == "available", "one shared file does not make it downloaded"
        finally:
            mirror.stop()
            mirror.depot.close()


def pull_beside(home: Path, upstream: str) -> subprocess.Popen[str]:
    """A `modeldepot pull` of REPO into the mirror's store ``home`` (its own process, at 384 KiB/s: 8 s),
    returned once its download is under way."""
    env = base_env(MODELDEPOT_SERVERS=upstream, MODELDEPOT_CHUNK_SIZE=str(SMALL_CHUNK))
    pulling = subprocess.Popen(
        [sys.executable, "-m", "modeldepot", "pull", REPO, "--home", str(home), "--max-rate", "384KiB/s"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(lambda: (home / "partials").exists() and any((home / "partials").glob("*.log")))
    return pulling


def test_a_file_another_process_pulls_into_the_mirrors_store_is_streamed_as_it_lands(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path
) -> None:
    """A `modeldepot pull` on the mirror's store (capped by --max-rate) holds the file's download: the
    mirror's own pull waits for it, and its reader waited for all of it, sent nothing, and heard the request
    deadline's 408 (a trial's huggingface_hub client gave up). It follows that download's chunks, each
    checked against the BLAKE3 logged for it; the last only once the whole file is in the store."""
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, request_deadline=4.0)
    pulling = pull_beside(tmp_path / "mirror", upstream_proxy.url)
    try:
        first_bytes: list[float] = []

        async def download() -> tuple[int, bytes]:
            url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                body = bytearray()
                async for piece in response.content.iter_any():
                    first_bytes.append(time.monotonic())
                    body += piece
                return response.status, bytes(body)

        status, body = asyncio.run(download())
        _, errors = pulling.communicate(timeout=120)
        ended = time.monotonic()
        assert pulling.returncode == 0, errors
        assert status == 200 and body == FILES[BIG]
        assert first_bytes and first_bytes[0] < ended - 2, "bytes went out while the other process pulled"
        crossed = upstream_proxy.plan.body_bytes
        assert crossed < len(FILES[BIG]) + 2 * SMALL_CHUNK, "one transfer upstream, the other process's"
    finally:
        pulling.kill()
        pulling.communicate()
        mirror.stop()


def test_a_reader_of_a_file_a_suspended_process_downloads_is_broken_not_kept_for_good(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path
) -> None:
    """The other process was suspended (Ctrl-Z): its download lands nothing, and a reader following it
    polled it for good after its client left (review). It breaks after STILL_ELSEWHERE."""
    monkeypatch.setattr(mirror_following, "STILL_ELSEWHERE", 2.0)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, request_deadline=4.0)
    pulling = pull_beside(tmp_path / "mirror", upstream_proxy.url)
    try:
        pulling.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        received = asyncio.run(read_until_it_breaks(f"{mirror.url}/{REPO}/resolve/main/{BIG}"))
        assert time.monotonic() - started < 30
        assert FILES[BIG].startswith(received), "what went out is the file's"
    finally:
        pulling.kill()
        pulling.communicate()
        mirror.stop()


def test_a_mirror_gives_the_parameters_of_a_branch_it_holds_as_of_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path
) -> None:
    """Described by the upstream (a branch), the files had no chunk size, and the mirror took them for not
    held: `model_info(...).safetensors` was missing by the branch and present by its commit id. Before the
    pull, the upstream's (it was missing: an explorer's trial)."""
    import numpy as np
    from huggingface_hub import HfApi
    from safetensors.numpy import save_file

    folder = tmp_path / "src"
    folder.mkdir()
    save_file({"w": np.zeros((4, 8), np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(folder, REPO)
        node = LiveNode(upstream_depot)
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            api = HfApi(endpoint=mirror.url)
            said = api.model_info(REPO).safetensors
            assert said is not None and (said.parameters, said.total) == ({"F32": 32}, 32), "the upstream's"
            hf_hub_download(REPO, "config.json", cache_dir=client_env, endpoint=mirror.url)  # (held in part)
            commit = api.model_info(REPO).sha
            assert commit is not None and api.model_info(REPO, revision=commit).safetensors == said, (
                "by commit"
            )
            assert not mirror.depot.has_file(REPO, "model.safetensors")
            snapshot_download(REPO, cache_dir=client_env, endpoint=mirror.url)
            by_branch = api.model_info(REPO).safetensors
            assert by_branch is not None and (by_branch.parameters, by_branch.total) == ({"F32": 32}, 32)
            commit = api.model_info(REPO).sha
            assert commit is not None and api.model_info(REPO, revision=commit).safetensors == by_branch
        finally:
            mirror.stop()
            node.stop()
            mirror.depot.close()


def test_a_mirrored_or_pulled_repo_has_its_upstreams_card_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path
) -> None:
    """A mirror's card, and a pulled store's, was made of the upstream's tags alone: `card_data.language` and
    `datasets` were None, `model-index` gone, and `en`, `dataset:x` in the card's own tags (an explorer's
    trial). The upstream's `cardData` is kept (checked), its tags listed as it listed them; and a mirror
    gives the upstream's times."""
    from huggingface_hub import HfApi

    readme = (
        "---\nlicense: mit\nlanguage: [en]\ndatasets: [acme/corpus]\ntags: [test]\nlibrary_name: transformers\n"
        "model-index:\n- name: m\n  results: []\n---\n# m\n"
    )
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(
            write_model_dir(tmp_path / "src", {**FILES, "README.md": readme.encode()}), REPO
        )
        with upstream_depot.store.index.write("made a day old") as con:  # (a time no scan could say)
            con.execute("UPDATE repos SET created_at = created_at - 86400, updated_at = updated_at - 86400")
        node = LiveNode(upstream_depot)
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            there = HfApi(endpoint=node.url).model_info(REPO)
            assert there.card_data is not None and there.card_data.language == ["en"]
            monkeypatch.setenv("HF_ENDPOINT", node.url)
            with Depot(tmp_path / "pulled", chunk_size=SMALL_CHUNK) as pulled:
                pulled.pull(REPO)
                copy = LiveNode(pulled)
                try:
                    for served in (mirror.url, copy.url):
                        info = HfApi(endpoint=served).model_info(REPO)
                        assert info.card_data is not None, served
                        said = info.card_data.to_dict()
                        assert said["language"] == ["en"] and said["datasets"] == ["acme/corpus"], said
                        assert said["tags"] == ["test"] and said["model-index"] == [
                            {"name": "m", "results": []}
                        ]
                        assert info.tags == there.tags, served
                    # (its scan's time was said instead: an unchanged repo seemed to change at every scan)
                    through = HfApi(endpoint=mirror.url).model_info(REPO)
                    assert (through.created_at, through.last_modified) == (
                        there.created_at,
                        there.last_modified,
                    )
                finally:
                    copy.stop()
        finally:
            mirror.stop()
            node.stop()
            mirror.depot.close()


def test_an_open_mirror_sends_its_upstream_a_token_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path
) -> None:
    """MODELDEPOT_TOKEN was both what a mirror sent its upstream and what its own clients had to send: an
    open mirror of a node that takes a token could not be (every CI job behind it was given the upstream's
    token: an explorer's trial). MODELDEPOT_UPSTREAM_TOKEN goes to the upstream alone."""
    monkeypatch.delenv("MODELDEPOT_TOKEN", raising=False)
    monkeypatch.setenv("MODELDEPOT_UPSTREAM_TOKEN", "upstream-secret")
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        node = LiveNode(upstream_depot, token="upstream-secret")
        mirror = mirror_node(tmp_path, node.url, monkeypatch)  # (no token of its own: open)
        try:
            got = hf_hub_download(REPO, BIG, cache_dir=client_env, endpoint=mirror.url, token=False)
            assert Path(got).read_bytes() == FILES[BIG]
            assert requests.get(f"{node.url}/{REPO}/resolve/main/config.json", timeout=30).status_code == 401
        finally:
            mirror.stop()
            node.stop()


def test_a_mirror_lists_the_refs_of_a_repo_it_has_not_pulled_in_the_upstreams_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`list_repo_refs` was "repository not found" for a repo whose files the mirror served, and the model
    info of a repo not pulled yet repeated the caller's spelling of its id; once a client had fetched a file
    of `dev` alone, the model info (no revision) was `dev`'s."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), "Acme/Mixed")
        upstream_depot.import_dir(
            write_model_dir(tmp_path / "dev", {"config.json": b"{}"}), "Acme/Mixed", "dev"
        )
        node = LiveNode(upstream_depot)
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            api = HfApi(endpoint=mirror.url)
            assert api.model_info("acme/mixed").id == "Acme/Mixed"
            refs = api.list_repo_refs("acme/mixed")
            assert [(b.name, b.target_commit) for b in refs.branches] == [
                ("main", upstream_depot.resolve("Acme/Mixed"))
            ]
            with pytest.raises(RepositoryNotFoundError):
                api.list_repo_refs("acme/nothing")
            hf_hub_download(
                "acme/mixed", "config.json", revision="dev", cache_dir=tmp_path / "hf", endpoint=mirror.url
            )
            held = {b.name: b.target_commit for b in api.list_repo_refs("Acme/Mixed").branches}
            assert held == {
                "main": upstream_depot.resolve("Acme/Mixed"),
                "dev": upstream_depot.resolve("Acme/Mixed", "dev"),
            }
            # The repo's model info is main's, as its refs say, not the branch the store holds alone (it gave
            # dev's commit and files once a client had fetched one of dev: an explorer's trial)
            info = api.model_info("acme/mixed")
            assert info.sha == held["main"], (info.sha, held)
            assert sorted(s.rfilename for s in info.siblings or []) == sorted(FILES), info.siblings
            assert api.auth_check("acme/mixed") is None
        finally:
            mirror.stop()
            node.stop()
            mirror.depot.close()


def test_a_mirror_asks_its_upstream_for_a_main_it_lacks_once_not_at_every_model_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo the upstream holds without `main` (a node's, imported with `-r dev` only): once the mirror said
    the repo was its `dev` in model info, each model info without a revision asked the upstream for `main`
    again, twice (a review). Its answer is kept for the mirror's TTL."""
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(
            write_model_dir(tmp_path / "dev", {"config.json": b"{}"}), "Acme/Mixed", "dev"
        )
        dev = upstream_depot.resolve("Acme/Mixed", "dev")
        node = LiveNode(upstream_depot)
        proxy = FaultProxy(node.url)
        mirror = mirror_node(tmp_path, proxy.url, monkeypatch)
        try:
            hf_hub_download("Acme/Mixed", "config.json", revision="dev", cache_dir=tmp_path / "hf",
                            endpoint=mirror.url)  # fmt: skip
            asked = []
            for _ in range(3):
                plan = proxy.set("pass")
                answer = requests.get(f"{mirror.url}/api/models/Acme/Mixed", timeout=60)
                assert answer.status_code == 200 and answer.json()["sha"] == dev, answer.text
                asked.append([p for p in plan.api_requests if p.endswith("/revision/main")])
            assert asked[0] and asked[1:] == [[], []], asked
        finally:
            mirror.stop()
            proxy.stop()
            node.stop()
            mirror.depot.close()


def test_a_mirror_whose_upstream_is_its_hub_asks_it_as_the_hub(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --upstream $HF_ENDPOINT` (a mirror of the Hub alone) took the Hub for a depot node: every file
    cost it requests of /api/depot/v1 routes, each a 404 (an explorer's trial)."""
    from conftest import free_port

    proxied = upstream_proxy
    plan = proxied.set("pass", times=0)
    port = free_port()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    env = base_env(HF_ENDPOINT=proxied.url)
    env.pop("MODELDEPOT_SERVERS", None)
    node = subprocess.Popen([sys.executable, "-m", "modeldepot", "serve", "--home", str(tmp_path / "mirror"),
                             "--port", str(port), "--upstream", proxied.url, "--scrub-interval", "off"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return requests.get(f"{url}/api/depot/v1/health", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, 60, "the mirror to answer")
        fetched = hf_hub_download(REPO, "config.json", endpoint=url, cache_dir=tmp_path / "client")
        assert Path(fetched).read_bytes() == FILES["config.json"]
        assert plan.api_requests and not [p for p in plan.api_requests if p.startswith("/api/depot/")], (
            plan.api_requests
        )
    finally:
        node.terminate()
        node.wait(60)


def test_a_private_upstream_repo_asked_by_a_case_variant_is_named_as_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private upstream repo asked of a mirror by a case variant of its id was answered with the upstream's
    own spelling: a guess learned that it was there, and how it is spelled (a security trial)."""
    monkeypatch.setenv("MODELDEPOT_TOKEN", "upstream-token")  # (what the mirror sends its upstream)
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), "Acme/Secret-Model", private=True)
        node = LiveNode(upstream_depot, token="upstream-token")
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            for path in ("/api/models/acme/secret-model", "/acme/secret-model/resolve/main/config.json"):
                answer = requests.get(mirror.url + path, timeout=30)
                assert answer.status_code == 404, (path, answer.content)
                assert b"Secret-Model" not in answer.content and b"acme/secret-model" in answer.content, (
                    answer.content
                )
        finally:
            mirror.stop()
            node.stop()


def test_a_mirror_answers_an_absent_upstream_repo_as_a_private_one_to_a_client_without_its_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror whose Hub (HF_TOKEN) and depot server (MODELDEPOT_TOKEN, not set) are one tokened node
    answered an absent repo with a 502 naming the upstream and the mirror's credentials, a private one with
    a 404: anyone could tell which of their guesses were private repos (a security trial). A client with
    the mirror's token still hears why."""
    monkeypatch.delenv("MODELDEPOT_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), "acme/secret", private=True)
        node = LiveNode(upstream_depot, token="upstream-token")
        monkeypatch.setenv("HF_ENDPOINT", node.url)
        monkeypatch.setenv("HF_TOKEN", "upstream-token")
        mirror_depot = Depot(tmp_path / "mirror", chunk_size=SMALL_CHUNK, servers=[node.url])
        mirror = LiveNode(mirror_depot, mirror=True, owns_depot=True, control_token="mirror-control")
        try:
            # (a file or a branch the private repo lacks was said so, where its own files were "not found":
            # guesses of names told the repo was there, and which files and branches it has, an explorer's trial)
            for suffix in ("", "/resolve/main/config.json", "/resolve/main/nope.json",
                           "/resolve/no-such-branch/config.json", "/revision/no-such-branch"):  # fmt: skip
                answers = {}
                for repo in ("acme/secret", "acme/nothing"):
                    api = not suffix or suffix.startswith("/revision/")
                    path = f"/api/models/{repo}{suffix}" if api else f"/{repo}{suffix}"
                    answer = requests.get(mirror.url + path, timeout=30)
                    answers[repo] = (answer.status_code, answer.headers.get("X-Error-Code"),
                                     answer.content.replace(repo.encode(), b"REPO"))  # fmt: skip
                assert answers["acme/secret"] == answers["acme/nothing"], answers
                assert answers["acme/nothing"][:2] == (404, "RepoNotFound"), answers
                assert node.url.encode() not in answers["acme/nothing"][2]
            told = requests.get(mirror.url + "/api/models/acme/nothing", timeout=30,
                                headers={"Authorization": "Bearer mirror-control"})  # fmt: skip
            assert told.status_code == 502 and b"MODELDEPOT_TOKEN" in told.content, told.content
        finally:
            mirror.stop()
            node.stop()


def test_a_repo_the_upstream_made_private_is_no_longer_served_to_anyone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror without a token of its own hides what is private upstream, but a repo it mirrored while
    public went on being served to anyone after the upstream made it private, its new commits too, listed
    as "private": false (a trial): the store's flag (public) won over the upstream's."""
    monkeypatch.setenv("MODELDEPOT_MIRROR_TTL", "0")  # (the upstream is asked again at once)
    monkeypatch.setenv("MODELDEPOT_TOKEN", "upstream-token")  # (what the mirror sends its upstream)
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        node = LiveNode(upstream_depot, token="upstream-token")
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/config.json", timeout=30)
            assert answer.status_code == 200 and answer.content == FILES["config.json"]
            public_commit = answer.headers["X-Repo-Commit"]
            changed = write_model_dir(tmp_path / "secret", {**FILES, "config.json": b'{"secret": 1}'})
            upstream_depot.import_dir(changed, REPO, private=True)
            for path in (
                f"/{REPO}/resolve/main/config.json",
                f"/api/models/{REPO}",
                f"/{REPO}/resolve/main/{BIG}",
                f"/{REPO}/resolve/{public_commit}/config.json",  # (held: it cannot move, the store answers)
                f"/api/models/{REPO}/revision/{public_commit}",
            ):
                answer = requests.get(mirror.url + path, timeout=30)
                assert answer.status_code == 404, (path, answer.status_code, answer.content[:200])
            assert mirror.depot.repo_info(REPO).private  # (kept behind a token while the upstream hides it)
            # The upstream shows it again (public, or back after a removal): so does the mirror (it hid it for
            # good, a repo gone for a moment or a wrong token once, an explorer's trial); but not one its
            # operator made private
            upstream_depot.import_dir(write_model_dir(tmp_path / "public", FILES), REPO, private=False)
            answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/config.json", timeout=30)
            assert answer.status_code == 200 and answer.content == FILES["config.json"], answer.content[:200]
            assert not mirror.depot.repo_info(REPO).private
            assert requests.get(f"{mirror.url}/api/models/{REPO}", timeout=30).json()["private"] is False
            mirror.depot.import_dir(write_model_dir(tmp_path / "mine", FILES), REPO, private=True)
            answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/config.json", timeout=30)
            assert answer.status_code == 404 and mirror.depot.repo_info(REPO).private, (
                "the operator's word stays"
            )
        finally:
            mirror.stop()
            node.stop()


def test_a_store_from_before_hidden_at_takes_its_pulled_private_repos_as_hidden_by_their_upstream(
    tmp_path: Path,
) -> None:
    """Migrations 13 and 14: a repo pulled private (its upstream's scan said private or gated) is shown again
    once its upstream shows it; one its operator made private stays so: imported private here, adopted
    `--private` and pulled since, or pulled and given a branch imported `--private` (its upstream's scan
    said public: shown again, it went public, a review's trial)."""
    from modeldepot.hub.manifest import save_scan

    origin = "http://127.0.0.1:9"
    upstream_said = {"acme/pulled": {"private": True, "gated": False}, "acme/gated": {"private": False, "gated": "auto"},
                     "acme/adopted": {"private": False, "gated": False},
                     "acme/branched": {"private": False, "gated": False}}  # fmt: skip
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        for repo in (*upstream_said, "acme/mine"):
            depot.import_dir(write_model_dir(tmp_path / repo, FILES), repo, private=True)
        depot.import_dir(
            write_model_dir(tmp_path / "dev", {"x.txt": b"x"}), "acme/branched", "dev", private=True
        )
        for repo, info in upstream_said.items():  # (each one's pull saved its upstream's scan)
            save_scan(depot.store, repo, "main", depot.resolve(repo), origin, info, [])
        with depot.store.index.write("a test") as con:
            con.execute("UPDATE repos SET origin = ? WHERE repo_id != 'acme/mine'", (origin,))
            # (as pulls and adoptions leave them: no tree recorded; acme/branched's main is pulled)
            for repo in upstream_said:
                con.execute("UPDATE revisions SET tree_oid = NULL WHERE repo_id = ? AND commit_id = ?",
                            (repo, depot.resolve(repo)))  # fmt: skip
            con.execute("DROP TABLE evictions")
            con.execute("DROP INDEX blobs_not_ok")
            con.execute("ALTER TABLE repos DROP COLUMN hidden_at")
            con.execute("ALTER TABLE refs DROP COLUMN tag")
            con.execute("ALTER TABLE repos DROP COLUMN gated_only")
            con.execute("DROP TABLE ref_history")
            con.execute("PRAGMA user_version = 12")
    with Depot(tmp_path / "store") as depot:
        hidden = {repo for repo in (*upstream_said, "acme/mine") if depot.store.hidden_by_upstream(repo)}
        assert hidden == {"acme/pulled", "acme/gated"}
        assert not depot.store.show_repo_again("acme/adopted", "http://127.0.0.1:9/")
        assert not depot.store.show_repo_again("acme/pulled", "http://127.0.0.1:8"), "another source's word"
        assert depot.store.show_repo_again("acme/pulled", "http://127.0.0.1:9/")
        assert not depot.repo_info("acme/pulled").private and depot.repo_info("acme/mine").private


def test_a_mirror_lists_the_commits_of_a_repo_and_branch_it_describes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cold mirror, model_info answered a repo and list_repo_commits raised RepositoryNotFoundError (and a
    branch not pulled under its own name, RevisionNotFoundError): the listing spoke for the store alone (an
    explorer's trial). A revision the store does not hold is listed as the upstream's one commit."""
    from huggingface_hub import HfApi

    with mirror_of_a_node(tmp_path, monkeypatch) as (upstream_depot, mirror):
        api = HfApi(endpoint=mirror.url)
        head = upstream_depot.resolve(REPO)
        assert api.model_info(REPO).sha == head
        assert [c.commit_id for c in api.list_repo_commits(REPO)] == [head]
        upstream_depot.import_dir(write_model_dir(tmp_path / "dev", {"config.json": b'{"dev": 1}'}), REPO,
                                  revision="dev")  # fmt: skip
        dev = upstream_depot.resolve(REPO, "dev")
        assert [c.commit_id for c in api.list_repo_commits(REPO, revision="dev")] == [dev]
        hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "client", endpoint=mirror.url)  # (held now)
        assert [c.commit_id for c in api.list_repo_commits(REPO)] == [head]


@pytest.mark.parametrize("hub_state", ["refused", "503", "gated"])
def test_a_hub_outage_hides_nothing_a_mirror_holds_and_a_refusal_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_state: str
) -> None:
    """A mirror of a node that lacks a repo, with the Hub behind it: during a Hub outage the node's "not here"
    was taken for the whole answer, the repo pulled from the Hub was hidden for good (404 to everyone, after
    the Hub came back, after a restart), and a branch only the Hub has was a RevisionNotFound, which keeps
    huggingface_hub from its own cache (an explorer's trial). An outage (no answer, or a 5xx) is a 502 now,
    and hides nothing; the Hub's own refusal (gated since) still hides the repo, depot nodes beside it or not
    (a review)."""
    from aiohttp.web_runner import AppRunner

    from conftest import BackgroundServer
    from test_source_chain import _app, _forward

    monkeypatch.setenv("MODELDEPOT_MIRROR_TTL", "0")
    with (
        Depot(tmp_path / "node", chunk_size=SMALL_CHUNK) as node_depot,
        Depot(tmp_path / "hub", chunk_size=SMALL_CHUNK) as hub_depot,
    ):
        node_depot.import_dir(write_model_dir(tmp_path / "other", {"config.json": b"{}"}), "acme/other")
        hub_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        node, hub_storage = LiveNode(node_depot), LiveNode(hub_depot)
        state = {"now": "up"}

        async def handle(request: web.Request) -> web.Response:
            if state["now"] == "503":
                return web.Response(status=503, text="upstream connect error")
            if state["now"] == "gated":
                return web.Response(status=403, headers={"X-Error-Code": "GatedRepo",
                                                         "X-Error-Message": f"Access to model {REPO} is restricted"})  # fmt: skip
            return await _forward(request, hub_storage.url)

        app = _app()
        app.router.add_route("*", "/{tail:.*}", handle)
        hub = BackgroundServer(AppRunner(app), name="hub")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        mirror = LiveNode(Depot(tmp_path / "mirror", chunk_size=SMALL_CHUNK, servers=[node.url]), mirror=True,
                          owns_depot=True)  # fmt: skip
        try:
            answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/config.json", timeout=30)
            assert answer.status_code == 200 and answer.content == FILES["config.json"]
            if hub_state == "refused":
                hub.stop()
            state["now"] = hub_state
            if hub_state == "gated":
                answer = requests.get(f"{mirror.url}/api/models/{REPO}", timeout=30)
                assert answer.status_code != 200 and mirror.depot.repo_info(REPO).private, answer.status_code
                return
            for path in (f"/{REPO}/resolve/main/config.json", f"/api/models/{REPO}"):
                answer = requests.get(mirror.url + path, timeout=30)
                assert answer.status_code == 200, (path, answer.status_code, answer.content[:300])
            missing = requests.get(f"{mirror.url}/api/models/{REPO}/revision/hub-only-branch", timeout=30)
            assert missing.status_code == 502, (missing.status_code, missing.content[:300])
            assert not mirror.depot.repo_info(REPO).private, "nothing hidden for an outage"
        finally:
            mirror.stop()
            hub.stop()
            node.stop()
            hub_storage.stop()


def test_a_repo_the_upstream_no_longer_shows_is_served_behind_the_token_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo made private beyond the mirror's credentials (or deleted) is "not found" upstream: the mirror
    answered from what it held, to anyone, listed public (a review). It is kept behind the token now."""
    monkeypatch.setenv("MODELDEPOT_MIRROR_TTL", "0")
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        node = LiveNode(upstream_depot)
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/config.json", timeout=30)
            assert answer.status_code == 200
            upstream_depot.remove(REPO)
            for path in (f"/{REPO}/resolve/main/config.json", f"/api/models/{REPO}"):
                answer = requests.get(mirror.url + path, timeout=30)
                assert answer.status_code == 404, (path, answer.status_code, answer.content[:200])
            assert mirror.depot.repo_info(REPO).private
        finally:
            mirror.stop()
            node.stop()


def test_a_branch_the_upstream_deleted_is_not_served_from_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A branch removed upstream (it named a bad model) answered RevisionNotFound there, and the mirror, once
    it had held it, served its old commit for good (an explorer's trial); a file removed upstream, or a
    whole repo, it stopped serving. The commit stays the mirror's to serve by its id."""
    monkeypatch.setenv("MODELDEPOT_MIRROR_TTL", "0")
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        commit = upstream_depot.import_dir(
            write_model_dir(tmp_path / "bad", {"config.json": b'{"bad": true}'}), REPO, "bad"
        ).commit_id
        node = LiveNode(upstream_depot)
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            assert requests.get(f"{mirror.url}/{REPO}/resolve/bad/config.json", timeout=30).status_code == 200
            upstream_depot.remove(REPO, revision="bad")
            for path in (f"/{REPO}/resolve/bad/config.json", f"/api/models/{REPO}/revision/bad"):
                answer = requests.get(mirror.url + path, timeout=30)
                assert (answer.status_code, answer.headers.get("X-Error-Code")) == (
                    404,
                    "RevisionNotFound",
                ), path
            by_commit = requests.get(f"{mirror.url}/{REPO}/resolve/{commit}/config.json", timeout=30)
            assert by_commit.status_code == 200 and by_commit.content == b'{"bad": true}'
        finally:
            mirror.stop()
            node.stop()


def test_a_mirrors_refs_follow_the_upstreams_branches_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A branch moved upstream was listed at its old commit by the mirror's refs while its model info and
    files followed it, and one deleted there was listed still (an explorer's trial): only main followed."""
    from huggingface_hub import HfApi

    monkeypatch.setenv("MODELDEPOT_MIRROR_TTL", "0")
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        upstream_depot.import_dir(write_model_dir(tmp_path / "dev1", {"config.json": b"{}"}), REPO, "dev")
        node = LiveNode(upstream_depot)
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            api = HfApi(endpoint=mirror.url)
            assert requests.get(f"{mirror.url}/{REPO}/resolve/dev/config.json", timeout=30).status_code == 200
            moved = upstream_depot.import_dir(
                write_model_dir(tmp_path / "dev2", {"config.json": b'{"v": 2}'}), REPO, "dev"
            ).commit_id
            branches = {ref.name: ref.target_commit for ref in api.list_repo_refs(REPO).branches}
            assert branches["dev"] == moved == api.model_info(REPO, revision="dev").sha
            upstream_depot.remove(REPO, revision="dev")
            assert "dev" not in {ref.name for ref in api.list_repo_refs(REPO).branches}
        finally:
            mirror.stop()
            node.stop()


@pytest.mark.parametrize("fetched", ["main", "dev"])
def test_a_branch_a_client_fetched_by_commit_id_is_answered_by_the_store_in_an_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path, fetched: str
) -> None:
    """huggingface_hub describes a branch (model_info) and fetches its files by the commit id it was given.
    The mirror pulled them by that id, and recorded the branch only when the repo's saved scan (its last
    one) was of it: with another branch described in between, the commit was held whole with no branch
    naming it, and once the upstream was down and the scans had expired, resolve/<branch>/... was a 502
    and hf_hub_download failed, the same by commit id a 200 (an explorer's trial). Every branch a kept scan
    saw at the commit is recorded (main and stable: two branches, one commit)."""
    from huggingface_hub import HfApi

    dev_files = {"config.json": b'{"model_type": "bert", "hidden_size": 16}', "tokenizer.json": b"{}"}
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        upstream_depot.import_dir(tmp_path / "src", REPO, "stable")
        upstream_depot.import_dir(write_model_dir(tmp_path / "dev", dev_files), REPO, "dev")
        commits = {branch: upstream_depot.resolve(REPO, branch) for branch in ("main", "stable", "dev")}
        assert commits["main"] == commits["stable"] != commits["dev"]
        node = LiveNode(upstream_depot)
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            api = HfApi(endpoint=mirror.url)
            # The branch fetched is described first, the others after it (the repo's saved scan is another's)
            for branch in sorted(commits, key=lambda name: name != fetched):
                assert api.model_info(REPO, revision=branch).sha == commits[branch]
            snapshot_download(REPO, revision=fetched, cache_dir=client_env, endpoint=mirror.url)
            recorded = {name: commits[fetched] for name in commits if commits[name] == commits[fetched]}
            assert mirror.depot.repo_info(REPO).refs == recorded
            node.stop()  # the upstream is down, and the mirror's scans expire
            mirror.depot.config = dataclasses.replace(mirror.depot.config, mirror_ttl=0.0)
            expected = dev_files if fetched == "dev" else FILES
            for branch in recorded:
                answer = requests.get(f"{mirror.url}/{REPO}/resolve/{branch}/config.json", timeout=30)
                assert (answer.status_code, answer.content) == (200, expected["config.json"]), branch
                path = hf_hub_download(REPO, "config.json", revision=branch, cache_dir=tmp_path / f"hf-{branch}",
                                       endpoint=mirror.url)  # fmt: skip
                assert Path(path).read_bytes() == expected["config.json"]
        finally:
            mirror.stop()
            node.stop()
            mirror.depot.close()


def test_a_mirror_never_moves_a_branch_back_to_the_commit_a_scan_it_kept_saw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path
) -> None:
    """The mirror keeps a branch's scan a while (MODELDEPOT_MIRROR_TTL), and its pulls point the branch at
    the commit that scan saw: the store may have learned of a newer commit for the branch since (a
    `modeldepot pull` beside the node), and a pull of the older commit's file by the branch moved the branch
    back to it (one by that commit's id points the branches kept scans saw there: it would have too). The
    branch stays at the newer commit."""
    from huggingface_hub import HfApi

    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        old = upstream_depot.resolve(REPO)
        node = LiveNode(upstream_depot)
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            assert HfApi(endpoint=mirror.url).model_info(REPO).sha == old  # (kept for 30 s)
            newer = {**FILES, "config.json": b'{"model_type": "bert", "hidden_size": 16}'}
            upstream_depot.import_dir(write_model_dir(tmp_path / "new", newer), REPO)
            new = upstream_depot.resolve(REPO)
            mirror.depot.pull(REPO)  # (as a `modeldepot pull` beside the node: it learns of the new commit)
            assert mirror.depot.repo_info(REPO).refs == {"main": new}
            path = hf_hub_download(
                REPO, "config.json", revision=old, cache_dir=client_env, endpoint=mirror.url
            )
            assert Path(path).read_bytes() == FILES["config.json"]
            assert mirror.depot.repo_info(REPO).refs == {"main": new}, "not moved back by a pull by commit id"
            answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/tokenizer.json", timeout=30)
            assert answer.status_code == 200 and mirror.depot.has_file(REPO, "tokenizer.json", old)
            assert mirror.depot.repo_info(REPO).refs == {"main": new}, "nor by a pull by the branch"
        finally:
            mirror.stop()
            node.stop()
            mirror.depot.close()


def test_a_branch_served_from_a_commit_the_mirror_held_is_listed_in_its_refs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: Path
) -> None:
    """A branch at a commit the mirror already held was served from its store and never recorded:
    `revision_exists` said True and downloads by it worked, but `list_repo_refs` did not name it (an
    explorer's trial). It is recorded as a pull records the branches it finds."""
    from huggingface_hub import HfApi

    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        upstream_depot.import_dir(tmp_path / "src", REPO, "feature/x")
        commit = upstream_depot.resolve(REPO)
        assert upstream_depot.resolve(REPO, "feature/x") == commit
        node = LiveNode(upstream_depot)
        mirror = mirror_node(tmp_path, node.url, monkeypatch)
        try:
            hf_hub_download(REPO, "config.json", cache_dir=client_env, endpoint=mirror.url)
            assert mirror.depot.repo_info(REPO).refs == {"main": commit}
            got = hf_hub_download(REPO, "config.json", revision="feature/x", cache_dir=tmp_path / "hf-x",
                                  endpoint=mirror.url)  # fmt: skip
            assert Path(got).read_bytes() == FILES["config.json"]
            assert mirror.depot.repo_info(REPO).refs == {"main": commit, "feature/x": commit}
            refs = HfApi(endpoint=mirror.url).list_repo_refs(REPO)
            assert {b.name: b.target_commit for b in refs.branches} == {"main": commit, "feature/x": commit}
        finally:
            mirror.stop()
            node.stop()
            mirror.depot.close()


def test_a_chunk_slow_to_land_is_followed_as_it_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """On a slow upstream a reader waited for each whole chunk (16 MiB: 16 s at 1 MiB/s, four at once each a
    quarter of the link), and huggingface_hub's 10 s read timeout broke the download again and again, below
    1 MiB/s for good (an explorer's trial). A chunk slow to land is now followed as its bytes come."""
    slow_chunks(monkeypatch)
    # Each chunk of 64 KiB takes 16 pieces of 4 KiB, 0.1 s apart: 1.6 s
    upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.1, slow_piece=4096)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        with requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", stream=True, timeout=30) as answer:
            assert answer.status_code == 200
            first = answer.raw.read(16384)
            # (bytes of the first chunk came before it landed: less than one chunk crossed the proxy)
            assert first == FILES[BIG][:16384] and upstream_proxy.plan.body_bytes < SMALL_CHUNK
            upstream_proxy.set("pass")  # (the rest at full speed)
            rest = answer.raw.read()
        assert first + rest == FILES[BIG]
        assert not mirror.runner.app[MIRROR].broke(REPO, BIG)
    finally:
        mirror.stop()


def test_bytes_followed_ahead_that_the_landed_chunk_refutes_break_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """What went out of a chunk before it landed is compared with the chunk once checked: a source that sent
    a wrong byte (then the chunk, fetched again, landed right) breaks the answer, and a resume of it is
    answered whole, never joined to the bytes sent."""
    slow_chunks(monkeypatch)
    plan = upstream_proxy.set("flip-slow", times=1, path_suffix=BIG, slow_delay=0.1, slow_piece=4096)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        received = asyncio.run(read_until_it_breaks(url))
        assert plan.injected == 1 and 100 < len(received) < len(FILES[BIG])
        assert received[100] != FILES[BIG][100]  # (the flipped byte went out, ahead of the chunk's check)
        assert mirror.runner.app[MIRROR].broke(REPO, BIG)
        resumed = requests.get(url, headers={"Range": f"bytes={len(received)}-"}, timeout=60)
        assert resumed.status_code == 200 and resumed.content == FILES[BIG]  # (whole: not joined)
    finally:
        mirror.stop()


def test_a_vouched_range_slow_to_land_still_goes_with_its_own_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """Bytes followed ahead of a chunk a node vouches for are proven once it lands: a range inside the file (a
    safetensors header read) still goes with its own chunks, not waiting for the whole file's pull and check
    (it did, on a slow link, and timed out: a review's trial)."""
    slow_chunks(monkeypatch)
    plan = upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.03, slow_piece=4096)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", headers={"Range": "bytes=0-999"},
                              timeout=60)  # fmt: skip
        assert (answer.status_code, answer.content) == (206, FILES[BIG][:1000])
        assert plan.body_bytes < len(FILES[BIG]) / 2, "the range waited for the whole file"
        assert not mirror.runner.app[MIRROR].broke(REPO, BIG)
    finally:
        wait_until(lambda: mirror.depot.has_file(REPO, BIG), 120, "the pull to end")
        mirror.stop()


def test_a_client_that_left_with_bytes_sent_ahead_is_not_resumed_onto_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """Bytes followed ahead, then the client leaves (Ctrl-C, its own timeout) before the chunk lands; the chunk
    fails its check (a flipped byte), is fetched again and lands right, and the pull succeeds. The resume was
    a 206 joined to the wrong byte (a review's trial): it is answered whole."""
    slow_chunks(monkeypatch)
    plan = upstream_proxy.set("flip-slow", times=1, path_suffix=BIG, slow_delay=0.1, slow_piece=4096)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"

    try:
        received = asyncio.run(read_then_leave(url, 8192))
        assert plan.injected == 1 and received[100] != FILES[BIG][100], "the flipped byte went out ahead"
        wait_until(lambda: mirror.depot.has_file(REPO, BIG), 120, "the pull to end")
        resumed = requests.get(url, headers={"Range": f"bytes={len(received)}-"}, timeout=60)
        assert (resumed.status_code, resumed.content) == (200, FILES[BIG])  # (whole: never joined to them)
    finally:
        mirror.stop()


def test_resume_while_the_old_reader_waits_on_a_stalled_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """A client that timed out on a stalled chunk whose bytes went ahead resumes at once, while its old
    response still waits (it learns the client left at its next write): that resume was a 206, joined to a
    byte the chunk's check then refuted (a review's trial). It is answered whole."""
    slow_chunks(monkeypatch)
    # the first chunk's bytes come 4 KiB every 1.5 s (a stalling link), a byte flipped
    plan = upstream_proxy.set("flip-slow", times=1, path_suffix=BIG, slow_delay=1.5, slow_piece=4096)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"

    async def leave_and_resume() -> tuple[bytes, int, bytes, bool]:
        got = bytearray()
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                assert response.status == 200
                async for piece in response.content.iter_any():
                    got += piece
                    if len(got) >= 4096:
                        break  # its read timeout: it leaves
            # huggingface_hub: sleep(1) then resume
            await asyncio.sleep(0.3)
            async with session.get(url, headers={"Range": f"bytes={len(got)}-"}) as resumed:
                body = await resumed.read()
                return bytes(got), resumed.status, body, resumed.headers.get("Retry-After") == "2"

    try:
        got, status, body, retry_later = asyncio.run(leave_and_resume())
        assert got[100] != FILES[BIG][100], "the flipped byte went out ahead"
        # (still to be checked: neither a range joined to them nor the whole file, but "retry in a while")
        assert status == 429 and retry_later, (status, body[:200])
        plan.slow_delay = 0.001  # the link is fast again
        wait_until(lambda: mirror.depot.has_file(REPO, BIG), 60, "the mirror's pull to end")
        again = requests.get(
            url, headers={"Range": f"bytes={len(got)}-"}, timeout=60
        )  # (the client's next try)
        assert (again.status_code, again.content) == (200, FILES[BIG])
    finally:
        mirror.stop()


def test_a_client_that_left_with_bytes_sent_ahead_that_were_right_resumes_as_a_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """Bytes sent ahead of a chunk's check are checked once it lands, after their client left: right, its
    resume is a range as any other. Every client that left on a slow link had been answered whole for an hour,
    and a streaming reader (HfFileSystem's) appended that whole file to what it had (an explorer's trial)."""
    slow_chunks(monkeypatch)
    upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.05, slow_piece=4096)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"

    try:
        got = asyncio.run(read_then_leave(url, 8192))
        assert 8192 <= len(got) < SMALL_CHUNK and got == FILES[BIG][: len(got)]
        upstream_proxy.set("pass")
        wait_until(lambda: mirror.depot.has_file(REPO, BIG), 60, "the mirror's pull to end")
        resumed = requests.get(url, headers={"Range": f"bytes={len(got)}-"}, timeout=60)
        assert resumed.status_code == 206 and got + resumed.content == FILES[BIG]
        assert not mirror.runner.app[MIRROR].broke(REPO, BIG)
    finally:
        mirror.stop()


def test_a_client_that_left_a_follow_elsewhere_whose_download_was_refuted_is_not_resumed_onto_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """The same for a response that followed another process's download (a `modeldepot pull` beside the
    node): that download's file failed its check, the mirror's pull took over and succeeded, and the resume of
    a client that had left was a 206 onto the refuted byte (a review's trial)."""

    # the other process pulls from a Hub-like upstream (no chunk digests): chunk 0 with a flipped byte, once
    plan = upstream_proxy.set("flip", times=-1, path_suffix=BIG)
    plan.times = 1
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)
    home = tmp_path / "mirror"
    env = base_env(
        HF_ENDPOINT=upstream_proxy.url,
        MODELDEPOT_CHUNK_SIZE=str(SMALL_CHUNK),
        MODELDEPOT_CONNECTIONS_PER_SOURCE="1",
    )  # (in order: the flipped byte is in chunk 0)
    env.pop("MODELDEPOT_SERVERS", None)
    pulling = subprocess.Popen(
        [sys.executable, "-m", "modeldepot", "pull", REPO, "--home", str(home), "--max-rate", "256KiB/s"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(
        lambda: (home / "partials").exists() and any((home / "partials").glob("*.log")), 30, "a download"
    )
    url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"

    try:
        got = asyncio.run(read_then_leave(url, SMALL_CHUNK))
        assert got != FILES[BIG][: len(got)], "the flipped byte went out (from the other process's download)"
        pulling.communicate(timeout=120)
        wait_until(lambda: mirror.depot.has_file(REPO, BIG), 60, "the mirror's pull to end")
        resumed = requests.get(url, headers={"Range": f"bytes={len(got)}-"}, timeout=60)
        assert (resumed.status_code, resumed.content) == (200, FILES[BIG])
    finally:
        pulling.kill()
        pulling.communicate()
        mirror.stop()


@pytest.mark.parametrize("then", ["private", "public"])
def test_a_gated_upstream_repo_is_described_to_anyone_and_its_files_take_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """A repo its upstream gates (Llama, Gemma): the Hub describes it to anyone and answers its files with
    GatedRepo; a mirror said "Repository Not Found" to clients without its token, and scripts branching on
    `repo_exists` took a typo for the cause (an explorer's trial). Its description is anyone's, its files
    the token's, from the upstream's scan and from the store alike (the upstream out of reach); made
    private upstream it is hidden whole, made public it is anyone's."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from liar import REPO, Liar

    liar = Liar()
    liar.lie(gated="manual")
    monkeypatch.setenv("MODELDEPOT_MIRROR_TTL", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", liar.url)
    mirror = LiveNode(Depot(tmp_path / "mirror"), control_token="node-token", mirror=True, owns_depot=True)
    anyone = HfApi(endpoint=mirror.url, token=False)

    def download(token: str | bool, client: str) -> bytes:
        return Path(hf_hub_download(REPO, "config.json", cache_dir=tmp_path / client, endpoint=mirror.url,
                                    token=token)).read_bytes()  # fmt: skip

    def described_gated_and_closed(client: str) -> None:
        assert anyone.repo_exists(REPO)
        info = anyone.model_info(REPO)
        assert info.gated == "manual" and not info.private, (info.gated, info.private)
        assert [s.rfilename for s in info.siblings or []] == ["config.json"]
        assert anyone.list_repo_files(REPO) == ["config.json"]
        with pytest.raises(GatedRepoError):
            download(False, client)
        with pytest.raises(GatedRepoError):
            anyone.auth_check(REPO)
        head = requests.head(f"{mirror.url}/{REPO}/resolve/main/config.json", timeout=30)
        assert (head.status_code, head.headers.get("X-Error-Code")) == (401, "GatedRepo")
        raw = requests.get(f"{mirror.url}/{REPO}/raw/main/config.json", timeout=30)
        assert raw.status_code == 401 and raw.content != liar.files["config.json"]

    try:
        described_gated_and_closed("anyone-before")  # from the upstream's scan: nothing held yet
        assert download("node-token", "member") == liar.files["config.json"]
        assert mirror.depot.repo_info(REPO).private
        # Held now, and scanned again: still the gated repo, not one private (the store's flag was taken for
        # the upstream's, and the repo hidden whole at its next scan, a review's trial)
        described_gated_and_closed("anyone-held-scanned")
        liar.refusal = (503, {}, b"upstream connect error")  # the upstream out of reach: the store answers
        described_gated_and_closed("anyone-held")
        assert [m["id"] for m in requests.get(f"{mirror.url}/api/models", timeout=30).json()] == [REPO]
        liar.refusal = None
        if then == "private":
            liar.lie(gated=False, private=True)
            for path in (f"/api/models/{REPO}", f"/{REPO}/resolve/main/config.json"):
                answer = requests.get(mirror.url + path, timeout=30)
                assert answer.headers.get("X-Error-Code") == "RepoNotFound", (path, answer.status_code)
            liar.refusal = (503, {}, b"upstream connect error")  # the store hides it whole now too
            with pytest.raises(RepositoryNotFoundError):
                anyone.model_info(REPO)
            assert requests.get(f"{mirror.url}/api/models", timeout=30).json() == []
        else:
            liar.lie(gated=False)
            assert download(False, "anyone-after") == liar.files["config.json"]
            liar.refusal = (503, {}, b"upstream connect error")
            assert anyone.model_info(REPO).gated is False and not mirror.depot.repo_info(REPO).private
        assert download("node-token", "member-after") == liar.files["config.json"]
    finally:
        mirror.stop()
        liar.stop()
