"""The per-layer study over a real local RPC cluster: protocol, records, resume, awkward shapes."""

import json

import numpy as np
import pytest

from workbench import nnpack
from workbench.compare import compare, winners
from workbench.kernels.default import DefaultCandidate, default_conv_func
from workbench.kernels.nnpack import nnpack_candidates
from workbench.kernels.tvm_kernel import FactoryCandidate
from workbench.measure import TimingConfig
from workbench.model import Model, conv_layer, random_params
from workbench.records import RecordStore
from workbench.stats import EXTRA_ROUNDS

QUICK = TimingConfig(number=1, repeat=2, min_repeat_ms=1)


def _single_conv_model(name, shape, out_channels, kernel, pad, stride=1):
    layer = conv_layer(name, "input", shape, out_channels, kernel=kernel, stride=stride, pad=pad)
    return Model(name, [layer], random_params([layer], seed=1), shape)


@pytest.fixture(scope="module")
def small_records(small_model, device, tmp_path_factory):
    store = RecordStore(tmp_path_factory.mktemp("records") / "records.jsonl")
    layers = [small_model.convs[0].name, small_model.convs[3].name]
    return store, layers, compare(small_model, device, layers, timing=QUICK, store=store, progress=False)


def test_every_implementation_of_every_layer_is_reported(small_records):
    _, layers, records = small_records
    impls = {c.impl for c in nnpack_candidates(2) + [DefaultCandidate()]}
    assert {(r["layer"], r["impl"]) for r in records} == {(l, i) for l in layers for i in impls}
    for r in records:
        assert r["status"] in ("ok", "not_applicable"), r
        if r["status"] == "ok":
            assert r["numerics_ok"] and r["median_ms"] > 0
            # A wide interval is timed again, at most EXTRA_ROUNDS more rounds, every repeat kept.
            assert 0 <= r["remeasured"] <= EXTRA_ROUNDS and len(r["repeats_ms"]) == QUICK.repeat * (1 + r["remeasured"])
            assert r["ci_ms"][0] <= r["median_ms"] <= r["ci_ms"][1]
            assert r["gflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e9)


def test_rules_and_fp16_are_reported_honestly(small_records):
    _, _, records = small_records
    by = {(r["layer"], r["impl"]): r for r in records}
    direct = by[(records[0]["layer"], "nnpack:direct:compute")]
    assert direct["status"] == "not_applicable" and "1x1" in direct["note"]
    fp16 = by[(records[0]["layer"], "nnpack:wt8x8_fp16:compute")]
    if nnpack.runs_as("wt8x8_fp16") == "wt8x8":
        assert "runs as wt8x8" in fp16["note"] and fp16["alias_of"] == "nnpack:wt8x8:compute"


def test_nnpack_phases_come_from_the_device(small_records):
    _, _, records = small_records
    pre = next(r for r in records if r["impl"] == "nnpack:wt8x8:precompute")
    comp = next(r for r in records if r["impl"] == "nnpack:wt8x8:compute")
    assert pre["phases"]["kernel_transform_ms"] == 0.0 and pre["phases"]["precompute_kernel_ms"] > 0
    assert comp["phases"]["kernel_transform_ms"] > 0
    assert comp["phases"]["total_ms"] >= comp["phases"]["block_multiplication_ms"] > 0


def test_a_rerun_resumes_from_the_records(small_model, device, small_records):
    store, layers, records = small_records
    lines = len(store.read())
    again = compare(small_model, device, layers, timing=QUICK, store=store, progress=False)
    assert len(store.read()) == lines  # nothing measured twice
    assert [(r["layer"], r["impl"], r["median_ms"]) for r in again] == [
        (r["layer"], r["impl"], r["median_ms"]) for r in records]


def test_a_wrong_kernel_is_recorded_and_never_wins(device):
    model = _single_conv_model("w", (1, 4, 12, 12), 4, 3, 1)

    def wrong_weights(layer, relu, weight):  # a real kernel fed the wrong weights: fast and wrong
        return default_conv_func(layer, relu), np.ascontiguousarray(weight[:, :, ::-1, :])

    candidates = [FactoryCandidate("tvm:wrong", wrong_weights), DefaultCandidate()]
    records = compare(model, device, timing=QUICK, candidates=candidates, progress=False)
    wrong = next(r for r in records if r["impl"] == "tvm:wrong")
    assert wrong["status"] == "wrong" and wrong["numerics_ok"] is False and wrong["median_ms"] > 0
    assert list(winners(records).impl) == ["tvm:default"]


@pytest.mark.parametrize("shape,out,kernel,pad,stride", [
    ((1, 1, 9, 31), 3, 3, 1, 1),     # one channel, non-square
    ((1, 6, 13, 7), 5, 1, 0, 1),     # 1x1: NNPACK direct applies
    ((1, 3, 20, 17), 4, 5, 2, 1),    # 5x5: FFT and implicit GEMM, no Winograd
    ((1, 4, 15, 15), 4, 3, 0, 1),    # no padding, odd size
    ((1, 4, 16, 16), 8, 3, 1, 2),    # stride 2: implicit GEMM only
])
def test_awkward_shapes_through_the_protocol(device, shape, out, kernel, pad, stride):
    model = _single_conv_model("odd", shape, out, kernel, pad, stride)
    records = compare(model, device, timing=QUICK, progress=False)
    ok = {r["impl"] for r in records if r["status"] == "ok"}
    assert all(r["status"] in ("ok", "not_applicable") for r in records), [r for r in records if r["status"] not in ("ok", "not_applicable")]
    assert all(r["numerics_ok"] for r in records if r["status"] == "ok")
    assert "tvm:default" in ok and "nnpack:implicit_gemm:compute" in ok
    assert ("nnpack:direct:compute" in ok) == (kernel == 1 and stride == 1)
    assert ("nnpack:wt8x8:compute" in ok) == (kernel == 3 and stride == 1)


def test_compare_cli_json(tmp_path, small_model, cluster):
    import subprocess
    import sys

    from workbench.model import save_onnx

    path = save_onnx(small_model, tmp_path / "small.onnx")
    layer = small_model.convs[1].name
    proc = subprocess.run([sys.executable, "-m", "workbench", "compare", "--model", str(path), "--layers", layer,
                           "--tracker", f"127.0.0.1:{cluster.port}", "--key", cluster.key, "--quick",
                           "--work-dir", str(tmp_path / "w"), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {"layer", "impl", "status", "median_ms", "gflops", "numerics_ok", "max_abs_err", "phases"} <= set(rows[0])
    by_impl = {r["impl"]: r for r in rows}
    assert {"nnpack:wt8x8:precompute", "nnpack:direct:compute", "tvm:default", "tvm:direct_nchwc",
            "tvm:winograd_6", "tvm:tuned"} <= set(by_impl)
    assert by_impl["tvm:winograd_4"]["status"] == "ok" and by_impl["tvm:winograd_4"]["numerics_ok"]
    assert by_impl["tvm:tuned"]["status"] == "not_applicable"  # nothing tuned in this work dir
    assert (tmp_path / "w" / "results" / "records.jsonl").exists()


def test_a_model_with_the_same_file_stem_is_measured_not_reused(device, tmp_path):
    """Two different small.onnx (same layer name, other shapes) in one work dir: each gets its own
    records, and records from before fingerprints are measured again rather than trusted."""
    from workbench.model import load_onnx, save_onnx

    first = load_onnx(save_onnx(_single_conv_model("small", (1, 4, 12, 12), 4, 3, 1), tmp_path / "a" / "small.onnx"))
    other = load_onnx(save_onnx(_single_conv_model("small", (1, 4, 16, 16), 4, 3, 1), tmp_path / "b" / "small.onnx"))
    assert first.name == other.name == "small" and first.convs[0].name == other.convs[0].name
    store = RecordStore(tmp_path / "work" / "records.jsonl")
    run = lambda model: compare(model, device, candidates=[DefaultCandidate()], timing=QUICK, store=store,
                                progress=False)
    mine = run(first)
    theirs = run(other)
    assert len(store.read()) == 2  # the second model was measured, not served the first one's record
    assert mine[0]["model_fingerprint"] == first.fingerprint != theirs[0]["model_fingerprint"] == other.fingerprint
    assert theirs[0]["status"] == "ok" and theirs[0]["flops"] > mine[0]["flops"]  # 16x16, not 12x12
    assert run(first)[0]["median_ms"] == mine[0]["median_ms"] and len(store.read()) == 2  # each resumes its own

    # A record from before fingerprints (same name, layer and target) is measured again.
    old = RecordStore(tmp_path / "old" / "records.jsonl")
    old.append("conv_measurement", {k: v for k, v in mine[0].items() if k not in ("model_fingerprint", "kind")})
    again = compare(first, device, candidates=[DefaultCandidate()], timing=QUICK, store=old, progress=False)
    assert len(old.read()) == 2 and again[0]["model_fingerprint"] == first.fingerprint
