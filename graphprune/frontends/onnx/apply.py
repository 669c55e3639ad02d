"""Apply a Plan to an ONNX graph: shrink initializers, rewrite shape constants, then prove it.

The same plan data as for torch (kept indices per group) and the same index algebra
(:func:`graphprune.core.plan.kept_positions`, :func:`graphprune.core.plan.constant_values`) decide
what changes.  The result is a new model; the caller's is never touched.  Values keep their
names; graph inputs and outputs keep their names, types and shapes.  Verification runs the
pruned graph in onnxruntime with every value exposed: each value must have exactly the shape the
plan predicts, the outputs their original shapes, and the ONNX checker must accept the model; then
the value oracle (:mod:`graphprune.frontends.torch.value_oracle`) compares every value with the dense model's
whose removed channels are zero.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

import onnx
from graphprune.core.plan import Plan, constant_values, kept_positions
from graphprune.core.values import Site
from graphprune.core.values import compare as compare_values
from graphprune.errors import ApplyError
from graphprune.frontends.onnx.analysis import OnnxAnalysis
from graphprune.frontends.onnx.capture import OnnxCapture, measured, run_values


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy (the ONNX counterpart of :func:`graphprune.frontends.torch.copying.clone`)."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def apply_onnx_plan(capture: OnnxCapture, analysis: OnnxAnalysis, plan: Plan) -> OnnxCapture:
    """A copy of the captured model pruned by ``plan``, verified against it."""
    plan.check(analysis)
    masks = plan.masks(analysis)
    model = copy_model(capture.model)
    graph = model.graph
    spaces = analysis.spaces
    zeroed = copy_model(capture.model)  # the dense model with the removed channels zero, for the value oracle
    for name, (_, dims) in analysis.tensors.items():
        index = kept_positions(spaces, dims, masks)
        if index:
            value = graph.initializers[name]
            array = value.const_value.numpy()
            dense = np.array(array, copy=True)
            for d, idx in index:
                array = np.take(array, idx.numpy(), axis=d)
                removed = np.setdiff1d(np.arange(dense.shape[d]), idx.numpy())
                if np.issubdtype(dense.dtype, np.floating):
                    dense[(slice(None),) * d + (removed,)] = 0
            _set_initializer(value, array)
            _set_initializer(zeroed.graph.initializers[name], dense)
    nodes = {node.name: node for node in graph}
    for old, paths in constant_values(analysis, masks).items():
        node = nodes[old.name]
        for path, new in paths.items():
            _write_constant(node, path, new)
    predicted = {}
    analysed = {v.name: v for v in _values(analysis.captured.graph)}  # the values the analysis knows
    for value in _values(graph):
        dims = analysis.context.dims(analysed.get(value.name))
        if dims is not None:
            predicted[value.name] = tuple(spaces.kept_size(a, masks) for a in dims)
            _update_declared_shape(value, capture.shapes[value.name], predicted[value.name])
    pruned, values = _verify(model, capture, predicted)
    compare_values(_sites(analysis, run_values(zeroed, capture.feeds), values), analysis, masks)
    return pruned


def _sites(analysis: OnnxAnalysis, dense: dict[str, np.ndarray], pruned: dict[str, np.ndarray]) -> dict[str, Site]:
    """The sites of an ONNX graph: every node output, by name (the pruned graph keeps the names).
    Sizes read at run time (``Shape`` and the integer vectors computed from it) are the pruned
    sizes by design: they are not compared, and what they shape is."""

    def dims(value: ir.Value | None) -> list[int] | None:
        return analysis.context.dims(value) if value is not None else None

    sites, sizes = {}, set()
    for node in analysis.captured.graph:
        reads_size = any(v is not None and v.name in sizes for v in node.inputs)
        for value in node.outputs:
            if not value.name:
                continue
            want, got = dense.get(value.name), pruned.get(value.name)
            integer = isinstance(want, np.ndarray) and want.dtype.kind in "iu"
            if value in analysis.context.sizes or (integer and reads_size):
                sizes.add(value.name)
            sites[value.name] = Site(
                where=f"value {value.name!r} (output of {node.name}: {node.op_type})",
                inputs=tuple(v.name for v in node.inputs if v is not None),
                dims=dims(value),
                dense=torch.from_numpy(np.asarray(want)) if isinstance(want, np.ndarray) else None,
                pruned=torch.from_numpy(np.asarray(got)) if isinstance(got, np.ndarray) else None,
                compared=value.name not in sizes,
            )
    return sites


def _values(graph: ir.Graph) -> list[ir.Value]:
    return [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs)]


def _set_initializer(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def _write_constant(node: ir.Node, path: tuple, new: int) -> None:
    where, key, *rest = path
    if where == "input":
        value = node.inputs[key]
        array = np.array(value.const_value.numpy(), copy=True)
        flat = array.reshape(-1)
        flat[rest[0] if rest else 0] = new
        _set_initializer(value, flat.reshape(array.shape))
        return
    old = node.attributes[key]
    if rest:
        values = list(old.value)
        values[rest[0]] = new
        node.attributes[key] = ir.Attr(key, old.type, values)
    else:
        node.attributes[key] = ir.Attr(key, old.type, new)


def _update_declared_shape(value: ir.Value, measured: tuple[int, ...], kept: tuple[int, ...]) -> None:
    """Rewrite the declared shape where a dim was pruned; symbolic dims (a batch) stay symbolic."""
    if value.shape is None or value.is_initializer() or measured == kept:
        return
    value.shape = ir.Shape([k if m != k else old for old, m, k in zip(value.shape, measured, kept)])


def _verify(
    model: ir.Model, original: OnnxCapture, predicted: dict[str, tuple[int, ...]]
) -> tuple[OnnxCapture, dict[str, np.ndarray]]:
    """The pruned model checked by shapes, and every value it computes on the example feeds."""
    try:
        onnx.checker.check_model(ir.to_proto(model))
    except onnx.checker.ValidationError as exc:
        raise ApplyError(f"the pruned model fails the ONNX checker: {exc}") from exc
    try:
        values = run_values(model, original.feeds)
        shapes, outputs = measured(model, original.feeds, values)
    except Exception as exc:
        raise ApplyError(f"the pruned model does not run in onnxruntime: {exc}") from exc
    for name, want in predicted.items():
        got = shapes.get(name)
        if got is not None and got != want:
            raise ApplyError(
                f"value {name!r}{_producer_name(model, name)} has shape {list(got)} in the pruned model, the plan "
                f"predicts {list(want)}"
            )
    for value, before, after in zip(model.graph.outputs, original.outputs, outputs):
        if np.shape(before) != np.shape(after):
            raise ApplyError(
                f"output {value.name!r} changed shape from {list(np.shape(before))} to {list(np.shape(after))}"
            )
    return OnnxCapture(model=model, feeds=original.feeds, shapes=shapes, outputs=outputs), values


def _producer_name(model: ir.Model, name: str) -> str:
    for node in model.graph:
        if any(v.name == name for v in node.outputs):
            return f" (output of {node.name}: {node.op_type})"
    return ""
