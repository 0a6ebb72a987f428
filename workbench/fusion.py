"""Fusion groups as data: which ops after a conv a kernel absorbs, derived from the model graph.

A conv absorbs a following op only when it is the sole reader of what comes before it (else
the unfused value is still needed). What a kernel can absorb is the kernel's own declaration
(`Candidate.fusible`): NNPACK and the hand and tuned schedules take a ReLU (or nothing), TVM's
default conv also takes the decoder's ResizeNearest -> Add(skip) -> ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import Layer, Model

OUTPUT = "<output>"


def consumers(model: Model) -> dict[str, list[str]]:
    """Layer (or input) name -> names of the layers reading it; the model output gets '<output>'."""
    users: dict[str, list[str]] = {model.input_name: []}
    for layer in model.layers:
        users.setdefault(layer.name, [])
        for src in layer.inputs:
            users.setdefault(src, []).append(layer.name)
    users[model.output_name].append(OUTPUT)
    return users


def _sole_consumer(model: Model, users: dict, name: str) -> Layer | None:
    """The one layer reading `name`, or None when several read it (or it is the output)."""
    readers = users.get(name, [])
    if len(readers) != 1 or readers[0] == OUTPUT:
        return None
    return model.layer(readers[0])


def fusible_chain(model: Model, conv: Layer, fusible: tuple[str, ...]) -> tuple[str, ...]:
    """The longest run of following ops a kernel that can absorb `fusible` takes into the conv."""
    users = consumers(model)
    nxt = _sole_consumer(model, users, conv.name)
    if nxt is None:
        return ()
    if nxt.op == "relu":
        return ("relu",) if "relu" in fusible else ()
    if "add" not in fusible:
        return ()
    chain, current = [], conv.name
    if nxt.op == "resize":
        chain.append("resize")
        current, nxt = nxt.name, _sole_consumer(model, users, nxt.name)
    if nxt is None or nxt.op != "add" or nxt.inputs.count(current) != 1:
        return ()  # a resize alone is not worth a custom epilogue
    chain.append("add")
    after = _sole_consumer(model, users, nxt.name)
    if after is not None and after.op == "relu" and "relu" in fusible:
        chain.append("relu")
    return tuple(chain)


def legal_fusions(model: Model, conv: Layer, fusible: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every fusion a plan may name for this conv: nothing, or a prefix of the chain ending sensibly."""
    chain = fusible_chain(model, conv, fusible)
    options = [()]
    if chain == ("relu",):
        options.append(chain)
    elif chain:
        start = 2 if chain[0] == "resize" else 1  # resize only together with its add
        options += [chain[:n] for n in range(start, len(chain) + 1)]
    return options


def fused_layers(model: Model, conv: Layer, fuse: tuple[str, ...]) -> list[Layer]:
    """The layers a fusion absorbs, in order (following the sole-consumer chain)."""
    users, members, current = consumers(model), [], conv.name
    for _ in fuse:
        layer = _sole_consumer(model, users, current)
        members.append(layer)
        current = layer.name
    return members


@dataclass(frozen=True)
class ConvGroup:
    """A conv and the ops it absorbs, in order; the group's value replaces its last member's."""

    conv: Layer
    members: tuple[Layer, ...] = ()

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


def conv_groups(model: Model, fusions: dict[str, tuple[str, ...]]) -> dict[str, ConvGroup]:
    """conv name -> its group, given each conv's fusion (e.g. a plan's `fuse` per layer)."""
    return {conv.name: ConvGroup(conv, tuple(fused_layers(model, conv, tuple(fusions.get(conv.name, ())))))
            for conv in model.convs}
