"""2:4 sparsity on a real pretrained model (all-MiniLM-L6-v2): quality and time per method.

Calibration on one set of English sentences, evaluation on a disjoint set.  Prints, per
method (alone, with channel permutations, and with ``refine=True``): mean cosine between dense and
sparse mean-pooled sentence embeddings, nearest-neighbour agreement, largest change of a pairwise
similarity, and the pass time.

    python -m bench.nm_quality
"""

from __future__ import annotations

import time

import graphprune as gp
from bench.minilm_quality import HELD_OUT
from graphprune.frontends.torch.masks import masked_weights
from graphprune.passes import NMSparsity
from samples.minilm import SENTENCES, build, embed, tokenize

MORE_CALIBRATION = [
    "The train to the airport leaves every ten minutes.",
    "She finished reading the novel last night.",
    "Our team shipped the new release on Friday.",
    "The soup needs a little more salt.",
    "Heavy snow closed the mountain pass.",
    "He is learning to play the violin.",
    "The museum opens at nine in the morning.",
    "Prices for fresh fruit went up this week.",
]


def main() -> None:
    model, _ = build()
    calibration = [tokenize(SENTENCES), tokenize(MORE_CALIBRATION)]
    held = tokenize(HELD_OUT)
    dense = embed(model, held)
    neighbours = (dense @ dense.T).fill_diagonal_(-1).argmax(1)
    print(
        f"{'method':<12}{'permute':>8}{'refine':>7}{'pattern':>8}{'layers':>8}{'cosine':>9}{'NN agree':>10}"
        f"{'max sim err':>13}{'seconds':>9}"
    )
    settings = (((2, 4), False, False), ((2, 4), True, False), ((4, 8), False, False))
    settings += (((2, 4), False, True), ((4, 8), False, True))
    for (n, m), permute, refine in settings:
        for method in ("magnitude", "wanda", "sparsegpt"):
            start = time.perf_counter()
            result = gp.prune(
                model,
                calibration[0],
                passes=[NMSparsity(n, m, method=method, permute=permute, refine=refine)],
                calibration=calibration,
            )
            seconds = time.perf_counter() - start
            sparse = embed(result.module, held)
            agree = int(((sparse @ sparse.T).fill_diagonal_(-1).argmax(1) == neighbours).sum())
            err = (sparse @ sparse.T - dense @ dense.T).abs().max().item()
            cos = (sparse * dense).sum(-1).mean().item()
            layers = len(masked_weights(result.module))
            print(
                f"{method:<12}{'yes' if permute else 'no':>8}{'yes' if refine else 'no':>7}{f'{n}:{m}':>8}{layers:>8}"
                f"{cos:>9.3f}{f'{agree}/{len(HELD_OUT)}':>10}{err:>13.3f}{seconds:>9.2f}"
            )
            if permute:
                print("    " + result.report.rows[0].details["permutations"][:160])
            if refine:
                print("    " + result.report.rows[0].details["refinement"])


if __name__ == "__main__":
    main()
