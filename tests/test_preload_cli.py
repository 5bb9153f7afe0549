"""The preload and stats commands, and `serve --preload-top` bringing the hot model back into RAM after
a restart, measured with mincore from outside the server."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from conftest import drop_page_cache, free_port, wait_until, write_model_dir
from modeldepot import Depot
from modeldepot.cli import cli
from modeldepot.preload import resident_in_ram

MiB = 1024 * 1024


def make_store(home: Path, tmp_path: Path) -> None:
    with Depot(home) as depot:
        for seed, name in enumerate(("hot", "cold")):
            files = {"config.json": b"{}", "model.safetensors": random.Random(seed).randbytes(8 * MiB)}
            depot.import_dir(write_model_dir(tmp_path / name, files), f"acme/{name}")
        for _ in range(3):
            depot.get_file("acme/hot", "model.safetensors")
        depot.get_file("acme/cold", "model.safetensors")
        for name in ("hot", "cold"):
            drop_page_cache(depot, f"acme/{name}")


def test_preload_and_stats_commands(home: Path, tmp_path: Path) -> None:
    make_store(home, tmp_path)
    runner = CliRunner()
    done = runner.invoke(cli, ["preload", "acme/hot", "--home", str(home), "--json"])
    assert done.exit_code == 0, done.output
    info = json.loads(done.output)
    assert info["resident_bytes"] == info["bytes"] == 8 * MiB + 2
    shown = runner.invoke(cli, ["stats", "--home", str(home), "--json"])
    models = {m["repo_id"]: m for m in json.loads(shown.output)["models"]}
    assert models["acme/hot"]["count"] == 3 and models["acme/cold"]["count"] == 1
    assert models["acme/hot"]["resident_bytes"] == 8 * MiB + 2, "the pages outlive the preload command"
    assert models["acme/cold"]["resident_bytes"] < MiB
    table = runner.invoke(cli, ["stats", "--home", str(home)])
    assert table.exit_code == 0 and "acme/hot" in table.output and "100%" in table.output
    assert runner.invoke(cli, ["preload", "acme/cold", "--home", str(home)]).exit_code == 0
    first = runner.invoke(cli, ["stats", "--top", "1", "--home", str(home), "--json"])
    assert [m["repo_id"] for m in json.loads(first.output)["models"]] == ["acme/hot"], (
        "a used model past --top is not listed again as never used"
    )
    bad = runner.invoke(cli, ["preload", "../x", "--home", str(home)])
    assert bad.exit_code == 2
    # A removed repo, however used, is not among the most used: it took the top rows as "0 B" (a trial)
    assert runner.invoke(cli, ["rm", "acme/hot", "--yes", "--home", str(home)]).exit_code == 0
    first = runner.invoke(cli, ["stats", "--top", "1", "--home", str(home), "--json"])
    assert [m["repo_id"] for m in json.loads(first.output)["models"]] == ["acme/cold"], first.output


def test_serve_preload_top_brings_the_hot_model_back_into_ram(home: Path, tmp_path: Path) -> None:
    make_store(home, tmp_path)
    port = free_port()

    def preloaded_stats() -> dict[str, Any] | None:
        """The node's stats once its background preload has finished; None before (or before it listens)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/depot/v1/stats", timeout=5) as reply:
                stats: dict[str, Any] = json.load(reply)
        except OSError:
            return None
        return stats if stats["preload"]["models"] else None

    process = subprocess.Popen(
        [sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(port),
         "--preload-top", "1", "--preload-budget", "64MiB"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        stats = wait_until(preloaded_stats, 60, "serve --preload-top to preload a model", process)
        preload = stats["preload"]
        assert [m["repo_id"] for m in preload["models"]] == ["acme/hot"]
        assert preload["budget_bytes"] == 64 * MiB
        with Depot(home) as depot:
            hot, hot_total = resident_in_ram(depot.store, "acme/hot")
            cold, _ = resident_in_ram(depot.store, "acme/cold")
        assert hot == hot_total and cold < MiB
        assert stats["most_accessed"][0]["repo_id"] == "acme/hot"
    finally:
        process.terminate()
        process.wait(30)


def test_stats_lists_a_model_in_ram_that_was_never_used(home: Path, tmp_path: Path) -> None:
    """A preload is no use (it does not count), but a model in RAM is what stats shows: it said "No model
    has been used yet" right after a preload. Its last use is the one the store recorded (the import's,
    which the disk budget evicts by): it said "never" (a trial)."""
    imported = time.time()
    with Depot(home) as depot:
        files = {"config.json": b"{}", "model.safetensors": random.Random(3).randbytes(4 * MiB)}
        depot.import_dir(write_model_dir(tmp_path / "fresh", files), "acme/fresh")
        drop_page_cache(depot, "acme/fresh")
    runner = CliRunner()
    assert runner.invoke(cli, ["preload", "acme/fresh", "--home", str(home)]).exit_code == 0
    shown = runner.invoke(cli, ["stats", "--home", str(home), "--json"])
    [model] = json.loads(shown.output)["models"]
    assert (model["repo_id"], model["count"]) == ("acme/fresh", 0)
    assert imported - 1 <= model["last_access"] <= time.time()
    assert model["resident_bytes"] == model["bytes"] == 4 * MiB + 2
    table = runner.invoke(cli, ["stats", "--home", str(home)])
    assert table.exit_code == 0 and "acme/fresh" in table.output and "never" not in table.output, table.output


def test_stats_sizes_a_variant_by_its_files_and_finds_a_repo_without_main(home: Path, tmp_path: Path) -> None:
    """A use of one quant was shown with the whole revision's size; a repo held without a main branch (pulled
    by commit id, imported to another branch) was taken for removed, and its preload went unseen."""
    rng = random.Random(5)
    quants = {
        "config.json": b"{}",
        "m-Q4_K_M.gguf": rng.randbytes(MiB),
        "m-Q8_0.gguf": rng.randbytes(2 * MiB),
    }
    with Depot(home) as depot:
        depot.import_dir(write_model_dir(tmp_path / "q", quants), "acme/q")
        depot.import_dir(write_model_dir(tmp_path / "d", {"model.safetensors": rng.randbytes(MiB)}), "acme/d",
                         revision="dev")  # fmt: skip
        depot.load("acme/q", "Q8_0", engine=lambda path: path.name)  # a use of Q8_0
        depot.store.access.flush()
    runner = CliRunner()
    assert runner.invoke(cli, ["preload", "acme/d", "-r", "dev", "--home", str(home)]).exit_code == 0
    shown = runner.invoke(cli, ["stats", "--home", str(home), "--json"])
    models = {(m["repo_id"], m["variant"]): m for m in json.loads(shown.output)["models"]}
    assert models[("acme/q", "Q8_0")]["bytes"] == 2 * MiB + 2, models
    assert models[("acme/d", "")]["bytes"] == models[("acme/d", "")]["resident_bytes"] == MiB, models
    # A quant removed since is listed with nothing (its shared config was shown as it: 2 B, all in RAM)
    assert (
        runner.invoke(cli, ["rm", "acme/q", "--quant", "Q8_0", "--yes", "--home", str(home)]).exit_code == 0
    )
    shown = runner.invoke(cli, ["stats", "--home", str(home), "--json"])
    models = {(m["repo_id"], m["variant"]): m for m in json.loads(shown.output)["models"]}
    assert (models[("acme/q", "Q8_0")]["bytes"], models[("acme/q", "Q8_0")]["resident_bytes"]) == (0, 0), (
        models
    )


def test_preload_command_with_a_private_copy_strategy_fills_the_page_cache_and_says_so(
    home: Path, tmp_path: Path
) -> None:
    # A copy in the command's own memory went with it, while the command said it was preloaded.
    make_store(home, tmp_path)
    done = CliRunner().invoke(
        cli, ["preload", "acme/hot", "--home", str(home)], env={"MODELDEPOT_PRELOAD_STRATEGY": "read"}
    )
    assert done.exit_code == 0, done.output
    assert "MODELDEPOT_PRELOAD_STRATEGY=read" in done.output and "fills the page cache" in done.output
    with Depot(home) as depot:
        in_ram, size = resident_in_ram(depot.store, "acme/hot", None, check=False)
    assert in_ram == size == 8 * MiB + 2, "the pages outlive the command"
