"""The transformation passes of graphprune (installed as ``graphprune.passes``)."""

from graphprune.passes.channel_prune import ChannelPrune
from graphprune.passes.nm_sparsity import NMSparsity

__all__ = ["ChannelPrune", "NMSparsity"]
