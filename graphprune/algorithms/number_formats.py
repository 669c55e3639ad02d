"""Number formats of quantized weights and activations: the arithmetic, for every frontend.

Three formats, each symmetric where weights are concerned, so an exact zero stays an exact zero and
N:M masks survive quantization:

- ``int8``: weights per output channel in [-127, 127] (the narrow range keeps ``q(-w) == -q(w)``);
  activations static, per tensor, asymmetric in [-128, 127] (onnxruntime's S8S8 QDQ default; the
  range always contains 0); biases int32 with scale ``input_scale * weight_scale[c]``, as integer
  kernels add them to their accumulator.
- ``int4``: weights only, per group of ``group_size`` consecutive entries along the reduction dim of
  each output channel, in [-7, 7] with scale ``max|w| / 7`` (the narrow range again: -8 would make
  the grid lopsided); activations stay float.  Two-dimensional weights only (linear layers,
  transformers' Conv1D, matmuls against a parameter).
- ``fp8``: E4M3 (``float8_e4m3fn``, largest magnitude 448, rounding to nearest even and saturating
  as ONNX's ``QuantizeLinear`` does) for weights, per output channel, and activations, per tensor
  and static; scale ``max|x| / 448``.

A weight's scales are a tensor ``[out]`` (per channel) or ``[out, groups]`` (int4); the output
channels lie along the weight's ``axis``.  Fake quantization passes gradients straight through,
so quantized models can be fine-tuned.
"""

from __future__ import annotations

import torch

from graphprune.errors import InputError

INT8, INT4, FP8 = "int8", "int4", "fp8"
FORMATS = (INT8, INT4, FP8)
GROUPED = frozenset({INT4})  # scales per group along the reduction dim
WEIGHT_ONLY = frozenset({INT4})  # activations stay float
DEFAULT_GROUP_SIZE = 128

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127
INT4_QMIN, INT4_QMAX = -7, 7
ACT_QMIN, ACT_QMAX = -128, 127
BIAS_QMIN, BIAS_QMAX = -(2**31), 2**31 - 1
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FP8_DTYPE = torch.float8_e4m3fn

_LARGEST = {INT8: float(WEIGHT_QMAX), INT4: float(INT4_QMAX), FP8: FP8_MAX}


def largest(kind: str) -> float:
    """The largest magnitude a weight of format ``kind`` holds (the scale maps ``max|w|`` to it)."""
    return _LARGEST[kind]


def as_rows(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """``weight`` as ``[out, rest]`` with its output channels first (a 2-D weight's reduction dim last)."""
    return weight.movedim(axis, 0).reshape(weight.shape[axis], -1)


def weight_scales(weight: torch.Tensor, axis: int, kind: str = INT8, group_size: int | None = None) -> torch.Tensor:
    """Symmetric scales ``max|w| / largest(kind)``, per output channel (``[out]``), or per group of
    ``group_size`` reduction entries of each channel (``[out, groups]``); 1.0 where all are zero."""
    rows = as_rows(weight.detach(), axis).float()
    if kind in GROUPED:
        rows = grouped(rows, group_size)
    amax = rows.abs().amax(-1)
    return torch.where(amax > 0, amax / largest(kind), torch.ones_like(amax))


def grouped(rows: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``rows [out, k]`` as ``[out, k / group_size, group_size]``."""
    if group_size is None or group_size <= 0 or rows.shape[-1] % group_size:
        raise InputError(f"a reduction dim of {rows.shape[-1]} does not split into groups of {group_size}")
    return rows.reshape(rows.shape[0], -1, group_size)


def fake_quantize_weight(
    weight: torch.Tensor, scale: torch.Tensor, axis: int, kind: str = INT8, group_size: int | None = None
) -> torch.Tensor:
    """``weight`` rounded to format ``kind`` with ``scale`` (:func:`weight_scales`' shape) and back;
    gradients pass straight through (where the value is in range, for the integer formats)."""
    if kind == INT8:
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, axis, WEIGHT_QMIN, WEIGHT_QMAX)
    moved = weight.movedim(axis, 0)
    if kind == INT4:
        rows = moved.reshape(-1, group_size)  # [out * groups, group_size], one scale per row
        flat = scale.reshape(-1)
        zero = torch.zeros_like(flat, dtype=torch.int32)
        out = torch.fake_quantize_per_channel_affine(rows, flat, zero, 0, INT4_QMIN, INT4_QMAX)
    elif kind == FP8:
        shape = [-1] + [1] * (moved.dim() - 1)
        out = fake_quantize_fp8(moved, scale.reshape(shape))
    else:
        raise InputError(f"unknown number format {kind!r}; one of {list(FORMATS)}")
    return out.reshape(moved.shape).movedim(0, axis)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` through E4M3 with ``scale`` (saturating at +-448, nearest even) and back, gradients
    straight through."""
    rounded = to_fp8(x.detach(), scale).to(x.dtype) * scale
    return rounded + (x - x.detach())  # exactly ``rounded``, with x's gradient


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The E4M3 values ``x / scale`` (saturated) that ONNX's ``QuantizeLinear`` stores."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def integer_weight(
    weight: torch.Tensor, scale: torch.Tensor, axis: int, kind: str = INT8, group_size: int | None = None
) -> torch.Tensor:
    """The integers (int8 tensor, ``weight``'s shape) the fake-quantized integer-format ``weight``
    stands for: ``fake_quantize_weight(w) == q * scale``."""
    if kind not in (INT8, INT4):
        raise InputError(f"{kind} weights are not integers")
    fq = fake_quantize_weight(weight.detach().float(), scale, axis, kind, group_size)
    moved = fq.movedim(axis, 0)
    per_row = scale.reshape(scale.shape[0], -1)
    if kind == INT4:
        per_row = per_row.repeat_interleave(group_size, 1)
    else:
        per_row = per_row.expand(-1, moved[0].numel())
    return torch.round(moved.reshape(per_row.shape) / per_row).reshape(moved.shape).movedim(0, axis).to(torch.int8)


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """int8 scale and zero-point for values in ``[low, high]`` (the range is widened to hold 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    if high == low:
        return 1.0, 0
    scale = (high - low) / (ACT_QMAX - ACT_QMIN)
    zero_point = int(round(ACT_QMIN - low / scale))
    return scale, max(ACT_QMIN, min(ACT_QMAX, zero_point))


def fp8_activation_scale(low: float, high: float) -> float:
    """The per-tensor E4M3 scale of values in ``[low, high]``: ``max|x| / 448`` (1.0 for all zeros)."""
    amax = max(abs(low), abs(high))
    return amax / FP8_MAX if amax > 0 else 1.0
