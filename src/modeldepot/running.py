"""The pulls of one depot under way, on whichever thread's event loop: :meth:`Depot.close` stops them.

A depot closed while another thread pulled (a service shutting down, a ``with`` block ending) went on
downloading the rest of the model, gigabytes for minutes, and only then failed at publishing it (an
explorer's trial). Each pull runs as a task of its own, which ``stop`` cancels on its loop: the pull
unwinds as on Ctrl-C (what it received is kept for the next pull) and raises StoreClosedError.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from modeldepot.errors import StoreClosedError
from modeldepot.store.forking import start_over_after_fork

if TYPE_CHECKING:
    import asyncio

__all__ = ["RunningPulls"]

T = TypeVar("T")
log = logging.getLogger(__name__)
CLOSE_PATIENCE = 10.0  # seconds a close waits at most for the pulls it stopped to unwind


class RunningPulls:
    """The pulls of one depot under way (see the module)."""

    def __init__(self, home: object) -> None:
        self._home = home
        self._lock = threading.Lock()
        # each pull's task -> its loop, and an event set once it has ended (waited on from other threads)
        self._running: dict[asyncio.Task[Any], tuple[asyncio.AbstractEventLoop, threading.Event]] = {}
        self._closed = False
        start_over_after_fork(self)

    def after_fork(self) -> None:
        """In a forked child: the pulls of the parent's other threads are the parent's, their loops' threads
        are not here, and they never end here: a worker's close waited its whole patience for them (10 s),
        and called on a loop nothing runs (an explorer's trial). The forking thread's own pull stays."""
        self._lock = threading.Lock()
        here = None
        if self._running:
            import asyncio

            with contextlib.suppress(RuntimeError):
                here = asyncio.get_running_loop()
        self._running = {task: entry for task, entry in self._running.items() if entry[0] is here}

    async def run(self, pull: Coroutine[Any, Any, T]) -> T:
        """Await ``pull`` as a task :meth:`stop` can cancel (the caller's own cancellation reaches it too)."""
        import asyncio  # (here: `import modeldepot.cli` loads no asyncio, a start-up cost)

        from modeldepot.transfer.outage import pulling_here

        with self._lock:  # (never held across an await: a second pull on the loop would block it for good)
            closed = self._closed
            if not closed:
                task = asyncio.ensure_future(pull)
                ended = threading.Event()
                task.add_done_callback(lambda _: ended.set())
                self._running[task] = (asyncio.get_running_loop(), ended)
        if closed:
            pull.close()  # (never started)
            raise self._closed_error()
        try:
            with pulling_here():  # (a blocking call on this loop meanwhile is refused: run_blocking)
                return await task
        except asyncio.CancelledError:
            # (the caller's own cancellation stays one; Task.cancelling is Python 3.11's)
            cancelling = getattr(asyncio.current_task(), "cancelling", None)
            if self.closed() and task.cancelled() and not (cancelling is not None and cancelling()):
                raise self._closed_error() from None
            raise
        finally:
            with self._lock:
                self._running.pop(task, None)

    def closed(self) -> bool:
        return self._closed

    def stop(self) -> None:
        """Cancel the pulls under way and wait (CLOSE_PATIENCE at most) until those of other threads' loops
        have unwound; no pull starts from now on."""
        with self._lock:
            self._closed = True
            running = list(self._running.items())
        if not running:
            return  # (a depot that never pulled: no asyncio loaded for its close, a start-up cost)
        import asyncio

        for task, (loop, _) in running:
            with contextlib.suppress(RuntimeError):  # (a loop closed meanwhile: its pull ended)
                loop.call_soon_threadsafe(task.cancel)
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        deadline = time.monotonic() + CLOSE_PATIENCE
        for _, (loop, ended) in running:
            if loop is here:  # (it cannot end while this thread waits: it unwinds after the store closed)
                log.warning("the depot of %s was closed from the event loop of a pull of its own: the pull was "
                            "cancelled, not waited for (await it before close() to keep all it received)",
                            self._home)  # fmt: skip
            else:
                ended.wait(max(0.0, deadline - time.monotonic()))

    def _closed_error(self) -> StoreClosedError:
        return StoreClosedError(f"the depot of {self._home} was closed while it pulled: what the pull received "
                                "is kept for the next one (open Depot(home) again to pull)")  # fmt: skip
