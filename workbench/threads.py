"""Thread counts: resolved once at an entry point (default: every core), then passed down."""

from __future__ import annotations

import os

from .errors import WorkbenchError


def default_threads() -> int:
    """Every core of this machine."""
    return os.cpu_count() or 1


def resolve_threads(threads: int | None) -> int:
    """The thread count to use: `threads` when given and sane, else every core."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or int(threads) != threads or threads < 1:
        raise WorkbenchError(f"a thread count must be a positive integer, got {threads!r}; "
                             f"this machine has {default_threads()} cores")
    return int(threads)
