"""``recover-index``: a damaged index made whole again from what SQLite can still read of it (a thin shell over
:mod:`modeldepot.store.salvage`). It opens no depot: the index it would open is the damaged one."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click
from rich.markup import escape

from modeldepot.cli import cli, render
from modeldepot.cli.options import EXIT_FAILURE, json_option
from modeldepot.config import default_home
from modeldepot.errors import DepotError


@cli.command("recover-index")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Store folder (default: $MODELDEPOT_HOME, else $XDG_CACHE_HOME/modeldepot, else "
                   "~/.cache/modeldepot).")  # fmt: skip
@json_option
def recover_index_command(home: Path | None, as_json: bool) -> None:
    """Make a damaged index whole again from what SQLite can still read of it.

    The damaged index.db (and its log) is kept beside it, as index.db.damaged-TIME; every row still readable
    goes into a new index, checked before it takes the old one's place; a snapshot folder whose revision lost
    files in it is imported again (nothing is fetched). Stop every process using the store first. Then run
    `modeldepot verify`."""
    from modeldepot.recovery import recover_index

    folder = Path(home).expanduser() if home is not None else default_home()
    try:
        recovery = recover_index(folder)
    except (DepotError, OSError) as error:
        render.err.print(f"[red]error:[/red] {escape(str(error))}")
        sys.exit(EXIT_FAILURE)
    report = recovery.salvaged
    body = {"kept_at": str(report.kept_at), "rows": report.rows, "damaged_tables": report.damaged_tables,
            "lost_indexes": report.lost_indexes,
            "taken_in": [dataclasses.asdict(taken) for taken in recovery.taken_in]}  # fmt: skip

    def said() -> None:
        rows = sum(report.rows.values())
        render.out.print(f"recovered the index of {escape(str(folder))}: {rows:,} rows in "
                         f"{render.count(len(report.rows), 'table')}; the damaged one is kept at "
                         f"{escape(str(report.kept_at))}")  # fmt: skip
        for table, why in report.damaged_tables.items():
            render.err.print(f"[yellow]{escape(table)}[/yellow]: read in part ({escape(why)}): "
                             f"{report.rows.get(table, 0):,} rows kept")  # fmt: skip
        for lost in report.lost_indexes:
            render.err.print(f"[yellow]index not rebuilt[/yellow]: {escape(lost)}")
        for taken in recovery.taken_in:
            if taken.error:
                render.err.print(f"[red]{escape(taken.repo_id)}@{taken.was_commit[:12]}[/red]: its snapshot folder "
                                 f"could not be imported again: {escape(taken.error)}")  # fmt: skip
            else:
                render.out.print(f"{escape(taken.repo_id)}@{taken.was_commit[:12]}: the index had lost its files; "
                                 f"imported again from its snapshot folder ({render.count(taken.files, 'file')}) as "
                                 f"{escape(taken.revision)} → {taken.commit_id[:12]}")  # fmt: skip
        render.out.print("now run `modeldepot verify`: it checks every file the index names")

    render.emit(as_json, body, said)
