"""The sparsity roofline: each op's predicted time on a device, dense and compressed (Shinn et al.).

An op's time is ``max(FLOPs / peak math rate, bytes moved / memory bandwidth)`` at its number
formats: a layer is compute-bound or memory-bound, and a compression pays only on the side that
binds.  Channel pruning shrinks both; N:M sparsity doubles the math rate and halves the stored
weight (plus a 2-bit index per kept value) where the device runs 2:4 on sparse tensor cores, and
changes nothing elsewhere (the masked layer runs dense); int8 quarters weight and activation
bytes and moves the math to the int8 rate.

Assumptions, stated because they are where predictions go wrong: ops run one after another,
each at its roofline, with no launch overhead; every op reads its inputs from memory and writes
its outputs back, except views (they move nothing) and a weight layer's epilogues (a BatchNorm
or activation applied to its output alone, which runtimes fold or fuse into the layer: free, with
``fuse=True``); the peaks are reachable at every shape; batch only scales activations and MACs.
``bench/roofline.py`` measures how far this is from onnxruntime on this CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from graphprune.core.costs import BITS, Format, OpCost
from graphprune.emit.devices import Device
from graphprune.errors import InputError

CHART_SOFTWARE = "graphprune roofline"  # in the chart's PNG text: how a chart graphprune drew is recognised


@dataclass(frozen=True)
class OpTime:
    """One op's predicted time and what bounds it."""

    flops: float
    bytes: float
    seconds: float
    bound: str  # "compute" or "memory"
    format: str
    math: str  # the format of its arithmetic, whose peak it is held to
    sparse_math: bool  # ran on 2:4 sparse tensor cores

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else math.inf


@dataclass(frozen=True)
class RooflineRow:
    """An op of the dense model beside its compressed self (None where the compression removed it)."""

    key: str
    op: str
    weight: str | None  # the parameter a matmul or convolution multiplies by
    dense: OpTime | None
    compressed: OpTime | None

    @property
    def speedup(self) -> float:
        before = self.dense.seconds if self.dense else 0.0
        after = self.compressed.seconds if self.compressed else 0.0
        return before / after if after else math.inf


@dataclass
class Roofline:
    """Predicted dense and compressed time of a model on ``device``, per op and in total."""

    device: Device
    precision: str
    batch: int
    rows: list[RooflineRow] = field(default_factory=list)

    @property
    def dense_seconds(self) -> float:
        return sum(r.dense.seconds for r in self.rows if r.dense)

    @property
    def compressed_seconds(self) -> float:
        return sum(r.compressed.seconds for r in self.rows if r.compressed)

    @property
    def speedup(self) -> float:
        """Predicted dense time over compressed time."""
        return self.dense_seconds / self.compressed_seconds if self.compressed_seconds else math.inf

    def weight_rows(self) -> list[RooflineRow]:
        """The rows of layers with a weight (matmuls and convolutions)."""
        return [r for r in self.rows if r.weight is not None]

    def table(self, top: int = 20) -> str:
        """The ``top`` weight layers by dense time, the other ops summed, and the total."""
        layers = sorted(self.weight_rows(), key=lambda r: -(r.dense.seconds if r.dense else 0.0))
        others = [r for r in self.rows if r.weight is None]
        lines = [
            f"roofline on {self.device.name}, {self.precision}, batch {self.batch}: predicted "
            f"{_ms(self.dense_seconds)} -> {_ms(self.compressed_seconds)} ({self.speedup:.2f}x)",
            f"  {'layer':<44}{'format':<12}{'dense':>10}{'compressed':>12}{'speedup':>9}  bound",
        ]
        for row in layers[:top]:
            lines.append(_line(row.key, row))
        if len(layers) > top:
            lines.append(_line(f"... {len(layers) - top} more layers", *layers[top:]))
        if others:
            lines.append(_line(f"other ops ({len(others)}: norms, activations, adds)", *others))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "device": self.device.name,
            "precision": self.precision,
            "batch": self.batch,
            "dense_ms": self.dense_seconds * 1e3,
            "compressed_ms": self.compressed_seconds * 1e3,
            "speedup": self.speedup,
            "layers": [
                {
                    "key": r.key,
                    "op": r.op,
                    "dense_ms": r.dense.seconds * 1e3 if r.dense else 0.0,
                    "compressed_ms": r.compressed.seconds * 1e3 if r.compressed else 0.0,
                    "format": r.compressed.format if r.compressed else None,
                    "bound": r.compressed.bound if r.compressed else None,
                }
                for r in self.weight_rows()
            ],
        }

    def plot(self, path: str) -> str:
        """The roofline chart (attainable FLOP/s against FLOPs per byte, log-log) with every
        weight layer on it, dense hollow and compressed filled; returns ``path``."""
        from matplotlib.figure import Figure  # object API: no global pyplot state, no GUI backend

        figure = Figure(figsize=(7, 4.5))
        axes = figure.add_subplot()
        rows = self.weight_rows()
        points = [t for r in rows for t in (r.dense, r.compressed) if t and t.flops]
        lo = min((t.intensity for t in points), default=0.1) / 2
        hi = max((t.intensity for t in points), default=100.0) * 2
        xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        for math_format, sparse in sorted({(t.math, t.sparse_math) for t in points}):
            rate = (self.device.sparse if sparse else self.device.dense)[math_format]
            label = f"{math_format} {'2:4 sparse' if sparse else 'dense'} peak"
            axes.plot(xs, [min(rate, x * self.device.bandwidth) for x in xs], lw=1, label=label)
        axes.scatter(
            [r.dense.intensity for r in rows if r.dense and r.dense.flops],
            [r.dense.flops / r.dense.seconds for r in rows if r.dense and r.dense.flops],
            facecolors="none",
            edgecolors="gray",
            label="dense layers",
        )
        axes.scatter(
            [r.compressed.intensity for r in rows if r.compressed and r.compressed.flops],
            [r.compressed.flops / r.compressed.seconds for r in rows if r.compressed and r.compressed.flops],
            color="C3",
            s=14,
            label="compressed layers",
        )
        axes.set(
            xscale="log",
            yscale="log",
            xlabel="FLOPs per byte moved",
            ylabel="attained FLOP/s (predicted)",
            title=f"{self.device.name}: {self.speedup:.2f}x predicted",
        )
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=110, metadata={"Software": CHART_SOFTWARE})
        return path


def is_chart(path: str) -> bool:
    """Whether ``path`` is a roofline chart graphprune drew (which it may replace)."""
    try:
        with open(path, "rb") as png:
            head = png.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00" + CHART_SOFTWARE.encode() in head


def predict(
    dense: Sequence[OpCost],
    compressed: Sequence[OpCost],
    formats: Mapping[str, Format],
    device: Device,
    *,
    precision: str,
    scale: float = 1.0,
    batch: int = 1,
    fuse: bool = True,
) -> Roofline:
    """The roofline of ``dense`` against ``compressed`` (the same model after compression, its ops
    keyed alike), with ``formats`` for the compressed weight layers (others at ``precision``)
    and activations and MACs scaled by ``scale``; ``fuse``: epilogues cost nothing."""
    if precision not in device.dense:
        raise InputError(f"{device.name} has no {precision} rate: it has {', '.join(device.dense)} (give precision=)")
    plain = Format(precision, precision)
    for weight, fmt in formats.items():
        if fmt.math not in device.dense:
            raise InputError(f"{weight} runs in {fmt.math}, for which {device.name} has no rate")
    after = {cost.key: cost for cost in compressed}
    rows = []
    for cost in dense:
        new = after.pop(cost.key, None)
        rows.append(
            RooflineRow(
                key=cost.key,
                op=cost.op,
                weight=cost.weight,
                dense=op_time(cost, plain, device, scale, fuse),
                compressed=op_time(new, formats.get(new.key, plain), device, scale, fuse) if new else None,
            )
        )
    for cost in after.values():  # ops only the compressed model has
        rows.append(
            RooflineRow(
                key=cost.key,
                op=cost.op,
                weight=cost.weight,
                dense=None,
                compressed=op_time(cost, formats.get(cost.key, plain), device, scale, fuse),
            )
        )
    return Roofline(device=device, precision=precision, batch=batch, rows=rows)


def linear_cost(out_features: int, in_features: int, tokens: int) -> OpCost:
    """One linear layer (no bias) applied to ``tokens`` rows."""
    return OpCost(
        key="weight",
        op="aten.linear",
        macs=tokens * out_features * in_features,
        weight="weight",
        weight_elements=out_features * in_features,
        parameter_elements=0,
        input_elements=tokens * in_features,
        output_elements=tokens * out_features,
    )


def two_four_speedup(device: Device, math_format: str, cost: OpCost) -> float:
    """Predicted time of ``cost`` dense over its time with a 2:4 weight, both in ``math_format``."""
    dense = op_time(cost, Format(math_format, math_format), device)
    return dense.seconds / op_time(cost, Format(math_format, math_format, (2, 4)), device).seconds


def op_time(cost: OpCost, fmt: Format, device: Device, scale: float = 1.0, fuse: bool = False) -> OpTime:
    """One op's predicted time at ``fmt`` on ``device`` (see the module doc for the model); with
    ``fuse``, an epilogue is free."""
    if fuse and cost.epilogue_of is not None:
        return OpTime(flops=0.0, bytes=0.0, seconds=0.0, bound="fused", format="", math=fmt.math, sparse_math=False)
    sparse = fmt.pattern == (2, 4) and cost.weight is not None and fmt.math in device.sparse
    weight_bytes = cost.weight_elements * BITS[fmt.weights] / 8
    if sparse:  # stored compressed: the kept half, and a 2-bit position per kept value
        weight_bytes = weight_bytes / 2 + cost.weight_elements / 2 * 2 / 8
    moved = (
        weight_bytes
        + cost.parameter_elements * BITS[fmt.activations] / 8
        + (cost.input_elements + cost.output_elements) * scale * BITS[fmt.activations] / 8
    )
    flops = 2 * cost.macs * scale
    rate = device.sparse[fmt.math] if sparse else device.dense[fmt.math]
    compute, memory = flops / rate, moved / device.bandwidth
    return OpTime(
        flops=flops,
        bytes=moved,
        seconds=max(compute, memory),
        bound="compute" if compute >= memory else "memory",
        format=(fmt if sparse else Format(fmt.weights, fmt.activations)).describe(),
        math=fmt.math,
        sparse_math=sparse,
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.3g} us"


def _line(label: str, *rows: RooflineRow) -> str:
    before = sum(r.dense.seconds for r in rows if r.dense)
    after = sum(r.compressed.seconds for r in rows if r.compressed)
    one = rows[0] if len(rows) == 1 else None
    fmt = one.compressed.format if one and one.compressed else "" if not one else "removed"
    bound = one.compressed.bound if one and one.compressed else ""
    speed = f"{before / after:.2f}x" if after else "-"
    return f"  {label[:43]:<44}{fmt:<12}{_ms(before):>10}{_ms(after):>12}{speed:>9}  {bound}"
