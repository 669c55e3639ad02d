"""onnxruntime latency of an ONNX file on CPU: the median of timed runs after a warm-up."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from graphprune.errors import InputError


def onnx_latency_ms(
    path: str, feeds: dict[str, np.ndarray] | None = None, *, batch: int = 1, runs: int = 20, threads: int = 1
) -> float:
    """Median milliseconds per run.  Without ``feeds``, random inputs shaped by the model's inputs
    (symbolic dims = ``batch``; integer inputs in [0, 100))."""
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(
            f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc
    if feeds is None:
        rng = np.random.default_rng(0)
        feeds = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) else batch for d in i.shape]
            feeds[i.name] = (
                rng.integers(0, 100, shape).astype(np.int64)
                if "int" in i.type
                else rng.standard_normal(shape).astype(np.float32)
            )
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
