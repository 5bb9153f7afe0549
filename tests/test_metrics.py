"""Prometheus metrics at /metrics (server/metrics.py): scraped from live nodes over real sockets and read with
prometheus_client's own parser, each figure shown to move when the node (or a pull in this process) works."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    SMALL_CHUNK,
    InProcessNode,
    LiveNode,
    closed_port,
    flip_byte,
    sample_files,
    wait_until,
    write_model_dir,
    write_partial,
)
from faultproxy import FaultProxy
from modeldepot import Depot, IntegrityError
from modeldepot._version import node_version
from modeldepot.counters import SOURCE_KINDS

API = "/api/depot/v1"
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = "acme/tiny"
FILES = sample_files(0)
BIG = "model.safetensors"
BIG_SHA = hashlib.sha256(FILES[BIG]).hexdigest()
UPSTREAM_REPO = "acme/pulled"
UPSTREAM_FILES = {
    "config.json": b'{"model_type": "bert"}',
    "tokenizer.json": b'{"vocab": {"a": 0}}',
    BIG: bytes(range(256)) * 1100 + b"tail",  # 281604 bytes: five 64 KiB chunks, the last one short
}


class Reply:
    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        self.status, self.content_type, self.body = status, content_type, body


def get(node: LiveNode, target: str, headers: dict[str, str] | None = None) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    try:
        connection.request("GET", target, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.getheader("Content-Type", ""), response.read())
    finally:
        connection.close()


class Scrape:
    """One scrape of /metrics, parsed by prometheus_client's parser: each sample by name and labels."""

    def __init__(self, reply: Reply) -> None:
        assert reply.status == 200, reply.body[:300]
        assert reply.content_type.startswith("text/plain"), reply.content_type
        self.size = len(reply.body)
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(reply.body.decode()):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name, frozenset(sample.labels.items())] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """A sample that must be there."""
        key = (name, frozenset(labels.items()))
        assert key in self.samples, f"no sample {name}{labels} in the scrape"
        return self.samples[key]

    def count(self, name: str, **labels: str) -> float:
        """A counter's sample, 0 while no event made it appear (the HTTP answers by route and status)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def labels_of(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for sample, labels in self.samples if sample == name}

    def pulled(self) -> dict[str, float]:
        """Bytes pulls fetched by kind of source, and ``local``: those they found in place."""
        fetched = {
            s: self.value("modeldepot_pull_bytes_total", source=s) for s in SOURCE_KINDS if s != "local"
        }
        return {**fetched, "local": self.value("modeldepot_pull_reused_bytes_total")}


def scrape(node: LiveNode, headers: dict[str, str] | None = None) -> Scrape:
    return Scrape(get(node, "/metrics", headers))


def requests_of(s: Scrape, route: str, status: int) -> float:
    return s.count("modeldepot_http_requests_total", route=route, status=str(status))


SENT = "modeldepot_http_sent_bytes_total"


def sent_reaches(node: LiveNode, expected: float, headers: dict[str, str] | None = None) -> Scrape:
    """Scrape until the sent-bytes counter is ``expected``, and fail if it ever passes it. A body is counted
    once it was handed to the connection, which the client may see a moment before: a scrape may come too
    early, and then its own body counts too (once sent), before the next scrape."""
    deadline = time.monotonic() + 10
    while True:
        s = scrape(node, headers)
        sent = s.value(SENT)
        assert sent <= expected, f"{sent - expected} bytes more than the bodies sent"
        if sent == expected:
            return s
        assert time.monotonic() < deadline, f"{expected - sent} bytes sent were never counted"
        expected += s.size


@pytest.fixture
def node(depot: Depot, live_node: LiveNode, tmp_path: Path) -> LiveNode:
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    return live_node


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LiveNode]:
    """A node holding UPSTREAM_REPO, for pulls (as a configured server, or as the Hub)."""
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as held:
        held.import_dir(write_model_dir(tmp_path / "upstream-src", UPSTREAM_FILES), UPSTREAM_REPO)
        served = LiveNode(held)
        yield served
        served.stop()


def online(monkeypatch: pytest.MonkeyPatch, hub: str) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub)


def nowhere() -> str:
    return f"http://127.0.0.1:{closed_port()}"  # nothing listens there: a Hub nobody reaches


def test_every_family_is_there_with_its_type(node: LiveNode) -> None:
    s = scrape(node)
    expected = {
        "modeldepot_store_bytes": "gauge", "modeldepot_store_budget_bytes": "gauge", "modeldepot_repos": "gauge",
        "modeldepot_http_requests": "counter", "modeldepot_http_sent_bytes": "counter",
        "modeldepot_pull_bytes": "counter", "modeldepot_pull_reused_bytes": "counter",
        "modeldepot_chunks_rejected": "counter",
        "modeldepot_evictions": "counter", "modeldepot_preload_resident_bytes": "gauge",
        "modeldepot_engine_cache_hits": "counter", "modeldepot_peers": "gauge",
        "modeldepot_store_partial_bytes": "gauge", "modeldepot_build": "gauge",
        "process_resident_memory_bytes": "gauge",
    }  # fmt: skip
    assert {name: s.types.get(name) for name in expected} == expected
    assert s.value("modeldepot_repos") == 1
    assert s.value("modeldepot_store_budget_bytes") == 0  # no budget
    assert s.value("modeldepot_peers") == 0  # no cluster
    assert s.labels_of("modeldepot_pull_bytes_total", "source") == set(SOURCE_KINDS) - {"local"}
    # A fleet's mix of builds can be graphed, and the disk partial downloads take beside the budget alerted on
    # (interrupted pulls took twice a budget's disk while every figure said 0: an explorer's trial)
    assert s.value("modeldepot_build", version=node_version()) == 1
    assert s.value("modeldepot_store_partial_bytes") == 0
    kept = node.depot.store.layout.partials / "kept-for-a-resume.part"  # (as an interrupted pull leaves one)
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(b"\0" * 5000)
    assert scrape(node).value("modeldepot_store_partial_bytes") == 5000
    # And what a failing disk's corrupt copies take until gc, and the room left (a repaired node's disk held
    # twice what every figure said: an explorer's trial)
    assert (
        s.types.get("modeldepot_store_quarantine_bytes") == "gauge"
        and s.value("modeldepot_store_quarantine_bytes") == 0
    )
    free = s.value("modeldepot_store_disk_free_bytes")
    assert free is not None and abs(free - shutil.disk_usage(node.depot.home).free) < 1 << 30
    [big] = [f for f in node.depot.list_files(REPO) if f.sha256 == BIG_SHA]
    flip_byte(node.depot.store.blobs.path(BIG_SHA), 10)
    assert not node.depot.verify().ok
    assert scrape(node).value("modeldepot_store_quarantine_bytes") == big.size
    node.depot.gc()
    assert scrape(node).value("modeldepot_store_quarantine_bytes") == 0
    openmetrics = get(node, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.status == 200 and openmetrics.content_type.startswith("application/openmetrics-text")
    assert openmetrics.body.endswith(b"# EOF\n")


def test_answers_are_counted_by_route_pattern_and_status(node: LiveNode, depot: Depot) -> None:
    blob = f"{API}/blobs/{{sha256}}"
    resolve = "/{org}/{name}/resolve/{rev}/{path}"
    before = scrape(node)
    assert get(node, f"{API}/blobs/{BIG_SHA}").status == 200
    nowhere_shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3)]
    for sha in nowhere_shas:
        assert get(node, f"{API}/blobs/{sha}").status == 404
    assert get(node, f"/{REPO}/resolve/main/config.json").status == 200
    assert get(node, f"/{REPO}/resolve/main/nothing-here.bin").status == 404
    for path in ("/nope", "/also-nope", "/favicon.ico"):
        assert get(node, path).status == 404
    after = scrape(node)

    def moved(route: str, status: int) -> float:
        return requests_of(after, route, status) - requests_of(before, route, status)

    assert moved(blob, 200) == 1
    assert moved(blob, 404) == 3  # three digests, one series: the pattern, never the path
    assert moved(resolve, 200) == moved(resolve, 404) == 1
    assert moved("unmatched", 404) == 3
    assert moved("/metrics", 200) == 1  # the first scrape, counted once it was answered
    routes = after.labels_of("modeldepot_http_requests_total", "route")
    patterns = {resource.canonical for resource in node.runner.app.router.resources()}
    assert routes <= patterns | {"unmatched"}, routes - patterns
    assert not any(sha in route for route in routes for sha in [BIG_SHA, *nowhere_shas])


def call(node: LiveNode, method: str, target: str, headers: dict[str, str] | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    try:
        connection.request(method, target, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_a_method_a_route_does_not_take_is_counted_under_that_route(node: LiveNode) -> None:
    """A 405 and a CORS preflight were counted under the Hub's write catch-all (`/api/{tail}`) on the node's
    own routes, and under `unmatched` elsewhere (`POST /metrics`, `DELETE` of a resolve URL)."""
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "DELETE"}
    pin, resolve = f"{API}/repos/{{org}}/{{name}}/pin", "/{org}/{name}/resolve/{rev}/{path}"
    asked = [
        ("PUT", f"{API}/pulls", {}, f"{API}/pulls", 405),
        ("OPTIONS", f"{API}/pulls", preflight, f"{API}/pulls", 204),
        ("OPTIONS", f"{API}/repos/{REPO}/pin", preflight, pin, 204),
        ("GET", f"{API}/repos/{REPO}/pin", {}, pin, 405),
        ("POST", "/metrics", {}, "/metrics", 405),
        ("OPTIONS", "/metrics", preflight, "/metrics", 204),
        ("DELETE", f"/{REPO}/resolve/main/config.json", {}, resolve, 405),
        ("OPTIONS", f"/{REPO}/resolve/main/config.json", preflight, resolve, 204),
        ("POST", "/api/repos/create", {}, "/api/{tail}", 405),  # a Hub write: the catch-all's own
        ("DELETE", "/nope", {}, "unmatched", 404),
        ("OPTIONS", "/nope", preflight, "unmatched", 204),
    ]
    for method, target, headers, route, status in asked:
        before = scrape(node)
        assert call(node, method, target, headers) == status, (method, target)
        after = scrape(node)
        moved = {
            labels: value - before.samples.get((name, labels), 0.0)
            for (name, labels), value in after.samples.items()
            if name == "modeldepot_http_requests_total" and dict(labels)["route"] != "/metrics"
            and value != before.samples.get((name, labels), 0.0)
        }  # fmt: skip
        what = (method, target, moved)
        if route == "/metrics":  # (the scrape itself moves /metrics 200)
            assert requests_of(after, route, status) - requests_of(before, route, status) == 1, what
        else:
            assert moved == {frozenset({("route", route), ("status", str(status))}): 1.0}, what


def test_sent_bytes_count_every_body_byte_once_and_no_header(node: LiveNode, depot: Depot) -> None:
    """Bodies sent by sendfile (a whole blob, a range of one), through the writer (JSON), and the scrapes'
    own: the counter moves by exactly their sizes."""
    first = scrape(node)
    expected = first.value(SENT) + first.size
    whole = get(node, f"{API}/blobs/{BIG_SHA}")
    assert whole.body == FILES[BIG]
    ranged = get(node, f"/{REPO}/resolve/{depot.resolve(REPO)}/{BIG}", {"Range": "bytes=100-70099"})
    assert ranged.status == 206 and len(ranged.body) == 70_000
    info = get(node, f"{API}/info")
    sent_reaches(node, expected + len(FILES[BIG]) + 70_000 + len(info.body))


def test_answers_cut_short_are_counted(node: LiveNode, depot: Depot) -> None:
    """A blob found corrupt while it is sent is cut short after a 200's headers: http_requests counts the 200;
    answers_cut says the body never completed (it was no success). A client that leaves is not counted."""
    blob = f"{API}/blobs/{{sha256}}"
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    connection.request("GET", f"{API}/blobs/{BIG_SHA}")
    connection.getresponse().read(10)  # a client that leaves after 10 bytes
    connection.close()
    assert get(node, f"{API}/blobs/{BIG_SHA}").body == FILES[BIG]
    flip_byte(depot.store.blobs.path(BIG_SHA), len(FILES[BIG]) - 1)  # its last chunk: after the headers
    with pytest.raises(http.client.IncompleteRead):
        get(node, f"{API}/blobs/{BIG_SHA}")
    after = scrape(node)
    assert after.value("modeldepot_http_answers_cut_total", route=blob) == 1
    assert after.labels_of("modeldepot_http_answers_cut_total", "route") == {blob}


def test_store_gauges_follow_imports_and_removals(live_node: LiveNode, depot: Depot, tmp_path: Path) -> None:
    empty = scrape(live_node)
    assert (empty.value("modeldepot_repos"), empty.value("modeldepot_store_bytes")) == (0, 0)
    depot.import_dir(write_model_dir(tmp_path / "a", FILES), REPO)
    other = {**FILES, "config.json": b'{"other": true}'}  # shares every blob but one
    depot.import_dir(write_model_dir(tmp_path / "b", other), "acme/other")
    full = scrape(live_node)
    distinct = {hashlib.sha256(data).hexdigest(): len(data) for data in [*FILES.values(), *other.values()]}
    assert full.value("modeldepot_repos") == 2
    assert full.value("modeldepot_store_bytes") == sum(distinct.values())  # each content once
    assert full.value("modeldepot_store_blobs") == len(distinct)
    depot.remove("acme/other")
    fewer = scrape(live_node)
    assert fewer.value("modeldepot_repos") == 1
    assert fewer.value("modeldepot_store_bytes") == sum(len(data) for data in set(FILES.values()))
    assert fewer.value("modeldepot_store_quarantined_blobs") == 0
    depot.store.quarantine(depot.file_info(REPO, "config.json").sha256)  # (found corrupt: a quarantine was
    assert (
        scrape(live_node).value("modeldepot_store_quarantined_blobs") == 1
    )  # seen only as blobs going down)


def test_the_budget_and_its_evictions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELDEPOT_MAX_SIZE", "700KiB")
    with Depot(tmp_path / "budgeted", chunk_size=SMALL_CHUNK) as budgeted:
        served = LiveNode(budgeted)
        try:
            before = scrape(served)
            assert before.value("modeldepot_store_budget_bytes") == 700 * 1024
            assert before.value("modeldepot_evictions_total") == 0
            for seed in range(3):  # 300 kB of weights each: the third import evicts the first repo
                budgeted.import_dir(
                    write_model_dir(tmp_path / f"m{seed}", sample_files(seed)), f"acme/m{seed}"
                )
                time.sleep(0.01)
            status = budgeted.budget_status()
            assert status.evictions >= 1
            after = scrape(served)
            assert after.value("modeldepot_evictions_total") == status.evictions
            assert after.value("modeldepot_evicted_bytes_total") == status.evicted_bytes > 0
            assert after.value("modeldepot_store_bytes") == status.used_bytes <= 700 * 1024
            assert after.value("modeldepot_store_budget_used_bytes") == status.used_bytes
            assert after.value("modeldepot_repos") == len(budgeted.list_repos()) < 3
            # A file imported by a hard link takes no room of the store's, and the budget does not count it:
            # the store's bytes over the budget read as "over" on a store within it (an explorer's alert)
            import modeldepot.store.budget

            monkeypatch.setattr(
                modeldepot.store.budget, "SHARED_FRESH", 0.0
            )  # (the look at which blobs files outside the store share: a scrape looks again at once)
            linked = write_model_dir(tmp_path / "linked", {"big.gguf": os.urandom(900 * 1024)})
            budgeted.import_dir(linked, "acme/linked", link=True)
            status = budgeted.budget_status()
            last = scrape(served)
            assert last.value("modeldepot_store_budget_used_bytes") == status.used_bytes <= 700 * 1024
            assert last.value("modeldepot_store_bytes") > 700 * 1024
        finally:
            served.stop()


def test_pull_bytes_by_source_node_hub_and_local(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pulls in this process, from a configured node, from the Hub, and of what the store already holds:
    each moves its source's counter by the bytes the pull's result gives it."""
    online(monkeypatch, nowhere())
    with Depot(tmp_path / "via-node", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as via_node:
        served = LiveNode(via_node)
        try:
            start = scrape(served).pulled()
            result = via_node.pull(UPSTREAM_REPO)
            assert result.bytes_by_source == {"node": sum(map(len, UPSTREAM_FILES.values()))}
            after_node = scrape(served).pulled()
            assert {k: after_node[k] - start[k] for k in SOURCE_KINDS} == {
                "local": 0, "node": result.bytes_by_source["node"], "peer": 0, "hub": 0,
            }  # fmt: skip
            again = via_node.pull(UPSTREAM_REPO)  # held already: every byte local
            after_local = scrape(served).pulled()
            assert after_local["local"] - after_node["local"] == again.bytes_by_source["local"] > 0
            assert after_local["node"] == after_node["node"]

            monkeypatch.setenv("HF_ENDPOINT", upstream.url)  # the upstream node plays the Hub
            with Depot(tmp_path / "via-hub", chunk_size=SMALL_CHUNK) as via_hub:
                hub = via_hub.pull(UPSTREAM_REPO)
            after_hub = scrape(served).pulled()  # counters of the process, whichever depot pulled
            assert after_hub["hub"] - after_local["hub"] == hub.bytes_by_source["hub"] > 0
        finally:
            served.stop()


def test_chunks_and_files_that_fail_their_check_on_receipt_are_counted(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = FaultProxy(upstream.url)  # flips a byte of the first answer for the big file
    try:
        online(monkeypatch, nowhere())
        with Depot(tmp_path / "local", chunk_size=SMALL_CHUNK, servers=[proxy.url]) as local:
            served = LiveNode(local)
            try:
                before = scrape(served)
                plan = proxy.set("flip", times=1, path_suffix=BIG)
                local.pull(UPSTREAM_REPO)  # the node's BLAKE3 catches the chunk; it comes again, good
                assert plan.injected == 1 and bytes(local.get_file(UPSTREAM_REPO, BIG)) == UPSTREAM_FILES[BIG]
                middle = scrape(served)
                rejected = "modeldepot_chunks_rejected_total"
                assert middle.value(rejected) - before.value(rejected) == 1
                assert middle.value("modeldepot_files_rejected_total") == before.value(
                    "modeldepot_files_rejected_total"
                )
            finally:
                served.stop()
        monkeypatch.setenv("HF_ENDPOINT", proxy.url)  # as the Hub: no chunk digests, the SHA-256 catches it
        with Depot(tmp_path / "from-hub", chunk_size=SMALL_CHUNK) as from_hub:
            served = LiveNode(from_hub)
            try:
                proxy.set("flip", times=1, path_suffix=BIG)
                with pytest.raises(IntegrityError):
                    from_hub.pull(UPSTREAM_REPO)
                after = scrape(served)
                assert (
                    after.value("modeldepot_files_rejected_total")
                    - middle.value("modeldepot_files_rejected_total")
                    == 1
                )
                assert after.value(rejected) == middle.value(rejected)
            finally:
                served.stop()
    finally:
        proxy.stop()


def test_peers_and_peer_bytes_in_a_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = f"mem://metrics-{uuid.uuid4().hex[:12]}"
    with (
        Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as a_depot,
        Depot(tmp_path / "c", chunk_size=SMALL_CHUNK) as c_depot,
    ):
        a_depot.import_dir(write_model_dir(tmp_path / "src", UPSTREAM_FILES), UPSTREAM_REPO)
        a, c = InProcessNode(a_depot, cluster), InProcessNode(c_depot, cluster)
        try:

            def peers_of(fleet_node: InProcessNode) -> Callable[[], bool]:
                return lambda: Scrape(get_url(fleet_node.url, "/metrics")).value("modeldepot_peers") == 2

            wait_until(peers_of(a), 10, "node a to see both nodes")
            wait_until(peers_of(c), 10, "node c to see both nodes")
            assert Scrape(get_url(a.url, "/metrics")).value("modeldepot_cluster_connected") == 1
            online(monkeypatch, nowhere())
            before = Scrape(get_url(a.url, "/metrics")).pulled()
            with Depot(tmp_path / "b", chunk_size=SMALL_CHUNK, cluster=cluster) as b:
                wait_until(lambda: len(b.peers()) == 2, 10, "the puller to see the fleet")
                result = b.pull(UPSTREAM_REPO)
            after = Scrape(get_url(a.url, "/metrics")).pulled()
            assert result.bytes_by_source == {"peer": sum(map(len, UPSTREAM_FILES.values()))}
            assert after["peer"] - before["peer"] == result.bytes_by_source["peer"]
        finally:
            c.stop()
            a.stop()


def get_url(url: str, target: str, headers: dict[str, str] | None = None) -> Reply:
    host, _, port = url.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("GET", target, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.getheader("Content-Type", ""), response.read())
    finally:
        connection.close()


def test_the_ram_tier_and_the_engine_cache(node: LiveNode, depot: Depot) -> None:
    before = scrape(node)
    assert before.value("modeldepot_preload_resident_bytes") == 0
    depot.preloader.preload(REPO)
    preloaded = scrape(node)
    assert preloaded.value("modeldepot_preload_resident_bytes") > 0

    def engine(path: Path) -> str:
        return f"loaded {path.name}"

    assert depot.load(REPO, engine=engine) == depot.load(REPO, engine=engine)  # a miss, then a hit
    loaded = scrape(node)
    hits, misses = "modeldepot_engine_cache_hits_total", "modeldepot_engine_cache_misses_total"
    assert loaded.value(hits) - before.value(hits) == 1
    assert loaded.value(misses) - before.value(misses) == 1


def test_a_node_with_a_token_wants_it_for_metrics(depot: Depot, tmp_path: Path) -> None:
    depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
    guarded = LiveNode(depot, token=TOKEN)
    try:
        refused = get(guarded, "/metrics")
        other = get(guarded, f"{API}/info")  # any other protected route
        assert refused.status == other.status == 401
        assert json.loads(refused.body) == json.loads(other.body)
        assert b"modeldepot" not in refused.body
        wrong = get(guarded, "/metrics", {"Authorization": "Bearer nope"})
        assert wrong.status == 401
        assert get(guarded, f"{API}/health").status == 200  # health alone needs no token
        s = scrape(guarded, AUTH)
        assert s.value("modeldepot_repos") == 1
        assert requests_of(s, "/metrics", 401) == 2  # the refusals are counted too
        # Partials are served to the token alone, chunk by chunk through the writer (no sendfile): counted.
        in_progress = write_partial(depot, bytes(range(251)) * 700, [0])
        before = scrape(guarded, AUTH)
        piece = get(guarded, f"{API}/blobs/{in_progress}", {**AUTH, "Range": "bytes=0-999"})
        assert piece.status == 206 and len(piece.body) == 1000
        sent_reaches(guarded, before.value(SENT) + before.size + 1000, AUTH)
    finally:
        guarded.stop()


WAIT = "modeldepot_http_response_wait_seconds"


def waits_of(s: Scrape, route: str) -> dict[str, float]:
    """The answer-wait histogram of one route: its cumulative buckets by upper bound, its count and sum."""
    buckets = {dict(labels)["le"]: value for (name, labels), value in s.samples.items()
               if name == f"{WAIT}_bucket" and dict(labels)["route"] == route}  # fmt: skip
    return {
        **buckets,
        "count": s.count(f"{WAIT}_count", route=route),
        "sum": s.count(f"{WAIT}_sum", route=route),
    }


def test_the_wait_for_an_answer_is_a_histogram_by_route_without_the_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics said how many answers and bytes, never how long a client waited: an upstream that took
    seconds to answer a mirror was seen nowhere. The wait to an answer's headers is a histogram by route; a
    body's transfer is not in it (a file's size over the wire is no latency of the node's)."""
    from mirrornodes import BIG as MIRRORED_BIG
    from mirrornodes import FILES as MIRRORED
    from mirrornodes import REPO as MIRRORED_REPO
    from mirrornodes import mirror_node, proxied_upstream

    info_route, file_route = "/api/models/{org}/{name}", "/{org}/{name}/resolve/{rev}/{path}"
    upstream = proxied_upstream(tmp_path)
    proxy = next(upstream)
    mirror = mirror_node(tmp_path, proxy.url, monkeypatch, as_node=False)  # (files by /resolve/: slowed)
    try:
        before = scrape(mirror)
        assert before.types[WAIT] == "histogram"
        assert waits_of(before, info_route)["count"] == 0
        # An upstream silent for 1.5 s from now before it answers the mirror's scan: the client waits more than
        # 1 s from its request's arrival (a loaded CI machine took 0.11 s to send it: its wait was 1.09 s)
        proxy.set("pass").silent_until = time.monotonic() + 1.5
        info_answer = get(mirror, f"/api/models/{MIRRORED_REPO}")
        assert info_answer.status == 200
        commit = json.loads(info_answer.body)["sha"]  # (by branch, an LFS file is a redirect to it)
        # Then a file whose body comes slowly (its ranges in parallel: 2 s or more), its headers at once
        proxy.set("slow", times=-1, path_suffix=MIRRORED_BIG, slow_delay=0.25)
        started = time.monotonic()
        big = get(mirror, f"/{MIRRORED_REPO}/resolve/{commit}/{MIRRORED_BIG}")
        assert big.status == 200 and big.body == MIRRORED[MIRRORED_BIG]
        assert time.monotonic() - started >= 2.0, "the body was not slow"

        after = scrape(mirror)
        info = waits_of(after, info_route)
        assert info["count"] == 1 and info["+Inf"] == 1
        assert info["1.0"] == 0 and info["sum"] >= 1.0  # the silence was waited for
        served = waits_of(after, file_route)
        assert served["count"] == 1 and served["+Inf"] == 1
        assert served["2.5"] == 1 and served["sum"] < 2.0  # the slow body is not in the wait
        for route in after.labels_of(f"{WAIT}_count", "route"):  # cumulative, up to the count
            counts = [
                value for bound, value in waits_of(after, route).items() if bound not in ("count", "sum")
            ]
            assert counts == sorted(counts) and counts[-1] == waits_of(after, route)["count"], route
        assert waits_of(after, "/metrics")["count"] >= 1  # the first scrape's own answer
    finally:
        mirror.stop()
        upstream.close()


def test_a_mirrors_answers_from_its_store_and_through_its_upstream(
    upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror that served everything through its upstream looked as one that served from its disk: only
    the answers by route and status said anything (an explorer's trial)."""
    online(monkeypatch, nowhere())
    with Depot(tmp_path / "mirror", chunk_size=SMALL_CHUNK, servers=[upstream.url]) as held:
        mirror = LiveNode(held, mirror=True)
        try:
            before = scrape(mirror)
            assert before.value("modeldepot_mirror_answers_total", source="upstream") == 0
            assert before.value("modeldepot_mirror_pulls_total", result="failed") == 0
            target = f"/{UPSTREAM_REPO}/resolve/main/config.json"
            assert head(mirror, target) == 200  # (a HEAD is no answer of the file: a review)
            assert get(mirror, target).body == UPSTREAM_FILES["config.json"]  # (pulled as it went)
            wait_until(lambda: held.has_file(UPSTREAM_REPO, "config.json"), 30, "the pull to publish")
            assert get(mirror, target).body == UPSTREAM_FILES["config.json"]  # (from the store)
            # An LFS file by branch: a redirect to its commit's URL, then the file: one answer (it counted two)
            weights = requests.get(f"{mirror.url}/{UPSTREAM_REPO}/resolve/main/{BIG}", timeout=60)
            assert weights.history and weights.content == UPSTREAM_FILES[BIG]
            s = scrape(mirror)
            assert s.value("modeldepot_mirror_answers_total", source="upstream") == 2
            assert s.value("modeldepot_mirror_answers_total", source="store") == 1
            assert s.value("modeldepot_mirror_pulls_total", result="done") == 2
        finally:
            mirror.stop()
    assert "modeldepot_mirror_answers" not in scrape_text_of_a_plain_node(tmp_path)


def head(node: LiveNode, target: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    try:
        connection.request("HEAD", target)
        return connection.getresponse().status
    finally:
        connection.close()


def scrape_text_of_a_plain_node(tmp_path: Path) -> str:
    with Depot(tmp_path / "plain") as plain:
        served = LiveNode(plain)
        try:
            return get(served, "/metrics").body.decode()
        finally:
            served.stop()


def test_the_background_scrubs_passes_and_finds(tmp_path: Path) -> None:
    """A scrub that stopped running, or never ran, could not be told from one that found nothing (an
    explorer's trial): its passes, what they checked and found, and when the last ended."""
    from controlnodes import Serving

    with Depot(tmp_path / "home", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        big = depot.store.blobs.path(BIG_SHA)
    served = Serving(tmp_path / "home", "--scrub-interval", "1s")
    try:
        served.line_with("dashboard: ")
        flip_byte(big, 10)

        def scraped() -> dict[str, float]:
            connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
            try:
                connection.request("GET", "/metrics")
                text = connection.getresponse().read().decode()
            finally:
                connection.close()
            return {
                sample.name: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name.startswith("modeldepot_scrub_")
            }

        found = wait_until(lambda: (s := scraped()).get("modeldepot_scrub_corrupt_blobs_total") and s, 60,
                           "the scrub to find the corrupt blob")  # fmt: skip
        assert (
            found["modeldepot_scrub_passes_total"] >= 1 and found["modeldepot_scrub_failed_passes_total"] == 0
        )
        assert found["modeldepot_scrub_checked_bytes_total"] > 0
        assert time.time() - 60 < found["modeldepot_scrub_last_pass_timestamp_seconds"] <= time.time()
    finally:
        served.stop()


def test_a_scrub_pass_that_fails_keeps_what_it_counted(tmp_path: Path) -> None:
    """A pass that quarantined a blob, then failed (the index locked), counted it nowhere: the tally was
    added as the pass ended (a review's trial). It counts as it goes."""
    import threading

    from modeldepot.errors import StoreError

    with Depot(tmp_path / "home", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        flip_byte(depot.store.blobs.path(BIG_SHA), 10)
        scrubber = depot.scrubber(1 << 40)
        due = sorted(scrubber.due(0), key=lambda blob: blob.sha256 != BIG_SHA)  # (the corrupt one first)
        scrubber.due = lambda older_than: due  # type: ignore[method-assign]

        def locked(*args: object) -> None:
            raise StoreError("database is locked")

        depot.store.record_verified = locked  # type: ignore[method-assign]
        stop = threading.Event()
        runner = threading.Thread(target=scrubber.run_every, args=(3600, stop))
        runner.start()
        wait_until(lambda: scrubber.tally.failed_passes > 0, 30, "the pass to fail")
        stop.set()
        runner.join(30)
        assert scrubber.tally.corrupt == 1 and scrubber.tally.bytes_checked > 0, scrubber.tally
