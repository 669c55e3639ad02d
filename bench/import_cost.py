"""What ``import graphprune`` costs a torch-only user, against loading the ONNX stack, in one run.

Each measurement is a fresh interpreter (so nothing is cached in the process), timed from inside:
``import torch`` alone (the floor), then the torch path (``import graphprune``, ``gp.prune``, the
passes), then the same plus ``gp.prune_onnx`` (which loads onnx, onnx_ir, onnxruntime and
onnxscript).  Prints the median over ``--runs`` of each and the ONNX stack's share.

    python -m bench.import_cost [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

SETUPS = {
    "torch alone": "import torch",
    "torch path": "import torch, graphprune as gp\ngp.prune\nfrom graphprune.passes import ChannelPrune, NMSparsity",
    "torch path + ONNX": "import torch, graphprune as gp\ngp.prune\nfrom graphprune.passes import ChannelPrune\n"
    "gp.prune_onnx",
}


def seconds(code: str) -> float:
    timed = f"import time\nstart = time.perf_counter()\n{code}\nprint(time.perf_counter() - start)"
    return float(subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    medians = {name: statistics.median(seconds(code) for _ in range(args.runs)) for name, code in SETUPS.items()}
    for name, value in medians.items():
        print(f"{name:20s} {value:6.2f} s")
    torch_path, with_onnx = medians["torch path"], medians["torch path + ONNX"]
    print(f"the ONNX stack adds {with_onnx - torch_path:.2f} s ({with_onnx / torch_path:.2f}x the torch path)")


if __name__ == "__main__":
    main()
