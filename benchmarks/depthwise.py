"""The depthwise schedule against TVM's untuned conv and ONNX Runtime, on MobileNetV2's depthwise convs.

Usage: python benchmarks/depthwise.py [--trials N] [--layers A,B] [--work-dir DIR] [--threads N]

Each conv of MobileNetV2 at 224x224 whose shape is distinct (3x3, groups == channels, stride 1
and 2, 112 down to 7 wide) is measured through the protocol in one session: `tvm:default`
(topi's grouped conv, unscheduled), `tvm:depthwise` with its default knobs, and, with
--trials N > 0, the knob tuner's best of N trials on that conv (`tvm:hand_tuned`); then ONNX
Runtime runs the same conv alone in this process. Prints JSON: per conv each one's ms and
direct-equivalent GFLOP/s, and depthwise/default (goal: below 1.0 on every conv).
"""

import argparse
import json
import tempfile

from workbench import compare, knob_tuning
from workbench.baselines import onnxruntime_conv
from workbench.kernels.default import DefaultCandidate
from workbench.kernels.hand import HandSchedule
from workbench.kernels.hand_tuned import HandTunedCandidate
from workbench.measure import ConvCase, TimingConfig
from workbench.model import Model, conv_layer, random_params
from workbench.rpc import open_device

# (name, channels, input size, stride): MobileNetV2's distinct depthwise convs at 224x224.
CONVS = (("dw32", 32, 112, 1), ("dw96s2", 96, 112, 2), ("dw144", 144, 56, 1), ("dw144s2", 144, 56, 2),
         ("dw192", 192, 28, 1), ("dw192s2", 192, 28, 2), ("dw384", 384, 14, 1), ("dw576", 576, 14, 1),
         ("dw576s2", 576, 14, 2), ("dw960", 960, 7, 1))
TIMING = TimingConfig(number=1, repeat=10, min_repeat_ms=50)


def depthwise_model() -> Model:
    """Each conv reads the input in the layer list; the sweep builds one case per conv from its own shape."""
    layers = [conv_layer(name, "input", (1, c, size, size), c, 3, stride, 1, groups=c) for name, c, size, stride in CONVS]
    return Model("mobilenet_v2-depthwise", layers, random_params(layers, seed=0), layers[0].input_shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--layers", default=",".join(name for name, *_ in CONVS))
    parser.add_argument("--work-dir", default=None, help="knob database (default: a fresh temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = depthwise_model()
    layers = [name.strip() for name in args.layers.split(",")]
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="depthwise-bench-")
    candidates = [DefaultCandidate(), HandSchedule("depthwise")]
    with open_device(threads=args.threads) as device:
        if args.trials > 0:
            for name in layers:
                knob_tuning.tune_knobs(model, device, args.trials, work_dir, layers=[name], whole_model=False,
                                       progress=False)
            candidates.append(HandTunedCandidate(work_dir, device.target))
        records = compare.compare(model, device, layers, candidates=candidates, timing=TIMING, progress=False)
    rows = {name: {} for name in layers}
    for r in records:
        good = r["status"] == "ok" and r["numerics_ok"]
        rows[r["layer"]][r["impl"]] = {"ms": r["median_ms"] if good else None, "gflops": r["gflops"] if good else None,
                                       "disturbed_by": r["disturbed_by"], "config": r["config"] or None}
    for name in layers:  # ONNX Runtime after the device is closed: its threads never share the cores with it
        case = ConvCase.from_model(model, model.layer(name))
        ort = onnxruntime_conv(case, args.threads, TIMING)
        rows[name]["onnxruntime"] = {"ms": ort["median_ms"] if ort["numerics_ok"] else None,
                                     "gflops": case.flops / ort["median_ms"] / 1e6 if ort["numerics_ok"] else None}
        default, depthwise = rows[name]["tvm:default"]["ms"], rows[name]["tvm:depthwise"]["ms"]
        rows[name]["depthwise_over_default"] = depthwise / default if default and depthwise else None
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
