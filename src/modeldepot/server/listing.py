"""Listings the Hub's clients page through: ``GET /api/models`` and ``GET /api/models/{repo}/commits/{rev}``.

Query parameters are read as huggingface_hub (``HfApi.list_models``, ``list_repo_commits``) and huggingface.js
(``listModels``, ``listCommits``, ``countCommits``) send them; the answers are pages chained by
``Link: <url>; rel="next"``, which both clients follow. Everything here runs on a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import html
import json
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

from modeldepot.config import truthy
from modeldepot.depot import Depot
from modeldepot.engines.gguf_header import gguf_summary
from modeldepot.errors import CorruptBlobError, DepotError, InvalidInputError, NotFoundError
from modeldepot.hub.variants import gguf_shard_names, is_gguf_model, safetensors_shard_names
from modeldepot.server.views import (
    COMMIT_AUTHOR,
    COMMIT_TITLE,
    MODEL_PROPERTIES,
    RevisionView,
    hub_tags,
    iso_time,
    model_properties,
    select_properties,
    stored_view,
)
from modeldepot.store import FileEntry, RepoSummary, Store
from modeldepot.store.history import commit_history
from modeldepot.validation import tensor_elements

__all__ = [
    "COMMITS_PAGE",
    "COMMITS_PAGE_MAX",
    "LIST_PAGE",
    "CommitQuery",
    "ModelQuery",
    "commits_page",
    "expand_names",
    "head",
    "model_config",
    "models_page",
]

LIST_PAGE = 1000  # the most models a page of /api/models holds (and how many without ``limit``)
COMMITS_PAGE = 50  # the Hub's commits per page without ``limit``; at most COMMITS_PAGE_MAX
COMMITS_PAGE_MAX = 1000

# What a listed model has without ``expand``: the Hub's listing fields, then what ``full`` adds.
LISTED = ("_id", "id", "likes", "trendingScore", "private", "downloads", "tags", "pipeline_tag",
          "library_name", "createdAt", "modelId")  # fmt: skip
LISTED_FULL = (*LISTED, "author", "gated", "lastModified", "sha", "disabled", "siblings")

# sort= names (the Hub's, and the snake_case ones older clients send) -> the property sorted on.
SORTS = {
    "id": "id", "modelId": "id",
    "createdAt": "createdAt", "created_at": "createdAt",
    "lastModified": "lastModified", "last_modified": "lastModified",
    "downloads": "downloads", "downloadsAllTime": "downloads",
    "likes": "likes", "likes7d": "likes", "likes30d": "likes",
    "trendingScore": "trendingScore", "trending_score": "trendingScore", "trending": "trendingScore",
}  # fmt: skip

# Filters the Hub evaluates from data a node does not have (inference providers, the apps that run a model,
# parameter counts): refused with a 400 that says so, rather than answered with a list that is wrong.
UNSUPPORTED = ("apps", "inference", "inference_provider", "num_parameters")

CONFIG_FILES_MAX = 1 << 20  # config.json / tokenizer_config.json larger than this are not read
TOKENIZER_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                  "chat_template")  # fmt: skip


def _values(query: MultiMapping[str], name: str) -> list[str]:
    """Every value of ``name`` and ``name[]``, comma-separated lists split, empty ones dropped."""
    found = [*query.getall(name, []), *query.getall(f"{name}[]", [])]
    return [part.strip() for value in found for part in value.split(",") if part.strip()]


def _positive(query: MultiMapping[str], name: str, default: int, cap: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidInputError(f"{name} must be a positive integer, not {text!r}") from None
    if value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, not {text!r}")
    return min(value, cap)


def expand_names(query: MultiMapping[str]) -> tuple[str, ...]:
    """The properties ``expand`` / ``expand[]`` asks for; a name the Hub does not know is a 400."""
    names = tuple(dict.fromkeys(_values(query, "expand")))
    unknown = [name for name in names if name not in MODEL_PROPERTIES]
    if unknown:
        raise InvalidInputError(
            f"expand: unknown model properties {', '.join(unknown)} (known: {', '.join(sorted(MODEL_PROPERTIES))})"
        )
    return names


def _encode_cursor(key: float | str, repo_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([key, repo_id]).encode()).decode().rstrip("=")


def _decode_cursor(text: str, numeric: bool) -> tuple[float | str, str]:
    """The (sort key, repo id) of the last model of the previous page; anything else is a 400."""
    try:
        key, repo_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise InvalidInputError("cursor is not one this node sent") from None
    if isinstance(repo_id, str) and not isinstance(key, bool):
        if numeric and isinstance(key, (int, float)):
            try:
                value = float(key)
            except OverflowError:  # an integer past any float: no sort key this node sent
                raise InvalidInputError("cursor is not one this node sent") from None
            if math.isfinite(value):
                return value, repo_id
        if not numeric and isinstance(key, str):
            return key, repo_id
    raise InvalidInputError("cursor is not one this node sent")


@dataclass(frozen=True)
class ModelQuery:
    """``GET /api/models``: which models, in which order, from where, and which properties of each."""

    author: str | None
    search: str | None
    tags: tuple[str, ...]  # every one must be among the model's tags
    pipeline_tag: str | None
    gated: bool | None
    sort: str  # a value of SORTS
    descending: bool
    page_size: int
    cursor: tuple[float | str, str] | None
    properties: tuple[str, ...]

    @classmethod
    def parse(cls, query: MultiMapping[str]) -> ModelQuery:
        for name in UNSUPPORTED:
            if query.get(name):
                raise InvalidInputError(f"{name}: this node does not know which models match it")
        sort_name = query.get("sort") or "trendingScore"  # the Hub's default order: trending first
        if sort_name not in SORTS:
            raise InvalidInputError(f"sort must be one of {', '.join(SORTS)}, not {sort_name!r}")
        sort = SORTS[sort_name]
        direction = query.get("direction", "-1")
        if direction not in ("-1", "1"):
            raise InvalidInputError(f"direction must be -1 (descending) or 1 (ascending), not {direction!r}")
        gated = query.get("gated")
        expand = expand_names(query)
        if expand:  # only these (the Hub ignores full, config and cardData then)
            properties: tuple[str, ...] = ("_id", "id", *expand)
        else:
            properties = LISTED_FULL if truthy(query.get("full")) else LISTED
            properties += tuple(name for name in ("config", "cardData") if truthy(query.get(name)))
        cursor = query.get("cursor")
        return cls(
            author=query.get("author") or None,
            search=(query.get("search") or "").lower() or None,
            tags=tuple(_values(query, "filter") + _values(query, "library")),
            pipeline_tag=query.get("pipeline_tag") or None,
            gated=None if gated is None or not gated.strip() else truthy(gated),
            sort=sort,
            descending=direction == "-1",
            page_size=_positive(query, "limit", LIST_PAGE, LIST_PAGE),
            cursor=_decode_cursor(cursor, sort != "id") if cursor else None,
            properties=properties,
        )

    def matches(self, summary: RepoSummary) -> bool:
        repo_id, card = summary.repo_id, summary.card
        return (
            (self.author is None or repo_id.split("/")[0] == self.author)
            and (self.search is None or self.search in repo_id.lower())
            and (self.pipeline_tag is None or card.get("pipeline_tag") == self.pipeline_tag)
            and (self.gated is None or bool(card.get("gated", False)) == self.gated)
            and set(self.tags) <= set(hub_tags(card))
        )

    def key(self, summary: RepoSummary) -> float | str:
        if self.sort == "id":
            return summary.repo_id
        if self.sort == "createdAt":
            return summary.created_at
        if self.sort == "lastModified":
            return summary.updated_at
        return 0  # downloads, likes, trending: the node counts none of them

    def after(self, summary: RepoSummary, cursor: tuple[float | str, str]) -> bool:
        """Whether the model comes after the cursor's in this order (ties go by repo id, ascending)."""
        key, repo_id = self.key(summary), summary.repo_id
        if key == cursor[0]:
            return repo_id > cursor[1]
        return key < cursor[0] if self.descending else key > cursor[0]  # type: ignore[operator]


def head(store: Store, summary: RepoSummary) -> tuple[str, float]:
    """The revision a listing describes: the default branch's, or the newest one of a repo without it."""
    revisions = store.revisions(summary.repo_id)
    when = dict(revisions)
    commit_id = summary.refs.get("main", revisions[0][0] if revisions else "")
    return commit_id, when.get(commit_id, summary.updated_at)


def _read_json(store: Store, repo_id: str, commit_id: str, path: str) -> dict[str, Any] | None:
    """A small JSON object of a revision, read through the chunk checks; None if absent, big or not JSON."""
    try:
        entry = store.entry(repo_id, path, commit_id)
        if entry.size > CONFIG_FILES_MAX:
            return None
        data = b"".join(
            bytes(store.chunk(entry, i)) for i in range(max(1, -(-entry.size // entry.chunk_size)))
        )
        found = json.loads(data)
    except (
        NotFoundError,
        CorruptBlobError,
        ValueError,
        RecursionError,
    ):  # absent (a mirror's miss too), or bad
        return None
    return found if isinstance(found, dict) else None


def model_config(store: Store, repo_id: str, commit_id: str) -> dict[str, Any] | None:
    """The ``config`` property, as the Hub derives it: ``architectures`` and ``model_type`` from
    config.json, the special tokens and chat template from tokenizer_config.json."""
    config = _read_json(store, repo_id, commit_id, "config.json") or {}
    found: dict[str, Any] = {k: config[k] for k in ("architectures", "model_type") if k in config}
    tokenizer = _read_json(store, repo_id, commit_id, "tokenizer_config.json") or {}
    special = {k: tokenizer[k] for k in TOKENIZER_KEYS if k in tokenizer}
    if special:
        found["tokenizer_config"] = special
    return found or None


SAFETENSORS_HEADER_MAX = 100 << 20  # bytes of a safetensors header read at most (the format's own bound)
# (home, repo, commit, the weights' paths listed, those held with their digests) -> what was read: the files
# held make the key (a shard pulled since is another sum), and a failure is not kept (a file quarantined,
# then pulled again: a review)
# Commits whose derived properties are kept, at most (then all are read again): a listing of every model with
# expand=safetensors reads one header per commit, 15-30 ms each, and a cache of 1,024 read a store of more
# again at every page (a review)
CACHED_COMMITS = 1 << 16
_PARAMETERS: dict[tuple[Any, ...], dict[str, Any] | None] = {}


SAFETENSORS_INDEX = "model.safetensors.index.json"


def counted_safetensors(paths: Iterable[str], indexed: Iterable[str] = ()) -> list[str]:
    """The safetensors files whose parameters a commit has: its transformers model when the root holds one
    (the shards of ``model.safetensors.index.json``: ``indexed``, its weight map's files, when it was read,
    else the files named as shards; else ``model.safetensors``), as huggingface_hub's
    ``get_safetensors_metadata`` reads it; a copy of the same weights beside it (Mistral's
    ``consolidated.safetensors``, a checkpoint in a folder, an older sharding's files) is not counted twice.
    Otherwise every safetensors file: a diffusers pipeline's components, an adapter."""
    listed = set(paths)
    named = sorted(set(indexed))
    if named and SAFETENSORS_INDEX in listed and listed.issuperset(named):
        return named
    # (a transformers model's shards at the root, as huggingface_hub's serialization names them)
    shards = sorted(p for p in listed if p.startswith("model-") and safetensors_shard_names(p) is not None)
    if shards and SAFETENSORS_INDEX in listed:
        return shards
    if "model.safetensors" in listed:
        return ["model.safetensors"]
    return shards or sorted(p for p in listed if p.endswith(".safetensors"))


def safetensors_info(
    store: Store, repo_id: str, commit_id: str, listed: Iterable[str]
) -> dict[str, Any] | None:
    """The ``safetensors`` property, as the Hub derives it: the parameters by dtype, and their total, of the
    commit's weights (:func:`counted_safetensors` of ``listed``, the commit's every path), from the headers of
    the files (read through the chunk checks, once per commit). None when it has none, the store does not
    hold them all (a sum of part would be wrong: a revision held in part, or that a mirror has not pulled),
    or one is unreadable."""

    def weights(path: str) -> bool:
        return path.endswith(".safetensors") or path == SAFETENSORS_INDEX

    listed = {path for path in listed if weights(path)}
    held = {e.path: e for e in store.files(repo_id, commit_id) if weights(e.path)}
    # (looked up before the index is read: model info asked it, and hashed it, on every call)
    key = (
        str(store.home),
        repo_id,
        commit_id,
        tuple(sorted(listed)),
        tuple(sorted((p, e.sha256) for p, e in held.items())),
    )
    if key in _PARAMETERS:
        return _PARAMETERS[key]
    with _read_once(key):
        if key not in _PARAMETERS:  # (read once, whatever asks at once)
            _parameters_read(store, repo_id, commit_id, listed, held, key)
    return _PARAMETERS.get(key)


def _parameters_read(store: Store, repo_id: str, commit_id: str, listed: set[str], held: dict[str, FileEntry],
                     key: tuple[str, str, str, tuple[str, ...], tuple[tuple[str, str], ...]]) -> None:  # fmt: skip
    indexed: list[str] = []
    if SAFETENSORS_INDEX in listed:
        weight_map = (_read_json(store, repo_id, commit_id, SAFETENSORS_INDEX) or {}).get("weight_map")
        if isinstance(weight_map, dict):
            indexed = [name for name in weight_map.values() if isinstance(name, str)]
    counted = counted_safetensors(listed, indexed)
    if not counted or any(path not in held for path in counted):
        return
    entries = [held[path] for path in counted]
    parameters: dict[str, int] = {}
    try:
        for entry in entries:
            for dtype, count in _safetensors_parameters(store, entry).items():
                parameters[dtype] = parameters.get(dtype, 0) + count
    except (NotFoundError, CorruptBlobError):
        return  # (not kept: a file gone or corrupt now may be pulled again)
    except (ValueError, RecursionError, KeyError, TypeError):
        parameters = {}  # (a file that is no safetensors: so it stays)
    found = {"parameters": parameters, "total": sum(parameters.values())} if parameters else None
    if len(_PARAMETERS) >= CACHED_COMMITS:
        _PARAMETERS.clear()
    _PARAMETERS[key] = found


_GGUF: dict[tuple[str, str, str, tuple[str, ...]], dict[str, Any] | None] = {}  # (as _PARAMETERS) -> gguf
# A commit's headers being read -> the lock its readers take, and how many hold or wait for it
_BEING_READ: dict[tuple[Any, ...], tuple[threading.Lock, list[int]]] = {}
_BEING_READ_GUARD = threading.Lock()


@contextlib.contextmanager
def _read_once(key: tuple[Any, ...]) -> Iterator[None]:
    """Held while a commit's model headers are read: whoever asks for them at once waits for the one read
    (eight reads at once of a hostile file took a node's memory, an explorer's trial), and a read of another
    commit goes on beside (one lock for all held model info of every repo behind a slow read, a review). The
    lock goes when no one holds or waits for it (gone as a woken waiter had yet to take it, four read at
    once: a review)."""
    with _BEING_READ_GUARD:
        lock, users = _BEING_READ.setdefault(key, (threading.Lock(), [0]))
        users[0] += 1
    try:
        with lock:
            yield
    finally:
        with _BEING_READ_GUARD:
            users[0] -= 1
            if not users[0]:
                del _BEING_READ[key]


def gguf_info(store: Store, repo_id: str, commit_id: str) -> dict[str, Any] | None:
    """The ``gguf`` property, as the Hub derives it, from the first GGUF model of the commit the store holds
    (a split one's every shard): its parameters (``total``), ``architecture``, ``context_length``,
    ``chat_template``, ``bos_token`` and ``eos_token``, as its metadata has them. None when it has none,
    one is unreadable. Read once per commit."""
    held = {e.path: e.sha256 for e in store.files(repo_id, commit_id) if e.path.endswith(".gguf")}
    key = (str(store.home), repo_id, commit_id, tuple(held.values()))
    if key in _GGUF:
        return _GGUF[key]
    with _read_once(key):
        if key not in _GGUF:
            _gguf_read(store, repo_id, commit_id, held, key)
    return _GGUF.get(key)


def _gguf_read(store: Store, repo_id: str, commit_id: str, held: dict[str, str],
               key: tuple[str, str, str, tuple[str, ...]]) -> None:  # fmt: skip
    found: dict[str, Any] | None = None
    models = sorted(path for path in held if is_gguf_model(path))
    shards = (gguf_shard_names(models[0]) or models[:1]) if models else []
    try:
        if shards:
            # (its header walked for these few values alone: the gguf package's reader made objects of every
            # element of every array, a million empty strings 18 s and 1.6 GB a read, an explorer's trial)
            paths = [store.file_path(repo_id, shard, commit_id) for shard in shards]
            found = gguf_summary(paths).properties()
    except (NotFoundError, CorruptBlobError, OSError):
        return  # (not kept: a shard gone or corrupt now may be pulled again)
    except (DepotError, ValueError, TypeError):
        found = None  # (no GGUF: so it stays)
    if len(_GGUF) >= CACHED_COMMITS:
        _GGUF.clear()
    _GGUF[key] = found


def _safetensors_parameters(store: Store, entry: FileEntry) -> dict[str, int]:
    """The parameters of one safetensors file by dtype, from its header."""
    first = bytes(store.chunk(entry, 0))
    length = int.from_bytes(first[:8], "little")
    if len(first) < 8 or length > min(SAFETENSORS_HEADER_MAX, entry.size - 8):
        raise ValueError(f"{entry.path} has no safetensors header")
    header, index = first, 1
    while len(header) < 8 + length:
        header += bytes(store.chunk(entry, index))
        index += 1
    table = json.loads(header[8 : 8 + length])
    counts: dict[str, int] = {}
    for name, tensor in table.items():
        if name == "__metadata__":
            continue
        shape = tensor["shape"]
        if not isinstance(tensor["dtype"], str) or not isinstance(shape, list):
            raise ValueError(f"{entry.path}: tensor {name!r} is described wrongly")
        # (bounded as it is multiplied: see tensor_elements)
        counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + tensor_elements(shape, entry.size * 8)
    return counts


def _item(depot: Depot, summary: RepoSummary, properties: Iterable[str]) -> dict[str, Any]:
    wanted, store = set(properties), depot.store
    commit_id, committed_at = head(store, summary)
    files = store.files(summary.repo_id, commit_id) if wanted & {"siblings", "usedStorage"} else []
    view: RevisionView = stored_view(summary, commit_id, files, committed_at)
    config = model_config(store, summary.repo_id, commit_id) if "config" in wanted else None
    # (as model info derives them: a listing asked for them answered bare ids, an explorer's trial)
    derived: dict[str, Any] = {}
    if "safetensors" in wanted:  # (of the commit's every file, as model info: a commit held in part has none)
        listed = [f.path for f in depot.commit_files(summary.repo_id, commit_id)]
        derived["safetensors"] = safetensors_info(store, summary.repo_id, commit_id, listed)
    if "gguf" in wanted:
        derived["gguf"] = gguf_info(store, summary.repo_id, commit_id)
    found = {name: value for name, value in derived.items() if value}
    return select_properties({**model_properties(view, config), **found}, wanted)


def models_page(
    depot: Depot, query: ModelQuery, authorized: bool, repos: Iterable[RepoSummary] | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the models the request may see (private ones only with the node's token), and the
    cursor of the next page (None on the last). ``repos``: the store's, as read already (else read here)."""
    repos = depot.store.list_repos() if repos is None else repos
    visible = [s for s in repos if (authorized or not s.private or s.gated) and query.matches(s)]
    ordered = sorted(visible, key=query.key, reverse=query.descending)  # stable: ties stay in id order
    if query.cursor is not None:
        cursor = query.cursor
        ordered = [s for s in ordered if query.after(s, cursor)]
    page = ordered[: query.page_size]
    following = None
    if len(ordered) > query.page_size:
        following = _encode_cursor(query.key(page[-1]), page[-1].repo_id)
    items = []
    for summary in page:
        try:
            items.append(_item(depot, summary, query.properties))
        except NotFoundError:  # removed since it was read: not listed
            continue
    return items, following


@dataclass(frozen=True)
class CommitQuery:
    """``GET /api/models/{repo}/commits/{rev}``: page ``p`` (from 0) of ``limit`` commits."""

    page: int
    page_size: int
    formatted: bool

    @classmethod
    def parse(cls, query: MultiMapping[str]) -> CommitQuery:
        page = query.get("p", "0")
        if not page.isascii() or not page.isdigit() or len(page) > 9:  # (isdigit alone takes "²")
            raise InvalidInputError(f"p must be a page number from 0, not {page!r}")
        return cls(
            page=int(page),
            page_size=_positive(query, "limit", COMMITS_PAGE, COMMITS_PAGE_MAX),
            formatted="formatted" in _values(query, "expand"),
        )


def commits_page(
    store: Store, repo_id: str, commit_id: str, query: CommitQuery
) -> tuple[list[dict[str, Any]], int, bool]:
    """The commits listed from ``commit_id``, newest first: its history as the store can tell it
    (:func:`~modeldepot.store.history.commit_history`: an import's parents, else the revisions that came
    earlier). Returns the page, how many there are in all, and whether another page follows."""
    listed = commit_history(store, repo_id, commit_id)
    first = query.page * query.page_size
    page = listed[first : first + query.page_size]
    commits = [commit_item(commit, created_at, query) for commit, created_at in page]
    return commits, len(listed), first + query.page_size < len(listed)


def commit_item(commit_id: str, created_at: float, query: CommitQuery) -> dict[str, Any]:
    """One commit as the Hub lists it (the store keeps no titles nor authors)."""
    item: dict[str, Any] = {
        "id": commit_id,
        "title": COMMIT_TITLE,
        "message": "",
        "date": iso_time(created_at),
        "authors": [{"user": COMMIT_AUTHOR}],
    }
    if query.formatted:
        item["formatted"] = {"title": html.escape(COMMIT_TITLE), "message": ""}
    return item
