"""Sparsity then quantization, or the other way round? Both orders on two real models, three formats.

1. all-MiniLM-L6-v2 (pretrained, from PyPI): 2:4 on every encoder linear + int8, int4 or fp8.  Task metric:
   paraphrase retrieval on held-out sentence pairs (is each sentence's nearest neighbour its
   paraphrase?); output error: 1 - mean cosine between the compressed and dense embeddings.
2. A small CNN trained here on scikit-learn's digits: 50% of channels removed, 2:4, then int8, int4
   (its two linear layers, groups of 32: int4 leaves convolutions in float) or fp8.
   Task metric: test accuracy; output error: relative L2 error of the logits on the test set.
   Channel pruning runs first in both orders (after Quantize it is always refused: per-channel
   scales and calibrated ranges belong to the unpruned tensors), so the orders differ in where
   2:4 sits relative to int8.

Rows: dense, then per format (int8 static; int4 weights in groups of 128, round to nearest; fp8
E4M3 static) S only, Q only, S->Q, Q->S (run with ``experimental_order=True``), for the magnitude
and SparseGPT criteria, as Harma et al. compare the orders across number formats.  No fine-tuning.

    python -m bench.sparsity_quantization_order
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

import graphprune as gp
from bench.digits import fit, split
from graphprune.passes import ChannelPrune, NMSparsity, Quantize
from samples.minilm import SENTENCES, build, embed, tokenize

PARAPHRASES = [
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("He bought a new car yesterday.", "Yesterday he purchased a new automobile."),
    ("The stock market crashed this morning.", "Share prices collapsed early today."),
    ("She is cooking pasta for dinner.", "She is making spaghetti for the evening meal."),
    ("The flight was delayed by three hours.", "The plane left three hours late."),
    ("Our team won the championship.", "We took the league title."),
    ("It is raining heavily in the city.", "A downpour is soaking the town."),
    ("The doctor prescribed antibiotics.", "The physician gave her a course of antibiotics."),
    ("He forgot his keys at the office.", "He left his keys at work."),
    ("The river flooded the village.", "Water from the river swamped the town."),
    ("The children are playing football.", "Kids are kicking a ball around."),
    ("The new phone has a better camera.", "The latest handset takes sharper photos."),
    ("The company hired fifty engineers.", "The firm took on fifty new engineers."),
    ("The museum is closed on Mondays.", "On Mondays the gallery does not open."),
    ("The baby started crying at night.", "The infant woke up in tears during the night."),
    ("Prices of petrol went up again.", "Fuel costs rose once more."),
]
HARD_NEGATIVES = [  # share words with a pair but not its meaning: they make retrieval non-trivial
    "The cat is scratching the new sofa.",
    "He sold his old car yesterday.",
    "The stock market opened calmly.",
    "She is cleaning the kitchen after dinner.",
    "The flight was cancelled for three days.",
    "Our team lost the final badly.",
    "It is sunny in the city.",
    "The doctor refused to prescribe antibiotics.",
    "He found his keys at the office.",
    "The village is far from the river.",
    "The children are watching football.",
    "The new phone has a cracked screen.",
    "The company fired fifty engineers.",
    "The museum is busy on Mondays.",
    "The baby slept through the night.",
    "Prices of petrol fell again.",
]
CALIBRATION = SENTENCES + [
    "The train to the airport leaves every ten minutes.",
    "She finished reading the novel last night.",
    "Our team shipped the new release on Friday.",
    "The soup needs a little more salt.",
    "Heavy snow closed the mountain pass.",
    "He is learning to play the violin.",
    "The museum opens at nine in the morning.",
    "Prices for fresh fruit went up this week.",
]
METHODS = ("magnitude", "sparsegpt")


def formats(group_size: int) -> dict:
    """A fresh quantization pass for each run, by format (int4 with ``group_size``)."""
    return {
        "int8": lambda: Quantize("int8"),
        "int4": lambda: Quantize("int4", group_size=group_size),
        "fp8": lambda: Quantize("fp8"),
    }


def _orders(sparsity: list, quantize: gp.Pass) -> dict[str, tuple[list, bool]]:
    return {
        "S only": (sparsity, False),
        "Q only": ([quantize], False),
        "S->Q": (sparsity + [quantize], False),
        "Q->S": ([quantize] + sparsity, True),
    }


def minilm_rows() -> None:
    model, _ = build()
    calibration = [tokenize(CALIBRATION[:8]), tokenize(CALIBRATION[8:])]
    pairs = 2 * len(PARAPHRASES)
    held = tokenize([s for pair in PARAPHRASES for s in pair] + HARD_NEGATIVES)
    dense = embed(model, held)

    def metrics(emb: torch.Tensor) -> tuple[float, float]:
        nearest = (emb[:pairs] @ emb.T).fill_diagonal_(-2).argmax(1)
        partner = torch.arange(pairs) ^ 1  # the two sentences of a pair sit next to each other
        return (nearest == partner).float().mean().item(), 1 - (emb * dense).sum(-1).mean().item()

    print("all-MiniLM-L6-v2: 2:4 on encoder linears + int8 / int4 / fp8 (no fine-tuning)")
    print(f"{'format':<7}{'order':<10}{'criterion':<11}{'retrieval':>10}{'1-cos':>9}{'seconds':>9}")
    acc, err = metrics(dense)
    print(f"{'fp32':<7}{'dense':<10}{'-':<11}{acc:>10.3f}{err:>9.4f}{'-':>9}")
    for kind, quantize in formats(128).items():
        for method in METHODS:
            for order, (passes, experimental) in _orders([NMSparsity(2, 4, method=method)], quantize()).items():
                if (order == "Q only" and method != METHODS[0]) or (order == "S only" and kind != "int8"):
                    continue
                start = time.perf_counter()
                result = gp.prune(
                    model, calibration[0], passes=passes, calibration=calibration, experimental_order=experimental
                )
                acc, err = metrics(embed(result.module, held))
                label = "-" if order == "Q only" else method
                shown = "-" if order == "S only" else kind
                print(f"{shown:<7}{order:<10}{label:<11}{acc:>10.3f}{err:>9.4f}{time.perf_counter() - start:>9.1f}")


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train DigitsNet on 1,200 digits; returns (model, train images, test images, test labels)."""
    train_x, train_y, test_x, test_y = split()
    torch.manual_seed(0)
    return fit(DigitsNet(), train_x, train_y, epochs=15, lr=3e-3), train_x, test_x, test_y


def digits_rows() -> None:
    model, train, test, labels = digits()
    calibration = list(train[:512].split(128))
    with torch.no_grad():
        dense = model(test)

    def metrics(m: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            out = m(test)
        return (out.argmax(1) == labels).float().mean().item(), ((out - dense).norm() / dense.norm()).item()

    print(
        f"\nDigitsNet on scikit-learn digits ({len(test)} test images): 50% channels + 2:4 + int8 / int4 / fp8 "
        "(no fine-tuning)"
    )
    print(f"{'format':<7}{'order':<10}{'criterion':<11}{'accuracy':>10}{'logit err':>11}{'params':>9}")
    acc, err = metrics(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"{'fp32':<7}{'dense':<10}{'-':<11}{acc:>10.3f}{err:>11.4f}{params:>9}")
    for kind, quantize in formats(32).items():  # 64 inputs after 50% channels
        for method in METHODS:
            sparsity = [
                ChannelPrune(0.5, importance="activation", compensate="bias+batchnorm"),
                NMSparsity(2, 4, method=method),
            ]
            for order, (passes, experimental) in _orders(sparsity, quantize()).items():
                if (order == "Q only" and method != METHODS[0]) or (order == "S only" and kind != "int8"):
                    continue
                if order == "Q->S":  # channels first in both orders (see the module docstring)
                    passes = [sparsity[0], passes[0], sparsity[1]]
                result = gp.prune(
                    model, train[:64], passes=passes, calibration=calibration, experimental_order=experimental
                )
                acc, err = metrics(result.module)
                label = "-" if order == "Q only" else method
                shown = "-" if order == "S only" else kind
                print(f"{shown:<7}{order:<10}{label:<11}{acc:>10.3f}{err:>11.4f}{result.report.params_after:>9}")


def main() -> None:
    minilm_rows()
    digits_rows()


if __name__ == "__main__":
    main()
