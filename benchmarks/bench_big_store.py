"""Upkeep of a big store: removals (each one, and so each unit the disk budget evicts) and a whole `verify`,
with this code and with the code before (a worktree given as ``--before``), measured in the same run.

    .venv/bin/python benchmarks/bench_big_store.py --before /tmp/old-worktree [--repos 4000] [--repeat 3]

A store of ``--repos`` repos of four small files each (made once, with the code before: this code upgrades
an older store's index as it opens it, the other way round it is refused) is copied afresh for each
run; a run removes 40 of its repos one after the other (``Depot.remove``), then verifies the whole store
(``Depot.verify``), in a process of its own on the code under test. Each removal reads the whole ``files``
table (it does not trust the index by blob: see ``store/maintenance.py``), so its cost grows with the store;
verify records the blobs that passed. The floor is the index's work alone, so no outside anchor: the ratios
are before / after, above 1 faster now.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REMOVALS = 40
BUILD = r"""
import sys, pathlib
from modeldepot import Depot
home, count = pathlib.Path(sys.argv[1]), int(sys.argv[2])
folder = home.parent / "src"
with Depot(home) as depot:
    for number in range(count):
        for name in ("config.json", "tokenizer.json", "model.safetensors", "README.md"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(f"{name} of repo {number}\n" * (1 + number % 7))
        depot.import_dir(folder, f"bench/repo-{number:05d}")
"""
RUN = r"""
import json, sys, time, pathlib
from modeldepot import Depot
home, count, removals = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with Depot(home) as depot:
    step = max(1, count // removals)
    began = time.perf_counter()
    for number in range(0, step * removals, step):
        depot.remove(f"bench/repo-{number:05d}")
    removed = time.perf_counter() - began
    began = time.perf_counter()
    report = depot.verify()
    verified = time.perf_counter() - began
    assert not report.problems, report.problems
print(json.dumps({"remove": removed / removals, "verify": verified, "blobs": report.blobs_checked}))
"""


def run(src: Path, home: Path, *args: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", RUN, str(home), *args], env={**os.environ, "PYTHONPATH": str(src)},
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the run on {src} failed:\n{done.stderr}")
    found: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, required=True, help="a worktree of the code before (its root)")
    parser.add_argument("--repos", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    args = parser.parse_args()
    ours = Path(__file__).resolve().parent.parent / "src"
    work = args.dir.resolve() / "big-store"
    made = work / f"store-{args.repos}"
    if not (made / "index.db").exists():
        shutil.rmtree(work, ignore_errors=True)
        made.parent.mkdir(parents=True)
        subprocess.run([sys.executable, "-c", BUILD, str(made), str(args.repos)],
                       env={**os.environ, "PYTHONPATH": str(args.before.resolve() / "src")}, check=True)  # fmt: skip
    samples: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(args.repeat):  # (alternated: the machine's drift falls on both)
        for name, src in (("before", args.before.resolve() / "src"), ("after", ours)):
            home = work / "run"
            shutil.rmtree(home, ignore_errors=True)
            shutil.copytree(made, home, symlinks=True)
            samples[name].append(run(src, home, str(args.repos), str(REMOVALS)))
    blobs = int(samples["after"][0]["blobs"])
    print(f"a store of {args.repos} repos ({blobs} blobs after {REMOVALS} removals)")
    for what in ("remove", "verify"):
        print(f"{what} samples (s): before {', '.join(f'{s[what]:.3f}' for s in samples['before'])}; "
              f"after {', '.join(f'{s[what]:.3f}' for s in samples['after'])}")  # fmt: skip
    print("\n| work | before | after | ratio |\n| --- | --- | --- | --- |")
    for what, label in (("remove", "one removal (of 40 in a row)"), ("verify", "verify of the whole store")):
        before = statistics.median(s[what] for s in samples["before"])
        after = statistics.median(s[what] for s in samples["after"])
        print(f"| {label} | {before:.3f} s | {after:.3f} s | {before / after:.1f}× |")


if __name__ == "__main__":
    main()
