"""Weight layers: the one type every algorithm reads a layer through, whatever the frontend.

A weight layer multiplies an activation by a weight tensor (linear, transformers' Conv1D, conv,
a matmul against a parameter, ONNX Conv/Gemm/MatMul).  The algorithms need its weight's name,
how the weight is stored (:mod:`graphprune.algorithms.nm`'s layouts) and which axis of the
activation it reduces over; each frontend subclasses it with where the layer sits in its graph.
:func:`output_heads` is the one walk that finds the layers whose result is a model output.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

# How a weight is stored (its layout): Linear [out, in]; transformers' Conv1D [in, out]; Conv [K, C/g, k...]
LINEAR, CONV1D, CONV = "linear", "conv1d_transposed", "conv"


@dataclass(frozen=True, kw_only=True)
class WeightLayer:
    """A layer that multiplies an activation by a weight: what every algorithm needs of it."""

    weight: str  # the weight's name: a parameter's qualified name, or an initializer's
    layout: str  # how the weight is stored: LINEAR, CONV1D or CONV
    channel_axis: int  # the activation's axis the weight reduces over
    groups: int = 1  # a convolution's groups

    @property
    def owner(self) -> str:
        """The module (or initializer prefix) the weight belongs to."""
        return self.weight.rpartition(".")[0]

    def within(self, modules: Iterable[str]) -> bool:
        """The weight belongs to one of ``modules`` (or to a module inside one)."""
        return any(self.owner == m or self.owner.startswith(m + ".") for m in modules)

    @property
    def grouped(self) -> bool:
        return self.layout == CONV and self.groups > 1

    @property
    def output_axis(self) -> int:
        """The weight axis of the output channels (per-channel quantization scales run along it)."""
        return 1 if self.layout == CONV1D else 0

    @property
    def nm_axis(self) -> int:
        """The weight axis N:M groups run along (the reduction)."""
        return 0 if self.layout == CONV1D else 1


class ReadsActivation(Protocol):
    """A weight layer as frontends define it: with the activation it reads."""

    @property
    def activation(self) -> Hashable: ...

    @property
    def layout(self) -> str: ...

    @property
    def owner(self) -> str: ...


W = TypeVar("W", bound=ReadsActivation)


def by_input(layers: Sequence[W]) -> list[list[W]]:
    """Layers grouped by the activation they read (a conv by its own patches), in graph order: the
    layers of a group share one Hessian."""
    groups: dict[tuple, list[W]] = {}
    for layer in layers:
        groups.setdefault((layer.activation, layer.owner if layer.layout == CONV else None), []).append(layer)
    return list(groups.values())


Node = TypeVar("Node", bound=Hashable)


def output_heads(
    outputs: Iterable[Node | None], layer_nodes: set[Node], activations: Callable[[Node], Sequence[Node | None]]
) -> set[Node]:
    """The layer nodes whose result reaches a model output through single-activation ops only
    (views, casts, activations, norms): classifiers and LM heads, not blocks that write a residual
    stream.  ``activations(node)``: the nodes producing the node's activation inputs (None for a
    graph input)."""
    heads: set[Node] = set()
    for output in outputs:
        node = output
        while node is not None:
            if node in layer_nodes:
                heads.add(node)
                break
            inputs = activations(node)
            if len(inputs) != 1:
                break
            node = inputs[0]
    return heads


def owner_names(weights: Iterable[str]) -> dict[str, None]:
    """The module names that weight names imply, for a model without modules (ONNX): an initializer
    ``a.b.weight`` belongs to ``a.b`` and ``a``, which is how torch exports name them, so options
    that name modules (``ignore``, ``ratios``) use the same names on both frontends."""
    names: dict[str, None] = {"": None}
    for name in weights:
        parts = name.split(".")
        for k in range(1, len(parts)):
            names[".".join(parts[:k])] = None
    return names
