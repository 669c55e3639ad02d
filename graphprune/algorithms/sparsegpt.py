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


@dataclass
class InverseFactor:
    """What SparseGPT needs of a Hessian: the upper Cholesky factor of its damped inverse, the
    inputs that never fire (their weights go to zero), and the precision it was made in."""

    upper: torch.Tensor
    dead: torch.Tensor
    precision: str


def inverse_factor(
    hessian: torch.Tensor, *, damp: float, precision: str = "float32", consume: bool = False
) -> InverseFactor:
    """The :class:`InverseFactor` of ``hessian`` in ``precision``, or in float64 where the damped
    Hessian has no Cholesky factor in float32; on the Hessian's device.  ``consume=True`` lets it
    work in ``hessian``'s own memory (destroying it) instead of a copy.  Raises
    :class:`Unfactorable` where it has none in float64 either."""
    dtype = PRECISIONS[precision]
    h = hessian.detach()
    h = h if consume and h.dtype == dtype else h.to(dtype, copy=True)
    dead = torch.diagonal(h) == 0  # inputs that never fire carry no information
    h[dead, dead] = 1.0
    upper, intact = _inverse_factor(h, damp)
    if upper is None and not intact and h.data_ptr() == hessian.data_ptr():
        raise Unfactorable(  # its own memory is spent: the caller accumulates the sums again in float64
            f"SparseGPT: a damped {tuple(hessian.shape)} Hessian has no Cholesky factor in {precision}"
        )
    if upper is None and dtype != torch.float64:
        precision = "float64"
        h = hessian.detach().to(torch.float64, copy=True)
        h[dead, dead] = 1.0
        upper, _ = _inverse_factor(h, damp)
    if upper is None:
        raise Unfactorable(
            f"SparseGPT: a damped {tuple(hessian.shape)} Hessian has no Cholesky factor even in float64 (its "
            f"inputs are nearly linearly dependent): raise damp (now {damp})"
        )
    return InverseFactor(upper, dead, precision)


def prune_columns(
    weight: torch.Tensor, factor: InverseFactor, pattern: NMPattern, *, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's column loop on ``weight [rows, cols]``: returns the updated weight, in the factor's
    precision, and its keep-mask, both on the weight's device."""
    n, m = pattern.n, pattern.m
    block = max(m, block - block % m)
    device = weight.device
    inverse, dead = factor.upper.to(device), factor.dead.to(device)
    # transposed, [cols, rows]: a column is a contiguous row, and each update is one in-place kernel
    wt = weight.detach().t().to(dtype=inverse.dtype, memory_format=torch.contiguous_format, copy=True)
    wt[dead] = 0.0
    cols, rows = wt.shape
    keep = torch.zeros(cols, rows, dtype=torch.bool, device=device)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1, k1 = wt[start:end], keep[start:end]  # views
        inv1 = inverse[start:end, start:end]
        diagonal = torch.diagonal(inv1)
        errors = torch.empty_like(w1)
        for i in range(end - start):
            if i % m == 0:
                scores = w1[i : i + m].square() / diagonal[i : i + m, None].square()
                k1[i : i + m].scatter_(0, scores.topk(n, dim=0).indices, True)
            error = torch.mul(w1[i], ~k1[i], out=errors[i]).div_(diagonal[i])
            w1[i:].addr_(inv1[i, i:], error, alpha=-1)  # spread column i's error over the block
            w1[i].mul_(k1[i])  # its kept weights are unchanged; its pruned ones exactly 0
        if end < cols:
            wt[end:].addmm_(inverse[start:end, end:].t(), errors, alpha=-1)  # and over the columns after it
    return wt.t(), keep.t()


def prune_matrix(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: NMPattern,
    *,
    block: int = 128,
    damp: float = 0.01,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """SparseGPT on ``weight [rows, cols]``: (updated weight, keep mask, the precision the solve
    ran in); see :func:`inverse_factor` and :func:`prune_columns`."""
    factor = inverse_factor(hessian.to(weight.device), damp=damp, precision=precision)
    return *prune_columns(weight, factor, pattern, block=block), factor.precision


class Unfactorable(InputError):
    """A damped Hessian without a Cholesky factor, even in float64."""


def _inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, bool]:
    """The upper Cholesky factor of ``(h + damp * mean(diag h) * I)^-1``, in ``h``'s dtype, working in
    ``h``'s memory plus one matrix, or None where a factorisation fails; and whether ``h`` still
    holds what it came with (it does when the first one fails, not when the second does)."""
    added = damp * torch.diagonal(h).mean()
    h.diagonal().add_(added)
    factor, info = torch.linalg.cholesky_ex(h)
    if info.item() or not bool(torch.isfinite(factor).all()):
        h.diagonal().sub_(added)
        return None, True
    torch.cholesky_inverse(factor, out=h)
    del factor
    inverse, info = torch.linalg.cholesky_ex(h, upper=True)
    if info.item() or not bool(torch.isfinite(inverse).all()):
        return None, False
    return inverse, True


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
    return hessians_of(state, [layer], calibration, precision)[layer.weight]


def hessians_of(
    state: Frontend[Any], layers: Sequence[WeightLayer], calibration: Any, precision: str = "float32"
) -> dict[str, list[torch.Tensor]]:
    """:func:`layer_hessians` of several layers from one run over the calibration data, by weight name."""
    totals = {
        layer.weight: HessianSum(state.conv_window(layer) if layer.layout == CONV else None, PRECISIONS[precision])
        for layer in layers
    }

    def add(layer: WeightLayer) -> Callable[[torch.Tensor], None]:
        return lambda x: totals[layer.weight].add(x, layer.channel_axis)

    state.observe(calibration, {layer: add(layer) for layer in layers})
    out = {}
    for name, total in totals.items():
        rows = torch.tensor(float(total.rows), dtype=torch.float64, device=total.sums[0].device if total.sums else None)
        state.reduce_sum(*total.sums, rows)
        out[name] = total.hessians(float(rows))
    return out


def prune_layer(
    weight: torch.Tensor, layout: str, factors: list[InverseFactor], pattern: NMPattern, *, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer's weight (its stored layout): each conv group against its own
    Hessian's factor.  Returns the new weight, in the weight's dtype, and its keep-mask."""
    new, keep = torch.empty_like(weight), torch.empty_like(weight, dtype=torch.bool)
    rows = weight.shape[0] // len(factors) if layout == CONV else None
    for g, factor in enumerate(factors):
        target = slice(g * rows, (g + 1) * rows) if rows else slice(None)
        part = weight[target]
        w, k = prune_columns(to_matrix(part, layout), factor, pattern, block=block)
        new[target] = from_matrix(w, layout, part.shape).to(weight.dtype)
        keep[target] = from_matrix(k, layout, part.shape)
    return new, keep


def factored(
    hessians: Callable[[str], list[torch.Tensor]], *, damp: float, precision: str = "float32", keep: bool = False
) -> tuple[list[InverseFactor], list[torch.Tensor]]:
    """The :class:`InverseFactor` of each Hessian ``hessians(precision)`` accumulates, and those
    Hessians (spent by the factorisation unless ``keep``).  A float32 factorisation that fails is
    retried in float64, from the same sums and, where those lost too much (or the failed solve used up
    their memory), from sums accumulated again in float64."""
    try:
        sums = hessians(precision)
        return [inverse_factor(h, damp=damp, precision=precision, consume=not keep) for h in sums], sums
    except Unfactorable:
        if precision == "float64":
            raise
        sums = hessians("float64")
        return [inverse_factor(h, damp=damp, precision="float64", consume=not keep) for h in sums], sums


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
    refine: Callable[
        [L, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]
    ]
    | None = None,
) -> list[str]:
    """SparseGPT over a model, group by group in graph order: a group is the layers that read one
    activation, whose Hessians ``hessians(first layer, precision)`` read from the model as already
    sparsified upstream are factored once for the group; ``write(layer, new weight, keep-mask)``
    puts each result where the frontend keeps it (factorisations as :func:`factored` makes them).
    ``refine(layer, dense, new, keep, Hessians)``, where given, improves each result before it is
    written (the Hessians are then kept, not consumed by the factorisation).  Returns the layers
    whose solve was retried in float64."""
    retried = []
    for group in tqdm(groups, desc="SparseGPT", unit="input", disable=None, leave=False):
        factors, sums = factored(
            lambda p: hessians(group[0], p), damp=damp, precision=precision, keep=refine is not None
        )
        again = any(f.precision != precision for f in factors)
        for layer in group:
            dense = weight(layer)
            new, keep = prune_layer(dense, layer.layout, factors, pattern(layer), block=block)
            if refine is not None:
                new, keep = refine(layer, dense, new, keep, sums)
            write(layer, new, keep)
            if again:
                retried.append(layer.weight)
    return retried
