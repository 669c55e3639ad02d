"""Depth pruning (issue 24): residual blocks found from the graph, removed with what holds their
positions renumbered, verified against the dense model with the same blocks bypassed, carried by
plan files and checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import transformers as T
from safetensors import safe_open

import graphprune as gp
from graphprune.core.depth import BlockRemoval
from graphprune.errors import ContractError, InputError, PostconditionError
from graphprune.frontends.torch.copying import clone
from graphprune.frontends.torch.depth import POST_NORM, PRE_NORM, bypassed, survey
from graphprune.passes import BlockPrune, ChannelPrune
from tests.architectures import small_llama

IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
CALIBRATION = [(torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(s)),) for s in (1, 2)]


def _llama(layers: int = 4) -> T.LlamaForCausalLM:
    return small_llama(layers=layers)


def _qwen(layers: int = 5) -> T.Qwen2ForCausalLM:
    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention"] * (layers // 2) + ["full_attention"] * (layers % 2)
    cfg = T.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        vocab_size=100,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=types,
    )
    return T.Qwen2ForCausalLM(cfg).eval()


def _gpt2(layers: int = 4) -> T.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg).eval()


def _bert(layers: int = 4) -> T.BertModel:
    torch.manual_seed(0)
    cfg = T.BertConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    return T.BertModel(cfg, add_pooling_layer=False).eval()


ARCHITECTURES = {"llama": _llama, "qwen2": _qwen, "gpt2": _gpt2, "bert": _bert}


def _bypass_outputs(model: nn.Module, path: str, removed: list[int]) -> torch.Tensor:
    """The dense model's first output with blocks ``removed`` bypassed by forward hooks (written
    apart from graphprune's own bypass): each hands on its input stream."""

    def hand_on(_module, args, output):
        return (args[0], *output[1:]) if isinstance(output, tuple) else args[0]

    blocks = model.get_submodule(path)
    handles = [blocks[i].register_forward_hook(hand_on) for i in removed]
    try:
        with torch.no_grad():
            return model(IDS, use_cache=False)[0]
    finally:
        for handle in handles:
            handle.remove()


def _removed(result: gp.PruneResult) -> BlockRemoval:
    return next(p for p in result.plans if isinstance(p, BlockRemoval))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "gpt2" else n for n in ARCHITECTURES])
def test_removing_blocks_equals_the_dense_model_with_them_bypassed(name):
    model = ARCHITECTURES[name]()
    result = gp.prune(model, (IDS,), [BlockPrune(n=2)], calibration=CALIBRATION)
    removal = _removed(result)
    assert len(removal.removed) == 2 and len(result.module.get_submodule(removal.blocks)) == removal.count - 2
    want = _bypass_outputs(model, removal.blocks, list(removal.removed))
    with torch.no_grad():
        got = result.module(IDS, use_cache=False)[0]
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    if hasattr(result.module.config, "num_hidden_layers"):
        assert result.module.config.num_hidden_layers == removal.count - 2
    positions = [  # Hugging Face's layer_idx, wherever the family keeps it: the block's new position
        (j, m.layer_idx)
        for j, block in enumerate(result.module.get_submodule(removal.blocks))
        for m in block.modules()
        if hasattr(m, "layer_idx")
    ]
    assert positions and all(j == idx for j, idx in positions)


@pytest.mark.slow
def test_the_blocks_of_every_family_are_found_residual_from_their_graphs():
    for name, build in ARCHITECTURES.items():
        found = survey(build(), (IDS,))
        assert not found.kept, (name, found.kept)
        assert set(found.removable.values()) == ({POST_NORM} if name == "bert" else {PRE_NORM}), name


class _Block(nn.Module):
    """``x + f(x)``, or ``f(x)`` alone, or ``2x + f(x)``: one class, so the blocks form one list."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(8, 8)

    def forward(self, x):
        branch = torch.tanh(self.lin(x))
        return branch if self.kind == "plain" else 2 * x + branch if self.kind == "scaled" else x + branch


class _Chain(nn.Module):
    def __init__(self, kinds: list[str]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(k) for k in kinds)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_blocks_that_are_not_residual_are_reported_and_kept():
    torch.manual_seed(0)
    model = _Chain(["residual", "plain", "residual", "scaled", "residual"])
    x = torch.randn(4, 8)
    found = survey(model, (x,))
    assert sorted(found.removable) == [0, 2, 4] and sorted(found.kept) == [1, 3]
    assert "not its input plus a residual branch" in found.kept[1]
    result = gp.prune(model, (x,), [BlockPrune(n=3)], calibration=[(x,)])
    assert len(result.module.blocks) == 2 and [b.kind for b in result.module.blocks] == ["plain", "scaled"]
    assert "blocks.1" in result.report.rows[0].details["not removable"]
    with pytest.raises(InputError, match="only 3 of its 5 can go.*blocks.1: its output"):
        gp.prune(model, (x,), [BlockPrune(n=4)], calibration=[(x,)])


@pytest.mark.slow
def test_the_least_important_block_goes_first_by_each_criterion():
    torch.manual_seed(0)
    model = _Chain(["residual"] * 4)
    with torch.no_grad():
        model.blocks[2].lin.weight.zero_()
        model.blocks[2].lin.bias.zero_()  # block 2 is the identity: no criterion can keep it
    x = torch.randn(16, 8)
    for importance in ("cosine", "output"):
        result = gp.prune(model, (x,), [BlockPrune(n=1, importance=importance)], calibration=[(x,)])
        assert _removed(result).removed == (2,), importance
    bypassed = []

    def loss(m: nn.Module) -> float:  # the loss of the model as it is called: block 1's bypass is cheapest
        bypassed.append(float(m(x).sum()))
        return 0.0 if len(bypassed) == 2 else 1.0

    result = gp.prune(model, (x,), [BlockPrune(n=1, importance=loss)])
    assert _removed(result).removed == (1,) and len(bypassed) == 4 and len(set(bypassed)) == 4
    kept = gp.prune(model, (x,), [BlockPrune(n=1, ignore=[2], importance="output")], calibration=[(x,)])
    assert 2 not in _removed(kept).removed


def test_ratio_ignore_and_bad_arguments_are_checked():
    model, x = _Chain(["residual"] * 4), torch.randn(4, 8)
    assert len(_removed(gp.prune(model, (x,), [BlockPrune(ratio=0.5)], calibration=[(x,)])).removed) == 2
    kept = gp.prune(model, (x,), [BlockPrune(n=3, ignore=["blocks.0"])], calibration=[(x,)])
    assert _removed(kept).removed == (1, 2, 3)
    for bad, message in (
        (dict(), "n= or ratio="),
        (dict(n=1, ratio=0.5), "n= or ratio="),
        (dict(n=0), "positive number of blocks"),
        (dict(ratio=1.5), "between 0 and 1"),
        (dict(n=1, importance="perplexity"), "importance must be one of"),
        (dict(n=1, ignore=[1.5]), "block names or positions"),
    ):
        with pytest.raises(InputError, match=message):
            BlockPrune(**bad)
    for passes, message in (
        ([BlockPrune(n=1, ignore=["head"])], "'head' is not a block of blocks"),
        ([BlockPrune(n=1, ignore=[7])], "position 7 is outside the 4 blocks"),
        ([BlockPrune(ratio=0.1)], "removes none"),
        ([BlockPrune(n=4)], "cannot remove 4 of the 4 blocks of blocks: one must stay"),
        ([BlockPrune(n=1, blocks="head")], "not a non-empty ModuleList"),
    ):
        with pytest.raises(InputError, match=message):
            gp.prune(model, (x,), passes, calibration=[(x,)])
    with pytest.raises(InputError, match="needs calibration data"):
        gp.prune(model, (x,), [BlockPrune(n=1)])
    with pytest.raises(ContractError, match="BlockPrune runs on a dense model"):
        gp.prune(model, (x,), [ChannelPrune(0.25), BlockPrune(n=1)], calibration=[(x,)])


class _ReadsABlock(_Chain):
    """Its head also reads block 1's weight by position: removing a block changes what that reads."""

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x + self.blocks[1].lin.bias)


def test_a_removal_the_bypass_does_not_explain_is_refused_and_nothing_is_lost():
    torch.manual_seed(0)
    model, x = _ReadsABlock(["residual"] * 3), torch.randn(4, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PostconditionError, match="changed the outputs.*against the model with those blocks bypassed"):
        gp.prune(model, (x,), [BlockPrune(n=1, ignore=[2], importance="output")], calibration=[(x,)])
    assert len(model.blocks) == 3 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_the_pruned_model_still_generates_with_its_cache():
    result = gp.prune(_qwen(), (IDS,), [BlockPrune(n=2)], calibration=CALIBRATION)
    kept = _removed(result).kept
    assert result.module.config.layer_types == [_qwen().config.layer_types[i] for i in kept]
    out = result.module.generate(IDS, max_new_tokens=4, do_sample=False)
    with torch.no_grad():  # greedy decoding with the cache equals decoding without it
        step = result.module(out[:, :-1], use_cache=False).logits[:, IDS.shape[1] - 1 :].argmax(-1)
    assert torch.equal(step, out[:, IDS.shape[1] :])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "bert"])
def test_depth_and_width_plans_round_trip_through_checkpoints_and_plan_files(name, tmp_path):
    model = ARCHITECTURES[name]()
    model.save_pretrained(tmp_path / "source", max_shard_size="100KB")
    width = ChannelPrune(0.5, round_to=8, heads=False) if name == "llama" else None
    passes = [BlockPrune(n=2, importance="output")] + ([width] if width else [])
    result = gp.prune(model, (IDS,), passes, calibration=CALIBRATION)
    result.save_plan(tmp_path / "plan")
    plan = gp.PlanFile.load(tmp_path / "plan.json")
    assert plan.depth == _removed(result) and "blocks removed from" in plan.describe()
    report = gp.apply_to_checkpoint(tmp_path / "plan.json", tmp_path / "source", tmp_path / "out")
    key = "n_layer" if name == "gpt2" else "num_hidden_layers"
    assert report.config[key] == plan.depth.count - 2
    loader = T.AutoModel if name == "bert" else T.AutoModelForCausalLM
    loaded = loader.from_pretrained(tmp_path / "out").eval()
    replayed = gp.apply_plan_file(model, (IDS,), tmp_path / "plan.json")
    with torch.no_grad():
        want = result.module(IDS, use_cache=False)[0]
        assert torch.allclose(loaded(IDS, use_cache=False)[0], want, atol=1e-6)
        assert torch.equal(replayed(IDS, use_cache=False)[0], want)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    written = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            written.update(dict.fromkeys(f.keys(), shard.name))
    assert index["weight_map"] == written and all(name in loaded.state_dict() for name in written)


@pytest.mark.slow
def test_a_checkpoint_of_another_depth_is_refused_before_anything_is_written(tmp_path):
    _llama(layers=3).save_pretrained(tmp_path / "source")
    gp.prune(_llama(), (IDS,), [BlockPrune(n=1)], calibration=CALIBRATION).save_plan(tmp_path / "plan")
    with pytest.raises(InputError, match="4-block list model.layers.*num_hidden_layers = 3"):
        gp.apply_to_checkpoint(tmp_path / "plan.json", tmp_path / "source", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_block_removal_names():
    removal = BlockRemoval("model.layers", 5, (1, 3))
    assert removal.kept == [0, 2, 4]
    assert removal.renamed("model.layers.4.mlp.up.weight") == "model.layers.2.mlp.up.weight"
    assert removal.renamed("model.layers.3.mlp.up.weight") is None
    assert removal.renamed("model.layers_extra.1.w") == "model.layers_extra.1.w"
    assert removal.renamed("lm_head.weight") == "lm_head.weight"
    for name in ("model.layers.0.w", "model.layers.2.w", "model.layers.4.w"):
        assert removal.original(removal.renamed(name)) == name
    for bad in ((), (3, 1), (1, 1), (5,), (0, 1, 2, 3, 4)):
        with pytest.raises(InputError):
            BlockRemoval("model.layers", 5, bad)


@pytest.mark.slow
def test_the_caller_model_is_untouched_and_the_result_exports_to_onnx(tmp_path):
    model = _bert()
    dense = clone(model)
    result = gp.prune(model, (IDS,), [BlockPrune(n=1)], calibration=CALIBRATION)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))
    assert len(model.encoder.layer) == 4 and model.config.num_hidden_layers == 4
    report = result.export_onnx(tmp_path / "m.onnx")
    assert report.max_error <= report.tolerance


@pytest.mark.slow
def test_iterative_removal_scores_again_and_beats_summed_drop_one_scores():
    """Blocks 0 and 1 add the same small constant, block 2 a larger orthogonal one: each of 0 and 1
    alone matters least, together they matter more than 0 with 2 (0.6^2 > 0.3^2 + 0.5^2)."""
    model, x = _Chain(["residual"] * 4), torch.randn(16, 8)
    branches = [(0, 0.3), (0, 0.3), (1, 0.5), (2, 0.9)]  # (direction, size) of each block's constant
    with torch.no_grad():
        for block, (axis, size) in zip(model.blocks, branches):
            block.lin.weight.zero_()
            block.lin.bias.zero_()
            block.lin.bias[axis] = torch.atanh(torch.tensor(size))
        model.head.weight.copy_(torch.eye(3, 8))
        model.head.bias.zero_()
    dense = model(x).detach()
    changes = {}
    for iterative in (False, True):
        result = gp.prune(model, (x,), [BlockPrune(n=2, importance="output", iterative=iterative)], calibration=[(x,)])
        changes[iterative] = (_removed(result).removed, float((result.module(x) - dense).detach().square().sum()))
    assert changes[False][0] == (0, 1) and changes[True][0] == (0, 2)
    assert changes[True][1] < changes[False][1]


@pytest.mark.slow
def test_a_streamed_depth_plan_is_the_plan_made_in_memory_and_applies_to_its_checkpoint(tmp_path):
    """Block importance block by block over weights read from the checkpoint, the blocks after the
    removal read under their old names there, and width pruning after it."""
    model = _llama()
    model.save_pretrained(tmp_path / "source", max_shard_size="100KB")
    with gp.parameters_on_meta():
        meta = T.LlamaForCausalLM(T.LlamaConfig(**model.config.to_dict())).eval()
    passes = lambda: [BlockPrune(n=2), ChannelPrune(0.5, round_to=8, heads=False)]  # noqa: E731
    streamed = gp.plan(meta, (IDS,), passes(), calibration=CALIBRATION, weights=tmp_path / "source")
    in_memory = gp.plan(model, (IDS,), passes(), calibration=CALIBRATION)
    assert streamed.depth is not None and streamed.depth == in_memory.depth and streamed.diff(in_memory) == []
    assert all(p.device.type == "meta" for p in meta.parameters()) and len(meta.model.layers) == 4
    streamed.save(tmp_path / "plan")
    gp.apply_to_checkpoint(tmp_path / "plan.json", tmp_path / "source", tmp_path / "out")
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    pruned = gp.prune(model, (IDS,), passes(), calibration=CALIBRATION).module
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, pruned(IDS).logits, atol=1e-6)
    with pytest.raises(InputError, match="importance='cosine' only"):
        gp.plan(meta, (IDS,), [BlockPrune(n=1, importance="output")], calibration=CALIBRATION, weights=tmp_path)


def test_a_bypass_puts_back_the_forward_a_block_had_of_its_own():
    model, x = _Chain(["residual"] * 3), torch.randn(4, 8)
    wrapped = model.blocks[1].forward  # a wrapper set on the instance, as hooks libraries do
    model.blocks[1].forward = lambda t: wrapped(t)
    own = vars(model.blocks[1])["forward"]
    with bypassed(model.blocks, [0, 1]):
        with torch.no_grad():
            assert torch.equal(model(x), model.head(model.blocks[2](x)))
    assert vars(model.blocks[1])["forward"] is own and "forward" not in vars(model.blocks[0])
