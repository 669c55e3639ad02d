"""The value oracle of verification: the pruned model computes what the dense model computes once
the removed channels are zero.

Structure checks (:func:`graphprune.frontends.torch.apply._compare_graphs`) prove that every node has the op,
wiring, arguments and shape the plan predicts; they cannot see a node whose arguments are right
but whose *values* depend on a size (``torch.arange(n)`` regenerated at the smaller ``n`` instead
of keeping the kept positions).  This check can.  It runs the original graph once with the dense
tensors whose removed positions are zeroed, and the pruned graph once, keeping every node's value,
and compares each aligned pair: the dense value at the kept positions must equal the pruned value
within float tolerance.  The first node where they part is named with the groups its dims belong
to.

Where a mismatch is expected, the node and everything computed from it are not compared:
- a node that reads a pruned channel of an *inexact* group (a norm or mean over channels: removing
  even a zero channel changes it);
Both runs start from the same random seed, so random draws (whose created dims are frozen) agree.
Models on ``meta`` have no values and are not checked by value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from graphprune.core.groups import Analysis
from graphprune.core.values import Site
from graphprune.frontends.torch.capture import CapturedGraph, tensor_at
from graphprune.frontends.torch.provenance import owner_chain


def zeroed_dense(dense: dict[str, tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]]) -> dict[str, torch.Tensor]:
    """Copies of the dense tensors (name -> (tensor, [(dim, removed positions)])) whose removed
    positions are zero (floating point tensors only: integer buffers are indices or counters)."""
    out = {}
    for name, (tensor, removed) in dense.items():
        zeroed = tensor.detach()
        if zeroed.is_floating_point():
            zeroed = zeroed.clone()
            for d, idx in removed:
                zeroed.index_fill_(d, idx.to(zeroed.device), 0)
        out[name] = zeroed
    return out


def node_values(
    captured: CapturedGraph, model: nn.Module, replaced: Mapping[str, torch.Tensor] | None = None
) -> dict[fx.Node, Any]:
    """Every top-level node's value when ``captured``'s graph runs on its example inputs with the
    tensors of ``model`` (those named in ``replaced`` replaced), or the program's own constants."""

    def tensor(kind: str, name: str) -> torch.Tensor:
        if replaced is not None and name in replaced:
            return replaced[name]
        return captured.program.constants[name] if kind == "code_constant" else tensor_at(model, name)

    gm = captured.graph_module
    user = iter(x for x in pytree.tree_leaves((captured.args, captured.kwargs)) if isinstance(x, torch.Tensor))
    inputs = [
        tensor(*captured.tensor_names[n.name]) if n.name in captured.tensor_names else next(user)
        for n in gm.graph.nodes
        if n.op == "placeholder"
    ]
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n] = super().run_node(n)
            return values[n]

    devices = sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)  # the same draws in the dense and the pruned run
        Recorder(gm).run(*inputs)
    return values


def graph_sites(
    analysis: Analysis, dense: dict[fx.Node, Any], pruned: dict[fx.Node, Any], twin: dict[fx.Node, fx.Node]
) -> dict[fx.Node, Site]:
    """The sites of a torch capture: each original node with its aligned pruned node (``twin``)."""
    sites = {}
    for old, new in twin.items():
        dims = analysis.context.raw(old)
        flat = isinstance(dims, list) and all(isinstance(a, int) for a in dims)
        want, got = dense.get(old), pruned.get(new)
        sites[old] = Site(
            where=f"node {old.name} ({old.target}) in {(owner_chain(old) or [''])[-1] or 'the model'}",
            inputs=tuple(old.all_input_nodes),
            dims=dims if flat else None,
            dense=want if isinstance(want, torch.Tensor) else None,
            pruned=got if isinstance(got, torch.Tensor) else None,
            compared=old.op == "call_function",
            skipped=any(twin.get(a) is new for a in old.all_input_nodes),
        )
    return sites


__all__ = ["graph_sites", "node_values", "zeroed_dense"]
