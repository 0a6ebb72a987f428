"""FP16 Winograd's error on a device, over many convs: where nnpack.TOLERANCE["wt8x8_fp16"] comes from.

Usage: python benchmarks/fp16_winograd.py --tracker HOST:PORT --target aarch64 [--seeds N]
       (the key from $WORKBENCH_RPC_KEY; without --tracker, a local cluster: x86 shows the alias)

Measures wt8x8 and wt8x8_fp16 (workbench.fp16, the protocol over RPC) on every conv of four small
UNets (3 to 256 channels, 12 to 192 px), each with `--seeds` inputs, and beside each conv a numpy
model of Winograd F(6x6, 3x3) with the transformed tiles rounded to FP16 (the design of NNPACK's
FP16 path), so an error that is FP16's can be told from one that is the emulator's. Prints JSON:
one row per conv and input, and the worst, median and mean figures. Timings are not printed: on
an emulated board they are no board's speed.
"""

import argparse
import json
import statistics
import sys

import numpy as np

from workbench import fp16
from workbench.measure import ConvCase
from workbench.model import UNetSpec, reference_unet
from workbench.rpc import open_device
from workbench.tvm_compat import winograd_matrices

FAMILIES = (((16, 64), 24), ((32, 128), 24), ((128, 256), 24), ((16, 32), 192))  # widths, input size


def fp16_storage_model(case: ConvCase) -> float:
    """Max relative error of F(6x6, 3x3) whose transformed input and kernel tiles are stored as FP16."""
    a, b, g = (np.asarray(m, np.float64) for m in winograd_matrices(6, 3))
    x, w = case.x[0].astype(np.float64), case.weight.astype(np.float64)
    _, height, width = x.shape
    padded = np.pad(x, ((0, 0), (1, 7), (1, 7)))
    kernel = np.einsum("ij,kcjl,ml->kcim", g, w, g).astype(np.float16).astype(np.float32)
    out = np.zeros((w.shape[0], height + 6, width + 6))
    for ty in range(0, height, 6):
        for tx in range(0, width, 6):
            tile = np.einsum("ji,cjl,lm->cim", b, padded[:, ty:ty + 8, tx:tx + 8], b).astype(np.float16)
            products = np.einsum("kcim,cim->kim", kernel, tile.astype(np.float32))
            out[:, ty:ty + 6, tx:tx + 6] = np.einsum("ji,kjl,lm->kim", a, products.astype(np.float64), a)
    reference = case.reference.astype(np.float64)
    y = out[None, :, :height, :width] + case.bias[None, :, None, None]
    return float(np.abs(y - reference).max() / np.abs(reference).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracker")
    parser.add_argument("--target")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with open_device(args.tracker, None, args.target) as device:
        for widths, size in FAMILIES:
            model = reference_unet(UNetSpec(widths=widths, in_channels=3, classes=2, height=size, width=size))
            for seed in range(args.seeds):
                measured = fp16.fp16_numerics(device, model, seed=seed)
                for row in measured:
                    if row["algorithm"] == "wt8x8_fp16":
                        fp32 = next(r for r in measured if r["layer"] == row["layer"] and r["algorithm"] == "wt8x8")
                        case = ConvCase.from_model(model, model.layer(row["layer"]), seed)
                        rows.append({"model": model.name, "layer": row["layer"], "shape": row["shape"], "seed": seed,
                                     "wt8x8": fp32["rel_err"], "wt8x8_fp16": row["rel_err"],
                                     "fp16_really_used": row["fp16_really_used"], "numerics_ok": row["numerics_ok"],
                                     "numpy_fp16_model": fp16_storage_model(case)})
    fp16_errors = [r["wt8x8_fp16"] for r in rows]
    json.dump({"device": device.describe(), "rows": rows, "convs": len(rows),
               "fp16_really_used": sorted({r["fp16_really_used"] for r in rows}, key=str),
               "wt8x8_fp16_max": max(fp16_errors), "wt8x8_fp16_median": statistics.median(fp16_errors),
               "wt8x8_max": max(r["wt8x8"] for r in rows),
               "numpy_fp16_model_max": max(r["numpy_fp16_model"] for r in rows),
               "numpy_fp16_model_median": statistics.median(r["numpy_fp16_model"] for r in rows)},
              sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
