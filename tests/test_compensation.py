"""Compensation after structured pruning (issue 9, first part): BatchNorm re-estimation, fluctuation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import transformers as T

import graphprune as gp
from graphprune.frontends.torch.compensation import reestimate_batchnorm
from graphprune.passes import ChannelPrune
from samples import resnet


def _by_hand(model: nn.Module, batches: list) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Average over batches of each BatchNorm input's per-channel mean and unbiased variance, with
    every BatchNorm normalising by its batch statistics (as during re-estimation)."""
    model = copy.deepcopy(model).eval()
    seen: dict[str, list] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            hooks.append(
                m.register_forward_pre_hook(
                    lambda mod, args, name=name: seen.setdefault(name, []).append(
                        (args[0].mean((0, 2, 3)), args[0].transpose(0, 1).flatten(1).var(1))
                    )
                )
            )
    with torch.no_grad():
        for (x,) in batches:
            model(x)
    return {
        name: (torch.stack([m for m, _ in v]).mean(0), torch.stack([v_ for _, v_ in v]).mean(0))
        for name, v in seen.items()
    }


def test_batchnorm_reestimation_matches_statistics_computed_by_hand():
    model, _ = resnet.build()
    batches = [(torch.randn(6, 3, 32, 32),) for _ in range(3)]
    want = _by_hand(model, batches)
    count = reestimate_batchnorm(model, batches)
    assert count == len(want) and not any(m.training for m in model.modules())
    for name, (mean, var) in want.items():
        bn = model.get_submodule(name)
        assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, atol=1e-4)
        assert bn.momentum == 0.1


@pytest.mark.slow
def test_channel_prune_reestimates_batchnorm_on_request():
    model, x = resnet.build()
    batches = [(torch.randn(6, 3, 32, 32),) for _ in range(2)]
    plain = gp.prune(model, x, passes=[ChannelPrune(0.5)]).module
    compensated = gp.prune(model, x, passes=[ChannelPrune(0.5, compensate="batchnorm")], calibration=batches).module
    assert torch.equal(plain.layers[0].conv1.weight, compensated.layers[0].conv1.weight)
    want = _by_hand(plain, batches)
    bn = compensated.layers[3].bn2
    assert torch.allclose(bn.running_mean, want["layers.3.bn2"][0], atol=1e-5)


def test_fluctuation_removes_channels_that_do_not_vary():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[:8] = 0.0  # channels 0..7 are their bias: constant on any data
        model[0].bias[:8] = 1.0
    batches = [(torch.randn(32, 8),) for _ in range(2)]
    result = gp.prune(model, batches[0], passes=[ChannelPrune(0.5, importance="fluctuation")], calibration=batches)
    assert bool((result.module[0].weight.abs().sum(1) > 0).all()), "a constant channel was kept"


def test_compensation_arguments():
    with pytest.raises(gp.InputError, match="compensate must be one of"):
        ChannelPrune(0.5, compensate="magic")
    model, x = resnet.build()
    with pytest.raises(gp.InputError, match="needs calibration data"):
        gp.prune(model, x, passes=[ChannelPrune(0.5, compensate="batchnorm")])


@pytest.mark.parametrize("act", [nn.Identity, nn.ReLU])
def test_bias_compensation_is_exact_when_removed_channels_are_constant(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[:8] = 0.0  # channels 0..7 are constant (their bias) on any data,
        model[0].bias[:8] = torch.rand(8) + 0.5  # positive so that ReLU passes them unchanged
        model[0].weight[8:] *= 10  # and the weakest by fluctuation
    batches = [(torch.randn(32, 8),) for _ in range(2)]
    x = (torch.randn(5, 8),)
    plain = gp.prune(model, x, passes=[ChannelPrune(0.5, importance="fluctuation")], calibration=batches)
    fixed = gp.prune(
        model, x, passes=[ChannelPrune(0.5, importance="fluctuation", compensate="bias")], calibration=batches
    )
    assert fixed.report.rows[0].details["bias compensation"] == "1 layers"
    dense = model(*x)
    assert not torch.allclose(plain.module(*x), dense, atol=1e-3)
    assert torch.allclose(fixed.module(*x), dense, atol=1e-5)


class _HuggingFaceStyleRMSNorm(nn.Module):
    """The Hugging Face RMSNorm convention (LlamaRMSNorm & co.): ``weight`` and ``variance_epsilon``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(size) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


@pytest.mark.parametrize(
    "norm", [lambda: nn.RMSNorm(16, eps=1e-6), lambda: _HuggingFaceStyleRMSNorm(16)], ids=["torch", "hf"]
)
def test_norm_refit_is_exact_for_an_rmsnorm_that_loses_channels_which_were_zero(norm):
    """Over k of d channels the RMS of a token whose other channels are zero is sqrt(d/k) times
    larger, for every token: one scale per channel undoes it exactly; without it outputs shrink."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), norm(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[8:] = 0.0  # channels 8..15 are zero on any data, and they are the ones removed
        model[0].bias[8:] = 0.0
    batches = [(torch.randn(32, 8),) for _ in range(2)]
    x = (torch.randn(5, 8),)
    plain = gp.prune(model, x, passes=[ChannelPrune(0.5, importance=_keep_first_half)], calibration=batches)
    fixed = gp.prune(
        model, x, passes=[ChannelPrune(0.5, importance=_keep_first_half, compensate="bias")], calibration=batches
    )
    assert fixed.module[1].weight.shape == (8,)
    details = fixed.report.rows[0].details
    assert details["norm re-fit"].startswith("1 norms") and float(details["norm re-fit"].split("-> ")[1]) < 1e-9
    dense = model(*x)
    assert not torch.allclose(plain.module(*x), dense, atol=1e-3)
    assert torch.allclose(fixed.module(*x), dense, atol=1e-5)


def test_norm_refit_never_increases_the_calibration_error_of_a_layernorm():
    from graphprune.frontends.torch.apply import apply_plan
    from graphprune.frontends.torch.compensation import record_norms, refit_norms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.LayerNorm(24), nn.GELU(), nn.Linear(24, 4)).eval()
    batches = [(torch.randn(64, 8) * 3 + 1,) for _ in range(2)]
    result = gp.prune(model, batches[0], passes=[ChannelPrune(0.5, compensate="bias")], calibration=batches)
    assert "norm re-fit" in result.report.rows[0].details
    # the same steps by hand, checking the error the re-fit reports against a direct measurement
    analysis = gp.analyze(model, batches[0])
    plan = ChannelPrune(0.5).plan(analysis, model, None)
    records = record_norms(analysis, model, plan, batches)
    pruned = apply_plan(model, analysis, plan).module
    keep = records["1"].keep

    def error(norm: nn.Module) -> float:
        with torch.no_grad():
            dense_out = [model[1](model[0](x))[..., keep] for (x,) in batches]
            pruned_out = [norm(model[0](x)[..., keep]) for (x,) in batches]
        return sum(float((p - d).pow(2).sum()) for p, d in zip(pruned_out, dense_out)) / sum(
            float(d.pow(2).sum()) for d in dense_out
        )

    before = error(pruned[1])
    errors = refit_norms(pruned, records)
    after = error(pruned[1])
    assert errors["1"][0] == pytest.approx(before, rel=1e-6) and errors["1"][1] == pytest.approx(after, rel=1e-5)
    assert after < before


def test_bias_compensation_on_convs_and_layers_without_bias():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1)
    ).eval()
    with torch.no_grad():
        model[0].weight[:4] = 0.0
        model[0].bias[:4] = 1.0  # constant channels feeding a bias-free conv: nothing to fold into
    batches = [(torch.randn(4, 3, 6, 6),)]
    result = gp.prune(model, batches[0], passes=[ChannelPrune(0.5, compensate="bias+batchnorm")], calibration=batches)
    assert "without a bias left as they are" in result.report.rows[0].details["bias compensation"]


def _keep_first_half(analysis, group, model):
    """Importance that keeps channels 0..n/2-1 of every group."""
    return torch.cat([torch.ones(group.size // 2), torch.zeros(group.size - group.size // 2)]).double()


def test_reconstruction_is_exact_when_removed_channels_are_combinations_of_kept_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Identity(), nn.Linear(16, 4)).eval()
    with torch.no_grad():  # hidden channels 8..15 are 2 x channels 0..7: removing them loses nothing
        model[0].weight[8:] = 2 * model[0].weight[:8]
        model[0].bias[8:] = 2 * model[0].bias[:8]
    batches = [(torch.randn(64, 8),) for _ in range(3)]
    _reconstruction_recovers(model, batches, (torch.randn(5, 8),))


def _reconstruction_recovers(model: nn.Module, batches: list, x: tuple) -> gp.PruneResult:
    """Pruning the second half of every group loses accuracy, and reconstruction gets it back."""
    plain = gp.prune(model, x, passes=[ChannelPrune(0.5, importance=_keep_first_half)], calibration=batches)
    fixed = gp.prune(
        model,
        x,
        passes=[ChannelPrune(0.5, importance=_keep_first_half, compensate="reconstruct", damp=1e-9)],
        calibration=batches,
    )
    dense = model(*x)
    assert not torch.allclose(plain.module(*x), dense, atol=1e-2)
    assert torch.allclose(fixed.module(*x), dense, atol=1e-4)
    assert fixed.report.rows[0].details["reconstruction"].startswith("1 layers")
    return fixed


def test_reconstruction_never_increases_calibration_error():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 10),
    ).eval()
    batches = [(torch.randn(16, 3, 6, 6),) for _ in range(4)]

    def calibration_error(module: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((module(x) - model(x)).pow(2).sum()) for (x,) in batches)

    plain = gp.prune(model, batches[0], passes=[ChannelPrune(0.5)], calibration=batches)
    fixed = gp.prune(model, batches[0], passes=[ChannelPrune(0.5, compensate="reconstruct")], calibration=batches)
    assert calibration_error(fixed.module) < calibration_error(plain.module)
    from graphprune.frontends.torch.compensation import (
        reconstruct,
    )  # per layer too: every record is no worse than before

    analysis = gp.analyze(model, batches[0])
    plan = ChannelPrune(0.5).plan(analysis, model, None)
    from graphprune.frontends.torch.apply import apply_plan
    from graphprune.frontends.torch.copying import clone

    pruned = apply_plan(clone(model), analysis, plan).module
    records, skipped, _ = reconstruct(analysis, model, pruned, plan, batches)
    assert records and all(r.error_after <= r.error_before for r in records)
    assert set(skipped) == {"5.weight"}  # the linear has 289 unknowns per output and 48 rows to fit them


def test_reconstruction_of_a_grouped_conv_is_exact_per_group():
    """A grouped conv's outputs read only their group's inputs: each group is its own fit, and
    removed inputs that are multiples of kept ones of the same group lose nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Identity(), nn.Conv2d(16, 8, 3, padding=1, groups=2)).eval()
    with torch.no_grad():  # in each conv group of 8 inputs, inputs 4..7 are 2 x inputs 0..3
        for g in (0, 8):
            model[0].weight[g + 4 : g + 8] = 2 * model[0].weight[g : g + 4]
            model[0].bias[g + 4 : g + 8] = 2 * model[0].bias[g : g + 4]
    batches = [(torch.randn(8, 3, 6, 6),) for _ in range(3)]
    fixed = _reconstruction_recovers(model, batches, (torch.randn(2, 3, 6, 6),))
    assert fixed.module[2].weight.shape == (8, 4, 3, 3) and fixed.module[2].groups == 2


def test_reconstruction_refits_grouped_convs_after_a_depthwise_one_without_increasing_error():
    from graphprune.frontends.torch.apply import apply_plan
    from graphprune.frontends.torch.compensation import reconstruct
    from graphprune.frontends.torch.copying import clone

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    ).eval()
    batches = [(torch.randn(8, 3, 6, 6),) for _ in range(3)]
    analysis = gp.analyze(model, batches[0])
    plan = ChannelPrune(0.5).plan(analysis, model, None)
    pruned = apply_plan(clone(model), analysis, plan).module
    records, skipped, _ = reconstruct(analysis, model, pruned, plan, batches)
    assert not skipped
    # the depthwise conv loses whole groups (inputs with their outputs): its remaining outputs lost
    # nothing and it needs no re-fit; the grouped conv loses inputs inside each group
    assert {r.layer for r in records} == {"4.weight", "6.weight"}
    assert all(r.error_after <= r.error_before for r in records)


def test_reconstruction_refuses_to_fit_more_unknowns_than_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    batches = [(torch.randn(4, 8),) for _ in range(3)]  # 8 rows to fit 33 unknowns per output
    result = gp.prune(model, batches[0], passes=[ChannelPrune(0.5, compensate="reconstruct")], calibration=batches)
    assert "8 calibration rows to fit 33 unknowns" in result.report.rows[0].details["not reconstructed"]
    with pytest.raises(gp.InputError, match="damp must be"):
        ChannelPrune(0.5, damp=2.0)


@pytest.mark.parametrize("name", ["bert", "llama_gqa", "convnext"])
def test_planned_cost_equals_the_pruned_models_cost(name):
    from graphprune.frontends.torch.macs import planned_macs, planned_params
    from tests.architectures import build

    model, inputs = build(name)
    analysis = gp.analyze(model, inputs)
    plan = ChannelPrune(0.4).plan(analysis, model)
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.4)])
    masks = plan.masks(analysis)
    assert planned_macs(analysis, masks) == result.report.macs_after < result.report.macs
    assert planned_params(analysis, masks, model) == result.report.params_after


@pytest.mark.parametrize("kind,target", [("macs", 0.5), ("params", 0.3)])
def test_budgets_are_met_within_a_rounding_step(kind, target):
    model, x = resnet.build()
    result = gp.prune(model, x, passes=[ChannelPrune(**{f"target_{kind}": target})])
    kept = getattr(result.report, f"{kind}_after") / getattr(result.report, kind)
    assert target - 0.02 < kept <= target  # round_to=1: one channel of the widest group is well under 2%
    assert repr(result.report.pipeline) == repr([f"ChannelPrune(target_{kind}={target}, round_to=1)"])


def test_budget_arguments():
    with pytest.raises(gp.InputError, match="one of ratio, target_macs or target_params"):
        ChannelPrune(0.5, target_macs=0.5)
    with pytest.raises(gp.InputError, match="fraction of the dense model to keep"):
        ChannelPrune(target_params=1.5)
    model, x = resnet.build()
    with pytest.raises(gp.InputError, match="target_macs=0.01 cannot be met"):
        gp.prune(model, x, passes=[ChannelPrune(target_macs=0.01)])


class _TwoBranches(nn.Module):
    """Two hidden groups; the second barely reaches the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(8, 32), nn.Linear(32, 4)
        self.b1, self.b2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.a2(torch.relu(self.a1(x))) + 1e-3 * self.b2(torch.relu(self.b1(x)))


def test_sensitivity_allocation_takes_channels_where_they_matter_least():
    torch.manual_seed(0)
    model = _TwoBranches().eval()
    batches = [(torch.randn(64, 8),)]
    result = gp.prune(model, batches[0], passes=[ChannelPrune(0.25, allocation="sensitivity")], calibration=batches)
    assert result.module.a1.out_features == 32 and result.module.b1.out_features == 16
    uniform = gp.prune(model, batches[0], passes=[ChannelPrune(0.25)], calibration=batches)
    assert result.report.rows[0].output_error < uniform.report.rows[0].output_error
    budget = gp.prune(
        model, batches[0], passes=[ChannelPrune(target_params=0.7, allocation="sensitivity")], calibration=batches
    )
    assert budget.report.params_after <= 0.7 * budget.report.params


def test_silencing_equals_removal_and_restores_every_parameter():
    from graphprune.algorithms.sensitivity import output_errors
    from tests.architectures import build

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(32, 8)
    analysis = gp.analyze(model, (x,))
    group = analysis.groups[0]
    scores = {group.id: torch.arange(16, dtype=torch.float64)}  # channels 0..5 are the least important
    errors = output_errors(analysis, model, [group], scores, lambda g: [6], (x,))
    plan = gp.Plan()
    plan.set(analysis, group.id, list(range(6, 16)))
    from graphprune.frontends.torch.apply import apply_plan

    pruned = apply_plan(model, analysis, plan).module
    with torch.no_grad():
        want = float((pruned(x) - model(x)).pow(2).sum() / model(x).pow(2).sum())
    assert errors[group.id][0] == pytest.approx(want, rel=1e-5)
    gpt2, inputs = build("gpt2")  # tied embedding and head: silencing must restore both names' tensor
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    analysis = gp.analyze(gpt2, inputs)
    groups = analysis.groups[:3]
    output_errors(
        analysis,
        gpt2,
        groups,
        {g.id: torch.rand(g.size, dtype=torch.float64) for g in groups},
        lambda g: [g.size // 2],
        inputs,
    )
    assert all(torch.equal(v, gpt2.state_dict()[k]) for k, v in before.items())
    with pytest.raises(gp.InputError, match="allocation must be one of"):
        ChannelPrune(0.5, allocation="greedy")
    with pytest.raises(gp.InputError, match="do not combine"):
        ChannelPrune(0.5, allocation="sensitivity", ratios={"a1": 0.1})


FOUR_BLOCKS = {
    "bert": lambda: T.BertModel(
        T.BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    ),
    "llama": lambda: T.LlamaForCausalLM(
        T.LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ),
}


@pytest.mark.parametrize("name", ["bert", pytest.param("llama", marks=pytest.mark.slow)])
def test_reconstruction_block_by_block_equals_whole_forwards(name, monkeypatch):
    """Reconstruction walks the dense and the pruned model block by block side by side: each
    layer's fit runs its own block, not the whole model, and gives the weights of the fit over
    whole forwards (the oracle: the same normal equations, from the same activations)."""
    from graphprune.frontends.torch.blocks import Blocks

    torch.manual_seed(0)
    model = FOUR_BLOCKS[name]().eval()
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (8, 32), generator=generator)} for _ in range(3)]
    inputs = batches[0]
    passes = [ChannelPrune(0.5, round_to=4, compensate="reconstruct")]
    block_type = type(Blocks(batches).block_list(model)[1][0])
    calls = [0]
    forward = block_type.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(block_type, "forward", counted)
    chained = gp.prune(model, inputs, passes=passes, calibration=batches)
    chained_calls, calls[0] = calls[0], 0
    monkeypatch.setattr(Blocks, "chain_problem", lambda self, model: "for the oracle")
    whole = gp.prune(model, inputs, passes=passes, calibration=batches)
    done, oracle = chained.report.rows[0].details, whole.report.rows[0].details
    assert "(block by block over " in done["reconstruction"]
    assert oracle["reconstruction"].endswith("(whole forwards, not block by block: for the oracle)")
    assert done["reconstruction"].partition(" (")[0] == oracle["reconstruction"].partition(" (")[0]
    assert done.get("not reconstructed") == oracle.get("not reconstructed")
    assert chained_calls < calls[0] / 2, (chained_calls, calls[0])  # four blocks: about a quarter of the runs
    got, want = chained.module.state_dict(), whole.module.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value.is_floating_point():
            assert torch.allclose(got[key], value, rtol=1e-4, atol=1e-5 * float(value.abs().max())), key
