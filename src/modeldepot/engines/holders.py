"""Whether anything outside an evicted engine still holds it: the engine cache closes only an engine nobody
uses (``close()`` of a native engine frees what a request running on it reads).

``load()`` hands out the engine itself, with no release to say when a caller is done, so the answer is
read from the interpreter: the engine's reference count, less what its own objects account for. Those are
the containers reachable from the engine (a callback it keeps, a child with a link back: a cycle) and the
frames of the threads it owns (a worker thread running one of its methods, an executor's worker). The
rest is a holder: a caller's variable, a registry, a request running on it. References no container
shows (a running frame's temporaries, a C extension's) count as holders: the safe side is a close that
waits, never one under a request.
"""

from __future__ import annotations

import gc
import sys
import threading
import types
from collections.abc import Iterable

__all__ = ["held_outside"]

_MAX_OWN_OBJECTS = 200_000  # an engine's own graph larger than this is not walked: it counts as held
# Objects whose references lead out of an engine into the interpreter at large (a class to its module,
# a module to everything): never part of an engine's own graph. A function is, through what it closes
# over and its defaults alone (not its module's globals).
_SHARED = (type, types.ModuleType, types.BuiltinFunctionType, types.CodeType, types.FrameType)


def held_outside(model: object, known: int, held_at: int | None = None) -> tuple[bool, int]:
    """Whether ``model`` has a reference beyond its own objects' and ``known`` (the caller's own: its
    variables and argument slots holding it, and this call's), and its reference count. ``held_at``: the
    count when it was last found held (the same count: held still, without seeking its holders again; a
    holder that let go as another reference came only delays the close)."""
    count = sys.getrefcount(model) - 1  # (getrefcount's own argument)
    if count <= known:
        return False, count
    if count == held_at:
        return True, count
    own = _own_objects(model)
    if own is None:
        return True, count
    # The variables of the frames of the engine's own threads (a worker running one of its methods has it
    # as ``self``): a running frame is no container the collector walks, so they are read as a snapshot,
    # which the frame keeps and which references what it shows: taken before the count, and counted.
    snapshots = [variables for variables in _own_threads_variables(own.values()) if variables]
    count = sys.getrefcount(model) - 1
    accounted = 0
    # (loops, not generator expressions: a closure over ``model`` would be one reference more)
    for variables in snapshots:
        own[id(variables)] = variables
        for value in variables.values():
            accounted += value is model  # (the variable's own slot; the snapshot's entry is counted below)
    for referrer in gc.get_referrers(model):
        if id(referrer) in own:
            for each in gc.get_referents(referrer):
                accounted += each is model
    return count - accounted > known, count


def _own_objects(model: object) -> dict[int, object] | None:
    """The containers reachable from ``model`` (by id; the objects kept so the ids stay theirs; ``model``
    itself by id alone), without passing through the interpreter's shared objects; None when there are
    too many to walk."""
    own: dict[int, object] = {id(model): None}
    stack = list(_referents(model))
    while stack:
        each = stack.pop()
        if id(each) in own or isinstance(each, _SHARED) or not gc.is_tracked(each):
            continue
        own[id(each)] = each
        if len(own) > _MAX_OWN_OBJECTS:
            return None
        stack.extend(_referents(each))
    return own


def _referents(container: object) -> list[object]:
    if isinstance(container, types.FunctionType):
        return [*(container.__closure__ or ()), *(container.__defaults__ or ()),
                *(container.__kwdefaults__ or {}).values(), container.__dict__]  # fmt: skip
    return gc.get_referents(container)


def _own_threads_variables(own: Iterable[object]) -> list[dict[str, object]]:
    """A snapshot of the variables of every frame of the threads among ``own`` (module-level frames left
    out: their variables are their module's, no engine's own)."""
    idents = {each.ident for each in own if isinstance(each, threading.Thread) and each.ident is not None}
    snapshots: list[dict[str, object]] = []
    if not idents:
        return snapshots
    frames = sys._current_frames()
    # This thread's own frame object: kept past the call (by the dict), it would keep its callers' frames,
    # and with them the engine they hold, alive until the collector runs
    frames.pop(threading.get_ident(), None)
    for ident, frame in frames.items():
        if ident not in idents:
            continue
        walking: types.FrameType | None = frame
        while walking is not None:
            variables = walking.f_locals
            if variables is not walking.f_globals:
                snapshots.append(variables)
            walking = walking.f_back
    return snapshots
