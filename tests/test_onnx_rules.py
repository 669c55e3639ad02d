"""One small ONNX graph per operator family: the groups the ONNX rules find, and the oracles (the
keep-all plan is exact; removing zeroed channels of exact groups changes nothing; onnxruntime
checks every value's shape after pruning).  Each graph is ``Conv(3 -> 8) -> <ops> -> Conv(C -> 4)``
unless it says otherwise, so the channels the ops carry are prunable (not the model's interface)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.core.plan import Plan
from graphprune.frontends.onnx.analysis import analyze_onnx_capture
from graphprune.frontends.onnx.apply import apply_onnx_plan
from graphprune.frontends.onnx.capture import capture_onnx, read_model
from tests.oracles import random_plan, zero_removed_onnx

RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.5).astype(np.float32)


def _ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def graph(
    nodes: list, inits: dict[str, np.ndarray], channels: int | None, opset: int = 17, head: str = "conv"
) -> onnx.ModelProto:
    """``x [2, 3, 6, 6] -> Conv -> a [2, 8, 6, 6] -> nodes -> b -> head -> y``; ``head`` "conv" is a
    1x1 Conv from ``channels`` to 4, "none" makes ``b`` the output."""
    inits = {"w_in": _w(8, 3, 1, 1), "b_in": _w(8), **inits}
    nodes = [helper.make_node("Conv", ["x", "w_in", "b_in"], ["a"], name="conv_in"), *nodes]
    out = "b"
    if head == "conv":
        inits["w_out"] = _w(4, channels, 1, 1)
        nodes.append(helper.make_node("Conv", ["b", "w_out"], ["y"], name="conv_out"))
        out = "y"
    g = helper.make_graph(
        nodes,
        "case",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [f"d{i}" for i in range(4 if head == "conv" else 2)])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=f"{op}_{outputs[0]}", **attrs)


CASES = {
    # name: (model, the prunable group sizes)
    "split_sizes_input": (
        graph(
            [node("Split", ["a", "sizes"], ["p", "q"], axis=1), node("Concat", ["q", "p"], ["b"], axis=1)],
            {"sizes": _ints(3, 5)},
            8,
        ),
        [3, 5],
    ),
    "split_sizes_attribute": (
        graph(
            [node("Split", ["a"], ["p", "q"], axis=1, split=[3, 5]), node("Concat", ["q", "p"], ["b"], axis=1)],
            {},
            8,
            opset=11,
        ),
        [3, 5],
    ),
    "split_equal_parts": (
        graph(
            [node("Split", ["a"], ["p", "q"], axis=1, num_outputs=2), node("Add", ["p", "q"], ["b"])], {}, 4, opset=18
        ),
        [4],
    ),
    "slice_channels": (
        graph([node("Slice", ["a", "st", "en", "ax"], ["b"])], {"st": _ints(2), "en": _ints(6), "ax": _ints(1)}, 4),
        [2, 2, 4],
    ),
    "slice_to_the_end": (
        graph([node("Slice", ["a", "st", "en", "ax"], ["b"])], {"st": _ints(3), "en": _ints(2**62), "ax": _ints(1)}, 5),
        [3, 5],
    ),
    "batchnorm_relu": (
        graph(
            [node("BatchNormalization", ["a", "g", "be", "m", "v"], ["n"]), node("Relu", ["n"], ["b"])],
            {"g": _w(8), "be": _w(8), "m": _w(8), "v": np.abs(_w(8)) + 0.5},
            8,
        ),
        [8],
    ),
    "instance_norm": (
        graph([node("InstanceNormalization", ["a", "g", "be"], ["b"])], {"g": _w(8), "be": _w(8)}, 8),
        [8],
    ),
    "group_norm": (
        graph(
            [node("GroupNormalization", ["a", "g", "be"], ["b"], num_groups=4)], {"g": _w(8), "be": _w(8)}, 8, opset=21
        ),
        [2, 4],
    ),  # whole groups x channels per group
    "conv_transpose": (
        graph(
            [node("ConvTranspose", ["a", "wt", "bt"], ["b"], strides=[2, 2])], {"wt": _w(8, 6, 2, 2), "bt": _w(6)}, 6
        ),
        [6, 8],
    ),
    "grouped_conv_transpose": (
        graph([node("ConvTranspose", ["a", "wt"], ["b"], group=2)], {"wt": _w(8, 3, 1, 1)}, 6),
        [2, 3, 4],
    ),  # groups, inputs per group, outputs per group
    "depthwise_multiplier": (
        graph([node("Conv", ["a", "wd"], ["b"], group=8, pads=[1, 1, 1, 1])], {"wd": _w(16, 1, 3, 3)}, 16),
        [2, 8],
    ),
    "depth_to_space_crd": (graph([node("DepthToSpace", ["a"], ["b"], blocksize=2, mode="CRD")], {}, 2), [2]),
    "depth_to_space_dcr": (graph([node("DepthToSpace", ["a"], ["b"], blocksize=2, mode="DCR")], {}, 2), [2]),
    "pad_spatial": (graph([node("Pad", ["a", "pads"], ["b"])], {"pads": _ints(0, 0, 1, 1, 0, 0, 1, 1)}, 8), [8]),
    "resize_scales": (
        graph([node("Resize", ["a", "", "sc"], ["b"], mode="nearest")], {"sc": np.array([1, 1, 2, 2], np.float32)}, 8),
        [8],
    ),
    "resize_sizes": (
        graph([node("Resize", ["a", "", "", "sz"], ["b"], mode="nearest")], {"sz": _ints(2, 8, 12, 12)}, 8),
        [8],
    ),
    "squeeze_excite_expand": (
        graph(
            [
                node("ReduceMean", ["a"], ["s"], axes=[2, 3]),
                node("Sigmoid", ["s"], ["g"]),
                node("Expand", ["g", "shape"], ["e"]),
                node("Mul", ["a", "e"], ["b"]),
            ],
            {"shape": _ints(2, 8, 6, 6)},
            8,
        ),
        [8],
    ),
    "tile": (
        graph(
            [
                node("GlobalAveragePool", ["a"], ["s"]),
                node("Tile", ["s", "reps"], ["t"]),
                node("Add", ["a", "t"], ["b"]),
            ],
            {"reps": _ints(1, 1, 6, 6)},
            8,
        ),
        [8],
    ),
    "einsum": (graph([node("Einsum", ["a", "we"], ["b"], equation="nchw,oc->nohw")], {"we": _w(6, 8)}, 6), [6, 8]),
    "softmax_over_channels": (graph([node("Softmax", ["a"], ["b"], axis=1)], {}, 8), [8]),
    "lrn": (graph([node("LRN", ["a"], ["b"], size=3)], {}, 8), []),
    "nhwc_layer_norm": (
        graph(
            [
                node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]),
                node("LayerNormalization", ["t", "g", "be"], ["n"], axis=-1),
                node("Transpose", ["n"], ["b"], perm=[0, 3, 1, 2]),
            ],
            {"g": _w(8), "be": _w(8)},
            8,
        ),
        [8],
    ),
    "prelu_clip_where": (
        graph(
            [
                node("PRelu", ["a", "slope"], ["p"]),
                node("Clip", ["p", "lo", "hi"], ["c"]),
                node("Greater", ["c", "zero"], ["m"]),
                node("Where", ["m", "c", "p"], ["b"]),
            ],
            {
                "slope": _w(8, 1, 1),
                "lo": np.array(-1, np.float32),
                "hi": np.array(1, np.float32),
                "zero": np.array(0, np.float32),
            },
            8,
        ),
        [8],
    ),
    "channel_shuffle": (
        graph(
            [
                node("Reshape", ["a", "s1"], ["r"]),
                node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),
                node("Reshape", ["t", "s2"], ["b"]),
            ],
            {"s1": _ints(2, 2, 4, 6, 6), "s2": _ints(2, 8, 6, 6)},
            8,
        ),
        [2, 4],
    ),
    "unsqueeze_axes_attribute": (
        graph([node("Unsqueeze", ["a"], ["u"], axes=[2]), node("Squeeze", ["u"], ["b"], axes=[2])], {}, 8, opset=11),
        [8],
    ),
    "unsqueeze_axes_input": (
        graph([node("Unsqueeze", ["a", "ax"], ["u"]), node("Squeeze", ["u", "ax"], ["b"])], {"ax": _ints(2)}, 8),
        [8],
    ),
    "sum_max_dropout": (
        graph(
            [
                node("Relu", ["a"], ["r"]),
                node("Sum", ["a", "r"], ["s"]),
                node("Max", ["s", "a"], ["m"]),
                node("Dropout", ["m"], ["b", "mask"]),
            ],
            {},
            8,
        ),
        [8],
    ),
    "flatten_into_matmul": (
        graph(
            [node("Flatten", ["a"], ["f"], axis=1), node("MatMul", ["f", "wm"], ["b"])],
            {"wm": _w(8 * 36, 5)},
            None,
            head="none",
        ),
        [8],
    ),
    "pool_flatten_gemm": (
        graph(
            [
                node("GlobalAveragePool", ["a"], ["p"]),
                node("Flatten", ["p"], ["f"]),
                node("Gemm", ["f", "wg", "bg"], ["b"], transB=1),
            ],
            {"wg": _w(5, 8), "bg": _w(5)},
            None,
            head="none",
        ),
        [8],
    ),
    "topk_spatial": (
        graph(
            [
                node("Reshape", ["a", "s"], ["r"]),
                node("TopK", ["r", "k"], ["v", "i"], axis=-1),
                node("Unsqueeze", ["v", "ax"], ["b"]),
            ],
            {"s": _ints(2, 8, 36), "k": _ints(4), "ax": _ints(3)},
            8,
        ),
        [8],
    ),
}


def attention_graph(scale: bool, four_d: bool = False) -> onnx.ModelProto:
    """x [2, 5, 16] -> q (4 heads), k and v (2 kv heads) of head dim 4 -> ONNX Attention -> output
    projection -> y; GQA with 2 query heads per kv head."""
    attrs = {"scale": 0.5} if scale else {}
    nodes = [node("MatMul", ["x", "wq"], ["q"]), node("MatMul", ["x", "wk"], ["k"]), node("MatMul", ["x", "wv"], ["v"])]
    if four_d:
        for name, heads in (("q", 4), ("k", 2), ("v", 2)):
            nodes += [
                node("Reshape", [name, f"s_{name}"], [f"{name}r"]),
                node("Transpose", [f"{name}r"], [f"{name}4"], perm=[0, 2, 1, 3]),
            ]
        nodes += [
            node("Attention", ["q4", "k4", "v4"], ["a4"], **attrs),
            node("Transpose", ["a4"], ["at"], perm=[0, 2, 1, 3]),
            node("Reshape", ["at", "s_o"], ["a"]),
        ]
    else:
        nodes.append(node("Attention", ["q", "k", "v"], ["a"], q_num_heads=4, kv_num_heads=2, **attrs))
    nodes.append(node("MatMul", ["a", "wo"], ["y"]))
    inits = {
        "wq": _w(16, 16),
        "wk": _w(16, 8),
        "wv": _w(16, 8),
        "wo": _w(16, 16),
        "s_q": _ints(2, 5, 4, 4),
        "s_k": _ints(2, 5, 2, 4),
        "s_v": _ints(2, 5, 2, 4),
        "s_o": _ints(2, 5, 16),
    }
    g = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 16])],
        [numpy_helper.from_array(v, k) for k, v in inits.items() if four_d or not k.startswith("s_")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    onnx.checker.check_model(model)
    return model


CASES.update(
    {
        # kv heads x query heads per kv head, v's head dim; with a scale, q/k's head dim too
        "attention_3d": (attention_graph(scale=False), [2, 2, 4]),
        "attention_3d_scaled": (attention_graph(scale=True), [2, 2, 4, 4]),
        "attention_4d_scaled": (attention_graph(scale=True, four_d=True), [2, 2, 4, 4]),
    }
)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model, sizes = CASES[request.param]
    capture = capture_onnx(read_model(model))
    return request.param, capture, analyze_onnx_capture(capture, request.param), sizes


def test_groups(case):
    name, _, analysis, sizes = case
    assert not analysis.rule_errors and not analysis.unsupported, (analysis.rule_errors, analysis.unsupported)
    assert sorted(g.size for g in analysis.groups) == sorted(sizes), analysis.describe()


def test_keep_all_plan_is_exact(case):
    _, capture, analysis, _ = case
    same = apply_onnx_plan(capture, analysis, Plan())
    assert all(np.array_equal(a, b) for a, b in zip(same.outputs, capture.outputs, strict=True))


NOT_EXACT = {"lrn", "nhwc_layer_norm", "softmax_over_channels"}  # frozen, or inside a reduction


def test_pruning_zeroed_channels_changes_nothing(case):
    name, capture, analysis, _ = case
    plan = random_plan(analysis, 0.5, exact_only=True, head_dim=True)
    assert bool(plan.keep) == (name not in NOT_EXACT), analysis.describe()
    zeroed = zero_removed_onnx(capture, analysis, plan)
    pruned = apply_onnx_plan(zeroed, analysis, plan)  # also checks every value's shape in onnxruntime
    for got, want in zip(pruned.outputs, zeroed.outputs, strict=True):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * max(np.abs(want).max(), 1e-6), name


def test_every_group_prunes_to_a_valid_graph(case):
    """Inexact groups too (softmax over channels, layer and group norms change the result when
    pruned): the pruned graph is valid, every value has its predicted shape, outputs keep theirs."""
    name, capture, analysis, sizes = case
    plan = random_plan(analysis, 0.5, head_dim=True)
    assert len(plan.keep) == len(sizes)
    pruned = apply_onnx_plan(capture, analysis, plan)
    assert [o.shape for o in pruned.outputs] == [o.shape for o in capture.outputs]
