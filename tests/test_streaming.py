"""Streamed plans: a model on meta, weights read from a checkpoint block by block (issue 10).

The oracle everywhere: the streamed plan is the plan the same passes make on the model in memory
(``PlanFile.diff`` empty: kept channels, every mask entry, every SparseGPT value bit for bit).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import transformers as T
from safetensors.torch import save_file

import graphprune as gp
from graphprune.frontends.torch.copying import clone
from graphprune.frontends.torch.streaming import Stream
from graphprune.passes import ChannelPrune, NMSparsity, Quantize
from tests import architectures

IDS = {"input_ids": torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))}
BATCHES = [{"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(3)]
LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=3,
    vocab_size=100,
    head_dim=16,
    use_cache=False,
)

PIPELINES = {
    "wanda": lambda: [NMSparsity(2, 4, method="wanda")],
    "channels by activation, then sparsegpt": lambda: [
        ChannelPrune(0.5, round_to=8, importance="activation"),
        NMSparsity(2, 4, method="sparsegpt"),
    ],
    "channels by l2, then magnitude 4:8": lambda: [ChannelPrune(0.25, round_to=4), NMSparsity(4, 8)],
    "wanda, refined": lambda: [NMSparsity(2, 4, method="wanda", refine=True)],
    "sparsegpt, refined": lambda: [NMSparsity(2, 4, method="sparsegpt", refine=True)],
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 3-layer LLaMA, its multi-shard checkpoint, and the same architecture with parameters on meta."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, max_shard_size="100KB")
    with gp.parameters_on_meta():
        meta = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).eval()
    return model, folder, meta


@pytest.mark.parametrize(
    "pipeline", [p if p == "wanda" else pytest.param(p, marks=pytest.mark.slow) for p in PIPELINES]
)
def test_a_streamed_plan_is_the_plan_made_in_memory(llama, pipeline):
    model, folder, meta = llama
    streamed = gp.plan(meta, IDS, PIPELINES[pipeline](), calibration=BATCHES, weights=folder)
    in_memory = gp.plan(model, IDS, PIPELINES[pipeline](), calibration=BATCHES)
    assert streamed.masks and streamed.diff(in_memory) == []
    assert bool(streamed.values) == ("sparsegpt" in pipeline)
    assert all(p.device.type == "meta" for p in meta.parameters())  # the caller's model is untouched


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in ("gpt2", "bert", "qwen3")])
def test_streaming_works_across_architectures(name, tmp_path):
    """GPT-2 (Conv1D, lm_head tied to the embedding), BERT (blocks return tuples, a pooler after
    them), Qwen3 (q/k norms)."""
    torch.manual_seed(0)
    model, inputs = getattr(architectures, name)()
    model.eval().save_pretrained(tmp_path, max_shard_size="200KB")
    with gp.parameters_on_meta():
        meta = type(model)(model.config).eval()
    passes = lambda: [ChannelPrune(0.25, importance="activation"), NMSparsity(2, 4, method="sparsegpt")]  # noqa: E731
    streamed = gp.plan(meta, inputs, passes(), calibration=[inputs, inputs], weights=tmp_path)
    assert streamed.values and streamed.diff(gp.plan(model, inputs, passes(), calibration=[inputs, inputs])) == []


def test_one_block_is_loaded_at_a_time(llama, monkeypatch):
    _, folder, meta = llama
    loaded_now: list[str] = []
    most = [0]
    real_loaded = Stream.loaded

    @contextlib.contextmanager
    def counting(self, model, modules):
        blocks = {name for name, _ in modules if name.count(".") == 2 and name.startswith("model.layers.")}
        loaded_now.extend(blocks)
        most[0] = max(most[0], len(loaded_now))
        try:
            with real_loaded(self, model, modules):
                yield
        finally:
            for block in blocks:
                loaded_now.remove(block)

    monkeypatch.setattr(Stream, "loaded", counting)
    gp.plan(meta, IDS, [NMSparsity(2, 4, method="sparsegpt")], calibration=BATCHES, weights=folder)
    assert most[0] == 1


@pytest.mark.slow
def test_a_streamed_sparsegpt_plan_applied_to_the_checkpoint_computes_what_the_pruned_model_does(llama, tmp_path):
    model, folder, meta = llama

    def passes():
        return [
            ChannelPrune(0.5, round_to=8, importance="activation"),
            NMSparsity(2, 4, method="sparsegpt"),
        ]

    gp.plan(meta, IDS, passes(), calibration=BATCHES, weights=folder).save(tmp_path / "plan")
    report = gp.apply_to_checkpoint(tmp_path / "plan.json", folder, tmp_path / "pruned")  # config.json inferred
    assert report.config == {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
    }
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    pruned = gp.finalize(clone(gp.prune(model, IDS, passes(), calibration=BATCHES).module))
    with torch.no_grad():
        assert torch.allclose(loaded(**IDS).logits, pruned(**IDS).logits, atol=1e-5)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Chain(nn.Module):
    """Plain torch blocks, not transformers: a stem, a list of residual MLP blocks, a head."""

    def __init__(self, parallel: bool = False) -> None:
        super().__init__()
        self.parallel = parallel
        self.stem = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(Residual() for _ in range(3))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.parallel:  # every block reads the stem's output: not a chain
            return self.head(sum(block(h) for block in self.blocks))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _chain(tmp_path, parallel: bool = False):
    torch.manual_seed(0)
    model = Chain(parallel).eval()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    with gp.parameters_on_meta():
        meta = Chain(parallel).eval()
    return model, meta, tmp_path / "model.safetensors"


def test_any_module_with_a_list_of_blocks_streams(tmp_path):
    """SparseGPT also masks the layers before the blocks (the stem) and after them (the head, here)."""
    model, meta, weights = _chain(tmp_path)
    batches = [torch.randn(5, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def passes():
        return [
            ChannelPrune(0.5, importance="fluctuation"),
            NMSparsity(2, 4, method="sparsegpt", dense_heads=False),
        ]

    streamed = gp.plan(meta, (batches[0],), passes(), calibration=batches, weights=weights)
    assert {"stem.weight", "head.weight"} < set(streamed.values)
    assert streamed.diff(gp.plan(model, (batches[0],), passes(), calibration=batches)) == []


def test_blocks_that_are_not_a_chain_are_refused(tmp_path):
    _, meta, weights = _chain(tmp_path, parallel=True)
    x = torch.randn(5, 8)
    with pytest.raises(gp.InputError, match="do not form a chain"):
        gp.plan(meta, (x,), [NMSparsity(2, 4, method="wanda")], calibration=[x], weights=weights)
    with pytest.raises(gp.InputError, match="blocks='stem' is a Linear"):
        gp.plan(meta, (x,), [NMSparsity(2, 4, method="wanda")], calibration=[x], weights=weights, blocks="stem")


@pytest.mark.slow
def test_what_a_streamed_plan_cannot_do_is_refused_up_front(llama, tmp_path):
    model, folder, meta = llama
    with pytest.raises(gp.InputError, match="parameters must be on meta"):
        gp.plan(model, IDS, [NMSparsity(2, 4)], weights=folder)
    with pytest.raises(gp.InputError, match="blocks apply to streamed plans only"):
        gp.plan(model, IDS, [NMSparsity(2, 4)], blocks="model.layers")
    with pytest.raises(gp.InputError, match=r"compensate='bias'\) needs the whole model in memory"):
        gp.plan(meta, IDS, [ChannelPrune(0.5, compensate="bias")], calibration=BATCHES, weights=folder)
    with pytest.raises(gp.InputError, match="Quantize does not run in a streamed plan"):
        gp.plan(meta, IDS, [Quantize()], calibration=BATCHES, weights=folder)
    with pytest.raises(gp.InputError, match="needs calibration data"):
        gp.plan(meta, IDS, [NMSparsity(2, 4, method="wanda")], weights=folder)
    with pytest.raises(gp.InputError, match="no .safetensors files"):
        gp.plan(meta, IDS, [NMSparsity(2, 4)], weights=tmp_path)
    with gp.parameters_on_meta():
        other = T.LlamaForCausalLM(T.LlamaConfig(**dict(LLAMA, intermediate_size=96))).eval()
    with pytest.raises(gp.InputError, match="not the checkpoint of this model"):
        gp.plan(other, IDS, [NMSparsity(2, 4)], weights=folder)
    with torch.device("meta"):  # buffers on meta too: RoPE's inv_freq is in no checkpoint
        all_meta = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).eval()
    with pytest.raises(gp.InputError, match=r"inv_freq is not in the checkpoint(?s:.*)parameters_on_meta"):
        gp.plan(all_meta, IDS, [NMSparsity(2, 4, method="wanda")], calibration=BATCHES, weights=folder)
    with pytest.raises(gp.InputError, match=r"closest: model\.layers"):
        gp.plan(meta, IDS, [NMSparsity(2, 4)], weights=folder, prefix="transformer.")
