"""Bandwidth caps: what a pull downloads (``MODELDEPOT_MAX_DOWNLOAD_RATE``, ``pull --max-rate``) and what a
node sends (``serve --max-upload-rate``), in bytes a second, for all connections of the process together.

Users ask for this so that a pull does not take a whole office's link (ollama#2006, #8483). A
:class:`RateLimit` is a token bucket kept as one virtual time (the generic cell rate algorithm): taking
``n`` bytes moves the time at which everything taken so far is paid for by ``n / rate``; a taker waits
until that time is less than one burst ahead of now. Readers take before each piece they read, so the
socket's receive window fills and the sender slows down, as ``curl --limit-rate`` does.
"""

from __future__ import annotations

import asyncio
import threading
import time

from modeldepot.config import MIN_RATE
from modeldepot.errors import ConfigError

__all__ = ["RateLimit"]

MIN_PIECE = 16 * 1024
MAX_PIECE = 1024 * 1024


class RateLimit:
    """At most ``rate`` bytes a second in all, for every thread and task that takes from it, after a first
    burst of at most ``burst`` bytes (default: a fiftieth of a second's worth; a tenth let a half-second
    transfer run 18% over its cap). Thread-safe."""

    def __init__(self, rate: int, burst: int | None = None) -> None:
        if rate < MIN_RATE:
            raise ConfigError(f"a rate limit of {rate} bytes a second is below the least, {MIN_RATE}")
        self.rate = rate
        self.burst = burst if burst is not None else max(2 * MIN_PIECE, rate // 50)
        self._paid_until = 0.0  # time.monotonic() by which everything taken so far is paid for
        self._lock = threading.Lock()

    def piece(self) -> int:
        """How many bytes to read or send between two takes: small enough to keep the pace smooth, large
        enough to cost nothing at high rates."""
        return max(MIN_PIECE, min(MAX_PIECE, self.rate // 16))

    def _reserve(self, count: int) -> float:
        """Count ``count`` bytes as taken now; the seconds the taker must wait before it uses them."""
        with self._lock:
            now = time.monotonic()
            self._paid_until = max(self._paid_until, now) + count / self.rate
            return self._paid_until - now - self.burst / self.rate

    def take(self, count: int) -> None:
        """Block the calling thread until ``count`` more bytes are within the rate."""
        wait = self._reserve(count)
        if wait > 0:
            time.sleep(wait)

    async def take_async(self, count: int) -> None:
        """Wait, without blocking the loop, until ``count`` more bytes are within the rate."""
        wait = self._reserve(count)
        if wait > 0:
            await asyncio.sleep(wait)
