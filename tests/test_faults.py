"""Fault injection: measurement survives its device dying, and an interrupt loses nothing.

Real processes and real signals throughout: a server SIGKILLed mid-sweep and mid-tuning, an
uploaded kernel that aborts its session process, SIGINT to a running `compare`, a tracker
that is not there. Each test bounds its own waits, so a regression fails instead of hanging.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from processes import group_alive
from workbench import interrupts, tuning
from workbench.compare import KIND, compare
from workbench.kernels.default import DefaultCandidate, default_conv_func
from workbench.kernels.registry import library_candidates
from workbench.kernels.tvm_kernel import FactoryCandidate
from workbench.measure import TimingConfig
from workbench.model import conv_layer, save_onnx
from workbench.records import RecordStore
from workbench.rpc import Device, LocalCluster, host_target

QUICK = TimingConfig(number=1, repeat=2, min_repeat_ms=1)


def bounded(seconds, work, *args, **kwargs):
    """work(*args, **kwargs) in a thread; fails the test if it is not done within `seconds`."""
    outcome = {}

    def run():
        try:
            outcome["value"] = work(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the test below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(work, '__name__', work)} still running after {seconds}s: a hang"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"], time.monotonic() - started


@pytest.fixture(scope="module")
def cluster():
    groups = set()
    with LocalCluster(threads=2) as running:
        running.groups = groups
        yield running
        groups.update(running.pids)
    leftovers = {pgid: group_alive(pgid) for pgid in groups}
    assert not any(leftovers.values()), f"processes left behind: {leftovers}"


def wait_gone(pids, seconds: float) -> list[int]:
    """The pids still running (not zombies) after waiting up to `seconds` for them to end."""
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def server_group(cluster) -> int:
    return cluster.procs[-1].pid  # the tracker starts first, the server after it


def keys_in(store) -> list[tuple]:
    return [(r["layer"], r["impl"]) for r in store.read(KIND)]


# ---------------------------------------------------------------- a kernel that kills its session

def plain_conv(layer, relu, weight):
    return default_conv_func(layer, relu)


def aborting_kernel(layer, relu, weight):
    """A conv-shaped PrimFunc whose body calls abort(): the session process dies with SIGABRT."""
    from tvm.script import tirx as T

    out_shape, in_shape, w_shape = layer.output_shape, layer.input_shape, weight.shape

    @T.prim_func
    def crash(data: T.Buffer(in_shape, "float32"), w: T.Buffer(w_shape, "float32"),
              bias: T.Buffer((out_shape[1],), "float32"), out: T.Buffer(out_shape, "float32")):
        T.evaluate(T.call_extern("int32", "abort"))

    return crash


def test_a_kernel_that_kills_its_session_is_recorded_crashed_and_the_server_serves_on(cluster, small_model,
                                                                                     tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    layer = small_model.convs[0].name
    pids = list(cluster.pids)
    candidates = [FactoryCandidate("tvm:before", plain_conv), FactoryCandidate("tvm:abort", aborting_kernel),
                  DefaultCandidate()]
    records, seconds = bounded(120, compare, small_model, cluster.device(), [layer], candidates=candidates,
                               timing=QUICK, store=store, progress=False)
    by = {r["impl"]: r for r in records}
    assert by["tvm:abort"]["status"] == "crashed", by["tvm:abort"]
    assert "2 times" in by["tvm:abort"]["note"] and "kShutdown" in by["tvm:abort"]["note"]
    assert by["tvm:before"]["status"] == by["tvm:default"]["status"] == "ok"
    assert by["tvm:default"]["numerics_ok"] and by["tvm:default"]["median_ms"] > 0
    # The server survived its session's death and re-registered by itself: nothing was restarted.
    assert cluster.pids == pids and cluster.healthy(wait=5)
    assert cluster.device().run(lambda session: session.cpu(0).exist)
    assert sorted(keys_in(store)) == sorted((layer, c.impl) for c in candidates)  # one record each
    # Resume: a crashed candidate is a result; nothing is measured again.
    again, _ = bounded(60, compare, small_model, cluster.device(), [layer], candidates=candidates, timing=QUICK,
                       store=store, progress=False)
    assert len(store.read(KIND)) == len(candidates) and [r["status"] for r in again] == [r["status"] for r in records]


def test_a_remote_device_is_waited_for_after_its_session_died(cluster, small_model):
    """Without a local cluster to restart, the server re-registers by itself and the sweep goes on."""
    layer = small_model.convs[0].name
    remote = Device(cluster.host, cluster.port, cluster.key, target=host_target(2), request_timeout=20)
    candidates = [FactoryCandidate("tvm:abort", aborting_kernel), DefaultCandidate()]
    records, _ = bounded(90, compare, small_model, remote, [layer], candidates=candidates, timing=QUICK,
                         progress=False)
    assert [r["status"] for r in records] == ["crashed", "ok"]


# ---------------------------------------------------------------- the server SIGKILLed mid-sweep

class KillsTheServerOnce(FactoryCandidate):
    """TVM's default conv, whose first setup SIGKILLs the whole server group (the device dies),
    or, with whole_group=False, only the server's main process (its session process lives on)."""

    def __init__(self, cluster, whole_group: bool = True):
        super().__init__("tvm:killer", plain_conv)
        self.cluster, self.killed, self.whole_group = cluster, [], whole_group

    def prim_func(self, layer, relu, weight, target):
        if not self.killed:
            pgid = server_group(self.cluster)
            self.cluster.groups.add(pgid)
            if self.whole_group:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pgid, signal.SIGKILL)  # the group leader only
            deadline = time.monotonic() + 10
            while (group_alive(pgid) if self.whole_group else not wait_gone([pgid], 0)) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.killed.append(pgid)
        return super().prim_func(layer, relu, weight, target)


def test_a_server_killed_mid_sweep_is_restarted_and_no_transport_failure_is_recorded(cluster, small_model,
                                                                                    tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    layers = [small_model.convs[1].name]
    library = library_candidates(2)
    killer = KillsTheServerOnce(cluster)
    candidates = library[:5] + [killer] + library[5:]
    device = cluster.device()
    records, seconds = bounded(150, compare, small_model, device, layers, candidates=candidates, timing=QUICK,
                               store=store, progress=False)
    assert killer.killed and group_alive(killer.killed[0]) == []  # the kill happened, mid-sweep
    assert server_group(cluster) != killer.killed[0] and cluster.healthy(wait=5)
    assert {r["status"] for r in records} <= {"ok", "not_applicable"}, [
        (r["impl"], r["status"], r["note"]) for r in records if r["status"] not in ("ok", "not_applicable")]
    assert next(r for r in records if r["impl"] == "tvm:killer")["numerics_ok"]
    wanted = sorted((l, c.impl) for l in layers for c in candidates)
    assert sorted(keys_in(store)) == wanted  # none lost, none twice, no transport failure stored
    # A re-run measures nothing new (with the device the cluster gave after the restart).
    lines = len(store.read())
    _, again = bounded(60, compare, small_model, device, layers, candidates=candidates, timing=QUICK, store=store,
                       progress=False)
    assert len(store.read()) == lines and again < 30


def test_a_server_whose_main_process_dies_under_a_live_session_is_restarted_not_recorded_failed(
        cluster, small_model, tmp_path):
    # The session process outlives its server and answers, but uploads fail: the device's
    # failure, which must not be stored as the candidates' results.
    store = RecordStore(tmp_path / "records.jsonl")
    layers = [small_model.convs[1].name]
    library = library_candidates(2)
    killer = KillsTheServerOnce(cluster, whole_group=False)
    candidates = [killer, DefaultCandidate(), *library[:3]]
    records, _ = bounded(150, compare, small_model, cluster.device(), layers, candidates=candidates, timing=QUICK,
                         store=store, progress=False)
    assert killer.killed and wait_gone([killer.killed[0]], 5) == []
    assert {r["status"] for r in records} <= {"ok", "not_applicable"}, [
        (r["impl"], r["status"], r["note"]) for r in records if r["status"] not in ("ok", "not_applicable")]
    assert sorted(keys_in(store)) == sorted((l, c.impl) for l in layers for c in candidates)
    # The next use of the device brings its server back, and the old group (orphaned session included) is gone.
    again, _ = bounded(150, compare, small_model, cluster.device(), layers, candidates=[DefaultCandidate()],
                       timing=QUICK, progress=False)
    assert again[0]["status"] == "ok" and cluster.healthy(wait=5)
    assert group_alive(killer.killed[0]) == []


def sleeping_kernel(layer, relu, weight):
    """A conv-shaped PrimFunc that never returns in time: its session process hangs (not dies)."""
    from tvm.script import tirx as T

    out_shape, in_shape, w_shape = layer.output_shape, layer.input_shape, weight.shape

    @T.prim_func
    def hang(data: T.Buffer(in_shape, "float32"), w: T.Buffer(w_shape, "float32"),
             bias: T.Buffer((out_shape[1],), "float32"), out: T.Buffer(out_shape, "float32")):
        T.evaluate(T.call_extern("int32", "sleep", 3600))

    return hang


def test_a_kernel_that_never_answers_is_ended_from_this_side_and_recorded_crashed(cluster, small_model, tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    layer = small_model.convs[0].name
    device = cluster.device()
    device.call_timeout = 5  # the default (300 s) is for real kernels; the server's own limit is 600 s
    candidates = [FactoryCandidate("tvm:hang", sleeping_kernel), DefaultCandidate()]
    records, seconds = bounded(150, compare, small_model, device, [layer], candidates=candidates, timing=QUICK,
                               store=store, progress=False)
    by = {r["impl"]: r for r in records}
    assert by["tvm:hang"]["status"] == "crashed" and "no answer" in by["tvm:hang"]["note"], by["tvm:hang"]
    assert by["tvm:default"]["status"] == "ok" and cluster.healthy(wait=5)
    cluster.groups.update(cluster.pids)


def test_failed_records_are_measured_again_on_resume(cluster, small_model, tmp_path):
    """Records left `failed` by older runs (a dead session stored as a result) are not reused."""
    store = RecordStore(tmp_path / "records.jsonl")
    layer = small_model.convs[1].name
    candidate = DefaultCandidate()
    context = {"model": small_model.name, "threads": 2}
    store.append(KIND, {**context, "layer": layer, "impl": candidate.impl, "status": "failed", "config": "",
                        "note": "InternalError: Check failed: (code == RPCCode::kReturn) is false: code=kShutdown"})
    records, _ = bounded(60, compare, small_model, cluster.device(), [layer], candidates=[candidate], timing=QUICK,
                         store=store, progress=False)
    assert records[0]["status"] == "ok" and len(store.read(KIND)) == 2


# ---------------------------------------------------------------- the server SIGKILLed mid-tuning

TINY = conv_layer("tiny", "input", (1, 8, 16, 16), 8)


def test_tuning_survives_a_server_killed_mid_search(cluster, tmp_path):
    config = tuning.TuningConfig(trials_per_batch=4, population_size=32, request_wait_sec=3)
    device = cluster.device()
    db = tuning.database_dir(tmp_path, device.target) / "database_tuning_record.json"
    killed = []

    def kill_after_first_batch():  # as soon as the first batch is committed, the device dies
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            if db.exists() and len(db.read_text().splitlines()) >= 4:
                pgid = server_group(cluster)
                cluster.groups.add(pgid)
                os.killpg(pgid, signal.SIGKILL)
                killed.append(pgid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_batch, daemon=True)
    killer.start()
    result, seconds = bounded(240, tuning.tune_layer, TINY, device, 8, tmp_path, progress=False, config=config)
    killer.join(1)
    assert killed and group_alive(killed[0]) == []
    assert result.trials == 8 and result.new_trials == 8, result
    assert len(db.read_text().splitlines()) == 8  # every trial kept, none lost to the dead device, none twice
    records = tuning.records_of(tuning.open_database(tmp_path, device.target), tuning.workload(TINY))
    assert len(records) == 8 and all(tuning.record_ms(r) is not None for r in records), \
        "a transport failure was stored as a trial"
    again, _ = bounded(60, tuning.tune_layer, TINY, device, 8, tmp_path, progress=False, config=config)
    assert again.new_trials == 0 and again.trials == 8


# ---------------------------------------------------------------- Ctrl-C and an absent tracker

def swallowing_kernel(layer, relu, weight):
    """What TVM's RPC client can do with a Ctrl-C that arrives while it waits: the KeyboardInterrupt
    comes out as its own error. The signal handler has noted it (interrupts.py)."""
    interrupts.note(KeyboardInterrupt)
    raise AttributeError("Module has no function 'workbench.nnpack.set_threads'")


def test_an_interrupt_turned_into_another_error_still_stops_the_sweep(cluster, small_model, tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    layer = small_model.convs[0].name
    candidates = [FactoryCandidate("tvm:before", plain_conv), FactoryCandidate("tvm:swallowed", swallowing_kernel),
                  DefaultCandidate()]
    try:
        with pytest.raises(KeyboardInterrupt):
            bounded(120, compare, small_model, cluster.device(), [layer], candidates=candidates, timing=QUICK,
                    store=store, progress=False)
    finally:
        interrupts.reset()
    # What was measured before is kept; the interrupted candidate is no "failed" result, nothing after it ran.
    assert keys_in(store) == [(layer, "tvm:before")]



def _workbench(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "workbench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def test_sigint_stops_compare_with_one_line_and_the_rerun_resumes(small_model, tmp_path):
    model = save_onnx(small_model, tmp_path / "small.onnx")
    work = tmp_path / "w"
    args = ["compare", "--model", str(model), "--layers", small_model.convs[1].name, "--quick", "--json",
            "--work-dir", str(work)]
    records = work / "results" / "records.jsonl"
    proc = _workbench(*args)
    family = set()
    try:
        deadline = time.monotonic() + 120
        while not (records.exists() and len(records.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "compare measured nothing in 120 s"
            time.sleep(0.05)
        family = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and lines[-1].startswith("interrupted: "), err
    assert sum(line.startswith("interrupted") for line in lines) == 1
    kept = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(kept) >= 2 and f"{len(kept)} new results kept in {work}" in lines[-1]
    assert wait_gone(family, 10) == [], "processes of the interrupted run still run"
    assert group_alive(proc.pid) == []
    # The same command again measures what is missing, and only that.
    rerun = subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    rows = json.loads(rerun.stdout)
    keys = [(r["layer"], r["impl"]) for r in map(json.loads, records.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == len(rows)
    assert {r["status"] for r in rows} <= {"ok", "not_applicable"}


def test_an_absent_tracker_is_reported_in_seconds():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "workbench", "ceilings", "--quick", "--tracker", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot connect to the RPC tracker at 127.0.0.1:1")
    assert time.monotonic() - started < 30
