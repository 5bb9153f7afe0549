// The modeldepot node's dashboard: plain JavaScript, no framework, nothing fetched but the node's own routes.
//
// Reads: /api/depot/v1/{info,stats,repos,peers,pins,pulls} (polled), each scanned repo's manifest, and the
// event stream /api/depot/v1/events (read with fetch, so the token can go in a header; EventSource cannot
// send one). Actions: the control routes (pulls, preload, pin, unpin, remove), which need a token: the
// node's (--token), else the control token it made at start, which `modeldepot serve` prints in this page's
// address (#token=...). The token is taken from the address (and removed from it) or asked once, and kept in
// this tab's sessionStorage.
"use strict";

(() => {
  const API = "api/depot/v1"; // relative: the page works behind a proxy that mounts the node under a prefix
  const TOKEN_KEY = "modeldepot-token";
  const POLL_MS = 2000;
  // Repos shown at once (more on a click, or found by the filter): a store of 14,600 repos made a page of
  // 511,000 elements, asked each one's manifest, and froze for 16 s at every poll (an explorer's trial)
  const REPOS_SHOWN = 100;
  const RECONNECT_MS = 2000;
  const STREAM_SILENCE_MS = 25000; // no byte of the event stream for this long (its heartbeat is every 15 s)
  const READ_TIMEOUT_MS = 10000; // a read still unanswered then: the node is not answering (a machine gone silent)
  const PULLS_SHOWN = 10;
  const IDLE_SHOWN_S = 5; // seconds without a byte after which a running pull says it waits on its sources
  const FULL_DISK_FREE = 1 << 20; // bytes free under which the node's /health says its disk is full
  const HOW_TO_CONTROL =
    "To control this node, open the address `modeldepot serve` printed when it started (it ends in #token=…), " +
    "or set the token it was started with (--token).";

  // The address `modeldepot serve` prints for a node without a token ends in #token=<its control token>:
  // kept like a typed token, and taken out of the address bar (and so out of the history and of bookmarks).
  function takeTokenFromAddress() {
    const fragment = location.hash.replace(/^#/, "");
    const match = /(?:^|&)token=([^&]*)/.exec(fragment);
    if (!match) return;
    let token = "";
    try {
      token = decodeURIComponent(match[1]).trim();
    } catch (error) {
      token = "";
    }
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    const rest = fragment.split("&").filter((part) => part && !part.startsWith("token=")).join("&");
    history.replaceState(history.state, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }

  takeTokenFromAddress();

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    asked: false, // the token panel opened by itself once; afterwards only the button opens it
    refused: false, // the last request was refused for want of a (valid) token
    info: null,
    stats: null,
    repos: [],
    peers: [],
    health: null, // /api/depot/v1/health: its status is "degraded" while the registry is out of reach
    pins: [],
    pulls: [],
    controlRefusal: null,
    // Why each read's data is not known (null once read): nothing on the page may claim emptiness before.
    unknown: { stats: "not read yet", repos: "not read yet", peers: "not read yet", pins: "not read yet" },
    lost: null, // {since, error} while the node does not answer: what is shown is from then, marked stale
    variants: new Map(), // "repo:variant" -> the last variant event
    streamed: null, // the keys the event stream connected last listed, until its snapshot event
    manifests: new Map(), // repo -> {revision, endpoint} from its saved scan (or null while asked)
    reposShown: REPOS_SHOWN, // repos shown at most (Show more adds as many)
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "data") Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let value = n;
    let unit = 0;
    while (Math.abs(value) >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
  }

  function ago(seconds) {
    const delta = Math.max(0, Date.now() / 1000 - seconds);
    if (delta < 5) return "now";
    if (delta < 90) return `${Math.round(delta)} s ago`;
    if (delta < 5400) return `${Math.round(delta / 60)} min ago`;
    if (delta < 172800) return `${Math.round(delta / 3600)} h ago`;
    return `${Math.round(delta / 86400)} days ago`;
  }

  function percent(done, total) {
    if (!total) return done ? 100 : 0;
    return Math.max(0, Math.min(100, (100 * done) / total));
  }

  // -- messages and the token -----------------------------------------------------------------------------

  let messageTimer = null;
  function say(text, kind = "ok") {
    const box = $("message");
    box.textContent = text;
    box.dataset.kind = kind;
    box.hidden = false;
    clearTimeout(messageTimer);
    if (kind === "ok") messageTimer = setTimeout(() => (box.hidden = true), 8000);
  }

  function renderToken() {
    const pill = $("token-state");
    if (state.refused) {
      pill.dataset.state = "refused";
      pill.textContent = state.token ? "token refused" : "token needed";
    } else {
      pill.dataset.state = state.token ? "set" : "none";
      pill.textContent = state.token ? "token set" : "no token";
    }
    $("forget-token").hidden = !state.token;
    $("token-button").textContent = state.token ? "Change token" : "Set token";
  }

  function askToken() {
    $("token-panel").hidden = false;
    $("token-input").focus();
  }

  function setToken(token) {
    state.token = token;
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    state.refused = false;
    renderToken();
    connect();
    refresh();
  }

  function unauthorized() {
    state.refused = true;
    renderToken();
    if (!state.asked) {
      state.asked = true;
      askToken();
    }
  }

  // -- talking to the node ----------------------------------------------------------------------------------

  function headers(extra = {}) {
    const all = { ...extra };
    if (state.token) all.Authorization = `Bearer ${state.token}`;
    return all;
  }

  // A read's last answer that came with an ETag, by path: sent back, the node answers 304 while it stands
  // (the repo list, every 2 s, was 0.8 MB and a quarter of a second of the node's CPU at 3,000 repos).
  const kept = new Map();

  // quiet: a 401 is not reported (the polled list of pulls, refused on a node whose reads are open).
  async function api(method, path, body, quiet = false) {
    const init = { method, cache: "no-store", headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
    // (a read, every 2 s: the node's access log keeps it at DEBUG, where one open tab wrote 165 lines a minute)
    if (method === "GET") init.headers["X-Depot-Poll"] = "1";
    if (body !== undefined) init.body = JSON.stringify(body);
    if (method === "GET") init.signal = AbortSignal.timeout(READ_TIMEOUT_MS); // (an action may take its time)
    const before = method === "GET" ? kept.get(path) : undefined;
    if (before && before.token === state.token) init.headers["If-None-Match"] = before.etag;
    const asked = new Date(); // (a read that timed out: the node was silent since then, not since the timeout)
    let response;
    try {
      response = await fetch(`${API}/${path}`, init);
    } catch (error) {
      const why = error.name === "TimeoutError" ? `within ${READ_TIMEOUT_MS / 1000} s` : `(${error.message})`;
      return { ok: false, status: 0, data: null, error: `the node did not answer ${why}`, asked };
    }
    if (response.status === 304 && before) return { ok: true, status: 200, data: before.data, error: null };
    let data = null;
    if ((response.headers.get("Content-Type") || "").startsWith("application/json")) {
      try {
        data = await response.json();
      } catch (error) {
        // An answer cut short (the node stopped, or the read timed out, while it was sent): no data, not none.
        if (response.ok) return { ok: false, status: 0, data: null, error: `the node's answer was cut short (${error.message})`, asked };
        data = null;
      }
    }
    if (method === "GET") {
      const etag = response.headers.get("ETag");
      if (response.ok && etag && data !== null) kept.set(path, { etag, data, token: state.token });
      else kept.delete(path);
    }
    const message = response.ok
      ? null
      : (data && typeof data.error === "string" && data.error) || response.headers.get("X-Error-Message") || `HTTP ${response.status}`;
    if (response.status === 401 && !quiet) unauthorized();
    return { ok: response.ok, status: response.status, data, error: message };
  }

  function repoPath(repo) {
    return repo.split("/").map(encodeURIComponent).join("/");
  }

  // -- polling ------------------------------------------------------------------------------------------------

  let refreshing = null;
  let refreshAgain = false;
  function refresh() {
    if (refreshing) {
      refreshAgain = true;
      return refreshing;
    }
    refreshing = (async () => {
      do {
        refreshAgain = false;
        await load();
      } while (refreshAgain);
      refreshing = null;
    })();
    return refreshing;
  }

  async function load() {
    const [info, stats, repos, peers, pins, pulls, health] = await Promise.all([
      state.info && !state.lost ? Promise.resolve({ ok: true, data: state.info }) : api("GET", "info"), // (again once back)
      api("GET", "stats"),
      api("GET", "repos"),
      api("GET", "peers"),
      api("GET", "pins"),
      api("GET", "pulls", undefined, true), // a control route: a 401 here leaves the reads readable
      api("GET", "health"), // (open: how the node's view of its fleet stands)
    ]);
    if (info.ok) state.info = info.data;
    state.health = health.ok ? health.data : null;
    take("stats", stats, null);
    take("repos", repos, []);
    take("peers", peers, []);
    take("pins", pins, []);
    // Every read counts, the health read too: one asked just before the node froze may be the only one left
    // unanswered (the others answered in time), and the silence dates from it, not from the next round's reads
    const silent = [info, stats, repos, peers, pins, pulls, health].filter((answer) => answer.status === 0);
    if (!silent.length) state.lost = null;
    else {
      const asked = silent.map((answer) => answer.asked).sort((a, b) => a - b)[0];
      state.lost = { since: state.lost ? state.lost.since : asked, error: silent[0].error };
    }
    const readsRefused = [info, stats, repos, peers, pins].some((answer) => answer.status === 401);
    const controlRefused = pulls.status === 401 || pulls.status === 403;
    if (pulls.ok) {
      state.pulls = pulls.data;
      state.controlRefusal = null;
    } else if (controlRefused) {
      // Shown when the rest is readable (a node without a token): the buttons would be refused. The pulls read
      // with the token go (they stayed on the page once it was forgotten: an explorer's trial)
      state.pulls = [];
      state.controlRefusal = readsRefused ? null : HOW_TO_CONTROL;
    }
    const refused = readsRefused || controlRefused;
    if (refused !== state.refused) {
      state.refused = refused;
      renderToken();
    }
    render();
  }

  // A read's answer: its data, or why it is not known. A refused read forgets what an earlier one showed (it
  // was read with a token the page no longer has); one the node did not answer keeps it, shown as stale.
  function take(name, answer, nothing) {
    if (answer.ok) {
      state[name] = answer.data;
      state.unknown[name] = null;
    } else if (answer.status === 401) {
      state[name] = nothing;
      state.unknown[name] = "reading this needs the node's token";
      if (name === "repos") state.variants.clear(); // (their events come with the token too)
    } else if (state.unknown[name] !== null) {
      state.unknown[name] = answer.status === 0 ? "the node is not answering" : `the read failed: ${answer.error}`;
    }
  }

  async function poll() {
    await refresh();
    setTimeout(poll, POLL_MS);
  }

  let soon = null;
  function refreshSoon() {
    clearTimeout(soon);
    soon = setTimeout(refresh, 150);
  }

  // A scanned repo's revision and source, asked once (again 30 s after a failure).
  async function manifestOf(repo) {
    const known = state.manifests.get(repo);
    if (known && (known.revision || Date.now() - known.asked < 30000)) return;
    state.manifests.set(repo, { revision: null, endpoint: null, asked: Date.now() });
    const answer = await api("GET", `repos/${repoPath(repo)}/manifest`);
    if (answer.ok) {
      state.manifests.set(repo, { revision: answer.data.revision, endpoint: answer.data.endpoint, asked: Date.now() });
      scheduleRender();
    }
  }

  // -- the event stream (server-sent events over fetch) ---------------------------------------------------------

  let streamControl = null;

  function streamState(kind, text) {
    const pill = $("stream-state");
    pill.dataset.state = kind;
    pill.textContent = text;
  }

  async function connect() {
    if (streamControl) streamControl.abort();
    const control = new AbortController();
    streamControl = control;
    streamState("connecting", "connecting…");
    // The node sends a heartbeat every 15 s: a stream silent longer is a node gone silent (a frozen process,
    // a machine gone), not a live one (the pill said "live" while the banner said the node was not answering)
    let silence = null;
    let stalled = false;
    const listen = () => {
      clearTimeout(silence);
      silence = setTimeout(() => {
        stalled = true;
        control.abort();
      }, STREAM_SILENCE_MS);
    };
    listen(); // (from the request on: a node frozen before it answers leaves the pill "connecting…" too)
    try {
      const response = await fetch(`${API}/events`, {
        headers: headers({ Accept: "text/event-stream" }),
        cache: "no-store",
        signal: control.signal,
      });
      if (response.status === 401) {
        clearTimeout(silence);
        unauthorized();
        streamState("refused", "live updates need the token");
        return; // setToken() connects again
      }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      streamState("live", "live");
      state.streamed = new Set(); // (the variants this stream lists, until its snapshot is whole)
      listen();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        listen();
        buffer += value; // the node ends its lines with \n alone
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          onEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
      }
      throw new Error("the stream ended");
    } catch (error) {
      clearTimeout(silence);
      if (control.signal.aborted && !stalled) return;
      streamState("error", stalled ? "silent: reconnecting…" : "reconnecting…");
      setTimeout(() => {
        if (streamControl === control) connect();
      }, RECONNECT_MS);
    }
  }

  function onEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue; // a comment: the heartbeat
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (name === "snapshot") {
      // What an earlier stream showed and this one does not list is gone: removed while the page reconnected,
      // or not for the credentials it has now (a forgotten token kept a private repo on the page)
      if (state.streamed) {
        for (const key of [...state.variants.keys()]) if (!state.streamed.has(key)) state.variants.delete(key);
        state.streamed = null;
        scheduleRender();
      }
      return;
    }
    if ((name !== "variant" && name !== "gone") || !data.length) return;
    let variant;
    try {
      variant = JSON.parse(data.join("\n"));
    } catch (error) {
      return;
    }
    const key = `${variant.repo_id}:${variant.variant}`;
    if (name === "gone") { // its repo was removed (here or in another process): its row goes
      state.variants.delete(key);
      refreshSoon();
      scheduleRender();
      return;
    }
    const before = state.variants.get(key);
    state.variants.set(key, variant);
    if (state.streamed) state.streamed.add(key);
    if (variant.status !== "downloading" && (!before || before.status !== variant.status)) refreshSoon();
    scheduleRender();
  }

  // -- actions --------------------------------------------------------------------------------------------------

  async function act(button, label, method, path, body) {
    button.disabled = true;
    try {
      const answer = await api(method, path, body);
      if (answer.ok) {
        say(`${label}: ${describe(answer)}`, "ok");
      } else if ((answer.status === 401 || answer.status === 403) && !state.token && !answer.error.includes("#token=")) {
        say(`${label} failed: ${answer.error}. ${HOW_TO_CONTROL}`, "error"); // the node's own message says less
      } else {
        say(`${label} failed: ${answer.error}`, "error");
      }
      await refresh();
      return answer;
    } finally {
      button.disabled = false;
    }
  }

  function describe(answer) {
    const data = answer.data || {};
    if (data.state === "running") return answer.status === 202 ? "started" : "already running";
    if (data.state) return data.state;
    if (data.resident_bytes !== undefined) return `${bytes(data.resident_bytes)} in RAM`;
    if (data.scan_forgotten) return "its saved scan forgotten (the node held nothing of it)";
    if (data.bytes_freed !== undefined) return `removed, ${bytes(data.bytes_freed)} freed`;
    if (data.unpinned !== undefined) return data.unpinned ? "unpinned" : "was not pinned";
    if (data.created_at !== undefined) return "pinned";
    return "done";
  }

  function pinOf(repo, quant) {
    const wanted = quant ? quant.toLowerCase() : null;
    return state.pins.find((p) => p.repo_id === repo && (p.quant ? p.quant.toLowerCase() : null) === wanted) || null;
  }

  function storedRevision(repo) {
    const summary = state.repos.find((r) => r.repo_id === repo);
    if (!summary) return "main";
    // (a repo held at a commit alone, no ref naming it: its saved scan's revision, the commit; "main" was refused)
    return summary.refs.main ? "main" : Object.keys(summary.refs)[0] || variantRevision(repo);
  }

  function variantRevision(repo) {
    const manifest = state.manifests.get(repo);
    return (manifest && manifest.revision) || "main";
  }

  async function onAction(button) {
    const { action, repo } = button.dataset;
    const quant = button.dataset.quant || null;
    const what = quant ? `${repo} (${quant})` : repo;
    const path = `repos/${repoPath(repo)}`;
    if (action === "cancel") {
      await act(button, `Cancel of the pull of ${repo}`, "DELETE", `pulls/${encodeURIComponent(button.dataset.job)}`);
    } else if (action === "pull") {
      await act(button, `Pull of ${what}`, "POST", "pulls", { repo, revision: variantRevision(repo), quants: [quant] });
    } else if (action === "preload") {
      const revision = quant ? variantRevision(repo) : storedRevision(repo);
      await act(button, `Preload of ${what}`, "POST", `${path}/preload`, quant ? { quant, revision } : { revision });
    } else if (action === "pin") {
      const revision = quant ? variantRevision(repo) : storedRevision(repo);
      await act(button, `Pin of ${what}`, "PUT", `${path}/pin`, quant ? { quant, revision } : { revision });
    } else if (action === "unpin") {
      const pin = pinOf(repo, quant);
      const body = pin ? { quant: pin.quant, revision: pin.revision } : { quant, revision: storedRevision(repo) };
      await act(button, `Unpin of ${what}`, "DELETE", `${path}/pin`, body);
    } else if (action === "remove") {
      if (button.dataset.armed && Date.now() - Number(button.dataset.armed) < 6000) {
        delete button.dataset.armed;
        button.classList.remove("confirm");
        button.textContent = "Remove";
        await act(button, `Removal of ${repo}`, "DELETE", path);
      } else {
        button.dataset.armed = String(Date.now());
        button.classList.add("confirm");
        button.textContent = "Confirm remove";
        setTimeout(() => {
          if (button.dataset.armed) {
            delete button.dataset.armed;
            button.classList.remove("confirm");
            button.textContent = "Remove";
          }
        }, 6000);
      }
    }
  }

  async function onPullForm(event) {
    event.preventDefault();
    const repo = $("pull-repo").value.trim();
    const revision = $("pull-revision").value.trim() || "main";
    const text = $("pull-quants").value.trim();
    let quants = null;
    if (text.toLowerCase() === "all") quants = "all";
    else if (text) quants = text.split(/[\s,]+/).filter(Boolean);
    await act($("pull-submit"), `Pull of ${repo}`, "POST", "pulls", { repo, revision, quants });
  }

  // -- rendering ------------------------------------------------------------------------------------------------

  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  }

  // Keeps one child per key (made by make(key) once, updated by update(node, item)): buttons stay the same
  // elements across updates, so a click is never lost to a redraw.
  function sync(container, items, keyOf, make, update) {
    const existing = new Map();
    for (const child of Array.from(container.children)) existing.set(child.dataset.key, child);
    let previous = null;
    for (const item of items) {
      const key = keyOf(item);
      let node = existing.get(key);
      if (!node) {
        node = make(item);
        node.dataset.key = key;
      }
      existing.delete(key);
      const wanted = previous ? previous.nextSibling : container.firstChild;
      if (wanted !== node) container.insertBefore(node, wanted);
      update(node, item);
      previous = node;
    }
    for (const stale of existing.values()) stale.remove();
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function setBar(fill, done, total) {
    const width = `${Number(percent(done, total).toFixed(1))}%`; // as the browser gives it back: 100%, 22.5%
    if (fill.style.width !== width) fill.style.width = width;
  }

  function progressCell() {
    const fill = el("div", { class: "fill" });
    return el("div", { class: "progress" }, el("div", { class: "bar" }, fill), el("span", { class: "label" }));
  }

  function updateProgress(cell, done, total) {
    setBar(cell.querySelector(".fill"), done, total);
    setText(cell.querySelector(".label"), `${bytes(done)} of ${bytes(total)} (${Math.floor(percent(done, total))}%)`);
  }

  function button(action, text, extra = "") {
    return el("button", { type: "button", class: `small ${extra}`.trim(), text, data: { action } });
  }

  function render() {
    renderLost();
    renderHeader();
    renderCards();
    renderPulls();
    renderRepos();
    renderPreloaded();
    renderPeers();
  }

  function clock(date) {
    return [date.getHours(), date.getMinutes(), date.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
  }

  function renderLost() {
    const lost = state.lost;
    const box = $("node-lost");
    box.hidden = !lost;
    document.querySelector("main").classList.toggle("stale", Boolean(lost));
    if (!lost) return;
    const shown = Object.values(state.unknown).includes(null) ? "what is shown is from then" : "nothing could be read yet";
    setText(box, `The node is not answering (since ${clock(lost.since)}); ${shown}. ` +
      `Asking again every ${POLL_MS / 1000} s (last: ${lost.error}).`);
  }

  // A section's note saying why its data is not known (null: it is, the note is hidden).
  function unknownNote(id, why) {
    const note = $(id);
    note.hidden = !why;
    setText(note, why ? `Unknown: ${why}.` : "");
  }

  function renderHeader() {
    if (state.info) {
      setText($("node-id"), `node ${state.info.id.slice(0, 12)}`);
      setText($("node-version"), `v${state.info.version}`);
    }
    const refusals = [];
    $("pull-form").hidden = Boolean(state.info && state.info.read_only); // (a form every use of which failed)
    if (state.info && state.info.read_only) {
      refusals.push("the store is read-only here (a read-only mount, or another user's files): this node serves what it holds, and refuses pulls, pins and removals");
    }
    if (state.controlRefusal) refusals.push(state.controlRefusal);
    const note = $("control-note");
    note.hidden = !refusals.length;
    setText(note, refusals.length ? `Read-only: ${refusals.join("; ")}` : "");
  }

  function renderCards() {
    const stats = state.stats;
    const budget = stats ? stats.budget : null; // without the token only max_bytes (the rest counts private repos)
    // Without the token the store's use is withheld (it counts private repos): what the public repos take
    // is shown as that, never as the disk used against the budget (it read 88% of a store 98% full)
    const withheld = Boolean(budget) && budget.used_bytes === null;
    const used = budget && !withheld ? budget.used_bytes : stats ? stats.blob_bytes : null;
    const max = budget ? budget.max_bytes : null;
    setText($("disk-used"), withheld ? `${bytes(used)} in public repos` : bytes(used));
    setText($("disk-budget"), !stats ? "–" : max === null || max === undefined ? "no budget" : bytes(max));
    // The room pulls and imports under way hold counts against the budget too: left out, the card read 43%
    // used while a pull was refused for a full budget (an operator's trial)
    const held = budget && !withheld && budget.reserved_bytes ? budget.reserved_bytes : 0;
    setBar($("disk-bar"), max && !withheld ? (used || 0) + held : 0, max || 1); // (no budget, or withheld: nothing to fill)
    $("disk-bar").classList.toggle("full", Boolean(max) && !withheld && ((used || 0) + held) / max > 0.9);
    const disk = [];
    if (withheld) disk.push("the store's whole use needs the node's token");
    if (held) disk.push(`${bytes(held)} held for pulls and imports under way`);
    if (budget && budget.pinned_bytes !== null) disk.push(`${bytes(budget.pinned_bytes)} pinned`);
    if (budget && budget.evictions !== null) disk.push(`${budget.evictions} evicted (${bytes(budget.evicted_bytes)})`);
    if (stats && stats.logical_bytes > stats.blob_bytes) {
      disk.push(`${bytes(stats.logical_bytes)} of files in ${bytes(stats.blob_bytes)} (each content stored once)`);
    } else if (stats) {
      disk.push(`${stats.blobs} blob${stats.blobs === 1 ? "" : "s"}`);
    }
    if (!stats) disk.push(`unknown: ${state.unknown.stats}`);
    // What the store takes beside its budget, and the room left on the disk: a full disk read "40 MiB of no
    // budget" under an empty bar while every pull failed 507, and interrupted downloads and a failing disk's
    // corrupt copies were on no card (an explorer's trial)
    const room = stats && stats.disk ? stats.disk : null;
    const free = room ? room.free_bytes : null;
    const full = free !== null && free !== undefined && free < FULL_DISK_FREE && !(state.info && state.info.read_only);
    if (full) {
      disk.unshift(`the disk is full (${bytes(free)} free): pulls and imports fail until room is made (gc, rm, a disk budget)`);
      setBar($("disk-bar"), 1, 1);
      $("disk-bar").classList.add("full");
    } else if (free !== null && free !== undefined) {
      disk.push(`${bytes(free)} free on the disk`);
    }
    if (room && room.partial_bytes) disk.push(`${bytes(room.partial_bytes)} of downloads under way or kept for a resume`);
    if (stats && stats.quarantined_blobs) {
      disk.push(`${stats.quarantined_blobs} blob${stats.quarantined_blobs === 1 ? "" : "s"} failed verification`);
    }
    if (room && room.quarantine_bytes) disk.push(`${bytes(room.quarantine_bytes)} of corrupt copies set aside (gc frees them)`);
    setText($("disk-detail"), disk.join(" · "));

    if (stats) {
      const preload = stats.preload;
      setText($("ram-used"), bytes(preload.ram_bytes));
      setText($("ram-budget"), bytes(preload.budget_bytes));
      setBar($("ram-bar"), preload.ram_bytes, preload.budget_bytes);
      const count = preload.models.length; // the stats name the preloaded models (those this request may see)
      const ram = [`${count} model${count === 1 ? "" : "s"} preloaded`, preload.strategy];
      // hits null: withheld (no token); hit_rate null alone: no lookup yet
      if (preload.hits !== null) ram.push(`hit rate ${preload.hit_rate === null ? "–" : `${(100 * preload.hit_rate).toFixed(0)}%`}`);
      setText($("ram-detail"), ram.join(" · "));

      const engines = stats.engines;
      setText($("engines-count"), `${engines.cached_models} loaded`);
      const detail = [];
      if (engines.total_memory_bytes !== null) detail.push(`${bytes(engines.total_memory_bytes)}`);
      if (engines.total_hits !== null) detail.push(`${engines.total_hits} hits, ${engines.total_misses} misses`);
      setText($("engines-detail"), detail.join(" · ") || "details need the token");

      setText($("store-repos"), `${stats.repos} repo${stats.repos === 1 ? "" : "s"}`);
      setText($("store-detail"), `up ${Math.round(stats.uptime_seconds / 60)} min · ${stats.most_accessed.length ? `most used: ${stats.most_accessed[0].repo_id}` : "no use yet"}`);
    } else {
      for (const id of ["ram-used", "ram-budget", "engines-count", "store-repos"]) setText($(id), "–");
      setBar($("ram-bar"), 0, 1);
      for (const id of ["ram-detail", "engines-detail", "store-detail"]) setText($(id), `unknown: ${state.unknown.stats}`);
    }
  }

  function quantsText(quants) {
    if (quants === null) return "whole repo";
    if (quants === "all") return "every variant";
    return quants.join(", ");
  }

  // Why a running pull stands still, if it does: 0% and "started 2 min ago" said nothing of its sources
  // (frozen peers, an upstream that stopped sending: an explorer's trial).
  function runningNote(job) {
    if (job.waiting_on) return `waiting for another process's download of ${job.waiting_on}`;
    if (job.idle_seconds >= IDLE_SHOWN_S) {
      return `no bytes for ${Math.round(job.idle_seconds)} s: waiting on its sources (other nodes, the upstream)`;
    }
    return ago(job.started_at);
  }

  function renderPulls() {
    const table = $("pulls");
    const jobs = state.pulls.slice(0, PULLS_SHOWN);
    table.hidden = jobs.length === 0;
    sync(
      table.tBodies[0],
      jobs,
      (job) => job.id,
      () => el("tr", { class: "pull" }, el("td", { class: "name" }), el("td", { class: "quants" }),
        el("td", {}, el("span", { class: "status" })), el("td", {}, progressCell()), el("td", { class: "note" }),
        el("td", {}, el("button", { type: "button", class: "cancel", data: { action: "cancel" }, text: "Cancel" }))),
      (row, job) => {
        setText(row.querySelector(".name"), `${job.repo}@${job.revision}`);
        setText(row.querySelector(".quants"), quantsText(job.quants));
        const status = row.querySelector(".status");
        status.dataset.status = job.state;
        setText(status, job.state);
        updateProgress(row.querySelector(".progress"), job.bytes_done, job.bytes_total);
        const note = row.querySelector(".note");
        note.className = job.error ? "note error-text" : "note muted";
        setText(note, job.error || (job.result ? `${bytes(job.result.bytes_downloaded)} downloaded` : runningNote(job)));
        const cancel = row.querySelector("button.cancel"); // (a pull asked by mistake ran until the node stopped)
        cancel.hidden = job.state !== "running";
        cancel.dataset.job = job.id;
        cancel.dataset.repo = job.repo;
      },
    );
  }

  function repoItems() {
    const byRepo = new Map();
    for (const summary of state.repos) byRepo.set(summary.repo_id, { id: summary.repo_id, summary, variants: [] });
    for (const variant of state.variants.values()) {
      if (!byRepo.has(variant.repo_id)) byRepo.set(variant.repo_id, { id: variant.repo_id, summary: null, variants: [] });
      byRepo.get(variant.repo_id).variants.push(variant);
    }
    const items = Array.from(byRepo.values()).sort((a, b) => a.id.localeCompare(b.id));
    for (const item of items) item.variants.sort((a, b) => a.variant.localeCompare(b.variant));
    return items;
  }

  function makeRepo(item) {
    const actions = el("div", { class: "repo-actions" },
      button("preload", "Preload"), button("pin", "Pin"), button("unpin", "Unpin"), button("remove", "Remove", "danger"));
    for (const b of actions.children) b.dataset.repo = item.id;
    const table = el("table", { class: "grid variants" },
      el("thead", {}, el("tr", {}, ...["Variant", "Status", "Progress", "", ""].map((t) => el("th", { text: t })))),
      el("tbody"));
    return el("div", { class: "repo", data: { repo: item.id } },
      el("div", { class: "repo-head" },
        el("span", { class: "repo-name", text: item.id }),
        el("span", { class: "badge private", text: "private" }),
        el("span", { class: "badge pinned", text: "pinned" }),
        el("span", { class: "repo-facts" }),
        actions),
      table);
  }

  function updateRepo(node, item) {
    const summary = item.summary;
    node.dataset.stored = summary ? "yes" : "no";
    node.querySelector(".badge.private").hidden = !(summary && summary.private);
    const pinned = Boolean(pinOf(item.id, null));
    node.querySelector(".badge.pinned").hidden = !pinned;
    let facts;
    if (summary) {
      const refs = Object.entries(summary.refs).map(([ref, commit]) => `${ref} → ${commit.slice(0, 10)}`);
      facts = [refs.join(", "), `${summary.files} file${summary.files === 1 ? "" : "s"}`, bytes(summary.size), summary.origin === "import" ? "imported" : "pulled"];
      if (summary.quarantined) facts.push(`${summary.quarantined} failed verification: not served, ${summary.origin === "import" ? "import it again" : "pull again"}`);
    } else {
      // (evicted by the disk budget, it read "not in the store yet" as if never pulled: an explorer's trial)
      const evictions = state.stats && state.stats.recent_evictions ? state.stats.recent_evictions : [];
      const went = evictions.find((e) => e.repo_id.toLowerCase() === item.id.toLowerCase());
      facts = went
        ? [`evicted ${ago(went.at)} for the disk budget${went.doing ? ` (${went.doing})` : ""}: ${went.origin === "import" ? "import it again" : "pull it again"} to have it`]
        : ["scanned, not in the store yet"];
    }
    const manifest = state.manifests.get(item.id);
    if (manifest && manifest.endpoint) facts.push(`from ${manifest.endpoint}`);
    setText(node.querySelector(".repo-facts"), facts.filter(Boolean).join(" · "));
    const actions = node.querySelector(".repo-actions");
    const readOnly = Boolean(state.info && state.info.read_only); // (it refuses pins and removals: buttons that always failed)
    for (const b of actions.children) {
      const action = b.dataset.action;
      // (a repo scanned alone, never held: Remove forgets its scan, which stayed on the page for good)
      b.hidden = (action === "remove" ? readOnly : !summary || (readOnly && action !== "preload"))
        || (action === "pin" && pinned) || (action === "unpin" && !pinned);
    }
    const table = node.querySelector("table.variants");
    table.hidden = item.variants.length === 0;
    sync(table.tBodies[0], item.variants, (v) => v.variant, (v) => makeVariant(item.id, v), (row, v) => updateVariant(row, item, v));
  }

  function makeVariant(repo, variant) {
    const actions = el("td", { class: "actions" },
      button("pull", "Pull", "primary"), button("preload", "Preload"), button("pin", "Pin"), button("unpin", "Unpin"));
    for (const b of actions.children) {
      b.dataset.repo = repo;
      b.dataset.quant = variant.variant;
    }
    return el("tr", { class: "variant", data: { variant: variant.variant } },
      el("td", { class: "name", text: variant.variant }),
      el("td", {}, el("span", { class: "status" })),
      el("td", {}, progressCell()),
      el("td", { class: "note" }),
      actions);
  }

  function updateVariant(row, item, variant) {
    row.dataset.status = variant.status;
    const status = row.querySelector(".status");
    status.dataset.status = variant.status;
    setText(status, variant.status + (variant.status === "failed" && variant.resumable && variant.bytes_done ? " (resumable)" : ""));
    const done = variant.status === "downloaded" ? variant.total_bytes : variant.bytes_done;
    updateProgress(row.querySelector(".progress"), done, variant.total_bytes);
    const note = row.querySelector(".note");
    const sources = Object.entries(variant.bytes_by_source || {}).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${bytes(n)}`);
    note.className = variant.error ? "note error-text" : "note muted";
    const older = variant.held_commit ? `held whole at ${variant.held_commit.slice(0, 12)}: Pull updates it` : "";
    setText(note, variant.error || older || sources.join(" · "));
    const downloaded = variant.status === "downloaded" && Boolean(item.summary);
    const pinned = Boolean(pinOf(item.id, variant.variant));
    for (const b of row.querySelector(".actions").children) {
      const action = b.dataset.action;
      const readOnly = Boolean(state.info && state.info.read_only);
      if (action === "pull") b.hidden = readOnly || variant.status === "downloaded" || variant.status === "downloading";
      else if (action === "preload") b.hidden = !downloaded;
      else if (action === "pin") b.hidden = readOnly || !downloaded || pinned;
      else if (action === "unpin") b.hidden = readOnly || !pinned;
    }
  }

  function renderRepos() {
    const items = repoItems();
    const why = items.length > 0 ? null : state.unknown.repos;
    $("repos-empty").hidden = items.length > 0 || Boolean(why);
    unknownNote("repos-unknown", why);
    const wanted = $("repos-filter").value.trim().toLowerCase();
    const found = wanted ? items.filter((item) => item.id.toLowerCase().includes(wanted)) : items;
    const shown = found.slice(0, state.reposShown);
    for (const item of shown) if (item.variants.length) manifestOf(item.id); // (the shown ones' alone)
    $("repos-find-row").hidden = items.length <= REPOS_SHOWN && !wanted;
    setText($("repos-count"), wanted || found.length > shown.length
      ? `${shown.length} of ${found.length}${wanted ? ` matching (of ${items.length})` : ""} shown` : "");
    $("repos-more").hidden = found.length <= shown.length;
    sync($("repos"), shown, (item) => item.id, makeRepo, updateRepo);
  }

  function renderPreloaded() {
    const models = state.stats ? state.stats.preload.models : [];
    const why = state.stats ? null : state.unknown.stats;
    $("preloaded").hidden = models.length === 0;
    $("preloaded-empty").hidden = models.length > 0 || Boolean(why);
    unknownNote("preloaded-unknown", why);
    sync(
      $("preloaded").tBodies[0],
      models,
      (m) => `${m.repo_id}:${m.commit_id}:${m.variant}`,
      () => el("tr", {}, ...Array.from({ length: 7 }, () => el("td"))),
      (row, m) => {
        const cells = row.children;
        setText(cells[0], m.repo_id);
        // (which commit is in RAM: a branch moved on, a commit another; said "preloaded" of the repo alone)
        setText(cells[1], m.commit_id.slice(0, 12));
        setText(cells[2], m.variant || "all files");
        setText(cells[3], String(m.files));
        setText(cells[4], bytes(m.bytes));
        setText(cells[5], bytes(m.resident_bytes));
        setText(cells[6], m.strategy + (m.locked ? ", locked" : ""));
      },
    );
  }

  function renderPeers() {
    const peers = state.peers;
    // The registry out of reach: the peers listed are the last known (health says so; it needs no token)
    const health = state.health;
    // (the fleet's own: files that failed verification are the store's, said with the disk)
    const degraded = health && health.fleet_detail ? health : null;
    $("peers-degraded").hidden = !degraded;
    if (degraded) {
      const since = degraded.cluster && degraded.cluster.since ? `, since ${ago(degraded.cluster.since)}` : "";
      setText($("peers-degraded"), `The fleet is degraded${since}: ${degraded.fleet_detail}.`);
    }
    const why = peers.length > 0 ? null : state.unknown.peers;
    $("peers").hidden = peers.length === 0;
    $("peers-empty").hidden = peers.length > 0 || Boolean(why);
    unknownNote("peers-unknown", why);
    const self = state.info ? state.info.id : null;
    sync(
      $("peers").tBodies[0],
      peers,
      (p) => p.node_id,
      () => el("tr", {}, ...Array.from({ length: 6 }, () => el("td"))),
      (row, p) => {
        const cells = row.children;
        setText(cells[0], p.node_id.slice(0, 12) + (p.node_id === self ? " (this node)" : ""));
        setText(cells[1], p.url);
        setText(cells[2], p.version);
        setText(cells[3], `${p.blobs} blobs, ${bytes(p.bytes)}`);
        setText(cells[4], String(p.partial));
        setText(cells[5], ago(p.last_seen));
      },
    );
  }

  // -- start ----------------------------------------------------------------------------------------------------

  function start() {
    renderToken();
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      $("token-input").value = "";
      $("token-panel").hidden = true;
      setToken(token);
    });
    $("token-skip").addEventListener("click", () => {
      $("token-panel").hidden = true;
    });
    $("token-button").addEventListener("click", askToken);
    $("forget-token").addEventListener("click", () => setToken(""));
    $("pull-form").addEventListener("submit", onPullForm);
    $("repos-filter").addEventListener("input", () => {
      state.reposShown = REPOS_SHOWN;
      scheduleRender();
    });
    $("repos-more").addEventListener("click", () => {
      state.reposShown += REPOS_SHOWN;
      scheduleRender();
    });
    document.addEventListener("click", (event) => {
      const target = event.target.closest("button[data-action]");
      if (target && !target.disabled) onAction(target);
    });
    connect();
    poll();
  }

  start();
})();
