"""The source chain: depot nodes (``MODELDEPOT_SERVERS``) first, in order, then the fleet's live nodes (found
by discovery, ``MODELDEPOT_CLUSTER``), then the Hub as last resort.

Scanning asks each configured node, then each live peer of the fleet, then the Hub, and keeps the first
that knows the repo (a branch the Hub before the peers: theirs is the commit they hold, the Hub's may have
moved on): a repo imported privately on node A is pulled by node B from A. Bytes come from every node that holds the scanned commit (chunks spread across them, each
chunk checked against the node's BLAKE3), and from every live node whose holdings name the content (one
read of the fleet's local view: no node is asked); the Hub joins a file only when no node holds it or every
node failed it.

Tokens stay with their owners: ``HF_TOKEN`` (or huggingface_hub's stored token) goes to the Hub alone,
``MODELDEPOT_TOKEN`` to depot nodes alone (configured or discovered), and huggingface_hub is told never to
add its own to a node.

:class:`FleetView` is how the chain (and a node's routes) read a started
:class:`~modeldepot.discovery.Discovery` from any thread (the discovery lives on a server's loop, or on
:class:`BackgroundFleet`'s own thread in a process that only pulls).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from modeldepot.config import DepotConfig
from modeldepot.discovery.base import Discovery, Holding, NodeRecord, validate_node_url
from modeldepot.errors import (
    AccessDeniedError,
    ConfigError,
    DepotError,
    InvalidInputError,
    NotFoundError,
    OfflineError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UpstreamDataError,
    UpstreamError,
    UpstreamTimeoutError,
)
from modeldepot.hashing import chunk_count
from modeldepot.hub.manifest import Manifest, RemoteFile
from modeldepot.hub.scan import fetch_repo, hub_token
from modeldepot.ratelimit import RateLimit
from modeldepot.transfer import ranged
from modeldepot.transfer.choosing import judge_token, refused_by_the_fleet
from modeldepot.transfer.download import FileSource, say_refused_once
from modeldepot.transfer.fleet import FleetView
from modeldepot.transfer.notices import say_now_and_then
from modeldepot.transfer.sources import HttpSource, RetryPolicy, small_request
from modeldepot.transfer.swarm import SwarmFile
from modeldepot.validation import SHORT_COMMIT, from_upstream, is_commit_id, validate_blake3

if TYPE_CHECKING:
    from modeldepot.store.store import Store

__all__ = ["Scan", "SourceChain"]

log = logging.getLogger(__name__)

# The store setting a `serve --cluster` writes as it registers: the store is a fleet node's (a pull of it
# while its serve is down is told it joins no swarm), as {"prefix": ..., "at": seconds since the epoch}
FLEET_NODE_SETTING = "served_in_fleet"
# Seconds a store counts as a fleet node's after its serve last registered
FLEET_NODE_RECENT = 7 * 24 * 3600.0


def served_in_fleet(store: Store, prefix: str) -> bool:
    """Whether a `serve --cluster` registered the store in the fleet of ``prefix`` lately (a retired node's
    store, or a copy of one, is no node's after a week: its pulls were told so, every one)."""
    try:
        noted = json.loads(store.index.setting(FLEET_NODE_SETTING) or "null")
    except (DepotError, ValueError):
        return False
    return (
        isinstance(noted, dict)
        and noted.get("prefix") == prefix
        and isinstance(noted.get("at"), (int, float))
        and 0 <= time.time() - noted["at"] < FLEET_NODE_RECENT
    )


T = TypeVar("T")

NODE_API = "/api/depot/v1"
# Seconds a branch's look-up at the Hub waits before the fleet's peers are asked (a fleet whose Hub drops
# every packet, behind a firewall, must not wait a whole read timeout per scan; huggingface_hub's own
# metadata calls wait 10 s)
BRANCH_LOOKUP_TIMEOUT = 10.0


def _say_unreachable(url: str, error: UpstreamError) -> None:
    """Warn that a depot server the user configured cannot be reached (a port mistyped sent a whole model
    through the Hub without a word, an explorer's trial); a mirror scanning often says it every few minutes."""
    say_now_and_then(f"unreachable {url}", log, "the depot server %s cannot be reached (%s): the next source "
                     "is asked", url, error)  # fmt: skip


# Seconds a fleet peer may take to describe a repo: a node answers from its index in milliseconds, and one
# frozen (SIGSTOP, a hung host whose lease still runs) or advertised at a wrong address that accepts and never
# answers cost every pull of the fleet a whole read timeout, 30 s of silence (an explorer's trial). A mirror
# among the peers asks its own upstream first and answers from its store after mirror.HELD_PATIENCE (5 s) when
# that upstream is silent, the very case in which the peers are asked for a branch: well above it (at 5 s such
# a peer never answered in time, and was left out: a review)
PEER_SCAN_TIMEOUT = 10.0
# Peers asked at once (the first that describes the repo wins; the others are not awaited)
PEER_SCAN_WIDTH = 8
UNANSWERING_FOR = 60.0  # seconds a peer that let a scan time out is left out of this process's next scans
# Seconds a pull waits at most for whole holders found by content to give their digests
PEER_DIGESTS_WAIT = 2.0
HEALTH_PROBE_TIMEOUT = 2.0  # ... unless it answers its health within so long (it is alive, only slow)
SLOW_SCANS_TOLERATED = 3  # ... and then until so many scans in a row timed out
# peer base URL -> time.monotonic() until which scans leave it out; peer base URL -> its scans that timed out
# in a row (plain dict operations: no lock to be inherited held by a forked child)
_UNANSWERING: dict[str, float] = {}
_TIMED_OUT: dict[str, int] = {}
# A node's manifest of a commit, as last read, and its tag: asked again with the tag, a node whose index has not
# changed answers 304 (a mirror's misses of one commit, one pull per file, each read and parsed the commit's
# whole manifest: 3 ms of the mirror's CPU per file of a 300-file repo, a profile). (url, token) -> (ETag, files)
_MANIFESTS: dict[tuple[str, str | None], tuple[str, list[dict[str, Any]]]] = {}
# When this process last asked peers whether they take its token (chain._refused_by), and how many it asks
_TOKEN_VERDICT: list[float] = []
_TOKEN_PROBES: dict[asyncio.AbstractEventLoop, asyncio.Task[bool]] = {}  # the probe under way, by loop
TOKEN_VERDICT_FOR, TOKEN_CHECK_PEERS = 60.0, 3
# Hub endpoints that answered a scan in this process (any answer): one out of reach later is an outage
_HUB_ANSWERED: set[str] = set()
MANIFESTS_KEPT = 16
# ... and files listed in them all (parsed, ~1 KiB a file: a 100,000-file listing took 102 MiB, a review)
MANIFEST_FILES_KEPT = 50_000


def check_upstream_urls(config: DepotConfig) -> None:
    """ConfigError naming the setting when ``HF_ENDPOINT`` or a ``MODELDEPOT_SERVERS`` URL is no plain
    http(s) URL of a host (the Hub's token goes in HF_TOKEN, never in the URL)."""
    for name, urls in (("HF_ENDPOINT", [config.hub_endpoint]), ("MODELDEPOT_SERVERS", config.servers)):
        for url in urls:
            try:
                validate_node_url(url)
            except InvalidInputError as error:
                raise ConfigError(f"{name}: {str(error).replace('node URL', 'the URL', 1)}") from None


def _node_url(url: object) -> str | None:
    """A peer's URL as the registry gave it (whoever can write there wrote it), without a trailing ``/``,
    or None when it is no plain http(s) URL of a host."""
    try:
        return validate_node_url(url).rstrip("/")
    except InvalidInputError:
        return None


@dataclass(frozen=True)
class Scan:
    repo_id: str  # as the source spells it (the Hub matches ids whatever their case)
    commit_id: str
    info: dict[str, Any]
    files: list[RemoteFile]
    endpoint: str
    whole: bool = True  # False: a node's files of a commit it holds in part, without the commit's listing


@dataclass(frozen=True)
class SourceChain:
    servers: tuple[HttpSource, ...]
    hub: HttpSource
    fleet: FleetView | None = None  # the fleet's live nodes, asked after the servers
    node_token: str | None = field(default=None, repr=False)  # MODELDEPOT_TOKEN, for discovered nodes
    node_id: str | None = None  # this store's id: never its own source
    served_in_fleet: bool = False  # a `serve --cluster` registered this store lately (FLEET_NODE_SETTING)

    @classmethod
    def from_config(cls, config: DepotConfig, retry: RetryPolicy | None = None, fleet: FleetView | None = None,
                    node_id: str | None = None, download_limit: RateLimit | None = None,
                    served_in_fleet: bool = False) -> SourceChain:  # fmt: skip
        retry = retry or RetryPolicy(read_timeout=config.read_timeout)
        hub_token_ = hub_token(config.hub_token)
        check_upstream_urls(config)
        return cls(
            servers=tuple(
                HttpSource(url, "node", config.upstream_token or config.node_token, retry, download_limit)
                for url in config.servers
            ),
            hub=HttpSource(config.hub_endpoint, "hub", hub_token_, retry, download_limit),
            fleet=fleet,
            node_token=config.node_token,
            node_id=node_id,
            served_in_fleet=served_in_fleet,
        )

    def _node(self, url: str) -> HttpSource:
        return HttpSource(url, "node", self.node_token, self.hub.retry, self.hub.limit)

    def peers(self) -> list[HttpSource]:
        """The fleet's live nodes (this one excepted) that are not configured servers already, by node id."""
        if self.fleet is None:
            return []
        configured = {s.base_url.rstrip("/") for s in self.servers} | {self.hub.base_url.rstrip("/")}
        found: dict[str, HttpSource] = {}
        for node in self.fleet.peers():
            url = _node_url(node.url)
            if node.node_id != self.node_id and url is not None and url not in configured:
                found.setdefault(url, self._node(url))
        return list(found.values())

    def scan(self, repo_id: str, revision: str) -> Scan:
        """Describe ``repo_id`` at ``revision`` from the first source of the chain that has it: the
        configured nodes, then the fleet's live nodes, then the Hub (for a branch, the Hub before the live
        nodes: a node says the commit it holds).

        When none has it, the error says what each source answered, and keeps the most telling kind:
        a refusal (a token is missing) over "not found" over "unreachable"."""
        problems: list[DepotError] = []
        peers = self.peers()
        hub_said: DepotError | None = None
        # Nodes' files of a commit they hold in part, without its listing (adopted from a Hugging Face cache):
        # the commit's listing is asked of the other sources, these taken only when none gives it (a node's
        # few files were taken for the commit, and the pull said "all files" without the weights: a trial)
        parts: list[Scan] = []
        for server in self.servers:
            try:
                answer = self._scan_at(server, repo_id, revision)
                if answer.whole:
                    return answer
                parts.append(answer)
            except DepotError as error:
                problems.append(error)
                if (
                    isinstance(error, UpstreamError)
                    and error.status is None
                    and not isinstance(error, UpstreamDataError)
                ):
                    _say_unreachable(server.base_url, error)
        if peers and not _names_a_commit(revision):
            # A branch is the Hub's to say: a peer answers with the commit it holds, and once any node held
            # the repo, every pull in the fleet took that commit for main after the Hub's had moved on (an
            # explorer's trial). Asked before the peers, whose bytes come by content all the same; a repo
            # the Hub does not have (imported on a node) or a Hub out of reach leaves it to the peers.
            try:
                return self._hub_scan(
                    repo_id, revision, min(self.hub.retry.read_timeout, BRANCH_LOOKUP_TIMEOUT)
                )
            except DepotError as error:
                hub_said = error
        cannot_tell: list[DepotError] = []  # peers that refused this node's token: they say nothing of it
        found = self._scan_peers(peers, repo_id, revision, problems, cannot_tell, parts)
        if found is not None:
            return found
        try:
            if hub_said is not None:
                raise hub_said
            return self._hub_scan(repo_id, revision)
        except DepotError as error:
            if parts:
                part = parts[0]
                log.warning("%s: %s holds %d files of commit %s without the commit's listing, and no other "
                            "source gave it (%s): pulling those files alone", repo_id, part.endpoint,
                            len(part.files), part.commit_id, error)  # fmt: skip
                return part
            if not problems:
                raise
            said = _what_each_said(error, problems)
            problems.append(error)
            # When every source that answered said "no such repo" (or revision) and the rest could not be
            # reached, it is that kind, so that a node's clients hear RepoNotFound or RevisionNotFound as from
            # the Hub (a bare 404 is a broken connection to huggingface_hub).
            # (nor a peer that refused this node's token: one tokened node in a fleet made every typo's "not
            # found" a 502 on the others, repo_exists raising: an explorer's trial; its refusal is still said)
            answered = [
                p for p in problems
                if not (isinstance(p, UpstreamError) and p.status is None) and not any(p is q for q in cannot_tell)
            ]  # fmt: skip
            if (
                (_unanswered(error) or (isinstance(error, UpstreamError) and (error.status or 0) >= 500))
                and self.hub.base_url in _HUB_ANSWERED
                and not any(isinstance(p, AccessDeniedError) for p in problems)
            ):
                # The Hub says whether a repo or a branch exists; a node, only what it holds. With a Hub that
                # answered this process before out of reach now (an outage), "not on the nodes" is no answer:
                # a mirror took it for the repo's removal and hid a public repo it held, for good, and a
                # client's RevisionNotFound kept it from its own cache (an explorer's trial). Said as the outage
                # it is (a 502: huggingface_hub falls back to its cache). (A Hub never reached, a network
                # without one, leaves the nodes' word: a typo is "not found" there, not a 502 retried.)
                # (a Hub that did not answer in time is that: a 504, as a mirror alone says it; after a 504, the
                # same scan asked again of a fleet's mirror said 502: an explorer's trial)
                outage: type[UpstreamError] = (
                    UpstreamTimeoutError if isinstance(error, UpstreamTimeoutError) else UpstreamError
                )
                raise outage(said, repo_id=repo_id) from error
            # (which sources said it is not there, or refused it: a mirror hides a repo only when the one it was
            # pulled from does; a refusal too, or a mirror with depot nodes beside the Hub served a repo gated
            # since to anyone, a review)
            denied_by = tuple(
                str(p.source) for p in answered
                if p.source and isinstance(p, (RepoNotFoundError, RevisionNotFoundError, AccessDeniedError))
            )  # fmt: skip
            if answered and all(isinstance(p, RepoNotFoundError) for p in answered):
                missing: NotFoundError = RepoNotFoundError(repo_id, said)
                missing.denied_by = denied_by
                raise missing from error
            if answered and all(isinstance(p, (RepoNotFoundError, RevisionNotFoundError)) for p in answered):
                missing = RevisionNotFoundError(repo_id, revision, said)  # (the repo is somewhere)
                missing.denied_by = denied_by
                raise missing from error
            kind = next((k for k in (AccessDeniedError, NotFoundError) if any(isinstance(p, k) for p in problems)),
                        UpstreamError)  # fmt: skip
            failure = kind(said, repo_id=repo_id)
            failure.denied_by = denied_by
            raise failure from error

    def _scan_peers(self, peers: list[HttpSource], repo_id: str, revision: str, problems: list[DepotError],
                    cannot_tell: list[DepotError], parts: list[Scan]) -> Scan | None:  # fmt: skip
        """The first of the fleet's ``peers`` to describe the repo, asked PEER_SCAN_WIDTH at a time, each for
        PEER_SCAN_TIMEOUT at most (None when none does; what each said goes to ``problems``, a refusal of
        this node's token to ``cannot_tell`` too; a peer's part of the commit to ``parts``). A peer that
        let a scan time out is left out of this process's scans for UNANSWERING_FOR seconds.

        Each is asked on a daemon thread of its own: a peer that does not answer is not waited for once
        another has, nor does it hold a finished command's process open."""
        now = time.monotonic()
        asked = [peer for peer in peers if _UNANSWERING.get(peer.base_url, 0.0) <= now]
        answers: queue.SimpleQueue[tuple[HttpSource, Scan | DepotError]] = queue.SimpleQueue()

        def ask(peer: HttpSource) -> None:
            answer: Scan | DepotError
            try:
                answer = self._scan_at(
                    peer, repo_id, revision, min(peer.retry.read_timeout, PEER_SCAN_TIMEOUT), held_only=True
                )
            except DepotError as error:
                answer = error
            except Exception as error:  # (every thread answers: the loop below counts on it)
                answer = UpstreamError(f"{peer.base_url} could not be scanned: {type(error).__name__}: {error}",
                                       repo_id=repo_id, source=peer.base_url)  # fmt: skip
            answers.put((peer, answer))
            if isinstance(answer, UpstreamTimeoutError):  # (after the answer: the scan does not wait for it)
                _judge_unanswering(peer, repo_id)
            else:
                _TIMED_OUT.pop(peer.base_url, None)

        waiting = iter(asked)
        in_flight = 0
        while True:
            while in_flight < PEER_SCAN_WIDTH and (peer := next(waiting, None)) is not None:
                threading.Thread(target=ask, args=(peer,), name="modeldepot-peer-scan", daemon=True).start()
                in_flight += 1
            if not in_flight:
                break
            peer, answer = answers.get()
            in_flight -= 1
            if isinstance(answer, Scan):
                if answer.whole:
                    return answer
                parts.append(answer)
                continue
            problems.append(answer)
            if isinstance(answer, AccessDeniedError):
                cannot_tell.append(answer)
        for peer in peers:
            if peer not in asked:
                problems.append(UpstreamError(f"{peer.base_url} was not asked (it did not answer a scan a moment "
                                              "ago)", repo_id=repo_id, source=peer.base_url))  # fmt: skip
        return None

    def _scan_at(self, node: HttpSource, repo_id: str, revision: str, timeout: float | None = None,
                 held_only: bool = False) -> Scan:  # fmt: skip
        """``held_only``: a fleet's peer, which answers from what it holds (hub/scan.py's HELD_ONLY_HEADER); a
        node the user names (MODELDEPOT_SERVERS) may mirror for it."""
        spelled, commit_id, info, files, whole = fetch_repo(
            repo_id,
            revision,
            node.base_url,
            node.token,
            "MODELDEPOT_TOKEN",
            timeout or node.retry.read_timeout,
            held_only,
        )
        return Scan(spelled, commit_id, info, files, node.base_url, whole)

    def _hub_scan(self, repo_id: str, revision: str, timeout: float | None = None) -> Scan:
        try:
            spelled, commit_id, info, files, _ = fetch_repo(
                repo_id,
                revision,
                self.hub.base_url,
                self.hub.token,
                timeout=timeout or self.hub.retry.read_timeout,
            )
        except DepotError as error:
            if not _unanswered(error):
                _HUB_ANSWERED.add(self.hub.base_url)
            raise
        _HUB_ANSWERED.add(self.hub.base_url)
        return Scan(spelled, commit_id, info, files, self.hub.base_url)

    def _manifest_nodes(self, manifest: Manifest) -> list[HttpSource]:
        """The nodes whose manifest of the commit is read: the configured ones, and the fleet's node that
        answered the scan (it knows the repo; the others are found by content, without a request)."""
        nodes = list(self.servers)
        endpoint = manifest.endpoint.rstrip("/")
        if self.fleet is not None and all(s.base_url.rstrip("/") != endpoint for s in self.servers):
            nodes.extend(peer for peer in self.peers() if peer.base_url == endpoint)
        return nodes

    async def holders(
        self, manifest: Manifest, chunk_size: int, files: list[RemoteFile]
    ) -> dict[str, list[FileSource]]:
        """For each of ``files``, the depot nodes holding it: at the manifest's commit (with chunk digests
        at our chunk size, when the node uses the same one); the fleet's live nodes whose holdings name its
        LFS SHA-256 (their blob route, with the chunk digests a manifest gave for the same content: the same
        bytes at the same chunk size have the same digests); or else a configured node that holds the
        content under any repo, found by the LFS SHA-256 (a fine-tune that shares its tokenizer or base
        weights with a repo the node has)."""
        found: dict[str, list[FileSource]] = {}
        wanted = {f.path: f for f in files}
        # sha256 -> (chunk digests at our chunk size, from a manifest; whether the scan's node gave them)
        known: dict[str, tuple[tuple[str, ...], bool]] = {}
        scanner = manifest.endpoint.rstrip("/")
        manifest_nodes = (
            await asyncio.to_thread(self._manifest_nodes, manifest)
            if self.fleet is not None
            else self.servers
        )
        for server in manifest_nodes:
            try:
                listed = await _node_manifest(server, manifest.repo_id, manifest.commit_id)
            except DepotError:
                continue  # a node that is down or lacks the commit simply holds nothing
            for item in listed:
                remote = wanted.get(str(item.get("path")))
                if remote is None or not _same_content(remote, item):
                    continue
                digests = _chunk_digests(server, manifest, remote, item, chunk_size)
                vouches = digests is not None and server.base_url.rstrip("/") == scanner
                if (
                    digests is not None
                    and remote.sha256
                    and known.get(remote.sha256, ((), False))[1] <= vouches
                ):
                    known[remote.sha256] = (digests, vouches)
                url = server.file_url(manifest.repo_id, manifest.commit_id, remote.path)
                origin = "node" if server in self.servers else "peer"
                found.setdefault(remote.path, []).append(
                    FileSource(server, url, digests, origin, vouches=vouches)
                )
        if self.fleet is not None:
            await self._fleet_holders(files, found, known, chunk_size)
        by_content = [f for f in files if f.path not in found and f.sha256]
        if by_content and self.servers:
            probes = [(server, f) for server in self.servers for f in by_content]
            answers = await asyncio.gather(*(_node_has_blob(server, f.sha256 or "") for server, f in probes))
            for (server, remote), blob_url in zip(probes, answers, strict=True):
                if blob_url is not None:
                    found.setdefault(remote.path, []).append(FileSource(server, blob_url, origin="node"))
        return found

    async def _fleet_holders(self, files: list[RemoteFile], found: dict[str, list[FileSource]],
                             known: dict[str, tuple[tuple[str, ...], bool]], chunk_size: int) -> None:  # fmt: skip
        """Adds to ``found`` the live nodes whose holdings name a file's content (one read of the view):
        whole, or in part (a download in progress or kept for a resume, with at least one chunk done:
        the transfer reads which chunks from the node's chunk map, and asks it for those alone)."""
        assert self.fleet is not None
        lfs = [f for f in files if f.sha256]
        if not lfs:
            return
        holders = await self.fleet.holders(f.sha256 for f in lfs if f.sha256)
        unchecked: list[tuple[RemoteFile, int]] = []
        for remote in lfs:
            sha256 = remote.sha256 or ""
            have = {s.source.base_url.rstrip("/") for s in found.get(remote.path, [])}
            for holder in holders.get(sha256, []):
                digests, vouches = known.get(sha256, (None, False))
                source = self.fleet_source(remote, holder.node, holder.holding, digests, vouches)
                if source is not None and source.source.base_url not in have:
                    have.add(source.source.base_url)
                    found.setdefault(remote.path, []).append(source)
                    if source.chunk_blake3 is None and source.chunks_url is None:
                        unchecked.append((remote, len(found[remote.path]) - 1))
        if unchecked:
            await self._ask_peers_for_digests(unchecked, found, chunk_size)

    async def _ask_peers_for_digests(self, unchecked: list[tuple[RemoteFile, int]],
                                     found: dict[str, list[FileSource]], chunk_size: int) -> None:  # fmt: skip
        """Whole holders found by content that no manifest gave chunk digests for: each is asked for its own
        (its chunk map), so that a chunk it sends is checked on arrival, a bad one fetched again elsewhere and
        the peer banned. Unchecked, a peer behind a link that flipped a byte had its chunks taken, the file
        failed its SHA-256 and was fetched again whole from the Hub, pull after pull (an explorer's trial).
        Those that do not answer within PEER_DIGESTS_WAIT stay as they were (the SHA-256 still guards); one
        whose answer is no chunk map (garbage, digests that are none) is no source of the file: its chunks
        were taken unchecked, every file failed its SHA-256 and was fetched again, with the honest peers'
        chunks that came beside them (an explorer's trial)."""
        limit = asyncio.Semaphore(8)
        garbled: set[tuple[str, int]] = set()

        async def ask(remote: RemoteFile, slot: int) -> None:
            source = found[remote.path][slot]
            async with limit:
                try:
                    digests = await source.source.chunk_digests(
                        f"{source.url}/chunks", remote.size, chunk_size
                    )
                except UpstreamDataError as error:
                    log.warning("%s: not taken from %s, whose chunk map of it is wrong: %s", remote.path,
                                source.source.name, error)  # fmt: skip
                    garbled.add((remote.path, slot))
                    return
                except DepotError:
                    return
                if digests is not None:
                    found[remote.path][slot] = dataclasses.replace(
                        source, chunk_blake3=digests, own_word=True
                    )

        tasks = [asyncio.ensure_future(ask(remote, slot)) for remote, slot in unchecked]
        _, late = await asyncio.wait(tasks, timeout=PEER_DIGESTS_WAIT)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        for path in {path for path, _ in garbled}:
            found[path] = [source for slot, source in enumerate(found[path]) if (path, slot) not in garbled]

    def fleet_source(self, remote: RemoteFile, node: NodeRecord, holding: Holding | None,
                     digests: tuple[str, ...] | None = None, vouches: bool = False) -> FileSource | None:  # fmt: skip
        """A fleet node as a source of ``remote`` (an LFS file) through its blob route: whole, or in part
        (a download in progress, or a claimer of its chunks, ``holding`` None: the transfer reads which
        chunks from its chunk map). None for this node itself, a URL that is no node's, the Hub's, or a
        holding of another size or with no chunk yet."""
        url = _node_url(node.url)
        if node.node_id == self.node_id or url is None or url == self.hub.base_url.rstrip("/"):
            return None
        if holding is not None and (
            holding.size != remote.size or not (_whole(holding, remote) or holding.chunks_done > 0)
        ):
            return None
        configured = [s for s in self.servers if s.base_url.rstrip("/") == url]
        source = configured[0] if configured else self._node(url)
        blob = f"{url}{NODE_API}/blobs/{remote.sha256}"
        chunks_url = None if holding is not None and holding.complete else f"{blob}/chunks"
        return FileSource(source, blob, digests, "node" if configured else "peer", chunks_url, vouches)

    def claimed_chunks(self, remote: RemoteFile, chunk_size: int) -> frozenset[int]:
        """The chunks of ``remote`` live nodes of the fleet claim now (each fetches its own from the Hub):
        for a store that is no node, they are coming to those nodes, not gaps for the Hub to fill."""
        fleet, sha256 = self.fleet, remote.sha256
        if fleet is None or sha256 is None:
            return frozenset()

        def read(discovery: Discovery) -> frozenset[int]:
            live = {node.node_id for node in discovery.peers()}
            claims = discovery.claims(sha256, chunk_size)
            return frozenset(index for index, claim in claims.items() if claim.node_id in live)

        return fleet.read(read, frozenset())

    async def swarm_file(self, remote: RemoteFile, chunk_size: int, public: bool = True) -> SwarmFile | None:
        """The file's claims in the fleet, when this node takes part: a registry that keeps claims, this
        store registered as a live node (its server serves what it fetches), and an LFS file (by SHA-256).
        ``public``: a public repo's file. A node without a token serves no other to its peers (nor says it
        holds one): its claims on a private file's chunks held the others back for chunks they could not
        take from it, and its pull waited at its end for a holding it never publishes (a review)."""
        fleet, node_id = self.fleet, self.node_id
        if fleet is None or node_id is None or remote.sha256 is None:
            return None
        if not public and self.node_token is None:
            return None
        claims, live, connected, peers = await fleet.read_async(
            lambda d: (
                d.claims_supported,
                any(n.node_id == node_id for n in d.peers()),
                d.status().connected,
                [n for n in d.peers() if n.node_id != node_id],
            ),
            (False, False, False, list[NodeRecord]()),
        )
        if not claims:
            return None
        if not live:
            if not self.served_in_fleet or not connected:
                # (a store that only pulls from the fleet, a laptop's: as it should be; a registry out of reach
                # is said where it is met)
                return None
            # (a node's store, its serve down: the swarm was skipped without a word, and the Hub sent the
            # model once more, an SRE's trial)
            say_now_and_then(f"not live {node_id}", log, "this store is no live node of the fleet (is its `serve "
                             "--cluster` running?): its pulls join no swarm, and what the fleet has not got whole "
                             "comes from the Hub")  # fmt: skip
            return None
        if await self._refused_by(peers):
            return None  # (the others could not take a chunk from it, nor it theirs: no claims either way)
        return SwarmFile(fleet, node_id, remote.sha256, remote.size, chunk_size,
                         lambda node, holding: self.fleet_source(remote, node, holding),
                         slow=self.hub.limit is not None)  # fmt: skip

    async def _refused_by(self, peers: list[NodeRecord]) -> bool:
        """Whether the fleet's nodes refuse this node's requests (its MODELDEPOT_TOKEN is not theirs): a few
        live peers asked for their info once a while in this process. Such a node's claims in a swarm held
        the others up for chunks they could not take from it, and it took theirs over as void, as it could not
        read them either: two good nodes fetched 1.4 times a file from the Hub between them (an explorer's
        trial). It pulls on its own then (:func:`~modeldepot.transfer.choosing.refused_by_the_fleet`)."""
        if _TOKEN_VERDICT and time.monotonic() - _TOKEN_VERDICT[0] < TOKEN_VERDICT_FOR:
            return refused_by_the_fleet()
        # One probe at a time in a loop: the files of a pull start together, and each asked again
        loop = asyncio.get_running_loop()
        probe = _TOKEN_PROBES.get(loop)
        if probe is None or probe.done():
            for done in [other for other, task in _TOKEN_PROBES.items() if task.done()]:
                del _TOKEN_PROBES[done]
            probe = _TOKEN_PROBES[loop] = loop.create_task(self._ask_for_token(peers))
        return await asyncio.shield(probe)

    async def _ask_for_token(self, peers: list[NodeRecord]) -> bool:
        now = time.monotonic()
        hub = self.hub.base_url.rstrip("/")
        urls = sorted({url for p in peers if (url := _node_url(p.url)) is not None and url != hub})
        asked = [self._node(url) for url in random.sample(urls, min(TOKEN_CHECK_PEERS, len(urls)))]
        if not asked:
            return False
        answers = await asyncio.gather(*(asyncio.to_thread(takes_token, peer) for peer in asked))
        _TOKEN_VERDICT[:] = [now]
        judge_token(answers)
        for peer, takes in zip(asked, answers, strict=True):
            if takes is False:
                say_refused_once(peer.name, "HTTP 401 to its info")
        return refused_by_the_fleet()

    def hub_source(self, manifest: Manifest, remote: RemoteFile) -> FileSource:
        return FileSource(self.hub, self.hub.file_url(manifest.repo_id, manifest.commit_id, remote.path))


def _whole(holding: Holding, remote: RemoteFile) -> bool:
    """Whether a holding is the whole file the scan describes (its size, at least: the bytes are checked)."""
    return holding.complete and holding.size == remote.size


def _chunk_digests(server: HttpSource, manifest: Manifest, remote: RemoteFile, item: dict[str, Any],
                   chunk_size: int) -> tuple[str, ...] | None:  # fmt: skip
    """The node's BLAKE3 of each chunk, when it chunks as we do (each digest validated: it came from a peer)."""
    chunks = item.get("chunks")
    if item.get("chunk_size") != chunk_size or not isinstance(chunks, list):
        return None
    if len(chunks) != chunk_count(remote.size, chunk_size):
        return None
    source = f"{server.name} (manifest of {manifest.repo_id})"
    field = f"chunk digest of {remote.path!r}"
    return tuple(from_upstream(source, field, validate_blake3, digest) for digest in chunks)


def _same_content(remote: RemoteFile, item: dict[str, Any]) -> bool:
    if remote.sha256 is not None:
        return item.get("sha256") == remote.sha256
    return item.get("git_oid") == remote.git_oid and item.get("size") == remote.size


async def _node_has_blob(server: HttpSource, sha256: str) -> str | None:
    """The node's URL for a blob it holds (under whatever repo), or None."""
    url = f"{server.base_url}{NODE_API}/blobs/{sha256}"
    try:
        reply = await small_request("HEAD", url, server.headers(), server.retry.read_timeout)
    except (OSError, http.client.HTTPException):
        return None
    return url if reply.status == 200 else None


async def _node_manifest(server: HttpSource, repo_id: str, commit_id: str) -> list[dict[str, Any]]:
    url = f"{server.base_url}{NODE_API}/repos/{quote(repo_id)}/revisions/{commit_id}/manifest"
    headers = server.headers()
    kept = _MANIFESTS.get((url, headers.get("Authorization")))
    if kept is not None:
        headers = {**headers, "If-None-Match": kept[0]}
    try:
        reply = await small_request("GET", url, headers, server.retry.read_timeout)
        if reply.status == 304 and kept is not None:
            return kept[1]
        if reply.status != 200:
            raise UpstreamError(f"{url}: HTTP {reply.status}", source=url, status=reply.status)
        body = json.loads(reply.body)
    except (OSError, http.client.HTTPException, ValueError, RecursionError) as error:  # (too deep: a lie)
        raise UpstreamError(f"{url}: {type(error).__name__}: {error}", source=url) from error
    files = body.get("files") if isinstance(body, dict) else None
    listed = [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []
    etag = reply.headers.get("ETag")
    if etag and len(listed) <= MANIFEST_FILES_KEPT:
        _MANIFESTS[(url, headers.get("Authorization"))] = (etag, listed)
        # (another thread's at once: one more)
        with contextlib.suppress(RuntimeError, KeyError, StopIteration):
            while (
                len(_MANIFESTS) > MANIFESTS_KEPT
                or sum(len(listing) for _, listing in _MANIFESTS.values()) > MANIFEST_FILES_KEPT
            ):
                del _MANIFESTS[next(iter(_MANIFESTS))]
    return listed


def _names_a_commit(revision: str) -> bool:
    """Whether ``revision`` is a commit id, whole or its start (any node holding it has the same files)."""
    return is_commit_id(revision.lower()) or SHORT_COMMIT.fullmatch(revision.lower()) is not None


def _judge_unanswering(peer: HttpSource, repo_id: str) -> None:
    """A peer let a scan time out: it is left out of this process's scans for UNANSWERING_FOR seconds unless
    it answers its health (alive, only slow: a mirror peer waits on its own silent upstream for a repo it does
    not hold; left out for that, the repos it alone holds could not be scanned for a minute, a review), and
    then still after SLOW_SCANS_TOLERATED timeouts in a row (alive, but its scans hang: each scan nobody else
    answered waited on it, a review). Said in a warning either way."""
    timed_out = _TIMED_OUT[peer.base_url] = _TIMED_OUT.get(peer.base_url, 0) + 1
    if _answers_at_all(peer) and timed_out < SLOW_SCANS_TOLERATED:
        log.warning("%s did not answer a scan of %s within %g s, but answers its health: asked again",
                    peer.base_url, repo_id, PEER_SCAN_TIMEOUT)  # fmt: skip
        return
    _UNANSWERING[peer.base_url] = time.monotonic() + UNANSWERING_FOR
    _TIMED_OUT.pop(peer.base_url, None)
    log.warning("%s did not answer a scan of %s within %g s (%s): left out of scans for %g s", peer.base_url,
                repo_id, PEER_SCAN_TIMEOUT, "nor its health" if timed_out < SLOW_SCANS_TOLERATED
                else f"{timed_out} in a row", UNANSWERING_FOR)  # fmt: skip


def takes_token(peer: HttpSource, timeout: float = HEALTH_PROBE_TIMEOUT) -> bool | None:
    """Whether ``peer`` answers its info to its source's token (True), refuses it (False: 401 or 403), or
    could not say (None: out of reach, another answer). What a pull (:meth:`SourceChain._refused_by`) and a
    serving node's health (``server.fleet``) both ask."""
    try:
        reply = ranged.request("GET", f"{peer.base_url}{NODE_API}/info", peer.headers(), timeout, 1 << 16,
                               ranged.Attempt())  # fmt: skip
    except (OSError, http.client.HTTPException, ValueError):  # (ValueError: a registry's URL, unparsable)
        return None
    return True if reply.status == 200 else False if reply.status in (401, 403) else None


def _answers_at_all(peer: HttpSource) -> bool:
    """Whether ``peer`` answers its health within HEALTH_PROBE_TIMEOUT, whatever it says: a peer slow to
    describe a repo may be a mirror waiting on its own silent upstream for a repo it does not hold (left out
    for that, the repos it alone holds could not be scanned for a minute: a review); a frozen one, or an
    address that accepts and never answers, says nothing."""
    try:
        ranged.request(
            "GET",
            f"{peer.base_url}{NODE_API}/health",
            peer.headers(),
            HEALTH_PROBE_TIMEOUT,
            1 << 16,
            ranged.Attempt(),
        )
    except (OSError, http.client.HTTPException):
        return False
    return True


def _unanswered(problem: DepotError) -> bool:
    """Whether a source could not be reached or did not answer in time (not: it is offline by choice)."""
    return (
        isinstance(problem, UpstreamError)
        and problem.status is None
        and not isinstance(problem, OfflineError)
    )


def _what_each_said(hub: DepotError, nodes: list[DepotError]) -> str:
    """What the Hub answered first (the last word on a repo it has), then the nodes': those that do not have
    it in one clause, the rest as they said it (a fleet's every node said "not found; if it is private, set
    MODELDEPOT_TOKEN", a wall before the Hub's "revision ... does not exist": a trial)."""

    def lacks_it(problem: DepotError) -> bool:
        return isinstance(problem, (RepoNotFoundError, RevisionNotFoundError)) and problem.source is not None

    def listed(sources: list[str]) -> str:
        shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
        return f"node{'s' if len(sources) > 1 else ''} {shown}"

    # (a node that has the repo but not the revision is said so: "not on the depot nodes" sent users looking
    # for a repo those nodes held, when the revision was the mistake)
    no_repo = [str(p.source) for p in nodes if lacks_it(p) and not isinstance(p, RevisionNotFoundError)]
    no_revision = [p for p in nodes if lacks_it(p) and isinstance(p, RevisionNotFoundError)]
    parts = [str(hub)]
    if no_repo:
        hint = " (a private repo there needs MODELDEPOT_TOKEN)" if isinstance(hub, RepoNotFoundError) else ""
        parts.append(f"not on the depot {listed(no_repo)} either{hint}")
    if no_revision:
        revision = getattr(no_revision[0], "revision", "")
        parts.append(f"the depot {listed([str(p.source) for p in no_revision])} "
                     f"{'have' if len(no_revision) > 1 else 'has'} the repo, but no revision {revision!r}")  # fmt: skip
    parts += [str(p) for p in nodes if not lacks_it(p)]
    return "; ".join(parts)
