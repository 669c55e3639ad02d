"""Weight layers of an ONNX graph: the nodes that multiply an activation by an initializer, the
layout each weight is read in, and statistics of their inputs from onnxruntime.

A weight's layout follows the node that reads it: Conv ``[K, C/g, k...]`` is the torch conv
layout; MatMul's ``B [K, N]`` is stored reduction-first (the layout of transformers' Conv1D);
Gemm's ``B`` is ``[N, K]`` with ``transB`` and ``[K, N]`` without.  With the torch path's layout
names the torch path's mask and quantization arithmetic applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from graphprune.frontends.onnx.capture import Feeds, OnnxCapture, graph_inputs, session, tensor_of
from graphprune.algorithms.nm import CONV, CONV1D, LINEAR, NMPattern, fits

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


def input_moments(capture: OnnxCapture, layers: list[WeightLayer],
                  feeds: list[Feeds]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (by weight name): mean and mean square of its input per reduced channel over the
    feeds, read from onnxruntime with the layers' inputs exposed as outputs (what Wanda and the
    activation-based channel criteria need)."""
    names = sorted({layer.activation for layer in layers})
    runner = session(capture.model, names)
    index = {o.name: i for i, o in enumerate(runner.get_outputs())}
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed in feeds:
        values = runner.run(None, feed)
        for layer in layers:
            x = np.asarray(values[index[layer.activation]], dtype=np.float64)
            x = np.moveaxis(x, layer.channel_axis, -1).reshape(-1, x.shape[layer.channel_axis])
            sums[layer.weight] = sums.get(layer.weight, 0) + x.sum(0)
            squares[layer.weight] = squares.get(layer.weight, 0) + (x ** 2).sum(0)
            counts[layer.weight] = counts.get(layer.weight, 0) + x.shape[0]
    return {name: (torch.from_numpy(sums[name] / max(counts[name], 1)),
                   torch.from_numpy(squares[name] / max(counts[name], 1))) for name in sums}


def input_channel_norms(weight: torch.Tensor, layer: WeightLayer) -> torch.Tensor:
    """||W[:, c]|| for each input channel c of the layer's activation (per group for grouped convs)."""
    w = weight.double()
    if layer.layout == CONV1D:  # [in, out]
        return w.pow(2).sum(1).sqrt()
    if layer.layout == LINEAR:  # [out, in]
        return w.pow(2).sum(0).sqrt()
    cout, per_group = w.shape[:2]
    return w.reshape(layer.groups, cout // layer.groups, per_group, -1).pow(2).sum((1, 3)).sqrt().reshape(-1)


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
