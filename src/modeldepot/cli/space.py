"""Disk space: ``gc``, ``du``, the store's disk budget (``budget``) and what it never evicts (``pin``,
``unpin``, ``pins``): a thin shell over :class:`~modeldepot.Depot` and :mod:`modeldepot.store.budget`."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click
from rich.markup import escape

from modeldepot.cli import cli, render
from modeldepot.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    NumbersAreArguments,
    home_option_creating_when,
    json_option,
    max_size_value,
    reading_home_option,
    repo_argument,
    revision_option,
)
from modeldepot.depot import Depot

if TYPE_CHECKING:
    from modeldepot.store.budget import BudgetStatus, Eviction

RECENT_EVICTIONS = 5  # the latest evictions `budget` lists, with when and for what


@cli.command("gc")
@click.option("--partials", is_flag=True, help="Also drop interrupted downloads kept for a resume.")
@click.option("--max-size", default=None, metavar="SIZE|N%", callback=lambda c, p, v: max_size_value(v),
              help="Also evict the least recently used revisions and variants until the blobs take at most this "
                   "(200GiB, or 80% of the disk); never what is pinned or in use.")  # fmt: skip
@json_option
@reading_home_option
def gc_command(depot: Depot, partials: bool, max_size: str | None, as_json: bool) -> None:
    """Delete unreferenced blobs, abandoned partial files, stale snapshots and quarantined files.

    Interrupted downloads stay (a later pull resumes them) unless --partials is given or they sat
    untouched for a week."""
    evicted = depot.shrink(max_size) if max_size is not None else []
    report = depot.gc(partials=partials)
    over, reserved = 0, 0
    if max_size is not None:  # (what pins, uses and the writes under way keep above the size asked for)
        from modeldepot.store.budget import parse_max_size

        status = depot.budget_status()
        over, reserved = _over(status, parse_max_size(max_size, depot.home)), status.reserved_bytes
    body = {**report.to_dict(), "evicted": [e.to_dict() for e in evicted],
            "evicted_bytes": sum(e.bytes_freed for e in evicted), "over_max_size_bytes": over}  # fmt: skip
    render.emit(as_json, body, lambda: render.render_gc(report, evicted, over, reserved))
    # (gc did the rest: said above, and in the exit status; a size asked for and not reached is a failure too:
    # a cron job's `gc --max-size 100GiB || alert` never fired, an explorer's trial)
    if report.not_deleted or over:
        sys.exit(EXIT_FAILURE)


@cli.command("du")
@json_option
@reading_home_option
def du_command(depot: Depot, as_json: bool) -> None:
    """Show how much disk the store uses, how much deduplication saves, and the disk budget."""
    usage, budget = depot.du(), depot.budget_status()
    body = {**usage.to_dict(), "total_bytes": usage.total_bytes, "budget": budget.to_dict()}
    render.emit(as_json, body, lambda: render.render_du(usage, budget))


@cli.command("budget", cls=NumbersAreArguments)
@click.argument("size", required=False, metavar="[SIZE|N%|none]",
                callback=lambda c, p, v: v if v is None or v.strip().lower() == "none" else max_size_value(v))  # fmt: skip
@click.option("--yes", "-y", is_flag=True, help="Evict without asking when the store is over the new budget.")
@click.option("--dry-run", "-n", is_flag=True,
              help="Show what the budget would evict now, in order, and change nothing.")  # fmt: skip
@json_option
@home_option_creating_when(
    lambda kwargs: (kwargs.get("size") or "none").strip().lower() != "none" and not kwargs.get("dry_run")
)
def budget_command(depot: Depot, size: str | None, yes: bool, dry_run: bool, as_json: bool) -> None:
    """Show the store's disk budget, or set it to SIZE (200GiB, or 80% of the disk; none: no budget).

    The budget is kept with the store: every process on it (a node, a pull beside it) keeps to it, from its
    next write. Setting it below what the store holds evicts the least recently used revisions (and variants) until the
    store is within it (asked first; --yes does not ask), never what is pinned or in use.
    MODELDEPOT_MAX_SIZE caps one process further."""
    if dry_run:
        _plan_budget(depot, size, as_json)
        return
    evicted: list[Eviction] = []
    if size is not None:
        chosen = None if size.strip().lower() == "none" else size
        depot.check_writable("a disk budget")  # (before asking what could not be done)
        if chosen is not None and not yes:
            confirm_evictions(depot, chosen)
        evicted = depot.set_max_size(chosen)
        _warn_if_beyond_the_disk(depot)
    status, usage = depot.budget_status(), depot.du()
    over = _over(status, status.max_bytes) if status.max_bytes is not None else 0
    recent = depot.evictions(limit=RECENT_EVICTIONS)  # (what went lately, and for what: an explorer's trial)
    body = {**status.to_dict(), "evicted": [e.to_dict() for e in evicted], "over_budget_bytes": over,
            "uncounted_bytes": usage.partial_bytes + usage.unfinished_write_bytes,
            "recent_evictions": [e.to_dict() for e in recent]}  # fmt: skip
    render.emit(as_json, body, lambda: render.render_budget(status, evicted, over, usage, recent))


def _over(status: BudgetStatus, limit: int) -> int:
    """How far over ``limit`` the store is, counting the room the writes under way hold, as the evictions
    count it (left out, a budget set below a running pull's size evicted every other model, then said the
    store was within it: 0 B over, and the pull landed 75% over; an explorer's trial)."""
    return max(0, status.used_bytes + status.reserved_bytes - limit)


def _plan_budget(depot: Depot, size: str | None, as_json: bool) -> None:
    """``budget [SIZE] --dry-run``: what the budget (SIZE, or the one in force) would evict now."""
    from modeldepot.store.budget import parse_max_size

    if size is not None and size.strip().lower() == "none":
        render.err.print(
            "[red]error:[/red] a budget of none evicts nothing: give the size to try, like 200GiB"
        )
        sys.exit(EXIT_BAD_INPUT)
    limit = depot.budget_status().max_bytes if size is None else parse_max_size(size, depot.home)
    if limit is None:
        render.err.print("[red]error:[/red] the store has no disk budget: give the size to try, like "
                         "`modeldepot budget 200GiB --dry-run`")  # fmt: skip
        sys.exit(EXIT_BAD_INPUT)
    status = depot.budget_status()
    planned = depot.plan_shrink(limit)
    body = {"dry_run": True, "max_bytes": limit, "used_bytes": status.used_bytes,
            "reserved_bytes": status.reserved_bytes, "would_evict": [e.to_dict() for e in planned],
            "would_free_bytes": sum(e.bytes_freed for e in planned),
            "would_take_bytes": status.used_bytes + status.reserved_bytes
            - sum(e.bytes_freed + e.bytes_still_linked for e in planned)}  # fmt: skip
    render.emit(as_json, body, lambda: render.render_planned_evictions(planned, limit, status.used_bytes,
                                                                      reserved=status.reserved_bytes))  # fmt: skip


def _warn_if_beyond_the_disk(depot: Depot) -> None:
    """A budget larger than the disk never binds: `2048TiB` typed for `2048GiB` is an easy slip (accepted
    without a word, a trial)."""
    limit = depot.budget_status().max_bytes
    disk = os.statvfs(depot.home)
    size = disk.f_blocks * disk.f_frsize
    if limit is not None and limit > size:
        render.err.print(f"[yellow]warning:[/yellow] the budget, {render.format_bytes(limit)}, is more than the "
                         f"disk the store is on holds ({render.format_bytes(size)}): it never binds")  # fmt: skip


def confirm_evictions(depot: Depot, size: str, preview: str = "--dry-run") -> None:
    """Ask before a budget below what the store holds removes models (as `rm` asks); without a terminal,
    refuse (exit 2) unless --yes was given. ``preview``: how the user sees what would go (`serve` has no
    --dry-run of its own)."""
    from modeldepot.store.budget import parse_max_size

    limit, status = parse_max_size(size, depot.home), depot.budget_status()
    # (the room writes under way hold counts, as the eviction counts it: beside a pull, a budget the blobs
    # alone fitted evicted a model without asking, a trial)
    used, reserved = status.used_bytes, status.reserved_bytes
    planned = depot.plan_shrink(limit)
    if not planned:  # (over it by what is pinned or in use alone: nothing goes, nothing to ask, a review)
        return
    writes = f" and writes under way hold {render.format_bytes(reserved)} more" if reserved else ""
    what = (f"the store holds {render.format_bytes(used)}{writes}, over {render.format_bytes(limit)}: setting this budget "
            "removes the least recently used models (not the pinned ones, nor those in use) until it fits")  # fmt: skip
    after = used + reserved - sum(e.bytes_freed + e.bytes_still_linked for e in planned)
    if after > limit:
        # (they went for nothing: the store stayed over, and the model in use, let go of later, would have been
        # enough alone; said before the question, an explorer's trial)
        what += (f", but even then it takes {render.format_bytes(after)}: what is pinned or in use keeps it above "
                 "(the models removed would not bring it within; unpin, or stop what uses them, first)")  # fmt: skip
    if not sys.stdin.isatty():
        render.err.print(
            f"[red]error:[/red] {escape(what)}; pass --yes to do so ({escape(preview)} shows what would go)"
        )
        sys.exit(EXIT_BAD_INPUT)
    render.render_planned_evictions(planned, limit, used, most=20, reserved=reserved)
    click.confirm(f"{what[0].upper()}{what[1:]}. Go on?", abort=True, err=True)


@cli.command("pin")
@repo_argument
@click.option(
    "--quant",
    "-q",
    default=None,
    help="Pin this variant: it and the revision's shared files stay, its other variants may go.",
)
@revision_option
@json_option
@reading_home_option
def pin_command(depot: Depot, repo_id: str, quant: str | None, revision: str, as_json: bool) -> None:
    """Never evict this model to keep within the disk budget (`modeldepot budget`)."""
    pin = depot.pin(repo_id, quant, revision)
    render.emit(as_json, pin.to_dict(), lambda: render.out.print(
        f"pinned {pin.repo_id}{f' ({pin.quant})' if pin.quant else ''}@{pin.revision}"))  # fmt: skip


@cli.command("unpin")
@repo_argument
@click.option("--quant", "-q", default=None, help="The variant given to `pin`.")
@revision_option
@json_option
@reading_home_option
def unpin_command(depot: Depot, repo_id: str, quant: str | None, revision: str, as_json: bool) -> None:
    """Let the disk budget evict this model again."""
    removed = depot.unpin(repo_id, quant, revision)
    if not removed:
        depot.repo_info(repo_id)  # a repo the store does not hold: not found, as the control API says
    what = f"{repo_id}{f' ({quant})' if quant else ''}@{revision}"
    render.emit(as_json, {"unpinned": removed}, lambda: render.out.print(
        f"unpinned {what}" if removed else f"{what} was not pinned{_other_pins(depot, repo_id)}"))  # fmt: skip
    if not removed:
        sys.exit(EXIT_FAILURE)


def _other_pins(depot: Depot, repo_id: str) -> str:
    """The pins of ``repo_id`` an unpin did not name, as the commands that take them ("" when none)."""
    pins = depot.pins(repo_id)
    if not pins:
        return ""
    return "; its pins: " + ", ".join(
        f"`modeldepot unpin {p.repo_id}" + (f" --quant {p.quant}" if p.quant else "")
        + (f" -r {p.revision}" if p.revision != "main" else "") + "`"
        for p in pins
    )  # fmt: skip


@cli.command("pins")
@json_option
@reading_home_option
def pins_command(depot: Depot, as_json: bool) -> None:
    """List what is pinned."""
    pins = depot.pins()
    render.emit(as_json, [p.to_dict() for p in pins], lambda: render.render_pins(pins))
