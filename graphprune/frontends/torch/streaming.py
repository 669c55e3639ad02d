"""Streamed calibration: a model on ``meta`` whose weights stay in a safetensors checkpoint.

Planning a 7B-70B model must not hold it.  The model is built with its parameters on ``meta``
(:func:`parameters_on_meta` keeps buffers real: checkpoints do not store RoPE tables and the
like); analysis and structured plans need only shapes.  Criteria that read weights get them one
tensor at a time from the checkpoint (:meth:`Stream.weights`), as the plans made so far shape them.
Statistics need the forward pass, which runs block by block
(:class:`graphprune.frontends.torch.blocks.Blocks`), each block's weights read from the checkpoint
while it runs; everything else (embeddings, final norm, head) is *resident*: loaded for the whole
run.  Peak memory is about the resident weights, one block, and two sets of block
inputs for the calibration set.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from graphprune.algorithms.nm import NMPattern, satisfies
from graphprune.core.depth import original_name
from graphprune.core.plan import Plan
from graphprune.errors import InputError
from graphprune.frontends.torch.blocks import Blocks
from graphprune.frontends.torch.capture import qualified
from graphprune.io.plan_file import NMRecord, PlanFile, StoredMasks, StoredValues
from graphprune.io.tensor_store import PartWriter, TensorFiles

SPILL_BYTES = 256 << 20  # recorded masks and values held in memory before they go to disk


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build models inside this block with their parameters on ``meta`` and their buffers real
    (computed as usual): the way to build a model whose weights :func:`graphprune.core.plan` streams."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class Stream(Blocks):
    """Calibration batches run block by block over weights read from a checkpoint.

    ``plans`` is the run's list of structured plans (read, never written): weights are read as they
    shape them.  Masks and new values that passes :meth:`record` go to part files in ``scratch``
    and come back, read lazily, from :meth:`decided`.
    """

    naming_hint = ": name them with blocks='path.to.layers'"

    def __init__(
        self,
        checkpoint: TensorFiles,
        batches: list[Any],
        plans: list,
        scratch: str,
        *,
        blocks: str | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(batches, blocks=blocks)
        self.checkpoint, self.plans, self.prefix = checkpoint, plans, prefix
        self._parts = PartWriter(os.path.join(scratch, "decided"), SPILL_BYTES)
        self._patterns: dict[str, NMPattern] = {}
        self._values: list[str] = []

    # ------------------------------------------------------------------ weights
    def weight(self, name: str, like: torch.Tensor | None = None, aliases: Sequence[str] = ()) -> torch.Tensor:
        """Tensor ``name`` (or the first of its tied ``aliases`` the checkpoint holds) as the plans so
        far make it, in ``like``'s dtype (checked against its shape)."""
        if name in self._patterns:
            raise InputError(
                f"{name} is read after a pass chose its mask; a streamed run does not re-read masked "
                "weights (no pass after NMSparsity reads weights there)"
            )
        found = next((n for n in [name, *aliases] if self.stored_name(n) in self.checkpoint), None)
        if found is None:
            close = difflib.get_close_matches(self.stored_name(name), list(self.checkpoint), n=1)
            raise InputError(
                f"{self.stored_name(name)} is not in the checkpoint{f' (closest: {close[0]})' if close else ''}"
                "; a buffer the checkpoint does not hold must be real in the model (build it under "
                "graphprune.parameters_on_meta()), and names that differ by a prefix need prefix="
            )
        structured = [p for p in self.plans if isinstance(p, Plan)]
        tensor = PlanFile("", structured=structured).planned(name, self.checkpoint[self.stored_name(found)])
        if like is not None:
            if tensor.shape != like.shape:
                raise InputError(
                    f"{self.stored_name(found)} is {list(tensor.shape)} in the checkpoint (as planned so far), "
                    f"the model has {list(like.shape)}: not the checkpoint of this model"
                )
            tensor = tensor.to(like.dtype)
        return tensor

    def stored_name(self, name: str) -> str:
        """The checkpoint's name of the model's tensor ``name``: with the prefix, and numbered as before
        any block removal of the plans so far."""
        return self.prefix + original_name(self.plans, name)

    def weights(self, model: nn.Module) -> Mapping[str, torch.Tensor]:
        """Every parameter of ``model`` by name, read when asked for (what weight criteria read)."""
        return StreamedWeights(self, model)

    @contextlib.contextmanager
    def loaded(self, model: nn.Module, modules: list[tuple[str, nn.Module]]) -> Iterator[None]:
        """Real parameters and buffers in place of the ``meta`` ones of ``modules`` (each module's
        own, not its children's), put back on exit; a tied parameter is read once.  Buffers the
        checkpoint holds are read from it (the model's own are freshly initialised ones); others
        are used as they are, unless on ``meta``."""
        aliases = _aliases(model)
        swapped, real = [], {}
        try:
            for path, module in modules:
                for store in (module._parameters, module._buffers):
                    for attr, tensor in store.items():
                        stored = store is module._buffers and self.stored_name(qualified(path, attr)) in self.checkpoint
                        if tensor is None or (tensor.device.type != "meta" and not stored):
                            continue
                        if id(tensor) not in real:
                            name = qualified(path, attr)
                            value = self.weight(name, tensor, aliases.get(name, []))
                            real[id(tensor)] = (
                                nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value
                            )
                        swapped.append((store, attr, tensor))
                        store[attr] = real[id(tensor)]
            yield
        finally:
            for store, attr, tensor in reversed(swapped):
                store[attr] = tensor

    # ---------------------------------------------------------------- decisions
    def record(self, name: str, mask: torch.Tensor, pattern: NMPattern, value: torch.Tensor | None = None) -> None:
        """Keep ``name``'s N:M mask (and new value) for the plan, on disk."""
        if not satisfies(mask.to(torch.uint8), pattern):
            raise InputError(f"the mask chosen for {name} breaks its {pattern} pattern")
        self._patterns[name] = pattern
        self._parts.put(f"mask/{name}", mask.to(torch.uint8))
        if value is not None:
            self._values.append(name)
            self._parts.put(f"value/{name}", value)

    def settle(self) -> None:
        self._parts.flush()  # what the block decided goes to disk with it

    def decided(self) -> tuple[Mapping[str, NMRecord], Mapping[str, torch.Tensor]]:
        """The recorded masks and values (each read from disk when asked for)."""
        files = self._parts.close()
        return StoredMasks(files, dict(self._patterns)), StoredValues(files, list(self._values))

    # -------------------------------------------------------------------- blocks


class StreamedWeights(Mapping[str, torch.Tensor]):
    """What weight criteria get in a streamed plan: every parameter by name, read from the
    checkpoint when asked for, and the ``meta`` module itself (to run calibration through)."""

    def __init__(self, stream: Stream, module: nn.Module) -> None:
        self.stream, self.module = stream, module
        self.params = dict(module.named_parameters(remove_duplicate=False))
        self.aliases = _aliases(module)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.stream.weight(name, self.params[name], self.aliases.get(name, []))

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """For each parameter name, the other names of the same (tied) parameter."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {name: [n for n in names if n != name] for names in by_id.values() for name in names}
