"""``python -m graphprune.train``: learn N:M masks or fine-tune a masked model, in one process or
under ``torchrun`` (``torchrun --nproc-per-node 2 -m graphprune.train learn-masks --setup ...``).

The user's code supplies the model, data and loss through a *setup*: a function, named as
``module:function``, that returns a :class:`Setup` and builds the same thing on every rank.
``batches`` are global batches.  Each rank trains on its slice of every batch (rows split
evenly), so with a loss that is a mean over rows the ranks compute, together, the gradient one
process computes on the whole batch.  DDP averages it, and every rank ends with the masks
(and weights) of the single-process run.  Calibration batches for data-driven priors are shared
out whole (statistics are sums, see :mod:`graphprune.frontends.torch.distributed`).  Rank 0 writes the result as
a plan file: the masks, and for ``fine-tune`` the trained values of every parameter.
:func:`graphprune.apply_to_checkpoint` turns that into a checkpoint, and
:func:`graphprune.apply_plan_file` into a module.
"""

from __future__ import annotations

import argparse
import importlib
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
from graphprune.io.plan_file import PlanFile
from graphprune.passes import NMSparsity
from graphprune.train import LearnedMasks, SparseTraining

EXIT_INPUT = 2


@dataclass
class Setup:
    """What the training command trains (built identically on every rank)."""

    model: nn.Module
    example_inputs: ExampleInputs
    batches: list[Any]  # global batches, taken in turn, one per step
    loss: Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> the mean loss over the batch's rows
    calibration: list[Any] | None = None  # for data-driven priors / criteria (wanda, sparsegpt)


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
    _train(model, setup, steps, torch.optim.Adam(masks.parameters(), lr=lr), masks.step, masks.regularization)
    masks.finalize()
    pipeline = [*result.report.pipeline, f"LearnedMasks(steps={steps}, lr={lr}, ranks={world_size()})"]
    return PlanFile.of(result.report.model_name, pipeline, result.plans, nm_masks(model))


def fine_tune(
    setup: Setup,
    *,
    n: int = 2,
    m: int = 4,
    method: str = "magnitude",
    recipe: str = "sr-ste",
    steps: int = 100,
    lr: float = 1e-3,
    precision: str = "float32",
) -> PlanFile:
    """N:M masks from ``method`` (SparseGPT solving in ``precision``), then recovery fine-tuning with
    :class:`SparseTraining`; the plan carries the masks and the trained values of every parameter."""
    result = prune(
        setup.model,
        setup.example_inputs,
        [NMSparsity(n, m, method=method, precision=precision)],
        calibration=_calibration(setup, method),
    )
    model = result.module
    trainer = SparseTraining(model, recipe=recipe)
    _train(
        model, setup, steps, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr), trainer.step
    )
    trainer.finalize()
    pipeline = [*result.report.pipeline, f"SparseTraining({recipe!r}, steps={steps}, lr={lr}, ranks={world_size()})"]
    plan = PlanFile.of(result.report.model_name, pipeline, result.plans, nm_masks(model))
    finalize(model)  # plain parameters under their own names (the masks are in the plan)
    plan.values = {name: p.detach().clone() for name, p in model.named_parameters()}
    return plan


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
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> None:
    if not setup.batches:
        raise InputError("Setup.batches is empty: nothing to train on")
    trained = torch.nn.parallel.DistributedDataParallel(model) if world_size() > 1 else model
    model.train()
    for step in tqdm(range(steps), desc="train", unit="step", disable=None if rank() == 0 else True):
        batch = split_batch(setup.batches[step % len(setup.batches)])
        loss = setup.loss(trained, batch)
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
        ("fine-tune", "N:M masks, then recovery fine-tuning (SR-STE and others)"),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--setup", required=True, help="module:function returning a graphprune.train.run.Setup")
        sub.add_argument("--out", required=True, help="plan file to write (PATH.json + PATH.safetensors)")
        sub.add_argument("--n", type=int, default=2)
        sub.add_argument("--m", type=int, default=4)
        sub.add_argument("--steps", type=int, default=100)
        if name == "learn-masks":
            sub.add_argument("--prior", default="magnitude", choices=["magnitude", "wanda", "sparsegpt"])
            sub.add_argument("--lr", type=float, default=0.05)
            sub.add_argument("--seed", type=int, default=0, help="seed of the Gumbel noise (the same on every rank)")
            sub.add_argument("--weight-regularization", type=float, default=0.0)
        else:
            sub.add_argument("--method", default="magnitude", choices=["magnitude", "wanda", "sparsegpt"])
            sub.add_argument("--recipe", default="sr-ste", choices=["sr-ste", "mask-decay", "fixed"])
            sub.add_argument("--lr", type=float, default=1e-3)
            sub.add_argument(
                "--precision", default="float32", choices=["float32", "float64"], help="SparseGPT's Hessians and solves"
            )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        init_from_env()
        setup = load_setup(args.setup)
        if args.command == "learn-masks":
            plan = learn_masks(
                setup,
                n=args.n,
                m=args.m,
                prior=args.prior,
                steps=args.steps,
                lr=args.lr,
                seed=args.seed,
                weight_regularization=args.weight_regularization,
            )
        else:
            plan = fine_tune(
                setup,
                n=args.n,
                m=args.m,
                method=args.method,
                recipe=args.recipe,
                steps=args.steps,
                lr=args.lr,
                precision=args.precision,
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
