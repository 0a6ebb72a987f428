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
outright (SIGKILL, a crash) runs none of that; the cluster's processes then notice that their
parent is gone and end themselves (workbench.lifeline), like every LocalCluster's.
"""

from __future__ import annotations

import logging
import weakref

from workbench.errors import WorkbenchError
from workbench.rpc import Device, LocalCluster, _target_kwargs, open_device

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
        key = f", key {self._device.key!r}" if self._device is not None and not self._device.key_is_secret else ""
        return f"<DeviceSession {self._where}{key}, {'closed' if self.closed else 'open'}>"


def open_session(tracker: str | None = None, key: str | None = None, target: str | dict | None = None,
                 threads: int | None = None) -> DeviceSession:
    """Open a device for a notebook: the remote tracker HOST:PORT if given, else a fresh local cluster.

    The arguments mean what they mean for workbench.rpc.open_device (`key` is for a remote
    tracker; a local cluster's key is a fresh secret). Call it once, in one cell; close the
    session in the last cell, or let the kernel's shutdown close it.
    """
    if tracker:
        with open_device(tracker, key, target, threads) as device:  # a remote device holds nothing open
            return DeviceSession(device)
    cluster = LocalCluster(threads=threads)
    try:
        cluster.start()
        # `target` resolved as open_device does (a preset, JSON, or the host with the cluster's threads).
        return DeviceSession(cluster.device(**_target_kwargs(target, cluster.threads)), cluster)
    except BaseException:
        cluster.stop()
        raise


class _Cleanup:
    """Stops a local cluster once (should this process die first, the cluster ends itself)."""

    def __init__(self, cluster: LocalCluster | None):
        self.cluster = cluster

    def __call__(self) -> None:
        cluster, self.cluster = self.cluster, None
        if cluster is None:
            return
        try:
            cluster.stop()
        except Exception:  # noqa: BLE001  (at interpreter exit there is nobody to raise to)
            log.exception("stopping the local RPC cluster failed; its processes end with this one: %s",
                          cluster.pids)
