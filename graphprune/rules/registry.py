"""The rule registry and the context a rule works in.

A rule is a function ``rule(ctx, node)`` registered for one or more ATen op overloads
(or overload packets).  It reads the dims of the node's tensors through ``ctx`` and states
constraints on them with the solver; it registers every integer argument that depends on a
channel count (view sizes, split sizes, conv groups ...) as a :class:`ShapeConstant` so that
pruning can rewrite it.  Lookup is by op object, never by name: an op without a rule is
reported and freezes every dim it touches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphprune.core.algebra import FreezeReason, SpaceSolver

Rule = Callable[["RuleContext", fx.Node], None]
ArgPath = tuple[Any, ...]  # ("args", i[, j]) or ("kwargs", name[, j]); None: not given, default used


@dataclass(frozen=True)
class ShapeConstant:
    """An integer argument of ``node`` whose value is ``base + sum(kept sizes of atoms)``."""

    node: fx.Node
    path: ArgPath
    atoms: tuple[int, ...]
    base: int = 0


class RuleRegistry:
    """Maps ATen ops to rules; ``torch.Tag.pointwise`` ops fall back to the broadcasting rule."""

    def __init__(self) -> None:
        self._rules: dict[Any, Rule] = {}
        self.pointwise: Rule | None = None

    def register(self, *ops: Any) -> Callable[[Rule], Rule]:
        def deco(fn: Rule) -> Rule:
            for op in ops:
                if op in self._rules:
                    raise ValueError(f"two rules registered for {op}")
                self._rules[op] = fn
            return fn

        return deco

    def lookup(self, target: Any) -> Rule | None:
        rule = self._rules.get(target)
        if rule is None and isinstance(target, torch._ops.OpOverload):
            rule = self._rules.get(target.overloadpacket)
            if rule is None and torch.Tag.pointwise in target.tags:
                rule = self.pointwise
        return rule

    def covered_ops(self) -> list[str]:
        """Names of the ops with an explicit rule."""
        return sorted(str(op) for op in self._rules)

    def rules(self) -> dict[Any, Rule]:
        """Op -> rule, for the supported-ops table (a copy: the registry stays as registered)."""
        return dict(self._rules)


class RuleContext:
    """What a rule sees: the dims (atoms) of every tensor value and the solver."""

    def __init__(self, solver: SpaceSolver) -> None:
        self.solver = solver
        self._dims: dict[fx.Node, Any] = {}
        self.constants: list[ShapeConstant] = []
        self.parameter_nodes: set[fx.Node] = set()
        self.unsupported: dict[str, list[str]] = {}
        self.rule_errors: list[str] = []

    # ---------------------------------------------------------------- dims
    def allocate(self, node: fx.Node) -> None:
        """Give every dim of the node's value(s) a fresh atom."""
        self._dims[node] = self._alloc(node.meta.get("val"))

    def _alloc(self, val: Any) -> Any:
        if isinstance(val, torch.Tensor):
            return [self.solver.new(int(s)) for s in val.shape]
        if isinstance(val, (list, tuple)):
            return [self._alloc(v) for v in val]
        return None

    def bind(self, node: fx.Node, dims: Any) -> None:
        self._dims[node] = dims

    def dims(self, x: Any) -> list[int] | None:
        """Atoms of a tensor argument (None for non-tensors)."""
        if isinstance(x, fx.Node):
            d = self._dims.get(x)
            if d is not None and all(isinstance(a, int) for a in d):
                return d
        return None

    def raw(self, node: fx.Node) -> Any:
        return self._dims.get(node)

    def out(self, node: fx.Node, index: int | None = None) -> list[int]:
        d = self._dims[node]
        return d if index is None else d[index]

    def shape(self, x: Any) -> list[int]:
        return [self.solver.size(a) for a in self.dims(x)]

    # ----------------------------------------------------------- constraints
    def unify(self, a: int, b: int, node: fx.Node) -> None:
        self.solver.unify(a, b, where=node.name)

    def unify_all(self, xs: Iterable[int], ys: Iterable[int], node: fx.Node) -> None:
        for a, b in zip(xs, ys, strict=True):
            self.unify(a, b, node)

    def freeze(self, atom: int, why: str, node: fx.Node) -> None:
        self.solver.freeze(atom, FreezeReason(why, f"{node.name}: {self.op_name(node)}"))

    def op_name(self, node: fx.Node) -> str:
        """The op a node runs, as error messages and reports name it."""
        return str(node.target)

    def freeze_node(self, node: fx.Node, why: str) -> None:
        """Freeze every dim of every tensor the node reads or writes."""
        for atom in self.node_atoms(node):
            self.freeze(atom, why, node)

    def node_atoms(self, node: fx.Node) -> list[int]:
        atoms: list[int] = []
        for x in node.all_input_nodes:
            atoms.extend(flat_atoms(self._dims.get(x)))
        atoms.extend(flat_atoms(self._dims.get(node)))
        return atoms

    def constant(self, node: fx.Node, path: ArgPath | None, atoms: Iterable[int], base: int = 0) -> None:
        """Register an int argument that equals ``base`` + the channel count of ``atoms``.

        An argument left at its default (``path`` None) cannot be rewritten: if its channels
        are pruned, the op's meaning would change, so they are frozen instead.
        """
        if path is None:
            for atom in atoms:
                self.freeze(atom, "a size given by an argument's default value", node)
            return
        self.constants.append(ShapeConstant(node, path, tuple(atoms), base))

    def run_rule(self, rule: Rule | None, node: fx.Node) -> None:
        """Apply ``rule`` to ``node``.  No rule: the node is reported and everything it touches is
        frozen.  A rule that raises is a bug: it must not corrupt the analysis, so its node is
        frozen and the error reported."""
        if rule is None:
            self.report_unsupported(node)
            self.freeze_node(node, f"no rule for {self.op_name(node)}")
            return
        try:
            rule(self, node)
        except Exception as exc:
            self.rule_errors.append(f"{node.name} ({self.op_name(node)}): {type(exc).__name__}: {exc}")
            self.freeze_node(node, f"the rule for {self.op_name(node)} failed")

    def report_unsupported(self, node: fx.Node) -> None:
        self.unsupported.setdefault(self.op_name(node), []).append(node.name)


def flat_atoms(d: Any) -> list[int]:
    """Every atom in a node's dims (a tensor's list, or nested lists for tuple values)."""
    if d is None:
        return []
    if isinstance(d, int):
        return [d]
    out: list[int] = []
    for x in d:
        out.extend(flat_atoms(x))
    return out


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
