"""Reading an upstream repo's metadata through huggingface_hub's HfApi (the Hub, or a node: any HF_ENDPOINT)."""

from __future__ import annotations

from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from modeldepot.errors import (
    AccessDeniedError,
    NotFoundError,
    UpstreamDataError,
    UpstreamError,
    UpstreamTimeoutError,
)
from modeldepot.hub.manifest import RemoteFile
from modeldepot.validation import (
    from_upstream,
    validate_commit_id,
    validate_git_oid,
    validate_label,
    validate_path,
    validate_sha256,
    validate_size,
)

__all__ = ["MAX_FILES", "fetch_repo"]

MAX_FILES = 200_000  # files one scanned revision may list (the Hub's largest model repos have a few thousand)


def fetch_repo(
    repo_id: str,
    revision: str,
    endpoint: str,
    token: str | bool | None,
    token_name: str = "HF_TOKEN",
    timeout: float | None = None,
) -> tuple[str, dict[str, Any], list[RemoteFile]]:
    """(commit id, repo metadata, files with sizes and digests) of ``repo_id`` at ``revision``.

    ``token`` (or huggingface_hub's stored token when None; none at all when False) goes to ``endpoint``
    only. ``timeout``: seconds to wait for an answer (UpstreamTimeoutError after).
    """
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout)
    except GatedRepoError as error:
        raise AccessDeniedError(
            f"{repo_id} is gated on {endpoint}: accept its conditions there, then set {token_name} to a token "
            "of the account that did", status=_status(error), repo_id=repo_id, source=endpoint,
        ) from error  # fmt: skip
    except RepositoryNotFoundError as error:
        raise NotFoundError(
            f"{repo_id} was not found on {endpoint}; if it is private, set {token_name} to a token that can read it",
            status=_status(error), repo_id=repo_id, source=endpoint,
        ) from error  # fmt: skip
    except RevisionNotFoundError as error:
        raise NotFoundError(f"revision {revision!r} of {repo_id} does not exist on {endpoint}",
                            status=_status(error), repo_id=repo_id, source=endpoint) from error  # fmt: skip
    except HfHubHTTPError as error:
        status = _status(error)
        if status in (401, 403):
            raise AccessDeniedError(
                f"{endpoint} refused access to {repo_id} ({status}): check {token_name}",
                status=status,
                repo_id=repo_id,
                source=endpoint,
            ) from error
        raise UpstreamError(
            f"{endpoint} failed to describe {repo_id}: {error}",
            status=status,
            repo_id=repo_id,
            source=endpoint,
        ) from error
    except Exception as error:  # connection refused, DNS, TLS, timeouts: the client's own error types vary
        if _is_timeout(error):
            raise UpstreamTimeoutError(f"{endpoint} did not answer in time to scan {repo_id}: {error}",
                                       repo_id=repo_id, source=endpoint) from error  # fmt: skip
        raise UpstreamError(
            f"cannot reach {endpoint} to scan {repo_id}, or read its answer: {type(error).__name__}: {error}",
            repo_id=repo_id,
            source=endpoint,
        ) from error
    return _checked(endpoint, repo_id, info)


def _status(error: HfHubHTTPError) -> int | None:
    return error.response.status_code if error.response is not None else None


def _is_timeout(error: BaseException) -> bool:
    """Whether the client gave up waiting (httpx's and requests' timeouts are not TimeoutError subclasses)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TimeoutError) or "Timeout" in type(seen).__name__:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _checked(endpoint: str, repo_id: str, info: Any) -> tuple[str, dict[str, Any], list[RemoteFile]]:
    """The upstream's answer, every value validated before it can name a file or reach the store.

    An upstream is untrusted: a commit id becomes a snapshot folder's name, a path a symlink's, a digest a
    partial download's, a size a preallocation. Each passes the validators user input passes, or the
    scan fails with an UpstreamDataError naming the upstream and the field.
    """
    source = f"{endpoint} (describing {repo_id})"
    if not info.sha:
        raise UpstreamError(
            f"{endpoint} did not say which commit {repo_id} is", repo_id=repo_id, source=endpoint
        )
    commit_id = from_upstream(source, "commit id", validate_commit_id, info.sha)
    siblings = list(info.siblings or [])
    if len(siblings) > MAX_FILES:
        raise UpstreamDataError(source, "file list", f"{len(siblings)} files is more than {MAX_FILES}")
    files: list[RemoteFile] = []
    for sibling in siblings:
        path = from_upstream(source, "file path", validate_path, sibling.rfilename)
        size = from_upstream(source, f"size of {path!r}", validate_size, sibling.size)
        git_oid = from_upstream(source, f"git oid of {path!r}", validate_git_oid, sibling.blob_id)
        sha256 = None
        if sibling.lfs is not None:
            sha256 = from_upstream(source, f"LFS SHA-256 of {path!r}", validate_sha256, sibling.lfs.sha256)
            if sibling.lfs.size is not None and sibling.lfs.size != size:
                raise UpstreamDataError(source, f"size of {path!r}",
                                        f"the LFS size {sibling.lfs.size!r} differs from {size}")  # fmt: skip
        files.append(RemoteFile(path=path, size=size, git_oid=git_oid, sha256=sha256))
    _check_tree_shape(source, [f.path for f in files])
    tags = info.tags or []
    if not isinstance(tags, list) or len(tags) > 1000:
        raise UpstreamDataError(source, "tags", "not a list of at most 1000 labels")
    gated = info.gated if info.gated is not None else False
    if gated not in (False, True, "auto", "manual"):
        raise UpstreamDataError(source, "gated flag", f"{str(gated)[:40]!r} is none of false, auto, manual")
    metadata = {
        "pipeline_tag": _optional_label(source, "pipeline tag", info.pipeline_tag),
        "library_name": _optional_label(source, "library name", info.library_name),
        "tags": [from_upstream(source, "tag", validate_label, tag) for tag in tags],
        "gated": gated,
        "private": bool(info.private),
    }
    return commit_id, metadata, files


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
