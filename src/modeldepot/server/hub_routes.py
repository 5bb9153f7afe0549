"""The Hugging Face Hub's routes, as huggingface_hub, transformers and Olah read them (docs/background.md).

Only model repos. Never an ``X-Xet-*`` header, a ``Link rel="xet-auth"`` or a ``xetHash`` field: clients
that see none of them stay on plain HTTP, which is all a node serves.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from modeldepot.config import truthy
from modeldepot.depot import Depot
from modeldepot.errors import (
    DepotError,
    EntryNotFoundError,
    InvalidInputError,
    NotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UpstreamError,
)
from modeldepot.gitobjects import TreeEntry, tree_oids
from modeldepot.server.context import DEPOT, is_authorized
from modeldepot.server.mirror_routes import MIRROR, mirror_resolve, mirror_revision
from modeldepot.server.responses import json_response, send_blob
from modeldepot.server.views import (
    COMMIT_TITLE,
    RevisionView,
    file_headers,
    iso_time,
    lfs_info,
    model_info_body,
)
from modeldepot.store import FileEntry, RepoSummary
from modeldepot.validation import validate_path, validate_repo_id, validate_revision

__all__ = ["add_hub_routes"]

TREE_PAGE = 1000  # the Hub's page sizes: 1000 entries, 50 when expanded
TREE_PAGE_EXPANDED = 50


def _repo_id(request: web.Request) -> str:
    return validate_repo_id(f"{request.match_info['org']}/{request.match_info['name']}")


def _revision(request: web.Request, default: str = "main") -> str:
    raw = request.match_info.get("rev")
    return validate_revision(unquote(raw) if raw is not None else default)


async def _check_visible(request: web.Request, repo_id: str) -> None:
    """RepoNotFound when the repo is absent, or private and the request carries no valid token."""
    if await asyncio.to_thread(request.app[DEPOT].store.repo_private, repo_id) and not is_authorized(request):
        raise RepoNotFoundError(repo_id)


async def _visible_repo(request: web.Request, repo_id: str) -> RepoSummary:
    """The repo's summary, or RepoNotFound when it is private and the request carries no valid token."""
    summary = await asyncio.to_thread(request.app[DEPOT].store.repo_summary, repo_id)
    if summary.private and not is_authorized(request):
        raise RepoNotFoundError(repo_id)
    return summary


async def _local_summary(request: web.Request, repo_id: str) -> RepoSummary | None:
    try:
        return await asyncio.to_thread(request.app[DEPOT].store.repo_summary, repo_id)
    except RepoNotFoundError:
        return None


async def _mirrorable(request: web.Request, repo_id: str) -> bool:
    """Whether a local miss may be answered from upstream: the node mirrors, and the repo is not a
    private local one this request may not see (a miss must not reveal it, nor mix another repo in)."""
    if MIRROR not in request.app:
        return False
    summary = await _local_summary(request, repo_id)
    return summary is None or not summary.private or is_authorized(request)


async def _upstream_first(request: web.Request, repo_id: str) -> bool:
    """On a mirror, a repo that came from upstream (pulled, or not here at all) is described by the upstream
    (its scan, kept briefly): a mirror holding a few of its files still lists them all, and follows a branch
    that moves. The store answers when the upstream cannot. An imported repo is the node's own, and a
    private one this request may not see is never looked up upstream (that would reveal it)."""
    if MIRROR not in request.app:
        return False
    summary = await _local_summary(request, repo_id)
    if summary is None:
        return True
    return summary.origin != "import" and (not summary.private or is_authorized(request))


async def _revision_view(request: web.Request, repo_id: str, revision: str) -> RevisionView:
    """The revision as the upstream describes it (see :func:`_upstream_first`) or as stored here; on a
    local miss, when the node mirrors, the upstream's. Both are described the same way."""
    upstream_error: DepotError | None = None
    if await _upstream_first(request, repo_id):
        try:
            return await mirror_revision(request, repo_id, revision)
        except (UpstreamError, NotFoundError) as error:
            upstream_error = error  # the store may still hold it
    try:
        return await _stored_view(request, repo_id, revision)
    except (RepoNotFoundError, RevisionNotFoundError):
        if upstream_error is not None:
            raise upstream_error from None
        if not await _mirrorable(request, repo_id):
            raise
        return await mirror_revision(request, repo_id, revision)


async def _stored_view(request: web.Request, repo_id: str, revision: str) -> RevisionView:
    depot: Depot = request.app[DEPOT]
    summary = await _visible_repo(request, repo_id)
    commit_id = await asyncio.to_thread(depot.resolve, repo_id, revision)
    files = await asyncio.to_thread(depot.list_files, repo_id, commit_id)
    committed_at = await asyncio.to_thread(depot.store.revision_time, repo_id, commit_id)
    return RevisionView(
        repo_id=repo_id,
        commit_id=commit_id,
        files=tuple(files),
        private=summary.private,
        gated=summary.card.get("gated", False),
        card={k: v for k, v in summary.card.items() if k != "gated"},
        created_at=summary.created_at,
        updated_at=summary.updated_at,
        committed_at=committed_at,
    )


async def model_info(request: web.Request) -> web.Response:
    view = await _revision_view(request, _repo_id(request), _revision(request))
    return json_response(model_info_body(view, truthy(request.query.get("blobs"))))


@dataclass(frozen=True)
class _Tree:
    """A revision's files plus its folders, with git oids for both, as the tree API lists them."""

    commit_id: str
    files: dict[str, FileEntry]
    folder_oids: dict[str, str]  # '' is the root

    @classmethod
    def of(cls, commit_id: str, files: list[FileEntry]) -> _Tree:
        oids = tree_oids(TreeEntry(f.path, f.git_oid) for f in files)
        return cls(commit_id, {f.path: f for f in files}, oids)

    def entry(self, path: str, expand: bool, created: float) -> dict[str, Any]:
        if path in self.files:
            found = self.files[path]
            item: dict[str, Any] = {"type": "file", "oid": found.git_oid, "size": found.size, "path": path}
            if found.lfs:
                item["lfs"] = {"oid": found.sha256, **lfs_info(found)}
        else:
            item = {"type": "directory", "oid": self.folder_oids[path], "size": 0, "path": path}
        if expand:
            item["lastCommit"] = {"id": self.commit_id, "title": COMMIT_TITLE, "date": iso_time(created)}
        return item

    def listing(self, folder: str, recursive: bool) -> list[str]:
        paths = [p for p in (*self.folder_oids, *self.files) if p]
        prefix = f"{folder}/" if folder else ""
        inside = [p for p in paths if p.startswith(prefix)]
        if not recursive:
            inside = [p for p in inside if "/" not in p[len(prefix) :]]
        return sorted(inside)


async def _tree_of(request: web.Request, repo_id: str, revision: str) -> tuple[_Tree, float]:
    """The revision's tree and when its commit was made here (an import or a pull; an upstream's scan)."""
    view = await _revision_view(request, repo_id, revision)
    return _Tree.of(view.commit_id, list(view.files)), view.committed_at


async def list_tree(request: web.Request) -> web.Response:
    repo_id = _repo_id(request)
    revision = _revision(request)
    folder = unquote(request.match_info.get("path", "")).strip("/")
    if folder:
        validate_path(folder)
    tree, updated_at = await _tree_of(request, repo_id, revision)
    if folder and folder not in tree.folder_oids:
        raise EntryNotFoundError(repo_id, revision, folder, tree.commit_id)
    expand = truthy(request.query.get("expand"))
    paths = tree.listing(folder, truthy(request.query.get("recursive")))
    page = TREE_PAGE_EXPANDED if expand else TREE_PAGE
    try:
        cursor = int(request.query.get("cursor", "0"))
    except ValueError:
        raise InvalidInputError("cursor must be a non-negative integer") from None
    if cursor < 0:
        raise InvalidInputError("cursor must be a non-negative integer")
    chunk = paths[cursor : cursor + page]
    headers = {}
    if cursor + page < len(paths):
        following = request.url.update_query(cursor=str(cursor + page))
        headers["Link"] = f'<{following}>; rel="next"'
    return json_response([tree.entry(p, expand, updated_at) for p in chunk], headers=headers)


async def paths_info(request: web.Request) -> web.Response:
    repo_id = _repo_id(request)
    revision = _revision(request)
    try:
        form = await request.post()
    except UnicodeDecodeError:
        raise InvalidInputError("the paths-info form is not UTF-8") from None
    wanted = [validate_path(str(p).strip("/")) for p in form.getall("paths", [])]
    expand = truthy(str(form.get("expand", "")))
    tree, updated_at = await _tree_of(request, repo_id, revision)
    found = [p for p in wanted if p in tree.files or p in tree.folder_oids]
    return json_response([tree.entry(p, expand, updated_at) for p in found])


async def list_refs(request: web.Request) -> web.Response:
    repo_id = _repo_id(request)
    summary = await _visible_repo(request, repo_id)
    include_prs = truthy(request.query.get("include_prs"))
    branches, pulls = [], []
    for name, commit_id in sorted(summary.refs.items()):
        if name.startswith("refs/pr/"):
            pulls.append({"name": name, "ref": name, "targetCommit": commit_id})
        else:
            branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit_id})
    return json_response(
        {"branches": branches, "converts": [], "tags": [], **({"pullRequests": pulls} if include_prs else {})}
    )


async def resolve(request: web.Request) -> web.StreamResponse:
    repo_id = _repo_id(request)
    revision = _revision(request)
    path = validate_path(request.match_info["path"])
    upstream_error: DepotError | None = None
    if await _upstream_first(request, repo_id):
        try:
            manifest, _ = await request.app[MIRROR].remote_file(repo_id, revision, path)
        except (UpstreamError, NotFoundError) as error:
            upstream_error = error  # the store may still hold it
        else:  # the upstream's commit: from the store when it holds the file, else pulled while served
            try:
                return await _local_resolve(request, repo_id, manifest.commit_id, path)
            except (RepoNotFoundError, RevisionNotFoundError, EntryNotFoundError):
                return await mirror_resolve(request, repo_id, revision, path)
    try:
        return await _local_resolve(request, repo_id, revision, path)
    except (RepoNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        if upstream_error is not None:
            raise upstream_error from None
        if not await _mirrorable(request, repo_id):
            raise
        return await mirror_resolve(request, repo_id, revision, path)


async def _local_resolve(request: web.Request, repo_id: str, revision: str, path: str) -> web.StreamResponse:
    await _check_visible(request, repo_id)
    depot: Depot = request.app[DEPOT]
    entry = await asyncio.to_thread(depot.file_info, repo_id, path, revision)
    reader = await asyncio.to_thread(depot.open_verified, entry)
    return await send_blob(request, reader, entry.etag, file_headers(entry))


def add_hub_routes(app: web.Application) -> None:
    repo = "/api/models/{org}/{name}"
    app.router.add_get(repo, model_info)
    app.router.add_get(repo + "/revision/{rev}", model_info)
    app.router.add_get(repo + "/tree/{rev}", list_tree)
    app.router.add_get(repo + "/tree/{rev}/{path:.+}", list_tree)
    app.router.add_post(repo + "/paths-info/{rev}", paths_info)
    app.router.add_get(repo + "/refs", list_refs)
    app.router.add_get("/{org}/{name}/resolve/{rev}/{path:.+}", resolve)  # add_get answers HEAD too
