"""Per-op constraint rules: how each operator couples the dims of its tensors."""

from graphprune.rules import aten as _aten_table  # noqa: F401  (fills the registry)
from graphprune.rules.registry import RuleContext, RuleRegistry, ShapeConstant, aten_rules

__all__ = ["RuleContext", "RuleRegistry", "ShapeConstant", "aten_rules"]
