"""Couplings that ATen and ONNX rules share: broadcasting, reshapes, matmuls, convolutions, attention.

Each takes the rule context and the dims (atoms) of the values involved, never a graph node's
own type, so the torch and ONNX rule tables call the same function for the same algebra.
"""

from __future__ import annotations

from typing import Any

from graphprune.rules.registry import RuleContext


def broadcast(ctx: RuleContext, node: Any, inputs: list[list[int]], out: list[int]) -> None:
    """Right-aligned broadcasting: equal-sized, non-1 dims are the same channels."""
    s = ctx.solver
    for dims in inputs:
        for i in range(1, min(len(dims), len(out)) + 1):
            a, b = dims[-i], out[-i]
            if s.size(a) == s.size(b) and s.size(a) != 1:
                ctx.unify(a, b, node)


def couple_reshape(ctx: RuleContext, node: Any, src: list[int], dst: list[int]) -> None:
    s = ctx.solver
    src_sizes = [s.size(a) for a in src]
    dst_sizes = [s.size(a) for a in dst]
    if 0 in src_sizes or 0 in dst_sizes:
        ctx.freeze_node(node, "reshape of an empty tensor")
        return
    for gi, gj in reshape_groups(src_sizes, dst_sizes):
        whole = s.product([src[i] for i in gi])
        for atom, out in zip(s.factors(whole, [dst_sizes[j] for j in gj], node.name), (dst[j] for j in gj)):
            ctx.unify(atom, out, node)


def couple_gather_elements(ctx: RuleContext, node, x: list[int], index: list[int], out: list[int], dim: int) -> None:
    """torch.gather / ONNX GatherElements: ``dim`` is data-ordered; the output has the index's shape."""
    ctx.freeze(x[dim], f"{ctx.op_name(node)} reads positions chosen by data", node)
    ctx.freeze(out[dim], f"{ctx.op_name(node)} reads positions chosen by data", node)
    ctx.unify_all(index, out, node)
    for i in range(len(x)):
        if i != dim and ctx.solver.size(x[i]) == ctx.solver.size(out[i]):
            ctx.unify(x[i], out[i], node)


def matmul_dims(ctx: RuleContext, node: Any, a: list[int], b: list[int], out: list[int], attention: bool) -> None:
    """torch.matmul (= numpy, ONNX MatMul) semantics, including 1-D operands and broadcast batch
    dims; ``attention``: both operands are activations, so the product is attention-like (its
    reduced dim is a head dim and its other dims index heads)."""
    s = ctx.solver
    a_vec, b_vec = len(a) == 1, len(b) == 1
    k_a = a[-1]
    k_b = b[0] if b_vec else b[-2]
    ctx.unify(k_a, k_b, node)
    o = list(out)
    if not b_vec:
        ctx.unify(b[-1], o.pop(), node)
    if not a_vec:
        ctx.unify(a[-2], o.pop(), node)
    batch_a = a[:-2] if not a_vec else []
    batch_b = b[:-2] if not b_vec else []
    broadcast(ctx, node, [batch_a, batch_b], o)
    if attention:  # q @ k^T reduces over the head dim; probs @ v keeps v's head dim last
        s.tag(k_a, "head_dim")
        if not b_vec:
            s.tag(b[-1], "head_dim")
        for d in o:
            s.tag(d, "heads")


def couple_einsum(ctx: RuleContext, node, equation: str, operands: list[list[int]], out: list[int]) -> None:
    """Dims named by the same letter are the same channels (size-1 dims broadcast)."""
    equation = equation.replace(" ", "")
    if "..." in equation or "->" not in equation:
        ctx.freeze_node(node, "einsum with ellipsis or implicit output")
        return
    lhs, rhs = equation.split("->")
    letters: dict[str, int] = {}
    for spec, dims in list(zip(lhs.split(","), operands)) + [(rhs, out)]:
        for ch, atom in zip(spec, dims):
            if ctx.solver.size(atom) == 1:
                continue
            if ch in letters:
                ctx.unify(letters[ch], atom, node)
            else:
                letters[ch] = atom


def couple_conv(
    ctx: RuleContext,
    node,
    x: list[int],
    w: list[int],
    bias: list[int] | None,
    out: list[int],
    transposed: bool,
    groups: int,
    groups_path,
) -> None:
    """Convolution (``transposed``: weight is [in, out/groups, k...]): channels couple through the
    weight and, for grouped convs, per group; spatial dims and the kernel window are frozen."""
    s = ctx.solver
    spatial = len(w) - 2
    batched = len(x) == spatial + 2
    cx, co = (x[1], out[1]) if batched else (x[0], out[0])
    if batched:
        ctx.unify(x[0], out[0], node)
    for a in (out[-spatial:] + x[-spatial:]) if spatial else []:
        ctx.freeze(a, "the convolution window mixes these positions", node)
    for a in w[2:]:
        ctx.freeze(a, "convolution kernel window", node)
    w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
    if bias is not None:
        ctx.unify(bias[0], co, node)
    if groups == 1:
        ctx.unify(cx, w_in, node)
        ctx.unify(co, w_out, node)
        return
    g_in, per_in = s.factors(cx, [groups, s.size(cx) // groups], node.name)
    g_out, per_out = s.factors(co, [groups, s.size(co) // groups], node.name)
    ctx.unify(g_in, g_out, node)
    if transposed:
        ctx.unify(w_in, cx, node)  # weight rows follow the input channels
        ctx.unify(w_out, per_out, node)
    else:
        ctx.unify(w_out, co, node)  # weight rows follow the output channels
        ctx.unify(w_in, per_in, node)
    ctx.constant(node, groups_path, [g_in])


def couple_reduction(
    ctx: RuleContext, node, x: list[int], outputs: list[list[int]], reduced: set[int], keepdim: bool
) -> None:
    """The dims of ``x`` not in ``reduced`` map through to every output (kept as size 1 or dropped);
    the reduced ones are inexact: removing a channel, even a zero one, changes a mean or a max."""
    for d in reduced:
        ctx.solver.mark_inexact(x[d], f"reduced by {ctx.op_name(node)} ({node.name})")
    kept = [a for i, a in enumerate(x) if i not in reduced]
    for out in outputs:
        ctx.unify_all(kept, [a for i, a in enumerate(out) if i not in reduced] if keepdim else out, node)


def couple_attention(
    ctx: RuleContext,
    node,
    q: list[int],
    k: list[int],
    v: list[int],
    out: list[int],
    mask: list[int] | None,
    gqa: bool,
    scale_given: bool,
) -> None:
    """softmax(q k^T * scale + mask) v on ``[..., heads, seq, head_dim]`` dims; with ``gqa`` each kv
    head serves a block of query heads.  Without an explicit scale the default 1/sqrt(head_dim) ties
    the head dim to its size: frozen."""
    s = ctx.solver
    ctx.unify(q[-1], k[-1], node)
    ctx.unify(v[-1], out[-1], node)
    ctx.unify(q[-2], out[-2], node)
    ctx.unify(k[-2], v[-2], node)
    ctx.unify_all(q[:-2], out[:-2], node)
    if gqa and len(q) >= 3 and s.size(q[-3]) != s.size(k[-3]):
        hk = s.size(k[-3])
        kv, _rep = s.factors(q[-3], [hk, s.size(q[-3]) // hk], node.name)
        ctx.unify(kv, k[-3], node)
        broadcast(ctx, node, [k[:-3], v[:-3]], q[:-3])
        ctx.unify(k[-3], v[-3], node)
    else:
        broadcast(ctx, node, [k[:-2], v[:-2]], q[:-2])
    if mask is not None:
        scores = [*q[:-1], k[-2]]
        broadcast(ctx, node, [mask], scores)
    s.tag(q[-1], "head_dim")
    s.tag(v[-1], "head_dim")
    if len(q) >= 3:
        s.tag(q[-3], "heads")
    s.mark_inexact(k[-2], f"softmax over keys ({node.name})")
    if not scale_given:
        ctx.freeze(q[-1], f"{ctx.op_name(node)} without an explicit scale uses 1/sqrt(head_dim)", node)


def couple_except(ctx: RuleContext, node, x: list[int], out: list[int], moved: set[int], why: str) -> None:
    """Dims of ``x`` map to the same dims of ``out``, except those in ``moved`` (padded, rolled,
    reordered by value), which are frozen on both sides."""
    for i, (a, b) in enumerate(zip(x, out)):
        if i in moved:
            ctx.freeze(a, why, node)
            ctx.freeze(b, why, node)
        else:
            ctx.unify(a, b, node)


# ----------------------------------------------------------------- shapes
def reshape_groups(src: list[int], dst: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of source and destination dims with equal products (size-1 dims skipped)."""
    si = [i for i, s in enumerate(src) if s != 1]
    di = [i for i, s in enumerate(dst) if s != 1]
    groups = []
    i = j = 0
    while i < len(si) and j < len(di):
        gi, gj = [si[i]], [di[j]]
        pa, pb = src[si[i]], dst[di[j]]
        while pa != pb:
            if pa < pb:
                i += 1
                gi.append(si[i])
                pa *= src[si[i]]
            else:
                j += 1
                gj.append(di[j])
                pb *= dst[di[j]]
        groups.append((gi, gj))
        i += 1
        j += 1
    return groups
