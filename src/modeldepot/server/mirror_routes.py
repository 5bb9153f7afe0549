"""Answers for what the store lacks, when the node mirrors upstreams (``serve --upstream``).

A HEAD is answered from the upstream's metadata at once (and starts the pull, since a GET follows);
a GET sends the headers at once and then the bytes as the pull lands and checks them, so a client's
10-second timeouts (hf-protocol.md §1.5) only ever wait for the next chunk. ``model_info`` of a repo not
yet pulled is answered from the scan, so ``snapshot_download`` works through a mirror too.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from modeldepot.errors import RepoNotFoundError
from modeldepot.hub.manifest import Manifest, RemoteFile
from modeldepot.mirror import Mirror
from modeldepot.server.context import is_authorized
from modeldepot.server.ranges import RangeNotSatisfiable, parse_range
from modeldepot.store import FileEntry

__all__ = ["MIRROR", "mirror_files", "mirror_model_info", "mirror_resolve"]

MIRROR = web.AppKey("mirror", Mirror)


def _check_public(request: web.Request, manifest: Manifest) -> None:
    if (manifest.private or manifest.gated) and not is_authorized(request):
        raise RepoNotFoundError(manifest.repo_id)


def _etag(remote: RemoteFile) -> str:
    return remote.sha256 or remote.git_oid


class MirrorResponse(web.StreamResponse):
    """Streams what :meth:`Mirror.read` yields; written after the handler returns, so the request
    deadline bounds only the wait for the headers."""

    def __init__(
        self, body: AsyncIterator[memoryview] | None, status: int, headers: dict[str, str], length: int
    ) -> None:
        super().__init__(status=status, headers=headers)
        self._stream = body
        self.content_length = length

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        if self._stream is None or writer is None:
            return writer
        try:
            async for block in self._stream:
                await writer.write(block)
        except Exception:
            # The pull failed (or its last check did): break the connection rather than end a body
            # that a client could take for a whole file.
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("the upstream transfer failed") from None
        await super().write_eof()
        return writer


async def mirror_resolve(request: web.Request, repo_id: str, revision: str, path: str) -> web.StreamResponse:
    mirror = request.app[MIRROR]
    manifest, remote = await mirror.remote_file(repo_id, revision, path)
    _check_public(request, manifest)
    etag = _etag(remote)
    headers = {
        "X-Repo-Commit": manifest.commit_id,
        "X-Linked-Etag": f'"{etag}"',
        "X-Linked-Size": str(remote.size),
        "ETag": f'"{etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    mirror.start(manifest, remote)
    if request.method == "HEAD":
        return MirrorResponse(None, 200, headers, remote.size)
    try:
        wanted = parse_range(request.headers.get("Range"), remote.size)
    except RangeNotSatisfiable:
        return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{remote.size}"})
    if wanted is None:
        body = mirror.read(manifest, remote, 0, remote.size - 1) if remote.size else None
        return MirrorResponse(body, 200, headers, remote.size)
    headers["Content-Range"] = wanted.content_range(remote.size)
    return MirrorResponse(
        mirror.read(manifest, remote, wanted.start, wanted.end), 206, headers, wanted.length
    )


async def mirror_files(
    request: web.Request, repo_id: str, revision: str
) -> tuple[str, list[FileEntry], float]:
    """(commit id, files, scan time) of an upstream revision, as entries the tree routes list."""
    manifest = await request.app[MIRROR].manifest(repo_id, revision)
    _check_public(request, manifest)
    files = [
        FileEntry(
            repo_id, manifest.commit_id, f.path, f.size, f.sha256 or "", f.git_oid, f.sha256 is not None, 0
        )
        for f in manifest.files
    ]
    return manifest.commit_id, files, manifest.scanned_at


async def mirror_model_info(request: web.Request, repo_id: str, revision: str) -> dict[str, Any]:
    manifest = await request.app[MIRROR].manifest(repo_id, revision)
    _check_public(request, manifest)
    blobs = request.query.get("blobs", "").lower() in ("1", "true", "yes")
    siblings = []
    for remote in manifest.files:
        item: dict[str, Any] = {"rfilename": remote.path}
        if blobs:
            item.update(size=remote.size, blobId=remote.git_oid)
            if remote.sha256:
                item["lfs"] = {"sha256": remote.sha256, "size": remote.size}
        siblings.append(item)
    scanned = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(manifest.scanned_at))
    body: dict[str, Any] = {
        "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
        "sha": manifest.commit_id, "lastModified": scanned, "createdAt": scanned,
        "private": manifest.private, "gated": manifest.gated, "disabled": False, "downloads": 0, "likes": 0,
        "tags": list(manifest.tags), "siblings": siblings,
    }  # fmt: skip
    for key, value in (("pipeline_tag", manifest.pipeline_tag), ("library_name", manifest.library_name)):
        if value:
            body[key] = value
    return body
