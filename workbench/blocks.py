"""The per-block sweep: each conv with the ops around it, folded into its kernel or run separately.

A block is a conv and what its kernel may compute besides conv + bias: the encoder's
MaxPool+ReLU before it, the decoder's Resize+Add(skip)+ReLU (or a ReLU) after it. For every
block that can fold more than a ReLU, the fastest few TVM implementations of the conv (by
their isolated times) that can compute the fold are measured with it folded in, and each
elementwise group is measured as the original study's separate fused kernel. The plan then
folds a block only where that measured faster (plan.fold_where_faster). Every variant goes
through the one protocol: checked against the PyTorch reference of the whole block first.
"""

from __future__ import annotations

import logging

from .fusion import Fusion, fused_layers, fusible_chain, prologue_chain, prologue_layers
from .kernels import fused
from .kernels.base import Candidate
from .measure import FINAL, ConvCase, TimingConfig, usable
from .model import Layer, Model
from .records import RecordStore

log = logging.getLogger(__name__)

KIND = "block_measurement"
TOP = 2  # implementations per block measured with the fold: the isolated winners


def folds(model: Model, conv: Layer, candidate: Candidate) -> Fusion | None:
    """The most a candidate can fold around this conv, or None when that is at most a ReLU."""
    epilogue = fusible_chain(model, conv, candidate.fusible)
    prologue = prologue_chain(model, conv, candidate.prologue_fusible)
    fusion = Fusion.of(tuple(prologue_layers(model, conv, prologue)), tuple(fused_layers(model, conv, epilogue)))
    return fusion if fusion.pool or fusion.add or fusion.scale > 1 else None


def block_variants(model: Model, records: list[dict], candidates: list[Candidate],
                   top: int = TOP) -> list[tuple[Layer, Candidate, Fusion]]:
    """(conv, candidate, fold) to measure: per foldable conv, its `top` fastest folding candidates."""
    ranked: dict[str, list[tuple[float, str]]] = {}
    for rec in usable(records):
        if not rec.get("fusion"):
            ranked.setdefault(rec["layer"], []).append((rec["median_ms"], rec["impl"]))
    by_impl = {c.impl: c for c in candidates}
    variants = []
    for conv in model.convs:
        chosen = 0
        for _, impl in sorted(ranked.get(conv.name, [])):
            candidate = by_impl.get(impl)
            fusion = folds(model, conv, candidate) if candidate is not None else None
            if fusion is not None and chosen < top:
                variants.append((conv, candidate, fusion))
                chosen += 1
    return variants


def absorbed_groups(model: Model, conv: Layer, prologue: tuple[str, ...], epilogue: tuple[str, ...]) -> list[str]:
    """Last layers of the elementwise groups (kernels/fused.py) a fold replaces: the pool, the resize+add."""
    taken = {m.name for m in prologue_layers(model, conv, prologue)}
    taken |= {m.name for m in fused_layers(model, conv, epilogue)}
    # Only a group the fold takes whole is replaced: a ReLU left behind still runs.
    return [group[-1].name for group in fused.elementwise_groups(model) if all(m.name in taken for m in group)]


def separate_groups(model: Model, variants: list[tuple[Layer, Candidate, Fusion]]) -> list[tuple[Layer, ...]]:
    """The elementwise groups the measured folds would absorb: what they are weighed against."""
    wanted = set()
    for conv, _, fusion in variants:
        wanted |= set(absorbed_groups(model, conv, fusion.prologue_ops, fusion.epilogue_ops))
    return [group for group in fused.elementwise_groups(model) if group[-1].name in wanted]


def measure_blocks(model: Model, device, records: list[dict], candidates: list[Candidate],
                   timing: TimingConfig = TimingConfig(), store: RecordStore | None = None,
                   resume: bool = True, seed: int = 0, progress: bool = True) -> list[dict]:
    """Measure every block variant and the separate kernels they are weighed against; the records."""
    from tqdm.auto import tqdm

    from .compare import measure_surviving
    from .rpc import SessionKeeper

    variants = block_variants(model, records, candidates)
    groups = separate_groups(model, variants)
    threads = int(device.target.get("num-cores") or 1)
    emulated = bool(getattr(device, "emulated", False))  # never a board's speed, never reused for one
    context = {"model": model.name, "model_fingerprint": model.fingerprint, "device": device.describe(),
               "threads": threads, "emulated": emulated}
    where = {"model": model.name, "model_fingerprint": model.fingerprint, "threads": threads,
             "device.target": device.target}
    done = store.latest(KIND, ("layer", "impl", "fusion"), where) if store and resume else {}
    done = {key: rec for key, rec in done.items() if bool(rec.get("emulated")) == emulated}
    jobs = [(conv.name, candidate, fusion.label, lambda conv=conv, fusion=fusion: ConvCase.from_model(
        model, conv, seed, fusion=fusion), fusion) for conv, candidate, fusion in variants]
    for group in groups:
        kernel = fused.elementwise_kernel(group)
        jobs.append((group[-1].name, kernel, "+".join(m.op for m in group),
                     lambda group=group: fused.GroupCase.from_model(model, group, seed), None))
    results = []
    bar = tqdm(jobs, desc="blocks, folded and separate", disable=not progress, unit="run")
    with SessionKeeper(device) as sessions:
        for layer, candidate, label, make_case, fusion in bar:
            old = done.get((layer, candidate.impl, label))
            if old is not None and old.get("status") in FINAL and \
                    old.get("config", "") == candidate.config_for(model.layer(layer)):
                results.append(old)
                continue
            bar.set_postfix_str(f"{layer} {candidate.impl} {label}")
            case = make_case()
            result = measure_surviving(candidate, case, sessions, device, timing)
            record = {**context, **result.to_dict(), "fusion": label, "flops": case.flops, "server": sessions.server,
                      "prologue": list(fusion.prologue_ops) if fusion else [],
                      "epilogue": list(fusion.epilogue_ops) if fusion else []}
            if store:
                store.append(KIND, record)
            results.append(record)
    return results
