"""Turning model files into engines, and warming engines up.

Engines load from real paths (the snapshot tree), so an ONNX model finds its external data beside it
and safetensors maps the blob itself. The engine libraries are optional (``pip install
'modeldepot[engines]'``): they are imported when first used, with a clear error when missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modeldepot.errors import ConfigError, NotFoundError
from modeldepot.hub.variants import group_files

__all__ = [
    "ENGINES",
    "EngineLoader",
    "WarmupReport",
    "dummy_inputs",
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
        raise ConfigError(f"this engine needs the {module!r} package: pip install {install}") from None


def load_onnxruntime(path: Path, providers: list[str] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` (CPU unless ``providers`` says otherwise)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    return ort.InferenceSession(
        str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
    )


def load_safetensors(path: Path, framework: str = "numpy") -> dict[str, Any]:
    """Every tensor of a safetensors file (``numpy`` arrays, or ``pt`` when torch is installed)."""
    _require("safetensors")
    if framework == "pt":
        _require("torch", "torch")
        from safetensors.torch import load_file as load_torch

        return dict(load_torch(str(path)))
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


ENGINES: dict[str, tuple[EngineLoader, tuple[str, ...]]] = {
    # name -> (loader, the file suffixes it loads, in order of preference)
    "onnxruntime": (load_onnxruntime, (".onnx",)),
    "safetensors": (load_safetensors, (".safetensors",)),
    "torch": (lambda path: load_safetensors(path, "pt"), (".safetensors",)),  # needs torch installed
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


def model_file(paths: list[str], quant: str | None, suffixes: tuple[str, ...]) -> str:
    """The file an engine should load from a revision's ``paths``: the variant ``quant``'s (named as
    :mod:`modeldepot.hub.variants` names them), or without one the plainest (fp32 first, then the
    shallowest path)."""
    grouping = group_files(paths)
    if quant is not None:
        variant = grouping.find(quant)
        if variant is None:
            raise NotFoundError(f"no variant {quant!r} here (there is: {grouping.names()})")
        candidates = list(variant.files)
    else:
        plain = next((v for v in grouping.variants if v.name == "fp32"), None)
        candidates = list(plain.files) if plain is not None else list(paths)
    for suffix in suffixes:
        matching = sorted(
            (p for p in candidates if p.endswith(suffix)), key=lambda p: (p.count("/"), len(p), p)
        )
        if matching:
            return matching[0]
    raise NotFoundError(f"no {' or '.join(suffixes)} file{' in variant ' + repr(quant) if quant else ''}")
