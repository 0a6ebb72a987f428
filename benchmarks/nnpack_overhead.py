"""Overhead of calling NNPACK through TVM: one convolution called directly, as a global function, from Relax.

Usage: python benchmarks/nnpack_overhead.py [--algorithm A] [--strategy S] [--threads N] [--repeat N]
                                            [--layer C,K,H,W,KERNEL[,STRIDE[,PAD]] ...]

Times each layer three ways in this process, in rotating blocks so machine drift hits all alike:
direct (the bridge with a preallocated output), packed (the registered TVM global function
called from Python) and relax (a Relax VM calling it through call_dps_packed, which allocates
its output). Prints one JSON row per layer: the three medians and the two overheads against
direct. Defaults to the UNet middle layers 64->64 48x48 and 128->128 24x24, 3x3 pad 1.
"""

import argparse
import json
import time
from typing import Any, Callable, Sequence

import numpy as np

from workbench import nnpack
from workbench.geometry import ConvGeometry
from workbench.nnpack_tvm import CONV2D, CONV2D_PREPACKED, register_tvm_functions, relax_vm

DEFAULT_LAYERS = (ConvGeometry.square(64, 64, 48, 48), ConvGeometry.square(128, 128, 24, 24))


def _blocked_medians(fns: dict[str, Callable[[], Any]], repeat: int, blocks: int = 10) -> dict[str, float]:
    """Median seconds per call of each function.

    Calls run in blocks (each path keeps its own kernel and tensors in cache, as in steady
    state) and the blocks rotate over the functions, so machine drift hits all alike.
    """
    per_block = max(1, repeat // blocks)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            fn()  # warm this path's data after the other paths ran
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(s)) for name, s in samples.items()}


def overhead_vs_direct(shapes: Sequence[ConvGeometry] = DEFAULT_LAYERS, *, algorithm: str = "wt8x8",
                       strategy: str = "precompute", threads: int = 1, repeat: int = 30,
                       seed: int = 0) -> list[dict[str, Any]]:
    """Median time of one convolution called three ways, and the TVM overhead, per layer.

    Registers the TVM functions for ``threads`` (replacing earlier registrations).
    """
    import tvm
    import tvm_ffi

    register_tvm_functions(threads)
    bridge = nnpack.shared_bridge(threads)
    rng = np.random.default_rng(seed)
    rows = []
    for shape in shapes:
        x = rng.standard_normal(shape.input_shape, dtype=np.float32)
        w = rng.standard_normal(shape.weight_shape, dtype=np.float32)
        b = rng.standard_normal(shape.out_channels, dtype=np.float32)
        y = np.empty(shape.output_shape, np.float32)
        if strategy == "precompute":
            tk = bridge.transform_kernel(w, shape, algorithm)
            direct = lambda: bridge.run_transformed(x, tk, b, out=y)  # noqa: E731
            name, attrs = CONV2D_PREPACKED, [*shape.pad, shape.stride, algorithm]
        else:
            direct = lambda: bridge.convolution(x, w, b, shape, algorithm=algorithm, out=y)  # noqa: E731
            name, attrs = CONV2D, [*shape.pad, shape.stride, algorithm, strategy]
        xt, wt, bt, yt = (tvm.runtime.tensor(a) for a in (x, w, b, y))
        func = tvm_ffi.get_global_func(name)
        vm = relax_vm(shape, algorithm, strategy)
        times = _blocked_medians({
            "direct": direct,
            "packed": lambda: func(xt, wt, bt, *attrs, yt),
            "relax": lambda: vm["main"](xt, wt, bt),
        }, repeat)
        rows.append({
            "shape": shape.describe(), "algorithm": algorithm, "strategy": strategy, "threads": threads,
            **{f"{k}_ms": v * 1e3 for k, v in times.items()},
            "packed_overhead_us": (times["packed"] - times["direct"]) * 1e6,
            "relax_overhead_us": (times["relax"] - times["direct"]) * 1e6,
            "relax_overhead_pct": 100 * (times["relax"] / times["direct"] - 1),
        })
    return rows


def parse_layer(text: str) -> ConvGeometry:
    """C,K,H,W,KERNEL[,STRIDE[,PAD]]: a square kernel, padded equally (default stride 1, pad 1)."""
    try:
        return ConvGeometry.square(*(int(v) for v in text.split(",")))
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{text!r}: expected C,K,H,W,KERNEL[,STRIDE[,PAD]] ({err})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", choices=list(nnpack.ALGORITHMS), default="wt8x8")
    parser.add_argument("--strategy", choices=nnpack.STRATEGIES, default="precompute")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per path and layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", dest="layers", type=parse_layer, action="append",
                        metavar="C,K,H,W,KERNEL[,STRIDE[,PAD]]",
                        help="a layer to time (repeatable); default: the UNet middle layers")
    args = parser.parse_args()
    rows = overhead_vs_direct(args.layers or DEFAULT_LAYERS, algorithm=args.algorithm, strategy=args.strategy,
                              threads=args.threads, repeat=args.repeat, seed=args.seed)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
