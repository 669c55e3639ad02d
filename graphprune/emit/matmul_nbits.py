"""Write an int4 :class:`~graphprune.algorithms.quant.QuantPlan` into an ONNX graph as ``MatMulNBits``.

``com.microsoft.MatMulNBits`` is how onnxruntime runs 4-bit weights on CPU: its kernels read the
packed weights block by block (written with ``accuracy_level=1``: float32 arithmetic, see
:data:`ACCURACY_LEVEL`).  Each int4 layer of the exported float graph (a ``Gemm`` with ``transB=1``, or a
``MatMul`` against the weight's transposed initializer, see :func:`graphprune.emit.qdq.pretranspose`)
becomes one ``MatMulNBits`` node: its weight ``[N, K]`` stored as ``B [N, K / block, block / 2]``,
each byte two 4-bit codes ``q + 8`` (zero-point 8, onnxruntime's default when none is given), the
even index in the low nibble, which is the packing of ONNX's own UINT4 tensors (onnx_ir writes it);
its scales ``[N, K / block]`` are the plan's.  The initializer is named ``<weight>_int4``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from graphprune.algorithms.number_formats import INT4, integer_weight
from graphprune.algorithms.quant import QuantPlan
from graphprune.emit.qdq import TRANSPOSED, initializer
from graphprune.errors import ApplyError, InternalError

DOMAIN = "com.microsoft"
SUFFIX = "_int4"
ZERO_POINT = 8
# float32 arithmetic on the dequantized blocks: what the fake-quantized model computes.  Level 4
# (int8 activations inside the kernel) measured 8% relative L2 error against it on all-MiniLM-L6-v2
# for about 10% less latency (docs/RESULTS.md): more error than int4 weights add, so not the default.
ACCURACY_LEVEL = 1


def insert_matmul_nbits(model: ir.Model, plan: QuantPlan, weights: dict[str, np.ndarray]) -> int:
    """Rewrite ``model`` in place; returns the number of layers written.  ``weights``: the float
    weights the plan describes (an initializer the optimizer changed is refused)."""
    if plan.kind != INT4:
        raise InternalError(f"MatMulNBits nodes are written for int4 plans, not {plan.kind}")
    graph = model.graph
    model.opset_imports.setdefault(DOMAIN, 1)
    for name, layer in plan.layers.items():
        block = layer.group_size or 0
        if block < 16 or block & (block - 1):
            raise ApplyError(
                f"{name}: onnxruntime's MatMulNBits takes groups of a power of 2 from 16 on, not {block}; "
                "quantize with such a group_size to export"
            )
        transposed = name + TRANSPOSED in graph.initializers
        value = graph.initializers.get(name + TRANSPOSED if transposed else name)
        if value is None:
            raise ApplyError(
                f"int4 weight {name} is not an initializer of the exported graph; cannot write MatMulNBits"
            )
        written = value.const_value.numpy()
        if not np.array_equal(written.T if transposed else written, weights[name]):
            raise ApplyError(f"the ONNX optimizer rewrote int4 weight {name}, so the plan no longer describes it")
        matrix = torch.from_numpy(weights[name].copy()).float().movedim(layer.axis, 0)  # [N, K]
        n, k = matrix.shape
        readers = [use.node for use in value.uses()]
        for node in readers:
            if not _reads_as_nk(node, value, matrix.shape, written.shape):
                raise ApplyError(
                    f"int4 weight {name} is read by {node.op_type} {node.name!r} in a way MatMulNBits cannot "
                    "replace (it takes MatMul against [K, N] or Gemm with transB=1)"
                )
        scale = layer.scale()
        codes = integer_weight(matrix, scale, 0, INT4, block).numpy()
        packed = initializer(graph, name + SUFFIX, pack_int4(codes, block))
        scales = initializer(graph, name + "_scale", scale.numpy())
        for node in readers:
            bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            inputs = [node.inputs[0], packed, scales] + ([None, None, bias] if bias is not None else [])
            attributes = {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": ACCURACY_LEVEL}
            replacement = ir.node("MatMulNBits", inputs, attributes, domain=DOMAIN, name=f"{node.name}_MatMulNBits")
            output = node.outputs[0]
            replacement.outputs[0].type, replacement.outputs[0].shape = output.type, output.shape
            graph.insert_before(node, replacement)
            name_kept, was_output = output.name, output.is_graph_output()
            output.replace_all_uses_with(replacement.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            replacement.outputs[0].name = name_kept if was_output else f"{name_kept}_int4"
        del graph.initializers[value.name]
    return len(plan.layers)


def _reads_as_nk(node: ir.Node, value: ir.Value, shape: torch.Size, stored: tuple[int, ...]) -> bool:
    """``node`` multiplies its first input by ``value`` as ``x @ W^T`` for the ``[N, K]`` weight ``W``."""
    if node.domain != "" or len(node.inputs) < 2 or node.inputs[1] is not value or node.inputs[0] is value:
        return False
    n, k = shape
    if node.op_type == "MatMul":
        return tuple(stored) == (k, n)
    if node.op_type == "Gemm":
        attrs = {key: a.value for key, a in node.attributes.items()}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        return plain and attrs.get("transB", 0) == 1 and tuple(stored) == (n, k)
    return False


def pack_int4(codes: np.ndarray, block: int) -> np.ndarray:
    """``codes [N, K]`` (integers in [-8, 7]) as MatMulNBits' ``B [N, K / block, block / 2]``."""
    n, k = codes.shape
    unsigned = (codes.astype(np.int16) + ZERO_POINT).astype(ml_dtypes.uint4).reshape(-1)
    return np.frombuffer(ir.tensor(unsigned).tobytes(), dtype=np.uint8).reshape(n, k // block, block // 2).copy()


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """The codes ``[N, K]`` (zero-point removed) of MatMulNBits' packed ``B``."""
    low, high = packed & 0x0F, packed >> 4
    both = np.stack([low, high], axis=-1).reshape(packed.shape[0], -1)
    return both.astype(np.int16) - ZERO_POINT
