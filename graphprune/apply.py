"""Apply a Plan to an nn.Module: shrink tensors, rewrite attributes, then prove the result.

Shrinking tensors is mechanical (each dim's kept positions follow from the group masks).
The module's own forward code must then produce the new shapes: torch.nn modules get their
attributes from :mod:`graphprune.module_rules`; for other modules, every shape constant that
changed is traced back to the integer attribute of the owning module that forward read
while being captured (``self.num_heads`` ...).

The result is then *verified*: it is captured again, and every node must have the op, the
wiring, the constant arguments and the output shapes that the plan predicts.  Anything else
(a constant computed in a way graphprune did not find, a changed attention scale) raises
:class:`ApplyError`, and the caller's model is left as it was.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from graphprune.analysis import Analysis, _BODY_HOPS
from graphprune.capture import CapturedGraph, capture_call
from graphprune.errors import ApplyError
from graphprune.module_rules import rule_for
from graphprune.plan import Plan


@dataclass
class Applied:
    module: nn.Module
    captured: CapturedGraph


def apply_plan(model: nn.Module, analysis: Analysis, plan: Plan, *, inplace: bool = False) -> Applied:
    """Return ``model`` pruned by ``plan`` (a copy unless ``inplace``), verified against the plan."""
    target = model if inplace else copy.deepcopy(model)
    undo = _UndoLog()
    try:
        masks = plan.masks(analysis)
        _shrink_tensors(target, analysis, masks, undo)
        changed = _changed_constants(analysis, masks)
        _update_attributes(target, analysis, changed, undo)
        recaptured = _verify(target, analysis, masks, changed)
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

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        self._entries.append((obj.__dict__, name, obj.__dict__[name]))
        object.__setattr__(obj, name, value)

    def rollback(self) -> None:
        for mapping, key, old in reversed(self._entries):
            mapping[key] = old
        self._entries.clear()


# ------------------------------------------------------------------ tensors
def _shrink_tensors(model: nn.Module, analysis: Analysis, masks: dict[int, torch.Tensor], undo: _UndoLog) -> None:
    holders = _tensor_holders(model)
    spaces = analysis.spaces
    for name, (kind, dims) in analysis.tensors.items():
        index = []
        for d, atom in enumerate(dims):
            if not any(leaf in masks for leaf in spaces.leaves(atom)):
                continue
            keep = spaces.keep_mask(atom, masks)
            if not bool(keep.all()):
                index.append((d, keep.nonzero().squeeze(1)))
        if not index:
            continue
        old = _get_tensor(model, name)
        new = old.detach()
        for d, idx in index:
            new = new.index_select(d, idx.to(new.device))
        new = new.clone()
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        for mapping, key in holders.get(id(old), []):
            undo.set_item(mapping, key, new)


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


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


# ---------------------------------------------------------------- constants
Changed = dict[fx.Node, dict[tuple, int]]


def _get_path(node: fx.Node, path: tuple) -> Any:
    where, key, *rest = path
    if where == "default":
        return None
    value = node.args[key] if where == "args" else node.kwargs[key]
    return value[rest[0]] if rest else value


def _changed_constants(analysis: Analysis, masks: dict[int, torch.Tensor]) -> Changed:
    spaces = analysis.spaces
    changed: Changed = defaultdict(dict)
    for c in analysis.constants:
        old = _get_path(c.node, c.path)
        if old is None:
            continue
        new = c.base + sum(spaces.kept_size(a, masks) for a in c.atoms)
        if new == old:
            continue
        if c.path[0] == "default":
            raise ApplyError(f"{c.node.name}: the default of {c.path[1]} would have to change to {new}")
        prior = changed[c.node].get(c.path)
        if prior is not None and prior != new:
            raise ApplyError(f"{c.node.name}: argument {c.path} would need two values ({prior} and {new})")
        changed[c.node][c.path] = new
    return changed


def _arg_name(node: fx.Node, path: tuple) -> str:
    if path[0] == "kwargs":
        return path[1]
    schema = getattr(node.target, "_schema", None)
    return schema.arguments[path[1]].name if schema is not None else str(path[1])


def _owner_chain(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _cls in stack.values()]


def _update_attributes(model: nn.Module, analysis: Analysis, changed: Changed, undo: _UndoLog) -> None:
    modules = dict(model.named_modules())
    builtin_consts: dict[str, dict[str, Any]] = defaultdict(dict)
    wanted: dict[tuple[str, int], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for node, paths in changed.items():
        chain = _owner_chain(node)
        owner = chain[-1] if chain else ""
        module = modules.get(owner)
        if module is not None and rule_for(module) is not None:
            for path, new in paths.items():
                name = _arg_name(node, path)
                if len(path) == 3:
                    full = list(_get_path(node, path[:2]))
                    prev = builtin_consts[owner].get(name, full)
                    prev[path[2]] = new
                    builtin_consts[owner][name] = prev
                else:
                    builtin_consts[owner][name] = new
            continue
        for path, new in paths.items():
            old = _get_path(node, path)
            wanted[(tuple(chain), old)][new].append(f"{node.name} {path}")
    # torch.nn modules: attributes follow their tensors.
    for name, module in modules.items():
        rule = rule_for(module)
        if rule is None:
            continue
        before = {k: v for k, v in vars(module).items() if not isinstance(v, (torch.Tensor, dict))}
        rule(module, builtin_consts.get(name, {}))
        for k, v in vars(module).items():
            if k in before and before[k] != v:
                undo._entries.append((module.__dict__, k, before[k]))
    # Other modules: the int attribute forward read that holds the old value.
    assigned: dict[tuple[str, str], int] = {}
    originals = {path: {k: v for k, v in vars(m).items() if type(v) is int} for path, m in modules.items()}
    for (chain, old), news in wanted.items():
        if len(news) > 1:
            raise ApplyError(f"size {old} in {chain[-1] if chain else 'the model'} must become "
                             f"{sorted(news)} at different places ({'; '.join(sum(news.values(), []))}); "
                             "graphprune cannot rewrite one attribute two ways")
        (new,) = news
        for path in reversed(chain):
            module = modules.get(path)
            reads = analysis.captured.attribute_reads.get(path, set())
            hits = [a for a in sorted(reads) if originals.get(path, {}).get(a) == old]
            if not hits:
                continue
            for attr in hits:
                key = (path, attr)
                if assigned.get(key, new) != new:
                    raise ApplyError(f"{path}.{attr} would need two values ({assigned[key]} and {new})")
                if key not in assigned:
                    assigned[key] = new
                    undo.set_attr(module, attr, new)
            break


# ------------------------------------------------------------ verification
def _verify(model: nn.Module, analysis: Analysis, masks: dict[int, torch.Tensor], changed: Changed) -> CapturedGraph:
    original = analysis.captured
    try:
        recaptured = capture_call(model, original.args, original.kwargs)
    except Exception as exc:
        raise ApplyError(f"the pruned model no longer traces: {exc}") from exc
    spaces = analysis.spaces
    ctx = analysis.context

    def check(old_gm: fx.GraphModule, new_gm: fx.GraphModule) -> None:
        old_nodes, new_nodes = list(old_gm.graph.nodes), list(new_gm.graph.nodes)
        if len(old_nodes) != len(new_nodes):
            raise ApplyError(f"the pruned model traces to a different graph ({len(new_nodes)} nodes instead of "
                             f"{len(old_nodes)}): its control flow depends on the pruned sizes")
        old_pos = {n: i for i, n in enumerate(old_nodes)}
        new_pos = {n: i for i, n in enumerate(new_nodes)}
        for old, new in zip(old_nodes, new_nodes):
            where = f"node {old.name} ({old.target}) in {(_owner_chain(old) or ['the model'])[-1]}"
            if old.op != new.op or (old.op == "call_function" and old.target != new.target):
                raise ApplyError(f"{where}: the pruned model runs {new.target} here instead")
            expect_args = _substituted(old, changed.get(old, {}))
            got = pytree.tree_leaves((new.args, new.kwargs))
            want = pytree.tree_leaves(expect_args)
            same = len(got) == len(want) and all(
                (old_pos[w] == new_pos[g]) if isinstance(w, fx.Node) and isinstance(g, fx.Node)
                else (not isinstance(g, fx.Node) and not isinstance(w, fx.Node) and _equal(w, g))
                for w, g in zip(want, got))
            if not same:
                raise ApplyError(f"{where}: expected arguments {_fmt(expect_args)} but the pruned model's forward "
                                 f"passes {_fmt((new.args, new.kwargs))}; a size or scale in its code is not "
                                 "derived from what was pruned")
            dims = ctx.raw(old)
            val = new.meta.get("val")
            if isinstance(val, torch.Tensor) and dims is not None and all(isinstance(a, int) for a in dims):
                expected = [spaces.kept_size(a, masks) for a in dims]
                if list(val.shape) != expected:
                    raise ApplyError(f"{where}: the pruned model produces shape {list(val.shape)}, "
                                     f"the plan predicts {expected}")
            if old.op == "call_function" and old.target in _BODY_HOPS:
                k = next(i for i, a in enumerate(old.args) if isinstance(a, fx.Node) and a.op == "get_attr")
                check(getattr(old_gm, old.args[k].target), getattr(new_gm, new.args[k].target))

    check(original.graph_module, recaptured.graph_module)
    return recaptured


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


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
    return type(a) is type(b) and a == b


def _fmt(x: Any) -> str:
    return str(fx.node.map_arg(x, lambda n: n.name))[:300]
