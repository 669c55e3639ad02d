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

from graphprune.algorithms.compensation import bias_corrections as corrections_for
from graphprune.core.groups import Analysis
from graphprune.core.plan import Plan
from graphprune.frontends.onnx.apply import copy_model
from graphprune.frontends.onnx.capture import Feeds, OnnxCapture, measure, tensor_of
from graphprune.frontends.onnx.layers import OnnxLayer, input_moments, layer_bias, weight_layers


def bias_corrections(analysis: Analysis, plan: Plan, feeds: list[Feeds]) -> tuple[dict[str, torch.Tensor], int]:
    """:func:`graphprune.algorithms.compensation.bias_corrections` for an ONNX graph, before the plan
    is applied; a layer's bias is :func:`~graphprune.frontends.onnx.layers.layer_bias`."""
    capture: OnnxCapture = analysis.captured
    masks = plan.masks(analysis)
    spaces = analysis.spaces
    values = {v.name: v for node in capture.graph for v in node.inputs if v is not None}
    nodes = {node.name: node for node in capture.graph}
    layers = [layer for layer in weight_layers(capture.model)[0] if not layer.grouped]

    def removed_inputs(layer: OnnxLayer) -> torch.Tensor:
        return ~spaces.keep_mask(analysis.context.dims(values[layer.activation])[layer.channel_axis], masks)

    def input_means(losing: list[OnnxLayer]) -> dict[OnnxLayer, torch.Tensor]:
        moments = input_moments(capture, losing, feeds)
        return {layer: moments[layer.weight][0] for layer in losing}

    def bias(layer: OnnxLayer) -> tuple[str, torch.Tensor] | None:
        value = layer_bias(nodes[layer.node])
        return None if value is None else (value.name, spaces.keep_mask(analysis.tensors[value.name][1][0], masks))

    return corrections_for(
        layers, removed_inputs, input_means, lambda layer: tensor_of(capture.graph.initializers[layer.weight]), bias
    )


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
    return OnnxCapture(model=model, feeds=capture.feeds, shapes=shapes, outputs=outputs)


__all__ = ["bias_corrections", "corrected"]
