"""Every architecture the core promises: prune at 30% and 50%, check shapes, size and the oracles."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.core.plan import Plan
from graphprune.frontends.torch.apply import apply_plan
from graphprune.passes import ChannelPrune
from tests.architectures import ARCHITECTURES, build, sweep
from tests.oracles import max_relative_error, outputs, random_plan, zero_removed

NAMES = sorted(ARCHITECTURES)


@pytest.fixture(scope="module", params=sweep(NAMES))
def arch(request):
    model, inputs = build(request.param)
    return request.param, model, inputs, gp.analyze(model, inputs)


def test_analysis_is_complete(arch):
    name, _, _, analysis = arch
    assert analysis.groups, f"{name}: no prunable group found"
    assert not analysis.rule_errors, analysis.rule_errors


def test_keep_all_plan_is_exact(arch):
    _, model, inputs, analysis = arch
    pruned = apply_plan(model, analysis, Plan()).module
    for a, b in zip(outputs(pruned, inputs), outputs(model, inputs)):
        assert torch.equal(a, b)


def test_pruning_zeroed_channels_changes_nothing(arch):
    """Zero every parameter slice of the removed channels, then remove them: outputs must not move."""
    name, model, inputs, analysis = arch
    plan = random_plan(analysis, 0.5, exact_only=True)
    assert plan.keep, f"{name}: no exact group to check"
    zeroed = zero_removed(model, analysis, plan)
    pruned = apply_plan(zeroed, analysis, plan).module
    assert max_relative_error(outputs(pruned, inputs), outputs(zeroed, inputs)) < 1e-4


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_channel_prune(arch, ratio):
    name, model, inputs, _ = arch
    before = [t.clone() for t in model.state_dict().values()]
    result = gp.prune(model, inputs, passes=[ChannelPrune(ratio=ratio)])
    got, want = outputs(result.module, inputs), outputs(model, inputs)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(torch.isfinite(t).all() for t in got if t.is_floating_point())
    report = result.report
    assert report.params_after < report.params and report.macs_after < report.macs, str(report)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values())), "caller's model changed"


def test_llama_gqa_groups_are_kv_heads_times_queries_per_kv_head():
    """24 query heads over 8 kv heads: per layer one 8-way kv group and one 3-way repeat group,
    and one head_dim space shared by every layer through RoPE's inv_freq."""
    model, inputs = build("llama_gqa")
    analysis = gp.analyze(model, inputs)
    heads = sorted(g.size for g in analysis.groups if "heads" in g.tags)
    assert heads == [3, 3, 8, 8]
    (head_dim,) = [g for g in analysis.groups if "head_dim" in g.tags]
    names = {m.name for m in head_dim.members}
    assert "model.rotary_emb.inv_freq" in names and "model.layers.1.self_attn.v_proj.weight" in names
    assert head_dim.size == 4  # 8 channels = 4 rotate_half pairs
