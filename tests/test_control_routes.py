"""The control routes (server/control_routes.py) on live nodes: pulls started over HTTP (in the background,
once), preload, pin, unpin and remove; what they refuse, and who may call them; every method and answer
against the OpenAPI document; and the dashboard's files (served without the token, holding nothing)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import modeldepot
from conftest import (
    BackgroundServer,
    LiveNode,
    Mounts,
    closed_port,
    flip_byte,
    free_port,
    wait_until,
    write_model_dir,
    write_partial,
)
from controlnodes import (
    API,
    AUTH,
    CONTROL,
    CONTROL_TOKEN,
    FILES,
    JSON,
    Q4F16,
    REPO,
    TOKEN,
    HoldingProxy,
    OpenNode,
    Reply,
    Serving,
    call,
    pulling_depot,
    source_node,
)
from modeldepot import Depot
from modeldepot.errors import PullRunningError, StoreFullError, UpstreamError
from modeldepot.server import create_app
from modeldepot.server.connections import NodeRunner
from modeldepot.server.context import CONTROL_TOKEN as APP_CONTROL_TOKEN
from modeldepot.server.control_routes import CONTROL_PATHS, MAX_CONTROL_BODY, PULLS, PullJob, PullJobs
from modeldepot.server.dashboard import ASSETS
from modeldepot.server.openapi import openapi_document
from modeldepot.store.layout import size_text
from test_openapi import Checker, escape


@pytest.fixture
def source(tmp_path: Path) -> Iterator[LiveNode]:
    with source_node(tmp_path) as node:
        yield node


@pytest.fixture
def proxy(source: LiveNode) -> Iterator[HoldingProxy]:
    """The source, behind a proxy that records what is asked of it and can hold a transfer midway."""
    front = HoldingProxy(source.url)
    yield front
    front.stop()


@pytest.fixture
def local(tmp_path: Path, proxy: HoldingProxy, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    with pulling_depot(tmp_path / "local", proxy.url, monkeypatch) as depot:
        yield depot


@pytest.fixture
def guarded(local: Depot) -> Iterator[LiveNode]:
    node = LiveNode(local, token=TOKEN)
    yield node
    node.stop()


@pytest.fixture
def open_node(local: Depot) -> Iterator[LiveNode]:
    """The same store served without a token: reads open, control with CONTROL (its control token)."""
    node = OpenNode(local)
    yield node
    node.stop()


class HeldPulls:
    """``depot.pull_async`` made to wait until :meth:`release`: a pull stays running as long as a test needs."""

    def __init__(self, depot: Depot, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.started = 0
        real = depot.pull_async

        async def held(*args: Any, **kwargs: Any) -> Any:
            self.started += 1
            while not self.gate.is_set():  # cancellable at once (the node stopping)
                await asyncio.sleep(0.01)
            return await real(*args, **kwargs)

        monkeypatch.setattr(depot, "pull_async", held)

    def release(self) -> None:
        self.gate.set()


def held_scans(depot: Depot, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """``depot``'s scans made to wait (a slow Hub): (set as one starts, to be set to let it go on)."""
    scanning, go_on = threading.Event(), threading.Event()
    real = depot.manifest_for

    def slow_scan(*args: Any, **kwargs: Any) -> Any:
        scanning.set()
        go_on.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(depot, "manifest_for", slow_scan)
    return scanning, go_on


def no_space(doing: str = "writing the index") -> Any:
    """``Index.write`` on a disk so full that no transaction can start."""
    raise StoreFullError(f"no space left while {doing}: nothing was changed")


def pull_state(node: LiveNode, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    reply = call(node.port, "GET", f"{API}/pulls/{job_id}", headers=headers)
    assert reply.status == 200, reply.body
    return reply.json()  # type: ignore[no-any-return]


def finished(node: LiveNode, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (state := pull_state(node, job_id, headers))["state"] != "running" and state,
        30,
        f"pull {job_id} to finish",
    )


# -- pulls ----------------------------------------------------------------------------------------------------


def test_a_pull_runs_in_the_background_once_and_reports_its_result(
    guarded: LiveNode, local: Depot, source: LiveNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldPulls(local, monkeypatch)
    first = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["Q4F16"]}, AUTH)
    assert first.status == 202, first.body
    job = first.json()
    assert job["state"] == "running" and job["quants"] == ["q4f16"]  # the repo's own name for it
    assert (job["repo"], job["revision"], job["commit_id"]) == (REPO, "main", source.depot.resolve(REPO))
    assert job["bytes_total"] == sum(len(FILES[p]) for p in Q4F16) and job["bytes_done"] == 0
    assert job["result"] is None and job["error"] is None and job["finished_at"] is None
    # The same pull again while it runs (names in any case, the revision said or not): the running one.
    for body in (
        {"repo": REPO, "quants": ["q4f16"]},
        {"repo": REPO, "quants": ["q4f16", "Q4F16"], "revision": "main"},
    ):
        again = call(guarded.port, "POST", f"{API}/pulls", body, AUTH)
        assert again.status == 200 and again.json()["id"] == job["id"], again.body
    listed = call(guarded.port, "GET", f"{API}/pulls", headers=AUTH).json()
    assert [j["id"] for j in listed] == [job["id"]]
    assert pull_state(guarded, job["id"], AUTH)["state"] == "running"
    assert held.started == 1  # one pull, however many asked

    held.release()
    done = finished(guarded, job["id"], AUTH)
    assert done["state"] == "done" and done["error"] is None and done["finished_at"] >= done["started_at"]
    assert done["bytes_done"] == done["bytes_total"] == done["result"]["bytes_total"]
    assert (
        done["result"]["variants"] == ["q4f16"] and done["result"]["bytes_downloaded"] == done["bytes_total"]
    )
    assert {f.path for f in local.list_files(REPO)} == set(Q4F16)
    variant = call(guarded.port, "GET", f"{API}/repos/{REPO}/manifest", headers=AUTH).json()["variants"]
    assert {v["name"]: v["status"] for v in variant}["q4f16"] == "downloaded"
    # (`?revision=x` was ignored, and main's manifest answered: a trial)
    refused = call(guarded.port, "GET", f"{API}/repos/{REPO}/manifest?revision=x", headers=AUTH)
    assert refused.status == 400 and "revisions/{rev}/manifest" in refused.json()["error"], refused.body

    # Finished, the same request is a new pull, with nothing left to download.
    fresh = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["q4f16"]}, AUTH)
    assert fresh.status == 202 and fresh.json()["id"] != job["id"]
    assert finished(guarded, fresh.json()["id"], AUTH)["result"]["bytes_downloaded"] == 0
    listed = call(guarded.port, "GET", f"{API}/pulls", headers=AUTH).json()
    assert [j["id"] for j in listed] == [fresh.json()["id"], job["id"]]  # newest first


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (UpstreamError("the source went away", source="http://up"), "UpstreamError: the source went away"),
        (RuntimeError("a bug with /secret/paths"), "NodeError: the pull failed unexpectedly"),
    ],
)
def test_a_failed_pull_says_why(
    guarded: LiveNode,
    local: Depot,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    shown: str,
) -> None:
    """In its job, and in the node's log (a failure was said only by GET /pulls, which a restart forgets: an
    explorer's trial)."""

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(local, "pull_async", failing)
    job = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH).json()
    failed = finished(guarded, job["id"], AUTH)
    assert failed["state"] == "failed" and failed["result"] is None and failed["finished_at"] is not None
    assert failed["error"].startswith(shown) and "/secret" not in failed["error"], failed["error"]
    said = [r for r in caplog.records if job["id"] in r.getMessage() and r.levelno >= logging.WARNING]
    assert said and REPO in said[0].getMessage(), caplog.text
    # ... and in /metrics, where a node whose pulls all failed showed nothing
    scraped = call(guarded.port, "GET", "/metrics", headers=AUTH).body.decode()
    assert 'modeldepot_node_pulls_total{result="failed"} 1.0' in scraped, scraped[-2000:]
    assert "modeldepot_node_pulls_running 0.0" in scraped


def test_requests_during_the_scan_share_it_and_its_pull(
    guarded: LiveNode, local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    scans = []
    real = local.manifest_for

    def slow_scan(repo_id: str, revision: str) -> Any:
        scans.append(repo_id)
        time.sleep(0.5)
        return real(repo_id, revision)

    monkeypatch.setattr(local, "manifest_for", slow_scan)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(
            lambda _: call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH), range(4)
        ))  # fmt: skip
    assert sorted(r.status for r in replies) == [200, 200, 200, 202], [r.body for r in replies]
    assert len({r.json()["id"] for r in replies}) == 1 and scans == [REPO]
    finished(guarded, replies[0].json()["id"], AUTH)
    # A scan that fails fails every request that waited for it, and starts nothing.
    with ThreadPoolExecutor(3) as pool:
        refused = list(pool.map(
            lambda _: call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["q9"]}, AUTH), range(3)
        ))  # fmt: skip
    assert [r.status for r in refused] == [422] * 3 and scans == [REPO, REPO]
    assert len(call(guarded.port, "GET", f"{API}/pulls", headers=AUTH).json()) == 1


def test_the_node_stopping_cancels_its_pulls(
    local: Depot, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modeldepot.server")
    held = HeldPulls(local, monkeypatch)
    node = LiveNode(local, token=TOKEN)
    job = call(node.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH).json()
    jobs = node.runner.app[PULLS]
    node.stop()
    held.release()
    stopped = jobs.get(job["id"])
    assert stopped is not None and stopped.state == "failed" and "stopped" in (stopped.error or "")
    assert f"pull {job['id']} of {REPO} stopped with the node" in caplog.text


def test_a_pull_stopped_with_the_node_says_what_its_resume_takes(
    local: Depot, proxy: HoldingProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """ "kept for a resume" was said of every byte received, a file of one chunk's too, whose part the resume
    fetched again (an explorer's trial): what the status rows keep is said, as a cancel says it."""
    caplog.set_level(logging.INFO, logger="modeldepot.server")
    proxy.hold(100_000)  # (past the first 64 KiB chunk of the 120 kB model: a finished chunk, kept)
    node = LiveNode(local, token=TOKEN)
    job = call(node.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH).json()
    wait_until(lambda: proxy.sent >= 100_000, 30, "the pull to receive its first bytes")
    jobs = node.runner.app[PULLS]
    node.stop()
    proxy.release()
    kept = local.get_manifest(REPO).variant("fp16").bytes_done
    stopped = jobs.get(job["id"])
    assert stopped is not None and f"{size_text(kept)} kept for a resume" in (stopped.error or ""), stopped
    said = [r.getMessage() for r in caplog.records if f"pull {job['id']} of {REPO} stopped" in r.getMessage()]
    assert said and said[0].endswith(f"{size_text(kept)} kept for a resume"), said


def test_a_pull_cancelled_as_it_publishes_is_done(
    guarded: LiveNode, local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that lands while the pull publishes waits for the publish (it is not cut) and the job says done:
    it said "cancelled, pull again to resume" for a repo the node then held whole (a reviewer's trial)."""
    import modeldepot.transfer.pull

    publishing, release = threading.Event(), threading.Event()
    real_publish = modeldepot.transfer.pull.publish

    def held_publish(*args: Any, **kwargs: Any) -> None:
        publishing.set()
        release.wait(30)
        real_publish(*args, **kwargs)

    monkeypatch.setattr(modeldepot.transfer.pull, "publish", held_publish)
    job = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH).json()
    assert publishing.wait(30), "the pull did not reach its publish"
    with ThreadPoolExecutor(1) as pool:
        cancelling = pool.submit(call, guarded.port, "DELETE", f"{API}/pulls/{job['id']}", headers=AUTH)
        wait_until(lambda: guarded_job(guarded, job["id"]).cancelling, 10, "the cancel to reach the job")
        release.set()
        cancelled = cancelling.result(30)
    assert cancelled.status == 200, cancelled.body
    assert cancelled.json()["state"] == "done" and cancelled.json()["error"] is None, cancelled.body
    assert cancelled.json()["bytes_done"] == cancelled.json()["bytes_total"] > 0
    assert local.has_file(REPO, "onnx/model_fp16.onnx")


def guarded_job(node: LiveNode, job_id: str) -> Any:
    job = node.runner.app[PULLS].get(job_id)
    assert job is not None
    return job


def test_a_running_pull_is_cancelled_and_what_it_received_is_kept(
    guarded: LiveNode,
    local: Depot,
    proxy: HoldingProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pull asked by mistake (a 100 GB variant) could not be stopped: DELETE /pulls/{id} was a 405, a removal
    of its repo a 409, and it ran until it filled the disk or the node stopped, with every other pull (an
    explorer's trial). It is cancelled now, as the node stopping would, and a pull again resumes."""
    caplog.set_level(logging.INFO, logger="modeldepot.server")
    proxy.hold(100_000)  # (past the first 64 KiB chunk of the 120 kB model: a finished chunk, kept)
    job = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH).json()
    wait_until(lambda: proxy.sent >= 100_000, 30, "the pull to receive its first bytes")
    cancelled = call(guarded.port, "DELETE", f"{API}/pulls/{job['id']}", headers=AUTH)
    assert cancelled.status == 200, cancelled.body
    assert cancelled.json()["state"] == "cancelled" and "resume" in cancelled.json()["error"]
    # (what the resume takes, as the status says it: "what it received is kept" was said of a part that is
    # fetched again, an explorer's trial)
    kept = local.get_manifest(REPO).variant("fp16").bytes_done
    assert (
        kept >= 64 * 1024 and f"cancelled: {size_text(kept)} kept for a resume" in cancelled.json()["error"]
    )
    assert f"pull {job['id']} of {REPO} cancelled" in caplog.text
    assert pull_state(guarded, job["id"], AUTH)["state"] == "cancelled"
    again = call(guarded.port, "DELETE", f"{API}/pulls/{job['id']}", headers=AUTH)
    assert again.status == 409 and again.json()["error"].endswith("nothing to cancel"), again.body
    assert call(guarded.port, "DELETE", f"{API}/pulls/{'0' * 16}", headers=AUTH).status == 404
    assert call(guarded.port, "DELETE", f"{API}/pulls/{job['id']}").status == 401
    import modeldepot.upkeep

    monkeypatch.setattr(modeldepot.upkeep, "SCAN_SETTLE", 0.0)  # (the scan of a moment ago, forgotten)
    removed = call(guarded.port, "DELETE", f"{API}/repos/{REPO}", headers=AUTH)  # (no longer "being pulled")
    assert removed.status == 200 and removed.json()["scan_forgotten"], removed.body  # (nothing was published)
    proxy.release()
    resumed = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH)
    assert resumed.status == 202
    done = finished(guarded, resumed.json()["id"], AUTH)
    assert done["state"] == "done" and done["result"]["bytes_downloaded"] < done["bytes_total"], done
    assert local.verify().ok


def test_a_pull_the_disk_budget_cannot_hold_is_refused_as_it_is_asked(
    guarded: LiveNode, local: Depot
) -> None:
    """It was a 202, for a pull that failed within a second, the variant's row saying nothing (an explorer's
    trial): a 507 now, as for a full disk, and no pull."""
    local.set_max_size(64 * 1024)  # (less than the fp16 model alone)
    refused = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH)
    assert refused.status == 507 and "disk budget" in refused.json()["error"], refused.body
    assert call(guarded.port, "GET", f"{API}/pulls", headers=AUTH).json() == []
    # (counted: an alert on the node's failed pulls never saw the commonest refusal, an explorer's trial)
    scraped = call(guarded.port, "GET", "/metrics", headers=AUTH).body.decode()
    assert 'modeldepot_node_pulls_total{result="refused"} 1.0' in scraped, scraped[-2000:]
    local.set_max_size(None)
    assert call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH).status == 202


def test_a_pull_the_disk_cannot_hold_is_refused_as_it_is_asked(
    proxy: HoldingProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mounts: Mounts
) -> None:
    """As a full budget's: it was a 202 for a pull that failed 11 ms later, counted `failed`, and an alert
    could not tell a full disk from an upstream that broke mid-transfer (an explorer's trial)."""
    disk = mounts.tmpfs("size=4m")
    with pulling_depot(disk / "store", proxy.url, monkeypatch) as depot:
        node = LiveNode(depot, token=TOKEN)
        try:
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * (free - 400_000))  # (another program's files)
            refused = call(node.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["q4f16"]}, AUTH)
            assert refused.status == 507 and "store's disk" in refused.json()["error"], refused.body
            assert call(node.port, "GET", f"{API}/pulls", headers=AUTH).json() == []
            scraped = call(node.port, "GET", "/metrics", headers=AUTH).body.decode()
            assert 'modeldepot_node_pulls_total{result="refused"} 1.0' in scraped, scraped[-2000:]
            assert 'modeldepot_node_pulls_total{result="failed"} 0.0' in scraped
            (disk / "filler").unlink()
            started = call(node.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["q4f16"]}, AUTH)
            assert started.status == 202, started.body
            done = wait_until(
                lambda: (
                    (s := call(node.port, "GET", f"{API}/pulls/{started.json()['id']}", headers=AUTH).json())[
                        "state"
                    ]
                    != "running"
                    and s
                ),
                30,
                "the pull to end",
            )
            assert done["state"] == "done", done
        finally:
            node.stop()


def test_a_request_beside_a_pull_refused_for_room_is_refused_too(
    local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests of one pull the disk cannot hold: the first 507, the second was handed the job (200,
    "running"), gone a moment later (a 404 for its id: a review's trial). Both are refused."""
    real_scan = local.manifest_for

    def slow_scan(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # (a scan through the upstream: the second request comes meanwhile)
        return real_scan(*args, **kwargs)

    def no_room(*args: Any, **kwargs: Any) -> None:
        raise StoreFullError("pulling it needs 1.0 MiB more on the store's disk: nothing was fetched")

    monkeypatch.setattr(local, "manifest_for", slow_scan)
    monkeypatch.setattr(local.store.partials, "check_room", no_room)
    node = LiveNode(local, token=TOKEN)
    try:
        body = {"repo": REPO, "quants": ["fp16"]}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, node.port, "POST", f"{API}/pulls", body, AUTH)
            time.sleep(0.2)
            second = pool.submit(call, node.port, "POST", f"{API}/pulls", body, AUTH)
            answers = [first.result(), second.result()]
        assert [a.status for a in answers] == [507, 507], [a.body for a in answers]
        assert all("needs 1.0 MiB more" in a.json()["error"] for a in answers)
        assert call(node.port, "GET", f"{API}/pulls", headers=AUTH).json() == []
        scraped = call(node.port, "GET", "/metrics", headers=AUTH).body.decode()
        assert 'modeldepot_node_pulls_total{result="refused"} 1.0' in scraped
        assert 'modeldepot_node_pulls_total{result="failed"} 0.0' in scraped
    finally:
        node.stop()


def test_a_variant_being_pulled_is_not_removed_by_its_other_name(
    guarded: LiveNode, local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DELETE of `onnx-fp16` went through while a pull of `fp16` scanned (their names compared as written),
    and the pull published the variant again after "removed" (a review's trial)."""
    pull(guarded, ["fp16"], AUTH)
    scanning, go_on = held_scans(local, monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        started = pool.submit(
            call, guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH
        )
        assert scanning.wait(10)
        removed = call(guarded.port, "DELETE", f"{API}/repos/{REPO}?quant=onnx-fp16", headers=AUTH)
        go_on.set()
        finished(guarded, started.result(30).json()["id"], AUTH)
    assert removed.status == 409, removed.body


def by_branch_then_by_commit(node: LiveNode, commit: str) -> list[Reply]:
    """A pull of fp16 asked by branch, and 0.15 s later (its start under way) by ``commit``: both answers."""
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(call, node.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH)
        time.sleep(0.15)
        second = pool.submit(call, node.port, "POST", f"{API}/pulls",
                             {"repo": REPO, "revision": commit, "quants": ["fp16"]}, AUTH)  # fmt: skip
        return [first.result(), second.result()]


def test_the_same_commit_asked_by_its_id_beside_a_pull_refused_for_room_is_refused_too(
    local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By branch, then by commit id while the first waited to know it had room: the second was handed the
    first's job (200), gone a moment later (a review's trial)."""
    commit = local.manifest_for(REPO, "main").commit_id

    def no_room(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.5)  # (the room made, evicting or not, then found short)
        raise StoreFullError("pulling it needs 1.0 MiB more on the store's disk: nothing was fetched")

    monkeypatch.setattr(local.store.partials, "check_room", no_room)
    node = LiveNode(local, token=TOKEN)
    try:
        answers = by_branch_then_by_commit(node, commit)
        assert [a.status for a in answers] == [507, 507], [a.body for a in answers]
    finally:
        node.stop()


def test_the_same_commit_asked_by_its_id_beside_a_start_with_room_is_one_job(
    local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By branch, then by commit id while the first waits to know it has room (it has): one job (a start that
    waited skipped the first's job, and a second pull of the same files ran beside it: a review's trial)."""
    commit = local.manifest_for(REPO, "main").commit_id
    real = local.store.partials.check_room

    def slow_room(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.6)  # (room made, found enough)
        real(*args, **kwargs)

    monkeypatch.setattr(local.store.partials, "check_room", slow_room)
    node = LiveNode(local, token=TOKEN)
    try:
        answers = by_branch_then_by_commit(node, commit)
        ids = {a.json()["id"] for a in answers}
        assert [a.status for a in answers] == [202, 200] and len(ids) == 1, [a.body for a in answers]
        finished(node, ids.pop(), AUTH)
    finally:
        node.stop()


def test_a_removal_of_one_fp16_goes_beside_a_pull_of_the_other_kinds() -> None:
    """onnx-fp16 and safetensors-fp16 are two variants: a running pull of one refused the DELETE of the other
    (their kinds stripped, one name: a review's trial); onnx-fp16 and fp16 may be one."""
    jobs = PullJobs()
    job = PullJob("j1", "acme/both", "main", ["safetensors-fp16"], "c" * 40, "running", 0, 0, 0.0)
    jobs._running[("acme/both", "main", ("safetensors-fp16",))] = job
    assert jobs.pulling("acme/both", "onnx-fp16") is None
    assert jobs.pulling("acme/both", "fp16") == "pull j1"
    assert jobs.pulling("acme/both", "SAFETENSORS-FP16") == "pull j1"


def test_a_pull_of_what_another_write_fetches_is_not_refused_for_its_room_counted_twice(
    guarded: LiveNode, local: Depot
) -> None:
    """While `serve --repair` fetched a model again, a pull of it asked over the API was a 507 "the disk
    budget is full", the repair's room for the same bytes counted beside the pull's (an explorer's trial on
    an edge box): the check before the pull counts what it fetches as the pull will, shared."""
    manifest = local.manifest_for(REPO, "main")
    files = manifest.files_of("fp16")
    contents = {f.sha256 or f.git_oid: f.size for f in files}
    local.set_max_size(int(sum(contents.values()) * 1.5))  # (room for them once, not twice)
    with local.store.budget.writing(REPO, manifest.commit_id, [f.path for f in files]) as repair:
        repair.contents = dict(contents)
        repair.make_room(sum(contents.values()), "repairing")
        asked = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH)
        assert asked.status == 202, asked.body
    assert finished(guarded, asked.json()["id"], AUTH)["state"] == "done"


def test_a_repo_scanned_alone_is_forgotten_by_a_removal(
    guarded: LiveNode, local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo scanned and never held (a pull that failed after its scan, one removed, a typo naming a real
    repo) stayed listed by `status` and on the dashboard for good: `rm` and DELETE said "not in the store",
    gc kept it (an explorer's trial). A removal forgets its saved scan (of more than a few seconds ago)."""
    from click.testing import CliRunner

    import modeldepot.upkeep
    from modeldepot.cli import cli

    fresh = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["nope"]}, AUTH)
    assert fresh.status == 422  # (scanned, no pull: a scan of a moment ago may be a pull's that starts)
    young = call(guarded.port, "DELETE", f"{API}/repos/{REPO}", headers=AUTH)
    assert young.status == 409 and "may be starting" in young.json()["error"], young.body
    monkeypatch.setattr(modeldepot.upkeep, "SCAN_SETTLE", 0.0)

    local.pull(REPO, ["q4f16"])
    assert call(guarded.port, "DELETE", f"{API}/repos/{REPO}", headers=AUTH).status == 200
    assert REPO in {m.repo_id for m in local.list_manifests()}  # (what a Pull button offers again)
    forgot = call(guarded.port, "DELETE", f"{API}/repos/{REPO.upper()}", headers=AUTH)
    assert forgot.status == 200 and forgot.json()["scan_forgotten"] is True, forgot.body
    assert local.list_manifests() == []
    assert call(guarded.port, "DELETE", f"{API}/repos/{REPO}", headers=AUTH).status == 404
    local.scan_repo(REPO)
    refused = CliRunner().invoke(cli, ["rm", REPO, "--home", str(local.home)], input="n\n")
    assert "the saved scan of" in refused.output and local.list_manifests() != [], refused.output
    done = CliRunner().invoke(cli, ["rm", REPO, "--yes", "--home", str(local.home)])
    assert done.exit_code == 0 and f"forgot the saved scan of {REPO}" in done.output, done.output
    assert local.list_manifests() == []


def test_pulls_name_a_repo_never_a_place(open_node: LiveNode, proxy: HoldingProxy, local: Depot) -> None:
    """A request names a repo; where it is pulled from is the node's own configuration (its servers, its
    fleet, its Hub endpoint). So fuzzing POST /pulls reaches no machine but those."""
    for body in ({"repo": REPO, "endpoint": "http://evil.example"}, {"repo": REPO, "url": "http://x"},
                 {"repo": REPO, "servers": ["http://x"]}):  # fmt: skip
        reply = call(open_node.port, "POST", f"{API}/pulls", body, CONTROL)
        assert reply.status == 400 and "unknown key" in reply.json()["error"], reply.body
    for repo in ("http://evil.example/x", "evil.example:80/x", "//evil.example/x", "evil/x/y"):
        reply = call(open_node.port, "POST", f"{API}/pulls", {"repo": repo}, CONTROL)
        assert reply.status == 422 and reply.json()["error"].startswith("repo: "), (repo, reply.body)
    assert proxy.requests == []
    reply = call(open_node.port, "POST", f"{API}/pulls", {"repo": "evil.example/x"}, CONTROL)
    assert reply.status == 404, reply.body  # asked of the configured server (through the proxy) alone
    assert proxy.requests and all("/evil.example/x" in r for r in proxy.requests), proxy.requests
    assert local.list_repos() == []


BAD_PULLS: list[tuple[Any, int, str]] = [
    (b"{not json", 400, "not valid JSON"),
    (b'{"repo": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nests too deep"),  # (valid, said invalid)
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'"org/name"', 400, "must be a JSON object"),
    ({"repo": REPO, "quant": "q4f16"}, 400, "unknown key 'quant': this route takes repo, revision, quants"),
    ({}, 422, "repo: required"),
    ({"repo": None}, 422, "repo: "),
    ({"repo": 7}, 422, "repo: "),
    ({"repo": "../etc/passwd"}, 422, "repo: "),
    ({"repo": "acme--x/y"}, 422, "repo: "),
    ({"repo": "a" * 100 + "/b"}, 422, "repo: "),
    ({"repo": REPO, "revision": "a..b"}, 422, "revision: "),
    ({"repo": REPO, "revision": 3}, 422, "revision: "),
    ({"repo": REPO, "revision": ""}, 422, "revision: "),
    ({"repo": REPO, "quants": "q4f16"}, 422, "quants: give a list"),
    ({"repo": REPO, "quants": []}, 422, "quants: give from 1 to 64"),
    ({"repo": REPO, "quants": ["x"] * 65}, 422, "quants: give from 1 to 64"),
    ({"repo": REPO, "quants": ["q4 f16"]}, 422, "is not a variant name"),
    ({"repo": REPO, "quants": ["../x"]}, 422, "is not a variant name"),
    ({"repo": REPO, "quants": [4]}, 422, "is not a variant name"),
    ({"repo": REPO, "quants": [["q4f16"]]}, 422, "is not a variant name"),
    ({"repo": REPO, "quants": ["q9"]}, 422, "has no variant 'q9' (it has: fp16, fp32, q4f16)"),
    ({"repo": "acme/nowhere"}, 404, "nowhere"),
]


def test_every_field_is_checked_before_anything_starts(open_node: LiveNode, local: Depot) -> None:
    for body, status, message in BAD_PULLS:
        reply = call(open_node.port, "POST", f"{API}/pulls", body, {**JSON, **CONTROL})
        assert reply.status == status, (body, reply.status, reply.body)
        assert message in reply.json()["error"] and reply.headers["X-Error-Message"], (body, reply.body)
        assert reply.headers["Content-Type"].startswith("application/json")
    plain = call(
        open_node.port, "POST", f"{API}/pulls", b'{"repo": "a/b"}', {"Content-Type": "text/plain", **CONTROL}
    )
    assert plain.status == 415 and "application/json" in plain.json()["error"]
    big = call(open_node.port, "POST", f"{API}/pulls", b" " * (MAX_CONTROL_BODY + 1), {**JSON, **CONTROL})
    assert big.status == 413, big.body
    huge = call(open_node.port, "POST", f"{API}/pulls", b" " * (2 << 20), {**JSON, **CONTROL})  # past the cap
    assert huge.status == 413, huge.body
    assert call(open_node.port, "GET", f"{API}/pulls", headers=CONTROL).json() == []
    assert local.list_repos() == []

    # The store routes: bad names in the path are 400s (as on every route), bad bodies as above.
    pull(open_node, ["q4f16"], CONTROL)
    for method, route in (("POST", "preload"), ("PUT", "pin"), ("DELETE", "pin")):
        target = f"{API}/repos/{REPO}/{route}"
        for body, status, message in (
            ({"quant": "nope"}, 422 if route != "pin" or method == "PUT" else 200, "has no variant 'nope'"),
            ({"quant": "bad name"}, 422, "quant: "),
            ({"revision": "a..b"}, 422, "revision: "),
            ({"quant": "q4f16", "repo": REPO}, 400, "unknown key 'repo': this route takes quant, revision"),
            (b"[]", 400, "must be a JSON object"),
        ):
            reply = call(open_node.port, method, target, body, {**JSON, **CONTROL})
            assert reply.status == status, (method, route, body, reply.body)
            if status != 200:
                assert message in reply.json()["error"], (method, route, body, reply.body)
        assert call(open_node.port, method, f"{API}/repos/-acme/tiny/{route}", headers=CONTROL).status == 400
        nowhere = call(open_node.port, method, f"{API}/repos/acme/nowhere/{route}", headers=CONTROL)
        assert nowhere.status == 404, (method, route, nowhere.body)
    for query, status, message in (("?revision=a..b", 400, "revision: "), ("?revision=", 400, "revision: "),
                                   ("?revision=main&revision=x", 400, "revision: give this query parameter once"),
                                   ("?force=1", 400, "unknown query parameter 'force': this route takes revision"),
                                   ("?revision=nope", 404, "nope")):  # fmt: skip
        reply = call(open_node.port, "DELETE", f"{API}/repos/{REPO}{query}", headers=CONTROL)
        assert reply.status == status and message in reply.json()["error"], (query, reply.body)
    assert call(open_node.port, "DELETE", f"{API}/repos/acme/nowhere", headers=CONTROL).status == 404
    assert {f.path for f in local.list_files(REPO)} == set(Q4F16)  # nothing refused changed anything


def test_a_query_parameter_a_route_does_not_take_is_refused_and_nothing_is_done(
    open_node: LiveNode, local: Depot
) -> None:
    """The routes other than DELETE /repos/{org}/{name} ignored their query: `preload?quant=fp16` preloaded
    the whole repo, `pin?quant=q4f16` (PUT or DELETE) pinned or unpinned the whole repo."""
    pull(open_node, ["q4f16"], CONTROL)
    whole = call(open_node.port, "PUT", f"{API}/repos/{REPO}/pin", {}, CONTROL)
    assert whole.status == 200, whole.body
    for method, target, body in control_requests():
        for query in ("?quant=q4f16", "?revision=main", "?repo=acme/other", "?a=1&quant=q4f16"):
            if target == f"{API}/repos/{REPO}" and query in ("?revision=main", "?quant=q4f16"):
                continue  # (the parameters a route takes)
            reply = call(open_node.port, method, target + query, body, CONTROL)
            assert reply.status == 400, (method, target + query, reply.body)
            error = reply.json()["error"]
            assert error.startswith("unknown query parameter '") and "this route takes" in error, error
            assert reply.headers["X-Error-Code"] == "BadRequest"
    assert local.preloader.stats().models == 0  # nothing preloaded,
    assert [(p.quant, p.revision) for p in local.pins()] == [(None, "main")]  # pinned or unpinned,
    assert call(open_node.port, "GET", f"{API}/pulls", headers=CONTROL).json()[0]["quants"] == ["q4f16"]
    assert len(call(open_node.port, "GET", f"{API}/pulls", headers=CONTROL).json()) == 1  # started,
    assert [r.repo_id for r in local.list_repos()] == [REPO]  # or removed
    message = call(open_node.port, "POST", f"{API}/repos/{REPO}/preload?quant=fp16", {}, CONTROL).json()
    assert message["error"] == "unknown query parameter 'quant': this route takes no query parameter"


def test_a_bad_value_names_its_field_with_json_kinds_and_null_is_the_default(
    open_node: LiveNode, local: Depot
) -> None:
    """`"revision": null` was a 422 "revision must be a string, got NoneType" (Python's name for null), while
    a null quant or quants meant the default; `?revision=a..b` on DELETE was a 400 that named no field."""
    pull(open_node, ["q4f16"], CONTROL)
    commit = local.resolve(REPO)
    for value, kind in ((3, "number"), (1.5, "number"), (True, "boolean"), (["main"], "array"),
                        ({"b": 1}, "object")):  # fmt: skip
        for method, route, body in (("POST", "pulls", {"repo": REPO}), ("POST", f"repos/{REPO}/preload", {}),
                                    ("PUT", f"repos/{REPO}/pin", {}), ("DELETE", f"repos/{REPO}/pin", {})):  # fmt: skip
            reply = call(open_node.port, method, f"{API}/{route}", {**body, "revision": value}, CONTROL)
            assert reply.status == 422, (method, route, value, reply.body)
            assert reply.json()["error"] == (
                f"revision: must be a string (a branch, tag or commit id), got {kind}"
            ), reply.body
        reply = call(open_node.port, "POST", f"{API}/pulls", {"repo": value}, CONTROL)
        assert reply.status == 422, reply.body
        assert reply.json()["error"] == f'repo: must be a string (like "org/name"), got {kind}'
    null_repo = call(open_node.port, "POST", f"{API}/pulls", {"repo": None}, CONTROL)
    assert null_repo.status == 422 and null_repo.json()["error"].endswith("got null"), null_repo.body
    # null: the default (main, the whole repo), as absent.
    pulled = call(open_node.port, "POST", f"{API}/pulls", {"repo": REPO, "revision": None, "quants": ["q4f16"]},
                  CONTROL)  # fmt: skip
    assert pulled.status == 202 and pulled.json()["revision"] == "main", pulled.body
    finished(open_node, pulled.json()["id"], CONTROL)
    defaults = {"revision": None, "quant": None}
    preloaded = call(open_node.port, "POST", f"{API}/repos/{REPO}/preload", defaults, CONTROL)
    assert preloaded.status == 200, preloaded.body
    assert (preloaded.json()["commit_id"], preloaded.json()["variant"]) == (commit, "")
    pinned = call(open_node.port, "PUT", f"{API}/repos/{REPO}/pin", defaults, CONTROL)
    assert pinned.status == 200 and (pinned.json()["revision"], pinned.json()["quant"]) == ("main", None)
    unpinned = call(open_node.port, "DELETE", f"{API}/repos/{REPO}/pin", {"revision": None}, CONTROL)
    assert unpinned.json() == {"repo_id": REPO, "quant": None, "revision": "main", "unpinned": True}
    # In the URL, a 400 (as a repo id in the path is), naming the parameter; in the body, a 422 naming the field.
    query = call(open_node.port, "DELETE", f"{API}/repos/{REPO}?revision=a..b", headers=CONTROL)
    body = call(open_node.port, "PUT", f"{API}/repos/{REPO}/pin", {"revision": "a..b"}, CONTROL)
    assert (query.status, body.status) == (400, 422)
    named = "revision: revision 'a..b' may not contain '..' (git ref rules)"
    assert query.json()["error"] == body.json()["error"] == named
    assert [r.repo_id for r in local.list_repos()] == [REPO]


def test_pinning_again_keeps_the_pin_and_unpinning_a_repo_not_held_is_a_404(
    open_node: LiveNode, local: Depot
) -> None:
    """A second PUT of a pin answered a new created_at (the store kept the first); a DELETE of a pin of a repo
    the node does not hold answered 200 `unpinned: false`."""
    pull(open_node, ["q4f16"], CONTROL)
    first = call(open_node.port, "PUT", f"{API}/repos/{REPO}/pin", {"quant": "q4f16"}, CONTROL).json()
    time.sleep(0.05)
    again = call(open_node.port, "PUT", f"{API}/repos/{REPO}/pin", {"quant": "Q4F16"}, CONTROL).json()
    assert again == first
    listed = call(open_node.port, "GET", f"{API}/pins", headers=CONTROL).json()
    assert listed == [first]
    unknown = call(open_node.port, "PUT", f"{API}/repos/{REPO}/pin", {"revision": "nob"}, CONTROL)
    assert unknown.status == 404 and unknown.json()["error"].startswith(
        "revision: 'nob' is not a revision of"
    )
    # ... and the same words from a removal and from a pull (both said the Hub's "Invalid rev id: nob")
    for method, route, body in (("DELETE", f"{API}/repos/{REPO}", {"revision": "nob"}),
                                ("POST", f"{API}/pulls", {"repo": REPO, "revision": "nob"})):  # fmt: skip
        answer = call(open_node.port, method, route, body, CONTROL)
        assert answer.status == 404, (method, answer.body)
        assert answer.json()["error"].startswith("revision: 'nob'"), answer.body
        # (a pull names where it looked: "on this node" was said of what its sources answered, a trial)
        assert ("on this node" in answer.json()["error"]) == (method == "DELETE"), answer.body
    missing = call(open_node.port, "DELETE", f"{API}/repos/acme/nowhere/pin", {}, CONTROL)
    assert missing.status == 404 and missing.headers["X-Error-Code"] == "RepoNotFound", missing.body
    assert "acme/nowhere" in missing.json()["error"]
    # A repo the node holds, without such a pin: 200, unpinned false.
    none = call(open_node.port, "DELETE", f"{API}/repos/{REPO}/pin", {"quant": "fp16"}, CONTROL)
    assert none.status == 200 and none.json()["unpinned"] is False, none.body
    assert [p.quant for p in local.pins()] == ["q4f16"]


def test_stats_list_preloaded_models_without_already_and_no_hit_rate_before_a_lookup(
    open_node: LiveNode, local: Depot
) -> None:
    """`stats.preload.hit_rate` was 0.0 before any lookup (as if every one had missed), and every listed
    model said `already: true` (what answers a preload call, meaningless in a listing)."""
    pull(open_node, ["q4f16"], CONTROL)
    answered = call(open_node.port, "POST", f"{API}/repos/{REPO}/preload", {"quant": "q4f16"}, CONTROL).json()
    assert answered["already"] is False  # the preload call's answer keeps it
    stats = call(open_node.port, "GET", f"{API}/stats", headers=CONTROL).json()["preload"]
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (0, 0, None)
    assert [m["variant"] for m in stats["models"]] == ["q4f16"] and "already" not in stats["models"][0]
    listed = {k: v for k, v in stats["models"][0].items() if k != "resident_bytes"}
    assert listed == {k: v for k, v in answered.items() if k not in ("already", "resident_bytes")}
    local.preloader.get(REPO, "q4f16").release()  # a lookup, a hit
    assert call(open_node.port, "GET", f"{API}/stats", headers=CONTROL).json()["preload"]["hit_rate"] == 1.0
    assert call(open_node.port, "GET", f"{API}/stats").json()["preload"]["hit_rate"] is None  # withheld


def pull(node: LiveNode, quants: list[str] | None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    reply = call(node.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": quants}, headers)
    assert reply.status == 202, reply.body
    done = finished(node, reply.json()["id"], headers)
    assert done["state"] == "done", done
    return done


# -- preload, pin, unpin, remove ----------------------------------------------------------------------------


def test_preload_pin_unpin_and_remove(guarded: LiveNode, local: Depot) -> None:
    pull(guarded, ["q4f16"], AUTH)
    commit = local.resolve(REPO)
    info = call(guarded.port, "POST", f"{API}/repos/{REPO}/preload", {"quant": "q4f16"}, AUTH)
    assert info.status == 200, info.body
    assert (info.json()["repo_id"], info.json()["variant"], info.json()["commit_id"]) == (
        REPO,
        "q4f16",
        commit,
    )
    assert info.json()["bytes"] == sum(len(FILES[p]) for p in Q4F16)
    assert local.preloader.holds(REPO, "q4f16")
    whole = call(guarded.port, "POST", f"{API}/repos/{REPO}/preload", headers=AUTH)  # no body: every file
    assert whole.status == 200 and whole.json()["variant"] == ""
    # ... and out of RAM again, without a restart (a node's RAM went from one model to another by none else)
    unloaded = call(guarded.port, "DELETE", f"{API}/repos/{REPO}/preload", {"quant": "q4f16"}, AUTH)
    assert unloaded.json() == {"repo_id": REPO, "quant": "q4f16", "revision": "main", "unloaded": True}
    assert not local.preloader.holds(REPO, "q4f16") and local.preloader.holds(REPO)
    again = call(guarded.port, "DELETE", f"{API}/repos/{REPO}/preload", {"quant": "q4f16"}, AUTH)
    assert again.status == 200 and again.json()["unloaded"] is False
    # No variant named: every model of the revision goes (it answered false, and left a variant in RAM)
    assert call(guarded.port, "POST", f"{API}/repos/{REPO}/preload", {"quant": "q4f16"}, AUTH).status == 200
    everything = call(guarded.port, "DELETE", f"{API}/repos/{REPO}/preload", headers=AUTH)
    assert everything.status == 200 and everything.json()["unloaded"] is True, everything.body
    assert not local.preloader.holds(REPO, "q4f16") and not local.preloader.holds(REPO)

    pinned = call(guarded.port, "PUT", f"{API}/repos/{REPO}/pin", {"quant": "q4f16"}, AUTH)
    assert pinned.status == 200 and (pinned.json()["repo_id"], pinned.json()["quant"]) == (REPO, "q4f16")
    assert call(guarded.port, "PUT", f"{API}/repos/{REPO}/pin", headers=AUTH).json()["quant"] is None
    assert [(p.quant, p.revision) for p in local.pins()] == [(None, "main"), ("q4f16", "main")]
    # A variant its scan lists and the node does not hold: said so (it said the repo "has no variant" fp16)
    unheld = call(guarded.port, "PUT", f"{API}/repos/{REPO}/pin", {"quant": "fp16"}, AUTH)
    assert unheld.status == 404 and "holds no file of 'fp16'" in unheld.json()["error"], unheld.body
    assert unheld.json()["error"].endswith("pull it first"), unheld.body
    # ... and by a preload of it (it said the repo "has no variant" fp16, an explorer's trial)
    unloaded = call(guarded.port, "POST", f"{API}/repos/{REPO}/preload", {"quant": "fp16"}, AUTH)
    assert unloaded.status == 404 and unloaded.json()["error"].endswith("pull it first"), unloaded.body
    assert "has no variant" in call(guarded.port, "POST", f"{API}/repos/{REPO}/preload", {"quant": "q9"},
                                    AUTH).json()["error"]  # fmt: skip
    listed = call(guarded.port, "GET", f"{API}/pins", headers=AUTH).json()
    assert [(p["repo_id"], p["quant"]) for p in listed] == [(REPO, None), (REPO, "q4f16")]
    unpinned = call(guarded.port, "DELETE", f"{API}/repos/{REPO}/pin", {"quant": "q4f16"}, AUTH)
    assert unpinned.json() == {"repo_id": REPO, "quant": "q4f16", "revision": "main", "unpinned": True}
    again = call(guarded.port, "DELETE", f"{API}/repos/{REPO}/pin", {"quant": "q4f16"}, AUTH)
    assert again.status == 200 and again.json()["unpinned"] is False
    assert [p.quant for p in local.pins()] == [None]

    # A body is read as the pins' routes read theirs: a revision named there removes that revision alone (it
    # was ignored, and the whole repo went), an unknown key or a disagreement with the URL removes nothing.
    for bad, status in (({"x": 1}, 400), ({"revision": "dev"}, 404), ({"revision": 7}, 422)):
        refused = call(guarded.port, "DELETE", f"{API}/repos/{REPO}", bad, AUTH)
        assert refused.status == status, (bad, refused.body)
    differs = call(guarded.port, "DELETE", f"{API}/repos/{REPO}?revision=main", {"revision": commit}, AUTH)
    assert differs.status == 400 and "the URL names 'main'" in differs.json()["error"], differs.body
    assert local.resolve(REPO) == commit, "nothing removed"
    removed = call(guarded.port, "DELETE", f"{API}/repos/{REPO}", {"revision": "main"}, AUTH)
    assert removed.status == 200, removed.body
    assert removed.json()["commits"] == [commit] and removed.json()["bytes_freed"] > 0
    assert local.list_repos() == []
    # The scan stays, its variant 'available' again (it said 'downloaded'): the event stream shows it so.
    variants = call(guarded.port, "GET", f"{API}/repos/{REPO}/manifest", headers=AUTH).json()["variants"]
    assert {v["name"]: v["status"] for v in variants} == dict.fromkeys(("fp16", "fp32", "q4f16"), "available")
    assert call(guarded.port, "DELETE", f"{API}/repos/{REPO}", {"revision": "main"}, AUTH).status == 404
    pull(guarded, ["q4f16"], AUTH)  # and it can be pulled again
    assert {f.path for f in local.list_files(REPO)} == set(Q4F16)


def test_a_repo_being_pulled_is_not_removed_and_a_wrong_method_says_which_are_right(
    guarded: LiveNode, local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removing a repo while the node pulled it answered 200 with bytes freed, and the pull then published
    it again. A wrong method on a control route had the Hub's answer: 405 "read-only over the Hub API",
    Allow: GET, HEAD (though /pulls takes POST), or a 404."""
    pull(guarded, ["q4f16"], AUTH)
    held = HeldPulls(local, monkeypatch)
    started = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH)
    assert started.status == 202, started.body
    refused = call(guarded.port, "DELETE", f"{API}/repos/{REPO}", headers=AUTH)
    assert refused.status == 409 and "is running" in refused.body.decode(), refused.body
    assert local.list_repos() != [], "nothing removed"
    held.release()
    finished(guarded, started.json()["id"], AUTH)
    assert call(guarded.port, "DELETE", f"{API}/repos/{REPO}", headers=AUTH).status == 200
    for method, route, allow in (("PUT", f"{API}/pulls", "GET, HEAD, POST"),
                                 ("GET", f"{API}/repos/{REPO}/pin", "DELETE, PUT"),
                                 ("GET", f"{API}/repos/{REPO}/preload", "DELETE, POST")):  # fmt: skip
        wrong = call(guarded.port, method, route, None, AUTH)
        assert (wrong.status, wrong.headers.get("Allow")) == (405, allow), (method, route, wrong.body)
        assert "read-only" not in wrong.body.decode()
    # The repo id's '/' sent encoded: the router takes it as one name; the answer said "GET is not allowed",
    # with GET in Allow (an explorer's trial)
    encoded = REPO.replace("/", "%2F")
    for method, route in (("GET", f"{API}/repos/{encoded}/manifest"), ("PUT", f"{API}/repos/{encoded}/pin")):
        wrong = call(guarded.port, method, route, None, AUTH)
        assert wrong.status == 404 and "sent encoded (%2F)" in wrong.body.decode(), (
            method,
            route,
            wrong.body,
        )


def test_another_variant_is_removed_while_a_pull_of_one_runs(
    guarded: LiveNode, local: Depot, proxy: HoldingProxy, tmp_path: Path
) -> None:
    """`rm -q Q4_K_M` was refused while a pull of Q8_0 ran, sharing only config.json, which `rm -q` keeps:
    removing the old quant to make room for the new one is a laptop's natural move, as `ollama rm` of another
    tag during a pull (an explorer's trial). A variant whose files no running pull publishes goes; the one
    pulled, or the repo, is refused, and a pull that does not say what it takes (an older version's) refuses
    every removal as before."""
    from click.testing import CliRunner

    from modeldepot.cli import cli

    pull(guarded, ["q4f16"], AUTH)
    proxy.hold(10_000)
    pulling = ThreadPoolExecutor(1).submit(local.pull, REPO, ["fp16"])
    try:
        wait_until(lambda: local.store.partials.is_pulling(REPO), 30, "the pull of fp16 to run")
        refused = call(guarded.port, "DELETE", f"{API}/repos/{REPO}?quant=fp16", headers=AUTH)
        assert refused.status == 409 and "takes fp16" in refused.body.decode(), refused.body
        with pytest.raises(PullRunningError, match="that takes fp16's files is running"):
            local.remove(REPO, quant="fp16")
        with pytest.raises(PullRunningError):
            local.remove(REPO)
        # (an older version's pull of the repo: its mark held, what it takes not said)
        mark = local.store.partials._pull_mark(REPO)
        older = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'rb'); "
                                  "fcntl.flock(f, fcntl.LOCK_SH); print('held', flush=True); time.sleep(3600)",
                                  str(mark)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        with older:  # (its pipe closed at the end)
            try:
                assert older.stdout is not None and older.stdout.readline().strip() == "held"
                with pytest.raises(PullRunningError):
                    local.remove(REPO, quant="q4f16")
            finally:
                older.kill()
        said = CliRunner().invoke(cli, ["rm", REPO, "-q", "q4f16", "--yes", "--home", str(local.home)])
        assert said.exit_code == 0, said.output
        assert not any(f.path.startswith("onnx/model_q4f16") for f in local.list_files(REPO))
    finally:
        proxy.release()
        pulling.result(60)
    assert {f.path for f in local.list_files(REPO)} >= {"onnx/model_fp16.onnx", "config.json"}
    assert not any(f.path.startswith("onnx/model_q4f16") for f in local.list_files(REPO))
    assert not list(local.store.partials.root.glob("*.takes"))  # (its file went with the pull)


def test_a_repo_whose_pull_is_still_scanning_is_not_removed_and_a_case_asks_for_the_same_job(
    guarded: LiveNode, local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal while a pull's scan ran (a slow Hub: seconds) answered 200, and the pull then published the
    repo again; the same pull asked in another case during that scan started a second job (a trial)."""
    pull(guarded, ["q4f16"], AUTH)
    scanning, go_on = held_scans(local, monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(
            call, guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH
        )
        assert scanning.wait(10)
        again = pool.submit(call, guarded.port, "POST", f"{API}/pulls",
                            {"repo": REPO.upper(), "quants": ["FP16"]}, AUTH)  # fmt: skip
        refused = call(guarded.port, "DELETE", f"{API}/repos/{REPO}", headers=AUTH)
        assert refused.status == 409 and "a pull starting" in refused.body.decode(), refused.body
        go_on.set()
        started, joined = first.result(timeout=30), again.result(timeout=30)
    assert (started.status, joined.status) == (202, 200), (started.body, joined.body)
    assert joined.json()["id"] == started.json()["id"]
    finished(guarded, started.json()["id"], AUTH)
    assert (
        local.list_repos() != []
        and call(guarded.port, "DELETE", f"{API}/repos/{REPO}", headers=AUTH).status == 200
    )


def test_the_same_commit_asked_by_branch_and_by_commit_id_is_one_pull(
    guarded: LiveNode, local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull asked by branch, then by the commit the branch names, started a second job (a trial)."""
    held = HeldPulls(local, monkeypatch)
    by_branch = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "quants": ["fp16"]}, AUTH)
    assert by_branch.status == 202, by_branch.body
    commit = by_branch.json()["commit_id"]
    by_commit = call(guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "revision": commit, "quants": ["fp16"]},
                     AUTH)  # fmt: skip
    assert (by_commit.status, by_commit.json()["id"]) == (200, by_branch.json()["id"]), by_commit.body
    other = call(
        guarded.port, "POST", f"{API}/pulls", {"repo": REPO, "revision": commit, "quants": ["q4f16"]}, AUTH
    )
    assert other.status == 202 and other.json()["id"] != by_branch.json()["id"], (
        "another variant: its own job"
    )
    held.release()
    for job in (by_branch, other):
        finished(guarded, job.json()["id"], AUTH)


# -- who may call ---------------------------------------------------------------------------------------------


def control_requests() -> list[tuple[str, str, Any]]:
    """One request to every control route (method, target, body). The pull names a variant the repo lacks:
    let through, it is scanned and refused (422), so no transfer outlives the test."""
    return [
        ("POST", f"{API}/pulls", {"repo": REPO, "quants": ["nope"]}),
        ("GET", f"{API}/pulls", None),
        ("GET", f"{API}/pulls/0123456789abcdef", None),
        ("DELETE", f"{API}/pulls/0123456789abcdef", None),
        ("POST", f"{API}/repos/{REPO}/preload", {}),
        ("DELETE", f"{API}/repos/{REPO}/preload", {}),
        ("PUT", f"{API}/repos/{REPO}/pin", {}),
        ("DELETE", f"{API}/repos/{REPO}/pin", {}),
        ("DELETE", f"{API}/repos/{REPO}", None),
    ]


def test_a_node_with_a_token_needs_it_for_every_control_route(guarded: LiveNode, local: Depot) -> None:
    assert len(control_requests()) == sum(len(openapi_document("x")["paths"][p]) for p in CONTROL_PATHS)
    for method, target, body in control_requests():
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):  # fmt: skip
            reply = call(guarded.port, method, target, body, headers)
            assert reply.status == 401, (method, target, headers, reply.status)
            assert reply.json()["error"] and reply.headers["X-Error-Message"]
        # From elsewhere, another site's page: the token is what counts (it is no ambient credential).
        allowed = call(guarded.port, method, target, body, {**AUTH, "Origin": "https://elsewhere.example"})
        assert allowed.status not in (401, 403), (method, target, allowed.body)


# Requests a node without a token once took for its own machine's: a local tool, the node's own page, and
# what a reverse proxy on the same machine relays from anywhere (nginx's `proxy_pass http://127.0.0.1:PORT;`
# sends the Host it was given and no X-Forwarded-For). Nothing in them says who sent them: the token does.
LOCAL_LOOKING: list[dict[str, str]] = [
    {},
    {"Host": "localhost:{port}"},
    {"Host": "127.0.0.1:{port}", "Connection": "close"},
    {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "none"},
]
WRONG_TOKENS: list[dict[str, str]] = [
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Bearer "},
    {"Authorization": CONTROL_TOKEN},  # no scheme
    {"Authorization": f"Basic {CONTROL_TOKEN}"},
    {"Authorization": f"Bearer {CONTROL_TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN}"},  # another node's token
]


@pytest.mark.parametrize("headers", LOCAL_LOOKING + WRONG_TOKENS)
def test_a_node_without_a_token_needs_its_control_token_for_every_control_route(
    open_node: LiveNode, headers: dict[str, str]
) -> None:
    sent = {k: v.format(port=open_node.port) for k, v in headers.items()}
    for method, target, body in control_requests():
        reply = call(open_node.port, method, target, body, sent)
        assert reply.status == 401, (method, target, sent, reply.body)
        error = reply.json()["error"]
        assert "control token" in error and reply.headers["X-Error-Message"], error
        if "Authorization" not in sent:  # it says where to find the token
            assert "#token=" in error and "--token" in error, error
        allowed = call(open_node.port, method, target, body, {**sent, **CONTROL})
        assert allowed.status not in (401, 403), (method, target, sent, allowed.body)
    # The reads stay open, as they were.
    assert call(open_node.port, "GET", f"{API}/repos", headers=sent).status == 200
    assert call(open_node.port, "GET", f"{API}/pins", headers=sent).status == 200


def test_on_a_node_without_a_token_the_control_token_unlocks_what_a_token_would(
    open_node: LiveNode, local: Depot, tmp_path: Path
) -> None:
    """The dashboard, given the control token, still showed the budget's and engines' details as withheld
    ("details need the token") and private repos as absent: the control token was no token for reads."""
    local.import_dir(
        write_model_dir(tmp_path / "secret", {"config.json": b"{}"}), "acme/secret", private=True
    )
    anonymous = call(open_node.port, "GET", f"{API}/stats").json()
    assert anonymous["budget"]["used_bytes"] is None and anonymous["repos"] == 0
    assert call(open_node.port, "GET", "/api/models/acme/secret").status == 404
    unlocked = call(open_node.port, "GET", f"{API}/stats", headers=CONTROL).json()
    assert unlocked["budget"]["used_bytes"] is not None and unlocked["repos"] == 1
    assert call(open_node.port, "GET", "/api/models/acme/secret", headers=CONTROL).status == 200
    wrong = {"Authorization": "Bearer not-the-control-token"}
    assert call(open_node.port, "GET", f"{API}/stats", headers=wrong).json()["budget"]["used_bytes"] is None
    local.pin("acme/secret")  # (a pin of a private repo is listed with the token alone)
    assert call(open_node.port, "GET", f"{API}/pins").json() == []
    assert [p["repo_id"] for p in call(open_node.port, "GET", f"{API}/pins", headers=CONTROL).json()] == [
        "acme/secret"
    ]


def test_a_reverse_proxy_on_the_same_machine_passes_no_control_on(open_node: LiveNode, local: Depot) -> None:
    """The review's case: a proxy on the node's machine relays requests from anywhere from a loopback peer,
    with the Host it was given (127.0.0.1:PORT) and no header of a proxy. Reads pass through it; a DELETE
    without the control token is refused; one that has it (a client given the token) removes."""
    pull(open_node, ["q4f16"], CONTROL)
    front = HoldingProxy(open_node.url)  # relays method, path, body and Authorization, adds nothing
    port = int(front.url.rsplit(":", 1)[1])
    try:
        assert call(port, "GET", f"{API}/repos").status == 200
        for method, target, body in control_requests():
            reply = call(port, method, target, body)
            assert reply.status == 401, (method, target, reply.body)
            assert "control token" in reply.json()["error"]
        assert len(front.requests) == 1 + len(control_requests())  # relayed: the node itself refused them
        assert [r.repo_id for r in local.list_repos()] == [REPO] and local.pins() == []
        removed = call(port, "DELETE", f"{API}/repos/{REPO}", headers=CONTROL)
        assert removed.status == 200, removed.body
        assert local.list_repos() == []
    finally:
        front.stop()


def test_a_node_without_a_token_makes_a_control_token_of_its_own(local: Depot) -> None:
    tokens = {create_app(local)[APP_CONTROL_TOKEN] for _ in range(3)}
    assert len(tokens) == 3 and all(re.fullmatch(r"[A-Za-z0-9_-]{43}", t) for t in tokens), tokens
    assert create_app(local, control_token="mine")[APP_CONTROL_TOKEN] == "mine"
    assert create_app(local, TOKEN)[APP_CONTROL_TOKEN] == TOKEN  # a node with a token: that token
    with pytest.raises(ValueError, match="not both"):
        create_app(local, TOKEN, control_token="mine")
    # Two nodes: each one's token unlocks it, and not the other.
    a, b = LiveNode(local), LiveNode(local)
    try:
        for node, other in ((a, b), (b, a)):
            own = {"Authorization": f"Bearer {node.runner.app[APP_CONTROL_TOKEN]}"}
            assert call(node.port, "GET", f"{API}/pulls", headers=own).status == 200
            assert call(other.port, "GET", f"{API}/pulls", headers=own).status == 401
    finally:
        a.stop()
        b.stop()


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not a loopback one (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent: the kernel picks the source address
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_a_node_without_a_token_on_all_interfaces_takes_control_with_its_token_alone(local: Depot) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call the node from")
    runner = NodeRunner(create_app(local, control_token=CONTROL_TOKEN))
    server = BackgroundServer(runner, "all-interfaces")  # listens on 127.0.0.1: add 0.0.0.0 too
    port = free_port("0.0.0.0")
    asyncio.run_coroutine_threadsafe(web.TCPSite(runner, "0.0.0.0", port).start(), server.loop).result(30)
    try:
        for method, target, body in control_requests():
            reply = call(port, method, target, body, host=address)
            assert reply.status == 401, (method, target, reply.body)
            assert "control token" in reply.json()["error"]
            allowed = call(port, method, target, body, CONTROL, host=address)
            assert allowed.status not in (401, 403), (method, target, allowed.body)
        assert call(port, "GET", f"{API}/repos", host=address).status == 200
        assert call(port, "GET", "/", host=address).status == 200
        assert call(port, "GET", f"{API}/pulls").status == 401  # the same node, from 127.0.0.1
    finally:
        server.stop()


def test_serve_prints_the_dashboard_address_in_a_terminal_with_the_control_token() -> None:
    from modeldepot.server.run import dashboard_line

    assert dashboard_line("0.0.0.0", 8980, "abc").startswith("dashboard: http://127.0.0.1:8980/#token=abc (")


def test_a_service_keeps_its_control_token_out_of_its_log_in_a_file_of_its_user(tmp_path: Path) -> None:
    """A node whose log is no terminal (a service: its journal's readers are more than its owner) logged the
    control token, which removes models, at every start (an explorer's trial). It is in a file of the
    node's user alone, named in the dashboard's line, and gone when the node stops."""
    node = Serving(tmp_path / "home")
    kept = tmp_path / "home" / "locks" / f"control-{os.geteuid()}" / f"token-{node.port}"
    try:
        line = node.line_with("dashboard: ")
        assert f"dashboard: http://127.0.0.1:{node.port}/#token=<the control token in {kept}, " in line, line
        assert kept.stat().st_mode & 0o777 == 0o600 and kept.parent.stat().st_mode & 0o777 == 0o700
        found = [kept.read_text().strip()]
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", found[0])
        control = {"Authorization": f"Bearer {found[0]}"}
        assert call(node.port, "GET", "/").status == 200
        assert call(node.port, "GET", f"{API}/repos").status == 200  # reads are open
        assert call(node.port, "GET", f"{API}/pulls").status == 401
        assert call(node.port, "GET", f"{API}/pulls", headers=control).json() == []
        removed = call(node.port, "DELETE", f"{API}/repos/acme/nowhere", headers=control)
        assert removed.status == 404 and "acme/nowhere" in removed.json()["error"], removed.body  # reached
    finally:
        log = node.stop()
    assert found[0] not in log, log
    assert not kept.exists(), "the file goes with the node"


def test_serve_with_a_token_prints_the_dashboard_address_and_never_the_token(tmp_path: Path) -> None:
    secret = "n0de-t0ken-" + "x" * 20
    node = Serving(tmp_path / "home", "--token", secret)
    try:
        line = node.line_with("dashboard: ")
        assert f"dashboard: http://127.0.0.1:{node.port}/ " in line and "#token=" not in line, line
        assert "--token" in line, line
        assert call(node.port, "GET", f"{API}/pulls").status == 401
        assert (
            call(node.port, "GET", f"{API}/pulls", headers={"Authorization": f"Bearer {secret}"}).status
            == 200
        )
    finally:
        log = node.stop()
    assert secret not in log, log


@pytest.mark.parametrize(("variable", "flag", "info_lines"), [
    ("warning", "debug", True),  # the flag beats the variable
    ("warning", None, False),  # the variable, without the flag
    (None, None, True),  # neither: info
])  # fmt: skip
def test_serve_log_level_flag_beats_the_variable(
    tmp_path: Path, variable: str | None, flag: str | None, info_lines: bool
) -> None:
    """`serve --log-level debug` gave nothing more under MODELDEPOT_LOG_LEVEL=warning: the variable had set the
    process's logging first, and the flag was dropped without a word (an explorer's trial)."""
    node = Serving(tmp_path / "home", *(["--log-level", flag] if flag else []),
                   env_extra={"MODELDEPOT_LOG_LEVEL": variable or ""})  # fmt: skip
    try:
        node.line_with("dashboard: ")
        assert call(node.port, "GET", f"{API}/repos").status == 200
    finally:
        log = node.stop()
    assert (" INFO modeldepot.server: serving " in log) == info_lines, log


# -- against the OpenAPI document ----------------------------------------------------------------------------


def test_every_control_answer_is_as_the_document_says(
    guarded: LiveNode,
    open_node: LiveNode,
    local: Depot,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mounts: Mounts,
) -> None:
    """Every method and every status the document lists for the control routes, produced the way it
    happens, and its body checked against the schema the document gives for it."""
    document = openapi_document(modeldepot.__version__)
    checker = Checker(document)
    seen: set[tuple[str, str, str]] = set()

    def check(node: LiveNode, method: str, route: str, expect: int, body: Any = None,
              headers: dict[str, str] | None = None, query: str = "", **names: str) -> Reply:  # fmt: skip
        values = {"org": "onnx-community", "name": "tiny", "id": "0" * 16, **names}
        target = re.sub(r"\{(\w+)\}", lambda m: values[m[1]], route) + query
        what = f"{method} {target} ({'guarded' if node is guarded else 'open'} node)"
        reply = call(
            node.port, method, target, body, {**(AUTH if node is guarded else CONTROL), **(headers or {})}
        )
        assert reply.status == expect, f"{what} answered {reply.status}, not {expect}: {reply.body[:300]!r}"
        responses = document["paths"][route][method.lower()]["responses"]
        assert str(expect) in responses, f"{what}: {expect} is not documented"
        seen.add((method.lower(), route, str(expect)))
        content_type = reply.headers["Content-Type"].split(";")[0]
        assert content_type in responses[str(expect)]["content"], what
        pointer = f"/paths/{escape(route)}/{method.lower()}/responses/{expect}/content/{escape(content_type)}/schema"
        checker.validate(reply.json(), pointer, what)
        return reply

    pulls, one = f"{API}/pulls", f"{API}/pulls/{{id}}"
    preload, pin, repo = (
        f"{API}/repos/{{org}}/{{name}}/preload",
        f"{API}/repos/{{org}}/{{name}}/pin",
        f"{API}/repos/{{org}}/{{name}}",
    )
    no_token = {"Authorization": ""}

    held = HeldPulls(local, monkeypatch)
    started = check(guarded, "POST", pulls, 202, {"repo": REPO, "quants": ["q4f16"]}).json()
    check(guarded, "POST", pulls, 200, {"repo": REPO, "quants": ["q4f16"]})
    check(guarded, "GET", pulls, 200)
    check(guarded, "GET", one, 200, id=started["id"])
    check(guarded, "DELETE", repo, 409)  # (a pull of it runs)
    other = check(guarded, "POST", pulls, 202, {"repo": REPO, "quants": ["fp16"]}).json()
    check(guarded, "DELETE", one, 200, id=other["id"])  # (cancelled)
    check(guarded, "DELETE", one, 409, id=other["id"])  # (no longer running)
    check(guarded, "DELETE", one, 404)
    held.release()
    finished(guarded, started["id"], AUTH)
    check(guarded, "GET", one, 200, id=started["id"])  # done, with its result
    check(open_node, "GET", pulls, 200)
    check(guarded, "GET", one, 404)
    for method, route, body in (("POST", pulls, {"repo": REPO}), ("GET", pulls, None), ("GET", one, None),
                                ("DELETE", one, None), ("POST", preload, {}), ("DELETE", preload, {}), ("PUT", pin, {}),
                                ("DELETE", pin, {}), ("DELETE", repo, None)):  # fmt: skip
        check(guarded, method, route, 401, body, no_token)
        check(open_node, method, route, 401, body, no_token)
    for method, route in (
        ("POST", pulls),
        ("POST", preload),
        ("DELETE", preload),
        ("PUT", pin),
        ("DELETE", pin),
        ("DELETE", repo),
    ):
        check(open_node, method, route, 400, b"[]", JSON)
        check(open_node, method, route, 413, b" " * (MAX_CONTROL_BODY + 1), JSON)
        check(open_node, method, route, 415, b"{}", {"Content-Type": "application/x-www-form-urlencoded"})
        check(open_node, method, route, 422, {"repo": "a--b/c"} if route == pulls else
              {"revision": "a..b"} if route == repo else {"quant": "a b"})  # fmt: skip
    check(open_node, "POST", pulls, 404, {"repo": "acme/nowhere"})
    repo_routes = (("POST", preload), ("DELETE", preload), ("PUT", pin), ("DELETE", pin), ("DELETE", repo))
    for method, route in repo_routes:
        check(open_node, method, route, 404, None if route == repo else {}, org="acme", name="nowhere")
    for method, route, body in (("POST", pulls, {"repo": REPO}), ("GET", pulls, None), ("GET", one, None),
                                ("DELETE", one, None), ("POST", preload, {}), ("DELETE", preload, {}), ("PUT", pin, {}),
                                ("DELETE", pin, {}), ("DELETE", repo, None)):  # fmt: skip
        check(open_node, method, route, 400, body, query="?variant=fp16")  # no route takes it
    for method, route in repo_routes:
        check(open_node, method, route, 405, {} if route != repo else None, org="")  # no route: /repos//tiny
    check(open_node, "DELETE", repo, 400, query="?revision=a..b")
    check(open_node, "POST", preload, 200, {"quant": "q4f16"})
    check(open_node, "DELETE", preload, 200, {"quant": "q4f16"})
    check(open_node, "PUT", pin, 200, {"quant": "q4f16"})
    # 507: a disk so full that the index takes no write (its space reserve used up too).
    with monkeypatch.context() as full:
        full.setattr(local.store.index, "write", no_space)
        check(open_node, "POST", pulls, 507, {"repo": REPO})  # (its scan is saved before it starts)
        check(open_node, "PUT", pin, 507, {})
        check(open_node, "DELETE", pin, 507, {"quant": "q4f16"})
        check(open_node, "DELETE", repo, 507)
    check(open_node, "DELETE", pin, 200, {"quant": "q4f16"})
    # 503: a file of the model failed verification (found by a download, and quarantined).
    flip_byte(local.store.blobs.path(hashlib.sha256(FILES["onnx/model_q4f16.onnx"]).hexdigest()), 3)
    commit = local.resolve(REPO)  # (by its branch, an LFS file is a redirect to its commit's URL)
    assert call(open_node.port, "GET", f"/{REPO}/resolve/{commit}/onnx/model_q4f16.onnx").status == 503
    assert check(open_node, "POST", preload, 503, {"quant": "q4f16"}).headers["X-Error-Code"] == "CorruptFile"
    check(open_node, "DELETE", repo, 200)

    # 502 and 503: an upstream that does not answer, a node that is offline.
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with Depot(tmp_path / "lost", servers=[f"http://127.0.0.1:{closed_port()}"]) as lost:
        node = OpenNode(lost)
        try:
            check(node, "POST", pulls, 502, {"repo": "acme/tiny"})
        finally:
            node.stop()
    # 504: an upstream that takes the connection and never answers.
    monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", "1")
    with socket.socket() as hanging:
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hanging.getsockname()[1]}")
        with Depot(tmp_path / "slow") as slow:
            node = OpenNode(slow)
            try:
                check(node, "POST", pulls, 504, {"repo": "acme/tiny"})
            finally:
                node.stop()
    # 503: a store on a read-only mount refuses what would write it (the node's start says so; undocumented)
    with Depot(tmp_path / "frozen") as frozen:
        frozen.import_dir(write_model_dir(tmp_path / "frozen-files", {"w.bin": b"w" * 100}), "acme/tiny")
    with Depot(mounts.read_only(tmp_path / "frozen")) as frozen:
        node = OpenNode(frozen)
        try:
            for method, route in (("PUT", pin), ("DELETE", pin), ("DELETE", repo)):
                check(node, method, route, 503, {} if route == pin else None, org="acme")
        finally:
            node.stop()
    monkeypatch.setenv("MODELDEPOT_OFFLINE", "1")
    with Depot(tmp_path / "offline") as offline:
        node = OpenNode(offline)
        try:
            check(node, "POST", pulls, 503, {"repo": "acme/tiny"})
        finally:
            node.stop()

    documented = {
        (method, route, status)
        for route in CONTROL_PATHS
        for method, operation in document["paths"][route].items()
        for status in operation["responses"]
    }
    assert documented - seen == set(), "documented answers no call produced"


# -- the dashboard's files ------------------------------------------------------------------------------------


def test_the_dashboard_is_served_without_the_token_and_holds_nothing(
    guarded: LiveNode, open_node: LiveNode
) -> None:
    for path, (name, content_type, _) in ASSETS.items():
        for node in (guarded, open_node):
            reply = call(node.port, "GET", path)
            assert reply.status == 200, (path, reply.status)
            assert reply.headers["Content-Type"] == f"{content_type}; charset=utf-8"
            assert reply.body == resources.files("modeldepot.server.dashboard").joinpath(name).read_bytes()
            csp = reply.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
            assert reply.headers["X-Content-Type-Options"] == "nosniff"
            assert call(node.port, "HEAD", path).status == 200
            etag = reply.headers["ETag"]
            assert call(node.port, "GET", path, headers={"If-None-Match": etag}).status == 304
        # Nothing from the network: no URL to anywhere in the files.
        assert not re.search(rb"https?://", reply.body), path
    page = call(guarded.port, "GET", "/").body.decode()
    assert 'src="dashboard/dashboard.js"' in page and 'href="dashboard/dashboard.css"' in page
    assert call(guarded.port, "GET", "/dashboard/other.js").status == 401  # the token guards the rest
    assert call(open_node.port, "GET", "/dashboard/other.js").status == 404
    assert call(guarded.port, "GET", "/index.html").status == 401


def test_the_dashboard_files_are_package_data() -> None:
    """The wheel ships them: pyproject's package-data names every file of the dashboard's folder."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["modeldepot"]
    folder = resources.files("modeldepot.server.dashboard")
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.endswith((".py", ".pyc")))
    assert files == sorted(name for name, _, _ in ASSETS.values())
    for name in files:
        assert any(fnmatch(f"server/dashboard/{name}", glob) for glob in globs), name


def test_one_variant_is_removed_as_rm_quant_removes_it(
    guarded: LiveNode, local: Depot, caplog: pytest.LogCaptureFixture
) -> None:
    """The control API removed a repo or a revision, never one variant (`rm --quant` can: an explorer's
    trial). `?quant=` (or the body's `quant`) removes that variant's own files; the shared ones stay. The
    node's log says each pull as it starts and ends, and what a removal freed (a node killed mid-pull left
    no line of it; a removal was an access line alone: an explorer's trial)."""
    caplog.set_level(logging.INFO, logger="modeldepot.server")
    job = pull(guarded, ["q4f16", "fp16"], AUTH)
    assert re.search(
        rf"pull {job['id']} of {REPO}@main \(q4f16, fp16\) started: [\d.]+ \w+, commit ", caplog.text
    )
    assert re.search(
        rf"pull {job['id']} of {REPO} done: \d+ bytes, \d+ downloaded \(node [\d.]+ \w+\)", caplog.text
    )
    held = {f.path for f in local.list_files(REPO)}
    unknown = call(guarded.port, "DELETE", f"{API}/repos/{REPO}?quant=Q8_0", headers=AUTH)
    assert unknown.status == 404 and "holds no variant 'Q8_0'" in unknown.json()["error"], unknown.body
    bad = call(guarded.port, "DELETE", f"{API}/repos/{REPO}?quant=../x", headers=AUTH)
    assert bad.status == 400 and bad.json()["error"].startswith("quant:"), bad.body  # (in the URL: 400)
    differs = call(guarded.port, "DELETE", f"{API}/repos/{REPO}?quant=fp16", {"quant": "q4f16"}, AUTH)
    assert differs.status == 400 and "the URL names 'fp16'" in differs.json()["error"], differs.body
    assert {f.path for f in local.list_files(REPO)} == held, "nothing removed"
    removed = call(guarded.port, "DELETE", f"{API}/repos/{REPO}?quant=fp16", headers=AUTH)
    assert removed.status == 200 and removed.json()["bytes_freed"] > 0, removed.body
    assert re.search(rf"removed {REPO} \(fp16\) over the control API: [\d.]+ \w+ freed", caplog.text), (
        caplog.text
    )
    assert {f.path for f in local.list_files(REPO)} == set(Q4F16)
    again = call(guarded.port, "DELETE", f"{API}/repos/{REPO}", {"quant": "q4f16"}, AUTH)
    assert again.status == 200, again.body


def test_a_body_naming_a_key_twice_is_refused(open_node: LiveNode, local: Depot) -> None:
    """`{"repo": "a/b", "repo": "c/d"}` pulled c/d, the last one, without a word (an explorer's trial)."""
    raw = b'{"repo": "acme/one", "repo": "acme/two"}'
    reply = call(open_node.port, "POST", f"{API}/pulls", raw, {**CONTROL, "Content-Type": "application/json"})
    assert reply.status == 400 and "names 'repo' twice" in reply.json()["error"], reply.body
    assert call(open_node.port, "GET", f"{API}/pulls", headers=CONTROL).json() == []


def test_a_removal_says_what_the_node_itself_still_sends_stays_on_disk(tmp_path: Path) -> None:
    """A repo removed over the control API while the node sends one of its files to a slow client: the answer
    said all of it freed (`bytes_still_held` 0, `held_by` empty), as did `du`, and the disk got nothing back
    until the client was done (an explorer's trial). The node names itself as a holder."""
    import http.client
    import random

    big = random.Random(31).randbytes(64 << 20)
    with Depot(tmp_path / "store") as depot:
        depot.import_dir(
            write_model_dir(tmp_path / "src", {"big.bin": big, "config.json": b"{}"}), "acme/held"
        )
        node = LiveNode(depot, token=TOKEN)
        reader = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
        try:
            reader.request("GET", f"/acme/held/resolve/{depot.resolve('acme/held')}/big.bin", headers=AUTH)
            answer = reader.getresponse()
            assert (
                answer.status == 200 and answer.read(1 << 20) == big[: 1 << 20]
            )  # (and then it reads no more)
            removed = call(node.port, "DELETE", f"{API}/repos/acme/held", headers=AUTH)
            assert removed.status == 200, removed.body
            said = removed.json()
            assert said["held_by"] == [os.getpid()], said  # (the node runs in this process)
            assert said["bytes_still_held"] == len(big) and said["bytes_freed"] == 2, said
        finally:
            reader.close()
            node.stop()


def test_a_node_takes_its_token_from_a_file(tmp_path: Path) -> None:
    """`serve --token T` showed T to every local user in `ps`; MODELDEPOT_TOKEN_FILE is a mounted secret's way
    (an explorer's trial)."""
    secret = tmp_path / "token"
    secret.write_text("f1le-t0ken-" + "y" * 20 + "\n")
    node = Serving(tmp_path / "home", env_extra={"MODELDEPOT_TOKEN_FILE": str(secret)})
    try:
        # (a new store is said: a mistyped --home served an empty one, healthy, an explorer's trial)
        node.line_with(f"no store was at {tmp_path / 'home'}: this node made a new, empty one")
        node.line_with("dashboard: ")
        assert call(node.port, "GET", f"{API}/repos").status == 401
        sent = {"Authorization": "Bearer f1le-t0ken-" + "y" * 20}
        assert call(node.port, "GET", f"{API}/repos", headers=sent).status == 200
    finally:
        node.stop()
    with Depot(tmp_path / "home", create=False) as depot:  # (a pull killed meanwhile kept its download)
        write_partial(depot, os.urandom(3 * depot.chunk_size), [0])
    again = Serving(tmp_path / "home", env_extra={"MODELDEPOT_TOKEN_FILE": str(secret)})
    # (said as it starts: a node killed mid-pull said nothing, once back, of what it kept)
    again.line_with("1 interrupted download kept for a resume take ")
    again.line_with("dashboard: ")
    assert "no store was at" not in again.stop()
    from modeldepot.config import node_token
    from modeldepot.errors import ConfigError

    with pytest.raises(ConfigError, match="both set"):
        node_token({"MODELDEPOT_TOKEN": "a", "MODELDEPOT_TOKEN_FILE": str(secret)})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        node_token({"MODELDEPOT_TOKEN_FILE": str(tmp_path / "empty")})


def test_the_shutdown_grace_is_the_operators(tmp_path: Path) -> None:
    """The 30 s given to answers under way could not be matched to a supervisor's stop timeout (an explorer's
    trial)."""
    import socket

    with Depot(tmp_path / "home") as depot:
        depot.import_dir(write_model_dir(tmp_path / "src", {"big.bin": os.urandom(64 << 20)}), "acme/big")
        path = f"/acme/big/resolve/{depot.resolve('acme/big')}/big.bin"
    node = Serving(tmp_path / "home", env_extra={"MODELDEPOT_SHUTDOWN_GRACE": "2s"})
    node.line_with("dashboard: ")
    # A client that reads nothing more once it has the head: its answer is going when the node stops, and cut
    # at the end of the grace, said so (a node cut downloads as it stopped, without a word: an explorer's trial)
    # A dashboard's event stream open too: it ends as the node stops, no answer a stop waits for (the stop line
    # counted each open page: a review)
    with (
        socket.create_connection(("127.0.0.1", node.port), timeout=30) as slow,
        socket.create_connection(("127.0.0.1", node.port), timeout=30) as page,
    ):
        page.sendall(b"GET /api/depot/v1/events HTTP/1.1\r\nHost: node\r\n\r\n")
        assert page.recv(4096).startswith(b"HTTP/1.1 200 ")
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        slow.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
        assert slow.recv(4096).startswith(b"HTTP/1.1 200 ")
        log = node.stop()
    assert "stopping (SIGTERM): 1 answer under way gets up to 2 s to end" in log, log
    assert "1 answer still going after 2 s was cut as the node stopped" in log, log
    assert log.rstrip().endswith("stopped (SIGTERM)"), log
    again = Serving(tmp_path / "home", env_extra={"MODELDEPOT_SHUTDOWN_GRACE": "2s"})
    again.line_with("dashboard: ")
    log = again.stop()
    assert "stopping (SIGTERM): 0 answers under way get up to 2 s" in log and "cut" not in log, log
    # A second SIGTERM in the grace stops at once, as a signal's default does (143), said first: it ended the
    # node with no line after "stopping" (an explorer's trial)
    hasty = Serving(tmp_path / "home", env_extra={"MODELDEPOT_SHUTDOWN_GRACE": "30s"})
    hasty.line_with("dashboard: ")
    with socket.create_connection(("127.0.0.1", hasty.port), timeout=30) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        slow.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
        assert slow.recv(4096).startswith(b"HTTP/1.1 200 ")
        hasty.process.terminate()
        hasty.line_with("stopping (SIGTERM): 1 answer under way")
        hasty.process.terminate()
        assert hasty.process.wait(60) == -signal.SIGTERM
    log = hasty.stop()
    assert log.rstrip().endswith("SIGTERM again: stopping at once, 1 answer under way cut"), log


def test_an_answer_ending_within_the_grace_is_not_cut(tmp_path: Path) -> None:
    """The node said "up to 4 s" and cut answers at 2 s: aiohttp was handed half the grace, as it waits its
    timeout twice (a review). A download that ends 2.5 s after the stop gets every byte."""
    import signal
    import socket

    body = os.urandom(64 << 20)
    with Depot(tmp_path / "home") as depot:
        depot.import_dir(write_model_dir(tmp_path / "src", {"big.bin": body}), "acme/big")
        path = f"/acme/big/resolve/{depot.resolve('acme/big')}/big.bin"
    node = Serving(tmp_path / "home", env_extra={"MODELDEPOT_SHUTDOWN_GRACE": "4s"})
    try:
        node.line_with("dashboard: ")
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            slow.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
            got = bytearray(slow.recv(4096))
            assert got.startswith(b"HTTP/1.1 200 ")
            node.process.send_signal(signal.SIGTERM)
            time.sleep(2.5)  # (well inside the 4 s said)
            while part := slow.recv(1 << 20):
                got += part
    finally:
        log = node.stop()
    received = bytes(got).partition(b"\r\n\r\n")[2]
    assert "1 answer under way gets up to 4 s to end" in log and "cut" not in log, log
    assert len(received) == len(body), f"cut at {len(received)} of {len(body)} bytes:\n{log}"


def test_a_control_token_is_never_written_where_another_user_could_read_it(tmp_path: Path) -> None:
    """In a store a group shares, another member could make the file (or a FIFO) at the token's path in
    locks/: a root node wrote its token into that member's file, or hung opening the FIFO (a review). The
    token goes into a folder of the node's user alone, made new; a folder of that name that is another's
    is not used (nor is the token logged)."""
    from modeldepot.server.run import _keep_control_token

    with Depot(tmp_path / "store") as depot:
        kept = _keep_control_token(depot, 18960, "SECRET")
        assert kept is not None and kept.read_text() == "SECRET\n"
        os.chmod(kept, 0o644)  # (a file left by a node killed before, whatever it became)
        again = _keep_control_token(depot, 18960, "OTHER")
        assert again == kept and kept.read_text() == "OTHER\n" and kept.stat().st_mode & 0o777 == 0o600
        if os.geteuid() == 0:  # (another member's folder of that name: played with chown)
            shutil.rmtree(kept.parent)
            kept.parent.mkdir(mode=0o777)
            os.chown(kept.parent, 4321, 4321)
            assert _keep_control_token(depot, 18960, "SECRET") is None
            assert not kept.exists()
