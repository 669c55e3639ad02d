"""Constraint rules for ONNX operators: the same facts as :mod:`graphprune.rules.aten`, stated on
onnx_ir nodes for the same solver.

Rules are registered by ``(domain, op_type)``, which is an ONNX operator's identity; the
opset version selects between the attribute and input forms of an argument (``axes``,
``split``, Slice bounds).  Integer arguments that equal channel counts are registered as shape
constants with ONNX paths: ``("input", i, k)`` is entry ``k`` of the constant tensor at input
``i`` (a Reshape shape, Split sizes, Slice bounds); ``("attribute", name)`` or
``("attribute", name, k)`` an attribute (Conv ``group``).  The shared helpers (broadcasting,
reshape, matmul, conv, einsum) come from the ATen table, so both frontends state one algebra.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from graphprune.core.algebra import SpaceSolver
from graphprune.rules import onnx_sizes
from graphprune.rules.common import (
    broadcast,
    couple_attention,
    couple_conv,
    couple_einsum,
    couple_except,
    couple_gather_elements,
    couple_reduction,
    couple_reshape,
    matmul_dims,
)
from graphprune.rules.registry import RuleContext, RuleRegistry, flat_atoms

onnx_rules = RuleRegistry()
R = onnx_rules


def ops(*names: str, domain: str = "") -> list[tuple[str, str]]:
    return [(domain, n) for n in names]


class OnnxRuleContext(RuleContext):
    """Dims (solver atoms) of every ONNX value, by value; shapes come from the capture."""

    def __init__(self, solver: SpaceSolver, shapes: dict[str, tuple[int, ...]], opset: int) -> None:
        super().__init__(solver)
        self.shapes = shapes
        self.opset = opset
        self.sizes: dict[ir.Value, list[Any]] = {}  # Shape-derived int vectors (graphprune.rules.onnx_sizes)

    def allocate_value(self, value: ir.Value) -> None:
        shape = self.shapes.get(value.name)
        self._dims[value] = None if shape is None else [self.solver.new(int(s)) for s in shape]

    def dims(self, x: Any) -> list[int] | None:
        return self._dims.get(x) if isinstance(x, ir.Value) else None

    def out(self, node: ir.Node, index: int | None = 0) -> list[int]:
        return self._dims[node.outputs[index]]

    def op_name(self, node: ir.Node) -> str:
        return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type

    def node_atoms(self, node: ir.Node) -> list[int]:
        atoms: list[int] = []
        for v in [*node.inputs, *node.outputs]:
            atoms.extend(flat_atoms(self._dims.get(v)))
        return atoms


# -------------------------------------------------------------- arguments
def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def const_ints(value: ir.Value | None) -> list[int] | None:
    """The values of a constant integer tensor input (None: absent or computed in the graph)."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if not np.issubdtype(array.dtype, np.integer):
        return None
    return [int(v) for v in np.atleast_1d(array).reshape(-1)]


def int_argument(node: ir.Node, input_index: int, attribute: str) -> tuple[list[int] | None, tuple | None, bool]:
    """An int-list argument given as an input (newer opsets) or an attribute (older ones):
    ``(values, path prefix, given)``; ``given`` with values None means computed in the graph."""
    if len(node.inputs) > input_index and node.inputs[input_index] is not None:
        return const_ints(node.inputs[input_index]), ("input", input_index), True
    values = attr(node, attribute)
    if values is not None:
        return (
            [int(v) for v in (values if isinstance(values, (list, tuple)) else [values])],
            ("attribute", attribute),
            True,
        )
    return None, None, False


def _nd(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _inputs(ctx: OnnxRuleContext, node: ir.Node) -> list[list[int]]:
    return [d for d in (ctx.dims(v) for v in node.inputs) if d is not None]


def _is_activation(value: ir.Value | None) -> bool:
    """False for an initializer, also seen through the layout ops exporters put on weights."""
    while (
        value is not None
        and value.const_value is None
        and value.producer() is not None
        and value.producer().op_type in ("Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze")
    ):
        value = value.producer().inputs[0]
    return value is not None and value.const_value is None


# ----------------------------------------------------------- elementwise
ELEMENTWISE = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Where",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
    "Mod",
    "BitShift",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
    "PRelu",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Gelu",
    "Erf",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Neg",
    "Abs",
    "Clip",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "HardSigmoid",
    "HardSwish",
    "Softplus",
    "Softsign",
    "Mish",
    "ThresholdedRelu",
    "Sin",
    "Cos",
    "Tan",
    "Asin",
    "Acos",
    "Atan",
    "Sinh",
    "Cosh",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Not",
    "BitwiseNot",
    "IsNaN",
    "IsInf",
    "Cast",
    "Identity",
    "Swish",
)


@R.register(*ops(*ELEMENTWISE))
def elementwise(ctx: OnnxRuleContext, node: ir.Node) -> None:
    broadcast(ctx, node, _inputs(ctx, node), ctx.out(node))


@R.register(*ops("QuantizeLinear", "DequantizeLinear"))
def quantize_linear(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Elementwise, with per-axis scales and zero-points along ``axis`` (scalars: per tensor)."""
    x = ctx.dims(node.inputs[0])
    ctx.unify_all(x, ctx.out(node), node)
    axis = _nd(attr(node, "axis", 1), len(x)) if x else 0
    for v in node.inputs[1:]:
        d = ctx.dims(v)
        if d and len(d) == 1 and ctx.solver.size(d[0]) > 1:
            ctx.unify(d[0], x[axis], node)


@R.register(*ops("CastLike"))
def cast_like(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """The second input only supplies an element type."""
    ctx.unify_all(ctx.dims(node.inputs[0]), ctx.out(node), node)


@R.register(*ops("Dropout"))
def dropout(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x = ctx.dims(node.inputs[0])
    for out in node.outputs:
        if ctx.dims(out) is not None:
            ctx.unify_all(x, ctx.dims(out), node)


@R.register(*ops("Softmax", "LogSoftmax", "Hardmax"))
def softmax(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x = ctx.dims(node.inputs[0])
    ctx.unify_all(x, ctx.out(node), node)
    if ctx.opset >= 13:
        normalized = [_nd(attr(node, "axis", -1), len(x))]
    else:  # opsets before 13 flatten the input to 2-D at ``axis``
        normalized = range(_nd(attr(node, "axis", 1), len(x)), len(x))
    for d in normalized:
        ctx.solver.mark_inexact(x[d], f"normalized along by {node.op_type} ({node.name})")


@R.register(*ops("CumSum"))
def cumsum(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x = ctx.dims(node.inputs[0])
    ctx.unify_all(x, ctx.out(node), node)
    axis = const_ints(node.inputs[1])
    if axis is None:
        ctx.freeze_node(node, "CumSum along an axis computed in the graph")
        return
    ctx.solver.mark_inexact(x[_nd(axis[0], len(x))], f"accumulated by CumSum ({node.name})")


@R.register(*ops("Trilu"))
def trilu(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x = ctx.dims(node.inputs[0])
    ctx.unify_all(x, ctx.out(node), node)
    for a in x[-2:]:
        ctx.freeze(a, "Trilu keeps positions by their index", node)


# ------------------------------------------------------------------ shapes
@R.register(*ops("Reshape"))
def reshape(ctx: OnnxRuleContext, node: ir.Node) -> None:
    src, out = ctx.dims(node.inputs[0]), ctx.out(node)
    couple_reshape(ctx, node, src, out)
    follows = frozenset({-1} if attr(node, "allowzero", 0) else {-1, 0})  # inferred, or copied from the input
    _sized_by(ctx, node, 1, out, follows, "Reshape")


def _sized_by(
    ctx: OnnxRuleContext, node: ir.Node, index: int, out: list[int], follows: frozenset[int], what: str
) -> None:
    """``out`` takes its sizes from the int vector at input ``index``: a constant (each entry a shape
    constant, except values in ``follows``, which follow the input by themselves) or sizes read at
    run time (:mod:`graphprune.rules.onnx_sizes`); anything else freezes ``out``."""
    vector = onnx_sizes.entries(ctx, node, index)
    if vector is None:
        ctx.freeze_node(node, f"{what} to a shape computed in the graph")
        return
    onnx_sizes.couple_shape(ctx, node, vector, out, skip=follows)


@R.register(*ops("Flatten", "Squeeze", "Unsqueeze"))
def flatten(ctx: OnnxRuleContext, node: ir.Node) -> None:
    couple_reshape(ctx, node, ctx.dims(node.inputs[0]), ctx.out(node))


@R.register(*ops("Transpose"))
def transpose(ctx: OnnxRuleContext, node: ir.Node) -> None:
    src, out = ctx.dims(node.inputs[0]), ctx.out(node)
    perm = attr(node, "perm") or list(reversed(range(len(src))))
    for i, p in enumerate(perm):
        ctx.unify(src[p], out[i], node)


@R.register(*ops("Concat"))
def concat(ctx: OnnxRuleContext, node: ir.Node) -> None:
    out = ctx.out(node)
    axis = _nd(attr(node, "axis"), len(out))
    ins = _inputs(ctx, node)
    ctx.unify(ctx.solver.concat([d[axis] for d in ins]), out[axis], node)
    for d in ins:
        for i in range(len(out)):
            if i != axis:
                ctx.unify(d[i], out[i], node)


@R.register(*ops("Split"))
def split(ctx: OnnxRuleContext, node: ir.Node) -> None:
    src = ctx.dims(node.inputs[0])
    axis = _nd(attr(node, "axis", 0), len(src))
    outs = [ctx.dims(o) for o in node.outputs]
    sizes = [ctx.solver.size(o[axis]) for o in outs]
    parts = ctx.solver.parts(src[axis], sizes, node.name)
    for p, o in zip(parts, outs):
        ctx.unify(p, o[axis], node)
        ctx.unify_all([a for i, a in enumerate(src) if i != axis], [a for i, a in enumerate(o) if i != axis], node)
    values, path, given = int_argument(node, 1, "split")
    if given and values is None:
        ctx.freeze_node(node, "Split sizes computed in the graph")
    elif given:
        for k, p in enumerate(parts):
            ctx.constant(node, (*path, k), [p])
    else:  # equal parts (the last may be smaller): the full parts keep equal counts
        full = [o[axis] for o, s in zip(outs, sizes) if s == sizes[0]]
        for o in full[1:]:
            ctx.unify(full[0], o, node)
        if len(full) < len(outs):
            ctx.freeze_node(node, "Split into equal parts with a smaller last part")


@R.register(*ops("Slice"))
def slice_(ctx: OnnxRuleContext, node: ir.Node) -> None:
    s = ctx.solver
    src, out = ctx.dims(node.inputs[0]), ctx.out(node)
    starts, start_path, _ = int_argument(node, 1, "starts")
    ends, end_path, _ = int_argument(node, 2, "ends")
    axes, _, axes_given = int_argument(node, 3, "axes")
    steps, _, steps_given = int_argument(node, 4, "steps") if ctx.opset >= 10 else ([1] * len(starts or []), None, True)
    if starts is None or ends is None or (axes_given and axes is None) or (steps_given and steps is None):
        ctx.freeze_node(node, "Slice bounds computed in the graph")
        return
    axes = [_nd(a, len(src)) for a in axes] if axes else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    sliced = {}
    for k, (axis, start, end, step) in enumerate(zip(axes, starts, ends, steps)):
        sliced[axis] = (k, start, end, step)
    for i in range(len(src)):
        if i not in sliced:
            ctx.unify(src[i], out[i], node)
            continue
        k, start, end, step = sliced[i]
        size = s.size(src[i])
        if step != 1 or start < 0 or end < 0:
            why = "strided Slice" if step != 1 else "Slice with negative bounds"
            ctx.freeze(src[i], why, node)
            ctx.freeze(out[i], why, node)
            continue
        lo = min(start, size)
        hi = max(min(end, size), lo)
        before, mid, _after = s.parts(src[i], [lo, hi - lo, size - hi], node.name)
        ctx.unify(mid, out[i], node)
        if start != 0:
            ctx.constant(node, (*start_path, k), [before])
        if end < size:
            ctx.constant(node, (*end_path, k), [before, mid])


@R.register(*ops("Gather"))
def gather(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """out = data[:axis] + indices.shape + data[axis+1:]; positions along ``axis`` are chosen by data."""
    data, indices, out = ctx.dims(node.inputs[0]), ctx.dims(node.inputs[1]), ctx.out(node)
    axis = _nd(attr(node, "axis", 0), len(data))
    ctx.freeze(data[axis], "Gather reads positions chosen by its indices", node)
    ctx.unify_all(data[:axis], out[:axis], node)
    ctx.unify_all(indices, out[axis : axis + len(indices)], node)
    ctx.unify_all(data[axis + 1 :], out[axis + len(indices) :], node)


@R.register(*ops("GatherElements"))
def gather_elements(ctx: OnnxRuleContext, node: ir.Node) -> None:
    data = ctx.dims(node.inputs[0])
    couple_gather_elements(
        ctx, node, data, ctx.dims(node.inputs[1]), ctx.out(node), _nd(attr(node, "axis", 0), len(data))
    )


@R.register(
    *ops(
        "GatherND",
        "ScatterND",
        "ScatterElements",
        "Scatter",
        "NonZero",
        "Unique",
        "Compress",
        "OneHot",
        "Range",
        "NonMaxSuppression",
        "RoiAlign",
        "MaxRoiPool",
        "TfIdfVectorizer",
        "Multinomial",
    )
)
def data_placed(ctx: OnnxRuleContext, node: ir.Node) -> None:
    ctx.freeze_node(node, f"{node.op_type} places or selects values at positions chosen by data")


@R.register(*ops("Expand"))
def expand(ctx: OnnxRuleContext, node: ir.Node) -> None:
    out = ctx.out(node)
    broadcast(ctx, node, [ctx.dims(node.inputs[0])], out)
    _sized_by(ctx, node, 1, out, frozenset({1}), "Expand")  # 1 keeps the input's size


@R.register(*ops("Tile"))
def tile(ctx: OnnxRuleContext, node: ir.Node) -> None:
    s = ctx.solver
    src, out = ctx.dims(node.inputs[0]), ctx.out(node)
    repeats = const_ints(node.inputs[1])
    if repeats is None:
        ctx.freeze_node(node, "Tile repeats computed in the graph")
        return
    for i, r in enumerate(repeats):
        if r == 1:
            ctx.unify(src[i], out[i], node)
        else:
            ctx.unify(s.product([s.new(r), src[i]]), out[i], node)


@R.register(*ops("Pad"))
def pad(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x, out = ctx.dims(node.inputs[0]), ctx.out(node)
    pads, _, _ = int_argument(node, 1, "pads")
    axes, _, axes_given = int_argument(node, 3, "axes")
    if pads is None or (axes_given and axes is None):
        ctx.freeze_node(node, "Pad amounts computed in the graph")
        return
    axes = [_nd(a, len(x)) for a in axes] if axes else list(range(len(x)))
    half = len(pads) // 2
    couple_except(ctx, node, x, out, {a for k, a in enumerate(axes) if pads[k] or pads[k + half]}, "padded dim")


@R.register(*ops("Shape"))
def shape_of(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """The sizes it reads are tracked (:mod:`graphprune.rules.onnx_sizes`); its own output is a
    vector of sizes, not channels."""
    for a in flat_atoms(ctx.raw(node.outputs[0])):
        ctx.freeze(a, "a tensor of sizes", node)


@R.register(*ops("Size"))
def size_of(ctx: OnnxRuleContext, node: ir.Node) -> None:
    for a in ctx.dims(node.inputs[0]):
        ctx.freeze(a, "the element count is read at run time (Size)", node)


@R.register(*ops("ConstantOfShape"))
def constant_of_shape(ctx: OnnxRuleContext, node: ir.Node) -> None:
    _sized_by(ctx, node, 0, ctx.out(node), frozenset(), "ConstantOfShape")


# --------------------------------------------------------------- matmuls
@R.register(*ops("MatMul"))
def matmul(ctx: OnnxRuleContext, node: ir.Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    matmul_dims(ctx, node, ctx.dims(a), ctx.dims(b), ctx.out(node), _is_activation(a) and _is_activation(b))


@R.register(*ops("Gemm"))
def gemm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    a, b = ctx.dims(node.inputs[0]), ctx.dims(node.inputs[1])
    a = a[::-1] if attr(node, "transA", 0) else a
    b = b[::-1] if attr(node, "transB", 0) else b
    out = ctx.out(node)
    matmul_dims(ctx, node, a, b, out, _is_activation(node.inputs[0]) and _is_activation(node.inputs[1]))
    if len(node.inputs) > 2 and ctx.dims(node.inputs[2]) is not None:
        broadcast(ctx, node, [ctx.dims(node.inputs[2])], out)


@R.register(*ops("Einsum"))
def einsum(ctx: OnnxRuleContext, node: ir.Node) -> None:
    couple_einsum(ctx, node, attr(node, "equation"), _inputs(ctx, node), ctx.out(node))


# ------------------------------------------------------------------ conv
@R.register(*ops("Conv", "ConvTranspose"))
def conv(ctx: OnnxRuleContext, node: ir.Node) -> None:
    bias = ctx.dims(node.inputs[2]) if len(node.inputs) > 2 else None
    groups = attr(node, "group", 1)
    couple_conv(
        ctx,
        node,
        ctx.dims(node.inputs[0]),
        ctx.dims(node.inputs[1]),
        bias,
        ctx.out(node),
        node.op_type == "ConvTranspose",
        groups,
        ("attribute", "group") if "group" in node.attributes else None,
    )


@R.register(*ops("Attention"))
def attention(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """ONNX Attention (opset 23): 4-D inputs ``[B, heads, S, head_dim]`` as sdpa; 3-D inputs
    ``[B, S, heads * head_dim]`` are split by ``q_num_heads`` / ``kv_num_heads``, which become
    shape constants (pruning whole heads rewrites them).  Extra outputs (present key/value, the
    QK product) follow the key/value and score dims."""
    s = ctx.solver
    q, k, v = (ctx.dims(node.inputs[i]) for i in range(3))
    out = ctx.out(node)
    mask = ctx.dims(node.inputs[3]) if len(node.inputs) > 3 else None
    if len(q) == 3:
        hq, hkv = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
        d, dv = s.size(q[2]) // hq, s.size(v[2]) // hkv

        def heads(x: list[int], count: int, width: int) -> list[int]:
            h, w = s.factors(x[2], [count, width], node.name)
            return [x[0], h, x[1], w]

        q, k, v, out = heads(q, hq, d), heads(k, hkv, d), heads(v, hkv, dv), heads(out, hq, dv)
        ctx.constant(node, ("attribute", "q_num_heads"), [q[1]])
        ctx.constant(node, ("attribute", "kv_num_heads"), [k[1]])
    couple_attention(ctx, node, q, k, v, out, mask, gqa=True, scale_given="scale" in node.attributes)
    caches = [*zip(node.inputs[4:6], (k, v)), *zip(node.outputs[1:3], (k, v))]  # past / present key, value
    for cache, like in caches:  # [B, kv heads, S, head dim]
        d = ctx.dims(cache)
        if d is not None:
            ctx.unify_all([like[0], like[1], like[3]], [d[0], d[1], d[3]], node)
    scores = ctx.dims(node.outputs[3]) if len(node.outputs) > 3 else None  # [B, q heads, Sq, Skv]
    if scores is not None:
        ctx.unify_all(q[:2], scores[:2], node)
    for value in list(node.inputs[4:6]) + list(node.outputs[1:]):
        for a in (ctx.dims(value) or [])[2:3]:  # sequence dims of caches and the QK product
            ctx.freeze(a, "attention caches and scores are indexed by position", node)


# ----------------------------------------------------------------- norms
@R.register(*ops("BatchNormalization", "InstanceNormalization"))
def channel_norm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x = ctx.dims(node.inputs[0])
    ctx.unify_all(x, ctx.out(node), node)
    for v in list(node.inputs[1:]) + list(node.outputs[1:]):
        d = ctx.dims(v)
        if d is not None:
            ctx.unify(d[0], x[1], node)
    if node.op_type == "InstanceNormalization":
        for a in x[2:]:
            ctx.solver.mark_inexact(a, f"normalized by InstanceNormalization ({node.name})")


@R.register(*ops("LayerNormalization", "RMSNormalization"))
def layer_norm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x = ctx.dims(node.inputs[0])
    axis = _nd(attr(node, "axis", -1), len(x))
    ctx.unify_all(x, ctx.out(node), node)
    broadcast(ctx, node, [d for d in (ctx.dims(v) for v in node.inputs[1:]) if d is not None], x)
    for extra in node.outputs[1:]:  # Mean / InvStdDev: the leading dims, reduced dims kept as 1
        d = ctx.dims(extra)
        if d is not None:
            ctx.unify_all(x[:axis], d[:axis], node)
    for a in x[axis:]:
        ctx.solver.mark_inexact(a, f"normalized by {node.op_type} ({node.name})")


@R.register(*ops("GroupNormalization"))
def group_norm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    s = ctx.solver
    x = ctx.dims(node.inputs[0])
    ctx.unify_all(x, ctx.out(node), node)
    groups = attr(node, "num_groups")
    g, per = s.factors(x[1], [groups, s.size(x[1]) // groups], node.name)
    for v in node.inputs[1:3]:
        d = ctx.dims(v)
        if d is not None:  # opset 18: one scale per group; opset 21: one per channel
            ctx.unify(d[0], g if s.size(d[0]) == groups and groups != s.size(x[1]) else x[1], node)
    s.mark_inexact(per, f"normalized within groups by GroupNormalization ({node.name})")
    for a in x[2:]:
        s.mark_inexact(a, f"normalized by GroupNormalization ({node.name})")
    ctx.constant(node, ("attribute", "num_groups"), [g])


@R.register(*ops("LpNormalization", "MeanVarianceNormalization"))
def lp_norm(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x = ctx.dims(node.inputs[0])
    ctx.unify_all(x, ctx.out(node), node)
    axes = [attr(node, "axis", -1)] if node.op_type == "LpNormalization" else attr(node, "axes", [0, 2, 3])
    for a in axes:
        ctx.solver.mark_inexact(x[_nd(a, len(x))], f"normalized by {node.op_type} ({node.name})")


@R.register(*ops("LRN"))
def lrn(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x = ctx.dims(node.inputs[0])
    ctx.unify_all(x, ctx.out(node), node)
    ctx.freeze(x[1], "LRN mixes neighbouring channels", node)


# ------------------------------------------------------------ reductions
REDUCTIONS = (
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)


@R.register(*ops(*REDUCTIONS, "ArgMax", "ArgMin"))
def reduce(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x, out = ctx.dims(node.inputs[0]), ctx.out(node)
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [attr(node, "axis", 0)]
        ctx.freeze(x[_nd(axes[0], len(x))], f"{node.op_type} returns positions along this dim", node)
    else:
        axes, _, given = int_argument(node, 1, "axes")
        if given and axes is None:
            ctx.freeze_node(node, f"{node.op_type} over axes computed in the graph")
            return
        if not axes and attr(node, "noop_with_empty_axes", 0):
            ctx.unify_all(x, out, node)
            return
    reduced = {_nd(a, len(x)) for a in axes} if axes else set(range(len(x)))
    couple_reduction(ctx, node, x, [out], reduced, bool(attr(node, "keepdims", 1)))


@R.register(*ops("TopK"))
def topk(ctx: OnnxRuleContext, node: ir.Node) -> None:
    x = ctx.dims(node.inputs[0])
    for out in node.outputs:
        couple_except(
            ctx,
            node,
            x,
            ctx.dims(out),
            {_nd(attr(node, "axis", -1), len(x))},
            "TopK orders positions along this dim by value",
        )


# ---------------------------------------------------- spatial operators
@R.register(
    *ops(
        "MaxPool",
        "AveragePool",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "Upsample",
        "Resize",
        "MaxUnpool",
    )
)
def spatial(ctx: OnnxRuleContext, node: ir.Node) -> None:
    """Batch and channel dims map through (where their size is kept); spatial dims are frozen."""
    x = ctx.dims(node.inputs[0])
    for out_value in node.outputs:
        out = ctx.dims(out_value)
        if out is None:
            continue
        for i, (a, b) in enumerate(zip(x, out)):
            if i < 2 and ctx.solver.size(a) == ctx.solver.size(b):
                ctx.unify(a, b, node)
            else:
                ctx.freeze(a, f"{node.op_type} mixes positions along this dim", node)
                ctx.freeze(b, f"{node.op_type} mixes positions along this dim", node)
    if node.op_type == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None:
        sizes = const_ints(node.inputs[3])
        if sizes is None:
            ctx.freeze_node(node, "Resize to sizes computed in the graph")
            return
        for k in range(min(2, len(sizes))):
            ctx.constant(node, ("input", 3, k), [ctx.out(node)[k]])


@R.register(*ops("DepthToSpace", "SpaceToDepth"))
def depth_to_space(ctx: OnnxRuleContext, node: ir.Node) -> None:
    s = ctx.solver
    x, out = ctx.dims(node.inputs[0]), ctx.out(node)
    r = attr(node, "blocksize")
    to_space = node.op_type == "DepthToSpace"
    wide, narrow = (x, out) if to_space else (out, x)
    c = s.size(narrow[1])
    crd = to_space and attr(node, "mode", "DCR") == "CRD"
    factors = s.factors(wide[1], [c, r, r] if crd else [r, r, c], node.name)
    channel, blocks = (factors[0], factors[1:]) if crd else (factors[2], factors[:2])
    ctx.unify(channel, narrow[1], node)
    ctx.unify(x[0], out[0], node)
    for a in blocks + x[2:] + out[2:]:
        ctx.freeze(a, f"{node.op_type} moves channels into space", node)
