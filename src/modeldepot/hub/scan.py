"""Reading an upstream repo's metadata: the Hub's model API (or a node's: any HF_ENDPOINT), asked what
huggingface_hub's ``HfApi.model_info(files_metadata=True)`` asks.

One GET over the pull's own kept-alive connections (transfer/ranged.py), not through HfApi: importing
HfApi (httpx2, httpcore2, and trio where it is installed) took 0.25-0.45 s of every pull's start-up, a fifth
of a pull of 300 configs. The errors are the ones HfApi makes of the Hub's answers (hf-protocol.md):
``X-Error-Code`` RepoNotFound, RevisionNotFound or GatedRepo, a 401 from the Hub (https) meaning a repo not
found (private, or absent) unless its message says the credentials are invalid; a renamed repo's redirect
is followed. The answer is bounded before it is parsed, and every value in it validated before it is used.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any
from urllib.parse import quote

from modeldepot.errors import (
    AccessDeniedError,
    InvalidInputError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UpstreamDataError,
    UpstreamError,
    UpstreamTimeoutError,
)
from modeldepot.hub.manifest import RemoteFile
from modeldepot.modelcard import card_from_data
from modeldepot.transfer.ranged import MAX_REDIRECTS, Attempt, Reply, request
from modeldepot.validation import (
    MAX_TAGS,
    from_upstream,
    is_commit_id,
    is_label,
    validate_commit_id,
    validate_git_oid,
    validate_label,
    validate_path,
    validate_repo_id,
    validate_sha256,
    validate_size,
)

__all__ = ["MAX_FILES", "fetch_repo", "hub_token"]

MAX_FILES = 200_000  # files one scanned revision may list (the Hub's largest model repos have a few thousand)
MAX_ANSWER = 64 << 20  # bytes of a repo's description taken from an upstream (200,000 files fit)
MAX_CONTAINERS = 5 * MAX_FILES  # JSON objects and arrays in it (a file has one or two): bounds its memory
DEFAULT_TIMEOUT = 30.0  # seconds without a byte, unless the caller says
WHOLE_ANSWER_TIMEOUT = 600.0  # seconds for the whole answer (a big repo's description on a slow link)
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

log = logging.getLogger(__name__)


def hub_token(configured: str | None) -> str | None:
    """The token for the Hub: ``configured`` (HF_TOKEN), else what huggingface_hub's ``get_token`` finds (the
    token file of a login, a CI's OIDC exchange, the older HUGGING_FACE_HUB_TOKEN, Colab's secrets). It imports
    huggingface_hub's HTTP stack (0.13 s of a pull's start-up): it is asked only when one of those is there."""
    if configured:
        return configured
    from huggingface_hub import constants

    if not (
        os.environ.get("HUGGING_FACE_HUB_TOKEN")
        or os.environ.get("HF_OIDC_RESOURCE")
        or os.path.exists(constants.HF_TOKEN_PATH)
        or "google.colab" in sys.modules  # (its secrets: in a notebook)
    ):
        return None
    from huggingface_hub import get_token

    return get_token()


HELD_ONLY_HEADER = "X-Depot-Held-Only"
# A depot node's answer for a commit it holds in part without its whole listing (adopted from a Hugging Face
# cache): the files it lists are what it holds, not the commit; a pull asks the other sources for the listing
PART_OF_COMMIT_HEADER = "X-Depot-Part-Of-Commit"
"""A scan a fleet's node asks of another: answered from what that node holds, never through its own upstream
nor its peers (mirrors asked each other round a circle while their upstream was out of reach, each scan
ending after 10 s, and every peer, alive, was left out of scans for it: an explorer's trial)."""


def fetch_repo(
    repo_id: str,
    revision: str,
    endpoint: str,
    token: str | None,
    token_name: str = "HF_TOKEN",
    timeout: float | None = None,
    held_only: bool = False,
) -> tuple[str, str, dict[str, Any], list[RemoteFile], bool]:
    """(the upstream's spelling of the repo id, commit id, repo metadata, files with sizes and digests) of
    ``repo_id`` at ``revision``. The Hub matches repo ids whatever their case and answers with its own
    spelling: that one is returned when it differs from ``repo_id`` only in case, else ``repo_id``.

    ``token`` (none when None) goes to ``endpoint`` only. ``timeout``: seconds to wait without a byte
    (UpstreamTimeoutError after; the whole answer within WHOLE_ANSWER_TIMEOUT). ``held_only``: a depot node
    answers from what it holds (:data:`HELD_ONLY_HEADER`). The last item is False when a depot node says
    it lists part of the commit (:data:`PART_OF_COMMIT_HEADER`).
    """
    url = f"{endpoint.rstrip('/')}/api/models/{repo_id}/revision/{quote(revision, safe='')}?blobs=true"
    headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if held_only:
        headers[HELD_ONLY_HEADER] = "1"
    try:
        reply = request("GET", url, headers, timeout or DEFAULT_TIMEOUT, MAX_ANSWER, Attempt(), MAX_REDIRECTS,
                        total=WHOLE_ANSWER_TIMEOUT)  # fmt: skip
    except TimeoutError as error:
        raise UpstreamTimeoutError(f"{endpoint} did not answer in time to scan {repo_id}: {error}",
                                   repo_id=repo_id, source=endpoint) from error  # fmt: skip
    except Exception as error:  # refused, DNS, TLS, a cut or oversized answer, a redirect to a bad URL
        raise UpstreamError(
            f"cannot reach {endpoint} to scan {repo_id}, or read its answer: {type(error).__name__}: {error}",
            repo_id=repo_id,
            source=endpoint,
        ) from error
    if reply.status != 200:
        raise _refusal(reply, repo_id, revision, endpoint, token_name)
    info = _parsed(reply.body, f"{endpoint} (describing {repo_id})")
    spelled, commit_id, metadata, files = _checked(endpoint, repo_id, info)
    if _may_be_a_tag(revision):  # (None, not known: a refs answer that failed keeps what the store recorded)
        metadata["revision_is_tag"] = _is_tag(endpoint, repo_id, revision, commit_id, headers)
    return spelled, commit_id, metadata, files, reply.headers.get(PART_OF_COMMIT_HEADER) != "1"


MAX_REFS_ANSWER = 4 << 20  # bytes of a repo's refs listing taken from an upstream


def _may_be_a_tag(revision: str) -> bool:
    """Whether ``revision`` may name a git tag: a name, not main, a commit id nor a ``refs/...`` one."""
    return revision != "main" and not revision.startswith("refs/") and not is_commit_id(revision.lower())


REFS_TIMEOUT = 5.0  # seconds for a repo's refs listing: a tag's flag is no reason to hold a scan up
REFS_KEPT = (
    10.0  # seconds a repo's refs listing answers the scans of its revisions (a mirror's refs: one each)
)
_refs_seen: dict[tuple[str, str, str], tuple[float, object]] = {}
_refs_lock = threading.Lock()


def _is_tag(
    endpoint: str, repo_id: str, revision: str, commit_id: str, headers: dict[str, str]
) -> bool | None:
    """Whether the upstream's refs list ``revision`` as a tag at ``commit_id`` (and no branch of that name):
    pulled, it is a tag here too (a tag pulled became a branch, and code picking releases from
    ``list_repo_refs().tags`` found none: an explorer's trial). None when the refs cannot be had within
    REFS_TIMEOUT (a hung refs route held every scan of a tag 30 s more, and a mirror's refs listing asked
    for them once per branch: a review)."""
    refs = _refs_of(endpoint, repo_id, headers)

    def named(kind: str) -> list[dict[str, Any]]:
        listed = refs.get(kind) if isinstance(refs, dict) else None
        return (
            [ref for ref in listed if isinstance(ref, dict) and ref.get("name") == revision]
            if isinstance(listed, list)
            else []
        )

    if isinstance(refs, dict) and not named("branches") and not named("tags"):
        # (a listing kept from before the ref was made: asked again, not taken for "a branch", a review)
        refs = _refs_of(endpoint, repo_id, headers, fresh=True)
    if not isinstance(refs, dict):
        return None
    return not named("branches") and any(
        str(ref.get("targetCommit", "")).lower() == commit_id for ref in named("tags")
    )


def _refs_of(endpoint: str, repo_id: str, headers: dict[str, str], fresh: bool = False) -> object:
    """The upstream's refs listing of the repo (parsed JSON), kept REFS_KEPT (``fresh``: asked again), per
    the credentials that asked; None when it cannot be had."""
    credentials = hashlib.sha256(headers.get("Authorization", "").encode()).hexdigest()[:16]
    key, now = (endpoint, repo_id.lower(), credentials), time.monotonic()
    with _refs_lock:
        seen = _refs_seen.get(key)
        if seen is not None and now - seen[0] < REFS_KEPT and not fresh:
            return seen[1]
    url = f"{endpoint.rstrip('/')}/api/models/{repo_id}/refs"
    try:
        reply = request("GET", url, headers, REFS_TIMEOUT, MAX_REFS_ANSWER, Attempt(), MAX_REDIRECTS,
                        total=2 * REFS_TIMEOUT)  # fmt: skip
        refs = _parsed(reply.body, f"{endpoint} (the refs of {repo_id})") if reply.status == 200 else None
    except Exception as error:  # (not known: the store keeps what it recorded)
        log.debug("%s: could not read the refs of %s: %s", endpoint, repo_id, error)
        return None
    with _refs_lock:
        if len(_refs_seen) > 1000:
            _refs_seen.clear()
        _refs_seen[key] = (now, refs)
    return refs


def _parsed(body: bytes, source: str) -> object:
    """The answer's JSON, parsed once it is known to hold no more containers than a repo of MAX_FILES
    files (an answer of empty objects parses into 25 times its size)."""
    if body.count(b"{") + body.count(b"[") > MAX_CONTAINERS:
        raise UpstreamDataError(source, "answer", f"more than {MAX_CONTAINERS} JSON objects and arrays")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise UpstreamDataError(source, "answer", "it is not JSON, or nests too deep") from None


def _refusal(reply: Reply, repo_id: str, revision: str, endpoint: str, token_name: str) -> Exception:
    """The error an upstream's answer other than 200 means, as HfApi reads the Hub's."""
    status = reply.status
    code = reply.headers.get("X-Error-Code", "")
    message = reply.headers.get("X-Error-Message", "")
    if code == "GatedRepo":
        return AccessDeniedError(
            f"{repo_id} is gated on {endpoint}: accept its conditions there, then set {token_name} to a token "
            "of the account that did", status=status, repo_id=repo_id, source=endpoint,
        )  # fmt: skip
    if code == "RevisionNotFound":
        return RevisionNotFoundError(repo_id, revision, f"revision {revision!r} of {repo_id} does not exist on "
                                     f"{endpoint}", status=status, source=endpoint)  # fmt: skip
    # HfApi reads a 401 from the Hub (https) as "not found, or private", unless it says the credentials
    # are invalid; from anywhere else (a node asking for its token) as a refusal.
    hub_401 = status == 401 and message != _INVALID_CREDENTIALS and endpoint.startswith("https://")
    if code == "RepoNotFound" or hub_401:
        return RepoNotFoundError(
            repo_id, f"{repo_id} was not found on {endpoint}; if it is private, set {token_name} to a token that "
            "can read it", status=status, source=endpoint,
        )  # fmt: skip
    if status in (401, 403):
        return AccessDeniedError(
            f"{endpoint} refused access to {repo_id} ({status}): check {token_name}",
            status=status,
            repo_id=repo_id,
            source=endpoint,
        )
    said = message or _error_text(reply.body)
    return UpstreamError(f"{endpoint} failed to describe {repo_id}: HTTP {status}{f' ({said})' if said else ''}",
                         status=status, repo_id=repo_id, source=endpoint)  # fmt: skip


def _error_text(body: bytes) -> str:
    """What an error answer's JSON says (``{"error": "..."}``), shortened; '' when it says nothing."""
    try:
        said = json.loads(body[:4096]).get("error", "")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return said[:200] if isinstance(said, str) else ""


def _checked(endpoint: str, repo_id: str, info: object) -> tuple[str, str, dict[str, Any], list[RemoteFile]]:
    """The upstream's answer, every value validated before it can name a file or reach the store.

    An upstream is untrusted: a commit id becomes a snapshot folder's name, a path a symlink's, a digest a
    partial download's, a size a preallocation. Each passes the validators user input passes, or the
    scan fails with an UpstreamDataError naming the upstream and the field.
    """
    source = f"{endpoint} (describing {repo_id})"
    if not isinstance(info, dict):
        raise UpstreamDataError(source, "answer", "it is not a JSON object")
    if not info.get("sha"):
        raise UpstreamError(
            f"{endpoint} did not say which commit {repo_id} is", repo_id=repo_id, source=endpoint
        )
    commit_id = from_upstream(source, "commit id", validate_commit_id, info["sha"])
    siblings = info.get("siblings") or []
    if not isinstance(siblings, list):
        raise UpstreamDataError(source, "file list", "it is not a list")
    if len(siblings) > MAX_FILES:
        raise UpstreamDataError(source, "file list", f"{len(siblings)} files is more than {MAX_FILES}")
    files: list[RemoteFile] = []
    for sibling in siblings:
        if not isinstance(sibling, dict):
            raise UpstreamDataError(
                source, "file list", f"an entry is {type(sibling).__name__}, not an object"
            )
        path = from_upstream(source, "file path", validate_path, sibling.get("rfilename"))
        size = from_upstream(source, f"size of {path!r}", validate_size, sibling.get("size"))
        git_oid = from_upstream(source, f"git oid of {path!r}", validate_git_oid, sibling.get("blobId"))
        sha256 = None
        lfs = sibling.get("lfs")
        if lfs is not None:
            if not isinstance(lfs, dict):
                raise UpstreamDataError(source, f"LFS entry of {path!r}", "it is not an object")
            sha256 = from_upstream(source, f"LFS SHA-256 of {path!r}", validate_sha256, lfs.get("sha256"))
            if lfs.get("size") is not None and lfs["size"] != size:
                raise UpstreamDataError(source, f"size of {path!r}",
                                        f"the LFS size {str(lfs['size'])[:40]!r} differs from {size}")  # fmt: skip
        files.append(RemoteFile(path=path, size=size, git_oid=git_oid, sha256=sha256))
    _check_tree_shape(source, [f.path for f in files])
    tags = info.get("tags") or []
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise UpstreamDataError(source, "tags", f"not a list of at most {MAX_TAGS} labels")
    gated = info.get("gated")
    gated = False if gated is None else gated
    if isinstance(gated, (list, dict)) or gated not in (False, True, "auto", "manual"):
        raise UpstreamDataError(source, "gated flag", f"{str(gated)[:40]!r} is none of false, auto, manual")
    metadata = {
        "pipeline_tag": _optional_label(source, "pipeline tag", info.get("pipeline_tag")),
        "library_name": _optional_label(source, "library name", info.get("library_name")),
        "tags": [from_upstream(source, "tag", validate_label, tag) for tag in tags],
        "gated": gated,
        "private": bool(info.get("private")),
        **_weights_described(info),
        # (the README's front matter, as the upstream read it: checked as a README's is)
        **({"card_data": card} if (card := card_from_data(info.get("cardData"))) else {}),
        # (a mirror's description of a repo it had not pulled said it changed at every scan: an explorer's trial)
        **{
            ours: when
            for theirs, ours in (("createdAt", "created_at"), ("lastModified", "modified_at"))
            if (when := _time(info.get(theirs))) is not None
        },
    }
    return _spelling(repo_id, info.get("id")), commit_id, metadata, files


def _spelling(repo_id: str, said: object) -> str:
    """The upstream's spelling of ``repo_id`` when it is a valid id equal to it but for case."""
    if not isinstance(said, str) or said.lower() != repo_id.lower():
        return repo_id
    try:
        return validate_repo_id(said)
    except InvalidInputError:
        return repo_id


MAX_DTYPES = 64  # dtypes a safetensors description may count parameters of (the Hub's have a handful)
MAX_TEMPLATE = 256 << 10  # characters of a GGUF chat template kept from a description (real ones: 1-20 KiB)
_GGUF_COUNTS = ("total", "context_length")
_GGUF_TEXTS = ("architecture", "chat_template", "bos_token", "eos_token")


def _weights_described(info: dict[str, Any]) -> dict[str, Any]:
    """The upstream's ``safetensors`` and ``gguf`` properties (parameters by dtype; a GGUF model's count,
    architecture, context and tokens), kept so that a node describing a revision it has not pulled gives
    them too (a mirror gave None, and tools sizing a model from them had nothing: an explorer's trial).
    Descriptive only: a malformed one is left out, never a reason to refuse the scan."""
    found: dict[str, Any] = {}
    described = info.get("safetensors")
    if isinstance(described, dict) and isinstance(described.get("parameters"), dict):
        parameters = described["parameters"]
        if 0 < len(parameters) <= MAX_DTYPES and all(
            is_label(dtype) and _is_count(count) for dtype, count in parameters.items()
        ):
            found["safetensors"] = {"parameters": dict(parameters), "total": sum(parameters.values())}
    described = info.get("gguf")
    if isinstance(described, dict) and _is_count(described.get("total")):
        gguf = {name: described[name] for name in _GGUF_COUNTS if _is_count(described.get(name))}
        for name in _GGUF_TEXTS:
            text = described.get(name)
            if isinstance(text, str) and len(text) <= MAX_TEMPLATE and "\x00" not in text:
                gguf[name] = text
        found["gguf"] = gguf
    return found


def _time(value: object) -> float | None:
    """An upstream's ISO 8601 time (``2024-05-01T12:00:00.000Z``) as a timestamp; None when it is none, or
    not a plausible one (it is descriptive only: never a reason to refuse a repo)."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    stamp = when.timestamp()
    return stamp if 0 < stamp < time.time() + 86400 else None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _optional_label(source: str, field: str, value: object) -> str | None:
    return None if value is None else from_upstream(source, field, validate_label, value)


def _check_tree_shape(source: str, paths: list[str]) -> None:
    """Each path once, and no path that is both a file and a folder (``a`` and ``a/b``)."""
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise UpstreamDataError(source, "file list", f"{path!r} is listed twice")
        seen.add(path)
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in seen:
                raise UpstreamDataError(source, "file list", f"{folder!r} is both a file and a folder")
