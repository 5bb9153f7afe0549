"""Responses the node sends: blob bytes by sendfile, Hub-shaped errors, JSON."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from modeldepot.errors import (
    BudgetExceededError,
    ChunkNotAvailableError,
    CorruptBlobError,
    DepotError,
    EntryNotFoundError,
    GatedRepoError,
    IndexDamagedError,
    IntegrityError,
    InvalidInputError,
    MemoryShortError,
    NotFoundError,
    OfflineError,
    PullRunningError,
    ReadOnlyStoreError,
    RepoNotFoundError,
    RevisionNotFoundError,
    StoreClosedError,
    StoreFullError,
    UpstreamError,
    UpstreamTimeoutError,
)
from modeldepot.ratelimit import RateLimit
from modeldepot.server.ranges import RangeNotSatisfiable
from modeldepot.server.views import wanted_range, whole_headers
from modeldepot.store.verified import VerifiedBlob

__all__ = [
    "BlobResponse",
    "CountedResponse",
    "ViewResponse",
    "body_bytes_sent",
    "error_response",
    "json_response",
    "matches_none",
    "response_for_error",
    "send_blob",
]

log = logging.getLogger("modeldepot.server")


class CountedResponse(web.StreamResponse):
    """A response that sends its body itself (in ``prepare``, after the handler returned) and counts it:
    ``body_sent`` is the body bytes handed to the connection so far (to the kernel, for sendfile), so a
    client that left early is logged with what it was sent until then (:func:`body_bytes_sent`)."""

    def __init__(self, *, status: int = 200, headers: dict[str, str] | None = None) -> None:
        super().__init__(status=status, headers=headers)
        self.body_sent = 0
        # The node's cap on what it sends (serve --max-upload-rate), set by the app before the body goes.
        self.upload_limit: RateLimit | None = None
        # Told when the node cuts this answer short (the node's metrics count them: its status said 200)
        self.on_cut: Callable[[], None] | None = None

    def cut(self, request: BaseRequest) -> None:
        """End the answer before its body is complete: close the connection (a client sees a truncated body,
        never a complete wrong one) and say so."""
        if request.transport is not None:
            request.transport.close()
        if self.on_cut is not None:
            self.on_cut()


def body_bytes_sent(request: BaseRequest, response: web.StreamResponse) -> int:
    """The body bytes ``response`` sent (the access log's bytes): a :class:`CountedResponse` counts its own;
    any other response (a body in memory, written at once) sent its Content-Length once it finished, and
    nothing for a HEAD or when it did not finish (a client that left). aiohttp's ``body_length`` (its
    ``%b``) would not do: it counts what went through its writer, headers included, and so neither a body
    sent by sendfile nor the part of a body sent before a client left."""
    if isinstance(response, CountedResponse):
        return response.body_sent
    if request.method == "HEAD" or not response.body_length:  # body_length is set once the answer finished
        return 0
    return response.content_length or 0


class BlobResponse(CountedResponse):
    """Sends bytes ``offset .. offset + count - 1`` of a blob with sendfile, each chunk checked first.

    Every chunk the range touches is hashed against its BLAKE3 (on a worker thread, the next chunk while
    the kernel sends this one) before a byte of it leaves; a chunk that fails quarantines the blob and
    breaks the connection, so a client never receives a complete body with a flipped byte. The first
    chunk is checked before the headers go (:func:`send_blob`): a blob found corrupt there is a clean 503.

    aiohttp's FileResponse would also use sendfile, but it replaces the ETag with one made of mtime and
    size; Hub clients name cached blobs after the ETag, so it has to be the Hub's (git oid or SHA-256).

    A body of up to SMALL_BODY bytes goes with its headers in one write, from the bytes that were hashed:
    for a config, a sendfile call beside the headers' own send (and the connection's reading paused and
    resumed around it) cost more than the copy; a node serving 300 small files spent a third of its time
    there.
    """

    SMALL_BODY = 256 << 10

    def __init__(
        self, reader: VerifiedBlob, offset: int, count: int, status: int, headers: dict[str, str]
    ) -> None:
        super().__init__(status=status, headers=headers)
        self._reader = reader
        self._offset = offset
        self._count = count
        self.content_length = count
        self._small = count <= self.SMALL_BODY
        self._checking: asyncio.Future[str] | None = None  # the next chunk's check, on a worker thread
        # (aiohttp then holds the headers back until the first write of the body, and sends both at once)
        self._send_headers_immediately = not self._small
        # Told the size of each piece sent by sendfile, which goes around the payload writer (the node's
        # metrics count what passes through the writer themselves: server/metrics.py).
        self.on_sendfile: Callable[[int], None] | None = None

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        try:
            writer = await super().prepare(request)
            if request.method == "HEAD" or self._count == 0 or writer is None:
                return writer
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("connection lost")
            try:
                await self._send_checked(transport, writer)
            except (CorruptBlobError, ChunkNotAvailableError) as error:
                log.error("stopped sending %s: %s", request.path, error)
                self.cut(request)
                raise ConnectionResetError(str(error)) from None
            await super().write_eof()
            return writer
        finally:
            close_when_done(self._reader, self._checking)

    async def _send_checked(self, transport: asyncio.Transport, writer: AbstractStreamWriter) -> None:
        reader = self._reader
        start, end = self._offset, self._offset + self._count - 1
        chunks = reader.chunks_of(start, end)
        loop = asyncio.get_running_loop()
        checking: asyncio.Future[str] | None = None
        for index in chunks:
            if index != chunks[0]:  # the first was checked before the headers
                assert checking is not None
                # (shielded: cancelled, the answer closes its reader once the check has ended, in prepare)
                await asyncio.shield(checking)
            if index + 1 in chunks:
                checking = self._checking = loop.run_in_executor(None, reader.check, index + 1)
            chunk_offset, chunk_length = reader.span(index)
            lo, hi = max(start, chunk_offset), min(end, chunk_offset + chunk_length - 1)
            await self._send_chunk(loop, transport, writer, index, lo, hi - lo + 1)

    def _pieces(self, offset: int, count: int) -> list[tuple[int, int]]:
        """(offset, length) of the pieces bytes ``offset .. offset + count - 1`` go in: one, or the upload
        cap's pieces."""
        step = count if self.upload_limit is None else self.upload_limit.piece()
        return [(at, min(step, offset + count - at)) for at in range(offset, offset + count, max(1, step))]

    async def _send_chunk(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                          writer: AbstractStreamWriter, index: int, offset: int, count: int) -> None:  # fmt: skip
        """Bytes ``offset .. offset + count - 1`` of chunk ``index``, which was checked, within the upload cap."""
        # (not for a download in progress: its file may change under us)
        by_sendfile = self._reader.by_sendfile and not self._small
        view: memoryview | None = None
        chunk_offset, _ = self._reader.span(index)
        for at, length in self._pieces(offset, count):
            if self.upload_limit is not None:
                await self.upload_limit.take_async(length)  # (once a piece, whichever way it goes)
            if by_sendfile:
                try:
                    await self._sendfile(loop, transport, at, length)
                    continue
                except NotImplementedError:  # (e.g. TLS): this piece and the rest go through the writer
                    by_sendfile = False
            if view is None:
                # The bytes that were hashed (taken once: an unmapped reader gives them out once); a mapping's
                # are copied: a transport may keep what it is given after write returns.
                view = self._reader.view(index)
            piece = view[at - chunk_offset : at - chunk_offset + length]
            await writer.write(bytes(piece) if self._reader.mapped else piece)
            self.body_sent += length

    async def _sendfile(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, offset: int,
                        count: int) -> None:  # fmt: skip
        file = self._reader.file
        try:
            await loop.sendfile(transport, file, offset, count)
        except NotImplementedError:  # (nothing was sent: the caller sends the piece another way)
            raise
        except BaseException as error:
            # A client that left: asyncio leaves the file's position after the last byte it sent, even
            # when it fails (it moves it only when it sent some: the pieces go in order, so before this
            # one the position is at most ``offset``; the file is this response's own). A cancelled
            # send may not have moved it yet: its piece then counts 0.
            self._sent_by_sendfile(max(0, file.tell() - offset))
            if isinstance(error, RuntimeError) and transport.is_closing():
                # (asyncio's word for a transport the client closed between two pieces of a capped
                # send; aiohttp logs anything but a reset as an unhandled error, with no access line)
                raise ConnectionResetError("the client closed the connection") from None
            if isinstance(error, OSError) and error.errno == errno.ETIMEDOUT:
                # (the kernel dropped a client that read nothing for the send timeout: connections.py)
                raise ConnectionResetError("the client read nothing for the send timeout") from None
            raise
        self._sent_by_sendfile(count)

    def _sent_by_sendfile(self, count: int) -> None:
        self.body_sent += count
        if self.on_sendfile is not None:
            self.on_sendfile(count)


class ViewResponse(CountedResponse):
    """Sends ``view`` (a checked chunk: a view of the very mapping that was hashed), piece by piece within
    the node's upload cap when it has one (a plain ``web.Response`` went around it)."""

    def __init__(self, view: memoryview, headers: dict[str, str]) -> None:
        super().__init__(status=200, headers={**headers, "Content-Type": "application/octet-stream"})
        self._view = view
        self.content_length = len(view)

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        if request.method == "HEAD" or writer is None:
            return writer
        limit, view = self.upload_limit, self._view
        piece = limit.piece() if limit is not None else max(1, len(view))
        for start in range(0, len(view), piece):
            part = view[start : start + piece]
            if limit is not None:
                await limit.take_async(len(part))
            await writer.write(part)
            self.body_sent += len(part)
        await super().write_eof()
        return writer


async def send_blob(
    request: web.Request,
    reader: VerifiedBlob,
    etag: str,
    headers: dict[str, str],
    *,
    hub: bool = True,
    checked: int | None = None,
) -> web.StreamResponse:
    """A 200, 206 or 416 for the blob per the request's Range and If-Range; for a GET, the first chunk it
    sends has been checked (a corrupt one raises CorruptBlobError: the caller answers 503). ``checked``: a
    chunk the caller checked already (with the file's opening: one trip to a worker thread less)."""
    size = reader.size
    headers = {
        **headers,
        "ETag": f'"{etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    if matches_none(request.headers.get("If-None-Match"), etag):
        reader.close()  # the client holds these very bytes
        return web.Response(status=304, headers={k: v for k, v in headers.items() if k != "Content-Type"})
    try:
        wanted = wanted_range(request, size, etag, hub=hub)
    except RangeNotSatisfiable:
        reader.close()
        return not_satisfiable(headers, size)
    start, count = (0, size) if wanted is None else (wanted.start, wanted.length)
    if request.method != "HEAD" and count and start // reader.chunk_size != checked:
        checking = asyncio.ensure_future(asyncio.to_thread(reader.check, start // reader.chunk_size))
        try:
            await asyncio.shield(checking)
        except BaseException:
            close_when_done(reader, checking)
            raise
    if wanted is None:
        whole = {**headers, **whole_headers(request, size)} if hub else headers
        return BlobResponse(reader, 0, size, 200, whole)
    headers["Content-Range"] = wanted.content_range(size)
    return BlobResponse(reader, wanted.start, wanted.length, 206, headers)


def close_when_done(reader: VerifiedBlob, work: asyncio.Future[Any] | None) -> None:
    """Close ``reader`` now, or once ``work`` (a check of one of its chunks, on a worker thread) has ended:
    closed beneath a thread that still reads it, its descriptor may be another file's by the time it does
    (a request cancelled by its deadline, a client gone)."""

    def close(done: asyncio.Future[Any] | None) -> None:
        if done is not None and not done.cancelled():
            done.exception()  # (retrieved: the answer it was for has ended already)
        reader.close()

    if work is None or work.done():
        close(work)
    else:
        work.add_done_callback(close)


def matches_none(header: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (or ``*``), compared weakly (RFC 9110 §13.1.2)."""
    if header is None:
        return False
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or f'"{etag}"' in (tag.removeprefix("W/") for tag in tags)


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


_ASCII_SPELLINGS = str.maketrans(
    {"…": "...", "‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-", "→": "->"}
)


def _header_safe(text: str) -> str:
    """Printable ASCII only: a message may quote what a client sent (a path, a name), and a control
    character in a header would break the answer (aiohttp refuses it) or split it."""
    # (the ellipsis of a shortened name, the quotes of a message, in ASCII: "…" came out as "?", a trial)
    ascii_text = text.translate(_ASCII_SPELLINGS).encode("ascii", "replace").decode()
    return "".join(c if " " <= c <= "~" else " " for c in ascii_text)[:500]


def response_for_error(error: DepotError) -> web.Response:
    """The one place where library errors become HTTP statuses, with the Hub's error headers.

    The client's fault is a 4xx; the node's upstream failing is a 502 (a 504 when it did not answer in
    time), and its bytes not matching their digests too; a node that cannot serve now (offline, a blob
    found corrupt) a 503; a full disk a 507; anything else of the node's own a 500.
    """
    if isinstance(error, InvalidInputError):
        return error_response(400, "BadRequest", str(error))
    if isinstance(error, RepoNotFoundError):
        return error_response(404, "RepoNotFound", f"Repository not found: {error.repo_id}")
    if isinstance(error, RevisionNotFoundError):
        return error_response(404, "RevisionNotFound", f"Invalid rev id: {error.revision}")
    if isinstance(error, EntryNotFoundError) and error.in_commit:
        # Without X-Repo-Commit: with it, huggingface_hub records the file as absent from that commit for
        # good (.no_exist/<commit>/<path>), and would not take it from a node that holds it later
        return error_response(404, "EntryNotFound", f"Entry not found: {error.path} (this node does not hold "
                              "this file of the commit)")  # fmt: skip
    if isinstance(error, EntryNotFoundError):
        commit = {"X-Repo-Commit": error.commit_id} if error.commit_id else None
        return error_response(404, "EntryNotFound", f"Entry not found: {error.path}", commit)
    if isinstance(error, GatedRepoError):  # (huggingface_hub raises GatedRepoError, transformers says why)
        return error_response(401, "GatedRepo", str(error))
    if isinstance(error, ChunkNotAvailableError):
        return error_response(404, "ChunkNotAvailable", str(error))
    if isinstance(error, NotFoundError):
        return error_response(404, "NotFound", str(error))
    if isinstance(error, CorruptBlobError):
        return error_response(
            503,
            "CorruptFile",
            f"this file (blob {error.sha256[:12]}…) failed verification on the node and is not "
            "served: pull it again there",
        )
    if isinstance(error, OfflineError):
        return error_response(503, "Offline", f"the node is offline and does not hold this: {error}")
    if isinstance(error, UpstreamTimeoutError):
        return error_response(504, "UpstreamTimeout", f"the node's upstream did not answer in time: {error}")
    if isinstance(error, UpstreamError):
        return error_response(502, "UpstreamError", f"the node's upstream failed: {error}")
    if isinstance(error, IntegrityError):
        return error_response(
            502, "UpstreamIntegrity", f"the bytes from the node's upstream were wrong: {error}"
        )
    if isinstance(error, PullRunningError):
        return error_response(409, "PullRunning", str(error))
    if isinstance(error, MemoryShortError):  # (its message names sizes and the fix, nothing private)
        return error_response(503, "InsufficientMemory", str(error))
    if isinstance(error, BudgetExceededError):  # (its message names sizes and the fix, nothing private)
        return error_response(507, "StoreFull", f"the node's disk budget is full: {error}")
    if isinstance(error, StoreFullError):
        return error_response(507, "StoreFull", "the node's disk is full")
    if isinstance(error, ReadOnlyStoreError):  # (a miss, or a write: such a node serves what it holds)
        return error_response(503, "ReadOnlyStore", f"the node's store is read-only: {error}")
    if isinstance(error, IndexDamagedError):  # (it was a bare 500: an explorer's trial)
        return error_response(503, "IndexDamaged", "the node's store index is damaged: its operator is told how "
                              "to recover it (`modeldepot verify` on the node)")  # fmt: skip
    if isinstance(error, StoreClosedError):  # (a request that came as the node stopped)
        return error_response(
            503, "ShuttingDown", "the node is stopping: ask again, here once it is back or elsewhere"
        )
    return error_response(500, "NodeError", "the node could not complete the request")


def headers_only(headers: dict[str, str], length: int) -> web.StreamResponse:
    """A 200 to a HEAD: a file's headers and its length, no body."""
    response = web.StreamResponse(status=200, headers=headers)
    response.content_length = length
    return response


def not_satisfiable(headers: Mapping[str, str], size: int) -> web.Response:
    """A 416 for a file of ``size`` bytes: its ``Content-Range``, and ``Content-Length: 0`` alike for a HEAD
    and a GET (a HEAD's said none: an explorer's trial)."""
    return web.Response(
        status=416, headers={**headers, "Content-Range": f"bytes */{size}", "Content-Length": "0"}
    )
