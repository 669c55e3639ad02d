"""N:M masks on ONNX weights: the torch path's masks (:func:`graphprune.algorithms.nm.nm_mask` on the same
scores, or SparseGPT's :func:`graphprune.algorithms.sparsegpt.prune_matrix` on Hessians of inputs read from
onnxruntime, in the layout :mod:`graphprune.frontends.onnx.layers` reads off each node), baked into the
initializers as exact zeros; the pass records them per initializer so that every later pass is
checked against them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from graphprune.frontends.onnx.apply import copy_model
from graphprune.frontends.onnx.capture import Feeds, OnnxCapture, measure, session, tensor_of
from graphprune.frontends.onnx.layers import WeightLayer
from graphprune.algorithms.sparsegpt import ConvGeometry, conv_columns, prune_matrix
from graphprune.algorithms.nm import CONV, NMPattern, from_matrix, nm_mask, per_input_channel, to_matrix


Masked = tuple[OnnxCapture, dict[str, torch.Tensor]]  # the re-measured copy, and each weight's bool mask


def masked_copy(capture: OnnxCapture, layers: list[WeightLayer], pattern: tuple[int, int],
                rms: dict[str, torch.Tensor]) -> Masked:
    """A re-measured copy with every layer's weight masked to ``pattern`` by |W| (times the input RMS
    of its reduced channel where ``rms`` has it: Wanda)."""
    model = copy_model(capture.model)
    masks = {}
    for layer in layers:
        value = model.graph.initializers[layer.weight]
        weight = tensor_of(value).clone()
        scores = weight.abs().double()
        if layer.weight in rms:
            scores = scores * per_input_channel(rms[layer.weight], layer.layout, layer.groups, weight.shape)
        masks[layer.weight] = mask = nm_mask(scores, NMPattern(*pattern, layer.layout))
        value.const_value = ir.tensor((weight * mask).numpy(), name=layer.weight)
    shapes, outputs = measure(model, capture.feeds)
    return OnnxCapture(model, capture.feeds, shapes, outputs), masks


def geometry(node: ir.Node, weight_shape: tuple[int, ...]) -> ConvGeometry | None:
    """The window of an ONNX Conv (None for ``auto_pad`` other than NOTSET, or 3-D convs)."""
    spatial = len(weight_shape) - 2
    auto_pad = node.attributes.get("auto_pad")
    if spatial not in (1, 2) or (auto_pad is not None and auto_pad.value not in ("NOTSET", b"NOTSET")):
        return None

    def ints(name: str, default: list[int]) -> list[int]:
        a = node.attributes.get(name)
        return list(a.value) if a is not None else default
    kernel = list(weight_shape[2:])
    stride, dilation = ints("strides", [1] * spatial), ints("dilations", [1] * spatial)
    pads = ints("pads", [0] * 2 * spatial)
    if spatial == 1:
        return ConvGeometry((1, kernel[0]), (1, stride[0]), (1, dilation[0]), (0, pads[0], 0, pads[1]),
                            int(node.attributes["group"].value) if "group" in node.attributes else 1)
    return ConvGeometry((kernel[0], kernel[1]), (stride[0], stride[1]), (dilation[0], dilation[1]),
                        (pads[0], pads[1], pads[2], pads[3]),
                        int(node.attributes["group"].value) if "group" in node.attributes else 1)


def sparsegpt_copy(capture: OnnxCapture, layers: list[WeightLayer], pattern: tuple[int, int], feeds: list[Feeds],
                   block: int, damp: float) -> Masked:
    """A re-measured copy with SparseGPT masks and weight updates (:func:`graphprune.algorithms.sparsegpt.prune_matrix`),
    layer by layer in graph order, each layer's Hessian from its inputs in the model as already
    sparsified upstream (read from onnxruntime); linear layers that read one activation share it."""
    model = copy_model(capture.model)
    nodes = {node.name: node for node in model.graph}
    masks = {}
    by_input: dict[tuple[str, str | None], list[WeightLayer]] = {}
    for layer in layers:
        by_input.setdefault((layer.activation, layer.node if layer.layout == CONV else None), []).append(layer)
    for (activation, _), group in by_input.items():
        runner = session(model, [activation])
        index = [o.name for o in runner.get_outputs()].index(activation)
        hessians = _hessians([runner.run(None, feed)[index] for feed in feeds], group[0], nodes, model)
        for layer in group:
            value = model.graph.initializers[layer.weight]
            weight = tensor_of(value).clone()
            nm = NMPattern(*pattern, layer.layout)
            rows = weight.shape[0] // len(hessians) if layer.layout == CONV else None
            new, keep = torch.empty_like(weight), torch.empty_like(weight, dtype=torch.bool)
            for g, hessian in enumerate(hessians):
                part = weight[g * rows:(g + 1) * rows] if rows else weight
                w, k = prune_matrix(to_matrix(part, layer.layout), hessian, nm, block=block, damp=damp)
                target = slice(g * rows, (g + 1) * rows) if rows else slice(None)
                new[target] = from_matrix(w, layer.layout, part.shape).to(weight.dtype)
                keep[target] = from_matrix(k, layer.layout, part.shape)
            value.const_value = ir.tensor(new.numpy(), name=layer.weight)
            masks[layer.weight] = keep
    shapes, outputs = measure(model, capture.feeds)
    return OnnxCapture(model, capture.feeds, shapes, outputs), masks


def _hessians(inputs: list[np.ndarray], layer: WeightLayer, nodes: dict[str, ir.Node],
              model: ir.Model) -> list[torch.Tensor]:
    """``2/N sum x x^T`` of the layer's input columns (one per conv group)."""
    sums: list[torch.Tensor] = []
    count = 0
    shape = tuple(model.graph.initializers[layer.weight].const_value.shape.numpy())
    window = geometry(nodes[layer.node], shape) if layer.layout == CONV else None
    for array in inputs:
        x = torch.from_numpy(np.asarray(array, dtype=np.float64))
        if window is not None:
            cols = [conv_columns(x, window, g) for g in range(window.groups)]
        else:
            x = x.movedim(layer.channel_axis, -1)
            cols = [x.reshape(-1, x.shape[-1])]
        for g, c in enumerate(cols):
            if len(sums) <= g:
                sums.append(torch.zeros(c.shape[1], c.shape[1], dtype=torch.float64))
            sums[g] += c.T @ c
        count += cols[0].shape[0]
    return [2 * s / max(count, 1) for s in sums]
