"""Emit an optimized, verified ONNX file from a (compressed) PyTorch module.

Pipeline: copy the module, bake N:M masks into the weights, strip fake quantization (its
parameters are read off the model first), export with torch's dynamo exporter (dynamic batch
dimension by default), turn ``Transpose(W)`` weight reads into transposed initializers, optimize
with onnxscript's optimizer (constant folding with no size limits, BatchNorm fused, dead nodes
removed), write the model's int8 parameters as QDQ nodes (:mod:`graphprune.emit.qdq`), and record
metadata.  The file is staged beside ``path`` (an :class:`~graphprune.io.outputs.Outputs` claim) and
verified there: the
ONNX checker; onnxruntime's outputs against the PyTorch module's on the example inputs and on a
batch one larger (fp32: largest error within ``fp32_tolerance`` of the largest output; int8:
relative L2 error against the fake-quant model within ``int8_tolerance``, or else no further from the
float model than ``INT8_MARGIN`` times the fake-quant model's own error.  onnxruntime's integer
kernels and the fake quantization compute the same values, 1e-7 apart on small test models, except
where a float value feeding a quantizer lies on a rounding boundary and moves by one step; in deep
networks such steps compound (1.6% on a random BERT-base, whose int8 error is 2.3% either way), so
the second test tells such drift from a wrongly written layer, which lands far from the float
model); every N:M pattern on the
written weights; and, for int8, that onnxruntime fused every quantized layer (no float
Conv/Gemm/MatMul left reading a DequantizeLinear in its optimized graph).  Only then is it moved
into place, so a failure leaves no partial file and an existing file untouched.  An existing file
is replaced only if graphprune wrote it (its ``producer_name``, see :func:`made_by_graphprune`) or
with ``overwrite=True``.  Models over 2 GB store their weights as external data beside the file
(``<name>.data``).
"""

from __future__ import annotations

import inspect
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript.optimizer
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from graphprune.algorithms.nm import CONV1D, NMPattern, nm_holds
from graphprune.algorithms.number_formats import FP8, INT4, INT8
from graphprune.core.pipeline import Stage
from graphprune.emit.matmul_nbits import SUFFIX as INT4_SUFFIX
from graphprune.emit.matmul_nbits import ZERO_POINT as INT4_ZERO_POINT
from graphprune.emit.matmul_nbits import insert_matmul_nbits, unpack_int4
from graphprune.emit.qdq import TRANSPOSED, insert_qdq, pretranspose, stored_integers
from graphprune.errors import ApplyError, CaptureError, InputError
from graphprune.frontends.onnx.capture import quiet_onnx_tools
from graphprune.frontends.torch.capture import (
    ExampleInputs,
    eval_mode,
    no_kv_cache,
    normalize_inputs,
    set_eval,
    tensor_at,
)
from graphprune.frontends.torch.copying import clone
from graphprune.frontends.torch.fake_quant import read_quant_plan, strip_quantization
from graphprune.frontends.torch.masks import finalize, masked_weights
from graphprune.frontends.torch.state import detect_stage
from graphprune.io.outputs import Outputs, writing

PRODUCER = "graphprune"  # the producer_name of every ONNX file graphprune writes
INT8_MARGIN = 1.1  # int8 file vs float model may be at most this times the fake-quant model's error
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB; leave room for the graph itself
FLOAT_COMPUTE = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NhwcConv"}
QUANTIZED_COMPUTE = {
    "MatMulNBits",
    "QLinearConv",
    "QGemm",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
}
KERNELS_SAY = {  # how the report's line on the quantized layers says what onnxruntime runs
    INT4: "written as",
    FP8: "run by onnxruntime on CPU as DequantizeLinear + float kernels (it has no fp8 kernels there)",
}


@dataclass
class ExportReport:
    """What was written and how it was checked."""

    path: str
    stage: Stage
    max_error: float  # max |onnxruntime - torch| / max |torch| over the checked batches (fp32 check)
    tolerance: float
    l2_error: float = 0.0  # ||onnxruntime - torch|| / ||torch||, worst output (int8 check)
    quantization_error: float = 0.0  # int8: ||fake-quant - float|| / ||float||, worst output
    onnx_quantization_error: float = 0.0  # int8: ||onnxruntime - float|| / ||float||, worst output
    quantized_layers: int = 0
    quant_format: str = ""  # "int8", "int4" or "fp8" where quantized
    quantized_ops: dict[str, int] = field(default_factory=dict)  # in onnxruntime's optimized graph
    sparse_weights: dict[str, str] = field(default_factory=dict)  # ONNX initializer -> N:M pattern
    external_data: bool = False
    reference: str = "torch"  # what onnxruntime's outputs were compared with (PyTorch, or the graph as written)

    def __str__(self) -> str:
        checked = "relative L2" if self.quantized_layers else "max relative"
        lines = [
            f"wrote {self.path} (stage {self.stage}{', external data' if self.external_data else ''})",
            f"  onnxruntime vs {self.reference}: max relative error {self.max_error:.2e}, relative L2 "
            f"{self.l2_error:.2e} ({checked} tolerance {self.tolerance:g})",
        ]
        if self.quantized_layers:
            fake = "PyTorch" if self.reference == "torch" else "graph"
            lines.append(
                f"  {self.quant_format} error against the float model: onnxruntime "
                f"{self.onnx_quantization_error:.2e}, fake-quant {fake} {self.quantization_error:.2e}"
            )
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.quantized_ops.items()))
            ran = KERNELS_SAY.get(self.quant_format, "fused by onnxruntime into")
            lines.append(f"  {self.quant_format} layers: {self.quantized_layers}, {ran} {ops}".rstrip())
        if self.sparse_weights:
            lines.append(f"  N:M weights (dense with exact zeros, recorded in metadata): {len(self.sparse_weights)}")
        return "\n".join(lines)


def export_onnx(
    module: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike,
    *,
    pipeline: Sequence[str] = (),
    dynamic_batch: bool = True,
    fp32_tolerance: float = 1e-4,
    int8_tolerance: float = 0.01,
    opset: int | None = None,
    exporter: str = "dynamo",
    overwrite: bool = False,
    outputs: Outputs | None = None,
) -> ExportReport:
    """Write ``module`` as an optimized ONNX file at ``path`` and verify it in onnxruntime.

    ``module`` is not modified.  ``pipeline`` (pass descriptions) goes into the metadata.  An
    existing ``path`` is replaced only if graphprune wrote it, or with ``overwrite=True``; with
    ``outputs`` the file joins the caller's transaction and appears when it commits.
    ``exporter="torchscript"`` uses torch's older TorchScript exporter, for float models the
    dynamo exporter fails on (Hugging Face Swin with torch 2.13); it is not used on its own: its
    parameter names differ from the module's, so N:M records and int8 QDQ need the default.
    Raises :class:`ApplyError` (nothing written) when the file does not match the module.
    """
    if not isinstance(module, nn.Module):
        raise InputError(f"export_onnx needs a torch.nn.Module, got {type(module).__name__}")
    if exporter not in ("dynamo", "torchscript"):
        raise InputError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    args, kwargs = normalize_inputs(example_inputs)
    stage, plan, patterns = detect_stage(module), read_quant_plan(module), masked_weights(module)
    if exporter == "torchscript" and (plan or patterns):
        raise InputError(
            "exporter='torchscript' writes float models only: its weight names differ from the "
            "module's, so N:M patterns and int8 QDQ cannot be attached; use the default exporter"
        )
    with (
        writing(outputs, overwrite=overwrite) as out,
        tqdm(total=4, desc="ONNX export", unit="step", disable=None) as progress,
    ):
        path = out.check(path, ours=made_by_graphprune)  # refused before the export's work
        float_model = set_eval(strip_quantization(finalize(clone(module))))
        progress.set_postfix_str("torch.onnx.export")
        model = (
            _export(float_model, args, kwargs, dynamic_batch, opset)
            if exporter == "dynamo"
            else _export_torchscript(float_model, args, kwargs, dynamic_batch, opset)
        )
        progress.update()
        progress.set_postfix_str("optimize")
        pretranspose(model, (set(plan.layers) if plan else set()) | set(patterns))  # names kept for QDQ and N:M records
        with quiet_onnx_tools():
            onnxscript.optimizer.optimize(model, input_size_limit=1 << 62, output_size_limit=1 << 62)
        progress.update()
        progress.set_postfix_str("QDQ" if plan else "metadata")
        weights = {name: tensor_at(float_model, name).detach().numpy() for name in (plan.layers if plan else {})}
        quantized = 0
        if plan is not None:
            quantized = (insert_matmul_nbits if plan.kind == INT4 else insert_qdq)(model, plan, weights)
        sparse = _sparse_records(model, patterns)
        model.metadata_props.update(graphprune_metadata(stage, pipeline, sparse))
        staged, external = save_model(model, path, out)
        progress.update()
        progress.set_postfix_str("verify in onnxruntime")
        report = ExportReport(
            path,
            stage,
            max_error=0.0,
            tolerance=int8_tolerance if plan else fp32_tolerance,
            quantized_layers=quantized,
            quant_format=plan.kind if plan else "",
            external_data=external,
            sparse_weights={k: v["pattern"] for k, v in sparse.items()},
        )
        _verify(staged, module, float_model, args, kwargs, dynamic_batch, report)
        progress.update()
    return report


def save_model(model: ir.Model, path: str | os.PathLike, outputs: Outputs) -> tuple[str, bool]:
    """Claim ``path`` in ``outputs`` and save ``model`` there, staged, with graphprune as its
    producer (weights as external data ``<name>.data`` over ``EXTERNAL_DATA_BYTES``); returns the
    staged file, to be verified before the transaction commits, and whether its data is external."""
    staged = outputs.claim(path, ours=made_by_graphprune)
    external = sum(v.const_value.nbytes for v in model.graph.initializers.values()) > EXTERNAL_DATA_BYTES
    if external:
        outputs.claim(os.fspath(path) + ".data", ours=lambda data: made_by_graphprune(data.removesuffix(".data")))
    from graphprune import __version__

    model.producer_name, model.producer_version = PRODUCER, __version__
    ir.save(model, staged, external_data=os.path.basename(staged) + ".data" if external else None)
    return staged, external


def made_by_graphprune(path: str) -> bool:
    """Whether the ONNX file at ``path`` was written by graphprune (its producer_name), so that
    writing it again may replace it; a file that does not parse is not."""
    try:
        return onnx.load(path, load_external_data=False).producer_name == PRODUCER
    except Exception:  # noqa: BLE001 - anything unreadable is someone else's file
        return False


def onnx_files(path: str | os.PathLike) -> list[str]:
    """The ONNX file at ``path`` and the external data files it names: what a run reading it
    must never write over."""
    files = [os.fspath(path)]
    try:
        model = onnx.load(files[0], load_external_data=False)
    except Exception:  # noqa: BLE001 - reading it is refused later, with the reason
        return files
    folder = os.path.dirname(os.path.abspath(files[0]))
    for tensor in _tensors(model.graph):
        if onnx.external_data_helper.uses_external_data(tensor):
            location = onnx.external_data_helper.ExternalDataInfo(tensor).location
            files.append(os.path.join(folder, location))
    return list(dict.fromkeys(files))


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor in ``graph``: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(subgraph)


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool, opset: int | None) -> ir.Model:
    shapes = _batch_shapes(model, args, kwargs) if dynamic_batch else None
    try:
        with no_kv_cache(model), quiet_onnx_tools():
            program = torch.onnx.export(
                model,
                args,
                kwargs=kwargs,
                dynamo=True,
                optimize=False,
                dynamic_shapes=shapes,
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        hint = ""
        if dynamic_batch and any(
            t.dim() and t.shape[0] == 1 for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        ):
            hint = (
                " With dynamic_batch=True every input's first dim is the batch, which cannot be traced from "
                "a batch of 1: give examples with a batch of at least 2, or pass dynamic_batch=False."
            )
        raise CaptureError(
            f"torch's ONNX exporter failed on {type(model).__name__}: "
            f"{type(root).__name__}: {(str(root).strip() or '?').splitlines()[0]}{hint}"
        ) from exc
    return program.model


def _export_torchscript(
    model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool, opset: int | None
) -> ir.Model:
    """The TorchScript exporter's graph; inputs named after the forward's parameters."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    names = [n for n, v in bound.arguments.items() if isinstance(v, torch.Tensor)]
    if len(names) != len(bound.arguments):
        raise InputError("exporter='torchscript' takes tensor inputs only (no nested or non-tensor arguments)")
    buffer = io.BytesIO()
    dims = {n: {0: "batch"} for n in names if bound.arguments[n].dim() > 0} if dynamic_batch else None
    try:
        with no_kv_cache(model), quiet_onnx_tools(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                tuple(bound.arguments.values()),
                buffer,
                dynamo=False,
                input_names=names,
                dynamic_axes=dims,
                opset_version=opset or 17,
            )
    except Exception as exc:
        raise CaptureError(
            f"torch's TorchScript ONNX exporter failed on {type(model).__name__}: "
            f"{type(exc).__name__}: {(str(exc).strip() or '?').splitlines()[0]}"
        ) from exc
    return ir.from_proto(onnx.load_from_string(buffer.getvalue()))


def _batch_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``dynamic_shapes`` marking dim 0 of every input tensor as one shared batch dimension."""
    batch = torch.export.Dim("batch")
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(x: Any) -> Any:
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _sparse_records(model: ir.Model, patterns: dict[str, tuple[torch.Tensor, NMPattern]]) -> dict[str, dict]:
    """Per N:M weight: its ONNX initializer, pattern and the axis its groups run along there;
    the pattern is checked on the written values."""
    records = {}
    initializers = model.graph.initializers
    for name, (_tensor, pattern) in patterns.items():
        axis = 0 if pattern.layout == CONV1D else 1
        found = [
            (n, t)
            for n, t in (
                (name, False),
                (name + TRANSPOSED, True),
                (name + "_quantized", False),
                (name + TRANSPOSED + "_quantized", True),
                (name + INT4_SUFFIX, False),
            )
            if n in initializers
        ]
        if not found:
            raise ApplyError(
                f"N:M weight {name} is not an initializer of the exported graph (the optimizer "
                "rewrote it), so its pattern cannot be recorded"
            )
        onnx_name, transposed = found[0]
        axis = 1 - axis if transposed else axis
        if onnx_name.endswith(INT4_SUFFIX):  # packed [N, K / block, block / 2]; its groups run along K
            values, zero, axis = unpack_int4(initializers[onnx_name].const_value.numpy()), INT4_ZERO_POINT, 1
        else:
            values, zero = stored_integers(initializers, onnx_name)
        if not nm_holds(values, axis, pattern):
            raise ApplyError(f"{name} lost its {pattern} pattern in the exported graph ({onnx_name})")
        records[onnx_name] = {"pattern": str(pattern), "axis": axis, "torch_name": name, "zero_point": zero}
    return records


def graphprune_metadata(stage: Stage, pipeline: Sequence[str], sparse: dict[str, dict]) -> dict[str, str]:
    from graphprune import __version__

    return {
        "graphprune.version": __version__,
        "graphprune.stage": str(stage),
        "graphprune.pipeline": json.dumps(list(pipeline)),
        "graphprune.nm_sparsity": json.dumps(sparse),
    }


def _verify(
    staged: str,
    module: nn.Module,
    float_model: nn.Module,
    args: tuple,
    kwargs: dict,
    dynamic_batch: bool,
    report: ExportReport,
) -> None:
    session, optimized = checked_session(staged)
    checks = [(args, kwargs)]
    if dynamic_batch:
        checks.append(pytree.tree_map(_one_more, (args, kwargs)))
    for call_args, call_kwargs in checks:
        want = _outputs(module, call_args, call_kwargs)
        feeds = [t for t in pytree.tree_leaves((call_args, call_kwargs)) if isinstance(t, torch.Tensor)]
        got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), feeds, strict=False)})
        if len(got) != len(want):
            raise ApplyError(f"the ONNX model returns {len(got)} outputs, the module {len(want)}")
        record_outputs(
            report, got, want, _outputs(float_model, call_args, call_kwargs) if report.quantized_layers else None
        )
    check_outputs(report, optimized)


def checked_session(staged: str) -> tuple[ort.InferenceSession, str]:
    """The ONNX checker on a staged file, then an onnxruntime session with its default (extended)
    optimizations, which also writes the optimized graph (returned path) for :func:`check_fusion`."""
    try:
        onnx.checker.check_model(staged)
    except onnx.checker.ValidationError as exc:
        raise ApplyError(f"the written model fails the ONNX checker: {exc}; nothing was written") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # in a folder of its own inside the staging folder: never the name of a file being written
    optimized = os.path.join(tempfile.mkdtemp(dir=os.path.dirname(staged)), "optimized.onnx")
    options.optimized_model_filepath = optimized
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1048576")
    return ort.InferenceSession(staged, options, providers=["CPUExecutionProvider"]), optimized


def record_outputs(
    report: ExportReport, got: list[np.ndarray], want: list[np.ndarray], float_outputs: list[np.ndarray] | None = None
) -> None:
    """Fold one batch's comparison into ``report``: onnxruntime (``got``) against the reference
    (``want``: the module, or the fake-quant graph), and for int8 both against ``float_outputs``."""
    for g, w in zip(got, want, strict=True):
        if tuple(g.shape) != tuple(w.shape):
            raise ApplyError(f"ONNX output shape {tuple(g.shape)} differs from the reference's {tuple(w.shape)}")
        if not np.issubdtype(w.dtype, np.floating):
            if not np.array_equal(g, w):
                raise ApplyError("an integer output of the ONNX model differs from the reference's")
            continue
        report.max_error = max(report.max_error, float(np.abs(g - w).max() / (np.abs(w).max() or 1.0)))
        report.l2_error = max(report.l2_error, _l2(g, w))
    if float_outputs is not None:
        for g, w, f in zip(got, want, float_outputs, strict=True):
            if np.issubdtype(f.dtype, np.floating):
                report.quantization_error = max(report.quantization_error, _l2(w, f))
                report.onnx_quantization_error = max(report.onnx_quantization_error, _l2(g, f))


def check_outputs(report: ExportReport, optimized: str) -> None:
    """Raise unless the recorded errors are within the report's tolerance (see the module doc);
    for int8, also check what onnxruntime fused."""
    if not report.quantized_layers and report.max_error > report.tolerance:
        raise ApplyError(
            f"onnxruntime's outputs differ from the reference's by {report.max_error:.3g} of the largest "
            f"output, over the tolerance {report.tolerance:g}; nothing was written"
        )
    if (
        report.quantized_layers
        and report.l2_error > report.tolerance
        and report.onnx_quantization_error > INT8_MARGIN * report.quantization_error
    ):
        raise ApplyError(
            f"onnxruntime's {report.quant_format} outputs differ from the fake-quant reference's by "
            f"{report.l2_error:.3g} (relative L2, tolerance {report.tolerance:g}) and are further from the float model "
            f"({report.onnx_quantization_error:.3g}) than the fake-quant reference is "
            f"({report.quantization_error:.3g}); nothing was written"
        )
    if report.quantized_layers:
        report.quantized_ops = check_fusion(onnx.load(optimized), report.quant_format, report.quantized_layers)


def _outputs(module: nn.Module, args: tuple, kwargs: dict) -> list[np.ndarray]:
    with eval_mode(module), no_kv_cache(module), torch.no_grad():
        out = module(*args, **kwargs)
    return [t.detach().double().numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / (np.linalg.norm(b) or 1.0))


def _one_more(x: Any) -> Any:
    """The input with its first sample appended: a batch one larger, to check the dynamic batch."""
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return torch.cat([x, x[:1]])
    return x


def check_fusion(optimized: onnx.ModelProto, kind: str = INT8, layers: int = 0) -> dict[str, int]:
    """Raise if a float Conv/Gemm/MatMul still reads a DequantizeLinear after onnxruntime's
    optimizations (int8 and int4; fp8 layers run so on CPU, see :mod:`graphprune.emit.qdq`), or if
    fewer than ``layers`` int4 layers are MatMulNBits there; returns the count of each quantized kernel."""
    if kind == FP8:
        return {}
    producers = {out: node for node in optimized.graph.node for out in node.output}
    unfused = [
        node.name or node.op_type
        for node in optimized.graph.node
        if node.op_type in FLOAT_COMPUTE
        and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input)
    ]
    if unfused:
        raise ApplyError(
            f"onnxruntime did not fuse {len(unfused)} quantized layer(s) into int8 kernels "
            f"({', '.join(unfused[:5])}); they would run as float with extra conversions"
        )
    counts: dict[str, int] = {}
    for node in optimized.graph.node:
        if node.op_type in QUANTIZED_COMPUTE:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if kind == INT4 and counts.get("MatMulNBits", 0) < layers:
        raise ApplyError(
            f"onnxruntime's optimized graph holds {counts.get('MatMulNBits', 0)} MatMulNBits nodes for "
            f"{layers} int4 layers; nothing was written"
        )
    return counts
