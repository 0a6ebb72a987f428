"""However the command that started them dies, its local cluster and TVM's workers die with it.

Real commands (`python -m workbench compare`, `tune`) in their own session, killed with real
signals while their cluster (and MetaSchedule's runner) runs; every wait is bounded.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from processes import group_alive

from workbench.model import save_onnx

GONE_WITHIN = 20.0  # seconds for every process of the dead command's cluster to end


def _wait(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll `condition` until it returns something truthy; fail (not hang) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the command ended (code {proc.returncode}) before {what}")
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _listening_ports(pids) -> set[int]:
    ports = set()
    for pid in pids:
        try:
            ports |= {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return ports


def _running_cluster(main: psutil.Process) -> tuple[list[int], set[int]] | None:
    """(process groups, listening ports) of the command's tracker and server, once both listen."""
    children = main.children()
    tracker = [p.pid for p in children if "workbench.tracker" in _cmdline(p)]
    servers = [p.pid for p in children if "workbench serve" in _cmdline(p)]
    if not tracker or not servers:
        return None
    groups = tracker + servers  # each is its own group's leader
    members = {group: group_alive(group) for group in groups}
    ports = {group: _listening_ports(pids) for group, pids in members.items()}
    if not all(ports.values()):  # the tracker, and the server's TVM worker, listen once started
        return None
    return groups, set().union(*ports.values())


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT does not count
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _assert_all_gone(groups, ports, pids=()) -> None:
    """Within GONE_WITHIN s: no live process in `groups` or `pids`, and `ports` free to bind."""
    deadline = time.monotonic() + GONE_WITHIN
    while True:
        alive = {g: members for g in groups if (members := group_alive(g))}
        alive_pids = [pid for pid in pids if _alive(pid)]
        held = [port for port in ports if not _port_free(port)]  # a dying process may hold it a moment
        if not (alive or alive_pids or held) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert alive == {}, f"cluster processes outlived the killed command: {alive}"
    assert alive_pids == [], f"TVM popen workers outlived the killed command: {alive_pids}"
    assert held == [], f"ports still held after the command died: {held}"


def _start(tmp_path, *args) -> subprocess.Popen:
    # Its own session, as from a terminal; the test kills the main process only, never the group.
    return subprocess.Popen([sys.executable, "-m", "workbench", *args, "--work-dir", str(tmp_path / "work")],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "stderr.txt", "wb"), cwd=tmp_path)


@pytest.fixture()
def model_file(small_model, tmp_path):
    return str(save_onnx(small_model, tmp_path / "small.onnx"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_compare_leaves_no_cluster_process_and_no_port(tmp_path, model_file, sig):
    proc = _start(tmp_path, "compare", "--model", model_file, "--threads", "1")
    try:
        groups, ports = _wait(lambda: _running_cluster(psutil.Process(proc.pid)), 90,
                              "the command's local cluster to run", proc)
        assert len(groups) == 2 and len(ports) >= 2
        os.kill(proc.pid, sig)
        # SIGTERM is handled (clean-up, then exit 143); SIGKILL cannot be: the cluster ends itself.
        assert proc.wait(20) == (143 if sig == signal.SIGTERM else -sig)
        _assert_all_gone(groups, ports)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_stopped_server_is_ended_too_when_the_command_is_killed(tmp_path, model_file):
    # A stopped process cannot run its own watch of the parent: the cluster's reaper ends it.
    proc = _start(tmp_path, "compare", "--model", model_file, "--threads", "1")
    try:
        groups, ports = _wait(lambda: _running_cluster(psutil.Process(proc.pid)), 90,
                              "the command's local cluster to run", proc)
        for group in groups:
            os.killpg(group, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        _assert_all_gone(groups, ports)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for group in groups if "groups" in locals() else ():
            try:
                os.killpg(group, signal.SIGCONT)
            except OSError:
                pass


def test_a_command_killed_while_tuning_leaves_no_popen_worker(tmp_path, model_file, small_model):
    layer = small_model.convs[0].name
    proc = _start(tmp_path, "tune", "--space", "metaschedule", "--model", model_file, "--layers", layer, "--trials", "8",
                  "--threads", "1")
    try:
        main = psutil.Process(proc.pid)
        groups, ports = _wait(lambda: _running_cluster(main), 90, "the command's local cluster to run", proc)
        # MetaSchedule's runner: a TVM popen worker, started by the command itself once a batch is built.
        workers = _wait(lambda: [p.pid for p in main.children() if "tvm.exec.popen_worker" in _cmdline(p)], 150,
                        "MetaSchedule's runner worker to start", proc)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        _assert_all_gone(groups, ports, workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


BUSY_WORKER = """
import os, signal, time
import psutil
from workbench.lifeline import guard_popen_workers
guard_popen_workers()
from tvm.support.popen_pool import PopenPoolExecutor
pool = PopenPoolExecutor(max_workers=1)  # as MetaSchedule's runner: workers started from pool threads
pool.submit(time.sleep, 300)  # a busy worker does not notice its pipe closing
deadline = time.monotonic() + 60
while not (workers := [p.pid for p in psutil.Process().children() if "popen_worker" in " ".join(p.cmdline())]):
    assert time.monotonic() < deadline
    time.sleep(0.1)
time.sleep(1)  # the task is in the worker now
print(workers[0], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_busy_tvm_popen_worker_dies_with_the_process_that_started_it(tmp_path):
    # Output to files, not pipes: a surviving worker would hold a pipe open and stall the wait.
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.run([sys.executable, "-c", BUSY_WORKER], stdout=stdout, stderr=stderr, timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.read_text()[-2000:]
    worker = int(out.read_text().split()[-1])
    _wait(lambda: not _alive(worker), GONE_WITHIN, "the busy popen worker to end")


def test_a_server_killed_outright_takes_its_tvm_worker_and_port_with_it(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "serve", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "wb"))
    try:
        # TVM's server listens in a popen worker whose listening thread outlives its pipe.
        worker = _wait(lambda: [p.pid for p in psutil.Process(proc.pid).children() if port in _listening_ports([p.pid])],
                       90, "the server to listen", proc)[0]
        proc.kill()
        proc.wait(10)
        _assert_all_gone([], [port], [worker])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
