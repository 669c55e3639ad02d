"""Random networks composed from the building blocks graphprune must understand (hypothesis strategy)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

WIDTHS = [4, 6, 8, 12, 16]


class Block(nn.Module):
    """One randomly chosen block; ``kind`` picks the forward."""

    def __init__(self, kind: str, c: int, draw) -> None:
        super().__init__()
        self.kind = kind
        self.c_out = c
        if kind == "conv":
            self.c_out = draw(st.sampled_from(WIDTHS))
            groups = draw(st.sampled_from([g for g in (1, 2, 4) if c % g == 0 and self.c_out % g == 0]))
            self.conv = nn.Conv2d(c, self.c_out, draw(st.sampled_from([1, 3])), padding="same", groups=groups)
            self.norm = nn.BatchNorm2d(self.c_out) if draw(st.booleans()) else nn.Identity()
            self.act = draw(st.sampled_from([nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.Identity()]))
        elif kind == "residual":
            hidden = draw(st.sampled_from(WIDTHS))
            self.a, self.b = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)
        elif kind == "dense":
            grow = draw(st.sampled_from([2, 4]))
            self.conv = nn.Conv2d(c, grow, 3, padding=1)
            self.c_out = c + grow
        elif kind == "split":
            self.first = draw(st.integers(1, c - 1))
            self.conv = nn.Conv2d(self.first, self.first, 1)
        elif kind == "glu" and c % 2 == 0:
            self.c_out = c // 2
        elif kind == "depthwise":
            mult = draw(st.sampled_from([1, 2]))
            self.conv = nn.Conv2d(c, c * mult, 3, padding=1, groups=c)
            self.c_out = c * mult
        elif kind == "shuffle":
            self.groups = draw(st.sampled_from([g for g in (2, 3, 4) if c % g == 0] or [1]))
        elif kind == "pixel":
            self.conv = nn.Conv2d(c, c * 4, 1)
        elif kind == "se":
            self.fc1, self.fc2 = nn.Linear(c, max(2, c // 2)), nn.Linear(max(2, c // 2), c)
        elif kind == "groupnorm":
            self.norm = nn.GroupNorm(draw(st.sampled_from([g for g in (1, 2, 4) if c % g == 0])), c)
        elif kind == "attention":
            self.heads = draw(st.sampled_from([2, 4]))
            self.kv_heads = draw(st.sampled_from([h for h in (1, 2, self.heads) if self.heads % h == 0]))
            self.head_dim = draw(st.sampled_from([2, 4]))
            self.q = nn.Linear(c, self.heads * self.head_dim)
            self.kv = nn.Linear(c, 2 * self.kv_heads * self.head_dim)
            self.o = nn.Linear(self.heads * self.head_dim, c)
            self.norm = nn.LayerNorm(c)
        elif kind == "transposed":
            self.c_out = draw(st.sampled_from(WIDTHS))
            groups = draw(st.sampled_from([g for g in (1, 2) if c % g == 0 and self.c_out % g == 0]))
            self.conv = nn.ConvTranspose2d(c, self.c_out, 3, padding=1, groups=groups)
        elif kind == "dilated":
            self.conv = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        elif kind == "gate":  # x * sigmoid(conv(x)): a multiply of two activations of one space
            self.conv = nn.Conv2d(c, c, 1)
        elif kind == "channels_last":  # ConvNeXt's permute -> LayerNorm -> Linear -> permute back
            self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)
        elif kind == "tied":  # one module called twice: its weight couples both uses
            self.conv = nn.Conv2d(c, c, 3, padding=1)
        else:
            self.kind = "identity"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == "conv":
            return self.act(self.norm(self.conv(x)))
        if k == "residual":
            return F.relu(x + self.bn(self.b(F.relu(self.a(x)))))
        if k == "dense":
            return torch.cat([x, self.conv(x)], dim=1)
        if k == "split":
            a, b = x.split([self.first, x.shape[1] - self.first], dim=1)
            return torch.cat([b, self.conv(a)], dim=1)
        if k == "glu":
            a, b = x.chunk(2, dim=1)
            return a * torch.sigmoid(b)
        if k == "depthwise":
            return self.conv(x)
        if k == "shuffle":
            n, c, h, w = x.shape
            return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        if k == "pixel":
            return F.avg_pool2d(F.pixel_shuffle(self.conv(x), 2), 2)
        if k == "se":
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
            return x * s[:, :, None, None]
        if k == "groupnorm":
            return self.norm(x)
        if k == "attention":
            n, c, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)
            y = self.norm(t)
            q = self.q(y).view(n, h * w, self.heads, self.head_dim).transpose(1, 2)
            k_, v = self.kv(y).view(n, h * w, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
            a = F.scaled_dot_product_attention(q, k_, v, scale=0.5, enable_gqa=True)
            t = t + self.o(a.transpose(1, 2).reshape(n, h * w, self.heads * self.head_dim))
            return t.transpose(1, 2).reshape(n, c, h, w)
        if k in ("transposed", "dilated"):
            return F.relu(self.conv(x))
        if k == "gate":
            return x * torch.sigmoid(self.conv(x))
        if k == "channels_last":
            return x + self.fc(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if k == "tied":
            return self.conv(F.relu(self.conv(x)))
        return x


class Generated(nn.Module):
    def __init__(self, stem: int, blocks: list[Block], flatten_head: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        self.blocks = nn.ModuleList(blocks)
        c = blocks[-1].c_out if blocks else stem
        self.flatten_head = flatten_head
        self.head = nn.Linear(c * 16 if flatten_head else c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(torch.flatten(x, 1) if self.flatten_head else x.mean((2, 3)))


KINDS = ["conv", "residual", "dense", "split", "glu", "depthwise", "shuffle", "pixel", "se", "groupnorm", "attention",
         "transposed", "dilated", "gate", "channels_last", "tied"]


@st.composite
def networks(draw) -> Generated:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    c = draw(st.sampled_from(WIDTHS))
    stem = c
    blocks = []
    for _ in range(draw(st.integers(1, 5))):
        block = Block(draw(st.sampled_from(KINDS)), c, draw)
        blocks.append(block)
        c = block.c_out
    model = Generated(stem, blocks, draw(st.booleans())).eval()
    with torch.no_grad():  # non-trivial norm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model
