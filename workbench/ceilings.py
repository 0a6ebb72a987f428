"""Roofline ceilings measured on the device itself, through TVM RPC.

- Peak FLOP/s: a TVM kernel of independent fused multiply-adds held in vector registers, one
  chain group per core; nothing touches memory inside the loop.
- Memory bandwidth: a STREAM-style triad (c = a + s*b) over arrays far larger than any cache.
- Cross-check: a large single-precision GEMM in the device's BLAS (numpy), run on the device
  through a function the workbench server registers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from .rpc import Device, upload

log = logging.getLogger(__name__)

ACCUMULATORS = 12  # independent FMA chains: enough to hide FMA latency on two pipes
STREAM_FLOATS = 1 << 24  # 64 MiB per array, 192 MiB per triad: well past a last-level cache


@dataclass
class Ceilings:
    peak_gflops: float
    bandwidth_gbs: float
    gemm_gflops: float | None
    ridge_intensity: float  # FLOP/byte where the roofline bends
    device: dict
    threads: int
    vector_lanes: int
    peak_samples: list[float]
    bandwidth_samples: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gemm = f"{self.gemm_gflops:.1f}" if self.gemm_gflops else "n/a"
        return (f"peak {self.peak_gflops:.1f} GFLOP/s, bandwidth {self.bandwidth_gbs:.1f} GB/s, "
                f"ridge at {self.ridge_intensity:.1f} FLOP/byte, BLAS GEMM cross-check {gemm} GFLOP/s "
                f"({self.threads} threads, {self.vector_lanes} float lanes)")


def vector_lanes(target: dict) -> int:
    """float32 lanes of the widest vector unit the target names."""
    text = (str(target.get("mcpu", "")) + " " + " ".join(target.get("mattr", []))).lower()
    if "avx512" in text or any(cpu in text for cpu in ("skylake-avx512", "cascadelake", "icelake",
                                                       "sapphirerapids", "znver4", "znver5")):
        return 16
    if "arm" in str(target.get("mtriple", "")) or "aarch64" in str(target.get("mtriple", "")):
        return 4
    return 8


def peak_kernel(parallel: int, lanes: int, iterations: int):
    from tvm.script import tirx as T

    accs = ACCUMULATORS

    @T.prim_func
    def peak(a: T.Buffer((parallel, accs, lanes), "float32")):
        T.func_attr({"global_symbol": "peak", "tirx.noalias": True})
        for p in T.parallel(parallel):
            acc = T.alloc_buffer((accs, lanes), "float32", scope="local")
            for u in T.unroll(accs):
                for v in T.vectorized(lanes):
                    acc[u, v] = a[p, u, v]
            for _ in range(iterations):
                for u in T.unroll(accs):
                    for v in T.vectorized(lanes):
                        acc[u, v] = acc[u, v] * T.float32(0.999999) + T.float32(1e-6)
            for u in T.unroll(accs):
                for v in T.vectorized(lanes):
                    a[p, u, v] = acc[u, v]  # stored so the chains are not optimised away

    return peak


def triad_kernel(n: int, lanes: int):
    from tvm.script import tirx as T

    blocks = n // lanes

    @T.prim_func
    def triad(a: T.Buffer((blocks, lanes), "float32"), b: T.Buffer((blocks, lanes), "float32"),
              c: T.Buffer((blocks, lanes), "float32")):
        T.func_attr({"global_symbol": "triad", "tirx.noalias": True})
        for i in T.parallel(blocks):
            for v in T.vectorized(lanes):
                c[i, v] = a[i, v] + T.float32(3.0) * b[i, v]

    return triad


def _build(func, device: Device):
    import tvm

    return tvm.tirx.build(func, target=device.tvm_target())


def _timed(remote_module, name, dev, args, repeat, min_ms) -> list[float]:
    evaluator = remote_module.time_evaluator(name, dev, number=1, repeat=repeat, min_repeat_ms=min_ms)
    evaluator(*args)  # warm up: first touch of pages, thread pool start
    return list(evaluator(*args).results)


def measure_peak(session, device: Device, threads: int, lanes: int, repeat: int, min_ms: int) -> list[float]:
    import tvm

    iterations = 20000
    remote = upload(session, _build(peak_kernel(threads, lanes, iterations), device), "peak.so",
                    device.export_kwargs())
    dev = session.cpu(0)
    a = tvm.runtime.tensor(np.ones((threads, ACCUMULATORS, lanes), "float32"), dev)
    flops = 2.0 * threads * ACCUMULATORS * lanes * iterations
    return [flops / t / 1e9 for t in _timed(remote, "peak", dev, [a], repeat, min_ms)]


def measure_bandwidth(session, device: Device, lanes: int, repeat: int, min_ms: int,
                      n: int = STREAM_FLOATS) -> list[float]:
    import tvm

    remote = upload(session, _build(triad_kernel(n, lanes), device), "triad.so", device.export_kwargs())
    dev = session.cpu(0)
    shape = (n // lanes, lanes)
    arrays = [tvm.runtime.empty(shape, "float32", dev) for _ in range(3)]
    moved = 3.0 * 4 * n  # read a and b, write c (write-allocate traffic not counted, as in STREAM)
    return [moved / t / 1e9 for t in _timed(remote, "triad", dev, arrays, repeat, min_ms)]


def measure_gemm(session, size: int, repeat: int) -> float | None:
    try:
        gemm = session.get_function("workbench.ceilings.gemm_gflops")
    except Exception:  # a plain TVM server (no workbench) has no BLAS probe
        log.warning("device has no workbench.ceilings.gemm_gflops: skipping the GEMM cross-check")
        return None
    return float(gemm(size, repeat))


def measure_ceilings(device: Device, quick: bool = False) -> Ceilings:
    """Peak, bandwidth and the GEMM cross-check of one device, in one RPC session."""
    threads = int(device.target.get("num-cores") or 1)
    lanes = vector_lanes(device.target)
    repeat, min_ms = (3, 20) if quick else (10, 100)
    return device.run(_measure_all, device, threads, lanes, repeat, min_ms, quick)


def _measure_all(session, device: Device, threads: int, lanes: int, repeat: int, min_ms: int, quick: bool):
    log.info("measuring peak FLOP/s (%d threads, %d lanes)", threads, lanes)
    peaks = measure_peak(session, device, threads, lanes, repeat, min_ms)
    log.info("measuring memory bandwidth (triad over %d MiB)", 3 * STREAM_FLOATS * 4 >> 20)
    bandwidths = measure_bandwidth(session, device, lanes, repeat, 0)
    gemm = measure_gemm(session, 1024 if quick else 2048, repeat)
    # Ceilings are the best the device showed: slower samples are interference, not the device.
    peak, bandwidth = max(peaks), max(bandwidths)
    return Ceilings(peak, bandwidth, gemm, peak / bandwidth, device.describe(), threads, lanes, peaks, bandwidths)


# ---------------------------------------------------------------- functions registered on the device

def gemm_gflops(size: int, repeat: int) -> float:
    """Best GFLOP/s of an n x n float32 matmul in numpy's BLAS, on this (device) process."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b  # warm up
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best / 1e9


def register_device_functions() -> None:
    import tvm

    tvm.register_global_func("workbench.ceilings.gemm_gflops", gemm_gflops, override=True)
