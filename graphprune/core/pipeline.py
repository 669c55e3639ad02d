"""Pass infrastructure: typed compression stages, pass contracts, the pass manager.

Modelled on ``onnx_ir.passes`` / ``torch.fx.passes.infra``: a pass has ``requires``,
``call`` and ``ensures``; ``call`` returns a :class:`PassResult`.  The compression stage is
typed (dense -> structured -> masked -> quantized) and every pass declares the stages it
accepts and the stage it produces, so the manager can refuse a wrong order *before running
anything*, with a message that says why.  It never reorders passes.

A pass works on a :class:`State`: the torch frontend's
:class:`~graphprune.frontends.torch.state.CompressionState` or the ONNX frontend's
:class:`~graphprune.frontends.onnx.state.OnnxState`.  The manager sets the stage a pass
produces, runs the checks registered on it after every pass (by default: every N:M mask still
holds), and adds the failing pass, and the passes that ran before it, to any error.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from tqdm.auto import tqdm

from graphprune.core.report import Report, ReportRow
from graphprune.errors import ContractError, InputError


class Stage(enum.IntEnum):
    DENSE = 0
    STRUCTURED = 1
    MASKED = 2
    COMPENSATED = 3  # low-rank paths added for the error so far: nothing may change those layers' weights
    QUANTIZED = 4

    def __str__(self) -> str:
        return self.name.lower()


MODULE, STREAMED, ONNX = "module", "streamed", "onnx"  # how a state holds its model (State.mode)


class State(Protocol):
    """What the pass manager asks of the model passes work on, whatever its frontend."""

    stage: Stage
    experimental_order: bool
    plans: list[Any]

    @property
    def mode(self) -> str:
        """How the model is held: MODULE (an nn.Module in memory), STREAMED (a plan whose weights stay
        in a checkpoint), ONNX (an ONNX graph)."""

    def param_count(self) -> int:
        """Parameters of the working model."""

    def macs(self) -> int:
        """Multiply-accumulates of one forward on the example inputs."""

    def check_patterns(self, where: str) -> None:
        """Raise :class:`PostconditionError` naming ``where`` if a masked weight lost its N:M pattern."""

    def output_error(self, reference: Any) -> float | None:
        """Worst max-relative output error against ``reference`` (None without one)."""

    def mark_stage(self) -> None:
        """Record the stage on the model, so that it travels with it."""

    def calibration_size(self) -> tuple[int, str] | None:
        """How much calibration data there is, as ``(count, unit)``: tokens where the batches' first
        input holds token ids, else samples; None without any."""


Check = Callable[[State, "Pass"], None]


def check_nm_patterns(state: State, p: Pass) -> None:
    """Every N:M mask must survive every pass."""
    state.check_patterns(p.name)


@dataclass
class PassResult:
    state: Any  # the State the pass returns (its frontend's type)
    modified: bool
    details: dict = field(default_factory=dict)


class Pass(abc.ABC):
    """Base class: subclasses set ``accepts``/``produces`` and implement :meth:`call`.

    ``experimental`` maps stages a pass can technically run on but should not, to the reason;
    it runs there only when the pipeline is started with ``experimental_order=True``, and the
    report says so.  A pass never lowers the stage: the result is the later of the two.
    """

    accepts: frozenset[Stage] = frozenset(Stage)
    # how the model may be held (State.mode); passes written against graphprune.core.frontend.Frontend
    # run on ONNX models too, a pass that reads an nn.Module runs on MODULE (and STREAMED) states only
    modes: frozenset[str] = frozenset({MODULE, STREAMED})
    experimental: Mapping[Stage, str] = MappingProxyType({})  # read-only: no state shared between passes
    produces: Stage | None = None  # None: the stage is unchanged

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}()"

    def requires(self, state: Any) -> None:
        """Raise :class:`ContractError` if ``state`` is not something this pass can work on, and
        :class:`InputError` if its options do not run on the way the state holds the model."""
        if not self.runs_on(state.stage, state.experimental_order):
            raise ContractError(self.order_error(state.stage))
        if (why := self.refusal(state.mode)) is not None:
            raise InputError(why)

    def refusal(self, mode: str) -> str | None:
        """Why this pass, with its options, cannot run on a model held in ``mode`` (:class:`State`'s
        MODULE, STREAMED or ONNX), or None.  The manager asks before any pass runs."""
        if mode not in self.modes:
            return f"{self.name} does not run on {'ONNX' if mode == ONNX else mode} models"
        return None

    def runs_on(self, stage: Stage, experimental_order: bool) -> bool:
        return stage in self.accepts or (experimental_order and stage in self.experimental)

    def next_stage(self, stage: Stage) -> Stage:
        return stage if self.produces is None else max(stage, self.produces)

    def order_error(self, stage: Stage) -> str:
        allowed = ", ".join(str(s) for s in sorted(self.accepts))
        message = f"{self.name} runs on a {allowed} model, but the pipeline reaches it at stage '{stage}'"
        if stage in self.experimental:
            message += (
                f": {self.experimental[stage]}. To run it anyway as an experiment, pass "
                "experimental_order=True to gp.prune (in a recipe: experimental_order = true); "
                "the report will record it"
            )
        return message

    def reads_calibration(self) -> bool:
        """Whether the pass, with its options, runs calibration data (the report then gives the rate)."""
        return False

    def reads_dense_weights(self) -> bool:
        """Whether the pass compares weights with the model as given to the pipeline (an in-place run
        then keeps a copy of it)."""
        return False

    @abc.abstractmethod
    def call(self, state: Any) -> PassResult:
        """Transform ``state`` and say whether anything changed."""

    def ensures(self, state: Any) -> None:
        """Raise :class:`PostconditionError` if the pass did not deliver what it promises.  The
        manager sets the stage and runs the registered checks; a pass overrides this for what only
        it knows."""

    def __call__(self, state: Any) -> PassResult:
        self.requires(state)
        before = state.stage
        result = self.call(state)
        result.state.stage = self.next_stage(before)
        self.ensures(result.state)
        return result


Fusion = Callable[[Pass, Pass], "Pass | None"]  # one pass doing two adjacent passes' work, or None


def fused(passes: list[Pass], fusions: Sequence[Fusion]) -> list[Pass]:
    """``passes`` with each adjacent pair that a rule of ``fusions`` joins replaced by the pass it
    returns (one sweep over the calibration data instead of two), left to right."""
    out: list[Pass] = []
    for p in passes:
        joined = next((j for rule in fusions if out and (j := rule(out[-1], p)) is not None), None)
        if joined is not None:
            out[-1] = joined
        else:
            out.append(p)
    return out


class PassManager:
    """Runs passes in the given order after checking the order against their declared stages,
    and the registered checks after every pass."""

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        experimental_order: bool = False,
        checks: Sequence[Check] = (check_nm_patterns,),
        fusions: Sequence[Fusion] = (),
    ) -> None:
        for p in passes:
            if not isinstance(p, Pass):
                raise ContractError(f"{p!r} is not a graphprune pass (see graphprune.passes)")
        self.passes = fused(list(passes), fusions)
        self.experimental_order = experimental_order
        self.checks = list(checks)

    def add_checks(self, *checks: Check) -> None:
        """Run ``checks`` (``check(state, pass)``, raising on failure) after every pass."""
        self.checks.extend(checks)

    def check_order(self, stage: Stage, mode: str = MODULE) -> list[str]:
        """Raise :class:`ContractError` at the first pass that cannot run where it stands, and
        :class:`InputError` at the first whose options do not run in ``mode``; returns a note for each
        pass that runs out of order experimentally."""
        notes = []
        for p in self.passes:
            if (why := p.refusal(mode)) is not None:
                raise InputError(why)
            if not p.runs_on(stage, self.experimental_order):
                raise ContractError(p.order_error(stage))
            if stage not in p.accepts:
                notes.append(f"EXPERIMENTAL ORDER: {p.name} ran on a {stage} model (experimental_order=True)")
            stage = p.next_stage(stage)
        return notes

    def run(self, state: State, report: Report, reference: Any) -> State:
        report.notes.extend(self.check_order(state.stage, state.mode))
        state.experimental_order = self.experimental_order
        params, macs = state.param_count(), state.macs()
        for i, p in enumerate(tqdm(self.passes, desc="passes", unit="pass", disable=None)):
            start = time.perf_counter()
            before = state.stage
            try:
                result = p(state)
                for check in self.checks:
                    check(result.state, p)
            except Exception as exc:
                ran = ", ".join(q.name for q in self.passes[:i]) or "none"
                exc.add_note(f"in pass {i + 1} of {len(self.passes)}, {p!r} (passes that ran before it: {ran})")
                raise
            if before not in p.accepts:
                result.details["experimental order"] = (
                    f"ran on a {before} model; normally refused: {p.experimental[before]}"
                )
            seconds = time.perf_counter() - start
            state = result.state
            if p.reads_calibration() and (size := state.calibration_size()) is not None:
                count, unit = size
                result.details["calibration rate"] = (
                    f"{count} {unit} in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} {unit}/s)"
                )
            new_params, new_macs = state.param_count(), state.macs()
            report.rows.append(
                ReportRow(
                    pass_name=p.name,
                    seconds=seconds,
                    params_before=params,
                    params_after=new_params,
                    macs_before=macs,
                    macs_after=new_macs,
                    output_error=state.output_error(reference),
                    stage=str(state.stage),
                    details=result.details,
                )
            )
            params, macs = new_params, new_macs
        state.mark_stage()
        return state
