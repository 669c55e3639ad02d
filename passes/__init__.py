"""The transformation passes of graphprune (installed as ``graphprune.passes``)."""

from graphprune.passes.channel_prune import ChannelPrune

__all__ = ["ChannelPrune"]
