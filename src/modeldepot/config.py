"""Settings, read from the environment once, at the edge (CLI, server start), and passed down explicitly."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modeldepot.errors import ConfigError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_HUB_ENDPOINT",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "DepotConfig",
    "default_home",
    "parse_size",
]

MiB = 1024 * 1024
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
DEFAULT_CHUNK_SIZE = 16 * MiB
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 1024 * MiB

_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(i?B?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE")


def parse_size(text: str) -> int:
    """Parse ``"16MiB"``, ``"16M"``, ``"65536"`` into bytes (binary units)."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ConfigError(f"cannot read size {text!r}: write it like 16MiB, 64KiB or 1048576")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$MODELDEPOT_HOME``, else ``$XDG_CACHE_HOME/modeldepot``, else ``~/.cache/modeldepot``."""
    env = os.environ if environ is None else environ
    if env.get("MODELDEPOT_HOME"):
        return Path(env["MODELDEPOT_HOME"]).expanduser()
    cache = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(cache) / "modeldepot"


@dataclass(frozen=True)
class DepotConfig:
    """Where the store lives and how it chunks new blobs.

    ``chunk_size`` applies to a store when it is created; an existing store keeps the size recorded in
    its index (``None`` means "whatever the store has, or the default for a new one").
    """

    home: Path
    chunk_size: int | None = None
    hub_endpoint: str = DEFAULT_HUB_ENDPOINT
    hub_token: str | None = field(default=None, repr=False)  # sent to the Hub only, never to nodes or peers
    offline: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size is not None and not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ConfigError(
                f"chunk size {self.chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, home: Path | str | None = None
    ) -> DepotConfig:
        """Build from ``MODELDEPOT_HOME`` and ``MODELDEPOT_CHUNK_SIZE``; an explicit ``home`` wins."""
        env = os.environ if environ is None else environ
        chunk = env.get("MODELDEPOT_CHUNK_SIZE")
        return cls(
            home=Path(home).expanduser() if home is not None else default_home(env),
            chunk_size=parse_size(chunk) if chunk else None,
            hub_endpoint=(env.get("HF_ENDPOINT") or DEFAULT_HUB_ENDPOINT).rstrip("/"),
            hub_token=env.get("HF_TOKEN") or None,
            offline=any(_truthy(env.get(name)) for name in ("HF_HUB_OFFLINE", "MODELDEPOT_OFFLINE")),
        )
