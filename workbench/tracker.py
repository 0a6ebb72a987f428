"""The local cluster's RPC tracker: TVM's, except that it never discloses a device key.

With a tracker, a TVM RPC server only accepts clients presenting the one-time match key the
tracker hands out on `request(key)`, so whoever knows the device key can run code on the
server: the key is the secret and the tracker is the gate. TVM's tracker gives the keys
away in its `summary` (queue names and each server's "server:KEY"); this one lists a digest
of each key instead, which the workbench's client code checks against (`key_digest`).

    python -m workbench.tracker --host 127.0.0.1 --port 9190 [--port-end 9199]
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import socket
import sys

DIGEST_PREFIX = "sha256:"


def key_digest(key: str) -> str:
    """How this tracker names a device key in its summary."""
    return DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:24]


def _hide(key: str) -> str:
    if key.startswith("server:"):
        return "server:" + key_digest(key[len("server:"):])
    return key_digest(key)


def _handler_class():
    from .tvm_compat import tracker_handler_class

    class KeyHidingTrackerHandler(tracker_handler_class()):
        """TVM's tracker; its summary names keys by digest and leaves out server addresses' keys."""

        def summary(self):
            status = super().summary()
            queues = {_hide(key): info for key, info in status.get("queue_info", {}).items()}
            servers = [{**info, "key": _hide(info["key"])} if "key" in info else info
                       for info in status.get("server_info", [])]
            return {"queue_info": queues, "server_info": servers}

    return KeyHidingTrackerHandler


def bind(host: str, port: int, port_end: int) -> socket.socket:
    """A listening socket on the first free port of [port, port_end)."""
    for candidate in range(port, port_end):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError:
            sock.close()
            continue
        sock.listen(16)
        return sock
    raise SystemExit(f"error: cannot bind the tracker to any port in [{port}, {port_end}) on {host}")


def run(host: str, port: int, port_end: int) -> None:
    """Serve until killed. In this process's main thread: no worker process to outlive it."""
    import asyncio
    import logging

    from .lifeline import watch_parent

    watch_parent()
    logging.getLogger("RPCTracker").setLevel(logging.WARNING)  # per-connection INFO lines are noise
    sock = bind(host, port, port_end)
    asyncio.set_event_loop(asyncio.new_event_loop())
    # The stop key lets a client stop the tracker; nobody needs it here (the cluster ends the group).
    _handler_class()(sock, secrets.token_hex(16)).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.tracker", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9190)
    parser.add_argument("--port-end", type=int, default=None, help="end of the port range (default: port + 1)")
    args = parser.parse_args(argv)
    try:
        run(args.host, args.port, args.port_end or args.port + 1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
