"""The coupling graph of an analysis, for a person to look at.

Nodes are channel groups (prunable), frozen spaces (with their reason) and tensors; an edge says
"this group / frozen space indexes this dim of this tensor".  A tensor touched by several groups
(a weight pruned along its rows by one group and its columns by another) links them, which is the
coupling a reader wants to see.  Written as Graphviz DOT (text, no Graphviz needed to write it) or
drawn to SVG/PNG with networkx's layout and matplotlib.
"""

from __future__ import annotations

import os

import networkx as nx

from graphprune.core.groups import Analysis
from graphprune.errors import InputError


def coupling_graph(analysis: Analysis) -> nx.Graph:
    graph = nx.Graph()
    for group in analysis.groups:
        node = f"group {group.id}"
        graph.add_node(node, kind="group", label=f"group {group.id}\\n{group.size} ch")
        for m in group.members:
            graph.add_node(m.name, kind="tensor", label=m.name)
            graph.add_edge(node, m.name, label=f"dim {m.dim}")
    for i, frozen in enumerate(analysis.frozen):
        node = f"frozen {i}"
        graph.add_node(node, kind="frozen", label=f"frozen: {frozen.size} ch\\n{str(frozen.reason)[:60]}")
        for m in frozen.members:
            graph.add_node(m.name, kind="tensor", label=m.name)
            graph.add_edge(node, m.name, label=f"dim {m.dim}")
    return graph


STYLE = {
    "group": 'shape=box, style=filled, fillcolor="#cfe2f3"',
    "frozen": 'shape=box, style=filled, fillcolor="#f4cccc"',
    "tensor": "shape=ellipse, fontsize=9",
}
COLORS = {"group": "#6fa8dc", "frozen": "#e06666", "tensor": "#cccccc"}


def write_graph(analysis: Analysis, path: str | os.PathLike) -> None:
    """Write the coupling graph to ``path``: ``.dot`` (Graphviz text), ``.svg`` or ``.png`` (drawn)."""
    path = os.fspath(path)
    graph = coupling_graph(analysis)
    if path.endswith(".dot"):
        lines = ["graph coupling {", "  rankdir=LR;"]
        for node, data in graph.nodes(data=True):
            label = data["label"].replace('"', "'")
            lines.append(f'  "{node}" [label="{label}", {STYLE[data["kind"]]}];')
        for a, b, data in graph.edges(data=True):
            lines.append(f'  "{a}" -- "{b}" [label="{data["label"]}", fontsize=8];')
        lines.append("}")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return
    if not path.endswith((".svg", ".png")):
        raise InputError(f"the coupling graph is written as .dot, .svg or .png, got {path!r}")
    from matplotlib.figure import Figure

    layout = nx.spring_layout(graph, seed=0, k=1.5 / max(1, graph.number_of_nodes()) ** 0.5)
    size = min(40, 6 + graph.number_of_nodes() * 0.12)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    ax.set_axis_off()
    kinds = nx.get_node_attributes(graph, "kind")
    nx.draw_networkx_edges(graph, layout, ax=ax, alpha=0.4)
    nx.draw_networkx_nodes(graph, layout, ax=ax, node_color=[COLORS[kinds[n]] for n in graph], node_size=120)
    labels = {n: d["label"].replace("\\n", "\n") for n, d in graph.nodes(data=True)}
    nx.draw_networkx_labels(graph, layout, labels, ax=ax, font_size=6)
    fig.savefig(path, bbox_inches="tight")
