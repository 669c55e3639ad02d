"""Copy a model without sharing state with the original.

``copy.deepcopy`` is not enough for parametrized modules (N:M masks, fake quantization):
``torch.nn.utils.parametrize`` gives each parametrized module a generated class that holds the
parametrized properties, and a deep copy keeps pointing at that same class, so removing a
parametrization from the copy (``finalize``, export) would remove the property from the
original too.  :func:`clone` gives every parametrized module of the copy its own class.
"""

from __future__ import annotations

import copy

import torch.nn as nn
from torch.nn.utils import parametrize


def clone(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares no tensors, modules or parametrization classes with it."""
    replica = copy.deepcopy(model)
    for module in replica.modules():
        if parametrize.is_parametrized(module):
            cls = module.__class__
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return replica
