"""Turning model files into engines, and warming engines up.

Engines load from real paths (the snapshot tree), so an ONNX model finds its external data beside it,
safetensors maps the blob itself and a split GGUF finds its other shards. The engine libraries are
optional (``pip install 'modeldepot[engines]'``): they are imported when first used, with a clear error
when missing.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import mmap
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modeldepot.engines.gguf_model import load_gguf
from modeldepot.errors import (
    ConfigError,
    EngineMismatchError,
    InvalidInputError,
    NotFoundError,
    VariantNotFoundError,
)
from modeldepot.hub.variants import (
    gguf_quant,
    gguf_shard_names,
    group_files,
    is_gguf_model,
    safetensors_shard_names,
)
from modeldepot.validation import tensor_elements

__all__ = [
    "ENGINES",
    "EngineLoader",
    "WarmupReport",
    "check_engine_installed",
    "dummy_inputs",
    "load_gguf",
    "load_onnxruntime",
    "load_safetensors",
    "model_file",
    "warmup",
]

log = logging.getLogger(__name__)

EngineLoader = Callable[[Path], Any]
"""Builds an engine from the path of a model file (its siblings, like external data, beside it)."""


def _require(module: str, install: str = "'modeldepot[engines]'") -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(_missing(module, install)) from None


def _missing(module: str, install: str = "'modeldepot[engines]'") -> str:
    return f"this engine needs the {module!r} package: pip install {install}"


# The packages each engine of ours imports as it loads (torch's own install line: no extra of ours has it)
_ENGINE_PACKAGES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime",),
    "onnxruntime-prepacked": ("onnxruntime",),
    "safetensors": ("safetensors", "numpy"),
    "torch": ("safetensors", "torch"),
    "gguf": ("gguf", "numpy"),
}


def check_engine_installed(name: str) -> None:
    """Raise the ConfigError the engine ``name``'s load would, before anything is pulled or evicted for it:
    a missing package is found without importing one (the loaded-model cache makes room before a load)."""
    for module in _ENGINE_PACKAGES.get(name, ()):
        try:  # (one imported already is answered from sys.modules: a load's hit pays next to nothing)
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # (a module in sys.modules without a spec: it is there)
            found = sys.modules.get(module) is not None
        if not found:
            raise ConfigError(_missing(module, "torch" if module == "torch" else "'modeldepot[engines]'"))


def load_onnxruntime(
    path: Path,
    providers: list[str] | None = None,
    prepack: bool = False,
    external_data: Mapping[str, memoryview] | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` (CPU unless ``providers`` says otherwise).

    Without ``prepack`` (the default) the weights in external data stay mapped from the file: one copy in
    the page cache, shared by every worker and kept warm by the preloader, and a session in 0.1 s instead
    of 1.7 s for 1 GiB of MatMul weights (docs/benchmarks.md). ``prepack=True`` gives each session a
    private copy in MLAS's packed layout, which can speed up large-batch matrix products.

    ``external_data`` hands onnxruntime the contents of external data files by the names the model gives
    them, instead of the files beside it (which it refuses when they are links leading out of the model's
    folder); it copies what the model uses while the session is made.
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if external_data:
        names = list(external_data)
        buffers = [external_data[name] for name in names]
        options.add_external_initializers_from_files_in_memory(names, buffers, [b.nbytes for b in buffers])
    return ort.InferenceSession(
        str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
    )


def onnxruntime_version_lacking_data_in_memory() -> str | None:
    """The installed onnxruntime's version when it cannot take external data in memory (before 1.23: the
    ``external_data`` of :func:`load_onnxruntime`), else None."""
    ort = _require("onnxruntime")
    if hasattr(ort.SessionOptions, "add_external_initializers_from_files_in_memory"):
        return None
    return str(ort.__version__)


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16",
    "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "C64": "complex64",
}  # fmt: skip
# The machine-learning types numpy lacks, as ml_dtypes spells them (most checkpoints on the Hub are BF16)
_SAFETENSORS_ML_DTYPES = {
    "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


class Tensors(dict[str, Any]):
    """A safetensors engine: its tensors by name (a dict, which the loaded-model cache may hold weakly: one
    evicted while a caller holds it is taken back, not loaded twice)."""


def load_safetensors(path: Path, framework: str = "numpy") -> dict[str, Any]:
    """Every tensor of a safetensors file: read-only numpy arrays that *map* the file (no copy: one copy
    in the page cache, shared by every worker and kept warm by the preloader), or ``pt`` tensors (copied,
    by safetensors) when torch is installed. BF16 and FP8 tensors are arrays of ml_dtypes' types (mapping
    the file too); a type no numpy package has (the packed F4, F6) is an InvalidInputError naming it.
    A shard of a sharded checkpoint (``model-00001-of-00002.safetensors``) loads with its every shard
    beside it: the model's tensors, not the first file's alone (a load returned half a model).
    """
    shards = safetensors_shard_names(path.name)
    if shards is None:
        return Tensors(_load_safetensors_file(path, framework))
    tensors = Tensors()
    for shard in shards:
        if not (path.parent / shard).is_file():
            raise NotFoundError(f"{path.name} is one of {len(shards)} shards, and {shard} is not beside it")
        for name, tensor in _load_safetensors_file(path.parent / shard, framework).items():
            if name in tensors:
                raise InvalidInputError(f"tensor {name!r} is in two shards of {path.name}'s checkpoint")
            tensors[name] = tensor
    return tensors


def _load_safetensors_file(path: Path, framework: str) -> dict[str, Any]:
    _require("safetensors")
    if framework == "pt":
        _require("torch", "torch")
        from safetensors.torch import load_file as load_torch

        return dict(load_torch(str(path)))
    numpy = _require("numpy")
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        mapping = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) if size else None
    header, base = _safetensors_header(mapping, size, path)
    types = {name: _numpy_dtype(path, name, info["dtype"]) for name, info in header.items()}
    tensors = {}
    for name, info in header.items():
        dtype = numpy.dtype(types[name])
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        if count:
            array = numpy.frombuffer(mapping, dtype=dtype, count=count, offset=base + start)
        else:  # (no bytes to map; read-only as every other tensor: it was writable, an explorer's find)
            array = numpy.empty(0, dtype)
            array.flags.writeable = False
        tensors[name] = array.reshape(info["shape"])
    return tensors


def _numpy_dtype(path: Path, name: str, dtype: str) -> Any:
    """The numpy type of a safetensors dtype (ml_dtypes' for BF16 and FP8)."""
    if dtype in _SAFETENSORS_DTYPES:
        return _SAFETENSORS_DTYPES[dtype]
    if dtype in _SAFETENSORS_ML_DTYPES:
        return getattr(_require("ml_dtypes"), _SAFETENSORS_ML_DTYPES[dtype])
    raise InvalidInputError(f"{path.name}: tensor {name!r} is of type {dtype}, which no numpy array holds "
                            "(engine='torch', or a callable engine, reads it)")  # fmt: skip


def _safetensors_header(mapping: mmap.mmap | None, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The tensor table of a safetensors file (``__metadata__`` left out), checked against the file's
    size, and where the data starts."""
    if mapping is None or size < 8:
        raise InvalidInputError(f"{path.name} is not a safetensors file: too short")
    (length,) = struct.unpack("<Q", mapping[:8])
    if length > min(_SAFETENSORS_MAX_HEADER, size - 8):
        raise InvalidInputError(f"{path.name} is not a safetensors file: header length {length}")
    try:
        table = json.loads(mapping[8 : 8 + length])
    except (ValueError, RecursionError) as error:
        raise InvalidInputError(f"{path.name} has an unreadable safetensors header: {error}") from None
    if not isinstance(table, dict):
        raise InvalidInputError(f"{path.name} has an unreadable safetensors header")
    table.pop("__metadata__", None)
    base = 8 + length
    for name, info in table.items():
        try:
            start, end = info["data_offsets"]
            shape, dtype = list(info["shape"]), info["dtype"]
        except (TypeError, KeyError, ValueError):
            start = end = dtype = None
            shape = []
        # whole numbers only: "8" or 8.0 passed as far as numpy, as a raw TypeError
        if not all(type(n) is int for n in (start, end, *shape)) or not isinstance(dtype, str):
            raise InvalidInputError(f"{path.name}: tensor {name!r} is described wrongly") from None
        itemsize = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4}.get(
            dtype, 2 if "16" in dtype else 1
        )
        try:  # (bounded as it is multiplied: see tensor_elements)
            elements = tensor_elements(shape, size * 8)
        except ValueError as error:
            raise InvalidInputError(f"{path.name}: tensor {name!r} {error}") from None
        if not (0 <= start <= end <= size - base) or (
            dtype in _SAFETENSORS_DTYPES.keys() | _SAFETENSORS_ML_DTYPES.keys()
            and end - start != elements * itemsize
        ):
            raise InvalidInputError(f"{path.name}: tensor {name!r} does not fit the file")
    # Two tensors on the same bytes: a malformed file the safetensors library refuses ("invalid offset"),
    # loaded here as aliased arrays (an explorer's trial)
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in table.items())
    for (_, end, before), (start, _, after) in itertools.pairwise(spans):
        if start < end:
            raise InvalidInputError(f"{path.name}: tensors {before!r} and {after!r} overlap in the file")
    return table, base


ENGINES: dict[str, tuple[EngineLoader, tuple[str, ...]]] = {
    # name -> (loader, the file suffixes it loads, in order of preference)
    "onnxruntime": (load_onnxruntime, (".onnx",)),
    "onnxruntime-prepacked": (lambda path: load_onnxruntime(path, prepack=True), (".onnx",)),
    "safetensors": (load_safetensors, (".safetensors",)),
    "torch": (lambda path: load_safetensors(path, "pt"), (".safetensors",)),  # needs torch installed
    "gguf": (load_gguf, (".gguf",)),  # GgufModel: metadata and tensors mapping the file(s)
}


@dataclass(frozen=True)
class WarmupReport:
    passes: int
    seconds: tuple[float, ...]  # each pass
    errors: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}  # fmt: skip


def dummy_inputs(session: Any) -> dict[str, Any]:
    """Zero inputs shaped from an onnxruntime session's signature (symbolic or unknown dims become 1)."""
    numpy = _require("numpy")
    inputs = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        dtype = _ORT_DTYPES.get(spec.type)
        if dtype is None:
            raise ValueError(f"input {spec.name!r} has type {spec.type}: pass warmup inputs explicitly")
        inputs[spec.name] = numpy.zeros(shape, dtype=dtype)
    return inputs


def warmup(engine: Any, passes: int = 1, inputs: Mapping[str, Any] | None = None) -> WarmupReport:
    """Run ``passes`` dummy inferences so the first real request does not pay for lazy initialisation.

    onnxruntime sessions get zero inputs shaped from their signature unless ``inputs`` is given; any other
    callable engine is called with ``inputs`` (as keywords). Errors are logged and reported, never raised:
    a model that cannot be warmed up can still serve.
    """
    if passes < 0:
        raise ValueError("passes must be 0 or more")
    seconds: list[float] = []
    errors: list[str] = []
    for number in range(passes):
        started = time.perf_counter()
        try:
            if hasattr(engine, "run") and hasattr(engine, "get_inputs"):
                engine.run(None, dict(inputs) if inputs is not None else dummy_inputs(engine))
            elif callable(engine):
                engine(**(inputs or {}))
            else:
                break  # tensors, tokenizers: nothing to run
        except Exception as error:  # a warmup failure is reported, not fatal
            errors.append(f"pass {number + 1}: {type(error).__name__}: {error}")
            log.warning("warmup pass %d failed: %s", number + 1, error)
            break
        seconds.append(time.perf_counter() - started)
    if seconds:
        log.info("warmed up in %d passes: %s", len(seconds), ", ".join(f"{s * 1000:.1f} ms" for s in seconds))
    return WarmupReport(len(seconds), tuple(seconds), tuple(errors))


# The GGUF quants a load without one takes first, in order, as llama.cpp's `-hf repo` does
_GGUF_PREFERRED = ("Q4_K_M", "Q8_0")


def _gguf_preference(path: str) -> int:
    label = gguf_quant(path)
    return _GGUF_PREFERRED.index(label) if label in _GGUF_PREFERRED else len(_GGUF_PREFERRED)


# The variants' kinds (hub/variants.py) an engine loading files of these suffixes takes, in its order
_KINDS = {".onnx": "onnx", ".safetensors": "safetensors", ".gguf": "gguf"}


def engine_kinds(suffixes: tuple[str, ...]) -> list[str]:
    """The kinds of variant (``onnx``, ``safetensors``, ``gguf``) files of ``suffixes`` are, in their order."""
    return [_KINDS[suffix] for suffix in suffixes if suffix in _KINDS]


def model_file(
    paths: list[str], quant: str | None, suffixes: tuple[str, ...], file: str | None = None,
    holder: str = "the store",
) -> str:  # fmt: skip
    """The file an engine should load from a revision's ``paths``: ``file`` when it is given (one graph of
    several: an encoder-decoder export's encoder), else the variant ``quant``'s (named as
    :mod:`modeldepot.hub.variants` names them), or without one the plainest (fp32 first, then the
    shallowest path; of GGUF models Q4_K_M, then Q8_0, as llama.cpp picks). A GGUF variant's model, not its
    ``mmproj`` projector nor an ``imatrix``; for a split GGUF its first
    shard, and a :class:`NotFoundError` when ``paths`` lack one of its shards (a pull then fetches them;
    ``holder`` is what the error says lacks it: the store, or a commit whose listing ``paths`` are)."""
    grouping = group_files(paths)
    variant = None
    if quant is not None:
        variant = grouping.find_for(quant, engine_kinds(suffixes))
        if variant is None:
            where = "here" if holder == "the store" else f"in {holder}"
            raise VariantNotFoundError(f"no variant {quant!r} {where} (there is: {grouping.names()})")
        candidates = list(variant.files)
    if file is not None:
        if suffixes and not file.endswith(suffixes):
            raise InvalidInputError(f"{file} is not a {' or '.join(suffixes)} file, which this engine loads")
        if file not in paths:
            named = sorted(p for p in paths if p.endswith(suffixes or (".onnx", ".safetensors", ".gguf")))
            raise NotFoundError(f"no file {file!r} here" + (f" (its model files: {', '.join(named[:8])})" if named else ""))  # fmt: skip
        if variant is not None and file not in variant.files:
            raise NotFoundError(f"{file} is not a file of the variant {quant!r} (give the one or the other)")
        shards = (gguf_shard_names if file.endswith(".gguf") else safetensors_shard_names)(file) or []
        if missing := sorted(set(shards) - set(paths)):
            raise NotFoundError(
                f"{file} is one of {len(shards)} shards and {holder} lacks {', '.join(missing)}"
            )
        return file
    if quant is None:
        plain = next((v for v in grouping.variants if v.name == "fp32"), None)
        candidates = list(plain.files) if plain is not None else list(paths)
        if plain is not None and not any(p.endswith(suffixes) for p in candidates):
            # fp32 is another format here (a repo of ONNX exports beside its safetensors): the engine's own
            # format, wherever it is ("no .safetensors file; it has .onnx" of a repo that held one)
            candidates = list(paths)
    for suffix in suffixes:
        matching = sorted(
            (p for p in candidates if p.endswith(suffix)), key=lambda p: (p.count("/"), len(p), p)
        )
        if suffix == ".gguf":
            # projectors and importance matrices are no model; without a quant, llama.cpp's choice first (the
            # shortest name was Q2_K, the worst, or F16, the largest: an explorer's trial)
            not_models = [p for p in matching if not is_gguf_model(p)]
            matching = [p for p in matching if is_gguf_model(p)]
            if quant is None:
                matching.sort(key=_gguf_preference)
            if not matching and not_models:
                raise NotFoundError(f"no GGUF model{' in variant ' + repr(quant) if quant else ''}: "
                                    f"{', '.join(not_models[:4])} {'is' if len(not_models) == 1 else 'are'} no "
                                    "model (a projector or an importance matrix): name it with file= to load it")  # fmt: skip
        if matching:
            split = gguf_shard_names if suffix == ".gguf" else safetensors_shard_names
            shards = split(matching[0]) or []
            missing = sorted(set(shards) - set(paths))
            if missing:
                raise NotFoundError(f"{matching[0]} is one of {len(shards)} shards and {holder} lacks "
                                    f"{', '.join(missing)}")  # fmt: skip
            return matching[0]
    others = [f"{suffix} (engine={name!r})" for suffix, name in ((".safetensors", "safetensors"), (".gguf", "gguf"),
              (".onnx", "onnxruntime")) if suffix not in suffixes and any(p.endswith(suffix) for p in candidates)]  # fmt: skip
    kind = EngineMismatchError if others else NotFoundError
    raise kind(f"no {' or '.join(suffixes)} file{' in variant ' + repr(quant) if quant else ''}"
               + (f"; it has {', '.join(others)}" if others else ""))  # fmt: skip
