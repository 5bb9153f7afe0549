"""Validation of every name that reaches the store: repo ids, file paths inside a repo, revisions.

Every public entry point (library, CLI, server) calls these before touching the disk, so a bad name is
refused with :class:`~modeldepot.errors.InvalidInputError` and nothing is read or written.

The rules follow the Hub where it has one (repo ids: ``huggingface_hub.utils.validate_repo_id``) and
are stricter where a name becomes a path on our disk: no traversal, no absolute paths, no backslashes,
no control characters, no segment that percent-decodes (once or repeatedly) into a traversal.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import TypeVar
from urllib.parse import unquote

from modeldepot.errors import (
    InvalidInputError,
    InvalidPathError,
    InvalidRepoIdError,
    InvalidRevisionError,
    UpstreamDataError,
)

__all__ = [
    "MAX_FILE_SIZE",
    "MAX_LABEL_LENGTH",
    "MAX_PATH_BYTES",
    "MAX_REPO_PART_LENGTH",
    "MAX_REVISION_LENGTH",
    "MAX_SEGMENT_BYTES",
    "from_upstream",
    "is_commit_id",
    "parse_cluster_url",
    "validate_blake3",
    "validate_branch",
    "validate_cluster_prefix",
    "validate_commit_id",
    "validate_endpoint",
    "validate_git_oid",
    "validate_label",
    "validate_new_branch",
    "validate_path",
    "validate_quants",
    "validate_repo_id",
    "validate_revision",
    "validate_sha256",
    "validate_size",
]

# The Hub's limit, of the org and of the name each (huggingface_hub's REPO_ID_REGEX): of the whole id, a real
# `org/` and 90-character name could not be pulled, served or mirrored (an explorer's trial)
MAX_REPO_PART_LENGTH = 96
MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255  # NAME_MAX on every filesystem we care about
MAX_REVISION_LENGTH = 200
MAX_FILE_SIZE = (
    1 << 42
)  # 4 TiB: far above any model file (the Hub's largest are tens of GB), far below overflow
MAX_LABEL_LENGTH = 200  # a tag, pipeline tag or library name an upstream describes a repo with

_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")
_REF_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_HEX = {40: re.compile(r"[0-9a-f]{40}"), 64: re.compile(r"[0-9a-f]{64}")}

T = TypeVar("T")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_CLUSTER_PREFIX = re.compile(r"(/[A-Za-z0-9._-]{1,64}){1,8}")
_MEM_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CLUSTER_USAGE = "etcd://HOST:PORT[,HOST:PORT...], etcds:// for TLS (or mem://NAME in tests)"


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


_CREDENTIALS = re.compile(r"//[^/?#@]*@")


def redact_credentials(url: str) -> str:
    """``url`` with the user and password of its authority (``//user:pass@``) said as ``//***@``: a password in
    a URL is never echoed."""
    return _CREDENTIALS.sub("//***@", url)


_REPO_URL = re.compile(r"(?:https?://)?[^/]+\.[a-z]+/(?:models/)?([^/]+/[^/]+?)(?:/(?:tree|blob|resolve)/.*)?/?",
                       re.IGNORECASE)  # fmt: skip


def _as_an_id(text: str) -> str:
    """What to type for a repo given as its web page's URL (pasted from a browser), with no org, or with a
    quantization after a ':' (as llama.cpp's `-hf` and Ollama's `hf.co/` take it): said as the error's hint (a
    URL read as an id with two '/' too many said nothing of what was meant: a trial)."""
    head, colon, tag = text.rpartition(":")
    if colon and head and "/" not in tag:  # (not a URL's scheme: its tag is after the last '/')
        said = _as_an_id(head)
        with contextlib.suppress(InvalidRepoIdError):
            said = said or f": give the id alone ({validate_repo_id(head)!r})"
        if said and tag.lower() == "latest":  # (Ollama's default tag: the default variant needs none)
            return f"{said}; without --quant, a load takes the default variant"
        if said and _REF_SEGMENT.fullmatch(tag):  # (a quantization: the CLI's -q, the API's quant=)
            return f"{said}, and the quantization apart (-q {tag}, quant={tag!r})"
        return said
    if "/" not in text and text:
        return f": give its org too (like 'ORG/{text}', as the Hub names it)"
    found = _REPO_URL.fullmatch(
        re.split(r"[?#]", text.strip(), maxsplit=1)[0]
    )  # (a page's query, its anchor)
    if found is None:
        return ""
    try:
        return f": give the id alone ({validate_repo_id(found.group(1))!r})"
    except InvalidRepoIdError:
        return ""


def validate_repo_id(repo_id: object) -> str:
    """Return ``repo_id`` if it is a valid ``org/name`` id, else raise InvalidRepoIdError."""
    if not isinstance(repo_id, str):
        raise InvalidRepoIdError(f"repo id must be a string like 'org/name', got {type(repo_id).__name__}")
    shown = _describe(repo_id)
    if len(repo_id) > 2 * MAX_REPO_PART_LENGTH + 1:
        raise InvalidRepoIdError(f"repo id {shown} is longer than {2 * MAX_REPO_PART_LENGTH + 1} characters")
    parts = repo_id.split("/")
    if len(parts) != 2:
        raise InvalidRepoIdError(f"repo id {shown} must have the form 'org/name' (exactly one '/')"
                                 + _as_an_id(repo_id))  # fmt: skip
    for part in parts:
        if not part:
            raise InvalidRepoIdError(f"repo id {shown} has an empty org or name")
        if len(part) > MAX_REPO_PART_LENGTH:
            raise InvalidRepoIdError(f"repo id {shown}: its org and its name may each be {MAX_REPO_PART_LENGTH} "
                                     f"characters at most ({part[:12]}… is {len(part)})")  # fmt: skip
        if not _REPO_PART.fullmatch(part):
            raise InvalidRepoIdError(
                f"repo id {shown}: org and name may use only letters, digits, '-', '_' and '.', "
                "and must start with a letter or digit" + (_as_an_id(repo_id) if ":" in repo_id else "")
            )
        if "--" in part or ".." in part:
            raise InvalidRepoIdError(f"repo id {shown} may not contain '--' or '..'")
        if part.endswith((".", "-", ".git")):
            raise InvalidRepoIdError(f"repo id {shown}: a part may not end with '.', '-' or '.git'")
    return repo_id


def _decodes_to_traversal(segment: str) -> bool:
    """True if percent-decoding the segment (up to 3 times) yields '.', '..' or a separator."""
    current = segment
    for _ in range(3):
        decoded = unquote(current)
        if decoded == current:
            return False
        if decoded in (".", "..") or any(c in decoded for c in "/\\\x00"):
            return True
        current = decoded
    return False


def validate_path(path: object) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a repo, else raise InvalidPathError."""
    if not isinstance(path, str):
        hint = (
            f": give its text, relative to the repo root ({path.as_posix()!r})"
            if isinstance(path, PurePath)
            else ""
        )
        raise InvalidPathError(f"file path must be a string, got {type(path).__name__}{hint}")
    shown = _describe(path)
    if not path:
        raise InvalidPathError("file path is empty")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidPathError(f"file path {shown} is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise InvalidPathError(f"file path {shown} is absolute; give it relative to the repo root")
    if "\\" in path:
        raise InvalidPathError(f"file path {shown} contains a backslash; use '/' between folders")
    # A byte that is not UTF-8, as Python reads such a name from a disk: said so first, shown escaped (its
    # control characters too: a newline split the message, an escape sequence reached the terminal, a review)
    escaped = next((char for char in path if "\udc80" <= char <= "\udcff"), None)
    if escaped is not None:
        readable = _describe(path.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        raise InvalidPathError(f"file path {readable} is not UTF-8 text (its byte {ord(escaped) - 0xDC00:#04x}, "
                               "shown as \ufffd): rename it (the Hub's paths are UTF-8)")  # fmt: skip
    for char in path:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise InvalidPathError(f"file path {shown} contains a control character")
        if char in _BIDI_CONTROLS:
            # (a name that reads as another's: "r\u202etxt.exe" shows as "rexe.txt", a security trial)
            raise InvalidPathError(f"file path {shown} contains a bidirectional control character "
                                   f"(U+{ord(char):04X}): it would show as another name")  # fmt: skip
    for segment in path.split("/"):
        if not segment:
            raise InvalidPathError(f"file path {shown} has an empty segment ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise InvalidPathError(f"file path {shown} contains '{segment}'; paths may not leave the repo")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise InvalidPathError(f"file path {shown} has a segment longer than {MAX_SEGMENT_BYTES} bytes")
        if _decodes_to_traversal(segment):
            raise InvalidPathError(f"file path {shown} contains a percent-encoded traversal")
    return path


# Embeddings, overrides and isolates: they reorder how the text around them shows
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def is_commit_id(revision: str) -> bool:
    """A full, lowercase 40-hex commit id (what the Hub sends in X-Repo-Commit)."""
    return _COMMIT_ID.fullmatch(revision) is not None


def validate_branch(name: object) -> str:
    """Return ``name`` if it is a valid branch (ref) name such as ``main`` or ``refs/pr/1``."""
    if not isinstance(name, str):
        raise InvalidRevisionError(f"revision must be a string, got {type(name).__name__}")
    shown = _describe(name)
    if not name:
        raise InvalidRevisionError("revision is empty")
    if len(name) > MAX_REVISION_LENGTH:
        raise InvalidRevisionError(f"revision {shown} is longer than {MAX_REVISION_LENGTH} characters")
    if is_commit_id(name):
        raise InvalidRevisionError(
            f"revision {shown} looks like a commit id; a branch name is needed here "
            "(an import makes its commit id from the files and the branch's head)"
        )
    if ".." in name:
        raise InvalidRevisionError(f"revision {shown} may not contain '..' (git ref rules)")
    if name == "HEAD":  # (the Hub routes read it as the default branch before they validate)
        raise InvalidRevisionError("revision 'HEAD' is git's name for the default branch: write main")
    if name.startswith(("refs/heads/", "refs/tags/")):
        raise InvalidRevisionError(
            f"revision {shown}: name the branch or tag without its {'/'.join(name.split('/')[:2])}/ "
            "(as the Hub lists them)"
        )
    for segment in name.split("/"):
        if not segment or not _REF_SEGMENT.fullmatch(segment):
            raise InvalidRevisionError(
                f"revision {shown} is not a valid branch name: use letters, digits, '-', '_', '.' "
                "and '/' between non-empty parts"
            )
        if segment.endswith(".lock") or segment.startswith((".", "-")):
            raise InvalidRevisionError(f"revision {shown} is not a valid branch name (git ref rules)")
    return name


SHORT_COMMIT = re.compile(r"[0-9a-f]{7,39}")  # the start of a commit id, as git and `info` print them


def validate_new_branch(name: object) -> str:
    """A branch name a write may create: a valid one (:func:`validate_branch`) that cannot be read as the
    start of a commit id, in any case (reads take those, in capitals too, as git does: a branch named
    ``abcdef1`` or ``ABCDEF1`` would shadow the commit)."""
    validate_branch(name)
    assert isinstance(name, str)
    if SHORT_COMMIT.fullmatch(name.lower()) or is_commit_id(name.lower()):
        raise InvalidRevisionError(
            f"branch name {_describe(name)} reads as the start of a commit id: choose a name with other "
            "characters too"
        )
    return name


def validate_revision(revision: object) -> str:
    """Return ``revision`` if it is a full commit id or a valid branch name."""
    if isinstance(revision, str) and is_commit_id(revision):
        return revision
    return validate_branch(revision)


def _hex_digest(value: object, digits: int, what: str) -> str:
    if not isinstance(value, str) or _HEX[digits].fullmatch(value) is None:
        raise InvalidInputError(f"{what} {_describe(value)} is not {digits} lowercase hex digits")
    return value


def validate_commit_id(value: object) -> str:
    """A full commit id: 40 lowercase hex digits (it names a snapshot folder)."""
    return _hex_digest(value, 40, "commit id")


def validate_sha256(value: object) -> str:
    """A SHA-256 digest: 64 lowercase hex digits (it names a blob and a partial download)."""
    return _hex_digest(value, 64, "SHA-256")


def validate_git_oid(value: object) -> str:
    """A git blob id: 40 lowercase hex digits."""
    return _hex_digest(value, 40, "git oid")


def validate_blake3(value: object) -> str:
    """A chunk's BLAKE3 digest: 64 lowercase hex digits."""
    return _hex_digest(value, 64, "BLAKE3 digest")


def validate_size(value: object, maximum: int = MAX_FILE_SIZE) -> int:
    """A byte count: an integer (not a bool) from 0 to ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"size {_describe(value)} is not an integer")
    if not 0 <= value <= maximum:
        raise InvalidInputError(f"size {value} is outside 0..{maximum}")
    return value


TENSOR_DIMS_MAX = (
    64  # dimensions of a model file's tensor: more is no model's (ggml has 4), and work to multiply
)


def tensor_elements(shape: Sequence[object], most: int) -> int:
    """The elements of a tensor of ``shape`` (as a model file's header gives it), at most ``most`` (a bound
    the file's size gives); ValueError for a shape that is not whole non-negative numbers, of more than
    :data:`TENSOR_DIMS_MAX` dimensions, or of more elements: multiplied whole, 120,000 dimensions of 2**60
    from a 2.4 MB header held every thread of a node for 25 s, their product too big to answer (an
    explorer's trial)."""
    if len(shape) > TENSOR_DIMS_MAX:
        raise ValueError(f"has {len(shape)} dimensions")
    if not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError("has a dimension that is not a whole number of 0 or more")
    dims: list[int] = [n for n in shape if isinstance(n, int)]
    if 0 in dims:
        return 0
    elements = 1
    for n in dims:
        elements *= n
        if elements > most:
            raise ValueError(f"has more elements than its file could hold ({most})")
    return elements


def validate_label(value: object) -> str:
    """A short descriptive string (a tag, a pipeline tag, a library name): printable, one line."""
    if not isinstance(value, str):
        raise InvalidInputError(f"label {_describe(value)} is not a string")
    if len(value) > MAX_LABEL_LENGTH:
        raise InvalidInputError(f"label {_describe(value)} is longer than {MAX_LABEL_LENGTH} characters")
    if any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in value):
        raise InvalidInputError(f"label {_describe(value)} contains a control character")
    return value


def is_label(value: object) -> bool:
    """Whether ``value`` passes :func:`validate_label`."""
    try:
        validate_label(value)
    except InvalidInputError:
        return False
    return True


MAX_TAGS = 1000  # tags a repo is described with, at most (an upstream's more are refused)


def validate_quants(quants: object) -> list[str] | str | None:
    """What a pull takes: None (the whole repo), ``"all"`` (every variant), or variants' names; one name
    alone is a list of one (``pull(repo, "fp16")`` went through it letter by letter)."""
    if quants is None or quants == "all":
        return quants
    if isinstance(quants, str):
        quants = [quants]
    if not isinstance(quants, (list, tuple)) or not quants:
        raise InvalidInputError(
            f"quants must be None (the whole repo), 'all' or variants' names, not {_describe(quants)}"
        )
    return [validate_quant(quant) for quant in quants]


def validate_quant(quant: object) -> str:
    """A variant's name as a caller gives it (``fp16``, ``Q4_K_M``): a short one-line string, not empty, no
    path (``-q ''`` or ``-q ../x`` was "has no variant", a miss, not bad input)."""
    if (
        not isinstance(quant, str)
        or not quant.strip()
        or len(quant) > MAX_LABEL_LENGTH
        or any(c in "/\\" or unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in quant)
    ):
        raise InvalidInputError(
            f"a variant's name is a short one-line string like 'q4f16', not {_describe(quant)}"
        )
    return quant


def from_upstream(source: str, field: str, check: Callable[[object], T], value: object) -> T:
    """``check(value)``, for a value an upstream sent: a failure is that upstream's fault, and says so.

    The same validators guard user input and upstream answers; only the error differs
    (:class:`~modeldepot.errors.UpstreamDataError`, naming the upstream and the field).
    """
    try:
        return check(value)
    except InvalidInputError as error:
        raise UpstreamDataError(source, field, str(error)) from None


def validate_cluster_prefix(prefix: object) -> str:
    """A registry key prefix: ``/`` then 1-8 names of ``[A-Za-z0-9._-]`` (not ``.`` or ``..``), like
    ``/modeldepot`` or ``/fleets/prod``; one trailing ``/`` is dropped."""
    if isinstance(prefix, str) and prefix.endswith("/") and prefix != "/":
        prefix = prefix[:-1]
    if (
        not isinstance(prefix, str)
        or _CLUSTER_PREFIX.fullmatch(prefix) is None
        or any(part in (".", "..") for part in prefix.split("/"))
    ):
        raise InvalidInputError(
            f"registry prefix {prefix!r} must look like /modeldepot (/NAME, up to 8 levels)"
        )
    if prefix.rsplit("/", 1)[-1] in _FLEET_LAYOUT:
        # (`/modeldepot/nodes` lays its keys where the `/modeldepot` fleet keeps its own: each of that fleet's
        # processes warned of them as bad entries, an explorer's trial)
        raise InvalidInputError(f"registry prefix {prefix!r} must not end in a name a fleet keeps its entries "
                                f"under ({', '.join(_FLEET_LAYOUT)}): name it otherwise, like /modeldepot-nodes")  # fmt: skip
    return prefix


_FLEET_LAYOUT = ("nodes", "holdings", "claims")  # the folders of a fleet's keys (discovery/etcd/wire.py)


def validate_endpoint(host: object, port: object) -> tuple[str, int]:
    """An etcd member's address: a host name, an IPv4 address or an IPv6 one (bare or in brackets), and a
    port 1-65535. Returns the host as gRPC takes it (IPv6 in brackets) and the port."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidInputError(f"etcd port {port!r} must be a number from 1 to 65535")
    if not isinstance(host, str) or not host:
        raise InvalidInputError(f"etcd host {host!r} must be a host name or an IP address")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in bare:
        try:
            return f"[{ipaddress.IPv6Address(bare).compressed}]", port
        except ValueError:
            raise InvalidInputError(f"etcd host {host!r} is not a valid IPv6 address") from None
    if bare != host or len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        raise InvalidInputError(f"etcd host {host!r} must be a host name or an IP address")
    return host, port


def parse_cluster_url(url: object) -> tuple[str, list[tuple[str, int]] | str]:
    """``("etcd", [(host, port), ...])``, ``("etcds", ...)`` or ``("mem", name)`` for a fleet registry's URL:
    ``etcd://HOST:PORT[,HOST:PORT...]`` (IPv6 hosts in brackets; the port is required), ``etcds://`` the same
    over TLS, or ``mem://NAME`` (a registry inside one process, for tests)."""
    if not isinstance(url, str):
        raise InvalidInputError(f"cluster URL must be a string, not {type(url).__name__}")
    shown = _describe(redact_credentials(url))  # (the whole URL, password and all, went to the log: a trial)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("etcd", "etcds", "mem"):
        raise InvalidInputError(f"cluster {shown} is not supported: use {_CLUSTER_USAGE}")
    if scheme == "mem":
        if not _MEM_NAME.fullmatch(rest):
            raise InvalidInputError(f"cluster {shown}: a mem registry's name is 1-64 of [A-Za-z0-9._-]")
        return "mem", rest
    rest = rest.removesuffix("/")
    if "@" in rest:
        raise InvalidInputError(
            f"cluster {shown}: etcd's user and password are not given in its URL: set "
            "MODELDEPOT_CLUSTER_USER and MODELDEPOT_CLUSTER_PASSWORD (or _PASSWORD_FILE)"
        )
    if not rest or any(c in rest for c in "/?#@ "):
        raise InvalidInputError(f"cluster {shown} must be {_CLUSTER_USAGE}: hosts and ports only")
    endpoints = []
    for member in rest.split(","):
        host, colon, port = member.rpartition(":")
        if not colon or not port.isascii() or not port.isdigit() or len(port) > 5:
            raise InvalidInputError(f"cluster {shown}: {member!r} is not HOST:PORT ({_CLUSTER_USAGE})")
        try:
            endpoints.append(validate_endpoint(host, int(port)))
        except InvalidInputError as error:
            raise InvalidInputError(f"cluster {shown}: {error}") from None
    return scheme, endpoints
