"""Provenance of sizes: which module attribute or tensor shape produced which op argument.

While a model is captured, two kinds of ints are handed out tagged with where they came from:

* the int attributes of its user-defined modules, and the int entries of their tuple, list and
  ``torch.Size`` attributes (``self.splits = [16, 16, 32]``, ``self.shape = (dim, 1, 1)``):
  :class:`_Tagged`, remembering a :class:`Source`;
* sizes read from a traced tensor (``B, N, C = x.shape``, ``x.size(-1)``, ``x.shape[-1]``,
  ``len(x)``): :class:`_ShapeRead`, remembering a :class:`ShapeSource` (the graph node and dim).

Arithmetic on them yields derived values that remember every source involved, and, for
products and exact quotients, the monomial they are (``C // self.num_heads``: ``C`` over
``num_heads``).  A torch-function mode sees each torch call before it is traced and records,
with the graph nodes the call created:

* a tagged int in a size argument (``x.view(b, t, self.num_heads, self.head_dim)``): a *direct*
  use.  Pruning rewrites that attribute, and every space one attribute sizes must keep one count.
  A size read unchanged is direct too: it couples the space it sizes with the dim it was read
  from, and needs no rewrite, since the pruned model reads the new shape;
* a derived int in a size argument: a *computed* size.  When it is a monomial of attributes,
  shape reads and ints, its space is coupled to the product (or quotient) of the spaces they
  size (an attribute that sizes nothing directly keeps its value); any other expression cannot
  be rewritten, so its channels, and the dims it was read from, are frozen;
* a derived value anywhere else (``self.head_dim ** -0.5`` as a scale): the attributes and dims
  involved mean something beyond a size, so the spaces they size are frozen.

Values are untagged before the call proceeds, so tracing sees plain Python numbers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import operator
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
from graphprune.rules.aten import arg_at
from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


class Source(NamedTuple):
    """Where a size lives in the model: an int attribute, or one entry of a sequence attribute."""

    module: str
    attribute: str
    entry: int | None = None

    def __str__(self) -> str:
        owner = f"{self.module}." if self.module else ""
        return f"{owner}{self.attribute}" + (f"[{self.entry}]" if self.entry is not None else "")


class ShapeSource(NamedTuple):
    """A size the model's code read from a traced tensor: dim ``dim`` of the graph node ``node``."""

    node: str
    dim: int

    def __str__(self) -> str:
        return f"{self.node}.shape[{self.dim}]"


AnySource = Source | ShapeSource


@dataclass(frozen=True)
class AttributeUse:
    """A tagged or derived number that reached a torch call.

    ``path`` locates the ATen argument it became (``("args", 1, 2)``: third entry of the size
    list) for size arguments, and is None for any other argument; ``dim`` is the sliced dim for
    slices.  ``sources`` are the attributes and shape reads it came from; ``direct`` says it is
    one of them unchanged.  A monomial value is ``prod(factors) / prod(divisors)``, each factor a
    plain int or a tagged one (:func:`factor_source` says where it came from).  ``nodes`` are the
    graph nodes the call created (None where no tracer was found).  ``invariants`` are the
    monomials a value used for something other than a size depends on (:func:`invariants`).
    """

    sources: frozenset[AnySource]
    direct: bool
    value: Any
    packets: tuple = ()
    path: tuple | None = None
    dim: int | None = None
    factors: tuple | None = None
    divisors: tuple = ()
    nodes: frozenset[str] | None = None
    invariants: tuple = ()

    @property
    def attribute(self) -> AnySource:
        (source,) = self.sources
        return source


class _Tracked:
    """Arithmetic that keeps the set of sources, the monomial it is, if it is one, and the
    monomials whose values it depends on otherwise (its *invariants*: ``(C // heads) ** -0.5``
    keeps its value exactly while ``C // heads`` does)."""

    sources: frozenset[AnySource]
    factors: tuple | None
    divisors: tuple = ()
    invariants: tuple = ()


def _sources(x: Any) -> frozenset[AnySource]:
    return x.sources if isinstance(x, _Tracked) else frozenset()


def _factors(x: Any) -> tuple | None:
    if isinstance(x, _Tracked):
        return x.factors
    return (x,) if type(x) is int else None


def _divisors(x: Any) -> tuple:
    return x.divisors if isinstance(x, _Tracked) else ()


def invariants(x: Any) -> tuple:
    """The monomials (tracked ints) that must keep their values for ``x`` to keep its own."""
    if not isinstance(x, _Tracked):
        return ()
    return (x,) if x.factors is not None else x.invariants


def factor_source(factor: Any) -> AnySource | None:
    """Where one factor of a monomial came from; None for a plain int."""
    return factor.source if isinstance(factor, _Read) else None


def _cancel(top: tuple, bottom: tuple) -> tuple[tuple, tuple]:
    """Drop factors that appear above and below the line (``(3 * C) // 3`` is ``C``)."""

    def key(f: Any) -> Any:
        return factor_source(f) or ("int", int(f))

    bottom_left = list(bottom)
    kept = []
    for f in top:
        match = next((b for b in bottom_left if key(b) == key(f)), None)
        if match is None:
            kept.append(f)
        else:
            bottom_left.remove(match)
    return tuple(kept), tuple(bottom_left)


def _monomial(op: Any, a: Any, b: Any) -> tuple[tuple | None, tuple]:
    """The factors and divisors of ``op(a, b)``, when it is a product or an exact quotient."""
    fa, fb = _factors(a), _factors(b)
    if fa is None or fb is None:
        return None, ()
    if op is operator.mul:
        return _cancel(fa + fb, _divisors(a) + _divisors(b))
    if op is operator.floordiv and _plain(b) and _plain(a) % _plain(b) == 0:
        return _cancel(fa + _divisors(b), _divisors(a) + fb)
    return None, ()


def _plain(x: Any) -> Any:
    if isinstance(x, _Tracked):
        return int(x) if isinstance(x, int) else float(x)
    return x


def _derive(value: Any, operands: tuple, factors: tuple | None = None, divisors: tuple = ()) -> Any:
    """``value`` computed from ``operands``, tracked when any of them is."""
    sources = frozenset().union(*(_sources(x) for x in operands))
    if not sources or isinstance(value, bool):
        return value
    if isinstance(value, int):
        out: Any = _DerivedInt(value)
    elif isinstance(value, float):
        out = _DerivedFloat(value)
    else:
        return value
    out.sources = sources
    out.factors, out.divisors = (factors, divisors) if isinstance(value, int) else (None, ())
    kept = [
        m
        for x in operands
        for m in (x.invariants if out.factors is not None and isinstance(x, _Tracked) else invariants(x))
    ]
    out.invariants = tuple({id(m): m for m in kept}.values())
    return out


def _binary(op):
    def combined(a, b):
        factors, divisors = _monomial(op, a, b)
        return _derive(op(_plain(a), _plain(b)), (a, b), factors, divisors)

    def forward(self, other):
        return combined(self, other)

    def reflected(self, other):
        return combined(other, self)

    return forward, reflected


def _with_arithmetic(cls: type) -> type:
    for name, op in (
        ("add", operator.add),
        ("sub", operator.sub),
        ("mul", operator.mul),
        ("floordiv", operator.floordiv),
        ("truediv", operator.truediv),
        ("mod", operator.mod),
        ("pow", operator.pow),
    ):
        forward, reflected = _binary(op)
        setattr(cls, f"__{name}__", forward)
        setattr(cls, f"__r{name}__", reflected)
    cls.__neg__ = lambda self: _derive(-_plain(self), (self,))
    return cls


class _Read(_Tracked):
    """A number read from one source, unchanged."""

    @property
    def source(self) -> AnySource:
        (source,) = self.sources
        return source


@_with_arithmetic
class _Tagged(_Read, int):
    """An int attribute read during capture."""


@_with_arithmetic
class _ShapeRead(_Read, int):
    """A size read from a traced tensor during capture."""


@_with_arithmetic
class _DerivedInt(_Tracked, int):
    """An int computed from tagged attributes."""


@_with_arithmetic
class _DerivedFloat(_Tracked, float):
    """A float computed from tagged attributes."""


def _untag(x: Any) -> Any:
    if isinstance(x, _Tracked):
        return _plain(x)
    if isinstance(x, slice):
        return slice(_untag(x.start), _untag(x.stop), _untag(x.step))
    if isinstance(x, torch.Size):
        return torch.Size(_untag(v) for v in x)
    if isinstance(x, (list, tuple)) and _has_tracked(x):
        return type(x)(_untag(v) for v in x)
    return x


def _has_tracked(x: Any) -> bool:
    if isinstance(x, _Tracked):
        return True
    if isinstance(x, slice):
        return any(isinstance(v, _Tracked) for v in (x.start, x.stop, x.step))
    if isinstance(x, (list, tuple)):
        return any(_has_tracked(v) for v in x)
    return False


def _leaves(x: Any) -> Iterator[Any]:
    if isinstance(x, slice):
        yield from (x.start, x.stop, x.step)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


# -------------------------------------------------------------- recording
@functools.cache
def _recording_class(cls: type) -> type:
    def __getattribute__(self, name):  # noqa: N807 - the hook's name is fixed by Python
        value = cls.__getattribute__(self, name)
        state = _STATE.get()
        if state is None or id(self) not in state.paths:
            return value
        path = state.paths[id(self)]
        if type(value) is int:
            return _derive_tagged(value, Source(path, name))
        if type(value) in (tuple, list, torch.Size) and value and all(type(v) is int for v in value):
            return type(value)(_derive_tagged(v, Source(path, name, k)) for k, v in enumerate(value))
        return value

    return type(
        cls.__name__,
        (cls,),
        {"__getattribute__": __getattribute__, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )


def _derive_tagged(value: int, source: AnySource) -> _Tagged | _ShapeRead:
    tagged = (_Tagged if isinstance(source, Source) else _ShapeRead)(value)
    tagged.sources, tagged.factors = frozenset({source}), (tagged,)
    return tagged


_SHAPE_READS = (torch.Tensor.size, torch.Tensor.shape.__get__, torch.Tensor.__len__)


def _read_shape(func: Any, args: tuple, kwargs: dict, out: Any, tracer: Any) -> Any:
    """``out`` (a size or sizes read from ``args[0]``) tagged with the graph node and dims read."""
    proxy = get_proxy_slot(args[0], tracer, None) if isinstance(args[0], torch.Tensor) else None
    if proxy is None:
        return out  # not a traced value (a parameter, a constant): its size is fixed
    name = proxy.proxy.node.name
    if isinstance(out, torch.Size):
        return torch.Size(_derive_tagged(v, ShapeSource(name, d)) for d, v in enumerate(out))
    if type(out) is not int:
        return out
    dim = 0 if func is torch.Tensor.__len__ else (args[1] if len(args) > 1 else kwargs["dim"])
    return _derive_tagged(out, ShapeSource(name, dim % args[0].dim()))


def _nodes_after(graph: fx.Graph, last: fx.Node | None) -> frozenset[str]:
    """Names of the nodes appended to ``graph`` after ``last`` (all of them when ``last`` is None)."""
    node = last.next if last is not None else next(iter(graph.nodes), None)
    names = []
    while node is not None and node.op != "root":
        names.append(node.name)
        node = node.next
    return frozenset(names)


@dataclass
class _RecordingState:
    paths: dict[int, str]
    uses: list[AttributeUse]


_STATE: contextvars.ContextVar[_RecordingState | None] = contextvars.ContextVar("graphprune_uses", default=None)


class _UseRecorder(TorchFunctionMode):
    """Notes where tracked numbers reach torch functions, then calls them with plain numbers."""

    def __init__(self, state: _RecordingState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mode = get_proxy_mode()
        if func in _SHAPE_READS:
            out = func(*args, **kwargs)
            return _read_shape(func, args, kwargs, out, mode.tracer) if mode is not None else out
        if not (_has_tracked(args) or _has_tracked(tuple(kwargs.values()))):
            return func(*args, **kwargs)
        sized = _size_uses(func, args, kwargs)
        placed = {id(u.value) for u in sized}
        for leaf in _leaves((args, tuple(kwargs.values()))):
            if isinstance(leaf, _Tracked) and id(leaf) not in placed and not isinstance(leaf, _Read):
                self.state.uses.append(AttributeUse(leaf.sources, False, leaf, invariants=invariants(leaf)))
        graph = mode.tracer.graph if mode is not None else None
        last = next(reversed(graph.nodes), None) if graph is not None else None
        out = func(*(_untag(a) for a in args), **{k: _untag(v) for k, v in kwargs.items()})
        nodes = _nodes_after(graph, last) if graph is not None else None
        self.state.uses.extend(replace(u, nodes=nodes) for u in sized)
        return out


def _size_uses(func: Any, args: tuple, kwargs: dict) -> list[AttributeUse]:
    """Where each tracked int lands among the ATen op's size arguments, for functions that take sizes."""
    out: list[AttributeUse] = []

    def add(value: Any, packets: tuple, path: tuple, dim: int | None = None) -> None:
        if isinstance(value, _Tracked) and isinstance(value, int):
            out.append(
                AttributeUse(
                    sources=value.sources,
                    direct=isinstance(value, _Read),
                    value=value,
                    packets=packets,
                    path=path,
                    dim=dim,
                    factors=value.factors,
                    divisors=value.divisors,
                )
            )

    def sizes(rest: tuple) -> list:
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)

    shape_ops = {
        torch.Tensor.view: (aten.view, aten._unsafe_view, aten.reshape),
        torch.Tensor.reshape: (aten.reshape, aten.view, aten._unsafe_view),
        torch.reshape: (aten.reshape, aten.view, aten._unsafe_view),
        torch.Tensor.expand: (aten.expand,),
        torch.Tensor.repeat: (aten.repeat,),
        torch.Tensor.new_zeros: (aten.new_zeros,),
        torch.Tensor.new_ones: (aten.new_ones,),
        torch.Tensor.new_empty: (aten.new_empty,),
    }
    if func in shape_ops:
        for k, v in enumerate(sizes(args[1:] or (kwargs.get("size") or kwargs.get("shape") or (),))):
            add(v, shape_ops[func], ("args", 1, k))
    elif func in (torch.zeros, torch.ones, torch.empty, torch.randn, torch.rand):
        for k, v in enumerate(sizes(args)):
            add(v, (getattr(aten, func.__name__),), ("args", 0, k))
    elif func in (torch.full, torch.Tensor.new_full):
        at = 0 if func is torch.full else 1
        for k, v in enumerate(args[at] if len(args) > at else kwargs.get("size", ())):
            add(v, (aten.full if func is torch.full else aten.new_full,), ("args", at, k))
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
def recording_uses(model: nn.Module, uses: list[AttributeUse]) -> Iterator[None]:
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
        for m in model.modules():  # forward may have stored a tagged size (self.H = x.shape[2])
            for name, value in list(vars(m).items()):
                if _has_tracked(value):
                    m.__dict__[name] = _untag(value)


# ---------------------------------------------------------------- queries
def owner_chain(node: fx.Node) -> list[str]:
    """Module paths from the outermost to the module whose forward created ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _cls in stack.values()]


def uses_for(uses: list[AttributeUse], node: fx.Node, path: tuple) -> list[AttributeUse]:
    """The recorded size uses (direct or computed) that produced argument ``path`` of ``node``:
    by the nodes each call created, or, where no tracer was found, by the modules that own it."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return []
    packet = node.target.overloadpacket
    old = arg_at(node, path)
    is_slice = packet is aten.slice
    rank = len(node.args[0].meta["val"].shape) if is_slice else 0
    dim = (node.args[1] if len(node.args) > 1 else 0) if is_slice else None
    owners = set(owner_chain(node))
    return [
        u
        for u in uses
        if u.path == path
        and int(u.value) == old
        and packet in u.packets
        and (
            node.name in u.nodes
            if u.nodes is not None
            else any(isinstance(s, Source) and s.module in owners for s in u.sources)
        )
        and (u.dim is None or dim is None or u.dim % rank == dim % rank)
    ]
