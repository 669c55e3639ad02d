"""SparseGPT and GPTQ in one sweep over the calibration data (the SparseGPT paper's joint variant).

``[NMSparsity(n, m, method="sparsegpt"), Quantize(dtype, method="gptq")]`` back to back read each
layer's inputs twice, once per pass; :func:`joint` (the pass manager's fusion rule) runs them as
one pass instead: block by block through the calibration engine, each group of layers reading one
activation gets its Hessian from the model as already pruned *and quantized* upstream, factored
once; SparseGPT chooses each layer's mask and weights with that factor, GPTQ rounds the kept
weights with the same factor (the pruned ones stay zero), and the group is quantized before the
next group's inputs are read.  The report shows one row with both passes' details.

Fused only where the two passes would factor the same Hessian the same way: SparseGPT without
``refine``, ``permute`` or learned masks, equal ``damp`` and ``precision``, on a model in memory.
"""

from __future__ import annotations

from typing import Any

import torch

from graphprune.algorithms.nm import NMPattern
from graphprune.algorithms.number_formats import WEIGHT_ONLY
from graphprune.algorithms.quant import QuantPlan
from graphprune.algorithms.sparsegpt import factored, layer_hessians, prune_layer
from graphprune.core.frontend import Frontend
from graphprune.core.layers import WeightLayer, by_input
from graphprune.core.pipeline import MODULE, Pass, PassResult, Stage
from graphprune.passes.nm_sparsity import NMSparsity
from graphprune.passes.quantize import Quantize


class SparseGPTQ(Pass):
    """``sparsity`` (SparseGPT) and ``quantize`` (GPTQ) in one sweep; see the module doc."""

    modes = frozenset({MODULE})
    accepts = NMSparsity.accepts
    experimental = NMSparsity.experimental
    produces = Stage.QUANTIZED

    def __init__(self, sparsity: NMSparsity, quantize: Quantize) -> None:
        self.sparsity, self.quantize = sparsity, quantize

    def __repr__(self) -> str:
        return f"SparseGPTQ({self.sparsity!r}, {self.quantize!r})"

    def refusal(self, mode: str) -> str | None:
        return self.sparsity.refusal(mode) or self.quantize.refusal(mode) or super().refusal(mode)

    def reads_calibration(self) -> bool:
        return True

    def call(self, state: Frontend[Any]) -> PassResult:
        sparsity, quantize = self.sparsity, self.quantize
        if quantize.dtype not in WEIGHT_ONLY:
            state.single_process_only(f"{quantize!r}'s calibration of activation ranges")
        masked, dense = sparsity.selected(state)
        quantized, floating = quantize.selected(state)
        calibration = state.calibration_data(repr(self))
        for layer in quantized:
            state.weight(layer)  # real weights, or refused before anything changes
        quantized, folded = state.prepare_quantization(quantized)
        to_mask = {layer.weight for layer in masked}
        to_quantize = {layer.weight: layer for layer in quantized}
        chosen = {layer.weight: layer for layer in [*masked, *quantized]}
        carried = [QuantPlan(kind=quantize.dtype)]
        between: dict[str, str] = {}  # layers the block-by-block runner leaves out, with the reason
        with state.writing():
            visited, calibrated = state.sequential(
                list(chosen.values()),
                calibration,
                lambda part, data: carried.extend(self._part(state, part, data, to_mask, to_quantize)),
                between,
            )
        dense.update({k: v for k, v in between.items() if k in to_mask})
        floating.update({k: v for k, v in between.items() if k in to_quantize})
        state.plans.append(carried[-1])
        done = {layer.weight for layer in visited}
        details: dict[str, Any] = {
            "pattern": f"{sparsity.n}:{sparsity.m} (sparsegpt)",
            "masked layers": len(to_mask & done),
            "format": quantize.format_details(),
            "quantized layers": len(set(to_quantize) & done),
            "sweeps": "one: each layer's Hessian factored once for SparseGPT and GPTQ",
            "calibration": calibrated,
        }
        if folded:
            details["folded BatchNorm"] = folded
        if dense:
            details["dense layers"] = "; ".join(f"{k}: {v}" for k, v in dense.items())
        if floating:
            details["float layers"] = "; ".join(f"{k}: {v}" for k, v in floating.items())
        return PassResult(state, bool(done), details)

    def _part(
        self,
        state: Frontend[Any],
        layers: list[WeightLayer],
        calibration: Any,
        to_mask: set[str],
        to_quantize: dict[str, WeightLayer],
    ) -> list[QuantPlan]:
        """One part of the model, group by group: prune, round, quantize; the plans written."""
        sparsity, quantize = self.sparsity, self.quantize
        plans = []
        for group in by_input(layers):
            factors, _ = factored(
                lambda p, first=group[0]: layer_hessians(state, first, calibration, p),
                damp=sparsity.damp,
                precision=sparsity.precision,
            )
            values: dict[str, torch.Tensor] = {}
            scales: dict[str, torch.Tensor] = {}
            for layer in group:
                if layer.weight in to_mask:
                    pattern = NMPattern(sparsity.n, sparsity.m, layer.layout)
                    new, keep = prune_layer(state.weight(layer), layer.layout, factors, pattern, block=sparsity.block)
                    state.write_nm(layer, keep, pattern, values=new)
                if layer.weight in to_quantize:
                    values[layer.weight], scales[layer.weight] = quantize.round_layer(state, layer, factors)
            rounded = [to_quantize[name] for name in values]
            if rounded:
                plans.append(
                    quantize.quantize_layers(
                        state,
                        rounded,
                        calibration,
                        weight=lambda layer: values[layer.weight],
                        scales=scales,
                        values=values,
                    )
                )
        return plans


def joint(first: Pass, second: Pass) -> Pass | None:
    """The pass manager's fusion rule: :class:`SparseGPTQ` for SparseGPT followed by GPTQ where they
    would factor the same Hessians the same way, else None."""
    if not (isinstance(first, NMSparsity) and isinstance(second, Quantize)):
        return None
    if first.method != "sparsegpt" or first.refine or first.permute or second.method != "gptq":
        return None
    if (first.damp, first.precision) != (second.damp, second.precision):
        return None
    return SparseGPTQ(first, second)
