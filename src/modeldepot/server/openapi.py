"""The OpenAPI 3.1 description of ``/api/depot/v1`` (served at ``/api/depot/v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_document"]

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_SEGMENT = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$", "maxLength": 96}
_ERROR = {
    "description": "Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_BYTES = {
    "description": "Bytes",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def openapi_document(version: str) -> dict[str, Any]:
    repo_params = [_path_param("org", _SEGMENT), _path_param("name", _SEGMENT)]
    blob_param = _path_param("sha256", _SHA256)
    errors = {"400": _ERROR, "401": _ERROR, "404": _ERROR, "503": _ERROR}
    return {
        "openapi": "3.1.0",
        "info": {"title": "modeldepot node API", "version": version},
        "paths": {
            "/api/depot/v1/health": {
                "get": {"operationId": "health", "responses": {"200": _json({"type": "object"})}}
            },
            "/api/depot/v1/info": {
                "get": {
                    "operationId": "nodeInfo",
                    "responses": {"200": _json({"$ref": "#/components/schemas/NodeInfo"}), **errors},
                }
            },
            "/api/depot/v1/repos": {
                "get": {
                    "operationId": "listRepos",
                    "responses": {
                        "200": _json(
                            {"type": "array", "items": {"$ref": "#/components/schemas/RepoSummary"}}
                        ),
                        **errors,
                    },
                }
            },
            "/api/depot/v1/repos/{org}/{name}/revisions/{rev}/manifest": {
                "get": {
                    "operationId": "manifest",
                    "parameters": [*repo_params, _path_param("rev", {"type": "string", "maxLength": 200})],
                    "responses": {"200": _json({"$ref": "#/components/schemas/Manifest"}), **errors},
                }
            },
            "/api/depot/v1/repos/{org}/{name}/manifest": {
                "get": {
                    "operationId": "pullManifest",
                    "description": "The saved scan of an upstream repo: variants, statuses, live progress.",
                    "parameters": repo_params,
                    "responses": {"200": _json({"$ref": "#/components/schemas/PullManifest"}), **errors},
                }
            },
            "/api/depot/v1/events": {
                "get": {
                    "operationId": "events",
                    "description": "Server-sent events, endless: a `variant` event (JSON data) per variant on "
                    "connect and per change of status or progress; a comment line as heartbeat.",
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "401": _ERROR,
                    },
                }
            },
            "/api/depot/v1/blobs/{sha256}": {
                "get": {
                    "operationId": "readBlob",
                    "description": "The blob's bytes; one Range per request (206), 416 when unsatisfiable.",
                    "parameters": [
                        blob_param,
                        {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _BYTES,
                        "206": _BYTES,
                        "416": {"description": "Range not satisfiable"},
                        **errors,
                    },
                }
            },
            "/api/depot/v1/blobs/{sha256}/chunks/{index}": {
                "get": {
                    "operationId": "readChunk",
                    "description": "One chunk; its BLAKE3 digest is in X-Chunk-Blake3.",
                    "parameters": [blob_param, _path_param("index", {"type": "integer", "minimum": 0})],
                    "responses": {"200": _BYTES, **errors},
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
                            "schema": {"type": "string", "maxLength": 64},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                    ],
                    "responses": {"200": _json({"$ref": "#/components/schemas/Inventory"}), **errors},
                }
            },
            "/api/depot/v1/openapi.json": {
                "get": {"operationId": "openapi", "responses": {"200": _json({"type": "object"})}}
            },
            "/api/depot/v1/stats": {
                "get": {"operationId": "stats", "responses": {"200": _json({"type": "object"}), **errors}}
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                },
                "NodeInfo": {
                    "type": "object",
                    "required": ["id", "version", "chunk_size", "capabilities"],
                    "properties": {
                        "id": {"type": "string"},
                        "version": {"type": "string"},
                        "chunk_size": {"type": "integer"},
                        "capabilities": {"type": "array", "items": {"type": "string"}},
                        "hub_api": {"type": "boolean"},
                    },
                },
                "RepoSummary": {
                    "type": "object",
                    "required": ["repo_id", "private", "refs", "revisions", "files", "size"],
                    "properties": {
                        "repo_id": {"type": "string"},
                        "private": {"type": "boolean"},
                        "origin": {"type": "string"},
                        "refs": {"type": "object", "additionalProperties": {"type": "string"}},
                        "revisions": {"type": "integer"},
                        "files": {"type": "integer"},
                        "size": {"type": "integer"},
                        "created_at": {"type": "number"},
                        "updated_at": {"type": "number"},
                    },
                },
                "ManifestFile": {
                    "type": "object",
                    "required": ["path", "size", "sha256", "git_oid", "lfs", "chunk_size", "chunks", "etag"],
                    "properties": {
                        "repo_id": {"type": "string"},
                        "commit_id": {"type": "string"},
                        "path": {"type": "string"},
                        "size": {"type": "integer"},
                        "sha256": _SHA256,
                        "git_oid": {"type": "string"},
                        "etag": {"type": "string"},
                        "lfs": {"type": "boolean"},
                        "chunk_size": {"type": "integer"},
                        "chunks": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "BLAKE3 per chunk",
                        },
                    },
                },
                "Manifest": {
                    "type": "object",
                    "required": ["repo_id", "commit_id", "files"],
                    "properties": {
                        "repo_id": {"type": "string"},
                        "commit_id": {"type": "string"},
                        "private": {"type": "boolean"},
                        "files": {"type": "array", "items": {"$ref": "#/components/schemas/ManifestFile"}},
                    },
                },
                "PullManifest": {
                    "type": "object",
                    "required": ["repo_id", "commit_id", "files", "variants"],
                    "properties": {
                        "repo_id": {"type": "string"},
                        "revision": {"type": "string"},
                        "commit_id": {"type": "string"},
                        "endpoint": {"type": "string"},
                        "files": {"type": "array", "items": {"type": "object"}},
                        "shared": {"type": "array", "items": {"type": "string"}},
                        "other": {"type": "array", "items": {"type": "string"}},
                        "variants": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "status", "bytes_done", "total_bytes"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "status": {"enum": ["available", "downloading", "downloaded", "failed"]},
                                    "bytes_done": {"type": "integer"},
                                    "total_bytes": {"type": "integer"},
                                    "error": {"type": ["string", "null"]},
                                    "resumable": {"type": "boolean"},
                                },
                            },
                        },
                    },
                },
                "Inventory": {
                    "type": "object",
                    "required": ["blobs"],
                    "properties": {
                        "blobs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "sha256": _SHA256,
                                    "size": {"type": "integer"},
                                    "chunk_size": {"type": "integer"},
                                },
                            },
                        },
                        "next": {"type": "string"},
                    },
                },
            }
        },
    }
