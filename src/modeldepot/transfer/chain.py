"""The source chain: depot nodes (``MODELDEPOT_SERVERS``) first, in order, then the Hub as last resort.

Scanning asks each node, then the Hub, and keeps the first that knows the repo: a repo imported
privately on node A is pulled by node B from A without the Hub ever being asked. Bytes come from every
node that holds the scanned commit (chunks spread across them, each chunk checked against the node's
BLAKE3); the Hub joins a file only when no node holds it or every node failed it.

Tokens stay with their owners: ``HF_TOKEN`` (or huggingface_hub's stored token) goes to the Hub alone,
``MODELDEPOT_TOKEN`` to depot nodes alone, and huggingface_hub is told never to add its own to a node.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from huggingface_hub import get_token

from modeldepot.config import DepotConfig
from modeldepot.errors import AccessDeniedError, DepotError, NotFoundError, UpstreamError
from modeldepot.hashing import chunk_count
from modeldepot.hub.manifest import Manifest, RemoteFile
from modeldepot.hub.scan import fetch_repo
from modeldepot.transfer.download import FileSource
from modeldepot.transfer.sources import HttpSource, RetryPolicy
from modeldepot.validation import from_upstream, validate_blake3

__all__ = ["Scan", "SourceChain"]

NODE_API = "/api/depot/v1"


@dataclass(frozen=True)
class Scan:
    commit_id: str
    info: dict[str, Any]
    files: list[RemoteFile]
    endpoint: str


@dataclass(frozen=True)
class SourceChain:
    servers: tuple[HttpSource, ...]
    hub: HttpSource

    @classmethod
    def from_config(cls, config: DepotConfig, retry: RetryPolicy | None = None) -> SourceChain:
        retry = retry or RetryPolicy(read_timeout=config.read_timeout)
        hub_token = config.hub_token or get_token()
        return cls(
            servers=tuple(HttpSource(url, "node", config.node_token, retry) for url in config.servers),
            hub=HttpSource(config.hub_endpoint, "hub", hub_token, retry),
        )

    def scan(self, repo_id: str, revision: str) -> Scan:
        """Describe ``repo_id`` at ``revision`` from the first source of the chain that has it.

        When none has it, the error says what each source answered, and keeps the most telling kind:
        a refusal (a token is missing) over "not found" over "unreachable"."""
        problems: list[DepotError] = []
        for server in self.servers:
            try:
                commit_id, info, files = fetch_repo(
                    repo_id, revision, server.base_url, server.token or False, "MODELDEPOT_TOKEN",
                    server.retry.read_timeout,
                )  # fmt: skip
                return Scan(commit_id, info, files, server.base_url)
            except DepotError as error:
                problems.append(error)
        try:
            commit_id, info, files = fetch_repo(
                repo_id, revision, self.hub.base_url, self.hub.token, timeout=self.hub.retry.read_timeout
            )
        except DepotError as error:
            if not problems:
                raise
            problems.append(error)
            kind = next((k for k in (AccessDeniedError, NotFoundError) if any(isinstance(p, k) for p in problems)),
                        UpstreamError)  # fmt: skip
            raise kind("; ".join(str(p) for p in problems), repo_id=repo_id) from error
        return Scan(commit_id, info, files, self.hub.base_url)

    async def holders(
        self, http: aiohttp.ClientSession, manifest: Manifest, chunk_size: int, files: list[RemoteFile]
    ) -> dict[str, list[FileSource]]:
        """For each of ``files``, the depot nodes holding it: at the manifest's commit (with chunk digests
        at our chunk size, when the node uses the same one), or else under any repo, found by the LFS
        SHA-256 (a fine-tune that shares its tokenizer or base weights with a repo the node has)."""
        found: dict[str, list[FileSource]] = {}
        wanted = {f.path: f for f in files}
        for server in self.servers:
            try:
                listed = await _node_manifest(http, server, manifest.repo_id, manifest.commit_id)
            except DepotError:
                continue  # a node that is down or lacks the commit simply holds nothing
            for item in listed:
                remote = wanted.get(str(item.get("path")))
                if remote is None or not _same_content(remote, item):
                    continue
                digests = _chunk_digests(server, manifest, remote, item, chunk_size)
                url = server.file_url(manifest.repo_id, manifest.commit_id, remote.path)
                found.setdefault(remote.path, []).append(FileSource(server, url, digests))
        by_content = [f for f in files if f.path not in found and f.sha256]
        if by_content and self.servers:
            probes = [(server, f) for server in self.servers for f in by_content]
            answers = await asyncio.gather(
                *(_node_has_blob(http, server, f.sha256 or "") for server, f in probes)
            )
            for (server, remote), blob_url in zip(probes, answers, strict=True):
                if blob_url is not None:
                    found.setdefault(remote.path, []).append(FileSource(server, blob_url))
        return found

    def hub_source(self, manifest: Manifest, remote: RemoteFile) -> FileSource:
        return FileSource(self.hub, self.hub.file_url(manifest.repo_id, manifest.commit_id, remote.path))


def _chunk_digests(server: HttpSource, manifest: Manifest, remote: RemoteFile, item: dict[str, Any],
                   chunk_size: int) -> tuple[str, ...] | None:  # fmt: skip
    """The node's BLAKE3 of each chunk, when it chunks as we do (each digest validated: it came from a peer)."""
    chunks = item.get("chunks")
    if item.get("chunk_size") != chunk_size or not isinstance(chunks, list):
        return None
    if len(chunks) != chunk_count(remote.size, chunk_size):
        return None
    source = f"{server.name} (manifest of {manifest.repo_id})"
    field = f"chunk digest of {remote.path!r}"
    return tuple(from_upstream(source, field, validate_blake3, digest) for digest in chunks)


def _same_content(remote: RemoteFile, item: dict[str, Any]) -> bool:
    if remote.sha256 is not None:
        return item.get("sha256") == remote.sha256
    return item.get("git_oid") == remote.git_oid and item.get("size") == remote.size


async def _node_has_blob(http: aiohttp.ClientSession, server: HttpSource, sha256: str) -> str | None:
    """The node's URL for a blob it holds (under whatever repo), or None."""
    url = f"{server.base_url}{NODE_API}/blobs/{sha256}"
    timeout = aiohttp.ClientTimeout(total=server.retry.read_timeout)
    try:
        async with http.head(url, headers=server.headers(), timeout=timeout) as response:
            return url if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def _node_manifest(
    http: aiohttp.ClientSession, server: HttpSource, repo_id: str, commit_id: str
) -> list[dict[str, Any]]:
    url = f"{server.base_url}{NODE_API}/repos/{quote(repo_id)}/revisions/{commit_id}/manifest"
    timeout = aiohttp.ClientTimeout(total=server.retry.read_timeout)
    try:
        async with http.get(url, headers=server.headers(), timeout=timeout) as response:
            if response.status != 200:
                raise UpstreamError(f"{url}: HTTP {response.status}", source=url, status=response.status)
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        raise UpstreamError(f"{url}: {type(error).__name__}: {error}", source=url) from error
    files = body.get("files") if isinstance(body, dict) else None
    return [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []
