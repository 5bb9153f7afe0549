"""Validation of repo ids, file paths and revisions: the validators, and every public entry point."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from conftest import sample_files, write_model_dir
from modeldepot import Depot, InvalidInputError, InvalidPathError, InvalidRepoIdError, InvalidRevisionError
from modeldepot.cli import cli
from modeldepot.errors import InvalidRangeError
from modeldepot.validation import (
    is_commit_id,
    validate_branch,
    validate_new_branch,
    validate_path,
    validate_repo_id,
    validate_revision,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/model"

# -- the validators -------------------------------------------------------------------------------------

BAD_PATHS: list[object] = [
    "..", ".", "../x", "a/../b", "a/..", "./a", "a/./b",
    "/etc/passwd", "/", "//a",
    "a\\b", "..\\x", "\\",
    "a\x00b", "a\nb", "a\tb", "\x7f", "\x1b[31m", "a\x85b", "a\ud800b",
    "r\u202etxt.exe", "a\u2066b\u2069",  # (bidi controls: a name shown as another, a security trial)
    "", "a//b", "a/", "a/b/",
    "a" * 256, "é" * 128, "/".join(["é" * 100] * 6),
    "%2e%2e", "%2E%2E/x", "..%2f", "..%2fetc/passwd", "%252e%252e", "%25252e%25252e/x", "%2e",
    "%2f", "a%2fb", "%5c", "%5C..", "%00", "x/%00.bin",
    None, b"config.json", 1, 1.5, Path("config.json"), ["config.json"],
]  # fmt: skip
BAD_REPO_IDS: list[object] = [
    "a", "a/b/c", "/a", "a/", "/", "", "-a/b", "a/-b", "_a/b", ".a/b", "a--b/c", "a/b--c", "a..b/c",
    "a/b.git", "a/b.", "a/b-", "ö/b", "org/modèl", "a b/c", "a/b c", "a/b\n", "../x", "a/..", "a/%2e",
    "x" * 97 + "/y", "o/" + "m" * 97, "o/" + "m" * 200, None, b"a/b", 7, ("a", "b"),
]  # fmt: skip
BAD_REVISIONS: list[object] = [
    "", ".", "..", "a/../b", "a//b", "/main", "main/", "ma in", "main\n", "main\x00", "a\\b", "main.lock",
    "refs/pr/1.lock", ".hidden", "refs/.x", "a..b", "refs/pr..1", "v1..", "x" * 201, "ü", "%2e%2e", "HEAD~1", "main^", "a:b", "a*",
    # git's names for what is not a branch (an import under them made a repo without main, unreadable):
    "HEAD", "refs/heads/main", "refs/tags/v1", "-x", "a/-b",
    None, 1, b"main",
]  # fmt: skip
COMMIT_LIKE = [COMMIT, "0" * 40, "f" * 40]

GOOD_PATHS = [
    "config.json", "onnx/model_q4f16.onnx", "1_Pooling/config.json", "a%20b.txt", "100%.txt", "%zz", "%41",
    "...", "..a", "a..", ".gitattributes", "dir/.hidden", "日本語/ファイル.txt", "a" * 255,
    "/".join(["a" * 200] * 5), "C:/x", "~/x", "sp ace.txt",
]  # fmt: skip
GOOD_REPO_IDS = ["org/name", "a/b", "sentence-transformers/all-MiniLM-L6-v2", "Xenova/bert_base.v1",
                 "x" * 48 + "/" + "y" * 47, "0rg/9",
                 # (the Hub's limit is of each part: an org and a 90-character name is a real id)
                 "some-org/" + "n" * 90, "x" * 96 + "/" + "y" * 96]  # fmt: skip
GOOD_BRANCHES = ["main", "dev", "v1.0", "refs/pr/1", "release-2024_01", "a.b/c-d_e", "x" * 200]

Validator = Callable[[object], str]
BAD_CASES = (
    [pytest.param(validate_path, v, InvalidPathError, id=f"path-{v!r}") for v in BAD_PATHS]
    + [pytest.param(validate_repo_id, v, InvalidRepoIdError, id=f"repo-{v!r}") for v in BAD_REPO_IDS]
    + [pytest.param(f, v, InvalidRevisionError, id=f"{f.__name__}-{v!r}")
       for f in (validate_branch, validate_revision) for v in BAD_REVISIONS]
    + [pytest.param(validate_branch, v, InvalidRevisionError, id=f"branch-commit-{v}") for v in COMMIT_LIKE]
    # a new branch that reads as the start of a commit id would shadow the commit (reads take both)
    + [pytest.param(validate_new_branch, v, InvalidRevisionError, id=f"new-branch-{v}")
       for v in ["abcdef1", "ABCDEF1", "0123456789ABCdef", "f" * 39, "F" * 40, "HEAD", *COMMIT_LIKE]]
)  # fmt: skip


@pytest.mark.parametrize(("validator", "value", "error"), BAD_CASES)
def test_bad_input_raises_its_own_subclass(validator: Validator, value: object, error: type) -> None:
    with pytest.raises(InvalidInputError) as caught:
        validator(value)
    assert type(caught.value) is error
    assert isinstance(caught.value, ValueError)
    assert str(caught.value)


@pytest.mark.parametrize(
    ("validator", "value"),
    [pytest.param(validate_path, v, id=f"path-{v[:40]}") for v in GOOD_PATHS]
    + [pytest.param(validate_repo_id, v, id=f"repo-{v}") for v in GOOD_REPO_IDS]
    + [
        pytest.param(f, v, id=f"{f.__name__}-{v}")
        for f in (validate_branch, validate_revision, validate_new_branch)
        for v in GOOD_BRANCHES
    ]
    + [
        pytest.param(f, v, id=f"{f.__name__}-{v}")
        for f in (validate_branch, validate_new_branch)
        for v in ["abcdefg", "abcdef", "cafe-1"]
    ]
    + [pytest.param(validate_revision, v, id=f"revision-commit-{v}") for v in COMMIT_LIKE],
)
def test_good_input_is_returned_unchanged(validator: Validator, value: str) -> None:
    assert validator(value) is value


# -- properties -----------------------------------------------------------------------------------------

PIECES = ["a", "b", "Z", "0", ".", "..", "/", "\\", "%", "2", "e", "E", "f", "5", "c", "%2e", "%2f", "%25",
          "%5c", "%00", "\x00", "\n", " ", "é", "-", "_", ".git", ".lock", "--"]  # fmt: skip
tricky = st.lists(st.sampled_from(PIECES), max_size=14).map("".join)
any_text = st.one_of(st.text(), st.text(st.characters(exclude_categories=())), tricky)
segment = st.text(st.sampled_from("ab0._-%2efE5c"), min_size=1, max_size=8) | st.text(min_size=1, max_size=8)
pathlike = st.one_of(st.lists(segment, min_size=1, max_size=6).map("/".join), tricky)
BASE = os.path.join(os.sep, "srv", "store", "snapshots")
VALIDATORS = [validate_path, validate_repo_id, validate_branch, validate_revision]


@pytest.mark.parametrize("validator", VALIDATORS)
@given(value=any_text)
def test_validators_return_input_or_raise_invalid_input(validator: Validator, value: str) -> None:
    try:
        result = validator(value)
    except InvalidInputError:
        return
    assert result is value


@pytest.mark.parametrize("validator", VALIDATORS)
@given(
    value=st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text()), st.builds(Path, st.text()))
)
def test_validators_refuse_every_non_string(validator: Validator, value: object) -> None:
    with pytest.raises(InvalidInputError):
        validator(value)


def test_a_path_object_is_refused_with_the_text_to_give() -> None:
    """ML code holds pathlib paths: "must be a string, got PosixPath" left the user to guess what to give."""
    with pytest.raises(InvalidPathError, match=r"relative to the repo root \('onnx/model.onnx'\)"):
        validate_path(Path("onnx") / "model.onnx")


@given(path=pathlike)
def test_accepted_path_stays_inside_base(path: str) -> None:
    try:
        validate_path(path)
    except InvalidPathError:
        return
    joined = os.path.normpath(os.path.join(BASE, path))
    assert os.path.commonpath([BASE, joined]) == BASE
    assert joined != BASE
    assert os.path.relpath(joined, BASE) == path  # normalising changes nothing: no '.', '..' or '//'
    assert ".." not in path.split("/")
    assert not path.startswith("/")
    assert "\\" not in path
    assert "\x00" not in path


repo_part = st.text(st.sampled_from("aZ09._-"), min_size=1, max_size=10) | segment


@pytest.mark.parametrize(
    ("given", "hint"),
    [
        ("https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
         "give the id alone ('sentence-transformers/all-MiniLM-L6-v2')"),
        ("huggingface.co/acme/m/tree/main", "give the id alone ('acme/m')"),
        ("https://huggingface.co/acme/m?library=gguf#files", "give the id alone ('acme/m')"),
        ("all-MiniLM-L6-v2", "give its org too (like 'ORG/all-MiniLM-L6-v2'"),
        # (llama.cpp's -hf and Ollama's hf.co/ spelling of a quantization: an explorer's trial)
        ("bartowski/Big-GGUF:Q4_K_M", "give the id alone ('bartowski/Big-GGUF'), and the quantization apart (-q Q4_K_M"),
        ("hf.co/bartowski/Big-GGUF:q8_0", "give the id alone ('bartowski/Big-GGUF'), and the quantization apart (-q q8_0"),
        ("https://huggingface.co/acme/m:Q8_0", "give the id alone ('acme/m'), and the quantization apart (-q Q8_0"),
        ("acme/m:latest", "give the id alone ('acme/m'); without --quant, a load takes the default variant"),
    ],
)  # fmt: skip
def test_a_repo_given_as_its_page_or_without_its_org_is_told_what_to_type(given: str, hint: str) -> None:
    """A URL pasted from a browser, or a name without its org, was refused with no word of the id meant (an
    explorer's trial)."""
    with pytest.raises(InvalidRepoIdError, match=re.escape(hint)):
        validate_repo_id(given)


@given(repo_id=st.one_of(st.tuples(repo_part, repo_part).map("/".join), tricky))
def test_accepted_repo_id_is_two_ascii_parts_inside_base(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except InvalidRepoIdError:
        return
    assert repo_id.isascii()
    org, name = repo_id.split("/")
    assert org[0].isalnum()
    assert name[0].isalnum()
    assert os.path.relpath(os.path.normpath(os.path.join(BASE, repo_id)), BASE) == repo_id


@given(
    name=st.one_of(pathlike, tricky, st.text(st.sampled_from("0123456789abcdef"), min_size=40, max_size=40))
)
def test_accepted_branch_is_a_safe_ref_name(name: str) -> None:
    try:
        validate_branch(name)
    except InvalidRevisionError:
        if is_commit_id(name):
            assert validate_revision(name) is name
        return
    assert validate_revision(name) is name
    assert not is_commit_id(name)
    assert name.isascii()
    assert all(part not in ("", ".") for part in name.split("/"))
    assert ".." not in name
    assert "\\" not in name
    assert not name.endswith(".lock")


# -- through the public API: refused, and nothing written -----------------------------------------------


def store_state(depot: Depot) -> tuple[object, ...]:
    """Everything a call could change: the files under home, every index row, du() and list_repos()."""
    listing: list[tuple[object, ...]] = []
    for directory, dirs, names in os.walk(depot.home):
        for name in dirs + names:
            path = Path(directory, name)
            rel = path.relative_to(depot.home).as_posix()
            if path.is_symlink():
                listing.append((rel, "link", os.readlink(path)))
            elif path.is_dir():
                listing.append((rel, "dir"))
            elif name.startswith("index.db"):
                listing.append((rel, "index"))  # its content is compared through the rows below
            else:
                listing.append((rel, path.stat().st_mode, path.read_bytes()))
    index = depot.store.index
    tables = [r[0] for r in index.read("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    rows = {t: sorted(tuple(r) for r in index.read(f"SELECT * FROM {t}")) for t in tables}
    return sorted(listing), rows, depot.du(), depot.list_repos()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "source", sample_files(seed=3, big=70_000))


@pytest.fixture
def populated(depot: Depot, source: Path) -> Depot:
    depot.import_dir(source, REPO)
    depot.import_dir(source, REPO, "dev")
    return depot


Call = Callable[[Depot, Path], Any]
READERS: dict[str, Callable[[Depot, Any, Any, Any], Any]] = {
    "has_file": lambda d, r, p, v: d.has_file(r, p, v),
    "file_info": lambda d, r, p, v: d.file_info(r, p, v),
    "get_file": lambda d, r, p, v: d.get_file(r, p, v),
    "map_file": lambda d, r, p, v: d.map_file(r, p, v),
    "open_file": lambda d, r, p, v: d.open_file(r, p, v),
    "get_chunk": lambda d, r, p, v: d.get_chunk(r, p, 0, v),
    "file_path": lambda d, r, p, v: d.file_path(r, p, v),
}
API_REPOS = ["a", "../org/model", "org/model/x", "org/model.git", "org/../model", None]
API_PATHS = ["../config.json", "onnx/../config.json", "/config.json", "%2e%2e/config.json",
             "onnx%2fmodel_q4.onnx", "onnx\\model_q4.onnx", "", "config.json/", "config.json\x00"]  # fmt: skip
API_REVISIONS = ["..", "main/", "refs//pr", "main\x00", "main.lock", "../main"]


def _api_cases() -> list[Any]:
    cases: list[Any] = []

    def add(name: str, call: Call, error: type, value: object) -> None:
        kind = error.__name__.removeprefix("Invalid").removesuffix("Error")
        cases.append(pytest.param(call, error, id=f"{name}-{kind}-{value!r}"))

    for name, read in READERS.items():
        for r in API_REPOS:
            add(name, lambda d, s, read=read, r=r: read(d, r, "config.json", "main"), InvalidRepoIdError, r)
        for p in API_PATHS:
            add(name, lambda d, s, read=read, p=p: read(d, REPO, p, "main"), InvalidPathError, p)
        for v in [*API_REVISIONS, None]:
            add(name, lambda d, s, read=read, v=v: read(d, REPO, "config.json", v), InvalidRevisionError, v)
    for r in API_REPOS:
        add("snapshot_path", lambda d, s, r=r: d.snapshot_path(r), InvalidRepoIdError, r)
        add("repo_info", lambda d, s, r=r: d.repo_info(r), InvalidRepoIdError, r)
        if r is not None:  # verify(None) means "every repo"
            add("verify", lambda d, s, r=r: d.verify(r), InvalidRepoIdError, r)
        add("remove", lambda d, s, r=r: d.remove(r), InvalidRepoIdError, r)
        add("remove-rev", lambda d, s, r=r: d.remove(r, "main"), InvalidRepoIdError, r)
        add("import_dir", lambda d, s, r=r: d.import_dir(s, r), InvalidRepoIdError, r)
    add("verify", lambda d, s: d.verify(""), InvalidRepoIdError, "")
    for v in API_REVISIONS:  # remove(repo, None) removes every revision
        add("remove", lambda d, s, v=v: d.remove(REPO, v), InvalidRevisionError, v)
    for v in [*API_REVISIONS, None]:
        add("snapshot_path", lambda d, s, v=v: d.snapshot_path(REPO, v), InvalidRevisionError, v)
    for v in [*API_REVISIONS, COMMIT, None]:
        add("import_dir", lambda d, s, v=v: d.import_dir(s, "org/new", v), InvalidRevisionError, v)
        add("import_dir-existing", lambda d, s, v=v: d.import_dir(s, REPO, v), InvalidRevisionError, v)
    for i in [-1, 99, True, "0", 0.0, None]:
        add("get_chunk-index", lambda d, s, i=i: d.get_chunk(REPO, "config.json", i), InvalidRangeError, i)
    for q in [5, [5], [""], {"fp16"}, ["fp16\n"], []]:  # (refused before any scan: no source is given here)
        add("pull-quants", lambda d, s, q=q: d.pull(REPO, q), InvalidInputError, q)
    for q in [5, b"fp16"]:  # (an AttributeError from the variants' grouping)
        add("preload-quant", lambda d, s, q=q: d.preloader.preload(REPO, q), InvalidInputError, q)
    return cases


@pytest.mark.parametrize(("call", "error"), _api_cases())
def test_depot_refuses_bad_input_and_writes_nothing(
    populated: Depot, source: Path, call: Call, error: type
) -> None:
    before = store_state(populated)
    with pytest.raises(InvalidInputError) as caught:
        call(populated, source)
    assert type(caught.value) is error
    assert store_state(populated) == before


@pytest.mark.parametrize(
    "name",
    [
        "a\\b.bin",
        "bad\nname.txt",
        "tab\there",
        "%2e%2e",
        "..%2f",
        "%2fetc",
        "x%5cy",
        "sub\\dir/x.bin",
        b"\xff.bin",
        b"\xff\n\x1b]0;x\x07.bin",  # (its control characters shown escaped too: a review)
    ],
)
def test_import_of_folder_with_a_bad_file_name_writes_nothing(
    populated: Depot, tmp_path: Path, name: str | bytes
) -> None:
    folder = write_model_dir(tmp_path / "bad", sample_files(seed=9, big=1000))
    if isinstance(name, bytes):
        (Path(os.fsdecode(os.fsencode(folder) + b"/" + name))).write_bytes(b"x")
    else:
        write_model_dir(folder, {name: b"x"})
    before = store_state(populated)
    for repo in (REPO, "org/other"):
        with pytest.raises(InvalidPathError, match="cannot import") as refused:
            populated.import_dir(folder, repo)
        assert "\n" not in str(refused.value)  # (one line: the name was printed raw once)
        if isinstance(name, bytes):  # (was "contains a control character", the name shown as '\udcff.bin')
            assert "is not UTF-8 text (its byte 0xff" in str(refused.value), str(refused.value)
            assert "\x1b" not in str(refused.value) and "udc" not in str(refused.value)
    assert store_state(populated) == before


CLI_CASES = [
    ["path", "../x", "y"],
    ["path", REPO, "../config.json"],
    ["path", REPO, "config.json", "-r", "main/"],
    ["path", REPO, "-r", ".."],
    ["cat", REPO, "%2e%2e/config.json"],
    ["cat", REPO, "onnx\\model_q4.onnx"],
    ["cat", REPO, ""],
    ["info", "a"],
    ["info", "a/b/c"],
    ["verify", "a/b/c"],
    ["verify", "org/model."],
    ["rm", REPO, "-r", "..", "--yes"],
    ["rm", "org/model.git", "--yes"],
    ["import", "{source}", "--repo", "a--b/c"],
    ["import", "{source}", "--repo", "org/new", "-r", COMMIT],
    ["import", "{bad}", "--repo", "org/new"],
]


@pytest.mark.parametrize("args", CLI_CASES, ids=[" ".join(a) for a in CLI_CASES])
def test_cli_exits_2_on_bad_input_and_writes_nothing(
    populated: Depot, source: Path, tmp_path: Path, args: list[str]
) -> None:
    bad = write_model_dir(tmp_path / "bad", {"ok.txt": b"x", "a\\b.txt": b"y"})
    argv = [a.format(source=source, bad=bad) for a in args] + ["--home", str(populated.home)]
    before = store_state(populated)
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert "error" in result.stderr
    assert store_state(populated) == before


def test_cli_subprocess_exits_2_on_traversal(populated: Depot) -> None:
    before = store_state(populated)
    argv = [sys.executable, "-m", "modeldepot", "path", "../x", "y", "--home", str(populated.home)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stderr
    assert "repo id" in done.stderr
    assert done.stdout == ""
    assert store_state(populated) == before


def test_cli_bad_input_does_not_create_a_store(tmp_path: Path) -> None:
    """validation.py: every entry point, the CLI included, validates 'before touching the disk'."""
    home = tmp_path / "never-created"
    result = CliRunner().invoke(cli, ["info", "../x", "--home", str(home)])
    assert result.exit_code == 2
    assert not home.exists()
    # Nor a command that makes a store, given what cannot work (each made one, then failed: a CLI trial)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with taken:
        for args, env in (
            (["serve", "--port", port], {}),
            (["serve", "--host", "256.1.1.1", "--port", "8"], {}),
            (["budget", "none"], {}),
            (["import", str(model), "--repo", "acme/x"], {"MODELDEPOT_MAX_SIZE": "12XB"}),
        ):
            result = CliRunner().invoke(cli, [*args, "--home", str(home)], env=env)
            assert result.exit_code == 2, (args, result.output)
            assert not home.exists(), args
    absent = CliRunner().invoke(
        cli, ["import", str(tmp_path / "absent"), "--repo", "acme/x", "--home", str(home)]
    )
    assert absent.exit_code == 1 and "not a directory" in absent.output and not home.exists()  # (missing: 1)
