"""The upstream's view of the repos a mirror serves: one scan per (repo, revision) at a time, on threads of
its own (a hung upstream holds them, never the loop's pool), each branch's kept for ``MODELDEPOT_MIRROR_TTL``
and a commit's for good; a scan no upstream answered answers its failure for FAILED_TTL. A repo its upstream
no longer shows is made private here (and shown again once the upstream does), and the branches a scan saw
at a commit are pointed at it once the commit is pulled."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from modeldepot.depot import Depot
from modeldepot.errors import (
    AccessDeniedError,
    DepotError,
    NotFoundError,
    OfflineError,
    RepoNotFoundError,
    UpstreamError,
    UpstreamTimeoutError,
)
from modeldepot.hub.manifest import Manifest
from modeldepot.store.forking import ForkSafeExecutor
from modeldepot.store.publish import DEFAULT_BRANCH, publish_branch
from modeldepot.transfer.pull import revision_spec
from modeldepot.upstream import branch_set_by
from modeldepot.validation import is_commit_id

__all__ = ["UpstreamScans"]

# Upstream scans at once, on threads of their own: a hung upstream holds them (each for its sources' timeouts,
# a minute), never the loop's default pool that every read of the store uses. More wait their turn: an
# upstream that hangs on some repos only delays the scans of the others once it holds all of them
SCAN_THREADS = 16
# Seconds a scan no upstream answered answers that failure (as a file's failed pull does: mirror.pulls)
FAILED_TTL = 20.0
# Seconds a request for something the store holds waits for the upstream's scan before the store answers (an
# upstream that accepts and never answers: huggingface_hub gives up on a HEAD after 10 s)
HELD_PATIENCE = 5.0

log = logging.getLogger(__name__)


class UpstreamScans:
    """The upstream's scans for a mirror. Use from one event loop."""

    def __init__(self, depot: Depot, deadline: float = 60.0) -> None:
        """``deadline``: the seconds a request may take before its answer (a server's request deadline)."""
        self.depot = depot
        # Seconds a request the store cannot answer waits for the upstream's scan: under the request's
        # deadline, so that it hears 504 UpstreamTimeout (and not the deadline's 408, which says it was slow)
        self.patience = max(1.0, deadline - 5.0)
        self._manifests: dict[tuple[str, str], tuple[float, Manifest]] = {}
        self._scans: dict[tuple[str, str], asyncio.Task[Manifest]] = {}  # the running one per key
        self._scan_began: dict[tuple[str, str], float] = {}  # when it began (monotonic)
        # (repo, revision) -> (when (monotonic), the error) of a scan no upstream answered lately
        self._scan_failed: dict[tuple[str, str], tuple[float, UpstreamError]] = {}
        self._scan_threads = ForkSafeExecutor(SCAN_THREADS, thread_name_prefix="mirror-scan")
        self._stopping = False
        self._hidden_checked: dict[str, float] = {}  # repo id in lower case -> when (monotonic) asked again
        # repo id in lower case -> when (monotonic) the upstream said it has no `main` (a node's repo imported
        # with `-r dev` only): its model info without a revision asked again each time, twice (a review)
        self._without_main: dict[str, float] = {}

    def lacks_main(self, repo_id: str) -> bool:
        """Whether the upstream said lately (within the mirror's TTL) that ``repo_id`` has no ``main``."""
        when = self._without_main.get(repo_id.lower())
        return when is not None and time.monotonic() - when < self.depot.config.mirror_ttl

    def note_lacks_main(self, repo_id: str) -> None:
        self._without_main[repo_id.lower()] = time.monotonic()

    async def manifest(self, repo_id: str, revision: str, held: bool = False) -> Manifest:
        """The upstream's view of ``repo_id`` at ``revision`` (a branch's scan is reused briefly). Requests
        for the same (repo, revision) share one scan; one that waited long enough for it (until HELD_PATIENCE
        after the scan began when the store ``held`` an answer, else :attr:`patience`) raises
        UpstreamTimeoutError (504) while the scan goes on, for the requests that follow."""
        key = (repo_id, revision)
        cached = self._manifests.get(key)
        ttl = self.depot.config.mirror_ttl
        if cached is not None and (is_commit_id(revision) or time.monotonic() - cached[0] < ttl):
            return cached[1]
        failed = self._scan_failed.get(key)
        if failed is not None and time.monotonic() - failed[0] < FAILED_TTL:
            # (a hung upstream's scan took each of a client's retries its whole timeout again: 30 s each, a
            # download failing after 200 s, an explorer's trial)
            again = time.monotonic() - failed[0]
            kind = UpstreamTimeoutError if isinstance(failed[1], UpstreamTimeoutError) else UpstreamError
            raise kind(f"{failed[1]} (a scan {again:.0f} s ago; asked again {FAILED_TTL - again:.0f} s from now)",
                       repo_id=repo_id, source=failed[1].source)  # fmt: skip
        if self._stopping:  # (a request that came as the node began to stop: no new scan to wait for)
            raise UpstreamTimeoutError(f"the node is stopping: {repo_id} at {revision} is not looked up upstream",
                                       repo_id=repo_id)  # fmt: skip
        scan = self._scans.get(key)
        if scan is None:
            scan = self._scans[key] = asyncio.get_running_loop().create_task(self._scan(key))
            scan.add_done_callback(_retrieved)
            self._scan_began[key] = time.monotonic()
        patience = self.patience
        if (
            held
        ):  # (counted from the scan's start: a hung upstream costs the store's answers 5 s once, not each)
            began = self._scan_began.get(key, time.monotonic())
            patience = max(0.0, min(HELD_PATIENCE, self.patience) - (time.monotonic() - began))
        try:
            return await asyncio.wait_for(asyncio.shield(scan), patience)
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"no upstream described {repo_id} at {revision} in time (the node goes on asking: try again)",
                repo_id=repo_id,
            ) from None
        except asyncio.CancelledError:
            if not scan.cancelled():  # (this request was cancelled, not the shielded scan)
                raise
            # (the scan was: the node stops, see stop)
            raise UpstreamTimeoutError(
                f"the node is stopping, and no upstream described {repo_id} at {revision} before",
                repo_id=repo_id,
            ) from None

    async def _scan(self, key: tuple[str, str]) -> Manifest:
        try:
            loop = asyncio.get_running_loop()
            try:
                # (a full disk stops writes, not reads: a mirror answered 507 for models it held each time a
                # branch's scan was due, its record finding no room, an explorer's trial)
                manifest = await loop.run_in_executor(
                    self._scan_threads, functools.partial(self.depot.manifest_for, *key, unrecorded_ok=True)
                )
            except (RepoNotFoundError, AccessDeniedError) as error:
                # The upstream no longer shows the repo to this node (made private beyond its credentials, or
                # deleted): what the store pulled of it is served behind the node's token alone from now on.
                # Only when the upstream it came from says so: another's "not here", with that one out of
                # reach, hid a public repo for good (an explorer's trial)
                said_by = error.denied_by or ((error.source,) if error.source else ())
                await self._hide(
                    key[0], "no longer shown by the upstream", pulled_from_here=True, said_by=said_by
                )
                raise
            except UpstreamError as error:
                # (no answer at all: an outage, not this node's offline mode, answered at once as it is)
                if error.status is None and not isinstance(error, OfflineError):
                    self._scan_failed[key] = (time.monotonic(), error)
                    if len(self._scan_failed) > 1000:
                        self._scan_failed.pop(next(iter(self._scan_failed)))
                raise
            if manifest.private or manifest.gated:
                # (what the store holds of it answers commit ids and listings: behind the token now, too; a
                # gated one's described to anyone, as the upstream describes it)
                gated = False if manifest.upstream_private else manifest.gated
                await self._hide(manifest.repo_id, "private upstream now", gated=gated)
            self._manifests[key] = (time.monotonic(), manifest)
            self._scan_failed.pop(key, None)
            return manifest
        finally:
            if self._scans.get(key) is asyncio.current_task():  # (not a newer scan of the key)
                del self._scans[key]
                self._scan_began.pop(key, None)

    async def recheck_hidden(self, repo_id: str) -> bool:
        """Whether ``repo_id``, hidden on its upstream's word (``repos.hidden_at``: a "not found" once, a
        wrong token, a repo private for a while), is shown again: its upstream is asked again, once a TTL
        at most, before a request that may not see it is refused (hidden for good, only `rm` brought it
        back: an explorer's trial). Shown there, it is public here again (:meth:`Upstream.scan`)."""
        store, key, now = self.depot.store, repo_id.lower(), time.monotonic()
        last = self._hidden_checked.get(key)
        if store.read_only or (last is not None and now - last < self.depot.config.mirror_ttl):
            return False  # (a read-only store: as it is, its schema maybe one before hidden_at)
        if not await asyncio.to_thread(store.hidden_by_upstream, repo_id):
            return False
        self._hidden_checked[key] = now
        if len(self._hidden_checked) > 1000:
            self._hidden_checked.pop(next(iter(self._hidden_checked)))
        with contextlib.suppress(DepotError, TimeoutError):  # (still hidden, or no answer: as it was)
            await asyncio.wait_for(asyncio.shield(self.manifest(repo_id, DEFAULT_BRANCH)), HELD_PATIENCE)
        return not await asyncio.to_thread(store.repo_private, repo_id)

    async def _hide(
        self,
        repo_id: str,
        why: str,
        pulled_from_here: bool = False,
        said_by: tuple[str, ...] = (),
        gated: bool | str = False,
    ) -> None:
        """Make a repo the store pulled private (not one imported here: the node's own); ``pulled_from_here``:
        only when pulled from one of this node's upstreams (one pulled from elsewhere they need not know),
        and that one is among ``said_by``, the URLs of the answers that said it is gone. ``gated``: the
        upstream's flag when it gates the repo (:meth:`Store.hide_repo <modeldepot.store.Store.hide_repo>`)."""
        store, config = self.depot.store, self.depot.config
        upstreams = {url.rstrip("/") for url in (*config.servers, config.hub_endpoint)}

        def hide() -> bool:
            rows = store.index.read("SELECT origin FROM repos WHERE repo_id = ? COLLATE NOCASE", (repo_id,))
            if not rows or rows[0]["origin"] == "import":
                return False
            origin = rows[0]["origin"].rstrip("/")
            if pulled_from_here and (
                origin not in upstreams
                or not any(url.startswith(f"{origin}/") or url == origin for url in said_by)
            ):
                return False
            return store.hide_repo(repo_id, gated)

        if await asyncio.to_thread(hide):
            if gated:
                log.warning("%s is gated by its upstream: this node serves its files behind its token from now "
                            "on (it describes it to anyone, as the upstream does)", repo_id)  # fmt: skip
            else:
                log.warning("%s is %s: this node serves it behind its token from now on (without one, to no "
                            "one)", repo_id, why)  # fmt: skip

    def _branches_at(self, manifest: Manifest) -> list[Manifest]:
        """The scans of branches of ``manifest``'s repo kept now (within ``MODELDEPOT_MIRROR_TTL``) that saw
        them at ``manifest``'s commit, but ``manifest`` itself (a pull by a branch points that one)."""
        ttl, now = self.depot.config.mirror_ttl, time.monotonic()
        repo, found = manifest.repo_id.lower(), {}
        for (_, revision), (when, scan) in self._manifests.items():
            if (now - when < ttl and scan is not manifest and branch_set_by(revision) is not None
                    and scan.revision == revision and scan.commit_id == manifest.commit_id
                    and scan.repo_id.lower() == repo):  # fmt: skip
                found[revision] = scan
        return [found[name] for name in sorted(found)]

    async def point_branches(self, manifest: Manifest, its_own: bool = False) -> None:
        """Point at the commit ``manifest``'s pull published every branch a scan kept now saw there. A client
        describes a branch (huggingface_hub's model_info, a HEAD by the branch) and then fetches its files by
        the commit id it was given: pulled by that id, the commit was held whole with no branch naming it
        when another branch of the repo was scanned in between (the repo's saved scan is its last one), and
        in an upstream outage a request by the branch was a 502 (an explorer's trial). Several branches at
        one commit are each pointed; none moves back over a commit the store learned of after the scan
        that saw it (:func:`publish_branch`). ``its_own``: ``manifest``'s own branch too (a file of it served
        from the store, which held its commit: no pull points it)."""
        scans = self._branches_at(manifest)
        if its_own and branch_set_by(manifest.revision) is not None:
            scans.append(manifest)
        if scans:
            await asyncio.to_thread(self._point, manifest, scans)

    def _point(self, manifest: Manifest, scans: list[Manifest]) -> None:
        store = self.depot.store
        for scan in scans:
            try:
                with contextlib.suppress(NotFoundError):
                    if store.resolve(manifest.repo_id, scan.revision) == manifest.commit_id:
                        continue  # (a read, not a write each file: a snapshot_download of 300 made 300)
                publish_branch(store, revision_spec(scan, scan.revision))
            except (DepotError, OSError) as error:  # (the file is pulled: only the branch is not recorded)
                log.warning("%s: %s is at %s upstream, and could not be recorded so: %s", manifest.repo_id,
                            scan.revision, manifest.commit_id[:12], error)  # fmt: skip

    def stop(self) -> None:
        """Give up the scans under way (the node stops: the requests waiting for them hear a 504 now, not
        when a hung upstream's timeouts end). Their threads end with those timeouts."""
        self._stopping = True
        for scan in self._scans.values():
            scan.cancel()
        self._scans.clear()  # (a scan cancelled before it ran never removes itself)
        self._scan_began.clear()

    async def close(self) -> None:
        """Cancel the scans still waiting for an upstream (their threads end with its timeouts)."""
        scans = list(self._scans.values())
        self._scans.clear()
        for scan in scans:
            scan.cancel()
        await asyncio.gather(*scans, return_exceptions=True)
        self._scan_threads.shutdown(wait=False, cancel_futures=True)


def _retrieved(task: asyncio.Task[Manifest]) -> None:
    """A scan every waiter gave up on (their patience ran out) failed: its error was said to them already."""
    if not task.cancelled():
        task.exception()
