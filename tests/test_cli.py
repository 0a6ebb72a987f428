"""The command line as a script would use it: JSON on stdout, clear errors."""

import json
import subprocess
import sys


from workbench.model import save_onnx


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_layers_json_for_the_reference_unet():
    rows = json.loads(run("layers", "--json").stdout)
    assert len(rows) == 48
    first = rows[0]
    assert {"name", "op", "input_shape", "output_shape", "flops", "bytes", "intensity"} <= set(first)
    assert first["name"] == "enc0_conv1" and first["output_shape"] == [1, 16, 192, 192]
    assert sum(r["flops"] for r in rows if r["op"] == "conv") == 2_261_385_216


def test_layers_json_for_an_onnx_file(tmp_path, small_model):
    path = save_onnx(small_model, tmp_path / "small.onnx")
    rows = json.loads(run("layers", "--model", str(path), "--json").stdout)
    assert [r["name"] for r in rows] == [l.name for l in small_model.layers]


def test_a_bad_model_is_one_clear_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not onnx")
    proc = run("layers", "--model", str(bad), "--json", check=False)
    assert proc.returncode == 2
    assert "not a valid ONNX model" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_ceilings_json_against_a_tracker(cluster):
    proc = run("ceilings", "--tracker", f"127.0.0.1:{cluster.port}", "--key", cluster.key, "--quick", "--json")
    result = json.loads(proc.stdout)
    assert result["peak_gflops"] > 1 and result["bandwidth_gbs"] > 0.5
    assert result["device"]["tracker"] == f"127.0.0.1:{cluster.port}"


def test_a_bad_thread_count_is_one_clear_line_before_any_device_starts():
    proc = run("ceilings", "--threads", "0", "--json", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "thread count must be a positive integer" in proc.stderr and proc.stdout == ""


def test_an_unknown_conv_layer_names_the_ones_there(tmp_path, small_model):
    path = save_onnx(small_model, tmp_path / "small.onnx")
    proc = run("compare", "--model", str(path), "--layers", "nope", "--json", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown conv layer(s) ['nope']" in proc.stderr and "enc0_conv1" in proc.stderr
