"""Plans as data: fingerprints refuse a plan made for another architecture; a run's plan file
(JSON + safetensors) round-trips, reads, diffs, and re-applies to reproduce the run exactly."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.frontends.torch.apply import apply_plan
from graphprune.passes import ChannelPrune, NMSparsity, Quantize
from samples.resnet import ResNet
from tests.architectures import build
from tests.command_line import run
from tests.oracles import outputs


def _resnet(width: int = 32) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return ResNet(widths=(width, 2 * width), blocks=1).eval(), (torch.randn(2, 3, 32, 32),)


@pytest.mark.parametrize("name", ["resnet_sample", "llama_gqa"])
def test_a_saved_plan_reapplies_to_the_same_outputs(name, tmp_path):
    model, inputs = _resnet() if name == "resnet_sample" else build(name)
    passes = [ChannelPrune(0.5, round_to=4), NMSparsity(2, 4)]
    result = gp.prune(model, inputs, passes=passes)
    json_path, tensor_path = result.save_plan(tmp_path / "run")
    assert json_path.endswith("run.json") and tensor_path.endswith("run.safetensors")
    data = json.loads(open(json_path).read())
    assert data["format"] == "graphprune-plan" and data["pipeline"] == [repr(p) for p in passes]
    loaded = gp.PlanFile.load(json_path)
    assert loaded.diff(result.plan_file()) == []
    again = gp.apply_plan_file(model, inputs, json_path)
    for a, b in zip(outputs(again, inputs), outputs(result.module, inputs), strict=True):
        assert torch.equal(a, b)


def test_a_plan_for_another_architecture_is_refused_with_what_differs():
    model, x = _resnet(32)
    plan = ChannelPrune(0.5).plan(gp.analyze(model, x), model)
    other, _ = _resnet(16)
    with pytest.raises(
        gp.InputError,
        match=r"another architecture \(fingerprint \w+, this model \w+\): other "
        r"shapes: fc.weight, layers.0.bn1.bias",
    ):
        apply_plan(other, gp.analyze(other, x), plan)
    deeper = nn.Sequential(model, nn.Linear(10, 3)).eval()
    with pytest.raises(gp.InputError, match="missing here: fc.bias, .*; not in the plan: 0.fc.bias"):
        apply_plan(deeper, gp.analyze(deeper, x), plan)
    again = gp.Plan.from_json(plan.to_json())  # the fingerprint travels with the plan
    assert again.fingerprint == plan.fingerprint and again.keep == plan.keep
    apply_plan(model, gp.analyze(model, x), again)


def test_diff_names_the_decisions_that_differ(tmp_path):
    model, x = _resnet()
    a = gp.prune(model, x, passes=[ChannelPrune(0.5), NMSparsity(2, 4)]).plan_file()
    b = gp.prune(model, x, passes=[ChannelPrune(0.25), NMSparsity(1, 4)]).plan_file()
    differences = a.diff(b)
    assert any("keeps" in d and "differ" in d for d in differences)
    assert any(d.startswith("mask ") for d in differences)
    assert a.diff(a) == []


def test_int8_plans_reapply_with_their_batchnorm_folds(tmp_path):
    model, x = _resnet()
    calibration = [(torch.randn(4, *x[0].shape[1:]),) for _ in range(2)]
    result = gp.prune(model, x, passes=[ChannelPrune(0.5), Quantize()], calibration=calibration)
    result.save_plan(tmp_path / "q")
    loaded = gp.PlanFile.load(tmp_path / "q.json")
    assert loaded.quantization is not None and "int8 plan for" in loaded.describe()
    assert loaded.quantization.folded  # the ResNet's BatchNorms were folded before the scales were read
    again = gp.apply_plan_file(model, x, loaded)
    probe = torch.randn(3, *x[0].shape[1:])
    assert torch.equal(again(probe), result.module(probe))


def test_unreadable_plan_files(tmp_path):
    with pytest.raises(gp.InputError, match="no such file"):
        gp.PlanFile.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.safetensors").write_bytes(b"")
    with pytest.raises(gp.InputError, match="is not JSON"):
        gp.PlanFile.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(gp.InputError, match="is not a graphprune plan"):
        gp.PlanFile.load(tmp_path / "bad.json")


def test_cli_plan_reads_and_diffs(tmp_path):
    model, x = _resnet()
    gp.prune(model, x, passes=[ChannelPrune(0.5)]).save_plan(tmp_path / "a")
    gp.prune(model, x, passes=[ChannelPrune(0.25)]).save_plan(tmp_path / "b")
    shown = run("plan", str(tmp_path / "a.json"))
    assert shown.returncode == 0 and "groups pruned" in shown.stdout
    diffed = run("plan", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json")
    assert diffed.returncode == 0 and json.loads(diffed.stdout)["differences"]


PASSES_THAT_CHANGE_VALUES = {
    "sparsegpt": lambda: [NMSparsity(2, 4, method="sparsegpt")],
    "bias compensation and norm re-fit": lambda: [ChannelPrune(0.5, round_to=4, compensate="bias", refit_norms=True)],
    "reconstruction, then a permuted mask": lambda: [
        ChannelPrune(0.5, round_to=4, compensate="reconstruct"),
        NMSparsity(2, 4, permute=True),
    ],
    "batchnorm re-estimation": lambda: [ChannelPrune(0.5, round_to=4, compensate="batchnorm")],
}


@pytest.mark.parametrize("pipeline", list(PASSES_THAT_CHANGE_VALUES))
def test_a_plan_carries_the_values_passes_changed(pipeline, tmp_path):
    """Re-applied to the dense model, the plan reproduces the run even where a pass changed the
    surviving weights (SparseGPT's update, compensation, permutations): the plan holds those values."""
    model, inputs = _resnet() if "batchnorm" in pipeline else build("llama_gqa")
    batches = [inputs] * 2
    result = gp.prune(model, inputs, PASSES_THAT_CHANGE_VALUES[pipeline](), calibration=batches)
    assert result.updated  # what the oracle is about
    result.save_plan(tmp_path / "run")
    again = gp.apply_plan_file(model, inputs, tmp_path / "run.json")
    for a, b in zip(outputs(again, inputs), outputs(result.module, inputs), strict=True):
        assert torch.equal(a, b)


def test_a_large_plan_is_written_and_read_in_parts(tmp_path, monkeypatch):
    from graphprune.io import tensor_store

    model, inputs = build("llama_gqa")
    plan = gp.plan(model, inputs, [NMSparsity(2, 4, method="sparsegpt")], calibration=[inputs])
    monkeypatch.setattr(tensor_store, "PART_BYTES", 64 << 10)  # parts of 64 KiB
    json_path, _ = plan.save(tmp_path / "run")
    parts = json.loads(open(json_path).read())["tensor_files"]
    assert len(parts) > 3 and all((tmp_path / p).exists() for p in parts)
    assert gp.PlanFile.load(json_path).diff(plan) == []


@pytest.fixture(scope="module")
def small_plan() -> gp.PlanFile:
    """A plan of a two-layer MLP: one structured plan and one 2:4 mask (quick to make)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    return gp.prune(model, (torch.randn(2, 8),), passes=[ChannelPrune(0.5), NMSparsity(2, 4)]).plan_file()


def test_saving_a_plan_never_replaces_a_users_weights(small_plan, tmp_path):
    """``model.json`` writes ``model.safetensors`` beside it: a user's weights of that name are kept
    unless overwrite=True, and nothing of the plan lands when it is refused (issue 18 item 3)."""
    (tmp_path / "model.safetensors").write_bytes(b"the user's weights")
    with pytest.raises(gp.InputError, match=r"model.safetensors exists and graphprune did not write it"):
        small_plan.save(tmp_path / "model.json")
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == b"the user's weights"
    (tmp_path / "notes.json").write_text('{"mine": true}')
    with pytest.raises(gp.InputError, match=r"notes.json exists and graphprune did not write it"):
        small_plan.save(tmp_path / "notes")
    small_plan.save(tmp_path / "model.json", overwrite=True)
    assert gp.PlanFile.load(tmp_path / "model.json").diff(small_plan) == []


def test_a_plan_saved_again_replaces_its_own_files(small_plan, tmp_path):
    small_plan.save(tmp_path / "run")
    other = gp.PlanFile.load(tmp_path / "run.json")
    other.pipeline = ["edited"]
    other.save(tmp_path / "run")  # its own files: recognised as a plan's, replaced without overwrite
    assert gp.PlanFile.load(tmp_path / "run.json").pipeline == ["edited"]
    assert sorted(os.listdir(tmp_path)) == ["run.json", "run.safetensors"]


def test_every_part_of_a_large_plan_is_claimed(small_plan, tmp_path, monkeypatch):
    """Parts are claimed as they are started (their number is known only at the end): a user's
    file where a later part would go refuses the whole save, and no file of the plan lands."""
    from graphprune.io import tensor_store

    monkeypatch.setattr(tensor_store, "PART_BYTES", 64)
    (tmp_path / "run-00002.safetensors").write_bytes(b"someone else's")
    with pytest.raises(gp.InputError, match=r"run-00002.safetensors exists and graphprune did not write it"):
        small_plan.save(tmp_path / "run")
    assert os.listdir(tmp_path) == ["run-00002.safetensors"]
    os.remove(tmp_path / "run-00002.safetensors")
    json_path, _ = small_plan.save(tmp_path / "run")
    small_plan.save(tmp_path / "run")  # every part carries the plan's mark, so it replaces them
    parts = json.loads(open(json_path).read())["tensor_files"]
    assert len(parts) > 1 and gp.PlanFile.load(json_path).diff(small_plan) == []


def test_a_plan_joins_the_callers_transaction(small_plan, tmp_path):
    from graphprune.io.outputs import Outputs

    with Outputs() as out:
        json_path, tensor_path = small_plan.save(tmp_path / "run", outputs=out)
        assert not os.path.exists(json_path) and not os.path.exists(tensor_path)  # staged until commit
    assert gp.PlanFile.load(json_path).diff(small_plan) == []
