"""``modeldepot hf-cache``: the Hugging Face cache, both ways (a thin shell over :mod:`modeldepot.hfcache`).

Exit codes as every command's: 0 ok, 1 when something was skipped (listed, with the reason) or failed,
2 bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape

from modeldepot.cli import render
from modeldepot.cli.options import (
    EXIT_FAILURE,
    checked,
    home_option,
    json_option,
    own_umask,
    reading_home_option,
    repo_argument,
    revision_option,
)
from modeldepot.depot import Depot
from modeldepot.validation import validate_repo_id

if TYPE_CHECKING:
    from modeldepot.hfcache import HfCacheExportResult, HfCacheImportResult, HfCacheProblem

__all__ = ["hf_cache"]


def _cache_dir(value: str | None) -> Path | None:
    if value is not None and not value.strip():  # (click's Path took "" for ".": the current folder)
        raise click.BadParameter(
            "the cache folder is empty: give a folder, or no --cache-dir for huggingface_hub's"
        )
    return None if value is None else Path(value)


_cache_dir_option = click.option(
    "--cache-dir",
    metavar="DIRECTORY",
    callback=lambda c, p, v: _cache_dir(v),
    default=None,
    help="The Hugging Face cache (default: huggingface_hub's: $HF_HUB_CACHE, else $HF_HOME/hub, else "
    "~/.cache/huggingface/hub).",
)
_copy_option = click.option(
    "--copy", is_flag=True, help="Copy every blob (default: hard links when on the same file system)."
)


def _repo_ids(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """A click callback: every REPO validated while arguments are parsed, before any store opens."""
    check = checked(validate_repo_id)
    return tuple(check(ctx, param, value) for value in values)


@click.group("hf-cache")
def hf_cache() -> None:
    """The Hugging Face cache, both ways: adopt its models (import), or make a repo appear in it (export)."""


@hf_cache.command("import")
@click.argument("repo_ids", metavar="[REPO]...", nargs=-1, callback=_repo_ids)
@_cache_dir_option
@_copy_option
@click.option(
    "--private", is_flag=True, help="Mark the adopted repos private (a private repo stays private)."
)
@json_option
@home_option
def import_command(
    depot: Depot, repo_ids: tuple[str, ...], cache_dir: Path | None, copy: bool, private: bool, as_json: bool
) -> None:
    """Adopt models from the Hugging Face cache (REPO..., or all).

    Every blob is checked against its name (SHA-256, or git blob id) and hard-linked into the store when
    the cache is on the store's file system (the cache's file becomes read-only, as the store's blobs are),
    else copied. Snapshots become revisions of the same commits, refs (main, refs/pr/1) the store's refs.
    A corrupt blob, an unfinished download, a link to a missing blob or out of the cache is reported and
    skipped, the rest imported; exit 1 when anything was skipped."""
    bar = render.ByteProgress("adopting")
    with bar.running():
        result = depot.hf_cache_import(
            list(repo_ids) or None,
            cache_dir=cache_dir,
            private=private,
            copy=copy,
            progress=lambda what, done, total: bar.update(done, total, what),
        )
    render.emit(as_json, result.to_dict(), lambda: _render_import(result))
    if not result.ok:
        sys.exit(EXIT_FAILURE)


@hf_cache.command("export")
@repo_argument
@revision_option
@_cache_dir_option
@_copy_option
@click.option("--move-ref", is_flag=True,
              help="Move the cache's refs/REVISION to the exported commit even when it names another snapshot "
                   "the cache holds (without it, that ref stays, and the export says so).")  # fmt: skip
@json_option
@reading_home_option
def export_command(
    depot: Depot,
    repo_id: str,
    revision: str,
    cache_dir: Path | None,
    copy: bool,
    move_ref: bool,
    as_json: bool,
) -> None:
    """Make REPO appear in the Hugging Face cache, as a download from the Hub would have left it.

    Blobs are hard links to the store's when on the same file system (else copies, each chunk checked),
    snapshot files relative links to them, and refs/REVISION names the commit when REVISION is a branch:
    hf_hub_download, snapshot_download and from_pretrained then find it with HF_HUB_OFFLINE=1."""
    own_umask()  # (the user's cache takes the user's umask, not the one a store a group shares wants)
    bar = render.ByteProgress("exporting")
    with bar.running():
        result = depot.hf_cache_export(
            repo_id,
            revision,
            cache_dir=cache_dir,
            copy=copy,
            progress=lambda what, done, total: bar.update(done, total, what),
            move_ref=move_ref,
        )
    render.emit(as_json, result.to_dict(), lambda: _render_export(result, copied_asked=copy))
    if not result.ok:
        sys.exit(EXIT_FAILURE)


def _render_problems(problems: tuple[HfCacheProblem, ...]) -> None:
    for problem in problems:
        said = "note" if _is_note(problem) else "skipped"
        render.err.print(
            f"[yellow]{said}[/yellow] {escape(problem.path)} ({problem.problem}): {escape(problem.detail)}"
        )


def _render_import(result: HfCacheImportResult) -> None:
    _render_problems(result.problems)
    if not result.repos:
        render.out.print(f"nothing adopted from {escape(str(result.cache_dir))}")
    for repo in result.repos:
        revisions = ", ".join(
            f"{r.commit_id[:12]}" + (f" ({', '.join(r.refs)})" if r.refs else "") for r in repo.revisions
        )
        render.out.print(
            f"adopted {repo.repo_id}: {render.count(len(repo.revisions), 'revision')} {escape(f'[{revisions}]')}, "
            f"{render.count(repo.blobs, 'blob')} "
            f"({repo.linked_blobs} hard-linked, {repo.copied_blobs} copied), {repo.new_blobs} new "
            f"({render.format_bytes(repo.new_bytes)})"
        )
    if not result.ok:
        skipped = sum(not _is_note(problem) for problem in result.problems)
        render.out.print(f"[yellow]{render.count(skipped, 'problem')}[/yellow]: those entries were skipped")


def _render_export(result: HfCacheExportResult, copied_asked: bool = False) -> None:
    _render_problems(result.problems)
    render.out.print(
        f"exported {result.repo_id}@{result.revision} → commit {result.commit_id[:12]}: "
        f"{render.count(result.files, 'file')}, "
        f"{render.format_bytes(result.bytes)} ({result.linked} hard-linked, {result.copied} copied, "
        f"{result.kept} already there)"
    )
    if result.copied and not copied_asked:
        # (every container's start copied each model whole from a read-only image, unsaid: an explorer's trial)
        render.err.print("[yellow]note:[/yellow] the copied blobs could not be hard-linked (another file system, "
                         "a read-only mount): they take their room twice; export into a cache on the store's file "
                         "system where it is written (an image's build step) to link them")  # fmt: skip
    render.out.print(f"snapshot: {escape(str(result.snapshot_path))}")
    if result.not_in_store:
        shown = ", ".join(result.not_in_store[:5]) + (" …" if len(result.not_in_store) > 5 else "")
        render.err.print(f"[yellow]warning:[/yellow] the commit has {len(result.not_in_store)} more files the store "
                         f"does not hold, so neither does the snapshot ({shown}): `modeldepot pull "
                         f"{result.repo_id} -r {result.commit_id}` takes them")  # fmt: skip


def _is_note(problem: HfCacheProblem) -> bool:
    from modeldepot.hfcache.cache import NOTES

    return problem.problem in NOTES
