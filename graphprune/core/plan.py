"""The Plan: plain data saying which channels of each group survive.

A plan is computed by passes and applied by :mod:`graphprune.frontends.torch.apply` (or
:mod:`graphprune.frontends.onnx.apply`).  It holds kept indices per group, by group id of the analysis it was
made for, and that analysis's *fingerprint*: a hash of its parameter shapes and group structure.
Group ids are deterministic for a given graph, so a plan re-applies to the same architecture, and
is refused, naming what differs, for any other.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from graphprune.core.algebra import Spaces
from graphprune.core.groups import Analysis
from graphprune.errors import ApplyError, InputError


@dataclass
class Plan:
    """Kept channel indices per group id; groups not listed keep everything.  ``fingerprint`` and
    ``shapes`` (parameter shapes) describe the analysis it was made for (None: unchecked)."""

    keep: dict[int, list[int]] = field(default_factory=dict)
    fingerprint: str | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    # per tensor (parameter or buffer) the kept indices of each dim (None: kept whole), for the
    # tensors the plan shrinks: what applying it to a checkpoint needs without the analysis
    slices: dict[str, list[list[int] | None]] = field(default_factory=dict, compare=False)
    # the fingerprint of the model the plan makes (its analysis after applying): tells apart
    # configurations that give the same shapes (one head of 16 dims, two of 8) in config inference
    result: str | None = field(default=None, compare=False)

    @classmethod
    def for_analysis(cls, analysis: Analysis) -> "Plan":
        """An empty plan bound to ``analysis`` (what passes create)."""
        return cls(fingerprint=analysis.fingerprint, shapes=analysis.parameter_shapes)

    def check(self, analysis: Analysis) -> None:
        """Refuse ``analysis`` unless it is the one this plan was made for, saying what differs."""
        if self.fingerprint is None or self.fingerprint == analysis.fingerprint:
            return
        here = analysis.parameter_shapes
        missing = sorted(set(self.shapes) - set(here))
        extra = sorted(set(here) - set(self.shapes))
        changed = sorted(n for n in set(here) & set(self.shapes) if here[n] != self.shapes[n])
        what = (
            "; ".join(
                f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                for label, names in (("missing here", missing), ("not in the plan", extra), ("other shapes", changed))
                if names
            )
            or "the same parameters, coupled differently"
        )
        raise InputError(
            f"this plan was made for another architecture (fingerprint {self.fingerprint}, this model "
            f"{analysis.fingerprint}): {what}"
        )

    def set(self, analysis: Analysis, group_id: int, kept: list[int] | torch.Tensor) -> None:
        group = analysis.group(group_id)
        kept = sorted(int(i) for i in (kept.tolist() if isinstance(kept, torch.Tensor) else kept))
        if not kept:
            raise InputError(f"group {group_id} would lose all {group.size} channels; keep at least one")
        if kept[0] < 0 or kept[-1] >= group.size or len(set(kept)) != len(kept):
            raise InputError(f"kept indices for group {group_id} must be distinct and in [0, {group.size})")
        if len(kept) == group.size:
            self.keep.pop(group_id, None)
        else:
            self.keep[group_id] = kept

    def masks(self, analysis: Analysis) -> dict[int, torch.Tensor]:
        """Bool keep-mask per solver leaf, for the groups this plan prunes."""
        out = {}
        for gid, kept in self.keep.items():
            group = analysis.group(gid)
            mask = torch.zeros(group.size, dtype=torch.bool, device="cpu")
            mask[torch.tensor(kept, dtype=torch.long, device="cpu")] = True
            out[group.leaf] = mask
        return out

    def record_slices(self, analysis: Analysis) -> None:
        """Fill :attr:`slices` from ``analysis`` (the one this plan was made for)."""
        masks = self.masks(analysis)
        self.slices = {}
        for name, (_kind, atoms) in sorted(analysis.tensors.items()):
            dims = []
            for atom in atoms:
                keep = analysis.spaces.keep_mask(atom, masks)
                dims.append(None if bool(keep.all()) else keep.nonzero().flatten().tolist())
            if any(d is not None for d in dims):
                self.slices[name] = dims

    def removed(self, analysis: Analysis) -> int:
        return sum(analysis.group(g).size - len(k) for g, k in self.keep.items())

    def to_dict(self) -> dict:
        return {
            "version": 2,
            "fingerprint": self.fingerprint,
            "shapes": self.shapes,
            "keep": {str(k): v for k, v in sorted(self.keep.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if data.get("version") not in (1, 2):
            raise InputError(f"unsupported plan version {data.get('version')!r}")
        return cls(
            {int(k): list(v) for k, v in data["keep"].items()},
            data.get("fingerprint"),
            {k: list(v) for k, v in data.get("shapes", {}).items()},
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


def kept_positions(spaces: Spaces, dims: list[int], masks: dict[int, torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """For each dim of a tensor (its atoms ``dims``) that the masks shrink: (dim, kept positions)."""
    index = []
    for d, atom in enumerate(dims):
        if not any(leaf in masks for leaf in spaces.leaves(atom)):
            continue
        keep = spaces.keep_mask(atom, masks)
        if not bool(keep.all()):
            index.append((d, keep.nonzero().squeeze(1)))
    return index


def constant_values(analysis: Analysis, masks: dict[int, torch.Tensor]) -> dict[Any, dict[tuple, int]]:
    """New value of every registered shape constant (changed or not), by node and argument path."""
    spaces = analysis.spaces
    values: dict[Any, dict[tuple, int]] = defaultdict(dict)
    for c in analysis.constants:
        new = c.base + sum(spaces.kept_size(a, masks) for a in c.atoms)
        prior = values[c.node].setdefault(c.path, new)
        if prior != new:
            raise ApplyError(f"{c.node.name}: argument {c.path} would need two values ({prior} and {new})")
    return values
