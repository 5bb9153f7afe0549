"""Responses the node sends: blob bytes by sendfile, Hub-shaped errors, JSON."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, BinaryIO

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from modeldepot.errors import (
    CorruptBlobError,
    DepotError,
    EntryNotFoundError,
    InvalidInputError,
    NotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from modeldepot.server.ranges import ByteRange, RangeNotSatisfiable, parse_range

__all__ = ["BlobResponse", "error_response", "json_response", "response_for_error", "send_blob"]

_FALLBACK_BLOCK = 1 << 20


class BlobResponse(web.StreamResponse):
    """Sends ``count`` bytes of an open file from ``offset`` with sendfile: no copy through Python.

    aiohttp's FileResponse would do the same, but it replaces the ETag with one made of mtime and size;
    Hub clients name cached blobs after the ETag, so it has to be the Hub's (git oid or SHA-256).
    """

    def __init__(
        self, handle: BinaryIO, offset: int, count: int, status: int, headers: dict[str, str]
    ) -> None:
        super().__init__(status=status, headers=headers)
        self._handle = handle
        self._offset = offset
        self._count = count
        self.content_length = count

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        try:
            writer = await super().prepare(request)
            if request.method == "HEAD" or self._count == 0 or writer is None:
                return writer
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("connection lost")
            try:
                await asyncio.get_running_loop().sendfile(transport, self._handle, self._offset, self._count)
            except NotImplementedError:  # e.g. TLS transports
                await self._copy(writer)
            await super().write_eof()
            return writer
        finally:
            self._handle.close()

    async def _copy(self, writer: AbstractStreamWriter) -> None:
        offset, left = self._offset, self._count
        while left:
            data = await asyncio.to_thread(_pread, self._handle, min(left, _FALLBACK_BLOCK), offset)
            if not data:
                raise ConnectionResetError("file shorter than announced")
            await writer.write(data)
            offset += len(data)
            left -= len(data)


def _pread(handle: BinaryIO, size: int, offset: int) -> bytes:
    return os.pread(handle.fileno(), size, offset)


def send_blob(
    request: web.Request, handle: BinaryIO, size: int, etag: str, headers: dict[str, str]
) -> web.StreamResponse:
    """A 200, 206 or 416 for the file behind ``handle`` per the request's Range and If-Range."""
    quoted = f'"{etag}"'
    headers = {
        **headers,
        "ETag": quoted,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    range_header = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() not in (quoted, etag):
        range_header = None  # the client's copy is of another version: send the whole file
    try:
        wanted: ByteRange | None = parse_range(range_header, size)
    except RangeNotSatisfiable:
        handle.close()
        return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    if wanted is None:
        return BlobResponse(handle, 0, size, 200, headers)
    headers["Content-Range"] = wanted.content_range(size)
    return BlobResponse(handle, wanted.start, wanted.length, 206, headers)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data).encode(), content_type="application/json", headers=headers
    )


def error_response(
    status: int, code: str | None, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The Hub's error shape: X-Error-Code / X-Error-Message headers (HEAD has no body) and a JSON body."""
    all_headers = {"X-Error-Message": _header_safe(message), **(headers or {})}
    if code:
        all_headers["X-Error-Code"] = code
    return json_response({"error": message}, status, all_headers)


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")[:500]


def response_for_error(error: DepotError) -> web.Response:
    """The one place where library errors become HTTP statuses."""
    if isinstance(error, InvalidInputError):
        return error_response(400, None, str(error))
    if isinstance(error, RepoNotFoundError):
        return error_response(404, "RepoNotFound", f"Repository not found: {error.repo_id}")
    if isinstance(error, RevisionNotFoundError):
        return error_response(404, "RevisionNotFound", f"Invalid rev id: {error.revision}")
    if isinstance(error, EntryNotFoundError):
        commit = {"X-Repo-Commit": error.commit_id} if error.commit_id else None
        return error_response(404, "EntryNotFound", f"Entry not found: {error.path}", commit)
    if isinstance(error, NotFoundError):
        return error_response(404, None, str(error))
    if isinstance(error, CorruptBlobError):
        return error_response(503, None, "this file failed verification on the node and is not served")
    return error_response(500, None, "the node could not complete the request")
