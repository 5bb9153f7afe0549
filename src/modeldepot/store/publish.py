"""Making verified files visible as a revision: the one commit path that imports and pulls share.

Blobs are placed under the shared store lock, then one index transaction adds the repo, the revision,
the blobs with their chunk digests and the file rows, and moves the ref; then the snapshot is rebuilt.
A failure before the COMMIT deletes the blobs this call placed (nothing else references them); a kill
leaves them as orphans that gc removes. Files can be added to an existing revision (a pull of a second
variant): the snapshot always shows every file the revision has.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modeldepot.errors import (
    CommitConflictError,
    InvalidRevisionError,
    SharedBlobsRemovedError,
    SourceDirectoryError,
    StoreError,
)
from modeldepot.gitobjects import TreeEntry, commit_id_for_tree, tree_oids
from modeldepot.hashing import BlobDigest
from modeldepot.modelcard import FILE_TAGS
from modeldepot.store.blobs import LinkedSource, PartialBlob
from modeldepot.store.index import Index
from modeldepot.store.store import Store

__all__ = [
    "RevisionSpec",
    "StagedFile",
    "blob_states",
    "publish",
    "publish_blobs",
    "publish_branch",
    "refuse_nested_branch",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedFile:
    path: str
    digest: BlobDigest
    git_oid: str  # the Hub's tree oid for the file
    lfs: bool


# The branch a repo's model card (its listings, its model info) is read from, as the Hub's default branch
DEFAULT_BRANCH = "main"


@dataclass(frozen=True)
class RevisionSpec:
    repo_id: str
    commit_id: str
    branch: str | None  # the ref to point at the commit; None leaves refs alone (a pull by commit id)
    # The repo's visibility: None keeps what the store has (a new repo is public). It is the whole repo's, as
    # on the Hub: an import of a branch without --private made a private repo's main public (a trial).
    private: bool | None = None
    # Where the repo came from: "import", "hf-cache", an upstream's URL; None keeps the repo's (a pull of what
    # the store holds, offline: it made an adopted repo "imported", and lost what it knew of it, a trial)
    origin: str | None = "import"
    # The revision's model card. The repo's (its listings, its model info) is main's, or the newest
    # revision's where it has no main: see _record_repo.
    card: dict[str, Any] = field(default_factory=dict)
    tree_oid: str | None = None
    # An import's: the commit id is made in the publishing transaction, from ``tree_oid`` and the head the
    # branch has then (:func:`commit_on_head`); ``commit_id`` is unused. Read before it, two imports onto
    # one branch at once took the same head for parent: the last one's commit dropped the other's from
    # the branch's history, or moved the branch back (a trial).
    on_head: bool = False
    # False when the README may be missing from what was published only (an adopted cache holds what its
    # user downloaded): the card's README part is then kept
    card_known: bool = True
    # When the upstream was seen with ``branch`` at ``commit_id`` (a pull's: its scan's time): the ref then
    # moves only if the store did not learn of another commit for it later (``refs.updated_at``), and
    # records this time. A pull that ran on a scan kept a while (a mirror's) moved a branch back to the
    # commit that scan saw, over a newer one. None: now, and the ref moves whatever it names (an import)
    branch_seen_at: float | None = None
    # Whether ``private`` is the upstream's word (a pull of a private or gated repo), not the operator's (an
    # import's --private): a repo private on its upstream's word is shown again once the upstream shows it
    # (``repos.hidden_at``, :meth:`~modeldepot.store.store.Store.show_repo_again`); the operator's stays
    private_by_upstream: bool = False
    # Whether ``branch`` is a git tag upstream (a pull of one): listed as a tag; None keeps what the store
    # recorded (the upstream's refs could not be had)
    branch_is_tag: bool | None = False
    # With ``private_by_upstream``: whether the upstream gates the repo rather than hides it (described to
    # anyone, its files behind the token: RepoSummary.gated). The repo's, whatever branch is published
    gated_only: bool = False


def commit_on_head(con: sqlite3.Connection, repo_id: str, branch: str, tree_oid: str) -> str:
    """The commit an import of ``tree_oid`` makes on ``branch``: its head when that holds the same tree (a
    folder imported again changes nothing), else a new commit whose parent is the head (older files
    imported again are a newer commit, not the old one brought back: the branch's history keeps what came
    between); a root when the branch has no head. Same files on the same history: the same id anywhere."""
    row = con.execute(
        "SELECT r.commit_id, v.tree_oid FROM refs r JOIN revisions v USING (repo_id, commit_id) "
        "WHERE r.repo_id = ? AND r.name = ?",
        (repo_id, branch),
    ).fetchone()
    if row is None:
        return commit_id_for_tree(tree_oid)
    head, head_tree = str(row[0]), row[1]
    if head_tree is None:  # a pulled commit keeps no tree id: its files give it
        files = con.execute(
            "SELECT path, git_oid FROM files WHERE repo_id = ? AND commit_id = ?", (repo_id, head)
        )
        head_tree = tree_oids(TreeEntry(path, oid) for path, oid in files)[""]
    return head if head_tree == tree_oid else commit_id_for_tree(tree_oid, head)


UNCHECKED = "unchecked"  # (blob_states) 'ok' in the index, but written before a restart and not yet checked


def blob_states(index: Index, digests: list[str], boot: str | None = None) -> dict[str, str]:
    """Each blob's state in the index; with ``boot`` (this machine's), one written under another boot and
    not known durable is :data:`UNCHECKED`: a power loss may have damaged it."""
    states: dict[str, str] = {}
    for start in range(0, len(digests), 500):
        batch = digests[start : start + 500]
        marks = ",".join("?" * len(batch))
        for row in index.read(
            f"SELECT sha256, state, unflushed_boot FROM blobs WHERE sha256 IN ({marks})", tuple(batch)
        ):
            unchecked = boot is not None and row["unflushed_boot"] not in (None, boot)
            states[row["sha256"]] = UNCHECKED if unchecked and row["state"] == "ok" else row["state"]
    return states


MISSING = "missing"  # (_with_files) 'ok' in the index, but its file is not there


def _with_files(store: Store, states: dict[str, str]) -> dict[str, str]:
    """``states``, where a blob the index calls good has no file, :data:`MISSING`: a quarantine killed
    between moving the file and writing its row (or whose row could not be written) left it so. Taken as
    held, a new revision would name a file that is not there."""
    for sha256, state in states.items():
        if state == "ok" and not os.path.lexists(store.blobs.path(sha256)):
            states[sha256] = MISSING
    return states


def held_good(store: Store, digests: list[str]) -> set[str]:
    """Those of ``digests`` the store holds good now: in the index, not unchecked since a restart, their files
    there (what :func:`publish` takes as held)."""
    states = _with_files(store, blob_states(store.index, digests, store.durability.boot))
    return {sha256 for sha256, state in states.items() if state == "ok"}


def publish(
    store: Store, spec: RevisionSpec, staged: list[StagedFile], partials: dict[str, PartialBlob],
    committed: Callable[[], None] | None = None, recorded: list[RevisionSpec] | None = None,
) -> set[str]:  # fmt: skip
    """Publish ``staged`` files (whose new bytes wait in ``partials``, by SHA-256); returns the blobs it
    placed (new, or placed over a quarantined or unchecked one). ``committed`` is called once the index
    names them (a writer's room in the disk budget is held no more: ``BudgetWriter.published``).
    ``recorded`` gets the spec the revision was recorded under (the repo's spelling in the store, the
    commit id an ``on_head`` spec was given)."""
    placed: list[str] = []
    over: set[str] = set()  # of those, placed over a file of the blob's name (see _unplace)
    new: list[str] = []
    try:
        with store.lock.shared(), store.layout.same_folders():
            # A blob the index has but that waits for its check after a restart is placed over with these
            # verified bytes: taken as held, it could make this revision name damaged ones.
            known = _with_files(store, blob_states(store.index, list(partials), store.durability.boot))
            # The blobs it reuses (no partial: found in the store) must still be there: an eviction or an
            # `rm` in another process may have removed them since (removals take the lock exclusively).
            reused = sorted({s.digest.sha256 for s in staged if s.digest.sha256 not in partials})
            present = _with_files(store, blob_states(store.index, reused))
            gone = [sha256 for sha256 in reused if present.get(sha256) != "ok"]
            if gone:
                removed = SharedBlobsRemovedError(
                    f"{spec.repo_id}: {len(gone)} file(s) it shares with other repos were removed from the "
                    f"store meanwhile (by `rm` or the disk budget, e.g. blob {gone[0][:12]}): nothing was "
                    "published; run it again", repo_id=spec.repo_id,
                )  # fmt: skip
                removed.gone = tuple(gone)
                raise removed
            for sha256, partial in partials.items():
                if known.get(sha256) != "ok":
                    if partial.changed_since_hashed():  # (a linked file written since: see importer)
                        raise SourceDirectoryError(f"{partial.linked_from} changed after it was hashed "
                                                   "(something still writes it): import it again once it is written")  # fmt: skip
                    if store.blobs.path(sha256).exists() and partial.linked_source() is None:
                        over.add(
                            sha256
                        )  # (not a user's file linked in: its mode comes back as before, review 41)
                    store.blobs.place(partial, sha256, durable=not store.durability.deferred)
                    placed.append(sha256)
            linked = {
                sha256: source
                for sha256 in placed
                if (source := partials[sha256].linked_source()) is not None
            }
            spec = _commit(store.index, spec, staged, store.durability.unflushed_boot, set(placed), linked)
            if recorded is not None:
                recorded.append(spec)
            store.durability.forget_unchecked(placed)  # (placed over: these bytes were verified now)
            new = placed
            placed = []  # committed: the rows own these blobs now
            store.blobs.drop_quarantined(new)  # (its row may have gone since: a removal, an eviction)
            if committed is not None:
                committed()
            if new:
                store.durability.written()
            _build_snapshot(store, spec.repo_id, spec.commit_id, [(s.path, s.digest.sha256) for s in staged])
    except BaseException:
        if placed:
            _unplace(store, placed, partials, over)
        raise
    return set(new)


def publish_blobs(store: Store, blobs: dict[str, tuple[BlobDigest, PartialBlob]]) -> set[str]:
    """Place verified blobs (by SHA-256: their digests and their bytes) and record them, no file naming them
    yet; returns those it placed (the others the store held good already). A pull hands a content that
    another pull waits for over this way, before its own revision publishes (transfer/pull.py): its writer
    relies on them first (``BudgetWriter.reuse``), so that gc and evictions leave them until it publishes
    them; a pull that fails then leaves them for the next pull, as gc's orphans."""
    placed: list[str] = []
    over: set[str] = set()
    try:
        with store.lock.shared(), store.layout.same_folders():
            known = _with_files(store, blob_states(store.index, list(blobs), store.durability.boot))
            for sha256, (_, partial) in blobs.items():
                if known.get(sha256) != "ok":
                    if store.blobs.path(sha256).exists():
                        over.add(sha256)
                    store.blobs.place(partial, sha256, durable=not store.durability.deferred)
                    placed.append(sha256)
            if not placed:
                return set()
            now = time.time()
            with store.index.write(f"recording {len(placed)} blob(s) other pulls wait for") as con:
                for sha256 in placed:
                    _record_blob(con, blobs[sha256][0], now, store.durability.unflushed_boot, True)
                _record_links(con, set(placed), {})
            store.durability.forget_unchecked(placed)
            new, placed = set(placed), []
            store.blobs.drop_quarantined(new)  # (its row may have gone since: a removal, an eviction)
            store.durability.written()
    except BaseException:
        if placed:
            _unplace(store, placed, {sha256: partial for sha256, (_, partial) in blobs.items()}, over)
        raise
    return new


def _build_snapshot(store: Store, repo_id: str, commit_id: str, published: list[tuple[str, str]]) -> None:
    """Under the shared lock, so gc (exclusive) never removes a snapshot being built. Derived state: if
    this fails (a full disk, no inodes), the revision still exists and snapshot_path/verify rebuild it.
    Files published into a revision whose snapshot stands are linked into it; else it is built whole."""
    try:
        if not store.snapshots.add(repo_id, commit_id, published):
            store.snapshots.build(
                repo_id, commit_id, [(f.path, f.sha256) for f in store.files(repo_id, commit_id)]
            )
    except StoreError as error:
        log.warning(
            "published %s@%s, but its snapshot folder could not be built yet: %s", repo_id, commit_id, error
        )


def _unplace(store: Store, placed: list[str], partials: dict[str, PartialBlob], over: set[str]) -> None:
    """Delete blobs placed but never committed (a download's file placed under the blob's name goes back
    under its own: a publish that failed for want of an inode threw finished downloads away, fetched again
    by the next pull, an explorer's trial). Under the exclusive lock no writer is between placing and
    committing, so a blob without an 'ok' row is nobody's index row's; those placed ``over`` a file of their
    name stay, verified bytes where that file was: a row waiting for its check, or a whole snapshot gc keeps
    of an older index (store/snapshots.py), named it, and lost it (review 40)."""
    with store.lock.exclusive():
        states = blob_states(store.index, placed)
        for sha256 in placed:
            if states.get(sha256) != "ok" and sha256 not in over:
                partial = partials.get(sha256)
                if partial is None or not partial.name_taken or not store.blobs.put_back(sha256, partial):
                    store.blobs.delete(sha256)  # (a linked one: the partial's discard gives its mode back)


_NESTED_REF = (
    "SELECT name FROM refs WHERE repo_id = ? COLLATE NOCASE AND name != ? AND "
    "(substr(?, 1, length(name) + 1) = name || '/' OR substr(name, 1, ?) = ?) LIMIT 1"
)


def refuse_nested_branch(con: sqlite3.Connection | Index, repo_id: str, branch: str) -> None:
    """git (and the Hub, and the Hugging Face cache's ``refs/`` folder) cannot hold both ``main`` and
    ``main/sub``: a ref may not be a folder of another. InvalidRevisionError names the clash. (Asked again
    in the publishing transaction; an import asks first, before it hashes a byte.)"""
    params = (repo_id, branch, branch, len(branch) + 1, branch + "/")
    rows = (
        con.read(_NESTED_REF, params)
        if isinstance(con, Index)
        else con.execute(_NESTED_REF, params).fetchall()
    )
    clash = rows[0] if rows else None
    if clash is not None:
        raise InvalidRevisionError(
            f"branch {branch!r} of {repo_id} cannot sit beside its branch {clash[0]!r}: one would be a folder "
            "of the other (git's rule); choose another name"
        )


def publish_branch(store: Store, spec: RevisionSpec) -> bool:
    """Point ``spec.branch`` at ``spec.commit_id``, a revision the store holds already, as :func:`publish`
    would with its files (the repo's card follows main; a ``branch_seen_at`` older than the ref's last
    move leaves the ref): a mirror's pull of a commit publishes one branch, and the others its upstream
    showed at that commit are pointed so. Whether the ref names the commit now (False: the store holds no
    such revision, removed meanwhile, or the ref was kept). InvalidRevisionError for a branch that cannot
    sit beside the repo's others."""
    branch = spec.branch
    if branch is None:
        raise ValueError("publish_branch needs a branch")
    now = time.time()
    with store.index.write(f"pointing {spec.repo_id}@{branch} at {spec.commit_id[:12]}") as con:
        held = con.execute(
            "SELECT repo_id FROM repos WHERE repo_id = ?1 COLLATE NOCASE ORDER BY repo_id = ?1 DESC LIMIT 1",
            (spec.repo_id,),
        ).fetchone()
        if held is None:
            return False
        spec = dataclasses.replace(spec, repo_id=held[0])
        if not con.execute(
            "SELECT 1 FROM revisions WHERE repo_id = ? AND commit_id = ?", (spec.repo_id, spec.commit_id)
        ).fetchone():
            return False
        refuse_nested_branch(con, spec.repo_id, branch)
        if _keeps_ref(con, spec):
            return False
        _record_repo(con, spec, now)
        if _point_ref(con, spec, now):
            con.execute("UPDATE repos SET updated_at = ? WHERE repo_id = ?", (now, spec.repo_id))
        return True


def _keeps_ref(con: sqlite3.Connection, spec: RevisionSpec) -> bool:
    """Whether the ref ``spec.branch`` stays where it is rather than move to ``spec.commit_id``: it names
    another commit, which the store learned of after ``spec.branch_seen_at`` (a pull whose scan is older
    than the ref's last move, a mirror's on a scan it kept: that scan's commit may be the branch's older one)."""
    if spec.branch_seen_at is None:
        return False
    row = con.execute(
        "SELECT commit_id, updated_at FROM refs WHERE repo_id = ? AND name = ?", (spec.repo_id, spec.branch)
    ).fetchone()
    # (a time ahead of now is no news: written by a clock set back since, it kept the branch for good, a review)
    if row is None or row[0] == spec.commit_id or not spec.branch_seen_at < float(row[1]) <= time.time():
        return False
    log.info("%s: %s stays at %s, where the store learned it was %.0f s after the scan that saw it at %s "
             "(the revision is published all the same)", spec.repo_id, spec.branch, row[0][:12],
             float(row[1]) - spec.branch_seen_at, spec.commit_id[:12])  # fmt: skip
    return True


def _point_ref(con: sqlite3.Connection, spec: RevisionSpec, now: float) -> bool:
    """Point ``spec.branch`` at ``spec.commit_id``; whether it moved (or is new). The ref's time is when the
    store last learned where the branch is (a shared store's reader takes the branch of the store that
    learned last: a pull that found it unmoved is that store): ``spec.branch_seen_at`` when given (never
    set back, nor ahead of now), else now."""
    assert spec.branch is not None
    was = con.execute(
        "SELECT commit_id FROM refs WHERE repo_id = ? AND name = ?", (spec.repo_id, spec.branch)
    ).fetchone()
    learned = now if spec.branch_seen_at is None else min(spec.branch_seen_at, now)
    moved = was is None or was[0] != spec.commit_id
    if was is not None and moved:  # (what it leaves behind: engines.loading.left_behind)
        con.execute(
            "INSERT INTO ref_history (repo_id, name, commit_id, left_at) VALUES (?, ?, ?, ?) ON CONFLICT "
            "(repo_id, name, commit_id) DO UPDATE SET left_at = excluded.left_at",
            (spec.repo_id, spec.branch, was[0], now),
        )
    con.execute(
        "INSERT INTO refs (repo_id, name, commit_id, updated_at, tag) VALUES (?1, ?2, ?3, ?4, COALESCE(?6, 0)) ON "
        "CONFLICT (repo_id, name) DO UPDATE SET commit_id = excluded.commit_id, tag = COALESCE(?6, refs.tag), "
        "updated_at = CASE WHEN ?5 THEN excluded.updated_at ELSE MAX(refs.updated_at, excluded.updated_at) END",
        (spec.repo_id, spec.branch, spec.commit_id, learned, moved, spec.branch_is_tag),
    )
    return moved


def _record_repo(con: sqlite3.Connection, spec: RevisionSpec, now: float) -> None:
    """The repo's row: its visibility as :attr:`RevisionSpec.private` says; its origin and card those of the
    revision its listings describe (main, or the newest where it has no main): a branch published beside
    main leaves them (an import of a branch turned a pulled repo into the node's own, and its card erased
    main's), and a card not known (an adopted cache without the README) keeps the README's part."""
    row = con.execute(
        "SELECT private, origin, card, hidden_at FROM repos WHERE repo_id = ?", (spec.repo_id,)
    ).fetchone()
    upstreams_word = bool(spec.private) and spec.private_by_upstream
    if row is None:
        con.execute(
            "INSERT INTO repos (repo_id, private, origin, card, created_at, updated_at, hidden_at, gated_only) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (spec.repo_id, int(bool(spec.private)), spec.origin or "import", json.dumps(spec.card), now, now,
             now if upstreams_word else None, upstreams_word and spec.gated_only),
        )  # fmt: skip
        return
    private, hidden_at = bool(row[0]), row[3]
    if spec.private is not None and not upstreams_word:  # (the operator's word, or public)
        private, hidden_at = spec.private, None
    elif upstreams_word and not private:  # (public here until now: private on the upstream's word)
        private, hidden_at = True, now
    if spec.private is not None:
        # Gated only while the upstream says so, of a repo hidden on its word alone (not its operator's): the
        # repo's, set by a branch's pull as by main's (a branch of a repo private upstream since kept it
        # described, a review's trial)
        con.execute(
            "UPDATE repos SET gated_only = ? WHERE repo_id = ?",
            (upstreams_word and spec.gated_only and hidden_at is not None, spec.repo_id),
        )
    origin, card = row[1], json.loads(row[2])
    has_main = con.execute(
        "SELECT 1 FROM refs WHERE repo_id = ? AND name = ?", (spec.repo_id, DEFAULT_BRANCH)
    ).fetchone()
    if spec.branch == DEFAULT_BRANCH or has_main is None:
        origin = spec.origin or origin
        if spec.card_known:
            card = spec.card
        else:
            card = {k: v for k, v in card.items() if k != FILE_TAGS}
            card.update((k, v) for k, v in spec.card.items() if k == FILE_TAGS)
    con.execute(
        "UPDATE repos SET private = ?, origin = ?, card = ?, hidden_at = ? WHERE repo_id = ?",
        (int(private), origin, json.dumps(card), hidden_at, spec.repo_id),
    )


def _files_held(con: sqlite3.Connection, spec: RevisionSpec, paths: list[str]) -> dict[str, str]:
    """Path -> SHA-256 of those of ``paths`` the revision holds already: by name for a few (a mirror publishes
    each file it fetches: read whole, the commit's rows made each publish of a 2,500-file repo cost its
    size), the whole commit's otherwise."""
    if len(paths) > 400:
        query = "SELECT path, sha256 FROM files WHERE repo_id = ? AND commit_id = ?"
        return dict(con.execute(query, (spec.repo_id, spec.commit_id)).fetchall())
    marks = ", ".join("?" * len(paths))
    query = f"SELECT path, sha256 FROM files WHERE repo_id = ? AND commit_id = ? AND path IN ({marks})"
    return dict(con.execute(query, (spec.repo_id, spec.commit_id, *paths)).fetchall())


def _commit(index: Index, spec: RevisionSpec, staged: list[StagedFile], unflushed_boot: str | None,
            placed: set[str], linked: dict[str, LinkedSource]) -> RevisionSpec:  # fmt: skip
    """The revision's rows in one transaction. The blobs this call placed record ``unflushed_boot`` (the
    boot they were written under, when not yet flushed: store/durability.py), and the file of the user's
    each is a hard link of (``linked``: its mode is given back when the store lets go of it). A repo the store holds under
    another case keeps its spelling (Store.spelled; asked in the transaction, so two first writers of one
    repo in two cases make one repo): the spec it was recorded under is returned."""
    now = time.time()
    with index.write(f"recording {spec.repo_id}@{spec.commit_id[:12] or spec.branch}") as con:
        held = con.execute(
            "SELECT repo_id FROM repos WHERE repo_id = ?1 COLLATE NOCASE ORDER BY repo_id = ?1 DESC LIMIT 1",
            (spec.repo_id,),
        ).fetchone()
        if held is not None and held[0] != spec.repo_id:
            spec = dataclasses.replace(spec, repo_id=held[0])
        if spec.on_head:
            if spec.branch is None or spec.tree_oid is None:
                raise ValueError("a commit made on a branch's head needs the branch and the tree")
            commit = commit_on_head(con, spec.repo_id, spec.branch, spec.tree_oid)
            spec = dataclasses.replace(spec, commit_id=commit, on_head=False)
        # (a ref kept where it is: the revision is published beside it, as one by commit id is)
        kept = spec.branch is not None and _keeps_ref(con, spec)
        _record_repo(con, dataclasses.replace(spec, branch=None) if kept else spec, now)
        con.execute(
            "INSERT OR IGNORE INTO revisions (repo_id, commit_id, tree_oid, created_at) VALUES (?, ?, ?, ?)",
            (spec.repo_id, spec.commit_id, spec.tree_oid, now),
        )
        changed = con.execute("SELECT changes()").fetchone()[0] > 0
        held = _files_held(con, spec, [item.path for item in staged])
        for item in staged:
            digest = item.digest
            if held.get(item.path, digest.sha256) != digest.sha256:
                raise CommitConflictError(
                    spec.repo_id, spec.commit_id, item.path, held[item.path], digest.sha256
                )
            _record_blob(con, digest, now, unflushed_boot if digest.sha256 in placed else None,
                         digest.sha256 in placed)  # fmt: skip
            con.execute(
                "INSERT OR REPLACE INTO files (repo_id, commit_id, path, sha256, size, git_oid, lfs) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    spec.repo_id,
                    spec.commit_id,
                    item.path,
                    digest.sha256,
                    digest.size,
                    item.git_oid,
                    int(item.lfs),
                ),
            )
        if spec.branch is not None:
            refuse_nested_branch(con, spec.repo_id, spec.branch)
            if not kept:
                changed = _point_ref(con, spec, now) or changed
        # (the same files published again change nothing the repo shows: a re-import is no update)
        if changed:
            con.execute("UPDATE repos SET updated_at = ? WHERE repo_id = ?", (now, spec.repo_id))
        _record_links(con, placed, linked)
    return spec


def _record_blob(con: sqlite3.Connection, digest: BlobDigest, now: float, unflushed_boot: str | None,
                 placed: bool) -> None:  # fmt: skip
    """A blob's row and its chunks' digests; a row there already changes only if ``placed`` (these bytes
    were placed over it) or it was not 'ok'."""
    con.execute(
        "INSERT INTO blobs (sha256, size, chunk_size, git_sha1, created_at, unflushed_boot) "
        "VALUES (?, ?, ?, ?, ?, ?) "
        # A new placement over a quarantined blob, or over one not checked since a restart: a new
        # created_at (Store.quarantine and the flusher tell placements apart by it).
        "ON CONFLICT (sha256) DO UPDATE SET state = 'ok', chunk_size = excluded.chunk_size, "
        "created_at = excluded.created_at, verified_at = excluded.created_at, "
        "unflushed_boot = excluded.unflushed_boot WHERE state != 'ok' OR ?",
        (digest.sha256, digest.size, digest.chunk_size, digest.git_sha1, now, unflushed_boot, placed),
    )
    if con.execute("SELECT changes()").fetchone()[0]:
        con.execute("DELETE FROM chunks WHERE sha256 = ?", (digest.sha256,))
        con.executemany(
            "INSERT INTO chunks (sha256, idx, blake3) VALUES (?, ?, ?)",
            [(digest.sha256, i, b3) for i, b3 in enumerate(digest.chunk_blake3)],
        )


def _record_links(con: sqlite3.Connection, placed: set[str], linked: dict[str, LinkedSource]) -> None:
    """The file of the user's each placed blob is a hard link of; a blob placed over a linked one is
    another file: its record goes."""
    for sha256 in placed:
        source = linked.get(sha256)
        if source is None:
            con.execute("DELETE FROM linked_sources WHERE sha256 = ?", (sha256,))
        else:
            con.execute("INSERT OR REPLACE INTO linked_sources (sha256, source, device, inode, mode) "
                        "VALUES (?, ?, ?, ?, ?)", (sha256, str(source.path), *source.inode, source.mode))  # fmt: skip
