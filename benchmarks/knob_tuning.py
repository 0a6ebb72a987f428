"""Knob tuner against MetaSchedule at the same trial count, on each edge conv of the reference UNet.

Usage: python benchmarks/knob_tuning.py [--trials N] [--layers A,B] [--work-dir DIR] [--threads N]

For each conv (default: the five few-channel, large-image convs), in one run on one device:
the knob tuner (hand schedules' knobs and NNPACK's choices, XGBoost-guided) and MetaSchedule
each get N trials on that conv alone, from empty databases (a fresh work dir unless given).
Each search's best is then measured again through the protocol, side by side in one session,
so the ratio compares like with like. Prints JSON: per conv both bests (ms and
direct-equivalent GFLOP/s), knob/MetaSchedule (below 1.0: the knob tuner found the faster
kernel), and each search's trials per minute. Goal: below 1.0 on every conv.
"""

import argparse
import json
import sys
import tempfile
import time

from workbench import compare, intensity, knob_tuning, tuning
from workbench.kernels.hand_tuned import HandTunedCandidate
from workbench.kernels.tuned import TunedCandidate
from workbench.measure import TimingConfig
from workbench.model import reference_unet
from workbench.rpc import open_device

EDGE_CONVS = ("enc0_conv1", "enc0_conv2", "dec0_reduce", "dec0_conv", "head_conv")
TIMING = TimingConfig(number=1, repeat=10, min_repeat_ms=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--layers", default=",".join(EDGE_CONVS))
    parser.add_argument("--work-dir", default=None, help="tuning databases (default: a fresh temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = reference_unet()
    layers = [name.strip() for name in args.layers.split(",")]
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="knob-bench-")
    rows = {}
    with open_device(threads=args.threads) as device:
        for name in layers:
            started = time.perf_counter()
            knob = knob_tuning.tune_knobs(model, device, args.trials, work_dir, layers=[name], whole_model=False,
                                          progress=False)[0]
            knob_seconds = time.perf_counter() - started
            meta = tuning.tune_layer(model.layer(name), device, args.trials, work_dir, progress=False)
            rows[name] = {"knob_search": {"best_ms": knob.best_ms, "best": knob.best, "trials": knob.trials,
                                          "trials_per_minute": knob.new_trials / knob_seconds * 60 if knob.new_trials
                                          else None},  # a conv of a shape tuned before measures nothing new
                          "metaschedule_search": {"best_ms": meta.best_ms, "trials": meta.trials,
                                                  "trials_per_minute": meta.trials_per_minute or None}}
        # Both bests again, through the protocol in one sweep: the ratio compares like with like.
        candidates = [HandTunedCandidate(work_dir, device.target), TunedCandidate(work_dir, layers)]
        records = compare.compare(model, device, layers, candidates=candidates, timing=TIMING, progress=False)
    flops = {row["name"]: row["flops"] for row in intensity.layer_table(model).to_dict("records")}
    for record in records:
        key = "knob_ms" if record["impl"] == "tvm:hand_tuned" else "metaschedule_ms"
        rows[record["layer"]][key] = record["median_ms"] if record["status"] == "ok" and record["numerics_ok"] else None
    for name, row in rows.items():
        for key in ("knob_ms", "metaschedule_ms"):
            ms = row.get(key)
            row[key.replace("_ms", "_gflops")] = flops[name] / (ms * 1e-3) / 1e9 if ms else None
        row["knob_vs_metaschedule"] = row["knob_ms"] / row["metaschedule_ms"] \
            if row.get("knob_ms") and row.get("metaschedule_ms") else None
    json.dump({"trials": args.trials, "threads": args.threads, "layers": rows,
               "knob_tuner_wins_everywhere": all((r["knob_vs_metaschedule"] or 9) < 1.0 for r in rows.values()),
               "device": device.describe()}, sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    main()
