"""What a depot's parts do once the depot is dropped, and what an update upstream leaves held (review 28):
a store, tiers or RAM tier kept alone stay open, a dropped depot's preloads let go of their descriptors, an
export made while a pull ran does not pin the cache's ref, a carried variant is not fetched again, and
`path -q` advises no pull that cannot work."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SMALL_CHUNK, LiveNode, hub_path_depot, serving_repo, write_model_dir
from modeldepot import Depot

REPO = "onnx-community/tiny"
FILES = {
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b'{"vocab": {"a": 0}}',
    "onnx/model.onnx": bytes(range(256)) * 900,
    "onnx/model_q4f16.onnx": b"q4f16" * 40_000,
    "onnx/model_fp16.onnx": b"fp16" * 30_000,
}


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "src", {"config.json": b"{}", "w.safetensors": b"w" * 5000}),
                         "acme/m")  # fmt: skip
    return home


# -- a part of a depot kept alone: its store stays open ---------------------------------------------------------


def test_the_readme_preloader_of_a_depot_not_kept_still_works(tmp_path: Path) -> None:
    """README: "`Depot().preloader`; `Preloader(depot, ...)` builds one of your own". The depot, not kept,
    is collected at once (refcount): its finalizer closed the store the preloader reads (a review)."""
    from modeldepot.preload import Preloader

    home = _home(tmp_path)
    preloader = Depot(home).preloader
    preloader.preload("acme/m")  # (a StoreClosedError when the depot's collection closed its store)
    own = Preloader(Depot(home), budget="64MiB")
    own.preload("acme/m")  # (a StoreClosedError when the depot's collection closed its store)
    preloader.close()
    own.close()


def test_a_depots_store_kept_alone_stays_open(tmp_path: Path) -> None:
    home = _home(tmp_path)
    store = Depot(home).store
    assert store.resolve(
        "acme/m", "main"
    )  # (a StoreClosedError when the depot's collection closed its store)


def test_a_depots_tiers_kept_alone_stay_open(tmp_path: Path) -> None:
    home = _home(tmp_path)
    tiers = Depot(home).tiers
    assert tiers.files("acme/m", "main")  # (a StoreClosedError when the depot's collection closed its store)


# -- a dropped depot's RAM tier lets go of its descriptors and copies -------------------------------------------


def _fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{n}")}  # fmt: skip


@pytest.mark.parametrize("strategy", ["page-cache", "memfd"])
def test_a_dropped_depots_preloads_are_let_go_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 strategy: str) -> None:  # fmt: skip
    """A notebook cell run again (`d = Depot(); d.preloader.preload(...)`): the depot was collected, but its
    RAM tier's raw descriptors (a blob's, a memfd copy's) were closed by nothing: each run leaked one per file
    (page-cache, the default: a removed blob's disk space stayed taken), and a memfd copy's RAM."""
    monkeypatch.setenv("MODELDEPOT_PRELOAD_STRATEGY", strategy)
    home = _home(tmp_path)
    before = _fds()
    for _ in range(3):
        depot = Depot(home)
        depot.preloader.preload("acme/m")
        del depot
        gc.collect()
    leaked = [fd for fd in _fds() - before if "memfd:modeldepot" in fd or str(home) in fd]
    assert not leaked, leaked
    opened = sum(1 for n in os.listdir("/proc/self/fd") if str(home / "blobs") in _link(n))
    assert opened == 0, f"{opened} descriptors of the store's blobs still open"


def _link(n: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{n}")
    except OSError:
        return ""


# -- hf-cache export: a ref the store's own earlier export wrote moves after a pull ---------------------------


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LiveNode]:
    with serving_repo(tmp_path, FILES, REPO) as node:
        yield node


@pytest.fixture
def local(upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    with hub_path_depot(tmp_path / "local", upstream.url, monkeypatch) as depot:
        yield depot


def test_an_export_during_a_pull_does_not_pin_the_caches_ref_to_the_old_commit(
    upstream: LiveNode, local: Depot, tmp_path: Path
) -> None:
    """main at A. An update upstream (B) is pulled; while it downloads, main is exported to a Hugging Face
    cache (A still the store's main: a cron job, another shell). The pull published B with refs.updated_at its
    scan's time, older than the ref file the export wrote, and the next export of main (B) kept the cache's
    main at A ("ref-kept": a newer download, maybe), A the store's own older commit, which it wrote itself:
    offline code kept loading the old weights. When the branch took B here counts: its publish."""
    cache = tmp_path / "hf" / "hub"
    local.pull(REPO, ["fp16"])
    a = local.resolve(REPO)
    upstream.depot.import_dir(write_model_dir(tmp_path / "v2", {**FILES, "config.json": b'{"v": 2}'}), REPO)
    exported = []

    def progress(update: object) -> None:
        if not exported:  # (the pull has scanned B; the store's main is still A)
            time.sleep(0.05)
            exported.append(local.hf_cache_export(REPO, cache_dir=cache))

    local.pull(REPO, ["fp16"], progress=progress)
    b = local.resolve(REPO)
    assert b != a and exported and exported[0].commit_id == a
    ref = cache / "models--onnx-community--tiny" / "refs" / "main"
    assert ref.read_text() == a
    result = local.hf_cache_export(REPO, cache_dir=cache)
    assert ref.read_text() == b, [p.problem for p in result.problems]


# -- a pull's held variants carried to an update, under a disk budget ------------------------------------------


def test_a_carried_variant_is_not_fetched_again_when_the_budget_makes_room(
    upstream: LiveNode, local: Depot, tmp_path: Path
) -> None:
    """fp16 and q4f16 held at A; the update B changes q4f16 alone; a budget tight enough that the pull of the
    new q4f16 evicts A. fp16 is carried to B "from the store (nothing fetched)": its bytes must not be
    evicted under the pull and then fetched again (or refused)."""
    local.pull(REPO, ["q4f16", "fp16"])
    a = local.resolve(REPO)
    used = local.budget_status().used_bytes
    changed = {**FILES, "onnx/model_q4f16.onnx": b"Q4F16-v2" * 25_000}
    upstream.depot.import_dir(write_model_dir(tmp_path / "v2", changed), REPO)
    local.set_max_size(used + 50_000)
    result = local.pull(REPO, ["q4f16"])
    assert local.resolve(REPO) != a
    assert set(result.variants) == {"q4f16", "fp16"}
    assert result.bytes_downloaded == len(changed["onnx/model_q4f16.onnx"]), result
    assert local.has_file(REPO, "onnx/model_fp16.onnx")


# -- `path -q` advice for a variant the commit does not have ----------------------------------------------------


def test_path_q_does_not_advise_a_pull_of_a_variant_the_commit_lacks(tmp_path: Path) -> None:
    """An imported repo (a pull asks the Hub for another repo of that name) and a quant that no file of the
    commit has (a typo): `path -q q8` said "`modeldepot pull acme/m -q q8` fetches it", which failed."""
    from click.testing import CliRunner

    from modeldepot.cli import cli

    home = tmp_path / "home"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "src", {"config.json": b"{}", "onnx/model_fp16.onnx": b"x" * 99}),
                         "acme/m")  # fmt: skip
    said = CliRunner().invoke(cli, ["path", "acme/m", "-q", "q8", "--home", str(home)])
    assert said.exit_code == 1
    assert "fetches it" not in said.output, said.output
