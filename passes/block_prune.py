"""BlockPrune: depth pruning, whole residual blocks removed (after Minitron, Muralidharan et al. 2024).

The blocks are the model's block list (the chain calibration runs block by block); a block is a
candidate when its graph shows it is residual (:mod:`graphprune.frontends.torch.depth`), so removing it
leaves the stream as the block found it.  Blocks are ranked on calibration data and the least
important removed; the module is verified against the dense model with those blocks bypassed, and
what holds block positions (``layer_idx``, a Hugging Face config's layer count and per-layer lists)
is renumbered.  It runs first, on the dense model (importance is measured on the model as trained,
as Minitron does), so every later plan names blocks the new way; width pruning may follow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.nn as nn

from graphprune.core.depth import BlockRemoval
from graphprune.core.pipeline import MODULE, STREAMED, Pass, PassResult, Stage
from graphprune.errors import InputError
from graphprune.frontends.torch.blocks import Blocks
from graphprune.frontends.torch.depth import loss_without, output_change, stream_change, stream_change_by_block, survey

IMPORTANCES = ("cosine", "output")


class BlockPrune(Pass):
    """Remove the ``n`` (or ``ratio`` of the) least important residual blocks.

    Args:
        n: how many blocks to remove.
        ratio: instead of ``n``, the share of the model's blocks to remove (rounded to the nearest).
        importance: ``"cosine"`` (Minitron's block importance: one minus the cosine between a
            block's input and output stream, mean over calibration tokens), ``"output"`` (the
            relative squared change of the model's outputs on the calibration data when the block
            alone is bypassed), or a callable ``loss(model) -> float`` (lower is better, e.g. a
            perplexity on the user's data) evaluated with each block alone bypassed; the blocks
            whose bypass costs least go first.
        ignore: blocks kept whatever their score: module names (``"model.layers.0"``) or positions
            (``-1``: the last).
        iterative: remove one block at a time, scoring the rest again with the removed ones bypassed
            (``n`` rounds of the criterion instead of one): drop-one scores do not add up, and two
            blocks that each matter little may matter together.
        blocks: the block list's module path, where it is not the largest list of like modules.
    """

    modes = frozenset({MODULE, STREAMED})
    accepts = frozenset({Stage.DENSE})
    produces = Stage.STRUCTURED

    def __init__(
        self,
        n: int | None = None,
        *,
        ratio: float | None = None,
        importance: str | Callable[[nn.Module], float] = "cosine",
        ignore: Iterable[str | int] = (),
        blocks: str | None = None,
        iterative: bool = False,
    ) -> None:
        if (n is None) == (ratio is None):
            raise InputError("BlockPrune takes n= or ratio= (one of them)")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InputError(f"BlockPrune n must be a positive number of blocks, got {n!r}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
            raise InputError(f"BlockPrune ratio must be a share of the blocks between 0 and 1, got {ratio!r}")
        if not callable(importance) and importance not in IMPORTANCES:
            raise InputError(
                f"BlockPrune importance must be one of {', '.join(IMPORTANCES)} or a callable loss(model), "
                f"got {importance!r}"
            )
        self.n, self.ratio, self.importance, self.blocks, self.iterative = n, ratio, importance, blocks, iterative
        self.ignore = list(ignore)
        for entry in self.ignore:
            if isinstance(entry, bool) or not isinstance(entry, (str, int)):
                raise InputError(f"BlockPrune ignore takes block names or positions, got {entry!r}")

    def __repr__(self) -> str:
        how = f"n={self.n}" if self.n is not None else f"ratio={self.ratio}"
        criterion = self.importance if isinstance(self.importance, str) else getattr(self.importance, "__name__", "")
        return f"BlockPrune({how}, importance={criterion!r}{', iterative=True' if self.iterative else ''})"

    def reads_calibration(self) -> bool:
        return isinstance(self.importance, str)

    def refusal(self, mode: str) -> str | None:
        if mode == STREAMED and self.importance != "cosine":
            return (
                "BlockPrune in a streamed plan (weights= a checkpoint) ranks blocks by importance='cosine' only: "
                "the other criteria run the whole model once per block"
            )
        if mode == STREAMED and self.blocks is not None:
            return "BlockPrune in a streamed plan removes the plan's own blocks: name them with gp.plan(blocks=...)"
        return super().refusal(mode)

    def call(self, state: Any) -> PassResult:
        """``state``: the torch frontend's, which answers ``remove_blocks`` besides the frontend protocol."""
        model = state.model
        example = state.captured.kwargs if state.captured.kwargs else state.captured.args
        data = state.calibration_data(repr(self)) if self.reads_calibration() else None
        runner = data if isinstance(data, Blocks) else None  # a streamed plan's: block by block
        found = survey(model, example, self.blocks, runner)
        ignored = self._ignored(found.path, found.count)
        candidates = [i for i in found.removable if i not in ignored]
        count = self.n if self.n is not None else round(self.ratio * found.count)
        if count < 1:
            raise InputError(f"BlockPrune ratio={self.ratio} of {found.count} blocks removes none")
        if count >= found.count:
            raise InputError(
                f"BlockPrune cannot remove {count} of the {found.count} blocks of {found.path}: one must stay"
            )
        if count > len(candidates):
            kept = "; ".join(f"{found.name(i)}: {why}" for i, why in found.kept.items())
            raise InputError(
                f"BlockPrune would remove {count} blocks of {found.path}, but only {len(candidates)} of its "
                f"{found.count} can go ({len(ignored)} ignored{'; kept: ' + kept if kept else ''})"
            )
        chosen: list[int] = []
        rounds = []
        while len(chosen) < count:
            left = [i for i in candidates if i not in chosen]
            scores = self._scores(state, data, found.path, left, chosen)
            rounds.append(", ".join(f"{i}: {scores[i]:.4g}" for i in sorted(scores)))
            take = 1 if self.iterative else count
            chosen += sorted(left, key=lambda i: (scores[i], i))[:take]
        removed = sorted(chosen)
        notes = state.remove_blocks(BlockRemoval(found.path, found.count, tuple(removed)))
        details: dict[str, Any] = {
            "removed": f"{', '.join(found.name(i) for i in removed)} ({count} of {found.count} blocks)",
            "importance": " | then ".join(rounds),
        }
        if self.iterative:
            details["order"] = ", ".join(found.name(i) for i in chosen)
        kinds = {found.removable[i] for i in removed}
        details["blocks"] = "; ".join(sorted(kinds))
        if found.kept:
            details["not removable"] = "; ".join(f"{found.name(i)}: {why}" for i, why in found.kept.items())
        if notes:
            details["renumbered"] = "; ".join(notes)
        return PassResult(state, True, details)

    def _ignored(self, path: str, count: int) -> set[int]:
        """The positions ``ignore`` names, each checked against the block list."""
        ignored = set()
        for entry in self.ignore:
            if isinstance(entry, int):
                if not -count <= entry < count:
                    raise InputError(f"BlockPrune ignore: position {entry} is outside the {count} blocks of {path}")
                ignored.add(entry % count)
                continue
            index = entry.removeprefix(path + ".")
            if not index.isdigit() or int(index) >= count:
                raise InputError(
                    f"BlockPrune ignore: {entry!r} is not a block of {path} ({path}.0 to {path}.{count - 1})"
                )
            ignored.add(int(index))
        return ignored

    def _scores(self, state: Any, data: Any, path: str, candidates: list[int], gone: list[int]) -> dict[int, float]:
        """The importance of each candidate block on the calibration ``data``, with the blocks at ``gone``
        bypassed."""
        model = state.model
        container = model.get_submodule(path)
        if callable(self.importance):
            return dict(zip(candidates, loss_without(model, container, self.importance, candidates, gone)))
        if self.importance == "cosine":
            if isinstance(data, Blocks):
                change = stream_change_by_block(data, model, gone)
            else:
                change = stream_change(model, container, data, gone)
            return {i: change[i] for i in candidates}
        return dict(zip(candidates, output_change(model, container, data, candidates, gone)))
