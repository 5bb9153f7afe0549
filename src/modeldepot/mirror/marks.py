"""The files a mirror answers whole to a resume for a while, and what their broken answers sent.

A response of a file that broke after sending bytes no check had proven marks the file (see
:mod:`modeldepot.mirror`): a client resuming it (``Range: bytes=N-``) would join the rest to bytes that may
be wrong, so for :data:`BROKEN_TTL` a resume is answered whole. The mark keeps what went out, as spans of
the file and the BLAKE3 of each (a chunk as it landed, or the bytes sent ahead of its landing): once the
store holds the file, a resume by commit has every span checked against it, and if all match, whatever a
client holds of those answers is the file's, the mark is lifted and the resume answered as asked (a whole
answer sent again all a client had, for an hour: a 10 GB file cut at 9 GB went again whole). If one does
not match, or what went out is not known (a check refuted it, the partial started over under it), the mark
stands until it expires.

The marks live in the store's home (:data:`BROKEN_FILE`), so that a client resuming after the node restarted
is answered whole too, and another node on the same store sees them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from modeldepot.errors import StoreError
from modeldepot.store.confined import write_within
from modeldepot.store.locks import held_exclusively

__all__ = ["BROKEN_FILE", "BROKEN_TTL", "BrokenMarks", "Sent", "Span"]

# Seconds a file whose response broke is answered whole: longer than clients retry (huggingface_hub
# resumes at once, a user re-running a download within the hour)
BROKEN_TTL = 3600.0
# In the store's home: [[repo id in lower case, path, when (seconds since the epoch), spans or null], ...]
BROKEN_FILE = "mirror-broken.json"

Span = tuple[
    int, int, str
]  # the first byte, the end (exclusive), the BLAKE3 (hex) of those bytes of the file

log = logging.getLogger(__name__)


@dataclass
class Sent:
    """What went out of a file that a check may refute: spans, or not known (``spans`` None)."""

    spans: set[Span] | None = field(default_factory=set)

    def add(self, span: Span) -> None:
        if self.spans is not None:
            self.spans.add(span)

    def forget(self) -> None:
        """What went out is not known any more (its bytes changed under it): never lifted."""
        self.spans = None

    def merge(self, other: Sent | None) -> None:
        if other is None or other.spans is None:
            self.spans = None
        elif self.spans is not None:
            self.spans |= other.spans


_Key = tuple[str, str]  # (repo id in lower case, path)
_Mark = tuple[float, "Sent"]  # when (seconds since the epoch), what went out


class BrokenMarks:
    """The marks of one store's home, as every process serving it wrote them. Use from one event loop
    (writes are small and rare: on the loop)."""

    def __init__(self, home: Path) -> None:
        self._file = home / BROKEN_FILE
        self._lock_file = home / f".{BROKEN_FILE}.lock"
        self._seen: tuple[int, int, int] | None = None  # the file's (mtime, size, inode) when last read
        self._marks: dict[_Key, _Mark] = {}
        self._unwritten: dict[_Key, _Mark] = {}  # what a write that failed kept here alone
        self._refresh()

    def broke(self, repo_id: str, path: str) -> bool:
        """Whether a response of this file broke lately after handing out bytes a check may refute."""
        self._refresh()
        mark = self._marks.get((repo_id.lower(), path))
        return (
            mark is not None and abs(time.time() - mark[0]) <= BROKEN_TTL
        )  # (a clock set back: not forever)

    def spans(self, repo_id: str, path: str) -> frozenset[Span] | None:
        """What the file's broken answers sent, if the file is marked and that is known."""
        self._refresh()
        mark = self._marks.get((repo_id.lower(), path))
        if mark is None or mark[1].spans is None:
            return None
        return frozenset(mark[1].spans)

    def note(self, repo_id: str, path: str, sent: Sent | None) -> None:
        """Mark the file (again): ``sent`` went out, None if that is not known."""
        now = time.time()
        self._write((repo_id.lower(), path), lambda mark: (now, _joined(mark, sent or Sent(None))))

    def lift(self, repo_id: str, path: str, checked: frozenset[Span]) -> bool:
        """What the file's broken answers sent, ``checked``, is the file's: a resume is answered as asked.
        False when the mark stays: another answer broke meanwhile, sending more (checked at the next resume),
        or what went out is not known."""

        def lifted(mark: _Mark | None) -> _Mark | None:
            if mark is None or (mark[1].spans is not None and mark[1].spans <= checked):
                return None
            return mark

        self._write((repo_id.lower(), path), lifted)
        return (repo_id.lower(), path) not in self._marks

    def refute(self, repo_id: str, path: str) -> None:
        """What a broken answer sent is not the file's: the mark stands, never lifted."""
        self._write((repo_id.lower(), path), lambda mark: None if mark is None else (mark[0], Sent(None)))

    def _refresh(self) -> None:
        """Read the file again if another process wrote it since (one stat when none did): a mark only it made
        was never seen here, and a resume of its file answered as asked (a review's trial)."""
        seen = self._stat()
        if seen != self._seen:
            self._seen = seen
            self._marks = _merged(self._load(), self._unwritten)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            info = self._file.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size, info.st_ino

    def _write(self, key: _Key, change: Callable[[_Mark | None], _Mark | None]) -> None:
        """Apply ``change`` to the mark of ``key`` in the file, read, changed and replaced under a lock (two
        processes writing at once lost one's mark)."""
        now = time.time()
        with self._locked():
            marks = _merged(self._load(), self._unwritten)
            changed = change(marks.get(key))
            if changed is None:
                marks.pop(key, None)
            else:
                marks[key] = changed
            marks = {known: mark for known, mark in marks.items() if abs(now - mark[0]) <= BROKEN_TTL}
            rows = [[repo, file, when, None if sent.spans is None else sorted(sent.spans)]
                    for (repo, file), (when, sent) in marks.items()]  # fmt: skip
            try:  # (rare, and small: written at once, on the loop; no link leads it out: store/confined.py)
                write_within(self._file, json.dumps(rows).encode(), os.path.realpath(self._file.parent))
                self._unwritten = {}
            except (OSError, StoreError) as error:
                log.warning("could not record the files a mirror answers whole in %s (%s): after a restart, a "
                            "resume of one would be answered as asked", self._file, error)  # fmt: skip
                self._unwritten = marks
            self._marks, self._seen = marks, self._stat()

    def _locked(self) -> AbstractContextManager[None]:
        # (a lock file that cannot be made: the write then fails too, and says so)
        return held_exclusively(
            self._lock_file, os.path.realpath(self._lock_file.parent), 0o644, or_without=True
        )

    def _load(self) -> dict[_Key, _Mark]:
        try:
            rows = json.loads(self._file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("ignoring %s: %s", self._file, error)
            return {}
        marks: dict[_Key, _Mark] = {}
        for row in rows if isinstance(rows, list) else []:
            if (
                isinstance(row, list)
                and len(row) in (3, 4)  # (a node before the spans wrote three: what went out is not known)
                and isinstance(row[0], str)
                and isinstance(row[1], str)
                and isinstance(row[2], (int, float))
            ):
                marks[(row[0], row[1])] = (float(row[2]), Sent(_spans(row[3] if len(row) == 4 else None)))
        return marks


def _merged(first: dict[_Key, _Mark], second: dict[_Key, _Mark]) -> dict[_Key, _Mark]:
    merged = dict(first)
    for key, mark in second.items():
        merged[key] = (max(mark[0], merged[key][0]), _joined(merged[key], mark[1])) if key in merged else mark
    return merged


def _joined(mark: _Mark | None, sent: Sent) -> Sent:
    joined = Sent(None if sent.spans is None else set(sent.spans))
    if mark is not None:
        joined.merge(mark[1])
    return joined


def _spans(value: object) -> set[Span] | None:
    """Spans as the file holds them; None (never lifted) for anything else."""
    if not isinstance(value, list):
        return None
    spans: set[Span] = set()
    for item in value:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) for n in item[:2])
            and isinstance(item[2], str)
            and 0 <= item[0] < item[1]
        ):
            return None
        spans.add((item[0], item[1], item[2]))
    return spans
