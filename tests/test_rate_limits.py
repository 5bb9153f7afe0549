"""Bandwidth caps (ratelimit.py): a pull downloads at most MODELDEPOT_MAX_DOWNLOAD_RATE (`pull --max-rate`)
from all its sources together, and a node sends at most MODELDEPOT_MAX_UPLOAD_RATE (`serve
--max-upload-rate`) to all its clients together (ollama#2006: "pulls slow the whole LAN").

The checks are lower bounds on time (a cap that does not hold would finish sooner): a slow machine cannot
make them fail. How fast an uncapped transfer goes is the benchmarks' business."""

from __future__ import annotations

import hashlib
import random
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SMALL_CHUNK, hub_path_depot, serving_repo
from modeldepot import Depot
from modeldepot.cli import cli
from modeldepot.config import DepotConfig, parse_rate
from modeldepot.errors import ConfigError
from modeldepot.ratelimit import RateLimit

MiB = 1 << 20
REPO = "acme/capped"
FILES = {
    "config.json": b'{"model_type": "bert"}',
    "model.safetensors": random.Random(3).randbytes(3 * MiB),
}


def test_rates_are_read_and_bad_ones_refused() -> None:
    assert parse_rate("50MiB/s") == parse_rate("50MiB") == parse_rate(" 50 MiB / sec ") == 50 * MiB
    assert parse_rate("1.5GiB/s") == 3 << 29 and parse_rate("1048576") == MiB
    for bad in ("lots", "-5MiB/s", "50MiB/h", ""):
        with pytest.raises(ConfigError, match="write it like 50MiB/s"):
            parse_rate(bad)
    with pytest.raises(ConfigError, match="below the least"):
        parse_rate("1KiB/s")
    with pytest.raises(ConfigError, match="MODELDEPOT_MAX_DOWNLOAD_RATE"):
        DepotConfig.from_env({"MODELDEPOT_MAX_DOWNLOAD_RATE": "fast"}, home="/tmp/x")
    assert (
        DepotConfig.from_env({"MODELDEPOT_MAX_UPLOAD_RATE": "2MiB/s"}, home="/tmp/x").max_upload_rate
        == 2 * MiB
    )


def test_a_rate_limit_holds_for_many_threads_together() -> None:
    limit = RateLimit(MiB)
    assert limit._reserve(limit.burst) <= 0, "the first burst waits for nothing"
    limit = RateLimit(MiB)
    started = time.monotonic()

    def take_half_a_mib() -> None:
        for _ in range(8):
            limit.take(64 * 1024)

    threads = [threading.Thread(target=take_half_a_mib) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 2 MiB at 1 MiB/s, less the first burst (a fiftieth of a second's worth)
    assert time.monotonic() - started >= 1.8


def test_a_pull_downloads_no_faster_than_its_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELDEPOT_MAX_DOWNLOAD_RATE", "1MiB/s")
    with (
        serving_repo(tmp_path, FILES, REPO, chunk_size=SMALL_CHUNK) as hub,
        hub_path_depot(tmp_path / "capped", hub.url, monkeypatch) as depot,
    ):
        started = time.monotonic()
        depot.pull(REPO)
        elapsed = time.monotonic() - started
        assert bytes(depot.get_file(REPO, "model.safetensors")) == FILES["model.safetensors"]
    assert elapsed >= 2.7, f"3 MiB at 1 MiB/s in {elapsed:.2f} s"


def test_pull_max_rate_is_an_option_and_a_bad_one_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with serving_repo(tmp_path, FILES, REPO, chunk_size=SMALL_CHUNK) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        home = str(tmp_path / "cli")
        bad = CliRunner().invoke(cli, ["pull", REPO, "--max-rate", "quick", "--home", home])
        assert bad.exit_code == 2 and "--max-rate" in bad.output and "50MiB/s" in bad.output, bad.output
        started = time.monotonic()
        done = CliRunner().invoke(cli, ["pull", REPO, "--max-rate", "2MiB/s", "--home", home])
        elapsed = time.monotonic() - started
        assert done.exit_code == 0, done.output
    assert elapsed >= 1.3, f"3 MiB at 2 MiB/s in {elapsed:.2f} s"
    with Depot(home, create=False) as depot:
        assert depot.verify().ok


def test_a_node_sends_no_faster_than_its_cap_to_all_clients_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELDEPOT_MAX_UPLOAD_RATE", "2MiB/s")
    with serving_repo(tmp_path, FILES, REPO) as node:
        url = f"{node.url}/{REPO}/resolve/main/model.safetensors"
        bodies: list[bytes] = []

        def download(headers: dict[str, str]) -> None:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as answer:
                bodies.append(answer.read())

        started = time.monotonic()
        clients = [
            threading.Thread(target=download, args=({},)),
            threading.Thread(target=download, args=({"Range": f"bytes={MiB}-"},)),
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        elapsed = time.monotonic() - started
    want = hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert sorted(len(b) for b in bodies) == [2 * MiB, 3 * MiB]
    assert any(hashlib.sha256(b).hexdigest() == want for b in bodies)
    assert elapsed >= 2.2, f"5 MiB at 2 MiB/s, both clients together, in {elapsed:.2f} s"


def test_a_node_sends_chunks_to_its_peers_within_its_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk route (what peers fetch in a swarm) answered a plain response, which the cap never saw: a
    16 MiB chunk left at 500 MB/s from a node capped at 5 MiB/s."""
    monkeypatch.setenv("MODELDEPOT_MAX_UPLOAD_RATE", "2MiB/s")
    with serving_repo(tmp_path, FILES, REPO) as node:  # (the default chunk: the file is one chunk)
        sha256 = hashlib.sha256(FILES["model.safetensors"]).hexdigest()
        started = time.monotonic()
        with urllib.request.urlopen(f"{node.url}/api/depot/v1/blobs/{sha256}/chunks/0", timeout=30) as answer:
            body = answer.read()
        elapsed = time.monotonic() - started
    assert body == FILES["model.safetensors"]
    assert elapsed >= 1.3, f"3 MiB at 2 MiB/s in {elapsed:.2f} s"
