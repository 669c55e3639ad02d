"""Random networks composed from the building blocks graphprune must understand (hypothesis strategy)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

WIDTHS = [4, 6, 8, 12, 16]


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "identity": nn.Identity}


def draw_block(draw, kind: str, c: int) -> dict:
    """The spec of one block of ``kind`` reading ``c`` channels: its kind and the sizes it needs."""
    divisors = lambda options, *sizes: [g for g in options if all(n % g == 0 for n in sizes)]  # noqa: E731
    if kind == "conv":
        c_out = draw(st.sampled_from(WIDTHS))
        return {
            "kind": kind,
            "c_out": c_out,
            "groups": draw(st.sampled_from(divisors((1, 2, 4), c, c_out))),
            "kernel": draw(st.sampled_from([1, 3])),
            "norm": draw(st.booleans()),
            "act": draw(st.sampled_from(sorted(ACTIVATIONS))),
        }
    if kind == "residual":
        return {"kind": kind, "hidden": draw(st.sampled_from(WIDTHS))}
    if kind == "dense":
        return {"kind": kind, "grow": draw(st.sampled_from([2, 4]))}
    if kind == "split":
        return {"kind": kind, "first": draw(st.integers(1, c - 1))}
    if kind == "glu":
        return {"kind": kind if c % 2 == 0 else "identity"}
    if kind == "depthwise":
        return {"kind": kind, "mult": draw(st.sampled_from([1, 2]))}
    if kind == "shuffle":
        return {"kind": kind, "groups": draw(st.sampled_from(divisors((2, 3, 4), c) or [1]))}
    if kind == "groupnorm":
        return {"kind": kind, "groups": draw(st.sampled_from(divisors((1, 2, 4), c)))}
    if kind == "attention":
        heads = draw(st.sampled_from([2, 4]))
        return {
            "kind": kind,
            "heads": heads,
            "kv_heads": draw(st.sampled_from([h for h in (1, 2, heads) if heads % h == 0])),
            "head_dim": draw(st.sampled_from([2, 4])),
        }
    if kind == "head_scale":
        return {"kind": kind, "heads": draw(st.sampled_from(divisors((1, 2, 4), c)))}
    if kind == "token_attention":
        return {
            "kind": kind,
            "heads": draw(st.sampled_from(divisors((1, 2, 4), c))),
            "shape_scale": draw(st.booleans()),
        }
    if kind == "transposed":
        c_out = draw(st.sampled_from(WIDTHS))
        return {"kind": kind, "c_out": c_out, "groups": draw(st.sampled_from(divisors((1, 2), c, c_out)))}
    return {"kind": kind}  # pixel, se, dilated, gate, channels_last, tied, strided, rows, ramp, index_mask: no sizes


def out_channels(spec: dict, c: int) -> int:
    """The channels a block of ``spec`` hands on, reading ``c``."""
    kind = spec["kind"]
    return {
        "conv": spec.get("c_out"),
        "transposed": spec.get("c_out"),
        "dense": c + spec.get("grow", 0),
        "glu": c // 2,
        "depthwise": c * spec.get("mult", 1),
    }.get(kind) or c


class Block(nn.Module):
    """One block built from its spec (:func:`draw_block`); ``kind`` picks the forward."""

    def __init__(self, spec: dict, c: int) -> None:
        super().__init__()
        kind = self.kind = spec["kind"]
        self.c_out = out_channels(spec, c)
        if kind == "conv":
            self.conv = nn.Conv2d(c, self.c_out, spec["kernel"], padding="same", groups=spec["groups"])
            self.norm = nn.BatchNorm2d(self.c_out) if spec["norm"] else nn.Identity()
            self.act = ACTIVATIONS[spec["act"]]()
        elif kind == "residual":
            self.a, self.b = nn.Conv2d(c, spec["hidden"], 1), nn.Conv2d(spec["hidden"], c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)
        elif kind == "dense":
            self.conv = nn.Conv2d(c, spec["grow"], 3, padding=1)
        elif kind == "split":
            self.first = spec["first"]
            self.conv = nn.Conv2d(self.first, self.first, 1)
        elif kind == "depthwise":
            self.conv = nn.Conv2d(c, c * spec["mult"], 3, padding=1, groups=c)
        elif kind == "shuffle":
            self.groups = spec["groups"]
        elif kind == "pixel":
            self.conv = nn.Conv2d(c, c * 4, 1)
        elif kind == "se":
            self.fc1, self.fc2 = nn.Linear(c, max(2, c // 2)), nn.Linear(max(2, c // 2), c)
        elif kind == "groupnorm":
            self.norm = nn.GroupNorm(spec["groups"], c)
        elif kind == "attention":
            self.heads, self.kv_heads, self.head_dim = spec["heads"], spec["kv_heads"], spec["head_dim"]
            self.q = nn.Linear(c, self.heads * self.head_dim)
            self.kv = nn.Linear(c, 2 * self.kv_heads * self.head_dim)
            self.o = nn.Linear(self.heads * self.head_dim, c)
            self.norm = nn.LayerNorm(c)
        elif kind == "transposed":
            self.conv = nn.ConvTranspose2d(c, self.c_out, 3, padding=1, groups=spec["groups"])
        elif kind == "dilated":
            self.conv = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        elif kind == "gate":  # x * sigmoid(conv(x)): a multiply of two activations of one space
            self.conv = nn.Conv2d(c, c, 1)
        elif kind == "channels_last":  # ConvNeXt's permute -> LayerNorm -> Linear -> permute back
            self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)
        elif kind == "tied":  # one module called twice: its weight couples both uses
            self.conv = nn.Conv2d(c, c, 3, padding=1)
        elif kind == "strided":  # stride 2 down, nearest-neighbour up: same size out
            self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)
        elif kind == "rows":  # split the rows, convolve the top half, concatenate the rows back
            self.conv = nn.Conv2d(c, c, 1)
        elif kind in ("index_mask", "head_scale"):  # sizes held in attributes, read by arange
            self.c, self.heads = c, spec.get("heads", 1)
        elif kind == "token_attention":  # timm's ViT attention: sizes read from the token tensor
            self.heads, self.shape_scale = spec["heads"], spec["shape_scale"]
            self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        elif kind not in ("glu", "identity", "ramp"):
            raise ValueError(f"unknown block kind {kind!r}")

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
        if k == "strided":
            return F.interpolate(F.relu(self.conv(x)), scale_factor=2.0, mode="nearest")
        if k == "rows":
            top, bottom = x.split(x.shape[2] // 2, dim=2)
            return torch.cat([self.conv(top), bottom], dim=2)
        if k == "ramp":  # a per-channel ramp sized by a shape read: values depend on the position
            return x * torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
        if k == "index_mask":  # an index mask over an attribute-held channel count
            return torch.where((torch.arange(self.c) % 3 == 0).view(1, -1, 1, 1), x, -2 * x)
        if k == "token_attention":  # B, N, C = t.shape; heads of C // self.heads; a scale from the shape or not
            n, c, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)
            B, N, C = t.shape
            qkv = self.qkv(t).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            q, k_, v = qkv.unbind(0)
            scale = (C // self.heads) ** -0.5 if self.shape_scale else 0.5
            y = F.scaled_dot_product_attention(q, k_, v, scale=scale).transpose(1, 2).reshape(B, N, C)
            return (t + self.proj(y)).transpose(1, 2).reshape(n, c, h, w)
        if k == "head_scale":  # per-head constants (ALiBi-like slopes) over channels split into heads
            n, c, h, w = x.shape
            slopes = (0.5 ** torch.arange(self.heads, dtype=x.dtype)).view(1, self.heads, 1, 1, 1)
            return (x.view(n, self.heads, c // self.heads, h, w) * slopes).reshape(n, c, h, w)
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


KINDS = [
    "conv",
    "residual",
    "dense",
    "split",
    "glu",
    "depthwise",
    "shuffle",
    "pixel",
    "se",
    "groupnorm",
    "attention",
    "transposed",
    "dilated",
    "gate",
    "channels_last",
    "tied",
    "strided",
    "rows",
    "ramp",
    "index_mask",
    "head_scale",
    "token_attention",
]


@st.composite
def network_specs(draw) -> dict:
    """A network as plain data (JSON-able): the seed of its weights, the stem width, the blocks."""
    seed, c, blocks = draw(st.integers(0, 2**16)), draw(st.sampled_from(WIDTHS)), []
    stem = c
    for _ in range(draw(st.integers(1, 5))):
        blocks.append(draw_block(draw, draw(st.sampled_from(KINDS)), c))
        c = out_channels(blocks[-1], c)
    return {"seed": seed, "stem": stem, "flatten_head": draw(st.booleans()), "blocks": blocks}


def build(spec: dict) -> Generated:
    """The network of ``spec``, with the same weights every time."""
    torch.manual_seed(spec["seed"])
    blocks, c = [], spec["stem"]
    for block_spec in spec["blocks"]:
        blocks.append(Block(block_spec, c))
        c = blocks[-1].c_out
    model = Generated(spec["stem"], blocks, spec["flatten_head"]).eval()
    with torch.no_grad():  # non-trivial norm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


REGRESSIONS = Path(__file__).parent / "regressions"


@contextmanager
def kept_if_failing(spec: dict, test: str) -> Iterator[None]:
    """Run an oracle on ``spec``; if it fails, write the spec to ``tests/regressions/<test>.json``,
    where ``test_saved_regressions`` replays it from then on.  Hypothesis shrinks a failure and
    replays the minimal example last, so the file ends up holding the minimal network."""
    try:
        yield
    except Exception as failure:
        REGRESSIONS.mkdir(exist_ok=True)
        path = REGRESSIONS / f"{test}.json"
        path.write_text(json.dumps(spec, indent=1) + "\n")
        failure.add_note(f"the failing network's spec is saved as {path}: commit it (renamed) as a regression test")
        raise
