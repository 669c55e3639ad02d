"""Small models built from transformers configs (random weights, no downloads)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
import transformers as T

Factory = Callable[[], tuple[torch.nn.Module, dict]]


def _ids(vocab: int = 100) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (2, 8), generator=g)}


def _pixels(size: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(2, 3, size, size, generator=g)}


def bert():
    cfg = T.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
    )
    inputs = _ids()
    inputs["attention_mask"] = torch.ones(2, 8, dtype=torch.long)
    return T.BertModel(cfg), inputs


def gpt2():
    cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg), _ids()


def llama_gqa():
    cfg = T.LlamaConfig(
        hidden_size=192,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=8,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return T.LlamaForCausalLM(cfg), _ids()


def small_llama(hidden: int = 64, layers: int = 2) -> T.LlamaForCausalLM:
    """A LLaMA with GQA (4 query heads over 2) and an explicit head size, seeded, in eval mode."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        vocab_size=100,
        head_dim=16,
    )
    return T.LlamaForCausalLM(cfg).eval()


def qwen3():
    cfg = T.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return T.Qwen3ForCausalLM(cfg), _ids()


def vit():
    cfg = T.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    return T.ViTForImageClassification(cfg), _pixels()


def swin():
    cfg = T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=10
    )
    return T.SwinForImageClassification(cfg), _pixels()


def convnext():
    cfg = T.ConvNextConfig(hidden_sizes=[16, 32], depths=[2, 2], num_stages=2, num_labels=10)
    return T.ConvNextForImageClassification(cfg), _pixels()


def resnet():
    cfg = T.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=10
    )
    return T.ResNetForImageClassification(cfg), _pixels()


def mobilenet_v2():
    cfg = T.MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=10)
    return T.MobileNetV2ForImageClassification(cfg), _pixels()


ARCHITECTURES: dict[str, Factory] = {
    f.__name__: f for f in (bert, gpt2, llama_gqa, qwen3, vit, swin, convnext, resnet, mobilenet_v2)
}


# what the quick loop (-m "not slow") keeps of a sweep over the zoo: a decoder with GQA and a
# convnet; CI runs every architecture
def calibrated_mlp(hidden: tuple[int, int] = (64, 64)) -> tuple[torch.nn.Module, list[tuple[torch.Tensor]]]:
    """A three-linear GELU MLP (32 inputs, 8 outputs) and four batches of correlated inputs with
    channels of unequal scale: where data-driven criteria differ from magnitude."""
    torch.manual_seed(0)
    mix = torch.randn(32, 32)
    nn = torch.nn
    first, second = hidden
    model = nn.Sequential(
        nn.Linear(32, first), nn.GELU(), nn.Linear(first, second), nn.GELU(), nn.Linear(second, 8)
    ).eval()
    data = [(torch.randn(64, 32) @ mix * torch.linspace(0.1, 2.0, 32),) for _ in range(4)]
    return model, data


QUICK = ("llama_gqa", "resnet")


def sweep(names: Iterable[str], quick: Iterable[str] = QUICK) -> list[Any]:
    """``names`` as pytest parameters, those outside ``quick`` marked ``slow`` (a sweep whose every
    case is long keeps fewer in the quick loop)."""
    kept = set(quick)
    return [pytest.param(n, marks=() if n in kept else pytest.mark.slow) for n in names]


def build(name: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model, inputs = ARCHITECTURES[name]()
    _randomize_norm_stats(model)
    return model.eval(), inputs


def _randomize_norm_stats(model: torch.nn.Module) -> None:
    """Freshly built models have identity norms; random affine params and BN stats make the oracles sharper."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, torch.nn.Parameter) and p.dim() == 1 and not isinstance(m, torch.nn.Linear):
                    base = 1.0 if name == "weight" else 0.0
                    p.copy_(base + torch.randn(p.shape, generator=g) * 0.1)
