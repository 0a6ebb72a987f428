"""Every TVM internal the workbench relies on, in one place.

TVM's public API does not cover everything the workbench needs: MetaSchedule's module
normalisation, TOPI's Winograd matrices, the time evaluator of a global function, the
op-pattern code that keeps a kernel out of fusion, the layout of MetaSchedule's JSON
database files, and the RPC pieces the workbench hardens (the tracker's handler and client
socket, the server's listen loop, the popen pool's `subprocess`) are private or undocumented, and some public helpers moved between releases
(`tvm.contrib.cc` became `tvm.support.cc` by 0.27). Other modules call the functions here
instead of reaching into TVM, so a TVM upgrade breaks here first, and tests/test_tvm_compat.py
says which one broke.

Written against apache-tvm 0.27 (`tvm.tirx`, `tvm.s_tir`).
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import numpy as np

__all__ = [
    "FAILED_RUN_SECONDS",
    "OPAQUE",
    "bound_tracker_socket",
    "cross_compiler",
    "host_cpu",
    "listen_loop",
    "normalize_mod",
    "popen_pool_subprocess",
    "set_popen_pool_subprocess",
    "time_global_func",
    "tracker_handler_class",
    "tuning_history",
    "winograd_matrices",
    "workload_hash",
]

# relax.OpPatternKind.kOpaque (include/tvm/relax/op_attr_types.h). TVM 0.27 does not expose
# the enum to Python (its own frontends write the literal 8 too), so the value is pinned by a
# test: AnnotateTIROpPattern gives it to a kernel it cannot analyse, and FuseOps leaves a
# kernel carrying it in its "op_pattern" attribute unfused.
OPAQUE = 8

# MetaSchedule records a failed build or run as this many seconds per repeat.
FAILED_RUN_SECONDS = 1e10


def normalize_mod(func_or_mod):
    """The IRModule MetaSchedule tunes and keys its database on for a PrimFunc or IRModule.

    A PrimFunc becomes the function "main" of a new module (marked `tirx.noalias`); a module
    with a single function has it renamed "main". This is what `ms.tune_tir` and the database
    do internally, so records committed for the result match what tuning stores.
    """
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func_or_mod)


@functools.cache
def winograd_matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TOPI's Winograd F(m, r) matrices as float64 arrays: A (alpha x m), B (alpha x alpha), G (alpha x r).

    alpha = m + r - 1. A 1-D correlation of an alpha-long tile d with an r-tap filter g is
    A^T [(G g) * (B^T d)]; the 2-D form is Y = A^T [(G g G^T) * (B^T d B)] A. The points are
    TOPI's interpolation points (Barabasz et al.), the ones TOPI's Winograd schedules use.
    Cached: callers get the same arrays each time and must not modify them.
    """
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    a, b, g = _cook_toom_convolution(_interpolation_points(m + r - 2), m, r)
    return np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(g, np.float64)


def time_global_func(name: str, number: int, repeat: int, min_repeat_ms: int, *args) -> list[float]:
    """Seconds per call, one value per repeat, of the global function `name` in this process.

    TVM's time evaluator calls `name(*args)` once to warm up, then `repeat` times averages
    `number` calls (raising `number` until one repeat lasts `min_repeat_ms`). It runs on the
    CPU of the process that calls this, so on an RPC server call it there (the remote evaluator
    of a global function returns bytes, which RPC cannot carry back).
    """
    import tvm

    evaluator = tvm.get_global_func("runtime.RPCTimeEvaluator")(
        None,            # no module: look `name` up among the global functions
        name,
        1, 0,            # device: kDLCPU, index 0
        number, repeat, min_repeat_ms,
        0,               # limit_zero_time_iterations: off
        0, 1,            # cooldown_interval_ms, repeats_to_cooldown: no cooldown
        0,               # cache_flush_bytes: no flush
        "",              # f_preproc: none
    )
    blob = evaluator(*args)
    return list(struct.unpack("@" + "d" * repeat, bytes(blob)))


def workload_hash(database, mod) -> str:
    """The structural hash under which a MetaSchedule database files `mod` (committing it if new).

    It is the first field of the workload's line in database_workload.json, so it ties the
    records in database_tuning_record.json to this workload (see tuning_history).
    """
    return str(database.commit_workload(mod).as_json()[0])


def tuning_history(directory, workload_hash: str) -> list[list[float]]:
    """run_secs of every record of one workload, in measurement order, from a JSONDatabase's files.

    The database API returns records sorted by time; the files keep the order they were
    measured in, which a tuning curve needs. `directory` holds database_workload.json (one line
    `[shash, module]` per workload) and database_tuning_record.json (one line
    `[workload_index, record]` per measurement, where record[1] is run_secs and the index is
    the workload's line number). A failed build or run has FAILED_RUN_SECONDS in run_secs.
    Missing files mean nothing was tuned: [].
    """
    directory = Path(directory)
    workloads, records = directory / "database_workload.json", directory / "database_tuning_record.json"
    if not workloads.exists() or not records.exists():
        return []
    with open(workloads) as lines:
        indices = {i for i, line in enumerate(lines) if line.strip() and json.loads(line)[0] == workload_hash}
    history = []
    with open(records) as lines:
        for line in lines:
            if not line.strip():
                continue
            index, record = json.loads(line)
            if index in indices:
                history.append([float(s) for s in (record[1] or [])])
    return history


def cross_compiler(compiler_name: str):
    """An `fcompile` for Module.export_library that links with another ISA's g++.

    e.g. `lib.export_library("k.so", fcompile=cross_compiler("aarch64-linux-gnu-g++"))`.
    The result carries `output_format` ("so") as export_library expects.
    """
    from tvm.support import cc  # tvm.contrib.cc before TVM 0.27

    return cc.cross_compiler(compiler_name)


@functools.cache
def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver4", "cortex-a72"), for a target's mcpu.

    "generic" (which every LLVM backend accepts) if TVM was built without LLVM or cannot tell.
    """
    try:
        from tvm.target import codegen

        name = str(codegen.llvm_get_system_cpu())
    except Exception:  # noqa: BLE001  (no LLVM, or the query missing in this TVM)
        return "generic"
    return name or "generic"


# ---------------------------------------------------------------- RPC internals

def bound_tracker_socket(tracker, seconds: float) -> None:
    """Give a TrackerSession's socket a timeout (TVM gives it none, so a request for a key whose
    server died waits forever). TrackerSession._sock is private."""
    sock = getattr(tracker, "_sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def listen_loop(sock, port: int, key: str, tracker_addr) -> None:
    """TVM's RPC server loop on a bound socket, registering at `tracker_addr` (None: no tracker):
    accepts a client, forks a session process, waits for it, re-registers. Returns only by
    raising (a session process that died abnormally ends it). tvm.rpc.server._listen_loop is
    private; the last two arguments (load_library, custom_addr) are unused here."""
    from tvm.rpc import server

    server._listen_loop(sock, port, key, tracker_addr, None, None)


def tracker_handler_class():
    """The class that serves TVM's tracker on a listening socket: `cls(sock, stop_key).run()`,
    with a `summary()` method that subclasses may override (tvm.rpc.tracker, undocumented)."""
    from tvm.rpc.tracker import TrackerServerHandler

    return TrackerServerHandler


def popen_pool_subprocess():
    """The `subprocess` module TVM's popen pool starts its workers with."""
    from tvm.support import popen_pool

    return popen_pool.subprocess


def set_popen_pool_subprocess(module) -> None:
    """Make TVM's popen pool (MetaSchedule's builder and runner, the RPC server) start its workers
    with `module.Popen`; rebinds the name inside tvm.support.popen_pool only."""
    from tvm.support import popen_pool

    popen_pool.subprocess = module
