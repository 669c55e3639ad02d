"""Property tests: for random networks, the oracles hold or the pipeline refuses clearly.

CI runs 500 networks through the structural oracles and 25 through the whole compression pipeline
and the ONNX emitter; GRAPHPRUNE_FUZZ_EXAMPLES / GRAPHPRUNE_FUZZ_EXPORT_EXAMPLES raise them.
"""

from __future__ import annotations

import os
import tempfile

import torch
from hypothesis import HealthCheck, given, settings

import graphprune as gp
from graphprune.apply import apply_plan
from graphprune.passes import ChannelPrune, NMSparsity, Quantize
from graphprune.plan import Plan
from graphprune.sparsity import masked_weights, satisfies
from tests.generated import networks
from tests.oracles import max_relative_error, outputs, random_plan, zero_removed

EXAMPLES = int(os.environ.get("GRAPHPRUNE_FUZZ_EXAMPLES", "500"))
EXPORT_EXAMPLES = int(os.environ.get("GRAPHPRUNE_FUZZ_EXPORT_EXAMPLES", "25"))
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


@settings(max_examples=EXPORT_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(networks())
def test_generated_networks_compress_quantize_and_export(model):
    """Channels, 2:4 and int8 in order, then the verified ONNX export: either a clear refusal
    (a GraphpruneError) or a file onnxruntime agrees with and whose int8 layers all fused."""
    calibration = [INPUTS, (torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)),)]
    passes = [ChannelPrune(0.5, round_to=4), NMSparsity(2, 4, dense_heads=False, dense_first_conv=False), Quantize()]
    result = gp.prune(model, INPUTS, passes=passes, calibration=calibration)
    assert all(satisfies(t, p) for t, p in masked_weights(result.module).values())
    with tempfile.TemporaryDirectory() as directory:
        try:
            report = result.export_onnx(os.path.join(directory, "m.onnx"))
        except gp.GraphpruneError as refusal:
            assert str(refusal)  # refused with a message, and nothing was written
            assert os.listdir(directory) == []
            return
    assert report.quantized_layers == len(result.plans[-1].layers)
    assert sum(report.int8_ops.values()) >= report.quantized_layers
