"""Capture: turn an ``nn.Module`` and example inputs into an ATen-level FX graph.

``torch.export`` (non-strict) is the one capture path: it runs the model's own Python code,
keeps high-level ATen ops (linear, conv, sdpa, layer_norm) with shapes on every node, names
every parameter by its module path, and works on ``meta``-device models.  ``torch.fx``'s
``symbolic_trace`` is not used: it yields torch-level call_module/call_method nodes without
shapes, which would need a second rule table for the same facts, and it fails on everything
export fails on (data-dependent control flow) plus modern Hugging Face models.

While tracing, the int attributes of user-defined modules are handed out as tagged ints, and a
torch-function mode records which attribute (``self.num_heads``, ``self.head_dim`` ...) became
which size argument of which op.  Pruning uses this provenance to rewrite exactly the
attribute behind a shape constant, instead of guessing from values.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from graphprune.errors import CaptureError, InputError

ExampleInputs = tuple[Any, ...] | dict[str, Any] | torch.Tensor



@dataclass(frozen=True)
class AttributeUse:
    """An int attribute of a module (``owner.attr == value``) that became an argument of an ATen op.

    ``path`` locates the argument (``("args", 1, 2)``: third entry of the size list); ``dim``
    is the sliced dim for slices.  Pruning rewrites the attribute when that argument changes.
    """

    owner: str
    attr: str
    value: int
    packets: tuple
    path: tuple
    dim: int | None = None


@dataclass
class CapturedGraph:
    """An exported program plus the facts graphprune needs about it."""

    program: torch.export.ExportedProgram
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tensor_names: dict[str, tuple[str, str]]  # placeholder name -> (kind, module path)
    user_inputs: list[fx.Node]
    outputs: list[fx.Node]
    attribute_uses: list[AttributeUse] = field(default_factory=list)
    tied: list[list[str]] = field(default_factory=list)  # placeholder names holding one tensor object
    module_types: dict[str, type] = field(default_factory=dict)  # module path -> class

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
            f"example_inputs must be a tuple of tensors or a dict of keyword tensors, got {type(example_inputs).__name__}")
    tensors = 0
    for path, leaf in _leaves(args, kwargs):
        if isinstance(leaf, torch.Tensor):
            tensors += 1
        elif not (leaf is None or isinstance(leaf, (bool, int, float))):
            raise InputError(f"example input {path} is a {type(leaf).__name__}; inputs must be tensors "
                             "(bool/int/float/None are accepted as fixed options such as use_cache=False)")
    if tensors == 0:
        raise InputError("example_inputs contain no tensor: pass the tensors the model's forward takes")
    return args, kwargs


def _leaves(args: tuple, kwargs: dict) -> Iterator[tuple[str, Any]]:
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
    with _eval_mode(model), _no_kv_cache(model), _recording_uses(model, uses):
        try:
            program = torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:  # re-raised with the user's failing line
            raise CaptureError(_describe_failure(model, exc)) from exc
    sig = program.graph_signature
    tensor_names: dict[str, tuple[str, str]] = {}
    for kind, mapping in (("parameter", sig.inputs_to_parameters), ("buffer", sig.inputs_to_buffers),
                          ("constant", sig.inputs_to_lifted_tensor_constants)):
        for placeholder, fqn in mapping.items():
            tensor_names[placeholder] = (kind, fqn)
    user_input_names = set(sig.user_inputs)
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_input_names]
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    outputs = [x for x in pytree.tree_leaves(output_node.args[0]) if isinstance(x, fx.Node)]
    by_tensor: dict[int, list[str]] = {}
    for placeholder, (_kind, fqn) in tensor_names.items():
        by_tensor.setdefault(id(_lookup(model, fqn)), []).append(placeholder)
    tied = [ps for ps in by_tensor.values() if len(ps) > 1]
    return CapturedGraph(program, args, kwargs, tensor_names, user_inputs, outputs, uses, tied,
                         {name: type(m) for name, m in model.named_modules()})


def owner_chain(node: fx.Node) -> list[str]:
    """Module paths from the outermost to the module whose forward created ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _cls in stack.values()]


def uses_for(uses: list[AttributeUse], node: fx.Node, path: tuple) -> list[AttributeUse]:
    """The recorded attribute uses that produced argument ``path`` of ``node``."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return []
    packet = node.target.overloadpacket
    where, key, *rest = path
    value = node.args[key] if where == "args" else node.kwargs[key]
    old = value[rest[0]] if rest else value
    rank = len(node.args[0].meta["val"].shape) if packet is torch.ops.aten.slice else 0
    dim = (node.args[1] if len(node.args) > 1 else 0) if packet is torch.ops.aten.slice else None
    owners = set(owner_chain(node))
    return [u for u in uses
            if u.path == path and u.value == old and packet in u.packets and u.owner in owners
            and (u.dim is None or dim is None or u.dim % rank == dim % rank)]


def _lookup(model: nn.Module, fqn: str) -> object:
    owner, _, attr = fqn.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
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


class _TaggedInt(int):
    """An int attribute read during capture, remembering which module attribute it came from."""

    owner: str
    attr: str


def _untag(x: Any) -> Any:
    if type(x) is _TaggedInt:
        return int(x)
    if isinstance(x, (list, tuple)) and any(type(v) is _TaggedInt for v in x):
        return type(x)(int(v) if type(v) is _TaggedInt else v for v in x) if not isinstance(x, torch.Size) \
            else torch.Size(int(v) for v in x)
    if isinstance(x, slice):
        return slice(_untag(x.start), _untag(x.stop), _untag(x.step))
    if isinstance(x, tuple):
        return tuple(_untag(v) for v in x)
    return x


@functools.cache
def _recording_class(cls: type) -> type:
    def __getattribute__(self, name):  # noqa: N807 - the hook's name is fixed by Python
        value = cls.__getattribute__(self, name)
        state = _STATE.get()
        if type(value) is int and state is not None and id(self) in state.paths:
            tagged = _TaggedInt(value)
            tagged.owner, tagged.attr = state.paths[id(self)], name
            return tagged
        return value
    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


@dataclass
class _RecordingState:
    paths: dict[int, str]
    uses: list[AttributeUse]


_STATE: contextvars.ContextVar[_RecordingState | None] = contextvars.ContextVar("graphprune_uses", default=None)


class _UseRecorder(TorchFunctionMode):
    """Notes every tagged int that reaches a size argument of a torch function, then calls it untagged."""

    def __init__(self, state: _RecordingState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(_has_tag(a) for a in args) or any(_has_tag(v) for v in kwargs.values()):
            self.state.uses.extend(_uses_of(func, args, kwargs))
            args = tuple(_untag(a) for a in args)
            kwargs = {k: _untag(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _has_tag(x: Any) -> bool:
    if type(x) is _TaggedInt:
        return True
    if isinstance(x, slice):
        return any(type(v) is _TaggedInt for v in (x.start, x.stop, x.step))
    if isinstance(x, (list, tuple)):
        return any(_has_tag(v) for v in x)
    return False


def _uses_of(func: Any, args: tuple, kwargs: dict) -> list[AttributeUse]:
    """Where each tagged int lands among the ATen op's arguments, for the functions that take sizes."""
    aten = torch.ops.aten
    out: list[AttributeUse] = []

    def add(value: Any, packets: tuple, path: tuple, dim: int | None = None) -> None:
        if type(value) is _TaggedInt:
            out.append(AttributeUse(value.owner, value.attr, int(value), packets, path, dim))

    def sizes(rest: tuple) -> list:
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)

    shape_ops = {
        torch.Tensor.view: (aten.view, aten._unsafe_view, aten.reshape),
        torch.Tensor.reshape: (aten.reshape, aten.view, aten._unsafe_view),
        torch.reshape: (aten.reshape, aten.view, aten._unsafe_view),
        torch.Tensor.expand: (aten.expand,),
        torch.Tensor.repeat: (aten.repeat,),
        torch.Tensor.new_zeros: (aten.new_zeros,), torch.Tensor.new_ones: (aten.new_ones,),
        torch.Tensor.new_empty: (aten.new_empty,),
    }
    if func in shape_ops:
        for k, v in enumerate(sizes(args[1:] or (kwargs.get("size") or kwargs.get("shape") or (),))):
            add(v, shape_ops[func], ("args", 1, k))
    elif func in (torch.zeros, torch.ones, torch.empty, torch.randn, torch.rand):
        for k, v in enumerate(sizes(args)):
            add(v, (getattr(aten, func.__name__),), ("args", 0, k))
    elif func in (torch.split, torch.Tensor.split):
        split = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        if isinstance(split, (list, tuple)):
            for k, v in enumerate(split):
                add(v, (aten.split_with_sizes, aten.split), ("args", 1, k))
        else:
            add(split, (aten.split,), ("args", 1))
    elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        add(args[1] if len(args) > 1 else kwargs.get("repeats"), (aten.repeat_interleave,), ("args", 1))
    elif func is torch.Tensor.__getitem__:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if not any(i is None for i in index):
            after = index.index(Ellipsis) if Ellipsis in index else None
            for k, item in enumerate(index):
                if isinstance(item, slice) and item.step is None:
                    dim = k if after is None or k < after else k - len(index)
                    add(item.start, (aten.slice,), ("args", 2), dim)
                    add(item.stop, (aten.slice,), ("args", 3), dim)
    return out


@contextlib.contextmanager
def _recording_uses(model: nn.Module, uses: list[AttributeUse]) -> Iterator[None]:
    """Tag the int attributes of user-defined modules while tracing (classes restored after)."""
    swapped: list[tuple[nn.Module, type]] = []
    paths: dict[int, str] = {}
    for name, m in model.named_modules():
        cls = type(m)
        if cls.__module__.startswith("torch."):
            continue  # torch.nn modules have explicit attribute rules
        object.__setattr__(m, "__class__", _recording_class(cls))
        swapped.append((m, cls))
        paths[id(m)] = name
    state = _RecordingState(paths, uses)
    token = _STATE.set(state)
    try:
        with _UseRecorder(state):
            yield
    finally:
        _STATE.reset(token)
        for m, cls in swapped:
            object.__setattr__(m, "__class__", cls)


def _describe_failure(model: nn.Module, exc: Exception) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f.filename.startswith((torch_dir, here, "<"))]
    where = f" at {user[-1].filename}:{user[-1].lineno} in {user[-1].name}: {user[-1].line}" if user else ""
    text = str(exc)
    marker = "The following call raised this error:"
    if marker in text:  # torch.export names the user's line in the message, not the traceback
        lines = [ln.strip() for ln in text.split(marker, 1)[1].strip().splitlines()[:2]]
        where = f" at {lines[0]}: {lines[1]}" if len(lines) == 2 else where
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"could not capture {type(model).__name__} with torch.export{where}\n"
            f"  {type(exc).__name__}: {first}\n"
            "  graphprune needs a model whose forward can be traced for the given example inputs "
            "(no control flow that depends on tensor values).")
