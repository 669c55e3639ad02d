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

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from graphprune.core.algebra import Spaces
from graphprune.frontends.torch.analysis import Analysis
from graphprune.frontends.torch.capture import CapturedGraph, tensor_at
from graphprune.errors import ApplyError
from graphprune.frontends.torch.provenance import owner_chain


class ValuesDiffer(ApplyError):
    """The pruned model's values part from the dense model's with the removed channels zeroed."""


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


def node_values(captured: CapturedGraph, model: nn.Module, replaced: Mapping[str, torch.Tensor] | None = None
                ) -> dict[fx.Node, Any]:
    """Every top-level node's value when ``captured``'s graph runs on its example inputs with the
    tensors of ``model`` (those named in ``replaced`` replaced), or the program's own constants."""
    def tensor(kind: str, name: str) -> torch.Tensor:
        if replaced is not None and name in replaced:
            return replaced[name]
        return captured.program.constants[name] if kind == "code_constant" else tensor_at(model, name)

    gm = captured.graph_module
    user = iter(x for x in pytree.tree_leaves((captured.args, captured.kwargs)) if isinstance(x, torch.Tensor))
    inputs = [tensor(*captured.tensor_names[n.name]) if n.name in captured.tensor_names else next(user)
              for n in gm.graph.nodes if n.op == "placeholder"]
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


@dataclass(frozen=True)
class Site:
    """One value as both runs computed it: what the comparison needs, whatever the frontend."""

    where: str  # named in the error ("node arange (aten.arange.default) in blocks.0")
    inputs: tuple[Hashable, ...]  # the sites it is computed from
    dims: list[int] | None  # its atoms, one per dim; None where the analysis has none
    dense: torch.Tensor | None  # the dense model's value (removed channels zeroed); None: not a tensor
    pruned: torch.Tensor | None
    compared: bool = True  # an op's result (inputs and weights are not compared)
    skipped: bool = False  # a re-layout the pruned model left out: compared at its source


def compare(sites: Mapping[Hashable, Site], analysis: Analysis, masks: dict[int, torch.Tensor]) -> int:
    """Compare every site (in topological order) by value; raise :class:`ValuesDiffer` at the
    first that parts.  Returns the number of sites compared."""
    spaces = analysis.spaces
    pruned_inexact = {leaf for leaf in spaces.inexact if leaf in masks and not bool(masks[leaf].all())}
    group_of = {g.leaf: g for g in analysis.groups}
    tainted: set[Hashable] = set()
    compared = 0
    for key, site in sites.items():
        if any(a in tainted for a in site.inputs):
            tainted.add(key)
            continue
        dims, want, got = site.dims, site.dense, site.pruned
        if not site.compared or site.skipped or want is None or got is None or dims is None or len(dims) != want.dim():
            continue
        expected = _kept(want, spaces, dims, masks)
        if expected.is_floating_point() and not bool(torch.isfinite(expected).all()):
            tainted.add(key)  # an Inf/NaN that zeroing made (x / a zeroed scale): no model computes it
            continue
        compared += 1
        if expected.shape == got.shape and _close(got, expected):
            continue
        read = {leaf for s in (site, *(sites[a] for a in site.inputs if a in sites)) for a in s.dims or ()
                for leaf in spaces.leaves(a)}
        if read & pruned_inexact:
            tainted.add(key)
            continue
        parted = sorted({group_of[leaf].id for a in dims for leaf in spaces.leaves(a) if leaf in masks
                         and leaf in group_of and not bool(masks[leaf].all())})
        difference = ("shape " + str(list(got.shape)) + " instead of " + str(list(expected.shape))
                      if expected.shape != got.shape else
                      f"max difference {(got.double() - expected.double()).abs().max().item():.3g} "
                      f"(values up to {expected.double().abs().max().item():.3g})")
        groups = f"its dims belong to pruned group(s) {parted}" if parted else "its dims belong to no pruned group"
        raise ValuesDiffer(f"{site.where}: the pruned model computes other values than the dense model with the "
                           f"removed channels zeroed ({difference}); {groups}. Its code computes something from a "
                           "size that pruning changed in a way graphprune did not follow (e.g. values that depend on "
                           "the position, regenerated at the smaller size instead of sliced): keep those channels "
                           "with ignore=, and please report the model")
    return compared


def graph_sites(analysis: Analysis, dense: dict[fx.Node, Any], pruned: dict[fx.Node, Any],
                twin: dict[fx.Node, fx.Node]) -> dict[fx.Node, Site]:
    """The sites of a torch capture: each original node with its aligned pruned node (``twin``)."""
    sites = {}
    for old, new in twin.items():
        dims = analysis.context.raw(old)
        flat = isinstance(dims, list) and all(isinstance(a, int) for a in dims)
        want, got = dense.get(old), pruned.get(new)
        sites[old] = Site(where=f"node {old.name} ({old.target}) in {(owner_chain(old) or [''])[-1] or 'the model'}",
                          inputs=tuple(old.all_input_nodes), dims=dims if flat else None,
                          dense=want if isinstance(want, torch.Tensor) else None,
                          pruned=got if isinstance(got, torch.Tensor) else None,
                          compared=old.op == "call_function",
                          skipped=any(twin.get(a) is new for a in old.all_input_nodes))
    return sites


def _kept(value: torch.Tensor, spaces: Spaces, dims: list[int], masks: dict[int, torch.Tensor]) -> torch.Tensor:
    for d, atom in enumerate(dims):
        if any(leaf in masks for leaf in spaces.leaves(atom)):
            keep = spaces.keep_mask(atom, masks)
            if not bool(keep.all()):
                value = value.index_select(d, keep.nonzero().squeeze(1).to(value.device))
    return value


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    if not want.is_floating_point() and not want.is_complex():
        return torch.equal(got, want)
    if got.numel() == 0:
        return True
    tolerance = max(1e-4, 16 * torch.finfo(want.dtype).eps)
    a, b = got.double(), want.double()
    return bool(((a - b).abs() <= tolerance * (b.abs().max().item() + 1e-6)).all())


__all__ = ["Site", "ValuesDiffer", "compare", "graph_sites", "node_values", "zeroed_dense"]
