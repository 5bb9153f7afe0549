"""``modeldepot import`` of one big file with the CLI against ``cp`` then ``openssl sha256`` (issue 14).

    .venv/bin/python benchmarks/bench_import.py [--sizes 1GiB,2GiB] [--repeat 3] [--dir ./bench-data] [--quick]

For each size, a folder holding one random ``model.safetensors`` (page cache warm). Interleaved, each run
after an untimed ``sync`` and memory the size of the file recycled (``bench_pull.recycle_memory``: this VM
hands freed memory back to its host within a second or two, and a page fresh from there costs ~2.5 s
per GiB on first touch), median of ``--repeat``:

- ours: ``modeldepot import FOLDER --repo bench/import --home STORE --json``, a fresh process (interpreter
  start-up and imports included) into a fresh store that is deleted afterwards. Durability is the
  store's default (``MODELDEPOT_DURABILITY`` unset: deferred, nothing waits for the disk) unless the
  environment sets it; the output says which. The store's blob file must be named by the file's SHA-256.
- anchor: ``sh -c 'cp FILE DEST && openssl sha256 FILE'``: copy, then hash, one after the other, neither
  flushing (DEST is deleted afterwards). Goal: anchor time / our time >= 1.2. (coreutils 9's ``cp`` copies
  with ``copy_file_range``, inside the kernel: its bytes never pass through user memory, ours do.)
- ``modeldepot import --link``: the same, the file hard-linked into the store instead of copied (only the
  hashing is left); held to the same goal.
- printed beside it, not a goal: ``cp FILE DEST & openssl sha256 FILE; wait``, copy and hash at once on
  the two cores (the stronger anchor), and the floor: SHA-256 of the file on one core (``hashlib``,
  16 MiB reads from the page cache) plus the interpreter's start-up (``python -c pass``); also
  ``import modeldepot.cli`` (what our process pays before it reads a byte) and ``dd bs=16M
  conv=fdatasync`` of the file into the work folder (the disk, for a flushing import).

Ratios are anchor time / our time: above 1 we are faster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench_pull import interleaved, machine_facts, modeldepot, recycle_memory, use_bytecode_cache
from common import Row, random_file, render
from modeldepot.config import parse_size

REPO = "bench/import"
FILE = "model.safetensors"
GOAL = 1.2


def sha256_file(path: Path) -> str:
    """SHA-256 of ``path`` on this thread, 16 MiB reads."""
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


class Case:
    """One file size: its folder, and every measure of one round."""

    def __init__(self, work: Path, size: int, seed: int) -> None:
        self.work, self.size = work, size
        self.folder = work / f"source-{size}"
        random_file(self.folder / FILE, size, seed)
        if [p.name for p in self.folder.iterdir()] != [FILE]:
            raise RuntimeError(f"{self.folder} holds more than {FILE}: delete it")
        self.source = self.folder / FILE
        self.sha256 = sha256_file(self.source)  # also puts the file in the page cache
        self.label = f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size / 2**20:g} MiB"

    def _timed(self, command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
        """Wall time of ``command`` (after an untimed sync and memory the size of the file recycled: both
        sides write the file's bytes into new page-cache pages, see bench_pull.recycle_memory), and its
        stdout."""
        os.sync()
        recycle_memory(self.work, self.size + (64 << 20))
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return seconds, done.stdout

    def ours(self, link: bool = False) -> float:
        home = self.work / "store"
        env = {**os.environ}
        env.pop("MODELDEPOT_HOME", None)
        command = modeldepot("import", str(self.folder), "--repo", REPO, "--home", str(home), "--json",
                             *(["--link"] if link else []))  # fmt: skip
        shutil.rmtree(home, ignore_errors=True)
        try:
            seconds, out = self._timed(command, env)
            result = json.loads(out)
            blob = home / "blobs" / self.sha256[:2] / self.sha256
            ok = result["files"] == 1 and result["bytes"] == self.size and blob.is_file()
            ok = ok and result["linked_bytes"] == (self.size if link else 0)
        finally:
            shutil.rmtree(home, ignore_errors=True)
        if not ok:
            raise RuntimeError(f"import reported {result}; blob {blob} there: {blob.is_file()}")
        return seconds

    def _anchor(self, script: str) -> float:
        dest = self.work / "anchor-dest"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        target = dest / FILE
        try:
            seconds, out = self._timed(["sh", "-c", script, "anchor", str(self.source), str(target)])
            copied = target.stat().st_size if target.exists() else -1
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        if self.sha256 not in out or copied != self.size:
            raise RuntimeError(f"the anchor printed {out!r} and copied {copied} bytes")
        return seconds

    def cp_then_sha(self) -> float:
        return self._anchor('cp "$1" "$2" && openssl sha256 "$1"')

    def cp_with_sha(self) -> float:
        return self._anchor('cp "$1" "$2" & copy=$!; openssl sha256 "$1" || exit 1; wait $copy')

    def sha256_one_core(self) -> float:
        os.sync()
        start = time.perf_counter()
        digest = sha256_file(self.source)
        seconds = time.perf_counter() - start
        if digest != self.sha256:
            raise RuntimeError("the file changed under the benchmark")
        return seconds

    def dd_fdatasync(self) -> float:
        target = self.work / "dd-floor.bin"
        target.unlink(missing_ok=True)
        os.sync()
        start = time.perf_counter()
        subprocess.run(["dd", f"if={self.source}", f"of={target}", "bs=16M", "conv=fdatasync", "status=none"],
                       check=True)  # fmt: skip
        seconds = time.perf_counter() - start
        target.unlink()
        return seconds


def with_cpu(action: Callable[[], float], into: list[tuple[float, float]]) -> Callable[[], float]:
    """``action``, appending to ``into`` the user and system CPU seconds its child processes used."""

    def run() -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds = action()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        into.append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))
        return seconds

    return run


def python_run(code: str) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - start

    return run


def _gbps(size: int, seconds: float) -> str:
    return f"{seconds:.3f} s ({size / seconds / 1e9:.2f} GB/s)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1GiB,2GiB", help="one case per size, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    parser.add_argument("--quick", action="store_true", help="128MiB,256MiB, one run: a sanity check")
    parser.add_argument("--keep", action="store_true", help="keep the generated files for the next run")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeat = "128MiB,256MiB", 1
    sizes = [parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
    work = args.dir.resolve() / "import"
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "store", ignore_errors=True)
    bytecode = use_bytecode_cache(work)
    print(machine_facts())
    print(bytecode)
    print(
        f"median of {args.repeat} interleaved runs; every run after an untimed sync and recycling memory the size of the file"
    )
    rows: list[Row] = []
    table: list[str] = []
    notes: list[str] = []
    try:
        for i, size in enumerate(sizes):
            case = Case(work, size, 31 + i)
            cpu: dict[str, list[tuple[float, float]]] = {"modeldepot import": [], "cp && openssl sha256": []}
            actions: dict[str, Callable[[], float]] = {
                "modeldepot import": with_cpu(case.ours, cpu["modeldepot import"]),
                "cp && openssl sha256": with_cpu(case.cp_then_sha, cpu["cp && openssl sha256"]),
                "cp & openssl sha256": case.cp_with_sha,
                "modeldepot import --link": lambda case=case: case.ours(link=True),
                "sha256": case.sha256_one_core,
                "python -c pass": python_run("pass"),
                "import modeldepot.cli": python_run("import modeldepot.cli"),
                "dd": case.dd_fdatasync,
            }
            started = time.perf_counter()
            samples = interleaved(actions, args.repeat)
            elapsed = time.perf_counter() - started
            t = {name: statistics.median(values) for name, values in samples.items()}
            ours, floor = t["modeldepot import"], t["sha256"] + t["python -c pass"]
            rows.append(Row(f"import {case.label}, CLI", "cp && openssl sha256", t["cp && openssl sha256"],
                            ours, size, GOAL))  # fmt: skip
            rows.append(Row(f"import --link {case.label}, CLI", "cp && openssl sha256",
                            t["cp && openssl sha256"], t["modeldepot import --link"], size, GOAL))  # fmt: skip
            table.append(
                f"| {case.label} | {_gbps(size, ours)} | {_gbps(size, t['cp && openssl sha256'])} | "
                f"{_gbps(size, t['cp & openssl sha256'])} ({t['cp & openssl sha256'] / ours:.2f}x) | "
                f"{_gbps(size, t['sha256'])} | {t['python -c pass']:.3f} s | {_gbps(size, floor)} | "
                f"{floor / ours:.2f} | {t['import modeldepot.cli']:.3f} s | {_gbps(size, t['dd'])} |"
            )
            notes.append(f"{case.label}: measured in {elapsed:.0f} s; samples (s): " + "; ".join(
                f"{name} " + ", ".join(f"{v:.3f}" for v in values) for name, values in samples.items()))  # fmt: skip
            notes.append(f"{case.label}: CPU seconds of the processes (medians, user + system): " + ", ".join(
                f"{name} {statistics.median(u for u, _ in v):.2f} + {statistics.median(s for _, s in v):.2f} "
                f"(wall {t[name]:.2f})" for name, v in cpu.items()))  # fmt: skip
            notes.append(f"{case.label}: ours less the floor (SHA-256 + python -c pass): {ours - floor:.3f} s, "
                         f"of which importing modeldepot.cli is about "
                         f"{t['import modeldepot.cli'] - t['python -c pass']:.3f} s")  # fmt: skip
            if not args.keep:
                shutil.rmtree(case.folder, ignore_errors=True)
    finally:
        shutil.rmtree(work / "store", ignore_errors=True)
        shutil.rmtree(work / "anchor-dest", ignore_errors=True)
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "200")  # rich's table unwrapped in a log file
    render("issue 14: modeldepot import (CLI, process start-up included) vs cp && openssl sha256", rows)
    print("\nBeside it, same loop (medians; no goals but the table's):\n")
    print("| file | modeldepot import | cp && openssl sha256 | cp & openssl sha256 at once (its ratio) | "
          "SHA-256, one core | python -c pass | floor: SHA-256 + start-up | floor / ours | "
          "python -c 'import modeldepot.cli' | dd conv=fdatasync |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for line in table:
        print(line)
    print()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
