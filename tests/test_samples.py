"""Every sample runs end to end and keeps its output shape."""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.slow  # see tests/conftest.py

SAMPLES = ["resnet", "mobilenet", "densenet", "shufflenet", "vit", "minilm"]


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_runs(name, capsys):
    importlib.import_module(f"samples.{name}").main()
    out = capsys.readouterr().out
    assert "graphprune report" in out
    assert "prunable groups" in out or "nearest-neighbour" in out


def test_resnet_sample_runs_the_whole_pipeline(capsys):
    importlib.import_module("samples.resnet").main()
    out = capsys.readouterr().out
    assert "Quantize" in out and "fused by onnxruntime into" in out and "QLinearConv" in out
