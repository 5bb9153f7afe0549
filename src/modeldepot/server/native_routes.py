"""The node's own API for peers and tools, under ``/api/depot/v1``; described at ``/api/depot/v1/openapi.json``.

Blobs are addressed by SHA-256, so a peer that knows a file's digest (from a manifest, or from the Hub's
LFS oid) can fetch it, a range of it, or one verified chunk of it, whichever repo it came from. A node also
serves the verified chunks of a file it is still downloading (to requests with its token only), and says
which chunks it has (``blobs/{sha256}/chunks``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import blake3
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from modeldepot._version import __version__, node_version
from modeldepot.depot import Depot
from modeldepot.discovery.base import ClusterStatus
from modeldepot.enginekeys import engine_revision
from modeldepot.errors import (
    ChunkNotAvailableError,
    DepotError,
    InvalidInputError,
    NotFoundError,
    RepoNotFoundError,
)
from modeldepot.hashing import chunk_count
from modeldepot.hub.manifest import Manifest
from modeldepot.preload.preloader import PreloadInfo
from modeldepot.server.commit_cache import COMMITS, CommitCache
from modeldepot.server.context import DEPOT, checked_query, hidden_repo, is_authorized, path_repo, request_url
from modeldepot.server.fleet import FLEET, NodeFleet
from modeldepot.server.openapi import WITHHELD_PRELOAD, openapi_document
from modeldepot.server.ranges import RangeNotSatisfiable
from modeldepot.server.responses import CountedResponse, ViewResponse, json_response, matches_none, send_blob
from modeldepot.server.views import wanted_range
from modeldepot.store.layout import REFUSES_WRITES, refuses_writes, size_text
from modeldepot.store.maintenance import partial_bytes, quarantine_bytes
from modeldepot.store.maintenance import totals as store_totals
from modeldepot.store.models import BlobRecord
from modeldepot.store.verified import PartialChunkReader
from modeldepot.transfer.sources import DIGESTS_HEADER
from modeldepot.validation import validate_revision

__all__ = ["API", "HEALTH_PATH", "add_native_routes"]

log = logging.getLogger(__name__)

API = "/api/depot/v1"
HEALTH_PATH = f"{API}/health"
STARTED = web.AppKey("started", float)
STOPPING = web.AppKey("stopping", asyncio.Event)  # set when the server begins to shut down
_INDEX = re.compile(r"[0-9]{1,19}", re.ASCII)
_AFTER = re.compile(r"[0-9a-f]{0,64}", re.ASCII)  # a blob's SHA-256, or its start: the inventory's cursor
CAPABILITIES = ("hub-api", "blobs", "chunks", "ranges", "inventory")
INVENTORY_PAGE = 1000
EVENTS_POLL = 0.5  # seconds between looks at the statuses (pulls write theirs about as often)
EVENTS_HEARTBEAT = 15.0
EVENTS_REREAD = 5.0  # seconds between whole looks at the statuses while the index does not change


def _depot(request: web.Request) -> Depot:
    return request.app[DEPOT]


async def health(request: web.Request) -> web.Response:
    """200 while the node serves, whatever its fleet's registry does (a load balancer must not drop a node
    that serves files): ``status`` is ``degraded``, with a ``detail``, while its registry cannot be reached
    or its record is not in it (its peers and what they hold are then the last known; said in
    ``fleet_detail`` too), or while files of its store failed verification (``quarantined_files``);
    ``cluster`` (a node served with one) says how its view of the fleet stands."""
    checked_query(request)
    fleet = request.app.get(FLEET)
    status = fleet.status() if fleet is not None else None
    answer: dict[str, Any] = {"status": "ok"}
    if status is not None:
        answer.update(node_id=_depot(request).node_id, cluster=dataclasses.asdict(status))
        degraded = _fleet_degraded(status, fleet)
        if degraded:
            answer.update(status="degraded", detail=degraded, fleet_detail=degraded)
    # (a model the scrub found corrupt answered 503 until pulled again by hand, the health "ok": an
    # explorer's trial)
    broken = await asyncio.to_thread(_quarantined_files, _depot(request))
    if broken:
        lost = (f"{broken} file{'s' if broken != 1 else ''} failed verification and {'are' if broken != 1 else 'is'} "
                "not served: `modeldepot verify` names them, and a pull of them fetches them again")  # fmt: skip
        said = answer.get("detail")
        answer.update(status="degraded", quarantined_files=broken, detail=f"{said}; {lost}" if said else lost)
    # (a node whose disk turned read-only under it answered every write with an error, its health "ok": an
    # explorer's trial)
    layout = _depot(request).store.layout
    if not _depot(request).store.read_only and await asyncio.to_thread(refuses_writes, layout.home):
        stuck = f"the store is {REFUSES_WRITES}; what it holds is served"
        said = answer.get("detail")
        answer.update(status="degraded", detail=f"{said}; {stuck}" if said else stuck)
    # (a mirror on a full disk answered 507 to every pull, its health "ok": an explorer's trial)
    free = await asyncio.to_thread(_depot(request).store.layout.free_bytes)
    if free is not None and free < FULL_DISK_FREE and not _depot(request).store.read_only:
        full = (f"the store's disk has {size_text(free)} free: pulls and other writes fail (507) until room is "
                "made (`modeldepot gc`, `rm`, a disk budget); what it holds is served")  # fmt: skip
        said = answer.get("detail")
        answer.update(status="degraded", disk_free_bytes=free, detail=f"{said}; {full}" if said else full)
    return json_response(answer)


FULL_DISK_FREE = 1 << 20  # bytes free on the store's disk under which /health says it is full


def _fleet_degraded(status: ClusterStatus, fleet: NodeFleet | None) -> str | None:
    """Why the node's place in its fleet is degraded, or None."""
    if not status.connected:
        return (f"the fleet's registry ({status.backend}) cannot be reached: peers and what they hold are as last "
                "seen; files are served")  # fmt: skip
    if status.conflict:
        return f"{status.conflict}; files are served"
    if not status.registered and status.last_error:
        return (f"the fleet's registry refuses this node ({status.last_error}): peers may not see what it holds "
                "now; files are served")  # fmt: skip
    if not status.registered:
        return "this node is not registered in its fleet yet: peers do not know of it; files are served"
    if fleet is not None and fleet.unreachable:
        return f"{fleet.unreachable}; files are served"
    if fleet is not None and fleet.refused:
        return f"{fleet.refused}; files are served"
    return None


def _quarantined_files(depot: Depot) -> int:
    """The own store's files whose blob failed verification (quarantined, not served until pulled again)."""
    # (through the partial index of the few blobs not ok: a join of every file cost 60-98 ms a probe at 200,000
    # files, a review, on the route load balancers and peers ask every few seconds)
    rows = depot.store.index.read(
        "SELECT COUNT(*) AS n FROM files WHERE sha256 IN (SELECT sha256 FROM blobs WHERE state != 'ok')"
    )
    return int(rows[0]["n"])


async def peers(request: web.Request) -> web.Response:
    """The fleet's live nodes as this node sees them, with what each holds (``[]`` without a cluster)."""
    checked_query(request)
    fleet = request.app.get(FLEET)
    rows = fleet.rows() if fleet is not None else []
    return json_response([row.to_dict() for row in rows])


async def node_info(request: web.Request) -> web.Response:
    checked_query(request)
    depot = _depot(request)
    return json_response(
        {
            "id": depot.node_id,
            "version": node_version(),
            "chunk_size": depot.chunk_size,
            "capabilities": list(CAPABILITIES),
            "hub_api": True,
            "read_only": depot.store.read_only,
        }
    )


async def list_repos(request: web.Request) -> web.Response:
    """The repos, with an ETag of their bytes: a client that sends it back gets a 304 while the list stands
    (the dashboard asks every 2 s; 0.8 MB and 0.25 s of CPU at 3,000 repos). Read again only when the
    index changed."""
    checked_query(request)
    depot, authorized = _depot(request), is_authorized(request)
    if depot.tiers.shared:  # (the shared stores' changes move no version of this store's index)
        repos = await asyncio.to_thread(depot.list_repos)
        return json_response([r.to_dict() for r in repos if not r.private or authorized])
    cache = request.app[COMMITS]

    def read() -> tuple[bytes, str]:
        version, repos = cache.repos(depot.store.list_repos)

        def make() -> bytes:
            return json.dumps([r.to_dict() for r in repos if not r.private or authorized]).encode()

        return cache.body(("repos", authorized), version, make)

    body, digest = await asyncio.to_thread(read)
    return _tagged_json(request, body, f"repos-{digest}-{'all' if authorized else 'public'}")


def _tagged_json(request: web.Request, body: bytes, etag: str) -> web.Response:
    """A JSON body with its tag; a 304 to a client that holds it."""
    headers = {"ETag": f'"{etag}"', "Cache-Control": "no-cache"}
    if matches_none(request.headers.get("If-None-Match"), etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)


async def manifest(request: web.Request) -> web.Response:
    checked_query(request)
    depot = _depot(request)
    repo_id = await path_repo(request)
    revision = validate_revision(request.match_info["rev"])
    summary = await asyncio.to_thread(depot.store.repo_summary, repo_id)
    if summary.private and not is_authorized(request):
        raise hidden_repo(request, repo_id)
    commit_id = await asyncio.to_thread(depot.resolve, repo_id, revision)

    def make() -> bytes:
        files = depot.list_files(repo_id, commit_id)
        digests = depot.store.chunk_digests_of([f.sha256 for f in files])
        return json.dumps({
            "repo_id": repo_id,
            "commit_id": commit_id,
            "private": summary.private,
            "files": [{**f.to_dict(), "etag": f.etag, "chunks": digests[f.sha256]} for f in files],
        }).encode()  # fmt: skip

    def read() -> tuple[bytes, str]:
        if depot.tiers.shared:  # (the cache follows the own index's changes only)
            made = make()
            return made, blake3.blake3(made).hexdigest()[:32]
        cache = request.app[COMMITS]
        # Made once while the index stands, and tagged: a mirror or a peer pulling a commit's files one by
        # one asks for its manifest at each (13 ms of the node's CPU each for 300 files, and as much again
        # to parse it, a profile), and with the tag it holds gets a 304
        return cache.body(("manifest", repo_id, commit_id), cache.version(), make)

    body, digest = await asyncio.to_thread(read)
    return _tagged_json(request, body, f"manifest-{digest}")


async def pull_manifest(request: web.Request) -> web.Response:
    """The saved scan of an upstream repo: its variants, their statuses and live progress (of a repo held but
    never scanned, what the store holds: Depot.get_manifest)."""
    # (`?revision=x` answered main's manifest, the parameter ignored: a trial)
    checked_query(request, hint=" (a revision's files and chunks: /repos/{repo}/revisions/{rev}/manifest)")
    depot = _depot(request)
    repo_id = await path_repo(request)
    try:
        manifest = await asyncio.to_thread(depot.get_manifest, repo_id)
    except NotFoundError:
        raise RepoNotFoundError(repo_id) from None  # never scanned: no manifest, as for an absent repo
    if (manifest.private or manifest.gated) and not is_authorized(request):
        raise hidden_repo(request, repo_id)
    return json_response(manifest.to_dict())


def _variant_states(manifests: list[Manifest], authorized: bool) -> dict[str, dict[str, Any]]:
    states = {}
    for manifest in manifests:
        if (manifest.private or manifest.gated) and not authorized:
            continue
        for variant in manifest.variants:
            states[f"{manifest.repo_id}:{variant.name}"] = {
                "repo_id": manifest.repo_id,
                "commit_id": manifest.commit_id,
                "variant": variant.name,
                "status": variant.status,
                "bytes_done": variant.bytes_done,
                "total_bytes": variant.total_bytes,
                "error": variant.error,
                "resumable": variant.resumable,
                "bytes_by_source": variant.bytes_by_source,
                "held_commit": variant.held_commit,
            }
    return states


class SharedLooks:
    """One look at the manifests at a time, shared by every event stream (each stream looked on its own:
    0.11 s of the GIL for 500 repos every half second, per open dashboard; ten saturated the node)."""

    def __init__(self, index_version: Callable[[], int]) -> None:
        self._index_version = index_version  # (the index's data_version: CommitCache.version)
        self._manifests: list[Manifest] = []
        self._at = -EVENTS_POLL
        self._look: asyncio.Task[list[Manifest]] | None = None
        self._failing = False
        # The index's version at the last whole look: unchanged, the statuses are (a look cost 1 s of CPU at
        # 5,000 repos, twice a second, while any dashboard was open). Looked at whole every EVENTS_REREAD all
        # the same: a pull killed changes what a status shows (no process holds its mark) and writes nothing.
        self._version: int | None = None
        self._read_at = -EVENTS_REREAD

    async def manifests(self, depot: Depot) -> list[Manifest]:
        """The manifests as of at most about EVENTS_POLL ago."""
        if self._look is None:
            if time.monotonic() - self._at < EVENTS_POLL * 0.8:
                return self._manifests
            self._look = asyncio.get_running_loop().create_task(self._looking(depot))
        return await asyncio.shield(self._look)  # (a stream that leaves does not cancel the others' look)

    def _read(self, depot: Depot) -> list[Manifest]:
        version = self._index_version()
        changed, self._version = version != self._version, version
        if changed or time.monotonic() - self._read_at >= EVENTS_REREAD:
            self._read_at = time.monotonic()
            self._manifests = depot.list_manifests()
        return self._manifests

    async def _looking(self, depot: Depot) -> list[Manifest]:
        try:
            self._manifests = await asyncio.to_thread(self._read, depot)
            self._failing = False
        except DepotError as error:  # (a busy or full disk: the streams go on with the last look, said once)
            if not self._failing:
                log.warning(
                    "the event streams could not read the statuses (they show the last read): %s", error
                )
            self._failing = True
        finally:
            self._at = time.monotonic()
            self._look = None
        return self._manifests


LOOKS = web.AppKey("looks", SharedLooks)


class EventStream(CountedResponse):
    """Server-sent events: one ``variant`` event per variant at connect, closed by a ``snapshot`` event (what
    a client showed from an earlier stream and this one did not list is gone: removed meanwhile, or no
    longer for its credentials), then one per change (any process's pulls: statuses live in the index), a
    ``gone`` event for a variant no longer listed (its repo removed), and a comment as heartbeat. Streamed after the handler returns, so the request deadline does
    not cut it; counts what it sent in ``body_sent``."""

    def __init__(self, depot: Depot, authorized: bool, stopping: asyncio.Event, looks: SharedLooks) -> None:
        super().__init__(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        self._depot = depot
        self._authorized = authorized
        self._stopping = stopping
        self._looks = looks

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        if request.method == "HEAD":  # the headers alone: a stream of nothing would never end
            await super().write_eof()
            return writer
        # (said to the node's connection, server/connections.py: a stop does not wait for a stream, nor counts it)
        protocol = request.protocol
        marked = hasattr(protocol, "streaming_events")
        if marked:
            setattr(protocol, "streaming_events", True)  # noqa: B010
        try:
            return await self._stream(writer)
        finally:
            if marked:
                setattr(protocol, "streaming_events", False)  # noqa: B010

    async def _stream(self, writer: AbstractStreamWriter | None) -> AbstractStreamWriter | None:
        seen: dict[str, dict[str, Any]] = {}
        quiet_since = time.monotonic()
        first = True
        while writer is not None and not self._stopping.is_set():
            states = _variant_states(await self._looks.manifests(self._depot), self._authorized)
            changed = [state for key, state in states.items() if seen.get(key) != state]
            gone = [
                {"repo_id": s["repo_id"], "variant": s["variant"]} for k, s in seen.items() if k not in states
            ]
            seen = states
            # (a page kept the rows of an earlier stream: a repo removed while it reconnected, a private one
            # after its token was forgotten, stayed shown for good: an explorer's trial)
            snapshot = (
                [f"event: snapshot\ndata: {json.dumps({'variants': len(states)})}\n\n"] if first else []
            )
            first = False
            if changed or gone or snapshot:
                await self._send(
                    "".join(
                        [f"event: variant\ndata: {json.dumps(s, sort_keys=True)}\n\n" for s in changed]
                        + [f"event: gone\ndata: {json.dumps(g, sort_keys=True)}\n\n" for g in gone]
                        + snapshot
                    ).encode()
                )
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= EVENTS_HEARTBEAT:
                await self._send(b": heartbeat\n\n")
                quiet_since = time.monotonic()
            with contextlib.suppress(TimeoutError):  # woken at once when the server shuts down
                await asyncio.wait_for(self._stopping.wait(), EVENTS_POLL)
        if writer is not None:
            await super().write_eof()  # the stream ends: a shutdown does not wait for it
        return writer

    async def _send(self, data: bytes) -> None:
        await self.write(data)
        self.body_sent += len(data)


async def events(request: web.Request) -> web.StreamResponse:
    checked_query(request)
    return EventStream(_depot(request), is_authorized(request), request.app[STOPPING], request.app[LOOKS])


async def _held_blob(request: web.Request) -> BlobRecord | None:
    """The complete blob the request names; None when the store lacks it but the request may be answered
    from a download in progress (it carries the node's token, or the download is a public repo's). Raises
    NotFoundError otherwise."""
    authorized, store = is_authorized(request), _depot(request).store
    try:
        return await asyncio.to_thread(store.blob, request.match_info["sha256"], public_only=not authorized)
    except NotFoundError:
        # A download in progress belongs to no repo yet (a private one, maybe): shown without the token only
        # when its pull marked it a public repo's (a fleet without a token shares what it pulls)
        if not authorized and not await asyncio.to_thread(
            store.partials.is_public, request.match_info["sha256"]
        ):
            raise
        return None


async def _blob_or_download(request: web.Request) -> BlobRecord | PartialChunkReader:
    """The complete blob the request names or (to a request with the token) its download in progress. A
    download keeps its files until the index has its blob, so one that finished between the two looks is
    found by a second look at the store."""
    blob = await _held_blob(request)
    if blob is None:
        sha256 = request.match_info["sha256"]
        reader = await asyncio.to_thread(_depot(request).store.partials.open_chunks, sha256)
        if reader is not None:
            return reader
        blob = await _held_blob(request)
        if blob is None:
            raise NotFoundError(f"blob {sha256} is not in the store")
    return blob


async def read_blob(request: web.Request) -> web.StreamResponse:
    checked_query(request)
    depot = _depot(request)
    blob = await _blob_or_download(request)
    if isinstance(blob, PartialChunkReader):
        return await _read_partial(request, blob)
    reader = await asyncio.to_thread(depot.open_verified, blob)
    return await send_blob(request, reader, blob.sha256, {"X-Chunk-Size": str(blob.chunk_size)}, hub=False)


async def _read_partial(request: web.Request, reader: PartialChunkReader) -> web.StreamResponse:
    """A Range inside the logged chunks of a download in progress: 206, each chunk checked before it is
    sent. No Range (the whole file: only a complete blob is that), or one touching a chunk the log does not
    name, is a 404 ``ChunkNotAvailable``; so is a first chunk whose bytes fail their BLAKE3 (a later one
    cuts the connection, as for a complete blob)."""
    sha256 = reader.blob.sha256
    headers = {"X-Chunk-Size": str(reader.chunk_size)}
    try:
        wanted = wanted_range(request, reader.size, sha256, hub=False)
    except RangeNotSatisfiable:
        return await send_blob(request, reader, sha256, headers, hub=False)  # the 416
    try:
        if wanted is None:
            raise ChunkNotAvailableError(sha256, 0, "the file is still downloading: ask for a Range")
        missing = [i for i in reader.chunks_of(wanted.start, wanted.end) if not reader.logged(i)]
        if missing:
            raise ChunkNotAvailableError(sha256, missing[0], "it has not been downloaded yet")
    except BaseException:
        reader.close()
        raise
    return await send_blob(request, reader, sha256, headers, hub=False)


async def read_chunk(request: web.Request) -> web.StreamResponse:
    """One chunk, verified against its BLAKE3 before a byte leaves: a corrupt chunk is a 503, never data;
    a chunk of a download in progress that is not there (or fails its check) a 404 ``ChunkNotAvailable``."""
    checked_query(request)
    depot = _depot(request)
    raw = request.match_info["index"]
    if not _INDEX.fullmatch(raw):
        raise InvalidInputError(f"chunk index {raw[:40]!r} is not a decimal number of at most 19 digits")
    blob = await _blob_or_download(request)
    if isinstance(blob, PartialChunkReader):
        with blob as partial:
            digest = await asyncio.to_thread(partial.check, int(raw))
            view, chunk_size = partial.view(int(raw)), partial.chunk_size
    else:
        view, digest = await asyncio.to_thread(depot.store.verified_chunk, blob, int(raw))
        chunk_size = blob.chunk_size
    headers = {"ETag": f'"{digest}"', "X-Chunk-Blake3": digest, "X-Chunk-Size": str(chunk_size)}
    return ViewResponse(view, headers)


def bitfield(held: Iterable[int], count: int) -> str:
    """Chunks as a bitfield, base64: chunk ``i`` is bit ``i % 8`` of byte ``i // 8``, counting from the most
    significant bit; ``ceil(count / 8)`` bytes, the bits past ``count`` zero."""
    field = bytearray(-(-count // 8))
    for index in held:
        field[index // 8] |= 0x80 >> (index % 8)
    return base64.b64encode(bytes(field)).decode("ascii")


async def chunk_map(request: web.Request) -> web.Response:
    """Which chunks the node has of a blob: all of a complete one; of a download in progress (to requests
    with the token), those its log names, each checked again when it is read."""
    checked_query(request)
    sha256 = request.match_info["sha256"]
    blob = await _held_blob(request)
    log = (
        None if blob is not None else await asyncio.to_thread(_depot(request).store.partials.read_log, sha256)
    )
    if blob is None and log is None:
        blob = await _held_blob(request)  # the download finished between the two looks
    held: Iterable[int]
    digests: list[str | None] | list[str] | None = None
    if blob is not None and await asyncio.to_thread(_depot(request).store.refused, sha256):
        # (a read-only store's blob this process found corrupt: its chunks were said "complete", and every
        # peer asked for them got 503s)
        raise NotFoundError(f"blob {sha256} is corrupt here (a read-only store: kept in place, never served)")
    if blob is not None:
        size, chunk_size, complete = blob.size, blob.chunk_size, True
        count = chunk_count(size, chunk_size)
        held = range(count)
        # (a peer found by content has no manifest to give it them: each chunk it takes is checked on arrival)
        digests = await asyncio.to_thread(_depot(request).store.chunk_digests, sha256)
    elif log is not None:
        size, chunk_size, count, complete = log.size, log.chunk_size, log.chunks, False
        held = await asyncio.to_thread(_depot(request).store.partials.offered, log)
        # (each held chunk's BLAKE3 as the log names it, null for the others: the node's own word, as its
        # settlements in the registry are; a peer takes it while the registry cannot be read, which held every
        # claim's chunks from the fleet through an etcd outage, the Hub sending the model 2.4 times: a trial)
        offered = set(held)
        if offered and request.headers.get(DIGESTS_HEADER) == "1":
            digests = [log.logged[index] if index in offered else None for index in range(count)]
    else:
        raise NotFoundError(f"blob {sha256} is not in the store")
    return json_response(
        {
            "sha256": sha256,
            "size": size,
            "chunk_size": chunk_size,
            "complete": complete,
            "chunks": bitfield(held, count),
            **({"blake3": digests} if digests else {}),
        }
    )


async def inventory(request: web.Request) -> web.Response:
    """The servable blobs by digest, a page at a time: ``after`` a digest (or its start; the last of the page
    before, as ``next`` names it), ``limit`` blobs at most. An ``after`` in capitals would have paged
    silently wrong (the index compares digests as text, in lowercase); a repeated ``limit`` took the first."""
    query = checked_query(request, ("after", "limit"))
    after = query.get("after", "")
    if not _AFTER.fullmatch(after):
        raise InvalidInputError(
            f"after: must be a blob's SHA-256 or its start (lowercase hex, at most 64 characters), "
            f"got {after[:40]!r}"
        )
    raw_limit = query.get("limit", str(INVENTORY_PAGE))
    if not _INDEX.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= INVENTORY_PAGE:
        raise InvalidInputError(
            f"limit: must be a whole number from 1 to {INVENTORY_PAGE}, got {raw_limit[:40]!r}"
        )
    limit = int(raw_limit)
    blobs = await asyncio.to_thread(_depot(request).store.inventory, after, limit, not is_authorized(request))
    body: dict[str, Any] = {"blobs": [b.to_dict() for b in blobs]}
    if len(blobs) == limit:
        body["next"] = str(request_url(request).update_query(after=blobs[-1].sha256))
    return json_response(body)


async def stats(request: web.Request) -> web.Response:
    checked_query(request)
    body = await asyncio.to_thread(_stats, _depot(request), is_authorized(request), request.app[COMMITS])
    return json_response({"uptime_seconds": round(time.monotonic() - request.app[STARTED], 3), **body})


MOST_ACCESSED = 5  # as many as the preloader's stats list
RECENT_EVICTIONS = 50  # the disk budget's latest evictions the stats list


def _stats(depot: Depot, authorized: bool, cache: CommitCache[Any]) -> dict[str, Any]:
    """The stats body. Without the token every figure counts public repos alone (those in the store and not
    private; a removed repo, which may have been private, is never named), and what cannot be split per
    repo is null."""
    totals = cache.figures(
        ("totals", authorized), lambda: store_totals(depot.store, public_only=not authorized)
    )
    budget = depot.budget_status(fresh=False).to_dict()
    preload = depot.preloader.stats()
    engines = depot.engines.stats().to_dict()
    figures = {k: v for k, v in preload.to_dict().items() if k not in ("preloaded", "most_accessed")}
    if authorized:
        models, most_accessed = list(preload.preloaded), list(preload.most_accessed)
    else:
        visible = set(totals.repo_ids)
        models = [p for p in preload.preloaded if p.repo_id in visible]
        most_accessed = depot.store.access.top(MOST_ACCESSED, public_only=True)
        ram = (
            preload.ram_bytes
            if len(models) == len(preload.preloaded)
            else sum(m.resident_bytes for m in models)
        )
        figures.update(dict.fromkeys(WITHHELD_PRELOAD), ram_bytes=ram)
        # load() keys an engine by its revision and store; one cached under another key names no repo
        loaded = depot.engines.keys()  # a list (the cache is no mapping)
        revisions = (engine_revision(key, depot.store) for key in loaded)
        public = sum(1 for revision in revisions if revision is not None and revision[0] in visible)
        engines = {**dict.fromkeys(engines), "cached_models": public}
    return {
        "repos": len(totals.repo_ids),
        "blobs": totals.blobs,
        "blob_bytes": totals.blob_bytes,
        "logical_bytes": totals.logical_bytes,
        "quarantined_blobs": totals.quarantined_blobs,
        "preload": {**figures, "models": [_listed(m) for m in models]},
        "most_accessed": [a.to_dict() for a in most_accessed],
        "engines": engines,
        # the disk budget; without the token only the budget itself (the rest counts private repos too)
        "budget": budget if authorized else {**dict.fromkeys(budget), "max_bytes": budget["max_bytes"]},
        # what the store takes beside its budget, and the room left (a full disk, interrupted downloads and a
        # failing disk's corrupt copies were on no card of the dashboard: an explorer's trial)
        "disk": {
            "free_bytes": depot.store.layout.free_bytes(),
            "partial_bytes": partial_bytes(depot.store) if authorized else None,
            "quarantine_bytes": quarantine_bytes(depot.store) if authorized else None,
        },
        # what it evicted lately, newest first (a model evicted weeks ago read "not in the store yet" on the
        # dashboard, an explorer's trial); without the token none (an evicted repo may have been private)
        "recent_evictions": [e.to_dict() for e in depot.evictions(limit=RECENT_EVICTIONS)]
        if authorized
        else None,
    }


def _listed(model: PreloadInfo) -> dict[str, Any]:
    """A preloaded model as the stats list it: without ``already``, which answers a preload call (in a
    listing it would always be true)."""
    return {k: v for k, v in model.to_dict().items() if k != "already"}


async def openapi(request: web.Request) -> web.Response:
    checked_query(request)
    return json_response(openapi_document(__version__))


def add_native_routes(app: web.Application) -> None:
    app[STARTED] = time.monotonic()
    app[STOPPING] = asyncio.Event()
    app[LOOKS] = SharedLooks(lambda: app[COMMITS].version())  # (COMMITS: made with the Hub's routes)

    async def stop_streams(app: web.Application) -> None:
        app[STOPPING].set()

    app.on_shutdown.append(stop_streams)
    app.router.add_get(HEALTH_PATH, health)
    app.router.add_get(f"{API}/info", node_info)
    app.router.add_get(f"{API}/repos", list_repos)
    app.router.add_get(API + "/repos/{org}/{name}/revisions/{rev}/manifest", manifest)
    app.router.add_get(API + "/repos/{org}/{name}/manifest", pull_manifest)
    app.router.add_get(f"{API}/events", events)
    app.router.add_get(API + "/blobs/{sha256}", read_blob)
    app.router.add_get(API + "/blobs/{sha256}/chunks", chunk_map)
    app.router.add_get(API + "/blobs/{sha256}/chunks/{index}", read_chunk)
    app.router.add_get(f"{API}/inventory", inventory)
    app.router.add_get(f"{API}/stats", stats)
    app.router.add_get(f"{API}/peers", peers)
    app.router.add_get(f"{API}/openapi.json", openapi)
