"""Depth pruning on a torch model: which blocks of its block list are residual, their removal, and
the bypass a removal is verified against.

A block is removable when, in its own captured graph, its first output is reached from its first
input through residual adds alone (``out = stream + branch``): removing it is then the identity on
the stream, what the rest of the model computes without the branch.  A post-norm block
(``out = norm(stream + branch)``, BERT) is removable too and said to be: bypassing it also skips a
normalization of a stream that the block before already normalized.  Anything else on the way
(a scale, an activation, a change of shape) keeps the block, with the reason.

Removing blocks renumbers what holds a block's position: an integer attribute that equals the
block's index in every block (Hugging Face's ``layer_idx``, found by that property, not by name),
and a Hugging Face config's ``num_hidden_layers`` and per-layer lists (``layer_types``).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from graphprune.core.depth import BlockRemoval
from graphprune.core.report import UNCHANGED, max_relative_error
from graphprune.errors import GraphpruneError, InputError, PostconditionError
from graphprune.frontends.torch.blocks import BlockInputs, Blocks, Inputs, first_output, with_first
from graphprune.frontends.torch.capture import capture_call, eval_mode, no_kv_cache, normalize_inputs

aten = torch.ops.aten

# How an op carries the stream through a block: the registry of the residual check.
RESIDUAL, NORMALIZES, CARRIES = "residual add", "normalizes", "carries"
STREAM_OPS: dict[Any, str] = {
    aten.add: RESIDUAL,
    aten.layer_norm: NORMALIZES,
    aten.native_layer_norm: NORMALIZES,
    aten.rms_norm: NORMALIZES,
    aten.group_norm: NORMALIZES,
    aten.native_group_norm: NORMALIZES,
    aten.clone: CARRIES,
    aten.contiguous: CARRIES,
    aten.alias: CARRIES,
    aten.detach: CARRIES,
    aten.dropout: CARRIES,  # eval mode: the identity
    aten._to_copy: CARRIES,
    aten.to: CARRIES,
}
PRE_NORM, POST_NORM = "residual", "post-norm residual (bypassing it also skips a normalization of the stream)"


@dataclass
class BlockSurvey:
    """The blocks of a model: the list's path, and each block's kind (removable) or reason (kept)."""

    path: str
    count: int
    removable: dict[int, str]  # position -> PRE_NORM or POST_NORM
    kept: dict[int, str]  # position -> why it cannot be removed

    def name(self, position: int) -> str:
        return f"{self.path}.{position}"


class _BlockLists(Blocks):
    """Block lists as depth pruning finds them: also ``nn.Sequential`` (timm's ``blocks``), whose
    members are a chain by construction."""

    containers = (nn.ModuleList, nn.Sequential)


def survey(model: nn.Module, example: Any, blocks: str | None = None, runner: Blocks | None = None) -> BlockSurvey:
    """The block list of ``model`` (``blocks``: its path, else the largest list of like modules) and
    which of its blocks are residual, each read from its own graph captured on the inputs it gets
    when ``model`` runs ``example``.  Refused where the blocks do not form a chain of the stream.
    With ``runner`` (a streamed plan's), the blocks are its own and each is captured on the inputs
    the runner's batches give it, with its weights loaded from the checkpoint."""
    if runner is not None:
        path, container = runner.block_list(model)
        kinds = [
            _kind(segment.block, segment.inputs[0])
            for _, segment in runner.segments(model)
            if isinstance(segment, BlockInputs)
        ]
    else:
        path, container = _BlockLists([example], blocks=blocks).block_list(model)
        kinds = [
            _kind(block, caught) for block, caught in zip(container, block_inputs(model, path, container, example))
        ]
    removable = {i: kind for i, kind in enumerate(kinds) if kind in (PRE_NORM, POST_NORM)}
    kept = {i: kind for i, kind in enumerate(kinds) if i not in removable}
    return BlockSurvey(path=path, count=len(container), removable=removable, kept=kept)


def _kind(block: nn.Module, inputs: Inputs) -> str:
    """:func:`residual_kind`, or why the block could not be captured alone."""
    try:
        return residual_kind(block, inputs)
    except GraphpruneError as exc:
        return f"cannot capture it alone ({str(exc).splitlines()[0]})"


def block_inputs(model: nn.Module, path: str, container: nn.Module, example: Any) -> list[Inputs]:
    """The arguments each block of ``container`` is called with when ``model`` runs ``example``,
    checked to be a chain: each block's first argument is the first output of the block before (the
    other arguments may differ, e.g. an attention mask per layer type)."""
    caught: dict[int, Inputs] = {}
    results: dict[int, Any] = {}
    handles = []
    for i, block in enumerate(container):
        handles.append(
            block.register_forward_pre_hook(
                lambda _m, args, kwargs, i=i: caught.setdefault(i, (args, kwargs)), with_kwargs=True
            )
        )
        handles.append(block.register_forward_hook(lambda _m, _a, out, i=i: results.setdefault(i, out)))
    args, kwargs = normalize_inputs(example)
    try:
        with no_kv_cache(model), eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(len(container)) if i not in caught]
    if missing:
        raise InputError(f"the model's forward never calls {path}.{missing[0]}: BlockPrune needs every block used")
    for i in range(len(container)):
        args, _ = caught[i]
        if not args or not isinstance(args[0], torch.Tensor):
            raise InputError(f"{path}.{i} is called without a positional stream tensor: BlockPrune cannot bypass it")
        if i and not _same(first_output(results[i - 1]), args[0]):
            raise InputError(
                f"the blocks of {path} do not form a chain ({path}.{i} is not called with the first output of "
                f"{path}.{i - 1}): BlockPrune removes blocks of a chain only"
            )
    return [caught[i] for i in range(len(container))]


def _same(before: Any, now: torch.Tensor) -> bool:
    """The previous block's output is this block's input: the same tensor, or (with values) an equal one."""
    if before is now:
        return True
    return (
        isinstance(before, torch.Tensor)
        and before.shape == now.shape
        and "meta" not in (before.device.type, now.device.type)
        and torch.equal(before, now)
    )


def residual_kind(block: nn.Module, inputs: Inputs) -> str:
    """PRE_NORM or POST_NORM when the block's first output is its first input plus branches (through
    normalizations for POST_NORM), else why not."""
    args, kwargs = inputs
    captured = capture_call(block, args, kwargs)
    stream, out = captured.user_inputs[0], captured.outputs[0]
    if tuple(stream.meta["val"].shape) != tuple(out.meta["val"].shape):
        return f"it changes the stream's shape ({list(stream.meta['val'].shape)} to {list(out.meta['val'].shape)})"
    seen: dict[fx.Node, str | None] = {}

    def route(node: fx.Node) -> str | None:
        """How ``node`` is reached from the stream through stream ops: PRE_NORM, POST_NORM or None."""
        if node is stream:
            return PRE_NORM
        if node in seen:
            return seen[node]
        seen[node] = None  # a cycle cannot occur in a graph; this also stops re-entry
        found = None
        if node.op == "call_function" and node.target is operator.getitem:  # native_layer_norm's output 0
            source = node.args[0]
            if node.args[1] == 0 and isinstance(source, fx.Node) and _role(source) == NORMALIZES:
                found = route(source)
        elif node.op == "call_function":
            role, tensors = _role(node), [a for a in node.args if isinstance(a, fx.Node)]
            if role == RESIDUAL and len(tensors) == 2 and node.kwargs.get("alpha", 1) == 1:
                routes = [route(a) for a in tensors]
                on_stream = [r for r in routes if r is not None]
                found = on_stream[0] if len(on_stream) == 1 else None
            elif role == NORMALIZES and tensors:
                found = POST_NORM if route(tensors[0]) is not None else None
            elif role == CARRIES and tensors:
                found = route(tensors[0])
        seen[node] = found
        return found

    kind = route(out)
    if kind is not None:
        return kind
    last = out.target if out.op == "call_function" else out.op
    return (
        f"its output ({last}) is not its input plus a residual branch: no path from the input to the output "
        "runs through residual adds (and normalizations) alone"
    )


def _role(node: fx.Node) -> str | None:
    target = node.target
    packet = getattr(target, "overloadpacket", target)
    return STREAM_OPS.get(packet)


@contextlib.contextmanager
def bypassed(container: nn.Module, positions: Sequence[int]) -> Iterator[None]:
    """While open, the blocks at ``positions`` hand on their first input as their first output (the
    rest of their output as computed): the model without those blocks, as the oracle sees it."""
    own = {i: vars(container[i]).get("forward") for i in positions}  # an instance's own forward, if any
    for i in positions:
        block = container[i]
        block.forward = (lambda call: lambda *a, **k: with_first(call(*a, **k), a[0]))(block.forward)
    try:
        yield
    finally:
        for i in positions:
            if own[i] is None:
                del container[i].forward
            else:
                container[i].forward = own[i]


@dataclass
class Removed:
    """What :func:`remove_blocks` changed: a line per renumbering, and how to put it all back."""

    notes: list[str]
    undo: Callable[[], None]


def remove_blocks(model: nn.Module, removal: BlockRemoval) -> Removed:
    """Remove ``removal``'s blocks from ``model`` in place, renumbering what holds a block's position."""
    container = model.get_submodule(removal.blocks)
    if len(container) != removal.count:
        raise InputError(
            f"the removal is of blocks of a {removal.count}-block list, {removal.blocks} holds {len(container)}"
        )
    indexed = index_attributes(container)
    kept = [container[i] for i in removal.kept]
    owner, _, attr = removal.blocks.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    replacement = nn.ModuleList(kept) if isinstance(container, nn.ModuleList) else nn.Sequential(*kept)
    setattr(parent, attr, replacement)
    notes = []
    for module_path, name in indexed:
        for j, block in enumerate(kept):
            setattr(block.get_submodule(module_path) if module_path else block, name, j)
        notes.append(f"{(module_path + '.' if module_path else '')}{name} renumbered in every block")
    config = getattr(model, "config", None)
    before = dict(vars(config)) if config is not None and hasattr(config, "num_hidden_layers") else None
    notes += renumber_config(model, removal)

    def undo() -> None:
        setattr(parent, attr, container)
        for module_path, name in indexed:
            for i, block in enumerate(container):
                setattr(block.get_submodule(module_path) if module_path else block, name, i)
        if before is not None:
            vars(config).update(before)

    return Removed(notes, undo)


def remove_checked(model: nn.Module, removal: BlockRemoval, args: tuple, kwargs: dict) -> list[str]:
    """:func:`remove_blocks`, verified: on ``args``/``kwargs`` the model computes what it computed with
    those blocks bypassed, else it is put back and :class:`PostconditionError` raised."""
    container = model.get_submodule(removal.blocks)
    with bypassed(container, removal.removed):
        expected = _outputs(model, args, kwargs)
    removed = remove_blocks(model, removal)
    try:
        error = max_relative_error(_outputs(model, args, kwargs), expected)
    except BaseException:
        removed.undo()
        raise
    if error > UNCHANGED:
        removed.undo()
        raise PostconditionError(
            f"removing blocks {list(removal.removed)} of {removal.blocks} changed the outputs by {error:.3g} "
            "against the model with those blocks bypassed: something outside the blocks reads them"
        )
    return removed.notes


def index_attributes(container: nn.Module) -> list[tuple[str, str]]:
    """(module path inside a block, attribute) of each integer attribute equal to the block's own
    position in every block of ``container``."""
    per_block = []
    for i, block in enumerate(container):
        per_block.append(
            {
                (path, name)
                for path, module in block.named_modules()
                for name, value in vars(module).items()
                if type(value) is int and value == i
            }
        )
    return sorted(set.intersection(*per_block)) if len(per_block) > 1 else []


def renumber_config(model: nn.Module, removal: BlockRemoval) -> list[str]:
    """A Hugging Face config on ``model`` (``model.config``) whose layer count is the list's: the new
    count, and its per-layer lists without the removed entries; returns what changed."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) != removal.count:
        return []
    config.num_hidden_layers = len(removal.kept)
    notes = [f"config.num_hidden_layers {removal.count} -> {len(removal.kept)}"]
    for key, value in per_layer_lists(vars(config), removal.count).items():
        setattr(config, key, type(value)(value[i] for i in removal.kept))
        notes.append(f"config.{key}: the removed blocks' entries dropped")
    return notes


def per_layer_lists(config: dict[str, Any], count: int) -> dict[str, list | tuple]:
    """The entries of a config that hold one value per layer: lists of ``count`` entries."""
    return {k: v for k, v in config.items() if isinstance(v, (list, tuple)) and len(v) == count and count > 1}


# Importance of each block from calibration data: higher means keep.
def stream_change(model: nn.Module, container: nn.Module, batches: list[Any], gone: Sequence[int] = ()) -> list[float]:
    """Minitron's block importance: the mean over tokens of one minus the cosine between each block's
    input and output stream (a block that hardly turns the stream matters least), with the blocks at
    ``gone`` bypassed."""
    totals = torch.zeros(len(container), dtype=torch.float64)
    counts = torch.zeros(len(container), dtype=torch.float64)

    def hook(i: int) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            turned, tokens = _turn(args[0], first_output(output))
            totals[i] += turned
            counts[i] += tokens

        return record

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(container)]
    try:
        with bypassed(container, gone):
            _run(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return (totals / counts.clamp(min=1)).tolist()


def _turn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The sum over tokens of one minus the cosine between a block's input and output streams, and
    the number of tokens."""
    x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    return (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum(), x.shape[0]


def stream_change_by_block(runner: Blocks, model: nn.Module, gone: Sequence[int] = ()) -> list[float]:
    """:func:`stream_change` with the batches run block by block by ``runner`` (a streamed plan's,
    whose weights are read from the checkpoint one block at a time)."""
    _, container = runner.block_list(model)
    totals = torch.zeros(len(container), dtype=torch.float64)
    counts = torch.zeros(len(container), dtype=torch.float64)
    with bypassed(container, gone):
        for name, segment in runner.segments(model):
            if not isinstance(segment, BlockInputs):
                continue
            i = int(name.rsplit(".", 1)[1])
            with torch.no_grad():
                for args, kwargs in segment.inputs:
                    turned, tokens = _turn(args[0], first_output(segment.block(*args, **kwargs)))
                    totals[i] += turned
                    counts[i] += tokens
    return (totals / counts.clamp(min=1)).tolist()


def output_change(
    model: nn.Module, container: nn.Module, batches: list[Any], positions: Sequence[int], gone: Sequence[int] = ()
) -> list[float]:
    """For each block at ``positions``, the relative squared change of the model's outputs on the
    batches (against the model as it is) when that block and those at ``gone`` are bypassed."""
    calls = [normalize_inputs(batch) for batch in batches]
    reference = [_outputs(model, *call) for call in calls]
    scores = []
    for i in positions:
        with bypassed(container, [*gone, i]):
            change = norm = 0.0
            for call, dense in zip(calls, reference):
                for a, b in zip(_outputs(model, *call), dense, strict=True):
                    change += float((a.double() - b.double()).square().sum())
                    norm += float(b.double().square().sum())
        scores.append(change / max(norm, 1e-30))
    return scores


def loss_without(
    model: nn.Module,
    container: nn.Module,
    loss: Callable[[nn.Module], float],
    positions: Sequence[int],
    gone: Sequence[int] = (),
) -> list[float]:
    """For each block at ``positions``, ``loss(model)`` with that block and those at ``gone`` bypassed."""
    scores = []
    for i in positions:
        with bypassed(container, [*gone, i]), eval_mode(model), torch.no_grad():
            value = loss(model)
        try:
            scores.append(float(value))
        except (TypeError, ValueError):
            raise InputError(f"BlockPrune importance: the callable returned {type(value).__name__}, not a number")
    return scores


def _run(model: nn.Module, batches: list[Any]) -> None:
    for batch in batches:
        _outputs(model, *normalize_inputs(batch))


def _outputs(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The model's floating outputs on ``args`` and ``kwargs``."""
    with no_kv_cache(model), eval_mode(model), torch.no_grad():
        out = model(*args, **kwargs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
