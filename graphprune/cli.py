"""The ``graphprune`` command line: inspect, prune, export, plan, bench.

MODEL is ``package.module:factory`` (a function returning ``(module, example_inputs)`` or
``(module, example_inputs, calibration_batches)``), a ``.pt2`` file saved with
``torch.export.save`` (its example inputs are the ones it was exported with), or, for ``inspect``
and ``prune``, an ``.onnx`` file (pruned as an ONNX graph by :func:`graphprune.prune_onnx`; its
calibration ``.npz`` holds arrays keyed by input name), or, for ``inspect``, ``prune`` and ``plan``, a
Hugging Face checkpoint folder (built with its parameters on ``meta`` from its ``config.json``;
``plan`` writes its plan with the weights streamed from its shards, ``prune`` also writes the pruned
checkpoint shard by shard).

Exit codes: 0 done, 2 bad input (paths, options, recipes, outputs that would replace an input or a
file graphprune did not write, a pass order that is refused), 3 a model graphprune cannot handle
(capture, apply, ONNX verification), 4 a bug in graphprune
(:class:`~graphprune.errors.InternalError`), 1 anything unexpected.

Commands that write do it in one :class:`~graphprune.io.outputs.Outputs` transaction: ``prune`` writes the
ONNX file, ``<out>.plan.json``/``.safetensors`` and ``<out>.report/`` all or none, never over the model,
calibration or recipe file it read, and over an existing file only if graphprune wrote it or with
``--overwrite``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from graphprune.emit.coupling_graph import write_graph
from graphprune.emit.latency import onnx_latency_ms
from graphprune.errors import ContractError, GraphpruneError, InputError, InternalError
from graphprune.io.outputs import Outputs

EXIT_INPUT, EXIT_MODEL, EXIT_BUG = 2, 3, 4  # anything unexpected propagates: Python exits 1 with the traceback


@dataclass
class LoadedModel:
    module: nn.Module
    inputs: Any
    calibration: list | None = None
    dynamic_batch: bool = True  # False for a .pt2 exported with static shapes: its module checks them


def checkpoint_model(folder: str) -> LoadedModel:
    """A Hugging Face checkpoint folder's architecture, built from its ``config.json`` with the
    parameters on ``meta`` (no weight is read), with example inputs of its main input: 16 token
    ids, or one image of the configured size."""
    import transformers

    from graphprune.frontends.torch.streaming import parameters_on_meta

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InputError(f"{folder}: a checkpoint folder needs a config.json (the architecture to build)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder}/config.json: transformers cannot read it ({type(exc).__name__}: {exc})") from exc
    names = [n for n in (getattr(config, "architectures", None) or []) if hasattr(transformers, n)]
    if not names:
        raise InputError(
            f"{folder}/config.json names no architecture this transformers builds "
            f"(architectures: {getattr(config, 'architectures', None)!r})"
        )
    with parameters_on_meta():
        module = getattr(transformers, names[0])(config).eval()
    main = getattr(module, "main_input_name", "input_ids")
    if main == "input_ids":
        inputs: dict[str, torch.Tensor] = {"input_ids": torch.ones(1, 16, dtype=torch.long)}
    elif main == "pixel_values" and isinstance(getattr(config, "image_size", None), int):
        channels = getattr(config, "num_channels", 3)
        inputs = {"pixel_values": torch.zeros(1, channels, config.image_size, config.image_size)}
    else:
        raise InputError(f"{folder}: {names[0]} reads {main!r}, for which graphprune makes no example input yet")
    return LoadedModel(module, inputs)


def load_model(spec: str, *, checkpoints: bool = False) -> LoadedModel:
    """The module, example inputs and calibration batches (if the factory gives them) of a MODEL
    argument; a checkpoint folder where the command takes one (``checkpoints``)."""
    if spec.endswith(".onnx"):
        raise InputError(
            f"{spec}: this command takes a PyTorch model (package.module:factory or a .pt2 exported "
            "program); inspect and prune also take .onnx files"
        )
    if os.path.isdir(spec):
        if not checkpoints:
            raise InputError(
                f"{spec}: this command does not take checkpoint folders (inspect, prune, plan and roofline do): "
                "a checkpoint is pruned into a checkpoint, not exported"
            )
        return checkpoint_model(spec)
    if spec.endswith(".pt2"):
        if not os.path.isfile(spec):
            raise InputError(f"{spec}: no such file")
        try:
            program = torch.export.load(spec)
        except Exception as exc:
            raise InputError(f"{spec}: not a torch.export program ({type(exc).__name__}: {exc})") from exc
        if program.example_inputs is None:
            raise InputError(f"{spec}: the exported program carries no example inputs")
        args, kwargs = program.example_inputs
        if args and kwargs:
            raise InputError(f"{spec}: programs exported with both positional and keyword inputs are not supported")
        placeholders = [
            n
            for n in program.graph.nodes
            if n.op == "placeholder" and n.name in set(program.graph_signature.user_inputs)
        ]
        dynamic = any(
            isinstance(v, torch.Tensor) and v.dim() and isinstance(v.shape[0], torch.SymInt)
            for v in (n.meta.get("val") for n in placeholders)
        )
        return LoadedModel(module=program.module(), inputs=kwargs or args, calibration=None, dynamic_batch=dynamic)
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise InputError(
            f"MODEL must be package.module:factory, a .pt2 or an .onnx file, or a checkpoint folder, got {spec!r}"
        )
    if os.getcwd() not in sys.path:  # like `python -m`: modules in the working directory are importable
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load {spec}: {exc}") from exc
    built = factory()
    if not isinstance(built, tuple) or len(built) not in (2, 3) or not isinstance(built[0], nn.Module):
        raise InputError(f"{spec} must return (module, example_inputs) or (module, example_inputs, calibration)")
    return LoadedModel(built[0], built[1], list(built[2]) if len(built) == 3 else None)


def load_calibration(path: str, batch_size: int) -> list:
    """Calibration batches from ``.npz`` (arrays keyed by input name, first dim = samples) or ``.pt``
    (a list of batches, or a dict / tensor split into batches of ``batch_size`` samples)."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if not os.path.isfile(path):
        raise InputError(f"calibration file {path}: no such file")
    if not path.endswith((".npz", ".pt")):
        raise InputError(f"calibration file {path}: use .npz or .pt")
    try:
        if path.endswith(".npz"):
            import numpy as np

            with np.load(path) as data:  # allow_pickle stays off: object arrays are refused
                tensors: Any = {k: torch.from_numpy(data[k]) for k in data.files}
        else:
            tensors = torch.load(path, weights_only=True)  # tensors and plain containers only, no code
    except Exception as exc:  # refused pickles and object arrays, truncated or foreign files
        raise InputError(
            f"calibration file {path} cannot be read as tensors ({type(exc).__name__}: "
            f"{(str(exc).strip() or '?').splitlines()[0]})"
        ) from exc
    if isinstance(tensors, list):
        return tensors
    if isinstance(tensors, torch.Tensor):
        return [(chunk,) for chunk in tensors.split(batch_size)]
    if isinstance(tensors, dict) and tensors and all(isinstance(v, torch.Tensor) for v in tensors.values()):
        count = {v.shape[0] for v in tensors.values()}
        if len(count) != 1:
            raise InputError(f"calibration file {path}: arrays have different sample counts {sorted(count)}")
        n = count.pop()
        return [{k: v[i : i + batch_size] for k, v in tensors.items()} for i in range(0, n, batch_size)]
    raise InputError(f"calibration file {path}: expected arrays keyed by input name, a tensor or a list of batches")


def _pass_flags(args: argparse.Namespace) -> bool:
    """Whether the command line names passes by flag (not by recipe)."""
    return any(
        (
            args.remove_blocks is not None,
            args.channels is not None,
            args.nm is not None,
            args.low_rank is not None,
            args.int8,
            args.quantize is not None,
        )
    )


def _passes(args: argparse.Namespace) -> tuple[list, bool]:
    from graphprune.io.recipe import load_recipe
    from graphprune.passes import BlockPrune, ChannelPrune, LowRankCompensation, NMSparsity, Quantize

    flags = _pass_flags(args)
    if args.recipe and (flags or args.refine):
        raise InputError(
            "give either --recipe or the --remove-blocks/--channels/--nm/--refine/--low-rank/--int8/--quantize "
            "flags, not both"
        )
    if args.int8 and args.quantize is not None:
        raise InputError("--int8 is --quantize int8: give one of them")
    if args.quantize is None and (args.group_size is not None or args.quant_method != "rtn"):
        raise InputError("--group-size and --quant-method set how --quantize quantizes: give --quantize too")
    if args.refine and args.nm is None:
        raise InputError("--refine refines N:M masks: give --nm too")
    if args.recipe:
        recipe = load_recipe(args.recipe)
        return recipe.passes, recipe.experimental_order
    passes: list = []
    if args.remove_blocks is not None:
        passes.append(BlockPrune(args.remove_blocks))
    if args.channels is not None:
        passes.append(ChannelPrune(args.channels, round_to=args.round_to))
    if args.nm is not None:
        n, _, m = args.nm.partition(":")
        if not (n.isdigit() and m.isdigit()):
            raise InputError(f"--nm takes N:M such as 2:4, got {args.nm!r}")
        passes.append(NMSparsity(int(n), int(m), method=args.method, refine=args.refine))
    if args.low_rank is not None:
        passes.append(LowRankCompensation(args.low_rank))
    if args.int8 or args.quantize is not None:
        passes.append(Quantize(args.quantize or "int8", method=args.quant_method, group_size=args.group_size))
    if not passes:
        raise InputError(
            "nothing to do: give --recipe, or --remove-blocks, --channels, --nm, --low-rank and/or --int8/--quantize"
        )
    return passes, False


def cmd_inspect(args: argparse.Namespace) -> dict:
    import graphprune as gp
    from graphprune.algorithms.importance import resolve
    from graphprune.frontends.torch.capture import model_device
    from graphprune.frontends.torch.macs import count_params, graph_macs

    if args.model.endswith(".onnx"):
        analysis = gp.analyze_onnx(args.model)
        model: Any = analysis.captured.weights()
        params, macs = analysis.planned_params({}), analysis.planned_macs({})
    else:
        loaded = load_model(args.model, checkpoints=True)
        model, inputs = loaded.module, loaded.inputs
        analysis = gp.analyze(model, inputs)
        params, macs = count_params(model), graph_macs(analysis.captured.graph_module)
    weights_known = not isinstance(model, nn.Module) or model_device(model) != torch.device("meta")
    scores = resolve("l2").scores(analysis, model, analysis.groups, None) if weights_known else {}
    groups = []
    for g in analysis.groups:
        row = {"id": g.id, "channels": g.size, "members": [m.name for m in g.members]}
        if g.id in scores:  # channel L2 importance spread: a flat spread means no cheap channels to remove
            s = scores[g.id].double().sort().values
            row["l2_importance"] = {"min": s[0].item(), "median": s[len(s) // 2].item(), "max": s[-1].item()}
        groups.append(row)
    summary = {
        "model": args.model,
        "params": params,
        "macs": macs,
        "groups": groups,
        "frozen": [f.describe() for f in analysis.frozen],
    }
    if args.graph and not args.graph.endswith((".dot", ".svg", ".png")):
        raise InputError(f"--graph writes .dot, .svg or .png, got {args.graph!r}")
    if args.graph:
        write_graph(analysis, args.graph)
        summary["graph"] = args.graph
    if not args.json:
        print(analysis.describe(max_groups=args.max_groups, every_frozen=args.all))
        if scores:
            print("channel L2 importance per group (min / median / max):")
            for row in groups[: args.max_groups]:
                imp = row["l2_importance"]
                print(
                    f"  group {row['id']:<4}{row['channels']:>6} ch  {imp['min']:.3g} / {imp['median']:.3g} / "
                    f"{imp['max']:.3g}"
                )
        print(f"params {summary['params']:,}, MACs {summary['macs']:,}")
        if args.graph:
            print(f"coupling graph: {args.graph}")
    return summary


def cmd_prune(args: argparse.Namespace) -> dict:
    from graphprune.emit.onnx_export import made_by_graphprune
    from graphprune.emit.report_page import check_report_folder

    passes, experimental = _passes(args)
    if os.path.isdir(args.model):
        return _prune_checkpoint(args, passes, experimental)
    streamed_only = [f"--{k}" for k in ("blocks", "prefix", "scratch") if getattr(args, k)]
    if streamed_only:
        raise InputError(f"{' '.join(streamed_only)}: for checkpoint folders, whose plans are streamed")
    if not args.output.endswith(".onnx"):
        raise InputError(f"-o must name an .onnx file, got {args.output!r}")
    if args.model.endswith(".onnx") and args.device not in ("cpu", "none"):
        raise InputError(f"--device {args.device}: the report's roofline reads PyTorch models so far, not .onnx files")
    if not args.model.endswith(".onnx") and args.device not in ("cpu", "none"):
        from graphprune.emit.devices import device

        device(args.device)  # an unknown name is refused before any pass runs
    read = [*_model_files(args.model), *(p for p in (args.calibration, args.recipe) if p)]
    with Outputs(inputs=read, overwrite=args.overwrite) as out:
        out.check(args.output, ours=made_by_graphprune)  # refused before any pruning
        check_report_folder(args.output + ".report", out)
        prune = _prune_onnx_file if args.model.endswith(".onnx") else _prune_module
        result, written, latency = prune(args, passes, experimental, out)
        plan_json, _ = result.save_plan(args.output + ".plan", outputs=out)
        pages = args.output + ".report"
        if args.model.endswith(".onnx"):
            result.write_report(pages, latency, outputs=out)
        else:
            result.write_report(pages, latency, device=None if args.device == "none" else args.device, outputs=out)
    summary = {
        **result.report.to_dict(),
        "output": args.output,
        "report": pages,
        "stage": str(result.stage),
        "plan": plan_json,
        "latency_ms": latency,
        "onnx": {
            "max_error": written.max_error,
            "l2_error": written.l2_error,
            "quantized_ops": written.quantized_ops,
            "sparse_weights": len(written.sparse_weights),
        },
    }
    if not args.json:
        print(result.report)
        print(written)
        print(f"report: {pages}/report.html (and report.md, report.json, plots)")
        print(
            f"plan: {plan_json} (+ .safetensors): `graphprune plan` reads it, gp.apply_plan_file(_onnx) re-applies it"
        )
    return summary


def _prune_checkpoint(args: argparse.Namespace, passes: list, experimental: bool) -> dict:
    """A checkpoint folder: a streamed plan, then the pruned checkpoint written shard by shard into
    the folder ``-o``, and the plan beside it (``<out>.plan.json``)."""
    from graphprune.io.checkpoint import apply_to_checkpoint

    if args.output.endswith(".onnx"):
        raise InputError(f"-o names the folder a pruned checkpoint goes into, got the ONNX file {args.output!r}")
    if args.latency or args.device != "cpu":
        raise InputError(
            "--latency and --device are for the ONNX file and report prune writes, and a checkpoint folder is "
            "written as a checkpoint (graphprune roofline OUT predicts the pruned checkpoint's time)"
        )
    plan = _streamed_plan(args.model, args, passes, experimental)
    plan_path = args.output.rstrip("/") + ".plan.json"
    with Outputs(inputs=[args.model], overwrite=args.overwrite) as out:
        out.check(plan_path)  # refused before the checkpoint is written
    written = apply_to_checkpoint(plan, args.model, args.output, overwrite=args.overwrite)
    plan_json, _ = plan.save(plan_path, overwrite=args.overwrite)
    if not args.json:
        print(plan.report)
        print(written)
        print(f"plan: {plan_json} (+ .safetensors): `graphprune plan` reads it")
    return {
        **plan.report.to_dict(),
        "output": args.output,
        "plan": plan_json,
        "shards": written.shards,
        "bytes_before": written.bytes_before,
        "bytes_after": written.bytes_after,
    }


def _streamed_plan(folder: str, args: argparse.Namespace, passes: list, experimental: bool) -> Any:
    """The plan of a checkpoint folder: the model built on meta from its config, the weights read
    from its shards, calibration run block by block."""
    import graphprune as gp

    loaded = checkpoint_model(folder)
    calibration = None
    if args.calibration:
        calibration = (
            text_calibration(folder, args.calibration, seq_len=args.seq_len, samples=args.samples)
            if args.calibration.endswith(".txt")
            else load_calibration(args.calibration, args.batch_size)
        )
    needing = [p.name for p in passes if p.reads_calibration()]
    if calibration is None and needing:
        raise InputError(
            f"{', '.join(needing)} read calibration data: give --calibration (a .txt file, one sample a line, "
            "or .npz/.pt batches)"
        )
    return gp.plan(
        loaded.module,
        loaded.inputs,
        passes,
        calibration=calibration,
        weights=folder,
        blocks=args.blocks,
        prefix=args.prefix,
        scratch=args.scratch,
        experimental_order=experimental,
    )


def text_calibration(folder: str, path: str, *, seq_len: int, samples: int) -> list[dict]:
    """Calibration batches from a text file: one sample a line (blank lines skipped, the first
    ``samples``), tokenized with the checkpoint's own tokenizer and cut at ``seq_len`` tokens; each
    sample is a batch of its own, so no padding enters the statistics."""
    from transformers import AutoTokenizer

    if seq_len < 1 or samples < 1:
        raise InputError(f"--seq-len and --samples must be at least 1, got {seq_len} and {samples}")
    if not os.path.isfile(path):
        raise InputError(f"calibration file {path}: no such file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"calibration file {path}: text is tokenized with the checkpoint's own tokenizer, and {folder} has "
            f"none that transformers can load ({type(exc).__name__}: {exc})"
        ) from exc
    with open(path, encoding="utf-8") as text:
        lines = [line.strip() for line in text if line.strip()][:samples]
    if not lines:
        raise InputError(f"calibration file {path}: no text (one sample a line)")
    return [
        {"input_ids": tokenizer(line, truncation=True, max_length=seq_len, return_tensors="pt")["input_ids"]}
        for line in lines
    ]


def _prune_module(args: argparse.Namespace, passes: list, experimental: bool, out: Outputs) -> tuple[Any, Any, Any]:
    """Prune a PyTorch model and stage its ONNX file in ``out``; with ``--latency``, time the dense
    model (exported to a temporary folder) and the staged file."""
    import graphprune as gp

    loaded = load_model(args.model)
    model, inputs = loaded.module, loaded.inputs
    result = gp.prune(
        model,
        inputs,
        passes=passes,
        calibration=_module_calibration(args, loaded, passes),
        experimental_order=experimental,
    )
    written = result.export_onnx(args.output, dynamic_batch=_dynamic_batch(args, loaded), outputs=out)
    latency = None
    if args.latency:
        with tempfile.TemporaryDirectory() as tmp:
            dense = os.path.join(tmp, "dense.onnx")
            gp.export_onnx(model, inputs, dense, dynamic_batch=loaded.dynamic_batch)
            latency = {
                "dense": onnx_latency_ms(dense, runs=args.runs, threads=args.threads),
                "compressed": onnx_latency_ms(out.staged(args.output), runs=args.runs, threads=args.threads),
            }
    return result, written, latency


def _module_calibration(args: argparse.Namespace, loaded: LoadedModel, passes: list) -> list | None:
    """The batches a PyTorch model is calibrated on: ``--calibration``, else the factory's, else (when
    a pass reads calibration) the example inputs alone, with a note."""
    calibration = load_calibration(args.calibration, args.batch_size) if args.calibration else loaded.calibration
    if calibration is None and any(p.reads_calibration() for p in passes):
        _say(args, "no --calibration given: calibrating on the example inputs only (give real data for real use)")
        calibration = [loaded.inputs]
    return calibration


def _prune_onnx_file(args: argparse.Namespace, passes: list, experimental: bool, out: Outputs) -> tuple[Any, Any, Any]:
    """Prune an ONNX file and stage the result in ``out``; with ``--latency``, time the input file
    (never written over: it is an input of ``out``) and the staged file."""
    import graphprune as gp

    if not os.path.isfile(args.model):
        raise InputError(f"{args.model}: no such ONNX file")
    feeds = load_calibration(args.calibration, args.batch_size) if args.calibration else None
    if feeds is not None and not all(isinstance(f, dict) for f in feeds):
        raise InputError(f"calibration file {args.calibration}: an ONNX model needs arrays keyed by input name")
    if feeds is None and any(p.reads_calibration() for p in passes):
        _say(args, "no --calibration given: calibrating on generated feeds only (give real data for real use)")
    result = gp.prune_onnx(args.model, passes, calibration=feeds, experimental_order=experimental)
    dense = onnx_latency_ms(args.model, runs=args.runs, threads=args.threads) if args.latency else None
    written = result.save(args.output, outputs=out)
    latency = None
    if args.latency:
        latency = {
            "dense": dense,
            "compressed": onnx_latency_ms(out.staged(args.output), runs=args.runs, threads=args.threads),
        }
    return result, written, latency


def _model_files(spec: str) -> list[str]:
    """The files a MODEL argument reads (an .onnx file with its external data, or a .pt2), which no
    output may replace; none for ``package.module:factory``."""
    if spec.endswith(".onnx"):
        from graphprune.emit.onnx_export import onnx_files

        return onnx_files(spec)
    return [spec] if spec.endswith(".pt2") else []


def cmd_export(args: argparse.Namespace) -> dict:
    import graphprune as gp

    loaded = load_model(args.model)
    with Outputs(inputs=_model_files(args.model), overwrite=args.overwrite) as out:
        exported = gp.export_onnx(
            loaded.module,
            loaded.inputs,
            args.output,
            outputs=out,
            dynamic_batch=not args.static_batch and _dynamic_batch(args, loaded),
        )
    if not args.json:
        print(exported)
    return {"output": args.output, "stage": str(exported.stage), "max_error": exported.max_error}


def cmd_plan(args: argparse.Namespace) -> dict:
    """Describe a plan file, diff two, or make the plan of a checkpoint folder (``-o``)."""
    from graphprune.io.plan_file import PlanFile

    if os.path.isdir(args.plan):
        return _plan_checkpoint(args)
    plain = vars(parser().parse_args(["plan", args.plan, *([args.other] if args.other else [])]))
    given = [
        f"--{k.replace('_', '-')}" for k, v in plain.items() if k not in ("json", "quiet") and getattr(args, k) != v
    ]
    if given:
        raise InputError(
            f"{' '.join(given)}: the pass options, -o and --overwrite make the plan of a checkpoint folder, and "
            f"{args.plan} is not a folder (a plan file is described or compared as it is)"
        )
    plan = PlanFile.load(args.plan)
    if args.other is None:
        if not args.json:
            print(plan.describe())
        return {"plan": args.plan, "description": plan.describe().splitlines()}
    differences = plan.diff(PlanFile.load(args.other))
    if not args.json:
        print("\n".join(differences) if differences else "the two plans make the same decisions")
    return {"plans": [args.plan, args.other], "differences": differences}


def _plan_checkpoint(args: argparse.Namespace) -> dict:
    """``graphprune plan FOLDER -o NAME.plan.json``: the first half of prune (the streamed plan),
    saved for ``apply-checkpoint`` (or ``gp.apply_to_checkpoint``) to apply later."""
    if args.other is not None:
        raise InputError(
            f"{args.plan} is a checkpoint folder: plan takes one, and a second argument only to compare plans"
        )
    if args.output is None or not args.output.endswith(".plan.json"):
        raise InputError(f"-o names the plan file to write (NAME.plan.json), got {args.output!r}")
    passes, experimental = _passes(args)
    with Outputs(inputs=[args.plan], overwrite=args.overwrite) as out:
        out.check(args.output)  # refused before the plan is made
    plan = _streamed_plan(args.plan, args, passes, experimental)
    plan_json, tensors = plan.save(args.output, overwrite=args.overwrite)
    if not args.json:
        print(plan.report)
        print(plan.describe())
        print(
            f"plan: {plan_json} (+ {tensors}); apply it with `graphprune apply-checkpoint {plan_json} {args.plan} OUT`"
        )
    return {**plan.report.to_dict(), "plan": plan_json, "description": plan.describe().splitlines()}


def cmd_apply_checkpoint(args: argparse.Namespace) -> dict:
    from graphprune.io.checkpoint import apply_to_checkpoint

    config = None
    if args.config is not None:
        config = {}
        for item in args.config:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InputError(f"--config takes KEY=VALUE (an integer, or JSON), got {item!r}")
            try:
                config[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InputError(f"--config {key}: {value!r} is not an integer or JSON value") from exc
    report = apply_to_checkpoint(
        args.plan,
        args.source,
        args.destination,
        prefix=args.prefix,
        config=config,
        overwrite=args.overwrite,
        format=args.format,
    )
    if not args.json:
        print(report)
    return {
        "destination": report.destination,
        "shards": report.shards,
        "tensors_changed": len(report.tensors_changed),
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "notes": report.notes,
        "resumed_shards": report.resumed_shards,
        "config": report.config,
    }


def cmd_roofline(args: argparse.Namespace) -> dict:
    """The predicted time of MODEL on a device; with pass options, of MODEL compressed by them
    against MODEL itself."""
    import graphprune as gp
    from graphprune.emit.roofline import is_chart

    if args.model.endswith(".onnx"):
        raise InputError(f"{args.model}: roofline reads PyTorch models so far (package.module:factory, .pt2, a folder)")
    flags = bool(args.recipe) or _pass_flags(args)
    loaded = load_model(args.model, checkpoints=True)
    if args.plot and not args.plot.endswith(".png"):
        raise InputError(f"--plot writes a .png, got {args.plot!r}")
    if flags:
        if os.path.isdir(args.model):
            raise InputError(
                f"{args.model} is a checkpoint folder, whose weights roofline does not read: prune it "
                "(graphprune prune FOLDER -o OUT ...), then compare `roofline FOLDER` with `roofline OUT`"
            )
        passes, experimental = _passes(args)
        subject: Any = gp.prune(
            loaded.module,
            loaded.inputs,
            passes=passes,
            calibration=_module_calibration(args, loaded, passes),
            experimental_order=experimental,
        )
        predicted = gp.roofline(subject, device=args.device, precision=args.precision, batch=args.batch)
    else:
        predicted = gp.roofline(
            loaded.module, loaded.inputs, device=args.device, precision=args.precision, batch=args.batch
        )
    if args.plot:
        with Outputs(inputs=_model_files(args.model), overwrite=args.overwrite) as out:
            predicted.plot(out.claim(args.plot, ours=is_chart))
    if not args.json:
        print(predicted.table(top=args.top))
        if args.plot:
            print(f"roofline chart: {args.plot}")
    return {**predicted.to_dict(), "model": args.model, "plot": args.plot}


def cmd_bench(args: argparse.Namespace) -> dict:
    rows = [
        {"model": path, "ms": onnx_latency_ms(path, batch=args.batch, runs=args.runs, threads=args.threads)}
        for path in args.models
    ]
    base = rows[0]["ms"]
    for row in rows:
        row["speedup"] = base / row["ms"]
    if not args.json:
        print(f"onnxruntime CPU, batch {args.batch}, median of {args.runs} runs")
        for row in rows:
            print(f"  {row['model']:<48}{row['ms']:>10.2f} ms{row['speedup']:>8.2f}x")
    return {"batch": args.batch, "runs": args.runs, "models": rows}


def _dynamic_batch(args: argparse.Namespace, loaded: LoadedModel) -> bool:
    if not loaded.dynamic_batch:
        _say(args, f"{args.model} was exported with a static batch size: the ONNX file keeps it")
    return loaded.dynamic_batch


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"graphprune: {message}", file=sys.stderr)


MODEL_HELP = (
    "package.module:factory (returning the module and example inputs), a .pt2 file or an .onnx file; "
    "inspect and prune also take a Hugging Face checkpoint folder (built on meta from its config.json)"
)
EXAMPLES = {
    "inspect": "graphprune inspect samples.resnet:build --graph coupling.svg",
    "prune": "graphprune prune samples.resnet:build -o resnet.onnx --channels 0.3 --nm 2:4 --int8 --latency\n"
    "  graphprune prune ./llama-ckpt -o ./llama-pruned --nm 2:4 --method sparsegpt --calibration texts.txt",
    "export": "graphprune export samples.resnet:build -o resnet.onnx",
    "plan": "graphprune plan run1.plan.json run2.plan.json\n"
    "  graphprune plan ./llama-ckpt -o llama.plan.json --nm 2:4 --method sparsegpt --calibration texts.txt",
    "apply-checkpoint": "graphprune apply-checkpoint plan.json ./llama-ckpt ./llama-pruned",
    "roofline": "graphprune roofline samples.resnet:build --channels 0.5 --nm 2:4 --int8 --device h100 --batch 64",
    "bench": "graphprune bench dense.onnx pruned.onnx --batch 8",
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="graphprune",
        description="Compress PyTorch models: structured pruning, N:M sparsity, int8/int4/fp8; emit verified ONNX.",
    )
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=helptext,
            description=helptext,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print a JSON summary on stdout (for scripts)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or notes")

    def overwrite(p: argparse.ArgumentParser, what: str = "output files") -> None:
        p.add_argument(
            "--overwrite",
            action="store_true",
            help=f"replace existing {what} graphprune did not write (never an input)",
        )

    def timing(p: argparse.ArgumentParser) -> None:
        p.add_argument("--runs", type=int, default=20, help="timed runs per model; the median is reported (20)")
        p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="onnxruntime intra-op threads")

    def pass_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--recipe", help="a recipe file naming the passes (docs/RECIPES.md), instead of the flags below")
        p.add_argument(
            "--remove-blocks", type=int, help="residual blocks to remove, least important first (BlockPrune)"
        )
        p.add_argument("--channels", type=float, help="fraction of channels to remove (ChannelPrune)")
        p.add_argument("--round-to", type=int, default=8, help="keep every pruned channel count a multiple of this (8)")
        p.add_argument("--nm", help="N:M sparsity such as 2:4 (NMSparsity)")
        p.add_argument("--method", default="magnitude", help="N:M criterion: magnitude, wanda, sparsegpt")
        p.add_argument(
            "--refine", action="store_true", help="refine the N:M masks on the calibration data (refine=True)"
        )
        p.add_argument(
            "--low-rank",
            type=int,
            help="rank of a low-rank path beside every compressed linear layer (LowRankCompensation, EoRA)",
        )
        p.add_argument("--int8", action="store_true", help="static int8 quantization (Quantize; --quantize int8)")
        p.add_argument(
            "--quantize",
            choices=["int8", "int4", "fp8"],
            help="quantization format (Quantize): int8, int4 weights, fp8",
        )
        p.add_argument("--group-size", type=int, help="int4's weights per scale along the reduction dim (128)")
        p.add_argument(
            "--quant-method", choices=["rtn", "gptq"], default="rtn", help="round to nearest, or GPTQ (calibration)"
        )
        p.add_argument(
            "--calibration", help=".npz or .pt calibration data; for a checkpoint folder also .txt (one sample a line)"
        )
        p.add_argument("--batch-size", type=int, default=8, help="samples per calibration batch, from the file (8)")

    def streamed_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seq-len", type=int, default=512, help="tokens kept of each .txt calibration sample (512)")
        p.add_argument("--samples", type=int, default=128, help="lines read of a .txt calibration file (128)")
        p.add_argument(
            "--blocks",
            help="for a checkpoint folder: the module list calibration runs block by block, e.g. model.layers "
            "(default: the largest list of like modules)",
        )
        p.add_argument(
            "--prefix", default="", help="for a checkpoint folder: prepended to the model's names to find its tensors"
        )
        p.add_argument(
            "--scratch", help="for a checkpoint folder: where masks and new weights wait until the plan is written"
        )

    p = command("inspect", "coupled channel groups, frozen spaces and why, params and MACs")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--max-groups", type=int, default=50, help="groups to list; the rest are counted (50)")
    p.add_argument("--all", action="store_true", help="list every frozen space, not one line per reason")
    p.add_argument("--graph", help="write the coupling graph: .dot (Graphviz), .svg or .png (drawn)")
    common(p)
    p = command("prune", "run passes, write a verified ONNX file and report pages in <out>.report/")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="the ONNX file to write, its plan and report beside it; for a checkpoint folder, the folder "
        "the pruned checkpoint goes into",
    )
    pass_options(p)
    streamed_options(p)
    p.add_argument("--latency", action="store_true", help="also time the dense and the compressed ONNX files")
    p.add_argument(
        "--device",
        default="cpu",
        help="the device the report's roofline predicts for: cpu (this machine, measured once and cached), "
        "h100, h200, a100, l4, a10, rtx4090, or none",
    )
    timing(p)
    overwrite(p)
    common(p)
    p = command("export", "write a model as a verified ONNX file")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to the example's (default: dynamic)")
    overwrite(p)
    common(p)
    p = command(
        "plan",
        "what a saved plan decides (result.save_plan), how two plans differ, or the plan of a checkpoint folder",
    )
    p.add_argument(
        "plan",
        help="a plan file (.plan.json) written by prune or result.save_plan, or a checkpoint folder to plan "
        "(with -o and the pass options; applied later by apply-checkpoint)",
    )
    p.add_argument("other", nargs="?", help="a second plan file: print how the two differ")
    p.add_argument("-o", "--output", help="for a checkpoint folder: the plan file to write (NAME.plan.json)")
    pass_options(p)
    streamed_options(p)
    overwrite(p)
    common(p)
    p = command("apply-checkpoint", "apply a saved plan to a safetensors checkpoint folder, shard by shard")
    p.add_argument("plan", help="the plan file (.plan.json) to apply")
    p.add_argument("source", help="the checkpoint folder (config.json and safetensors shards); only read")
    p.add_argument("destination", help="the folder to write the pruned checkpoint into")
    p.add_argument(
        "--config",
        nargs="*",
        metavar="KEY=VALUE",
        help="new config.json values (without it they are inferred from the architecture's shapes "
        "where transformers knows it; give none to copy it unchanged)",
    )
    p.add_argument("--prefix", default="", help="prepended to the plan's tensor names to find them in the checkpoint")
    p.add_argument(
        "--format",
        choices=["compressed-tensors"],
        help="write the plan's quantization (int4, fp8) in the compressed-tensors layout vLLM and transformers load",
    )
    overwrite(p, "destination folders")
    common(p)
    p = command(
        "roofline",
        "predicted time of a model on a device, per layer and in total; with pass options, compressed against dense",
    )
    p.add_argument(
        "model",
        help="package.module:factory, a .pt2 file, or a Hugging Face checkpoint folder (built on meta from its "
        "config.json and predicted as it is)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (this machine, measured once and cached), h100, h200, a100, l4, a10, rtx4090",
    )
    p.add_argument(
        "--precision", help="float format of the layers not quantized (bf16 where the device has it, else fp32)"
    )
    p.add_argument("--batch", type=int, help="batch size to predict for (the example's)")
    p.add_argument("--top", type=int, default=20, help="layers listed by dense time; the rest are summed (20)")
    p.add_argument("--plot", help="write the roofline chart with every layer on it (.png)")
    pass_options(p)
    overwrite(p)
    common(p)
    p = command("bench", "onnxruntime latency of ONNX files side by side (ratios to the first)")
    p.add_argument("models", nargs="+", help="ONNX files; the first is the baseline of the ratios")
    p.add_argument("--batch", type=int, default=1, help="batch size of the timed inputs (1)")
    timing(p)
    common(p)
    return top


COMMANDS = {
    "inspect": cmd_inspect,
    "prune": cmd_prune,
    "export": cmd_export,
    "plan": cmd_plan,
    "apply-checkpoint": cmd_apply_checkpoint,
    "roofline": cmd_roofline,
    "bench": cmd_bench,
}


def _said(exc: BaseException) -> str:
    """The error's message with its notes (the pass manager notes which pass failed)."""
    return "\n".join([str(exc), *getattr(exc, "__notes__", ())])


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        summary = COMMANDS[args.command](args)
    except (InputError, ContractError) as exc:
        print(f"graphprune {args.command}: error: {_said(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except InternalError as exc:
        print(
            f"graphprune {args.command}: internal error: {_said(exc)}\nthis is a bug in graphprune, please report "
            "it (with the command and the model)",
            file=sys.stderr,
        )
        return EXIT_BUG
    except GraphpruneError as exc:
        print(f"graphprune {args.command}: cannot handle this model: {_said(exc)}", file=sys.stderr)
        return EXIT_MODEL
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
