"""Count parameters and multiply-accumulates from a captured graph's shapes."""

from __future__ import annotations

from math import prod

import torch
import torch.fx as fx
import torch.nn as nn

aten = torch.ops.aten


def _shape(x) -> list[int]:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return list(val.shape) if isinstance(val, torch.Tensor) else []


def _numel(node: fx.Node) -> int:
    return prod(_shape(node))


def node_macs(node: fx.Node) -> int:
    """MACs of one op; ops that do no multiply-accumulate count zero."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return 0
    packet = node.target.overloadpacket
    if packet is aten.linear:
        return _numel(node) * _shape(node.args[1])[-1]
    if packet in (aten.mm, aten.bmm, aten.matmul):
        return _numel(node) * _shape(node.args[0])[-1]
    if packet in (aten.addmm, aten.baddbmm):
        return _numel(node) * _shape(node.args[1])[-1]
    if packet in (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.conv_transpose1d,
                  aten.conv_transpose2d, aten.conv_transpose3d):
        w = _shape(node.args[1])
        transposed = packet in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d) or (
            packet is aten.convolution and bool(node.args[6]))
        if transposed:  # every input element is scattered to Cout/g x kernel outputs
            return _numel(node.args[0]) * prod(w[1:])
        return _numel(node) * prod(w[1:])
    if packet is aten.scaled_dot_product_attention:
        q, k, v = _shape(node.args[0]), _shape(node.args[1]), _shape(node.args[2])
        scores = prod(q[:-1]) * k[-2]
        return scores * q[-1] + scores * v[-1]
    return 0


def graph_macs(gm: fx.GraphModule) -> int:
    total = 0
    for node in gm.graph.nodes:
        total += node_macs(node)
    for child in gm.children():
        if isinstance(child, fx.GraphModule):
            total += graph_macs(child)
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
