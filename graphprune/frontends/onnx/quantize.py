"""Static int8 for ONNX graphs: what the ONNX state rewrites before ``Quantize`` observes ranges
(a MatMul and its bias Add as one Gemm) and how it writes the plan (QDQ nodes, by the torch
exporter's emitter :func:`graphprune.emit.qdq.insert_qdq`).

The plan is the one :func:`graphprune.algorithms.quant.quant_plan` builds for either frontend
(per-channel symmetric weights with zero-point 0, so N:M zeros stay zeros; per-tensor activations;
a convolution's output too, starting at 0 when a ReLU follows; Conv and Gemm biases as int32 with
scale ``input_scale * weight_scale``).
"""

from __future__ import annotations

import onnx_ir as ir

from graphprune.algorithms.quant import QuantPlan
from graphprune.emit.qdq import insert_qdq
from graphprune.frontends.onnx.apply import copy_model
from graphprune.frontends.onnx.capture import OnnxCapture, measure


def gemm_from_matmul_add(capture: OnnxCapture) -> OnnxCapture:
    """2-D ``MatMul(x, W) + b`` written as ``Gemm(x, W, b)`` (exactly the same values), so that the
    bias is the layer's own and can be written as int32: onnxruntime fuses a MatMul + Add into a
    Gemm anyway, and fuses a quantized Gemm into QGemm only with an int32 bias.  The Add's output
    keeps its name.  Returns the capture unchanged when there is nothing to rewrite."""
    pairs = []
    for node in capture.graph:
        if node.op_type != "MatMul" or node.domain != "" or len(capture.shapes.get(node.inputs[0].name, ())) != 2:
            continue
        weight, users = node.inputs[1], list(node.outputs[0].uses())
        if (
            not weight.is_initializer()
            or len(users) != 1
            or users[0].node.op_type != "Add"
            or node.outputs[0].is_graph_output()
        ):
            continue
        add = users[0].node
        bias = add.inputs[1 - users[0].idx]
        if bias is not None and bias.is_initializer() and list(bias.const_value.shape) == [weight.shape[1]]:
            pairs.append((node.name, add.name))
    if not pairs:
        return capture
    model = copy_model(capture.model)
    nodes = {node.name: node for node in model.graph}
    for matmul_name, add_name in pairs:
        matmul, add = nodes[matmul_name], nodes[add_name]
        bias = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
        gemm = ir.node("Gemm", [matmul.inputs[0], matmul.inputs[1], bias], name=matmul.name)
        model.graph.insert_before(matmul, gemm)
        out, name = add.outputs[0], add.outputs[0].name
        out.replace_all_uses_with(gemm.outputs[0], replace_graph_outputs=True)
        gemm.outputs[0].name, gemm.outputs[0].type, gemm.outputs[0].shape = name, out.type, out.shape
        model.graph.remove([add, matmul], safe=True)
    shapes, outputs = measure(model, capture.feeds)
    return OnnxCapture(model=model, feeds=capture.feeds, shapes=shapes, outputs=outputs)


def quantized_copy(capture: OnnxCapture, plan: QuantPlan) -> OnnxCapture:
    """The graph with the plan written as QDQ nodes, measured on the capture's feeds (onnxruntime
    without graph optimizations runs the QuantizeLinear/DequantizeLinear pairs literally: the
    fake-quant reference)."""
    model = copy_model(capture.model)
    weights = {name: capture.graph.initializers[name].const_value.numpy() for name in plan.layers}
    insert_qdq(model, plan, weights)
    shapes, outputs = measure(model, capture.feeds)
    return OnnxCapture(model=model, feeds=capture.feeds, shapes=shapes, outputs=outputs)
