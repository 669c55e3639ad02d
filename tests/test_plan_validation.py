"""Damaged, edited and hostile plan files are refused at load with an InputError naming the file,
the entry and what is wrong (issue 18 items 6 and 7): never a raw exception, never applied."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import graphprune as gp
from tests.test_plan_file import small_plan  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def saved(small_plan, tmp_path_factory):  # noqa: F811
    """A small plan with a structured plan, a 2:4 mask and a new value, saved once."""
    folder = tmp_path_factory.mktemp("plan")
    dataclasses.replace(small_plan, values={"2.weight": torch.randn(8, 8)}).save(folder / "plan")
    return folder


def _copy(
    saved,
    tmp_path,
    edit: Callable[[dict], object] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> str:
    """The saved plan copied to ``tmp_path``, its JSON and tensors edited in place."""
    for name in os.listdir(saved):
        shutil.copy(saved / name, tmp_path / name)
    path = tmp_path / "plan.json"
    if edit is not None:
        data = json.loads(path.read_text())
        replaced = edit(data)
        path.write_text(json.dumps(data if replaced is None else replaced))
    if tensors is not None:
        stored = load_file(tmp_path / "plan.safetensors")
        tensors(stored)
        save_file(stored, tmp_path / "plan.safetensors", metadata={"format": "graphprune-plan"})
    return str(path)


def _refused(path: str, match: str) -> None:
    with pytest.raises(gp.InputError, match=match) as caught:
        plan = gp.PlanFile.load(path)
        for name in plan.masks:  # mask values are read (and checked) when asked for
            plan.masks[name]
    assert path in str(caught.value) or "plan.safetensors" in str(caught.value) or "evil" in str(caught.value)


def test_the_saved_plan_loads(saved):
    plan = gp.PlanFile.load(saved / "plan.json")
    assert plan.structured and plan.masks and set(plan.values) == {"2.weight"}


def _set(*keys, value):
    def edit(data: dict) -> None:
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value

    return edit


def _delete(*keys):
    def edit(data: dict) -> None:
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]

    return edit


JSON_PROBES = {
    "a list": (lambda data: [data], r"not a graphprune plan .*a JSON list"),
    "no model": (_delete("model"), r"the plan has no 'model'"),
    "structured not a list": (_set("structured", value={"0": 1}), r"\['structured'\] is dict .*not list"),
    "structured entry not an object": (_set("structured", value=[3]), r"'structured' entry 0 is int 3, not dict"),
    "pipeline of numbers": (_set("pipeline", value=[1]), r"'pipeline' entry 0 is int 1, not str"),
    "pattern 2:x": (_set("masks", "0.weight", "pattern", value="2:x"), r"pattern is '2:x', not N:M"),
    "pattern 5:4": (_set("masks", "0.weight", "pattern", value="5:4"), r"pattern is '5:4', not N:M with 0 < N < M"),
    "unknown layout": (_set("masks", "0.weight", "layout", value="diagonal"), r"layout is 'diagonal'"),
    "mask shape unlike its tensor": (
        _set("masks", "0.weight", "shape", value=[4, 16]),
        r"'mask/0.weight' has shape \[8, 8\], its JSON entry says \[4, 16\]",
    ),
    "mask keeps more than it has": (_set("masks", "0.weight", "kept", value=65), r"kept is 65, more than the 64"),
    "negative kept count": (_set("structured", 0, "kept", "0", value=-1), r"kept of group 0 is -1"),
    "kept count unlike its tensor": (
        _set("structured", 0, "kept", "0", value=7),
        r"'keep/0/0' has shape \[8\], not \[7\]",
    ),
    "group not a number": (lambda data: data["structured"][0]["kept"].update({"x": 1}), r"names group 'x'"),
    "bad shape string": (_set("structured", 0, "shapes", "0.weight", value="16xa"), r"is '16xa', not sizes"),
    "no sliced dims": (_set("structured", 0, "sliced", "0.bias", value=[]), r"sliced dims of '0.bias' are \[\]"),
    "sliced dim beyond the shape": (
        _set("structured", 0, "sliced", "0.bias", value=[1]),
        r"sliced dims of '0.bias' are \[1\]: not increasing dims of its shape \[16\]",
    ),
    "slice beyond the recorded dim": (
        _set("structured", 0, "shapes", "0.weight", value="4x8"),
        r"'slice/0/0.weight/0': index \d+ is outside the dim's 4 entries",
    ),
    "missing tensor named": (
        lambda data: data["structured"][0]["kept"].update({"7": 2}),
        r"tensor 'keep/0/7' is not in its tensor files",
    ),
    "value shape unlike its tensor": (
        _set("values", "2.weight", value=[8, 9]),
        r"'value/2.weight' has shape \[8, 8\], its JSON entry says \[8, 9\]",
    ),
    "example input of no dtype": (
        _set("example_inputs", "args", 0, value=["float99", [2, 8]]),
        r"'example_inputs' args entry 0 is \[",
    ),
    "example inputs without kwargs": (_delete("example_inputs", "kwargs"), r"'example_inputs' has no 'kwargs'"),
    "quantization not a quantization plan": (
        _set("quantization", value={"version": 1, "kind": "int8"}),
        r"'quantization' is not a quantization plan",
    ),
    "tensor file climbing out": (_set("tensor_files", value=["../../etc/passwd"]), r"'tensor_files' entry .*plain"),
    "tensor file absolute": (_set("tensor_files", value=["/etc/evil.safetensors"]), r"not a plain .safetensors"),
    "tensor file not a string": (_set("tensor_files", value=[7]), r"'tensor_files' entry 7 is int 7, not str"),
}


@pytest.mark.parametrize("probe", list(JSON_PROBES))
def test_an_edited_json_is_refused_naming_the_entry(probe, saved, tmp_path):
    edit, match = JSON_PROBES[probe]
    _refused(_copy(saved, tmp_path, edit), match)


def _put(name: str, value: torch.Tensor | None):
    def change(tensors: dict[str, torch.Tensor]) -> None:
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value

    return change


TENSOR_PROBES = {
    "indices all zeros": (_put("keep/0/0", torch.zeros(8, dtype=torch.int64)), r"not strictly increasing"),
    "indices unsorted": (_put("slice/0/0.bias/0", torch.arange(8).flip(0)), r"not strictly increasing"),
    "empty index list": (_put("slice/0/0.bias/0", torch.zeros(0, dtype=torch.int64)), r"keeps no index"),
    "negative index": (_put("slice/0/0.bias/0", torch.arange(-1, 7)), r"index -1 is negative"),
    "index out of range": (_put("slice/0/0.bias/0", torch.arange(9, 17)), r"index 16 is outside the dim's 16"),
    "indices as floats": (_put("keep/0/0", torch.arange(8.0)), r"'keep/0/0' is F32, not I64"),
    "indices in two dims": (_put("keep/0/0", torch.arange(8).reshape(2, 4)), r"has shape \[2, 4\], not \[8\]"),
    "missing tensor": (_put("slice/0/2.weight/1", None), r"'slice/0/2.weight/1' is not in its tensor files"),
    "mask as floats": (_put("mask/0.weight", torch.ones(8, 8)), r"'mask/0.weight' is F32, not U8"),
    "mask keeps other entries than recorded": (
        _put("mask/0.weight", torch.ones(8, 8, dtype=torch.uint8)),
        r"mask for 0.weight .*does not match its JSON entry",
    ),
    "value of integers": (_put("value/2.weight", torch.ones(8, 8, dtype=torch.int32)), r"is I32, not F64"),
}


@pytest.mark.parametrize("probe", list(TENSOR_PROBES))
def test_damaged_tensors_are_refused_naming_the_tensor(probe, saved, tmp_path):
    change, match = TENSOR_PROBES[probe]
    _refused(_copy(saved, tmp_path, tensors=change), match)


def test_a_tensor_file_that_is_not_safetensors_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (tmp_path / "plan.safetensors").write_bytes(b"these are not tensors")
    _refused(path, r"plan.safetensors is not a readable safetensors file")


def test_a_truncated_tensor_file_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    whole = (tmp_path / "plan.safetensors").read_bytes()
    (tmp_path / "plan.safetensors").write_bytes(whole[:-16])
    _refused(path, r"plan.safetensors is not a readable safetensors file .*incomplete")


def test_a_safetensors_header_that_lies_about_a_shape_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    whole = (tmp_path / "plan.safetensors").read_bytes()
    size = int.from_bytes(whole[:8], "little")
    header = whole[8 : 8 + size].replace(b'"shape":[8]', b'"shape":[9]', 1)
    assert header != whole[8 : 8 + size]
    (tmp_path / "plan.safetensors").write_bytes(whole[:8] + header + whole[8 + size :])
    _refused(path, r"not a readable safetensors file .*invalid shape")


def test_a_json_that_is_not_text_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (tmp_path / "plan.json").write_bytes(b"\xff\xfe\x00garbage")
    _refused(path, r"is not JSON")


def test_a_tensor_file_linked_from_outside_the_folder_is_refused(saved, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "plan").mkdir()
    shutil.copy(saved / "plan.safetensors", outside / "evil.safetensors")
    os.symlink(outside / "evil.safetensors", tmp_path / "plan" / "part.safetensors")
    path = _copy(saved, tmp_path / "plan", _set("tensor_files", value=["part.safetensors"]))
    _refused(path, r"'tensor_files' entry \"part.safetensors\" resolves to .*elsewhere/evil.safetensors, outside")
