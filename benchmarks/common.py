"""What every benchmark here shares: a result row against an anchor, timing, and the printed table."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


@dataclass
class Row:
    name: str
    anchor: str
    anchor_s: float
    ours_s: float
    size: int  # bytes moved per run, for the GB/s columns
    goal: float  # the ratio the issue asks for

    @property
    def ratio(self) -> float:
        """Anchor time / our time: above 1 we are faster."""
        return self.anchor_s / self.ours_s


def hub_client_env(endpoint: str) -> dict[str, str]:
    """The environment of a huggingface_hub client of ``endpoint``: online, no Xet, no progress bars."""
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    return env


def median_time(
    action: Callable[[], object], setup: Callable[[], object] | None = None, repeat: int = 3
) -> float:
    samples = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _rate(row_size: int, seconds: float) -> str:
    return f"{seconds:.3f} s ({row_size / seconds / 1e9:.2f} GB/s)"


def render(title: str, rows: list[Row]) -> None:
    """A rich table for the terminal, then the same rows as Markdown for docs/benchmarks.md."""
    table = Table(title=f"{title}, {os.cpu_count()} cores, {platform.machine()}")
    for column in ("benchmark", "anchor", "anchor", "ours", "ratio", "goal", "met"):
        table.add_column(column)
    for row in rows:
        met = "yes" if row.ratio >= row.goal else "NO"
        table.add_row(row.name, row.anchor, _rate(row.size, row.anchor_s), _rate(row.size, row.ours_s),
                      f"{row.ratio:.2f}x", f">= {row.goal}x", met)  # fmt: skip
    Console().print(table)
    print("\n| benchmark | anchor | anchor | ours | ratio | goal |\n| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row.name} | {row.anchor} | {_rate(row.size, row.anchor_s)} | {_rate(row.size, row.ours_s)} | "
              f"{row.ratio:.2f}× | ≥ {row.goal}× |")  # fmt: skip


def random_file(path: Path, size: int, seed: int) -> None:
    """A file of ``size`` random bytes (kept if it is already there with that size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size == size:
        return
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        left = size
        while left:
            n = min(left, 64 << 20)
            handle.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
