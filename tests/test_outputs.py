"""Outputs never overwrite inputs or foreign files, and land all together or not at all
(graphprune/outputs.py and every writer that goes through it: ONNX files, report pages, plans, the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
import torch
import torch.nn as nn

import graphprune as gp
import graphprune.io.outputs as outputs_module
from graphprune import cli
from graphprune.errors import InternalError
from graphprune.io.outputs import STAGING_PREFIX, Outputs
from graphprune.passes import ChannelPrune
from tests.oracles import snapshot, unchanged


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.fixture(scope="module")
def pruned() -> gp.PruneResult:
    return gp.prune(_mlp(), (torch.randn(2, 8),), passes=[ChannelPrune(0.5)])


@pytest.fixture
def small_onnx(tmp_path):
    from tests.test_onnx_prune import nhwc_model

    path = tmp_path / "model.onnx"
    onnx.save(nhwc_model(), str(path))
    return path


def _staging(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".graphprune")]


# ------------------------------------------------------------------ the transaction
def test_claims_refuse_inputs_missing_folders_and_foreign_files(tmp_path):
    given = tmp_path / "data" / "model.onnx"
    given.parent.mkdir()
    given.write_bytes(b"input")
    (tmp_path / "theirs.txt").write_text("someone else's")
    out = Outputs(inputs=[given])
    with pytest.raises(gp.InputError, match="it is an input"):
        out.claim(given)
    with pytest.raises(gp.InputError, match="it holds an input"):
        out.claim(given.parent, folder=True)
    with pytest.raises(gp.InputError, match="it is inside an input"):
        Outputs(inputs=[given.parent]).claim(given.parent / "pruned.onnx")
    with pytest.raises(gp.InputError, match="exists and graphprune did not write it"):
        out.claim(tmp_path / "theirs.txt")
    with pytest.raises(gp.InputError, match=r"its folder .*theirs.txt is a file"):
        out.claim(tmp_path / "theirs.txt" / "sub")
    with pytest.raises(gp.InputError, match="does not exist"):
        out.claim(tmp_path / "missing" / "m.onnx")
    with pytest.raises(gp.InputError, match="cannot write in /proc"):
        out.claim("/proc/graphprune-test.onnx")
    Outputs().check(tmp_path / "new.txt")  # checking before long work leaves nothing behind
    assert not _staging(tmp_path)
    assert out.claim(tmp_path / "theirs.txt", ours=lambda p: True)  # a file graphprune recognises as its own
    out.discard()
    with pytest.raises(gp.InputError, match="already committed or discarded"):
        out.claim(tmp_path / "later.txt")
    assert given.read_bytes() == b"input" and (tmp_path / "theirs.txt").read_text() == "someone else's"
    with Outputs(overwrite=True) as out:
        with open(out.claim(tmp_path / "theirs.txt"), "w") as f:
            f.write("replaced")
    assert (tmp_path / "theirs.txt").read_text() == "replaced" and not _staging(tmp_path)


def test_a_transaction_lands_all_or_nothing(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old a")
    with pytest.raises(RuntimeError, match="boom"), Outputs(overwrite=True) as out:
        with open(out.claim(tmp_path / "a.txt"), "w") as f:
            f.write("new a")
        with open(out.claim(tmp_path / "b.txt"), "w") as f:
            f.write("new b")
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"

    real_replace = os.replace  # a move that fails halfway through the commit puts back what was moved

    def failing(src, dst):
        if os.path.basename(dst) == "b.txt":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(outputs_module.os, "replace", failing)
    out = Outputs(overwrite=True)
    for name in ("a.txt", "b.txt"):
        with open(out.claim(tmp_path / name), "w") as f:
            f.write(f"new {name}")
    with pytest.raises(OSError, match="disk full"):
        out.commit()
    assert sorted(os.listdir(tmp_path)) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"


def test_staging_folders_of_dead_processes_are_swept_by_the_next_write(tmp_path, pruned):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = outputs_module._HOST
        abandoned = tmp_path / f"{STAGING_PREFIX}{dead.pid}-{host}-killed"
        running = tmp_path / f"{STAGING_PREFIX}{alive.pid}-{host}-busy"
        elsewhere = tmp_path / f"{STAGING_PREFIX}{dead.pid}-another_host-busy"  # a shared file system
        for folder in (abandoned, running, elsewhere):
            folder.mkdir()
            (folder / "model.onnx").write_bytes(b"half written")
        pruned.export_onnx(tmp_path / "m.onnx")
        assert sorted(_staging(tmp_path)) == sorted([running.name, elsewhere.name])
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------------ report pages
@pytest.mark.slow
def test_report_pages_never_replace_a_folder_graphprune_did_not_make(tmp_path, monkeypatch, pruned):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # write_report(".") used to delete the working directory
        with pytest.raises(gp.InputError, match="not a graphprune report"):
            pruned.write_report(".", overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not _staging(tmp_path)

    files = pruned.write_report("report")
    assert json.loads((tmp_path / "report" / "report.json").read_text())["generator"] == "graphprune"
    assert pruned.write_report("report") == files  # its own report folder is replaced on a re-run
    (tmp_path / "report" / "draft.md").write_text("a user's file in the report folder")
    with pytest.raises(gp.InputError, match="not a graphprune report"):
        pruned.write_report("report", overwrite=True)
    assert (tmp_path / "report" / "draft.md").exists()
    (tmp_path / "empty").mkdir()
    assert pruned.write_report("empty") == files


# ------------------------------------------------------------------ ONNX files
@pytest.mark.slow
def test_onnx_files_are_replaced_only_if_graphprune_wrote_them(tmp_path, pruned):
    target = tmp_path / "m.onnx"
    pruned.export_onnx(target)
    assert onnx.load(str(target)).producer_name == "graphprune"
    pruned.export_onnx(target)  # the same command again replaces its own output
    foreign = onnx.load(str(target))
    foreign.producer_name = "pytorch"
    onnx.save(foreign, str(target))
    with pytest.raises(gp.InputError, match="graphprune did not write it"):
        pruned.export_onnx(target)
    assert onnx.load(str(target)).producer_name == "pytorch"
    pruned.export_onnx(target, overwrite=True)
    assert onnx.load(str(target)).producer_name == "graphprune"
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")  # a file that does not parse is not ours
    with pytest.raises(gp.InputError, match="graphprune did not write it"):
        gp.export_onnx(_mlp(), (torch.randn(2, 8),), tmp_path / "junk.onnx")
    assert (tmp_path / "junk.onnx").read_bytes() == b"not a protobuf"


def test_a_pruned_onnx_model_is_never_saved_over_the_file_it_came_from(tmp_path, small_onnx):
    original = small_onnx.read_bytes()
    result = gp.prune_onnx(str(small_onnx), passes=[ChannelPrune(0.5)])
    with pytest.raises(gp.InputError, match="it is an input"):
        result.save(small_onnx, overwrite=True)
    with pytest.raises(gp.InputError, match="it is an input"):
        result.save_plan(tmp_path / "model.onnx.plan", outputs=Outputs(inputs=[tmp_path / "model.onnx.plan.json"]))
    assert small_onnx.read_bytes() == original and sorted(os.listdir(tmp_path)) == ["model.onnx"]
    external = onnx.load(str(small_onnx))
    onnx.save(
        external, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    result = gp.prune_onnx(str(tmp_path / "ext.onnx"), passes=[ChannelPrune(0.5)])
    with pytest.raises(gp.InputError, match="it is an input"):  # its external data is an input too
        result.write_report(tmp_path / "weights.bin")
    assert result.save(tmp_path / "small.onnx").path == str(tmp_path / "small.onnx")


# ------------------------------------------------------------------ gp.prune
class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.calls = 0
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen += 1
        return self.fc2(torch.relu(self.fc1(x)))


def test_prune_leaves_a_model_whose_forward_changes_its_state_untouched():
    model = _Counting().eval()
    before = snapshot(model)
    result = gp.prune(model, (torch.randn(2, 8),), passes=[ChannelPrune(0.5)])
    assert model.calls == 0 and int(model.seen) == 0 and unchanged(model, before)
    assert result.module.fc1.out_features == 8


def test_prune_names_a_callable_that_is_not_a_module():
    def forward(x):
        return x * 2

    with pytest.raises(gp.InputError, match="needs a torch.nn.Module, got function <function"):
        gp.prune(forward, (torch.randn(2, 8),), passes=[ChannelPrune(0.5)])


# ------------------------------------------------------------------ the command line
def _main(capsys, *args) -> tuple[int, str]:
    code = cli.main([*map(str, args), "--quiet"])
    return code, capsys.readouterr().err


def test_cli_prune_onto_its_own_input_is_refused(tmp_path, capsys, small_onnx):
    original = small_onnx.read_bytes()
    for extra in ([], ["--overwrite"]):
        code, err = _main(capsys, "prune", small_onnx, "-o", small_onnx, "--channels", "0.5", "--latency", *extra)
        assert code == 2 and "it is an input" in err and "Traceback" not in err
    import numpy as np

    (tmp_path / "c.onnx.report").mkdir()  # the report folder would hold the calibration file
    np.savez(tmp_path / "c.onnx.report" / "calib.npz", **{"input_1:0": np.zeros((4, 8, 8, 3), dtype=np.float32)})
    code, err = _main(
        capsys,
        "prune",
        small_onnx,
        "-o",
        tmp_path / "c.onnx",
        "--channels",
        "0.5",
        "--calibration",
        tmp_path / "c.onnx.report" / "calib.npz",
        "--overwrite",
    )
    assert code == 2 and "c.onnx.report" in err and (tmp_path / "c.onnx.report" / "calib.npz").exists()
    assert small_onnx.read_bytes() == original and not _staging(tmp_path)


def test_cli_prune_writes_model_plan_and_report_together_or_not_at_all(tmp_path, capsys, small_onnx):
    out = tmp_path / "small.onnx"
    (tmp_path / "small.onnx.report").mkdir()
    (tmp_path / "small.onnx.report" / "notes.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    code, err = _main(capsys, "prune", small_onnx, "-o", out, "--channels", "0.5", "--overwrite")
    assert code == 2 and "not a graphprune report" in err  # refused before pruning; nothing written
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "small.onnx.report" / "notes.txt").exists()
    (tmp_path / "small.onnx.report" / "notes.txt").unlink()
    for _ in range(2):  # the same command twice: the second run replaces its own outputs
        code, err = _main(capsys, "prune", small_onnx, "-o", out, "--channels", "0.5", "--latency", "--runs", "2")
        assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == [
        "model.onnx",
        "small.onnx",
        "small.onnx.plan.json",
        "small.onnx.plan.safetensors",
        "small.onnx.report",
    ]
    data = json.loads((tmp_path / "small.onnx.report" / "report.json").read_text())
    assert data["generator"] == "graphprune" and set(data["latency_ms"]) == {"dense", "compressed"}
    assert data["latency_ms"]["dense"] > 0 and data["latency_ms"]["compressed"] > 0
    out.write_bytes(b"a user's file")
    code, err = _main(capsys, "prune", small_onnx, "-o", out, "--channels", "0.5")
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"a user's file"
    assert _main(capsys, "prune", small_onnx, "-o", out, "--channels", "0.5", "--overwrite")[0] == 0
    assert onnx.load(str(out)).producer_name == "graphprune"


@pytest.mark.parametrize(
    "destination,message",
    [("/proc/graphprune.onnx", "cannot write in /proc"), ("{tmp}/file.txt/m.onnx", "file.txt is a file")],
)
def test_cli_unwritable_destinations_exit_2_without_a_traceback(tmp_path, capsys, destination, message):
    (tmp_path / "file.txt").write_text("x")
    for command in (["prune", "samples.resnet:build", "--channels", "0.5"], ["export", "samples.resnet:build"]):
        code, err = _main(capsys, *command, "-o", destination.format(tmp=tmp_path))
        assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("size", [0, -1])
def test_cli_batch_size_below_one_is_a_bad_input(tmp_path, capsys, small_onnx, size):
    import numpy as np

    np.savez(tmp_path / "calib.npz", **{"input_1:0": np.zeros((4, 8, 8, 3), dtype=np.float32)})
    code, err = _main(
        capsys,
        "prune",
        small_onnx,
        "-o",
        tmp_path / "s.onnx",
        "--channels",
        "0.5",
        "--calibration",
        tmp_path / "calib.npz",
        "--batch-size",
        size,
    )
    assert code == 2 and f"--batch-size must be at least 1, got {size}" in err


def test_cli_internal_errors_exit_4_and_ask_for_a_report(capsys, monkeypatch):
    def broken(args):
        raise InternalError("a plan kept a channel twice")

    monkeypatch.setitem(cli.COMMANDS, "inspect", broken)
    code, err = _main(capsys, "inspect", "samples.resnet:build")
    assert code == cli.EXIT_BUG == 4
    assert "a plan kept a channel twice" in err and "this is a bug in graphprune, please report it" in err


@pytest.mark.slow
def test_a_failed_writer_leaves_nothing_in_the_callers_transaction(tmp_path):
    model, x = _mlp(), (torch.randn(2, 8),)
    with Outputs() as out:
        with pytest.raises(gp.ApplyError, match="over the tolerance"):  # staged, then failed verification
            gp.export_onnx(model, x, tmp_path / "bad.onnx", fp32_tolerance=-1.0, outputs=out)
        gp.export_onnx(model, x, tmp_path / "good.onnx", outputs=out)
    assert sorted(os.listdir(tmp_path)) == ["good.onnx"]
