"""N:M mask refinement without training: swaps inside each group of ``m`` that lower a layer's
output error on calibration inputs, and (for SparseGPT) a re-fit of the kept weights.

A row ``w`` of a layer's weight (hardware layout, :mod:`graphprune.algorithms.nm`) against its dense
row ``w0`` and the Hessian ``H`` of the layer's inputs has calibration error
``E = (w - w0) H (w - w0)^T``.  Changing ``w`` by ``u`` changes it by exactly ``2 u·g + u H u^T``
with ``g = (w - w0) H``, so the effect of every swap (prune one kept weight, revive one pruned
weight of the same group) is known in closed form from ``g``, the group's diagonal block of
``H`` and the two weights.  Each round makes, row by row, the best swap of the whole row while one
lowers ``E`` (the idea of DSnoT, Zhang et al. 2024, with the exact error change in place of its
mean-activation estimate); with ``refit`` the revived weight takes its optimal value and the kept
weights are then solved again on the new mask by preconditioned conjugate gradients (the
alternating mask-and-weights solve of ALPS, Meng et al. 2024, without its ADMM penalty).

Swaps and the re-fit lower the damped objective (``H`` plus ``damp`` times its mean diagonal, which
keeps revived weights finite where an input barely fires); the undamped ``E`` is measured before
and after in float64 and any row it would raise is restored, so refinement never raises a
layer's calibration error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.algorithms.nm import CONV, NMPattern, from_matrix, to_matrix
from graphprune.errors import InternalError

CANDIDATES = 1 << 24  # candidate swaps scored at once (row chunks bound the memory)


@dataclass(frozen=True)
class Refinement:
    """What refining did: the calibration error (summed over rows) before and after, the swaps
    made, and the rows restored because float arithmetic would have raised their error."""

    before: float
    after: float
    swaps: int
    restored: int

    def __add__(self, other: Refinement) -> Refinement:
        return Refinement(
            before=self.before + other.before,
            after=self.after + other.after,
            swaps=self.swaps + other.swaps,
            restored=self.restored + other.restored,
        )


NOTHING = Refinement(before=0.0, after=0.0, swaps=0, restored=0)


def refine_matrix(
    dense: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    hessian: torch.Tensor,
    m: int,
    *,
    refit: bool,
    damp: float = 0.01,
    rounds: int = 3,
    steps: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, Refinement]:
    """Refine ``weight [rows, cols]`` (zero where ``keep`` is False, ``n`` kept per group of ``m``
    consecutive columns) against ``dense`` and ``hessian [cols, cols]``.  Without ``refit`` kept
    weights stay dense values (masks only); with it, they are solved for.  Returns the new weight
    and mask (in ``weight``'s dtype and device) and the :class:`Refinement`."""
    rows, cols = weight.shape
    device, dtype = weight.device, hessian.dtype if hessian.is_floating_point() else torch.float32
    h = hessian.detach().to(device=device, dtype=dtype)
    scale = torch.diagonal(h).mean()
    if not bool(scale > 0):  # no input ever fired: there is no error to lower
        return weight, keep, NOTHING
    objective = h + damp * scale * torch.eye(cols, dtype=dtype, device=device) if refit else h
    w0 = dense.detach().to(dtype)
    w = weight.detach().to(dtype, copy=True)
    k = keep.clone()
    swaps = 0
    for _ in range(rounds):
        made = _swap(w, k, w0, objective, m, refit=refit, limit=cols // m)
        swaps += made
        if refit:
            _refit(w, k, w0, objective, steps)
        if not made:
            break
    before, after = _errors(weight, dense, hessian), _errors(w, dense, hessian)
    worse = after > before
    w[worse], k[worse] = weight[worse].to(dtype), keep[worse]
    after = torch.where(worse, before, after)
    refinement = Refinement(
        before=float(before.sum()), after=float(after.sum()), swaps=swaps, restored=int(worse.sum())
    )
    return w.to(weight.dtype), k, refinement


def refine_layer(
    dense: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    layout: str,
    hessians: list[torch.Tensor],
    pattern: NMPattern,
    *,
    refit: bool,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, Refinement]:
    """:func:`refine_matrix` on one layer's weight in its stored layout, each conv group against
    its own Hessian (as :func:`graphprune.algorithms.sparsegpt.prune_layer` splits them)."""
    new, mask, total = weight.clone(), keep.clone(), NOTHING
    rows = weight.shape[0] // len(hessians) if layout == CONV else None
    for g, hessian in enumerate(hessians):
        target = slice(g * rows, (g + 1) * rows) if rows else slice(None)
        shape = weight[target].shape
        w, k, done = refine_matrix(
            to_matrix(dense[target], layout),
            to_matrix(weight[target], layout),
            to_matrix(keep[target], layout),
            hessian,
            pattern.m,
            refit=refit,
            damp=damp,
        )
        new[target], mask[target] = from_matrix(w, layout, shape), from_matrix(k, layout, shape)
        total = total + done
    return new, mask, total


def _errors(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``(w - w0) H (w - w0)^T`` of every row, in float64."""
    delta = (weight.detach().double() - dense.detach().double().to(weight.device)).reshape(weight.shape[0], -1)
    return ((delta @ hessian.detach().double().to(weight.device)) * delta).sum(1)


def _swap(
    w: torch.Tensor, keep: torch.Tensor, w0: torch.Tensor, h: torch.Tensor, m: int, *, refit: bool, limit: int
) -> int:
    """Best-first swaps in place, the best of each row per step, while one lowers the objective and
    for at most ``limit`` steps; returns how many were made."""
    rows, cols = w.shape
    groups = cols // m
    kept = keep.reshape(rows, groups, m).sum(-1)
    n = int(kept[0, 0]) if kept.numel() else 0
    if not bool((kept == n).all()):
        raise InternalError(f"N:M refinement needs the same number of kept weights in every group of {m}")
    diag = torch.diagonal(h).reshape(groups, m)
    blocks = h.reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [g, m, m]: H[gm+a, gm+b]
    gradient = (w - w0) @ h
    error = ((w - w0) * gradient).sum(1)
    active = torch.arange(rows, device=w.device)
    made = 0
    chunk = max(1, CANDIDATES // (cols * n * (m - n) * 2))
    for _ in range(limit):
        best = []
        for start in range(0, len(active), chunk):
            r = active[start : start + chunk]
            value, pruned, revived, u_p, u_q = _best_swaps(
                w[r], keep[r], w0[r], gradient[r], diag, blocks, n, refit=refit
            )
            value, group = value.min(1, keepdim=True)
            best.append([value[:, 0]] + [t.gather(1, group)[:, 0] for t in (pruned, revived, u_p, u_q)])
        value, p, q, u_p, u_q = (torch.cat(t) for t in zip(*best))
        better = value < -1e-6 * error[active].abs().clamp_min(torch.finfo(w.dtype).tiny)
        if not bool(better.any()):
            break
        r, p, q, u_p, u_q = active[better], p[better], q[better], u_p[better], u_q[better]
        w[r, p], w[r, q] = 0.0, u_q
        keep[r, p], keep[r, q] = False, True
        gradient[r] += u_p[:, None] * h[p] + u_q[:, None] * h[q]
        error[r] += value[better]
        made += len(r)
        active = r
    return made


def _best_swaps(
    w: torch.Tensor,
    keep: torch.Tensor,
    w0: torch.Tensor,
    gradient: torch.Tensor,
    diag: torch.Tensor,
    blocks: torch.Tensor,
    n: int,
    *,
    refit: bool,
) -> tuple[torch.Tensor, ...]:
    """The best swap in each group of rows ``[r, cols]``, each ``[r, groups]``: the objective's
    change, the column pruned and the one revived, and the change of the weight at each.  Only real
    swaps are scored: ``n`` kept times ``m - n`` pruned weights per group."""
    rows = w.shape[0]
    groups, m = diag.shape
    order = keep.reshape(rows, groups, m).to(torch.int8).argsort(dim=-1, descending=True, stable=True)
    p, q = order[..., :n], order[..., n:]  # [r, g, n] kept and [r, g, m - n] pruned positions
    w3, g3 = w.reshape(rows, groups, m), gradient.reshape(rows, groups, m)
    u_p = -w3.gather(-1, p)[..., :, None]
    g_p, g_q = g3.gather(-1, p)[..., :, None], g3.gather(-1, q)[..., None, :]
    d = diag.expand(rows, groups, m)
    h_pp, h_qq = d.gather(-1, p)[..., :, None], d.gather(-1, q)[..., None, :]
    h_pq = (
        blocks.expand(rows, groups, m, m)
        .gather(2, p[..., None].expand(rows, groups, n, m))
        .gather(3, q[..., None, :].expand(rows, groups, n, m - n))
    )
    if refit:
        c = g_q + u_p * h_pq
        u_q = -c / h_qq
        change = 2 * u_p * g_p + u_p.square() * h_pp - c.square() / h_qq
    else:
        u_q = w0.reshape(rows, groups, m).gather(-1, q)[..., None, :].expand(rows, groups, n, m - n)
        change = 2 * (u_p * g_p + u_q * g_q) + u_p.square() * h_pp + 2 * u_p * u_q * h_pq + u_q.square() * h_qq
    value, index = change.reshape(rows, groups, -1).min(-1)
    i, j = (index // (m - n))[..., None], (index % (m - n))[..., None]
    start = torch.arange(groups, device=w.device) * m
    pruned, revived = start + p.gather(-1, i)[..., 0], start + q.gather(-1, j)[..., 0]
    u_p = u_p.expand(rows, groups, n, m - n).reshape(rows, groups, -1).gather(-1, index[..., None])[..., 0]
    u_q = u_q.expand(rows, groups, n, m - n).reshape(rows, groups, -1).gather(-1, index[..., None])[..., 0]
    return value, pruned, revived, u_p, u_q


def _refit(w: torch.Tensor, keep: torch.Tensor, w0: torch.Tensor, h: torch.Tensor, steps: int) -> None:
    """Minimise ``(w - w0) H (w - w0)^T`` over the kept weights of every row, in place: ``steps`` of
    conjugate gradients preconditioned by ``diag(H)``, from the current weights (each step lowers
    the objective)."""
    mask = keep.to(w.dtype)
    inverse_diag = 1.0 / torch.diagonal(h)
    residual = -((w - w0) @ h) * mask
    z = residual * inverse_diag
    direction = z.clone()
    rz = (residual * z).sum(1)
    for _ in range(steps):
        product = (direction @ h) * mask
        curvature = (direction * product).sum(1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(w.dtype).tiny), 0.0)
        w += alpha[:, None] * direction
        residual -= alpha[:, None] * product
        z = residual * inverse_diag
        rz_next = (residual * z).sum(1)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(w.dtype).tiny), 0.0)
        direction = z + beta[:, None] * direction
        rz = rz_next
