"""The emulated aarch64 board, driven by the README's own commands through a real tracker.

The board is `python -m workbench board --emulate aarch64` (qemu-user, an arm64 Debian Python,
PyPI's aarch64 wheels): TVM kernels are cross-compiled here and run there, NNPACK's algorithms run
there, and every result is checked against the reference and labelled emulated. Skipped only
where emulation is impossible here (no qemu-user, or binfmt_misc that this process cannot set up).
"""

import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from processes import group_alive
from workbench import board
from workbench.rpc import free_port

ROOT = Path(__file__).resolve().parents[1]
REGISTER_TIMEOUT = 900  # a cold set-up downloads about 1 GB of wheels; a warm start takes ~30 s
RUN_TIMEOUT = 600



def readme_commands() -> list[list[str]]:
    """The `python -m workbench...` lines of the README's board block, as argument lists."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- board-commands -->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README has no board-commands block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.startswith("python -m workbench")]


def command(role: str, port: int) -> list[str]:
    """The README's command for `role` (tracker, board, ceilings, compare, fp16), on a free port, run by this Python."""
    roles = {"tracker": "workbench.tracker", "board": "board", "ceilings": "ceilings", "compare": "compare",
             "fp16": "fp16"}
    for argv in readme_commands():
        if (argv[3] if argv[2] == "workbench" else argv[2]) == roles[role]:
            line = " ".join(argv).replace("9190", str(port))
            return [sys.executable, *shlex.split(line)[1:]]
    raise AssertionError(f"README's board block has no {role} command")


def _start(argv, env, log):
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def _end(proc, grace=30):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """A tracker and the emulated board, started as the README says; ended (and checked gone) after."""
    from workbench.rpc import Device

    why = board.emulation_unavailable()
    if why:
        pytest.skip(f"no emulated board here: {why}")
    logs = tmp_path_factory.mktemp("board")
    port = free_port()
    env = {**os.environ, "WORKBENCH_RPC_KEY": f"board-{secrets.token_hex(8)}", "PYTHONPATH": str(ROOT)}
    board_log = logs / "board.log"
    board_argv = command("board", port) + ["--port", str(free_port())]
    tracker = _start(command("tracker", port), env, open(logs / "tracker.log", "w"))
    started = time.monotonic()
    emulator = None
    try:
        emulator = _start(board_argv, env, open(board_log, "w"))
        device = Device("127.0.0.1", port, env["WORKBENCH_RPC_KEY"])
        while not device.alive(wait=2):
            assert emulator.poll() is None, f"the board exited:\n{board_log.read_text()[-3000:]}"
            assert time.monotonic() - started < REGISTER_TIMEOUT, board_log.read_text()[-3000:]
            time.sleep(2)
        print(f"emulated board registered after {time.monotonic() - started:.0f} s")
        yield {"port": port, "env": env, "log": board_log, "proc": emulator, "logs": logs}
    finally:
        code = _end(emulator) if emulator else None
        _end(tracker)
    assert code == 0, board_log.read_text()[-3000:]  # Ctrl-C/SIGTERM is the board's normal end
    assert "board: stopped" in board_log.read_text()
    assert not group_alive(emulator.pid), "the emulated server outlived the board"


def _run(argv, env, timeout=RUN_TIMEOUT):
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_the_board_was_set_up_and_logged_its_steps(emulated):
    assert board.EmulatedBoard("aarch64").ready()  # cached: the next start sets nothing up
    deadline = time.monotonic() + 60  # the board sees its server registered a poll after the tracker does
    while "serving aarch64 (emulated)" not in emulated["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    text = emulated["log"].read_text()
    assert "board: set up in" in text and "serving aarch64 (emulated)" in text


def test_ceilings_on_the_emulated_board(emulated):
    result = _run(command("ceilings", emulated["port"]) + ["--quick"], emulated["env"])
    assert result["device"]["machine"] == "aarch64"
    assert result["device"]["emulated"] is True and "qemu" in result["device"]["emulation"]
    assert result["peak_gflops"] > 0 and result["bandwidth_gbs"] > 0


def test_compare_on_the_emulated_board(emulated, small_model, tmp_path):
    from workbench.model import save_onnx
    from workbench.records import RecordStore

    path = save_onnx(small_model, tmp_path / "small.onnx")
    layers = [small_model.convs[0].name, small_model.convs[3].name]
    work = tmp_path / "work"
    argv = command("compare", emulated["port"]) + ["--model", str(path), "--layers", ",".join(layers), "--quick",
                                                   "--work-dir", str(work)]
    rows = _run(argv, emulated["env"])
    assert {r["layer"] for r in rows} == set(layers)
    ok = [r for r in rows if r["status"] == "ok"]
    # NNPACK's algorithms ran on the board, TVM's kernels were cross-compiled here and ran there.
    assert any(r["impl"].startswith("nnpack:wt8x8") for r in ok) and any(r["impl"] == "tvm:default" for r in ok)
    assert all(r["numerics_ok"] for r in ok)  # checked against the reference before timing
    assert all(r["status"] in ("ok", "wrong", "not_applicable") for r in rows), rows
    assert all(r["emulated"] is True and r["server"] for r in rows)
    records = RecordStore(work / "results" / "records.jsonl").read("conv_measurement")
    assert records and all(r["emulated"] is True and r["device"]["machine"] == "aarch64" for r in records)


def test_the_hybrid_built_for_aarch64_runs_on_the_board(emulated, small_model):
    from workbench import hybrid
    from workbench.build import build_hybrid, compile_hybrid
    from workbench.kernels.registry import all_candidates
    from workbench.measure import TimingConfig
    from workbench.model import reference_output, sample_input
    from workbench.plan import Plan
    from workbench.rpc import open_device

    middle = {c.name: "nnpack:wt8x8:precompute" for c in small_model.convs[2:-2]}
    plan = Plan.uniform(small_model, "tvm:default", overrides=middle)
    with open_device(f"127.0.0.1:{emulated['port']}", emulated["env"]["WORKBENCH_RPC_KEY"], "aarch64") as device:
        assert device.emulated and device.cross_compiler == "aarch64-linux-gnu-g++"
        executable = compile_hybrid(build_hybrid(small_model, plan, device.target, all_candidates()))
        x = sample_input(small_model)
        result = hybrid.run_remote(device, executable, x, reference=reference_output(small_model, x),
                                   timing=TimingConfig.quick())
    assert result["numerics_ok"], result["rel_err"]
    assert result["nnpack_profile"].get("run")  # NNPACK ran on the board, inside the model
    assert result["median_ms"] > 0


def test_fp16_winograd_really_stores_fp16_on_the_board(emulated, tmp_path):
    """On aarch64, NNPACK's wt8x8_fp16 is no alias of wt8x8: measured on the board through the
    protocol, its error against float64 is far above wt8x8's and below its tolerance, the library
    agrees, every row is labelled emulated, and the report says what FP16 adds."""
    from workbench import nnpack
    from workbench.records import RecordStore
    from workbench.report import fp16_section

    work = tmp_path / "work"
    argv = command("fp16", emulated["port"]) + ["--layers", "enc0_conv2", "--work-dir", str(work)]
    started = time.monotonic()
    rows = _run(argv, emulated["env"])
    print(f"fp16 on one layer of the board: {time.monotonic() - started:.0f} s")
    by = {r["algorithm"]: r for r in rows}
    assert sorted(by) == ["wt8x8", "wt8x8_fp16"] and {r["layer"] for r in rows} == {"enc0_conv2"}
    assert all(r["emulated"] is True and r["machine"] == "aarch64" for r in rows)
    fp32, fp16 = by["wt8x8"], by["wt8x8_fp16"]
    assert fp16["fp16_really_used"] is True and fp16["library_says_fp16"] is True
    assert fp16["rel_err"] > 100 * fp32["rel_err"]  # FP16 storage: about 1e-2 against wt8x8's 1e-5
    assert fp16["rel_err"] < sum(nnpack.TOLERANCE["wt8x8_fp16"]) and fp16["status"] == "ok" and fp16["numerics_ok"]
    assert fp16["added_rel_err"] == pytest.approx(fp16["rel_err"] - fp32["rel_err"])
    store = RecordStore(work / "results" / "records.jsonl")
    measured = store.read("conv_measurement")  # the protocol's records: no alias on this board
    assert len(measured) == 2 and all(r["emulated"] is True and not r["alias_of"] for r in measured)
    text = fp16_section(store.read("fp16_numerics")).parts[0]
    assert text.startswith("FP16 Winograd on aarch64 (emulated") and "adds" in text
    assert text.endswith("Emulated timings not shown as speed.")


def test_a_board_killed_outright_leaves_nothing_behind(emulated):
    """SIGKILL gives the board no chance to clean up: its emulated server notices and ends its group."""
    import psutil

    from workbench.rpc import Device

    env = {**emulated["env"], "WORKBENCH_RPC_KEY": f"board-{secrets.token_hex(8)}"}
    log = emulated["logs"] / "killed.log"
    proc = _start(command("board", emulated["port"]) + ["--port", str(free_port())], env, open(log, "w"))
    try:
        device = Device("127.0.0.1", emulated["port"], env["WORKBENCH_RPC_KEY"])
        deadline = time.monotonic() + REGISTER_TIMEOUT
        while not device.alive(wait=2):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        server = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert server, "the board started no server"
        server_group = os.getpgid(server[0])
        assert server_group != proc.pid  # its own group, ended whole
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30
        while group_alive(server_group) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert group_alive(server_group) == []
    finally:
        _end(proc)


# ---------------------------------------------------------------- without emulation

def test_the_board_refuses_what_it_cannot_emulate_in_one_line(tmp_path):
    with pytest.raises(board.BoardError, match="armv7.*README"):
        board.EmulatedBoard("armv7")
    done = subprocess.run([sys.executable, "-m", "workbench", "board", "--emulate", "aarch64", "--tracker",
                           "127.0.0.1:1"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "WORKBENCH_CACHE": str(tmp_path)})
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())  # a wrong tracker fails before minutes of set-up


def test_the_set_up_follows_the_pins_and_a_cortex_a72():
    pins = board.pinned_versions()
    assert pins["apache-tvm"] == "0.27.0.post1" and pins["torch"] == "2.13.0"
    info = board.cortex_a72_cpuinfo(2)
    assert info.count("processor\t:") == 2 and "CPU part\t: 0xd08" in info and "asimd" in info


def test_reports_name_the_device_and_mark_emulation(tmp_path):
    import plotly.graph_objects as go

    from workbench.report import Section, device_line, write_report

    device = {"tracker": "127.0.0.1:9190", "key": "rpi", "machine": "aarch64", "emulated": True,
              "emulation": "qemu-aarch64-static", "target": {"mtriple": "aarch64-linux-gnu", "num-cores": 2}}
    assert "EMULATED" in device_line(device) and "rpi" in device_line(device)
    assert "EMULATED" not in device_line({**device, "emulated": False})
    figure = go.Figure(layout=dict(title="Roofline"))
    page = write_report(tmp_path / "r.html", "study", [Section("one", [figure])], device=device).read_text()
    assert page.count("EMULATED") == 2  # the header and the figure
    assert figure.layout.title.text == "Roofline"  # the caller's figure is left as it was


def test_fp16_alias_logic_follows_the_device_cpu_not_the_host():
    from workbench import nnpack
    from workbench.kernels.nnpack import NNPACKCandidate

    assert nnpack.runs_as("wt8x8_fp16", "aarch64") == "wt8x8_fp16"  # measured on the board (test above)
    assert nnpack.runs_as("wt8x8_fp16", "x86_64") == "wt8x8"
    on_board, on_x86 = NNPACKCandidate("wt8x8_fp16", "compute", 2, "aarch64"), NNPACKCandidate("wt8x8_fp16", "compute")
    assert on_board.alias_of is None and on_board.tolerance == sum(nnpack.TOLERANCE["wt8x8_fp16"])
    if nnpack.runs_as("wt8x8_fp16") == "wt8x8":  # this host (x86): the alias is held to wt8x8's bound
        assert on_x86.alias_of == "nnpack:wt8x8:compute" and on_x86.tolerance == sum(nnpack.TOLERANCE["wt8x8"])


def test_a_plan_never_chooses_fp16_winograd_however_fast(small_model):
    """Its error (about 2e-2 on ARM) is beyond the whole model's bound: shown, measured, never in a plan."""
    from workbench.plan import PLAN_MAX_REL_ERR, choose_plan

    layer = small_model.convs[2].name
    def record(impl, ms, rel_err):
        return {"layer": layer, "impl": impl, "status": "ok", "numerics_ok": True, "median_ms": ms, "rel_err": rel_err}
    fp16, fp32 = record("nnpack:wt8x8_fp16:compute", 0.5, 2e-2), record("nnpack:wt8x8:compute", 1.0, 1e-5)
    assert fp16["rel_err"] > PLAN_MAX_REL_ERR
    assert choose_plan(small_model, [fp16, fp32], fuse=False).impl(layer) == "nnpack:wt8x8:compute"
    assert choose_plan(small_model, [{**fp16, "rel_err": 1e-5}, fp32], fuse=False).impl(layer) == fp16["impl"]


def test_the_fp16_section_keeps_the_latest_run_and_says_when_one_failed():
    from workbench.report import fp16_section

    def row(algorithm, rel_err, really, status="ok"):
        return {"layer": "c", "shape": "16->16 24x24", "algorithm": algorithm, "rel_err": rel_err, "status": status,
                "note": "", "machine": "aarch64", "emulated": False, "fp16_really_used": really,
                "added_rel_err": None if rel_err is None or algorithm == "wt8x8" else rel_err - 1e-5,
                "ratio_to_wt8x8": None, "library_says_fp16": True, "library_reason": "every ARM64 CPU"}
    old = [row("wt8x8", 1e-5, False), row("wt8x8_fp16", None, None, "failed")]
    new = [row("wt8x8", 1e-5, False), row("wt8x8_fp16", 2e-2, True)]
    assert fp16_section(old).parts[0] == "FP16 Winograd on aarch64: not measured (a run failed); see the records."
    text = fp16_section(old + new).parts[0]  # a board, not emulated: no emulation caveat
    assert text.startswith("FP16 Winograd on aarch64: adds 0.02 relative error over wt8x8") and "Emulated" not in text
    assert len(fp16_section(old + new).parts[1]) == 2  # one row per algorithm: the latest run's


def test_fp16_refuses_a_conv_winograd_cannot_run_in_one_line(tmp_path):
    from workbench.model import Model, conv_layer, random_params, save_onnx

    layer = conv_layer("pointwise", "input", (1, 8, 12, 12), 8, kernel=1, pad=0)
    path = save_onnx(Model("pointwise", [layer], random_params([layer]), (1, 8, 12, 12)), tmp_path / "p.onnx")
    for extra in (["--model", str(path), "--layers", "pointwise"], ["--model", str(path)], ["--layers", "nope"]):
        done = subprocess.run([sys.executable, "-m", "workbench", "fp16", *extra, "--work-dir", str(tmp_path / "w")],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert ("3x3 stride-1" in done.stderr) != (extra[-1] == "nope")
    assert not (tmp_path / "w").exists()  # refused before a device or a work dir was touched


def test_missing_qemu_is_named_with_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-aarch64-static on it
    why = board.emulation_unavailable()
    assert why and "qemu-aarch64-static is not installed" in why and "apt-get install qemu-user-static" in why
    with pytest.raises(board.BoardError, match="make system-deps"):
        board.ensure_binfmt()


def test_a_set_up_step_past_its_time_ends_with_its_helpers(tmp_path):
    marker = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {marker}; wait"
    started = time.monotonic()
    with pytest.raises(board.BoardError, match="did not finish within 1 s; fetching"):
        board._run(["sh", "-c", script], 1, "fetching")
    assert time.monotonic() - started < 10
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while _pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(child)  # the step's own helper (apt's or pip's, say) was ended too


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purpose
        return stat.read().split()[2] != "Z"
