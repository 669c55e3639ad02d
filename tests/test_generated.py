"""Property tests: for random networks, the oracles hold or the pipeline refuses clearly.

CI runs 60 networks through the structural oracles and 8 through the whole compression pipeline
and the ONNX emitter; GRAPHPRUNE_FUZZ_EXAMPLES / GRAPHPRUNE_FUZZ_EXPORT_EXAMPLES raise them.
Networks are drawn as specs (plain data, :func:`tests.generated.network_specs`); a failing one,
shrunk by hypothesis, is written to ``tests/regressions/`` and replayed from then on by
``test_saved_regressions``, with both oracles.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune.algorithms.nm import satisfies
from graphprune.core.plan import Plan
from graphprune.frontends.torch.apply import apply_plan
from graphprune.frontends.torch.masks import masked_weights
from graphprune.passes import ChannelPrune, NMSparsity, Quantize
from tests.generated import REGRESSIONS, build, kept_if_failing, network_specs
from tests.oracles import Explodes, max_relative_error, outputs, random_plan, snapshot, unchanged, zero_removed

pytestmark = pytest.mark.slow  # see tests/conftest.py

EXAMPLES = int(os.environ.get("GRAPHPRUNE_FUZZ_EXAMPLES", "40"))
EXPORT_EXAMPLES = int(os.environ.get("GRAPHPRUNE_FUZZ_EXPORT_EXAMPLES", "6"))
INPUTS = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)),)
CALIBRATION = [INPUTS, (torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)),)]
FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def structural_oracles(model: torch.nn.Module) -> None:
    """Captured without unknown ops; keep-all is exact; pruning channels zeroed beforehand changes
    nothing; ChannelPrune's result runs with the same output shape.  Every apply also runs the
    value oracle of verification (:mod:`graphprune.frontends.torch.value_oracle`) on all of its groups."""
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


def compression_oracles(model: torch.nn.Module, failing_at: int | None = None) -> None:
    """Channels, 2:4 and int8 in order, then the verified ONNX export: either a clear refusal (a
    GraphpruneError) or a file onnxruntime agrees with and whose int8 layers all fused.  The
    caller's model is bit-identical afterwards, and also when a pass fails at ``failing_at``."""
    passes = [ChannelPrune(0.5, round_to=4), NMSparsity(2, 4, dense_heads=False, dense_first_conv=False), Quantize()]
    before = snapshot(model)
    if failing_at is not None:
        with pytest.raises(RuntimeError, match="injected failure"):
            gp.prune(
                model, INPUTS, passes=passes[:failing_at] + [Explodes()] + passes[failing_at:], calibration=CALIBRATION
            )
        assert unchanged(model, before), f"a failure after pass {failing_at} changed the caller's model"
    result = gp.prune(model, INPUTS, passes=passes, calibration=CALIBRATION)
    assert unchanged(model, before), "a successful run changed the caller's model"
    assert all(satisfies(t, p) for t, p in masked_weights(result.module).values())
    with tempfile.TemporaryDirectory() as directory:
        try:
            report = result.export_onnx(os.path.join(directory, "m.onnx"))
        except gp.GraphpruneError as refusal:
            assert str(refusal)  # refused with a message, and nothing was written
            assert os.listdir(directory) == []
            return
    assert report.quantized_layers == len(result.plans[-1].layers)
    assert sum(report.quantized_ops.values()) >= report.quantized_layers


@settings(max_examples=EXAMPLES, **FUZZ)
@given(network_specs())
def test_generated_networks_keep_the_oracles(spec):
    with kept_if_failing(spec, "structural"):
        structural_oracles(build(spec))


@settings(max_examples=EXPORT_EXAMPLES, **FUZZ)
@given(network_specs(), st.integers(0, 3))
def test_generated_networks_compress_quantize_and_export(spec, failing_at):
    with kept_if_failing(spec, "compression"):
        compression_oracles(build(spec), failing_at)


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.json")), ids=lambda p: p.stem)
def test_saved_regressions(path):
    """Networks that once failed (or were written by hand to pin a hard case) pass both oracles."""
    spec = json.loads(path.read_text())
    structural_oracles(build(spec))
    compression_oracles(build(spec), failing_at=1)


def test_a_failing_spec_is_written_where_the_replay_finds_it(tmp_path, monkeypatch):
    import tests.generated as generated

    monkeypatch.setattr(generated, "REGRESSIONS", tmp_path / "regressions")
    spec = {"seed": 1, "stem": 4, "flatten_head": False, "blocks": [{"kind": "gate"}]}
    with pytest.raises(AssertionError) as failure:
        with kept_if_failing(spec, "demo"):
            assert False, "an oracle failed"
    assert json.loads((tmp_path / "regressions" / "demo.json").read_text()) == spec
    assert any("demo.json" in note for note in failure.value.__notes__)
    assert isinstance(build(spec), torch.nn.Module)  # the saved spec builds the same network again
