"""N:M masks on ONNX weights: the torch path's masks (:func:`graphprune.sparsity.nm_mask` on the same
scores, in the layout :mod:`graphprune.onnx_layers` reads off each node), baked into the
initializers as exact zeros; the pass records them per initializer so that every later pass is
checked against them.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from graphprune.onnx_apply import copy_model
from graphprune.onnx_capture import OnnxCapture, measure, tensor_of
from graphprune.onnx_layers import WeightLayer
from graphprune.sparsity import NMPattern, nm_mask, per_input_channel


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
            scores = scores * per_input_channel(rms[layer.weight], layer.layout, layer.groups, weight.shape)
        mask = nm_mask(scores, NMPattern(*pattern, layer.layout))
        value.const_value = ir.tensor((weight * mask).numpy(), name=layer.weight)
    shapes, outputs = measure(model, capture.feeds)
    return OnnxCapture(model, capture.feeds, shapes, outputs)
