"""Dense vs 2:4 semi-structured GEMMs on a GPU, for LLaMA-7B shapes, and one LLaMA-shaped block.

(a) ``y = x @ W.T`` for W of 4096x4096, 11008x4096 and 4096x11008 at 1 to 8192 tokens:
    fp16 dense (cuBLAS) against fp16 2:4 (:class:`graphprune.emit.sparse_kernels.SemiStructuredLinear`,
    the layer ``to_sparse_kernels`` installs: a semi-structured weight, row-major result), and int8
    dense (``torch._int_mm``) against int8 2:4 (cuSPARSELt), both int8 layers being
    :class:`graphprune.emit.sparse_kernels.Int8SparseLinear` (input quantization, per-row scales, bias
    included) so that only the matrix product differs.  Prints milliseconds per call and the
    dense/sparse speedups, each twice: called eagerly from Python (what ``to_sparse_kernels``
    times and decides by), and replayed from a CUDA graph (no host cost: the kernels alone, as a
    graph-captured deployment sees them).  A cell the kernel refuses prints n/a.
(b) A LLaMA-7B-shaped decoder (transformers' LlamaModel, one layer, random weights), 2:4 by
    graphprune's NMSparsity and converted with ``to_sparse_kernels`` for each token count and
    each timing mode (it keeps a layer dense where 2:4 is not faster in that mode); prints the
    model's latency dense vs converted, run the same way, and the error.

Needs a CUDA GPU with sparse tensor cores (sm_80+); elsewhere it says so and exits.

    python -m bench.sparse_gemm_gpu
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.algorithms.nm import LINEAR, NMPattern, nm_mask
from graphprune.emit.sparse_kernels import (
    Int8SparseLinear,
    captured,
    int8_sparse_linear,
    kernel_support,
    median_ms,
    sparse_replacement,
    to_sparse_kernels,
    uses_cusparselt,
)
from graphprune.frontends.torch.copying import clone
from graphprune.passes import NMSparsity, Quantize

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
TOKENS = [1, 16, 64, 256, 1024, 4096, 8192]
BLOCK_TOKENS = [1, 128, 2048, 8192]


def main() -> None:
    reason = kernel_support()
    if reason is not None:
        print(f"no run: {reason}")
        return
    backend = "cuSPARSELt, algorithm searched per shape" if uses_cusparselt() else "CUTLASS"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16 2:4 backend {backend}")
    print("eager: each call dispatched from Python; graph: the same calls replayed from a CUDA graph")
    print(f"{'':<19}{'---------------- eager ----------------':^40}  {'---------------- graph ----------------':^40}")
    header = f"{'fp16 dense':>11}{'fp16 2:4':>10}{'speedup':>9}{'int8 dense':>11}{'int8 2:4':>10}{'speedup':>9}"
    print(f"{'out x in':<12}{'tokens':>7}{header}  {header}")
    for out_f, in_f in SHAPES:
        layer = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.float16)
        weight = layer.weight.data = _two_four(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16))
        fake_quant = _fake_quant(weight)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
            sparse = sparse_replacement(layer, None, tokens, torch.float16, None)[0]
            int8_sparse, int8_dense = _int8_layers(layer, fake_quant, tokens)
            calls = [lambda: F.linear(x, weight), lambda: sparse(x), lambda: int8_dense(x), lambda: int8_sparse(x)]
            eager = _row([_ms(call) for call in calls])
            graph = _row([_ms(call, graph=True) for call in calls])
            print(f"{f'{out_f}x{in_f}':<12}{tokens:>7}{eager}  {graph}")
    block_rows()


def _ms(fn: Callable[[], object], graph: bool = False, repeats: int = 30, calls: int = 10) -> float | str:
    try:
        return median_ms(captured(fn) if graph else fn, repeats, calls)
    except (RuntimeError, ValueError) as error:
        return " ".join(str(error).split()[:4])


def _row(cells: list[float | str]) -> str:
    return (
        f"{_fmt(cells[0]):>11}{_fmt(cells[1]):>10}{_ratio(cells[0], cells[1]):>9}"
        f"{_fmt(cells[2]):>11}{_fmt(cells[3]):>10}{_ratio(cells[2], cells[3]):>9}"
    )


def _fmt(cell: float | str, digits: int = 3) -> str:
    return f"{cell:.{digits}f}" if isinstance(cell, float) else "n/a"


def _ratio(dense: float | str, sparse: float | str) -> str:
    return f"{dense / sparse:.2f}x" if isinstance(dense, float) and isinstance(sparse, float) else "-"


def _two_four(weight: torch.Tensor) -> torch.Tensor:
    return weight * nm_mask(weight.abs(), NMPattern(2, 4, LINEAR))


def _fake_quant(weight: torch.Tensor) -> nn.Linear:
    """A 2:4 int8 fake-quantized nn.Linear holding ``weight``."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight.float().cpu())
    x = torch.randn(16, weight.shape[1])
    return gp.prune(
        nn.Sequential(linear, nn.ReLU()),
        (x,),
        passes=[NMSparsity(2, 4, dense_heads=False), Quantize()],
        calibration=[(x,)],
    ).module[0]


def _int8_layers(layer: nn.Linear, fake_quant: nn.Linear, tokens: int) -> tuple[Callable, Callable]:
    """The int8 2:4 layer (cuSPARSELt, algorithm searched for ``tokens``) of ``fake_quant``, and the
    same layer with a dense int8 product (``torch._int_mm``)."""
    plain = int8_sparse_linear(fake_quant, "reference", out_dtype=torch.float16).cuda()
    dense = Int8SparseLinear(
        plain.packed, plain.alpha, plain.bias, plain.input_scale, plain.input_zero_point, _int_mm_scaled, torch.float16
    )
    if not torch.backends.cusparselt.is_available():
        return _needs_cusparselt, dense
    return sparse_replacement(layer, fake_quant, tokens, torch.float16, None)[0], dense


def _needs_cusparselt(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("int8 2:4 needs cuSPARSELt")


def _int_mm_scaled(weight_q: torch.Tensor, x_q_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return alpha[:, None] * torch._int_mm(weight_q, x_q_t).float()


def block_rows() -> None:
    import transformers as T

    cfg = T.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=1,
        vocab_size=32000,
    )
    torch.manual_seed(0)
    model = T.LlamaModel(cfg).eval()
    result = gp.prune(model, {"input_ids": torch.randint(0, 32000, (1, 128))}, passes=[NMSparsity(2, 4)])
    dense = gp.finalize(clone(result.module)).half().cuda()  # finalize bakes masks in place
    print("\nLLaMA-7B-shaped decoder (1 layer), fp16; converted with to_sparse_kernels(timing=mode)")
    print("(dense is timed before and after the converted module, to show the run-to-run spread)")
    print(f"{'mode':<6}{'tokens':>7}{'dense ms':>14}{'2:4 ms':>9}{'speedup':>9}{'rel err':>9}  sparse layers")
    timings: dict = {}
    for mode in ("eager", "graph"):
        for tokens in BLOCK_TOKENS:
            ids = {"input_ids": torch.randint(0, 32000, (1, tokens))}
            converted, report = to_sparse_kernels(result.module, ids, timing=mode, timings=timings)
            timings = report.timings
            cuda_ids = {"input_ids": ids["input_ids"].cuda(), "use_cache": False}
            with torch.no_grad():
                want = dense(**cuda_ids).last_hidden_state.float()
                got = converted(**cuda_ids).last_hidden_state.float()
            error = ((got - want).norm() / want.norm()).item()
            times = [
                _ms(lambda m=m: m(**cuda_ids), graph=mode == "graph", repeats=10, calls=3)
                for m in (dense, converted, dense)
            ]
            chosen = [d.layer.rsplit(".", 1)[-1] for d in report.decisions if d.choice == "sparse"]
            spread = f"{_fmt(times[0], 2)}/{_fmt(times[2], 2)}"
            mean = (times[0] + times[2]) / 2 if all(isinstance(t, float) for t in times) else "-"
            print(
                f"{mode:<6}{tokens:>7}{spread:>14}{_fmt(times[1], 2):>9}{_ratio(mean, times[1]):>9}{error:>9.1e}  "
                f"{len(chosen)}/{len(report.decisions)} {','.join(chosen)}"
            )


if __name__ == "__main__":
    main()
