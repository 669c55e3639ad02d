"""What the value oracle of verification costs: ``apply_plan`` timed with it and, in the same run,
with it replaced by a no-op, on the ResNet sample, the real all-MiniLM-L6-v2 and a LLaMA-shaped
transformer (random weights), each pruned by ChannelPrune's plan at 50%.  Prints seconds per apply
(best of ``REPEATS``, the two settings interleaved so that warm-up and load fall on both), the ratio,
and how many nodes the oracle compared.

    python -m bench.verification_cost
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import graphprune.frontends.torch.apply as apply_module
from graphprune import prune
from graphprune.frontends.torch.analysis import analyze
from graphprune.frontends.torch.apply import apply_plan
from graphprune.passes import ChannelPrune

REPEATS = 5


def models() -> list[tuple[str, Callable[[], tuple[torch.nn.Module, tuple]]]]:
    def resnet():
        from samples.resnet import ResNet

        return ResNet().eval(), (torch.randn(8, 3, 32, 32),)

    def minilm():
        from samples.minilm import build, tokenize

        model, _ = build()
        return model, tokenize(["A dog runs across the park.", "Interest rates will rise next year."])

    def llama():
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=1000,
        )
        return LlamaModel(config).eval(), (torch.randint(0, 1000, (2, 32)),)

    return [
        ("ResNet sample (8x3x32x32)", resnet),
        ("all-MiniLM-L6-v2 (2 sentences)", minilm),
        ("LLaMA-shaped, 4 blocks (2x32 tokens)", llama),
    ]


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    real_check = apply_module.compare_values
    print(f"{'model':<40}{'apply, oracle off':>19}{'apply, oracle on':>18}{'ratio':>8}{'nodes':>7}")
    for name, make in models():
        model, inputs = make()
        analysis = analyze(model, inputs)
        plan = prune(model, inputs, passes=[ChannelPrune(0.5)]).plans[0]
        compared, on, off = [], [], []
        for _ in range(REPEATS):
            apply_module.compare_values = lambda *a: 0
            off.append(timed(lambda: apply_plan(model, analysis, plan)))
            apply_module.compare_values = lambda *a: compared.append(real_check(*a))
            on.append(timed(lambda: apply_plan(model, analysis, plan)))
        apply_module.compare_values = real_check
        on, off = min(on), min(off)
        print(f"{name:<40}{off:>18.3f}s{on:>17.3f}s{on / off:>8.2f}{compared[-1]:>7}")


if __name__ == "__main__":
    main()
