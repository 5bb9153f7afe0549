"""The dashboard (GET /) in a real browser: headless Chromium, driven by Selenium, against live nodes.

A node with a token, pulling from a source node through a proxy that can hold the transfer midway: the page
asks for the token (without it, its buttons fail with a message on the page), starts a pull, shows its
progress live (the event stream, and the pull's own route), ends showing the variant downloaded, and removes
the repo. A node without a token: the page reads it but cannot act, saying how to, until it is opened at
the address `modeldepot serve` prints (``#token=`` and the node's control token), which it takes out of the
address bar. A fleet of two nodes sharing a token: the page lists the peers, pulls from the other node,
preloads and pins; its screenshot is docs/dashboard.png (written there when MODELDEPOT_DASHBOARD_SCREENSHOT
names a path). A node that stops under a live page: the page says since when it is not answering and dims
what it shows (from then), until the node, started again on the same port, answers. A node with a token
opened without it: the page says what it cannot read, and claims no emptiness it did not read.

Chromium and its driver come from Debian (scripts/install-browser, which scripts/test runs); without them
these tests fail, saying so (as the fleet tests do without etcd).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from conftest import (
    SMALL_CHUNK,
    InProcessNode,
    LiveNode,
    Mounts,
    closed_port,
    flip_byte,
    free_port,
    sample_files,
    wait_for_port,
    write_model_dir,
)
from controlnodes import FILES, Q4F16, REPO, TOKEN, HoldingProxy, OpenNode, pulling_depot, source_node
from fleetnodes import base_env, modeldepot
from modeldepot import Depot

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT = 30.0


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    # A missing browser fails the tests, as a missing etcd does: a skip would read as a pass in CI.
    if CHROMIUM is None or CHROMEDRIVER is None:
        raise RuntimeError("Chromium is not installed: run scripts/install-browser "
                           "(apt-get install chromium chromium-driver)")  # fmt: skip
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download a browser or a driver
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(
    driver: WebDriver, what: str, condition: Callable[[WebDriver], Any], timeout: float = WAIT
) -> Any:
    """``condition``'s first true value; an element redrawn meanwhile is read again."""

    def attempt(d: WebDriver) -> Any:
        try:
            return condition(d)
        except StaleElementReferenceException:
            return False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(attempt)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}; it shows:\n{page_text(driver)}") from None


def page_text(driver: WebDriver) -> str:
    return str(driver.execute_script("return document.body.innerText"))


def js(driver: WebDriver, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def visible_text(driver: WebDriver, css: str) -> str | None:
    """The text of the element ``css`` selects (as written, whatever the style sheet's capitals), when it is
    shown (None when absent or hidden)."""
    return js(driver, "const e = document.querySelector(arguments[0]); "  # type: ignore[no-any-return]
              "return e && e.offsetParent !== null ? e.textContent.trim() : null;", css)  # fmt: skip


def click(driver: WebDriver, css: str) -> None:
    def clicked(d: WebDriver) -> bool:
        found = d.find_elements(By.CSS_SELECTOR, css)
        if not found or not found[0].is_displayed() or not found[0].is_enabled():
            return False
        found[0].click()
        return True

    wait_for(driver, f"a button {css} to click", clicked)


def type_into(driver: WebDriver, css: str, text: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, css)
    field.clear()
    field.send_keys(text)


def message(driver: WebDriver, fragment: str, kind: str) -> str:
    """Wait for the page's message box to show ``fragment`` as a message of ``kind`` (ok, error)."""
    return wait_for(  # type: ignore[no-any-return]
        driver,
        f"the {kind} message {fragment!r}",
        lambda d: (
            (text := visible_text(d, "#message")) is not None
            and fragment in text
            and js(d, "return document.querySelector('#message').dataset.kind") == kind
            and text
        ),
    )


def variant_row(name: str, repo: str = REPO) -> str:
    return f'.repo[data-repo="{repo}"] tr.variant[data-variant="{name}"]'


def variant_status(driver: WebDriver, name: str, repo: str = REPO) -> str | None:
    return js(driver, "const r = document.querySelector(arguments[0]); "  # type: ignore[no-any-return]
              "return r ? r.dataset.status : null;", variant_row(name, repo))  # fmt: skip


def script_errors(driver: WebDriver) -> list[str]:
    """What the page's scripts threw (a refused request's "Failed to load resource" is the page at work)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]


def screenshot(driver: WebDriver, path: Path) -> None:
    """The whole page, as tall as it is, with no button under the mouse or in focus."""
    js(driver, "document.activeElement && document.activeElement.blur()")
    ActionChains(driver).move_to_element(driver.find_element(By.CSS_SELECTOR, "footer")).perform()
    height = int(js(driver, "return document.documentElement.scrollHeight"))
    metrics = {"width": 1280, "height": min(height, 4000), "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)  # type: ignore[attr-defined]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(path)), path
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})  # type: ignore[attr-defined]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_pull_with_progress_and_removal_from_the_page(
    browser: WebDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modeldepot.upkeep

    monkeypatch.setattr(
        modeldepot.upkeep, "SCAN_SETTLE", 0.0
    )  # (its scan forgotten seconds after it was made)
    with source_node(tmp_path) as source:
        proxy = HoldingProxy(source.url)
        try:
            with pulling_depot(tmp_path / "local", proxy.url, monkeypatch) as local:
                node = LiveNode(local, token=TOKEN)
                try:
                    run_guarded_node(browser, node, local, proxy)
                finally:
                    node.stop()
        finally:
            proxy.stop()
    assert script_errors(browser) == []


def run_guarded_node(browser: WebDriver, node: LiveNode, local: Depot, proxy: HoldingProxy) -> None:
    browser.get(node.url + "/")
    # The node has a token: the page asks for it once, and works (and fails visibly) without it.
    wait_for(browser, "the token panel", lambda d: visible_text(d, "#token-panel"))
    click(browser, "#token-skip")
    wait_for(browser, "that the token is needed", lambda d: visible_text(d, "#token-state") == "token needed")
    type_into(browser, "#pull-repo", REPO)
    type_into(browser, "#pull-quants", "q4f16")
    click(browser, "#pull-submit")
    shown = message(browser, "this node needs a token", "error")
    assert shown.startswith(f"Pull of {REPO} failed:"), shown
    assert visible_text(browser, "#token-panel") is None  # asked once: not again by itself
    assert local.list_manifests() == [] and local.list_repos() == []

    click(browser, "#token-button")
    type_into(browser, "#token-input", TOKEN)
    click(browser, "#token-submit")
    wait_for(browser, "the token in use", lambda d: visible_text(d, "#token-state") == "token set")
    wait_for(browser, "the live event stream", lambda d: visible_text(d, "#stream-state") == "live")
    assert js(browser, "return sessionStorage.getItem('modeldepot-token')") == TOKEN
    wait_for(browser, "the node's id", lambda d: (visible_text(d, "#node-id") or "").startswith("node "))
    assert visible_text(browser, "#repos-empty") and visible_text(browser, "#peers-empty")
    assert "No fleet" in (visible_text(browser, "#peers-section") or "")
    assert (
        visible_text(browser, "#disk-used") == "0 B" and visible_text(browser, "#disk-budget") == "no budget"
    )

    # The pull, held a quarter of the way by the proxy: its progress shows, from the pull's route and from
    # the event stream (the variant's status row), and the room it holds in the disk budget.
    local.set_max_size("1GiB")
    proxy.hold(256 * 1024)
    click(browser, "#pull-submit")
    message(browser, f"Pull of {REPO}: started", "ok")
    total = sum(len(FILES[p]) for p in Q4F16)
    progress = wait_for(
        browser,
        "the running pull's progress",
        lambda d: (
            (label := visible_text(d, "#pulls tbody tr .progress .label"))
            and visible_text(d, "#pulls tbody tr .status") == "running"
            and not label.startswith("0 B")
            and "(100%)" not in label
            and label
        ),
    )
    percent = int(re.fullmatch(r".+ of .+ \((\d+)%\)", progress)[1])  # e.g. "272.0 KiB of 1.19 MiB (22%)"
    assert 0 < percent < 100, progress
    wait_for(browser, "the variant downloading", lambda d: variant_status(d, "q4f16") == "downloading")
    assert visible_text(browser, f"{variant_row('q4f16')} .status") == "downloading"
    assert variant_status(browser, "fp16") == "available"  # the scan's other variants
    assert local.list_repos() == []  # nothing is published before every byte is verified
    wait_for(browser, "the room the pull holds",
             lambda d: re.search(r"\d \w+ held for pulls and imports under way", visible_text(d, "#disk-detail") or ""))  # fmt: skip
    # Held, it stands still: the row says so (0% and "started 2 min ago" said nothing of frozen peers)
    still = wait_for(browser, "why the held pull stands still",
                     lambda d: re.fullmatch(r"no bytes for \d+ s: waiting on its sources.*",
                                            visible_text(d, "#pulls tbody tr .note") or ""))  # fmt: skip
    assert int(still[0].split()[3]) >= 5, still[0]

    proxy.release()
    wait_for(browser, "the variant downloaded", lambda d: variant_status(d, "q4f16") == "downloaded")
    wait_for(browser, "the pull done", lambda d: visible_text(d, "#pulls tbody tr .status") == "done")
    label = wait_for(
        browser, "the full progress bar", lambda d: visible_text(d, f"{variant_row('q4f16')} .label")
    )
    assert label.endswith("(100%)"), label
    assert js(browser, f"return document.querySelector('{variant_row('q4f16')} .fill').style.width") == "100%"
    assert {f.path for f in local.list_files(REPO)} == set(Q4F16) and sum(
        len(FILES[p]) for p in Q4F16
    ) == total
    facts = wait_for(browser, "the stored repo", lambda d: "pulled" in (visible_text(d, ".repo .repo-facts") or "")
                     and visible_text(d, ".repo .repo-facts"))  # fmt: skip
    assert "4 files" in facts and "main →" in facts, facts
    wait_for(browser, "the disk in use", lambda d: visible_text(d, "#disk-used") not in ("0 B", "–"))
    assert re.search(r"\d \w+ free on the disk", visible_text(browser, "#disk-detail") or ""), "the room left"
    screenshot(browser, node.depot.home.parent / "guarded-dashboard.png")

    # A file found corrupt: the card says so, and the disk its copy set aside takes until gc or a pull (a
    # failing disk's copies took as much again as the store, on no card: an explorer's trial)
    biggest = max(Q4F16, key=lambda path: len(FILES[path]))
    flip_byte(local.store.blobs.path(local.file_info(REPO, biggest).sha256), 100)
    assert not local.verify().ok
    wait_for(browser, "the corrupt copy said",
             lambda d: "1 blob failed verification" in (facts := visible_text(d, "#disk-detail") or "")
             and re.search(r"\d \w+ of corrupt copies set aside", facts))  # fmt: skip

    # Evicted by the disk budget, it says so, and when (it read "scanned, not in the store yet", as if never
    # pulled: an explorer's trial); pulled again, it is back
    assert [e.repo_id for e in local.set_max_size(1024)] == [REPO]
    went = wait_for(browser, "the repo said evicted",
                    lambda d: "evicted" in (visible_text(d, ".repo .repo-facts") or "") and visible_text(d, ".repo .repo-facts"))  # fmt: skip
    assert "for the disk budget (shrinking the store)" in went, went
    local.set_max_size(None)
    local.pull(REPO, ["q4f16"])
    wait_for(browser, "the repo back", lambda d: "pulled" in (visible_text(d, ".repo .repo-facts") or ""))
    wait_for(browser, "the corrupt copy gone with the file restored",
             lambda d: (facts := visible_text(d, "#disk-detail")) and "corrupt" not in facts)  # fmt: skip

    # Removal: the button asks for a second click, then the repo goes and its variant is available again.
    click(browser, f'.repo[data-repo="{REPO}"] .repo-actions button[data-action="remove"]')
    confirm = f'.repo[data-repo="{REPO}"] .repo-actions button.confirm'
    wait_for(browser, "the removal to be confirmed", lambda d: visible_text(d, confirm) == "Confirm remove")
    click(browser, confirm)
    message(browser, f"Removal of {REPO}: removed", "ok")
    wait_for(browser, "the variant available again", lambda d: variant_status(d, "q4f16") == "available")
    wait_for(browser, "the repo gone from the store",
             lambda d: js(d, f"return document.querySelector('.repo[data-repo=\"{REPO}\"]').dataset.stored") == "no")  # fmt: skip
    assert local.list_repos() == []
    # Removed again, a repo the node holds nothing of: its saved scan goes, and its row (it stayed for good)
    click(browser, f'.repo[data-repo="{REPO}"] .repo-actions button[data-action="remove"]')
    click(browser, confirm)
    message(browser, f"Removal of {REPO}: its saved scan forgotten", "ok")
    wait_for(browser, "the scanned repo's row gone",
             lambda d: not d.find_elements(By.CSS_SELECTOR, f'.repo[data-repo="{REPO}"]'))  # fmt: skip

    # An imported repo (no scan upstream: its variants are the store's alone) goes from the page with its
    # removal, here or by another process (its row stayed, every variant "downloaded", until a reload)
    local.import_dir(write_model_dir(node.depot.home.parent / "own", sample_files(4)), "acme/own")
    own = '.repo[data-repo="acme/own"]'
    wait_for(
        browser,
        "the imported repo's variants",
        lambda d: d.find_elements(By.CSS_SELECTOR, f"{own} tr.variant"),
    )
    local.remove("acme/own")
    wait_for(browser, "the removed import's row gone", lambda d: not d.find_elements(By.CSS_SELECTOR, own))

    # A pull asked by mistake is cancelled from its row (nothing stopped it but the node stopping: a trial)
    proxy.hold(64 * 1024)
    type_into(browser, "#pull-quants", "fp16")
    click(browser, "#pull-submit")
    message(browser, f"Pull of {REPO}: started", "ok")
    cancel = "#pulls tbody tr:first-child button.cancel"
    click(browser, cancel)
    message(browser, f"Cancel of the pull of {REPO}: cancelled", "ok")
    wait_for(browser, "the pull cancelled",
             lambda d: visible_text(d, "#pulls tbody tr:first-child .status") == "cancelled")  # fmt: skip
    assert (
        visible_text(browser, cancel) is None
        and visible_text(browser, "#pulls tbody tr:nth-child(2) .status") == "done"
    )
    proxy.release()


def test_a_node_without_a_token_is_controlled_from_the_address_serve_prints(
    browser: WebDriver, tmp_path: Path
) -> None:
    with Depot(tmp_path / "open", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "files", FILES), REPO)
        node = OpenNode(depot)
        try:
            run_open_node(browser, node, depot)
        finally:
            node.stop()
    assert script_errors(browser) == []


def run_open_node(browser: WebDriver, node: OpenNode, depot: Depot) -> None:
    repo_button = f'.repo[data-repo="{REPO}"] .repo-actions button[data-action="{{}}"]'
    # Without the control token the page reads the node (it has no token) but cannot act, and says how to.
    browser.get(node.url + "/")
    wait_for(browser, "the stored repo", lambda d: REPO in (visible_text(d, "#repos") or ""))
    note = wait_for(browser, "the read-only note", lambda d: visible_text(d, "#control-note"))
    assert note.startswith("Read-only:") and "#token=" in note and "--token" in note, note
    assert visible_text(browser, "#token-state") == "token needed"
    assert visible_text(browser, "#token-panel") is None  # the reads work: nothing asked by itself
    # The store's use counts private repos: withheld, and what is shown says it is the public repos' alone
    # (it read as the disk used against the budget: 88% of a store 98% full)
    used = wait_for(browser, "the disk card", lambda d: (visible_text(d, "#disk-used") or "").endswith("in public repos")
                    and visible_text(d, "#disk-used"))  # fmt: skip
    assert used != "–" and "needs the node's token" in (visible_text(browser, "#disk-detail") or "")
    click(browser, repo_button.format("pin"))
    shown = message(browser, "control token", "error")
    assert shown.startswith(f"Pin of {REPO} failed:") and "#token=" in shown, shown
    assert depot.pins() == []

    # The address `modeldepot serve` prints: the page keeps the token and takes it out of the address bar.
    browser.get("about:blank")
    browser.get(f"{node.url}/#token={node.control_token}")
    wait_for(browser, "the token in use", lambda d: visible_text(d, "#token-state") == "token set")
    assert js(browser, "return location.href") == node.url + "/"
    assert js(browser, "return sessionStorage.getItem('modeldepot-token')") == node.control_token
    wait_for(browser, "the read-only note gone", lambda d: visible_text(d, "#control-note") is None)
    click(browser, repo_button.format("pin"))
    message(browser, f"Pin of {REPO}: pinned", "ok")
    assert [(p.repo_id, p.quant) for p in depot.pins()] == [(REPO, None)]

    # Loaded again (the token is in the tab now, not in the address), the page still acts.
    browser.refresh()
    wait_for(browser, "the token in use", lambda d: visible_text(d, "#token-state") == "token set")
    click(browser, repo_button.format("unpin"))
    message(browser, f"Unpin of {REPO}: unpinned", "ok")
    assert depot.pins() == []


def test_a_fleet_node_lists_its_peers_pulls_preloads_and_pins(
    browser: WebDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes of a fleet (the in-process registry) sharing a token: the page of the second pulls from
    the first, found as a peer; preloads and pins. Its picture is the README's."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("MODELDEPOT_TOKEN", TOKEN)  # what a node sends its peers
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # no Hub: the peer alone
    cluster = f"mem://dashboard-{uuid.uuid4().hex[:12]}"
    with Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as a_depot:
        a_depot.import_dir(write_model_dir(tmp_path / "src-a", FILES), REPO)
        monkeypatch.setenv("MODELDEPOT_MAX_SIZE", "32MiB")  # the second node keeps within a disk budget
        with Depot(tmp_path / "b", chunk_size=SMALL_CHUNK) as b_depot:
            b_depot.import_dir(write_model_dir(tmp_path / "src-b", sample_files(3)), "acme/embedder")
            a = InProcessNode(a_depot, cluster, TOKEN)
            b = InProcessNode(b_depot, cluster, TOKEN)
            try:
                run_fleet_node(browser, b, b_depot, a_depot.node_id)
            finally:
                b.stop()
                a.stop()
    assert script_errors(browser) == []


def run_fleet_node(browser: WebDriver, node: InProcessNode, depot: Depot, peer_id: str) -> None:
    browser.get(node.url + "/")
    wait_for(browser, "the token panel", lambda d: visible_text(d, "#token-panel"))
    type_into(browser, "#token-input", TOKEN)
    click(browser, "#token-submit")
    wait_for(
        browser,
        "two peers",
        lambda d: js(d, "return document.querySelectorAll('#peers tbody tr').length") == 2,
    )
    peers = visible_text(browser, "#peers") or ""
    assert "(this node)" in peers and peer_id[:12] in peers, peers
    assert visible_text(browser, "#disk-budget") == "32.0 MiB"
    assert "acme/embedder" in (visible_text(browser, "#repos") or "")

    type_into(browser, "#pull-repo", REPO)
    type_into(browser, "#pull-quants", "q4f16")
    click(browser, "#pull-submit")
    wait_for(browser, "the variant downloaded", lambda d: variant_status(d, "q4f16") == "downloaded")
    note = wait_for(
        browser, "where the bytes came from", lambda d: visible_text(d, f"{variant_row('q4f16')} .note")
    )
    assert "peer " in note, note

    click(browser, f'{variant_row("q4f16")} button[data-action="preload"]')
    message(browser, f"Preload of {REPO} (q4f16):", "ok")
    shown = wait_for(browser, "the preloaded model", lambda d: REPO in (visible_text(d, "#preloaded") or "") and
                     visible_text(d, "#preloaded"))  # fmt: skip
    assert depot.preloader.holds(REPO, "q4f16")
    assert depot.resolve(REPO)[:12] in shown, shown  # (which commit is in RAM: a branch moves on)
    click(browser, f'{variant_row("q4f16")} button[data-action="pin"]')
    message(browser, f"Pin of {REPO} (q4f16): pinned", "ok")
    wait_for(
        browser,
        "the unpin button",
        lambda d: visible_text(d, f'{variant_row("q4f16")} button[data-action="unpin"]'),
    )
    assert [(p.repo_id, p.quant) for p in depot.pins()] == [(REPO, "q4f16")]
    click(browser, '.repo[data-repo="acme/embedder"] .repo-actions button[data-action="pin"]')
    message(browser, "Pin of acme/embedder: pinned", "ok")
    wait_for(
        browser,
        "the pinned badge",
        lambda d: visible_text(d, '.repo[data-repo="acme/embedder"] .badge.pinned'),
    )
    wait_for(browser, "the pinned bytes", lambda d: "pinned" in (visible_text(d, "#disk-detail") or ""))
    wait_for(browser, "the RAM tier in use", lambda d: visible_text(d, "#ram-used") not in ("0 B", "–"))

    js(browser, "document.querySelector('#message').hidden = true")  # a quieter picture
    path = depot.home.parent / "fleet-dashboard.png"
    screenshot(browser, path)
    wanted = os.environ.get("MODELDEPOT_DASHBOARD_SCREENSHOT")
    if wanted:
        shutil.copyfile(path, wanted)

    click(browser, f'{variant_row("q4f16")} button[data-action="unpin"]')
    message(browser, f"Unpin of {REPO} (q4f16): unpinned", "ok")
    assert [(p.repo_id, p.quant) for p in depot.pins()] == [("acme/embedder", None)]


def test_a_node_that_stops_answering_leaves_its_last_picture_marked_stale(
    browser: WebDriver, tmp_path: Path
) -> None:
    with Depot(tmp_path / "open", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "files", FILES), REPO)
        node = OpenNode(depot)
        try:
            browser.get(node.url + "/")
            wait_for(browser, "the stored repo", lambda d: REPO in (visible_text(d, "#repos") or ""))
            wait_for(browser, "the live event stream", lambda d: visible_text(d, "#stream-state") == "live")
            # (its first text, "unknown: not read yet", until the first read of the stats answers)
            uptime = wait_for(browser, "the node's uptime",
                              lambda d: (text := visible_text(d, "#store-detail") or "").startswith("up ") and text)  # fmt: skip
            assert uptime.startswith("up "), uptime
            assert visible_text(browser, "#node-lost") is None and not is_stale(browser)
        finally:
            node.stop()  # as SIGTERM stops it: the page's connections end, new ones are refused

        # What the page shows stays (it is all there is), said to be from when the node last answered.
        lost = wait_for(browser, "that the node is not answering", lambda d: visible_text(d, "#node-lost"))
        assert LOST.match(lost) and "the node did not answer" in lost, lost
        assert is_stale(browser) and opacity(browser, "#repos-section") < 1 and opacity(browser, ".cards") < 1
        assert REPO in (visible_text(browser, "#repos") or "")
        assert (visible_text(browser, "#store-detail") or "").startswith("up ")  # (the uptime then)
        # A repo stored while the node is away: the page, which cannot know, shows the store as it was.
        depot.import_dir(write_model_dir(tmp_path / "more", sample_files(3)), "acme/embedder")

        # Started again where the page knew it, the node is read again: the message and the marks go.
        again = open_node_on(depot, node.port)
        try:
            wait_for(browser, "the node answering again", lambda d: visible_text(d, "#node-lost") is None)
            assert not is_stale(browser)
            repos = wait_for(browser, "the repo stored meanwhile",
                             lambda d: "acme/embedder" in (visible_text(d, "#repos") or "") and visible_text(d, "#repos"))  # fmt: skip
            assert REPO in repos, repos
            wait_for(browser, "the live event stream", lambda d: visible_text(d, "#stream-state") == "live")
        finally:
            again.stop()
    assert script_errors(browser) == []


def test_a_node_gone_silent_is_not_shown_live(browser: WebDriver, tmp_path: Path) -> None:
    """A node frozen without closing its connections (SIGSTOP: a process stuck, a machine gone silent): the
    banner said it was not answering, "since" the moment its reads timed out (10 s late), and the event
    stream's pill said "live" for as long as it lasted (a trial). The stream heard nothing for longer than
    its heartbeat's period: it is said silent, and the banner dates the silence from the read it began."""
    home = tmp_path / "node"
    modeldepot("import", str(write_model_dir(tmp_path / "files", FILES)), "--repo", REPO, "--home", str(home),
               env=base_env())  # fmt: skip
    port = free_port()
    node = subprocess.Popen([sys.executable, "-m", "modeldepot", "serve", "--home", str(home), "--port", str(port),
                             "--scrub-interval", "off"], env=base_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(port, 60, process=node)
        browser.get(f"http://127.0.0.1:{port}/")
        wait_for(browser, "the live event stream", lambda d: visible_text(d, "#stream-state") == "live")
        frozen = time.time()
        node.send_signal(signal.SIGSTOP)
        lost = wait_for(
            browser, "that the node is not answering", lambda d: visible_text(d, "#node-lost"), 40
        )
        since = re.search(r"since (\d\d):(\d\d):(\d\d)", lost)
        assert since, lost
        shown = time.localtime(frozen)
        said = int(since[1]) * 3600 + int(since[2]) * 60 + int(since[3])
        assert abs(said - (shown.tm_hour * 3600 + shown.tm_min * 60 + shown.tm_sec)) <= 7, (lost, frozen)
        wait_for(browser, "the stream said silent",
                 lambda d: (visible_text(d, "#stream-state") or "").startswith("silent"), 40)  # fmt: skip
    finally:
        node.send_signal(signal.SIGCONT)
        node.terminate()
        node.wait(60)


LOST = re.compile(r"The node is not answering \(since \d\d:\d\d:\d\d\); what is shown is from then\.")


def is_stale(driver: WebDriver) -> bool:
    return bool(js(driver, "return document.querySelector('main').classList.contains('stale')"))


def opacity(driver: WebDriver, css: str) -> float:
    return float(js(driver, "return getComputedStyle(document.querySelector(arguments[0])).opacity", css))


def open_node_on(depot: Depot, port: int) -> OpenNode:
    """A node over ``depot`` that listens on ``port`` too: started again at the address the page has."""
    node = OpenNode(depot)
    site = web.TCPSite(node.runner, "127.0.0.1", port)
    asyncio.run_coroutine_threadsafe(site.start(), node.loop).result(30)
    return node


# What the page says of an empty store, a node outside a fleet, a disk without a budget: true once read.
FALSE_CLAIMS = ("No repos yet", "No fleet", "no budget", "Nothing is preloaded")


def test_a_node_read_without_its_token_claims_no_emptiness(browser: WebDriver, tmp_path: Path) -> None:
    with Depot(tmp_path / "guarded", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "files", FILES), REPO)
        node = LiveNode(depot, token=TOKEN)
        try:
            run_node_read_without_its_token(browser, node)
        finally:
            node.stop()
    assert script_errors(browser) == []


def run_node_read_without_its_token(browser: WebDriver, node: LiveNode) -> None:
    # Every read is refused: the page says what it does not know, and why, not that there is nothing.
    browser.get(node.url + "/")
    wait_for(browser, "the token panel", lambda d: visible_text(d, "#token-panel"))
    click(browser, "#token-skip")
    wait_for(browser, "that the token is needed", lambda d: visible_text(d, "#token-state") == "token needed")
    shown = page_text(browser)
    assert not [claim for claim in FALSE_CLAIMS if claim in shown], shown
    unknown = "Unknown: reading this needs the node's token."
    for note in ("#repos-unknown", "#preloaded-unknown", "#peers-unknown"):
        wait_for(browser, f"the note {note}: {unknown!r}", lambda d, n=note: visible_text(d, n) == unknown)
    assert visible_text(browser, "#disk-used") == "–" and visible_text(browser, "#disk-budget") == "–"
    assert visible_text(browser, "#disk-detail") == "unknown: reading this needs the node's token"
    assert visible_text(browser, "#node-lost") is None  # refused is not silent

    # With the token the page reads the node, and says what it read.
    click(browser, "#token-button")
    type_into(browser, "#token-input", TOKEN)
    click(browser, "#token-submit")
    wait_for(browser, "the stored repo", lambda d: REPO in (visible_text(d, "#repos") or ""))
    wait_for(browser, "the budget", lambda d: visible_text(d, "#disk-budget") == "no budget")
    assert "No fleet" in (visible_text(browser, "#peers-section") or "")
    assert visible_text(browser, "#repos-unknown") is None and visible_text(browser, "#peers-unknown") is None

    # Forgotten, the token takes what it read with it: the reads are refused again, and said to be.
    click(browser, "#forget-token")
    wait_for(browser, "the repos unknown again", lambda d: visible_text(d, "#repos-unknown") == unknown)
    shown = page_text(browser)
    assert REPO not in shown and not [claim for claim in FALSE_CLAIMS if claim in shown], shown


def answers_to(driver: WebDriver, path: str) -> list[int]:
    """The statuses of the answers the page got for ``path`` (from the browser's network log) since the
    last call."""
    statuses = []
    for entry in driver.get_log("performance"):  # type: ignore[attr-defined]
        event = json.loads(entry["message"])["message"]
        if event.get("method") == "Network.responseReceived":
            response = event["params"]["response"]
            if response["url"].split("?")[0].endswith(path):
                statuses.append(int(response["status"]))
    return statuses


def test_the_page_polls_the_repo_list_by_its_etag_and_still_sees_it_change(
    browser: WebDriver, tmp_path: Path
) -> None:
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "files", FILES), REPO)
        node = LiveNode(depot)
        try:
            browser.get(node.url + "/")
            wait_for(browser, "the stored repo", lambda d: REPO in (visible_text(d, "#repos") or ""))
            statuses: list[int] = []  # (the import's blobs are recorded durable meanwhile: a change, a 200)

            def answered_304(d: WebDriver) -> bool:
                statuses.extend(answers_to(d, "/api/depot/v1/repos"))
                return 304 in statuses

            wait_for(browser, "a 304 to the list's ETag", answered_304, timeout=15)
            assert statuses[0] == 200, statuses
            assert REPO in (visible_text(browser, "#repos") or ""), "a 304 keeps what the page showed"
            depot.import_dir(write_model_dir(tmp_path / "more", sample_files(3)), "acme/more")
            wait_for(browser, "a new list", lambda d: 200 in answers_to(d, "/api/depot/v1/repos"))
            wait_for(browser, "the new repo", lambda d: "acme/more" in (visible_text(d, "#repos") or ""))
            assert REPO in (visible_text(browser, "#repos") or "")
        finally:
            node.stop()
    assert script_errors(browser) == []


def test_the_peers_say_when_the_fleets_registry_is_out_of_reach(
    browser: WebDriver, tmp_path: Path, etcd_server: Any
) -> None:
    """etcd down: the node serves on, its view of the fleet the last known, and health says `degraded`;
    the page listed the peers as if all were well."""
    with Depot(tmp_path / "a", chunk_size=SMALL_CHUNK) as depot:
        node = InProcessNode(depot, etcd_server.cluster)
        try:
            browser.get(node.url + "/")
            wait_for(
                browser,
                "this node among the peers",
                lambda d: "(this node)" in (visible_text(d, "#peers") or ""),
            )
            assert visible_text(browser, "#peers-degraded") is None
            etcd_server.kill()
            note = wait_for(
                browser, "the registry said out of reach", lambda d: visible_text(d, "#peers-degraded"), 40
            )
            assert note.startswith("The fleet is degraded, since ") and "cannot be reached" in note, note
            assert "(this node)" in (visible_text(browser, "#peers") or "")  # (the last known view, said so)
        finally:
            node.stop()
    assert script_errors(browser) == []


def test_a_node_on_a_read_only_store_says_so_and_refuses_its_controls(
    browser: WebDriver, tmp_path: Path, mounts: Mounts
) -> None:
    home = tmp_path / "store"
    with Depot(home, chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "files", FILES), REPO)
    with Depot(mounts.read_only(home)) as depot:
        node = OpenNode(depot)
        try:
            browser.get(f"{node.url}/#token={node.control_token}")
            wait_for(browser, "the stored repo", lambda d: REPO in (visible_text(d, "#repos") or ""))
            note = wait_for(browser, "the read-only note", lambda d: visible_text(d, "#control-note"))
            assert note.startswith("Read-only: the store is read-only here"), note
            assert visible_text(browser, "#token-state") == "token set"  # (the token is not what refuses)
            # What it would refuse is not offered (each such button failed when clicked: an explorer's trial);
            # a preload, which reads, is
            actions = f'.repo[data-repo="{REPO}"] .repo-actions'
            wait_for(
                browser,
                "the repo's preload",
                lambda d: visible_text(d, f'{actions} button[data-action="preload"]'),
            )
            for action in ("pin", "remove"):
                assert visible_text(browser, f'{actions} button[data-action="{action}"]') is None, action
            assert visible_text(browser, "#pull-form") is None
            assert not [b for b in browser.find_elements(By.CSS_SELECTOR, "tr.variant button") if b.is_displayed()
                        and b.get_attribute("data-action") != "preload"]  # fmt: skip
        finally:
            node.stop()
    assert script_errors(browser) == []


def test_what_a_stream_no_longer_lists_leaves_the_page(browser: WebDriver, tmp_path: Path) -> None:
    """The page kept the variant rows of every earlier event stream: a repo removed while it reconnected stayed
    as a ghost ("DOWNLOADED" under "not in the store yet"), and a private repo, and the pulls read with the
    control token, stayed shown once the token was forgotten (an explorer's trials). Each stream's first
    listing closes with a snapshot event: what it did not list goes."""
    import urllib.request

    with Depot(tmp_path / "open", chunk_size=SMALL_CHUNK) as depot:
        depot.import_dir(write_model_dir(tmp_path / "files", FILES), REPO)
        depot.import_dir(write_model_dir(tmp_path / "secret", sample_files(4)), "acme/secret", private=True)
        depot.import_dir(write_model_dir(tmp_path / "ghost", sample_files(5)), "acme/ghost")
        node = OpenNode(depot)
        try:
            request = urllib.request.Request(  # (a pull of what it holds, offline: a row of the table)
                f"{node.url}/api/depot/v1/pulls", data=json.dumps({"repo": "acme/ghost"}).encode(),
                headers={"Authorization": f"Bearer {node.control_token}", "Content-Type": "application/json"},
            )  # fmt: skip
            assert urllib.request.urlopen(request, timeout=30).status == 202
            browser.get(f"{node.url}/#token={node.control_token}")
            wait_for(
                browser, "the private repo", lambda d: "acme/secret" in (visible_text(d, "#repos") or "")
            )
            wait_for(browser, "the pull's row", lambda d: "acme/ghost" in (visible_text(d, "#pulls") or ""))
            wait_for(browser, "the live event stream", lambda d: visible_text(d, "#stream-state") == "live")
            click(browser, "#forget-token")
            wait_for(browser, "the private repo gone",
                     lambda d: "acme/secret" not in (visible_text(d, "#repos") or ""))  # fmt: skip
            wait_for(
                browser, "the pulls gone", lambda d: "acme/nowhere" not in (visible_text(d, "#pulls") or "")
            )
            assert REPO in (visible_text(browser, "#repos") or "")
            wait_for(browser, "the live event stream", lambda d: visible_text(d, "#stream-state") == "live")
        finally:
            node.stop()
        wait_for(browser, "that the node is not answering", lambda d: visible_text(d, "#node-lost"))
        depot.remove("acme/ghost")  # (while the page cannot hear of it)
        again = open_node_on(depot, node.port)
        try:
            wait_for(browser, "the node answering again", lambda d: visible_text(d, "#node-lost") is None)
            wait_for(browser, "the live event stream", lambda d: visible_text(d, "#stream-state") == "live")
            wait_for(browser, "the removed repo gone",
                     lambda d: "acme/ghost" not in (visible_text(d, "#repos") or ""))  # fmt: skip
            assert REPO in (visible_text(browser, "#repos") or "")
        finally:
            again.stop()
    assert script_errors(browser) == []


def test_a_store_of_many_repos_shows_a_page_of_them_and_finds_the_others(
    browser: WebDriver, tmp_path: Path
) -> None:
    """A store of 14,600 repos made a page of 511,000 elements that asked every repo's manifest and froze for
    16 s at each poll (an explorer's trial). The page shows 100 repos (Show more adds 100), asks only the
    shown ones' manifests, and a filter finds any repo."""
    with Depot(tmp_path / "store", chunk_size=SMALL_CHUNK) as depot:
        for number in range(130):  # (each with variants: their manifests are what the page asks for)
            files = {
                f"m-{quant}.gguf": b"%s of %d" % (quant.encode(), number) for quant in ("Q4_K_M", "Q8_0")
            }
            depot.import_dir(
                write_model_dir(tmp_path / "src" / str(number), files), f"acme/model-{number:03d}"
            )
        node = LiveNode(depot)
        try:
            browser.get(node.url + "/")
            shown = "return document.querySelectorAll('#repos .repo').length"
            wait_for(browser, "a page of repos", lambda d: js(d, shown) == 100)
            assert visible_text(browser, "#repos-count") == "100 of 130 shown"
            assert "acme/model-129" not in (visible_text(browser, "#repos") or "")
            time.sleep(2.5)  # (a poll and its render: the manifests asked meanwhile)
            asked = len(answers_to(browser, "/manifest"))
            assert 0 < asked <= 100, f"{asked} manifests asked for 100 repos shown"
            click(browser, "#repos-more")
            wait_for(browser, "every repo", lambda d: js(d, shown) == 130)
            assert visible_text(browser, "#repos-more") is None
            type_into(browser, "#repos-filter", "MODEL-12")
            wait_for(browser, "the repos found", lambda d: js(d, shown) == 10)
            assert visible_text(browser, "#repos-count") == "10 of 10 matching (of 130) shown"
            assert "acme/model-129" in (visible_text(browser, "#repos") or "")
        finally:
            node.stop()
    assert script_errors(browser) == []
