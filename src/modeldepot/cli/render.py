"""Turning library results into terminal output: rich tables for people, JSON for programs."""

from __future__ import annotations

import errno
import json
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from modeldepot.errors import DepotError
from modeldepot.hub.manifest import IMPORTED_ENDPOINT, Manifest
from modeldepot.store import DiskUsage, GcReport, RemoveResult, RepoInfo, RepoSummary, VerifyReport

if TYPE_CHECKING:  # not imported at run time: `import` and the store commands start without aiohttp
    from pathlib import Path

    from modeldepot.store.budget import BudgetStatus, Eviction
    from modeldepot.store.pins import Pin
    from modeldepot.transfer.fleet import PeerRow
    from modeldepot.transfer.pull import PullUpdate
    from modeldepot.upkeep import Repair

__all__ = [
    "ByteProgress",
    "PullView",
    "emit",
    "err",
    "format_bytes",
    "out",
    "print_json",
    "render_du",
    "render_gc",
    "render_info",
    "render_ls",
    "render_manifest",
    "render_peers",
    "render_remove",
    "render_stats",
    "render_verify",
]


class OutputError(DepotError):
    """Standard output could not be written (a full disk behind a redirection, an I/O error)."""


@contextmanager
def _writing() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OutputError(f"writing to standard output: {error.strerror or error}") from error


def _open_stdout() -> TextIO:
    """``sys.stdout``, or an EBADF when the command was started with it closed (``>&-``: Python makes it
    None, and every command ended in an AttributeError's traceback, an explorer's trial)."""
    if sys.stdout is None:
        raise OSError(errno.EBADF, "it is closed")
    return sys.stdout


class _Stdout:
    """Standard output for the renderers: a write that fails is an :class:`OutputError`, said in one line as
    every error is (``ls > /dev/full`` ended in a traceback). A reader gone (``| head``) is left to ``main``."""

    def write(self, text: str) -> int:
        with _writing():
            return _open_stdout().write(text)

    def flush(self) -> None:
        with _writing():
            _open_stdout().flush()

    def isatty(self) -> bool:
        return sys.stdout is not None and sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return sys.stdout.encoding


stdout = _Stdout()
# Piped output has no width to respect: rich's default of 80 columns would cut repo ids and paths.
out = Console(file=stdout, highlight=False, soft_wrap=True, width=None if stdout.isatty() else 200)  # type: ignore[arg-type]  # (what Console uses of IO)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    stdout.flush()


def emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    """A command's result: ``data`` as JSON (``--json``, for scripts), or ``human()`` drawing it for people."""
    if as_json:
        print_json(data)
    else:
        human()


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _table(*columns: str) -> Table:
    """A table whose first column (a repo id or a path) is never cut, however narrow the terminal."""
    table = Table()
    table.add_column(columns[0], overflow="fold", min_width=min(40, max(12, len(columns[0]))))
    for column in columns[1:]:
        table.add_column(column)
    return table


LARGE_TABLE = 1000  # rows from which a table is printed as plain columns: rich took 17 s for 30,000


def _print_rows(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """A table of ``rows`` (plain text: no markup): rich's for a few, plain aligned columns for many."""
    if len(rows) < LARGE_TABLE:
        table = _table(*columns)
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        out.print(table)
        return
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in (columns, tuple("-" * width for width in widths), *rows)]  # fmt: skip
    out.file.write("\n".join(lines) + "\n")
    out.file.flush()


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))
    except (OverflowError, OSError, ValueError):  # (a peer's record may say any number: `peers` crashed)
        return "?"


def _speed(task: Task) -> float | None:
    """A task's rate: the one its owner gave (``rate``: of the bytes fetched, not those found on disk), else
    rich's."""
    given = task.fields.get("rate")
    return float(given) if given is not None else task.finished_speed or task.speed


class _BinarySpeedColumn(ProgressColumn):
    """The rate in the units of the sizes beside it and of --max-rate (MiB/s; rich's says MB/s)."""

    def render(self, task: Task) -> Text:
        speed = _speed(task)
        return Text("?" if speed is None else f"{format_bytes(int(speed))}/s", style="progress.data.speed")


class _TimeLeftColumn(TimeRemainingColumn):
    """The time left at :func:`_speed`'s rate."""

    def render(self, task: Task) -> Text:
        speed = _speed(task)
        if task.fields.get("rate") is None or task.total is None or task.finished:
            return super().render(task)
        if not speed:
            return Text("-:--:--", style="progress.remaining")
        left = int((task.total - task.completed) / speed)
        return Text(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}", style="progress.remaining")


class _Rate:
    """Bytes a second over the last ``WINDOW`` seconds of samples (0 while nothing moves: an outage). A
    count that falls (a pull tried again counts what the try before fetched as found) is no negative
    progress: only rises add up (it said 0 B/s for 10 s after each try again: a review)."""

    WINDOW = 10.0

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()
        self._last = 0  # the last count given
        self._risen = 0  # what the counts rose by, in all

    def add(self, now: float, count: int) -> float:
        self._risen += max(0, count - self._last)
        self._last = count
        samples = self._samples
        count = self._risen
        samples.append((now, count))
        while len(samples) > 1 and now - samples[0][0] > self.WINDOW:
            samples.popleft()
        start, first = samples[0]
        return max(0, count - first) / (now - start) if now - start > 0.5 else 0.0


def _byte_bars() -> Progress:
    """Bars on stderr with bytes, rate and time left; gone when done (the result line says it all)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        _BinarySpeedColumn(),
        _TimeLeftColumn(),
        console=err,
        transient=True,
    )


def _progress_line(description: str, done: int, total: int, rate: float | None) -> str:
    """``rate`` None: nothing was fetched (all of it found on disk: "0 B/s" read as a stall, a trial)."""
    said = f"{description}: {format_bytes(done)} of {format_bytes(total)} ({100 * done / max(total, 1):.0f}%)"
    return said + ("" if rate is None else f", {format_bytes(int(rate))}/s")


class ByteProgress:
    """A progress bar on stderr when it is a terminal; otherwise a plain line every few seconds and at the
    end (a long import in a CI log is not silent; stdout stays parseable)."""

    LINE_INTERVAL = 3.0

    def __init__(self, description: str) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._description = description
        self._started = time.monotonic()
        self._last_line = self._started

    @contextmanager
    def running(self) -> Iterator[ByteProgress]:
        self._started = self._last_line = time.monotonic()
        if err.is_terminal:
            self._progress = _byte_bars()
            with self._progress:
                self._task = self._progress.add_task(self._description, total=None)
                yield self
        else:
            yield self

    def update(self, done: int, total: int, label: str | None = None) -> None:
        if self._progress is not None and self._task is not None:
            description = f"{self._description} {label}" if label else self._description
            self._progress.update(self._task, completed=done, total=total, description=description)
            return
        now = time.monotonic()
        if now - self._last_line >= self.LINE_INTERVAL or (done >= total and now - self._started >= 1.0):
            self._last_line = now
            rate = done / max(now - self._started, 1e-6)
            _plain_lines([_progress_line(self._description, done, total, rate)
                          + (f" ({label})" if label and done < total else "")])  # fmt: skip


def _plain_lines(lines: list[str]) -> None:
    """Progress lines for a log, written as they are: rich would read brackets in a file name as markup and
    spend about 2 ms rendering each line (a pull of 300 small files prints 300)."""
    err.file.write("".join(line + "\n" for line in lines))
    err.file.flush()


class PullView:
    """Progress of a pull: on a terminal, a total bar and a bar per file in flight (rate, ETA); otherwise
    plain lines on stderr, at most every few seconds, and one per finished file."""

    LINE_INTERVAL = 3.0
    # Lines are written together at most this often (and at the end): one write per file of 300 configs
    # was 36 ms of a pull's event loop.
    FLUSH_INTERVAL = 0.2

    def __init__(self, description: str) -> None:
        self._description = description
        self._progress: Progress | None = None
        self._total: TaskID | None = None
        self._files: dict[str, TaskID] = {}
        self._finished: set[str] = set()
        self._started = time.monotonic()
        # (the first line after LINE_INTERVAL too: said at the first file's update, a resume's began "0 B of
        # 64.0 MiB (0%), 0 B/s" before its files' kept bytes were told)
        self._last_line = self._started
        self._lines: list[str] = []
        self._last_flush = 0.0
        self._rate = _Rate()  # of the bytes fetched (not those found on disk)
        self._most = 0  # the most bytes shown: never less is shown (a Ctrl-C's last frame fell back 36 MiB)
        self._thrown = 0  # ... but for the bytes thrown away (a file that failed its SHA-256, fetched again)
        self.last: PullUpdate | None = None

    @contextmanager
    def running(self) -> Iterator[PullView]:
        if not err.is_terminal:
            try:
                yield self
            finally:
                self._flush()
            return
        self._progress = _byte_bars()
        with self._progress:
            self._total = self._progress.add_task(self._description, total=None)
            yield self

    def update(self, update: PullUpdate) -> None:
        self.last = update
        now = time.monotonic()
        if update.thrown_away > self._thrown:
            self._most -= update.thrown_away - self._thrown
            self._thrown = update.thrown_away
        shown = self._most = max(self._most, update.shown)
        rate = self._rate.add(now, max(0, update.shown - update.found))
        if self._progress is not None and self._total is not None:
            self._progress.update(self._total, completed=shown, total=update.total, rate=rate)
            self._update_file_bar(self._progress, update)
            return
        if update.file_done >= update.file_size and update.path not in self._finished:
            self._finished.add(update.path)
            self._lines.append(f"  {update.path} ({format_bytes(update.file_size)})")
        if now - self._last_line >= self.LINE_INTERVAL or update.done >= update.total:
            self._last_line = now
            fetched_none = update.done >= update.total and update.shown <= update.found
            if update.done >= update.total:  # (the whole pull's: one under half a second ended "0 B/s")
                rate = max(0, update.shown - update.found) / max(now - self._started, 1e-3)
            self._lines.append(_progress_line(self._description, shown, update.total, None if fetched_none else rate)
                               + (", waiting for another process" if update.waiting else ""))  # fmt: skip
        if self._lines and (now - self._last_flush >= self.FLUSH_INTERVAL or update.done >= update.total):
            self._flush(now)

    def _flush(self, now: float | None = None) -> None:
        if self._lines:
            _plain_lines(self._lines)
            self._lines = []
        self._last_flush = time.monotonic() if now is None else now

    def _update_file_bar(self, progress: Progress, update: PullUpdate) -> None:
        task = self._files.get(update.path)
        if task is None:
            if update.path in self._finished:
                return
            label = f"  {escape(update.path)}" + (
                " (another process is fetching it)" if update.waiting else ""
            )
            task = self._files[update.path] = progress.add_task(label, total=update.file_size)
        progress.update(task, completed=update.file_shown)
        if update.file_done >= update.file_size:
            self._finished.add(update.path)
            progress.remove_task(self._files.pop(update.path))


def every_variant_note(manifest: Manifest) -> str:
    """What a pull of a whole repo of several variants takes, and how to take one."""
    sizes = {f.path: f.size for f in manifest.files}
    shown = [f"{v.name} {format_bytes(sum(sizes.get(p, 0) for p in v.files))}" for v in manifest.variants[:6]]
    more = f", {len(manifest.variants) - 6} more" if len(manifest.variants) > 6 else ""
    names = [v.name for v in manifest.variants]
    one = next(
        (name for name in ("Q4_K_M", "Q8_0", "q4f16", "fp16") if name in names), names[0]
    )  # (as load picks)
    return (f"note: {escape(manifest.repo_id)} has {len(names)} variants ({escape(', '.join(shown))}{more}): "
            f"pulling them all, {format_bytes(sum(sizes.values()))}; `-q {escape(one)}` pulls one (`modeldepot "
            "scan` lists them)")  # fmt: skip


def render_interrupted(manifests: list[Manifest]) -> None:
    """The pulls stopped before they finished, whose downloads are kept for a resume: said below a listing
    that does not show them."""
    for manifest in manifests:
        stopped = manifest.interrupted()
        kept = sum(variant.bytes_done for variant in stopped)
        # (the variants stopped, of the revision scanned: `pull REPO` alone fetches every quant, a review)
        whole = len(stopped) == len(manifest.variants)
        command = " ".join(
            [f"modeldepot pull {manifest.repo_id}"]
            + ([] if whole else [f"-q {shlex.quote(variant.name)}" for variant in stopped])
            + ([] if manifest.revision == "main" else [f"-r {shlex.quote(manifest.revision)}"])
        )
        out.print(
            f"An interrupted pull of {escape(manifest.repo_id)} ({escape(', '.join(v.name for v in stopped))}) "
            f"keeps {format_bytes(kept)}: `{escape(command)}` resumes it (`modeldepot status` shows it, "
            "`modeldepot gc --partials` drops it)"
        )


def render_ls(repos: list[RepoSummary], home: Path | None = None) -> None:
    if not repos:  # (the folder named: a mistyped --home shows here, as a store made empty just now)
        where = f" at {home}" if home is not None else ""
        out.print(f"The store{where} is empty. Add a model with `modeldepot import DIR --repo ORG/NAME`.")
        return
    columns = ("repo", "refs", "revisions", "newest: files", "size", "private", "updated")
    if len(repos) >= LARGE_TABLE:  # (plain columns: rich took 2 s for 3,000 repos, an explorer's trial)
        _print_rows(columns, [(
            repo.repo_id, ", ".join(f"{name}→{commit[:8]}" for name, commit in repo.refs.items()) or "-",
            str(repo.revisions),
            str(repo.files) + (f" ({repo.quarantined} failed verification)" if repo.quarantined else ""),
            format_bytes(repo.size), "yes" if repo.private else "no", _when(repo.updated_at),
        ) for repo in repos])  # fmt: skip
        return
    table = _table(*columns)
    for repo in repos:
        refs = ", ".join(f"{name}→{commit[:8]}" for name, commit in repo.refs.items()) or "-"
        table.add_row(
            escape(repo.repo_id),
            refs,
            str(repo.revisions),
            str(repo.files)
            + (f" [red]({repo.quarantined} failed verification)[/red]" if repo.quarantined else ""),
            format_bytes(repo.size),
            "yes" if repo.private else "no",
            _when(repo.updated_at),
        )
    out.print(table)


def render_info(info: RepoInfo, upstream: dict[str, int] | None = None) -> None:
    """``upstream``: how many files the commit has upstream, by commit id, where the store knows."""
    out.print(f"[bold]{info.repo_id}[/bold]  {'private' if info.private else 'public'}, from {info.origin}")
    for revision in info.revisions:
        names = ", ".join(revision.refs) if revision.refs else "detached"
        total = (upstream or {}).get(revision.commit_id, 0)
        held = count(len(revision.files), "file")
        if total > len(revision.files):
            which = (
                ""
                if "main" in revision.refs
                else f" -r {revision.refs[0] if revision.refs else revision.commit_id}"
            )
            rest = (
                "import it again to have the rest"  # (a pull would ask the Hub for another repo of that name)
                if info.origin == "import"
                else f"`modeldepot pull {info.repo_id}{which}` takes the rest, `-q QUANT` a variant of it"
            )
            held = f"{len(revision.files)} of the commit's {total} files ({rest})"
        out.print(
            f"\ncommit {revision.commit_id} ({names}), {held}, "
            f"{format_bytes(revision.size)}, added {_when(revision.created_at)}"
        )
        if revision.quarantined:
            which = (
                ""
                if "main" in revision.refs
                else f" -r {revision.refs[0] if revision.refs else revision.commit_id}"
            )
            again = (f"import its folder again (or `modeldepot pull {info.repo_id}{which}` where an upstream holds it)"
                     if info.origin == "import" else f"`modeldepot pull {info.repo_id}{which}` fetches them again")  # fmt: skip
            bad = len(revision.quarantined)
            err.print(f"[yellow]warning:[/yellow] {count(bad, 'file')} failed verification and {'is' if bad == 1 else 'are'} "
                      f"not served (marked below): {again}")  # fmt: skip
        _print_rows(("path", "size", "sha256", "etag", "lfs"), [
            (
                entry.path + (" (failed verification: not served)" if entry.path in revision.quarantined else ""),
                format_bytes(entry.size),
                entry.sha256[:16],
                entry.etag[:16],
                "yes" if entry.lfs else "",
            )
            for entry in revision.files
        ])  # fmt: skip


def render_snapshot(repo_id: str, path: str, built: bool) -> None:
    """The snapshot line of an import or a pull: its folder, or that it could not be made yet (a path that
    did not exist was printed, and exit 0, for a script's from_pretrained: an explorer's trial)."""
    if built:
        out.print(f"snapshot: {escape(path)}")
    else:
        out.print(f"[yellow]snapshot: not made yet[/yellow] (the store's disk had no room for its links): "
                  f"`modeldepot path {escape(repo_id)}` makes it once there is room ({escape(path)})")  # fmt: skip


def render_verify(report: VerifyReport, repairs: list[Repair] | None = None) -> None:
    for problem in report.problems:
        where = f"; moved to {problem.quarantined_to}" if problem.quarantined_to else ""
        said = "[yellow]unreadable[/yellow]" if problem.problem == "unreadable" else "[red]corrupt[/red]"
        err.print(f"{said} blob {problem.sha256[:16]}… ({problem.problem}): {escape(problem.detail)}{where}")
        for user in problem.files:
            err.print(f"    used by {user}")
    if not report.index_ok:
        err.print(f"[red]the index failed SQLite's integrity check[/red]: {escape(report.index_advice)}")
    for failed in report.snapshots_not_repaired:
        err.print(f"[yellow]snapshot not rebuilt[/yellow] {escape(failed)}")
    summary = f"checked {report.blobs_checked} blobs ({format_bytes(report.bytes_checked)}) in {report.seconds:.1f}s"
    if report.snapshots_repaired:
        summary += f", repaired {report.snapshots_repaired} snapshots"
    for repair in repairs or ():
        named = f"{repair.repo_id}@{repair.commit_id[:12]}: {', '.join(repair.paths[:3])}" + (
            f" and {len(repair.paths) - 3} more" if len(repair.paths) > 3 else ""
        )
        if repair.error is None:
            out.print(f"[green]repaired[/green] {escape(named)} (fetched again and verified)")
        else:
            err.print(f"[red]not repaired[/red] {escape(named)}: {escape(repair.error)}")
    unreadable = sum(problem.problem == "unreadable" for problem in report.problems)
    if unreadable and (repairs is not None or len(report.problems) == unreadable):
        # (a permission, not corrupt bytes: the corrupt blobs' advice misled, a review)
        out.print(f"[red]{count(unreadable, 'blob')} this user may not read[/red] (not checked, not quarantined: "
                  f"give the user read access, or verify as the store's owner): {summary}")  # fmt: skip
    elif repairs is not None and report.index_ok and not report.snapshots_not_repaired:
        left = sum(repair.error is not None for repair in repairs)
        out.print(f"[green]ok[/green]: {summary}" if not left else
                  f"[red]{count(left, 'revision')} not repaired[/red]: {summary}")  # fmt: skip
    elif report.ok and not report.snapshots_not_repaired:
        out.print(f"[green]ok[/green]: {summary}")
    elif (
        not report.problems
    ):  # (the index, or a snapshot: said above; "0 problems" read as all well, a trial)
        what = "the index is damaged" if not report.index_ok else "snapshots were not rebuilt"
        out.print(f"[red]{what}[/red] (the blobs checked are sound): {summary}")
    else:
        fix = (
            "The store is read-only: corrupt blobs stay in place, and each process refuses them; repair it "
            "where it is writable (verify there, then import or pull the affected files again)."
            if report.read_only
            else "Corrupt blobs are quarantined and never served; import or pull the affected files again, or "
            "remove the revisions that use them (modeldepot rm REPO --revision COMMIT: an import of a changed "
            "folder makes a new commit, and the old one keeps its quarantined blob)."
        )
        out.print(f"[red]{count(len(report.problems), 'problem')}[/red]: {summary}. {fix}")


def render_remove(result: RemoveResult) -> None:
    if result.scan_forgotten:
        out.print(f"forgot the saved scan of {result.repo_id}: the store held nothing of it")
        return
    if result.ref_removed is not None:
        out.print(f"removed the ref {result.ref_removed} of {result.repo_id}; its commit stays, as "
                  f"{', '.join(result.commit_kept_for)} still point(s) at it: nothing freed")  # fmt: skip
        return
    changed = len(set(result.revisions_changed)) or 1
    removed = ", ".join(
        part
        for part in (
            f"{count(len(result.files_removed), 'file')} of {'a revision' if changed == 1 else f'{changed} revisions'} "
            f"that stay{'s' if changed == 1 else ''}"
            if result.files_removed
            else "",
            count(len(result.commits), "revision") if result.commits or not result.files_removed else "",
        )
        if part
    )
    out.print(
        f"removed {result.repo_id}: {removed}, {count(result.blobs_removed, 'blob')}, "
        f"{format_bytes(result.bytes_freed)} freed"
        + (
            f"; {format_bytes(result.bytes_still_linked)} more stay on disk, linked from elsewhere too (a Hugging "
            "Face cache the store adopted or `hf-cache export` fed, a folder imported with --link: deleting them "
            "there frees them; a model being loaded now: freed once its load ends)"
            if result.bytes_still_linked
            else ""
        )
        + (
            f"; {format_bytes(result.bytes_still_held)} more stay on disk while "
            f"{'process' if len(result.held_by) == 1 else 'processes'} {_processes(result.held_by)} still "
            f"{'maps or holds' if len(result.held_by) == 1 else 'map or hold'} them open (freed once it lets go: "
            "a node as its answers of them end, a worker's loaded model at its next load, any process as it ends)"
            if result.bytes_still_held
            else ""
        )
    )


def _processes(pids: tuple[int, ...]) -> str:
    """``16447 (modeldepot serve --port 8980), 16502``: each with what it runs, where that can be read."""
    from modeldepot.store.holders import process_command

    named = []
    for pid in pids[:5]:
        command = process_command(pid)
        named.append(f"{pid} ({escape(command)})" if command else str(pid))
    return ", ".join(named) + (", ..." if len(pids) > 5 else "")


def count(number: int, thing: str) -> str:
    """``1 blob``, ``2 blobs``."""
    return f"{number} {thing}{'' if number == 1 else 's'}"


def _writes_and_downloads(number: int) -> str:
    return "1 write or download" if number == 1 else f"{number} writes and downloads"


def render_gc(
    report: GcReport, evicted: list[Eviction] | None = None, over: int = 0, reserved: int = 0
) -> None:
    _render_evictions(evicted or [])
    freed = report.bytes_freed + sum(e.bytes_freed for e in evicted or [])  # (evictions free theirs first)
    out.print(
        f"freed {format_bytes(freed)}: "
        + (f"{count(len(evicted), 'eviction')}, " if evicted else "")
        + f"{count(report.blobs_removed, 'blob')}, {count(report.partials_removed, 'partial file')}, "
        f"{count(report.snapshots_removed, 'stale snapshot')}"
        + (f", {count(report.quarantined_removed, 'quarantined file')}" if report.quarantined_removed else "")
        + (
            f" ({_writes_and_downloads(report.kept_partials)} in progress left alone)"
            if report.kept_partials
            else ""
        )
        + (
            f"; {report.resumable_downloads} interrupted downloads kept for a resume (`gc --partials` drops them)"
            if report.resumable_downloads
            else ""
        )
    )
    if report.unknown_revisions:
        shown = ", ".join(report.unknown_revisions[:3]) + (" …" if len(report.unknown_revisions) > 3 else "")
        err.print(f"[yellow]warning:[/yellow] kept {count(len(report.unknown_revisions), 'revision')} the index does "
                  f"not know, whole in snapshots/ ({escape(shown)}), with their files: was an older index.db put "
                  "back? `modeldepot recover-index` takes them in. A removal killed midway under an older "
                  "modeldepot may have left one of a model removed on purpose: remove its folder, then gc")  # fmt: skip
    for problem in report.not_deleted[:5]:
        err.print(f"[red]not deleted:[/red] {escape(problem)}")
    if len(report.not_deleted) > 5:
        err.print(f"[red]not deleted:[/red] {len(report.not_deleted) - 5} more files")
    if over:
        writing = f", and the writes under way hold {format_bytes(reserved)}" if reserved else ""
        err.print(f"[yellow]warning:[/yellow] the store is still {format_bytes(over)} over the size asked for: the "
                  f"models pinned or in use keep it{writing} (`modeldepot pins`; unpin or remove models to go "
                  "further)")  # fmt: skip


def _budget_line(budget: BudgetStatus) -> str:
    if budget.max_bytes is None:
        return (
            "none (the store is read-only here)"
            if budget.read_only
            else "none (set one with `modeldepot budget 200GiB`)"
        )
    share = 100 * budget.used_bytes / budget.max_bytes if budget.max_bytes else 0.0
    if budget.store_max_size is None:
        source = "MODELDEPOT_MAX_SIZE, this command's alone"
    elif budget.process_max_bytes == budget.max_bytes:
        source = f"MODELDEPOT_MAX_SIZE, below the store's {budget.store_max_size}"
    else:
        source = f"the store's {budget.store_max_size}"
    shared = (f"; {format_bytes(budget.shared_bytes)} shared with files outside the store (an adopted Hugging "
              "Face cache, `import --link`) not counted: evicting them would free no disk"
              if budget.shared_bytes else "")  # fmt: skip
    held = (f"; {format_bytes(budget.reserved_bytes)} more held for writes under way until they publish "
            "(counted: a write that would not fit beside them is refused)" if budget.reserved_bytes else "")  # fmt: skip
    return (f"{format_bytes(budget.used_bytes)} of {format_bytes(budget.max_bytes)} ({source}; {share:.0f}% used)"
            f"{held}; {format_bytes(budget.in_use_bytes)} kept from eviction (pinned or in use), of which "
            f"{format_bytes(budget.pinned_bytes)} pinned{shared}")  # fmt: skip


def _render_evictions(
    evicted: list[Eviction], verb: str = "evicted", most: int | None = None, console: Console = out
) -> None:
    """One line per eviction (the first ``most`` of them, and how many more)."""
    for eviction in evicted[:most]:
        what = f"{eviction.repo_id}@{eviction.commit_id[:12]}" + (
            f" {eviction.variant}" if eviction.variant else ""
        )
        linked = (f"; {format_bytes(eviction.bytes_still_linked)} more stay on disk, linked outside the store"
                  if eviction.bytes_still_linked else "")  # fmt: skip
        console.print(f"{verb} {escape(what)} ({format_bytes(eviction.bytes_freed)}, last used "
                      f"{_when(eviction.last_used)}{linked})")  # fmt: skip
    if most is not None and len(evicted) > most:
        console.print(f"... and {count(len(evicted) - most, 'eviction')} more")


def eviction_line(eviction: Eviction) -> str:
    """When an eviction was, what went and what it made room for: ``2026-12-06 16:30 acme/x@3f2a… (Q8_0),
    20.0 MiB, last used 2026-11-02 09:12, for pulling acme/y``."""
    what = f"{eviction.repo_id}@{eviction.commit_id[:12]}" + (
        f" ({eviction.variant})" if eviction.variant else ""
    )
    linked = (
        f" (+{format_bytes(eviction.bytes_still_linked)} linked outside)"
        if eviction.bytes_still_linked
        else ""
    )
    why = f", for {eviction.doing}" if eviction.doing else ""
    return (f"{_when(eviction.at)} {what}, {format_bytes(eviction.bytes_freed)}{linked}, last used "
            f"{_when(eviction.last_used)}{why}")  # fmt: skip


def render_evictions_at_start(evicted: list[Eviction], limit: int | None) -> None:
    """What a node evicted as it started, the store being over its disk budget (on stderr, with its log:
    before the log is set up, the budget's own lines were lost, and models went without a word)."""
    if not evicted:
        return
    err.print(f"the store was over its disk budget of {format_bytes(limit or 0)}: "
              f"{count(len(evicted), 'eviction')} freed {format_bytes(sum(e.bytes_freed for e in evicted))}")  # fmt: skip
    _render_evictions(evicted, console=err)


def render_planned_evictions(
    planned: list[Eviction], limit: int, used: int, most: int | None = None, reserved: int = 0
) -> None:
    """What a budget of ``limit`` bytes would evict from a store whose blobs take ``used``, beside the room
    ``reserved`` that writes under way hold (counted by the eviction: a dry run that left it out said "nothing
    would be evicted" beside a pull, and the budget then evicted a model, a trial)."""
    writes = f" and writes under way hold {format_bytes(reserved)} more" if reserved else ""
    if used + reserved <= limit and not planned:
        out.print(f"the store takes {format_bytes(used)}{writes}, within {format_bytes(limit)}: nothing would be "
                  "evicted")  # fmt: skip
        return
    if writes:
        out.print(f"the store takes {format_bytes(used)}{writes}, over {format_bytes(limit)}")
    _render_evictions(planned, "would evict", most)
    freed = sum(e.bytes_freed for e in planned)
    # (blobs an export links from a Hugging Face cache too leave the budget with their model, though not the
    # disk: left out, the preview said the budget stayed over, "as what is pinned or in use stays", with
    # nothing pinned, an explorer's trial)
    unlinked = sum(e.bytes_still_linked for e in planned)
    left = used + reserved - freed - unlinked
    linked = (f" ({format_bytes(unlinked)} more would leave the budget, staying on disk linked outside the store)"
              if unlinked else "")  # fmt: skip
    out.print(f"{count(len(planned), 'eviction')} would free {format_bytes(freed)}{linked}: the store would take "
              f"{format_bytes(left)} of {format_bytes(limit)}"
              + (f", {format_bytes(left - limit)} over it, as what is pinned or in use stays" if left > limit
                 else ""))  # fmt: skip


def _outside_the_budget(usage: DiskUsage | None, budget: BudgetStatus) -> str:
    """What the budget does not count: downloads kept for a resume, what killed writes left (a node said "60%
    of 100 MiB used" taking 462 MiB: a trial), each with what frees it (what killed writes left was sent to
    `gc --partials`, which also throws away the downloads a resume takes, where a plain gc frees it: an
    explorer's trial). Writes under way are counted by the room they hold (their files were said "not
    counted", and freed by `gc --partials`, which leaves them alone: a trial)."""
    if usage is None:
        return ""
    parts = []
    if usage.partial_bytes:
        under_way = ", those under way in the room held for them" if budget.reserved_bytes else ""
        parts.append(f"{format_bytes(usage.partial_bytes)} of downloads{under_way} (kept for a resume once "
                     "stopped: `modeldepot gc --partials` frees them)")  # fmt: skip
    if usage.unfinished_write_bytes:
        parts.append(
            f"{format_bytes(usage.unfinished_write_bytes)} left by killed writes (`modeldepot gc` frees it)"
        )
    return f"; beside it, not counted: {', '.join(parts)}" if parts else ""


def render_budget(
    budget: BudgetStatus, evicted: list[Eviction], over: int, usage: DiskUsage | None = None,
    recent: list[Eviction] | None = None,
) -> None:  # fmt: skip
    _render_evictions(evicted)
    out.print(f"budget  {_budget_line(budget)}{_outside_the_budget(usage, budget)}")
    out.print(
        f"evicted {format_bytes(budget.evicted_bytes)} so far, in {count(budget.evictions, 'eviction')}"
        + (", the latest:" if recent else "")
    )
    for eviction in recent or []:
        out.print(f"  {escape(eviction_line(eviction))}")
    if over:
        # (the room writes under way hold is named too: a budget set below a pull's own size said "in use (0 B)"
        # of what kept it over, an explorer's trial)
        writing = (f", nor the room held for the downloads and writes under way ({format_bytes(budget.reserved_bytes)})"
                   if budget.reserved_bytes else "")  # fmt: skip
        err.print(f"[yellow]warning:[/yellow] the store is {format_bytes(over)} over its budget: what is pinned or in "
                  f"use ({format_bytes(budget.in_use_bytes)}) is never evicted{writing}, and the next import, pull or "
                  "node start (`modeldepot serve`) evicts the least recently used of the rest (`modeldepot gc "
                  "--max-size SIZE` does it now)")  # fmt: skip


def render_du(usage: DiskUsage, budget: BudgetStatus | None = None) -> None:
    saved = usage.logical_bytes - usage.blob_bytes
    out.print(
        f"store {escape(str(usage.home))}" + (" (read-only here: served as it is)" if usage.read_only else "")
    )
    out.print(
        f"  blobs       {format_bytes(usage.blob_bytes)} in {usage.blobs} blobs "
        f"(files add up to {format_bytes(usage.logical_bytes)}; deduplication saves {format_bytes(max(saved, 0))})"
    )
    if usage.linked_bytes:
        out.print(f"              {format_bytes(usage.linked_bytes)} of them hard-linked from elsewhere too (a Hugging "
                  "Face cache, an `import --link` folder): on the disk once, and not freed by rm or gc")  # fmt: skip
    # (received: a pull under way was said "kept for a resume", as if it had stopped; an explorer's trial)
    kept = (f" (room for whole files; {format_bytes(usage.partial_kept_bytes)} received, which a pull that stops "
            "keeps for its resume)" if usage.partial_kept_bytes else "")  # fmt: skip
    out.print(f"  partial     {format_bytes(usage.partial_bytes)}{kept}")
    if usage.unfinished_write_bytes:
        out.print(f"  unfinished  {format_bytes(usage.unfinished_write_bytes)} (what killed imports or pulls were "
                  "writing: no resume takes it, `modeldepot gc` frees it)")  # fmt: skip
    if usage.writing_bytes:
        out.print(
            f"  writing     {format_bytes(usage.writing_bytes)} (imports under way: blobs once they end)"
        )
    out.print(f"  quarantine  {format_bytes(usage.quarantine_bytes)}")
    out.print(f"  index       {format_bytes(usage.index_bytes)}")
    if usage.reserve_bytes:
        out.print(f"  reserve     {format_bytes(usage.reserve_bytes)} (kept free beside the index, so that rm and gc "
                  "work on a full disk)")  # fmt: skip
    out.print(f"  total       {format_bytes(usage.total_bytes)}")
    if usage.removed_held_bytes:
        held_by = usage.removed_held_by
        out.print(f"  removed     {format_bytes(usage.removed_held_bytes)} more, of files removed from the store, stay on "
                  f"disk while {'process' if len(held_by) == 1 else 'processes'} {_processes(held_by)} still "
                  f"{'maps or holds' if len(held_by) == 1 else 'map or hold'} them open (freed once "
                  f"{'it lets' if len(held_by) == 1 else 'they let'} go)")  # fmt: skip
    if budget is not None:
        out.print(f"  budget      {_budget_line(budget)}{_outside_the_budget(usage, budget)}")
        out.print(
            f"  evicted     {format_bytes(budget.evicted_bytes)} so far, in {count(budget.evictions, 'eviction')}"
        )
    if usage.repos:
        table = _table("repo", "revisions", "files", "size", "only here")
        for repo in usage.repos:
            table.add_row(
                repo.repo_id,
                str(repo.revisions),
                str(repo.files),
                format_bytes(repo.logical_bytes),
                format_bytes(repo.unique_bytes),
            )
        out.print(table)


def render_pins(pins: list[Pin]) -> None:
    if not pins:
        out.print("Nothing is pinned (`modeldepot pin REPO` keeps a model from eviction).")
        return
    table = _table("repo", "variant", "revision", "since")
    for pin in pins:
        table.add_row(pin.repo_id, pin.quant or "-", pin.revision, _when(pin.created_at))
    out.print(table)


def render_stats(rows: list[dict[str, Any]], budget: int) -> None:
    if not rows:
        out.print("No model has been used yet (get_file, open_file and load count uses), and none is in RAM.")
        return
    table = _table("model", "variant", "uses", "last use", "size", "in RAM")
    unknown = False
    for row in rows:
        in_ram = row["resident_bytes"]
        if in_ram is None:
            unknown, shown = True, "unknown"
        else:
            share = f" ({100 * in_ram / row['bytes']:.0f}%)" if row["bytes"] else ""
            shown = format_bytes(in_ram) + share
        table.add_row(row["repo_id"], row["variant"] or "-", str(row["count"]), _when(row["last_access"]),
                      format_bytes(row["bytes"]), shown)  # fmt: skip
    out.print(table)
    if unknown:
        out.print(
            "in RAM unknown: the kernel shows the page cache of a file only to its owner or a user who may "
            "write it (these blobs are another user's)"
        )
    out.print(f"preload budget {format_bytes(budget)}")


MANY_MANIFESTS = 50  # repos from which `status` says one line each, not each one's table of variants


def render_manifests_summary(manifests: Sequence[Manifest]) -> None:
    """One line per repo: its revision, commit, and how many variants stand how (a table of variants for each
    of 3,000 repos took 5 s, an explorer's trial)."""
    rows = []
    for manifest in manifests:
        states: dict[str, int] = {}
        for variant in manifest.variants:
            states[variant.status] = states.get(variant.status, 0) + 1
        said = ", ".join(f"{number} {state}" for state, number in sorted(states.items())) or "no variants"
        rows.append((manifest.repo_id, manifest.revision, manifest.commit_id[:12], said))
    _print_rows(("repo", "revision", "commit", "variants"), rows)
    out.print(
        f"{count(len(manifests), 'repo')}: `modeldepot status REPO` shows one's variants, files and downloads"
    )


def render_manifest(manifest: Manifest, evicted: Sequence[Eviction] = ()) -> None:
    """A scanned repo's variants and their status; ``evicted``: the repo's latest evictions (newest first), to
    say of a variant that went for the budget when (it read "available", as if never pulled: a trial)."""
    out.print(
        f"[bold]{manifest.repo_id}[/bold]@{manifest.revision} → commit {manifest.commit_id[:12]} on {manifest.endpoint}"
        + (f"  ({manifest.pipeline_tag})" if manifest.pipeline_tag else "")
        + (f"  [yellow]gated: {manifest.gated}[/yellow]" if manifest.gated else "")
    )
    if not manifest.variants:
        out.print("no quantization variants found (ONNX, GGUF or safetensors weights)")
    else:
        table = _table("variant", "kind", "files", "size", "status")
        for variant in manifest.variants:
            status = variant.status
            if variant.status == "downloading" and variant.total_bytes:
                status += f" {100 * variant.bytes_done / variant.total_bytes:.0f}%"
            if variant.error:
                status += f" ({variant.error})"
            if variant.status == "available" and manifest.endpoint == IMPORTED_ENDPOINT:
                # (no upstream to pull it from: a pull would ask the Hub for another repo of that name)
                status = "not held here (imported: import it again to have it)"
            elif variant.status == "available" and variant.bytes_done:
                status += f" ({format_bytes(variant.bytes_done)} of it here: a pull takes the rest)"
            elif variant.held_commit:
                status += f" (held whole at {variant.held_commit[:12]} here: a pull updates it)"
            # (a download stopped before a byte landed keeps nothing: "resumable: 0 B kept" of a mirror killed
            # as its pulls began read as something to resume, an explorer's trial)
            if variant.resumable and variant.bytes_done:
                status += f" [cyan]resumable: {format_bytes(variant.bytes_done)} kept[/cyan]"
            went = next((e for e in evicted if e.commit_id == manifest.commit_id
                         and (e.variant is None or e.variant.lower() == variant.name.lower())), None)  # fmt: skip
            if went is not None and variant.status == "available" and not variant.bytes_done:
                status += f" [yellow](evicted {_when(went.at)} for the disk budget)[/yellow]"
            table.add_row(variant.name, variant.kind, str(len(variant.files) + len(manifest.shared)),
                          format_bytes(variant.total_bytes), status)  # fmt: skip
        out.print(table)
    shared_bytes = sum(f.size for f in manifest.files if f.path in set(manifest.shared))
    out.print(
        f"shared by every variant: {count(len(manifest.shared), 'file')} ({format_bytes(shared_bytes)})"
    )
    if manifest.other:
        kept = (
            f"; {format_bytes(manifest.other_kept_bytes)} of the rest kept for a resume"
            if manifest.other_kept_bytes
            else ""
        )
        out.print(f"other files (in no variant: a pull of the whole repo takes them), {len(manifest.other_held)} of "
                  f"{len(manifest.other)} here{kept}: {', '.join(manifest.other[:8])}"
                  + (" …" if len(manifest.other) > 8 else ""))  # fmt: skip


def render_peers(rows: list[PeerRow], status: str) -> None:
    """The fleet's live nodes; ``status`` says how the view stands (connected to the registry or not)."""
    if not rows:
        out.print(f"No live node in the fleet ({status}).")
        return
    table = _table("node", "url", "version", "started", "last seen", "blobs", "held", "partial", "chunks")
    for row in rows:
        table.add_row(row.node_id, row.url, row.version or "-", _when(row.started_at) if row.started_at else "-",
                      _when(row.last_seen), str(row.blobs), format_bytes(row.bytes), str(row.partial),
                      format_bytes(row.chunk_size) if row.chunk_size else "-")  # fmt: skip
    out.print(table)
    out.print(f"{count(len(rows), 'live node')} ({status})")
    sizes: dict[int, int] = {}
    for row in rows:
        if row.chunk_size:
            sizes[row.chunk_size] = sizes.get(row.chunk_size, 0) + 1
    if len(sizes) > 1:  # (found mid-rollout as a doubled Hub bill: an explorer's trial)
        said = ", ".join(f"{format_bytes(size)}: {count(n, 'node')}" for size, n in sorted(sizes.items()))
        err.print(f"[yellow]warning:[/yellow] the nodes' stores use different chunk sizes ({said}): each size is a "
                  "swarm of its own, and the Hub sends a content once per size; the stores of one fleet need one "
                  "chunk size (MODELDEPOT_CHUNK_SIZE shapes new stores only)")  # fmt: skip
