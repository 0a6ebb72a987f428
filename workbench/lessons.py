"""Each notebook's lessons, computed from its own results, so that a lesson that stops being true
(after a dependency changes, say) fails the tests instead of staying in the prose.

A lesson is a claim, whether it holds, and the evidence (the numbers it was decided on). Claims
about timings compare confidence intervals (stats.py): "not slower by more than noise" means
the one interval does not lie wholly above the other. A claim that noise at a small budget can
overturn is marked `asserted=False` there, and so is every timing claim that rests on a measurement
flagged disturbed (measured again and still wide, or the device's cores were busy): it is shown with
its evidence, and the tests assert only the lessons that are asserted.

`show(lessons)` prints them in a notebook and attaches them to the cell's output as
`application/vnd.workbench.lessons+json`; `from_notebook(path)` reads them back from an
executed notebook (tests/test_notebooks.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from . import stats
from .measure import usable

MIME = "application/vnd.workbench.lessons+json"
PEERS = ("onnxruntime", "torch", "torch_nnpack", "nnpack_everywhere", "tvm_only", "tvm_untuned")


@dataclass
class Lesson:
    claim: str
    holds: bool
    evidence: str
    asserted: bool = True  # False: shown, not checked (noise can overturn it at this budget)

    def __post_init__(self):
        self.holds, self.asserted = bool(self.holds), bool(self.asserted)  # numpy bools are not JSON

    def line(self) -> str:
        mark = "holds" if self.holds else "DOES NOT HOLD"
        return f"[{mark}{'' if self.asserted else ', not asserted at this budget'}] {self.claim}\n    {self.evidence}"


def show(lessons: list[Lesson]) -> list[Lesson]:
    """Print the lessons and attach them to the cell's output (for the tests to read back)."""
    text = "\n".join(lesson.line() for lesson in lessons)
    try:
        from IPython.display import display

        display({"text/plain": text, MIME: [asdict(lesson) for lesson in lessons]}, raw=True)
    except ImportError:  # outside IPython: printing is all there is
        print(text)
    return lessons


def from_notebook(path: str | Path) -> list[dict]:
    """Every lesson an executed notebook showed (in order)."""
    found = []
    for cell in json.loads(Path(path).read_text())["cells"]:
        for output in cell.get("outputs", []):
            found += output.get("data", {}).get(MIME, [])
    return found


def _fmt(ci) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}] ms" if ci else "-"


def _disturbed(*measurements) -> bool:
    """Whether any of these records or rows was flagged disturbed (measure.py): measured again and still
    wide, or other work on the device's cores. A claim that rests on one decides nothing."""
    return any(bool(m and m.get("disturbed")) for m in measurements)


DISTURBED_NOTE = "; a measurement was disturbed"
TINY_MODEL_MS = 1.0  # whole models faster than this: one burst of other work can decide a comparison


# ---------------------------------------------------------------- 01: layers and the roofline

def layer_lessons(table: pd.DataFrame, edges: list[str], ridge: float) -> list[Lesson]:
    """From the layer table (intensity.layer_table), the edge convs and the measured ridge point."""
    convs = table[table.op == "conv"]
    top = convs.loc[convs.intensity.idxmax()]
    middle = convs[~convs.name.isin(edges)]
    edge = convs[convs.name.isin(edges)]
    lowest = convs.loc[convs.intensity.idxmin()]
    return [
        Lesson("The conv with the highest arithmetic intensity is in the middle of the network, not among the "
               "first and last two convs.", top["name"] not in edges,
               f"highest: {top['name']} at {top.intensity:.1f} FLOP/byte; edge convs: {', '.join(edges)}"),
        Lesson("Every one of the first and last two convs (few channels, large image) has a lower intensity than "
               "every middle conv.", bool(len(middle)) and edge.intensity.max() < middle.intensity.min(),
               f"edge convs {edge.intensity.min():.1f} to {edge.intensity.max():.1f} FLOP/byte; middle convs "
               f"{middle.intensity.min():.1f} to {middle.intensity.max():.1f}"),
        Lesson("The lowest-intensity conv is an edge conv, the one closest to the ridge point (or below it: "
               "memory-bound).", lowest["name"] in edges,
               f"lowest: {lowest['name']} at {lowest.intensity:.1f} FLOP/byte; measured ridge at "
               f"{ridge:.1f} FLOP/byte; {int((convs.intensity < ridge).sum())} of {len(convs)} convs below it"),
    ]


# ---------------------------------------------------------------- 02: NNPACK's algorithms

def _by_impl(records: list[dict]) -> dict[tuple[str, str], dict]:
    found = {}
    for record in sorted(usable(records), key=lambda r: -r["median_ms"]):  # the fastest per key kept
        if not record.get("fusion"):
            found[(record["layer"], record["impl"])] = record
    return found


def _checked_before_timed(records: list[dict]) -> Lesson:
    timed = [r for r in records if r.get("median_ms") is not None]
    unchecked = [f"{r['layer']} {r['impl']}" for r in timed if r.get("numerics_ok") is None]
    wrong = [r for r in timed if r.get("numerics_ok") is False]
    return Lesson("Every timed kernel's output was checked against the PyTorch reference first; none that "
                  "failed the check is usable.", not unchecked and not any(r in usable(records) for r in wrong),
                  f"{len(timed)} timed, {len(wrong)} wrong (never chosen), unchecked: {unchecked[:3] or 'none'}")


def nnpack_lessons(records: list[dict], edges: list[str], widest: str, quick: bool) -> list[Lesson]:
    """From the per-layer records of NNPACK and TVM's default (notebook 02)."""
    found = _by_impl(records)
    pairs = [(layer, impl, found[(layer, impl.replace(":precompute", ":compute"))], rec)
             for (layer, impl), rec in found.items()
             if impl.startswith("nnpack:") and impl.endswith(":precompute")
             and (layer, impl.replace(":precompute", ":compute")) in found]
    slower = [f"{layer} {impl.split(':')[1]}: {_fmt(stats.interval(pre))} vs compute {_fmt(stats.interval(com))}"
              for layer, impl, com, pre in pairs if stats.clearly_below(stats.interval(com), stats.interval(pre))]
    profiled = [(layer, impl, com, pre) for layer, impl, com, pre in pairs if com.get("phases") and pre.get("phases")]
    kept = [f"{layer} {impl.split(':')[1]}" for layer, impl, com, pre in profiled
            if pre["phases"].get("kernel_transform_ms", 0) > 0.01 * com["phases"].get("kernel_transform_ms", 0)]
    lessons = [
        Lesson("Precompute takes the kernel transform out of every call: its per-call kernel-transform phase is "
               "below 1% of compute's, for every layer and algorithm profiled.", bool(profiled) and not kept,
               f"{len(profiled)} pairs profiled; still transforming: {kept[:3] or 'none'}"),
        Lesson("NNPACK's precompute is never slower than compute by more than noise (whole calls timed).",
               not slower, f"{len(pairs)} pairs; precompute's interval wholly above compute's in {len(slower)}"
               + (f": {'; '.join(slower[:3])}" if slower else ""),
               # At small test sizes a call is mostly fixed overhead, and 3 quick repeats give a 75% interval.
               asserted=not quick),
        _checked_before_timed(records),
    ]
    shares = {layer: _transform_share(found, layer) for layer in [*edges, widest]}
    wide_share = shares.pop(widest)
    known = {layer: share for layer, share in shares.items() if share is not None}
    lessons.append(Lesson(
        "NNPACK's Winograd (wt8x8) spends a larger share of its time in its input and output transforms on every "
        "few-channel edge conv than on the widest conv: there is little block multiplication to amortise them.",
        wide_share is not None and bool(known) and all(share > wide_share for share in known.values()),
        f"transforms / (transforms + multiplication): widest {widest} "
        f"{'-' if wide_share is None else f'{wide_share:.0%}'}; "
        + "; ".join(f"{layer} {share:.0%}" for layer, share in known.items()),
        asserted=wide_share is not None and bool(known)))
    lessons.append(_relative_to_tvm(found, edges, widest))
    return lessons


def _transform_share(found: dict, layer: str) -> float | None:
    """Input + output transform time over that plus the block multiplication (wt8x8, compute)."""
    phases = (found.get((layer, "nnpack:wt8x8:compute")) or {}).get("phases") or {}
    transforms = phases.get("input_transform_ms", 0) + phases.get("output_transform_ms", 0)
    total = transforms + phases.get("block_multiplication_ms", 0)
    return transforms / total if total else None


def _best(found: dict, layer: str, prefix: str) -> dict | None:
    options = [r for (l, impl), r in found.items() if l == layer and impl.startswith(prefix)]
    return min(options, key=lambda r: r["median_ms"]) if options else None


def _relative_to_tvm(found: dict, edges: list[str], widest: str) -> Lesson:
    """NNPACK's best over TVM's default, bounded with the intervals: worse on every edge than on the widest."""
    def bounds(layer):
        nn, tvm = _best(found, layer, "nnpack:"), found.get((layer, "tvm:default"))
        if nn is None or tvm is None:
            return None
        (nlo, nhi), (tlo, thi) = stats.interval(nn), stats.interval(tvm)
        return nlo / thi, nhi / tlo  # the ratio's range given both intervals

    wide = bounds(widest)
    ratios = {layer: bounds(layer) for layer in edges}
    disturbed = _disturbed(*[r for layer in [widest, *edges]
                             for r in (_best(found, layer, "nnpack:"), found.get((layer, "tvm:default")))])
    ok = wide is not None and all(r is not None and r[0] > wide[1] for r in ratios.values())
    shown = "; ".join(f"{layer} {r[0]:.2g}-{r[1]:.2g}" for layer, r in ratios.items() if r)
    return Lesson("NNPACK does relatively worse on the edge convs: its best time over TVM's default schedule is "
                  "higher on every edge conv than on the widest conv, beyond noise.", ok,
                  f"NNPACK best / TVM default (range from the intervals): widest {widest} "
                  f"{'-' if wide is None else f'{wide[0]:.2g}-{wide[1]:.2g}'}; {shown}"
                  + (DISTURBED_NOTE if disturbed else ""), asserted=not disturbed)


# ---------------------------------------------------------------- 03: schedules and tuning

def _not_slower(fast: dict, slow_name: str, slow: dict) -> bool:
    """`fast` is not slower than `slow` by more than noise: its interval is not wholly above."""
    return not stats.clearly_below(stats.interval(slow), stats.interval(fast))


def schedule_lessons(steps: list[dict], refused: bool, here: list[dict], records: list[dict], edges: list[str],
                     quick: bool) -> list[Lesson]:
    """From the step-by-step schedule's records, whether a misfit knob was refused, the one layer's
    default/hand/tuned records, and every layer's records (notebook 03)."""
    wrong_steps = [s["impl"] for s in steps if not s.get("numerics_ok")]
    first, last = steps[0], steps[-1]
    by_impl = {r["impl"]: r for r in here}
    default, tuned = by_impl.get("tvm:default"), by_impl.get("tvm:tuned")
    found = _by_impl(records)
    edge_rows = []
    for layer in edges:
        tvm, nn = _best(found, layer, "tvm:"), _best(found, layer, "nnpack:")
        if tvm and nn:
            edge_rows.append((layer, tvm, nn, stats.clearly_below(stats.interval(tvm), stats.interval(nn))))
    lessons = [
        Lesson("Every step of the hand schedule computes the same output as PyTorch: a schedule primitive changes "
               "the speed, never the answer.", not wrong_steps,
               f"{len(steps)} steps checked; wrong: {wrong_steps or 'none'}"),
        Lesson("The finished hand schedule is not slower than its unscheduled compute by more than noise.",
               _not_slower(last, "", first),
               f"unscheduled {_fmt(stats.interval(first))}, finished {_fmt(stats.interval(last))}"
               + (DISTURBED_NOTE if _disturbed(first, last) else ""),
               # Two single kernels on a shared machine: a disturbed one (measure.py) decides nothing. On a
               # quick run's tiny layer the finished schedule's thread-pool launch outweighs the work it
               # splits (0.048 against 0.018 ms once in CI): the claim is about layers of real size.
               asserted=not (quick or _disturbed(first, last))),
        Lesson("The finished hand schedule is faster than its unscheduled compute, beyond noise.",
               stats.clearly_below(stats.interval(last), stats.interval(first)),
               f"unscheduled {_fmt(stats.interval(first))}, finished {_fmt(stats.interval(last))}",
               # On a small layer the unscheduled loops are already close: noise can hide the gain.
               asserted=not quick),
        Lesson("A knob value that does not fit the layer is refused before anything is built.", refused,
               "schedules.validate_knobs raised KnobError" if refused else "the misfit knob was accepted"),
        _checked_before_timed(records),
        Lesson("On every few-channel edge conv, a TVM schedule beats NNPACK's best beyond noise.",
               bool(edge_rows) and all(row[3] for row in edge_rows),
               "; ".join(f"{layer}: {tvm['impl']} {_fmt(stats.interval(tvm))} vs {nn['impl']} "
                         f"{_fmt(stats.interval(nn))}" for layer, tvm, nn, _ in edge_rows) or "no edge conv measured",
               asserted=bool(edge_rows) and not _disturbed(*[r for row in edge_rows for r in row[1:3]])),
    ]
    if default and tuned:
        lessons.append(Lesson(
            "MetaSchedule's tuned schedule is not slower than TVM's default by more than noise.",
            _not_slower(tuned, "tvm:default", default),
            f"tuned {_fmt(stats.interval(tuned))}, default {_fmt(stats.interval(default))}",
            # A handful of trials is a random schedule: only a real budget makes this a claim.
            asserted=not quick))
    lessons += _knob_tuner_lessons(here, quick)
    return lessons


def _knob_tuner_lessons(here: list[dict], quick: bool) -> list[Lesson]:
    """The knob tuner's best point (tvm:hand_tuned) against the hand schedule's defaults and MetaSchedule."""
    by_impl = {r["impl"]: r for r in here}
    knob, tuned = by_impl.get("tvm:hand_tuned"), by_impl.get("tvm:tuned")
    defaults = [r for r in here if r["impl"].startswith("tvm:") and r["impl"] not in
                ("tvm:default", "tvm:tuned", "tvm:hand_tuned")]
    if not knob or not defaults:
        return []
    hand = defaults[0]
    disturbed = bool(knob.get("disturbed") or hand.get("disturbed"))
    lessons = [Lesson(
        "The knob tuner's best point is not slower than the hand schedule's default knobs by more than noise "
        "(those defaults are among its starting points).",
        _not_slower(knob, hand["impl"], hand),
        f"knob tuner {_fmt(stats.interval(knob))} ({knob.get('config', '')}), {hand['impl']} defaults "
        f"{_fmt(stats.interval(hand))}" + (DISTURBED_NOTE if disturbed else ""),
        # A quick budget's trials are 3 repeats each of a tens-of-microseconds kernel: the tuner picks among
        # points within noise of each other, and measured again its pick came out 6% behind the defaults
        # (0.050 against 0.047 ms) in one run. A real budget decides.
        asserted=not (quick or disturbed))]
    if tuned:
        lessons.append(Lesson(
            "With the same trials, the knob tuner's best is not slower than MetaSchedule's by more than noise.",
            _not_slower(knob, "tvm:tuned", tuned),
            f"knob tuner {_fmt(stats.interval(knob))}, MetaSchedule {_fmt(stats.interval(tuned))}",
            asserted=not quick))
    return lessons


# ---------------------------------------------------------------- 04: fused operators

def fusion_lessons(results: list, nnpack_calls: dict[str, dict], effect: dict, quick: bool = False) -> list[Lesson]:
    """From the composer's results (composer.Result), NNPACK's identity and fused-ReLU calls, and
    study.fusion_effect's figures (notebook 04)."""
    timed = [r for r in results if r.median_ms is not None]
    unchecked = [r.variant.label for r in timed if r.numerics_ok is None]
    wrong = [r for r in timed if r.numerics_ok is False]
    lessons = [Lesson("Every fused variant is checked against PyTorch (the whole block: pool, resize and add "
                      "included) before it is timed; a wrong one never becomes a block's best.",
                      bool(timed) and not unchecked and not any(r.usable for r in wrong),
                      f"{len(timed)} variants timed, {len(wrong)} wrong; unchecked: {unchecked[:3] or 'none'}")]
    identity, fused = nnpack_calls.get("identity"), nnpack_calls.get("relu")
    if identity and fused and identity.get("median_ms") and fused.get("median_ms"):
        lessons.append(Lesson(
            "NNPACK with the ReLU fused into its output transform is not slower than the identity call the 2018 "
            "study made, by more than noise (and it saves the separate ReLU pass).", _not_slower(fused, "", identity),
            f"fused {_fmt(stats.interval(fused))}, identity {_fmt(stats.interval(identity))}"
            + (DISTURBED_NOTE if _disturbed(fused, identity) else ""),
            # One call, with and without its ReLU, each timed in its own fraction of a second: at a quick
            # budget a burst of other work in one window decides it. A real budget does.
            asserted=not (quick or _disturbed(fused, identity))))
    spans = effect.get("ci_ms") or {}
    if "unfused" in spans and "groups_2018" in spans:
        disturbed = bool({"unfused", "groups_2018"} & set(effect.get("disturbed", [])))
        lessons.append(Lesson(
            "Whole model: the 2018 groups are not slower than every op as its own kernel, by more than noise.",
            not stats.clearly_below(tuple(spans["unfused"]), tuple(spans["groups_2018"])),
            f"unfused {_fmt(spans['unfused'])}, 2018 groups {_fmt(spans['groups_2018'])}"
            + (DISTURBED_NOTE if disturbed else ""),
            # Each build is timed in its own second: under a millisecond (the tests' tiny model), a burst of
            # other work in that second slowed the 2018 groups from 0.52 to 0.86 ms once, with a narrow
            # interval and no load signal. Asserted on models of real size, like the hybrid's (notebook 05).
            asserted=not disturbed and min(spans["unfused"][0], spans["groups_2018"][0]) >= TINY_MODEL_MS))
    return lessons


# ---------------------------------------------------------------- 05: the hybrid

def hybrid_lessons(end_to_end: list[dict], plan, edges: list[str]) -> list[Lesson]:
    """From the end-to-end rows (with intervals) and the hybrid plan (notebook 05)."""
    rows = {r["name"]: r for r in end_to_end}
    hybrid = rows["hybrid"]
    # A peer built into the very same executable as the hybrid (pure TVM, when the plan is all TVM) is
    # one measurement under two names: not a separate contender.
    same = [name for name in PEERS
            if name in rows and str(rows[name].get("note", "")).startswith("the same executable")]
    peers = {name: rows[name] for name in PEERS if name in rows and rows[name].get("median_ms") and name not in same}
    beaten_by = [name for name, row in peers.items()
                 if stats.clearly_below(stats.interval(row), stats.interval(hybrid))]
    fastest = min(peers, key=lambda n: peers[n]["median_ms"]) if peers else None
    on_nnpack = [layer for layer in edges if plan.impl(layer).startswith("nnpack:")]
    disturbed = bool(hybrid.get("disturbed") or rows.get("tvm_untuned", {}).get("disturbed"))
    lessons = [
        Lesson("The hybrid is never slower than the fastest single library (or pure TVM) by more than noise.",
               bool(peers) and not beaten_by,
               f"hybrid {_fmt(stats.interval(hybrid))}; fastest peer {fastest} "
               f"{_fmt(stats.interval(peers[fastest])) if fastest else '-'}; clearly faster than the hybrid: "
               f"{beaten_by or 'none'}" + (f"; the same executable as the hybrid: {', '.join(same)}" if same else ""),
               # Under a millisecond end to end (the tests' tiny model), a burst of other work on shared
               # cores slowed the hybrid's rounds five-fold once without the load signal noticing: shown there,
               # asserted on models of real size.
               asserted=hybrid["median_ms"] >= TINY_MODEL_MS and not hybrid.get("disturbed")),
        Lesson("The hybrid's output matches PyTorch's (checked before it was timed).", bool(hybrid.get("numerics_ok")),
               f"max abs err {hybrid.get('max_abs_err')}"),
        Lesson("Choosing and tuning pay: the hybrid is faster than TVM's untuned build beyond noise.",
               "tvm_untuned" in rows
               and stats.clearly_below(stats.interval(hybrid), stats.interval(rows["tvm_untuned"])),
               f"hybrid {_fmt(stats.interval(hybrid))}, untuned "
               f"{_fmt(stats.interval(rows['tvm_untuned'])) if 'tvm_untuned' in rows else '-'}"
               + (DISTURBED_NOTE if disturbed else ""),
               # A disturbed interval (measured again and still wide: other work on the cores) decides nothing,
               # and under a millisecond (the tiny model) neither does one build's second of timing.
               asserted=not disturbed and hybrid["median_ms"] >= TINY_MODEL_MS),
        Lesson("None of the few-channel, large-image edge convs goes to NNPACK: its transforms cost more than they "
               "save there.", not on_nnpack,
               f"edge convs: {', '.join(f'{layer} {plan.impl(layer)}' for layer in edges)}"),
    ]
    return lessons


# ---------------------------------------------------------------- 06: the other networks

def network_lessons(shares: pd.DataFrame, winners: pd.DataFrame, records: list[dict], end_to_end: dict[str, list[dict]],
                    quick: bool) -> list[Lesson]:
    """From families.flop_shares and winners_by_class of every network, their conv records, and each
    network's end-to-end rows (notebook 06)."""
    dense = shares[shares["class"] == "3x3 stride 1"].set_index("network")["share"]
    by_class = shares.dropna(subset=["median_intensity"]).groupby("class")["median_intensity"].median()
    depthwise = winners[winners["class"] == "depthwise"]
    nnpack_on_depthwise = [r for r in records if r["impl"].startswith("nnpack:")
                           and r.get("layer") in set(depthwise.layer)]
    lessons = [
        Lesson("Winograd's ground, dense 3x3 stride-1 convs, holds less than a tenth of the conv FLOPs in the mobile "
               "networks with depthwise convs.",
               all(dense.get(n, 0) < 0.1 for n in set(shares.network) if _has_depthwise(shares, n)),
               ", ".join(f"{n}: {100 * s:.0f}%" for n, s in dense.items())),
        Lesson("Depthwise convs have the lowest arithmetic intensity of the conv classes: they are memory-bound.",
               "depthwise" not in by_class or by_class.idxmin() == "depthwise",
               ", ".join(f"{c}: {v:.1f} FLOP/B" for c, v in by_class.items())),
        Lesson("NNPACK never runs a depthwise conv: every NNPACK record there is 'not applicable', with the reason.",
               # With depthwise convs, NNPACK must have been tried on them (and refused) for this to hold.
               (depthwise.empty or bool(nnpack_on_depthwise))
               and all(r.get("status") == "not_applicable" and r.get("note") for r in nnpack_on_depthwise),
               f"{len(nnpack_on_depthwise)} NNPACK records on {len(depthwise)} depthwise convs"
               + (f"; e.g. {nnpack_on_depthwise[0].get('note')!r}" if nnpack_on_depthwise else "")),
        _checked_before_timed(records),
    ]
    for network, rows in end_to_end.items():
        by_name = {r["name"]: r for r in rows}
        hybrid = by_name.get("hybrid")
        singles = [by_name[n] for n in ("tvm_only", "nnpack_everywhere") if n in by_name and by_name[n].get("numerics_ok")]
        if hybrid and singles:
            fastest = min(singles, key=lambda r: r["median_ms"])
            lessons.append(Lesson(
                f"{network}: the hybrid is not slower than its fastest single library by more than noise.",
                _not_slower(hybrid, fastest["name"], fastest),
                f"hybrid {_fmt(hybrid.get('ci_ms'))}, {fastest['name']} {_fmt(fastest.get('ci_ms'))}",
                asserted=not quick))  # whole models on a shared machine: a real budget decides
    return lessons


def _has_depthwise(shares: pd.DataFrame, network: str) -> bool:
    row = shares[(shares.network == network) & (shares["class"] == "depthwise")]
    return bool(len(row)) and int(row.convs.iloc[0]) > 0
