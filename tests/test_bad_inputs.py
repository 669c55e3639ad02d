"""The bad-input catalogue (docs/BAD_INPUTS.md): one test per row.  Every bad input gets an error
that names the problem, and nothing the caller gave is changed or left half-written."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.passes import ChannelPrune, NMSparsity, Quantize
from tests.oracles import Explodes, snapshot, unchanged


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_wrong_example_inputs():
    with pytest.raises(gp.CaptureError, match="could not capture Sequential(?s:.*)same reduction dim"):
        gp.prune(_mlp(), (torch.randn(2, 5),), passes=[ChannelPrune(0.5)])
    with pytest.raises(gp.InputError, match="must be a tuple of tensors or a dict"):
        gp.prune(_mlp(), [torch.randn(2, 8)], passes=[ChannelPrune(0.5)])


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) * float(x.numpy().sum())  # leaves torch: cannot be exported


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # control flow on tensor values
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize("model", [_Untraceable, _DataDependent])
def test_models_that_cannot_be_captured(model):
    with pytest.raises(gp.CaptureError, match="forward"):
        gp.prune(model().eval(), (torch.randn(2, 8),), passes=[ChannelPrune(0.5)])


class _UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.logcumsumexp(self.b(h), dim=-1))  # no rule for logcumsumexp


def test_unsupported_ops_freeze_what_they_touch_and_are_reported():
    model, x = _UnknownOp().eval(), (torch.randn(2, 8),)
    analysis = gp.analyze(model, x)
    assert any("logcumsumexp" in op for op in analysis.unsupported)
    assert "ops without a rule" in analysis.describe()
    result = gp.prune(model, x, passes=[ChannelPrune(0.5)])
    assert result.module.b.out_features == 16  # frozen: the op mixes channels in a way nobody described
    assert result.module.a.out_features == 8  # the rest still prunes


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ChannelPrune(1.0), "ratio must be a number in"),
        (lambda: ChannelPrune(-0.1), "ratio must be a number in"),
        (lambda: NMSparsity(4, 4), "0 < n < m"),
        (lambda: Quantize(percentile=20), "percentile must be a number"),
    ],
)
def test_ratios_and_options_out_of_range(make, match):
    with pytest.raises(gp.InputError, match=match):
        make()


def test_conflicting_options():
    with pytest.raises(gp.InputError, match="one of ratio, target_macs or target_params"):
        ChannelPrune(0.3, target_params=0.5)
    with pytest.raises(gp.InputError, match="exactly one of passes"):
        gp.prune(_mlp(), (torch.randn(2, 8),), passes=[ChannelPrune(0.5)], recipe="[[pass]]\nname='ChannelPrune'\n")


@pytest.mark.parametrize(
    "batch,match",
    [
        ((torch.randn(4, 8, 1),), "3-d torch.float32, but the example input is 2-d"),
        ((torch.randint(0, 5, (4, 8)),), "2-d torch.int64, but the example input is 2-d torch.float32"),
        ((torch.full((4, 8), float("nan")),), "contains NaN or Inf"),
        (("text",), "is a str"),
    ],
)
def test_calibration_of_the_wrong_shape_dtype_or_values(batch, match):
    with pytest.raises(gp.InputError, match=match):
        gp.prune(_mlp(), (torch.randn(2, 8),), passes=[Quantize()], calibration=[batch])


def test_empty_calibration_and_a_generator_used_by_two_passes():
    with pytest.raises(gp.InputError, match="calibration data is empty"):
        gp.prune(_mlp(), (torch.randn(2, 8),), passes=[Quantize()], calibration=[])
    generator = ((torch.randn(4, 8),) for _ in range(2))  # consumed once, seen by both passes
    result = gp.prune(
        _mlp(),
        (torch.randn(2, 8),),
        calibration=generator,
        passes=[NMSparsity(2, 4, method="wanda", dense_heads=False), Quantize()],
    )
    assert result.stage is gp.Stage.QUANTIZED


def test_nan_or_inf_in_weights_or_activations():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(gp.InputError, match="parameter 0.weight contains NaN or Inf"):
        gp.prune(model, (torch.randn(2, 8),), passes=[ChannelPrune(0.5)])
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].bias.fill_(1e38)  # finite weights whose activations overflow to Inf in float32
        model[0].weight.fill_(1e38)
    with pytest.raises(gp.InputError, match="the input of 2 contains NaN or Inf"):
        gp.prune(model, (torch.randn(2, 8),), passes=[Quantize()], calibration=[(torch.ones(4, 8),)])


def test_unwritable_outputs_and_interrupted_writes(tmp_path):
    model, x = _mlp(), (torch.randn(2, 8),)
    with pytest.raises(gp.InputError, match="does not exist"):
        gp.export_onnx(model, x, tmp_path / "nowhere" / "m.onnx")
    with pytest.raises(gp.ApplyError):  # verification fails after the file was staged: nothing is left
        gp.export_onnx(model, x, tmp_path / "m.onnx", fp32_tolerance=-1.0)
    assert os.listdir(tmp_path) == []


def test_pruning_the_same_model_twice():
    x = (torch.randn(2, 8),)
    once = gp.prune(_mlp(), x, passes=[ChannelPrune(0.5)])
    twice = gp.prune(once.module, x, passes=[ChannelPrune(0.5)])  # structured again: it shrinks again
    assert twice.module[0].out_features == 4 and once.module[0].out_features == 8
    masked = gp.prune(_mlp(), x, passes=[NMSparsity(2, 4, dense_heads=False)])
    with pytest.raises(gp.ContractError, match="stage 'masked'"):
        gp.prune(masked.module, x, passes=[NMSparsity(2, 4, dense_heads=False)])


@pytest.mark.parametrize(
    "passes",
    [[Explodes()], [ChannelPrune(0.5), Explodes()], [NMSparsity(2, 4, dense_heads=False), Quantize(), Explodes()]],
)
def test_a_failing_pass_leaves_the_callers_model_untouched(passes):
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        gp.prune(model, (torch.randn(2, 8),), passes=passes, calibration=[(torch.randn(4, 8),)])
    assert unchanged(model, before) and type(model[0]) is nn.Linear


# ------------------------------------------------------------------ ONNX files
def _small_onnx():
    from tests.test_onnx_prune import nhwc_model

    return nhwc_model()


@pytest.mark.parametrize("before", [0, 1, 2])
def test_a_failing_pass_leaves_the_callers_onnx_file_untouched(before, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_small_onnx(), str(path))
    original = path.read_bytes()
    passes = [ChannelPrune(0.5), NMSparsity(2, 4, dense_heads=False), Quantize()]
    with pytest.raises(RuntimeError, match="injected failure"):
        gp.prune_onnx(str(path), passes=passes[:before] + [Explodes()] + passes[before:])
    assert path.read_bytes() == original and sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_onnx_files_over_the_protobuf_limit_are_refused_before_parsing(tmp_path, monkeypatch):
    import graphprune.frontends.onnx.capture as onnx_capture

    path = tmp_path / "big.onnx"
    onnx.save(_small_onnx(), str(path))
    monkeypatch.setattr(onnx_capture, "MAX_PROTO_BYTES", path.stat().st_size - 1)  # as if over 2 GiB
    monkeypatch.setattr(onnx_capture.ir, "load", lambda *a, **k: pytest.fail("parsed before the size check"))
    with pytest.raises(gp.InputError, match="over 2 GiB cannot be parsed"):
        gp.prune_onnx(str(path), passes=[ChannelPrune(0.5)])


def test_onnx_files_that_cannot_be_read(tmp_path):
    with pytest.raises(gp.InputError, match="no such ONNX file"):
        gp.prune_onnx(str(tmp_path / "missing.onnx"), passes=[ChannelPrune(0.5)])
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 not a protobuf")
    with pytest.raises(gp.InputError, match="is not a readable ONNX model"):
        gp.prune_onnx(str(tmp_path / "junk.onnx"), passes=[ChannelPrune(0.5)])
    model = _small_onnx()
    onnx.save(
        model,
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(gp.InputError, match="ext.onnx.data.*missing"):
        gp.prune_onnx(str(tmp_path / "ext.onnx"), passes=[ChannelPrune(0.5)])
    model = _small_onnx()  # onnx.save converted the last one's tensors to external references
    model.opset_import[0].version = 99
    with pytest.raises(gp.InputError, match="uses opset 99"):
        gp.prune_onnx(model, passes=[ChannelPrune(0.5)])


@pytest.mark.slow
def test_quantized_onnx_models_are_refused(tmp_path):
    model = _mlp()  # seeded first: the same draws in every run
    x = (torch.randn(2, 8),)
    quantized = gp.prune(model, x, passes=[Quantize()], calibration=[x])
    quantized.export_onnx(tmp_path / "int8.onnx")
    with pytest.raises(gp.InputError, match="already quantized.*Prune the float model, then quantize"):
        gp.prune_onnx(str(tmp_path / "int8.onnx"), passes=[ChannelPrune(0.5)])


@pytest.mark.parametrize(
    "feed,match",
    [
        ({"input": np.zeros((2, 8, 8, 3), np.float32)}, r"missing inputs \['input_1:0'\], unknown inputs \['input'\]"),
        ({"input_1:0": np.zeros((2, 8, 8, 3), np.float64)}, "is float64, the model takes float32"),
        ({"input_1:0": np.zeros((2, 8, 3), np.float32)}, "has rank 3, the model takes rank 4"),
        ({"input_1:0": np.zeros((2, 8, 9, 3), np.float32)}, "size 9 in dim 2, the model fixes it to 8"),
        ({"input_1:0": np.full((2, 8, 8, 3), np.nan, np.float32)}, "contains NaN or Inf"),
        ((np.zeros((2, 8, 8, 3), np.float32),), "ONNX feeds are dicts"),
    ],
)
def test_onnx_calibration_feeds_are_checked(feed, match):
    with pytest.raises(gp.InputError, match=match):
        gp.prune_onnx(_small_onnx(), passes=[ChannelPrune(0.5)], calibration=[feed])


def test_onnx_model_given_is_not_modified():
    model = _small_onnx()
    before = model.SerializeToString()
    gp.prune_onnx(model, passes=[ChannelPrune(0.5)])
    assert model.SerializeToString() == before
