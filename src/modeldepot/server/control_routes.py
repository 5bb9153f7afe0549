"""Routes that change what a node holds, for the dashboard and for tools: start pulls and follow them,
preload, pin, unpin and remove. Thin shells over :class:`~modeldepot.depot.Depot`.

Who may call them (:func:`control_refusal`): requests that carry the node's control token as
``Authorization: Bearer``, and no others (401). On a node with a token, that is its token (the auth
middleware refuses requests without it before they get here; the check is repeated so a route can never be
reached without it). On a node without one, the reads stay open, but the control routes need a token the
node makes when it starts (``secrets.token_urlsafe(32)``, kept in the app: :data:`CONTROL_TOKEN`), which
``modeldepot serve`` prints in the dashboard's address (``http://HOST:PORT/#token=...``). Nothing about a
request's peer address or headers takes its place: a reverse proxy on the same machine makes any request
look local. A bearer token is no ambient credential (a browser never sends it by itself), so another site's
page cannot use the routes in the user's name, and the routes need no check of ``Origin``.

A pull runs on the node's event loop as a background task (:class:`PullJobs`), through the depot's source
chain only (its servers, its fleet, its Hub endpoint: a request names a repo, never a place to pull from);
its progress is on the event stream (the variants' status rows) and at ``GET /pulls/{id}``. The node
cancels running pulls when it stops; their finished chunks stay for a resume.

What a request says is checked before anything is done, by one rule (docs/hub-api.md): what is wrong in the
URL (a repo id in the path, a query parameter the route does not take, a bad value of one it takes) or in
the body's shape (not a JSON object, a key the route does not take) is a 400; a body key whose value is
wrong is a 422. Every message names the field or parameter, and a value's kind by its JSON name (null,
number, ...). An optional field sent as null is its default (the whole repo, ``main``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from modeldepot.depot import Depot
from modeldepot.errors import (
    BudgetExceededError,
    DepotError,
    InvalidInputError,
    NotFoundError,
    ReadOnlyStoreError,
    RevisionNotFoundError,
    StoreFullError,
    VariantNotFoundError,
)
from modeldepot.hub.manifest import Manifest
from modeldepot.server.context import (
    CONTROL_TOKEN,
    DEPOT,
    TOKEN,
    carries_token,
    checked_query,
    is_authorized,
    path_repo,
)
from modeldepot.server.native_routes import API
from modeldepot.server.responses import error_response, json_response, response_for_error
from modeldepot.store.layout import size_text
from modeldepot.transfer.threads import in_budget_pool
from modeldepot.validation import validate_repo_id, validate_revision

if TYPE_CHECKING:
    from modeldepot.transfer.pull import PullResult, PullUpdate

__all__ = ["CONTROL_PATHS", "MAX_CONTROL_BODY", "PULLS", "PullJob", "PullJobs", "add_control_routes",
           "control_refusal"]  # fmt: skip

log = logging.getLogger("modeldepot.server")

MAX_CONTROL_BODY = 16 * 1024  # a control request's JSON body, in bytes
MAX_QUANTS = 64
FINISHED_KEPT = 100  # finished pulls listed (the oldest are forgotten first); running ones are always listed
QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
NEEDS_NODE_TOKEN = "this node needs a token: send Authorization: Bearer <token>"
NEEDS_CONTROL_TOKEN = (
    "this node has no token, so its control routes need the control token it made when it started: open "
    "the dashboard at the address `modeldepot serve` printed (it ends in #token=...; a node whose log is "
    "no terminal keeps the token in its store's locks/control-<uid>/token-<port>), or send "
    "Authorization: Bearer <control token>; or start the node with --token and use that"
)
WRONG_CONTROL_TOKEN = (
    "this is not the node's control token (it makes a new one each time it starts: use the address "
    "`modeldepot serve` printed last, or start the node with --token)"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Quants = list[str] | str | None


class Refused(Exception):
    """A control request refused before anything was done: its status, error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _invalid(message: str) -> Refused:
    return Refused(422, "InvalidField", message)


# -- who may call -----------------------------------------------------------------------------------------


def control_refusal(request: web.Request) -> str | None:
    """Why ``request`` may not use a control route (None: it may): unless it carries the control token
    (the node's token when it has one, else the one it made at start)."""
    if carries_token(request, request.app[CONTROL_TOKEN]):
        return None
    if request.app[TOKEN]:
        return NEEDS_NODE_TOKEN
    return WRONG_CONTROL_TOKEN if "Authorization" in request.headers else NEEDS_CONTROL_TOKEN


def control(*query: str) -> Callable[[Handler], Handler]:
    """A control route taking the query parameters ``query`` (most take none): the caller is checked first
    (:func:`control_refusal`: a 401 when it may not), then the query (:func:`checked_query`: a 400, as on
    every route of the node's API), and a :class:`Refused` becomes its JSON error."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            refusal = control_refusal(request)
            if refusal is not None:
                return error_response(401, None, refusal)
            try:
                checked_query(request, query)
                return await handler(request)
            except Refused as refused:
                return error_response(refused.status, refused.code, refused.message)
            except RevisionNotFoundError as error:  # (the Hub's wording, "Invalid rev id", names no field)
                return error_response(404, "RevisionNotFound", _no_such_revision(error))

        return guarded

    return decorate


# -- what a request says ----------------------------------------------------------------------------------


async def json_body(request: web.Request, keys: tuple[str, ...]) -> dict[str, Any]:
    """The request's JSON object (``{}`` without a body), with no key but ``keys``: 415 for a body that is
    not ``application/json``, 413 beyond :data:`MAX_CONTROL_BODY`, 400 for anything but a JSON object or
    for a key the route does not take."""
    if request.content_length is not None and request.content_length > MAX_CONTROL_BODY:
        raise Refused(413, "PayloadTooLarge", f"the body may have at most {MAX_CONTROL_BODY} bytes")
    if request.headers.get("Content-Encoding", "").strip().lower() not in ("", "identity"):
        # (aiohttp takes a truncated gzip body for an empty one: a pin would be set from no settings)
        raise Refused(415, "UnsupportedMediaType", "send the body uncompressed (no Content-Encoding)")
    raw = await request.read() if request.body_exists else b""
    if len(raw) > MAX_CONTROL_BODY:
        raise Refused(413, "PayloadTooLarge", f"the body may have at most {MAX_CONTROL_BODY} bytes")
    if not raw.strip():
        return {}
    if request.content_type != "application/json":
        raise Refused(415, "UnsupportedMediaType", "send the body as JSON (Content-Type: application/json)")
    try:
        value = json.loads(raw, object_pairs_hook=_no_key_twice)
    except _KeyTwice as twice:
        # ({"repo": "a/b", "repo": "c/d"} pulled c/d without a word: an explorer's trial)
        raise Refused(400, "BadRequest", f"the body names {str(twice)[:40]!r} twice") from None
    except ValueError:
        raise Refused(400, "BadRequest", "the body is not valid JSON") from None
    except RecursionError:  # (valid JSON, said invalid: an explorer's trial)
        raise Refused(
            400, "BadRequest", "the body nests too deep: a control body is one flat object"
        ) from None
    if not isinstance(value, dict):
        raise Refused(400, "BadRequest", "the body must be a JSON object")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise Refused(400, "BadRequest", f"unknown key {shown}: this route takes {', '.join(keys)}")
    return value


class _KeyTwice(Exception):
    """A JSON object of the body names a key twice (the key is the message)."""


def _no_key_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _KeyTwice(key)
        found[key] = value
    return found


def _json_type(value: object) -> str:
    """The JSON name of ``value``'s kind (what a client sent), never Python's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _checked(
    what: str, check: Callable[[object], str], value: object, expected: str, in_url: bool = False
) -> str:
    """``value`` of the body field (or, ``in_url``, query parameter) ``what``, through ``check``: a 422 (a
    400 in the URL) naming ``what`` when it is no string (``expected`` says what string) or ``check``
    refuses it."""
    status, code = (400, "BadRequest") if in_url else (422, "InvalidField")
    if not isinstance(value, str):
        raise Refused(status, code, f"{what}: must be a string ({expected}), got {_json_type(value)}")
    try:
        return check(value)
    except InvalidInputError as error:
        raise Refused(status, code, f"{what}: {error}") from None


REVISION = "a branch, tag or commit id"


def _revision_field(body: dict[str, Any]) -> str:
    """The body's ``revision``: ``main`` when it is absent or null."""
    value = body.get("revision")
    return "main" if value is None else _checked("revision", validate_revision, value, REVISION)


def _quant_name(value: object, what: str = "quant") -> str:
    if not isinstance(value, str) or not QUANT.fullmatch(value):
        raise _invalid(
            f"{what}: {json.dumps(value)[:80]} is not a variant name (like q4f16, fp16 or Q4_K_M: letters, "
            "digits and . _ + -, at most 64)"
        )
    return value


def _quant_field(body: dict[str, Any]) -> str | None:
    value = body.get("quant")
    return None if value is None else _quant_name(value)


def _quants_field(body: dict[str, Any]) -> Quants:
    value = body.get("quants")
    if value is None or value == "all":
        return value
    if not isinstance(value, list):
        raise _invalid('quants: give a list of variant names, "all" (every variant) or null (the whole repo)')
    if not 1 <= len(value) <= MAX_QUANTS:
        raise _invalid(f'quants: give from 1 to {MAX_QUANTS} variant names (or "all", or null)')
    return list(dict.fromkeys(_quant_name(item, "quants") for item in value))


# -- pulls ------------------------------------------------------------------------------------------------


@dataclass
class PullJob:
    """One pull started over HTTP, as ``GET /pulls/{id}`` shows it."""

    id: str
    repo: str
    revision: str
    quants: list[str] | str | None  # the variants' names as the repo has them; "all"; None: the whole repo
    commit_id: str
    state: str  # running | done | failed | cancelled
    bytes_done: int
    bytes_total: int
    started_at: float
    finished_at: float | None = None
    result: dict[str, Any] | None = None  # the PullResult, once done
    error: str | None = None  # why it failed
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    cancelling: bool = field(default=False, repr=False)  # DELETE /pulls/{id} asked it to stop
    # When its bytes last moved, and the file it waits for while another process downloads it: a pull that
    # stood still showed 0% with no word of why (its peers frozen, an explorer's trial)
    moved_at: float = field(default=0.0, repr=False)
    waiting_on: str | None = None
    failure: DepotError | None = field(default=None, repr=False)  # what it failed with
    told: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # its pull told its progress once
    counted_at_end: bool = field(default=False, repr=False)  # its end is counted as it ends (past its start)
    settled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # its start knows it has room

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "repo": self.repo,
            "revision": self.revision,
            "quants": self.quants,
            "commit_id": self.commit_id,
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "result": self.result,
            "error": self.error,
            "idle_seconds": (
                round(max(0.0, time.time() - (self.moved_at or self.started_at)), 1)
                if self.state == "running"
                else None
            ),
            "waiting_on": self.waiting_on if self.state == "running" else None,
        }


PullKey = tuple[str, str, "tuple[str, ...] | str | None"]


def _key(repo_id: str, revision: str, quants: Quants) -> PullKey:
    """One key whatever the case the repo id is typed in (a repo the node never saw has no spelling of
    its own yet: `acme/model` and `ACME/Model` asked at once started two jobs)."""
    if isinstance(quants, list):
        return repo_id.lower(), revision, tuple(sorted({q.lower() for q in quants}))
    return repo_id.lower(), revision, quants


# Seconds a request to start a pull waits for it to make its room (or fail for want of it) before its 202
ROOM_PATIENCE = 1.0


class PullJobs:
    """The pulls a node started over HTTP. One pull per repo, revision and set of variants runs at a time:
    asking again while it runs (or while its scan runs) answers the running one. Use from one event loop."""

    def __init__(self) -> None:
        self._jobs: dict[str, PullJob] = {}  # by id, oldest first
        self._running: dict[PullKey, PullJob] = {}
        self._starting: dict[PullKey, asyncio.Future[PullJob]] = {}
        # How the pulls ended, since the node started ("done", "failed", "cancelled"): /metrics, where a node
        # whose pulls all failed showed nothing (an explorer's trial)
        self.ended: dict[str, int] = {}

    def running(self) -> int:
        return len(self._running)

    def get(self, job_id: str) -> PullJob | None:
        return self._jobs.get(job_id)

    def list(self) -> list[PullJob]:
        return list(self._jobs.values())

    def pulling(self, repo_id: str, quant: str | None = None) -> str | None:
        """What pulls ``repo_id`` now (a pull's id, or "a pull starting" while its scan runs), or None; with
        ``quant``, a pull that takes that variant alone (every variant, or it among those named: a pull of
        another quant leaves it to be removed, as `rm -q` allows)."""

        def takes(key: PullKey) -> bool:
            asked = key[2]
            return key[0] == repo_id.lower() and (
                quant is None
                or not isinstance(asked, tuple)
                or any(_one_variant(quant, name) for name in asked)
            )

        running = [job.id for key, job in self._running.items() if takes(key)]
        if running:
            return f"pull {running[0]}"
        return "a pull starting" if any(takes(key) for key in self._starting) else None

    async def start(self, depot: Depot, repo_id: str, revision: str, quants: Quants) -> tuple[PullJob, bool]:
        """The pull of ``quants`` of ``repo_id`` at ``revision``, and whether it is new. The repo is scanned
        first (through the depot's source chain): an unknown repo or variant raises, and nothing starts."""
        if depot.store.read_only:  # (a 503 now, not a 202 for a job that fails at its first write)
            self.ended["refused"] = self.ended.get("refused", 0) + 1
            raise ReadOnlyStoreError(
                f"the store at {depot.home} is {depot.store.read_only_said()}: it pulls nothing"
            )
        key = _key(repo_id, revision, quants)
        starting = self._starting.get(
            key
        )  # (first: a pull just launched may yet be refused, see _short_of_room)
        if starting is not None:
            return await asyncio.shield(starting), False
        running = self._running.get(key)
        if running is not None:
            return running, False
        future: asyncio.Future[PullJob] = asyncio.get_running_loop().create_future()
        self._starting[key] = future
        counted = False  # (a refusal already counted, by the request whose start it was)
        try:
            manifest = await asyncio.to_thread(depot.manifest_for, repo_id, revision)
            wanted = _variants(manifest, quants)
            await in_budget_pool(_check_fits, depot, manifest, wanted, to_the_end=False)
            # (the same commit asked by branch and by commit id: one job, as for the same words twice)
            # (not one whose start still waits to know it has room: refused, it was a job gone at once, a review)
            same = next((job for (repo, _, asked), job in self._running.items() if repo == key[0]
                         and job.commit_id == manifest.commit_id and asked == _key(repo, "", wanted)[2]), None)  # fmt: skip
            if same is not None:
                # (one whose start still waits to know it has room answers as it does: refused, it was a job
                # gone at once, a review; counted once, by its own request)
                await asyncio.shield(same.settled.wait())
                if same.id not in self._jobs and same.failure is not None:
                    counted = True
                    raise same.failure
                future.set_result(same)
                return same, False
            job = self._launch(depot, key, manifest, revision, wanted)
            refusal = await self._short_of_room(job)
            if refusal is not None:
                raise refusal
        except BaseException as error:
            # Requests waiting for this scan get its error; when this request was cancelled (its deadline),
            # a timeout of their own (the error middleware answers 408), never a cancellation.
            cancelled = isinstance(error, asyncio.CancelledError)
            if isinstance(error, DepotError) and response_for_error(error).status >= 500 and not counted:
                # (the node's own failure, no mistake of the request's: a full disk budget, an upstream that
                # failed. Uncounted, an alert on failed pulls never saw the commonest: an explorer's trial)
                self.ended["refused"] = self.ended.get("refused", 0) + 1
            future.set_exception(asyncio.TimeoutError("the scan did not complete") if cancelled else error)
            future.exception()  # retrieved: no "never retrieved" log when no other request waited
            raise
        finally:
            del self._starting[key]
        future.set_result(job)
        return job, True

    async def _short_of_room(self, job: PullJob) -> DepotError | None:
        """What a pull failed with for want of room before it fetched a byte (the disk's: known only as the
        pull makes its room, evicting or not), forgotten as a job: the request's answer (a 507, counted
        ``refused``, as a full disk budget's is: it was a 202 for a job that failed 11 ms later, counted
        ``failed``, and an alert could not tell a full disk from an upstream that broke mid-transfer, an
        explorer's trial). Waited for until the pull tells its progress, ends, or ROOM_PATIENCE passes; until
        then its end is not counted (the failed count went up and down again, a review), nor is it asked
        again (the requests that ask wait for this one's answer)."""
        assert job.task is not None
        told = asyncio.ensure_future(job.told.wait())
        try:
            await asyncio.wait({job.task, told}, timeout=ROOM_PATIENCE, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # (the request went: the job is the pull's now, counted as it ends)
            if job.task.done():
                self.ended[job.state] = self.ended.get(job.state, 0) + 1
            raise
        finally:
            told.cancel()
            job.counted_at_end = True
            job.settled.set()
        failure = job.failure
        if (
            job.task.done()
            and isinstance(failure, (StoreFullError, BudgetExceededError))
            and not job.bytes_done
        ):
            self._jobs.pop(job.id, None)  # (its _run took it out of the running ones as it ended)
            return failure
        if job.task.done():
            self.ended[job.state] = self.ended.get(job.state, 0) + 1
        return None

    def _launch(
        self, depot: Depot, key: PullKey, manifest: Manifest, revision: str, quants: Quants
    ) -> PullJob:
        from modeldepot.transfer.pull import select

        files, _ = select(manifest, quants)
        job = PullJob(uuid.uuid4().hex[:16], manifest.repo_id, revision, quants, manifest.commit_id, "running", 0,
                      sum(f.size for f in files), time.time())  # fmt: skip
        self._jobs[job.id] = self._running[key] = job
        job.task = asyncio.get_running_loop().create_task(self._run(depot, job, manifest))
        # (a node killed mid-pull left no line of what it was pulling: only pulls that ended were logged, an
        # explorer's trial)
        what = quants if isinstance(quants, str) else ", ".join(quants) if quants else "the whole commit"
        log.info("pull %s of %s@%s (%s) started: %s, commit %s", job.id, job.repo, revision, what,
                 size_text(job.bytes_total), manifest.commit_id[:12])  # fmt: skip
        self._forget_finished()
        return job

    async def _run(self, depot: Depot, job: PullJob, manifest: Manifest) -> None:
        def progress(update: PullUpdate) -> None:
            job.told.set()
            if update.shown != job.bytes_done:
                job.moved_at = time.time()
            job.bytes_done, job.bytes_total = update.shown, update.total
            job.waiting_on = update.path if update.waiting else None

        try:
            result: PullResult = await depot.pull_async(
                job.repo,
                job.quants,
                revision=job.revision,
                progress=progress,
                manifest=manifest,
                ride_outages=True,
            )
        except asyncio.CancelledError:
            if job.cancelling and await asyncio.to_thread(
                _published, depot, manifest, job.quants, job.revision
            ):
                # Asked to stop as it published: a publish is not cut (a cancellation waits for it), and it
                # completed. It said "cancelled" for a repo the node held whole (a reviewer's trial).
                job.state, job.bytes_done = "done", job.bytes_total
                return
            # (failures, cancellations and stops were said nowhere but GET /pulls, which a restart forgets: only
            # a pull done had its line in the log, an explorer's trial)
            if job.cancelling:
                # (what the resume takes, as `status` says it: "what it received is kept" of a file of one
                # chunk, whose part is fetched again, an explorer's trial)
                said = _kept_text(await asyncio.to_thread(_kept_for_a_resume, depot, job.repo))
                job.error = f"cancelled: {said} kept for a resume (pull again to go on)"
                job.state = "cancelled"
                log.info("pull %s of %s cancelled: %d of %d bytes received, %s kept for a resume", job.id,
                         job.repo, job.bytes_done, job.bytes_total, said)  # fmt: skip
                return  # (its task ends: the request that cancelled it answers)
            # (read here, not awaited: the node is stopping; "kept for a resume" was said of a file of one chunk,
            # whose bytes the resume fetched again, an explorer's trial)
            said = _kept_text(_kept_for_a_resume(depot, job.repo))
            job.error = (
                f"the node stopped before the pull finished: {said} kept for a resume (pull again to go on)"
            )
            job.state = "failed"
            log.info("pull %s of %s stopped with the node: %d of %d bytes received, %s kept for a resume", job.id,
                     job.repo, job.bytes_done, job.bytes_total, said)  # fmt: skip
            raise
        except DepotError as error:
            job.error, job.state, job.failure = f"{type(error).__name__}: {error}"[:1000], "failed", error
            log.warning("pull %s of %s failed: %s", job.id, job.repo, job.error)
        except Exception:
            log.exception("the pull %s of %s failed unexpectedly", job.id, job.repo)
            job.error, job.state = (
                "NodeError: the pull failed unexpectedly (the node's log has the details)",
                "failed",
            )
        else:
            job.result, job.state = result.to_dict(), "done"
            job.bytes_done = job.bytes_total = result.bytes_total
            # (where the bytes came from: the first thing asked after a fleet's pull, "did the Hub send it
            # three times?")
            sources = ", ".join(
                f"{kind} {size_text(n)}" for kind, n in sorted(result.bytes_by_source.items()) if n
            )
            log.info("pull %s of %s done: %d bytes, %d downloaded (%s)", job.id, job.repo, result.bytes_total,
                     result.bytes_downloaded, sources or "all held already")  # fmt: skip
        finally:
            job.finished_at = time.time()
            if job.counted_at_end:  # (else its start counts it: see _short_of_room)
                self.ended[job.state] = self.ended.get(job.state, 0) + 1
            for key in [key for key, running in self._running.items() if running is job]:
                del self._running[key]

    async def cancel(self, job_id: str) -> tuple[PullJob | None, bool]:
        """Stop the running pull ``job_id`` (what it received is kept for a resume, as when the node stops)
        and wait until it has: the job (None when there is no such job), and whether it was running (an
        ended one is left as it is). It ends cancelled, or done when it was publishing."""
        job = self._jobs.get(job_id)
        if job is None or job.task is None or job.task.done():
            return job, False
        if not job.cancelling:  # (a second request while it stops waits for it too: it said "running")
            job.cancelling = True
            job.task.cancel()
        await asyncio.wait({job.task})  # (not cancelled itself if this request is: the job ends all the same)
        return job, True

    def _forget_finished(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.state != "running"]
        for job_id in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self._jobs[job_id]

    async def close(self) -> None:
        """Cancel the running pulls and wait for them (their finished chunks stay for a resume)."""
        tasks = [job.task for job in self._running.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _kept_for_a_resume(depot: Depot, repo_id: str) -> int | None:
    """The bytes a stopped pull of ``repo_id`` keeps for its resume (its status rows: finished chunks, parts
    of chunks kept); None when they do not say."""
    try:
        stopped = depot.get_manifest(repo_id).interrupted()
    except (DepotError, OSError):  # (a store closing as the node stops, say)
        return None
    return sum(v.bytes_done for v in stopped) if stopped else None


def _one_variant(one: str, other: str) -> bool:
    """Whether two names may name one variant, as ``variant_aliases`` has it: ``onnx-fp16`` and ``fp16`` when
    the revision holds one fp16 (a DELETE by the other name went by a pull of it, a review); never
    ``onnx-fp16`` and ``safetensors-fp16``."""

    def bare(name: str) -> str:
        for kind in ("onnx-", "gguf-", "safetensors-"):
            if name.startswith(kind):
                return name[len(kind) :]
        return name

    one, other = one.lower(), other.lower()
    return one == other or bare(one) == other or one == bare(other)


def _kept_text(kept: int | None) -> str:
    """What :func:`_kept_for_a_resume` found, as a log line and a job's error say it."""
    return "nothing of it" if kept == 0 else "what it received" if kept is None else size_text(kept)


def _published(depot: Depot, manifest: Manifest, quants: Quants, revision: str) -> bool:
    """Whether every file a pull of ``quants`` takes is in the store at the manifest's commit, and the branch
    ``revision`` names points there (never raises: a store that cannot say is not published)."""
    from modeldepot.transfer.pull import select
    from modeldepot.upstream import branch_set_by

    try:
        files, _ = select(manifest, quants)
        held = depot.store.file_sizes(manifest.repo_id, manifest.commit_id)
        branch = branch_set_by(revision)
        if branch is not None and depot.store.resolve(manifest.repo_id, branch) != manifest.commit_id:
            return False
    except DepotError:  # (its branch not here, a store that cannot say: not published)
        return False
    except Exception:  # (a job left "running" for good was worse than a cancel said so; said, not hidden)
        log.exception("could not tell whether the cancelled pull of %s had published", manifest.repo_id)
        return False
    return all(held.get(f.path) == f.size for f in files)


def _check_fits(depot: Depot, manifest: Manifest, quants: Quants) -> None:
    """Refuse (BudgetExceededError: 507) a pull the disk budget cannot hold, as the request asks for it: it
    was a 202 for a pull that failed within a second, its variant's row saying nothing (an explorer's trial)."""
    from modeldepot.transfer.pull import select

    store = depot.store
    if store.budget.max_bytes is None:
        return
    files, _ = select(manifest, quants)
    # (content the store holds, under any file, is found in place: the pull writes nothing for it)
    new = {
        f.sha256 or f.git_oid: f.size
        for f in files
        if store.local_digest(f.sha256, None if f.sha256 else f.git_oid) is None
    }
    with store.budget.writing(manifest.repo_id, manifest.commit_id, [f.path for f in files]) as writer:
        # (as the pull will: another write fetching these contents holds their room for both; a repair
        # fetching a model again had a pull of it refused, its room counted twice, an explorer's trial)
        writer.contents = new
        writer.check_fits(sum(new.values()), f"pulling {manifest.repo_id}")


def _variants(manifest: Manifest, quants: Quants) -> Quants:
    """``quants`` by the repo's own names; a name the repo lacks is a 422."""
    if not isinstance(quants, list):
        return quants
    try:
        return list(dict.fromkeys(manifest.variant(q).name for q in quants))
    except NotFoundError as error:
        raise _invalid(f"quants: {error}") from None


PULLS = web.AppKey("pulls", PullJobs)


@control()
async def start_pull(request: web.Request) -> web.Response:
    body = await json_body(request, ("repo", "revision", "quants"))
    if "repo" not in body:
        raise _invalid('repo: required (like "org/name")')
    repo_id = _checked("repo", validate_repo_id, body["repo"], 'like "org/name"')
    repo_id = await asyncio.to_thread(request.app[DEPOT].store.spelled, repo_id)  # one job whatever the case
    revision = _revision_field(body)
    quants = _quants_field(body)
    try:
        job, new = await request.app[PULLS].start(request.app[DEPOT], repo_id, revision, quants)
    except StoreFullError as error:  # (said as its job would say it to the same caller: sizes, the fix)
        raise Refused(507, "StoreFull", f"the node's disk is full: {error}") from None
    return json_response(job.to_dict(), 202 if new else 200)


@control()
async def list_pulls(request: web.Request) -> web.Response:
    return json_response([job.to_dict() for job in reversed(request.app[PULLS].list())])


@control()
async def get_pull(request: web.Request) -> web.Response:
    job = request.app[PULLS].get(request.match_info["id"])
    if job is None:
        raise Refused(
            404, "NotFound", "no pull with this id (the node forgets finished pulls when it restarts)"
        )
    return json_response(job.to_dict())


@control()
async def cancel_pull(request: web.Request) -> web.Response:
    """Stop a running pull (a variant asked by mistake: it ran until it filled the disk or the node stopped,
    an explorer's trial); what it received is kept for a resume. 409 for a pull that already ended."""
    job, was_running = await request.app[PULLS].cancel(request.match_info["id"])
    if job is None:
        raise Refused(
            404, "NotFound", "no pull with this id (the node forgets finished pulls when it restarts)"
        )
    if not was_running:
        raise Refused(409, "PullNotRunning", f"pull {job.id} is {job.state}: there is nothing to cancel")
    return json_response(job.to_dict())


# -- the store --------------------------------------------------------------------------------------------


def _no_such_revision(error: RevisionNotFoundError) -> str:
    """The body's field, and where the revision was looked for: the store's, or the sources' the chain asked
    (a node that does not hold the repo said "on this node" of what the Hub and the fleet said: an
    explorer's trial)."""
    if error.in_store:
        return f"revision: {error.revision!r} is not a revision of {error.repo_id} on this node"
    if error.source:
        return f"revision: {error.revision!r} is not a revision of {error.repo_id} on {error.source}"
    return f"revision: {error.revision!r} is not a revision of {error.repo_id} its sources know: {error}"


def _unknown_variant_is_invalid(error: NotFoundError) -> None:
    """A variant the repo lacks is the request's mistake (422); a missing repo or revision stays a 404, the
    revision's named as the body's field (the Hub's wording, "Invalid rev id", names none)."""
    if isinstance(error, RevisionNotFoundError):
        raise Refused(404, "RevisionNotFound", _no_such_revision(error)) from None
    if isinstance(error, VariantNotFoundError):
        raise _invalid(f"quant: {error}") from None


@control()
async def preload(request: web.Request) -> web.Response:
    repo_id = await path_repo(request)
    body = await json_body(request, ("quant", "revision"))
    quant, revision = _quant_field(body), _revision_field(body)
    depot = request.app[DEPOT]
    try:
        info = await asyncio.to_thread(lambda: depot.preloader.preload(repo_id, quant, revision))
    except NotFoundError as error:
        _unknown_variant_is_invalid(error)
        raise
    return json_response(info.to_dict())


@control()
async def unload(request: web.Request) -> web.Response:
    """Take a model out of the RAM tier (at once, or when the last request reading it ends): a node's RAM
    could be given from one model to another only by a restart (an explorer's trial). ``unloaded`` false:
    the node holds the repo, and that model was not in RAM."""
    repo_id = await path_repo(request)
    body = await json_body(request, ("quant", "revision"))
    quant, revision = _quant_field(body), _revision_field(body)
    depot = request.app[DEPOT]
    try:
        unloaded = await asyncio.to_thread(depot.preloader.evict, repo_id, quant, revision)
    except NotFoundError as error:
        _unknown_variant_is_invalid(error)
        raise
    return json_response({"repo_id": repo_id, "quant": quant, "revision": revision, "unloaded": unloaded})


@control()
async def pin(request: web.Request) -> web.Response:
    repo_id = await path_repo(request)
    body = await json_body(request, ("quant", "revision"))
    quant, revision = _quant_field(body), _revision_field(body)
    try:
        pinned = await asyncio.to_thread(request.app[DEPOT].pin, repo_id, quant, revision)
    except NotFoundError as error:
        _unknown_variant_is_invalid(error)
        raise
    return json_response(pinned.to_dict())


@control()
async def unpin(request: web.Request) -> web.Response:
    repo_id = await path_repo(request)
    body = await json_body(request, ("quant", "revision"))
    quant, revision = _quant_field(body), _revision_field(body)
    depot = request.app[DEPOT]

    def unpinned() -> bool:
        removed = depot.unpin(repo_id, quant, revision)
        if not removed:
            depot.store.repo_private(repo_id)  # a repo the node does not hold: RepoNotFoundError, a 404
        return removed

    removed = await asyncio.to_thread(unpinned)
    return json_response({"repo_id": repo_id, "quant": quant, "revision": revision, "unpinned": removed})


@control("revision", "quant")
async def remove_repo(request: web.Request) -> web.Response:
    repo_id = await path_repo(request)
    revision = request.query.get("revision")
    if revision is not None:  # (in the URL: a 400, naming the parameter)
        _checked("revision", validate_revision, revision, REVISION, in_url=True)
    quant = request.query.get("quant")
    if quant is not None:  # (one variant, as `rm --quant`: the control API could not, an explorer's trial)
        try:
            quant = _quant_name(quant)
        except Refused as refused:  # (in the URL: a 400, as a bad revision there)
            raise Refused(400, "BadRequest", refused.message) from None
    # The pins' routes take the revision in the body: a body naming one here is read too (a removal of the
    # whole repo for a body that asked for one revision would lose what was never asked for)
    body = await json_body(request, ("revision", "quant"))
    if body.get("revision") is not None:
        named = _checked("revision", validate_revision, body["revision"], REVISION)
        if revision is not None and named != revision:
            raise Refused(400, "BadRequest", f"revision: the URL names {revision!r}, the body {named!r}")
        revision = named
    if (named_quant := _quant_field(body)) is not None:
        if quant is not None and named_quant != quant:
            raise Refused(400, "BadRequest", f"quant: the URL names {quant!r}, the body {named_quant!r}")
        quant = named_quant
    # (A pull running, or scanning before it runs, would publish when it ends: the repo would come back
    # after "removed")
    pulling = request.app[PULLS].pulling(repo_id, quant)
    if pulling is not None:
        raise Refused(409, "PullRunning", f"a pull of {repo_id}{'' if quant is None else f' that takes {quant}'} is "
                                          f"running ({pulling}): remove it once the pull ends")  # fmt: skip
    depot = request.app[DEPOT]
    # (a variant it lacks: 404, as a DELETE of what is not there)
    result = await asyncio.to_thread(depot.remove, repo_id, revision, quant)
    # (a removal from the dashboard was an access line alone, without the repo or what it freed)
    log.info("removed %s%s%s over the control API: %s freed", repo_id, f"@{revision}" if revision else "",
             f" ({quant})" if quant else "", size_text(result.bytes_freed))  # fmt: skip
    return json_response(result.to_dict())


async def list_pins(request: web.Request) -> web.Response:
    """The pins (kept from eviction by the disk budget). A read, like the repo listing: without the token,
    only those of public repos in the store."""
    checked_query(request)
    depot, authorized = request.app[DEPOT], is_authorized(request)

    # One lookup a pin: listing every repo cost 0.1 s at 5,000 repos, at every poll of every dashboard,
    # for no pin at all
    def public(repo_id: str) -> bool:
        try:
            return not depot.store.repo_private(repo_id)
        except NotFoundError:
            return False

    def visible() -> list[dict[str, Any]]:
        pins = depot.pins()
        if not authorized:
            pins = [p for p in pins if public(p.repo_id)]
        return [p.to_dict() for p in pins]

    return json_response(await asyncio.to_thread(visible))


CONTROL_PATHS = (f"{API}/pulls", f"{API}/pulls/{{id}}", f"{API}/repos/{{org}}/{{name}}/preload",
                 f"{API}/repos/{{org}}/{{name}}/pin", f"{API}/repos/{{org}}/{{name}}")  # fmt: skip


def add_control_routes(app: web.Application) -> None:
    """Register the control routes (before the Hub's, whose ``/api/...`` catch-all refuses writes)."""
    app[PULLS] = PullJobs()

    async def stop_pulls(app: web.Application) -> None:
        await app[PULLS].close()

    app.on_cleanup.append(stop_pulls)
    router = app.router
    router.add_post(f"{API}/pulls", start_pull, name="control-pulls")
    router.add_get(f"{API}/pulls", list_pulls, name="control-pulls")
    router.add_get(API + "/pulls/{id}", get_pull, name="control-pull")
    router.add_delete(API + "/pulls/{id}", cancel_pull, name="control-pull")
    router.add_post(API + "/repos/{org}/{name}/preload", preload, name="control-preload")
    router.add_delete(API + "/repos/{org}/{name}/preload", unload, name="control-preload")
    router.add_put(API + "/repos/{org}/{name}/pin", pin, name="control-pin")
    router.add_delete(API + "/repos/{org}/{name}/pin", unpin, name="control-pin")
    router.add_delete(API + "/repos/{org}/{name}", remove_repo, name="control-remove")
    router.add_get(f"{API}/pins", list_pins)
