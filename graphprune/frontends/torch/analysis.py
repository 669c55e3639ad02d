"""Analysis of a torch model: run the ATen rules over its captured graph, then collect the groups.

Code-computed sizes (:mod:`graphprune.frontends.torch.provenance`) and modules that hold sizes
(:mod:`graphprune.rules.modules`) add their constraints before the spaces are solved; the
groups themselves are :mod:`graphprune.core.groups`'s.
"""

from __future__ import annotations

import operator
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from graphprune.core.algebra import FreezeReason, Spaces, SpaceSolver
from graphprune.core.groups import Analysis, collect_groups
from graphprune.errors import InputError
from graphprune.frontends.torch.capture import CapturedGraph, ExampleInputs, capture
from graphprune.frontends.torch.macs import planned_macs, planned_params
from graphprune.frontends.torch.provenance import AnySource, ShapeSource, factor_source, uses_for
from graphprune.rules.aten import AtenRuleContext, aten_rules
from graphprune.rules.registry import flat_atoms

aten = torch.ops.aten

BODY_HOPS = (torch.ops.higher_order.wrap_with_set_grad_enabled, torch.ops.higher_order.wrap_with_autocast)


class TorchAnalysis(Analysis[CapturedGraph, AtenRuleContext]):
    """:class:`~graphprune.core.groups.Analysis` of a torch model (``captured`` is a CapturedGraph)."""

    def node_count(self) -> int:
        return sum(len(gm.graph.nodes) for gm in _graph_modules(self.captured.graph_module))

    def planned_macs(self, masks: dict[int, torch.Tensor]) -> int:
        return planned_macs(self, masks)

    def planned_params(self, masks: dict[int, torch.Tensor], model: nn.Module | None = None) -> int:
        return planned_params(self, masks, model)


def _graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    out = [gm]
    for child in gm.children():
        if isinstance(child, fx.GraphModule):
            out.extend(_graph_modules(child))
    return out


def analyze(model: nn.Module, example_inputs: ExampleInputs, *, prunable_outputs: Sequence[str] = ()) -> Analysis:
    """Capture ``model`` and find its coupled channel groups.  Works on ``meta``-device models.

    Spaces that reach the model's outputs are frozen, so the pruned model returns the same shapes;
    name outputs in ``prunable_outputs`` (``"last_hidden_state"``, ``"0"``, ``"extra.1"``) to let
    their channel dims shrink too.
    """
    start = time.perf_counter()
    captured = capture(model, example_inputs)
    return analyze_captured(captured, type(model).__name__, start, prunable_outputs)


def analyze_captured(
    captured: CapturedGraph, model_name: str, start: float | None = None, prunable_outputs: Sequence[str] = ()
) -> Analysis:
    start = time.perf_counter() if start is None else start
    unknown = set(prunable_outputs) - set(captured.output_names.values())
    if unknown:
        raise InputError(
            f"prunable_outputs names {sorted(unknown)}, but the model's outputs are "
            f"{sorted(captured.output_names.values())}"
        )
    solver = SpaceSolver()
    ctx = AtenRuleContext(solver)
    ctx.parameter_nodes = {n for n in captured.graph.nodes if n.op == "placeholder" and n.name in captured.tensor_names}
    run_graph(ctx, captured.graph_module, None)
    placeholders = {n.name: n for n in captured.graph.nodes if n.op == "placeholder"}
    for names in captured.tied:  # one tensor object lifted under several names
        first = ctx.dims(placeholders[names[0]])
        for other in names[1:]:
            ctx.unify_all(first, ctx.dims(placeholders[other]), placeholders[other])
    for node in ctx.parameter_nodes:
        kind, name = captured.tensor_names[node.name]
        if kind == "code_constant":
            for atom in ctx.dims(node) or []:
                solver.freeze(atom, FreezeReason("a tensor constant built inside forward cannot be resized", name))
    _couple_code_sizes(ctx, captured)
    _constrain_modules(ctx, captured)
    for node in captured.user_inputs:
        for atom in flat_atoms(ctx.raw(node)):
            solver.freeze(atom, FreezeReason("reaches a model input", node.name, interface=True))
    for node in captured.outputs:
        if captured.output_names.get(node) in prunable_outputs:
            continue
        for atom in flat_atoms(ctx.raw(node)):
            solver.freeze(
                atom,
                FreezeReason(
                    f"reaches the model output {captured.output_names.get(node, node.name)!r}",
                    node.name,
                    interface=True,
                ),
            )
    spaces = solver.finalize()

    tensors: dict[str, tuple[str, list[int]]] = {}
    for node in captured.graph.nodes:
        if node.op == "placeholder" and node.name in captured.tensor_names:
            kind, name = captured.tensor_names[node.name]
            tensors[name] = (kind, ctx.dims(node) or [])
    carried = _leaves_of_activations(ctx, captured, spaces)
    groups, frozen = collect_groups(spaces, tensors, carried)
    return TorchAnalysis(
        model_name=model_name,
        captured=captured,
        context=ctx,
        spaces=spaces,
        groups=groups,
        frozen=frozen,
        tensors=tensors,
        seconds=time.perf_counter() - start,
    )


def _couple_code_sizes(ctx: AtenRuleContext, captured: CapturedGraph) -> None:
    """Apply what provenance says about sizes written in, or read by, the model's code.

    * One attribute that sizes several tensors (``self.head_dim`` for q, k and v) can take only
      one new value, so every space it sizes must keep the same count: couple them.
    * A size read from a tensor and used unchanged (``B, N, C = x.shape`` ... ``reshape(B, N, C)``)
      keeps the count of the dim it was read from: couple the two.
    * A size computed as a product or exact quotient of attributes, shape reads and ints is the
      product (quotient) of the spaces they size (``C // self.num_heads``: the space ``C`` was read
      from is the heads space times the space the quotient sizes; attributes that size nothing
      directly keep their value).
    * Any other size computed from attributes cannot be rewritten: freeze its channels.  One
      computed from shape reads alone needs no rewrite; where graphprune cannot state its
      constraint, and for slice bounds (``x[..., : x.shape[-1] // 2]``, whose parts already relate
      it to the dim it cuts), it is left to verification.
    * An attribute or read dim whose value also feeds a computed number (a scale), or a size
      that cannot be rewritten, must not change: freeze every space it sizes.
    """
    solver = ctx.solver
    reads = _ShapeReads(ctx, captured)
    direct: dict[AnySource, list[int]] = defaultdict(list)
    computed = []
    for c in ctx.constants:
        for use in uses_for(captured.attribute_uses, c.node, c.path):
            if use.direct and len(c.atoms) == 1 and not c.base:
                direct[use.attribute].append(c.atoms[0])
            elif not use.direct:
                computed.append((c, use))
    for source, atoms in direct.items():
        read = reads.atom(source)
        if read is not None:
            atoms = [read, *atoms]
        for other in atoms[1:]:
            solver.unify(atoms[0], other, where=f"{source} sizes both")
    fixed: set[AnySource] = set()
    for c, use in computed:
        shape_only = all(isinstance(source, ShapeSource) for source in use.sources)
        if shape_only and getattr(c.node.target, "overloadpacket", None) in (aten.slice, aten.narrow):
            continue  # a slice's parts already relate its bound to the dim it cuts (x[..., : x.shape[-1] // 2])
        sides = (
            _monomial_spaces(use.factors, use.divisors, direct, reads, c.node.name)
            if len(c.atoms) == 1 and not c.base
            else None
        )
        if sides is not None:
            top, bottom = sides
            where = f"{c.node.name}: size computed in forward"
            solver.unify(_one(solver, top), _one(solver, [*bottom, c.atoms[0]]), where=where)
            continue
        if shape_only:
            continue  # it reads the pruned shape by itself: verification checks it still fits
        names = ", ".join(map(str, sorted(use.sources, key=str)))
        for atom in c.atoms:
            solver.freeze(atom, FreezeReason(f"size computed from {names} in forward", c.node.name))
        fixed |= use.sources  # the expression would change with them
    for use in captured.attribute_uses:
        if use.path is None:
            fixed |= _keep_values(use, direct, reads)
    for source in fixed:
        atoms = [reads.atom(source)] if isinstance(source, ShapeSource) else direct.get(source, [])
        for atom in atoms:
            if atom is not None:
                solver.freeze(
                    atom,
                    FreezeReason(
                        f"{source} also enters a computed value (a scale, or a size graphprune cannot rewrite)"
                    ),
                )


def _keep_values(use, direct: dict, reads: _ShapeReads) -> set[AnySource]:
    """Keep the value of a number used for something other than a size (``(C // heads) ** -0.5``
    as a scale): each monomial it depends on becomes a frozen space times its divisors' spaces,
    so the channels of ``C`` may go by whole heads but the head size stays.  Returns the sources
    that must keep their values outright (a number that is no function of monomials)."""
    solver = reads.ctx.solver
    if not use.invariants:
        return set(use.sources)
    whole: set[AnySource] = set()
    for monomial in use.invariants:
        sides = _monomial_spaces(monomial.factors, monomial.divisors, direct, reads, "a computed value")
        if sides is None:
            whole |= monomial.sources
            continue
        top, bottom = sides
        kept = solver.new(int(monomial))
        names = ", ".join(map(str, sorted(monomial.sources, key=str)))
        solver.freeze(
            kept,
            FreezeReason(
                f"a value computed from {names} enters more than a size (a scale, say), so it must keep its value"
            ),
        )
        solver.unify(_one(solver, top), _one(solver, [*bottom, kept]), where=f"{names} keeps its value")
    return whole


class _ShapeReads:
    """The dim atom each recorded shape read came from."""

    def __init__(self, ctx: AtenRuleContext, captured: CapturedGraph) -> None:
        self.ctx = ctx
        self.nodes = {n.name: n for n in captured.graph.nodes}

    def atom(self, source: AnySource) -> int | None:
        if not isinstance(source, ShapeSource) or source.node not in self.nodes:
            return None
        dims = self.ctx.dims(self.nodes[source.node])
        return dims[source.dim] if isinstance(dims, list) and source.dim < len(dims) else None


def _one(solver: SpaceSolver, atoms: list[int]) -> int:
    return atoms[0] if len(atoms) == 1 else solver.product(atoms)


def _monomial_spaces(
    factors: tuple | None, divisors: tuple, direct: dict, reads: _ShapeReads, where: str
) -> tuple[list[int], list[int]] | None:
    """The spaces above and below the line of a computed size: for each factor, the space its
    attribute sizes directly or its read dim, and a fixed (frozen) space for an attribute that
    sizes nothing directly or a plain int (they keep their values).  None when the size is no
    monomial."""
    if factors is None:
        return None
    solver = reads.ctx.solver

    def space(factor: Any) -> int | None:
        source = factor_source(factor)
        if source is None:
            literal = solver.new(int(factor))
            solver.freeze(
                literal, FreezeReason(f"{int(factor)} is a literal factor of a size computed in forward", where)
            )
            return literal
        if source in direct:
            return direct[source][0]
        if isinstance(source, ShapeSource):
            return reads.atom(source)
        fixed = solver.new(int(factor))
        solver.freeze(fixed, FreezeReason(f"{source} is a fixed factor of a size computed in forward", where))
        return fixed

    top, bottom = [space(f) for f in factors], [space(f) for f in divisors]
    if None in top or None in bottom:
        return None
    return top, bottom


def _constrain_modules(ctx: AtenRuleContext, captured: CapturedGraph) -> None:
    """Size checks that torch.nn modules make in forward, beyond what their ops say.

    ``nn.MultiheadAttention`` requires query width == embed_dim == num_heads * head_dim: the
    input space, the q/k/v space and the output space keep one count, so they are coupled.  With
    separate q/k/v projection weights (kdim/vdim != embed_dim) it is frozen.
    """
    placeholders = {name: node for node in ctx.parameter_nodes for kind, name in [captured.tensor_names[node.name]]}
    for path, cls in captured.module_types.items():
        if not issubclass(cls, nn.MultiheadAttention):
            continue
        prefix = f"{path}." if path else ""
        packed, out = placeholders.get(prefix + "in_proj_weight"), placeholders.get(prefix + "out_proj.weight")
        if packed is None or out is None:
            for name, node in placeholders.items():
                if name.startswith(prefix):
                    for atom in ctx.dims(node) or []:
                        ctx.solver.freeze(
                            atom,
                            FreezeReason(
                                "nn.MultiheadAttention with separate q/k/v projections (kdim/vdim) is not rewritten",
                                path,
                            ),
                        )
            continue
        rows, cols = ctx.dims(packed)
        _, embed = ctx.solver.factors(rows, [3, ctx.solver.size(rows) // 3], path)
        ctx.solver.unify(cols, embed, where=f"{path}: query width == embed_dim")
        ctx.solver.unify(ctx.dims(out)[0], embed, where=f"{path}: output width == embed_dim")


def _leaves_of_activations(ctx: AtenRuleContext, captured: CapturedGraph, spaces: Spaces) -> set[int]:
    """Leaves that appear in the dims of some op's output (not only in parameters)."""
    leaves: set[int] = set()
    seen: set[int] = set()
    for gm in _graph_modules(captured.graph_module):
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            for atom in flat_atoms(ctx.raw(node)):
                root = spaces.solver.find(atom)
                if root not in seen:
                    seen.add(root)
                    leaves.update(spaces.leaves(root))
    return leaves


def run_graph(ctx: AtenRuleContext, gm: fx.GraphModule, bindings: list[Any] | None) -> list[Any]:
    """Apply the rules to every node of ``gm``; ``bindings`` give the dims of a body graph's inputs."""
    inputs = iter(bindings) if bindings is not None else None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if inputs is None:
                ctx.allocate(node)
            else:
                ctx.bind(node, next(inputs))
        elif node.op == "call_function":
            _apply(ctx, gm, node)
        elif node.op == "output":
            return [ctx.raw(x) if isinstance(x, fx.Node) else None for x in pytree.tree_leaves(node.args[0])]
        elif node.op == "get_attr":
            ctx.allocate(node)
        else:
            ctx.allocate(node)
            ctx.freeze_node(node, f"unexpected {node.op} node in an exported graph")
    return []


def _apply(ctx: AtenRuleContext, gm: fx.GraphModule, node: fx.Node) -> None:
    target = node.target
    if target is operator.getitem:
        src = ctx.raw(node.args[0])
        ctx.bind(node, src[node.args[1]] if isinstance(src, list) else None)
        return
    if target in BODY_HOPS:
        k = next(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op == "get_attr")
        body = getattr(gm, node.args[k].target)
        operands = [ctx.raw(a) if isinstance(a, fx.Node) else None for a in node.args[k + 1 :]]
        ctx.bind(node, run_graph(ctx, body, operands))
        return
    ctx.allocate(node)
    ctx.run_rule(aten_rules.lookup(target), node)
