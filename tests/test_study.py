"""`study --quick` end to end on a small UNet over a real local cluster, its resume, and export."""

import json
import subprocess
import sys

import numpy as np
import pytest

from workbench import nnpack
from workbench.model import reference_output, sample_input, save_onnx


def workbench(*args):
    proc = subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def study(small_model, cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    onnx_path = save_onnx(small_model, root / "small.onnx")
    work = root / "work"
    args = ["study", "--model", str(onnx_path), "--work-dir", str(work), "--quick",
            "--tracker", f"127.0.0.1:{cluster.port}", "--key", cluster.key, "--json"]
    summary = json.loads(workbench(*args).stdout)
    return {"summary": summary, "work": work, "onnx": onnx_path, "args": args}


def _kinds(work):
    lines = (work / "results" / "records.jsonl").read_text().splitlines()
    kinds = {}
    for line in lines:
        kind = json.loads(line)["kind"]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def test_study_reports_the_hybrid_against_every_peer(study):
    summary = study["summary"]
    assert summary["numerics_ok"] is True
    assert summary["hybrid_ms"] > 0
    assert {"onnxruntime", "torch", "nnpack_everywhere", "tvm_only"} <= set(summary["baselines"])
    for name, ms in summary["baselines"].items():
        assert ms > 0 and summary["ratios"][name] == pytest.approx(summary["hybrid_ms"] / ms)
    report = (study["work"] / "report.html").read_text()
    assert "End to end" in report and "Plotly" in report and "<script" in report
    assert (study["work"] / "hybrid" / "plan.json").exists()
    if nnpack.runs_as("wt8x8_fp16") == "wt8x8":  # x86: the report says FP16 Winograd is only wt8x8 here
        assert "nnpack:wt8x8_fp16 is an alias of wt8x8" in report


def test_study_reports_fusion_measured_in_the_same_run(study):
    fusion = study["summary"]["fusion"]
    for key in ("unfused_ms", "groups_2018_ms", "folded_ms", "hybrid_ms", "isolated_sum_ms"):
        assert fusion[key] > 0, key
    assert fusion["hybrid_ms"] == study["summary"]["hybrid_ms"]
    assert fusion["hybrid_vs_unfused"] == pytest.approx(fusion["hybrid_ms"] / fusion["unfused_ms"])
    assert not {"unfused", "groups_2018", "folded"} & set(study["summary"]["baselines"])  # not peers
    records = [json.loads(l) for l in (study["work"] / "results" / "records.jsonl").read_text().splitlines()]
    blocks = [r for r in records if r["kind"] == "block_measurement"]
    folds = [r for r in blocks if " > " in r["fusion"]]
    separate = [r for r in blocks if " > " not in r["fusion"]]
    assert folds and separate and all(r["status"] == "ok" and r["numerics_ok"] for r in blocks)
    assert {r["impl"] for r in separate} == {"tvm:maxpool_relu", "tvm:resize_add_relu"}
    plan = json.loads((study["work"] / "hybrid" / "plan.json").read_text())
    assert plan["elementwise"] == "hand"
    assert "Fusion" in (study["work"] / "report.html").read_text()


def test_study_measured_nnpack_tvm_and_tuned_kernels(study):
    records = [json.loads(l) for l in (study["work"] / "results" / "records.jsonl").read_text().splitlines()]
    convs = [r for r in records if r["kind"] == "conv_measurement"]
    impls = {r["impl"] for r in convs if r["status"] == "ok"}
    assert {"nnpack:wt8x8:precompute", "tvm:default", "tvm:direct_nchwc", "tvm:hand_tuned"} <= impls
    tuned = [r for r in convs if r["impl"] == "tvm:hand_tuned"]
    assert sum(r["status"] == "ok" for r in tuned) == 4  # the first and last two convs (--quick tunes the edges)
    assert any(r["kind"] == "tuning" for r in records)
    tuning = study["summary"]["tuning"]
    assert tuning["space"] == "hand" and tuning["hand"]["new_trials"] == tuning["trials"]
    estimates = [ms for _, ms in tuning["hand"]["estimate_history"]]
    assert estimates and estimates == sorted(estimates, reverse=True)  # the edges' estimated time only falls
    assert "Tuning" in (study["work"] / "report.html").read_text()


def test_a_rerun_resumes_without_tuning_or_measuring_layers_again(study, tmp_path):
    before = _kinds(study["work"])
    first = tmp_path / "first"
    workbench("report", "--work-dir", str(study["work"]), "--out", str(first))
    summary = json.loads(workbench(*study["args"]).stdout)
    after = _kinds(study["work"])
    assert after["conv_measurement"] == before["conv_measurement"]
    assert after["block_measurement"] == before["block_measurement"]
    assert after.get("runoff") == before.get("runoff")  # the runoffs are reused too
    assert after["end_to_end"] > before["end_to_end"]  # only the end-to-end comparison is measured again
    # The same records give the same plan, and the bundles of the two runs say so.
    again = tmp_path / "again"
    workbench("report", "--work-dir", str(study["work"]), "--out", str(again))
    diff = json.loads(workbench("report", "--compare", str(first), str(again), "--json").stdout)
    assert diff["same_plan"] and diff["plan_changes"] == []
    assert summary["seeds"] == study["summary"]["seeds"] and summary["plan"] == study["summary"]["plan"]
    assert {row["key"] for row in diff["environment"]} <= {"command"}  # same machine, versions, budget, seeds
    assert (again / "reproduce.sh").read_text().count("--quick") == 1
    tuning = [json.loads(l) for l in (study["work"] / "results" / "records.jsonl").read_text().splitlines()
              if json.loads(l)["kind"] == "tuning"]
    assert all(r["new_trials"] == 0 for r in tuning[-4:])
    assert summary["numerics_ok"] is True


def test_export_and_load_hybrid_match_the_reference(study, small_model, tmp_path):
    from workbench import load_hybrid

    out = tmp_path / "exported"
    workbench("export", "--model", str(study["onnx"]), "--work-dir", str(study["work"]), "--out", str(out))
    assert {p.name for p in out.iterdir()} >= {"hybrid.so", "plan.json", "model.onnx"}
    run = load_hybrid(out)
    x = sample_input(small_model)
    np.testing.assert_allclose(run(x), reference_output(small_model, x), rtol=1e-3, atol=1e-3)


def test_export_without_a_study_says_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "workbench", "export", "--work-dir", str(tmp_path), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "run `python -m workbench study`" in proc.stderr


def test_the_readme_python_runs_as_written(study, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no Python example"
    workbench("export", "--model", str(study["onnx"]), "--work-dir", str(study["work"]), "--out",
              str(tmp_path / "unet_hybrid"))
    monkeypatch.chdir(tmp_path)  # where the README's `unet_hybrid` folder is
    for block in blocks:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["y"].shape == tuple(namespace["hybrid"].meta["output_shape"])
