"""Per-layer benchmark: best TVM, best NNPACK and ONNX Runtime on each conv of the reference UNet.

Usage: python benchmarks/conv_layers.py [--trials N] [--tune edges|all] [--work-dir DIR]

Tunes at the stated budget (resuming from the work directory's database), measures every
implementation through the workbench's protocol over a local RPC cluster, runs ONNX Runtime on
the same single conv in the same run, and prints JSON: per layer the best TVM and best NNPACK
times and their ratios to ONNX Runtime (below 1.0: faster than ONNX Runtime).
"""

import argparse
import json
import sys
import time

from workbench import baselines, study
from workbench.measure import ConvCase, TimingConfig, usable
from workbench.model import reference_unet
from workbench.records import WorkDir
from workbench.rpc import open_device


def best(records, layer, library):
    rows = [r for r in usable(records) if r["layer"] == layer and r["impl"].startswith(library + ":")]
    return min(rows, key=lambda r: r["median_ms"]) if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--tune", choices=("edges", "all", "none"), default="edges")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, work, timing = reference_unet(), WorkDir.at(args.work_dir), TimingConfig()
    config = study.StudyConfig(trials=args.trials, tune=args.tune, timing=timing)
    tuned = study.tuned_layers(model, config)
    with open_device(threads=args.threads) as device:
        start = time.time()
        measured = study.measure_layers(model, device, work, config, progress=False)
        seconds = time.time() - start
    # ONNX Runtime runs after the device's session is closed: its thread pool never shares the cores.
    records, results = measured.records, measured.tuning
    rows = []
    for layer in model.convs:
        ort = baselines.onnxruntime_conv(ConvCase.from_model(model, layer), args.threads, timing)
        tvm, nnpack = best(records, layer.name, "tvm"), best(records, layer.name, "nnpack")
        rows.append({
            "layer": layer.name,
            "onnxruntime_ms": ort["median_ms"],
            "best_tvm": tvm and tvm["impl"], "best_tvm_ms": tvm and tvm["median_ms"],
            "best_nnpack": nnpack and nnpack["impl"], "best_nnpack_ms": nnpack and nnpack["median_ms"],
            "tvm_vs_onnxruntime": tvm and tvm["median_ms"] / ort["median_ms"],
            "nnpack_vs_onnxruntime": nnpack and nnpack["median_ms"] / ort["median_ms"],
        })
    total = {key: sum(r[key] for r in rows if r[key]) for key in ("onnxruntime_ms", "best_tvm_ms", "best_nnpack_ms")}
    best_of_both = sum(min(v for v in (r["best_tvm_ms"], r["best_nnpack_ms"]) if v) for r in rows)
    json.dump({
        "budget": {"trials_per_tuned_layer": args.trials, "tuned_layers": tuned, "threads": args.threads},
        "tuning_and_measuring_seconds": seconds,
        "trials_per_minute": [r.trials_per_minute for r in results],
        "layers": rows,
        "sum_ms": {**total, "best_of_both": best_of_both},
        "sum_ratio_vs_onnxruntime": {k: v / total["onnxruntime_ms"] for k, v in
                                     {**total, "best_of_both": best_of_both}.items()},
    }, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
