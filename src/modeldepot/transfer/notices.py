"""Warnings an operator must see, said now and then rather than at every pull: a node of the fleet that does
not answer, a configured server out of reach. Every CLI pull is a process of its own; a server pulls all day."""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["SAID_EVERY", "say_now_and_then"]

SAID_EVERY = 300.0  # seconds between two warnings of the same thing in one process

_said: dict[str, float] = {}
_lock = threading.Lock()


def say_now_and_then(key: str, log: logging.Logger, message: str, *args: object) -> None:
    """``log.warning(message, *args)``, unless the warning named ``key`` was given in the last
    :data:`SAID_EVERY` seconds."""
    now = time.monotonic()
    with _lock:
        if now - _said.get(key, -SAID_EVERY) < SAID_EVERY:
            return
        _said[key] = now
    log.warning(message, *args)
