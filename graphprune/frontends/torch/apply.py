"""Apply a Plan to an nn.Module: shrink tensors, rewrite attributes, then prove the result.

Shrinking tensors is mechanical (each dim's kept positions follow from the group masks).
The module's own forward code must then produce the new shapes: torch.nn modules get their
attributes from :mod:`graphprune.rules.modules`; for other modules, every shape constant that
changed is traced back, through the provenance recorded at capture (:mod:`graphprune.frontends.torch.provenance`),
to the attribute that produced it (``self.num_heads`` ...).

The result is then *verified*: it is captured again, and every node must have the op, the
wiring, the constant arguments and the output shapes that the plan predicts.  Anything else
(a constant computed in a way graphprune did not find, a changed attention scale) raises
:class:`ApplyError`, and the caller's model is left as it was.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from graphprune.core.groups import Analysis
from graphprune.core.plan import Plan, constant_values, kept_positions
from graphprune.core.values import compare as compare_values
from graphprune.errors import ApplyError, CaptureError
from graphprune.frontends.torch.analysis import BODY_HOPS
from graphprune.frontends.torch.capture import CapturedGraph, capture_call, run_outputs, tensor_at
from graphprune.frontends.torch.copying import clone
from graphprune.frontends.torch.provenance import Source, owner_chain, uses_for
from graphprune.frontends.torch.value_oracle import graph_sites, node_values, zeroed_dense
from graphprune.rules.aten import arg_at
from graphprune.rules.modules import rule_for
from torch.fx.operator_schemas import normalize_function


@dataclass
class Applied:
    module: nn.Module
    captured: CapturedGraph


def apply_plan(model: nn.Module, analysis: Analysis, plan: Plan, *, inplace: bool = False) -> Applied:
    """Return ``model`` pruned by ``plan`` (a copy unless ``inplace``), verified against the plan."""
    target = model if inplace else clone(model)
    undo = _UndoLog()
    plan.check(analysis)
    try:
        masks = plan.masks(analysis)
        dense = _shrink_tensors(target, analysis, masks, undo)
        constants = constant_values(analysis, masks)
        changed: Changed = {n: {p: v for p, v in paths.items() if arg_at(n, p) != v} for n, paths in constants.items()}
        _update_attributes(target, analysis, constants, undo)
        recaptured = _verify(target, analysis, masks, changed, dense)
    except BaseException:
        undo.rollback()
        raise
    return Applied(target, recaptured)


class _UndoLog:
    """Records every write to a module so a failed apply can put the model back."""

    def __init__(self) -> None:
        self._entries: list[tuple[Any, str, Any]] = []

    def set_item(self, mapping: dict, key: str, value: Any) -> None:
        self._entries.append((mapping, key, mapping[key]))
        mapping[key] = value

    def record(self, mapping: dict, key: str, old: Any) -> None:
        """Note a write someone else already made, so it can be undone."""
        self._entries.append((mapping, key, old))

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        self._entries.append((obj.__dict__, name, obj.__dict__[name]))
        object.__setattr__(obj, name, value)

    def rollback(self) -> None:
        for mapping, key, old in reversed(self._entries):
            mapping[key] = old
        self._entries.clear()


# ------------------------------------------------------------------ tensors
Removed = dict[str, tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]]


def _shrink_tensors(model: nn.Module, analysis: Analysis, masks: dict[int, torch.Tensor], undo: _UndoLog) -> Removed:
    """Replace every tensor the masks shrink; returns, by name, each dense tensor and the (dim,
    removed positions) of each dim it lost, for the value oracle."""
    holders = _tensor_holders(model)
    spaces = analysis.spaces
    originals = {
        name: tensor_at(model, name) for name, (kind, _) in analysis.tensors.items() if kind != "code_constant"
    }  # those are frozen: nothing to shrink
    done: set[int] = set()
    dense: Removed = {}
    for name, old in originals.items():
        dims = analysis.tensors[name][1]
        index = kept_positions(spaces, dims, masks)
        if index:
            dense[name] = (old, [(d, (~spaces.keep_mask(dims[d], masks)).nonzero().squeeze(1)) for d, _ in index])
        if id(old) in done or not index:  # tied: the same tensor under another name, already replaced everywhere
            continue
        done.add(id(old))
        new = old.detach()
        for d, idx in index:
            new = new.index_select(d, idx.to(new.device))
        new = new.clone()
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        for mapping, key in holders.get(id(old), []):
            undo.set_item(mapping, key, new)
    return dense


def _tensor_holders(model: nn.Module) -> dict[int, list[tuple[dict, str]]]:
    """Every place a tensor object is stored, so tied weights are replaced everywhere at once."""
    holders: dict[int, list[tuple[dict, str]]] = defaultdict(list)
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None:
                    holders[id(t)].append((store, key))
        for key, t in vars(module).items():
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                holders[id(t)].append((module.__dict__, key))
    return holders


# ---------------------------------------------------------------- constants
Changed = dict[fx.Node, dict[tuple, int]]


def _arg_name(node: fx.Node, path: tuple) -> str:
    if path[0] == "kwargs":
        return path[1]
    schema = getattr(node.target, "_schema", None)
    return schema.arguments[path[1]].name if schema is not None else str(path[1])


def _update_attributes(model: nn.Module, analysis: Analysis, constants: Changed, undo: _UndoLog) -> None:
    """Make the modules' forward code produce the new constants.

    torch.nn modules follow their tensors (:mod:`graphprune.rules.modules`).  For any other
    module, the capture recorded which int attribute, or int entry of a tuple, list or
    ``torch.Size`` attribute, became which op argument; each takes the new value of the constants
    it produced (a sequence is replaced by one of its type with those entries changed).  A
    constant read from a tensor's shape follows the pruned shape by itself; one nothing recorded
    is presumed to as well, and verification checks that it does.
    """
    modules = dict(model.named_modules())
    builtin_consts: dict[str, dict[str, Any]] = defaultdict(dict)
    wanted: dict[Source, dict[int, str]] = defaultdict(dict)
    uses = analysis.captured.attribute_uses
    for node, paths in constants.items():
        chain = owner_chain(node)
        owner = chain[-1] if chain else ""
        module = modules.get(owner)
        if module is not None and rule_for(module) is not None:
            node_consts: dict[str, Any] = {}
            for path, new in paths.items():
                name = _arg_name(node, path)
                if len(path) == 3:  # one entry of a list argument, e.g. normalized_shape[0]
                    node_consts.setdefault(name, list(arg_at(node, path[:2])))[path[2]] = new
                else:
                    node_consts[name] = new
            builtin_consts[owner].update(node_consts)
            continue
        for path, new in paths.items():
            for use in uses_for(uses, node, path):
                if use.direct and isinstance(use.attribute, Source):  # a shape read needs no rewrite
                    wanted[use.attribute][new] = f"{node.name} {path}"
    for name, module in modules.items():
        rule = rule_for(module)
        if rule is not None:
            before = {k: v for k, v in vars(module).items() if isinstance(v, (int, tuple))}
            rule(module, builtin_consts.get(name, {}))
            for k, v in before.items():
                if vars(module)[k] != v:
                    undo.record(module.__dict__, k, v)
    entries: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for source, news in wanted.items():
        if len(news) > 1:
            places = "; ".join(f"{where} needs {value}" for value, where in news.items())
            raise ApplyError(
                f"{source} sizes several tensors that the plan prunes differently ({places}); "
                "prune the groups it sizes by the same count, or exclude them"
            )
        (new,) = news
        if source.entry is None:
            if vars(modules[source.module])[source.attribute] != new:
                undo.set_attr(modules[source.module], source.attribute, new)
        else:
            entries[source.module, source.attribute][source.entry] = new
    for (owner, attr), changed_entries in entries.items():
        old = vars(modules[owner])[attr]
        new_value = type(old)(changed_entries.get(k, v) for k, v in enumerate(old))
        if new_value != old:
            undo.set_attr(modules[owner], attr, new_value)


# ------------------------------------------------------------ verification
class _StructureDiffers(ApplyError):
    """The pruned model traces to a graph of another shape (e.g. code skips a no-op at size 1)."""


def _verify(
    model: nn.Module, analysis: Analysis, masks: dict[int, torch.Tensor], changed: Changed, dense: Removed
) -> CapturedGraph:
    """Check the pruned module against the plan: node by node (structure, then values), or by
    outputs where the graphs differ."""
    original = analysis.captured
    try:
        recaptured = capture_call(model, original.args, original.kwargs)
    except CaptureError as exc:
        raise ApplyError(_no_longer_traces(exc, analysis, masks)) from exc
    on_meta = any(t.device.type == "meta" for t in model.parameters())
    try:
        twin = _compare_graphs(original.graph_module, recaptured.graph_module, analysis, masks, changed)
    except _StructureDiffers as exc:
        if on_meta:
            raise ApplyError(f"{exc}; a meta-device model cannot be checked by its outputs instead") from exc
        want = _run_rewritten(analysis, changed, model)
        got = run_outputs(model, original)
        if len(got) != len(want) or any(
            a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, want)
        ):
            raise ApplyError(f"{exc}, and its outputs differ from what the plan predicts") from exc
        twin = _output_twins(original.graph_module, recaptured.graph_module)
    if not on_meta and dense:  # nothing removed: no value can part
        compare_values(
            graph_sites(
                analysis, node_values(original, model, zeroed_dense(dense)), node_values(recaptured, model), twin
            ),
            analysis,
            masks,
        )
    return recaptured


def _no_longer_traces(exc: CaptureError, analysis: Analysis, masks: dict[int, torch.Tensor]) -> str:
    """Why the pruned model fails in its own code: the failing line, the pruned groups the dense
    graph computes with on that line, and what to do."""
    if exc.site is None:
        return f"the pruned model no longer traces: {exc}"
    file, line, code = exc.site
    mark = f'File "{file}", line {line},'
    on_line = [n for n in analysis.captured.graph.nodes if mark in (n.meta.get("stack_trace") or "")]
    spaces = analysis.spaces
    pruned = {g.leaf: g for g in analysis.groups if g.leaf in masks and not bool(masks[g.leaf].all())}
    groups = sorted(
        {
            pruned[leaf].id: pruned[leaf]
            for n in on_line
            for a in analysis.context.node_atoms(n)
            for leaf in spaces.leaves(a)
            if leaf in pruned
        }.items()
    )
    modules = sorted({module for _, g in groups for module in g.modules})
    named = (
        (
            f"; on that line the dense model computes with pruned group(s) {[gid for gid, _ in groups]} "
            f"(channels of {', '.join(modules[:4])}{', ...' if len(modules) > 4 else ''})"
        )
        if groups
        else ""
    )
    return (
        f"the pruned model no longer traces: its own code fails at {file}:{line}: `{code}` ({exc.reason}){named}. "
        "A size on that line reaches it in a way graphprune does not follow (read from a tensor's shape, "
        "written as a literal, or an expression it cannot rewrite), so it no longer fits the pruned tensors: "
        "keep those channels (ChannelPrune(ignore=[...]) with the modules named) and please report the model"
    )


def _output_twins(old_gm: fx.GraphModule, new_gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """The outputs of two graphs of different structure, paired in order (what the value oracle
    can still compare)."""

    def outs(gm: fx.GraphModule) -> list[fx.Node]:
        return [
            a
            for a in pytree.tree_leaves(next(n for n in gm.graph.nodes if n.op == "output").args)
            if isinstance(a, fx.Node)
        ]

    return dict(zip(outs(old_gm), outs(new_gm)))


_RELAYOUT = {
    torch.ops.aten.view,
    torch.ops.aten.reshape,
    torch.ops.aten._unsafe_view,
    torch.ops.aten.unsqueeze,
    torch.ops.aten.squeeze,
    torch.ops.aten.expand,
    torch.ops.aten.contiguous,
    torch.ops.aten.clone,
    torch.ops.aten.alias,
    torch.ops.aten.flatten,
    torch.ops.aten.unflatten,
}


def _compare_graphs(
    old_gm: fx.GraphModule, new_gm: fx.GraphModule, analysis: Analysis, masks: dict[int, torch.Tensor], changed: Changed
) -> dict[fx.Node, fx.Node]:
    """Align the two graphs node by node and check ops, wiring, arguments and predicted shapes;
    returns the alignment (original node -> pruned node).

    The pruned graph may leave out view-like nodes that only re-layout data at the new sizes
    (code that skips ``repeat_kv`` when one query head per kv head remains, say).
    """
    spaces = analysis.spaces

    def predicted(node: fx.Node) -> list[int] | None:
        dims = analysis.context.raw(node)
        if dims is None or not all(isinstance(a, int) for a in dims):
            return None
        return [spaces.kept_size(a, masks) for a in dims]

    def skippable(node: fx.Node) -> bool:
        if (
            node.op != "call_function"
            or not isinstance(node.target, torch._ops.OpOverload)
            or node.target.overloadpacket not in _RELAYOUT
            or not isinstance(node.args[0], fx.Node)
        ):
            return False
        out, src = predicted(node), predicted(node.args[0])
        return out is not None and src is not None and prod(out) == prod(src)

    new_nodes = list(new_gm.graph.nodes)
    twin: dict[fx.Node, fx.Node] = {}
    j = 0
    for old in old_gm.graph.nodes:
        new = new_nodes[j] if j < len(new_nodes) else None
        where = f"node {old.name} ({old.target}) in {(owner_chain(old) or ['the model'])[-1]}"
        if new is None or old.op != new.op or (old.op == "call_function" and old.target != new.target):
            if skippable(old):
                twin[old] = twin[old.args[0]]
                continue
            raise _StructureDiffers(
                f"{where}: the pruned model runs {new.target if new else 'nothing'} here "
                "instead (its control flow depends on the pruned sizes)"
            )
        j += 1
        twin[old] = new
        expect_args = _normalized(old, *_substituted(old, changed.get(old, {})))
        got = pytree.tree_leaves(_normalized(new, new.args, new.kwargs))
        want = pytree.tree_leaves(expect_args)
        same = len(got) == len(want) and all(
            (twin.get(w) is g)
            if isinstance(w, fx.Node) and isinstance(g, fx.Node)
            else (not isinstance(g, fx.Node) and not isinstance(w, fx.Node) and _equal(w, g))
            for w, g in zip(want, got)
        )
        if not same:
            raise ApplyError(
                f"{where}: expected arguments {_fmt(expect_args)} but the pruned model's forward "
                f"passes {_fmt(_normalized(new, new.args, new.kwargs))}; a size or scale in its code "
                "is not derived from what was pruned"
            )
        val, expected = new.meta.get("val"), predicted(old)
        if isinstance(val, torch.Tensor) and expected is not None and list(val.shape) != expected:
            raise ApplyError(
                f"{where}: the pruned model produces shape {list(val.shape)}, the plan predicts {expected}"
            )
        if old.op == "call_function" and old.target in BODY_HOPS:
            k = next(i for i, a in enumerate(old.args) if isinstance(a, fx.Node) and a.op == "get_attr")
            _compare_graphs(
                getattr(old_gm, old.args[k].target), getattr(new_gm, new.args[k].target), analysis, masks, changed
            )
    if j != len(new_nodes):
        raise _StructureDiffers(
            f"the pruned model's graph has {len(new_nodes) - j} extra nodes "
            "(its control flow depends on the pruned sizes)"
        )
    return twin


def _run_rewritten(analysis: Analysis, changed: Changed, model: nn.Module) -> list[torch.Tensor]:
    """Outputs the plan predicts: the original graph, constants rewritten, run with the pruned tensors."""
    captured = analysis.captured
    gm = copy.deepcopy(captured.graph_module)

    def rewrite(src: fx.GraphModule, dst: fx.GraphModule) -> None:
        twin = dict(zip(src.graph.nodes, dst.graph.nodes))
        for old, new in twin.items():
            if old in changed:
                args, kwargs = _substituted(old, changed[old])
                new.args = fx.node.map_arg(args, twin.__getitem__)
                new.kwargs = fx.node.map_arg(kwargs, twin.__getitem__)
            if old.op == "call_function" and old.target in BODY_HOPS:
                k = next(i for i, a in enumerate(old.args) if isinstance(a, fx.Node) and a.op == "get_attr")
                rewrite(getattr(src, old.args[k].target), getattr(dst, new.args[k].target))
        dst.recompile()

    rewrite(captured.graph_module, gm)
    user = iter(x for x in pytree.tree_leaves((captured.args, captured.kwargs)) if isinstance(x, torch.Tensor))
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in captured.tensor_names:
            inputs.append(tensor_at(model, captured.tensor_names[node.name][1]).detach())
        else:
            inputs.append(next(user))
    with torch.no_grad():
        out = gm(*inputs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _substituted(node: fx.Node, paths: dict[tuple, int]) -> tuple:
    args, kwargs = list(node.args), dict(node.kwargs)
    for path, new in paths.items():
        where, key, *rest = path
        container = args if where == "args" else kwargs
        if rest:
            seq = list(container[key])
            seq[rest[0]] = new
            container[key] = type(container[key])(seq) if isinstance(container[key], tuple) else seq
        else:
            container[key] = new
    return (tuple(args), kwargs)


def _normalized(node: fx.Node, args: tuple, kwargs: dict) -> dict:
    """Arguments by name with defaults filled in (export omits trailing defaults)."""
    if isinstance(node.target, torch._ops.OpOverload):
        pair = normalize_function(node.target, tuple(args), dict(kwargs), normalize_to_only_use_kwargs=True)
        if pair is not None:
            return dict(sorted(pair.kwargs.items()))
    return {"args": tuple(args), **kwargs}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
    return type(a) is type(b) and a == b


def _fmt(x: Any) -> str:
    return str(fx.node.map_arg(x, lambda n: n.name))[:300]
