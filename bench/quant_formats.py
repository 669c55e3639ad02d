"""2:4 then int8 / int4 (round to nearest, GPTQ) / fp8: quality, file size and onnxruntime CPU latency.

Two models, every variant exported by ``export_onnx`` (verified in onnxruntime) and timed there
against the dense fp32 file in the same run:

1. all-MiniLM-L6-v2 (pretrained, from PyPI): held-out cosine of the pooled embeddings to the dense
   model's (standard-library docstring sentences, as ``bench.nm_recovery``).
2. A LLaMA-shaped byte-level causal LM trained here (``bench.nm_recovery.byte_lm``): held-out
   perplexity.

2:4 is SparseGPT's on every block linear (heads dense); int4 uses groups of 128, which divide every
reduction dim of both models (the LM's MLP is 768 wide here, not ``byte_lm``'s default 688).  With
2:4 first, GPTQ runs joined with SparseGPT in one sweep (``SparseGPTQ``).  Latency: batch 1, median of
``--runs``; the 2:4 zeros are stored dense (onnxruntime has no 2:4 kernel on CPU), so the 2:4 + fp32
row measures the sparsity's cost alone.

    python -m bench.quant_formats [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import graphprune as gp
from bench.nm_recovery import MiniLMData, byte_lm, cosine, docstrings
from graphprune.emit.latency import onnx_latency_ms
from graphprune.passes import NMSparsity, Quantize
from samples.minilm import embed


def variants() -> dict[str, list]:
    """Fresh passes for each variant (2:4 SparseGPT first in every quantized one)."""

    def sparse() -> NMSparsity:
        return NMSparsity(2, 4, method="sparsegpt")

    return {
        "2:4 fp32": [sparse()],
        "2:4 + int8": [sparse(), Quantize("int8")],
        "2:4 + int4 rtn": [sparse(), Quantize("int4", group_size=128)],
        "2:4 + int4 gptq": [sparse(), Quantize("int4", group_size=128, method="gptq")],
        "2:4 + fp8": [sparse(), Quantize("fp8")],
        "int4 gptq (dense)": [Quantize("int4", group_size=128, method="gptq")],
    }


def header(unit: str) -> None:
    print(f"  {'variant':<20}{unit:>10}{'MB':>8}{'size':>7}{'ms':>8}{'latency':>9}{'seconds':>9}  onnxruntime ops")


def measure(name: str, model, example, calibration, quality, feeds, tmp: str, runs: int, unit: str) -> None:
    """Dense fp32 row, then each variant: quality, ONNX file size and latency as ratios to dense."""
    header(unit)
    dense_path = os.path.join(tmp, f"{name}-dense.onnx")
    gp.export_onnx(model, example, dense_path, dynamic_batch=False)  # timed at batch 1
    dense_mb = os.path.getsize(dense_path) / 1e6
    dense_ms = onnx_latency_ms(dense_path, feeds, runs=runs, threads=2)
    print(f"  {'dense fp32':<20}{quality(model):>10.3f}{dense_mb:>8.1f}{1:>6.2f}x{dense_ms:>8.2f}{1:>8.2f}x{'-':>9}")
    for label, passes in variants().items():
        start = time.perf_counter()
        result = gp.prune(model, example, passes=passes, calibration=calibration)
        seconds = time.perf_counter() - start
        path = os.path.join(tmp, f"{name}-{label.replace(' ', '_').replace(':', '')}.onnx")
        written = result.export_onnx(path, dynamic_batch=False)
        mb = os.path.getsize(path) / 1e6
        ms = onnx_latency_ms(path, feeds, runs=runs, threads=2)
        ops = ", ".join(f"{k} {v}" for k, v in sorted(written.quantized_ops.items())) or "-"
        print(
            f"  {label:<20}{quality(result.module):>10.3f}{mb:>8.1f}{dense_mb / mb:>6.2f}x{ms:>8.2f}"
            f"{dense_ms / ms:>8.2f}x{seconds:>9.1f}  {ops}"
        )


def main(quick: bool = False, runs: int = 30) -> None:
    texts = docstrings()
    print(f"onnxruntime CPU, 2 threads, batch 1, median of {runs} runs; torch {torch.__version__}")
    data = MiniLMData.of(texts, quick)
    dense = [embed(data.model, b) for b in data.held]
    example = data.calibration[0]
    one = {k: v[:1] for k, v in example.items()}
    print(f"\nall-MiniLM-L6-v2: held-out cosine to the dense embeddings ({len(data.held) * 32} sentences)")
    with tempfile.TemporaryDirectory() as tmp:
        measure(
            "minilm",
            data.model,
            one,
            data.calibration,
            lambda m: cosine(m, data.held, dense),
            {k: v.numpy() for k, v in one.items()},
            tmp,
            runs,
            "cosine",
        )
        lm = byte_lm(texts, quick, intermediate=768)  # 768: groups of 128 divide every reduction dim
        window = {"input_ids": lm.windows[:1]}
        print(
            f"\nLLaMA-shaped byte-level LM ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters): "
            f"held-out perplexity (dense {lm.perplexity(lm.model):.3f})"
        )
        measure(
            "lm",
            lm.model,
            window,
            lm.calibration,
            lm.perplexity,
            {"input_ids": lm.windows[:1].numpy()},
            tmp,
            runs,
            "ppl",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=30)
    arguments = parser.parse_args()
    main(arguments.quick, arguments.runs)
