"""The package's version, and the build a node announces: the version plus a digest of the code it runs.

The version number moves with releases; a node built from a checkout between two releases runs different
code under the same number. Peers, the dashboard and ``/api/depot/v1/info`` show ``version+build`` (a PEP 440
local version, as ``torch`` writes ``2.1.0+cu118``) so an operator can tell which nodes were upgraded: the
build is a digest of the package's own files, the same for a wheel, an editable install or a copy of one.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__version__ = "0.2.0"

_BUILD_DIGITS = 12


@functools.lru_cache(maxsize=1)
def build_id() -> str:
    """A digest of every file of the installed package (its code and the dashboard's assets), 12 hex digits."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    files = sorted(
        path
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.relative_to(package).parts
    )
    for path in files:
        name = path.relative_to(package).as_posix().encode()
        content = path.read_bytes()
        digest.update(len(name).to_bytes(4, "big") + name + len(content).to_bytes(8, "big"))
        digest.update(content)
    return digest.hexdigest()[:_BUILD_DIGITS]


def node_version() -> str:
    """What a node announces as its version: ``0.2.0+3f2a1c9d0e1b``."""
    return f"{__version__}+{build_id()}"
