"""Local RPC cluster, remote-tracker path, and ceilings measured through them."""

import gc
import json
import os
import socket
import struct
import time

import psutil
import pytest
from processes import group_alive

from workbench.ceilings import measure_ceilings
from workbench.rpc import DeviceError, LocalCluster, open_device, parse_tracker
from workbench.server import serve


def test_cluster_stops_every_process_it_started():
    with LocalCluster(threads=1) as cluster:
        groups = list(cluster.pids)
        assert cluster.device().run(lambda session: session.cpu(0).exist)
        # the server forked workers: more processes than the ones we started directly
        assert sum(len(group_alive(g)) for g in groups) > len(groups)
    for group in groups:
        assert group_alive(group) == [], "an RPC process outlived the cluster"


def test_a_kernel_runs_on_the_device_and_the_server_registered_workbench_functions(device):
    gemm = device.run(lambda session: session.get_function("workbench.ceilings.gemm_gflops")(64, 1))
    assert gemm > 0


def test_ceilings_measured_through_the_local_cluster(device):
    result = measure_ceilings(device, quick=True)
    assert len(result.peak_samples) == 3 and len(result.bandwidth_samples) == 3
    assert result.peak_gflops == max(result.peak_samples) > 1.0
    assert result.bandwidth_gbs == max(result.bandwidth_samples) > 0.5
    assert result.ridge_intensity == pytest.approx(result.peak_gflops / result.bandwidth_gbs)
    # Any CPU does more FLOPs per second from registers than it streams bytes from memory.
    assert result.peak_gflops > result.bandwidth_gbs
    assert result.gemm_gflops and result.gemm_gflops > 1.0


def test_a_tracker_given_by_address_is_used_as_a_remote_device(cluster):
    with open_device(tracker=f"127.0.0.1:{cluster.port}", key=cluster.key) as device:
        assert device.tracker == f"127.0.0.1:{cluster.port}"
        assert device.run(lambda session: session.cpu(0).exist)


def test_a_wrong_key_fails_at_once_naming_the_keys_there(cluster):
    # Opening the device asks it what it is: a key nobody registered fails right there.
    with pytest.raises(DeviceError, match=r"'no-such-board'.*keys there: \['sha256:[0-9a-f]+'\]"):
        with open_device(tracker=f"127.0.0.1:{cluster.port}", key="no-such-board"):
            pass


def _request_session(host: str, port: int, key: str, wait: float) -> list | None:
    """Ask the tracker for a server of `key` as any TVM client would; None if nothing comes within `wait` s."""
    from tvm.rpc import base

    with socket.create_connection((host, port), timeout=wait) as sock:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        assert struct.unpack("<i", base.recvall(sock, 4))[0] == base.RPC_TRACKER_MAGIC
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "outsider", 1])
        try:
            return base.recvjson(sock)
        except (TimeoutError, socket.timeout):
            return None


def _server_handshake(host: str, port: int, key: str) -> int:
    """The code a TVM RPC server answers to a client presenting `key` ("client:..."); never waits long."""
    from tvm.rpc import base

    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(struct.pack("<ii", base.RPC_MAGIC, len(key)) + key.encode())
        return struct.unpack("<i", base.recvall(sock, 4))[0]


def test_only_the_workbench_gets_a_session_on_its_local_cluster(cluster):
    import tvm.rpc
    from tvm.rpc import base

    summary = tvm.rpc.connect_tracker(cluster.host, cluster.port).summary()
    processes = [psutil.Process(pid) for group in cluster.pids for pid in group_alive(group)]
    shown = json.dumps(summary) + " ".join(" ".join(p.cmdline()) for p in processes)
    assert cluster.key not in shown, "the tracker's summary or a process's argv discloses the key"
    # The key travels in the environment, which only its owner can read.
    assert all(os.stat(f"/proc/{p.pid}/environ").st_mode & 0o077 == 0 for p in processes)

    # Everything an outsider sees that looks like a key, as given and without "server:".
    seen = [*summary["queue_info"], *(info["key"] for info in summary["server_info"])]
    names = {name for key in seen for name in (key, key.removeprefix("server:"))} | {"workbench"}
    for name in sorted(names):
        assert _request_session(cluster.host, cluster.port, name, wait=1.5) is None, f"{name!r} got a server"
    server_port = summary["server_info"][0]["addr"][1]
    for name in sorted(names):
        for header in (f"client:{name}", f"client:{name}:0.5"):
            assert _server_handshake(cluster.host, server_port, header) == base.RPC_CODE_MISMATCH

    # The same probes with the key get a server: they can tell.
    granted = _request_session(cluster.host, cluster.port, cluster.key, wait=10)
    assert granted and granted[0] == base.TrackerCode.SUCCESS
    host, port, matchkey = granted[1]
    remote = tvm.rpc.connect(host, port, key=matchkey)  # "client:" + the match key, as TVM's client does
    assert remote.cpu(0).exist
    del remote
    gc.collect()  # frees the server for the next session

    # The workbench, which holds the key, still gets its session.
    assert cluster.device().run(lambda session: session.cpu(0).exist)
    assert cluster.key not in json.dumps(cluster.device().describe())  # records never hold the secret


def test_bad_addresses_and_remote_binding_are_refused():
    with pytest.raises(DeviceError, match="HOST:PORT"):
        parse_tracker("localhost")
    with pytest.raises(DeviceError, match="--allow-remote"):
        serve(host="0.0.0.0", port=9999)


def _listener(answer: bytes | None):
    """A loopback socket that accepts connections and answers `answer` (None: says nothing)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(4)
            if answer is not None:
                conn.sendall(answer)
            threading.Timer(3, conn.close).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


@pytest.mark.parametrize("answer, said", [(b"HTTP/1.1 400 Bad Request\r\n", "did not answer as an RPC tracker"),
                                          (None, "sent nothing back")])
def test_an_address_that_is_not_a_tracker_fails_within_the_timeout_saying_so(answer, said):
    from workbench.rpc import probe_tracker

    server = _listener(answer)
    try:
        started = time.monotonic()
        with pytest.raises(DeviceError, match=f"could not connect to an RPC tracker at 127.0.0.1:\\d+ within 1 s: .*{said}"):
            probe_tracker("127.0.0.1", server.getsockname()[1], timeout=1)
        assert time.monotonic() - started < 5
    finally:
        server.close()


def test_the_local_tracker_passes_the_probe(cluster):
    from workbench.rpc import probe_tracker

    probe_tracker(cluster.host, cluster.port, timeout=5)


def test_tracker_addresses_take_ascii_digits_and_one_port_only():
    assert parse_tracker("[::1]:9190") == ("::1", 9190) and parse_tracker("host:9190") == ("host", 9190)
    for bad in ("127.0.0.1:\u00b2", "127.0.0.1:\u0669\u0661\u0669\u0660", "127.0.0.1:9190:9190",
                "http://127.0.0.1:9190", "[]:9190", "user@host:9190"):
        with pytest.raises(DeviceError, match="HOST:PORT"):
            parse_tracker(bad)
