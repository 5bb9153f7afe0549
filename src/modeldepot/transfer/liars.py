"""Lying nodes remembered across the processes of one store.

A node whose chunks, vouched for by its own digests, turn out not to be a file's (the upstream's SHA-256
says so) is left alone for a while (:func:`~modeldepot.transfer.download.ban_liars`). That ban lived in one
process: the next ``modeldepot pull`` of the same store, a second later, asked the liar again and fetched
the file twice (an SRE's trial). The bans are kept beside the store, in a small file every pull reads as it
starts; a store others only read keeps them in its process alone.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from modeldepot.errors import StoreError
from modeldepot.store.confined import open_within, write_within
from modeldepot.store.locks import lock_file, take_flock, unlock_and_close
from modeldepot.transfer.choosing import BANNED_NODES, LIARS

__all__ = ["LIARS_FILE", "recall_liars", "remember_liars"]

LIARS_FILE = "liars.json"
MAX_REMEMBERED = 256  # liars the file holds (the longest bans kept)
MAX_BAN = 24 * 3600.0  # seconds a remembered ban lasts at most (a clock set back: not forever)

log = logging.getLogger(__name__)
_REMEMBERING = threading.Lock()


def _read(home: Path) -> dict[str, float]:
    """The bans the file holds (name -> until when, seconds since the epoch), the ones over dropped."""
    try:
        saved = json.loads((home / LIARS_FILE).read_text())
    except (OSError, ValueError):  # (none yet, or a torn one: nothing is remembered)
        return {}
    now = time.time()
    if not isinstance(saved, dict):
        return {}
    return {
        name: float(until)
        for name, until in saved.items()
        if isinstance(name, str) and isinstance(until, (int, float)) and now < until <= now + MAX_BAN
    }


def recall_liars(home: Path) -> None:
    """Ban in this process the nodes another pull of the store found lying, for what is left of their bans."""
    now, clock = time.time(), time.monotonic()
    for name, until in _read(home).items():
        ends = clock + (until - now)
        BANNED_NODES[name] = max(BANNED_NODES.get(name, 0.0), ends)
        LIARS[name] = max(LIARS.get(name, 0.0), ends)


def remember_liars(home: Path, names: Iterable[str], seconds: float) -> None:
    """Keep the bans of ``names`` (``seconds`` from now) for the store's next pulls (written whole, by a
    rename; a store this process may not write keeps them in its process alone)."""
    until = time.time() + seconds
    within = os.path.realpath(home)  # (no link in the home leads these files out of it: store/confined.py)
    try:
        # (one writer at a time, across processes and threads: two pulls banning at once lost a ban, and two
        # threads of one process wrote one temporary file, a review)
        with _REMEMBERING:
            lock = lock_file(
                open_within,
                home / f".{LIARS_FILE}.lock",
                os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                0o666,
                within,
            )
            try:
                take_flock(lock, fcntl.LOCK_EX)
                bans = _read(home)
                for name in names:
                    bans[name] = max(bans.get(name, 0.0), until)
                kept = dict(sorted(bans.items(), key=lambda item: item[1], reverse=True)[:MAX_REMEMBERED])
                write_within(home / LIARS_FILE, json.dumps(kept).encode(), within)
            finally:
                unlock_and_close(lock)
    except (OSError, StoreError) as error:
        log.debug("the lying nodes are not remembered beside the store: %s", error)
