"""HTTP Range requests (RFC 9110 §14), for one range at a time.

``parse_range`` tells what to send for a ``Range`` header and a representation of ``size`` bytes:
``None`` means "ignore the header and send everything with 200" (absent, malformed, several ranges, or
a unit other than bytes: RFC 9110 lets a server ignore such a Range), a ``ByteRange`` means "206 with
these bytes", and :class:`RangeNotSatisfiable` means "416 with ``Content-Range: bytes */size``".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ByteRange", "RangeNotSatisfiable", "parse_range"]

# (units are case-insensitive, RFC 9110; white space around the "=" is tolerated, none inside the spec: "1 0-2 0"
# was read as 10-20)
_SPEC = re.compile(r"bytes[ \t]*=[ \t]*(\d*)-(\d*)", re.ASCII | re.IGNORECASE)
_MAX_DIGITS = 19  # anything longer is no offset in any file we hold


class RangeNotSatisfiable(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"bytes */{size}")
        self.size = size


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    if header is None:
        return None
    match = _SPEC.fullmatch(header.strip())
    if match is None:
        return None  # malformed, multiple ranges or another unit: ignore it and send the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    first, last = (n.lstrip("0") or "0" if n else "" for n in (first, last))  # (000…5 is 5)
    # A number longer than any offset is still a number (RFC 9110): a first byte past the end is 416, a last
    # byte or a suffix past it means "to the end". Read as the file's size, it never costs a huge int.
    if len(first) > _MAX_DIGITS:
        raise RangeNotSatisfiable(size)
    huge = len(last) > _MAX_DIGITS  # (past any first byte too: "to the end", never "last < first")
    if not first:  # suffix range: the last N bytes
        suffix = size if huge else int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1)
    if huge:
        last = ""
    start = int(first)
    if last and int(last) < start:
        return None  # an invalid byte-range-spec: the whole Range header is ignored
    if start >= size:
        raise RangeNotSatisfiable(size)
    end = int(last) if last else size - 1
    return ByteRange(start, min(end, size - 1))
