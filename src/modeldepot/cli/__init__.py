"""The ``modeldepot`` command: a thin shell over :class:`modeldepot.Depot`.

Exit codes: 0 ok, 1 failure (including ``verify`` finding corruption), 2 bad input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import posixpath
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape

from modeldepot._version import __version__, build_id
from modeldepot.cli import render
from modeldepot.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    INTERRUPTED,
    a_folder,
    checked,
    cluster_options,
    exit_code_for,
    home_option_after,
    json_option,
    rate_value,
    reading_home_option,
    repo_argument,
    revision_option,
    server_option,
    upstream_urls_checked,
    use_cluster,
    use_rates,
    use_servers,
)
from modeldepot.depot import Depot
from modeldepot.errors import (
    ConfigError,
    DepotError,
    EntryNotFoundError,
    InvalidInputError,
    NotFoundError,
    RepoNotFoundError,
)
from modeldepot.openfiles import raise_open_file_limit
from modeldepot.validation import (
    validate_branch,
    validate_path,
    validate_quant,
    validate_repo_id,
    validate_revision,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from modeldepot.transfer.pull import PullResult

__all__ = ["cli", "main"]


def _show_version(ctx: click.Context, _param: click.Parameter, wanted: bool) -> None:
    if not wanted or ctx.resilient_parsing:
        return
    try:
        render.stdout.write(f"modeldepot, version {__version__} (build {build_id()})\n")
        render.stdout.flush()
    except render.OutputError as error:
        render.err.print(f"error: {error}")
        ctx.exit(1)
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show the version and the build (a digest of the installed code) and exit.",
)
def cli() -> None:
    """modeldepot: a verified, deduplicated store for model repos (ONNX, GGUF, safetensors).

    MODELDEPOT_LOG_LEVEL (debug, info, warning: the default, or error) sets what the commands log to stderr."""
    level = os.environ.get("MODELDEPOT_LOG_LEVEL")
    if level:
        import logging

        if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise click.UsageError(f"MODELDEPOT_LOG_LEVEL={level!r}: use debug, info, warning or error")
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from modeldepot.config import unknown_variables

    for name, near in unknown_variables(os.environ):
        render.err.print(f"[yellow]warning:[/yellow] {escape(name)} is not a setting modeldepot reads"
                         + (f": did you mean {near}?" if near else " (it is left alone)"))  # fmt: skip
    raise_open_file_limit()  # (a command holds a file per linked file, or per connection, a while)
    # (the main thread's alone: signal.signal elsewhere is a ValueError, and every command failed when the CLI
    # ran on another thread; put back when the command ends, for a program that runs it in its own process)
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _terminated_as_interrupted)
        click.get_current_context().call_on_close(_put_back_sigterm)


# Set by main(): the process ends with the command. Its SIGTERM handling then stays as the command left it: put
# back to the default as the command's context closed, a supervisor's SIGTERM sent again after the pull had
# said what it kept killed it (exit 143, not 130: a CI run)
_ENDS_THE_PROCESS = False


def _put_back_sigterm() -> None:
    if not _ENDS_THE_PROCESS:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _terminated_as_interrupted(signum: int, frame: object) -> None:
    """SIGTERM (`docker stop`, `kill`, a job scheduler's timeout) as Ctrl-C: a pull keeps the parts of its
    chunks in flight and says what it kept, every command unwinds (killed at once, a pull lost what it was
    writing down and said nothing: an explorer's trial). `serve` has its own. Where Ctrl-C is ignored (a
    command a script starts with `&`: a non-interactive shell ignores SIGINT for it), the interruption is
    raised here: `pull … & kill $!` had lost the pull's parts in flight as a SIGKILL does (an explorer's
    trial)."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        # (a blocking run of a pull is cancelled as by a Ctrl-C, its unwinding given the same grace: raised
        # here at once, a second SIGTERM broke it, and the pull's message, a review)
        outage = sys.modules.get("modeldepot.transfer.outage")
        if outage is None or not outage.interrupt():
            raise KeyboardInterrupt
        return
    signal.raise_signal(signal.SIGINT)


@cli.command("import")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--repo",
    "repo_id",
    required=True,
    callback=checked(validate_repo_id),
    help="Repo id to publish as, like ORG/NAME.",
)
@click.option(
    "--revision",
    "-r",
    default="main",
    show_default=True,
    callback=checked(validate_branch),
    help="Branch to point at the import.",
)
@click.option(
    "--private/--public",
    default=None,
    help="Make the whole repo private (served only with the node token) or public; without either, a repo "
    "keeps its visibility (a new one is public).",
)
@click.option(
    "--link",
    is_flag=True,
    help="Hard-link the files into the store instead of copying them (same file system, your own files; "
    "others are copied): no second copy. The files become read-only, as the store's blobs are.",
)
@json_option
@home_option_after(lambda kwargs: a_folder(kwargs["directory"], kwargs["home"]))
def import_command(
    depot: Depot,
    directory: Path,
    repo_id: str,
    revision: str,
    private: bool | None,
    link: bool,
    as_json: bool,
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
        f"{render.count(result.files, 'file')}, "
        f"{render.format_bytes(result.bytes)} ({render.format_bytes(reused)} already in the store)"
    )
    if link:
        copied = result.new_bytes - result.linked_bytes
        because = "; ".join(result.copied_because) or "the file system refused a hard link"
        render.out.print(f"linked {render.format_bytes(result.linked_bytes)}"
                         + (f"; copied {render.format_bytes(copied)} ({because})" if copied else ""))  # fmt: skip
    render.render_snapshot(result.repo_id, result.snapshot_path, result.snapshot_built)


@cli.command("ls")
@json_option
@reading_home_option
def ls_command(depot: Depot, as_json: bool) -> None:
    """List the repos in the store."""
    repos = depot.list_repos()

    def human() -> None:
        render.render_ls(repos, depot.home)
        # (a look at every saved scan: only when downloads are kept, and not of thousands of repos)
        if len(repos) < render.LARGE_TABLE and depot.store.partials.keys_on_disk():
            # (a killed pull left 240 MiB of downloads, and `ls` said "the store is empty": an explorer's trial)
            render.render_interrupted(
                [manifest for manifest in depot.list_manifests() if manifest.interrupted()]
            )

    render.emit(as_json, [repo.to_dict() for repo in repos], human)


@cli.command("info")
@repo_argument
@json_option
@reading_home_option
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
    upstream.update(depot.upstream_file_counts(info.repo_id))  # (each revision's, not the last scan's alone)
    body = {**info.to_dict(), "upstream_files": upstream}
    render.emit(as_json, body, lambda: render.render_info(info, upstream))


def _repo_file(value: str) -> str:
    """A file's path in a repo, as a user types it at a shell: ``./config.json`` (the folder it imported,
    tab-completed) is config.json; anything else a path may not be is refused, as everywhere."""
    typed = value
    while value.startswith("./"):
        value = value[2:].lstrip("/")
    if not value and typed:
        raise InvalidInputError(f"file path {typed!r} names the repo's folder, not a file in it")
    return validate_path(value)


@contextlib.contextmanager
def _near_misses(depot: Depot, repo_id: str, revision: str) -> Iterator[None]:
    """A file the revision lacks is refused with the paths it has that come closest (`pooling/config.json`
    for `1_Pooling/config.json`, `model.safetensor`: refused with no word of the near miss, an explorer's
    trial)."""
    try:
        yield
    except EntryNotFoundError as error:
        missing = error.path
        if error.in_commit or error.commit_id is None or missing is None:
            raise
        import difflib  # (here: `import modeldepot.cli` stays light, every command's start pays for it)

        paths = [entry.path for entry in depot.list_files(repo_id, error.commit_id)]
        by_name = {posixpath.basename(p): p for p in paths}
        close = difflib.get_close_matches(missing, paths, n=3, cutoff=0.6)
        named = difflib.get_close_matches(posixpath.basename(missing), by_name, n=3, cutoff=0.75)
        close += [by_name[name] for name in named if by_name[name] not in close]
        if not close:
            raise
        raise EntryNotFoundError(repo_id, error.revision, missing, error.commit_id,
                                 advice=f" (did you mean {', '.join(map(repr, close[:3]))}?)") from None  # fmt: skip


@cli.command("path")
@repo_argument
@click.argument("path", metavar="[FILE]", required=False, callback=checked(_repo_file))
@revision_option
@click.option("--quant", "-q", default=None, callback=checked(validate_quant),
              help="Instead of FILE: the model file of this variant the store holds (a split GGUF's first "
                   "shard), as a load picks it: `llama-server -m \"$(modeldepot path REPO -q Q4_K_M)\"`.")  # fmt: skip
@reading_home_option
def path_command(depot: Depot, repo_id: str, path: str | None, revision: str, quant: str | None) -> None:
    """Print the path of FILE in the revision's snapshot folder (a link to its blob, under its repo name,
    its siblings beside it), or of the folder itself when FILE is omitted. onnxruntime 1.31 and later refuse
    an ONNX model's external data reached through these links: load it with Depot.load or
    Depot.linked_folder, or copy the folder (cp -rL)."""
    if quant is not None and path:
        raise click.UsageError("give FILE or --quant, not both")
    with _near_misses(depot, repo_id, revision):
        if quant is not None:  # (a script had to know a quant's file name: an explorer's trial)
            revision, path = _model_file_of(depot, repo_id, revision, quant)
        found = depot.file_path(repo_id, path, revision) if path else depot.snapshot_path(repo_id, revision)
    render.stdout.write(f"{found}\n")  # (a write that fails is one line: OutputError)
    render.stdout.flush()
    if path is not None and path.endswith(".onnx"):
        from modeldepot.engines.loading import has_external_data

        if has_external_data(
            path, (e.path for e in depot.list_files(repo_id, depot.resolve(repo_id, revision)))
        ):
            # (onnxruntime resolves the links and refuses external data outside the model's real folder: the
            # path did not load where the same files from the Hugging Face cache did, an explorer's trial)
            # (a read-only store's linked_folder is its snapshot's, whose links onnxruntime refuses too: not
            # offered there, an explorer's trial)
            within = "" if depot.store.read_only else ", or within `Depot.linked_folder` (real files)"
            render.err.print(
                "[yellow]note:[/yellow] onnxruntime 1.31 and later refuse this model's external data through the "
                f"store's links: load it with `Depot.load`{within}, or copy "
                f"the folder first (`cp -rL {escape(str(found.parent))} DEST`)"
            )
    if path is None:
        # (a file of the folder that failed verification is a dangling link there: from_pretrained then
        # said FileNotFoundError, and nothing of why, an explorer's trial; the one file's path is refused)
        info = depot.repo_info(repo_id)
        lost = next((r.quarantined for r in info.revisions if r.commit_id == found.name), ())
        if lost:
            render.err.print(
                f"[yellow]warning:[/yellow] {escape(', '.join(lost[:4]))}{' and more' if len(lost) > 4 else ''} "
                f"failed verification and {'is' if len(lost) == 1 else 'are'} missing from the folder: "
                f"`modeldepot pull {info.repo_id} -r {found.name}` fetches {'it' if len(lost) == 1 else 'them'} again"
            )


def _model_file_of(depot: Depot, repo_id: str, revision: str, quant: str) -> tuple[str, str]:
    """(commit, model file) of variant ``quant`` the store holds of the revision, as a load picks it; of a
    branch whose commit lacks it, the newest older revision's that holds it whole, said on stderr (a pull
    of another variant moved the branch past one the upstream changed since: an explorer's trial)."""
    from modeldepot.engines.adapters import model_file
    from modeldepot.engines.loading import DEFAULT_SUFFIXES, left_behind, saved_listing
    from modeldepot.hub.variants import group_files
    from modeldepot.validation import is_commit_id

    commit_id = depot.resolve(repo_id, revision)
    held = [entry.path for entry in depot.list_files(repo_id, commit_id)]
    try:
        return commit_id, model_file(held, quant, DEFAULT_SUFFIXES)
    except NotFoundError as lacking:
        behind = None
        if not is_commit_id(revision):  # (of every store a read finds: a shared store's baked revision too)
            holder = depot.tiers.holder(repo_id, revision)[0]
            behind = left_behind(depot.tiers.all, holder, repo_id, revision, commit_id, quant)
        older = None if behind is None else (behind[1], behind[2])
        if older is not None:
            render.err.print(
                f"[yellow]note:[/yellow] {escape(revision)} is at {commit_id[:12]}, which the store does not hold "
                f"{escape(quant)} of: this is {escape(quant)} of {older[0][:12]}, the revision it left behind (`modeldepot pull "
                f"{escape(shlex.quote(repo_id))} -q {escape(shlex.quote(quant))}"
                f"{'' if revision == 'main' else f' -r {escape(shlex.quote(revision))}'}` fetches {escape(revision)}'s)"
            )
            return older
        # A pull is said only of a variant the commit has, of a repo pulled here (of an imported one, a pull
        # asks the Hub for another repo of its name; of a typo, the upstream has none either: a review)
        listed = saved_listing(depot.store, repo_id, commit_id)
        origin = depot.repo_info(repo_id).origin
        advice = ""
        if listed is not None:
            try:
                model_file(listed, quant, DEFAULT_SUFFIXES, holder=f"its commit {commit_id[:12]}")
            except NotFoundError as absent:
                if group_files(listed).find(quant) is not None:
                    # (the commit has the variant without a shard of it, which its upstream never had: "the
                    # store lacks" sent users to pull again, which changed nothing, where a load said the
                    # commit lacks it, an explorer's trial)
                    raise NotFoundError(f"{repo_id}@{commit_id[:12]}: {absent}", repo_id=repo_id) from None
            else:
                if origin != "import":
                    advice = (f" (its commit has it: `modeldepot pull {shlex.quote(repo_id)} -r {commit_id} -q "
                              f"{shlex.quote(quant)}` fetches it)")  # fmt: skip
        raise NotFoundError(f"{repo_id}@{commit_id[:12]}: {lacking}{advice}", repo_id=repo_id) from None


@cli.command("cat")
@repo_argument
@click.argument("path", metavar="FILE", callback=checked(_repo_file))
@revision_option
@reading_home_option
def cat_command(depot: Depot, repo_id: str, path: str, revision: str) -> None:
    """Write FILE's bytes to standard output, each chunk checked against its BLAKE3 first (as a node checks
    what it sends: a corrupt blob is quarantined and the command fails, exit 1)."""
    with _near_misses(depot, repo_id, revision):
        entry = depot.file_info(repo_id, path, revision)
    with depot.open_verified(entry) as blob:
        sys.stdout.flush()
        try:
            for index in range(blob.chunks):
                blob.check(index)
                _copy_to_stdout(blob.file.fileno(), *blob.span(index))
        except BrokenPipeError:
            os._exit(EXIT_OK)  # the reader (e.g. `head`) has what it wanted
        except OSError as error:  # a full disk behind the redirection, say
            render.err.print(
                f"[red]error:[/red] writing to standard output: {escape(str(error.strerror or error))}"
            )
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
@click.argument("repo_id", metavar="[REPO]", required=False, callback=checked(validate_repo_id))
@click.option("--repair", is_flag=True,
              help="Then fetch again the files found corrupt (now or before) from the depot's sources: its "
                   "servers, its fleet, the Hub. Exit 1 only if some stay broken.")  # fmt: skip
@json_option
@reading_home_option
def verify_command(depot: Depot, repo_id: str | None, repair: bool, as_json: bool) -> None:
    """Rehash every blob (of REPO, or all); quarantine corrupt ones. Exit 1 if any is corrupt."""
    if repair:
        depot.check_writable("repairing files")  # (before the hashing, not after it)
    bar = render.ByteProgress("verifying")
    with bar.running():
        report = depot.verify(repo_id, progress=bar.update)
    repairs = None
    if repair:
        broken = [revision for revision in depot.broken_files() if repo_id is None or revision[0] == repo_id]
        if broken and not as_json:
            render.err.print(
                f"fetching again the files found corrupt in {render.count(len(broken), 'revision')}"
            )
        repairs = depot.repair(broken)
    # (a snapshot that cannot be rebuilt fails path reads: not ok, a read-only copy's said ok, a trial)
    body = {**report.to_dict(), "ok": report.ok and not report.snapshots_not_repaired}
    if repairs is not None:
        # (an unreadable blob no repair mends: not ok, a review)
        unreadable = any(problem.problem == "unreadable" for problem in report.problems)
        body.update(repairs=[dataclasses.asdict(r) for r in repairs], ok=all(r.error is None for r in repairs)
                    and report.index_ok and not report.snapshots_not_repaired and not unreadable)  # fmt: skip
    render.emit(as_json, body, lambda: render.render_verify(report, repairs))
    if not body["ok"]:
        sys.exit(EXIT_FAILURE)


@cli.command("sync")
@json_option
@reading_home_option
def sync_command(depot: Depot, as_json: bool) -> None:
    """Wait until everything in the store is durable on disk.

    Imports and pulls publish a file as soon as its bytes are verified and flush it in the background
    (MODELDEPOT_DURABILITY=deferred, the default); a power loss before the flush is detected and healed at
    the next start. Run this before you power a machine off, or to be sure. Exit 1 when the store holds
    files found corrupt (a power loss before a flush tore them: `modeldepot verify --repair` fetches them
    again)."""
    unchecked = depot.store.durability.unchecked()
    flushed = depot.sync()
    # (a boot script read "3 checked", exit 0, of three files the power loss had torn: an explorer's trial)
    corrupt = [f"{repo}@{commit[:12]}/{path}" for (repo, commit), paths in depot.broken_files().items()
               for path in paths]  # fmt: skip
    body = {"flushed": flushed, "checked": unchecked, "corrupt": corrupt}
    read_only = depot.store.read_only
    render.emit(as_json, {**body, "read_only": read_only}, lambda: render.out.print(
        f"{render.count(flushed, 'blob')} flushed to disk" + (f", {unchecked} checked after a restart" if unchecked else "")
        + (" (the store is read-only here: its writer's next sync records them as flushed)" if read_only and flushed else "")
        if flushed or unchecked else "everything was already on disk"))  # fmt: skip
    if corrupt:
        if not as_json:
            shown = ", ".join(corrupt[:3]) + (f" and {len(corrupt) - 3} more" if len(corrupt) > 3 else "")
            fix = ("fetch them again where the store is writable (`modeldepot verify --repair` there)"
                   if depot.store.read_only else "`modeldepot verify --repair` fetches them again (a repo imported "
                   "from a folder: import it again)")  # fmt: skip
            render.err.print(f"[red]corrupt:[/red] {render.count(len(corrupt), 'file')} (never served): "
                             f"{escape(shown)}; {fix}")  # fmt: skip
        sys.exit(EXIT_FAILURE)


@cli.command("rm")
@repo_argument
@click.option(
    "--revision",
    "-r",
    default=None,
    callback=checked(validate_revision),
    help="Remove only this revision: a commit id, or a branch (its commit, unless another ref names it too: "
    "then the branch alone).",
)
@click.option("--quant", "-q", default=None, callback=checked(validate_quant),
              help="Remove only this variant's own files from the revision (main unless -r is given): its "
                   "shared files and the other variants stay.")  # fmt: skip
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@reading_home_option
def rm_command(depot: Depot, repo_id: str, revision: str | None, quant: str | None, yes: bool,
               as_json: bool) -> None:  # fmt: skip
    """Remove a repo (or one revision, or one variant of it) and free the blobs nothing else uses."""
    what = f"{repo_id}@{revision}" if revision else f"{repo_id} (all revisions)"
    if quant is not None:
        what = (f"the {quant} files of {repo_id}@{revision}" if revision else f"the {quant} files of {repo_id}@main "
                "and of its older revisions no branch names (not pinned ones)")  # fmt: skip
    depot.check_writable("a removal")  # (before asking what could not be done)
    if not yes:
        try:  # (fail on a repo not in the store, or only a shared one's, before asking)
            depot.own_repo_info(repo_id)
        except RepoNotFoundError:
            if revision is not None or quant is not None or not _scanned_alone(depot, repo_id):
                raise
            what = f"the saved scan of {repo_id} (the store holds nothing of it)"
        if not sys.stdin.isatty():
            render.err.print(f"[red]error:[/red] refusing to remove {what} without confirmation: pass --yes")
            sys.exit(EXIT_BAD_INPUT)
        click.confirm(f"Remove {what}?", abort=True, err=True)
    result = depot.remove(repo_id, revision, quant)
    render.emit(as_json, result.to_dict(), lambda: render.render_remove(result))


def _scanned_alone(depot: Depot, repo_id: str) -> bool:
    """(A repo the store holds nothing of.) Whether it keeps a scan of it, which `rm` then forgets."""
    try:
        depot.get_manifest(repo_id)
    except NotFoundError:
        return False
    return True


@cli.command("scan")
@repo_argument
@revision_option
@server_option
@cluster_options
@json_option
@home_option_after(lambda kwargs: upstream_urls_checked())
def scan_command(depot: Depot, repo_id: str, revision: str, servers: tuple[str, ...], cluster: str | None,
                 cluster_prefix: str | None, as_json: bool) -> None:  # fmt: skip
    """Read REPO (depot servers first, then the fleet's live nodes, then the Hub at HF_ENDPOINT; a branch
    on the Hub before the live nodes, which may hold an older commit of it): files, variants, shared files."""
    use_servers(depot, servers)
    use_cluster(depot, cluster, cluster_prefix)
    manifest = depot.scan_repo(repo_id, revision)
    render.emit(as_json, manifest.to_dict(), lambda: render.render_manifest(manifest))


@cli.command("pull")
@repo_argument
@click.option(
    "--quant", "-q", "quants", multiple=True, help="Variant to pull (repeatable), e.g. q4f16 or Q4_K_M."
)
@click.option("--all", "all_variants", is_flag=True, help="Every variant (without the repo's other files).")
@click.option("--include", "include", multiple=True, metavar="PATTERN",
              help="Only the files whose path matches this glob (repeatable), as `hf download --include`: "
                   "'*.json', 'onnx/'.")  # fmt: skip
@click.option(
    "--exclude",
    "exclude",
    multiple=True,
    metavar="PATTERN",
    help="Not the files whose path matches this glob (repeatable), as `hf download --exclude`.",
)
@revision_option
@server_option
@cluster_options
@click.option("--max-rate", "max_download_rate", default=None, metavar="RATE",
              callback=lambda c, p, v: rate_value(v, "--max-rate"),
              help="Download at most this fast, from every source together (50MiB/s, or off; default: "
                   "$MODELDEPOT_MAX_DOWNLOAD_RATE, else no cap).")  # fmt: skip
@json_option
@home_option_after(lambda kwargs: upstream_urls_checked())
def pull_command(
    depot: Depot,
    repo_id: str,
    quants: tuple[str, ...],
    all_variants: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    revision: str,
    servers: tuple[str, ...],
    cluster: str | None,
    cluster_prefix: str | None,
    max_download_rate: int | None,
    as_json: bool,
) -> None:
    """Download REPO (or some of its variants, or files: --include, --exclude) into the store, verified and
    resumable.

    Sources, in order: the depot nodes in MODELDEPOT_SERVERS (comma-separated URLs; MODELDEPOT_TOKEN is
    sent to them), the live nodes of the fleet at MODELDEPOT_CLUSTER that hold each file (the token too),
    then the Hub at HF_ENDPOINT (HF_TOKEN is sent to it alone). Run it again after an interruption: only
    the missing chunks are fetched."""
    if quants and all_variants:
        render.err.print("[red]error:[/red] give --quant or --all, not both")
        sys.exit(EXIT_BAD_INPUT)
    use_servers(depot, servers)
    use_cluster(depot, cluster, cluster_prefix)
    use_rates(depot, max_download_rate)
    chosen: list[str] | str | None = list(quants) if quants else ("all" if all_variants else None)
    view = render.PullView(f"pulling {repo_id}")
    try:
        with view.running():
            manifest = None
            if chosen is None and not include and not exclude:
                # (the whole repo: every quant of a GGUF repo, hundreds of GB of a big model's, started without a
                # word, where llama.cpp and `load` pick one and Ollama pulls one tag: an explorer's trial; a
                # read-only store refused first, as the pull refuses it, a review)
                depot.check_writable("a pull")
                manifest = depot.manifest_for(repo_id, revision)
                if len(manifest.variants) > 1:
                    render.err.print(render.every_variant_note(manifest))
            result = depot.pull(repo_id, chosen, revision=revision, progress=view.update, manifest=manifest,
                                include=list(include) or None, exclude=list(exclude) or None)  # fmt: skip
    except KeyboardInterrupt:
        # (a Ctrl-C pressed again while this is said would end it with a traceback in its place; a SIGTERM,
        # taken for one, too)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        render.err.print(f"interrupted: {_kept_for_a_resume(depot, repo_id)}")
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        render.print_json(result.to_dict())
        return
    render.out.print(
        f"pulled {result.repo_id}@{result.commit_id[:12]} ({_pulled_what(result, bool(include or exclude))}): "
        f"{render.count(result.files, 'file')}, {render.format_bytes(result.bytes_total)}, "
        f"{render.format_bytes(result.bytes_downloaded)} downloaded"
        + (f", {render.format_bytes(result.bytes_resumed)} resumed" if result.bytes_resumed else "")
        + (f" from {', '.join(result.sources)}" if result.sources else "")
    )
    render.render_snapshot(result.repo_id, result.snapshot_path, result.snapshot_built)


def _pulled_what(result: PullResult, filtered: bool) -> str:
    """What a pull took: the files its patterns chose (said to be "all files", or the variants the store
    held whole already, of a pull of one file), or the variants it completed."""
    if filtered:
        return "files matching --include/--exclude"
    return ", ".join(result.variants) or "all files"


@cli.command("status")
@click.argument("repo_id", metavar="[REPO]", required=False, callback=checked(validate_repo_id))
@json_option
@reading_home_option
def status_command(depot: Depot, repo_id: str | None, as_json: bool) -> None:
    """Show the variants of scanned repos and their download status."""
    manifests = [depot.get_manifest(repo_id)] if repo_id else depot.list_manifests()
    if as_json:
        render.print_json([m.to_dict() for m in manifests])
        return
    if not manifests:
        held = depot.store.list_repos()
        # (the shared stores' repos are theirs: counted here, they were "held here, none with a main branch")
        shared = len(depot.list_repos()) - len(held) if depot.tiers.shared else 0
        render.out.print(
            f"No download status: {render.count(len(held), 'repo')} held here, none with a main branch "
            "(`modeldepot info REPO` shows its branches and commits)."
            if held
            else "No repo has been scanned yet: `modeldepot scan ORG/NAME`."
        )
        if shared > 0:
            render.out.print(f"{render.count(shared, 'repo')} in the shared stores (MODELDEPOT_SHARED) beside: "
                             "status shows this store's downloads (`modeldepot ls` lists them all).")  # fmt: skip
    if repo_id is None and len(manifests) >= render.MANY_MANIFESTS:
        render.render_manifests_summary(manifests)
        return
    for manifest in manifests:
        render.render_manifest(manifest, depot.evictions(manifest.repo_id, limit=50))


@cli.command("preload")
@repo_argument
@click.option(
    "--quant", "-q", default=None, help="Variant to preload (with the shared files); default: all files."
)
@revision_option
@json_option
@reading_home_option
def preload_command(depot: Depot, repo_id: str, quant: str | None, revision: str, as_json: bool) -> None:
    """Bring a model into RAM (the page cache, shared with every process) so workers start from memory.

    The pages stay after this command ends, until the kernel needs the memory; `modeldepot stats` shows
    what is in RAM."""
    configured = depot.config.preload_strategy
    if configured not in ("page-cache", "mmap"):
        # A private copy (read, memfd) is this process's memory: it went with the command, which said
        # it was preloaded. The page cache is what outlives it.
        from modeldepot.preload import Preloader

        depot.use_preloader(Preloader(depot, depot.config.preload_budget, "page-cache"))
    info = depot.preloader.preload(repo_id, quant, revision)
    if as_json:
        render.print_json(info.to_dict())
        return
    if configured != info.strategy:
        render.err.print(
            f"(MODELDEPOT_PRELOAD_STRATEGY={configured} keeps a copy in the memory of the process that"
            " preloads, `modeldepot serve` or a Python worker: this command fills the page cache, which"
            " outlives it)"
        )
    render.out.print(
        f"{'already in RAM' if info.already else 'preloaded'} {info.repo_id}@{info.commit_id[:12]} "
        f"({info.variant or 'all files'}): {render.count(info.files, 'file')}, {render.format_bytes(info.bytes)}, "
        f"{render.format_bytes(info.resident_bytes)} resident, {info.seconds:.2f} s"
    )


@cli.command("stats")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1, 1000), help="Models to list.")
@json_option
@reading_home_option
def stats_command(depot: Depot, top: int, as_json: bool) -> None:
    """The most used models, how often and when they were used, and how much of each is in RAM now."""
    from modeldepot.preload import resident_in_ram

    rows = []
    # every use row of the repos held: the top ones, and who was ever used (a removed repo, used the most,
    # took the top rows as "0 B": an explorer's trial)
    accesses = depot.store.access.top(1 << 30, in_store=True)
    for access in accesses[:top]:
        try:
            in_ram, size = resident_in_ram(
                depot.store, access.repo_id, None, check=False, variant=access.variant
            )
        except DepotError:
            in_ram, size = 0, 0  # removed since: listed with nothing in RAM
        rows.append({**access.to_dict(), "bytes": size, "resident_bytes": in_ram})
    used = {access.repo_id for access in accesses}
    last_uses = depot.store.access.last_uses()  # (a pull's or an import's, uncounted: "never" said it)
    for repo in depot.list_repos():  # models in RAM never used (preloaded, say), in the slots left
        if len(rows) >= top:
            break
        if repo.repo_id in used:
            continue
        try:
            in_ram, size = resident_in_ram(depot.store, repo.repo_id, None, check=False)
        except DepotError:
            continue
        # (None, not known: listed as unknown, as README says; left out, an admin's preloaded model read as "none
        # is in RAM" by the users of its store, an explorer's trial)
        if in_ram or in_ram is None:
            rows.append({"repo_id": repo.repo_id, "variant": "", "count": 0,
                         "last_access": last_uses.get(repo.repo_id), "bytes": size, "resident_bytes": in_ram})  # fmt: skip
    if as_json:
        render.print_json({"models": rows, "budget_bytes": depot.preloader.budget,
                           "strategy": depot.preloader.strategy})  # fmt: skip
        return
    render.render_stats(rows, depot.preloader.budget)


@cli.command("peers")
@cluster_options
@json_option
# (accepted as by every command, and not read: the fleet's registry is; `peers` on a jump host made an
# empty store in the default folder, and refused a --home without one, an SRE's trial)
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None, hidden=True)
def peers_command(home: Path | None, cluster: str | None, cluster_prefix: str | None, as_json: bool) -> None:
    """List the fleet's live nodes (from its registry, --cluster or $MODELDEPOT_CLUSTER) and what each holds.

    last_seen is the last moment this command's view of the registry knew the node alive (now). Exit 1
    when the registry cannot be reached. No store is read or made."""
    from modeldepot.config import DepotConfig
    from modeldepot.transfer.fleet import BackgroundFleet, other_fleets

    try:
        config = DepotConfig.from_env()
        registry, prefix = cluster or config.cluster, cluster_prefix or config.cluster_prefix
        if not registry:
            raise ConfigError("no cluster to list: give --cluster etcd://HOST:PORT or set MODELDEPOT_CLUSTER")
        if not os.environ.get("MODELDEPOT_LOG_LEVEL"):
            # The registry's outage warning speaks for a node ("answering from the last view … retrying"):
            # this command does neither, and says what failed itself
            logging.getLogger("modeldepot.discovery").setLevel(logging.ERROR)
        fleet = BackgroundFleet.open(registry, prefix)
        try:
            rows, status = fleet.rows(), fleet.status()
            elsewhere = (
                fleet.fleets_elsewhere() if not rows and status is not None and status.connected else {}
            )
        finally:
            fleet.close()
    except DepotError as error:
        render.err.print(f"[red]error:[/red] {escape(str(error))}")
        sys.exit(exit_code_for(error))
    if status is not None and not status.connected:  # a fresh view of an unreachable registry is empty
        render.err.print(f"[red]error:[/red] the registry {escape(registry)} cannot be reached: "
                         f"{escape(status.last_error or 'no answer')}")  # fmt: skip
        sys.exit(EXIT_FAILURE)
    if elsewhere:  # (a mistyped prefix listed no node, without a word: an explorer's trial)
        render.err.print(f"[yellow]warning:[/yellow] no node is registered under prefix {escape(prefix)}, but "
                         f"{escape(registry)} holds nodes under {escape(other_fleets(elsewhere))}: give "
                         "--cluster-prefix (or MODELDEPOT_CLUSTER_PREFIX) to list them")  # fmt: skip
    if as_json:
        render.print_json([row.to_dict() for row in rows])
        return
    render.render_peers(rows, f"registry {registry}")


# The `hf-cache` group lives in cli/hfcache.py, which uses the options above: imported here, last (not
# while type checking, which would then see an import cycle).
if not TYPE_CHECKING:
    from modeldepot.cli import repair, serve, space  # noqa: F401  (their commands register themselves)
    from modeldepot.cli.hfcache import hf_cache

    cli.add_command(hf_cache)


def _kept_for_a_resume(depot: Depot, repo_id: str) -> str:
    """What an interrupted pull of ``repo_id`` kept, by its status rows (the chunks checked and the parts of
    chunks in flight: what the resume does not fetch again), and what to do."""
    from modeldepot.store.holders import process_command
    from modeldepot.store.partials import partial_key

    try:
        manifest = depot.get_manifest(repo_id)
    except DepotError:
        return "every finished chunk is kept; run the same command to resume"
    stopped = manifest.interrupted()
    # Another pull that waited for this one's downloads takes them over: the rows are its own then, and said
    # "0 B of 87.4 MiB kept" of bytes kept and handed over (an explorer's trial). Only then: another pull of
    # the repo that shares none of them goes on with nothing of this one's (a review).
    wanted = {path for v in stopped for path in v.files} | set(manifest.shared) if stopped else None
    partials = depot.store.partials
    waited_for = partials.wanted_keys()
    mine = {partial_key(f.sha256, f.git_oid) for f in manifest.files if wanted is None or f.path in wanted}
    takers = {
        pid
        for key in mine
        if partials.holds(key) and (pid := partials.holder(key)) not in (None, os.getpid())
    }
    if takers or mine & waited_for:
        other = min(takers) if takers else partials.pull_holder(manifest.repo_id)
        command = process_command(other) if other is not None else None
        who = f"process {other}" + (f" ({escape(command)})" if command else "") if other else "another pull"
        return (f"{who} goes on with the downloads of {repo_id} this pull was making (nothing fetched is lost); "
                "run the same command to resume or wait for it")  # fmt: skip
    if not stopped:
        return "every finished chunk is kept; run the same command to resume"
    return ", ".join(f"{render.format_bytes(v.bytes_done)} of {render.format_bytes(v.total_bytes)} kept"
                     + (f" ({v.name})" if len(stopped) > 1 else "") for v in stopped) + (
        "; run the same command to resume")  # fmt: skip


def main() -> None:
    """The ``modeldepot`` command. Once a command has returned (every command closes its store, and so its
    index and its locks, before it does) and its output is flushed, the process ends at once: the
    interpreter's teardown, unloading some 600 modules one by one, took 0.1 s, a tenth of a pull of 300
    configs. An error escaping a command still ends the normal way, with its traceback."""
    global _ENDS_THE_PROCESS
    _ENDS_THE_PROCESS = True
    code: int | str | None = 0
    try:
        returned = cli.main(prog_name="modeldepot", standalone_mode=False)
        code = returned if isinstance(returned, int) else 0  # (``ctx.exit(code)``'s, returned so)
    except click.Abort as aborted:
        # (click's prompts raise Abort "from None" on a Ctrl-C: the interruption is its context, not its cause;
        # a Ctrl-C at `rm`'s question ended with exit 1, an explorer's trial)
        if isinstance(aborted.__cause__ or aborted.__context__, KeyboardInterrupt):
            # A Ctrl-C or SIGTERM a command's own handling did not take (it came while click read the options,
            # or in `peers`): click said "Aborted!" and exit 1, a failure's code (an explorer's trial)
            render.err.print(INTERRUPTED)
            code = EXIT_INTERRUPTED
        else:  # (a confirmation answered no)
            render.err.print("Aborted!")
            code = 1
    except click.ClickException as error:  # (what standalone mode does with a usage error)
        error.show()
        code = error.exit_code
    except SystemExit as done:  # how a command ends with a code of its own
        code = done.code
    if signal.getsignal(signal.SIGTERM) is _terminated_as_interrupted:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (done: a SIGTERM now would only break the ending)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # (None: started with it closed; a closed stderr failed every command)
                stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), a closed stream
            code = code or 1
    os._exit(code or 0)
