"""Channel spaces: the algebra that says which channels must be pruned together.

Every dimension of every tensor in a captured graph is an *atom* of the solver.  Op rules
state facts about atoms:

* ``unify(a, b)``: the two dims index the same channels (elementwise ops, linear in/out ...);
* ``product([a, b])``: a dim is the row-major product of others (reshape to heads, flatten);
* ``concat([a, b])``: a dim is the concatenation of others (cat / split / slice).

Union-find merges equal atoms; an atom that is a product or a concatenation carries a
*definition* listing its children.  When two structures meet (a head dim reshaped by one
op and sliced by another) the solver refines atoms until both descriptions agree, or, where
no common refinement exists, *freezes* everything involved and records why.  The leaves
that remain unfrozen are the independently prunable channel spaces.

Definitions are well-founded: every child is strictly smaller than its parent (size-1
factors and empty parts are dropped), so unification (which only merges atoms of equal
size) can never create a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from math import prod

import torch

PROD = "prod"
CAT = "cat"
_NEUTRAL = {PROD: 1, CAT: 0}  # the size of a factor / part that adds nothing


@dataclass(frozen=True)
class Definition:
    """How a composite atom is built from its children (row-major product or concatenation)."""

    kind: str  # PROD or CAT
    children: tuple[int, ...]


@dataclass(frozen=True)
class FreezeReason:
    """Why a space may not be pruned: the op or fact responsible, and where; ``interface``: it is
    kept whole because it reaches a model input or output (the caller's contract, not a limit)."""

    why: str
    where: str = ""
    interface: bool = False

    def __str__(self) -> str:
        return f"{self.why} ({self.where})" if self.where else self.why


class SpaceSolver:
    """Union-find over dimension atoms with product/concat definitions and refinement."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._definition: list[Definition | None] = []
        self._freeze_requests: list[tuple[int, FreezeReason]] = []
        self._inexact_requests: list[tuple[int, str]] = []
        self._tag_requests: list[tuple[int, str]] = []

    # ------------------------------------------------------------------ basics
    def new(self, size: int) -> int:
        """A fresh, unconstrained atom of ``size`` channels."""
        self._parent.append(len(self._parent))
        self._size.append(int(size))
        self._definition.append(None)
        return len(self._parent) - 1

    def find(self, atom: int) -> int:
        parent = self._parent
        root = atom
        while parent[root] != root:
            root = parent[root]
        while parent[atom] != root:
            parent[atom], atom = root, parent[atom]
        return root

    def size(self, atom: int) -> int:
        return self._size[atom]

    def definition(self, atom: int) -> Definition | None:
        return self._definition[self.find(atom)]

    @property
    def atom_count(self) -> int:
        return len(self._parent)

    # ------------------------------------------------------------ constraints
    def freeze(self, atom: int, reason: FreezeReason) -> None:
        """Forbid pruning of every leaf under ``atom`` (resolved in :meth:`finalize`)."""
        self._freeze_requests.append((atom, reason))

    def mark_inexact(self, atom: int, why: str) -> None:
        """Channels of ``atom`` enter a reduction (mean, norm, softmax ...): removing even an
        all-zero channel changes the result, so pruning is allowed but not exact."""
        self._inexact_requests.append((atom, why))

    def tag(self, atom: int, tag: str) -> None:
        """Attach a role (``"heads"``, ``"head_dim"``) that passes may use to select spaces."""
        self._tag_requests.append((atom, tag))

    def unify(self, a: int, b: int, where: str = "") -> None:
        """State that dims ``a`` and ``b`` index the same channels in the same order."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            self._conflict((ra, rb), f"sizes {self._size[ra]} and {self._size[rb]} cannot be the same channels", where)
            return
        da, db = self._definition[ra], self._definition[rb]
        if da is None:
            self._parent[ra] = rb
            return
        if db is None:
            self._parent[rb] = ra
            return
        # Both composite: align their structures.
        if da.kind == db.kind:
            left, right = self._flatten(ra, da.kind), self._flatten(rb, db.kind)
        else:
            self._conflict((ra, rb), "a product of channels meets a concatenation with no common refinement", where)
            return
        aligned = self._align(left, right, da.kind, where)
        self._parent[ra] = rb
        if aligned is None:
            self._conflict((rb,), f"incompatible {da.kind} structures", where)
            return
        for x, y in zip(*aligned):
            self.unify(x, y, where)

    def product(self, atoms: list[int]) -> int:
        """An atom that is the row-major product of ``atoms`` (size-1 factors dropped)."""
        return self._compose(PROD, atoms)

    def concat(self, atoms: list[int]) -> int:
        """An atom that is the concatenation of ``atoms`` (empty parts dropped)."""
        return self._compose(CAT, atoms)

    def factors(self, atom: int, sizes: list[int], where: str = "") -> list[int]:
        """Atoms ``f`` with ``atom == product(f)`` and ``size(f[i]) == sizes[i]``, refining as needed."""
        assert prod(sizes) == self._size[atom], (sizes, self._size[atom])
        return self._decompose(PROD, atom, sizes, where)

    def parts(self, atom: int, sizes: list[int], where: str = "") -> list[int]:
        """Atoms ``p`` with ``atom == concat(p)`` and ``size(p[i]) == sizes[i]``, refining as needed."""
        assert sum(sizes) == self._size[atom], (sizes, self._size[atom])
        return self._decompose(CAT, atom, sizes, where)

    def _compose(self, kind: str, atoms: list[int]) -> int:
        neutral = _NEUTRAL[kind]
        children = tuple(a for a in atoms if self._size[a] != neutral)
        if not children:
            return self.new(neutral)
        if len(children) == 1:
            return children[0]
        sizes = [self._size[a] for a in children]
        atom = self.new(prod(sizes) if kind == PROD else sum(sizes))
        self._definition[atom] = Definition(kind, children)
        return atom

    def _decompose(self, kind: str, atom: int, sizes: list[int], where: str) -> list[int]:
        neutral = _NEUTRAL[kind]
        split = self._factors if kind == PROD else self._parts
        it = iter(split(atom, [s for s in sizes if s != neutral], where))
        return [self.new(neutral) if s == neutral else next(it) for s in sizes]

    # --------------------------------------------------------------- internals
    def _conflict(self, atoms: tuple[int, ...], why: str, where: str) -> None:
        for atom in atoms:
            self.freeze(atom, FreezeReason(why, where))

    def _flatten(self, root: int, kind: str) -> list[int]:
        """Children of ``root``, expanding children that are themselves of the same ``kind``."""
        out: list[int] = []
        stack = [root]
        while stack:
            r = self.find(stack.pop())
            d = self._definition[r]
            if d is not None and d.kind == kind:
                stack.extend(reversed(d.children))
            else:
                out.append(r)
        return out

    def _align(self, left: list[int], right: list[int], kind: str, where: str) -> tuple[list[int], list[int]] | None:
        sizes_l = [self._size[a] for a in left]
        sizes_r = [self._size[a] for a in right]
        if sizes_l == sizes_r:
            return left, right
        if kind == CAT:
            bounds = sorted(set(accumulate(sizes_l)) | set(accumulate(sizes_r)))
            pieces = [b - a for a, b in zip([0] + bounds[:-1], bounds)]
            total = self.concat(left)
            other = self.concat(right)
            return self._parts(total, pieces, where), self._parts(other, pieces, where)
        common = _common_radix(sizes_l, sizes_r)
        if common is None:
            return None
        return self._factors(self.product(left), common, where), self._factors(self.product(right), common, where)

    def _refine_trivially(self, kind: str, atom: int, sizes: list[int]) -> tuple[int, list[int] | None]:
        """The cases that need no alignment: nothing to split, or a leaf that simply gets children."""
        root = self.find(atom)
        if len(sizes) <= 1:
            return root, [root] if sizes else []
        if self._definition[root] is None:
            children = tuple(self.new(s) for s in sizes)
            self._definition[root] = Definition(kind, children)
            return root, list(children)
        return root, None

    def _defined(self, root: int) -> Definition:
        """The definition of a root that :meth:`_refine_trivially` did not refine (so it has one)."""
        definition = self._definition[root]
        if definition is None:
            raise AssertionError(f"atom {root} has no definition")
        return definition

    def _factors(self, atom: int, sizes: list[int], where: str) -> list[int]:
        root, done = self._refine_trivially(PROD, atom, sizes)
        if done is not None:
            return done
        if self._defined(root).kind == CAT:
            return self._fresh_frozen(root, sizes, "a concatenated space is reshaped into a product", where)
        pending = self._flatten(root, PROD)
        out: list[int] = []
        for want in sizes:
            taken: list[int] = []
            have = 1
            while have < want:
                if not pending:
                    return self._fresh_frozen(root, sizes, "reshape does not align with the existing factors", where)
                head = pending.pop(0)
                hs = self._size[head]
                if have * hs <= want and want % (have * hs) == 0:
                    taken.append(head)
                    have *= hs
                elif hs % (want // have) == 0 and self._definition[self.find(head)] is None:
                    first, rest = self._factors(head, [want // have, hs // (want // have)], where)
                    taken.append(first)
                    pending.insert(0, rest)
                    have = want
                else:
                    return self._fresh_frozen(root, sizes, "reshape does not align with the existing factors", where)
            out.append(self.product(taken))
        return out

    def _parts(self, atom: int, sizes: list[int], where: str) -> list[int]:
        root, done = self._refine_trivially(CAT, atom, sizes)
        if done is not None:
            return done
        if self._defined(root).kind == PROD:
            outer, *inner = self._flatten(root, PROD)
            inner_size = prod(self._size[a] for a in inner)
            if any(s % inner_size for s in sizes):
                return self._fresh_frozen(root, sizes, "a slice cuts through the inner factor of a product", where)
            outer_parts = self._parts(outer, [s // inner_size for s in sizes], where)
            return [self.product([p, *inner]) for p in outer_parts]
        pending = self._flatten(root, CAT)
        out: list[int] = []
        for want in sizes:
            taken: list[int] = []
            have = 0
            while have < want:
                head = pending.pop(0)
                hs = self._size[head]
                if have + hs <= want:
                    taken.append(head)
                    have += hs
                else:
                    first, rest = self._parts(head, [want - have, hs - (want - have)], where)
                    taken.append(first)
                    pending.insert(0, rest)
                    have = want
            out.append(self.concat(taken))
        return out

    def _fresh_frozen(self, root: int, sizes: list[int], why: str, where: str) -> list[int]:
        fresh = [self.new(s) for s in sizes]
        for atom in (root, *fresh):
            self.freeze(atom, FreezeReason(why, where))
        return fresh

    # ------------------------------------------------------------- resolution
    def leaves(self, atom: int) -> list[int]:
        """The leaf atoms (unrefined roots) that ``atom`` is built from, in order, with repeats."""
        out: list[int] = []
        stack = [atom]
        while stack:
            r = self.find(stack.pop())
            d = self._definition[r]
            if d is None:
                out.append(r)
            else:
                stack.extend(reversed(d.children))
        return out

    def finalize(self) -> "Spaces":
        """Resolve freeze, inexact and tag requests onto leaves."""
        frozen: dict[int, FreezeReason] = {}
        for atom, reason in self._freeze_requests:
            for leaf in self.leaves(atom):
                frozen.setdefault(leaf, reason)
        inexact: dict[int, str] = {}
        for atom, why in self._inexact_requests:
            for leaf in self.leaves(atom):
                inexact.setdefault(leaf, why)
        tags: dict[int, set[str]] = {}
        for atom, tag in self._tag_requests:
            for leaf in self.leaves(atom):
                tags.setdefault(leaf, set()).add(tag)
        # A leaf repeated inside one product cannot be indexed consistently.
        for root in range(len(self._parent)):
            d = self._definition[root]
            if self._parent[root] == root and d is not None and d.kind == PROD:
                seen: set[int] = set()
                for child in d.children:
                    child_leaves = set(self.leaves(child))
                    for leaf in child_leaves & seen:
                        frozen.setdefault(leaf, FreezeReason("the same channels appear twice in one product"))
                    seen |= child_leaves
        return Spaces(self, frozen, inexact, tags)


class Spaces:
    """The solved channel spaces: leaf atoms, which are frozen and why, and index maps."""

    def __init__(
        self, solver: SpaceSolver, frozen: dict[int, FreezeReason], inexact: dict[int, str], tags: dict[int, set[str]]
    ) -> None:
        self.solver = solver
        self.frozen = frozen
        self.inexact = inexact
        self.tags = tags

    def leaves(self, atom: int) -> list[int]:
        return self.solver.leaves(atom)

    def _fold(self, atom: int, at_leaf, join, outer):
        """Evaluate a definition tree: leaves by ``at_leaf``, concatenations by ``join``, products
        row-major by ``outer`` applied pairwise from the outermost factor."""
        root = self.solver.find(atom)
        d = self.solver._definition[root]
        if d is None:
            return at_leaf(root)
        values = [self._fold(c, at_leaf, join, outer) for c in d.children]
        if d.kind == CAT:
            return join(values)
        out = values[0]
        for v in values[1:]:
            out = outer(out, v)
        return out

    def keep_mask(self, atom: int, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        """Bool mask over the channels of ``atom`` given a bool keep-mask per leaf (absent = keep all)."""
        size = self.solver.size
        return self._fold(
            atom,
            lambda leaf: keep[leaf] if leaf in keep else torch.ones(size(leaf), dtype=torch.bool, device="cpu"),
            torch.cat,
            lambda a, b: (a[:, None] & b[None, :]).reshape(-1),
        )

    def kept_size(self, atom: int, keep: dict[int, torch.Tensor]) -> int:
        """Channels of ``atom`` that remain."""
        size = self.solver.size
        return self._fold(
            atom, lambda leaf: int(keep[leaf].sum()) if leaf in keep else size(leaf), sum, lambda a, b: a * b
        )

    def gather_index(self, atom: int, order: dict[int, torch.Tensor]) -> torch.Tensor:
        """Positions of ``atom`` to gather so that each leaf in ``order`` appears permuted by its
        index tensor (``new[leaf i] = old[leaf order[i]]``); other leaves keep their order."""
        size = self.solver.size

        def at_leaf(leaf: int) -> torch.Tensor:
            return order[leaf] if leaf in order else torch.arange(size(leaf), device="cpu")

        def join(parts: list[torch.Tensor]) -> torch.Tensor:
            offsets, out = 0, []
            for p in parts:
                out.append(p + offsets)
                offsets += p.numel()
            return torch.cat(out)

        return self._fold(atom, at_leaf, join, lambda a, b: (a[:, None] * b.numel() + b[None, :]).reshape(-1))

    def leaf_index(self, atom: int, leaf: int) -> torch.Tensor:
        """For each channel of ``atom``, the index of the ``leaf`` channel it belongs to (-1: none)."""
        size = self.solver.size
        return self._fold(
            atom,
            lambda x: torch.arange(size(x), device="cpu") if x == leaf else torch.full((size(x),), -1, device="cpu"),
            torch.cat,
            lambda a, b: torch.maximum(a[:, None], b[None, :]).reshape(-1),
        )

    def cofactor(self, atom: int, leaf: int) -> int | None:
        """``size(atom) / size(leaf)`` when ``atom`` is a pure product containing ``leaf`` once, else None."""
        s = self.solver
        root = s.find(atom)
        if root == leaf:
            return 1
        d = s._definition[root]
        if d is None or d.kind == CAT:
            return None
        found = [c for c in d.children if leaf in s.leaves(c)]
        if len(found) != 1:
            return None
        inner = self.cofactor(found[0], leaf)
        return None if inner is None else inner * (s.size(root) // s.size(found[0]))


def _common_radix(left: list[int], right: list[int]) -> list[int] | None:
    """The coarsest factor list that refines both row-major factorizations, if one exists.

    A factorization is described by its strides from the inner end; a common refinement exists
    when the union of both stride sets forms a divisibility chain.
    """

    def strides(sizes: list[int]) -> set[int]:
        out, acc = set(), 1
        for s in reversed(sizes):
            acc *= s
            out.add(acc)
        return out

    chain = sorted(strides(left) | strides(right) | {1})
    for a, b in zip(chain, chain[1:]):
        if b % a:
            return None
    return [b // a for a, b in reversed(list(zip(chain, chain[1:])))]
