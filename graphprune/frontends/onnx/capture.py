"""ONNX capture: read an ``.onnx`` model into onnx_ir with a concrete shape on every value.

The channel algebra needs the size of every dim of every value.  ONNX shape inference leaves
gaps (symbolic batch dims, shapes computed in the graph, contrib ops), so the shapes are taken
from onnxruntime itself: the model runs once on example feeds with every value exposed as an
output.  Symbolic input dims take the size the feeds give them (2 in generated feeds), which is
also how they are checked after pruning.

Two normalisations make every tensor the property of one consumer, so that pruning can resize
it without touching anything else: ``Constant`` nodes become initializers, and an initializer
read by several nodes (exporters merge equal tensors: all-zero biases, shared shape constants)
gets one copy per reader.  Equal initializers are merged again when the model is saved.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
from onnxscript.optimizer import fold_constants

import onnx
from graphprune.errors import CaptureError, InputError

OnnxSource = str | os.PathLike | onnx.ModelProto | ir.Model
Feeds = dict[str, np.ndarray]

MIN_OPSET = 7  # the oldest default-domain opset onnxruntime still runs
MAX_PROTO_BYTES = 2**31 - 1  # protobuf cannot parse a message larger than this; bigger models keep external data
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QAttention",
        "MatMulNBits",
    }
)
SYMBOLIC_DIM_SIZE = 2  # what a symbolic input dim becomes in generated feeds (1 would look like broadcasting)
_PROTO_LIMIT = 1_800_000_000  # serialise through a file with external data above this many bytes


@dataclass
class OnnxCapture:
    """A working copy of an ONNX model and what graphprune knows about it."""

    model: ir.Model
    feeds: Feeds  # the example inputs the shapes below were measured on
    shapes: dict[str, tuple[int, ...]]  # every value's shape on ``feeds``, by value name
    outputs: list[np.ndarray]  # the graph outputs on ``feeds``

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    def weights(self) -> dict[str, torch.Tensor]:
        """Initializers by name, as torch tensors (read-only views where the data allows)."""
        return {name: tensor_of(v) for name, v in self.graph.initializers.items()}


def tensor_of(value: ir.Value) -> torch.Tensor:
    array = value.const_value.numpy()
    return torch.from_numpy(np.array(array, copy=True) if not array.flags.writeable else array)


def read_model(source: OnnxSource, base_dir: str | os.PathLike | None = None) -> ir.Model:
    """A fresh onnx_ir copy of ``source`` (a path, a ModelProto or an ir.Model), checked for what
    graphprune needs: readable, its external data present and inside its folder, a supported opset,
    not quantized.

    External data is read from one folder and nowhere else (a location like ``../secret.bin`` or
    ``/etc/passwd`` would otherwise end up in the pruned file): a path's own folder; for a model in
    memory ``base_dir``, or the folder ``onnx_ir.load`` recorded in its tensors.  A model in memory
    whose external data has no folder is refused."""
    if isinstance(source, ir.Model):
        folder = base_dir if base_dir is not None else _recorded_folder(source)
        model = ir.serde.deserialize_model(ir.serde.serialize_model(source))  # the copy forgets the folder
    elif isinstance(source, onnx.ModelProto):
        folder = base_dir
        model = ir.serde.deserialize_model(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if base_dir is not None:
            raise InputError(
                f"base_dir= is for models given in memory; the external data of {path} is read from the folder it is in"
            )
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such ONNX file")
        if os.path.getsize(path) > MAX_PROTO_BYTES:  # checked before parsing: protobuf would fail or stall on it
            raise InputError(
                f"{path} is {os.path.getsize(path) / 2**30:.1f} GiB: an .onnx file over 2 GiB cannot be "
                "parsed (a protobuf limit); save the model with external data (onnx.save(..., "
                "save_as_external_data=True))"
            )
        try:
            model = ir.load(path)
        except Exception as exc:
            raise InputError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
        folder = os.path.dirname(os.path.abspath(path))
    else:
        raise InputError(
            f"expected a path to an .onnx file, an onnx.ModelProto or an onnx_ir.Model, got {type(source).__name__}"
        )
    _check_external_data(model, folder)
    try:
        ir.external_data.load_to_model(model)  # the working copy owns its weights: the user's files stay as they are
    except ValueError as exc:  # onnx_ir's own checks, e.g. a data file with several hard links
        raise InputError(f"the model's external data cannot be read: {exc}") from exc
    _check_opset(model)
    quantized = sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise InputError(
            f"the model is already quantized ({', '.join(quantized)} nodes): pruning and sparsity "
            "need the float weights. Prune the float model, then quantize (sparsity, then "
            "quantization)"
        )
    return model


def _external_tensors(model: ir.Model) -> Iterator[tuple[str, ir.ExternalTensor]]:
    """(name, tensor) for every tensor kept in an external file: initializers of every graph and
    tensor attributes (a ``Constant``'s value becomes an initializer later, and is read then)."""
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield f"initializer {name!r}", value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if not attr.is_ref() and attr.type in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
                    tensors = attr.value if attr.type == ir.AttributeType.TENSORS else [attr.value]
                    for tensor in tensors:
                        if isinstance(tensor, ir.ExternalTensor):
                            yield f"attribute {attr.name!r} of node {node.name or node.op_type!r}", tensor


def _recorded_folder(model: ir.Model) -> str | None:
    """The folder ``onnx_ir.load`` recorded in an ir.Model's external tensors (None: none recorded)."""
    folders = {os.fspath(tensor.base_dir) for _, tensor in _external_tensors(model)} - {""}
    if len(folders) > 1:
        raise InputError(
            f"the model's external data was loaded from several folders ({sorted(folders)}): pass "
            "base_dir= the one folder that holds it"
        )
    return folders.pop() if folders else None


def _check_external_data(model: ir.Model, folder: str | os.PathLike | None) -> None:
    """Point every external tensor at ``folder`` and refuse a location outside it (absolute, ``..``,
    or a symlink that resolves elsewhere), a missing or short file, and external data without a folder."""
    for name, value in model.graph.initializers.items():
        if value.const_value is None:
            raise InputError(f"initializer {name!r} has no data")
    root = os.path.realpath(folder) if folder is not None else None
    for what, tensor in _external_tensors(model):
        location = os.fspath(tensor.location)
        if root is None:
            raise InputError(
                f"{what} keeps its data in the external file {location!r}, but the model was given in "
                "memory, so there is no folder to read it from: pass the path of the .onnx file, or "
                "base_dir= the folder that holds the data, or load it into the model first "
                "(onnx.load_external_data_for_model(model, folder))"
            )
        path = os.path.realpath(os.path.join(root, location))
        if os.path.isabs(location) or os.path.commonpath([root, path]) != root:
            raise InputError(
                f"{what} keeps its data in {location!r}, which is outside the model's folder {root}: "
                "external data is read from inside that folder only (an absolute path, '..' or a "
                "symlink leading out is refused); move the data file beside the model"
            )
        tensor.base_dir = root
        if not os.path.isfile(path):
            raise InputError(
                f"{what} keeps its data in {location!r}, which is missing (looked in {root}); keep the "
                "external data file beside the model"
            )
        need = (tensor.offset or 0) + (tensor.length or 0)
        if os.path.getsize(path) < need:
            raise InputError(
                f"external data file {location!r} is shorter than {what} needs "
                f"({os.path.getsize(path)} < {need} bytes): it is truncated or not this model's"
            )


def _check_opset(model: ir.Model) -> None:
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    newest = onnx.defs.onnx_opset_version()
    if version is None:
        raise InputError("the model imports no default-domain (ai.onnx) opset: not a model graphprune can read")
    if not MIN_OPSET <= version <= newest:
        raise InputError(
            f"the model uses opset {version}; graphprune reads opsets {MIN_OPSET} to {newest} "
            "(convert it with onnx.version_converter first)"
        )


@contextlib.contextmanager
def quiet_onnx_tools() -> Iterator[None]:
    """The exporter prints progress and logs warnings about optional packages (torchvision ops), the
    optimizer about constants it chose not to fold; neither is about the user's model, so both are
    silenced while they run (errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def normalize(model: ir.Model) -> None:
    """Constant subgraphs are folded, constants become initializers and every initializer gets one
    reader (see the module doc)."""
    with quiet_onnx_tools():  # e.g. Pad amounts the TorchScript exporter computes from constants
        fold_constants(model, should_fold=lambda node: True if node.op_type == "ConstantOfShape" else None)
    RemoveUnusedNodesPass()(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    graph = model.graph
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    for name, value in list(graph.initializers.items()):
        if value.is_graph_input() or value.is_graph_output():
            continue
        for k, (node, index) in enumerate(list(value.uses())[1:], start=1):
            copy_name = f"{name}__{k}"
            while copy_name in taken:
                copy_name += "_"
            taken.add(copy_name)
            copy = ir.Value(name=copy_name, shape=value.shape, type=value.type, const_value=value.const_value)
            graph.register_initializer(copy)
            node.replace_input_with(index, copy)


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs a caller feeds (initializers listed as inputs by old exporters excluded)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def example_feeds(model: ir.Model) -> Feeds:
    """Feeds for ``model`` when the caller gave none: seeded normal floats, ones for integers and
    booleans (valid token ids and attention masks), symbolic dims of size 2."""
    rng = np.random.default_rng(0)
    feeds = {}
    for value in graph_inputs(model):
        if value.shape is None or value.dtype is None:
            raise InputError(f"model input {value.name!r} has no declared type and shape: pass calibration feeds")
        shape = [d if isinstance(d, int) else SYMBOLIC_DIM_SIZE for d in value.shape]
        dtype = value.dtype.numpy()
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = np.ones(shape, dtype=dtype)
    return feeds


def check_feeds(model: ir.Model, feeds: Iterable[Mapping[str, Any]]) -> list[Feeds]:
    """Calibration feeds as numpy dicts, each checked against the model's inputs by name,
    element type, rank and fixed dims, and for NaN/Inf."""
    inputs = {v.name: v for v in graph_inputs(model)}
    out = []
    for i, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise InputError(
                f"calibration feed {i} is a {type(feed).__name__}; ONNX feeds are dicts "
                f"{{input name: array}} for the inputs {sorted(inputs)}"
            )
        missing, extra = sorted(set(inputs) - set(feed)), sorted(set(feed) - set(inputs))
        if missing or extra:
            raise InputError(
                f"calibration feed {i}: missing inputs {missing}, unknown inputs {extra} "
                f"(the model's inputs are {sorted(inputs)})"
            )
        arrays = {}
        for name, x in feed.items():
            array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            value = inputs[name]
            want = value.dtype.numpy() if value.dtype is not None else array.dtype
            if array.dtype != want:
                raise InputError(f"calibration feed {i}: input {name!r} is {array.dtype}, the model takes {want}")
            if value.shape is not None:
                if array.ndim != len(value.shape):
                    raise InputError(
                        f"calibration feed {i}: input {name!r} has rank {array.ndim}, the model "
                        f"takes rank {len(value.shape)} ({value.shape})"
                    )
                for d, (got, declared) in enumerate(zip(array.shape, value.shape)):
                    if isinstance(declared, int) and got != declared:
                        raise InputError(
                            f"calibration feed {i}: input {name!r} has size {got} in dim {d}, "
                            f"the model fixes it to {declared}"
                        )
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise InputError(f"calibration feed {i}: input {name!r} contains NaN or Inf")
            arrays[name] = array
        out.append(arrays)
    return out


def session(model: ir.Model, extra_outputs: Iterable[str] = ()) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model``, graph optimizations off (so every value named in
    ``extra_outputs`` still exists and results are those of the graph as written)."""
    proto = ir.to_proto(model)
    have = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in have:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        if proto.ByteSize() < _PROTO_LIMIT:
            return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save(proto, path, save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CaptureError(f"onnxruntime cannot load the model: {exc}") from exc


def value_names(model: ir.Model) -> list[str]:
    """Every node output, in graph order."""
    return [v.name for node in model.graph for v in node.outputs if v.name]


def capture_onnx(model: ir.Model, feeds: Feeds | None = None) -> OnnxCapture:
    """Normalise ``model`` in place and measure every value's shape by running it on ``feeds``."""
    normalize(model)
    feeds = example_feeds(model) if feeds is None else feeds
    shapes, outputs = measure(model, feeds)
    return OnnxCapture(model=model, feeds=feeds, shapes=shapes, outputs=outputs)


def measure(model: ir.Model, feeds: Feeds) -> tuple[dict[str, tuple[int, ...]], list[np.ndarray]]:
    """Every value's shape on ``feeds`` (inputs, initializers, node outputs) and the graph outputs."""
    return measured(model, feeds, run_values(model, feeds))


def run_values(model: ir.Model, feeds: Feeds) -> dict[str, np.ndarray]:
    """Every node output's value on ``feeds``, by name (graph optimizations off)."""
    runner = session(model, value_names(model))
    try:
        results = runner.run(None, feeds)
    except Exception as exc:
        raise CaptureError(f"onnxruntime cannot run the model on the feeds: {exc}") from exc
    return dict(zip([o.name for o in runner.get_outputs()], results))


def measured(
    model: ir.Model, feeds: Feeds, values: dict[str, np.ndarray]
) -> tuple[dict[str, tuple[int, ...]], list[np.ndarray]]:
    """Shapes and graph outputs (see :func:`measure`) from values :func:`run_values` computed."""
    shapes = {name: tuple(np.shape(a)) for name, a in values.items()}
    shapes.update({name: tuple(np.shape(a)) for name, a in feeds.items()})
    for name, value in model.graph.initializers.items():
        shapes[name] = tuple(value.const_value.shape.numpy())
    return shapes, [values[v.name] for v in model.graph.outputs]


def run_model(model: ir.Model, feeds: Feeds) -> list[np.ndarray]:
    """The graph outputs of ``model`` on ``feeds``."""
    try:
        return session(model).run(None, feeds)
    except CaptureError:
        raise
    except Exception as exc:
        raise CaptureError(f"onnxruntime cannot run the model on the feeds: {exc}") from exc
