"""Process-wide counters the library keeps for whoever exports them (the node's ``/metrics``).

The pulls and downloads of this process add to :data:`PULLS` as they go; nothing here knows of any
metrics library or of HTTP: the server reads :meth:`PullCounters.snapshot` when it is scraped
(server/metrics.py). Every method may be called from any thread (pulls run on their caller's loop, on a
helper thread's, or on worker threads).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["PULLS", "SOURCE_KINDS", "PullCounters", "PullCounts"]

SOURCE_KINDS = ("local", "node", "peer", "hub")
"""Where a pull's bytes come from (as ``PullResult.bytes_by_source`` names them): ``local`` (already in the
store, resumed, or the same content under another path), ``node`` (configured servers), ``peer`` (fleet
nodes), ``hub``."""


@dataclass(frozen=True)
class PullCounts:
    """The counters at one moment, each since the process started."""

    bytes_by_source: dict[str, int] = field(default_factory=dict)  # every kind of SOURCE_KINDS, 0 or more
    chunks_rejected: int = 0  # fetched chunks whose BLAKE3 did not match their source's digest
    files_rejected: int = 0  # downloaded files whose SHA-256 (or git oid) did not match the upstream's


class PullCounters:
    """What the pulls of this process moved and refused; monotonic, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = dict.fromkeys(SOURCE_KINDS, 0)
        self._chunks_rejected = 0
        self._files_rejected = 0

    def add_bytes(self, source: str, amount: int) -> None:
        """``amount`` bytes of a pulled file came from a source of kind ``source`` (see SOURCE_KINDS)."""
        if amount > 0:
            with self._lock:
                self._bytes[source] = self._bytes.get(source, 0) + amount

    def reject_chunk(self) -> None:
        """A fetched chunk failed its BLAKE3 check and was dropped."""
        with self._lock:
            self._chunks_rejected += 1

    def reject_file(self) -> None:
        """A downloaded file failed its whole-file check and its bytes were thrown away."""
        with self._lock:
            self._files_rejected += 1

    def snapshot(self) -> PullCounts:
        with self._lock:
            return PullCounts(dict(self._bytes), self._chunks_rejected, self._files_rejected)


PULLS = PullCounters()
"""The one set of pull counters of this process."""
