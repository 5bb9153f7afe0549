"""The RAM tier: preloading hot models under a byte budget (see :mod:`modeldepot.preload.preloader`)."""

from modeldepot.preload.preloader import (
    STRATEGIES,
    Preloader,
    PreloadHandle,
    PreloadInfo,
    PreloadStats,
    parse_budget,
    resident_in_ram,
)
from modeldepot.preload.residency import MlockError

__all__ = [
    "STRATEGIES",
    "MlockError",
    "PreloadHandle",
    "PreloadInfo",
    "PreloadStats",
    "Preloader",
    "parse_budget",
    "resident_in_ram",
]
