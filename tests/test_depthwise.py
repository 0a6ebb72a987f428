"""Grouped, depthwise, strided and 1x1 convs: the depthwise hand schedule, and every candidate's rule,
through the protocol over a real local RPC cluster (the sweep says "not applicable", never crashes)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench import schedules as S
from workbench.compare import compare
from workbench.fusion import Fusion
from workbench.kernels.registry import all_candidates
from workbench.measure import TimingConfig
from workbench.model import Model, conv_layer, random_params

QUICK = TimingConfig(number=1, repeat=2, min_repeat_ms=1)


def _depthwise(name, channels, size, stride, kernel=3, multiplier=1, fusion=None):
    return S.ConvLayer.square(name, channels, channels * multiplier, size, size, kernel, stride, kernel // 2,
                              fusion=fusion, groups=channels)


def _error(layer: S.ConvLayer, knobs=None) -> float:
    rng = np.random.default_rng(2)
    x = rng.standard_normal(layer.input_shape, dtype=np.float32)
    w = rng.standard_normal(layer.geometry.weight_shape, dtype=np.float32)
    b = rng.standard_normal(layer.out_channels, dtype=np.float32)
    f = layer.fusion
    skip = rng.standard_normal(layer.output_shape, dtype=np.float32) if f.add else None
    built = S.build(S.DEPTHWISE, layer, knobs)
    out = built.run(x, built.prepare(w, b), skip)
    t = torch.from_numpy(x).double()
    if f.pool:
        t = F.max_pool2d(t, f.pool)
        t = torch.relu(t) if f.pool_relu else t
    t = F.conv2d(t, torch.from_numpy(w).double(), torch.from_numpy(b).double(), stride=layer.stride,
                 padding=layer.pad, groups=layer.geometry.groups)
    t = F.interpolate(t, scale_factor=f.scale, mode="nearest") if f.scale > 1 else t
    t = t + torch.from_numpy(skip).double() if f.add else t
    ref = (torch.relu(t) if f.relu else t).numpy()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------- the depthwise schedule, in process

LAYERS = [_depthwise("s1", 16, 14, 1), _depthwise("s2", 24, 13, 2), _depthwise("odd", 8, 7, 1),
          _depthwise("k5", 16, 12, 1, kernel=5), _depthwise("mult2", 8, 12, 2, multiplier=2)]
VARIANTS = [dict(layout="nchw", oc_bn=4, ow_bn=4, vec=4, pad="inline", parallel="oc"),
            dict(layout="nchw", oc_bn=1, ow_bn=8, vec=8, pad="compute_at", parallel="oc", epilogue="row"),  # past the row
            dict(layout="nchwc", oc_bn=8, vec=8, ow_bn=8, pad="inline", parallel="fused", epilogue="separate"),
            dict(layout="nchwc", oc_bn=8, vec=8, ow_bn=1, pad="compute_at", parallel="fused", epilogue="row"),
            dict(layout="nchwc", oc_bn=8, vec=4, ow_bn=1, pad="separate", parallel="oh", epilogue="separate",
                 unroll_kw=False),
            dict(layout="nchw", oc_bn=8, ow_bn=1, vec=1, pad="compute_at", parallel="none", epilogue="oc")]


@pytest.mark.parametrize("layer", LAYERS, ids=[l.name for l in LAYERS])
def test_default_knobs_match_torch(layer):
    S.validate_knobs(S.DEPTHWISE, layer, S.default_knobs(S.DEPTHWISE, layer))
    assert _error(layer) < 1e-5


@pytest.mark.parametrize("changes", VARIANTS, ids=[f"{c['layout']}-{c['ow_bn']}-{c['pad']}-{c['parallel']}"
                                                   for c in VARIANTS])
def test_knob_variants_match_torch(changes):
    layer = LAYERS[1]  # stride 2, odd input and output (7): the strided reads, the edges, tiles past the row
    assert _error(layer, dataclasses.replace(S.default_knobs(S.DEPTHWISE, layer), **changes)) < 1e-5


def test_fused_pool_before_and_resize_add_relu_after():
    fusion = Fusion(pool=2, pool_relu=True, pool_in=(24, 24), scale=2, add=True, relu=True)
    assert _error(_depthwise("fused", 16, 12, 1, fusion=fusion)) < 1e-5


def test_knobs_that_do_not_fit_are_refused_before_building():
    layer = LAYERS[0]  # 16 channels, 14 wide
    base = S.default_knobs(S.DEPTHWISE, layer)
    for changes, knob in [(dict(oc_bn=3), "oc_bn"), (dict(ow_bn=5), "ow_bn"), (dict(layout="nhwc"), "layout"),
                          (dict(layout="nchw", ow_bn=7, vec=2), "vec"), (dict(layout="nchwc", oc_bn=8, vec=16), "vec"),
                          (dict(pad="later"), "pad"), (dict(layout="nchwc", oc_bn=16, vec=1, ow_bn=14), "ow_bn")]:
        with pytest.raises(S.KnobError, match=knob):
            S.validate_knobs(S.DEPTHWISE, layer, dataclasses.replace(base, **changes))
    space = S.knob_space(S.DEPTHWISE, layer)
    assert set(space) == {f.name for f in dataclasses.fields(S.knobs_class(S.DEPTHWISE))}
    # a tile divides the row, or is a power of two no wider than the row rounded up (16 on 14)
    assert space["ow_bn"] == (1, 2, 4, 7, 8, 14, 16)


@pytest.mark.parametrize("channels,size,stride", [(32, 112, 1), (96, 112, 2), (144, 56, 1), (192, 28, 1),
                                                  (576, 14, 2), (960, 7, 1)])
def test_defaults_for_mobilenet_v2_lie_in_the_declared_space(channels, size, stride):
    from workbench.knob_tuning import KnobSpace

    layer = conv_layer("dw", "input", (1, channels, size, size), channels, 3, stride, 1, groups=channels)
    space = KnobSpace(layer, threads=2)
    default = space.default(S.DEPTHWISE)
    assert space.schedules == [S.DEPTHWISE] and space.valid(default)
    assert all(value in space.ranges[S.DEPTHWISE][knob] for knob, value in default.knobs)


def test_rules_send_each_conv_to_the_schedules_that_compute_it():
    dense = S.ConvLayer.square("dense", 16, 16, 14, 14)
    grouped = S.ConvLayer.square("g2", 16, 16, 14, 14, groups=2)
    assert "depthwise convs only" in S.applicable(S.DEPTHWISE, dense)
    assert "depthwise convs only" in S.applicable(S.DEPTHWISE, grouped)
    for impl in S.IMPLEMENTATIONS:
        assert "needs tvm:depthwise" in S.applicable(impl, LAYERS[0])
        assert (S.applicable(impl, grouped) is None) == (impl == "direct_nchw")  # it reads each group's inputs
    assert S.applicable("direct_nchwc", S.ConvLayer.square("s2", 16, 16, 14, 14, stride=2)) is None
    assert "stride" in S.applicable("winograd_4", S.ConvLayer.square("s2", 16, 16, 14, 14, stride=2))


# ---------------------------------------------------------------- every candidate, through the protocol


def _mobile_model() -> Model:
    """The new networks' conv kinds, small: depthwise s1 and s2, groups=2, strided 3x3, 1x1."""
    layers = [conv_layer("dw_s1", "input", (1, 16, 20, 20), 16, 3, 1, 1, groups=16),
              conv_layer("dw_s2", "dw_s1", (1, 16, 20, 20), 16, 3, 2, 1, groups=16),
              conv_layer("grouped", "dw_s2", (1, 16, 10, 10), 16, 3, 1, 1, groups=2),
              conv_layer("strided", "grouped", (1, 16, 10, 10), 24, 3, 2, 1),
              conv_layer("pointwise", "strided", (1, 24, 5, 5), 32, 1, 1, 0)]
    return Model("mobile-kinds", layers, random_params(layers, seed=4), (1, 16, 20, 20))


@pytest.fixture(scope="module")
def sweep(device, tmp_path_factory):
    # As the command line builds them: a work dir with nothing tuned, the device's target.
    candidates = all_candidates(2, tmp_path_factory.mktemp("tuning"), [], target=device.target)
    return compare(_mobile_model(), device, timing=QUICK, candidates=candidates, progress=False)


def test_every_candidate_is_measured_correct_or_not_applicable(sweep):
    assert len(sweep) == 5 * len(all_candidates(2))
    for r in sweep:
        assert r["status"] in ("ok", "not_applicable"), r
        if r["status"] == "ok":
            assert r["numerics_ok"] and r["median_ms"] > 0, r
        else:
            assert len(r["note"]) > 20 and r["note"][0].isalpha(), r  # a reason sentence


def test_nnpack_follows_its_rules(sweep):
    ok = {(r["layer"], r["impl"]) for r in sweep if r["status"] == "ok"}
    nnpack = [r for r in sweep if r["impl"].startswith("nnpack:")]
    for r in nnpack:
        if r["layer"] in ("dw_s1", "dw_s2", "grouped"):
            assert r["status"] == "not_applicable" and "no grouped convolution" in r["note"], r
    strided = {r["impl"] for r in nnpack if r["layer"] == "strided" and r["status"] == "ok"}
    assert strided == {f"nnpack:{a}:{s}" for a in ("auto", "implicit_gemm") for s in ("compute", "precompute")}
    assert {("pointwise", "nnpack:direct:compute"), ("pointwise", "nnpack:implicit_gemm:compute"),
            ("pointwise", "nnpack:ft8x8:compute")} <= ok


def test_tvm_candidates_follow_theirs(sweep):
    by = {(r["layer"], r["impl"]): r for r in sweep}
    for layer in ("dw_s1", "dw_s2", "grouped", "strided", "pointwise"):
        assert by[(layer, "tvm:default")]["status"] == "ok"
    for layer in ("dw_s1", "dw_s2"):
        assert by[(layer, "tvm:depthwise")]["status"] == "ok"
    for layer in ("grouped", "strided", "pointwise"):
        assert "depthwise convs only" in by[(layer, "tvm:depthwise")]["note"]
    for layer in ("strided", "pointwise"):  # the dense direct schedules compute stride and 1x1
        assert by[(layer, "tvm:direct_nchw")]["status"] == by[(layer, "tvm:direct_nchwc")]["status"] == "ok"
    assert "stride" in by[("strided", "tvm:winograd_4")]["note"]
    assert "groups" in by[("grouped", "tvm:direct_nchwc")]["note"]
    assert by[("grouped", "tvm:direct_nchw")]["status"] == "ok"
    assert "no knob-tuning trial" in by[("dw_s1", "tvm:hand_tuned")]["note"]
    assert by[("dw_s1", "tvm:tuned")]["status"] == "not_applicable"


def test_the_knob_tuner_searches_depthwise_and_grouped_convs(device, tmp_path):
    from workbench import knob_tuning
    from workbench.kernels.hand_tuned import HandTunedCandidate
    from workbench.knob_tuning import KnobSpace, KnobTuningConfig

    model = _mobile_model()
    spaces = {layer.name: KnobSpace(layer, threads=2) for layer in model.convs}
    assert spaces["dw_s2"].schedules == ["depthwise"] and not spaces["dw_s2"].nnpack
    assert spaces["grouped"].schedules == ["direct_nchw"] and not spaces["grouped"].nnpack
    assert {p.impl for p in spaces["strided"].nnpack} == {"nnpack:implicit_gemm:compute",
                                                          "nnpack:implicit_gemm:precompute"}
    points = spaces["dw_s1"].sample(np.random.default_rng(0), 40)
    assert {dict(p.knobs)["layout"] for p in points} == {"nchw", "nchwc"} and all(map(spaces["dw_s1"].valid, points))
    layers = ["dw_s1", "dw_s2", "grouped"]
    results = knob_tuning.tune_knobs(model, device, 6, tmp_path, layers=layers, progress=False,
                                     config=KnobTuningConfig(batch=3, samples=30))
    by = {r.layer: r for r in results}
    assert by["grouped"].best["impl"] == "tvm:direct_nchw" and by["dw_s1"].best["impl"] == "tvm:depthwise"
    records = compare(model, device, layers, candidates=[HandTunedCandidate(tmp_path, device.target)],
                      timing=QUICK, progress=False)
    status = {r["layer"]: r for r in records}
    assert all(status[name]["status"] == "ok" and status[name]["numerics_ok"] for name in layers)


def test_the_layer_table_counts_the_grouped_weight():
    from workbench import intensity

    rows = intensity.layer_table(_mobile_model()).set_index("name")
    # depthwise 16 ch, 20x20, 3x3: 2 * 16 * 9 * 400 FLOPs; input, output, 16x1x3x3 weight and bias, once each
    assert rows.loc["dw_s1", "flops"] == 2 * 16 * 9 * 400
    assert rows.loc["dw_s1", "bytes"] == 4 * (16 * 400 + 16 * 400 + 16 * 9 + 16)
    assert rows.loc["grouped", "bytes"] == 4 * (16 * 100 + 16 * 100 + 16 * 8 * 9 + 16)


def test_a_candidate_called_anyway_on_a_conv_it_refuses_raises_a_workbench_error(device, tmp_path):
    from workbench.errors import WorkbenchError
    from workbench.measure import ConvCase

    model = _mobile_model()
    candidates = all_candidates(2, tmp_path, [], target=device.target)
    refused = 0
    for layer in model.convs:
        case = ConvCase.from_model(model, layer)
        for candidate in candidates:
            if candidate.why_not_applicable(layer) is None:
                continue
            refused += 1
            with pytest.raises(WorkbenchError):  # before any session is used (it is None here)
                candidate.setup(None, case, device)
    assert refused > 40


def test_the_composer_offers_the_depthwise_schedule_and_direct_nchw_for_grouped_convs():
    from workbench import composer

    model = _mobile_model()
    variant = composer.make_variant(model, "dw_s2")
    assert variant.impl == S.DEPTHWISE and composer.knob_choices(variant.impl, model.layer("dw_s2"))["layout"]
    assert composer.applicable_impls(model.layer("grouped")) == ["direct_nchw"]
    assert composer.make_variant(model, "grouped").impl == "direct_nchw"
