"""Int8 benchmark: per conv, float32 against QNNPACK's and TVM's int8 kernels; end to end, the int8
hybrid and ONNX Runtime's static quantisation against float32 ONNX Runtime, with their
quantisation error.

Usage: python benchmarks/int8.py [--network NAME | --onnx FILE | --small] [--threads N]
                                 [--inputs 64] [--float-impls ID,ID] [--out int8.json]

Per conv (model calibration, the protocol of measure.py over a local RPC cluster): the fastest
float32 time among --float-impls, `qnnpack:int8` and `tvm:int8` times (uint8 in -> uint8 out),
int8/float32 (the faster int8 over the float32 best) and quant_error (max relative error of the
dequantised int8 output against float32). End to end: median ms and interval, top-1 agreement
with float32 on --inputs seeded random inputs (per-pixel argmax for a segmentation output) and
max relative error. Prints a table and writes JSON.
"""

import argparse
import importlib
import json
import sys
import time

from workbench import quant
from workbench.compare import compare
from workbench.errors import WorkbenchError
from workbench.int8_e2e import EVAL_INPUTS, int8_end_to_end, measure_int8_layers
from workbench.kernels.registry import all_candidates, find
from workbench.measure import TimingConfig, usable
from workbench.model import UNetSpec, load_onnx, reference_unet
from workbench.records import RecordStore
from workbench.rpc import open_device

FLOAT_IMPLS = "nnpack:auto:precompute,tvm:direct_nchwc,tvm:winograd_4"


def resolve_model(network: str | None, onnx: str | None, small: bool):
    """The model: an ONNX file, a named network (workbench.networks when it exists), or the UNet."""
    if onnx:
        return load_onnx(onnx)
    if small:
        return reference_unet(UNetSpec(widths=(4, 8, 16), height=32, width=32))
    if network in (None, "unet"):
        return reference_unet()
    for module_name in ("workbench.networks", "workbench.model"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for hook in ("network", "get_network", "build_network", "by_name"):
            if callable(getattr(module, hook, None)):
                return getattr(module, hook)(network)
    raise WorkbenchError(f"no network named {network!r} here (no workbench.networks yet); use --onnx FILE, "
                         "--small, or omit --network for the reference UNet")


def best(records, layer, impls=None):
    rows = [r for r in usable(records) if r["layer"] == layer and (impls is None or r["impl"] in impls)]
    return min(rows, key=lambda r: r["median_ms"]) if rows else None


def per_layer(model, float_records, int8_records) -> list[dict]:
    rows = []
    for conv in model.convs:
        f = best(float_records, conv.name)
        q = {impl: next((r for r in int8_records if r["layer"] == conv.name and r["impl"] == impl), None)
             for impl in ("qnnpack:int8", "tvm:int8")}
        fast = best(int8_records, conv.name)
        ms = lambda r: r["median_ms"] if r and r.get("status") == "ok" else None  # noqa: E731
        rows.append({
            "layer": conv.name, "shape": conv.geometry.describe(),
            "float32_impl": f and f["impl"], "float32_ms": f and f["median_ms"],
            "qnnpack_int8_ms": ms(q["qnnpack:int8"]), "tvm_int8_ms": ms(q["tvm:int8"]),
            "int8_vs_float32": fast["median_ms"] / f["median_ms"] if fast and f else None,
            "quant_error": fast and fast.get("quant_error"),
            "notes": {impl: r["note"] for impl, r in q.items() if r and r["status"] != "ok"},
            "disturbed": sorted({flag for r in (f, *q.values()) if r for flag in r.get("disturbed_by") or []}),
        })
    return rows


def fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_tables(layers, e2e) -> None:
    print(f"{'layer':<14}{'shape':<34}{'f32 best':>18}{'f32 ms':>9}{'qnnpack':>9}{'tvm int8':>9}"
          f"{'int8/f32':>9}{'q err':>8}  disturbed")
    for r in layers:
        print(f"{r['layer']:<14}{r['shape'][:33]:<34}{(r['float32_impl'] or '-'):>18}{fmt(r['float32_ms']):>9}"
              f"{fmt(r['qnnpack_int8_ms']):>9}{fmt(r['tvm_int8_ms']):>9}{fmt(r['int8_vs_float32'], '.2f'):>9}"
              f"{fmt(r['quant_error'], '.3f'):>8}  {','.join(r['disturbed'])}")
    print()
    print(f"{'end to end':<18}{'median ms':>10}{'ci ms':>20}{'top-1 agree':>12}{'(majority)':>11}{'max rel err':>12}"
          f"{'checked':>9}  disturbed")
    for r in e2e:
        ci = f"[{r['ci_ms'][0]:.3g}, {r['ci_ms'][1]:.3g}]" if r.get("ci_ms") else "-"
        print(f"{r['name']:<18}{fmt(r['median_ms']):>10}{ci:>20}{fmt(r['top1_agreement'], '.4f'):>12}"
              f"{fmt(r.get('top1_majority_share'), '.4f'):>11}"
              f"{fmt(r['max_rel_err'], '.4f'):>12}{str(r['numerics_ok']):>9}  {','.join(r.get('disturbed_by') or [])}")
    for r in e2e:
        print(f"  {r['name']}: {r['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default=None, help="a named network (default: the reference UNet)")
    parser.add_argument("--onnx", default=None, help="an ONNX model file instead")
    parser.add_argument("--small", action="store_true", help="a tiny UNet (widths 4, 8, 16; 32x32): a quick run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=EVAL_INPUTS, help="random inputs for top-1 agreement")
    parser.add_argument("--calibration-inputs", type=int, default=quant.CALIBRATION_INPUTS)
    parser.add_argument("--float-impls", default=FLOAT_IMPLS, help="float32 candidates per conv (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (TimingConfig.quick)")
    parser.add_argument("--out", default="int8.json")
    parser.add_argument("--records", default=None, help="a records .jsonl file: per-layer results kept and reused")
    args = parser.parse_args()
    try:
        model = resolve_model(args.network, args.onnx, args.small)
        floats = [find(i.strip(), all_candidates(args.threads)) for i in args.float_impls.split(",") if i.strip()]
        timing = TimingConfig.quick() if args.quick else TimingConfig()
        start = time.time()
        calibration = quant.calibrate_model(model, count=args.calibration_inputs)
        store = RecordStore(args.records) if args.records else None
        with open_device(threads=args.threads) as device:
            float_records = compare(model, device, candidates=floats, timing=timing, store=store, progress=False)
            int8_records = measure_int8_layers(model, device, calibration, args.threads, timing, store=store)
            e2e = int8_end_to_end(model, device, args.threads, timing, inputs=args.inputs,
                                  calibration_inputs=args.calibration_inputs, layer_records=int8_records, calibration=calibration)
    except WorkbenchError as err:
        sys.exit(f"error: {err}")
    layers = per_layer(model, float_records, int8_records)
    print_tables(layers, e2e)
    result = {"model": model.name, "threads": args.threads, "inputs": args.inputs,
              "calibration_inputs": args.calibration_inputs, "float_impls": [c.impl for c in floats],
              "timing": vars(timing) if hasattr(timing, "__dict__") else str(timing),
              "seconds": round(time.time() - start, 1), "layers": layers, "end_to_end": e2e}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
