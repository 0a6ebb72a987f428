"""Thread counts: resolved once at an entry point (default: every core), then passed down."""

from __future__ import annotations

import os

from .errors import WorkbenchError


def default_threads() -> int:
    """Every core of this machine."""
    return os.cpu_count() or 1


def check_positive(threads) -> int:
    """`threads` as an int, refused unless it is a whole number of at least 1."""
    if isinstance(threads, bool) or not isinstance(threads, (int, float)) or int(threads) != threads or threads < 1:
        raise WorkbenchError(f"a thread count must be a positive integer, got {threads!r}; "
                             f"this machine has {default_threads()} cores")
    return int(threads)


def resolve_threads(threads: int | None, cores: int | None = None) -> int:
    """The thread count to use: `threads` when given, between 1 and `cores` (default: this machine's),
    else every core. More threads than cores only time the cores' sharing, so they are refused."""
    cores = cores or default_threads()
    if threads is None:
        return cores
    threads = check_positive(threads)
    if threads > cores:
        raise WorkbenchError(f"a thread count must be between 1 and the device's {cores} cores, got {threads}; "
                             f"pass --threads between 1 and {cores}")
    return threads
