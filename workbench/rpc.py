"""Devices over TVM RPC: a local tracker and servers on loopback, or a remote tracker.

Every measurement in the workbench runs through an RPC session, so a Raspberry Pi behind a
tracker and this machine on loopback are driven by the same code. Each tracker and server
runs in its own process group: TVM's servers fork workers that outlive their parent, so
stopping means ending the whole group; each also ends its group when this process dies
(lifeline.py). A local cluster's device key is a fresh secret, given to its servers through
the environment (never argv, which every user can read) and never disclosed by its tracker
(tracker.py): only this process can open a session on it.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .errors import WorkbenchError
from .lifeline import guard_popen_workers, spawn_env
from .targets import CROSS_COMPILERS, TARGET_PRESETS, host_target  # noqa: F401  (callers import them from here)
from .targets import check_device, device_info, probe, resolve_target
from .threads import check_positive, resolve_threads
from .tracker import key_digest

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_KEY = "workbench"
KEY_ENV = "WORKBENCH_RPC_KEY"  # the device key, for `serve` and clients, kept out of argv

class DeviceError(WorkbenchError, RuntimeError):
    """The device could not be reached or started; the message says what to check."""


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = str(text).strip().rpartition(":")
    host = host.strip("[]")  # [::1]:9190
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise DeviceError(f"tracker address {text!r} must look like HOST:PORT with a port from 1 to 65535, "
                          "e.g. 127.0.0.1:9190")
    return host, int(port)


@dataclass
class Device:
    """Where kernels run: a tracker address, the device key, and the code generation target."""

    tracker_host: str
    tracker_port: int
    key: str = field(default=DEFAULT_KEY, repr=False)
    target: dict = field(default_factory=host_target)
    cross_compiler: str | None = None  # g++ for export_library when the device is another ISA
    session_timeout: float = 0  # seconds; 0 = none
    info: dict = field(default_factory=dict)  # the machine the device reported (targets.probe)
    key_is_secret: bool = False  # a local cluster's key: never written to records or logs

    @property
    def tracker(self) -> str:
        return f"{self.tracker_host}:{self.tracker_port}"

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target)

    def session(self, retries: int = 3):
        """A new RPC session on one server of this device's key."""
        import tvm.rpc

        last = None
        for attempt in range(retries):
            try:
                tracker = tvm.rpc.connect_tracker(self.tracker_host, self.tracker_port)
                self._check_key(tracker.summary())
                return tracker.request(self.key, priority=1, session_timeout=self.session_timeout)
            except DeviceError:
                raise
            except Exception as err:  # tvm raises plain RuntimeError/TVMError for every failure
                last = err
                time.sleep(0.5 * (attempt + 1))
        raise DeviceError(
            f"could not open an RPC session with key {self.key!r} at tracker {self.tracker} ({last}); "
            "check that the tracker runs and a server registered that key "
            "(python -m tvm.exec.query_rpc_tracker --host HOST --port PORT)"
        )

    def _check_key(self, summary: dict) -> None:
        # The tracker queues a request for an unknown key forever; say so at once instead.
        # The workbench's own tracker lists keys by digest (tracker.py), TVM's in plain text.
        keys = sorted(summary.get("queue_info", {}))
        if self.key not in keys and key_digest(self.key) not in keys:
            if self.key_is_secret:
                raise DeviceError(f"the local cluster's server is no longer registered at tracker {self.tracker}; "
                                  "start a new cluster (open a new device or session)")
            raise DeviceError(
                f"no RPC server has registered key {self.key!r} at tracker {self.tracker}; keys there: "
                f"{keys or 'none'}. Start one on the board: python -m workbench serve --tracker "
                f"{self.tracker} --key {self.key} --host <board address> --allow-remote"
            )

    def run(self, work, *args, **kwargs):
        """Call work(session, *args, **kwargs) in a fresh session and release it afterwards.

        Remote modules and their time evaluators form reference cycles that keep a session,
        and with it the server, busy until a garbage collection; the collection here frees
        the server for the next request. `work` should return plain data, not remote objects.
        """
        session = self.session()
        try:
            return work(session, *args, **kwargs)
        finally:
            del session
            gc.collect()

    def export_kwargs(self) -> dict:
        """Arguments for Module.export_library so the shared object loads on the device."""
        if not self.cross_compiler:
            return {}
        from . import tvm_compat

        return {"fcompile": tvm_compat.cross_compiler(self.cross_compiler)}

    def describe(self) -> dict:
        key = key_digest(self.key) if self.key_is_secret else self.key
        described = {"tracker": self.tracker, "key": key, "target": self.target}
        if self.info:  # what the measurements ran on, as the device itself reported it
            described.update(machine=self.info.get("machine"), cores=self.info.get("cores"))
        return described


def upload(session, module, name: str = "kernel.so", export_kwargs: dict | None = None):
    """Export a compiled module, send it to the device and load it there."""
    import tempfile
    import uuid

    # A fresh name each time: reloading a changed library under a path the device process
    # already loaded crashes it (the loader returns the old handle).
    stem, _, ext = name.rpartition(".")
    name = f"{stem}-{uuid.uuid4().hex[:8]}.{ext}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        module.export_library(path, **(export_kwargs or {}))
        session.upload(path)
    return session.load_module(name)


# ---------------------------------------------------------------- local cluster

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def thread_env(threads: int) -> dict:
    """Environment pinning TVM's, OpenMP's and BLAS's thread pools to `threads`."""
    return {name: str(threads) for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _spawn(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start a child in its own session, so the whole group can be ended together, that ends
    its group should this process die (lifeline.watch_parent in the child)."""
    # stderr to a file, not a pipe: nobody reads a pipe while the cluster runs, and a full one
    # would block the child.
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=errors,
        env={**os.environ, **(env or {}), **spawn_env()},
    )
    proc.errors = errors  # read on failure by LocalCluster._wait_for
    return proc


def _stop_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # Forked workers may remain in the group after the parent died.
    _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    errors = getattr(proc, "errors", None)
    if errors:
        errors.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _error_output(proc: subprocess.Popen) -> str:
    errors = getattr(proc, "errors", None)
    if errors is None or errors.closed:
        return ""
    errors.seek(0)
    return errors.read().decode(errors="replace")[-2000:]


class LocalCluster:
    """A tracker and RPC servers on loopback, started on enter and stopped, whole, on exit.

    Servers are `python -m workbench serve`, so NNPACK is registered on them like on a board.
    The key is a fresh secret unless one is given (see the module's docstring); the tracker
    is `python -m workbench.tracker`, which does not disclose it. Should this process die
    without stopping the cluster (SIGKILL, a crash), the tracker and servers end themselves.
    """

    def __init__(self, servers: int = 1, key: str | None = None, threads: int | None = None,
                 host: str = "127.0.0.1", start_timeout: float = 60.0):
        # Always explicit: TVM's runtime otherwise halves the core count on x86 (it assumes
        # hyper-threading), so a 2-core machine would run every TVM kernel on one thread.
        threads = resolve_threads(threads)
        self.key_is_secret = key is None
        key = key or f"workbench-{secrets.token_hex(16)}"
        self.servers, self.key, self.threads, self.host = servers, key, threads, host
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self.port else "not started"
        return f"<LocalCluster {where}, {self.servers} server(s), {self.threads} thread(s)>"

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        guard_popen_workers()  # MetaSchedule's workers in this process end with it, too
        self.port = free_port(self.host)
        self.procs.append(_spawn(["-m", "workbench.tracker", "--host", self.host,
                                  "--port", str(self.port), "--port-end", str(self.port + 1)]))
        self._wait_for(lambda: self._tracker_answers(), "the tracker to answer")
        for _ in range(self.servers):
            self.procs.append(self._spawn_server())
        self._wait_for(lambda: self._registered() >= self.servers, f"{self.servers} server(s) to register")
        log.info("local RPC cluster: tracker %s:%s, %d server(s)", self.host, self.port, self.servers)

    def _spawn_server(self) -> subprocess.Popen:
        port = free_port(self.host)
        args = ["-m", "workbench", "serve", "--tracker", f"{self.host}:{self.port}",
                "--host", self.host, "--port", str(port), "--threads", str(self.threads)]
        return _spawn(args, {**thread_env(self.threads), KEY_ENV: self.key})

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop_group(proc)
        self.procs.clear()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def device(self, **kwargs) -> Device:
        if self.port is None:
            raise DeviceError("the local cluster is not started; use it as `with LocalCluster() as cluster:`")
        target = kwargs.pop("target", None) or host_target(self.threads)
        device = Device(self.host, self.port, self.key, target=target, key_is_secret=self.key_is_secret, **kwargs)
        _identify(device, "the local cluster")  # records name the machine that measured
        return device

    def _tracker_answers(self) -> bool:
        # A plain socket probe: tvm's own client retries for minutes before it gives up.
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def _registered(self) -> int:
        import tvm.rpc

        queues = tvm.rpc.connect_tracker(self.host, self.port).summary()["queue_info"]
        return queues.get(key_digest(self.key), {}).get("free", 0)

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise DeviceError(f"an RPC process exited with code {dead[0].returncode} while waiting for "
                                  f"{what}:\n{_error_output(dead[0])}")
            if ready():
                return
            time.sleep(0.2)
        raise DeviceError(f"timed out after {self.start_timeout:.0f}s waiting for {what}")


# ---------------------------------------------------------------- choosing a device

def open_device(tracker: str | None = None, key: str | None = None, target: str | dict | None = None,
                threads: int | None = None):
    """Context manager yielding a Device: the remote tracker if given, else a fresh local cluster.

    The target and thread count are checked before anything starts; the device then reports its
    machine, and a target it cannot run (or more threads than it has cores) is refused.
    `threads` None means every core of the device.

    A remote device's key is `key`, else $WORKBENCH_RPC_KEY, else "workbench"; a local cluster's
    is always a fresh secret.
    """
    from contextlib import contextmanager

    @contextmanager
    def remote():
        host, port = parse_tracker(tracker)
        guard_popen_workers()
        kwargs = _target_kwargs(target, None if threads is None else check_positive(threads))
        device = Device(host, port, key or os.environ.get(KEY_ENV) or DEFAULT_KEY, **kwargs)
        _identify(device, f"the device with key {device.key!r} at {device.tracker}")
        yield device

    @contextmanager
    def local():
        kwargs = _target_kwargs(target, None if threads is None else resolve_threads(threads))
        kwargs["target"].setdefault("num-cores", resolve_threads(None))
        check_device(kwargs["target"], device_info(), "this machine (the local cluster)")
        with LocalCluster(threads=kwargs["target"]["num-cores"]) as cluster:
            yield cluster.device(**kwargs)

    return remote() if tracker else local()


def _target_kwargs(target, threads) -> dict:
    """Device arguments for a target given as 'host', a preset, JSON or a dict (checked here)."""
    checked, cross = resolve_target(target, threads)
    return {"target": checked, "cross_compiler": cross} if cross else {"target": checked}


def _identify(device: Device, where: str) -> None:
    """Ask the device what it is, record it, and refuse a target or thread count it cannot take."""
    device.info = probe(device)
    if "num-cores" not in device.target:  # no thread count given: every core of the device
        device.target["num-cores"] = int(device.info.get("cores") or resolve_threads(None))
    check_device(device.target, device.info, where)
