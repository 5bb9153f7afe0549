"""Loaded engines kept warm in-process (the loaded-model cache) and adapters for the engines we load."""

from modeldepot.engines.cache import CacheStats, LoadedModelCache, close_on_evict, default_on_evict
from modeldepot.engines.gguf_model import GgufModel, GgufTensorInfo

__all__ = [
    "CacheStats",
    "GgufModel",
    "GgufTensorInfo",
    "LoadedModelCache",
    "close_on_evict",
    "default_on_evict",
]
