"""Models whose code keeps sizes in places other than int attributes (issue: prune any model
whatever way its code computes sizes).  Each prunes the spaces those sizes belong to, with the
oracles: keeping every channel is exact, and removing channels that were zero changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.core.plan import Plan
from graphprune.frontends.torch.analysis import analyze
from graphprune.frontends.torch.apply import apply_plan
from graphprune.passes import ChannelPrune
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
        self.branches = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(self.splits, (3, 5, 1))
        )
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
    _prunes_with_the_oracles(model, INPUTS, analysis)


def _prunes_with_the_oracles(model: nn.Module, inputs: tuple, analysis) -> None:
    """Keeping every channel is exact, removing zeroed channels changes nothing, and ChannelPrune
    shrinks the model, which then runs its own forward code."""
    kept = apply_plan(model, analysis, Plan()).module
    assert all(torch.equal(a, b) for a, b in zip(outputs(kept, inputs), outputs(model, inputs)))
    plan = random_plan(analysis, 0.5, exact_only=True)
    assert plan.keep, analysis.describe()
    zeroed = zero_removed(model, analysis, plan)
    pruned = apply_plan(zeroed, analysis, plan).module
    assert max_relative_error(outputs(pruned, inputs), outputs(zeroed, inputs)) < 1e-5
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert result.report.params_after < result.report.params
    assert result.module(*inputs).shape == model(*inputs).shape


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
    """timm's ViT attention as written there: ``B, N, C = x.shape`` and a head size of
    ``C // self.num_heads``, with the channels read back by ``reshape(B, N, C)``."""

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


class SizeCallAttention(nn.Module):
    """Sizes from ``len(x)``, ``x.shape[1]`` and ``x.size(-1) // heads``, a fixed float scale, and
    separate q/k/v projections."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, 0.25
        self.fc, self.q, self.k, self.v = (
            nn.Linear(8, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
        )
        self.proj, self.head = nn.Linear(dim, dim), nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        B, N, head_dim = len(x), x.shape[1], x.size(-1) // self.num_heads
        q, k, v = (p(x).view(B, N, self.num_heads, head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.head(x + self.proj(y.transpose(1, 2).reshape(B, N, -1)))


def shifted_window_attention(
    x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """torchvision's functional style: the head count arrives as a plain argument, and the scale is
    computed from the shape, ``(C // num_heads) ** -0.5``."""
    B, N, C = x.shape
    qkv = F.linear(x, qkv_weight).reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attention = ((q * (C // num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return F.linear((attention @ v).transpose(1, 2).reshape(B, N, C), proj_weight)


class FunctionalAttention(nn.Module):
    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.fc, self.head = nn.Linear(8, dim), nn.Linear(dim, 4)
        self.qkv_weight = nn.Parameter(torch.randn(3 * dim, dim) / dim**0.5)
        self.proj_weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        return self.head(x + shifted_window_attention(x, self.qkv_weight, self.proj_weight, self.num_heads))


class ShapeSizedTensors(nn.Module):
    """Tensors made at sizes read from another tensor: a zero pad channel block of
    ``x.new_zeros(B, C // 2, H, W)``, and a flatten written as ``x.reshape(B, C * H * W)``."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.conv, self.mix = nn.Conv2d(3, dim, 3, padding=1), nn.Conv2d(dim + dim // 2, dim, 1)
        self.fc = nn.Linear(dim * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        B, C, H, W = y.shape
        y = F.relu(self.mix(torch.cat([y, y.new_zeros(B, C // 2, H, W)], 1)))
        y = F.adaptive_avg_pool2d(y, 4)
        B, C, H, W = y.shape
        return self.fc(y.reshape(B, C * H * W))


SHAPE_CASES = [
    (ShapeReadAttention, (2, 5, 8)),
    (SizeCallAttention, (2, 5, 8)),
    (FunctionalAttention, (2, 5, 8)),
    (ShapeSizedTensors, (2, 3, 8, 8)),
]


@pytest.mark.parametrize("make, shape", SHAPE_CASES, ids=[c.__name__ for c, _ in SHAPE_CASES])
def test_sizes_read_from_shapes_prune_with_the_oracles(make, shape):
    """The spaces a shape-read size belongs to are coupled, not frozen, and prune with the oracles."""
    torch.manual_seed(0)
    model, inputs = make().eval(), (torch.randn(*shape),)
    _prunes_with_the_oracles(model, inputs, analyze(model, inputs))


@pytest.mark.parametrize("make", [ShapeReadAttention, FunctionalAttention], ids=lambda c: c.__name__)
def test_a_head_count_read_with_the_shape_goes_by_whole_heads(make):
    """``C // num_heads`` couples the channels ``C`` was read from with the heads: pruning them
    removes whole heads and rewrites ``num_heads`` (through a function argument too), while the
    head size, which the scale depends on, stays."""
    torch.manual_seed(0)
    model, inputs = make().eval(), (torch.randn(2, 5, 8),)
    analysis = analyze(model, inputs)
    assert [g.size for g in analysis.groups if "heads" in g.tags] == [4], analysis.describe()
    assert not [g for g in analysis.groups if "head_dim" in g.tags], analysis.describe()
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert result.module.num_heads == 2 and model.num_heads == 4


def test_a_fixed_scale_leaves_the_head_size_prunable():
    """With a scale that does not depend on the shape, the head size read as ``x.size(-1) // heads``
    is a space of its own, beside the heads."""
    torch.manual_seed(0)
    analysis = analyze(SizeCallAttention().eval(), (torch.randn(2, 5, 8),))
    assert sorted((g.size, sorted(g.tags)) for g in analysis.groups if g.tags) == [(4, ["heads"]), (8, ["head_dim"])]


class LostTrack(nn.Module):
    """A hidden width computed as ``int(C * 1.0)``: a float and back, which provenance cannot follow."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.fc, self.up, self.down, self.head = (
            nn.Linear(8, dim),
            nn.Linear(dim, 2 * dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        B, N, C = x.shape
        hidden = self.up(x).reshape(B, N, 2, int(C * 1.0)).sum(2)
        return self.head(x + self.down(hidden))


def test_a_size_provenance_loses_is_named_with_its_line_and_groups():
    """Where a size leaves what provenance follows and no longer fits after pruning, the refusal
    names the line of the model's code that fails, the pruned groups that line computes with and
    their modules, not "control flow that depends on tensor values"."""
    torch.manual_seed(0)
    model, x = LostTrack().eval(), (torch.randn(2, 5, 8),)
    analysis = analyze(model, x)
    (residual,) = [g for g in analysis.groups if any(m.name == "fc.weight" for m in g.members)]
    plan = Plan()
    plan.set(analysis, residual.id, list(range(residual.size // 2)))
    with pytest.raises(gp.ApplyError) as refused:
        apply_plan(model, analysis, plan)
    message = str(refused.value)
    assert "test_sizes_from_code.py" in message and "int(C * 1.0)" in message, message
    assert "pruned group(s)" in message and "fc" in message and "ignore=" in message, message
    assert "control flow" not in message, message


class ShapeSizedFull(nn.Module):
    """A bias block made with ``torch.full((B, C, H, W), 0.5)`` from a shape read, and an identity
    made with ``torch.eye`` at an attribute's size (its values depend on the position: frozen)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.conv, self.out = nn.Conv2d(3, dim, 3, padding=1), nn.Conv2d(dim, 4, 1)
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        B, C, H, W = y.shape
        y = y + torch.full((B, C, H, W), 0.5)
        y = self.out(y)
        eye = torch.eye(self.dim)
        return y.mean((2, 3)), self.mix(eye)


def test_full_follows_its_sizes_and_eye_is_frozen_with_the_reason():
    torch.manual_seed(0)
    model, inputs = ShapeSizedFull().eval(), (torch.randn(2, 3, 8, 8),)
    analysis = analyze(model, inputs)
    assert [g.size for g in analysis.groups if any(m.name == "conv.weight" for m in g.members)] == [16]
    assert any(
        "regenerated, not sliced" in str(f.reason) and any(m.name == "mix.weight" for m in f.members)
        for f in analysis.frozen
    ), analysis.describe()
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert result.module.conv.out_channels == 8 and result.module.mix.in_features == 16


class RemembersItsSize(nn.Module):
    """Stores sizes read in forward on itself, as some window-attention code does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.hw, self.channels = y.shape[2:], y.size(1)
        return self.out(F.relu(y))


def test_sizes_stored_on_the_model_during_capture_come_back_as_plain_ints():
    model = RemembersItsSize().eval()
    gp.analyze(model, (torch.randn(1, 3, 8, 8),))
    assert type(model.hw) is torch.Size and [type(v) for v in model.hw] == [int, int]
    assert type(model.channels) is int


class FourierPositions(nn.Module):
    """EdgeNeXt's positional encoding: ``torch.arange(self.hidden_dim)`` frequencies, sin and cos
    interleaved by ``stack(...).flatten(3)``, read by a conv."""

    def __init__(self, hidden_dim: int = 8, dim: int = 16) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.stem, self.token_projection = nn.Conv2d(3, dim, 3, padding=1), nn.Conv2d(hidden_dim, dim, 1)
        self.out = nn.Conv2d(dim, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        B, _, H, W = y.shape
        ramp = torch.ones(B, H, W).cumsum(2)
        dim_t = 100.0 ** (2 * torch.div(torch.arange(self.hidden_dim), 2, rounding_mode="floor") / self.hidden_dim)
        pos = ramp[:, :, :, None] / dim_t
        pos = torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return self.out(F.relu(y + self.token_projection(pos.permute(0, 3, 1, 2))))


def test_an_attribute_sized_arange_feeding_a_conv_keeps_the_channels_it_makes():
    """The channels a position-dependent factory makes (and a stack of its halves) are not a free
    space: the conv reading them keeps its inputs, while everything else prunes, with the oracles."""
    torch.manual_seed(0)
    model, inputs = FourierPositions().eval(), (torch.randn(2, 3, 8, 8),)
    analysis = analyze(model, inputs)
    assert not [
        g for g in analysis.groups if any(m.name == "token_projection.weight" and m.dim == 1 for m in g.members)
    ], analysis.describe()
    plan = random_plan(analysis, 0.5, exact_only=True)
    zeroed = zero_removed(model, analysis, plan)
    assert (
        max_relative_error(outputs(apply_plan(zeroed, analysis, plan).module, inputs), outputs(zeroed, inputs)) < 1e-5
    )
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert result.module.stem.out_channels == 8 and result.module.token_projection.in_channels == 8
