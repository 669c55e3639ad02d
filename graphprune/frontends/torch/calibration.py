"""The torch frontend's calibration runner: the weight layers of the captured graph, and calibration
batches run through the model with each watched module's input (and output) handed to a callback.

The layers that multiply an activation by a parameter weight (linear, transformers' Conv1D,
conv, matmul against a parameter) are found in the captured graph (:func:`consumers`); what the
callbacks accumulate (moments, Hessians, ranges) is written once in :mod:`graphprune.algorithms`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from graphprune.algorithms.nm import CONV, CONV1D, LINEAR
from graphprune.core.groups import Analysis
from graphprune.core.layers import WeightLayer
from graphprune.errors import InputError
from graphprune.frontends.torch.capture import CapturedGraph, eval_mode, input_leaves, normalize_inputs

aten = torch.ops.aten


@dataclass(frozen=True, kw_only=True)
class Consumer(WeightLayer):
    """A layer of the captured graph that reads an activation through a parameter weight."""

    node: fx.Node
    module: str  # path of the module whose forward receives the activation
    matmul: bool = False  # a plain matmul inside the module's forward

    @property
    def activation(self) -> fx.Node:
        """The graph node of the activation this layer multiplies (addmm's is its second argument)."""
        return self.node.args[1] if self.layout == CONV1D and not self.matmul else self.node.args[0]


_TRANSPOSES = (aten.t, aten.numpy_T, aten.mT)


def _matmul_weight(node: fx.Node, names: dict) -> tuple[fx.Node, str] | None:
    """For ``x @ W`` or ``x @ W.T`` with a 2-D parameter W: (W's placeholder, its layout)."""
    operand = node.args[1]
    transposed = False
    if (
        isinstance(operand, fx.Node)
        and operand.op == "call_function"
        and isinstance(operand.target, torch._ops.OpOverload)
    ):
        packet = operand.target.overloadpacket
        if packet in _TRANSPOSES or (packet is aten.transpose and sorted(a % 2 for a in operand.args[1:3]) == [0, 1]):
            operand, transposed = operand.args[0], True
    if not isinstance(operand, fx.Node) or names.get(operand.name, ("",))[0] != "parameter":
        return None
    if len(operand.meta["val"].shape) != 2:
        return None
    return operand, LINEAR if transposed else CONV1D


def consumers(analysis: Analysis) -> list[Consumer]:
    """Every linear / Conv1D / conv node, and matmul against a 2-D parameter, in graph order."""
    return weight_layers(analysis.captured)


def weight_layers(captured: CapturedGraph) -> list[Consumer]:
    """:func:`consumers` of a captured graph, before any analysis."""
    names = captured.tensor_names
    out = []
    for node in captured.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        packet = node.target.overloadpacket
        if packet in (aten.matmul, aten.mm) and (found := _matmul_weight(node, names)) is not None:
            weight, layout = found
            name = names[weight.name][1]
            out.append(
                Consumer(
                    node=node, module=name.rpartition(".")[0], weight=name, layout=layout, channel_axis=-1, matmul=True
                )
            )
            continue
        weight = node.args[2] if packet is aten.addmm else node.args[1] if len(node.args) > 1 else None
        if not isinstance(weight, fx.Node) or names.get(weight.name, ("",))[0] != "parameter":
            continue
        name = names[weight.name][1]
        module = name.rpartition(".")[0]
        if packet is aten.linear:
            out.append(Consumer(node=node, module=module, weight=name, layout=LINEAR, channel_axis=-1))
        elif packet is aten.addmm:
            out.append(Consumer(node=node, module=module, weight=name, layout=CONV1D, channel_axis=-1))
        elif packet in (aten.conv1d, aten.conv2d, aten.conv3d):
            groups = node.args[6] if len(node.args) > 6 else 1
            out.append(Consumer(node=node, module=module, weight=name, layout=CONV, channel_axis=1, groups=groups))
    return out


@dataclass
class Watch:
    """The modules :func:`run_batches` hooks, which of them have been called, and which are muted
    (a :class:`Runner` that runs part of the model twice mutes what already saw its data)."""

    names: set[str]
    called: set[str] = field(default_factory=set)
    muted: set[str] = field(default_factory=set)

    def records(self, name: str) -> bool:
        self.called.add(name)
        return name not in self.muted


class Runner(abc.ABC):
    """Calibration data that runs the model itself, e.g. block by block with weights streamed
    from a checkpoint (:mod:`graphprune.frontends.torch.streaming`), instead of one forward call per batch."""

    batches: list[Any]  # the calibration batches it runs

    @abc.abstractmethod
    def drive(self, model: nn.Module, watch: Watch) -> None:
        """Run every batch through ``model`` (in eval mode, without gradients); hooks are set."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of batches."""


Calibration = list[Any] | Runner


def batches(calibration: Iterable[Any] | Runner | None, purpose: str) -> Calibration:
    """Materialise and check calibration data once (an iterator could be consumed only once)."""
    if calibration is None:
        raise InputError(f"{purpose} needs calibration data: gp.prune(..., calibration=batches)")
    if isinstance(calibration, Runner):
        if not len(calibration):
            raise InputError(f"{purpose} needs calibration data: gp.plan(..., calibration=batches)")
        return calibration
    data = list(calibration)
    if not data:
        raise InputError("calibration data is empty")
    for i, batch in enumerate(data):
        try:
            normalize_inputs(batch)
        except InputError as exc:
            raise InputError(f"calibration batch {i}: {exc}") from exc
    return data


def first_inputs(data: Iterable[Any] | Runner | None) -> list[tuple[tuple[int, ...], bool]]:
    """The shape of every calibration batch's first tensor input, and whether it holds integers
    (what :func:`graphprune.core.report.calibration_size` counts)."""
    firsts = []
    for batch in [] if data is None else data.batches if isinstance(data, Runner) else data:
        args, kwargs = normalize_inputs(batch)
        first = next((v for _, v in input_leaves(args, kwargs) if isinstance(v, torch.Tensor)), None)
        if first is not None:
            firsts.append((tuple(first.shape), not first.is_floating_point() and first.dtype != torch.bool))
    return firsts


def check_calibration(data: list[Any], example_args: tuple, example_kwargs: dict) -> list[Any]:
    """Refuse calibration batches that cannot stand for the example inputs, before any pass runs
    them; returns the batches with their tensors on the example inputs' device (a model's data goes
    where the model is; the model never moves).

    A batch in the example's form (positional, keyword) must have its inputs, no more, no fewer;
    a batch in the other form (arrays keyed by input name for a positional example, as the CLI's
    ``.npz`` files give) is matched to ``forward``'s parameters by the model itself, where
    :func:`forward_batch` names it if it does not fit.  Every tensor paired with an example tensor
    must have its rank and dtype, and values (not ``meta``); every tensor must have at least one
    element, and floats must be finite.  Sizes may differ, since batches run the model itself:
    the batch dim, and dims the model does not fix, such as a language model's sequence length (a
    size the model fixes, a channel count, fails in its forward, named by :func:`forward_batch`)."""
    example = dict(input_leaves(example_args, example_kwargs))
    devices = {t.device for t in example.values() if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    placed = []
    for i, batch in enumerate(data):
        try:
            args, kwargs = normalize_inputs(batch)
        except InputError as exc:
            raise InputError(f"calibration batch {i}: {exc}") from exc
        leaves = dict(input_leaves(args, kwargs))
        if bool(args) == bool(example_args) and bool(kwargs) == bool(example_kwargs) and set(leaves) != set(example):
            missing, extra = [p for p in example if p not in leaves], [p for p in leaves if p not in example]
            raise InputError(
                f"calibration batch {i} has other inputs than the example inputs: missing {missing}, "
                f"extra {extra}; give every batch the example's structure"
            )
        for path, value in leaves.items():
            want, at = example.get(path), f"calibration batch {i}, input {path}"
            if not isinstance(value, torch.Tensor):
                if isinstance(want, torch.Tensor):
                    raise InputError(f"{at}: a {type(value).__name__}, but the example input is a tensor")
                continue
            if isinstance(want, torch.Tensor):
                if value.dim() != want.dim() or value.dtype != want.dtype:
                    raise InputError(
                        f"{at}: {value.dim()}-d {value.dtype}, but the example input is {want.dim()}-d {want.dtype}"
                    )
                if value.device.type == "meta" and want.device.type != "meta":
                    raise InputError(f"{at}: on meta, but the example input is on {want.device}: a batch needs values")
            if value.numel() == 0:
                raise InputError(f"{at}: empty (shape {tuple(value.shape)}): a batch needs at least one row")
            if value.is_floating_point() and value.device.type != "meta" and not bool(torch.isfinite(value).all()):
                raise InputError(f"{at}: contains NaN or Inf")
        placed.append(_moved(batch, devices))
    return placed


def _moved(batch: Any, devices: set[torch.device]) -> Any:
    """``batch`` with its tensors on the example inputs' device, where they all have one (inputs
    spread over several devices are the model's own arrangement: the batch is left as it is)."""
    if len(devices) != 1:
        return batch
    device = next(iter(devices))
    return pytree.tree_map_only(torch.Tensor, lambda t: t if t.device == device else t.to(device), batch)


def forward_batch(model: nn.Module, batch: Any, index: int) -> Any:
    """``model`` on one calibration batch, errors prefixed with the batch and its shapes.  The model
    ran on the example inputs, so a forward that fails here fails on this batch: an input
    ``forward`` does not take, or a size the model fixes (a channel count, an image size) that
    differs from the example's."""
    args, kwargs = normalize_inputs(batch)
    shapes = [f"{path} {tuple(v.shape)}" for path, v in input_leaves(args, kwargs) if isinstance(v, torch.Tensor)]
    where = f"calibration batch {index} ({', '.join(shapes)})"
    try:
        return model(*args, **kwargs)
    except InputError as exc:  # from a statistics hook
        raise InputError(f"{where}: {exc}") from exc
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise InputError(
            f"{where} does not fit the model, which runs on the example inputs: an input forward "
            "does not take, or a size the model fixes that differs "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def check_input(layer: Consumer, x: torch.Tensor) -> None:
    """Statistics are read at the module's first input: refuse when that is visibly not the layer's
    activation (a matmul or functional linear inside a larger module's forward)."""
    want = layer.activation.meta["val"].shape
    if x.dim() <= max(layer.channel_axis, 0) or x.shape[layer.channel_axis] != want[layer.channel_axis]:
        got = f"shape {tuple(x.shape)}, captured with {want[layer.channel_axis]} channels in dim {layer.channel_axis}"
        raise InputError(
            f"{layer.weight} is used inside {layer.module}.forward, whose first input is not that "
            f"layer's activation ({got}): calibration statistics cannot be read there (leave this "
            "module out of the pass, or use a criterion that needs no calibration); or the batch "
            "has another channel count than the example inputs"
        )


def run_batches(
    model: nn.Module,
    calibration: Calibration,
    inputs_of: dict[str, Callable[[torch.Tensor], None]],
    outputs_of: dict[str, Callable[[torch.Tensor], None]] | None = None,
) -> None:
    """Run the batches (eval mode, no gradients; a :class:`Runner` runs itself), handing each named
    module's first input (and, for ``outputs_of``, its output) to its callback.  Raises
    :class:`InputError` if a named module is never called (its statistics would silently be missing)."""
    handles = []
    watch = Watch(set(inputs_of) | set(outputs_of or {}))
    for name, callback in inputs_of.items():

        def hook(_mod, args, kwargs, callback=callback, name=name):
            if not watch.records(name):
                return
            x = args[0] if args else next(iter(kwargs.values()))
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise InputError(
                    f"the input of {name} contains NaN or Inf on the calibration data: statistics "
                    "would be meaningless (check the model's weights and the calibration batches)"
                )
            callback(x)

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    for name, callback in (outputs_of or {}).items():

        def out_hook(_mod, _args, output, callback=callback, name=name):
            if watch.records(name):
                callback(output)

        handles.append(model.get_submodule(name).register_forward_hook(out_hook))
    try:
        if isinstance(calibration, Runner):
            calibration.drive(model, watch)
        else:
            with eval_mode(model), torch.no_grad():
                for i, batch in enumerate(
                    tqdm(calibration, desc="calibration", unit="batch", disable=None, leave=False)
                ):
                    forward_batch(model, batch, i)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(inputs_of) - watch.called)
    if missing:
        raise InputError(
            f"module(s) {', '.join(repr(m) for m in missing[:5])} hold weights but are never called by "
            "the model's forward (their parameters are read directly, as in a module unlifted from "
            "torch.export), so calibration statistics cannot be gathered at their inputs"
        )
