"""Weight layers of an ONNX graph: the nodes that multiply an activation by an initializer, the
layout each weight is read in, and where each sits (reads the model input, is an output head, its
convolution window, its bias).

A weight's layout follows the node that reads it: Conv ``[K, C/g, k...]`` is the torch conv
layout; MatMul's ``B [K, N]`` is stored reduction-first (the layout of transformers' Conv1D);
Gemm's ``B`` is ``[N, K]`` with ``transB`` and ``[K, N]`` without.  With the torch path's layout
names the torch path's mask and quantization arithmetic applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from graphprune.algorithms.nm import CONV, CONV1D, LINEAR
from graphprune.algorithms.sparsegpt import ConvGeometry
from graphprune.core.layers import WeightLayer, output_heads
from graphprune.frontends.onnx.capture import graph_inputs

_PASS_THROUGH = ("Transpose", "Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze")


@dataclass(frozen=True, kw_only=True)
class OnnxLayer(WeightLayer):
    """A node that multiplies an activation by an initializer."""

    node: str
    op_type: str
    activation: str  # the value the weight multiplies


def weight_layers(model: ir.Model) -> tuple[list[OnnxLayer], dict[str, str]]:
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
            layers.append(
                OnnxLayer(
                    node=node.name,
                    op_type="Conv",
                    weight=w.name,
                    layout=CONV,
                    activation=x.name,
                    channel_axis=1,
                    groups=_attr(node, "group", 1),
                )
            )
        elif len(shape) != 2:
            skipped[w.name] = f"{len(shape)}-D {node.op_type} weight (batched weights are left as they are)"
        elif node.op_type == "MatMul":
            layers.append(
                OnnxLayer(
                    node=node.name, op_type="MatMul", weight=w.name, layout=CONV1D, activation=x.name, channel_axis=-1
                )
            )
        else:
            layers.append(
                OnnxLayer(
                    node=node.name,
                    op_type="Gemm",
                    weight=w.name,
                    layout=LINEAR if _attr(node, "transB", 0) else CONV1D,
                    activation=x.name,
                    channel_axis=0 if _attr(node, "transA", 0) else -1,
                )
            )
    return layers, skipped


def _attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else int(a.value)


def reads_model_input(model: ir.Model, layer: OnnxLayer) -> bool:
    """The layer reads a graph input, possibly through layout ops (tf2onnx's NHWC transposes)."""
    inputs = {v.name for v in graph_inputs(model)}
    producers = {v.name: node for node in model.graph for v in node.outputs}
    name = layer.activation
    while name in producers and producers[name].op_type in _PASS_THROUGH:
        name = producers[name].inputs[0].name
    return name in inputs


def head_layers(model: ir.Model, layers: list[OnnxLayer]) -> set[str]:
    """Layers whose result reaches a graph output through single-activation ops (classifiers, LM
    heads; :func:`graphprune.core.layers.output_heads`), by node name."""
    producers = {v.name: node for node in model.graph for v in node.outputs}
    names = {layer.node for layer in layers}
    heads = output_heads(
        [producers.get(v.name) for v in model.graph.outputs],
        {node for node in model.graph if node.name in names},
        lambda node: [producers.get(v.name) for v in node.inputs if v is not None and not v.is_initializer()],
    )
    return {node.name for node in heads}


def conv_window(node: ir.Node, weight_shape: tuple[int, ...]) -> ConvGeometry | None:
    """The window of an ONNX Conv as SparseGPT reads its patches (None for ``auto_pad`` other than
    NOTSET, or 3-D convs)."""
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


def layer_bias(node: ir.Node) -> ir.Value | None:
    """The layer's own bias: Conv's / Gemm's third input, or the vector an Add adds right after a
    MatMul; None for anything else (a Gemm's C that is an activation or a matrix stays float)."""
    if node.op_type == "MatMul":
        users = list(node.outputs[0].uses())
        if len(users) != 1 or users[0].node.op_type != "Add":
            return None
        add = users[0].node
        bias = add.inputs[1 - users[0].idx]
    else:
        bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None or not bias.is_initializer() or len(bias.const_value.shape) != 1:
        return None
    return bias
