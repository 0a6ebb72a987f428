"""Names from real model files: a torch-exported UNet runs the whole chain, odd names stay safe.

torch.onnx.export names nodes `/enc.0/enc.0.0/Conv` and initializers `enc.0.0.weight`; nodes
may also share a name, or be named like the graph input. None of it may become a path, break a
Relax or torch parameter name, or make two layers one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from workbench import hybrid
from workbench.build import build_hybrid, compile_hybrid
from workbench.compare import compare
from workbench.kernels.default import DefaultCandidate
from workbench.kernels.registry import find, library_candidates
from workbench.measure import TimingConfig
from workbench.model import load_onnx, reference_output, relax_module, sample_input, to_onnx
from workbench.names import symbol
from workbench.plan import choose_plan
from workbench.records import RecordStore

NNPACK_WT = "nnpack:wt8x8:precompute"
FIRST_CONV = "/enc.0/enc.0.0/Conv"


def _torch_unet():
    """Two levels at 32x32, default torch module names (Sequential in a ModuleList: dotted paths)."""
    import torch
    from torch import nn

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1))
            self.enc = nn.ModuleList([block(3, 8), block(8, 16)])
            self.pool, self.up = nn.MaxPool2d(2), nn.Upsample(scale_factor=2, mode="nearest")
            self.reduce, self.dec, self.head = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
                nn.Conv2d(8, 2, 3, padding=1)

        def forward(self, x):
            skip = self.enc[0](x)
            low = self.enc[1](torch.relu(self.pool(skip)))
            y = torch.relu(self.up(self.reduce(low)) + skip)
            return self.head(torch.relu(self.dec(y)))

    torch.manual_seed(0)
    return UNet().eval()


@pytest.fixture(scope="module")
def torch_unet(tmp_path_factory):
    import torch

    module = _torch_unet()
    path = tmp_path_factory.mktemp("torch") / "unet.onnx"
    torch.onnx.export(module, torch.randn(1, 3, 32, 32), str(path), input_names=["input"], output_names=["output"],
                      dynamo=False, opset_version=17)
    return module, path


def _torch_output(module, x):
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def test_torch_exported_names_import_as_they_are(torch_unet):
    module, path = torch_unet
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert FIRST_CONV in names and any("." in i.name for i in onnx.load(str(path)).graph.initializer)
    model = load_onnx(path)
    assert model.convs[0].name == FIRST_CONV and len(model.convs) == 7 and model.notes == []
    x = sample_input(model)
    # The reference (a torch module keyed by safe names) computes what the exported module does.
    np.testing.assert_allclose(reference_output(model, x), _torch_output(module, x), rtol=1e-4, atol=1e-4)


def test_a_torch_exported_unet_runs_the_whole_chain(torch_unet, device, tmp_path):
    """compare one layer named as torch named it -> choose the plan -> build -> run over RPC -> export."""
    module, path = torch_unet
    model = load_onnx(path)
    store = RecordStore(tmp_path / "work" / "records.jsonl")
    candidates = [find(NNPACK_WT, library_candidates(2)), DefaultCandidate()]
    records = compare(model, device, [FIRST_CONV], candidates=candidates, timing=TimingConfig.quick(),
                      store=store, progress=False)
    assert {(r["layer"], r["impl"]) for r in records} == {(FIRST_CONV, NNPACK_WT), (FIRST_CONV, "tvm:default")}
    assert all(r["status"] == "ok" and r["numerics_ok"] for r in records), records
    # Make NNPACK the winner whatever the timings, so the build has both kinds of kernel in it.
    records = [dict(r, median_ms=0.001, ci_ms=[0.001, 0.001], repeats_ms=[0.001] * 3) if r["impl"] == NNPACK_WT else r
               for r in records]
    plan = choose_plan(model, records)
    assert plan.impl(FIRST_CONV) == NNPACK_WT and plan.impl("/head/Conv") == "tvm:default"

    executable = compile_hybrid(build_hybrid(model, plan, device.target))
    x = sample_input(model, seed=4)
    expected = _torch_output(module, x)
    result = hybrid.run_remote(device, executable, x, reference=expected)
    assert result["numerics_ok"], result["rel_err"]
    assert result["nnpack_profile"].get("run")  # the NNPACK layer really ran on the device

    out = hybrid.export_hybrid(model, plan, tmp_path / "export", device.target, threads=2)
    assert hybrid.check_output(hybrid.load_hybrid(out)(x), expected)["numerics_ok"]
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written == {"work", "export"}  # no file named after a node anywhere else


def _odd_names_model(path):
    """A conv named like the graph input, two convs sharing one name, a relu named like a weight."""
    rng = np.random.default_rng(0)

    def conv(name, src, out, cin, cout):
        w = numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), f"{out}.weight")
        b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"{out}.bias")
        return helper.make_node("Conv", [src, w.name, b.name], [out], name=name, pads=[1] * 4), [w, b]

    c0, i0 = conv("input", "input", "t0", 3, 4)
    c1, i1 = conv("conv", "t1", "t2", 4, 8)
    c2, i2 = conv("conv", "t3", "t4", 8, 2)
    nodes = [c0, helper.make_node("Relu", ["t0"], ["t1"], name="input_2"), c1,
             helper.make_node("Relu", ["t2"], ["t3"], name="t0.weight"), c2]
    graph = helper.make_graph(nodes, "odd", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("t4", TensorProto.FLOAT, [1, 2, 16, 16])], i0 + i1 + i2)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8  # what the pinned ONNX Runtime reads
    onnx.save(proto, str(path))
    return path


def test_a_node_named_like_the_input_and_duplicate_names_become_distinct_layers(tmp_path):
    import onnxruntime as ort

    path = _odd_names_model(tmp_path / "odd.onnx")
    model = load_onnx(path)
    names = [layer.name for layer in model.layers]
    assert len(set(names)) == len(names) == 5 and model.input_name not in names
    assert [c.name for c in model.convs] == ["input_3", "conv", "conv_2"]  # input_2 is the relu's own name
    assert [c.out_channels for c in model.convs] == [4, 8, 2]
    assert len(model.notes) == 2 and "graph input" in model.notes[0] and "'conv_2'" in model.notes[1]
    x = sample_input(model)
    # ONNX Runtime refuses duplicate node names: it runs the same graph with its nodes renamed.
    proto = onnx.load(str(path))
    for index, node in enumerate(proto.graph.node):
        node.name = f"n{index}"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(reference_output(model, x), expected, rtol=1e-4, atol=1e-4)
    onnx.checker.check_model(to_onnx(model))  # initializer names kept apart from the layer names
    assert relax_module(model) is not None


def test_duplicate_convs_are_both_measured(tmp_path, device):
    model = load_onnx(_odd_names_model(tmp_path / "odd.onnx"))
    records = compare(model, device, ["conv", "conv_2"], candidates=[DefaultCandidate()],
                      timing=TimingConfig.quick(), progress=False)
    assert [r["layer"] for r in records] == ["conv", "conv_2"]
    assert records[0]["flops"] != records[1]["flops"]  # two different convs, not one measured twice
    assert all(r["status"] == "ok" and r["numerics_ok"] for r in records)


@pytest.mark.parametrize("name", ["/enc.0.0/Conv", "../../escape", "/", "..", "a/b\\c", "名前", "", "0conv"])
def test_symbols_are_identifiers_and_tuning_logs_stay_in_their_folder(name, tmp_path):
    from workbench.tuning import _task_logger

    sym = symbol(name)
    assert sym.isidentifier() and sym.isascii()
    logger = _task_logger(tmp_path / "db", name)
    path = next(h.baseFilename for h in logger.handlers if hasattr(h, "baseFilename"))
    assert str(path).startswith(str((tmp_path / "db" / "logs").resolve()) + "/")
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def test_symbols_of_different_names_differ():
    names = ["/enc.0/Conv", "_enc_0_Conv", "enc.0/Conv", "/enc/0/Conv", "enc_0_conv"]
    assert len({symbol(n) for n in names}) == len(names)


def test_torch_layer_names_select_layers_on_the_command_line(torch_unet, tmp_path):
    """`--layers` takes torch's names as they are: only the unknown one is reported."""
    import subprocess
    import sys

    _, path = torch_unet
    argv = ["compare", "--model", str(path), "--work-dir", str(tmp_path / "work"), "--layers", f"{FIRST_CONV},/nope"]
    proc = subprocess.run([sys.executable, "-m", "workbench", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown conv layer(s) ['/nope']" in proc.stderr and FIRST_CONV in proc.stderr


def _two_convs_model(path, first_name, second_name):
    """Two convs on the input added together; the convs' node names as given ('' for none)."""
    rng = np.random.default_rng(2)
    inits, nodes = [], []
    for i, (name, out) in enumerate(((first_name, "a"), (second_name, "b"))):
        inits += [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [out], name=name, pads=[1] * 4))
    nodes.append(helper.make_node("Add", ["a", "b"], ["y"], name="add"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(path))
    return path


def test_a_name_given_in_the_file_wins_over_a_generated_one(tmp_path):
    model = load_onnx(_two_convs_model(tmp_path / "clash.onnx", "", "conv_0"))
    assert [c.name for c in model.convs] == ["conv_0_2", "conv_0"]  # the user's conv_0 keeps its name
    assert len(model.notes) == 1 and "has no name" in model.notes[0] and "'conv_0_2'" in model.notes[0]
    plain = load_onnx(_two_convs_model(tmp_path / "plain.onnx", "", "second"))
    assert [c.name for c in plain.convs] == ["conv_0", "second"] and plain.notes == []


def test_a_name_with_a_comma_is_renamed_so_layers_can_select_it(tmp_path):
    import subprocess
    import sys

    path = _two_convs_model(tmp_path / "comma.onnx", "conv,one", "conv_one")
    model = load_onnx(path)
    # The comma is replaced; the name conv_one is the other conv's own, so this one takes the next.
    assert [c.name for c in model.convs] == ["conv_one_2", "conv_one"]
    assert len(model.notes) == 1 and "'conv,one'" in model.notes[0] and "'conv_one_2'" in model.notes[0]
    assert [c.name for c in model.select_convs(["conv_one_2", "conv_one"])] == ["conv_one_2", "conv_one"]
    proc = subprocess.run([sys.executable, "-m", "workbench", "compare", "--model", str(path), "--work-dir",
                           str(tmp_path / "work"), "--layers", "conv,one"], capture_output=True, text=True, timeout=120)
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(error) == 1 and "Traceback" not in proc.stderr
    assert "unknown conv layer(s) ['conv', 'one']" in error[0] and "'conv_one_2'" in error[0]


def test_control_characters_in_names_stay_on_one_line(tmp_path):
    from workbench.intensity import layer_table
    from workbench.model import ModelError

    model = load_onnx(_two_convs_model(tmp_path / "ctrl.onnx", "conv\nsecond line", "conv\x1b[31mRED"))
    assert [c.name for c in model.convs] == ["conv\nsecond line", "conv\x1b[31mRED"]  # selectable as they are
    shown = list(layer_table(model)["name"])
    assert shown[:2] == ["conv\\nsecond line", "conv\\x1b[31mRED"]
    text = layer_table(model).to_string(index=False)
    assert len(text.splitlines()) == len(model.layers) + 1 and "\x1b" not in text
    with pytest.raises(ModelError) as err:
        model.select_convs(["nope"])
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value) and "'conv\\nsecond line'" in str(err.value)
