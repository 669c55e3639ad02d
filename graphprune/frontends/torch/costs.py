"""The ops of a captured torch graph as :class:`~graphprune.core.costs.OpCost` rows.

Every ``call_function`` node that computes something is one row: its MACs
(:func:`graphprune.frontends.torch.macs.node_macs`), the parameter a matmul or convolution
multiplies by, and the elements of its other tensor arguments and of its outputs.  Views (ops
whose schema says their output aliases an input) move no data and are left out.
"""

from __future__ import annotations

from collections import Counter
from math import prod
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from graphprune.core.costs import Format, OpCost
from graphprune.frontends.torch.calibration import weight_layers
from graphprune.frontends.torch.capture import CapturedGraph, ExampleInputs, capture, set_eval
from graphprune.frontends.torch.copying import clone
from graphprune.frontends.torch.fake_quant import read_quant_plan, strip_quantization
from graphprune.frontends.torch.macs import node_macs
from graphprune.frontends.torch.masks import finalize, nm_masks


def graph_costs(captured: CapturedGraph) -> list[OpCost]:
    """One row per computing op of ``captured``, in graph order.  An op that reads one activation,
    the only use of a weight layer's output (or of such an op's), and writes as many elements is
    that layer's epilogue (``epilogue_of``): a folded BatchNorm, an activation function."""
    names = captured.tensor_names
    weights = {layer.node: layer.weight for layer in weight_layers(captured)}  # node -> the parameter it multiplies
    layer_of: dict[fx.Node, str] = {}  # a weight layer's node, or its epilogue's -> the layer's weight
    seen: Counter[str] = Counter()
    rows = []
    for node in captured.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.is_view:
            continue
        op = f"aten.{node.target.overloadpacket.__name__}"
        weight = weights.get(node)
        weight_elements = parameters = inputs = 0
        activations = []
        for arg in _tensor_args(node):
            elements = _elements(arg)
            kind, name = names.get(arg.name, ("", ""))
            if weight is not None and name == weight:
                weight_elements = elements
            elif kind in ("parameter", "buffer", "constant"):
                parameters += elements
            else:
                inputs += elements
                activations.append(arg)
        outputs = sum(prod(v.shape) for v in _values(node.meta.get("val")))
        macs = node_macs(node)
        epilogue = None
        if weight is not None:
            layer_of[node] = weight
        elif macs == 0 and len(activations) == 1 and len(activations[0].users) == 1 and inputs == outputs:
            epilogue = layer_of.get(activations[0])
            if epilogue is not None:
                layer_of[node] = epilogue
        if weight is None:
            key = f"{op}#{seen[op]}"
            seen[op] += 1
        else:
            key = weight
        rows.append(
            OpCost(
                key=key,
                op=op,
                macs=macs,
                weight=weight,
                weight_elements=weight_elements,
                parameter_elements=parameters,
                input_elements=inputs,
                output_elements=outputs,
                epilogue_of=epilogue,
            )
        )
    return rows


def model_costs(model: nn.Module, example_inputs: ExampleInputs) -> list[OpCost]:
    """The ops of ``model`` as deployed: captured without its masks and fake quantization (their
    ops are not run in deployment; :func:`layer_formats` says what they change)."""
    return graph_costs(capture(set_eval(strip_quantization(finalize(clone(model)))), example_inputs))


def layer_formats(model: nn.Module, precision: str) -> dict[str, Format]:
    """The number formats and N:M pattern of each compressed weight of ``model`` (its quantization
    format where it carries fake quantization, activations in float for weight-only formats, the
    float ``precision`` elsewhere)."""
    plan = read_quant_plan(model)
    quantized = set(plan.layers) if plan else set()
    patterns = {name: (pattern.n, pattern.m) for name, (_, pattern) in nm_masks(model).items()}
    formats = {}
    for name in sorted(quantized | set(patterns)):
        if plan is not None and name in quantized:
            formats[name] = Format(plan.kind, precision if plan.weight_only else plan.kind, patterns.get(name))
        else:
            formats[name] = Format(precision, precision, patterns.get(name))
    return formats


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """The distinct graph values ``node`` reads."""
    found: dict[fx.Node, None] = {}
    for arg in pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(arg, fx.Node) and _values(arg.meta.get("val")):
            found[arg] = None
    return list(found)


def _elements(node: fx.Node) -> int:
    return sum(prod(v.shape) for v in _values(node.meta.get("val")))


def _values(value: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
