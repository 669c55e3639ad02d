"""Learned 2:4 masks (frozen weights, distillation) against one-shot criteria on all-MiniLM-L6-v2.

Masks start from each prior (magnitude, Wanda, SparseGPT's mask choice) with the dense weights
underneath and are learned for ``steps`` Adam steps on 64 training sentences to match the dense
model's mean-pooled embeddings (cosine distillation); evaluation is the mean cosine to the dense
embeddings on held-out sentences, next to the one-shot methods (SparseGPT also updates weights).
Two more rows (Wanda prior) guard against overfitting the few sentences: early stopping, which
trains on 48 sentences and reports the cosine on the other 16 to ``LearnedMasks.observe`` every 10
steps (``finalize`` keeps the best masks), and MaskLLM's weight regularisation
(``weight_regularization=0.5``) on all 64.

    python -m bench.learned_masks [steps]
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

import graphprune as gp
from bench.minilm_quality import HELD_OUT
from bench.nm_quality import MORE_CALIBRATION
from bench.sparsity_quantization_order import HARD_NEGATIVES, PARAPHRASES
from graphprune.passes import NMSparsity
from graphprune.train import LearnedMasks
from samples.minilm import SENTENCES, build, embed, pool, tokenize

TRAIN = SENTENCES + MORE_CALIBRATION + [s for pair in PARAPHRASES for s in pair] + HARD_NEGATIVES


def main(steps: int = 200) -> None:
    model, _ = build()
    batches = [tokenize(TRAIN[i : i + 16]) for i in range(0, len(TRAIN), 16)]
    calibration = batches[:2]
    held = tokenize(HELD_OUT)
    dense_held = embed(model, held)
    targets = [embed(model, b) for b in batches]

    def cosine(m: torch.nn.Module) -> float:
        return (embed(m.eval(), held) * dense_held).sum(-1).mean().item()

    def train_cosine(m: torch.nn.Module) -> float:
        return sum((embed(m.eval(), b) * t).sum(-1).mean().item() for b, t in zip(batches, targets)) / len(batches)

    print(f"all-MiniLM-L6-v2, 2:4 on the 36 encoder linears; {len(TRAIN)} training sentences, {len(HELD_OUT)} held out")
    print(f"{'method':<28}{'held-out cosine':>16}{'train cosine':>14}{'seconds':>9}")
    for method in ("magnitude", "wanda", "sparsegpt"):
        start = time.perf_counter()
        result = gp.prune(model, calibration[0], passes=[NMSparsity(2, 4, method=method)], calibration=calibration)
        seconds = time.perf_counter() - start
        print(
            f"{'one-shot ' + method:<28}{cosine(result.module):>16.3f}{train_cosine(result.module):>14.3f}"
            f"{seconds:>9.1f}"
        )
    for prior in ("magnitude", "wanda", "sparsegpt"):
        start = time.perf_counter()
        sparse = gp.prune(
            model, calibration[0], passes=[NMSparsity(2, 4, method="learned", prior=prior)], calibration=calibration
        ).module
        final = learn(sparse, batches, targets, steps)
        seconds = time.perf_counter() - start
        print(f"{'learned, ' + prior + ' prior':<28}{cosine(final):>16.3f}{train_cosine(final):>14.3f}{seconds:>9.1f}")
    for label, options in (("+ early stop (48/16)", {"validation": 1}), ("+ weight reg. 0.5", {"regularization": 0.5})):
        start = time.perf_counter()
        sparse = gp.prune(
            model, calibration[0], passes=[NMSparsity(2, 4, method="learned", prior="wanda")], calibration=calibration
        ).module
        final = learn(sparse, batches, targets, steps, **options)
        seconds = time.perf_counter() - start
        print(f"{'learned, wanda ' + label:<28}{cosine(final):>16.3f}{train_cosine(final):>14.3f}{seconds:>9.1f}")


def learn(
    sparse: torch.nn.Module,
    batches: list,
    targets: list,
    steps: int,
    validation: int = 0,
    regularization: float = 0.0,
    **schedule: Any,
) -> torch.nn.Module:
    """Cosine distillation of the masks of ``sparse`` on ``batches`` (the last ``validation`` of
    them held out and observed every 10 steps instead of trained on); ``schedule``: more
    :class:`~graphprune.train.LearnedMasks` options (``temperature``, ``prior_strength``, ...)."""
    trainer = LearnedMasks(sparse, steps=steps, weight_regularization=regularization, **schedule)
    optimizer = torch.optim.Adam(trainer.parameters(), lr=0.05)
    train = len(batches) - validation
    torch.manual_seed(0)
    for step in range(steps):
        sparse.train()
        i = step % train
        out = pool(sparse(**batches[i]).last_hidden_state, batches[i])
        loss = 1 - (out * targets[i]).sum(-1).mean() + trainer.regularization()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.step()
        if validation and (step + 1) % 10 == 0:
            score = (
                sum(
                    (embed(sparse.eval(), b) * t).sum(-1).mean().item()
                    for b, t in zip(batches[train:], targets[train:])
                )
                / validation
            )
            trainer.observe(score)
    return trainer.finalize()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
