"""A device farm: two local servers under one key (1 thread each), measured in parallel.

The sweep spreads its (layer, implementation) pairs over both servers, one session each, and
names the server of every record; MetaSchedule's runner gets one worker per server. Neither
measures anything twice, and both cover exactly what a one-server run covers.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.compare import KIND, compare
from workbench.kernels.registry import library_candidates
from workbench.measure import TimingConfig
from workbench.records import RecordStore
from workbench.rpc import DeviceError, LocalCluster, check_farm
from workbench.threads import resolve_threads
from workbench.tuning import TuningConfig, open_database, records_of, tune_layer, workload

ROOT = Path(__file__).resolve().parents[1]
QUICK = TimingConfig.quick()
KEY = ("layer", "impl")


@pytest.fixture(scope="module")
def farm():
    from processes import group_alive

    with LocalCluster(servers=2, threads=1) as cluster:
        assert len(cluster.pids) == 3  # the tracker and two servers, each its own process group
        groups = set(cluster.pids)
        yield cluster.device()
        groups.update(cluster.pids)  # servers restarted since
    assert not any(group_alive(g) for g in groups), "a farm process outlived its cluster"


@pytest.fixture(scope="module")
def single():
    with LocalCluster(servers=1, threads=1) as cluster:
        yield cluster.device()


def _layers(model):
    return [model.convs[0].name, model.convs[3].name]


def _sweep(model, device, store):
    return compare(model, device, _layers(model), candidates=library_candidates(1), timing=QUICK, store=store,
                   progress=False)


def test_the_sweep_spreads_over_the_farm_and_measures_nothing_twice(small_model, farm, single, tmp_path):
    store = RecordStore(tmp_path / "farm" / "records.jsonl")
    records = _sweep(small_model, farm, store)
    assert farm.server_count() == 2
    servers = {r["server"] for r in records}
    assert len(servers) == 2 and None not in servers  # both servers measured, each record names its own
    assert not store.duplicates(KIND, KEY)  # nothing measured twice
    assert len(store.read(KIND)) == len(records)

    alone = _sweep(small_model, single, RecordStore(tmp_path / "single" / "records.jsonl"))
    assert [(r["layer"], r["impl"]) for r in records] == [(r["layer"], r["impl"]) for r in alone]  # same coverage
    assert [r["status"] for r in records] == [r["status"] for r in alone]
    assert all(r["numerics_ok"] for r in records if r["status"] == "ok")

    again = _sweep(small_model, farm, store)  # resumes: everything is in the store already
    assert len(store.read(KIND)) == len(records)
    assert [(r["layer"], r["impl"], r["server"], r["median_ms"]) for r in again] == \
        [(r["layer"], r["impl"], r["server"], r["median_ms"]) for r in records]


def test_the_cli_starts_a_local_farm_and_holds_the_work_dir(small_model, tmp_path):
    from workbench.model import save_onnx

    path = save_onnx(small_model, tmp_path / "small.onnx")
    work = tmp_path / "work"
    argv = [sys.executable, "-m", "workbench", "compare", "--servers", "2", "--model", str(path), "--layers",
            ",".join(_layers(small_model)), "--quick", "--json", "--work-dir", str(work)]
    from workbench.records import WorkDir

    with WorkDir.at(work).lock("another run"):  # one run per work dir, farm or not
        busy = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert busy.returncode == 2 and "in use" in busy.stderr and busy.stderr.count("\n") == 1
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert len({r["server"] for r in rows}) == 2 and not any(r["emulated"] for r in rows)
    records = RecordStore(work / "results" / "records.jsonl").read(KIND)
    assert all(r["device"]["target"]["num-cores"] == 1 for r in records)  # 2 cores shared out: 1 thread each
    assert not RecordStore(work / "results" / "records.jsonl").duplicates(KIND, KEY)


def test_a_farm_that_oversubscribes_the_cores_is_refused():
    import os

    with pytest.raises(DeviceError, match="cores"):
        check_farm(2, os.cpu_count())
    with pytest.raises(DeviceError, match="positive"):
        check_farm(0, 1)
    cores = resolve_threads(None)
    with pytest.raises(DeviceError, match=f"pass at most --servers {cores}$"):
        check_farm(cores + 1, 1)
    done = subprocess.run([sys.executable, "-m", "workbench", "compare", "--servers", "2", "--tracker", "127.0.0.1:9",
                           "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--servers" in done.stderr


def test_tuning_runs_on_every_server_of_the_farm(small_model, farm, single, tmp_path):
    layer = small_model.convs[0]
    config = TuningConfig(trials_per_batch=4, population_size=16, genetic_num_iters=1)
    assert farm.parallel_servers() == 2 and single.parallel_servers() == 1
    result = tune_layer(layer, farm, 8, tmp_path / "farm", progress=False, config=config)
    assert result.trials == 8 and result.new_trials == 8
    assert len(result.servers) == 2 and sum(result.servers.values()) >= 8  # a session per candidate, on both
    database = open_database(tmp_path / "farm", farm.target)
    measured = records_of(database, workload(layer))
    assert len({str(r.trace) for r in measured}) == len(measured) == 8  # no candidate measured twice

    alone = tune_layer(layer, single, 8, tmp_path / "single", progress=False, config=config)
    assert alone.trials == result.trials and len(alone.servers) == 1  # the same coverage from one server


class KillsItsServerOnce:
    """TVM's default conv (as `tvm:killer`), whose first setup SIGKILLs the process group of the
    server its own session is on: one server of the farm dies, the other measures on."""

    def __init__(self, cluster):
        from workbench.kernels.default import DefaultCandidate

        self.inner, self.cluster, self.killed = DefaultCandidate(), cluster, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def impl(self):
        return "tvm:killer"

    def setup(self, session, case, device):
        import os
        import signal

        from workbench.rpc import server_of

        if not self.killed:
            port = int(server_of(session).rpartition(":")[2])
            pgid = next(pid for pid, p in self.cluster.server_ports.items() if p == port)
            os.killpg(pgid, signal.SIGKILL)
            self.killed.append((pgid, port))
        return self.inner.setup(session, case, device)


def test_a_farm_server_killed_mid_sweep_is_restarted_while_the_other_measures_on(small_model, tmp_path):
    from processes import group_alive

    with LocalCluster(servers=2, threads=1) as cluster:
        device = cluster.device()
        first = dict(cluster.server_ports)
        library = library_candidates(1)
        killer = KillsItsServerOnce(cluster)
        candidates = library[:4] + [killer] + library[4:]
        store = RecordStore(tmp_path / "records.jsonl")
        records = compare(small_model, device, _layers(small_model), candidates=candidates, timing=QUICK,
                          store=store, progress=False)
        pgid, port = killer.killed[0]
        assert group_alive(pgid) == []  # the kill happened, mid-sweep
        survivor = next(p for pid, p in first.items() if pid != pgid)
        assert survivor in cluster.server_ports.values()  # the other server was never restarted
        assert cluster.healthy(wait=5) and len(cluster.server_ports) == 2  # the dead one was replaced
    assert {r["status"] for r in records} <= {"ok", "not_applicable"}, [
        (r["impl"], r["status"], r["note"]) for r in records if r["status"] not in ("ok", "not_applicable")]
    assert not store.duplicates(KIND, KEY) and len(store.read(KIND)) == len(records)
    assert f"127.0.0.1:{survivor}" in {r["server"] for r in records}


def test_the_knob_tuner_measures_a_batch_on_both_servers_at_once(small_model, farm, tmp_path):
    from workbench import knob_records
    from workbench.knob_tuning import KnobTuningConfig, tune_knobs

    config = KnobTuningConfig(batch=6, samples=40)
    results = tune_knobs(small_model, farm, 12, tmp_path, layers=_layers(small_model), progress=False, config=config)
    trials = knob_records.KnobDatabase(tmp_path, farm.target).trials()
    assert len(trials) == 12 and sum(r.new_trials for r in results) == 12
    servers = {r["server"] for r in trials}
    assert len(servers) == 2 and None not in servers, "each batch is shared out over the farm"
    keys = [(r["workload"], json.dumps(r["knobs"], sort_keys=True), r["impl"]) for r in trials]
    assert len(set(keys)) == len(keys)  # no point measured twice
