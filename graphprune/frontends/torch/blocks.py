"""Calibration batches run through a model's blocks one at a time, each block on the inputs the
previous one produced (:class:`Blocks`).

The blocks are the decoder / encoder layers: the largest ``nn.ModuleList`` of modules of one
class, or the one named.  A visitor sees each part of the model before the data runs through it
(the modules before the blocks, each block, the modules after them), with a runner that runs just
that part; what it changes there (SparseGPT's new weights) is what the later parts see.  Running a
block on its recorded inputs costs one block, not one whole forward, so a visitor that reads each
layer's inputs costs about one forward over the calibration set in all instead of one per layer.

1. The batches run through the model until block 0, whose inputs are caught: the hidden state
   and every other argument (attention mask, RoPE tables).
2. Each block in turn runs on every batch's inputs; its first output becomes the next block's
   first argument.
3. Modules after the last block see its outputs through one more run of the model, in which the
   blocks hand on what they computed instead of computing.

The chain this relies on (each block's first argument is the previous block's first output; the
other arguments are the same for every block) is checked on the first batch against the model's
own forward.  :class:`graphprune.frontends.torch.streaming.Stream` runs the same sequence with the
weights of each block read from a checkpoint while it runs.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from tqdm.auto import tqdm

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from graphprune.errors import InputError
from graphprune.frontends.torch.calibration import Consumer, Runner, Watch
from graphprune.frontends.torch.capture import eval_mode, no_kv_cache, normalize_inputs

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


class _Caught(Exception):
    """Stops the forward pass at a block once its inputs are recorded."""


class Segment(Runner):
    """The batches through one part of the model (the modules before the blocks, a block, the
    modules after them), on what the earlier parts computed."""

    @abc.abstractmethod
    def split(self) -> list["Segment"]:
        """One segment per batch, in order (a fit that holds a batch out runs them one at a time)."""


class BlockInputs(Segment):
    """One block's caught inputs: running them runs only that block (what SparseGPT needs per layer)."""

    def __init__(self, block: nn.Module, inputs: list[Inputs]) -> None:
        self.block, self.inputs = block, inputs

    def drive(self, model: nn.Module, watch: Watch) -> None:
        with torch.no_grad():
            for args, kwargs in self.inputs:
                self.block(*args, **kwargs)

    def split(self) -> list[Segment]:
        return [BlockInputs(self.block, [one]) for one in self.inputs]

    def __len__(self) -> int:
        return len(self.inputs)


BEFORE, AFTER = "<before the blocks>", "<after the blocks>"  # what Stream.sequential visits besides blocks


class _Before(Segment):
    """Runs the batches through the modules before the blocks (stopping at the first block)."""

    def __init__(self, stream: "Blocks", first: nn.Module, name: str, batches: list[Any]) -> None:
        self.stream, self.first, self.name, self.batches = stream, first, name, batches

    def drive(self, model: nn.Module, watch: Watch) -> None:
        with torch.no_grad():
            for batch in self.batches:
                self.stream.catch(model, self.first, self.name, batch)

    def split(self) -> list[Segment]:
        return [_Before(self.stream, self.first, self.name, [batch]) for batch in self.batches]

    def __len__(self) -> int:
        return len(self.batches)


class _After(Segment):
    """Runs the batches through the modules after the blocks, on the last block's outputs."""

    def __init__(self, stream: "Blocks", blocks: nn.ModuleList, batches: list[Any], outputs: list[Any]) -> None:
        self.stream, self.blocks, self.batches, self.outputs = stream, blocks, batches, outputs

    def drive(self, model: nn.Module, watch: Watch) -> None:
        with torch.no_grad():
            self.stream.replay(model, self.blocks, self.batches, self.outputs, watch, set())

    def split(self) -> list[Segment]:
        return [_After(self.stream, self.blocks, [b], [o]) for b, o in zip(self.batches, self.outputs)]

    def __len__(self) -> int:
        return len(self.batches)


class Blocks(Runner):
    """Calibration batches run block by block over the model as it is in memory (``blocks``: the
    module list's path, else found)."""

    naming_hint = ""  # how a caller names the blocks where none are found (a streamed plan: blocks=)
    # the containers searched for blocks when none is named: a module list (a model's own forward
    # calls each block, so calibration can run them one at a time)
    containers: tuple[type[nn.Module], ...] = (nn.ModuleList,)

    def __init__(self, batches: list[Any], *, blocks: str | None = None) -> None:
        self.batches, self.blocks = batches, blocks

    def __len__(self) -> int:
        return len(self.batches)

    def loaded(self, model: nn.Module, modules: list[tuple[str, nn.Module]]) -> contextlib.AbstractContextManager[None]:
        """The weights of ``modules`` in place while they run (in memory they already are)."""
        return contextlib.nullcontext()

    def settle(self) -> None:
        """Called after a visitor has seen a block (a stream writes what it decided to disk)."""

    def chain_problem(self, model: nn.Module) -> str | None:
        """Why the batches cannot run block by block through ``model`` (None: they can), found on
        the first batch before anything is visited."""
        try:
            path, blocks = self.block_list(model)
            if len(blocks) < 2:
                return f"{path} holds one block"
            with no_kv_cache(model), eval_mode(model), torch.no_grad():
                first = self.catch(model, blocks[0], f"{path}.0", self.batches[0])
                out = _first(blocks[0](*first[0], **first[1]), f"{path}.0")
                self._check_chain(model, blocks, path, first, out, Watch(set()))
        except InputError as exc:
            return str(exc)
        return None

    def block_list(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """The blocks: the module list named ``blocks``, or the largest list of like modules (in one of
        :attr:`containers`)."""
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
            if path and isinstance(m, self.containers) and len(m) > 1 and len({type(c) for c in m}) == 1
        ]
        if not lists:
            raise InputError(
                f"{type(model).__name__} has no nn.ModuleList of like blocks to run block by block" + self.naming_hint
            )
        return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))

    def drive(self, model: nn.Module, watch: Watch) -> None:
        self.sequential(model, watch, None)

    def sequential(self, model: nn.Module, watch: Watch | None, visit: Callable[[str, Segment], None] | None) -> None:
        """Run the batches through ``model`` block by block.  With ``visit``, call it before anything runs on
        the data it sees: ``visit(BEFORE, runner)`` for the modules before the blocks (the runner runs
        them), ``visit(path, runner)`` for each loaded block (the runner runs the block on its
        inputs), ``visit(AFTER, runner)`` for the modules after them; it may change their weights."""
        for segment, runner in self.segments(model, watch):
            if visit is not None:
                with torch.no_grad():
                    visit(segment, runner)

    def segments(self, model: nn.Module, watch: Watch | None = None) -> Iterator[tuple[str, Segment]]:
        """:meth:`sequential` as a generator: each part with its runner, the data moving on through
        the part (as the caller left its weights) when the caller asks for the next; two models of
        one architecture (a dense one and its pruned copy) can so be walked side by side."""
        watch = watch or Watch(set())
        path, blocks = self.block_list(model)
        inside = {f"{path}.{i}" for i in range(len(blocks))}
        resident = [
            (n, m) for n, m in model.named_modules() if not any(n == b or n.startswith(b + ".") for b in inside)
        ]
        with no_kv_cache(model), eval_mode(model), self.loaded(model, resident):
            yield BEFORE, _Before(self, blocks[0], f"{path}.0", self.batches)
            with torch.no_grad():
                inputs = [self.catch(model, blocks[0], f"{path}.0", batch) for batch in self.batches]
            seen_before_blocks = set(watch.called)
            outputs: list[Any] = []
            for i, block in enumerate(tqdm(blocks, desc="blocks", unit="block", disable=None, leave=False)):
                name = f"{path}.{i}"
                with self.loaded(model, list(block.named_modules(prefix=name))):
                    yield name, BlockInputs(block, inputs)
                    self.settle()
                    with torch.no_grad():
                        outputs = [block(*args, **kwargs) for args, kwargs in inputs]
                        if i == 0 and len(blocks) > 1:
                            self._check_chain(model, blocks, path, inputs[0], _first(outputs[0], name), watch)
                inputs = [((_first(out, name), *args[1:]), kwargs) for out, (args, kwargs) in zip(outputs, inputs)]
            yield AFTER, _After(self, blocks, self.batches, outputs)
            if watch.names - watch.called:  # modules after the blocks: run them on the last block's outputs
                with torch.no_grad():
                    self.replay(model, blocks, self.batches, outputs, watch, seen_before_blocks)

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
            raise InputError(f"the model's forward never called {name}: it cannot run block by block")
        if not caught[0][0] or not isinstance(caught[0][0][0], torch.Tensor):
            raise InputError(f"{name} is called without a positional hidden-state tensor: it cannot run block by block")
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
                "and block 0's other arguments): they cannot run one at a time"
            )

    def replay(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        batches: list[Any],
        outputs: list[Any],
        watch: Watch,
        seen: set[str],
    ) -> None:
        """Run the model once more per batch with every block handing on its input (the last one:
        its recorded output), so modules after the blocks see their real inputs; what already saw
        the data is muted."""
        muted = watch.muted
        watch.muted = muted | seen
        try:
            for batch, out in zip(batches, outputs, strict=True):
                for i, block in enumerate(blocks):
                    block.forward = (
                        (lambda *a, _out=out, **k: _out)
                        if i == len(blocks) - 1
                        else (lambda *a, _out=out, **k: with_first(_out, a[0]))
                    )
                try:
                    args, kwargs = normalize_inputs(batch)
                    model(*args, **kwargs)
                finally:
                    for block in blocks:
                        del block.forward
        finally:
            watch.muted = muted


def by_segment(
    runner: Blocks, model: nn.Module, layers: list[Consumer], skipped: dict[str, str]
) -> dict[str, list[Consumer]]:
    """``layers`` (in graph order) by the part of the model :meth:`Blocks.segments` visits them in:
    before the blocks, each block, after them; a layer between blocks is put in ``skipped``, with
    the reason."""
    path, blocks = runner.block_list(model)
    names = [f"{path}.{i}" for i in range(len(blocks))]
    block_of = {layer: next((b for b in names if layer.module.startswith(b + ".")), None) for layer in layers}
    positions = [i for i, layer in enumerate(layers) if block_of[layer] is not None]
    segments: dict[str, list[Consumer]] = {}
    for i, layer in enumerate(layers):
        if block_of[layer] is not None:
            segments.setdefault(block_of[layer], []).append(layer)
        elif not positions or i < positions[0]:
            segments.setdefault(BEFORE, []).append(layer)
        elif i > positions[-1]:
            segments.setdefault(AFTER, []).append(layer)
        else:
            skipped[layer.weight] = f"between the streamed blocks of {path}: this pass runs block by block"
    return segments


def first_output(output: Any) -> Any:
    """A block's first output: the output itself, or the first of a tuple or list."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _first(output: Any, name: str) -> torch.Tensor:
    first = first_output(output)
    if not isinstance(first, torch.Tensor):
        raise InputError(
            f"{name} returns {type(output).__name__}, not a hidden-state tensor (or a tuple starting with "
            "one): it cannot run block by block"
        )
    return first


def with_first(output: Any, first: torch.Tensor) -> Any:
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
