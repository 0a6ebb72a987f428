"""The TVM internals the workbench relies on (workbench.tvm_compat) still behave as it assumes.

Each test exercises one of them against the installed TVM, so an upgrade that moves or changes
one fails here, by name, rather than somewhere deep in a study.
"""

import shutil
import subprocess
import time

import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx

from workbench import tvm_compat


def _double_func(n: int = 16, name: str = "double"):
    a = te.placeholder((n,), "float32", name="A")
    b = te.compute((n,), lambda i: a[i] * 2.0, name="B")
    return te.create_prim_func([a, b]).with_attr("global_symbol", name)


def test_normalize_mod_gives_a_module_whose_only_function_is_main():
    mod = tvm_compat.normalize_mod(_double_func())
    assert isinstance(mod, tvm.IRModule)
    assert [gv.name_hint for gv in mod.get_global_vars()] == ["main"]
    assert isinstance(mod["main"], tirx.PrimFunc)
    # A one-function module under another name is renamed too, and the two are one workload.
    other = tvm_compat.normalize_mod(tvm.IRModule({"double": _double_func()}))
    assert [gv.name_hint for gv in other.get_global_vars()] == ["main"]


@pytest.mark.parametrize("m", [2, 4, 6])
def test_winograd_matrices_compute_a_1d_correlation(m):
    a, b, g = tvm_compat.winograd_matrices(m, 3)
    alpha = m + 2
    assert (a.shape, b.shape, g.shape) == ((alpha, m), (alpha, alpha), (alpha, 3))
    assert a.dtype == b.dtype == g.dtype == np.float64
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, taps = rng.standard_normal(alpha), rng.standard_normal(3)
        y = a.T @ ((g @ taps) * (b.T @ d))
        np.testing.assert_allclose(y, np.correlate(d, taps, mode="valid"), rtol=1e-9, atol=1e-9)
    assert tvm_compat.winograd_matrices(m, 3)[0] is a  # cached


def test_time_global_func_times_a_registered_python_function():
    calls = []

    def sleepy(x):
        calls.append(x)
        time.sleep(0.002)

    name = "workbench.test.sleepy"
    tvm.register_global_func(name, sleepy, override=True)
    seconds = tvm_compat.time_global_func(name, 2, 3, 0, 7)
    assert len(seconds) == 3 and all(isinstance(s, float) for s in seconds)
    assert all(0.002 <= s < 1.0 for s in seconds), seconds  # per call, not per repeat
    assert calls and set(calls) == {7}
    assert len(calls) == 1 + 2 * 3  # one warm-up call, then number x repeat


def _annotated(mod):
    return relax.transform.AnnotateTIROpPattern()(mod)


def test_opaque_is_the_pattern_tvm_gives_unanalysable_kernels():
    a = te.placeholder((8,), "float32", name="A")
    ext = te.extern((8,), [a], lambda ins, outs: tirx.call_extern("int32", "foo", ins[0].data, outs[0].data),
                    name="ext")
    mod = _annotated(tvm.IRModule({"ext": te.create_prim_func([a, ext])}))
    assert int(mod["ext"].attrs["op_pattern"]) == tvm_compat.OPAQUE


def _add_then_relu(op_pattern):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = te.placeholder((8,), "float32", name="A")
            func = te.create_prim_func([a, te.compute((8,), lambda i: a[i] + 1.0, name="add")])
            if op_pattern is not None:
                func = func.with_attr("op_pattern", op_pattern)
            gv = bb.add_func(func, "add_one")
            y = bb.emit(relax.call_tir(gv, [x], relax.TensorType((8,), "float32")))
            out = bb.emit_output(bb.emit_te(lambda t: te.compute((8,), lambda i: te.max(t[i], 0.0), name="relu"), y))
        bb.emit_func_output(out)
    return bb.get()


def test_a_kernel_marked_opaque_is_left_whole_by_fusion():
    def fused(mod):
        mod = relax.transform.FuseOps()(_annotated(mod))
        return [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith("fused_")]

    assert fused(_add_then_relu(None)), "an unmarked elementwise kernel should fuse with its ReLU"
    marked = _add_then_relu(tvm_compat.OPAQUE)
    assert int(_annotated(marked)["add_one"].attrs["op_pattern"]) == tvm_compat.OPAQUE  # kept, not re-derived
    assert fused(marked) == []


def test_tuning_history_reads_back_what_a_json_database_wrote(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    mod = tvm_compat.normalize_mod(_double_func(16))
    other = tvm_compat.normalize_mod(_double_func(32))
    shash, other_shash = tvm_compat.workload_hash(database, mod), tvm_compat.workload_hash(database, other)
    assert isinstance(shash, str) and shash != other_shash
    assert tvm_compat.workload_hash(database, mod) == shash  # committing again finds the same workload

    target = tvm.target.Target("llvm")

    def commit(module, run_secs):
        workload = database.commit_workload(module)
        trace = tvm.s_tir.Schedule(module).trace
        args = ms.arg_info.ArgInfo.from_prim_func(module["main"])
        database.commit_tuning_record(ms.database.TuningRecord(trace, workload, run_secs, target, args))

    measured = [[3e-3, 3.2e-3], [tvm_compat.FAILED_RUN_SECONDS], [1e-3, 1.1e-3]]
    commit(mod, measured[0])
    commit(other, [5e-3])
    commit(mod, measured[1])
    commit(mod, measured[2])

    history = tvm_compat.tuning_history(tmp_path, shash)
    assert history == [pytest.approx(secs) for secs in measured]  # measurement order, not sorted
    assert tvm_compat.tuning_history(tmp_path, other_shash) == [pytest.approx([5e-3])]
    assert tvm_compat.tuning_history(tmp_path / "never-tuned", shash) == []
    # The files agree with what the database itself holds for the workload.
    workload = database.commit_workload(mod)
    stored = [[float(s) for s in r.run_secs] for r in database.get_all_tuning_records() if r.workload.same_as(workload)]
    assert sorted(stored) == [pytest.approx(secs) for secs in sorted(measured)]


def test_cross_compiler_is_an_export_library_fcompile():
    fcompile = tvm_compat.cross_compiler("aarch64-linux-gnu-g++")
    assert callable(fcompile)
    assert fcompile.output_format == "so"


def test_host_cpu_names_a_cpu_llvm_builds_for():
    cpu = tvm_compat.host_cpu()
    assert isinstance(cpu, str) and cpu
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    assert str(target.attrs["mcpu"]) == cpu
    lib = tvm.compile(tvm.IRModule({"double": _double_func()}), target=target)
    x = tvm.runtime.tensor(np.arange(16, dtype="float32"))
    y = tvm.runtime.tensor(np.zeros(16, dtype="float32"))
    lib["double"](x, y)
    np.testing.assert_array_equal(y.numpy(), 2 * np.arange(16, dtype="float32"))


@pytest.mark.parametrize("preset, machine", [("aarch64", "ARM aarch64"), ("armv7", "ARM, EABI5")])
def test_a_kernel_cross_compiles_and_links_for_the_board_presets(preset, machine, tmp_path):
    from workbench.rpc import CROSS_COMPILERS, TARGET_PRESETS, Device

    compiler = CROSS_COMPILERS[preset]
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not on PATH (Debian/Ubuntu: apt-get install g++-{compiler.removesuffix('-g++')})")
    device = Device("127.0.0.1", 9190, target=dict(TARGET_PRESETS[preset]), cross_compiler=compiler)
    lib = tvm.compile(tvm.IRModule({"double": _double_func()}), target=device.tvm_target())
    path = tmp_path / f"double-{preset}.so"
    lib.export_library(str(path), **device.export_kwargs())
    assert path.stat().st_size > 0
    if shutil.which("file"):
        kind = subprocess.run(["file", "-b", str(path)], capture_output=True, text=True, check=True).stdout
        assert "shared object" in kind and machine in kind, kind


# ---------------------------------------------------------------- RPC internals

def _tracker():
    from tvm.rpc.tracker import Tracker

    return Tracker(host="127.0.0.1", port=19190, port_end=19290, silent=True)


def _within(seconds: float, work):
    """Run work() in a thread; its result, or a failure if it is still running after `seconds`."""
    import threading

    box = {}
    thread = threading.Thread(target=lambda: box.update(result=_catch(work)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds}s"
    return box["result"]


def _catch(work):
    try:
        return work()
    except Exception as err:  # noqa: BLE001 - the test inspects it
        return err


def test_a_bounded_tracker_socket_ends_a_request_nobody_serves():
    tracker = _tracker()
    try:
        session = tvm.rpc.connect_tracker("127.0.0.1", tracker.port)
        tvm_compat.bound_tracker_socket(session, 1.0)
        started = time.monotonic()
        # Unbounded, TVM's client waits for a server of this key forever.
        outcome = _within(20, lambda: session.request("nobody-serves-this", max_retry=1))
        assert isinstance(outcome, Exception)
        assert time.monotonic() - started < 15
    finally:
        tracker.terminate()


# The main thread sleeps rather than reads stdin: a session process forked while another thread
# holds stdin's lock would deadlock closing it.
_LISTENER = """
import socket, threading, time, tvm
from workbench import tvm_compat
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(1)
threading.Thread(target=tvm_compat.listen_loop, args=(sock, sock.getsockname()[1], "compat", None), daemon=True).start()
print(sock.getsockname()[1], flush=True)
time.sleep(120)
"""


def test_listen_loop_serves_a_session_on_a_bound_socket():
    import os
    import signal
    import sys

    server = subprocess.Popen([sys.executable, "-c", _LISTENER], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        port = int(_within(60, server.stdout.readline))
        session = tvm.rpc.connect("127.0.0.1", port, key="compat", session_timeout=30)
        assert session.get_function("tvm.rpc.server.workpath")("x").endswith("x")  # a real round trip
        del session
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)


def test_the_popen_pool_starts_its_workers_through_the_subprocess_given():
    import os

    from tvm.support.popen_pool import PopenWorker

    original = tvm_compat.popen_pool_subprocess()
    calls = []

    class Recording:
        def __getattr__(self, name):
            return getattr(original, name)

        def Popen(self, *args, **kwargs):  # noqa: N802
            calls.append(args)
            return original.Popen(*args, **kwargs)

    tvm_compat.set_popen_pool_subprocess(Recording())
    worker = PopenWorker()
    try:
        worker.send(os.getpid)
        assert worker.recv() != os.getpid()
        assert calls, "the popen pool did not start its worker through the subprocess given"
    finally:
        worker.kill()
        tvm_compat.set_popen_pool_subprocess(original)


def test_the_tracker_handler_serves_a_socket_and_reports_a_summary():
    import inspect

    cls = tvm_compat.tracker_handler_class()
    assert list(inspect.signature(cls.__init__).parameters) == ["self", "sock", "stop_key"]
    assert callable(cls.run) and callable(cls.summary)
