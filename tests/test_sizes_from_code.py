"""Models whose code keeps sizes in places other than int attributes (issue: prune any model
whatever way its code computes sizes).  Each prunes the spaces those sizes belong to, with the
oracles: keeping every channel is exact, and removing channels that were zero changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.analysis import analyze
from graphprune.apply import apply_plan
from graphprune.passes import ChannelPrune
from graphprune.plan import Plan
from tests.oracles import max_relative_error, outputs, random_plan, zero_removed


class TupleShape(nn.Module):
    """LayerScale as MetaFormer writes it: ``self.shape = (dim, 1, 1)`` and ``gamma.view(self.shape)``."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, dim, 3, padding=1), nn.Conv2d(dim, 4, 1)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.shape = (dim, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv(x) * self.gamma.view(self.shape)))


class SizeAttribute(nn.Module):
    """The same with a ``torch.Size`` attribute, as a bias shape."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, dim, 3, padding=1), nn.Conv2d(dim, 4, 1)
        self.bias = nn.Parameter(torch.randn(dim))
        self.bias_shape = torch.Size([dim, 1, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv(x) + self.bias.view(self.bias_shape)))


class SplitList(nn.Module):
    """Mixed convolution as MixNet writes it: ``torch.split(x, self.splits, 1)`` with a list."""

    def __init__(self) -> None:
        super().__init__()
        self.splits = [8, 8, 16]
        self.conv = nn.Conv2d(3, 32, 1)
        self.branches = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(self.splits, (3, 5, 1)))
        self.out = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(F.relu(self.conv(x)), self.splits, 1)
        return self.out(torch.cat([b(p) for b, p in zip(self.branches, parts)], 1))


CASES = [TupleShape, SizeAttribute, SplitList]
INPUTS = (torch.randn(2, 3, 8, 8),)


@pytest.mark.parametrize("make", CASES, ids=[c.__name__ for c in CASES])
def test_sequence_attributes_are_rewritten_entry_by_entry(make):
    torch.manual_seed(0)
    model = make().eval()
    analysis = analyze(model, INPUTS)
    assert not analysis.frozen or all("computed" not in str(f) for f in analysis.frozen), analysis.describe()
    kept = apply_plan(model, analysis, Plan()).module
    assert all(torch.equal(a, b) for a, b in zip(outputs(kept, INPUTS), outputs(model, INPUTS)))
    plan = random_plan(analysis, 0.5, exact_only=True)
    assert plan.keep, analysis.describe()
    zeroed = zero_removed(model, analysis, plan)
    pruned = apply_plan(zeroed, analysis, plan).module
    assert max_relative_error(outputs(pruned, INPUTS), outputs(zeroed, INPUTS)) < 1e-5
    result = gp.prune(model, INPUTS, passes=[ChannelPrune(0.5)])
    assert result.report.params_after < result.report.params
    assert result.module(*INPUTS).shape == model(*INPUTS).shape


def test_the_callers_sequence_attributes_keep_their_type_and_values():
    torch.manual_seed(0)
    for make, attribute in ((TupleShape, "shape"), (SizeAttribute, "bias_shape"), (SplitList, "splits")):
        model = make().eval()
        before = getattr(model, attribute)
        pruned = gp.prune(model, INPUTS, passes=[ChannelPrune(0.5)]).module
        after = getattr(pruned, attribute)
        assert getattr(model, attribute) == before and type(after) is type(before)
        assert after != before, f"{make.__name__}.{attribute} was not rewritten"


class ShapeReadAttention(nn.Module):
    """timm's ViT attention as written there: the head size is ``C // self.num_heads`` with ``C``
    read from the input's shape, which provenance does not follow yet."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.fc, self.qkv, self.proj = nn.Linear(8, dim), nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.head(x + self.proj(y))


def test_a_size_read_from_a_shape_that_no_longer_fits_is_named_with_its_line_and_groups():
    """The refusal names the line of the model's code that fails, the pruned groups that line
    computes with and their modules, not "control flow that depends on tensor values"."""
    torch.manual_seed(0)
    model, x = ShapeReadAttention().eval(), (torch.randn(2, 5, 8),)
    with pytest.raises(gp.ApplyError) as refused:
        gp.prune(model, x, passes=[ChannelPrune(0.5)])
    message = str(refused.value)
    assert "test_sizes_from_code.py" in message and "C // self.num_heads" in message, message
    assert "pruned group(s)" in message and "qkv" in message and "ignore=" in message, message
    assert "control flow" not in message, message
