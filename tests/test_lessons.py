"""The lessons' rules say "does not hold" when the results contradict them (synthetic results test the
rule; the notebooks' tests assert the measured lessons)."""

import json

import pandas as pd

from workbench import lessons
from workbench.plan import LayerPlan, Plan


def _row(name, ms, lo, hi, note=""):
    return {"name": name, "median_ms": ms, "ci_ms": [lo, hi], "numerics_ok": True, "note": note}


def test_the_hybrid_lessons_fail_when_a_peer_is_clearly_faster_or_an_edge_goes_to_nnpack():
    plan = Plan("m", {"first": LayerPlan("first", "tvm:direct_nchwc"), "mid": LayerPlan("mid", "nnpack:wt8x8:compute")})
    fine = [_row("hybrid", 1.0, 0.9, 1.2), _row("onnxruntime", 1.1, 1.0, 1.3), _row("tvm_untuned", 9, 8, 10),
            _row("tvm_only", 1.0, 0.9, 1.2, "the same executable as hybrid")]
    assert all(lesson.holds for lesson in lessons.hybrid_lessons(fine, plan, ["first"]))
    slow = [_row("hybrid", 2.0, 1.9, 2.2), *fine[1:]]
    assert not lessons.hybrid_lessons(slow, plan, ["first"])[0].holds
    assert "onnxruntime" in lessons.hybrid_lessons(slow, plan, ["first"])[0].evidence
    assert not lessons.hybrid_lessons(fine, plan, ["first", "mid"])[3].holds


def test_a_disturbed_end_to_end_measurement_is_shown_but_not_asserted():
    plan = Plan("m", {"first": LayerPlan("first", "tvm:direct_nchwc")})
    untuned = _row("tvm_untuned", 1.57, 1.571, 1.575)
    wide = {**_row("hybrid", 1.45, 1.38, 1.62), "disturbed": True, "disturbed_by": ["spread"]}
    pays = lessons.hybrid_lessons([wide, untuned], plan, ["first"])[2]
    assert not pays.holds and not pays.asserted and "disturbed" in pays.evidence
    steady = lessons.hybrid_lessons([_row("hybrid", 1.45, 1.44, 1.46), untuned], plan, ["first"])[2]
    assert steady.holds and steady.asserted
    # Under a millisecond, one build's second of timing decides nothing: shown, not asserted.
    tiny = lessons.hybrid_lessons([_row("hybrid", 0.45, 0.44, 0.46), _row("tvm_untuned", 0.57, 0.571, 0.575)],
                                  plan, ["first"])[2]
    assert tiny.holds and not tiny.asserted


def test_layer_lessons_fail_for_a_network_densest_at_its_edge():
    table = pd.DataFrame({"name": ["a", "b", "c", "d"], "op": ["conv"] * 4, "intensity": [30.0, 10, 12, 5]})
    found = lessons.layer_lessons(table, ["a", "d"], ridge=8.0)
    assert [lesson.holds for lesson in found] == [False, False, True]


def test_lessons_travel_through_a_notebook_output(tmp_path):
    shown = [lessons.Lesson("a claim", True, "evidence", asserted=False)]
    notebook = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "display_data", "data": {lessons.MIME: [vars(lesson) for lesson in shown]}}]}]}
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(notebook))
    assert lessons.from_notebook(path) == [{"claim": "a claim", "holds": True, "evidence": "evidence",
                                            "asserted": False}]
