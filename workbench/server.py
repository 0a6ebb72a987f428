"""The device side: an RPC server with the workbench's functions registered at start-up.

TVM's RPC server forks a process per session, and a function registered from Python exists
only in the process that registered it: every session process registers them itself, through
the server's `server_init_callback`. The transport (rpc.py) knows nothing of these payloads.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time

from .lifeline import guard_popen_workers, watch_parent
from .rpc import DEFAULT_KEY, KEY_ENV, LOOPBACK, DeviceError, parse_tracker, thread_env
from .threads import resolve_threads

log = logging.getLogger(__name__)


def register_device_functions(threads: int) -> None:
    """Runs inside the RPC server process: make the workbench's probes and NNPACK callable by name."""
    from . import ceilings, measure, targets

    ceilings.register_device_functions()
    import tvm

    tvm.register_global_func(measure.TIME_GLOBAL_FUNC, measure.time_global_func, override=True)
    tvm.register_global_func(targets.DEVICE_INFO, targets.device_info_json, override=True)  # machine, cores
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
    """
    import tvm.rpc

    if host not in LOOPBACK and not allow_remote:
        raise DeviceError(
            f"refusing to bind the RPC server to {host}: an RPC server runs any code it is sent. "
            "Pass --allow-remote to serve beyond loopback, on a trusted network only"
        )
    tracker_addr = parse_tracker(tracker) if tracker else None
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
    server = tvm.rpc.Server(
        host=host, port=port, port_end=port + 1, tracker_addr=tracker_addr, key=key, silent=True,
        server_init_callback=functools.partial(register_device_functions, threads),
    )
    log.info("RPC server on %s:%s (tracker %s)", host, server.port, tracker)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
