"""2:4 layers on sparse tensor cores: PyTorch's semi-structured kernels, chosen per layer by timing.

A 2:4 weight is stored compressed: the two kept values of every group of four along the
reduction dim, plus a 2-bit position for each.  :func:`compress_2to4` / :func:`decompress_2to4`
are this project's reference of that format (values ``[rows, cols/2]``; metadata ``uint8 [rows,
cols/8]``, one nibble ``i0 | i1 << 2`` per group, even groups in the low nibble).  The hardware
kernels use their own interleaved metadata layouts, produced by ``torch.sparse.to_sparse_semi_structured``
(CUTLASS / cuSPARSELt) and ``torch._cslt_compress``; what graphprune must get right is which
entries are kept along which dim, and the reference pins that down on CPU.

:func:`to_sparse_kernels` converts every eligible ``nn.Linear`` (a 2:4 mask in the linear layout,
fp16/bf16, shapes within the kernel's constraints) into a :class:`SemiStructuredLinear` and keeps
a layer dense when the sparse kernel is not faster for the token count the example inputs give
that layer, timed on the device, eagerly or in CUDA graphs (decisions for equal shapes are timed
once per call and returned, so they can be reused); with cuSPARSELt, the algorithm is the one
its own search finds fastest for that token count.
An int8 fake-quantized linear becomes :class:`Int8SparseLinear`: cuSPARSELt's int8 matmul with
the per-row scales ``s_x * s_w[r]`` fused as its alpha vector and the activation zero-point folded
into the bias.  Without a capable GPU the dense masked module is returned with the reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from graphprune.algorithms.nm import LINEAR
from graphprune.algorithms.number_formats import ACT_QMAX, ACT_QMIN, INT8, integer_weight
from graphprune.emit.devices import for_gpu
from graphprune.emit.roofline import linear_cost, two_four_speedup
from graphprune.errors import InputError
from graphprune.frontends.torch.capture import ExampleInputs, eval_mode, normalize_inputs, set_eval, to_device
from graphprune.frontends.torch.copying import clone
from graphprune.frontends.torch.fake_quant import FakeQuantWeight, read_quant_plan, strip_quantization
from graphprune.frontends.torch.masks import NMMask, finalize

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


INT8_ROW_MULTIPLE = 16  # cuSPARSELt's int8 dense operand: rows (tokens) padded to a multiple of this


class Int8SparseLinear(nn.Module):
    """``y = alpha[r] * (W_q @ x_q)[r] + bias'[r]`` with ``alpha = s_x * s_w``, the int8 input
    ``x_q = clamp(round(x / s_x) + z_x)`` and ``bias' = bias - alpha * z_x * rowsum(W_q)`` (the
    zero-point folded out), which equals the fake-quantized linear in exact arithmetic.

    ``packed`` is the int8 weight as the backend wants it and ``matmul(packed, x_q^T, alpha)`` returns
    ``alpha[:, None] * (W_q @ x_q^T)``: cuSPARSELt's ``torch._cslt_sparse_mm`` on the
    ``torch._cslt_compress``-ed weight, or :func:`reference_int8_matmul` on the plain int8 weight.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        alpha: torch.Tensor,
        bias: torch.Tensor,
        input_scale: float,
        input_zero_point: int,
        matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        out_dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("alpha", alpha)
        self.register_buffer("bias", bias)
        self.input_scale, self.input_zero_point = input_scale, input_zero_point
        self.matmul, self.out_dtype = matmul, out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, rows = x.shape[:-1], x.numel() // x.shape[-1]
        q = torch.clamp(
            torch.round(x.reshape(rows, -1).float() / self.input_scale) + self.input_zero_point, ACT_QMIN, ACT_QMAX
        ).to(torch.int8)
        # cuSPARSELt's int8 kernels take the dense operand only as a column-major view (q.t(), not
        # a contiguous copy) with a multiple of 16 rows ("operation not supported" otherwise)
        q = F.pad(q, (0, 0, 0, -rows % INT8_ROW_MULTIPLE))
        product = self.matmul(self.packed, q.t(), self.alpha).t()[:rows]
        # the product comes out transposed: adding the bias into a row-major buffer hands on a
        # row-major result, which keeps what follows on its fast paths (see SemiStructuredLinear)
        y = torch.add(product, self.bias, out=product.new_empty(product.shape, dtype=torch.float32))
        return y.to(self.out_dtype).reshape(*lead, -1)


class SemiStructuredLinear(nn.Module):
    """An fp16/bf16 linear whose weight is a 2:4 ``SparseSemiStructuredTensor``, returning a
    row-major result.

    PyTorch's semi-structured linear returns the transpose of the kernel's output, a
    column-major view; left so, it pushes what follows off its fast paths (on an H100 the
    attention of a LLaMA block fell from cuDNN's fp16 flash kernel to the float32 math fallback,
    2.6x slower end to end), so the result is copied row-major once here.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias).contiguous()

    def extra_repr(self) -> str:
        algorithm = getattr(self.weight, "alg_id_cusparselt", None)
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, 2:4 {type(self.weight).__name__}" + (
            "" if algorithm is None else f", cuSPARSELt algorithm {algorithm}"
        )


def reference_int8_matmul(weight_q: torch.Tensor, x_q_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Exact integer product (float64 holds int8 dot products exactly), scaled per row."""
    return alpha.double()[:, None] * (weight_q.double() @ x_q_t.double())


def cusparselt_int8_matmul(
    packed: torch.Tensor, x_q_t: torch.Tensor, alpha: torch.Tensor, algorithm: int = 0
) -> torch.Tensor:
    """cuSPARSELt int8 x int8 with the per-row scales fused as the alpha vector (fp16 result)."""
    return torch._cslt_sparse_mm(packed, x_q_t, alpha=alpha, out_dtype=torch.float16, alg_id=algorithm)


def int8_sparse_linear(
    linear: nn.Linear, backend: str = "reference", out_dtype: torch.dtype = torch.float32, algorithm: int = 0
) -> Int8SparseLinear:
    """The :class:`Int8SparseLinear` equivalent of a fake-quantized (and 2:4-masked) ``nn.Linear``;
    ``backend`` is ``"reference"`` (any device) or ``"cusparselt"`` (CUDA, with that cuSPARSELt
    ``algorithm`` id: see :func:`tuned_algorithm`)."""
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
        packed = torch._cslt_compress(weight_q.cuda())
        matmul = functools.partial(cusparselt_int8_matmul, algorithm=algorithm)
    elif backend == "reference":
        packed, matmul = weight_q, reference_int8_matmul
    else:
        raise InputError(f"int8 sparse backend must be 'reference' or 'cusparselt', got {backend!r}")
    return Int8SparseLinear(
        packed, alpha.float().to(packed.device), bias.float().to(packed.device), s_x, z_x, matmul, out_dtype
    )


# ------------------------------------------------------------------ conversion


@dataclass
class KernelDecision:
    layer: str
    choice: str  # "sparse" or "dense"
    reason: str
    dense_ms: float | None = None
    sparse_ms: float | None = None
    predicted_speedup: float | None = None  # the roofline's, where the GPU is in its table


@dataclass(frozen=True)
class ShapeTiming:
    """What the device measured for one (device, dtype, out, in, tokens) layer shape."""

    dense_ms: float
    sparse_ms: float
    algorithm: int  # the cuSPARSELt algorithm id the sparse figure was measured with (0 under CUTLASS)


@dataclass
class SparseKernelReport:
    device: str
    unavailable: str | None = None  # why no layer could use sparse kernels
    decisions: list[KernelDecision] = field(default_factory=list)
    timings: dict[tuple, ShapeTiming] = field(default_factory=dict)  # (device, kind, out, in, tokens, timing) -> ...

    def __str__(self) -> str:
        if self.unavailable:
            return f"sparse kernels not used: {self.unavailable}; the module is the dense masked one"
        lines = [
            f"sparse kernels on {self.device}: {sum(d.choice == 'sparse' for d in self.decisions)} of "
            f"{len(self.decisions)} 2:4 layers"
        ]
        for d in self.decisions:
            timing = f" (dense {d.dense_ms:.3f} ms, sparse {d.sparse_ms:.3f} ms)" if d.dense_ms is not None else ""
            if d.predicted_speedup is not None:
                measured = f", measured {d.dense_ms / d.sparse_ms:.2f}x" if d.dense_ms and d.sparse_ms else ""
                timing += f" (roofline predicts {d.predicted_speedup:.2f}x{measured})"
            lines.append(f"  {d.layer}: {d.choice}, {d.reason}{timing}")
        return "\n".join(lines)


def kernel_support() -> str | None:
    """None when this process can run 2:4 tensor-core kernels, else why not."""
    if not torch.cuda.is_available():
        return f"no CUDA device (this PyTorch is {torch.__version__}, CUDA {torch.version.cuda or 'none'})"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{torch.cuda.get_device_name()} (sm_{major}{minor}) has no sparse tensor cores (sm_80 or newer)"
    if major > 8 and not uses_cusparselt():
        # seen on an H100 (torch 2.11): the CUTLASS kernels raise "Supported only on GPUs with compute capability 8.x"
        return (
            f"{torch.cuda.get_device_name()} (sm_{major}{minor}) needs cuSPARSELt, which this PyTorch does not "
            "use: its CUTLASS 2:4 kernels run on sm_8x only"
        )
    return None


def uses_cusparselt() -> bool:
    """Whether ``to_sparse_semi_structured`` builds cuSPARSELt tensors (else CUTLASS ones)."""
    from torch.sparse import SparseSemiStructuredTensor

    return torch.backends.cusparselt.is_available() and not SparseSemiStructuredTensor._FORCE_CUTLASS


def tuned_algorithm(
    compressed: torch.Tensor, in_features: int, tokens: int, dtype: torch.dtype, **options: object
) -> int:
    """cuSPARSELt's fastest algorithm id for ``tokens`` input rows, by its own search.

    Its default algorithm is far from the best for some shapes (on an H100 the search picked a
    non-default one for a 4096x4096 product), and which one wins depends on the token count.  The
    dense operand is laid out as the kernels receive it: a column-major view, rows padded to 16.
    """
    rows = -(-tokens // INT8_ROW_MULTIPLE) * INT8_ROW_MULTIPLE
    if dtype == torch.int8:
        x = torch.randint(-127, 128, (rows, in_features), dtype=dtype, device=compressed.device)
    else:
        x = torch.randn(rows, in_features, dtype=dtype, device=compressed.device)
    return int(torch._cslt_sparse_mm_search(compressed, x.t(), **options))


def semi_structured_weight(weight: torch.Tensor, algorithm: int = 0) -> torch.Tensor:
    """``weight`` (2:4 along its columns, on the GPU) as the tensor PyTorch's 2:4 kernels take;
    ``algorithm`` is the cuSPARSELt algorithm id (CUTLASS has none)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, to_sparse_semi_structured

    if not uses_cusparselt():
        return to_sparse_semi_structured(weight)
    sparse = SparseSemiStructuredTensorCUSPARSELT.from_dense(weight)
    sparse.alg_id_cusparselt = algorithm  # set after: from_dense takes no alg_id before torch 2.13
    return sparse


def shape_constraint(dtype: torch.dtype) -> tuple[int, int] | None:
    """(rows, cols) multiples the semi-structured backend PyTorch will use needs for ``dtype``."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    table = (
        SparseSemiStructuredTensorCUSPARSELT if uses_cusparselt() else SparseSemiStructuredTensorCUTLASS
    )._DTYPE_SHAPE_CONSTRAINTS
    config = table.get(dtype)
    return None if config is None else (config.sparse_min_rows, config.sparse_min_cols)


def eligible(linear: nn.Module, dtype: torch.dtype) -> str | None:
    """None if ``linear`` can run a 2:4 kernel in ``dtype``, else why not."""
    if not isinstance(linear, nn.Linear):
        return "not an nn.Linear"
    masks = (
        [p for p in linear.parametrizations["weight"] if isinstance(p, NMMask)]
        if hasattr(linear, "parametrizations") and "weight" in linear.parametrizations
        else []
    )
    if not masks or (masks[0].pattern.n, masks[0].pattern.m, masks[0].pattern.layout) != (2, 4, LINEAR):
        return "no 2:4 mask along the input features"
    constraint = shape_constraint(dtype)
    if constraint is None:
        return f"no semi-structured kernel for {dtype}"
    rows, cols = linear.out_features, linear.in_features
    if rows % constraint[0] or cols % constraint[1]:
        return f"shape {rows}x{cols} is not a multiple of {constraint[0]}x{constraint[1]} for {dtype}"
    return None


def to_sparse_kernels(
    module: nn.Module,
    example_inputs: ExampleInputs,
    *,
    dtype: torch.dtype = torch.float16,
    timings: dict[tuple, ShapeTiming] | None = None,
    repeats: int = 50,
    choose: str = "timed",
    timing: str = "eager",
) -> tuple[nn.Module, SparseKernelReport]:
    """A copy of ``module`` on the GPU in ``dtype`` whose eligible 2:4 linears call sparse kernels
    where that is faster for the token count the example inputs give them (int8 fake-quantized
    ones the int8 kernel with fused scales); the report says which and why.  ``timings`` from an
    earlier report skip re-timing (and re-searching the cuSPARSELt algorithm of) equal shapes.
    Without a capable GPU: the dense masked module (masks baked in, quantization kept) and the
    reason.

    ``timing`` says how the module will run, and so how both candidates are timed: ``"eager"``
    (each call dispatched from Python) or ``"graph"`` (replayed from a CUDA graph, as under
    ``torch.cuda.graphs`` or ``torch.compile(mode="reduce-overhead")``).  It matters: PyTorch's
    cuSPARSELt binding pays a host cost per call (about 0.6 to 1 ms on an H100 with torch 2.11)
    that a graph removes, so 2:4 loses eagerly below thousands of tokens and wins in graphs at
    almost every LLaMA-7B shape (docs/RESULTS.md).  ``choose="sparse"`` converts every eligible
    layer without timing, for testing the kernels themselves.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise InputError(f"to_sparse_kernels runs fp16 or bf16 layers, got {dtype}")
    if choose not in ("timed", "sparse"):
        raise InputError(f"choose must be 'timed' or 'sparse', got {choose!r}")
    if timing not in ("eager", "graph"):
        raise InputError(f"timing must be 'eager' or 'graph', got {timing!r}")
    plan = read_quant_plan(module)
    if plan is not None and plan.kind != INT8:
        raise InputError(
            f"to_sparse_kernels runs float and int8 models; this one is quantized to {plan.kind}, for which "
            "PyTorch has no 2:4 kernel (cuSPARSELt takes int8, fp16 and bf16): export it to ONNX instead"
        )
    model = clone(module)
    reason = kernel_support()
    if reason is not None:
        return finalize(model), SparseKernelReport("cpu", unavailable=reason)
    report = SparseKernelReport(torch.cuda.get_device_name(), timings=dict(timings or {}))
    candidates: dict[str, nn.Linear] = {}
    fake_quant: dict[str, nn.Linear] = {}  # the int8 candidates as they were, to build Int8SparseLinear from
    for name, layer in model.named_modules():
        if not (
            isinstance(layer, nn.Linear) and hasattr(layer, "parametrizations") and "weight" in layer.parametrizations
        ):
            continue
        quantized = any(isinstance(p, FakeQuantWeight) for p in layer.parametrizations["weight"])
        why = eligible(layer, torch.int8 if quantized else dtype)
        if quantized and why is None and not torch.backends.cusparselt.is_available():
            why = "int8 2:4 needs cuSPARSELt, which this PyTorch build lacks"
        if why is None:
            candidates[name] = layer
            if quantized:
                fake_quant[name] = clone(layer)
        elif why != "no 2:4 mask along the input features":
            report.decisions.append(KernelDecision(name, "dense", why))
    device = torch.device("cuda")
    set_eval(strip_quantization(finalize(model)).to(device=device, dtype=dtype))
    tokens = _tokens_per_layer(model, candidates, example_inputs, device, dtype)
    gpu = for_gpu(torch.cuda.get_device_name())  # the roofline's prediction beside each measurement
    for name, layer in candidates.items():
        if name not in tokens:
            report.decisions.append(KernelDecision(name, "dense", "not called on the example inputs"))
            continue
        kind = "int8" if name in fake_quant else str(dtype).removeprefix("torch.")
        key = (report.device, kind, layer.out_features, layer.in_features, tokens[name], timing)
        predicted = (
            two_four_speedup(
                gpu,
                {"float16": "fp16", "bfloat16": "bf16"}.get(kind, kind),
                linear_cost(layer.out_features, layer.in_features, tokens[name]),
            )
            if gpu is not None
            else None
        )
        known = report.timings.get(key)
        replacement, algorithm = sparse_replacement(
            layer, fake_quant.get(name), tokens[name], dtype, None if known is None else known.algorithm
        )
        algorithm_note = f" (cuSPARSELt algorithm {algorithm})" if uses_cusparselt() else ""
        faster = True
        if choose == "sparse":
            verdict, dense_ms, sparse_ms = f"{kind} 2:4, asked for (choose='sparse'){algorithm_note}", None, None
        else:
            if known is None:
                known = report.timings[key] = ShapeTiming(
                    *_time_layer(layer, replacement, tokens[name], repeats, timing == "graph"), algorithm
                )
            dense_ms, sparse_ms = known.dense_ms, known.sparse_ms
            faster = sparse_ms < dense_ms
            verdict = (
                f"{kind} 2:4 {'faster' if faster else 'not faster'} at {tokens[name]} tokens, timed {timing}"
                f"{algorithm_note}"
            )
        if faster:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, replacement)
        report.decisions.append(
            KernelDecision(
                layer=name,
                choice="sparse" if faster else "dense",
                reason=verdict,
                dense_ms=dense_ms,
                sparse_ms=sparse_ms,
                predicted_speedup=predicted,
            )
        )
    return model, report


def sparse_replacement(
    layer: nn.Linear, fake_quant: nn.Linear | None, tokens: int, dtype: torch.dtype, algorithm: int | None
) -> tuple[Int8SparseLinear | SemiStructuredLinear, int]:
    """The 2:4 stand-in for ``layer`` (fp16/bf16 on the GPU, 2:4 masks baked in) and its cuSPARSELt
    algorithm (searched for ``tokens`` input rows when None): an :class:`Int8SparseLinear` built
    from ``fake_quant``, the layer's int8 fake-quantized original, when given; else a
    :class:`SemiStructuredLinear`."""
    if fake_quant is not None:
        if algorithm is None:
            probe = int8_sparse_linear(fake_quant, "cusparselt", out_dtype=dtype)
            algorithm = tuned_algorithm(
                probe.packed, layer.in_features, tokens, torch.int8, alpha=probe.alpha, out_dtype=torch.float16
            )
        return int8_sparse_linear(fake_quant, "cusparselt", out_dtype=dtype, algorithm=algorithm), algorithm
    weight = layer.weight.detach()
    if algorithm is None:
        algorithm = (
            tuned_algorithm(torch._cslt_compress(weight), layer.in_features, tokens, dtype) if uses_cusparselt() else 0
        )
    bias = None if layer.bias is None else layer.bias.detach()
    return SemiStructuredLinear(semi_structured_weight(weight, algorithm), bias), algorithm


def _tokens_per_layer(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    example_inputs: ExampleInputs,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, int]:
    args, kwargs = normalize_inputs(example_inputs)
    args, kwargs = pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        to_device((args, kwargs), device),
    )
    seen: dict[str, int] = {}
    handles = [
        layer.register_forward_pre_hook(lambda _m, a, name=name: seen.__setitem__(name, a[0].numel() // a[0].shape[-1]))
        for name, layer in layers.items()
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _time_layer(
    layer: nn.Linear, replacement: nn.Module, tokens: int, repeats: int, graph: bool
) -> tuple[float, float]:
    """Median milliseconds of the dense linear and its sparse replacement for ``tokens`` rows,
    called eagerly or (``graph``) replayed from CUDA graphs."""
    x = torch.randn(tokens, layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype)
    sparse: Callable[[], torch.Tensor] = lambda: replacement(x)  # noqa: E731
    dense: Callable[[], torch.Tensor] = lambda: F.linear(x, layer.weight, layer.bias)  # noqa: E731
    if graph:
        return median_ms(captured(dense), repeats), median_ms(captured(sparse), repeats)
    return median_ms(dense, repeats), median_ms(sparse, repeats)


def captured(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` recorded once into a CUDA graph (after warm-up calls on a side stream, as capture
    requires); the returned callable replays it on the current stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    return graph.replay


def median_ms(fn: Callable[[], object], repeats: int, calls: int = 10) -> float:
    """Median milliseconds per call of ``fn`` on the current CUDA stream.

    Each sample times ``calls`` back-to-back calls between two CUDA events, so the figure is the
    steady-state cost of the layer in eager mode: kernel time, or the host's dispatch time where
    that is longer (as it is for small shapes), which is what the model will pay.
    """
    with torch.no_grad():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls)
    return sorted(samples)[len(samples) // 2]
