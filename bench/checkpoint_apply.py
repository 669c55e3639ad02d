"""A checkpoint larger than half of this machine's memory: plan on meta, apply shard by shard.

The script writes a LLaMA-7B-shaped checkpoint (hidden 4096, MLP 11008, 32 heads, ``--layers``
decoder layers, random fp16 weights) as 2 GB safetensors shards, one shard in memory at a time.
graphprune then plans on the ``meta`` device (no weights: MLP channels chosen by a weight-free
criterion, since streaming calibration is not built yet) and applies the plan with
``gp.apply_to_checkpoint``. Each step runs in its own process and reports its own peak resident
memory; the baseline, in the same run, is holding the whole checkpoint in memory (safetensors'
tensors copied out of their memory map, as pruning a loaded model needs them).

    python -m bench.checkpoint_apply [--layers 32] [--folder /tmp/gp-ckpt]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import time
from pathlib import Path

import torch

SHARD_BYTES = 2 << 30


def config(layers: int):
    import transformers as T

    return T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=layers, vocab_size=32000, torch_dtype="float16")


def generate(folder: Path, layers: int) -> None:
    """Random fp16 shards named and shaped as LlamaForCausalLM's state dict, with index and config."""
    import transformers as T
    from safetensors.torch import save_file

    cfg = config(layers)
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
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def plan(folder: Path, layers: int) -> dict:
    import transformers as T

    import graphprune as gp
    from graphprune.passes import ChannelPrune

    with torch.device("meta"):
        model = T.LlamaForCausalLM(config(layers))
    by_index = ChannelPrune(0.5, heads=False, ignore=["model.embed_tokens"],
                            importance=lambda analysis, group, model: -torch.arange(group.size).double())
    result = gp.prune(model, {"input_ids": torch.zeros(1, 16, dtype=torch.long)}, passes=[by_index])
    result.save_plan(folder / "plan")
    return {"groups pruned": result.report.rows[0].details["groups pruned"]}


def apply(folder: Path, layers: int) -> dict:
    import graphprune as gp

    report = gp.apply_to_checkpoint(folder / "plan.json", folder / "source", folder / "pruned",
                                    config={"intermediate_size": 5504})
    return {"GB before": report.bytes_before / 1e9, "GB after": report.bytes_after / 1e9}


def load_whole(folder: Path, layers: int) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted((folder / "source").glob("*.safetensors")):
        # copied out of the memory map, as an in-memory pruning flow holds them
        tensors.update({name: t.clone() for name, t in load_file(str(shard)).items()})
    return {"tensors": len(tensors)}


def _child(step, folder: Path, layers: int, queue) -> None:
    start = time.perf_counter()
    extra = step(folder, layers)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    queue.put((seconds, peak, extra))


def measured(step, folder: Path, layers: int) -> tuple[float, float, dict]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(step, folder, layers, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--folder", default="/tmp/gp-ckpt")
    args = parser.parse_args()
    folder = Path(args.folder)
    if folder.exists():
        shutil.rmtree(folder)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        seconds, _, _ = measured(generate, folder / "source", args.layers)
        size = sum(p.stat().st_size for p in (folder / "source").glob("*.safetensors")) / 2**30
        print(f"LLaMA-7B shape, {args.layers} layers, fp16: {size:.1f} GiB in "
              f"{len(list((folder / 'source').glob('*.safetensors')))} shards (machine memory {memory:.1f} GiB); "
              f"written in {seconds:.0f} s")
        print(f"{'step':<44}{'seconds':>9}{'peak RSS GiB':>14}")
        rows = [("plan on meta (analysis + ChannelPrune)", plan), ("apply_to_checkpoint (shard by shard)", apply),
                ("baseline: load the whole checkpoint", load_whole)]
        for label, step in rows:
            seconds, peak, extra = measured(step, folder, args.layers)
            print(f"{label:<44}{seconds:>9.1f}{peak:>14.2f}  {extra}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
