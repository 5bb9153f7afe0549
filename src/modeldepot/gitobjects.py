"""Git object ids for repos that never lived in git (local imports).

An imported directory gets the ids a git + git-lfs push of the same files would have: LFS files are
represented in the tree by their pointer file, other files by their content, and the commit is a
fixed-author, epoch-dated commit of that tree, whose parent is the branch's head when it has one. The
same files imported on the same history therefore always get the same commit id, and the server can answer with the same ETags and tree oids as the Hub.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_LFS_PATTERNS",
    "TreeEntry",
    "commit_id_for_tree",
    "git_blob_oid",
    "is_lfs_path",
    "lfs_patterns_from_gitattributes",
    "lfs_pointer",
    "tree_oids",
]

# The Hub's default .gitattributes (every new model repo gets it), plus GGUF.
DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
    "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*", "*.gguf",
    "*.onnx_data", "*.onnx.data",
)  # fmt: skip

_COMMIT_IDENT = "modeldepot <modeldepot@localhost> 0 +0000"


def git_object_id(kind: str, body: bytes) -> str:
    return hashlib.sha1(b"%s %d\0" % (kind.encode(), len(body)) + body).hexdigest()


def git_blob_oid(data: bytes) -> str:
    return git_object_id("blob", data)


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands for a blob in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def lfs_patterns_from_gitattributes(text: str) -> tuple[str, ...]:
    """The patterns a .gitattributes file routes through git-lfs (``filter=lfs``)."""
    patterns = []
    for line in text.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return tuple(patterns)


def is_lfs_path(path: str, size: int, patterns: Iterable[str], size_limit: int) -> bool:
    """Whether a file is stored through LFS: it matches a pattern, or it is too big for plain git."""
    if size >= size_limit:
        return True
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        anchored = pattern.lstrip("/")
        if "/" in anchored:
            if fnmatch.fnmatchcase(path, anchored.replace("**/", "*")):
                return True
        elif fnmatch.fnmatchcase(name, anchored):
            return True
    return False


@dataclass(frozen=True)
class TreeEntry:
    path: str
    oid: str  # git blob oid of the content, or of the LFS pointer


def tree_oids(entries: Iterable[TreeEntry]) -> dict[str, str]:
    """Git tree oids of every directory ('' is the root), as ``git write-tree`` computes them."""
    children: dict[str, dict[str, tuple[str, str]]] = {"": {}}
    for entry in entries:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            children.setdefault("/".join(parts[:depth]), {})
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            name = parts[depth]
            if depth == len(parts) - 1:
                children[parent][name] = ("100644", entry.oid)
            else:
                children[parent].setdefault(name, ("40000", ""))
    oids: dict[str, str] = {}
    for directory in sorted(children, key=lambda d: d.count("/") + (d != ""), reverse=True):
        body = bytearray()
        items: Mapping[str, tuple[str, str]] = children[directory]
        # git sorts tree entries by name, comparing a directory's name as if it ended with '/'.
        for name in sorted(items, key=lambda n: n + "/" if items[n][0] == "40000" else n):
            mode, oid = items[name]
            if mode == "40000":
                oid = oids[f"{directory}/{name}" if directory else name]
            body += b"%s %s\0" % (mode.encode(), name.encode()) + bytes.fromhex(oid)
        oids[directory] = git_object_id("tree", bytes(body))
    return oids


def commit_id_for_tree(tree_oid: str, parent: str | None = None, message: str = "modeldepot import") -> str:
    """A deterministic commit of ``tree_oid`` on top of ``parent`` (the branch's head, if it has one): the
    same tree on the same history gets the same id on every machine."""
    parent_line = f"parent {parent}\n" if parent else ""
    body = f"tree {tree_oid}\n{parent_line}author {_COMMIT_IDENT}\ncommitter {_COMMIT_IDENT}\n\n{message}\n"
    return git_object_id("commit", body.encode())
