"""Streamed calibration: a model on ``meta`` whose weights stay in a safetensors checkpoint.

Planning a 7B-70B model must not hold it.  The model is built with its parameters on ``meta``
(:func:`parameters_on_meta` keeps buffers real: checkpoints do not store RoPE tables and the
like); analysis and structured plans need only shapes.  Criteria that read weights get them one
tensor at a time from the checkpoint (:meth:`Stream.weights`), as the plans made so far shape them.
Statistics need the forward pass, which :class:`Stream` runs *block by block*.  The blocks are the
decoder / encoder layers: the largest ``nn.ModuleList`` of modules of one class, or the one
named.  Everything else (embeddings, final norm, head) is *resident*: loaded for the whole run.

1. The batches run through the model until block 0, whose inputs are caught: the hidden state
   and every other argument (attention mask, RoPE tables).
2. Each block in turn is loaded from the checkpoint and runs on every batch's inputs.  Its first
   output becomes the next block's first argument, and its weights are released.
3. Modules after the last block see its outputs through one more run of the model, in which the
   blocks hand on what they computed instead of computing.

Peak memory is about the resident weights, one block, and two sets of block inputs for the
calibration set.  The chain this relies on (each block's first argument is the previous block's
first output; the other arguments are the same for every block) is checked on the first batch
against the model's own forward.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from graphprune.algorithms.nm import NMPattern, satisfies
from graphprune.core.plan import Plan
from graphprune.errors import InputError
from graphprune.frontends.torch.calibration import Runner, Watch
from graphprune.frontends.torch.capture import eval_mode, no_kv_cache, normalize_inputs, qualified
from graphprune.io.plan_file import NMRecord, PlanFile, StoredMasks, StoredValues
from graphprune.io.tensor_store import PartWriter, TensorFiles

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
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


class _Caught(Exception):
    """Stops the forward pass at a block once its inputs are recorded."""


class BlockInputs(Runner):
    """One block's caught inputs: running them runs only that block (what SparseGPT needs per layer)."""

    def __init__(self, block: nn.Module, inputs: list[Inputs]) -> None:
        self.block, self.inputs = block, inputs

    def drive(self, model: nn.Module, watch: Watch) -> None:
        for args, kwargs in self.inputs:
            self.block(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.inputs)


BEFORE, AFTER = "<before the blocks>", "<after the blocks>"  # what Stream.sequential visits besides blocks


class _Before(Runner):
    """Runs the batches through the modules before the blocks (stopping at the first block)."""

    def __init__(self, stream: "Stream", first: nn.Module, name: str) -> None:
        self.stream, self.first, self.name = stream, first, name

    def drive(self, model: nn.Module, watch: Watch) -> None:
        for batch in self.stream.batches:
            self.stream.catch(model, self.first, self.name, batch)

    def __len__(self) -> int:
        return len(self.stream.batches)


class _After(Runner):
    """Runs the batches through the modules after the blocks, on the last block's outputs."""

    def __init__(self, stream: "Stream", blocks: nn.ModuleList, outputs: list[Any]) -> None:
        self.stream, self.blocks, self.outputs = stream, blocks, outputs

    def drive(self, model: nn.Module, watch: Watch) -> None:
        self.stream.replay(model, self.blocks, self.outputs, watch, set())

    def __len__(self) -> int:
        return len(self.stream.batches)


class Stream(Runner):
    """Calibration batches run block by block over weights read from a checkpoint.

    ``plans`` is the run's list of structured plans (read, never written): weights are read as they
    shape them.  Masks and new values that passes :meth:`record` go to part files in ``scratch``
    and come back, read lazily, from :meth:`decided`.
    """

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
        self.checkpoint, self.batches, self.plans = checkpoint, batches, plans
        self.blocks, self.prefix = blocks, prefix
        self._parts = PartWriter(os.path.join(scratch, "decided"), SPILL_BYTES)
        self._patterns: dict[str, NMPattern] = {}
        self._values: list[str] = []

    def __len__(self) -> int:
        return len(self.batches)

    # ------------------------------------------------------------------ weights
    def weight(self, name: str, like: torch.Tensor | None = None, aliases: Sequence[str] = ()) -> torch.Tensor:
        """Tensor ``name`` (or the first of its tied ``aliases`` the checkpoint holds) as the plans so
        far make it, in ``like``'s dtype (checked against its shape)."""
        if name in self._patterns:
            raise InputError(
                f"{name} is read after a pass chose its mask; a streamed run does not re-read masked "
                "weights (no pass after NMSparsity reads weights there)"
            )
        found = next((n for n in [name, *aliases] if self.prefix + n in self.checkpoint), None)
        if found is None:
            close = difflib.get_close_matches(self.prefix + name, list(self.checkpoint), n=1)
            raise InputError(
                f"{self.prefix + name} is not in the checkpoint{f' (closest: {close[0]})' if close else ''}"
                "; a buffer the checkpoint does not hold must be real in the model (build it under "
                "graphprune.parameters_on_meta()), and names that differ by a prefix need prefix="
            )
        structured = [p for p in self.plans if isinstance(p, Plan)]
        tensor = PlanFile("", structured=structured).planned(name, self.checkpoint[self.prefix + found])
        if like is not None:
            if tensor.shape != like.shape:
                raise InputError(
                    f"{self.prefix + found} is {list(tensor.shape)} in the checkpoint (as planned so far), "
                    f"the model has {list(like.shape)}: not the checkpoint of this model"
                )
            tensor = tensor.to(like.dtype)
        return tensor

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
                        stored = store is module._buffers and self.prefix + qualified(path, attr) in self.checkpoint
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

    def decided(self) -> tuple[Mapping[str, NMRecord], Mapping[str, torch.Tensor]]:
        """The recorded masks and values (each read from disk when asked for)."""
        files = self._parts.close()
        return StoredMasks(files, dict(self._patterns)), StoredValues(files, list(self._values))

    # -------------------------------------------------------------------- blocks
    def block_list(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """The blocks: the module list named ``blocks``, or the largest list of like modules."""
        if self.blocks is not None:
            try:
                found = model.get_submodule(self.blocks)
            except AttributeError:
                raise InputError(f"blocks={self.blocks!r}: {type(model).__name__} has no such module") from None
            if not isinstance(found, (nn.ModuleList, nn.Sequential)) or not len(found):
                raise InputError(f"blocks={self.blocks!r} is a {type(found).__name__}, not a non-empty ModuleList")
            return self.blocks, found
        lists = [
            (path, m)
            for path, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1
        ]
        if not lists:
            raise InputError(
                f"{type(model).__name__} has no nn.ModuleList of like blocks to stream through: "
                "name them with blocks='path.to.layers'"
            )
        return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))

    def drive(self, model: nn.Module, watch: Watch) -> None:
        self.sequential(model, watch, None)

    def sequential(self, model: nn.Module, watch: Watch | None, visit: Callable[[str, Runner], None] | None) -> None:
        """Stream the batches through ``model``.  With ``visit``, call it before anything runs on
        the data it sees: ``visit(BEFORE, runner)`` for the modules before the blocks (the runner runs
        them), ``visit(path, runner)`` for each loaded block (the runner runs the block on its
        inputs), ``visit(AFTER, runner)`` for the modules after them; it may change their weights."""
        watch = watch or Watch(set())
        path, blocks = self.block_list(model)
        inside = {f"{path}.{i}" for i in range(len(blocks))}
        resident = [
            (n, m) for n, m in model.named_modules() if not any(n == b or n.startswith(b + ".") for b in inside)
        ]
        with no_kv_cache(model), eval_mode(model), torch.no_grad(), self.loaded(model, resident):
            if visit is not None:
                visit(BEFORE, _Before(self, blocks[0], f"{path}.0"))
            inputs = [self.catch(model, blocks[0], f"{path}.0", batch) for batch in self.batches]
            seen_before_blocks = set(watch.called)
            outputs: list[Any] = []
            for i, block in enumerate(tqdm(blocks, desc="blocks", unit="block", disable=None, leave=False)):
                name = f"{path}.{i}"
                with self.loaded(model, list(block.named_modules(prefix=name))):
                    if visit is not None:
                        visit(name, BlockInputs(block, inputs))
                        self._parts.flush()  # what the block decided goes to disk with it
                    outputs = [block(*args, **kwargs) for args, kwargs in inputs]
                    if i == 0 and len(blocks) > 1:
                        self._check_chain(model, blocks, path, inputs[0], _first(outputs[0], name), watch)
                inputs = [((_first(out, name), *args[1:]), kwargs) for out, (args, kwargs) in zip(outputs, inputs)]
            if visit is not None:
                visit(AFTER, _After(self, blocks, outputs))
            if watch.names - watch.called:  # modules after the blocks: run them on the last block's outputs
                self.replay(model, blocks, outputs, watch, seen_before_blocks)

    def catch(self, model: nn.Module, block: nn.Module, name: str, batch: Any) -> Inputs:
        """Run ``batch`` through ``model`` up to ``block`` (named ``name``); its arguments."""
        caught: list[Inputs] = []

        def hook(_module, args, kwargs):
            caught.append((args, kwargs))
            raise _Caught

        handle = block.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
        try:
            args, kwargs = normalize_inputs(batch)
            model(*args, **kwargs)
        except _Caught:
            pass
        finally:
            handle.remove()
        if not caught:
            raise InputError(f"the model's forward never called {name}: it cannot be streamed block by block")
        if not caught[0][0] or not isinstance(caught[0][0][0], torch.Tensor):
            raise InputError(
                f"{name} is called without a positional hidden-state tensor: it cannot be streamed block by block"
            )
        return caught[0]

    def _check_chain(
        self, model: nn.Module, blocks: nn.ModuleList, path: str, first: Inputs, out: torch.Tensor, watch: Watch
    ) -> None:
        """The model's own forward hands block 1 what the stream will: block 0's output and the same
        other arguments (on the first batch, block 0 loaded, statistics muted)."""
        muted = watch.muted
        watch.muted = set(watch.names)
        try:
            args, kwargs = self.catch(model, blocks[1], f"{path}.1", self.batches[0])
        finally:
            watch.muted = muted
        same = (
            len(args) == len(first[0])
            and torch.allclose(args[0], out, rtol=1e-5, atol=1e-6)
            and _same_leaves((args[1:], kwargs), (first[0][1:], first[1]))
        )
        if not same:
            raise InputError(
                f"the blocks of {path} do not form a chain (block 1 is not called with block 0's output "
                "and block 0's other arguments): they cannot be streamed one at a time"
            )

    def replay(self, model: nn.Module, blocks: nn.ModuleList, outputs: list[Any], watch: Watch, seen: set[str]) -> None:
        """Run the model once more per batch with every block handing on its input (the last one:
        its recorded output), so modules after the blocks see their real inputs; what already saw
        the data is muted."""
        muted = watch.muted
        watch.muted = muted | seen
        try:
            for batch, out in zip(self.batches, outputs):
                for i, block in enumerate(blocks):
                    block.forward = (
                        (lambda *a, _out=out, **k: _out)
                        if i == len(blocks) - 1
                        else (lambda *a, _out=out, **k: _with_first(_out, a[0]))
                    )
                try:
                    args, kwargs = normalize_inputs(batch)
                    model(*args, **kwargs)
                finally:
                    for block in blocks:
                        del block.forward
        finally:
            watch.muted = muted


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


def _first(output: Any, name: str) -> torch.Tensor:
    first = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(first, torch.Tensor):
        raise InputError(
            f"{name} returns {type(output).__name__}, not a hidden-state tensor (or a tuple starting with "
            "one): it cannot be streamed block by block"
        )
    return first


def _with_first(output: Any, first: torch.Tensor) -> Any:
    return (
        (first, *output[1:])
        if isinstance(output, tuple)
        else [first, *output[1:]]
        if isinstance(output, list)
        else first
    )


def _same_leaves(a: Any, b: Any) -> bool:
    left, right = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(left) == len(right) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else type(x) is type(y)
        for x, y in zip(left, right)
    )
