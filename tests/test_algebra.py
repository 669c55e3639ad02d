"""The channel-space solver on its own: unification, refinement, freezing, index maps."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.core.algebra import CAT, PROD, FreezeReason, SpaceSolver, _common_radix


def test_unify_merges_and_checks_sizes():
    s = SpaceSolver()
    a, b, c = s.new(4), s.new(4), s.new(5)
    s.unify(a, b)
    assert s.find(a) == s.find(b)
    s.unify(a, c)  # different sizes cannot be the same channels: both sides frozen
    spaces = s.finalize()
    assert s.find(a) in spaces.frozen and s.find(c) in spaces.frozen


def test_product_refines_a_leaf_and_keeps_masks_consistent():
    s = SpaceSolver()
    hidden = s.new(12)
    heads, head_dim = s.factors(hidden, [3, 4])
    assert s.definition(hidden).kind == PROD
    spaces = s.finalize()
    keep = {s.find(heads): torch.tensor([True, False, True])}
    mask = spaces.keep_mask(hidden, keep)
    assert mask.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert spaces.kept_size(hidden, keep) == 8
    assert spaces.leaf_index(hidden, s.find(heads)).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert spaces.cofactor(hidden, s.find(heads)) == 4


def test_concat_parts_and_slices_of_a_product_split_the_outer_factor():
    s = SpaceSolver()
    x = s.new(12)
    outer, inner = s.factors(x, [3, 4])
    first, rest = s.parts(x, [4, 8])  # cut at a multiple of the inner size: split heads
    assert s.size(first) == 4 and s.size(rest) == 8
    assert s.definition(outer).kind == CAT
    spaces = s.finalize()
    assert s.find(x) not in spaces.frozen


def test_misaligned_slice_of_a_product_freezes():
    s = SpaceSolver()
    x = s.new(12)
    s.factors(x, [3, 4])
    s.parts(x, [6, 6])  # 6 is not a multiple of 4
    spaces = s.finalize()
    assert all(leaf in spaces.frozen for leaf in spaces.leaves(x))


def test_rope_style_halves_couple_channel_i_with_i_plus_half():
    s = SpaceSolver()
    d = s.new(8)
    lo, hi = s.parts(d, [4, 4])
    rotated = s.concat([hi, lo])
    s.unify(d, rotated)  # x + rotate_half(x)
    spaces = s.finalize()
    leaves = spaces.leaves(d)
    assert len(set(leaves)) == 1  # one 4-channel space appearing twice
    keep = {leaves[0]: torch.tensor([True, False, True, True])}
    assert spaces.keep_mask(d, keep).tolist() == [True, False, True, True] * 2


def test_freeze_reaches_leaves_refined_later():
    s = SpaceSolver()
    x = s.new(6)
    s.freeze(x, FreezeReason("test"))
    a, b = s.factors(x, [2, 3])
    spaces = s.finalize()
    assert s.find(a) in spaces.frozen and s.find(b) in spaces.frozen


@given(
    st.lists(st.sampled_from([2, 3, 4, 6]), min_size=1, max_size=3),
    st.lists(st.sampled_from([2, 3, 4, 6]), min_size=1, max_size=3),
)
def test_common_radix_refines_both_or_is_none(left, right):
    from math import prod

    if prod(left) != prod(right):
        return
    common = _common_radix(left, right)
    if common is None:
        return
    assert prod(common) == prod(left)

    def groups(coarse, fine):
        i, out = 0, True
        for c in coarse:
            acc = 1
            while acc < c:
                acc *= fine[i]
                i += 1
            out &= acc == c
        return out

    assert groups(left, common) and groups(right, common)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.data())
def test_keep_mask_of_a_product_matches_brute_force(sizes, data):
    from itertools import product as cartesian

    s = SpaceSolver()
    x = s.new(int(torch.tensor(sizes).prod()))
    factors = s.factors(x, sizes)
    spaces = s.finalize()
    keep = {}
    for f, n in zip(factors, sizes):
        if n > 1:
            keep[s.find(f)] = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    mask = spaces.keep_mask(x, keep)
    expected = [
        all(keep[s.find(f)][i] if n > 1 else True for f, n, i in zip(factors, sizes, idx))
        for idx in cartesian(*[range(n) for n in sizes])
    ]
    assert mask.tolist() == expected
