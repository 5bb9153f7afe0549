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
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["to_thread_to_the_end", "until_done"]

T = TypeVar("T")


async def to_thread_to_the_end(func: Callable[..., T], /, *args: Any) -> T:
    """``func(*args)`` on the default executor, as ``asyncio.to_thread``; a cancelled caller still waits
    (through further cancellations) until the call has ended, then raises CancelledError."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(func, *args))
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
