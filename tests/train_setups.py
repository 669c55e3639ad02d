"""Setups for ``python -m graphprune.train`` in the tests (built the same on every rank)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphprune.train.run import Setup


def tiny() -> Setup:
    """A small MLP distilled from its dense self: the loss is a mean over rows, as the command needs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    teacher = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 16, generator=g) for _ in range(6)]

    def loss(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(batch)
        return F.mse_loss(student(batch), target)

    return Setup(model=model, example_inputs=(batches[0],), batches=batches, loss=loss, calibration=batches[:4])


def tiny_lm() -> Setup:
    """A small LLaMA-shaped causal LM on random token ids; its loss is next-token cross-entropy."""
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=64,
        head_dim=8,
    )
    model = T.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (4, 12), generator=g) for _ in range(4)]

    def loss(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return student(batch, labels=batch, use_cache=False).loss

    return Setup(
        model=model,
        example_inputs=(batches[0],),
        batches=batches,
        loss=loss,
        calibration=batches[:2],
        outputs=lambda m, batch: m(batch, use_cache=False).logits,
    )
