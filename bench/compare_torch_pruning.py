"""Prune the same architectures with graphprune and with Torch-Pruning, in one run.

Prints, per model: whether each tool produced a model that runs with the original output
shapes, its analysis+prune time, and MACs after pruning (both counted by graphprune's counter
on a fresh capture, so the numbers are comparable).  Torch-Pruning is a benchmark-only
dependency: ``pip install -e ".[bench]"``.

    python -m bench.compare_torch_pruning [--ratio 0.5]
    python -m bench.compare_torch_pruning --timm [--time-limit 900] [--models a,b]

``--timm`` runs a broad sample of timm architectures, and torchvision's ``swin_t`` and
``maxvit_t`` (random weights, each at its configured input size) instead, each model and tool in a
process of its own under a time limit, since Torch-Pruning hangs on some; it needs the vision extra
(``pip install -e ".[vision]"``, see the README for the torch build it asks for).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import graphprune as gp
from graphprune.frontends.torch.capture import capture, normalize_inputs
from graphprune.frontends.torch.macs import graph_macs
from graphprune.passes import ChannelPrune
from samples import densenet, mobilenet, resnet, shufflenet, vit
from tests.architectures import build as build_hf

SAMPLES = {
    "resnet (sample)": resnet,
    "mobilenet_v2 (sample)": mobilenet,
    "densenet (sample)": densenet,
    "shufflenet_v2 (sample)": shufflenet,
    "vit (sample)": vit,
}
HF = ["bert", "gpt2", "llama_gqa", "qwen3", "vit", "swin", "convnext", "resnet", "mobilenet_v2"]
TIMM = [  # small variants of 48 families: convolutional, mobile, attention, MetaFormer, MLP, hybrid
    "resnet18",
    "resnet50d",
    "resnext26ts",
    "seresnext26d_32x4d",
    "res2net50_14w_8s",
    "resnest14d",
    "regnetx_002",
    "regnety_004",
    "densenet121",
    "dla34",
    "dpn68",
    "cspresnet50",
    "vgg11",
    "repvgg_a0",
    "selecsls42b",
    "hrnet_w18_small",
    "mobilenetv2_100",
    "mobilenetv3_small_100",
    "efficientnet_b0",
    "mixnet_s",
    "ghostnet_100",
    "rexnet_100",
    "mnasnet_100",
    "fbnetc_100",
    "lcnet_050",
    "tinynet_e",
    "convnext_atto",
    "edgenext_xx_small",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "cait_xxs24_224",
    "swin_tiny_patch4_window7_224",
    "pvt_v2_b0",
    "poolformer_s12",
    "convformer_s18",
    "davit_tiny",
    "convit_tiny",
    "levit_128s",
    "twins_svt_small",
    "coat_lite_tiny",
    "mobilevit_xxs",
    "xcit_nano_12_p16_224",
    "pit_ti_224",
    "gcvit_xxtiny",
    "efficientvit_b0",
    "fastvit_t8",
    "mixer_s16_224",
    "resmlp_12_224",
]
TORCHVISION = ["torchvision:swin_t", "torchvision:maxvit_t"]  # run with the timm sample


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
    pruner = tp.pruner.MetaPruner(
        model, inputs, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio, ignored_layers=ignored
    )
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


def timm_worker(name: str, tool: str, ratio: float) -> dict:
    """One timm (or ``torchvision:``) model through one tool, in a process of its own (:func:`run_timm`)."""
    torch.manual_seed(0)
    if name.startswith("torchvision:"):
        import torchvision

        model, size = torchvision.models.get_model(name.split(":", 1)[1], weights=None).eval(), (3, 224, 224)
    else:
        import timm

        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg["input_size"]
    inputs = (torch.randn(1, *size),)
    reference = [t.shape for t in _outputs(model, inputs)]
    base = _macs(model, inputs)
    try:
        pruned, seconds = (run_graphprune if tool == "graphprune" else run_torch_pruning)(model, inputs, ratio)
        ok = [t.shape for t in _outputs(pruned, inputs)] == reference
    except Exception as exc:  # the row records the failure
        return {
            "ok": False,
            "seconds": None,
            "macs": base,
            "macs_after": None,
            "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}",
        }
    return {
        "ok": ok,
        "seconds": seconds,
        "macs": base,
        "macs_after": _macs(pruned, inputs) if ok else None,
        "error": "" if ok else "output shape changed",
    }


def run_timm(names: list[str], ratio: float, limit: float) -> list[dict]:
    rows = []
    for name in names:
        row = {"model": name, "macs": None}
        for tool in ("graphprune", "torch_pruning"):
            command = [
                sys.executable,
                "-m",
                "bench.compare_torch_pruning",
                "--worker",
                name,
                tool,
                "--ratio",
                str(ratio),
            ]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                result = (
                    json.loads(lines[-1])
                    if lines
                    else {
                        "ok": False,
                        "seconds": None,
                        "macs": None,
                        "macs_after": None,
                        "error": (done.stderr.strip().splitlines() or ["no result"])[-1],
                    }
                )
            except subprocess.TimeoutExpired:
                result = {
                    "ok": False,
                    "seconds": None,
                    "macs": None,
                    "macs_after": None,
                    "error": f"over the {limit:.0f} s limit",
                }
            row["macs"] = row["macs"] or result.pop("macs")
            row[tool] = (result["ok"], result["seconds"], result["macs_after"], result["error"])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress, one line per model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--timm", action="store_true", help="the timm sample instead of the built-in models")
    parser.add_argument(
        "--models",
        help="comma-separated timm model names, or torchvision:NAME "
        "(default: the 48-model timm sample and torchvision's swin_t, maxvit_t)",
    )
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds per model and tool")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    ratio = options.ratio
    if options.worker:
        try:
            print(json.dumps(timm_worker(*options.worker, ratio)))
        except Exception as exc:  # the parent records the failure in the model's row
            print(
                json.dumps(
                    {
                        "ok": False,
                        "seconds": None,
                        "macs": None,
                        "macs_after": None,
                        "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}",
                    }
                )
            )
        return
    if options.timm:
        rows = run_timm(options.models.split(",") if options.models else TIMM + TORCHVISION, ratio, options.time_limit)
    else:
        rows = [measure(name, *module.build(), ratio) for name, module in SAMPLES.items()]
        rows += [measure(f"{name} (transformers)", *build_hf(name), ratio) for name in HF]
    _print_rows(rows, ratio)


def _print_rows(rows: list[dict], ratio: float) -> None:
    print(f"channel pruning at ratio {ratio}: success, analysis+prune seconds, MACs after / before")
    print(f"{'model':<32}{'graphprune':>34}{'torch_pruning':>34}")
    for row in rows:
        cells = []
        for tool in ("graphprune", "torch_pruning"):
            ok, sec, macs, err = row[tool]
            cells.append(
                f"ok {sec:6.2f}s {macs / row['macs']:6.1%}"
                if ok and row["macs"]
                else f"ok {sec:6.2f}s"
                if ok
                else f"FAIL {err[:28]}"
            )
        print(f"{row['model']:<32}{cells[0]:>34}{cells[1]:>34}")
    for tool in ("graphprune", "torch_pruning"):
        ok = sum(r[tool][0] for r in rows)
        print(f"{tool}: {ok}/{len(rows)} models pruned with unchanged output shapes")
    failures = [
        (r["model"], tool, r[tool][3]) for r in rows for tool in ("graphprune", "torch_pruning") if not r[tool][0]
    ]
    for model, tool, error in failures:
        print(f"  {tool} on {model}: {error}")


if __name__ == "__main__":
    main()
