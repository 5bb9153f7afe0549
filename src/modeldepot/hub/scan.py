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

from modeldepot.errors import AccessDeniedError, NotFoundError, UpstreamError
from modeldepot.hub.manifest import RemoteFile

__all__ = ["fetch_repo"]


def fetch_repo(
    repo_id: str, revision: str, endpoint: str, token: str | bool | None, token_name: str = "HF_TOKEN"
) -> tuple[str, dict[str, Any], list[RemoteFile]]:
    """(commit id, repo metadata, files with sizes and digests) of ``repo_id`` at ``revision``.

    ``token`` (or huggingface_hub's stored token when None; none at all when False) goes to ``endpoint``
    only.
    """
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError as error:
        raise AccessDeniedError(
            f"{repo_id} is gated on {endpoint}: accept its conditions there, then set {token_name} to a token "
            "of the account that did"
        ) from error
    except RepositoryNotFoundError as error:
        raise NotFoundError(
            f"{repo_id} was not found on {endpoint}; if it is private, set {token_name} to a token that can read it"
        ) from error
    except RevisionNotFoundError as error:
        raise NotFoundError(f"revision {revision!r} of {repo_id} does not exist on {endpoint}") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise AccessDeniedError(
                f"{endpoint} refused access to {repo_id} ({status}): check {token_name}"
            ) from error
        raise UpstreamError(f"{endpoint} failed to describe {repo_id}: {error}") from error
    except Exception as error:  # connection refused, DNS, TLS, timeouts: the client's own error types vary
        raise UpstreamError(
            f"cannot reach {endpoint} to scan {repo_id}: {type(error).__name__}: {error}"
        ) from error
    if not info.sha:
        raise UpstreamError(f"{endpoint} did not say which commit {repo_id}@{revision} is")
    files = [
        RemoteFile(
            path=s.rfilename,
            size=s.size or 0,
            git_oid=s.blob_id or "",
            sha256=s.lfs.sha256 if s.lfs is not None else None,
        )
        for s in info.siblings or []
    ]
    metadata = {
        "pipeline_tag": info.pipeline_tag,
        "library_name": info.library_name,
        "tags": list(info.tags or []),
        "gated": info.gated if info.gated is not None else False,
        "private": bool(info.private),
    }
    return info.sha, metadata, files
