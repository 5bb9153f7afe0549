"""The Hugging Face Hub's routes, as huggingface_hub, huggingface.js, transformers and Olah read them
(docs/background.md).

Only model repos. Never an ``X-Xet-*`` header, a ``Link rel="xet-auth"`` or a ``xetHash`` field: clients
that see none of them stay on plain HTTP, which is all a node serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from modeldepot.config import truthy
from modeldepot.depot import Depot
from modeldepot.errors import (
    BlobRemovedError,
    CorruptBlobError,
    DepotError,
    EntryNotFoundError,
    GatedRepoError,
    InvalidInputError,
    NotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UpstreamError,
)
from modeldepot.gitobjects import TreeEntry, lfs_pointer, tree_oids
from modeldepot.hfcache.cache import ORIGIN as HF_CACHE_ORIGIN
from modeldepot.hub.manifest import described_weights
from modeldepot.hub.scan import HELD_ONLY_HEADER, PART_OF_COMMIT_HEADER
from modeldepot.server.commit_cache import COMMITS, CommitCache
from modeldepot.server.context import DEPOT, hidden_repo, is_authorized, path_matches, path_repo, request_url
from modeldepot.server.listing import (
    CommitQuery,
    ModelQuery,
    commit_item,
    commits_page,
    expand_names,
    gguf_info,
    head,
    model_config,
    models_page,
    safetensors_info,
)
from modeldepot.server.mirror_routes import (
    MIRROR,
    PrivateUpstream,
    check_public,
    mirror_resolve,
    mirror_revision,
    upstream_manifest,
)
from modeldepot.server.ranges import RangeNotSatisfiable
from modeldepot.server.responses import (
    error_response,
    headers_only,
    json_response,
    not_satisfiable,
    send_blob,
)
from modeldepot.server.views import (
    COMMIT_TITLE,
    RevisionView,
    file_headers,
    iso_time,
    lfs_info,
    model_info_body,
    model_properties,
    range_header,
    select_properties,
    stored_view,
    to_its_commit,
    wanted_range,
    whole_headers,
)
from modeldepot.store import FileEntry, RepoSummary
from modeldepot.store.verified import VerifiedBlob
from modeldepot.validation import is_commit_id, validate_path, validate_repo_id, validate_revision

__all__ = ["add_hub_routes"]

log = logging.getLogger(__name__)

TREE_PAGE = 1000  # the Hub's page sizes: 1000 entries, 50 when expanded
TREE_PAGE_EXPANDED = 50


DEFAULT_BRANCH = "main"


def _revision(request: web.Request) -> str:
    """The revision the request names; ``HEAD`` (as git and the Hub take it) is the default branch."""
    # (aiohttp decodes what a route matched, %2F and %25 included: "refs%2Fpr%2F1" is refs/pr/1 here)
    revision = request.match_info.get("rev", DEFAULT_BRANCH)
    # A branch's full ref name is the branch, as the Hub reads it: `list_repo_refs` gives `refs/heads/dev`,
    # and a 400 for it reached huggingface_hub's HEAD without its body ("check your connection": a trial)
    revision = revision.removeprefix("refs/heads/")
    try:
        return validate_revision(DEFAULT_BRANCH if revision == "HEAD" else revision)
    except InvalidInputError as refused:
        # No revision of that name can be here: the Hub's answer for a revision it cannot resolve, which
        # huggingface_hub's revision_exists and file_exists take for False (a 400 made them raise). Not on
        # a mirror: its upstream may have such a revision (a tag with a "+"), which it cannot serve.
        if _mirrors(request):
            raise
        repo_id = f"{request.match_info.get('org', '')}/{request.match_info.get('name', '')}"
        raise RevisionNotFoundError(repo_id, revision, str(refused)) from None


def _entry_path(request: web.Request, path: str, repo_id: str, revision: str) -> str:
    """``path`` validated: one that no file of a repo can have ("sub/", "a//b") is not there, as the Hub
    answers (a 400 made huggingface_hub's file_exists raise, and hf_hub_download say "check your
    connection": a trial). Not on a mirror, as for revisions (:func:`_revision`)."""
    try:
        return validate_path(path)
    except InvalidInputError:
        if _mirrors(request):
            raise
        raise EntryNotFoundError(repo_id, revision, path) from None


def _valid_path(path: str) -> bool:
    try:
        validate_path(path)
    except InvalidInputError:
        return False
    return True


def _next_link(request: web.Request, **params: str) -> str:
    """A ``Link`` header to the same listing with ``params`` replaced (an absolute URL: huggingface.js
    follows only those)."""
    kept = [(key, value) for key, value in request.query.items() if key not in params]
    return f'<{request_url(request).with_query([*kept, *params.items()])}>; rel="next"'


async def _visible_repo(request: web.Request, repo_id: str) -> RepoSummary:
    """The repo's summary, or RepoNotFound when it is private and the request carries no valid token (a
    repo gated upstream is described to anyone: RepoSummary.gated)."""
    store = request.app[DEPOT].store

    def summary() -> RepoSummary:
        return request.app[COMMITS].summary(repo_id, lambda: store.repo_summary(repo_id))

    found = await asyncio.to_thread(summary)
    if found.private and not found.gated and not is_authorized(request):
        if not await _shown_again(request, repo_id):
            raise hidden_repo(request, repo_id)
        found = await asyncio.to_thread(summary)
    return found


async def _shown_again(request: web.Request, repo_id: str) -> bool:
    """Whether a private repo a request may not see is public again: on a mirror, one hidden on its
    upstream's word that the upstream shows again (:meth:`UpstreamScans.recheck_hidden`)."""
    return _mirrors(request) and await request.app[MIRROR].scans.recheck_hidden(repo_id)


def _mirrors(request: web.Request) -> bool:
    """Whether this request may be answered through the node's upstream: the node mirrors, and the request is
    no fleet peer's scan (answered from the store: HELD_ONLY_HEADER)."""
    return MIRROR in request.app and HELD_ONLY_HEADER not in request.headers


async def _local_origin(request: web.Request, repo_id: str) -> tuple[str, bool] | None:
    """Where the store's repo came from and whether it is private, its description hidden (one gated
    upstream is described to anyone: its files are :func:`_open_held`'s to refuse); None when the store
    does not hold it."""
    held = await asyncio.to_thread(request.app[DEPOT].store.origin, repo_id)
    if held is None:
        return None
    if (
        held.private
        and not held.gated
        and not is_authorized(request)
        and await _shown_again(request, repo_id)
    ):
        return held.origin, False
    return held.origin, held.private and not held.gated


async def _may_see(request: web.Request, repo_id: str) -> bool:
    """Whether the request may see the store's repo (not held, public, or the request carries the token)."""
    held = await _local_origin(request, repo_id)
    return held is None or not held[1] or is_authorized(request)


async def _mirrorable(request: web.Request, repo_id: str) -> bool:
    """Whether a local miss may be answered from upstream: the node mirrors, and the repo is not one the
    node imported (its own: the upstream's repo of that name is another, and pulling it would mix it in and
    move the repo's branch) nor a private local one this request may not see (a miss must not reveal it)."""
    if not _mirrors(request):
        return False
    held = await _local_origin(request, repo_id)
    return held is None or (held[0] != "import" and (not held[1] or is_authorized(request)))


async def _upstream_first(request: web.Request, repo_id: str, revision: str) -> tuple[bool, bool]:
    """On a mirror, a repo that came from upstream (pulled, or not here at all) is described by the upstream
    (its scan, kept briefly): a mirror holding a few of its files still lists them all, and follows a branch
    that moves. The store answers when the upstream cannot, or not within a few seconds (a hung upstream).
    An imported repo is the node's own, a private one this request may not see is never looked up upstream
    (that would reveal it), and a commit the store holds is answered from the store (it cannot move).
    Returns (whether to ask the upstream first, whether the store holds the repo: it may answer instead)."""
    if not _mirrors(request):
        return False, False
    held = await _local_origin(request, repo_id)
    if held is None:
        return True, False
    origin, private = held
    if origin == "import" or (private and not is_authorized(request)):
        return False, True
    if is_commit_id(revision):
        # A commit adopted from a Hugging Face cache without its listing may be held in part: the store listed
        # what the cache held, and a client kept that listing, and `.no_exist` for the rest (a trial)
        unknown = origin == HF_CACHE_ORIGIN and await asyncio.to_thread(
            lambda: request.app[DEPOT].store.manifests.listing(repo_id, revision.lower()) is None
        )
        # (else a commit the store lacks is a miss, answered from upstream when mirrorable)
        return unknown, True
    return True, True


async def _revision_view(request: web.Request, repo_id: str, revision: str) -> RevisionView:
    """The revision as the upstream describes it (see :func:`_upstream_first`) or as stored here; on a
    local miss, when the node mirrors, the upstream's. Both are described the same way."""
    upstream_error: DepotError | None = None
    first, held = await _upstream_first(request, repo_id, revision)
    if first:
        try:
            return await mirror_revision(request, repo_id, revision, held)
        except PrivateUpstream:
            raise  # (the store must not answer in its place)
        except RevisionNotFoundError as error:
            if not is_commit_id(revision):
                raise  # (a branch the upstream deleted: the store's old ref must not answer, as for a file)
            upstream_error = error
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
    files = await asyncio.to_thread(  # (the whole tree, held or not; kept while the index does not change)
        request.app[COMMITS].files,
        (summary.repo_id, commit_id),
        lambda: depot.commit_files(repo_id, commit_id),
    )
    committed_at = await asyncio.to_thread(depot.store.revision_time, repo_id, commit_id)
    return stored_view(summary, commit_id, files, committed_at)


async def model_info(request: web.Request) -> web.Response:
    expand = expand_names(request.query)
    repo_id = await path_repo(request)
    if "rev" in request.match_info:
        view = await _revision_view(request, repo_id, _revision(request))
    else:  # the repo's: as /api/models lists it (repo_exists asks so)
        view = await _default_view(request, repo_id)
    store = request.app[DEPOT].store
    # The parameters by dtype, as the Hub gives them by default, read from the store; where it lacks weights
    # of a revision a mirror describes from its upstream's scan, the upstream's
    derived: dict[str, Any] = {}
    if not expand or "safetensors" in expand:
        listed = [f.path for f in view.files]
        derived["safetensors"] = await asyncio.to_thread(
            safetensors_info, store, view.repo_id, view.commit_id, listed
        )
    if not expand or "gguf" in expand:
        derived["gguf"] = await asyncio.to_thread(gguf_info, store, view.repo_id, view.commit_id)
    described = view.weights_described
    if not described and not all(derived.values()):  # (a revision held in part, asked by its commit id)
        described = await asyncio.to_thread(described_weights, store, view.repo_id, view.commit_id)
    derived = {name: value or described.get(name) for name, value in derived.items()}
    derived = {name: value for name, value in derived.items() if value}
    # A commit held in part without its listing (adopted from a Hugging Face cache) is listed as the files
    # held, all a node can give; a depot pulling from it is told, and asks its other sources for the commit
    whole = await asyncio.to_thread(request.app[DEPOT].commit_known_whole, view.repo_id, view.commit_id)
    headers = None if whole else {PART_OF_COMMIT_HEADER: "1"}
    if truthy(request.query.get("securityStatus")):
        # (the node scans nothing, and says so in the Hub's shape: code reading `scansDone` raised a TypeError
        # on None, an explorer's trial)
        derived["securityRepoStatus"] = {"scansDone": False, "filesWithIssues": []}
    if not expand:
        return json_response(
            {**model_info_body(view, truthy(request.query.get("blobs"))), **derived}, headers=headers
        )
    config = None  # read from the store: a revision a mirror has not pulled has none
    if "config" in expand:
        config = await asyncio.to_thread(model_config, store, view.repo_id, view.commit_id)
    return json_response(
        select_properties({**model_properties(view, config), **derived}, expand), headers=headers
    )


async def auth_check(request: web.Request) -> web.Response:
    """``HfApi.auth_check``: a 200 when the request may read the repo (a private or gated one takes the node's
    token), else what model info answers (RepoNotFound, as the Hub's 401), or GatedRepo. ``/write`` is a 403 for a repo it may
    read: a node takes no writes over the Hub API. (Without the route, a bare 404 the client could not tell
    from a missing repo.)"""
    repo_id = await path_repo(request)
    view = await _default_view(request, repo_id)
    if view.gated and not is_authorized(request):  # (described to anyone, its files to the token's holders)
        raise GatedRepoError(view.repo_id)
    if request.path.endswith("/write"):
        return error_response(
            403, None, "this node is read-only over the Hub API: publish with `modeldepot import`"
        )
    return json_response({})


async def _default_view(request: web.Request, repo_id: str) -> RevisionView:
    """The repo's view when no revision is named: its default branch's. A mirror whose store holds other
    branches of it only (a client fetched a file of `dev`) answers the upstream's main, as its refs do (it
    described `dev` as the repo, its siblings `dev`'s: an explorer's trial), the store's newest revision only
    when the upstream has no main for it or cannot be asked."""
    listed = await asyncio.to_thread(_listed_revision, request.app[DEPOT], repo_id)
    if listed != DEFAULT_BRANCH and _mirrors(request) and not request.app[MIRROR].scans.lacks_main(repo_id):
        try:
            return await _revision_view(request, repo_id, DEFAULT_BRANCH)
        except PrivateUpstream:
            raise  # (the store must not answer in its place)
        except NotFoundError:
            request.app[MIRROR].scans.note_lacks_main(repo_id)
        except UpstreamError:
            pass
    return await _revision_view(request, repo_id, listed)


def _listed_revision(depot: Depot, repo_id: str) -> str:
    """The default branch; for a repo the store holds without one (imported with ``-r dev`` only), the
    newest revision, which /api/models describes."""
    try:
        summary = depot.store.repo_summary(repo_id)
    except NotFoundError:
        return DEFAULT_BRANCH
    return (
        DEFAULT_BRANCH if DEFAULT_BRANCH in summary.refs else head(depot.store, summary)[0] or DEFAULT_BRANCH
    )


async def list_models(request: web.Request) -> web.Response:
    """``GET /api/models``: the repos the store holds (a mirror lists only those), as the Hub lists models."""
    query = ModelQuery.parse(request.query)
    depot, cache, authorized = request.app[DEPOT], request.app[COMMITS], is_authorized(request)
    page, cursor = await asyncio.to_thread(
        lambda: models_page(depot, query, authorized, cache.repos(depot.store.list_repos)[1])
    )
    return json_response(page, headers={"Link": _next_link(request, cursor=cursor)} if cursor else None)


async def list_commits(request: web.Request) -> web.Response:
    """``GET /api/models/{repo}/commits/{rev}``: the revisions the store holds, newest first, from the one
    ``rev`` names (see :func:`~modeldepot.server.listing.commits_page`); ``p`` and ``limit`` page them."""
    repo_id = await path_repo(request)
    query = CommitQuery.parse(request.query)
    depot: Depot = request.app[DEPOT]
    if _mirrors(request):
        # The revision as the mirror's other routes describe it (the upstream's branch; a repo or branch not
        # pulled yet): model_info answered it, and its commits were "not found", a repo's or a branch's
        # (an explorer's trial). One the store does not hold is listed as that one commit.
        view = await _revision_view(request, repo_id, _revision(request))
        repo_id, commit_id = await asyncio.to_thread(depot.store.spelled, view.repo_id), view.commit_id
        if not await asyncio.to_thread(depot.store.holds_revision, repo_id, commit_id):
            page = [commit_item(commit_id, view.committed_at, query)] if query.page == 0 else []
            return json_response(page, headers={"X-Total-Count": "1"})
    else:
        await _visible_repo(request, repo_id)
        commit_id = await asyncio.to_thread(depot.resolve, repo_id, _revision(request))
    page, total, more = await asyncio.to_thread(commits_page, depot.store, repo_id, commit_id, query)
    headers = {"X-Total-Count": str(total)}
    if more:
        headers["Link"] = _next_link(request, p=str(query.page + 1))
    return json_response(page, headers=headers)


@dataclass(frozen=True)
class _Tree:
    """A revision's files plus its folders, with git oids for both, as the tree API lists them."""

    commit_id: str
    files: dict[str, FileEntry]
    folder_oids: dict[str, str]  # '' is the root
    listed: dict[tuple[str, bool], list[str]] = field(default_factory=dict)

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
        """The sorted paths under ``folder`` (kept: each page of a listing asks again)."""
        key = (folder, recursive)
        if key not in self.listed:
            paths = [p for p in (*self.folder_oids, *self.files) if p]
            prefix = f"{folder}/" if folder else ""
            inside = [p for p in paths if p.startswith(prefix)]
            if not recursive:
                inside = [p for p in inside if "/" not in p[len(prefix) :]]
            if len(self.listed) >= 16:
                self.listed.clear()
            self.listed[key] = sorted(inside)
        return self.listed[key]


async def _tree_of(request: web.Request, repo_id: str, revision: str) -> tuple[_Tree, float]:
    """The revision's tree and when its commit was made here (an import or a pull; an upstream's scan)."""
    view = await _revision_view(request, repo_id, revision)
    # (built once per listing the commit cache keeps: a mirror's upstream views are built each time)
    tree = await asyncio.to_thread(  # (off the loop: 0.2 s for 100,000 files stalled every other request)
        request.app[COMMITS].built,
        (view.repo_id, view.commit_id),
        view.files,
        lambda: _Tree.of(view.commit_id, list(view.files)),
    )
    return tree, view.committed_at


async def list_tree(request: web.Request) -> web.Response:
    repo_id = await path_repo(request)
    revision = _revision(request)
    folder = request.match_info.get("path", "").strip("/")
    if folder:
        _entry_path(request, folder, repo_id, revision)
    tree, updated_at = await _tree_of(request, repo_id, revision)
    if folder and folder not in tree.folder_oids:
        raise EntryNotFoundError(repo_id, revision, folder, tree.commit_id)
    expand = truthy(request.query.get("expand"))
    paths = await asyncio.to_thread(tree.listing, folder, truthy(request.query.get("recursive")))
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
        headers["Link"] = _next_link(request, cursor=str(cursor + page))
    return json_response([tree.entry(p, expand, updated_at) for p in chunk], headers=headers)


MAX_PATHS_INFO = 1000  # paths one paths-info request may name (the Hub's cap; aiohttp's on form fields)


async def _paths_info_request(request: web.Request) -> tuple[list[str], bool]:
    """The paths and ``expand`` of a paths-info request: a JSON body (``{"paths": [...], "expand": true}``,
    as huggingface.js sends it) or a form (``paths=a&paths=b&expand=True``, as huggingface_hub does)."""
    if request.content_type == "application/json":
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
            raise InvalidInputError("the paths-info body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidInputError('the paths-info body must be a JSON object: {"paths": [...]}')
        paths = body.get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise InvalidInputError("paths must be a list of strings")
        expand = body.get("expand", False)
        expand = truthy(expand) if isinstance(expand, str) else expand is True
    else:
        try:
            form = await request.post()
        except (
            web.HTTPRequestEntityTooLarge
        ) as error:  # (aiohttp's cap on form fields: said as the node says it)
            if "form fields" not in (error.text or ""):
                raise  # (a body over the size cap: aiohttp's words say so)
            raise web.HTTPRequestEntityTooLarge(MAX_PATHS_INFO, MAX_PATHS_INFO + 1, text=f"at most {MAX_PATHS_INFO} "
                                                "paths per paths-info request, as on the Hub") from None  # fmt: skip
        except (ValueError, LookupError) as error:  # not UTF-8, no boundary, an unknown charset...
            raise InvalidInputError(f"the paths-info form could not be read: {error}") from None
        paths = [str(p) for p in form.getall("paths", [])]
        expand = truthy(str(form.get("expand", "")))
    # (each once, in order; one no file can have is not there, as a missing one: the Hub's batch leaves those
    # out, and one such path failed the whole batch with a 400)
    wanted = list(dict.fromkeys(p.strip("/") for p in paths if _valid_path(p.strip("/"))))
    if len(wanted) > MAX_PATHS_INFO:
        raise web.HTTPRequestEntityTooLarge(MAX_PATHS_INFO, len(wanted), text=f"at most {MAX_PATHS_INFO} paths per "
                                            f"paths-info request, as on the Hub; {len(wanted)} were sent")  # fmt: skip
    return wanted, expand


async def paths_info(request: web.Request) -> web.Response:
    repo_id = await path_repo(request)
    revision = _revision(request)
    wanted, expand = await _paths_info_request(request)
    tree, updated_at = await _tree_of(request, repo_id, revision)
    found = [p for p in wanted if p in tree.files or p in tree.folder_oids]
    return json_response([tree.entry(p, expand, updated_at) for p in found])


async def list_refs(request: web.Request) -> web.Response:
    """The refs the store holds. On a mirror, main is the upstream's (as model info and files follow it):
    a repo not pulled yet has that one, where it was "not found" while its files were served; and so are
    the other branches it holds, MIRRORED_REFS at most, each as its scan says (a branch moved upstream was
    listed at its old commit while model info and files followed it, one deleted there listed still: an
    explorer's trial)."""
    repo_id = await path_repo(request)
    refs: dict[str, str] = {}
    tags: tuple[str, ...] = ()  # (of refs, the git tags a pull of one recorded so)
    try:
        summary = await _visible_repo(request, repo_id)
        refs, tags = dict(summary.refs), summary.tag_refs
    except RepoNotFoundError:
        if not await _mirrorable(request, repo_id):
            raise
    first, held = await _upstream_first(request, repo_id, DEFAULT_BRANCH)
    if first:
        others = sorted(name for name in refs if name != DEFAULT_BRANCH and not name.startswith("refs/pr/"))
        names = [DEFAULT_BRANCH, *others[: MIRRORED_REFS - 1]]
        seen = await asyncio.gather(
            *(mirror_revision(request, repo_id, name, held) for name in names), return_exceptions=True
        )
        for name, view in zip(names, seen, strict=True):
            if isinstance(view, RevisionView):
                refs[name] = view.commit_id
            elif isinstance(view, PrivateUpstream) or not isinstance(view, (UpstreamError, NotFoundError)):
                raise view
            elif name != DEFAULT_BRANCH and isinstance(view, RevisionNotFoundError):
                refs.pop(name, None)  # (deleted upstream: not served here either)
            elif name == DEFAULT_BRANCH and not refs:
                raise view
    include_prs = truthy(request.query.get("include_prs"))
    branches, tagged, pulls = [], [], []
    for name, commit_id in sorted(refs.items()):
        if name.startswith("refs/pr/"):
            pulls.append({"name": name, "ref": name, "targetCommit": commit_id})
        elif name in tags:
            tagged.append({"name": name, "ref": f"refs/tags/{name}", "targetCommit": commit_id})
        else:
            branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit_id})
    return json_response(
        {
            "branches": branches,
            "converts": [],
            "tags": tagged,
            **({"pullRequests": pulls} if include_prs else {}),
        }
    )


MIRRORED_REFS = 16  # branches a mirror's refs listing asks its upstream about, main first

FileAnswer = Callable[[web.Request, str, str, str], Awaitable[web.StreamResponse]]


async def _serve_file(request: web.Request, local: FileAnswer, remote: FileAnswer) -> web.StreamResponse:
    """A file of a revision: ``local`` answers from the store, ``remote`` from a mirror's upstream (each
    called with the repo, the revision and the path), whichever knows the file, in the mirror's order."""
    if _mirrors(request):
        repo_id = await path_repo(request)
    else:  # spelled as the store spells it by the file's lookup, in its one trip to a worker thread
        repo_id = validate_repo_id(f"{request.match_info['org']}/{request.match_info['name']}")
    revision = _revision(request)
    path = _entry_path(request, request.match_info["path"], repo_id, revision)
    if (
        _resumes(request)
        and _mirrors(request)
        and await _may_see(request, repo_id)  # (a private repo it may not see is a 404, below, not a 429)
        and not await request.app[MIRROR].settled(repo_id, path, RESUME_PATIENCE)
    ):
        # Bytes an answer of the file sent are still to be checked (its client may be this one, resuming after
        # a timeout): neither a range (joined to them) nor the whole file (which HfFileSystem's streaming reader
        # appends to what it has) may go yet. 429 and Retry-After: huggingface_hub's readers wait and retry.
        return error_response(429, None, f"{path}: bytes an earlier answer sent are being checked; retry in a few "
                              "seconds", {"Retry-After": "2"})  # fmt: skip
    if (
        _resumes(request)
        and _mirrors(request)
        and request.app[MIRROR].broke(repo_id, path)
        and not await request.app[MIRROR].proven_by_store(repo_id, revision, path)
    ):
        # A client resuming a response that broke would join good bytes to refuted ones: send it whole. (Not
        # a read of a closed range, HfFileSystem's: it takes a 200 for the range it asked, wrong bytes.)
        request = request.clone(headers={k: v for k, v in request.headers.items() if k.lower() != "range"})
    upstream_error: DepotError | None = None
    first, held = await _upstream_first(request, repo_id, revision)
    if first:
        try:
            manifest = await upstream_manifest(request, repo_id, revision, held)
            # (the store may hold it: it must not answer what the upstream hides; and first: a file a private
            # repo lacks was said so to anyone, a trial)
            check_public(request, manifest, files=True)
            request.app[MIRROR].remote_file(manifest, revision, path)
        except (EntryNotFoundError, PrivateUpstream):
            # The upstream answered: its commit for the revision has no such file (removed there). The store's
            # older commit must not answer: a client would mix two commits (its refs/main moved back).
            raise
        except RevisionNotFoundError as error:
            # (a branch the upstream deleted, as a bad model's is: the mirror served its old commit for good,
            # an explorer's trial; a commit id it holds stays its to answer)
            if not is_commit_id(revision):
                raise
            upstream_error = error
        except (UpstreamError, NotFoundError) as error:
            upstream_error = error  # the store may still hold it
        else:  # the upstream's commit: from the store when it holds the file, else pulled while served
            try:
                answer = await local(request, repo_id, manifest.commit_id, path)
            except (RepoNotFoundError, RevisionNotFoundError, EntryNotFoundError, CorruptBlobError,
                    BlobRemovedError) as error:  # fmt: skip
                _say_fetched_again(error, repo_id, manifest.commit_id, path)
                # (a quarantined file is pulled again)
                return _counted(request, "upstream", await remote(request, repo_id, revision, path))
            if not is_commit_id(revision):
                # (a branch whose commit the store held already: served, and not listed by list_repo_refs, as
                # the branches a pull found are, an explorer's trial)
                await request.app[MIRROR].scans.point_branches(manifest, its_own=True)
            return _counted(request, "store", answer)
    try:
        answer = await local(request, repo_id, revision, path)  # (a use, counted as the blob is opened)
    except (RepoNotFoundError, RevisionNotFoundError, EntryNotFoundError, CorruptBlobError,
            BlobRemovedError) as error:  # fmt: skip
        if upstream_error is not None:
            raise upstream_error from None
        if not await _mirrorable(request, repo_id):
            raise
        _say_fetched_again(error, repo_id, revision, path)
        return _counted(request, "upstream", await remote(request, repo_id, revision, path))
    return _counted(request, "store", answer)


def _counted(request: web.Request, source: str, answer: web.StreamResponse) -> web.StreamResponse:
    """``answer``, a mirror's of a file from its store or through its upstream, counted when it sends the
    file (/metrics: a mirror that served everything from its upstream looked as one that served from its
    disk, an explorer's trial; a HEAD, a redirect to the commit's URL, an error are no answer of a file)."""
    if _mirrors(request) and request.method == "GET" and answer.status in (200, 206):
        request.app[MIRROR].answers[source] += 1
    return answer


def _say_fetched_again(error: DepotError, repo_id: str, revision: str, path: str) -> None:
    """A mirror that found its copy of a file corrupt fetches it again: said as a node that serves no
    upstream says it (its 503), or a failing disk went unnoticed (the file answered right, the quarantine
    gauge back at 0 once it was fetched again: an explorer's trial)."""
    if isinstance(error, CorruptBlobError):
        log.warning("%s/%s at %s: the store's copy is corrupt (%s): quarantined, and fetched again from the "
                    "upstream", repo_id, path, revision[:12], error.detail)  # fmt: skip


RESUME_PATIENCE = 5.0  # seconds a resume waits for the check of bytes an earlier answer of its file sent

_RESUME = re.compile(r"\s*bytes\s*=\s*\d+\s*-\s*", re.ASCII | re.IGNORECASE)


_FROM_THE_START = re.compile(r"\s*bytes\s*=\s*0+\s*-\s*\d*\s*", re.ASCII | re.IGNORECASE)


def starts_a_download(request: web.Request) -> bool:
    """Whether the request is a download's first (a GET of the file, or of a range from its first byte): one
    use of the file, however many ranges a client asks for it in (a peer's pull of a 768 MiB file counted
    49 uses, and `--preload-top` preloaded the file a peer fetched once over the model loaded ten times)."""
    header = range_header(request)
    return request.method == "GET" and (header is None or bool(_FROM_THE_START.fullmatch(header)))


def _resumes(request: web.Request) -> bool:
    """Whether the request asks for the rest of a file from an offset (``Range: bytes=N-``), as a client
    resuming a download does."""
    return bool(_RESUME.fullmatch(range_header(request) or ""))


async def resolve(request: web.Request) -> web.StreamResponse:
    return await _serve_file(request, _local_resolve, mirror_resolve)


async def raw(request: web.Request) -> web.StreamResponse:
    """``/{repo}/raw/{rev}/{path}`` as the Hub answers it: a plain file's bytes, and for an LFS file its
    git-lfs pointer; the ETag is the git blob oid of what is sent (FileEntry.git_oid in both cases)."""
    return await _serve_file(request, _local_raw, _mirror_raw)


async def _local_resolve(request: web.Request, repo_id: str, revision: str, path: str) -> web.StreamResponse:
    # An LFS file asked for by a branch is a redirect to its commit (to_its_commit): not opened
    redirects = not is_commit_id(request.match_info.get("rev", ""))
    entry, reader, checked = await _open_held(request, repo_id, revision, path, opens_lfs=not redirects)
    if reader is None:
        headers = file_headers(entry, request)
        pinned = to_its_commit(request, entry.commit_id, headers)
        # (else a HEAD of a file found corrupt: _open_held)
        return pinned if pinned is not None else headers_only(headers, entry.size)
    return await send_blob(request, reader, entry.etag, file_headers(entry, request), checked=checked)


def _held_entry(depot: Depot, repo_id: str, path: str, revision: str) -> FileEntry:
    """The file as the depot holds it; one its commit has (a pull of one variant), or may have (an adopted
    cache's commit, not known whole), that is not held here is an EntryNotFoundError that says so
    (``in_commit``: answered without the commit's id)."""
    try:
        return depot.file_info(repo_id, path, revision)
    except EntryNotFoundError as missing:
        if missing.commit_id and depot.commit_may_have(repo_id, missing.commit_id, path) is not False:
            raise EntryNotFoundError(repo_id, revision, path, missing.commit_id, in_commit=True) from None
        raise


async def _open_held(
    request: web.Request, repo_id: str, revision: str, path: str, *, opens_lfs: bool
) -> tuple[FileEntry, VerifiedBlob | None, int | None]:
    """The file as the store holds it (the repo visible to the request), opened for reading unless it is an
    LFS file and not ``opens_lfs``, and the chunk already checked of it (a GET from the first byte: the
    first): one trip to a worker thread, where a node answering 300 configs made five per file."""
    depot: Depot = request.app[DEPOT]
    authorized = is_authorized(request)
    counts_as_use = starts_a_download(request)
    # (not when the answer may have no body: a revalidation is answered without reading the file)
    from_the_start = (
        request.method == "GET" and "Range" not in request.headers and "If-None-Match" not in request.headers
    )

    def open_held() -> tuple[FileEntry, VerifiedBlob | None, int | None]:
        spelled = depot.store.spelled(repo_id)
        held = None if authorized else depot.store.origin(spelled)
        if held is not None and held.private:
            raise GatedRepoError(spelled) if held.gated else hidden_repo(request, repo_id)
        try:
            entry = _held_entry(depot, spelled, path, revision)
        except CorruptBlobError as corrupt:
            if request.method != "HEAD":
                raise
            # A HEAD of a file found corrupt is answered from its listing (the GET says why it is not sent):
            # huggingface_hub retried a HEAD's 503 for 23 s, then said "check your connection", and
            # file_exists raised (an explorer's trial). (A tier's file: as it was.)
            try:
                return depot.store.entry(spelled, path, revision, corrupt_ok=True), None, None
            except NotFoundError:
                raise corrupt from None
        if entry.lfs and not opens_lfs:
            return entry, None, None
        reader = depot.open_verified(entry, counts_as_use=counts_as_use)
        if not from_the_start or not entry.size:
            return entry, reader, None
        try:
            reader.check(0)
        except BaseException:
            reader.close()
            raise
        return entry, reader, 0

    opening = asyncio.ensure_future(asyncio.to_thread(open_held))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:  # (its deadline, say): what the thread opens is closed when it ends
        opening.add_done_callback(_close_opened)
        raise


def _close_opened(done: asyncio.Future[tuple[FileEntry, VerifiedBlob | None, int | None]]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    reader = done.result()[1]
    if reader is not None:
        reader.close()


async def _local_raw(request: web.Request, repo_id: str, revision: str, path: str) -> web.StreamResponse:
    entry, reader, checked = await _open_held(request, repo_id, revision, path, opens_lfs=False)
    if reader is None:
        return _pointer_response(request, entry)
    return await send_blob(
        request, reader, entry.git_oid, {"X-Repo-Commit": entry.commit_id}, checked=checked
    )


async def _mirror_raw(request: web.Request, repo_id: str, revision: str, path: str) -> web.StreamResponse:
    """Raw from a mirror's upstream: an LFS file's pointer from the upstream's metadata (nothing is pulled),
    a plain file's bytes as resolve pulls and streams them."""
    view = await mirror_revision(request, repo_id, revision)
    entry = next((f for f in view.files if f.path == path), None)
    if entry is None:
        raise EntryNotFoundError(repo_id, revision, path, view.commit_id)
    if entry.lfs:
        if view.gated and not is_authorized(request):  # (a file of it, as the bytes are)
            raise GatedRepoError(view.repo_id)
        return _pointer_response(request, entry)
    return await mirror_resolve(request, repo_id, revision, path)


def _pointer_response(request: web.Request, entry: FileEntry) -> web.Response:
    """An LFS file's pointer, as the raw route sends it: whole, or the range asked for."""
    body = lfs_pointer(entry.sha256, entry.size)
    headers = {"X-Repo-Commit": entry.commit_id, "ETag": f'"{entry.git_oid}"', "Accept-Ranges": "bytes"}
    try:
        wanted = wanted_range(request, len(body), entry.git_oid)
    except RangeNotSatisfiable:
        return not_satisfiable(headers, len(body))
    if wanted is None:
        headers.update(whole_headers(request, len(body)))
        return web.Response(body=body, headers=headers, content_type="text/plain", charset="utf-8")
    headers["Content-Range"] = wanted.content_range(len(body))
    return web.Response(status=206, body=body[wanted.start : wanted.end + 1], headers=headers,
                        content_type="text/plain", charset="utf-8")  # fmt: skip


async def no_org(request: web.Request) -> web.Response:
    """A repo id of one part: a RepoNotFound (a bare 404 was taken by huggingface_hub for a broken
    connection, "check your connection"), saying what the node holds."""
    name = request.match_info["name"]
    if "/" in name:  # (sent as %2F: "not found" of a repo the node holds misled, an explorer's trial)
        return error_response(404, "RepoNotFound", f"Repository not found: {name!r} arrived as one name, its "
                              "'/' sent encoded (%2F): send the repo id's '/' as it is")  # fmt: skip
    return error_response(404, "RepoNotFound", f"Repository not found: {name} (a node holds repos as org/name: "
                          f"give the repo's full id, as the Hub names it now)")  # fmt: skip


async def no_xet(request: web.Request) -> web.Response:
    """A node serves files over plain HTTP and never advertises Xet, but huggingface_hub (with hf_xet) asks
    for a Xet token without a HEAD when its cache holds the Hub's listing of the commit with Xet hashes
    (``trees/<commit>.json``): a cache filled from the Hub failed there with "no route" (an explorer's
    trial). Said with the way out."""
    commit = request.match_info["rev"][:64]
    return error_response(
        501, None, "this node serves files over plain HTTP, not Xet: huggingface_hub asked for Xet because its "
        f"cache holds the Hub's listing of commit {commit} (models--ORG--NAME/trees/{commit}.json under "
        "HF_HUB_CACHE), with Xet hashes. Set HF_HUB_DISABLE_XET=1 where you download from a node, or delete "
        "that trees/ file (it is listed again, through the node)",
    )  # fmt: skip


async def whoami(request: web.Request) -> web.Response:
    """``/api/whoami-v2``: `hf auth login --token T` and `whoami` check a token with it (without, a node's
    token could be given as HF_TOKEN alone: a trial). The node's token (on a node without one, its control
    token) is a read token of the user "modeldepot"; anything else is refused, as the Hub refuses a bad
    token."""
    if "Authorization" not in request.headers or not is_authorized(request):
        return error_response(401, None, "Invalid credentials in Authorization header: give the node's token "
                              "(serve --token), or none: a node without one serves its public repos to anyone")  # fmt: skip
    return json_response({
        "type": "user", "id": "modeldepot", "name": "modeldepot", "fullname": "modeldepot node", "orgs": [],
        "auth": {"type": "access_token", "accessToken": {"displayName": "modeldepot-node", "role": "read"}},
    })  # fmt: skip


async def not_models(request: web.Request) -> web.Response:
    """Datasets and Spaces: a node holds model repos only. Their listing (``list_datasets``) is an empty one,
    as of any author's none: it was a RepoNotFound that huggingface_hub raised (an explorer's trial)."""
    kind = request.match_info["kind"]
    if request.match_info["tail"] in ("", "/") and request.method in ("GET", "HEAD"):
        return json_response([])
    return error_response(404, "RepoNotFound", f"this node serves model repos only, not {kind}")


async def read_only(request: web.Request) -> web.Response:
    """Any other /api route: writes (uploads, commits, repo creation and settings) are refused, since a node
    is filled by `modeldepot import` and pulls; reads it does not know are a 404."""
    if request.path.startswith("/api/depot/") and "%2f" in request.raw_path.split("?", 1)[0].lower():
        # (a repo id's '/' sent as %2F: the router took it as one name, and the 405 below said the method
        # asked for was not allowed, with it in Allow; an explorer's trial)
        return error_response(404, "RepoNotFound", f"no route {request.path}: a repo id's '/' arrived sent "
                              "encoded (%2F): send the repo id's '/' as it is")  # fmt: skip
    allowed = _methods_of_other_routes(request)
    if allowed:  # (a route of the node's own API, asked with another method: its 405, not the Hub's)
        return error_response(405, None, f"{request.method} is not allowed on {request.path}",
                              {"Allow": ", ".join(sorted(allowed))})  # fmt: skip
    if request.method in ("GET", "HEAD"):
        return error_response(404, None, f"this node has no route {request.path}")
    return error_response(
        405,
        None,
        "this node is read-only over the Hub API: publish with `modeldepot import`, or pull from the Hub",
        {"Allow": "GET, HEAD"},
    )


def _methods_of_other_routes(request: web.Request) -> set[str]:
    """The methods the app's other routes take for this path (the catch-all matched it for another)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if not resource.canonical.startswith("/api/depot/"):
            continue
        for route in resource:
            if route.method != "*" and path_matches(resource, request.path):
                allowed.add(route.method)
    return allowed


async def agent_harnesses(request: web.Request) -> web.Response:
    """The registry huggingface_hub reads (``/api/agent-harnesses``) to tell AI agents apart in its
    user-agent: a node keeps none, so an empty one. Answered, the client caches it for a day in HF_HOME;
    left a 404, every client process asked again before its first real request."""
    return web.json_response({"standardEnvVars": [], "harnesses": {}})


def add_hub_routes(app: web.Application) -> None:
    app[COMMITS] = CommitCache(app[DEPOT].store)

    async def close_commits(app: web.Application) -> None:
        app[COMMITS].close()

    app.on_cleanup.append(close_commits)
    repo = "/api/models/{org}/{name}"
    # A pull request's ref unencoded (`resolve/refs/pr/1/config.json`, as a user types it and the Hub takes
    # it): matched before the routes below, where "refs" was taken for the revision and "pr/1/" for the path
    pr_ref = r"{rev:refs/pr/\d+}"
    app.router.add_get(repo, model_info)
    for rev in (pr_ref, "{rev}"):
        app.router.add_get(f"{repo}/revision/{rev}", model_info)
        app.router.add_get(f"{repo}/tree/{rev}", list_tree)
        app.router.add_get(repo + f"/tree/{rev}/{{path:.+}}", list_tree)
        app.router.add_post(f"{repo}/paths-info/{rev}", paths_info)
    app.router.add_get(repo + "/refs", list_refs)
    app.router.add_get(repo + "/auth-check", auth_check)
    app.router.add_get(repo + "/auth-check/write", auth_check, name="refused-auth-check-write")  # (a 403)
    app.router.add_get(repo + "/commits/{rev:.+}", list_commits)  # huggingface.js does not encode the rev
    app.router.add_route("*", repo + "/xet-{kind:read|write}-token/{rev:.+}", no_xet, name="refused-xet")
    app.router.add_get("/api/models", list_models)
    app.router.add_get("/api/agent-harnesses", agent_harnesses)
    app.router.add_get("/api/whoami-v2", whoami)
    for rev in (pr_ref, "{rev}"):  # (add_get answers HEAD too)
        app.router.add_get(f"/{{org}}/{{name}}/resolve/{rev}/{{path:.+}}", resolve)
        app.router.add_get(f"/{{org}}/{{name}}/raw/{rev}/{{path:.+}}", raw)
    # Repo ids without an org (the Hub's old ones: gpt2): after the routes above, which they cannot match
    one_part = "/api/models/{name:[^/]+}{tail:(/revision/.+|/tree/.+|/paths-info/.+|/refs|/commits/.+|/auth-check.*)?}"
    app.router.add_route("*", one_part, no_org, name="refused-no-org")
    app.router.add_route(
        "*", "/{name}/{kind:resolve|raw}/{rev}/{path:.+}", no_org, name="refused-no-org-file"
    )
    # What a node deliberately does not answer, said clearly rather than with a bare 404 (docs/hub-api.md).
    app.router.add_route("*", "/api/{kind:datasets|spaces}{tail:.*}", not_models, name="refused-api-kind")
    app.router.add_route("*", "/{kind:datasets|spaces}/{tail:.+}", not_models, name="refused-kind")
    app.router.add_route("*", "/api/{tail:.+}", read_only, name="refused-api")
