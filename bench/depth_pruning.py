"""Depth pruning (BlockPrune) against width pruning, before and after distillation.

Two models, one run, every row against the dense model on held-out text:

* all-MiniLM-L6-v2 (real weights, 6 blocks), calibrated on sentences from the Python standard
  library's docstrings, evaluated on other such sentences: mean cosine of the pooled embeddings to
  the dense model's;
* a LLaMA-shaped byte-level causal LM (6 blocks) trained here on those docstrings
  (:func:`bench.nm_recovery.byte_lm`), evaluated by perplexity on held-out docstrings.

Rows: 1 and 2 blocks removed by each criterion (2 also ``iterative=True``: one at a time, scored
again) (``"cosine"``: Minitron's block importance;
``"output"``: the output change when the block alone is bypassed; a callable: the model's own loss
on the calibration data with the block bypassed, perplexity for the LM, one minus the embedding
cosine for MiniLM); width pruning (``ChannelPrune(target_params=...)``, activation importance) to
the parameter count of the 2-block removal; then each of the two after a short distillation from the
dense model (the LM: ``graphprune.train.distill.Distillation``, Minitron's forward KL on the logits;
MiniLM: cosine to the dense embeddings, as sentence-embedding models are distilled).

    python -m bench.depth_pruning [--quick]
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable

import torch

import graphprune as gp
from bench.nm_recovery import MiniLMData, byte_lm, cosine, docstrings
from graphprune.passes import BlockPrune, ChannelPrune
from graphprune.train.distill import Distillation
from samples.minilm import embed, pool

CRITERIA = ("cosine", "output", "loss")


def row(label: str, quality: float, unit: str, params: int, dense: int, seconds: float) -> None:
    print(f"  {label:<44}{quality:>10.3f} {unit:<7}{params / 1e6:>8.2f}M {params / dense:>6.1%}{seconds:>9.1f}")


def header() -> None:
    print(f"  {'pipeline':<44}{'held-out':>10} {'':<7}{'params':>9} {'share':>6}{'seconds':>9}")


def params_of(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def compare(
    model: torch.nn.Module,
    example: object,
    calibration: list,
    quality: Callable[[torch.nn.Module], float],
    loss: Callable[[torch.nn.Module], float],
    unit: str,
    distil: Callable[[torch.nn.Module], torch.nn.Module],
    steps: int,
) -> None:
    """The rows of one model: every criterion at 1 and 2 blocks, width at the 2-block size, and both
    distilled."""
    dense = params_of(model)
    header()
    row("dense", quality(model), unit, dense, dense, 0.0)
    best: tuple[float, gp.PruneResult, str] | None = None
    for n, iterative in ((1, False), (2, False), (2, True)):
        for criterion in CRITERIA:
            importance = loss if criterion == "loss" else criterion
            start = time.perf_counter()
            pass_ = BlockPrune(n=n, importance=importance, iterative=iterative)
            result = gp.prune(model, example, [pass_], calibration=calibration)
            seconds = time.perf_counter() - start
            score = quality(result.module)
            names = result.report.rows[0].details["removed"].split(" (")[0].split(", ")
            where = names[0].rsplit(".", 1)[0] + ".{" + ",".join(name.rsplit(".", 1)[1] for name in names) + "}"
            label = f"{n} block{'s' if n > 1 else ''}, {criterion}{', iterative' if iterative else ''} ({where})"
            row(label, score, unit, params_of(result.module), dense, seconds)
            better = score > best[0] if best and unit == "cosine" else (best is None or score < best[0])
            if n == 2 and better:
                best = (score, result, criterion)
    assert best is not None
    target = params_of(best[1].module) / dense
    start = time.perf_counter()
    width = gp.prune(
        model, example, [ChannelPrune(target_params=target, importance="activation")], calibration=calibration
    )
    seconds = time.perf_counter() - start
    row(
        f"width to the same size (target_params={target:.3f})",
        quality(width.module),
        unit,
        params_of(width.module),
        dense,
        seconds,
    )
    for label, pruned in ((f"2 blocks ({best[2]})", best[1].module), ("width", width.module)):
        start = time.perf_counter()
        tuned = distil(copy.deepcopy(pruned))
        row(
            f"{label} + distillation, {steps} steps",
            quality(tuned),
            unit,
            params_of(tuned),
            dense,
            time.perf_counter() - start,
        )


def causal_lm(texts: list[str], quick: bool) -> None:
    lm = byte_lm(texts, quick, layers=6)
    model, calibration = lm.model, lm.calibration
    steps, length = (20 if quick else 150), 128
    print(
        f"\nLLaMA-shaped causal LM, 6 blocks, {params_of(model) / 1e6:.1f}M parameters, byte-level, trained "
        f"{lm.steps} steps in {lm.seconds:.0f} s; {len(calibration) * 16} x {length}-byte calibration windows, "
        f"{len(lm.windows)} held-out windows"
    )

    def loss(m: torch.nn.Module) -> float:  # the calibration perplexity: Minitron's drop-one-block criterion
        with torch.no_grad():
            values = [m(**b, labels=b["input_ids"]).loss.item() for b in calibration]
        return math.exp(sum(values) / len(values))

    def distil(student: torch.nn.Module) -> torch.nn.Module:
        distillation = Distillation(model, outputs=lambda m, batch: m(input_ids=batch).logits)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=5e-4)
        generator = torch.Generator().manual_seed(1)
        student.train()
        for step in range(steps):
            starts = torch.randint(0, len(lm.train) - length - 1, (16,), generator=generator)
            batch = torch.stack([lm.train[s : s + length] for s in starts])
            distillation.loss(student, batch, step).backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        return student.eval()

    compare(model, calibration[0], calibration, lm.perplexity, loss, "ppl", distil, steps)


def minilm(texts: list[str], quick: bool) -> None:
    data = MiniLMData.of(texts, quick)
    model, calibration, held, train = data.model, data.calibration, data.held, data.train
    dense_held = [embed(model, b) for b in held]
    dense_calibration = [embed(model, b) for b in calibration]
    targets = [embed(model, b) for b in train]
    steps = 20 if quick else 100

    def loss(m: torch.nn.Module) -> float:  # one minus the calibration cosine to the dense embeddings
        return 1 - cosine(m, calibration, dense_calibration)

    def distil(student: torch.nn.Module) -> torch.nn.Module:
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-5)
        student.train()
        for step in range(steps):
            batch = train[step % len(train)]
            out = pool(student(**batch).last_hidden_state, batch)
            (1 - (out * targets[step % len(train)]).sum(-1).mean()).backward()
            optimizer.step()
            optimizer.zero_grad()
        return student.eval()

    print(
        "all-MiniLM-L6-v2, 6 blocks: {} calibration sentences, {} held out, {} for distillation "
        "(standard-library docstrings)".format(*data.sentence_counts())
    )
    compare(model, calibration[0], calibration, lambda m: cosine(m, held, dense_held), loss, "cosine", distil, steps)


def main(quick: bool = False) -> None:
    texts = docstrings()
    minilm(texts, quick)
    causal_lm(texts, quick)


if __name__ == "__main__":
    main("--quick" in sys.argv)
