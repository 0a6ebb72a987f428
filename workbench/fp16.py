"""FP16 Winograd on a device: the error NNPACK's wt8x8_fp16 adds over wt8x8, measured.

NNPACK stores the Winograd F(6x6, 3x3) transforms as FP16 only on ARM with NEON-FP16 (every
aarch64 CPU); elsewhere wt8x8_fp16 quietly runs wt8x8. Both algorithms go through the protocol of
measure.py over RPC (checked against the float64 reference, then timed, every result a record),
on a few 3x3 stride-1 convs. Whether FP16 was really used is read from the measurement, not
assumed: an alias gives wt8x8's output bit for bit, hence exactly the same error against the
reference, while FP16 storage moves it by orders of magnitude. The library's own answer
(nnpack.fp16_winograd for the device's CPU) is kept beside it, so a disagreement shows.

Timings of an emulated device stay in the records, labelled; the rows and the summary never
show them as speed.
"""

from __future__ import annotations

import statistics

from . import nnpack
from .compare import compare
from .errors import UserError
from .measure import TimingConfig
from .model import Model, UNetSpec, reference_unet

KIND = "fp16_numerics"
ALGORITHMS = ("wt8x8", "wt8x8_fp16")
# A tiny UNet whose middle convs are the default probe: 16->16 at 24x24 and 64->64 at 12x12.
PROBE_SPEC = UNetSpec(widths=(16, 64), in_channels=3, classes=2, height=24, width=24)
PROBE_LAYERS = ("enc0_conv2", "enc1_conv2")


def probe_model() -> Model:
    return reference_unet(PROBE_SPEC, seed=0)


def winograd_layers(model: Model, names: list[str] | None = None) -> list[str]:
    """The convs to measure: `names` (each must be one Winograd F(6x6, 3x3) applies to), else
    every such conv of the model; one clear error when there is none."""
    chosen = model.select_convs(names)
    for conv in chosen if names else ():
        reason = nnpack.why_not_applicable(conv.geometry, "wt8x8")
        if reason:
            raise UserError(f"layer {conv.name!r} ({conv.geometry.describe()}): {reason}; FP16 Winograd needs a "
                            "3x3 stride-1 conv (python -m workbench layers lists them)")
    usable = [c.name for c in chosen if nnpack.why_not_applicable(c.geometry, "wt8x8") is None]
    if not usable:
        raise UserError(f"model {model.name!r} has no 3x3 stride-1 conv: FP16 Winograd applies to none of its layers")
    return usable


def fp16_numerics(device, model: Model | None = None, layers: list[str] | None = None,
                  timing: TimingConfig | None = None, store=None, seed: int = 0) -> list[dict]:
    """wt8x8 and wt8x8_fp16 on each layer of `model` (default: the probe's two convs) on the device.

    Returns rows with layer, shape, algorithm, rel_err (max |y - ref| / max |ref| against float64),
    the error FP16 adds over wt8x8, fp16_really_used (measured), library_says_fp16, emulated. With
    a RecordStore, the protocol's conv_measurement records and these rows (kind "fp16_numerics")
    are appended to it. Always measured afresh: numerics are the point, and two convs are cheap.
    `seed` draws the inputs (measure.ConvCase).
    """
    if model is None:
        model, layers = probe_model(), list(layers or PROBE_LAYERS)
    names = winograd_layers(model, layers)
    machine = (getattr(device, "info", None) or {}).get("machine")
    threads = int(device.target.get("num-cores") or 1)
    from .kernels.nnpack import NNPACKCandidate

    candidates = [NNPACKCandidate(a, "compute", threads, machine) for a in ALGORITHMS]
    records = compare(model, device, names, candidates=candidates, timing=timing or TimingConfig.quick(),
                      store=store, resume=False, seed=seed, progress=False)
    rows = [row for name in names for row in _layer_rows(model, name, records, machine)]
    for row in rows if store is not None else ():
        store.append(KIND, row, model=model.name, model_fingerprint=model.fingerprint)
    return rows


def _layer_rows(model: Model, name: str, records: list[dict], machine: str | None) -> list[dict]:
    """The two rows of one conv: each algorithm's error, and what FP16 adds to wt8x8's."""
    by = {r["impl"]: r for r in records if r["layer"] == name}
    fp32, fp16 = (by[f"nnpack:{a}:compute"] for a in ALGORITHMS)
    measured = fp32.get("max_abs_err") is not None and fp16.get("max_abs_err") is not None
    # Bit-identical outputs (an alias) give exactly the same max error; FP16 storage never does.
    really = (fp16["max_abs_err"] != fp32["max_abs_err"]) if measured else None
    says, why = nnpack.fp16_winograd(machine)
    common = {"layer": name, "shape": model.layer(name).geometry.describe(), "machine": machine,
              "emulated": bool(fp16.get("emulated")), "device": fp16.get("device"),
              "library_says_fp16": says, "library_reason": why}
    rows = []
    for algorithm, record in zip(ALGORITHMS, (fp32, fp16)):
        is_fp16 = algorithm == "wt8x8_fp16"
        added = ratio = None
        if measured and is_fp16:
            added = fp16["rel_err"] - fp32["rel_err"]
            ratio = fp16["rel_err"] / fp32["rel_err"] if fp32["rel_err"] else None
        rows.append({**common, "algorithm": algorithm, "impl": record["impl"], "status": record["status"],
                     "rel_err": record.get("rel_err"), "max_abs_err": record.get("max_abs_err"),
                     "tolerance": record.get("tolerance"), "numerics_ok": record.get("numerics_ok"),
                     "fp16_really_used": really if is_fp16 else False,
                     "added_rel_err": added, "ratio_to_wt8x8": ratio,
                     # on an emulated device this is qemu's time, never a board's speed
                     "median_ms": record.get("median_ms"), "note": record.get("note", "")})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """One line of figures per device (machine and emulation): the worst errors over its convs."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("machine"), bool(row.get("emulated")), _emulation(row)), []).append(row)
    out = []
    for (machine, emulated, emulation), group in groups.items():
        fp16 = [r for r in group if r["algorithm"] == "wt8x8_fp16" and r.get("rel_err") is not None]
        fp32 = [r for r in group if r["algorithm"] == "wt8x8" and r.get("rel_err") is not None]
        used = {r.get("fp16_really_used") for r in fp16}
        out.append({
            "machine": machine, "emulated": emulated, "emulation": emulation,
            "layers": sorted({r["layer"] for r in group}),
            "fp16_really_used": used.pop() if len(used) == 1 else None,  # None: unknown or mixed
            "library_says_fp16": group[0].get("library_says_fp16"), "library_reason": group[0].get("library_reason"),
            "fp16_rel_err": max((r["rel_err"] for r in fp16), default=None),
            "wt8x8_rel_err": max((r["rel_err"] for r in fp32), default=None),
            "added_rel_err": max((r["added_rel_err"] for r in fp16 if r.get("added_rel_err") is not None),
                                 default=None),
            "median_ratio": _median([r["ratio_to_wt8x8"] for r in fp16 if r.get("ratio_to_wt8x8")]),
        })
    return out


def _emulation(row: dict) -> str | None:
    return (row.get("device") or {}).get("emulation") if row.get("emulated") else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def row_line(row: dict) -> str:
    """One row for a terminal: the conv, the algorithm and its error (or why there is none)."""
    measured = row.get("rel_err") is not None
    error = f"relative error {row['rel_err']:.3g}" if measured else f"{row['status']}: {row['note']}"
    return f"{row['layer']} ({row['shape']}) {row['algorithm']}: {error}"


def device_name(figures: dict) -> str:
    """How a summary's device is named in sentences: its CPU, and the emulation when there was one."""
    name = figures.get("machine") or "an unknown CPU"
    return f"{name} (emulated: {figures.get('emulation') or 'qemu'})" if figures.get("emulated") else name


def sentence(figures: dict) -> str:
    """The finding of one device, in a sentence (the report and the command line say it)."""
    where, layers = device_name(figures), len(figures["layers"])
    if figures["fp16_really_used"] is None:
        return f"FP16 Winograd on {where}: not measured (a run failed); see the records."
    if not figures["fp16_really_used"]:
        return (f"On {where}, nnpack:wt8x8_fp16 is an alias of wt8x8: its output is identical to wt8x8's on "
                f"{layers} conv(s) (max relative error {figures['wt8x8_rel_err']:.2g} for both); "
                f"{figures['library_reason']}.")
    ratio = f", a median {figures['median_ratio']:.0f}x more" if figures["median_ratio"] else ""
    text = (f"FP16 Winograd on {where}: adds {figures['added_rel_err']:.2g} relative error over wt8x8 "
            f"(max |y - ref| / max |ref| against float64: wt8x8_fp16 {figures['fp16_rel_err']:.2g}, wt8x8 "
            f"{figures['wt8x8_rel_err']:.2g}{ratio}, over {layers} conv(s); its output differs from wt8x8's, so "
            "FP16 is really used).")
    if figures["library_says_fp16"] is False:
        text += " The library took it for an alias here: its rule for this CPU is wrong."
    return text + (" Emulated timings not shown as speed." if figures["emulated"] else "")
