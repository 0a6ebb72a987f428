"""A device for a whole notebook, opened in one cell and cleaned up even if a later cell fails.

    from workbench.session import open_session
    session = open_session(tracker, key, threads=2)   # a local cluster if tracker is None
    device = session.device
    ...
    session.close()                                   # optional: also done at kernel shutdown

`open_device` is a context manager, which suits a script but not a notebook: entering it by hand
and exiting in the last cell leaves the local tracker and servers running whenever a cell in
between fails. A DeviceSession stops them when closed, when it is garbage collected, or at
interpreter exit (the kernel shut down or restarted), whichever comes first. A kernel killed
outright (SIGKILL, a crash) runs none of that, so a small watchdog process, which sees the
kernel's end as the end of a pipe, stops the cluster then.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import weakref

from workbench.errors import WorkbenchError
from workbench.rpc import DEFAULT_KEY, Device, LocalCluster, open_device

log = logging.getLogger(__name__)

__all__ = ["DeviceSession", "SessionClosedError", "open_session"]


class SessionClosedError(WorkbenchError):
    """The session was closed; its device (and local cluster, if any) is gone."""


class DeviceSession:
    """A Device and, when no tracker was given, the local RPC cluster behind it.

    Use `open_session` to make one. `.device` is the Device; `.close()` (idempotent) stops the
    local cluster; `with open_session() as session:` closes it on leaving the block. If never
    closed, it is closed when garbage collected or when the interpreter exits.
    """

    def __init__(self, device: Device, cluster: LocalCluster | None = None):
        self._device: Device | None = device
        self._pids = tuple(cluster.pids) if cluster else ()
        self._tracker = device.tracker
        self._where = f"local cluster, tracker {device.tracker}" if cluster else f"remote tracker {device.tracker}"
        # The finalizer holds the cluster, never self, so it runs once self is unreachable, and
        # at interpreter exit for a session still open then (weakref.finalize's atexit hook).
        self._finalizer = weakref.finalize(self, _Cleanup(cluster))

    @property
    def device(self) -> Device:
        """The Device to run on; SessionClosedError once the session is closed."""
        if self._device is None:
            raise SessionClosedError(
                f"this device session ({self._where}) is closed; open a new one with "
                "workbench.session.open_session(...)"
            )
        return self._device

    @property
    def closed(self) -> bool:
        return self._device is None

    @property
    def pids(self) -> list[int]:
        """Process groups (their leaders' pids) of the local cluster it started; [] for a remote tracker.

        They stay listed after close, so a caller can check that they are gone.
        """
        return list(self._pids)

    @property
    def tracker(self) -> str:
        """HOST:PORT of the tracker the device is reached through."""
        return self._tracker

    def close(self) -> None:
        """Stop the local cluster, if any; the device can no longer be used. Safe to call again."""
        self._device = None
        self._finalizer()  # calls the cleanup at most once

    def __enter__(self) -> "DeviceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        key = f", key {self._device.key!r}" if self._device is not None else ""
        return f"<DeviceSession {self._where}{key}, {'closed' if self.closed else 'open'}>"


def open_session(tracker: str | None = None, key: str | None = None, target: str | dict | None = None,
                 threads: int | None = None) -> DeviceSession:
    """Open a device for a notebook: the remote tracker HOST:PORT if given, else a fresh local cluster.

    The arguments mean what they mean for workbench.rpc.open_device (a local cluster's servers
    register under `key`, default "workbench"). Call it once, in one cell; close the session in
    the last cell, or let the kernel's shutdown close it.
    """
    if tracker:
        with open_device(tracker, key, target, threads) as device:  # a remote device holds nothing open
            return DeviceSession(device)
    cluster = LocalCluster(key=key or DEFAULT_KEY, threads=threads)
    try:
        cluster.start()
        # The cluster's tracker, addressed like any other, resolves `target` as open_device does
        # (a preset, JSON, or the host with the cluster's thread count).
        with open_device(f"{cluster.host}:{cluster.port}", cluster.key, target, cluster.threads) as device:
            return DeviceSession(device, cluster)
    except BaseException:
        cluster.stop()
        raise


# A separate process, in its own session so that killing the kernel's process group spares it.
# It blocks reading a pipe from the kernel; the read ends when the kernel closes the pipe or
# dies, however it dies. Unless told "closed" first, it ends the cluster's process groups.
_WATCHDOG = """\
import os, signal, sys, time
groups = [int(g) for g in sys.argv[1:]]
if not sys.stdin.buffer.read().startswith(b"closed"):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except OSError:
                pass
        time.sleep(2)
"""


class _Cleanup:
    """Stops a local cluster once; meanwhile a watchdog stops it should this process die first."""

    def __init__(self, cluster: LocalCluster | None):
        self.cluster, self.watchdog = cluster, None
        if cluster is not None and cluster.pids:
            try:
                self.watchdog = subprocess.Popen(
                    [sys.executable, "-I", "-c", _WATCHDOG, *map(str, cluster.pids)],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as err:  # the session still works; only a hard kill would leak then
                log.warning("no watchdog for the local RPC cluster (%s); stop it with session.close()", err)

    def __call__(self) -> None:
        cluster, self.cluster = self.cluster, None
        stopped = False
        try:
            if cluster is not None:
                cluster.stop()
            stopped = True
        except Exception:  # noqa: BLE001  (at interpreter exit there is nobody to raise to)
            log.exception("stopping the local RPC cluster failed; its watchdog ends it: %s", cluster.pids)
        finally:
            self._release_watchdog(stopped)

    def _release_watchdog(self, stopped: bool) -> None:
        """Let the watchdog go: told "closed" if the cluster stopped, else closing the pipe sets it off."""
        watchdog, self.watchdog = self.watchdog, None
        if watchdog is None:
            return
        try:
            if stopped:
                watchdog.stdin.write(b"closed\n")
            watchdog.stdin.close()
            watchdog.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
