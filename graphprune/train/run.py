"""``python -m graphprune.train``: learn N:M masks, or fine-tune a compressed model (N:M masks made
here, or any saved plan: depth and width pruning) with its task loss or by distillation from the dense
model, in one process or under ``torchrun`` (``torchrun --nproc-per-node 2 -m graphprune.train
learn-masks --setup ...``).

The user's code supplies the model, data and loss through a *setup*: a function, named as
``module:function``, that returns a :class:`Setup` and builds the same thing on every rank.
``batches`` are global batches.  Each rank trains on its slice of every batch (rows split
evenly), so with a loss that is a mean over rows the ranks compute, together, the gradient one
process computes on the whole batch.  DDP averages it, and every rank ends with the masks
(and weights) of the single-process run.  Calibration batches for data-driven priors are shared
out whole (statistics are sums, see :mod:`graphprune.frontends.torch.distributed`).  Rank 0 writes the result as
a plan file: the masks, and for ``fine-tune`` the trained values of every parameter.

``fine-tune --plan pruned.json --teacher dense`` distils the model the plan makes from the setup's
model as built (:mod:`graphprune.train.distill`: Minitron's forward KL on the logits by default);
``--teacher logits.safetensors`` reads a large teacher's logits written beforehand by
``teacher-logits``.
:func:`graphprune.apply_to_checkpoint` turns that into a checkpoint, and
:func:`graphprune.apply_plan_file` into a module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from graphprune.api.torch import prune
from graphprune.errors import ContractError, InputError
from graphprune.frontends.torch.capture import ExampleInputs
from graphprune.frontends.torch.distributed import init_from_env, rank, shard, split_batch, world_size
from graphprune.frontends.torch.masks import finalize, nm_masks
from graphprune.io.plan_file import PlanFile, apply_plan_file
from graphprune.passes import NMSparsity
from graphprune.train import LearnedMasks, SparseTraining
from graphprune.train.distill import (
    Distillation,
    Outputs,
    TeacherLogits,
    first_logits,
    matched_blocks,
    save_teacher_logits,
)

EXIT_INPUT = 2


@dataclass
class Setup:
    """What the training command trains (built identically on every rank)."""

    model: nn.Module
    example_inputs: ExampleInputs
    batches: list[Any]  # global batches, taken in turn, one per step
    loss: Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> the mean loss over the batch's rows
    calibration: list[Any] | None = None  # for data-driven priors / criteria (wanda, sparsegpt)
    outputs: Outputs = first_logits  # (model, batch) -> the logits distillation matches


def learn_masks(
    setup: Setup,
    *,
    n: int = 2,
    m: int = 4,
    prior: str = "magnitude",
    steps: int = 100,
    lr: float = 0.05,
    seed: int = 0,
    weight_regularization: float = 0.0,
) -> PlanFile:
    """Masks learned with :class:`LearnedMasks` (weights frozen), as a plan file."""
    result = prune(
        setup.model,
        setup.example_inputs,
        [NMSparsity(n, m, method="learned", prior=prior)],
        calibration=_calibration(setup, prior),
    )
    model = result.module
    masks = LearnedMasks(model, steps=steps, seed=seed, weight_regularization=weight_regularization)
    _train(
        model,
        setup,
        steps,
        torch.optim.Adam(masks.parameters(), lr=lr),
        masks.step,
        _task(setup, None),
        masks.regularization,
    )
    masks.finalize()
    pipeline = [*result.report.pipeline, f"LearnedMasks(steps={steps}, lr={lr}, ranks={world_size()})"]
    return PlanFile.of(result.report.model_name, pipeline, result.plans, nm_masks(model))


def fine_tune(
    setup: Setup,
    *,
    plan: str | os.PathLike | None = None,
    n: int = 2,
    m: int = 4,
    method: str = "magnitude",
    recipe: str = "sr-ste",
    steps: int = 100,
    lr: float = 1e-3,
    precision: str = "float32",
    teacher: str | None = None,
    temperature: float = 1.0,
    task_weight: float = 0.0,
    states_weight: float = 0.0,
) -> PlanFile:
    """Recovery fine-tuning of the compressed model, as a plan carrying the trained values of every
    parameter.  The model is the one ``plan`` makes of the setup's (else N:M masks from ``method``,
    SparseGPT solving in ``precision``); N:M masks train with :class:`SparseTraining`.  The loss is the
    setup's, or, with ``teacher`` (``"dense"``: the setup's model as built; else a file of
    :func:`save_teacher_logits`), distillation (:class:`~graphprune.train.distill.Distillation`, with
    ``temperature``, ``task_weight``, and ``states_weight`` on the blocks a removal kept)."""
    if plan is not None:  # either way the setup's model stays as built: the teacher
        decided = PlanFile.load(plan)
        model = apply_plan_file(setup.model, setup.example_inputs, decided)
        pipeline = list(decided.pipeline)
    else:
        decided = None
        result = prune(
            setup.model,
            setup.example_inputs,
            [NMSparsity(n, m, method=method, precision=precision)],
            calibration=_calibration(setup, method),
        )
        model, pipeline = result.module, list(result.report.pipeline)
    trainer = SparseTraining(model, recipe=recipe) if nm_masks(model) else None
    loss = _task(setup, None)
    if teacher is not None:
        source = setup.model if teacher == "dense" else TeacherLogits(teacher)
        matched = []
        if states_weight:
            depth = decided.depth if decided is not None else None
            if depth is None:
                raise InputError(
                    "--states-weight matches blocks kept by a block removal: give a --plan that removes blocks"
                )
            matched = list(matched_blocks(depth.blocks, depth.kept))
        distillation = Distillation(
            source,
            temperature=temperature,
            task_weight=task_weight,
            states_weight=states_weight,
            matched=matched,
            outputs=setup.outputs,
        )
        loss = _task(setup, distillation)
    parameters = [p for p in model.parameters() if p.requires_grad]
    _train(model, setup, steps, torch.optim.SGD(parameters, lr=lr), trainer.step if trainer else _nothing, loss)
    if trainer is not None:
        trainer.finalize()
    how = f"distillation from {teacher}" if teacher else (repr(recipe) if trainer else "task loss")
    pipeline.append(f"FineTune({how}, steps={steps}, lr={lr}, ranks={world_size()})")
    if decided is not None:
        plans = [*([decided.depth] if decided.depth else []), *decided.structured]
        out = PlanFile.of(decided.model, pipeline, plans, nm_masks(model))
        out.inputs = decided.inputs
    else:
        out = PlanFile.of(result.report.model_name, pipeline, result.plans, nm_masks(model))
    finalize(model)  # plain parameters under their own names (the masks are in the plan)
    out.values = {name: p.detach().clone() for name, p in model.named_parameters()}
    return out


def teacher_logits(setup: Setup, path: str | os.PathLike) -> str:
    """The setup's model's logits on its batches, written for ``fine-tune --teacher PATH``."""
    return save_teacher_logits(setup.model, setup.batches, path, outputs=setup.outputs)


def _nothing() -> None:
    return None


def _task(setup: Setup, distillation: Distillation | None) -> Callable[[nn.Module, Any, int], torch.Tensor]:
    """The training loss of a step: the setup's, or distillation (with the setup's as its task term)."""
    if distillation is None:
        return lambda trained, batch, index: setup.loss(trained, batch)
    return lambda trained, batch, index: distillation.loss(trained, batch, index, lambda: setup.loss(trained, batch))


def _calibration(setup: Setup, criterion: str) -> list[Any] | None:
    if criterion == "magnitude":
        return None
    if not setup.calibration:
        raise InputError(f"the {criterion!r} criterion needs calibration batches: set Setup.calibration")
    mine = shard(setup.calibration)
    if not mine:
        raise InputError(f"{len(setup.calibration)} calibration batches cannot be shared out over {world_size()} ranks")
    return mine


def _train(
    model: nn.Module,
    setup: Setup,
    steps: int,
    optimizer: torch.optim.Optimizer,
    after_step: Callable[[], None],
    loss_of: Callable[[nn.Module, Any, int], torch.Tensor],
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> None:
    if not setup.batches:
        raise InputError("Setup.batches is empty: nothing to train on")
    trained = torch.nn.parallel.DistributedDataParallel(model) if world_size() > 1 else model
    model.train()
    for step in tqdm(range(steps), desc="train", unit="step", disable=None if rank() == 0 else True):
        index = step % len(setup.batches)
        loss = loss_of(trained, split_batch(setup.batches[index]), index)
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        after_step()
    model.eval()


def load_setup(spec: str) -> Setup:
    """Call the ``module:function`` that builds the setup."""
    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise InputError(f"--setup must be module:function, got {spec!r}")
    try:
        setup = getattr(importlib.import_module(module_name), function)()
    except (ImportError, AttributeError) as exc:
        raise InputError(f"--setup {spec}: {exc}") from exc
    if not isinstance(setup, Setup):
        raise InputError(f"--setup {spec} returned {type(setup).__name__}, not a graphprune.train.run.Setup")
    return setup


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m graphprune.train", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("learn-masks", "learn N:M masks with the weights frozen (MaskLLM)"),
        ("fine-tune", "recovery fine-tuning of N:M masks made here or of a saved plan, optionally by distillation"),
        ("teacher-logits", "write the setup's model's logits on its batches, for fine-tune --teacher PATH"),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--setup", required=True, help="module:function returning a graphprune.train.run.Setup")
        if name == "teacher-logits":
            sub.add_argument("--out", required=True, help="safetensors file to write")
            continue
        sub.add_argument("--out", required=True, help="plan file to write (PATH.json + PATH.safetensors)")
        sub.add_argument("--n", type=int, default=None, help="N of N:M (default 2)")
        sub.add_argument("--m", type=int, default=None, help="M of N:M (default 4)")
        sub.add_argument("--steps", type=int, default=100)
        if name == "learn-masks":
            sub.add_argument("--prior", default="magnitude", choices=["magnitude", "wanda", "sparsegpt"])
            sub.add_argument("--lr", type=float, default=0.05)
            sub.add_argument("--seed", type=int, default=0, help="seed of the Gumbel noise (the same on every rank)")
            sub.add_argument("--weight-regularization", type=float, default=0.0)
            continue
        sub.add_argument("--plan", help="start from the model this saved plan makes (instead of N:M masks made here)")
        sub.add_argument(
            "--method", default=None, choices=["magnitude", "wanda", "sparsegpt"], help="default magnitude"
        )
        sub.add_argument("--recipe", default="sr-ste", choices=["sr-ste", "mask-decay", "fixed"])
        sub.add_argument("--lr", type=float, default=1e-3)
        sub.add_argument(
            "--precision", default="float32", choices=["float32", "float64"], help="SparseGPT's Hessians and solves"
        )
        sub.add_argument(
            "--teacher",
            help="distil: 'dense' (the setup's model as built) or a file written by teacher-logits; "
            "default: train on the setup's loss",
        )
        sub.add_argument("--temperature", type=float, default=1.0, help="of the KL term (Minitron: 1)")
        sub.add_argument("--task-weight", type=float, default=0.0, help="weight of the setup's loss beside the KL")
        sub.add_argument(
            "--states-weight", type=float, default=0.0, help="weight of the loss on the streams of the blocks kept"
        )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        init_from_env()
        setup = load_setup(args.setup)
        if args.command == "teacher-logits":
            if rank() == 0:
                print(f"written: {teacher_logits(setup, args.out)} ({len(setup.batches)} batches)")
            return 0
        nm = {"n": args.n if args.n is not None else 2, "m": args.m if args.m is not None else 4}
        if args.command == "learn-masks":
            plan = learn_masks(
                setup,
                **nm,
                prior=args.prior,
                steps=args.steps,
                lr=args.lr,
                seed=args.seed,
                weight_regularization=args.weight_regularization,
            )
        else:
            if args.plan is not None and (given := [f"--{k}" for k in ("n", "m", "method") if getattr(args, k)]):
                raise InputError(f"{', '.join(given)} choose N:M masks made here; --plan brings its own model")
            if args.teacher is None and (args.task_weight or args.states_weight or args.temperature != 1.0):
                raise InputError("--temperature, --task-weight and --states-weight need --teacher")
            plan = fine_tune(
                setup,
                plan=args.plan,
                **nm,
                method=args.method or "magnitude",
                recipe=args.recipe,
                steps=args.steps,
                lr=args.lr,
                precision=args.precision,
                teacher=args.teacher,
                temperature=args.temperature,
                task_weight=args.task_weight,
                states_weight=args.states_weight,
            )
        if rank() == 0:
            json_path, _ = plan.save(args.out)
            print(f"{plan.describe()}\nwritten: {json_path} ({world_size()} rank{'s' if world_size() > 1 else ''})")
    except (InputError, ContractError) as exc:
        print(f"python -m graphprune.train {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    finally:
        if world_size() > 1:
            torch.distributed.destroy_process_group()
    return 0
