"""Channel analysis of an ONNX graph: the ONNX rule table over the shared solver and groups.

Initializers play the part of a module's tensors: float initializers are ``parameter``s (they
are scored and counted), BatchNormalization's running mean and variance are ``buffer``s (they
shrink with their channels but carry no importance), integer tensors are ``constant``s (shape
arguments are rewritten through shape constants, index tensors shrink with their channels).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from math import prod

import onnx_ir as ir
import torch

from graphprune.core import macs
from graphprune.core.algebra import FreezeReason, SpaceSolver
from graphprune.core.groups import Analysis, collect_groups
from graphprune.frontends.onnx.capture import OnnxCapture, graph_inputs
from graphprune.rules import onnx_sizes
from graphprune.rules.onnx import OnnxRuleContext, onnx_rules
from graphprune.rules.registry import flat_atoms

_RUNNING_STATS = {("BatchNormalization", 3), ("BatchNormalization", 4)}


class OnnxAnalysis(Analysis[OnnxCapture, OnnxRuleContext]):
    """:class:`~graphprune.frontends.torch.analysis.Analysis` of an ONNX graph (``captured`` is an OnnxCapture)."""

    def node_count(self) -> int:
        return len(self.captured.graph)

    def planned_macs(self, masks: dict[int, torch.Tensor]) -> int:
        spaces, ctx = self.spaces, self.context

        def shape(value: ir.Value) -> list[int]:
            return [spaces.kept_size(a, masks) for a in ctx.dims(value)]

        return onnx_macs(self.captured.graph, shape)

    def planned_params(self, masks: dict[int, torch.Tensor], model: object = None) -> int:
        return sum(
            prod(self.spaces.kept_size(a, masks) for a in dims)
            for kind, dims in self.tensors.values()
            if kind == "parameter"
        )


def analyze_onnx_capture(capture: OnnxCapture, model_name: str = "ONNX model") -> OnnxAnalysis:
    """Run the ONNX rules over ``capture`` and find its coupled channel groups.  Spaces that reach
    the graph's inputs or outputs are frozen: the pruned model keeps its interface."""
    start = time.perf_counter()
    graph = capture.graph
    solver = SpaceSolver()
    opset = capture.model.opset_imports.get("", capture.model.opset_imports.get("ai.onnx"))
    ctx = OnnxRuleContext(solver, capture.shapes, opset)
    for value in [*graph.inputs, *graph.initializers.values()]:
        ctx.allocate_value(value)
    for node in graph:
        for value in node.outputs:
            ctx.allocate_value(value)
        onnx_sizes.propagate(ctx, node)
        domain = "" if node.domain == "ai.onnx" else node.domain
        ctx.run_rule(onnx_rules.lookup((domain, node.op_type)), node)
    onnx_sizes.freeze_escapes(ctx, graph)
    for value in graph_inputs(capture.model):
        for atom in flat_atoms(ctx.dims(value)):
            solver.freeze(atom, FreezeReason("reaches a model input", value.name, interface=True))
    for value in graph.outputs:
        for atom in flat_atoms(ctx.dims(value)):
            solver.freeze(atom, FreezeReason(f"reaches the model output {value.name!r}", value.name, interface=True))
    spaces = solver.finalize()
    tensors = {
        name: (_kind(value), ctx.dims(value) or [])
        for name, value in graph.initializers.items()
        if not value.is_graph_input()
    }
    carried: set[int] = set()
    for node in graph:
        for value in node.outputs:
            for atom in flat_atoms(ctx.dims(value)):
                carried.update(spaces.leaves(atom))
    groups, frozen = collect_groups(spaces, tensors, carried)
    return OnnxAnalysis(
        model_name=model_name,
        captured=capture,
        context=ctx,
        spaces=spaces,
        groups=groups,
        frozen=frozen,
        tensors=tensors,
        seconds=time.perf_counter() - start,
    )


def _kind(value: ir.Value) -> str:
    if value.dtype is None or not value.dtype.is_floating_point():
        # integer weights of a quantized layer are still its parameters
        dequantized = any(node.op_type == "DequantizeLinear" and index == 0 for node, index in value.uses())
        return "parameter" if dequantized and len(value.shape) > 0 else "constant"
    uses = list(value.uses())
    if any((node.op_type, index) in _RUNNING_STATS for node, index in uses):
        return "buffer"
    if uses and all(node.op_type in ("QuantizeLinear", "DequantizeLinear") and index > 0 for node, index in uses):
        return "buffer"  # quantization scales
    return "parameter"


def onnx_macs(graph: ir.Graph, shape: Callable[[ir.Value], list[int]]) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul nodes (other ops count zero,
    as in :func:`graphprune.frontends.torch.macs.graph_macs`); ``shape`` gives each value's shape."""
    total = 0
    for node in graph:
        if node.op_type == "Conv":
            total += macs.convolution(shape(node.outputs[0]), shape(node.inputs[1]))
        elif node.op_type == "ConvTranspose":
            total += macs.transposed_convolution(shape(node.inputs[0]), shape(node.inputs[1]))
        elif node.op_type == "MatMul":
            total += macs.contraction(shape(node.outputs[0]), shape(node.inputs[0])[-1])
        elif node.op_type == "Gemm":
            a = shape(node.inputs[0])
            transposed = node.attributes.get("transA") is not None and node.attributes["transA"].value
            total += macs.contraction(shape(node.outputs[0]), a[0] if transposed else a[-1])
    return total
