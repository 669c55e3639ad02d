"""onnxruntime CPU latency of what graphprune emits, against the dense model, in one run.

Models (random weights, shapes as the real ones): a ResNet-50 (transformers' ResNet config,
bottleneck blocks 3-4-6-3, 224x224, batch 1) and a BERT-base encoder (768 hidden, 12 layers,
sequence 128, batch 1).  Variants: dense fp32; 50% channels removed, fp32; 50% channels + 2:4
(magnitude) + int8 QDQ.  Every file is verified by the emitter against PyTorch.  Prints median
latency over ``--runs`` and, next to the latency ratio, the MACs ratio from graphprune's report.

    python -m bench.onnx_latency [--runs 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import onnxruntime as ort
import torch
import transformers as T

import graphprune as gp
from graphprune.emit.latency import onnx_latency_ms
from graphprune.passes import ChannelPrune, NMSparsity, Quantize


def resnet50() -> tuple[torch.nn.Module, dict, list]:
    cfg = T.ResNetConfig(
        layer_type="bottleneck",
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        embedding_size=64,
        num_labels=1000,
    )
    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(1, 3, 224, 224, generator=g)}
    calibration = [{"pixel_values": torch.randn(4, 3, 224, 224, generator=g)} for _ in range(2)]
    return T.ResNetForImageClassification(cfg).eval(), inputs, calibration


def bert_base() -> tuple[torch.nn.Module, dict, list]:
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> dict:
        return {
            "input_ids": torch.randint(0, 30522, (n, 128), generator=g),
            "attention_mask": torch.ones(n, 128, dtype=torch.long),
        }

    return T.BertModel(T.BertConfig()).eval(), batch(1), [batch(4) for _ in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, CPU, {args.threads} threads, batch 1, median of {args.runs} runs")
    print(f"{'model':<10}{'variant':<26}{'MB':>8}{'ms':>9}{'latency':>9}{'MACs':>8}{'int8 ops (onnxruntime)':>36}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("ResNet-50", resnet50), ("BERT-base", bert_base)):
            model, inputs, calibration = build()
            variants = {
                "dense fp32": [],
                "50% channels fp32": [ChannelPrune(0.5, round_to=8)],
                "50% ch + 2:4 + int8": [ChannelPrune(0.5, round_to=8), NMSparsity(2, 4), Quantize()],
            }
            rows = []
            for variant, passes in variants.items():
                path = os.path.join(tmp, f"{name}-{len(passes)}.onnx")
                if passes:
                    result = gp.prune(model, inputs, passes=passes, calibration=calibration)
                    rows.append((variant, path, result.export_onnx(path), result.report.macs_after))
                    dense_macs = result.report.macs
                else:
                    rows.append((variant, path, gp.export_onnx(model, inputs, path), None))
            base_ms = None
            for variant, path, exported, macs in rows:
                ms = onnx_latency_ms(
                    path, {k: v.numpy() for k, v in inputs.items()}, runs=args.runs, threads=args.threads
                )
                base_ms = base_ms or ms
                ops = ", ".join(f"{k} {v}" for k, v in sorted(exported.quantized_ops.items())) or "-"
                size = os.path.getsize(path) / 1e6
                print(
                    f"{name:<10}{variant:<26}{size:>8.1f}{ms:>9.1f}{base_ms / ms:>8.2f}x"
                    f"{dense_macs / (macs or dense_macs):>7.2f}x{ops:>36}"
                )


if __name__ == "__main__":
    main()
