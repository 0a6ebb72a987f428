"""int8 on a network after its float32 study: per conv, the int8 kernels beside the float32 winner,
and end to end, the int8 hybrid and the int8 peers beside float32 ONNX Runtime (notebook 06 and
benchmarks/other_networks.py).

The measurements themselves are int8_e2e's (calibration in quant.py, the kernels in kernels/int8.py);
this module lines them up against the float32 study's records of the same work dir.
"""

from __future__ import annotations

from . import families, quant
from .int8_e2e import EVAL_INPUTS, int8_end_to_end, measure_int8_layers
from .measure import usable
from .model import Model
from .records import WorkDir

INT8_IMPLS = ("qnnpack:int8", "tvm:int8")


def float_winners(model: Model, work: WorkDir) -> dict[str, dict]:
    """conv -> its fastest usable float32 record (unfused) in the work dir's study."""
    names = {c.name for c in model.convs}
    best: dict[str, dict] = {}
    for record in usable(work.records.read("conv_measurement")):
        layer = record.get("layer")
        if layer in names and record.get("model") in (None, model.name) and not record.get("fusion") \
                and record["impl"] not in INT8_IMPLS and record["median_ms"] < best.get(layer, {}).get("median_ms", 1e99):
            best[layer] = record
    return best


def layer_rows(model: Model, float_best: dict[str, dict], int8_records: list[dict]) -> list[dict]:
    """Per conv: its class, the float32 winner's time, each int8 kernel's time and quantisation error,
    and the faster int8 kernel's time over float32's (below 1: int8 is faster)."""
    rows = []
    for conv in model.convs:
        mine = {r["impl"]: r for r in int8_records if r.get("layer") == conv.name}
        row = {"layer": conv.name, "class": families.conv_class(conv)}
        fp32 = float_best.get(conv.name)
        row.update(float32_impl=fp32["impl"] if fp32 else None, float32_ms=fp32["median_ms"] if fp32 else None)
        for impl in INT8_IMPLS:
            record = mine.get(impl, {})
            short = impl.split(":")[0]
            row[f"{short}_ms"] = record.get("median_ms") if record.get("numerics_ok") else None
            row[f"{short}_quant_error"] = record.get("quant_error")
            if record.get("status") in ("not_applicable", "wrong", "failed", "crashed"):
                row[f"{short}_note"] = f"{record['status']}: {record.get('note') or ''}".strip(": ")
        int8_times = [row[f"{i.split(':')[0]}_ms"] for i in INT8_IMPLS if row[f"{i.split(':')[0]}_ms"]]
        row["int8_over_float32"] = min(int8_times) / row["float32_ms"] if int8_times and row["float32_ms"] else None
        rows.append(row)
    return rows


def network_int8(model: Model, device, work: WorkDir, config, threads: int, inputs: int = EVAL_INPUTS,
                 float_hybrid=None) -> dict:
    """Calibrate, measure both int8 kernels on every conv, then the int8 hybrid and the int8 peers end to end
    ({"layers": rows, "end_to_end": rows, "calibration": digest}). `float_hybrid`, the study's compiled float32
    hybrid, is timed in the same run as the int8 one (row `float32_hybrid`)."""
    calibration = quant.calibrate_model(model)
    records = measure_int8_layers(model, device, calibration, threads, config.timing)
    extra = {"float32_hybrid": float_hybrid} if float_hybrid is not None else None
    end_to_end = int8_end_to_end(model, device, threads, config.end_to_end_timing, inputs=inputs,
                                 layer_records=records, calibration=calibration, extra=extra)
    return {"layers": layer_rows(model, float_winners(model, work), records), "end_to_end": end_to_end,
            "calibration": quant.digest(calibration)}
