"""Outages: a pull that no source answers at all waits for one, for ``MODELDEPOT_OUTAGE_PATIENCE`` seconds.

One clock per pull (:class:`OutageClock`) says how long its sources have sent nothing: bytes arriving, or any
HTTP answer, set it back to 0. A range attempt that got no answer (refused, cut, silent, unreachable) while
the whole pull has heard nothing for a moment is the network's failure, not its source's: the range asks
again, without counting it against its attempts, until the pull has heard nothing for the patience
(``HttpSource`` in sources.py). A try of the pull that fails for want of an answer all the same (a node that
refuses is dropped at once) is run again, resuming, under the same clock (:func:`run_through_outages`).

So the patience counts from the last byte that came, not from the end of a try: through a silent outage each
attempt waits out its read timeout, and five of them made minutes of silence before the patience even
began (a trial over network namespaces). The clock reaches the ranges through a context variable: a pull's
tasks inherit it, and a pull run without one (a mirror's, the control API's: their clients are waiting on
an answer) keeps the ranges' own five attempts.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from modeldepot.errors import UpstreamError
from modeldepot.transfer.progress import PullProgress, PullUpdate

log = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds the whole pull must have heard nothing before an attempt without an answer is the network's
# failure rather than its source's: a source that refuses while others send is counted as failing.
QUIET_BEFORE_OUTAGE = 2.0
OUTAGE_FIRST_WAIT = (
    0.5  # seconds before a range (or the pull) asks again in an outage; doubled up to the next
)
OUTAGE_LONGEST_WAIT = 8.0  # (the link back, a pull is idle this long at most before it notices)


class OutageClock:
    """How long the sources of one pull have sent nothing, and whether that has lasted ``patience`` seconds.

    Told of bytes and answers from the pull's event loop (and between its tries): plain attributes."""

    def __init__(self, patience: float, what: str) -> None:
        self.patience, self.what = patience, what
        self.last_heard = time.monotonic()
        self.said = False  # this silence was said

    def heard(self) -> None:
        """Bytes, or an answer, came from a source."""
        if self.said:
            log.warning("%s: a source answers again, after %.0f s", self.what, self.silent_for())
            self.said = False
        self.last_heard = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    def left(self) -> float:
        """Seconds of patience left (0 once it ran out)."""
        return max(0.0, self.patience - self.silent_for())

    def outage(self) -> bool:
        """Whether the pull has heard nothing for long enough that a failure to answer is the network's."""
        return self.silent_for() >= QUIET_BEFORE_OUTAGE

    def say(self, problem: str) -> None:
        """Say the silence, once (``problem``: what the last attempt met)."""
        if not self.said:
            self.said = True
            silent = self.silent_for()
            lasted = f" for {silent:.0f} s" if silent >= 1 else ""
            log.warning("%s: no source has answered%s (%s); asking again for %.0f s more at most "
                        "(MODELDEPOT_OUTAGE_PATIENCE): what came is kept", self.what, lasted, problem,
                        self.left())  # fmt: skip

    def gave_up(self, error: UpstreamError) -> UpstreamError:
        """``error``, saying that the patience ran out (once)."""
        said = f"no source answered for {self.patience:g} s: MODELDEPOT_OUTAGE_PATIENCE"
        if error.args and said not in str(error.args[0]):
            error.args = (f"{error.args[0]} ({said})", *error.args[1:])
        return error


OUTAGE: contextvars.ContextVar[OutageClock | None] = contextvars.ContextVar("modeldepot_outage", default=None)


def wait_in_outage(waits: int, clock: OutageClock) -> float:
    """Seconds before asking again after ``waits`` waits of this outage: doubled each time, never past the
    patience's end."""
    return min(OUTAGE_FIRST_WAIT * (1 << min(waits, 16)), OUTAGE_LONGEST_WAIT, clock.left())


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end and return its result. In a thread that runs an event loop already
    (``asyncio.run`` refuses to nest), the coroutine runs on a new loop in a helper thread while this one
    waits: the caller asked for a blocking call, and gets one (``Depot.pull`` is ``pull_async`` run so). The
    caller's context variables (an outage clock) go with it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1, thread_name_prefix="modeldepot-blocking") as helper:
        return helper.submit(contextvars.copy_context().run, asyncio.run, coroutine).result()


def run_through_outages(
    start: Callable[[PullProgress], Coroutine[Any, Any, T]], progress: PullProgress | None, patience: float,
    what: str,
) -> T:  # fmt: skip
    """:func:`run_blocking` of ``start(progress)`` under an :class:`OutageClock` of ``patience`` seconds
    (none for 0: an attempt's failures count as before, and an outage fails the pull). When the pull fails
    because no source answered at all (``UpstreamError.network``) before the patience ran out, it is run
    again, resuming where it stopped (its chunks and parts are kept). An HTTP answer that said no is no
    outage. What progress shows does not go back when a try starts over: it holds what the last one showed
    until the new one passes it (the parts of chunks it had are on disk, and are counted again)."""
    if patience <= 0:
        return run_blocking(start(progress or (lambda _update: None)))
    clock = OutageClock(patience, what)
    shown = _ShownSoFar(progress, clock)
    waits = 0  # tries again since a try brought bytes
    while True:
        shown.new_try()
        token = OUTAGE.set(clock)
        try:
            return run_blocking(start(shown.watch))
        except UpstreamError as error:
            if not error.network:
                raise
            if clock.left() <= 0:
                raise clock.gave_up(error) from None
            waits = 0 if shown.moved else waits
            pause = wait_in_outage(waits, clock)
            waits += 1
            clock.say(str(error))
            log.info("%s: trying again in %.1f s (what came is kept)", what, pause)
            time.sleep(pause)
        finally:
            OUTAGE.reset(token)


class _ShownSoFar:
    """The progress of a pull over its tries: tells the clock when bytes move, and never shows less than a
    try before showed (a new try counts its parts again from 0 as it resumes them)."""

    def __init__(self, progress: PullProgress | None, clock: OutageClock) -> None:
        self.progress, self.clock = progress, clock
        self.most = -1  # the most bytes any try showed
        self.most_before = -1  # ... of the tries before this one
        self.this_try = -1  # the bytes this try showed last (-1: nothing yet)
        self.floor = 0  # what the tries before showed, in all and by file
        self.file_floor: dict[str, int] = {}
        self.files: dict[str, int] = {}

    def new_try(self) -> None:
        self.floor, self.file_floor = max(self.floor, self.most), dict(self.files)
        self.this_try, self.most_before = -1, self.most

    @property
    def moved(self) -> bool:
        """This try showed more than any before it."""
        return self.most > self.most_before

    def watch(self, update: PullUpdate) -> None:
        # Bytes moved: on in this try (not its first report: what it resumed), or past every try before.
        if 0 <= self.this_try < update.shown or update.shown > self.most:
            self.clock.heard()
        self.most = max(self.most, update.shown)
        self.this_try = update.shown
        self.files[update.path] = max(self.files.get(update.path, 0), update.file_shown)
        if self.progress is None:
            return
        file_floor = self.file_floor.get(update.path, 0)
        if update.shown < self.floor or update.file_shown < file_floor:
            update = dataclasses.replace(
                update,
                receiving=max(update.receiving, self.floor - update.done),
                file_receiving=max(update.file_receiving, file_floor - update.file_done),
            )
        self.progress(update)
