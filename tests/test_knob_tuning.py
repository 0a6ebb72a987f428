"""The knob tuner: its space, its cost model, and a real search over a small UNet's convs on the
local cluster (measured through the protocol, resumable, one budget for the model)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from processes import group_alive

from workbench import knob_records, knob_tuning, schedules
from workbench.compare import compare
from workbench.fusion import Fusion
from workbench.kernels.hand_tuned import HandTunedCandidate
from workbench.knob_tuning import KnobSpace, KnobTuningConfig, Point, QuietGate
from workbench.model import save_onnx

CONFIG = KnobTuningConfig(batch=4, samples=60)
BUDGET = 20


def _workloads(model, layers=None):
    return {knob_records.workload_key(layer) for layer in model.select_convs(layers)}


@pytest.fixture(scope="module")
def tuned(small_model, device, tmp_path_factory):
    """One whole-model search over the small UNet: a budget that covers the starting points and then some."""
    work_dir = tmp_path_factory.mktemp("knobs")
    layers = ["enc0_conv1", "enc1_conv2", "head_conv"]
    results = knob_tuning.tune_knobs(small_model, device, BUDGET, work_dir, layers=layers, progress=False,
                                     config=CONFIG)
    return work_dir, layers, results


# ---------------------------------------------------------------- the space

@pytest.mark.parametrize("name", ["enc0_conv1", "enc1_conv2", "head_conv", "dec0_reduce"])
def test_every_schedule_default_lies_in_its_declared_space(small_model, name):
    space = KnobSpace(small_model.layer(name), threads=2)
    assert space.schedules, "some hand schedule applies to every conv of the UNet"
    for schedule in space.schedules:
        default = space.default(schedule)
        ranges = space.ranges[schedule]
        assert set(ranges) == set(default.knob_dict())  # the space names every knob of the schedule
        for knob, value in default.knobs:
            assert value in ranges[knob], (schedule, knob, value)
        assert space.valid(default)


def test_sampled_and_neighbouring_points_are_valid_and_invalid_ones_are_rejected(small_model):
    layer = small_model.layer("enc1_conv2")
    space = KnobSpace(layer, threads=2)
    points = space.sample(np.random.default_rng(0), 50)
    assert points and all(space.valid(p) for p in points)
    conv = schedules.ConvLayer.of(layer)
    for p in points:  # valid means the schedule's own check passes: nothing invalid reaches a build
        schedules.validate_knobs(p.schedule, conv, schedules.knobs_class(p.schedule)(**p.knob_dict()))
    default = space.default("direct_nchw")
    assert all(space.valid(n) and n != default for n in space.neighbours(default))
    too_wide = Point.hand("direct_nchw", {**default.knob_dict(), "ow_bn": 2, "vec": 16})  # vec > its tile
    assert not space.valid(too_wide)
    assert all(p.impl.startswith("nnpack:") and space.valid(p) for p in space.nnpack)


def test_nnpack_choices_leave_out_what_does_not_apply(small_model):
    head = KnobSpace(small_model.layer("head_conv"), threads=2)  # a 3x3 stride-1 conv: Winograd applies
    assert any(p.impl.startswith("nnpack:wt8x8:") for p in head.nnpack)
    assert all(not p.impl.startswith("nnpack:direct:") for p in head.nnpack)  # direct is 1x1 only
    assert "nnpack:auto:compute" not in {p.impl for p in head.nnpack}


def test_features_have_one_length_and_tell_points_apart(small_model):
    layer = small_model.layer("enc1_conv2")
    space = KnobSpace(layer, threads=2)
    points = [space.default(s) for s in space.schedules] + space.nnpack
    rows = [knob_tuning.features(layer.geometry, p, 2) for p in points]
    assert len({len(r) for r in rows}) == 1
    assert len({tuple(r) for r in rows}) == len(rows)


def test_the_cost_model_learns_a_ranking():
    # The learner itself, on a known function of the features (not a measured claim): the point
    # it predicts fastest among unseen ones is among the truly fastest.
    rng = np.random.default_rng(1)
    rows = rng.uniform(0, 4, size=(120, 6))
    truth = np.exp(0.5 * rows[:, 0] - 0.3 * rows[:, 1] + 0.1 * rows[:, 2] ** 2)
    model = knob_tuning.CostModel(seed=0)
    model.fit(rows[:80].tolist(), truth[:80].tolist())
    predicted = model.predict_ms(rows[80:].tolist())
    best_predicted = int(np.argmin(predicted))
    assert truth[80:][best_predicted] <= np.sort(truth[80:])[3]


def test_the_quiet_gate_keeps_builds_off_a_timed_kernel():
    gate, events = QuietGate(active=True, wait_s=10), []
    timing_started, release = threading.Event(), threading.Event()

    def time_kernel():
        with gate.timing():
            timing_started.set()
            release.wait(5)
            events.append("timed")

    def build():
        timing_started.wait(5)
        with gate.building():
            events.append("built")

    threads = [threading.Thread(target=time_kernel), threading.Thread(target=build)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert events == []  # the build waits while the kernel is timed
    release.set()
    for t in threads:
        t.join(10)
    assert events == ["timed", "built"]
    with QuietGate(active=False, wait_s=10).building():  # a remote device: builds never wait
        pass


def test_a_kernel_waiting_to_be_timed_goes_before_the_queued_builds(device):
    # The next batch's builds are queued before this batch is measured: a timing must wait for the
    # build in hand only, not for the whole queue.
    gate = QuietGate(active=True, wait_s=30)
    builder = knob_tuning.Builder(device, gate)

    class Slow:
        def compile(self, case, device):
            time.sleep(0.4)
            return "kernel"

    try:
        tickets = [builder.submit(Slow(), None) for _ in range(6)]
        while tickets[0].started is None:
            time.sleep(0.01)
        with gate.timing() as disturbed:
            done = sum(t.finished is not None for t in tickets)
            assert not disturbed
        assert done <= 2, f"{done} builds ran before the kernel was timed"
        assert tickets[-1].wait(30) == "kernel"  # and the queue drains after it
    finally:
        builder.close()


def test_a_cancelled_build_is_not_the_points_failure():
    ticket = knob_tuning.BuildTicket()
    ticket.cancel()
    with pytest.raises(knob_tuning.NotBuilt):
        ticket.wait(5)
    started = knob_tuning.BuildTicket()
    started.start()
    started.started -= 10  # a build running past the timeout is the point's own failure
    with pytest.raises(TimeoutError):
        started.wait(5)


def test_the_budget_goes_where_the_whole_model_gains_most(small_model, device, tmp_path):
    tuner = knob_tuning.KnobTuner(small_model, device, tmp_path, ["enc0_conv2", "dec0_conv", "enc1_conv1", "head_conv"],
                                  CONFIG, progress=False)
    tasks = list(tuner.tasks.values())
    shared = next(t for t in tasks if len(t.layers) == 2)  # enc0_conv2 and dec0_conv share a shape
    alone = next(t for t in tasks if len(t.layers) == 1)
    for task, ms in ((shared, 1.0), (alone, 1.5)):
        task.trials["x"] = {"status": "ok", "numerics_ok": True, "median_ms": ms}
    pool = [(Point("tvm:direct_nchw"), 0.9)]  # the same predicted 10% (shared) and 40% (alone)
    assert tuner._gain(shared, pool) == pytest.approx(1.0 * 2 * 0.1)
    assert tuner._gain(alone, pool) == pytest.approx(1.5 * 1 * 0.4)
    failed = next(t for t in tasks if t not in (shared, alone))
    failed.trials["y"] = {"status": "failed", "numerics_ok": False, "median_ms": None}
    assert tuner._gain(failed, pool) == 0.0  # a shape where nothing ran never starves the others


# ---------------------------------------------------------------- the search on the device

def test_every_trial_is_checked_then_timed_and_kept_per_target(tuned, device, small_model):
    work_dir, layers, results = tuned
    trials = knob_records.KnobDatabase(work_dir, device.target).trials()
    assert len(trials) == BUDGET
    assert {r["workload"] for r in trials} == _workloads(small_model, layers)
    for record in trials:  # every valid point builds and computes the right answer
        assert record["status"] == "ok" and record["numerics_ok"] is True, record
        assert record["median_ms"] > 0 and len(record["repeats_ms"]) >= 3
        if not record["impl"].startswith("nnpack:"):
            assert record["build_s"] > 0 and record["measure_s"] > 0
    assert knob_records.database_path(work_dir, device.target).parent.name.startswith("llvm")
    assert {r.layer for r in results} == set(layers)
    assert sum(r.new_trials for r in results) == BUDGET and results[0].trials_per_minute > 0


def test_every_workload_gets_its_starting_points_before_the_model_guides(tuned, device, small_model):
    work_dir, layers, _ = tuned
    trials = knob_records.KnobDatabase(work_dir, device.target).trials()
    starts = {knob_records.workload_key(l): {p.key for p in KnobSpace(l, 2).starting_points()}
              for l in small_model.select_convs(layers)}
    n_starts = sum(len(s) for s in starts.values())
    assert n_starts < BUDGET  # the budget reaches past the starts
    first = trials[:n_starts]
    assert all(knob_tuning.point_of(r).key in starts[r["workload"]] for r in first)
    guided = trials[n_starts:]
    batches = {}
    for record in guided:
        batches.setdefault(record["batch"], set()).add(record["workload"])
    assert guided and all(len(w) == 1 for w in batches.values())  # a guided batch serves one workload


def test_the_estimate_is_the_convs_at_their_shapes_best(tuned, device, small_model):
    work_dir, layers, results = tuned
    history = knob_records.estimate_history(small_model, work_dir, device.target, layers)
    by_layer = {r.layer: r.best_ms for r in results}
    assert history and history[-1][1] == pytest.approx(sum(by_layer.values()))
    assert history[0][0] >= len(_workloads(small_model, layers))  # only once every shape has a time
    assert {r.layer: r.new_trials for r in results if r.new_trials} and \
        sum(r.new_trials for r in results) == BUDGET  # counted once per shape


def test_a_rerun_measures_nothing_and_a_larger_budget_only_the_difference(tuned, device, small_model):
    work_dir, layers, first = tuned
    again = knob_tuning.tune_knobs(small_model, device, BUDGET, work_dir, layers=layers, progress=False, config=CONFIG)
    assert sum(r.new_trials for r in again) == 0
    assert {r.layer: r.best_ms for r in again} == {r.layer: r.best_ms for r in first}
    more = knob_tuning.tune_knobs(small_model, device, BUDGET + 4, work_dir, layers=layers, progress=False,
                                  config=CONFIG)
    assert sum(r.new_trials for r in more) == 4
    keys = [(r["workload"], knob_tuning.point_of(r).key) for r in knob_records.KnobDatabase(work_dir, device.target).trials()]
    assert len(keys) == len(set(keys)) == BUDGET + 4  # no point measured twice


def test_the_tuned_candidate_runs_the_best_point_through_the_protocol(tuned, device, small_model):
    work_dir, layers, results = tuned
    candidate = HandTunedCandidate(work_dir, device.target)
    records = compare(small_model, device, layers + ["enc2_conv1"], candidates=[candidate], progress=False)
    by_layer = {r["layer"]: r for r in records}
    for name in layers:
        assert by_layer[name]["status"] == "ok" and by_layer[name]["numerics_ok"], by_layer[name]
        assert by_layer[name]["config"] == candidate.config_for(small_model.layer(name))  # names the choice
    assert by_layer["enc2_conv1"]["status"] == "not_applicable"
    assert "--space hand" in by_layer["enc2_conv1"]["note"]
    best = knob_records.best_trials(work_dir, device.target)
    chosen = candidate.choice(small_model.layer(layers[0]))
    expected = best[knob_records.workload_key(small_model.layer(layers[0]))]
    assert chosen.impl == expected["impl"] and chosen.fixed == expected["knobs"]
    with pytest.raises(Exception, match="tune it first"):  # no database: building says what to do
        HandTunedCandidate().prim_func(small_model.layer(layers[0]), Fusion(), None, device.target)


def test_a_plan_pins_the_tuned_choice_and_builds_it_without_the_database(tuned, device, small_model, tmp_path):
    from workbench.plan import Plan
    from workbench.study import pin_choices

    work_dir, layers, _ = tuned
    candidate = HandTunedCandidate(work_dir, device.target)
    plan = pin_choices(small_model, Plan.uniform(small_model, overrides={name: "tvm:hand_tuned" for name in layers},
                                                 fuse="2018"), [candidate])
    entry = plan.layers[layers[0]]
    assert entry.knobs == candidate.pin(small_model.layer(layers[0])) and entry.knobs["schedule"]
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    again.validate(small_model)  # the default candidates: no database, no target
    pinned = again.candidate(layers[0])
    assert pinned.config_for() == candidate.config_for(small_model.layer(layers[0]))
    bad = {**entry.knobs, "schedule": "winograd_9"}
    with pytest.raises(Exception, match="schedule"):
        candidate.with_knobs(bad)


def test_emulated_trials_are_kept_apart(tuned, device):
    work_dir, _, _ = tuned
    assert knob_records.KnobDatabase(work_dir, device.target).trials()
    assert knob_records.KnobDatabase(work_dir, device.target, emulated=True).trials() == []


# ---------------------------------------------------------------- the command line

def _wait_gone(group: int, seconds: float = 20) -> list:
    deadline = time.monotonic() + seconds
    while (alive := group_alive(group)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=timeout)


def test_tune_space_hand_from_the_command_line_resumes(small_model, cluster, tmp_path):
    onnx = str(save_onnx(small_model, tmp_path / "small.onnx"))
    args = ["tune", "--space", "hand", "--model", onnx, "--layers", "head_conv", "--trials", "6",
            "--work-dir", str(tmp_path / "w"), "--tracker", f"127.0.0.1:{cluster.port}", "--key", cluster.key, "--json"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = json.loads(first.stdout)
    assert [r["layer"] for r in rows] == ["head_conv"] and rows[0]["space"] == "hand"
    assert rows[0]["trials"] == 6 and rows[0]["new_trials"] == 6 and rows[0]["best"]["impl"].startswith(("tvm:", "nnpack:"))
    again = json.loads(_cli(*args).stdout)
    assert again[0]["new_trials"] == 0 and again[0]["best_ms"] == rows[0]["best_ms"]


def test_ctrl_c_keeps_every_trial_and_the_next_run_resumes(small_model, tmp_path):
    onnx = str(save_onnx(small_model, tmp_path / "small.onnx"))
    work = tmp_path / "w"
    args = ["tune", "--model", onnx, "--trials", "200", "--whole-model", "--work-dir", str(work), "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "workbench", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    files = lambda: list(work.glob("tuning/*/knobs.jsonl"))  # noqa: E731
    lines = lambda: sum(1 for _ in open(files()[0])) if files() else 0  # noqa: E731
    deadline = time.monotonic() + 240
    while lines() < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None and lines() >= 6, "the search did not get going"
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    kept = lines()
    assert f"interrupted: {kept} new results kept" in err and "run the same command again to resume" in err
    trials = [json.loads(l) for l in open(files()[0])]
    assert kept == len(trials) >= 6 and all(t["status"] != "failed" or t["note"] for t in trials)
    assert _wait_gone(proc.pid) == [], "processes of the interrupted command outlived it"
    resumed = _cli(*args[:4], str(kept + 2), *args[5:], "--json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sum(r["new_trials"] for r in json.loads(resumed.stdout)) == 2


def test_a_tuned_point_whose_placement_does_not_fit_a_fusion_falls_back_and_stays_correct(small_model, device,
                                                                                        tmp_path):
    # enc1_conv1 reads the first pool: folded, its Winograd input stage must keep the pool in a
    # separate padding stage, so a point tuned with pad="inline" is rebuilt with the default placement.
    from workbench.compare import measure_one
    from workbench.fusion import prologue_chain

    layer = small_model.layer("enc1_conv1")
    assert prologue_chain(small_model, layer) == ("maxpool", "relu")
    space = KnobSpace(layer, threads=2)
    inline = Point.hand("winograd_2", {**space.default("winograd_2").knob_dict(), "pad": "inline"})
    assert space.valid(inline)  # fine for the conv alone
    db = knob_records.KnobDatabase(tmp_path, device.target, threads=2)
    db.add({"layer": layer.name, "impl": inline.impl, "status": "ok", "median_ms": 0.01, "numerics_ok": True,
            "repeats_ms": [0.01], "workload": knob_records.workload_key(layer), "knobs": inline.knob_dict(),
            "threads": 2, "emulated": False})
    candidate = HandTunedCandidate(tmp_path, device.target)
    pool = small_model.layer(layer.inputs[0])
    while pool.op != "maxpool":
        pool = small_model.layer(pool.inputs[0])
    fusion = Fusion(pool=2, pool_relu=True, pool_in=tuple(pool.input_shape[2:]), relu=True)
    record = measure_one(small_model, device, layer.name, candidate, fusion=fusion)
    assert record["status"] == "ok" and record["numerics_ok"], record["note"]
