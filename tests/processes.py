"""Helpers for tests that check no process outlives what started it."""

import os

import psutil


def group_alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    alive = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive
