"""Calibration and training across processes (``torch.distributed``, launched by ``torchrun``).

Each rank passes its own share of the calibration data (:func:`shard`).  Calibration statistics
are sums: per-channel activation moments, SparseGPT's Hessians and Taylor scores are summed over
ranks (:func:`reduce_sum`) before anything is decided from them.  So every rank decides the same
channels and masks, the ones one process decides on all the data, up to float rounding.
Statistics that are not sums are computed by one process only:
BatchNorm re-estimation, layer reconstruction, norm re-fit, sensitivity allocation and int8
ranges.  They are refused when more than one rank runs (:func:`single_process_only`), since
each rank would decide something else.

Outside a process group every function here is the single-process identity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from graphprune.errors import InputError

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, NCCL on
    GPUs); returns whether more than one process runs.  Without ``torchrun``: nothing, False."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (every ``world_size()``-th one, from ``rank()``)."""
    return list(items[rank() :: world_size()])


def split_batch(batch: Any, index: int | None = None, parts: int | None = None) -> Any:
    """This rank's slice (along dim 0) of every tensor of a global batch: ranks together see it
    whole, so the mean of their mean losses is the mean loss of the batch when slices are equal."""
    index, parts = rank() if index is None else index, world_size() if parts is None else parts
    if parts == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] % parts:
            raise InputError(
                f"a global batch of {batch.shape[0] if batch.dim() else 0} rows does not split evenly "
                f"over {parts} ranks"
            )
        return batch.chunk(parts)[index]
    if isinstance(batch, dict):
        return {k: split_batch(v, index, parts) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(split_batch(v, index, parts) for v in batch)
    return batch


def reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (all ranks must call this in the same order); a
    CPU tensor goes through the GPU where the backend (NCCL) reduces only GPU tensors."""
    if world_size() == 1:
        return
    gpu_only = dist.get_backend() == "nccl"
    for t in tensors:
        if gpu_only and t.device.type != "cuda":
            moved = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t.copy_(moved)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def reduce_mean(value: float) -> float:
    """The mean of a number over the ranks."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / world_size()


def broadcast_seed(seed: int | None) -> int:
    """``seed``, or a random one drawn on rank 0 and shared, so every rank draws the same noise."""
    if seed is not None:
        return seed
    t = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if world_size() > 1:
        dist.broadcast(t, src=0)
    return int(t)


def single_process_only(what: str) -> None:
    """Refuse ``what`` when several ranks run: its statistics are not sums (see the module doc)."""
    if world_size() > 1:
        raise InputError(
            f"{what} is computed by one process only (its statistics are not sums that can be reduced "
            f"over ranks), and {world_size()} ranks are running: run it in a single process"
        )
