"""Answers for what the store lacks, when the node mirrors upstreams (``serve --upstream``).

A HEAD is answered from the upstream's metadata at once and pulls nothing (``file_exists`` and size
probes must not start a download of a whole file; a GET follows a client's HEAD at once anyway); a GET
starts or joins the file's pull and sends its headers once the chunk it starts in has landed, or the pull
failed (a 502 then, not a 200 cut short), or a few seconds passed (``mirror.FIRST_BYTES_PATIENCE``), and then
the bytes as the pull lands and checks them, so a client's 10-second timeouts (docs/background.md) only
ever wait for the next chunk. ``model_info`` of a repo not yet pulled is answered from the scan, so
``snapshot_download`` works through a mirror too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from modeldepot.errors import (
    AccessDeniedError,
    DepotError,
    GatedRepoError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from modeldepot.hub.manifest import Manifest, RemoteFile
from modeldepot.mirror import Mirror
from modeldepot.modelcard import upstream_card
from modeldepot.server.context import ARRIVED, as_typed, hidden_repo, is_authorized
from modeldepot.server.ranges import RangeNotSatisfiable
from modeldepot.server.responses import CountedResponse, matches_none, not_satisfiable
from modeldepot.server.views import RevisionView, file_headers, to_its_commit, wanted_range, whole_headers
from modeldepot.store import FileEntry

__all__ = [
    "MIRROR",
    "PrivateUpstream",
    "check_public",
    "mirror_resolve",
    "mirror_revision",
    "upstream_manifest",
]

MIRROR = web.AppKey("mirror", Mirror)

log = logging.getLogger(__name__)


class PrivateUpstream(RepoNotFoundError):
    """The upstream says the repo is private, and the request may not see it: what the store holds
    of it must not answer in its place (a repo made private upstream was served from the store to anyone)."""


def check_public(request: web.Request, manifest: Manifest, files: bool = False) -> None:
    """PrivateUpstream (a 404, as for a repo not there) when the upstream's repo is hidden to ``request``;
    for its ``files``, GatedRepoError (a 401) when the upstream gates it and the request lacks the node's
    token. A gated repo is described to anyone, as the Hub does: it was a 404 RepoNotFound, and scripts
    branching on ``repo_exists`` took it for a typo (an explorer's trial)."""
    if is_authorized(request):
        return
    if manifest.private:
        # (named as typed: the upstream's spelling told a guess that it was there, a security trial)
        raise PrivateUpstream(as_typed(request, manifest.repo_id))
    if manifest.gated and files:
        raise GatedRepoError(manifest.repo_id)


async def upstream_manifest(
    request: web.Request, repo_id: str, revision: str, held: bool = False
) -> Manifest:
    """The upstream's scan of the repo (:meth:`UpstreamScans.manifest <modeldepot.mirror.scans.UpstreamScans.manifest>`), for a request that may see it.

    An upstream's refusal is said, with its reasons, only to a client with this node's token: to anyone
    else it is the 404 of a repo not there. The reasons name the upstream and the node's credentials, and a
    refusal of one source beside another's "not found" told an absent repo (a 502) from a private one (a
    404): every guess of a name was answered (a security trial). The node's log says it."""
    try:
        return await request.app[MIRROR].scans.manifest(repo_id, revision, held)
    except AccessDeniedError as error:
        if is_authorized(request):
            raise
        log.warning("%s %s: answered as a repo not found to a client without this node's token: %s",
                    request.method, request.path, error)  # fmt: skip
        raise hidden_repo(request, repo_id) from error
    except RevisionNotFoundError as error:
        # A revision a private repo lacks was said so to anyone, where the repo's files answered "not found":
        # every guess of a branch told that the repo was there (an explorer's trial). Said to who may see it.
        if is_authorized(request) or await _public(request, repo_id, held):
            raise
        raise hidden_repo(request, repo_id) from error


async def _public(request: web.Request, repo_id: str, held: bool) -> bool:
    """Whether the upstream's repo is one anyone may see (its main branch's scan says so); False when that
    cannot be told."""
    try:
        manifest = await request.app[MIRROR].scans.manifest(repo_id, "main", held)
    except DepotError:
        return False
    return not manifest.private  # (a gated one is described to anyone)


def _entry(manifest: Manifest, remote: RemoteFile) -> FileEntry:
    """An upstream file as the store would list it (chunk size 0: it is not chunked here yet)."""
    return FileEntry(manifest.repo_id, manifest.commit_id, remote.path, remote.size, remote.sha256 or "",
                     remote.git_oid, remote.sha256 is not None, 0)  # fmt: skip


class MirrorResponse(CountedResponse):
    """Streams what :meth:`Mirror.read` yields; written after the handler returns, so the request
    deadline bounds only the wait for the headers. Counts what it sent in ``body_sent``."""

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
        stream = self._stream
        try:
            while True:
                try:
                    block = await anext(stream)
                except StopAsyncIteration:
                    break
                except Exception as error:
                    # The pull failed (or its last check did): break the connection rather than end a body
                    # that a client could take for a whole file.
                    log.warning("%s %s: the answer breaks after its headers: %s: %s", request.method,
                                request.path, type(error).__name__, error)  # fmt: skip
                    self.cut(request)
                    raise ConnectionResetError("the upstream transfer failed") from None
                if self.upload_limit is not None:
                    await self.upload_limit.take_async(block.nbytes)
                await writer.write(block)  # (a client that left raises here)
                self.body_sent += block.nbytes
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        await super().write_eof()
        return writer


async def mirror_resolve(request: web.Request, repo_id: str, revision: str, path: str) -> web.StreamResponse:
    """A resolve answer for a file the mirror is pulling: the headers of a stored file's, once the pull has
    its first bytes (or a few seconds passed). A HEAD, or a range past the end, pulls nothing."""
    mirror, since = request.app[MIRROR], request.get(ARRIVED, time.monotonic())
    manifest = await upstream_manifest(request, repo_id, revision)
    # (first: a file a private repo lacks was said so to anyone, a trial)
    check_public(request, manifest, files=True)
    remote = mirror.remote_file(manifest, revision, path)
    entry = _entry(manifest, remote)
    headers = file_headers(entry, request)
    if entry.lfs and (pinned := to_its_commit(request, entry.commit_id, headers)) is not None:
        return pinned
    if matches_none(request.headers.get("If-None-Match"), entry.etag):
        # The client holds these very bytes (the upstream's scan names them): nothing to pull. A mirror sent
        # the whole file, pulling it first, to a cache that revalidated what it held.
        return web.Response(status=304, headers={k: v for k, v in headers.items() if k != "Content-Type"})
    if request.method == "HEAD":  # (file_exists, a size probe: answered from the upstream's metadata)
        if not remote.size:  # (no GET follows: huggingface_hub makes an empty file itself)
            await mirror.started(manifest, remote)
        # (A pull that failed lately is the GET's 502, and a file the disk budget cannot take the GET's 507:
        # huggingface_hub retries a HEAD's 5xx for half a minute, then says only "check your connection"; a
        # GET's error it shows at once, with its reason: an explorer's trial.)
        return MirrorResponse(None, 200, headers, remote.size)
    await mirror.check_fits(manifest, remote)
    try:
        wanted = wanted_range(request, remote.size, entry.etag)
    except RangeNotSatisfiable:
        return not_satisfiable(headers, remote.size)
    mirror.check_not_failed(manifest, remote)
    job = await mirror.started(manifest, remote, 0 if wanted is None else wanted.start, since)
    if wanted is None:
        body = mirror.read(manifest, remote, 0, remote.size - 1, job, since) if remote.size else None
        return MirrorResponse(body, 200, {**headers, **whole_headers(request, remote.size)}, remote.size)
    headers["Content-Range"] = wanted.content_range(remote.size)
    return MirrorResponse(
        mirror.read(manifest, remote, wanted.start, wanted.end, job, since), 206, headers, wanted.length
    )


async def mirror_revision(
    request: web.Request, repo_id: str, revision: str, held: bool = False
) -> RevisionView:
    """An upstream revision (its scan), described as a stored one is. ``held``: the store can answer instead
    (the scan is waited for briefly: see :meth:`UpstreamScans.manifest <modeldepot.mirror.scans.UpstreamScans.manifest>`)."""
    manifest = await upstream_manifest(request, repo_id, revision, held)
    check_public(request, manifest)
    card = upstream_card(
        manifest.pipeline_tag, manifest.library_name, manifest.tags, card_data=manifest.card_data
    )
    return RevisionView(
        repo_id=manifest.repo_id,  # (the upstream's spelling: the Hub's id, whatever case it was asked in)
        commit_id=manifest.commit_id,
        files=tuple(_entry(manifest, f) for f in manifest.files),
        private=manifest.private,
        gated=manifest.gated,
        card=card,
        # (the upstream's times: its scan's, a repo unchanged seemed changed at every scan, an explorer's trial)
        created_at=manifest.created_at or manifest.scanned_at,
        updated_at=manifest.modified_at or manifest.scanned_at,
        committed_at=manifest.modified_at or manifest.scanned_at,
        weights_described=manifest.weights_described,
    )
