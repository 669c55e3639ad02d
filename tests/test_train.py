"""N:M sparse training recipes: gradients against their definitions, masks that follow the weights,
schedules, and a final model whose patterns hold."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.algorithms.nm import nm_mask, satisfies
from graphprune.frontends.torch.masks import NMMask, masked_weights
from graphprune.passes import NMSparsity
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


def test_learned_masks_start_at_the_prior_learn_only_logits_and_finalize_to_valid_masks():
    from graphprune.train import LearnedMasks, candidate_masks

    assert candidate_masks(2, 4).shape == (6, 4) and bool((candidate_masks(2, 4).sum(1) == 2).all())
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(16, 8)
    sparse = gp.prune(dense, (x,), passes=[NMSparsity(2, 4, method="learned", dense_heads=False)]).module
    layer = sparse[0]
    prior = layer.parametrizations.weight[0].mask.clone()
    assert torch.equal(layer.parametrizations.weight.original, dense[0].weight)  # dense weights kept under the mask
    trainer = LearnedMasks(sparse, steps=50)
    learnable = layer.parametrizations.weight[0]
    assert torch.equal(learnable.hard(), prior)  # the prior's candidate is the most likely one
    sparse.eval()
    one_shot = gp.finalize(gp.prune(dense, (x,), passes=[NMSparsity(2, 4, dense_heads=False)]).module)
    assert torch.allclose(sparse(x), one_shot(x), atol=1e-6)  # eval mode uses the hard (prior) masks
    target = dense(x).detach()
    with torch.no_grad():
        prior_loss = float((sparse(x) - target).pow(2).mean())
    sparse.train()
    optimizer = torch.optim.Adam(trainer.parameters(), lr=0.1)
    for _ in range(50):  # learn masks that reproduce the dense outputs better than the prior
        loss = (sparse(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.step()
    assert layer.parametrizations.weight.original.grad is None  # weights never learn
    assert learnable.temperature == pytest.approx(0.05)
    final = trainer.finalize().eval()
    with torch.no_grad():
        assert float((final(x) - target).pow(2).mean()) < prior_loss  # the learned masks fit better
    masks = masked_weights(final)
    assert set(masks) == {"0.weight", "2.weight"} and all(satisfies(t, p) for t, p in masks.values())
    assert final[0].parametrizations.weight.original.requires_grad
    with pytest.raises(gp.InputError, match="prior must be one of"):
        NMSparsity(2, 4, method="learned", prior="random")


def test_learned_mask_logits_transfer_to_another_copy():
    from graphprune.train import LearnedMasks

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = (torch.randn(4, 8),)
    first = LearnedMasks(
        gp.prune(dense, x, passes=[NMSparsity(2, 4, method="learned", dense_heads=False)]).module, steps=10
    )
    with torch.no_grad():  # pretend training moved the logits
        for logits in first.parameters():
            logits.copy_(torch.randn_like(logits))
    saved = first.logits()
    second_model = gp.prune(dense, x, passes=[NMSparsity(2, 4, method="learned", dense_heads=False)]).module
    second = LearnedMasks(second_model, steps=10)
    second.load_logits(saved)
    for (_, _, a), (_, _, b) in zip(first.masks, second.masks, strict=True):
        assert torch.equal(a.hard(), b.hard())
    with pytest.raises(gp.InputError, match="no saved logits for"):
        second.load_logits({})
    other = LearnedMasks(
        gp.prune(
            nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(),
            x,
            passes=[NMSparsity(2, 4, method="learned", dense_heads=False)],
        ).module,
        steps=10,
    )
    with pytest.raises(gp.InputError, match="not the same architecture or pattern"):
        other.load_logits(saved)


def _learnable(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(32, 16)
    return gp.prune(dense, (x,), passes=[NMSparsity(2, 4, method="learned", dense_heads=False)]).module, x


def test_weight_regularization_alone_drives_masks_to_keep_the_largest_weights():
    from graphprune.train import LearnedMasks

    sparse, _ = _learnable()
    trainer = LearnedMasks(sparse, steps=200, weight_regularization=1.0)
    with torch.no_grad():  # start far from magnitude: random logits
        for p in trainer.parameters():
            p.copy_(torch.randn_like(p))
    off = LearnedMasks(_learnable()[0], steps=10).regularization()  # the option off gives a constant 0
    assert float(off) == 0.0 and not off.requires_grad
    optimizer = torch.optim.Adam(trainer.parameters(), lr=0.2)
    for _ in range(200):
        loss = trainer.regularization()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.step()
    for module, name, mask in trainer.masks:
        weight = module.parametrizations[name].original
        assert weight.grad is None
        assert torch.equal(mask.hard(), nm_mask(weight.detach().abs(), mask.pattern))
    # at the end the expected masks are hard, and the value is -(share of squared magnitude kept)
    shares = [
        (module.parametrizations[name].original.detach().pow(2) * mask.hard()).sum()
        / module.parametrizations[name].original.detach().pow(2).sum()
        for module, name, mask in trainer.masks
    ]
    assert trainer.regularization().item() == pytest.approx(-float(sum(shares)) / len(shares), rel=1e-3)
    with pytest.raises(gp.InputError, match="weight_regularization"):
        LearnedMasks(_learnable()[0], steps=10, weight_regularization=-1.0)


def test_finalize_keeps_the_masks_of_the_best_observed_score():
    from graphprune.train import LearnedMasks

    sparse, x = _learnable(1)
    trainer = LearnedMasks(sparse, steps=20)
    optimizer = torch.optim.Adam(trainer.parameters(), lr=0.5)
    sparse.train()
    snapshots = []
    for step, score in enumerate([0.2, 0.9, 0.4, 0.3]):
        for _ in range(5):  # the masks move between observations
            sparse(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            trainer.step()
        snapshots.append({n: m.hard().clone() for n, (_, _, m) in zip(trainer.names, trainer.masks)})
        assert trainer.observe(score) == (score == 0.9 or step == 0)
    assert any(not torch.equal(snapshots[1][n], snapshots[3][n]) for n in trainer.names)  # they did move
    final = trainer.finalize()
    assert all(satisfies(t, p) for t, p in masked_weights(final).values())
    assert all(
        torch.equal(final.get_submodule(n.rsplit(".", 1)[0]).parametrizations.weight[0].mask, snapshots[1][n])
        for n in trainer.names
    )
    with pytest.raises(gp.InputError, match="NaN"):
        LearnedMasks(_learnable()[0], steps=10).observe(float("nan"))
    with pytest.raises(gp.InputError, match="needs steps=: the number of optimizer steps your loop will make"):
        LearnedMasks(_learnable()[0])


def test_finalize_before_the_schedule_ends_says_so():
    from graphprune.train import LearnedMasks

    sparse, _ = _learnable()
    trainer = LearnedMasks(sparse, steps=50)
    for _ in range(3):
        trainer.step()
    with pytest.warns(UserWarning, match=r"finalize\(\) after 3 of the 50 steps .* temperature 3\.08"):
        trainer.finalize()
    done = LearnedMasks(_learnable()[0], steps=2)
    done.step()
    done.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the schedule's end: nothing to say
        done.finalize()
