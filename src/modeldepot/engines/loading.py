"""The steps of ``Depot.load``: find the variant's model file (pulling the variant when the store lacks it),
build the engine while the preloaded copy is held, warm it up, and keep it in the loaded-model cache.

Our own engines (onnxruntime, safetensors, torch) read from a private folder of hard links to the blobs:
onnxruntime resolves symlinks and refuses external data that "escapes" the model's folder, which the
snapshot's links into ``blobs/`` would. They have read or mapped everything when the load returns, so the
folder goes right after. A caller's own loader may read lazily: it gets the lasting snapshot path (but for an
ONNX model with external data beside it, which onnxruntime refuses through links: the folder of hard links,
for the call). So does
``gguf``, whose model names the files it maps (``GgufModel.files``); every shard of a split GGUF has its
blob checked first, as the folder of links would. On a read-only store (a read-only mount, another user's,
a shared one) no link can be made: onnxruntime gets the snapshot's folder with the files beside the model
handed over mapped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from modeldepot.enginekeys import engine_key
from modeldepot.engines.adapters import (
    ENGINES,
    EngineLoader,
    check_engine_installed,
    engine_kinds,
    load_onnxruntime,
    model_file,
    onnxruntime_version_lacking_data_in_memory,
    warmup,
)
from modeldepot.engines.cache import LoadedModelCache
from modeldepot.errors import (
    ConfigError,
    CorruptBlobError,
    DepotError,
    EngineMismatchError,
    InvalidInputError,
    NotFoundError,
    ReadOnlyStoreError,
    RepoNotFoundError,
    RevisionNotFoundError,
    VariantNotFoundError,
)
from modeldepot.hub.manifest import Manifest, kept_listing, listed_files
from modeldepot.hub.variants import (
    files_of_other_variants,
    gguf_shard_names,
    group_files,
    safetensors_shard_names,
)
from modeldepot.preload import Preloader
from modeldepot.store import Store
from modeldepot.validation import (
    is_commit_id,
    validate_path,
    validate_quant,
    validate_repo_id,
    validate_revision,
)

log = logging.getLogger(__name__)

__all__ = ["ChooseVariant", "PullVariant", "Pulled", "has_external_data", "load_variant"]

DEFAULT_SUFFIXES = (".onnx", ".safetensors", ".gguf", ".bin")
SNAPSHOT_ENGINES = frozenset({"gguf"})  # ours that get the lasting snapshot paths (the docstring says why)
ONNX_ENGINES = {"onnxruntime": False, "onnxruntime-prepacked": True}  # name -> prepack

Pulled = str | tuple[str, ...] | None
"""What a load pulls: a variant's name, just these paths, or (None) the whole repo."""

ChooseVariant = Callable[[Manifest, str | None], Pulled]
"""What a load of ``quant`` (or none) pulls of the scanned ``manifest``; raises when the commit holds no file
the engine loads there (:func:`default_variant`)."""

PullVariant = Callable[[str, str | None, str, ChooseVariant], str]
"""Pulls ``(repo_id, quant, revision, choose)`` into the store: what ``choose(manifest, quant)`` names
(:data:`Pulled`), once the repo is scanned. Returns the commit it published."""

MAX_WARMUPS = 1000  # warm-up passes a load may ask for: a few make an engine warm; a billion is a typo


def default_variant(suffixes: tuple[str, ...], file: str | None = None) -> ChooseVariant:
    """What a load pulls: the variant named, once the commit is known to hold a file of it the engine loads
    (a load of a GGUF repo's quant with the default engine pulled it whole, evicting other models to make
    room under a budget, and only then said it holds no .onnx: an explorer's trial). Without one, the variant
    holding the file :func:`model_file` would load (``file``, or fp32 first), not every variant (a GGUF repo's
    every quant is gigabytes nobody asked for). None when that file is in no variant (a repo of one model: it
    is pulled whole); but a ``file`` named that is in no variant is pulled with its own (its shards, its
    external data) and the shared files alone (every variant came with a custom engine's weights.pt: a
    review)."""

    def choose(manifest: Manifest, quant: str | None) -> Pulled:
        paths = [f.path for f in manifest.files]
        chosen = model_file(paths, quant, suffixes, file, holder=f"its commit {manifest.commit_id[:12]}")
        named = next((v.name for v in manifest.variants if chosen in v.files), None)
        if (
            quant is not None
        ):  # (by the commit's name of it: fp16 is the engine's onnx-fp16 or safetensors-fp16)
            return named or quant
        if named is not None or file is None:
            return named
        own = set(gguf_shard_names(chosen) or safetensors_shard_names(chosen) or ()) | {chosen}
        return tuple(
            sorted({p for p in paths if p in own or _is_external_data_of(p, chosen)} | set(manifest.shared))
        )

    return choose


def load_variant(
    store: Store,
    preloader: Preloader,
    cache: LoadedModelCache[Any],
    pull: PullVariant,
    offline: bool,
    repo_id: str,
    quant: str | None,
    revision: str,
    engine: str | EngineLoader,
    warmups: int,
    inputs: Mapping[str, Any] | None,
    owner: Store | None = None,
    file: str | None = None,
    healed: frozenset[str] = frozenset(),
    providers: tuple[str, ...] | None = None,
) -> Any:
    """A loaded, warmed-up engine for a variant, from ``cache`` or built now (see the module's docstring).
    ``owner``: the store of the depot that loads it, when ``store`` is a shared one it reads through (the
    cache key names the owner's: its depot lets go of the engine when the shared store removes the model).
    ``offline``: a variant missing from a revision the store holds is an error listing the ones it has.
    ``file``: the model file to load (a path in the repo), not the variant's plainest. A file found
    corrupt as it is read is pulled again and the load tried again (online), once for each blob (``healed``:
    those pulled again so far). ``providers``: onnxruntime's execution providers, in order (its engines only;
    keyed with them)."""
    validate_repo_id(repo_id)
    validate_revision(revision)
    if quant is not None:
        validate_quant(quant)
    if file is not None:
        validate_path(file)
    if isinstance(warmups, bool) or not isinstance(warmups, int) or not 0 <= warmups <= MAX_WARMUPS:
        # (10**9 passes hung the load, unsaid: an explorer's trial)
        raise InvalidInputError(f"warmup must be a number of passes, 0 to {MAX_WARMUPS}, not {warmups!r}")
    if inputs is not None and not isinstance(inputs, Mapping):  # (a list was only a warm-up's logged failure)
        raise InvalidInputError(f"inputs maps each input's name to its array, not {type(inputs).__name__}")
    loader, suffixes = _engine(engine)
    if providers is not None:
        if not isinstance(engine, str) or engine not in ONNX_ENGINES:
            raise InvalidInputError(f"providers are onnxruntime's: engine {engine!r} takes none")
        if not providers or not all(isinstance(p, str) and p for p in providers):
            raise InvalidInputError(
                f"providers must name onnxruntime's execution providers, not {providers!r}"
            )
        loader = functools.partial(load_onnxruntime, providers=list(providers), prepack=ONNX_ENGINES[engine])
    # (a caller's engine loads the file it is given, whatever its suffix; without one, a model file is looked for)
    looked_for = suffixes if file is not None else suffixes or DEFAULT_SUFFIXES
    commit_id, chosen = _locate(store, pull, offline, repo_id, quant, revision, looked_for, file)
    # The callable itself, not its name: two lambdas (or two factories' inner functions) share a
    # __qualname__ but build different engines. The same callable object hits the cache.
    # Ours load a split GGUF or a sharded checkpoint whole, whichever shard is named: one entry for it (named
    # by another shard, the model was loaded and counted twice: an explorer's trial)
    shards = (
        (gguf_shard_names(chosen) or safetensors_shard_names(chosen)) if isinstance(engine, str) else None
    )
    keyed = (
        engine if providers is None else (engine, providers)
    )  # (a session per providers: a GPU's, a CPU's)
    key: Hashable = engine_key(owner or store, repo_id, commit_id, shards[0] if shards else chosen, keyed)

    def build() -> Any:
        if isinstance(engine, str) and engine in SNAPSHOT_ENGINES:
            for shard in gguf_shard_names(chosen) or ():  # each blob there, with the right size
                store.file_path(repo_id, shard, commit_id)
        elif isinstance(engine, str):  # ours read everything at load: hard links suffice
            folder, _, name = chosen.rpartition("/")
            others = files_of_other_variants(chosen, (f.path for f in files))
            with (
                store.linked_folder(repo_id, commit_id, folder, others) as view,
                _refused_by(engine, view, folder),
            ):
                if store.read_only and engine in ONNX_ENGINES:  # (links to the blobs: handed over mapped)
                    return _onnx_from_mappings(
                        store, repo_id, commit_id, chosen, view / name, engine, others, providers
                    )
                return loader(view / name)
        if chosen.endswith(".onnx") and has_external_data(chosen, (f.path for f in files)):
            # (a caller's loader of an ONNX model with external data: onnxruntime refuses it through the snapshot's
            # links, an explorer's trial; so the folder of hard links, for the call, as ours get it)
            folder, _, name = chosen.rpartition("/")
            with store.linked_folder(
                repo_id, commit_id, folder, files_of_other_variants(chosen, (f.path for f in files))
            ) as view:
                return loader(view / name)
        return loader(store.file_path(repo_id, chosen, commit_id))

    @contextlib.contextmanager
    def _refused_by(engine: str, view: Path, folder: str) -> Iterator[None]:
        """An engine of ours that cannot load the file (onnxruntime's InvalidProtobuf, safetensors' own
        errors) says so as bad input naming the repo and the file, not a private folder gone by then."""
        try:
            yield
        except InvalidInputError as error:  # (ours, naming the file alone)
            raise InvalidInputError(f"{engine} could not load {chosen} of {repo_id}@{commit_id[:12]}: {error}",
                                    repo_id=repo_id) from None  # fmt: skip
        except (DepotError, OSError, MemoryError):
            raise
        except Exception as error:
            said = str(error).replace(str(view), f"{repo_id}@{commit_id[:12]}/{folder}".rstrip("/"))
            raise InvalidInputError(f"{engine} could not load {chosen} of {repo_id}@{commit_id[:12]}: "
                                    f"{type(error).__name__}: {said}") from error  # fmt: skip

    def load_and_warm() -> Any:
        started = time.perf_counter()
        # The preload that holds the file loaded: of the quant named, of the variant the file is in (a load
        # without a quant after a preload of "fp32" counted as cold, holding nothing), or of the whole revision
        preloads = dict.fromkeys([quant, named.name if named is not None else None, None])
        held = next(
            (
                preloader.get(repo_id, q, commit_id)
                for q in preloads
                if preloader.holds(repo_id, q, commit_id)
            ),
            None,
        )
        try:
            built = build()  # while the handle holds the preloaded copy, eviction cannot take it
        except Exception as error:
            if not isinstance(error, NotFoundError) and _gone(store, repo_id, commit_id, chosen):
                # (the engine's own error about a missing file, or a link to it that failed: an `rm` while
                # it loaded)
                raise NotFoundError(f"{repo_id}@{commit_id[:12]}: {chosen} was removed from the store while it "
                                    "was being loaded", repo_id=repo_id) from error  # fmt: skip
            if isinstance(error, InvalidInputError):
                _refuse_if_corrupt(store, repo_id, commit_id, chosen, error)
            raise
        finally:
            if held is not None:
                held.release()
        # (a private copy, `read` or `memfd`, is not what the engine read: counted cold, as it was, a trial)
        preloader.record_load(time.perf_counter() - started, held is not None and preloader.serves_loads)
        if warmups:
            warmup(built, warmups, inputs)
        return built

    files = store.files(repo_id, commit_id)
    grouping = group_files([f.path for f in files])
    # Counted under the variant's own name ("Q4F16" and "q4f16" are one model to preload), and without a
    # quant under the variant of the file chosen: a use of the whole repo made --preload-top preload every
    # quant of a GGUF repo when one of them was used.
    # (the chosen file's variant: a bare "fp16" is onnx-fp16 or safetensors-fp16, by the engine)
    named = next((v for v in grouping.variants if chosen in v.files), None) or (
        grouping.find(quant) if quant else None
    )
    if not healed:  # (a load tried again after a heal is the same use: counted once, review 41)
        store.access.record(repo_id, named.name if named is not None else quant, commit_id=commit_id)
    # What it takes in memory, about: the model file and what is loaded with it (its external data, its
    # shards), for the cache's memory budget to make room before the load (the process's growth measured
    # over a load said 190 MiB of a 22 MiB model whose engine was imported then, 0.8 MiB of a mapped one).
    companions = set(gguf_shard_names(chosen) or safetensors_shard_names(chosen) or ()) | {chosen}
    if named is not None and named.kind == "onnx" and chosen in named.files:
        # Its external data, whatever its names; not the variant's other graphs (an encoder-decoder export's
        # encoder and merged decoder beside the decoder loaded: charged 2.25 times its size, a trial)
        graphs = [path for path in named.files if path.endswith(".onnx") and path != chosen]
        companions |= {
            path for path in named.files
            if path not in graphs and not any(_is_external_data_of(path, graph) for graph in graphs)
        }  # fmt: skip
    size = sum(f.size for f in files if f.path in companions or _is_external_data_of(f.path, chosen))
    try:
        return cache.get_or_load(key, load_and_warm, size)
    except CorruptBlobError as corrupt:
        if offline or store.read_only or corrupt.sha256 in healed:
            raise
        # A file the load read found corrupt (quarantined now): a blob the check after a restart had not reached
        # yet, a shared file (a config torn by a power loss failed every load for good, where a model file was
        # pulled again; a load failed or healed by the race with the check: an explorer's trial). Its files are
        # pulled again, once each, and the load goes on; a pull that fails leaves the error as it was.
        torn = tuple(f.path for f in files if f.sha256 == corrupt.sha256)
        if not torn:
            raise
        log.warning("%s@%s: %s: pulling it again", repo_id, commit_id[:12], corrupt)
        try:
            pull(repo_id, None, commit_id, lambda _manifest, _quant: torn)
        except DepotError as failed:
            raise corrupt from failed
        return load_variant(store, preloader, cache, pull, offline, repo_id, quant, revision, engine, warmups,
                            inputs, owner, file, healed | {corrupt.sha256}, providers)  # fmt: skip


def _refuse_if_corrupt(store: Store, repo_id: str, commit_id: str, chosen: str, error: Exception) -> None:
    """An engine refused the file: its bytes (and those loaded with it) are checked against their digests, and
    a blob that fails is quarantined and raised as corrupt. The engines read files from the disk, unchecked
    (at storage speed); a file written in place with its mtime put back (through an adopted cache's link)
    passed every look, and its load said "invalid input" of a model the store held corrupt (a trial)."""
    loaded = set(gguf_shard_names(chosen) or safetensors_shard_names(chosen) or ()) | {chosen}
    for entry in store.files(repo_id, commit_id):
        if entry.path not in loaded and not _is_external_data_of(entry.path, chosen):
            continue
        rows = store.index.read("SELECT size, chunk_size, created_at FROM blobs WHERE sha256 = ? AND state = 'ok'",
                                (entry.sha256,))  # fmt: skip
        if not rows:
            continue
        found = store.check_blob(entry.sha256, rows[0]["size"], rows[0]["chunk_size"])
        if found is not None:
            store.quarantine(entry.sha256, rows[0]["created_at"])
            raise CorruptBlobError(entry.sha256, f"{entry.path} of {repo_id}@{commit_id[:12]}: {found[1]}; the "
                                   f"engine refused it: {error}", kept_in_place=store.read_only) from error  # fmt: skip


def _is_external_data_of(path: str, model: str) -> bool:
    """Whether ``path`` is ONNX external data of ``model`` (``model.onnx_data``, ``model.onnx.data``)."""
    return model.endswith(".onnx") and path.startswith(model) and path != model


def _engine(engine: str | EngineLoader) -> tuple[EngineLoader, tuple[str, ...]]:
    if isinstance(engine, str):
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)} or a callable")
        check_engine_installed(
            engine
        )  # (before a pull, or room made in the cache, for a load that must fail)
        return ENGINES[engine]
    if not callable(engine):
        raise ConfigError(
            f"engine must be one of {', '.join(ENGINES)} or a callable, not {type(engine).__name__}"
        )
    if inspect.iscoroutinefunction(engine):  # (its coroutine was cached, unawaited, as the engine)
        raise ConfigError("engine must be a plain callable that builds the engine, not a coroutine function: "
                          "load() runs it on the calling thread (wrap an async builder with asyncio.run)")  # fmt: skip
    return engine, ()


def _onnx_from_mappings(
    store: Store,
    repo_id: str,
    commit_id: str,
    chosen: str,
    path: Path,
    engine: str,
    others: Collection[str],
    providers: tuple[str, ...] | None = None,
) -> Any:
    """(A read-only store, where no hard link can be made: a read-only mount, another user's, a shared
    one.) An onnxruntime session for ``path`` in the
    snapshot, the files beside the model handed over mapped, by the names the model gives them: it refuses
    external data behind links that lead out of the model's folder. onnxruntime copies the weights it
    uses while the session is made (a private copy, not the page cache's)."""
    version = onnxruntime_version_lacking_data_in_memory()
    if version is not None:
        raise ReadOnlyStoreError(
            f"{repo_id}@{commit_id[:12]}: loading {chosen} from the store at {store.home}, which is "
            f"{store.read_only_reason}, needs onnxruntime 1.23 or later (this is {version}): older ones take "
            "external data only from real files beside the model, and that store can give links only"
        )
    folder = chosen.rpartition("/")[0]
    prefix = f"{folder}/" if folder else ""
    with contextlib.ExitStack() as held:
        beside: dict[str, memoryview] = {}
        for entry in store.files(repo_id, commit_id):
            name = entry.path[len(prefix) :]
            # (the model itself, another graph, or another variant's file)
            skipped = entry.path == chosen or name.endswith(".onnx") or entry.path in others
            if not entry.path.startswith(prefix) or skipped:
                continue
            try:
                mapping = store.map(entry)
            except (CorruptBlobError, NotFoundError):
                if "/" not in name:
                    raise  # the folder's own files: the model's external data among them
                continue  # (a subfolder's: linked_folder's rule)
            if mapping is not None:
                held.callback(mapping.close)
                view = memoryview(mapping)
                held.callback(view.release)
                beside[name] = view
        return load_onnxruntime(
            path, list(providers) if providers else None, prepack=ONNX_ENGINES[engine], external_data=beside
        )


def _gone(store: Store, repo_id: str, commit_id: str, chosen: str) -> bool:
    """Whether the file a load chose is no longer in its revision (an `rm`, or `rm --quant`, meanwhile)."""
    return not store.index.read(
        "SELECT 1 FROM files WHERE repo_id = ? AND commit_id = ? AND path = ?", (repo_id, commit_id, chosen)
    )


def _lacking(
    store: Store, repo_id: str, commit_id: str, quant: str | None, suffixes: tuple[str, ...]
) -> list[str]:
    """The variant's own files that its commit's listing names and the store lacks (a cache adopted from
    an ``allow_patterns`` download, an interrupted pull): loaded without them, an ONNX model's external
    data is a raw onnxruntime error. Nothing when the commit's listing is not known."""
    try:
        record = store.manifests.load(repo_id)
    except NotFoundError:
        return []
    if record.commit_id != commit_id:
        return []
    grouping = group_files(f.path for f in listed_files(record))
    variant = (
        grouping.find_for(quant, engine_kinds(suffixes))
        if quant
        else next((v for v in grouping.variants if v.name == "fp32"), None)
    )
    if variant is None:
        return []
    held = set(_held_paths(store, repo_id, commit_id))
    return sorted(set(variant.files) - held)


def saved_listing(store: Store, repo_id: str, commit_id: str) -> list[str] | None:
    """The commit's whole listing, as the repo's saved scan of that commit has it; None without one."""
    try:
        record = store.manifests.load(repo_id)
    except NotFoundError:
        return None
    return [f.path for f in listed_files(record)] if record.commit_id == commit_id else None


def _listing_lacks_it_too(store: Store, repo_id: str, commit_id: str, quant: str | None,
                          suffixes: tuple[str, ...], file: str | None = None) -> NotFoundError | None:  # fmt: skip
    """What the commit's whole listing (the repo's saved scan, of that commit) lacks of the file the engine
    would load (a wrong engine or variant, a shard the repo never had), which no pull of that commit mends;
    None when it has it, or the store has no listing of that commit."""
    listed = saved_listing(store, repo_id, commit_id)
    if listed is None:
        return None
    try:
        model_file(listed, quant, suffixes, file, holder=f"its commit {commit_id[:12]}")
    except NotFoundError as lacking:
        return lacking
    return None


def _listing_has_it(store: Store, repo_id: str, commit_id: str, suffixes: tuple[str, ...],
                    quant: str | None = None) -> bool:  # fmt: skip
    """Whether the commit's whole listing (the repo's saved scan, of that commit) has a model file in the
    engine's format (``suffixes``): the variant ``quant``'s, or its default variant's."""
    listed = saved_listing(store, repo_id, commit_id)
    if listed is None:
        return False
    try:
        model_file(listed, quant, suffixes, None, holder="its commit")
    except NotFoundError:
        return False
    return True


def _locate(store: Store, pull: PullVariant, offline: bool, repo_id: str, quant: str | None, revision: str,
            suffixes: tuple[str, ...], file: str | None = None) -> tuple[str, str]:  # fmt: skip
    """(commit, model file) of the variant, pulling it first when the store lacks it (an imported repo
    too, when the upstream's repo of its name holds its files: see ``Depot.load``). When the pull fails,
    the error says first what the store lacks (the variants it has, the engine its files need), then why
    the pull failed."""
    here: NotFoundError | None = None
    not_held: NotFoundError | None = None  # (the repo is not here)
    try:
        commit_id: str | None = store.resolve(repo_id, revision)
    except RevisionNotFoundError as lacking:  # the repo is here, not that revision of it
        commit_id, here = None, lacking
    except NotFoundError as missing:
        commit_id, not_held = None, missing
    if commit_id is not None:
        try:
            held = _held_paths(store, repo_id, commit_id)
            found = model_file(held, quant, suffixes, file)
            # (a file named: its own variant's files, not fp32's, which a load of it does not need)
            of_file = (
                next((v.name for v in group_files(held).variants if found in v.files), None) if file else None
            )
            absent = _lacking(store, repo_id, commit_id, quant or of_file, suffixes)
            if not absent:
                return commit_id, found
            # (without a variant named: the ones held, which a load can take; an offline worker baked with one
            # quant was told only what its default variant lacked)
            grouping = group_files([*held, *absent])
            others = ", ".join(v.name for v in group_files(held).variants if not set(v.files) & set(absent))
            # (none when a shared file is what lacks: every variant lacks it too)
            others = others if quant is None and not set(absent) & set(grouping.shared) else ""
            raise NotFoundError(f"{repo_id}@{commit_id[:12]} holds {quant or 'its model'} in part: it lacks "
                                f"{', '.join(absent[:3])}{' and more' if len(absent) > 3 else ''}"
                                + (f"; it holds the variants {others}: name one (quant=...)" if others else ""))  # fmt: skip
        except NotFoundError as missing:
            if (isinstance(missing, EngineMismatchError) and not _lacking(store, repo_id, commit_id, quant, suffixes)
                    and not (file is None and _listing_has_it(store, repo_id, commit_id, suffixes, quant))):  # fmt: skip
                # The variant is here whole, its files another engine's: no pull changes that (a load with the
                # wrong engine= waited 30 s on an upstream that did not answer, then blamed the network: an
                # explorer's trial). Unless no variant was named and the commit has one in the engine's format:
                # it is pulled, as a store that held none would (the store held an ONNX variant, and
                # load(engine="safetensors") said the repo had no .safetensors file: an explorer's trial)
                raise
            if (
                offline
                and quant is not None
                and not is_commit_id(revision)
                and (older := held_at_another_commit(store, repo_id, revision, commit_id, quant, suffixes))
            ):
                log.warning("%s: %s at %s does not hold %s whole; loading it from %s, an older revision that does "
                            "(offline: the branch's is not pulled)", repo_id, revision, commit_id[:12], quant,
                            older[0][:12])  # fmt: skip
                return older
            if offline:  # (said: "no variant 'Q8_0' here" read as a repo without it, not a pull not tried)
                # (a variant the store lacks stays one: `except VariantNotFoundError` missed it, an explorer's trial)
                kind = VariantNotFoundError if isinstance(missing, VariantNotFoundError) else NotFoundError
                raise kind(f"{missing}; offline (HF_HUB_OFFLINE or MODELDEPOT_OFFLINE): nothing was pulled",
                           repo_id=repo_id) from None  # fmt: skip
            # (only for a commit id: a pull of a branch scans it again, and it may have moved on)
            if is_commit_id(revision) and (
                absent_there := _listing_lacks_it_too(store, repo_id, commit_id, quant, suffixes, file)
            ):
                raise absent_there from None  # nothing a pull would bring: the error says what there is
            here = missing
    elif offline and here is not None:
        raise here
    try:
        commit_id = pull(repo_id, quant, revision, default_variant(suffixes, file))
    except DepotError as error:
        if not_held is not None and isinstance(error, ReadOnlyStoreError):
            # (a model a read-only image lacks, or a typo: a NotFoundError naming the repo, as on any store,
            # not only "it pulls nothing", which `except NotFoundError` missed: an explorer's trial)
            raise RepoNotFoundError(repo_id, f"{not_held}; {error}") from error
        if here is None or isinstance(error, EngineMismatchError):  # (the engine's mismatch: nothing to add)
            raise
        if str(error) == str(here):  # (the scan says what the store said: once is enough)
            raise here from None
        if isinstance(error, VariantNotFoundError) and isinstance(here, VariantNotFoundError):
            raise error from None  # (the commit's variants, which hold the store's: the two lists said once)
        raise NotFoundError(f"{here}; pulling it failed too: {error}", repo_id=repo_id) from error
    if absent_there := _listing_lacks_it_too(store, repo_id, commit_id, quant, suffixes, file):
        raise absent_there  # (the store has what the commit has: "the store lacks" sent users to pull again)
    return commit_id, model_file(_held_paths(store, repo_id, commit_id), quant, suffixes, file)


def held_at_another_commit(
    store: Store,
    repo_id: str,
    branch: str,
    commit_id: str,
    quant: str,
    suffixes: tuple[str, ...] = DEFAULT_SUFFIXES,
) -> tuple[str, str] | None:
    """(commit, model file) of the newest revision ``branch`` (at ``commit_id``) left behind in ``store`` that
    holds variant ``quant`` whole, or None: :func:`left_behind`, of one store."""
    found = left_behind([store], store, repo_id, branch, commit_id, quant, suffixes)
    return None if found is None else (found[1], found[2])


def left_behind(
    stores: Sequence[Store],
    holder: Store,
    repo_id: str,
    branch: str,
    commit_id: str,
    quant: str,
    suffixes: tuple[str, ...] = DEFAULT_SUFFIXES,
) -> tuple[Store, str, str] | None:
    """(store, commit, model file) of the newest revision ``branch`` (at ``commit_id``, held by ``holder``)
    left behind that holds variant ``quant`` whole, or None; only when that commit has the variant too (by
    its listing: one the upstream dropped stays an error). Left behind: a commit the branch named before it
    moved (``ref_history``), in any store, or the one it names in another store (a shared store's baked
    one, the own store's branch moved on); of one commit, the first store's (the own). A pull of another
    variant moves the branch to the upstream's new commit and leaves behind a variant the upstream changed
    since: `path -q` and an offline load of it failed while its bytes were on disk (explorers' trials).
    Never another branch's, a pull request's, nor a commit pulled by its id (reviews)."""
    listed = kept_listing(holder, holder.spelled(repo_id), commit_id)
    wanted = (
        None
        if listed is None
        else group_files(f.path for f in listed).find_for(quant, engine_kinds(suffixes))
    )
    if wanted is None:
        return None
    candidates: dict[str, tuple[float, int, Store, str]] = {}  # commit -> (when left, -rank, store, spelled)
    for rank, store in enumerate(stores):
        spelled = store.spelled(repo_id)
        try:
            seen = store.left_behind_by(spelled, branch)
            if store is not holder:
                with contextlib.suppress(NotFoundError):
                    seen.append((store.resolve(spelled, branch), store.ref_time(spelled, branch) or 0.0))
        except NotFoundError:
            continue
        for other, when in seen:
            if other != commit_id and other not in candidates:  # (of one commit, the first store's)
                candidates[other] = (when, -rank, store, spelled)
    for other, (_when, _rank, store, spelled) in sorted(
        candidates.items(), key=lambda c: c[1][:2], reverse=True
    ):
        try:
            held = _held_paths(store, spelled, other)
            found = model_file(held, quant, suffixes)
        except NotFoundError:
            continue
        its_listing = kept_listing(store, spelled, other)
        if its_listing is not None:  # (whole by its commit's listing: a split model's every shard, its data)
            variant = group_files(f.path for f in its_listing).find_for(quant, engine_kinds(suffixes))
            if variant is None or set(variant.files) - set(held):
                continue
        elif any(_is_external_data_of(path, found) and path not in held for path in wanted.files):
            # Without its listing, an ONNX model whose external data the branch's commit has beside it, held
            # without it: its load was onnxruntime's raw error (a review). Split shards are checked by name.
            continue
        return store, other, found
    return None


def _held_paths(store: Store, repo_id: str, commit_id: str) -> list[str]:
    """The paths of a commit the store holds, but those whose blob was found corrupt (quarantined): a load
    pulls them again, as a missing one (a scrub's find kept failing an inference worker's every load until
    someone pulled by hand, an explorer's trial). None is a removal under the load (an ``rm`` as it resolved
    or pulled), said so, not as a repo with no model file in it (a trial)."""
    try:
        entries = store.revision_files(repo_id, commit_id)
    except RevisionNotFoundError:
        raise NotFoundError(f"{repo_id}@{commit_id[:12]} was removed from the store while it was being loaded",
                            repo_id=repo_id) from None  # fmt: skip
    quarantined = _quarantined(store, {f.sha256 for f in entries})
    return [f.path for f in entries if f.sha256 not in quarantined]


def _quarantined(store: Store, blobs: set[str]) -> set[str]:
    """Those of ``blobs`` the store holds quarantined (found corrupt)."""
    wanted, found = sorted(blobs), set[str]()
    for start in range(0, len(wanted), 500):  # (SQLite's bound on parameters)
        part = wanted[start : start + 500]
        found.update(row["sha256"] for row in store.index.read(
            f"SELECT sha256 FROM blobs WHERE state != 'ok' AND sha256 IN ({','.join('?' * len(part))})",
            tuple(part)))  # fmt: skip
    return found


def has_external_data(model: str, paths: Iterable[str]) -> bool:
    """Whether the ONNX ``model`` has external data beside it by the exporters' naming (``model.onnx_data``,
    ``model.onnx_data_1``, ``model.onnx.data``: :func:`_is_external_data_of`). (Not any file beside it: a
    caller's loader reading a tokenizer beside the model lazily got a folder gone by then, a review.)"""
    return any(_is_external_data_of(path, model) for path in paths)
