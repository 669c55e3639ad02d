"""graphprune: a compiler for model compression (structured pruning, N:M sparsity, int8/int4/fp8).

import graphprune as gp
from graphprune.passes import ChannelPrune

analysis = gp.analyze(model, example_inputs)
result = gp.prune(model, example_inputs, passes=[ChannelPrune(ratio=0.5, round_to=8)])

out = gp.prune_onnx("model.onnx", passes=[ChannelPrune(ratio=0.4)], calibration=feeds)
out.save("model.pruned.onnx")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from graphprune.errors import (
    ApplyError,
    CaptureError,
    ContractError,
    GraphpruneError,
    InputError,
    InternalError,
    PostconditionError,
)

# Public names and the module that defines each: imported on first use, so that `import graphprune`
# stays light and the ONNX stack (onnx, onnxruntime, onnxscript) loads only for an ONNX feature.
_LAZY = {
    "Analysis": "graphprune.core.groups",
    "FrozenSpace": "graphprune.core.groups",
    "Group": "graphprune.core.groups",
    "Member": "graphprune.core.groups",
    "PruneResult": "graphprune.api.torch",
    "plan": "graphprune.api.torch",
    "prune": "graphprune.api.torch",
    "roofline": "graphprune.api.torch",
    "Roofline": "graphprune.emit.roofline",
    "analyze": "graphprune.frontends.torch.analysis",
    "CheckpointReport": "graphprune.io.checkpoint",
    "apply_to_checkpoint": "graphprune.io.checkpoint",
    "ExportReport": "graphprune.emit.onnx_export",
    "export_onnx": "graphprune.emit.onnx_export",
    "OnnxPruneResult": "graphprune.api.onnx",
    "analyze_onnx": "graphprune.api.onnx",
    "apply_plan_file_onnx": "graphprune.api.onnx",
    "prune_onnx": "graphprune.api.onnx",
    "Pass": "graphprune.core.pipeline",
    "PassManager": "graphprune.core.pipeline",
    "PassResult": "graphprune.core.pipeline",
    "Stage": "graphprune.core.pipeline",
    "CompressionState": "graphprune.frontends.torch.state",
    "Plan": "graphprune.core.plan",
    "PlanFile": "graphprune.io.plan_file",
    "apply_plan_file": "graphprune.io.plan_file",
    "load_recipe": "graphprune.io.recipe",
    "finalize": "graphprune.frontends.torch.masks",
    "parameters_on_meta": "graphprune.frontends.torch.streaming",
}

if TYPE_CHECKING:
    from graphprune.api.onnx import OnnxPruneResult, analyze_onnx, apply_plan_file_onnx, prune_onnx
    from graphprune.api.torch import PruneResult, plan, prune, roofline
    from graphprune.core.groups import Analysis, FrozenSpace, Group, Member
    from graphprune.core.pipeline import Pass, PassManager, PassResult, Stage
    from graphprune.core.plan import Plan
    from graphprune.emit.onnx_export import ExportReport, export_onnx
    from graphprune.emit.roofline import Roofline
    from graphprune.frontends.torch.analysis import analyze
    from graphprune.frontends.torch.masks import finalize
    from graphprune.frontends.torch.state import CompressionState
    from graphprune.frontends.torch.streaming import parameters_on_meta
    from graphprune.io.checkpoint import CheckpointReport, apply_to_checkpoint
    from graphprune.io.plan_file import PlanFile, apply_plan_file
    from graphprune.io.recipe import load_recipe


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'graphprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "ApplyError",
    "CaptureError",
    "CheckpointReport",
    "CompressionState",
    "ContractError",
    "ExportReport",
    "InternalError",
    "PostconditionError",
    "FrozenSpace",
    "GraphpruneError",
    "Group",
    "InputError",
    "Member",
    "OnnxPruneResult",
    "Pass",
    "PassManager",
    "PassResult",
    "Plan",
    "PlanFile",
    "PruneResult",
    "Roofline",
    "Stage",
    "analyze",
    "analyze_onnx",
    "apply_plan_file",
    "apply_to_checkpoint",
    "apply_plan_file_onnx",
    "export_onnx",
    "finalize",
    "load_recipe",
    "parameters_on_meta",
    "plan",
    "prune",
    "prune_onnx",
    "roofline",
    "__version__",
]
