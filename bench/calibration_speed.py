"""Calibration speed: 2:4 SparseGPT and Wanda on the real all-MiniLM-L6-v2, graphprune against a
plain reference written here, on the same sentences and machine.

Rows:
* ``graphprune``: ``NMSparsity`` as users call it (SparseGPT block by block: each encoder layer
  runs alone on what the layers before it computed);
* ``graphprune, whole forwards``: the same pass forced onto the fallback that runs the whole
  model once per group of layers reading one activation (how SparseGPT ran before the block
  engine; what models that are not a chain of blocks still get);
* ``reference``: a plain implementation (statistics of one block in one pass with forward hooks,
  float32 accumulation and solves, the block's linears pruned from its dense inputs, as the
  SparseGPT authors' script does).

* ``graphprune, float64``: the same pass with Hessians accumulated and solved in float64
  (``precision="float64"``, the default before issue 21), for the quality of float32 solves.

Each row prints seconds, the ratio to the reference, the mean cosine between dense and sparse
sentence embeddings on held-out sentences, and the peak resident memory the row added to the
process (sampled every 5 ms from ``/proc/self/status``; the model itself is already resident).

Then ``ChannelPrune(0.25, compensate="reconstruct")`` on the same model and sentences: the dense
and pruned models walked block by block side by side, against the same pass forced onto whole
forwards (two whole forwards per re-fitted layer and batch: how reconstruction ran before), with
plain ``ChannelPrune(0.25)`` for the quality reconstruction buys.

Then the solves alone on one LLaMA-7B-shaped block (random weights and Hessians; q, k, v share a
Hessian, as gate and up do): seconds per layer against the FLOP-count lower bound at the
machine's measured float32 matmul rate (the factorisation, ``4/3 n^3`` once per Hessian, plus the
column updates, ``rows * n^2`` per layer), as an efficiency percentage.

With ``--device cuda`` everything runs on the GPU (the calibration sentences stay on the CPU, as
users hand them over; graphprune and the reference move each batch), seconds are taken after a
synchronize, and the peak column is the GPU memory allocated beyond what was held on entry.

    python -m bench.calibration_speed [--sentences 256] [--block-scale 1.0] [--device cuda]
        [--rows nm,reconstruct]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import threading
import time
from collections.abc import Iterator

import torch
import torch.nn as nn

import graphprune as gp
from bench.minilm_quality import HELD_OUT
from graphprune.algorithms.nm import LINEAR, NMPattern
from graphprune.algorithms.sparsegpt import inverse_factor, prune_layer
from graphprune.frontends.torch.blocks import Blocks
from graphprune.passes import ChannelPrune, NMSparsity
from samples.minilm import build, embed, tokenize

SUBJECTS = ["The old man", "A small child", "Our neighbour", "The new teacher", "A tired nurse", "My brother"]
VERBS = ["reads", "paints", "repairs", "sells", "cooks", "describes", "photographs", "carries"]
OBJECTS = ["a red bicycle", "the morning paper", "fresh bread", "a wooden boat", "the city map", "warm soup"]
PLACES = ["at the market", "near the river", "in the garden", "after lunch", "before the storm", "on Sunday"]


def sentences(count: int) -> list[str]:
    """``count`` distinct plain English sentences (a fixed, seeded choice)."""
    every = [" ".join(parts) + "." for parts in itertools.product(SUBJECTS, VERBS, OBJECTS, PLACES)]
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(0))
    return [every[i] for i in order[:count].tolist()]


def batched(texts: list[str], size: int = 32) -> list[dict]:
    return [tokenize(texts[i : i + size]) for i in range(0, len(texts), size)]


class PeakMemory:
    """The most memory (MiB) held beyond what was held on entry: on a GPU, what torch allocated
    there; else the process's resident memory, sampled by a thread (Linux ``/proc/self/status``; 0
    where that is missing)."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.start = self.peak = _resident_mib()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _resident_mib())
            time.sleep(0.005)

    def __exit__(self, *_: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.added = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.start
            return
        self.running = False
        self.thread.join()
        self.added = self.peak - self.start


def _resident_mib() -> float:
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024


@contextlib.contextmanager
def whole_forwards() -> Iterator[None]:
    """Force the fallback: every group of layers gets its statistics from whole forwards."""
    original = Blocks.chain_problem
    Blocks.chain_problem = lambda self, model: "forced by the benchmark"  # type: ignore[method-assign]
    try:
        yield
    finally:
        Blocks.chain_problem = original  # type: ignore[method-assign]


def reference_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, block: int = 128, damp: float = 0.01) -> None:
    """2:4 SparseGPT on ``weight [out, in]`` in place, float32 (the published algorithm, written plainly)."""
    w, h = weight.data.float(), hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diagonal(h).mean() * torch.eye(len(h), device=h.device)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1, inv1 = w[:, start:end].clone(), inverse[start:end, start:end]
        errors, keep = torch.zeros_like(w1), torch.zeros_like(w1, dtype=torch.bool)
        for i in range(end - start):
            if i % 4 == 0:
                scores = w1[:, i : i + 4] ** 2 / torch.diagonal(inv1)[i : i + 4] ** 2
                keep[:, i : i + 4].scatter_(1, scores.topk(2, dim=1).indices, True)
            error = (w1[:, i] - w1[:, i] * keep[:, i]) / inv1[i, i]
            w1[:, i:] -= error[:, None] * inv1[i, i:][None, :]
            w1[:, i] *= keep[:, i]
            errors[:, i] = error
        w[:, start:end] = w1
        w[:, end:] -= errors @ inverse[start:end, end:]
    weight.data.copy_(w)


def reference_wanda(weight: torch.Tensor, input_norm: torch.Tensor) -> None:
    """2:4 Wanda in place: keep the 2 of every 4 inputs with the largest |W| * ||x||."""
    scores = (weight.abs() * input_norm[None, :]).reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(2, dim=2).indices, True)
    weight.data.mul_(keep.reshape(weight.shape))


def reference(model: nn.Module, calibration: list[dict], method: str, device: torch.device) -> nn.Module:
    """Block by block: catch the first layer's inputs, then per encoder layer gather its linears'
    statistics in one pass, prune them, and run the pruned layer for the next one's inputs."""
    model = copy.deepcopy(model)
    layers = model.encoder.layer
    inputs: list[tuple] = []

    def catch(_module, args, kwargs):
        inputs.append((args, kwargs))
        raise StopIteration

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for batch in calibration:
            with contextlib.suppress(StopIteration):
                model(**{k: v.to(device) for k, v in batch.items()})
    handle.remove()
    with torch.no_grad():
        for layer in layers:
            linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
            stats = {m: torch.zeros(m.in_features, m.in_features, device=device) for m in linears}
            counts = dict.fromkeys(linears, 0)

            def accumulate(module, args, stats=stats, counts=counts):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                if method == "sparsegpt":
                    stats[module] += 2 * x.T @ x
                else:
                    stats[module].diagonal().add_(x.pow(2).sum(0))
                counts[module] += len(x)

            hooks = [m.register_forward_pre_hook(accumulate) for m in linears]
            for args, kwargs in inputs:
                layer(*args, **kwargs)
            for h in hooks:
                h.remove()
            for m in linears:
                if method == "sparsegpt":
                    reference_sparsegpt(m.weight, stats[m] / counts[m])
                else:
                    reference_wanda(m.weight, (stats[m].diagonal() / counts[m]).sqrt())
            outputs = [layer(*args, **kwargs) for args, kwargs in inputs]
            inputs = [
                ((out[0] if isinstance(out, tuple) else out, *args[1:]), kwargs)
                for out, (args, kwargs) in zip(outputs, inputs)
            ]
    return model


def synchronized(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def matmul_rate(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """The device's float32 matmul rate in FLOP/s (best of ``repeats``)."""
    size = size * 4 if device.type == "cuda" else size
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats):
        start = synchronized(device)
        a @ b
        best = min(best, synchronized(device) - start)
    return 2 * size**3 / best


def llama_block_solves(scale: float, device: torch.device) -> None:
    """SparseGPT's solves on one LLaMA-7B-shaped block (hidden 4096, MLP 11008, times ``scale``)."""
    hidden, mlp = int(4096 * scale) // 128 * 128, int(11008 * scale) // 128 * 128
    # (layers sharing one Hessian, their [rows, cols]) in a block's order
    shared = [
        (["q_proj", "k_proj", "v_proj"], (hidden, hidden)),
        (["o_proj"], (hidden, hidden)),
        (["gate_proj", "up_proj"], (mlp, hidden)),
        (["down_proj"], (hidden, mlp)),
    ]
    rate = matmul_rate(device)
    print(
        f"\nLLaMA-7B-shaped block x{scale:g} (hidden {hidden}, MLP {mlp}): SparseGPT 2:4 solves, "
        f"float32 matmul at {rate / 1e9:.0f} GFLOP/s"
    )
    print(f"{'layers':<28}{'shape':>14}{'seconds':>9}{'lower bound':>13}{'efficiency':>12}{'peak MiB':>10}")
    g = torch.Generator().manual_seed(0)
    total, bound_total = 0.0, 0.0
    for names, (rows, cols) in shared:
        x = torch.randn(4 * cols, cols, generator=g).to(device)
        hessian = 2 * x.T @ x / x.shape[0]
        weights = [torch.randn(rows, cols, generator=g).to(device) for _ in names]
        del x
        with PeakMemory(device) as memory:
            start = synchronized(device)
            factor = inverse_factor(hessian, damp=0.01, consume=True)  # once per group, as the pass does
            for weight in weights:
                prune_layer(weight, LINEAR, [factor], NMPattern(2, 4, LINEAR), block=128)
            seconds = synchronized(device) - start
        del factor
        bound = (4 / 3 * cols**3 + len(names) * rows * cols**2) / rate
        total, bound_total = total + seconds, bound_total + bound
        print(
            f"{', '.join(names):<28}{f'{rows}x{cols}':>14}{seconds:>9.1f}{bound:>13.1f}{bound / seconds:>12.0%}"
            f"{memory.added:>10.0f}"
        )
    print(f"{'block':<28}{'':>14}{total:>9.1f}{bound_total:>13.1f}{bound_total / total:>12.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="calibration sentences")
    parser.add_argument("--block-scale", type=float, default=1.0, help="LLaMA-7B block size factor (0: skip)")
    parser.add_argument("--device", default="cpu", help="where the model, statistics and solves live")
    parser.add_argument("--rows", default="nm,reconstruct", help="which MiniLM tables: nm, reconstruct")
    args = parser.parse_args()
    tables = set(args.rows.split(",")) - {""}
    if tables - {"nm", "reconstruct"}:
        parser.error(f"--rows takes nm and/or reconstruct, got {args.rows!r}")
    count, device = args.sentences, torch.device(args.device)
    torch.manual_seed(0)
    model, example = build()
    model = model.to(device)
    example = {k: v.to(device) for k, v in example.items()}
    calibration = batched(sentences(count))
    held = {k: v.to(device) for k, v in tokenize(HELD_OUT).items()}
    dense = embed(model, held)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"all-MiniLM-L6-v2, 2:4, {count} calibration sentences of 16 tokens, {where}")
    if "nm" in tables:
        print(f"{'method':<11}{'implementation':<30}{'seconds':>9}{'x reference':>13}{'cosine':>9}{'peak MiB':>10}")
    for method in ("sparsegpt", "wanda") if "nm" in tables else ():
        start = synchronized(device)
        with PeakMemory(device) as memory:
            pruned = reference(model, calibration, method, device)
        base = synchronized(device) - start
        rows = [("reference", base, embed(pruned, held), memory.added)]
        for name, context, precision in (
            ("graphprune", contextlib.nullcontext(), "float32"),
            ("graphprune, float64", contextlib.nullcontext(), "float64"),
            ("graphprune, whole forwards", whole_forwards(), "float32"),
        ):
            if method == "wanda" and name != "graphprune":
                continue  # Wanda reads every layer's statistics in one forward, and solves nothing
            with context, PeakMemory(device) as memory:
                start = synchronized(device)
                result = gp.prune(
                    model,
                    example,
                    passes=[NMSparsity(2, 4, method=method, dense_heads=False, precision=precision)],
                    calibration=calibration,
                )
                seconds = synchronized(device) - start
            rows.append((name, seconds, embed(result.module, held), memory.added))
            del result
        for name, seconds, sparse, added in rows:
            cosine = (sparse * dense).sum(-1).mean().item()
            print(f"{method:<11}{name:<30}{seconds:>9.1f}{seconds / base:>13.2f}{cosine:>9.3f}{added:>10.0f}")
    if "reconstruct" in tables:
        reconstruction_rows(model, example, calibration, held, dense, device)
    if args.block_scale:
        llama_block_solves(args.block_scale, device)


def reconstruction_rows(
    model: nn.Module, example: dict, calibration: list[dict], held: dict, dense: torch.Tensor, device: torch.device
) -> None:
    """ChannelPrune's reconstruction block by block against whole forwards (the baseline)."""
    print("\nChannelPrune(0.25, compensate='reconstruct'), whole forwards as the baseline")
    print(f"{'implementation':<30}{'seconds':>9}{'x baseline':>12}{'cosine':>9}{'peak MiB':>10}  layers")
    rows = []
    runs: tuple[tuple[str, contextlib.AbstractContextManager, str | None], ...] = (
        ("whole forwards", whole_forwards(), "reconstruct"),
        ("block by block", contextlib.nullcontext(), "reconstruct"),
        ("no reconstruction", contextlib.nullcontext(), None),
    )
    for name, context, compensate in runs:
        with context, PeakMemory(device) as memory:
            start = synchronized(device)
            result = gp.prune(
                model, example, passes=[ChannelPrune(0.25, compensate=compensate)], calibration=calibration
            )
            seconds = synchronized(device) - start
        cosine = (embed(result.module, held) * dense).sum(-1).mean().item()
        layers = result.report.rows[0].details.get("reconstruction", "-")
        rows.append((name, seconds, cosine, memory.added, layers))
        del result
    base = rows[0][1]
    for name, seconds, cosine, added, layers in rows:
        print(f"{name:<30}{seconds:>9.1f}{seconds / base:>12.2f}{cosine:>9.3f}{added:>10.0f}  {layers}")


if __name__ == "__main__":
    main()
