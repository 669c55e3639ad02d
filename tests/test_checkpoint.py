"""Plans applied to safetensors checkpoints shard by shard (issue 10, shard-by-shard apply)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers as T
from safetensors import safe_open

import graphprune as gp
import graphprune.io.checkpoint as checkpoint
from graphprune.algorithms.nm import LINEAR, NMPattern, satisfies
from graphprune.frontends.torch.copying import clone
from graphprune.passes import ChannelPrune, NMSparsity
from tests.architectures import small_llama

# hidden 64 -> 32, query heads 4 -> 1 and kv heads 2 -> 1 (GQA groups), MLP 128 -> 64 (see the plan)
CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 1, "num_key_value_heads": 1}
IDS = {"input_ids": torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A multi-shard checkpoint of a small LLaMA, and the plan of channels + 2:4 made on it."""
    folder = tmp_path_factory.mktemp("checkpoint")
    model = small_llama()
    model.save_pretrained(folder / "source", max_shard_size="100KB")
    result = gp.prune(model, IDS, passes=[ChannelPrune(0.5, round_to=8), NMSparsity(2, 4)])
    result.save_plan(folder / "plan")
    return folder, result


def test_the_pruned_checkpoint_loads_and_computes_what_the_pruned_module_computes(pruned, tmp_path):
    folder, result = pruned
    assert len(list((folder / "source").glob("*.safetensors"))) > 1
    report = gp.apply_to_checkpoint(folder / "plan.json", folder / "source", tmp_path / "out", config=CONFIG)
    assert report.shards > 1 and report.tensors_changed and report.bytes_after < report.bytes_before
    assert report.config == CONFIG and not (tmp_path / "out.partial").exists()
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        want = gp.finalize(clone(result.module))(**IDS).logits
        assert torch.allclose(loaded(**IDS).logits, want, atol=1e-6)
    for name, (mask, pattern) in result.masks.items():
        weight = loaded.get_parameter(name)
        assert satisfies(weight, pattern) and torch.equal(weight != 0, mask & (weight != 0))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert not loaded.config.tie_word_embeddings  # so every tensor of the state dict is stored once
    assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in loaded.state_dict().values())
    assert (tmp_path / "out" / "generation_config.json").exists()


@pytest.mark.slow
def test_config_sizes_are_inferred_where_shapes_tell(pruned, tmp_path):
    folder, _ = pruned
    gp.prune(small_llama(), IDS, passes=[ChannelPrune(0.5, round_to=8, heads=False)]).save_plan(tmp_path / "plan")
    report = gp.apply_to_checkpoint(tmp_path / "plan.json", folder / "source", tmp_path / "out")
    assert report.config == {"hidden_size": 32, "intermediate_size": 64}  # found by the architecture's own shapes
    assert T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.intermediate_size == 64


@pytest.mark.slow
def test_config_sizes_shapes_cannot_tell_apart_are_told_by_the_plan_or_asked_for(pruned, tmp_path):
    """The plan keeps one query head of 16 dims, which has the shapes of two heads of 8: the analysis
    of the model the plan made tells them apart; a plan without it (or an architecture it cannot
    tell) gets a refusal that lists both, before anything lands."""
    folder, _ = pruned
    report = gp.apply_to_checkpoint(folder / "plan.json", folder / "source", tmp_path / "out")
    assert report.config == CONFIG
    plan = gp.PlanFile.load(folder / "plan.json")
    plan.structured[-1].result = None
    with pytest.raises(
        gp.InputError,
        match=r"head counts or sizes give the same shapes in several ways(?s:.*)"
        r"does not record the model it made(?s:.*)dims of 128 \(intermediate_size\?\)",
    ):
        gp.apply_to_checkpoint(plan, folder / "source", tmp_path / "again")
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.slow
def test_inferred_head_counts_are_those_of_the_model_the_plan_made(tmp_path):
    """Eight heads of 12 dims have the shapes of six heads of 16 and change fewer keys: only the
    plan's record of the model it made says six heads; the loaded checkpoint computes its logits."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=2,
        vocab_size=100,
        head_dim=16,
    )
    model = T.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "source")
    result = gp.prune(model, IDS, passes=[ChannelPrune(0.25)])
    result.save_plan(tmp_path / "plan")
    report = gp.apply_to_checkpoint(tmp_path / "plan.json", tmp_path / "source", tmp_path / "out")
    assert report.config == {
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
    }
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**IDS).logits, result.module(**IDS).logits, atol=1e-5)


def test_a_checkpoint_of_another_model_is_refused(pruned, tmp_path):
    folder, _ = pruned
    small_llama(hidden=48).save_pretrained(tmp_path / "other")
    with pytest.raises(gp.InputError, match="not the same architecture"):
        gp.apply_to_checkpoint(folder / "plan.json", tmp_path / "other", tmp_path / "out", config=CONFIG)
    with pytest.raises(gp.InputError, match="does it need prefix="):  # names that do not match at all
        gp.apply_to_checkpoint(
            folder / "plan.json", folder / "source", tmp_path / "out", config=CONFIG, prefix="transformer."
        )
    assert sorted(os.listdir(tmp_path)) == ["other"]


def test_an_interrupted_run_resumes_with_the_same_plan_only(pruned, tmp_path, monkeypatch):
    folder, _ = pruned
    fresh = gp.apply_to_checkpoint(folder / "plan.json", folder / "source", tmp_path / "fresh", config=CONFIG)
    real_save, calls = checkpoint.save_file, []

    def dies_on_the_third_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        gp.apply_to_checkpoint(folder / "plan.json", folder / "source", tmp_path / "out", config=CONFIG)
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert not (tmp_path / "out").exists() and len(list((tmp_path / "out.partial").glob("*.safetensors"))) == 2
    with pytest.raises(gp.InputError, match="unfinished run with another plan"):
        gp.apply_to_checkpoint(folder / "plan.json", folder / "source", tmp_path / "out", config={})
    resumed = gp.apply_to_checkpoint(folder / "plan.json", folder / "source", tmp_path / "out", config=CONFIG)
    assert resumed.resumed_shards == 2 and resumed.bytes_after == fresh.bytes_after
    for shard in sorted((tmp_path / "fresh").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as a, safe_open(str(tmp_path / "out" / shard.name), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_plan_files_carry_the_slices_a_checkpoint_needs(pruned):
    folder, result = pruned
    loaded = gp.PlanFile.load(folder / "plan.json")
    assert loaded.structured[0].slices == result.plans[0].slices and loaded.structured[0].slices
    gate = loaded.structured[0].slices["model.layers.0.mlp.gate_proj.weight"]
    assert len(gate[0]) == 64 and len(gate[1]) == 32  # MLP channels kept, hidden channels kept
    assert loaded.masks["model.layers.0.mlp.gate_proj.weight"].pattern == NMPattern(2, 4, LINEAR)


@pytest.mark.slow
def test_the_command_line_applies_a_plan_to_a_checkpoint(pruned, tmp_path, capsys):
    from graphprune.cli import EXIT_INPUT, main

    folder, _ = pruned
    settings = [f"{k}={v}" for k, v in CONFIG.items()]
    assert (
        main(
            [
                "apply-checkpoint",
                str(folder / "plan.json"),
                str(folder / "source"),
                str(tmp_path / "out"),
                "--config",
                *settings,
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"] == CONFIG and summary["bytes_after"] < summary["bytes_before"]
    assert (tmp_path / "out" / "config.json").exists()
    assert (
        main(
            [
                "apply-checkpoint",
                str(folder / "plan.json"),
                str(folder / "source"),
                str(tmp_path / "again"),
                "--config",
                "hidden_size",
            ]
        )
        == EXIT_INPUT
    )
    assert "KEY=VALUE" in capsys.readouterr().err
    assert (
        main(
            [
                "apply-checkpoint",
                str(folder / "plan.json"),
                str(folder / "source"),
                str(tmp_path / "again"),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )  # no --config: the sizes are inferred
    assert json.loads(capsys.readouterr().out)["config"] == CONFIG


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_destination_that_overlaps_the_source_is_refused_before_anything_is_written(pruned, tmp_path):
    """``X.partial`` -> ``X`` would stage in the source itself and rewrite its config.json (issue 18
    item 5): refused, as is a destination inside the source or the source itself; nothing changes."""
    folder, _ = pruned
    shutil.copytree(folder / "source", tmp_path / "out.partial")
    before = _files(tmp_path / "out.partial")
    cases = {
        tmp_path / "out": r"cannot stage the checkpoint in .*out.partial .*overlaps an input",
        tmp_path / "out.partial" / "pruned": r"is inside an input",
        tmp_path / "out.partial": r"it is an input",
    }
    for destination, match in cases.items():
        with pytest.raises(gp.InputError, match=match):
            gp.apply_to_checkpoint(
                folder / "plan.json", tmp_path / "out.partial", destination, config=CONFIG, overwrite=True
            )
    with pytest.raises(gp.InputError, match=r"holds an input"):
        gp.apply_to_checkpoint(folder / "plan.json", folder / "source", folder, config=CONFIG, overwrite=True)
    assert _files(tmp_path / "out.partial") == before and os.listdir(tmp_path) == ["out.partial"]


def test_an_existing_destination_is_replaced_only_with_overwrite(pruned, tmp_path):
    folder, _ = pruned
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(gp.InputError, match=r"out exists and graphprune did not write it"):
        gp.apply_to_checkpoint(folder / "plan.json", folder / "source", tmp_path / "out", config=CONFIG)
    assert _files(tmp_path / "out") == {"mine.txt": b"keep me"} and os.listdir(tmp_path) == ["out"]
    gp.apply_to_checkpoint(folder / "plan.json", folder / "source", tmp_path / "out", config=CONFIG, overwrite=True)
    assert "mine.txt" not in os.listdir(tmp_path / "out") and (tmp_path / "out" / "config.json").exists()
    assert os.listdir(tmp_path) == ["out"]


def _interrupted(plan, source, destination, monkeypatch, shards: int = 1) -> None:
    """Run apply_to_checkpoint until ``shards`` shards are written, then interrupt it."""
    real_save, calls = checkpoint.save_file, []

    def dies(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > shards:
            raise KeyboardInterrupt
        real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        gp.apply_to_checkpoint(plan, source, destination, config=CONFIG)
    monkeypatch.setattr(checkpoint, "save_file", real_save)


def test_a_resumed_run_refuses_a_source_changed_since_it_was_interrupted(pruned, tmp_path, monkeypatch):
    """The same path with other bytes (a re-saved shard) would resume into stale shards: the source
    is identified by each shard's size, mtime and header digest, and the change is named."""
    from safetensors.torch import load_file, save_file

    folder, _ = pruned
    shutil.copytree(folder / "source", tmp_path / "source")
    _interrupted(folder / "plan.json", tmp_path / "source", tmp_path / "out", monkeypatch)
    shard = sorted((tmp_path / "source").glob("*.safetensors"))[0]
    save_file({k: v * 2 for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    with pytest.raises(gp.InputError, match=rf"changed since: source shards {shard.name}\).*remove .*out.partial"):
        gp.apply_to_checkpoint(folder / "plan.json", tmp_path / "source", tmp_path / "out", config=CONFIG)
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / "out.partial")
    assert (
        gp.apply_to_checkpoint(
            folder / "plan.json", tmp_path / "source", tmp_path / "out", config=CONFIG
        ).resumed_shards
        == 0
    )


GATE = "model.layers.0.mlp.gate_proj.weight"  # [128, 64] in the checkpoint; the plan keeps 64 rows


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda plan: plan.structured[0].slices[GATE].__setitem__(0, [0] * 64), r"not strictly increasing"),
        (
            lambda plan: plan.structured[0].slices[GATE].__setitem__(0, list(range(100, 164))),
            r"indices for dim 0 of model.layers.0.mlp.gate_proj.weight .*index 163 is outside the dim's 128 entries",
        ),
        (lambda plan: plan.structured[0].slices[GATE].append([0]), r"the tensor has no dim 2"),
        (
            lambda plan: setattr(plan, "values", {GATE: torch.zeros(3, 3)}),
            r"new value for model.layers.0.mlp.gate_proj.weight is \[3, 3\], the pruned tensor is \[64, 32\]",
        ),
    ],
)
def test_damaged_indices_values_and_masks_are_refused_before_writing(pruned, tmp_path, damage, match):
    """All-zero indices were written and called verified; indices out of range raised a raw
    IndexError and left a .partial folder (issue 18 item 7): checked against the shards' shapes."""
    folder, _ = pruned
    plan = gp.PlanFile.load(folder / "plan.json")
    damage(plan)
    with pytest.raises(gp.InputError, match=match):
        gp.apply_to_checkpoint(plan, folder / "source", tmp_path / "out", config=CONFIG)
    assert os.listdir(tmp_path) == []


def test_unreadable_source_files_are_refused_before_writing(pruned, tmp_path):
    folder, _ = pruned
    shutil.copytree(folder / "source", tmp_path / "source")
    config = (tmp_path / "source" / "config.json").read_text()
    (tmp_path / "source" / "config.json").write_text("{not json")
    with pytest.raises(gp.InputError, match=r"config.json is not readable JSON"):
        gp.apply_to_checkpoint(folder / "plan.json", tmp_path / "source", tmp_path / "out", config=CONFIG)
    (tmp_path / "source" / "config.json").write_text(config)
    (tmp_path / "source" / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(gp.InputError, match=r"index.json holds a JSON list, not an object"):
        gp.apply_to_checkpoint(folder / "plan.json", tmp_path / "source", tmp_path / "out", config=CONFIG)
    shutil.copy(folder / "source" / "model.safetensors.index.json", tmp_path / "source")
    shard = sorted((tmp_path / "source").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(gp.InputError, match=rf"{shard.name} is not a readable safetensors file"):
        gp.apply_to_checkpoint(folder / "plan.json", tmp_path / "source", tmp_path / "out", config=CONFIG)
    assert sorted(os.listdir(tmp_path)) == ["source"]


def test_a_staging_folder_the_run_did_not_make_is_not_resumed(pruned, tmp_path):
    folder, _ = pruned
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "model-00001-of-00003.safetensors").write_bytes(b"stale")
    with pytest.raises(gp.InputError, match=r"out.partial holds files but no record of the run that wrote them"):
        gp.apply_to_checkpoint(folder / "plan.json", folder / "source", tmp_path / "out", config=CONFIG)
