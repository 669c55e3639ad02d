"""The import path of the channel criteria users subclass or pass to ChannelPrune, kept from before the layout by stage.

New code imports from :mod:`graphprune.algorithms.importance`.
"""

from graphprune.algorithms.importance import Importance, InputWeighted, Taylor

__all__ = ["Importance", "InputWeighted", "Taylor"]
