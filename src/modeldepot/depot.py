"""The public Python API: one object for everything a program asks of a depot.

>>> from modeldepot import Depot
>>> depot = Depot()                                   # MODELDEPOT_HOME or ~/.cache/modeldepot
>>> depot.import_dir("./my-model", "me/my-model")     # publish a local folder as a repo
>>> view = depot.get_file("me/my-model", "model.safetensors")      # zero-copy memoryview
>>> with depot.map_file("me/my-model", "model.safetensors") as view: ...   # released on exit
>>> with depot.open_file("me/my-model", "tokenizer.json") as stream: ...   # seekable, streamed
>>> depot.snapshot_path("me/my-model")                # a folder for from_pretrained(...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import shlex
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from modeldepot.config import DepotConfig, parse_size, shared_homes, validate_cluster
from modeldepot.errors import (
    ConfigError,
    CorruptBlobError,
    EntryNotFoundError,
    InvalidInputError,
    NotFoundError,
    ReadOnlyStoreError,
    StoreClosedError,
)
from modeldepot.guards import any_case, own_store, writes
from modeldepot.held import HeldModels
from modeldepot.hub.manifest import (
    CommitListings,
    Manifest,
    current_manifest,
    holds_whole,
    keep_listing,
    listed_counts,
)
from modeldepot.hub.removal import forget_removed_variants
from modeldepot.hub.variants import variants_own_files
from modeldepot.running import RunningPulls
from modeldepot.store import (
    BlobRecord,
    FileEntry,
    ImportProgress,
    ImportResult,
    RepoInfo,
    RepoSummary,
    Store,
    import_dir,
)
from modeldepot.store.verified import VerifiedBlob
from modeldepot.tiers import Tiers
from modeldepot.upkeep import Upkeep
from modeldepot.upstream import Upstream, branch_set_by
from modeldepot.uses import UseCounter

if TYPE_CHECKING:  # the transfer machinery (aiohttp, huggingface_hub) loads on the first pull, not at
    # import: a worker that only loads engines starts 0.3 s sooner
    # Loading engines and preloading likewise load on first use: `modeldepot import` starts without them.
    from modeldepot.engines.adapters import EngineLoader
    from modeldepot.engines.cache import LoadedModelCache
    from modeldepot.engines.loading import ChooseVariant
    from modeldepot.hfcache import HfCacheExportResult, HfCacheImportResult
    from modeldepot.preload import Preloader
    from modeldepot.ratelimit import RateLimit
    from modeldepot.transfer.chain import SourceChain
    from modeldepot.transfer.fleet import FleetView, PeerRow
    from modeldepot.transfer.pull import PartialWatch, PullProgress, PullResult
from modeldepot.validation import (
    is_commit_id,
    validate_path,
    validate_quants,
    validate_repo_id,
    validate_revision,
)

__all__ = ["Depot", "MappedFile"]

log = logging.getLogger(__name__)


def _repo_list(repo_ids: Sequence[str] | None) -> list[str] | None:
    """A list of repo ids, refusing one id given alone (a string would be read letter by letter)."""
    if isinstance(repo_ids, str):
        raise InvalidInputError(f"repo_ids is a list of repo ids: give [{repo_ids!r}], not {repo_ids!r}")
    return None if repo_ids is None else list(repo_ids)


def _chunk_size(size: int | str | None) -> int | None:
    """A chunk size given to :class:`Depot` as bytes or as text (``"16MiB"``, as every size of modeldepot's)."""
    if isinstance(size, str):
        try:
            return parse_size(size)
        except ConfigError as error:
            raise ConfigError(f"chunk_size: {error}") from None
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise ConfigError(f"chunk_size is a number of bytes or a size like '16MiB', not {size!r}")
    return size


def _not_here(repo_id: str, quant: str | None, revision: str, choose: ChooseVariant) -> str:
    """(A load trying the depot's stores in turn.) Not in this store: the next one is tried."""
    raise NotFoundError(f"{repo_id}@{revision}: not held here", repo_id=repo_id)


class MappedFile:
    """A file's bytes mapped read-only; ``with`` yields a memoryview and unmaps on exit (an array or slice
    made from it that outlives the block keeps the mapping until it goes, with a ResourceWarning unless the
    block raised).
    :meth:`close` raises BufferError while one lives."""

    def __init__(self, entry: FileEntry, mapping: mmap.mmap | None) -> None:
        self.entry = entry
        self._mapping = mapping
        self.view: memoryview = memoryview(mapping) if mapping is not None else memoryview(b"")

    def close(self) -> None:
        self.view.release()
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                raise BufferError(
                    f"a slice of {self.entry.path!r} is still in use: release it before closing the mapping"
                ) from None
            self._mapping = None

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except BufferError:
            # An array made from the view (np.frombuffer), a local, still lives as the block ends: the mapping
            # goes with the last of them. A BufferError here failed the usual way of reading the bytes, and
            # hid the block's own exception.
            self._mapping = None
            said = f"{self.entry.path!r} stays mapped while an array or a slice made from it lives"
            if kind is None:
                warnings.warn(said, ResourceWarning, stacklevel=2)
            else:  # (a warning taken as an error, -W error, would hide the block's exception again)
                log.debug("%s", said)


def _patterns(patterns: object, name: str) -> list[str]:
    """Glob patterns of paths (``include``, ``exclude``), checked: a list of non-empty texts."""
    if patterns is None:
        return []
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in patterns):
        raise InvalidInputError(f"{name} is a list of glob patterns of paths (like ['*.json', 'onnx/']), "
                                f"not {patterns!r}")  # fmt: skip
    return list(patterns)


def _depot_of(me: weakref.ref[Depot]) -> Depot:
    depot = me()
    if depot is None:  # (a hook of a depot collected: its store was closed with it)
        raise StoreClosedError("the depot was dropped and closed")
    return depot


def _part_of(me: weakref.ref[Depot], name: str) -> Any:
    """The depot's ``name`` attribute (its preloader, its engines), None once the depot is gone."""
    depot = me()
    return None if depot is None else getattr(depot, name)


def _preloader_gives_way(me: weakref.ref[Depot]) -> bool:
    preloader = _part_of(me, "_preloader")
    return preloader is not None and bool(preloader.give_way())


def _close_parts(pulls: RunningPulls, upstream: Upstream) -> None:
    """Stop what a depot runs, at its close or its collection when dropped without one: its pulls (each keeping
    what it received), its upstream's connections. What it made that a caller may keep without it (its
    store, its tiers, its RAM tier: `Depot(home).preloader`) closes with its close, or, dropped, once nothing
    holds it any more (closed with the depot, a store kept alone was closed under its holder: a review)."""
    pulls.stop()
    upstream.close()


class Depot(Upkeep):
    """A model depot rooted at ``home`` (default: ``MODELDEPOT_HOME``, else ``~/.cache/modeldepot``).

    ``chunk_size`` (bytes, or a size like ``"16MiB"``) is the new store's; an existing store of another chunk
    size is a :class:`~modeldepot.errors.ConfigError`. With ``create=False`` a ``home`` that holds no
    store is a :class:`~modeldepot.errors.ConfigError` instead of a new, empty store. ``servers`` (default
    ``MODELDEPOT_SERVERS``) are the depot nodes pulls ask before the Hub; ``cluster`` (default
    ``MODELDEPOT_CLUSTER``, like ``etcd://HOST:PORT``) is the fleet's registry, whose live nodes pulls ask
    next (:attr:`fleet`). Every method validates repo ids, paths and revisions first and raises
    :class:`~modeldepot.errors.InvalidInputError` on bad ones; repo ids match whatever their case, as on the
    Hub (the store keeps one spelling of each repo).

    What a depot does, in the order of this class:

    - **writing**: :meth:`import_dir`, :meth:`hf_cache_import` (and :meth:`hf_cache_export`, out);
    - **reading** what the store holds: :meth:`get_file`, :meth:`map_file`, :meth:`open_file`,
      :meth:`get_chunk`, :meth:`file_path`, :meth:`snapshot_path`, and the listings (:meth:`resolve`,
      :meth:`list_files`, :meth:`file_info`, :meth:`has_file`, :meth:`list_repos`, :meth:`repo_info`);
      :meth:`open_verified` for what is sent to other machines;
    - **upstream repos**: :meth:`scan_repo`, :meth:`pull`, :meth:`pull_async`, :meth:`download_quant`,
      :meth:`download_file`, :meth:`get_manifest`, :meth:`list_manifests`; the fleet they pull from:
      :attr:`fleet`, :meth:`peers`;
    - **hot models**: :meth:`load` with :attr:`engines` (the loaded-model cache) and :attr:`preloader`
      (the RAM tier);
    - **upkeep** (:class:`~modeldepot.upkeep.Upkeep`): :meth:`verify`, :meth:`scrubber`, :meth:`remove`,
      :meth:`gc`, :meth:`du`; the disk budget (:meth:`set_max_size`): :meth:`pin`, :meth:`unpin`,
      :meth:`pins`, :meth:`budget_status`, :meth:`shrink`.

    :attr:`store` is the store itself (blobs by digest, chunk digests, inventory: what peers and the
    server read), and :attr:`config` the settings it was opened with.
    """

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        chunk_size: int | str | None = None,
        servers: Sequence[str] | None = None,
        cluster: str | None = None,
        engine_cache: LoadedModelCache[Any] | None = None,
        create: bool = True,
        shared: Sequence[str | Path] | None = None,
    ) -> None:
        # (checked here: `Depot(5)` was a TypeError from pathlib, `engine_cache={}` an AttributeError at the
        # first load: an explorer's trial)
        if home is not None and (not isinstance(home, (str, os.PathLike)) or not str(home).strip()):
            raise ConfigError(f"home must be a folder's path, not {home!r}")
        if engine_cache is not None and not callable(getattr(engine_cache, "get_or_load", None)):
            raise ConfigError(f"engine_cache must be a LoadedModelCache, not {type(engine_cache).__name__}")
        base = DepotConfig.from_env(home=home)
        chunk_size = _chunk_size(chunk_size)
        self.config = dataclasses.replace(
            base,
            chunk_size=chunk_size if chunk_size is not None else base.chunk_size,
            chunk_size_required=chunk_size is not None,
            servers=tuple(s.rstrip("/") for s in servers) if servers is not None else base.servers,
            cluster=validate_cluster(cluster) if cluster is not None else base.cluster,
            shared=shared_homes(shared) if shared is not None else base.shared,
        )
        try:
            self.store = Store(self.config, create=create)
        except (ReadOnlyStoreError, ConfigError) as error:
            if not self.config.shared or self.config.home.exists():  # (not made, nor to be made: only then)
                raise
            # (a container's read-only root, MODELDEPOT_HOME unset: its default own store cannot be made, and the
            # shared store that holds the models was never said: an explorer's trial)
            raise type(error)(
                f"{error}; with MODELDEPOT_SHARED, the own store is still needed: set MODELDEPOT_HOME "
                "to a writable folder, or to the shared store itself to read it alone"
            ) from error
        try:
            self.tiers = Tiers.open(self.store, self.config)
        except BaseException:
            self.store.close()
            raise
        self._engines = engine_cache
        self._own_engines = engine_cache is None  # (a cache given to it may serve other depots too)
        self._made_lock = threading.Lock()
        self._pulls = RunningPulls(self.home)
        self._preloader: Preloader | None = None
        # The store's hooks and its threads (its flusher, a running thread: a root of the collector) reach this
        # depot weakly: a notebook's cell run again (`d = Depot(); d.load(...)`) kept every depot dropped so, and
        # the engines each held, 40 MiB more a run with a 40 MiB model (an explorer's trial)
        me = weakref.ref(self)
        store = self.store
        self._upstream = Upstream(store, self.tiers, lambda: _depot_of(me).config)
        self._listings = CommitListings(store)
        self._uses = UseCounter(store)
        # What this process holds in memory of the store: kept from eviction, let go of once removed.
        self._held = HeldModels(store, lambda: _part_of(me, "_preloader"), lambda: _part_of(me, "_engines"),
                                self.tiers.shared)  # fmt: skip
        store.budget.add_in_use(self._held.loaded)
        store.budget.add_gives_way(self._held.preloaded, lambda: _preloader_gives_way(me))
        store.budget.evict_by_variant(
            variants_own_files,
            self._held.paths_in_use,
            lambda repo, commit: keep_listing(store, repo, commit),
        )
        store.budget.judge_whole_by(lambda repo_id, commit_id: holds_whole(store, repo_id, commit_id))
        store.budget.add_evicted_hook(lambda repo_id: forget_removed_variants(store, repo_id))
        store.add_quarantine_hook(self._held.let_go_of_blob)
        # ... and a depot dropped without close() closes what it opened (its store's flusher, its pulls' threads)
        self._finalizer = weakref.finalize(self, _close_parts, self._pulls, self._upstream)
        self._finalizer.atexit = False  # (at exit, as before: what is unflushed is the next open's to check)

    @property
    def engines(self) -> LoadedModelCache[Any]:
        """The LRU of loaded engines (:meth:`load`); made on first use, so that a command that loads none
        does not import the engine machinery."""
        if self._engines is None:
            from modeldepot.engines.cache import LoadedModelCache

            if self.store.index.closed:  # (a new, empty cache hid a use after close: an explorer's trial)
                raise StoreClosedError(f"the depot of {self.home} was closed: its engines went with it (open "
                                       "Depot(home) again)")  # fmt: skip
            with self._made_lock:
                if self._engines is None:
                    self._engines = LoadedModelCache()
        return self._engines

    @property
    def home(self) -> Path:
        return self.store.home

    @property
    def chunk_size(self) -> int:
        return self.store.chunk_size

    def check_writable(self, doing: str) -> None:
        """Raise ReadOnlyStoreError when the store is read-only here (a read-only mount, another user's
        files), before a command asks the user to confirm what it could not do."""
        if self.store.read_only:
            raise ReadOnlyStoreError(
                f"the store at {self.home} is {self.store.read_only_said()}: it is read and served as it is, "
                f"never written ({doing}: do that where the store is writable)"
            )

    @property
    def store_id(self) -> str:
        """A random id given to the store when it was created (its copies keep it)."""
        return self.store.store_id

    @property
    def node_id(self) -> str:
        """The id a node serving this store is known by in its fleet: the store's, on this machine, at this
        path (a copy of the store elsewhere is another node: :func:`~modeldepot.store.store.node_id_of`)."""
        return self.store.node_id

    def close(self) -> None:
        if self._preloader is not None:
            self._preloader.close()
        if self._own_engines:
            # The engines it loaded map the store's files: a closed depot lets go of them (a removed store's
            # space comes back, its mount may be unmounted). Dropped, not closed: a caller still holding one
            # goes on using it (clear() would run each engine's close)
            self._engines = None
        self._finalizer()  # (its pulls stop, keeping what they received; its upstream)
        self.tiers.close()
        self.store.close()

    def __enter__(self) -> Depot:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # (sent to a spawned worker, it failed with pickle's "cannot pickle '_thread._local' object", which
        # named an internal of the index and not what to do: an explorer's trial)
        raise TypeError(f"a Depot cannot be sent to another process (pickled): pass its home ({self.home}) and "
                        "open Depot(home) there; a forked child may go on using the parent's")  # fmt: skip

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------------------

    @writes
    def import_dir(
        self,
        path: str | Path,
        repo_id: str,
        revision: str = "main",
        *,
        private: bool | None = None,
        progress: ImportProgress | None = None,
        link: bool = False,
    ) -> ImportResult:
        """Publish a local folder as ``repo_id`` at branch ``revision``; the commit id derives from the files
        and the branch's head (the same files on the same history: the same id).
        A repo the store holds under another case gets the revision (the Hub's repo ids ignore case).
        ``private`` is the whole repo's visibility, as on the Hub: True hides it behind the node's token,
        False shows it, None (the default) keeps what it is (a new repo is public).

        ``link``: the files become the store's blobs by hard links, not copies, where the file system
        allows (the same one, your own files; others are copied): no second copy of a 40 GB GGUF. They are
        made read-only (0444), as every blob is; a file changed in place later is found changed and never
        served."""
        return import_dir(self.store, path, self.store.spelled(repo_id), revision, private=private,
                          progress=progress, link=link)  # fmt: skip

    @writes
    def hf_cache_import(
        self,
        repo_ids: Sequence[str] | None = None,
        *,
        cache_dir: str | Path | None = None,
        private: bool = False,
        copy: bool = False,
        progress: ImportProgress | None = None,
    ) -> HfCacheImportResult:
        """Adopt model repos (``repo_ids``, or all) from a Hugging Face cache (default: huggingface_hub's,
        ``HF_HUB_CACHE`` / ``HF_HOME``): every blob verified against its name, hard-linked into the store
        when on its file system (else copied; always with ``copy``), each snapshot kept as a revision of the
        same commit and each ref as a ref. What cannot be verified is skipped and listed in ``problems``
        (:mod:`modeldepot.hfcache`)."""
        from modeldepot.hfcache import import_hf_cache

        return import_hf_cache(self.store, cache_dir, _repo_list(repo_ids), private=private, copy=copy,
                               progress=progress)  # fmt: skip

    def hf_cache_export(
        self,
        repo_id: str,
        revision: str = "main",
        *,
        cache_dir: str | Path | None = None,
        copy: bool = False,
        progress: ImportProgress | None = None,
        move_ref: bool = False,
    ) -> HfCacheExportResult:
        """Make ``repo_id`` at ``revision`` appear in a Hugging Face cache (default: huggingface_hub's) as a
        download would have left it (blobs hard-linked to the store's when on its file system, else copied),
        so ``hf_hub_download``/``snapshot_download``/``from_pretrained`` find it offline. With shared stores,
        the commit reads find (tiers.py), from each store that holds files of it. A branch's ref in the cache
        that names another commit it holds a snapshot of stays, said in the result, unless ``move_ref``."""
        from modeldepot.hfcache.export import export_through_tiers

        result = export_through_tiers(self.tiers, repo_id, revision, cache_dir, copy=copy, progress=progress,
                                      move_ref=move_ref)  # fmt: skip
        try:
            held = {entry.path for entry in self.list_files(repo_id, result.commit_id)}
            lacking = tuple(
                e.path for e in self.commit_files(repo_id, result.commit_id) if e.path not in held
            )
        except NotFoundError:  # (removed since by another process: the export says so, as a problem)
            return result
        return dataclasses.replace(result, not_in_store=lacking) if lacking else result

    # -- reading --------------------------------------------------------------------------------------

    @any_case
    def resolve(self, repo_id: str, revision: str = "main") -> str:
        """The commit id a branch name (or commit id) stands for (in the store that answers it: the own
        store or a shared one, tiers.py)."""
        return self.tiers.holder(repo_id, revision)[2]

    @any_case
    def list_files(self, repo_id: str, revision: str = "main") -> list[FileEntry]:
        """Every file of a revision, sorted by path (as the store that answers it holds them)."""
        return self.tiers.files(repo_id, revision)[2]

    @any_case
    def commit_files(self, repo_id: str, revision: str = "main") -> list[FileEntry]:
        """Every file of the revision's commit, sorted by path, as the Hub lists them: the ones the store
        holds and, when the repo's saved scan is of this commit (a pull of one variant, an adopted cache
        that lacked files), the ones it lacks, with their sizes and digests and ``chunk_size`` 0 (not here).
        A commit id names one tree: a listing of part of it would let a client cache that part as the
        whole (huggingface_hub keeps a commit's listing for good)."""
        store, commit_id, held = self.tiers.files(repo_id, revision)
        if store is not self.store:
            return held
        return self._listings.whole(repo_id, commit_id, held)

    def commit_known_whole(self, repo_id: str, commit_id: str) -> bool:
        """Whether the store knows every file of the commit: False for one adopted from a Hugging Face cache
        without its listing, whose other files may exist."""
        return self._listings.known_whole(repo_id, commit_id)

    def commit_may_have(self, repo_id: str, commit_id: str, path: str) -> bool | None:
        """Whether the commit has ``path`` by the repo's saved listing of it (True, False), or may (None: a commit
        adopted from a Hugging Face cache without its listing is known as the files the cache held; a miss of
        another was answered as a file the commit lacks, and huggingface_hub kept it so for good)."""
        return self._listings.may_have(repo_id, commit_id, path)

    @any_case
    def file_info(self, repo_id: str, path: str, revision: str = "main") -> FileEntry:
        return self._entry(repo_id, path, revision)[1]

    def _entry(self, repo_id: str, path: str, revision: str) -> tuple[Store, FileEntry]:
        """The file where a store of the depot holds it; one its commit has that the store lacks (a pull of
        one variant, an adopted cache that held part of the commit) is an EntryNotFoundError that says so,
        and how to have it (`path` and `cat` said "not in" the commit, which has it: a trial)."""
        try:
            return self.tiers.entry(repo_id, path, revision)
        except EntryNotFoundError as missing:
            commit_id = missing.commit_id
            if missing.in_commit or not commit_id:
                raise
            has = self.commit_may_have(repo_id, commit_id, path)
            if has is False:
                raise
            # (that file alone: the commit whole was every quant of a GGUF repo, tens of GB for one file, an
            # explorer's trial)
            fetch = f"`modeldepot pull {repo_id} -r {commit_id} --include {shlex.quote(path)}`"
            advice = (f" (its commit has it: {fetch} fetches it)" if has else
                      " (its commit may have it: the store holds part of the commit, without its whole listing, as "
                      f"a Hugging Face cache held it; {fetch} fetches it if it does)")  # fmt: skip
            raise EntryNotFoundError(
                repo_id, revision, path, commit_id, in_commit=True, advice=advice
            ) from None

    @any_case
    def has_file(self, repo_id: str, path: str, revision: str = "main") -> bool:
        """Whether a store of the depot can serve the file now (present and not quarantined)."""
        if not self.tiers.shared:
            return self.store.has_file(repo_id, path, revision)
        try:
            self.tiers.entry(repo_id, path, revision)
        except (NotFoundError, CorruptBlobError):
            return False
        return True

    @any_case
    def get_file(
        self, repo_id: str, path: str, revision: str = "main", *, download: bool = False
    ) -> memoryview:
        """The file's bytes as a zero-copy view of a shared read-only mapping (unmapped when dropped).

        ``download=True``: on a miss, fetch the file through the source chain first (auto-download).
        """
        if download:
            self.download_file(repo_id, path, revision)
        store, entry = self._entry(repo_id, path, revision)
        mapping = store.map(entry)
        self._record_read(store, entry)
        self._held_by_caller(store, entry, mapping)
        return memoryview(mapping) if mapping is not None else memoryview(b"")

    @any_case
    def map_file(self, repo_id: str, path: str, revision: str = "main") -> MappedFile:
        """Like :meth:`get_file`, as a context manager that unmaps the file on exit."""
        store, entry = self._entry(repo_id, path, revision)
        mapping = store.map(entry)
        mapped = MappedFile(entry, mapping)
        self._record_read(store, entry)
        self._held_by_caller(store, entry, mapping)
        return mapped

    @any_case
    def open_file(self, repo_id: str, path: str, revision: str = "main") -> BinaryIO:
        """A seekable binary stream; it reads from disk as asked and never holds the whole file."""
        store, entry = self._entry(repo_id, path, revision)
        stream = store.open(entry)
        self._record_read(store, entry)
        self._held_by_caller(store, entry, stream)
        return stream

    def _held_by_caller(self, store: Store, entry: FileEntry, handle: object) -> None:
        """A file of this depot's store handed out mapped or open: the disk budget keeps its revision while the
        handle lives (evicted, its disk space stayed taken, the budget saying it was free: an explorer's trial)."""
        if store is self.store and handle is not None:
            self._held.add_view(handle, entry.repo_id, entry.commit_id, entry.path)

    @any_case
    def get_chunk(self, repo_id: str, path: str, index: int, revision: str = "main") -> memoryview:
        """Chunk ``index`` of a file as a zero-copy view, verified against its BLAKE3 digest."""
        store, entry = self._entry(repo_id, path, revision)
        chunk = store.chunk(entry, index)
        self._record_read(store, entry)
        return chunk

    @any_case
    def file_path(self, repo_id: str, path: str, revision: str = "main") -> Path:
        """A real path (in the snapshot tree) for engines that open or mmap files themselves."""
        store, entry = self._entry(repo_id, path, revision)
        found = store.entry_path(entry)
        self._record_read(store, entry)
        return found

    @any_case
    def snapshot_path(self, repo_id: str, revision: str = "main") -> Path:
        """The revision's folder, for ``from_pretrained(...)`` and other path-based loaders (the folder of the
        store that holds most of the commit the revision answers: tiers.py)."""
        store, spelled, commit_id = self.tiers.folder_holder(repo_id, revision)
        found = store.snapshot_path(spelled, commit_id)
        if store is self.store:  # (a shared store's files are not this store's to count)
            self._uses.folder(repo_id, commit_id)
        return found

    @any_case
    @contextlib.contextmanager
    def linked_folder(self, repo_id: str, folder: str = "", revision: str = "main") -> Iterator[Path]:
        """The revision's folder ``folder`` ("" for the whole revision), subfolders included, as real files
        (hard links to the blobs in a private folder of the store) for the block: for loaders that refuse a
        file reached through a link out of the model's folder. onnxruntime (1.31 and later) refuses external
        data through the snapshot's links (``model.onnx_data`` beside ``model.onnx`` leads into ``blobs/``):
        ``with depot.linked_folder(repo, "onnx") as f: InferenceSession(f / "model.onnx")``. Read or map the
        files within the block: the folder goes at its end (what was mapped stays valid). On a read-only
        store it is the snapshot's folder (no link can be made there)."""
        if folder:
            validate_path(folder)
        store, spelled, commit_id = self.tiers.folder_holder(repo_id, revision)
        with store.linked_folder(spelled, commit_id, folder.strip("/")) as view:
            if store is self.store:
                self._uses.folder(repo_id, commit_id)
            yield view

    def open_verified(self, blob: BlobRecord | FileEntry, *, counts_as_use: bool = True) -> VerifiedBlob:
        """A blob (or a file's blob) open for sending: each chunk is checked against its BLAKE3 before it
        is handed out, and a chunk that fails quarantines the blob. What the node serves goes through this.
        A file's opening counts a use of it unless ``counts_as_use`` is False (a request that does not
        start a download: one of a pull's ranges after its first, a HEAD)."""
        store = self.tiers.store_of_blob(blob.sha256)
        file = None
        if isinstance(blob, FileEntry):
            if counts_as_use and store is self.store:  # (a shared store's reads are not counted)
                self._uses.sent(blob)
            file = (blob.repo_id, blob.commit_id, blob.path)
            blob = BlobRecord(blob.sha256, blob.size, blob.chunk_size)
        opened = store.open_verified(blob)
        if store is self.store:  # (kept from eviction while it is sent: HeldModels.sending)
            self._held.add_sending(opened, blob.sha256, file)
        return opened

    def sending(self) -> set[str]:
        """The SHA-256 of the blobs of this depot's store it is sending now (a node's answers)."""
        return self._held.sending()

    def count_sent(self, entry: FileEntry) -> None:
        """A file sent to a client other than through :meth:`open_verified` (a mirror's answer, which followed
        the file's pull as it landed): a use of it, as that opening counts one."""
        if self.tiers.store_of_blob(entry.sha256) is self.store:
            self._uses.sent(entry)

    def _record_read(self, store: Store, entry: FileEntry) -> None:
        """A local read is a use (uses.py); a shared store's files are not this store's to count."""
        if store is self.store:
            self._uses.read(entry)

    def list_repos(self) -> list[RepoSummary]:
        """The repos of the own store and of the shared ones, each once, sorted by repo id."""
        return self.tiers.list_repos() if self.tiers.shared else self.store.list_repos()

    @any_case
    @own_store
    def own_repo_info(self, repo_id: str) -> RepoInfo:
        """The repo as the depot's own store holds it (what `rm`, `pin` and the budget work on)."""
        return self.store.repo_info(repo_id)

    @any_case
    def repo_info(self, repo_id: str) -> RepoInfo:
        return self.tiers.repo_info(repo_id) if self.tiers.shared else self.store.repo_info(repo_id)

    # -- upstream repos -------------------------------------------------------------------------------

    @any_case
    def scan_repo(self, repo_id: str, revision: str = "main") -> Manifest:
        """Read ``repo_id`` through the source chain (depot servers from ``MODELDEPOT_SERVERS``, then the
        Hub at ``HF_ENDPOINT``): commit, files, variants; saved as its manifest.

        Offline (``HF_HUB_OFFLINE=1`` or ``MODELDEPOT_OFFLINE=1``) no connection is opened: the manifest of
        what the store holds for ``revision`` is returned, or OfflineError (:mod:`modeldepot.upstream`).
        """
        validate_repo_id(repo_id)
        validate_revision(revision)
        return self._upstream.scan(repo_id, revision)

    @property
    def chain(self) -> SourceChain:
        """Where pulls look, in order: the depot servers, the fleet's live nodes, then the Hub."""
        return self._upstream.chain

    @property
    def download_limit(self) -> RateLimit | None:
        """The cap on what all this depot's pulls download together (``config.max_download_rate``,
        ``MODELDEPOT_MAX_DOWNLOAD_RATE``); None without one."""
        return self._upstream.download_limit

    # -- the fleet ------------------------------------------------------------------------------------

    @property
    def fleet(self) -> FleetView | None:
        """The fleet as this process sees it (live nodes, and what each holds), or None without a cluster.

        A server hands its own view over (:meth:`use_fleet`: the node registered itself through it); any other
        process opens a read-only one on first use (``config.cluster``), on a thread of its own, and closes
        it with the depot: a process that only pulls never registers. A registry that cannot be reached
        leaves the view empty (pulls go on to the Hub)."""
        return self._upstream.fleet

    def use_fleet(self, fleet: FleetView | None) -> None:
        """Read the fleet through ``fleet`` (a server's view of its discovery) rather than opening one; from
        then on the caller manages it (None: no fleet, as while a server shuts down)."""
        self._upstream.use_fleet(fleet)

    def peers(self) -> list[PeerRow]:
        """The fleet's live nodes, sorted by node id, each with what it holds (``modeldepot peers``)."""
        fleet = self.fleet
        if fleet is None:
            raise ConfigError("no cluster to list: give --cluster etcd://HOST:PORT or set MODELDEPOT_CLUSTER")
        return fleet.rows()

    @any_case
    @writes
    def pull(
        self,
        repo_id: str,
        quants: list[str] | str | None = None,
        *,
        revision: str = "main",
        progress: PullProgress | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        manifest: Manifest | None = None,
    ) -> PullResult:
        """Download variants of ``repo_id`` into the store through the source chain, verified and resumable.

        ``quants``: None for the whole repo, ``"all"`` for every variant, or names like ``["q4f16"]``;
        the shared files (configs, tokenizers) come with any variant. ``include`` and ``exclude``: glob
        patterns of paths (as huggingface_hub's ``allow_patterns`` and ``ignore_patterns``, ``hf download
        --include/--exclude``), narrowing what the variants take. Content the store already holds is
        not downloaded again; an interrupted pull continues where it stopped. Through an outage (no source
        answers at all) it tries again, resuming, for ``MODELDEPOT_OUTAGE_PATIENCE`` seconds (120).
        ``manifest``: a scan of ``repo_id`` at ``revision`` made already (:meth:`manifest_for`'s), not made again.
        """
        from modeldepot.transfer.pull import run_through_outages

        quants = validate_quants(quants)  # (before the scan)
        include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
        if manifest is None:
            manifest = self.manifest_for(repo_id, revision)
        elif manifest.repo_id.lower() != validate_repo_id(repo_id).lower():
            raise InvalidInputError(f"the manifest given is {manifest.repo_id}'s, not {repo_id}'s")
        paths = None
        if include or exclude:
            from huggingface_hub.utils import filter_repo_objects  # type: ignore[attr-defined]

            from modeldepot.transfer.pull import select

            files, _ = select(manifest, quants)
            paths = list(filter_repo_objects([f.path for f in files], allow_patterns=include or None,
                                             ignore_patterns=exclude or None))  # fmt: skip
            if not paths:
                raise InvalidInputError(
                    f"no file of {manifest.repo_id}@{manifest.commit_id[:12]}"
                    + (f" ({', '.join(quants) if isinstance(quants, list) else quants})" if quants else "")
                    + f" matches {'--include ' + ' '.join(include) if include else ''}"
                    + f"{' ' if include and exclude else ''}{'--exclude ' + ' '.join(exclude) if exclude else ''}"
                )
            # (a variant asked for whose own files the patterns all leave out: the pull took the shared files
            # alone, said "pulled", and exited 0; an explorer's trial)
            kept = set(paths)
            emptied = [name for name in dict.fromkeys(manifest.variant(q).name for q in quants or ())
                       if not set(manifest.variant(name).files) & kept] if isinstance(quants, list) else []  # fmt: skip
            if emptied:
                raise InvalidInputError(
                    f"the patterns leave none of the own files of {', '.join(emptied)} (only the shared ones): drop "
                    "the variant or the patterns that exclude its files"
                )
        return run_through_outages(
            lambda watch: self.pull_async(repo_id, quants, revision=revision, progress=watch, manifest=manifest,
                                          paths=paths),
            progress, self.config.outage_patience, repo_id, self._upstream.through_hub(manifest),
        )  # fmt: skip

    @writes
    async def pull_async(
        self,
        repo_id: str,
        quants: list[str] | str | None = None,
        *,
        revision: str = "main",
        progress: PullProgress | None = None,
        paths: list[str] | None = None,
        watch: PartialWatch | None = None,
        manifest: Manifest | None = None,
        ride_outages: bool = False,
    ) -> PullResult:
        """:meth:`pull` for asyncio programs (scanning runs on a worker thread; :meth:`pull` runs this). ``paths`` pulls just
        those files; ``watch`` is told of each file's partial as its download starts; ``manifest`` skips
        the scan. ``ride_outages``: through an outage it tries again, resuming, for
        ``MODELDEPOT_OUTAGE_PATIENCE`` seconds, as :meth:`pull` does (else one try: a caller waiting on it
        for an answer)."""
        if not ride_outages:
            return await self._pulls.run(
                self._pull_async(repo_id, quants, revision, progress, paths, watch, manifest)
            )
        import asyncio

        from modeldepot.transfer.outage import ride_outages as riding

        if manifest is None:
            validate_repo_id(repo_id)
            validate_revision(revision)
            manifest = await asyncio.to_thread(self.manifest_for, repo_id, revision)
        scanned = manifest
        return await riding(
            lambda shown: self._pulls.run(
                self._pull_async(repo_id, quants, revision, shown, paths, watch, scanned)
            ),
            progress, self.config.outage_patience, repo_id, self._upstream.through_hub(scanned),
        )  # fmt: skip

    async def _pull_async(self, repo_id: str, quants: list[str] | str | None, revision: str,
                          progress: PullProgress | None, paths: list[str] | None, watch: PartialWatch | None,
                          manifest: Manifest | None) -> PullResult:  # fmt: skip
        import asyncio

        from modeldepot.transfer.pull import pull_async

        quants = validate_quants(quants)
        if manifest is None:
            manifest = await asyncio.to_thread(self.manifest_for, repo_id, revision)
        if self.tiers.shared:
            from modeldepot.transfer.pull import select

            files, names = select(manifest, quants, paths)
            held = await asyncio.to_thread(self.tiers.pulled, manifest, files, names, branch_set_by(revision))
            if held is not None:
                return held
        chain = await asyncio.to_thread(lambda: self.chain)  # the first use may open the fleet's view
        return await pull_async(self.store, manifest, quants, branch_set_by(revision), chain,
                                self.config.offline, progress, self._upstream.limits(), paths, watch)  # fmt: skip

    @any_case
    @writes
    def download_quant(self, repo_id: str, quant: str, *, progress: PullProgress | None = None) -> PullResult:
        """Download one variant (and the shared files) of ``repo_id`` at ``main``."""
        return self.pull(repo_id, [quant], progress=progress)

    @any_case
    @writes
    def download_file(
        self, repo_id: str, path: str, revision: str = "main", *, progress: PullProgress | None = None
    ) -> FileEntry:
        """Make sure one file of ``repo_id`` is in the store (downloading it if needed); returns its entry."""
        validate_path(path)
        if self.has_file(repo_id, path, revision):
            return self.file_info(repo_id, path, revision)
        manifest = self.manifest_for(repo_id, revision)
        if not any(f.path == path for f in manifest.files):
            raise EntryNotFoundError(repo_id, revision, path, manifest.commit_id)
        from modeldepot.transfer.pull import run_through_outages

        run_through_outages(
            lambda watch: self.pull_async(repo_id, revision=revision, progress=watch, paths=[path],
                                          manifest=manifest),
            progress, self.config.outage_patience, f"{repo_id}/{path}", self._upstream.through_hub(manifest),
        )  # fmt: skip
        return self.store.entry(repo_id, path, manifest.commit_id)

    @any_case
    def manifest_for(self, repo_id: str, revision: str, *, unrecorded_ok: bool = False) -> Manifest:
        """The manifest to pull ``revision`` by: the saved one when it answers it (a commit id it was
        scanned at, or, offline, the branch it was scanned at); else a fresh scan. ``unrecorded_ok``: a
        scan the store's disk has no room to record is used all the same (a mirror's, answering reads)."""
        validate_repo_id(repo_id)
        validate_revision(revision)
        return self._upstream.manifest_for(repo_id, revision, unrecorded_ok)

    @any_case
    def upstream_file_counts(self, repo_id: str) -> dict[str, int]:
        """How many files the commit of each revision the store holds of ``repo_id`` has upstream, where its
        listing is kept (a revision holding some of them: a pull of one variant, a mirror's)."""
        commits = [r["commit_id"] for r in self.store.index.read(
            "SELECT commit_id FROM revisions WHERE repo_id = ?", (repo_id,))]  # fmt: skip
        return listed_counts(self.store, repo_id, commits)

    @any_case
    def get_manifest(self, repo_id: str) -> Manifest:
        """The saved manifest of a scanned repo, with each variant's current status (a pull that was
        killed shows as failed and resumable, not as downloading forever)."""
        return current_manifest(self.store, repo_id)

    def list_manifests(self) -> list[Manifest]:
        """The manifests of the scanned repos, and of those the store holds unscanned (imported, adopted):
        :meth:`get_manifest` of each."""
        found = []
        for row in self.store.index.read(
            "SELECT repo_id FROM manifests UNION SELECT repo_id FROM repos ORDER BY repo_id"
        ):
            with contextlib.suppress(NotFoundError):  # (removed meanwhile, or held without main)
                found.append(self.get_manifest(row["repo_id"]))
        return found

    # -- engines ----------------------------------------------------------------------------------------

    @any_case
    async def load_async(
        self,
        repo_id: str,
        quant: str | None = None,
        revision: str = "main",
        *,
        engine: str | EngineLoader = "onnxruntime",
        warmup: int = 1,
        inputs: Mapping[str, Any] | None = None,
        file: str | None = None,
    ) -> Any:
        """:meth:`load` for asyncio programs: it runs on a worker thread, so the event loop (an inference
        server's, a ``pull_async`` on it) goes on meanwhile. A cancelled caller stops waiting; the load runs to
        its end all the same, and its engine stays in :attr:`engines` (the next call is a hit)."""
        import asyncio

        return await asyncio.to_thread(
            self.load, repo_id, quant, revision, engine=engine, warmup=warmup, inputs=inputs, file=file
        )

    @any_case
    def load(
        self,
        repo_id: str,
        quant: str | None = None,
        revision: str = "main",
        *,
        engine: str | EngineLoader = "onnxruntime",
        warmup: int = 1,
        inputs: Mapping[str, Any] | None = None,
        file: str | None = None,
        providers: Sequence[str] | None = None,
    ) -> Any:
        """A loaded, warmed-up engine for a variant of ``repo_id``, kept in :attr:`engines` (an LRU of
        loaded engines): the second call for the same variant and engine is a cache hit.

        The variant is pulled through the source chain first if the store lacks it (into a repo imported
        here only when the upstream's repo of its name holds each of its files: else the upstream's is
        another, and a NotFoundError says so). ``engine`` is
        ``"onnxruntime"`` (an InferenceSession), ``"safetensors"`` (numpy tensors), ``"torch"`` (torch
        tensors, when torch is installed), ``"gguf"`` (a :class:`~modeldepot.engines.GgufModel`: metadata
        and read-only tensors mapping the file, a split model's shards merged), or any callable taking the
        model file's path (keyed by the callable itself: pass the same object to hit the cache). ``warmup``
        dummy inference passes run after the load (shaped from the model's inputs unless ``inputs`` is
        given); their failure is logged, not raised. ``file`` names the model file to load (a path in the
        repo, as ``"onnx/encoder_model.onnx"``: one graph of an encoder-decoder export), pulled with its
        variant; by default the variant's plainest. ``providers``: onnxruntime's execution providers, in order
        (``["CUDAExecutionProvider", "CPUExecutionProvider"]``; CPU alone by default), a session cached per
        list; on a read-only store too, where a caller's own loader cannot reach external data through the
        snapshot's links. The steps are in :mod:`modeldepot.engines.loading`.
        """

        def pull_variant(repo: str, variant: str | None, rev: str, choose: ChooseVariant) -> str:
            from modeldepot.transfer.pull import run_blocking

            if self.store.read_only:  # (before a scan: the network is not what refuses it)
                raise ReadOnlyStoreError(f"the store at {self.home} is {self.store.read_only_said()}: it pulls "
                                         "nothing (pull it where the store is writable)")  # fmt: skip
            # What another process removed is let go of now, not at the next look: once pulled again, its rows
            # are back, and the cached engine mapping the removed blob was handed out over the new copy, the
            # model taking twice its room until the worker ended (an explorer's trial: `rm --quant`, then a load)
            self._held.let_go_of_removed()
            manifest = self.manifest_for(repo, rev)
            imported = self._check_completes_import(repo, rev, manifest)
            chosen = choose(manifest, variant)
            if isinstance(chosen, tuple):  # (a file of no variant: it, and the shared files)
                pulling = self.pull_async(repo, None, revision=rev, manifest=manifest, paths=list(chosen))
                return run_blocking(pulling).commit_id
            variant = chosen
            quants = [variant] if variant else None
            if variant and quants and imported:
                # The variants the user imported come along (from the store: nothing is fetched), so that the
                # branch the pull moves to the upstream's commit still holds them (they were left behind on
                # a detached revision, and an offline load of them failed: a README walk)
                with contextlib.suppress(NotFoundError):  # (no such variant: the pull says so, as ever)
                    asked = manifest.variant(variant).name
                    quants += [v.name for v in manifest.variants
                               if v.name != asked and {f.path for f in manifest.files_of(v.name)} <= imported]  # fmt: skip
            pulling = self.pull_async(repo, quants, revision=rev, manifest=manifest)
            return run_blocking(pulling).commit_id

        from modeldepot.engines.loading import load_variant

        if isinstance(providers, str):  # (one name would be taken letter by letter)
            raise InvalidInputError(
                f"providers is a list of onnxruntime's execution providers: [{providers!r}]"
            )
        # (a list is not a key: the session is cached by its providers)
        chosen_providers = None if providers is None else tuple(providers)
        self._held.look_now_and_then()  # (what another process removed is not handed out from the cache)
        if self.tiers.shared:
            holder: Store = self.store
            try:
                holder, _, commit_id = self.tiers.holder(repo_id, revision)
            except NotFoundError:
                commit_id = ""
            for store in self.tiers.all if commit_id else ():
                # (the commit the tiers answer, from the first store that holds the variant whole; none: pulled)
                try:
                    return load_variant(store, self.preloader, self.engines, _not_here, True,
                                        store.spelled(repo_id), quant, commit_id, engine, warmup, inputs,
                                        owner=self.store, file=file, providers=chosen_providers)  # fmt: skip
                except (NotFoundError, CorruptBlobError):
                    continue
            behind = self._left_behind(holder, repo_id, quant, revision, commit_id) if file is None else None
            if behind is not None:  # (offline: what a store of the tiers holds of the variant, said)
                store, older = behind
                log.warning("%s: %s at %s does not hold %s; loading it from %s, the revision it left behind in %s "
                            "(offline: the branch's is not pulled)", repo_id, revision, commit_id[:12], quant,
                            older[:12], store.home)  # fmt: skip
                with contextlib.suppress(NotFoundError, CorruptBlobError):  # (the own store's error, below)
                    return load_variant(store, self.preloader, self.engines, _not_here, True, store.spelled(repo_id),
                                        quant, older, engine, warmup, inputs, owner=self.store,
                                        providers=chosen_providers)  # fmt: skip
        return load_variant(self.store, self.preloader, self.engines, pull_variant, self.config.offline,
                            repo_id, quant, revision, engine, warmup, inputs, file=file,
                            providers=chosen_providers)  # fmt: skip

    def _left_behind(
        self, holder: Store, repo_id: str, quant: str | None, revision: str, commit_id: str
    ) -> tuple[Store, str] | None:
        """Offline, under shared stores: the store and revision the branch left behind that hold ``quant``
        whole (:func:`~modeldepot.engines.loading.left_behind`: a container's pull of another variant moved
        its own branch past the image's, and the image's baked variant failed to load, an explorer's trial)."""
        from modeldepot.engines.loading import left_behind

        if not self.config.offline or quant is None or not commit_id or is_commit_id(revision):
            return None
        found = left_behind(self.tiers.all, holder, repo_id, revision, commit_id, quant)
        return None if found is None else (found[0], found[1])

    def _check_completes_import(self, repo_id: str, revision: str, manifest: Manifest) -> set[str] | None:
        """A repo imported here is completed from the upstream's repo of its name only when that one holds
        each of its files, the same (a Hub download's folder a shard short): else it is another repo (the
        user's fine-tune kept under its base's id), and its pull would move the branch off the user's
        weights. NotFoundError then. Returns the imported revision's paths when it is completed so, else
        None."""
        try:
            if self.store.repo_summary(repo_id).origin != "import":
                return None
            commit_id = self.store.resolve(repo_id, revision)
        except NotFoundError:
            return None  # (not here, or not that revision: a pull adds it, moving nothing of the user's)
        upstream = {f.path: f for f in manifest.files}
        for entry in self.store.files(repo_id, commit_id):
            remote = upstream.get(entry.path)
            if remote is None or not (
                entry.sha256 == remote.sha256
                if remote.sha256 is not None
                else not entry.lfs and entry.git_oid == remote.git_oid
            ):
                raise NotFoundError(
                    f"{repo_id} was imported here, and the upstream's repo of that name is another ("
                    f"{entry.path} {'is not in it' if remote is None else 'differs'}): nothing is pulled into "
                    f"yours (`modeldepot pull {repo_id}` takes the upstream's in its place)",
                    repo_id=repo_id,
                )
        return {entry.path for entry in self.store.files(repo_id, commit_id)}

    @property
    def preloader(self) -> Preloader:
        """The RAM tier (created on first use: ``MODELDEPOT_PRELOAD_BUDGET``, default 50% of RAM, and
        ``MODELDEPOT_PRELOAD_STRATEGY``, default page-cache)."""
        if self._preloader is None:
            from modeldepot.preload import Preloader

            with self._made_lock:  # threads' first loads at once: one tier (the others' would be orphans)
                if self._preloader is None:
                    budget, strategy = self.config.preload_budget, self.config.preload_strategy
                    self._preloader = Preloader(self, budget, strategy)
        return self._preloader

    @property
    def has_preloader(self) -> bool:
        """Whether the RAM tier was made (:attr:`preloader` makes it on first use)."""
        return self._preloader is not None

    def use_preloader(self, preloader: Preloader) -> None:
        """Replace the RAM tier (a budget or strategy of the caller's choosing)."""
        with self._made_lock:
            replaced, self._preloader = self._preloader, preloader
        if replaced is not None and replaced is not preloader:
            replaced.close()
