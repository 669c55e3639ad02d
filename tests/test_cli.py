"""The command line end to end: outputs exist, JSON parses, exit codes are right, and failures leave
no partial files.  Commands run through ``main`` in this process (what ``python -m graphprune.cli``
calls, without an interpreter start each); the installed entry point runs in a subprocess."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import onnx
import pytest
import torch
import transformers as T

import graphprune as gp
from graphprune import cli
from graphprune.core.depth import BlockRemoval
from graphprune.io.plan_file import PlanFile
from graphprune.passes import NMSparsity
from tests.command_line import run, run_process


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    dense = run("export", "samples.resnet:build", "-o", str(out / "dense.onnx"), "--json")
    assert dense.returncode == 0, dense.stderr
    np.savez(out / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    result = run(
        "prune",
        "samples.resnet:build",
        "-o",
        str(out / "small.onnx"),
        "--channels",
        "0.5",
        "--nm",
        "2:4",
        "--method",
        "wanda",
        "--int8",
        "--calibration",
        str(out / "calib.npz"),
        "--latency",
        "--runs",
        "3",
        "--json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


@pytest.mark.slow
def test_prune_writes_a_verified_onnx_file_and_a_json_report(pruned):
    out, summary = pruned
    assert summary["stage"] == "quantized" and [p["pass_name"] for p in summary["passes"]] == [
        "ChannelPrune",
        "NMSparsity",
        "Quantize",
    ]
    assert summary["onnx"]["quantized_ops"]["QLinearConv"] > 0
    assert summary["latency_ms"]["dense"] > 0 and summary["latency_ms"]["compressed"] > 0
    pages = out / "small.onnx.report"
    assert sorted(os.listdir(pages)) == [
        "latency.png",
        "params_macs.png",
        "report.html",
        "report.json",
        "report.md",
        "roofline.png",
        "sparsity.png",
    ]
    data = json.loads((pages / "report.json").read_text())
    assert data["roofline"]["device"].startswith("this CPU") and data["roofline"]["speedup"] > 1.0
    layers = {row["name"]: row for row in data["layers"]}
    assert layers["layers.0.conv1"]["pattern"] == "2:4" and layers["layers.0.conv1"]["weight_scale"]
    assert layers["layers.0.conv1"]["shape_after"][0] < layers["layers.0.conv1"]["shape_before"][0]
    markdown = (pages / "report.md").read_text()
    assert "| ChannelPrune |" in markdown and "![sparsity](sparsity.png)" in markdown
    assert "Roofline on this CPU" in markdown and "| predicted speedup |" in markdown
    assert (pages / "report.html").read_text().count("data:image/png;base64,") == 4
    meta = {p.key: p.value for p in onnx.load(str(out / "small.onnx")).metadata_props}
    assert meta["graphprune.stage"] == "quantized"


@pytest.mark.slow
def test_inspect_and_bench(pruned):
    out, _ = pruned
    inspect = run("inspect", "samples.resnet:build", "--json", "--graph", str(out / "coupling.dot"))
    assert inspect.returncode == 0, inspect.stderr
    summary = json.loads(inspect.stdout)
    assert summary["params"] > 0 and summary["groups"] and all(g["members"] for g in summary["groups"])
    dot = (out / "coupling.dot").read_text()
    assert dot.startswith("graph coupling {") and '"group 0" -- "stem.0.weight"' in dot
    drawn = run("inspect", "samples.resnet:build", "--graph", str(out / "coupling.svg"))
    assert drawn.returncode == 0 and "<svg" in (out / "coupling.svg").read_text()[:2000]
    bench = run("bench", str(out / "dense.onnx"), str(out / "small.onnx"), "--runs", "3", "--json")
    assert bench.returncode == 0, bench.stderr
    rows = json.loads(bench.stdout)["models"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["ms"] > 0
    text = run("inspect", "samples.resnet:build")
    assert text.returncode == 0 and "prunable groups" in text.stdout


class _Unpicklable:
    """Stands for any object whose unpickling would run code: ``weights_only`` loading refuses it."""


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["prune", "no_such_module:build", "-o", "{out}/m.onnx", "--channels", "0.5"],
            "cannot load no_such_module:build",
        ),
        (
            ["prune", "samples.resnet:build", "-o", "{out}/m.onnx", "--recipe", "{out}/missing.toml"],
            "cannot read recipe",
        ),
        (["prune", "samples.resnet:build", "-o", "{out}/m.onnx", "--recipe", "{out}/bad.toml"], "unknown pass 'Prune'"),
        (["prune", "samples.resnet:build", "-o", "{out}/m.onnx", "--recipe", "{out}/order.toml"], "experimental_order"),
        (["prune", "samples.resnet:build", "-o", "{out}/m.txt", "--channels", "0.5"], "must name an .onnx file"),
        (["prune", "samples.resnet:build", "-o", "{out}/m.onnx", "--nm", "two:four"], "--nm takes N:M"),
        (["prune", "samples.resnet:build", "-o", "{out}/m.onnx"], "nothing to do"),
        (["prune", "{out}/model.onnx", "-o", "{out}/m.onnx", "--channels", "0.5"], "no such ONNX file"),
        (["prune", "{out}/bad.onnx", "-o", "{out}/m.onnx", "--channels", "0.5"], "is not a readable ONNX model"),
        (["export", "{out}/model.onnx", "-o", "{out}/m.onnx"], "inspect and prune also take .onnx files"),
        (
            ["prune", "samples.resnet:build", "-o", "{out}/m.onnx", "--int8", "--calibration", "{out}/nope.npz"],
            "no such file",
        ),
        (
            ["prune", "samples.resnet:build", "-o", "{out}/m.onnx", "--int8", "--calibration", "{out}/code.pt"],
            "cannot be read as tensors (UnpicklingError",
        ),
        (
            ["prune", "samples.resnet:build", "-o", "{out}/m.onnx", "--int8", "--calibration", "{out}/objects.npz"],
            "cannot be read as tensors (ValueError: Object arrays cannot be loaded",
        ),
        (
            ["prune", "samples.resnet:build", "-o", "{out}/m.onnx", "--int8", "--calibration", "{out}/cut.npz"],
            "cannot be read as tensors",
        ),
        (["export", "samples.resnet:build", "-o", "{out}/missing_dir/m.onnx"], "does not exist"),
        (["prune", "samples.resnet:build", "-o", "{out}/m.onnx", "--refine"], "--refine refines N:M masks: give --nm"),
        (["bench", "{out}/bad.toml"], "onnxruntime cannot load it"),
        (["inspect", "samples.resnet:build", "--graph", "{out}/g.pdf"], "--graph writes .dot, .svg or .png"),
    ],
)
def test_bad_input_fails_clearly_with_exit_code_2_and_no_files(tmp_path, args, message):
    (tmp_path / "bad.toml").write_text('[[pass]]\nname = "Prune"\n')
    (tmp_path / "bad.onnx").write_text("not a protobuf")
    (tmp_path / "order.toml").write_text('[[pass]]\nname = "Quantize"\n[[pass]]\nname = "NMSparsity"\n')
    torch.save(
        {"x": torch.zeros(2, 3, 32, 32), "hook": _Unpicklable()}, tmp_path / "code.pt"
    )  # a pickle that runs code
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "full.npz", x=np.zeros((4, 3, 32, 32), np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "full.npz").read_bytes()[:200])
    (tmp_path / "full.npz").unlink()
    before = set(os.listdir(tmp_path))
    result = run(*[a.format(out=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert set(os.listdir(tmp_path)) == before


def test_installed_entry_point():
    from importlib.metadata import entry_points

    from graphprune.cli import main

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "graphprune"]
    assert script.load() is main  # `pip install -e .` (the README's command) installs `graphprune`
    result = run_process("--help")
    assert result.returncode == 0 and "inspect" in result.stdout and "prune" in result.stdout


@pytest.mark.slow
def test_exported_program_file(tmp_path):
    import torch

    from samples.resnet import build

    model, x = build()
    torch.export.save(torch.export.export(model, x), str(tmp_path / "resnet.pt2"))
    pruned = run(
        "prune",
        str(tmp_path / "resnet.pt2"),
        "-o",
        str(tmp_path / "p.onnx"),
        "--channels",
        "0.5",
        "--nm",
        "2:4",
        "--json",
    )
    assert pruned.returncode == 0, pruned.stderr
    summary = json.loads(pruned.stdout)
    assert summary["params_after"] < summary["params"] and "static batch size" in pruned.stderr
    # int8 needs activation statistics at each layer's module, which an unlifted program never calls
    refused = run("prune", str(tmp_path / "resnet.pt2"), "-o", str(tmp_path / "q.onnx"), "--int8")
    assert refused.returncode == 2 and "never called by the model's forward" in refused.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_prune_and_inspect_an_onnx_file(tmp_path):
    from tests.test_onnx_prune import nhwc_model

    onnx.save(nhwc_model(), str(tmp_path / "keras.onnx"))
    (tmp_path / "recipe.toml").write_text('[[pass]]\nname = "ChannelPrune"\nratio = 0.5\n')
    import numpy as np

    np.savez(tmp_path / "calib.npz", **{"input_1:0": np.zeros((4, 8, 8, 3), dtype=np.float32)})
    result = run(
        "prune",
        str(tmp_path / "keras.onnx"),
        "-o",
        str(tmp_path / "small.onnx"),
        "--recipe",
        str(tmp_path / "recipe.toml"),
        "--calibration",
        str(tmp_path / "calib.npz"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["macs_after"] < summary["macs"]
    assert (tmp_path / "small.onnx.report" / "report.html").exists()
    assert summary["plan"].endswith("small.onnx.plan.json") and (tmp_path / "small.onnx.plan.safetensors").exists()
    shown = run("plan", summary["plan"])
    assert shown.returncode == 0 and "structured plan 0" in shown.stdout
    pruned = onnx.load(str(tmp_path / "small.onnx"))
    assert [i.name for i in pruned.graph.input] == ["input_1:0"]
    text = run("inspect", str(tmp_path / "keras.onnx"))
    assert text.returncode == 0 and "2 prunable groups" in text.stdout


def test_every_option_has_help_and_every_command_an_example():
    """A new option without help text, or a command without an example, fails here."""
    top = cli.parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(cli.COMMANDS)
    for name, command in commands.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"graphprune {name}: {action.dest} has no help text"
        assert command.format_help().rstrip().endswith(cli.EXAMPLES[name]), name
        assert cli.EXAMPLES[name].startswith(f"graphprune {name} ")


def test_inspect_builds_a_checkpoint_folder_from_its_config_alone(tmp_path):
    """No weight is read: the folder holds config.json only, and the analysis is the one of the
    model built in memory; export refuses a folder, and prune one into an ONNX file."""
    config = T.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(tmp_path / "ckpt")
    result = run("inspect", str(tmp_path / "ckpt"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    model = T.LlamaForCausalLM(config)
    analysis = gp.analyze(model, {"input_ids": torch.ones(1, 16, dtype=torch.long)})
    assert [g["channels"] for g in summary["groups"]] == [g.size for g in analysis.groups]
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    empty = run("inspect", str(tmp_path))
    assert empty.returncode == 2 and "needs a config.json" in empty.stderr
    refused = run("export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "m.onnx"))
    assert refused.returncode == 2 and "does not take checkpoint folders" in refused.stderr
    to_onnx = run("prune", str(tmp_path / "ckpt"), "-o", str(tmp_path / "m.onnx"), "--nm", "2:4")
    assert to_onnx.returncode == 2 and "-o names the folder a pruned checkpoint goes into" in to_onnx.stderr


@pytest.mark.slow
def test_a_checkpoint_folder_with_text_calibration_end_to_end(tmp_path):
    """The LLM user's first commands, each in a fresh interpreter as a user runs them: a multi-shard
    LLaMA checkpoint and a text file in; ``prune`` in one command, and ``plan`` then
    ``apply-checkpoint`` in two.  Both pruned checkpoints load with from_pretrained and compute what
    the model pruned in memory on the same calibration computes."""
    from samples.minilm import _path

    tokenizer = T.AutoTokenizer.from_pretrained(_path())
    folder = tmp_path / "ckpt"
    model = _llama_checkpoint(folder, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(folder)
    texts = tmp_path / "texts.txt"
    texts.write_text(
        "The old man reads the paper.\n\nA child paints a red boat near the river.\nWarm soup after lunch.\n"
    )
    args = ["--nm", "2:4", "--method", "sparsegpt", "--calibration", str(texts), "--seq-len", "8", "--samples", "3"]
    pruned_in_one = run_process("prune", str(folder), "-o", str(tmp_path / "pruned"), *args, "--json")
    assert pruned_in_one.returncode == 0, pruned_in_one.stderr
    summary = json.loads(pruned_in_one.stdout)
    assert summary["shards"] > 1 and os.path.isfile(summary["plan"])
    plan = str(tmp_path / "llama.plan.json")
    planned = run_process("plan", str(folder), "-o", plan, *args, "--quiet")
    assert planned.returncode == 0, planned.stderr
    assert f"apply-checkpoint {plan} {folder} OUT" in planned.stdout
    applied = run_process("apply-checkpoint", plan, str(folder), str(tmp_path / "applied"), "--quiet")
    assert applied.returncode == 0, applied.stderr

    calibration = cli.text_calibration(str(folder), str(texts), seq_len=8, samples=3)
    assert [b["input_ids"].shape[1] for b in calibration] == [8, 8, 7]  # cut at 8 tokens, blank line skipped
    in_memory = gp.prune(
        model,
        {"input_ids": torch.ones(1, 16, dtype=torch.long)},
        [NMSparsity(2, 4, method="sparsegpt")],
        calibration=calibration,
    ).module
    ids = torch.randint(0, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = in_memory(ids).logits
        for out in ("pruned", "applied"):
            loaded = T.LlamaForCausalLM.from_pretrained(tmp_path / out).eval()
            assert torch.allclose(loaded(ids).logits, expected, atol=1e-5), out
    again = run("prune", str(folder), "-o", str(tmp_path / "pruned"), *args)
    assert again.returncode == 2 and "overwrite" in again.stderr  # the written checkpoint is kept
    missing = run("prune", str(folder), "-o", str(tmp_path / "other"), "--nm", "2:4", "--method", "wanda")
    assert missing.returncode == 2 and "give --calibration" in missing.stderr
    no_tokenizer = tmp_path / "bare"
    _llama_checkpoint(no_tokenizer)
    refused = run("plan", str(no_tokenizer), "-o", str(tmp_path / "bare.plan.json"), *args)
    assert refused.returncode == 2 and "tokenizer" in refused.stderr


def _llama_checkpoint(folder, vocab_size: int = 100) -> T.LlamaForCausalLM:
    """A two-layer LLaMA with random weights saved in several safetensors shards (with an index)."""
    config = T.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size="20KB")
    return model


@pytest.mark.slow
def test_plan_a_checkpoint_folder_then_apply_it(tmp_path):
    """plan is the first half of prune: the plan of a folder, written; apply-checkpoint then gives
    the checkpoint of the model pruned in memory.  Pass options on a plan file are refused, not
    ignored, and a shard the index names but the folder lacks is named before anything is written."""
    model = _llama_checkpoint(tmp_path / "ckpt")
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    plan = str(tmp_path / "llama.plan.json")
    made = run("plan", str(tmp_path / "ckpt"), "-o", plan, "--nm", "2:4", "--json")
    assert made.returncode == 0, made.stderr
    assert any("N:M masks on 14 weights" in line for line in json.loads(made.stdout)["description"])
    applied = run("apply-checkpoint", plan, str(tmp_path / "ckpt"), str(tmp_path / "pruned"))
    assert applied.returncode == 0, applied.stderr
    pruned = T.LlamaForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    in_memory = gp.prune(model, {"input_ids": torch.ones(1, 16, dtype=torch.long)}, [NMSparsity(2, 4)]).module
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, in_memory(ids).logits, atol=1e-5)

    named = run(
        "plan",
        str(tmp_path / "ckpt"),
        "-o",
        str(tmp_path / "named.plan.json"),
        "--nm",
        "2:4",
        "--blocks",
        "model.layers",
    )
    assert named.returncode == 0, named.stderr
    assert not PlanFile.load(plan).diff(PlanFile.load(str(tmp_path / "named.plan.json")))
    wrong = run(
        "plan", str(tmp_path / "ckpt"), "-o", str(tmp_path / "wrong.plan.json"), "--nm", "2:4", "--blocks", "model.norm"
    )
    assert wrong.returncode == 2 and "not a non-empty ModuleList" in wrong.stderr
    not_streamed = run("prune", "samples.resnet:build", "-o", str(tmp_path / "r.onnx"), "--nm", "2:4", "--blocks", "x")
    assert not_streamed.returncode == 2 and "--blocks: for checkpoint folders" in not_streamed.stderr
    ignored = run("plan", plan, "--nm", "2:4", "--method", "wanda")
    assert ignored.returncode == 2 and "--nm --method" in ignored.stderr and "not a folder" in ignored.stderr
    no_output = run("plan", str(tmp_path / "ckpt"), "--nm", "2:4")
    assert no_output.returncode == 2 and "-o names the plan file" in no_output.stderr
    shard = sorted((tmp_path / "ckpt").glob("*.safetensors"))[-1]
    shard.unlink()
    for command in (
        ["plan", str(tmp_path / "ckpt"), "-o", str(tmp_path / "again.plan.json")],
        ["prune", str(tmp_path / "ckpt"), "-o", str(tmp_path / "again")],
    ):
        missing = run(*command, "--nm", "2:4")
        assert missing.returncode == 2 and f"names shards that are not in the folder: {shard.name}" in missing.stderr
    assert not (tmp_path / "again.plan.json").exists() and not (tmp_path / "again").exists()


@pytest.mark.slow
def test_prune_with_removed_blocks_refined_masks_and_low_rank_paths(tmp_path):
    """``--remove-blocks``, ``--refine`` and ``--low-rank`` reach the passes (the ViT's blocks are an
    ``nn.Sequential``), and the written ONNX file carries the paths."""
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    args = ["prune", "samples.vit:build", "-o", str(tmp_path / "vit.onnx"), "--nm", "2:4", "--method", "sparsegpt"]
    args += ["--refine", "--low-rank", "4", "--calibration", str(tmp_path / "calib.npz"), "--json"]
    result = run(*args, "--remove-blocks", "1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    removed, *rows = summary["passes"]
    assert removed["pass_name"] == "BlockPrune" and removed["details"]["removed"].endswith("(1 of 4 blocks)")
    assert summary["stage"] == "compensated" and [r["pass_name"] for r in rows] == ["NMSparsity", "LowRankCompensation"]
    assert "calibration error -" in rows[0]["details"]["refinement"]
    assert rows[1]["details"]["paths"].endswith("parameters added") and not rows[1]["details"]["paths"].startswith("0 ")
    plan = gp.PlanFile.load(tmp_path / "vit.onnx.plan.json")
    assert plan.low_rank and plan.depth == BlockRemoval("blocks", 4, plan.depth.removed)
