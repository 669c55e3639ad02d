"""N:M sparsity: layouts, criteria against references, masks that survive, contracts."""

from __future__ import annotations

from itertools import product

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

import graphprune as gp
from graphprune.algorithms.nm import CONV, CONV1D, LINEAR, NMPattern, nm_mask, satisfies
from graphprune.algorithms.permutation import retained, search
from graphprune.core.pipeline import Pass, PassResult, Stage
from graphprune.frontends.torch.masks import finalize, masked_weights
from graphprune.frontends.torch.state import CompressionState
from graphprune.passes import ChannelPrune, NMSparsity
from samples import resnet
from tests.architectures import build

PATTERNS = [(1, 2), (1, 4), (2, 4), (4, 8), (2, 8)]


def _reference_mask(matrix: torch.Tensor, n: int, m: int) -> torch.Tensor:
    keep = torch.zeros_like(matrix, dtype=torch.bool)
    for r, g in product(range(matrix.shape[0]), range(matrix.shape[1] // m)):
        block = matrix[r, g * m : (g + 1) * m]
        for i in sorted(range(m), key=lambda i: -float(block[i]))[:n]:
            keep[r, g * m + i] = True
    return keep


@pytest.mark.parametrize("n,m", PATTERNS)
def test_mask_matches_brute_force_in_every_layout(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    linear = torch.randn(6, 16, generator=g)
    assert torch.equal(nm_mask(linear, NMPattern(n, m, LINEAR)), _reference_mask(linear, n, m))
    conv1d = torch.randn(16, 6, generator=g)  # transformers Conv1D: [in, out]
    assert torch.equal(nm_mask(conv1d, NMPattern(n, m, CONV1D)).t(), _reference_mask(conv1d.t(), n, m))
    conv = torch.randn(5, 8, 3, 3, generator=g)  # [K, C, R, S]; groups run along C in (K, R, S, C)
    channel_last = conv.permute(0, 2, 3, 1).reshape(5, -1)
    got = nm_mask(conv, NMPattern(n, m, CONV)).permute(0, 2, 3, 1).reshape(5, -1)
    assert torch.equal(got, _reference_mask(channel_last, n, m))
    assert satisfies(conv * nm_mask(conv, NMPattern(n, m, CONV)), NMPattern(n, m, CONV))


class _Kinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 1, groups=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.odd = nn.Linear(16, 6)
        self.lin = nn.Linear(6, 8)  # 6 inputs: cannot hold a 4-wide group
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.dw(self.grouped(torch.relu(self.conv(torch.relu(self.stem(x))))))
        return self.head(torch.relu(self.lin(torch.relu(self.odd(y.mean((2, 3)))))))


@pytest.mark.parametrize("n,m", PATTERNS)
def test_pattern_holds_on_every_layer_kind_and_odd_shapes_are_skipped(n, m):
    torch.manual_seed(0)
    model, x = _Kinds().eval(), (torch.randn(2, 3, 8, 8),)
    result = gp.prune(model, x, passes=[NMSparsity(n, m)])
    masked = masked_weights(result.module)
    expect = (
        {"conv.weight", "odd.weight"}
        | ({"grouped.weight"} if 8 % m == 0 else set())
        | ({"lin.weight"} if 6 % m == 0 else set())
    )
    assert set(masked) == expect
    assert all(satisfies(t, p) for t, p in masked.values())
    dense = result.report.rows[0].details["dense layers"]
    assert "stem.weight: first convolution" in dense and "head.weight: output head" in dense
    assert "dw.weight: depthwise" in dense
    assert ("lin.weight: reduction width 6" in dense) == (6 % m != 0)
    assert result.module(*x).shape == (2, 3)


def test_gpt2_conv1d_and_wanda_follow_the_reference():
    model, inputs = build("gpt2")
    batches = [inputs, {"input_ids": torch.randint(0, 100, (2, 8))}]
    result = gp.prune(model, inputs, passes=[NMSparsity(2, 4, method="wanda")], calibration=batches)
    masked = masked_weights(result.module)
    assert "transformer.h.0.attn.c_attn.weight" in masked and "lm_head.weight" not in masked
    # reference for one layer: |W| * rms(input channel), top-2 of every 4 along the input dim
    xs = []
    hook = model.transformer.h[1].mlp.c_proj.register_forward_pre_hook(
        lambda mod, a: xs.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    rms = torch.cat(xs).pow(2).mean(0).sqrt()
    w = model.transformer.h[1].mlp.c_proj.weight.detach()  # [in, out]
    want = _reference_mask((w.abs() * rms[:, None]).t(), 2, 4).t()
    got = masked["transformer.h.1.mlp.c_proj.weight"][0] != 0
    assert torch.equal(got, want & (w != 0))


def test_masks_survive_training_and_finalize_bakes_them():
    model, x = resnet.build()
    result = gp.prune(model, x, passes=[NMSparsity(2, 4)])
    net = result.module.train()
    for opt in (
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.1),
    ):
        for _ in range(3):
            net(*x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert all(satisfies(t, p) for t, p in masked_weights(net).values())
    assert any("parametrizations" in k and k.endswith("mask") for k in net.state_dict())
    finalize(net)
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    assert satisfies(net.layers[0].conv1.weight, NMPattern(2, 4, CONV))


def test_structured_then_nm_masks_the_shrunk_tensors():
    model, x = resnet.build()
    result = gp.prune(model, x, passes=[ChannelPrune(0.5, round_to=8), NMSparsity(2, 4)])
    tensor, pattern = masked_weights(result.module)["layers.7.conv2.weight"]
    assert tensor.shape == (128, 128, 3, 3) and satisfies(tensor, pattern)
    assert result.stage is Stage.MASKED


def test_structured_after_masking_is_refused():
    model, x = resnet.build()
    with pytest.raises(gp.ContractError, match="ChannelPrune runs on a dense, structured model.*'masked'"):
        gp.prune(model, x, passes=[NMSparsity(2, 4), ChannelPrune(0.5)])


def test_a_pass_that_breaks_a_mask_is_caught():
    class Breaker(Pass):
        def call(self, state: CompressionState) -> PassResult:
            for module in state.model.modules():
                if parametrize.is_parametrized(module):
                    module.parametrizations.weight[0].mask.fill_(1.0)
                    module.parametrizations.weight.original.data.fill_(1.0)
            return PassResult(state, True)

    model, x = resnet.build()
    with pytest.raises(gp.PostconditionError, match="after Breaker, .* no longer follows its 2:4 pattern"):
        gp.prune(model, x, passes=[NMSparsity(2, 4), Breaker()])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=4, m=4), "0 < n < m"),
        (dict(n=0, m=4), "0 < n < m"),
        (dict(n=2.0, m=4), "0 < n < m"),
        (dict(method="random"), "must be one of"),
        (dict(damp=1.5), "damp"),
        (dict(block=2, m=4), "block >= m"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(gp.InputError, match=match):
        NMSparsity(**kwargs)


def test_wanda_needs_calibration_and_ignore_names_must_exist():
    model, x = resnet.build()
    with pytest.raises(gp.InputError, match="needs calibration data"):
        gp.prune(model, x, passes=[NMSparsity(method="wanda")])
    with pytest.raises(gp.InputError, match="no module named 'layer9'"):
        gp.prune(model, x, passes=[NMSparsity(ignore=["layer9"])])


# ------------------------------------------------------------------ SparseGPT
def test_sparsegpt_reconstructs_a_layer_better_than_magnitude():
    from graphprune.algorithms.sparsegpt import prune_matrix

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3  # correlated inputs
    w = torch.randn(32, 64, generator=g)
    hessian = 2 * x.T @ x / x.shape[0]
    for n, m in PATTERNS:
        pattern = NMPattern(n, m, LINEAR)
        updated, keep, _ = prune_matrix(w, hessian, pattern, block=32)
        assert satisfies(updated, pattern) and torch.equal(updated != 0, keep & (updated != 0))
        error = ((x @ (updated.float() - w).T) ** 2).mean()
        baseline = ((x @ (w * nm_mask(w.abs(), pattern) - w).T) ** 2).mean()
        assert error < baseline, (n, m)


def test_sparsegpt_on_every_layer_kind_keeps_the_pattern():
    torch.manual_seed(0)

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv1d(4, 8, 3, padding=1)
            self.c1 = nn.Conv1d(8, 8, 3, padding=2, dilation=2)
            self.grouped = nn.Conv1d(8, 16, 1, groups=2)
            self.fc = nn.Linear(16, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            y = self.grouped(torch.relu(self.c1(torch.relu(self.stem(x)))))
            return self.head(torch.relu(self.fc(y.mean(-1))))

    model, x = Mixed().eval(), (torch.randn(4, 4, 12),)
    result = gp.prune(
        model, x, passes=[NMSparsity(2, 4, method="sparsegpt")], calibration=[x, (torch.randn(4, 4, 12),)]
    )
    masked = masked_weights(result.module)
    assert set(masked) == {"c1.weight", "grouped.weight", "fc.weight"}
    assert all(satisfies(t, p) for t, p in masked.values())


def test_sparsegpt_beats_wanda_beats_magnitude_on_a_calibrated_mlp():
    torch.manual_seed(0)
    mix = torch.randn(32, 32)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    data = [(torch.randn(64, 32) @ mix * torch.linspace(0.1, 2.0, 32),) for _ in range(4)]
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        result = gp.prune(model, data[0], passes=[NMSparsity(2, 4, method=method, dense_heads=False)], calibration=data)
        errors[method] = result.report.rows[0].output_error
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_heads_are_final_layers_not_blocks_writing_the_residual_stream():
    model, inputs = build("bert")
    result = gp.prune(model, inputs, passes=[NMSparsity(2, 4)])
    masked = masked_weights(result.module)
    assert "encoder.layer.1.output.dense.weight" in masked  # writes the residual stream
    assert "pooler.dense.weight" not in masked  # its result is the pooler_output
    assert "pooler.dense.weight: output head" in result.report.rows[0].details["dense layers"]


# --------------------------------------------------------------- permutations


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8)]), st.integers(0, 1000))
def test_search_is_a_permutation_that_never_retains_less(rows, nm, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, m * 4, generator=g) * torch.rand(m * 4, generator=g)
    order = search(scores, n, m, sweeps=2)
    assert sorted(order.tolist()) == list(range(m * 4))
    assert retained(scores, order, n, m) >= retained(scores, torch.arange(m * 4), n, m) - 1e-6


@pytest.mark.parametrize("name", ["resnet_sample", "bert"])
def test_permuting_a_group_leaves_outputs_unchanged(name):
    from graphprune.frontends.torch.state import permute_channel_space
    from tests.oracles import outputs

    model, inputs = resnet.build() if name == "resnet_sample" else build("bert")
    analysis = gp.analyze(model, inputs)
    before = outputs(model, inputs)
    g = torch.Generator().manual_seed(0)
    for group in analysis.groups:
        permute_channel_space(model, analysis, group.leaf, torch.randperm(group.size, generator=g))
    for a, b in zip(outputs(model, inputs), before):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max())


def test_permute_keeps_the_pattern_and_reports_gains():
    model, x = resnet.build()
    result = gp.prune(model, x, passes=[NMSparsity(2, 4, permute=True, permute_sweeps=1)])
    assert all(satisfies(t, p) for t, p in masked_weights(result.module).values())
    assert "retained" in result.report.rows[0].details["permutations"]


def test_permutation_reverted_where_channel_order_matters():
    class Ordered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.cumsum(torch.relu(self.a(x)), dim=-1))  # prefix sums: order matters

    torch.manual_seed(0)
    model, x = Ordered().eval(), (torch.randn(4, 8),)
    result = gp.prune(model, x, passes=[NMSparsity(2, 4, permute=True, dense_heads=False)])
    assert "skipped: permuting changed the outputs" in result.report.rows[0].details["permutations"]


def test_sparsegpt_leaves_3d_convs_dense_and_says_why():
    model = nn.Sequential(
        nn.Conv3d(3, 8, 1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 2, 1)
    ).eval()
    x = (torch.randn(1, 3, 4, 4, 4),)
    result = gp.prune(model, x, passes=[NMSparsity(2, 4, method="sparsegpt")], calibration=[x])
    assert "2.weight: SparseGPT handles 1-D and 2-D convolutions" in result.report.rows[0].details["dense layers"]
    magnitude = gp.prune(model, x, passes=[NMSparsity(2, 4)])
    assert "2.weight" in masked_weights(magnitude.module)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_matmul_against_a_parameter_is_masked(method):
    import transformers as T

    cfg = T.FalconConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=100,
        new_decoder_architecture=False,
        multi_query=True,
    )
    torch.manual_seed(0)
    model = T.FalconForCausalLM(cfg).eval()  # FalconLinear computes x @ self.weight.T
    inputs = {"input_ids": torch.randint(0, 100, (2, 8))}
    result = gp.prune(model, inputs, passes=[NMSparsity(2, 4, method=method)], calibration=[inputs])
    masked = masked_weights(result.module)
    assert "transformer.h.0.mlp.dense_h_to_4h.weight" in masked and "lm_head.weight" not in masked
    assert all(satisfies(t, p) for t, p in masked.values())


def test_matmul_whose_module_input_is_another_tensor_is_refused_for_data_criteria():
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 16))
            self.inp = nn.Linear(4, 8)

        def forward(self, x):
            return torch.relu(self.inp(x)) @ self.w  # the module's input is x, not the matmul's input

    model = nn.Sequential(Gate(), nn.Linear(16, 2)).eval()
    x = (torch.randn(3, 4),)
    assert "0.w" in masked_weights(gp.prune(model, x, passes=[NMSparsity(2, 4)]).module)
    with pytest.raises(gp.InputError, match="whose first input is not that layer's activation"):
        gp.prune(model, x, passes=[NMSparsity(2, 4, method="wanda")], calibration=[x])


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama_gqa"])
def test_sparsegpt_block_by_block_equals_whole_forwards(name, monkeypatch):
    """In memory, SparseGPT reads each block's inputs by running that block alone on what the blocks
    before it computed (one forward's work in all); the masks and weights are those of running the
    whole model once per layer (the oracle: the same Hessians, summed in another order)."""
    from graphprune.frontends.torch.blocks import Blocks

    model, inputs = build(name)
    batches = [inputs, {k: v.roll(1, 0) if k == "input_ids" else v for k, v in inputs.items()}]
    passes = [NMSparsity(2, 4, method="sparsegpt", dense_heads=False)]
    assert Blocks(batches).chain_problem(model) is None
    chained = gp.prune(model, inputs, passes=passes, calibration=batches)
    monkeypatch.setattr(Blocks, "chain_problem", lambda self, model: "whole forwards, for the oracle")
    whole = gp.prune(model, inputs, passes=passes, calibration=batches)
    assert chained.report.rows[0].details["calibration"].startswith("block by block over ")
    assert whole.report.rows[0].details["calibration"].endswith("whole forwards, for the oracle")
    got, want = masked_weights(chained.module), masked_weights(whole.module)
    assert got.keys() == want.keys() and len(got) > 0
    for key, (weight, _) in want.items():
        assert torch.allclose(got[key][0], weight, rtol=1e-4, atol=1e-5 * float(weight.detach().abs().max())), key


def test_sparsegpt_on_a_model_without_blocks_runs_whole_forwards_and_says_why():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = (torch.randn(4, 8),)
    result = gp.prune(model, x, passes=[NMSparsity(2, 4, method="sparsegpt", dense_heads=False)], calibration=[x])
    assert result.report.rows[0].details["calibration"] == (
        "whole forwards, not block by block: Sequential has no nn.ModuleList of like blocks to run block by block"
    )
