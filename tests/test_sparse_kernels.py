"""2:4 kernels: the reference compressed format, int8 with fused scales against the fake-quant
layer, and the conversion's CPU behaviour; the GPU timing path runs only where a GPU is lent."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune.algorithms.nm import LINEAR, NMPattern, nm_mask, satisfies
from graphprune.emit.sparse_kernels import (
    Int8SparseLinear,
    SemiStructuredLinear,
    compress_2to4,
    decompress_2to4,
    eligible,
    int8_sparse_linear,
    kernel_support,
    shape_constraint,
    to_sparse_kernels,
)
from graphprune.frontends.torch.copying import clone
from graphprune.frontends.torch.masks import masked_weights
from graphprune.passes import NMSparsity, Quantize


def test_reference_format_by_hand():
    row = torch.tensor([[0.0, 3.0, 0.0, 5.0, 7.0, 0.0, 0.0, 0.0]])
    values, metadata = compress_2to4(row)
    assert values.tolist() == [[3.0, 5.0, 7.0, 0.0]]
    # group 0 keeps positions (1, 3): 1 | 3 << 2 = 13; group 1 keeps 0 and pads with its first zero, 1: 0 | 1 << 2 = 4
    assert metadata.tolist() == [[13 | 4 << 4]]
    assert torch.equal(decompress_2to4(values, metadata), row)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 8),
    groups=st.integers(1, 6),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int8]),
)
def test_reference_format_round_trips(rows, groups, density, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, groups * 8, generator=g)
    dense = (
        dense * nm_mask(dense.abs(), NMPattern(2, 4, LINEAR)) * (torch.rand(rows, groups * 8, generator=g) < density)
    )
    dense = (dense * 50).to(dtype)
    values, metadata = compress_2to4(dense)
    assert values.shape == (rows, groups * 4) and metadata.dtype == torch.uint8 and metadata.shape == (rows, groups)
    positions = torch.stack([metadata & 3, (metadata >> 2) & 3, (metadata >> 4) & 3, metadata >> 6], -1)
    assert bool((positions[..., 0] < positions[..., 1]).all() and (positions[..., 2] < positions[..., 3]).all())
    assert torch.equal(decompress_2to4(values, metadata), dense)


@pytest.mark.parametrize(
    "dtype, rows, cols", [(torch.float16, 32, 64), (torch.bfloat16, 64, 128), (torch.int8, 16, 128)]
)
def test_reference_format_matches_the_cutlass_layout_pytorch_builds(dtype, rows, cols):
    """PyTorch's own (CPU-runnable) converter to the CUTLASS layout keeps the same values, and its
    metadata, once the documented interleaving is undone, holds the same nibbles.  Every group is
    full here: for groups with fewer than two non-zeros, which zero pads the pair is free (both
    formats decompress to the same matrix, tested above)."""
    from torch.sparse._semi_structured_conversions import (
        _calculate_meta_reordering_scatter_offsets,
        sparse_semi_structured_from_dense_cutlass,
    )

    g = torch.Generator().manual_seed(rows + cols)
    dense = torch.randn(rows, cols, generator=g) + 0.01  # no exact zeros: every group keeps 2
    dense = (dense * nm_mask(dense.abs(), NMPattern(2, 4, LINEAR)) * 50).to(dtype)
    values, metadata = compress_2to4(dense)
    packed, meta_reordered = sparse_semi_structured_from_dense_cutlass(dense)
    assert torch.equal(values, packed)
    offsets = _calculate_meta_reordering_scatter_offsets(rows, meta_reordered.shape[1], meta_reordered.dtype, "cpu")
    assert torch.equal(metadata.view(meta_reordered.dtype).reshape(-1), meta_reordered.reshape(-1)[offsets])


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
    assert got.shape == want.shape and got.is_contiguous()  # row-major, though the product comes out transposed
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with pytest.raises(gp.InputError, match="backend"):
        int8_sparse_linear(layer, backend="tensorrt")


def test_eligibility_reasons():
    model, _ = _quantized_24(in_features=64, out_features=40)
    rows, cols = shape_constraint(torch.float16)  # the backend's: CUTLASS here, cuSPARSELt where a GPU has it
    assert 40 % rows and f"shape 40x64 is not a multiple of {rows}x{cols}" in eligible(model[0], torch.float16)
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
    with pytest.raises(gp.InputError, match="choose must be"):
        to_sparse_kernels(model, (x,), choose="fastest")
    with pytest.raises(gp.InputError, match="timing must be"):
        to_sparse_kernels(model, (x,), timing="compiled")


needs_sparse_gpu = pytest.mark.gpu  # tests/conftest.py skips these without a GPU with sparse tensor cores


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _masked_mlp(features: int, hidden: int, lead: tuple[int, ...]) -> tuple[gp.PruneResult, torch.Tensor]:
    """A two-layer MLP with both linears 2:4-masked, and an input of ``lead`` tokens."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, features)).eval()
    x = torch.randn(*lead, features)
    return gp.prune(model, (x,), passes=[NMSparsity(2, 4, dense_heads=False)]), x


@needs_sparse_gpu
def test_gpu_conversion():
    result, x = _masked_mlp(1024, 1024, (8, 256))
    converted, report = result.to_sparse_kernels()
    assert [d.layer for d in report.decisions] == ["0", "2"] and all(
        d.dense_ms and d.sparse_ms for d in report.decisions
    )
    for decision in report.decisions:
        layer = converted.get_submodule(decision.layer)
        assert isinstance(layer, SemiStructuredLinear) == (decision.choice == "sparse")
    with torch.no_grad():
        want = gp.finalize(clone(result.module)).half().cuda()(x.half().cuda())
        got = converted(x.half().cuda())
    assert _relative_error(got, want) < 2e-3
    # bf16 runs the same kernels (forced here, so that the kernel itself is exercised)
    bf16, _ = result.to_sparse_kernels(dtype=torch.bfloat16, choose="sparse")
    with torch.no_grad():
        want16 = gp.finalize(clone(result.module)).bfloat16().cuda()(x.bfloat16().cuda())
        assert isinstance(bf16[0], SemiStructuredLinear) and _relative_error(bf16(x.bfloat16().cuda()), want16) < 1e-2
    # the timings of the first call are reused: nothing is timed again
    _, again = result.to_sparse_kernels(timings=report.timings)
    assert again.timings == report.timings and [d.choice for d in again.decisions] == [
        d.choice for d in report.decisions
    ]


@needs_sparse_gpu
def test_gpu_kernel_keeps_the_entries_the_reference_keeps():
    torch.manual_seed(1)
    from torch.sparse import to_sparse_semi_structured

    dense = torch.randn(128, 256, dtype=torch.float16, device="cuda")
    dense = dense * nm_mask(dense.abs().float(), NMPattern(2, 4, LINEAR))
    values, metadata = compress_2to4(dense.cpu())
    sparse = to_sparse_semi_structured(dense)
    assert torch.equal(sparse.to_dense().cpu(), decompress_2to4(values, metadata))
    x = torch.randn(256, 64, dtype=torch.float16, device="cuda")
    assert (
        _relative_error(torch.mm(sparse, x).cpu(), decompress_2to4(values, metadata).double() @ x.cpu().double()) < 2e-3
    )


@needs_sparse_gpu
def test_gpu_int8_kernel_with_fused_scales_equals_the_exact_integer_reference():
    if not torch.backends.cusparselt.is_available():
        pytest.skip("this PyTorch build has no cuSPARSELt")
    model, x = _quantized_24(in_features=256, out_features=128)
    layer = model[0]
    reference, kernel = int8_sparse_linear(layer), int8_sparse_linear(layer, "cusparselt", out_dtype=torch.float16)
    x = torch.randn(64, 256).half().float()  # fp16-exact, so both layers quantize the same input
    with torch.no_grad():
        want = reference(x)
        got = kernel(x.cuda().half())
    assert got.dtype == torch.float16
    assert _relative_error(got.cpu(), want) < 2e-3  # fp16 output rounding only: the integer product is exact


@needs_sparse_gpu
def test_gpu_int8_conversion_of_a_whole_model():
    if not torch.backends.cusparselt.is_available():
        pytest.skip("this PyTorch build has no cuSPARSELt")
    model, x = _quantized_24(in_features=256, out_features=128)
    converted, report = to_sparse_kernels(model, (x,), choose="sparse")
    assert [d.choice for d in report.decisions] == ["sparse"] and isinstance(converted[0], Int8SparseLinear)
    assert "asked for" in report.decisions[0].reason and not report.timings
    x = x.half().float()  # fp16-exact, so both quantize the same input
    with torch.no_grad():
        assert _relative_error(converted[0](x.cuda().half()).cpu(), model[0](x)) < 2e-3
        want, got = model(x), converted(x.cuda().half()).cpu()
    # the head (8 outputs, no 2:4 mask) is a plain fp16 layer in the converted module, fake-quantized in the model
    assert got.shape == want.shape and _relative_error(got, want) < 5e-2


@needs_sparse_gpu
def test_gpu_graph_timing_decides_for_graph_replay_and_the_result_replays_in_a_graph():
    from graphprune.emit.sparse_kernels import captured

    result, x = _masked_mlp(2048, 4096, (4, 64))
    converted, report = result.to_sparse_kernels(timing="graph")
    assert all("timed graph" in d.reason for d in report.decisions)
    forced, _ = result.to_sparse_kernels(choose="sparse")
    with torch.no_grad():  # every converted layer hands on a row-major result (see SemiStructuredLinear)
        assert isinstance(forced[0], SemiStructuredLinear) and forced[0](x.half().cuda()).is_contiguous()
    assert {key[-1] for key in report.timings} == {"graph"}
    xh = x.half().cuda()
    with torch.no_grad():
        eager = converted(xh).clone()
        out = torch.empty_like(eager)
        replay = captured(lambda: out.copy_(converted(xh)))
        out.fill_(float("nan"))
        replay()
    assert torch.equal(out, eager)
