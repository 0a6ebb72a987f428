"""End-to-end benchmark: the hybrid UNet against its peers, measured interleaved in one run.

Usage: python benchmarks/end_to_end.py [--work-dir DIR] [--repeat N]

Uses the work directory of a finished `make study` (tuning databases and per-layer records;
whatever is missing is measured first), builds the hybrid and the pure-TVM model from the
records, and prints JSON with each system's median latency and the hybrid's ratio to it
(below 1.0: the hybrid is faster). Goals on 2 cores: below 1.0 against ONNX Runtime (aim
0.8, moonshot 0.45), at most 1/1.2 against NNPACK everywhere and 1/1.4 against pure TVM.

Tuning, in the same run: the study's default budget (the knob tuner over every conv) is spent
first (resuming), and each conv of the hybrid's plan is timed alone. Goals: every conv at 350
or more direct-equivalent GFLOP/s, the five few-channel, large-image convs together at most
0.6 ms; the hybrid at 0.45 x ONNX Runtime is the moonshot (each runtime timed in its own
process). Its wall time is reported against make study's 15 minutes.

Fusion, in the same run: the hybrid's plan is also built unfused, with the original study's
groups and folded. Goals: the hybrid at most 0.85 of the same plan unfused, and at most 1.10 x
its convs' isolated times summed (what it would cost with nothing between the convs).
"""

import argparse
import json
import sys
import time

from workbench import compare, study
from workbench.measure import TimingConfig
from workbench.model import reference_unet, sample_input
from workbench.records import WorkDir
from workbench.rpc import open_device

GOALS = {"onnxruntime": 1.0, "nnpack_everywhere": 1 / 1.2, "tvm_only": 1 / 1.4, "unfused": 0.85}
MOONSHOT = {"onnxruntime": 0.45}
ISOLATED_SUM_GOAL = 1.10
CONV_GFLOPS_GOAL = 350.0
EDGE_CONVS = ("enc0_conv1", "enc0_conv2", "dec0_reduce", "dec0_conv", "head_conv")
EDGE_SUM_GOAL_MS = 0.6
STUDY_SECONDS_GOAL = 15 * 60


def conv_figures(isolated: list[dict]) -> dict:
    """Each conv alone with the plan's implementation: ms and direct-equivalent GFLOP/s, the slowest
    conv's GFLOP/s, and the five edge convs' summed time."""
    convs = {r["layer"]: {"impl": r["impl"], "ms": r["median_ms"], "gflops": r["gflops"]} for r in isolated}
    edges = [convs[name]["ms"] for name in EDGE_CONVS if name in convs and convs[name]["ms"]]
    slowest = min((c["gflops"] or 0.0 for c in convs.values()), default=0.0)
    return {"per_conv": convs, "slowest_gflops": slowest,
            "edge_sum_ms": sum(edges) if len(edges) == len(EDGE_CONVS) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--trials", type=int, default=None, help="the tuning budget (default: the study's)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, work = reference_unet(), WorkDir.at(args.work_dir)
    config = study.StudyConfig(end_to_end_timing=TimingConfig(number=1, repeat=args.repeat, min_repeat_ms=100))
    if args.trials is not None:
        config.trials = args.trials
    started = time.time()
    with open_device(threads=args.threads) as device:
        measured = study.measure_layers(model, device, work, config, progress=False)
        layers_seconds = time.time() - started
        candidates = study.study_candidates(model, device, work, config)
        plans = study.choose_plans(model, measured.all, fusion_builds=True, candidates=candidates)
        executables = study.build_models(model, plans, work, device.target)
        results = study.compare_end_to_end(model, device, executables, config, args.threads, x=sample_input(model))
        # The plan's convs alone, timed in this run too: the sum the whole model is weighed against.
        isolated = [compare.measure_one(model, device, conv.name, plans["hybrid"].candidate(conv.name, candidates),
                                        config.timing) for conv in model.convs]
    by_name = {r["name"]: r for r in results}
    hybrid_ms = by_name["hybrid"]["median_ms"]
    ratios = {name: hybrid_ms / r["median_ms"] for name, r in by_name.items() if name != "hybrid"}
    fusion = study.fusion_figures(results, plans["hybrid"], isolated)
    convs = conv_figures(isolated)
    json.dump({
        "hybrid_ms": hybrid_ms,
        "numerics_ok": all(r["numerics_ok"] for r in results),
        "median_ms": {name: r["median_ms"] for name, r in by_name.items()},
        "hybrid_ratio": ratios,
        "fusion": fusion,
        "convs": convs,
        "goals_met": {**{name: ratios[name] <= goal for name, goal in GOALS.items() if name in ratios},
                      "isolated_sum": (fusion.get("hybrid_vs_isolated_sum") or float("inf")) <= ISOLATED_SUM_GOAL,
                      "every_conv_gflops": convs["slowest_gflops"] >= CONV_GFLOPS_GOAL,
                      "edge_sum_ms": (convs["edge_sum_ms"] or float("inf")) <= EDGE_SUM_GOAL_MS},
        "moonshots_met": {name: ratios[name] <= goal for name, goal in MOONSHOT.items() if name in ratios},
        "tuning": study.tuning_summary(model, device, work, config, measured.tuning),
        # make study's goal: 15 minutes on 2 cores at the default budget (a fresh work dir; resumed, far less)
        "seconds": {"tuning_and_per_layer": layers_seconds, "total": time.time() - started,
                    "goal_total": STUDY_SECONDS_GOAL},
        "plan": plans["hybrid"].to_dict(),
        "threads": args.threads,
        "repeat": args.repeat,
    }, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
