"""SparseGPT (Frantar & Alistarh, 2023): N:M masks chosen with second-order information, and the
remaining weights updated to reconstruct the layer's output on calibration inputs.

For a weight matrix ``W [rows, cols]`` (hardware layout, see :mod:`graphprune.algorithms.nm`) and the
Hessian ``H = 2/N sum x x^T`` of its inputs, columns are processed left to right in blocks.  At
the start of every group of ``m`` columns the ``n`` weights per row with the largest
``w^2 / [H^-1]_jj^2`` are kept; each column's pruning error is then spread over the columns not
yet processed through the inverse Hessian's Cholesky factor.

Hessians are accumulated and solved in float32 by default, with damping, as the reference
implementations do (twice the throughput of float64 on CPUs, far more on most GPUs); a Hessian
whose damped float32 Cholesky factorisation fails is solved again in float64, and the caller is
told.  Every tensor lives on the device of the activations or the weight it belongs to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from graphprune.algorithms.nm import CONV, NMPattern, from_matrix, to_matrix
from graphprune.errors import InputError

if TYPE_CHECKING:
    from graphprune.core.frontend import Frontend
    from graphprune.core.layers import WeightLayer


class _Layer(Protocol):
    @property
    def weight(self) -> str: ...

    @property
    def layout(self) -> str: ...


L = TypeVar("L", bound=_Layer)


PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def prune_matrix(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: NMPattern,
    *,
    block: int = 128,
    damp: float = 0.01,
    consume: bool = False,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Return (updated weight, keep mask), both ``[rows, cols]`` on the weight's device, and the
    precision the solve ran in: ``precision`` (float32 by default, as the reference implementations),
    or float64 where the damped Hessian has no Cholesky factor in float32.  ``consume=True`` lets the
    solve work in ``hessian``'s own memory (destroying it) instead of a copy.  Raises
    :class:`Unfactorable` where it has none in float64 either."""
    n, m = pattern.n, pattern.m
    block = max(m, block - block % m)
    dtype = PRECISIONS[precision]
    device = weight.device
    h = hessian.detach().to(device)
    h = h if consume and h.dtype == dtype and h.data_ptr() == hessian.data_ptr() else h.to(dtype, copy=True)
    dead = torch.diagonal(h) == 0  # inputs that never fire carry no information
    h[dead, dead] = 1.0
    inverse = _inverse_factor(h, damp)
    if inverse is None and dtype != torch.float64:
        dtype, precision = torch.float64, "float64"
        h = hessian.detach().to(device=device, dtype=dtype, copy=True)
        h[dead, dead] = 1.0
        inverse = _inverse_factor(h, damp)
    if inverse is None:
        raise Unfactorable(
            f"SparseGPT: the damped Hessian of a {tuple(weight.shape)} weight has no Cholesky factor even in "
            f"float64 (its inputs are nearly linearly dependent): raise damp (now {damp})"
        )
    del h
    w = weight.detach().to(dtype, copy=True)
    w[:, dead] = 0.0
    rows, cols = w.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[:, start:end].clone()
        inv1 = inverse[start:end, start:end]
        errors = torch.zeros_like(w1)
        for i in range(end - start):
            if i % m == 0:
                scores = w1[:, i : i + m].pow(2) / torch.diagonal(inv1)[i : i + m].pow(2)
                chosen = scores.topk(n, dim=1).indices
                keep[:, start + i : start + i + m].scatter_(1, chosen, True)
            column = w1[:, i]
            kept = column * keep[:, start + i]
            error = (column - kept) / inv1[i, i]
            w1[:, i:] -= error[:, None] * inv1[i, i:][None, :]
            w1[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = w1
        w[:, end:] -= errors @ inverse[start:end, end:]
    return w * keep, keep, precision


class Unfactorable(InputError):
    """A damped Hessian without a Cholesky factor, even in float64."""


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """The upper Cholesky factor of ``(h + damp * mean(diag h) * I)^-1``, in ``h``'s dtype, working in
    ``h``'s memory plus one matrix; None (``h`` as it came) where the first factorisation fails."""
    added = damp * torch.diagonal(h).mean()
    h.diagonal().add_(added)
    factor, info = torch.linalg.cholesky_ex(h)
    if info.item() or not bool(torch.isfinite(factor).all()):
        h.diagonal().sub_(added)
        return None
    torch.cholesky_inverse(factor, out=h)
    del factor
    inverse, info = torch.linalg.cholesky_ex(h, upper=True)
    if info.item() or not bool(torch.isfinite(inverse).all()):
        return None
    return inverse


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
        """The window of a torch convolution with zero padding (``padding="same"`` pads the odd one
        of a window's extra rows or columns at the bottom and right, as torch does)."""

        def two(v: tuple[int, ...], fill: int) -> tuple[int, int]:
            return (fill, v[0]) if len(v) == 1 else (v[0], v[1])

        kernel, dilation = two(conv.kernel_size, 1), two(conv.dilation, 1)
        if conv.padding == "valid":
            pads = (0, 0, 0, 0)
        elif conv.padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
        else:
            top, left = two(conv.padding, 0)  # type: ignore[arg-type]
            pads = (top, left, top, left)
        return cls(kernel, two(conv.stride, 1), dilation, pads, conv.groups)


def conv_columns(x: torch.Tensor, geometry: ConvGeometry, group: int) -> torch.Tensor:
    """Input patches of one group of a conv, ``[patches, R*S*C_group]`` in channel-last order."""
    if x.dim() == 3:  # conv1d as a conv2d of height 1
        x = x.unsqueeze(2)
    c = x.shape[1] // geometry.groups
    x = x[:, group * c : (group + 1) * c]
    top, left, bottom, right = geometry.pads
    x = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(x, geometry.kernel, dilation=geometry.dilation, stride=geometry.stride)  # [B, C*R*S, L]
    window = geometry.kernel[0] * geometry.kernel[1]
    cols = cols.reshape(x.shape[0], c, window, -1).permute(0, 3, 2, 1)  # [B, L, R*S, C]
    return cols.reshape(-1, window * c)


class HessianSum:
    """``2/N sum x x^T`` of one layer's input columns (one matrix per conv group), batch by batch,
    in ``dtype`` on the activations' device.

    Every frontend feeds it the activations its runner produces; a conv's columns are its patches
    (:func:`conv_columns`), any other layer's are the rows of its input with the reduced channels
    last.  A distributed run sums :attr:`sums` and :attr:`rows` over the ranks before
    :meth:`hessians`."""

    def __init__(self, window: ConvGeometry | None, dtype: torch.dtype = torch.float32) -> None:
        self.window = window
        self.dtype = dtype
        self.sums: list[torch.Tensor] = []
        self.rows = 0

    def add(self, x: torch.Tensor, channel_axis: int = -1) -> None:
        x = x.detach().to(self.dtype)
        if self.window is not None:
            columns = [conv_columns(x, self.window, g) for g in range(self.window.groups)]
        else:
            x = x.movedim(channel_axis, -1)
            columns = [x.reshape(-1, x.shape[-1])]
        for g, c in enumerate(columns):
            if len(self.sums) <= g:
                self.sums.append(torch.zeros(c.shape[1], c.shape[1], dtype=self.dtype, device=c.device))
            self.sums[g].addmm_(c.T, c)  # in place: no second [cols, cols] matrix
        self.rows += columns[0].shape[0]

    def hessians(self, rows: float | None = None) -> list[torch.Tensor]:
        """The Hessians, made in the sums' own memory; ``rows``: the row count over every rank."""
        total = float(self.rows if rows is None else rows)
        return [s.mul_(2 / max(total, 1.0)) for s in self.sums]


def layer_hessians(
    state: Frontend[Any], layer: WeightLayer, calibration: Any, precision: str = "float32"
) -> list[torch.Tensor]:
    """The layer's Hessians (one per conv group) from its inputs in the model as it is now, over the
    calibration data of ``state`` (summed over the ranks of a distributed run), accumulated in
    ``precision``."""
    total = HessianSum(state.conv_window(layer) if layer.layout == CONV else None, PRECISIONS[precision])
    state.observe(calibration, {layer: lambda x: total.add(x, layer.channel_axis)})
    rows = torch.tensor(float(total.rows), dtype=torch.float64, device=total.sums[0].device if total.sums else None)
    state.reduce_sum(*total.sums, rows)
    return total.hessians(float(rows))


def prune_layer(
    weight: torch.Tensor,
    layout: str,
    hessians: list[torch.Tensor],
    pattern: NMPattern,
    *,
    block: int,
    damp: float,
    consume: bool = False,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """SparseGPT on one layer's weight (its stored layout): each conv group against its own Hessian.
    Returns the new weight, in the weight's dtype, its keep-mask, and whether a float32 solve had to
    be retried in float64; ``consume`` lets the solve use up the Hessians (the last layer that reads
    them)."""
    new, keep = torch.empty_like(weight), torch.empty_like(weight, dtype=torch.bool)
    rows = weight.shape[0] // len(hessians) if layout == CONV else None
    retried = False
    for g, hessian in enumerate(hessians):
        target = slice(g * rows, (g + 1) * rows) if rows else slice(None)
        part = weight[target]
        w, k, used = prune_matrix(
            to_matrix(part, layout), hessian, pattern, block=block, damp=damp, consume=consume, precision=precision
        )
        new[target] = from_matrix(w, layout, part.shape).to(weight.dtype)
        keep[target] = from_matrix(k, layout, part.shape)
        retried |= used != precision
    return new, keep, retried


def sparsegpt_layers(
    groups: Sequence[Sequence[L]],
    hessians: Callable[[L, str], list[torch.Tensor]],
    weight: Callable[[L], torch.Tensor],
    write: Callable[[L, torch.Tensor, torch.Tensor], None],
    pattern: Callable[[L], NMPattern],
    *,
    block: int,
    damp: float,
    precision: str = "float32",
) -> list[str]:
    """SparseGPT over a model, group by group in graph order: a group is the layers that read one
    activation, whose Hessian ``hessians(first layer, precision)`` reads from the model as already
    sparsified upstream; ``write(layer, new weight, keep-mask)`` puts each result where the frontend
    keeps it.  A float32 solve that fails is retried in float64, from the same sums and, where those
    lost too much, from sums accumulated again in float64.  Returns the layers retried so."""
    retried = []
    for group in tqdm(groups, desc="SparseGPT", unit="input", disable=None, leave=False):
        shared, used = hessians(group[0], precision), precision
        for j, layer in enumerate(group):
            while True:  # at most twice: in precision, then from float64 sums
                try:
                    new, keep, again = prune_layer(
                        weight(layer),
                        layer.layout,
                        shared,
                        pattern(layer),
                        block=block,
                        damp=damp,
                        consume=j == len(group) - 1,
                        precision=used,
                    )
                    break
                except Unfactorable:
                    if used == "float64":
                        raise
                    shared, used = hessians(group[0], "float64"), "float64"
            write(layer, new, keep)
            if again or used != precision:
                retried.append(layer.weight)
    return retried
