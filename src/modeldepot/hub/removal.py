"""Removing what a store holds, as the hub layer sees it: a repo or a revision (and the pins that named
them), or one variant's own files (its shared files and the other variants stay); and after any removal or
eviction, the variants a scan said were downloaded whose files are gone shown as available again."""

from __future__ import annotations

import contextlib
import logging

from modeldepot.errors import NotFoundError, StoreError, VariantNotFoundError
from modeldepot.hub.manifest import current_manifest, keep_listing, of_this_store
from modeldepot.hub.variants import group_files, variant_aliases
from modeldepot.store import RemoveResult, Store, remove
from modeldepot.store.maintenance import remove_files
from modeldepot.validation import validate_quant

__all__ = ["forget_removed_variants", "remove_repo", "remove_variant"]

log = logging.getLogger(__name__)


def remove_repo(store: Store, repo_id: str, revision: str | None) -> RemoveResult:
    """Remove a repo or one revision (blobs nothing else uses are deleted at once, but those writes under way
    rely on, as an eviction leaves them: an import that found them held failed), and the pins of what is gone
    (the repo, the commit, the branch): they would apply again, unseen, to a later pull."""
    result = remove(store, repo_id, revision, keep_blobs=store.budget.kept_blobs)
    forget_removed_variants(store, repo_id)
    _drop_pins_of_what_went(store, repo_id)
    return result


def _drop_pins_of_what_went(store: Store, repo_id: str) -> None:
    """Unpin the revisions of ``repo_id`` that no longer resolve: a pin would apply again, unseen, to a later
    pull (the removal is not failed for its pins)."""
    for pin in store.budget.pins.all(repo_id):
        try:
            store.resolve(repo_id, pin.revision)
        except NotFoundError:
            try:
                store.budget.pins.unpin(repo_id, pin.quant, pin.revision)
            except StoreError as error:
                log.warning("%s was removed but its pin of %s stays: %s", repo_id, pin.revision, error)


def remove_variant(store: Store, repo_id: str, revision: str, quant: str) -> tuple[str, RemoveResult]:
    """Remove one variant's own files from a revision: (its commit, what was removed). The commit's whole
    listing is kept first (hub/manifest.py ``keep_listing``), and a pin of the variant there goes."""
    validate_quant(quant)
    commit_id = store.resolve(repo_id, revision)
    grouping = group_files(e.path for e in store.files(repo_id, commit_id))
    variant = grouping.find(quant)
    if variant is None:
        raise VariantNotFoundError(
            f"{repo_id}@{commit_id[:12]} holds no variant {quant!r} (it holds: {grouping.names() or 'none'})",
            repo_id=repo_id,
        )
    keep_listing(store, repo_id, commit_id)
    result = remove_files(
        store, repo_id, commit_id, grouping.own_files(variant), keep_blobs=store.budget.kept_blobs
    )
    # (a pin of what is gone would keep nothing, unseen; one that names a variant left, "fp16" of the other
    # kind's fp16 too, stays: a review)
    left = group_files(e.path for e in store.files(repo_id, commit_id))
    for pin in store.budget.pins.all(repo_id):
        if (
            pin.quant is not None
            and pin.quant.lower() in variant_aliases(variant)
            and left.find(pin.quant) is None
        ):
            with contextlib.suppress(NotFoundError):
                if store.resolve(repo_id, pin.revision) == commit_id:
                    store.budget.pins.unpin(repo_id, pin.quant, pin.revision)
    forget_removed_variants(store, repo_id)
    _drop_pins_of_what_went(store, repo_id)  # (the last variant took its revision with it: its pins go too)
    return commit_id, result


def forget_removed_variants(store: Store, repo_id: str) -> None:
    """After a removal or an eviction, a scanned variant whose files the store no longer holds is
    'available' again (its status row said 'downloaded'): the event stream and ``status`` say so. A listing
    kept of the store's own revision (``keep_listing``: an import that lost a variant) goes with that
    revision: it stayed for good, shown with Pull buttons that answered 404, and no removal could take it."""
    try:
        record = store.manifests.load(repo_id)
        if of_this_store(record):
            try:
                store.resolve(repo_id, record.commit_id)
            except NotFoundError:
                store.manifests.forget(repo_id, record.commit_id)
                return
    except NotFoundError:
        return
    try:
        manifest = current_manifest(store, repo_id)
        recorded = store.manifests.load(repo_id).statuses  # (as kept: the manifest shows them live)
    except NotFoundError:
        return
    gone = {
        variant.name: 0
        for variant in manifest.variants
        if variant.name in recorded
        and recorded[variant.name].status == "downloaded"
        and not all(
            store.has_file(repo_id, path, manifest.commit_id) for path in (*variant.files, *manifest.shared)
        )
    }
    if gone:
        store.manifests.set_statuses(repo_id, gone, "available")
