"""The run report as pages a person reads: Markdown and a self-contained HTML file, with plots.

:func:`layer_rows` compares the compressed model with the original layer by layer (shape before
and after, fraction of zero weights, N:M pattern, int8 scales); :func:`write_report` writes
``report.md``, ``report.html`` (plots embedded), ``report.json`` and the plots as PNG into a
directory, staged beside it and moved into place only when complete (an :class:`Outputs`
transaction).  It replaces only a folder it wrote itself: ``report.json`` names graphprune as its
generator and the folder holds nothing but report files.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import asdict, dataclass, replace

import torch.nn as nn
from torch.nn.utils import parametrize

from graphprune.core.report import Report
from graphprune.emit.roofline import Roofline
from graphprune.errors import InputError
from graphprune.frontends.torch.fake_quant import FakeQuantWeight
from graphprune.frontends.torch.masks import NMMask
from graphprune.io.outputs import Outputs, writing

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
GENERATOR = "graphprune"  # report.json's "generator": how a report folder is recognised as graphprune's
PAGES = ("report.json", "report.md", "report.html")
PLOTS = ("sparsity.png", "params_macs.png", "latency.png", "roofline.png")  # the files _plots writes


@dataclass
class LayerRow:
    name: str
    kind: str
    shape_before: list[int]
    shape_after: list[int]
    zeros: float  # fraction of exactly-zero weights in the compressed layer
    pattern: str | None = None  # N:M pattern of its mask
    weight_scale: list[float] | None = None  # int8: min, median, max of the per-channel scales
    input_qparams: list[float] | None = None  # int8: activation scale, zero-point
    predicted_speedup: float | None = None  # the roofline's dense / compressed time of the layer


def _layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES) or type(module).__name__ == "Conv1D":
            yield name, module


def weight_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Each weight layer's weight shape, by module name (taken before compressing, for the report)."""
    return {name: list(module.weight.shape) for name, module in _layers(model)}


def layer_rows(shapes_before: dict[str, list[int]], compressed: nn.Module) -> list[LayerRow]:
    """One row per weight layer of ``compressed`` (layers the compression removed are not listed)."""
    rows = []
    for name, module in _layers(compressed):
        weight = module.weight.detach()
        row = LayerRow(
            name=name,
            kind=type(module).__name__.removeprefix("Parametrized"),
            shape_before=shapes_before.get(name, []),
            shape_after=list(weight.shape),
            zeros=float((weight == 0).float().mean()),
        )
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations["weight"]:
                if isinstance(p, NMMask):
                    row.pattern = str(p.pattern)
                elif isinstance(p, FakeQuantWeight):
                    scale = p.scale.sort().values
                    row.weight_scale = [scale[0].item(), scale[len(scale) // 2].item(), scale[-1].item()]
        if hasattr(module, "qinput_scale"):
            row.input_qparams = [module.qinput_scale.item(), module.qinput_zero_point.item()]
        rows.append(row)
    return rows


def write_report(
    directory: str | os.PathLike,
    report: Report,
    layers: list[LayerRow],
    latency_ms: dict[str, float] | None = None,
    *,
    roofline: Roofline | None = None,
    overwrite: bool = False,
    outputs: Outputs | None = None,
) -> list[str]:
    """Write the report pages into the folder ``directory``; returns the file names.  With a
    ``roofline``, a section with its chart and each layer's predicted speedup.

    ``directory`` may be new, empty, or a report folder graphprune wrote (see
    :func:`is_report_folder`), which is replaced whole; any other folder is refused, even with
    ``overwrite`` (see :func:`check_report_folder`).  With ``outputs`` the pages join the caller's
    transaction and appear when it commits."""
    latency = latency_ms or {}
    with writing(outputs, overwrite=overwrite) as out:
        check_report_folder(directory, out)
        staging = out.claim(directory, folder=True, ours=is_report_folder)
        if roofline is not None:
            predicted = {r.key.rpartition(".")[0]: r.speedup for r in roofline.weight_rows()}
            layers = [replace(r, predicted_speedup=predicted.get(r.name)) for r in layers]
        plots = _plots(staging, report, layers, latency)
        if roofline is not None:
            plots["roofline"] = os.path.basename(roofline.plot(os.path.join(staging, "roofline.png")))
        data = {
            "generator": GENERATOR,
            **report.to_dict(),
            "layers": [asdict(r) for r in layers],
            "latency_ms": latency,
            "roofline": roofline.to_dict() if roofline is not None else None,
        }
        with open(os.path.join(staging, "report.json"), "w") as f:
            json.dump(data, f, indent=2, default=str)
        with open(os.path.join(staging, "report.md"), "w") as f:
            f.write(_markdown(report, layers, latency, plots, roofline))
        with open(os.path.join(staging, "report.html"), "w") as f:
            f.write(_html(report, layers, latency, plots, staging, roofline))
        return sorted(os.listdir(staging))


def check_report_folder(directory: str | os.PathLike, outputs: Outputs) -> str:
    """The absolute ``directory``, refused unless ``outputs`` may write report pages there (callers
    check before long work).  A folder that holds anything but a graphprune report is refused
    whatever ``overwrite`` says: replacing it would delete files graphprune did not make
    (``write_report(".")`` would delete the working directory)."""
    if os.path.isdir(directory) and os.listdir(directory) and not is_report_folder(os.fspath(directory)):
        raise InputError(
            f"{os.path.abspath(directory)} holds files that are not a graphprune report, and report "
            "pages replace their folder whole: name a new or empty folder for the report"
        )
    return outputs.check(directory, folder=True, ours=is_report_folder)


def is_report_folder(path: str) -> bool:
    """Whether ``path`` is a folder of report pages graphprune wrote: its report.json names
    graphprune as the generator, and it holds nothing else but report pages and plots."""
    try:
        names = os.listdir(path)
        with open(os.path.join(path, "report.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("generator") == GENERATOR
        and set(names) <= {*PAGES, *PLOTS}
        and all(os.path.isfile(os.path.join(path, n)) and not os.path.islink(os.path.join(path, n)) for n in names)
    )


def _plots(directory: str, report: Report, layers: list[LayerRow], latency: dict[str, float]) -> dict[str, str]:
    from matplotlib.figure import Figure  # object API: no global pyplot state, no GUI backend

    plots = {}
    if layers:
        fig = Figure(figsize=(7, max(2.5, 0.18 * len(layers) + 1)))
        ax = fig.add_subplot()
        ax.barh(range(len(layers)), [r.zeros for r in layers], color="#4c72b0")
        ax.set_yticks(range(len(layers)), [r.name for r in layers], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of zero weights")
        ax.set_title("Per-layer sparsity")
        plots["sparsity"] = _save(fig, directory, "sparsity.png")
    stages = ["original"] + [r.pass_name for r in report.rows]
    fig = Figure(figsize=(7, 3))
    for i, (label, values) in enumerate(
        (
            ("params", [report.params] + [r.params_after for r in report.rows]),
            ("MACs", [report.macs] + [r.macs_after for r in report.rows]),
        )
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.bar(range(len(stages)), [v / (values[0] or 1) for v in values], color="#55a868")
        ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{label} (fraction of original)", fontsize=9)
    fig.tight_layout()
    plots["size"] = _save(fig, directory, "params_macs.png")
    if latency:
        fig = Figure(figsize=(5, 2.5))
        ax = fig.add_subplot()
        ax.barh(list(latency), list(latency.values()), color="#c44e52")
        ax.set_xlabel("onnxruntime latency (ms)")
        ax.invert_yaxis()
        fig.tight_layout()
        plots["latency"] = _save(fig, directory, "latency.png")
    return plots


def _save(fig, directory: str, name: str) -> str:
    fig.savefig(os.path.join(directory, name), dpi=110, bbox_inches="tight")
    return name


def _markdown(
    report: Report,
    layers: list[LayerRow],
    latency: dict[str, float],
    plots: dict[str, str],
    roofline: Roofline | None = None,
) -> str:
    out = [
        f"# graphprune report: {report.model_name}",
        "",
        f"Pipeline: {', '.join(f'`{p}`' for p in report.pipeline) or '-'}",
        "",
    ]
    out += [f"> {note}" for note in report.notes]
    out += [
        "",
        f"Params {report.params:,} → {report.params_after:,} "
        f"({report.params_after / (report.params or 1):.1%}); MACs {report.macs:,} → {report.macs_after:,} "
        f"({report.macs_after / (report.macs or 1):.1%})",
        "",
    ]
    if latency:
        base = next(iter(latency.values()))
        out += ["| model | onnxruntime ms | speedup |", "|---|---|---|"]
        out += [f"| {k} | {v:.2f} | {base / v:.2f}x |" for k, v in latency.items()] + [""]
    if roofline is not None:
        out += [
            f"Roofline on {roofline.device.name} ({roofline.precision}, batch {roofline.batch}): predicted "
            f"{roofline.dense_seconds * 1e3:.3g} ms → {roofline.compressed_seconds * 1e3:.3g} ms "
            f"({roofline.speedup:.2f}x); each op at max(math / peak, bytes / bandwidth), no fusion",
            "",
        ]
    out += [
        "## Passes",
        "",
        "| pass | stage | seconds | params after | MACs after | output error | details |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        err = "-" if r.output_error is None else f"{r.output_error:.2e}"
        details = "; ".join(f"{k}: {v}" for k, v in r.details.items()).replace("|", "/")
        out.append(
            f"| {r.pass_name} | {r.stage} | {r.seconds:.2f} | {r.params_after:,} | {r.macs_after:,} | {err} "
            f"| {details[:300]} |"
        )
    out += [
        "",
        *[f"![{k}]({v})" for k, v in plots.items()],
        "",
        "## Layers",
        "",
        "| layer | kind | shape before | shape after | zeros | N:M | int8 weight scales (min/median/max) "
        "| input scale, zero-point | predicted speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in layers:
        scales = "/".join(f"{s:.2e}" for s in r.weight_scale) if r.weight_scale else "-"
        qin = f"{r.input_qparams[0]:.2e}, {int(r.input_qparams[1])}" if r.input_qparams else "-"
        speedup = f"{r.predicted_speedup:.2f}x" if r.predicted_speedup is not None else "-"
        out.append(
            f"| {r.name} | {r.kind} | {r.shape_before} | {r.shape_after} | {r.zeros:.1%} | {r.pattern or '-'} "
            f"| {scales} | {qin} | {speedup} |"
        )
    return "\n".join(out) + "\n"


def _html(
    report: Report,
    layers: list[LayerRow],
    latency: dict[str, float],
    plots: dict[str, str],
    directory: str,
    roofline: Roofline | None = None,
) -> str:
    """The Markdown content as a small self-contained HTML page (tables and embedded PNGs)."""
    body = []
    in_table = False
    for line in _markdown(report, layers, latency, {}, roofline).splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
            if line == "## Layers":
                for name in plots.values():
                    with open(os.path.join(directory, name), "rb") as f:
                        data = base64.b64encode(f.read()).decode()
                    body.append(f'<img alt="{name}" src="data:image/png;base64,{data}">')
        elif line.startswith("> "):
            body.append(f"<p><b>{html.escape(line[2:])}</b></p>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%;display:block}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>graphprune report</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>\n"
    )
