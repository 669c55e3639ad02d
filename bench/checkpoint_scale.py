"""A checkpoint larger than half of this machine's memory: plan with statistics streamed from it,
apply the plan shard by shard.

The script writes a LLaMA-7B-shaped checkpoint (hidden 4096, MLP 11008, 32 heads, ``--layers``
decoder layers, random fp16 weights) as 2 GB safetensors shards, one shard in memory at a time.
Then, each step in its own process reporting its own peak resident memory:

* plan on ``meta`` with a weight-free criterion (no checkpoint read at all);
* streamed plans (``gp.plan(..., weights=checkpoint)``, calibration ``--batches`` x 128 random
  tokens, computed in float32): MLP channels by activation statistics, then Wanda 2:4, over every
  block; and SparseGPT 2:4 on the first ``--sparsegpt-blocks`` blocks (the stream still walks all
  of them; SparseGPT's own cost here is about 85 s per 7B block on 2 cores);
* ``gp.apply_to_checkpoint`` of the weight-free plan (``config=`` given) and of the streamed one
  (``config.json``'s new sizes inferred from the architecture's shapes).

The baseline, in the same run, is holding the whole checkpoint in memory (safetensors' tensors
copied out of their memory map, as pruning a loaded model needs them).

    python -m bench.checkpoint_scale [--layers 32] [--batches 4] [--sparsegpt-blocks 2] [--only STEP ...]
                                     [--folder /tmp]

It works in a new folder it makes inside ``--folder`` (which must have room for the checkpoint)
and removes only that folder at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHARD_BYTES = 2 << 30


def config(layers: int):
    import transformers as T

    return T.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers,
        vocab_size=32000,
        torch_dtype="float16",
    )


def generate(folder: Path, args) -> None:
    """Random fp16 shards named and shaped as LlamaForCausalLM's state dict, with index and config."""
    import transformers as T
    from safetensors.torch import save_file

    cfg = config(args.layers)
    cfg.architectures = ["LlamaForCausalLM"]  # as a real checkpoint's config says: what transformers builds
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in T.LlamaForCausalLM(cfg).state_dict().items()}
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    shard, size, weight_map, files = {}, 0, {}, []
    names = list(shapes)
    for i, name in enumerate(names):
        shard[name] = torch.randn(shapes[name], dtype=torch.float16) * 0.02
        size += shard[name].numel() * 2
        if size >= SHARD_BYTES or i == len(names) - 1:
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shard, str(folder / files[-1]), metadata={"format": "pt"})
            weight_map.update({n: files[-1] for n in shard})
            shard, size = {}, 0
    total = sum(shapes[n].numel() * 2 for n in names)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


def _meta_model(layers: int):
    import transformers as T

    import graphprune as gp

    with gp.parameters_on_meta():  # RoPE tables real, weights on meta
        return T.LlamaForCausalLM(config(layers))


def _batches(count: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 32000, (1, 128), generator=g)} for _ in range(count)]


EXAMPLE = {"input_ids": torch.zeros(1, 16, dtype=torch.long)}


def plan(folder: Path, args) -> dict:
    import transformers as T

    import graphprune as gp
    from graphprune.passes import ChannelPrune

    with torch.device("meta"):
        model = T.LlamaForCausalLM(config(args.layers))
    by_index = ChannelPrune(
        0.5,
        heads=False,
        ignore=["model.embed_tokens"],
        importance=lambda analysis, group, model: -torch.arange(group.size).double(),
    )
    result = gp.prune(model, EXAMPLE, passes=[by_index])
    result.save_plan(folder / "plan")
    return {"groups pruned": result.report.rows[0].details["groups pruned"]}


def plan_streamed(folder: Path, args) -> dict:
    import graphprune as gp
    from graphprune.passes import ChannelPrune, NMSparsity

    passes = [
        ChannelPrune(0.25, heads=False, ignore=["model.embed_tokens"], importance="activation"),
        NMSparsity(2, 4, method="wanda"),
    ]
    decided = gp.plan(
        _meta_model(args.layers),
        EXAMPLE,
        passes,
        calibration=_batches(args.batches),
        weights=folder / "source",
        scratch=folder,
    )
    decided.save(folder / "streamed")
    kept = sorted({len(k) for k in decided.structured[0].keep.values()})
    return {"masks": len(decided.masks), "MLP channels kept": kept}


def plan_sparsegpt(folder: Path, args) -> dict:
    import graphprune as gp
    from graphprune.passes import NMSparsity

    later = [f"model.layers.{i}" for i in range(args.sparsegpt_blocks, args.layers)]
    decided = gp.plan(
        _meta_model(args.layers),
        EXAMPLE,
        [NMSparsity(2, 4, method="sparsegpt", ignore=later)],
        calibration=_batches(args.batches),
        weights=folder / "source",
        scratch=folder,
    )
    return {"masks": len(decided.masks), "new values": len(decided.values)}


def apply(folder: Path, args) -> dict:
    import graphprune as gp

    report = gp.apply_to_checkpoint(
        folder / "plan.json", folder / "source", folder / "pruned", config={"intermediate_size": 5504}
    )
    return {"GB before": round(report.bytes_before / 1e9, 2), "GB after": round(report.bytes_after / 1e9, 2)}


def apply_streamed(folder: Path, args) -> dict:
    import graphprune as gp

    report = gp.apply_to_checkpoint(folder / "streamed.json", folder / "source", folder / "pruned-streamed")
    return {
        "GB before": round(report.bytes_before / 1e9, 2),
        "GB after": round(report.bytes_after / 1e9, 2),
        "config inferred": report.config,
    }


def load_whole(folder: Path, args) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted((folder / "source").glob("*.safetensors")):
        # copied out of the memory map, as an in-memory pruning flow holds them
        tensors.update({name: t.clone() for name, t in load_file(str(shard)).items()})
    return {"tensors": len(tensors)}


def _child(step, folder: Path, args, queue) -> None:
    start = time.perf_counter()
    try:
        extra = step(folder, args)
    except BaseException as exc:  # the parent must not wait forever for a step that failed
        queue.put(exc)
        raise
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    queue.put((seconds, peak, extra))


def measured(step, folder: Path, args) -> tuple[float, float, dict]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(step, folder, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if isinstance(result, BaseException):
        raise RuntimeError(f"step {step.__name__} failed") from result
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--sparsegpt-blocks", type=int, default=2)
    parser.add_argument(
        "--only",
        nargs="*",
        help="run only these steps (function names, e.g. plan_streamed "
        "apply_streamed load_whole); the checkpoint is always written",
    )
    parser.add_argument(
        "--folder",
        default=tempfile.gettempdir(),
        help="where to make the working folder (a new one, removed at the end)",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gp-ckpt-", dir=args.folder))  # never a folder the user already has
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        seconds, _, _ = measured(generate, folder / "source", args)
        size = sum(p.stat().st_size for p in (folder / "source").glob("*.safetensors")) / 2**30
        print(
            f"LLaMA-7B shape, {args.layers} layers, fp16: {size:.1f} GiB in "
            f"{len(list((folder / 'source').glob('*.safetensors')))} shards (machine memory {memory:.1f} GiB); "
            f"written in {seconds:.0f} s"
        )
        print(f"{'step':<58}{'seconds':>9}{'peak RSS GiB':>14}")
        rows = [
            ("plan on meta (weight-free criterion)", plan),
            ("streamed plan: activation channels + Wanda 2:4", plan_streamed),
            (f"streamed plan: SparseGPT 2:4, blocks 0-{args.sparsegpt_blocks - 1}", plan_sparsegpt),
            ("apply_to_checkpoint: weight-free plan", apply),
            ("apply_to_checkpoint: streamed plan", apply_streamed),
            ("baseline: load the whole checkpoint", load_whole),
        ]
        for label, step in rows:
            if args.only and step.__name__ not in args.only:
                continue
            seconds, peak, extra = measured(step, folder, args)
            print(f"{label:<58}{seconds:>9.1f}{peak:>14.2f}  {extra}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
