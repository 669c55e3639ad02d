"""The public entry points: ``analyze`` and ``prune``."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from graphprune.algorithms.nm import NMPattern
from graphprune.algorithms.quant import QuantPlan
from graphprune.core.costs import OpCost
from graphprune.core.depth import BlockRemoval
from graphprune.core.groups import Analysis
from graphprune.core.pipeline import STREAMED, Pass, Stage
from graphprune.core.plan import Plan
from graphprune.core.report import Report
from graphprune.emit.devices import Device
from graphprune.emit.devices import device as device_spec
from graphprune.emit.report_page import layer_rows, weight_shapes, write_report
from graphprune.emit.roofline import Roofline, predict
from graphprune.emit.sparse_kernels import SparseKernelReport, to_sparse_kernels
from graphprune.errors import InputError
from graphprune.frontends.torch.analysis import analyze
from graphprune.frontends.torch.calibration import check_calibration
from graphprune.frontends.torch.capture import (
    ExampleInputs,
    capture,
    input_leaves,
    input_spec,
    normalize_inputs,
    run_outputs,
)
from graphprune.frontends.torch.copying import clone
from graphprune.frontends.torch.costs import graph_costs, layer_formats, model_costs
from graphprune.frontends.torch.lowrank import low_rank_paths, unwrapped, wrapped
from graphprune.frontends.torch.macs import count_params, graph_macs
from graphprune.frontends.torch.masks import capture_masked, nm_masks, stored_at
from graphprune.frontends.torch.state import CompressionState, detect_stage
from graphprune.frontends.torch.streaming import Stream
from graphprune.io.outputs import Outputs
from graphprune.io.plan_file import PlanFile
from graphprune.io.recipe import pass_manager
from graphprune.io.tensor_store import TensorFiles

if TYPE_CHECKING:
    from graphprune.emit.onnx_export import ExportReport


@dataclass
class PruneResult:
    """The compressed model and what happened to it."""

    module: nn.Module
    report: Report
    stage: Stage
    plans: list[Plan | QuantPlan] = field(default_factory=list)
    example_inputs: ExampleInputs = ()
    shapes_before: dict[str, list[int]] = field(default_factory=dict)  # weight shape per layer, before
    masks: dict[str, tuple[torch.Tensor, NMPattern]] = field(default_factory=dict)  # N:M masks the run set
    updated: set[str] = field(default_factory=set)  # tensors given new values (see CompressionState.updated)
    dense_costs: list[OpCost] = field(default_factory=list)  # the input model's ops, for gp.roofline

    def write_report(
        self,
        directory: str | os.PathLike,
        latency_ms: dict[str, float] | None = None,
        *,
        device: str | Device | None = "cpu",
        overwrite: bool = False,
        outputs: Outputs | None = None,
    ) -> list[str]:
        """Report pages (report.html with plots, report.md, report.json, PNGs) in ``directory``
        (see :func:`graphprune.emit.report_page.write_report`), with the roofline on ``device``
        (see :func:`roofline`; None leaves it out); returns the file names."""
        return write_report(
            directory,
            self.report,
            layer_rows(self.shapes_before, self.module),
            latency_ms,
            roofline=roofline(self, device=device) if device is not None else None,
            overwrite=overwrite,
            outputs=outputs,
        )

    def export_onnx(
        self, path: str | os.PathLike, *, overwrite: bool = False, outputs: Outputs | None = None, **options: Any
    ) -> ExportReport:
        """Write the compressed model as a verified ONNX file (see :func:`graphprune.export_onnx`);
        the metadata records this run's pipeline."""
        from graphprune.emit.onnx_export import export_onnx  # the ONNX stack loads only when used

        return export_onnx(
            self.module,
            self.example_inputs,
            path,
            pipeline=self.report.pipeline,
            overwrite=overwrite,
            outputs=outputs,
            **options,
        )

    def plan_file(self) -> PlanFile:
        """Everything this run decided, as data (see :mod:`graphprune.io.plan_file`), with the new
        values of the tensors a pass changed (unmasked; the masks apply on top) and the low-rank
        paths, named as in the model without them."""
        paths = low_rank_paths(self.module)
        masks = {unwrapped(name, paths): mask for name, mask in self.masks.items()}
        plan = PlanFile.of(self.report.model_name, self.report.pipeline, self.plans, masks)
        plan.values = {
            name: stored_at(self.module, wrapped(name, paths)).detach().cpu().clone() for name in sorted(self.updated)
        }
        plan.low_rank = {
            layer: (path.down.weight.detach().cpu().clone(), path.up.weight.detach().cpu().clone(), path.layout)
            for layer, path in paths.items()
        }
        plan.inputs = input_spec(self.example_inputs)
        return plan

    def save_plan(
        self, path: str | os.PathLike, *, overwrite: bool = False, outputs: Outputs | None = None
    ) -> tuple[str, str]:
        """Write :meth:`plan_file` as ``<path>.json`` + ``<path>.safetensors``; returns both paths
        (see :meth:`graphprune.io.plan_file.PlanFile.save`)."""
        return self.plan_file().save(path, overwrite=overwrite, outputs=outputs)

    def to_sparse_kernels(self, **options: Any) -> tuple[nn.Module, SparseKernelReport]:
        """The module with its 2:4 layers on sparse tensor-core kernels where they are faster
        (see :func:`graphprune.emit.sparse_kernels.to_sparse_kernels`)."""
        return to_sparse_kernels(self.module, self.example_inputs, **options)


def prune(
    model: nn.Module,
    example_inputs: ExampleInputs,
    passes: Sequence[Pass] | None = None,
    *,
    recipe: str | os.PathLike | None = None,
    calibration: Iterable[Any] | None = None,
    inplace: bool = False,
    prunable_outputs: Sequence[str] = (),
    experimental_order: bool = False,
) -> PruneResult:
    """Run ``passes`` (or a TOML ``recipe``) on ``model`` and return the compressed module and a report.

    The caller's model is not modified unless ``inplace=True`` (not even by a forward that counts
    its calls: the reference outputs come from the working copy).  The pass order is checked
    against the model's own stage (a result of an earlier run keeps its masks and quantization)
    before anything runs; ``experimental_order=True`` lets a pass run on a stage it accepts only
    for experiments, e.g. sparsity after quantization, and the report records it.  Outputs keep
    their shapes unless named in ``prunable_outputs`` (see :func:`graphprune.analyze`).
    """
    if not isinstance(model, nn.Module):
        raise InputError(
            f"gp.prune needs a torch.nn.Module, got {type(model).__name__} {_shown(model)}: wrap a "
            "function in an nn.Module whose forward calls it"
        )
    manager = pass_manager(passes, recipe, experimental_order)
    stage = detect_stage(model)
    manager.check_order(stage)
    _check_finite(model)
    shapes_before = weight_shapes(model)
    captured = capture_masked(model, *normalize_inputs(example_inputs))  # a model pruned before keeps its layers
    if calibration is not None:  # materialised once: every pass sees the same batches, even from a generator
        calibration = check_calibration(list(calibration), captured.args, captured.kwargs)
    working = model if inplace else clone(model)
    reference = run_outputs(working, captured)  # a forward may change its module's state: never the caller's
    reads_dense = any(p.reads_dense_weights() for p in manager.passes)
    state = CompressionState(
        working,
        captured,
        stage,
        calibration=calibration,
        prunable_outputs=tuple(prunable_outputs),
        dense=(clone(model) if inplace else model) if reads_dense else None,
    )
    report = Report(
        type(model).__name__,
        count_params(model),
        graph_macs(captured.graph_module),
        pipeline=[repr(p) for p in manager.passes],
    )
    state = manager.run(state, report, reference)
    return PruneResult(
        module=state.model,
        report=report,
        stage=state.stage,
        plans=state.plans,
        example_inputs=example_inputs,
        shapes_before=shapes_before,
        masks=nm_masks(state.model),
        updated=state.updated,
        dense_costs=graph_costs(captured),
    )


def plan(
    model: nn.Module,
    example_inputs: ExampleInputs,
    passes: Sequence[Pass] | None = None,
    *,
    recipe: str | os.PathLike | None = None,
    calibration: Iterable[Any] | None = None,
    weights: str | os.PathLike | None = None,
    blocks: str | None = None,
    prefix: str = "",
    scratch: str | os.PathLike | None = None,
    prunable_outputs: Sequence[str] = (),
    experimental_order: bool = False,
) -> PlanFile:
    """What ``passes`` decide for ``model``, as a :class:`PlanFile` (``.save`` it, apply it with
    :func:`graphprune.apply_to_checkpoint` or :func:`graphprune.apply_plan_file`); ``.report`` says
    what each pass did.

    Without ``weights`` this is :func:`prune` keeping only the decisions.  With ``weights`` (a
    folder of safetensors shards, or one file) the model is never built: its parameters must be
    on ``meta`` (build it under :func:`graphprune.parameters_on_meta`), weight criteria read one
    tensor at a time from the checkpoint, and calibration runs block by block (``blocks`` names
    the layer list when it is not the largest list of like modules; see
    :mod:`graphprune.frontends.torch.streaming`).  ``prefix`` is prepended to the model's names to find them in the
    checkpoint.  Masks and SparseGPT's new weights go to part files in ``scratch`` (default: the
    system's temporary folder) until the plan is saved; they are removed with the plan object.
    """
    if weights is None:
        streaming_only = [
            name for name, value in (("blocks", blocks), ("prefix", prefix), ("scratch", scratch)) if value
        ]
        if streaming_only:
            raise InputError(f"{', '.join(streaming_only)} apply to streamed plans only: pass weights= a checkpoint")
        result = prune(
            model,
            example_inputs,
            passes,
            recipe=recipe,
            calibration=calibration,
            prunable_outputs=prunable_outputs,
            experimental_order=experimental_order,
        )
        decided = result.plan_file()
        decided.report = result.report
        return decided
    manager = pass_manager(passes, recipe, experimental_order)
    real = [name for name, p in model.named_parameters() if p.device.type != "meta"]
    if real:
        raise InputError(
            f"gp.plan(weights=...) reads the weights from the checkpoint, so the model's parameters must "
            f"be on meta ({len(real)} are not, first {real[0]}): build it under "
            "graphprune.parameters_on_meta(), or call gp.plan without weights="
        )
    stage = detect_stage(model)
    manager.check_order(stage, STREAMED)
    checkpoint = TensorFiles.folder(weights)
    captured = capture(model, example_inputs)
    data = None
    if calibration is not None:
        data = check_calibration(list(calibration), captured.args, captured.kwargs)
    folder = tempfile.mkdtemp(prefix="graphprune-plan-", dir=scratch)
    try:
        state = CompressionState(clone(model), captured, stage, prunable_outputs=tuple(prunable_outputs))
        stream = Stream(checkpoint, data or [], state.plans, folder, blocks=blocks, prefix=prefix)
        if blocks is not None:
            stream.block_list(state.model)  # a wrong name is refused even where no pass runs block by block
        state.stream, state.calibration = stream, stream if data is not None else None
        report = Report(
            type(model).__name__,
            count_params(model),
            graph_macs(captured.graph_module),
            pipeline=[repr(p) for p in manager.passes],
        )
        state = manager.run(state, report, None)
        masks, values = stream.decided()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(masks.tensors, shutil.rmtree, folder, True)  # the part files live as long as their reader
    return PlanFile(
        model=type(model).__name__,
        pipeline=report.pipeline,
        structured=[p for p in state.plans if isinstance(p, Plan)],
        depth=next((p for p in state.plans if isinstance(p, BlockRemoval)), None),
        masks=masks,
        values=values,
        report=report,
        inputs=input_spec(example_inputs),
    )


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            raise InputError(f"parameter {name} contains NaN or Inf: no pruning criterion can rank it")


__all__ = ["Analysis", "PruneResult", "analyze", "plan", "prune"]


def roofline(
    subject: PruneResult | nn.Module,
    example_inputs: ExampleInputs | None = None,
    *,
    device: str | Device = "cpu",
    precision: str | None = None,
    batch: int | None = None,
    fuse: bool = True,
) -> Roofline:
    """The predicted time of a compressed model on ``device`` against its dense self, per layer
    and in total (:mod:`graphprune.emit.roofline`: ``.speedup``, ``.table()``, ``.plot(path)``).

    ``subject`` is a :class:`PruneResult` (the dense side is the model it was made from) or a
    module with its ``example_inputs`` (the dense side is the same module without its masks and
    quantization: channels it already lost are not seen).  ``device``: ``"cpu"`` (this machine,
    measured once and cached), a GPU of :data:`graphprune.emit.devices.DEVICES` (``"h100"``...),
    or a :class:`~graphprune.emit.devices.Device`.  ``precision``: the float format of the
    layers not quantized (``"bf16"`` where the device has it, else ``"fp32"``).  ``batch``: the
    batch size to predict for (default: the example's).  ``fuse``: a weight layer's epilogues
    (a BatchNorm or activation of its output alone) cost nothing, as runtimes fold or fuse them.
    """
    if isinstance(subject, PruneResult):
        if example_inputs is not None:
            raise InputError("gp.roofline(result): a PruneResult carries its example inputs; give none")
        module, example_inputs, dense = subject.module, subject.example_inputs, subject.dense_costs
    elif isinstance(subject, nn.Module):
        if example_inputs is None:
            raise InputError("gp.roofline(model, example_inputs, ...): a module needs example inputs")
        module, dense = subject, None
    else:
        raise InputError(f"gp.roofline takes a PruneResult or an nn.Module, got {type(subject).__name__}")
    spec = device_spec(device)
    precision = precision or ("bf16" if "bf16" in spec.dense else "fp32")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise InputError(f"batch must be a positive integer, got {batch!r}")
    compressed = model_costs(module, example_inputs)
    example_batch = _batch_size(example_inputs)
    return predict(
        dense if dense is not None else compressed,
        compressed,
        layer_formats(module, precision),
        spec,
        precision=precision,
        scale=(batch or example_batch) / example_batch,
        batch=batch or example_batch,
        fuse=fuse,
    )


def _batch_size(example_inputs: ExampleInputs) -> int:
    """The example's batch: dim 0 of its first tensor with one."""
    args, kwargs = normalize_inputs(example_inputs)
    first = next((v for _, v in input_leaves(args, kwargs) if isinstance(v, torch.Tensor) and v.dim()), None)
    return int(first.shape[0]) if first is not None else 1
