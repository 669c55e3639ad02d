"""What each op of a graph reads, writes and computes, from shapes alone (:class:`OpCost`), and
the number formats a compressed layer runs in (:class:`Format`).

The roofline (:mod:`graphprune.emit.roofline`) turns these counts into time on a device, once a
number format is chosen for each tensor; each frontend lists its graph's ops as ``OpCost`` rows
(:func:`graphprune.frontends.torch.costs.graph_costs`), with MACs from :mod:`graphprune.core.macs`.
Counts are in elements, not bytes, so one walk of the graph serves every format.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class OpCost:
    """One op: its multiply-accumulates and the elements it moves.

    ``weight`` names the parameter a matmul or convolution multiplies by (the tensor N:M masks
    and weight quantization shrink); other parameters and buffers it reads (a bias, a norm's
    affine) are ``parameter_elements``; activations are what it reads besides them and what it
    writes.  Ops that only re-view their input (reshape, permute, slicing) are not listed: they
    move nothing.  An op that only transforms a weight layer's output element by element (a
    BatchNorm after a convolution, an activation) names that layer in ``epilogue_of``: deployment
    runtimes fold or fuse it into the layer, so that it moves nothing of its own.
    """

    key: str  # the weight's name, or the op and its occurrence ("aten.add#3"): the same in a pruned copy
    op: str
    macs: int
    weight: str | None
    weight_elements: int
    parameter_elements: int
    input_elements: int
    output_elements: int
    epilogue_of: str | None = None  # the weight layer whose output pass this op can run in (fused)


# bits per value of each number format
BITS = {"fp32": 32, "tf32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class Format:
    """How one weight layer runs: the number formats of its weight and of its activations (its
    math runs in the activations' format), and its N:M pattern."""

    weights: str
    activations: str
    pattern: tuple[int, int] | None = None

    @property
    def math(self) -> str:
        return self.activations

    def describe(self) -> str:
        base = self.weights if self.weights == self.activations else f"{self.weights}/{self.activations}"
        return f"{self.pattern[0]}:{self.pattern[1]} {base}" if self.pattern else base
