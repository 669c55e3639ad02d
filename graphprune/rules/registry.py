"""The rule registry and the context a rule works in, for either frontend's graph.

A rule is a function ``rule(ctx, node)`` registered for one or more ops (ATen op overloads or
overload packets; ONNX ``(domain, op_type)``).  It reads the dims of the node's tensors through ``ctx`` and states
constraints on them with the solver; it registers every integer argument that depends on a
channel count (view sizes, split sizes, conv groups ...) as a :class:`ShapeConstant` so that
pruning can rewrite it.  Lookup is by op object, never by name: an op without a rule is
reported and freezes every dim it touches.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from graphprune.core.algebra import FreezeReason, SpaceSolver

Rule = Callable[["RuleContext", Any], None]  # (context, the frontend's graph node)
ArgPath = tuple[Any, ...]  # ("args", i[, j]) or ("kwargs", name[, j]); None: not given, default used


@dataclass(frozen=True)
class ShapeConstant:
    """An integer argument of ``node`` whose value is ``base + sum(kept sizes of atoms)``."""

    node: Any  # the frontend's graph node
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


class RuleContext(abc.ABC):
    """What a rule sees: the dims (atoms) of every tensor value and the solver.  A frontend's
    context says how its graph's nodes and values hold their dims."""

    def __init__(self, solver: SpaceSolver) -> None:
        self.solver = solver
        self._dims: dict[Any, Any] = {}
        self.constants: list[ShapeConstant] = []
        self.unsupported: dict[str, list[str]] = {}
        self.rule_errors: list[str] = []

    # ---------------------------------------------------------------- dims
    def bind(self, node: Any, dims: Any) -> None:
        self._dims[node] = dims

    @abc.abstractmethod
    def dims(self, x: Any) -> list[int] | None:
        """Atoms of a tensor argument (None for non-tensors)."""

    def raw(self, node: Any) -> Any:
        return self._dims.get(node)

    @abc.abstractmethod
    def out(self, node: Any, index: int | None = None) -> list[int]:
        """Atoms of the node's output (of output ``index`` for multi-output nodes)."""

    def shape(self, x: Any) -> list[int]:
        return [self.solver.size(a) for a in self.dims(x)]

    @abc.abstractmethod
    def op_name(self, node: Any) -> str:
        """The op a node runs, as error messages and reports name it."""

    @abc.abstractmethod
    def node_atoms(self, node: Any) -> list[int]:
        """Every atom of every tensor the node reads or writes."""

    # ----------------------------------------------------------- constraints
    def unify(self, a: int, b: int, node: Any) -> None:
        self.solver.unify(a, b, where=node.name)

    def unify_all(self, xs: Iterable[int], ys: Iterable[int], node: Any) -> None:
        for a, b in zip(xs, ys, strict=True):
            self.unify(a, b, node)

    def freeze(self, atom: int, why: str, node: Any) -> None:
        self.solver.freeze(atom, FreezeReason(why, f"{node.name}: {self.op_name(node)}"))

    def freeze_node(self, node: Any, why: str) -> None:
        """Freeze every dim of every tensor the node reads or writes."""
        for atom in self.node_atoms(node):
            self.freeze(atom, why, node)

    def constant(self, node: Any, path: ArgPath | None, atoms: Iterable[int], base: int = 0) -> None:
        """Register an int argument that equals ``base`` + the channel count of ``atoms``.

        An argument left at its default (``path`` None) cannot be rewritten: if its channels
        are pruned, the op's meaning would change, so they are frozen instead.
        """
        if path is None:
            for atom in atoms:
                self.freeze(atom, "a size given by an argument's default value", node)
            return
        self.constants.append(ShapeConstant(node=node, path=path, atoms=tuple(atoms), base=base))

    def run_rule(self, rule: Rule | None, node: Any) -> None:
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

    def report_unsupported(self, node: Any) -> None:
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
