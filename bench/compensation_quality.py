"""Structured pruning without retraining: criteria x compensation, on real data and real weights.

1. A residual CNN trained here on scikit-learn's digits (1,200 train / 597 test), 30/50/70% of the
   channels removed with each criterion and compensation, test accuracy with no fine-tuning and
   after one short fine-tuning epoch; then MACs budgets (70/50/30% kept) with each allocation.
2. The pretrained all-MiniLM-L6-v2: 25% / 50% of MLP channels and heads, mean cosine between
   dense and pruned sentence embeddings on held-out sentences.

    python -m bench.compensation_quality        (needs pip install -e ".[bench]")
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

import graphprune as gp
from bench.digits import fit, split
from graphprune.passes import ChannelPrune

CRITERIA = ("l2", "activation", "fluctuation")
COMPENSATIONS = (None, "bias+batchnorm", "reconstruct", "reconstruct+batchnorm")


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block1 = Block(32)
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.block2 = Block(64)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.down(self.block1(self.stem(x)))))


def digits_rows() -> None:
    train_x, train_y, test_x, test_y = split()
    torch.manual_seed(0)
    model = fit(ResidualNet(), train_x, train_y, epochs=12, lr=3e-3)
    calibration = list(train_x[:512].split(128))

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(test_x).argmax(1) == test_y).float().mean().item()

    print(f"ResidualNet on digits: dense test accuracy {accuracy(model):.3f} (no fine-tuning / after 1 epoch)")
    print(f"{'criterion':<12}{'compensation':<24}" + "".join(f"{f'{r:.0%} removed':>20}" for r in (0.3, 0.5, 0.7)))
    for criterion in CRITERIA:
        for compensate in COMPENSATIONS:
            cells = []
            for ratio in (0.3, 0.5, 0.7):
                result = gp.prune(
                    model,
                    train_x[:64],
                    calibration=calibration,
                    passes=[ChannelPrune(ratio, importance=criterion, compensate=compensate)],
                )
                before = accuracy(result.module)
                tuned = fit(result.module, train_x, train_y, epochs=1, lr=1e-3)
                cells.append(f"{before:.3f} / {accuracy(tuned):.3f}")
            print(f"{criterion:<12}{str(compensate):<24}" + "".join(f"{c:>20}" for c in cells))
    print("\nallocation under a MACs budget (activation importance; accuracy without fine-tuning)")
    print(
        f"{'target MACs':<13}{'allocation':<13}"
        + "".join(f"{str(c):>24}" for c in COMPENSATIONS[:3])
        + f"{'MACs kept':>11}"
    )
    for target in (0.7, 0.5, 0.3):
        for allocation in ("uniform", "global", "sensitivity"):
            cells = []
            for compensate in COMPENSATIONS[:3]:
                result = gp.prune(
                    model,
                    train_x[:64],
                    calibration=calibration,
                    passes=[
                        ChannelPrune(
                            target_macs=target, allocation=allocation, importance="activation", compensate=compensate
                        )
                    ],
                )
                cells.append(accuracy(result.module))
            kept = result.report.macs_after / result.report.macs
            print(f"{target:<13}{allocation:<13}" + "".join(f"{c:>24.3f}" for c in cells) + f"{kept:>11.3f}")


def minilm_rows() -> None:
    from bench.minilm_quality import HELD_OUT
    from bench.nm_quality import MORE_CALIBRATION
    from samples.minilm import SENTENCES, build, embed, tokenize

    model, _ = build()
    calibration = [tokenize(SENTENCES), tokenize(MORE_CALIBRATION)]
    held = tokenize(HELD_OUT)
    dense = embed(model, held)
    print("\nall-MiniLM-L6-v2, activation importance, heads and MLP channels: mean cosine to dense (held out)")
    print(f"{'compensation':<24}{'25% removed':>14}{'50% removed':>14}{'seconds':>9}  notes")
    for compensate in (None, "bias", "reconstruct"):
        cells, notes, start = [], set(), time.perf_counter()
        for ratio in (0.25, 0.5):
            result = gp.prune(
                model,
                calibration[0],
                calibration=calibration,
                passes=[ChannelPrune(ratio, importance="activation", compensate=compensate, round_to=8)],
            )
            cells.append((embed(result.module, held) * dense).sum(-1).mean().item())
            details = result.report.rows[0].details
            if "not reconstructed" in details:
                notes.add(
                    f"{len(details['not reconstructed'].split('; '))} layers not reconstructed at {ratio:.0%} "
                    f"(e.g. {details['not reconstructed'].split('; ')[0].split(': ', 1)[1][:60]})"
                )
        print(
            f"{str(compensate):<24}{cells[0]:>14.3f}{cells[1]:>14.3f}{time.perf_counter() - start:>9.1f}  "
            + "; ".join(sorted(notes))
        )


if __name__ == "__main__":
    digits_rows()
    minilm_rows()
