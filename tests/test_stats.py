"""Timing statistics and the noise-aware choice rule (synthetic records: they test the rule, not a
measured claim)."""

import json

import numpy as np
import pytest

from workbench.kernels.base import Candidate
from workbench import stats
from workbench.measure import ConvCase, Measurement, TimingConfig, annotate, measure
from workbench.plan import LayerPlan, choose_plan, tie_key

W4, W6 = "tvm:winograd_4", "tvm:winograd_6"


def _record(layer, impl, ms, ci=None, fusion="", prologue=(), epilogue=(), repeats=None):
    record = {"layer": layer, "impl": impl, "status": "ok", "numerics_ok": True, "median_ms": ms,
              "fusion": fusion, "prologue": list(prologue), "epilogue": list(epilogue)}
    if ci is not None:
        record["ci_ms"] = list(ci)
    if repeats is not None:
        record["repeats_ms"] = repeats
    return record


# ---------------------------------------------------------------- the interval

def test_median_interval_is_the_order_statistics_binomial_coverage_allows():
    median, lo, hi, coverage = stats.median_ci([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (median, lo, hi) == (3.0, 1.0, 5.0)  # 5 repeats: min..max, covering 1 - 2/32
    assert coverage == pytest.approx(1 - 2 / 2 ** 5)
    samples = list(range(1, 11))  # 10 repeats: x(2)..x(9) covers 97.9%, x(3)..x(8) only 89%
    median, lo, hi, coverage = stats.median_ci(samples[::-1])
    assert (median, lo, hi) == (5.5, 2, 9) and coverage >= stats.CONFIDENCE
    assert stats.median_ci([7.0]) == (7.0, 7.0, 7.0, 0.0)
    with pytest.raises(ValueError):
        stats.median_ci([])


def test_interval_of_old_and_new_records_and_the_overlap_test():
    assert stats.interval({"median_ms": 2.0, "ci_ms": [1.5, 2.5], "repeats_ms": [9, 9, 9]}) == (1.5, 2.5)
    assert stats.interval({"median_ms": 2.0, "repeats_ms": [2.0, 1.0, 3.0]}) == (1.0, 3.0)  # older record
    assert stats.interval({"median_ms": 2.0}) == (2.0, 2.0)  # oldest: a point
    assert stats.interval({"median_ms": None}) is None
    assert stats.overlap((1, 2), (2, 3)) and not stats.overlap((1, 2), (2.1, 3))
    assert not stats.overlap(None, (1, 2))
    assert stats.clearly_below((1, 1.9), (2, 3)) and not stats.clearly_below((1, 2.5), (2, 3))
    assert stats.sum_interval([(1, 2), (3, 4)]) == (4, 6)


def test_annotate_flags_a_wide_spread_and_a_loaded_device():
    quiet = Measurement("l", "i", "ok")
    annotate(quiet, [1.0, 1.01, 1.02, 1.0, 1.01], [(0.5, 2), (0.7, 2)])
    assert not quiet.disturbed and quiet.ci_ms == [1.0, 1.02] and quiet.load == [0.5, 0.7]
    noisy = Measurement("l", "i", "ok")
    annotate(noisy, [1.0, 1.5, 1.0, 2.0, 1.0], [None, None])
    assert noisy.disturbed and noisy.disturbed_by == ["spread"] and noisy.load is None
    loaded = Measurement("l", "i", "ok")
    annotate(loaded, [1.0, 1.01, 1.0], [(1.0, 2), (3.5, 2)])  # 3.5 on 2 cores: someone else runs
    assert loaded.disturbed_by == ["load"]


class _Running:
    def __init__(self, case, rounds):
        self.case, self.rounds, self.calls = case, rounds, 0

    def run_once(self):
        return self.case.reference

    def phases(self):
        return None

    def time(self, timing):
        self.calls += 1
        return self.rounds[min(self.calls, len(self.rounds)) - 1]


class _Candidate(Candidate):
    impl, tolerance, note, alias_of, config = "fake:kernel", 1e-3, "", None, ""

    def __init__(self, running):
        self.running = running

    def why_not_applicable(self, layer):
        return None

    def setup(self, session, case, device):
        return self.running


class _Session:
    def get_function(self, name):
        return lambda: json.dumps({"load1": 0.2, "cores": 2})


@pytest.mark.parametrize("rounds, calls, disturbed", [
    ([[1e-3, 1.001e-3, 1.002e-3]], 1, False),  # narrow at once: timed once
    # One outlier: 6 repeats still give min..max, 9 give x(2)..x(8), which leaves it out.
    ([[1e-3, 3e-3, 1e-3], [1e-3, 1.001e-3, 1e-3], [1e-3, 1e-3, 1e-3]], 3, False),
    ([[1e-3, 1e-3, 1.5e-3], [1e-3, 1.001e-3, 1e-3], [1e-3, 1e-3, 1e-3]], 3, False),
    ([[1e-3, 3e-3, 2e-3]] * 5, 3, True),  # stays wide: at most EXTRA_ROUNDS more, then disturbed
])
def test_a_wide_measurement_is_timed_again_a_bounded_number_of_times(small_model, rounds, calls, disturbed):
    case = ConvCase.from_model(small_model, small_model.convs[0])
    running = _Running(case, rounds)
    result = measure(_Candidate(running), case, _Session(), device=None, timing=TimingConfig.quick())
    assert result.status == "ok" and running.calls == calls and result.remeasured == calls - 1
    assert len(result.repeats_ms) == 3 * calls and result.disturbed is disturbed
    assert result.load == [0.2, 0.2]
    assert result.median_ms == pytest.approx(float(np.median(result.repeats_ms)))


# ---------------------------------------------------------------- the choice

def test_overlapping_intervals_tie_and_the_tie_break_decides(small_model):
    first, second, third = (c.name for c in small_model.convs[:3])
    records = [
        _record(first, W6, 1.00, (0.95, 1.20)), _record(first, W4, 1.05, (1.00, 1.25)),  # overlap: tie
        _record(second, W6, 1.00, (0.98, 1.02)), _record(second, W4, 1.20, (1.15, 1.25)),  # apart: W6 wins
        _record(third, "nnpack:wt8x8:compute", 1.0, (0.9, 1.1)),
        _record(third, "nnpack:wt8x8:precompute", 1.02, (0.95, 1.15)),
        _record(third, "tvm:default", 3.0, (2.9, 3.1)),  # apart from both: not part of the tie
    ]
    plan = choose_plan(small_model, records)
    assert plan.impl(first) == W4  # fewer transforms: F(4x4) before F(6x6)
    assert plan.impl(second) == W6
    assert plan.impl(third) == "nnpack:wt8x8:precompute"  # the kernel transformed once, ahead
    ties = [n for n in plan.notes if "tie (intervals overlap)" in n]
    assert len(ties) == 2
    assert any(n.startswith(f"{first}: {W4} and {W6} tie") and f"chose {W4}" in n for n in ties)
    assert not any(n.startswith(f"{second}:") for n in ties)
    # The same records in any order give the same plan.
    assert choose_plan(small_model, records[::-1]).layers == plan.layers


def _runoff_record(layer, impl, repeats, contenders):
    record = _record(layer, impl, float(np.median(repeats)), repeats=list(repeats))
    record["ci_ms"] = list(stats.median_ci(repeats)[1:3])
    return {**record, "runoff": True, "contenders": sorted(contenders)}


def test_a_runoff_is_compared_round_by_round_so_a_slow_spell_cannot_decide(small_model):
    layer = small_model.convs[0].name
    spell = [1.0, 1.0, 2.5, 2.5, 2.5, 1.0, 1.0, 1.0, 1.0]  # the machine slow for three rounds
    both = (W4, W6)
    faster = [_runoff_record(layer, W6, spell, both), _runoff_record(layer, W4, [t * 1.1 for t in spell], both)]
    assert stats.overlap(stats.interval(faster[0]), stats.interval(faster[1]))  # unpaired: they would tie
    assert stats.same_runoff(faster) and stats.slower_in_rounds(faster[1], faster[0])
    plan = choose_plan(small_model, faster)
    assert plan.impl(layer) == W6 and not any(n.startswith(f"{layer}:") for n in plan.notes)  # clear, by rounds
    wobble = [1.0, 0.97, 1.02, 1.03, 0.98, 1.01, 0.99, 1.04, 0.96]
    same = [_runoff_record(layer, W6, spell, both),
            _runoff_record(layer, W4, [t * w for t, w in zip(spell, wobble)], both)]
    assert not stats.slower_in_rounds(same[0], same[1]) and not stats.slower_in_rounds(same[1], same[0])
    plan = choose_plan(small_model, same)
    assert plan.impl(layer) == W4 and any(n.startswith(f"{layer}: {W4} and {W6} tie") for n in plan.notes)
    # The sweep's records of the same conv do not count once it has a runoff: there W4 looked far faster.
    sweep = [_record(layer, W4, 0.5, (0.49, 0.51)), _record(layer, W6, 1.0, (0.99, 1.01))]
    assert choose_plan(small_model, sweep + faster).impl(layer) == W6


def test_runoff_contenders_are_each_familys_fastest_then_the_kernels_within_reach():
    from workbench import runoff

    layer = "c"
    records = [_record(layer, W6, 1.0, (0.98, 1.02)), _record(layer, W6, 1.3, (1.2, 1.4)),
               _record(layer, W4, 1.9, (1.8, 2.0)), _record(layer, "tvm:winograd_2", 1.5, (1.4, 1.6)),
               _record(layer, "tvm:direct_nchw", 1.2, (1.1, 1.3)), _record(layer, "tvm:default", 4.5, (4.4, 4.6)),
               _record(layer, "nnpack:wt8x8:compute", 1.95, (1.9, 2.0)),
               _record(layer, "nnpack:ft16x16:compute", 1.7, (1.6, 1.8))]
    picked = runoff.contenders(records)
    # Each family's fastest (Winograd, direct, NNPACK; the untuned default is beyond reach), then the rest
    # within 2x, fastest first, five in all; an implementation's fastest record stands for it.
    assert [r["impl"] for r in picked] == [W6, "tvm:direct_nchw", "tvm:winograd_2", "nnpack:ft16x16:compute", W4]
    assert picked[0]["median_ms"] == 1.0
    # A slow spell over all of one library's kernels in the sweep: its fastest still gets a rematch.
    spell = [_record(layer, "nnpack:ft16x16:precompute", 0.59), _record(layer, W6, 1.5), _record(layer, W4, 1.8)]
    assert [r["impl"] for r in runoff.contenders(spell)] == ["nnpack:ft16x16:precompute", W6]
    assert runoff.contenders([_record(layer, W6, 1.0), _record(layer, W4, 2.5)]) == []  # one family, beyond reach


def test_a_chain_of_overlaps_never_lets_a_clearly_slower_kernel_win(small_model):
    # A overlaps B, B overlaps C, C lies wholly above A: whichever of A or B noise makes the
    # fastest, C (fewest transforms) is clearly beaten and must not win the tie-break.
    layer = small_model.convs[0].name
    direct = "tvm:direct_nchw"
    for a_median, b_median in ((1.05, 1.10), (1.12, 1.10)):
        records = [_record(layer, W6, a_median, (1.00, 1.10)), _record(layer, W4, b_median, (1.08, 1.20)),
                   _record(layer, direct, 1.20, (1.15, 1.30))]
        assert choose_plan(small_model, records).impl(layer) == W4  # A and B tie; F(4x4) has fewer transforms


def test_the_tie_break_order_is_fewer_transforms_then_the_id():
    order = sorted(["nnpack:ft16x16:compute", "tvm:winograd_6", "nnpack:wt8x8:compute", "tvm:winograd_2",
                    "nnpack:ft8x8:precompute", "tvm:direct_nchwc", "tvm:default", "nnpack:wt8x8:precompute"],
                   key=lambda impl: tie_key({"impl": impl}))
    # Among F(6x6): a kernel transformed per call (compute) after those that are not.
    assert order == ["tvm:default", "tvm:direct_nchwc", "tvm:winograd_2", "nnpack:wt8x8:precompute",
                     "tvm:winograd_6", "nnpack:wt8x8:compute", "nnpack:ft8x8:precompute", "nnpack:ft16x16:compute"]


def test_records_without_intervals_choose_as_before(small_model):
    first = small_model.convs[0].name
    plan = choose_plan(small_model, [_record(first, W6, 1.0), _record(first, W4, 1.01)])
    assert plan.impl(first) == W6 and not any("tie" in n for n in plan.notes)  # points: no overlap
    old = [_record(first, W6, 1.0, repeats=[0.9, 1.0, 1.1]), _record(first, W4, 1.05, repeats=[1.0, 1.05, 1.2])]
    plan = choose_plan(small_model, old)
    assert plan.impl(first) == W4 and any("tie" in n for n in plan.notes)  # intervals from the repeats


def test_a_fold_within_noise_keeps_the_2018_way(small_model):
    isolated = [_record(c.name, "tvm:direct_nchw", 1.0, (0.99, 1.01)) for c in small_model.convs]
    isolated += [_record("enc1_conv1", "tvm:direct_nchwc", 1.2, (1.19, 1.21))]
    separate = [_record("enc1_pool_relu", "tvm:maxpool_relu", 0.3, (0.29, 0.31), fusion="maxpool+relu")]
    fold = ("enc1_conv1", "tvm:direct_nchwc")
    chain = ("maxpool+relu > conv > relu", ("maxpool", "relu"), ("relu",))
    # Median 1.2 against 1.3 apart, but the fold's interval reaches into the separate sum's: a tie.
    tied = choose_plan(small_model, isolated + separate + [_record(*fold, 1.2, (1.1, 1.35), *chain)])
    assert tied.layers["enc1_conv1"] == LayerPlan("enc1_conv1", "tvm:direct_nchw", ("relu",))
    assert any(n.startswith("enc1_conv1: folding") and "tie" in n for n in tied.notes)
    clear = choose_plan(small_model, isolated + separate + [_record(*fold, 1.2, (1.18, 1.22), *chain)])
    assert clear.layers["enc1_conv1"].prologue == ("maxpool", "relu")


def test_the_report_flags_disturbed_measurements_and_lists_ties(small_model, tmp_path):
    from workbench import study
    from workbench.report import write_report

    first = small_model.convs[0].name
    records = [_record(first, W6, 1.0, (0.9, 1.3)), _record(first, W4, 1.1, (1.0, 1.2))]
    records[0].update(disturbed=True, disturbed_by=["load"], remeasured=2)
    end_to_end = [{"name": "hybrid", "median_ms": 4.1, "ci_ms": [4.0, 4.3], "min_ms": 4.0, "numerics_ok": True,
                   "max_abs_err": 0.0, "note": "", "disturbed": False}]
    assert study._disturbed_warning(records[1:], end_to_end) == []
    warning = study._disturbed_warning(records, end_to_end)[0]
    assert warning.startswith("WARNING") and "load" in warning and "1 of 2 per-layer" in warning
    plan = choose_plan(small_model, records)
    section = study._noise_section(records, end_to_end, plan)
    text = " ".join(p for p in section.parts if isinstance(p, str))
    assert "1 of " in text and f"{first}: {W4} and {W6} tie" in text and "1 disturbed" in text
    page = write_report(tmp_path / "r.html", "t", [section, study.Section("s", [warning])]).read_text()
    assert "class='warning'" in page and "4.1 ms [4, 4.3]" in study._with_interval(end_to_end, "hybrid")


def test_the_study_command_is_recorded_without_the_device_key():
    from workbench import bundle, study

    argv = ["/x/workbench/__main__.py", "study", "--quick", "--tracker", "h:9190", "--key", "s3cret", "--json"]
    shown = study._command(argv)
    assert "s3cret" not in shown and shown[shown.index("--key") + 1] == study.KEY_PLACEHOLDER
    assert study._command(["/x/ipykernel_launcher.py"]) is None
    script = bundle.reproduce_script({"command": shown}, bundle.Path("/w"), bundle.Path("/b"))
    assert '--key "${WORKBENCH_RPC_KEY:?' in script and "--quick --tracker h:9190" in script and "--json" not in script
