"""Groups: the prunable channel spaces of a model, and what an analysis of any frontend holds.

A :class:`Group` is one prunable channel space (a leaf of the solver) together with every
parameter, buffer and constant slice it indexes.  Spaces that touch the model's inputs or
outputs, ops without rules, or structures the solver cannot reconcile are *frozen*, and the
reason is kept so :meth:`Analysis.describe` can say why a layer was left alone.  The torch and
ONNX frontends fill an :class:`Analysis` from their own graphs; everything here is graph-neutral.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Generic, Protocol, TypeVar

import torch

from graphprune.core.algebra import FreezeReason, Spaces


@dataclass(frozen=True)
class Member:
    """One dim of one tensor (parameter, buffer or constant) that a group indexes."""

    name: str
    kind: str
    dim: int
    atom: int
    shape: tuple[int, ...]

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]


@dataclass
class Group:
    """A prunable channel space and everything that must shrink with it."""

    id: int
    leaf: int
    size: int
    members: list[Member]
    tags: frozenset[str] = frozenset()
    inexact: str | None = None

    @property
    def modules(self) -> list[str]:
        return sorted({m.module for m in self.members if m.kind == "parameter"})

    def describe(self, max_members: int = 8) -> str:
        flags = []
        if self.tags:
            flags.append("/".join(sorted(self.tags)))
        if self.inexact:
            flags.append(f"inexact: {self.inexact}")
        head = f"group {self.id}: {self.size} channels" + (f" [{'; '.join(flags)}]" if flags else "")
        lines = [head]
        for m in self.members[:max_members]:
            lines.append(f"    {m.name} {list(m.shape)} dim {m.dim}")
        if len(self.members) > max_members:
            lines.append(f"    ... and {len(self.members) - max_members} more")
        return "\n".join(lines)


@dataclass
class FrozenSpace:
    """A channel space with parameters that may not be pruned, and why."""

    leaf: int
    size: int
    members: list[Member]
    reason: FreezeReason

    def describe(self) -> str:
        names = ", ".join(f"{m.name}[dim {m.dim}]" for m in self.members[:3])
        more = f" and {len(self.members) - 3} more" if len(self.members) > 3 else ""
        return f"{self.size} channels: {self.reason} -- {names}{more}"


Captured = TypeVar("Captured")  # a frontend's graph: a torch CapturedGraph, an OnnxCapture


class RuleFindings(Protocol):
    """What an analysis reports of the rule context its frontend's rules filled."""

    constants: list[Any]
    unsupported: dict[str, list[str]]
    rule_errors: list[str]


Context = TypeVar("Context", bound=RuleFindings)  # the rule context the frontend's rules filled


@dataclass
class Analysis(abc.ABC, Generic[Captured, Context]):
    """The coupled groups of a model, and what was frozen and why."""

    model_name: str
    captured: Captured
    context: Context  # its constants, unsupported ops and rule errors are reported
    spaces: Spaces
    groups: list[Group]
    frozen: list[FrozenSpace]
    tensors: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # name -> (kind, dim atoms)
    seconds: float = 0.0

    @property
    def constants(self) -> list[Any]:
        return self.context.constants

    @property
    def unsupported(self) -> dict[str, list[str]]:
        return self.context.unsupported

    @property
    def rule_errors(self) -> list[str]:
        return self.context.rule_errors

    @abc.abstractmethod
    def node_count(self) -> int:
        """The number of graph nodes (the frontend's graph decides what a node is)."""

    @cached_property
    def fingerprint(self) -> str:
        """A hash of what plans made on this analysis refer to: every tensor's name, kind and shape,
        and every group's size and members (see :meth:`graphprune.core.plan.Plan.check`)."""
        data = {
            "tensors": {
                name: [kind, [self.spaces.solver.size(a) for a in dims]]
                for name, (kind, dims) in sorted(self.tensors.items())
            },
            "groups": [[g.size, [[m.name, m.dim] for m in g.members]] for g in self.groups],
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @cached_property
    def parameter_shapes(self) -> dict[str, list[int]]:
        return {
            name: [self.spaces.solver.size(a) for a in dims]
            for name, (kind, dims) in self.tensors.items()
            if kind == "parameter"
        }

    @abc.abstractmethod
    def planned_macs(self, masks: dict[int, torch.Tensor]) -> int:
        """MACs once the keep-masks (per solver leaf) are applied, from the analysis alone."""

    @abc.abstractmethod
    def planned_params(self, masks: dict[int, torch.Tensor], model: Any = None) -> int:
        """Parameters once the keep-masks are applied."""

    def describe(self, max_groups: int = 50, *, every_frozen: bool = False) -> str:
        """What a user can act on first (the groups, what the model's inputs and outputs keep whole,
        ops without a rule), then the other frozen spaces, one line per reason (``every_frozen``:
        one line per space)."""
        lines = [
            f"{self.model_name}: {self.node_count()} graph nodes, {len(self.groups)} prunable groups, "
            f"{len(self.frozen)} frozen spaces (analysed in {self.seconds:.2f} s)"
        ]
        for g in self.groups[:max_groups]:
            lines.append(g.describe())
        if len(self.groups) > max_groups:
            lines.append(f"... and {len(self.groups) - max_groups} more groups")
        interface = [f for f in self.frozen if f.reason.interface]
        if interface:
            lines.append("kept whole because they reach the model's inputs or outputs:")
            lines.extend(f"  {f.describe()}" for f in interface)
        if self.unsupported:
            lines.append("ops without a rule (everything they touch is frozen):")
            lines.extend(f"  {op}: {', '.join(nodes[:5])}" for op, nodes in sorted(self.unsupported.items()))
        if self.rule_errors:
            lines.append("rules that failed (their nodes are frozen):")
            lines.extend(f"  {e}" for e in self.rule_errors)
        others = [f for f in self.frozen if all(f is not i for i in interface)]
        if others and every_frozen:
            lines.append("frozen:")
            lines.extend(f"  {f.describe()}" for f in others)
        elif others:
            lines.append("frozen, by reason (every space: describe(every_frozen=True), or inspect --all):")
            by_reason: dict[str, list[FrozenSpace]] = {}
            for f in others:
                by_reason.setdefault(f.reason.why, []).append(f)
            for why, spaces in by_reason.items():
                if len(spaces) == 1:
                    lines.append(f"  {spaces[0].describe()}")
                    continue
                owners = list(dict.fromkeys(m.name for f in spaces for m in f.members))
                more = f" and {len(owners) - 3} more" if len(owners) > 3 else ""
                lines.append(f"  {why}: {len(spaces)} spaces in {len(owners)} tensors -- {', '.join(owners[:3])}{more}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def group(self, group_id: int) -> Group:
        return self.groups[group_id]


def collect_groups(
    spaces: Spaces, tensors: dict[str, tuple[str, list[int]]], carried: set[int]
) -> tuple[list[Group], list[FrozenSpace]]:
    """Prunable groups and frozen spaces from the solved spaces: every leaf that indexes a
    parameter, with every tensor slice it indexes (``tensors``: name -> (kind, dim atoms)).
    A leaf no activation carries (``carried``) is a parameter dim no rule coupled: frozen."""
    solver = spaces.solver
    members: dict[int, list[Member]] = defaultdict(list)
    for name, (kind, dims) in tensors.items():
        shape = tuple(solver.size(a) for a in dims)
        for d, atom in enumerate(dims):
            for leaf in dict.fromkeys(spaces.leaves(atom)):
                members[leaf].append(Member(name=name, kind=kind, dim=d, atom=atom, shape=shape))
    groups: list[Group] = []
    frozen: list[FrozenSpace] = []
    for leaf, ms in members.items():
        if not any(m.kind == "parameter" for m in ms) or solver.size(leaf) <= 1:
            continue
        if leaf in spaces.frozen:
            frozen.append(FrozenSpace(leaf=leaf, size=solver.size(leaf), members=ms, reason=spaces.frozen[leaf]))
        elif leaf not in carried:
            frozen.append(
                FrozenSpace(
                    leaf=leaf,
                    size=solver.size(leaf),
                    members=ms,
                    reason=FreezeReason("no activation carries these channels (a parameter dim that no rule coupled)"),
                )
            )
        else:
            groups.append(
                Group(
                    id=len(groups),
                    leaf=leaf,
                    size=solver.size(leaf),
                    members=ms,
                    tags=frozenset(spaces.tags.get(leaf, ())),
                    inexact=spaces.inexact.get(leaf),
                )
            )
    return groups, frozen
