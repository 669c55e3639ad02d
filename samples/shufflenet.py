"""A ShuffleNetV2-style network: channel split, two branches, concat, channel shuffle."""

from __future__ import annotations

import torch
import torch.nn as nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


def branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, stride, 1, groups=cout, bias=False),
        nn.BatchNorm2d(cout),
        nn.Conv2d(cout, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride == 1:
            self.right = branch(cin // 2, half, 1)
        else:
            self.left = nn.Sequential(
                nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(),
            )
            self.right = branch(cin, half, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat([left, self.right(right)], dim=1)
        else:
            out = torch.cat([self.left(x), self.right(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(
        self, widths: tuple[int, ...] = (48, 96, 192), repeats: tuple[int, ...] = (2, 3, 2), num_classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        units, cin = [], 24
        for w, n in zip(widths, repeats):
            for i in range(n):
                units.append(ShuffleUnit(cin, w, 2 if i == 0 else 1))
                cin = w
        self.units = nn.Sequential(*units)
        self.head = nn.Sequential(nn.Conv2d(cin, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU())
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.units(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return ShuffleNetV2().eval(), (torch.randn(2, 3, 32, 32),)


def main() -> None:
    from samples._run import run

    run(*build(), round_to=2)


if __name__ == "__main__":
    main()
