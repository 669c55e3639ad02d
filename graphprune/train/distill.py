"""Knowledge distillation from a teacher: how a pruned model recovers what pruning took.

The default is the recipe of Minitron (Muralidharan et al. 2024; Sreenivas et al. 2024): the dense
model is the teacher, the loss is the forward KL divergence between its token distributions and the
student's at temperature 1, and nothing else (no task loss).  Options add the task loss and an
intermediate-state loss on matched blocks (after a block removal, student block ``j`` matches the
teacher's block ``kept[j]``), which Minitron adds when depth shrinks a lot.

A teacher too large to hold beside the student is run once beforehand:
:func:`save_teacher_logits` writes its logits for every training batch to a safetensors file, and
:class:`TeacherLogits` reads them back batch by batch (each rank its rows).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from safetensors import safe_open
from safetensors.torch import save_file

from graphprune.errors import InputError
from graphprune.frontends.torch.blocks import first_output
from graphprune.frontends.torch.capture import eval_mode, normalize_inputs
from graphprune.frontends.torch.distributed import split_batch
from graphprune.io.outputs import writing
from graphprune.io.tensor_store import file_format

Outputs = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> the logits distillation matches
LOGITS_FORMAT = "graphprune-teacher-logits"  # in the header of a file save_teacher_logits wrote


def first_logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's first floating output on ``batch`` (a Hugging Face model's ``logits``)."""
    args, kwargs = normalize_inputs(batch)
    out = model(*args, **kwargs)
    found = next((t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    if found is None:
        raise InputError(f"{type(model).__name__} returns no floating tensor to distil: give Setup.outputs")
    return found


class TeacherLogits:
    """A teacher's logits saved by :func:`save_teacher_logits`, batch by batch (this rank's rows)."""

    def __init__(self, path: str | os.PathLike) -> None:
        if not os.path.isfile(path):
            raise InputError(f"teacher logits {path}: no such file (write it with save_teacher_logits)")
        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self.count = len([k for k in f.keys() if k.startswith("batch/")])
        if not self.count:
            raise InputError(f"teacher logits {path} hold no batch/<i> tensors: not written by save_teacher_logits")

    def __call__(self, index: int) -> torch.Tensor:
        if index >= self.count:
            raise InputError(f"teacher logits {self.path} hold {self.count} batches; batch {index} was asked for")
        with safe_open(self.path, framework="pt") as f:
            return split_batch(f.get_tensor(f"batch/{index}"))


def save_teacher_logits(
    teacher: nn.Module,
    batches: Sequence[Any],
    path: str | os.PathLike,
    *,
    outputs: Outputs = first_logits,
    overwrite: bool = False,
) -> str:
    """Write ``teacher``'s logits on each of ``batches`` (whole global batches) to ``path``; an existing
    file is replaced only if it holds teacher logits graphprune wrote, or with ``overwrite``."""
    with torch.no_grad(), eval_mode(teacher):
        tensors = {f"batch/{i}": outputs(teacher, batch).detach().cpu().contiguous() for i, batch in enumerate(batches)}
    with writing(None, overwrite=overwrite) as out:
        staged = out.claim(path, ours=lambda existing: file_format(existing) == LOGITS_FORMAT)
        save_file(tensors, staged, metadata={"format": LOGITS_FORMAT})
    return str(path)


class Distillation:
    """The distillation loss of a student against ``teacher`` (a module, or :class:`TeacherLogits`).

    Args:
        temperature: both distributions are softened by it; the KL term is scaled by its square.
        task_weight: weight of the task loss handed to :meth:`loss` (0: distillation alone).
        states_weight: weight of the intermediate-state loss, the mean over ``matched`` block pairs and
            tokens of the squared error between their output streams relative to the teacher's
            (needs a teacher module and equal stream widths).
        matched: ``(student block, teacher block)`` module paths whose outputs are compared.
        outputs: the logits of a model on a batch (default :func:`first_logits`).
    """

    def __init__(
        self,
        teacher: nn.Module | TeacherLogits,
        *,
        temperature: float = 1.0,
        task_weight: float = 0.0,
        states_weight: float = 0.0,
        matched: Sequence[tuple[str, str]] = (),
        outputs: Outputs = first_logits,
    ) -> None:
        if temperature <= 0 or task_weight < 0 or states_weight < 0:
            raise InputError(
                f"distillation needs temperature > 0 and weights >= 0, got {temperature}, {task_weight}, "
                f"{states_weight}"
            )
        if states_weight and not isinstance(teacher, nn.Module):
            raise InputError("the intermediate-state loss needs the teacher module, not saved logits")
        if states_weight and not matched:
            raise InputError("the intermediate-state loss needs matched block pairs")
        self.teacher, self.temperature, self.outputs = teacher, temperature, outputs
        self.task_weight, self.states_weight, self.matched = task_weight, states_weight, list(matched)

    def loss(
        self, student: nn.Module, batch: Any, index: int, task: Callable[[], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The loss on ``batch`` (the ``index``-th training batch: where saved logits are read)."""
        with self._states(student) as states:
            logits = self.outputs(student, batch)
            if isinstance(self.teacher, nn.Module):
                with torch.no_grad(), eval_mode(self.teacher):  # the teacher's own flags come back after
                    target = self.outputs(self.teacher, batch)
            else:
                target = self.teacher(index).to(logits.device, logits.dtype)
        if target.shape != logits.shape:
            raise InputError(f"the teacher's logits are {list(target.shape)}, the student's {list(logits.shape)}")
        t = self.temperature
        student_log = F.log_softmax(logits.reshape(-1, logits.shape[-1]).float() / t, dim=-1)
        teacher_log = F.log_softmax(target.reshape(-1, target.shape[-1]).float() / t, dim=-1)
        total = t * t * F.kl_div(student_log, teacher_log, log_target=True, reduction="batchmean")
        if self.states_weight:
            total = total + self.states_weight * states()
        if self.task_weight:
            if task is None:
                raise InputError("task_weight is set, but no task loss was given")
            total = total + self.task_weight * task()
        return total

    def _states(self, student: nn.Module):
        """A context that records the matched blocks' outputs while the student and teacher run, and
        yields the function computing their loss."""
        return _StateRecorder(student, self.teacher, self.matched) if self.states_weight else _NoStates()


class _NoStates:
    def __enter__(self) -> Callable[[], torch.Tensor]:
        return lambda: torch.zeros(())

    def __exit__(self, *exc: object) -> None:
        return None


class _StateRecorder:
    """Forward hooks on the matched blocks of both models; the relative squared error of their streams."""

    def __init__(self, student: nn.Module, teacher: nn.Module, matched: list[tuple[str, str]]) -> None:
        self.pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.handles = []
        if isinstance(student, nn.parallel.DistributedDataParallel):  # its blocks are the wrapped model's
            student = student.module
        for mine, theirs in matched:
            caught: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
            for model, path, into in ((student, mine, caught[0]), (teacher, theirs, caught[1])):
                try:
                    block = model.get_submodule(path)
                except AttributeError:
                    raise InputError(f"distillation: no block {path} in {type(model).__name__}") from None
                self.handles.append(
                    block.register_forward_hook(lambda _m, _a, out, into=into: into.append(first_output(out)))
                )
            self.pairs.append(caught)

    def __enter__(self) -> Callable[[], torch.Tensor]:
        return self.loss

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def loss(self) -> torch.Tensor:
        terms = []
        for mine, theirs in self.pairs:
            for s, t in zip(mine, theirs, strict=True):
                if s.shape != t.shape:
                    raise InputError(
                        f"the intermediate-state loss compares streams of equal shape; the student's is "
                        f"{list(s.shape)}, the teacher's {list(t.shape)} (width pruning changed it: use the logit "
                        "loss alone)"
                    )
                t = t.detach().float()  # per token, so that the loss is a mean over rows (as DDP needs)
                terms.append(((s.float() - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)).mean())
        return torch.stack(terms).mean()


def matched_blocks(path: str, kept: Sequence[int]) -> Iterator[tuple[str, str]]:
    """Student block ``j`` and the teacher block ``kept[j]`` it came from."""
    for j, i in enumerate(kept):
        yield f"{path}.{j}", f"{path}.{i}"
