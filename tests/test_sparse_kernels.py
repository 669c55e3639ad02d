"""2:4 kernels: the reference compressed format, int8 with fused scales against the fake-quant
layer, and the conversion's CPU behaviour; the GPU timing path runs only where a GPU is lent."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune.passes import NMSparsity, Quantize
from graphprune.sparse_kernels import (compress_2to4, decompress_2to4, eligible, int8_sparse_linear, kernel_support,
                                       to_sparse_kernels)
from graphprune.sparsity import LINEAR, NMPattern, masked_weights, nm_mask, satisfies


def test_reference_format_by_hand():
    row = torch.tensor([[0.0, 3.0, 0.0, 5.0, 7.0, 0.0, 0.0, 0.0]])
    values, metadata = compress_2to4(row)
    assert values.tolist() == [[3.0, 5.0, 7.0, 0.0]]
    # group 0 keeps positions (1, 3): 1 | 3 << 2 = 13; group 1 keeps 0 and pads with its first zero, 1: 0 | 1 << 2 = 4
    assert metadata.tolist() == [[13 | 4 << 4]]
    assert torch.equal(decompress_2to4(values, metadata), row)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 8), groups=st.integers(1, 6), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.int8]))
def test_reference_format_round_trips(rows, groups, density, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, groups * 8, generator=g)
    dense = dense * nm_mask(dense.abs(), NMPattern(2, 4, LINEAR)) * (torch.rand(rows, groups * 8, generator=g) < density)
    dense = (dense * 50).to(dtype)
    values, metadata = compress_2to4(dense)
    assert values.shape == (rows, groups * 4) and metadata.dtype == torch.uint8 and metadata.shape == (rows, groups)
    positions = torch.stack([metadata & 3, (metadata >> 2) & 3, (metadata >> 4) & 3, metadata >> 6], -1)
    assert bool((positions[..., 0] < positions[..., 1]).all() and (positions[..., 2] < positions[..., 3]).all())
    assert torch.equal(decompress_2to4(values, metadata), dense)


def test_reference_format_refuses_what_it_cannot_hold():
    with pytest.raises(gp.InputError, match="more than 2 non-zeros"):
        compress_2to4(torch.ones(2, 8))
    with pytest.raises(gp.InputError, match="multiple of 8 columns"):
        compress_2to4(torch.zeros(2, 12))


def _quantized_24(in_features: int = 64, out_features: int = 32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, 8)).eval()
    x = torch.randn(4, 5, in_features)
    result = gp.prune(model, (x,), passes=[NMSparsity(2, 4), Quantize()], calibration=[(x,)])
    return result.module, x


def test_int8_layer_with_fused_scales_equals_the_fake_quant_layer():
    model, x = _quantized_24()
    layer = model[0]
    int8 = int8_sparse_linear(layer)
    assert int8.packed.dtype == torch.int8 and satisfies(int8.packed, NMPattern(2, 4, LINEAR))
    with torch.no_grad():
        want, got = layer(x), int8(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with pytest.raises(gp.InputError, match="backend"):
        int8_sparse_linear(layer, backend="tensorrt")


def test_eligibility_reasons():
    model, _ = _quantized_24(in_features=64, out_features=40)
    assert "not a multiple of 32x64" in eligible(model[0], torch.float16)
    assert eligible(nn.Linear(64, 32), torch.float16) == "no 2:4 mask along the input features"
    assert eligible(nn.Conv2d(4, 4, 1), torch.float16) == "not an nn.Linear"
    model, _ = _quantized_24(in_features=64, out_features=32)
    assert eligible(model[0], torch.float16) is None


def test_without_a_capable_gpu_the_dense_masked_module_comes_back_with_the_reason():
    if kernel_support() is None:
        pytest.skip("a capable GPU is present; the GPU path is tested in test_gpu_conversion")
    model, x = _quantized_24()
    converted, report = to_sparse_kernels(model, (x,))
    assert report.unavailable and "not used" in str(report)
    assert not masked_weights(converted) and masked_weights(model)  # masks baked in a copy only
    assert satisfies(converted[0].weight, NMPattern(2, 4, LINEAR))
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
    with pytest.raises(gp.InputError, match="fp16 or bf16"):
        to_sparse_kernels(model, (x,), dtype=torch.float32)


def test_gpu_conversion():
    reason = kernel_support()
    if reason is not None:
        pytest.skip(f"needs a GPU with sparse tensor cores: {reason}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).eval()
    x = torch.randn(8, 256, 1024)
    result = gp.prune(model, (x,), passes=[NMSparsity(2, 4, dense_heads=False)])
    converted, report = result.to_sparse_kernels()
    assert len(report.decisions) == 2
    with torch.no_grad():
        want = result.module.half().cuda()(x.half().cuda()).float()
        got = converted(x.half().cuda()).float()
    assert (got - want).abs().max() / want.abs().max() < 1e-2
