"""The runoff: a conv's close contenders timed again, interleaved, before the plan chooses.

Why: on a shared machine a kernel's speed can change for a second or more at a time (measured
here: the same Winograd kernel, same buffers, 0.17 ms for a few timings, then 0.40 ms for the
next few, then 0.17 again), while each sweep measurement lasts about a quarter of a second. Its
repeats then agree with each other, its interval is narrow, and two runs of the study can call
opposite winners "clear". In the runoff every contender is set up in one session and timed in
rounds, one timing of each per round, the order rotating, and the plan compares them round by
round (stats.slower_in_rounds): a slow spell slows every contender within a round and cancels in
the ratio instead of deciding the winner.

Contenders of a conv: the fastest record of each family (NNPACK, TVM direct, TVM Winograd, the
knob tuner's, ...) within FAMILY_WITHIN of the best, then the records the sweep's choice ties
with (plan.choose) and any other implementation within RUNOFF_WITHIN of the fastest median, up to
MAX_CONTENDERS. Families first: a spell can cover all of one library's kernels of a conv in the
sweep (seen: every TVM kernel of dec1_conv at 2x, so NNPACK's FFT looked fastest).
Each gets a record of kind "runoff" (`runoff: true`, `contenders`: the impls of its runoff);
the plan chooses a conv among its runoff records when it has them (plan._candidates_of).
"""

from __future__ import annotations

import logging

from . import interrupts
from .compare import record_context
from .kernels.base import Candidate
from .measure import ConvCase, Measurement, TimingConfig, annotate, check_numerics, device_load
from .model import Model
from .records import RecordStore
from .rpc import SessionKeeper, hang_guard, is_transport_failure

log = logging.getLogger(__name__)

KIND = "runoff"
RUNOFF_WITHIN = 2.0  # a record this much slower than the fastest median is still a contender (a slow
# spell of the machine can double one sweep measurement)
FAMILY_WITHIN = 4.0  # each family's fastest within this of the best is a contender (spells reach 2.5-3.8x)
MAX_CONTENDERS = 5
EXTRA_ROUNDS = 4  # rounds beyond the sweep's repeats (9 at the default timing: a 96% interval within min..max)


def family(impl: str) -> str:
    """The kind of kernel an implementation is: NNPACK, TVM's direct or Winograd schedules, or its own."""
    if impl.startswith("nnpack:"):
        return "nnpack"
    for kind in ("tvm:direct", "tvm:winograd"):
        if impl.startswith(kind):
            return kind
    return impl


def contenders(records: list[dict]) -> list[dict]:
    """One conv's contenders among its usable isolated records (fastest first): the fastest of each
    family within FAMILY_WITHIN of the best (a slow spell can cover all of one library's kernels of a
    conv in the sweep), then the choice's ties and whatever lies within RUNOFF_WITHIN, up to
    MAX_CONTENDERS in all."""
    from .plan import choose

    best: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r["median_ms"]):
        best.setdefault(record["impl"], record)
    if len(best) < 2:
        return []
    choice = choose(records[0]["layer"], list(best.values()))
    fastest = choice.fastest["median_ms"]
    heads: dict[str, dict] = {}
    for record in best.values():
        if record["median_ms"] <= fastest * FAMILY_WITHIN:
            heads.setdefault(family(record["impl"]), record)
    tied = {r["impl"] for r in [choice.fastest, *choice.tied]}
    extras = [r for r in best.values() if r not in heads.values()
              and (r["impl"] in tied or r["median_ms"] <= fastest * RUNOFF_WITHIN)]
    picked = list(heads.values()) + extras[:max(0, MAX_CONTENDERS - len(heads))]
    return sorted(picked, key=lambda r: r["median_ms"]) if len(picked) > 1 else []


def rounds_for(timing: TimingConfig) -> int:
    return timing.repeat + EXTRA_ROUNDS


def run_runoffs(model: Model, device, records: list[dict], candidates: list[Candidate], timing: TimingConfig,
                store: RecordStore | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    """Every conv's runoff (resuming from the store's runoff records of the same contenders); the records."""
    from tqdm.auto import tqdm

    from .plan import _candidates_of

    convs = {c.name: c for c in model.convs}
    by_impl = {c.impl: c for c in candidates}
    context = record_context(model, device)
    done = _done(store, context)
    results: list[dict] = []
    todo = []
    for name, recs in _candidates_of(records, convs, candidates, folded=False).items():
        field = [r for r in contenders(recs) if r["impl"] in by_impl]
        impls = sorted(r["impl"] for r in field)
        if len(impls) < 2:
            continue
        kept = [done.get((name, impl)) for impl in impls]
        if all(r is not None and r.get("contenders") == impls and r.get("config", "") == by_impl[r["impl"]].config_for(
                convs[name]) for r in kept):
            results += kept
        else:
            todo.append((convs[name], [by_impl[impl] for impl in impls]))
    with tqdm(total=len(todo), desc="runoffs", disable=not progress, unit="conv") as bar, \
            SessionKeeper(device) as sessions:
        for layer, field in todo:
            interrupts.check()
            bar.set_postfix_str(f"{layer.name}: {len(field)} contenders", refresh=False)
            try:
                session = sessions.get()
                with hang_guard(device, sessions.server):  # bounded: a hung call ends its server
                    found = _runoff(model, device, session, layer, field, timing, seed)
            except Exception as err:  # noqa: BLE001 - the plan falls back to the sweep's records of this conv
                interrupts.check()  # a Ctrl-C that came out as another error stops the run
                log.warning("runoff of %s skipped: %s", layer.name, err)
                sessions.lost()
                found = []
            for record in found:
                record = {**context, **record, "runoff": True, "contenders": sorted(c.impl for c in field)}
                if store is not None:
                    record = store.append(KIND, record)
                results.append(record)
            bar.update()
    return results


def _done(store: RecordStore | None, context: dict) -> dict:
    if store is None:
        return {}
    where = {"model_fingerprint": context["model_fingerprint"], "threads": context["threads"],
             "device.target": context["device"]["target"], "emulated": context["emulated"]}
    return store.latest(KIND, ("layer", "impl"), where)


def _runoff(model: Model, device, session, layer, field: list[Candidate], timing: TimingConfig,
            seed: int) -> list[dict]:
    """Set up every contender in one session, check each, then time them in rotating rounds."""
    case = ConvCase.from_model(model, layer, seed)
    entered = {}  # impl -> (its Measurement, its running kernel): those set up and checked
    for candidate in field:
        try:
            running = candidate.setup(session, case, device)
            ok, max_abs_err, rel_err = check_numerics(running.run_once(), case.reference,
                                                      candidate.tolerance_for(layer))
        except Exception as err:  # noqa: BLE001 - measured in the sweep; here it only drops out
            if is_transport_failure(err, session):
                raise  # the session died: the caller revives the device
            log.warning("runoff of %s: %s dropped out (%s)", layer.name, candidate.impl, err)
            continue
        if ok:
            entered[candidate.impl] = (Measurement(
                layer.name, candidate.impl, "ok", numerics_ok=True, max_abs_err=max_abs_err, rel_err=rel_err,
                tolerance=candidate.tolerance_for(layer), note=candidate.note, alias_of=candidate.alias_of,
                config=candidate.config_for(layer)), running)
    if len(entered) < 2:
        return []
    one = TimingConfig(number=timing.number, repeat=1, min_repeat_ms=timing.min_repeat_ms, extra_rounds=0)
    order = list(entered)
    times: dict[str, list[float]] = {impl: [] for impl in order}
    loads = [device_load(session)]
    for round_ in range(rounds_for(timing)):
        interrupts.check()
        shift = round_ % len(order)
        for impl in order[shift:] + order[:shift]:
            times[impl] += [s * 1e3 for s in entered[impl][1].time(one)]
    loads.append(device_load(session))
    for impl, (result, _) in entered.items():
        result.repeats_ms = times[impl]
        annotate(result, result.repeats_ms, loads)
        result.gflops = case.flops / (result.median_ms * 1e-3) / 1e9
    return [{**result.to_dict(), "flops": case.flops} for result, _ in entered.values()]
