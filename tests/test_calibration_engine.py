"""The calibration engine's numerics, devices and report (issue 21): SparseGPT solves in float32
with a float64 retry, every tensor a data-driven pass creates lives where the data it belongs to
lives, and the report gives each data-driven pass's calibration rate."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.algorithms.nm import LINEAR, NMPattern, satisfies
from graphprune.algorithms.sparsegpt import PRECISIONS, Unfactorable, prune_matrix, sparsegpt_layers
from graphprune.passes import ChannelPrune, NMSparsity, Quantize

PATTERN = NMPattern(2, 4, LINEAR)


def _correlated(seed: int, rows: int = 2048, cols: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) @ torch.randn(
        cols, cols, generator=g, dtype=torch.float64
    )


def _layer_error(x: torch.Tensor, w: torch.Tensor, new: torch.Tensor) -> float:
    return float(((x @ (new.double() - w.double()).T) ** 2).mean())


def test_float32_solves_match_float64_ones():
    x = _correlated(0)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    hessian = 2 * x.T @ x / x.shape[0]
    new32, keep32, used32 = prune_matrix(w, hessian.float(), PATTERN)
    new64, keep64, used64 = prune_matrix(w, hessian, PATTERN, precision="float64")
    assert (used32, used64) == ("float32", "float64")
    assert new32.dtype == torch.float32 and new64.dtype == torch.float64
    assert satisfies(new32, PATTERN) and satisfies(new64, PATTERN)
    assert (keep32 == keep64).float().mean() > 0.98  # near-ties may go either way
    error32, error64 = _layer_error(x, w, new32), _layer_error(x, w, new64)
    assert abs(error32 - error64) <= 0.01 * error64, (error32, error64)


def test_a_float32_cholesky_failure_is_solved_again_in_float64():
    a = _correlated(2, cols=32)
    g = torch.Generator().manual_seed(3)
    dependent = a @ torch.randn(32, 32, generator=g, dtype=torch.float64) + 1e-5 * torch.randn(
        a.shape, generator=g, dtype=torch.float64
    )
    x = torch.cat([a, dependent], 1)  # positive definite, but not at float32's resolution
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(16, 64, generator=g)
    new, keep, used = prune_matrix(w, hessian, PATTERN, damp=0.0)
    assert used == "float64" and satisfies(new, PATTERN) and bool(torch.isfinite(new).all())
    reference, _, _ = prune_matrix(w, hessian, PATTERN, damp=0.0, precision="float64")
    assert torch.equal(new, reference)  # the retry is the float64 solve
    with pytest.raises(Unfactorable, match=r"raise damp \(now 0.0\)"):
        prune_matrix(w, hessian.float(), PATTERN, damp=0.0)  # the float32 sums lost what float64 needs


def test_nm_sparsity_reports_float64_retries_and_refuses_unknown_precisions():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(256, 8, generator=g)
    x = torch.cat([base, base @ torch.randn(8, 8, generator=g) + 1e-4 * torch.randn(256, 8, generator=g)], 1)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    result = gp.prune(model, (x,), passes=[NMSparsity(method="sparsegpt", damp=0.0)], calibration=[(x,)])
    details = result.report.rows[0].details
    assert details["float64 retries"].startswith("1 layers") and "0.weight" in details["float64 retries"]
    forced = gp.prune(
        model, (x,), passes=[NMSparsity(method="sparsegpt", damp=0.0, precision="float64")], calibration=[(x,)]
    )
    assert "float64 retries" not in forced.report.rows[0].details
    with pytest.raises(gp.InputError, match="precision must be one of"):
        NMSparsity(precision="bfloat16")


# A data-driven pass run with torch's default device set to meta: a tensor it creates without
# naming the device of the data it belongs to lands on meta and meets a CPU tensor, which fails.
DEVICE_PIPELINES = {
    "wanda": lambda: [NMSparsity(method="wanda", dense_heads=False)],
    "sparsegpt": lambda: [NMSparsity(method="sparsegpt", dense_heads=False)],
    "sparsegpt float64": lambda: [NMSparsity(method="sparsegpt", precision="float64")],
    "activation + bias": lambda: [ChannelPrune(0.5, importance="activation", compensate="bias")],
    "fluctuation + reconstruct": lambda: [ChannelPrune(0.5, importance="fluctuation", compensate="reconstruct")],
    "taylor": lambda: [ChannelPrune(0.5, importance="taylor", loss_fn=lambda out, batch: out.pow(2).mean())],
    "int8 minmax": lambda: [Quantize(activations="minmax")],
    "int8 percentile": lambda: [Quantize(activations="percentile")],
}


@pytest.mark.parametrize("name", sorted(DEVICE_PIPELINES))
def test_data_driven_passes_create_their_tensors_on_the_data_device(name, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    x = torch.randn(8, 16)
    passes = DEVICE_PIPELINES[name]()
    expected = gp.prune(model, (x,), passes=DEVICE_PIPELINES[name](), calibration=[(x,), (x * 0.5,)]).module(x)
    for cls in {type(p) for p in passes}:
        call = cls.call

        def on_meta(self, state, call=call):
            state.analysis()  # the channel analysis is the model's structure, made before the pass
            with torch.device("meta"):
                return call(self, state)

        monkeypatch.setattr(cls, "call", on_meta)
    result = gp.prune(model, (x,), passes=passes, calibration=[(x,), (x * 0.5,)])
    assert torch.equal(result.module(x), expected)


def test_the_report_gives_the_calibration_rate_in_tokens_or_samples():
    tokens = torch.randint(0, 50, (4, 12))
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    result = gp.prune(model, (tokens,), passes=[NMSparsity(method="wanda")], calibration=[(tokens,), (tokens,)])
    assert result.report.rows[0].details["calibration rate"].startswith("96 tokens in ")
    images = torch.randn(3, 3, 8, 8)
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    result = gp.prune(convnet, (images,), passes=[ChannelPrune(0.5, importance="activation")], calibration=[(images,)])
    assert result.report.rows[0].details["calibration rate"].startswith("3 samples in ")
    result = gp.prune(convnet, (images,), passes=[ChannelPrune(0.5)], calibration=[(images,)])
    assert "calibration rate" not in result.report.rows[0].details  # magnitude reads no data


@pytest.mark.cuda
def test_a_model_on_the_gpu_is_calibrated_there_from_cpu_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(32, 64)
    on_cpu = gp.prune(model, (x,), passes=[NMSparsity(method="sparsegpt")], calibration=[(x,)])
    gpu_model = model.to("cuda")
    on_gpu = gp.prune(gpu_model, (x.cuda(),), passes=[NMSparsity(method="sparsegpt")], calibration=[(x,)])
    assert all(p.device.type == "cuda" for p in on_gpu.module.parameters())
    assert torch.allclose(on_gpu.module(x.cuda()).cpu(), on_cpu.module(x), atol=1e-3, rtol=1e-3)


def test_a_hessian_spent_by_a_failed_solve_is_accumulated_again_in_float64(monkeypatch):
    """The last layer of a group solves in the Hessian's own memory: where the second factorisation
    fails there, the sums are gone, so the group's Hessian is accumulated again in float64."""
    cholesky_ex = torch.linalg.cholesky_ex

    def second_fails_in_float32(h, *, upper=False):
        factor, info = cholesky_ex(h, upper=upper)
        return (factor, torch.ones_like(info)) if upper and h.dtype == torch.float32 else (factor, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", second_fails_in_float32)
    x = _correlated(5, rows=512, cols=16)
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(6))
    asked, written = [], {}

    class Layer:
        weight, layout = "w", LINEAR

    def hessians(layer, precision):
        asked.append(precision)
        return [(2 * x.T @ x / x.shape[0]).to(PRECISIONS[precision])]

    retried = sparsegpt_layers(
        [[Layer()]],
        hessians,
        lambda layer: weight,
        lambda layer, new, keep: written.update(new=new),
        lambda layer: PATTERN,
        block=128,
        damp=0.01,
    )
    assert asked == ["float32", "float64"] and retried == ["w"]
    expected, _, _ = prune_matrix(weight, 2 * x.T @ x / x.shape[0], PATTERN, precision="float64")
    assert torch.allclose(written["new"], expected.float())
