"""The fleet end to end: a real etcd (tests/etcdserver.py) and real ``modeldepot serve --cluster`` processes on
loopback; CLI commands run as processes of their own, as an operator would run them.

- membership: nodes join and see each other; a SIGKILLed node leaves within its lease; a clean stop leaves
  at once; an etcd outage is survived (health says so, the nodes re-register, and what was published
  during it shows after);
- pulls through the fleet: a private repo pulled with the node token alone (no Hub), refused without it,
  and no repo or file name ever in etcd; a pull with the registry down (from the last known holders, or
  the Hub);
- holdings that follow CLI imports, pulls (chunk by chunk), ``gc --partials`` and ``rm`` on a served store.

Nothing waits by sleeping: every wait is bounded and polls its condition (``wait_until``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aetcd  # type: ignore[import-untyped]
import pytest
from aiohttp import ClientSession, web
from click.testing import CliRunner
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from conftest import (
    SMALL_CHUNK,
    BackgroundServer,
    InProcessNode,
    LiveNode,
    SilentAddress,
    closed_port,
    flip_byte,
    free_port,
    serving_repo,
    wait_until,
    write_model_dir,
    write_partial,
)
from etcdserver import EtcdServer, TlsFiles
from fleetnodes import Fleet, base_env, modeldepot
from modeldepot import Depot, __version__
from modeldepot._version import node_version
from modeldepot.cli import cli
from modeldepot.config import DepotConfig, cluster_credentials
from modeldepot.errors import ConfigError
from modeldepot.server.openapi import openapi_document

API = "/api/depot/v1"
TTL = 10.0  # the lease TTL of etcd:// (discovery)
TOKEN = "fleet-secret"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def weights(seed: int, chunks: int) -> bytes:
    return random.Random(seed).randbytes(chunks * SMALL_CHUNK - 5)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


DOCUMENT_URI = "urn:modeldepot:openapi"


def assert_documented(route: str, body: Any) -> None:
    """``body`` matches what the OpenAPI document says ``GET route`` answers with 200."""
    document = openapi_document(__version__)
    registry = Registry().with_resource(
        DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    pointer = f"/paths/{(API + route).replace('/', '~1')}/get/responses/200/content/application~1json/schema"
    Draft202012Validator({"$ref": f"{DOCUMENT_URI}#{pointer}"}, registry=registry).validate(body)


# -- settings, without a fleet ----------------------------------------------------------------------------


def test_cluster_settings_are_checked_at_the_edge(tmp_path: Path) -> None:
    env = {"MODELDEPOT_HOME": str(tmp_path)}
    config = DepotConfig.from_env({**env, "MODELDEPOT_CLUSTER": "etcd://10.0.0.1:2379,[::1]:2380",
                                   "MODELDEPOT_CLUSTER_PREFIX": "/fleets/prod/"})  # fmt: skip
    assert (config.cluster, config.cluster_prefix) == ("etcd://10.0.0.1:2379,[::1]:2380", "/fleets/prod")
    assert DepotConfig.from_env(env).cluster is None
    for bad in ("http://h:2379", "etcd://h", "etcd://h:99999", "etcd://", "etcd://h:1/x", "h:2379"):
        with pytest.raises(ConfigError, match="cluster"):
            Depot(tmp_path / "given", cluster=bad)
    # A mistyped MODELDEPOT_CLUSTER (a fleet-wide profile) is said where the fleet is opened, a pull's: every
    # local read (`ls`, `Depot().file_path()` in an inference worker) failed on it (an explorer's trial)
    with Depot(tmp_path / "reads") as depot:
        depot.import_dir(write_model_dir(tmp_path / "model", {"config.json": b"{}"}), "acme/x")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODELDEPOT_CLUSTER", "etcd://h")
        patch.delenv("HF_HUB_OFFLINE", raising=False)
        patch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        with Depot(tmp_path / "reads") as depot:
            assert depot.file_path("acme/x", "config.json").read_bytes() == b"{}"
            with pytest.raises(ConfigError, match="cluster 'etcd://h'"):
                depot.pull("acme/other")
    # (the last: where the /modeldepot fleet keeps its nodes, whose processes warned of its keys)
    for bad_prefix in ("modeldepot", "/a b", "/../x", "/", "/modeldepot/nodes"):
        with pytest.raises(ConfigError, match="prefix"):
            DepotConfig.from_env({**env, "MODELDEPOT_CLUSTER_PREFIX": bad_prefix})
    home = ["--home", str(tmp_path / "store")]
    for argv in (["serve", "--cluster", "http://h:1"], ["serve", "--cluster", "etcd://h:1", "--advertise", "ftp://x"],
                 ["pull", "acme/x", "--cluster", "nope"], ["peers", "--cluster-prefix", "x"]):  # fmt: skip
        assert CliRunner().invoke(cli, [*argv, *home]).exit_code == 2, argv
    no_cluster = CliRunner().invoke(
        cli, ["serve", "--advertise", "http://h:1", *home], env={"MODELDEPOT_CLUSTER": ""}
    )
    assert no_cluster.exit_code == 2 and "--advertise needs a cluster" in no_cluster.stderr
    refused = CliRunner().invoke(cli, ["peers", *home], env={"MODELDEPOT_CLUSTER": ""})
    assert refused.exit_code == 2 and "no cluster" in refused.stderr
    # A password in the cluster's URL was echoed whole, into the node's log (an explorer's trial)
    for argv, env in ((["peers", "--cluster", "etcd://root:S3CRET@h:2379"], {}),
                      (["serve"], {"MODELDEPOT_CLUSTER": "etcd://root:S3CRET@h:2379"})):  # fmt: skip
        secret = CliRunner().invoke(cli, [*argv, *home], env=env)
        assert secret.exit_code == 2 and "S3CRET" not in secret.output, secret.output
        assert "etcd://***@h:2379" in secret.output and "MODELDEPOT_CLUSTER_PASSWORD" in secret.output
    assert not (tmp_path / "store").exists(), "no store is made for a command refused (a README walk)"


# -- in one process, through the mem:// registry ----------------------------------------------------------


@contextlib.contextmanager
def scan_node_and_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holder_token: str | None = None
) -> Iterator[tuple[str, bytes, tuple[Depot, InProcessNode], tuple[Depot, InProcessNode]]]:
    """A mem:// fleet of two nodes, and no Hub: ``a`` holds "acme/model", ``c`` (with ``holder_token``, if
    given) its weights under another repo. Yields the cluster, the weights, and each node with its depot."""
    cluster = f"mem://fleet-{uuid.uuid4().hex[:12]}"
    big = weights(1, 12)
    files = {".gitattributes": GITATTRIBUTES, "config.json": b"{}", "model.safetensors": big}
    with (
        Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as a_depot,
        Depot(tmp_path / "c", chunk_size=SMALL_CHUNK) as c_depot,
    ):
        a_depot.import_dir(write_model_dir(tmp_path / "src-a", files), "acme/model")
        c_depot.import_dir(write_model_dir(tmp_path / "src-c", {"w.safetensors": big}), "other/base")
        a, c = InProcessNode(a_depot, cluster), InProcessNode(c_depot, cluster, token=holder_token)
        try:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # no Hub
            yield cluster, big, (a_depot, a), (c_depot, c)
        finally:
            c.stop()
            a.stop()


def test_holders_found_by_content_get_the_scan_nodes_chunk_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull finds every live node that holds a file's content (here one that holds it under another repo)
    in the fleet's view, without asking any node; their blob route is checked against the chunk digests
    the scan node's manifest gave for the same content."""
    with (
        scan_node_and_holder(tmp_path, monkeypatch) as (cluster, big, (a_depot, a), (c_depot, c)),
        Depot(tmp_path / "b", chunk_size=SMALL_CHUNK, cluster=cluster) as b,
    ):
        assert b.fleet is not None
        wait_until(lambda: {r.node_id: r.blobs for r in b.peers()} == {a_depot.node_id: 3, c_depot.node_id: 1},
                   10, "both nodes and their holdings in the view")  # fmt: skip
        manifest = b.scan_repo("acme/model")
        assert manifest.endpoint == a.url  # the scan found the repo on a live peer
        chain = b.chain

        found = asyncio.run(chain.holders(manifest, SMALL_CHUNK, list(manifest.files)))
        by_url = {s.source.base_url: s for s in found["model.safetensors"]}
        assert set(by_url) == {a.url, c.url}
        assert by_url[c.url].url == f"{c.url}{API}/blobs/{sha(big)}"
        assert by_url[c.url].chunk_blake3 == by_url[a.url].chunk_blake3 is not None
        assert [s.source.base_url for s in found["config.json"]] == [a.url]  # no LFS digest: the scan node
        result = b.pull("acme/model")
        assert set(result.sources) == {a.url, c.url}
        assert bytes(b.get_file("acme/model", "model.safetensors")) == big
        # The node's own holdings follow what this depot now holds once it serves: not here (it does
        # not register), so the fleet is still the two nodes.
        assert {r.node_id for r in b.peers()} == {a_depot.node_id, c_depot.node_id}


@contextlib.contextmanager
def _a_peer_behind_a_faulty_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, big: bytes, fault: str, path_suffix: str
) -> Iterator[tuple[Depot, Any, str]]:
    """A Hub (HF_ENDPOINT) holding acme/model, a peer holding its weights (another repo's: found by content
    alone) behind a link that injects ``fault`` into its blob answers ending in ``path_suffix``, and this
    depot in the fleet once it sees the peer's holding: (the depot, the fault's plan, the link's URL)."""
    from faultproxy import FaultProxy

    cluster = f"mem://fleet-{uuid.uuid4().hex[:12]}"
    files = {".gitattributes": GITATTRIBUTES, "config.json": b"{}", "model.safetensors": big}
    with (
        Depot(tmp_path / "hub", chunk_size=SMALL_CHUNK) as hub_depot,
        Depot(tmp_path / "c", chunk_size=SMALL_CHUNK) as c_depot,
    ):
        hub_depot.import_dir(write_model_dir(tmp_path / "src", files), "acme/model")
        c_depot.import_dir(write_model_dir(tmp_path / "src-c", {"w.safetensors": big}), "other/base")
        hub = LiveNode(hub_depot)
        link = FaultProxy("http://127.0.0.1:1", file_routes=("/blobs/",))
        c = InProcessNode(c_depot, cluster, advertise=link.url)
        link.upstream = c.url
        plan = link.set(fault, times=-1, path_suffix=path_suffix)
        try:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            with Depot(tmp_path / "b", chunk_size=SMALL_CHUNK, cluster=cluster) as b:
                wait_until(
                    lambda: [r.blobs for r in b.peers()] == [1], 10, "the peer and its holding in the view"
                )
                yield b, plan, link.url
        finally:
            c.stop()
            link.stop()
            hub.stop()


def test_a_peer_found_by_content_gives_its_own_digests_and_its_bad_chunks_are_caught_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer found only in the fleet's view (the scan was the Hub's: no manifest gave digests), behind a link
    that flips a byte of every blob answer: its chunks were taken unchecked, the file failed its SHA-256 and
    came again whole from the Hub, pull after pull, and the peer was never banned (an explorer's trial). It
    now gives its own chunk digests (its chunk map): each bad chunk is caught as it lands, fetched from the
    Hub, and the peer is banned; the file is fetched once."""
    big = weights(7, 12)
    # (the blob's bytes flipped; not its chunk map)
    with _a_peer_behind_a_faulty_link(tmp_path, monkeypatch, big, "flip", sha(big)) as (b, plan, link_url):
        manifest = b.scan_repo("acme/model")
        found = asyncio.run(b.chain.holders(manifest, SMALL_CHUNK, list(manifest.files)))
        (peer,) = found["model.safetensors"]
        assert peer.source.base_url == link_url and peer.chunk_blake3 is not None
        assert len(peer.chunk_blake3) == 12
        result = b.pull("acme/model")
        assert plan.injected >= 1, "the peer was asked, and its bytes flipped"
        assert bytes(b.get_file("acme/model", "model.safetensors")) == big
        assert result.bytes_downloaded < len(big) + len(big) // 2, (
            f"{result.bytes_downloaded} bytes for a {len(big)}-byte file: fetched again whole"
        )


def test_a_peer_whose_chunk_map_is_garbage_is_no_source_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer found by content whose chunk map comes garbled (a link that mangles its answers): it stayed a
    source with no digests, its chunks were taken unchecked, the file failed its SHA-256 and was fetched again,
    the honest peers' chunks thrown away with it (an explorer's trial). It is no source of that file now: the
    file comes from the others, once."""
    big = weights(8, 12)
    with _a_peer_behind_a_faulty_link(tmp_path, monkeypatch, big, "garble", "/chunks") as (b, plan, _):
        manifest = b.scan_repo("acme/model")
        found = asyncio.run(b.chain.holders(manifest, SMALL_CHUNK, list(manifest.files)))
        assert plan.injected >= 1, "the peer's chunk map was asked, and garbled"
        assert found.get("model.safetensors", []) == [], found
        result = b.pull("acme/model")
        assert bytes(b.get_file("acme/model", "model.safetensors")) == big
        assert result.bytes_downloaded < len(big) + len(big) // 4, result
        assert not [r for r in plan.requests if not r.split()[0].endswith("/chunks")], plan.requests


def test_a_branch_is_the_hubs_to_say_when_a_peer_holds_an_older_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once any node of a fleet held a repo, every pull in the fleet took the commit that node held for main,
    after the Hub's main had moved on ("pulled ..., 0 B downloaded", nodes serving different mains: an
    explorer's trial). A branch is looked up at the Hub first; the peers still answer a commit id, and a
    branch when the Hub cannot be reached (scan_node_and_holder's fleet has no Hub)."""
    newer = {".gitattributes": GITATTRIBUTES, "config.json": b'{"v": 2}', "model.safetensors": weights(2, 12)}
    with (
        scan_node_and_holder(tmp_path, monkeypatch) as (cluster, _big, (a_depot, a), _holder),
        serving_repo(tmp_path / "hub", newer, "acme/model", chunk_size=SMALL_CHUNK) as hub,
    ):
        older = a_depot.resolve("acme/model")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with Depot(tmp_path / "b", chunk_size=SMALL_CHUNK, cluster=cluster) as b:
            wait_until(lambda: len(b.peers()) == 2, 10, "both nodes in the view")
            manifest = b.scan_repo("acme/model")
            assert (manifest.endpoint, manifest.commit_id) == (hub.url, hub.depot.resolve("acme/model"))
            b.pull("acme/model")
            assert bytes(b.get_file("acme/model", "config.json")) == b'{"v": 2}'
            assert b.scan_repo("acme/model", older).endpoint == a.url  # (a commit: the peer that holds it)


def test_a_repo_nowhere_is_not_found_though_a_tokened_peer_refused_to_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One node of the fleet with a token this one lacks: its refusal says nothing of the repo, and a repo
    the Hub and the other peers do not have is RepoNotFound (a typo was a 502 on a mirror, repo_exists
    raising, "check MODELDEPOT_TOKEN" for a token not needed: an explorer's trial), the refusal still said."""
    from modeldepot.errors import RepoNotFoundError

    with (
        scan_node_and_holder(tmp_path, monkeypatch, holder_token="s3cret") as (
            cluster,
            _big,
            _scanned,
            _holder,
        ),
        serving_repo(tmp_path / "hub", {"config.json": b"{}"}, "acme/other", chunk_size=SMALL_CHUNK) as hub,
    ):
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with Depot(tmp_path / "b", chunk_size=SMALL_CHUNK, cluster=cluster) as b:
            wait_until(lambda: len(b.peers()) == 2, 10, "both nodes in the view")
            with pytest.raises(RepoNotFoundError, match="MODELDEPOT_TOKEN"):
                b.scan_repo("acme/nope")


def test_a_peer_that_never_answers_costs_a_scan_seconds_not_a_read_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One node of a fleet advertised at an address that accepts and never answers (or frozen, its lease
    still running): every scan that asked the peers waited on it a whole read timeout, in turn, 30 s of
    silence per pull in the fleet (an explorer's trial). Peers are asked at once, for PEER_SCAN_TIMEOUT
    each, the first to describe the repo wins, and a peer that let a scan time out is left out of the next."""
    from modeldepot.errors import RepoNotFoundError
    from modeldepot.transfer import chain

    monkeypatch.setattr(chain, "PEER_SCAN_TIMEOUT", 1.0)
    monkeypatch.setattr(chain, "_UNANSWERING", {})
    monkeypatch.setattr(chain, "_TIMED_OUT", {})
    monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", "600")  # (waiting on it a read timeout would hang the test)
    caplog.set_level(logging.WARNING, logger="modeldepot.transfer.chain")
    silent = SilentAddress()
    with (
        scan_node_and_holder(tmp_path, monkeypatch) as (cluster, _big, (a_depot, a), _holder),
        Depot(tmp_path / "frozen", chunk_size=SMALL_CHUNK) as frozen_depot,
    ):
        frozen = InProcessNode(frozen_depot, cluster, advertise=silent.url)
        try:
            commit = a_depot.resolve("acme/model")
            with Depot(tmp_path / "b", chunk_size=SMALL_CHUNK, cluster=cluster) as b:
                wait_until(lambda: len(b.peers()) == 3, 10, "the three nodes in the view")
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    with pytest.raises(RepoNotFoundError, match="did not answer in time"):
                        pool.submit(b.scan_repo, "acme/nope", "0" * 40).result(timeout=60)
                    assert len(silent.scans()) == 1
                    # (judged after the scan's answer, by a look at its health: the scan does not wait for it)
                    wait_until(lambda: any("(nor its health): left out" in r.getMessage() for r in caplog.records),
                               10, "the silent peer left out")  # fmt: skip
                    scanned = pool.submit(b.scan_repo, "acme/model", commit).result(timeout=60)
                    assert scanned.endpoint == a.url, "the peer that answered"
                    with pytest.raises(RepoNotFoundError) as nowhere:
                        pool.submit(b.scan_repo, "acme/nope", "0" * 40).result(timeout=60)
                assert f"{silent.url} was not asked" in str(nowhere.value)
                assert len(silent.scans()) == 1, "left out of the next scans"
                b.pull("acme/model", revision=commit)
                assert bytes(b.get_file("acme/model", "config.json", commit)) == b"{}"
        finally:
            frozen.stop()
            silent.close()


def test_a_peer_whose_health_answers_but_whose_scans_hang_is_left_out_after_three(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose loop is alive (its health answers) while its scans hang (a locked index, a hung disk):
    kept in for its health, every scan nobody else answered waited on it, scan after scan (a review). After
    SLOW_SCANS_TOLERATED timeouts in a row it is left out as a silent one is."""
    from modeldepot.errors import RepoNotFoundError
    from modeldepot.transfer import chain

    monkeypatch.setattr(chain, "PEER_SCAN_TIMEOUT", 0.5)
    monkeypatch.setattr(chain, "_UNANSWERING", {})
    monkeypatch.setattr(chain, "_TIMED_OUT", {})
    caplog.set_level(logging.WARNING, logger="modeldepot.transfer.chain")
    asked: list[str] = []

    def judged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "modeldepot.transfer.chain"]

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    released = threading.Event()

    async def hang(request: web.Request) -> web.Response:
        asked.append(request.path)
        while not released.is_set():  # the fault itself: a scan that does not end (until the test's end)
            await asyncio.sleep(0.05)
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get(f"{API}/health", health)
    app.router.add_get("/api/models/{tail:.*}", hang)
    stuck = BackgroundServer(web.AppRunner(app), "stuck-scans")
    with (
        scan_node_and_holder(tmp_path, monkeypatch) as (cluster, _big, _a, _holder),
        Depot(tmp_path / "stuck", chunk_size=SMALL_CHUNK) as stuck_depot,
    ):
        node = InProcessNode(stuck_depot, cluster, advertise=stuck.url)
        try:
            with Depot(tmp_path / "b", chunk_size=SMALL_CHUNK, cluster=cluster) as b:
                wait_until(lambda: len(b.peers()) == 3, 10, "the three nodes in the view")
                for scans in range(1, chain.SLOW_SCANS_TOLERATED + 1):
                    with pytest.raises(RepoNotFoundError):
                        b.scan_repo("acme/nope", "0" * 40)
                    wait_until(lambda n=scans: len(judged()) == n, 10, "the stuck peer judged")
                    assert len(asked) == scans
                assert [m.rsplit(": ", 1)[-1] for m in judged()] == ["asked again", "asked again",
                                                                      "left out of scans for 60 s"]  # fmt: skip
                with pytest.raises(RepoNotFoundError, match="was not asked"):
                    b.scan_repo("acme/nope", "0" * 40)
                assert len(asked) == chain.SLOW_SCANS_TOLERATED
        finally:
            released.set()
            node.stop()
            stuck.stop()


def test_a_peer_whose_chunks_wait_in_this_pulls_queue_is_not_taken_for_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer capped at 2 MiB/s (`serve --max-upload-rate`) sends four files of a pull, no Hub to go to: their
    chunks wait in the pull's own queue (4 requests to a node at once) well past SILENT_PEER. Judged from when
    a request was made, the healthy peer was dropped as "sent no byte" and the pull failed (a review); a
    request is judged from when it asked the peer."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # no Hub
    cluster = f"mem://fleet-{uuid.uuid4().hex[:12]}"
    mib = 1 << 20
    files = {".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n"}
    files.update({f"w{i}.bin": random.Random(i).randbytes(4 * mib) for i in range(4)})
    monkeypatch.setenv("MODELDEPOT_MAX_UPLOAD_RATE", "2MiB")
    with Depot(tmp_path / "peer", chunk_size=mib) as peer_depot:
        monkeypatch.delenv("MODELDEPOT_MAX_UPLOAD_RATE")
        peer_depot.import_dir(write_model_dir(tmp_path / "src", files), "acme/big")
        peer = InProcessNode(peer_depot, cluster)
        try:
            with Depot(tmp_path / "b", chunk_size=mib, cluster=cluster) as b:
                wait_until(lambda: any(row.blobs for row in b.peers()), 10, "the peer's holdings in the view")
                pulled = b.pull("acme/big")
                assert pulled.bytes_by_source == {"peer": sum(len(d) for d in files.values())}, pulled
                for path, data in files.items():
                    assert bytes(b.get_file("acme/big", path)) == data
        finally:
            peer.stop()


def test_a_mirror_peer_answers_a_scan_from_its_store_while_the_hub_is_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that is a mirror answers a fleet's scan from what it holds, at once: it asked its own upstream
    first (the Hub, which the scanning node had asked already for a branch), and the scan waited on that
    silent upstream past its patience for a repo the peer does not hold (reviews: it was then taken for
    silent itself, and the repos it alone holds could not be scanned)."""
    from modeldepot.errors import RepoNotFoundError
    from modeldepot.transfer import chain

    monkeypatch.setattr(chain, "BRANCH_LOOKUP_TIMEOUT", 1.0)  # (the scanner's wait for the Hub: not tested)
    monkeypatch.setattr(chain, "_UNANSWERING", {})
    monkeypatch.setattr(chain, "_TIMED_OUT", {})
    silent = SilentAddress()  # the Hub, behind a firewall that lets connections in and drops the rest
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", silent.url)
    cluster = f"mem://fleet-{uuid.uuid4().hex[:12]}"
    files = {".gitattributes": GITATTRIBUTES, "config.json": b"{}", "model.safetensors": weights(3, 4)}
    with Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as a_depot:
        a_depot.import_dir(write_model_dir(tmp_path / "src", files), "acme/model")
        with a_depot.store.index.write() as db:  # (as if the mirror had pulled it from that Hub)
            db.execute("UPDATE repos SET origin = ?", (silent.url,))
        a = InProcessNode(a_depot, cluster, mirror=True)
        try:
            with Depot(tmp_path / "b", chunk_size=SMALL_CHUNK, cluster=cluster) as b:
                wait_until(lambda: len(b.peers()) == 1, 10, "the mirror in the view")
                with pytest.raises(RepoNotFoundError, match="not on the depot node"):
                    b.scan_repo("acme/not-held")
                assert b.scan_repo("acme/model").endpoint == a.url
                assert chain._TIMED_OUT == {} and chain._UNANSWERING == {}
        finally:
            a.stop()
            silent.close()


def test_mirrors_in_a_fleet_ask_each_other_no_further_while_their_upstream_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two mirrors of one fleet, their upstream out of reach: a repo neither holds was asked of the other
    mirror, which asked its upstream and then its peers, the first among them, and so round, until the scan's
    10 s ran out; three such asks (typos) left every peer, alive, out of scans for a minute, and the repos only
    a peer held were 502s (an explorer's trial). A peer's scan is answered from what it holds."""
    import urllib.error
    import urllib.request

    from modeldepot.transfer import chain

    monkeypatch.setattr(chain, "_UNANSWERING", {})
    monkeypatch.setattr(chain, "_TIMED_OUT", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # (nothing listens: refused)
    monkeypatch.setenv("MODELDEPOT_OUTAGE_PATIENCE", "0")
    cluster = f"mem://fleet-{uuid.uuid4().hex[:12]}"
    files = {".gitattributes": GITATTRIBUTES, "config.json": b"{}", "model.safetensors": weights(4, 2)}
    with Depot(tmp_path / "a", chunk_size=SMALL_CHUNK, cluster=cluster) as a_depot, \
            Depot(tmp_path / "b", chunk_size=SMALL_CHUNK, cluster=cluster) as b_depot:  # fmt: skip
        b_depot.import_dir(write_model_dir(tmp_path / "src", files), "acme/on-b")
        a, b = InProcessNode(a_depot, cluster, mirror=True), InProcessNode(b_depot, cluster, mirror=True)
        try:
            wait_until(lambda: len(a_depot.peers()) == 2 == len(b_depot.peers()), 10, "both in each view")
            for typo in ("acme/nowhere-1", "acme/nowhere-2", "acme/nowhere-3"):
                with pytest.raises(urllib.error.HTTPError) as answered:
                    urllib.request.urlopen(f"{a.url}/api/models/{typo}", timeout=60)
                answered.value.close()  # (its socket: left to the collector, a later test's warning)
                assert answered.value.code in (404, 502), answered.value.code
            assert chain._TIMED_OUT == {} and chain._UNANSWERING == {}, "no peer was taken for silent"
            with urllib.request.urlopen(f"{a.url}/api/models/acme/on-b", timeout=60) as reply:
                assert json.loads(reply.read())["id"] == "acme/on-b"
        finally:
            a.stop()
            b.stop()


def test_a_peer_that_refuses_this_nodes_token_is_said_once_as_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node of the fleet started with another token answers 401: what it holds (or claimed in a swarm) is
    fetched elsewhere, the Hub's chunks again (1.8 times the repo in a trial), and only an info line said
    so. It is a warning now, once for the node, naming the token."""
    with (
        scan_node_and_holder(tmp_path, monkeypatch, "another") as (cluster, big, _, (_, c)),
        Depot(tmp_path / "b", chunk_size=SMALL_CHUNK, cluster=cluster) as b,
    ):
        wait_until(lambda: len(b.peers()) == 2, 10, "both nodes in the view")
        with caplog.at_level(logging.WARNING, logger="modeldepot.transfer.download"):
            b.pull("acme/model")
        assert bytes(b.get_file("acme/model", "model.safetensors")) == big
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len([m for m in said if c.url in m and "MODELDEPOT_TOKEN" in m]) == 1, said


# -- with etcd and real processes --------------------------------------------------------------------------


def test_nodes_join_see_each_other_leave_and_ride_out_an_etcd_outage(fleet: Fleet, tmp_path: Path) -> None:
    # (c's store of another chunk size: another swarm, said by `peers`; found mid-rollout as a Hub bill of 1.96
    # times the model before, an explorer's trial)
    nodes = [fleet.node("a"), fleet.node("b"), fleet.node("c", env={"MODELDEPOT_CHUNK_SIZE": "4MiB"})]
    a, b, c = (node.ready() for node in nodes)
    ids = {a.id, b.id, c.id}
    wait_until(lambda: a.peer_ids() == ids and b.peer_ids() == ids and c.peer_ids() == ids, 15,
               "the three nodes to see each other")  # fmt: skip

    rows = fleet.peers_cli()
    assert [row["node_id"] for row in rows] == sorted(ids)
    assert {row["node_id"]: row["url"] for row in rows} == {n.id: n.url for n in nodes}
    for row in rows:
        assert row["version"] == node_version() and row["blobs"] == row["bytes"] == row["partial"] == 0
        assert row["started_at"] <= row["last_seen"] <= time.time() + 1
    assert {row["node_id"]: row["chunk_size"] for row in rows} == {
        a.id: SMALL_CHUNK,
        b.id: SMALL_CHUNK,
        c.id: 4 << 20,
    }
    table = modeldepot("peers", "--cluster", fleet.etcd.cluster, env=base_env(MODELDEPOT_HOME=""))
    assert "different chunk sizes (64.0 KiB: 2 nodes, 4.0 MiB: 1 node)" in table.stderr, table.stderr
    health = a.health()
    assert (
        health["backend"] == "etcd" and health["connected"] and health["registered"] and health["peers"] == 3
    )
    assert a.get("/health", token=False)["node_id"] == a.id
    assert_documented("/health", a.get("/health"))
    assert_documented("/peers", a.get("/peers"))
    # Each store notes it is a fleet node's: a pull of it while its serve is down says it joins no swarm
    from modeldepot.transfer.chain import served_in_fleet

    for node in nodes:
        with Depot(node.home, create=False) as store:
            wait_until(lambda d=store: served_in_fleet(d.store, "/modeldepot"), 10, "the note in the store")
            assert not served_in_fleet(store.store, "/another-fleet")

    c.kill()  # SIGKILL: no goodbye; its lease runs out
    killed = time.monotonic()
    wait_until(lambda: a.peer_ids() == {a.id, b.id}, TTL + 5, "the killed node to leave the fleet")
    assert time.monotonic() - killed <= TTL + 5
    assert {row["node_id"] for row in fleet.peers_cli()} == {a.id, b.id}

    fleet.etcd.kill()  # an outage
    wait_until(lambda: not a.health()["connected"], 20, "health to show the outage")
    assert a.get("/health", token=False)["status"] == "degraded"  # (200 still: files are served)
    assert_documented("/health", a.get("/health", token=False))
    cluster = a.health()
    assert cluster["last_error"] and not cluster["registered"] and cluster["since"] <= time.time()
    assert a.peer_ids() == {a.id, b.id}, "the last known view stays"
    unreachable = modeldepot("peers", "--cluster", fleet.etcd.cluster, "--home", str(tmp_path / "no-store-here"),
                             env=base_env(), check=False)  # fmt: skip
    assert unreachable.returncode == 1 and "cannot be reached" in unreachable.stderr
    # (not a node's warning, "answering from the last view … and retrying": the command does neither)
    assert "retrying" not in unreachable.stderr, unreachable.stderr
    # What b's store gains during the outage is published when etcd is back.
    during = {"model.safetensors": weights(2, 3), "config.json": b'{"during": "outage"}'}
    modeldepot("import", str(write_model_dir(tmp_path / "during", during)), "--repo", "acme/during", "--home",
               str(b.home), env=base_env())  # fmt: skip

    fleet.etcd.start()  # same data, same ports
    wait_until(lambda: all(n.health()["registered"] for n in (a, b)), 20, "both nodes to be registered again")
    assert a.get("/health", token=False)["status"] == "ok"
    wait_until(
        lambda: (a.row(b.id) or {}).get("blobs") == 2, 15, "a to see what b imported during the outage"
    )
    assert set(fleet.holdings(b.id)) == {sha(data) for data in during.values()}
    row = a.row(b.id)
    assert row is not None and (row["bytes"], row["partial"]) == (sum(len(d) for d in during.values()), 0)
    said = ("the registry cannot be reached", "the registry answers again")  # as the state changes
    wait_until(
        lambda: all(line in a.log_text() for line in said), 15, "a's log to tell of the outage and its end"
    )

    assert b.kill(signal.SIGTERM) == 0  # a clean stop: b leaves at once, not when its lease runs out
    keys = fleet.dump()
    assert not [k for k in keys if b.id.encode() in k], "a stopped node's keys are withdrawn"
    assert any(a.id.encode() in k for k in keys)


def test_a_node_alone_under_its_prefix_names_the_fleets_etcd_holds_under_others(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A mistyped --cluster-prefix made a fleet of one without a word (an explorer's trial): the node, and
    `peers`, name the prefixes etcd holds nodes under. The walk of etcd's keys steps over other programs'
    keys and over a fleet's holdings (which sort before its nodes)."""
    a, b = fleet.node("a").ready(), fleet.node("b").ready()
    model = {"model.safetensors": weights(3, 2), "config.json": b"{}"}
    modeldepot("import", str(write_model_dir(tmp_path / "m", model)), "--repo", "acme/m", "--home", str(a.home),
               env=base_env())  # fmt: skip
    wait_until(lambda: len(fleet.holdings(a.id)) == 2, 15, "a's holdings in etcd")

    async def other_programs_keys() -> None:
        client = aetcd.Client("127.0.0.1", fleet.etcd.client_port, timeout=5)
        try:
            for key in (b"/app/config", b"/modeldepot-notes", b"\x00first", b"zz/last"):
                await client.put(key, b"not ours")
        finally:
            await client.close()

    asyncio.run(other_programs_keys())
    alone = fleet.node("c", None, "--cluster-prefix", "/modeldepto").ready()
    wait_until(lambda: "no other node is registered under prefix /modeldepto" in alone.log_text(), 30,
               "the lone node's warning")  # fmt: skip
    assert "etcd holds nodes under /modeldepot (2 nodes)" in alone.log_text()
    # a node with peers says nothing of the kind
    assert "no other node is registered" not in a.log_text() + b.log_text()

    listed = modeldepot("peers", "--cluster", fleet.etcd.cluster, "--cluster-prefix", "/nope", "--json",
                        env=base_env())  # fmt: skip
    assert json.loads(listed.stdout) == []
    assert "no node is registered under prefix /nope" in listed.stderr
    assert "/modeldepot (2 nodes), /modeldepto (1 node)" in listed.stderr, listed.stderr
    assert "warning" not in modeldepot("peers", "--cluster", fleet.etcd.cluster, env=base_env()).stderr


def test_etcd_credentials_are_checked_before_anything_connects(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"pa ss\r\n")
    assert cluster_credentials({}) is None
    assert cluster_credentials({"MODELDEPOT_CLUSTER_USER": "u", "MODELDEPOT_CLUSTER_PASSWORD": "p"}) == (
        "u",
        "p",
    )
    assert cluster_credentials({"MODELDEPOT_CLUSTER_USER": "u", "MODELDEPOT_CLUSTER_PASSWORD_FILE": str(secret)}) == (
        "u", "pa ss")  # fmt: skip
    for env, said in [
        ({"MODELDEPOT_CLUSTER_USER": "u"}, "without a password"),
        ({"MODELDEPOT_CLUSTER_PASSWORD": "p"}, "without MODELDEPOT_CLUSTER_USER"),
        ({"MODELDEPOT_CLUSTER_USER": "u", "MODELDEPOT_CLUSTER_PASSWORD": "p",
          "MODELDEPOT_CLUSTER_PASSWORD_FILE": str(secret)}, "both set"),
        ({"MODELDEPOT_CLUSTER_USER": "u", "MODELDEPOT_CLUSTER_PASSWORD_FILE": str(tmp_path / "nope")},
         "No such file"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=said):
            cluster_credentials(env)


def test_an_etcd_password_sent_in_clear_over_a_network_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA given with a plain etcd:// URL is refused (the keys would go in clear); a password went in clear
    to an etcd on another machine without a word (an explorer's trial). Nothing connects here."""
    from modeldepot.discovery import open_discovery

    monkeypatch.setenv("MODELDEPOT_CLUSTER_USER", "root")
    monkeypatch.setenv("MODELDEPOT_CLUSTER_PASSWORD", "s3cret")
    for url, said in (("etcd://etcd.example:2379", True), ("etcd://127.0.0.1:2379,localhost:2380", False),
                      ("etcd://[::1]:2379", False), ("etcd://10.1.2.3:2379", True)):  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="modeldepot.discovery"):
            open_discovery(url)
        assert ("goes over the network in clear" in caplog.text) is said, (url, caplog.text)


def enable_etcd_auth(etcd: EtcdServer, password: str) -> None:
    """etcd's authentication on, as `etcdctl user add root; user grant-role root root; auth enable` does."""

    async def enable() -> None:
        client = aetcd.Client("127.0.0.1", etcd.client_port, timeout=5)
        await client.connect()
        try:
            auth = aetcd.rpc.AuthStub(client.channel)
            await auth.UserAdd(aetcd.rpc.AuthUserAddRequest(name="root", password=password), timeout=5)
            await auth.UserGrantRole(aetcd.rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
            await auth.AuthEnable(aetcd.rpc.AuthEnableRequest(), timeout=5)
        finally:
            await client.close()

    asyncio.run(enable())


def test_a_fleet_on_an_etcd_with_authentication_keeps_out_who_has_no_password(tmp_path: Path) -> None:
    """An explorer's trial: etcd could not be locked down (no setting gave it credentials), and anything that
    reached its port registered a node of its own there and was sent the fleet's MODELDEPOT_TOKEN. Nodes give
    etcd a user and a password now, hold on when etcd drops their token (its TTL: 2 s here), and a client
    without them reads and writes nothing; a wrong password is said in the node's health."""
    etcd = EtcdServer(tmp_path / "etcd", "--auth-token-ttl", "2").start()
    try:
        enable_etcd_auth(etcd, "s3cret-etcd")
        (tmp_path / "password").write_text("s3cret-etcd\n")  # (a mounted secret, its line end dropped)
        fleet = Fleet(tmp_path, etcd)
        a = fleet.node("a", env={"MODELDEPOT_CLUSTER_USER": "root",
                                 "MODELDEPOT_CLUSTER_PASSWORD_FILE": str(tmp_path / "password")})  # fmt: skip
        b = fleet.node(
            "b", env={"MODELDEPOT_CLUSTER_USER": "root", "MODELDEPOT_CLUSTER_PASSWORD": "s3cret-etcd"}
        )
        wrong = fleet.node(
            "wrong", env={"MODELDEPOT_CLUSTER_USER": "root", "MODELDEPOT_CLUSTER_PASSWORD": "guess"}
        )
        none = fleet.node("none")
        try:
            a.ready(), b.ready(), wrong.ready(), none.ready()
            wait_until(lambda: a.peer_ids() == b.peer_ids() == {a.id, b.id}, 15, "a and b to see each other")
            time.sleep(6)  # (their tokens run out between two calls: each client authenticates again)
            # a's next write (what it holds after an import) needs a token etcd takes
            model = write_model_dir(tmp_path / "model", {"config.json": b"{}", "w.bin": weights(1, 2)})
            modeldepot("import", str(model), "--repo", "acme/auth", "--home", str(a.home), env=base_env())
            wait_until(lambda: (b.row(a.id) or {}).get("blobs", 0) == 2, 20, "b to see what a holds now")
            c = fleet.node(
                "c", env={"MODELDEPOT_CLUSTER_USER": "root", "MODELDEPOT_CLUSTER_PASSWORD": "s3cret-etcd"}
            )
            c.ready()
            wait_until(
                lambda: a.peer_ids() == {a.id, b.id, c.id}, 15, "a to see c join after its token ran out"
            )
            assert a.health()["connected"] and a.health()["registered"]
            for outsider in (wrong, none):
                health = outsider.health()
                assert not health["registered"] and not health["connected"], health
                assert outsider.id not in a.peer_ids()
            # (its last error, looked at again: under load, one of its tries may have run out of time instead,
            # etcd's check of a password being slow work, as a CI run saw)
            wait_until(lambda: "authentication failed" in wrong.health()["last_error"], 20,
                       "the wrong password's node to say its authentication failed")  # fmt: skip
            wait_until(
                lambda: "set MODELDEPOT_CLUSTER_USER and MODELDEPOT_CLUSTER_PASSWORD" in none.health()["last_error"],
                20, "the node without a password to say what to set",
            )  # fmt: skip

            async def read_without_a_password() -> None:
                client = aetcd.Client("127.0.0.1", etcd.client_port, timeout=5)
                try:
                    await client.get_all()
                finally:
                    await client.close()

            with pytest.raises(aetcd.ClientError, match=r"user name is empty|permission denied"):
                asyncio.run(read_without_a_password())
            rows = modeldepot("peers", "--cluster", etcd.cluster, "--json", env=base_env(
                MODELDEPOT_HOME="", XDG_CACHE_HOME=str(tmp_path / "jump"), MODELDEPOT_CLUSTER_USER="root",
                MODELDEPOT_CLUSTER_PASSWORD="s3cret-etcd"))  # fmt: skip
            assert {row["node_id"] for row in json.loads(rows.stdout)} == {a.id, b.id, c.id}
        finally:
            fleet.close()
    finally:
        etcd.kill()


def test_a_fleet_on_an_etcd_over_tls_with_client_certificates(tmp_path: Path) -> None:
    """A production etcd serves its clients over TLS and asks each for a certificate (--client-cert-auth): a
    node could reach only a plain etcd (aetcd opens plain channels), so a fleet's keys, its nodes' addresses
    and what they hold, crossed the network in clear. `etcds://` with MODELDEPOT_CLUSTER_CA (and _CERT, _KEY,
    as etcdctl's --cacert, --cert, --key): the nodes see each other; one that trusts another CA, or has no
    certificate, is kept out and says why; a plain etcd:// URL refuses the TLS files."""
    tls = TlsFiles(tmp_path / "tls")
    etcd = EtcdServer(tmp_path / "etcd", tls=tls).start()
    try:
        fleet = Fleet(tmp_path, etcd)
        a, b = fleet.node("a", env=tls.env()), fleet.node("b", env=tls.env())
        stranger = fleet.node("stranger", env={**tls.env(), "MODELDEPOT_CLUSTER_CA": str(tls.other_ca)})
        nameless = fleet.node("nameless", env={"MODELDEPOT_CLUSTER_CA": str(tls.ca)})
        try:
            a.ready(), b.ready(), stranger.ready(), nameless.ready()
            wait_until(lambda: a.peer_ids() == b.peer_ids() == {a.id, b.id}, 20, "a and b to see each other")
            model = write_model_dir(tmp_path / "model", {"config.json": b"{}", "w.bin": weights(1, 2)})
            modeldepot("import", str(model), "--repo", "acme/tls", "--home", str(a.home), env=base_env())
            wait_until(lambda: (b.row(a.id) or {}).get("blobs", 0) == 2, 20, "b to see what a holds")
            for outsider in (stranger, nameless):
                health = outsider.health()
                assert not health["registered"] and not health["connected"], health
                assert "(TLS: is MODELDEPOT_CLUSTER_CA" in health["last_error"], health
            assert "CERTIFICATE_VERIFY_FAILED" in stranger.health()["last_error"]
            rows = modeldepot("peers", "--cluster", etcd.cluster, "--json", env=base_env(
                MODELDEPOT_HOME="", XDG_CACHE_HOME=str(tmp_path / "jump"), **tls.env()))  # fmt: skip
            assert {row["node_id"] for row in json.loads(rows.stdout)} == {a.id, b.id}
            plain = etcd.cluster.replace("etcds://", "etcd://")
            refused = modeldepot("peers", "--cluster", plain, env=base_env(**tls.env()), check=False)
            assert refused.returncode == 2 and "give it as etcds://HOST:PORT" in refused.stderr, (
                refused.stderr
            )
            # (a plain client of etcd's TLS port was told "Socket closed", no more)
            plain_client = modeldepot("peers", "--cluster", plain, env=base_env(), check=False)
            assert "if that etcd serves TLS, give it as etcds://HOST:PORT" in plain_client.stderr, (
                plain_client.stderr
            )
        finally:
            fleet.close()
    finally:
        etcd.kill()


def test_a_node_takes_its_renewed_client_certificate_and_password_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TLS files and the password file were read once, at start: a node whose certificate expired, or
    whose password was changed, stayed out of the fleet for good, though the new ones were on disk (an
    explorer's trial). A client made again after a refused handshake or password reads them again."""
    import shutil

    from modeldepot.discovery import open_discovery
    from modeldepot.discovery.base import NodeRecord

    tls = TlsFiles(tmp_path / "tls")
    etcd = EtcdServer(tmp_path / "etcd", tls=tls).start()
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    shutil.copy(tls.stranger, cert), shutil.copy(tls.stranger_key, key)  # (one etcd does not take)
    monkeypatch.setenv("MODELDEPOT_CLUSTER_CA", str(tls.ca))
    monkeypatch.setenv("MODELDEPOT_CLUSTER_CERT", str(cert))
    monkeypatch.setenv("MODELDEPOT_CLUSTER_KEY", str(key))

    async def main() -> None:
        node = open_discovery(etcd.cluster)
        await node.start()
        try:
            await node.register(NodeRecord("c" * 32, "http://c.test:8980", "1", 1.0))
            await node.wait_for(lambda: "(TLS:" in (node.status().last_error or ""), 15)
            shutil.copy(tls.client, cert), shutil.copy(tls.client_key, key)  # renewed on disk
            await node.wait_for(lambda: node.status().registered, 20)
        finally:
            await node.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        etcd.kill()
    # The same for a password file a secret manager rewrote (etcd's authentication on, no TLS)
    etcd = EtcdServer(tmp_path / "etcd-auth").start()
    try:
        enable_etcd_auth(etcd, "new-password")
        secret = tmp_path / "password"
        secret.write_text("old-password\n")
        for name in ("MODELDEPOT_CLUSTER_CA", "MODELDEPOT_CLUSTER_CERT", "MODELDEPOT_CLUSTER_KEY"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("MODELDEPOT_CLUSTER_USER", "root")
        monkeypatch.setenv("MODELDEPOT_CLUSTER_PASSWORD_FILE", str(secret))

        async def with_a_password() -> None:
            node = open_discovery(etcd.cluster)
            await node.start()
            try:
                await node.register(NodeRecord("d" * 32, "http://d.test:8980", "1", 1.0))
                await node.wait_for(lambda: "authentication failed" in (node.status().last_error or ""), 15)
                secret.write_text("new-password\n")  # rotated
                await node.wait_for(lambda: node.status().registered, 20)
            finally:
                await node.close()

        asyncio.run(asyncio.wait_for(with_a_password(), 60))
    finally:
        etcd.kill()


def test_etcd_tls_files_are_checked_before_anything_connects(tmp_path: Path) -> None:
    from modeldepot.config import ClusterTls, cluster_tls

    tls = TlsFiles(tmp_path / "tls")
    assert cluster_tls({}, secure=False) is None
    assert cluster_tls({}, secure=True) == ClusterTls()  # (the system's CAs, no client certificate)
    found = cluster_tls(tls.env(), secure=True)
    assert found is not None and found.ca == tls.ca.read_bytes() and found.key == tls.client_key.read_bytes()
    (tmp_path / "not-pem").write_text("hello")
    locked = tmp_path / "locked.key"  # (the client's key under a passphrase)
    subprocess.run(["openssl", "pkey", "-in", str(tls.client_key), "-out", str(locked), "-aes256", "-passout",
                    "pass:s3cret"], check=True, capture_output=True)  # fmt: skip
    pair = {"MODELDEPOT_CLUSTER_CA": str(tls.ca)}
    for env, secure, said in [
        ({**pair, "MODELDEPOT_CLUSTER_CERT": str(tls.client), "MODELDEPOT_CLUSTER_KEY": str(locked)}, True,
         "without a passphrase"),
        ({**pair, "MODELDEPOT_CLUSTER_CERT": str(tls.client_key), "MODELDEPOT_CLUSTER_KEY": str(tls.client)}, True,
         "are not a certificate and its key"),
        ({"MODELDEPOT_CLUSTER_CA": str(tls.client_key)}, True, "holds no CA certificate"),
        ({**pair, "MODELDEPOT_CLUSTER_CERT": str(tls.expired()[0]), "MODELDEPOT_CLUSTER_KEY": str(tls.expired()[1])},
         True, "expired on .*: renew it"),
        ({"MODELDEPOT_CLUSTER_CA": str(tls.ca)}, False, "plain etcd:// URL"),
        ({"MODELDEPOT_CLUSTER_CERT": str(tls.client)}, True, "CERT is set without MODELDEPOT_CLUSTER_KEY"),
        ({"MODELDEPOT_CLUSTER_KEY": str(tls.client_key)}, True, "KEY is set without MODELDEPOT_CLUSTER_CERT"),
        ({"MODELDEPOT_CLUSTER_CA": str(tmp_path / "nope")}, True, "No such file"),
        ({"MODELDEPOT_CLUSTER_CA": str(tmp_path / "not-pem")}, True, "is not a PEM file"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=said):
            cluster_tls(env, secure=secure)


def test_nodes_on_an_etcd_with_authentication_register_again_after_it_restarts(tmp_path: Path) -> None:
    """A second review: etcd restarted forgets its tokens; the client made again in place of one whose token
    was refused closed the old one under the writer's call, whose cancellation ended the writer's task without
    a word: the node stayed "connected, not registered" for good, in about half the runs."""
    from modeldepot.discovery.base import NodeRecord
    from modeldepot.discovery.etcd.discovery import EtcdDiscovery

    etcd = EtcdServer(tmp_path / "etcd").start()
    try:
        enable_etcd_auth(etcd, "pw")

        async def restarts() -> None:
            where = [("127.0.0.1", etcd.client_port)]
            a = EtcdDiscovery(where, ttl=3, credentials=("root", "pw"))
            b = EtcdDiscovery(where, ttl=3, credentials=("root", "pw"))
            await a.start()
            await b.start()
            try:
                await a.register(NodeRecord("a" * 32, "http://127.0.0.1:9", "0.2.0", time.time()))
                for restart in range(4):
                    if restart:
                        etcd.kill()
                        await asyncio.sleep(0.5)
                        await asyncio.to_thread(etcd.start)
                    deadline = time.monotonic() + 20
                    while not (a.status().registered and [n.node_id for n in b.peers()] == ["a" * 32]):
                        assert time.monotonic() < deadline, f"after restart {restart}: {a.status()}"
                        await asyncio.sleep(0.2)
            finally:
                await a.close()
                await b.close()

        asyncio.run(restarts())
    finally:
        etcd.kill()


def test_a_node_that_cannot_be_reached_at_its_advertised_url_says_so(fleet: Fleet) -> None:
    """`--advertise` of an address nobody reaches: health said "ok" and the log nothing, while every peer
    failed to reach the node (a trial). The node looks at itself through that URL as it registers."""
    from modeldepot.server import fleet as node_fleet

    lost = fleet.node("lost", None, "--advertise", f"http://127.0.0.1:{closed_port()}").ready()
    # (not any detail: "not registered in its fleet yet" comes first, before the node looks at itself)
    wait_until(lambda: "check --advertise" in lost.get("/health", token=False).get("detail", ""),
               10 * node_fleet.ADVERTISED_TRIES,
               "health to say the node cannot be reached where its peers are told to")  # fmt: skip
    answer = lost.get("/health", token=False)
    assert answer["status"] == "degraded" and "check --advertise" in answer["detail"], answer
    assert_documented("/health", answer)
    assert "could not reach itself at http://127.0.0.1:" in lost.log_text()
    found = fleet.node("found").ready()  # (its own URL, the default: it reaches itself)
    time.sleep(node_fleet.ADVERTISED_PAUSE + 1)
    assert found.get("/health", token=False)["status"] == "ok" and "could not reach" not in found.log_text()


def test_a_node_that_answers_at_its_advertised_url_later_is_healthy_then(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The look at the advertised URL was made three times as the node registered, never again: a URL that
    answers a little later (a Service routes to a pod once it is ready) left health degraded for the node's
    whole life (a review). It is looked at again until it answers, and health is then ok."""
    from aiohttp import web

    from modeldepot.discovery.base import NodeRecord
    from modeldepot.server import fleet as node_fleet
    from modeldepot.transfer.chain import NODE_API

    caplog.set_level(logging.INFO, "modeldepot.server")
    monkeypatch.setattr(node_fleet, "ADVERTISED_PAUSE", 0.05)
    monkeypatch.setattr(node_fleet, "ADVERTISED_RECHECK", 0.2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = node_fleet.NodeFleet.__new__(node_fleet.NodeFleet)
    node.cluster, node.unreachable = "etcd://test", None
    node.record = NodeRecord("me", url, "0", 0.0)

    async def main() -> None:
        check = asyncio.create_task(node._check_advertised(url))
        while node.unreachable is None:  # three failures: said
            await asyncio.sleep(0.05)
        assert "check --advertise" in node.unreachable

        async def health(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "node_id": "me"})

        app = web.Application()  # now something answers there: this node
        app.router.add_get(f"{NODE_API}/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await asyncio.wait_for(check, 10)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert node.unreachable is None and any(f"answers at {url} now" in r.getMessage() for r in caplog.records)


def test_a_node_without_a_token_names_only_what_it_serves_its_peers(fleet: Fleet, tmp_path: Path) -> None:
    """A node without a token serves no private repo's blob to a peer, yet named them all in etcd: every
    pull of that content asked it first, and got a 404 a chunk at a time (a review)."""
    secret, shared, public = weights(5, 2), weights(6, 2), b'{"model_type": "bert"}'
    with Depot(tmp_path / "open", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "p", {"w.safetensors": secret, "s.safetensors": shared}),
                         "acme/secret", private=True)  # fmt: skip
        depot.import_dir(
            write_model_dir(tmp_path / "q", {"config.json": public, "s.safetensors": shared}), "acme/open"
        )
    node = fleet.node("open", None).ready()
    named = {sha(shared), sha(public)}  # (the secret weights: not)
    wait_until(lambda: set(fleet.holdings(node.id)) == named, 15, "the node's holdings in etcd", interval=0.1)
    with Depot(tmp_path / "open") as depot:
        depot.remove("acme/open")  # the shared weights are a private repo's alone now
    wait_until(
        lambda: set(fleet.holdings(node.id)) == set(), 15, "the shared weights withdrawn", interval=0.1
    )


def test_a_private_repo_comes_through_the_fleet_with_the_node_token_alone(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, big = "acme/secret-model", weights(3, 8)
    files = {
        ".gitattributes": GITATTRIBUTES,
        "config.json": b'{"model_type": "bert"}',
        "model.safetensors": big,
    }
    with Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as a_depot:
        a_depot.import_dir(write_model_dir(tmp_path / "src", files), repo, private=True)
    with Depot(tmp_path / "c", chunk_size=SMALL_CHUNK) as c_depot:  # the same weights, under a public repo
        c_depot.import_dir(write_model_dir(tmp_path / "src-c", {"w.safetensors": big}), "other/base")
    a, c = fleet.node("a", TOKEN), fleet.node("c", TOKEN)
    a.ready(), c.ready()
    # (health needs no token on a node that has one; registered within the etcd call's deadline, which a
    # loaded machine may take)
    wait_until(lambda: a.health()["registered"], 20, "a to be registered")
    wait_until(lambda: len(fleet.holdings(a.id)) == 3 and len(fleet.holdings(c.id)) == 1, 15,
               "both nodes' holdings in etcd", interval=0.1)  # fmt: skip

    pulled = modeldepot(
        "pull",
        repo,
        "--cluster",
        fleet.etcd.cluster,
        "--home",
        str(tmp_path / "b"),
        "--json",
        env=base_env(MODELDEPOT_TOKEN=TOKEN),
    )  # the Hub (HF_ENDPOINT) has nothing listening
    assert set(json.loads(pulled.stdout)["sources"]) == {a.url, c.url}, "the weights' holders came from etcd"
    with Depot(tmp_path / "b") as b_depot:
        for path, data in files.items():
            assert bytes(b_depot.get_file(repo, path)) == data
        assert b_depot.repo_info(repo).private  # what was private stays behind the token here too

    refused = modeldepot("pull", repo, "--cluster", fleet.etcd.cluster, "--home", str(tmp_path / "d"),
                         env=base_env(), check=False)  # fmt: skip
    assert refused.returncode == 1 and "MODELDEPOT_TOKEN" in refused.stderr
    with Depot(tmp_path / "d") as d_depot:
        assert d_depot.list_repos() == []
    everything = b"\n".join(key + b" " + value for key, value in fleet.dump().items())
    for name in (
        b"acme",
        b"secret-model",
        b"model.safetensors",
        b"config.json",
        b"other/base",
        b"w.safetensors",
    ):
        assert name not in everything, f"{name!r} reached etcd"

    # etcd goes down: a pulling process pulls from its last view of the fleet...
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MODELDEPOT_TOKEN", TOKEN)
    with Depot(tmp_path / "e", chunk_size=SMALL_CHUNK, cluster=fleet.etcd.cluster) as e_depot:
        assert e_depot.fleet is not None and {r.node_id for r in e_depot.peers()} == {a.id, c.id}
        fleet.etcd.kill()
        assert set(e_depot.pull(repo).sources) == {a.url, c.url}
        assert bytes(e_depot.get_file(repo, "model.safetensors")) == big
    # ...and one that starts during the outage finds no fleet, and pulls from the Hub.
    with Depot(tmp_path / "hub", chunk_size=SMALL_CHUNK) as hub_depot:
        hub_depot.import_dir(write_model_dir(tmp_path / "src-hub", {"config.json": b"{}", "w.bin": big[:1000]}),
                             "acme/public")  # fmt: skip
        hub = LiveNode(hub_depot)
        try:
            began = time.monotonic()
            done = modeldepot("pull", "acme/public", "--cluster", fleet.etcd.cluster, "--home", str(tmp_path / "f"),
                              "--json", env=base_env(HF_ENDPOINT=hub.url))  # fmt: skip
            assert json.loads(done.stdout)["sources"] == [hub.url]
            assert time.monotonic() - began < 30
        finally:
            hub.stop()


class GatedHub:
    """A Hub look-alike: a real node behind a proxy that holds back the chunks of one file from byte
    ``hold_from`` on, until :meth:`release`."""

    def __init__(self, upstream: str, path: str, hold_from: int) -> None:
        self.upstream, self.path, self.hold_from = upstream, path, hold_from
        self.held = 0
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._gate: asyncio.Event | None = None

        async def on_start() -> None:
            self._gate = asyncio.Event()
            self._http = ClientSession(auto_decompress=False)

        async def on_stop() -> None:
            assert self._gate is not None
            self._gate.set()
            await self._http.close()

        self.server = BackgroundServer(web.AppRunner(app), "gated-hub", on_start=on_start, on_stop=on_stop)
        self.url = self.server.url

    async def _handle(self, request: web.Request) -> web.Response:
        assert self._gate is not None
        start = int(request.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0] or 0)
        if "/resolve/" in request.path and request.path.endswith("/" + self.path) and start >= self.hold_from:
            self.held += 1
            await self._gate.wait()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("range", "accept-encoding")}
        async with self._http.request(request.method, self.upstream + request.path_qs, headers=headers,
                                      allow_redirects=False) as answer:  # fmt: skip
            body = await answer.read()
            kept = {k: v for k, v in answer.headers.items()
                    if k.lower() not in ("transfer-encoding", "connection", "content-encoding", "content-length")}  # fmt: skip
            return web.Response(status=answer.status, body=body, headers=kept)

    def release(self) -> None:
        gate = self._gate
        assert gate is not None
        self.server.loop.call_soon_threadsafe(gate.set)

    def stop(self) -> None:
        self.server.stop()


def test_holdings_follow_cli_imports_pulls_gc_and_rm_on_a_served_store(fleet: Fleet, tmp_path: Path) -> None:
    prefix = "/fleets/test"
    a = fleet.node("a", None, "--cluster-prefix", prefix).ready()
    home = ["--home", str(a.home)]

    def held() -> dict[str, dict[str, Any]]:
        return fleet.holdings(a.id, prefix)

    one = {"model.safetensors": weights(4, 3), "config.json": b'{"one": 1}'}
    modeldepot(
        "import", str(write_model_dir(tmp_path / "one", one)), "--repo", "acme/one", *home, env=base_env()
    )
    ones = {sha(data) for data in one.values()}
    wait_until(lambda: set(held()) == ones, 10, "the import's contents in etcd", interval=0.1)
    assert all(h["complete"] and h["chunks_done"] == h["chunks"] for h in held().values())

    big = weights(5, 12)
    two = {".gitattributes": GITATTRIBUTES, "config.json": b'{"two": 2}', "model.safetensors": big}
    with Depot(tmp_path / "hub-store", chunk_size=SMALL_CHUNK) as hub_depot:
        hub_depot.import_dir(write_model_dir(tmp_path / "two", two), "acme/two")
        node = LiveNode(hub_depot)
        hub = GatedHub(node.url, "model.safetensors", 4 * SMALL_CHUNK)  # chunks 0-3 pass, the rest wait
        try:
            env = base_env(HF_ENDPOINT=hub.url)
            argv = [sys.executable, "-m", "modeldepot", "pull", "acme/two", *home]
            pulling = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:  # the CLI's download is the node's: it advertises the verified chunks
                wait_until(lambda: held().get(sha(big), {}).get("chunks_done") == 4, 20,
                           "the download's 4 verified chunks in etcd", pulling, interval=0.1)  # fmt: skip
            finally:
                pulling.kill()
                pulling.communicate()
            assert held()[sha(big)] == {"size": len(big), "complete": False, "chunks_done": 4, "chunks": 12}

            modeldepot("gc", "--partials", *home, env=base_env())  # drops the interrupted download
            wait_until(lambda: sha(big) not in held(), 10, "the dropped download to leave etcd", interval=0.1)

            hub.release()
            modeldepot("pull", "acme/two", *home, env=env)
            twos = {sha(data) for data in two.values()}
            wait_until(lambda: set(held()) == ones | twos, 10, "the pulled contents in etcd", interval=0.1)
            assert held()[sha(big)] == {"size": len(big), "complete": True, "chunks_done": 12, "chunks": 12}
        finally:
            hub.stop()
            node.stop()

    modeldepot("rm", "acme/one", "--yes", *home, env=base_env())
    wait_until(lambda: set(held()) == twos, 10, "the removed repo's contents to leave etcd", interval=0.1)
    assert (a.row(a.id) or {}).get("blobs") == 3

    with Depot(a.home) as a_depot:  # rot: verify quarantines the blob, and the node stops offering it
        flip_byte(a_depot.store.blobs.path(sha(big)), 5)
    assert modeldepot("verify", *home, env=base_env(), check=False).returncode == 1
    wait_until(
        lambda: set(held()) == twos - {sha(big)}, 10, "the quarantined blob to leave etcd", interval=0.1
    )
    assert not [k for k in fleet.dump() if k.startswith(b"/modeldepot/")], "everything is under the prefix"
    # Its own deletes (gc, rm, the quarantine) are no lost keys: no "gone ... registering again" (they were,
    # when the watch showed one before the transaction's answer, and health flapped).
    assert "record is gone" not in a.log_text() and "registered again" not in a.log_text()


def test_a_node_on_every_address_is_advertised_by_its_machines_name_not_localhost(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`serve --host 0.0.0.0 --cluster ...` registered http://localhost:PORT where the machine's full name is
    localhost (as on many: getfqdn), and peers on other machines fetched from their own localhost (a
    README walk). And a name that leads to this machine alone is said."""

    from modeldepot.server import fleet as node_fleet

    monkeypatch.setattr(socket, "getfqdn", lambda *_: "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: "worker-a")
    monkeypatch.setattr(node_fleet, "loopback_only", lambda name: name != "worker-a")
    assert node_fleet.advertised_url("0.0.0.0", 8980) == "http://worker-a:8980"
    assert node_fleet.advertised_url("10.1.2.3", 8980) == "http://10.1.2.3:8980"
    assert "give --advertise" not in caplog.text
    monkeypatch.setattr(node_fleet, "loopback_only", lambda name: True)
    node_fleet.advertised_url("::", 8980)
    assert "peers on other machines cannot reach it at http://worker-a:8980; give --advertise" in caplog.text


def test_the_registrys_state_is_logged_as_it_changes_and_a_blip_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's log tells of an outage as it happens (it was told at the publisher's looks, which a publish
    or a store read held up: an outage went unsaid), and not of a blip shorter than CONNECTION_SETTLES (a member
    failing over: a warning and "answers again" 30 ms later, a review)."""
    from modeldepot.discovery.mem import mem_registry
    from modeldepot.server import fleet as fleet_module

    name = f"fleet-{uuid.uuid4().hex[:12]}"
    registry = mem_registry(name)
    caplog.set_level(logging.INFO, logger="modeldepot")

    def said(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    with Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as depot:
        node = InProcessNode(depot, f"mem://{name}")
        try:
            wait_until(lambda: node.fleet.status() is not None and node.fleet.status().registered, 10,
                       "the node to register")  # fmt: skip
            registry.set_available(False)  # a blip
            time.sleep(0.1)
            registry.set_available(True)
            time.sleep(fleet_module.CONNECTION_SETTLES + 0.5)
            assert said("the registry cannot be reached") == 0
            registry.set_available(False)  # an outage
            wait_until(lambda: said("the registry cannot be reached") == 1,
                       fleet_module.CONNECTION_SETTLES + 5, "the outage to be told")  # fmt: skip
            registry.set_available(True)
            wait_until(lambda: said("the registry answers again") == 1, 5, "its end to be told")
        finally:
            node.stop()


def test_a_download_that_ended_is_told_at_once_its_progress_at_the_full_looks(
    depot: Depot, tmp_path: Path
) -> None:
    """A pull that landed a file keeps its claims until the fleet sees its node hold it: told at the next full
    look, up to a second later, that kept them half a second on average. The end of a download (its blob in
    the index, the partials' ended-mark set) is seen by the quick looks in between; a download's progress
    waits for a full look."""
    from modeldepot.server.fleet import HoldingsReader

    data = random.Random(41).randbytes(3 * depot.chunk_size - 5)
    sha256 = write_partial(depot, data, [0])
    reader = HoldingsReader(depot.store)
    first = reader.poll()
    assert first is not None and first[sha256].chunks_done == 1 and not first[sha256].complete
    assert reader.poll(ended_only=True) is None and reader.poll() is None  # (nothing changed)
    write_partial(depot, data, [1])
    assert reader.poll(ended_only=True) is None, "progress waits for a full look"
    progressed = reader.poll()
    assert progressed is not None and progressed[sha256].chunks_done == 2
    busy = random.Random(43).randbytes(4 * depot.chunk_size)  # (a download beside it, in progress)
    busy_sha256 = write_partial(depot, busy, [0])
    assert reader.poll()[busy_sha256].chunks_done == 1  # type: ignore[index]
    write_partial(depot, busy, [1])
    depot.import_dir(write_model_dir(tmp_path / "src", {"w.safetensors": data}), "acme/w")
    partial = depot.store.partials.claim(sha256, len(data), depot.chunk_size, wait=False)
    assert partial is not None
    partial.release(completed=True)  # (as a pull lets its download go once the index has the blob)
    ended = reader.poll(ended_only=True)
    assert ended is not None and ended[sha256].complete, ended
    # (the download beside it as the last full look found it: its progress rewritten at every file that
    # completed, five times a second, a review)
    assert ended[busy_sha256].chunks_done == 1, ended
    assert reader.poll()[busy_sha256].chunks_done == 2  # type: ignore[index]
    # A download that began after the last full look, and ended before the next one: told as it ended
    # (watching the logs' names, a quick look missed a download shorter than the time between two looks)
    other = random.Random(42).randbytes(2 * depot.chunk_size)
    other_sha256 = write_partial(depot, other, [0])
    assert reader.poll(ended_only=True) is None, "a download that began waits for a full look"
    depot.import_dir(write_model_dir(tmp_path / "other", {"w.safetensors": other}), "acme/other")
    partial = depot.store.partials.claim(other_sha256, len(other), depot.chunk_size, wait=False)
    assert partial is not None
    partial.release(completed=True)
    ended = reader.poll(ended_only=True)
    assert ended is not None and ended[other_sha256].complete, ended
    assert reader.poll(ended_only=True) is None and reader.poll() is None


def test_a_node_that_leaves_releases_the_claims_it_hands_over_at_once(depot: Depot, tmp_path: Path) -> None:
    """A serve shutting down waited for each hand-over of a pull that had just ended, with its publisher
    stopped: each ran out its patience (2.5 s) for a holding nobody would publish. It cancels them: each
    releases its claims at once."""
    from modeldepot.server.fleet import NodeFleet
    from modeldepot.transfer.swarm import HANDOVER_PATIENCE, _hand_over

    async def main() -> None:
        fleet = NodeFleet(depot, f"mem://leaving-{uuid.uuid4().hex[:8]}", "/modeldepot")
        await fleet.start()
        await fleet.register("http://127.0.0.1:9")
        assert fleet.discovery is not None and fleet.view is not None
        discovery = fleet.discovery
        sha256 = hashlib.sha256(b"never published").hexdigest()
        assert await discovery.claim_chunk(sha256, SMALL_CHUNK, 0, depot.node_id) is not None
        assert fleet.view.in_background(
            lambda d: _hand_over(d, sha256, SMALL_CHUNK, frozenset({0}), depot.node_id)
        )
        await asyncio.sleep(0.1)
        assert discovery.claims(sha256, SMALL_CHUNK), "the claim stands while it is handed over"
        began = time.monotonic()
        await fleet.close()
        assert time.monotonic() - began < HANDOVER_PATIENCE / 2
        assert not fleet.view.background()

    asyncio.run(main())


def handing_over(
    etcd_server: EtcdServer, store: Path, sha256: str, then: str
) -> subprocess.CompletedProcess[str]:
    """A program that opens a Depot on ``store`` in the etcd fleet, claims chunk 0 of ``sha256``, hands the
    claim over in the background (as a pull that published does), then runs ``then``; its run."""
    cluster = f"etcd://127.0.0.1:{etcd_server.client_port}"
    program = f"""
import asyncio, os, sys, time
from modeldepot import Depot
from modeldepot.transfer.swarm import _hand_over

depot = Depot({str(store)!r}, chunk_size={SMALL_CHUNK}, cluster={cluster!r})
fleet = depot.fleet
node_id = depot.node_id
claim = lambda d: d.claim_chunk({sha256!r}, {SMALL_CHUNK}, 0, node_id)
assert asyncio.run(fleet.call(claim, None)) is not None
assert fleet.in_background(lambda d: _hand_over(d, {sha256!r}, {SMALL_CHUNK}, frozenset({{0}}), node_id))
"""
    return subprocess.run([sys.executable, "-c", program + then], capture_output=True, text=True, timeout=90)


def claims_left(etcd_server: EtcdServer, sha256: str) -> list[bytes]:
    """The keys of ``sha256``'s claims in etcd."""

    async def read() -> list[bytes]:
        async with aetcd.Client("127.0.0.1", etcd_server.client_port, timeout=5) as client:
            return [kv.key for kv in await client.get_prefix(b"/modeldepot/") if sha256.encode() in kv.key]

    return asyncio.run(read())


def test_a_program_that_never_closes_its_depot_releases_the_claims_it_hands_over_at_exit(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """A program that pulls with a Depot and ends without closing it (a script, a notebook's kernel that
    exits) left the claims its pulls handed over in the registry until its lease ran out (10 s), each a
    chunk the fleet waited on from it; the view closes at the interpreter's exit as Depot.close closes it:
    the hand-over ends and the claims go at once."""
    from modeldepot.transfer.swarm import HANDOVER_PATIENCE

    sha256 = hashlib.sha256(b"handed over, never closed").hexdigest()
    began = time.monotonic()
    # (no depot.close(): the program just ends)
    ended = handing_over(etcd_server, tmp_path / "store", sha256, 'print("handed over", flush=True)\n')
    took = time.monotonic() - began
    assert ended.returncode == 0 and "handed over" in ended.stdout, ended.stderr
    assert claims_left(etcd_server, sha256) == [], "the claims outlived the program that handed them over"
    # (its exit waited for the hand-over, which no serve ends here: cut short, the claims went before a
    # holding could show, which the hand-over is for)
    assert HANDOVER_PATIENCE <= took < 10, f"its exit took {took:.1f} s"


def test_a_forked_child_leaves_its_parents_fleet_view_alone_at_exit(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """A child forked from a program with a fleet view open (a gunicorn worker) ended by waiting 30 s at its
    exit on the loop of a thread it does not have, closing the view it inherited, then raised; the parent's
    hand-over in flight is the parent's. The child's view answers at once (with nothing: each read waited
    10 s), it exits at once, and the parent still releases its claims."""
    from modeldepot.transfer.swarm import HANDOVER_PATIENCE

    sha256 = hashlib.sha256(b"handed over, then forked").hexdigest()
    then = """
began = time.monotonic()
child = os.fork()
if child == 0:
    asked = time.monotonic()
    print(f"peers {depot.peers()} {time.monotonic() - asked:.2f}", flush=True)
    sys.exit(0)  # (a normal exit: the interpreter's atexit hooks run)
_, status = os.waitpid(child, 0)
print(f"child {os.waitstatus_to_exitcode(status)} {time.monotonic() - began:.2f}", flush=True)
"""
    ended = handing_over(etcd_server, tmp_path / "store", sha256, then)
    assert ended.returncode == 0, ended.stderr
    said = re.search(r"child (\d+) ([\d.]+)", ended.stdout)
    assert said is not None, ended.stdout
    assert int(said.group(1)) == 0 and float(said.group(2)) < HANDOVER_PATIENCE, ended.stdout
    assert "Traceback" not in ended.stderr and "Exception ignored" not in ended.stderr, ended.stderr
    # (the child's view answers at once, with nothing, and says why: gRPC opens no connection there)
    asked = re.search(r"peers \[\] ([\d.]+)", ended.stdout)
    assert asked is not None and float(asked.group(1)) < 1, ended.stdout
    assert "forked from one that had opened the fleet's view" in ended.stderr, ended.stderr
    assert claims_left(etcd_server, sha256) == [], "the parent's claims outlived it"


def test_two_closes_of_the_fleets_view_at_once_close_it_once() -> None:
    """A thread's close while another waits for the view's hand-overs (at the interpreter's exit, its own
    close and a daemon thread's) closed the loop under the first: "Event loop is closed", and 10 s more. The
    second waits for the first, and returns."""
    from modeldepot.transfer.fleet import BackgroundFleet

    fleet = BackgroundFleet.open(f"mem://closes-{uuid.uuid4().hex[:8]}", "/modeldepot")

    async def handing_over(_: Any) -> None:
        await asyncio.sleep(1.0)

    assert fleet.in_background(handing_over)
    errors: list[BaseException] = []

    def close() -> None:
        try:
            fleet.close()
        except BaseException as error:  # (what the test is about)
            errors.append(error)

    first = threading.Thread(target=close)
    began = time.monotonic()
    first.start()
    time.sleep(0.3)  # (the first waits for the hand-over)
    close()
    first.join(15)
    assert not first.is_alive() and errors == []
    assert time.monotonic() - began < 5, "the second close waited on a loop the first had closed"
    assert not fleet._thread.is_alive()
