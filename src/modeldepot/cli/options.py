"""What the commands share: the store's --home (a Depot opened, errors made messages and exit codes), the
options and arguments checked while the command line is parsed (before any store is opened), and the
settings the options replace."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource
from rich.markup import escape

from modeldepot.cli import render
from modeldepot.config import DepotConfig, default_home, validate_cluster, validate_cluster_prefix
from modeldepot.depot import Depot
from modeldepot.errors import (
    ConfigError,
    DepotError,
    InvalidInputError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SourceDirectoryError,
)
from modeldepot.store.layout import current_umask, keeps_the_group_out
from modeldepot.validation import validate_repo_id, validate_revision

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


# What an interrupted command says (Ctrl-C, SIGTERM), whenever it came: it may have come after a change was
# made ("run it again" sent a script's second `rm` to "not in the store", exit 1: a crash fuzzer's trial)
INTERRUPTED = (
    "interrupted: nothing was left half-written (each change it made is whole; what it had not reached is "
    "untouched): look before you run it again"
)


def exit_code_for(error: DepotError) -> int:
    return EXIT_BAD_INPUT if isinstance(error, (InvalidInputError, ConfigError)) else EXIT_FAILURE


def home_option(function: F) -> F:
    """Every command takes --home; errors from the library become a message and an exit code here."""
    return _with_home(function, creates=True)


def reading_home_option(function: F) -> F:
    """--home for a command that only reads or tidies: it never makes a store in a folder named by --home or
    ``MODELDEPOT_HOME`` (a mistyped path is an error, not a new, empty store). The default folder is still
    made on first use."""
    return _with_home(function, creates=False)


def home_option_creating_when(creates: Callable[[dict[str, Any]], bool]) -> Callable[[F], F]:
    """--home for a command that makes a store only when ``creates(its arguments)`` (`budget SIZE` does,
    `budget` alone only reads)."""
    return lambda function: _with_home(function, creates=creates)


def home_option_after(check: Callable[[dict[str, Any]], None], *, shared: bool = True) -> Callable[[F], F]:
    """--home for a command that makes a store once ``check(its arguments)`` passed (a DepotError: nothing
    is made; `serve` on a port in use). ``shared=False``: the command works on the store alone, whatever
    ``MODELDEPOT_SHARED`` says (`serve`: a node serves its own store)."""
    return lambda function: _with_home(function, creates=True, check=check, shared=shared)


def _remove_if_untouched(folder: Path) -> None:
    """Remove the store a failed command made at ``folder`` when nothing was kept in it (no repo, scan, blob,
    download, nor note of a shared store's blob found corrupt) and no other process has it open (its index's log
    files are gone with the last connection): a pull of a mistyped repo, or an `hf-cache import` of a folder
    that is not a cache, left an empty store where a mistyped --home named, and the next read there took it
    for the user's. (A new user's first `cat` that found a shared blob corrupt lost the note with the store,
    and the next pull took the rotten copy for held.)"""
    import shutil
    import sqlite3

    index = folder / "index.db"
    if any((folder / name).exists() for name in ("index.db-wal", "index.db-shm")):
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{index.absolute().as_uri()}?mode=ro", uri=True)) as con:
            kept = sum(con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                       for table in ("repos", "manifests", "blobs"))  # fmt: skip
    except sqlite3.Error:
        return
    from modeldepot.tiers import REFUSED_FOLDER

    if kept or any(p.is_file() for name in ("partials", REFUSED_FOLDER) for p in (folder / name).glob("*")):
        return
    shutil.rmtree(folder, ignore_errors=True)


_UMASK_BEFORE: int | None = None  # the user's umask, when this command widened it for a store a group shares


def own_umask() -> None:
    """Put the user's own umask back (a command about to write outside the store: `hf-cache export` into the
    user's Hugging Face cache made it group-writable, a review)."""
    if _UMASK_BEFORE is not None:
        os.umask(_UMASK_BEFORE)


def _with_home(function: F, *, creates: bool | Callable[[dict[str, Any]], bool],
               check: Callable[[dict[str, Any]], None] | None = None, shared: bool = True) -> F:  # fmt: skip
    @click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Store folder (default: $MODELDEPOT_HOME, else $XDG_CACHE_HOME/modeldepot, else ~/.cache/modeldepot).",
    )
    @wraps(function)
    def wrapper(*args: Any, home: Path | None, **kwargs: Any) -> Any:
        named = home is not None or bool(os.environ.get("MODELDEPOT_HOME"))
        making = creates(kwargs) if callable(creates) else creates
        # A user's own store under shared ones is made by the first command, a read too (the shared stores'
        # models are read through it, before anything was pulled into it), and said: a mistyped folder shows
        # as a store made where none was meant
        if not making and named and shared and os.environ.get("MODELDEPOT_SHARED", "").strip():
            folder = Path(home or os.environ["MODELDEPOT_HOME"]).expanduser()
            if not (folder / "index.db").exists():
                making = True
                render.err.print(f"[yellow]note:[/yellow] no store at {escape(str(folder))} yet: made one, your own, to read "
                                 "the MODELDEPOT_SHARED stores through (check its name if you meant another)")  # fmt: skip
        folder = Path(home).expanduser() if home is not None else default_home()
        # (a store this command makes: gone again if the command fails having kept nothing in it)
        fresh = not folder.exists()
        if keeps_the_group_out(folder):
            # A store a group shares needs every member's umask 002: one member's 022 (most systems' default,
            # systemd's) made files the others could not remove, and their rm, gc and pulls failed (an
            # explorer's trial); 077, folders they could not enter. Set before any thread starts; a command
            # that writes outside the store puts the user's own back for that (own_umask).
            global _UMASK_BEFORE
            _UMASK_BEFORE = os.umask(current_umask() & ~0o070)
        try:
            if check is not None:
                check({**kwargs, "home": home})
            if not shared and os.environ.get("MODELDEPOT_SHARED", "").strip():
                render.err.print("[yellow]note:[/yellow] MODELDEPOT_SHARED is not read here: a node serves its own "
                                 "store (serve the shared one from a node of its own, and name it in "
                                 "MODELDEPOT_SERVERS)")  # fmt: skip
            with Depot(home, create=making or not named, shared=None if shared else ()) as depot:
                try:
                    return function(depot, *args, **kwargs)
                except RepoNotFoundError as error:
                    raise _said_if_evicted(depot, error) from None
                except RevisionNotFoundError as error:
                    raise _near_revisions(depot, error) from None
        except DepotError as error:
            if fresh:
                _remove_if_untouched(folder)
            render.err.print(f"[red]error:[/red] {escape(str(error))}")
            sys.exit(exit_code_for(error))
        except KeyboardInterrupt:  # (a pull says more: it keeps its chunks)
            # (the store, or a Hugging Face cache an export writes: each name appears whole, or not at all)
            # (it may have come after the change was made: "run it again" sent a script's `rm` to "not in the
            # store", exit 1, a crash fuzzer's trial)
            render.err.print(INTERRUPTED)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


def _said_if_evicted(depot: Depot, error: RepoNotFoundError) -> RepoNotFoundError:
    """A repo the store lacks because the disk budget evicted it is said so, with when and for what, and what
    brings it back: it was "not in the store", as if never pulled (an explorer's trial)."""
    if error.source is not None:  # (an upstream's "not found": nothing the store knows of)
        return error
    try:
        latest = depot.evictions(error.repo_id, limit=1)
    except DepotError:
        return error
    if not latest:
        return _near_repos(depot, error)
    went = latest[0]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(went.at))
    why = f" ({went.doing})" if went.doing else ""
    # (an imported repo is the operator's own: a pull would ask the Hub for another repo of its name)
    back = ("importing its folder again brings it back" if went.origin == "import"
            else f"`modeldepot pull {went.repo_id}` brings it back")  # fmt: skip
    return RepoNotFoundError(went.repo_id, f"repo {went.repo_id!r} is not in the store: the disk budget evicted it on "
                                            f"{when}{why}; {back}")  # fmt: skip


def _near_repos(depot: Depot, error: RepoNotFoundError) -> RepoNotFoundError:
    """A repo the store lacks said with the repos it holds that come closest (`acme/tiny-stt` for
    `acme/tiny-st`: "not in the store", with no word of the near miss, an explorer's trial)."""
    import difflib  # (here: `import modeldepot.cli` stays light, every command's start pays for it)

    if error.repo_id is None:
        return error
    held: dict[str, list[str]] = {}
    try:
        for repo in depot.list_repos():  # (two repos told apart by case alone: each named, a review)
            held.setdefault(repo.repo_id.lower(), []).append(repo.repo_id)
    except DepotError:
        return error
    close = difflib.get_close_matches(error.repo_id.lower(), held, n=3, cutoff=0.75)
    if not close:
        return error
    named = [repo_id for lower in close for repo_id in held[lower]][:3]
    return RepoNotFoundError(error.repo_id, f"{error}: did you mean {', '.join(map(repr, named))}?")


def _near_revisions(depot: Depot, error: RevisionNotFoundError) -> RevisionNotFoundError:
    """A branch or tag the store lacks said with the names of the repo's refs that come closest (`devv`,
    `mian`: "not in the store", an explorer's trial)."""
    import difflib

    if not error.in_store or error.repo_id is None:
        return error
    try:
        refs = list(depot.repo_info(error.repo_id).refs)
    except DepotError:
        return error
    close = difflib.get_close_matches(error.revision, refs, n=3, cutoff=0.6)
    if not close:
        return error
    return RevisionNotFoundError(error.repo_id, error.revision,
                                 f"{error}: did you mean {', '.join(map(repr, close))}?", in_store=True)  # fmt: skip


def upstream_urls_checked() -> None:
    """``HF_ENDPOINT`` and ``MODELDEPOT_SERVERS`` are URLs (else ConfigError, exit 2) before a store is made
    for a pull or a scan."""
    from modeldepot.config import DepotConfig
    from modeldepot.transfer.chain import check_upstream_urls

    check_upstream_urls(DepotConfig.from_env())


def a_folder(directory: Path, home: Path | None) -> None:
    """An import's folder is there (else SourceDirectoryError, exit 1), and is not where the store goes
    (``--home``, or ``MODELDEPOT_HOME``), before a store is made for it."""
    if not directory.is_dir():
        raise SourceDirectoryError(f"{directory} is not a directory: give the folder that holds the model")
    if os.path.realpath(DepotConfig.from_env(home=home).home) == os.path.realpath(directory):
        raise SourceDirectoryError(
            f"{directory} is the store's own folder (--home or MODELDEPOT_HOME): keep the store elsewhere"
        )
    try:
        with os.scandir(directory) as entries:
            empty = next(entries, None) is None
    except OSError as error:
        raise SourceDirectoryError(f"{directory} cannot be read: {error.strerror or error}") from None
    if empty:
        raise SourceDirectoryError(f"{directory} is empty: give the folder that holds the model")


def checked(validator: Callable[[str], str]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that validates a name while arguments are parsed, before any store is opened."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return validator(value)
        except InvalidInputError as error:
            render.err.print(f"[red]error:[/red] {escape(str(error))}")
            ctx.exit(EXIT_BAD_INPUT)

    return callback


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
revision_option = click.option(
    "--revision",
    "-r",
    default="main",
    show_default=True,
    callback=checked(validate_revision),
    help="Branch name or commit id (of what the store holds, its first 7 or more characters do).",
)
repo_argument = click.argument("repo_id", metavar="REPO", callback=checked(validate_repo_id))


def server_urls(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """A click callback: URLs from repeated or comma-separated values, checked before any store opens."""
    from modeldepot.discovery.base import validate_node_url

    urls = tuple(u.strip().rstrip("/") for item in values for u in item.split(",") if u.strip())
    for url in urls:
        try:
            validate_node_url(url)
        except InvalidInputError as error:
            raise click.BadParameter(str(error), ctx, param) from None
    return urls


def use_servers(depot: Depot, urls: tuple[str, ...]) -> None:
    """--server / --upstream replace MODELDEPOT_SERVERS for this command."""
    if urls:
        depot.config = dataclasses.replace(depot.config, servers=urls)


server_option = click.option(
    "--server",
    "servers",
    multiple=True,
    metavar="URL[,URL...]",
    callback=server_urls,
    help="Depot nodes to ask before the Hub (repeatable; replaces $MODELDEPOT_SERVERS).",
)


def cluster_options(function: F) -> F:
    """--cluster and --cluster-prefix, checked while arguments are parsed (they replace $MODELDEPOT_CLUSTER
    and $MODELDEPOT_CLUSTER_PREFIX for this command)."""
    function = click.option(
        "--cluster-prefix", default=None, metavar="PREFIX",
        callback=lambda c, p, v: None if v is None else setting(validate_cluster_prefix, v),
        help="The registry's key prefix (default: $MODELDEPOT_CLUSTER_PREFIX, else /modeldepot).",
    )(function)  # fmt: skip
    return click.option(
        "--cluster", default=None, metavar="etcd[s]://HOST:PORT[,HOST:PORT...]",
        callback=lambda c, p, v: None if v is None else setting(validate_cluster, v.strip()),
        help="The fleet's registry (default: $MODELDEPOT_CLUSTER): its live nodes are sources too. etcds://: "
        "over TLS ($MODELDEPOT_CLUSTER_CA, _CERT, _KEY).",
    )(function)  # fmt: skip


def use_cluster(depot: Depot, cluster: str | None, prefix: str | None) -> None:
    """--cluster / --cluster-prefix replace MODELDEPOT_CLUSTER / MODELDEPOT_CLUSTER_PREFIX for this command."""
    if cluster is not None:
        depot.config = dataclasses.replace(depot.config, cluster=cluster)
    if prefix is not None:
        depot.config = dataclasses.replace(depot.config, cluster_prefix=prefix)


def rate_value(value: str | None, name: str) -> int | None:
    """A click callback's reading of a rate (50MiB/s): ConfigError, a usage error, when unreadable; 0 for
    ``off`` (no cap, over the environment's); None when not given."""
    from modeldepot.config import NO_CAP, parse_rate

    if value is not None and value.strip().lower() == NO_CAP:
        return 0
    return None if value is None else setting(lambda v: parse_rate(v, name), value)


def use_rates(depot: Depot, download: int | None, upload: int | None = None) -> None:
    """The rate caps the options gave (0: none), over the environment's."""
    if download is not None:
        depot.config = dataclasses.replace(depot.config, max_download_rate=download or None)
    if upload is not None:
        depot.config = dataclasses.replace(depot.config, max_upload_rate=upload or None)


class NumbersAreArguments(click.Command):
    """A command whose argument is a size or a count: `budget -5GiB` is the argument `-5GiB` (refused as a
    size), not "no such option '-5'"."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" not in args:
            numbers = [arg for arg in args if _looks_like_a_number(arg)]
            if numbers:
                args = [arg for arg in args if not _looks_like_a_number(arg)] + ["--", *numbers]
        return super().parse_args(ctx, args)


def _looks_like_a_number(arg: str) -> bool:
    return len(arg) > 1 and arg[0] == "-" and (arg[1].isdigit() or arg[1] == ".")


def max_size_value(value: str | None) -> str | None:
    """A click callback's check of a disk budget (200GiB, 80%): ConfigError, a usage error, when unreadable."""
    if value is None:
        return None
    from modeldepot.config import typed_max_size

    setting(lambda v: typed_max_size(v, "/"), value)
    return value


class FromEnvironment(click.Option):
    """An option a variable sets too (``envvar``): a bad value the variable gave is named as the variable
    ("Invalid value for '--scrub-rate'" sent a user who typed no option looking for one, an explorer's trial)."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        if (
            ctx
            and self.name
            and self.envvar
            and ctx.get_parameter_source(self.name) is ParameterSource.ENVIRONMENT
        ):
            return f"{self.envvar} (which sets {super().get_error_hint(ctx)})"
        return super().get_error_hint(ctx)


def setting(parse: Callable[[str], T], text: str) -> T:
    """A click callback's conversion: a ConfigError becomes click's usage error (exit 2)."""
    try:
        return parse(text)
    except ConfigError as error:
        raise click.BadParameter(str(error)) from None
