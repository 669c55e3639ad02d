"""The value oracle's comparison, for any frontend: pruned values equal the kept part of dense ones.

A :class:`Site` pairs a value of the dense graph, computed with the removed channels zeroed,
with the same value in the pruned graph.  Where only pruned channels were removed, the pruned
value equals the dense value restricted to the kept positions; :func:`compare` checks every
site and names the first that differs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch

from graphprune.core.algebra import Spaces
from graphprune.core.groups import Analysis
from graphprune.errors import ApplyError


class ValuesDiffer(ApplyError):
    """The pruned model's values part from the dense model's with the removed channels zeroed."""


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
        read = {
            leaf
            for s in (site, *(sites[a] for a in site.inputs if a in sites))
            for a in s.dims or ()
            for leaf in spaces.leaves(a)
        }
        if read & pruned_inexact:
            tainted.add(key)
            continue
        parted = sorted(
            {
                group_of[leaf].id
                for a in dims
                for leaf in spaces.leaves(a)
                if leaf in masks and leaf in group_of and not bool(masks[leaf].all())
            }
        )
        difference = (
            "shape " + str(list(got.shape)) + " instead of " + str(list(expected.shape))
            if expected.shape != got.shape
            else f"max difference {(got.double() - expected.double()).abs().max().item():.3g} "
            f"(values up to {expected.double().abs().max().item():.3g})"
        )
        groups = f"its dims belong to pruned group(s) {parted}" if parted else "its dims belong to no pruned group"
        raise ValuesDiffer(
            f"{site.where}: the pruned model computes other values than the dense model with the "
            f"removed channels zeroed ({difference}); {groups}. Its code computes something from a "
            "size that pruning changed in a way graphprune did not follow (e.g. values that depend on "
            "the position, regenerated at the smaller size instead of sliced): keep those channels "
            "with ignore=, and please report the model"
        )
    return compared


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
