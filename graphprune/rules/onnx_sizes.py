"""Sizes an ONNX graph computes at run time: ``Shape`` → ``Gather``/``Slice`` → ``Concat`` → ``Reshape``.

Exports with a dynamic batch read sizes from tensors and rebuild shape vectors from them (the
attention reshapes of a BERT: ``Concat(Shape(k)[0:2], [-1, 64])``).  Each int vector derived from
a ``Shape`` is tracked entry by entry:

* a *dim* entry is the run-time size of a product of channel spaces: a Reshape/Expand that uses it
  produces a dim of that size, whatever pruning does, so the two are coupled, nothing to rewrite;
* a *const* entry comes from an integer initializer (the ``64`` above): it is a shape constant,
  rewritten where the plan changes the dim it sizes;
* an unknown entry (computed some other way) freezes the dim it sizes.

A tracked vector used by anything but these size ops and Reshape/Expand/ConstantOfShape (a scale
``1/sqrt(Shape(q)[-1])``, a ``Range``) lets the sizes enter values: its dim entries are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx_ir as ir

if TYPE_CHECKING:
    from graphprune.rules.onnx import OnnxRuleContext as RuleContext


@dataclass(frozen=True)
class Dim:
    """The run-time size of the product of these atoms."""

    atoms: tuple[int, ...]


@dataclass(frozen=True)
class Const:
    """Entry ``k`` of the integer initializer read as input ``index`` of ``node``."""

    value: int
    node: ir.Node
    index: int
    k: int


Entry = Dim | Const | None
SIZE_OPS = frozenset({"Shape", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Cast", "Identity", "Mul"})
CONSUMERS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0}  # op -> the input that takes a shape vector


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    return [int(v) for v in array.reshape(-1)] if array.dtype.kind in "iu" else None


def entries(ctx: RuleContext, node: ir.Node, index: int) -> list[Entry] | None:
    """The tracked entries of input ``index`` of ``node``: a Shape-derived vector, or an integer
    initializer seen as constants; None for anything else."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None
    if value in ctx.sizes:
        return ctx.sizes[value]
    ints = _ints(value)
    return None if ints is None else [Const(value=v, node=node, index=index, k=k) for k, v in enumerate(ints)]


def propagate(ctx: RuleContext, node: ir.Node) -> None:
    """Track the output of a size op that reads a tracked vector (or a ``Shape``)."""
    if node.op_type not in SIZE_OPS or not node.outputs:
        return
    out: list[Entry] | None = None
    if node.op_type == "Shape":
        dims = ctx.dims(node.inputs[0])
        start = node.attributes["start"].value if "start" in node.attributes else 0
        end = node.attributes["end"].value if "end" in node.attributes else len(dims)
        out = [Dim((a,)) for a in dims[start:end]]
    elif not any(v in ctx.sizes for v in node.inputs if v is not None):
        return  # constant arithmetic on constants, not sizes read at run time
    elif node.op_type in ("Squeeze", "Unsqueeze", "Cast", "Identity"):
        out = entries(ctx, node, 0)
    elif node.op_type == "Concat":
        parts = [entries(ctx, node, i) for i in range(len(node.inputs))]
        out = [] if all(p is not None for p in parts) else None
        for p in parts if out is not None else []:
            out.extend(p)
    elif node.op_type == "Gather":
        data, picked = entries(ctx, node, 0), _ints(node.inputs[1])
        if data is not None and picked is not None:
            out = [data[i] for i in picked]
    elif node.op_type == "Slice":
        data = entries(ctx, node, 0)
        starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
        steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
        if data is not None and starts is not None and ends is not None and steps is not None:
            out = data[slice(starts[0], ends[0], steps[0])]
    elif node.op_type == "Mul":
        a, b = entries(ctx, node, 0), entries(ctx, node, 1)
        if a is not None and b is not None and len(a) == len(b) == 1:
            out = [_product(a[0], b[0])]
    if out is not None:
        ctx.sizes[node.outputs[0]] = out


def _product(a: Entry, b: Entry) -> Entry:
    if isinstance(a, Const) and a.value == 1:
        return b
    if isinstance(b, Const) and b.value == 1:
        return a
    if isinstance(a, Dim) and isinstance(b, Dim):
        return Dim(a.atoms + b.atoms)
    return None


def couple_shape(
    ctx: RuleContext, node: ir.Node, vector: list[Entry], out: list[int], *, skip: frozenset[int] = frozenset()
) -> None:
    """``out`` (right-aligned) takes its sizes from ``vector``; values in ``skip`` (-1, 0 for
    Reshape; 1 for Expand) follow the input and couple nothing."""
    offset = len(out) - len(vector)
    for k, entry in enumerate(vector):
        target = out[offset + k]
        if isinstance(entry, Dim):
            ctx.unify(ctx.solver.product(list(entry.atoms)), target, node)
        elif isinstance(entry, Const):
            if entry.value not in skip:
                ctx.constant(entry.node, ("input", entry.index, entry.k), [target])
        else:
            ctx.freeze(target, "a size computed in the graph", node)


def freeze_escapes(ctx: RuleContext, graph: ir.Graph) -> None:
    """Freeze the dims whose run-time sizes flow into anything but shape arguments."""
    for value, vector in ctx.sizes.items():
        for user, index in value.uses():
            if user.op_type in SIZE_OPS and any(o in ctx.sizes for o in user.outputs):
                continue
            if CONSUMERS.get(user.op_type) == index:
                continue
            for entry in vector:
                if isinstance(entry, Dim):
                    for atom in entry.atoms:
                        ctx.freeze(atom, f"the size read at run time enters {user.op_type} ({user.name})", user)
