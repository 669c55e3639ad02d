"""The layout's contracts, checked on the source: the core is frontend-neutral, the ONNX frontend
never reaches into the torch frontend, and ``import graphprune`` leaves the ONNX stack unloaded."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "graphprune"
GRAPH_LIBRARIES = ("torch.fx", "onnx", "onnx_ir", "onnxruntime", "onnxscript")
# the algorithms that already run on either frontend; importance and sensitivity still read torch models
NEUTRAL_ALGORITHMS = ("nm", "sparsegpt", "permutation", "quant", "compensation", "moments")


def _module_path(name: str) -> Path | None:
    if name.startswith("graphprune.passes"):
        base = ROOT / "passes" / Path(*name.split(".")[2:])
    else:
        base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside a function (``from a import b``
    counts ``a.b`` too, when that is a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if _module_path(f"{node.module}.{a.name}"))
    return names


def _reaches(module: str) -> dict[str, str]:
    """Every graphprune module ``module`` imports, directly or through others: name -> who imports it."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        current = todo.pop()
        path = _module_path(current)
        if path is None:
            continue
        for name in _imports(path):
            if name.startswith("graphprune") and name not in seen and name != module:
                seen[name] = current
                todo.append(name)
    return seen


def _modules(folder: Path) -> list[str]:
    return [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted(folder.rglob("*.py"))
    ]


NEUTRAL = [
    *_modules(PACKAGE / "core"),
    *(f"graphprune.algorithms.{name}" for name in NEUTRAL_ALGORITHMS),
    "graphprune.rules.registry",
    "graphprune.rules.common",
]


@pytest.mark.parametrize("module", NEUTRAL)
def test_the_core_imports_no_graph_library_and_no_frontend(module):
    reached = {module: "itself", **_reaches(module)}
    for name, importer in reached.items():
        path = _module_path(name)
        if path is None:
            continue
        if name.startswith(("graphprune.frontends", "graphprune.emit", "graphprune.io", "graphprune.api")):
            pytest.fail(f"{module} reaches {name} (imported by {importer}): the core must not depend on a frontend")
        bad = [
            i
            for i in _imports(path)
            if i.startswith(GRAPH_LIBRARIES)
            and i.split(".")[0] in {g.split(".")[0] for g in GRAPH_LIBRARIES}
            and (i.startswith("torch.fx") or not i.startswith("torch"))
        ]
        assert not bad, f"{module} reaches {name}, which imports {sorted(bad)}: the core must stay graph-neutral"


@pytest.mark.parametrize("module", _modules(PACKAGE / "frontends" / "onnx"))
def test_the_onnx_frontend_never_reaches_the_torch_frontend(module):
    torch_side = {
        name: importer
        for name, importer in _reaches(module).items()
        if name.startswith("graphprune.frontends.torch") or name == "graphprune.rules.aten"
    }
    assert not torch_side, f"{module} reaches the torch frontend: {torch_side}"
    fx_users = [
        name
        for name in [module, *_reaches(module)]
        if (path := _module_path(name)) is not None and any(i.startswith("torch.fx") for i in _imports(path))
    ]
    assert not fx_users, f"{module} reaches torch.fx through {fx_users}"


@pytest.mark.slow
def test_import_graphprune_and_the_torch_path_leave_the_onnx_stack_unloaded():
    code = (
        "import sys, graphprune as gp\n"
        "gp.prune, gp.plan, gp.analyze, gp.CompressionState, gp.finalize, gp.PlanFile, gp.apply_plan_file\n"
        "from graphprune.passes import ChannelPrune, NMSparsity, Quantize\n"
        "import graphprune.train, graphprune.sparsity\n"
        "print(sorted(m for m in ('onnx', 'onnx_ir', 'onnxruntime', 'onnxscript') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"the torch path loaded {out.stdout.strip()}"
    code = "import sys, graphprune as gp\ngp.prune_onnx\nprint('onnxruntime' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "True"  # the lazy names do load what they need


# passes written once against graphprune.core.frontend.Frontend, and what else each may reach
FRONTEND_FREE_PASSES = {
    # BlockPrune is module-only: its blocks are found in, and its criteria run, the nn.Module itself
    "graphprune.passes.block_prune": (
        "graphprune.frontends.torch.blocks",
        "graphprune.frontends.torch.calibration",
        "graphprune.frontends.torch.capture",
        "graphprune.frontends.torch.depth",
        "graphprune.frontends.torch.provenance",
        "graphprune.rules.aten",
    ),
    # ChannelPrune's module-only criteria (importance='taylor': gradients through the nn.Module;
    # allocation='sensitivity': the nn.Module's output errors), refused on other modes
    "graphprune.passes.channel_prune": (
        "graphprune.frontends.torch.calibration",
        "graphprune.frontends.torch.capture",
        "graphprune.frontends.torch.distributed",
        "graphprune.frontends.torch.provenance",
        "graphprune.rules.aten",
    ),
    "graphprune.passes.low_rank": (),  # module-only (the torch state's dense weights and paths), by duck typing
    "graphprune.passes.nm_sparsity": (),
    "graphprune.passes.quantize": (),
}


@pytest.mark.parametrize("module", sorted(FRONTEND_FREE_PASSES))
def test_passes_written_against_the_protocol_reach_no_frontend(module):
    reached = {
        name: importer
        for name, importer in _reaches(module).items()
        if name.startswith(("graphprune.frontends", "graphprune.rules.aten", "graphprune.api"))
        and not name.startswith(FRONTEND_FREE_PASSES[module])
    }
    assert not reached, f"{module} asks which frontend it is on: it reaches {reached}"
