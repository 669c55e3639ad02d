"""Attribute rules for torch.nn modules: keep ``in_features``, ``groups``... true after shrinking.

Each rule reads the module's (already shrunk) tensors and the rewritten shape constants of
the ops it owns, keyed by the op's argument name (e.g. ``groups`` of a convolution).
Registered by class; looked up along the MRO so subclasses inherit their base's rule.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch.nn as nn

ModuleRule = Callable[[nn.Module, dict[str, Any]], None]
_RULES: dict[type, ModuleRule] = {}


def module_rule(*types: type) -> Callable[[ModuleRule], ModuleRule]:
    def deco(fn: ModuleRule) -> ModuleRule:
        for t in types:
            _RULES[t] = fn
        return fn

    return deco


def rule_for(module: nn.Module) -> ModuleRule | None:
    _register_transformers_rules()
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


@module_rule(nn.Linear)
def _linear(m: nn.Linear, consts: dict[str, Any]) -> None:
    m.out_features, m.in_features = m.weight.shape


@module_rule(nn.Bilinear)
def _bilinear(m: nn.Bilinear, consts: dict[str, Any]) -> None:
    m.out_features, m.in1_features, m.in2_features = m.weight.shape


@module_rule(nn.modules.conv._ConvNd)
def _conv(m: nn.modules.conv._ConvNd, consts: dict[str, Any]) -> None:
    m.groups = int(consts.get("groups", m.groups))
    if m.transposed:
        m.in_channels = m.weight.shape[0]
        m.out_channels = m.weight.shape[1] * m.groups
    else:
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.weight.shape[1] * m.groups


@module_rule(nn.modules.batchnorm._NormBase)
def _batch_norm(m: nn.modules.batchnorm._NormBase, consts: dict[str, Any]) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


@module_rule(nn.LayerNorm, nn.RMSNorm)
def _layer_norm(m: nn.Module, consts: dict[str, Any]) -> None:
    if "normalized_shape" in consts:
        m.normalized_shape = tuple(int(s) for s in consts["normalized_shape"])
    elif getattr(m, "weight", None) is not None:
        m.normalized_shape = tuple(m.weight.shape)


@module_rule(nn.GroupNorm)
def _group_norm(m: nn.GroupNorm, consts: dict[str, Any]) -> None:
    m.num_groups = int(consts.get("num_groups", consts.get("group", m.num_groups)))
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@module_rule(nn.Embedding)
def _embedding(m: nn.Embedding, consts: dict[str, Any]) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@module_rule(nn.MultiheadAttention)
def _multihead_attention(m: nn.MultiheadAttention, consts: dict[str, Any]) -> None:
    """Heads are pruned whole (head_dim is frozen: its default softmax scale depends on it)."""
    m.embed_dim = m.kdim = m.vdim = m.in_proj_weight.shape[1]
    m.num_heads = m.embed_dim // m.head_dim


@module_rule(nn.ChannelShuffle)
def _channel_shuffle(m: nn.ChannelShuffle, consts: dict[str, Any]) -> None:
    m.groups = int(consts.get("groups", m.groups))


def _register_transformers_rules() -> None:
    """Rules for Hugging Face layers, registered only once the user's code has imported transformers."""
    if "transformers" not in sys.modules or _TRANSFORMERS_DONE:
        return
    _TRANSFORMERS_DONE.append(True)
    from transformers.pytorch_utils import Conv1D

    @module_rule(Conv1D)
    def _conv1d(m: nn.Module, consts: dict[str, Any]) -> None:
        """GPT-2's transposed linear: weight is [in, out] and ``nf`` is the output width."""
        m.nx, m.nf = m.weight.shape


_TRANSFORMERS_DONE: list[bool] = []
