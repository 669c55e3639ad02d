"""The sparsity roofline: op counts against hand counts, the time model against its formula, and
what it must predict (monotone in removed channels; no gain from 2:4 math where memory binds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.core.costs import Format, OpCost
from graphprune.emit import devices
from graphprune.emit.devices import Device
from graphprune.emit.roofline import op_time
from graphprune.frontends.torch.capture import capture
from graphprune.frontends.torch.costs import graph_costs
from graphprune.passes import ChannelPrune, NMSparsity, Quantize
from samples.resnet import ResNet

# round numbers, so times can be checked by hand: 1 TFLOP/s dense, 2 with 2:4, 100 GB/s
TOY = Device(name="toy", bandwidth=100e9, dense={"fp32": 1e12, "int8": 4e12}, sparse={"fp32": 2e12, "int8": 8e12})


class EveryKind(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 32)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.linear(x)  # [4, 6, 32]
        heads = h.reshape(4, 6, 4, 8).transpose(1, 2)  # views: no rows
        attended = F.scaled_dot_product_attention(heads, heads, heads)
        scores = h @ h.transpose(1, 2)  # [4, 6, 6], two activations
        return attended + 1.0, scores, self.conv(image)


def test_op_counts_are_the_hand_counts():
    model = EveryKind().eval()
    rows = {r.op: r for r in graph_costs(capture(model, (torch.randn(4, 6, 16), torch.randn(2, 3, 8, 8))))}
    assert set(rows) == {"aten.linear", "aten.scaled_dot_product_attention", "aten.matmul", "aten.add", "aten.conv2d"}
    linear = rows["aten.linear"]
    assert (linear.key, linear.weight, linear.macs) == ("linear.weight", "linear.weight", 4 * 6 * 32 * 16)
    assert (linear.weight_elements, linear.parameter_elements) == (32 * 16, 32)
    assert (linear.input_elements, linear.output_elements) == (4 * 6 * 16, 4 * 6 * 32)
    sdpa = rows["aten.scaled_dot_product_attention"]  # q k^T and the product with v, 4 heads of 8
    assert sdpa.weight is None and sdpa.macs == 2 * (4 * 4 * 6 * 6 * 8)
    assert sdpa.input_elements == 4 * 4 * 6 * 8 and sdpa.output_elements == 4 * 4 * 6 * 8  # one tensor, read once
    matmul = rows["aten.matmul"]
    assert matmul.macs == 4 * 6 * 6 * 32 and matmul.input_elements == 2 * 4 * 6 * 32
    add = rows["aten.add"]
    assert (add.macs, add.input_elements, add.output_elements) == (0, 4 * 4 * 6 * 8, 4 * 4 * 6 * 8)
    conv = rows["aten.conv2d"]
    assert conv.macs == 2 * 8 * 8 * 8 * 3 * 9 and conv.weight_elements == 8 * 3 * 9 and conv.parameter_elements == 8
    assert (conv.input_elements, conv.output_elements) == (2 * 3 * 64, 2 * 8 * 64)


def test_op_time_is_the_roofline_formula():
    layer = OpCost(
        key="w",
        op="aten.linear",
        macs=10**9,
        weight="w",
        weight_elements=10**6,
        parameter_elements=0,
        input_elements=10**5,
        output_elements=10**5,
    )
    dense = op_time(layer, Format("fp32", "fp32"), TOY)
    assert dense.flops == 2e9 and dense.bytes == 4 * (10**6 + 2 * 10**5)
    assert dense.seconds == pytest.approx(2e-3) and dense.bound == "compute"
    sparse = op_time(layer, Format("fp32", "fp32", (2, 4)), TOY)  # half the weight, a 2-bit index per kept value
    assert sparse.sparse_math and sparse.bytes == 4 * 10**6 / 2 + 10**6 / 2 / 4 + 4 * 2 * 10**5
    assert sparse.seconds == pytest.approx(1e-3) and sparse.format == "2:4 fp32"
    int8 = op_time(layer, Format("int8", "int8"), TOY, scale=2.0)  # twice the batch
    assert int8.flops == 4e9 and int8.bytes == 10**6 + 4 * 10**5 and int8.seconds == pytest.approx(1e-3)
    masked_on_cpu = op_time(layer, Format("fp32", "fp32", (2, 4)), Device("cpu", 100e9, {"fp32": 1e12}))
    assert masked_on_cpu == dense  # no sparse math: the masked layer runs dense, stored dense
    assert op_time(layer, Format("fp32", "fp32", (4, 8)), TOY) == dense  # only 2:4 has sparse tensor cores


@pytest.mark.slow
def test_the_model_itself_predicts_no_change_and_pruning_more_is_faster():
    model, x = ResNet().eval(), (torch.randn(2, 3, 32, 32),)
    same = gp.roofline(model, x, device=TOY)
    assert same.speedup == 1.0 and same.dense_seconds > 0
    times = [gp.roofline(gp.prune(model, x, passes=[ChannelPrune(r)]), device=TOY) for r in (0.25, 0.75)]
    assert all(t.dense_seconds == pytest.approx(same.dense_seconds) for t in times)
    assert times[0].compressed_seconds > times[1].compressed_seconds
    assert 1.0 < times[0].speedup < times[1].speedup
    for pruned in times:  # per layer too: no layer slower for losing channels
        assert all(r.speedup >= 1.0 for r in pruned.weight_rows())


def test_two_four_pays_where_math_binds_and_not_where_activations_do():
    """A big linear on many tokens is compute-bound: 2:4 math halves it.  A 1x1 conv with four
    channels on a large image moves activations, not weights: 2:4 gains nothing there."""
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Flatten(2), nn.Linear(64 * 64, 1024)).eval()
    x = (torch.randn(2, 4, 64, 64),)
    result = gp.prune(model, x, passes=[NMSparsity(2, 4, dense_first_conv=False, dense_heads=False)])
    assert set(result.masks) == {"0.weight", "2.weight"}
    predicted = gp.roofline(result, device="h100", precision="fp16", batch=1024)  # 4096 rows into the linear
    rows = {r.key: r for r in predicted.weight_rows()}
    conv, linear = rows["0.weight"], rows["2.weight"]
    assert conv.dense.bound == "memory" and conv.compressed.sparse_math
    assert conv.speedup == pytest.approx(1.0, abs=1e-3)
    assert linear.dense.bound == "compute" and linear.speedup == pytest.approx(2.0, rel=0.01)


def test_int8_and_batch_and_a_table_and_a_plot(tmp_path):
    model, x = ResNet().eval(), (torch.randn(2, 3, 32, 32),)
    batches = [(torch.randn(8, 3, 32, 32),)]
    result = gp.prune(model, x, passes=[NMSparsity(2, 4), Quantize("int8")], calibration=batches)
    rl = gp.roofline(result, device=TOY, batch=16)
    assert rl.batch == 16 and rl.speedup > 1.0
    assert all((r.compressed.format == "2:4 int8") == (r.key in result.masks) for r in rl.weight_rows())
    assert {r.compressed.format for r in rl.weight_rows()} == {"2:4 int8", "int8"}  # the stem and head stay dense
    bigger = gp.roofline(result, device=TOY, batch=32)
    assert bigger.dense_seconds > rl.dense_seconds
    table = rl.table(top=3)
    assert "2:4 int8" in table and "more layers" in table and f"({rl.speedup:.2f}x)" in table
    assert rl.to_dict()["speedup"] == rl.speedup
    path = rl.plot(str(tmp_path / "roofline.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_devices_formats_and_arguments_are_named():
    model, x = nn.Linear(8, 8).eval(), (torch.randn(2, 8),)
    with pytest.raises(gp.InputError, match=r"unknown device 'v100': known are cpu .*a100.*h100"):
        gp.roofline(model, x, device="v100")
    with pytest.raises(gp.InputError, match="has no fp8 rate: it has fp32, tf32"):
        gp.roofline(model, x, device="a100", precision="fp8")
    with pytest.raises(gp.InputError, match="a module needs example inputs"):
        gp.roofline(model)
    with pytest.raises(gp.InputError, match="batch must be a positive integer"):
        gp.roofline(model, x, device=TOY, batch=0)


def test_the_cpu_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(devices, "_gemm_rate", lambda kind, threads: calls.append(kind) or 1e11)
    monkeypatch.setattr(devices, "_copy_bandwidth", lambda: 1e10)
    first = devices.device("cpu")
    assert first.dense == {"fp32": 1e11, "int8": 1e11} and first.bandwidth == 1e10 and calls == ["fp32", "int8"]
    assert devices.device("cpu") == first and len(calls) == 2  # read back from the cache
    assert devices.device("cpu", refresh=True) == first and len(calls) == 4
    (tmp_path / "device-peaks.json").write_text("{not json")
    assert devices.device("cpu") == first and len(calls) == 6  # a damaged cache is measured again
    assert math.isfinite(gp.roofline(nn.Linear(8, 8), (torch.randn(2, 8),)).speedup)


@pytest.mark.slow
def test_the_command_line_predicts_what_the_api_does(tmp_path):
    from samples.resnet import build
    from tests.command_line import run

    chart = tmp_path / "roofline.png"
    args = ["samples.resnet:build", "--channels", "0.5", "--nm", "2:4", "--device", "h100", "--batch", "16"]
    result = run("roofline", *args, "--plot", str(chart), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    model, x = build()
    expected = gp.roofline(gp.prune(model, x, [ChannelPrune(0.5), NMSparsity(2, 4)]), device="h100", batch=16)
    assert summary["speedup"] == pytest.approx(expected.speedup) and summary["batch"] == 16
    assert chart.read_bytes()[:4] == b"\x89PNG"
    printed = run("roofline", "samples.resnet:build", "--device", "a100", "--top", "2")
    assert printed.returncode == 0 and "(1.00x)" in printed.stdout and "more layers" in printed.stdout
    unknown = run("roofline", "samples.resnet:build", "--device", "tpu")
    assert unknown.returncode == 2 and "known are cpu" in unknown.stderr
    again = run("roofline", *args, "--plot", str(chart))
    assert again.returncode == 0  # a chart graphprune wrote is replaced
    chart.write_text("mine")
    refused = run("roofline", *args, "--plot", str(chart))
    assert refused.returncode == 2 and chart.read_text() == "mine"


def test_gpus_are_found_by_their_cuda_names_and_sparse_kernel_reports_carry_the_prediction():
    from graphprune.emit.roofline import linear_cost, two_four_speedup
    from graphprune.emit.sparse_kernels import KernelDecision, SparseKernelReport

    named = {n: devices.for_gpu(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S")}
    assert named["NVIDIA H100 80GB HBM3"] is devices.DEVICES["h100"]
    assert named["NVIDIA A100-SXM4-80GB"] is devices.DEVICES["a100"] and named["NVIDIA L40S"] is None  # not the L4
    big, small = linear_cost(4096, 4096, 8192), linear_cost(4096, 4096, 1)
    assert two_four_speedup(devices.DEVICES["h100"], "fp16", big) == pytest.approx(2.0)  # compute-bound
    assert 1.0 < two_four_speedup(devices.DEVICES["h100"], "fp16", small) < 2.0  # bytes: half + indices
    report = SparseKernelReport(
        "NVIDIA H100 80GB HBM3",
        decisions=[
            KernelDecision(
                layer="fc",
                choice="sparse",
                reason="fp16 2:4 faster",
                dense_ms=0.2,
                sparse_ms=0.1,
                predicted_speedup=2.0,
            )
        ],
    )
    assert (
        "fc: sparse, fp16 2:4 faster (dense 0.200 ms, sparse 0.100 ms) (roofline predicts 2.00x, measured 2.00x)"
        in str(report)
    )


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.conv(x)))


def test_a_layers_epilogues_are_fused_and_cost_nothing():
    """A BatchNorm and an activation applied to a convolution's output alone run in its output
    pass (runtimes fold and fuse them); the residual add reads two tensors and is an op of its own."""
    model, x = Residual().eval(), (torch.randn(2, 8, 16, 16),)
    rows = graph_costs(capture(model, x))
    assert [(r.op, r.epilogue_of) for r in rows] == [
        ("aten.conv2d", None),
        ("aten.batch_norm", "conv.weight"),
        ("aten.relu", "conv.weight"),
        ("aten.add", None),
    ]
    fused, apart = gp.roofline(model, x, device=TOY), gp.roofline(model, x, device=TOY, fuse=False)
    by_op = {r.op: r.dense for r in fused.rows}
    assert by_op["aten.batch_norm"].seconds == 0.0 and by_op["aten.relu"].bound == "fused"
    assert by_op["aten.add"].seconds == pytest.approx(3 * 2 * 8 * 16 * 16 * 4 / TOY.bandwidth)
    unfused = {r.op: r.dense for r in apart.rows}
    assert unfused["aten.relu"].seconds == pytest.approx(2 * 2 * 8 * 16 * 16 * 4 / TOY.bandwidth)
    assert apart.dense_seconds == pytest.approx(
        fused.dense_seconds + sum(unfused[op].seconds for op in ("aten.batch_norm", "aten.relu"))
    )
