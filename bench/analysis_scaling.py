"""Analysis time against graph size: LLaMA-shaped models on meta (4..32 layers) and DenseNet-121.

The solver is near-linear in the number of graph nodes; this prints seconds per 1,000 nodes,
which should stay roughly flat as depth grows.

    python -m bench.analysis_scaling
"""

from __future__ import annotations

import time

import torch
import transformers as T

import graphprune as gp
from samples.densenet import DenseNet


def llama(layers: int) -> tuple[torch.nn.Module, dict]:
    cfg = T.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    return model, {"input_ids": torch.zeros(1, 16, dtype=torch.long)}


def main() -> None:
    cases = [(f"LLaMA-7B shape, {n} layers (meta)", *llama(n)) for n in (4, 8, 16, 32)]
    cases.append(
        (
            "DenseNet-121 (6/12/24/16, growth 32)",
            DenseNet(growth=32, blocks=(6, 12, 24, 16), num_classes=1000).eval(),
            (torch.randn(1, 3, 224, 224),),
        )
    )
    print(f"{'model':<40}{'nodes':>8}{'groups':>8}{'seconds':>10}{'s / 1k nodes':>14}")
    for name, model, inputs in cases:
        start = time.perf_counter()
        analysis = gp.analyze(model, inputs)
        seconds = time.perf_counter() - start
        nodes = analysis.node_count()
        print(f"{name:<40}{nodes:>8}{len(analysis.groups):>8}{seconds:>10.2f}{1000 * seconds / nodes:>14.2f}")


if __name__ == "__main__":
    main()
