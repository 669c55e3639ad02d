"""SparseGPT (Frantar & Alistarh, 2023): N:M masks chosen with second-order information, and the
remaining weights updated to reconstruct the layer's output on calibration inputs.

For a weight matrix ``W [rows, cols]`` (hardware layout, see :mod:`graphprune.algorithms.nm`) and the
Hessian ``H = 2/N sum x x^T`` of its inputs, columns are processed left to right in blocks.  At
the start of every group of ``m`` columns the ``n`` weights per row with the largest
``w^2 / [H^-1]_jj^2`` are kept; each column's pruning error is then spread over the columns not
yet processed through the inverse Hessian's Cholesky factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphprune.algorithms.nm import NMPattern


def prune_matrix(weight: torch.Tensor, hessian: torch.Tensor, pattern: NMPattern, *, block: int = 128,
                 damp: float = 0.01, consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated weight, keep mask), both ``[rows, cols]``, in float64.  ``consume=True``
    works in a float64 ``hessian``'s own memory (destroying it) instead of a copy."""
    n, m = pattern.n, pattern.m
    block = max(m, block - block % m)
    w = weight.detach().double().clone()
    h = hessian.detach() if consume and hessian.dtype == torch.float64 else hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0  # inputs that never fire carry no information
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    # in place: one [cols, cols] matrix for the whole factorisation (11008^2 doubles are ~1 GB)
    torch.linalg.cholesky(h, out=h)
    torch.cholesky_inverse(h, out=h)
    inverse = torch.linalg.cholesky(h, upper=True, out=h)
    rows, cols = w.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[:, start:end].clone()
        inv1 = inverse[start:end, start:end]
        errors = torch.zeros_like(w1)
        for i in range(end - start):
            if i % m == 0:
                scores = w1[:, i:i + m].pow(2) / torch.diagonal(inv1)[i:i + m].pow(2)
                chosen = scores.topk(n, dim=1).indices
                keep[:, start + i:start + i + m].scatter_(1, chosen, True)
            column = w1[:, i]
            kept = column * keep[:, start + i]
            error = (column - kept) / inv1[i, i]
            w1[:, i:] -= error[:, None] * inv1[i, i:][None, :]
            w1[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = w1
        w[:, end:] -= errors @ inverse[start:end, end:]
    return w * keep, keep


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's window (1-D convolutions are 2-D ones of height 1)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    groups: int

    @classmethod
    def of(cls, conv: torch.nn.Conv1d | torch.nn.Conv2d) -> "ConvGeometry":
        def two(v: tuple[int, ...], fill: int) -> tuple[int, int]:
            return (fill, *v) if len(v) == 1 else tuple(v)
        (top, left) = two(conv.padding, 0)
        return cls(two(conv.kernel_size, 1), two(conv.stride, 1), two(conv.dilation, 1), (top, left, top, left),
                   conv.groups)


def conv_columns(x: torch.Tensor, geometry: ConvGeometry, group: int) -> torch.Tensor:
    """Input patches of one group of a conv, ``[patches, R*S*C_group]`` in channel-last order."""
    if x.dim() == 3:  # conv1d as a conv2d of height 1
        x = x.unsqueeze(2)
    c = x.shape[1] // geometry.groups
    x = x[:, group * c:(group + 1) * c]
    top, left, bottom, right = geometry.pads
    x = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(x, geometry.kernel, dilation=geometry.dilation, stride=geometry.stride)  # [B, C*R*S, L]
    window = geometry.kernel[0] * geometry.kernel[1]
    cols = cols.reshape(x.shape[0], c, window, -1).permute(0, 3, 2, 1)  # [B, L, R*S, C]
    return cols.reshape(-1, window * c)
