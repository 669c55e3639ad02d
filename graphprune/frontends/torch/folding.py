"""Fold inference-mode BatchNorm into the convolution that feeds it.

Int8 needs it: a quantized convolution's weights and output must be the ones the deployed model
computes, and every deployment runtime folds BatchNorm first (onnxruntime before fusing
QLinearConv).  Folding is exact in eval mode: ``W' = W * g``, ``b' = (b - mean) * g + beta`` with
``g = gamma / sqrt(var + eps)`` per output channel.  The BatchNorm module is replaced by
``nn.Identity``, so the folded model no longer updates batch statistics when trained.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from graphprune.frontends.torch.calibration import Consumer
from graphprune.frontends.torch.capture import CapturedGraph
from graphprune.frontends.torch.masks import stored

aten = torch.ops.aten


def foldable_batchnorm(captured: CapturedGraph, model: nn.Module, layer: Consumer) -> tuple[str, fx.Node] | None:
    """(BatchNorm module path, its node) when ``layer`` is a convolution whose only user is an
    eval-mode BatchNorm module called once, else None."""
    users = list(layer.node.users)
    if layer.node.target.overloadpacket not in (aten.conv1d, aten.conv2d, aten.conv3d) or len(users) != 1:
        return None
    bn = users[0]
    if bn.op != "call_function" or bn.target is not aten.batch_norm.default or bn.args[0] is not layer.node:
        return None
    running_mean = bn.args[3]
    if not isinstance(running_mean, fx.Node) or running_mean.name not in captured.tensor_names:
        return None  # batch statistics even in eval mode (track_running_stats=False)
    path = captured.tensor_names[running_mean.name][1].rpartition(".")[0]
    module = model.get_submodule(path)
    calls = [
        n
        for n in captured.graph.nodes
        if n.op == "call_function" and n.target is aten.batch_norm.default and n.args[3] is running_mean
    ]
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or len(calls) != 1:
        return None
    return path, bn


def fold_batchnorm(model: nn.Module, conv_path: str, bn_path: str) -> None:
    """Fold the BatchNorm at ``bn_path`` into the convolution at ``conv_path`` (N:M masks kept)."""
    conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
    with torch.no_grad():
        gain = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            gain = gain * bn.weight.double()
        shift = -bn.running_mean.double() * gain
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        weight = stored(conv, "weight")
        weight.copy_((weight.double() * gain.reshape(-1, *[1] * (weight.dim() - 1))).to(weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
        conv.bias.copy_((conv.bias.double() * gain + shift).to(conv.bias.dtype))
    parent, _, name = bn_path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, nn.Identity())
