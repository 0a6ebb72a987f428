"""Helper processes that end with the process that started them, however it ends.

Two kinds of helpers outlive a killed parent unless told otherwise:

- The local cluster's tracker and servers. Each runs in its own session and process group
  (so one signal to the group ends the TVM workers it forks), which also means nothing
  ends them when the parent dies. A child started by `spawn_env()` learns its parent's pid
  from the environment and, with `watch_parent()`, polls it: once it has been re-parented,
  it kills its own group. Polling `getppid()` rather than PR_SET_PDEATHSIG because the
  latter fires when the *thread* that forked exits, and a cluster may be started from a
  short-lived thread.
- A process of the cluster that is stopped (SIGSTOP, a debugger) cannot run its own watch.
  `GroupReaper` is a separate, tiny process holding the cluster's process groups: it reads a
  pipe from this process and, when the pipe ends without "closed" (this process died), sends
  SIGKILL to every group, which ends stopped processes too.
- TVM's popen workers (`python -m tvm.exec.popen_worker`), which MetaSchedule's builder
  and runner pools and TVM's RPC server start. An idle worker exits when its pipe closes,
  but a busy one (a runner retrying a dead tracker) does not. `guard_popen_workers()` makes
  every worker this process starts get SIGKILL when its parent dies (PR_SET_PDEATHSIG):
  their pools start them from threads that live as long as the pool, so the thread caveat
  above is harmless there.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time

PARENT_ENV = "WORKBENCH_PARENT_PID"
_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.25


def spawn_env() -> dict:
    """Environment entries telling a child started now who its parent is."""
    return {PARENT_ENV: str(os.getpid())}


def watch_parent() -> bool:
    """In a child started with spawn_env() as a group leader: end the whole group when the parent dies.

    Returns whether a watch was started (not for a process started otherwise, e.g. by hand on a
    board: its group may be a shell's job, which is not ours to end).
    """
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent or not parent.isdigit() or os.getpgrp() != os.getpid():
        return False
    thread = threading.Thread(target=_watch, args=(int(parent),), name="workbench-parent-watch", daemon=True)
    thread.start()
    return True


def _watch(parent: int) -> None:
    # Re-parenting (to init or a subreaper) changes getppid(); checked once at once, since the
    # parent may have died before this thread started.
    while os.getppid() == parent:
        time.sleep(_POLL_SECONDS)
    end_own_group()


def end_own_group() -> None:
    """Kill this process's whole group, this process included.

    SIGKILL at once: with the parent gone there is nothing to finish, and a gentler signal
    could let this process exit (its SIGTERM handler) before the rest of the group is ended.
    """
    os.killpg(os.getpgrp(), signal.SIGKILL)


# ---------------------------------------------------------------- TVM's popen workers

def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return None


_prctl = _libc_prctl()


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent (thread) ends (Linux only)."""
    if _prctl is None:
        return
    parent = os.getppid()
    _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class _SubprocessWithLifeline:
    """`subprocess` as TVM's popen_pool sees it: every Popen it makes dies with its parent."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802  (stands in for subprocess.Popen)
        kwargs.setdefault("preexec_fn", die_with_parent)
        return subprocess.Popen(*args, **kwargs)


_guard_lock = threading.Lock()


def guard_popen_workers() -> None:
    """Make every TVM popen worker this process starts from now on die with it (idempotent).

    Rebinds `subprocess` inside TVM's popen pool only (tvm_compat); nothing else sees the change.
    """
    if _prctl is None:
        return
    from . import tvm_compat

    with _guard_lock:
        if not isinstance(tvm_compat.popen_pool_subprocess(), _SubprocessWithLifeline):
            tvm_compat.set_popen_pool_subprocess(_SubprocessWithLifeline())


# ---------------------------------------------------------------- the reaper

# Runs as `python -I -c`: reads "PGID" lines; at "closed" it exits; at the end of the pipe
# (the parent died, however) it kills every group it was given.
_REAPER = """\
import os, signal, sys
groups = []
for line in sys.stdin:
    if line.strip() == "closed":
        sys.exit(0)
    groups.append(int(line))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class GroupReaper:
    """Kills the process groups it is told of should this process die before `close()`."""

    def __init__(self):
        import sys

        self._proc = subprocess.Popen([sys.executable, "-I", "-c", _REAPER], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def watch(self, pgid: int) -> None:
        self._send(f"{pgid}\n")

    def close(self) -> None:
        """The groups were ended by their owner: let the reaper go without killing anything."""
        self._send("closed\n")
        try:
            self._proc.stdin.close()
            self._proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def _send(self, line: str) -> None:
        try:
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
        except (OSError, ValueError):  # the reaper is gone: the in-process watches still work
            pass
