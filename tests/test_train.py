"""N:M sparse training recipes: gradients against their definitions, masks that follow the weights,
schedules, and a final model whose patterns hold."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.passes import NMSparsity
from graphprune.sparsity import NMMask, masked_weights, satisfies
from graphprune.train import SparseTraining, TrainingMask


def _masked(n: int = 2, m: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    return gp.prune(model, (torch.randn(2, 8),), passes=[NMSparsity(n, m, dense_heads=False)]).module


def test_sr_ste_gradient_is_dense_plus_decay_on_pruned_weights():
    model = _masked()
    trainer = SparseTraining(model, recipe="sr-ste", decay=0.5)
    layer = model[0]
    mask = layer.parametrizations.weight[0].mask.clone()
    x = torch.randn(5, 8)
    layer(x).sum().backward()
    original = layer.parametrizations.weight.original
    dense_grad = torch.ones(5, 8).T @ x  # d sum(x W^T) / dW, for every entry, kept or pruned
    assert torch.allclose(original.grad, dense_grad + 0.5 * (1 - mask) * original.detach())
    assert trainer.recipe == "sr-ste"


def test_masks_follow_the_weights_and_finalize_restores_plain_masks():
    model = _masked()
    trainer = SparseTraining(model, recipe="sr-ste")
    layer = model[0]
    with torch.no_grad():  # make a pruned entry the largest of its group
        mask = layer.parametrizations.weight[0].mask
        row, col = (mask == 0).nonzero()[0].tolist()
        layer.parametrizations.weight.original[row, col] = 100.0
    trainer.step()
    assert layer.parametrizations.weight[0].mask[row, col] == 1
    final = trainer.finalize()
    masks = masked_weights(final)
    assert set(masks) == {"0.weight", "2.weight"} and all(satisfies(t, p) for t, p in masks.values())
    assert all(isinstance(p, NMMask) for p in layer.parametrizations.weight)
    assert layer.weight[row, col] == 100.0


def test_dense_to_sparse_schedule_and_mask_decay():
    model = _masked(3, 4)
    trainer = SparseTraining(model, recipe="mask-decay", decay_steps=4, schedule=[(0, 3), (2, 2), (4, 1)])
    layer = model[0]
    counts = []
    for _ in range(5):
        trainer.step()
        mask = layer.parametrizations.weight[0]
        counts.append((int(mask.mask.reshape(-1, 4).sum(1).max()), mask.beta))
    assert [c for c, _ in counts] == [3, 2, 2, 1, 1] and counts[-1][1] == 0.0
    x = torch.randn(3, 8)
    with torch.no_grad():  # beta reached 0: the layer computes with the hard mask
        assert torch.allclose(layer(x), x @ (layer.parametrizations.weight.original * mask.mask).T + layer.bias)
    final = trainer.finalize()
    assert str(masked_weights(final)["0.weight"][1]) == "1:4"


def test_fixed_recipe_keeps_masks_and_bad_options_are_refused():
    model = _masked()
    before = model[0].parametrizations.weight[0].mask.clone()
    trainer = SparseTraining(model, recipe="fixed")
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(-3)
    trainer.step()
    assert torch.equal(model[0].parametrizations.weight[0].mask, before)
    assert isinstance(model[0].parametrizations.weight[0], TrainingMask)
    with pytest.raises(gp.InputError, match="recipe must be one of"):
        SparseTraining(_masked(), recipe="magic")
    with pytest.raises(gp.InputError, match="no N:M masks"):
        SparseTraining(nn.Linear(4, 4))
    with pytest.raises(gp.InputError, match="ascending steps and 0 < n < 4"):
        SparseTraining(_masked(), schedule=[(10, 2), (5, 1)])
