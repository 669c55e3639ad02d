"""The public contract: gp.analyze, gp.prune, ChannelPrune options, pass order, recipes, bad input."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn as nn
import transformers as T

import graphprune as gp
from graphprune.core.pipeline import MODULE, ONNX, STREAMED, Pass, PassManager, PassResult, Stage
from graphprune.core.report import Report
from graphprune.frontends.torch.capture import capture
from graphprune.frontends.torch.state import CompressionState
from graphprune.passes import ChannelPrune, NMSparsity, Quantize
from samples import resnet
from tests.oracles import outputs


@pytest.fixture(scope="module")
def sample():
    return resnet.build()


def test_prune_returns_smaller_model_with_same_interface(sample):
    model, x = sample
    result = gp.prune(model, x, passes=[ChannelPrune(ratio=0.5, round_to=8)])
    assert result.module(*x).shape == model(*x).shape
    assert result.stage is Stage.STRUCTURED
    text = str(result.report)
    assert "ChannelPrune" in text and "params" in text and "MACs" in text
    row = result.report.rows[0]
    assert row.params_after < row.params_before and row.macs_after < row.macs_before and row.seconds > 0


def test_round_to_keeps_every_channel_count_a_multiple(sample):
    model, x = sample
    result = gp.prune(model, x, passes=[ChannelPrune(ratio=0.37, round_to=8)])
    for m in result.module.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels != 3:
            assert m.in_channels % 8 == 0 and m.out_channels % 8 == 0, m


def test_caller_model_untouched_unless_inplace(sample):
    model, x = sample
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gp.prune(model, x, passes=[ChannelPrune(0.5)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    copy = resnet.build()[0]
    result = gp.prune(copy, x, passes=[ChannelPrune(0.5)], inplace=True)
    assert result.module is copy and copy.fc.in_features == 128


def test_ignore_and_per_module_ratios(sample):
    model, x = sample
    result = gp.prune(model, x, passes=[ChannelPrune(0.5, ignore=["layers.0"], ratios={"layers.7": 0.25})])
    assert result.module.layers[0].conv1.out_channels == 32  # ignored
    assert result.module.layers[7].conv1.out_channels == 192  # 256 * (1 - 0.25)
    assert result.module.layers[3].conv1.out_channels == 32  # 64 * 0.5


@pytest.mark.slow
def test_global_ranking_respects_the_cap(sample):
    model, x = sample
    result = gp.prune(model, x, passes=[ChannelPrune(0.5, allocation="global", max_ratio=0.6)])
    before, after = gp.analyze(model, x), gp.analyze(result.module, x)
    assert sum(g.size for g in after.groups) <= 0.51 * sum(g.size for g in before.groups)
    assert all(
        m.out_channels >= 0.4 * o.out_channels - 1
        for m, o in zip(result.module.modules(), model.modules())
        if isinstance(m, nn.Conv2d)
    )


def test_global_normalization_decides_how_groups_compete():
    """Two hidden layers whose weights differ in scale by 100x: raw scores ("none") take the cheap
    layer down to the cap; per-group normalisation spreads the cut over both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(100)
        model[2].weight.mul_(0.01)  # the first hidden group (rows of 0, columns of 2) outscores the second
    x = (torch.randn(4, 8),)

    def widths(normalize: str) -> tuple[int, int]:
        pruned = gp.prune(model, x, passes=[ChannelPrune(0.5, allocation="global", normalize=normalize)]).module
        return pruned[0].out_features, pruned[2].out_features

    assert widths("none") == (14, 2)  # the second group down to max_ratio=0.9 of 16 removed (floor: 14)
    for normalize in ("mean", "max", "l2", "sum"):
        first, second = widths(normalize)
        assert first + second == 16 and min(first, second) >= 4, (normalize, first, second)
    with pytest.raises(gp.InputError, match="applies to allocation='global' only"):
        ChannelPrune(0.5, normalize="max")
    with pytest.raises(gp.InputError, match="normalize must be one of"):
        ChannelPrune(0.5, allocation="global", normalize="median")


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale"])
def test_importance_keeps_the_strongest_channels(criterion):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    strong = [1, 4, 6, 7]
    with torch.no_grad():
        scale = torch.full((8,), 0.01)
        scale[strong] = 1.0
        model[0].weight.mul_(scale[:, None, None, None])
        model[1].weight.copy_(scale)
        model[3].weight.mul_(scale[None, :, None, None])
    x = torch.randn(1, 3, 4, 4)
    result = gp.prune(model, (x,), passes=[ChannelPrune(0.5, importance=criterion)])
    kept = result.module[1].weight.detach()
    assert torch.allclose(kept, model[1].weight.detach()[strong])


def test_keyword_inputs_and_hf_output_objects():
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=50)
    model = T.BertModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 50, (1, 6)), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    out = result.module(**inputs)
    assert out.last_hidden_state.shape == (1, 6, 32) and out.pooler_output.shape == (1, 32)


@pytest.mark.slow
def test_meta_device_analysis_allocates_no_weights():
    cfg = T.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    start = time.perf_counter()
    analysis = gp.analyze(model, {"input_ids": torch.randint(0, 32000, (1, 16))})
    assert time.perf_counter() - start < 60
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len([g for g in analysis.groups if g.size == 11008]) == 32  # one MLP group per layer
    assert len([g for g in analysis.groups if "heads" in g.tags]) == 32


def test_meta_device_prune_is_verified_structurally():
    cfg = T.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    inputs = {"input_ids": torch.randint(0, 100, (1, 8))}
    with pytest.raises(gp.InputError, match="meta device"):
        gp.prune(model, inputs, passes=[ChannelPrune(0.5)])
    by_index = ChannelPrune(0.5, importance=lambda analysis, group, model: -torch.arange(group.size).double())
    result = gp.prune(model, inputs, passes=[by_index])
    assert result.module.model.layers[0].mlp.up_proj.weight.shape == (64, 32)
    assert result.report.rows[0].output_error is None


def test_head_dim_pruning_on_request_keeps_llama_consistent():
    cfg = T.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = T.LlamaForCausalLM(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 100, (1, 8))}
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5, heads=False, head_dim=True)])
    attn = result.module.model.layers[1].self_attn
    assert attn.head_dim == 8 and attn.q_proj.out_features == 32 and attn.v_proj.out_features == 16
    assert result.module.model.rotary_emb.inv_freq.shape == (4,)
    assert outputs(result.module, inputs)[0].shape == (1, 8, 100)


# ----------------------------------------------------------------- contracts
class _FakeMask(Pass):
    """A stand-in for a sparsity pass: it only moves the stage forward."""

    accepts = frozenset({Stage.DENSE, Stage.STRUCTURED})
    produces = Stage.MASKED

    def call(self, state: CompressionState) -> PassResult:
        state.stage = Stage.MASKED
        return PassResult(state, False)


def test_wrong_order_is_refused_before_anything_runs(sample):
    model, x = sample
    with pytest.raises(gp.ContractError, match="ChannelPrune runs on a dense, structured model"):
        gp.prune(model, x, passes=[_FakeMask(), ChannelPrune(0.5)])


def test_the_manager_sets_the_stage_a_pass_produces(sample):
    class Idle(_FakeMask):
        def call(self, state):
            return PassResult(state, False)  # writes no stage: the pass manager does

    result = gp.prune(*sample, passes=[Idle()])
    assert result.stage is Stage.MASKED and result.report.rows[0].stage == "masked"


def test_a_failed_check_is_an_internal_error_naming_the_pass(sample):
    model, x = sample

    class Idle(Pass):
        def call(self, state):
            return PassResult(state, False)

    def broken(state, p):
        if isinstance(p, _FakeMask):
            raise gp.PostconditionError(f"{p.name} broke an invariant")

    state = CompressionState(model=model, captured=capture(model, x))
    manager = PassManager([Idle(), _FakeMask()], checks=[lambda state, p: None])
    manager.add_checks(broken)
    with pytest.raises(gp.PostconditionError, match="_FakeMask broke an invariant") as failed:
        manager.run(state, Report("sample", 0, 0), None)
    # a broken promise is a bug in the pass, not the caller's order: the CLI reports it as one
    assert isinstance(failed.value, gp.InternalError) and not isinstance(failed.value, gp.ContractError)
    assert failed.value.__notes__ == ["in pass 2 of 2, _FakeMask() (passes that ran before it: Idle)"]


# --------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "half", True])
def test_ratio_outside_range(ratio):
    with pytest.raises(gp.InputError, match="ratio must be a number in \\[0, 1\\)"):
        ChannelPrune(ratio)


def test_bad_round_to():
    with pytest.raises(gp.InputError, match="round_to"):
        ChannelPrune(0.5, round_to=0)


def test_unknown_module_name_suggests_close_ones(sample):
    with pytest.raises(gp.InputError, match="no module named 'layer.0'.*did you mean"):
        gp.prune(*sample, passes=[ChannelPrune(0.5, ignore=["layer.0"])])


def test_non_tensor_inputs(sample):
    model, _ = sample
    with pytest.raises(gp.InputError, match="example input \\[0\\] is a str"):
        gp.analyze(model, ("an image",))
    with pytest.raises(gp.InputError, match="tuple of tensors or a dict"):
        gp.analyze(model, [torch.randn(1, 3, 8, 8)])
    with pytest.raises(gp.InputError, match="contain no tensor"):
        gp.analyze(model, (None,))


def test_not_a_module():
    with pytest.raises(gp.InputError, match="must be a torch.nn.Module"):
        gp.analyze(lambda x: x, (torch.randn(1),))


def test_untraceable_model_names_the_line():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value
                return x * 2
            return x

    with pytest.raises(gp.CaptureError, match="if x.sum\\(\\) > 0") as refused:
        gp.analyze(DataDependent(), (torch.randn(3),))
    assert "control flow that depends on data" in str(refused.value)


def test_wrong_example_inputs_are_a_capture_error(sample):
    """The message blames the inputs, not control flow, which the model does not have."""
    model, _ = sample
    with pytest.raises(gp.CaptureError, match="could not capture ResNet") as refused:
        gp.analyze(model, (torch.randn(1, 5, 32, 32),))
    assert "control flow" not in str(refused.value) and "runs on the given example inputs" in str(refused.value)


def test_passes_xor_recipe(sample):
    with pytest.raises(gp.InputError, match="exactly one"):
        gp.prune(*sample)
    with pytest.raises(gp.ContractError, match="not a graphprune pass"):
        gp.prune(*sample, passes=["ChannelPrune"])


# ------------------------------------------------------------------ recipes
def test_recipe_file(tmp_path, sample):
    path = tmp_path / "r.toml"
    path.write_text('[[pass]]\nname = "ChannelPrune"\nratio = 0.5\nround_to = 8\n')
    result = gp.prune(*sample, recipe=str(path))
    assert result.module.fc.in_features == 128


def test_recipe_errors(tmp_path):
    with pytest.raises(gp.InputError, match="unknown pass 'Prune'"):
        gp.load_recipe('[[pass]]\nname = "Prune"\n')
    with pytest.raises(gp.InputError, match="unknown option\\(s\\) \\['raito'\\]"):
        gp.load_recipe('[[pass]]\nname = "ChannelPrune"\nraito = 0.5\n')
    with pytest.raises(gp.InputError, match="not valid TOML"):
        gp.load_recipe("[[pass]\n")
    with pytest.raises(gp.InputError, match="cannot read recipe"):
        gp.load_recipe(str(tmp_path / "missing.toml"))


def test_plan_round_trips_through_json(sample):
    model, x = sample
    analysis = gp.analyze(model, x)
    plan = ChannelPrune(0.5).plan(analysis, model)
    again = gp.Plan.from_json(plan.to_json())
    assert again.keep == plan.keep


# --------------------------------------------------------- data-driven criteria
def _digits_like(act=nn.ReLU):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4)).eval()
    batches = [(torch.randn(8, 16),) for _ in range(4)]
    return model, batches


def test_activation_importance_prefers_channels_that_fire():
    model, batches = _digits_like()
    with torch.no_grad():
        model[0].bias[:16] = -100.0  # the first 16 hidden channels never fire after the ReLU
    result = gp.prune(model, batches[0], passes=[ChannelPrune(0.5, importance="activation")], calibration=batches)
    kept_bias = result.module[0].bias.detach()
    assert bool((kept_bias > -50).all()), "a dead channel was kept"


def test_taylor_importance_uses_the_loss():
    model, batches = _digits_like(nn.Tanh)  # no dead units: only the zeroed channels score 0
    with torch.no_grad():
        model[4].weight[:, :16] = 0.0  # channels 0..15 of the last hidden layer cannot move the loss

    def loss_fn(outputs, batch):
        return outputs.pow(2).mean()

    result = gp.prune(
        model, batches[0], passes=[ChannelPrune(0.5, importance="taylor", loss_fn=loss_fn)], calibration=batches
    )
    assert torch.count_nonzero(result.module[4].weight) == result.module[4].weight.numel()
    assert all(p.grad is None for p in model.parameters())


def test_criteria_that_need_data_say_so():
    model, batches = _digits_like()
    with pytest.raises(gp.InputError, match="needs calibration data"):
        gp.prune(model, batches[0], passes=[ChannelPrune(0.5, importance="activation")])
    with pytest.raises(gp.InputError, match="needs loss_fn"):
        ChannelPrune(0.5, importance="taylor")
    with pytest.raises(gp.InputError, match="calibration data is empty"):
        gp.prune(model, batches[0], passes=[ChannelPrune(0.5, importance="activation")], calibration=[])
    with pytest.raises(gp.InputError, match="calibration batch 1"):
        gp.prune(
            model,
            batches[0],
            passes=[ChannelPrune(0.5, importance="activation")],
            calibration=[batches[0], "not a batch"],
        )
    with pytest.raises(gp.InputError, match="unknown importance criterion 'l3'"):
        ChannelPrune(0.5, importance="l3")


@pytest.mark.parametrize("criterion", ["activation", "taylor"])
def test_data_criteria_on_transformer_and_grouped_conv(criterion):
    from tests import zoo
    from tests.architectures import build

    def loss(out, batch):
        return sum(t.float().pow(2).mean() for t in pytree_leaves(out))

    for model, inputs in (build("gpt2"), zoo.cases()["depthwise"]):
        result = gp.prune(
            model, inputs, passes=[ChannelPrune(0.5, importance=criterion, loss_fn=loss)], calibration=[inputs, inputs]
        )
        assert result.report.params_after < result.report.params


def pytree_leaves(out):
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


# ------------------------------------------------------------ output opt-in
def test_outputs_are_named_by_their_path_and_can_be_let_shrink():
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=50)
    model = T.BertModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 50, (1, 6))}
    frozen = gp.analyze(model, inputs)
    assert not [g for g in frozen.groups if g.size == 32]
    assert any("'last_hidden_state'" in str(f.reason) for f in frozen.frozen)
    both = ["last_hidden_state", "pooler_output"]
    opened = gp.analyze(model, inputs, prunable_outputs=both)
    assert [g for g in opened.groups if g.size == 32]  # the hidden size is a group now
    result = gp.prune(model, inputs, passes=[ChannelPrune(0.5)], prunable_outputs=both)
    assert result.module(**inputs).last_hidden_state.shape == (1, 6, 16)


def test_unknown_output_name_lists_the_real_ones():
    from tests import zoo

    model, inputs = zoo.cases()["stack_repeat_bmm"]
    with pytest.raises(gp.InputError, match=r"model's outputs are \['extra.0', 'extra.1', 'out'\]"):
        gp.analyze(model, inputs, prunable_outputs=["logits"])


@pytest.mark.slow
def test_report_pages_from_the_python_api(tmp_path):
    import json

    model, x = resnet.build()
    result = gp.prune(model, x, passes=[ChannelPrune(0.5, round_to=8)])
    files = result.write_report(tmp_path / "report", device="h100")
    assert files == ["params_macs.png", "report.html", "report.json", "report.md", "roofline.png", "sparsity.png"]
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    layers = {r["name"]: r for r in written["layers"]}
    assert layers["layers.0.conv1"]["shape_before"] == [32, 32, 3, 3]
    assert layers["layers.0.conv1"]["shape_after"] == [16, 16, 3, 3]
    predicted = gp.roofline(result, device="h100")
    assert written["roofline"]["speedup"] == pytest.approx(predicted.speedup) and predicted.speedup > 1.0
    by_weight = {r.key: r.speedup for r in predicted.weight_rows()}
    assert layers["layers.0.conv1"]["predicted_speedup"] == pytest.approx(by_weight["layers.0.conv1.weight"])
    assert "Roofline on NVIDIA H100 SXM" in (tmp_path / "report" / "report.md").read_text()
    files = result.write_report(tmp_path / "report", device=None)  # written again: replaced, not merged
    assert "roofline.png" not in files and sorted(os.listdir(tmp_path)) == ["report"]


@pytest.mark.parametrize(
    "pipeline,mode,message",
    [
        ([ChannelPrune(0.3), Quantize()], STREAMED, "Quantize does not run in a streamed plan"),
        ([NMSparsity(2, 4, permute=True)], STREAMED, "a streamed plan never builds"),
        ([ChannelPrune(0.3, importance="taylor", loss_fn=lambda out, batch: out.sum())], ONNX, "does not run on ONNX"),
        ([Quantize(skip=[nn.LayerNorm])], ONNX, "takes names"),
    ],
)
def test_options_a_mode_cannot_run_are_refused_before_any_pass_runs(pipeline, mode, message):
    manager = PassManager(pipeline)
    assert manager.check_order(Stage.DENSE, MODULE) == []  # everything runs on a module in memory
    with pytest.raises(gp.InputError, match=message):
        manager.check_order(Stage.DENSE, mode)


def test_describe_puts_what_a_user_acts_on_first_and_summarises_frozen_spaces_by_reason(sample):
    analysis = gp.analyze(*sample)
    short, every = analysis.describe(), analysis.describe(every_frozen=True)
    windows = [f for f in analysis.frozen if f.reason.why == "convolution kernel window"]
    assert len(windows) > 10
    assert short.count("convolution kernel window") == 1  # one line for all of them
    assert f"convolution kernel window: {len(windows)} spaces in " in short
    assert every.count("convolution kernel window") == len(windows)
    interface = short.index("kept whole because they reach the model's inputs or outputs")
    assert short.index("group 0:") < interface < short.index("frozen, by reason")
    assert "reaches the model output" in short[interface:]
