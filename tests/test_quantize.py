"""Int8 quantization: scales against references, exact integer arithmetic, masks that survive,
the sparsity-then-quantization contract and its experimental escape hatch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune.algorithms.nm import CONV, CONV1D, LINEAR, NMPattern, nm_mask, satisfies
from graphprune.algorithms.number_formats import ACT_QMAX, ACT_QMIN, activation_qparams, weight_scales
from graphprune.algorithms.quant import QuantPlan, RangeObserver
from graphprune.frontends.torch.fake_quant import FakeQuantWeight, is_quantized
from graphprune.frontends.torch.folding import fold_batchnorm
from graphprune.frontends.torch.masks import finalize, masked_weights
from graphprune.frontends.torch.state import detect_stage
from graphprune.passes import ChannelPrune, NMSparsity, Quantize
from tests.architectures import build


class _Net(nn.Module):
    """conv-BN-ReLU, conv-ReLU, flatten, linear-ReLU, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.fc1, self.fc2 = nn.Linear(16 * 6 * 6, 32), nn.Linear(32, 10)
        g = torch.Generator().manual_seed(1)
        self.bn1.running_mean.uniform_(-0.5, 0.5, generator=g)
        self.bn1.running_var.uniform_(0.5, 2.0, generator=g)
        with torch.no_grad():
            self.bn1.weight.uniform_(0.5, 1.5, generator=g)
            self.bn1.bias.uniform_(-0.2, 0.2, generator=g)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _data(n: int = 4, batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 6, 6, generator=g) for _ in range(n)]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Net().eval()


# --- the arithmetic -------------------------------------------------------------------------------


def test_per_channel_scales_match_reference_in_every_layout():
    g = torch.Generator().manual_seed(0)
    linear, conv1d, conv = (
        torch.randn(5, 7, generator=g),
        torch.randn(7, 5, generator=g),
        torch.randn(4, 3, 2, 2, generator=g),
    )
    linear[2] = 0  # an all-zero channel still gets a valid (positive) scale
    for weight, axis in ((linear, 0), (conv1d, 1), (conv, 0)):
        want = [max(abs(float(v)) for v in weight.select(axis, c).flatten()) / 127 for c in range(weight.shape[axis])]
        want = [w if w > 0 else 1.0 for w in want]
        assert torch.allclose(weight_scales(weight, axis), torch.tensor(want), rtol=1e-6)


def test_activation_qparams_hold_zero_exactly_and_span_the_range():
    for low, high in ((-1.0, 3.0), (0.5, 2.0), (-4.0, -1.0), (0.0, 6.0), (0.0, 0.0)):
        scale, zp = activation_qparams(low, high)
        assert ACT_QMIN <= zp <= ACT_QMAX and scale > 0
        x = torch.tensor([min(low, 0.0), 0.0, max(high, 0.0)])
        fq = torch.fake_quantize_per_tensor_affine(x, scale, zp, ACT_QMIN, ACT_QMAX)
        assert fq[1] == 0  # zero is exact
        assert torch.allclose(fq, x, atol=scale / 2 + 1e-7)  # the ends are represented, not clipped
    assert activation_qparams(0.0, 6.0)[1] == ACT_QMIN  # a ReLU output uses the whole range above 0


def test_percentile_observer_ignores_rare_outliers_and_minmax_does_not():
    x = torch.linspace(-1, 1, 100_000)
    x[17] = 50.0
    minmax, pct = RangeObserver("minmax", 99.99), RangeObserver("percentile", 99.9)
    for part in x.chunk(4):
        minmax(part)
        pct(part)
    assert minmax.range() == (-1.0, 50.0)
    low, high = pct.range()  # the histogram's resolution is (51 / 2**14)
    assert 0.99 < high < 1.01 and -1.01 < low < -0.99
    assert RangeObserver("percentile", 100.0).range() == (0.0, 0.0)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    nm=st.sampled_from([(1, 2), (1, 4), (2, 4), (4, 8), (2, 8)]),
    layout=st.sampled_from([LINEAR, CONV1D, CONV]),
    seed=st.integers(0, 2**16),
)
def test_quantization_keeps_zeros_and_nm_patterns(rows, groups, nm, layout, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    shape = {LINEAR: (rows, groups * m), CONV1D: (groups * m, rows), CONV: (rows, groups * m, 2, 1)}[layout]
    weight = torch.randn(*shape, generator=g) * torch.rand(1, generator=g) * 10
    pattern = NMPattern(n, m, layout)
    weight = weight * nm_mask(weight.abs(), pattern)
    axis = 1 if layout == CONV1D else 0
    quantized = FakeQuantWeight(weight_scales(weight, axis), axis)(weight)
    assert bool((quantized[weight == 0] == 0).all())
    assert satisfies(quantized, pattern)
    scale = weight_scales(weight, axis).reshape([-1 if d == axis else 1 for d in range(weight.dim())])
    assert bool(((quantized - weight).abs() <= scale / 2 + 1e-6).all())  # rounding error at most half a step


def _int8_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Reference: integer arithmetic of a quantized linear layer, from its recorded parameters."""
    fq = layer.parametrizations.weight[-1]
    s_x, z_x = layer.qinput_scale.item(), layer.qinput_zero_point.item()
    q_x = torch.clamp(torch.round(x / s_x) + z_x, ACT_QMIN, ACT_QMAX).to(torch.int64)
    w = layer.parametrizations.weight.original.detach()
    q_w = torch.clamp(torch.round(w / fq.scale[:, None]), -127, 127).to(torch.int64)
    acc = (q_x - z_x) @ q_w.T  # exact int64 accumulation
    return acc.double() * (s_x * fq.scale.double()) + layer.bias.double()


def test_fake_quant_linear_matches_integer_arithmetic():
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = torch.randn(32, 24)
    result = gp.prune(model, (x,), passes=[Quantize(activations="minmax")], calibration=[x])
    q = result.module
    hidden = q[0](x)
    assert torch.allclose(hidden.double(), _int8_linear(x, q[0]), rtol=1e-5, atol=1e-5)
    hidden = torch.relu(hidden)
    assert torch.allclose(q[2](hidden).double(), _int8_linear(hidden, q[2]), rtol=1e-5, atol=1e-5)


def test_fake_quant_conv_matches_integer_arithmetic_with_requantized_output():
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)).eval()
    x = torch.randn(2, 4, 5, 5)
    q = gp.prune(conv, (x,), passes=[Quantize()], calibration=[x]).module[0]
    s_x, z_x = q.qinput_scale.item(), q.qinput_zero_point.item()
    fq = q.parametrizations.weight[-1]
    q_x = torch.clamp(torch.round(x / s_x) + z_x, ACT_QMIN, ACT_QMAX) - z_x
    q_w = torch.clamp(torch.round(q.parametrizations.weight.original / fq.scale[:, None, None, None]), -127, 127)
    acc = nn.functional.conv2d(q_x.double(), q_w.double(), padding=1)  # integers: exact in float64
    y = acc * (s_x * fq.scale.double()[None, :, None, None]) + q.bias.double()[None, :, None, None]
    s_y, z_y = q.qoutput_scale.item(), q.qoutput_zero_point.item()
    want = (torch.clamp(torch.round(y / s_y) + z_y, ACT_QMIN, ACT_QMAX) - z_y) * s_y
    got = q(x).double()
    off = (got - want).abs() > 1e-6  # a value exactly on a rounding boundary may round either way in float32
    assert off.float().mean() < 0.01 and bool(((got - want).abs() <= s_y + 1e-6).all())


# --- the pass -------------------------------------------------------------------------------------


def test_batchnorm_folding_is_exact_in_eval_mode():
    model = _net()
    x = _data(1)[0]
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, "conv1", "bn1")
    assert isinstance(folded.bn1, nn.Identity)
    assert torch.allclose(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_quantize_folds_bn_clips_relu_records_plan_and_stays_close():
    model, data = _net(), _data()
    before = copy.deepcopy(model.state_dict())
    result = gp.prune(model, (data[0],), passes=[Quantize()], calibration=data)
    q = result.module
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # caller's model untouched
    assert result.stage is gp.Stage.QUANTIZED and detect_stage(q) is gp.Stage.QUANTIZED
    assert isinstance(q.bn1, nn.Identity) and result.report.rows[0].details["folded BatchNorm"] == 1
    assert q.conv1.qoutput_zero_point.item() == ACT_QMIN  # ReLU after: the range starts at 0
    plan = result.plans[-1]
    assert isinstance(plan, QuantPlan) and set(plan.layers) == {
        "conv1.weight",
        "conv2.weight",
        "fc1.weight",
        "fc2.weight",
    }
    assert plan.layers["conv1.weight"].output is not None and plan.layers["fc1.weight"].output is None
    assert QuantPlan.from_json(plan.to_json()) == plan
    assert torch.allclose(
        torch.tensor(plan.layers["fc1.weight"].weight_scale), weight_scales(q.fc1.parametrizations.weight.original, 0)
    )
    x = _data(1, seed=9)[0]
    ref = model(x)
    assert (q(x) - ref).abs().max() / ref.abs().max() < 0.05
    assert 0 < result.report.rows[0].output_error < 0.05


def test_sparsity_then_quantization_keeps_patterns_and_finalize_keeps_quantization():
    model, data = _net(), _data()
    result = gp.prune(
        model,
        (data[0],),
        passes=[ChannelPrune(ratio=0.25), NMSparsity(2, 4, method="wanda"), Quantize()],
        calibration=data,
    )
    q = result.module
    masked = masked_weights(q)
    assert masked and all(satisfies(t, p) for t, p in masked.values())
    x = data[0]
    out = q(x)
    finalize(q)
    assert not masked_weights(q) and is_quantized(q)
    assert torch.equal(q(x), out)
    for name in masked:  # the baked weight still holds the pattern after quantization
        assert satisfies(q.get_submodule(name.rpartition(".")[0]).weight, NMPattern(2, 4, masked[name][1].layout))


def test_quantize_before_sparsity_is_refused_before_anything_runs():
    model = _net()
    with pytest.raises(gp.ContractError, match=r"(?s)NMSparsity.*'quantized'.*Harma et al.*experimental_order=True"):
        # the inputs do not even fit the model: the order is refused before capture is tried
        gp.prune(model, (torch.randn(1, 7),), passes=[Quantize(), NMSparsity(2, 4)], calibration=_data())
    with pytest.raises(gp.ContractError, match="ChannelPrune"):
        gp.prune(model, (torch.randn(1, 7),), passes=[Quantize(), ChannelPrune(ratio=0.5)], experimental_order=True)


def test_experimental_order_runs_and_the_report_says_so():
    model, data = _net(), _data()
    result = gp.prune(
        model, (data[0],), passes=[Quantize(), NMSparsity(2, 4)], calibration=data, experimental_order=True
    )
    assert result.stage is gp.Stage.QUANTIZED
    assert any("EXPERIMENTAL ORDER" in note and "NMSparsity" in note for note in result.report.notes)
    assert "experimental order" in result.report.rows[1].details
    assert "EXPERIMENTAL ORDER" in str(result.report) and result.report.to_dict()["notes"]
    masked = masked_weights(result.module)
    assert masked and all(satisfies(t, p) for t, p in masked.values())
    recipe = 'experimental_order = true\n[[pass]]\nname = "Quantize"\n[[pass]]\nname = "NMSparsity"\n'
    again = gp.prune(model, (data[0],), recipe=recipe, calibration=data)
    assert again.report.notes == result.report.notes


def test_stage_travels_with_the_model():
    model, data = _net(), _data()
    masked = gp.prune(model, (data[0],), passes=[NMSparsity(2, 4)]).module
    assert detect_stage(masked) is gp.Stage.MASKED
    with pytest.raises(gp.ContractError, match="stage 'masked'"):
        gp.prune(masked, (data[0],), passes=[NMSparsity(2, 4)])
    quantized = gp.prune(masked, (data[0],), passes=[Quantize()], calibration=data)
    assert quantized.stage is gp.Stage.QUANTIZED and masked_weights(quantized.module)
    with pytest.raises(gp.ContractError, match="stage 'quantized'"):
        gp.prune(quantized.module, (data[0],), passes=[Quantize()], calibration=data)


def test_skip_by_name_and_type_and_tied_weights_are_reported():
    model, data = _net(), _data()
    result = gp.prune(model, (data[0],), passes=[Quantize(skip=["fc2", nn.Conv2d])], calibration=data)
    floats = result.report.rows[0].details["float layers"]
    assert "fc2.weight: skipped by name" in floats and "conv1.weight: skipped by type (Conv2d)" in floats
    assert set(result.plans[-1].layers) == {"fc1.weight"}
    gpt2, inputs = build("gpt2")
    ids = inputs["input_ids"]
    result = gp.prune(gpt2, inputs, passes=[Quantize()], calibration=[{"input_ids": ids}])
    assert "lm_head.weight: weight shared with transformer.wte.weight" in result.report.rows[0].details["float layers"]
    assert len(result.plans[-1].layers) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 blocks


def test_bert_sparsegpt_then_int8_stays_close_to_dense():
    model, inputs = build("bert")
    calibration = [inputs] * 2
    result = gp.prune(model, inputs, passes=[NMSparsity(2, 4, method="sparsegpt"), Quantize()], calibration=calibration)
    dense_only = gp.prune(model, inputs, passes=[Quantize()], calibration=calibration)
    assert dense_only.report.rows[0].output_error < 0.05
    assert result.report.rows[-1].output_error < 0.5
    assert all(satisfies(t, p) for t, p in masked_weights(result.module).values())


@pytest.mark.parametrize(
    "options,match",
    [
        ({"dtype": "int2"}, "dtype must be one of"),
        ({"activations": "entropy"}, "activations must be one of"),
        ({"percentile": 30}, "percentile must be a number"),
        ({"percentile": True}, "percentile must be a number"),
        ({"skip": [3]}, "skip takes module names and nn.Module types"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(gp.InputError, match=match):
        Quantize(**options)


def test_missing_calibration_and_unknown_skip_name_are_refused():
    model, data = _net(), _data()
    with pytest.raises(gp.InputError, match="needs calibration data"):
        gp.prune(model, (data[0],), passes=[Quantize()])
    with pytest.raises(gp.InputError, match="no module named 'fc9'"):
        gp.prune(model, (data[0],), passes=[Quantize(skip=["fc9"])], calibration=data)
    with pytest.raises(gp.InputError, match="unknown top-level key"):
        gp.load_recipe('experimental = true\n[[pass]]\nname = "Quantize"\n')


def test_a_tied_weight_under_nm_masks_is_still_found_shared():
    """Quantizing one user of a tied weight would change the other: the tie is found through the
    masks' parametrizations too (they compute a new tensor on every read)."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + x

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    result = gp.prune(Tied().eval(), (x,), passes=[NMSparsity(2, 4, dense_heads=False), Quantize()], calibration=[(x,)])
    floats = result.report.rows[1].details["float layers"]
    assert "b.weight: weight shared with a.weight" in floats
    assert not {"a.weight", "b.weight"} & set(result.plans[-1].layers)


def test_a_model_masked_in_an_earlier_run_has_its_layers_quantized():
    """Regression: a model given back to gp.prune with its N:M masks was captured with each masked
    weight as a product with its mask, which hid every masked layer from Quantize (none quantized)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    data = [(torch.randn(16, 32),) for _ in range(2)]
    masked = gp.prune(model, data[0], passes=[NMSparsity(2, 4, dense_heads=False)]).module
    quantized = gp.prune(masked, data[0], passes=[Quantize()], calibration=data)
    assert quantized.report.rows[-1].details["quantized layers"] == 3
    assert is_quantized(quantized.module) and len(masked_weights(quantized.module)) == 3
