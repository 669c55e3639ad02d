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

Masks-only swaps lower ``E`` itself; with ``refit``, swaps and the re-fit lower the damped objective
(``H`` plus ``damp`` times its mean diagonal, which keeps revived weights finite where an input
barely fires).  Either way the undamped ``E`` is measured before and after in float64 and any row it
would raise is restored, so refinement never raises a layer's calibration error.
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
    swaps = _Swaps(keep, w0, h, n, m, refit=refit)
    gradient = (w - w0) @ h
    error = ((w - w0) * gradient).sum(1)
    active = torch.arange(rows, device=w.device)
    made = 0
    chunk = max(1, CANDIDATES // max(1, cols * (m - n)))
    for _ in range(limit):
        found = [swaps.best(w, gradient, active[s : s + chunk]) for s in range(0, len(active), chunk)]
        value, group, i, j = (torch.cat(t) for t in zip(*found))
        better = value < -1e-6 * error[active].abs().clamp_min(torch.finfo(w.dtype).tiny)
        if not bool(better.any()):
            break
        r, group, i, j = active[better], group[better], i[better], j[better]
        p, q = swaps.kept[r, group, i], swaps.pruned[r, group, j]
        u_p = -w[r, p]
        u_q = -(gradient[r, q] + u_p * h[p, q]) / h[q, q] if refit else w0[r, q]
        w[r, p], w[r, q] = 0.0, u_q
        keep[r, p], keep[r, q] = False, True
        gradient[r] += u_p[:, None] * h[p] + u_q[:, None] * h[q]
        error[r] += value[better]
        swaps.made(r, group, i, j)
        made += len(r)
        active = r
    return made


class _Swaps:
    """The candidate swaps of every row: the columns kept ``[rows, groups, n]`` and pruned ``[rows,
    groups, m - n]`` in each group, and what scoring them reads of ``H`` (and, for masks only, of the
    dense weights) at those columns, updated where a swap is made instead of gathered every step."""

    def __init__(self, keep: torch.Tensor, w0: torch.Tensor, h: torch.Tensor, n: int, m: int, *, refit: bool) -> None:
        self.h, self.w0, self.n, self.refit = h, w0, n, refit
        self.kept, self.pruned = _positions(keep, n, m)
        self.diag = torch.diagonal(h)
        rows = torch.arange(keep.shape[0], device=keep.device)
        self.h_pp, self.h_qq, self.h_pq, self.w0_q = self._read(self.kept, self.pruned, rows)

    def _read(self, kept: torch.Tensor, pruned: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h_pp, h_qq = self.diag[kept], self.diag[pruned]
        h_pq = self.h[kept[..., :, None], pruned[..., None, :]]
        w0_q = self.w0[rows.reshape(-1, *([1] * (pruned.dim() - 1))), pruned]
        return h_pp, h_qq, h_pq, w0_q

    def best(self, w: torch.Tensor, gradient: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The best swap of each of rows ``r``: the objective's change, its group, and which kept and
        which pruned weight of the group it swaps."""
        kept, pruned = self.kept[r], self.pruned[r]
        rows = r[:, None, None]
        u_p = -w[rows, kept][..., :, None]
        g_p, g_q = gradient[rows, kept][..., :, None], gradient[rows, pruned][..., None, :]
        h_pp, h_qq, h_pq = self.h_pp[r][..., :, None], self.h_qq[r][..., None, :], self.h_pq[r]
        if self.refit:
            c = g_q + u_p * h_pq
            change = 2 * u_p * g_p + u_p.square() * h_pp - c.square() / h_qq
        else:
            u_q = self.w0_q[r][..., None, :]
            change = 2 * (u_p * g_p + u_q * g_q) + u_p.square() * h_pp + 2 * u_p * u_q * h_pq + u_q.square() * h_qq
        value, index = change.reshape(len(r), -1).min(1)
        per_group = self.n * pruned.shape[-1]
        return value, index // per_group, index % per_group // pruned.shape[-1], index % pruned.shape[-1]

    def made(self, r: torch.Tensor, group: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> None:
        """Record the swaps made in rows ``r``: their kept and pruned columns trade places."""
        p, q = self.kept[r, group, i], self.pruned[r, group, j]
        self.kept[r, group, i], self.pruned[r, group, j] = q, p
        h_pp, h_qq, h_pq, w0_q = self._read(self.kept[r, group], self.pruned[r, group], r)
        self.h_pp[r, group], self.h_qq[r, group], self.h_pq[r, group], self.w0_q[r, group] = h_pp, h_qq, h_pq, w0_q


def _positions(keep: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns kept ``[rows, groups, n]`` and pruned ``[rows, groups, m - n]`` in each group of
    ``m`` consecutive columns."""
    rows, cols = keep.shape
    order = keep.reshape(rows, cols // m, m).to(torch.int8).argsort(dim=-1, descending=True, stable=True)
    order += torch.arange(0, cols, m, device=keep.device)[:, None]
    return order[..., :n].contiguous(), order[..., n:].contiguous()


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
