"""Where a depot's pulls go, and the manifest each pull goes by.

A depot pulls through a source chain (its depot servers, the fleet's live nodes, the Hub): this module makes
that chain from the depot's settings, keeps the fleet's view it reads (opened on first use, or a server's own),
and answers which manifest a pull of a revision follows: the saved scan when it answers the revision, what
the store holds of it offline, else a fresh scan. :class:`~modeldepot.depot.Depot` is its one user; it
validates what it is given first.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from modeldepot.config import DepotConfig
from modeldepot.errors import DepotError, NotFoundError, OfflineError, UpstreamError
from modeldepot.hub.manifest import (
    IMPORTED_ENDPOINT,
    Manifest,
    current_manifest,
    is_part_of_commit,
    save_scan,
)
from modeldepot.store import Store
from modeldepot.tiers import Tiers
from modeldepot.validation import SHORT_COMMIT, is_commit_id

if TYPE_CHECKING:  # (the transfer machinery loads on the first pull: engines-only workers start sooner)
    from modeldepot.ratelimit import RateLimit
    from modeldepot.transfer.chain import SourceChain
    from modeldepot.transfer.download import Limits
    from modeldepot.transfer.fleet import BackgroundFleet, FleetView

__all__ = ["Upstream", "branch_set_by"]

log = logging.getLogger(__name__)


def branch_set_by(revision: str) -> str | None:
    """The branch a pull of ``revision`` sets: none for a commit id, whole or its start, in any case (a
    pull of ``-r CFEDE1F`` made a branch of that name)."""
    lowered = revision.lower()
    return None if is_commit_id(lowered) or SHORT_COMMIT.fullmatch(lowered) else revision


class Upstream:
    """A depot's way upstream. ``config`` returns the depot's settings as they are now (a program may replace
    them on an open depot: offline from now on, another download cap)."""

    def __init__(self, store: Store, tiers: Tiers, config: Callable[[], DepotConfig]) -> None:
        self.store = store
        self.tiers = tiers
        self._config = config
        self._fleet: FleetView | None = None  # a server's view (use_fleet), or the one opened here
        self._background: BackgroundFleet | None = None  # the one opened here (closed with the depot)
        self._fleet_failed = False
        self._fleet_managed = False  # a server manages the view: never open one here, even after it closes
        self._lock = threading.Lock()
        self._download_limit: RateLimit | None = None  # (one for all the depot's pulls)

    # -- the sources ------------------------------------------------------------------------------------

    @property
    def chain(self) -> SourceChain:
        from modeldepot.transfer.chain import SourceChain

        config = self._config()
        fleet = None if config.offline else self.fleet
        from modeldepot.transfer.chain import served_in_fleet

        # (not in the serving process itself: its view may miss it before it registers, or in an outage)
        served = (
            fleet is not None
            and not self._fleet_managed
            and served_in_fleet(self.store, config.cluster_prefix)
        )
        return SourceChain.from_config(config, fleet=fleet, node_id=self.store.node_id,
                                       download_limit=self.download_limit, served_in_fleet=served)  # fmt: skip

    @property
    def download_limit(self) -> RateLimit | None:
        rate = self._config().max_download_rate
        if rate is None:
            return None
        with self._lock:
            if self._download_limit is None or self._download_limit.rate != rate:
                from modeldepot.ratelimit import RateLimit

                self._download_limit = RateLimit(rate)
            return self._download_limit

    def limits(self) -> Limits:
        """How many connections a pull opens, and the pace below which a peer is slow."""
        from modeldepot.transfer.download import Limits

        config = self._config()
        slow, cap = config.slow_peer_rate, config.max_download_rate
        # (under a download cap near that pace, the cap is what is slow: only peers below half of it are; a
        # trial of the Hub tells whether it adds to what they send, or only shares the cap: transfer/pace.py)
        slow = slow if cap is None else min(slow, cap // 2)
        return Limits(per_source=config.connections_per_source, total=config.connections, slow_peer_rate=slow)

    # -- the fleet ----------------------------------------------------------------------------------------

    @property
    def fleet(self) -> FleetView | None:
        if (background := self._background) is not None and background.forked and not self._fleet_failed:
            # (a forked child: the parent's view runs on a thread the child has not, and gRPC opens no new
            # connection in a child (each read timed out after 4 s, a child crashed now and then): the
            # inherited view answers at once, with nothing)
            self._fleet_failed = True
            log.warning("this process was forked from one that had opened the fleet's view: its pulls go on "
                        "without the fleet (open the Depot in a process started afresh to pull from it)")  # fmt: skip
        if self._fleet is not None or self._fleet_failed or self._fleet_managed:
            return self._fleet
        config = self._config()
        if config.cluster is None:
            return None
        from modeldepot.transfer.fleet import BackgroundFleet

        with self._lock:
            if self._fleet is None and not self._fleet_failed and not self._fleet_managed:
                try:
                    self._fleet = self._background = BackgroundFleet.open(
                        config.cluster, config.cluster_prefix
                    )
                except DepotError:
                    raise
                except Exception as error:  # a registry that hangs: pull without the fleet
                    self._fleet_failed = True
                    log.warning("cannot read the fleet at %s (%s: %s): going on without it",
                                config.cluster, type(error).__name__, error)  # fmt: skip
        return self._fleet

    def use_fleet(self, fleet: FleetView | None) -> None:
        with self._lock:
            self.close()
            self._fleet, self._fleet_managed = fleet, True

    def close(self) -> None:
        """Close the fleet's view opened here (a server's own is the server's to close)."""
        background, self._background, self._fleet = self._background, None, None
        if background is not None:
            background.close()

    # -- manifests ----------------------------------------------------------------------------------------

    def scan(self, repo_id: str, revision: str, unrecorded_ok: bool = False) -> Manifest:
        """A fresh scan of ``revision`` through the chain, saved (``unrecorded_ok``: or kept in this process
        when the index has no room for it); offline, what the store holds of it."""
        if self._config().offline:
            return self._offline_manifest(repo_id, revision)
        scan = self.chain.scan(repo_id, revision)
        repo_id = self.store.spelled(scan.repo_id)  # the store's spelling, or for a new repo the upstream's
        save_scan(self.store, repo_id, revision, scan.commit_id, scan.endpoint, scan.info, scan.files,
                  part=not scan.whole, unrecorded_ok=unrecorded_ok)  # fmt: skip
        shown = not (scan.info.get("private") or scan.info.get("gated"))
        if shown and not self.store.read_only and self.store.show_repo_again(repo_id, scan.endpoint):
            # (hidden on its upstream's word, a mirror's "not found" or a pull of it while private: that
            # upstream shows it to anyone now; hidden for good, a wrong token once hid every repo asked for)
            log.warning("%s is shown by its upstream %s again: this node serves it to anyone again", repo_id,
                        scan.endpoint)  # fmt: skip
        return current_manifest(self.store, repo_id)

    def manifest_for(self, repo_id: str, revision: str, unrecorded_ok: bool = False) -> Manifest:
        """The manifest to pull ``revision`` by: the saved one when it answers it (a commit id it was
        scanned at, or, offline, the branch it was scanned at); else a fresh scan (``unrecorded_ok``: see
        :meth:`scan`)."""
        if self._config().offline:
            held = self._offline_manifest(repo_id, revision)
            if self._held_in_part(held):
                # (an offline pull of it said "(all files)", and `path` of a file it lacked said to pull it:
                # an explorer's trial)
                log.warning("offline mode: the store holds %d files of %s@%s, and not the commit's listing (adopted "
                            "from a Hugging Face cache without it, or scanned from a node that held part of it): "
                            "whether the commit has other files only its upstream can tell (pull it online)",
                            len(held.files), held.repo_id, held.commit_id[:12])  # fmt: skip
            return held
        try:
            saved = current_manifest(self.store, repo_id)
        except NotFoundError:
            saved = None
        if saved is not None and saved.commit_id == revision:
            if not self._held_in_part(saved):
                return saved
            try:
                return self.scan(repo_id, revision, unrecorded_ok)
            except UpstreamError as error:  # (what the store holds of it is all it can go by)
                log.warning("%s@%s was adopted from a Hugging Face cache without its listing, and the upstream "
                            "could not tell the rest of it (%s): going by the files held", repo_id, revision[:12],
                            error)  # fmt: skip
                return saved
        return self.scan(repo_id, revision, unrecorded_ok)

    def through_hub(self, manifest: Manifest) -> bool:
        """Whether ``manifest`` was looked up at the Hub (``HF_ENDPOINT``): its address is known to answer."""
        return manifest.endpoint.rstrip("/") == self._config().hub_endpoint.rstrip("/")

    def _offline_manifest(self, repo_id: str, revision: str) -> Manifest:
        """(Offline.) The manifest of the commit the stores hold for ``revision`` (a saved scan of it, else the
        files held of it), else the saved scan of ``revision`` itself (a branch scanned, nothing of it held
        yet); OfflineError otherwise. The saved scan of another branch was taken whatever was asked: an
        offline pull of main answered with the commit of dev scanned last, and moved main to it."""
        answered = self.tiers.manifest(repo_id, revision)
        if answered is not None:
            return answered
        try:
            saved = current_manifest(self.store, repo_id)
        except NotFoundError:
            saved = None
        if saved is not None and revision in (saved.revision, saved.commit_id):
            return saved
        held = "" if saved is None else f" (it holds {repo_id}@{saved.revision or saved.commit_id[:12]})"
        raise OfflineError(
            f"offline mode: the store does not hold {repo_id}@{revision}{held}, and finding it upstream needs "
            "the network", repo_id=repo_id,
        )  # fmt: skip

    def _held_in_part(self, manifest: Manifest) -> bool:
        """Whether ``manifest`` is what the store holds of an upstream's commit, not known to be the whole of
        it: a commit adopted from a Hugging Face cache without its listing (a cache filled by hf_hub_download,
        transformers' way, holds the files that were asked for). A pull of that commit by its id fetched
        nothing, and said a file of it was not in it. Or a node's part of the commit, which no source gave
        whole when it was scanned (asked again: the Hub may be back)."""
        if manifest.endpoint != IMPORTED_ENDPOINT:
            try:
                return is_part_of_commit(self.store.manifests.load(manifest.repo_id))
            except NotFoundError:
                return False
        if self.store.manifests.listing(manifest.repo_id, manifest.commit_id) is not None:
            return False  # (its whole listing is known: huggingface_hub's, kept as it was adopted)
        from modeldepot.hfcache.cache import ORIGIN as HF_CACHE_ORIGIN

        rows = self.store.index.read("SELECT origin FROM repos WHERE repo_id = ?", (manifest.repo_id,))
        return bool(rows) and rows[0]["origin"] == HF_CACHE_ORIGIN
