"""Bias compensation on ONNX graphs: the corrections
(:func:`graphprune.algorithms.compensation.bias_corrections`) added to the pruned graph's biases:
Conv's / Gemm's own, or the vector an Add adds right after a MatMul.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from graphprune.frontends.onnx.apply import copy_model
from graphprune.frontends.onnx.capture import OnnxCapture, measure


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


__all__ = ["corrected"]
