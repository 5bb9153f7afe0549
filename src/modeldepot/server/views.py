"""How the Hub routes describe a revision and its files: one shape, whether the revision is stored here or
is an upstream's that a mirror is still pulling.

Both kinds become a :class:`RevisionView` (its files as :class:`~modeldepot.store.FileEntry`), and every
answer (model info, tree entries, resolve headers, ranges with ``If-Range``) is built from that by the same
functions, so a client cannot tell, from its shape, a file the node holds from one it is fetching.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from aiohttp import web

from modeldepot.gitobjects import lfs_pointer
from modeldepot.modelcard import FILE_TAGS, UPSTREAM_TAGS, labels
from modeldepot.server.ranges import ByteRange, parse_range
from modeldepot.store import FileEntry, RepoSummary
from modeldepot.validation import MAX_TAGS, is_commit_id, is_label

__all__ = [
    "COMMIT_AUTHOR",
    "COMMIT_TITLE",
    "MODEL_PROPERTIES",
    "RevisionView",
    "file_headers",
    "hub_tags",
    "iso_time",
    "lfs_info",
    "model_info_body",
    "model_properties",
    "select_properties",
    "stored_view",
    "wanted_range",
    "whole_headers",
]

COMMIT_TITLE = "modeldepot import"
COMMIT_AUTHOR = "modeldepot"  # the author of every commit the node lists (gitobjects' fixed identity)

# What ``expand`` may name: the properties huggingface_hub (ExpandModelProperty_T) and huggingface.js
# (MODEL_EXPANDABLE_KEYS) ask the Hub for. The Hub refuses other names; a known one the node has no value
# for (gguf, safetensors, inference, ...) is left out of the answer, as the Hub leaves out what a repo lacks.
MODEL_PROPERTIES = frozenset({
    "author", "baseModels", "cardData", "childrenModelCount", "config", "createdAt", "disabled", "downloads",
    "downloadsAllTime", "evalResults", "gated", "gguf", "gitalyUid", "inference", "inferenceProviderMapping",
    "lastModified", "library_name", "likes", "mask_token", "model-index", "pipeline_tag", "private",
    "resourceGroup", "safetensors", "sha", "siblings", "spaces", "tags", "transformersInfo", "trendingScore",
    "usedStorage", "widgetData", "xetEnabled",
})  # fmt: skip


def iso_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(timestamp))


@dataclass(frozen=True)
class RevisionView:
    """A revision as the Hub's routes describe it."""

    repo_id: str
    commit_id: str
    files: tuple[FileEntry, ...]
    private: bool
    gated: bool | str  # False, or the upstream's "auto"/"manual" for a repo pulled from a gated one
    card: dict[str, Any]  # pipeline_tag, library_name, tags, ...: what the model card says
    created_at: float  # the repo's first import or pull here (an upstream's: when it was scanned)
    updated_at: float
    committed_at: float  # when this revision was imported or pulled (lastCommit's date)
    # An upstream's ``safetensors``/``gguf`` of a revision described from its scan: given when the store
    # cannot derive them (it does not hold the weights yet)
    weights_described: dict[str, Any] = field(default_factory=dict)


def stored_view(
    summary: RepoSummary, commit_id: str, files: Iterable[FileEntry], committed_at: float
) -> RevisionView:
    """A revision the store holds, described from its repo's summary."""
    return RevisionView(
        repo_id=summary.repo_id,
        commit_id=commit_id,
        files=tuple(files),
        private=summary.private and not summary.gated,  # (the Hub's: a gated repo is not private)
        gated=summary.card.get("gated", False),
        card={k: v for k, v in summary.card.items() if k != "gated"},
        created_at=summary.created_at,
        updated_at=summary.updated_at,
        committed_at=committed_at,
    )


def _names(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if isinstance(v, str) and v]


def hub_tags(card: dict[str, Any]) -> list[str]:
    """A repo's tags as the Hub lists them: the card's own, then its library, its files' formats
    (``safetensors``, ``gguf``, ``onnx``), pipeline tag, ``license:X``, ``base_model:X``, its languages and
    ``dataset:X`` (what ``filter`` matches on the Hub: ``filter="en"``, ``trained_dataset=``), each once."""
    tags = [
        *_names(card.get(UPSTREAM_TAGS, [])),  # (a pulled repo's: as its upstream listed them)
        *_names(card.get("tags", [])),
        *_names(card.get("library_name")),
        *_names(card.get(FILE_TAGS, [])),
        *_names(card.get("pipeline_tag")),
        *(f"license:{name}" for name in _names(card.get("license"))),
        *(f"base_model:{name}" for name in _names(card.get("base_model"))),
        *_names(card.get("language")),
        *(f"dataset:{name}" for name in _names(card.get("datasets"))),
    ]
    # (as an upstream's must be: a card stored before its values were checked went out with terminal escapes,
    # which every other modeldepot refused)
    return labels(list(dict.fromkeys(tags)))[:MAX_TAGS]


def lfs_info(entry: FileEntry) -> dict[str, Any]:
    return {"size": entry.size, "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}


def _sibling(entry: FileEntry, blobs: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"rfilename": entry.path}
    if blobs:
        item.update(size=entry.size, blobId=entry.git_oid)
        if entry.lfs:
            item["lfs"] = {"sha256": entry.sha256, **lfs_info(entry)}
    return item


def model_info_body(view: RevisionView, blobs: bool) -> dict[str, Any]:
    """``GET /api/models/{repo}[/revision/{rev}]``, as the Hub answers it (``blobs``: sizes and digests)."""
    body: dict[str, Any] = {
        "_id": view.repo_id,
        "id": view.repo_id,
        "modelId": view.repo_id,
        "author": view.repo_id.split("/")[0],
        "sha": view.commit_id,
        "lastModified": iso_time(view.updated_at),
        "createdAt": iso_time(view.created_at),
        "private": view.private,
        "gated": view.gated,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": hub_tags(view.card),
        "siblings": [_sibling(f, blobs) for f in view.files],
    }
    for key in ("pipeline_tag", "library_name"):
        if view.card.get(key) and is_label(view.card[key]):
            body[key] = view.card[key]
    card_data = {k: v for k, v in view.card.items() if k not in (FILE_TAGS, UPSTREAM_TAGS)}  # (the README's)
    if card_data:
        body["cardData"] = card_data
    if blobs:
        body["usedStorage"] = sum(f.size for f in view.files)
    return body


def model_properties(view: RevisionView, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every property of the repo at ``view`` the node knows, by the Hub's names: model info's, plus those
    a listing or ``expand`` may ask for (``config``: what :func:`~modeldepot.server.listing.model_config`
    read, if asked)."""
    body = model_info_body(view, blobs=False)
    body.update(trendingScore=0, downloadsAllTime=0, spaces=[], usedStorage=sum(f.size for f in view.files))
    if config is not None:
        body["config"] = config
    return body


def select_properties(body: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``_id``, ``id`` and the named properties the body has, in the body's order (the Hub's ``expand``)."""
    keep = {"_id", "id", *names}
    return {key: value for key, value in body.items() if key in keep}


def file_headers(entry: FileEntry, request: web.Request) -> dict[str, str]:
    """The headers of a resolve answer that describe the file (the body's headers come apart)."""
    return {
        "X-Repo-Commit": entry.commit_id,
        "X-Linked-Etag": f'"{entry.etag}"',
        "X-Linked-Size": str(entry.size),
        "ETag": f'"{entry.etag}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "Content-Disposition": disposition(entry.path, request.query.get("download", "").lower() == "true"),
    }


def disposition(path: str, download: bool) -> str:
    """``Content-Disposition`` as the Hub sends it: the file's own name (RFC 6266, UTF-8 and an ASCII
    fallback), ``attachment`` for a ``?download=true`` link. Without it ``wget --content-disposition`` and
    ``curl -OJ`` saved "model.safetensors?download=true" (an explorer's trial)."""
    name = path.rsplit("/", 1)[-1]
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    kind = "attachment" if download else "inline"
    # (the Hub's order: a parser that takes the first, Python's, takes the UTF-8 one; curl reads filename=)
    encoded = quote(name, safe="")
    return f"{kind}; filename*=UTF-8''{encoded}; filename=\"{fallback}\""


def to_its_commit(request: web.Request, commit_id: str, headers: dict[str, str]) -> web.Response | None:
    """An LFS file asked for by a branch (or a commit id's start): a redirect to the same file at its
    commit, with the file's headers, as the Hub's redirect to its CDN. huggingface_hub then downloads, and
    resumes, from that URL: from the branch's, a download cut after the branch moved resumed with the new
    commit's bytes, and the old commit's file held both (a trial; it checks the size alone). None for a
    full commit id, and for a plain file (sent as ever: small, and the Hub sends those itself)."""
    revision = request.match_info.get("rev", "")
    if revision == commit_id or is_commit_id(revision):
        return None
    # Relative to the request's own URL (up from its revision and path to ``resolve/``), so that it leads
    # where the client reached the node: behind a reverse proxy under a prefix, the root's path lost it, and
    # every file asked for by branch was a 404 there (an explorer's trial)
    ups = len(request.rel_url.raw_path.split("/")) - 5  # (the segments after resolve/, less the file's own)
    location = "../" * ups + f"{commit_id}/{quote(request.match_info['path'])}"
    if request.rel_url.raw_query_string:  # (as sent: decoded, "%0d%0a" broke the header and "%23" cut it)
        location += f"?{request.rel_url.raw_query_string}"
    return web.Response(status=302, headers={**headers, "Location": location})


def range_header(request: web.Request) -> str | None:
    """The request's ``Range``; None for none, or for two or more: not one range (a proxy joined two
    requests, a client's bug), so ignored as a header of several ranges is, and the file goes whole (a 200
    says so: serving the first, a client asking for the second joined the wrong bytes)."""
    values = request.headers.getall("Range", [])
    return values[0] if len(values) == 1 else None


def wanted_range(request: web.Request, size: int, etag: str, *, hub: bool = True) -> ByteRange | None:
    """The range to send: ``None`` for the whole file (no ``Range``, one we ignore, or an ``If-Range``
    naming another version); raises RangeNotSatisfiable for a 416.

    ``hub``: the Hub's routes (resolve, raw) send an empty file whole whatever range is asked, with its
    size in ``Content-Range`` (:func:`whole_headers`): no range of an empty file exists, RFC 9110 lets a
    server ignore a Range, and huggingface.js asks every file for ``bytes=0-0`` and takes a 416 for a
    failure. The node's own routes answer such a request 416, as the RFC has it.
    """
    if size == 0 and hub:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() not in (f'"{etag}"', etag):
        return None  # the client's copy is of another version: send the whole file
    return parse_range(range_header(request), size)


def whole_headers(request: web.Request, size: int) -> dict[str, str]:
    """Headers of a whole-file answer to a request that asked for a range: for an empty file, the total
    size as ``Content-Range`` gives it (huggingface.js reads the size there)."""
    return {"Content-Range": "bytes */0"} if size == 0 and "Range" in request.headers else {}
