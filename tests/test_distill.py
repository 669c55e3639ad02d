"""Distillation recovery (issue 24): the teacher's logits in memory or from disk, the KL and state
losses, and fine-tuning a depth-pruned plan from its dense model."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.errors import InputError
from graphprune.frontends.torch.copying import clone
from graphprune.passes import BlockPrune
from graphprune.train.distill import Distillation, TeacherLogits, matched_blocks, save_teacher_logits
from graphprune.train.run import fine_tune, main
from tests.train_setups import tiny_lm


def _kl(student, teacher, batches) -> float:
    distillation = Distillation(teacher, outputs=tiny_lm().outputs)
    with torch.no_grad():
        return sum(float(distillation.loss(student, b, i)) for i, b in enumerate(batches)) / len(batches)


@pytest.mark.slow
def test_a_student_equal_to_its_teacher_has_no_loss_and_states_match_by_kept_block():
    setup = tiny_lm()
    same = clone(setup.model)
    matched = list(matched_blocks("model.layers", [0, 1, 2, 3]))
    distillation = Distillation(setup.model, states_weight=1.0, matched=matched, outputs=setup.outputs)
    with torch.no_grad():
        assert float(distillation.loss(same, setup.batches[0], 0)) == pytest.approx(0.0, abs=1e-6)
    assert list(matched_blocks("model.layers", [0, 2, 3])) == [
        ("model.layers.0", "model.layers.0"),
        ("model.layers.1", "model.layers.2"),
        ("model.layers.2", "model.layers.3"),
    ]


@pytest.fixture(scope="module")
def depth_plan(tmp_path_factory):
    setup = tiny_lm()
    folder = tmp_path_factory.mktemp("distill")
    gp.prune(setup.model, setup.example_inputs, [BlockPrune(n=1)], calibration=setup.calibration).save_plan(
        folder / "plan"
    )
    return folder


@pytest.mark.slow
def test_distilling_a_depth_pruned_model_brings_it_towards_its_dense_teacher(depth_plan):
    setup = tiny_lm()
    before = gp.apply_plan_file(setup.model, setup.example_inputs, depth_plan / "plan.json")
    start = _kl(before, setup.model, setup.batches)
    tuned = fine_tune(setup, plan=depth_plan / "plan.json", teacher="dense", steps=12, lr=0.2)
    assert tuned.depth is not None and tuned.values and "distillation from dense" in tuned.pipeline[-1]
    after = gp.apply_plan_file(setup.model, setup.example_inputs, tuned)
    assert len(after.model.layers) == 3 and _kl(after, setup.model, setup.batches) < 0.6 * start
    with_states = fine_tune(
        tiny_lm(), plan=depth_plan / "plan.json", teacher="dense", steps=12, lr=0.05, states_weight=0.5
    )
    after = gp.apply_plan_file(setup.model, setup.example_inputs, with_states)
    assert _kl(after, setup.model, setup.batches) < 0.8 * start


@pytest.mark.slow
def test_logits_saved_to_disk_train_what_the_teacher_module_trains(depth_plan, tmp_path):
    setup = tiny_lm()
    path = save_teacher_logits(setup.model, setup.batches, tmp_path / "logits.safetensors", outputs=setup.outputs)
    assert TeacherLogits(path).count == len(setup.batches)
    assert save_teacher_logits(setup.model, setup.batches[:1], path, outputs=setup.outputs) == path  # its own file
    assert TeacherLogits(path).count == 1
    save_teacher_logits(setup.model, setup.batches, path, outputs=setup.outputs)
    (tmp_path / "mine.safetensors").write_bytes(b"a file graphprune did not write")
    with pytest.raises(InputError, match="mine.safetensors"):
        save_teacher_logits(setup.model, setup.batches, tmp_path / "mine.safetensors", outputs=setup.outputs)
    assert (tmp_path / "mine.safetensors").read_bytes() == b"a file graphprune did not write"
    from_module = fine_tune(setup, plan=depth_plan / "plan.json", teacher="dense", steps=5, lr=0.5)
    from_disk = fine_tune(tiny_lm(), plan=depth_plan / "plan.json", teacher=path, steps=5, lr=0.5)
    assert set(from_module.values) == set(from_disk.values)
    for name, value in from_module.values.items():
        assert torch.allclose(value, from_disk.values[name], atol=1e-6), name


@pytest.mark.slow
def test_the_command_distils_a_plan_and_refuses_what_does_not_fit(depth_plan, tmp_path, capsys):
    args = ["fine-tune", "--setup", "tests.train_setups:tiny_lm", "--plan", str(depth_plan / "plan.json")]
    assert main([*args, "--teacher", "dense", "--steps", "2", "--out", str(tmp_path / "tuned")]) == 0
    assert gp.PlanFile.load(tmp_path / "tuned.json").depth is not None
    assert main([*args, "--method", "wanda", "--out", str(tmp_path / "x")]) == 2
    assert "--method choose N:M masks made here" in capsys.readouterr().err
    assert main([*args, "--temperature", "2", "--out", str(tmp_path / "x")]) == 2
    assert main(["teacher-logits", "--setup", "tests.train_setups:tiny_lm", "--out", str(tmp_path / "t.st")]) == 0
    assert main([*args, "--teacher", str(tmp_path / "t.st"), "--states-weight", "1", "--out", str(tmp_path / "x")]) == 2
    assert "needs the teacher module" in capsys.readouterr().err
    with pytest.raises(InputError, match="temperature > 0"):
        Distillation(tiny_lm().model, temperature=0)
