"""The layering of docs/architecture.md: a module may import only from its own layer or those below."""

from __future__ import annotations

import ast
from pathlib import Path

import modeldepot

PACKAGE = Path(modeldepot.__file__).parent

# Bottom to top. A module's layer is the first entry that prefixes its dotted name.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("modeldepot._version", "modeldepot.errors", "modeldepot.validation", "modeldepot.config",
         "modeldepot.hashing", "modeldepot.gitobjects", "modeldepot.modelcard", "modeldepot.counters",
         "modeldepot.ratelimit", "modeldepot.openfiles", "modeldepot.memory")),
    (1, ("modeldepot.store",)),
    (2, ("modeldepot.hub", "modeldepot.transfer", "modeldepot.preload", "modeldepot.engines",
         "modeldepot.discovery", "modeldepot.hfcache", "modeldepot.tiers", "modeldepot.uses",
         "modeldepot.enginekeys", "modeldepot.upstream")),
    (3, ("modeldepot.depot", "modeldepot.upkeep", "modeldepot.guards", "modeldepot.held", "modeldepot.mirror",
         "modeldepot.running", "modeldepot.recovery")),
    (4, ("modeldepot.cli", "modeldepot.server", "modeldepot.dashboard", "modeldepot.__main__", "modeldepot.launch",
         "modeldepot")),
]  # fmt: skip


def layer_of(module: str) -> int:
    for rank, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "modeldepot"):
            return rank
    if module == "modeldepot":
        return 4
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return [m for m in found if m == "modeldepot" or m.startswith("modeldepot.")]


def test_no_module_imports_a_higher_layer() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported in imported_modules(path):
            if layer_of(imported) > layer_of(importer):
                violations.append(f"{importer} (layer {layer_of(importer)}) imports {imported} "
                                  f"(layer {layer_of(imported)})")  # fmt: skip
    assert violations == []


def test_store_knows_nothing_of_http() -> None:
    for path in (PACKAGE / "store").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {
            n for n in names if n.split(".")[0] in {"aiohttp", "http", "urllib3", "requests", "httpx"}
        }


LOCKING = {"flock", "lockf", "F_SETLK", "F_SETLKW", "F_OFD_SETLK", "F_OFD_SETLKW"}


def flock_calls(path: Path) -> list[int]:
    """The lines of ``path`` that lock a file other than through store/locks.py (``fcntl.flock``, ``lockf``, a
    POSIX or open file description lock, whatever the name ``fcntl`` or its functions go by)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in LOCKING:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "fcntl":
            lines += [node.lineno for alias in node.names if alias.name in LOCKING | {"*"}]
    return sorted(lines)


def test_every_lock_is_taken_through_take_flock(tmp_path: Path) -> None:
    """One way to take a flock (store/locks.py), so that a forked worker lets go of every lock its parent
    held (a plain ``fcntl.flock`` elsewhere would be kept by the worker past the parent's end)."""
    calls = {
        str(path.relative_to(PACKAGE)): lines for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "store" / "locks.py" and (lines := flock_calls(path))
    }  # fmt: skip
    assert calls == {}
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import fcntl\nimport fcntl as f\nfrom fcntl import flock\n"
        "fcntl.flock(0, fcntl.LOCK_EX)\nf.lockf(0, f.LOCK_EX)\nfcntl.fcntl(0, fcntl.F_OFD_SETLK, b'')\n"
    )
    assert flock_calls(probe) == [3, 4, 5, 6]


def test_the_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "modeldepot" / "store" / "_layer_probe.py"  # a store module, outside src/
    bad.parent.mkdir(parents=True)
    bad.write_text("from modeldepot.depot import Depot\n")
    importer = module_name(bad, tmp_path)
    assert importer == "modeldepot.store._layer_probe"
    assert any(layer_of(m) > layer_of(importer) for m in imported_modules(bad))


def test_public_api_is_pinned() -> None:
    assert set(modeldepot.__all__) == {
        "ConfigError", "CorruptBlobError", "Depot", "DepotConfig", "DepotError", "DiskUsage",
        "EntryNotFoundError", "FileEntry", "GcReport", "ImportResult", "IntegrityError", "InvalidInputError",
        "InvalidPathError", "InvalidRangeError", "InvalidRepoIdError", "InvalidRevisionError", "MappedFile",
        "NotFoundError", "RemoveResult", "RepoInfo", "RepoNotFoundError", "RepoSummary", "RevisionInfo",
        "RevisionNotFoundError", "SharedBlobsRemovedError", "SourceDirectoryError", "StoreError", "StoreFullError", "StoreClosedError",
        "StoreSchemaError",
        "VerifyProblem", "VerifyReport", "__version__", "UpstreamError", "UpstreamDataError", "UpstreamTimeoutError", "AccessDeniedError",
        "OfflineError", "PullRunningError", "ChunkNotAvailableError", "ReadOnlyStoreError", "CommitConflictError",
        "BlobRemovedError", "IndexDamagedError", "BudgetExceededError", "MemoryShortError",
        "VariantNotFoundError", "EngineMismatchError", "GatedRepoError",
    }  # fmt: skip
    for name in modeldepot.__all__:
        assert hasattr(modeldepot, name)
