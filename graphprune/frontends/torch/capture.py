"""Capture: turn an ``nn.Module`` and example inputs into an ATen-level FX graph.

``torch.export`` (non-strict) is the one capture path: it runs the model's own Python code,
keeps high-level ATen ops (linear, conv, sdpa, layer_norm) with shapes on every node, names
every parameter by its module path, and works on ``meta``-device models.  ``torch.fx``'s
``symbolic_trace`` is not used: it yields torch-level call_module/call_method nodes without
shapes, which would need a second rule table for the same facts, and it fails on everything
export fails on (data-dependent control flow) plus modern Hugging Face models.

While tracing, :mod:`graphprune.frontends.torch.provenance` records which module attribute became which size
argument of which op, so that pruning rewrites exactly the attribute behind a shape constant.
"""

from __future__ import annotations

import contextlib
import os
import re
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from graphprune.errors import CaptureError, InputError
from graphprune.frontends.torch.provenance import AttributeUse, recording_uses
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

ExampleInputs = tuple[Any, ...] | dict[str, Any] | torch.Tensor


@dataclass
class CapturedGraph:
    """An exported program plus the facts graphprune needs about it."""

    program: torch.export.ExportedProgram
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tensor_names: dict[str, tuple[str, str]]  # placeholder -> (parameter|buffer|constant|code_constant, path)
    user_inputs: list[fx.Node]
    outputs: list[fx.Node]
    attribute_uses: list[AttributeUse] = field(default_factory=list)
    tied: list[list[str]] = field(default_factory=list)  # placeholder names holding one tensor object
    module_types: dict[str, type] = field(default_factory=dict)  # module path -> class
    output_names: dict[fx.Node, str] = field(default_factory=dict)  # output node -> its path in the result

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.program.graph_module


def normalize_inputs(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split example inputs into positional and keyword parts and check every leaf."""
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        raise InputError(
            "example_inputs must be a tuple of tensors or a dict of keyword tensors, got "
            f"{type(example_inputs).__name__}"
        )
    tensors = 0
    for path, leaf in input_leaves(args, kwargs):
        if isinstance(leaf, torch.Tensor):
            tensors += 1
        elif not (leaf is None or isinstance(leaf, (bool, int, float))):
            raise InputError(
                f"example input {path} is a {type(leaf).__name__}; inputs must be tensors "
                "(bool/int/float/None are accepted as fixed options such as use_cache=False)"
            )
    if tensors == 0:
        raise InputError("example_inputs contain no tensor: pass the tensors the model's forward takes")
    return args, kwargs


def input_leaves(args: tuple, kwargs: dict) -> Iterator[tuple[str, Any]]:
    """(path such as ``[0]`` or ``['input_ids']``, value) for every leaf of a call's inputs."""

    def walk(prefix: str, x: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                yield from walk(f"{prefix}[{i}]", v)
        elif isinstance(x, dict):
            for k, v in x.items():
                yield from walk(f"{prefix}[{k!r}]", v)
        else:
            yield prefix, x

    for i, a in enumerate(args):
        yield from walk(f"[{i}]", a)
    for k, v in kwargs.items():
        yield from walk(f"[{k!r}]", v)


def model_device(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def capture(model: nn.Module, example_inputs: ExampleInputs) -> CapturedGraph:
    """Export ``model`` on ``example_inputs``; raise :class:`CaptureError` naming the failing construct."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    return capture_call(model, args, kwargs)


def capture_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CapturedGraph:
    """Export ``model(*args, **kwargs)`` (inputs already checked by :func:`normalize_inputs`)."""
    device = model_device(model)
    if device is not None and device.type == "meta":
        args, kwargs = to_device(args, device), to_device(kwargs, device)
    uses: list[AttributeUse] = []
    with eval_mode(model), no_kv_cache(model), recording_uses(model, uses):
        try:
            program = torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:  # re-raised with the user's failing line
            raise _capture_error(model, exc) from exc
    sig = program.graph_signature
    tensor_names: dict[str, tuple[str, str]] = {}
    for kind, mapping in (
        ("parameter", sig.inputs_to_parameters),
        ("buffer", sig.inputs_to_buffers),
        ("constant", sig.inputs_to_lifted_tensor_constants),
    ):
        for placeholder, fqn in mapping.items():
            tensor_names[placeholder] = (kind, fqn)
    user_input_names = set(sig.user_inputs)
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_input_names]
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    leaves = pytree.tree_leaves(output_node.args[0])
    outputs = [x for x in leaves if isinstance(x, fx.Node)]
    output_names = {leaves[i]: name for name, i in _output_paths(program) if isinstance(leaves[i], fx.Node)}
    by_tensor: dict[int, list[str]] = {}
    for placeholder, (kind, fqn) in list(tensor_names.items()):
        try:
            tensor = tensor_at(model, fqn)
        except AttributeError:  # a tensor built inside forward (torch.tensor(...)): no attribute holds it
            tensor_names[placeholder] = ("code_constant", fqn)
            continue
        by_tensor.setdefault(id(tensor), []).append(placeholder)
    tied = [ps for ps in by_tensor.values() if len(ps) > 1]
    return CapturedGraph(
        program=program,
        args=args,
        kwargs=kwargs,
        tensor_names=tensor_names,
        user_inputs=user_inputs,
        outputs=outputs,
        attribute_uses=uses,
        tied=tied,
        module_types={name: type(m) for name, m in model.named_modules()},
        output_names=output_names,
    )


def _output_paths(program: torch.export.ExportedProgram) -> list[tuple[str, int]]:
    """Each flat output's name: its key or index path in what forward returns (``last_hidden_state``,
    ``0``, ``logits``, ``extra.1``)."""
    spec = program.call_spec.out_spec
    if spec is None:
        return []
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    out = []
    for path, index in pytree.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out.append((".".join(parts) or "0", index))
    return out


def input_spec(example_inputs: ExampleInputs) -> dict | None:
    """Dtypes and shapes of the example inputs (and fixed options such as ``use_cache=False``) as
    JSON-able data, enough to capture the same architecture again on ``meta`` (:func:`spec_inputs`);
    None for nested inputs."""
    args, kwargs = normalize_inputs(example_inputs)

    def entry(x: Any) -> list | dict | None:
        if isinstance(x, torch.Tensor):
            return [str(x.dtype).removeprefix("torch."), list(x.shape)]
        return {"value": x} if x is None or isinstance(x, (bool, int, float)) else None

    entries = {"args": [entry(x) for x in args], "kwargs": {k: entry(x) for k, x in kwargs.items()}}
    return None if None in [*entries["args"], *entries["kwargs"].values()] else entries


def spec_inputs(spec: dict) -> ExampleInputs:
    """Example inputs of the dtypes and shapes :func:`input_spec` recorded (tensors zero-filled)."""

    def make(e: list | dict) -> Any:
        return e["value"] if isinstance(e, dict) else torch.zeros(e[1], dtype=getattr(torch, e[0]))

    if spec["kwargs"]:
        return {k: make(e) for k, e in spec["kwargs"].items()}
    return tuple(make(e) for e in spec["args"])


def qualified(path: str, attr: str) -> str:
    """The full name of ``attr`` of the module at ``path`` (the root module's path is empty)."""
    return f"{path}.{attr}" if path else attr


def tensor_at(model: nn.Module, fqn: str) -> torch.Tensor:
    """The tensor (parameter, buffer or plain attribute) a module path names."""
    owner, _, attr = fqn.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def set_eval(model: nn.Module) -> nn.Module:
    """``model.eval()``, except for the modules ``ExportedProgram.module()`` returns: they refuse
    ``eval()``, and their mode was fixed when they were exported."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with every module in eval mode; the caller's training flags come back after."""
    flags = {m: m.training for m in model.modules()}
    set_eval(model)
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def run_outputs(model: nn.Module, captured: CapturedGraph) -> list[torch.Tensor] | None:
    """The model's outputs on the captured example inputs, flattened; None for meta-device models."""
    device = model_device(model)
    if device is not None and device.type == "meta":
        return None
    with eval_mode(model), torch.no_grad():
        out = model(*captured.args, **captured.kwargs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models return a cache object that cannot be exported; switch it off while tracing."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _capture_error(model: nn.Module, exc: Exception) -> CaptureError:
    """A :class:`CaptureError` naming the user's failing line (its ``site``) and torch's message."""
    frames = traceback.extract_tb(exc.__traceback__)
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep  # graphprune's own frames are not the user's
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    user = [f for f in frames if not f.filename.startswith((torch_dir, here, "<"))]
    site = (user[-1].filename, user[-1].lineno, (user[-1].line or "").strip()) if user else None
    where = f" at {site[0]}:{site[1]} in {user[-1].name}: {site[2]}" if site else ""
    text = str(exc)
    marker = "The following call raised this error:"
    if marker in text:  # torch.export names the user's line in the message, not the traceback
        lines = [ln.strip() for ln in text.split(marker, 1)[1].strip().splitlines()[:2]]
        if len(lines) == 2:
            where = f" at {lines[0]}: {lines[1]}"
            found = re.match(r'File "(.+)", line (\d+)', lines[0])
            site = (found.group(1), int(found.group(2)), lines[1]) if found else site
    first = text.strip().splitlines()[0] if text.strip() else ""
    reason = f"{type(exc).__name__}: {first}"
    hint = (
        "graphprune needs a model whose forward can be traced: this line branches on a tensor's values "
        "(control flow that depends on data)"
        if _data_dependent(exc)
        else "graphprune needs a model whose forward runs on the given example inputs"
    )
    return CaptureError(
        f"could not capture {type(model).__name__} with torch.export{where}\n  {reason}\n  {hint}.", site, reason
    )


def _data_dependent(exc: BaseException) -> bool:
    """Whether tracing failed on a value only known at run time (``if x.sum() > 0``)."""
    while exc is not None:
        if isinstance(exc, GuardOnDataDependentSymNode):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
