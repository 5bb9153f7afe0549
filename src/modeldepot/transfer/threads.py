"""Worker-thread calls that a cancellation cannot outrun.

``asyncio.to_thread`` returns at once when its caller is cancelled, while the thread goes on. For a thread
that writes through a download's descriptors (its data file, its log) that is a hazard: the pull unwinds,
closes them, and the thread's late ``pwrite`` meets a closed descriptor or, in a long-running server, the
same number reused by another file. These helpers let the caller unwind only once the thread has ended.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from modeldepot.store.forking import ForkSafeExecutor

__all__ = ["BUDGET_WAITS", "in_budget_pool", "to_thread_to_the_end", "until_done"]

T = TypeVar("T")

# Calls that may wait for the disk budget's lock (room made, evictions, a check of what fits): a pool of their
# own. On the default executor (6 threads on 2 cores), a mirror's pulls queued behind one eviction round took
# every thread, and its /health and the files it held waited seconds behind them (an explorer's trial).
BUDGET_WAITS = ForkSafeExecutor(max_workers=4, thread_name_prefix="modeldepot-budget")


async def in_budget_pool(func: Callable[..., T], /, *args: Any, to_the_end: bool = True) -> T:
    """:func:`to_thread_to_the_end` on :data:`BUDGET_WAITS` (``to_the_end`` False: a cancelled caller
    returns at once, as from ``asyncio.to_thread``: a check that writes nothing)."""
    if not to_the_end:
        return await asyncio.get_running_loop().run_in_executor(BUDGET_WAITS, functools.partial(func, *args))
    return await to_thread_to_the_end(func, *args, executor=BUDGET_WAITS)


async def to_thread_to_the_end(func: Callable[..., T], /, *args: Any, executor: Executor | None = None) -> T:
    """``func(*args)`` on ``executor`` (the default one: as ``asyncio.to_thread``); a cancelled caller still
    waits (through further cancellations) until the call has ended, then raises CancelledError."""
    future = asyncio.get_running_loop().run_in_executor(executor, functools.partial(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                continue
        if not future.cancelled():
            future.exception()  # retrieved: its failure is the cancelled caller's no longer
        raise


async def until_done(future: Future[Any]) -> None:
    """Wait for a thread's call to end, through further cancellations; its failure is dropped."""
    while not future.done():
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            continue
        except Exception:
            return
