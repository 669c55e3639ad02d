"""The devices a roofline is drawn for: peak math rates per number format, dense and with 2:4
structured sparsity, and memory bandwidth (:class:`Device`).

GPUs come from their makers' published data sheets (:data:`DEVICES`; tensor-core rates, the
SXM part where there are several); ``"cpu"`` is this machine, measured by a short
micro-benchmark of what onnxruntime runs (float32 and int8 GEMMs, a large copy) and cached per
processor and thread count, so the CPU roofline is drawn with the rates its kernels reach.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from graphprune.errors import InputError

TERA, GIGA = 1e12, 1e9


@dataclass(frozen=True)
class Device:
    """Peak rates of one device.  ``dense`` and ``sparse`` map a number format ("fp32", "tf32",
    "fp16", "bf16", "fp8", "int8", "int4") to FLOP/s (ops/s for integers); ``sparse`` holds the
    rates of 2:4 structured sparsity (empty where the device has no sparse math); ``bandwidth``
    is memory bytes/s."""

    name: str
    bandwidth: float
    dense: dict[str, float]
    sparse: dict[str, float] = field(default_factory=dict)
    source: str = ""


def _gpu(name: str, bandwidth_gb: float, tensor_tflops: dict[str, float], source: str) -> Device:
    """A GPU whose sparse tensor cores double every tensor-core rate (Ampere and later)."""
    dense = {k: v * TERA for k, v in tensor_tflops.items()}
    sparse = {k: 2 * v for k, v in dense.items() if k != "fp32"}
    return Device(name=name, bandwidth=bandwidth_gb * GIGA, dense=dense, sparse=sparse, source=source)


# published peaks, dense tensor-core rates (fp32: the CUDA cores; it has no sparse rate)
DEVICES: dict[str, Device] = {
    "h100": _gpu(
        "NVIDIA H100 SXM",
        3350,
        {"fp32": 67, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9, "int8": 1978.9},
        "NVIDIA H100 Tensor Core GPU data sheet",
    ),
    "h200": _gpu(
        "NVIDIA H200 SXM",
        4800,
        {"fp32": 67, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9, "int8": 1978.9},
        "NVIDIA H200 Tensor Core GPU data sheet",
    ),
    "a100": _gpu(
        "NVIDIA A100 SXM 80GB",
        2039,
        {"fp32": 19.5, "tf32": 156, "fp16": 312, "bf16": 312, "int8": 624, "int4": 1248},
        "NVIDIA A100 Tensor Core GPU data sheet",
    ),
    "l4": _gpu(
        "NVIDIA L4",
        300,
        {"fp32": 30.3, "tf32": 60, "fp16": 121, "bf16": 121, "fp8": 242.5, "int8": 242.5},
        "NVIDIA L4 Tensor Core GPU data sheet",
    ),
    "a10": _gpu(
        "NVIDIA A10",
        600,
        {"fp32": 31.2, "tf32": 62.5, "fp16": 125, "bf16": 125, "int8": 250, "int4": 500},
        "NVIDIA A10 Tensor Core GPU data sheet",
    ),
    "rtx4090": _gpu(
        "NVIDIA GeForce RTX 4090",
        1008,
        {"fp32": 82.6, "tf32": 82.6, "fp16": 165.2, "bf16": 165.2, "fp8": 330.3, "int8": 660.6},
        "NVIDIA Ada Lovelace architecture white paper (fp16/fp8 with fp32 accumulation)",
    ),
}


def device(spec: str | Device, *, refresh: bool = False) -> Device:
    """The device a name stands for (a key of :data:`DEVICES`, or ``"cpu"``: this machine,
    measured once and cached; ``refresh`` measures again), or ``spec`` itself."""
    if isinstance(spec, Device):
        return spec
    key = spec.lower()
    if key == "cpu":
        return measured_cpu(refresh=refresh)
    if key not in DEVICES:
        raise InputError(
            f"unknown device {spec!r}: known are cpu (this machine, measured), {', '.join(sorted(DEVICES))}, "
            "or give a graphprune.emit.devices.Device with your device's peaks"
        )
    return DEVICES[key]


def for_gpu(name: str) -> Device | None:
    """The entry of :data:`DEVICES` for a GPU as CUDA names it ("NVIDIA H100 80GB HBM3"), or None."""
    plain = re.sub(r"rtx\s+", "rtx", name.lower())
    return next((spec for key, spec in DEVICES.items() if re.search(rf"\b{key}\b", plain)), None)


def measured_cpu(*, refresh: bool = False) -> Device:
    """This machine's rates as onnxruntime reaches them, from the cache where it holds them."""
    import onnxruntime as ort

    threads = min(2, os.cpu_count() or 1)
    key = f"{platform.processor() or platform.machine()}|{_cpu_model()}|threads={threads}|ort={ort.__version__}"
    cache = _cache_file()
    known = {}
    if cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}  # a damaged cache is measured again and rewritten
    if key in known and not refresh:
        return Device(**known[key])
    found = Device(
        name=f"this CPU ({_cpu_model()}, {threads} threads, onnxruntime)",
        bandwidth=_copy_bandwidth(),
        dense={"fp32": _gemm_rate("fp32", threads), "int8": _gemm_rate("int8", threads)},
        source="measured by graphprune.emit.devices.measured_cpu",
    )
    known[key] = asdict(found)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(known, indent=2))
        os.replace(partial, cache)
    except OSError:
        pass  # an unwritable cache costs a measurement next time, nothing else
    return found


def _cache_file() -> Path:
    root = os.environ.get("GRAPHPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "graphprune"
    )
    return Path(root) / "device-peaks.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _gemm_rate(kind: str, threads: int, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s (ops/s) of a ``size``-square GEMM in onnxruntime: MatMul in float32, MatMulInteger
    in int8 (the kernels a QDQ model's QLinearMatMul and QLinearConv reach)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if kind == "fp32":
        elem, op = TensorProto.FLOAT, helper.make_node("MatMul", ["a", "b"], ["y"])
        out = TensorProto.FLOAT
        a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    else:
        elem, op = TensorProto.UINT8, helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        out = TensorProto.INT32
        a = np.random.default_rng(0).integers(0, 255, (size, size)).astype(np.uint8)
    b = a.astype(np.int8) if kind == "int8" else a
    inputs = [
        helper.make_tensor_value_info("a", elem, [size, size]),
        helper.make_tensor_value_info("b", TensorProto.INT8 if kind == "int8" else elem, [size, size]),
    ]
    graph = helper.make_graph([op], "gemm", inputs, [helper.make_tensor_value_info("y", out, [size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"a": a, "b": b}
    session.run(None, feeds)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, feeds)
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start)


def _copy_bandwidth(megabytes: int = 256, seconds: float = 0.5) -> float:
    """Bytes/s of a large copy (each byte read once and written once)."""
    import torch

    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        target.copy_(source)
        runs += 1
    return 2 * source.numel() * 4 * runs / (time.perf_counter() - start)
