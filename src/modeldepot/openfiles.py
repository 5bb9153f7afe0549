"""How many files this process may hold open: the soft ``RLIMIT_NOFILE``, raised where the system allows.

A node holds a socket and a blob per connection (server/connections.py sizes its cap from this); an
import with ``--link`` holds each linked file's lock until the import publishes (store/importer.py).
"""

from __future__ import annotations

__all__ = ["open_file_limit", "raise_open_file_limit"]

_UNLIMITED_FILES = 1 << 16  # what open_file_limit() assumes where it cannot ask (no `resource` module)


def open_file_limit() -> int:
    """The soft RLIMIT_NOFILE: how many descriptors this process may hold."""
    try:
        import resource
    except ImportError:  # Windows
        return _UNLIMITED_FILES
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED_FILES if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where the system allows it; the soft limit after."""
    try:
        import resource
    except ImportError:  # Windows
        return open_file_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # macOS refuses more than OPEN_MAX, some sandboxes refuse any change
            pass
    return open_file_limit()
