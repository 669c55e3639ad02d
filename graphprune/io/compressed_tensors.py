"""Quantized weights in the compressed-tensors layout, which vLLM, transformers and llm-compressor load.

What :func:`graphprune.io.checkpoint.apply_to_checkpoint` writes with ``format="compressed-tensors"``
for each layer of the plan's quantization (``<m>`` its module, with the checkpoint's prefix):

- int4, format ``pack-quantized``: ``<m>.weight_packed`` (int32, eight 4-bit codes each, packed by
  compressed-tensors' own ``pack_to_int32``), ``<m>.weight_scale`` ``[out, in / group]`` and
  ``<m>.weight_shape``; the loader computes ``code * scale``, which is what graphprune's fake
  quantization computes (its codes lie in [-7, 7], inside the format's [-8, 7]).
- fp8, format ``float-quantized``: ``<m>.weight`` as ``float8_e4m3fn``, ``<m>.weight_scale``
  ``[out, 1]`` and the static activation scale ``<m>.input_scale`` ``[1]``.

Scales are stored in the weight's dtype (the loader makes them parameters of the model's dtype).
``config.json`` gets the ``quantization_config`` compressed-tensors' own ``QuantizationConfig``
serialises, targeting exactly the quantized modules.  Refused, naming why: int8 plans (they quantize
biases to int32 and convolution outputs, which the format does not carry) and weights stored
``[in, out]`` (transformers' Conv1D: the format quantizes ``nn.Linear``).  N:M zeros stay in the
values; the format holds no sparsity metadata any more (compressed-tensors marks its 2:4 formats
legacy), so the checkpoint does not say the weights are 2:4.
"""

from __future__ import annotations

from typing import Any

import torch

from graphprune.algorithms.number_formats import FP8, INT4, integer_weight, to_fp8
from graphprune.algorithms.quant import LayerQuant, QuantPlan
from graphprune.errors import InputError

FORMAT = "compressed-tensors"
LAYOUTS = {INT4: "pack-quantized", FP8: "float-quantized"}


def _library() -> Any:
    try:
        import compressed_tensors
    except ImportError:
        raise InputError(
            "format='compressed-tensors' needs the compressed-tensors package: pip install compressed-tensors"
        ) from None
    return compressed_tensors


def refusal(plan: QuantPlan) -> str | None:
    """Why the plan's quantization cannot be written in the compressed-tensors layout, or None."""
    if plan.kind not in LAYOUTS:
        return (
            f"a {plan.kind} plan quantizes biases (int32) and convolution outputs, which compressed-tensors "
            "does not carry; export it with export_onnx, or quantize to int4 or fp8"
        )
    if plan.folded:
        return (
            f"the plan folded {len(plan.folded)} BatchNorms into convolutions before quantizing, which a "
            "checkpoint's tensors do not do; export it with export_onnx"
        )
    transposed = [name for name, layer in plan.layers.items() if layer.axis != 0]
    if transposed:
        return (
            f"{transposed[0]} is stored [in, out] (transformers' Conv1D); compressed-tensors quantizes "
            "nn.Linear weights stored [out, in]"
        )
    return None


def quantized_tensors(name: str, weight: torch.Tensor, layer: LayerQuant, kind: str) -> dict[str, torch.Tensor]:
    """The tensors that stand for ``weight`` (checkpoint name ``name``, ``<m>.weight``) quantized by ``layer``."""
    module = name.removesuffix(".weight")
    scale = layer.scale()
    if kind == INT4:
        from compressed_tensors.compressors import pack_to_int32

        codes = integer_weight(weight.float(), scale, 0, INT4, layer.group_size)
        return {
            f"{module}.weight_packed": pack_to_int32(codes, 4),
            f"{module}.weight_scale": scale.to(weight.dtype),
            f"{module}.weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        }
    input_scale = layer.input[0] if layer.input is not None else 1.0
    return {
        f"{module}.weight": to_fp8(weight.float(), scale[:, None]),
        f"{module}.weight_scale": scale[:, None].to(weight.dtype),
        f"{module}.input_scale": torch.tensor([input_scale], dtype=weight.dtype),
    }


def dequantized(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor | None:
    """The weight of ``module`` that quantized ``tensors`` stand for (None where they hold none)."""
    if f"{module}.weight_packed" in tensors:
        from compressed_tensors.compressors import unpack_from_int32

        shape = torch.Size(tensors[f"{module}.weight_shape"].tolist())
        codes = unpack_from_int32(tensors[f"{module}.weight_packed"], 4, shape)
        scale = tensors[f"{module}.weight_scale"].float()
        return codes.float() * scale.repeat_interleave(shape[1] // scale.shape[1], 1)
    weight = tensors.get(f"{module}.weight")
    if weight is None or weight.dtype != torch.float8_e4m3fn:
        return None
    return weight.float() * tensors[f"{module}.weight_scale"].float()


def quantization_config(plan: QuantPlan, prefix: str) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for ``plan`` (checkpoint names start with ``prefix``),
    written by compressed-tensors' own ``QuantizationConfig``."""
    library = _library()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    layout = LAYOUTS[plan.kind]
    targets = sorted(prefix + layer.module for layer in plan.layers.values())
    if plan.kind == INT4:
        group = next(iter(plan.layers.values())).group_size
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
        inputs = None
    else:
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
        inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)
    scheme = QuantizationScheme(targets=targets, weights=weights, input_activations=inputs, format=layout)
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format=layout, quantization_status="compressed", ignore=[]
    )
    return {**config.model_dump(mode="json"), "version": library.__version__}
