"""What a depot counts as a use of a model, in its store's access log (store/access.py): the repo's uses
(what ``--preload-top`` and ``stats`` rank) and each variant's last use (the disk budget evicts the variants
of a revision apart: the quant read every day stays, the one pulled once and never read goes).

A file read here is a use of the variant it is one of (of the repo, when it has none); a file a node's client downloads
counts once for that variant (a config or tokenizer, which comes with any variant, only marks the repo as
used now), at its first byte: a client's ranges after that one are the same download; a snapshot folder handed to a loader is a use of every variant in it (what the loader reads is
not seen). A file several variants list (a GGUF repo's mmproj) is theirs in common: a use of the repo.
"""

from __future__ import annotations

from modeldepot.hub.variants import group_files
from modeldepot.store import Store
from modeldepot.store.models import FileEntry

__all__ = ["UseCounter"]


class UseCounter:
    """Counts one store's uses (a shared store's files are not its to count: the caller asks only for the
    own store's)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # (repo, commit) -> its files' variants by path (a commit's files only change by `rm --quant`, which
        # takes the variant's files away with their names, or by a pull adding a variant: read again then)
        self._owners: dict[tuple[str, str], dict[str, str | None]] = {}

    def read(self, entry: FileEntry) -> None:
        """A local read of a file (an engine in this process reads a model's files whatever they are): a use
        of its variant, as a file sent is (a read of one quant counted the whole repo, and the RAM tier's
        `--preload-top` took every quant for the one used: a trial); of the repo when it has no variants."""
        owners = self.owners(entry.repo_id, entry.commit_id, entry.path)
        variant = owners.get(entry.path)
        if variant is not None:
            self.store.access.record(entry.repo_id, variant, commit_id=entry.commit_id)
        else:  # (a shared file, a config, comes with any variant: it marks the repo used now, counts no use)
            has_variants = any(name is not None for name in owners.values())
            self.store.access.record(entry.repo_id, count=0 if has_variants else 1, commit_id=entry.commit_id)

    def sent(self, entry: FileEntry) -> None:
        """A file a node sends to a client: a use of its variant (a client that fetched one quant made the
        whole repo popular, and the RAM tier preloaded every quant of it), or only of the repo, now."""
        variant = self.variant_of(entry.repo_id, entry.commit_id, entry.path)
        self.store.access.record(entry.repo_id, variant, count=1 if variant else 0, commit_id=entry.commit_id)

    def folder(self, repo_id: str, commit_id: str) -> None:
        """A revision's folder handed to a loader (``from_pretrained(path, variant="fp16")``): a use of the
        repo and of each of its variants, as what it reads is not seen and the budget must not take any of
        them for unused."""
        self.store.access.record(repo_id, commit_id=commit_id)
        for variant in {name for name in self.owners(repo_id, commit_id).values() if name is not None}:
            # (marked with its revision at one moment: the revision, older by microseconds, went first)
            self.store.access.record(repo_id, variant, count=0, commit_id=commit_id)

    def variant_of(self, repo_id: str, commit_id: str, path: str) -> str | None:
        """The variant ``path`` is one of in that commit (None: a shared file, or one of no variant)."""
        return self.owners(repo_id, commit_id, path).get(path)

    def owners(self, repo_id: str, commit_id: str, path: str | None = None) -> dict[str, str | None]:
        """Every file of that commit, and the variant it is one of (None: shared, or of no variant). Kept
        per commit; read again when ``path`` is not among them (a pull added a variant to the commit since:
        the names change with the files a commit holds, as fp16 becomes onnx-fp16 beside safetensors')."""
        key = (repo_id, commit_id)
        owners = self._owners.get(key)
        if owners is None or (path is not None and path not in owners):
            paths = sorted(
                self.store.file_sizes(repo_id, commit_id)
            )  # (paths alone: no entry built for each)
            grouping = group_files(paths)
            owners = dict.fromkeys(paths)
            listed: dict[str, list[str]] = {}
            for variant in grouping.variants:
                for listed_path in variant.files:
                    listed.setdefault(listed_path, []).append(variant.name)
            owners.update({p: names[0] for p, names in listed.items() if len(names) == 1})
            if len(self._owners) >= 256:
                self._owners.clear()
            self._owners[key] = owners
        return owners
