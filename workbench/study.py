"""The whole study in one call: layers, ceilings, tuning, per-layer comparison, hybrid, peers, report.

Every step keeps what it measured (records, tuning databases), so an interrupted study resumes
where it stopped; re-running a finished one re-measures only the end-to-end comparison.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import pandas as pd

from . import baselines, compare, hybrid, intensity, plots, tuning
from .ceilings import measure_ceilings
from .measure import TimingConfig
from .model import Model, sample_input
from .records import WorkDir, environment
from .report import Section, write_report

log = logging.getLogger(__name__)

E2E_KIND = "end_to_end"


@dataclass
class StudyConfig:
    """The budget. Defaults finish within about 30 minutes on 2 cores for the reference UNet."""

    trials: int = 48  # MetaSchedule trials per tuned layer
    tune: str = "edges"  # which convs MetaSchedule tunes: "edges" (first and last two), "all", "none"
    timing: TimingConfig = field(default_factory=TimingConfig)
    end_to_end_timing: TimingConfig = field(default_factory=lambda: TimingConfig(number=1, repeat=10, min_repeat_ms=100))
    quick: bool = False

    @classmethod
    def quick_run(cls) -> "StudyConfig":
        return cls(trials=4, tune="edges", timing=TimingConfig.quick(),
                   end_to_end_timing=TimingConfig(number=1, repeat=3, min_repeat_ms=10), quick=True)

    def describe(self) -> dict:
        return asdict(self)


def tuned_layers(model: Model, config: StudyConfig) -> list[str]:
    if config.tune == "none":
        return []
    if config.tune == "all":
        return [c.name for c in model.convs]
    return intensity.edge_convs(model)


def candidates(model: Model, device, work: WorkDir, tuned: list[str], trials: int) -> list:
    """NNPACK's algorithms x strategies, TVM default, the hand schedules, and the tuned schedules."""
    threads = int(device.target.get("num-cores") or 1)
    return (compare.all_candidates(threads) + compare.schedule_candidates()
            + [tuning.tuned_candidate(work.tuning, layers=tuned, trials=trials)])


def tvm_kernels(model: Model, work: WorkDir, target: dict) -> dict:
    """Kernel factories for every TVM implementation a plan may name."""
    from . import schedules

    kernels = {f"tvm:{impl}": hybrid.schedule_kernels(model, impl) for impl in schedules.IMPLEMENTATIONS}
    kernels["tvm:tuned"] = tuning_kernel(work, target)
    return kernels


def tuning_kernel(work: WorkDir, target: dict):
    """The tuned conv+bias PrimFunc of a layer (ReLU stays a separate op: it was tuned without)."""

    def factory(layer, relu):
        func = tuning.best_prim_func(layer, target, work.tuning)
        if func is None:
            raise hybrid.PlanError(f"layer {layer.name!r} has no tuning record; tune it or pick another impl")
        return func

    return factory


def _without_tuned_fusion(plan: hybrid.Plan) -> hybrid.Plan:
    for name, entry in plan.layers.items():
        if entry.impl == "tvm:tuned":
            plan.layers[name] = hybrid.LayerPlan(name, entry.impl, ())
    return plan


def plans(model: Model, records: list[dict]) -> dict[str, hybrid.Plan]:
    """The hybrid (best of everything) and pure TVM (best TVM implementation) plans."""
    tvm_records = [r for r in records if r["impl"].startswith("tvm:")]
    return {"hybrid": _without_tuned_fusion(hybrid.choose_plan(model, records)),
            "tvm_only": _without_tuned_fusion(hybrid.choose_plan(model, tvm_records))}


def run_study(model: Model, device, work: WorkDir, config: StudyConfig, progress: bool = True) -> dict:
    started = time.time()
    store = work.records
    context = {"model": model.name, "device": device.describe()}
    threads = int(device.target.get("num-cores") or 1)

    log.info("[1/6] layer table: %d layers, %d convs", len(model.layers), len(model.convs))
    layers = intensity.layer_table(model)

    log.info("[2/6] ceilings of the device")
    ceilings = measure_ceilings(device, quick=config.quick)
    store.append("ceilings", ceilings.to_dict(), **context)

    tuned = tuned_layers(model, config)
    log.info("[3/6] MetaSchedule: %d trials on each of %s", config.trials, tuned or "no layer")
    tune_results = tuning.tune_layers(model, device, config.trials, work.tuning, layers=tuned,
                                      progress=progress) if tuned else []
    for result in tune_results:
        store.append("tuning", result.to_dict(), **context)

    log.info("[4/6] every implementation of every conv, over RPC")
    records = compare.compare(model, device, candidates=candidates(model, device, work, tuned, config.trials),
                              timing=config.timing, store=store, progress=progress)

    log.info("[5/6] hybrid and pure-TVM plans, built and compared end to end with the peers")
    chosen = plans(model, records)
    work.hybrid.mkdir(parents=True, exist_ok=True)
    chosen["hybrid"].save(work.hybrid / "plan.json")
    kernels = tvm_kernels(model, work, device.target)
    executables = {name: hybrid.compile_hybrid(hybrid.build_hybrid(model, plan, device.target, kernels), device.target)
                   for name, plan in chosen.items()}
    x = sample_input(model)
    end_to_end = baselines.measure_baselines(model, device, threads, config.end_to_end_timing, x=x, extra=executables)
    for result in end_to_end:
        store.append(E2E_KIND, result, **context, threads=threads)
    in_model = hybrid.label_calls(hybrid.profile_layers(executables["hybrid"], x, threads), model, chosen["hybrid"])

    log.info("[6/6] report")
    summary = _summary(model, end_to_end, chosen["hybrid"], config, threads, time.time() - started)
    write_report(work.report, f"UNet study: {model.name}",
                 _sections(model, layers, ceilings, records, tune_results, chosen["hybrid"], end_to_end, in_model,
                           summary))
    (work.root / "study.json").write_text(json.dumps(summary, indent=1, default=str))
    log.info("report: %s", work.report)
    return summary


def _summary(model, end_to_end, plan, config, threads, seconds) -> dict:
    by_name = {r["name"]: r for r in end_to_end}
    hybrid_ms = by_name["hybrid"]["median_ms"]
    base = {name: r["median_ms"] for name, r in by_name.items() if name != "hybrid"}
    return {
        "model": model.name,
        "hybrid_ms": hybrid_ms,
        "numerics_ok": all(r["numerics_ok"] for r in end_to_end),
        "baselines": base,
        "ratios": {key: hybrid_ms / ms for key, ms in base.items()},  # below 1.0: the hybrid is faster
        "plan": {name: entry.impl for name, entry in plan.layers.items()},
        "threads": threads,
        "budget": config.describe(),
        "seconds": seconds,
    }


def _sections(model, layers, ceilings, records, tune_results, plan, end_to_end, in_model, summary) -> list[Section]:
    frame = pd.DataFrame(records)
    usable = frame[(frame.status == "ok") & (frame.numerics_ok == True)]  # noqa: E712
    best_per_library = usable.loc[usable.groupby(["layer", usable.impl.str.split(":").str[0]]).gflops.idxmax()]
    winners = compare.winners(records)
    e2e = pd.DataFrame(end_to_end)[["name", "median_ms", "min_ms", "numerics_ok", "max_abs_err", "note"]]
    e2e["hybrid_ratio"] = summary["hybrid_ms"] / e2e["median_ms"]
    isolated = winners.rename(columns={"median_ms": "isolated_ms"})[["layer", "impl", "isolated_ms"]]
    return [
        Section("Summary", [
            f"Hybrid {summary['hybrid_ms']:.2f} ms on {summary['threads']} threads; ratios below 1.0 mean the hybrid "
            "is faster. Every implementation's output was checked against the PyTorch reference before timing.",
            {k: summary[k] for k in ("hybrid_ms", "numerics_ok", "baselines", "ratios")}]),
        Section("End to end", [plots.end_to_end_bars(e2e), e2e]),
        Section("Layers and the roofline", [
            ceilings.summary(), plots.roofline(ceilings, layers, best_per_library[["layer", "impl", "gflops"]],
                                               title=model.name),
            layers[["name", "op", "input_shape", "output_shape", "flops", "bytes", "intensity"]]]),
        Section("Per-layer winners", [plots.implementation_bars(frame), winners]),
        Section("MetaSchedule tuning", [plots.tuning_curves(tune_results)] if tune_results else
                ["No layer was tuned at this budget."]),
        Section("Inside the whole model", [
            "Per-call times inside the hybrid (VM instrument) beside the isolated per-layer measurements. Inside the "
            "model, caches hold other layers' data and the elementwise ops run between convs, so the two differ.",
            in_model.merge(isolated, on="layer", how="left") if "layer" in in_model else in_model]),
        Section("The plan", [plan.frame()]),
        Section("Environment", [{**environment(), "device": records[0]["device"] if records else {},
                                 "threads": summary["threads"], "budget": summary["budget"],
                                 "study_seconds": summary["seconds"]}]),
    ]
