"""Every sample runs end to end and keeps its output shape."""

from __future__ import annotations

import importlib

import pytest

import graphprune as gp

pytestmark = pytest.mark.slow  # see tests/conftest.py

SAMPLES = ["mobilenet", "densenet", "shufflenet", "vit", "minilm"]  # resnet: its own test below


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_runs(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the samples write into the working directory
    importlib.import_module(f"samples.{name}").main()
    out = capsys.readouterr().out
    assert "graphprune report" in out
    assert "prunable groups" in out or "nearest-neighbour" in out


def test_resnet_sample_runs_the_whole_pipeline(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sample = importlib.import_module("samples.resnet")
    sample.main()
    out = capsys.readouterr().out
    assert "graphprune report" in out and "prunable groups" in out
    assert "Quantize" in out and "fused by onnxruntime into" in out and "QLinearConv" in out
    written = tmp_path / "graphprune-samples" / "resnet_int8.onnx"
    assert written.is_file() and f"written: {written}" in out
    sample.main()  # again: graphprune wrote that file, so it may replace it
    (tmp_path / "graphprune-samples" / "resnet_int8.onnx").write_bytes(b"a file of the user's")
    with pytest.raises(gp.InputError, match="overwrite"):
        sample.main()  # never over a file graphprune did not write
    assert written.read_bytes() == b"a file of the user's"
