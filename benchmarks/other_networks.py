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
from workbench.networks import NETWORKS, network
from workbench.records import WorkDir
from workbench.rpc import open_device

GOAL, MOONSHOT = 1.0, 0.7
INT8_INPUTS = 64


def float_figures(summary: dict) -> dict:
    rows = {r["name"]: r for r in summary["end_to_end"]}
    hybrid, ort = rows["hybrid"], rows.get("onnxruntime")
    ratio = hybrid["median_ms"] / ort["median_ms"] if ort else None
    return {"hybrid_ms": hybrid["median_ms"], "hybrid_ci_ms": hybrid.get("ci_ms"),
            "peers_ms": {n: r["median_ms"] for n, r in rows.items() if n != "hybrid"},
            "hybrid_vs_onnxruntime": ratio, "goal_met": ratio is not None and ratio <= GOAL,
            "moonshot_met": ratio is not None and ratio <= MOONSHOT,
            "disturbed": [n for n, r in rows.items() if r.get("disturbed")], "numerics_ok": hybrid["numerics_ok"]}


def int8_figures(model, device, work, config, threads: int) -> dict:
    from workbench import int8_study

    return int8_study.network_int8(model, device, work, config, threads, inputs=INT8_INPUTS)


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
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        print(f"error: unknown network(s) {unknown}; choose from {', '.join(NETWORKS)}", file=sys.stderr)
        return 2
    config = study.StudyConfig.quick_run() if args.quick else study.StudyConfig()
    if args.trials is not None:
        config.trials = args.trials
    results, started = {}, time.time()
    with open_device(None, None, None, args.threads) as device:
        for name in names:
            model = network(name, args.resolution)
            work = WorkDir.at(Path(args.work_dir) / name)
            summary = study.run_study(model, device, work, config, progress=True)
            shares = families.flop_shares(model).set_index("class")["share"].round(3).to_dict()
            results[name] = {"model": model.name, "conv_flop_shares": shares, "float32": float_figures(summary)}
            if not args.no_int8:
                results[name]["int8"] = int8_figures(model, device, work, config, args.threads)
            print(json.dumps({name: results[name]}, indent=1, default=str), flush=True)
    results["_run"] = {"seconds": round(time.time() - started, 1), "quick": args.quick, "trials": config.trials,
                       "resolution": args.resolution, "threads": args.threads}
    out = Path(args.work_dir) / "other_networks.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
