"""Outages: a pull that gets nothing from any source waits for the Hub, for ``MODELDEPOT_OUTAGE_PATIENCE`` s.

One clock per pull (:class:`OutageClock`) says how long its sources have sent nothing while it asked them:
an answer, or a piece of a body, sets it back to 0 (an attempt that has its answer and reads counts as
heard until it ends: a stall is bounded by the read timeout, and a slow link is no outage); the time no
range asks anything (the pull waits for another process, or looks its sources up) does not count. A range
attempt of the Hub that got no answer at all (refused, cut, silent, unreachable) while the pull has heard
nothing for a moment is the network's failure: the range asks again, without giving up, until the pull
has heard nothing for the patience, and then has its five attempts as ever (``HttpSource`` in
sources.py). A node that does not answer is not waited for: its failures count, and the pull fails over
to the Hub. A try of the pull that fails for want of an answer all the same (a node that refuses, with no
Hub behind it) is run again, resuming, under the same clock (:func:`run_through_outages`).

So the patience counts from the last byte, not from the end of a try: through a silent outage each
attempt waits out its read timeout, and five of them made minutes of silence before the patience even
began (a trial over network namespaces). The clock reaches the ranges through a context variable: a pull's
tasks inherit it (a node's control API runs its pulls under one too: :func:`ride_outages`), and a pull run
without one (a mirror's: its client is waiting on an answer) keeps the ranges' own five attempts (a mirror's, a refused connection's a moment apart, not over
seconds of backoff: its headers went first, and its client got a 200 that ended at 0 bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from modeldepot.errors import PullRunningError, UpstreamError
from modeldepot.transfer.progress import PullProgress, PullUpdate
from modeldepot.transfer.ranged import Attempt

log = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds the whole pull must have heard nothing before an attempt without an answer is the network's
# failure rather than its source's: a source that refuses while others send is counted as failing.
QUIET_BEFORE_OUTAGE = 2.0
# Seconds before a range (or the pull) asks again in an outage, doubled up to the longest (the link back, a
# pull is idle this long at most before it notices)
OUTAGE_FIRST_WAIT = 0.5
OUTAGE_LONGEST_WAIT = 8.0


class OutageClock:
    """How long the sources of one pull have sent nothing while it asked them, and whether that has lasted
    ``patience`` seconds. Used on the pull's event loop (and between its tries): plain attributes."""

    def __init__(self, patience: float, what: str, hub_heard: bool = True) -> None:
        self.patience, self.what = patience, what
        # Whether the Hub answered this pull (its look-up, or a range): the silence of one that never did is
        # said with a word on HF_ENDPOINT (a mistyped one behind `pull --server` looks like an outage)
        self.hub_heard = hub_heard
        self.last_heard = time.monotonic()
        self.said = False  # this silence was said
        self.asking = 0  # ranges asking a source now
        self.idle_since: float | None = self.last_heard  # none asks since then: the clock stands still
        self._attempts: dict[int, Attempt] = {}  # each asking range's attempt in flight
        self._tokens = itertools.count()

    # -- what the ranges tell it

    def asking_begins(self) -> int:
        """A range begins asking; returns its token."""
        if self.asking == 0 and self.idle_since is not None:
            self.last_heard += time.monotonic() - self.idle_since  # (asking nothing is no silence)
            self.idle_since = None
        self.asking += 1
        return next(self._tokens)

    def attempt(self, token: int, attempt: Attempt) -> None:
        """Range ``token``'s new attempt, in flight until :meth:`attempt_ended`."""
        self._attempts[token] = attempt

    def attempt_ended(self, token: int, heard: bool) -> None:
        """Range ``token``'s attempt ended, ``heard``: it got an answer that was no failure to answer, or
        body bytes (headers, then a stalled body, are no answer: taken as one, the patience never ran out,
        and a pull whose Hub answered and sent nothing was tried again for good: a review). It is in flight
        no more (a failed one kept as such made the pull look heard from while its range waited)."""
        if not heard:
            self._attempts.pop(token, None)
        self._end_attempt(token)

    def asking_ends(self, token: int) -> None:
        self._end_attempt(token)
        self.asking -= 1
        if self.asking == 0:
            self.idle_since = time.monotonic()

    def outage_goes_on(self) -> None:
        """A try failed for want of an answer: the wait before the next one is the outage's."""
        self.idle_since = None

    def _end_attempt(self, token: int) -> None:
        ended = self._attempts.pop(token, None)
        if ended is not None and ended.activity > self.last_heard:
            if self.said:
                log.warning("%s: bytes come again, after %.0f s", self.what, ended.activity - self.last_heard)
                self.said = False
            self.last_heard = ended.activity

    # -- what it says

    def silent_for(self) -> float:
        if any(attempt.activity for attempt in tuple(self._attempts.values())):
            return 0.0  # an answer being read: heard (until it ends, the read timeout bounding a stall)
        until = self.idle_since if self.asking == 0 and self.idle_since is not None else time.monotonic()
        return max(0.0, until - self.last_heard)

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
            never = ("; the Hub has not answered this pull once: if HF_ENDPOINT is wrong, stop it (Ctrl-C) and "
                     "set it right" if not self.hub_heard else "")  # fmt: skip
            log.warning("%s: no source has sent anything for %.0f s (%s); asking again for %.0f s more "
                        "(MODELDEPOT_OUTAGE_PATIENCE): what came is kept%s", self.what, self.silent_for(), problem,
                        self.left(), never)  # fmt: skip

    def gave_up(self, error: UpstreamError) -> UpstreamError:
        """``error``, saying that the patience ran out (once)."""
        said = f"no source answered for {self.patience:g} s: MODELDEPOT_OUTAGE_PATIENCE"
        if error.args and said not in str(error.args[0]):
            error.args = (f"{error.args[0]} ({said})", *error.args[1:])
        return error


# Set in a mirror's pull: an answer's headers wait on it, and a refused connection is asked again at once
QUICK_REFUSALS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "modeldepot_quick_refusals", default=False
)
OUTAGE: contextvars.ContextVar[OutageClock | None] = contextvars.ContextVar("modeldepot_outage", default=None)


def wait_in_outage(waits: int, clock: OutageClock) -> float:
    """Seconds before asking again after ``waits`` waits of this outage: doubled each time, never past the
    patience's end."""
    return min(OUTAGE_FIRST_WAIT * (1 << min(waits, 16)), OUTAGE_LONGEST_WAIT, clock.left())


# The event loops pulls run on now, and how many on each (:func:`pulling_here`): a blocking call made on one of
# them would wait for good for what those pulls hold (run_blocking)
_PULLING: dict[asyncio.AbstractEventLoop, int] = {}
_PULLING_LOCK = threading.Lock()


@contextlib.contextmanager
def pulling_here() -> Iterator[None]:
    """A pull runs on this thread's loop while in this block (for :func:`run_blocking`'s refusal)."""
    loop = asyncio.get_running_loop()
    with _PULLING_LOCK:
        _PULLING[loop] = _PULLING.get(loop, 0) + 1
    try:
        yield
    finally:
        with _PULLING_LOCK:
            if _PULLING[loop] <= 1:
                del _PULLING[loop]
            else:
                _PULLING[loop] -= 1


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end and return its result. In a thread that runs an event loop already
    (``asyncio.run`` refuses to nest), the coroutine runs on a new loop in a helper thread while this one
    waits: the caller asked for a blocking call, and gets one (``Depot.pull`` is ``pull_async`` run so). The
    caller's context variables (an outage clock) go with it. Refused (PullRunningError) on a loop where a
    pull runs: that pull cannot go on while its loop waits here, and what it holds (each file's claim until
    it publishes) this call may wait for, for good (a `load` beside a `pull_async` sharing a 22-byte config
    hung a notebook with no word: an explorer's trial)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_IGN)
        ):
            return _run_through_ctrl_c(coroutine)
        return asyncio.run(coroutine)
    with _PULLING_LOCK:
        pulling = _PULLING.get(loop, 0)
    if pulling:
        coroutine.close()
        raise PullRunningError(
            f"a blocking call on an event loop where {pulling} pull{'s' if pulling > 1 else ''} (pull_async) "
            f"run{'' if pulling > 1 else 's'} would wait for {'them' if pulling > 1 else 'it'}, and "
            f"{'they' if pulling > 1 else 'it'} for this loop: await it on a thread of its own "
            "(`await depot.load_async(...)`, `await asyncio.to_thread(depot.pull, ...)`), or await the pull first"
        )
    with ThreadPoolExecutor(1, thread_name_prefix="modeldepot-blocking") as helper:
        return helper.submit(contextvars.copy_context().run, asyncio.run, coroutine).result()


INTERRUPT_GRACE = 5.0  # seconds after a Ctrl-C during which another one lets the first finish

_interrupters: list[Callable[[], None]] = []  # the runs of _run_through_ctrl_c under way, innermost last
_interrupted_at: list[float] = []  # when the last of them was interrupted


def interrupt() -> bool:
    """Interrupt the blocking run under way as a Ctrl-C does (its coroutine cancelled, unwinding with
    :data:`INTERRUPT_GRACE`); False when none runs. For a SIGTERM where Ctrl-C is ignored (a command a
    script started with ``&``): raised as a KeyboardInterrupt wherever the loop was, it broke the pull's
    unwinding and its message when it came twice (a review). One that comes within the grace of an
    interruption whose run has ended already is that interruption's too (True, nothing done): its caller is
    saying what was kept (a supervisor's SIGTERMs 3 ms apart, the pull unwound in less, broke that message
    now and then: a CI run)."""
    if not _interrupters:
        return bool(_interrupted_at) and time.monotonic() - _interrupted_at[-1] < INTERRUPT_GRACE
    _interrupters[-1]()
    return True


def _run_through_ctrl_c(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coroutine)``, whose Ctrl-C cancels the coroutine (a pull then keeps what it received) and
    raises KeyboardInterrupt once it has unwound, as ``asyncio.run`` does; but another Ctrl-C within
    :data:`INTERRUPT_GRACE` seconds of the first lets that unwinding finish. ``asyncio.run`` raised
    KeyboardInterrupt at once wherever the loop was, and a user pressing Ctrl-C three times lost every part
    of a chunk in flight its pull was writing down (an explorer's trial). Later ones interrupt at once."""
    first: list[float] = []  # when the first Ctrl-C came
    interrupter: Callable[[], None] | None = None
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        task = loop.create_task(coroutine)

        def on_ctrl_c(signum: int, frame: object) -> None:
            if not first:
                first.append(time.monotonic())
                _interrupted_at[:] = first
                loop.call_soon_threadsafe(task.cancel)  # (wakes the loop, too)
                return
            if time.monotonic() - first[0] >= INTERRUPT_GRACE:
                raise KeyboardInterrupt

        heeded = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (else ignored: left so)
        if heeded:
            signal.signal(signal.SIGINT, on_ctrl_c)
        interrupter = functools.partial(on_ctrl_c, signal.SIGINT, None)
        _interrupters.append(interrupter)
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if first:
                raise KeyboardInterrupt from None
            raise
        finally:
            # (the task is done: a SIGTERM from now on is the caller's, not a cancel of nothing, a review)
            _interrupters.remove(interrupter)
            interrupter = None
    finally:
        try:  # (as asyncio.run ends: what is left is cancelled and awaited, the default executor shut down)
            left = asyncio.all_tasks(loop)
            for other in left:
                other.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            if interrupter is not None:
                # (removed already when a second SIGTERM's interruption came right after the removal above and
                # before its name was cleared: "x not in list" ended the pull in a traceback, a CI run)
                with contextlib.suppress(ValueError):
                    _interrupters.remove(interrupter)
            # Ctrl-C is Python's own again (left to this handler, a script that went on after an interruption
            # lost its Ctrl-Cs for 5 s, and its next pull could not be interrupted at all: a review; the CLI
            # says what was kept with Ctrl-C ignored); ignored, it stays so
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                signal.signal(signal.SIGINT, signal.default_int_handler)


def run_through_outages(
    start: Callable[[PullProgress], Coroutine[Any, Any, T]], progress: PullProgress | None, patience: float,
    what: str, hub_heard: bool = True,
) -> T:  # fmt: skip
    """:func:`run_blocking` of ``start(progress)`` under an :class:`OutageClock` of ``patience`` seconds
    (none for 0: an attempt's failures count as before, and an outage fails the pull). When the pull fails
    because no source answered at all (``UpstreamError.network``) before the patience ran out, it is run
    again, resuming where it stopped (its chunks and parts are kept). An HTTP answer that said no is no
    outage. What progress shows does not go back when a try starts over: it holds what the last one showed
    until the new one passes it (the parts of chunks it had are on disk, and are counted again)."""
    if patience <= 0:
        return run_blocking(start(progress or (lambda _update: None)))
    clock = OutageClock(patience, what, hub_heard)
    shown = _ShownSoFar(progress)
    waits = 0  # tries again since a try brought bytes
    while True:
        shown.new_try()
        token = OUTAGE.set(clock)
        try:
            return run_blocking(start(shown.watch))
        except UpstreamError as error:
            pause, waits = _after_a_try_failed(error, clock, shown, waits, what)
        finally:
            OUTAGE.reset(token)
        time.sleep(pause)


async def ride_outages(
    start: Callable[[PullProgress], Coroutine[Any, Any, T]], progress: PullProgress | None, patience: float,
    what: str, hub_heard: bool = True,
) -> T:  # fmt: skip
    """:func:`run_through_outages` on the running loop: a pull that runs in the background (a node's control
    API's, a dashboard's Pull: the POST answered at once) rides out an upstream's blip as the CLI's does (it
    failed 6 s after its node restarted, whatever the patience: an explorer's trial)."""
    if patience <= 0:
        return await start(progress or (lambda _update: None))
    clock = OutageClock(patience, what, hub_heard)
    shown = _ShownSoFar(progress)
    waits = 0
    while True:
        shown.new_try()
        token = OUTAGE.set(clock)  # (this task's context: the pull's tasks inherit it)
        try:
            return await start(shown.watch)
        except UpstreamError as error:
            pause, waits = _after_a_try_failed(error, clock, shown, waits, what)
        finally:
            OUTAGE.reset(token)
        await asyncio.sleep(pause)


def _after_a_try_failed(
    error: UpstreamError, clock: OutageClock, shown: _ShownSoFar, waits: int, what: str
) -> tuple[float, int]:
    """A try of a pull failed with ``error``: re-raised unless no source answered at all (an outage) with
    patience left; else the pause before the next try, and the tries again since one brought bytes."""
    if not error.network:
        raise error
    clock.outage_goes_on()
    if clock.left() <= 0:
        raise clock.gave_up(error) from None
    waits = 0 if shown.moved else waits
    pause = wait_in_outage(waits, clock)
    if clock.outage():
        clock.say(str(error))
    log.info("%s: trying again in %.1f s (what came is kept)", what, pause)
    return pause, waits + 1


class _ShownSoFar:
    """The progress of a pull over its tries: never less than a try before showed (a new try counts its parts
    again from 0 as it resumes them)."""

    def __init__(self, progress: PullProgress | None) -> None:
        self.progress = progress
        self.most = -1  # the most bytes any try showed
        self.most_before = -1  # ... of the tries before this one
        self.floor = 0  # what the tries before showed, in all and by file
        self.file_floor: dict[str, int] = {}
        self.files: dict[str, int] = {}
        # Bytes thrown away (PullUpdate.thrown_away) by the tries before, and by this one: taken off what
        # was shown, and told on in all (each try counts its own from 0; a refetch after a retry read 100%
        # again, a review)
        self.thrown_before = self.thrown_now = 0

    def new_try(self) -> None:
        self.floor, self.file_floor = max(self.floor, self.most), dict(self.files)
        self.most_before = self.most
        self.thrown_before, self.thrown_now = self.thrown_before + self.thrown_now, 0

    @property
    def moved(self) -> bool:
        """This try showed more than any before it."""
        return self.most > self.most_before

    def watch(self, update: PullUpdate) -> None:
        if update.thrown_away > self.thrown_now:
            dropped, self.thrown_now = update.thrown_away - self.thrown_now, update.thrown_away
            self.floor, self.most = max(0, self.floor - dropped), max(-1, self.most - dropped)
        update = dataclasses.replace(update, thrown_away=self.thrown_before + update.thrown_away)
        self.most = max(self.most, update.shown)
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
