"""The state passes work on for a torch model: the working module, its captured graph, the plans.

It answers the pass manager's questions (:class:`graphprune.core.pipeline.State`) and the
passes' (:class:`graphprune.core.frontend.Frontend`) for an ``nn.Module`` in memory, or for a
streamed plan whose weights stay in a checkpoint; its stage travels with the model
(:func:`detect_stage`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from graphprune.algorithms.nm import CONV, NMPattern
from graphprune.algorithms.quant import QuantPlan
from graphprune.algorithms.sparsegpt import ConvGeometry
from graphprune.core.depth import BlockRemoval, original_name
from graphprune.core.frontend import Activations
from graphprune.core.groups import Analysis
from graphprune.core.layers import output_heads
from graphprune.core.pipeline import MODULE, STREAMED, Stage
from graphprune.core.plan import Plan
from graphprune.core.report import UNCHANGED, calibration_size, max_relative_error
from graphprune.errors import InputError, InternalError
from graphprune.frontends.torch.analysis import analyze_captured
from graphprune.frontends.torch.apply import apply_plan
from graphprune.frontends.torch.blocks import Blocks, by_segment
from graphprune.frontends.torch.calibration import (
    Calibration,
    Consumer,
    batches,
    check_input,
    consumers,
    first_inputs,
    run_batches,
)
from graphprune.frontends.torch.capture import CapturedGraph, qualified, run_outputs, tensor_at
from graphprune.frontends.torch.compensation import ModuleRefit, apply_bias_corrections
from graphprune.frontends.torch.depth import remove_blocks, remove_checked
from graphprune.frontends.torch.distributed import reduce_sum, single_process_only
from graphprune.frontends.torch.fake_quant import is_quantized, quantize_by_plan, read_quant_plan
from graphprune.frontends.torch.folding import fold_batchnorm, foldable_batchnorm
from graphprune.frontends.torch.lowrank import compensate, low_rank_paths, path_weights
from graphprune.frontends.torch.lowrank import refusal as low_rank_refusal
from graphprune.frontends.torch.macs import count_params, graph_macs
from graphprune.frontends.torch.masks import (
    attach,
    capture_masked,
    check_patterns,
    masked_weights,
    nm_masks,
    stored,
    stored_at,
)
from graphprune.io.plan_file import PlanFile

if TYPE_CHECKING:
    from graphprune.frontends.torch.streaming import Stream


STAGE_ATTRIBUTE = "graphprune_stage"
aten = torch.ops.aten


def detect_stage(model: nn.Module) -> Stage:
    """The stage a model is at, read off the model itself (so it travels with it): quantized if a
    weight carries fake quantization, compensated if a layer has a low-rank path, masked if a weight
    carries an N:M mask, else the stage the pass
    manager wrote on the root module (structured models look dense otherwise), else dense."""
    if is_quantized(model):
        return Stage.QUANTIZED
    if low_rank_paths(model):
        return Stage.COMPENSATED
    if masked_weights(model):
        return Stage.MASKED
    return Stage(getattr(model, STAGE_ATTRIBUTE, Stage.DENSE))


@dataclass
class CompressionState:
    """What passes read and write: the working model, its graph, the stage and the plans so far."""

    model: nn.Module
    captured: CapturedGraph
    stage: Stage = Stage.DENSE
    calibration: Iterable[Any] | None = None
    plans: list[Plan | QuantPlan | BlockRemoval] = field(default_factory=list)
    prunable_outputs: tuple[str, ...] = ()
    experimental_order: bool = False  # passes may run on stages they accept only experimentally
    stream: Stream | None = None  # a streamed plan: weights in a checkpoint, model on meta (graphprune.core.plan)
    # tensors whose values a pass changed beyond slicing and masking (SparseGPT, compensation,
    # permutations): a plan file carries their new values, or re-applying it would lose them
    updated: set[str] = field(default_factory=set)
    # the model as given to the pipeline: what low-rank compensation measures the error against
    dense: nn.Module | None = None
    _analysis: Analysis | None = None
    _folded: dict[str, tuple[str, torch.fx.Node]] = field(default_factory=dict)  # conv -> (BatchNorm, its node)

    @property
    def mode(self) -> str:
        return MODULE if self.stream is None else STREAMED

    def analysis(self) -> Analysis:
        """The channel analysis of the current model (computed once per model version)."""
        if self._analysis is None:
            self._analysis = analyze_captured(
                self.captured, type(self.model).__name__, prunable_outputs=self.prunable_outputs
            )
        return self._analysis

    def replace_model(self, model: nn.Module, captured: CapturedGraph) -> None:
        self.model, self.captured, self._analysis = model, captured, None

    def param_count(self) -> int:
        return count_params(self.model)

    def macs(self) -> int:
        return graph_macs(self.captured.graph_module)

    def check_patterns(self, where: str) -> None:
        check_patterns(self.model, where)

    def output_error(self, reference: list[torch.Tensor] | None) -> float | None:
        """Worst max-relative output error against the dense reference (None without one)."""
        if reference is None:
            return None
        return max_relative_error(run_outputs(self.model, self.captured), reference)

    def mark_stage(self) -> None:
        setattr(self.model, STAGE_ATTRIBUTE, self.stage)

    def calibration_size(self) -> tuple[int, str] | None:
        return calibration_size(first_inputs(self.calibration))

    # What passes ask of a state (graphprune.core.frontend.Frontend); the ONNX state answers the same.
    def weight_layers(self) -> tuple[list[Consumer], dict[str, str]]:
        paths = path_weights(self.model)
        layers = {c.weight: c for c in consumers(self.analysis()) if c.weight not in paths}
        return list(layers.values()), dict.fromkeys(sorted(paths), "low-rank compensation path (kept dense, in float)")

    def check_names(self, names: Iterable[str], option: str) -> None:
        modules = dict(self.model.named_modules())
        for name in names:
            if name not in modules:
                raise InputError(f"{option}: no module named {name!r} in {type(self.model).__name__}")

    def weight(self, layer: Consumer) -> torch.Tensor:
        """The weight as the model computes it (masks applied); in a streamed plan, read from the
        checkpoint unless its block is loaded."""
        weight = tensor_at(self.model, layer.weight)
        if weight.device.type != "meta":
            return weight.detach()
        if self.stream is None:
            raise InputError(
                f"{layer.weight} is on the meta device: this pass needs real weights (a model too large "
                "to load is planned with gp.plan(..., weights=checkpoint), where the passes that can read "
                "weights from the checkpoint)"
            )
        return self.stream.weights(self.model)[layer.weight]

    def weight_shape(self, layer: Consumer) -> tuple[int, ...]:
        return tuple(tensor_at(self.model, layer.weight).shape)

    def criterion_inputs(self) -> tuple[nn.Module, Mapping[str, torch.Tensor] | None]:
        return self.model, self.stream.weights(self.model) if self.stream is not None else None

    def reads_model_input(self, layer: Consumer) -> bool:
        return layer.activation in set(self.captured.user_inputs)

    def output_heads(self, layers: list[Consumer]) -> set[str]:
        params = self.analysis().context.parameter_nodes
        heads = output_heads(
            self.captured.outputs,
            {layer.node for layer in layers},
            lambda node: [x for x in node.all_input_nodes if x not in params] if node.op == "call_function" else [],
        )
        return {layer.weight for layer in layers if layer.node in heads}

    def input_channels(self, layer: Consumer) -> int:
        return self.analysis().context.dims(layer.activation)[layer.channel_axis]

    def layer_bias(self, layer: Consumer) -> str | None:
        """The module's own ``bias`` when the layer's op adds it (linear, conv, Conv1D's addmm)."""
        if layer.module in self._folded:  # folding gave the convolution a bias
            return qualified(layer.module, "bias")
        if layer.matmul or not layer.weight.endswith(".weight"):
            return None
        node, args = layer.node, layer.node.args
        bias = args[0] if node.target.overloadpacket is aten.addmm else args[2] if len(args) > 2 else None
        name = qualified(layer.module, "bias")
        found = self.captured.tensor_names.get(bias.name) if isinstance(bias, torch.fx.Node) else None
        return name if found == ("parameter", name) else None

    def shared_with(self, layer: Consumer) -> list[str]:
        weight = stored_at(self.model, layer.weight)
        return [
            name.replace(".parametrizations.", ".").removesuffix(".original")
            for name, param in self.model.named_parameters(remove_duplicate=False)
            if param is weight and name.replace(".parametrizations.", ".").removesuffix(".original") != layer.weight
        ]

    def module_type(self, layer: Consumer) -> type:
        return type(self.model.get_submodule(layer.module))

    def clipped_at_zero(self, layer: Consumer) -> bool:
        node = self._folded[layer.module][1] if layer.module in self._folded else layer.node
        users = list(node.users)
        return (
            len(users) == 1
            and users[0].op == "call_function"
            and users[0].target in (aten.relu.default, aten.relu_.default)
        )

    def conv_window(self, layer: Consumer) -> ConvGeometry | None:
        module = self.model.get_submodule(layer.module)
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.padding_mode != "zeros":
            return None
        return ConvGeometry.of(module)

    def calibration_data(self, purpose: str) -> Calibration:
        return batches(self.calibration, purpose)

    def observe(
        self,
        calibration: Calibration,
        inputs: Mapping[Consumer, Activations],
        outputs: Mapping[Consumer, Activations] | None = None,
    ) -> None:
        """Forward hooks on the layers' modules: a layer's input is its module's first input, checked
        against the captured activation (:func:`~graphprune.frontends.torch.calibration.check_input`)."""
        on_input: dict[str, list[Callable[[torch.Tensor], None]]] = {}
        for layer, callback in inputs.items():

            def checked(x: torch.Tensor, layer: Consumer = layer, callback: Activations = callback) -> None:
                check_input(layer, x)
                callback(x)

            on_input.setdefault(layer.module, []).append(checked)
        on_output: dict[str, list[Callable[[torch.Tensor], None]]] = {}
        for layer, callback in (outputs or {}).items():
            on_output.setdefault(layer.module, []).append(callback)
        run_batches(
            self.model,
            calibration,
            {module: _each(callbacks) for module, callbacks in on_input.items()},
            {module: _each(callbacks) for module, callbacks in on_output.items()},
        )

    def reduce_sum(self, *tensors: torch.Tensor) -> None:
        reduce_sum(*tensors)

    def single_process_only(self, what: str) -> None:
        single_process_only(what)

    def sequential(
        self,
        layers: list[Consumer],
        calibration: Calibration,
        visit: Callable[[list[Consumer], Any], None],
        skipped: dict[str, str],
    ) -> tuple[list[Consumer], str]:
        """Block by block (:class:`~graphprune.frontends.torch.blocks.Blocks`): each part's layers
        with a runner that runs only that part on what the earlier parts computed, so the forward
        work is about one pass over the calibration data instead of one per part.  A streamed plan
        always runs so, skipping layers between its blocks; a model in memory runs in one part
        (whole forwards) where its blocks do not form a chain or a layer sits between them."""
        if self.stream is None and not isinstance(calibration, list):
            visit(layers, calibration)
            return layers, "whole forwards (the calibration data runs the model itself)"
        runner = self.stream if self.stream is not None else Blocks(calibration)
        if self.stream is None and (problem := runner.chain_problem(self.model)) is not None:
            visit(layers, calibration)
            return layers, f"whole forwards, not block by block: {problem}"
        between: dict[str, str] = {}
        segments = by_segment(runner, self.model, layers, between)
        if between and self.stream is None:
            visit(layers, calibration)
            return layers, f"whole forwards, not block by block: {next(iter(between))} sits between the blocks"
        skipped.update(between)
        runner.sequential(self.model, None, lambda segment, data: visit(segments.get(segment, []), data))
        path, blocks = runner.block_list(self.model)
        visited = [layer for part in segments.values() for layer in part]
        return visited, f"block by block over {path} ({len(blocks)} blocks)"

    def permute_channels(self, leaf: int, order: torch.Tensor) -> bool:
        reference = run_outputs(self.model, self.captured)
        reordered = permute_channel_space(self.model, self.analysis(), leaf, order)
        if reference is not None and max_relative_error(run_outputs(self.model, self.captured), reference) > UNCHANGED:
            permute_channel_space(self.model, self.analysis(), leaf, torch.argsort(order))
            return False
        self.updated |= reordered
        return True

    def dense_weight(self, layer: Consumer) -> torch.Tensor:
        """The layer's weight in the model as given to the pipeline (masks and fake quantization
        applied), cut to the channels the structured plans since have kept."""
        if self.dense is None:
            raise InternalError("this state was made without the model as given: no dense weights to compare with")
        structured = [p for p in self.plans if isinstance(p, Plan)]
        dense = tensor_at(self.dense, original_name(self.plans, layer.weight)).detach()
        return PlanFile("", structured=structured).planned(layer.weight, dense)

    def remove_blocks(self, removal: BlockRemoval) -> list[str]:
        """Remove whole blocks (:func:`graphprune.frontends.torch.depth.remove_blocks`), verified: on the
        example inputs the model computes what it computed with those blocks bypassed (else it is put
        back and the error raised; a streamed plan has no values to compare); the model is captured
        again.  Returns what was renumbered."""
        if self.stream is None:
            notes = remove_checked(self.model, removal, self.captured.args, self.captured.kwargs)
        else:  # weights on meta: the removal is checked by the capture alone, as streamed pruning is
            notes = remove_blocks(self.model, removal).notes
        captured = capture_masked(self.model, self.captured.args, self.captured.kwargs)
        self.replace_model(self.model, captured)
        self.plans.append(removal)
        return notes

    def low_rank_refusal(self, layer: Consumer) -> str | None:
        """Why the layer cannot get a low-rank path beside it (:func:`graphprune.frontends.torch.lowrank.refusal`)."""
        if layer.layout == CONV or layer.matmul:
            return "convolutions and matmuls against a parameter get no low-rank path (linear layers only)"
        return low_rank_refusal(self.model, layer.module, self.weight(layer), layer.layout)

    def add_low_rank_paths(self, paths: Mapping[Consumer, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Each layer gets its path ``(down, up)`` in parallel (:mod:`graphprune.frontends.torch.lowrank`),
        and the model is captured again (:func:`~graphprune.frontends.torch.masks.capture_masked`)."""
        for layer, (down, up) in paths.items():
            compensate(self.model, layer.module, down, up, layer.layout)
        self.replace_model(self.model, capture_masked(self.model, self.captured.args, self.captured.kwargs))

    def prune_channels(self, plan: Plan, bias_corrections: Mapping[str, torch.Tensor]) -> None:
        applied = apply_plan(self.model, self.analysis(), plan, inplace=True)
        self.replace_model(applied.module, applied.captured)
        apply_bias_corrections(self.model, bias_corrections)
        self.updated |= set(bias_corrections)

    def refit(self, *, norms: bool, reconstruct: bool, batchnorm: bool, damp: float) -> ModuleRefit | None:
        if self.stream is not None or not (norms or reconstruct or batchnorm):
            return None
        return ModuleRefit(self, norms=norms, reconstruct=reconstruct, batchnorm=batchnorm, damp=damp)

    def writing(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def prepare_quantization(self, layers: list[Consumer]) -> tuple[list[Consumer], int]:
        """Folds each eval-mode BatchNorm after a convolution into it, so that the weight scales are
        those of the deployed weights."""
        for layer in layers:
            if layer.layout == CONV and (found := foldable_batchnorm(self.captured, self.model, layer)) is not None:
                self._folded[layer.module] = found
        for module, (batchnorm, _) in self._folded.items():
            fold_batchnorm(self.model, module, batchnorm)
        return layers, len(self._folded)

    def write_quantization(self, plan: QuantPlan, values: Mapping[str, torch.Tensor] | None = None) -> QuantPlan:
        """Fake quantization (:mod:`graphprune.frontends.torch.fake_quant`) on each layer's module:
        its weight, and as the format has it its input, a convolution's output, its bias.  ``values``:
        new weights (GPTQ's), written under any mask first and recorded in :attr:`updated`."""
        for name, value in (values or {}).items():
            owner, attr = self.model.get_submodule(plan.layers[name].module), name.rpartition(".")[2]
            with torch.no_grad():
                stored(owner, attr).copy_(value)
            self.updated.add(name)
        quantize_by_plan(self.model, plan)
        recorded = read_quant_plan(self.model)
        if recorded is None:
            return plan
        recorded.folded = {module: batchnorm for module, (batchnorm, _) in self._folded.items()}
        return recorded

    def keep_mask(self, layer: Consumer) -> torch.Tensor | None:
        found = nm_masks(self.model).get(layer.weight)
        return None if found is None else found[0]

    def write_nm(
        self,
        layer: Consumer,
        keep: torch.Tensor,
        pattern: NMPattern,
        *,
        values: torch.Tensor | None = None,
        zero_pruned: bool = True,
    ) -> None:
        """A mask parametrization on the module (fine-tuning cannot revive what it prunes); in a
        streamed plan the mask and values go to the plan, and the loaded weight takes the values (or
        the mask) so that later layers see them.  New values are recorded in :attr:`updated`."""
        owner, attr = self.model.get_submodule(layer.module), layer.weight.rpartition(".")[2]
        if values is not None:
            with torch.no_grad():
                stored(owner, attr).copy_(values)
        if self.stream is not None:
            if values is None and zero_pruned:
                with torch.no_grad():
                    stored(owner, attr).mul_(keep)
            self.stream.record(layer.weight, keep, pattern, values)
            return
        attach(owner, attr, keep, pattern, zero_pruned=zero_pruned)
        if values is not None:
            self.updated.add(layer.weight)


def permute_channel_space(model: nn.Module, analysis: Analysis, leaf: int, order: torch.Tensor) -> set[str]:
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


def _each(callbacks: list[Callable[[torch.Tensor], None]]) -> Callable[[torch.Tensor], None]:
    def call(x: torch.Tensor) -> None:
        for callback in callbacks:
            callback(x)

    return call
