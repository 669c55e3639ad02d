"""Runs across processes (issue 10): 2 CPU ranks (gloo, launched by torchrun) decide what one process
decides on the same data, for statistics summed over ranks and for training under DDP."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphprune as gp
import graphprune.frontends.torch.distributed as distributed
from graphprune.passes import BlockPrune, ChannelPrune, NMSparsity, Quantize
from graphprune.train.run import fine_tune
from graphprune.train.run import main as train_main
from tests.train_setups import tiny, tiny_lm

pytestmark = pytest.mark.slow  # see tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent


def _train(tmp_path: Path, ranks: int, *args: str, setup: str = "tests.train_setups:tiny") -> gp.PlanFile:
    """``python -m graphprune.train ARGS`` under torchrun on ``ranks`` processes; one rank runs in this
    process (the same ``main``, without two interpreter starts)."""
    out = tmp_path / f"{args[0]}-{ranks}"
    argv = [*args, "--setup", setup, "--out", str(out)]
    if ranks == 1:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert train_main(argv) == 0
        stdout = printed.getvalue()
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        done = subprocess.run(
            [*launcher, "-m", "graphprune.train", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        stdout = done.stdout
    assert f"({ranks} rank" in stdout
    return gp.PlanFile.load(f"{out}.json")


def test_masks_learned_on_two_ranks_are_those_learned_in_one_process(tmp_path):
    """The Wanda prior's statistics are summed over the ranks' calibration shards; the Gumbel noise
    is shared; DDP averages the gradients of the ranks' half batches."""
    args = ("learn-masks", "--prior", "wanda", "--steps", "40", "--lr", "0.1")
    one, two = _train(tmp_path, 1, *args), _train(tmp_path, 2, *args)
    assert two.masks and two.diff(one) == []
    setup = tiny()
    prior = gp.plan(
        setup.model, setup.example_inputs, [NMSparsity(2, 4, method="wanda")], calibration=setup.calibration
    )
    assert any(line.startswith("mask") for line in one.diff(prior))  # training moved masks off the prior


def test_sparsegpt_and_fine_tuning_on_two_ranks_match_one_process(tmp_path):
    """SparseGPT's Hessians are summed over the ranks' calibration shards; SR-STE fine-tuning under DDP
    keeps the ranks' weights identical, and equal to the one-process run's.  In float64: the ranks'
    partial sums add up in another order than one process's, which float32 sums would show."""
    args = ("fine-tune", "--method", "sparsegpt", "--precision", "float64", "--steps", "20", "--lr", "0.05")
    one, two = _train(tmp_path, 1, *args), _train(tmp_path, 2, *args)
    assert [line for line in two.diff(one) if not line.startswith("value")] == []
    assert set(one.values) == set(two.values) and len(one.values) == 6  # every weight and bias
    for name in one.values:
        assert torch.allclose(one.values[name], two.values[name], atol=1e-6), name


def test_distilling_a_depth_pruned_plan_on_two_ranks_matches_one_process(tmp_path):
    """The teacher runs on each rank's half batch, the KL and the state loss are means over its rows,
    DDP averages the gradients: the ranks end with the weights one process gets (here, in this one)."""
    setup = tiny_lm()
    pruned = gp.prune(setup.model, setup.example_inputs, [BlockPrune(n=1)], calibration=setup.calibration)
    pruned.save_plan(tmp_path / "depth")
    args = ("fine-tune", "--plan", str(tmp_path / "depth.json"), "--teacher", "dense", "--states-weight", "0.5")
    args += ("--steps", "6", "--lr", "0.05")
    two = _train(tmp_path, 2, *args, setup="tests.train_setups:tiny_lm")
    one = fine_tune(tiny_lm(), plan=tmp_path / "depth.json", teacher="dense", states_weight=0.5, steps=6, lr=0.05)
    assert one.depth == two.depth == pruned.plan_file().depth and set(one.values) == set(two.values)
    for name in one.values:
        assert torch.allclose(one.values[name], two.values[name], atol=1e-5), name


def test_what_is_not_a_sum_is_refused_on_several_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    setup = tiny()
    with pytest.raises(gp.InputError, match="computed by one process only"):
        gp.prune(setup.model, setup.example_inputs, [Quantize()], calibration=setup.calibration)
    with pytest.raises(gp.InputError, match=r"compensate='reconstruct'.*one process only"):
        gp.prune(
            setup.model,
            setup.example_inputs,
            [ChannelPrune(0.5, compensate="reconstruct")],
            calibration=setup.calibration,
        )


def test_global_batches_split_evenly_over_ranks():
    batch = {"x": torch.arange(8).reshape(4, 2), "n": 3}
    halves = [distributed.split_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h["x"] for h in halves]), batch["x"]) and halves[1]["n"] == 3
    with pytest.raises(gp.InputError, match="does not split evenly over 3 ranks"):
        distributed.split_batch(batch, 0, 3)
    assert distributed.shard(list(range(5))) == list(range(5))  # one process: everything
