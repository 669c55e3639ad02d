"""``prune_onnx``: the same passes over an ONNX model, for users who have only the ``.onnx`` file.

The pass manager, pass contracts, stage order, plans and report are those of the torch path;
:class:`OnnxState` answers the pass manager's questions (parameters, MACs, patterns, output
error) and the passes' (:class:`graphprune.core.frontend.Frontend`) for an ONNX graph.  Passes
that do not run on ONNX models yet are refused before anything runs.  The caller's model or file is never modified;
:meth:`OnnxPruneResult.save` writes atomically and verifies what it wrote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes.common import DeduplicateInitializersPass

from graphprune.algorithms.nm import CONV, CONV1D, LINEAR, NMPattern
from graphprune.algorithms.quant import QuantPlan
from graphprune.core.pipeline import ONNX, Pass, Stage
from graphprune.core.plan import Plan
from graphprune.core.report import Report
from graphprune.emit.onnx_export import (
    ExportReport,
    check_outputs,
    checked_session,
    graphprune_metadata,
    onnx_files,
    record_outputs,
    save_model,
)
from graphprune.emit.qdq import stored_integers
from graphprune.emit.report_page import LayerRow, write_report
from graphprune.errors import ApplyError, ContractError, InputError
from graphprune.frontends.onnx.analysis import OnnxAnalysis, analyze_onnx_capture
from graphprune.frontends.onnx.apply import apply_onnx_plan, copy_model
from graphprune.frontends.onnx.capture import (
    Feeds,
    OnnxSource,
    capture_onnx,
    check_feeds,
    graph_inputs,
    read_model,
    run_model,
)
from graphprune.frontends.onnx.state import NM_KEY, STAGE_KEY, MaskedWeight, OnnxState
from graphprune.io.outputs import Outputs, writing
from graphprune.io.plan_file import NMRecord, PlanFile
from graphprune.io.recipe import pass_manager


@dataclass
class OnnxPruneResult:
    """The compressed ONNX model (an onnx_ir model), the report, and how to save it."""

    model: ir.Model
    report: Report
    stage: Stage
    plans: list[Any]
    masked: dict[str, MaskedWeight]
    feeds: Feeds
    interface: list[str]  # the original model's inputs and outputs, as :func:`_interface` writes them
    shapes_before: dict[str, list[int]] = field(default_factory=dict)  # weight layer -> weight shape, before
    float_outputs: list[np.ndarray] | None = None  # outputs before Quantize, on ``feeds``
    sources: list[str] = field(default_factory=list)  # the file it was read from and its external data
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # initializers a pass gave new values

    def write_report(
        self,
        directory: str | os.PathLike,
        latency_ms: dict[str, float] | None = None,
        *,
        overwrite: bool = False,
        outputs: Outputs | None = None,
    ) -> list[str]:
        """Report pages (report.html with plots, report.md, report.json, PNGs) in ``directory``, one
        layer row per Conv/Gemm/MatMul weight initializer (see
        :func:`graphprune.emit.report_page.write_report`); returns the file names."""
        rows = []
        for name, op_type, scale in weight_layers(self.model):
            values = self.model.graph.initializers[name].const_value.numpy()
            original = name.removesuffix("_quantized") if scale is not None else name
            row = LayerRow(
                name=original,
                kind=op_type,
                shape_before=self.shapes_before.get(original, []),
                shape_after=list(values.shape),
                zeros=float((values == 0).mean()),
            )
            if name in self.masked:
                row.pattern = str(self.masked[name].pattern)
            if scale is not None:
                ordered = np.sort(scale.reshape(-1))
                row.weight_scale = [float(ordered[0]), float(ordered[len(ordered) // 2]), float(ordered[-1])]
            rows.append(row)
        with writing(outputs, inputs=self.sources, overwrite=overwrite) as out:
            return write_report(directory, self.report, rows, latency_ms, outputs=out)

    def plan_file(self) -> PlanFile:
        """Everything this run decided, as data (see :mod:`graphprune.io.plan_file`); masks and new
        values by the float initializer's name."""
        quantization = next((p for p in reversed(self.plans) if isinstance(p, QuantPlan)), None)
        masks = {}
        for name, m in self.masked.items():
            base = name.removesuffix("_quantized")
            mask = (
                m.mask
                if m.mask is not None
                else torch.from_numpy(self.model.graph.initializers[name].const_value.numpy() != 0)
            )  # from a file's metadata
            masks[base if quantization and base in quantization.layers else name] = NMRecord(m.pattern, mask)
        return PlanFile(
            model=self.report.model_name,
            pipeline=self.report.pipeline,
            structured=[p for p in self.plans if isinstance(p, Plan)],
            masks=masks,
            quantization=quantization,
            values=dict(self.values),
        )

    def save_plan(
        self, path: str | os.PathLike, *, overwrite: bool = False, outputs: Outputs | None = None
    ) -> tuple[str, str]:
        """Write :meth:`plan_file` as ``<path>.json`` + ``<path>.safetensors``; returns both paths."""
        with writing(outputs, inputs=self.sources, overwrite=overwrite) as out:
            return self.plan_file().save(path, outputs=out)

    def to_proto(self) -> onnx.ModelProto:
        return ir.to_proto(self._final())

    def save(
        self,
        path: str | os.PathLike,
        *,
        fp32_tolerance: float = 1e-4,
        int8_tolerance: float = 0.01,
        overwrite: bool = False,
        outputs: Outputs | None = None,
    ) -> ExportReport:
        """Write the model to ``path`` atomically (staged beside it, verified, then moved into place)
        and say how it was checked: the ONNX checker; the inputs and outputs are the original model's
        (names, element types, declared shapes); onnxruntime with its default optimizations gives the
        outputs of the compressed graph run as written (fp32: within ``fp32_tolerance`` of the largest
        output; int8: the emitter's test against the fake-quant graph and the float model, see
        :func:`graphprune.export_onnx`, and every quantized layer fused into an integer kernel).

        The file the model was read from (and its external data) is never written over; another
        existing file is replaced only if graphprune wrote it, or with ``overwrite=True``.  With
        ``outputs`` the file joins the caller's transaction and appears when it commits."""
        with writing(outputs, inputs=self.sources, overwrite=overwrite) as out:
            staged, external = save_model(self._final(), path, out)
            quantized = sum(isinstance(p, QuantPlan) and len(p.layers) for p in self.plans)
            report = ExportReport(
                os.path.abspath(os.fspath(path)),
                self.stage,
                max_error=0.0,
                quantized_layers=quantized,
                tolerance=int8_tolerance if quantized else fp32_tolerance,
                external_data=external,
                sparse_weights={name: str(m.pattern) for name, m in self.masked.items()},
                reference="the graph run as written (no optimizations)",
            )
            self._verify(staged, report)
        return report

    def _final(self) -> ir.Model:
        model = copy_model(self.model)
        DeduplicateInitializersPass(size_limit=1 << 62)(model)  # undo the per-reader copies of the capture
        initializers = model.graph.initializers
        records = {
            name: {
                "pattern": str(m.pattern),
                "axis": m.axis,
                "zero_point": stored_integers(initializers, name)[1] if name in initializers else 0,
            }
            for name, m in self.masked.items()
        }
        model.metadata_props.update(graphprune_metadata(self.stage, self.report.pipeline, records))
        return model

    def _verify(self, staged: str, report: ExportReport) -> None:
        session, optimized = checked_session(staged)
        written = ir.load(staged)
        if _interface(written) != self.interface:
            raise ApplyError(
                f"the written model's interface {_interface(written)} differs from the original "
                f"{self.interface}; nothing was written"
            )
        got = session.run(None, self.feeds)
        record_outputs(
            report, got, run_model(self.model, self.feeds), self.float_outputs if report.quantized_layers else None
        )
        check_outputs(report, optimized)


def weight_layers(model: ir.Model) -> list[tuple[str, str, np.ndarray | None]]:
    """(weight initializer, op type, int8 scales or None) of every Conv, ConvTranspose, Gemm and
    MatMul whose weight is an initializer, read directly or through a DequantizeLinear."""
    out = []
    for node in model.graph:
        if (
            node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            or len(node.inputs) < 2
            or node.inputs[1] is None
        ):
            continue
        weight, scale = node.inputs[1], None
        producer = weight.producer()
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[1].is_initializer():
            weight, scale = producer.inputs[0], producer.inputs[1].const_value.numpy()
        if weight.is_initializer():
            out.append((weight.name, node.op_type, scale))
    return out


def _interface(model: ir.Model) -> list[str]:
    """Names, element types and declared shapes of the graph inputs and outputs."""

    def describe(v: ir.Value) -> str:
        return f"{v.name}: {v.dtype} {v.shape}"

    return [*(f"in {describe(v)}" for v in graph_inputs(model)), *(f"out {describe(v)}" for v in model.graph.outputs)]


def analyze_onnx(
    model: OnnxSource, feeds: Mapping[str, Any] | None = None, *, base_dir: str | os.PathLike | None = None
) -> OnnxAnalysis:
    """The coupled channel groups of an ONNX model (a path, ModelProto or onnx_ir.Model; never
    modified); ``feeds`` fix the sizes of symbolic input dims (see :func:`prune_onnx`);
    ``base_dir``: the folder of a model in memory's external data."""
    working = read_model(model, base_dir)
    checked = check_feeds(working, [feeds])[0] if feeds is not None else None
    capture = capture_onnx(working, checked)
    name = os.path.basename(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else None
    return analyze_onnx_capture(capture, name or capture.graph.name or "ONNX model")


def prune_onnx(
    model: OnnxSource,
    passes: Sequence[Pass] | None = None,
    *,
    recipe: str | os.PathLike | None = None,
    calibration: Iterable[Mapping[str, Any]] | None = None,
    experimental_order: bool = False,
    base_dir: str | os.PathLike | None = None,
) -> OnnxPruneResult:
    """Run ``passes`` (or a TOML ``recipe``) on an ONNX model: a path, an ``onnx.ModelProto`` or an
    ``onnx_ir.Model`` (never modified).  ``calibration``: dicts ``{input name: array}``; the first
    also fixes the sizes of symbolic input dims for the analysis (else generated feeds are used,
    see :func:`graphprune.frontends.onnx.capture.example_feeds`).  Every pass must support ONNX models; the
    order is checked as for :func:`graphprune.prune`."""
    manager = pass_manager(passes, recipe, experimental_order)
    unsupported = [p.name for p in manager.passes if ONNX not in p.modes]
    if unsupported:
        raise ContractError(
            f"{', '.join(unsupported)} does not run on ONNX models yet; ONNX models support {', '.join(_onnx_passes())}"
        )
    working = read_model(model, base_dir)
    stage, masked = _stage_of(working)
    manager.check_order(stage, ONNX)
    feeds = check_feeds(working, calibration) if calibration is not None else None
    if feeds is not None and not feeds:
        raise InputError("calibration is empty: give at least one feed {input name: array}")
    interface = _interface(working)
    shapes_before = {name: list(working.graph.initializers[name].shape) for name, _, _ in weight_layers(working)}
    capture = capture_onnx(working, feeds[0] if feeds else None)
    state = OnnxState(capture, stage, feeds, masked=masked)
    name = (
        os.path.basename(os.fspath(model))
        if isinstance(model, (str, os.PathLike))
        else (capture.graph.name or "ONNX model")
    )
    report = Report(name, state.param_count(), state.macs(), pipeline=[repr(p) for p in manager.passes])
    state = manager.run(state, report, capture.outputs)
    sources = onnx_files(model) if isinstance(model, (str, os.PathLike)) else []
    return OnnxPruneResult(
        model=state.capture.model,
        report=report,
        stage=state.stage,
        plans=state.plans,
        masked=state.masked,
        feeds=capture.feeds,
        interface=interface,
        shapes_before=shapes_before,
        float_outputs=state.float_outputs,
        sources=sources,
        values=state.updated,
    )


def apply_plan_file_onnx(
    model: OnnxSource,
    plan: PlanFile | str | os.PathLike,
    feeds: Mapping[str, Any] | None = None,
    *,
    base_dir: str | os.PathLike | None = None,
) -> ir.Model:
    """Re-apply a saved plan of an ONNX run to an ONNX model (never modified): its structured plans in
    order, each checked against the graph's analysis at that point, then its new values and its N:M
    masks.  Returns the verified onnx_ir model (``ir.save`` writes it)."""
    plan = PlanFile.reapplicable(plan)
    if plan.low_rank:
        raise InputError(
            f"this plan puts low-rank paths beside {len(plan.low_rank)} layers, which re-applying a plan to an "
            "ONNX model cannot add yet: apply it to the PyTorch model (gp.apply_plan_file) and export that"
        )
    working = read_model(model, base_dir)
    capture = capture_onnx(working, check_feeds(working, [feeds])[0] if feeds is not None else None)
    for structured in plan.structured:
        capture = apply_onnx_plan(capture, analyze_onnx_capture(capture), structured)
    masked = copy_model(capture.model)
    for name, value in plan.values.items():
        initializer = masked.graph.initializers.get(name)
        if initializer is None:
            raise InputError(f"the plan has a new value for {name}, which this model does not have")
        shape = list(initializer.const_value.shape.numpy())
        if list(value.shape) != shape:
            raise InputError(f"the plan's value for {name} is {list(value.shape)}, the weight is {shape}")
        dtype = initializer.const_value.numpy().dtype
        initializer.const_value = ir.tensor(value.numpy().astype(dtype), name=name)
    for name, record in plan.masks.items():
        value = masked.graph.initializers.get(name)
        if value is None:
            raise InputError(f"the plan masks {name}, which this model does not have")
        record.check_shape(name, tuple(value.const_value.shape.numpy()))
        value.const_value = ir.tensor(value.const_value.numpy() * record.mask.numpy(), name=name)
    run_model(masked, capture.feeds)  # still runs
    return masked


def _stage_of(model: ir.Model) -> tuple[Stage, dict[str, MaskedWeight]]:
    """The stage and N:M weights a model records in its graphprune metadata (a model this
    function wrote before); a model without it is dense."""
    stage = model.metadata_props.get(STAGE_KEY)
    masked = {}
    for name, record in json.loads(model.metadata_props.get(NM_KEY, "{}")).items():
        n, m = (int(x) for x in record["pattern"].split(":"))
        rank = len(model.graph.initializers[name].shape) if name in model.graph.initializers else 2
        layout = CONV1D if record["axis"] == 0 else CONV if rank > 2 else LINEAR
        masked[name] = MaskedWeight(NMPattern(n, m, layout), record["axis"])
    try:
        return (Stage[stage.upper()] if stage else Stage.DENSE), masked
    except KeyError:
        raise InputError(f"the model's {STAGE_KEY} metadata is {stage!r}, not a graphprune stage") from None


def _onnx_passes() -> list[str]:
    import graphprune.passes as passes_module

    return sorted(
        name
        for name in passes_module.__all__
        if isinstance(getattr(passes_module, name), type)
        and issubclass(getattr(passes_module, name), Pass)
        and ONNX in getattr(passes_module, name).modes
    )


__all__ = ["MaskedWeight", "OnnxPruneResult", "OnnxState", "analyze_onnx", "apply_plan_file_onnx", "prune_onnx"]
