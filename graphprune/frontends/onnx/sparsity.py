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

from graphprune.algorithms.nm import CONV, NMPattern, nm_mask, per_input_channel
from graphprune.algorithms.sparsegpt import ConvGeometry, HessianSum, sparsegpt_layers
from graphprune.frontends.onnx.apply import copy_model
from graphprune.frontends.onnx.capture import Feeds, OnnxCapture, measure, session, tensor_of
from graphprune.frontends.onnx.layers import OnnxLayer

Masked = tuple[OnnxCapture, dict[str, torch.Tensor]]  # the re-measured copy, and each weight's bool mask


def masked_copy(
    capture: OnnxCapture, layers: list[OnnxLayer], pattern: tuple[int, int], rms: dict[str, torch.Tensor]
) -> Masked:
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
    return OnnxCapture(model=model, feeds=capture.feeds, shapes=shapes, outputs=outputs), masks


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
        return ConvGeometry(
            kernel=(1, kernel[0]),
            stride=(1, stride[0]),
            dilation=(1, dilation[0]),
            pads=(0, pads[0], 0, pads[1]),
            groups=int(node.attributes["group"].value) if "group" in node.attributes else 1,
        )
    return ConvGeometry(
        kernel=(kernel[0], kernel[1]),
        stride=(stride[0], stride[1]),
        dilation=(dilation[0], dilation[1]),
        pads=(pads[0], pads[1], pads[2], pads[3]),
        groups=int(node.attributes["group"].value) if "group" in node.attributes else 1,
    )


def sparsegpt_copy(
    capture: OnnxCapture, layers: list[OnnxLayer], pattern: tuple[int, int], feeds: list[Feeds], block: int, damp: float
) -> Masked:
    """A re-measured copy with SparseGPT masks and weight updates
    (:func:`graphprune.algorithms.sparsegpt.sparsegpt_layers`), each layer's Hessian from its inputs
    in the model as already sparsified upstream (read from onnxruntime); linear layers that read one
    activation share it."""
    model = copy_model(capture.model)
    nodes = {node.name: node for node in model.graph}
    masks = {}
    by_input: dict[tuple[str, str | None], list[OnnxLayer]] = {}
    for layer in layers:
        by_input.setdefault((layer.activation, layer.node if layer.layout == CONV else None), []).append(layer)

    def hessians(layer: OnnxLayer) -> list[torch.Tensor]:
        runner = session(model, [layer.activation])
        index = [o.name for o in runner.get_outputs()].index(layer.activation)
        shape = tuple(model.graph.initializers[layer.weight].const_value.shape.numpy())
        total = HessianSum(geometry(nodes[layer.node], shape) if layer.layout == CONV else None)
        for feed in feeds:
            total.add(torch.from_numpy(np.asarray(runner.run(None, feed)[index], dtype=np.float64)), layer.channel_axis)
        return total.hessians()

    def write(layer: OnnxLayer, new: torch.Tensor, keep: torch.Tensor) -> None:
        model.graph.initializers[layer.weight].const_value = ir.tensor(new.numpy(), name=layer.weight)
        masks[layer.weight] = keep

    sparsegpt_layers(
        list(by_input.values()),
        hessians,
        lambda layer: tensor_of(model.graph.initializers[layer.weight]).clone(),
        write,
        lambda layer: NMPattern(*pattern, layer.layout),
        block=block,
        damp=damp,
    )
    shapes, outputs = measure(model, capture.feeds)
    return OnnxCapture(model=model, feeds=capture.feeds, shapes=shapes, outputs=outputs), masks
