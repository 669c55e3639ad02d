"""Low-rank compensation of a compressed layer's error in the eigenspace of its inputs (EoRA, Liu et
al. 2024): tensors in, tensors out.

A layer whose weight went from ``W0`` to ``W`` (masks, pruning updates, quantization) makes the output
error ``(W0 - W) x``; over calibration inputs with Hessian ``H = Q diag(l) Q^T`` its size is
``||(W0 - W) Q diag(l)^(1/2)||_F^2``.  The best rank-``r`` path ``up @ down`` for that error is the
truncated SVD of the error projected into that space and mapped back: ``up = U_r S_r``,
``down = V_r^T diag(l)^(-1/2) Q^T``, and component ``i`` removes exactly ``S_i^2`` of it (plain SVD
of ``W0 - W`` is the same with ``H = I``, which ignores which input directions carry energy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RELATIVE_FLOOR = 1e-10  # eigenvalues below this share of the largest are inputs that never vary


@dataclass(frozen=True)
class Spectrum:
    """The projected error of one layer, factored: ``error = left @ diag(values) @ right`` with the
    error's energy per component ``values**2`` (largest first)."""

    left: torch.Tensor  # [out, k]
    values: torch.Tensor  # [k]
    right: torch.Tensor  # [k, in]: already mapped back out of the eigenspace

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down [rank, in], up [out, rank])``: the path ``x -> up @ (down @ x)``."""
        return self.right[:rank], self.left[:, :rank] * self.values[:rank]

    def remaining(self, rank: int) -> float:
        """The calibration error left after a path of ``rank`` components."""
        return float(self.values[rank:].square().sum())


def spectrum(error: torch.Tensor, hessian: torch.Tensor) -> Spectrum:
    """The EoRA factorisation of ``error [out, in]`` (dense minus compressed weight, matrix layout)
    against ``hessian [in, in]``, in float64 on the error's device."""
    e = error.detach().double()
    h = hessian.detach().double().to(e.device)
    eigenvalues, eigenvectors = torch.linalg.eigh((h + h.T) / 2)
    live = eigenvalues > RELATIVE_FLOOR * eigenvalues.max().clamp_min(0)
    eigenvalues, eigenvectors = eigenvalues[live], eigenvectors[:, live]
    root = eigenvalues.sqrt()
    u, s, vh = torch.linalg.svd(e @ eigenvectors * root, full_matrices=False)
    return Spectrum(left=u, values=s, right=(vh / root) @ eigenvectors.T)


def allocate(spectra: dict[str, Spectrum], costs: dict[str, int], budget: int) -> dict[str, int]:
    """Ranks per layer for at most ``budget`` added parameters: components taken in order of the error
    they remove per parameter they add (``costs[name]``: one component's parameters, in + out)."""
    gains = [
        (float(value.square()) / costs[name], name) for name, s in spectra.items() for value in s.values if value > 0
    ]
    ranks = dict.fromkeys(spectra, 0)
    spent = 0
    for _, name in sorted(gains, key=lambda g: -g[0]):  # within a layer, larger components come first
        if spent + costs[name] <= budget:
            ranks[name] += 1
            spent += costs[name]
    return ranks
