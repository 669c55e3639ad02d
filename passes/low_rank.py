"""LowRankCompensation: training-free low-rank paths for the error compression left (EoRA).

For every compressed linear layer (N:M masks, SparseGPT updates, channel pruning's re-fits), the error
against its weight in the model as given to the pipeline (cut to the channels kept) is factored in
the eigenspace of the layer's inputs over the calibration data
(:mod:`graphprune.algorithms.lowrank`), and its top components become two small dense linears in
parallel with the layer (:mod:`graphprune.frontends.torch.lowrank`).  The paths are never masked
or quantized: the pass runs after sparsity and pruning and before ``Quantize`` (which keeps the
paths in float), and nothing that changes weights may follow it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from graphprune.algorithms.lowrank import Spectrum, allocate, spectrum
from graphprune.algorithms.nm import to_matrix
from graphprune.algorithms.sparsegpt import hessians_of
from graphprune.core.pipeline import MODULE, Pass, PassResult, Stage
from graphprune.errors import InputError


class LowRankCompensation(Pass):
    """Add a low-rank path beside every compressed linear layer, fitted to its calibration error.

    Args:
        rank: components per layer: one int for every layer, or a mapping of layer (module) names
            to ranks (layers not named get no path).
        budget: instead of ``rank``, the number of parameters to add in all: components are taken
            across layers in order of the calibration error each removes per parameter it adds.
        ignore: module names (or prefixes) that get no path.
    """

    modes = frozenset({MODULE})
    accepts = frozenset({Stage.STRUCTURED, Stage.MASKED})
    produces = Stage.COMPENSATED

    def __init__(
        self, rank: int | Mapping[str, int] | None = None, *, budget: int | None = None, ignore: Iterable[str] = ()
    ) -> None:
        if (rank is None) == (budget is None):
            raise InputError("LowRankCompensation takes rank= or budget= (one of them)")
        ranks = rank.values() if isinstance(rank, Mapping) else [] if rank is None else [rank]
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise InputError(f"LowRankCompensation rank must be a positive int, got {r!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise InputError(f"LowRankCompensation budget must be a positive number of parameters, got {budget!r}")
        self.rank, self.budget = (dict(rank) if isinstance(rank, Mapping) else rank), budget
        self.ignore = list(ignore)

    def __repr__(self) -> str:
        how = f"budget={self.budget}" if self.budget is not None else f"rank={self.rank!r}"
        return f"LowRankCompensation({how})"

    def reads_calibration(self) -> bool:
        return True

    def reads_dense_weights(self) -> bool:
        return True

    def call(self, state: Any) -> PassResult:
        """``state``: the torch frontend's, which answers ``dense_weight``, ``low_rank_refusal`` and
        ``add_low_rank_paths`` besides the frontend protocol."""
        named = list(self.rank) if isinstance(self.rank, dict) else []
        state.check_names(self.ignore, "LowRankCompensation ignore")
        state.check_names(named, "LowRankCompensation rank")
        candidates, skipped = state.weight_layers()
        errors = {}
        for layer in candidates:
            if layer.within(self.ignore):
                skipped[layer.weight] = "ignored"
            elif named and layer.module not in named:
                skipped[layer.weight] = "no rank given"
            elif (why := state.low_rank_refusal(layer)) is not None:
                skipped[layer.weight] = why
            elif not (error := to_matrix(state.dense_weight(layer) - state.weight(layer), layer.layout)).any():
                skipped[layer.weight] = "unchanged by compression"
            else:
                errors[layer] = error
        if unknown := sorted(set(named) - {layer.module for layer in candidates}):
            raise InputError(f"LowRankCompensation rank names modules that are not linear layers: {', '.join(unknown)}")
        calibration = state.calibration_data(repr(self))
        hessians = hessians_of(state, list(errors), calibration, "float64")
        spectra = {layer: spectrum(error, hessians[layer.weight][0]) for layer, error in errors.items()}
        ranks = self._ranks(spectra)
        paths = {layer: spectra[layer].factors(r) for layer, r in ranks.items() if r}
        if paths:
            state.add_low_rank_paths(paths)
        before = sum(s.remaining(0) for s in spectra.values())
        after = sum(s.remaining(ranks[layer]) for layer, s in spectra.items())
        added = sum(down.numel() + up.numel() for down, up in paths.values())
        details: dict[str, Any] = {
            "paths": f"{len(paths)} layers, ranks {_ranks_shown(ranks)}, {added} parameters added",
            "calibration error": f"{after / before - 1 if before else 0.0:+.1%} ({before:.4g} to {after:.4g})",
        }
        if skipped:
            details["layers without a path"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        return PassResult(state, bool(paths), details)

    def _ranks(self, spectra: dict[Any, Spectrum]) -> dict[Any, int]:
        """The rank of each layer's path: as given (checked against the layer), or from the budget."""
        if self.budget is not None:
            costs = {layer: s.left.shape[0] + s.right.shape[1] for layer, s in spectra.items()}
            return allocate(spectra, costs, self.budget)
        ranks = {}
        for layer, s in spectra.items():
            rank = self.rank[layer.module] if isinstance(self.rank, dict) else self.rank
            out, features = s.left.shape[0], s.right.shape[1]
            if rank > min(out, features):
                raise InputError(
                    f"LowRankCompensation rank {rank} is larger than {layer.module} ({out}x{features}) allows: at "
                    f"most {min(out, features)}; give that layer a smaller rank (rank={{name: r}}) or ignore it"
                )
            ranks[layer] = min(rank, len(s.values))
        return ranks


def _ranks_shown(ranks: dict[Any, int]) -> str:
    """``4-32`` or ``16``: the range of the ranks given."""
    given = [r for r in ranks.values() if r]
    if not given:
        return "none"
    low, high = min(given), max(given)
    return str(low) if low == high else f"{low}-{high}"
