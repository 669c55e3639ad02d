"""N:M mask refinement: never raises a layer's calibration error, keeps the pattern, gains held out."""

from __future__ import annotations

from itertools import product

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune.algorithms.nm import CONV, LINEAR, NMPattern, nm_mask, satisfies
from graphprune.algorithms.refine import refine_layer, refine_matrix
from graphprune.algorithms.sparsegpt import prune_matrix
from graphprune.frontends.torch.masks import masked_weights
from graphprune.passes import NMSparsity
from tests.architectures import calibrated_mlp


def _inputs(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    """Correlated inputs: a few shared directions plus noise, with channels of unequal scale."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(rank, cols, generator=g) * torch.logspace(0, 1, cols)
    return torch.randn(rows, rank, generator=g) @ mix + 0.3 * torch.randn(rows, cols, generator=g)


def _quadratic(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> float:
    """The calibration error refinement measures: the sum over rows of ``(w - w0) H (w - w0)^T``."""
    delta = weight.double() - dense.double()
    return float(((delta @ hessian.double()) * delta).sum())


def _error(weight: torch.Tensor, dense: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x.double() @ (weight.double() - dense.double()).T) ** 2).sum())


@settings(max_examples=25, deadline=None)
@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (2, 8)]),
    rows=st.integers(1, 12),
    groups=st.integers(1, 6),
    rank=st.integers(1, 24),
    samples=st.integers(2, 64),
    refit=st.booleans(),
    start=st.sampled_from(["magnitude", "sparsegpt"]),
    seed=st.integers(0, 2**16),
)
def test_refinement_never_raises_the_error_and_keeps_the_pattern(nm, rows, groups, rank, samples, refit, start, seed):
    n, m = nm
    cols = groups * m
    x = _inputs(samples, cols, rank, seed)
    hessian = 2 * x.T @ x / samples
    dense = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    pattern = NMPattern(n, m, LINEAR)
    if start == "sparsegpt":
        weight, keep, _ = prune_matrix(dense, hessian, pattern, block=m)
    else:
        keep = nm_mask(dense.abs(), pattern)
        weight = dense * keep
    new, mask, done = refine_matrix(dense, weight, keep, hessian, m, refit=refit)
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()
    assert satisfies(new, pattern) and not new[~mask].any()
    if not refit and start == "magnitude":  # masks only: every kept weight is its dense value
        assert torch.equal(new[mask], dense[mask])
    after, before = _quadratic(new, dense, hessian), _quadratic(weight, dense, hessian)
    assert after <= before
    assert (done.after, done.before) == (pytest.approx(after, rel=1e-9), pytest.approx(before, rel=1e-9))


def test_a_refined_mask_is_the_best_single_swap_when_one_swap_is_allowed():
    """One group of 4 with 2 kept: the refined mask (masks only) is the best of all six masks
    whenever the best differs from the start by one swap (enumerated by hand)."""
    x = _inputs(256, 4, 2, 0)
    hessian = 2 * x.T @ x / 256
    checked = 0
    for seed in range(20):
        dense = torch.randn(1, 4, generator=torch.Generator().manual_seed(seed))
        keep = nm_mask(dense.abs(), NMPattern(2, 4, LINEAR))
        masks = [
            torch.tensor([[i in pair for i in range(4)]]) for pair in product(range(4), range(4)) if pair[0] < pair[1]
        ]
        errors = {tuple(k[0].tolist()): _error(dense * k, dense, x) for k in masks}
        best = min(errors, key=errors.get)
        _, mask, _ = refine_matrix(dense, dense * keep, keep, hessian, 4, refit=False)
        if sum(a != b for a, b in zip(best, keep[0].tolist())) == 2:
            assert tuple(mask[0].tolist()) == best, seed
            checked += 1
    assert checked >= 3  # the property was exercised, not skipped by every seed


def test_refinement_gains_on_held_out_inputs_with_enough_samples():
    samples = _inputs(4096, 128, 16, 0)
    x, held = samples[:2048], samples[2048:]  # one distribution, two disjoint samples
    hessian = 2 * x.T @ x / len(x)
    dense = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    pattern = NMPattern(2, 4, LINEAR)
    for refit in (False, True):
        if refit:
            weight, keep, _ = prune_matrix(dense, hessian, pattern)
        else:
            keep = nm_mask(dense.abs() * x.pow(2).mean(0).sqrt(), pattern)  # Wanda
            weight = dense * keep
        new, _, _ = refine_matrix(dense, weight, keep, hessian, 4, refit=refit)
        assert _error(new, dense, held) < 0.5 * _error(weight, dense, held), refit


def test_conv_groups_are_refined_each_on_its_own_hessian():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 8, 3, 3, generator=g)  # 2 groups of 4 filters, 8 channels each
    pattern = NMPattern(2, 4, CONV)
    keep = nm_mask(conv.abs(), pattern)
    hessians = []
    for group in range(2):
        x = _inputs(512, 72, 6, group)
        hessians.append(2 * x.T @ x / 512)
    new, mask, done = refine_layer(conv, conv * keep, keep, CONV, hessians, pattern, refit=False)
    assert satisfies(new, pattern) and done.after < done.before
    for group, rows in enumerate((slice(0, 4), slice(4, 8))):  # each group alone gives the same result
        alone, _, _ = refine_layer(
            conv[rows], (conv * keep)[rows], keep[rows], CONV, [hessians[group]], pattern, refit=False
        )
        assert torch.equal(alone, new[rows])


def _mlp() -> tuple[nn.Module, list[tuple[torch.Tensor]]]:
    return calibrated_mlp((64, 64))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_refine_lowers_the_output_error_of_every_method(method):
    model, data = _mlp()
    errors, results = {}, {}
    for refine in (False, True):
        passes = [NMSparsity(2, 4, method=method, dense_heads=False, refine=refine)]
        results[refine] = gp.prune(model, data[0], passes=passes, calibration=data)
        errors[refine] = results[refine].report.rows[0].output_error
    assert errors[True] < 0.9 * errors[False], errors
    masked = masked_weights(results[True].module)
    assert len(masked) == 3 and all(satisfies(t, p) for t, p in masked.values())
    assert "calibration error -" in results[True].report.rows[0].details["refinement"]


def test_learned_masks_start_from_the_refined_prior_over_dense_weights():
    model, data = _mlp()
    result = gp.prune(
        model,
        data[0],
        passes=[NMSparsity(method="learned", prior="wanda", refine=True, dense_heads=False)],
        calibration=data,
    )
    plain = gp.prune(
        model, data[0], passes=[NMSparsity(method="wanda", refine=True, dense_heads=False)], calibration=data
    )
    for name, (weight, _) in masked_weights(plain.module).items():
        module = result.module.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(module.parametrizations.weight.original, model.get_submodule(name.rsplit(".", 1)[0]).weight)
        assert torch.equal(module.weight != 0, weight != 0)


def test_refine_needs_calibration_and_a_bool():
    model, data = _mlp()
    with pytest.raises(gp.InputError, match="needs calibration data"):
        gp.prune(model, data[0], passes=[NMSparsity(refine=True)])
    with pytest.raises(gp.InputError, match="refine must be True or False"):
        NMSparsity(refine="yes")


@pytest.mark.slow
def test_refined_sparsegpt_on_an_onnx_graph_matches_the_torch_path(tmp_path):
    """Refinement is written once: on an ONNX graph, with Hessians from inputs read in onnxruntime,
    it makes the torch path's choices (in float64, as the plain SparseGPT comparison does)."""
    import contextlib
    import io
    import warnings

    import numpy as np
    import onnxruntime as ort

    from tests.oracles import outputs

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 8, 1)
    ).eval()
    x = torch.randn(4, 4, 20) @ torch.randn(20, 20)
    path = str(tmp_path / "conv1d.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=True)
    passes = lambda: [NMSparsity(2, 4, method="sparsegpt", refine=True, dense_heads=False, precision="float64")]  # noqa: E731
    result = gp.prune_onnx(path, passes=passes(), calibration=[{"input": x.numpy()}])
    torch_result = gp.prune(model, (x,), passes=passes(), calibration=[(x,)])
    assert "calibration error -" in result.report.rows[0].details["refinement"]
    got = ort.InferenceSession(result.save(tmp_path / "sparse.onnx").path, providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()}
    )[0]
    want = outputs(torch_result.module, (x,))[0].numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_learned_masks_over_sparsegpt_weights_start_as_sparsegpt():
    """``learned_weights="prior"``: the module computes SparseGPT's result at the start, with the dense
    weights kept under the pruned entries for the masks to revive."""
    model, data = _mlp()
    learned = gp.prune(
        model,
        data[0],
        passes=[NMSparsity(method="learned", prior="sparsegpt", learned_weights="prior", dense_heads=False)],
        calibration=data,
    ).module
    oneshot = gp.prune(model, data[0], passes=[NMSparsity(method="sparsegpt", dense_heads=False)], calibration=data)
    with torch.no_grad():
        assert torch.allclose(learned(data[1][0]), oneshot.module(data[1][0]), atol=1e-6)
    under = learned[0].parametrizations.weight.original
    assert torch.equal(under[learned[0].weight == 0], model[0].weight[learned[0].weight == 0])
    with pytest.raises(gp.InputError, match="needs method='learned' and prior='sparsegpt'"):
        NMSparsity(method="learned", prior="wanda", learned_weights="prior")
    with pytest.raises(gp.InputError, match="'dense' or 'prior'"):
        NMSparsity(method="learned", learned_weights="sparse")
