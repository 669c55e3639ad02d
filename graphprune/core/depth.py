"""The depth plan: which blocks of a model's block list are removed, as plain data.

Removing blocks renumbers the ones after them (``layers.7`` becomes ``layers.5`` once two blocks
before it are gone), so every other record of a run made after the removal names tensors the new
way; :meth:`BlockRemoval.renamed` maps a name of the model as given to its name after the removal
(None for a tensor of a removed block), which is all a checkpoint writer needs.
"""

from __future__ import annotations

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
        head = self.blocks + "." if self.blocks else ""
        if not name.startswith(head):
            return name
        index, dot, rest = name[len(head) :].partition(".")
        if not index.isdigit() or int(index) >= self.count:
            return name
        position = int(index)
        if position in self.removed:
            return None
        return f"{head}{self.kept.index(position)}{dot}{rest}"

    def original(self, name: str) -> str:
        """The name in the model as given of ``name`` (a name after the removal)."""
        head = self.blocks + "." if self.blocks else ""
        if not name.startswith(head):
            return name
        index, dot, rest = name[len(head) :].partition(".")
        if not index.isdigit() or int(index) >= len(self.kept):
            return name
        return f"{head}{self.kept[int(index)]}{dot}{rest}"
