"""graphprune: a compiler for model compression (structured pruning, N:M sparsity, int8).

    import graphprune as gp
    from graphprune.passes import ChannelPrune

    analysis = gp.analyze(model, example_inputs)
    result = gp.prune(model, example_inputs, passes=[ChannelPrune(ratio=0.5, round_to=8)])

    out = gp.prune_onnx("model.onnx", passes=[ChannelPrune(ratio=0.4)], calibration=feeds)
    out.save("model.pruned.onnx")
"""

from graphprune.frontends.torch.analysis import Analysis, FrozenSpace, Group, Member
from graphprune.api.torch import PruneResult, analyze, plan, prune
from graphprune.io.checkpoint import CheckpointReport, apply_to_checkpoint
from graphprune.emit.onnx_export import ExportReport, export_onnx
from graphprune.api.onnx import OnnxPruneResult, analyze_onnx, apply_plan_file_onnx, prune_onnx
from graphprune.errors import (ApplyError, CaptureError, ContractError, GraphpruneError, InputError, InternalError,
                               PostconditionError)
from graphprune.core.pipeline import CompressionState, Pass, PassManager, PassResult, Stage
from graphprune.core.plan import Plan
from graphprune.io.plan_file import PlanFile, apply_plan_file
from graphprune.io.recipe import load_recipe
from graphprune.algorithms.nm import finalize
from graphprune.frontends.torch.streaming import parameters_on_meta

__version__ = "0.1.0"

__all__ = ["Analysis", "ApplyError", "CaptureError", "CheckpointReport", "CompressionState", "ContractError", "ExportReport", "InternalError", "PostconditionError", "FrozenSpace",
           "GraphpruneError", "Group", "InputError", "Member", "OnnxPruneResult", "Pass", "PassManager", "PassResult", "Plan", "PlanFile",
           "PruneResult", "Stage", "analyze", "analyze_onnx", "apply_plan_file", "apply_to_checkpoint", "apply_plan_file_onnx", "export_onnx", "finalize", "load_recipe", "parameters_on_meta", "plan", "prune", "prune_onnx",
           "__version__"]
