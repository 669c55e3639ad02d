"""N:M sparse training and learned N:M masks in the user's own loop.

Start from a model with N:M masks (``gp.prune(..., passes=[NMSparsity(...)])``), wrap it, train as
usual, call :meth:`SparseTraining.step` after each optimizer step, and :meth:`SparseTraining.finalize`
at the end::

    trainer = SparseTraining(result.module, recipe="sr-ste")
    for batch in loader:
        loss(result.module, batch).backward(); opt.step(); opt.zero_grad(); trainer.step()
    model = trainer.finalize()          # plain N:M masks again, patterns checked

Recipes (each recomputes every mask from ``|W|`` every ``every`` steps):

- ``"sr-ste"`` (Zhou et al., ICLR 2021): the forward uses ``W * M``; the gradient reaches every weight
  (straight through), plus ``decay * (1 - M) * W`` on the pruned ones, which pulls them towards zero so
  masks settle instead of flipping back and forth.
- ``"mask-decay"`` (progressive gradient-flow decay, after Bambhaniya et al., 2024): the forward uses
  ``W * (M + beta (1 - M))`` with ``beta`` falling linearly from 1 to 0 over ``decay_steps``: pruned
  weights fade out instead of vanishing at once, and keep receiving gradient while they do.
- ``"fixed"``: masks kept as they are (plain masked fine-tuning); ``every`` is ignored.

``schedule`` (dense-to-sparse): ``[(step, n), ...]`` with ascending steps; from each step on, masks
keep ``n`` of every ``m`` (m as in the model's masks), e.g. ``[(0, 3), (200, 2), (400, 1)]`` for 1:4.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from graphprune.algorithms.nm import NMPattern, from_matrix, nm_mask, to_matrix
from graphprune.errors import InputError
from graphprune.frontends.torch.capture import qualified
from graphprune.frontends.torch.distributed import broadcast_seed, reduce_mean, world_size
from graphprune.frontends.torch.masks import NMMask, check_patterns

RECIPES = ("sr-ste", "mask-decay", "fixed")


class _RefinedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * (1 - mask) * weight, None, None


class TrainingMask(nn.Module):
    """The parametrization an :class:`~graphprune.algorithms.nm.NMMask` becomes while training."""

    def __init__(self, mask: torch.Tensor, pattern: NMPattern, recipe: str, decay: float) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.pattern, self.recipe, self.decay, self.beta = pattern, recipe, decay, 1.0

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.recipe == "sr-ste":
            return _RefinedSTE.apply(original, self.mask, self.decay)
        if self.recipe == "mask-decay":
            return original * (self.mask + self.beta * (1 - self.mask))
        return original * self.mask


class SparseTraining:
    """Drive N:M masks through training with one of :data:`RECIPES` (see the module doc)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        recipe: str = "sr-ste",
        decay: float = 2e-4,
        every: int = 1,
        decay_steps: int = 1000,
        schedule: Sequence[tuple[int, int]] = (),
    ) -> None:
        if recipe not in RECIPES:
            raise InputError(f"recipe must be one of {list(RECIPES)}, got {recipe!r}")
        if every < 1 or decay_steps < 1 or decay < 0:
            raise InputError(f"need every >= 1, decay_steps >= 1 and decay >= 0; got {every}, {decay_steps}, {decay}")
        self.masks: list[tuple[nn.Module, str, TrainingMask]] = []
        for module in model.modules():
            if not parametrize.is_parametrized(module):
                continue
            for name, plist in module.parametrizations.items():
                for i, p in enumerate(plist):
                    if isinstance(p, NMMask):
                        plist[i] = TrainingMask(p.mask, p.pattern, recipe, decay)
                        self.masks.append((module, name, plist[i]))
        if not self.masks:
            raise InputError("the model has no N:M masks: run NMSparsity on it first")
        m = self.masks[0][2].pattern.m
        steps = [s for s, _ in schedule]
        if steps != sorted(steps) or any(not 0 < n < m for _, n in schedule):
            raise InputError(f"schedule must be (step, n) pairs with ascending steps and 0 < n < {m}")
        self.model, self.recipe, self.every, self.decay_steps = model, recipe, every, decay_steps
        self.schedule = list(schedule)
        self.steps = 0
        if self.schedule:
            self._recompute(self._n())

    def _n(self) -> int | None:
        due = [n for step, n in self.schedule if step <= self.steps]
        return due[-1] if due else None

    def step(self) -> None:
        """Call after each optimizer step: advances the schedules and recomputes masks when due."""
        self.steps += 1
        for _, _, mask in self.masks:
            mask.beta = max(0.0, 1.0 - self.steps / self.decay_steps)
        if self.recipe != "fixed" and self.steps % self.every == 0:
            self._recompute(self._n())

    def _recompute(self, n: int | None) -> None:
        with torch.no_grad():
            for module, name, mask in self.masks:
                if n is not None:
                    mask.pattern = NMPattern(n, mask.pattern.m, mask.pattern.layout)
                original = module.parametrizations[name].original
                mask.mask.copy_(nm_mask(original.abs(), mask.pattern).to(mask.mask.dtype))

    def finalize(self) -> nn.Module:
        """Plain :class:`NMMask` parametrizations again (masked entries zeroed), patterns checked."""
        for module, name, mask in self.masks:
            plist = module.parametrizations[name]
            index = next(i for i, p in enumerate(plist) if p is mask)
            with torch.no_grad():
                plist.original.mul_(mask.mask)
            plist[index] = NMMask(mask.mask, mask.pattern)
        check_patterns(self.model, "SparseTraining.finalize")
        self.masks = []
        return self.model


def candidate_masks(n: int, m: int) -> torch.Tensor:
    """Every way to keep ``n`` of ``m``: ``[C(m, n), m]`` of 0/1 (shared by all groups of a pattern)."""
    return torch.tensor([[1.0 if i in kept else 0.0 for i in range(m)] for kept in itertools.combinations(range(m), n)])


class LearnableNMMask(nn.Module):
    """Parametrization: a categorical choice among the candidate masks of every group of ``m``
    weights, relaxed by Gumbel-softmax while training and the most likely candidate in eval mode.
    Only the logits learn; the weights underneath stay as they are."""

    def __init__(self, prior: torch.Tensor, pattern: NMPattern, shape: torch.Size, prior_strength: float) -> None:
        super().__init__()
        self.pattern, self.shape = pattern, shape
        self.register_buffer("candidates", candidate_masks(pattern.n, pattern.m))  # [K, m]
        matrix = to_matrix(prior.float(), pattern.layout)
        self.matrix_shape = matrix.shape  # [rows, reduction] in the hardware order
        groups = matrix.reshape(-1, pattern.m)  # [G, m]
        # the prior's candidate gets the highest logit: similarity = kept positions shared with it
        self.logits = nn.Parameter(prior_strength * (groups @ self.candidates.T) / pattern.n)  # [G, K]
        self.temperature, self.scale = 1.0, 1.0
        self.generator: torch.Generator | None = None  # the Gumbel noise's source (None: the global RNG)

    def expected(self) -> torch.Tensor:
        """The mask's expectation under the current logits, scale and temperature (no Gumbel noise),
        in the weight's layout: differentiable in the logits."""
        probabilities = torch.softmax(self.logits * self.scale / self.temperature, dim=-1)
        groups = probabilities @ self.candidates
        return from_matrix(groups.reshape(self.matrix_shape), self.pattern.layout, self.shape)

    def hard(self) -> torch.Tensor:
        """The most likely candidate of every group, in the weight's layout."""
        groups = self.candidates[self.logits.argmax(-1)]
        return from_matrix(groups.reshape(self.matrix_shape), self.pattern.layout, self.shape)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return original * self.hard().to(original.dtype)
        uniform = (
            torch.rand(self.logits.shape, generator=self.generator, device=self.generator.device).to(self.logits.device)
            if self.generator is not None
            else torch.rand_like(self.logits)
        )
        gumbel = -torch.log(-torch.log(uniform.clamp_(1e-9, 1 - 1e-9)))
        soft = torch.softmax((self.logits * self.scale + gumbel) / self.temperature, dim=-1)  # [G, K]
        groups = soft @ self.candidates  # [G, m]: a soft mask with n expected kept per group
        soft_mask = from_matrix(groups.reshape(self.matrix_shape), self.pattern.layout, self.shape)
        return original * soft_mask.to(original.dtype)


class LearnedMasks:
    """Learn the N:M masks of a model whose weights stay frozen (MaskLLM, Fang et al. 2024).

    Start from ``NMSparsity(n, m, method="learned", prior=...)`` (masks from the prior, dense weights
    kept underneath).  Optimise :meth:`parameters` (the mask logits) with any optimizer and loss, e.g.
    distillation from the dense model; call :meth:`step` after each optimizer step (temperature falls
    from ``temperature[0]`` to ``[1]`` and the logit scale rises from ``scale[0]`` to ``[1]``,
    geometrically over ``steps``, which is required: the steps your loop makes, so that the schedule
    ends with it); :meth:`finalize` keeps the most likely candidates as plain masks, and warns when
    it comes before the schedule's end (the masks were still soft).

    ``weight_regularization=λ`` makes :meth:`regularization` return ``-λ`` times the share of the
    weights' squared magnitude the expected masks keep, averaged over the masked weights so that
    λ does not grow with depth (MaskLLM's sparse weight regularisation):
    added to the loss, it pulls masks that flip towards keeping large weights instead of drifting
    to whatever fits the few calibration batches.  With little data, report a held-out score to
    :meth:`observe` every so often; :meth:`finalize` then keeps the masks of the best score seen,
    not the last ones (on MiniLM, 200 steps on 64 sentences ended worse than 40 did).

    Across processes (wrap the model in ``DistributedDataParallel`` after this, each rank on its
    slice of every global batch): the Gumbel noise comes from one generator seeded with ``seed``
    (or a seed rank 0 draws and shares), so every rank samples the same masks; DDP averages the
    logits' gradients; :meth:`observe` averages the score over ranks.  The ranks keep identical
    logits and end with the masks one process gets on the whole batches (``python -m
    graphprune.train learn-masks`` runs this under ``torchrun``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int | None = None,
        temperature: tuple[float, float] = (4.0, 0.05),
        scale: tuple[float, float] = (1.0, 10.0),
        prior_strength: float = 3.0,
        weight_regularization: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if steps is None:
            raise InputError(
                "LearnedMasks needs steps=: the number of optimizer steps your loop will make (the temperature "
                "and logit-scale schedules run over them, and must end when your loop does)"
            )
        if steps < 1 or min(temperature) <= 0 or min(scale) <= 0:
            raise InputError("LearnedMasks needs steps >= 1 and positive temperatures and scales")
        if weight_regularization < 0:
            raise InputError(f"weight_regularization must be >= 0, got {weight_regularization}")
        self.masks: list[tuple[nn.Module, str, LearnableNMMask]] = []
        self.names: list[str] = []  # the masked weights' names, aligned with ``masks``
        self.frozen: list[tuple[torch.Tensor, bool]] = []
        for path, module in model.named_modules():
            if not parametrize.is_parametrized(module):
                continue
            for name, plist in module.parametrizations.items():
                for i, p in enumerate(plist):
                    if isinstance(p, NMMask):
                        learnable = LearnableNMMask(p.mask, p.pattern, plist.original.shape, prior_strength)
                        plist[i] = learnable.to(plist.original.device)
                        self.masks.append((module, name, plist[i]))
                        self.names.append(qualified(path, name))
        if not self.masks:
            raise InputError("the model has no N:M masks: run NMSparsity(method='learned') on it first")
        if seed is not None or world_size() > 1:
            device = self.masks[0][2].logits.device
            generator = torch.Generator(device=device).manual_seed(broadcast_seed(seed))
            for _, _, mask in self.masks:
                mask.generator = generator
        for p in model.parameters():  # the weights stay as they are; only the logits learn
            if not any(p is m.logits for _, _, m in self.masks):
                self.frozen.append((p, p.requires_grad))
                p.requires_grad_(False)
        self.model, self.total, self.temperature, self.scale = model, steps, temperature, scale
        self.weight_regularization = weight_regularization
        self.steps = 0
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (score, step, logits)
        self._schedule()

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, _, mask in self.masks:
            yield mask.logits

    def logits(self) -> dict[str, torch.Tensor]:
        """The mask logits by weight name: save them to start another copy of the model (a new
        domain, say) from these masks instead of a one-shot prior (:meth:`load_logits`)."""
        return {name: mask.logits.detach().clone() for name, (_, _, mask) in zip(self.names, self.masks, strict=True)}

    def load_logits(self, logits: dict[str, torch.Tensor]) -> None:
        """Start from saved logits; every masked weight needs its entry, with the same shape."""
        missing = [n for n in self.names if n not in logits]
        if missing:
            raise InputError(f"no saved logits for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        with torch.no_grad():
            for name, (_, _, mask) in zip(self.names, self.masks, strict=True):
                if logits[name].shape != mask.logits.shape:
                    raise InputError(
                        f"saved logits for {name} have shape {tuple(logits[name].shape)}, this model's "
                        f"{tuple(mask.logits.shape)}: not the same architecture or pattern"
                    )
                mask.logits.copy_(logits[name])

    def _schedule(self) -> None:
        t = min(self.steps / self.total, 1.0)
        for _, _, mask in self.masks:
            mask.temperature = self.temperature[0] * (self.temperature[1] / self.temperature[0]) ** t
            mask.scale = self.scale[0] * (self.scale[1] / self.scale[0]) ** t

    def step(self) -> None:
        self.steps += 1
        self._schedule()

    def regularization(self) -> torch.Tensor:
        """``-weight_regularization`` times the share of squared weight magnitude the expected masks
        keep, averaged over the masked weights (0 when the option is off); add it to the loss."""
        device = self.masks[0][2].logits.device
        total = torch.zeros((), device=device)
        if not self.weight_regularization:
            return total
        for module, name, mask in self.masks:
            energy = module.parametrizations[name].original.detach().float().pow(2)
            kept = (energy * mask.expected().to(energy.device)).sum() / energy.sum().clamp_min(1e-30)
            total = total + kept.to(device)
        return -self.weight_regularization * total / len(self.masks)

    def observe(self, score: float) -> bool:
        """Record a held-out ``score`` (higher is better) for the current masks; returns whether it
        is the best so far, whose masks :meth:`finalize` will keep."""
        if score != score:  # NaN
            raise InputError("observe() got a NaN score")
        score = reduce_mean(score)  # every rank must keep the same masks
        if self.best is not None and score <= self.best[0]:
            return False
        self.best = (score, self.steps, self.logits())
        return True

    def finalize(self) -> nn.Module:
        """Plain :class:`NMMask` parametrizations with the learned masks (those of the best
        :meth:`observe` score, if any was reported), pruned weights zeroed, patterns checked, and
        the weights' ``requires_grad`` as they were."""
        if self.steps < self.total:
            warnings.warn(
                f"LearnedMasks.finalize() after {self.steps} of the {self.total} steps its schedule runs over: "
                f"the masks were learned at temperature {self.masks[0][2].temperature:.3g}, not the final "
                f"{self.temperature[1]:.3g}; give steps= the number of steps your loop makes",
                UserWarning,
                stacklevel=2,
            )
        if self.best is not None:
            self.load_logits(self.best[2])
        for module, name, mask in self.masks:
            plist = module.parametrizations[name]
            index = next(i for i, p in enumerate(plist) if p is mask)
            hard = mask.hard().to(plist.original.dtype)
            with torch.no_grad():
                plist.original.mul_(hard)
            plist[index] = NMMask(hard, mask.pattern)
        for p, flag in self.frozen:
            p.requires_grad_(flag)
        check_patterns(self.model, "LearnedMasks.finalize")
        self.masks, self.names, self.frozen = [], [], []
        return self.model
