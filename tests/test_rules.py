"""Op rules on small modules: the oracles for every family, plus the expected couplings."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.core.plan import Plan
from graphprune.frontends.torch.apply import apply_plan
from graphprune.passes import ChannelPrune
from tests import zoo
from tests.oracles import max_relative_error, outputs, random_plan, zero_removed

CASES = zoo.cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_oracles(name):
    model, inputs = CASES[name]
    model.eval()
    analysis = gp.analyze(model, inputs)
    assert not analysis.rule_errors, analysis.rule_errors
    assert all(
        torch.equal(a, b)
        for a, b in zip(outputs(apply_plan(model, analysis, Plan()).module, inputs), outputs(model, inputs))
    )
    for seed in range(3):
        plan = random_plan(analysis, 0.5, seed=seed, exact_only=True)
        if not plan.keep:
            continue
        zeroed = zero_removed(model, analysis, plan)
        pruned = apply_plan(zeroed, analysis, plan).module
        assert max_relative_error(outputs(pruned, inputs), outputs(zeroed, inputs)) < 1e-4
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert [t.shape for t in outputs(result.module, inputs)] == [t.shape for t in outputs(model, inputs)]


def _members(analysis, group):
    return {(m.name, m.dim) for m in group.members}


def _group_with(analysis, name, dim):
    return [g for g in analysis.groups if (name, dim) in _members(analysis, g)]


def test_grouped_conv_splits_into_groups_and_per_group_channels():
    model, inputs = CASES["grouped_conv"]
    analysis = gp.analyze(model, inputs)
    sizes = sorted(g.size for g in _group_with(analysis, "b.weight", 0))
    assert sizes == [4, 4]  # 4 groups x 4 output channels per group
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert result.module.b.groups == 2 and result.module.b.out_channels == 4


def test_depthwise_prunes_whole_channels_and_updates_groups():
    model, inputs = CASES["depthwise"]
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    dw = result.module.dw
    assert dw.groups == dw.in_channels == result.module.pw.out_channels == 8
    assert dw.out_channels == 8  # the channel multiplier (2) is pruned too


def test_flatten_removes_whole_spatial_blocks_of_the_linear():
    model, inputs = CASES["flatten_linear"]
    analysis = gp.analyze(model, inputs)
    (group,) = _group_with(analysis, "conv.weight", 0)
    assert ("fc.weight", 1) in _members(analysis, group)
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert result.module.fc.in_features == 4 * 16


def test_concat_keeps_branches_separate_and_split_follows():
    model, inputs = CASES["concat_split"]
    analysis = gp.analyze(model, inputs)
    assert sorted(g.size for g in _group_with(analysis, "mix.weight", 1)) == [8, 12]


def test_gqa_query_heads_refine_into_kv_heads_times_repeats():
    model, inputs = CASES["gqa_sdpa"]
    analysis = gp.analyze(model, inputs)
    head_groups = [g for g in analysis.groups if "heads" in g.tags]
    assert sorted(g.size for g in head_groups) == [2, 2]  # kv heads (2) x queries per kv head (2)
    kv = [g for g in head_groups if ("k.weight", 0) in _members(analysis, g)]
    assert len(kv) == 1 and ("q.weight", 0) in _members(analysis, kv[0])
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert result.module.k.out_features == 8 and result.module.q.out_features == 8


def test_unknown_op_freezes_what_it_touches_and_is_reported():
    model, inputs = CASES["unsupported"]
    analysis = gp.analyze(model, inputs)
    assert any("cummax" in op for op in analysis.unsupported)
    assert not _group_with(analysis, "a.weight", 0)
    assert _group_with(analysis, "c.weight", 0)
    assert "no rule for aten.cummax" in analysis.describe()


def test_shared_module_is_one_tensor_pruned_once():
    model, inputs = CASES["shared_module"]
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert result.module.shared.weight.shape == (8, 8)


def test_tied_embedding_and_head_stay_tied():
    model, inputs = CASES["tied_embedding"]
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert result.module.head.weight is result.module.embed.weight
    assert result.module.embed.weight.shape == (50, 8)


def test_model_inputs_and_outputs_stay_frozen():
    model, inputs = CASES["conv2d"]
    analysis = gp.analyze(model, inputs)
    assert not _group_with(analysis, "a.weight", 1)
    assert not _group_with(analysis, "c.weight", 0)
    reasons = {str(f.reason) for f in analysis.frozen}
    assert any("model input" in r for r in reasons) and any("model output" in r for r in reasons)


def test_every_registered_op_is_an_aten_op():
    from graphprune.rules.aten import aten_rules

    assert all(str(op).startswith("aten.") for op in aten_rules.covered_ops())
    assert len(aten_rules.covered_ops()) > 150


def test_multihead_attention_prunes_whole_heads_and_keeps_its_invariant():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.mha, self.out = (
                nn.Linear(8, 16),
                nn.MultiheadAttention(16, 4, batch_first=True),
                nn.Linear(16, 4),
            )
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

        def forward(self, x):
            h = self.inp(x)
            h = h + self.mha(h, h, h, need_weights=False)[0]
            return self.out(h + self.mlp(h))

    net, x = Net().eval(), torch.randn(2, 5, 8)
    analysis = gp.analyze(net, (x,))
    plan = random_plan(analysis, 0.5)
    zeroed = zero_removed(net, analysis, plan)
    assert max_relative_error(outputs(apply_plan(zeroed, analysis, plan).module, (x,)), outputs(zeroed, (x,))) < 1e-4
    result = gp.prune(net, (x,), passes=[ChannelPrune(0.5)])
    mha = result.module.mha
    assert (mha.num_heads, mha.head_dim, mha.embed_dim) == (2, 4, 8) and result.module.mlp[0].out_features == 16
    assert result.module(x).shape == net(x).shape


def test_multihead_attention_with_separate_kv_width_is_frozen():
    mha = nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    analysis = gp.analyze(mha, (q, kv, kv))
    assert any("separate q/k/v projections" in str(f.reason) for f in analysis.frozen)
    assert not analysis.groups


def test_one_attribute_sizing_several_spaces_couples_them():
    """Code that sizes q, k and v heads with one head_dim: head-dim pruning must agree across them."""
    model, inputs = CASES["repeat_interleave_kv"]
    analysis = gp.analyze(model, inputs)
    dims = [g for g in analysis.groups if ("v.weight", 0) in _members(analysis, g) and "head_dim" in g.tags]
    assert len(dims) == 1 and ("q.weight", 0) in _members(analysis, dims[0])


def test_attribute_that_also_sets_the_scale_freezes_what_it_sizes():
    model, inputs = CASES["gqa_sdpa"]  # scale=self.head_dim ** -0.5
    analysis = gp.analyze(model, inputs)
    assert not [g for g in analysis.groups if "head_dim" in g.tags]
    assert any(
        "head_dim enters more than a size" in str(f.reason) and "must keep its value" in str(f.reason)
        for f in analysis.frozen
    ), analysis.describe()


class _Computed(nn.Module):
    """LeViT-style: value heads are ``ratio * key_dim`` wide, computed in forward."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.heads, self.key_dim, self.ratio, self.shift = 2, 4, 2, shift
        self.qkv, self.out = nn.Linear(8, 2 * (4 + 4 + 8 + shift)), nn.Linear(2 * (8 + shift), 8)

    def forward(self, x):
        b, t, _ = x.shape
        v_dim = self.ratio * self.key_dim + self.shift if self.shift else self.ratio * self.key_dim
        q, k, v = (
            self.qkv(x).view(b, t, self.heads, -1).transpose(1, 2).split([self.key_dim, self.key_dim, v_dim], dim=3)
        )
        y = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


def test_size_computed_as_a_product_follows_its_factors():
    model, x = _Computed().eval(), torch.randn(2, 3, 8)
    analysis = gp.analyze(model, (x,))
    key_dim = [g for g in analysis.groups if "head_dim" in g.tags and g.size == 4]
    assert key_dim, analysis.describe()
    result = gp.prune(model, (x,), passes=[ChannelPrune(0.5, heads=False, head_dim=True)])
    assert result.module.key_dim == 2 and result.module.out.in_features == 2 * 2 * 2  # heads x ratio x key_dim
    assert result.module(x).shape == (2, 3, 8)


def test_size_computed_otherwise_is_frozen_not_guessed():
    model, x = _Computed(shift=1).eval(), torch.randn(2, 3, 8)
    analysis = gp.analyze(model, (x,))
    assert any("size computed from" in str(f.reason) and "shift" in str(f.reason) for f in analysis.frozen)
    assert not [g for g in analysis.groups if "head_dim" in g.tags]  # key_dim enters that expression
    result = gp.prune(model, (x,), passes=[ChannelPrune(0.5, head_dim=True)])
    assert result.module(x).shape == (2, 3, 8)


def test_a_size_the_code_cannot_produce_is_refused_and_the_model_kept():
    class Literal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(self.a(x).view(x.shape[0], 8, -1).view(x.shape[0], 8, 8, 8))

    model, x = Literal().eval(), torch.randn(1, 3, 8, 8)
    analysis = gp.analyze(model, (x,))
    plan = random_plan(analysis, 0.5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(gp.ApplyError, match="no longer traces"):
        apply_plan(model, analysis, plan, inplace=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert model.a.out_channels == 8


def test_stack_repeat_unflatten_bmm_and_structured_outputs():
    model, inputs = CASES["stack_repeat_bmm"]
    analysis = gp.analyze(model, inputs)
    assert not analysis.unsupported and not analysis.rule_errors
    # stack couples both branches channel for channel (unflatten makes them 3 x 4, and the slice
    # of the repeated tensor cuts through the 4, so they freeze together, with that reason)
    spaces = [f for f in analysis.frozen if ("a.weight", 0) in {(m.name, m.dim) for m in f.members}]
    assert [f.size for f in spaces] == [3, 4]
    assert all(("b.weight", 0) in {(m.name, m.dim) for m in f.members} for f in spaces)
    assert all("slice cuts through the inner factor" in str(f.reason) for f in spaces)
    out = gp.prune(model, inputs, passes=[ChannelPrune(0.5)]).module(*inputs)
    assert set(out) == {"out", "extra"} and out["extra"][0].shape == (2, 2, 2)
