"""The whole study in one call: layers, ceilings, tuning, per-layer comparison, hybrid, peers, report.

Every step keeps what it measured (records, tuning databases), so an interrupted study resumes
where it stopped; re-running a finished one re-measures only the end-to-end comparison.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field

import pandas as pd

from . import baselines, blocks, compare, families, hybrid, intensity, knob_records, knob_tuning, plots, runoff, tuning
from .build import build_hybrid, compile_hybrid
from .ceilings import measure_ceilings
from .errors import UserError
from .kernels.base import Candidate
from .kernels.registry import all_candidates
from .knob_tuning import KnobTuningConfig
from .measure import TimingConfig, usable
from .model import Model, sample_input
from .plan import Plan, choose_plan
from .records import WorkDir, environment
from .fp16 import KIND as FP16_KIND
from .report import Section, fp16_section, write_report
from .tuning import TuningConfig

log = logging.getLogger(__name__)

E2E_KIND = "end_to_end"


SPACES = ("hand", "metaschedule", "all")
TUNED = ("all", "edges", "none")


@dataclass
class StudyConfig:
    """The budget. Defaults finish within about 15 minutes on 2 cores for the reference UNet."""

    trials: int = 240  # one tuning budget for the tuned convs, per search space (spent where it pays)
    tune: str = "all"  # which convs are tuned: "all", "edges" (first and last two), "none"
    space: str = "hand"  # the hand schedules' knobs and NNPACK's choices, MetaSchedule's space, or both
    timing: TimingConfig = field(default_factory=TimingConfig)
    end_to_end_timing: TimingConfig = field(default_factory=lambda: TimingConfig(number=1, repeat=10, min_repeat_ms=100))
    seed: int = 0  # of the tuners' searches (inputs are seeded per layer in measure.ConvCase)
    quick: bool = False
    int8: bool = False  # also the int8 kernels per conv and the int8 hybrid against the int8 peers

    @classmethod
    def quick_run(cls) -> "StudyConfig":
        return cls(trials=12, tune="edges", timing=TimingConfig.quick(),
                   end_to_end_timing=TimingConfig(number=1, repeat=3, min_repeat_ms=10), quick=True)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise a WorkbenchError naming the first setting that is not one of its choices."""
        if self.space not in SPACES:
            raise UserError(f"StudyConfig space {self.space!r}: use one of {list(SPACES)}")
        if self.tune not in TUNED:
            raise UserError(f"StudyConfig tune {self.tune!r}: use one of {list(TUNED)}")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise UserError(f"StudyConfig trials {self.trials!r}: a whole number of at least 1")

    def describe(self) -> dict:
        return asdict(self)

    @property
    def spaces(self) -> tuple[str, ...]:
        return ("hand", "metaschedule") if self.space == "all" else (self.space,)


def tuned_layers(model: Model, config: StudyConfig) -> list[str]:
    if config.tune == "none":
        return []
    if config.tune == "all":
        return [c.name for c in model.convs]
    return intensity.edge_convs(model)


def study_candidates(model: Model, device, work: WorkDir, config: StudyConfig) -> list[Candidate]:
    """Every implementation the study measures: NNPACK, TVM's default, the hand schedules, and the
    tuners' best (MetaSchedule's where it tuned, the knob tuner's where its database has a trial)."""
    threads = int(device.target.get("num-cores") or 1)
    by_metaschedule = tuned_layers(model, config) if "metaschedule" in config.spaces else []
    return all_candidates(threads, work.tuning, by_metaschedule, config.trials, target=device.target,
                          emulated=bool(getattr(device, "emulated", False)),
                          machine=(getattr(device, "info", None) or {}).get("machine"))


def tune(model: Model, device, work: WorkDir, config: StudyConfig, progress: bool = True) -> list:
    """The tuning budget spent over the tuned convs, in each search space (resumes from the databases)."""
    config.check()  # fields may have been set after construction
    layers = tuned_layers(model, config)
    if not layers:
        return []
    results = []
    if "hand" in config.spaces:
        log.info("knob tuning: %d trials over %d convs", config.trials, len(layers))
        results += knob_tuning.tune_knobs(model, device, config.trials, work.tuning, layers=layers,
                                          progress=progress, config=KnobTuningConfig(seed=config.seed))
    if "metaschedule" in config.spaces:
        log.info("MetaSchedule: %d trials over %d convs", config.trials, len(layers))
        results += tuning.tune_model(model, device, config.trials, work.tuning, layers=layers, progress=progress,
                                     config=TuningConfig(seed=config.seed))
    return results


# ---------------------------------------------------------------- the stages

@dataclass
class LayerResults:
    """What the per-layer stage measured: tuning runs and one record per (conv, implementation)."""

    tuning: list = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)  # folded blocks and the separate kernels (blocks.py)
    runoff: list[dict] = field(default_factory=list)  # close contenders timed again, interleaved (runoff.py)

    @property
    def all(self) -> list[dict]:
        return self.records + self.runoff + self.blocks


def measure_layers(model: Model, device, work: WorkDir, config: StudyConfig, progress: bool = True) -> LayerResults:
    """Tune what the budget says (resuming), then measure every implementation of every conv."""
    context = {"model": model.name, "device": device.describe()}
    tune_results = tune(model, device, work, config, progress)
    for result in tune_results:
        work.records.append("tuning", result.to_dict(), **context)
    log.info("every implementation of every conv, over RPC")
    candidates = study_candidates(model, device, work, config)
    records = compare.compare(model, device, candidates=candidates, timing=config.timing, store=work.records,
                              progress=progress)
    log.info("runoffs: each conv's close contenders timed again, interleaved")
    final = runoff.run_runoffs(model, device, records, candidates, config.timing, work.records, progress=progress)
    log.info("blocks: folded into their convs, and the separate fused kernels")
    folded = blocks.measure_blocks(model, device, records, candidates, config.timing, work.records,
                                   progress=progress)
    return LayerResults(tune_results, records, folded, final)


# The hybrid plan built at each fusion level (plan.FUSION_LEVELS), timed end to end beside it.
FUSION_BUILDS = {"unfused": "none", "groups_2018": "2018", "folded": "folded"}


def choose_plans(model: Model, records: list[dict], fusion_builds: bool = False,
                 candidates: list[Candidate] | None = None) -> dict[str, Plan]:
    """The hybrid (best of everything, folded where measured faster) and pure TVM plans; with
    `fusion_builds`, also the hybrid's implementations at each fusion level (FUSION_BUILDS).

    With the study's `candidates` (study_candidates), a conv on the knob tuner's choice is pinned
    to it in the plan, so the saved plan builds what was measured whatever is tuned later."""
    tvm_records = [r for r in records if r["impl"].startswith("tvm:")]
    plans = {"hybrid": choose_plan(model, records, candidates=candidates),
             "tvm_only": choose_plan(model, tvm_records, candidates=candidates)}
    if candidates is not None:
        plans = {name: pin_choices(model, plan, candidates) for name, plan in plans.items()}
    if fusion_builds:
        plans.update({name: plans["hybrid"].with_fusion(model, level) for name, level in FUSION_BUILDS.items()})
    return plans


def pin_choices(model: Model, plan: Plan, candidates: list[Candidate]) -> Plan:
    """Entries on a candidate that chooses per conv from a database (`tvm:hand_tuned`) pinned to that choice."""
    entries = dict(plan.layers)
    for name, entry in plan.layers.items():
        candidate = next((c for c in candidates if c.impl == entry.impl), None)
        if candidate is not None and hasattr(candidate, "pin") and not entry.knobs:
            entries[name] = dataclasses.replace(entry, knobs=candidate.pin(model.layer(name)))
    return Plan(plan.model, entries, list(plan.notes), plan.elementwise)


def build_models(model: Model, plans: dict[str, Plan], work: WorkDir | None, target: dict,
                 emulated: bool = False) -> dict:
    """Each plan compiled for the target, with the work dir's tuned kernels; {name: executable}.

    Plans equal to one already built share its executable (the folded build is often the hybrid)."""
    candidates = all_candidates(tuning_dir=work.tuning if work else None, target=target, emulated=emulated)
    built, by_plan = {}, {}
    for name, plan in plans.items():
        key = json.dumps({k: v for k, v in plan.to_dict().items() if k != "notes"}, sort_keys=True)
        if key not in by_plan:
            by_plan[key] = compile_hybrid(build_hybrid(model, plan, target, candidates), target)
        built[name] = by_plan[key]
    return built


def isolated_times(plan: Plan, records: list[dict], candidates: list[Candidate] | None = None) -> dict[str, float]:
    """conv -> its fastest usable time alone with the plan's implementation (and knobs, when given)."""
    configs = {name: plan.candidate(name, candidates).config_for() for name in plan.layers} if candidates else {}
    times = {}
    for rec in usable(records):
        name = rec.get("layer")
        if rec.get("fusion") or name not in plan.layers or rec["impl"] != plan.impl(name):
            continue
        if name in configs and rec.get("config", "") != configs[name]:
            continue
        times[name] = min(rec["median_ms"], times.get(name, float("inf")))
    return times


def isolated_sum_ms(plan: Plan, records: list[dict], candidates: list[Candidate] | None = None) -> float | None:
    """The plan's convs' isolated times summed (each conv alone, with its plan's implementation)."""
    times = isolated_times(plan, records, candidates)
    return sum(times.values()) if len(times) == len(plan.layers) else None


def fusion_figures(end_to_end: list[dict], plan: Plan, records: list[dict],
                   candidates: list[Candidate] | None = None) -> dict:
    """study --json's "fusion": the hybrid plan unfused, with the 2018 groups and folded (one run),
    and its convs' isolated times summed; ratios below 1.0 mean fusion paid."""
    by_name = {r["name"]: r["median_ms"] for r in end_to_end}
    figures = {f"{name}_ms": by_name.get(name) for name in FUSION_BUILDS}
    figures["hybrid_ms"] = by_name.get("hybrid")
    figures["isolated_sum_ms"] = isolated_sum_ms(plan, records, candidates)
    if figures["unfused_ms"] and figures["hybrid_ms"]:
        figures["hybrid_vs_unfused"] = figures["hybrid_ms"] / figures["unfused_ms"]
    if figures["isolated_sum_ms"] and figures["hybrid_ms"]:
        figures["hybrid_vs_isolated_sum"] = figures["hybrid_ms"] / figures["isolated_sum_ms"]
    from .stats import interval  # each build's interval, so that a ratio can be read against noise

    figures["ci_ms"] = {r["name"]: list(interval(r)) for r in end_to_end
                        if r["name"] in (*FUSION_BUILDS, "hybrid") and interval(r)}
    figures["disturbed"] = [r["name"] for r in end_to_end if r["name"] in (*FUSION_BUILDS, "hybrid")
                            and r.get("disturbed")]
    return figures


def fusion_effect(model: Model, device, plan: Plan, records: list[dict] = (), work: WorkDir | None = None,
                  timing: TimingConfig | None = None, threads: int | None = None) -> dict:
    """One plan built unfused, with the 2018 groups and folded, timed end to end in one run (over
    RPC, checked against PyTorch first), beside its convs' isolated times summed (from `records`;
    a conv they lack is measured alone first, through the protocol)."""
    threads = threads or int(device.target.get("num-cores") or 1)
    timing = timing or TimingConfig(number=1, repeat=10, min_repeat_ms=100)
    candidates = all_candidates(tuning_dir=work.tuning if work else None, target=device.target,
                                emulated=bool(getattr(device, "emulated", False)))
    records = list(records)
    timed = isolated_times(plan, records, candidates)
    records += [compare.measure_one(model, device, conv.name, plan.candidate(conv.name, candidates), timing)
                for conv in model.convs if conv.name not in timed]
    plans = {"hybrid": plan, **{name: plan.with_fusion(model, level) for name, level in FUSION_BUILDS.items()}}
    executables = build_models(model, plans, work, device.target, bool(getattr(device, "emulated", False)))
    results = baselines.measure_baselines(model, device, threads, timing, names=[], extra=executables)
    return fusion_figures(results, plan, records, candidates)


def compare_end_to_end(model: Model, device, executables: dict, config: StudyConfig, threads: int,
                       work: WorkDir | None = None, x=None) -> list[dict]:
    """The built models against the peers, checked against PyTorch first, in one run; recorded."""
    x = sample_input(model) if x is None else x
    results = baselines.measure_baselines(model, device, threads, config.end_to_end_timing, x=x, extra=executables)
    if work is not None:
        for result in results:
            work.records.append(E2E_KIND, result, model=model.name, device=device.describe(), threads=threads)
    return results


def run_study(model: Model, device, work: WorkDir, config: StudyConfig, progress: bool = True) -> dict:
    """The stages in order, then the report; every stage resumes from what the work dir holds."""
    started = time.time()
    threads = int(device.target.get("num-cores") or 1)

    log.info("[1/6] layer table: %d layers, %d convs", len(model.layers), len(model.convs))
    layers = intensity.layer_table(model)

    log.info("[2/6] ceilings of the device")
    ceilings = measure_ceilings(device, quick=config.quick)
    work.records.append("ceilings", ceilings.to_dict(), model=model.name, device=device.describe())

    log.info("[3-4/6] tuning and every implementation of every conv")
    measured = measure_layers(model, device, work, config, progress)

    log.info("[5/6] hybrid and pure-TVM plans (and the hybrid at each fusion level), built and compared "
             "end to end with the peers")
    chosen = choose_plans(model, measured.all, fusion_builds=True,
                          candidates=study_candidates(model, device, work, config))
    chosen["hybrid"].save(work.hybrid / "plan.json")
    executables = build_models(model, chosen, work, device.target, bool(getattr(device, "emulated", False)))
    x = sample_input(model)
    end_to_end = compare_end_to_end(model, device, executables, config, threads, work, x)
    in_model = hybrid.label_calls(hybrid.profile_layers(executables["hybrid"], x, threads), model, chosen["hybrid"])

    log.info("[6/6] report")
    summary = _summary(model, end_to_end, chosen["hybrid"], config, threads, time.time() - started)
    summary["fusion"] = fusion_figures(end_to_end, chosen["hybrid"], measured.records)
    summary["tuning"] = tuning_summary(model, device, work, config, measured.tuning)
    summary.update(device=device.describe(), emulated=device.describe()["emulated"])  # never a board's speed if true
    sections = _sections(model, layers, ceilings, measured.records, measured.tuning, chosen["hybrid"], end_to_end,
                         in_model, summary, measured.blocks, measured.runoff)
    if config.int8:  # after the float32 study: its records are the per-conv baseline
        from . import int8_study

        log.info("int8: QNNPACK and TVM int8 on every conv, the int8 hybrid and peers end to end")
        summary["int8"] = int8_study.network_int8(model, device, work, config, threads,
                                                  float_hybrid=executables["hybrid"])
        sections.append(_int8_section(summary["int8"]))
    # FP16 Winograd: measured by `python -m workbench fp16` (a board's too), or an alias here.
    fp16 = fp16_section(work.records.read(FP16_KIND), measured.records)
    write_report(work.report, f"Study: {model.name}", sections + ([fp16] if fp16 else []),
                 device=device.describe())
    (work.root / "study.json").write_text(json.dumps(summary, indent=1, default=str))
    log.info("report: %s", work.report)
    return summary


def seeds(config: StudyConfig | None = None) -> dict:
    """The seeds a study uses, recorded so a re-run can reuse them: the inputs' and the layer cases'
    (each function's default), and the tuners' searches (the study's seed)."""
    import inspect

    def default(fn, name="seed"):
        return inspect.signature(fn).parameters[name].default

    tuner = (config or StudyConfig()).seed
    return {"input": default(sample_input), "layer_cases": default(compare.compare),
            "knob_tuning": tuner, "metaschedule": tuner}


def _end_to_end_rows(end_to_end) -> list[dict]:
    keys = ("name", "median_ms", "ci_ms", "ci_coverage", "spread", "disturbed", "disturbed_by", "numerics_ok")
    return [{k: r.get(k) for k in keys} for r in end_to_end]


KEY_PLACEHOLDER = "$WORKBENCH_RPC_KEY"


def _command(argv: list[str]) -> list[str] | None:
    """The command line that ran the study (None when not the CLI), the device key left out: it is
    the secret a client needs, and the summary goes into bundles that get published."""
    if not argv or not argv[0].endswith(("workbench", "__main__.py")):
        return None
    shown = list(argv)
    for i, arg in enumerate(shown):
        if arg == "--key" and i + 1 < len(shown):
            shown[i + 1] = KEY_PLACEHOLDER
        elif arg.startswith("--key="):
            shown[i] = f"--key={KEY_PLACEHOLDER}"
    return shown


def _summary(model, end_to_end, plan, config, threads, seconds) -> dict:
    import sys

    by_name = {r["name"]: r for r in end_to_end}
    hybrid_ms = by_name["hybrid"]["median_ms"]
    base = {name: r["median_ms"] for name, r in by_name.items() if name != "hybrid" and name not in FUSION_BUILDS}
    return {
        "end_to_end": _end_to_end_rows(end_to_end),  # with intervals and disturbed flags
        "plan_notes": list(plan.notes),  # the ties and the folds, with their intervals
        "seeds": seeds(config),
        "command": _command(sys.argv),
        "model": model.name,
        "hybrid_ms": hybrid_ms,
        "numerics_ok": all(r["numerics_ok"] for r in end_to_end),
        "baselines": base,
        "ratios": {key: hybrid_ms / ms for key, ms in base.items()},  # below 1.0: the hybrid is faster
        "plan": {name: entry.impl for name, entry in plan.layers.items()},
        "plan_fusion": {name: entry.label for name, entry in plan.layers.items()},
        "threads": threads,
        "budget": config.describe(),
        "seconds": seconds,
    }


def tuning_summary(model: Model, device, work: WorkDir, config: StudyConfig, results: list) -> dict:
    """study --json's "tuning": the budget, the throughput, the knob tuner's whole-model estimate as
    it fell, and each tuned conv's best point."""
    rows = [r if isinstance(r, dict) else r.to_dict() for r in results]
    summary = {"space": config.space, "trials": config.trials, "tuned_convs": len(tuned_layers(model, config))}
    for space in config.spaces:
        mine = [r for r in rows if r.get("space", "metaschedule") == space]
        new = sum(r["new_trials"] for r in mine)
        seconds = max((r["seconds"] for r in mine), default=0.0) if space == "hand" else \
            sum(r["seconds"] for r in mine)
        summary[space] = {"new_trials": new, "seconds": seconds,
                          "trials_per_minute": new / seconds * 60 if new and seconds else None,
                          "best": {r["layer"]: {"best_ms": r["best_ms"], **(r.get("best") or {})} for r in mine}}
    if "hand" in config.spaces:
        summary["hand"]["estimate_history"] = knob_records.estimate_history(
            model, work.tuning, device.target, tuned_layers(model, config), bool(getattr(device, "emulated", False)),
            int(device.target.get("num-cores") or 1))
    return summary


def _tuning_section(summary: dict, tune_results: list) -> Section:
    if not tune_results:
        return Section("Tuning", ["No layer was tuned at this budget."])
    parts = [f"Budget: {summary.get('trials')} trials over {summary.get('tuned_convs')} convs, per search space "
             f"({summary.get('space')}). The knob tuner searches the hand schedules' knobs and NNPACK's algorithms, "
             "guided by an XGBoost cost model; every trial is checked against the PyTorch reference before it is "
             "timed."]
    hand = summary.get("hand")
    if hand:
        parts += [plots.model_estimate(hand.get("estimate_history") or []),
                  pd.DataFrame([{"layer": layer, **best} for layer, best in hand["best"].items()])]
    parts.append(plots.tuning_curves(tune_results))
    parts.append({space: {k: v for k, v in summary[space].items() if k in ("new_trials", "seconds", "trials_per_minute")}
                  for space in ("hand", "metaschedule") if space in summary})
    return Section("Tuning", parts)


def _fusion_section(summary: dict, block_records: list[dict], plan: Plan) -> Section:
    figures = summary.get("fusion", {})
    blocks_frame = compare.table(block_records)
    if len(blocks_frame) and "fusion" in pd.DataFrame(block_records):
        blocks_frame.insert(2, "fusion", [r.get("fusion", "") for r in block_records])
    return Section("Fusion", [
        "The same hybrid plan built three ways and timed in one run: every op its own kernel (unfused); the "
        "original study's groups (conv+bias+ReLU, MaxPool+ReLU and Resize+Add+ReLU as one kernel each); and "
        "folded (Resize+Add+ReLU into the conv before it, MaxPool+ReLU into the conv after it, wherever the "
        "conv's kernel can). The hybrid folds a block only where the per-block sweep measured it faster. "
        "isolated_sum_ms is the plan's convs timed alone, summed: what the whole model would cost with "
        "nothing between the convs.",
        plots.fusion_bars(figures),
        figures,
        "Per block: each fold measured (checked against the PyTorch reference of the whole block first), "
        "and the separate kernels it replaces.",
        blocks_frame])


def _with_interval(end_to_end, name: str) -> str:
    from .stats import show

    row = next((r for r in end_to_end if r["name"] == name), None)
    return show(row) if row else "-"


def _end_to_end_frame(end_to_end) -> pd.DataFrame:
    from .stats import interval

    frame = pd.DataFrame(end_to_end)
    spans = [interval(r) or (None, None) for r in end_to_end]
    frame["ci_lo_ms"], frame["ci_hi_ms"] = [s[0] for s in spans], [s[1] for s in spans]
    for column in ("spread", "disturbed"):
        if column not in frame:
            frame[column] = None
    return frame[["name", "median_ms", "ci_lo_ms", "ci_hi_ms", "spread", "disturbed", "min_ms", "numerics_ok",
                  "max_abs_err", "note"]]


def _disturbed(records) -> list[dict]:
    return [r for r in records if r.get("disturbed")]


def _disturbed_warning(records, end_to_end) -> list[str]:
    """One line when any measurement was disturbed (its signals named), else nothing."""
    layer_hits, e2e_hits = _disturbed(records), _disturbed(end_to_end)
    if not layer_hits and not e2e_hits:
        return []
    signals = sorted({s for r in layer_hits + e2e_hits for s in r.get("disturbed_by") or []})
    return [f"WARNING: measurements were disturbed ({', '.join(signals) or 'unknown signal'}): "
            f"{len(layer_hits)} of {len(records)} per-layer and {len(e2e_hits)} of {len(end_to_end)} end-to-end. "
            "'spread': the interval stayed wider than the limit after re-measuring; 'load': the device's load "
            "average exceeded its cores (other work shared them). Compare such results with care, or run again "
            "on an idle machine."]


def _runoff_table(runoff_records, plan) -> pd.DataFrame:
    """Each runoff's contenders: median and interval over the rounds, and which one the plan took."""
    rows = [{"layer": r["layer"], "impl": r["impl"], "median_ms": r["median_ms"], "ci_ms": compare._ci_text(r),
             "rounds": len(r.get("repeats_ms") or []), "disturbed": r.get("disturbed"),
             "chosen": plan.impl(r["layer"]) == r["impl"] if r["layer"] in plan.layers else False}
            for r in runoff_records]
    return pd.DataFrame(rows)


def _noise_section(records, end_to_end, plan, runoff_records=()) -> Section:
    from .stats import SPREAD_LIMIT

    ties = [n for n in plan.notes if "tie (intervals overlap)" in n]
    hits = _disturbed(records)
    remeasured = sum(1 for r in records if r.get("remeasured"))
    frame = compare.table(hits)
    if len(hits):
        frame["disturbed_by"] = [", ".join(r.get("disturbed_by") or []) for r in hits]
    return Section("Noise, ties and disturbed measurements", [
        f"Every time is a median with a distribution-free interval from its repeats: 95% from 6 repeats on; with fewer, "
        f"min..max, covering the median with probability 1 - 2^(1-n) (94% for 5, 75% for 3: ci_coverage). "
        f"A measurement whose interval was wider than {SPREAD_LIMIT:.0%} of its median was timed again (bounded); "
        f"{remeasured} were (end-to-end times, measured in interleaved rounds, are flagged instead). The plan "
        "takes the fastest implementation only where its interval lies below all others'; where they overlap, the "
        "tie-break picks the one with fewer transforms, then by id.",
        f"{len(ties)} of {len(plan.layers)} choices were ties: " + ("; ".join(ties) if ties else "none."),
        *([f"The runoff: {len({r['layer'] for r in runoff_records})} convs had close contenders, timed again in "
           "interleaved rounds (one timing of each per round); the plan chose among them round by round (a "
           "contender ties unless the interval of its median per-round ratio to the fastest lies above 1).",
           _runoff_table(runoff_records, plan)] if runoff_records else []),
        *([f"{len(hits)} disturbed per-layer measurements:", frame] if hits else
          ["No per-layer measurement was disturbed."])])


def _int8_section(int8: dict) -> Section:
    end = pd.DataFrame(int8["end_to_end"])
    shown = [c for c in ("name", "median_ms", "ci_ms", "top1_agreement", "max_rel_err", "numerics_ok", "note")
             if c in end]
    return Section("int8", [
        "Per conv, QNNPACK and TVM's int8 kernel with per-channel weight scales calibrated on seeded inputs: each "
        "is checked against its own quantised reference (one output step), and its distance from the float32 conv "
        "(quant_error) is reported beside its time. int8_over_float32 is the faster int8 kernel's time over the "
        "float32 winner's. End to end: the int8 hybrid and the int8 peers beside float32 ONNX Runtime, in one run; "
        "top-1 agreement and the largest relative error are against float32.",
        pd.DataFrame(int8["layers"]), end[shown]])


def _conv_classes_section(model, records) -> Section:
    """Where the convs' FLOPs are (3x3 stride 1, depthwise, 1x1, strided) and which library won each class."""
    shares = families.flop_shares(model)
    counts = families.library_count(families.winners_by_class(model, records))
    return Section("Conv classes", [
        "Winograd and FFT (NNPACK's fast algorithms) apply only to dense 3x3 stride-1 convs; NNPACK has no grouped "
        "or depthwise conv at all. The share of the convs' FLOPs in each class bounds what they can win.",
        plots.flop_share_bars(shares), shares, *([counts.reset_index()] if len(counts) else [])])


def _sections(model, layers, ceilings, records, tune_results, plan, end_to_end, in_model, summary,
              block_records=(), runoff_records=()) -> list[Section]:
    frame = pd.DataFrame(records)
    good = pd.DataFrame(usable(records))
    best_per_library = good.loc[good.groupby(["layer", good.impl.str.split(":").str[0]]).gflops.idxmax()]
    winners = compare.winners(records)
    e2e = _end_to_end_frame(end_to_end)
    e2e["hybrid_ratio"] = summary["hybrid_ms"] / e2e["median_ms"]
    isolated = winners.rename(columns={"median_ms": "isolated_ms"})[["layer", "impl", "isolated_ms"]]
    return [
        Section("Summary", [
            f"Hybrid {_with_interval(end_to_end, 'hybrid')} on {summary['threads']} threads (median and its "
            "interval, see Noise); ratios below 1.0 mean the hybrid is faster. Every implementation's output was checked "
            "against the PyTorch reference before timing.",
            *_disturbed_warning(records, end_to_end),
            {k: summary[k] for k in ("hybrid_ms", "numerics_ok", "baselines", "ratios")}]),
        Section("End to end", [plots.end_to_end_bars(e2e), e2e]),
        _noise_section(records, end_to_end, plan, runoff_records),
        Section("Layers and the roofline", [
            ceilings.summary(), plots.roofline(ceilings, layers, best_per_library[["layer", "impl", "gflops"]],
                                               title=model.name),
            layers[["name", "op", "input_shape", "output_shape", "groups", "folded", "flops", "bytes", "intensity"]]]),
        _conv_classes_section(model, records),
        Section("Per-layer winners", [plots.implementation_bars(frame), winners]),
        _tuning_section(summary.get("tuning", {}), tune_results),
        Section("Inside the whole model", [
            "Per-call times inside the hybrid (VM instrument) beside the isolated per-layer measurements. Inside the "
            "model, caches hold other layers' data and the elementwise ops run between convs, so the two differ.",
            in_model.merge(isolated, on="layer", how="left") if "layer" in in_model else in_model]),
        _fusion_section(summary, list(block_records), plan),
        Section("The plan", [plan.frame(), *(["Notes: " + " | ".join(plan.notes)] if plan.notes else [])]),
        Section("Environment", [{**environment(), "device": records[0]["device"] if records else {},
                                 "threads": summary["threads"], "budget": summary["budget"],
                                 "seeds": summary.get("seeds"),
                                 "study_seconds": summary["seconds"]}]),
    ]
