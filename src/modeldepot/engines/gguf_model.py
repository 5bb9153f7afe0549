"""GGUF files as numpy tensors that map the file (``engine="gguf"``), through the ``gguf`` package's
memory-mapping ``GGUFReader``.

A split model (``model-00001-of-00003.gguf``, as llama.cpp's ``gguf-split`` and gguf-py's writer name
them) loads whole or not at all: every shard is opened, its ``split.count``/``split.no`` checked against
its name, and the tensors merged. The header is walked with bounds checks before ``GGUFReader`` reads it
(:mod:`modeldepot.engines.gguf_header`), so a file that is not GGUF, is truncated or lies about its sizes
is an :class:`InvalidInputError` naming the file, never a raw numpy error or a loop over a count the file
does not hold.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modeldepot.engines.gguf_header import check_layout, mapped
from modeldepot.errors import ConfigError, InvalidInputError, NotFoundError
from modeldepot.hub.variants import gguf_shard_names

if TYPE_CHECKING:
    import numpy

__all__ = ["GgufModel", "GgufTensorInfo", "load_gguf"]


_STRING, _ARRAY = 8, 9  # GGUFValueType


@dataclass(frozen=True)
class GgufTensorInfo:
    """Where a tensor lies and how it is encoded."""

    name: str
    ggml_type: str  # GGMLQuantizationType's name: "F32", "F16", "BF16", "Q8_0", "Q4_K"…
    shape: tuple[int, ...]  # logical, numpy order (outermost first): ggml's ``ne`` reversed
    n_elements: int
    n_bytes: int
    file: Path  # the shard that holds it
    offset: int  # where its data starts in that file

    @property
    def raw(self) -> bool:
        """Whether the array holds the ggml blocks as bytes (``uint8``, the last dimension in bytes)
        rather than numbers: every type but F32, F16, F64 and the integers."""
        return self.ggml_type not in _NUMERIC_TYPES


_NUMERIC_TYPES = frozenset({"F32", "F16", "F64", "I8", "I16", "I32", "I64"})


@dataclass(frozen=True, eq=False)
class GgufModel:
    """A GGUF model, loaded without copying its weights.

    - ``metadata``: the key-value pairs (``general.architecture``, ``llama.context_length``,
      ``tokenizer.ggml.tokens``…) decoded to ``str``, ``int``, ``float``, ``bool`` or lists of them
      (nested arrays flattened, as gguf-py does). For a split model, the first shard's, which holds the
      model's (the others hold only ``split.*``).
    - ``tensors``: name → read-only numpy array that *maps* the file (no copy: one copy in the page cache,
      shared by every worker and kept warm by the preloader). F32, F16, F64 and integer tensors are arrays
      of their type in their logical shape; every other type (BF16, Q8_0, Q4_K, IQ…) stays in its raw ggml
      byte layout, as ``GGUFReader`` gives it: ``uint8``, the last dimension counted in bytes of blocks
      (:meth:`dequantize` decodes one into a new float32 array).
    - ``tensor_info``: name → :class:`GgufTensorInfo` (ggml type, logical shape, file, offset).
    - ``files``: the files mapped, shards in order.

    The mappings last as long as the arrays do; the cache's eviction only drops its reference.
    """

    metadata: dict[str, Any] = field(repr=False)
    tensors: dict[str, numpy.ndarray[Any, Any]] = field(repr=False)
    tensor_info: dict[str, GgufTensorInfo] = field(repr=False)
    files: list[Path]
    version: int

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def dequantize(self, name: str) -> numpy.ndarray[Any, Any]:
        """Tensor ``name`` decoded into a new float32 array of its logical shape (``gguf.quants``; raises
        :class:`ConfigError` for a type the installed gguf package cannot decode)."""
        info = self.tensor_info[name]
        if (
            info.ggml_type in _NUMERIC_TYPES
        ):  # (plain numbers: nothing to decode; gguf.quants refuses I32, F64)
            return self.tensors[name].astype("float32").reshape(info.shape)
        gguf = _gguf()
        try:
            values = gguf.quants.dequantize(self.tensors[name], gguf.GGMLQuantizationType[info.ggml_type])
        except NotImplementedError as error:
            raise ConfigError(f"{name!r}: {error}; a newer gguf package may decode it") from None
        return values.astype("float32").reshape(info.shape)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        files = ", ".join(p.name for p in self.files)
        return f"GgufModel({self.architecture!r}, {len(self.tensors)} tensors, files=[{files}])"


def _gguf() -> Any:
    try:
        return importlib.import_module("gguf")
    except ImportError:
        raise ConfigError("this engine needs the 'gguf' package: pip install 'modeldepot[engines]'") from None


def load_gguf(path: Path) -> GgufModel:
    """The GGUF model at ``path`` (see :class:`GgufModel`); for a shard of a split model, all its shards,
    found beside it by name. A missing shard is a :class:`NotFoundError`, a file that is not GGUF (or is
    truncated, or whose shards disagree) an :class:`InvalidInputError`."""
    gguf = _gguf()
    path = Path(path)
    names = gguf_shard_names(path.name)
    shards = [path.with_name(name) for name in names] if names else [path]
    missing = [shard.name for shard in shards if not shard.exists()]
    if missing and not names:
        raise NotFoundError(f"{path.name} is missing (removed from the store while it was being loaded?)")
    if missing:
        raise NotFoundError(
            f"{path.name} is one of {len(shards)} shards of a split GGUF and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing: a split model loads only whole"
        )
    readers = [_read(gguf, shard) for shard in shards]
    for number, (shard, reader) in enumerate(zip(shards, readers, strict=True)):
        count, index = _scalar(reader, "split.count"), _scalar(reader, "split.no")
        if len(shards) > 1 and (count != len(shards) or index != number):
            raise InvalidInputError(
                f"{shard.name} is named shard {number + 1} of {len(shards)} but its split.no/split.count "
                f"say {'nothing' if count is None or index is None else f'{index + 1} of {count}'}"
            )
        if len(shards) == 1 and count not in (None, 1):
            raise NotFoundError(
                f"{shard.name} is shard {(index or 0) + 1} of {count} of a split GGUF, but is not named as "
                f"one (…-{(index or 0) + 1:05d}-of-{count:05d}.gguf): its other shards cannot be found"
            )
    tensors: dict[str, Any] = {}
    infos: dict[str, GgufTensorInfo] = {}
    for shard, reader in zip(shards, readers, strict=True):
        for tensor in reader.tensors:
            if tensor.name in tensors:
                raise InvalidInputError(f"{shard.name} holds tensor {tensor.name!r} again")
            tensors[tensor.name] = tensor.data
            infos[tensor.name] = GgufTensorInfo(
                name=tensor.name,
                ggml_type=tensor.tensor_type.name,
                shape=tuple(int(d) for d in reversed(tensor.shape.tolist())),
                n_elements=int(tensor.n_elements),
                n_bytes=int(tensor.n_bytes),
                file=shard,
                offset=int(tensor.data_offset),
            )
    expected = _scalar(readers[0], "split.tensors.count")
    if len(shards) > 1 and expected is not None and expected != len(tensors):
        raise InvalidInputError(
            f"{path.name}: split.tensors.count says {expected}, the shards hold {len(tensors)}"
        )
    try:
        metadata = {
            name: _decode(value)
            for name, value in readers[0].fields.items()
            if not name.startswith("GGUF.")  # the reader's own entries for the header
        }
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"{shards[0].name} holds a string that is not UTF-8: {error}") from None
    version = int(readers[0].fields["GGUF.version"].parts[0][0])
    return GgufModel(metadata, tensors, infos, shards, version)


def _read(gguf: Any, path: Path) -> Any:
    """A ``GGUFReader`` (read-only mapping) of ``path``, its header checked first."""
    with mapped(path) as (mapping, size):
        check_layout(mapping, size, path.name, gguf.GGML_QUANT_SIZES)
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as error:
        raise InvalidInputError(f"{path.name} is not a readable GGUF file: {error}") from None


def _scalar(reader: Any, key: str) -> int | None:
    found = reader.fields.get(key)
    if found is None or len(found.types) != 1:
        return None
    value = found.parts[found.data[0]][0].item()
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _decode(found: Any) -> Any:
    """A key-value field's value as Python data (strings decoded, arrays as lists)."""
    if not found.types:
        return None
    kind = int(found.types[0])
    if kind == _STRING:
        return bytes(found.parts[found.data[0]]).decode("utf-8")
    if kind != _ARRAY:
        return found.parts[found.data[0]][0].item()
    if len(found.types) < 2 or not found.data:  # an empty array
        return []
    if int(found.types[-1]) == _STRING:
        return [bytes(found.parts[index]).decode("utf-8") for index in found.data]
    numpy = importlib.import_module("numpy")
    return numpy.concatenate([found.parts[index] for index in found.data]).tolist()
