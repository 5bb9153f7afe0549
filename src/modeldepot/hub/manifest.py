"""A scanned upstream repo: its files, its quantization variants, the shared files, and each variant's status."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modeldepot.errors import NotFoundError, VariantNotFoundError
from modeldepot.hub.variants import group_files
from modeldepot.store.manifests import ManifestRecord, VariantStatusRecord
from modeldepot.store.models import FileEntry
from modeldepot.store.partials import partial_key

if TYPE_CHECKING:
    from modeldepot.store.store import Store

__all__ = [
    "INTERRUPTED",
    "INTERRUPTED_NOTHING_KEPT",
    "Manifest",
    "RemoteFile",
    "Variant",
    "current_manifest",
    "described_weights",
    "held_manifest",
    "holds_whole",
    "lost_since",
    "manifest_body",
    "manifest_from_record",
]


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    git_oid: str
    sha256: str | None  # the LFS oid, when the file is in LFS


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # onnx | gguf | safetensors
    files: tuple[str, ...]  # its own files; a download also takes the manifest's shared files
    total_bytes: int  # own + shared
    status: str  # available | downloading | downloaded | failed
    bytes_done: int
    error: str | None
    started_at: float | None
    finished_at: float | None
    updated_at: float | None
    resumable: bool = False  # part of it waits in partials/: a pull continues from there
    bytes_by_source: dict[str, int] = field(default_factory=dict)  # local | node | peer | hub -> bytes
    # Not held at the scanned commit, but whole at the older one its branch still names in the store (an
    # update not pulled yet, or refused): what the branch serves meanwhile
    held_commit: str | None = None


@dataclass(frozen=True)
class Manifest:
    repo_id: str
    revision: str
    commit_id: str
    scanned_at: float
    endpoint: str
    pipeline_tag: str | None
    library_name: str | None
    tags: tuple[str, ...]
    gated: bool | str
    files: tuple[RemoteFile, ...]
    shared: tuple[str, ...]
    other: tuple[str, ...]
    variants: tuple[Variant, ...]
    private: bool = False  # private upstream: what is pulled from it is served to token holders only
    other_held: tuple[
        str, ...
    ] = ()  # of ``other`` (files in no variant), those the store holds at the commit
    other_kept_bytes: int = 0  # bytes of the others kept from an interrupted pull, for a resume
    # The upstream's ``safetensors`` and ``gguf`` properties of the commit, as its scan said them (validated)
    weights_described: dict[str, Any] = field(default_factory=dict)
    card_data: dict[str, Any] = field(default_factory=dict)  # the upstream's ``cardData`` (checked)
    created_at: float | None = None  # the repo's creation and last change, as the upstream said them
    modified_at: float | None = None
    # The upstream lists ``revision`` as a git tag (True), as a branch (False), or it could not be told (None)
    revision_is_tag: bool | None = False
    # What the upstream said of the repo (``private`` is the store's word too: current_manifest)
    upstream_private: bool = False

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name.lower() == name.lower():
                return variant
        known = ", ".join(v.name for v in self.variants) or "none"
        raise VariantNotFoundError(
            f"{self.repo_id} has no variant {name!r} (it has: {known})", repo_id=self.repo_id
        )

    def interrupted(self) -> list[Variant]:
        """The variants a pull stopped before it finished, whose bytes done (finished chunks, the parts of
        chunks kept) are what a resume does not fetch again."""
        return [v for v in self.variants if v.status == "failed" and v.error == INTERRUPTED]

    def files_of(self, name: str) -> list[RemoteFile]:
        """Everything a download of variant ``name`` needs: its files and the shared ones."""
        wanted = {*self.variant(name).files, *self.shared}
        return [f for f in self.files if f.path in wanted]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def manifest_body(
    repo_id: str,
    revision: str,
    commit_id: str,
    endpoint: str,
    info: dict[str, Any],
    files: list[RemoteFile],
    part: bool = False,
) -> str:
    """The JSON the store keeps for a scan (statuses live apart, in their own rows); ``part``: see
    :func:`save_scan`."""
    grouping = group_files(f.path for f in files)
    return json.dumps(
        {
            **({PART_OF_COMMIT: True} if part else {}),
            "repo_id": repo_id,
            "revision": revision,
            "commit_id": commit_id,
            "endpoint": endpoint,
            "info": info,
            "files": [dataclasses.asdict(f) for f in files],
            "shared": list(grouping.shared),
            "other": list(grouping.other),
            "variants": [{"name": v.name, "kind": v.kind, "files": list(v.files)} for v in grouping.variants],
        }
    )


INTERRUPTED = "interrupted before it finished: pull again to resume"
# (once `gc --partials` threw its download away, "resume" promised bytes that were gone)
INTERRUPTED_NOTHING_KEPT = "interrupted before it finished, nothing of it kept: a pull starts it again"
IMPORTED_ENDPOINT = "this store (imported)"  # the endpoint of a repo's manifest made of what the store holds


def save_scan(store: Store, repo_id: str, revision: str, commit_id: str, endpoint: str, info: dict[str, Any],
              files: list[RemoteFile], part: bool = False, unrecorded_ok: bool = False) -> None:  # fmt: skip
    """Record a commit's listing as the repo's manifest; each variant "downloaded" when the store holds
    its files and the shared ones at that commit, else "available". ``part``: the listing is a node's files
    of a commit it holds in part (no source gave the whole): kept as the manifest, marked so, never as the
    commit's listing (kept so, it made this node serve the part as the whole commit: a review)."""
    grouping = group_files(f.path for f in files)
    statuses = {
        v.name: "downloaded"
        if all(store.has_file(repo_id, path, commit_id) for path in (*v.files, *grouping.shared))
        else "available"
        for v in grouping.variants
    }
    body = manifest_body(repo_id, revision, commit_id, endpoint, info, files, part)
    # (an upstream's listing of the commit is its whole tree: it replaces one kept of what the store held)
    store.manifests.save(repo_id, revision, commit_id, body, statuses, None if part else _listing_json(files),
                         replace=endpoint != IMPORTED_ENDPOINT, unrecorded_ok=unrecorded_ok)  # fmt: skip


def _listing_json(files: list[RemoteFile]) -> str:
    """A commit's files as its kept listing holds them (ManifestStore.keep_listing)."""
    return json.dumps([dataclasses.asdict(f) for f in files], separators=(",", ":"))


def keep_known_listing(store: Store, repo_id: str, commit_id: str, files: list[RemoteFile]) -> None:
    """Keep a commit's whole listing learnt without a scan (huggingface_hub's, in an adopted cache): the
    commit is known whole or in part from then on, and not looked up upstream again to know it."""
    store.manifests.keep_listing(repo_id, commit_id, _listing_json(files))


def kept_listing(store: Store, repo_id: str, commit_id: str) -> tuple[RemoteFile, ...] | None:
    """The files of a commit as its scan listed them (kept per commit), or None when none is kept."""
    kept = store.manifests.listing(repo_id, commit_id)
    return None if kept is None else tuple(RemoteFile(**f) for f in json.loads(kept))


def listed_counts(store: Store, repo_id: str, commits: Iterable[str]) -> dict[str, int]:
    """How many files each of ``commits`` has upstream, by the listings kept of them (those with none left
    out): `info` says of each revision holding only some of them how many (by the one saved scan alone,
    the note left main once dev was scanned, an explorer's trial)."""
    listings = {commit_id: kept_listing(store, repo_id, commit_id) for commit_id in commits}
    return {commit_id: len(files) for commit_id, files in listings.items() if files is not None}


PART_OF_COMMIT = "part_of_commit"  # a saved scan's mark: the files a node held of the commit, not its listing


def is_part_of_commit(record: ManifestRecord) -> bool:
    """Whether a saved scan lists a node's part of its commit (:func:`save_scan`), not the commit."""
    return PART_OF_COMMIT in record.body[:40] and bool(json.loads(record.body).get(PART_OF_COMMIT))


def described_weights(store: Store, repo_id: str, commit_id: str) -> dict[str, Any]:
    """The upstream's ``safetensors`` and ``gguf`` of a commit, as the repo's saved scan of it has them (none
    when the scan is of another commit, or there is none)."""
    try:
        record = store.manifests.load(repo_id)
    except NotFoundError:
        return {}
    if record.commit_id != commit_id or ('"safetensors"' not in record.body and '"gguf"' not in record.body):
        return {}
    info = json.loads(record.body).get("info") or {}
    return {name: info[name] for name in ("safetensors", "gguf") if isinstance(info.get(name), dict)}


def listed_files(record: ManifestRecord) -> tuple[RemoteFile, ...]:
    """The files a saved scan lists (its commit's whole tree), without building the whole manifest."""
    return tuple(RemoteFile(**f) for f in json.loads(record.body)["files"])


def manifest_from_record(
    record: ManifestRecord, running: bool = False, partial: Callable[[RemoteFile], int | None] | None = None
) -> Manifest:
    """The manifest with live statuses. ``running``: a pull of the repo is going on now; without one, a
    'downloading' row is a pull that was killed, shown as failed. ``partial`` tells which files have a
    resumable download on disk, and how many of their bytes it holds (None: no download). A variant that
    can be resumed shows at least those bytes as done: its status row is written every half second at
    most, so a pull killed since kept more than the row says."""
    body = json.loads(record.body)
    files = tuple(RemoteFile(**f) for f in body["files"])
    sizes = {f.path: f.size for f in files}
    shared_bytes = sum(sizes[p] for p in body["shared"])
    variants = []
    for item in body["variants"]:
        state = record.statuses.get(item["name"])
        status = state.status if state else "available"
        error = state.error if state else None
        if status == "downloading" and not running:
            status, error = "failed", INTERRUPTED
        own = {*item["files"], *body["shared"]}
        kept = (
            {f.path: partial(f) for f in files if f.path in own}
            if partial is not None and status != "downloaded"
            else {}
        )
        # A variant never pulled is resumable by its own files only: a shared config another variant's pull
        # left waiting made every variant "resumable: 0 B kept"
        theirs = item["files"] if status == "available" else own
        # (not a pull under way: "downloading 0% resumable: 0 B kept" read as a pull that had stopped)
        resumable = status != "downloading" and any(kept.get(path) is not None for path in theirs)
        bytes_done = state.bytes_done if state else 0
        if resumable and status in ("failed", "available"):
            # (available: a download that made no status row, a file's own or a mirror's, killed: "0 B kept"
            # while du said 64 MiB and the next pull resumed them, an explorer's trial)
            # What is kept, not the progress the stopped pull last wrote: after a power loss its parts are void,
            # and status said "resumable: 29.8 MiB kept" of 954 B (an explorer's trial)
            bytes_done = sum(kept.get(path) or 0 for path in theirs)
        total_bytes = sum(sizes[p] for p in item["files"]) + shared_bytes
        if (
            status == "downloaded"
        ):  # (a scan that found it held wrote its row: "downloaded", 0 B done, a trial)
            bytes_done = total_bytes
        variants.append(
            Variant(
                name=item["name"],
                kind=item["kind"],
                files=tuple(item["files"]),
                total_bytes=total_bytes,
                status=status,
                bytes_done=bytes_done,
                error=error,
                started_at=state.started_at if state else None,
                finished_at=state.finished_at if state else None,
                updated_at=state.updated_at if state else None,
                resumable=resumable,
                bytes_by_source=dict(state.bytes_by_source) if state else {},
            )
        )
    info = body["info"]
    return Manifest(
        repo_id=record.repo_id,
        revision=record.revision,
        commit_id=record.commit_id,
        scanned_at=record.scanned_at,
        endpoint=body["endpoint"],
        pipeline_tag=info.get("pipeline_tag"),
        library_name=info.get("library_name"),
        tags=tuple(info.get("tags") or ()),
        gated=info.get("gated", False),
        files=files,
        shared=tuple(body["shared"]),
        other=tuple(body["other"]),
        variants=tuple(variants),
        private=bool(info.get("private", False)),
        upstream_private=bool(info.get("private", False)),
        weights_described={name: info[name] for name in ("safetensors", "gguf") if info.get(name)},
        card_data=info.get("card_data") or {},
        created_at=info.get("created_at"),
        modified_at=info.get("modified_at"),
        revision_is_tag=tag if isinstance(tag := info.get("revision_is_tag", False), bool) else None,
    )


def held_manifest(store: Store, repo_id: str, private: bool, commit_id: str | None = None,
                  revision: str | None = None, endpoint: str = "") -> Manifest | None:  # fmt: skip
    """A repo the store holds but never scanned (imported, adopted from a Hugging Face cache): its main
    revision's files (or ``commit_id``'s) as a manifest, each variant downloaded unless a blob of it is
    quarantined, so that ``status``, the event stream and the dashboard show its variants as they show a
    pulled repo's. None when the store holds no such revision. With ``revision`` (offline, a pull of a
    commit held that the saved scan is not of): the commit's whole listing when one is kept, each variant
    downloaded when the store holds all of it (as held only, a pull said "no variant 'fp32'" of the files
    it lacked, and a pull of the whole repo said done with half of it, a review), from ``endpoint``."""
    if commit_id is None:
        try:
            commit_id = store.resolve(repo_id, "main")
        except NotFoundError:
            return None
    # One read: the revision may be removed between two (a node's manifest route answered 500 beside `rm`s)
    found = store.index.read(
        "SELECT r.created_at, f.path, f.size, f.git_oid, f.sha256, f.lfs, b.state FROM revisions r "
        "LEFT JOIN files f ON f.repo_id = r.repo_id AND f.commit_id = r.commit_id "
        "LEFT JOIN blobs b ON b.sha256 = f.sha256 WHERE r.repo_id = ? AND r.commit_id = ? ORDER BY f.path",
        (repo_id, commit_id),
    )
    if not found:
        return None
    created = float(found[0]["created_at"])
    rows = [r for r in found if r["path"] is not None and r["state"] is not None]
    files = [RemoteFile(r["path"], r["size"], r["git_oid"], r["sha256"] if r["lfs"] else None) for r in rows]
    bad = {r["path"] for r in rows if r["state"] != "ok"}
    listing = None if revision is None else kept_listing(store, repo_id, commit_id)
    if listing is not None:  # (the commit's whole listing, kept as it was scanned: what it lacks is known)
        held = {f.path for f in files} - bad
        files = list(listing)
        bad = {f.path for f in files} - held
    sizes = {f.path: f.size for f in files}
    grouping = group_files(sizes)
    statuses = {}
    for variant in grouping.variants:
        own = {*variant.files, *grouping.shared}
        done = "available" if own & bad else "downloaded"
        statuses[variant.name] = VariantStatusRecord(
            variant.name, done, sum(sizes[p] for p in own if p not in bad), None, None, created, created
        )
    named = revision or "main"
    endpoint = IMPORTED_ENDPOINT if listing is None else endpoint
    body = manifest_body(repo_id, named, commit_id, endpoint, {"private": private}, files)
    manifest = manifest_from_record(ManifestRecord(repo_id, named, commit_id, body, created, statuses))
    return dataclasses.replace(manifest, other_held=tuple(p for p in manifest.other if p not in bad))


class CommitListings:
    """A commit's files as the Hub lists them (``Depot.commit_files``), each scan's listing parsed once: the
    Hub routes ask on every listing request."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # (repo, when scanned) -> its files, and their paths; (repo, commit id) -> a listing kept of the commit
        self._parsed: dict[tuple[str, float | str], tuple[tuple[RemoteFile, ...], frozenset[str]]] = {}

    def whole(self, repo_id: str, commit_id: str, held: list[FileEntry]) -> list[FileEntry]:
        """``held`` (the commit's files the store holds, sorted by path) and, when the repo's saved scan is
        of this commit, the ones it lacks, with their sizes and digests and ``chunk_size`` 0 (not here)."""
        listing = self._listing(repo_id, commit_id)
        if listing is None:
            return held
        have = {entry.path for entry in held}
        lacking = [FileEntry(repo_id, commit_id, f.path, f.size, f.sha256 or "", f.git_oid, f.sha256 is not None, 0)
                   for f in listing[0] if f.path not in have]  # fmt: skip
        return sorted([*held, *lacking], key=lambda entry: entry.path) if lacking else held

    def lists(self, repo_id: str, commit_id: str, path: str) -> bool:
        """Whether the repo's saved scan, of this commit, names ``path`` (a file the store may lack): one
        look, not a listing of the whole commit (a 404 on a revision of 20,000 files took 187 ms)."""
        listing = self._listing(repo_id, commit_id)
        return listing is not None and path in listing[1]

    def may_have(self, repo_id: str, commit_id: str, path: str) -> bool | None:
        """Whether the commit has ``path``: True when its listing names it, None when the commit is not known
        whole (adopted from a Hugging Face cache without its listing: only the files the cache held are
        known), False when it does not have it."""
        listing = self._listing(repo_id, commit_id)
        if listing is not None:
            return path in listing[1]
        rows = self.store.index.read(
            "SELECT tree_oid FROM revisions WHERE repo_id = ? AND commit_id = ?", (repo_id, commit_id)
        )
        return None if rows and not rows[0]["tree_oid"] else False

    def known_whole(self, repo_id: str, commit_id: str) -> bool:
        """Whether the store knows every file of the commit (held or listed); False for a commit adopted from
        a Hugging Face cache without its listing (and True for a commit it does not hold at all)."""
        if self._listing(repo_id, commit_id) is not None:
            return True
        rows = self.store.index.read(
            "SELECT tree_oid FROM revisions WHERE repo_id = ? AND commit_id = ?", (repo_id, commit_id)
        )
        return not rows or bool(rows[0]["tree_oid"])

    def _listing(self, repo_id: str, commit_id: str) -> tuple[tuple[RemoteFile, ...], frozenset[str]] | None:
        """The commit's files and paths, parsed once: the repo's saved scan's when it is of this commit,
        else the listing kept of the commit when it was scanned (the repo's one scan had moved to another
        commit, and a commit held in part was listed as that part: a client cached it as the whole)."""
        scanned = self.store.manifests.scanned_commit(repo_id)
        key: tuple[str, float | str] = (
            (repo_id, scanned[1]) if scanned and scanned[0] == commit_id else (repo_id, commit_id)
        )
        listing = self._parsed.get(key)
        if listing is None:
            if key[1] != commit_id:
                try:
                    record = self.store.manifests.load(repo_id)
                except NotFoundError:
                    return None  # (dropped meanwhile)
                if is_part_of_commit(record):
                    # (a node's part of the commit: the listing kept of it, when one is, says the whole;
                    # a part scanned while the Hub was down hid it, a review)
                    kept = kept_listing(self.store, repo_id, commit_id)
                    if kept is None:
                        return None
                    return (kept, frozenset(f.path for f in kept))
                files = listed_files(record)
            else:
                kept = kept_listing(self.store, repo_id, commit_id)
                if kept is None:
                    return None
                files = kept
            if len(self._parsed) >= 64:
                self._parsed.clear()
            listing = self._parsed[key] = (files, frozenset(f.path for f in files))
        return listing


def keep_listing(store: Store, repo_id: str, commit_id: str) -> None:
    """Before files of a revision of a repo never scanned (imported, adopted) are removed (`rm --quant`, the
    disk budget evicting a variant): its whole listing, saved as the repo's manifest, so that the commit is
    still listed whole, the files it lacks as not here (docs/hub-api.md: a client keeps a commit's listing
    for good, and one of part of it would hide the rest even from a node holding it all)."""
    files = [
        RemoteFile(e.path, e.size, e.git_oid, e.sha256 if e.lfs else None)
        for e in store.files(repo_id, commit_id)
    ]
    scanned = store.manifests.scanned_commit(repo_id)
    # The commit's listing, whatever else: the repo's scan's when it is of this commit (a commit pulled in
    # part before listings were kept: what the store holds is a part, a review), else what the store holds
    record = store.manifests.load(repo_id) if scanned is not None and scanned[0] == commit_id else None
    if record is not None and is_part_of_commit(record):
        return  # a node's part of the commit: no listing of it is known, and none is made up (a review)
    whole = listed_files(record) if record is not None else files
    store.manifests.keep_listing(repo_id, commit_id, _listing_json(list(whole)))
    if scanned is not None and (
        scanned[0] == commit_id
        or not of_this_store(store.manifests.load(repo_id))
        or not _main_moved_from(store, repo_id, scanned[0])
    ):
        # (this commit's scan is kept already; the repo's scan is upstream's; or the scan kept is main's,
        # which an older commit losing a file must not replace: its status rows are main's)
        return
    named = store.index.read("SELECT name FROM refs WHERE repo_id = ? AND commit_id = ? ORDER BY name = 'main' DESC, "
                             "name LIMIT 1", (repo_id, commit_id))  # fmt: skip
    revision = str(named[0]["name"]) if named else commit_id
    save_scan(store, repo_id, revision, commit_id, IMPORTED_ENDPOINT, {"private": store.repo_private(repo_id)},
              files)  # fmt: skip


def holds_whole(store: Store, repo_id: str, commit: str) -> bool:
    """Whether the store holds every file of ``commit``: one whose listing it keeps (a pull's scan, an adopted
    cache's trees/<commit>.json, an import's once `rm --quant` or the budget took files of it) and holds each
    file of; or, with none kept, one it made (an import: whole by construction). (A commit adopted as a few
    files and no listing is not: "held" at all, the second import of the same cache moved main to it after
    all; an import's taken for whole by its tree though files of it were removed: reviews.)"""
    held = store.files(repo_id, commit)
    if not held:
        return False
    listings = CommitListings(store)
    if listings.lists(repo_id, commit, held[0].path):
        return len(listings.whole(repo_id, commit, held)) == len(held)
    rows = store.index.read(
        "SELECT tree_oid FROM revisions WHERE repo_id = ? AND commit_id = ?", (repo_id, commit)
    )
    return bool(rows and rows[0]["tree_oid"])


def of_this_store(record: ManifestRecord) -> bool:
    """Whether a saved scan is one :func:`keep_listing` made of what the store held (not upstream's)."""
    return bool(json.loads(record.body).get("endpoint") == IMPORTED_ENDPOINT)


def lost_since(store: Store, manifest: Manifest) -> Manifest:
    """``manifest`` with a variant downloaded once, a file of which the store no longer holds (found
    corrupt and quarantined, or removed by another way than `rm`), shown as to be pulled again: its status
    row still said downloaded. And one whose pull was killed after it published (its row still said
    downloading) but whose every file the store holds at the commit, shown as downloaded: it said
    "interrupted: pull again to resume" of a revision whole in the store (a crash trial). And one interrupted
    whose download is gone (`gc --partials`), said so: nothing is left to resume."""
    downloaded = [v for v in manifest.variants if v.status == "downloaded"]
    interrupted = manifest.interrupted()
    if not downloaded and not interrupted:
        return manifest
    held = _held_paths(store, manifest.repo_id, manifest.commit_id)
    variants = []
    for variant in manifest.variants:
        lost = (
            [p for p in (*variant.files, *manifest.shared) if p not in held] if variant in downloaded else []
        )
        if lost:
            more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
            variant = dataclasses.replace(variant, status="available", bytes_done=0, resumable=False,
                                          error=f"{lost[0]}{more} no longer in the store (found corrupt, "
                                          "removed, or evicted by the disk budget): pull it again")  # fmt: skip
        elif variant in interrupted and all(p in held for p in (*variant.files, *manifest.shared)):
            variant = dataclasses.replace(variant, status="downloaded", bytes_done=variant.total_bytes,
                                          resumable=False, error=None)  # fmt: skip
        elif variant in interrupted and not variant.resumable:
            variant = dataclasses.replace(variant, bytes_done=0, error=INTERRUPTED_NOTHING_KEPT)
        variants.append(variant)
    return dataclasses.replace(manifest, variants=tuple(variants))


def _held_paths(store: Store, repo_id: str, commit_id: str) -> set[str]:
    """The files of the commit the store can serve now (present, not quarantined), in one read."""
    return {row["path"] for row in store.index.read(
        "SELECT path FROM files f JOIN blobs b USING (sha256) WHERE f.repo_id = ? AND f.commit_id = ? "
        "AND b.state = 'ok'", (repo_id, commit_id))}  # fmt: skip


def _main_moved_from(store: Store, repo_id: str, commit_id: str) -> bool:
    try:
        return store.resolve(repo_id, "main") != commit_id
    except NotFoundError:
        return False


def scan_lists(store: Store, repo_id: str, quant: str) -> bool:
    """Whether the repo's saved scan (what a pull would fetch) lists the variant ``quant``: a variant the store
    holds no file of is then one to pull, not one the repo lacks."""
    try:
        current_manifest(store, repo_id).variant(quant)
    except NotFoundError:
        return False
    return True


def current_manifest(store: Store, repo_id: str) -> Manifest:
    """The saved manifest of a scanned repo, with each variant's current status (a pull that was killed
    shows as failed and resumable, not as downloading forever; one whose file was found corrupt since, as
    to be pulled again), or a held repo's (:func:`held_manifest`)."""
    try:
        record = store.manifests.load(repo_id)
        if of_this_store(record) and _main_moved_from(store, repo_id, record.commit_id):
            raise NotFoundError(repo_id)  # (a listing kept of an older commit: the repo's status is main's)
    except NotFoundError as unscanned:
        try:
            private = store.repo_private(repo_id)  # (one indexed lookup: is the repo in the store)
        except NotFoundError:
            raise unscanned from None  # nor is it in the store: scanning it is the way
        from_store = held_manifest(store, repo_id, private)
        if from_store is None:
            raise NotFoundError(
                f"{repo_id} was imported, not pulled, and has no main branch: it has no download status "
                f"(`modeldepot info {repo_id}` shows what the store holds of it)"
            ) from None
        return from_store
    partials, running = store.partials, store.partials.is_pulling(repo_id)
    # (one look at the folder: five for each of a repo's 300 files were most of a pull's status read)
    on_disk = partials.keys_on_disk()
    seen: dict[str, int | None] = {}  # (a shared file is in every variant: looked at once)

    def kept(remote: RemoteFile) -> int | None:
        key = partial_key(remote.sha256, remote.git_oid)
        if key not in on_disk:
            return None
        if key not in seen:  # (a running pull's rows are current: only whether its files are there)
            seen[key] = (0 if partials.holds(key) else None) if running else partials.kept_bytes(key)
        return seen[key]

    manifest = _held_in_part(store, lost_since(store, manifest_from_record(record, running, kept)))
    stored = store.origin(manifest.repo_id)
    if stored is not None:  # (held: private when the store or the upstream says so)
        # A pull into a private repo saved the upstream's "public", and its manifest was served to anyone;
        # and a repo the upstream made private after a pull stayed public on a mirror, new commits and all.
        # Not one private here only because its upstream gates it: described to anyone (a held gated repo
        # was taken for a private one, and hidden whole at its next scan, a review's trial)
        private = (stored.private and not stored.gated) or manifest.private
        manifest = dataclasses.replace(manifest, private=private)
    if not manifest.other:
        return manifest
    # Files in no variant come with a pull of the whole repo: what of them is here, and kept for a resume
    servable = _held_paths(store, manifest.repo_id, manifest.commit_id)
    held = tuple(p for p in manifest.other if p in servable)
    wanted = set(manifest.other) - set(held)
    lacking = [f for f in manifest.files if f.path in wanted]
    resumable = 0 if running else sum(kept(f) or 0 for f in lacking)
    return dataclasses.replace(manifest, other_held=held, other_kept_bytes=resumable)


def _held_in_part(store: Store, manifest: Manifest) -> Manifest:
    """Variants never pulled whose own files the store holds some of (an adopted cache that lacked a
    tokenizer, an import of the weights alone) count those bytes as done: "available" with nothing to show
    read as nothing here. (The shared files alone do not: every other variant of a pulled one has them.)"""
    waiting = [v for v in manifest.variants if v.status == "available" and not v.resumable]
    if not waiting:
        return manifest
    older = _older_commit_held(store, manifest)
    held = {
        row["path"]
        for row in store.index.read(
            "SELECT f.path FROM files f JOIN blobs b USING (sha256) "
            "WHERE f.repo_id = ? AND f.commit_id = ? AND b.state = 'ok'",
            (manifest.repo_id, manifest.commit_id),
        )
    }
    sizes = {f.path: f.size for f in manifest.files}
    variants = []
    for variant in manifest.variants:
        if variant in waiting and held.intersection(variant.files):
            own = {*variant.files, *manifest.shared}
            # (all of it: fetched a file at a time, through a mirror, no status row said so)
            status = "downloaded" if own <= held else variant.status
            variant = dataclasses.replace(
                variant, status=status, bytes_done=sum(sizes[p] for p in own & held)
            )
        elif variant in waiting and variant.name.lower() in older:
            variant = dataclasses.replace(variant, held_commit=older[variant.name.lower()])
        variants.append(variant)
    return dataclasses.replace(manifest, variants=tuple(variants))


def _older_commit_held(store: Store, manifest: Manifest) -> dict[str, str]:
    """Variant (lower case) -> another commit that holds it whole: the one its branch names in the store, when
    that is not the scanned one (an update scanned and not pulled: refused by the budget, a review), else the
    newest a pin keeps (an update pulled a variant at a time, the pin keeping the commit before it: an
    explorer's trial). `status` said "available" of a model the store holds and serves."""
    try:
        commit_id = store.resolve(manifest.repo_id, manifest.revision)
    except NotFoundError:
        return {}
    if commit_id != manifest.commit_id:
        candidates = [commit_id]
    else:
        pinned = store.budget.pins.commits(manifest.repo_id) - {commit_id}
        candidates = [commit for commit, _ in store.revisions(manifest.repo_id) if commit in pinned]
    held_at: dict[str, str] = {}
    for commit in candidates:  # (newest first)
        rows = store.index.read(
            "SELECT f.path, b.state FROM files f LEFT JOIN blobs b USING (sha256) WHERE f.repo_id = ? AND f.commit_id = ?",
            (manifest.repo_id, commit),
        )
        held = {row["path"] for row in rows if row["state"] == "ok"}
        grouping = group_files(row["path"] for row in rows)
        for variant in grouping.variants:
            if {*variant.files, *grouping.shared} <= held:
                held_at.setdefault(variant.name.lower(), commit)
    return held_at
