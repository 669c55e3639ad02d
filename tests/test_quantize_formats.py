"""int4 (group-wise, RTN and GPTQ) and fp8 quantization: the arithmetic, the pass, the order
contract, plan files and the ONNX emitters, each against an oracle."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

import graphprune as gp
from graphprune.algorithms.gptq import quantize_columns
from graphprune.algorithms.number_formats import (
    FP8,
    FP8_MAX,
    INT4,
    fake_quantize_weight,
    integer_weight,
    to_fp8,
    weight_scales,
)
from graphprune.algorithms.quant import QuantPlan
from graphprune.algorithms.sparsegpt import inverse_factor
from graphprune.emit.matmul_nbits import pack_int4, unpack_int4
from graphprune.passes import NMSparsity, Quantize
from tests.architectures import small_llama


class MLP(nn.Module):
    def __init__(self, features: int = 64, hidden: int = 128, out: int = 32) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(features, hidden), nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def correlated(rows: int, features: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs that mostly vary along a few directions (as transformer activations do): the
    anisotropy GPTQ uses and round-to-nearest ignores."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, features, generator=torch.Generator().manual_seed(1234))  # one subspace for every seed
    return torch.randn(rows, 8, generator=g) @ basis + 0.05 * torch.randn(rows, features, generator=g)


def _mlp():
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(4, 64),), [(correlated(64, seed=i),) for i in range(4)]


def test_int4_codes_pack_as_onnxruntime_reads_them():
    """Bit-exact: our packing unpacks to the codes, and onnxruntime's MatMulNBits computes with the
    weights those codes and scales stand for."""
    rng = np.random.default_rng(0)
    n, k, block = 24, 64, 16
    codes = rng.integers(-7, 8, (n, k))
    packed = pack_int4(codes, block)
    assert packed.shape == (n, k // block, block // 2) and packed.dtype == np.uint8
    assert np.array_equal(unpack_int4(packed), codes)
    scales = rng.uniform(0.01, 0.1, (n, k // block)).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [onnx.numpy_helper.from_array(packed, "b"), onnx.numpy_helper.from_array(scales, "s")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )
    a = rng.standard_normal((3, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    want = a @ (codes * np.repeat(scales, block, axis=1)).T
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_int4_and_fp8_grids():
    torch.manual_seed(0)
    weight = torch.randn(8, 64)
    scale = weight_scales(weight, 0, INT4, 16)
    assert scale.shape == (8, 4)
    q = integer_weight(weight, scale, 0, INT4, 16)
    assert q.abs().max() == 7 and torch.equal(
        fake_quantize_weight(weight, scale, 0, INT4, 16), q.float() * scale.repeat_interleave(16, 1)
    )
    conv1d = weight.t().contiguous()  # transformers' Conv1D stores [in, out]: the same groups
    assert torch.equal(weight_scales(conv1d, 1, INT4, 16), scale)
    fp8_scale = weight_scales(weight, 0, FP8)
    rounded = fake_quantize_weight(weight, fp8_scale, 0, FP8)
    assert torch.equal(rounded, to_fp8(weight, fp8_scale[:, None]).float() * fp8_scale[:, None])
    assert (rounded.abs().amax(1) / fp8_scale).max() == FP8_MAX
    sparse = weight * (torch.rand_like(weight) > 0.5)
    for kind, group in ((INT4, 16), (FP8, None)):  # symmetric: zeros stay exact zeros
        s = weight_scales(sparse, 0, kind, group)
        assert torch.all(fake_quantize_weight(sparse, s, 0, kind, group)[sparse == 0] == 0)


@pytest.mark.parametrize("kind, group", [(INT4, 16), ("int8", None), (FP8, None)])
def test_gptq_beats_round_to_nearest_on_anisotropic_inputs(kind, group):
    torch.manual_seed(0)
    weight, x = torch.randn(32, 64), correlated(512)
    hessian = 2 * x.T @ x / x.shape[0]
    factor = inverse_factor(hessian, damp=0.01)
    gptq, scales = quantize_columns(weight, factor, kind, group_size=group)
    rtn = fake_quantize_weight(weight, weight_scales(weight, 0, kind, group), 0, kind, group)
    assert torch.equal(fake_quantize_weight(gptq.float(), scales, 0, kind, group), gptq.float())  # on its grid

    def error(w: torch.Tensor) -> float:
        return float((x @ (w.float() - weight).T).norm())

    assert error(gptq) < 0.6 * error(rtn)


def test_gptq_on_a_masked_layer_keeps_the_mask_and_beats_rounding_the_masked_weights():
    torch.manual_seed(0)
    weight, x = torch.randn(32, 64), correlated(512)
    keep = torch.zeros_like(weight, dtype=torch.bool)
    keep.view(32, 16, 4).scatter_(2, weight.abs().view(32, 16, 4).topk(2, dim=2).indices, True)
    factor = inverse_factor(2 * x.T @ x / x.shape[0], damp=0.01)
    gptq, _ = quantize_columns(weight * keep, factor, INT4, group_size=16, keep=keep)
    assert torch.all(gptq[~keep] == 0)
    masked = weight * keep
    rtn = fake_quantize_weight(masked, weight_scales(masked, 0, INT4, 16), 0, INT4, 16)
    assert (x @ (gptq - weight).T).norm() < (x @ (rtn - weight).T).norm()


@pytest.mark.parametrize(
    "passes",
    [
        [NMSparsity(2, 4, method="sparsegpt", dense_heads=False), Quantize("int4", group_size=32, method="gptq")],
        [NMSparsity(2, 4, dense_heads=False), Quantize("int4", group_size=32)],
        [NMSparsity(2, 4, dense_heads=False), Quantize("fp8", method="gptq")],
    ],
    ids=["sparsegpt+int4-gptq", "magnitude+int4-rtn", "magnitude+fp8-gptq"],
)
def test_sparsity_then_quantization_keeps_the_pattern_replays_and_exports(passes, tmp_path):
    model, x, calibration = _mlp()
    result = gp.prune(model, x, calibration=calibration, passes=passes)
    for layer in (result.module.a, result.module.b):
        w = layer.weight.detach()
        assert int((w.reshape(-1, 4) != 0).sum(1).max()) <= 2  # 2:4 after quantization
    plan = result.plans[-1]
    assert plan.kind == passes[-1].dtype and set(plan.layers) == {"a.weight", "b.weight"}
    result.save_plan(tmp_path / "p")
    replayed = gp.apply_plan_file(model, x, tmp_path / "p.json")
    probe = correlated(16, seed=9)
    assert torch.equal(replayed(probe), result.module(probe))
    report = result.export_onnx(tmp_path / "m.onnx")
    assert report.quant_format == passes[-1].dtype and report.quantized_layers == 2
    assert len(report.sparse_weights) == 2  # the pattern, checked on the written (packed) values
    if passes[-1].dtype == "int4":
        assert report.quantized_ops == {"MatMulNBits": 2}
    else:  # fp8 QDQ; the first layer's ReLU input is quantized in front of it (see emit.qdq)
        written = onnx.load(tmp_path / "m.onnx")
        fp8 = [i for i in written.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN and len(i.dims) == 2]
        assert len(fp8) == 2 and report.l2_error < 1e-5


def test_gptq_beats_rtn_on_the_model_and_reads_the_quantized_model_upstream():
    model, x, calibration = _mlp()
    probe = correlated(256, seed=7)
    with torch.no_grad():
        want = model(probe)

    def error(method: str) -> float:
        out = gp.prune(model, x, calibration=calibration, passes=[Quantize("int4", group_size=16, method=method)])
        with torch.no_grad():
            return float((out.module(probe) - want).norm() / want.norm())

    assert error("gptq") < error("rtn")


def test_bad_arguments_are_refused_by_name(tmp_path):
    model, x, calibration = _mlp()
    with pytest.raises(gp.InputError, match="do not split into groups of 48"):
        gp.prune(model, x, passes=[Quantize("int4", group_size=48)])
    with pytest.raises(gp.InputError, match="method must be one of"):
        Quantize("int4", method="awq")
    with pytest.raises(gp.InputError, match="dtype must be one of"):
        Quantize("int2")
    with pytest.raises(gp.InputError, match="group_size is for int4"):
        Quantize("int8", group_size=64)
    with pytest.raises(gp.InputError, match="positive integer"):
        Quantize("int4", group_size=0)
    with pytest.raises(gp.InputError, match="weights only"):
        Quantize("int4", activations="minmax")
    with pytest.raises(gp.InputError, match="needs calibration"):
        gp.prune(model, x, passes=[Quantize("int4", group_size=32, method="gptq")])
    result = gp.prune(model, x, passes=[Quantize("int4", group_size=32)])  # weight-only RTN needs no data
    assert result.plans[-1].kind == INT4
    with pytest.raises(gp.InputError, match="no 2:4 kernel"):
        result.to_sparse_kernels()
    odd = gp.prune(model, x, passes=[Quantize("int4", group_size=8)])
    with pytest.raises(gp.ApplyError, match="power of 2 from 16"):
        odd.export_onnx(tmp_path / "never-written.onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_order_contract_covers_the_new_formats():
    model, x, calibration = _mlp()
    for quantize in (Quantize("int4", group_size=32), Quantize("fp8")):
        with pytest.raises(gp.ContractError, match="stage 'quantized'"):
            gp.prune(model, x, calibration=calibration, passes=[quantize, NMSparsity(2, 4)])
        result = gp.prune(
            model, x, calibration=calibration, passes=[quantize, NMSparsity(2, 4)], experimental_order=True
        )
        assert any("EXPERIMENTAL ORDER" in note for note in result.report.notes)


def test_quantization_plans_of_every_format_survive_json_and_old_int8_plans_load():
    model, x, calibration = _mlp()
    for quantize in (Quantize("int8"), Quantize("int4", group_size=32), Quantize("fp8")):
        plan = gp.prune(model, x, calibration=calibration, passes=[quantize]).plans[-1]
        assert QuantPlan.from_json(plan.to_json()) == plan
    layer = {"module": "a", "axis": 0, "weight_scale": [1.0], "input": [0.1, 0]}
    old = json.dumps({"version": 1, "kind": "int8", "layers": {"a.weight": layer}})
    assert QuantPlan.from_json(old).kind == "int8"
    with pytest.raises(gp.InputError, match="not a quantization plan"):
        QuantPlan.from_json('{"version": 2, "kind": "int3", "layers": {}}')


def test_fp8_activation_rounding_matches_onnxruntime_bit_for_bit():
    x = torch.randn(4096) * 30
    scale = torch.tensor(0.05)
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    dq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])
    zero = onnx.numpy_helper.from_array(np.array(0, dtype=ml_dtypes.float8_e4m3fn), "z")
    graph = helper.make_graph(
        [q, dq],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])],
        [onnx.numpy_helper.from_array(np.array(0.05, np.float32), "s"), zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )
    assert np.array_equal(got[0], fake_quantize_weight(x[:, None], scale.expand(4096), 0, FP8)[:, 0].numpy())


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [Quantize("int4", group_size=16, method="gptq"), Quantize("fp8")], ids=repr)
def test_compressed_tensors_checkpoints_load_in_transformers_and_compute_the_quantized_model(quantize, tmp_path):
    """2:4 then int4 (GPTQ) or fp8, saved as a plan, applied to the dense checkpoint in the
    compressed-tensors layout: transformers loads it (through compressed-tensors) and computes what
    the fake-quantized pruned module computes."""
    pytest.importorskip("compressed_tensors")
    import transformers

    model = small_llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    calibration = [(torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    result = gp.prune(model, (ids,), calibration=calibration, passes=[NMSparsity(2, 4, method="sparsegpt"), quantize])
    model.save_pretrained(tmp_path / "dense")
    result.save_plan(tmp_path / "plan")
    with pytest.raises(gp.InputError, match="format='compressed-tensors'"):
        gp.apply_to_checkpoint(tmp_path / "plan.json", tmp_path / "dense", tmp_path / "plain")
    report = gp.apply_to_checkpoint(
        tmp_path / "plan.json", tmp_path / "dense", tmp_path / "out", format="compressed-tensors"
    )
    assert report.bytes_after < report.bytes_before
    assert "writes no sparsity metadata" in str(report)  # the 2:4 zeros are in the values, unmarked
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["format"] == ("pack-quantized" if quantize.dtype == "int4" else "float-quantized")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        want = result.module(ids).logits
        assert torch.allclose(loaded(ids).logits, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_what_compressed_tensors_cannot_carry_is_refused(tmp_path):
    model = small_llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "dense")
    int8 = gp.prune(model, (ids,), calibration=[(ids,)], passes=[Quantize("int8")])
    int8.save_plan(tmp_path / "int8")
    with pytest.raises(gp.InputError, match="int8 plan quantizes biases"):
        gp.apply_to_checkpoint(
            tmp_path / "int8.json", tmp_path / "dense", tmp_path / "out", format="compressed-tensors"
        )
    sparse = gp.prune(model, (ids,), passes=[NMSparsity(2, 4)])
    sparse.save_plan(tmp_path / "sparse")
    with pytest.raises(gp.InputError, match="this plan does not quantize"):
        gp.apply_to_checkpoint(
            tmp_path / "sparse.json", tmp_path / "dense", tmp_path / "out", format="compressed-tensors"
        )
    with pytest.raises(gp.InputError, match="format must be None or"):
        gp.apply_to_checkpoint(tmp_path / "sparse.json", tmp_path / "dense", tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()


def test_the_command_line_names_the_formats():
    from graphprune.cli import _passes, parser

    def passes(*flags: str) -> list:
        return _passes(parser().parse_args(["prune", "samples.resnet:build", "-o", "x.onnx", *flags]))[0]

    (quantize,) = passes("--quantize", "int4", "--group-size", "32", "--quant-method", "gptq")
    assert (quantize.dtype, quantize.group_size, quantize.method) == ("int4", 32, "gptq")
    assert passes("--nm", "2:4", "--quantize", "fp8")[-1].dtype == "fp8"
    assert passes("--int8")[0].dtype == "int8"
    with pytest.raises(gp.InputError, match="give one of them"):
        passes("--int8", "--quantize", "int4")
    with pytest.raises(gp.InputError, match="give --quantize too"):
        passes("--nm", "2:4", "--group-size", "32")


@pytest.mark.slow
def test_sparsegpt_then_gptq_share_one_sweep_over_the_calibration_data(tmp_path):
    """Adjacent SparseGPT and GPTQ passes run as one (the SparseGPT paper's joint variant): the
    calibration batches go through the model's first block half as often, the pattern holds, the
    weights lie on the int4 grid, and the plan replays exactly."""
    model = small_llama(layers=2)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    calibration = [(torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *_: calls.append(1))

    def run(damp: float) -> gp.PruneResult:
        calls.clear()
        passes = [NMSparsity(2, 4, method="sparsegpt"), Quantize("int4", group_size=16, method="gptq", damp=damp)]
        return gp.prune(model, (ids,), calibration=calibration, passes=passes)

    joint = run(0.01)
    joint_calls = len(calls)
    separate = run(0.02)  # different damping: two passes, two sweeps
    assert [row.pass_name for row in joint.report.rows] == ["SparseGPTQ"]
    assert [row.pass_name for row in separate.report.rows] == ["NMSparsity", "Quantize"]
    assert joint_calls < len(calls)
    assert joint.report.rows[0].details["sweeps"].startswith("one")
    plan = joint.plans[-1]
    for layer in plan.layers.values():
        weight = joint.module.get_submodule(layer.module).weight.detach()
        assert torch.equal(fake_quantize_weight(weight, layer.scale(), 0, INT4, 16), weight)
    joint.save_plan(tmp_path / "p")
    masks = gp.PlanFile.load(tmp_path / "p.json").masks
    assert masks and all(int(record.mask.reshape(-1, 4).sum(1).max()) <= 2 for record in masks.values())
    replayed = gp.apply_plan_file(model, (ids,), tmp_path / "p.json")
    with torch.no_grad():
        assert torch.equal(replayed(ids).logits, joint.module(ids).logits)


def test_a_checkpoint_without_the_quantized_weights_is_refused_before_writing(tmp_path):
    model = small_llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    gp.prune(model, (ids,), passes=[Quantize("int4", group_size=16)]).save_plan(tmp_path / "plan")
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(gp.InputError, match="does not have .*prefix"):
        gp.apply_to_checkpoint(
            tmp_path / "plan.json", tmp_path / "dense", tmp_path / "out", format="compressed-tensors", prefix="base."
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
