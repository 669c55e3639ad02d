"""The Plan: plain data saying which channels of each group survive.

A plan is computed by passes and applied by :mod:`graphprune.apply`.  It holds kept indices
per group, by group id of the analysis it was made for (group ids are deterministic for a given
graph; a fingerprint to refuse a plan made for another graph is issue 10's), so it can be
saved, inspected and re-applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from graphprune.analysis import Analysis
from graphprune.errors import InputError


@dataclass
class Plan:
    """Kept channel indices per group id; groups not listed keep everything."""

    keep: dict[int, list[int]] = field(default_factory=dict)

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
            mask = torch.zeros(group.size, dtype=torch.bool)
            mask[torch.tensor(kept, dtype=torch.long)] = True
            out[group.leaf] = mask
        return out

    def removed(self, analysis: Analysis) -> int:
        return sum(analysis.group(g).size - len(k) for g, k in self.keep.items())

    def to_json(self) -> str:
        return json.dumps({"version": 1, "keep": {str(k): v for k, v in sorted(self.keep.items())}})

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        if data.get("version") != 1:
            raise InputError(f"unsupported plan version {data.get('version')!r}")
        return cls({int(k): list(v) for k, v in data["keep"].items()})
