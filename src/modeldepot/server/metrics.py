"""Prometheus metrics at ``GET /metrics``: the Prometheus text format (OpenMetrics when the scraper asks for
it), behind the node's token like every route but health.

Each app has a registry of its own (never prometheus_client's global one), holding the process collectors
and :class:`NodeCollector`, which builds every modeldepot figure when it is scraped:

- **counted by this app** (:class:`HttpCounters`, moved by :func:`metrics_middleware` and the body meter):
  ``modeldepot_http_requests_total{route,status}`` — every answer of the app (not the parser's 400s nor
  ``connections.py``'s canned answers, given on the socket before any handler), by the pattern of the route the path
  is for whatever the method (``/api/depot/v1/blobs/{sha256}``, never the path asked for; a 405 or a
  preflight too; a path no route matches is ``route="unmatched"``) and status; ``modeldepot_http_answers_cut_total{route}``
  — answers the node cut short after their headers (a blob found corrupt mid-send, a mirror's failed upstream
  transfer: their status said 200 or 206); ``modeldepot_http_connections_dropped_total{reason}`` — connections
  turned away (``per_client_cap``, ``connection_limit``: the canned 503s) or closed without a request head
  (``header_timeout``), counted by ``connections.py``, which no request of reaches the app; ``modeldepot_http_sent_bytes_total`` — response body bytes handed to
  the connection, streams included: whatever goes through the response's writer, and the pieces a
  :class:`BlobResponse` sends by sendfile (around the writer), each counted as it goes;
  ``modeldepot_http_response_wait_seconds{route}`` — a histogram of the time from the request's arrival to its
  answer's headers (time to first byte: a file's download time is its size over the wire, not the node's
  latency, so the body is left out; the route label only, not the status, to keep the series few);
- **counted by the library in this process** (:data:`modeldepot.counters.PULLS`):
  ``modeldepot_pull_bytes_total{source}`` (``node``, ``peer``, ``hub``: as a pull's ``bytes_by_source``,
  what was fetched, counted as it crossed the wire), ``modeldepot_pull_reused_bytes_total`` (a pull's ``local`` bytes: found in place), ``modeldepot_chunks_rejected_total`` (chunks that failed their BLAKE3 check on
  receipt), ``modeldepot_files_rejected_total`` (downloaded files that failed their SHA-256 or git oid);
- **read from the store** (its index, on a worker thread): ``modeldepot_repos``, ``modeldepot_store_blobs``,
  ``modeldepot_store_bytes`` (blob bytes, each content once), and from ``Depot.budget_status()``
  ``modeldepot_store_budget_bytes`` (0: no budget), ``modeldepot_store_pinned_bytes``,
  ``modeldepot_store_reserved_bytes`` (room writes under way hold until they publish),
  ``modeldepot_store_partial_bytes`` (downloads in progress or kept for a resume: beside the budget),
  ``modeldepot_store_quarantine_bytes`` (corrupt blobs moved aside, until `gc` or a restore: beside it too),
  ``modeldepot_store_disk_free_bytes`` (free on the store's file system),
  ``modeldepot_evictions_total`` and ``modeldepot_evicted_bytes_total`` (since the store was created);
- **read from the depot's tiers**: ``modeldepot_preload_resident_bytes`` and
  ``modeldepot_preload_budget_bytes`` (``depot.preloader.stats()``),
  ``modeldepot_engine_cache_hits_total`` and ``..._misses_total`` (``depot.engines.stats()``);
- ``modeldepot_build{version}`` (1: the node's version and build, to graph a fleet's mix);
- **read from the node's pull jobs** (those asked of it: its control API, its dashboard):
  ``modeldepot_node_pulls_running`` and ``modeldepot_node_pulls_total{result}`` (done, failed, cancelled, refused);
- **read from the fleet**: ``modeldepot_peers``, the live nodes in this node's view of its registry, itself
  included (as ``/api/depot/v1/peers`` lists them; 0 on a node served without a cluster);
- **read from a mirror** (``serve --upstream``): ``modeldepot_mirror_answers_total{source}`` (files answered
  from the store, or through the upstream) and ``modeldepot_mirror_pulls_total{result}`` (done, failed);
- **read from the background scrub** (``serve --scrub-interval``): ``modeldepot_scrub_last_pass_timestamp_seconds``,
  ``modeldepot_scrub_passes_total``, ``..._failed_passes_total``, ``..._checked_bytes_total``,
  ``..._corrupt_blobs_total``.

Figures are node-wide (a node with a token shows them to requests with it only): private repos count in
them, and no label ever names a repo.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from modeldepot._version import node_version
from modeldepot.counters import PULLS, SOURCE_KINDS
from modeldepot.server.context import ARRIVED, DEPOT, SCRUB, path_matches
from modeldepot.server.control_routes import PULLS as PULL_JOBS
from modeldepot.server.fleet import FLEET
from modeldepot.server.mirror_routes import MIRROR
from modeldepot.server.responses import BlobResponse, CountedResponse
from modeldepot.store.maintenance import partial_bytes, quarantine_bytes
from modeldepot.store.maintenance import totals as store_totals

__all__ = ["METRICS", "METRICS_PATH", "UNMATCHED", "HttpCounters", "NodeCollector", "NodeMetrics",
           "add_metrics", "metrics_middleware"]  # fmt: skip

METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"  # the route label of a request no route matched (any path: one label value)
# Upper bounds (seconds) of the answer-wait histogram: a file answered from the page cache in a millisecond
# to a mirror's upstream header wait (5 s) and a cold commit listing
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpCounters:
    """Answers by (route pattern, status) and body bytes sent; moved on the event loop, read by a scrape
    on a worker thread (hence the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._cut: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._sent = 0
        # route -> (count in each bucket of WAIT_BUCKETS and one past the last, sum of seconds)
        self._waits: dict[str, tuple[list[int], float]] = {}

    def observe_wait(self, route: str, seconds: float) -> None:
        with self._lock:
            counts, total = self._waits.get(route) or ([0] * (len(WAIT_BUCKETS) + 1), 0.0)
            counts[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1
            self._waits[route] = counts, total + seconds

    def waits(self) -> dict[str, tuple[list[int], float]]:
        with self._lock:
            return {route: (list(counts), total) for route, (counts, total) in self._waits.items()}

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self._requests[route, status] = self._requests.get((route, status), 0) + 1

    def count_cut(self, route: str) -> None:
        with self._lock:
            self._cut[route] = self._cut.get(route, 0) + 1

    def cut_answers(self) -> dict[str, int]:
        with self._lock:
            return dict(self._cut)

    def count_dropped(self, reason: str) -> None:
        """A connection the node turned away or closed before any request of it reached the app."""
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + 1

    def dropped(self) -> dict[str, int]:
        with self._lock:
            return dict(self._dropped)

    def add_sent(self, amount: int) -> None:
        if amount > 0:
            with self._lock:
                self._sent += amount

    def snapshot(self) -> tuple[dict[tuple[str, int], int], int]:
        with self._lock:
            return dict(self._requests), self._sent


class NodeCollector(Collector):
    """Every modeldepot figure, built when the registry is collected (on a worker thread: it reads the
    store's index)."""

    def __init__(self, app: web.Application, http: HttpCounters) -> None:
        self._app = app
        self._http = http

    def collect(self) -> Iterator[Metric]:
        depot = self._app[DEPOT]
        totals = store_totals(depot.store)
        budget = depot.budget_status(fresh=False)
        preload = depot.preloader.stats()
        engines = depot.engines.stats()
        fleet = self._app.get(FLEET)
        view = fleet.view if fleet is not None else None
        peers = len(view.peers()) if view is not None else 0
        pulls = PULLS.snapshot()
        requests, sent = self._http.snapshot()

        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        figures: list[tuple[Callable[..., Metric], str, str, float]] = [
            (gauge, "modeldepot_repos", "Repos in the store.", len(totals.repo_ids)),
            (gauge, "modeldepot_store_blobs", "Blobs in the store (distinct contents).", totals.blobs),
            (gauge, "modeldepot_store_bytes", "Bytes of the store's blobs (each content once), those that are hard "
             "links of files outside the store too.", totals.blob_bytes),
            (gauge, "modeldepot_store_budget_used_bytes", "Bytes the disk budget counts against "
             "modeldepot_store_budget_bytes: the store's blobs but those shared with files outside it (an adopted "
             "Hugging Face cache, import --link), which free nothing when evicted.", budget.used_bytes),
            (gauge, "modeldepot_store_quarantined_blobs", "Blobs found corrupt and taken out of service (a "
             "pull or import of their files restores them).", totals.quarantined_blobs),
            (gauge, "modeldepot_store_budget_bytes", "The store's disk budget in bytes; 0 means no budget.",
             budget.max_bytes or 0),
            (gauge, "modeldepot_store_pinned_bytes", "Bytes of the blobs that pinned revisions use.",
             budget.pinned_bytes),
            (gauge, "modeldepot_store_reserved_bytes", "Room that writes under way (pulls, imports) hold in the "
             "disk budget until they publish.", budget.reserved_bytes),
            # (beside the budget: interrupted pulls took twice a budget's disk while used_bytes said 0, an
            # explorer's trial)
            (gauge, "modeldepot_store_partial_bytes", "Disk that downloads in progress or kept for a resume take, "
             "beside the disk budget (each has room for its whole file as it starts; `modeldepot gc --partials` "
             "frees those kept).", partial_bytes(depot.store)),
            # (a failing disk's corrupt copies took as much again as the store, every figure saying 0: an
            # explorer's trial)
            (gauge, "modeldepot_store_quarantine_bytes", "Disk that blobs found corrupt, moved aside, take until "
             "`modeldepot gc` deletes them (or a pull or import restores them), beside the disk budget.",
             quarantine_bytes(depot.store)),
            (counter, "modeldepot_evictions", "Revisions and variants evicted to keep within the disk budget, since the "
             "store was created.", budget.evictions),
            (counter, "modeldepot_evicted_bytes", "Bytes freed by evictions, since the store was created.",
             budget.evicted_bytes),
            (gauge, "modeldepot_preload_resident_bytes", "Bytes of preloaded models resident in RAM now.",
             preload.ram_bytes),
            (gauge, "modeldepot_preload_budget_bytes", "The RAM tier's budget in bytes.", preload.budget_bytes),
            (counter, "modeldepot_engine_cache_hits", "Loads answered by the loaded-model cache: Depot.load "
             "calls in the process that serves (an inference app that embeds the node; 0 on a plain "
             "`modeldepot serve`).", engines.total_hits),
            (counter, "modeldepot_engine_cache_misses", "Loads the loaded-model cache had to make: Depot.load "
             "calls in the process that serves (0 on a plain `modeldepot serve`).", engines.total_misses),
            (gauge, "modeldepot_peers", "Live nodes in this node's view of its fleet, itself included; 0 "
             "without a cluster.", peers),
            (counter, "modeldepot_chunks_rejected", "Chunks the pulls of this process received that failed "
             "their BLAKE3 check (dropped, fetched again elsewhere).", pulls.chunks_rejected),
            (counter, "modeldepot_files_rejected", "Files the pulls of this process downloaded that failed "
             "their SHA-256 or git oid check (nothing of them kept).", pulls.files_rejected),
            (counter, "modeldepot_http_sent_bytes", "Response body bytes this node sent (handed to the kernel: a "
             "client that leaves may not have read the last of them), streams included.",
             sent),
        ]  # fmt: skip
        free = depot.store.layout.free_bytes()
        if free is not None:  # (unknown: none said, rather than a disk that looks full)
            figures.append((gauge, "modeldepot_store_disk_free_bytes", "Bytes free on the store's file system "
                            "(for its user); under 1 MiB, /health says degraded and writes fail (507).", free))  # fmt: skip
        cluster = fleet.status() if fleet is not None else None
        if cluster is not None:
            figures.append((gauge, "modeldepot_cluster_connected", "1 while the fleet's registry answers and "
                            "this node is registered in it; 0 meanwhile (peers are the last known).",
                            float(cluster.connected and cluster.registered)))  # fmt: skip
        for family, name, doc, value in figures:
            yield family(name, doc, value=value)
        jobs = self._app.get(PULL_JOBS)
        if jobs is not None:  # (the pulls asked of this node: POST /api/depot/v1/pulls, the dashboard's)
            yield GaugeMetricFamily("modeldepot_node_pulls_running", "Pulls asked of this node (its control API, "
                                    "its dashboard) running now.", value=jobs.running())  # fmt: skip
            ended = CounterMetricFamily("modeldepot_node_pulls", "Pulls asked of this node that ended, since it "
                                        "started, by result: done, failed, cancelled, or refused before they "
                                        "started for a failure of the node's (a full disk budget, an upstream "
                                        "that failed its scan).", labels=["result"])  # fmt: skip
            for result in ("done", "failed", "cancelled", "refused"):
                ended.add_metric([result], jobs.ended.get(result, 0))
            yield ended
        scrub = self._app.get(SCRUB)
        if scrub is not None:  # (serve --scrub-interval: a scrub that stopped running could not be seen)
            yield GaugeMetricFamily(
                "modeldepot_scrub_last_pass_timestamp_seconds",
                "When the background "
                "scrub's last pass ended (seconds since the epoch; 0: none yet). A pass "
                "checks the blobs not checked for the scrub interval.",
                value=scrub.last_pass_ended,
            )
            for name, doc, value in (
                (
                    "modeldepot_scrub_passes",
                    "Passes of the background scrub that ended, since the node started.",
                    scrub.passes,
                ),
                (
                    "modeldepot_scrub_failed_passes",
                    "Passes of the background scrub that failed (the node's log "
                    "says why; the next tries again), since the node started.",
                    scrub.failed_passes,
                ),
                (
                    "modeldepot_scrub_checked_bytes",
                    "Blob bytes the background scrub rehashed, since the node started.",
                    scrub.bytes_checked,
                ),
                (
                    "modeldepot_scrub_corrupt_blobs",
                    "Blobs the background scrub found corrupt (quarantined), since the node started.",
                    scrub.corrupt,
                ),
            ):
                yield CounterMetricFamily(name, doc, value=value)
        mirror = self._app.get(MIRROR)
        if mirror is not None:  # (a mirror's hits and misses: `serve --upstream`)
            answers = CounterMetricFamily("modeldepot_mirror_answers", "Answers of files by this mirror, since it "
                                          "started: from its store, or through its upstream (pulled as they "
                                          "went).", labels=["source"])  # fmt: skip
            for source in ("store", "upstream"):
                answers.add_metric([source], mirror.answers.get(source, 0))
            yield answers
            pulled = CounterMetricFamily("modeldepot_mirror_pulls", "Files this mirror pulled from its upstream "
                                         "for its clients, since it started, by result: done or failed.",
                                         labels=["result"])  # fmt: skip
            for result in ("done", "failed"):
                pulled.add_metric([result], mirror.pulls_ended.get(result, 0))
            yield pulled
        build = GaugeMetricFamily("modeldepot_build", "This node's version and build (as `peers` and /info say "
                                  "it): always 1.", labels=["version"])  # fmt: skip
        build.add_metric([node_version()], 1)
        yield build

        # Bytes over the wire apart from bytes found in place: counted together, a pull asked again of what
        # the store holds (any token holder's) moved the "traffic" by the repo's size, and sum(rate()) was no
        # measure of it
        by_source = CounterMetricFamily(
            "modeldepot_pull_bytes",
            "Bytes the pulls of this process fetched, by kind of source (node: configured servers; peer: "
            "fleet nodes; hub).",
            labels=["source"],
        )
        for source in sorted({*SOURCE_KINDS, *pulls.bytes_by_source} - {"local"}):
            by_source.add_metric([source], pulls.bytes_by_source.get(source, 0))
        yield by_source
        yield CounterMetricFamily(
            "modeldepot_pull_reused_bytes",
            "Bytes the pulls of this process found in place rather than fetched: already in the store, the "
            "same content under another path, or kept by an interrupted download.",
            value=pulls.bytes_by_source.get("local", 0),
        )

        answers = CounterMetricFamily(
            "modeldepot_http_requests",
            f"Answers of this node by route pattern ({UNMATCHED}: no route matched) and status.",
            labels=["route", "status"],
        )
        for (route, status), count in sorted(requests.items()):
            answers.add_metric([route, str(status)], count)
        yield answers

        cut = CounterMetricFamily(
            "modeldepot_http_answers_cut",
            "Answers this node cut short after their headers, by route pattern: a blob found corrupt while "
            "sent, a mirror's upstream transfer that failed (counted in http_requests by the status they began "
            "with). Not clients that left.",
            labels=["route"],
        )
        for route, count in sorted(self._http.cut_answers().items()):
            cut.add_metric([route], count)
        yield cut

        dropped = CounterMetricFamily(
            "modeldepot_http_connections_dropped",
            "Connections the node turned away with a 503 before any request reached it (per_client_cap: the "
            "client's address held --max-connections-per-client; connection_limit: the node held its total), "
            "or closed for want of a request head in --header-timeout (header_timeout). None of them is in "
            "http_requests: alert on this too (every client behind one proxy shares its address).",
            labels=["reason"],
        )
        dropped_by = self._http.dropped()
        for reason in DROP_REASONS:
            dropped.add_metric([reason], dropped_by.get(reason, 0))
        yield dropped

        waits = HistogramMetricFamily(
            "modeldepot_http_response_wait_seconds",
            "Time from a request's arrival to its answer's headers (time to first byte; a body's transfer "
            "is not in it), by route pattern.",
            labels=["route"],
        )
        for route, (counts, total) in sorted(self._http.waits().items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*(str(b) for b in WAIT_BUCKETS), "+Inf"), counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            waits.add_metric([route], buckets, total)
        yield waits


class NodeMetrics:
    """An app's metrics: its registry and its HTTP counters."""

    def __init__(self, app: web.Application) -> None:
        self.http = HttpCounters()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(NodeCollector(app, self.http))


METRICS = web.AppKey("metrics", NodeMetrics)
DROP_REASONS = ("per_client_cap", "connection_limit", "header_timeout")


def route_label(request: web.Request) -> str:
    """The pattern of the route the request was for (``/api/depot/v1/blobs/{sha256}``), never the path
    itself, whatever the method: a method the route does not take (a 405, a CORS preflight) is counted
    under that route too, not under ``unmatched`` or a catch-all that answered it (the Hub's ``/api/{tail}``).
    A path that no route's pattern matches is ``unmatched``."""
    route = request.match_info.route
    if route.resource is not None and route.method != "*":
        return route.resource.canonical  # the route that takes this method: the usual case
    for resource in request.app.router.resources():  # the first route, by registration, for this path
        if any(r.method != "*" for r in resource) and path_matches(resource, request.path):
            return resource.canonical
    return route.resource.canonical if route.resource is not None else UNMATCHED


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts every answer by route pattern and status (outermost: it sees what the client gets)."""
    metrics = request.app.get(METRICS)
    if metrics is None:
        return await handler(request)
    route = route_label(request)
    try:
        response = await handler(request)
    except web.HTTPException as raised:  # a redirect, raised through the other middlewares
        metrics.http.count_request(route, raised.status)
        raise
    metrics.http.count_request(route, response.status)
    return response


def _count_body(writer: AbstractStreamWriter, count: Callable[[int], None]) -> None:
    """Count what goes through ``writer`` (one per request): each piece once the writer took it."""
    write, write_eof = writer.write, writer.write_eof

    async def counted_write(chunk: bytes | bytearray | memoryview, *args: Any, **kwargs: Any) -> None:
        await write(chunk, *args, **kwargs)
        count(chunk.nbytes if isinstance(chunk, memoryview) else len(chunk))

    async def counted_write_eof(chunk: bytes = b"") -> None:
        await write_eof(chunk)
        count(len(chunk))

    writer.write = counted_write  # type: ignore[method-assign]
    writer.write_eof = counted_write_eof  # type: ignore[method-assign]


async def _meter_body(request: web.Request, response: web.StreamResponse) -> None:
    """As a response is prepared: count its body bytes as they are sent."""
    metrics = request.app.get(METRICS)
    if metrics is None:
        return
    arrived = request.get(ARRIVED)  # (set by app.request_id_middleware)
    if arrived is not None:  # (None: an answer given before the middlewares ran)
        metrics.http.observe_wait(route_label(request), time.monotonic() - arrived)
    _count_body(request.writer, metrics.http.add_sent)
    if isinstance(response, BlobResponse):
        response.on_sendfile = metrics.http.add_sent
    if isinstance(response, CountedResponse):
        route = route_label(request)
        response.on_cut = lambda: metrics.http.count_cut(route)


async def metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    # The collection reads the store's index: off the event loop.
    body = await asyncio.to_thread(encoder, request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


def add_metrics(app: web.Application) -> None:
    """Give ``app`` its metrics and the ``/metrics`` route; :func:`metrics_middleware` must be among its
    middlewares (create_app puts it outermost)."""
    app[METRICS] = NodeMetrics(app)
    app.on_response_prepare.append(_meter_body)
    app.router.add_get(METRICS_PATH, metrics)
