"""Low-rank compensation (EoRA): exact where the error has the rank, better than plain SVD where the
inputs are anisotropic, full rank restores the dense model, every emitter carries the paths or says
why not."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.algorithms.lowrank import allocate, spectrum
from graphprune.frontends.torch.lowrank import LowRankCompensated, low_rank_paths
from graphprune.frontends.torch.masks import masked_weights
from graphprune.frontends.torch.state import detect_stage
from graphprune.passes import ChannelPrune, LowRankCompensation, NMSparsity, Quantize
from tests.architectures import calibrated_mlp
from tests.oracles import outputs


def _anisotropic(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, cols, dtype=torch.float64)


def _output_error(error: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ error.T).square().sum())


def test_a_path_of_the_error_s_rank_is_exact():
    g = torch.Generator().manual_seed(0)
    error = torch.randn(24, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 40, generator=g, dtype=torch.float64)
    x = _anisotropic(400, 40, 1)
    s = spectrum(error, x.T @ x)
    down, up = s.factors(3)
    assert down.shape == (3, 40) and up.shape == (24, 3)
    assert torch.allclose(up @ down, error, atol=1e-9 * error.abs().max())
    assert s.remaining(3) == pytest.approx(0.0, abs=1e-12 * s.remaining(0))


def test_eora_beats_plain_svd_where_inputs_are_anisotropic():
    g = torch.Generator().manual_seed(0)
    error = torch.randn(32, 48, generator=g, dtype=torch.float64)
    x = _anisotropic(2000, 48, 2)
    s = spectrum(error, x.T @ x)
    u, singular, vh = torch.linalg.svd(error)
    for rank in (1, 4, 16):
        down, up = s.factors(rank)
        eora = _output_error(error - up @ down, x)
        plain = _output_error(error - (u[:, :rank] * singular[:rank]) @ vh[:rank], x)
        assert eora < 0.8 * plain, rank
        assert s.remaining(rank) == pytest.approx(eora, rel=1e-8)  # what the pass reports is what the path leaves


def test_a_budget_takes_the_components_that_remove_most_error_per_parameter():
    g = torch.Generator().manual_seed(0)
    x = _anisotropic(500, 16, 3)
    big = spectrum(10 * torch.randn(16, 16, generator=g, dtype=torch.float64), x.T @ x)
    small = spectrum(0.1 * torch.randn(16, 16, generator=g, dtype=torch.float64), x.T @ x)
    costs = {"big": 32, "small": 32}
    ranks = allocate({"big": big, "small": small}, costs, budget=5 * 32 + 31)
    assert ranks == {"big": 5, "small": 0}
    ranks = allocate({"big": big, "small": small}, costs, budget=10_000)
    assert ranks == {"big": 16, "small": 16}


def _mlp() -> tuple[nn.Module, list[tuple[torch.Tensor]]]:
    return calibrated_mlp((64, 48))


def test_more_rank_lowers_the_error_and_full_rank_restores_the_dense_model():
    model, data = _mlp()
    sparse = [NMSparsity(2, 4, method="sparsegpt", dense_heads=False)]
    errors = []
    for rank in (None, 2, 4, 8):
        passes = sparse + ([LowRankCompensation(rank)] if rank else [])
        result = gp.prune(model, data[0], passes=passes, calibration=data)
        errors.append(result.report.rows[-1].output_error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.75 * errors[0], errors
    full = gp.prune(model, data[0], passes=sparse + [LowRankCompensation({"0": 32, "2": 48, "4": 8})], calibration=data)
    assert full.stage is gp.Stage.COMPENSATED and detect_stage(full.module) is gp.Stage.COMPENSATED
    assert set(low_rank_paths(full.module)) == {"0", "2", "4"}
    assert all(isinstance(full.module[i], LowRankCompensated) for i in (0, 2, 4))
    x = data[1][0]
    with torch.no_grad():
        assert torch.allclose(full.module(x), model(x), rtol=1e-4, atol=1e-4 * model(x).abs().max())
    assert len(masked_weights(full.module)) == 3  # the compressed layers keep their masks under the paths


def test_channel_pruned_layers_are_compared_with_their_kept_dense_channels():
    """After ChannelPrune (no re-fit) then N:M, full-rank paths give back the channel-pruned model:
    the error is measured against the dense weights cut to the kept channels, not the dense model."""
    model, data = _mlp()
    channels = gp.prune(model, data[0], passes=[ChannelPrune(0.25)], calibration=data)
    passes = [ChannelPrune(0.25), NMSparsity(2, 4, dense_heads=False), LowRankCompensation({"0": 32, "2": 36, "4": 8})]
    result = gp.prune(model, data[0], passes=passes, calibration=data)
    x = data[1][0]
    with torch.no_grad():
        want = channels.module(x)
        assert torch.allclose(result.module(x), want, rtol=1e-4, atol=1e-4 * want.abs().max())


@pytest.mark.slow
def test_onnx_export_carries_the_paths_float_and_int8(tmp_path):
    model, data = _mlp()
    x = data[1][0]
    for quantize in (False, True):
        passes = [NMSparsity(2, 4, method="sparsegpt", dense_heads=False), LowRankCompensation(4)]
        result = gp.prune(model, data[0], passes=passes + ([Quantize()] if quantize else []), calibration=data)
        if quantize:
            details = result.report.rows[-1].details
            assert details["quantized layers"] == 3 and details["float layers"].count("low-rank compensation path") == 6
        path = str(tmp_path / f"lowrank{int(quantize)}.onnx")
        result.export_onnx(path)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        want = outputs(result.module, (x,))[0].numpy()
        bound = (2e-2 if quantize else 1e-5) * np.abs(want).max()
        assert np.abs(got - want).max() <= bound, quantize
    feeds = [{session.get_inputs()[0].name: b[0].numpy()} for b in data]
    with pytest.raises(gp.InputError, match="exported with low-rank compensation paths"):
        gp.prune_onnx(str(tmp_path / "lowrank0.onnx"), passes=[Quantize()], calibration=feeds)


def test_sparse_kernels_keep_the_paths():
    """Without a capable GPU the masked module comes back; either way the paths stay beside the layers."""
    model, data = _mlp()
    passes = [NMSparsity(2, 4, dense_heads=False), LowRankCompensation(4)]
    result = gp.prune(model, data[0], passes=passes, calibration=data)
    converted, _ = result.to_sparse_kernels()
    assert set(low_rank_paths(converted)) == {"0", "2", "4"}
    with torch.no_grad():
        assert torch.allclose(converted(data[1][0]), result.module(data[1][0]), atol=1e-6)


@pytest.mark.slow
def test_gpt2_conv1d_layers_get_paths():
    from tests.architectures import build

    model, inputs = build("gpt2")
    batches = [inputs, inputs]
    sparse = [NMSparsity(2, 4, method="sparsegpt")]
    plain = gp.prune(model, inputs, passes=sparse, calibration=batches)
    result = gp.prune(model, inputs, passes=sparse + [LowRankCompensation(8)], calibration=batches)
    assert len(low_rank_paths(result.module)) == len(masked_weights(plain.module)) > 0
    assert result.report.rows[-1].output_error < plain.report.rows[-1].output_error


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "rank= or budget="),
        (dict(rank=4, budget=100), "rank= or budget="),
        (dict(rank=0), "positive int"),
        (dict(rank=True), "positive int"),
        (dict(rank={"0": -1}), "positive int"),
        (dict(budget=0), "positive number"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(gp.InputError, match=match):
        LowRankCompensation(**kwargs)


def test_refusals_name_the_problem(tmp_path):
    model, data = _mlp()
    sparse = [NMSparsity(2, 4, dense_heads=False)]
    with pytest.raises(gp.InputError, match=r"rank 16 is larger than 4 \(8x48\) allows: at most 8"):
        gp.prune(model, data[0], passes=sparse + [LowRankCompensation(16)], calibration=data)
    with pytest.raises(gp.InputError, match="no module named 'nope'"):
        gp.prune(model, data[0], passes=sparse + [LowRankCompensation({"nope": 2})], calibration=data)
    with pytest.raises(gp.InputError, match="rank names modules that are not linear layers: 1"):
        gp.prune(model, data[0], passes=sparse + [LowRankCompensation({"1": 2})], calibration=data)
    with pytest.raises(gp.InputError, match="needs calibration data"):
        gp.prune(model, data[0], passes=sparse + [LowRankCompensation(2)])
    with pytest.raises(gp.ContractError, match="LowRankCompensation runs on a structured, masked model"):
        gp.prune(model, data[0], passes=[LowRankCompensation(2)], calibration=data)
    with pytest.raises(gp.ContractError, match="NMSparsity runs on a dense, structured model.*'compensated'"):
        gp.prune(model, data[0], passes=sparse + [LowRankCompensation(2), NMSparsity()], calibration=data)
    with pytest.raises(gp.ContractError, match="LowRankCompensation does not run on ONNX models"):
        gp.prune_onnx(str(tmp_path / "unused.onnx"), passes=[NMSparsity(), LowRankCompensation(2)])


def test_a_plan_file_carries_the_paths(tmp_path):
    """Saved, loaded and re-applied to the dense model, the plan gives the run's module: masks,
    SparseGPT's values and the paths, named as in the model without paths."""
    model, data = _mlp()
    passes = [NMSparsity(2, 4, method="sparsegpt", dense_heads=False), LowRankCompensation(4)]
    result = gp.prune(model, data[0], passes=passes, calibration=data)
    json_path, _ = result.save_plan(tmp_path / "run")
    plan = gp.PlanFile.load(json_path)
    assert set(plan.low_rank) == {"0", "2", "4"} and set(plan.masks) == set(plan.values) == {
        "0.weight",
        "2.weight",
        "4.weight",
    }
    assert "low-rank paths beside 3 layers (ranks 4, " in plan.describe()
    assert plan.diff(result.plan_file()) == []
    again = gp.apply_plan_file(model, data[0], json_path)
    assert set(low_rank_paths(again)) == {"0", "2", "4"}
    for a, b in zip(outputs(again, data[1]), outputs(result.module, data[1]), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(gp.InputError, match="a Hugging Face checkpoint cannot carry"):
        gp.apply_to_checkpoint(json_path, tmp_path, tmp_path / "out")
    entry = json.loads(open(json_path).read())
    entry["low_rank"]["2"]["layout"] = "diagonal"
    with open(json_path, "w") as f:
        json.dump(entry, f)
    with pytest.raises(gp.InputError, match=r"'low_rank' entry '2' layout is 'diagonal'"):
        gp.PlanFile.load(json_path)


def test_a_path_for_a_layer_that_cannot_take_one_is_refused():
    model, data = _mlp()
    passes = [NMSparsity(2, 4, dense_heads=False), LowRankCompensation({"2": 4})]
    plan = gp.prune(model, data[0], passes=passes, calibration=data).plan_file()
    plan.masks = {}  # the path alone, on a model whose layer 2 is narrower
    other = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 40), nn.GELU(), nn.Linear(40, 8)).eval()
    with pytest.raises(gp.InputError, match=r"beside 2 fits a \[48, 64\] weight, the weight is \[40, 64\]"):
        gp.apply_plan_file(other, data[0], plan)
    nested = nn.Sequential(nn.Linear(32, 64), nn.Sequential(nn.Linear(64, 48), nn.GELU()), nn.GELU(), nn.Linear(48, 8))
    plan.low_rank = {"1": plan.low_rank["2"]}
    with pytest.raises(gp.InputError, match="a low-rank path beside 1, which this model does not have"):
        gp.apply_plan_file(nested.eval(), data[0], plan)


def test_a_module_computing_more_than_its_product_gets_no_path():
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 32) / 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(nn.functional.linear(x, self.weight))

    model, data = _mlp()
    model[0] = Fused()
    passes = [NMSparsity(2, 4, dense_heads=False), LowRankCompensation(4)]
    result = gp.prune(model, data[0], passes=passes, calibration=data)
    assert set(low_rank_paths(result.module)) == {"2", "4"}
    assert (
        "0.weight: Fused computes more than its weight's product"
        in result.report.rows[-1].details["layers without a path"]
    )
