"""Shared stores read through (tiers.py, MODELDEPOT_SHARED; huggingface_hub#2816): an admin's store of the
models everyone uses under each user's own. Reads, loads and pulls find what the shared store holds and
write nothing for it; what it lacks is pulled into the user's store; a branch is read where it moved last;
the shared store is never written. Upstream is a real node on loopback, named by HF_ENDPOINT."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.numpy import save_file

from conftest import SMALL_CHUNK, LiveNode, flip_byte, store_files_consistent, writable, write_model_dir
from fleetnodes import base_env, modeldepot
from modeldepot import Depot
from modeldepot.cli import cli
from modeldepot.errors import (
    ConfigError,
    CorruptBlobError,
    NotFoundError,
    PullRunningError,
    ReadOnlyStoreError,
    RepoNotFoundError,
    RevisionNotFoundError,
    VariantNotFoundError,
)
from modeldepot.server.app import create_app

MB = 1 << 20


def tree(home: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(home)): (p.lstat().st_size, p.lstat().st_mtime) for p in home.rglob("*")}


def common_model(folder: Path, scale: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.full((64, 64), scale, dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"scale": scale}))
    return folder


def quants(folder: Path) -> Path:
    rng = np.random.default_rng(3)
    return write_model_dir(folder, {
        "config.json": b'{"model_type": "llama"}',
        "model-Q4_K_M.gguf": rng.bytes(MB // 2),
        "model-Q8_0.gguf": rng.bytes(MB),
    })  # fmt: skip


class Upstream:
    """A node serving ``acme/common`` and ``acme/q`` (two quants), named by HF_ENDPOINT."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.depot = Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK)
        self.depot.import_dir(common_model(tmp_path / "src" / "common-1", 1.0), "acme/common")
        self.depot.import_dir(quants(tmp_path / "src" / "q"), "acme/q")
        self.node = LiveNode(self.depot)
        self.moves = 1

    def move_common(self) -> str:
        """A new commit of acme/common on main."""
        self.moves += 1
        folder = common_model(self.tmp_path / "src" / f"common-{self.moves}", float(self.moves))
        return self.depot.import_dir(folder, "acme/common").commit_id


@pytest.fixture
def upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Upstream]:
    up = Upstream(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", up.node.url)
    try:
        yield up
    finally:
        up.node.stop()
        up.depot.close()


@pytest.fixture
def admin(tmp_path: Path, upstream: Upstream) -> Path:
    """The shared store: acme/common, and acme/q's Q4_K_M alone; closed."""
    home = tmp_path / "shared"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.pull("acme/common")
        depot.pull("acme/q", quants=["Q4_K_M"])
    return home


def test_reads_loads_and_pulls_find_the_shared_store_and_write_nothing_for_it(
    tmp_path: Path, admin: Path, upstream: Upstream
) -> None:
    before = tree(admin)
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        assert {r.repo_id for r in user.list_repos()} == {"acme/common", "acme/q"}
        assert json.loads(bytes(user.get_file("acme/common", "config.json"))) == {"scale": 1.0}
        assert user.file_path("acme/common", "model.safetensors").is_relative_to(admin)
        assert user.snapshot_path("acme/common").is_relative_to(admin)
        tensors = user.load("acme/common", engine="safetensors")
        np.testing.assert_array_equal(tensors["w"], np.ones((64, 64), dtype=np.float32))

        pulled = user.pull("acme/common")  # (asks upstream where main is: the shared store holds that)
        assert (pulled.bytes_downloaded, pulled.sources, pulled.bytes_by_source) == (
            0, ("shared",), {"shared": pulled.bytes_total}
        )  # fmt: skip
        assert user.du().blobs == 0, "nothing written for what the shared store holds"

        q8 = user.pull("acme/q", quants=["Q8_0"])  # the shared store lacks it: pulled into the user's
        assert q8.bytes_downloaded >= MB and q8.sources != ("shared",)
        weights = tmp_path / "src" / "q"
        assert bytes(user.get_file("acme/q", "model-Q8_0.gguf")) == (weights / "model-Q8_0.gguf").read_bytes()
        assert user.file_path("acme/q", "model-Q8_0.gguf").is_relative_to(user.home)
        # the same commit's other quant is the shared store's: read from there, not pulled again
        assert (
            bytes(user.get_file("acme/q", "model-Q4_K_M.gguf"))
            == (weights / "model-Q4_K_M.gguf").read_bytes()
        )
        assert user.file_path("acme/q", "model-Q4_K_M.gguf").is_relative_to(admin)
        loaded = user.load("acme/q", "Q4_K_M", engine=lambda path: path.resolve())
        assert loaded.is_relative_to(admin)
        assert user.pull("acme/q", quants=["Q4_K_M"]).bytes_downloaded == 0
        assert user.du().blob_bytes < 2 * MB, "Q4_K_M was never pulled into the user's store"
        assert store_files_consistent(user) == []
        with pytest.raises(ReadOnlyStoreError, match="shared: read through"):
            user.tiers.shared[0].index.write("test").__enter__()
    assert tree(admin) == before, "the shared store was not written"

    runner = CliRunner()
    env = {"MODELDEPOT_SHARED": str(admin)}
    listed = runner.invoke(cli, ["ls", "--home", str(tmp_path / "user")], env=env)
    assert listed.exit_code == 0 and "acme/common" in listed.output, listed.output
    path = runner.invoke(
        cli, ["path", "acme/common", "config.json", "--home", str(tmp_path / "user")], env=env
    )
    assert path.exit_code == 0 and str(admin) in path.output, path.output
    cat = modeldepot("cat", "acme/common", "config.json", "--home", str(tmp_path / "user"),
                     env=base_env(MODELDEPOT_SHARED=str(admin)))  # fmt: skip
    assert json.loads(cat.stdout) == {"scale": 1.0}


def test_a_pull_after_a_power_loss_checks_the_shared_stores_blobs_and_fetches_a_damaged_one(
    tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared store pulled a model, never flushed, and the power went: its weights' blob zeroed. After the
    reboot a user's pull took them for held (its blobs unchecked), wrote nothing, gave their folder as the
    model's, zeroed weights and all, and pulling again changed nothing (an explorer's trial). The blobs a pull
    finds in a shared store are checked first: the damaged file is fetched into the user's own store."""
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "before-the-outage")
    home = tmp_path / "shared"
    with Depot(home, chunk_size=SMALL_CHUNK) as admin:
        admin.store.durability.close()  # (nothing flushed: the power went first)
        admin.pull("acme/common")
        blob = admin.store.blobs.path(admin.file_info("acme/common", "model.safetensors").sha256)
        with writable(blob):
            blob.write_bytes(bytes(blob.stat().st_size))
    monkeypatch.setenv("MODELDEPOT_BOOT_ID", "after-the-outage")
    good = (tmp_path / "src" / "common-1" / "model.safetensors").read_bytes()
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[home]) as user:
        pulled = user.pull("acme/common")
        assert pulled.bytes_downloaded >= len(good), pulled
        assert Path(pulled.snapshot_path, "model.safetensors").read_bytes() == good
        assert bytes(user.get_file("acme/common", "model.safetensors")) == good
        assert user.file_path("acme/common", "model.safetensors").is_relative_to(user.home)
        assert json.loads(bytes(user.get_file("acme/common", "config.json"))) == {"scale": 1.0}


def test_a_file_found_rotten_in_the_shared_store_is_pulled_into_the_users_own(
    tmp_path: Path, admin: Path, upstream: Upstream
) -> None:
    """Rot in the admin's store (a byte flipped, its times kept): a user's read refused it, rightly, and left
    it in place (the store is not theirs to repair), but every pull after, in any process, took that copy
    for held ("0 B downloaded from shared") and the file was never readable again (an explorer's trial). The
    refusal is kept in the user's own store: the next pull fetches the file there."""

    with Depot(admin) as depot:
        flip_byte(depot.store.blobs.path(depot.file_info("acme/common", "model.safetensors").sha256), 200)
    good = (tmp_path / "src" / "common-1" / "model.safetensors").read_bytes()
    with (
        Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user,
        pytest.raises(CorruptBlobError),
    ):
        user.get_chunk("acme/common", "model.safetensors", 0)  # (checked against its BLAKE3, as `cat` reads)
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:  # (another process)
        # Its reads refuse it too (they served the rotten bytes again: only pulls read the note, a review)
        with pytest.raises(CorruptBlobError):
            user.file_path("acme/common", "model.safetensors")
        pulled = user.pull("acme/common")
        assert pulled.bytes_by_source.get("shared", 0) < len(good) <= pulled.bytes_downloaded, pulled
        assert bytes(user.get_file("acme/common", "model.safetensors")) == good
        assert user.file_path("acme/common", "model.safetensors").is_relative_to(user.home)
        # The note stays while the admin's copy is the rotten one; once it is gone there, gc removes it (the
        # notes only grew, for the life of the store)
        notes = tmp_path / "user" / "shared-refused"
        user.gc()
        assert len(list(notes.iterdir())) == 1
        with Depot(admin) as depot:
            depot.remove("acme/common")
            depot.gc()
        user.gc()
        assert list(notes.iterdir()) == []


def test_a_branch_is_read_where_it_moved_last(tmp_path: Path, admin: Path, upstream: Upstream) -> None:
    """The user pulls main after it moved upstream: their store gets the new commit and main is read there,
    not at the shared store's older one. The admin then pulls a newer main: read from the shared store
    without a pull. A commit id is read wherever it is held."""
    first = Depot(admin, create=False)
    old = first.resolve("acme/common")
    first.close()
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        assert user.resolve("acme/common") == old
        second = upstream.move_common()
        assert user.pull("acme/common").bytes_downloaded > 0
        assert user.resolve("acme/common") == second
        assert json.loads(bytes(user.get_file("acme/common", "config.json"))) == {"scale": 2.0}
        assert user.snapshot_path("acme/common").is_relative_to(user.home)
        assert json.loads(bytes(user.get_file("acme/common", "config.json", old))) == {"scale": 1.0}

        third = upstream.move_common()
        with Depot(admin) as depot:  # the admin, from their own depot
            depot.pull("acme/common")
        assert user.resolve("acme/common") == third
        assert json.loads(bytes(user.get_file("acme/common", "config.json"))) == {"scale": 3.0}
        assert user.pull("acme/common").bytes_downloaded == 0
        with pytest.raises(RevisionNotFoundError):
            user.resolve("acme/common", "f" * 40)


def test_a_snapshot_folder_is_the_store_holding_most_of_the_commit(
    tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The image's shared store holds a repo's big weights; a container pulls a small variant of the same
    commit into its own store: `snapshot_path` switched to the own folder, configs and that variant alone,
    and `from_pretrained` of it failed (an explorer's trial). The folder holding most of the commit's bytes
    answers, and what it lacks that another store holds is said."""
    shared = tmp_path / "image"
    with Depot(shared, chunk_size=SMALL_CHUNK) as image:
        image.pull("acme/q", quants=["Q8_0"])
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[shared]) as user:
        before = user.snapshot_path("acme/q")
        assert before.is_relative_to(shared) and (before / "model-Q8_0.gguf").exists()
        user.pull("acme/q", quants=["Q4_K_M"])
        assert user.file_path("acme/q", "model-Q4_K_M.gguf").is_relative_to(user.home)
        with caplog.at_level(logging.WARNING, logger="modeldepot.tiers"):
            assert user.snapshot_path("acme/q") == before
        assert any(
            "lacks model-Q4_K_M.gguf, which another store holds" in r.getMessage() for r in caplog.records
        )


def test_a_variant_the_image_baked_loads_offline_after_the_container_pulled_another(
    tmp_path: Path, admin: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's shared store holds acme/q's Q4_K_M at v1; upstream moves to v2; a container pulls Q8_0
    into its own store, whose main moves to v2: the image's Q4_K_M failed to load offline and `path -q`
    said to pull it, its bytes in the image (an explorer's trial). The revision the branch left behind in
    the shared store answers, said so."""
    changed = quants(tmp_path / "src" / "q2")
    (changed / "model-Q4_K_M.gguf").write_bytes(b"another Q4_K_M")
    upstream.depot.import_dir(changed, "acme/q")
    with Depot(admin, create=False) as image:
        baked = image.resolve("acme/q")
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        user.pull("acme/q", quants=["Q8_0"])
        assert user.resolve("acme/q") != baked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Depot(tmp_path / "user", shared=[admin]) as user:
        loaded = user.load("acme/q", "Q4_K_M", engine=lambda path: path.resolve())
        assert loaded.is_relative_to(admin), loaded
    said = CliRunner().invoke(cli, ["path", "acme/q", "-q", "Q4_K_M", "--home", str(tmp_path / "user")],
                              env={"MODELDEPOT_SHARED": str(admin), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert said.exit_code == 0 and str(admin) in said.stdout and baked in said.stdout, said.output
    assert f"this is Q4_K_M of {baked[:12]}" in said.stderr


def test_a_commit_the_image_pulled_by_its_id_is_no_branchs_left_behind(
    tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image pinned a pull request's commit by its id; main never moved: an offline load of main's
    Q4_K_M loaded the PR's, called "the revision main left behind" (a review). Only what a branch named
    before it moved, or names in another store, answers for it."""
    pr_source = quants(tmp_path / "src" / "pr")
    (pr_source / "model-Q4_K_M.gguf").write_bytes(b"a contributor's experimental Q4_K_M")
    pr = upstream.depot.import_dir(pr_source, "acme/q", revision="refs/pr/7").commit_id
    with Depot(tmp_path / "image", chunk_size=SMALL_CHUNK) as image:
        image.pull("acme/q", quants=["Q4_K_M"], revision=pr)
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[tmp_path / "image"]) as user:
        user.pull("acme/q", quants=["Q8_0"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Depot(tmp_path / "user", shared=[tmp_path / "image"]) as user, pytest.raises(VariantNotFoundError):
        user.load("acme/q", "Q4_K_M", engine=lambda path: path.read_bytes())


def test_a_snapshot_folder_is_never_one_whose_blob_this_user_found_corrupt(
    tmp_path: Path, upstream: Upstream
) -> None:
    """The shared store's blob was found rotten and pulled good into the own store: snapshot_path kept
    choosing the shared folder (most bytes), and every call raised CorruptBlobError (a review)."""
    image = tmp_path / "image"
    good = (tmp_path / "src" / "q" / "model-Q8_0.gguf").read_bytes()
    with Depot(image, chunk_size=SMALL_CHUNK) as depot:
        depot.pull("acme/q")
        blob = depot.store.blobs.path(depot.file_info("acme/q", "model-Q8_0.gguf").sha256)
    flip_byte(blob, 200)
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[image]) as user:
        with pytest.raises(CorruptBlobError):
            user.get_chunk("acme/q", "model-Q8_0.gguf", 0)
        user.pull("acme/q", quants=["Q8_0"])
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[image]) as user:
        assert (user.snapshot_path("acme/q") / "model-Q8_0.gguf").read_bytes() == good


def test_a_tag_a_shared_store_holds_is_listed_as_one(tmp_path: Path, admin: Path, upstream: Upstream) -> None:
    """The summary of a repo both stores hold took the own store's tags alone: a tag pulled into the shared
    store was listed as a branch (a review)."""
    with Depot(admin) as depot, depot.store.index.write() as con:  # (as a pull of a tag records it)
        commit = depot.resolve("acme/common")
        con.execute("INSERT INTO refs (repo_id, name, commit_id, updated_at, tag) VALUES (?, 'v1', ?, 1, 1)",
                    ("acme/common", commit))  # fmt: skip
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        upstream.move_common()
        user.pull("acme/common")  # (the own store holds the repo too now)
        summary = next(r for r in user.list_repos() if r.repo_id == "acme/common")
        assert summary.tag_refs == ("v1",) and summary.refs["v1"] == commit


def test_shared_stores_are_checked(tmp_path: Path, admin: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A shared store that cannot be opened is left out, said once: the own store, and the other shared
    ones, are read as ever."""
    with Depot(tmp_path / "user", shared=[tmp_path / "nowhere", admin]) as user:
        assert "acme/common" in {r.repo_id for r in user.list_repos()}
    assert f"MODELDEPOT_SHARED: {tmp_path / 'nowhere'} is left out: no store at" in caplog.text
    with Depot(admin, shared=[admin]) as image:  # (one env block naming the store both: read as the own)
        assert image.tiers.shared == () and "acme/common" in {r.repo_id for r in image.list_repos()}
    # The own store cannot be made (a container's read-only root): what to set is said (a trial)
    (tmp_path / "ro-root").mkdir(mode=0o555)
    with pytest.raises(
        ConfigError, match="with MODELDEPOT_SHARED, the own store is still needed: set MODELDEPOT_HOME"
    ):
        Depot(tmp_path / "ro-root" / "home", shared=[admin], create=False)
    with Depot(tmp_path / "user", shared=[]) as plain:
        assert plain.list_repos() == []
    with (
        Depot(tmp_path / "user", shared=[admin]) as user,
        pytest.raises(ConfigError, match="its own store only"),
    ):
        create_app(user)  # (`modeldepot serve` opens its store alone, and says so)


def test_listings_agree_with_reads(tmp_path: Path, admin: Path, upstream: Upstream) -> None:
    """`info` and `ls` showed the own store's main where reads used the shared store's newer one, and a commit
    split across the stores was listed with the own store's files alone, while reads served the others."""
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        upstream.move_common()
        user.pull("acme/common")  # the user's main: the second commit
        third = upstream.move_common()
        with Depot(admin) as depot:
            depot.pull("acme/common")  # the admin's: the third, later
        assert user.resolve("acme/common") == third
        summary = next(r for r in user.list_repos() if r.repo_id == "acme/common")
        info = user.repo_info("acme/common")
        assert (info.refs["main"], summary.refs["main"]) == (third, third)
        assert summary.revisions == len(info.revisions) == 3  # (one in the user's store, two in the admin's)
        assert [r.refs for r in info.revisions if r.commit_id == third] == [("main",)]

        user.pull("acme/q", quants=["Q8_0"])  # the admin's store holds Q4_K_M of that commit
        assert {f.path for f in user.list_files("acme/q")} == {
            "config.json",
            "model-Q4_K_M.gguf",
            "model-Q8_0.gguf",
        }


def test_a_shared_stores_files_are_not_counted_and_are_pulled_offline(
    tmp_path: Path, admin: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node client's read through open_verified (`modeldepot cat`) counted a use of a shared repo in the
    own store (stats, --preload-top, the budget's order); offline, a pull of what the shared store holds
    failed ("the store does not hold"), while reads found it."""
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        with user.open_verified(user.file_info("acme/q", "model-Q4_K_M.gguf")) as blob:
            blob.check(0)
        user.store.access.flush()
        assert user.store.index.read("SELECT * FROM access") == []
    monkeypatch.setenv("MODELDEPOT_OFFLINE", "1")
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        pulled = user.pull("acme/common")
        assert (pulled.bytes_downloaded, pulled.sources) == (0, ("shared",))
        assert user.du().blobs == 0


def test_a_shared_stores_model_is_preloaded_from_where_it_is(
    tmp_path: Path, admin: Path, upstream: Upstream
) -> None:
    """The RAM tier reads the shared stores too (it said the repo was not in the store); a commit split
    across the stores is preloaded file by file from each; nothing is counted in the own store."""
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        info = user.preloader.preload("acme/common")
        assert info.bytes == sum(f.size for f in user.list_files("acme/common"))
        assert user.preloader.holds("acme/common")
        user.pull("acme/q", quants=["Q8_0"])  # Q4_K_M stays the admin's
        both = user.preloader.preload("acme/q")
        assert both.bytes == sum(f.size for f in user.list_files("acme/q")) and both.files == 3
        quant = user.preloader.preload("acme/q", quant="Q4_K_M")
        assert quant.variant == "Q4_K_M" and quant.resident_bytes == quant.bytes
        user.store.access.flush()
        assert {r["repo_id"] for r in user.store.index.read("SELECT repo_id FROM access")} <= {"acme/q"}


def test_a_shared_stores_engines_and_preloads_stay_until_it_removes_them(tmp_path: Path, admin: Path) -> None:
    """The look for what another process removed asked the own store alone: an engine or a preload of a
    shared store's model was let go of as removed every 2 s (by a node's timer, and by load() itself), and
    built again at the next load (a review)."""
    builds: list[str] = []

    def engine(path: str) -> object:
        builds.append(path)
        return object()

    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        first = user.load("acme/common", engine=engine)
        user.preloader.preload("acme/common")
        assert user.let_go_of_removed() == 0
        assert user.load("acme/common", engine=engine) is first and len(builds) == 1
        assert user.preloader.holds("acme/common")
        with Depot(admin) as owner:  # (its admin removes it)
            owner.remove("acme/common")
        assert user.let_go_of_removed() == 2 and not user.preloader.holds("acme/common")


def test_a_quant_found_corrupt_keeps_no_other_from_the_ram_tier(tmp_path: Path, admin: Path) -> None:
    """With shared stores, the RAM tier asked every file of a commit where it is before choosing the variant:
    one quant's blob found corrupt made `holds`, `preload` and `get` of every other quant raise."""
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        user.import_dir(quants(tmp_path / "src" / "gg"), "acme/gg")
        user.store.quarantine(user.file_info("acme/gg", "model-Q4_K_M.gguf").sha256)
        assert not user.preloader.holds("acme/gg", quant="Q8_0")
        assert user.preloader.preload("acme/gg", quant="Q8_0").bytes == MB + len(b'{"model_type": "llama"}')


def test_a_pull_that_finds_main_unmoved_makes_main_read_where_it_was_pulled(
    tmp_path: Path, admin: Path, upstream: Upstream
) -> None:
    """A pull learns where the branch is: one that found the user's main unmoved upstream left main read at
    the admin's commit, moved since, when publishing the same commit no longer touched the ref (a review)."""
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        second = upstream.move_common()
        assert user.pull("acme/common").commit_id == second  # into the user's own store
        with Depot(admin) as depot:  # the admin's main moves to something of their own afterwards
            mine = depot.import_dir(common_model(tmp_path / "src" / "admins", 9.0), "acme/common").commit_id
        assert user.resolve("acme/common") == mine  # (learned last: read from the shared store)
        assert user.pull("acme/common").commit_id == second
        assert user.resolve("acme/common") == second


def test_an_offline_pull_reads_the_commit_the_stores_answer_and_moves_no_branch_back(
    tmp_path: Path, admin: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, a pull took the user's own saved scan of an older main: it published that commit again (0 B
    downloaded), its branch moved last, and main read the user's older commit instead of the admin's newer
    one; for a quant only the admin's store held, it failed ("not in the store")."""
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        old = user.pull("acme/common", quants=None)  # (held by the shared store: nothing stored)
        upstream.move_common()
        moved = user.pull("acme/common").commit_id  # the user's own main: the second commit
        third = upstream.move_common()
        with Depot(admin) as depot:
            depot.pull("acme/common")
        assert user.resolve("acme/common") == third != moved != old.commit_id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        again = user.pull("acme/common")
        assert (again.commit_id, again.bytes_downloaded, again.sources) == (third, 0, ("shared",))
        assert user.resolve("acme/common") == third, "main still reads the admin's newer commit"
        q4 = user.pull("acme/q", quants=["Q4_K_M"])  # (the user never scanned acme/q)
        assert q4.sources == ("shared",) and Path(q4.snapshot_path).is_relative_to(admin)


def test_a_pull_of_a_quant_points_at_the_folder_that_holds_it(
    tmp_path: Path, admin: Path, upstream: Upstream
) -> None:
    """A commit split across the stores: the pull of the admin's quant named the user's snapshot folder,
    which lacks it."""
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        user.pull("acme/q", quants=["Q8_0"])
        pulled = user.pull("acme/q", quants=["Q4_K_M"])
        assert (Path(pulled.snapshot_path) / "model-Q4_K_M.gguf").is_file()


def test_the_hf_cache_gets_what_reads_find_and_own_store_commands_say_where_a_repo_is(
    tmp_path: Path, admin: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hf-cache export` read the own store alone: a commit split across the stores was exported without
    the shared store's quant (and without saying so), a repo only the shared store holds was "not in the
    store"; `pin`/`rm` of such a repo said "not in the store (see ls)", which lists it."""
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-cache"
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        user.pull("acme/q", quants=["Q8_0"])
        exported = user.hf_cache_export("acme/q", cache_dir=cache)
        assert exported.files == 3 and exported.not_in_store == ()
        shared_only = user.hf_cache_export("acme/common", cache_dir=cache)
        assert shared_only.files == 2
        for what in (lambda: user.pin("acme/common"), lambda: user.remove("acme/common")):
            with pytest.raises(NotFoundError, match=f"is in the shared store {admin}, read only from here"):
                what()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = hf_hub_download("acme/q", "model-Q4_K_M.gguf", cache_dir=cache, local_files_only=True)
    assert Path(path).read_bytes() == (tmp_path / "src" / "q" / "model-Q4_K_M.gguf").read_bytes()


def test_a_new_users_first_read_that_finds_a_shared_blob_corrupt_keeps_its_note(
    tmp_path: Path, admin: Path
) -> None:
    """A new user's first command (its store made for it) found a shared blob corrupt: the failed command
    removed the store it had just made, "untouched", with the note of the refusal in it, and the next pull
    took the rotten copy for held ("0 B downloaded from shared", an explorer's trial)."""
    with Depot(admin) as depot:
        sha256 = depot.file_info("acme/common", "model.safetensors").sha256
        flip_byte(depot.store.blobs.path(sha256), 200)
    env = {"MODELDEPOT_SHARED": str(admin), "MODELDEPOT_HOME": str(tmp_path / "fresh")}
    done = CliRunner().invoke(cli, ["cat", "acme/common", "model.safetensors"], env=env)
    assert done.exit_code == 1 and "corrupt" in done.stderr, done.stderr
    assert (tmp_path / "fresh" / "shared-refused" / sha256).is_file()
    with Depot(tmp_path / "fresh", shared=[admin]) as user, pytest.raises(CorruptBlobError):
        user.file_path("acme/common", "model.safetensors")  # (refused from the note, in a new process)


def test_a_new_users_store_reads_the_shared_one_at_once(tmp_path: Path, admin: Path) -> None:
    """With MODELDEPOT_SHARED set, a command that only reads said "no store at" a MODELDEPOT_HOME nothing was
    pulled into yet; and the own store named again through a link was taken for a shared one."""
    env = {"MODELDEPOT_SHARED": str(admin), "MODELDEPOT_HOME": str(tmp_path / "fresh")}
    listed = CliRunner().invoke(cli, ["ls"], env=env)
    assert listed.exit_code == 0 and "acme/common" in listed.output, listed.output
    # status covers the own store: the shared stores' repos are said to be theirs, not "held here, none with a
    # main branch" (an explorer's trial)
    status = CliRunner().invoke(cli, ["status"], env=env)
    assert status.exit_code == 0 and "held here" not in status.output, status.output
    assert "in the shared stores" in status.output, status.output
    (tmp_path / "link").symlink_to(admin)
    with Depot(admin, shared=[tmp_path / "link"]) as image:  # (the own store named again through a link)
        assert image.tiers.shared == ()


def test_a_removal_of_a_shared_stores_repo_forgets_no_scan_of_it(
    tmp_path: Path, admin: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rm` of a repo the own store holds nothing of forgets its saved scan; of one a shared store holds, it
    forgot the user's scan and said "the store held nothing of it", while `ls` listed the repo (a review)."""
    import modeldepot.upkeep

    monkeypatch.setattr(modeldepot.upkeep, "SCAN_SETTLE", 0.0)
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        user.scan_repo("acme/common")
        with pytest.raises(RepoNotFoundError, match="is in the shared store"):
            user.remove("acme/common")
        assert user.get_manifest("acme/common").repo_id == "acme/common"
        upstream.depot.import_dir(write_model_dir(tmp_path / "src" / "up", {"w.bin": b"w" * 99}), "acme/up")
        user.scan_repo("acme/up")  # (which the admin's store does not hold)
        assert user.remove("acme/up").scan_forgotten
        monkeypatch.setattr(modeldepot.upkeep, "SCAN_SETTLE", 10.0)
        user.scan_repo("acme/up")  # (a scan of a moment ago: a pull of it may be starting)
        with pytest.raises(PullRunningError, match="a pull of it may be starting"):
            user.remove("acme/up")


def test_what_reads_find_is_exported_and_own_store_checks_say_where_a_repo_is(
    tmp_path: Path, admin: Path, upstream: Upstream
) -> None:
    """The answering store's copy of a file found corrupt was counted as exported, and the good one in the
    shared store never was; `rm` of a repo only the shared store holds asked before refusing; a loop of links
    in MODELDEPOT_SHARED was a traceback."""
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        user.pull("acme/common", quants=None)
        upstream.move_common()
        with Depot(admin) as depot:  # the admin's main moves on, and the user's store takes it too
            depot.pull("acme/common")
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[]) as own:
        own.pull("acme/common")  # (the same commit in both stores, the user's moved last)
        own.store.quarantine(own.file_info("acme/common", "model.safetensors").sha256)
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        (tmp_path / "hf").mkdir()  # (a cache there already: no note that one was made)
        exported = user.hf_cache_export("acme/common", cache_dir=tmp_path / "hf")
        assert (exported.files, exported.problems) == (2, ())
    done = CliRunner().invoke(cli, ["rm", "acme/q", "--home", str(tmp_path / "user")],
                              env={"MODELDEPOT_SHARED": str(admin)}, input="y\n")  # fmt: skip
    assert done.exit_code != 0 and "Remove" not in done.output, done.output
    assert "is in the shared store" in done.output, done.output
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with Depot(tmp_path / "user", shared=[tmp_path / "a"]) as user:
        assert user.tiers.shared == ()


def test_a_typed_home_is_made_only_with_a_note(tmp_path: Path, admin: Path) -> None:
    """With MODELDEPOT_SHARED set, a read made the user's own store silently: a mistyped folder became one."""
    done = CliRunner().invoke(
        cli, ["ls", "--home", str(tmp_path / "typo")], env={"MODELDEPOT_SHARED": str(admin)}
    )
    assert done.exit_code == 0 and f"no store at {tmp_path / 'typo'} yet: made one" in done.stderr, (
        done.stderr
    )


def test_a_failed_export_of_a_commit_split_across_stores_takes_back_every_stores_part(
    tmp_path: Path, admin: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit split between the user's store and a shared one is exported from each; the disk filling
    during the shared store's part left the user's store's files in the snapshot, and said "nothing of this
    export was kept" (a review)."""
    import modeldepot.hfcache.export as export
    from modeldepot.errors import StoreError
    from modeldepot.store.models import FileEntry

    real_blob = export._CacheWriter.blob

    def fills_up(self: object, store: object, entry: FileEntry, target: Path, link: bool) -> str:
        if entry.path == "model-Q4_K_M.gguf":  # (the shared store's part)
            raise StoreError("cannot write x in the Hugging Face cache: No space left on device (simulated)")
        return real_blob(self, store, entry, target, link)  # type: ignore[arg-type]

    cache = tmp_path / "hf-cache"
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        user.pull("acme/q", quants=["Q8_0"])
        commit = user.resolve("acme/q")
        monkeypatch.setattr(export._CacheWriter, "blob", fills_up)
        with pytest.raises(StoreError, match="nothing of this export was kept"):
            user.hf_cache_export("acme/q", cache_dir=cache)
    assert not (cache / "models--acme--q" / "snapshots" / commit).exists()


_KILLED_EXPORT = """
import os, signal, sys
from modeldepot import Depot

def progress(what, done, total):
    if what == "acme/q/model-Q4_K_M.gguf":  # (the shared store's part under way: a kill -9)
        os.kill(os.getpid(), signal.SIGKILL)

Depot(sys.argv[1], shared=[sys.argv[2]]).hf_cache_export("acme/q", cache_dir=sys.argv[3], progress=progress)
"""


def test_an_export_of_a_commit_split_across_stores_killed_between_their_parts_leaves_no_part_of_it(
    tmp_path: Path, admin: Path, upstream: Upstream
) -> None:
    """The user's store's part of a commit is built aside until the shared store's part is in too: killed in
    between, the cache holds no snapshot of the commit, and the next export makes it whole."""
    cache = tmp_path / "hf-cache"
    with Depot(tmp_path / "user", chunk_size=SMALL_CHUNK, shared=[admin]) as user:
        user.pull("acme/q", quants=["Q8_0"])
        commit = user.resolve("acme/q")
        killed = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(user.home), str(admin), str(cache)],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert list((cache / "models--acme--q" / "blobs").iterdir())  # (the user's part was in)
        with pytest.raises(LocalEntryNotFoundError):
            snapshot_download("acme/q", revision=commit, cache_dir=cache, local_files_only=True)
        result = user.hf_cache_export("acme/q", cache_dir=cache)
        assert result.ok, result.problems
    folder = Path(snapshot_download("acme/q", revision=commit, cache_dir=cache, local_files_only=True))
    assert {"model-Q4_K_M.gguf", "model-Q8_0.gguf"} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in (cache / "models--acme--q").iterdir() if p.name.startswith(".")] == []
