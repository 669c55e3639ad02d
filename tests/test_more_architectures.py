"""Architectures the core did not name: analysis, the zero-channel oracle, and pruning at 50%."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import graphprune as gp
from graphprune.frontends.torch.apply import apply_plan
from graphprune.passes import ChannelPrune
from tests.oracles import max_relative_error, outputs, random_plan, zero_removed

pytestmark = pytest.mark.slow  # see tests/conftest.py

TEXT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=100,
    max_position_embeddings=64,
)
IMAGE = dict(
    image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
)

CASES = {
    "distilbert": lambda: T.DistilBertModel(
        T.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100)
    ),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(**TEXT)),
    "albert": lambda: T.AlbertModel(T.AlbertConfig(embedding_size=32, **TEXT)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, head_dim=16, **TEXT)),
    "phi3_fused_qkv": lambda: T.Phi3ForCausalLM(T.Phi3Config(num_key_value_heads=2, pad_token_id=0, **TEXT)),
    "gemma_mqa": lambda: T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=1, head_dim=16, **TEXT)),
    "falcon": lambda: T.FalconForCausalLM(
        T.FalconConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=100,
            new_decoder_architecture=False,
            multi_query=True,
        )
    ),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**TEXT)),
    "opt": lambda: T.OPTForCausalLM(
        T.OPTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            vocab_size=100,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
        )
    ),
    "t5_encoder": lambda: T.T5EncoderModel(
        T.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=100)
    ),
    "beit": lambda: T.BeitModel(T.BeitConfig(**IMAGE)),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**{k: v for k, v in IMAGE.items() if k != "intermediate_size"})),
    "regnet": lambda: T.RegNetModel(
        T.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8)
    ),
    "efficientnet": lambda: T.EfficientNetModel(T.EfficientNetConfig(image_size=32, depth_coefficient=0.3)),
    "mobilevit": lambda: T.MobileViTModel(
        T.MobileViTConfig(image_size=32, hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 64])
    ),
    "segformer": lambda: T.SegformerModel(
        T.SegformerConfig(hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 2, 4], depths=[1, 1, 1, 1])
    ),
    "deberta_v2": lambda: T.DebertaV2Model(T.DebertaV2Config(**TEXT)),
    "mobilebert": lambda: T.MobileBertModel(
        T.MobileBertConfig(
            hidden_size=64,
            embedding_size=32,
            intra_bottleneck_size=32,
            true_hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=100,
        )
    ),
    "bloom_alibi": lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=100)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(num_key_value_heads=2, head_dim=16, **TEXT)),
    "mixtral_moe": lambda: T.MixtralForCausalLM(
        T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **TEXT)
    ),
    "swinv2": lambda: T.Swinv2Model(
        T.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)
    ),
    "poolformer": lambda: T.PoolFormerModel(T.PoolFormerConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])),
    "wav2vec2": lambda: T.Wav2Vec2Model(
        T.Wav2Vec2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        )
    ),
}
VISION = {"beit", "dinov2", "regnet", "efficientnet", "mobilevit", "segformer", "swinv2", "poolformer"}
# The expert matmuls of MoE layers run through a transformers custom op with no rule: reported, frozen.
UNSUPPORTED_OK = {"mixtral_moe": {"transformers.grouped_mm_fallback.default"}}


@pytest.mark.parametrize("name", sorted(CASES))
def test_unnamed_architecture(name):
    torch.manual_seed(0)
    model = CASES[name]().eval()
    g = torch.Generator().manual_seed(0)
    if name in VISION:
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    elif name == "wav2vec2":
        inputs = {"input_values": torch.randn(2, 800, generator=g)}
    else:
        inputs = {"input_ids": torch.randint(0, 90, (2, 8), generator=g)}
    analysis = gp.analyze(model, inputs)
    assert not analysis.rule_errors, analysis.rule_errors
    assert set(analysis.unsupported) == UNSUPPORTED_OK.get(name, set()), analysis.unsupported
    plan = random_plan(analysis, 0.5, exact_only=True)
    if plan.keep:
        zeroed = zero_removed(model, analysis, plan)
        assert (
            max_relative_error(outputs(apply_plan(zeroed, analysis, plan).module, inputs), outputs(zeroed, inputs))
            < 1e-4
        )
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    assert [t.shape for t in outputs(result.module, inputs)] == [t.shape for t in outputs(model, inputs)]
    assert result.report.params_after < result.report.params
