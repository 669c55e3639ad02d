"""Bias compensation for channel pruning on ONNX graphs (the torch path's ``compensate="bias"``).

A removed input channel ``c`` of a layer contributed ``W[:, c] x_c``; its mean over the calibration
feeds (read from onnxruntime at the layer's input, in the dense graph) is folded into the layer's
bias: Conv's / Gemm's own, or the vector an Add adds right after a MatMul.  Exact when the removed
channels are constant on the data.  Grouped convolutions and layers without a bias are left alone
and counted.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from graphprune.frontends.torch.analysis import Analysis
from graphprune.frontends.onnx.capture import Feeds, OnnxCapture, measure, tensor_of
from graphprune.frontends.onnx.layers import input_moments, layer_bias, weight_layers
from graphprune.frontends.onnx.apply import copy_model
from graphprune.core.plan import Plan
from graphprune.algorithms.compensation import removed_contribution
from graphprune.algorithms.nm import CONV


def bias_corrections(analysis: Analysis, plan: Plan, feeds: list[Feeds]) -> tuple[dict[str, torch.Tensor], int]:
    """What to add to each bias (by initializer name, in the pruned layout), and how many layers lose
    inputs with no bias to take it."""
    capture: OnnxCapture = analysis.captured
    masks = plan.masks(analysis)
    spaces = analysis.spaces
    values = {v.name: v for node in capture.graph for v in node.inputs if v is not None}
    nodes = {node.name: node for node in capture.graph}
    losing = []
    for layer in weight_layers(capture.model)[0]:
        if layer.layout == CONV and layer.groups > 1:
            continue
        x_atom = analysis.context.dims(values[layer.activation])[layer.channel_axis]
        removed = ~spaces.keep_mask(x_atom, masks)
        if bool(removed.any()):
            losing.append((layer, removed))
    moments = input_moments(capture, [layer for layer, _ in losing], feeds)
    corrections, without_bias = {}, 0
    for layer, removed in losing:
        bias = layer_bias(nodes[layer.node])
        if bias is None:
            without_bias += 1
            continue
        delta = removed_contribution(tensor_of(capture.graph.initializers[layer.weight]), layer.layout, removed,
                                     moments[layer.weight][0])
        keep_out = spaces.keep_mask(analysis.tensors[bias.name][1][0], masks)
        corrections[bias.name] = delta[keep_out]
    return corrections, without_bias


def corrected(capture: OnnxCapture, corrections: dict[str, torch.Tensor]) -> OnnxCapture:
    """A re-measured copy of the pruned graph with the corrections added to its biases."""
    if not corrections:
        return capture
    model = copy_model(capture.model)
    for name, delta in corrections.items():
        value = model.graph.initializers[name]
        array = value.const_value.numpy()
        value.const_value = ir.tensor((array + delta.numpy().astype(array.dtype)).astype(array.dtype), name=name)
    shapes, outputs = measure(model, capture.feeds)
    return OnnxCapture(model, capture.feeds, shapes, outputs)


__all__ = ["bias_corrections", "corrected"]
