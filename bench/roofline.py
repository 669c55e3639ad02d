"""The roofline's predictions against measurement, in one run.

1. onnxruntime on this CPU: a ResNet-50 and a BERT-base encoder (as in ``bench.onnx_latency``:
   random weights, batch 1), dense fp32, 50% channels removed, and 50% channels + 2:4 + int8.
   Each file is exported and timed (median of ``--runs``); ``gp.roofline(..., device="cpu")``
   predicts the same variants from this machine's measured peaks.  Printed: predicted and
   measured milliseconds, their ratio, and the predicted against the measured speedup.
2. An H100, predicted only (no GPU here): the GEMM shapes of a LLaMA-7B MLP and attention
   projection at several token counts, fp16 and int8, dense against 2:4 on sparse tensor cores.
   docs/RESULTS.md sets these beside the speedups measured on an H100 in an earlier session
   (``bench.sparse_gemm_gpu``, CUDA-graph replay).

    python -m bench.roofline [--runs 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import onnxruntime as ort

import graphprune as gp
from bench.onnx_latency import bert_base, resnet50
from graphprune.core.costs import Format
from graphprune.emit.devices import device
from graphprune.emit.latency import onnx_latency_ms
from graphprune.emit.roofline import linear_cost, op_time, two_four_speedup
from graphprune.passes import ChannelPrune, NMSparsity, Quantize


def cpu_rows(runs: int, threads: int) -> None:
    cpu = device("cpu")
    rates = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in cpu.dense.items())
    print(f"{cpu.name}: {rates}, copy {cpu.bandwidth / 1e9:.1f} GB/s; onnxruntime {ort.__version__}")
    print(f"{'model':<10}{'variant':<24}{'predicted ms':>14}{'measured ms':>13}{'pred/meas':>11}{'speedup':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("ResNet-50", resnet50), ("BERT-base", bert_base)):
            model, inputs, calibration = build()
            feeds = {k: v.numpy() for k, v in inputs.items()}
            variants = {
                "dense fp32": [],
                "50% channels": [ChannelPrune(0.5, round_to=8)],
                "50% ch + 2:4 + int8": [ChannelPrune(0.5, round_to=8), NMSparsity(2, 4), Quantize()],
            }
            base = None
            for variant, passes in variants.items():
                path = os.path.join(tmp, f"{name}-{len(passes)}.onnx")
                if passes:
                    result = gp.prune(model, inputs, passes=passes, calibration=calibration)
                    result.export_onnx(path)
                    predicted = gp.roofline(result, device=cpu).compressed_seconds * 1e3
                else:
                    gp.export_onnx(model, inputs, path)
                    predicted = gp.roofline(model, inputs, device=cpu).dense_seconds * 1e3
                measured = onnx_latency_ms(path, feeds, runs=runs, threads=threads)
                base = base or (predicted, measured)
                speedups = f"{base[0] / predicted:.2f}x / {base[1] / measured:.2f}x"
                print(
                    f"{name:<10}{variant:<24}{predicted:>14.1f}{measured:>13.1f}{predicted / measured:>11.2f}"
                    f"{speedups:>17}"
                )
    print("speedup: predicted / measured, against the dense row")


def h100_rows() -> None:
    h100 = device("h100")
    print(f"\n{h100.name}, predicted 2:4 speedup of one linear (dense time / 2:4 time, same format)")
    print(f"{'out x in':<13}{'tokens':>7}{'fp16':>8}{'bound':>9}{'int8':>8}{'bound':>9}")
    for out_features, in_features in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for tokens in (1, 16, 256, 1024, 4096, 8192):
            layer = linear_cost(out_features, in_features, tokens)
            cells = []
            for kind in ("fp16", "int8"):
                bound = op_time(layer, Format(kind, kind, (2, 4)), h100).bound
                cells.append(f"{two_four_speedup(h100, kind, layer):>7.2f}x{bound:>9}")
            print(f"{out_features}x{in_features:<8}{tokens:>7}{''.join(cells)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed onnxruntime runs per file (median)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="onnxruntime threads")
    args = parser.parse_args()
    cpu_rows(args.runs, args.threads)
    h100_rows()


if __name__ == "__main__":
    main()
