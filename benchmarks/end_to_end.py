"""End-to-end benchmark: the hybrid UNet against its peers, measured interleaved in one run.

Usage: python benchmarks/end_to_end.py [--work-dir DIR] [--repeat N]

Uses the work directory of a finished `make study` (tuning databases and per-layer records;
whatever is missing is measured first), builds the hybrid and the pure-TVM model from the
records, and prints JSON with each system's median latency and the hybrid's ratio to it
(below 1.0: the hybrid is faster). Goals on 2 cores: below 1.0 against ONNX Runtime (aim
0.8, moonshot 0.45), at most 1/1.2 against NNPACK everywhere and 1/1.4 against pure TVM.

Fusion, in the same run: the hybrid's plan is also built unfused, with the original study's
groups and folded. Goals: the hybrid at most 0.85 of the same plan unfused, and at most 1.10 x
its convs' isolated times summed (what it would cost with nothing between the convs).
"""

import argparse
import json
import sys

from workbench import compare, study
from workbench.measure import TimingConfig
from workbench.model import reference_unet, sample_input
from workbench.records import WorkDir
from workbench.rpc import open_device

GOALS = {"onnxruntime": 1.0, "nnpack_everywhere": 1 / 1.2, "tvm_only": 1 / 1.4, "unfused": 0.85}
MOONSHOT = {"onnxruntime": 0.45}
ISOLATED_SUM_GOAL = 1.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, work = reference_unet(), WorkDir.at(args.work_dir)
    config = study.StudyConfig(trials=args.trials,
                               end_to_end_timing=TimingConfig(number=1, repeat=args.repeat, min_repeat_ms=100))
    with open_device(threads=args.threads) as device:
        measured = study.measure_layers(model, device, work, config, progress=False)
        plans = study.choose_plans(model, measured.all, fusion_builds=True)
        executables = study.build_models(model, plans, work, device.target)
        results = study.compare_end_to_end(model, device, executables, config, args.threads, x=sample_input(model))
        # The plan's convs alone, timed in this run too: the sum the whole model is weighed against.
        candidates = study.study_candidates(model, device, work, config)
        isolated = [compare.measure_one(model, device, conv.name, plans["hybrid"].candidate(conv.name, candidates),
                                        config.timing) for conv in model.convs]
    by_name = {r["name"]: r for r in results}
    hybrid_ms = by_name["hybrid"]["median_ms"]
    ratios = {name: hybrid_ms / r["median_ms"] for name, r in by_name.items() if name != "hybrid"}
    fusion = study.fusion_figures(results, plans["hybrid"], isolated)
    json.dump({
        "hybrid_ms": hybrid_ms,
        "numerics_ok": all(r["numerics_ok"] for r in results),
        "median_ms": {name: r["median_ms"] for name, r in by_name.items()},
        "hybrid_ratio": ratios,
        "fusion": fusion,
        "goals_met": {**{name: ratios[name] <= goal for name, goal in GOALS.items() if name in ratios},
                      "isolated_sum": (fusion.get("hybrid_vs_isolated_sum") or float("inf")) <= ISOLATED_SUM_GOAL},
        "moonshots_met": {name: ratios[name] <= goal for name, goal in MOONSHOT.items() if name in ratios},
        "plan": plans["hybrid"].to_dict(),
        "threads": args.threads,
        "repeat": args.repeat,
    }, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
