"""`parse_range` against RFC 9110 §14 (one byte range at a time) and against arbitrary text."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from modeldepot.server import ByteRange, RangeNotSatisfiable, parse_range

Outcome = ByteRange | None | type[RangeNotSatisfiable]
UNSATISFIABLE = RangeNotSatisfiable
MAX_OFFSET = 10**19 - 1  # the longest offsets read as they are (19 digits); longer ones: "past the end"


def outcome(header: str | None, size: int) -> Outcome:
    """What parse_range answers, with RangeNotSatisfiable as a value (after checking what it carries)."""
    try:
        return parse_range(header, size)
    except RangeNotSatisfiable as error:
        raised = error
    assert raised.size == size
    assert str(raised) == f"bytes */{size}"
    return UNSATISFIABLE


def selected_bytes(first: int | None, last: int | None, size: int) -> list[int] | None:
    """RFC 9110 §14.1.2 read literally, one byte at a time: the positions a byte-range-spec selects.

    None when the spec is invalid (last-pos < first-pos), which makes the whole header ignorable.
    """
    if first is None:  # suffix-range: the last `last` bytes (all of them when longer than the file)
        assert last is not None
        return [pos for pos in range(size) if pos >= size - last]
    if last is not None and last < first:
        return None
    return [pos for pos in range(size) if pos >= first and (last is None or pos <= last)]


def reference_small(first: int | None, last: int | None, size: int) -> Outcome:
    """The byte-by-byte reading turned into the three answers: ignore, 206 span, or 416."""
    chosen = selected_bytes(first, last, size)
    if chosen is None:
        return None
    if not chosen:  # nothing of the representation is selected: unsatisfiable (§14.1.1, §15.5.17)
        return UNSATISFIABLE
    assert chosen == list(range(chosen[0], chosen[-1] + 1))  # one contiguous span
    return ByteRange(chosen[0], chosen[-1])


def reference_arithmetic(first: int | None, last: int | None, size: int) -> Outcome:
    """The same rules in closed form, for files far too large to enumerate."""
    if first is None:
        assert last is not None
        if last == 0 or size == 0:
            return UNSATISFIABLE
        return ByteRange(max(size - last, 0), size - 1)
    if last is not None and last < first:
        return None
    if first >= size:
        return UNSATISFIABLE
    return ByteRange(first, size - 1 if last is None else min(last, size - 1))


def header_for(first: int | None, last: int | None, zeros: int = 0) -> str:
    pad = "0" * zeros
    return f"bytes={'' if first is None else pad + str(first)}-{'' if last is None else pad + str(last)}"


# (first, last) of a well-formed byte-range-spec: int-range with or without last-pos, or suffix-range
small_offsets = st.integers(0, 300)
small_specs = st.one_of(
    st.tuples(small_offsets, st.none() | small_offsets),
    st.tuples(st.none(), small_offsets),
)
big_offsets = st.integers(0, MAX_OFFSET)
big_specs = st.one_of(
    st.tuples(big_offsets, st.none() | big_offsets),
    st.tuples(st.none(), big_offsets),
)


@given(spec=small_specs, size=st.integers(0, 256), zeros=st.integers(0, 3))
@example(spec=(0, 0), size=0, zeros=0)
@example(spec=(None, 0), size=10, zeros=0)
@example(spec=(10, None), size=10, zeros=0)
@example(spec=(5, 2), size=10, zeros=0)
def test_well_formed_single_ranges_match_the_rfc_byte_by_byte(
    spec: tuple[int | None, int | None], size: int, zeros: int
) -> None:
    first, last = spec
    assert outcome(header_for(first, last, zeros), size) == reference_small(first, last, size)


@given(spec=big_specs, size=st.integers(0, 2**63 - 1))
@example(spec=(2**62, None), size=2**63 - 1)
@example(spec=(None, MAX_OFFSET), size=5)
def test_well_formed_single_ranges_on_huge_files(spec: tuple[int | None, int | None], size: int) -> None:
    first, last = spec
    assert outcome(header_for(first, last), size) == reference_arithmetic(first, last, size)


@given(spec=small_specs, size=st.integers(0, 256))
def test_the_two_references_agree(spec: tuple[int | None, int | None], size: int) -> None:
    assert reference_small(*spec, size) == reference_arithmetic(*spec, size)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, ByteRange(0, 0)),
        ("bytes=0-", 10, ByteRange(0, 9)),
        ("bytes=3-", 10, ByteRange(3, 9)),
        ("bytes=2-5", 10, ByteRange(2, 5)),
        ("bytes=8-1000", 10, ByteRange(8, 9)),  # last-pos past the end is clamped to size-1
        ("bytes=-3", 10, ByteRange(7, 9)),  # suffix: the last three bytes
        ("bytes=-1000", 10, ByteRange(0, 9)),  # a suffix longer than the file is the whole file
        ("bytes=9-9", 10, ByteRange(9, 9)),
        ("bytes=5-2", 10, None),  # last < first: invalid, ignored
        ("bytes=10-", 10, UNSATISFIABLE),  # first-pos at or past the end
        ("bytes=10-20", 10, UNSATISFIABLE),
        ("bytes=-0", 10, UNSATISFIABLE),  # a zero-length suffix selects nothing
        ("bytes=0-", 0, UNSATISFIABLE),  # an empty representation has no satisfiable range
        ("bytes=-5", 0, UNSATISFIABLE),
        ("bytes=0-0", 0, UNSATISFIABLE),
        ("bytes=abc", 10, None),
        ("bytes=-", 10, None),
        ("bytes=", 10, None),
        ("bytes=0-1,3-4", 10, None),  # several ranges: ignored, the whole file is sent
        ("bytes=0-1, 3-4", 10, None),
        ("items=0-1", 10, None),  # another unit
        ("bytes0-1", 10, None),
        ("bytes=1-2-3", 10, None),
        ("bytes=+1-2", 10, None),
        ("bytes=0x1-2", 10, None),
        ("bytes=١-٢", 10, None),  # only ASCII digits are digits here
        ("bytes=9999999999999999999-", 10, UNSATISFIABLE),  # 19 digits: read, and past the end
        ("  bytes=1-2  ", 10, ByteRange(1, 2)),
        ("bytes = 1-2", 10, ByteRange(1, 2)),
        ("bytes=1 0-2 0", 30, None),  # (a space inside a number: no number, not 10-20, an explorer's trial)
        ("bytes=1- 2", 10, None),
    ],
)
def test_examples(header: str | None, size: int, expected: Outcome) -> None:
    assert outcome(header, size) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=99999999999999999999999-", UNSATISFIABLE),  # past the end: 416 (it was ignored: a 200)
        ("bytes=0-99999999999999999999999", ByteRange(0, 9)),  # to the end
        ("bytes=-99999999999999999999999", ByteRange(0, 9)),  # a suffix longer than the file: all of it
        ("bytes=00000000000000000000000005-", ByteRange(5, 9)),  # leading zeros are no size
        ("bytes=3-00000000000000000000000004", ByteRange(3, 4)),
        ("bytes=50-99999999999999999999999", UNSATISFIABLE),  # a first byte past the end, whatever the last
    ],
)
def test_offsets_of_any_length_are_read_as_numbers(header: str, expected: Outcome) -> None:
    assert outcome(header, 10) == expected


headers = st.one_of(
    st.text(),
    st.text(alphabet="bytes=-0123456789, \t", max_size=30),
    st.from_regex(r"\A *bytes *= *[0-9]{0,25} *- *[0-9]{0,25}(, *[0-9]*-[0-9]*)? *\Z"),
    st.binary(max_size=40).map(lambda raw: raw.decode("latin-1")),
)


@given(header=headers, size=st.integers(0, 2**63 - 1) | st.integers(0, 64))
@example(header="bytes=-", size=0)
@example(header="bytes=00000000000000000000-", size=1)
def test_any_text_yields_ignore_a_range_inside_the_file_or_416(header: str, size: int) -> None:
    result = outcome(header, size)  # raises anything but RangeNotSatisfiable (checked there)
    assert result is None or result is UNSATISFIABLE or isinstance(result, ByteRange)
    if isinstance(result, ByteRange):
        assert 0 <= result.start <= result.end < size
        assert result.length == result.end - result.start + 1 >= 1


@given(start=st.integers(0, 2**63), length=st.integers(1, 2**63), extra=st.integers(0, 2**63))
def test_content_range_and_length(start: int, length: int, extra: int) -> None:
    end = start + length - 1
    size = end + 1 + extra
    span = ByteRange(start, end)
    assert span.length == length
    assert span.content_range(size) == f"bytes {start}-{end}/{size}"


def test_a_parsed_range_formats_back_to_the_content_range_clients_read() -> None:
    span = parse_range("bytes=-4", 10)
    assert span is not None
    assert span.content_range(10) == "bytes 6-9/10"  # what huggingface.js and hf_transfer parse
    first = parse_range("bytes=0-0", 4242)
    assert first is not None and first.content_range(4242) == "bytes 0-0/4242"
