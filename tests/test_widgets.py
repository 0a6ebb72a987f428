"""The composer and plan editor widgets, driven headless as a user would (controls, then buttons)."""

import pytest

from workbench import composer
from workbench.measure import TimingConfig
from workbench.plan import Plan

pytest.importorskip("anywidget", reason="plotly's FigureWidget needs anywidget (requirements.lock)")

from workbench import widgets  # noqa: E402

TIMING = TimingConfig(number=1, repeat=2, min_repeat_ms=1)


def _classes(widget):
    return set(widget._dom_classes)


def test_composer_widget_applies_variants_and_keeps_working_after_an_error(small_model, device):
    plan = Plan.uniform(small_model)
    ui = widgets.ComposerWidget(composer.Composer(small_model, device, TIMING), block="enc0_conv1", plan=plan)
    assert "wb-composer" in _classes(ui) and "wb-block" in _classes(ui.block)
    assert {"wb-fuse", "wb-fuse-relu"} <= _classes(ui.toggles["relu"]) and ui.toggles["relu"].value
    assert {"wb-knob", "wb-knob-ow_bn"} <= _classes(ui.knobs["ow_bn"]) and ui.knobs["ow_bn"].continuous_update is False
    assert "wb-knob-epilogue" in _classes(ui.knobs["epilogue"])
    for pane, name in ((ui.code, "wb-code"), (ui.diff, "wb-diff"), (ui.trace, "wb-trace"), (ui.time, "wb-time"),
                       (ui.chart, "wb-chart"), (ui.apply, "wb-apply"), (ui.use, "wb-use"), (ui.status, "wb-status")):
        assert name in _classes(pane)

    ui.impl.value = "direct_nchw"
    ui.apply.click()
    assert " ms ✓ numerics ok" in ui.time.value and "epilogue=tile" in ui.time.value, ui.status.value
    assert "<span" in ui.code.value and "first variant" in ui.diff.value and ui.trace.value
    ui.knobs["epilogue"].value = "separate"
    ui.apply.click()
    assert "epilogue=separate" in ui.time.value and "<span" in ui.diff.value
    assert len(ui.chart.data[0].x) == 2  # both variants on the live chart, numerics ok

    ui.knobs["vec"].value, ui.knobs["ow_bn"].value = 16, 24  # a tile 16 lanes do not divide takes vec down
    assert ui.knobs["vec"].value == 8
    ui.knobs["ow_bn"].value, ui.knobs["vec"].value = 3, 16  # 16 lanes do not divide a 3-pixel tile
    ui.apply.click()
    assert ui.status.value.startswith("error: knob vec=16") and "\n" not in ui.status.value
    ui.knobs["ow_bn"].value, ui.knobs["vec"].value = 8, 8  # still alive after the error
    ui.apply.click()
    assert "ow_bn=8" in ui.time.value and len(ui.chart.data[0].x) == 3

    ui.use.click()
    entry = plan.layers["enc0_conv1"]
    assert (entry.impl, entry.fuse, entry.knobs["ow_bn"]) == ("tvm:direct_nchw", ("relu",), 8), ui.status.value
    assert ui.status.value.startswith("plan: enc0_conv1")

    ui.block.value = "dec1_reduce"  # another block: its own toggles, an empty chart
    assert set(ui.toggles) == {"resize-add-relu"} and "wb-fuse-resize-add-relu" in _classes(ui.toggles["resize-add-relu"])
    assert len(ui.chart.data[0].x) == 0 and ui.time.value == "not measured yet"
    ui.block.value = "enc0_conv1"  # back: the controls show the last variant tried there
    assert ui.knobs["ow_bn"].value == 8 and ui.knobs["epilogue"].value == "separate" and "ow_bn=8" in ui.time.value
    ui._clicked(0, type("Points", (), {"point_inds": [0]})())  # a click on the chart's first point
    assert ui.knobs["ow_bn"].value != 8 and ui.knobs["epilogue"].value == "tile" and ui.status.value.startswith("loaded")
    ui.apply.click()
    assert ui.status.value.endswith("(recalled: measured before)") and len(ui.chart.data[0].x) == 4
    ui.block.value = "enc1_conv1"
    pool = ui.toggles["pool-relu"]
    assert "wb-fuse-pool-relu" in _classes(pool) and not pool.disabled and pool.value


def test_plan_editor_lists_measured_impls_and_legal_fusions(small_model):
    records = [{"layer": "enc0_conv1", "impl": "tvm:direct_nchw", "status": "ok", "numerics_ok": True, "median_ms": 0.5},
               {"layer": "enc0_conv1", "impl": "tvm:default", "status": "ok", "numerics_ok": True, "median_ms": 0.25},
               {"layer": "enc0_conv1", "impl": "tvm:winograd_2", "status": "wrong", "numerics_ok": False,
                "median_ms": 0.01},
               {"layer": "enc0_conv1", "impl": "tvm:default", "status": "ok", "numerics_ok": True, "median_ms": 0.1,
                "fusion": "conv > relu"}]  # a fused block's time is not the conv's own
    plan = Plan.uniform(small_model)
    editor = widgets.PlanEditor(small_model, plan, records)
    assert "wb-plan-editor" in _classes(editor)
    labels = [label for label, _ in editor.impls["enc0_conv1"].options]
    assert labels[0] == "tvm:default · 0.250 ms" and labels[1] == "tvm:direct_nchw · 0.500 ms"
    assert "tvm:winograd_2 · not measured" in labels  # a wrong record gives no time
    assert editor.plan.to_dict() == plan.to_dict()

    decoder = editor.toggles["dec1_reduce"]["resize-add-relu"]
    assert decoder.value and not decoder.disabled
    nnpack = next(v for _, v in editor.impls["dec1_reduce"].options if v.startswith("nnpack:"))
    editor.set("dec1_reduce", nnpack)
    assert decoder.disabled and not decoder.value  # NNPACK cannot compute resize+add
    assert editor.plan.layers["dec1_reduce"].fuse == ()

    pool = editor.toggles["enc1_conv1"]["pool-relu"]
    assert not pool.disabled  # tvm:default computes the pool in its input stage
    pool.value = True
    assert editor.plan.layers["enc1_conv1"].prologue == ("maxpool", "relu")
    editor.set("enc1_conv1", next(v for _, v in editor.impls["enc1_conv1"].options if v.startswith("nnpack:")))
    assert pool.disabled and editor.plan.layers["enc1_conv1"].prologue == ()

    edited = editor.plan_with("enc0_conv1", "tvm:direct_nchw", toggles=())
    assert edited.layers["enc0_conv1"].fuse == () and editor.plan.layers["enc0_conv1"].fuse == ("relu",)
    editor.retime_button.click()  # no runner: one clear line, not a dead button
    assert editor.status.value.startswith("error: nothing to re-time")


def test_plan_editor_keeps_a_convs_knobs_while_its_implementation_stays(small_model):
    plan = Plan.uniform(small_model, overrides={"head_conv": "tvm:direct_nchw"})
    variant = composer.make_variant(small_model, "head_conv", "direct_nchw", (), ow_bn=8, vec=8)
    composer.use_in_plan(plan, small_model, variant)
    editor = widgets.PlanEditor(small_model, plan)
    assert editor.plan.layers["head_conv"].knobs["ow_bn"] == 8
    editor.set("head_conv", "tvm:default")
    assert editor.plan.layers["head_conv"].knobs == {}  # another implementation: its own defaults


def test_plan_editor_rebuilds_and_retimes_the_edited_plan(small_model, device, tmp_path):
    from workbench.model import sample_input
    from workbench.records import WorkDir
    from workbench.study import StudyConfig

    threads = int(device.target["num-cores"])
    runner = widgets.HybridRunner(small_model, device, WorkDir.at(tmp_path), StudyConfig.quick_run(), threads,
                                  sample_input(small_model))
    editor = widgets.PlanEditor(small_model, Plan.uniform(small_model), runner=runner)
    editor.set("dec1_reduce", "tvm:default", toggles=())  # the resize+add+relu back as ops of their own
    editor.rebuild_button.click()
    assert editor.result.value.startswith("hybrid over RPC: ") and "✓ numerics ok" in editor.result.value, \
        editor.status.value
    assert editor.status.value == "rebuilt" and runner.executable is not None
    editor.retime_button.click()
    assert editor.status.value == "re-timed" and "✓ numerics ok" in editor.result.value
