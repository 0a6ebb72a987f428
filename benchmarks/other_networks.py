"""The other networks' benchmark: the float32 hybrid against ONNX Runtime on MobileNetV2, SqueezeNet
1.1 and ShuffleNetV2, and int8 per layer and end to end, every ratio measured in one run.

Usage: python benchmarks/other_networks.py [--work-dir DIR] [--networks a,b] [--resolution 224]
                                           [--quick | --trials N] [--no-int8]

Per network: the study (knob tuning at the budget, every implementation of every conv, the hybrid,
the peers each in its own process), then the figures. Goals on 2 cores: the float32 hybrid at
most 1.0 x ONNX Runtime (moonshot 0.7). int8: per conv, the int8 kernels' time over the float32
winner's, and end to end the quantised models' top-1 agreement with float32 on 64 random inputs
and their largest relative error. Each network's work dir resumes.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from workbench import families, study
from workbench.errors import WorkbenchError
from workbench.networks import NETWORKS, network
from workbench.records import WorkDir
from workbench.rpc import open_device

GOAL, MOONSHOT = 1.0, 0.7


def float_figures(summary: dict) -> dict:
    rows = {r["name"]: r for r in summary["end_to_end"]}
    hybrid, ort = rows["hybrid"], rows.get("onnxruntime")
    ratio = hybrid["median_ms"] / ort["median_ms"] if ort else None
    return {"hybrid_ms": hybrid["median_ms"], "hybrid_ci_ms": hybrid.get("ci_ms"),
            "peers_ms": {n: r["median_ms"] for n, r in rows.items() if n != "hybrid"},
            "hybrid_vs_onnxruntime": ratio, "goal_met": ratio is not None and ratio <= GOAL,
            "moonshot_met": ratio is not None and ratio <= MOONSHOT,
            "disturbed": [n for n, r in rows.items() if r.get("disturbed")], "numerics_ok": hybrid["numerics_ok"]}


def int8_figures(int8: dict) -> dict:
    """Per conv int8/float32 (the faster int8 kernel over the float32 winner) and each kernel's quantisation
    error; end to end each row's time, top-1 agreement with float32 (64 inputs) and largest relative error."""
    layers = [{k: row.get(k) for k in ("layer", "class", "float32_ms", "qnnpack_ms", "tvm_ms", "int8_over_float32",
                                       "qnnpack_quant_error", "tvm_quant_error")} for row in int8["layers"]]
    ratios = sorted(r["int8_over_float32"] for r in layers if r["int8_over_float32"])
    end = {r["name"]: {k: r.get(k) for k in ("median_ms", "ci_ms", "top1_agreement", "max_rel_err", "numerics_ok",
                                              "disturbed")} for r in int8["end_to_end"]}
    return {"per_conv": layers, "int8_over_float32_median": ratios[len(ratios) // 2] if ratios else None,
            "end_to_end": end}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", default="data/bench-networks")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="the quick study's budget")
    parser.add_argument("--trials", type=int, default=None, help="the knob tuner's budget per network")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-int8", action="store_true")
    args = parser.parse_args()
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    try:  # every model and setting checked before the device starts
        models = {name: network(name, args.resolution) for name in names}
        config = study.StudyConfig.quick_run() if args.quick else study.StudyConfig()
        if args.trials is not None:
            config.trials = args.trials
        config.check()
    except (WorkbenchError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config.int8 = not args.no_int8  # in the study's run: the float32 hybrid is timed beside the int8 one
    results, started = {}, time.time()
    with open_device(None, None, None, args.threads) as device:
        for name, model in models.items():
            work = WorkDir.at(Path(args.work_dir) / name)
            summary = study.run_study(model, device, work, config, progress=True)
            shares = families.flop_shares(model).set_index("class")["share"].round(3).to_dict()
            results[name] = {"model": model.name, "conv_flop_shares": shares, "float32": float_figures(summary)}
            if "int8" in summary:
                results[name]["int8"] = int8_figures(summary["int8"])
            print(json.dumps({name: results[name]}, indent=1, default=str), flush=True)
    results["_run"] = {"seconds": round(time.time() - started, 1), "quick": args.quick, "trials": config.trials,
                       "resolution": args.resolution, "threads": args.threads}
    out = Path(args.work_dir) / "other_networks.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
