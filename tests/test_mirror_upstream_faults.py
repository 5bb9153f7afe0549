"""A mirror (`serve --upstream`) whose upstream fails: hangs, cuts every transfer, goes away mid-file. The
store answers what it holds, the rest of the node is not held up, a failure is an error status (not a 200
cut short), and nothing the upstream did not ask for is pulled."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import requests
from aiohttp import web
from huggingface_hub import HfApi, hf_hub_download

from conftest import SMALL_CHUNK, LiveNode, SilentAddress, wait_until, write_model_dir
from faultproxy import FaultPlan, FaultProxy
from mirrornodes import BIG, FILES, REPO, mirror_node, proxied_upstream, read_then_leave, read_until_it_breaks
from modeldepot import Depot
from modeldepot.mirror import pulls as mirroring
from modeldepot.mirror.marks import BrokenMarks
from modeldepot.server.mirror_routes import MIRROR


@pytest.fixture
def upstream_proxy(tmp_path: Path) -> Iterator[FaultProxy]:
    yield from proxied_upstream(tmp_path)


@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")


def test_a_hung_upstream_leaves_held_files_and_the_rest_of_the_node_answering(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: None
) -> None:
    """An upstream that accepts connections and never answers: requests by branch for files the mirror
    held waited the whole request deadline for it and got a 408, eight of them took every thread of the
    loop's pool (a file by commit id and /api/models waited too), and each asked the upstream again."""
    monkeypatch.setenv("MODELDEPOT_MIRROR_TTL", "0")  # (the upstream is asked on every request)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, request_deadline=15.0)
    try:
        held = f"{mirror.url}/{REPO}/resolve/main/config.json"
        assert requests.get(held, timeout=60).content == FILES["config.json"]
        commit = mirror.depot.resolve(REPO, "main")
        plan = upstream_proxy.set("hang", times=-1)

        def get(url: str, method: str = "GET") -> tuple[int, bytes, str]:
            answer = requests.request(method, url, timeout=60)
            return answer.status_code, answer.content, answer.headers.get("X-Error-Code", "")

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            by_branch = [pool.submit(get, held, method) for method in ("HEAD", "GET") * 4]
            by_commit = pool.submit(get, f"{mirror.url}/{REPO}/resolve/{commit}/config.json")
            listing = pool.submit(get, f"{mirror.url}/api/models")
            info = pool.submit(HfApi(endpoint=mirror.url).model_info, REPO)
            client = pool.submit(hf_hub_download, REPO, "config.json", endpoint=mirror.url,
                                 cache_dir=tmp_path / "hf-cache")  # fmt: skip
            unheld = pool.submit(get, f"{mirror.url}/{REPO}/resolve/main/{BIG}")
            for answer in by_branch:
                assert answer.result()[:2] in ((200, b""), (200, FILES["config.json"]))
            assert by_commit.result()[:2] == (200, FILES["config.json"])
            assert listing.result()[0] == 200 and REPO.encode() in listing.result()[1]
            assert info.result().sha == commit
            assert Path(client.result()).read_bytes() == FILES["config.json"]
            # What the store lacks: the upstream's failure to answer, said before the request's deadline
            assert unheld.result()[0::2] == (504, "UpstreamTimeout")
        assert plan.api_requests == [f"/api/models/{REPO}/revision/main"], "one scan, shared"
    finally:
        mirror.stop()


@pytest.mark.parametrize(
    ("as_node", "last"),
    [(True, 999), (True, 8 * SMALL_CHUNK + 10), (False, 999)],
    ids=["node upstream", "nine chunks", "hub-like upstream"],
)
def test_a_small_range_of_a_file_being_pulled_waits_only_for_its_own_chunks(
    upstream_proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    as_node: bool,
    last: int,
) -> None:
    """A header read (get_safetensors_metadata, HfFileSystem) of a file the mirror lacked waited until the
    whole file was pulled, and clients gave up after 10 s. From a node, whose chunk digests vouch for each
    chunk as it lands, a range inside the file goes as soon as its chunks did (however many: its last one
    had to have landed before the first was sent); from a Hub-like upstream (no chunk digests) its last chunk still waits for
    the whole file's SHA-256."""
    plan = upstream_proxy.set("slow", times=-1, slow_delay=0.1)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=as_node)
    try:
        answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", headers={"Range": f"bytes=0-{last}"},
                              timeout=60)  # fmt: skip
        crossed = plan.body_bytes
        assert (answer.status_code, answer.content) == (206, FILES[BIG][: last + 1])
        if as_node:
            assert crossed < len(FILES[BIG]) / 2, "the range came with its own chunk"
        else:
            assert crossed == len(FILES[BIG]), "the range waited for the whole file's check"
        wait_until(lambda: mirror.depot.has_file(REPO, BIG), 60, "the pull to end")
    finally:
        mirror.stop()


def test_an_upstream_failing_every_transfer_is_a_502_and_not_pulled_again_at_once(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: None
) -> None:
    """An upstream that fails every transfer of a file: each client GET was a 200 cut at 0 bytes (never saying
    why) and each retry pulled the file again. The headers wait a few seconds for the pull's first bytes
    (a pull that fails in that time is a 502 at once), and a failed pull's error answers the retries that
    follow for a while (the pull's own retries take longer than a client waits for headers)."""
    plan = upstream_proxy.set("500", times=-1, path_suffix=BIG)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        try:
            first = requests.get(url, timeout=60)
            assert first.status_code == 502, first.status_code
        except requests.exceptions.ChunkedEncodingError:
            pass  # (a 200 cut short: the pull was still retrying when the headers went)
        pulls = mirror.runner.app[MIRROR]
        wait_until(lambda: not pulls._jobs, 60, "the mirror's pull to fail")
        asked = len(plan.requests)
        again = requests.get(url, timeout=60)
        assert (again.status_code, again.headers.get("X-Error-Code")) == (502, "UpstreamError")
        assert "tried again" in again.json()["error"] and "500" in again.json()["error"], again.text
        assert len(plan.requests) == asked, "the retry did not pull the file again"
        from huggingface_hub.errors import HfHubHTTPError

        with pytest.raises(HfHubHTTPError, match="upstream failed"):
            hf_hub_download(REPO, BIG, endpoint=mirror.url, cache_dir=tmp_path / "hf-cache")
        assert len(plan.requests) == asked

        monkeypatch.setattr(mirroring, "FAILED_TTL", 0.0)  # (the failure has aged: the next GET pulls again)
        upstream_proxy.set("pass")
        assert requests.get(url, timeout=60).content == FILES[BIG]
    finally:
        mirror.stop()


def test_an_upstream_that_went_away_is_a_502_not_a_200_cut_at_0_bytes(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: None
) -> None:
    """Nothing listens at the upstream's address any more (it stopped after the mirror scanned the repo): the
    pull's attempts took seconds of backoff, the headers went after 5 s, and the client got a 200 that ended
    at 0 bytes (curl: exit 18; huggingface_hub: a broken connection, a retry, and only then the 502). A
    refused connection is asked again soon, and the answer is the 502 saying why."""
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        assert requests.get(f"{mirror.url}/{REPO}/resolve/main/config.json", timeout=60).ok  # (scanned)
        upstream_proxy.stop()
        answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", timeout=60)
        assert (answer.status_code, answer.headers.get("X-Error-Code")) == (502, "UpstreamError"), (
            answer.headers
        )
        assert "ConnectionRefused" in answer.json()["error"], answer.text
    finally:
        mirror.stop()


def test_an_upstream_back_from_an_outage_is_asked_again_within_seconds(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: None
) -> None:
    """An upstream that cannot be reached (restarting, say) made the file's failure the answer for FAILED_TTL:
    a 3 s restart was 25 s of 502s (an explorer's trial). Out of reach, it is asked again within seconds."""
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        assert requests.get(f"{mirror.url}/{REPO}/resolve/main/config.json", timeout=60).ok  # (scanned)
        plan = upstream_proxy.set("pass", times=-1)
        plan.down_until = time.monotonic() + 600  # (every connection closed unanswered: the upstream is away)
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        assert requests.get(url, timeout=60).status_code == 502
        pulls = mirror.runner.app[MIRROR]
        wait_until(lambda: not pulls._jobs, 60, "the mirror's pull to fail")
        plan.down_until = 0.0  # (back)
        wait_until(lambda: requests.get(url, timeout=60).status_code == 200, mirroring.FAILED_TTL / 2,
                   "the file answered again")  # fmt: skip
        assert requests.get(url, timeout=60).content == FILES[BIG]
    finally:
        mirror.stop()


def test_an_upstream_whose_file_fails_its_check_every_time_is_not_pulled_for_ever(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: None
) -> None:
    """A Hub-like upstream that sends a file's bytes wrong every time: huggingface_hub retries for as long as
    each attempt gets bytes, and each attempt made the mirror pull the whole file again (36 times a minute,
    never ending). A second failure of the file's check is remembered: a 502 saying why, for a while."""
    plan = upstream_proxy.set("flip", times=-1, path_suffix=BIG)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)
    try:
        from huggingface_hub.errors import HfHubHTTPError

        with pytest.raises(HfHubHTTPError, match="502"):
            hf_hub_download(REPO, BIG, endpoint=mirror.url, cache_dir=tmp_path / "hf-cache")
        assert plan.body_bytes <= 2 * len(FILES[BIG]), "the file crossed at most twice"
        answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", timeout=60)
        assert (answer.status_code, answer.headers["X-Error-Code"]) == (502, "UpstreamIntegrity")
        assert "SHA-256" in answer.json()["error"] and not mirror.depot.has_file(REPO, BIG)
    finally:
        mirror.stop()


def test_a_head_or_a_range_past_the_end_pulls_nothing(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_env: None
) -> None:
    """A HEAD (file_exists, a size probe) or a 416 started a pull of the whole file."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    plan = upstream_proxy.set("slow", times=-1, slow_delay=0.1)  # (a pull started would still run below)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        assert HfApi(endpoint=mirror.url).file_exists(REPO, BIG)
        assert get_hf_file_metadata(hf_hub_url(REPO, BIG, endpoint=mirror.url)).size == len(FILES[BIG])
        past = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}", headers={"Range": "bytes=999999999-"},
                            timeout=60)  # fmt: skip
        assert (past.status_code, past.headers["Content-Range"]) == (416, f"bytes */{len(FILES[BIG])}")
        assert not mirror.runner.app[MIRROR]._jobs and plan.requests == []
        assert not mirror.depot.has_file(REPO, BIG)
    finally:
        mirror.stop()


def read_while_the_upstream_dies(upstream_proxy: FaultProxy, plan: FaultPlan, url: str) -> bytes:
    """What a GET of the big file at ``url`` received before it broke: the upstream answers 500 to every
    request of it once half the file crossed it (it went away mid-file). Checked: a true first part."""

    def cut_when_half_crossed() -> None:
        wait_until(lambda: plan.body_bytes > len(FILES[BIG]) // 2, 60, "half the file to cross")
        upstream_proxy.set("500", times=-1, path_suffix=BIG)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        cutting = pool.submit(cut_when_half_crossed)
        received = asyncio.run(read_until_it_breaks(url))
        cutting.result()
    assert 0 < len(received) < len(FILES[BIG]) and received == FILES[BIG][: len(received)]
    return received


def test_a_resume_of_a_broken_hub_answer_is_answered_as_asked_once_the_store_proves_what_it_sent(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub-like upstream (no chunk digests) that went away mid-file: what the broken answer had sent was
    unproven, and every resume of the file was answered whole for an hour, even once the file was verified in
    the store (all a client had, sent again: an explorer's trial). The mark keeps what went out; once the
    store holds the file, a resume by commit has that checked against it, and is answered as asked."""
    plan = upstream_proxy.set("slow", times=-1, slow_delay=0.05)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)
    try:
        commit = HfApi(endpoint=mirror.url).model_info(REPO).sha
        url = f"{mirror.url}/{REPO}/resolve/{commit}/{BIG}"

        received = read_while_the_upstream_dies(upstream_proxy, plan, url)
        pulls = mirror.runner.app[MIRROR]
        wait_until(lambda: not pulls._jobs, 60, "the mirror's pull to end")
        assert pulls.broke(REPO, BIG), "unproven bytes were sent"

        upstream_proxy.set("pass")
        resume = {"Range": f"bytes={len(received)}-"}
        # Not in the store yet: whole, as ever (its pull goes on from what landed)
        whole = requests.get(url, headers=resume, timeout=60)
        assert (whole.status_code, whole.content) == (200, FILES[BIG])
        assert mirror.depot.has_file(REPO, BIG) and pulls.broke(REPO, BIG)
        # In the store: what went out is the file's, so the client's bytes are; as asked, and from now on
        rest = requests.get(url, headers=resume, timeout=60)
        assert (rest.status_code, rest.content) == (206, FILES[BIG][len(received) :])
        assert not pulls.broke(REPO, BIG)
        assert not BrokenMarks(mirror.depot.home).broke(REPO, BIG), "lifted in the home's record too"
    finally:
        mirror.stop()


def test_the_marks_of_broken_files_keep_what_went_out_and_never_lift_what_is_not_known(
    tmp_path: Path,
) -> None:
    """Two nodes on one store mark files; what either sent is kept whole; one whose sending is not known
    (refuted, or written by a node before the spans were kept) is answered whole until it expires."""
    import json

    from modeldepot.mirror.marks import BROKEN_FILE, Sent

    marks, other = BrokenMarks(tmp_path), BrokenMarks(tmp_path)
    marks.note("Acme/M", "a.bin", Sent({(0, 4, "aa")}))
    other.note("acme/m", "a.bin", Sent({(4, 8, "bb")}))
    marks.note("acme/m", "b.bin", None)
    again = BrokenMarks(tmp_path)
    assert again.spans("acme/m", "a.bin") == {(0, 4, "aa"), (4, 8, "bb")}
    assert again.broke("ACME/m", "b.bin") and again.spans("acme/m", "b.bin") is None
    again.refute("acme/m", "a.bin")
    assert (
        BrokenMarks(tmp_path).broke("acme/m", "a.bin")
        and BrokenMarks(tmp_path).spans("acme/m", "a.bin") is None
    )
    marks.note("acme/m", "a.bin", Sent({(8, 9, "cc")}))  # (its memory's spans must not undo the refutation)
    assert BrokenMarks(tmp_path).spans("acme/m", "a.bin") is None
    again.lift("acme/m", "b.bin", frozenset())  # (not known: stays)
    assert BrokenMarks(tmp_path).broke("acme/m", "b.bin")
    marks.note("acme/m", "d.bin", Sent({(0, 4, "dd")}))
    checked = BrokenMarks(tmp_path).spans("acme/m", "d.bin")
    assert checked is not None
    other.note("acme/m", "d.bin", Sent({(4, 8, "ee")}))  # (another answer broke while those were checked)
    marks.lift("acme/m", "d.bin", checked)
    assert BrokenMarks(tmp_path).spans("acme/m", "d.bin") == {(0, 4, "dd"), (4, 8, "ee")}
    marks.lift("acme/m", "d.bin", frozenset({(0, 4, "dd"), (4, 8, "ee")}))
    assert not BrokenMarks(tmp_path).broke("acme/m", "d.bin")
    (tmp_path / BROKEN_FILE).write_text(json.dumps([["acme/m", "c.bin", time.time()], ["x", "y", "z"]]))
    older = BrokenMarks(tmp_path)
    assert older.broke("acme/m", "c.bin") and older.spans("acme/m", "c.bin") is None
    (tmp_path / BROKEN_FILE).write_text("{not json")
    assert not BrokenMarks(tmp_path).broke("acme/m", "c.bin")


def test_a_resume_after_an_honest_upstream_outage_is_answered_as_asked(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node upstream that went away mid-file: every byte the broken answer had sent was checked against
    the node's chunk digest, yet a resume of the file (`bytes=N-`) was answered whole for an hour (a
    re-download; `curl -C -` refuses it)."""
    plan = upstream_proxy.set("slow", times=-1, slow_delay=0.05)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    try:
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"

        received = read_while_the_upstream_dies(upstream_proxy, plan, url)
        pulls = mirror.runner.app[MIRROR]
        wait_until(lambda: not pulls._jobs, 60, "the mirror's pull to end")
        assert not pulls.broke(REPO, BIG), "nothing unproven was sent"

        upstream_proxy.set("pass")  # back: the resume pulls again (from what landed), no failure kept
        rest = requests.get(url, headers={"Range": f"bytes={len(received)}-"}, timeout=60)
        assert (rest.status_code, rest.content) == (206, FILES[BIG][len(received) :])
    finally:
        mirror.stop()


def test_a_node_that_stops_answers_the_requests_waiting_for_a_hung_upstream(
    upstream_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request waiting for a hung upstream's scan held a stopping node (Ctrl-C) for most of a minute."""
    plan = upstream_proxy.set("hang", times=-1)
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(requests.get, f"{mirror.url}/api/models/{REPO}", timeout=120)
        try:
            wait_until(lambda: plan.api_requests, 30, "the scan to ask the upstream")
        finally:
            mirror.stop()
        answer = waiting.result()
    assert answer.status_code == 504 and "stopping" in answer.json()["error"], answer.text


BAD = 3  # the chunk of BIG a lying node changes
LIE = (
    bytes(FILES[BIG][: BAD * SMALL_CHUNK + 10])
    + bytes([FILES[BIG][BAD * SMALL_CHUNK + 10] ^ 0xFF])
    + bytes(FILES[BIG][BAD * SMALL_CHUNK + 11 :])
)


class LyingNode(FaultProxy):
    """In front of a real node: its manifest gives, for BIG's chunk BAD, the BLAKE3 of LIE's (its SHA-256
    stays the true one), and it serves LIE's bytes, the last chunk ``late`` seconds late (readers get ahead
    of the pull's whole-file check)."""

    late = 2.0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/manifest") and "/revisions/" in request.path:
            async with self._session.get(self.upstream + request.path_qs) as answer:
                body = await answer.json()
            for item in body.get("files", []):
                if item.get("path") == BIG:
                    chunk = LIE[BAD * SMALL_CHUNK : (BAD + 1) * SMALL_CHUNK]
                    item["chunks"][BAD] = blake3.blake3(chunk).hexdigest()
            return web.json_response(body)
        wanted = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
        if request.method == "GET" and request.path.endswith(f"/{BIG}") and wanted is not None:
            first, last = int(wanted[1]), int(wanted[2])
            if last == len(LIE) - 1:
                await asyncio.sleep(self.late)
            return web.Response(status=206, body=LIE[first : last + 1],
                                headers={"Content-Range": f"bytes {first}-{last}/{len(LIE)}"})  # fmt: skip
        return await super()._handle(request)


@contextlib.contextmanager
def mirror_of_a_liar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, liar_scans: bool) -> Iterator[LiveNode]:
    """A mirror whose configured upstreams are a lying node and, unless the liar answers the scan (it is
    the only one), an honest one asked first (slowed: the liar serves most chunks); the "Hub" is honest."""
    with Depot(tmp_path / "upstream", chunk_size=SMALL_CHUNK) as upstream_depot:
        upstream_depot.import_dir(write_model_dir(tmp_path / "src", FILES), REPO)
        honest = LiveNode(upstream_depot)
        liar, slowed = LyingNode(honest.url), FaultProxy(honest.url)
        slowed.set("slow", times=-1, slow_delay=1.0)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", honest.url)
        servers = [liar.url] if liar_scans else [slowed.url, liar.url]
        mirror = LiveNode(Depot(tmp_path / "mirror", chunk_size=SMALL_CHUNK, servers=servers), mirror=True,
                          owns_depot=True)  # fmt: skip
        try:
            yield mirror
        finally:
            mirror.stop()
            for server in (liar, slowed, honest):
                server.stop()


def test_a_range_is_released_early_only_on_the_digests_of_the_node_that_answered_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node other than the one whose SHA-256 the file is checked against gave a chunk digest for other
    bytes (a lying or broken node): a range inside that chunk completed as a 206 of its bytes before the
    whole-file check refuted them. Its digests vouch for nothing: the range waits for the check."""
    with mirror_of_a_liar(tmp_path, monkeypatch, liar_scans=False) as mirror:
        first, last = BAD * SMALL_CHUNK, BAD * SMALL_CHUNK + 999
        answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}",
                              headers={"Range": f"bytes={first}-{last}"}, timeout=60)  # fmt: skip
        assert (answer.status_code, answer.content) == (206, FILES[BIG][first : last + 1])
        wait_until(lambda: mirror.depot.has_file(REPO, BIG), 60, "the pull to end")
        assert mirror.depot.get_file(REPO, BIG).tobytes() == FILES[BIG]


def test_a_whole_file_answer_across_a_refuted_download_breaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pull throws away a download whose SHA-256 failed and fetches it again from the Hub; a client
    following it had been sent the refuted chunks, and its 200 completed with them (the pull succeeded)."""
    with mirror_of_a_liar(tmp_path, monkeypatch, liar_scans=True) as mirror:
        url = f"{mirror.url}/{REPO}/resolve/main/{BIG}"
        try:
            body: bytes | None = requests.get(url, timeout=60).content
        except requests.exceptions.ChunkedEncodingError:
            body = None  # (broken: what it was sent is refuted)
        assert body is None or body == FILES[BIG], "a complete 200 whose body is not the file"
        assert body is None, "the refuted chunks were sent before the check"
        wait_until(lambda: mirror.depot.has_file(REPO, BIG), 60, "the pull to end")
        pulls = mirror.runner.app[MIRROR]
        assert pulls.broke(REPO, BIG), "a resume of it is answered whole"
        assert requests.get(url, headers={"Range": "bytes=100-"}, timeout=60).content == FILES[BIG]


def test_a_range_is_not_vouched_for_by_another_repos_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader follows any running pull of the same content (a fork, a shared tokenizer): a range of a repo
    scanned from an honest node went early on chunks another repo's scanner, a liar, had vouched for."""
    fork = "other/fork"
    with (
        Depot(tmp_path / "h1", chunk_size=SMALL_CHUNK) as held,
        Depot(tmp_path / "h2", chunk_size=SMALL_CHUNK) as forked,
    ):
        held.import_dir(write_model_dir(tmp_path / "src1", FILES), REPO)
        forked.import_dir(write_model_dir(tmp_path / "src2", FILES), fork)
        honest, other = LiveNode(held), LiveNode(forked)
        liar = LyingNode(other.url)
        liar.late = 8.0
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", honest.url)
        mirror = LiveNode(Depot(tmp_path / "mirror", chunk_size=SMALL_CHUNK, servers=[honest.url, liar.url]),
                          mirror=True, owns_depot=True)  # fmt: skip
        pulls = mirror.runner.app[MIRROR]

        def vouched() -> set[int]:
            return {i for job in list(pulls._jobs.values()) if job.partial for i in job.partial.vouched}

        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                whole = pool.submit(requests.get, f"{mirror.url}/{fork}/resolve/main/{BIG}", timeout=60)
                wait_until(
                    lambda: BAD in vouched(), 20, "the fork's pull to land the lie, vouched by its scan"
                )
                first, last = BAD * SMALL_CHUNK, BAD * SMALL_CHUNK + 999
                answer = requests.get(f"{mirror.url}/{REPO}/resolve/main/{BIG}",
                                      headers={"Range": f"bytes={first}-{last}"}, timeout=60)  # fmt: skip
                with contextlib.suppress(requests.exceptions.RequestException):
                    whole.result()  # (the fork's own answer breaks: its scan's node lied)
            assert (answer.status_code, answer.content) == (206, FILES[BIG][first : last + 1])
        finally:
            mirror.stop()
            for server in (liar, honest, other):
                server.stop()


def test_a_scan_no_upstream_answered_is_answered_at_once_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung upstream: each retry of a client (huggingface_hub retries a 502 five times) waited the scan's
    whole read timeout again, a download failing after 200 s (an explorer's trial). A scan that got no answer
    is answered for FAILED_TTL at once, without asking again."""
    silent = SilentAddress()
    monkeypatch.setenv("MODELDEPOT_READ_TIMEOUT", "1")
    mirror = mirror_node(tmp_path, silent.url, monkeypatch, as_node=False)
    try:
        first = requests.get(f"{mirror.url}/acme/hung/resolve/main/config.json", timeout=60)
        assert first.status_code in (502, 504), first.status_code
        asked = len(silent.scans())
        again = requests.get(f"{mirror.url}/acme/hung/resolve/main/config.json", timeout=60)
        assert again.status_code == first.status_code and "asked again" in again.json()["error"], (
            again.content[:300]
        )
        assert len(silent.scans()) == asked, "not asked again"
    finally:
        mirror.stop()
        silent.close()


def test_an_offline_mirror_says_so_at_every_ask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(A remembered failure was answered as another kind: an offline mirror said 503 "Offline", then 502 for
    the asks that followed, a review. Offline is not an outage: not remembered, said as it is.)"""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mirror = LiveNode(Depot(tmp_path / "mirror", chunk_size=SMALL_CHUNK), mirror=True, owns_depot=True)
    try:
        codes = [
            requests.get(f"{mirror.url}/acme/x/resolve/main/config.json", timeout=30).headers.get(
                "X-Error-Code"
            )
            for _ in range(2)
        ]
        assert codes == ["Offline", "Offline"], codes
    finally:
        mirror.stop()


# -- resumes around a pull that fetches the file again (review 23) ----------------------------------------


def leave_a_wrong_partial(mirror: LiveNode, chunks: int) -> None:
    """A partial of the big file as an earlier pull left it: its first ``chunks`` chunks, the first wrong in
    byte 100 (consistent with the BLAKE3 logged for it: only the whole file's SHA-256 refutes it)."""
    import hashlib

    from modeldepot.hashing import chunk_span

    data = FILES[BIG]
    partial = mirror.depot.store.partials.claim(
        hashlib.sha256(data).hexdigest(), len(data), SMALL_CHUNK, wait=False
    )
    assert partial is not None
    try:
        for index in range(chunks):
            offset, length = chunk_span(index, len(data), SMALL_CHUNK)
            piece = bytearray(data[offset : offset + length])
            if index == 0:
                piece[100] ^= 0xFF
            partial.write_chunk(index, memoryview(bytes(piece)), blake3.blake3(bytes(piece)).hexdigest())
    finally:
        partial.release(completed=False)


def commit_url(mirror: LiveNode) -> str:
    commit = requests.get(f"{mirror.url}/api/models/{REPO}", timeout=30).json()["sha"]
    return f"{mirror.url}/{REPO}/resolve/{commit}/{BIG}"


def test_a_resume_while_a_refuted_file_is_fetched_again_is_answered_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """A pull resumed a partial whose first chunk was wrong; a client had been sent it and left; the whole
    file failed its SHA-256 and is fetched again. The file was marked only once the pull returned: a resume
    meanwhile was a 206, joined to the wrong byte (a review's trial). A pull under way whose check refuted
    what it handed out makes the file's resumes whole."""
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)
    try:
        leave_a_wrong_partial(mirror, 4)
        upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.05, slow_piece=65536)
        url = commit_url(mirror)
        got = asyncio.run(read_then_leave(url, 4 * SMALL_CHUNK))
        assert got[100] != FILES[BIG][100], "the wrong byte went out"
        pulls = mirror.runner.app[MIRROR]
        wait_until(lambda: any(j.partial is not None and j.partial.resets for j in list(pulls._jobs.values())),
                   60, "the file to fail its check")  # fmt: skip
        assert not mirror.depot.has_file(REPO, BIG) and pulls.broke(REPO, BIG)
        resumed = requests.get(url, headers={"Range": f"bytes={len(got)}-"}, timeout=60)
        assert (resumed.status_code, resumed.content) == (200, FILES[BIG])
        assert pulls.broke(REPO, BIG), "marked once the pull returned"
    finally:
        mirror.stop()


def test_a_resume_that_waits_for_the_last_chunk_breaks_when_the_file_fails_its_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """A client was sent every chunk of a resumed partial but the last (held for the check), the first wrong,
    and resumed at the last one. Its resume had sent nothing when the check failed, waited through the
    fetch again, and completed as a 206 (a review's trial). It breaks; asked again, the file goes whole."""
    import aiohttp

    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)
    try:
        leave_a_wrong_partial(mirror, 48)
        upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=1.5, slow_piece=1 << 20)
        url = commit_url(mirror)

        async def leave_and_resume() -> tuple[bytes, int | None]:
            got = bytearray()
            async with aiohttp.ClientSession() as session:
                async with session.get(url) as response:
                    async for piece in response.content.iter_any():
                        got += piece
                        if len(got) >= 48 * SMALL_CHUNK:
                            break
                try:
                    async with session.get(url, headers={"Range": f"bytes={len(got)}-"}) as resumed:
                        body = await resumed.read()
                        assert resumed.status == 200 and body == FILES[BIG], "a range joined to a wrong byte"
                        return bytes(got), resumed.status
                except aiohttp.ClientPayloadError:
                    return bytes(got), None  # (broken: the client asks again)

        got, status = asyncio.run(leave_and_resume())
        assert got[100] != FILES[BIG][100] and status is None, status
        again = requests.get(url, headers={"Range": f"bytes={len(got)}-"}, timeout=60)
        assert (again.status_code, again.content) == (200, FILES[BIG])
    finally:
        mirror.stop()


def test_a_resume_after_the_refuted_file_was_published_before_its_pull_returned_is_answered_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """After the file fetched again was published, the pull still had work before it returned (and marked
    the readers of the refuted fetch): a resume then, of a file another answer had marked with right bytes,
    had those checked, the mark lifted, and a 206 joined to the wrong byte (a review's trial)."""
    from modeldepot.mirror.marks import Sent

    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)
    try:
        leave_a_wrong_partial(mirror, 4)
        access = type(mirror.depot.store.access)
        real_flush = access.flush

        def slow_flush(self: object) -> None:  # (after the publish, before the pull returns)
            time.sleep(4.0)
            real_flush(self)  # type: ignore[arg-type]

        monkeypatch.setattr(access, "flush", slow_flush)
        upstream_proxy.set("slow", times=-1, path_suffix=BIG, slow_delay=0.02, slow_piece=65536)
        url = commit_url(mirror)
        got = asyncio.run(read_then_leave(url, 4 * SMALL_CHUNK))
        assert got[100] != FILES[BIG][100]
        pulls = mirror.runner.app[MIRROR]
        right = FILES[BIG][:SMALL_CHUNK]  # (another answer broke having sent right bytes)
        pulls._marks.note(REPO, BIG, Sent({(0, SMALL_CHUNK, blake3.blake3(right).hexdigest())}))
        wait_until(lambda: mirror.depot.has_file(REPO, BIG), 60, "the file to be published")
        assert pulls._jobs, "the pull has not returned yet"
        resumed = requests.get(url, headers={"Range": f"bytes={len(got)}-"}, timeout=60)
        assert (resumed.status_code, resumed.content) == (200, FILES[BIG])
    finally:
        mirror.stop()


def test_a_mark_another_process_made_or_added_to_while_checked_answers_a_resume_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_proxy: FaultProxy
) -> None:
    """Two nodes serving one store: a mark only the other made was never read here (a resume of its file was
    a 206), and a mark another answer added to while its spans were checked was lifted here all the same (a
    review's trial). Marks are read again when the file changes, and a lift that the file declines is none."""
    from modeldepot.mirror.marks import Sent

    wrong = blake3.blake3(b"XXXX").hexdigest()
    mirror = mirror_node(tmp_path, upstream_proxy.url, monkeypatch, as_node=False)
    try:
        url = commit_url(mirror)
        assert requests.get(url, timeout=60).content == FILES[BIG]
        pulls, other = mirror.runner.app[MIRROR], BrokenMarks(mirror.depot.home)
        other.note(REPO, BIG, Sent({(0, 4, wrong)}))  # (its answer sent a wrong byte in 0..4)
        answer = requests.get(url, headers={"Range": "bytes=4-"}, timeout=60)
        assert (answer.status_code, answer.content) == (200, FILES[BIG]), "marked by the other process"

        other.lift(REPO, BIG, frozenset({(0, 4, wrong)}))  # (a test's hand: the file starts over)
        pulls._marks.note(REPO, BIG, Sent({(4, 8, blake3.blake3(FILES[BIG][4:8]).hexdigest())}))
        real = type(pulls)._matches

        def matches_while_another_breaks(self: mirroring.Mirror, *args: object) -> bool:
            other.note(REPO, BIG, Sent({(0, 4, wrong)}))
            return real(self, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(type(pulls), "_matches", matches_while_another_breaks)
        answer = requests.get(url, headers={"Range": "bytes=4-"}, timeout=60)
        assert (answer.status_code, answer.content) == (200, FILES[BIG]), "lifted though more went out"
        assert BrokenMarks(mirror.depot.home).broke(REPO, BIG)
    finally:
        mirror.stop()
