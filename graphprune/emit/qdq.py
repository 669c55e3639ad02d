"""Write an int8 or fp8 :class:`~graphprune.algorithms.quant.QuantPlan` into an ONNX graph as QDQ nodes.

The graph is the float export of the model (fake quantization stripped).  For each quantized
layer: its weight initializer becomes a uint8 initializer holding the plan's int8 integers plus 128
(zero-point 128: the same real values, the plan's own per-channel scales) read through
``DequantizeLinear``.  Not int8: onnxruntime's x86 kernels for uint8 activations times int8 weights
add pairs of products in saturating int16 on CPUs without VNNI (AVX2), which gave 1-24% relative
error against the fake-quant model on a two-layer MLP; its uint8 x uint8 kernels do not saturate.
Its input activation goes through
``QuantizeLinear -> DequantizeLinear`` with the plan's per-tensor parameters; a convolution's output
too, and a ReLU right after it is dropped when the output's zero-point is the int8 minimum (the
quantization already clips at 0, as in the PyTorch model).  That is the pattern onnxruntime fuses
into QLinearConv / QGemm / QLinearMatMul (or MatMulIntegerToFloat).  Weight names: the exporter
feeds ``x @ W.T`` as ``Transpose(W) -> MatMul``; :func:`pretranspose` turns that into an
initializer ``<W>.T`` before the optimizer folds it under an anonymous name.

fp8 (E4M3, opset 19 and later): the weight initializer holds ``float8e4m3fn`` values read through a
per-channel ``DequantizeLinear``, and each input activation goes through ``QuantizeLinear ->
DequantizeLinear`` with a float8 zero-point (saturating, as the fake quantization does).
onnxruntime executes these on CPU as written and computes the layer itself in float: it has no fp8
matrix kernels on CPU; a GPU build's would read the same graph.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from graphprune.algorithms.number_formats import BIAS_QMAX, BIAS_QMIN, FP8, INT8, integer_weight, to_fp8
from graphprune.algorithms.quant import LayerQuant, QuantPlan
from graphprune.errors import ApplyError, InternalError

WEIGHT_READERS = {"Conv", "Gemm", "MatMul"}
TRANSPOSED = ".T"


def pretranspose(model: ir.Model, names: set[str]) -> None:
    """Replace each named initializer read only through ``Transpose(perm=[1, 0])`` by its transpose
    (named ``<name>.T``) read directly."""
    graph = model.graph
    for name in names:
        value = graph.initializers.get(name)
        uses = list(value.uses()) if value is not None else []
        if not uses or not all(_is_2d_transpose(use.node) for use in uses):
            continue
        transposed = _transposed_initializer(graph, value)
        for use in uses:
            _replace_output(graph, use.node.outputs[0], transposed)
            graph.remove(use.node, safe=True)
        del graph.initializers[name]


def _transposed_initializer(graph: ir.Graph, value: ir.Value) -> ir.Value:
    array = np.ascontiguousarray(value.const_value.numpy().T)
    return initializer(graph, value.name + TRANSPOSED, array)


def _is_2d_transpose(node: ir.Node) -> bool:
    perm = node.attributes.get("perm")
    return node.op_type == "Transpose" and node.domain == "" and perm is not None and list(perm.as_ints()) == [1, 0]


def insert_qdq(model: ir.Model, plan: QuantPlan, weights: dict[str, np.ndarray]) -> int:
    """Rewrite ``model`` in place; returns the number of quantized layers written.  ``weights`` are
    the float weights the plan's scales were computed for: an initializer whose values differ (the
    optimizer folded something into it) is refused, since the plan no longer describes it."""
    if plan.kind not in (INT8, FP8):
        raise InternalError(f"QDQ nodes are written for int8 and fp8 plans, not {plan.kind}")
    graph = model.graph
    activations: dict[tuple, ir.Value] = {}  # (value, scale, zero point) -> its dequantized copy
    for weight_name, layer in plan.layers.items():
        transposed = weight_name + TRANSPOSED in graph.initializers
        value = graph.initializers.get(weight_name + TRANSPOSED if transposed else weight_name)
        if value is None:
            raise ApplyError(
                f"quantized weight {weight_name} is not an initializer of the exported graph "
                "(the exporter changed it); cannot write its QDQ nodes"
            )
        readers = [use.node for use in value.uses()]
        if not readers or any(
            n.op_type not in WEIGHT_READERS or n.domain != "" or n.inputs[1] is not value for n in readers
        ):
            raise ApplyError(
                f"quantized weight {weight_name} is read by "
                f"{sorted({n.op_type for n in readers})}, not as the weight of Conv/Gemm/MatMul"
            )
        written = value.const_value.numpy()
        if not np.array_equal(written.T if transposed else written, weights[weight_name]):
            raise ApplyError(
                f"the ONNX optimizer rewrote quantized weight {weight_name} (it folded an op into it, "
                "e.g. a BatchNorm that Quantize could not fold because it is not an nn.BatchNorm "
                "module), so the model's int8 parameters no longer describe it"
            )
        axis = 1 - layer.axis if transposed else layer.axis
        scale = torch.tensor(layer.weight_scale, dtype=torch.float32)
        original = torch.from_numpy(value.const_value.numpy().copy())
        if plan.kind == INT8:  # uint8 with zero-point 128: see the module doc
            stored = (integer_weight(original, scale, axis).numpy().astype(np.int16) + 128).astype(np.uint8)
            zero = np.full(scale.shape, 128, dtype=np.uint8)
        else:
            shape = [-1 if d == axis else 1 for d in range(original.dim())]
            stored = _fp8_array(to_fp8(original, scale.reshape(shape)))
            zero = np.zeros(scale.shape, dtype=ml_dtypes.float8_e4m3fn)
        dequantized = _dequantize_weight(graph, value, stored, scale.numpy(), zero, axis, readers[0])
        value.replace_all_uses_with(dequantized)
        del graph.initializers[value.name]
        if layer.bias is not None:
            _quantize_bias(graph, layer, readers)
        for node in readers:
            activation = node.inputs[0]
            key = (activation, *layer.input)
            if plan.kind == FP8 and (relu := _relu_only_for(activation, node)) is not None:
                _fp8_before_relu(graph, relu, layer.input[0])
            elif key not in activations:
                activations[key] = _quantize_dequantize(graph, activation, *layer.input, kind=plan.kind, before=node)
            if key in activations:
                node.replace_input_with(0, activations[key])
            if layer.output is not None:
                _quantize_output(graph, node, *layer.output)
    graph.sort()  # a shared activation's pair sits before the reader handled first, maybe not the earliest
    return len(plan.layers)


def _quantize_bias(graph: ir.Graph, layer: LayerQuant, readers: list[ir.Node]) -> None:
    """Conv / Gemm read the bias as int32 through DequantizeLinear (scale ``s_in * s_w``), and so
    does the Add that adds it after a MatMul; a bias read any other way gets the same dequantized
    values as a float constant."""
    value = graph.initializers.get(layer.bias)
    if value is None and all(len(node.inputs) < 3 or node.inputs[2] is None for node in readers):
        return  # the optimizer dropped an all-zero bias (e.g. from folding a fresh BatchNorm)
    if value is None:
        raise ApplyError(f"quantized bias {layer.bias} is not an initializer of the exported graph")
    scale = torch.tensor(layer.bias_scale, dtype=torch.float32)
    original = torch.from_numpy(value.const_value.numpy().copy()).float()
    fq = torch.fake_quantize_per_channel_affine(
        original, scale, torch.zeros_like(scale, dtype=torch.int32), 0, BIAS_QMIN, BIAS_QMAX
    )
    uses = list(value.uses())
    if all(use.node in readers and use.idx == 2 for use in uses) or all(_adds_to(use.node, readers) for use in uses):
        q = torch.round(fq / scale).to(torch.int32).numpy()
        node = ir.node(
            "DequantizeLinear",
            [
                initializer(graph, f"{value.name}_quantized", q),
                initializer(graph, f"{value.name}_scale", scale.numpy()),
                initializer(graph, f"{value.name}_zero_point", np.zeros(q.shape, np.int32)),
            ],
            {"axis": 0},
            name=f"{value.name}_DequantizeLinear",
        )
        node.outputs[0].name = f"{value.name}_dequantized"
        _typed(node.outputs[0], ir.DataType.FLOAT, ir.Shape(q.shape))
        graph.insert_before(readers[0], node)
        value.replace_all_uses_with(node.outputs[0])
        del graph.initializers[value.name]
    else:
        value.const_value = ir.tensor(fq.numpy(), name=value.name)


def _adds_to(node: ir.Node, readers: list[ir.Node]) -> bool:
    """``node`` adds the bias straight to a reader's result (MatMul + Add, as linear layers export):
    written as int32 too, so a MatMul + Add that onnxruntime turns into a Gemm can fuse into QGemm."""
    return (
        node.op_type == "Add"
        and node.domain == ""
        and any(x is not None and x.producer() in readers for x in node.inputs)
    )


def _replace_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` reads ``new``; a graph output keeps its name."""
    name, was_output = old.name, old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:
        old.name, new.name = f"{name}_replaced", name


def _relu_only_for(activation: ir.Value, reader: ir.Node) -> ir.Node | None:
    """The ReLU that produces ``activation`` when ``reader`` is its only user."""
    relu = activation.producer()
    if relu is None or relu.op_type != "Relu" or relu.domain != "" or activation.is_graph_output():
        return None
    return relu if [use.node for use in activation.uses()] == [reader] else None


def _fp8_before_relu(graph: ir.Graph, relu: ir.Node, scale: float) -> None:
    """fp8 quantization of a ReLU's result, written in front of the ReLU: the same values (E4M3
    rounding is symmetric and keeps 0, so it commutes with ReLU), and a graph onnxruntime computes
    right.  Behind it, onnxruntime's extended optimizations drop the ReLU (they take a float8
    zero-point of 0 for the quantized type's minimum, as for uint8)."""
    relu.replace_input_with(0, _quantize_dequantize(graph, relu.inputs[0], scale, 0, kind=FP8, before=relu))


def _fp8_array(values: torch.Tensor) -> np.ndarray:
    """A torch ``float8_e4m3fn`` tensor as the numpy array onnx_ir stores as FLOAT8E4M3FN."""
    return values.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)


def _dequantize_weight(
    graph: ir.Graph,
    value: ir.Value,
    stored: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    axis: int,
    before: ir.Node,
) -> ir.Value:
    name = value.name
    quantized = initializer(graph, f"{name}_quantized", stored)
    scales = initializer(graph, f"{name}_scale", scale)
    zeros = initializer(graph, f"{name}_zero_point", zero)
    node = ir.node("DequantizeLinear", [quantized, scales, zeros], {"axis": axis}, name=f"{name}_DequantizeLinear")
    node.outputs[0].name = f"{name}_dequantized"
    _typed(node.outputs[0], ir.DataType.FLOAT, ir.Shape(stored.shape))
    graph.insert_before(before, node)
    return node.outputs[0]


def _quantize_dequantize(
    graph: ir.Graph,
    value: ir.Value,
    scale: float,
    zero_point: int,
    *,
    kind: str = INT8,
    before: ir.Node | None = None,
    after: ir.Node | None = None,
) -> ir.Value:
    base = f"{value.name}_{len(graph.initializers)}"
    s = initializer(graph, f"{base}_scale", np.array(scale, dtype=np.float32))
    # int8: uint8 with the zero-point shifted by 128 stands for exactly the same values as the plan's
    # int8 (q_u8 = q_s8 + 128); it is the activation type onnxruntime's x86 kernels take natively (it
    # would otherwise convert int8 pairs itself, and a conversion that reaches only some pairs of a
    # layer blocks QLinearConv fusion).  fp8: the float8 zero-point sets the quantized type.
    if kind == INT8:
        zero = np.array(zero_point + 128, dtype=np.uint8)
    else:
        zero = np.array(0, dtype=ml_dtypes.float8_e4m3fn)
    z = initializer(graph, f"{base}_zero_point", zero)
    q = ir.node("QuantizeLinear", [value, s, z], name=f"{base}_QuantizeLinear")
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{base}_DequantizeLinear")
    q.outputs[0].name, dq.outputs[0].name = f"{base}_quantized", f"{base}_dequantized"
    _typed(q.outputs[0], ir.DataType.from_numpy(zero.dtype), value.shape)
    _typed(dq.outputs[0], ir.DataType.FLOAT, value.shape)
    if after is not None:
        graph.insert_after(after, [q, dq])
    else:
        graph.insert_before(before, [q, dq])
    return dq.outputs[0]


def _quantize_output(graph: ir.Graph, node: ir.Node, scale: float, zero_point: int) -> None:
    output = node.outputs[0]
    users = [use.node for use in output.uses()]
    dequantized = _quantize_dequantize(graph, output, scale, zero_point, after=node)
    quantize = dequantized.producer().inputs[0].producer()
    for use in list(output.uses()):
        if use.node is not quantize:
            use.node.replace_input_with(use.idx, dequantized)
    if output.is_graph_output():
        graph.outputs[graph.outputs.index(output)] = dequantized
        output.name, dequantized.name = f"{output.name}_float", output.name
    if zero_point == -128 and len(users) == 1 and users[0].op_type == "Relu" and users[0].domain == "":
        relu = users[0]  # the quantization clips at 0 already: the ReLU is the identity here
        _replace_output(graph, relu.outputs[0], dequantized)
        graph.remove(relu, safe=True)


def stored_integers(initializers: "dict[str, ir.Value]", name: str) -> tuple[np.ndarray, int]:
    """The integers initializer ``name`` stands for, with its zero-point subtracted (zero stays zero,
    so an N:M pattern can be checked on them), and that zero-point (0 for an unquantized value)."""
    values = initializers[name].const_value.numpy()
    if values.dtype == ml_dtypes.float8_e4m3fn:
        return values.astype(np.float32), 0  # fp8: zero is 0.0
    point = initializers.get(name[: -len("_quantized")] + "_zero_point") if name.endswith("_quantized") else None
    if point is None:
        return values, 0
    points = np.unique(point.const_value.numpy())
    if len(points) != 1:
        raise ApplyError(f"{name} has several zero-points {points.tolist()}: its N:M pattern is not one of integers")
    return values.astype(np.int32) - int(points[0]), int(points[0])


def _typed(value: ir.Value, dtype: ir.DataType, shape: ir.Shape | None) -> None:
    value.type, value.shape = ir.TensorType(dtype), shape


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer ``name`` holding ``array``, registered in ``graph``."""
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value
