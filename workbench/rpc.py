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

import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from .errors import WorkbenchError
from .lifeline import GroupReaper, guard_popen_workers, spawn_env
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


TRACKER_FORM = "HOST:PORT with a port from 1 to 65535 (no scheme, one port), e.g. 127.0.0.1:9190 or [::1]:9190"


def parse_tracker(text: str) -> tuple[str, int]:
    """(host, port) of a tracker address; anything but HOST:PORT (ASCII digits) is refused here."""
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host  # [::1]:9190
    ok = (sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536
          and not any(c.isspace() or c in "[]/@" for c in host)
          and (bracketed or ":" not in host or host.count(":") >= 2))  # an IPv6 host, or no other colon
    if not ok or "://" in text:
        raise DeviceError(f"tracker address {text!r} must look like {TRACKER_FORM}")
    return host, int(port)


TRACKER_HINT = "check the address and that the tracker runs (python -m tvm.exec.rpc_tracker --host HOST --port PORT)"


def probe_tracker(host: str, port: int, timeout: float = 5.0) -> None:
    """Raise DeviceError unless an RPC tracker answers at host:port within `timeout` seconds.

    TVM's own client retries a refused connection for 60 s, three times over, and its handshake
    has no timeout: a plain socket says at once whether a tracker is there. The handshake (the
    tracker's magic number, echoed back) tells a tracker from anything else that accepts a
    connection (another service, a firewall or proxy that answers for every address).
    """
    import struct

    from tvm.rpc.base import RPC_TRACKER_MAGIC

    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        raise DeviceError(f"could not connect to the RPC tracker at {where} within {timeout:g} s (nothing "
                          f"answered: a wrong address, or a firewall); {TRACKER_HINT}") from None
    except OSError as err:
        raise DeviceError(f"cannot connect to the RPC tracker at {where} ({err.strerror or err}); {TRACKER_HINT}") from None
    with sock:
        try:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
            answer = b""
            while len(answer) < 4:
                chunk = sock.recv(4 - len(answer))
                if not chunk:
                    break
                answer += chunk
        except socket.timeout:
            answer = None
        except OSError:
            answer = b""
    if answer is None or len(answer) < 4 or struct.unpack("<i", answer)[0] != RPC_TRACKER_MAGIC:
        said = "sent nothing back" if answer is None else "did not answer as an RPC tracker does"
        raise DeviceError(f"could not connect to an RPC tracker at {where} within {timeout:g} s: the address "
                          f"accepted the connection but {said} (another service on that port, or a firewall or "
                          f"proxy answering for it); {TRACKER_HINT}")


@dataclass
class Device:
    """Where kernels run: a tracker address, the device key, and the code generation target."""

    tracker_host: str
    tracker_port: int
    key: str = field(default=DEFAULT_KEY, repr=False)
    target: dict = field(default_factory=host_target)
    cross_compiler: str | None = None  # g++ for export_library when the device is another ISA
    # Every wait on the device is bounded: the server ends a session older than session_timeout
    # (a hung kernel included), a request waits request_timeout for a free server, and a tracker
    # that does not answer fails within connect_timeout.
    session_timeout: float = 600
    request_timeout: float = 60
    connect_timeout: float = 5
    local: "LocalCluster | None" = field(default=None, repr=False, compare=False)  # restarts what dies
    # A local server that stops answering (stopped, wedged) cannot end its own session; after
    # call_timeout seconds of one measurement the client ends it (hang_guard). 0 = never.
    call_timeout: float = 300
    info: dict = field(default_factory=dict)  # the machine the device reported (targets.probe)
    key_is_secret: bool = False  # a local cluster's key: never written to records or logs

    @property
    def tracker(self) -> str:
        return f"{self.tracker_host}:{self.tracker_port}"

    @property
    def shown_key(self) -> str:
        """The key as messages and records show it: a local cluster's secret only as its digest."""
        return key_digest(self.key) if self.key_is_secret else self.key

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target)

    def session(self, retries: int = 2, wait: float | None = None):
        """A new RPC session on one server of this device's key; every wait on the way is bounded.

        `wait`: seconds to wait for a server of the key to be registered and free (default
        request_timeout). A tracker that does not answer fails within connect_timeout.
        """
        import tvm.rpc

        self._probe_tracker()
        deadline = time.monotonic() + (self.request_timeout if wait is None else wait)
        last = None
        for attempt in range(retries):
            try:
                tracker = tvm.rpc.connect_tracker(self.tracker_host, self.tracker_port)
                _bound_tracker(tracker, max(1.0, deadline - time.monotonic()))
                self._check_key(tracker.summary())  # a key never registered fails at once
                summary = self._await_server(tracker, deadline)
                if not self._listed(_registered_keys(summary)):
                    raise DeviceError(
                        f"no RPC server of key {self.shown_key!r} is registered at tracker {self.tracker} (it died or "
                        "was stopped); start it again (python -m workbench serve ...) and run the same command")
                return tracker.request(self.key, priority=1, session_timeout=self.session_timeout, max_retry=1)
            except DeviceError:
                raise
            except Exception as err:  # tvm raises plain RuntimeError/TVMError/OSError for every failure
                last = err
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.5 * (attempt + 1))
        raise DeviceError(
            f"could not open an RPC session with key {self.shown_key!r} at tracker {self.tracker} ({last}); "
            "check that the tracker runs and a server registered that key "
            "(python -m tvm.exec.query_rpc_tracker --host HOST --port PORT)"
        )

    def _probe_tracker(self) -> None:
        probe_tracker(self.tracker_host, self.tracker_port, self.connect_timeout)

    def _await_server(self, tracker, deadline: float) -> dict:
        """The tracker's summary once a server of this key is registered (or the deadline passed).

        A server that died drops out of the summary; one that restarts comes back in seconds.
        """
        while True:
            summary = tracker.summary()
            if self._listed(_registered_keys(summary)) or time.monotonic() >= deadline:
                return summary
            time.sleep(0.25)

    def alive(self, wait: float = 5.0) -> bool:
        """Whether a server of this key is registered at the tracker (waiting up to `wait` s)."""
        import tvm.rpc

        try:
            self._probe_tracker()
            tracker = tvm.rpc.connect_tracker(self.tracker_host, self.tracker_port)
            _bound_tracker(tracker, self.connect_timeout)
            return self._listed(_registered_keys(self._await_server(tracker, time.monotonic() + wait)))
        except Exception:  # noqa: BLE001 - any failure to ask means the device is not there
            return False

    def revive(self, wait: float | None = None) -> None:
        """Make the device serve again after its session or server died.

        A local cluster restarts what died (the tracker address may change); a remote device is
        waited for (its server re-registers by itself) until `wait` s (default request_timeout).
        """
        if self.local is not None:
            self.local.revive()
            self.tracker_host, self.tracker_port, self.key = self.local.host, self.local.port, self.local.key
            return
        wait = self.request_timeout if wait is None else wait
        if not self.alive(wait):
            raise DeviceError(
                f"the device with key {self.shown_key!r} at tracker {self.tracker} is gone and did not come back "
                f"within {wait:.0f}s; restart its server (python -m workbench serve ...), then run the same "
                "command again to resume"
            )

    def _listed(self, keys) -> bool:
        """Whether this device's key is among `keys`, as TVM's tracker names it or as ours does (a digest)."""
        return self.key in keys or key_digest(self.key) in keys

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
        if self.local is not None:  # cheap when it serves; restarts a local cluster found dead
            self.revive()
        for attempt in range(2):  # a session lost to the transport is re-opened once; work is a measurement
            session = self.session()
            try:
                return work(session, *args, **kwargs)
            except Exception as err:
                if attempt or not is_transport_failure(err, session):
                    raise
                log.warning("RPC session lost (%s); reviving the device and running again", short_reason(err))
            finally:
                del session
                gc.collect()
            self.revive()

    def plain(self) -> "Device":
        """This device without its local cluster handle: picklable, for worker processes."""
        import dataclasses

        return dataclasses.replace(self, local=None)

    def export_kwargs(self) -> dict:
        """Arguments for Module.export_library so the shared object loads on the device."""
        if not self.cross_compiler:
            return {}
        from . import tvm_compat

        return {"fcompile": tvm_compat.cross_compiler(self.cross_compiler)}

    @property
    def emulated(self) -> bool:
        """Whether the device runs under emulation (its server says so): its timings are no board's speed."""
        return bool(self.info.get("emulated"))

    def server_count(self, free: bool = False) -> int:
        """Servers of this key at the tracker (only those without a session, if `free`); bounded."""
        import tvm.rpc

        self._probe_tracker()
        tracker = tvm.rpc.connect_tracker(self.tracker_host, self.tracker_port)
        _bound_tracker(tracker, self.connect_timeout)
        summary = tracker.summary()
        if free:
            queues = summary.get("queue_info", {})
            queue = queues.get(self.key) or queues.get(key_digest(self.key)) or {}
            return int(queue.get("free", 0))
        names = {f"server:{self.key}", f"server:{key_digest(self.key)}"}
        return sum(info.get("key") in names for info in summary.get("server_info", []))

    def parallel_servers(self) -> int:
        """How many servers can measure at once: the local cluster's, else the key's free servers (at least 1)."""
        if self.local is not None:
            return max(1, self.local.servers)
        try:
            return max(1, self.server_count(free=True))
        except Exception:  # noqa: BLE001 - the session request that follows says what is wrong with the tracker
            return 1

    def describe(self) -> dict:
        # Records and bundles get published: the key (a secret) only as its digest, which still tells devices apart.
        described = {"tracker": self.tracker, "key": key_digest(self.key), "target": self.target,
                     "emulated": self.emulated}
        if self.info:  # what the measurements ran on, as the device itself reported it
            described.update(machine=self.info.get("machine"), cores=self.info.get("cores"))
            if self.emulated:
                described["emulation"] = self.info["emulated"]
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


# ---------------------------------------------------------------- when the device dies

class SessionLost(DeviceError):
    """The RPC session or its server died during a call: a transport failure, not the payload's result."""


# What TVM's client says when the other end is gone (C++ socket errors, the server's session timeout).
TRANSPORT_MARKERS = ("broken pipe", "kshutdown", "rpccode::", "connection reset", "connection refused",
                     "connection aborted", "session closed", "rpcsessiontimeouterror", "timed out", "end of file",
                     "sessionlost", "cannot request")


def is_transport_failure(err: BaseException, session=None) -> bool:
    """Whether `err` means the session (or server) died rather than the payload failing.

    The message is checked first; otherwise a live session answers a round trip and a dead one
    does not, whatever the error said.
    """
    if isinstance(err, SessionLost):
        return True
    text = str(err).lower()
    if any(marker in text for marker in TRANSPORT_MARKERS):
        return True
    return session is not None and not session_alive(session)


def session_alive(session) -> bool:
    try:  # a real round trip: the server resolves a path in its work folder
        session.get_function("tvm.rpc.server.workpath")("probe")
        return True
    except Exception:  # noqa: BLE001 - any failure of the round trip means the session is gone
        return False


def short_reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]


def _registered_keys(summary: dict) -> set[str]:
    """Keys with a live server: a server that died leaves the tracker's server list at once."""
    return {info["key"].split(":", 1)[-1] for info in summary.get("server_info", [])
            if str(info.get("key", "")).startswith("server:")}


def _bound_tracker(tracker, seconds: float) -> None:
    # TrackerSession has no timeout of its own: a request for a key whose server died waits forever.
    from . import tvm_compat

    tvm_compat.bound_tracker_socket(tracker, seconds)


_RUNNER_LOST: list = []  # in a tuning runner's worker process: the device was lost in this batch


def runner_session(device: Device, wait: float, served_log: str | None = None, _rpc_config=None):
    """MetaSchedule's f_create_session: a bounded session request in the runner's worker.

    Once the device is found gone, the rest of the batch fails at once (a SessionLost the
    tuning loop recognises) instead of waiting for it candidate by candidate. With `served_log`,
    the server each session landed on is appended to that file (one line each), so a tuning
    run can say which servers of a farm measured it.
    """
    if _RUNNER_LOST:
        raise SessionLost(f"skipped: the device was lost earlier in this batch ({_RUNNER_LOST[0]})")
    try:
        session = device.session(wait=wait)
    except DeviceError as err:
        _RUNNER_LOST.append(str(err)[:200])
        raise SessionLost(f"the device is gone: {err}") from None
    if served_log:
        with open(served_log, "a") as log_file:  # one short line per append: workers never interleave
            log_file.write(f"{server_of(session) or 'unknown'}\n")
    return session


@contextlib.contextmanager
def hang_guard(device: Device, server: str | None = None):
    """Bound one measurement from this side: if it has not returned after device.call_timeout
    seconds, the local cluster's server `server` (host:port; every server if unknown) is killed,
    so the blocked call fails and the caller revives the device. Yields a list that is non-empty
    if the guard fired.

    A remote device's calls are bounded by its server's session_timeout only: a board that is
    frozen, not dead, holds the call until then.
    """
    fired: list = []
    cluster = device.local
    if cluster is None or not device.call_timeout:
        yield fired
        return

    def fire():
        fired.append(device.call_timeout)
        log.warning("no answer from the local RPC server within %.0fs; ending it", device.call_timeout)
        cluster.kill_servers(server)

    timer = threading.Timer(device.call_timeout, fire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def device_ok(device: Device) -> bool:
    """After a failure: whether the device still serves (a local cluster with every process
    alive and registered; a remote key registered at its tracker)."""
    if device.local is not None:
        return device.local.healthy(wait=2)
    return device.alive(wait=2)


class SessionKeeper:
    """One RPC session reused across measurements, replaced when it dies or nears its timeout.

    Opening a session costs about 0.2 s here, so a sweep keeps one; the server ends sessions
    older than session_timeout, so a session past half of it is replaced before it expires.
    """

    def __init__(self, device: Device):
        self.device = device
        self._session = None
        self._opened = 0.0
        self.server: str | None = None  # host:port of the server the session is on, as it reported it

    def get(self):
        age = time.monotonic() - self._opened
        if self._session is not None and self.device.session_timeout and age > self.device.session_timeout / 2:
            self.drop()
        if self._session is None:
            if self.device.local is not None:  # cheap when it serves; restarts a cluster found dead
                self.device.revive()
            self._session = self.device.session()
            self._opened = time.monotonic()
            self.server = server_of(self._session)
        return self._session

    def drop(self) -> None:
        self._session = None
        self.server = None
        gc.collect()  # remote objects of the old session hold it (and its server) until collected

    def lost(self) -> None:
        """The session died: forget it and bring the device back (bounded; DeviceError if it cannot)."""
        self.drop()
        self.device.revive()

    def __enter__(self) -> "SessionKeeper":
        return self

    def __exit__(self, *exc) -> None:
        self.drop()


def server_of(session) -> str | None:
    """The server a session is on (host:port, as it reports itself); None for a server without the report."""
    import json

    from .targets import DEVICE_INFO

    try:
        return json.loads(str(session.get_function(DEVICE_INFO)())).get("server")
    except Exception:  # noqa: BLE001 - a plain TVM server: records then say nothing of it
        return None


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

    Several servers under the one key make a farm: a sweep or a tuning run measures on all of
    them at once, each with `threads` threads (servers x threads should not exceed the cores).
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
        self.procs: list[subprocess.Popen] = []  # the tracker first, then the servers
        self.server_ports: dict[int, int] = {}  # server pid -> its port
        self._reaper: GroupReaper | None = None
        self._lock = threading.RLock()  # a farm's workers revive it from several threads
        self._closed = False

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
        self._closed = False
        guard_popen_workers()  # MetaSchedule's workers in this process end with it, too
        self._reaper = GroupReaper()  # ends even a stopped process of the cluster should we die
        self.port = free_port(self.host)
        self._add(_spawn(["-m", "workbench.tracker", "--host", self.host,
                          "--port", str(self.port), "--port-end", str(self.port + 1)]))
        self._wait_for(lambda: self._tracker_answers(), "the tracker to answer")
        for _ in range(self.servers):
            self._add(self._spawn_server())
        self._wait_for(lambda: self._live_servers() >= self.servers, f"{self.servers} server(s) to register")
        log.info("local RPC cluster: tracker %s:%s, %d server(s)", self.host, self.port, self.servers)

    def _spawn_server(self) -> subprocess.Popen:
        port = free_port(self.host)
        args = ["-m", "workbench", "serve", "--tracker", f"{self.host}:{self.port}",
                "--host", self.host, "--port", str(port), "--threads", str(self.threads)]
        proc = _spawn(args, {**thread_env(self.threads), KEY_ENV: self.key})
        self.server_ports[proc.pid] = port
        return proc

    def _add(self, proc: subprocess.Popen) -> None:
        self.procs.append(proc)
        self._reaper.watch(proc.pid)  # its own group: the pid is the group id

    def stop(self) -> None:
        """Stop everything; a device of this cluster can no longer revive it (a farm's worker
        thread still running after a Ctrl-C must not start a new cluster)."""
        with self._lock:
            self._closed = True
            self._stop_processes()

    def _stop_processes(self) -> None:
        for proc in reversed(self.procs):
            _stop_group(proc)
        self.procs.clear()
        self.server_ports.clear()
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None

    def kill_servers(self, server: str | None = None) -> None:
        """End the server at `server` (host:port), or every server if it is None, at once (SIGKILL
        ends a stopped one too): a call blocked on a server that stopped answering then fails, and
        revive() restarts what was ended. A server no longer in the cluster (another worker's
        restart replaced it) is already gone: nothing else is ended."""
        with self._lock:
            servers = self.procs[1:]  # procs[0] is the tracker
            if server:
                port = server.rpartition(":")[2]
                servers = [p for p in servers if str(self.server_ports.get(p.pid)) == port]
        for proc in servers:
            _signal_group(proc, signal.SIGKILL)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def device(self, **kwargs) -> Device:
        if self.port is None:
            raise DeviceError("the local cluster is not started; use it as `with LocalCluster() as cluster:`")
        target = kwargs.pop("target", None) or host_target(self.threads)
        device = Device(self.host, self.port, self.key, target=target, key_is_secret=self.key_is_secret,
                        local=self, **kwargs)
        _identify(device, "the local cluster")  # records name the machine that measured
        return device

    def _tracker_answers(self) -> bool:
        # Probed with a timeout: tvm's own client retries for minutes before it gives up.
        try:
            probe_tracker(self.host, self.port, timeout=1)
            return True
        except DeviceError:
            return False

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

    def healthy(self, wait: float = 10.0) -> bool:
        """Every process alive and every server registered (waiting up to `wait` s for them)."""
        deadline = time.monotonic() + wait
        while True:
            if any(p.poll() is not None for p in self.procs) or not self._tracker_answers():
                return False
            try:
                if self._live_servers() >= self.servers:
                    return True
            except Exception:  # noqa: BLE001 - a tracker that cannot answer is not healthy
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def _live_servers(self) -> int:
        """Servers of our key connected to the tracker, free or serving a session."""
        import tvm.rpc

        tracker = tvm.rpc.connect_tracker(self.host, self.port)
        _bound_tracker(tracker, 5)
        name = f"server:{key_digest(self.key)}"  # the cluster's tracker (tracker.py) lists keys by digest
        return sum(info.get("key") == name for info in tracker.summary().get("server_info", []))

    def revive(self) -> None:
        """Bring the cluster back after a server or session died: nothing if it serves again by
        itself (a server re-registers after a crashed session); the servers that died, if the
        tracker lives (the farm's other servers keep their sessions); else a clean restart, whole.
        The tracker's port may change; devices of this cluster follow it in Device.revive."""
        with self._lock:
            if self._closed:
                raise DeviceError("the local cluster was stopped; open a new device or session")
            if self.port is not None and self.healthy():
                return
            if self.procs and self.procs[0].poll() is None and self._tracker_answers() and self._restart_dead_servers():
                return
            log.warning("local RPC cluster lost a process; restarting it")
            self._stop_processes()
            self.start()

    def _restart_dead_servers(self) -> bool:
        """Replace the servers whose process ended; whether the cluster is whole again."""
        dead = [p for p in self.procs[1:] if p.poll() is not None]
        if not dead:
            return False  # alive but not registered (stopped, wedged): only a restart helps
        log.warning("local RPC cluster lost %d server(s); starting them again", len(dead))
        for proc in dead:
            _stop_group(proc)  # what is left of its group
            self.procs.remove(proc)
            self.server_ports.pop(proc.pid, None)
            self._add(self._spawn_server())
        try:
            self._wait_for(lambda: self._live_servers() >= self.servers, f"{self.servers} server(s) to register")
        except DeviceError:
            return False
        return True


# ---------------------------------------------------------------- choosing a device

def open_device(tracker: str | None = None, key: str | None = None, target: str | dict | None = None,
                threads: int | None = None, servers: int = 1):
    """Context manager yielding a Device: the remote tracker if given, else a fresh local cluster.

    The target and thread count are checked before anything starts; the device then reports its
    machine, and a target it cannot run (or more threads than it has cores) is refused.
    `threads` None means every core of the device (of a local farm: the cores shared among its
    `servers`). A remote farm is whatever servers registered the key.

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
        kwargs["target"].setdefault("num-cores", farm_threads(servers))
        check_device(kwargs["target"], device_info(), "this machine (the local cluster)")
        check_farm(servers, kwargs["target"]["num-cores"])
        with LocalCluster(servers=servers, threads=kwargs["target"]["num-cores"]) as cluster:
            yield cluster.device(**kwargs)

    return remote() if tracker else local()


def farm_threads(servers: int) -> int:
    """Threads per server of a local farm when none are given: the cores shared out (at least 1)."""
    return max(1, resolve_threads(None) // max(1, servers))


def check_farm(servers, threads: int) -> None:
    """Refuse a local farm that is not a positive whole number of servers, or that oversubscribes the
    cores: servers sharing a core would time each other."""
    if isinstance(servers, bool) or not isinstance(servers, int) or servers < 1:
        raise DeviceError(f"--servers must be a positive integer, got {servers!r}")
    cores = resolve_threads(None)
    if servers > cores:
        raise DeviceError(f"{servers} servers need at least {servers} cores, this machine has {cores}; "
                          f"pass at most --servers {cores}")
    if servers * threads > cores:
        raise DeviceError(f"{servers} servers x {threads} thread(s) need {servers * threads} cores, this machine has "
                          f"{cores}; pass --threads {cores // servers} or fewer --servers")


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
