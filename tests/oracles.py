"""Oracles shared by the tests: outputs of a model, zeroing removed channels, random plans."""

from __future__ import annotations

import copy

import onnx_ir as ir
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from graphprune.core.groups import Analysis
from graphprune.core.pipeline import MODULE, ONNX, STREAMED, Pass, PassResult, Stage
from graphprune.core.plan import Plan
from graphprune.frontends.torch.capture import normalize_inputs
from graphprune.frontends.torch.state import CompressionState


def outputs(model: nn.Module, example_inputs) -> list[torch.Tensor]:
    args, kwargs = normalize_inputs(example_inputs)
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(*args, **kwargs)
    model.train(was)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def random_plan(
    analysis: Analysis, fraction: float, seed: int = 0, exact_only: bool = False, head_dim: bool = False
) -> Plan:
    """Keep a random ``1 - fraction`` of every group (at least one channel).

    Head-dim groups are left alone unless asked for: models typically size q/k and v heads
    with one attribute, so their counts can only shrink together (ChannelPrune's default).
    """
    gen = torch.Generator().manual_seed(seed)
    plan = Plan()
    for g in analysis.groups:
        if (exact_only and g.inexact) or ("head_dim" in g.tags and not head_dim):
            continue
        keep = max(1, g.size - int(g.size * fraction))
        plan.set(analysis, g.id, torch.randperm(g.size, generator=gen)[:keep])
    return plan


def zero_removed(model: nn.Module, analysis: Analysis, plan: Plan) -> nn.Module:
    """A copy of ``model`` whose parameter slices for the channels ``plan`` removes are zero."""
    zeroed = copy.deepcopy(model)
    params = dict(zeroed.named_parameters(remove_duplicate=False))
    masks = plan.masks(analysis)
    with torch.no_grad():
        for gid in plan.keep:
            group = analysis.group(gid)
            for m in group.members:
                if m.kind != "parameter":
                    continue
                idx = analysis.spaces.leaf_index(m.atom, group.leaf)
                removed = (idx >= 0) & ~masks[group.leaf][idx.clamp(min=0)]
                params[m.name].index_fill_(m.dim, removed.nonzero().squeeze(1), 0.0)
    return zeroed


def max_relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    assert len(got) == len(want)
    worst = 0.0
    for a, b in zip(got, want):
        assert a.shape == b.shape, (a.shape, b.shape)
        if a.is_floating_point():
            scale = max(b.abs().max().item(), 1e-6)
            worst = max(worst, (a - b).abs().max().item() / scale)
        else:
            assert torch.equal(a, b)
    return worst


def zero_removed_onnx(capture, analysis: Analysis, plan: Plan):
    """:func:`zero_removed` for an ONNX capture: a re-measured copy whose parameter initializers
    are zero at every position the plan removes."""
    import numpy as np
    import onnx_ir as ir

    from graphprune.frontends.onnx.apply import copy_model
    from graphprune.frontends.onnx.capture import OnnxCapture, measure

    masks = plan.masks(analysis)
    model = copy_model(capture.model)
    for name, (kind, dims) in analysis.tensors.items():
        if kind != "parameter":
            continue
        value = model.graph.initializers[name]
        array = np.array(value.const_value.numpy(), copy=True)
        for d, atom in enumerate(dims):
            keep = analysis.spaces.keep_mask(atom, masks).numpy()
            if not keep.all():
                shape = [1] * array.ndim
                shape[d] = -1
                array = array * keep.reshape(shape).astype(array.dtype)
        value.const_value = ir.tensor(array, name=name)
    shapes, outs = measure(model, capture.feeds)
    return OnnxCapture(model=model, feeds=capture.feeds, shapes=shapes, outputs=outs)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to check later that nothing touched the model."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Same names and bit-identical values as at ``snapshot`` time (and no parametrizations added)."""
    state = model.state_dict()
    return state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())


class Explodes(Pass):
    """A pass that damages the working model and then fails (the non-destructive oracle's probe)."""

    accepts = frozenset(Stage)
    modes = frozenset({MODULE, STREAMED, ONNX})

    def call(self, state: CompressionState) -> PassResult:
        if state.mode != ONNX:
            with torch.no_grad():
                for p in state.model.parameters():
                    p.zero_()
            raise RuntimeError("injected failure")
        for initializer in state.capture.model.graph.initializers.values():
            initializer.const_value = ir.tensor(0 * initializer.const_value.numpy())
        raise RuntimeError("injected failure")
