"""The device side: an RPC server with the workbench's functions registered at start-up.

TVM's RPC server forks a process per session, and a function registered from Python exists
only in the process that registered it: every session process registers them itself, through
the server's `server_init_callback`. The transport (rpc.py) knows nothing of these payloads.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

from .lifeline import guard_popen_workers, watch_parent
from .targets import SERVER_ENV
from .rpc import DEFAULT_KEY, KEY_ENV, LOOPBACK, DeviceError, parse_tracker, probe_tracker, thread_env
from .threads import resolve_threads

log = logging.getLogger(__name__)

TRACKER_PROBE_SECONDS = 5.0  # serve checks its tracker answers within this, before it starts


def register_device_functions(threads: int) -> None:
    """Runs inside the RPC server process: make the workbench's probes and NNPACK callable by name."""
    from . import ceilings, measure, targets

    ceilings.register_device_functions()
    import tvm

    tvm.register_global_func(measure.TIME_GLOBAL_FUNC, measure.time_global_func, override=True)
    tvm.register_global_func(measure.LOAD_GLOBAL_FUNC, measure.load_average, override=True)  # disturbed?
    tvm.register_global_func(targets.DEVICE_INFO, targets.device_info_json, override=True)  # machine, cores
    from . import int8_device

    int8_device.register_functions(threads)  # QNNPACK's int8 conv; torch is imported on first use
    try:
        from . import nnpack_tvm
    except ImportError as err:  # the bridge needs torch's library; a server without it still serves TVM
        log.warning("NNPACK bridge not registered: %s", err)
        return
    nnpack_tvm.register_tvm_functions(threads=threads)


def serve(host: str = "127.0.0.1", port: int = 9090, tracker: str | None = None, key: str | None = None,
          threads: int | None = None, allow_remote: bool = False) -> None:
    """Run an RPC server (NNPACK registered) until interrupted or terminated.

    The key is `key`, else $WORKBENCH_RPC_KEY (which keeps it out of the process list), else
    "workbench". With a tracker, a client needs the key to get a session: it is the secret.

    Supervised: a session process that dies (a kernel that crashes it) does not stop the server,
    which re-registers at the tracker for the next session; a listening process that dies is
    started again.
    """
    from tvm.support.popen_pool import PopenWorker

    if not str(host or "").strip():
        raise DeviceError("--host is empty; give the address to listen on: 127.0.0.1 (the default), or the "
                          "board's address with --allow-remote")
    if host not in LOOPBACK and not allow_remote:
        raise DeviceError(
            f"refusing to bind the RPC server to {host}: an RPC server runs any code it is sent. "
            "Pass --allow-remote to serve beyond loopback, on a trusted network only"
        )
    tracker_addr = parse_tracker(tracker) if tracker else None
    try:  # an address that does not resolve fails here, not in the listening process
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise DeviceError(f"cannot listen on --host {host!r} ({err.strerror or err}); give an address of this "
                          "machine (127.0.0.1, or its LAN address with --allow-remote)") from None
    if tracker_addr:  # bounded: a tracker that is down or unreachable fails in seconds, not never
        probe_tracker(*tracker_addr, timeout=TRACKER_PROBE_SECONDS)
    key = key or os.environ.pop(KEY_ENV, None) or DEFAULT_KEY
    if key == DEFAULT_KEY and host not in LOOPBACK:
        log.warning("serving beyond loopback with the default key %r: whoever reaches the tracker can run code "
                    "here. Set %s to a random key (python -c 'import secrets; print(secrets.token_hex(16))')",
                    key, KEY_ENV)
    watch_parent()  # started by a LocalCluster: end with it
    guard_popen_workers()  # TVM's server process (a popen worker) ends with this one
    threads = resolve_threads(threads)
    for name, value in thread_env(threads).items():  # inherited by every session process
        os.environ.setdefault(name, value)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    worker = None
    try:
        while not stop:
            if worker is None or not worker.is_alive():
                if worker is not None:
                    log.warning("the RPC server's listening process died; starting it again")
                    worker.kill()
                # A fresh process (not a fork of this one) so sessions do not inherit our SIGTERM handler.
                worker = PopenWorker()
                worker.send(listen, [host, port, tracker_addr, key, threads])
                try:
                    bound = worker.recv()
                except Exception as err:  # a port in use, an unreachable tracker: say which, once
                    raise DeviceError(f"the RPC server could not start on {host}:{port}: "
                                      f"{str(err).strip().splitlines()[-1]}; choose another --port or "
                                      "check the tracker address") from None
                log.info("RPC server on %s:%s (tracker %s)", host, bound, tracker)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if worker is not None:
            worker.kill()


_LISTENING: list = []  # keeps the listening socket and thread of this (worker) process


def listen(host: str, port: int, tracker_addr, key: str, threads: int) -> int:
    """Runs in the server's listening process: register the payloads, bind, serve in a thread."""
    import socket
    import threading

    logging.getLogger("RPCServer").setLevel(logging.ERROR)  # TVM logs every connection at INFO
    register_device_functions(threads)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Which server of the key this is, for records made on a farm (device_info reports it; the
    # session processes forked from here inherit it).
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    os.environ[SERVER_ENV] = f"{shown}:{port}"
    sock.listen(1)
    # A daemon thread: the process ends with its parent (the popen worker's loop sees EOF).
    thread = threading.Thread(target=_keep_listening, args=(sock, port, key, tracker_addr), daemon=True)
    thread.start()
    _LISTENING.append((sock, thread))
    return port


def _keep_listening(sock, port: int, key: str, tracker_addr) -> None:
    """TVM's listen loop, started again whenever it stops.

    TVM's loop raises and ends for good when a session process exits with an error (a kernel
    that segfaults or aborts), so the server would never re-register; here it logs and
    re-registers.
    """
    from . import tvm_compat

    home = os.getcwd()
    while True:
        try:
            tvm_compat.listen_loop(sock, port, key, tracker_addr)
        except Exception as err:  # noqa: BLE001 - one dead session must not end the server
            log.warning("an RPC session ended abnormally (%s); serving again", err)
        os.chdir(home)  # TVM leaves the dead session's (removed) work folder as the cwd
        time.sleep(0.1)
