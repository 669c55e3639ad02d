"""Constraint rules for the ATen ops that ``torch.export`` produces.

Each rule states how an op couples the dims of its inputs and outputs.  Conventions:
dims of size 1 never couple (they broadcast); output dims that an op computes from
spatial arithmetic (conv, pooling, interpolation, padding) are frozen, because their size
is not a channel count; any integer argument that equals a channel count is registered as
a shape constant so that pruning can rewrite it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphprune.core.algebra import SpaceSolver
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
from graphprune.rules.registry import ArgPath, RuleContext, RuleRegistry, flat_atoms

aten_rules = RuleRegistry()  # every rule below registers itself here
R = aten_rules


class AtenRuleContext(RuleContext):
    """Dims (solver atoms) of every value of a captured torch graph, by fx node; shapes come from
    the nodes' ``meta["val"]``."""

    def __init__(self, solver: SpaceSolver) -> None:
        super().__init__(solver)
        self.parameter_nodes: set[fx.Node] = set()

    def allocate(self, node: fx.Node) -> None:
        """Give every dim of the node's value(s) a fresh atom."""
        self._dims[node] = self._alloc(node.meta.get("val"))

    def _alloc(self, val: Any) -> Any:
        if isinstance(val, torch.Tensor):
            return [self.solver.new(int(s)) for s in val.shape]
        if isinstance(val, (list, tuple)):
            return [self._alloc(v) for v in val]
        return None

    def dims(self, x: Any) -> list[int] | None:
        if isinstance(x, fx.Node):
            d = self._dims.get(x)
            if d is not None and all(isinstance(a, int) for a in d):
                return d
        return None

    def out(self, node: fx.Node, index: int | None = None) -> list[int]:
        d = self._dims[node]
        return d if index is None else d[index]

    def op_name(self, node: fx.Node) -> str:
        return str(node.target)

    def node_atoms(self, node: fx.Node) -> list[int]:
        atoms: list[int] = []
        for x in node.all_input_nodes:
            atoms.extend(flat_atoms(self._dims.get(x)))
        atoms.extend(flat_atoms(self._dims.get(node)))
        return atoms


def arg_at(node: fx.Node, path: ArgPath) -> Any:
    """The argument of ``node`` that ``path`` locates (an entry of a list argument if 3 long)."""
    where, key, *rest = path
    value = node.args[key] if where == "args" else node.kwargs[key]
    return value[rest[0]] if rest else value


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> tuple[Any, ArgPath]:
    """An argument given positionally or by keyword, with its path for constants."""
    if len(node.args) > index:
        return node.args[index], ("args", index)
    if name in node.kwargs:
        return node.kwargs[name], ("kwargs", name)
    return default, None


aten = torch.ops.aten
INT64_MAX = 2**63 - 1


def _nd(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _tensor_args(ctx: RuleContext, node: fx.Node) -> list[list[int]]:
    out = []
    for x in list(node.args) + list(node.kwargs.values()):
        d = ctx.dims(x)
        if d is not None:
            out.append(d)
    return out


def _pointwise(ctx: RuleContext, node: fx.Node) -> None:
    broadcast(ctx, node, _tensor_args(ctx, node), ctx.out(node))


R.pointwise = _pointwise
R.register(
    aten.__and__,
    aten.__or__,
    aten.__xor__,
    aten.masked_fill,
    aten.hardswish,
    aten.hardswish_,
    aten.gelu_,
    aten.copy,
    aten.copy_,
    aten.fill_,
    aten.zero_,
    aten.type_as,
    aten.where,
    aten.floor_divide,
)(_pointwise)


@R.register(
    aten.clone,
    aten.contiguous,
    aten.alias,
    aten.detach,
    aten.detach_,
    aten.lift_fresh_copy,
    aten.dropout,
    aten.feature_dropout,
    aten.alpha_dropout,
    aten.to,
    aten._to_copy,
    aten.zeros_like,
    aten.ones_like,
    aten.empty_like,
    aten.full_like,
    aten.rand_like,
    aten.randn_like,
    aten.dropout_,
)
def identity(ctx: RuleContext, node: fx.Node) -> None:
    ctx.unify_all(ctx.dims(node.args[0]), ctx.out(node), node)


@R.register(aten.native_dropout)
def native_dropout(ctx: RuleContext, node: fx.Node) -> None:
    for out in ctx.raw(node):
        ctx.unify_all(ctx.dims(node.args[0]), out, node)


@R.register(aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size)
def no_output(ctx: RuleContext, node: fx.Node) -> None:
    """Runtime checks of dtype/device: they read a tensor and produce nothing."""


def _size_constants(ctx: RuleContext, node: fx.Node, index: int, sizes: list, out: list[int]) -> None:
    for k, v in enumerate(sizes):
        if isinstance(v, int) and v != -1:
            ctx.constant(node, ("args", index, k), [out[k]])


@R.register(aten.view, aten.reshape, aten._unsafe_view)
def view(ctx: RuleContext, node: fx.Node) -> None:
    couple_reshape(ctx, node, ctx.dims(node.args[0]), ctx.out(node))
    _size_constants(ctx, node, 1, list(node.args[1]), ctx.out(node))


@R.register(aten.view_as, aten.reshape_as, aten.expand_as)
def reshape_as(ctx: RuleContext, node: fx.Node) -> None:
    if node.target.overloadpacket is aten.expand_as:
        expand_like(ctx, node)
    else:
        couple_reshape(ctx, node, ctx.dims(node.args[0]), ctx.out(node))
    ctx.unify_all(ctx.dims(node.args[1]), ctx.out(node), node)


@R.register(aten.flatten)
def flatten(ctx: RuleContext, node: fx.Node) -> None:
    couple_reshape(ctx, node, ctx.dims(node.args[0]), ctx.out(node))


@R.register(aten.unflatten)
def unflatten(ctx: RuleContext, node: fx.Node) -> None:
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    couple_reshape(ctx, node, src, out)
    dim = _nd(node.args[1], len(src))
    for k, v in enumerate(node.args[2]):
        if v != -1:
            ctx.constant(node, ("args", 2, k), [out[dim + k]])


@R.register(aten.squeeze, aten.unsqueeze)
def squeeze(ctx: RuleContext, node: fx.Node) -> None:
    couple_reshape(ctx, node, ctx.dims(node.args[0]), ctx.out(node))


@R.register(aten.permute)
def permute(ctx: RuleContext, node: fx.Node) -> None:
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    for i, p in enumerate(node.args[1]):
        ctx.unify(src[_nd(p, len(src))], out[i], node)


@R.register(aten.transpose, aten.swapaxes, aten.swapdims)
def transpose(ctx: RuleContext, node: fx.Node) -> None:
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    a, b = _nd(node.args[1], len(src)), _nd(node.args[2], len(src))
    perm = list(range(len(src)))
    perm[a], perm[b] = perm[b], perm[a]
    for i, p in enumerate(perm):
        ctx.unify(src[p], out[i], node)


@R.register(aten.t, aten.numpy_T, aten.mT)
def t(ctx: RuleContext, node: fx.Node) -> None:
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    perm = list(range(len(src)))
    if len(src) >= 2:
        perm[-1], perm[-2] = perm[-2], perm[-1]
    for i, p in enumerate(perm):
        ctx.unify(src[p], out[i], node)


def expand_like(ctx: RuleContext, node: fx.Node) -> None:
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    broadcast(ctx, node, [src], out)


@R.register(aten.expand)
def expand(ctx: RuleContext, node: fx.Node) -> None:
    expand_like(ctx, node)
    _size_constants(ctx, node, 1, list(node.args[1]), ctx.out(node))


@R.register(aten.repeat)
def repeat(ctx: RuleContext, node: fx.Node) -> None:
    s = ctx.solver
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    reps = list(node.args[1])
    lead = len(reps) - len(src)
    for i, r in enumerate(reps):
        if i < lead:
            ctx.constant(node, ("args", 1, i), [out[i]])
            continue
        x = src[i - lead]
        if r == 1:
            ctx.unify(x, out[i], node)
        else:
            tile = s.new(r)
            ctx.unify(s.product([tile, x]), out[i], node)
            ctx.constant(node, ("args", 1, i), [tile])


@R.register(aten.repeat_interleave.self_int)
def repeat_interleave(ctx: RuleContext, node: fx.Node) -> None:
    s = ctx.solver
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    dim, _ = arg(node, 2, "dim")
    if dim is None:
        ctx.freeze_node(node, "repeat_interleave without dim flattens the tensor")
        return
    dim = _nd(dim, len(src))
    rep = s.new(node.args[1])
    for i, (a, b) in enumerate(zip(src, out)):
        if i == dim:
            ctx.unify(s.product([a, rep]), b, node)
        else:
            ctx.unify(a, b, node)
    ctx.constant(node, ("args", 1), [rep])
    if node.kwargs.get("output_size") is not None:
        ctx.constant(node, ("kwargs", "output_size"), [out[dim]])


@R.register(aten.cat, aten.concat, aten.concatenate)
def cat(ctx: RuleContext, node: fx.Node) -> None:
    out = ctx.out(node)
    dim = _nd(arg(node, 1, "dim", 0)[0], len(out))
    ins = [ctx.dims(x) for x in node.args[0]]
    ins = [d for d in ins if d is not None and len(d) == len(out)]  # legacy 1-D empties are skipped
    ctx.unify(ctx.solver.concat([d[dim] for d in ins]), out[dim], node)
    for d in ins:
        for i in range(len(out)):
            if i != dim:
                ctx.unify(d[i], out[i], node)


@R.register(aten.stack)
def stack(ctx: RuleContext, node: fx.Node) -> None:
    """The new dim holds one entry per tensor the code lists: removing one would not remove the
    tensor from the code's list, so it is frozen."""
    out = ctx.out(node)
    dim = _nd(arg(node, 1, "dim", 0)[0], len(out))
    ctx.freeze(out[dim], "stack: the code lists each stacked tensor by position", node)
    rest = [a for i, a in enumerate(out) if i != dim]
    for x in node.args[0]:
        ctx.unify_all(ctx.dims(x), rest, node)


def _split_outputs(ctx: RuleContext, node: fx.Node, dim: int, equal_parts: bool) -> list[int]:
    src = ctx.dims(node.args[0])
    outs = ctx.raw(node)
    sizes = [ctx.solver.size(o[dim]) for o in outs]
    parts = ctx.solver.parts(src[dim], sizes, node.name)
    for p, o in zip(parts, outs):
        ctx.unify(p, o[dim], node)
        for i in range(len(src)):
            if i != dim:
                ctx.unify(src[i], o[i], node)
    if equal_parts:
        # One size argument serves all full parts: they must keep equal counts, which
        # coupling them channel-for-channel guarantees.
        full = [o[dim] for o in outs if ctx.solver.size(o[dim]) == sizes[0]]
        for o in full[1:]:
            ctx.unify(full[0], o, node)
    return [o[dim] for o in outs]


@R.register(aten.split.Tensor, aten.split_with_sizes, aten.chunk, aten.split.sizes)
def split(ctx: RuleContext, node: fx.Node) -> None:
    src = ctx.dims(node.args[0])
    dim = _nd(arg(node, 2, "dim", 0)[0], len(src))
    packet = node.target.overloadpacket if isinstance(node.target, torch._ops.OpOverload) else node.target
    sizes_arg = node.args[1]
    equal = isinstance(sizes_arg, int)
    parts = _split_outputs(ctx, node, dim, equal)
    if packet is aten.chunk:
        return
    if equal:
        ctx.constant(node, ("args", 1), [parts[0]])
    else:
        for k, p in enumerate(parts):
            ctx.constant(node, ("args", 1, k), [p])


@R.register(aten.unbind)
def unbind(ctx: RuleContext, node: fx.Node) -> None:
    src = ctx.dims(node.args[0])
    dim = _nd(arg(node, 1, "dim", 0)[0], len(src))
    ctx.freeze(src[dim], "unbind: the code names each slice by position", node)
    rest = [a for i, a in enumerate(src) if i != dim]
    for o in ctx.raw(node):
        ctx.unify_all(rest, o, node)


@R.register(aten.select.int)
def select(ctx: RuleContext, node: fx.Node) -> None:
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    dim = _nd(node.args[1], len(src))
    ctx.freeze(src[dim], "select: a fixed index is read", node)
    ctx.unify_all([a for i, a in enumerate(src) if i != dim], out, node)


def _contiguous_slice(
    ctx: RuleContext,
    node: fx.Node,
    dim: int,
    start: int,
    end: int,
    start_path,
    end_path,
    start_given: bool,
    end_given: bool,
) -> None:
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    size = ctx.solver.size(src[dim])
    before, mid, after = ctx.solver.parts(src[dim], [start, end - start, size - end], node.name)
    ctx.unify(mid, out[dim], node)
    for i in range(len(src)):
        if i != dim:
            ctx.unify(src[i], out[i], node)
    if start_given:
        ctx.constant(node, start_path, [before])
    if end_given:
        ctx.constant(node, end_path, [before, mid])


@R.register(aten.slice.Tensor)
def slice_(ctx: RuleContext, node: fx.Node) -> None:
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    dim = _nd(arg(node, 1, "dim", 0)[0], len(src))
    size = ctx.solver.size(src[dim])
    start, start_path = arg(node, 2, "start")
    end, end_path = arg(node, 3, "end")
    step = arg(node, 4, "step", 1)[0]
    if (start is not None and start < 0) or (end is not None and end < 0):
        ctx.freeze(src[dim], "slice with negative bounds", node)
        ctx.freeze(out[dim], "slice with negative bounds", node)
        ctx.unify_all([a for i, a in enumerate(src) if i != dim], [a for i, a in enumerate(out) if i != dim], node)
        return
    lo = min(start or 0, size)
    hi = size if end is None else min(end, size)
    if step != 1:
        ctx.freeze(src[dim], "strided slice", node)
        ctx.freeze(out[dim], "strided slice", node)
        ctx.unify_all([a for i, a in enumerate(src) if i != dim], [a for i, a in enumerate(out) if i != dim], node)
        return
    _contiguous_slice(
        ctx,
        node,
        dim,
        lo,
        max(hi, lo),
        start_path,
        end_path,
        start is not None and start != 0,
        end is not None and end < size,
    )


@R.register(aten.narrow)
def narrow(ctx: RuleContext, node: fx.Node) -> None:
    src = ctx.dims(node.args[0])
    dim = _nd(node.args[1], len(src))
    start, length = node.args[2], node.args[3]
    _contiguous_slice(ctx, node, dim, start, start + length, ("args", 2), ("args", 3), True, False)
    if length != ctx.solver.size(src[dim]):
        ctx.constant(node, ("args", 3), [ctx.out(node)[dim]])


@R.register(aten.index.Tensor)
def index(ctx: RuleContext, node: fx.Node) -> None:
    src, out = ctx.dims(node.args[0]), ctx.out(node)
    indices = list(node.args[1])
    used = [i for i, x in enumerate(indices) if x is not None]
    adjacent = used == list(range(used[0], used[-1] + 1)) if used else True
    tail = len(src) - len(indices)
    passed = 0
    if adjacent:
        for i in range(used[0] if used else 0):  # leading ':' entries keep their place
            ctx.unify(src[i], out[i], node)
            passed += 1
    for k in range(1, tail + 1):  # trailing unindexed dims stay last
        ctx.unify(src[-k], out[-k], node)
    for i in used:
        ctx.freeze(src[i], "advanced indexing reads positions chosen by data", node)
    for j in range(passed, len(out) - tail):
        ctx.freeze(out[j], "advanced indexing creates these dims", node)


@R.register(aten.gather)
def gather(ctx: RuleContext, node: fx.Node) -> None:
    """out[..i..] = x[..index[..i..]..] along ``dim``; every other position is read where it is written."""
    x = ctx.dims(node.args[0])
    couple_gather_elements(ctx, node, x, ctx.dims(node.args[2]), ctx.out(node), _nd(node.args[1], len(x)))


@R.register(aten.diff)
def diff(ctx: RuleContext, node: fx.Node) -> None:
    """Differences of neighbours along ``dim``: positions along it mix, the other dims map through."""
    x, out = ctx.dims(node.args[0]), ctx.out(node)
    dim = _nd(arg(node, 2, "dim", -1)[0], len(x))
    ctx.freeze(x[dim], "diff mixes neighbouring positions", node)
    ctx.freeze(out[dim], "diff mixes neighbouring positions", node)
    extras = [ctx.dims(arg(node, 3, "prepend")[0]), ctx.dims(arg(node, 4, "append")[0])]
    for i in range(len(x)):
        if i != dim:
            ctx.unify(x[i], out[i], node)
            for e in extras:
                if e is not None and ctx.solver.size(e[i]) == ctx.solver.size(out[i]) != 1:
                    ctx.unify(e[i], out[i], node)
    for e in extras:
        if e is not None:
            ctx.freeze(e[dim], "diff mixes neighbouring positions", node)


@R.register(aten.embedding)
def embedding(ctx: RuleContext, node: fx.Node) -> None:
    weight, ids, out = ctx.dims(node.args[0]), ctx.dims(node.args[1]), ctx.out(node)
    ctx.freeze(weight[0], "embedding rows are selected by token ids", node)
    ctx.unify(weight[1], out[-1], node)
    ctx.unify_all(ids, out[:-1], node)


# --------------------------------------------------------------- matmuls
@R.register(aten.linear)
def linear(ctx: RuleContext, node: fx.Node) -> None:
    x, w, out = ctx.dims(node.args[0]), ctx.dims(node.args[1]), ctx.out(node)
    bias = ctx.dims(arg(node, 2, "bias")[0])
    ctx.unify(x[-1], w[-1], node)
    if len(w) == 2:
        ctx.unify(w[0], out[-1], node)
        if bias is not None:
            ctx.unify(bias[0], w[0], node)
        ctx.unify_all(x[:-1], out[:-1], node)
    else:
        ctx.unify_all(x[:-1], out, node)


_VIEWS = (
    aten.t,
    aten.numpy_T,
    aten.mT,
    aten.transpose,
    aten.permute,
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.alias,
    aten.to,
    aten._to_copy,
    aten.contiguous,
    aten.clone,
    aten.unsqueeze,
    aten.expand,
    aten.detach,
)


def _is_activation(ctx: AtenRuleContext, x) -> bool:
    """True unless ``x`` is a parameter, possibly seen through views (``x @ self.weight.T``)."""
    while (
        isinstance(x, fx.Node)
        and x.op == "call_function"
        and isinstance(x.target, torch._ops.OpOverload)
        and x.target.overloadpacket in _VIEWS
    ):
        x = x.args[0]
    return isinstance(x, fx.Node) and x not in ctx.parameter_nodes


@R.register(aten.matmul, aten.mm, aten.bmm)
def matmul(ctx: RuleContext, node: fx.Node) -> None:
    matmul_dims(
        ctx,
        node,
        ctx.dims(node.args[0]),
        ctx.dims(node.args[1]),
        ctx.out(node),
        _is_activation(ctx, node.args[0]) and _is_activation(ctx, node.args[1]),
    )


@R.register(aten.addmm, aten.baddbmm, aten.addbmm)
def addmm(ctx: RuleContext, node: fx.Node) -> None:
    out = ctx.out(node)
    if node.target.overloadpacket is aten.addbmm:
        ctx.freeze_node(node, "addbmm sums over the batch of products")
        return
    matmul_dims(
        ctx,
        node,
        ctx.dims(node.args[1]),
        ctx.dims(node.args[2]),
        out,
        _is_activation(ctx, node.args[1]) and _is_activation(ctx, node.args[2]),
    )
    broadcast(ctx, node, [ctx.dims(node.args[0])], out)


@R.register(aten.einsum)
def einsum(ctx: RuleContext, node: fx.Node) -> None:
    couple_einsum(ctx, node, node.args[0], [ctx.dims(x) for x in node.args[1]], ctx.out(node))


# ------------------------------------------------------------------ conv
def _conv(ctx: RuleContext, node: fx.Node, transposed: bool, groups: int, groups_path) -> None:
    bias = ctx.dims(node.args[2]) if len(node.args) > 2 else None
    couple_conv(
        ctx, node, ctx.dims(node.args[0]), ctx.dims(node.args[1]), bias, ctx.out(node), transposed, groups, groups_path
    )


@R.register(aten.conv1d, aten.conv2d, aten.conv3d)
def conv(ctx: RuleContext, node: fx.Node) -> None:
    groups, path = arg(node, 6, "groups", 1)
    _conv(ctx, node, False, groups, path)


@R.register(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
def conv_transpose(ctx: RuleContext, node: fx.Node) -> None:
    groups, path = arg(node, 6, "groups", 1)
    _conv(ctx, node, True, groups, path)


@R.register(aten.convolution, aten._convolution)
def convolution(ctx: RuleContext, node: fx.Node) -> None:
    groups, path = arg(node, 8, "groups", 1)
    _conv(ctx, node, bool(node.args[6]), groups, path)


# ----------------------------------------------------------------- norms
def _per_channel(ctx: RuleContext, node: fx.Node, x: list[int], vectors: list) -> None:
    for v in vectors:
        d = ctx.dims(v)
        if d is not None:
            ctx.unify(d[0], x[1], node)


@R.register(aten.batch_norm, aten.instance_norm)
def batch_norm(ctx: RuleContext, node: fx.Node) -> None:
    x = ctx.dims(node.args[0])
    ctx.unify_all(x, ctx.out(node), node)
    _per_channel(ctx, node, x, node.args[1:5])


@R.register(
    aten._native_batch_norm_legit_no_training,
    aten._native_batch_norm_legit,
    aten.native_batch_norm,
    aten._native_batch_norm_legit_functional,
)
def native_batch_norm(ctx: RuleContext, node: fx.Node) -> None:
    x = ctx.dims(node.args[0])
    ctx.unify_all(x, ctx.out(node, 0), node)
    _per_channel(ctx, node, x, node.args[1:5])
    for extra in ctx.raw(node)[1:]:
        for a in extra:
            if ctx.solver.size(a) == ctx.solver.size(x[1]):
                ctx.unify(a, x[1], node)


def _last_dims_norm(ctx: RuleContext, node: fx.Node, out: list[int], weight_args: list) -> None:
    x = ctx.dims(node.args[0])
    shape = list(node.args[1])
    ctx.unify_all(x, out, node)
    k = len(shape)
    for v in weight_args:
        d = ctx.dims(v)
        if d is not None:
            ctx.unify_all(d, x[-k:], node)
    for i in range(k):
        ctx.solver.mark_inexact(x[-k + i], f"normalized by {node.target} ({node.name})")
        ctx.constant(node, ("args", 1, i), [x[-k + i]])


@R.register(aten.layer_norm)
def layer_norm(ctx: RuleContext, node: fx.Node) -> None:
    _last_dims_norm(ctx, node, ctx.out(node), [arg(node, 2, "weight")[0], arg(node, 3, "bias")[0]])


@R.register(aten.native_layer_norm)
def native_layer_norm(ctx: RuleContext, node: fx.Node) -> None:
    _last_dims_norm(ctx, node, ctx.out(node, 0), [node.args[2], node.args[3]])


@R.register(aten.rms_norm)
def rms_norm(ctx: RuleContext, node: fx.Node) -> None:
    _last_dims_norm(ctx, node, ctx.out(node), [arg(node, 2, "weight")[0]])


def _group_norm(ctx: RuleContext, node: fx.Node, out: list[int], groups: int, groups_path, weights) -> None:
    s = ctx.solver
    x = ctx.dims(node.args[0])
    ctx.unify_all(x, out, node)
    for v in weights:
        d = ctx.dims(v)
        if d is not None:
            ctx.unify(d[0], x[1], node)
    g, per = s.factors(x[1], [groups, s.size(x[1]) // groups], node.name)
    s.mark_inexact(per, f"normalized within groups by {node.target} ({node.name})")
    for a in x[2:]:
        s.mark_inexact(a, f"normalized by {node.target} ({node.name})")
    ctx.constant(node, groups_path, [g])


@R.register(aten.group_norm)
def group_norm(ctx: RuleContext, node: fx.Node) -> None:
    groups, path = arg(node, 1, "num_groups")
    _group_norm(ctx, node, ctx.out(node), groups, path, [arg(node, 2, "weight")[0], arg(node, 3, "bias")[0]])


@R.register(aten.native_group_norm)
def native_group_norm(ctx: RuleContext, node: fx.Node) -> None:
    _group_norm(ctx, node, ctx.out(node, 0), node.args[6], ("args", 6), [node.args[1], node.args[2]])
    ctx.constant(node, ("args", 4), [ctx.dims(node.args[0])[1]])


# ------------------------------------------------------------ reductions
def _reduce(
    ctx: RuleContext,
    node: fx.Node,
    dims,
    keepdim: bool,
    exact_sum: bool = False,
    outputs: list[list[int]] | None = None,
) -> None:
    x = ctx.dims(node.args[0])
    rank = len(x)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        reduced = set(range(rank))
    elif isinstance(dims, int):
        reduced = {_nd(dims, rank)}
    else:
        reduced = {_nd(d, rank) for d in dims}
    couple_reduction(ctx, node, x, outputs if outputs is not None else [ctx.out(node)], reduced, keepdim)


@R.register(
    aten.mean.dim,
    aten.sum.dim_IntList,
    aten.amax,
    aten.amin,
    aten.logsumexp,
    aten.nansum,
    aten.prod.dim_int,
    aten.any.dim,
    aten.all.dim,
    aten.any.dims,
)
def reduce_dims(ctx: RuleContext, node: fx.Node) -> None:
    _reduce(ctx, node, arg(node, 1, "dim")[0], bool(arg(node, 2, "keepdim", False)[0]))


@R.register(
    aten.mean.default,
    aten.sum.default,
    aten.max.default,
    aten.min.default,
    aten.prod.default,
    aten.any.default,
    aten.all.default,
)
def reduce_all(ctx: RuleContext, node: fx.Node) -> None:
    _reduce(ctx, node, None, False)


@R.register(aten.var.correction, aten.std.correction, aten.var.dim, aten.std.dim)
def var(ctx: RuleContext, node: fx.Node) -> None:
    _reduce(
        ctx,
        node,
        arg(node, 1, "dim")[0],
        bool(node.kwargs.get("keepdim", False) or (len(node.args) > 3 and node.args[3])),
    )


@R.register(aten.var_mean.correction, aten.std_mean.correction)
def var_mean(ctx: RuleContext, node: fx.Node) -> None:
    _reduce(ctx, node, arg(node, 1, "dim")[0], bool(node.kwargs.get("keepdim", False)), outputs=ctx.raw(node))


@R.register(aten.max.dim, aten.min.dim)
def max_dim(ctx: RuleContext, node: fx.Node) -> None:
    x = ctx.dims(node.args[0])
    dim = _nd(node.args[1], len(x))
    ctx.freeze(x[dim], f"{node.target} returns positions along this dim", node)
    _reduce(ctx, node, dim, bool(arg(node, 2, "keepdim", False)[0]), outputs=ctx.raw(node))


@R.register(aten.topk, aten.sort)
def topk(ctx: RuleContext, node: fx.Node) -> None:
    """Values and positions chosen along ``dim``: that dim is data-ordered, the others map through."""
    x = ctx.dims(node.args[0])
    packet = node.target.overloadpacket
    dim = _nd(arg(node, 2, "dim", -1)[0] if packet is aten.topk else arg(node, 1, "dim", -1)[0], len(x))
    for out in ctx.raw(node):
        for i, (a, b) in enumerate(zip(x, out)):
            if i == dim:
                ctx.freeze(a, f"{node.target} orders positions along this dim by value", node)
                ctx.freeze(b, f"{node.target} orders positions along this dim by value", node)
            else:
                ctx.unify(a, b, node)


@R.register(
    aten.histc,
    aten.bincount,
    aten.index_put,
    aten.index_put_,
    aten.scatter,
    aten.scatter_add,
    aten.scatter_reduce,
    aten.index_add,
    aten.index_copy,
)
def data_placed(ctx: RuleContext, node: fx.Node) -> None:
    """Results placed at positions computed from data: every dim involved is frozen."""
    ctx.freeze_node(node, f"{node.target} places values at positions chosen by data")


@R.register(aten._weight_norm)
def weight_norm(ctx: RuleContext, node: fx.Node) -> None:
    """w = g * v / ||v||, the norm taken over every dim but ``dim``: v's shape passes through, and
    channels of the normalised dims are inexact (removing one changes the norm)."""
    v, g, out = ctx.dims(node.args[0]), ctx.dims(node.args[1]), ctx.out(node)
    dim = _nd(arg(node, 2, "dim", 0)[0], len(v))
    ctx.unify_all(v, out, node)
    broadcast(ctx, node, [g], out)
    for i, a in enumerate(v):
        if i != dim:
            ctx.solver.mark_inexact(a, f"normalized by {node.target} ({node.name})")


@R.register(aten.argmax, aten.argmin)
def argmax(ctx: RuleContext, node: fx.Node) -> None:
    dim = arg(node, 1, "dim")[0]
    x = ctx.dims(node.args[0])
    if dim is None:
        ctx.freeze_node(node, f"{node.target} over all dims returns flat positions")
        return
    ctx.freeze(x[_nd(dim, len(x))], f"{node.target} returns positions along this dim", node)
    _reduce(ctx, node, dim, bool(arg(node, 2, "keepdim", False)[0]))


@R.register(aten.linalg_vector_norm, aten.norm.ScalarOpt_dim, aten.norm.ScalarOpt_dim_dtype)
def vector_norm(ctx: RuleContext, node: fx.Node) -> None:
    _reduce(ctx, node, arg(node, 2, "dim")[0], bool(arg(node, 3, "keepdim", False)[0]))


@R.register(
    aten.softmax.int,
    aten._softmax,
    aten.log_softmax.int,
    aten._log_softmax,
    aten.cumsum,
    aten.cumprod,
    aten._safe_softmax,
)
def along_dim(ctx: RuleContext, node: fx.Node) -> None:
    x = ctx.dims(node.args[0])
    ctx.unify_all(x, ctx.out(node), node)
    ctx.solver.mark_inexact(x[_nd(node.args[1], len(x))], f"normalized along by {node.target} ({node.name})")


# ------------------------------------------------------------- attention
@R.register(aten.scaled_dot_product_attention)
def sdpa(ctx: RuleContext, node: fx.Node) -> None:
    couple_attention(
        ctx,
        node,
        ctx.dims(node.args[0]),
        ctx.dims(node.args[1]),
        ctx.dims(node.args[2]),
        ctx.out(node),
        ctx.dims(arg(node, 3, "attn_mask")[0]),
        bool(arg(node, 7, "enable_gqa", False)[0]),
        arg(node, 6, "scale")[0] is not None,
    )


# ---------------------------------------------------- spatial operators
def _spatial(
    ctx: RuleContext,
    node: fx.Node,
    n_spatial: int,
    out: list[int] | None = None,
    why: str = "positions are mixed by the op",
) -> None:
    """Pooling and resampling: leading (batch, channel) dims map through; the spatial dims of
    input and output are frozen, since the op combines neighbouring positions."""
    x = ctx.dims(node.args[0])
    out = ctx.out(node) if out is None else out
    lead = len(x) - n_spatial
    ctx.unify_all(x[:lead], out[:lead], node)
    for a in x[lead:] + out[lead:]:
        ctx.freeze(a, why, node)


def _pool(n: int):
    def rule(ctx: RuleContext, node: fx.Node) -> None:
        outs = ctx.raw(node)
        if outs and not isinstance(outs[0], int):
            for o in outs:
                _spatial(ctx, node, n, o)
        else:
            _spatial(ctx, node, n)

    return rule


for _n, _ops in {
    1: [
        aten.max_pool1d,
        aten.avg_pool1d,
        aten.adaptive_avg_pool1d,
        aten.adaptive_max_pool1d,
        aten.max_pool1d_with_indices,
        aten.upsample_nearest1d,
        aten.upsample_linear1d,
        aten._upsample_nearest_exact1d,
    ],
    2: [
        aten.max_pool2d,
        aten.avg_pool2d,
        aten.adaptive_avg_pool2d,
        aten.adaptive_max_pool2d,
        aten.max_pool2d_with_indices,
        aten._adaptive_avg_pool2d,
        aten.upsample_nearest2d,
        aten.upsample_bilinear2d,
        aten.upsample_bicubic2d,
        aten._upsample_nearest_exact2d,
        aten._upsample_bilinear2d_aa,
    ],
    3: [
        aten.max_pool3d,
        aten.avg_pool3d,
        aten.adaptive_avg_pool3d,
        aten.adaptive_max_pool3d,
        aten.max_pool3d_with_indices,
        aten.upsample_nearest3d,
        aten.upsample_trilinear3d,
        aten._upsample_nearest_exact3d,
    ],
}.items():
    R.register(*_ops)(_pool(_n))


@R.register(
    aten.pad,
    aten.constant_pad_nd,
    aten.reflection_pad1d,
    aten.reflection_pad2d,
    aten.reflection_pad3d,
    aten.replication_pad1d,
    aten.replication_pad2d,
    aten.replication_pad3d,
)
def pad(ctx: RuleContext, node: fx.Node) -> None:
    x, out = ctx.dims(node.args[0]), ctx.out(node)
    pads = list(node.args[1])
    padded = {len(x) - 1 - i for i in range(len(pads) // 2) if pads[2 * i] or pads[2 * i + 1]}
    couple_except(ctx, node, x, out, padded, "padded dim")


@R.register(aten.roll, aten.flip)
def roll(ctx: RuleContext, node: fx.Node) -> None:
    x, out = ctx.dims(node.args[0]), ctx.out(node)
    dims = node.args[2] if node.target.overloadpacket is aten.roll else node.args[1]
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        ctx.freeze_node(node, "roll over the flattened tensor")
        return
    couple_except(ctx, node, x, out, {_nd(d, len(x)) for d in dims}, f"{node.target} moves positions along this dim")


@R.register(aten.pixel_shuffle, aten.pixel_unshuffle)
def pixel_shuffle(ctx: RuleContext, node: fx.Node) -> None:
    s = ctx.solver
    x, out = ctx.dims(node.args[0]), ctx.out(node)
    r = node.args[1]
    shuffle = node.target.overloadpacket is aten.pixel_shuffle
    wide, narrow_ = (x, out) if shuffle else (out, x)
    c, r1, r2 = s.factors(wide[-3], [s.size(narrow_[-3]), r, r], node.name)
    ctx.unify(c, narrow_[-3], node)
    ctx.unify_all(x[:-3], out[:-3], node)
    for a in (r1, r2, *out[-2:]):
        ctx.freeze(a, "pixel shuffle moves channels into space", node)


@R.register(aten.channel_shuffle, aten.native_channel_shuffle)
def channel_shuffle(ctx: RuleContext, node: fx.Node) -> None:
    s = ctx.solver
    x, out = ctx.dims(node.args[0]), ctx.out(node)
    g = node.args[1]
    grp, per = s.factors(x[1], [g, s.size(x[1]) // g], node.name)
    ctx.unify(s.product([per, grp]), out[1], node)
    for i in range(len(x)):
        if i != 1:
            ctx.unify(x[i], out[i], node)
    ctx.constant(node, ("args", 1), [grp])


# ------------------------------------------------------------ factories
@R.register(aten.zeros, aten.ones, aten.empty.memory_format, aten.full)
def factory(ctx: RuleContext, node: fx.Node) -> None:
    """Every position holds the same value: the created dims are tied to the sizes that make them."""
    _size_constants(ctx, node, 0, list(node.args[0]), ctx.out(node))


@R.register(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full)
def new_factory(ctx: RuleContext, node: fx.Node) -> None:
    _size_constants(ctx, node, 1, list(node.args[1]), ctx.out(node))


@R.register(
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    aten.rand,
    aten.randn,
    aten.randint.default,
    aten.randint.low,
    aten.linspace.default,
    aten.logspace.default,
    aten.eye.default,
    aten.eye.m,
)
def positional_factory(ctx: RuleContext, node: fx.Node) -> None:
    """Values that depend on the position (a range, random draws): at a smaller size the forward
    would regenerate them for positions 0..n-1 instead of keeping the kept positions, so the
    created dims are frozen."""
    for a in ctx.out(node):
        ctx.freeze(
            a,
            f"{ctx.op_name(node)} makes values that depend on the position; at a smaller size they would "
            "be regenerated, not sliced",
            node,
        )


@R.register(aten.scalar_tensor)
def scalar_tensor(ctx: RuleContext, node: fx.Node) -> None:
    """A 0-d constant: no dims."""
