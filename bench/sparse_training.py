"""N:M sparse training recipes at equal training steps, on a residual CNN trained on digits.

From the same dense model (trained in the script, ``bench.compensation_quality.ResidualNet``), for
2:4, 1:4 and 1:8: one-shot magnitude masks without training; then one epoch (19 optimizer steps, Adam
1e-3) of: fine-tuning with the one-shot masks fixed, SR-STE, mask decay (over the first two thirds),
and SR-STE with a dense-to-sparse schedule (n stepping down to the target over the first two thirds,
e.g. 7:8 -> 5:8 -> 3:8 -> 1:8).  Prints test accuracy.

    python -m bench.sparse_training [epochs]          (needs pip install -e ".[bench]")
"""

from __future__ import annotations

import torch

import graphprune as gp
from bench.compensation_quality import ResidualNet
from bench.digits import fit, split
from graphprune.frontends.torch.copying import clone
from graphprune.passes import NMSparsity
from graphprune.train import SparseTraining

STEPS_PER_EPOCH = 19


def main(epochs: int = 1) -> None:
    train_x, train_y, test_x, test_y = split()
    torch.manual_seed(0)
    dense = fit(ResidualNet(), train_x, train_y, epochs=12, lr=3e-3)

    def accuracy(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return (m(test_x).argmax(1) == test_y).float().mean().item()

    print(f"ResidualNet on digits, dense test accuracy {accuracy(dense):.3f}; {epochs} epoch(s) for every recipe")
    print(f"{'pattern':<9}{'one-shot':>10}{'+ fine-tune':>13}{'SR-STE':>9}{'mask decay':>12}{'SR-STE + schedule':>19}")
    steps = epochs * STEPS_PER_EPOCH
    ramp = 2 * steps // 3
    for n, m in ((2, 4), (1, 4), (1, 8)):
        one_shot = gp.prune(dense, train_x[:64], passes=[NMSparsity(n, m, dense_heads=False)]).module
        cells = [accuracy(one_shot)]
        stages = sorted({round(m - 1 - i * (m - 1 - n) / 3) for i in range(4)}, reverse=True)
        schedule = [(i * ramp // (len(stages) - 1), k) for i, k in enumerate(stages)]
        for recipe, options in (
            ("fixed", {}),
            ("sr-ste", {}),
            ("mask-decay", {"decay_steps": ramp}),
            ("sr-ste", {"schedule": schedule}),
        ):
            model = clone(one_shot)
            trainer = SparseTraining(model, recipe=recipe, **options)
            fit(model, train_x, train_y, epochs=epochs, lr=1e-3, after_step=trainer.step)
            cells.append(accuracy(trainer.finalize()))
            assert trainer.steps == steps
        print(f"{f'{n}:{m}':<9}" + "".join(f"{c:>{w}.3f}" for c, w in zip(cells, (10, 13, 9, 12, 19))))


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
