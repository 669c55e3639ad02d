"""2:4 layers on sparse tensor cores: PyTorch's semi-structured kernels, chosen per layer by timing.

A 2:4 weight is stored compressed: the two kept values of every group of four along the
reduction dim, plus a 2-bit position for each.  :func:`compress_2to4` / :func:`decompress_2to4`
are this project's reference of that format (values ``[rows, cols/2]``; metadata ``uint8 [rows,
cols/8]``, one nibble ``i0 | i1 << 2`` per group, even groups in the low nibble).  The hardware
kernels use their own interleaved metadata layouts, produced by ``torch.sparse.to_sparse_semi_structured``
(CUTLASS / cuSPARSELt) and ``torch._cslt_compress``; what graphprune must get right is which
entries are kept along which dim, and the reference pins that down on CPU.

:func:`to_sparse_kernels` converts every eligible ``nn.Linear`` (a 2:4 mask in the linear layout,
fp16/bf16, shapes within the kernel's constraints) and keeps a layer dense when the sparse
kernel is not faster for the token count the example inputs give that layer, timed on the
device (decisions for equal shapes are timed once per call and returned, so they can be reused).
An int8 fake-quantized linear becomes :class:`Int8SparseLinear`: cuSPARSELt's int8 matmul with
the per-row scales ``s_x * s_w[r]`` fused as its alpha vector and the activation zero-point folded
into the bias.  Without a capable GPU the dense masked module is returned with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from graphprune.capture import ExampleInputs, eval_mode, normalize_inputs, set_eval, to_device
from graphprune.copying import clone
from graphprune.errors import InputError
from graphprune.quantization import ACT_QMAX, ACT_QMIN, FakeQuantWeight, integer_weight, strip_quantization
from graphprune.sparsity import LINEAR, NMMask, finalize

# ------------------------------------------------------------------ the reference 2:4 format


def compress_2to4(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, metadata) of a matrix with at most 2 non-zeros in every 4 consecutive columns.

    A group with fewer than two non-zeros keeps zeros at its first free positions, so every group
    has exactly two ascending positions, as the hardware format requires.
    """
    rows, cols = dense.shape
    if cols % 8:
        raise InputError(f"2:4 compression needs a multiple of 8 columns, got {cols}")
    groups = dense.reshape(rows, cols // 4, 4)
    nonzero = groups != 0
    if (nonzero.sum(-1) > 2).any():
        raise InputError("the matrix has more than 2 non-zeros in some group of 4: it is not 2:4 sparse")
    # rank positions: non-zeros first (in position order), then zeros; keep the first two, ascending
    order = torch.argsort((~nonzero).to(torch.int8) * 4 + torch.arange(4), dim=-1, stable=True)[..., :2]
    positions = order.sort(-1).values
    values = groups.gather(-1, positions).reshape(rows, cols // 2)
    nibbles = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)  # [rows, cols/4]
    metadata = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return values, metadata


def decompress_2to4(values: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    """The dense matrix that :func:`compress_2to4` compressed."""
    rows, half = values.shape
    nibbles = torch.stack([metadata & 0xF, metadata >> 4], dim=-1).reshape(rows, half // 2)
    positions = torch.stack([nibbles & 0x3, (nibbles >> 2) & 0x3], dim=-1).long()
    dense = torch.zeros(rows, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, values.reshape(rows, half // 2, 2))
    return dense.reshape(rows, half * 2)


# ------------------------------------------------------------------ int8 with fused scales


class Int8SparseLinear(nn.Module):
    """``y = alpha[r] * (W_q @ x_q)[r] + bias'[r]`` with ``alpha = s_x * s_w``, the int8 input
    ``x_q = clamp(round(x / s_x) + z_x)`` and ``bias' = bias - alpha * z_x * rowsum(W_q)`` (the
    zero-point folded out), which equals the fake-quantized linear in exact arithmetic.

    ``packed`` is the int8 weight as the backend wants it and ``matmul(packed, x_q^T, alpha)`` returns
    ``alpha[:, None] * (W_q @ x_q^T)``: cuSPARSELt's ``torch._cslt_sparse_mm`` on the
    ``torch._cslt_compress``-ed weight, or :func:`reference_int8_matmul` on the plain int8 weight.
    """

    def __init__(self, packed: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, input_scale: float,
                 input_zero_point: int, matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 out_dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("alpha", alpha)
        self.register_buffer("bias", bias)
        self.input_scale, self.input_zero_point = input_scale, input_zero_point
        self.matmul, self.out_dtype = matmul, out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q = torch.clamp(torch.round(x.reshape(-1, x.shape[-1]).float() / self.input_scale) + self.input_zero_point,
                        ACT_QMIN, ACT_QMAX).to(torch.int8)
        y = self.matmul(self.packed, q.t().contiguous(), self.alpha).t().float() + self.bias
        return y.to(self.out_dtype).reshape(*lead, -1)


def reference_int8_matmul(weight_q: torch.Tensor, x_q_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Exact integer product (float64 holds int8 dot products exactly), scaled per row."""
    return alpha.double()[:, None] * (weight_q.double() @ x_q_t.double())


def cusparselt_int8_matmul(packed: torch.Tensor, x_q_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """cuSPARSELt int8 x int8 with the per-row scales fused as the alpha vector (fp16 result)."""
    return torch._cslt_sparse_mm(packed, x_q_t, alpha=alpha, out_dtype=torch.float16)


def int8_sparse_linear(linear: nn.Linear, backend: str = "reference",
                       out_dtype: torch.dtype = torch.float32) -> Int8SparseLinear:
    """The :class:`Int8SparseLinear` equivalent of a fake-quantized (and 2:4-masked) ``nn.Linear``;
    ``backend`` is ``"reference"`` (any device) or ``"cusparselt"`` (CUDA)."""
    weights = linear.parametrizations["weight"]
    fq = next(p for p in weights if isinstance(p, FakeQuantWeight))
    original = weights.original.detach()
    for p in weights:
        if isinstance(p, NMMask):
            original = original * p.mask
    weight_q = integer_weight(original, fq.scale, 0)
    s_x, z_x = linear.qinput_scale.item(), int(linear.qinput_zero_point.item())
    alpha = (linear.qinput_scale * fq.scale).double()
    bias = linear.bias.detach().double() if linear.bias is not None else torch.zeros_like(alpha)
    bias = bias - alpha * z_x * weight_q.double().sum(1)
    if backend == "cusparselt":
        packed, matmul = torch._cslt_compress(weight_q.cuda()), cusparselt_int8_matmul
    elif backend == "reference":
        packed, matmul = weight_q, reference_int8_matmul
    else:
        raise InputError(f"int8 sparse backend must be 'reference' or 'cusparselt', got {backend!r}")
    return Int8SparseLinear(packed, alpha.float().to(packed.device), bias.float().to(packed.device), s_x, z_x,
                            matmul, out_dtype)


# ------------------------------------------------------------------ conversion


@dataclass
class KernelDecision:
    layer: str
    choice: str  # "sparse" or "dense"
    reason: str
    dense_ms: float | None = None
    sparse_ms: float | None = None


@dataclass
class SparseKernelReport:
    device: str
    unavailable: str | None = None  # why no layer could use sparse kernels
    decisions: list[KernelDecision] = field(default_factory=list)
    timings: dict[tuple, tuple[float, float]] = field(default_factory=dict)  # shape key -> (dense, sparse) ms

    def __str__(self) -> str:
        if self.unavailable:
            return f"sparse kernels not used: {self.unavailable}; the module is the dense masked one"
        lines = [f"sparse kernels on {self.device}: {sum(d.choice == 'sparse' for d in self.decisions)} of "
                 f"{len(self.decisions)} 2:4 layers"]
        for d in self.decisions:
            timing = f" (dense {d.dense_ms:.3f} ms, sparse {d.sparse_ms:.3f} ms)" if d.dense_ms is not None else ""
            lines.append(f"  {d.layer}: {d.choice}, {d.reason}{timing}")
        return "\n".join(lines)


def kernel_support() -> str | None:
    """None when this process can run 2:4 tensor-core kernels, else why not."""
    if not torch.cuda.is_available():
        return f"no CUDA device (this PyTorch is {torch.__version__}, CUDA {torch.version.cuda or 'none'})"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{torch.cuda.get_device_name()} (sm_{major}{minor}) has no sparse tensor cores (sm_80 or newer)"
    return None


def shape_constraint(dtype: torch.dtype) -> tuple[int, int] | None:
    """(rows, cols) multiples the semi-structured backend PyTorch will use needs for ``dtype``."""
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT, \
        SparseSemiStructuredTensorCUTLASS

    cusparselt = torch.backends.cusparselt.is_available() and not SparseSemiStructuredTensor._FORCE_CUTLASS
    table = (SparseSemiStructuredTensorCUSPARSELT if cusparselt else SparseSemiStructuredTensorCUTLASS)._DTYPE_SHAPE_CONSTRAINTS
    config = table.get(dtype)
    return None if config is None else (config.sparse_min_rows, config.sparse_min_cols)


def eligible(linear: nn.Module, dtype: torch.dtype) -> str | None:
    """None if ``linear`` can run a 2:4 kernel in ``dtype``, else why not."""
    if not isinstance(linear, nn.Linear):
        return "not an nn.Linear"
    masks = [p for p in linear.parametrizations["weight"] if isinstance(p, NMMask)] \
        if hasattr(linear, "parametrizations") and "weight" in linear.parametrizations else []
    if not masks or (masks[0].pattern.n, masks[0].pattern.m, masks[0].pattern.layout) != (2, 4, LINEAR):
        return "no 2:4 mask along the input features"
    constraint = shape_constraint(dtype)
    if constraint is None:
        return f"no semi-structured kernel for {dtype}"
    rows, cols = linear.out_features, linear.in_features
    if rows % constraint[0] or cols % constraint[1]:
        return f"shape {rows}x{cols} is not a multiple of {constraint[0]}x{constraint[1]} for {dtype}"
    return None


def to_sparse_kernels(module: nn.Module, example_inputs: ExampleInputs, *, dtype: torch.dtype = torch.float16,
                      timings: dict[tuple, tuple[float, float]] | None = None,
                      repeats: int = 50) -> tuple[nn.Module, SparseKernelReport]:
    """A copy of ``module`` on the GPU in ``dtype`` whose eligible 2:4 linears call sparse kernels
    where that is faster for the token count the example inputs give them (int8 fake-quantized
    ones the int8 kernel with fused scales); the report says which and why.  ``timings`` from an
    earlier report skip re-timing equal shapes.  Without a capable GPU: the dense masked module
    (masks baked in, quantization kept) and the reason."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise InputError(f"to_sparse_kernels runs fp16 or bf16 layers, got {dtype}")
    model = clone(module)
    reason = kernel_support()
    if reason is not None:
        return finalize(model), SparseKernelReport("cpu", unavailable=reason)
    report = SparseKernelReport(torch.cuda.get_device_name(), timings=dict(timings or {}))
    candidates: dict[str, nn.Linear] = {}
    int8: dict[str, Int8SparseLinear] = {}
    for name, layer in model.named_modules():
        if not (isinstance(layer, nn.Linear) and hasattr(layer, "parametrizations") and "weight" in layer.parametrizations):
            continue
        quantized = any(isinstance(p, FakeQuantWeight) for p in layer.parametrizations["weight"])
        why = eligible(layer, torch.int8 if quantized else dtype)
        if quantized and why is None and not torch.backends.cusparselt.is_available():
            why = "int8 2:4 needs cuSPARSELt, which this PyTorch build lacks"
        if why is None:
            candidates[name] = layer
            if quantized:
                int8[name] = int8_sparse_linear(layer, "cusparselt", out_dtype=dtype)
        elif why != "no 2:4 mask along the input features":
            report.decisions.append(KernelDecision(name, "dense", why))
    device = torch.device("cuda")
    set_eval(strip_quantization(finalize(model)).to(device=device, dtype=dtype))
    tokens = _tokens_per_layer(model, candidates, example_inputs, device, dtype)
    from torch.sparse import to_sparse_semi_structured

    for name, layer in candidates.items():
        if name not in tokens:
            report.decisions.append(KernelDecision(name, "dense", "not called on the example inputs"))
            continue
        kind = "int8" if name in int8 else str(dtype).removeprefix("torch.")
        key = (report.device, kind, layer.out_features, layer.in_features, tokens[name])
        if key not in report.timings:
            report.timings[key] = _time_layer(layer, int8.get(name), tokens[name], repeats)
        dense_ms, sparse_ms = report.timings[key]
        verdict = f"{kind} 2:4 {'faster' if sparse_ms < dense_ms else 'not faster'} at {tokens[name]} tokens"
        if sparse_ms >= dense_ms:
            report.decisions.append(KernelDecision(name, "dense", verdict, dense_ms, sparse_ms))
            continue
        if name in int8:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, int8[name])
        else:
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
        report.decisions.append(KernelDecision(name, "sparse", verdict, dense_ms, sparse_ms))
    return model, report


def _tokens_per_layer(model: nn.Module, layers: dict[str, nn.Linear], example_inputs: ExampleInputs,
                      device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    args, kwargs = normalize_inputs(example_inputs)
    args, kwargs = pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                   else t, to_device((args, kwargs), device))
    seen: dict[str, int] = {}
    handles = [layer.register_forward_pre_hook(lambda _m, a, name=name: seen.__setitem__(name, a[0].numel() // a[0].shape[-1]))
               for name, layer in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _time_layer(layer: nn.Linear, int8: Int8SparseLinear | None, tokens: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of the dense linear and its sparse replacement for ``tokens`` rows."""
    from torch.sparse import to_sparse_semi_structured

    x = torch.randn(tokens, layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype)
    if int8 is not None:
        sparse: Callable[[], torch.Tensor] = lambda: int8(x)  # noqa: E731
    else:
        weight = to_sparse_semi_structured(layer.weight.detach())
        sparse = lambda: F.linear(x, weight, layer.bias)  # noqa: E731
    return median_ms(lambda: F.linear(x, layer.weight, layer.bias), repeats), median_ms(sparse, repeats)


def median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]
