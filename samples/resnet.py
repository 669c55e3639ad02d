"""A ResNet-18-style CNN (basic blocks, projection shortcuts, BatchNorm): pruned at 50%, then
channels + 2:4 + int8 emitted as a verified ONNX file."""

from __future__ import annotations

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), blocks: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if (b == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return ResNet().eval(), (torch.randn(2, 3, 32, 32),)


def main(folder: str = "graphprune-samples") -> None:
    """Channel pruning at 50% (groups and report), then the whole pipeline: channels, 2:4 and int8,
    written as an ONNX file that onnxruntime verified, into ``folder`` in the working directory
    (created if needed; a file there that graphprune did not write is never replaced)."""
    import os

    import graphprune as gp
    from graphprune.passes import ChannelPrune, NMSparsity, Quantize
    from samples._run import run

    model, inputs = build()
    run(model, inputs)
    calibration = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    result = gp.prune(
        model, inputs, calibration=calibration, passes=[ChannelPrune(0.5, round_to=8), NMSparsity(2, 4), Quantize()]
    )
    print()
    print(result.report)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "resnet_int8.onnx")
    print(result.export_onnx(path))
    print(f"\nwritten: {os.path.abspath(path)} (open it in onnxruntime or Netron)")


if __name__ == "__main__":
    main()
