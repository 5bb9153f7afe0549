"""A content another pull waits for is handed over once it is verified, not when its holder's whole pull
publishes (store/partials.py, transfer/pull.py): a load of a small model waited for the whole pull of a big
one that shared its tokenizer (15 s for a 1 MiB model, an explorer's trial).

The holder is a real `modeldepot pull` process, capped in rate so that its big file takes ~16 s; what is
checked is order (the small pull ended while the big one still ran), never a duration."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    LiveNode,
    http_request,
    hub_path_depot,
    serving_repos,
    store_files_consistent,
    wait_until,
    write_model_dir,
)
from modeldepot import Depot

MiB = 1 << 20
BIG, SMALL, OTHER = "acme/big", "acme/small", "acme/other"
TOKENIZER = b'{"model": {"vocab": {' + b", ".join(b'"w%d": %d' % (i, i) for i in range(4000)) + b"}}}"
SHARED = random.Random(3).randbytes(512 * 1024)  # an LFS file of 8 chunks (64 KiB) BIG and OTHER hold
SHARED_SHA = hashlib.sha256(SHARED).hexdigest()
BIG_FILES = {
    "config.json": b'{"model_type": "bert", "hidden_size": 384}',
    "tokenizer.json": TOKENIZER,
    "shared.safetensors": SHARED,
    "model.safetensors": random.Random(7).randbytes(4 * MiB),
}
SMALL_FILES = {
    "config.json": b'{"model_type": "bert", "hidden_size": 32}',
    "tokenizer.json": TOKENIZER,
    "model.safetensors": random.Random(8).randbytes(96 * 1024),
}
OTHER_FILES = {"config.json": b'{"model_type": "bert", "hidden_size": 16}', "shared.safetensors": SHARED}
TOKENIZER_SHA = hashlib.sha256(TOKENIZER).hexdigest()
# A plain git file (not LFS): its download's key is its git blob id
TOKENIZER_KEY = "git-" + hashlib.sha1(b"blob %d\0" % len(TOKENIZER) + TOKENIZER).hexdigest()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[LiveNode]:
    with serving_repos(tmp_path, {BIG: BIG_FILES, SMALL: SMALL_FILES, OTHER: OTHER_FILES}) as node:
        yield node


@pytest.fixture
def local(upstream: LiveNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:
    with hub_path_depot(tmp_path / "local", upstream.url, monkeypatch) as depot:
        yield depot


@pytest.fixture
def slow_big_pull(local: Depot, upstream: LiveNode) -> Iterator[subprocess.Popen[str]]:
    """`modeldepot pull acme/big` in another process, at 256 KiB/s (its 4.5 MiB: ~18 s), once it holds
    the tokenizer's download; terminated at the end if it still runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MODELDEPOT_SERVERS")}
    env["HF_ENDPOINT"] = upstream.url
    holder = subprocess.Popen(
        [sys.executable, "-m", "modeldepot", "pull", BIG, "--home", str(local.home), "--max-rate", "256KiB"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: local.store.partials.holder(TOKENIZER_KEY) == holder.pid or holder.poll() is not None,
            timeout=30,
        )
        assert holder.poll() is None, holder.communicate()
        yield holder
    finally:
        if holder.poll() is None:
            holder.terminate()
        holder.communicate(timeout=60)


def _files_row(depot: Depot, sha256: str) -> bool:
    return bool(depot.store.index.read("SELECT 1 FROM files WHERE sha256 = ?", (sha256,)))


def test_a_pull_sharing_a_file_with_a_big_pull_elsewhere_ends_before_it(
    local: Depot, slow_big_pull: subprocess.Popen[str]
) -> None:
    """The small repo's pull waits for the tokenizer the big pull holds, then takes it from the store as
    soon as the big pull has it verified: one transfer of it, and the small model is ready while the big
    one still downloads."""
    result = local.pull(SMALL)
    assert slow_big_pull.poll() is None, "the small pull waited for the whole big pull"
    assert result.bytes_downloaded == len(SMALL_FILES["config.json"]) + len(SMALL_FILES["model.safetensors"])
    assert bytes(local.get_file(SMALL, "tokenizer.json")) == TOKENIZER
    # The big pull goes on, and publishes with the tokenizer it handed over (no fetch of it again)
    slow_big_pull.send_signal(signal.SIGINT)
    slow_big_pull.wait(60)
    again = local.pull(BIG)
    assert again.bytes_by_source.get("local", 0) >= len(TOKENIZER), "the tokenizer was fetched once"
    for path, data in BIG_FILES.items():
        assert bytes(local.get_file(BIG, path)) == data
    assert store_files_consistent(local) == []
    assert local.store.partials.wanted_keys() == frozenset(), "a completed release takes the mark away"


def test_a_handed_over_blob_is_kept_until_its_pull_publishes_and_survives_a_kill(
    local: Depot, slow_big_pull: subprocess.Popen[str]
) -> None:
    """Handed over, the blob is in the index with no file naming it until the big pull publishes: gc leaves
    it while that pull runs (it relies on it), and a pull killed afterwards leaves it for the next one."""
    new_bytes = sum(len(data) for data in BIG_FILES.values())
    assert local.budget_status().reserved_bytes == new_bytes, "the big pull holds room for all it fetches"
    local.store.partials.want(TOKENIZER_KEY)  # (as a waiting pull marks it)
    wait_until(lambda: local.store.local_digest(sha256=TOKENIZER_SHA) is not None, timeout=30)
    assert slow_big_pull.poll() is None
    # (in the index now: the room it held for it is held no more, or every process counted it twice)
    wait_until(lambda: local.budget_status().reserved_bytes == new_bytes - len(TOKENIZER), timeout=10)
    assert not _files_row(local, TOKENIZER_SHA), "no revision names it yet"
    assert local.store.partials.holder(TOKENIZER_KEY) is None, "its claim was let go"
    local.gc()
    assert local.store.local_digest(sha256=TOKENIZER_SHA) is not None, (
        "gc took a blob a running pull relies on"
    )
    slow_big_pull.send_signal(signal.SIGKILL)
    slow_big_pull.wait(60)
    assert store_files_consistent(local) == []
    result = local.pull(BIG)
    assert result.bytes_downloaded <= sum(len(data) for data in BIG_FILES.values()) - len(TOKENIZER)
    assert result.bytes_by_source.get("local", 0) >= len(TOKENIZER)
    assert bytes(local.get_file(BIG, "tokenizer.json")) == TOKENIZER
    assert store_files_consistent(local) == []


def test_a_waiting_mark_nobody_needs_goes_with_gc(local: Depot) -> None:
    local.store.partials.want(TOKENIZER_KEY)
    assert local.store.partials.wanted_keys() == {TOKENIZER_KEY}
    local.gc()  # (a mark of a content no download holds: a waiter's that was killed as it waited)
    assert local.store.partials.wanted_keys() == frozenset()


def test_a_handed_over_public_content_is_still_served_to_peers_without_a_token(
    local: Depot, slow_big_pull: subprocess.Popen[str]
) -> None:
    """A node without a token serves a public repo's download in progress to any peer (its public mark).
    Handed over, the content was a blob no file named yet, so not a public repo's by the index: the node
    answered 404 for it, and left it out of its holdings, until the big pull published (review 26)."""
    node = LiveNode(local)  # (no token: a node of a token-less fleet over this store)
    chunk = {"Range": "bytes=0-65535"}
    try:
        wait_until(
            lambda: http_request(node, f"/api/depot/v1/blobs/{SHARED_SHA}", chunk)[0] == 206, timeout=30
        )
        local.store.partials.want(SHARED_SHA)  # (as a waiting pull marks it)
        wait_until(lambda: local.store.local_digest(sha256=SHARED_SHA) is not None, timeout=30)
        assert slow_big_pull.poll() is None, "the big pull still runs"
        status, _, body = http_request(node, f"/api/depot/v1/blobs/{SHARED_SHA}", chunk)
        assert status == 206 and body == SHARED[:65536], status
        assert SHARED_SHA in {blob.sha256 for blob in local.store.held_blobs(public_only=True)}
        slow_big_pull.send_signal(signal.SIGINT)
        slow_big_pull.wait(60)
        assert not local.store.partials.is_public(SHARED_SHA), "its mark goes with the pull"
    finally:
        node.stop()


def test_a_retry_after_shared_blobs_went_hands_over_nothing_it_flushed_for_its_publish(
    local: Depot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull whose shared files went before it published fetches them again, its handover loop running
    beside: the claims flushed for its publish were handed over again (a read-only file reopened for writing:
    "Permission denied" for any user but root, review 26)."""
    from modeldepot.errors import SharedBlobsRemovedError
    from modeldepot.transfer import pull as pull_module

    local.pull(OTHER)  # (BIG finds the shared file in the store)
    monkeypatch.setattr(pull_module, "HANDOVER_LOOK", 0.05)
    big_key = hashlib.sha256(BIG_FILES["model.safetensors"]).hexdigest()
    real_publish, real_claiming = pull_module._PullRun.publish, pull_module._PullRun._claim_and_transfer
    calls: list[int] = []

    def publish(run: Any, *args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            local.store.partials.want(big_key)  # (a pull elsewhere waits for the big file, flushed by now)
            gone = SharedBlobsRemovedError("removed meanwhile", repo_id=BIG)
            gone.gone = (SHARED_SHA,)
            raise gone
        real_publish(run, *args)

    async def slow_retry(run: Any, *args: Any) -> Any:
        if calls:
            await asyncio.sleep(0.5)  # (a fetch that takes a moment: the handover loop looks meanwhile)
        return await real_claiming(run, *args)

    handed: list[str] = []
    real_hand_over = pull_module._PullRun.hand_over
    monkeypatch.setattr(pull_module._PullRun, "publish", publish)
    monkeypatch.setattr(pull_module._PullRun, "_claim_and_transfer", slow_retry)
    monkeypatch.setattr(
        pull_module._PullRun, "hand_over", lambda run, key: handed.append(key) or real_hand_over(run, key)
    )
    local.pull(BIG)
    assert handed == [], "a content flushed for the publish was handed over again"
    assert bytes(local.get_file(BIG, "model.safetensors")) == BIG_FILES["model.safetensors"]
    assert store_files_consistent(local) == []


def test_a_handed_over_blob_whose_pull_failed_is_the_budgets_first_to_go(
    local: Depot, slow_big_pull: subprocess.Popen[str], tmp_path: Path
) -> None:
    """A holder killed after a handover leaves a blob no file names: counted by the disk budget, and named by
    no eviction, so a model went in its place (review 26). It is freed first."""
    local.store.partials.want(TOKENIZER_KEY)
    wait_until(lambda: local.store.local_digest(sha256=TOKENIZER_SHA) is not None, timeout=30)
    slow_big_pull.send_signal(signal.SIGKILL)
    slow_big_pull.wait(60)
    own = {"model.safetensors": random.Random(11).randbytes(200_000)}
    local.import_dir(write_model_dir(tmp_path / "own", own), "acme/own")
    assert local.plan_shrink(200_000 + len(TOKENIZER) // 2) == [], "no model would be evicted"
    assert local.set_max_size(200_000 + len(TOKENIZER) // 2) == [], "no model evicted"
    assert local.store.local_digest(sha256=TOKENIZER_SHA) is None
    assert bytes(local.get_file("acme/own", "model.safetensors")) == own["model.safetensors"]
    assert store_files_consistent(local) == []
