"""The modeldepot command: real click invocations, plus real subprocesses for the entry points."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import modeldepot
from conftest import LiveNode, closed_port, flip_byte, free_port, sample_files, wait_until, write_model_dir
from modeldepot import Depot, InvalidInputError
from modeldepot._version import build_id, node_version
from modeldepot.cli import cli, render
from modeldepot.cli.render import format_bytes
from modeldepot.config import DepotConfig
from modeldepot.errors import ConfigError, SourceDirectoryError
from modeldepot.transfer.progress import PullUpdate

REPO = "acme/tiny"


def run(*args: str, home: Path, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [*args, "--home", str(home)], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_every_command_takes_home_and_listings_take_json() -> None:
    commands: list[tuple[str, click.Command]] = []
    for name, command in cli.commands.items():
        if isinstance(command, click.Group):  # its subcommands (hf-cache import, hf-cache export)
            commands += [(f"{name} {sub}", subcommand) for sub, subcommand in command.commands.items()]
        else:
            commands.append((name, command))
    for name, command in commands:
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        assert "--home" in options, name
    for name in ("ls", "info", "verify", "gc", "du", "import", "rm"):
        assert "--json" in {o for p in cli.commands[name].params for o in getattr(p, "opts", [])}, name


def test_import_ls_info_path_cat(home: Path, model_dir: Path) -> None:
    code, out, _ = run("import", str(model_dir), "--repo", REPO, "--json", home=home)
    assert code == 0
    imported = json.loads(out)
    assert imported["files"] == len(sample_files()) and len(imported["commit_id"]) == 40
    code, out, _ = run("ls", "--json", home=home)
    assert code == 0 and [r["repo_id"] for r in json.loads(out)] == [REPO]
    code, out, _ = run("ls", home=home)
    assert code == 0 and REPO in out
    code, out, _ = run("info", REPO, "--json", home=home)
    info = json.loads(out)
    assert code == 0 and info["refs"] == {"main": imported["commit_id"]}
    assert sorted(f["path"] for f in info["revisions"][0]["files"]) == sorted(sample_files())
    code, out, _ = run("path", REPO, "config.json", home=home)
    assert code == 0 and Path(out.strip()).read_bytes() == sample_files()["config.json"]
    code, out, _ = run("path", REPO, home=home)
    assert Path(out.strip()).name == imported["commit_id"]
    # A file as a shell completes it in the folder imported: the same file; leaving the repo is still refused
    code, out, _ = run("path", REPO, "./onnx/model_q4.onnx", home=home)
    assert code == 0 and Path(out.strip()).read_bytes() == sample_files()["onnx/model_q4.onnx"]
    code, _, err = run("path", REPO, "./../config.json", home=home)
    assert code == 2 and "'..'" in err
    # A near miss is named (a typo, a folder left out: refused with no word of the file meant, a trial)
    code, _, err = run("path", REPO, "model.safetensor", home=home)
    assert code == 1 and "(did you mean 'model.safetensors'?)" in err, err
    code, _, err = run("cat", REPO, "model_q4.onnx", home=home)
    assert code == 1 and "did you mean 'onnx/model_q4.onnx'" in err, err
    code, _, err = run("path", REPO, "weights.bin", home=home)
    assert code == 1 and "is not in" in err and "did you mean" not in err, err
    # And a near miss of a repo or a branch (a typo said only "not in the store": an explorer's trial)
    typo = REPO[:-1] + REPO[-1] * 2
    for command in (("path", typo), ("info", typo), ("rm", typo, "--yes")):
        code, _, err = run(*command, home=home)
        assert code == 1 and f"is not in the store (see `modeldepot ls`): did you mean {REPO!r}?" in err, err
    code, _, err = run("path", "nobody/else", home=home)
    assert code == 1 and "is not in the store" in err and "did you mean" not in err, err
    code, _, err = run("cat", REPO, "config.json", "--revision", "mian", home=home)
    assert code == 1 and "revision 'mian'" in err and "did you mean 'main'?" in err, err
    code, _, err = run("path", REPO, "--revision", "v9", home=home)
    assert code == 1 and "revision 'v9'" in err and "did you mean" not in err, err


def test_import_with_link_says_what_it_linked(home: Path, model_dir: Path) -> None:
    code, out, err = run("import", str(model_dir), "--repo", REPO, "--link", home=home)
    assert code == 0, err
    linked = sum(map(len, set(sample_files().values())))  # (empty.txt and its like: one blob each content)
    assert f"linked {format_bytes(linked)}" in out and "copied" not in out
    assert (model_dir / "model.safetensors").stat().st_mode & 0o777 == 0o444


def test_cat_writes_exact_bytes_through_a_real_pipe(home: Path, model_dir: Path) -> None:
    run("import", str(model_dir), "--repo", REPO, home=home)
    for path in ("model.safetensors", "empty.txt"):
        done = subprocess.run(
            [sys.executable, "-m", "modeldepot", "cat", REPO, path, "--home", str(home)],
            capture_output=True,
            check=True,
        )
        assert done.stdout == sample_files()[path]
    to_file = home.parent / "out.bin"
    with open(to_file, "wb") as handle:
        subprocess.run([sys.executable, "-m", "modeldepot", "cat", REPO, "model.safetensors", "--home", str(home)],
                       stdout=handle, check=True)  # fmt: skip
    assert to_file.read_bytes() == sample_files()["model.safetensors"]


def test_verify_exit_codes_and_report(home: Path, model_dir: Path) -> None:
    run("import", str(model_dir), "--repo", REPO, home=home)
    code, out, _ = run("verify", "--json", home=home)
    assert code == 0 and json.loads(out)["ok"] is True
    with Depot(home) as depot:
        sha = depot.file_info(REPO, "model.safetensors").sha256
        flip_byte(depot.store.blobs.path(sha), 3)
    code, out, _ = run("verify", REPO, "--json", home=home)
    report = json.loads(out)
    assert code == 1 and not report["ok"] and [p["sha256"] for p in report["problems"]] == [sha]
    code, _, err = run("verify", home=home)
    assert code == 1 and "quarantined" in err
    code, _, err = run("cat", REPO, "model.safetensors", home=home)
    assert code == 1 and "corrupt" in err and "again" in err
    # The folder's path is given, with a word of the file missing from it (an explorer's trial: a dangling
    # link, and from_pretrained's bare FileNotFoundError)
    code, out, err = run("path", REPO, home=home)
    folder = Path(out.strip())
    assert code == 0 and folder.is_dir() and not (folder / "model.safetensors").exists()
    assert "model.safetensors failed verification and is missing from the folder" in " ".join(err.split())
    assert f"modeldepot pull {REPO} -r {folder.name}" in " ".join(err.split())


def test_bad_input_exits_2_and_missing_things_exit_1(home: Path, model_dir: Path) -> None:
    run("import", str(model_dir), "--repo", REPO, home=home)
    for args in (("info", "../etc"), ("path", REPO, "../../etc/passwd"), ("cat", REPO, "/etc/passwd"),
                 ("path", REPO, "a\\b"), ("import", str(model_dir), "--repo", "no-slash"),
                 ("path", REPO, "config.json", "--revision", "a..b"), ("path", REPO, "%2e%2e/x")):  # fmt: skip
        code, out, err = run(*args, home=home)
        assert code == 2, args
        assert "error" in err and out == ""
    for args in (("info", "acme/absent"), ("cat", REPO, "absent.bin"), ("path", REPO, "config.json", "-r", "dev"),
                 ("import", str(model_dir / "absent"), "--repo", REPO)):  # fmt: skip
        code, _, err = run(*args, home=home)
        assert code == 1, args
        assert "error" in err
    assert run("frobnicate", home=home)[0] == 2


def test_rm_needs_confirmation_then_frees_space(home: Path, model_dir: Path) -> None:
    run("import", str(model_dir), "--repo", REPO, home=home)
    code, _, err = run("rm", REPO, home=home)  # CliRunner's stdin is not a terminal
    assert code == 2 and "--yes" in err
    assert json.loads(run("ls", "--json", home=home)[1]) != []
    code, out, _ = run("rm", REPO, "--yes", "--json", home=home)
    assert code == 0 and json.loads(out)["bytes_freed"] == sum(map(len, sample_files().values()))
    assert json.loads(run("ls", "--json", home=home)[1]) == []
    code, out, _ = run("du", "--json", home=home)
    assert code == 0 and json.loads(out)["blob_bytes"] == 0


def test_gc_and_du_report(home: Path, model_dir: Path) -> None:
    run("import", str(model_dir), "--repo", REPO, home=home)
    run("import", str(model_dir), "--repo", "acme/copy", home=home)
    usage = json.loads(run("du", "--json", home=home)[1])
    total = sum(map(len, sample_files().values()))
    assert usage["blob_bytes"] == total and usage["logical_bytes"] == 2 * total
    assert all(repo["unique_bytes"] == 0 for repo in usage["repos"])
    (home / "tmp" / "123-gone").mkdir()
    (home / "tmp" / "123-gone" / "0.partial").write_bytes(b"x" * 100_000)  # (a killed import's)
    (home / "tmp" / "124-gone").mkdir()
    adopted = home.parent / "hf-blob"
    adopted.write_bytes(b"y" * 200_000)
    os.link(
        adopted, home / "tmp" / "124-gone" / "0.partial"
    )  # (a killed adoption's: a link, freeing nothing)
    code, out, _ = run("gc", "--json", home=home)
    report = json.loads(out)
    assert code == 0 and report["partials_removed"] == 2 and 100_000 <= report["bytes_freed"] < 200_000, (
        report
    )
    code, out, _ = run("du", home=home)
    assert code == 0 and "deduplication saves" in out
    # The room kept beside the index is on the disk: the total said 118 KiB of a store that took 1.2 MiB
    usage = json.loads(run("du", "--json", home=home)[1])
    reserve = (home / "reserve" / "space").stat().st_size
    assert usage["reserve_bytes"] == reserve >= 1 << 20 and "reserve" in out
    shown = usage["blob_bytes"] + usage["index_bytes"] + reserve
    assert f"total       {format_bytes(shown)}" in out, out


def test_a_command_that_fails_leaves_no_store_it_made_and_kept_nothing_in(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull of a mistyped repo, or an `hf-cache import` of a folder that is no cache, made an empty store where
    --home named, and a mistyped --home went unnoticed by the reads after (an explorer's trial)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # (nothing listens)
    for args in (["pull", "acme/nowhere"], ["scan", "acme/nowhere"],
                 ["hf-cache", "import", "--cache-dir", str(tmp_path / "no-cache")]):  # fmt: skip
        home = tmp_path / "fresh"
        code, _, err = run(*args, home=home)
        assert code == 1 and "error:" in err, (args, err)
        assert not home.exists(), args
    # (a relative --home: the look at the store it made raised "relative path can't be expressed as a file URI")
    monkeypatch.chdir(tmp_path)
    code, _, err = run("pull", "acme/nowhere", home=Path("relative"))
    assert code == 1 and "error:" in err and "Traceback" not in err, err
    assert not (tmp_path / "relative").exists()
    held = tmp_path / "held"
    run("import", str(model_dir), "--repo", REPO, home=held)
    code, _, _ = run("pull", "acme/nowhere", home=held)
    assert code == 1
    with Depot(held) as depot:
        assert [r.repo_id for r in depot.list_repos()] == [REPO], "a store of the user's stays"


def test_console_script_and_module_entry_points(tmp_path: Path) -> None:
    env = {**os.environ, "MODELDEPOT_HOME": str(tmp_path / "h")}
    Depot(tmp_path / "h").close()
    script = Path(sys.executable).parent / "modeldepot"
    for command in ([str(script)], [sys.executable, "-m", "modeldepot"]):
        done = subprocess.run([*command, "ls"], capture_output=True, text=True, env=env, check=False)
        assert done.returncode == 0 and "empty" in done.stdout
        assert str(tmp_path / "h") in done.stdout.replace("\n", ""), "the folder named: a mistyped one shows"
        version = subprocess.run([*command, "--version"], capture_output=True, text=True, check=True)
        assert version.stdout == f"modeldepot, version {modeldepot.__version__} (build {build_id()})\n"


def test_a_closed_stderr_or_stdout_is_no_traceback_and_no_failure_of_its_own(tmp_path: Path) -> None:
    """An explorer's trial: started with stderr closed (``2>&-``), every command that worked exited 1; with
    stdout closed, every command, ``--version`` too, ended in an AttributeError's traceback."""
    script = Path(sys.executable).parent / "modeldepot"
    env = {**os.environ, "MODELDEPOT_HOME": str(tmp_path / "h")}
    Depot(tmp_path / "h").close()

    def shell(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=60)

    for command in ("ls", "--version"):
        quiet = shell(f"{script} {command} 2>&-")
        assert quiet.returncode == 0 and quiet.stdout, quiet
        blind = shell(f"{script} {command} >&-")
        assert (blind.returncode, blind.stderr) == (1, "error: writing to standard output: it is closed\n"), (
            blind
        )
    full = shell(f"{script} --version > /dev/full")
    assert (full.returncode, full.stderr) == (
        1,
        "error: writing to standard output: No space left on device\n",
    )


@pytest.mark.parametrize(
    ("variable", "value", "option"),
    [("MODELDEPOT_SCRUB_RATE", "bad", "--scrub-rate"), ("MODELDEPOT_SCRUB_INTERVAL", "x", "--scrub-interval"),
     ("MODELDEPOT_SEND_TIMEOUT", "-5", "--send-timeout"), ("MODELDEPOT_HEADER_TIMEOUT", "0", "--header-timeout")],
)  # fmt: skip
def test_a_bad_value_a_variable_gave_names_the_variable(
    home: Path, variable: str, value: str, option: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explorer's trial: a stray export was said as "Invalid value for '--scrub-rate'", an option the user
    never typed; the same value typed as the option is still said as the option."""
    monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(cli, ["serve", "--home", str(home), "--port", str(free_port())])
    assert result.exit_code == 2 and f"Invalid value for {variable} (which sets '{option}'):" in result.stderr
    monkeypatch.delenv(variable)
    result = CliRunner().invoke(
        cli, ["serve", "--home", str(home), "--port", str(free_port()), option, value]
    )
    assert result.exit_code == 2 and f"Invalid value for '{option}':" in result.stderr, result.stderr


def test_the_build_tells_two_codes_under_one_version_apart(tmp_path: Path) -> None:
    """Every build announced 0.1.0: an operator could not tell the upgraded nodes of a fleet from the old
    ones. The build is a digest of the installed code: a copy of it has the same, a changed copy another."""
    package = Path(modeldepot.__file__).parent
    announced = {}
    for name in ("same", "changed"):
        shutil.copytree(package, tmp_path / name / "modeldepot", ignore=shutil.ignore_patterns("__pycache__"))
        if name == "changed":
            with open(tmp_path / name / "modeldepot" / "server" / "dashboard" / "dashboard.css", "a") as css:
                css.write("/* a fix */\n")
        printed = subprocess.run(
            [sys.executable, "-c", "import modeldepot._version as v; print(v.node_version())"],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(tmp_path / name)},
            cwd=tmp_path,
        )  # fmt: skip
        announced[name] = printed.stdout.strip()
    assert announced["same"] == node_version() == f"{modeldepot.__version__}+{build_id()}"
    assert (
        announced["changed"].startswith(f"{modeldepot.__version__}+")
        and announced["changed"] != node_version()
    )


def test_a_ctrl_c_at_a_question_is_an_interruption(home: Path, model_dir: Path) -> None:
    """An explorer's trial: a Ctrl-C at `rm`'s question ended with exit 1, a failure's code, where every other
    Ctrl-C ends with 130. Asked on a real terminal (a pseudo-terminal), interrupted as a terminal does."""
    import pty
    import select

    run("import", str(model_dir), "--repo", REPO, home=home)
    script = str(Path(sys.executable).parent / "modeldepot")
    pid, terminal = pty.fork()
    if pid == 0:  # (the child: a new session whose terminal is the pseudo-terminal)
        os.execv(script, [script, "rm", REPO, "--home", str(home)])
    said = b""
    deadline = time.monotonic() + 30
    while b"Remove" not in said and time.monotonic() < deadline:
        if select.select([terminal], [], [], 1)[0]:
            said += os.read(terminal, 4096)
    assert b"Remove" in said, said
    os.write(terminal, b"\x03")  # Ctrl-C, which the terminal turns into a SIGINT of the foreground process
    deadline = time.monotonic() + 30
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        if select.select([terminal], [], [], 0.2)[
            0
        ]:  # (what it says, read as it goes: it may fill the buffer)
            with contextlib.suppress(OSError):
                said += os.read(terminal, 4096)
    if ended[0] == 0:  # (a hang, said with what it printed, not a test timeout ten minutes later)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"rm went on after a Ctrl-C at its question: {said!r}")
    status = ended[1]
    with contextlib.suppress(OSError):
        while select.select([terminal], [], [], 0.5)[0] and (piece := os.read(terminal, 4096)):
            said += piece
    os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 130 and b"interrupted" in said, said
    with Depot(home) as depot:
        assert [r.repo_id for r in depot.list_repos()] == [REPO], "nothing removed"


def test_rm_of_a_branch_sharing_its_commit_says_only_the_ref_went(home: Path, model_dir: Path) -> None:
    run("import", str(model_dir), "--repo", REPO, home=home)
    run("import", str(model_dir), "--repo", REPO, "--revision", "v1.0", home=home)
    code, out, _ = run("rm", REPO, "-r", "v1.0", "--yes", home=home)
    assert code == 0 and "removed the ref v1.0" in out and "main still point(s) at it" in out, out
    code, out, _ = run("info", REPO, "--json", home=home)
    assert list(json.loads(out)["refs"]) == ["main"]


def test_info_marks_files_that_failed_verification(home: Path, model_dir: Path) -> None:
    """After `verify` quarantined a file, `info` (and `ls`, the dashboard) listed it as any other: only
    `status` said it was gone (a trial). Now `info` marks it and says how to fetch it again."""
    run("import", str(model_dir), "--repo", REPO, home=home)
    with Depot(home) as depot:
        entry = depot.file_info(REPO, "model.safetensors")
        depot.store.quarantine(entry.sha256)
    code, out, err = run("info", REPO, home=home)
    assert code == 0 and "failed verification: not served" in out.replace("\n", " "), out
    assert "1 file failed verification" in err and "import its folder again" in err, err
    code, out, _ = run("info", REPO, "--json", home=home)
    assert json.loads(out)["revisions"][0]["quarantined"] == ["model.safetensors"]
    code, out, _ = run("ls", home=home)
    assert code == 0 and "(1 failed verification)" in out.replace("\n", " ").replace("│", ""), out
    code, out, _ = run("ls", "--json", home=home)
    assert json.loads(out)[0]["quarantined"] == 1


def test_ctrl_c_in_any_command_is_one_line_and_the_shells_code(
    home: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import interrupted by Ctrl-C printed click's bare "Aborted!" and exited 1, as a failure would."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Depot, "import_dir", interrupted)
    result = CliRunner().invoke(cli, ["import", str(model_dir), "--repo", REPO, "--home", str(home)])
    assert result.exit_code == 130 and "interrupted:" in result.output and "Aborted" not in result.output
    # (it may come after the change was made: "run the command again to finish" sent a script's second `rm`
    # to "not in the store", a crash fuzzer's trial)
    assert "look before you run it again" in " ".join(result.output.split()), result.output


CTRL_C_WHILE_LOADING = """
import sys

class Interrupting:  # a Ctrl-C as the command's modules load (its first half second)
    def find_spec(self, name, path=None, target=None):
        if name == "modeldepot.cli":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupting())
from modeldepot.launch import main
main()
"""


def test_ctrl_c_while_the_command_loads_is_one_line_too() -> None:
    """A Ctrl-C in the first half second of any command printed a traceback of the imports (a trial): the
    package is light (its names load on first use) and the entry point loads the command itself."""
    import modeldepot

    ran = subprocess.run(
        [sys.executable, "-c", CTRL_C_WHILE_LOADING], capture_output=True, text=True, timeout=60
    )
    assert (ran.returncode, ran.stderr) == (130, "interrupted\n"), ran.stderr
    light = subprocess.run([sys.executable, "-c", "import sys, modeldepot; print(sorted(m for m in sys.modules "
                            "if m.startswith('modeldepot')))"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert light.stdout.strip() == "['modeldepot', 'modeldepot._version', 'modeldepot.errors']", light.stdout
    assert modeldepot.Depot is Depot and set(modeldepot.__all__) <= set(dir(modeldepot)) | set(
        modeldepot._LAZY
    )


def test_a_source_url_that_cannot_be_one_is_a_usage_error(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--server http://127.0.0.1:99999` passed the option's check and failed at run time (exit 1), and
    HF_ENDPOINT=notaurl was "cannot reach notaurl" (exit 1): both are settings to fix, exit 2."""
    code, _, err = run("pull", REPO, "--server", "http://127.0.0.1:99999", home=home)
    assert code == 2 and "--server" in err and "out of range" in err, err
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "notaurl")
    code, _, err = run("pull", REPO, home=home)
    assert code == 2 and "HF_ENDPOINT" in err and "http://" in err, err
    monkeypatch.setenv("HF_ENDPOINT", "https://me:s3cret@hub.example")  # refused, the password not echoed
    code, _, err = run("pull", REPO, home=home)
    assert code == 2 and "may not hold a user, a password" in err and "s3cret" not in err, err
    # `serve` (a mirror's pulls answered 500 for it), before it makes a store; and --advertise without a
    # cluster, which was refused only once the store was made
    fresh = home.parent / "never-made"
    # An error naming what the user typed shows it as typed (rich took "[bold]" for markup and ate it)
    code, _, err = run("info", "acme/[bold]x", home=fresh)
    assert code == 2 and "'acme/[bold]x'" in err, err
    for bad in ("notaurl", "ftp://x", "http://127.0.0.1:99999"):
        monkeypatch.setenv("HF_ENDPOINT", bad)
        code, _, err = run("serve", "--port", "0", "--upstream", "http://127.0.0.1:1", home=fresh)
        assert code == 2 and "HF_ENDPOINT" in err, (bad, err)
    monkeypatch.delenv("HF_ENDPOINT")
    monkeypatch.setenv("MODELDEPOT_CLUSTER", "")
    code, _, err = run("serve", "--port", "0", "--advertise", "http://h:1", home=fresh)
    assert code == 2 and "--advertise needs a cluster" in err, err
    for bad in ("ftp://x", "https://proxy.example/models?x=1", "models.example"):
        code, _, err = run("serve", "--port", "0", "--public-url", bad, home=fresh)
        assert code == 2 and "--public-url" in err, (bad, err)
    assert not fresh.exists()


READING_COMMANDS = [
    ["ls"],
    ["info", REPO],
    ["path", REPO],
    ["cat", REPO, "config.json"],
    ["verify"],
    ["sync"],
    ["rm", REPO, "-y"],
    ["gc"],
    ["du"],
    ["pin", REPO],
    ["unpin", REPO],
    ["pins"],
    ["status"],
    ["preload", REPO],
    ["stats"],
    ["hf-cache", "export", REPO],
]


@pytest.mark.parametrize("through_env", [False, True], ids=["--home", "MODELDEPOT_HOME"])
def test_a_command_that_only_reads_makes_no_store_in_a_mistyped_folder(
    tmp_path: Path, model_dir: Path, through_env: bool
) -> None:
    """A typo in --home used to make a new, empty store and answer from it ("no repos"); now every command
    that only reads names the folder and leaves it alone, while the ones that write still make a store."""
    typo, existing = tmp_path / "depto", tmp_path / "empty-but-there"
    existing.mkdir()
    for folder in (typo, existing):
        for args in READING_COMMANDS:
            env = {"MODELDEPOT_HOME": str(folder)} if through_env else {}
            home = [] if through_env else ["--home", str(folder)]
            result = CliRunner().invoke(cli, [*args, *home], env=env)
            assert result.exit_code == 2, (args, result.output)
            assert f"no store at {folder}" in result.output.replace("\n", ""), (args, result.output)
        assert not (folder / "index.db").exists() and not (folder / "blobs").exists()
    assert not typo.exists()
    code, _, err = run("import", str(existing), "--repo", REPO, home=typo)  # (an empty folder: it made one)
    assert code == 1 and "is empty: give the folder that holds the model" in err and not typo.exists(), err
    code, _, _ = run("import", str(model_dir), "--repo", REPO, home=typo)
    assert code == 0
    code, out, _ = run("ls", home=typo)
    assert code == 0 and REPO in out


def test_the_default_store_is_still_made_on_first_use(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "MODELDEPOT_HOME": ""}
    result = CliRunner().invoke(cli, ["ls"], env=env)
    assert result.exit_code == 0 and "empty" in result.output
    assert (tmp_path / "cache" / "modeldepot" / "index.db").is_file()


def test_the_command_ends_with_its_exit_status_and_all_its_output(home: Path, model_dir: Path) -> None:
    """The entry point skips the interpreter's teardown once a command returned: the status and every
    byte written must still come out."""
    run("import", str(model_dir), "--repo", REPO, home=home)
    command = [sys.executable, "-m", "modeldepot"]
    listing = subprocess.run([*command, "info", REPO, "--json", "--home", str(home)], capture_output=True,
                             text=True, check=False)  # fmt: skip
    assert listing.returncode == 0
    assert json.loads(listing.stdout)["repo_id"] == REPO
    usage = subprocess.run([*command, "no-such-command"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "No such command" in usage.stderr
    missing = subprocess.run([*command, "path", "acme/absent", "--home", str(home)], capture_output=True,
                             text=True, check=False)  # fmt: skip
    assert missing.returncode == 1 and "acme/absent" in missing.stderr


def test_an_import_loads_no_transfer_engine_or_yaml_machinery(home: Path, model_dir: Path) -> None:
    """Every command pays its imports before it reads a byte (issue 14: an import of a GiB is bound by
    SHA-256 plus start-up), so what an import does not use must not load: asyncio (40 ms), the engines,
    yaml (only for a model card with front matter), the HTTP clients."""
    probe = (
        "import sys\nfrom modeldepot.cli import cli\n"
        "try:\n    cli.main(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n    print(sorted(m for m in ('asyncio', 'yaml', 'modeldepot.engines', 'aiohttp',"
        " 'huggingface_hub', 'onnxruntime', 'numpy') if m in sys.modules), file=sys.stderr)"
    )
    answer = subprocess.run([sys.executable, "-c", probe, "import", str(model_dir), "--repo", REPO, "--json",
                             "--home", str(home)], capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(answer.stdout)["files"] == len([p for p in model_dir.rglob("*") if p.is_file()])
    assert answer.stderr.strip().splitlines()[-1] == "[]"


def test_a_pull_loads_no_http_library_and_no_engine(home: Path, model_dir: Path, tmp_path: Path) -> None:
    """A pull's start-up is a third of a pull of 300 configs (issue 14): it asks the Hub over its own
    connections, so huggingface_hub's HfApi and HTTP stack (httpx2, 0.25-0.45 s) and aiohttp never load."""
    with Depot(tmp_path / "hub") as hub_store:
        hub_store.import_dir(model_dir, REPO)
        hub = LiveNode(hub_store)
        try:
            probe = (
                "import sys\nfrom modeldepot.cli import cli\n"
                "try:\n    cli.main(sys.argv[1:], standalone_mode=False)\n"
                "finally:\n    print(sorted(m for m in ('httpx2', 'httpx', 'huggingface_hub.hf_api', 'aiohttp',"
                " 'modeldepot.engines', 'onnxruntime', 'numpy') if m in sys.modules), file=sys.stderr)"
            )
            env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
            env.pop("HF_HUB_OFFLINE", None)
            for name in (
                "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN",
                "HF_OIDC_RESOURCE",
            ):  # (a token's lookup loads httpx2)
                env.pop(name, None)
            answer = subprocess.run([sys.executable, "-c", probe, "pull", REPO, "--json", "--home", str(home)],
                                    capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        finally:
            hub.stop()
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["commit_id"] == hub_store_commit(tmp_path / "hub")
    assert answer.stderr.strip().splitlines()[-1] == "[]"


def hub_store_commit(home: Path) -> str:
    with Depot(home) as depot:
        return depot.resolve(REPO)


@pytest.mark.parametrize("size", ["64KiB", "1M", "65536"])
def test_chunk_size_from_environment(
    tmp_path: Path, model_dir: Path, size: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELDEPOT_CHUNK_SIZE", size)
    code, _, _ = run("import", str(model_dir), "--repo", REPO, home=tmp_path / "s")
    assert code == 0
    with Depot(tmp_path / "s") as depot:
        assert depot.chunk_size in (65536, 1 << 20)


def test_a_bad_chunk_size_in_the_environment_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "cannot read size '12XB'" named no setting, and nothing on the command line said 12XB (a trial)."""
    monkeypatch.setenv("MODELDEPOT_CHUNK_SIZE", "12XB")
    code, _, err = run("ls", home=tmp_path / "s")
    assert code == 2 and "MODELDEPOT_CHUNK_SIZE: cannot read size '12XB'" in err, err


def test_modeldepot_offline_is_a_yes_a_no_or_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """MODELDEPOT_OFFLINE=maybe was a no, without a word (an explorer's trial): the pull went to the network."""
    for value, offline in (
        ("1", True),
        ("On", True),
        ("", False),
        ("0", False),
        ("false", False),
        ("off", False),
    ):
        assert DepotConfig.from_env({"MODELDEPOT_OFFLINE": value}, tmp_path).offline is offline, value
    with pytest.raises(ConfigError, match=r"MODELDEPOT_OFFLINE='maybe': use 1, true, yes or on"):
        DepotConfig.from_env({"MODELDEPOT_OFFLINE": "maybe"}, tmp_path)
    assert (
        DepotConfig.from_env({"HF_HUB_OFFLINE": "maybe"}, tmp_path).offline is False
    )  # (huggingface_hub's reading)
    Depot(tmp_path / "s").close()
    monkeypatch.setenv("MODELDEPOT_OFFLINE", "maybe")
    code, _, err = run("pull", REPO, home=tmp_path / "s")
    assert code == 2 and "MODELDEPOT_OFFLINE='maybe'" in err, err


def test_gc_counts_the_space_of_the_downloads_and_revisions_it_drops(home: Path, model_dir: Path) -> None:
    """An interrupted download dropped by --partials, and revisions evicted by --max-size, are space freed:
    the summary said "freed 0 B" for both."""
    from conftest import write_partial

    data = os.urandom(3 * (64 << 10))
    with Depot(home, chunk_size=64 << 10) as depot:
        write_partial(depot, data, [0, 1])  # two chunks of three landed
    code, out, _ = run("gc", "--partials", "--json", home=home)
    report = json.loads(out)
    assert code == 0 and report["partials_removed"] == 1
    assert report["bytes_freed"] >= 2 * (64 << 10)  # the two chunks' blocks (and the log's)
    run("import", str(model_dir), "--repo", REPO, home=home)
    code, out, _ = run("gc", "--max-size", "1KiB", "--json", home=home)
    total = sum(map(len, sample_files().values()))
    assert code == 0 and json.loads(out)["evicted_bytes"] == total
    run("import", str(model_dir), "--repo", REPO, home=home)
    code, out, _ = run("gc", "--max-size", "1KiB", home=home)
    assert code == 0 and "evicted acme/" in out and "freed 0 B" not in out
    assert f"freed {render_bytes(total)}" in out.replace("\n", " "), out


def render_bytes(size: int) -> str:
    from modeldepot.cli.render import format_bytes

    return format_bytes(size)


def test_a_mirror_in_offline_mode_is_refused(home: Path) -> None:
    """`serve --upstream` under HF_HUB_OFFLINE=1 (exported for every process on many cluster images) said it
    was mirroring and answered every miss 503, retried by huggingface_hub for 23 s (an explorer's trial)."""
    for name, other in (("HF_HUB_OFFLINE", "MODELDEPOT_OFFLINE"), ("MODELDEPOT_OFFLINE", "HF_HUB_OFFLINE")):
        refused = CliRunner().invoke(cli, ["serve", "--home", str(home), "--port", "0", "--upstream",
                                           "http://127.0.0.1:9"], env={name: "1", other: None})  # fmt: skip
        assert refused.exit_code == 2, refused.stderr
        assert refused.stderr.startswith(
            f"error: --upstream given, but {name} makes this node fetch nothing"
        ), refused.stderr
        assert "Traceback" not in refused.stderr


def test_a_mirror_that_names_itself_as_its_upstream_is_refused(home: Path) -> None:
    """A mirror whose --upstream, or whose HF_ENDPOINT (exported for the clients in the shell it started
    from, as the README does), is its own address asked itself for what it lacked: 30 s for a 404, a 504
    for a new repo's first file (an explorer's trial)."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for own in (f"http://127.0.0.1:{port}", f"http://localhost:{port}/", f"http://0.0.0.0:{port}"):
        code, _, err = run("serve", "--port", str(port), "--upstream", own, home=home)
        assert code == 2 and "--upstream" in err and "this node's own address" in err, err
    inherited = CliRunner().invoke(
        cli,
        [
            "serve",
            "--home",
            str(home),
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--upstream",
            "http://127.0.0.1:9",
        ],
        env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"},
    )
    assert inherited.exit_code == 2, inherited.stderr
    assert "HF_ENDPOINT" in inherited.stderr and "unset it for `serve`" in inherited.stderr, inherited.stderr
    assert "Traceback" not in inherited.stderr


def test_serve_says_in_one_line_why_it_cannot_start(home: Path) -> None:
    """A port in use, an address that cannot be listened on, a RAM budget out of range: one line and exit 2,
    before anything is served (a port in use was a 40-line traceback, after "serving ... on" was logged)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run("serve", "--port", str(port), home=home)
        assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err, err
        assert "Traceback" not in err and "serving" not in err
    code, _, err = run("serve", "--host", "999.1.1.1", "--port", "0", home=home)
    assert code == 2 and "cannot listen on 999.1.1.1:0" in err and "Traceback" not in err, err
    code, _, err = run("serve", "--preload-budget", "500%", home=home)
    assert code == 2 and "500%" in err and "Traceback" not in err, err
    code, _, err = run("serve", "--preload-budget", "50", home=home)  # (50 bytes: every preload refused)
    assert code == 2 and "give a unit (like 50GiB)" in err, err
    never_made = home.parent / "never-made"  # (a bad RAM budget made the store, then refused to serve it)
    code, _, err = run("serve", "--preload-budget", "-5GiB", home=never_made)
    assert code == 2 and "-5GiB" in err and not never_made.exists(), err
    refused = CliRunner().invoke(
        cli, ["serve", "--home", str(never_made)], env={"MODELDEPOT_PRELOAD_BUDGET": "200%"}
    )
    assert refused.exit_code == 2 and "200%" in refused.stderr and not never_made.exists(), refused.stderr
    code, _, err = run("serve", "--scrub-rate", "0", home=home)  # (was a traceback)
    assert code == 2 and "--scrub-rate" in err and "no rate" in err and "Traceback" not in err, err
    code, _, err = run("serve", "--token", "", home=home)  # (`--token "$TOKEN"`, TOKEN unset: an open node)
    assert code == 2 and "the token is empty" in err, err
    emptied = CliRunner().invoke(cli, ["serve", "--home", str(home)], env={"MODELDEPOT_TOKEN": ""})
    assert emptied.exit_code == 2 and "MODELDEPOT_TOKEN is set but empty" in emptied.stderr, emptied.stderr
    # A token no client can send in a header (a newline from a file, a space) refused everyone, unsaid
    for unsendable in ("s3cret\n", "two words", "pässword"):
        code, _, err = run("serve", "--token", unsendable, home=home)
        assert code == 2 and "no client can send it" in err, (unsendable, err)
    pasted = CliRunner().invoke(cli, ["serve", "--home", str(home)], env={"MODELDEPOT_TOKEN": "s3cret\n"})
    assert pasted.exit_code == 2 and "no client can send it" in pasted.stderr, pasted.stderr


def test_cat_never_writes_a_corrupt_chunk_and_says_why_a_write_failed(home: Path, model_dir: Path) -> None:
    """A byte flipped on disk (no verify run since) is caught by cat itself: exit 1, the blob quarantined,
    not one byte of the bad chunk out. A full disk behind the redirection is one line, not a traceback."""
    run("import", str(model_dir), "--repo", REPO, home=home)
    command = [sys.executable, "-m", "modeldepot", "cat", REPO, "model.safetensors", "--home", str(home)]
    with open("/dev/full", "wb") as full:
        done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, check=False)
    assert done.returncode == 1 and "writing to standard output: No space left on device" in done.stderr
    assert "Traceback" not in done.stderr
    with Depot(home) as depot:
        sha = depot.file_info(REPO, "model.safetensors").sha256
        flip_byte(depot.store.blobs.path(sha), 3)  # in the first chunk
    done = subprocess.run(command, capture_output=True, check=False)
    assert done.returncode == 1 and b"corrupt" in done.stderr
    assert done.stdout == b"", "nothing of the corrupt chunk"
    with Depot(home) as depot:
        assert not depot.has_file(REPO, "model.safetensors"), "quarantined"


def test_listings_that_cannot_be_written_say_so_in_one_line(home: Path, model_dir: Path) -> None:
    """`ls > /dev/full` (and every table, and --json) ended in a traceback; `cat` said it in one line."""
    run("import", str(model_dir), "--repo", REPO, home=home)
    for args in (["ls"], ["ls", "--json"], ["info", REPO], ["du", "--json"], ["path", REPO]):
        command = [sys.executable, "-m", "modeldepot", *args, "--home", str(home)]
        with open("/dev/full", "wb") as full:
            done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, check=False)
        assert done.returncode == 1, (args, done.stderr)
        assert "error: writing to standard output: No space left on device" in done.stderr, (
            args,
            done.stderr,
        )
        assert "Traceback" not in done.stderr, (args, done.stderr)


def test_rm_names_what_the_processes_still_holding_its_files_run() -> None:
    """A node sending a removed file to a slow client was called "a worker's loaded model" (an explorer's
    trial): each holder is named with its command line."""
    from modeldepot.store.holders import _redacted, process_command
    from modeldepot.store.maintenance import RemoveResult

    result = RemoveResult(REPO, ("a" * 40,), 1, 0, bytes_still_held=5 << 20, held_by=(os.getpid(), 1 << 30))
    with render.out.capture() as captured:
        render.render_remove(result)
    said = " ".join(captured.get().split())
    me = process_command(os.getpid())
    assert me and f"while processes {os.getpid()} ({' '.join(me.split())})" in said, said
    assert f", {1 << 30} still map or hold them open" in said, said  # (no such process: its pid alone)
    # A node given its token on its command line: never printed (a review)
    node = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "--token", "s3cr3t"],
                            stdin=subprocess.PIPE)  # fmt: skip
    try:
        wait_until(lambda: "--token" in (process_command(node.pid) or ""), 10, "the node's command line")
        command = process_command(node.pid) or ""
        assert "--token ***" in command and "s3cr3t" not in command, command
    finally:
        node.communicate(b"", timeout=10)
    said = _redacted(["serve", "--hf-token=abc", "--upstream", "http://me:pw@127.0.0.1:9", "--port", "1"])
    assert said == ["serve", "--hf-token=***", "--upstream", "http://***@127.0.0.1:9", "--port", "1"], said


def test_peers_says_a_time_it_cannot_show_as_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    """One node record in the registry with `started_at: 1e308` (finite, so valid) crashed `peers`'s table."""
    from modeldepot.transfer.fleet import PeerRow

    render.render_peers([PeerRow("huge", "http://127.0.0.1:1", "x", 1e308, 1e20, 0, 0, 0)], "connected")
    shown = capsys.readouterr().out
    assert "huge" in shown and "?" in shown


def test_an_import_never_takes_the_store_in(tmp_path: Path, model_dir: Path) -> None:
    """With the store in the model's folder, its live index, locks and reserve became files of the repo a
    node would serve; the store's own folder imported as a model took all of it."""
    code, _, err = run("import", str(model_dir), "--repo", REPO, home=model_dir)
    assert code == 1 and "the store's own folder" in err and not (model_dir / "index.db").exists(), err
    inside = model_dir / ".store"
    assert run("import", str(model_dir), "--repo", REPO, home=inside)[0] == 0
    with Depot(inside) as depot:
        assert sorted(e.path for e in depot.list_files(REPO)) == sorted(
            p.relative_to(model_dir).as_posix()
            for p in model_dir.rglob("*")
            if p.is_file() and inside not in p.parents
        )
        with pytest.raises(SourceDirectoryError, match="the store itself"):
            depot.import_dir(inside, "acme/self")


def test_status_of_an_imported_repo_shows_its_variants_as_held(home: Path, model_dir: Path) -> None:
    """An imported repo (never scanned) had no status: `status` said so, and the dashboard and the event
    stream showed no variant of it, so none could be preloaded or pinned there."""
    run("import", str(model_dir), "--repo", REPO, home=home)
    code, out, err = run("status", REPO, "--json", home=home)
    assert code == 0, err
    manifest = json.loads(out)[0] if out.lstrip().startswith("[") else json.loads(out)
    assert manifest["endpoint"] == "this store (imported)"
    assert {v["status"] for v in manifest["variants"]} == {"downloaded"} and manifest["variants"]
    assert set(manifest["other_held"]) == set(manifest["other"]), "what is in no variant is held too"
    with Depot(home) as depot:
        assert [m.repo_id for m in depot.list_manifests()] == [REPO], "the event stream lists it"
    code, _, err = run("status", "acme/never-seen", home=home)
    assert code == 1 and "modeldepot scan acme/never-seen" in err, err
    # A variant removed from an imported repo has no upstream to come from: not "available"
    removed = manifest["variants"][0]["name"]
    assert run("rm", REPO, "--quant", removed, "--yes", home=home)[0] == 0
    code, out, _ = run("status", REPO, home=home)
    [line] = [line for line in out.splitlines() if f" {removed} " in line]
    assert "import it again" in line and "available" not in line, out


def test_the_held_manifest_of_a_revision_removed_meanwhile_is_none(home: Path, model_dir: Path) -> None:
    """The node's manifest route answered 500 (an IndexError) when a revision it had resolved was removed
    before it read the revision's files: a removal beside it is a 404, not a failure."""
    from modeldepot.hub.manifest import held_manifest

    with Depot(home) as depot:
        depot.import_dir(model_dir, REPO)
        commit = depot.resolve(REPO)
        assert held_manifest(depot.store, REPO, False, commit) is not None
        depot.remove(REPO)
        assert held_manifest(depot.store, REPO, False, commit) is None


def test_variant_names_sizes_and_cache_folders_are_checked_as_input(home: Path, model_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """`preload -q ''` and `-q ../x` said "has no variant" (exit 1), `budget １０GiB` set 10 GiB, and
    `hf-cache export --cache-dir ''` wrote into the current folder."""
    run("import", str(model_dir), "--repo", REPO, home=home)
    run("pin", REPO, home=home)
    for quant in ("", " ", "../x", "a/b"):
        for command in ("preload", "unpin", "rm"):  # (unpin -q '' took the whole repo's pin)
            code, _, err = run(command, REPO, "-q", quant, home=home)
            assert code == 2 and "variant's name" in err, (command, quant, err)
    with Depot(home) as depot:
        assert [p.quant for p in depot.pins()] == [None], "the pin stays"
        with pytest.raises(InvalidInputError, match="variant's name"):
            depot.load(REPO, quant="../x", warmup=0)
    for size in ("１０GiB", "５０%", "nan%", "5.%"):
        code, _, err = run("budget", size, home=home)
        assert code == 2 and "cannot read disk budget" in err, (size, err)
    code, _, err = run("budget", "9" * 400 + "GiB", home=home)
    assert code == 2 and "is more than 4096 PiB" in err, err
    for size in ("-5GiB", "-5%", "-.5GiB"):  # (click read "-5GiB" as an option: "no such option '-5'")
        code, _, err = run("budget", size, home=home)
        assert code == 2 and "cannot be negative" in err, (size, err)
    code, _, err = run("budget", "--bogus", home=home)
    assert code == 2 and "No such option" in err, err
    code, _, err = run("budget", "1", home=home)  # (a size without its unit)
    assert code == 2 and "give a unit (like 1GiB)" in err, err
    code, _, err = run("serve", "--max-size", "5", home=home)  # (it emptied the store at the node's start)
    assert code == 2 and "give a unit (like 5GiB)" in err, err
    code, _, err = run("budget", "2048PiB", home=home)  # (PiB was refused; a budget past the disk, silent)
    assert code == 0 and "more than the disk the store is on holds" in err and "never binds" in err, err
    run("budget", "none", home=home)
    code, _, err = run("budget", "0.00000000000000000001%", "--yes", home=home)
    assert code == 2 and "0 bytes" in err, err  # (it set a budget of 0 bytes: every model evicted)
    for command in (("gc", "--max-size"), ("pull", REPO, "--max-rate")):  # (a traceback: OverflowError)
        code, _, err = run(*command, "9" * 400 + "MiB", home=home)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 4, (command, err)
    monkeypatch.chdir(tmp_path)
    code, _, err = run("hf-cache", "export", REPO, "--cache-dir", "", home=home)
    assert code == 2 and "cache folder" in err and not list(tmp_path.glob("models--*")), err


def test_info_of_a_repo_of_many_files_lists_them_all_as_plain_columns(home: Path, tmp_path: Path) -> None:
    """rich took 17 s to lay out the table of a repo of 30,000 files: from 1,000 rows it is plain columns."""
    from modeldepot.cli.render import LARGE_TABLE

    files = {f"d{i % 7}/f{i}.json": str(i).encode() for i in range(LARGE_TABLE)}
    run("import", str(write_model_dir(tmp_path / "many", files)), "--repo", "acme/many", home=home)
    code, out, _ = run("info", "acme/many", home=home)
    lines = out.splitlines()
    assert code == 0 and lines[3].split() == ["path", "size", "sha256", "etag", "lfs"]
    assert sorted(line.split()[0] for line in lines[5:]) == sorted(files)


def test_git_names_that_are_no_branch_are_refused_as_branch_names(home: Path, model_dir: Path) -> None:
    """`import -r HEAD` made a branch named HEAD (a repo without main, unreadable through the Hub routes,
    which read HEAD as main); `-r refs/heads/main` a second branch listed as refs/heads/refs/heads/main;
    `-r abcdef1` a branch that shadowed the commit whose id starts so."""
    for name, says in (("HEAD", "write main"), ("refs/heads/main", "without its refs/heads/"),
                       ("abcdef1", "reads as the start of a commit id")):  # fmt: skip
        code, _, err = run("import", str(model_dir), "--repo", REPO, "-r", name, home=home)
        assert code == 2 and says in err, (name, err)
    with Depot(home) as depot:
        assert depot.list_repos() == [], "nothing was imported"
    # git cannot hold main and main/sub (one would be a folder of the other): neither can the store
    assert run("import", str(model_dir), "--repo", REPO, home=home)[0] == 0
    assert run("import", str(model_dir), "--repo", REPO, "-r", "dev/x", home=home)[0] == 0
    code, _, err = run("import", str(model_dir), "--repo", REPO.upper(), "-r", "main/sub", home=home)
    assert code == 2 and "cannot sit beside its branch 'main'" in err, err
    code, _, err = run("import", str(model_dir), "--repo", REPO, "-r", "dev", home=home)
    assert code == 2 and "'dev/x'" in err, err


def test_info_names_the_revision_whose_rest_a_pull_takes(depot: Depot, model_dir: Path) -> None:
    """A revision held in part said `modeldepot pull REPO` takes the rest: that pulls main, not it. Of an
    imported repo, a pull would ask the Hub for another repo of its name: it is imported again (as status
    says; info said a pull, an explorer's trial)."""
    import dataclasses

    commit = depot.import_dir(model_dir, REPO, "dev").commit_id
    info = depot.repo_info(REPO)
    with render.out.capture() as captured:
        render.render_info(
            dataclasses.replace(info, origin="https://huggingface.co"), {commit: len(sample_files()) + 3}
        )
    assert f"`modeldepot pull {REPO} -r dev` takes the rest" in captured.get()
    with render.out.capture() as captured:
        render.render_info(info, {commit: len(sample_files()) + 3})
    assert "(import it again to have the rest)" in captured.get() and "modeldepot pull" not in captured.get()


def test_long_work_reports_progress_in_a_log_too(
    home: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With stderr not a terminal (a CI log), an import and a verify printed nothing until the end (a pull
    printed lines); and a resumed pull's rate counted the bytes it found on disk."""
    monkeypatch.setattr(render.ByteProgress, "LINE_INTERVAL", 0.0)  # (a line per update, not every 3 s)
    code, out, err = run("import", str(model_dir), "--repo", REPO, "--json", home=home)
    assert code == 0 and json.loads(out)["files"] == len(sample_files())
    assert "importing: " in err and " of " in err and "B/s" in err
    code, _, err = run("verify", home=home)
    assert code == 0 and "verifying: " in err, err
    clock = [1000.0]
    monkeypatch.setattr(render.time, "monotonic", lambda: clock[0])
    view = render.PullView("pulling")
    lines: list[str] = []
    monkeypatch.setattr(render, "_plain_lines", lines.extend)
    total, mib = 1 << 30, 1 << 20
    # Half was on disk (found); 2 MiB/s come; a chunk lands with the 12 MiB part an interrupted pull had
    # kept of it (found too: the bar jumped by it, and so did the rate, above --max-rate: a trial).
    for seconds, shown, found in ((0, 512, 512), (1, 514, 512), (2, 528, 524), (4, 532, 524)):
        clock[0] = 1000.0 + seconds
        view.update(PullUpdate("w.bin", shown * mib, total, shown * mib, total, found=found * mib))
    view._flush()
    rate = re.search(r"([0-9.]+) MiB/s", lines[-1])
    assert rate is not None and float(rate.group(1)) == 2.0, lines  # (it said 5.0: the part as fetched)
    clock[0] = 1008.0  # a last frame that falls back (a Ctrl-C's did, by 36 MiB) shows what was shown
    view.update(PullUpdate("w.bin", 520 * mib, total, 520 * mib, total, found=524 * mib))
    view._flush()
    assert lines[-1].startswith("pulling: 532.0 MiB of 1.0 GiB"), lines
    # ... but for bytes thrown away: a file that failed its SHA-256, fetched again, is shown again from where
    # it goes on (its 200 MiB refetch read "100%" to its end, an SRE's trial)
    clock[0] = 1020.0
    view.update(PullUpdate("w.bin", 0, total, 300 * mib, total, found=0, thrown_away=232 * mib))
    view._flush()
    assert lines[-1].startswith("pulling: 300.0 MiB of 1.0 GiB"), lines
    resumed = render.PullView("resuming")  # all of it on disk: no rate ("0 B/s" read as a stall, a trial)
    resumed.update(PullUpdate("w.bin", total, total, total, total, found=total))
    resumed._flush()
    assert lines[-1] == "resuming: 1.0 GiB of 1.0 GiB (100%)", lines
    quick = render.PullView(
        "pulling"
    )  # a pull of a quarter second: its rate, not "0 B/s" (an explorer's trial)
    clock[0] = 2000.0
    quick._started = clock[0]
    clock[0] += 0.25
    quick.update(PullUpdate("w.bin", 64 * mib, 64 * mib, 64 * mib, 64 * mib, found=0))
    quick._flush()
    assert lines[-1] == "pulling: 64.0 MiB of 64.0 MiB (100%), 256.0 MiB/s", lines


def test_bytes_thrown_away_stay_off_the_bar_across_the_tries_of_a_pull() -> None:
    """A file that failed its SHA-256 is fetched again: its bytes are taken off the bar, and stay off when an
    outage makes the pull try again (each try counts from 0; the next try's bar read 100% again, a review)."""
    from modeldepot.transfer.outage import _ShownSoFar

    mib, total = 1 << 20, 200 << 20
    view = render.PullView("pulling")
    shown = _ShownSoFar(view.update)
    shown.new_try()
    shown.watch(PullUpdate("w.bin", total, total, total, total))  # all in: it fails its SHA-256
    shown.watch(PullUpdate("w.bin", 10 * mib, total, 10 * mib, total, thrown_away=total))
    assert view._most == 10 * mib
    shown.new_try()  # an outage: the pull's next try, its own tracker
    shown.watch(PullUpdate("w.bin", 20 * mib, total, 20 * mib, total))
    assert view._most == 20 * mib
    shown.watch(PullUpdate("w.bin", 5 * mib, total, 5 * mib, total, thrown_away=15 * mib))  # thrown again
    assert view._most == 5 * mib


def test_du_and_budget_say_what_the_budget_does_not_count(home: Path, model_dir: Path) -> None:
    """A node said "60% of 100 MiB used" while it took 462 MiB (downloads kept for a resume), and `du` called
    what a killed import left in tmp/ "partial", among the downloads a resume takes (two trials)."""
    run("import", str(model_dir), "--repo", REPO, home=home)
    (home / "partials" / "kept-download.part").write_bytes(b"k" * 3000)
    (home / "tmp" / "killed-import").mkdir(parents=True)
    (home / "tmp" / "killed-import" / "w.bin").write_bytes(b"w" * 5000)
    code, out, _ = run("du", home=home)
    assert code == 0 and re.search(r"partial +2\.9 KiB", out) and re.search(r"unfinished +4\.9 KiB", out), out
    code, out, _ = run("budget", "1GiB", home=home)
    said = " ".join(out.split())
    assert (
        code == 0
        and "beside it, not counted: 2.9 KiB of downloads (kept for a resume once stopped: "
        "`modeldepot gc --partials` frees them), 4.9 KiB left by killed writes (`modeldepot gc` frees it)"
        in said
    ), said
    code, out, _ = run("budget", "--json", home=home)
    assert code == 0 and json.loads(out)["uncounted_bytes"] == 8000, out
    # A write under way (its session's lock held: an import running) is no killed write: `gc` frees none of
    # it, and a running import's 1.5 GiB were sent to `gc` (an explorer's trial)
    from modeldepot.store.blobs import WriteSession
    from modeldepot.store.layout import StoreLayout

    with WriteSession(StoreLayout(home)) as session:
        (session.path / "being-written.partial").write_bytes(b"i" * 7000)
        code, out, _ = run("du", home=home)
        assert code == 0 and re.search(r"writing +6\.8 KiB \(imports under way", out), out
        assert re.search(r"unfinished +4\.9 KiB", out), out
        code, out, _ = run("budget", "--json", home=home)
        assert code == 0 and json.loads(out)["uncounted_bytes"] == 8000, out


def test_status_of_a_store_whose_repos_have_no_main_says_so(home: Path, model_dir: Path) -> None:
    """After `rm -r main` of a repo with another branch, status said no repo had been scanned (a trial)."""
    assert run("import", str(model_dir), "--repo", REPO, "-r", "dev", home=home)[0] == 0
    code, out, _ = run("status", home=home)
    assert code == 0 and "1 repo held here, none with a main branch" in " ".join(out.split()), out


def test_a_budget_kept_over_by_a_write_under_way_names_it() -> None:
    """A budget set below a pull under way: the warning said what is pinned or in use (0 B) keeps it over, not
    the room the pull holds (an explorer's trial)."""
    from modeldepot.store.budget import BudgetStatus

    status = BudgetStatus(max_bytes=300 << 20, used_bytes=100 << 20, pinned_bytes=0, in_use_bytes=0, evictions=3,
                          evicted_bytes=50 << 20, reserved_bytes=458 << 20)  # fmt: skip
    with render.err.capture() as said:
        render.render_budget(status, [], 258 << 20)
    assert "the room held for the downloads and writes under way (458.0 MiB)" in said.get(), said.get()


def test_the_cli_runs_on_another_thread_and_leaves_sigterm_as_it_found_it(tmp_path: Path) -> None:
    """The SIGTERM handler (a pull stops as at Ctrl-C) was installed from any thread: signal.signal is a
    ValueError off the main thread, and every command failed there; and it stayed installed in a program that
    ran the CLI in its own process (a review)."""
    import signal
    import threading

    from click.testing import CliRunner

    from modeldepot.cli import cli

    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(
            CliRunner().invoke(cli, ["du", "--home", str(tmp_path / "none")]).exit_code
        )
    )
    thread.start()
    thread.join(60)
    assert codes == [2], codes  # ("no store at": the command's own answer, not a ValueError)
    before = signal.getsignal(signal.SIGTERM)
    assert CliRunner().invoke(cli, ["du", "--home", str(tmp_path / "none")]).exit_code == 2
    assert signal.getsignal(signal.SIGTERM) == before


def test_pin_says_the_repo_as_the_store_spells_it(home: Path, model_dir: Path) -> None:
    """`pin ACME/Tiny` said "pinned ACME/Tiny@main" where `pins` then listed acme/tiny (an explorer's trial)."""
    run("import", str(model_dir), "--repo", REPO, home=home)
    code, out, _ = run("pin", REPO.upper(), home=home)
    assert code == 0 and out.strip() == f"pinned {REPO}@main", out


def test_a_commits_first_characters_too_few_to_name_it_are_said_so(home: Path, model_dir: Path) -> None:
    """`-r 8e6e2` said only "not in the store", though the commit was: 7 characters at least name one."""
    run("import", str(model_dir), "--repo", REPO, home=home)
    with Depot(home) as depot:
        commit = depot.resolve(REPO)
    code, _, err = run("path", REPO, "-r", commit[:5], home=home)
    assert code == 1 and "a commit is named by 7 or more of its characters" in err, err
    code, out, _ = run("path", REPO, "-r", commit[:7], home=home)
    assert code == 0 and commit in out


def test_a_node_on_an_ipv6_address_prints_urls_a_client_reads(home: Path, tmp_path: Path) -> None:
    """`serve --host ::1` printed `HF_ENDPOINT=http://::1:PORT`, which modeldepot itself refused ("not a valid
    URL"), as every client would (an explorer's trial). The address is in brackets, and the URL answers."""
    import socket
    import time
    import urllib.request

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        pytest.skip(f"this machine has no IPv6 loopback: {error}")
    with Depot(home):
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("MODELDEPOT_TOKEN", "MODELDEPOT_MAX_SIZE")}
    log = tmp_path / "serve.log"
    with log.open("wb") as log_file:
        node = subprocess.Popen([sys.executable, "-m", "modeldepot", "serve", "--host", "::1", "--port", "0",
                                 "--home", str(home), "--scrub-interval", "off"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log_file)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "dashboard: " not in log.read_text() and node.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        said = log.read_text()
        endpoint = re.search(r"HF_ENDPOINT=(\S+)", said)
        dashboard = re.search(r"dashboard: (\S+)", said)
        assert endpoint is not None and dashboard is not None, said
        assert (
            endpoint.group(1).startswith("http://[::1]:") and "serving" in said and "on http://[::1]:" in said
        )
        with urllib.request.urlopen(endpoint.group(1) + "/api/models", timeout=10) as answer:
            assert answer.status == 200
        assert dashboard.group(1).startswith(endpoint.group(1))
    finally:
        node.terminate()
        node.wait(30)


def test_an_interruption_while_the_options_are_read_is_an_interruption(home: Path) -> None:
    """A SIGTERM (or Ctrl-C) while click read the options (a callback importing the fleet's modules, slow on a
    loaded machine) ended the command with click's "Aborted!" and exit 1, a failure's code (an explorer's
    trial). It is said as an interruption, exit 130; the rest of click's endings stay as they were."""
    interrupted_in_a_callback = (
        "import sys, modeldepot.discovery.base as base\n"
        "def interrupted(*args, **kwargs):\n"
        "    raise KeyboardInterrupt\n"
        "base.validate_node_url = interrupted\n"
        f"sys.argv = ['modeldepot', 'pull', 'acme/x', '--server', 'http://127.0.0.1:9', '--home', {str(home)!r}]\n"
        "from modeldepot.launch import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", interrupted_in_a_callback], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 130 and "interrupted: nothing was left half-written" in done.stderr, done
    assert "Aborted!" not in done.stderr and "Traceback" not in done.stderr
    assert run("import", str(write_model_dir(home.parent / "m", {"a.json": b"{}"})), "--repo", "acme/x",
               home=home)[0] == 0  # fmt: skip
    for args, stdin, code, said in (
        (["pull"], "", 2, "Missing argument"),  # (a usage error: click's message and code)
        (["--help"], "", 0, ""),
        (["pull", "acme/x", "--server", "nope"], "", 2, "--server"),  # (an option's own refusal: ctx.exit(2))
    ):
        answered = subprocess.run([sys.executable, "-m", "modeldepot", *args, *(["--home", str(home)] if args !=
                                   ["--help"] else [])], input=stdin, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert answered.returncode == code and said in answered.stderr, (args, answered)
        assert "Traceback" not in answered.stderr


def test_a_mistyped_setting_is_warned_of_and_every_setting_read_is_known(home: Path) -> None:
    """MODELDEPOT_TOKNE started an open node, and MODELDEPOT_PORT was dropped, unsaid (an explorer's trial)."""
    import re

    from modeldepot.config import KNOWN_VARIABLES

    result = CliRunner().invoke(
        cli, ["ls", "--home", str(home)], env={"MODELDEPOT_TOKNE": "x", "MODELDEPOT_ZZZ": "1"}
    )
    assert (
        "MODELDEPOT_TOKNE is not a setting modeldepot reads: did you mean MODELDEPOT_TOKEN?" in result.output
    )
    assert "MODELDEPOT_ZZZ is not a setting modeldepot reads (it is left alone)" in result.output
    source = Path(__file__).parents[1] / "src" / "modeldepot"
    read = {
        name
        for path in source.rglob("*.py")
        for name in re.findall(r"MODELDEPOT_[A-Z0-9_]*[A-Z0-9]", path.read_text())
    }
    # (MODELDEPOT_PORT is named only as the Kubernetes service link it is, never read)
    assert read - {"MODELDEPOT_PORT"} <= KNOWN_VARIABLES, read - KNOWN_VARIABLES
    # Kubernetes gives every pod of a namespace with a Service named modeldepot these: no warning, and a node
    # starts (MODELDEPOT_PORT stopped it, exit 2: a review)
    links = {"MODELDEPOT_PORT": "tcp://10.96.0.12:8980", "MODELDEPOT_SERVICE_HOST": "10.96.0.12",
             "MODELDEPOT_SERVICE_PORT": "8980", "MODELDEPOT_PORT_8980_TCP": "tcp://10.96.0.12:8980",
             "MODELDEPOT_PORT_8980_TCP_ADDR": "10.96.0.12", "MODELDEPOT_PORT_8980_TCP_PORT": "8980",
             "MODELDEPOT_PORT_8980_TCP_PROTO": "tcp", "MODELDEPOT_LISTEN_PORT": "9999"}  # fmt: skip
    clean = CliRunner().invoke(cli, ["ls", "--home", str(home)], env=links)
    assert "not a setting" not in clean.output, clean.output
    typo = CliRunner().invoke(cli, ["ls", "--home", str(home)], env={"MODELDEPOT_PORT": "9999"})
    assert (
        "MODELDEPOT_PORT is not a setting modeldepot reads: did you mean MODELDEPOT_LISTEN_PORT?"
        in typo.output
    )


def test_a_kubernetes_service_named_modeldepot_does_not_stop_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Service named modeldepot puts MODELDEPOT_PORT=tcp://10.96.0.12:8980 into every pod of its namespace:
    serve read it for its port and exited 2 (a review)."""
    import modeldepot.server.run as run

    served: list[int] = []
    monkeypatch.setattr(run, "run_server", lambda depot, host, port, *rest, **kw: served.append(port))
    links = {"MODELDEPOT_PORT": "tcp://10.96.0.12:8980", "MODELDEPOT_SERVICE_HOST": "10.96.0.12"}
    result = CliRunner().invoke(cli, ["serve", "--home", str(tmp_path / "s")], env=links)
    assert result.exit_code == 0 and served == [8980], result.output
    assert "MODELDEPOT_SERVICE_HOST" not in result.output, result.output


def test_ls_and_status_of_many_repos_print_plain_lines(
    home: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rich's tables took 2 s for `ls` of 3,000 repos and `status` 5 s, a table of variants each (an explorer's
    trial): many repos are plain aligned lines, `status` one line per repo."""
    from modeldepot.cli import render

    monkeypatch.setattr(render, "LARGE_TABLE", 3)
    monkeypatch.setattr(render, "MANY_MANIFESTS", 3)
    repos = [f"acme/many-{n}" for n in range(3)]
    for repo in repos:
        assert run("import", str(model_dir), "--repo", repo, home=home)[0] == 0
    code, out, err = run("ls", home=home)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["repo", "refs", "revisions", "newest:", "files", "size", "private", "updated"]
    assert [line.split()[0] for line in lines[2:]] == repos
    code, out, err = run("status", home=home)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("acme/")]
    assert [row[:2] for row in rows] == [[repo, "main"] for repo in repos]
    assert all("downloaded" in row for row in rows), out
    assert "`modeldepot status REPO` shows one's variants" in out
