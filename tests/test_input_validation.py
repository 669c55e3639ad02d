"""What users hand in is checked where it enters (issue 18): ONNX external data stays inside its
model's folder, importance callables return one finite real score per channel, recipes match their
passes' options, calibration batches match the example inputs."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.algorithms.importance import Importance
from graphprune.frontends.onnx.capture import read_model
from graphprune.passes import ChannelPrune, Quantize

SECRET = np.arange(16, dtype=np.float32)  # 64 bytes a model must never be able to pull in


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


# ---------------------------------------------------------------- ONNX external data
def _external_model(location: str) -> onnx.ModelProto:
    """A MatMul whose 4x4 weight is kept in the external file ``location``."""
    weight = numpy_helper.from_array(np.zeros((4, 4), np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": str(SECRET.nbytes)}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """``model/`` with its own data file, and a secret beside it; the working directory is
    ``model/``, where a location without a folder used to be resolved."""
    (tmp_path / "secret.bin").write_bytes(SECRET.tobytes())
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes((SECRET * 0 + 1).tobytes())
    monkeypatch.chdir(model)
    return tmp_path, model


def test_external_data_of_a_model_in_memory_needs_a_folder(folders):
    _, model = folders
    with pytest.raises(gp.InputError, match="given in memory, so there is no folder.*base_dir="):
        gp.prune_onnx(_external_model("../secret.bin"), passes=[ChannelPrune(0.5)])
    with pytest.raises(gp.InputError, match="given in memory, so there is no folder"):
        read_model(_external_model("weights.bin"))
    loaded = read_model(_external_model("weights.bin"), base_dir=model)
    assert (loaded.graph.initializers["W"].const_value.numpy() == 1).all()
    assert gp.analyze_onnx(_external_model("weights.bin"), base_dir=model).node_count() > 0  # the public entry too
    with pytest.raises(gp.InputError, match="outside the model's folder"):
        gp.prune_onnx(_external_model("../secret.bin"), passes=[ChannelPrune(0.5)], base_dir=model)


@pytest.mark.parametrize("location", ["../secret.bin", "{root}/secret.bin", "sub/../../secret.bin", "link.bin"])
def test_external_data_outside_the_models_folder_is_refused(folders, location):
    root, model = folders
    os.symlink(root / "secret.bin", model / "link.bin")  # inside the folder by name, outside by target
    location = location.format(root=root)
    with pytest.raises(gp.InputError, match="outside the model's folder"):
        read_model(_external_model(location), base_dir=model)
    onnx.save(_external_model(location), str(model / "m.onnx"))
    with pytest.raises(gp.InputError, match="outside the model's folder"):
        gp.prune_onnx(str(model / "m.onnx"), passes=[ChannelPrune(0.5)])


def test_an_ir_model_reads_its_data_from_the_folder_it_was_loaded_from(folders, tmp_path):
    _, model = folders
    onnx.save(_external_model("weights.bin"), str(model / "m.onnx"))
    os.chdir(tmp_path)  # elsewhere: the copy's data used to be looked up in the working directory
    loaded = read_model(ir.load(str(model / "m.onnx")))
    assert (loaded.graph.initializers["W"].const_value.numpy() == 1).all()
    with pytest.raises(gp.InputError, match="base_dir= is for models given in memory"):
        read_model(str(model / "m.onnx"), base_dir=model)


# ---------------------------------------------------------------- importance callables
def three_scores(analysis, group, model):
    return torch.ones(3)


def nan_scores(analysis, group, model):
    return torch.full((group.size,), float("nan"))


def list_scores(analysis, group, model):
    return [1.0] * group.size


def complex_scores(analysis, group, model):
    return torch.ones(group.size, dtype=torch.complex64)


def column_scores(analysis, group, model):
    return torch.ones(group.size, 1)


class Forgetful(Importance):
    def scores(self, analysis, model, groups, calibration):
        return {}


@pytest.mark.parametrize(
    "importance,match",
    [
        (
            three_scores,
            r"importance 'three_scores' on group \d+ \(16 channels of 0.weight.*shape \(16,\).*"
            r"got shape \(3,\)",
        ),
        (nan_scores, r"'nan_scores' on group \d+.*16 scores are NaN or Inf"),
        (list_scores, r"'list_scores' on group \d+.*got list"),
        (complex_scores, r"'complex_scores' on group \d+.*got a torch.complex64 tensor"),
        (column_scores, r"'column_scores' on group \d+.*got shape \(16, 1\)"),
        (Forgetful(), r"'Forgetful' on group \d+.*got NoneType"),
    ],
)
def test_importance_scores_that_cannot_rank_the_channels_are_refused(importance, match):
    with pytest.raises(gp.InputError, match=match):
        gp.prune(_mlp(), (torch.randn(2, 8),), passes=[ChannelPrune(0.5, importance=importance)])


def test_integer_scores_rank_channels():
    result = gp.prune(
        _mlp(),
        (torch.randn(2, 8),),
        passes=[ChannelPrune(0.5, importance=lambda analysis, group, model: torch.arange(group.size))],
    )
    assert torch.equal(result.module[0].weight, _mlp()[0].weight[8:])  # the highest scores are kept


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "body,match",
    [
        (
            'name = "ChannelPrune"\nheads = "false"',
            r"pass #1 \(ChannelPrune\), key 'heads': expected true or false, got 'false'",
        ),
        ('name = "ChannelPrune"\nignore = "c1"', r"key 'ignore': expected an array of strings, got 'c1'"),
        ('name = "ChannelPrune"\nignore = 5', r"key 'ignore': expected an array of strings, got 5"),
        ('name = "ChannelPrune"\nratios = 3', r"key 'ratios': expected a table of numbers keyed by strings, got 3"),
        ('name = "ChannelPrune"\nratios = {fc = "half"}', r"key 'ratios': expected a table of numbers"),
        ('name = "ChannelPrune"\nround_to = 2.5', r"key 'round_to': expected an integer, got 2.5"),
        ('name = "ChannelPrune"\nloss_fn = "mse"', r"key 'loss_fn': this option takes a Python object"),
        (
            'name = "ChannelPrune"\nration = 0.5',
            r"pass #1 \(ChannelPrune\): unknown option\(s\) \['ration'\] "
            r"\(did you mean 'ratio' for 'ration'\?\)",
        ),
        ('name = "ChanelPrune"', r"pass #1: unknown pass 'ChanelPrune' \(did you mean 'ChannelPrune'\?\)"),
        ('name = "ChannelPrune"\nratio = 1.5', r"pass #1 \(ChannelPrune\): ratio must be a number in \[0, 1\)"),
        ('name = "ChannelPrune"\n\n[[pass]]\nname = "NMSparsity"\nn = "2"', r"pass #2 \(NMSparsity\), key 'n'"),
    ],
)
def test_recipes_are_checked_against_their_passes_options(tmp_path, body, match):
    path = tmp_path / "recipe.toml"
    path.write_text(f"[[pass]]\n{body}\n")
    with pytest.raises(gp.InputError, match=f"recipe {re.escape(str(path))}, .*{match}"):
        gp.load_recipe(str(path))
    with pytest.raises(gp.InputError, match=match):
        gp.prune(_mlp(), (torch.randn(2, 8),), recipe=f"[[pass]]\n{body}\n")


def test_every_option_but_callables_can_be_written_in_a_recipe():
    """The schema is read off the passes' annotations: an option whose type it cannot express in
    TOML would be refused in every recipe, so the list of such options is pinned here."""
    from graphprune.io.recipe import _toml_forms, available_passes, option_types

    unwritable = {
        (name, key)
        for name, cls in available_passes().items()
        for key, annotation in option_types(cls).items()
        if not _toml_forms(annotation)
    }
    assert unwritable == {("ChannelPrune", "loss_fn")}


def test_recipe_tables_and_sources_of_the_wrong_kind():
    with pytest.raises(gp.InputError, match=r"pass #1: expected a \[\[pass\]\] table, got 1"):
        gp.load_recipe("pass = [1, 2]\n")
    with pytest.raises(gp.InputError, match="a recipe is a path to a .toml file or TOML text, got int"):
        gp.load_recipe(5)
    recipe = gp.load_recipe(
        '[[pass]]\nname = "ChannelPrune"\nratio = 0\nratios = {"0" = 0.25}\nignore = ["2"]\nheads = false\n'
    )
    assert recipe.passes[0].ratios == {"0": 0.25} and recipe.passes[0].ignore == ["2"] and not recipe.passes[0].heads


# ---------------------------------------------------------------- calibration batches
@pytest.mark.parametrize(
    "batch,match",
    [
        (
            (torch.randn(4, 8, dtype=torch.float64),),
            r"batch 1, input \[0\]: 2-d torch.float64, but the example input is "
            r"2-d torch.float32",
        ),
        ((torch.empty(4, 8, device="meta"),), r"batch 1, input \[0\]: on meta, but the example input is on cpu"),
        ((torch.randn(0, 8),), r"batch 1, input \[0\]: empty \(shape \(0, 8\)\)"),
        (
            (torch.randn(4, 8), torch.randn(4, 8)),
            r"batch 1 has other inputs than the example inputs: missing \[\], "
            r"extra \['\[1\]'\]",
        ),
        ({"x": torch.randn(4, 8)}, r"calibration batch 1 \(\['x'\] \(4, 8\)\) does not fit the model.*TypeError"),
        ((torch.randn(4, 9),), r"calibration batch 1 \(\[0\] \(4, 9\)\): .*another channel count than the example"),
    ],
)
def test_calibration_batches_match_the_example_inputs(batch, match):
    with pytest.raises(gp.InputError, match=match):
        gp.prune(_mlp(), (torch.randn(2, 8),), passes=[Quantize()], calibration=[(torch.randn(4, 8),), batch])


def test_a_batch_of_the_wrong_width_is_named_by_every_criterion_that_runs_it():
    taylor = ChannelPrune(0.5, importance="taylor", loss_fn=lambda outputs, batch: outputs.pow(2).mean())
    with pytest.raises(gp.InputError, match=r"calibration batch 0 \(\[0\] \(4, 9\)\) does not fit the model"):
        gp.prune(_mlp(), (torch.randn(2, 8),), passes=[taylor], calibration=[(torch.randn(4, 9),)])


def test_calibration_keyed_by_input_name_is_accepted():
    """The CLI's .npz files key arrays by input name, also for a positional example."""
    result = gp.prune(_mlp(), (torch.randn(2, 8),), passes=[Quantize()], calibration=[{"input": torch.randn(4, 8)}])
    assert result.stage is gp.Stage.QUANTIZED


def test_calibration_of_another_sequence_length_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    example = (torch.randint(0, 100, (1, 12)),)
    result = gp.prune(model, example, passes=[Quantize()], calibration=[(torch.randint(0, 100, (2, 16)),)])
    assert result.stage is gp.Stage.QUANTIZED
