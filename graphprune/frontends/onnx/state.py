"""The state passes work on for an ONNX model: the working graph, its masks and plans.

It answers the pass manager's questions (:class:`graphprune.core.pipeline.State`) and the
passes' (:class:`graphprune.core.frontend.Frontend`) for an ONNX graph: statistics come from
onnxruntime running the graph with the layers' activations exposed as outputs; masks are exact
zeros in the initializers, recorded per initializer so that every later pass is checked against
them; the stage is written into the model's metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from graphprune.algorithms.nm import NMPattern, nm_holds
from graphprune.algorithms.number_formats import INT8
from graphprune.algorithms.quant import QuantPlan
from graphprune.algorithms.sparsegpt import ConvGeometry
from graphprune.core.frontend import Activations
from graphprune.core.layers import owner_names
from graphprune.core.pipeline import ONNX, Stage
from graphprune.core.plan import Plan
from graphprune.core.report import UNCHANGED, calibration_size, max_relative_error
from graphprune.emit.qdq import stored_integers
from graphprune.errors import InputError, InternalError, PostconditionError
from graphprune.frontends.onnx import layers, quantize
from graphprune.frontends.onnx.analysis import OnnxAnalysis, analyze_onnx_capture
from graphprune.frontends.onnx.apply import apply_onnx_plan, copy_model
from graphprune.frontends.onnx.capture import Feeds, OnnxCapture, measure, session, tensor_of
from graphprune.frontends.onnx.compensation import corrected
from graphprune.frontends.onnx.layers import OnnxLayer

STAGE_KEY = "graphprune.stage"  # ONNX metadata: the stage the model is at


NM_KEY = "graphprune.nm_sparsity"  # ONNX metadata: the N:M pattern of each masked initializer


@dataclass
class MaskedWeight:
    """An initializer that carries an N:M pattern, its groups running along ``axis`` (moved last)."""

    pattern: NMPattern
    axis: int
    mask: torch.Tensor | None = None  # bool, the initializer's shape (None: read from metadata, entries unknown)

    def holds(self, values: np.ndarray) -> bool:
        return nm_holds(values, self.axis, self.pattern)


@dataclass
class OnnxState:
    """What passes read and write when they run on an ONNX model."""

    capture: OnnxCapture
    stage: Stage = Stage.DENSE
    calibration: list[Feeds] | None = None
    plans: list[Any] = field(default_factory=list)
    masked: dict[str, MaskedWeight] = field(default_factory=dict)  # initializer -> its N:M pattern
    # initializers a pass gave new values (SparseGPT), as written: a plan file carries them
    updated: dict[str, torch.Tensor] = field(default_factory=dict)
    experimental_order: bool = False
    float_outputs: list[np.ndarray] | None = None  # outputs before Quantize (the int8 check's reference)
    _analysis: OnnxAnalysis | None = None

    @property
    def mode(self) -> str:
        return ONNX

    def analysis(self) -> OnnxAnalysis:
        if self._analysis is None:
            self._analysis = analyze_onnx_capture(self.capture, self.capture.graph.name or "ONNX model")
        return self._analysis

    def replace(self, capture: OnnxCapture) -> None:
        self.capture, self._analysis = capture, None

    def weights(self) -> dict[str, torch.Tensor]:
        return self.capture.weights()

    def param_count(self) -> int:
        return self.analysis().planned_params({})

    def macs(self) -> int:
        return self.analysis().planned_macs({})

    def check_patterns(self, where: str) -> None:
        initializers = self.capture.graph.initializers
        for name, masked in self.masked.items():
            if name not in initializers or not masked.holds(stored_integers(initializers, name)[0]):
                raise PostconditionError(f"{where} broke the {masked.pattern} pattern of {name}")

    def output_error(self, reference: list[np.ndarray]) -> float:
        """:func:`graphprune.core.report.max_relative_error` of the outputs onnxruntime gives now."""
        return _output_error(self.capture.outputs, reference)

    def mark_stage(self) -> None:
        self.capture.model.metadata_props[STAGE_KEY] = str(self.stage)

    def calibration_size(self) -> tuple[int, str] | None:
        arrays = [np.asarray(next(iter(feed.values()))) for feed in self.calibration or [] if feed]
        return calibration_size([(a.shape, bool(np.issubdtype(a.dtype, np.integer))) for a in arrays])

    # What passes ask of a state (graphprune.core.frontend.Frontend); the torch state answers the same.
    def weight_layers(self) -> tuple[list[OnnxLayer], dict[str, str]]:
        found, skipped = layers.weight_layers(self.capture.model)
        return list({layer.weight: layer for layer in found}.values()), skipped

    def check_names(self, names: Iterable[str], option: str) -> None:
        owners = owner_names(self.capture.graph.initializers)
        for name in names:
            if name not in owners:
                raise InputError(f"{option}: no module named {name!r} in the ONNX model's initializer names")

    def weight(self, layer: OnnxLayer) -> torch.Tensor:
        return tensor_of(self.capture.graph.initializers[layer.weight]).clone()

    def weight_shape(self, layer: OnnxLayer) -> tuple[int, ...]:
        return tuple(self.capture.graph.initializers[layer.weight].const_value.shape.numpy())

    def criterion_inputs(self) -> tuple[dict[str, torch.Tensor], None]:
        return self.weights(), None

    def reads_model_input(self, layer: OnnxLayer) -> bool:
        return layers.reads_model_input(self.capture.model, layer)

    def output_heads(self, found: list[OnnxLayer]) -> set[str]:
        heads = layers.head_layers(self.capture.model, found)
        return {layer.weight for layer in found if layer.node in heads}

    def input_channels(self, layer: OnnxLayer) -> int:
        value = next(v for v in self._node(layer).inputs if v is not None and v.name == layer.activation)
        return self.analysis().context.dims(value)[layer.channel_axis]

    def layer_bias(self, layer: OnnxLayer) -> str | None:
        value = layers.layer_bias(self._node(layer))
        return None if value is None else value.name

    def shared_with(self, layer: OnnxLayer) -> list[str]:
        return []

    def module_type(self, layer: OnnxLayer) -> None:
        return None

    def clipped_at_zero(self, layer: OnnxLayer) -> bool:
        users = list(self._node(layer).outputs[0].uses())
        return len(users) == 1 and users[0].node.op_type == "Relu" and users[0].node.domain == ""

    def conv_window(self, layer: OnnxLayer) -> ConvGeometry | None:
        return layers.conv_window(self._node(layer), self.weight_shape(layer))

    def calibration_data(self, purpose: str) -> list[Feeds]:
        if not self.calibration:
            raise InputError(
                f"{purpose} needs calibration feeds: prune_onnx(..., calibration=[{{input name: array}}, ...])"
            )
        return self.calibration

    def observe(
        self,
        calibration: list[Feeds],
        inputs: Mapping[OnnxLayer, Activations],
        outputs: Mapping[OnnxLayer, Activations] | None = None,
    ) -> None:
        """One onnxruntime session over the graph as it is now, with the layers' activations (and
        results) exposed as outputs."""
        wanted = [(layer.activation, callback) for layer, callback in inputs.items()]
        wanted += [(self._node(layer).outputs[0].name, callback) for layer, callback in (outputs or {}).items()]
        runner = session(self.capture.model, dict.fromkeys(name for name, _ in wanted))
        index = {o.name: i for i, o in enumerate(runner.get_outputs())}
        for feed in calibration:
            values = runner.run(None, feed)
            for name, callback in wanted:
                callback(torch.from_numpy(np.asarray(values[index[name]])))

    def single_process_only(self, what: str) -> None:
        """An ONNX model is compressed in one process."""

    def reduce_sum(self, *tensors: torch.Tensor) -> None:
        """One process: nothing to sum."""

    def sequential(
        self,
        found: list[OnnxLayer],
        calibration: list[Feeds],
        visit: Callable[[list[OnnxLayer], Any], None],
        skipped: dict[str, str],
    ) -> tuple[list[OnnxLayer], str]:
        visit(found, calibration)
        return found, "the whole graph in onnxruntime for each group of layers reading one activation"

    def permute_channels(self, leaf: int, order: torch.Tensor) -> bool:
        """Reorders the float initializers (integer constants such as shapes are left as they are),
        then runs the graph to check the outputs."""
        analysis, initializers = self.analysis(), self.capture.graph.initializers
        before = {}
        for name, (kind, dims) in analysis.tensors.items():
            if kind == "constant" or not any(leaf in analysis.spaces.leaves(atom) for atom in dims):
                continue
            data = tensor_of(initializers[name])
            before[name] = initializers[name].const_value
            for d, atom in enumerate(dims):
                if leaf in analysis.spaces.leaves(atom):
                    data = data.index_select(d, analysis.spaces.gather_index(atom, {leaf: order}))
            initializers[name].const_value = ir.tensor(data.numpy(), name=name)
        _, outputs = measure(self.capture.model, self.capture.feeds)
        if _output_error(outputs, self.capture.outputs) <= UNCHANGED:
            return True
        for name, value in before.items():
            initializers[name].const_value = value
        return False

    def prune_channels(self, plan: Plan, bias_corrections: Mapping[str, torch.Tensor]) -> None:
        self.replace(corrected(apply_onnx_plan(self.capture, self.analysis(), plan), bias_corrections))

    def refit(self, *, norms: bool, reconstruct: bool, batchnorm: bool, damp: float) -> None:
        """No compensation runs on the graph itself yet (ChannelPrune refuses those it cannot skip)."""
        return None

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Writes go to a copy of the graph, re-measured when they end (the previous graph is kept
        as it was if they fail)."""
        before, masked = self.capture, dict(self.masked)
        self.replace(
            OnnxCapture(
                model=copy_model(before.model), feeds=before.feeds, shapes=before.shapes, outputs=before.outputs
            )
        )
        try:
            yield
        except BaseException:
            self.replace(before)
            self.masked = masked
            raise
        shapes, outputs = measure(self.capture.model, self.capture.feeds)
        self.replace(OnnxCapture(model=self.capture.model, feeds=self.capture.feeds, shapes=shapes, outputs=outputs))

    def prepare_quantization(self, found: list[OnnxLayer]) -> tuple[list[OnnxLayer], int]:
        """A 2-D ``MatMul`` + bias ``Add`` becomes one ``Gemm``, so that the bias is the layer's own and
        can be written as int32 (:func:`~graphprune.frontends.onnx.quantize.gemm_from_matmul_add`)."""
        self.replace(quantize.gemm_from_matmul_add(self.capture))
        now = {layer.weight: layer for layer in self.weight_layers()[0]}
        return [now[layer.weight] for layer in found], 0

    def write_quantization(self, plan: QuantPlan, values: Mapping[str, torch.Tensor] | None = None) -> QuantPlan:
        """int8 QDQ nodes in a re-measured copy (:func:`~graphprune.frontends.onnx.quantize.quantized_copy`);
        the float outputs are kept as the int8 check's reference and the masks follow the weights
        to their quantized initializers.  (Quantize refuses the other formats and new values on
        ONNX models before anything is written.)"""
        if plan.kind != INT8 or values:
            raise InternalError(f"an ONNX model takes int8 plans without new weights, got {plan.kind}")
        self.float_outputs = self.capture.outputs
        self.replace(quantize.quantized_copy(self.capture, plan))
        self.masked = {f"{name}_quantized" if name in plan.layers else name: m for name, m in self.masked.items()}
        return plan

    def keep_mask(self, layer: OnnxLayer) -> torch.Tensor | None:
        found = self.masked.get(layer.weight)
        if found is None:
            return None
        if found.mask is None:  # read from a file's metadata: its zeros are the pruned entries
            return self.weight(layer) != 0
        return found.mask

    def write_nm(
        self,
        layer: OnnxLayer,
        keep: torch.Tensor,
        pattern: NMPattern,
        *,
        values: torch.Tensor | None = None,
        zero_pruned: bool = True,
    ) -> None:
        """The masked (or new) values as the initializer, exact zeros where ``keep`` is False."""
        if not zero_pruned:
            raise InternalError("ONNX initializers cannot keep dense weights under a mask (learned masks)")
        new = values if values is not None else self.weight(layer) * keep
        self.capture.graph.initializers[layer.weight].const_value = ir.tensor(new.numpy(), name=layer.weight)
        if values is not None:
            self.updated[layer.weight] = values.detach().cpu().clone()
        self.masked[layer.weight] = MaskedWeight(pattern, layer.nm_axis, keep)

    def _node(self, layer: OnnxLayer) -> ir.Node:
        return next(node for node in self.capture.graph if node.name == layer.node)


def _output_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """:func:`graphprune.core.report.max_relative_error` of onnxruntime outputs; a non-numeric
    output counts 1 where it differs."""
    numeric = [i for i, w in enumerate(want) if w.dtype.kind in "biufc"]
    worst = max_relative_error(
        [torch.from_numpy(np.ascontiguousarray(got[i])) for i in numeric],
        [torch.from_numpy(np.ascontiguousarray(want[i])) for i in numeric],
    )
    if any(not np.array_equal(got[i], want[i]) for i in range(len(want)) if i not in numeric):
        worst = max(worst, 1.0)
    return worst
