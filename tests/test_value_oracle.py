"""Verification by values: models whose code builds values from a pruned size (issue: reliability,
item 1) prune to exactly the dense model with the removed channels zeroed, and a rule that gets
such a value wrong is caught, rolled back and named."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.core.values import ValuesDiffer
from graphprune.frontends.torch.analysis import analyze
from graphprune.frontends.torch.apply import apply_plan
from graphprune.passes import ChannelPrune
from graphprune.rules.aten import aten_rules
from tests.oracles import max_relative_error, outputs, random_plan, snapshot, unchanged, zero_removed


class HeadSlopes(nn.Module):
    """Per-head slopes from ``arange`` over the head count (ALiBi-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.nh, self.hd = 4, 8
        self.q, self.o = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.q(x).view(b, t, self.nh, self.hd)
        h = h * (0.5 ** torch.arange(self.nh, dtype=x.dtype)).view(1, 1, self.nh, 1)
        return self.o(h.reshape(b, t, self.nh * self.hd))


class IndexMask(nn.Module):
    """A channel mask built from ``arange`` over an attribute-held channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 8), 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(torch.where(torch.arange(self.c) % 3 == 0, y, -2 * y))


class ShapeRange(nn.Module):
    """A per-channel ramp sized by a tensor's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y * torch.arange(y.shape[1]))


class Noise(nn.Module):
    """Random draws sized by a channel count: a smaller draw is not the kept part of a larger one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 8), 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) + 0 * torch.randn(self.c))


CASES = [(HeadSlopes, (2, 3, 16)), (IndexMask, (2, 8)), (ShapeRange, (2, 8)), (Noise, (2, 8))]


@pytest.mark.parametrize("make, shape", CASES, ids=[c[0].__name__ for c in CASES])
def test_position_dependent_values_prune_exactly(make, shape):
    """Each model prunes (what does not touch the positional values) and the result equals the
    dense model with the removed channels zeroed; keeping all channels is exact."""
    torch.manual_seed(0)
    model, x = make().eval(), (torch.randn(*shape),)
    analysis = analyze(model, x)
    keep_all = apply_plan(model, analysis, random_plan(analysis, 0.0)).module
    assert max_relative_error(outputs(keep_all, x), outputs(model, x)) == 0.0
    plan = random_plan(analysis, 0.5, seed=1)
    pruned = apply_plan(model, analysis, plan).module
    assert max_relative_error(outputs(pruned, x), outputs(zero_removed(model, analysis, plan), x)) < 1e-5
    frozen = " ".join(str(r) for r in analysis.spaces.frozen.values())
    assert "depend on the position" in frozen


def test_the_value_oracle_catches_a_rule_that_regenerates_values(monkeypatch):
    """With arange's old rule (its size argument rewritten to the kept count), the structure check
    passes, and the value oracle rolls back and names the node and the group."""

    def regenerating(ctx, node):
        ctx.constant(node, ("args", 0), [ctx.out(node)[0]])

    monkeypatch.setitem(aten_rules._rules, torch.ops.aten.arange.default, regenerating)
    torch.manual_seed(0)
    model, x = HeadSlopes().eval(), (torch.randn(2, 3, 16),)
    before = snapshot(model)
    with pytest.raises(ValuesDiffer, match=r"node arange .*pruned group\(s\) \[\d+"):
        gp.prune(model, x, passes=[ChannelPrune(ratio=0.5, heads=True)])
    assert unchanged(model, before)


def test_inexact_groups_are_not_false_alarms():
    """A LayerNorm over pruned channels changes every later value (inexact by design); the oracle
    stops comparing after it instead of refusing the plan."""

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.n, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.n(self.a(x)).relu())

    torch.manual_seed(0)
    model, x = Normed().eval(), (torch.randn(4, 8),)
    analysis = analyze(model, x)
    assert any(g.inexact for g in analysis.groups)
    pruned = apply_plan(model, analysis, random_plan(analysis, 0.5)).module
    assert pruned.a.out_features < 16


def test_the_onnx_apply_runs_the_value_oracle_too(monkeypatch):
    """The ONNX frontend's apply compares every value with the zeroed dense graph's: a pruned value
    that parts (here: one corrupted on purpose) is named, with its producing node."""
    import graphprune.frontends.onnx.apply as onnx_apply
    from graphprune.frontends.onnx.analysis import analyze_onnx_capture
    from graphprune.frontends.onnx.capture import capture_onnx, read_model
    from tests.test_onnx_rules import CASES

    capture = capture_onnx(read_model(CASES["split_sizes_input"][0]))
    analysis = analyze_onnx_capture(capture)
    plan = random_plan(analysis, 0.5)
    onnx_apply.apply_onnx_plan(capture, analysis, plan)  # exact: passes
    real, calls = onnx_apply.run_values, []

    def corrupting(model, feeds):
        values = real(model, feeds)
        calls.append(model)
        if len(calls) == 1:  # the pruned model's run (the zeroed dense one comes second)
            values["q"] = values["q"] + 1.0
        return values

    monkeypatch.setattr(onnx_apply, "run_values", corrupting)
    with pytest.raises(ValuesDiffer, match=r"value 'q' \(output of Split_p: Split\)"):
        onnx_apply.apply_onnx_plan(capture, analysis, plan)
