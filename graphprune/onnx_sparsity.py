"""N:M masks on ONNX weights: which initializers, in which layout, and input statistics from
onnxruntime.

A weight's layout follows the node that reads it: Conv ``[K, C/g, k...]`` is the torch conv
layout; MatMul's ``B [K, N]`` is stored reduction-first (the layout of transformers' Conv1D);
Gemm's ``B`` is ``[N, K]`` with ``transB`` and ``[K, N]`` without.  The masks are the torch
path's (:func:`graphprune.sparsity.nm_mask` on the same scores), baked into the initializers as
exact zeros and recorded per initializer so that every later pass is checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from graphprune.onnx_capture import Feeds, OnnxCapture, graph_inputs, measure, session, tensor_of
from graphprune.onnx_apply import copy_model
from graphprune.sparsity import CONV, CONV1D, LINEAR, NMPattern, fits, nm_mask

_PASS_THROUGH = ("Transpose", "Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class WeightLayer:
    """A node that multiplies an activation by an initializer."""

    node: str
    op_type: str
    weight: str
    layout: str
    activation: str  # the value the weight multiplies
    channel_axis: int  # the activation's axis the weight reduces over
    groups: int = 1  # a convolution's groups

    @property
    def depthwise(self) -> bool:
        return self.layout == CONV and self.groups > 1

    @property
    def output_axis(self) -> int:
        """The weight axis of the output channels (per-channel quantization scales run along it)."""
        return 1 if self.layout == CONV1D else 0

    @property
    def axis(self) -> int:
        """The weight axis the N:M groups run along (moved last)."""
        return 0 if self.layout == CONV1D else 1


def weight_layers(model: ir.Model) -> tuple[list[WeightLayer], dict[str, str]]:
    """Every node that multiplies an activation by an initializer weight, and the weights left
    alone with the reason."""
    layers, skipped = [], {}
    for node in model.graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.is_graph_input():
            continue
        x = node.inputs[0]
        shape = w.const_value.shape.numpy()
        if node.op_type == "ConvTranspose":
            skipped[w.name] = "ConvTranspose is left as it is (its reduction runs over output channels)"
            continue
        if node.op_type == "Conv":
            layers.append(WeightLayer(node.name, "Conv", w.name, CONV, x.name, 1, _attr(node, "group", 1)))
        elif len(shape) != 2:
            skipped[w.name] = f"{len(shape)}-D {node.op_type} weight (batched weights are left as they are)"
        elif node.op_type == "MatMul":
            layers.append(WeightLayer(node.name, "MatMul", w.name, CONV1D, x.name, -1))
        else:
            layers.append(WeightLayer(node.name, "Gemm", w.name, LINEAR if _attr(node, "transB", 0) else CONV1D,
                                      x.name, 0 if _attr(node, "transA", 0) else -1))
    return layers, skipped


def _attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else int(a.value)


def reads_model_input(model: ir.Model, layer: WeightLayer) -> bool:
    """The layer reads a graph input, possibly through layout ops (tf2onnx's NHWC transposes)."""
    inputs = {v.name for v in graph_inputs(model)}
    producers = {v.name: node for node in model.graph for v in node.outputs}
    name = layer.activation
    while name in producers and producers[name].op_type in _PASS_THROUGH:
        name = producers[name].inputs[0].name
    return name in inputs


def head_layers(model: ir.Model, layers: list[WeightLayer]) -> set[str]:
    """Layers whose result reaches a graph output through single-activation ops (classifiers, LM
    heads), the ONNX counterpart of the torch pass's ``dense_heads`` test."""
    by_node = {layer.node for layer in layers}
    producers = {v.name: node for node in model.graph for v in node.outputs}
    heads = set()
    for output in model.graph.outputs:
        node = producers.get(output.name)
        while node is not None:
            if node.name in by_node:
                heads.add(node.name)
                break
            activations = [v for v in node.inputs if v is not None and not v.is_initializer()]
            if len(activations) != 1:
                break
            node = producers.get(activations[0].name)
    return heads


def fits_pattern(model: ir.Model, layer: WeightLayer, pattern: NMPattern) -> str | None:
    return fits(tensor_of(model.graph.initializers[layer.weight]), pattern)


def input_rms(capture: OnnxCapture, layers: list[WeightLayer], feeds: list[Feeds]) -> dict[str, torch.Tensor]:
    """RMS of each layer's input per reduced channel over the feeds (Wanda's statistic), read from
    onnxruntime with the layers' inputs exposed as outputs."""
    names = sorted({layer.activation for layer in layers})
    runner = session(capture.model, names)
    index = {o.name: i for i, o in enumerate(runner.get_outputs())}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed in feeds:
        values = runner.run(None, feed)
        for layer in layers:
            x = np.asarray(values[index[layer.activation]], dtype=np.float64)
            x = np.moveaxis(x, layer.channel_axis, -1).reshape(-1, x.shape[layer.channel_axis])
            sums[layer.weight] = sums.get(layer.weight, 0) + (x ** 2).sum(0)
            counts[layer.weight] = counts.get(layer.weight, 0) + x.shape[0]
    return {name: torch.from_numpy(np.sqrt(sums[name] / max(counts[name], 1))) for name in sums}


def masked_copy(capture: OnnxCapture, layers: list[WeightLayer], pattern: tuple[int, int],
                rms: dict[str, torch.Tensor]) -> OnnxCapture:
    """A re-measured copy with every layer's weight masked to ``pattern`` by |W| (times the input RMS
    of its reduced channel where ``rms`` has it: Wanda)."""
    model = copy_model(capture.model)
    for layer in layers:
        value = model.graph.initializers[layer.weight]
        weight = tensor_of(value).clone()
        scores = weight.abs().double()
        if layer.weight in rms:
            scores = scores * _broadcast_rms(rms[layer.weight], layer, weight.shape)
        mask = nm_mask(scores, NMPattern(*pattern, layer.layout))
        value.const_value = ir.tensor((weight * mask).numpy(), name=layer.weight)
    shapes, outputs = measure(model, capture.feeds)
    return OnnxCapture(model, capture.feeds, shapes, outputs)


def _broadcast_rms(rms: torch.Tensor, layer: WeightLayer, shape: torch.Size) -> torch.Tensor:
    if layer.layout == CONV1D:  # [in, out]
        return rms[:, None]
    if layer.layout == LINEAR:  # [out, in]
        return rms[None, :]
    k, per_group = shape[:2]
    groups = rms.numel() // per_group
    per_filter = rms.reshape(groups, per_group).repeat_interleave(k // groups, dim=0)
    return per_filter.reshape(k, per_group, *([1] * (len(shape) - 2)))


__all__ = ["WeightLayer", "head_layers", "input_rms", "masked_copy", "reads_model_input", "weight_layers"]
