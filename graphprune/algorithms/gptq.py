"""GPTQ (Frantar et al., 2023): a layer's weights rounded to a number format one reduction column at
a time, each column's rounding error spread over the columns not yet rounded through the Cholesky
factor of the inverse Hessian of the layer's inputs, so that the layer's output on calibration
inputs is kept as well as the grid allows.  Same factor as SparseGPT
(:func:`graphprune.algorithms.sparsegpt.inverse_factor`), same column blocks with lazy updates.

A masked layer (an N:M mask already chosen): a pruned weight is "rounded" to exactly zero and its
error is spread like any other, so the kept weights absorb it and the pattern stays; this is the
SparseGPT paper's joint sparsify-and-quantize update, for a given mask.

Scales: per-channel formats take theirs from the weights as given (those round-to-nearest would
use); grouped formats (int4) fix a group's scales when the sweep reaches its first column, from the
weights as updated so far, as GPTQ does without activation reordering.
"""

from __future__ import annotations

import torch

from graphprune.algorithms.nm import from_matrix, to_matrix
from graphprune.algorithms.number_formats import GROUPED, fake_quantize_weight, weight_scales
from graphprune.algorithms.sparsegpt import InverseFactor


def quantize_columns(
    weight: torch.Tensor,
    factor: InverseFactor,
    kind: str,
    *,
    group_size: int | None = None,
    keep: torch.Tensor | None = None,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop on ``weight [rows, cols]``: returns the weight on the grid of format ``kind``
    (in the factor's precision, zero wherever ``keep`` is False) and its scales (``[rows]``, or
    ``[rows, cols / group_size]`` for grouped formats), on the weight's device."""
    device = weight.device
    inverse, dead = factor.upper.to(device), factor.dead.to(device)
    wt = weight.detach().t().to(dtype=inverse.dtype, memory_format=torch.contiguous_format, copy=True)
    wt[dead] = 0.0
    cols, rows = wt.shape
    pruned = None if keep is None else ~keep.t().to(device)
    grouped = kind in GROUPED
    if grouped:
        scales = torch.empty(rows, cols // group_size, dtype=torch.float32, device=device)
    else:
        scales = weight_scales(weight.detach() if keep is None else weight.detach() * keep, 0, kind).to(device)
    column_scale = scales
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1, inv1 = wt[start:end], inverse[start:end, start:end]
        diagonal = torch.diagonal(inv1)
        errors = torch.empty_like(w1)
        for i in range(end - start):
            col = start + i
            if grouped and col % group_size == 0:
                group = wt[col : col + group_size].t()
                if pruned is not None:
                    group = group * ~pruned[col : col + group_size].t()
                scales[:, col // group_size] = weight_scales(group, 0, kind, group_size)[:, 0]
                column_scale = scales[:, col // group_size]
            scale = column_scale[:, None] if grouped else column_scale
            q = fake_quantize_weight(w1[i, :, None].float(), scale, 0, kind, 1 if grouped else None)[:, 0].to(w1.dtype)
            if pruned is not None:
                q[pruned[col]] = 0.0
            torch.sub(w1[i], q, out=errors[i]).div_(diagonal[i])
            w1[i:].addr_(inv1[i, i:], errors[i], alpha=-1)
            w1[i] = q
        if end < cols:
            wt[end:].addmm_(inverse[start:end, end:].t(), errors, alpha=-1)
    return wt.t(), scales


def quantize_layer(
    weight: torch.Tensor,
    layout: str,
    factors: list[InverseFactor],
    kind: str,
    *,
    group_size: int | None = None,
    keep: torch.Tensor | None = None,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on one layer's weight (its stored layout, each conv group against its own Hessian's
    factor): the new weight in the weight's dtype, and the scales it lies on (:func:`quantize_columns`';
    those :func:`weight_scales` would read off the new weight may differ, as the sweep moves weights
    after their scale is fixed)."""
    new = torch.empty_like(weight)
    scales = []
    rows = weight.shape[0] // len(factors) if len(factors) > 1 else None
    for g, factor in enumerate(factors):
        target = slice(g * rows, (g + 1) * rows) if rows else slice(None)
        part = weight[target]
        mask = None if keep is None else to_matrix(keep[target], layout)
        w, scale = quantize_columns(
            to_matrix(part, layout), factor, kind, group_size=group_size, keep=mask, block=block
        )
        new[target] = from_matrix(w, layout, part.shape).to(weight.dtype)
        scales.append(scale)
    return new, torch.cat(scales)
