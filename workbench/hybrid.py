"""The hybrid model at run time: run and time it (in process or over RPC), profile it layer by
layer, export it to a folder and load it back.

The plan is in plan.py, the fusion rules in fusion.py, the Relax build in build.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import nnpack_tvm
from .build import build_hybrid, compile_hybrid
from .errors import WorkbenchError
from .measure import TimingConfig
from .model import Model, reference_output, save_onnx
from .names import symbol
from .paths import make_dir, writable_dir
from .plan import Plan

# Whole-model numerics: max|y - ref| / max|ref|.  Winograd loses ~1e-5 per layer and the
# error compounds through the network, hence looser than one layer's bound.
MODEL_TOLERANCE = 1e-3


def check_output(y: np.ndarray, reference: np.ndarray, tolerance: float = MODEL_TOLERANCE) -> dict:
    """numerics_ok, max_abs_err and rel_err (max abs err / max |ref|) of a whole-model output."""
    if y.shape != reference.shape:
        return {"numerics_ok": False, "max_abs_err": float("inf"), "rel_err": float("inf")}
    err = float(np.max(np.abs(y.astype(np.float64) - reference)))
    rel = err / (float(np.max(np.abs(reference))) or 1.0)
    return {"numerics_ok": bool(np.isfinite(err) and rel <= tolerance), "max_abs_err": err, "rel_err": rel}


def _reference(reference, x: np.ndarray) -> np.ndarray | None:
    return reference_output(reference, x) if isinstance(reference, Model) else reference


def uses_nnpack(executable) -> bool:
    """Whether a compiled model (an Executable, or the module loaded from its library) calls NNPACK."""
    from tvm import relax

    if not isinstance(executable, relax.VMExecutable):
        executable = relax.VMExecutable(executable)
    return "workbench.nnpack." in executable.as_text()


def local_vm(executable, threads: int):
    """A Relax VM in this process, with the NNPACK functions registered for `threads`."""
    import tvm
    from tvm import relax

    # TVM's pool reads this once, when it starts; unset, it halves the cores on x86.
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    if uses_nnpack(executable):
        nnpack_tvm.share_cores_with_tvm()
    nnpack_tvm.register_tvm_functions(threads)
    return relax.VirtualMachine(executable, tvm.cpu())


def _run_and_time(vm, dev, x_tvm, reference, timing: TimingConfig | None) -> dict:
    """Run once, check against the reference, then time main end to end (the VM's evaluator)."""
    y = vm["main"](x_tvm).numpy()
    result = {"output": y}
    if reference is not None:
        result.update(check_output(y, reference))
    if timing is not None:
        evaluator = vm.time_evaluator("main", dev, number=timing.number, repeat=timing.repeat,
                                      min_repeat_ms=timing.min_repeat_ms)
        repeats = [s * 1e3 for s in evaluator(x_tvm).results]
        result.update(median_ms=float(np.median(repeats)), min_ms=float(np.min(repeats)), repeats_ms=repeats)
    return result


def run_local(executable, x: np.ndarray, reference: np.ndarray | Model | None = None,
              timing: TimingConfig | None = None, threads: int | None = None) -> dict:
    """Run (and, given `timing`, time) the compiled hybrid in this process.

    Returns output, numerics_ok/max_abs_err/rel_err (when a reference or Model is given),
    median_ms and repeats_ms (when timed), and nnpack_profile (the bridge's last profile).
    TVM's own thread pool follows TVM_NUM_THREADS (set it before TVM starts).
    """
    import tvm

    from .threads import resolve_threads

    vm = local_vm(executable, resolve_threads(threads))
    result = _run_and_time(vm, tvm.cpu(), tvm.runtime.tensor(x), _reference(reference, x), timing)
    result["nnpack_profile"] = json.loads(nnpack_tvm.last_profile_json())
    return result


def run_remote(device, executable, x: np.ndarray, reference: np.ndarray | Model | None = None,
               timing: TimingConfig | None = None, threads: int | None = None) -> dict:
    """The same over RPC: export, upload, load with relax.VirtualMachine on the device, check, time.

    `threads` sets the device's NNPACK thread count for this session (default: the server's).
    nnpack_profile is read from the device: a non-empty "run" entry proves NNPACK ran there.
    """
    return device.run(_remote_work, executable, x, _reference(reference, x), timing, threads, device.export_kwargs())


def _remote_work(session, executable, x, reference, timing, threads, export_kwargs) -> dict:
    import tvm
    from tvm import relax

    from .rpc import upload

    if threads:
        session.get_function(nnpack_tvm.SET_THREADS)(threads)
    if uses_nnpack(executable):
        session.get_function(nnpack_tvm.SHARE_CORES)()
    dev = session.cpu()
    vm = relax.VirtualMachine(upload(session, executable, "hybrid.so", export_kwargs), dev)
    result = _run_and_time(vm, dev, tvm.runtime.tensor(x, dev), reference, timing)
    result["nnpack_profile"] = json.loads(session.get_function(nnpack_tvm.LAST_PROFILE)())
    return result


def profile_layers(executable, x: np.ndarray, threads: int, runs: int = 3) -> pd.DataFrame:
    """Per-call time inside the whole model (in process), via the VM's instrument hook.

    One row per VM call (builtins excluded): call index, symbol, layer (the plan's NNPACK
    convs are matched in order; TVM kernels by their symbol), median ms over `runs` runs
    after a warm-up.  Times include the hook's own Python overhead (a few microseconds).
    """
    import tvm

    vm = local_vm(executable, threads)
    x_tvm = tvm.runtime.tensor(x)
    vm["main"](x_tvm)  # warm-up: kernel transforms, allocations
    samples: list[list[tuple[str, float]]] = []
    for _ in range(runs):
        calls, starts = [], []

        def instrument(func, symbol, before, ret, *args):
            if before:
                starts.append(time.perf_counter())
            else:
                calls.append((str(symbol), (time.perf_counter() - starts.pop()) * 1e3))
            return 0

        vm.set_instrument(instrument)
        vm["main"](x_tvm)
        samples.append([c for c in calls if not c[0].startswith("vm.builtin.")])
    rows = [{"call": i, "symbol": sym, "ms": float(np.median([s[i][1] for s in samples]))}
            for i, (sym, _) in enumerate(samples[0])]
    return pd.DataFrame(rows, columns=["call", "symbol", "ms"])


def label_calls(table: pd.DataFrame, model: Model, plan: Plan) -> pd.DataFrame:
    """Add a `layer` column: NNPACK calls matched to the plan's NNPACK convs in model order."""
    nn_layers = iter([c.name for c in model.convs if plan.impl(c.name).startswith("nnpack:")])
    # Our TVM conv kernels are named symbol("conv_<layer>"), plus "_<fused ops>" when they absorb some.
    kernels = {symbol(f"conv_{c.name}"): c.name for c in model.convs}
    labels = []
    for name in table["symbol"]:
        if name.startswith("workbench.nnpack."):
            labels.append(next(nn_layers, "?"))
        else:
            labels.append(next((layer for kernel, layer in kernels.items()
                                if name == kernel or name.startswith(kernel + "_")), name))
    table = table.copy()
    table["layer"] = labels
    return table


# ---------------------------------------------------------------- export / load

class ExportError(WorkbenchError):
    """An export that would overwrite something, or a folder that holds no exported hybrid."""


EXPORTED = ("hybrid.so", "plan.json", "model.onnx", "meta.json")
EXPORT_HINT = "pass --out a new or empty folder you can write to"


def export_hybrid(model: Model, plan: Plan, out_dir: str | Path, target: dict, threads: int,
                  candidates=None, force: bool = False) -> Path:
    """Write hybrid.so (weights embedded), plan.json, model.onnx and meta.json into out_dir.

    A folder that already holds something is refused unless `force` (then only those four files
    are replaced). Nothing is written before the build succeeds, and each file appears whole.
    """
    out = check_export_dir(out_dir, force)
    executable = compile_hybrid(build_hybrid(model, plan, target, candidates), target)
    meta = {"model": model.name, "input_name": model.input_name, "input_shape": list(model.input_shape),
            "output_shape": list(model.layers[-1].output_shape), "threads": threads,
            "weights": "embedded in hybrid.so as constants"}
    make_dir(out, "--out", EXPORT_HINT)
    try:
        _write_whole(out / "hybrid.so", lambda path: executable.export_library(str(path)))
        _write_whole(out / "plan.json", lambda path: path.write_text(plan.to_json()))
        _write_whole(out / "model.onnx", lambda path: save_onnx(model, path))
        _write_whole(out / "meta.json", lambda path: path.write_text(json.dumps(meta, indent=1)))
    except OSError as err:
        raise ExportError(f"cannot write the export into {str(out)!r} ({err.strerror or err}); {EXPORT_HINT}") from None
    return out


def check_export_dir(out_dir: str | Path, force: bool = False) -> Path:
    """The export folder, checked before anything is built: writable, and empty unless `force`."""
    out = writable_dir(out_dir, "--out", EXPORT_HINT)
    if out.is_dir() and not force:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
            raise ExportError(f"--out {str(out)!r} is not empty ({count}: {shown}); "
                              f"pass a new or empty folder, or --force to replace {', '.join(EXPORTED)} in it")
    for name in EXPORTED:
        if (out / name).is_dir():
            raise ExportError(f"{str(out / name)!r} is a folder, where the export writes a file; {EXPORT_HINT}")
    return out


def _write_whole(path: Path, write) -> None:
    """`write(temporary path)`, then rename: an interrupted export never leaves half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class HybridInputError(WorkbenchError, ValueError):
    """An input the loaded hybrid cannot take."""


class HybridModel:
    """A loaded hybrid: call it with a numpy input, get the numpy output."""

    def __init__(self, out_dir: str | Path, threads: int | None = None):
        import tvm

        out = Path(out_dir)
        if not (out / "meta.json").is_file() or not (out / "hybrid.so").is_file():
            raise ExportError(f"{out} holds no exported hybrid (meta.json and hybrid.so); "
                              "write one with `python -m workbench export --work-dir DIR --out FOLDER`")
        try:
            self.meta = json.loads((out / "meta.json").read_text())
            tuple(self.meta["input_shape"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise ExportError(f"{out / 'meta.json'} is not an export's meta.json ({err!r}); "
                              "export again with `python -m workbench export --work-dir DIR --out FOLDER`") from None
        self.plan = Plan.load(out / "plan.json")
        self.threads = threads or int(self.meta.get("threads", 1))
        # The library calls the NNPACK bridge by name: register it in this process first.
        self.vm = local_vm(tvm.runtime.load_module(str(out / "hybrid.so")), self.threads)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["input_shape"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import tvm

        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(x.shape) != tuple(self.meta["input_shape"]):
            raise HybridInputError(f"input shape {x.shape} != the model's {tuple(self.meta['input_shape'])}")
        return self.vm["main"](tvm.runtime.tensor(x)).numpy()


def load_hybrid(out_dir: str | Path, threads: int | None = None) -> HybridModel:
    return HybridModel(out_dir, threads)
