"""Loaded engines kept warm in-process (the loaded-model cache) and adapters for the engines we load."""

from modeldepot.engines.cache import CacheStats, LoadedModelCache, default_on_evict

__all__ = ["CacheStats", "LoadedModelCache", "default_on_evict"]
