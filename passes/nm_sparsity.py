"""NMSparsity: N:M semi-structured sparsity masks on linear, Conv1D and conv weights.

Which weights: every layer that multiplies an activation by a parameter weight (found in the
captured graph), except those named in ``ignore`` and, by default, what one-shot pruning
usually leaves dense: the first convolution (it reads the model input) and output heads (their
outputs reach the model outputs).  Weights whose reduction width cannot hold the pattern are
skipped; every skip is reported with its reason.

Criteria: ``magnitude`` (|W|); ``wanda`` (|W| times the RMS of the matching input channel over
calibration batches, Sun et al. 2023); ``sparsegpt`` (second-order mask choice and weight update,
:mod:`graphprune.algorithms.sparsegpt`), layer by layer in graph order with each layer's inputs taken from the
already-sparsified model (layers that read the same activation share one Hessian).  ``refine=True``
then improves every layer's masks on the same Hessians (:mod:`graphprune.algorithms.refine`): swaps
inside each group of ``m`` that lower the layer's calibration error, and for SparseGPT a re-fit of the
kept weights; a layer's error never rises.

The pass is written once against :class:`graphprune.core.frontend.Frontend`: on a torch model
masks are parametrizations, so fine-tuning cannot revive pruned weights
(:func:`graphprune.algorithms.nm.finalize` bakes them in); in a streamed plan they go to the plan,
SparseGPT running block by block; on an ONNX graph they are exact zeros in the initializers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from graphprune.algorithms.moments import input_moments
from graphprune.algorithms.nm import CONV, NMPattern, fits, nm_mask, per_input_channel, to_matrix
from graphprune.algorithms.permutation import retained, search
from graphprune.algorithms.refine import NOTHING, Refinement, refine_layer
from graphprune.algorithms.sparsegpt import PRECISIONS, layer_hessians, sparsegpt_layers
from graphprune.core.frontend import Frontend
from graphprune.core.groups import Analysis
from graphprune.core.layers import WeightLayer, by_input
from graphprune.core.pipeline import MODULE, ONNX, STREAMED, Pass, PassResult, Stage
from graphprune.errors import InputError

METHODS = ("magnitude", "wanda", "sparsegpt", "learned")


class NMSparsity(Pass):
    """Keep ``n`` of every ``m`` consecutive weights along each layer's reduction dim.

    Args:
        n, m: the pattern (2:4 by default; any 0 < n < m, e.g. 1:4, 4:8, 2:8).
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"`` (the last two need ``calibration=``), or
            ``"learned"``: the ``prior`` criterion's masks, with the dense weights kept underneath
            (not zeroed, no SparseGPT update) so that :class:`graphprune.train.LearnedMasks` can learn
            the masks from there.
        prior: the criterion that initialises learned masks.
        learned_weights: what learned masks start over: ``"dense"`` (the dense weights, default) or
            ``"prior"`` (SparseGPT's updated weights where its masks keep, the dense ones elsewhere;
            ``prior="sparsegpt"`` only).
        block, damp: SparseGPT's column block size and Hessian damping (fraction of its mean diagonal).
        precision: ``"float32"`` (default) or ``"float64"``: what SparseGPT (and ``refine``) accumulates
            and solves its Hessians in; a float32 solve whose Cholesky factorisation fails is retried in
            float64 (reported).
        refine: after the method chooses each layer's masks, swap weights inside groups of ``m`` while
            a swap lowers the layer's output error on the calibration inputs (exact, from the Hessian
            of its inputs), and for SparseGPT solve the kept weights again; needs ``calibration=``,
            runs layer by layer like SparseGPT, and reports the error before and after.  Learned
            masks start from the refined prior.
        permute: before masking, permute each channel group (through every tensor that indexes it,
            so the model's function is unchanged) to retain more magnitude under the pattern;
            ``permute_sweeps`` sets the search effort per group (:mod:`graphprune.algorithms.permutation`).
        ignore: module names (or prefixes) left dense.
        dense_first_conv: leave convolutions that read the model input dense.
        dense_heads: leave layers whose outputs reach the model outputs dense.
    """

    modes = frozenset({MODULE, STREAMED, ONNX})
    accepts = frozenset({Stage.DENSE, Stage.STRUCTURED})
    experimental = {
        Stage.QUANTIZED: "sparsity after quantization is refused because quantization scales distort "
        "the magnitude ranking sparsity criteria use and the two errors compound (Harma et al., "
        "'Effective Interplay between Sparsity and Quantization', ICLR 2025); put NMSparsity "
        "before Quantize"
    }
    produces = Stage.MASKED

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        *,
        method: str = "magnitude",
        prior: str = "magnitude",
        ignore: Iterable[str] = (),
        dense_first_conv: bool = True,
        dense_heads: bool = True,
        block: int = 128,
        damp: float = 0.01,
        permute: bool = False,
        permute_sweeps: int = 4,
        precision: str = "float32",
        refine: bool = False,
        learned_weights: str = "dense",
    ) -> None:
        NMPattern(n, m, "linear")  # validates n and m
        if method not in METHODS:
            raise InputError(f"NMSparsity method must be one of {list(METHODS)}, got {method!r}")
        if not 0 <= damp < 1 or block < m:
            raise InputError(f"NMSparsity needs 0 <= damp < 1 and block >= m, got damp={damp}, block={block}")
        if precision not in PRECISIONS:
            raise InputError(f"NMSparsity precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if prior not in METHODS[:3]:
            raise InputError(f"NMSparsity prior must be one of {list(METHODS[:3])}, got {prior!r}")
        self.n, self.m, self.method, self.block, self.damp = n, m, method, block, damp
        self.criterion = prior if method == "learned" else method  # what chooses the (initial) masks
        self.prior = prior
        self.permute, self.permute_sweeps = permute, permute_sweeps
        self.precision = precision
        if not isinstance(refine, bool):
            raise InputError(f"NMSparsity refine must be True or False, got {refine!r}")
        self.refine = refine
        if learned_weights not in ("dense", "prior"):
            raise InputError(f"NMSparsity learned_weights must be 'dense' or 'prior', got {learned_weights!r}")
        if learned_weights == "prior" and (method != "learned" or prior != "sparsegpt"):
            raise InputError(
                "NMSparsity learned_weights='prior' starts learned masks over SparseGPT's updated weights: it needs "
                f"method='learned' and prior='sparsegpt', got method={method!r}, prior={prior!r}"
            )
        self.learned_weights = learned_weights
        self.ignore = list(ignore)
        self.dense_first_conv, self.dense_heads = dense_first_conv, dense_heads

    def __repr__(self) -> str:
        prior = f", prior={self.prior!r}" if self.method == "learned" else ""
        prior += ", learned_weights='prior'" if self.learned_weights == "prior" else ""
        refine = ", refine=True" if self.refine else ""
        return f"NMSparsity({self.n}:{self.m}, method={self.method!r}{prior}{refine})"

    def refusal(self, mode: str) -> str | None:
        if mode == STREAMED and (self.method == "learned" or self.permute):
            return (
                f"NMSparsity({'permute=True' if self.permute else 'method=learned'}) changes weights of "
                "the whole model in memory, which a streamed plan never builds: use method='magnitude', "
                "'wanda' or 'sparsegpt'"
            )
        if mode == ONNX and self.method == "learned":
            return (
                "NMSparsity(method='learned') keeps dense weights under trainable masks, which an ONNX "
                "model cannot hold: use method='magnitude', 'wanda' or 'sparsegpt'"
            )
        return None

    def requires(self, state: Any) -> None:
        super().requires(state)
        if state.mode == ONNX and state.stage is Stage.QUANTIZED:
            raise InputError(
                "on ONNX models NMSparsity cannot run after Quantize, even experimentally: the weights "
                "are int8 initializers behind DequantizeLinear by then"
            )

    def reads_calibration(self) -> bool:
        return self.criterion != "magnitude" or self.refine

    def selected(self, state: Frontend[Any]) -> tuple[list[WeightLayer], dict[str, str]]:
        """The layers to mask, and the skipped ones with the reason."""
        state.check_names(self.ignore, "NMSparsity ignore")
        candidates, skipped = state.weight_layers()
        heads = state.output_heads(candidates) if self.dense_heads else set()
        chosen = []
        for layer in candidates:
            shape = state.weight_shape(layer)
            if layer.grouped and shape[1] == 1:
                skipped[layer.weight] = "depthwise convolution (one input channel per filter)"
            elif layer.within(self.ignore):
                skipped[layer.weight] = "ignored"
            elif self.dense_first_conv and layer.layout == CONV and state.reads_model_input(layer):
                skipped[layer.weight] = "first convolution (reads the model input); dense_first_conv=False to mask it"
            elif layer.weight in heads:
                skipped[layer.weight] = "output head; dense_heads=False to mask it"
            elif (why := fits(torch.empty(shape, device="meta"), NMPattern(self.n, self.m, layer.layout))) is not None:
                skipped[layer.weight] = why
            elif self.criterion == "sparsegpt" and layer.layout == CONV and state.conv_window(layer) is None:
                skipped[layer.weight] = (
                    "SparseGPT handles 1-D and 2-D convolutions with zero padding; this one stays dense"
                )
            else:
                chosen.append(layer)
        return chosen, skipped

    def call(self, state: Frontend[Any]) -> PassResult:
        layers, skipped = self.selected(state)
        calibration = state.calibration_data(repr(self)) if self.reads_calibration() else None
        gains: dict[str, str] = {}
        calibrated = ""
        retried: list[str] = []
        refined: list[Refinement] = []
        with state.writing():
            if self.criterion == "sparsegpt":
                if self.permute:
                    gains = self._permute_groups(state, layers, {})
                layers, calibrated = state.sequential(
                    layers,
                    calibration,
                    lambda part, data: retried.extend(self._sparsegpt(state, part, data, refined)),
                    skipped,
                )
            elif self.refine:
                rms = self._rms(state, layers, calibration)
                if self.permute:
                    gains = self._permute_groups(state, layers, rms)
                    if gains and rms:
                        rms = self._rms(state, layers, calibration)
                layers, calibrated = state.sequential(
                    layers, calibration, lambda part, data: self._refined(state, part, data, rms, refined), skipped
                )
            else:
                rms = self._rms(state, layers, calibration)
                if self.permute:
                    gains = self._permute_groups(state, layers, rms)
                    if gains and rms:  # the input channels moved: their statistics must be read in the new order
                        rms = self._rms(state, layers, calibration)
                for layer in layers:
                    pattern = NMPattern(self.n, self.m, layer.layout)
                    keep = nm_mask(_scores(state.weight(layer), layer, rms), pattern)
                    state.write_nm(layer, keep, pattern, zero_pruned=self.method != "learned")
        how = f"learned, {self.prior} prior" if self.method == "learned" else self.method
        details = {"pattern": f"{self.n}:{self.m} ({how})", "masked layers": len(layers)}
        if calibrated:
            details["calibration"] = calibrated
        if self.refine:
            details["refinement"] = _refinement(sum(refined, NOTHING), len(refined))
        if retried:
            details["float64 retries"] = (
                f"{len(retried)} layers without a float32 Cholesky factor: {', '.join(retried)}"
            )
        if self.permute:
            details["permutations"] = "; ".join(f"{k}: {v}" for k, v in gains.items()) or "none retained more"
        if skipped:
            details["dense layers"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        return PassResult(state, bool(layers), details)

    def _rms(self, state: Frontend[Any], layers: list[WeightLayer], calibration: Any) -> dict[str, torch.Tensor]:
        """Wanda's statistic: the RMS of each layer's input channels, by weight name."""
        if self.criterion != "wanda":
            return {}
        return {name: mean_sq.sqrt() for name, (_, mean_sq) in input_moments(state, layers, calibration).items()}

    def _permute_groups(
        self, state: Frontend[Any], layers: list[WeightLayer], rms: dict[str, torch.Tensor]
    ) -> dict[str, str]:
        """Permute every channel group that masked layers reduce over; returns the gain per group."""
        analysis = state.analysis()
        gains = {}
        for group in tqdm(analysis.groups, desc="permutations", unit="group", disable=None):
            if group.size % self.m:
                continue
            blocks = [
                b for layer in layers if (b := _reduction_block(state, analysis, layer, group.leaf, rms)) is not None
            ]
            if not blocks:
                continue
            scores = torch.cat(blocks)
            order = search(scores, self.n, self.m, sweeps=self.permute_sweeps)
            before, after = (retained(scores, o, self.n, self.m) for o in (torch.arange(group.size), order))
            if after <= before:
                continue
            if not state.permute_channels(group.leaf, order):
                gains[f"group {group.id}"] = "skipped: permuting changed the outputs"
                continue
            gains[f"group {group.id} ({group.size} ch)"] = f"+{after / before - 1:.2%} retained"
        return gains

    def _sparsegpt(
        self, state: Frontend[Any], layers: list[WeightLayer], calibration: Any, refined: list[Refinement]
    ) -> list[str]:
        """:func:`~graphprune.algorithms.sparsegpt.sparsegpt_layers` on one part of the model, each
        layer's inputs read from the model as already sparsified upstream; linear layers reading one
        activation share its Hessian (convs see it through their own patch geometry).  Learned masks
        start from the dense weights: the new values are not written.  Returns the layers whose solve
        was retried in float64."""

        def refine(
            layer: WeightLayer, dense: torch.Tensor, new: torch.Tensor, keep: torch.Tensor, hessians: list
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self._refine_layer(layer, dense, new, keep, hessians, refined)

        return sparsegpt_layers(
            by_input(layers),
            lambda layer, precision: layer_hessians(state, layer, calibration, precision),
            state.weight,
            lambda layer, new, keep: self._write(
                state, layer, new, keep, dense=state.weight(layer) if self.learned_weights == "prior" else None
            ),
            lambda layer: NMPattern(self.n, self.m, layer.layout),
            block=self.block,
            damp=self.damp,
            precision=self.precision,
            refine=refine if self.refine else None,
        )

    def _refined(
        self,
        state: Frontend[Any],
        layers: list[WeightLayer],
        calibration: Any,
        rms: dict[str, torch.Tensor],
        refined: list[Refinement],
    ) -> None:
        """Magnitude or Wanda masks on one part of the model, refined on Hessians read from the model
        as already sparsified upstream (the masks the method alone would choose are the start)."""
        for group in by_input(layers):
            hessians = layer_hessians(state, group[0], calibration, self.precision)
            for layer in group:
                dense = state.weight(layer)
                keep = nm_mask(_scores(dense, layer, rms), NMPattern(self.n, self.m, layer.layout))
                new, keep = self._refine_layer(layer, dense, dense * keep, keep, hessians, refined)
                self._write(state, layer, new, keep)

    def _refine_layer(
        self,
        layer: WeightLayer,
        dense: torch.Tensor,
        new: torch.Tensor,
        keep: torch.Tensor,
        hessians: list[torch.Tensor],
        refined: list[Refinement],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`~graphprune.algorithms.refine.refine_layer`: kept weights are solved for only where
        SparseGPT's values will be written (learned masks over the dense weights are refined as masks)."""
        refit = self.criterion == "sparsegpt" and (self.method != "learned" or self.learned_weights == "prior")
        pattern = NMPattern(self.n, self.m, layer.layout)
        new, keep, done = refine_layer(dense, new, keep, layer.layout, hessians, pattern, refit=refit, damp=self.damp)
        refined.append(done)
        return new, keep

    def _write(
        self,
        state: Frontend[Any],
        layer: WeightLayer,
        new: torch.Tensor,
        keep: torch.Tensor,
        dense: torch.Tensor | None = None,
    ) -> None:
        """The masks, and SparseGPT's new values; learned masks keep the dense weights underneath, or
        with ``learned_weights="prior"`` SparseGPT's values where it keeps and the ``dense`` ones
        elsewhere."""
        learned = self.method == "learned"
        values = new if self.criterion == "sparsegpt" and not learned else None
        if learned and self.learned_weights == "prior" and dense is not None:
            values = torch.where(keep, new.to(dense.dtype), dense)
        state.write_nm(layer, keep, NMPattern(self.n, self.m, layer.layout), values=values, zero_pruned=not learned)


def _refinement(total: Refinement, layers: int) -> str:
    """The report line: the summed calibration error of the refined layers, before and after."""
    change = total.after / total.before - 1 if total.before > 0 else 0.0
    restored = f", {total.restored} rows kept as they were" if total.restored else ""
    return (
        f"calibration error {change:+.1%} over {layers} layers "
        f"({total.before:.4g} to {total.after:.4g}; {total.swaps} swaps{restored})"
    )


def _reduction_block(
    state: Frontend[Any], analysis: Analysis, layer: WeightLayer, leaf: int, rms: dict[str, torch.Tensor]
) -> torch.Tensor | None:
    """The layer's scores as ``[rows, |leaf|]`` when ``leaf`` is the innermost factor of its
    reduction (so the N:M groups run inside it), else None."""
    dims = analysis.tensors[layer.weight][1]
    if layer.grouped:
        return None
    atom = dims[layer.nm_axis]
    spaces = analysis.spaces
    leaves = spaces.leaves(atom)
    if not leaves or leaves[-1] != leaf or leaves.count(leaf) != 1 or spaces.cofactor(atom, leaf) is None:
        return None
    return to_matrix(_scores(state.weight(layer), layer, rms), layer.layout).reshape(-1, spaces.solver.size(leaf))


def _scores(weight: torch.Tensor, layer: WeightLayer, rms: dict[str, torch.Tensor]) -> torch.Tensor:
    """|W| (magnitude), times the RMS of the matching input channel when statistics exist (Wanda)."""
    weight = weight.detach()
    scores = weight.abs().float()
    if layer.weight in rms:
        scores = scores * per_input_channel(rms[layer.weight], layer.layout, layer.groups, weight.shape).to(scores)
    return scores
