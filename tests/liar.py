"""A lying upstream: answers like the Hub (and like a depot node) with whatever a test puts in its answers.

Every value it sends is the test's to choose: the commit id, file paths, sizes, digests, tags, a node's
chunk digests. Tests use it to prove that nothing an upstream says can make the store touch a file
outside its home, and that a lie fails the pull with an error naming the upstream and the field.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from conftest import BackgroundServer
from modeldepot.gitobjects import git_blob_oid

REPO = "acme/model"
SHA = "0123456789abcdef0123456789abcdef01234567"


def honest_info(files: dict[str, bytes], lfs: tuple[str, ...] = ()) -> dict[str, Any]:
    """The model info the Hub would send for ``files`` (those named in ``lfs`` as LFS files)."""
    siblings = []
    for path, data in files.items():
        sibling: dict[str, Any] = {"rfilename": path, "size": len(data), "blobId": git_blob_oid(data)}
        if path in lfs:
            sibling["lfs"] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": 134,
            }
        siblings.append(sibling)
    return {
        "_id": REPO, "id": REPO, "modelId": REPO, "author": REPO.split("/")[0], "sha": SHA, "private": False,
        "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": ["onnx"],
        "pipeline_tag": "feature-extraction", "library_name": "transformers", "siblings": siblings,
    }  # fmt: skip


class Liar:
    """The upstream, on a loopback port, run by a background event loop. Set :attr:`info` (the model info
    JSON), :attr:`files` (bytes served by resolve, by path) and :attr:`node_manifest` (what it answers as a
    depot node) before each use; :attr:`requests` records the paths asked for."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {"config.json": b'{"model_type": "bert"}'}
        self.info: dict[str, Any] = honest_info(self.files)
        self.node_manifest: dict[str, Any] | bytes | None = None
        self.requests: list[str] = []
        self.authorizations: list[str | None] = []  # the Authorization header of each model info request
        self.refusal: tuple[int, dict[str, str], bytes] | None = None  # the model info's answer instead
        self.refs: dict[str, Any] | None = None  # the refs listing (/refs: branches, tags); None: a 404
        self.moved_to: str | None = None  # a 307 to this URL, for a model info request of another path
        self.files_moved_to: str | None = None  # a 302 to this URL, for every file's download
        # A file whose resolve answers first a 302 (to itself, marked) with a body of so many bytes
        self.redirect_with_body: tuple[str, int] | None = None
        self.redirect_sent = 0  # bytes of those bodies written before the client let go
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self._model_info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._model_info)
        app.router.add_get("/api/models/{org}/{name}/refs", self._refs)
        app.router.add_get("/{org}/{name}/resolve/{rev}/{path:.+}", self._resolve)
        app.router.add_get("/api/depot/v1/repos/{org}/{name}/revisions/{rev}/manifest", self._manifest)
        app.router.add_route("HEAD", "/api/depot/v1/blobs/{sha}", self._blob_head)
        self._server = BackgroundServer(web.AppRunner(app, access_log=None), name="lying upstream")
        self.url = self._server.url

    def lie(self, **fields: Any) -> None:
        """Replace top-level fields of the model info."""
        self.info = {**copy.deepcopy(self.info), **fields}

    def lie_about(self, path: str, **fields: Any) -> None:
        """Replace fields of one sibling (``lfs`` merges into its LFS record)."""
        info = copy.deepcopy(self.info)
        for sibling in info["siblings"]:
            if sibling["rfilename"] == path:
                lfs = fields.pop("lfs", None)
                sibling.update(fields)
                if lfs is not None:
                    sibling["lfs"] = {**sibling.get("lfs", {}), **lfs}
        self.info = info

    async def _model_info(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        self.authorizations.append(request.headers.get("Authorization"))
        if self.moved_to is not None and request.path not in self.moved_to:
            return web.Response(status=307, headers={"Location": self.moved_to})
        if self.refusal is not None:
            status, headers, body = self.refusal
            return web.Response(status=status, headers=headers, body=body)
        return web.json_response(self.info)

    async def _refs(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        if self.refs is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(self.refs)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if self.files_moved_to is not None:
            return web.Response(status=302, headers={"Location": self.files_moved_to})
        if (
            self.redirect_with_body is not None
            and request.match_info["path"] == self.redirect_with_body[0]
            and "moved" not in request.query
        ):
            return await self._redirect_with_body(request, self.redirect_with_body[1])
        data = self.files.get(request.match_info["path"])
        if data is None:
            return web.json_response({"error": "Entry not found"}, status=404)
        headers = {"ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": str(self.info.get("sha"))}
        start, end = 0, len(data) - 1
        status = 200
        wanted = request.headers.get("Range", "")
        if wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes=") :].partition("-")
            start, end, status = int(first), min(int(last or end), end), 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return web.Response(body=data[start : end + 1], status=status, headers=headers)

    async def _redirect_with_body(self, request: web.Request, size: int) -> web.StreamResponse:
        response = web.StreamResponse(status=302, headers={"Location": f"{request.path}?moved=1"})
        response.content_length = size
        await response.prepare(request)
        piece = b"x" * (1 << 16)
        with contextlib.suppress(ConnectionError):
            while self.redirect_sent < size * 100:  # (bounded: a test's, not an endless one)
                await response.write(piece)
                self.redirect_sent += len(piece)
                size -= len(piece)
                if size <= 0:
                    break
        return response

    async def _manifest(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        if self.node_manifest is None:
            return web.json_response({"error": "not found"}, status=404)
        if isinstance(self.node_manifest, bytes):  # not even JSON's shape
            return web.Response(body=self.node_manifest, content_type="application/json")
        return web.json_response(self.node_manifest)

    async def _blob_head(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    def stop(self) -> None:
        self._server.stop()


def tree_state(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[str, bytes | str]]:
    """Everything under ``root`` (but the ``skip`` folders): each entry's kind and content or link target."""
    state: dict[str, tuple[str, bytes | str]] = {}
    for directory, dirs, names in os.walk(root):
        here = Path(directory)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in dirs + names:
            path = here / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = ("link", os.readlink(path))
            elif path.is_dir():
                state[key] = ("dir", "")
            else:
                state[key] = ("file", path.read_bytes())
    return state


def plant_sentinels(root: Path) -> Path:
    """Victim files an attack would aim at: a folder with a config, a file, and names a partial could take."""
    sentinel = root / "sentinel"
    (sentinel / "victimdir").mkdir(parents=True)
    (sentinel / "victimdir" / "config.json").write_bytes(b'{"precious": true}')
    (sentinel / "victim").write_bytes(b"victim bytes")
    (sentinel / "victim.log").write_bytes(b"victim log")
    (sentinel / "victim.part").write_bytes(b"victim part")
    return sentinel
