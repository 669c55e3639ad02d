"""The transformation passes of graphprune (installed as ``graphprune.passes``)."""

from graphprune.passes.block_prune import BlockPrune
from graphprune.passes.channel_prune import ChannelPrune
from graphprune.passes.joint import joint
from graphprune.passes.low_rank import LowRankCompensation
from graphprune.passes.nm_sparsity import NMSparsity
from graphprune.passes.quantize import Quantize

FUSIONS = (joint,)  # rules the pass manager joins adjacent passes by (graphprune.core.pipeline.fused)

__all__ = ["BlockPrune", "ChannelPrune", "LowRankCompensation", "NMSparsity", "Quantize"]
