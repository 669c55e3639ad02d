"""The depth plan: which blocks of a model's block list are removed, as plain data.

Removing blocks renumbers the ones after them (``layers.7`` becomes ``layers.5`` once two blocks
before it are gone), so every other record of a run made after the removal names tensors the new
way; :meth:`BlockRemoval.renamed` maps a name of the model as given to its name after the removal
(None for a tensor of a removed block), which is all a checkpoint writer needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from graphprune.errors import InputError


@dataclass(frozen=True)
class BlockRemoval:
    """``removed`` (sorted positions) of the ``count`` blocks in the list at module path ``blocks``."""

    blocks: str
    count: int
    removed: tuple[int, ...]

    def __post_init__(self) -> None:
        removed = self.removed
        if not removed or list(removed) != sorted(set(removed)) or removed[0] < 0 or removed[-1] >= self.count:
            raise InputError(
                f"a block removal from {self.blocks} must name distinct positions below {self.count} in "
                f"increasing order, got {list(removed)}"
            )
        if len(removed) >= self.count:
            raise InputError(f"a block removal cannot remove all {self.count} blocks of {self.blocks}")

    @property
    def kept(self) -> list[int]:
        """The positions kept, in order: the block now at ``j`` was at ``kept[j]``."""
        gone = set(self.removed)
        return [i for i in range(self.count) if i not in gone]

    def renamed(self, name: str) -> str | None:
        """``name`` (a tensor or module path of the model as given) after the removal: the same
        outside the blocks, renumbered inside a kept one, None inside a removed one."""
        split = self._split(name, self.count)
        if split is None:
            return name
        position, rest = split
        if position in self.removed:
            return None
        return f"{self.blocks}.{self.kept.index(position)}{rest}"

    def original(self, name: str) -> str:
        """The name in the model as given of ``name`` (a name after the removal)."""
        split = self._split(name, len(self.kept))
        return name if split is None else f"{self.blocks}.{self.kept[split[0]]}{split[1]}"

    def _split(self, name: str, count: int) -> tuple[int, str] | None:
        """``name`` as (block position, the rest from its dot) when it lies in one of ``count`` blocks."""
        index, dot, rest = name.removeprefix(self.blocks + ".").partition(".")
        if not name.startswith(self.blocks + ".") or not index.isdigit() or int(index) >= count:
            return None
        return int(index), dot + rest


def original_name(plans: Iterable[object], name: str) -> str:
    """``name`` (as the model is after the block removals among ``plans``) in the model as given."""
    for removal in reversed([p for p in plans if isinstance(p, BlockRemoval)]):
        name = removal.original(name)
    return name
