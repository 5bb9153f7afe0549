"""Worker start, cold against preloaded; and the loaded-model cache's hit latency against cachetools.

1. Worker start: a fresh Python process opens the depot and creates an onnxruntime session on a ~1 GiB
   model with external data (``Depot.load``, no warmup; the weights stay mapped, not prepacked), then
   runs one inference. Cold: every blob of the
   model dropped from the page cache first (``POSIX_FADV_DONTNEED``). Preloaded: this process holds the
   model with the page-cache preloader (one copy in RAM, shared with the worker). Timed inside the worker,
   from before ``Depot()`` to after the inference.
2. The same for safetensors: ``Depot.load(engine="safetensors")`` of a ~2 GiB file (read-only arrays
   mapping the file), then one byte of every page of every tensor read, so all of it is in RAM.
3. A cache hit: ``LoadedModelCache.get_or_load`` against ``cachetools.LRUCache`` behind a
   ``threading.Lock`` (the anchor the issue names), nanoseconds per hit, single thread.

Run: .venv/bin/python benchmarks/bench_load.py [--onnx-size 1GiB] [--st-size 2GiB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import Row, render
from modeldepot import Depot
from modeldepot.config import parse_size
from modeldepot.engines import LoadedModelCache
from modeldepot.preload import Preloader

ONNX_REPO, ST_REPO = "bench/onnx-big", "bench/st-big"
WIDTH = 4096  # a square float32 weight of 4096 x 4096 is 64 MiB

WORKER = """
import sys, time, json
started = time.perf_counter()
from modeldepot import Depot
home, repo, kind, width = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
depot = Depot(home)
if kind == "onnx":
    import numpy as np
    session = depot.load(repo, warmup=0)
    session.run(None, {"x": np.ones((1, width), dtype=np.float32)})
else:
    import numpy as np
    tensors = depot.load(repo, engine="safetensors", warmup=0)
    for tensor in tensors.values():  # one byte of every page of every tensor: all of it must be in RAM
        np.bitwise_xor.reduce(tensor.reshape(-1).view(np.uint8)[::4096])
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def make_onnx_repo(folder: Path, size: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers = max(1, size // (WIDTH * WIDTH * 4))
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    previous = "x"
    for number in range(layers):
        weight = (rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) / WIDTH).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{number}"))
        nodes.append(helper.make_node("MatMul", [previous, f"w{number}"], [f"h{number}"]))
        previous = f"h{number}"
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, WIDTH])], weights)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)  # fmt: skip
    (folder / "config.json").write_text("{}")


def make_safetensors_repo(folder: Path, size: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    count = max(1, size // (64 << 20))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"t{i}": rng.standard_normal((16 << 20,), dtype=np.float32) for i in range(count)},
              str(folder / "model.safetensors"))  # fmt: skip
    (folder / "config.json").write_text("{}")


def drop_cache(depot: Depot, repo: str) -> None:
    for entry in depot.list_files(repo):
        fd = os.open(depot.store.blobs.path(entry.sha256), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def worker(home: Path, repo: str, kind: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELDEPOT_")}
    out = subprocess.run([sys.executable, "-c", WORKER, str(home), repo, kind, str(WIDTH)], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def start_rows(depot: Depot, home: Path, repeat: int, notes: list[str]) -> list[Row]:
    rows = []
    for repo, kind, label in ((ONNX_REPO, "onnx", "onnxruntime session + 1 inference"),
                              (ST_REPO, "st", "safetensors via Depot.load, every page touched")):  # fmt: skip
        size = sum(f.size for f in depot.list_files(repo))
        cold, warm = [], []
        for _ in range(repeat):
            drop_cache(depot, repo)
            cold.append(worker(home, repo, kind))
            preloader = Preloader(depot, budget=size + (64 << 20))
            drop_cache(depot, repo)
            info = preloader.preload(repo)
            warm.append(worker(home, repo, kind))
            preloader.close()
            notes.append(f"{label}: preload of {info.bytes / 2**30:.2f} GiB took {info.seconds:.2f} s "
                         f"({info.resident_bytes / 2**30:.2f} GiB resident)")  # fmt: skip
        rows.append(Row(f"worker start, {label}", "cold (page cache dropped)", statistics.median(cold),
                        statistics.median(warm), size, 3.0))  # fmt: skip
    return rows


def hit_row(ops: int) -> Row:
    from cachetools import LRUCache

    anchor: LRUCache[str, object] = LRUCache(maxsize=4)
    lock = threading.Lock()
    engine = object()
    anchor["model"] = engine
    ours: LoadedModelCache[object] = LoadedModelCache(max_models=4)
    ours.get_or_load("model", lambda: engine, size=1)

    def anchor_hit() -> object:
        with lock:
            return anchor["model"]

    def load() -> object:
        return engine

    def timed(call: object) -> float:
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(ops):
                call()  # type: ignore[operator]
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    anchor_s = timed(anchor_hit)
    ours_s = timed(lambda: ours.get_or_load("model", load))
    return Row(f"cache hit x {ops}", "cachetools.LRUCache + Lock", anchor_s, ours_s, 0, round(1 / 1.5, 2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnx-size", default="1GiB")
    parser.add_argument("--st-size", default="2GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"))
    args = parser.parse_args()
    work = args.dir.resolve() / "load"
    home = work / "store"
    with Depot(home) as depot:
        for repo, make, size in (
            (ONNX_REPO, make_onnx_repo, args.onnx_size),
            (ST_REPO, make_safetensors_repo, args.st_size),
        ):
            try:
                depot.resolve(repo)
            except Exception:
                make(work / repo, parse_size(size))
                depot.import_dir(work / repo, repo)
        notes: list[str] = []
        rows = start_rows(depot, home, args.repeat, notes)
    rows.append(hit_row(200_000))
    render("worker start cold vs preloaded; cache hit latency", rows)
    print()
    for note in notes:
        print(note)
    hit = rows[-1]
    print(f"cache hit: ours {hit.ours_s / 200_000 * 1e9:.0f} ns, anchor {hit.anchor_s / 200_000 * 1e9:.0f} ns "
          f"(ours / anchor = {hit.ours_s / hit.anchor_s:.2f}, goal <= 1.5)")  # fmt: skip


if __name__ == "__main__":
    main()
