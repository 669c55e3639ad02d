"""Prune the same architectures with graphprune and with Torch-Pruning, in one run.

Prints, per model: whether each tool produced a model that runs with the original output
shapes, its analysis+prune time, and MACs after pruning (both counted by graphprune's counter
on a fresh capture, so the numbers are comparable).  Torch-Pruning is a benchmark-only
dependency: ``pip install -e ".[bench]"``.

    python -m bench.compare_torch_pruning [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import graphprune as gp
from graphprune.capture import capture, normalize_inputs
from graphprune.macs import graph_macs
from graphprune.passes import ChannelPrune
from samples import densenet, mobilenet, resnet, shufflenet, vit
from tests.architectures import build as build_hf

SAMPLES = {"resnet (sample)": resnet, "mobilenet_v2 (sample)": mobilenet, "densenet (sample)": densenet,
           "shufflenet_v2 (sample)": shufflenet, "vit (sample)": vit}
HF = ["bert", "gpt2", "llama_gqa", "qwen3", "vit", "swin", "convnext", "resnet", "mobilenet_v2"]


def _outputs(model: nn.Module, inputs) -> list[torch.Tensor]:
    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        return [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]


def _macs(model: nn.Module, inputs) -> int:
    return graph_macs(capture(model, inputs).graph_module)


def _output_layers(model: nn.Module, inputs) -> list[nn.Module]:
    """Modules whose weights reach the model outputs: Torch-Pruning must be told to leave them."""
    analysis = gp.analyze(model, inputs)
    names = {m.module for f in analysis.frozen if "model output" in str(f.reason) for m in f.members}
    return [model.get_submodule(n) for n in names if n]


def run_graphprune(model, inputs, ratio):
    start = time.perf_counter()
    result = gp.prune(model, inputs, passes=[ChannelPrune(ratio=ratio)])
    return result.module, time.perf_counter() - start


def run_torch_pruning(model, inputs, ratio):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    ignored = _output_layers(model, inputs)
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return model, time.perf_counter() - start


def measure(name, model, inputs, ratio):
    reference = [t.shape for t in _outputs(model, inputs)]
    base = _macs(model, inputs)
    row = {"model": name, "macs": base}
    for tool, fn in (("graphprune", run_graphprune), ("torch_pruning", run_torch_pruning)):
        try:
            pruned, seconds = fn(model, inputs, ratio)
            ok = [t.shape for t in _outputs(pruned, inputs)] == reference
            row[tool] = (ok, seconds, _macs(pruned, inputs) if ok else None, "" if ok else "output shape changed")
        except Exception as exc:  # a benchmark row records the failure instead of stopping the run
            row[tool] = (False, None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    ratio = parser.parse_args().ratio
    rows = []
    for name, module in SAMPLES.items():
        rows.append(measure(name, *module.build(), ratio))
    for name in HF:
        rows.append(measure(f"{name} (transformers)", *build_hf(name), ratio))
    print(f"channel pruning at ratio {ratio}: success, analysis+prune seconds, MACs after / before")
    print(f"{'model':<28}{'graphprune':>34}{'torch_pruning':>34}")
    for row in rows:
        cells = []
        for tool in ("graphprune", "torch_pruning"):
            ok, sec, macs, err = row[tool]
            cells.append(f"ok {sec:6.2f}s {macs / row['macs']:6.1%}" if ok else f"FAIL {err[:28]}")
        print(f"{row['model']:<28}{cells[0]:>34}{cells[1]:>34}")
    for tool in ("graphprune", "torch_pruning"):
        ok = sum(r[tool][0] for r in rows)
        print(f"{tool}: {ok}/{len(rows)} models pruned with unchanged output shapes")


if __name__ == "__main__":
    main()
