"""Fake quantization of a torch model, so its quantized accuracy can be measured and fine-tuned.

Quantize, round half to even, clamp (saturate, for fp8), dequantize, exactly as ONNX QuantizeLinear /
DequantizeLinear do (gradients pass straight through).  Weights get a :class:`FakeQuantWeight`
parametrization; activations are quantized by hooks that read the ``qinput_*`` / ``qoutput_*``
buffers of the layer module, so the parameters are saved with the model's ``state_dict``.  The
arithmetic is :mod:`graphprune.algorithms.number_formats`'.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from graphprune.algorithms.number_formats import (
    ACT_QMAX,
    ACT_QMIN,
    BIAS_QMAX,
    BIAS_QMIN,
    INT8,
    fake_quantize_fp8,
    fake_quantize_weight,
)
from graphprune.algorithms.quant import LayerQuant, QuantPlan
from graphprune.errors import InputError
from graphprune.frontends.torch.capture import qualified
from torch.nn.utils import parametrize


class FakeQuantWeight(nn.Module):
    """Parametrization: a weight fake-quantized to number format ``kind`` (int8 and fp8 per output
    channel along ``axis``, int4 per group of ``group_size`` reduction entries)."""

    def __init__(self, scale: torch.Tensor, axis: int, kind: str = INT8, group_size: int | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", scale.float())
        self.axis, self.kind, self.group_size = axis, kind, group_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_weight(weight, self.scale, self.axis, self.kind, self.group_size)


def weight_fake_quant(module: nn.Module, name: str, layer: LayerQuant, kind: str) -> None:
    """Attach :class:`FakeQuantWeight` with ``layer``'s scales to ``module.<name>`` (after any N:M mask)."""
    device = getattr(module, name).device
    quantizer = FakeQuantWeight(layer.scale(device), layer.axis, kind, layer.group_size)
    parametrize.register_parametrization(module, name, quantizer)


class FakeQuantBias(nn.Module):
    """Parametrization: int32 fake quantization of a bias with per-channel scale ``s_in * s_w[c]``."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", torch.zeros_like(scale, dtype=torch.int32))

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(bias, self.scale, self.zero_point, 0, BIAS_QMIN, BIAS_QMAX)


def quantize_bias(module: nn.Module, name: str, scale: torch.Tensor) -> None:
    parametrize.register_parametrization(module, name, FakeQuantBias(scale))


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)


def _first_input(args: tuple, kwargs: dict, quantize: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple, dict]:
    if args:
        return (quantize(args[0]), *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: quantize(kwargs[key])}


def _quantize_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    return _first_input(args, kwargs, lambda x: fake_quant(x, module.qinput_scale, module.qinput_zero_point))


def _quantize_input_fp8(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    return _first_input(args, kwargs, lambda x: fake_quantize_fp8(x, module.qinput_scale))


def _quantize_output(module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
    return fake_quant(output, module.qoutput_scale, module.qoutput_zero_point)


def quantize_activation(module: nn.Module, where: str, scale: float, zero_point: int, kind: str = INT8) -> None:
    """Fake-quantize the first input (``where="input"``) or the output (int8) of every call of ``module``."""
    if where not in ("input", "output") or (kind != INT8 and where != "input"):
        raise ValueError((where, kind))
    device = next((t.device for t in module.parameters()), None)  # the module's own device
    module.register_buffer(f"q{where}_scale", torch.tensor(scale, dtype=torch.float32, device=device))
    module.register_buffer(f"q{where}_zero_point", torch.tensor(zero_point, dtype=torch.int32, device=device))
    if where == "input":
        module.register_forward_pre_hook(_quantize_input if kind == INT8 else _quantize_input_fp8, with_kwargs=True)
    else:
        module.register_forward_hook(_quantize_output)


def quantize_by_plan(model: nn.Module, plan: QuantPlan) -> None:
    """Fake quantization on each layer of ``plan``: its weight, and as the format has it its input, a
    convolution's output, its bias (BatchNorms the plan folded must be folded already)."""
    for name, layer in plan.layers.items():
        owner, attr = model.get_submodule(layer.module), name.rpartition(".")[2]
        weight_fake_quant(owner, attr, layer, plan.kind)
        if layer.input is not None:
            quantize_activation(owner, "input", *layer.input, kind=plan.kind)
        if layer.output is not None:
            quantize_activation(owner, "output", *layer.output)
        if layer.bias is not None and layer.bias_scale is not None:
            device = getattr(owner, attr).device
            quantize_bias(owner, layer.bias.rpartition(".")[2], torch.tensor(layer.bias_scale, device=device))


def _fake_quant_tensors(model: nn.Module, kinds: tuple[type, ...] = (FakeQuantWeight,)):
    """(module path, module, tensor name, parametrization) for every fake-quantized tensor of ``kinds``."""
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, kinds):
                        yield path, module, name, p


def is_quantized(model: nn.Module) -> bool:
    """True if some weight of ``model`` carries a :class:`FakeQuantWeight` parametrization."""
    return next(_fake_quant_tensors(model), None) is not None


def read_quant_plan(model: nn.Module) -> QuantPlan | None:
    """The quantization parameters a fake-quantized model carries (None for a float model)."""
    layers = {}
    kinds = set()
    for path, module, name, fq in _fake_quant_tensors(model):
        kinds.add(fq.kind)
        output = _qparams(module, "qoutput") if hasattr(module, "qoutput_scale") else None
        bias = (
            next((p for p in module.parametrizations["bias"] if isinstance(p, FakeQuantBias)), None)
            if parametrize.is_parametrized(module, "bias") and name == "weight"
            else None
        )
        layers[qualified(path, name)] = LayerQuant(
            module=path,
            axis=fq.axis,
            weight_scale=fq.scale.tolist(),
            input=_qparams(module, "qinput") if hasattr(module, "qinput_scale") else None,
            output=output,
            bias=qualified(path, "bias") if bias is not None else None,
            bias_scale=bias.scale.tolist() if bias is not None else None,
            group_size=fq.group_size,
        )
    if len(kinds) > 1:
        raise InputError(f"the model mixes quantization formats {sorted(kinds)}; a plan holds one")
    return QuantPlan(layers, kinds.pop()) if layers else None


def _qparams(module: nn.Module, prefix: str) -> tuple[float, int]:
    return getattr(module, f"{prefix}_scale").item(), int(getattr(module, f"{prefix}_zero_point").item())


def strip_quantization(model: nn.Module) -> nn.Module:
    """Remove fake quantization (weights back to their float originals, activation hooks gone),
    leaving the float model a QDQ emitter starts from; returns ``model``.  The ``q*`` buffers stay."""
    kinds = (FakeQuantWeight, FakeQuantBias)
    for _path, module, name, _fq in list(_fake_quant_tensors(model, kinds)):
        if not parametrize.is_parametrized(module, name):
            continue  # a tensor with two fake quantizations, already stripped
        others = [p for p in module.parametrizations[name] if not isinstance(p, kinds)]
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        for p in others:
            parametrize.register_parametrization(module, name, p)
    for module in model.modules():  # hooks added by quantize_activation are identified by function
        for key in [k for k, h in module._forward_pre_hooks.items() if h in (_quantize_input, _quantize_input_fp8)]:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
        for key in [k for k, h in module._forward_hooks.items() if h is _quantize_output]:
            del module._forward_hooks[key]
    return model
