"""Small modules that each exercise one family of ops (used by tests/test_rules.py)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvChain(nn.Module):
    def __init__(self, dims: int = 2, groups: int = 1, transposed: bool = False) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        tconv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.a = conv(3, 16, 3, padding=1)
        self.bn = bn(16)
        self.b = (tconv if transposed else conv)(16, 16, 3, padding=1, groups=groups)
        self.c = conv(16, 8, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.bn(self.a(x))))))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # channel multiplier 2
        self.out = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.out(F.relu(self.dw(F.relu(self.pw(x)))))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class ConcatSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 12, 1)
        self.mix = nn.Conv2d(20, 20, 1)
        self.c, self.d = nn.Conv2d(8, 4, 1), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.mix(torch.cat([self.a(x), self.b(x)], dim=1))
        p, q = torch.split(y, [self.a.out_channels, self.b.out_channels], dim=1)
        return self.c(p) + self.d(q)


class ChunkGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class PixelShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8 * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.out(self.shuffle(self.conv(x)))


class ChannelShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 1, groups=1)
        self.g = nn.Conv2d(12, 12, 1, groups=3)
        self.shuffle = nn.ChannelShuffle(3)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.out(self.shuffle(F.relu(self.g(F.relu(self.conv(x))))))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(F.gelu(self.gn(self.conv(x))))


class SharedModule(nn.Module):
    """One Linear called twice: its weight is one tensor, coupled across both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = F.relu(self.shared(h))
        return self.out(F.relu(self.shared(h)))


class TiedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mid = nn.Linear(16, 32)
        self.back = nn.Linear(32, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.back(F.relu(self.mid(self.embed(ids)))))


class GQAAttention(nn.Module):
    """Grouped-query attention through sdpa's enable_gqa, with RMSNorm and a residual."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm = nn.RMSNorm(dim)
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, enable_gqa=True)
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))


class EinsumAttention(nn.Module):
    def __init__(self, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1) for z in (q, k, v))
        att = torch.einsum("bthd,bshd->bhts", q, k).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(b, t, -1)
        return self.out(y)


class RepeatInterleaveKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 8)
        self.v, self.o = nn.Linear(16, 8), nn.Linear(16, 16)
        self.heads, self.kv_heads, self.head_dim = 4, 2, 4

    def forward(self, x):
        b, t, _ = x.shape
        rep = self.heads // self.kv_heads
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2).repeat_interleave(rep, dim=1)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2).repeat_interleave(rep, dim=1)
        y = (q @ k.transpose(-1, -2) * 0.5).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class PoolInterpolate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.a(x)), 2)
        y = F.avg_pool2d(self.b(F.pad(y, (1, 1, 1, 1))), 2, stride=1, padding=0)
        return self.c(F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))


class Unsupported(nn.Module):
    """torch.cummax over channels has no rule: the channels it touches must freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.c, self.d = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        running_max, _ = torch.cummax(self.a(x), dim=-1)
        return self.b(running_max) + self.d(F.relu(self.c(x)))


class StackRepeatBmm(nn.Module):
    """stack, repeat, unflatten and bmm, returning a dict and a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 12), nn.Linear(8, 12)
        self.mix = nn.Linear(12, 6)
        self.heads = 3

    def forward(self, x):
        s = torch.stack([self.a(x), self.b(x)], dim=1)  # [B, 2, 12]
        pair = torch.bmm(s, s.transpose(1, 2))  # [B, 2, 2], contracts the 12 channels
        tiled = self.a(x).repeat(1, 2)  # [B, 24]
        heads = self.b(x).unflatten(-1, (self.heads, -1))  # [B, 3, 4]
        out = self.mix(s.sum(1)) + tiled[:, :6] * 0 + heads.mean(-1).sum(-1, keepdim=True)
        return {"out": out, "extra": (pair, heads.flatten(1))}


def cases() -> dict[str, tuple[nn.Module, tuple]]:
    torch.manual_seed(0)
    img = torch.randn(2, 3, 8, 8)
    return {
        "conv1d": (ConvChain(1), (torch.randn(2, 3, 16),)),
        "conv2d": (ConvChain(2), (img,)),
        "conv3d": (ConvChain(3), (torch.randn(1, 3, 4, 6, 6),)),
        "grouped_conv": (ConvChain(2, groups=4), (img,)),
        "conv_transpose": (ConvChain(2, transposed=True), (img,)),
        "grouped_conv_transpose": (ConvChain(2, groups=2, transposed=True), (img,)),
        "depthwise": (Depthwise(), (img,)),
        "flatten_linear": (FlattenLinear(), (img,)),
        "concat_split": (ConcatSplit(), (img,)),
        "chunk_glu": (ChunkGLU(), (torch.randn(2, 5, 16),)),
        "pixel_shuffle": (PixelShuffleNet(), (img,)),
        "channel_shuffle": (ChannelShuffleNet(), (img,)),
        "group_norm": (GroupNormNet(), (img,)),
        "shared_module": (SharedModule(), (torch.randn(2, 8),)),
        "tied_embedding": (TiedEmbedding(), (torch.randint(0, 50, (2, 6)),)),
        "gqa_sdpa": (GQAAttention(), (torch.randn(2, 5, 32),)),
        "einsum_attention": (EinsumAttention(), (torch.randn(2, 5, 24),)),
        "repeat_interleave_kv": (RepeatInterleaveKV(), (torch.randn(2, 5, 16),)),
        "pool_interpolate": (PoolInterpolate(), (img,)),
        "unsupported": (Unsupported(), (torch.randn(2, 8),)),
        "stack_repeat_bmm": (StackRepeatBmm(), (torch.randn(2, 8),)),
    }
