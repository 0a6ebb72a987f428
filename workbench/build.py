"""The hybrid model's build: a model and a plan become one Relax IRModule, then a compiled library.

Every conv group (a conv and the ops its plan fuses into it, before and after) is emitted by
its kernel's candidate: NNPACK as a `call_dps_packed` of the bridge's global function, TVM
kernels as a `call_tir` of their PrimFunc. The ops no conv absorbs run as the plan's
`elementwise` says: `hand`, the original study's MaxPool+ReLU and Resize+Add+ReLU kernels
(kernels/fused.py; anything else as a Relax op); `relax`, plain Relax ops that TVM's LegalizeOps
+ FuseOps pipeline groups; `separate`, plain Relax ops compiled without FuseOps.

Weights are embedded as Relax constants: the compiled library is self-contained (one
`hybrid.so`), and constant buffers have stable addresses, which the NNPACK bridge's
transformed-kernel cache relies on.
"""

from __future__ import annotations

import json

from . import tvm_compat
from .fusion import conv_groups
from .kernels import fused
from .kernels.base import Candidate
from .kernels.registry import all_candidates, find
from .model import Layer, Model
from .names import symbol
from .plan import Plan, PlanError


def build_hybrid(model: Model, plan: Plan, target, candidates: list[Candidate] | None = None):
    """The whole model as a Relax IRModule with `main(x)`; weights are embedded constants.

    `target` (a Target or dict) is what the TVM kernels are built for, and is recorded on the
    module (attr `workbench.target`) so that `compile_hybrid` defaults to it. `candidates` are
    the implementations the plan's ids resolve to (default: the kernel layer's, untuned).
    """
    from tvm import relax

    candidates = all_candidates() if candidates is None else candidates
    plan.validate(model, candidates)
    # Kernels look their tuning records up by the target dict as the device gave it.
    target_dict = dict(target) if isinstance(target, dict) else _target_dict(target)
    groups = conv_groups(model, plan.fusions(), plan.prologues())
    tails = {group.tail.name: group for group in groups.values()}
    absorbed = {m.name for g in groups.values() for m in (*g.prologue, g.conv, *g.members) if m.name != g.tail.name}
    hand = _hand_groups(model, absorbed | set(tails)) if plan.elementwise == "hand" else {}
    in_hand = {m.name for g in hand.values() for m in g if m.name != g[-1].name}
    bb = relax.BlockBuilder()
    x = relax.Var(symbol(model.input_name), relax.TensorType(model.input_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            values = {model.input_name: x}
            for layer in model.layers:
                if layer.name in tails:
                    group = tails[layer.name]
                    candidate = plan.candidate(group.conv.name, candidates)
                    weight, bias = model.params[group.conv.name]
                    values[layer.name] = candidate.emit(bb, group, values, weight, bias, target_dict)
                elif layer.name in hand:
                    values[layer.name] = fused.elementwise_kernel(hand[layer.name]).emit(bb, hand[layer.name], values)
                elif layer.op == "gemm":
                    expr = gemm_op(bb, layer, values[layer.inputs[0]], *model.params[layer.name])
                    values[layer.name] = bb.emit(expr, symbol(layer.name))
                elif layer.name not in absorbed and layer.name not in in_hand:
                    expr = relax_op(layer, [values[s] for s in layer.inputs])
                    values[layer.name] = bb.emit(expr, symbol(layer.name))
            out = bb.emit_output(values[model.output_name])
        bb.emit_func_output(out)
    return (bb.get().with_attr("workbench.target", json.dumps(target_dict))
            .with_attr("workbench.elementwise", plan.elementwise))


def _hand_groups(model: Model, taken: set[str]) -> dict[str, tuple[Layer, ...]]:
    """tail name -> the 2018 elementwise group (MaxPool+ReLU, Resize+Add+ReLU) no conv absorbed."""
    return {group[-1].name: group for group in fused.elementwise_groups(model)
            if not any(m.name in taken for m in group)}


def _target_dict(target) -> dict:
    # Target.export() gives the dict form, which Target(dict) accepts back; FFI arrays -> lists.
    def plain(value):
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if hasattr(value, "items"):
            return {str(k): plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if hasattr(value, "__iter__") else str(value)

    return {k: plain(v) for k, v in dict(target.export()).items() if k != "host"}


def relax_op(layer: Layer, args: list):
    from tvm import relax

    if layer.op == "relu":
        return relax.op.nn.relu(args[0])
    if layer.op == "maxpool":
        return relax.op.nn.max_pool2d(args[0], pool_size=layer.kernel, strides=layer.stride, padding=layer.pad,
                                      ceil_mode=bool(layer.option("ceil", False)))
    if layer.op in _WIDENED_OPS:
        return _widened_op(layer, args)
    if layer.op == "resize":
        _, _, h, w = layer.output_shape
        return relax.op.image.resize2d(args[0], (h, w), method="nearest_neighbor",
                                       coordinate_transformation_mode="asymmetric", rounding_method="floor")
    if layer.op == "add":
        return relax.op.add(args[0], args[1])
    if layer.op == "concat":
        return relax.op.concat(args, axis=1)
    raise PlanError(f"layer {layer.name!r}: op {layer.op!r} has no Relax lowering here")


_WIDENED_OPS = ("clip", "avgpool", "globalavgpool", "flatten", "shuffle", "slice")  # gemm: gemm_op (weights)


def _widened_op(layer: Layer, args: list):
    """The mobile networks' ops (onnx_family.py) as Relax ops; a gemm's weights become constants."""
    from tvm import relax

    x = args[0]
    if layer.op == "clip":
        low, high = layer.option("bounds")
        return relax.op.clip(x, low, high)
    if layer.op == "avgpool":
        return relax.op.nn.avg_pool2d(x, pool_size=layer.kernel, strides=layer.stride, padding=layer.pad,
                                      ceil_mode=bool(layer.option("ceil", False)),
                                      count_include_pad=bool(layer.option("include_pad", False)))
    if layer.op == "globalavgpool":
        return relax.op.mean(x, axis=[2, 3], keepdims=len(layer.output_shape) == 4)
    if layer.op == "flatten":
        return relax.op.reshape(x, layer.output_shape)
    if layer.op == "shuffle":
        n, c, h, w = layer.input_shape
        groups = layer.option("groups")
        grouped = relax.op.reshape(x, (n, groups, c // groups, h, w))
        return relax.op.reshape(relax.op.permute_dims(grouped, [0, 2, 1, 3, 4]), (n, c, h, w))
    start, stop = layer.option("channels")  # slice
    return relax.op.strided_slice(x, axes=[1], begin=[start], end=[stop])


GEMM_LANES = 8  # output features per vector (measured: 0.07 ms for 1024 -> 1000, 0.16 with 40)


def gemm_op(bb, layer: Layer, x, weight, bias):
    """A fully connected layer, x @ weight.T + bias, as a scheduled kernel (weights embedded as constants).

    Relax's legalized matmul is a serial dot product per output: 1.5 ms for ShuffleNet's 1024 -> 1000
    classifier. Here the weight is stored transposed, (in, out), so each input feature scales a
    contiguous row of outputs: blocks of outputs run in parallel, vectorised along the block.
    """
    import numpy as np
    from tvm import relax

    from .kernels.tvm_kernel import final_kernel

    name = symbol(f"gemm_{layer.name}")
    gv = bb.add_func(final_kernel(gemm_func(*weight.shape), name), name)
    args = [x, relax.const(np.ascontiguousarray(weight.T)), relax.const(bias)]
    return relax.call_tir(gv, args, relax.TensorType(layer.output_shape, "float32"))


def gemm_func(out_features: int, in_features: int):
    """PrimFunc (x (1, in), weight (in, out), bias (out,), y (1, out)), parallel and vectorised over outputs."""
    import tvm
    from tvm import te

    x = te.placeholder((1, in_features), "float32", name="x")
    w = te.placeholder((in_features, out_features), "float32", name="w")
    b = te.placeholder((out_features,), "float32", name="b")
    k = te.reduce_axis((0, in_features), name="k")
    dot = te.compute((1, out_features), lambda n, j: te.sum(x[n, k] * w[k, j], axis=k), name="dot")
    y = te.compute((1, out_features), lambda n, j: dot[n, j] + b[j], name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, w, b, y]))
    block = sch.get_sblock("dot")
    n, j, kk = sch.get_loops(block)
    lanes = next(n for n in (GEMM_LANES, 4, 2, 1) if out_features % n == 0)
    jo, ji = sch.split(j, [None, lanes])
    sch.reorder(jo, kk, ji)
    sch.parallel(jo)
    sch.vectorize(ji)  # before the init is split off: vectorize needs the whole reduction block
    sch.decompose_reduction(block, kk)
    sch.reverse_compute_at(sch.get_sblock("y"), jo)
    return sch.mod["main"]


def compile_hybrid(mod, target=None, fuse_ops: bool | None = None):
    """Compile with tvm.compile and the CPU pipeline below; `fuse_ops` runs FuseOps/FuseTIR in it.

    By default FuseOps runs unless the plan's elementwise ops are `separate` (module attr
    `workbench.elementwise`, set by build_hybrid).

    In TVM 0.27, ``tvm.compile(mod, target)`` on a CPU target uses the generic "default_build"
    pipeline, which legalizes but does NOT fuse (vm_build.py: the CPU fusion passes may drop
    unused call_pure_packed results).  Every packed call here has a used result, so we ask
    for ``relax.get_default_pipeline(target)`` (LegalizeOps, AnnotateTIROpPattern,
    FoldConstant, FuseOps, FuseTIR, ...): MaxPool+ReLU and Resize+Add+ReLU then become single
    kernels, and an unfused TVM conv absorbs a following elementwise op.
    """
    import tvm

    if target is None:
        recorded = mod.attrs.get("workbench.target") if mod.attrs is not None else None
        if recorded is None:
            raise ValueError("no target: pass one, or build the module with build_hybrid(..., target=...)")
        target = json.loads(str(recorded))
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if fuse_ops is None:
        recorded = mod.attrs.get("workbench.elementwise") if mod.attrs is not None else None
        fuse_ops = str(recorded) != "separate" if recorded is not None else True
    return tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target, fuse_ops))


def cpu_pipeline(target, fuse_ops: bool = True):
    """TVM's CPU pipeline plus one pass: the elementwise kernels run parallel and vectorised.

    Legalized ops (ReLU, MaxPool, Resize, Add) come out as plain serial loops, and on CPU no
    default schedule touches them; on 2 cores that left about 1 ms of the UNet single-threaded.
    Without `fuse_ops` every op stays its own kernel (the unfused build the study compares).
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            legalize = [p for p in cpu_generic.legalize_passes(target)
                        if fuse_ops or p.info.name not in ("FuseOps", "FuseTIR")]
            passes = (cpu_generic.library_dispatch_passes(target) + legalize
                      + [parallel_elementwise_pass()] + cpu_generic.dataflow_lower_passes(target)
                      + cpu_generic.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def parallel_elementwise_pass():
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ParallelElementwise")
    def transform(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc) and not _is_opaque(func):
                updates[gv] = _parallelize(func)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return transform


def _is_opaque(func) -> bool:
    attrs = func.attrs
    return attrs is not None and "op_pattern" in attrs and int(attrs["op_pattern"]) == tvm_compat.OPAQUE


def _parallelize(func):
    """Inline what can be inlined, then parallelise each remaining block's outer spatial loops."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except Exception:  # a reduction or a multi-consumer block stays
            pass
    for block in sch.get_child_blocks(sch.get_sblock("root")) if blocks else []:
        _parallel_block(sch, block)
    return sch.mod["main"]


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # an already-lowered function has no root block
        return False


def _parallel_block(sch, block) -> None:
    """Fuse the leading spatial loops but the last and run them in parallel; vectorise the last if it can."""
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    spatial = 0
    for var in iters:
        if var.iter_type != 0:  # kDataPar
            break
        spatial += 1
    if spatial < 2 or len(loops) < spatial:
        return
    try:
        sch.parallel(sch.fuse(*loops[:spatial - 1]))
        if spatial == len(loops):
            sch.vectorize(loops[spatial - 1])
    except Exception:  # a shape the primitives refuse keeps the serial loops
        pass


