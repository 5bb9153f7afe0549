"""A stateful model of the store: imports, removals, gc, verify, on-disk corruption and reads.

The model is plain Python: repo -> branch -> commit, repo -> commit -> folder, and which contents are
corrupt on disk (undetected), quarantined (detected) or sitting in blobs/ as orphans. After every step
the store must agree with it, and every file that is not corrupt must read back byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import SMALL_CHUNK, flip_byte, store_files_consistent, write_model_dir
from modeldepot import CorruptBlobError, Depot, RepoNotFoundError
from modeldepot.gitobjects import commit_id_for_tree

_rng = random.Random(20240611)
CONTENTS = [
    b"",
    b'{"model_type": "bert", "hidden_size": 32}',
    _rng.randbytes(2 * SMALL_CHUNK + 1234),  # three chunks, the last one short
    _rng.randbytes(SMALL_CHUNK),  # exactly one chunk
    _rng.randbytes(5000),
]
EMPTY, CFG, BIG, ONE, SMALL = CONTENTS
# Folders share contents, so imports into different repos and branches deduplicate.
FOLDERS: list[dict[str, bytes]] = [
    {"config.json": CFG, "model.safetensors": BIG, "empty.txt": EMPTY},
    {"config.json": CFG, "model.safetensors": ONE},
    {"config.json": SMALL, "onnx/model.onnx": BIG, "onnx/model.onnx_data": ONE},
    {"tokenizer.json": CFG, "weights/a.bin": BIG, "weights/b.bin": BIG},  # one content twice
    {"config.json": CFG, "model.safetensors": BIG, "empty.txt": SMALL},  # differs from 0 in one file
]
SHA = {content: hashlib.sha256(content).hexdigest() for content in CONTENTS}
SIZE = {sha: len(content) for content, sha in SHA.items()}
REPOS = ["org/alpha", "org/beta", "other/gamma"]
BRANCHES = ["main", "dev"]


def folder_shas(folder: int) -> set[str]:
    return {SHA[content] for content in FOLDERS[folder].values()}


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="modeldepot-state-"))
        self.sources = [write_model_dir(self.tmp / f"src{i}", files) for i, files in enumerate(FOLDERS)]
        self.depot = Depot(self.tmp / "store", chunk_size=SMALL_CHUNK)
        self.refs: dict[str, dict[str, str]] = {}  # repo -> branch -> commit id
        self.revisions: dict[str, dict[str, int]] = {}  # repo -> commit id -> folder
        self.tree_of_folder: dict[int, str] = {}
        self.folder_of_commit: dict[str, int] = {}
        self.corrupt: dict[str, int] = {}  # sha256 -> offset of the flipped byte (not yet detected)
        self.quarantined: set[str] = set()
        # The copies under quarantine/ of each blob, until the next gc or a write that places the blob again
        self.quarantine_copies: Counter[str] = Counter()
        self.orphans: dict[Path, int] = {}  # files in blobs/ that no index row names

    def teardown(self) -> None:
        self.depot.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- model helpers ------------------------------------------------------------------------------------

    def tree_oid(self, commit_id: str) -> str:
        rows = self.depot.store.index.read("SELECT tree_oid FROM revisions WHERE commit_id = ?", (commit_id,))
        return str(rows[0]["tree_oid"])

    def referenced(self, repo: str | None = None) -> set[str]:
        shas: set[str] = set()
        for name, commits in self.revisions.items():
            if repo is None or name == repo:
                for folder in commits.values():
                    shas |= folder_shas(folder)
        return shas

    def served_files(self) -> list[tuple[str, str, str, bytes]]:
        """(repo, branch, path, content) of every file a branch points at."""
        return [
            (repo, branch, path, content)
            for repo, branches in sorted(self.refs.items())
            for branch, commit in sorted(branches.items())
            for path, content in sorted(FOLDERS[self.revisions[repo][commit]].items())
        ]

    def quarantine(self, sha: str) -> None:
        self.corrupt.pop(sha)
        self.quarantined.add(sha)
        self.quarantine_copies[sha] += 1

    @property
    def quarantine_bytes(self) -> int:
        return sum(SIZE[sha] * copies for sha, copies in self.quarantine_copies.items())

    def forget_unreferenced(self, before: set[str], freed_blobs: int, freed_bytes: int) -> None:
        freed = before - self.referenced()
        assert freed_blobs == len(freed)
        assert freed_bytes == sum(SIZE[s] for s in freed if s not in self.quarantined)
        for sha in freed:
            assert not self.depot.store.blobs.path(sha).exists()
            self.corrupt.pop(sha, None)
            self.quarantined.discard(sha)

    def corruptible(self) -> list[str]:
        return sorted(s for s in self.referenced() - self.quarantined - set(self.corrupt) if SIZE[s])

    # -- rules --------------------------------------------------------------------------------------------

    @rule(
        folder=st.integers(0, len(FOLDERS) - 1), repo=st.sampled_from(REPOS), branch=st.sampled_from(BRANCHES)
    )
    def import_folder(self, folder: int, repo: str, branch: str) -> None:
        before = self.referenced()
        restored = folder_shas(folder) & self.quarantined
        head = self.refs.get(repo, {}).get(branch)
        result = self.depot.import_dir(self.sources[folder], repo, branch)
        # The branch's head when it holds the folder already, else a commit of its tree on top of the head
        tree = self.tree_of_folder.setdefault(folder, self.tree_oid(result.commit_id))
        if head is not None and self.revisions[repo][head] == folder:
            assert result.commit_id == head
        else:
            assert result.commit_id == commit_id_for_tree(tree, head)
        assert self.folder_of_commit.setdefault(result.commit_id, folder) == folder
        new = (folder_shas(folder) - before) | restored  # (a restored blob's bytes are written anew)
        assert (result.new_blobs, result.new_bytes) == (len(new), sum(SIZE[s] for s in new))
        assert result.files == len(FOLDERS[folder])
        self.refs.setdefault(repo, {})[branch] = result.commit_id
        self.revisions.setdefault(repo, {})[result.commit_id] = folder
        self.quarantined -= restored
        for sha in new:  # (placed: its corrupt copies go)
            self.quarantine_copies.pop(sha, None)
        if restored:
            event("import restored a quarantined blob")

    @rule(repo=st.sampled_from(REPOS))
    def remove_repo(self, repo: str) -> None:
        if repo not in self.revisions:
            with pytest.raises(RepoNotFoundError):
                self.depot.remove(repo)
            return
        before = self.referenced()
        result = self.depot.remove(repo)
        assert sorted(result.commits) == sorted(self.revisions[repo])
        del self.revisions[repo], self.refs[repo]
        self.forget_unreferenced(before, result.blobs_removed, result.bytes_freed)

    @precondition(lambda self: bool(self.revisions))
    @rule(data=st.data())
    def remove_revision(self, data: st.DataObject) -> None:
        repo = data.draw(st.sampled_from(sorted(self.revisions)), label="repo")
        which = data.draw(
            st.sampled_from(sorted(self.refs[repo]) + sorted(self.revisions[repo])), label="rev"
        )
        commit = self.refs[repo].get(which, which)
        before = self.referenced()
        result = self.depot.remove(repo, which)
        others = sorted(b for b, c in self.refs[repo].items() if c == commit and b != which)
        if which in self.refs[repo] and others:  # a branch whose commit another ref names: it goes alone
            assert (result.ref_removed, list(result.commit_kept_for), result.commits) == (which, others, ())
            del self.refs[repo][which]
            event("removing a branch that shares its commit removed the branch alone")
            return
        assert result.commits == (commit,)
        del self.revisions[repo][commit]
        self.refs[repo] = {b: c for b, c in self.refs[repo].items() if c != commit}
        if not self.revisions[repo]:
            del self.revisions[repo], self.refs[repo]
            event("removing the last revision removed the repo")
        self.forget_unreferenced(before, result.blobs_removed, result.bytes_freed)

    @rule(payload=st.binary(max_size=64))
    def drop_orphan_blob(self, payload: bytes) -> None:
        """A file placed in blobs/ whose index commit never happened (a writer killed at that moment)."""
        content = b"orphan:" + payload
        path = self.depot.store.blobs.path(hashlib.sha256(content).hexdigest())
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        self.orphans[path] = len(content)

    @rule()
    def gc(self) -> None:
        report = self.depot.gc()
        assert report.blobs_removed == len(self.orphans)
        assert report.bytes_freed == sum(self.orphans.values()) + self.quarantine_bytes
        assert (report.partials_removed, report.snapshots_removed, report.kept_partials) == (0, 0, 0)
        assert not any(path.exists() for path in self.orphans)
        self.orphans.clear()
        self.quarantine_copies.clear()

    @precondition(lambda self: bool(self.corruptible()))
    @rule(data=st.data())
    def corrupt_blob(self, data: st.DataObject) -> None:
        sha = data.draw(st.sampled_from(self.corruptible()), label="blob")
        offset = data.draw(st.integers(0, SIZE[sha] - 1), label="offset")
        path = self.depot.store.blobs.path(sha)
        os.chmod(path, 0o644)  # blobs are read-only (root could write anyway)
        flip_byte(path, offset)
        os.chmod(path, 0o444)
        self.corrupt[sha] = offset

    @rule(data=st.data())
    def verify(self, data: st.DataObject) -> None:
        repo = data.draw(st.sampled_from([None, *sorted(self.revisions)]), label="scope")
        in_scope = self.referenced(repo)
        report = self.depot.verify(repo)
        newly = {s for s in self.corrupt if s in in_scope}
        # A flipped byte keeps the size, so the digest of the chunk holding it is what fails.
        expected = {(s, "chunk") for s in newly} | {(s, "quarantined") for s in self.quarantined & in_scope}
        assert {(p.sha256, p.problem) for p in report.problems} == expected
        # (rehashed: those quarantined before are problems, not checked again, as their bytes are not counted)
        assert report.blobs_checked == len(in_scope - self.quarantined)
        assert report.index_ok
        assert report.ok == (not expected)
        assert report.snapshots_repaired == 0
        for problem in report.problems:
            assert problem.files, "every problem names the files that use the blob"
            if problem.sha256 in newly:
                assert problem.detail.startswith(f"chunk {self.corrupt[problem.sha256] // SMALL_CHUNK} ")
                assert problem.quarantined_to is not None
                kept = Path(problem.quarantined_to).read_bytes()  # the damaged bytes, kept for inspection
                assert len(kept) == SIZE[problem.sha256]
                assert hashlib.sha256(kept).hexdigest() != problem.sha256
                assert not self.depot.store.blobs.path(problem.sha256).exists()
        for sha in newly:
            self.quarantine(sha)
        if newly:
            event("verify quarantined a corrupt blob")

    @precondition(lambda self: bool(self.served_files()))
    @rule(data=st.data())
    def read_chunk(self, data: st.DataObject) -> None:
        repo, branch, path, content = data.draw(st.sampled_from(self.served_files()), label="file")
        sha = SHA[content]
        last = max(0, (len(content) - 1) // SMALL_CHUNK)
        if sha in self.corrupt and data.draw(st.booleans(), label="aim at the bad chunk"):
            index = self.corrupt[sha] // SMALL_CHUNK
        else:
            index = data.draw(st.integers(0, last), label="chunk")
        if sha in self.quarantined or (sha in self.corrupt and self.corrupt[sha] // SMALL_CHUNK == index):
            with pytest.raises(CorruptBlobError):
                self.depot.get_chunk(repo, path, index, branch)
            if sha in self.corrupt:  # detected on read: quarantined at once, before any verify
                self.quarantine(sha)
                assert not self.depot.store.blobs.path(sha).exists()
                event("get_chunk caught a corrupt chunk")
            return
        with self.depot.get_chunk(repo, path, index, branch) as view:
            assert view.tobytes() == content[index * SMALL_CHUNK : (index + 1) * SMALL_CHUNK]

    # -- invariants ---------------------------------------------------------------------------------------

    @invariant()
    def index_and_disk_agree(self) -> None:
        assert store_files_consistent(self.depot) == []
        summaries = self.depot.list_repos()
        assert {s.repo_id: s.refs for s in summaries} == self.refs
        assert {s.repo_id: s.revisions for s in summaries} == {r: len(c) for r, c in self.revisions.items()}
        for repo, commits in self.revisions.items():
            assert {rev.commit_id for rev in self.depot.repo_info(repo).revisions} == set(commits)
        usage = self.depot.du()
        live = self.referenced() - self.quarantined
        assert (usage.blobs, usage.blob_bytes) == (len(live), sum(SIZE[s] for s in live))
        assert usage.quarantine_bytes == self.quarantine_bytes
        assert usage.partial_bytes == 0

    @invariant()
    def files_read_back(self) -> None:
        for repo, branch, path, content in self.served_files():
            sha = SHA[content]
            if sha in self.quarantined:
                assert not self.depot.has_file(repo, path, branch)
                for read in (self.depot.get_file, self.depot.open_file, self.depot.file_path):
                    with pytest.raises(CorruptBlobError):
                        read(repo, path, branch)
                continue
            assert self.depot.has_file(repo, path, branch)
            if sha in self.corrupt:
                continue  # undetected damage: served as is until a chunk read or verify catches it
            with self.depot.get_file(repo, path, branch) as view:
                assert view.tobytes() == content
            with self.depot.open_file(repo, path, branch) as stream:
                assert stream.read() == content
            assert self.depot.file_path(repo, path, branch).read_bytes() == content


TestStoreStateMachine = StoreMachine.TestCase
TestStoreStateMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
