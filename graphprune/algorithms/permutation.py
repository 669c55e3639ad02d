"""Channel permutations for N:M sparsity (after Pool & Yu, NeurIPS 2021).

Which ``m`` input channels share a group decides what an N:M mask can keep.  Permuting a channel
space consistently through everything that indexes it (producers' rows, norms, biases, every
consumer's columns) leaves the model's function unchanged, so a permutation that puts strong and
weak channels together retains more weight magnitude under the pattern.

The search starts from the better of the identity and a round-robin deal of channels sorted by
column norm, then improves by exchanging channels between random disjoint pairs of groups (all
``m x m`` exchanges of a pair evaluated at once), accepting only gains, for a fixed number of
sweeps (reproducible) with a time cap as a safety net.
"""

from __future__ import annotations

import time

import torch


def retained(scores: torch.Tensor, order: torch.Tensor, n: int, m: int) -> float:
    """Sum over rows and groups of the ``n`` largest scores of each group of ``m`` permuted columns."""
    rows, width = scores.shape
    return float(scores[:, order].reshape(rows, width // m, m).topk(n, dim=-1).values.sum())


def search(
    scores: torch.Tensor, n: int, m: int, *, sweeps: int = 4, seconds: float = 30.0, seed: int = 0, max_rows: int = 1024
) -> torch.Tensor:
    """A column order of ``scores [rows, width]`` that retains at least as much as the identity.

    Exchanges are judged on at most ``max_rows`` sampled rows (the objective is a sum over rows);
    the result is compared with the identity on all rows, so it never retains less.
    """
    full = scores.float()
    gen = torch.Generator().manual_seed(seed)
    scores = full if full.shape[0] <= max_rows else full[torch.randperm(full.shape[0], generator=gen)[:max_rows]]
    width = scores.shape[1]
    groups = width // m
    identity = torch.arange(width)
    strongest = torch.argsort(scores.pow(2).sum(0), descending=True)
    dealt = strongest.reshape(m, groups).t().reshape(-1) if groups > 1 else identity
    order = max((identity, dealt), key=lambda o: retained(scores, o, n, m))
    if groups < 2:
        return order
    budget = time.perf_counter() + seconds
    chunk = max(1, 2**25 // max(1, scores.shape[0] * m**3))
    swaps = torch.cartesian_prod(torch.arange(m), torch.arange(m))  # (i in group a, j in group b)
    for _ in range(sweeps):
        pairs = torch.randperm(groups, generator=gen)[: groups - groups % 2].reshape(-1, 2)
        improved = False
        table = order.reshape(groups, m)
        for start in range(0, len(pairs), chunk):
            a, b = pairs[start : start + chunk, 0], pairs[start : start + chunk, 1]
            gain, best = _best_exchanges(scores, table[a], table[b], swaps, n)
            for k in torch.nonzero(gain > 1e-9).flatten().tolist():
                i, j = swaps[best[k]].tolist()
                table[a[k], i], table[b[k], j] = table[b[k], j].clone(), table[a[k], i].clone()
                improved = True
            if time.perf_counter() > budget:
                break
        order = table.reshape(-1)
        if not improved:
            break
    identity_kept = retained(full, identity, n, m)
    return order if retained(full, order, n, m) >= identity_kept else identity


def _best_exchanges(
    scores: torch.Tensor, cols_a: torch.Tensor, cols_b: torch.Tensor, swaps: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair of groups, the gain of the best single exchange and its index in ``swaps``."""
    wa, wb = scores[:, cols_a], scores[:, cols_b]  # [rows, pairs, m]
    base = wa.topk(n, dim=-1).values.sum((0, -1)) + wb.topk(n, dim=-1).values.sum((0, -1))
    i, j = swaps[:, 0], swaps[:, 1]
    new_a = wa[:, :, None, :].expand(-1, -1, len(swaps), -1).clone()  # [rows, pairs, swaps, m]
    new_b = wb[:, :, None, :].expand(-1, -1, len(swaps), -1).clone()
    s = torch.arange(len(swaps))
    new_a[:, :, s, i] = wb[:, :, j]
    new_b[:, :, s, j] = wa[:, :, i]
    total = new_a.topk(n, dim=-1).values.sum(-1).sum(0) + new_b.topk(n, dim=-1).values.sum(-1).sum(0)
    gain = total - base[:, None]
    best = gain.argmax(-1)
    return gain.gather(1, best[:, None]).squeeze(1), best
