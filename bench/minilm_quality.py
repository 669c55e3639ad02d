"""Quality of channel pruning without retraining on a real pretrained model (all-MiniLM-L6-v2).

For each criterion and ratio: parameters kept, mean cosine between dense and pruned sentence
embeddings, and the worst change of any pairwise sentence similarity.  Calibration and
evaluation use different sentences.

    python -m bench.minilm_quality
"""

from __future__ import annotations

import graphprune as gp
from graphprune.passes import ChannelPrune
from samples.minilm import build, embed, pool, tokenize

HELD_OUT = [
    "A dog runs across the park.",
    "The concert was cancelled due to rain.",
    "A puppy is playing outside.",
    "Interest rates will rise next year.",
    "The band played until midnight.",
    "Central banks raised rates again.",
    "Children are building a sandcastle.",
    "Kids play on the beach.",
]


def main() -> None:
    model, calib = build()
    held = tokenize(HELD_OUT)
    dense = embed(model, held)
    target = embed(model, calib)

    def distill(outputs, batch):
        return -(pool(outputs.last_hidden_state, batch) * target).sum(-1).mean()

    print(f"{'criterion':<12}{'ratio':>6}{'params':>9}{'cosine':>9}{'max sim err':>13}")
    for criterion in ("l1", "l2", "taylor", "activation"):
        for ratio in (0.1, 0.2, 0.3, 0.5):
            result = gp.prune(
                model,
                calib,
                passes=[ChannelPrune(ratio, importance=criterion, loss_fn=distill, round_to=8)],
                calibration=[calib],
            )
            e = embed(result.module, held)
            cos = (e * dense).sum(-1).mean().item()
            err = (e @ e.T - dense @ dense.T).abs().max().item()
            kept = result.report.params_after / result.report.params
            print(f"{criterion:<12}{ratio:>6.1f}{kept:>9.1%}{cos:>9.3f}{err:>13.3f}")


if __name__ == "__main__":
    main()
