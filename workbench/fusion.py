"""Fusion groups as data: which ops around a conv a kernel absorbs, derived from the model graph.

A conv absorbs a following op (its epilogue) only when it is the sole reader of what comes
before it (else the unfused value is still needed), and a preceding MaxPool [-> ReLU] (its
prologue) only when the conv is the pool's sole reader. What a kernel can absorb is the
kernel's own declaration (`Candidate.fusible` after the conv, `Candidate.prologue_fusible`
before it): NNPACK takes a ReLU (or nothing); TVM's kernels also take the decoder's
ResizeNearest -> Add(skip) -> ReLU and the encoder's MaxPool -> ReLU.

`Fusion` is what one conv kernel computes around conv + bias, as data the kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import Layer, Model

OUTPUT = "<output>"
PROLOGUE_OPS = ("maxpool", "relu")


def chain_label(prologue: tuple[str, ...], epilogue: tuple[str, ...]) -> str:
    """A conv with what it fuses, for people: 'maxpool+relu > conv > relu', 'conv'."""
    return " > ".join(p for p in ("+".join(prologue), "conv", "+".join(epilogue)) if p)


@dataclass(frozen=True)
class Fusion:
    """What a conv kernel computes besides conv + bias.

    Prologue: a max-pool with window = stride = `pool` (0: none), then ReLU if `pool_relu`,
    computed by the conv's input stage straight from the pre-pool tensor. Epilogue: a nearest
    upsample by `scale` (1: none), + the skip if `add`, then ReLU if `relu` (a ReLU alone is
    the original study's conv+bias+ReLU).
    """

    pool: int = 0
    pool_relu: bool = False
    pool_in: tuple[int, int] | None = None  # (height, width) before the pool: a 25-row input pools to 12
    scale: int = 1
    add: bool = False
    relu: bool = False
    cap: float | None = None  # with relu: min(relu(x), cap), MobileNetV2's ReLU6 (a Clip from 0 to 6)

    @classmethod
    def of(cls, prologue: tuple[Layer, ...] = (), epilogue: tuple[Layer, ...] = ()) -> "Fusion":
        pool = next((m for m in prologue if m.op == "maxpool"), None)
        resize = next((m for m in epilogue if m.op == "resize"), None)
        last = epilogue[-1] if epilogue else None
        return cls(pool=pool.kernel if pool else 0, pool_relu=any(m.op == "relu" for m in prologue),
                   pool_in=tuple(pool.input_shape[2:]) if pool else None,
                   scale=resize.scale if resize else 1, add=any(m.op == "add" for m in epilogue),
                   relu=last is not None and last.op in ("relu", "clip"),
                   cap=last.option("bounds")[1] if last is not None and last.op == "clip" else None)

    @property
    def prologue_ops(self) -> tuple[str, ...]:
        return (("maxpool",) + (("relu",) if self.pool_relu else ())) if self.pool else ()

    @property
    def epilogue_ops(self) -> tuple[str, ...]:
        ops = (("resize",) if self.scale > 1 else ()) + (("add",) if self.add else ())
        if self.cap is not None:
            return ops + ("clip",)
        return ops + (("relu",) if self.relu else ())

    @property
    def label(self) -> str:
        """e.g. 'maxpool+relu > conv > relu', 'conv > resize+add+relu', 'conv'."""
        return chain_label(self.prologue_ops, self.epilogue_ops)


def consumers(model: Model) -> dict[str, list[str]]:
    """Layer (or input) name -> names of the layers reading it; the model output gets '<output>'."""
    users: dict[str, list[str]] = {model.input_name: []}
    for layer in model.layers:
        users.setdefault(layer.name, [])
        for src in layer.inputs:
            users.setdefault(src, []).append(layer.name)
    users[model.output_name].append(OUTPUT)
    return users


def sole_consumer(model: Model, users: dict, name: str) -> Layer | None:
    """The one layer reading `name`, or None when several read it (or it is the output)."""
    readers = users.get(name, [])
    if len(readers) != 1 or readers[0] == OUTPUT:
        return None
    return model.layer(readers[0])


def fusible_chain(model: Model, conv: Layer, fusible: tuple[str, ...]) -> tuple[str, ...]:
    """The longest run of following ops a kernel that can absorb `fusible` takes into the conv."""
    users = consumers(model)
    nxt = sole_consumer(model, users, conv.name)
    if nxt is None:
        return ()
    if nxt.op == "relu":
        return ("relu",) if "relu" in fusible else ()
    if nxt.op == "clip":
        return ("clip",) if "clip" in fusible and is_capped_relu(nxt) else ()
    if "add" not in fusible:
        return ()
    chain, current = [], conv.name
    if nxt.op == "resize":
        chain.append("resize")
        current, nxt = nxt.name, sole_consumer(model, users, nxt.name)
    if nxt is None or nxt.op != "add" or nxt.inputs.count(current) != 1:
        return ()  # a resize alone is not worth a custom epilogue
    if not _claims_add(model, users, nxt, current):
        return ()
    chain.append("add")
    after = sole_consumer(model, users, nxt.name)
    if after is not None and after.op == "relu" and "relu" in fusible:
        chain.append("relu")
    return tuple(chain)


def is_capped_relu(layer: Layer) -> bool:
    """A Clip from 0 to a finite bound (ReLU6): what a conv's output stage computes as min(relu(x), cap)."""
    low, high = layer.option("bounds", (None, None))
    return low == 0 and high is not None and high != float("inf")


def _reaches_from_conv(model: Model, users: dict, name: str) -> bool:
    """Whether `name` is a conv's output (or its resize) whose only reader chain could fold into an add."""
    if name == model.input_name:
        return False
    layer = model.layer(name)
    if layer.op == "resize" and layer.inputs[0] != model.input_name:
        if users.get(layer.inputs[0]) != [layer.name]:
            return False
        layer = model.layer(layer.inputs[0])
    return layer.op == "conv"


def _claims_add(model: Model, users: dict, add: Layer, mine: str) -> bool:
    """One conv takes an Add: when its other input could also fold it (two conv branches), the
    resize side wins, else the first input; the other stays a value the kernel reads as its skip."""
    other = next(s for s in add.inputs if s != mine)
    if not _reaches_from_conv(model, users, other) or users.get(other) != [add.name]:
        return True
    resized = [model.layer(s).op == "resize" if s != model.input_name else False for s in (mine, other)]
    if resized[0] != resized[1]:
        return resized[0]
    return add.inputs.index(mine) == 0


def prologue_chain(model: Model, conv: Layer, fusible: tuple[str, ...] = PROLOGUE_OPS) -> tuple[str, ...]:
    """The MaxPool [-> ReLU] before the conv its input stage can compute: ('maxpool', 'relu'), ('maxpool',) or ().

    Only a non-overlapping pool (window = stride, no padding) whose one reader chain ends at
    this conv qualifies; the pool's input may have other readers (the encoder's skip).
    """
    if "maxpool" not in fusible or len(conv.inputs) != 1:
        return ()
    users = consumers(model)
    chain, current = [], conv.inputs[0]
    if current == model.input_name:
        return ()
    reader, layer = conv.name, model.layer(current)
    if layer.op == "relu" and "relu" in fusible and users.get(layer.name) == [conv.name]:
        chain.append("relu")
        if layer.inputs[0] == model.input_name:
            return ()
        reader, layer = layer.name, model.layer(layer.inputs[0])
    if layer.op != "maxpool" or users.get(layer.name) != [reader] or layer.kernel != layer.stride or layer.pad:
        return ()
    return ("maxpool",) + tuple(chain)


def prologue_layers(model: Model, conv: Layer, prologue: tuple[str, ...]) -> list[Layer]:
    """The layers a prologue absorbs, in execution order (the pool first)."""
    members, current = [], conv.inputs[0]
    for _ in prologue:
        layer = model.layer(current)
        members.insert(0, layer)
        current = layer.inputs[0]
    return members


def legal_fusions(model: Model, conv: Layer, fusible: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every fusion a plan may name for this conv: nothing, or a prefix of the chain ending sensibly."""
    chain = fusible_chain(model, conv, fusible)
    options = [()]
    if chain in (("relu",), ("clip",)):
        options.append(chain)
    elif chain:
        start = 2 if chain[0] == "resize" else 1  # resize only together with its add
        options += [chain[:n] for n in range(start, len(chain) + 1)]
    return options


def fused_layers(model: Model, conv: Layer, fuse: tuple[str, ...]) -> list[Layer]:
    """The layers a fusion absorbs, in order (following the sole-consumer chain)."""
    users, members, current = consumers(model), [], conv.name
    for _ in fuse:
        layer = sole_consumer(model, users, current)
        members.append(layer)
        current = layer.name
    return members


@dataclass(frozen=True)
class ConvGroup:
    """A conv and the ops it absorbs, in order; the group's value replaces its last member's."""

    conv: Layer
    members: tuple[Layer, ...] = ()  # the epilogue: ops after the conv, in order
    prologue: tuple[Layer, ...] = ()  # ops before the conv its input stage computes (the pool first)

    @property
    def fusion(self) -> Fusion:
        return Fusion.of(self.prologue, self.members)

    @property
    def source(self) -> str:
        """The name of the value the group reads: the pool's input, or the conv's."""
        return self.prologue[0].inputs[0] if self.prologue else self.conv.inputs[0]

    @property
    def tail(self) -> Layer:
        return self.members[-1] if self.members else self.conv

    @property
    def relu(self) -> bool:
        return bool(self.members) and self.members[-1].op == "relu"

    def _member(self, op: str) -> Layer | None:
        return next((m for m in self.members if m.op == op), None)

    @property
    def resize(self) -> Layer | None:
        return self._member("resize")

    @property
    def add(self) -> Layer | None:
        return self._member("add")

    @property
    def skip(self) -> str | None:
        """The name of the add's other input (the encoder's skip), when an add is absorbed."""
        if self.add is None:
            return None
        produced = self.resize.name if self.resize else self.conv.name
        return next(s for s in self.add.inputs if s != produced)


def conv_groups(model: Model, fusions: dict[str, tuple[str, ...]],
                prologues: dict[str, tuple[str, ...]] | None = None) -> dict[str, ConvGroup]:
    """conv name -> its group, given each conv's epilogue (a plan's `fuse`) and prologue per layer."""
    prologues = prologues or {}
    return {conv.name: ConvGroup(conv, tuple(fused_layers(model, conv, tuple(fusions.get(conv.name, ())))),
                                 tuple(prologue_layers(model, conv, tuple(prologues.get(conv.name, ())))))
            for conv in model.convs}
