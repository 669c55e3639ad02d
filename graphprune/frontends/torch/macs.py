"""Count parameters and multiply-accumulates from a captured graph's shapes."""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn as nn
from graphprune.core import macs
from graphprune.frontends.torch.capture import tensor_at

if TYPE_CHECKING:
    from graphprune.core.groups import Analysis

aten = torch.ops.aten


def _shape(x) -> list[int]:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return list(val.shape) if isinstance(val, torch.Tensor) else []


def node_macs(node: fx.Node, shape: Callable[[Any], list[int]] = _shape) -> int:
    """MACs of one op; ops that do no multiply-accumulate count zero.  ``shape`` gives a value's
    shape (the captured one by default; :func:`planned_macs` passes the shapes a plan leaves)."""

    def _numel(x: Any) -> int:
        return prod(shape(x))

    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return 0
    packet = node.target.overloadpacket
    if packet is aten.linear:
        return macs.contraction(shape(node), shape(node.args[1])[-1])
    if packet in (aten.mm, aten.bmm, aten.matmul):
        return macs.contraction(shape(node), shape(node.args[0])[-1])
    if packet in (aten.addmm, aten.baddbmm):
        return macs.contraction(shape(node), shape(node.args[1])[-1])
    if packet in (
        aten.conv1d,
        aten.conv2d,
        aten.conv3d,
        aten.convolution,
        aten.conv_transpose1d,
        aten.conv_transpose2d,
        aten.conv_transpose3d,
    ):
        transposed = packet in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d) or (
            packet is aten.convolution and bool(node.args[6])
        )
        if transposed:
            return macs.transposed_convolution(shape(node.args[0]), shape(node.args[1]))
        return macs.convolution(shape(node), shape(node.args[1]))
    if packet is aten.scaled_dot_product_attention:
        return macs.attention(shape(node.args[0]), shape(node.args[1]), shape(node.args[2]))
    return 0


def graph_macs(gm: fx.GraphModule, shape: Callable[[Any], list[int]] = _shape) -> int:
    total = 0
    for node in gm.graph.nodes:
        total += node_macs(node, shape)
    for child in gm.children():
        if isinstance(child, fx.GraphModule):
            total += graph_macs(child, shape)
    return total


def planned_macs(analysis: Analysis, masks: dict[int, torch.Tensor]) -> int:
    """The MACs of the model once the keep-masks (per solver leaf) are applied, from the analysis
    alone: each dim shrinks to the kept size of its channel space."""
    spaces = analysis.spaces

    def shape(x: Any) -> list[int]:
        dims = analysis.context.raw(x) if isinstance(x, fx.Node) else None
        if dims is None or not all(isinstance(a, int) for a in dims):
            return _shape(x)
        return [spaces.kept_size(a, masks) for a in dims]

    return graph_macs(analysis.captured.graph_module, shape)


def planned_params(analysis: Analysis, masks: dict[int, torch.Tensor], model: nn.Module) -> int:
    """The parameter count once the keep-masks are applied (parameters the graph does not read count whole)."""
    spaces = analysis.spaces
    sizes: dict[int, int] = {}
    for name, (kind, dims) in analysis.tensors.items():
        if kind == "parameter":
            sizes[id(tensor_at(model, name))] = prod(spaces.kept_size(a, masks) for a in dims)
    return sum(sizes.get(id(p), p.numel()) for p in model.parameters())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
