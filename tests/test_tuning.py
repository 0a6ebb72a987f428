"""MetaSchedule tuning through the local RPC cluster: a tiny conv, a few trials, resumable.

One tuning run (module fixture) serves every test; it costs the one-off import of TVM's tensor
intrinsics (~20-35 s on 2 cores) plus about 10 s of search and measurement.
"""

import numpy as np
import pytest

from workbench import tuning
from workbench.kernels.default import DefaultCandidate
from workbench.kernels.tuned import TunedCandidate
from workbench.measure import ConvCase, TimingConfig, measure, reference_conv
from workbench.model import conv_layer

LAYER = conv_layer("tiny", "input", (1, 8, 16, 16), 8)
TRIALS = 8
TIMING = TimingConfig(number=1, repeat=5, min_repeat_ms=20)


@pytest.fixture(scope="module")
def tuned(device, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("tuning")
    return work_dir, tuning.tune_layer(LAYER, device, TRIALS, work_dir, progress=False)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(7)
    _, c, _, _ = LAYER.input_shape
    weight = rng.standard_normal((LAYER.out_channels, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(LAYER.out_channels).astype(np.float32)
    x = rng.standard_normal(LAYER.input_shape).astype(np.float32)
    return ConvCase(LAYER, weight, bias, x, reference_conv(LAYER, x, weight, bias))  # torch conv2d + bias


def test_tuning_measures_the_budget_into_a_per_target_database(tuned, device):
    work_dir, result = tuned
    assert result.layer == "tiny"
    assert 0 < result.new_trials == result.trials <= TRIALS
    assert result.trials_per_minute > 0
    assert result.best_ms is not None and result.best_ms > 0
    times = [ms for _, ms in result.history]
    assert times == sorted(times, reverse=True) and times[-1] == pytest.approx(result.best_ms)
    db = tuning.database_dir(work_dir, device.target)
    assert db.parent == work_dir and db.name == tuning.target_slug(device.target)
    assert (db / "database_tuning_record.json").stat().st_size > 0
    assert (db / "database_workload.json").stat().st_size > 0


def test_rerun_with_same_arguments_measures_nothing(tuned, device):
    work_dir, first = tuned
    again = tuning.tune_layer(LAYER, device, TRIALS, work_dir, progress=False)
    assert again.new_trials == 0
    assert again.trials == first.trials
    assert again.best_ms == pytest.approx(first.best_ms)
    assert again.seconds < 10


def test_tuned_kernel_is_correct_and_not_slower_than_default(tuned, device, case):
    work_dir, result = tuned
    default = DefaultCandidate()
    tuned_run, default_run = device.run(
        lambda session: [measure(c, case, session, device, TIMING) for c in (TunedCandidate(work_dir), default)])
    assert tuned_run.impl == "tvm:tuned"
    assert tuned_run.status == "ok" and tuned_run.numerics_ok, tuned_run.note
    assert default_run.status == "ok", default_run.note
    # Same protocol for both; 10% slack for a shared machine's noise.
    assert tuned_run.median_ms <= default_run.median_ms * 1.1, (tuned_run.median_ms, default_run.median_ms)
    assert result.best_ms < default_run.median_ms


def test_untuned_layer_has_no_module_and_a_clear_error(device, case, tmp_path):
    assert tuning.best_prim_func(LAYER, device.target, tmp_path) is None
    assert not tuning.database_dir(tmp_path, device.target).exists()  # looking never creates a database
    result = device.run(lambda session: measure(TunedCandidate(tmp_path), case, session, device, TIMING))
    assert result.status == "failed"
    assert "no tuning record" in result.note


def test_target_slugs_are_distinct_and_file_safe():
    a = tuning.target_slug({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
    b = tuning.target_slug({"kind": "llvm", "mcpu": "znver5", "num-cores": 1})
    c = tuning.target_slug({"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf", "mattr": ["+neon"]})
    assert len({a, b, c}) == 3
    for slug in (a, b, c):
        assert "/" not in slug and " " not in slug and slug.startswith("llvm")


def test_larger_budget_resumes_from_the_database(tuned, device):
    # Runs last: it adds records the tests above must not see.
    work_dir, first = tuned
    more = tuning.tune_layer(LAYER, device, first.trials + 4, work_dir, progress=False)
    assert more.new_trials == 4 and more.trials == first.trials + 4
    assert more.best_ms <= first.best_ms
    assert all(1 <= trial <= more.trials for trial, _ in more.history)


def test_whole_model_budget_reaches_every_task_and_resumes(small_model, device, tmp_path):
    from workbench.tuning import TuningConfig, database_dir, open_database, records_of, tune_model, workload

    config = TuningConfig(trials_per_batch=4)
    layers = ["enc0_conv1", "enc0_conv2", "dec0_conv"]  # enc0_conv2 and dec0_conv share one shape
    first = tune_model(small_model, device, 12, tmp_path, layers=layers, progress=False, config=config)
    assert [r.layer for r in first] == ["enc0_conv1", "enc0_conv2", "dec0_conv"]
    database = open_database(tmp_path, device.target)
    counts = {name: len(records_of(database, workload(small_model.layer(name)))) for name in layers}
    assert counts["enc0_conv2"] == counts["dec0_conv"]  # one task, one set of records
    assert counts["enc0_conv1"] >= 4 and counts["enc0_conv2"] >= 4  # every task got a batch
    assert counts["enc0_conv1"] + counts["enc0_conv2"] == 12  # the budget, spent once
    assert all(r.best_ms is not None and r.best_ms > 0 for r in first)
    again = tune_model(small_model, device, 12, tmp_path, layers=layers, progress=False, config=config)
    assert all(r.new_trials == 0 for r in again)
    assert database_dir(tmp_path, device.target).exists()
