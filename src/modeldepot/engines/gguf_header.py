"""A GGUF file's header, walked with bounds checks, without the ``gguf`` package's reader.

:func:`check_layout` walks it before ``GGUFReader`` reads it (:mod:`modeldepot.engines.gguf_model`), so a
file that is not GGUF, is truncated or lies about its sizes is an :class:`InvalidInputError` naming the
file, never a raw numpy error or a loop over a count the file does not hold. :func:`gguf_summary` reads
what a model listing says of a GGUF model (its ``gguf`` property) in the same walk, keeping nothing but
those few values: ``GGUFReader`` makes numpy objects of every element of every array of the metadata, and
a file of 8 MB holding a million empty strings cost it 18 s and 1.6 GB at each read, a node's memory at
eight reads at once (an explorer's trial).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeldepot.errors import InvalidInputError, NotFoundError
from modeldepot.validation import tensor_elements

__all__ = ["GgufSummary", "check_layout", "gguf_summary", "mapped"]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # what GGUFReader reads (version 1 had 32-bit lengths)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType
_INTEGERS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 10: "Q", 11: "q"}  # (7: bool, 6/12: floats)
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_NESTING = 8  # arrays of arrays: deeper than any writer goes
_DEFAULT_ALIGNMENT = 32
_MIN_KV = 13  # the fewest bytes a key-value takes (an empty key, a 1-byte value)
_MIN_TENSOR_INFO = 24  # and a tensor's info (an empty name, no dimensions)
_MAX_DIMS = 64  # dimensions of a tensor (ggml has 4): more is no model's, and their product is work
_TOKENS = b"tokenizer.ggml.tokens"
_SPLITS = b"split.count"
# The metadata a summary keeps (strings and integers), and the tokens it names (their ids)
_KEPT = (b"general.architecture", b"tokenizer.chat_template")
_TOKEN_IDS = {b"tokenizer.ggml.bos_token_id": "bos", b"tokenizer.ggml.eos_token_id": "eos"}


@dataclass
class GgufSummary:
    """What a model listing says of a GGUF model: its parameters (``total``), ``architecture``,
    ``context_length``, ``chat_template``, ``bos_token`` and ``eos_token``, as its metadata has them."""

    total: int = 0
    values: dict[str, Any] = field(default_factory=dict)
    split_count: int | None = None  # its ``split.count``: the shards of a split model

    def properties(self) -> dict[str, Any]:
        """The Hub's ``gguf`` property."""
        return {"total": self.total, **self.values}


class _Cursor:
    """Reads the header of a mapped GGUF file, refusing every read past its end."""

    def __init__(self, data: mmap.mmap, size: int, order: str, name: str) -> None:
        self.data, self.size, self.order, self.name = data, size, order, name
        self.offset = 0

    def take(self, fmt: str) -> tuple[Any, ...]:
        length = struct.calcsize(self.order + fmt)
        self.need(length)
        values = struct.unpack_from(self.order + fmt, self.data, self.offset)
        self.offset += length
        return values

    def skip(self, length: int) -> None:
        self.need(length)
        self.offset += length

    def string(self) -> bytes:
        (length,) = self.take("Q")
        self.need(length)
        value = self.data[self.offset : self.offset + length]
        self.offset += length
        return value

    def need(self, length: int) -> None:
        if self.offset + length > self.size:
            raise InvalidInputError(
                f"{self.name} is truncated: its header needs byte {self.offset + length}, the file has {self.size}"
            )

    def value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.skip(_SCALAR_SIZES[vtype])
        elif vtype == _STRING:
            (length,) = self.take("Q")
            self.skip(length)
        elif vtype == _ARRAY and depth < _MAX_NESTING:
            itype, count = self.take("IQ")
            if itype in _SCALAR_SIZES:
                self.skip(count * _SCALAR_SIZES[itype])
            elif itype == _STRING:  # (each takes at least 8 bytes, so the file's end bounds the loop)
                for _ in range(count):
                    (length,) = self.take("Q")
                    self.skip(length)
            else:
                for _ in range(count):
                    self.value(itype, depth + 1)
        else:
            raise InvalidInputError(
                f"{self.name} is not a readable GGUF file: value type {vtype} at byte {self.offset}"
            )

    def kept(self, vtype: int) -> str | int | None:
        """A value a summary keeps (a string, decoded, or an integer), read; None, skipped, for any other."""
        if vtype == _STRING:
            return self.string().decode("utf-8", "replace")
        if vtype in _INTEGERS:
            return int(self.take(_INTEGERS[vtype])[0])
        self.value(vtype)
        return None


def check_layout(data: mmap.mmap, size: int, name: str, quant_sizes: Mapping[Any, tuple[int, int]]) -> None:
    """Walk the header (magic, version, key-values, tensor infos) and check every tensor's data lies in
    the file: what GGUFReader assumes. ``quant_sizes``: ``gguf.GGML_QUANT_SIZES``."""
    cursor, _summary, alignment, tensors = _walk(data, size, name)
    sizes = {int(kind): kind_sizes for kind, kind_sizes in quant_sizes.items()}
    lengths: list[tuple[str, int, int]] = []
    for tensor, dims, kind, offset in tensors:
        if kind not in sizes:
            raise InvalidInputError(
                f"{name}: tensor {tensor!r} has ggml type {kind}, which gguf does not know"
            )
        block, type_size = sizes[kind]
        if dims and dims[0] % block:
            raise InvalidInputError(
                f"{name}: tensor {tensor!r} has rows of {dims[0]}, not whole blocks of {block}"
            )
        lengths.append((tensor, offset, _elements(name, tensor, dims, size) * type_size // block))
    start = -(-cursor.offset // alignment) * alignment
    for tensor, offset, length in lengths:
        if start + offset + length > size:
            raise InvalidInputError(
                f"{name} is truncated: tensor {tensor!r} needs bytes up to {start + offset + length}, "
                f"the file has {size}"
            )


def gguf_summary(paths: list[Path]) -> GgufSummary:
    """The summary of the GGUF model whose files (a split one's shards, in order) are ``paths``: the
    metadata of the first, the parameters of them all."""
    found = GgufSummary()
    for number, path in enumerate(paths):
        with mapped(path) as (mapping, size):
            _cursor, summary, _alignment, tensors = _walk(mapping, size, path.name, keep=number == 0)
        # (a shard not named as one, its split.count more than the files given: its tensors are not the
        # model's, as the loader says, a review)
        if number == 0 and summary.split_count not in (None, len(paths)):
            raise InvalidInputError(f"{path.name} is a shard of {summary.split_count}, read as {len(paths)}")
        found.total += sum(
            _elements(path.name, tensor, dims, size) for tensor, dims, _kind, _offset in tensors
        )
        if number == 0:
            found.values = summary.values
    return found


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[tuple[mmap.mmap, int]]:
    """``path`` mapped read-only, and its size; NotFoundError when it is not there, InvalidInputError when it
    is too small to be GGUF."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                raise InvalidInputError(f"{path.name} is not a GGUF file: {size} bytes")
            with mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mapping:
                yield mapping, size
    except FileNotFoundError:
        raise NotFoundError(f"{path.name} is not there") from None


def _elements(name: str, tensor: str, dims: tuple[int, ...], size: int) -> int:
    """The elements of a tensor of ``dims`` in a file of ``size`` bytes: more than eight a byte is a lie."""
    try:
        return tensor_elements(dims, size * 8)
    except ValueError as error:
        raise InvalidInputError(f"{name}: tensor {tensor!r} {error}") from None


def _walk(
    data: mmap.mmap, size: int, name: str, keep: bool = False
) -> tuple[_Cursor, GgufSummary, int, list[tuple[str, tuple[int, ...], int, int]]]:
    """(the cursor past the header, what a summary keeps of the metadata when ``keep``, the alignment, and
    each tensor's name, dimensions (ggml's order), ggml type and offset)."""
    if data[:4] != _MAGIC:
        raise InvalidInputError(
            f"{name} is not a GGUF file (it starts with {bytes(data[:4])!r}, not b'GGUF')"
        )
    (version,) = struct.unpack_from("<I", data, 4)
    order = ">" if version & 0xFFFF == 0 else "<"  # a file written on a machine of the other byte order
    cursor = _Cursor(data, size, order, name)
    cursor.skip(4)
    (version,) = cursor.take("I")
    if version not in _VERSIONS:
        raise InvalidInputError(f"{name} is GGUF version {version}; versions {_VERSIONS} are readable")
    tensor_count, kv_count = cursor.take("QQ")
    if kv_count * _MIN_KV + tensor_count * _MIN_TENSOR_INFO > size:
        raise InvalidInputError(
            f"{name} is truncated: it counts {kv_count} key-values and {tensor_count} tensors in {size} bytes"
        )
    alignment = _DEFAULT_ALIGNMENT
    summary = GgufSummary()
    contexts: dict[bytes, int] = {}
    token_ids: dict[str, int] = {}
    tokens: tuple[int, int] | None = None  # (where the array of token strings starts, its count)
    for _ in range(kv_count):
        key = cursor.string()
        (vtype,) = cursor.take("I")
        if key == b"general.alignment":
            if vtype != _UINT32:
                raise InvalidInputError(f"{name}: general.alignment is not a uint32")
            (alignment,) = cursor.take("I")
            if alignment == 0 or alignment & (alignment - 1):
                raise InvalidInputError(f"{name}: general.alignment {alignment} is not a power of two")
        elif keep and (
            key in _KEPT or key in _TOKEN_IDS or key.endswith(b".context_length") or key == _SPLITS
        ):
            value = cursor.kept(vtype)
            if key == _SPLITS and isinstance(value, int):
                summary.split_count = value
            elif key in _TOKEN_IDS and isinstance(value, int):
                token_ids[_TOKEN_IDS[key]] = value
            elif key.endswith(b".context_length") and isinstance(value, int):
                contexts[key] = value
            elif key in _KEPT and isinstance(value, str):
                summary.values[key.decode().rsplit(".", 1)[1]] = value
        elif keep and key == _TOKENS and vtype == _ARRAY:
            at = cursor.offset
            itype, count = cursor.take("IQ")
            tokens = (at + 12, count) if itype == _STRING else None
            cursor.offset = at
            cursor.value(vtype)
        else:
            cursor.value(vtype)
    architecture = summary.values.get("architecture")
    context = contexts.get(f"{architecture}.context_length".encode()) if architecture is not None else None
    if context is not None:
        summary.values["context_length"] = context
    if tokens is not None:
        for name_of, index in token_ids.items():
            if 0 <= index < tokens[1]:
                summary.values[f"{name_of}_token"] = _nth_string(cursor, *tokens, index)
    tensors: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(tensor_count):
        tensor = cursor.string().decode("utf-8", "replace")
        (n_dims,) = cursor.take("I")
        if n_dims > _MAX_DIMS:
            raise InvalidInputError(f"{name}: tensor {tensor!r} has {n_dims} dimensions")
        dims = cursor.take(f"{n_dims}Q")
        kind, offset = cursor.take("IQ")
        tensors.append((tensor, dims, kind, offset))
    return cursor, summary, alignment, tensors


def _nth_string(cursor: _Cursor, start: int, count: int, index: int) -> str:
    """String ``index`` of an array of ``count`` strings that starts at byte ``start`` (the cursor kept
    where it was)."""
    kept = cursor.offset
    try:
        cursor.offset = start
        for _ in range(index):
            (length,) = cursor.take("Q")
            cursor.skip(length)
        return cursor.string().decode("utf-8", "replace")
    finally:
        cursor.offset = kept
