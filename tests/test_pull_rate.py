"""The CLI's rate of a pull tried again after an outage: the rate of the bytes coming, not 0 B/s for 10 s."""

from __future__ import annotations

import pytest

from modeldepot.transfer.progress import PullUpdate


def test_the_clis_rate_after_an_outage_retry_is_the_rate_of_the_bytes_coming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """f924f57's _Rate takes the rate of (shown - found) over a 10 s window. A try that run_through_outages
    starts again counts every chunk the tries before landed as found (resumed from disk), so shown - found
    drops from what the last try fetched to ~0; the window's first sample is the old try's last, and
    max(0, count - first) is 0: the CLI says 0 B/s (and -:--:-- left) for 10 s while bytes come at 2 MiB/s."""
    import re

    from modeldepot.cli import render
    from modeldepot.transfer.outage import _ShownSoFar

    clock = [1000.0]
    monkeypatch.setattr(render.time, "monotonic", lambda: clock[0])
    view = render.PullView("pulling")
    view.LINE_INTERVAL = 0.0
    lines: list[str] = []
    monkeypatch.setattr(render, "_plain_lines", lines.extend)
    shown = _ShownSoFar(view.update)
    total, mib = 1 << 30, 1 << 20
    shown.new_try()  # the first try: 2 MiB/s for 10 s
    for second in range(11):
        clock[0] = 1000.0 + second
        done = 2 * second * mib
        shown.watch(PullUpdate("w.bin", done, total, done, total))
    shown.new_try()  # an outage of 30 s; the next try resumes the 20 MiB from disk and goes on at 2 MiB/s
    for second in range(6):
        clock[0] = 1040.0 + second
        done = (20 + 2 * second) * mib
        shown.watch(PullUpdate("w.bin", done, total, done, total, found=20 * mib))
    view._flush()
    rate = re.search(r"([0-9.]+) (K?i?B|MiB)/s", lines[-1])
    assert rate is not None and rate.group(2) == "MiB" and float(rate.group(1)) >= 1.5, lines[-3:]
