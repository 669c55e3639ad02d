"""Property tests: for random networks, the oracles hold or the pipeline refuses clearly.

Set GRAPHPRUNE_FUZZ_EXAMPLES to run more cases (CI runs the default).
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings

import graphprune as gp
from graphprune.apply import apply_plan
from graphprune.passes import ChannelPrune
from graphprune.plan import Plan
from tests.generated import networks
from tests.oracles import max_relative_error, outputs, random_plan, zero_removed

EXAMPLES = int(os.environ.get("GRAPHPRUNE_FUZZ_EXAMPLES", "60"))
INPUTS = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)),)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(networks())
def test_generated_networks_keep_the_oracles(model):
    analysis = gp.analyze(model, INPUTS)
    assert not analysis.rule_errors and not analysis.unsupported, analysis.describe()
    kept = apply_plan(model, analysis, Plan()).module
    assert all(torch.equal(a, b) for a, b in zip(outputs(kept, INPUTS), outputs(model, INPUTS)))
    plan = random_plan(analysis, 0.5, seed=1, exact_only=True)
    if plan.keep:
        zeroed = zero_removed(model, analysis, plan)
        pruned = apply_plan(zeroed, analysis, plan).module
        assert max_relative_error(outputs(pruned, INPUTS), outputs(zeroed, INPUTS)) < 1e-4, analysis.describe()
    result = gp.prune(model, INPUTS, passes=[ChannelPrune(0.5)])
    assert outputs(result.module, INPUTS)[0].shape == (2, 5)
