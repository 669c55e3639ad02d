"""The import path of the N:M helpers users call on a masked model, kept from before the layout by stage.

New code imports from :mod:`graphprune.frontends.torch.masks` and :mod:`graphprune.algorithms.nm`.
"""

from graphprune.algorithms.nm import NMPattern
from graphprune.frontends.torch.masks import finalize, masked_weights, nm_masks

__all__ = ["NMPattern", "finalize", "masked_weights", "nm_masks"]
