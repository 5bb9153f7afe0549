"""The ``modeldepot`` command: a thin shell over :class:`modeldepot.Depot`.

Exit codes: 0 ok, 1 failure (including ``verify`` finding corruption), 2 bad input.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from modeldepot._version import __version__
from modeldepot.cli import render
from modeldepot.config import parse_duration, parse_size, validate_cluster, validate_cluster_prefix
from modeldepot.depot import Depot
from modeldepot.errors import ConfigError, DepotError, InvalidInputError, SourceDirectoryError
from modeldepot.validation import (
    validate_branch,
    validate_label,
    validate_path,
    validate_repo_id,
    validate_revision,
)

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


def exit_code_for(error: DepotError) -> int:
    return EXIT_BAD_INPUT if isinstance(error, (InvalidInputError, ConfigError)) else EXIT_FAILURE


def _home_option(function: F) -> F:
    """Every command takes --home; errors from the library become a message and an exit code here."""
    return _with_home(function, creates=True)


def _reading_home_option(function: F) -> F:
    """--home for a command that only reads or tidies: it never makes a store in a folder named by --home or
    ``MODELDEPOT_HOME`` (a mistyped path is an error, not a new, empty store). The default folder is still
    made on first use."""
    return _with_home(function, creates=False)


def _home_option_creating_when(creates: Callable[[dict[str, Any]], bool]) -> Callable[[F], F]:
    """--home for a command that makes a store only when ``creates(its arguments)`` (`budget SIZE` does,
    `budget` alone only reads)."""
    return lambda function: _with_home(function, creates=creates)


def _home_option_after(check: Callable[[dict[str, Any]], None], *, shared: bool = True) -> Callable[[F], F]:
    """--home for a command that makes a store once ``check(its arguments)`` passed (a DepotError: nothing
    is made; `serve` on a port in use). ``shared=False``: the command works on the store alone, whatever
    ``MODELDEPOT_SHARED`` says (`serve`: a node serves its own store)."""
    return lambda function: _with_home(function, creates=True, check=check, shared=shared)


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
                render.err.print(f"[yellow]note:[/yellow] no store at {folder} yet: made one, your own, to read "
                                 "the MODELDEPOT_SHARED stores through (check its name if you meant another)")  # fmt: skip
        try:
            if check is not None:
                check(kwargs)
            if not shared and os.environ.get("MODELDEPOT_SHARED", "").strip():
                render.err.print("[yellow]note:[/yellow] MODELDEPOT_SHARED is not read here: a node serves its own "
                                 "store (serve the shared one from a node of its own, and name it in "
                                 "MODELDEPOT_SERVERS)")  # fmt: skip
            with Depot(home, create=making or not named, shared=None if shared else ()) as depot:
                return function(depot, *args, **kwargs)
        except DepotError as error:
            render.err.print(f"[red]error:[/red] {error}")
            sys.exit(exit_code_for(error))
        except KeyboardInterrupt:  # (a pull says more: it keeps its chunks)
            render.err.print("interrupted: what was not finished is not in the store; run the command again")
            sys.exit(EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


def _listenable(host: str, port: int) -> None:
    """Whether ``serve`` may listen on host:port: tried before the store is opened (or made, in a mistyped
    --home), so that a port in use or an address not this machine's is said first. (The listen itself
    still says so, if the port is taken between.)"""
    if port == 0:
        return
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE):  # fmt: skip
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as the server binds: asyncio's
                if family == socket.AF_INET6:  # way, IPv6 apart from IPv4)
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as error:
        reason = (
            os.strerror(error.errno) if isinstance(error.errno, int) and error.errno > 0 else error.strerror
        )
        raise ConfigError(f"cannot listen on {host}:{port}: {reason or error}") from None


def _upstream_urls() -> None:
    """``HF_ENDPOINT`` and ``MODELDEPOT_SERVERS`` are URLs (else ConfigError, exit 2) before a store is made
    for a pull or a scan."""
    from modeldepot.config import DepotConfig
    from modeldepot.transfer.chain import check_upstream_urls

    check_upstream_urls(DepotConfig.from_env())


def _a_folder(directory: Path) -> None:
    """An import's folder is there (else SourceDirectoryError, exit 1) before a store is made for it."""
    if not directory.is_dir():
        raise SourceDirectoryError(f"{directory} is not a directory: give the folder that holds the model")
    try:
        with os.scandir(directory) as entries:
            empty = next(entries, None) is None
    except OSError as error:
        raise SourceDirectoryError(f"{directory} cannot be read: {error.strerror or error}") from None
    if empty:
        raise SourceDirectoryError(f"{directory} is empty: give the folder that holds the model")


def _checked(validator: Callable[[str], str]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that validates a name while arguments are parsed, before any store is opened."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return validator(value)
        except InvalidInputError as error:
            render.err.print(f"[red]error:[/red] {error}")
            ctx.exit(EXIT_BAD_INPUT)

    return callback


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
_revision_option = click.option(
    "--revision",
    "-r",
    default="main",
    show_default=True,
    callback=_checked(validate_revision),
    help="Branch name or commit id (of what the store holds, its first 7 or more characters do).",
)
_repo_argument = click.argument("repo_id", metavar="REPO", callback=_checked(validate_repo_id))


def _server_urls(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """A click callback: URLs from repeated or comma-separated values, checked before any store opens."""
    from modeldepot.discovery.base import validate_node_url

    urls = tuple(u.strip().rstrip("/") for item in values for u in item.split(",") if u.strip())
    for url in urls:
        try:
            validate_node_url(url)
        except InvalidInputError as error:
            raise click.BadParameter(str(error), ctx, param) from None
    return urls


def _use_servers(depot: Depot, urls: tuple[str, ...]) -> None:
    """--server / --upstream replace MODELDEPOT_SERVERS for this command."""
    if urls:
        depot.config = dataclasses.replace(depot.config, servers=urls)


_server_option = click.option(
    "--server",
    "servers",
    multiple=True,
    metavar="URL[,URL...]",
    callback=_server_urls,
    help="Depot nodes to ask before the Hub (repeatable; replaces $MODELDEPOT_SERVERS).",
)


def _cluster_options(function: F) -> F:
    """--cluster and --cluster-prefix, checked while arguments are parsed (they replace $MODELDEPOT_CLUSTER
    and $MODELDEPOT_CLUSTER_PREFIX for this command)."""
    function = click.option(
        "--cluster-prefix", default=None, metavar="PREFIX",
        callback=lambda c, p, v: None if v is None else _setting(validate_cluster_prefix, v),
        help="The registry's key prefix (default: $MODELDEPOT_CLUSTER_PREFIX, else /modeldepot).",
    )(function)  # fmt: skip
    return click.option(
        "--cluster", default=None, metavar="etcd://HOST:PORT[,HOST:PORT...]",
        callback=lambda c, p, v: None if v is None else _setting(validate_cluster, v.strip()),
        help="The fleet's registry (default: $MODELDEPOT_CLUSTER): its live nodes are sources too.",
    )(function)  # fmt: skip


def _use_cluster(depot: Depot, cluster: str | None, prefix: str | None) -> None:
    """--cluster / --cluster-prefix replace MODELDEPOT_CLUSTER / MODELDEPOT_CLUSTER_PREFIX for this command."""
    if cluster is not None:
        depot.config = dataclasses.replace(depot.config, cluster=cluster)
    if prefix is not None:
        depot.config = dataclasses.replace(depot.config, cluster_prefix=prefix)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modeldepot")
def cli() -> None:
    """modeldepot: a verified, deduplicated store for model repos (ONNX, GGUF, safetensors).

    MODELDEPOT_LOG_LEVEL (debug, info, warning: the default) sets what the commands log to stderr."""
    level = os.environ.get("MODELDEPOT_LOG_LEVEL")
    if level:
        import logging

        if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise click.UsageError(f"MODELDEPOT_LOG_LEVEL={level!r}: use debug, info, warning or error")
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command("import")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--repo",
    "repo_id",
    required=True,
    callback=_checked(validate_repo_id),
    help="Repo id to publish as, like ORG/NAME.",
)
@click.option(
    "--revision",
    "-r",
    default="main",
    show_default=True,
    callback=_checked(validate_branch),
    help="Branch to point at the import.",
)
@click.option("--private", is_flag=True, help="Mark the repo private (served only with the node token).")
@click.option(
    "--link",
    is_flag=True,
    help="Hard-link the files into the store instead of copying them (same file system, your own files; "
    "others are copied): no second copy. The files become read-only, as the store's blobs are.",
)
@_json_option
@_home_option_after(lambda kwargs: _a_folder(kwargs["directory"]))
def import_command(
    depot: Depot, directory: Path, repo_id: str, revision: str, private: bool, link: bool, as_json: bool
) -> None:
    """Publish the model folder DIRECTORY as repo ORG/NAME."""
    bar = render.ByteProgress("linking" if link else "importing")
    with bar.running():
        result = depot.import_dir(
            directory,
            repo_id,
            revision,
            private=private,
            progress=lambda path, done, total: bar.update(done, total, path),
            link=link,
        )
    if as_json:
        render.print_json(result.to_dict())
        return
    reused = result.bytes - result.new_bytes
    render.out.print(
        f"imported {result.repo_id}@{result.revision} → commit {result.commit_id[:12]}: "
        f"{result.files} file{'' if result.files == 1 else 's'}, "
        f"{render.format_bytes(result.bytes)} ({render.format_bytes(reused)} already in the store)"
    )
    if link:
        copied = result.new_bytes - result.linked_bytes
        render.out.print(f"linked {render.format_bytes(result.linked_bytes)}"
                         + (f"; copied {render.format_bytes(copied)} (another file system or another user's "
                            "files)" if copied else ""))  # fmt: skip
    render.out.print(f"snapshot: {result.snapshot_path}")


@cli.command("ls")
@_json_option
@_reading_home_option
def ls_command(depot: Depot, as_json: bool) -> None:
    """List the repos in the store."""
    repos = depot.list_repos()
    render.emit(as_json, [repo.to_dict() for repo in repos], lambda: render.render_ls(repos, depot.home))


@cli.command("info")
@_repo_argument
@_json_option
@_reading_home_option
def info_command(depot: Depot, repo_id: str, as_json: bool) -> None:
    """Show a repo's refs, revisions and files (and, for a revision that holds only some of its commit's
    files, as a mirror or a pull of one variant leaves it, how many the commit has)."""
    info = depot.repo_info(repo_id)
    upstream: dict[str, int] = {}
    try:
        manifest = depot.get_manifest(repo_id)
    except DepotError:
        pass  # imported, or never scanned: the store knows of no other files
    else:
        upstream[manifest.commit_id] = len(manifest.files)
    body = {**info.to_dict(), "upstream_files": upstream}
    render.emit(as_json, body, lambda: render.render_info(info, upstream))


@cli.command("path")
@_repo_argument
@click.argument("path", metavar="[FILE]", required=False, callback=_checked(validate_path))
@_revision_option
@_reading_home_option
def path_command(depot: Depot, repo_id: str, path: str | None, revision: str) -> None:
    """Print the path of FILE in the revision's snapshot folder (a link to its blob, under its repo name,
    so that model.onnx finds model.onnx_data beside it), or of the folder itself when FILE is omitted."""
    found = depot.file_path(repo_id, path, revision) if path else depot.snapshot_path(repo_id, revision)
    click.echo(str(found))


@cli.command("cat")
@_repo_argument
@click.argument("path", metavar="FILE", callback=_checked(validate_path))
@_revision_option
@_reading_home_option
def cat_command(depot: Depot, repo_id: str, path: str, revision: str) -> None:
    """Write FILE's bytes to standard output, each chunk checked against its BLAKE3 first (as a node checks
    what it sends: a corrupt blob is quarantined and the command fails, exit 1)."""
    with depot.open_verified(depot.file_info(repo_id, path, revision)) as blob:
        sys.stdout.flush()
        try:
            for index in range(blob.chunks):
                blob.check(index)
                _copy_to_stdout(blob.file.fileno(), *blob.span(index))
        except BrokenPipeError:
            os._exit(EXIT_OK)  # the reader (e.g. `head`) has what it wanted
        except OSError as error:  # a full disk behind the redirection, say
            render.err.print(f"[red]error:[/red] writing to standard output: {error.strerror or error}")
            sys.exit(EXIT_FAILURE)


def _copy_to_stdout(fd: int, offset: int, length: int) -> None:
    out_fd, end = sys.stdout.fileno(), offset + length
    try:
        while offset < end:
            sent = os.sendfile(out_fd, fd, offset, min(end - offset, 1 << 30))
            if sent == 0:
                break
            offset += sent
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        while offset < end:  # sendfile cannot write to this kind of stdout
            data = os.pread(fd, min(end - offset, 8 << 20), offset)
            if not data:
                break
            sys.stdout.buffer.write(data)
            offset += len(data)
        sys.stdout.buffer.flush()


@cli.command("verify")
@click.argument("repo_id", metavar="[REPO]", required=False, callback=_checked(validate_repo_id))
@_json_option
@_reading_home_option
def verify_command(depot: Depot, repo_id: str | None, as_json: bool) -> None:
    """Rehash every blob (of REPO, or all); quarantine corrupt ones. Exit 1 if any is corrupt."""
    bar = render.ByteProgress("verifying")
    with bar.running():
        report = depot.verify(repo_id, progress=bar.update)
    render.emit(as_json, {**report.to_dict(), "ok": report.ok}, lambda: render.render_verify(report))
    if not report.ok:
        sys.exit(EXIT_FAILURE)


@cli.command("sync")
@_json_option
@_reading_home_option
def sync_command(depot: Depot, as_json: bool) -> None:
    """Wait until everything in the store is durable on disk.

    Imports and pulls publish a file as soon as its bytes are verified and flush it in the background
    (MODELDEPOT_DURABILITY=deferred, the default); a power loss before the flush is detected and healed at
    the next start. Run this before you power a machine off, or to be sure."""
    unchecked = depot.store.durability.unchecked()
    flushed = depot.sync()
    body = {"flushed": flushed, "checked": unchecked}
    render.emit(as_json, body, lambda: render.out.print(
        f"{flushed} blob(s) flushed to disk" + (f", {unchecked} checked after a restart" if unchecked else "")
        if flushed or unchecked else "everything was already on disk"))  # fmt: skip


@cli.command("rm")
@_repo_argument
@click.option(
    "--revision",
    "-r",
    default=None,
    callback=_checked(validate_revision),
    help="Remove only this revision: a commit id, or a branch (its commit, unless another ref names it too: "
    "then the branch alone).",
)
@click.option("--quant", "-q", default=None, callback=_checked(validate_label),
              help="Remove only this variant's own files from the revision (main unless -r is given): its "
                   "shared files and the other variants stay.")  # fmt: skip
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_json_option
@_reading_home_option
def rm_command(depot: Depot, repo_id: str, revision: str | None, quant: str | None, yes: bool,
               as_json: bool) -> None:  # fmt: skip
    """Remove a repo (or one revision, or one variant of it) and free the blobs nothing else uses."""
    what = f"{repo_id}@{revision}" if revision else f"{repo_id} (all revisions)"
    if quant is not None:
        what = f"the {quant} files of {repo_id}@{revision or 'main'}"
    depot.check_writable("remove")  # (before asking what could not be done)
    if not yes:
        depot.own_repo_info(repo_id)  # fail on a repo not in the store (or only a shared one's) before asking
        if not sys.stdin.isatty():
            render.err.print(f"[red]error:[/red] refusing to remove {what} without confirmation: pass --yes")
            sys.exit(EXIT_BAD_INPUT)
        click.confirm(f"Remove {what}?", abort=True, err=True)
    result = depot.remove(repo_id, revision, quant)
    render.emit(as_json, result.to_dict(), lambda: render.render_remove(result))


def _rate(value: str | None, name: str) -> int | None:
    """A click callback's reading of a rate (50MiB/s): ConfigError, a usage error, when unreadable."""
    from modeldepot.config import parse_rate

    return None if value is None else _setting(lambda v: parse_rate(v, name), value)


def _use_rates(depot: Depot, download: int | None, upload: int | None = None) -> None:
    """The rate caps the options gave, over the environment's."""
    if download is not None:
        depot.config = dataclasses.replace(depot.config, max_download_rate=download)
    if upload is not None:
        depot.config = dataclasses.replace(depot.config, max_upload_rate=upload)


def _max_size(value: str | None) -> str | None:
    """A click callback's check of a disk budget (200GiB, 80%): ConfigError, a usage error, when unreadable."""
    if value is None:
        return None
    from modeldepot.store.budget import parse_max_size

    _setting(lambda v: parse_max_size(v, "/"), value)
    return value


@cli.command("scan")
@_repo_argument
@_revision_option
@_server_option
@_cluster_options
@_json_option
@_home_option_after(lambda kwargs: _upstream_urls())
def scan_command(depot: Depot, repo_id: str, revision: str, servers: tuple[str, ...], cluster: str | None,
                 cluster_prefix: str | None, as_json: bool) -> None:  # fmt: skip
    """Read REPO (depot servers first, then the fleet's live nodes, then the Hub at HF_ENDPOINT): files,
    variants, shared files."""
    _use_servers(depot, servers)
    _use_cluster(depot, cluster, cluster_prefix)
    manifest = depot.scan_repo(repo_id, revision)
    render.emit(as_json, manifest.to_dict(), lambda: render.render_manifest(manifest))


@cli.command("pull")
@_repo_argument
@click.option(
    "--quant", "-q", "quants", multiple=True, help="Variant to pull (repeatable), e.g. q4f16 or Q4_K_M."
)
@click.option("--all", "all_variants", is_flag=True, help="Every variant (without the repo's other files).")
@_revision_option
@_server_option
@_cluster_options
@click.option("--max-rate", "max_download_rate", default=None, metavar="RATE",
              callback=lambda c, p, v: _rate(v, "--max-rate"),
              help="Download at most this fast, from every source together (50MiB/s; default: "
                   "$MODELDEPOT_MAX_DOWNLOAD_RATE, else no cap).")  # fmt: skip
@_json_option
@_home_option_after(lambda kwargs: _upstream_urls())
def pull_command(
    depot: Depot,
    repo_id: str,
    quants: tuple[str, ...],
    all_variants: bool,
    revision: str,
    servers: tuple[str, ...],
    cluster: str | None,
    cluster_prefix: str | None,
    max_download_rate: int | None,
    as_json: bool,
) -> None:
    """Download REPO (or some of its variants) into the store, verified and resumable.

    Sources, in order: the depot nodes in MODELDEPOT_SERVERS (comma-separated URLs; MODELDEPOT_TOKEN is
    sent to them), the live nodes of the fleet at MODELDEPOT_CLUSTER that hold each file (the token too),
    then the Hub at HF_ENDPOINT (HF_TOKEN is sent to it alone). Run it again after an interruption: only
    the missing chunks are fetched."""
    if quants and all_variants:
        render.err.print("[red]error:[/red] give --quant or --all, not both")
        sys.exit(EXIT_BAD_INPUT)
    _use_servers(depot, servers)
    _use_cluster(depot, cluster, cluster_prefix)
    _use_rates(depot, max_download_rate)
    chosen: list[str] | str | None = list(quants) if quants else ("all" if all_variants else None)
    view = render.PullView(f"pulling {repo_id}")
    try:
        with view.running():
            result = depot.pull(repo_id, chosen, revision=revision, progress=view.update)
    except KeyboardInterrupt:
        render.err.print("interrupted: every finished chunk is kept; run the same command to resume")
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        render.print_json(result.to_dict())
        return
    render.out.print(
        f"pulled {result.repo_id}@{result.commit_id[:12]} ({', '.join(result.variants) or 'all files'}): "
        f"{result.files} files, {render.format_bytes(result.bytes_total)}, "
        f"{render.format_bytes(result.bytes_downloaded)} downloaded"
        + (f", {render.format_bytes(result.bytes_resumed)} resumed" if result.bytes_resumed else "")
        + (f" from {', '.join(result.sources)}" if result.sources else "")
    )
    render.out.print(f"snapshot: {result.snapshot_path}")


@cli.command("status")
@click.argument("repo_id", metavar="[REPO]", required=False, callback=_checked(validate_repo_id))
@_json_option
@_reading_home_option
def status_command(depot: Depot, repo_id: str | None, as_json: bool) -> None:
    """Show the variants of scanned repos and their download status."""
    manifests = [depot.get_manifest(repo_id)] if repo_id else depot.list_manifests()
    if as_json:
        render.print_json([m.to_dict() for m in manifests])
        return
    if not manifests:
        render.out.print("No repo has been scanned yet: `modeldepot scan ORG/NAME`.")
    for manifest in manifests:
        render.render_manifest(manifest)


@cli.command("preload")
@_repo_argument
@click.option(
    "--quant", "-q", default=None, help="Variant to preload (with the shared files); default: all files."
)
@_revision_option
@_json_option
@_reading_home_option
def preload_command(depot: Depot, repo_id: str, quant: str | None, revision: str, as_json: bool) -> None:
    """Bring a model into RAM (the page cache, shared with every process) so workers start from memory.

    The pages stay after this command ends, until the kernel needs the memory; `modeldepot stats` shows
    what is in RAM."""
    info = depot.preloader.preload(repo_id, quant, revision)
    if as_json:
        render.print_json(info.to_dict())
        return
    render.out.print(
        f"{'already in RAM' if info.already else 'preloaded'} {info.repo_id}@{info.commit_id[:12]} "
        f"({info.variant or 'all files'}): {info.files} files, {render.format_bytes(info.bytes)}, "
        f"{render.format_bytes(info.resident_bytes)} resident, {info.seconds:.2f} s"
    )


@cli.command("stats")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1, 1000), help="Models to list.")
@_json_option
@_reading_home_option
def stats_command(depot: Depot, top: int, as_json: bool) -> None:
    """The most used models, how often and when they were used, and how much of each is in RAM now."""
    from modeldepot.preload import resident_in_ram

    rows = []
    accesses = depot.store.access.top(1 << 30)  # every use row: the top ones, and who was ever used
    for access in accesses[:top]:
        try:
            in_ram, size = resident_in_ram(
                depot.store, access.repo_id, None, check=False, variant=access.variant
            )
        except DepotError:
            in_ram, size = 0, 0  # removed since: listed with nothing in RAM
        rows.append({**access.to_dict(), "bytes": size, "resident_bytes": in_ram})
    used = {access.repo_id for access in accesses}
    for repo in depot.list_repos():  # models in RAM never used (preloaded, say), in the slots left
        if len(rows) >= top:
            break
        if repo.repo_id in used:
            continue
        try:
            in_ram, size = resident_in_ram(depot.store, repo.repo_id, None, check=False)
        except DepotError:
            continue
        if in_ram:
            rows.append({"repo_id": repo.repo_id, "variant": "", "count": 0, "last_access": None,
                         "bytes": size, "resident_bytes": in_ram})  # fmt: skip
    if as_json:
        render.print_json({"models": rows, "budget_bytes": depot.preloader.budget,
                           "strategy": depot.preloader.strategy})  # fmt: skip
        return
    render.render_stats(rows, depot.preloader.budget)


@cli.command("peers")
@_cluster_options
@_json_option
@_home_option
def peers_command(depot: Depot, cluster: str | None, cluster_prefix: str | None, as_json: bool) -> None:
    """List the fleet's live nodes (from its registry, --cluster or $MODELDEPOT_CLUSTER) and what each holds.

    last_seen is the last moment this command's view of the registry knew the node alive (now). Exit 1
    when the registry cannot be reached."""
    _use_cluster(depot, cluster, cluster_prefix)
    rows = depot.peers()
    fleet = depot.fleet
    status = fleet.status() if fleet is not None else None
    if status is not None and not status.connected:  # a fresh view of an unreachable registry is empty
        render.err.print(f"[red]error:[/red] the registry {depot.config.cluster} cannot be reached: "
                         f"{status.last_error or 'no answer'}")  # fmt: skip
        sys.exit(EXIT_FAILURE)
    if as_json:
        render.print_json([row.to_dict() for row in rows])
        return
    render.render_peers(rows, f"registry {depot.config.cluster}")


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8980, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on."
)
@click.option(
    "--token",
    envvar="MODELDEPOT_TOKEN",
    default=None,
    callback=lambda c, p, v: _token(v),
    help="Require 'Authorization: Bearer TOKEN' on every route but health (default: $MODELDEPOT_TOKEN). "
    "Without one, reads are open and the control routes need a control token made at start (printed in "
    "the dashboard's address).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="URL[,URL...]",
    callback=_server_urls,
    help="Mirror: pull what the store lacks from these depot nodes (then the Hub at HF_ENDPOINT) while "
    "serving it. Repeatable or comma-separated; replaces MODELDEPOT_SERVERS.",
)
@click.option("--preload-budget", default=None, metavar="SIZE|N%",
              help="RAM for preloaded models (default: $MODELDEPOT_PRELOAD_BUDGET, else 50%).")  # fmt: skip
@click.option("--max-size", default=None, metavar="SIZE|N%", callback=lambda c, p, v: _max_size(v),
              help="Set the store's disk budget (200GiB, or 80% of the disk), as `modeldepot budget` does: kept "
                   "with the store, so a pull beside the node keeps to it too; the least recently used revisions and variants "
                   "are evicted to make room (default: the budget the store has; $MODELDEPOT_MAX_SIZE caps this "
                   "process further).")  # fmt: skip
@click.option("--max-download-rate", default=None, metavar="RATE", callback=lambda c, p, v: _rate(v, "--max-download-rate"),
              help="What the node's pulls (a mirror's, a swarm's) may download together, at most (50MiB/s; "
                   "default: $MODELDEPOT_MAX_DOWNLOAD_RATE, else no cap).")  # fmt: skip
@click.option("--max-upload-rate", default=None, metavar="RATE", callback=lambda c, p, v: _rate(v, "--max-upload-rate"),
              help="What the node may send in file bodies, to all its clients together (50MiB/s; default: "
                   "$MODELDEPOT_MAX_UPLOAD_RATE, else no cap).")  # fmt: skip
@click.option("--preload-top", default=0, show_default=True, type=click.IntRange(0, 1000),
              help="Preload the N most used models in the background at start.")  # fmt: skip
@click.option(
    "--header-timeout",
    envvar="MODELDEPOT_HEADER_TIMEOUT",
    default=None,
    type=click.FloatRange(0, 86400, min_open=True),
    metavar="SECONDS",
    help="Close a connection that has not sent a complete request head this long after it opened or "
    "after its last response (default: $MODELDEPOT_HEADER_TIMEOUT, else 10).",
)
@click.option(
    "--max-connections-per-client",
    envvar="MODELDEPOT_MAX_CONNECTIONS_PER_CLIENT",
    default=None,
    type=click.IntRange(0),
    metavar="N",
    help="Concurrent connections one client address may hold; more are answered 503 and closed, 0 for no "
    "cap (default: $MODELDEPOT_MAX_CONNECTIONS_PER_CLIENT, else 256).",
)
@click.option("--scrub-interval", envvar="MODELDEPOT_SCRUB_INTERVAL", default="1d", show_default=True,
              metavar="DURATION", callback=lambda c, p, v: _setting(parse_duration, v),
              help="Rehash every blob this often in the background (1d, 12h, 30m; 0 or off: never), quarantining "
                   "what fails; local reads are guarded by this.")  # fmt: skip
@click.option("--scrub-rate", envvar="MODELDEPOT_SCRUB_RATE", default="64MiB", show_default=True, metavar="SIZE",
              callback=lambda c, p, v: _setting(_positive_size, v), help="Bytes a second the scrub may read.")  # fmt: skip
@_cluster_options
@click.option("--advertise", default=None, metavar="URL", callback=lambda c, p, v: _advertise_url(v),
              help="With --cluster: the URL peers reach this node at (default: http://HOST:PORT).")  # fmt: skip
@_home_option_after(lambda kwargs: _listenable(kwargs["host"], kwargs["port"]), shared=False)
def serve_command(
    depot: Depot,
    host: str,
    port: int,
    token: str | None,
    log_level: str,
    upstreams: tuple[str, ...],
    preload_budget: str | None,
    max_size: str | None,
    max_download_rate: int | None,
    max_upload_rate: int | None,
    preload_top: int,
    header_timeout: float | None,
    max_connections_per_client: int | None,
    scrub_interval: float,
    scrub_rate: int,
    cluster: str | None,
    cluster_prefix: str | None,
    advertise: str | None,
) -> None:
    """Serve the store over HTTP: the Hub's API (HF_ENDPOINT=http://HOST:PORT) and /api/depot/v1.

    With --cluster (or $MODELDEPOT_CLUSTER) the node joins its fleet: it registers itself and publishes
    which contents it holds (by SHA-256 only), and its pulls find holders through the registry."""
    from modeldepot.server.connections import ConnectionLimits
    from modeldepot.server.run import run_server

    _use_servers(depot, upstreams)
    _use_cluster(depot, cluster, cluster_prefix)
    _use_rates(depot, max_download_rate, max_upload_rate)
    if advertise is not None and depot.config.cluster is None:
        render.err.print("[red]error:[/red] --advertise needs a cluster to advertise in: give --cluster too")
        sys.exit(EXIT_BAD_INPUT)
    if preload_budget is not None:
        depot.config = dataclasses.replace(depot.config, preload_budget=preload_budget)
    from modeldepot.preload.preloader import parse_budget

    parse_budget(depot.config.preload_budget)  # (a ConfigError now, not a 500 on /metrics later)
    if max_size is not None:
        depot.set_max_size(
            max_size
        )  # (the store's from now on; a store over it is brought within it, logged)
    elif depot.store.budget.max_bytes is not None and not depot.store.read_only:
        depot.shrink()  # a store already over its budget is brought within it (evictions are logged)
    limits = ConnectionLimits()
    if header_timeout is not None:
        limits = dataclasses.replace(limits, header_timeout=header_timeout)
    if max_connections_per_client is not None:
        limits = dataclasses.replace(limits, max_per_client=max_connections_per_client)
    run_server(depot, host, port, token, log_level, mirror=bool(upstreams), preload_top=preload_top, limits=limits,
               scrub_interval=scrub_interval, scrub_rate=scrub_rate, advertise=advertise)  # fmt: skip


def _token(value: str | None) -> str | None:
    """A node token, refused when empty (`--token "$TOKEN"` with TOKEN unset served an open node, said only
    by an info line)."""
    if value is not None and not value.strip():
        raise click.BadParameter("the token is empty: that would serve every route openly. Give a token, or no "
                                 "--token (and no MODELDEPOT_TOKEN) for an open node")  # fmt: skip
    if value is None and "MODELDEPOT_TOKEN" in os.environ and not os.environ["MODELDEPOT_TOKEN"].strip():
        # (click takes an empty variable for an unset one: `-e MODELDEPOT_TOKEN="$TOKEN"`, TOKEN unset)
        raise click.BadParameter("MODELDEPOT_TOKEN is set but empty: that would serve every route openly. Set "
                                 "a token, or unset it for an open node")  # fmt: skip
    return value


def _advertise_url(value: str | None) -> str | None:
    """A click callback's check of --advertise: an http(s) URL of a host (InvalidInputError: usage error)."""
    if value is None:
        return None
    from modeldepot.discovery.base import validate_node_url

    try:
        return validate_node_url(value.strip()).rstrip("/")
    except InvalidInputError as error:
        raise click.BadParameter(str(error)) from None


def _positive_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise ConfigError(f"{text!r} is no rate: give more than 0 bytes a second (e.g. 64MiB)")
    return size


def _setting(parse: Callable[[str], T], text: str) -> T:
    """A click callback's conversion: a ConfigError becomes click's usage error (exit 2)."""
    try:
        return parse(text)
    except ConfigError as error:
        raise click.BadParameter(str(error)) from None


# The `hf-cache` group lives in cli/hfcache.py, which uses the options above: imported here, last (not
# while type checking, which would then see an import cycle).
if not TYPE_CHECKING:
    from modeldepot.cli import space  # noqa: F401  (its commands register themselves: gc, du, budget, pins)
    from modeldepot.cli.hfcache import hf_cache

    cli.add_command(hf_cache)


def main() -> None:
    """The ``modeldepot`` command. Once a command has returned (every command closes its store, and so its
    index and its locks, before it does) and its output is flushed, the process ends at once: the
    interpreter's teardown, unloading some 600 modules one by one, took 0.1 s, a tenth of a pull of 300
    configs. An error escaping a command still ends the normal way, with its traceback."""
    try:
        cli(prog_name="modeldepot")
        code: int | str | None = 0
    except SystemExit as done:  # how click's standalone mode ends every command
        code = done.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), a closed stream
            code = code or 1
    os._exit(code or 0)
