"""The fleet as a pull sees it: a started :class:`~modeldepot.discovery.Discovery` read from any thread
(:class:`FleetView`), one of its own for a process that only pulls (:class:`BackgroundFleet`: never
registers), and the rows ``modeldepot peers`` shows (:class:`PeerRow`).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from modeldepot.discovery.base import ClusterStatus, Discovery, Holder, NodeRecord, ViewDiscovery
from modeldepot.store.forking import start_over_after_fork

__all__ = ["FLEET_READ_TIMEOUT", "BackgroundFleet", "FleetView", "PeerRow"]

log = logging.getLogger(__name__)

T = TypeVar("T")

FLEET_READ_TIMEOUT = 10.0  # seconds a read of the fleet's view may wait for the loop it lives on
FLEET_START_TIMEOUT = 30.0  # seconds a pulling process waits for its view of the fleet to load


@dataclass(frozen=True)
class PeerRow:
    """One live node of the fleet, as ``modeldepot peers`` and ``GET /api/depot/v1/peers`` show it."""

    node_id: str
    url: str
    version: str
    started_at: float
    last_seen: float  # the last moment this process's view knew the node alive (FleetView.rows)
    blobs: int  # contents it holds whole
    bytes: int  # their size
    partial: int  # contents it is downloading (or holds part of, for a resume)
    chunk_size: int = 0  # its store's (0: not said, an older node)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FleetView:
    """A started :class:`Discovery`, read from any thread. A :class:`ViewDiscovery` (every backend) is read
    where the caller runs (its view is guarded by a lock); any other discovery is read on its own loop: at
    once from that loop, else handed to it and waited for. After :meth:`detach` (the discovery is
    closing) reads answer as an empty fleet."""

    def __init__(
        self, discovery: Discovery, loop: asyncio.AbstractEventLoop, node_id: str | None = None
    ) -> None:
        self.discovery = discovery
        self.loop = loop
        self.node_id = node_id  # this node's id when it registered itself (shown like any other peer)
        self._detached = False
        self._background: set[concurrent.futures.Future[None]] = set()  # (in_background)
        self._background_lock = threading.Lock()

    def detach(self) -> None:
        self._detached = True

    def read(self, what: Callable[[Discovery], T], default: T) -> T:
        """``what(discovery)``, where it may run (see the class); ``default`` once the view is detached or
        its loop is gone (a closing process pulls on without the fleet)."""
        if self._detached:
            return default
        if isinstance(self.discovery, ViewDiscovery) or _running_loop() is self.loop:
            return what(self.discovery)
        try:
            return self._submit(what).result(FLEET_READ_TIMEOUT)
        except (RuntimeError, concurrent.futures.TimeoutError) as error:
            log.warning(
                "the fleet's view did not answer (%s): going on without it", error or type(error).__name__
            )
            return default

    async def read_async(self, what: Callable[[Discovery], T], default: T) -> T:
        """:meth:`read` for a coroutine, which may run on another loop: it waits without blocking its own."""
        if self._detached:
            return default
        if isinstance(self.discovery, ViewDiscovery) or _running_loop() is self.loop:
            return what(self.discovery)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self._submit(what)), FLEET_READ_TIMEOUT)
        except (RuntimeError, asyncio.TimeoutError) as error:
            log.warning(
                "the fleet's view did not answer (%s): going on without it", error or type(error).__name__
            )
            return default

    async def call(self, what: Callable[[Discovery], Awaitable[T]], default: T) -> T:
        """Await ``what(discovery)`` (a write, as a chunk claim) on the discovery's own loop, from any loop;
        ``default`` once the view is detached, its loop is gone, or it does not answer in time."""
        if self._detached:
            return default
        if _running_loop() is self.loop:
            return await what(self.discovery)

        async def run() -> T:
            return await what(self.discovery)

        coroutine = run()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError as error:  # its loop is closed
            coroutine.close()
            log.warning("the fleet did not answer (%s): going on without it", error)
            return default
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), FLEET_READ_TIMEOUT)
        except (RuntimeError, asyncio.TimeoutError) as error:
            log.warning("the fleet did not answer (%s): going on without it", error or type(error).__name__)
            return default

    def in_background(self, what: Callable[[Discovery], Awaitable[None]]) -> bool:
        """Run ``what(discovery)`` on the discovery's loop without waiting for it (a pull's claims handed
        over after it returned); :meth:`finish_background` waits for what runs. False when the view is
        detached or its loop is gone: nothing runs."""
        if self._detached:
            return False

        async def run() -> None:
            await what(self.discovery)

        coroutine = run()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError:  # its loop is closed
            coroutine.close()
            return False
        with self._background_lock:
            self._background.add(future)
        future.add_done_callback(self._ran)
        return True

    def _ran(self, future: concurrent.futures.Future[None]) -> None:
        with self._background_lock:
            self._background.discard(future)
        if not future.cancelled() and (error := future.exception()) is not None:
            log.debug("a task of the fleet's failed: %s", error)

    def background(self) -> list[concurrent.futures.Future[None]]:
        """What :meth:`in_background` runs now."""
        with self._background_lock:
            return list(self._background)

    def finish_background(self, timeout: float = FLEET_READ_TIMEOUT) -> None:
        """Wait (from another thread than the discovery's loop, at most ``timeout``) for what
        :meth:`in_background` runs."""
        if running := self.background():
            concurrent.futures.wait(running, timeout)

    def _submit(self, what: Callable[[Discovery], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(what(self.discovery))
            except BaseException as error:  # handed to the waiting thread
                future.set_exception(error)

        self.loop.call_soon_threadsafe(run)  # RuntimeError when the loop is closed
        return future

    def peers(self) -> list[NodeRecord]:
        return self.read(lambda d: d.peers(), [])

    def status(self) -> ClusterStatus | None:
        return self.read(lambda d: d.status(), None)

    def rows(self, now: float | None = None) -> list[PeerRow]:
        """One row per live node, with what it holds.

        ``last_seen``: the view is kept by a watch on the registry, and a node's record lives as long as its
        lease, so while the view is connected every node in it is known alive now (``now``); while it is not,
        the view is as old as the connection's loss (``status().since``), the last moment each node was
        known alive."""

        def collect(d: Discovery) -> list[PeerRow]:
            status = d.status()
            moment = time.time() if now is None else now
            seen = moment if status.connected else (status.since or moment)
            rows = []
            for node in d.peers():
                held = d.holdings_of(node.node_id).values()
                whole = [h for h in held if h.complete]
                rows.append(PeerRow(node.node_id, node.url, node.version, node.started_at, seen, len(whole),
                                    sum(h.size for h in whole), len(held) - len(whole), node.chunk_size))  # fmt: skip
            return rows

        return self.read(collect, [])

    async def holders(self, digests: Iterable[str]) -> dict[str, list[Holder]]:
        """The live nodes holding each content (by SHA-256), from the view."""
        wanted = list(dict.fromkeys(digests))
        return await self.read_async(lambda d: {sha: d.holders(sha) for sha in wanted}, {})


class BackgroundFleet(FleetView):
    """A read-only view of the fleet for a process that pulls (the CLI, a program's :class:`Depot`): the
    discovery runs on an event loop of its own, on a daemon thread, and never registers this process."""

    def __init__(
        self, discovery: Discovery, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        super().__init__(discovery, loop)
        self._thread = thread
        # A program that never closes its Depot (a script that just ends) left the claims its pulls handed
        # over in the registry until its lease ran out, chunks the fleet waited on from it (a review): the
        # view is closed at the interpreter's exit, while its daemon thread still runs (weakly: a view
        # dropped unclosed is no reason to keep it alive)
        view = weakref.ref(self)

        def close_at_exit() -> None:
            if (still := view()) is not None:
                still.close()

        self._close_at_exit = close_at_exit
        atexit.register(close_at_exit)
        self._closing = threading.Lock()  # (one close at a time: a second one found the loop closed)
        self.forked = False
        start_over_after_fork(self)

    def after_fork(self) -> None:
        """In a forked child: the loop's thread is the parent's, not here, and so are the claims it hands
        over (a child's exit waited 30 s on it at its atexit close, then raised; one forked while a thread
        held the background's lock hung for good: a review). The view is left alone, detached: it answers
        at once, with nothing (gRPC opens no new connection in a forked child; the child's pulls go on
        without the fleet, :attr:`~modeldepot.upstream.Upstream.fleet` says so)."""
        atexit.unregister(self._close_at_exit)
        self._background, self._background_lock = set(), threading.Lock()
        self._closing = threading.Lock()
        self.forked = True
        self.detach()

    @classmethod
    def open(cls, url: str | None, prefix: str, servers: Iterable[str] = (),
             timeout: float = FLEET_START_TIMEOUT) -> BackgroundFleet:  # fmt: skip
        """Connect and load the view (an unreachable registry is no error: the view is empty, and says so
        in its status)."""
        from modeldepot.discovery import open_discovery

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="modeldepot-fleet", daemon=True)
        thread.start()

        async def started() -> Discovery:
            discovery = open_discovery(url, servers=tuple(servers), prefix=prefix)
            try:
                await discovery.start()
            except BaseException:
                await discovery.close()
                raise
            return discovery

        future = asyncio.run_coroutine_threadsafe(started(), loop)
        try:
            discovery = future.result(timeout)
        except BaseException:
            future.cancel()
            _stop_loop(loop, thread)
            raise
        return cls(discovery, loop, thread)

    def fleets_elsewhere(self) -> dict[str, int]:
        """:meth:`Discovery.fleets_elsewhere`, waited for ({} when it does not answer in time)."""
        try:
            future = asyncio.run_coroutine_threadsafe(self.discovery.fleets_elsewhere(), self.loop)
            return future.result(FLEET_READ_TIMEOUT)
        except Exception as error:  # (a hint, never a failure)
            log.debug("looking for other fleets: %s", error)
            return {}

    def close(self) -> None:
        """Disconnect (it registered nothing, so nothing is withdrawn) and stop the thread; once (a close
        while another runs waits for it: at the interpreter's exit, a thread's close and the exit's own)."""
        atexit.unregister(self._close_at_exit)
        with self._closing:
            if self._detached:
                return
            try:
                self.finish_background()  # (claims handed over after pulls: released before the lease goes)
            finally:  # (a Ctrl-C in that wait: the discovery is closed all the same)
                self.detach()
            self._disconnect()

    def _disconnect(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.discovery.close(), self.loop).result(FLEET_READ_TIMEOUT)
        except Exception as error:  # closing a connection that broke: nothing is left to undo
            log.debug("closing the fleet's view: %s", error)
        finally:
            _stop_loop(self.loop, self._thread)


def other_fleets(elsewhere: dict[str, int]) -> str:
    """Fleets under other prefixes (:meth:`Discovery.fleets_elsewhere`), said in a few words."""
    return ", ".join(
        f"{prefix} ({count} node{'s' if count != 1 else ''})" for prefix, count in elsewhere.items()
    )


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    async def finish_tasks() -> None:
        # gRPC leaves a task per finished call that ends a moment later: let them end, rather than have
        # the closed loop report them destroyed while pending.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    if loop.is_running():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(finish_tasks(), loop).result(FLEET_READ_TIMEOUT)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(FLEET_READ_TIMEOUT)
    if not thread.is_alive():
        loop.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
