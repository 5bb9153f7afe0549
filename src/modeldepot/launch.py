"""The ``modeldepot`` command's entry point: light, so that it runs before the command's modules load."""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Load the command and run it; a Ctrl-C while it loads ends it as one during a command does (exit 130,
    one line), not with a traceback of the imports."""
    try:
        from modeldepot.cli import main as command
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)
    command()
