"""The other networks: MobileNetV2, SqueezeNet 1.1 and ShuffleNetV2 read through the ONNX importer
compute what their PyTorch definitions compute; the widened op family imports from files torch
writes; the layer table shows what is special about them."""

import io
import warnings

import numpy as np
import pytest

from workbench import intensity, networks
from workbench.model import ModelError, from_onnx_proto, reference_output, sample_input, to_onnx

# torchvision's counts: every conv of the architecture, BatchNormalization after all but SqueezeNet's.
CONVS = {"mobilenet_v2": 52, "squeezenet": 26, "shufflenet_v2": 56}
FOLDED = {"mobilenet_v2": 52, "squeezenet": 0, "shufflenet_v2": 56}


@pytest.mark.parametrize("name", networks.NETWORKS)
def test_each_network_imports_and_computes_what_its_torch_definition_computes(name):
    import torch

    model = networks.network(name, resolution=96)
    assert len(model.convs) == CONVS[name] and len(model.folded) == FOLDED[name]
    assert model.output_shape == (1, 1000)
    x = sample_input(model)
    with torch.no_grad():
        expected = networks.torch_network(name)(torch.from_numpy(x)).numpy()
    got = reference_output(model, x)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert got.argmax() == expected.argmax()
    # Written back to ONNX and read again, it is the same model.
    assert from_onnx_proto(to_onnx(model)).fingerprint == model.fingerprint


def test_the_layer_table_says_what_was_folded_and_depthwise_convs_have_the_lowest_intensity():
    model = networks.network("mobilenet_v2")
    table = intensity.layer_table(model)
    convs = table[table.op == "conv"]
    assert (convs.folded != "").all() and convs.folded.str.contains("BatchNormalization").all()
    depthwise = convs[convs.groups > 1]
    dense = convs[convs.groups == 1]
    assert len(depthwise) == 17
    assert depthwise.intensity.median() < dense.intensity.min()
    # 300 million multiply-accumulates, as the paper counts MobileNetV2 at 224x224.
    assert 2.9e8 < convs.flops.sum() / 2 < 3.1e8


def test_unknown_network_and_bad_resolution_fail_clearly():
    with pytest.raises(networks.NetworkError, match="choose one of mobilenet_v2"):
        networks.network("resnet50")
    with pytest.raises(networks.NetworkError, match="multiple of 32"):
        networks.network("squeezenet", resolution=100)


def _exported(module, shape, **kwargs) -> bytes:
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(shape),), buffer, dynamo=False, opset_version=17, **kwargs)
    return buffer.getvalue()


def test_a_torch_export_with_folding_on_imports_its_split_flatten_and_pools():
    """What torch writes by default (BatchNormalization already folded, constants folded): Split for a chunk,
    ReduceMean for a mean, Flatten, AveragePool with ceil_mode, a Clip at 0 alone (a ReLU)."""
    import onnx
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 2, 1)
            self.dw = nn.Conv2d(4, 4, 3, 1, 1, groups=4)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            a, b = self.conv(x).chunk(2, dim=1)
            x = torch.cat([a.clamp(min=0), self.dw(b)], 1)
            x = nn.functional.avg_pool2d(x, 3, 2, ceil_mode=True)
            return self.fc(x.mean([2, 3]))

    torch.manual_seed(0)
    net = Net().eval()
    model = from_onnx_proto(onnx.load_from_string(_exported(net, (1, 3, 20, 20))))
    ops = [layer.op for layer in model.layers]
    assert ops.count("slice") == 2 and "avgpool" in ops and "globalavgpool" in ops and "gemm" in ops
    assert "relu" in ops  # clamp(min=0) is a ReLU
    x = sample_input(model)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.allclose(reference_output(model, x), expected, rtol=1e-4, atol=1e-5)


def test_a_reshape_that_is_no_channel_shuffle_is_refused_with_the_node_name():
    import onnx
    import torch.nn as nn

    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            n, c, h, w = x.shape
            y = self.conv(x).view(n, 2, c // 2, h, w).transpose(3, 4)  # not the shuffle's transpose
            return y.reshape(n, c, w, h)

    proto = onnx.load_from_string(_exported(Wrong(), (1, 4, 6, 6)))
    with pytest.raises(ModelError, match=r"Transpose.*perm \[0, 1, 2, 4, 3\].*channel shuffle"):
        from_onnx_proto(proto)


def test_study_quick_on_a_network_writes_a_report(cluster, tmp_path):
    """`study --quick --network mobilenet_v2 --int8` end to end on a real local cluster (at 32x32 to stay small):
    the hybrid is checked against PyTorch, the peers ran, the depthwise convs say why NNPACK does not apply, and
    int8 reports each conv's quantisation error and the int8 hybrid against ONNX Runtime's static quantisation."""
    import json
    import subprocess
    import sys

    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "workbench", "study", "--quick", "--network", "mobilenet_v2",
                           "--resolution", "32", "--int8", "--work-dir", str(work), "--tracker", f"127.0.0.1:{cluster.port}",
                           "--key", cluster.key, "--json"], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["numerics_ok"] and {"onnxruntime", "torch", "tvm_only"} <= set(summary["baselines"])
    report = (work / "report.html").read_text()
    assert "mobilenet_v2-32" in report
    records = [json.loads(line) for line in (work / "results" / "records.jsonl").read_text().splitlines()]
    model = networks.network("mobilenet_v2", 32)
    depthwise = {layer.name for layer in model.convs if layer.geometry.is_depthwise}
    refused = [r for r in records if r.get("layer") in depthwise and r.get("impl", "").startswith("nnpack:")]
    assert refused and all(r["status"] == "not_applicable" and "group" in r["note"] for r in refused)
    assert any(r.get("layer") in depthwise and r.get("impl") == "tvm:depthwise" and r.get("numerics_ok")
               for r in records)
    int8 = {row["name"]: row for row in summary["int8"]["end_to_end"]}
    assert int8["int8_hybrid"]["numerics_ok"] and 0 <= int8["onnxruntime_int8"]["top1_agreement"] <= 1
    errors = [row["qnnpack_quant_error"] for row in summary["int8"]["layers"]]
    assert len(errors) == len(model.convs) and all(e is not None and 0 < e < 0.5 for e in errors)
    assert "<h2>int8</h2>" in report


def test_relu6_is_fused_into_the_conv_and_a_clip_not_from_zero_stays_separate():
    """conv -> Clip(0, 6) becomes one kernel (the conv's output stage caps the ReLU); conv -> Clip(-1, 1) does
    not; the built model computes what PyTorch computes either way."""
    from workbench.build import build_hybrid, compile_hybrid
    from workbench.hybrid import run_local
    from workbench.model import Model, clip_layer, conv_layer, random_params
    from workbench.plan import LayerPlan, Plan
    from workbench.targets import host_target

    shapes, layers = {"input": (1, 4, 12, 12)}, []

    def add(layer):
        layers.append(layer)
        shapes[layer.name] = layer.output_shape
        return layer.name

    x = add(conv_layer("c1", "input", shapes["input"], 8))
    x = add(clip_layer("relu6", x, shapes[x], 0.0, 6.0))
    x = add(conv_layer("dw", x, shapes[x], 8, groups=8))
    x = add(clip_layer("relu6_dw", x, shapes[x], 0.0, 6.0))
    x = add(conv_layer("c2", x, shapes[x], 4, kernel=1, pad=0))
    add(clip_layer("clip", x, shapes[x], -1.0, 1.0))
    model = Model("relu6", layers, random_params(layers), shapes["input"])
    impls = {"c1": "tvm:direct_nchwc", "dw": "tvm:depthwise", "c2": "tvm:default"}
    plan = Plan(model.name, {n: LayerPlan(n, impl) for n, impl in impls.items()}).with_fusion(model, "2018")
    assert plan.fusions() == {"c1": ("clip",), "dw": ("clip",), "c2": ()}
    executable = compile_hybrid(build_hybrid(model, plan, host_target(1)), host_target(1))
    result = run_local(executable, sample_input(model), reference=model, threads=1)
    assert result["numerics_ok"], result["rel_err"]


@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2"])
def test_the_networks_import_from_other_opsets(name, opset):
    """Clip's bounds, Split's sizes, Slice's and ReduceMean's axes moved from attributes to inputs across opsets."""
    import onnx
    import torch

    model = from_onnx_proto(onnx.load_from_string(networks.export_onnx(name, 32, opset=opset)))
    x = sample_input(model)
    with torch.no_grad():
        expected = networks.torch_network(name)(torch.from_numpy(x)).numpy()
    assert np.abs(reference_output(model, x) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_a_batchnorm_is_not_folded_into_a_conv_read_elsewhere_through_an_identity():
    from onnx import TensorProto, helper, numpy_helper

    values = {"w": np.ones((2, 2, 1, 1), np.float32), **{k: np.ones(2, np.float32) for k in ("s", "b", "m", "v")}}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Identity", ["c"], ["i"], name="same"),
             helper.make_node("BatchNormalization", ["i", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Add", ["n", "c"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [numpy_helper.from_array(v, k) for k, v in values.items()])
    with pytest.raises(ModelError, match=r"node 'bn'.*nothing else reads"):
        from_onnx_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_the_composer_and_the_plan_editor_keep_the_relu6_fusion():
    from workbench import composer, widgets
    from workbench.plan import Plan

    model = networks.network("mobilenet_v2", 32)
    capped = [b for b in composer.blocks(model) if b.kind == "conv + ReLU6"]
    assert len(capped) == 35 and all(b.toggles == {"clip": ("clip",)} for b in capped)
    plan = Plan.uniform(model, "tvm:default")
    assert sum(entry.fuse == ("clip",) for entry in plan.layers.values()) == 35
    assert widgets.PlanEditor(model, plan).plan.fusions() == plan.fusions()


@pytest.mark.parametrize("out_features", [1000, 10, 7])
def test_the_fully_connected_kernel_computes_the_gemm(out_features):
    """The classifier's kernel (weights transposed, parallel and vectorised over outputs) against numpy."""
    import tvm

    from workbench.build import gemm_func
    from workbench.targets import host_target

    rng = np.random.default_rng(out_features)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((1, 64), (out_features, 64), (out_features,)))
    run = tvm.compile(gemm_func(out_features, 64), target=tvm.target.Target(host_target(1)))
    y = tvm.runtime.empty((1, out_features), "float32", tvm.cpu())
    run["main"](*(tvm.runtime.tensor(a) for a in (x, np.ascontiguousarray(w.T), b)), y)
    assert np.allclose(y.numpy(), x @ w.T + b, rtol=1e-5, atol=1e-5)
