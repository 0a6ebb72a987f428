"""Where a studied network's hybrid spends its time: each call inside the whole model, against the same
conv measured alone.

Usage: python benchmarks/in_model.py --network NAME --work-dir DIR [--resolution 224] [--runs 10]

DIR is the network's study work dir (benchmarks/other_networks.py writes one per network). Its plan
(DIR/hybrid/plan.json) is built for this machine and run in this process, with nothing else running:
the VM's instrument hook times every call (hybrid.profile_layers, as the study's report does). Each
conv's time alone comes from the study's records, measured through the protocol. Prints JSON: the
profiled total, the convs inside the model and alone, the other calls by kind, and the convs that
lose most inside the model.
"""

import argparse
import json
import sys
from pathlib import Path

from workbench import compare, hybrid, networks, study
from workbench.build import build_hybrid, compile_hybrid
from workbench.kernels.registry import all_candidates
from workbench.model import sample_input
from workbench.plan import Plan
from workbench.records import WorkDir
from workbench.targets import host_target


def breakdown(model, plan: Plan, records: list[dict], work: WorkDir, threads: int, runs: int) -> dict:
    target = host_target(threads)
    candidates = all_candidates(tuning_dir=work.tuning, target=target)
    executable = compile_hybrid(build_hybrid(model, plan, target, candidates), target)
    calls = hybrid.label_calls(hybrid.profile_layers(executable, sample_input(model), threads, runs),
                               model, plan)
    alone = study.isolated_times(plan, records, candidates)
    calls["alone_ms"] = [alone.get(layer) for layer in calls.layer]
    convs, other = calls[calls.alone_ms.notna()], calls[calls.alone_ms.isna()]
    # Relax numbers its kernels (add1, concatenate2) and ours end in a hash: one kind each without them.
    kind = (other.symbol.str.replace(r"_[0-9a-f]{4,}$", "", regex=True).str.replace(r"\d+", "", regex=True)
            .str.replace(r"_+", "_", regex=True))
    kinds = other.groupby(kind).ms.agg(["count", "sum"])
    worst = convs.assign(excess=convs.ms - convs.alone_ms).sort_values("excess", ascending=False).head(5)
    return {"network": model.name, "profiled_ms": round(calls.ms.sum(), 3),
            "convs_in_model_ms": round(convs.ms.sum(), 3), "convs_alone_ms": round(convs.alone_ms.sum(), 3),
            "other_ms": round(other.ms.sum(), 3),
            "other_by_kind": {kind: {"calls": int(row["count"]), "ms": round(row["sum"], 3)}
                              for kind, row in kinds.sort_values("sum", ascending=False).iterrows()},
            "most_slowed_convs": [{"layer": r.layer, "in_model_ms": round(r.ms, 3), "alone_ms": round(r.alone_ms, 3)}
                                  for r in worst.itertuples()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", required=True, choices=sorted(networks.NETWORKS))
    parser.add_argument("--work-dir", required=True, help="the network's study work dir")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    plan_path = Path(args.work_dir) / "hybrid" / "plan.json"
    if not plan_path.is_file():
        print(f"error: no plan at {plan_path}; run the study on --network {args.network} with this --work-dir first "
              "(python benchmarks/other_networks.py --work-dir DIR writes one per network)", file=sys.stderr)
        return 2
    work = WorkDir.at(args.work_dir)
    model = networks.network(args.network, args.resolution)
    records = work.records.read(compare.KIND)
    print(json.dumps(breakdown(model, Plan.load(plan_path), records, work, args.threads, args.runs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
