"""The run report: one row per pass with time, size, cost and output error."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class ReportRow:
    pass_name: str
    seconds: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    output_error: float | None = None  # max |y - y_dense| / max |y_dense| on the example inputs
    stage: str = ""
    details: dict = field(default_factory=dict)


@dataclass
class Report:
    model_name: str
    params: int
    macs: int
    rows: list[ReportRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # pipeline-level facts a reader must not miss
    pipeline: list[str] = field(default_factory=list)  # the passes as written (repr)

    @property
    def params_after(self) -> int:
        return self.rows[-1].params_after if self.rows else self.params

    @property
    def macs_after(self) -> int:
        return self.rows[-1].macs_after if self.rows else self.macs

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "params": self.params,
            "macs": self.macs,
            "params_after": self.params_after,
            "macs_after": self.macs_after,
            "pipeline": list(self.pipeline),
            "notes": list(self.notes),
            "passes": [asdict(r) for r in self.rows],
        }

    def __str__(self) -> str:
        lines = [
            f"graphprune report: {self.model_name}",
            f"  params {_n(self.params)} -> {_n(self.params_after)} ({_ratio(self.params_after, self.params)}), "
            f"MACs {_n(self.macs)} -> {_n(self.macs_after)} ({_ratio(self.macs_after, self.macs)})",
            *(f"  {note}" for note in self.notes),
            f"  {'pass':<28}{'stage':<12}{'time':>9}{'params':>22}{'MACs':>22}{'out err':>10}",
        ]
        for r in self.rows:
            err = "-" if r.output_error is None else f"{r.output_error:.2e}"
            lines.append(
                f"  {r.pass_name:<28}{r.stage:<12}{r.seconds:>8.2f}s"
                f"{_n(r.params_before) + ' -> ' + _n(r.params_after):>22}"
                f"{_n(r.macs_before) + ' -> ' + _n(r.macs_after):>22}{err:>10}"
            )
            for k, v in r.details.items():
                lines.append(f"      {k}: {v}")
        return "\n".join(lines)


def _n(x: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.1%}" if before else "-"


UNCHANGED = 1e-4  # the largest max_relative_error of a rewrite that must not change the outputs


def max_relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The report's output error: the worst ``max |got - want| / max |want|`` over the outputs (an
    integer or bool output that differs counts 1).  An output whose shape changed (one the caller let
    shrink) has no element-wise error and is left out."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            continue
        if a.is_floating_point():
            scale = b.abs().max().item() or 1.0
            worst = max(worst, (a.double() - b.double()).abs().max().item() / scale)
        elif not torch.equal(a, b):
            worst = max(worst, 1.0)
    return worst


def calibration_size(first_inputs: Sequence[tuple[Sequence[int], bool]]) -> tuple[int, str] | None:
    """How much calibration data the batches' first inputs (each its shape, and whether it holds
    integers) stand for, as ``(count, unit)``: tokens where every one holds integers (token ids),
    else samples (their leading dims); None without any."""
    if not first_inputs:
        return None
    if all(integers for _, integers in first_inputs):
        return sum(math.prod(shape) for shape, _ in first_inputs), "tokens"
    return sum(shape[0] if len(shape) else 1 for shape, _ in first_inputs), "samples"
