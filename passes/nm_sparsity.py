"""NMSparsity: N:M semi-structured sparsity masks on linear, Conv1D and conv weights.

Which weights: every layer that multiplies an activation by a parameter weight (found in the
captured graph), except those named in ``ignore`` and, by default, what one-shot pruning
usually leaves dense: the first convolution (it reads the model input) and output heads (their
outputs reach the model outputs).  Weights whose reduction width cannot hold the pattern are
skipped; every skip is reported with its reason.

Criteria: ``magnitude`` (|W|); ``wanda`` (|W| times the RMS of the matching input channel over
calibration batches, Sun et al. 2023); ``sparsegpt`` (second-order mask choice and weight update,
:mod:`graphprune.algorithms.sparsegpt`), layer by layer in graph order with each layer's inputs taken from the
already-sparsified model (layers that read the same activation share one Hessian).  Masks are
attached as parametrizations, so fine-tuning cannot revive pruned weights;
:func:`graphprune.algorithms.nm.finalize` bakes them in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from graphprune.algorithms.nm import CONV, CONV1D, NMPattern, fits, nm_mask, per_input_channel, to_matrix
from graphprune.algorithms.permutation import retained, search
from graphprune.algorithms.sparsegpt import ConvGeometry, HessianSum, sparsegpt_layers
from graphprune.core.groups import Analysis
from graphprune.core.layers import output_heads
from graphprune.core.pipeline import MODULE, STREAMED, Pass, PassResult, Stage
from graphprune.errors import InputError
from graphprune.frontends.torch.calibration import (
    Calibration,
    Consumer,
    Runner,
    batches,
    check_input,
    consumers,
    input_rms,
    run_batches,
)
from graphprune.frontends.torch.capture import run_outputs, tensor_at
from graphprune.frontends.torch.distributed import reduce_sum
from graphprune.frontends.torch.masks import attach, stored
from graphprune.frontends.torch.state import CompressionState
from graphprune.frontends.torch.streaming import AFTER, BEFORE

if TYPE_CHECKING:
    from graphprune.frontends.onnx.state import OnnxState
    from graphprune.frontends.torch.streaming import Stream

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
        block, damp: SparseGPT's column block size and Hessian damping (fraction of its mean diagonal).
        permute: before masking, permute each channel group (through every tensor that indexes it,
            so the model's function is unchanged) to retain more magnitude under the pattern;
            ``permute_sweeps`` sets the search effort per group (:mod:`graphprune.algorithms.permutation`).
        ignore: module names (or prefixes) left dense.
        dense_first_conv: leave convolutions that read the model input dense.
        dense_heads: leave layers whose outputs reach the model outputs dense.
    """

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
    ) -> None:
        NMPattern(n, m, "linear")  # validates n and m
        if method not in METHODS:
            raise InputError(f"NMSparsity method must be one of {list(METHODS)}, got {method!r}")
        if not 0 <= damp < 1 or block < m:
            raise InputError(f"NMSparsity needs 0 <= damp < 1 and block >= m, got damp={damp}, block={block}")
        if prior not in METHODS[:3]:
            raise InputError(f"NMSparsity prior must be one of {list(METHODS[:3])}, got {prior!r}")
        self.n, self.m, self.method, self.block, self.damp = n, m, method, block, damp
        self.criterion = prior if method == "learned" else method  # what chooses the (initial) masks
        self.prior = prior
        self.permute, self.permute_sweeps = permute, permute_sweeps
        self.ignore = list(ignore)
        self.dense_first_conv, self.dense_heads = dense_first_conv, dense_heads

    def __repr__(self) -> str:
        prior = f", prior={self.prior!r}" if self.method == "learned" else ""
        return f"NMSparsity({self.n}:{self.m}, method={self.method!r}{prior})"

    def refusal(self, mode: str) -> str | None:
        if mode == MODULE or not (self.method == "learned" or self.permute):
            return None
        if mode == STREAMED:
            return (
                f"NMSparsity({'permute=True' if self.permute else 'method=learned'}) changes weights of "
                "the whole model in memory, which a streamed plan never builds: use method='magnitude', "
                "'wanda' or 'sparsegpt'"
            )
        return (
            f"NMSparsity(method={self.method!r}{', permute=True' if self.permute else ''}) does not "
            "run on ONNX models yet: use method='magnitude', 'wanda' or 'sparsegpt'"
        )

    def selected(self, analysis: Analysis, model: nn.Module) -> tuple[list[Consumer], dict[str, str]]:
        """The layers to mask, and the skipped ones with the reason."""
        names = dict(model.named_modules())
        for name in self.ignore:
            if name not in names:
                raise InputError(f"NMSparsity ignore: no module named {name!r} in {type(model).__name__}")
        inputs = set(analysis.captured.user_inputs)
        layers = consumers(analysis)
        heads = _heads(analysis, layers)
        chosen, skipped = [], {}
        for layer in layers:
            weight = tensor_at(model, layer.weight)
            pattern = NMPattern(self.n, self.m, layer.layout)
            if layer.layout == CONV and layer.groups > 1 and weight.shape[1] == 1:
                skipped[layer.weight] = "depthwise convolution (one input channel per filter)"
            elif any(layer.module == i or layer.module.startswith(i + ".") for i in self.ignore):
                skipped[layer.weight] = "ignored"
            elif self.dense_first_conv and layer.layout == CONV and layer.node.args[0] in inputs:
                skipped[layer.weight] = "first convolution (reads the model input); dense_first_conv=False to mask it"
            elif self.dense_heads and layer.node in heads:
                skipped[layer.weight] = "output head; dense_heads=False to mask it"
            elif (why := fits(weight, pattern)) is not None:
                skipped[layer.weight] = why
            elif self.criterion == "sparsegpt" and weight.dim() > 4:
                skipped[layer.weight] = "SparseGPT handles 1-D and 2-D convolutions; this 3-D one stays dense"
            else:
                chosen.append(layer)
        return list({c.weight: c for c in chosen}.values()), skipped

    def call(self, state: CompressionState) -> PassResult:
        analysis, model = state.analysis(), state.model
        layers, skipped = self.selected(analysis, model)
        calibration = (
            batches(state.calibration, f"NMSparsity(method={self.method!r})") if self.criterion != "magnitude" else None
        )
        if state.stream is not None:
            layers = self._streamed(state.stream, model, layers, skipped, calibration)
            gains: dict[str, str] = {}
        else:
            for layer in layers:
                if tensor_at(model, layer.weight).device.type == "meta":
                    raise InputError(
                        f"{layer.weight} is on the meta device: N:M masks need real weights (or plan "
                        "with gp.plan(..., weights=checkpoint), which reads them from the checkpoint)"
                    )
            rms = input_rms(model, layers, calibration) if self.criterion == "wanda" else {}
            gains = self._permute_groups(state, analysis, layers, rms) if self.permute else {}
            if gains and rms:  # the input channels moved: their statistics must be read in the new order
                rms = input_rms(model, layers, calibration)
            if self.criterion == "sparsegpt":
                self._sparsegpt(model, layers, calibration)
                if self.method != "learned":
                    state.updated |= {layer.weight for layer in layers}
            else:
                for layer in layers:
                    owner, attr = _owner(model, layer)
                    pattern = NMPattern(self.n, self.m, layer.layout)
                    attach(
                        owner,
                        attr,
                        nm_mask(_scores(tensor_at(model, layer.weight), layer, rms), pattern),
                        pattern,
                        zero_pruned=self.method != "learned",
                    )
        how = f"learned, {self.prior} prior" if self.method == "learned" else self.method
        details = {"pattern": f"{self.n}:{self.m} ({how})", "masked layers": len(layers)}
        if self.permute:
            details["permutations"] = "; ".join(f"{k}: {v}" for k, v in gains.items()) or "none retained more"
        if skipped:
            details["dense layers"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        return PassResult(state, bool(layers), details)

    def call_onnx(self, state: OnnxState) -> PassResult:
        """Magnitude or Wanda masks on the weight initializers (:mod:`graphprune.frontends.onnx.sparsity`),
        Wanda's statistics read from onnxruntime on the calibration feeds."""
        from graphprune.frontends.onnx import layers as onnx_layers
        from graphprune.frontends.onnx import sparsity as onnx_sparsity
        from graphprune.frontends.onnx.capture import owner_names, tensor_of
        from graphprune.frontends.onnx.state import MaskedWeight

        if state.stage is Stage.QUANTIZED:
            raise InputError(
                "on ONNX models NMSparsity cannot run after Quantize, even experimentally: the weights "
                "are int8 initializers behind DequantizeLinear by then"
            )
        model = state.capture.model
        owners = owner_names(model.graph.initializers)
        for name in self.ignore:
            if name not in owners:
                raise InputError(f"NMSparsity ignore: no module named {name!r} in the ONNX model's initializer names")
        candidates, skipped = onnx_layers.weight_layers(model)
        nodes = {node.name: node for node in model.graph}
        heads = onnx_layers.head_layers(model, candidates) if self.dense_heads else set()
        layers = []
        for layer in candidates:
            owner = layer.weight.rpartition(".")[0]
            if layer.grouped and tensor_of(model.graph.initializers[layer.weight]).shape[1] == 1:
                skipped[layer.weight] = "depthwise convolution (one input channel per filter)"
            elif any(owner == i or owner.startswith(i + ".") for i in self.ignore):
                skipped[layer.weight] = "ignored"
            elif self.dense_first_conv and layer.layout == CONV and onnx_layers.reads_model_input(model, layer):
                skipped[layer.weight] = "first convolution (reads the model input); dense_first_conv=False to mask it"
            elif layer.node in heads:
                skipped[layer.weight] = "output head; dense_heads=False to mask it"
            elif why := onnx_layers.fits_pattern(model, layer, NMPattern(self.n, self.m, layer.layout)):
                skipped[layer.weight] = why
            elif (
                self.criterion == "sparsegpt"
                and layer.layout == CONV
                and onnx_sparsity.geometry(nodes[layer.node], tensor_of(model.graph.initializers[layer.weight]).shape)
                is None
            ):
                skipped[layer.weight] = "SparseGPT handles 1-D and 2-D convolutions with explicit pads"
            else:
                layers.append(layer)
        if self.criterion != "magnitude" and not state.calibration:
            raise InputError(
                f"NMSparsity(method={self.criterion!r}) needs calibration feeds: "
                "prune_onnx(..., calibration=[{input name: array}, ...])"
            )
        if self.criterion == "sparsegpt":
            masked, masks = onnx_sparsity.sparsegpt_copy(
                state.capture, layers, (self.n, self.m), state.calibration, self.block, self.damp
            )
        else:
            rms = (
                {
                    name: mean_sq.sqrt()
                    for name, (_, mean_sq) in onnx_layers.input_moments(
                        state.capture, layers, state.calibration
                    ).items()
                }
                if self.criterion == "wanda"
                else {}
            )
            masked, masks = onnx_sparsity.masked_copy(state.capture, layers, (self.n, self.m), rms)
        state.replace(masked)
        for layer in layers:
            state.masked[layer.weight] = MaskedWeight(
                NMPattern(self.n, self.m, layer.layout), layer.nm_axis, masks[layer.weight]
            )
        details = {"pattern": f"{self.n}:{self.m} ({self.method})", "masked layers": len(layers)}
        if skipped:
            details["dense layers"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        return PassResult(state, bool(layers), details)

    def _permute_groups(
        self, state: CompressionState, analysis: Analysis, layers: list[Consumer], rms: dict[Consumer, torch.Tensor]
    ) -> dict[str, str]:
        """Permute every channel group that masked layers reduce over; returns the gain per group."""
        model = state.model
        reference = run_outputs(model, state.captured)
        gains = {}
        for group in tqdm(analysis.groups, desc="permutations", unit="group", disable=None):
            if group.size % self.m:
                continue
            blocks = [
                b for layer in layers if (b := _reduction_block(analysis, model, layer, group.leaf, rms)) is not None
            ]
            if not blocks:
                continue
            scores = torch.cat(blocks)
            order = search(scores, self.n, self.m, sweeps=self.permute_sweeps)
            before, after = (retained(scores, o, self.n, self.m) for o in (torch.arange(group.size), order))
            if after <= before:
                continue
            reordered = _permute(model, analysis, group.leaf, order)
            if reference is not None and not _same(run_outputs(model, state.captured), reference):
                _permute(model, analysis, group.leaf, torch.argsort(order))  # an order-dependent op reads it
                gains[f"group {group.id}"] = "skipped: permuting changed the outputs"
                continue
            state.updated |= reordered
            gains[f"group {group.id} ({group.size} ch)"] = f"+{after / before - 1:.2%} retained"
        return gains

    def _streamed(
        self,
        stream: Stream,
        model: nn.Module,
        layers: list[Consumer],
        skipped: dict[str, str],
        calibration: Calibration | None,
    ) -> list[Consumer]:
        """Masks (and SparseGPT's new values) from weights read out of the checkpoint, recorded in
        ``stream`` for the plan; returns the layers masked."""
        if self.criterion == "sparsegpt":
            segments = _segments(stream, model, layers, skipped)

            def visit(segment: str, runner: Runner) -> None:
                self._sparsegpt(model, segments.get(segment, []), runner, stream.record)

            stream.sequential(model, None, visit)
            return [layer for part in segments.values() for layer in part]
        rms = input_rms(model, layers, calibration) if self.criterion == "wanda" else {}
        weights = stream.weights(model)
        for layer in layers:
            pattern = NMPattern(self.n, self.m, layer.layout)
            stream.record(layer.weight, nm_mask(_scores(weights[layer.weight], layer, rms), pattern), pattern)
        return layers

    def _sparsegpt(
        self,
        model: nn.Module,
        layers: list[Consumer],
        calibration: Calibration,
        record: Callable[..., None] | None = None,
    ) -> None:
        """:func:`~graphprune.algorithms.sparsegpt.sparsegpt_layers` on the model in memory; linear
        layers reading one activation share its Hessian.  With ``record`` (a streamed plan) the mask
        and new weight go there instead of onto the model; the loaded weight takes the new value, so
        later layers and blocks see it."""
        by_input: dict[tuple, list[Consumer]] = {}
        for layer in layers:  # convs see their input through their own patch geometry
            key = (layer.activation, layer.module if layer.layout == CONV else None)
            by_input.setdefault(key, []).append(layer)

        def write(layer: Consumer, new: torch.Tensor, keep: torch.Tensor) -> None:
            owner, attr = _owner(model, layer)
            pattern = NMPattern(self.n, self.m, layer.layout)
            if self.method != "learned":  # learned masks start from the dense weights
                with torch.no_grad():
                    stored(owner, attr).copy_(new)
            if record is not None:
                record(layer.weight, keep, pattern, new)
            else:
                attach(owner, attr, keep, pattern, zero_pruned=self.method != "learned")

        sparsegpt_layers(
            list(by_input.values()),
            lambda layer: _hessians(model, layer, calibration),
            lambda layer: getattr(*_owner(model, layer)).detach(),
            write,
            lambda layer: NMPattern(self.n, self.m, layer.layout),
            block=self.block,
            damp=self.damp,
        )


def _segments(
    stream: Stream, model: nn.Module, layers: list[Consumer], skipped: dict[str, str]
) -> dict[str, list[Consumer]]:
    """The layers by what :meth:`Stream.sequential` visits: before the blocks, each block, after
    them (by graph order); a layer between blocks is skipped, with the reason."""
    path, blocks = stream.block_list(model)
    names = [f"{path}.{i}" for i in range(len(blocks))]
    block_of = {layer: next((b for b in names if layer.module.startswith(b + ".")), None) for layer in layers}
    positions = [i for i, layer in enumerate(layers) if block_of[layer] is not None]
    segments: dict[str, list[Consumer]] = {}
    for i, layer in enumerate(layers):
        if block_of[layer] is not None:
            segments.setdefault(block_of[layer], []).append(layer)
        elif not positions or i < positions[0]:
            segments.setdefault(BEFORE, []).append(layer)
        elif i > positions[-1]:
            segments.setdefault(AFTER, []).append(layer)
        else:
            skipped[layer.weight] = f"between the streamed blocks of {path}: SparseGPT runs block by block"
    return segments


def _reduction_block(
    analysis: Analysis, model: nn.Module, layer: Consumer, leaf: int, rms: dict[Consumer, torch.Tensor]
) -> torch.Tensor | None:
    """The layer's scores as ``[rows, |leaf|]`` when ``leaf`` is the innermost factor of its
    reduction (so the N:M groups run inside it), else None."""
    dims = analysis.tensors[layer.weight][1]
    if layer.layout == CONV and layer.groups > 1:
        return None
    atom = dims[0] if layer.layout == CONV1D else dims[1]
    spaces = analysis.spaces
    leaves = spaces.leaves(atom)
    if not leaves or leaves[-1] != leaf or leaves.count(leaf) != 1 or spaces.cofactor(atom, leaf) is None:
        return None
    return to_matrix(_scores(tensor_at(model, layer.weight), layer, rms), layer.layout).reshape(
        -1, spaces.solver.size(leaf)
    )


def _scores(weight: torch.Tensor, layer: Consumer, rms: dict[Consumer, torch.Tensor]) -> torch.Tensor:
    """|W| (magnitude), times the RMS of the matching input channel when statistics exist (Wanda)."""
    weight = weight.detach()
    scores = weight.abs().float()
    if layer in rms:
        scores = scores * per_input_channel(rms[layer], layer.layout, layer.groups, weight.shape).to(scores)
    return scores


def _permute(model: nn.Module, analysis: Analysis, leaf: int, order: torch.Tensor) -> set[str]:
    """Reorder channel space ``leaf`` in every tensor that indexes it (tied tensors once); returns
    the names of the tensors reordered."""
    done: set[int] = set()
    changed: set[int] = set()
    for name, (kind, dims) in analysis.tensors.items():
        if kind == "code_constant":
            continue
        tensor = tensor_at(model, name)
        if id(tensor) in done:
            continue
        done.add(id(tensor))
        data = tensor.data
        for d, atom in enumerate(dims):
            if leaf in analysis.spaces.leaves(atom):
                data = data.index_select(d, analysis.spaces.gather_index(atom, {leaf: order}).to(data.device))
                changed.add(id(tensor))
        tensor.data = data
    return {
        name
        for name, (kind, _) in analysis.tensors.items()
        if kind != "code_constant" and id(tensor_at(model, name)) in changed
    }


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (b.abs().max().item() or 1.0))
        for a, b in zip(got, want)
    )


def _owner(model: nn.Module, layer: Consumer) -> tuple[nn.Module, str]:
    return model.get_submodule(layer.module), layer.weight.rpartition(".")[2]


def _hessians(model: nn.Module, layer: Consumer, calibration: Calibration) -> list[torch.Tensor]:
    """The layer's Hessians (one per conv group) from the model as it is now, summed over the ranks
    of a distributed run (each with its share of the batches)."""
    module = model.get_submodule(layer.module)
    total = HessianSum(ConvGeometry.of(module) if layer.layout == CONV else None)

    def accumulate(x: torch.Tensor) -> None:
        check_input(layer, x)
        total.add(x)

    run_batches(model, calibration, {layer.module: accumulate})
    rows = torch.tensor(float(total.rows), dtype=torch.float64)
    reduce_sum(*total.sums, rows)
    return total.hessians(float(rows))


def _heads(analysis: Analysis, layers: list[Consumer]) -> set[fx.Node]:
    """The layers whose result is a model output (:func:`graphprune.core.layers.output_heads`)."""
    params = analysis.context.parameter_nodes
    return output_heads(
        analysis.captured.outputs,
        {layer.node for layer in layers},
        lambda node: [x for x in node.all_input_nodes if x not in params] if node.op == "call_function" else [],
    )
