"""Fused kernels: convs computing a pool before and resize+add+ReLU after them, and the study's
fused elementwise kernels; every result checked against PyTorch in float64."""

import dataclasses

import numpy as np
import pytest
import tvm
from tvm import relax

from workbench import schedules as S
from workbench.compare import measure_one
from workbench.fusion import ConvGroup, Fusion, fusible_chain, fused_layers, prologue_chain, prologue_layers
from workbench.kernels.default import DefaultCandidate, default_conv_func
from workbench.kernels.fused import (ElementwiseKernel, ElementwiseKnobs, GroupCase, GroupError, elementwise_groups,
                                     elementwise_kernel, group_inputs)
from workbench.kernels.hand import HandSchedule
from workbench.kernels.tvm_kernel import FactoryCandidate
from workbench.measure import ConvCase, TimingConfig, check_numerics, measure, reference_conv
from workbench.schedules import ConvLayer, ScheduleError

TARGET = {"kind": "llvm", "num-cores": 2}
FUSIONS = {
    "relu": Fusion(relu=True),
    "pool": Fusion(pool=2, pool_relu=True, pool_in=(24, 24), relu=True),
    "resize_add_relu": Fusion(scale=2, add=True, relu=True),
    # An odd pre-pool size: 25x25 pools to 12x12 (the last row and column are dropped).
    "both": Fusion(pool=2, pool_relu=True, pool_in=(25, 25), scale=2, add=True, relu=True),
}
# (epilogue, pad, parallel) covering every value of both placement knobs; the output-channel
# placement under parallel="oc", where it is its own loop (fused, it is the row's).
PLACEMENTS = {
    "direct": [("tile", "separate", "fused"), ("row", "compute_at", "fused"), ("separate", "inline", "fused"),
               ("oc", "separate", "oc")],
    "winograd": [("fused", "separate", "fused"), ("separate", "inline", "fused")],
}
TOLERANCE = {"direct_nchw": 1e-5, "direct_nchwc": 1e-5, "winograd_2": 1e-5, "winograd_4": 1e-4, "winograd_6": 1e-3}
# Winograd refuses an inlined pool (see test_winograd_keeps_a_pool_in_a_separate_stage).
CASES = [(impl, fusion, *placement) for impl in S.IMPLEMENTATIONS for fusion in FUSIONS
         for placement in PLACEMENTS[impl.split("_")[0]]
         if not (impl.startswith("winograd") and FUSIONS[fusion].pool and placement[1] == "inline")]


def _layer(fusion: Fusion) -> ConvLayer:
    return ConvLayer.square("fused", 16, 32, 12, 12, fusion=fusion)


def _inputs(layer: ConvLayer):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(layer.input_shape, dtype=np.float32)
    w = rng.standard_normal((layer.out_channels, layer.in_channels, 3, 3), dtype=np.float32)
    b = rng.standard_normal(layer.out_channels, dtype=np.float32)
    skip = rng.standard_normal(layer.output_shape, dtype=np.float32) if layer.fusion.add else None
    return x, w, b, skip


@pytest.mark.parametrize("impl,fusion,epilogue,pad,parallel", CASES, ids=["-".join(c) for c in CASES])
def test_hand_schedules_compute_the_fused_chain(impl, fusion, epilogue, pad, parallel):
    layer = _layer(FUSIONS[fusion])
    knobs = dataclasses.replace(S.default_knobs(impl, layer), epilogue=epilogue, pad=pad, parallel=parallel)
    x, w, b, skip = _inputs(layer)
    built = S.build(impl, layer, knobs, target=TARGET)
    out = built.run(x, built.prepare(w, b), skip)
    ref = reference_conv(_model_layer(layer), x, w, b, layer.fusion, skip)
    assert out.shape == layer.output_shape
    ok, _, rel = check_numerics(out, ref.astype(np.float64), TOLERANCE[impl])
    assert ok, rel


def _model_layer(layer: ConvLayer):
    """reference_conv reads only stride, pad and groups from the layer."""
    return type("L", (), {"stride": layer.stride, "pad": layer.pad, "groups": 1})()


def test_arguments_follow_data_weight_bias_skip_output():
    layer = _layer(FUSIONS["both"])
    specs = [shape for shape, _ in S.arg_specs("direct_nchwc", layer)]
    assert specs[0] == (1, 16, 25, 25)  # the pre-pool tensor
    assert specs[2] == (32,)
    assert specs[3] == specs[4] == (1, 32, 24, 24)  # skip, output: upsampled
    func = S.conv_prim_func("direct_nchwc", layer)
    assert [p.name for p in func.params] == ["data", "weight", "bias", "skip", "output"]
    assert len(S.arg_specs("direct_nchw", _layer(FUSIONS["pool"]))) == 4  # no skip without an add


def test_winograd_keeps_a_pool_in_a_separate_stage():
    layer = ConvLayer.square("unpadded", 16, 32, 12, 12, pad=0, fusion=Fusion(pool=2, pool_in=(24, 24)))
    assert S.default_knobs("winograd_2", layer).pad == "separate"
    assert S.default_knobs("direct_nchw", layer).pad == "inline"
    knobs = dataclasses.replace(S.default_knobs("winograd_4", layer), pad="inline")
    with pytest.raises(S.KnobError, match="knob pad='inline'.*valid values: \\['separate'\\]"):
        S.validate_knobs("winograd_4", layer, knobs)


def test_a_fusion_the_schedules_cannot_compute_is_a_schedule_error():
    with pytest.raises(ScheduleError, match="pool of 20x20 gives 10x10"):
        S.default_knobs("direct_nchw", _layer(Fusion(pool=2, pool_in=(20, 20))))
    with pytest.raises(ScheduleError, match="pool_relu needs pool"):
        S.build("winograd_4", _layer(Fusion(pool_relu=True)))
    assert ConvLayer.square("r", 4, 4, 8, 8, relu=True).relu  # the bare ReLU still reads as before


def _conv_group(model, conv_name):
    conv = model.layer(conv_name)
    return ConvGroup(conv, tuple(fused_layers(model, conv, fusible_chain(model, conv, ("relu", "resize", "add")))),
                     tuple(prologue_layers(model, conv, prologue_chain(model, conv))))


def _local(candidate, case):
    func, weight = candidate.prim_func(case.layer, case.fusion, case.weight, TARGET)
    module = tvm.tirx.build(func.with_attr("global_symbol", "f"), target=tvm.target.Target(TARGET))
    out = tvm.runtime.empty(case.reference.shape, "float32")
    inputs = [case.x, weight, case.bias] + ([case.skip] if case.fusion.add else [])
    module["f"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs], out)
    return out.numpy()


@pytest.mark.parametrize("conv_name", ["enc1_conv1", "dec0_reduce"])
def test_conv_cases_of_a_model_carry_the_chain_and_every_tvm_kernel_computes_it(small_model, conv_name):
    group = _conv_group(small_model, conv_name)
    case = ConvCase.from_group(small_model, group, seed=2)
    assert case.relu and case.fusion == group.fusion
    assert case.x.shape == tuple(small_model.layer(group.source).output_shape)
    assert case.reference.shape == group.tail.output_shape
    assert (case.skip is not None) == bool(group.add)
    # The unfused case draws the same input: fused and unfused variants are comparable.
    if not group.prologue:
        np.testing.assert_array_equal(ConvCase.from_model(small_model, group.conv, seed=2).x, case.x)
    for candidate in (HandSchedule("direct_nchwc"), HandSchedule("winograd_2"), DefaultCandidate()):
        assert candidate.why_not_fusible(case.fusion) is None
        ok, _, rel = check_numerics(_local(candidate, case), case.reference, candidate.tolerance)
        assert ok, (candidate.impl, rel)


def test_a_relu_only_factory_gets_a_bool_and_is_refused_a_wider_fusion(small_model):
    seen = []

    def factory(layer, relu, weight):
        seen.append(relu)
        return default_conv_func(layer, relu)

    relu_only = FactoryCandidate("tvm:mine", factory)
    conv = small_model.layer("enc0_conv1")
    case = ConvCase.from_model(small_model, conv, relu=True)
    assert check_numerics(_local(relu_only, case), case.reference, 1e-4)[0] and seen == [True]
    group = _conv_group(small_model, "dec0_reduce")
    fused = ConvCase.from_model(small_model, group.conv, fusion=group.fusion)
    result = measure(relu_only, fused, None, None, TimingConfig.quick())  # refused before any session is used
    assert result.status == "not_applicable" and "resize+add" in result.note


def _relax_run(func_module, inputs):
    ex = tvm.compile(func_module, target=tvm.target.Target(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


def _relax_function(names_and_arrays, body):
    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(a.shape, "float32")) for n, a in names_and_arrays]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, {n: p for (n, _), p in zip(names_and_arrays, params)}))
        bb.emit_func_output(out)
    return bb.get()


def test_a_fused_conv_group_emits_one_call_reading_the_pool_input_and_the_skip(small_model):
    # enc1_conv1 reads the pool's input; dec0_reduce reads its input and the skip.
    for name in ("enc1_conv1", "dec0_reduce"):
        group = _conv_group(small_model, name)
        case = ConvCase.from_model(small_model, group.conv, fusion=group.fusion)
        pairs = [(group.source, case.x)] + ([(group.skip, case.skip)] if group.add else [])
        weight, bias = small_model.params[name]
        mod = _relax_function(pairs, lambda bb, values: HandSchedule("direct_nchw").emit(
            bb, group, values, weight, bias, TARGET))
        ok, _, rel = check_numerics(_relax_run(mod, [a for _, a in pairs]), case.reference, 1e-4)
        assert ok, (name, rel)


ELEMENTWISE_KNOBS = [None, ElementwiseKnobs(vec=1, parallel="none"), ElementwiseKnobs(vec=4, parallel="channel"),
                     ElementwiseKnobs(vec=8, parallel="fused")]


def test_elementwise_groups_of_the_model(small_model):
    groups = [tuple(l.op for l in g) for g in elementwise_groups(small_model)]
    assert groups == [("maxpool", "relu")] * 2 + [("resize", "add", "relu")] * 2


@pytest.mark.parametrize("kind", ["maxpool", "resize"])
@pytest.mark.parametrize("knobs", ELEMENTWISE_KNOBS, ids=str)
def test_elementwise_kernels_match_torch_for_every_knob(small_model, kind, knobs):
    group = next(g for g in elementwise_groups(small_model) if g[0].op == kind)
    case = GroupCase.from_model(small_model, group, seed=4)
    kernel = elementwise_kernel(group, knobs)
    module = tvm.tirx.build(kernel.prim_func(group).with_attr("global_symbol", "f"), target=tvm.target.Target(TARGET))
    out = tvm.runtime.empty(case.reference.shape, "float32")
    module["f"](*[tvm.runtime.tensor(a) for a in case.inputs], out)
    assert (case.reference < 0).sum() == 0 and (case.reference == 0).any()  # the ReLU is in the reference
    assert check_numerics(out.numpy(), case.reference, kernel.tolerance)[0]


def test_elementwise_kernels_emit_into_relax_and_refuse_bad_knobs(small_model):
    for group in (elementwise_groups(small_model)[0], elementwise_groups(small_model)[-1]):
        case = GroupCase.from_model(small_model, group)
        kernel = elementwise_kernel(group)
        mod = _relax_function(list(zip(group_inputs(group), case.inputs)),
                              lambda bb, values: kernel.emit(bb, group, values))
        assert check_numerics(_relax_run(mod, case.inputs), case.reference, kernel.tolerance)[0]
    pool = elementwise_groups(small_model)[0]
    with pytest.raises(GroupError, match="vec=5"):
        elementwise_kernel(pool, ElementwiseKnobs(vec=5)).prim_func(pool)
    with pytest.raises(GroupError, match="parallel"):
        elementwise_kernel(pool, ElementwiseKnobs(parallel="rows")).prim_func(pool)
    with pytest.raises(GroupError, match="cannot compute maxpool\\+relu; use tvm:maxpool_relu"):
        ElementwiseKernel("resize_add_relu").prim_func(pool)


def test_a_fused_conv_and_an_elementwise_kernel_are_measured_over_rpc(small_model, device):
    group = _conv_group(small_model, "dec0_reduce")
    conv_case = ConvCase.from_model(small_model, group.conv, fusion=group.fusion)
    pool = elementwise_groups(small_model)[0]
    group_case = GroupCase.from_model(small_model, pool)
    timing = TimingConfig.quick()
    results = device.run(lambda session: [
        measure(HandSchedule("direct_nchwc"), conv_case, session, device, timing),
        measure(elementwise_kernel(pool), group_case, session, device, timing)])
    for result in results:
        assert result.status == "ok" and result.numerics_ok, result.note
        # A wide interval is timed again (bounded): every round's repeats are kept.
        assert result.median_ms > 0 and len(result.repeats_ms) == timing.repeat * (1 + result.remeasured)
    assert results[1].layer == pool[-1].name
    record = measure_one(small_model, device, "dec0_reduce", HandSchedule("winograd_2"), timing, fusion=group.fusion)
    assert record["fusion"] == "conv > resize+add+relu" and record["status"] == "ok" and record["numerics_ok"]
