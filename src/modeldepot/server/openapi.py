"""The OpenAPI 3.1 description of ``/api/depot/v1`` and ``/metrics`` (served at
``/api/depot/v1/openapi.json``).

What a route answers with a dataclass's ``to_dict()`` (``dataclasses.asdict``) is described by a schema
made from that dataclass: its fields and their resolved type hints, every field required and no other key
allowed. A field added to ``RepoSummary``, ``FileEntry``, the hub ``Manifest`` or the preload and engine
stats appears in the document by itself. Only the bodies the routes build by hand are written out here
(health, node info, the revision manifest's wrapper, the inventory page, the stats body, errors), each
closed the same way; ``tests/test_openapi.py`` checks every route's answers against this document on a
live node, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from modeldepot.discovery.base import ClusterStatus
from modeldepot.engines.cache import CacheStats
from modeldepot.hub.manifest import Manifest, RemoteFile, Variant
from modeldepot.preload.copies import STRATEGIES
from modeldepot.preload.preloader import PreloadInfo, PreloadStats
from modeldepot.store.access import ModelAccess
from modeldepot.store.budget import BudgetStatus, Eviction
from modeldepot.store.maintenance import RemoveResult, StoreTotals
from modeldepot.store.manifests import STATUSES
from modeldepot.store.models import BlobRecord, FileEntry, RepoSummary
from modeldepot.store.pins import Pin
from modeldepot.transfer.fleet import PeerRow
from modeldepot.transfer.pull import PullResult
from modeldepot.validation import MAX_REPO_PART_LENGTH

__all__ = ["ComponentSchemas", "openapi_document"]

REF = "#/components/schemas/"
_HEX64 = {"pattern": "^[0-9a-f]{64}$"}
_SHA256 = {"type": "string", **_HEX64}
_SEGMENT = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$", "maxLength": MAX_REPO_PART_LENGTH}

# Component names that are not the dataclass's own (the hub's Manifest is a pull manifest here: "Manifest"
# names the revision manifest the node builds from its store).
NAMES: dict[type, str] = {Manifest: "PullManifest"}
# What a field's type cannot say: its format or its values, per dataclass and field.
REFINE: dict[type, dict[str, dict[str, Any]]] = {
    BlobRecord: {"sha256": _HEX64},
    FileEntry: {"sha256": _HEX64},
    RemoteFile: {"sha256": _HEX64},
    Variant: {"status": {"enum": list(STATUSES)}},
    PreloadInfo: {"strategy": {"enum": list(STRATEGIES)}},
    PreloadStats: {"strategy": {"enum": list(STRATEGIES)}},
}
# Stats figures of the whole node that no repo can be told apart in: null in an answer to a request without
# the token, since private repos' use moves them too (native_routes._stats fills them so).
WITHHELD_PRELOAD = ("hits", "misses", "hit_rate", "evictions", "avg_load_seconds_preloaded",
                    "avg_load_seconds_cold")  # fmt: skip
_SCALARS: dict[Any, str] = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


def _closed(properties: dict[str, Any], required: Iterable[str] | None = None) -> dict[str, Any]:
    """An object with exactly these keys (all required unless ``required`` names fewer), and no other."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
        "additionalProperties": False,
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    if isinstance(kind, list):
        return {**schema, "type": [*kind, *(["null"] if "null" not in kind else [])]}
    return {"anyOf": [schema, {"type": "null"}]}


class ComponentSchemas:
    """The document's component schemas. A dataclass's schema is made the first time something refers
    to it (``ref``), under its name (or its ``NAMES`` entry); two schemas under one name are an error."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}
        self._names: dict[type, str] = {}

    def add(self, name: str, schema: dict[str, Any]) -> dict[str, Any]:
        """Register a schema under ``name``; returns a reference to it."""
        if name in self.schemas:
            raise ValueError(f"two component schemas are named {name!r}")
        self.schemas[name] = schema
        return {"$ref": REF + name}

    def ref(self, cls: type) -> dict[str, Any]:
        """A reference to the schema of dataclass ``cls`` (made now if it is new)."""
        name = self._names.get(cls)
        if name is None:
            name = self._names[cls] = NAMES.get(cls, cls.__name__)
            self.add(name, {})  # claim the name first: a dataclass may refer to itself
            self.schemas[name] = self.record(cls)
        return {"$ref": REF + name}

    def record(
        self,
        cls: type,
        *,
        only: Iterable[str] | None = None,
        omit: Iterable[str] = (),
        nullable: Iterable[str] = (),
        add: Mapping[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The schema of ``dataclasses.asdict`` of a ``cls``: one required property per field, no other.

        For an answer built from a dataclass by a route: ``only``/``omit`` keep or drop fields, ``nullable``
        fields may be null, ``add`` puts more (required) properties. Every field named must exist, so a
        renamed field breaks the document instead of silently leaving it."""
        names = [f.name for f in dataclasses.fields(cls)]
        kept = names if only is None else list(only)
        omitted, nulls, refined = set(omit), set(nullable), REFINE.get(cls, {})
        unknown = (set(kept) | omitted | nulls | set(refined)) - set(names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
        hints = get_type_hints(cls)
        properties: dict[str, Any] = {}
        for name in kept:
            if name in omitted:
                continue
            schema = {**self.of_type(hints[name]), **refined.get(name, {})}
            properties[name] = _nullable(schema) if name in nulls else schema
        properties.update(add or {})
        return _closed(properties)

    def field(self, cls: type, name: str) -> dict[str, Any]:
        """The schema of one field of dataclass ``cls``."""
        return self.record(cls, only=[name])["properties"][name]  # type: ignore[no-any-return]

    def of_type(self, hint: Any) -> dict[str, Any]:
        """The JSON schema of what ``dataclasses.asdict`` and ``json.dumps`` make of a value of type ``hint``."""
        if hint is Any:
            return {}
        if hint in _SCALARS:
            return {"type": _SCALARS[hint]}
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self.ref(hint)
        origin, args = get_origin(hint), get_args(hint)
        if origin is Union or origin is types.UnionType:
            members = [self.of_type(arg) for arg in args]
            if all(set(m) == {"type"} and isinstance(m["type"], str) for m in members):
                return {"type": [m["type"] for m in members]}
            return {"anyOf": members}
        if origin is Literal:
            return {"enum": list(args)}
        if origin is list and len(args) == 1:
            return {"type": "array", "items": self.of_type(args[0])}
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": self.of_type(args[0])}
        if origin is tuple and args and Ellipsis not in args:
            items = [self.of_type(arg) for arg in args]
            return {"type": "array", "prefixItems": items, "minItems": len(items), "items": False}
        if origin is dict and len(args) == 2 and args[0] is str:
            values = self.of_type(args[1])
            return {"type": "object", **({"additionalProperties": values} if values else {})}
        raise TypeError(f"no JSON schema for the type {hint!r}: describe it in server/openapi.py")


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _components() -> ComponentSchemas:
    """Every component schema: the dataclasses' made from them, the hand-built bodies written here."""
    c = ComponentSchemas()
    c.add("Error", _closed({"error": {"type": "string"}}))
    c.ref(ClusterStatus)
    c.add(
        "Health",
        _closed(
            {
                "status": {
                    "enum": ["ok", "degraded"],
                    "description": "degraded: the fleet's registry cannot be reached, this node is not "
                    "registered in it, or it could not reach itself at the URL its peers are given (files are "
                    "still served); or files of its store failed verification (the others are served); or its "
                    "store's disk is full (what it holds is served)",
                },
                "node_id": {
                    "type": "string",
                    "description": "the node's id in its fleet (its store's); absent on a node served without a "
                    "cluster",
                },
                "detail": {"type": "string", "description": "why it is degraded"},
                "fleet_detail": {"type": "string", "description": "why its place in the fleet is degraded"},
                "quarantined_files": {
                    "type": "integer",
                    "description": "files of its store that failed verification: not served until pulled again",
                },
                "disk_free_bytes": {
                    "type": "integer",
                    "description": "the bytes free on its store's disk, when under 1 MiB: pulls and other "
                    "writes fail until room is made (what it holds is served)",
                },
                "cluster": {
                    **c.ref(ClusterStatus),
                    "description": "how this node's view of its fleet stands; absent on a node served "
                    "without a cluster",
                },
            },
            required=["status"],
        ),
    )
    c.add(
        "NodeInfo",
        _closed(
            {
                "id": {"type": "string"},
                "version": {"type": "string"},
                "chunk_size": {"type": "integer"},
                "capabilities": {"type": "array", "items": {"type": "string"}},
                "hub_api": {"type": "boolean"},
                "read_only": {
                    "type": "boolean",
                    "description": "The store is read-only here (a read-only mount, or another user's "
                    "files): it serves what it holds, and refuses pulls, pins and removals (503 ReadOnlyStore)",
                },
            }
        ),
    )
    c.ref(RepoSummary)
    c.ref(PeerRow)
    manifest_file = c.record(
        FileEntry,
        add={
            "etag": {"type": "string", "description": "SHA-256 for LFS files, else the git blob SHA-1"},
            "chunks": {"type": "array", "items": {**_SHA256}, "description": "BLAKE3 of each chunk"},
        },
    )
    c.add("ManifestFile", manifest_file)
    c.add(
        "Manifest",
        _closed(
            {
                "repo_id": c.field(FileEntry, "repo_id"),
                "commit_id": c.field(FileEntry, "commit_id"),
                "private": c.field(RepoSummary, "private"),
                "files": {"type": "array", "items": {"$ref": REF + "ManifestFile"}},
            }
        ),
    )
    c.ref(Manifest)
    c.add(
        "GoneEvent",
        c.record(
            Variant,
            only=[],
            add={"repo_id": c.field(Manifest, "repo_id"), "variant": c.field(Variant, "name")},
        ),
    )
    c.add(
        "VariantEvent",
        c.record(
            Variant,
            only=[
                "status",
                "bytes_done",
                "total_bytes",
                "error",
                "resumable",
                "bytes_by_source",
                "held_commit",
            ],
            add={
                "repo_id": c.field(Manifest, "repo_id"),
                "commit_id": c.field(Manifest, "commit_id"),
                "variant": c.field(Variant, "name"),
            },
        ),
    )
    c.add(
        "Inventory",
        _closed(
            {
                "blobs": {"type": "array", "items": c.ref(BlobRecord)},
                "next": {"type": "string", "description": "the next page's URL; absent on the last page"},
            },
            required=["blobs"],
        ),
    )
    # (a listed model has no `already`: it answers a preload call)
    preloaded = c.add("PreloadedModel", c.record(PreloadInfo, omit=["already"]))
    c.add(
        "StatsPreload",
        c.record(
            PreloadStats,
            omit=["preloaded", "most_accessed"],
            nullable=WITHHELD_PRELOAD,
            add={"models": {"type": "array", "items": preloaded}},
        ),
    )
    engine_figures = [f.name for f in dataclasses.fields(CacheStats)]
    c.add(
        "StatsEngines",
        c.record(CacheStats, nullable=[name for name in engine_figures if name != "cached_models"]),
    )
    c.add(
        "Stats",
        _closed(
            {
                "uptime_seconds": {"type": "number"},
                "repos": {
                    "type": "integer",
                    "description": "repos in the store (public ones alone without the token)",
                },
                **c.record(StoreTotals, omit=["repo_ids"])["properties"],
                "preload": {"$ref": REF + "StatsPreload"},
                "most_accessed": {"type": "array", "items": c.ref(ModelAccess)},
                "engines": {"$ref": REF + "StatsEngines"},
                "budget": {"$ref": REF + "StatsBudget"},
                "disk": {"$ref": REF + "StatsDisk"},
                "recent_evictions": _nullable(
                    {
                        "type": "array",
                        "items": c.ref(Eviction),
                        "description": "the disk budget's latest evictions, newest first (null without the token)",
                    }
                ),
            }
        ),
    )
    c.add("StatsBudget", c.record(BudgetStatus, nullable=[f.name for f in dataclasses.fields(BudgetStatus)]))
    c.add(
        "StatsDisk",
        _closed(
            {
                "free_bytes": _nullable(
                    {"type": "integer", "description": "free on the store's file system (null: unknown)"}
                ),
                "partial_bytes": _nullable(
                    {
                        "type": "integer",
                        "description": "downloads in progress or kept for a resume, beside the disk budget "
                        "(null without the token)",
                    }
                ),
                "quarantine_bytes": _nullable(
                    {
                        "type": "integer",
                        "description": "blobs found corrupt, moved aside until `gc` or a restore, beside the "
                        "disk budget (null without the token)",
                    }
                ),
            }
        ),
    )
    _control_components(c)
    return c


def openapi_document(version: str) -> dict[str, Any]:
    components = _components()

    def ok(name: str) -> dict[str, Any]:
        return _json({"$ref": REF + name})

    repo_params = [_path_param("org", _SEGMENT), _path_param("name", _SEGMENT)]
    blob_param = _path_param("sha256", _SHA256)
    error = _json({"$ref": REF + "Error"}, "Error")

    def errors(*statuses: int) -> dict[str, Any]:
        return {str(status): error for status in statuses}

    blob_bytes = {
        "description": "Bytes",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "modeldepot node API",
            "version": version,
            "description": "Every route under /api/depot/v1 takes only the query parameters it lists, each once: "
            "any other, one given twice, or a bad value of one it lists is a 400 whose message names it.",
        },
        "paths": {
            "/api/depot/v1/health": {
                "get": {
                    "operationId": "health",
                    "description": "Needs no token, even on a node that has one.",
                    "responses": {"200": ok("Health"), **errors(400)},
                }
            },
            "/api/depot/v1/info": {
                "get": {"operationId": "nodeInfo", "responses": {"200": ok("NodeInfo"), **errors(400, 401)}}
            },
            "/api/depot/v1/repos": {
                "get": {
                    "operationId": "listRepos",
                    "description": "Answered with an ETag of the list (the token's view and the public one "
                    "have their own): sent back in If-None-Match, it gets a 304 while the list stands. Not on "
                    "a node that lists shared stores too.",
                    "responses": {
                        "200": _json({"type": "array", "items": {"$ref": REF + "RepoSummary"}}),
                        "304": {"description": "The list the ETag names still stands"},
                        **errors(400, 401),
                    },
                }
            },
            "/api/depot/v1/repos/{org}/{name}/revisions/{rev}/manifest": {
                "get": {
                    "operationId": "manifest",
                    "parameters": [*repo_params, _path_param("rev", {"type": "string", "maxLength": 200})],
                    "responses": {"200": ok("Manifest"), **errors(400, 401, 404)},
                }
            },
            "/api/depot/v1/repos/{org}/{name}/manifest": {
                "get": {
                    "operationId": "pullManifest",
                    "description": "The saved scan of an upstream repo: variants, statuses, live progress; for a "
                    "repo held but never scanned (imported), its main revision's files as held (endpoint "
                    "'this store (imported)').",
                    "parameters": repo_params,
                    "responses": {"200": ok("PullManifest"), **errors(400, 401, 404)},
                }
            },
            "/api/depot/v1/events": {
                "get": {
                    "operationId": "events",
                    "description": "Server-sent events, endless: a `variant` event (JSON data, `x-event-data`) "
                    "per variant on connect, closed by one `snapshot` event (a client drops what it showed from "
                    "an earlier stream that this one did not list), then per change of status or progress; a "
                    "`gone` event for a variant no longer listed (its repo removed); a comment line as heartbeat.",
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {
                                "text/event-stream": {
                                    "schema": {"type": "string"},
                                    "x-event-data": {
                                        "variant": {"$ref": REF + "VariantEvent"},
                                        "gone": {"$ref": REF + "GoneEvent"},
                                        "snapshot": {
                                            "type": "object",
                                            "properties": {"variants": {"type": "integer", "minimum": 0}},
                                            "required": ["variants"],
                                            "additionalProperties": False,
                                        },
                                    },
                                }
                            },
                        },
                        **errors(400, 401),
                    },
                }
            },
            "/api/depot/v1/blobs/{sha256}": {
                "get": {
                    "operationId": "readBlob",
                    "description": "The blob's bytes; one Range per request (206), 416 when unsatisfiable. "
                    "With the token, a Range inside the chunks of a file the node is still downloading is "
                    "answered too (206); a request for it without a Range, or touching a chunk the node lacks "
                    "or whose bytes fail their check, is a 404 with X-Error-Code ChunkNotAvailable.",
                    "parameters": [
                        blob_param,
                        {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": blob_bytes,
                        "206": blob_bytes,
                        "416": {"description": "Range not satisfiable"},
                        **errors(400, 401, 404, 503),
                    },
                }
            },
            "/api/depot/v1/blobs/{sha256}/chunks": {
                "get": {
                    "operationId": "chunkMap",
                    "description": "Which chunks the node has: every one of a complete blob; of a file it is "
                    "still downloading (to requests with the token only), those its download log names. "
                    "`chunks` is a bitfield in base64: chunk i is bit i % 8 of byte i // 8, most significant "
                    "bit first, ceil(n / 8) bytes for n chunks. A complete blob's `blake3` lists the "
                    "BLAKE3 of each chunk, in order (a peer that found the blob by content checks each "
                    "chunk it takes against them); a download's, asked with `X-Chunk-Digests: 1`, of each chunk "
                    "it offers, null for the others (taken while the registry's settlements cannot be read).",
                    "parameters": [blob_param],
                    "responses": {
                        "200": _json(
                            _closed(
                                {
                                    "sha256": _SHA256,
                                    "size": {"type": "integer", "minimum": 0},
                                    "chunk_size": {"type": "integer", "minimum": 1},
                                    "complete": {"type": "boolean"},
                                    "chunks": {"type": "string", "contentEncoding": "base64"},
                                    "blake3": {
                                        "type": "array",
                                        "items": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
                                    },
                                },
                                required=("sha256", "size", "chunk_size", "complete", "chunks"),
                            )
                        ),
                        **errors(400, 401, 404, 503),
                    },
                }
            },
            "/api/depot/v1/blobs/{sha256}/chunks/{index}": {
                "get": {
                    "operationId": "readChunk",
                    "description": "One chunk; its BLAKE3 digest is in X-Chunk-Blake3. A chunk of a file the "
                    "node is still downloading (with the token) that it lacks, or whose bytes fail their "
                    "check, is a 404 with X-Error-Code ChunkNotAvailable.",
                    "parameters": [blob_param, _path_param("index", {"type": "integer", "minimum": 0})],
                    "responses": {"200": blob_bytes, **errors(400, 401, 404, 503)},
                }
            },
            "/api/depot/v1/inventory": {
                "get": {
                    "operationId": "inventory",
                    "parameters": [
                        {
                            "name": "after",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "pattern": "^[0-9a-f]{0,64}$", "maxLength": 64},
                            "description": "a blob's SHA-256, or its start, in lowercase: the page lists the blobs "
                            "whose digests come after it (`next` names the last one of this page)",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                    ],
                    "responses": {"200": ok("Inventory"), **errors(400, 401)},
                }
            },
            "/api/depot/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "responses": {
                        "200": _json(
                            _closed(
                                {
                                    "openapi": {"type": "string"},
                                    "info": {"type": "object"},
                                    "paths": {"type": "object"},
                                    "components": {"type": "object"},
                                }
                            )
                        ),
                        **errors(400, 401),
                    },
                }
            },
            "/api/depot/v1/peers": {
                "get": {
                    "operationId": "peers",
                    "description": "The fleet's live nodes as this node's view of its registry has them, "
                    "this node included, by node id; each with the contents it holds whole (`blobs`, `bytes`) "
                    "and in progress (`partial`). `last_seen`: now while the view is connected to the "
                    "registry, else when it lost it. Empty on a node served without a cluster.",
                    "responses": {
                        "200": _json({"type": "array", "items": {"$ref": REF + "PeerRow"}}),
                        **errors(400, 401),
                    },
                }
            },
            "/api/depot/v1/stats": {
                "get": {
                    "operationId": "stats",
                    "description": "Without the token, figures count public repos alone, and the node-wide "
                    "counters that cannot be split per repo are null.",
                    "responses": {"200": ok("Stats"), **errors(400, 401)},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "description": "Prometheus metrics in the text exposition format (OpenMetrics when the "
                    "Accept header asks for application/openmetrics-text): the store (`modeldepot_repos`, "
                    "`modeldepot_store_bytes`, `modeldepot_store_budget_bytes`, 0 for no budget, "
                    "`modeldepot_evictions_total`), this node's answers "
                    "(`modeldepot_http_requests_total{route,status}` by route pattern, "
                    "`modeldepot_http_answers_cut_total{route}`, "
                    "`modeldepot_http_sent_bytes_total`), this process's pulls "
                    "(`modeldepot_pull_bytes_total{source}`, `modeldepot_chunks_rejected_total`), the RAM "
                    "tier, the engine cache and the fleet (`modeldepot_peers`); see docs/architecture.md. "
                    "Node-wide figures, private repos included (no label names a repo): a node with a token "
                    "shows them to requests with it only.",
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **errors(401),
                    },
                }
            },
            **_control_paths(repo_params, errors),
        },
        "components": {"schemas": components.schemas},
    }


# -- the control routes (server/control_routes.py) ----------------------------------------------------------

_QUANT = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"}
_CONTROL = (
    "A control route: requests need the control token as Authorization: Bearer, else 401. On a node with a "
    "token, that is its token; on a node without one (whose reads are open), a token it makes when it starts, "
    "which `modeldepot serve` prints in the dashboard's address (http://HOST:PORT/#token=...). What is wrong "
    "in the URL (the repo id in the path, a query parameter the route does not take or a bad value of one it "
    "takes) or in the body's shape (not a JSON object, an unknown key) is a 400; a body field with a wrong "
    "value a 422; each message names the field. An optional field sent as null is its default."
)
_REVISION = {
    "type": ["string", "null"],
    "maxLength": 200,
    "default": "main",
    "description": "a branch, tag or commit id (its start will do); null or absent: main",
}


def _control_components(c: ComponentSchemas) -> None:
    c.add(
        "PullRequest",
        _closed(
            {
                "repo": {
                    "type": "string",
                    "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$",
                    "maxLength": 2 * MAX_REPO_PART_LENGTH + 1,  # (the Hub's limit is of each part)
                    "description": "the repo id, as the node's upstreams know it",
                },
                "revision": _REVISION,
                "quants": {
                    "anyOf": [
                        {"type": "array", "items": _QUANT, "minItems": 1, "maxItems": 64},
                        {"const": "all"},
                        {"type": "null"},
                    ],
                    "description": 'variant names (with the shared files), "all" for every variant, or null '
                    "(the default) for the whole repo",
                },
            },
            required=["repo"],
        ),
    )
    c.add(
        "VariantTarget",
        _closed(
            {
                "quant": {
                    **_nullable(_QUANT),
                    "description": "one variant (and the shared files); null or absent: all",
                },
                "revision": _REVISION,
            },
            required=[],
        ),
    )
    c.add(
        "PullJob",
        _closed(
            {
                "id": {"type": "string"},
                "repo": {"type": "string"},
                "revision": {"type": "string"},
                "quants": {
                    "anyOf": [
                        {"type": "array", "items": {"type": "string"}},
                        {"const": "all"},
                        {"type": "null"},
                    ],
                    "description": "the variants by the repo's own names; null: the whole repo",
                },
                "commit_id": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
                "state": {"enum": ["running", "done", "failed", "cancelled"]},
                "bytes_done": {"type": "integer", "minimum": 0},
                "bytes_total": {"type": "integer", "minimum": 0},
                "started_at": {"type": "number"},
                "finished_at": {"type": ["number", "null"]},
                "result": {"anyOf": [c.ref(PullResult), {"type": "null"}], "description": "once done"},
                "error": {"type": ["string", "null"], "description": "why it failed"},
                "idle_seconds": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "description": "while running: seconds since its bytes last moved (waiting on its sources)",
                },
                "waiting_on": {
                    "type": ["string", "null"],
                    "description": "while running: the file another process is downloading, which it waits for",
                },
            }
        ),
    )
    c.ref(PreloadInfo)
    c.ref(Pin)
    c.add(
        "RemoveResult", c.record(RemoveResult, omit=["deleted"])
    )  # (what it deleted: read by the depot alone)
    # What an unload and an unpin answer: the model they were asked of, and whether there was one to undo
    for name, done, description in (
        ("Unloaded", "unloaded", "false: the node holds the repo, and that model was not in RAM"),
        ("Unpinned", "unpinned", "false: the node holds the repo, but there was no such pin"),
    ):
        c.add(name, _closed({
            "repo_id": {"type": "string"},
            "quant": {"type": ["string", "null"]},
            "revision": {"type": "string"},
            done: {"type": "boolean", "description": description},
        }))  # fmt: skip


def _control_paths(
    repo_params: list[dict[str, Any]], errors: Callable[..., dict[str, Any]]
) -> dict[str, Any]:
    def ok(name: str, description: str = "OK") -> dict[str, Any]:
        return _json({"$ref": REF + name}, description)

    def body(name: str, required: bool) -> dict[str, Any]:
        return {"required": required, "content": {"application/json": {"schema": {"$ref": REF + name}}}}

    # The URL or the body's shape (400), a body too big (413), not JSON (415), a bad field (422).
    shape = (400, 413, 415, 422)
    variant_target = body("VariantTarget", False)
    return {
        "/api/depot/v1/pulls": {
            "get": {
                "operationId": "listPulls",
                "description": f"The pulls started over HTTP since the node started, newest first. {_CONTROL}",
                "responses": {
                    "200": _json({"type": "array", "items": {"$ref": REF + "PullJob"}}),
                    **errors(400, 401),
                },
            },
            "post": {
                "operationId": "startPull",
                "description": "Scan the repo through the node's own source chain (its servers, its fleet, its Hub "
                "endpoint: a request never names where to pull from) and pull the variants in the background: "
                "202 and the new pull; 200 and the running one when the same repo, revision and variants are "
                "already being pulled. Progress: this pull's route and the event stream. An unknown repo is a "
                "404, a variant the repo lacks a 422, an upstream that fails a 502 (that does not answer in "
                "time a 504), an offline node a 503, a full disk or a disk budget that cannot hold it (the scan is saved) a "
                "507. " + _CONTROL,
                "requestBody": body("PullRequest", True),
                "responses": {
                    "200": ok("PullJob", "The same pull, already running"),
                    "202": ok("PullJob", "Started"),
                    **errors(401, 404, 502, 503, 504, 507, *shape),
                },
            },
        },
        "/api/depot/v1/pulls/{id}": {
            "get": {
                "operationId": "getPull",
                "description": "One pull: running, done (with its result), failed (with the error) or cancelled. "
                + _CONTROL,
                "parameters": [_path_param("id", {"type": "string", "maxLength": 64})],
                "responses": {"200": ok("PullJob"), **errors(400, 401, 404)},
            },
            "delete": {
                "operationId": "cancelPull",
                "description": "Stop a running pull and wait until it has: 200 and the pull, cancelled (what it "
                "received is kept: a pull of the same again resumes), or done without a result when it was asked as "
                "the pull published its files, which is not cut. A pull that already ended is a 409. "
                + _CONTROL,
                "parameters": [_path_param("id", {"type": "string", "maxLength": 64})],
                "responses": {"200": ok("PullJob"), **errors(400, 401, 404, 409)},
            },
        },
        "/api/depot/v1/pins": {
            "get": {
                "operationId": "listPins",
                "description": "What the disk budget never evicts. Without the token, the pins of public "
                "repos alone.",
                "responses": {
                    "200": _json({"type": "array", "items": {"$ref": REF + "Pin"}}),
                    **errors(400, 401),
                },
            }
        },
        "/api/depot/v1/repos/{org}/{name}/preload": {
            "post": {
                "operationId": "preload",
                "description": "Bring a stored model (a variant with the shared files, or every file) into the "
                "RAM tier. A model larger than the RAM tier's budget is a 400; one with a file that failed "
                "verification (quarantined) a 503, X-Error-Code CorruptFile; one a tier of private copies (`read`, "
                "`memfd`) cannot hold and leave its process the memory it keeps free a 503, InsufficientMemory. "
                f"{_CONTROL}",
                "parameters": repo_params,
                "requestBody": variant_target,
                "responses": {"200": ok("PreloadInfo"), **errors(401, 404, 405, 503, *shape)},
            },
            "delete": {
                "operationId": "unload",
                "description": "Take a model out of the RAM tier: at once, or when the last request reading it "
                "ends; with no `quant`, every model of the revision (all its files, or any variant). 200 with "
                "`unloaded` false when the node holds the repo but that model was not in RAM. " + _CONTROL,
                "parameters": repo_params,
                "requestBody": variant_target,
                "responses": {"200": ok("Unloaded"), **errors(401, 404, 405, *shape)},
            },
        },
        "/api/depot/v1/repos/{org}/{name}/pin": {
            "put": {
                "operationId": "pin",
                "description": "Keep the revision (a branch is followed) from eviction. Pinning again what is "
                f"pinned changes nothing (`created_at` stays when it was first pinned). {_CONTROL}",
                "parameters": repo_params,
                "requestBody": variant_target,
                "responses": {"200": ok("Pin"), **errors(401, 404, 405, 503, 507, *shape)},
            },
            "delete": {
                "operationId": "unpin",
                "description": "Remove a pin (its variant in any case, a commit by its start, as the pin took "
                "them): 200 with `unpinned` false when the node holds the repo but there was no such pin, 404 "
                f"when it does not hold the repo (and had no such pin). {_CONTROL}",
                "parameters": repo_params,
                "requestBody": variant_target,
                "responses": {"200": ok("Unpinned"), **errors(401, 404, 405, 503, 507, *shape)},
            },
        },
        "/api/depot/v1/repos/{org}/{name}": {
            "delete": {
                "operationId": "removeRepo",
                "description": "Remove the repo, or one revision of it, or one variant of a revision (`quant`: "
                "its own files; the shared ones and the other variants stay, as `modeldepot rm --quant`); blobs "
                "nothing else uses are deleted at once. 404 for a variant the revision lacks. A repo the node holds nothing of but its saved scan: the scan goes (`scan_forgotten`). 409 "
                "while a pull of the repo runs on the node (it would publish the repo again); 503 on a read-only "
                f"store. {_CONTROL}",
                "parameters": [
                    *repo_params,
                    {
                        "name": "revision",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "maxLength": 200},
                        "description": "one revision (a branch, tag or commit id) to remove; absent: the repo",
                    },
                    {
                        "name": "quant",
                        "in": "query",
                        "required": False,
                        "schema": _QUANT,
                        "description": "one variant of the revision (main unless named) to remove",
                    },
                ],
                "requestBody": {
                    "required": False,
                    "description": "the revision and the variant may be named here instead, as the pins' routes "
                    "take them (both: they must agree)",
                    "content": {
                        "application/json": {
                            "schema": _closed(
                                {"revision": _REVISION, "quant": _nullable(_QUANT)}, required=[]
                            )
                        }
                    },
                },
                "responses": {"200": ok("RemoveResult"), **errors(401, 404, 405, 409, 422, 503, 507, *shape)},
            }
        },
    }
