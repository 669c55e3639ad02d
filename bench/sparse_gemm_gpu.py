"""Dense vs 2:4 semi-structured GEMMs on a GPU, for LLaMA-7B shapes, and one LLaMA-shaped block.

(a) ``y = x @ W.T`` for W of 4096x4096, 11008x4096 and 4096x11008 at 1 to 8192 tokens, in fp16
    (``torch.sparse.to_sparse_semi_structured``) and int8 (cuSPARSELt through
    :class:`graphprune.sparse_kernels.Int8SparseLinear`, per-row scales fused, against a dense fp16
    GEMM, the layer it replaces); prints milliseconds and the dense/sparse speedup.
(b) A LLaMA-7B-shaped decoder block (transformers' LlamaDecoderLayer, random weights), 2:4 by
    graphprune's NMSparsity and converted with ``to_sparse_kernels`` (which keeps a layer dense where
    2:4 is not faster); prints block latency dense vs converted at 128 and 2048 tokens.

Needs a CUDA GPU with sparse tensor cores (sm_80+); elsewhere it says so and exits.

    python -m bench.sparse_gemm_gpu
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
TOKENS = [1, 16, 64, 256, 1024, 4096, 8192]


def main() -> None:
    from graphprune.sparse_kernels import median_ms, kernel_support

    reason = kernel_support()
    if reason is not None:
        print(f"no run: {reason}")
        return
    from torch.sparse import to_sparse_semi_structured

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuSPARSELt {'yes' if torch.backends.cusparselt.is_available() else 'no'}")
    print(f"{'out x in':<14}{'tokens':>7}{'fp16 dense':>12}{'fp16 2:4':>10}{'speedup':>9}{'int8 2:4':>10}{'speedup':>9}")
    for out_f, in_f in SHAPES:
        weight = _two_four(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16))
        sparse = to_sparse_semi_structured(weight)
        int8 = _int8_layer(weight) if torch.backends.cusparselt.is_available() else None
        for tokens in TOKENS:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
            dense_ms = median_ms(lambda: F.linear(x, weight), 50)
            sparse_ms = median_ms(lambda: F.linear(x, sparse), 50) if tokens >= 8 else float("nan")
            int8_ms = median_ms(lambda: int8(x), 50) if int8 is not None else float("nan")
            print(f"{f'{out_f}x{in_f}':<14}{tokens:>7}{dense_ms:>12.3f}{sparse_ms:>10.3f}{dense_ms / sparse_ms:>8.2f}x"
                  f"{int8_ms:>10.3f}{dense_ms / int8_ms:>8.2f}x")
    block_rows()


def _two_four(weight: torch.Tensor) -> torch.Tensor:
    from graphprune.sparsity import LINEAR, NMPattern, nm_mask

    return weight * nm_mask(weight.abs(), NMPattern(2, 4, LINEAR))


def _int8_layer(weight: torch.Tensor) -> nn.Module:
    """A 2:4 int8 Int8SparseLinear from a fake-quantized copy of ``weight``."""
    import graphprune as gp
    from graphprune.passes import NMSparsity, Quantize
    from graphprune.sparse_kernels import int8_sparse_linear

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight.float().cpu())
    model = nn.Sequential(linear, nn.ReLU())
    x = torch.randn(16, weight.shape[1])
    quantized = gp.prune(model, (x,), passes=[NMSparsity(2, 4, dense_heads=False), Quantize()],
                         calibration=[(x,)]).module
    return int8_sparse_linear(quantized[0], "cusparselt", out_dtype=torch.float16)


def block_rows() -> None:
    import transformers as T

    import graphprune as gp
    from graphprune.passes import NMSparsity
    from graphprune.sparse_kernels import median_ms

    cfg = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                        num_hidden_layers=1, vocab_size=32000)
    print("\nLLaMA-7B-shaped decoder (1 layer), fp16")
    print(f"{'tokens':>7}{'dense ms':>10}{'2:4 ms':>9}{'speedup':>9}  sparse layers")
    model = T.LlamaModel(cfg).eval()
    for tokens in (128, 2048):
        ids = {"input_ids": torch.randint(0, 32000, (1, tokens))}
        result = gp.prune(model, ids, passes=[NMSparsity(2, 4)])
        converted, report = result.to_sparse_kernels()
        dense = gp.finalize(result.module).half().cuda()
        cuda_ids = {"input_ids": ids["input_ids"].cuda()}
        with torch.no_grad():
            dense_ms = median_ms(lambda: dense(**cuda_ids), 20)
            sparse_ms = median_ms(lambda: converted(**cuda_ids), 20)
        chosen = sum(d.choice == "sparse" for d in report.decisions)
        print(f"{tokens:>7}{dense_ms:>10.2f}{sparse_ms:>9.2f}{dense_ms / sparse_ms:>8.2f}x  {chosen}/{len(report.decisions)}")


if __name__ == "__main__":
    main()
