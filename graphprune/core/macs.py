"""Multiply-accumulates of the ops that do them, from shapes alone: one formula per kind of op.

Each frontend maps its ops to these (ATen's linear, mm, addmm, convolution and attention; ONNX's
MatMul, Gemm, Conv and ConvTranspose) and gives the shapes, captured or as a plan leaves them;
every other op counts zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod


def contraction(output: Sequence[int], reduction: int) -> int:
    """A matmul-like op: every output element sums ``reduction`` products."""
    return prod(output) * reduction


def convolution(output: Sequence[int], weight: Sequence[int]) -> int:
    """Every output element sums ``C_in/groups x kernel`` products (the weight is ``[C_out, C_in/g, k...]``)."""
    return prod(output) * prod(weight[1:])


def transposed_convolution(input_shape: Sequence[int], weight: Sequence[int]) -> int:
    """Every input element is scattered to ``C_out/groups x kernel`` outputs (the weight is
    ``[C_in, C_out/g, k...]``)."""
    return prod(input_shape) * prod(weight[1:])


def attention(query: Sequence[int], key: Sequence[int], value: Sequence[int]) -> int:
    """Scaled dot-product attention: the scores ``Q K^T`` and their product with ``V``."""
    scores = prod(query[:-1]) * key[-2]
    return scores * query[-1] + scores * value[-1]
