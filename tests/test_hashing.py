"""Digests: one pass gives SHA-256, per-chunk BLAKE3 and the git blob SHA-1, checked against references."""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeldepot.errors import IntegrityError
from modeldepot.gitobjects import (
    DEFAULT_LFS_PATTERNS,
    TreeEntry,
    commit_id_for_tree,
    git_blob_oid,
    is_lfs_path,
    lfs_patterns_from_gitattributes,
    lfs_pointer,
    tree_oids,
)
from modeldepot.hashing import (
    GIT_OID_LIMIT,
    STAGE_SIZE,
    BlobHasher,
    chunk_count,
    chunk_span,
    digest_bytes,
    digest_stream,
)


def reference_chunks(data: bytes, chunk_size: int) -> tuple[str, ...]:
    if not data:
        return (blake3.blake3(b"").hexdigest(),)
    return tuple(blake3.blake3(data[i : i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=5000), chunk_size=st.integers(1, 700), block_size=st.integers(1, 900),
       inline_bytes=st.sampled_from([0, 2500, 1 << 20]))  # fmt: skip
def test_stream_digest_matches_reference_for_any_blocking(
    data: bytes, chunk_size: int, block_size: int, inline_bytes: int
) -> None:
    sink = bytearray()
    digest = digest_stream(io.BytesIO(data).readinto, len(data), chunk_size, sink=sink.extend,
                           block_size=block_size, inline_bytes=inline_bytes)  # fmt: skip
    assert bytes(sink) == data
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.chunk_blake3 == reference_chunks(data, chunk_size)
    assert digest.git_sha1 == git_blob_oid(data)
    assert len(digest.chunk_blake3) == chunk_count(len(data), chunk_size)
    spans = [chunk_span(i, len(data), chunk_size) for i in range(chunk_count(len(data), chunk_size))]
    assert b"".join(data[o : o + n] for o, n in spans) == data


@pytest.mark.parametrize("size", [0, 1, STAGE_SIZE - 1, STAGE_SIZE, STAGE_SIZE + 1, 3 * STAGE_SIZE + 12345])
def test_cold_bytes_hashed_through_the_stage_give_the_same_sha256(size: int) -> None:
    """Bytes fed as out of the caches go through a small buffer in pieces: the digest must not change,
    whatever the size against the buffer's, and a second feed after the first must follow on from it."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    view = memoryview(data)
    hasher = BlobHasher(2 * size, 16 << 20)
    hasher.update_sha256(view, cold=True)
    hasher.update_sha256(memoryview(data[::-1]), cold=True)
    hasher.update_chunks(memoryview(data + data[::-1]))
    assert hasher.finish().sha256 == hashlib.sha256(data + data[::-1]).hexdigest()


def test_large_stream_uses_several_blocks_and_skips_git_oid() -> None:
    data = bytes(range(256)) * ((GIT_OID_LIMIT + 12345) // 256)
    progress: list[int] = []
    digest = digest_stream(io.BytesIO(data).readinto, len(data), 1 << 20, progress=progress.append)
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.git_sha1 is None  # LFS-sized: the Hub's ETag is the SHA-256
    assert digest.chunk_blake3 == reference_chunks(data, 1 << 20)
    assert progress[-1] == len(data) and len(progress) > 1 and progress == sorted(progress)


@pytest.mark.parametrize("inline_bytes", [0, 1 << 20])
def test_source_shorter_or_longer_than_announced_is_an_integrity_error(inline_bytes: int) -> None:
    with pytest.raises(IntegrityError, match="changed"):
        digest_stream(io.BytesIO(b"abc").readinto, 5, 4, inline_bytes=inline_bytes)
    with pytest.raises(IntegrityError, match="more"):
        digest_stream(io.BytesIO(b"abcdef").readinto, 5, 4, inline_bytes=inline_bytes)


def _git(args: list[str], cwd: Path, stdin: bytes | None = None) -> str:
    return (
        subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True, check=True)
        .stdout.decode()
        .strip()
    )


def test_git_object_ids_match_real_git(tmp_path: Path) -> None:
    """Blob, tree and commit ids agree with git itself (the Hub's tree oids come from git)."""
    _git(["init", "-q"], tmp_path)
    files = {
        "config.json": b"{}\n",
        "onnx/model.onnx": b"\x00" * 100,
        "onnx/sub/x.txt": b"x",
        "a-b": b"1",
        "a": b"2",
    }
    entries = []
    for path, data in files.items():
        assert git_blob_oid(data) == _git(["hash-object", "--stdin"], tmp_path, data)
        oid = _git(["hash-object", "-w", "--stdin"], tmp_path, data)
        _git(["update-index", "--add", "--cacheinfo", f"100644,{oid},{path}"], tmp_path)
        entries.append(TreeEntry(path, oid))
    trees = tree_oids(entries)
    assert trees[""] == _git(["write-tree"], tmp_path)
    assert trees["onnx"] == _git(["rev-parse", f"{trees['']}:onnx"], tmp_path)

    def commit_tree(*parent: str) -> str:
        return subprocess.run(
            ["git", "commit-tree", trees[""], *parent, "-m", "modeldepot import"],
            cwd=tmp_path, capture_output=True, check=True,
            env={"GIT_AUTHOR_NAME": "modeldepot", "GIT_AUTHOR_EMAIL": "modeldepot@localhost",
                 "GIT_AUTHOR_DATE": "@0 +0000", "GIT_COMMITTER_NAME": "modeldepot",
                 "GIT_COMMITTER_EMAIL": "modeldepot@localhost", "GIT_COMMITTER_DATE": "@0 +0000"},
        ).stdout.decode().strip()  # fmt: skip

    root = commit_tree()
    assert commit_id_for_tree(trees[""]) == root
    assert commit_id_for_tree(trees[""], root) == commit_tree("-p", root)  # an import on top of a head


def test_lfs_pointer_and_patterns() -> None:
    sha = hashlib.sha256(b"weights").hexdigest()
    assert (
        lfs_pointer(sha, 7)
        == f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize 7\n".encode()
    )
    patterns = lfs_patterns_from_gitattributes(
        "*.bin filter=lfs diff=lfs merge=lfs -text\n# *.txt filter=lfs\n*.md text\n"
    )
    assert patterns == ("*.bin",)
    assert is_lfs_path("sub/pytorch_model.bin", 10, patterns, GIT_OID_LIMIT)
    assert not is_lfs_path("README.md", 10, patterns, GIT_OID_LIMIT)
    assert is_lfs_path("README.md", GIT_OID_LIMIT, patterns, GIT_OID_LIMIT)  # too big for plain git
    assert is_lfs_path("onnx/model_q4f16.onnx", 10, DEFAULT_LFS_PATTERNS, GIT_OID_LIMIT)
    assert is_lfs_path("saved_model/variables/v.data", 10, DEFAULT_LFS_PATTERNS, GIT_OID_LIMIT)
    assert not is_lfs_path("tokenizer.json", 10, DEFAULT_LFS_PATTERNS, GIT_OID_LIMIT)


def test_digest_bytes_of_empty_blob_has_one_chunk() -> None:
    digest = digest_bytes(b"", 1024)
    assert digest.chunk_blake3 == (blake3.blake3(b"").hexdigest(),)
    assert digest.sha256 == hashlib.sha256(b"").hexdigest()
